"""Jaeger and Zipkin conversion to OTLP JSON, checked through the real decoder's span rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hourglass.collector.decode import decode_otlp_json
from hourglass.collector.readers import InvalidRecord, normalize_id
from hourglass.collector.readers.jaeger import (
    is_jaeger_json,
    jaeger_to_otlp_json,
    parse_duration_ns,
    parse_rfc3339_ns,
)
from hourglass.collector.readers.otlp_json import is_otlp_json, merge_traces_data
from hourglass.collector.readers.zipkin import is_zipkin_json, shared_server_span_id, zipkin_to_otlp_json
from hourglass.collector.schema import (
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_INTERNAL,
    KIND_PRODUCER,
    KIND_SERVER,
    STATUS_ERROR,
)

REAL_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "real-traces"


def _rows(traces_data: dict[str, Any]) -> list[dict[str, Any]]:
    result = decode_otlp_json(traces_data)
    assert result.rejected == 0, result.errors
    return result.table.to_pylist()


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def _attributes(row: dict[str, Any]) -> dict[str, Any]:
    """The span's attributes, read back from the raw span kept in the row."""
    from google.protobuf import json_format  # tests read the lossless raw column back
    from opentelemetry.proto.trace.v1 import trace_pb2

    span = trace_pb2.Span.FromString(row["raw"])
    as_dict = json_format.MessageToDict(span)
    out = {}
    for kv in as_dict.get("attributes", []):
        value = kv["value"]
        out[kv["key"]] = next(iter(value.values())) if value else None
    return out


# ---------------------------------------------------------------------------------------------
# ids and times


@pytest.mark.parametrize(
    ("value", "size", "expect", "want"),
    [
        ("df84e36b9e2ee3815d07f0867a5be1f", 16, "hex", "0df84e36b9e2ee3815d07f0867a5be1f"),  # 31 chars
        ("1e223ff1f80f1c69", 16, "hex", "00000000000000001e223ff1f80f1c69"),  # 64-bit trace id
        ("4b52eb0cabcb50a", 8, "hex", "04b52eb0cabcb50a"),
        ("AAAAAAAAAABSlpqJVVcaPw==", 16, "base64", "000000000000000052969a8955571a3f"),
        ("AAAAAABkfZg=", 8, "base64", "0000000000647d98"),
        ("UpaaiVVXGj8=", 16, "base64", "000000000000000052969a8955571a3f"),  # 8-byte base64 trace id
        ("ABCDEF0123456789", 8, "hex", "abcdef0123456789"),
        (0x1234, 8, "hex", "0000000000001234"),
    ],
)
def test_normalize_id(value: Any, size: int, expect: str, want: str) -> None:
    assert normalize_id(value, size, expect=expect, accept_short=size == 16) == want


@pytest.mark.parametrize(
    ("value", "size", "reason"),
    [
        ("0000000000000000", 8, "all-zero"),
        ("zzz", 16, "neither 32 hex characters nor base64 of 16 bytes"),
        ("1" * 17, 8, "17 hex characters, expected 16"),
        ("", 8, "empty"),
        (None, 8, "expected a hex or base64 string"),
        ([1], 8, "expected a hex or base64 string, got list"),
    ],
)
def test_normalize_id_rejects(value: Any, size: int, reason: str) -> None:
    with pytest.raises(InvalidRecord, match=reason):
        normalize_id(value, size)


def test_time_parsers() -> None:
    assert parse_rfc3339_ns("2017-01-26T16:46:31.639875-05:00") == 1485467191639875000
    assert parse_rfc3339_ns("2017-01-26T21:46:31.639875123Z") == 1485467191639875123
    assert parse_rfc3339_ns("2017-01-26T21:46:31Z") == 1485467191000000000
    assert parse_duration_ns("22938000ns") == 22_938_000
    assert parse_duration_ns("0.022938s") == 22_938_000
    assert parse_duration_ns("1m2.5s") == 62_500_000_000
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ns("22 apples")
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_rfc3339_ns("yesterday")


# ---------------------------------------------------------------------------------------------
# Jaeger


