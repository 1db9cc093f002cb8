"""hourglass.collector.decode: OTLP protobuf / JSON → span rows, against the real SDK's encoder."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from hourglass.collector.decode import (
    DecodeError,
    decode_export_request,
    decode_otlp_json,
    decode_traces_message,
)
from hourglass.collector.decode_common import parse_id
from hourglass.collector.decode_json import otlp_json_to_message
from hourglass.collector.responses import export_response, rpc_status
from hourglass.collector.schema import SPAN_SCHEMA

# the shared real-traces folder sits beside the repository (resolved from the root, not one machine)
REAL_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "real-traces"


def _sdk_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "checkout", "host.name": "node-7", "deployment": "staging"})
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("shop.lib", "1.0")
    with tracer.start_as_current_span("GET /cart", kind=SpanKind.SERVER) as root:
        root.set_attribute("http.request.method", "GET")
        root.set_attribute("http.method", "POST")  # older name: must lose to the current one
        root.set_attribute("http.route", "/cart")
        root.set_attribute("http.response.status_code", 200)
        root.set_attribute("user.id", "u1")
        with tracer.start_as_current_span("SELECT cart", kind=SpanKind.CLIENT) as child:
            child.set_attribute("db.system", "postgresql")
            child.set_attribute("db.statement", "SELECT * FROM cart WHERE id = $1")
            child.set_attribute("db.pool.wait_ms", 12.5)
            child.set_attribute("retry.attempt", 2)
            child.add_event("lock.acquire", {"lock.name": "cart_row", "waiters": 3})
            child.add_event("log", {"message": "hello"})
            try:
                raise ValueError("boom")
            except ValueError as exc:
                child.record_exception(exc)
            child.set_status(Status(StatusCode.ERROR, "db failed"))
        with tracer.start_as_current_span(
            "publish", kind=SpanKind.PRODUCER, links=[Link(root.get_span_context())]
        ):
            pass
    provider.shutdown()
    return exporter.get_finished_spans()


def test_sdk_round_trip_all_fields() -> None:
    spans = _sdk_spans()
    request = encode_spans(spans)
    result = decode_export_request(request.SerializeToString(), ingested_ns=42)
    assert result.rejected == 0
    table = result.table
    assert table.schema == SPAN_SCHEMA
    rows = {r["name"]: r for r in table.to_pylist()}
    assert set(rows) == {"GET /cart", "SELECT cart", "publish"}
    root, child, publish = rows["GET /cart"], rows["SELECT cart"], rows["publish"]
    root_ctx = next(s for s in spans if s.name == "GET /cart").context
    assert root["trace_id"] == f"{root_ctx.trace_id:032x}"
    assert root["span_id"] == f"{root_ctx.span_id:016x}"
    assert root["parent_span_id"] is None
    assert child["parent_span_id"] == root["span_id"]
    assert root["service"] == "checkout" and root["host"] == "node-7"
    assert root["scope_name"] == "shop.lib"
    assert root["kind"] == 2 and child["kind"] == 3 and publish["kind"] == 4
    assert root["http_method"] == "GET"  # http.request.method beats the older http.method
    assert root["http_route"] == "/cart"
    assert root["http_status_code"] == 200
    assert root["hints"] is None
    assert child["db_system"] == "postgresql"
    assert child["db_statement"] == "SELECT * FROM cart WHERE id = $1"
    assert json.loads(child["hints"]) == {"db.pool.wait_ms": 12.5, "retry.attempt": 2}
    assert child["status_code"] == 2 and child["status_message"] == "db failed"
    assert child["event_names"] == ["lock.acquire", "log", "exception"]
    assert len(child["event_times_ns"]) == 3
    event_hints = json.loads(child["event_hints"])
    assert [e["name"] for e in event_hints] == ["lock.acquire", "exception"]
    assert event_hints[0]["attributes"] == {"lock.name": "cart_row", "waiters": 3}
    assert event_hints[1]["attributes"]["exception.type"] == "ValueError"
    assert "exception.stacktrace" not in event_hints[1]["attributes"]
    assert publish["links"] == [f"{root['trace_id']}:{root['span_id']}"]
    assert publish["follows_from"] is False
    assert json.loads(root["resource_json"])["deployment"] == "staging"
    assert all(r["ingested_ns"] == 42 for r in rows.values())
    original = next(
        s
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
        if s.name == "SELECT cart"
    )
    assert trace_pb2.Span.FromString(child["raw"]) == original  # lossless
    assert (
        child["start_ns"] == original.start_time_unix_nano and child["end_ns"] == original.end_time_unix_nano
    )


def test_decode_traces_message_matches_bytes_path() -> None:
    request = encode_spans(_sdk_spans())
    a = decode_traces_message(request, ingested_ns=1).table
    b = decode_export_request(request.SerializeToString(), ingested_ns=1).table
    assert a.equals(b)


def _one_span_request(
    trace_id: bytes, span_id: bytes, parent: bytes = b"", name: str = "s"
) -> trace_pb2.TracesData:
    msg = trace_pb2.TracesData()
    span = msg.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.parent_span_id, span.name = trace_id, span_id, parent, name
    return msg


def test_invalid_ids_rejected_good_spans_kept() -> None:
    msg = trace_pb2.TracesData()
    spans = msg.resource_spans.add().scope_spans.add().spans
    cases = [
        (b"\x01" * 16, b"\x02" * 8, b"", "good"),
        (b"\x01" * 8, b"\x02" * 8, b"", "short trace"),
        (b"\x01" * 16, b"\x02" * 4, b"", "short span"),
        (b"\x00" * 16, b"\x02" * 8, b"", "zero trace"),
        (b"\x01" * 16, b"\x00" * 8, b"", "zero span"),
        (b"\x01" * 16, b"\x03" * 8, b"\x01\x02", "bad parent"),
        (b"\x01" * 16, b"\x04" * 8, b"\x02" * 8, "good child"),
    ]
    for trace_id, span_id, parent, name in cases:
        s = spans.add()
        s.trace_id, s.span_id, s.parent_span_id, s.name = trace_id, span_id, parent, name
    result = decode_export_request(msg.SerializeToString())
    assert result.table.column("name").to_pylist() == ["good", "good child"]
    assert result.rejected == 5
    assert result.errors[0] == "resourceSpans[0].scopeSpans[0].spans[1]: trace_id is 8 bytes, expected 16"
    assert "span_id is 4 bytes" in result.errors[1]
    assert "trace_id is all zero" in result.errors[2]
    assert "span_id is all zero" in result.errors[3]
    assert "parent_span_id is 2 bytes" in result.errors[4]
    assert "5 span(s) rejected" in result.error_message()


def test_unparsable_bytes_raise_decode_error() -> None:
    with pytest.raises(DecodeError, match="not an OTLP"):
        decode_export_request(b"\x0a\xff\xff\xff\xff\x0f garbage")
    with pytest.raises(DecodeError):
        decode_export_request(gzip.compress(b"x" * 100))


def test_empty_request_is_empty_table() -> None:
    result = decode_export_request(b"")
    assert result.table.num_rows == 0 and result.table.schema == SPAN_SCHEMA


def test_unknown_service_and_follows_from_link() -> None:
    msg = _one_span_request(b"\x01" * 16, b"\x02" * 8, b"\x03" * 8)
    span = msg.resource_spans[0].scope_spans[0].spans[0]
    link = span.links.add(trace_id=b"\x01" * 16, span_id=b"\x03" * 8)
    kv = link.attributes.add(key="opentracing.ref_type")
    kv.value.string_value = "follows_from"
    row = decode_traces_message(msg).table.to_pylist()[0]
    assert row["service"] == "unknown_service"
    assert row["follows_from"] is True


def test_long_and_odd_attribute_keys_take_slow_path() -> None:
    msg = _one_span_request(b"\x01" * 16, b"\x02" * 8)
    span = msg.resource_spans[0].scope_spans[0].spans[0]
    long_key = "x" * 200 + ".queue.depth"
    span.attributes.add(key=long_key).value.int_value = 7
    span.attributes.add(key="http.url").value.string_value = "http://h/" + "p" * 300  # long value
    span.attributes.add(key="http.status_code").value.string_value = "503"
    span.attributes.add(key="peer.service").value.int_value = 5
    row = decode_traces_message(msg).table.to_pylist()[0]
    assert json.loads(row["hints"]) == {long_key: 7}
    assert row["http_url"] == "http://h/" + "p" * 300
    assert row["http_status_code"] == 503
    assert row["peer"] == "5"


def test_otlp_json_hex_base64_and_types() -> None:
    trace_hex, span_hex = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    obj = {
        "resource_spans": [  # snake_case keys are accepted too
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
                "scopeSpans": [
                    {
                        "scope": {"name": "lib"},
                        "spans": [
                            {
                                "traceId": trace_hex,
                                "spanId": span_hex,
                                "name": "hex ids, string nanos, enum name",
                                "kind": "SPAN_KIND_CLIENT",
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "status": {"code": "STATUS_CODE_ERROR"},
                            },
                            {
                                "trace_id": base64.b64encode(bytes.fromhex(trace_hex)).decode(),
                                "span_id": base64.b64encode(b"\x07" * 8).decode(),
                                "parent_span_id": span_hex,
                                "name": "base64 ids, int nanos, enum number",
                                "kind": 3,
                                "start_time_unix_nano": 1544712660000000001,
                                "end_time_unix_nano": 1544712660000000002,
                            },
                            {"traceId": "zzz", "spanId": span_hex, "name": "bad id"},
                            {"traceId": trace_hex, "spanId": "0102", "name": "short hex id is padded"},
                            {"traceId": trace_hex, "spanId": "07" * 8, "name": ["wrong type"]},
                        ],
                    }
                ],
            }
        ]
    }
    result = decode_otlp_json(obj)
    rows = result.table.to_pylist()
    assert [r["name"] for r in rows] == [
        "hex ids, string nanos, enum name",
        "base64 ids, int nanos, enum number",
        "short hex id is padded",
    ]
    assert rows[0]["trace_id"] == trace_hex and rows[0]["kind"] == 3 and rows[0]["status_code"] == 2
    assert rows[1]["trace_id"] == trace_hex and rows[1]["span_id"] == "07" * 8
    assert rows[1]["parent_span_id"] == span_hex and rows[1]["start_ns"] == 1544712660000000001
    assert rows[2]["span_id"] == "0000000000000102"
    assert result.rejected == 2
    assert result.errors[0].startswith("resourceSpans[0].scopeSpans[0].spans[2].traceId: 'zzz'")
    assert result.errors[1].startswith("resourceSpans[0].scopeSpans[0].spans[4]:")
    with pytest.raises(DecodeError, match=r"spans\[2\]\.traceId"):
        otlp_json_to_message(obj)


def test_otlp_json_structural_errors() -> None:
    with pytest.raises(DecodeError, match=r"resourceSpans: expected a list"):
        decode_otlp_json({"resourceSpans": {"not": "a list"}})
    with pytest.raises(DecodeError, match=r"\$: expected an object"):
        decode_otlp_json([1, 2])  # type: ignore[arg-type]


def test_parse_id_rules() -> None:
    assert parse_id("00" * 7 + "ff", 8) == b"\x00" * 7 + b"\xff"
    assert parse_id(base64.b64encode(b"\xfa" * 8).decode(), 8) == b"\xfa" * 8
    assert parse_id(base64.urlsafe_b64encode(b"\xfb" * 16).decode().rstrip("="), 16) == b"\xfb" * 16
    assert parse_id("abc", 8) == bytes.fromhex("0000000000000abc")
    assert parse_id("", 8) == b""
    # 11 hex digits are also unpadded base64 of 8 bytes: OTLP JSON reads base64 (protobuf's JSON
    # mapping), Zipkin and Jaeger UI JSON (hex by definition) read hex
    assert parse_id("abcdef01234", 8) == base64.b64decode("abcdef01234=")
    assert parse_id("abcdef01234", 8, hex_first=True) == bytes.fromhex("00000abcdef01234")
    # a 64-bit trace id in base64 (Jaeger model proto-JSON) only where asked for
    assert parse_id(base64.b64encode(b"\x01" * 8).decode(), 16, short_base64=True) == bytes(8) + b"\x01" * 8
    with pytest.raises(ValueError, match="neither 32 hex characters nor base64 of 16 bytes"):
        parse_id(base64.b64encode(b"\x01" * 8).decode(), 16)
    with pytest.raises(ValueError, match="expected a hex or base64 string"):
        parse_id(12, 8)
    with pytest.raises(ValueError, match="34 hex characters, expected 32"):
        parse_id("0" * 34, 16)


@pytest.mark.parametrize(
    ("name", "spans", "rejected"),
    [
        ("otlp-json__opentelemetry-proto-example.json", 1, 0),
        ("otlp-json__jaeger-example_trace.json", 5, 0),
        ("otlp-json__otlp2parquet-trace.json", 2, 0),
        ("invalid__otlp-json-mixed-id-encoding.json", 0, 1),
    ],
)
def test_real_otlp_json_files(name: str, spans: int, rejected: int) -> None:
    path = REAL_TRACES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    result = decode_otlp_json(json.loads(path.read_text()))
    assert result.table.num_rows == spans
    assert result.rejected == rejected


def test_real_otlp_proto_file() -> None:
    path = REAL_TRACES / "otlp-proto__otlp2parquet-traces.pb"
    if not path.exists():
        pytest.skip(f"{path} not present")
    table = decode_export_request(path.read_bytes()).table
    assert table.num_rows == 19
    assert table.column("service").to_pylist()[0] == "product-catalog"


def test_response_helpers() -> None:
    response = trace_service_pb2.ExportTraceServiceResponse.FromString(export_response(3, "bad ids"))
    assert response.partial_success.rejected_spans == 3
    assert response.partial_success.error_message == "bad ids"
    assert not trace_service_pb2.ExportTraceServiceResponse.FromString(export_response()).HasField(
        "partial_success"
    )
    assert json.loads(export_response(2, "x", as_json=True)) == {
        "partialSuccess": {"rejectedSpans": "2", "errorMessage": "x"}
    }
    from google.rpc import error_details_pb2, status_pb2

    status = status_pb2.Status.FromString(rpc_status(8, "overloaded", retry_after_s=1.5))
    assert status.code == 8 and status.message == "overloaded"
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 1_500_000_000


def test_cached_semantic_values_keep_priority_rules() -> None:
    """Repeated semantic KeyValues come from a cache; priority must hold in any order."""

    def request(*attribute_lists: list[tuple[str, object]]) -> bytes:
        msg = trace_pb2.TracesData()
        spans = msg.resource_spans.add().scope_spans.add().spans
        for n, attributes in enumerate(attribute_lists, start=1):
            span = spans.add(name=f"s{n}", trace_id=n.to_bytes(16, "big"), span_id=n.to_bytes(8, "big"))
            for key, value in attributes:
                kv = span.attributes.add(key=key)
                if isinstance(value, int):
                    kv.value.int_value = value
                else:
                    kv.value.string_value = str(value)
        return msg.SerializeToString()

    older, current = ("http.method", "POST"), ("http.request.method", "GET")
    status = ("http.response.status_code", 404)
    for _ in range(2):  # the second round is served from the cache
        rows = decode_export_request(
            request(
                [older], [older, current], [current, older], [status], [status, ("http.status_code", 500)]
            )
        ).table.to_pylist()
        assert [r["http_method"] for r in rows] == ["POST", "GET", "GET", None, None]
        assert [r["http_status_code"] for r in rows] == [None, None, None, 404, 404]


def test_all_zero_parent_means_root() -> None:
    msg = _one_span_request(b"\x01" * 16, b"\x02" * 8, b"\x00" * 8)
    bad = (
        msg.resource_spans[0].scope_spans[0].spans.add(name="bad", trace_id=b"\x01" * 8, span_id=b"\x03" * 8)
    )
    bad.parent_span_id = b"\x00" * 8
    for message in (msg, _one_span_request(b"\x01" * 16, b"\x02" * 8, b"\x00" * 8)):  # slow and fast path
        rows = decode_traces_message(message).table.to_pylist()
        assert [r["parent_span_id"] for r in rows] == [None]


def test_service_peer_name_is_the_peer_and_wins_over_older_keys() -> None:
    """Semantic conventions 1.39 renamed ``peer.service`` to ``service.peer.name``."""
    msg = _one_span_request(b"\x01" * 16, b"\x02" * 8)
    span = msg.resource_spans[0].scope_spans[0].spans[0]
    span.attributes.add(key="server.address").value.string_value = "10.0.0.7"
    span.attributes.add(key="service.peer.name").value.string_value = "mysql"
    span.attributes.add(key="peer.service").value.string_value = "mysql-legacy"
    assert decode_traces_message(msg).table.to_pylist()[0]["peer"] == "mysql"


@pytest.mark.parametrize("native", [True, False])
def test_out_of_range_numbers_never_fail_the_request(native: bool) -> None:
    # found by fuzzing: these raised OverflowError/ArrowInvalid and failed the whole Export
    msg = _one_span_request(b"\x01" * 16, b"\x02" * 8, name="late")
    msg.resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano = 2**64 - 1
    odd = (
        msg.resource_spans[0].scope_spans[0].spans.add(trace_id=b"\x01" * 16, span_id=b"\x03" * 8, name="odd")
    )
    odd.kind = 9  # not a SpanKind
    odd.status.code = 7  # not a status code
    odd.attributes.add(key="http.response.status_code").value.int_value = 2**40
    result = decode_export_request(msg.SerializeToString(), native=native)
    assert result.rejected == 1
    assert "start_time_unix_nano 18446744073709551615 is beyond int64" in result.error_message()
    [row] = result.table.to_pylist()
    assert row["name"] == "odd" and row["kind"] == 0 and row["status_code"] == 0
    assert row["http_status_code"] is None
    assert trace_pb2.Span.FromString(row["raw"]).kind == 9  # the raw span keeps what was sent
