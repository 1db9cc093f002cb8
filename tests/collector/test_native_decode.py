"""The C scanner (collector._otlpscan + collector.native_decode) against the pure-Python decoder.

The two must give the same table for every request (or the same DecodeError): on the SDK's own
encoding, the benchmark's requests, the real trace files, generated messages of every shape the
schema allows, and thousands of corrupted requests (which must never crash the C code).
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from bench.ingest import PLACEHOLDER, build_template
from hourglass.collector import native_decode
from hourglass.collector.decode import DecodeError, decode_export_request
from hourglass.collector.decode_parts import LEAN
from hourglass.collector.files import TraceFileReader
from tests.collector.test_decode import _sdk_spans

# the shared real-traces folder sits beside the repository (resolved from the root, not one machine)
REAL_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "real-traces"

pytestmark = pytest.mark.skipif(
    not native_decode.AVAILABLE and os.environ.get("HOURGLASS_PURE_PYTHON") == "1",
    reason="HOURGLASS_PURE_PYTHON=1: the C extension is deliberately not built",
)


def _decode_both(data: bytes) -> tuple[object, object]:
    """(native outcome, python outcome): a table or the DecodeError text."""
    outcomes = []
    for native in (True, False):
        try:
            outcomes.append(decode_export_request(data, ingested_ns=7, native=native))
        except DecodeError as exc:
            outcomes.append(f"DecodeError: {exc}")
    return outcomes[0], outcomes[1]


def _span(raw: bytes) -> object:
    # the decoder's lean view: nested attributes stay bytes (neither path validates them) and an
    # empty status sent explicitly equals none
    return LEAN["Span"].FromString(raw)


def _assert_same(data: bytes) -> None:
    native, python = _decode_both(data)
    if isinstance(python, str) or isinstance(native, str):
        assert native == python
        return
    assert native.rejected == python.rejected and native.errors == python.errors
    a, b = native.table, python.table
    assert a.schema == b.schema
    for name in a.column_names:
        if name == "raw":
            # the C path keeps the span's bytes exactly as received; the Python path re-serializes
            # them (dropping e.g. an empty status): the same Span either way
            parse = _span
            assert [parse(r) for r in a[name].to_pylist()] == [parse(r) for r in b[name].to_pylist()]
            continue
        assert a[name].equals(b[name]), (
            f"column {name}: {a[name].to_pylist()[:5]} != {b[name].to_pylist()[:5]}"
        )


def test_the_c_extension_is_built() -> None:
    # make install compiles it; without it ingest falls back to the ~3x slower Python decoder
    assert native_decode.AVAILABLE, (
        "hourglass.collector._otlpscan is not built: run `make install` (needs gcc)"
    )


def test_sdk_encoding_takes_the_native_path_and_matches() -> None:
    data = encode_spans(_sdk_spans()).SerializeToString()
    assert native_decode.decode_native(data, 7) is not None
    _assert_same(data)


def test_benchmark_request_takes_the_native_path_and_matches() -> None:
    data = build_template(3).replace(PLACEHOLDER, struct.pack(">Q", 99))
    result = native_decode.decode_native(data, 7)
    assert result is not None and result.table.num_rows == 1000
    _assert_same(data)


def _read_all(path: Path) -> list[pa.Table]:
    reader = TraceFileReader(on_problem=lambda problem: None)
    return list(reader.read([path]))


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in REAL_TRACES.glob("*") if p.suffix in (".json", ".jsonl", ".pb")),
)
def test_real_trace_files_match(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # every reader ends in decode_export_request: read each file with the C path, then without
    native_tables = _read_all(REAL_TRACES / name)
    monkeypatch.setattr(native_decode, "decode_native", lambda data, ingested_ns: None)
    python_tables = _read_all(REAL_TRACES / name)
    assert len(native_tables) == len(python_tables)
    for a, b in zip(native_tables, python_tables, strict=True):
        parse = _span
        assert [parse(r) for r in a["raw"].to_pylist()] == [parse(r) for r in b["raw"].to_pylist()]
        assert a.drop_columns(["ingested_ns", "raw"]).equals(b.drop_columns(["ingested_ns", "raw"]))


# -- generated messages ---------------------------------------------------------------------------
KEYS = [
    "http.request.method",
    "http.method",
    "http.route",
    "url.full",
    "http.url",
    "http.response.status_code",
    "http.status_code",
    "db.system",
    "db.system.name",
    "db.query.text",
    "db.statement",
    "rpc.method",
    "peer.service",
    "service.peer.name",
    "server.address",
    "messaging.destination.name",
    "lock.wait_ms",
    "retry.attempt",
    "queue.depth",
    "thread.name",
    "user.id",
    "",
    "k" * 200,
    "ünïcödé.key",
]
EVENT_NAMES = ["exception", "lock.acquire", "log", "message", "retry", "", "wait.start", "ペ"]

text = st.text(max_size=12)
scalar_value = st.one_of(
    st.builds(lambda v: common_pb2.AnyValue(string_value=v), text),
    st.builds(lambda v: common_pb2.AnyValue(int_value=v), st.integers(-(2**63), 2**63 - 1)),
    st.builds(lambda v: common_pb2.AnyValue(int_value=v), st.integers(0, 700)),
    st.builds(lambda v: common_pb2.AnyValue(bool_value=v), st.booleans()),
    st.builds(lambda v: common_pb2.AnyValue(double_value=v), st.floats(allow_nan=False)),
    st.builds(lambda v: common_pb2.AnyValue(bytes_value=v), st.binary(max_size=6)),
    st.just(common_pb2.AnyValue()),
    st.builds(lambda v: common_pb2.AnyValue(string_value=v), st.sampled_from(["404", " 500", "GET"])),
)


def _array(values: list[common_pb2.AnyValue]) -> common_pb2.AnyValue:
    value = common_pb2.AnyValue()
    value.array_value.values.extend(values)
    return value


any_value = st.one_of(scalar_value, st.builds(_array, st.lists(scalar_value, max_size=3)))
key_value = st.builds(
    lambda k, v: common_pb2.KeyValue(key=k, value=v), st.sampled_from(KEYS) | text, any_value
)


@st.composite
def spans(draw: st.DrawFn) -> trace_pb2.Span:
    span = trace_pb2.Span()
    span.trace_id = draw(st.sampled_from([b"\x01" * 16, bytes(range(16)), b"\xab" * 16]))
    span.span_id = draw(st.binary(min_size=8, max_size=8).filter(any))
    span.parent_span_id = draw(st.sampled_from([b"", b"\x00" * 8, b"\x02" * 8, b"\x03" * 8]))
    span.name = draw(text)
    span.kind = draw(st.integers(0, 5))
    span.start_time_unix_nano = draw(st.integers(0, 2**63 - 1))
    span.end_time_unix_nano = draw(st.integers(0, 2**63 - 1))
    span.attributes.extend(draw(st.lists(key_value, max_size=6)))
    for _ in range(draw(st.integers(0, 3))):
        event = span.events.add(name=draw(st.sampled_from(EVENT_NAMES) | text))
        event.time_unix_nano = draw(st.integers(0, 2**63 - 1))
        event.attributes.extend(draw(st.lists(key_value, max_size=2)))
    for _ in range(draw(st.integers(0, 2))):
        link = span.links.add(
            trace_id=span.trace_id, span_id=draw(st.sampled_from([b"\x02" * 8, b"\x05" * 8]))
        )
        if draw(st.booleans()):
            link.attributes.add(key="opentracing.ref_type").value.string_value = draw(
                st.sampled_from(["follows_from", "child_of"])
            )
    if draw(st.booleans()):
        span.status.code = draw(st.integers(0, 2))
        span.status.message = draw(text)
    span.dropped_attributes_count = draw(st.integers(0, 3))
    span.flags = draw(st.integers(0, 2**32 - 1))
    if draw(st.integers(0, 9)) == 0:
        span.trace_state = draw(text)
    return span


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    msg = trace_pb2.TracesData()
    for _ in range(draw(st.integers(0, 3))):
        rs = msg.resource_spans.add()
        if draw(st.booleans()):
            rs.resource.attributes.extend(draw(st.lists(key_value, max_size=3)))
            if draw(st.booleans()):
                rs.resource.attributes.add(key="service.name").value.string_value = draw(text)
        for _ in range(draw(st.integers(0, 2))):
            ss = rs.scope_spans.add()
            if draw(st.booleans()):
                ss.scope.name = draw(text)
            ss.spans.extend(draw(st.lists(spans(), max_size=4)))
    return msg.SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_generated_requests_match(data: bytes) -> None:
    _assert_same(data)


def test_corrupted_requests_never_crash_and_match() -> None:
    rng = random.Random(20261128)
    seeds = [
        encode_spans(_sdk_spans()).SerializeToString(),
        trace_pb2.TracesData.FromString(build_template(1)).SerializeToString(),
    ]
    small = trace_pb2.TracesData.FromString(seeds[1])
    for rs in small.resource_spans:
        for ss in rs.scope_spans:
            del ss.spans[3:]
    seeds[1] = small.SerializeToString()
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            action = rng.random()
            position = rng.randrange(len(data))
            if action < 0.5:
                data[position] = rng.randrange(256)
            elif action < 0.7:
                del data[position : position + rng.randint(1, 8)]
            elif action < 0.85:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            else:
                del data[position:]
        _assert_same(bytes(data))


def test_gather_checks_bounds() -> None:
    from hourglass.collector import _otlpscan

    starts = struct.pack("=2q", 0, 3)
    assert _otlpscan.gather(b"abcdef", starts, struct.pack("=2q", 2, 3)) == (
        struct.pack("=3i", 0, 2, 5),
        b"abdef",
    )
    with pytest.raises(ValueError, match="outside"):
        _otlpscan.gather(b"abcdef", starts, struct.pack("=2q", 2, 4))
    with pytest.raises(ValueError, match="outside"):
        _otlpscan.gather(b"abcdef", struct.pack("=q", -1), struct.pack("=q", 1))


def test_fallback_reasons_are_reported() -> None:
    from hourglass.collector import _otlpscan

    bad_id = trace_pb2.TracesData()
    bad_id.resource_spans.add().scope_spans.add().spans.add(trace_id=b"\x01" * 15, span_id=b"\x01" * 8)
    assert "id" in _otlpscan.scan(bad_id.SerializeToString())
    assert _otlpscan.scan(b"\x0a\x05abc") == "malformed protobuf"
    table = decode_export_request(bad_id.SerializeToString()).table  # the Python decoder rejects it
    assert table.num_rows == 0 and isinstance(table, pa.Table)


@pytest.mark.parametrize(
    ("request_hex", "expected"),
    [
        # found by fuzzing the scanner under ASan: a 6-byte (padded) tag, which upb rejects
        ("8a8080808000231221121f0a1001010101010101010101010101010101120802020202020202022a016e", "error"),
        (
            "0a2d122b12290a1001010101010101010101010101010101120802020202020202022a016e7a08928080808000016d",
            "error",
        ),
        # kind and status code are int32: protobuf keeps the low 32 bits of 2**32 + 2 and 2**32 + 1
        (
            "0a29122712250a1001010101010101010101010101010101120802020202020202022a016e308280808010",
            {"kind": 2},
        ),
        (
            "0a2b122912270a1001010101010101010101010101010101120802020202020202022a016e7a06188180808010",
            {"status_code": 1},
        ),
        # an empty attribute (KeyValue with no fields) and a truncated one
        ("0a221220121e0a1001010101010101010101010101010101120802020202020202024a00", {"kind": 0}),
        ("0a231221121f0a1001010101010101010101010101010101120802020202020202024a010a", "error"),
        # http.status_code "²": str.isdigit() is true, int() fails
        (
            "0a3d123b12390a1001010101010101010101010101010101120802020202020202022a016e4a180a106874"
            "74702e7374617475735f636f646512040a02c2b2",
            {"http_status_code": None},
        ),
    ],
)
def test_fuzzer_findings(request_hex: str, expected: object) -> None:
    data = bytes.fromhex(request_hex)
    _assert_same(data)
    native, _ = _decode_both(data)
    if expected == "error":
        assert isinstance(native, str) and native.startswith("DecodeError")
    else:
        assert not isinstance(native, str)
        [row] = native.table.to_pylist()
        assert {key: row[key] for key in expected} == expected