def _jaeger_trace(spans: list[dict[str, Any]], processes: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "data": [
            {
                "traceID": "00000000000000aa",
                "spans": spans,
                "processes": processes
                or {
                    "p1": {
                        "serviceName": "frontend",
                        "tags": [
                            {"key": "hostname", "type": "string", "value": "web-1"},
                            {"key": "jaeger.version", "type": "string", "value": "Go-2.30"},
                        ],
                    },
                    "p2": {"serviceName": "queue-worker", "tags": []},
                },
            }
        ]
    }


def _jspan(span_id: str, name: str, *, refs: list[tuple[str, str]] = (), **extra: Any) -> dict[str, Any]:  # type: ignore[assignment]
    span = {
        "traceID": "00000000000000aa",
        "spanID": span_id,
        "operationName": name,
        "references": [{"refType": t, "traceID": "00000000000000aa", "spanID": s} for t, s in refs],
        "startTime": 1_700_000_000_000_000,
        "duration": 1500,
        "tags": [],
        "logs": [],
        "processID": "p1",
    }
    span.update(extra)
    return span


def test_jaeger_follows_from_parent_and_links() -> None:
    doc = _jaeger_trace(
        [
            _jspan(
                "0000000000000001", "root", tags=[{"key": "span.kind", "type": "string", "value": "server"}]
            ),
            _jspan("0000000000000002", "child", refs=[("CHILD_OF", "0000000000000001")]),
            _jspan(
                "0000000000000003", "async-job", refs=[("FOLLOWS_FROM", "0000000000000001")], processID="p2"
            ),
            _jspan(
                "0000000000000004",
                "both",
                refs=[("FOLLOWS_FROM", "0000000000000002"), ("CHILD_OF", "0000000000000001")],
            ),
            _jspan("0000000000000005", "orphan", refs=[("CHILD_OF", "00000000000000ff")]),
            _jspan(
                "0000000000000006",
                "translated",
                refs=[("CHILD_OF", "0000000000000001"), ("FOLLOWS_FROM", "0000000000000001")],
            ),
        ]
    )
    assert is_jaeger_json(doc)
    converted = jaeger_to_otlp_json(doc)
    assert converted.records == 6 and converted.problems == []
    rows = _by_name(_rows(converted.traces_data))
    assert rows["root"]["parent_span_id"] is None and rows["root"]["kind"] == KIND_SERVER
    assert rows["child"]["parent_span_id"] == "0000000000000001" and not rows["child"]["follows_from"]
    job = rows["async-job"]
    assert job["parent_span_id"] == "0000000000000001" and job["follows_from"] is True
    assert job["service"] == "queue-worker"
    # CHILD_OF wins over an earlier FOLLOWS_FROM; the other reference is kept as a link
    both = rows["both"]
    assert both["parent_span_id"] == "0000000000000001" and both["follows_from"] is False
    assert both["links"] == ["000000000000000000000000000000aa:0000000000000002"]
    # CHILD_OF plus FOLLOWS_FROM to the same span: a follows-from parent, as the Collector's translator writes it
    translated = rows["translated"]
    assert translated["parent_span_id"] == "0000000000000001" and translated["follows_from"] is True
    # a reference to a span absent from the file stays the parent (analysis sees an orphan)
    assert rows["orphan"]["parent_span_id"] == "00000000000000ff"
    assert rows["root"]["trace_id"] == "000000000000000000000000000000aa"
    assert rows["root"]["host"] == "web-1"
    assert json.loads(rows["root"]["resource_json"])["jaeger.version"] == "Go-2.30"


def test_jaeger_tags_status_kind_and_logs() -> None:
    doc = _jaeger_trace(
        [
            _jspan(
                "0000000000000001",
                "GET /cart",
                tags=[
                    {"key": "span.kind", "type": "string", "value": "client"},
                    {"key": "error", "type": "bool", "value": True},
                    {"key": "http.method", "type": "string", "value": "GET"},
                    {"key": "http.status_code", "type": "int64", "value": 503},
                    {"key": "retry.attempt", "type": "int64", "value": "2"},
                    {"key": "ratio", "type": "float64", "value": 0.5},
                ],
                logs=[
                    {
                        "timestamp": 1_700_000_000_000_700,
                        "fields": [
                            {"key": "event", "type": "string", "value": "retry"},
                            {"key": "wait_ms", "type": "int64", "value": 20},
                        ],
                    }
                ],
            ),
            _jspan(
                "0000000000000002",
                "publish",
                tags=[
                    {"key": "span.kind", "type": "string", "value": "producer"},
                    {"key": "otel.status_code", "type": "string", "value": "ERROR"},
                    {"key": "otel.status_description", "type": "string", "value": "broker down"},
                ],
            ),
            _jspan(
                "0000000000000003",
                "consume",
                tags=[{"key": "span.kind", "type": "string", "value": "consumer"}],
            ),
            _jspan("0000000000000004", "local"),
        ]
    )
    rows = _by_name(_rows(jaeger_to_otlp_json(doc).traces_data))
    cart = rows["GET /cart"]
    assert cart["kind"] == KIND_CLIENT and cart["status_code"] == STATUS_ERROR
    assert cart["http_method"] == "GET" and cart["http_status_code"] == 503
    assert cart["start_ns"] == 1_700_000_000_000_000_000 and cart["end_ns"] == cart["start_ns"] + 1_500_000
    assert cart["event_names"] == ["retry"] and cart["event_times_ns"] == [1_700_000_000_000_700_000]
    assert json.loads(cart["hints"])["retry.attempt"] == 2
    attrs = _attributes(cart)
    assert "span.kind" not in attrs and attrs["ratio"] == 0.5
    publish = rows["publish"]
    assert publish["kind"] == KIND_PRODUCER and publish["status_code"] == STATUS_ERROR
    assert publish["status_message"] == "broker down"
    assert rows["consume"]["kind"] == KIND_CONSUMER and rows["local"]["kind"] == KIND_INTERNAL


def test_jaeger_bad_span_is_skipped_with_its_path_and_the_rest_kept() -> None:
    doc = _jaeger_trace(
        [
            _jspan("0000000000000001", "good"),
            _jspan("not-an-id!", "bad-id"),
            _jspan("0000000000000003", "bad-process", processID="p9"),
            _jspan("0000000000000004", "bad-time", startTime="soon"),
        ]
    )
    converted = jaeger_to_otlp_json(doc)
    assert [(p.position, p.skipped) for p in converted.problems] == [
        ("data[0].spans[1].spanID", True),
        ("data[0].spans[2].processID", True),
        ("data[0].spans[3].startTime", True),
    ]
    assert "not-an-id!" in converted.problems[0].reason
    assert [r["name"] for r in _rows(converted.traces_data)] == ["good"]


def test_jaeger_model_json_real_file() -> None:
    doc = json.loads((REAL_TRACES / "jaeger-model-json__domain_03.json").read_text())
    converted = jaeger_to_otlp_json(doc)
    rows = _rows(converted.traces_data)
    assert len(rows) == 2
    first = rows[0]
    assert first["trace_id"] == "000000000000000052969a8955571a3f" and first["span_id"] == "0000000000647d98"
    assert first["start_ns"] == 1485467191639875000 and first["end_ns"] - first["start_ns"] == 22_938_000
    assert first["kind"] == KIND_SERVER and first["peer"] == "rtapi" and first["host"] == "api246-sjc1"
    assert first["event_names"] == ["", "nothing"]
    attrs = _attributes(rows[1])
    assert attrs["some.binary.data"] == "c29tZS1iaW5hcnktZGF0YQ=="  # bytes kept (base64 in JSON)
    assert attrs["someBool"] is True
    # the second span's CHILD_OF reference points at itself: dropped with a warning, span kept
    assert rows[1]["parent_span_id"] is None
    assert [(p.position, p.skipped) for p in converted.problems] == [("spans[1].references[0]", False)]


def test_jaeger_ui_file_keeps_duplicate_span_ids() -> None:
    doc = json.loads((REAL_TRACES / "jaeger-ui-json__ui_01.json").read_text())
    rows = _rows(jaeger_to_otlp_json(doc).traces_data)
    assert len(rows) == 5
    assert [r["span_id"] for r in rows].count("0000000000000002") == 2
    ref_test = _by_name(rows)["reference-test"]
    # CHILD_OF another trace is never the parent; it becomes a link
    assert ref_test["parent_span_id"] == "0000000000000002"
    assert "000000000000000000000000000000ff:00000000000000ff" in ref_test["links"]
    # CHILD_OF and FOLLOWS_FROM to the same parent: a follows-from parent, as the OpenTelemetry
    # Collector's Jaeger translator reads it (the CHILD_OF is the parent, the FOLLOWS_FROM a link to it)
    assert ref_test["follows_from"] is True
    errored = [r for r in rows if r["status_code"] == STATUS_ERROR]
    assert [(r["span_id"], r["name"]) for r in errored] == [("0000000000000002", "some-operation")]


# ---------------------------------------------------------------------------------------------
# Zipkin


def _zspan(span_id: str, name: str, **extra: Any) -> dict[str, Any]:
    span = {
        "traceId": "463ac35c9f6413ad",
        "id": span_id,
        "name": name,
        "timestamp": 1_700_000_000_000_000,
        "duration": 2000,
        "localEndpoint": {"serviceName": "frontend", "ipv4": "10.0.0.1"},
    }
    span.update(extra)
    return span


def test_zipkin_shared_spans_both_halves_kept_with_distinct_ids() -> None:
    doc = json.loads((REAL_TRACES / "zipkin-v2__skew.json").read_text())
    rows = _rows(zipkin_to_otlp_json(doc).traces_data)
    assert len(rows) == 4 and len({r["span_id"] for r in rows}) == 4
    trace_id = "00000000000000001e223ff1f80f1c69"
    server_id = shared_server_span_id(trace_id, "74280ae0c10d8062")
    by_id = {r["span_id"]: r for r in rows}
    client, server = by_id["74280ae0c10d8062"], by_id[server_id]
    assert client["kind"] == KIND_CLIENT and client["service"] == "servicea"
    assert server["kind"] == KIND_SERVER and server["service"] == "serviceb"
    assert server["parent_span_id"] == "74280ae0c10d8062"
    assert _attributes(server)["zipkin.shared_span_id"] == "74280ae0c10d8062"
    # the server's own child now hangs under the server half
    assert by_id["43210ae0c10d1234"]["parent_span_id"] == server_id


def test_zipkin_yelp_children_follow_the_server_half() -> None:
    doc = json.loads((REAL_TRACES / "zipkin-v2__yelp.json").read_text())
    converted = zipkin_to_otlp_json(doc)
    rows = _rows(converted.traces_data)
    assert len(rows) == 16 and len({r["span_id"] for r in rows}) == 16
    assert converted.problems == []
    trace_id = "0000000000000000a03ee8fff1dcd9b9"
    proxy_server = shared_server_span_id(trace_id, "668ed78ad94b35a1")
    txn = _by_name(rows)["txn: user_get_basic_and_scout_info"]
    assert txn["parent_span_id"] == proxy_server  # service yelp-main under server yelp_main/api_proxy
    # the routing root is a shared server span whose client half is absent: it keeps its id
    assert any(r["span_id"] == "2e8cfb154b59a41f" and r["parent_span_id"] is None for r in rows)
    # millisecond-precision proxy timestamps are still read as microseconds
    client = next(r for r in rows if r["span_id"] == "15fc03927f0f68df")
    assert (
        client["start_ns"] == 1571896375322000 * 1000 and client["end_ns"] - client["start_ns"] == 14_000_000
    )


def test_zipkin_mapping_tags_endpoints_annotations() -> None:
    doc = [
        _zspan(
            "0000000000000001",
            "get /users",
            kind="SERVER",
            remoteEndpoint={"ipv4": "192.168.1.9", "port": 51000},
            tags={"http.method": "GET", "http.path": "/users", "http.status_code": "500", "error": "boom"},
            annotations=[{"timestamp": 1_700_000_000_000_500, "value": "wr"}],
        ),
        _zspan(
            "0000000000000002",
            "query",
            parentId="0000000000000001",
            kind="CLIENT",
            remoteEndpoint={"serviceName": "postgres", "ipv4": "10.0.0.5", "port": 5432},
            tags={"sql.query": "select 1"},
        ),
        _zspan(
            "0000000000000003",
            "send",
            parentId="0000000000000001",
            kind="PRODUCER",
            tags={"kafka.topic": "orders"},
        ),
        _zspan("0000000000000004", "poll", kind="CONSUMER", remoteEndpoint={"serviceName": "kafka"}),
        _zspan("0000000000000005", "compute", parentId="0000000000000001"),
    ]
    assert is_zipkin_json(doc) and not is_jaeger_json(doc) and not is_otlp_json(doc)
    rows = _by_name(_rows(zipkin_to_otlp_json(doc).traces_data))
    server = rows["get /users"]
    assert server["kind"] == KIND_SERVER and server["status_code"] == STATUS_ERROR
    assert server["status_message"] == "boom" and server["http_status_code"] == 500
    assert server["http_url"] == "/users" and server["http_method"] == "GET"
    assert server["event_names"] == ["wr"] and server["event_times_ns"] == [1_700_000_000_000_500_000]
    assert _attributes(server)["network.peer.address"] == "192.168.1.9"
    assert json.loads(server["resource_json"]) == {"service.name": "frontend", "host.ip": ["10.0.0.1"]}
    query = rows["query"]
    assert (
        query["kind"] == KIND_CLIENT and query["db_statement"] == "select 1" and query["peer"] == "postgres"
    )
    assert _attributes(query)["server.port"] == "5432"  # int64 as OTLP JSON string
    assert rows["send"]["kind"] == KIND_PRODUCER and rows["send"]["messaging_destination"] == "orders"
    assert rows["poll"]["kind"] == KIND_CONSUMER and rows["poll"]["peer"] == "kafka"
    assert rows["compute"]["kind"] == KIND_INTERNAL


def test_zipkin_missing_timestamp_or_duration_kept_with_a_warning() -> None:
    doc = [
        _zspan("0000000000000001", "root"),
        _zspan(
            "0000000000000002",
            "no-duration",
            parentId="0000000000000001",
            duration=None,
            annotations=[{"timestamp": 1_700_000_000_000_900, "value": "cs"}],
        ),
        _zspan("0000000000000003", "no-timestamp", parentId="0000000000000001", timestamp=None),
        _zspan("0000000000000004", "millis", timestamp=1_700_000_000_000),
    ]
    for span in doc:
        for key in [k for k, v in span.items() if v is None]:
            del span[key]
    converted = zipkin_to_otlp_json(doc)
    rows = _by_name(_rows(converted.traces_data))
    assert len(rows) == 4
    assert rows["no-duration"]["end_ns"] == 1_700_000_000_000_900_000
    assert rows["no-timestamp"]["start_ns"] == rows["root"]["start_ns"]  # from its parent
    assert _attributes(rows["no-timestamp"])["hourglass.timing_incomplete"] == "timestamp"
    assert rows["millis"]["start_ns"] == 1_700_000_000_000_000_000
    problems = {(p.position, p.skipped) for p in converted.problems}
    assert problems == {("[1].duration", False), ("[2].timestamp", False), ("[3].timestamp", False)}


def test_zipkin_list_of_traces_bad_span_and_v1() -> None:
    doc = [
        [_zspan("0000000000000001", "a")],
        [
            _zspan("0000000000000002", "b", traceId="xyz"),
            _zspan("0000000000000003", "c", traceId="463ac35c9f6413ae"),
        ],
    ]
    assert is_zipkin_json(doc)
    converted = zipkin_to_otlp_json(doc)
    assert [p.position for p in converted.problems] == ["[1][0].traceId"]
    assert sorted(r["name"] for r in _rows(converted.traces_data)) == ["a", "c"]
    v1 = zipkin_to_otlp_json(
        [{"traceId": "463ac35c9f6413ad", "id": "0000000000000001", "binaryAnnotations": []}]
    )
    assert "Zipkin v1" in v1.problems[0].reason


def test_merge_traces_data_equals_separate_decodes() -> None:
    one = jaeger_to_otlp_json(_jaeger_trace([_jspan("0000000000000001", "a")])).traces_data
    two = zipkin_to_otlp_json([_zspan("0000000000000002", "b")]).traces_data
    merged = decode_otlp_json(merge_traces_data([one, two])).table
    separate = pa.concat_tables([decode_otlp_json(one).table, decode_otlp_json(two).table])
    assert merged.drop(["ingested_ns"]).equals(separate.drop(["ingested_ns"]))


# ---------------------------------------------------------------------------------------------
# decode's fast OTLP JSON span path (message constructors instead of ParseDict) must build the
# very same spans as ParseDict for everything the readers produce and the real files hold.


def _spans_of(traces_data: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        span
        for rs in traces_data.get("resourceSpans", [])
        for ss in rs.get("scopeSpans", [])
        for span in ss.get("spans", [])
    ]


def _otlp_span_dicts() -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = []
    for path in sorted(REAL_TRACES.iterdir()):
        if path.name.startswith("otlp-json__"):
            spans.extend(_spans_of(json.loads(path.read_text())))
        elif path.name.startswith("otlp-jsonl__"):
            for line in path.read_text().splitlines():
                spans.extend(_spans_of(json.loads(line)))
        elif path.name.startswith("zipkin"):
            spans.extend(_spans_of(zipkin_to_otlp_json(json.loads(path.read_text())).traces_data))
        elif path.name.startswith("jaeger"):
            spans.extend(_spans_of(jaeger_to_otlp_json(json.loads(path.read_text())).traces_data))
    base = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174", "name": "x"}
    spans += [
        {**base, "kind": "SPAN_KIND_CLIENT", "status": {"code": "STATUS_CODE_ERROR", "message": "m"}},
        {**base, "status": {}, "events": [{}], "links": [], "attributes": []},
        {
            **base,
            "attributes": [
                {"key": "k"},
                {"key": "e", "value": {}},
                {"key": "d", "value": {"doubleValue": 3}},
            ],
        },
        {
            **base,
            "attributes": [
                {"key": "i", "value": {"intValue": -7}},
                {"key": "b", "value": {"boolValue": False}},
            ],
        },
        {**base, "startTimeUnixNano": 1, "endTimeUnixNano": "2", "flags": 257, "traceState": "a=b"},
        {
            **base,
            "links": [
                {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b175", "flags": 1}
            ],
        },
        {**base, "droppedAttributesCount": 1, "droppedEventsCount": "2", "droppedLinksCount": 3},
        {**base, "parentSpanId": ""},
        {
            **base,
            "attributes": [
                {"key": "a", "value": {"arrayValue": {}}},
                {"key": "b", "value": {"bytesValue": ""}},
            ],
        },
    ]
    return spans


def test_decode_fast_span_path_equals_parse_dict() -> None:
    from google.protobuf import json_format
    from opentelemetry.proto.trace.v1 import trace_pb2

    from hourglass.collector import decode_json as decode

    spans = _otlp_span_dicts()
    assert len(spans) == 8 + 19 + 32 + 64 + 9  # OTLP JSON + JSONL + Jaeger + Zipkin + synthetic
    fast_count = 0
    for span in spans:
        fast = decode._fast_span(span)
        normalised = decode._normalise_ids(span, "span", decode._ID_FIELDS)
        if "links" in normalised:
            normalised["links"] = [
                decode._normalise_ids(link, "link", decode._LINK_ID_FIELDS) for link in span["links"]
            ]
        slow = json_format.ParseDict(normalised, trace_pb2.Span(), ignore_unknown_fields=True)
        if fast is not None:
            fast_count += 1
            assert fast.SerializeToString(deterministic=True) == slow.SerializeToString(deterministic=True), (
                span
            )
    # every span of the readers and of the real OTLP JSON files takes the fast path
    assert fast_count == len(spans)


@pytest.mark.parametrize(
    "span",
    [
        {"traceId": "zzz", "spanId": "eee19b7ec3c1b174"},  # bad id: ParseDict's path reports it
        {"trace_id": "5b8efff798038103d269b633813fc60c"},  # snake_case
        {
            "traceId": "5b8efff798038103d269b633813fc60c",
            "attributes": [{"key": "a", "value": {"kvlistValue": {"values": []}}}],
        },
        {"traceId": "5b8efff798038103d269b633813fc60c", "startTimeUnixNano": 1.5},
        {"traceId": "5b8efff798038103d269b633813fc60c", "kind": "SOMETHING"},
    ],
)
def test_decode_fast_span_path_declines_what_it_does_not_handle(span: dict[str, Any]) -> None:
    from hourglass.collector import decode_json

    assert decode_json._fast_span(span) is None


def test_zipkin_64_bit_trace_id_joins_its_128_bit_trace() -> None:
    doc = [
        _zspan("0000000000000001", "root", traceId="5af7183fb1d4cf5f463ac35c9f6413ad"),
        _zspan("0000000000000002", "child", parentId="0000000000000001"),  # 463ac35c9f6413ad: low half
        _zspan("0000000000000003", "other", traceId="1111111111111111"),
    ]
    rows = _by_name(_rows(zipkin_to_otlp_json(doc).traces_data))
    assert rows["child"]["trace_id"] == rows["root"]["trace_id"] == "5af7183fb1d4cf5f463ac35c9f6413ad"
    assert rows["other"]["trace_id"] == "00000000000000001111111111111111"


def test_out_of_range_values_are_caught_where_they_are() -> None:
    doc = _jaeger_trace(
        [
            _jspan("0000000000000001", "negative-start", startTime=-5),
            _jspan("0000000000000002", "huge-duration", duration=10**30),
            _jspan("0000000000000003", "huge-tag", tags=[{"key": "n", "type": "int64", "value": 10**30}]),
            _jspan("0000000000000004", "bad-binary", tags=[{"key": "b", "type": "binary", "value": 7}]),
        ]
    )
    converted = jaeger_to_otlp_json(doc)
    assert [p.position for p in converted.problems] == [
        "data[0].spans[0].startTime",
        "data[0].spans[1].duration",
        "data[0].spans[3].tags[0]",
    ]
    (row,) = _rows(converted.traces_data)
    assert _attributes(row)["n"] == str(10**30)  # beyond int64: kept as its text
    zipkin = zipkin_to_otlp_json([_zspan("0000000000000001", "z", duration=10**30)])
    assert [p.position for p in zipkin.problems] == ["[0].duration"]


def test_jaeger_process_problems_cost_no_spans() -> None:
    doc = _jaeger_trace(
        [_jspan("0000000000000001", "a"), _jspan("0000000000000002", "b", processID="p2")],
        processes={"p1": {"tags": []}, "p2": {"serviceName": "svc", "tags": [{"nokey": 1}]}},
    )
    converted = jaeger_to_otlp_json(doc)
    assert [(p.position, p.skipped) for p in converted.problems] == [
        ("data[0].processes.p1.serviceName", False),
        ("data[0].processes.p2.tags[0]", False),
    ]
    rows = _by_name(_rows(converted.traces_data))
    assert rows["a"]["service"] == "unknown_service" and rows["b"]["service"] == "svc"


def test_jaeger_model_json_numeric_ref_type_and_flags() -> None:
    trace_id, parent, child = "AAAAAAAAAABSlpqJVVcaPw==", "AAAAAABkfZg=", "AAAAAABkfZk="
    process = {"serviceName": "api"}
    doc = {
        "spans": [
            {"traceId": trace_id, "spanId": parent, "operationName": "p", "startTime": "2017-01-26T16:46:31Z",
             "duration": "1s", "process": process, "flags": 3},
            {"traceId": trace_id, "spanId": child, "operationName": "c", "startTime": "2017-01-26T16:46:32Z",
             "duration": "0.5s", "process": process, "references": [{"refType": 1, "traceId": trace_id, "spanId": parent}]},
        ]
    }  # fmt: skip
    rows = _by_name(_rows(jaeger_to_otlp_json(doc).traces_data))
    assert rows["c"]["parent_span_id"] == "0000000000647d98" and rows["c"]["follows_from"] is True
    assert rows["c"]["end_ns"] - rows["c"]["start_ns"] == 500_000_000
    from opentelemetry.proto.trace.v1 import trace_pb2

    assert trace_pb2.Span.FromString(rows["p"]["raw"]).flags == 1  # sampled kept, Jaeger's debug bit not
