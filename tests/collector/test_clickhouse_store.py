"""The ClickHouse store against the Collector's otel_traces schema, on embedded ClickHouse (chdb).

- Rows written the way the Collector's ClickHouse exporter writes them (no Hourglass side row)
  are read as SPAN_SCHEMA rows: kind/status in both spellings, semantic columns, host, hints,
  events, links, follows-from.
- What Hourglass writes is readable as plain otel_traces rows (attributes as text maps, events
  and links nested), and reads back exactly as decoded, raw span included.
- URLs: parsed, checked, never echoing the password; an unreachable server is one clear line.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector.backends import open_store
from hourglass.collector.clickhouse_store import ClickHouseSpanStore, parse_clickhouse_url
from hourglass.collector.decode import decode_traces_message
from hourglass.collector.schema import (
    ANALYSIS_COLUMNS,
    KIND_CLIENT,
    KIND_SERVER,
    SPAN_COLUMNS,
    STATUS_ERROR,
    STATUS_OK,
)
from hourglass.collector.store import StoreError, redact

chdb = pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")

BASE_NS = 1_760_000_000_000_000_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> ClickHouseSpanStore:
    opened = ClickHouseSpanStore.embedded(str(tmp_path / "spans.chdb"))
    yield opened
    opened.close()


def _ts(ns: int) -> str:
    return f"fromUnixTimestamp64Nano(toInt64({ns}))"


def _insert_as_the_collector(store: ClickHouseSpanStore) -> None:
    """Two spans as the exporter's INSERT writes them (older and current kind/status spellings)."""
    store._backend.command(
        f"""
        INSERT INTO {store._table} (Timestamp, TraceId, SpanId, ParentSpanId, TraceState, SpanName,
            SpanKind, ServiceName, ResourceAttributes, ScopeName, ScopeVersion, SpanAttributes,
            Duration, StatusCode, StatusMessage, `Events.Timestamp`, `Events.Name`, `Events.Attributes`,
            `Links.TraceId`, `Links.SpanId`, `Links.TraceState`, `Links.Attributes`)
        VALUES
        ({_ts(BASE_NS)}, '{TRACE}', '00f067aa0ba902b7', '', '', 'GET /checkout', 'SPAN_KIND_SERVER',
         'frontend', map('service.name', 'frontend', 'host.name', 'web-1'), 'io.opentelemetry.http', '1.2',
         map('http.request.method', 'GET', 'http.response.status_code', '503', 'http.route', '/checkout'),
         300000000, 'STATUS_CODE_ERROR', 'upstream failed', [], [], [], [], [], [], []),
        ({_ts(BASE_NS + 10_000_000)}, '{TRACE}', '00f067aa0ba902b8', '00f067aa0ba902b7', 'k=v', 'SELECT orders',
         'Client', '', map('k8s.pod.name', 'db-pod'), '', '',
         map('db.system', 'postgresql', 'db.statement', 'SELECT 1', 'retry.attempt', '2', 'user.id', '7'),
         50000000, 'Ok', '',
         [{_ts(BASE_NS + 20_000_000)}, {_ts(BASE_NS + 30_000_000)}], ['lock.acquire', 'log'],
         [map('lock.name', 'orders', 'exception.stacktrace', 'long'), map()],
         ['{TRACE}'], ['00f067aa0ba902b7'], [''], [map('opentracing.ref_type', 'follows_from')])
        """
    )


def test_reads_what_the_collector_wrote(store: ClickHouseSpanStore) -> None:
    _insert_as_the_collector(store)
    rows = store.scan(columns=SPAN_COLUMNS).to_pylist()
    assert [r["span_id"] for r in rows] == ["00f067aa0ba902b7", "00f067aa0ba902b8"]
    root, child = rows
    assert root["kind"] == KIND_SERVER and root["status_code"] == STATUS_ERROR
    assert root["status_message"] == "upstream failed"
    assert root["service"] == "frontend" and root["host"] == "web-1"
    assert root["parent_span_id"] is None and root["scope_name"] == "io.opentelemetry.http"
    assert (root["http_method"], root["http_status_code"], root["http_route"]) == ("GET", 503, "/checkout")
    assert root["end_ns"] - root["start_ns"] == 300_000_000
    assert root["hints"] is None and root["event_hints"] is None and root["links"] == []
    assert root["raw"] is None and root["ingested_ns"] == root["end_ns"]  # no insertion time in otel_traces
    assert json.loads(root["resource_json"]) == {"service.name": "frontend", "host.name": "web-1"}

    assert child["kind"] == KIND_CLIENT and child["status_code"] == STATUS_OK
    assert child["service"] == "unknown_service" and child["host"] == "db-pod"
    assert child["parent_span_id"] == "00f067aa0ba902b7" and child["scope_name"] is None
    assert (child["db_system"], child["db_statement"]) == ("postgresql", "SELECT 1")
    assert json.loads(child["hints"]) == {"retry.attempt": "2"}  # user.id is no hint, db.* are columns
    assert child["event_names"] == ["lock.acquire", "log"]
    assert child["event_times_ns"] == [BASE_NS + 20_000_000, BASE_NS + 30_000_000]
    assert json.loads(child["event_hints"]) == [
        {"name": "lock.acquire", "time_ns": BASE_NS + 20_000_000, "attributes": {"lock.name": "orders"}}
    ]
    assert child["links"] == [f"{TRACE}:00f067aa0ba902b7"] and child["follows_from"] is True

    assert store.services() == ["frontend", "unknown_service"]
    assert store.scan(services=["unknown_service"]).num_rows == 2  # the whole trace
    assert store.trace(TRACE.upper()).num_rows == 2


def _otlp_request() -> trace_service_pb2.ExportTraceServiceRequest:
    def kv(key: str, **value: object) -> common_pb2.KeyValue:
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(**value))

    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(
        [kv("service.name", string_value="checkout"), kv("host.name", string_value="node-7")]
    )
    scope = resource_spans.scope_spans.add()
    scope.scope.name, scope.scope.version = "hourglass-test", "0.1"
    root = scope.spans.add(
        trace_id=bytes.fromhex(TRACE),
        span_id=bytes.fromhex("1111111111111111"),
        name="POST /pay",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=BASE_NS,
        end_time_unix_nano=BASE_NS + 250_000_000,
        trace_state="vendor=1",
    )
    root.status.code, root.status.message = trace_pb2.Status.STATUS_CODE_ERROR, "card declined"
    array = common_pb2.AnyValue(
        array_value=common_pb2.ArrayValue(values=[common_pb2.AnyValue(string_value=s) for s in ("a", "b")])
    )
    root.attributes.extend(
        [
            kv("http.request.method", string_value="POST"),
            kv("http.response.status_code", int_value=402),
            kv("retry.attempt", int_value=3),
            kv("cache.hit", bool_value=True),
            kv("ratio", double_value=1.5),
            common_pb2.KeyValue(key="tags", value=array),
        ]
    )
    event = root.events.add(time_unix_nano=BASE_NS + 5_000_000, name="queue.wait")
    event.attributes.extend([kv("queue.depth", int_value=12)])
    child = scope.spans.add(
        trace_id=bytes.fromhex(TRACE),
        span_id=bytes.fromhex("2222222222222222"),
        parent_span_id=bytes.fromhex("1111111111111111"),
        name="charge",
        kind=trace_pb2.Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=BASE_NS + 10_000_000,
        end_time_unix_nano=BASE_NS + 200_000_000,
    )
    child.attributes.extend(
        [kv("peer.service", string_value="payments"), kv("rpc.method", string_value="Charge")]
    )
    link = child.links.add(
        trace_id=bytes.fromhex(TRACE), span_id=bytes.fromhex("1111111111111111"), trace_state="t=1"
    )
    link.attributes.extend([kv("opentracing.ref_type", string_value="follows_from")])
    return request


def test_writes_otel_traces_as_the_collector_does_and_reads_back_exactly(store: ClickHouseSpanStore) -> None:
    decoded = decode_traces_message(_otlp_request()).table
    store.write(decoded)

    otel = store._backend.query_arrow(
        f"SELECT * FROM {store._table} ORDER BY SpanId SETTINGS output_format_arrow_string_as_string = 1"
    ).to_pylist()
    root, child = otel
    assert (root["TraceId"], root["SpanId"], root["ParentSpanId"]) == (TRACE, "1111111111111111", "")
    assert (root["SpanKind"], root["StatusCode"], root["StatusMessage"]) == (
        "Server",
        "Error",
        "card declined",
    )
    assert (root["ServiceName"], root["ScopeName"], root["TraceState"]) == (
        "checkout",
        "hourglass-test",
        "vendor=1",
    )
    assert root["Duration"] == 250_000_000
    assert dict(root["ResourceAttributes"]) == {"service.name": "checkout", "host.name": "node-7"}
    assert dict(root["SpanAttributes"]) == {
        "http.request.method": "POST",
        "http.response.status_code": "402",
        "retry.attempt": "3",
        "cache.hit": "true",
        "ratio": "1.5",
        "tags": '["a","b"]',
    }
    assert root["Events.Name"] == ["queue.wait"]
    assert [dict(a) for a in root["Events.Attributes"]] == [{"queue.depth": "12"}]
    assert (child["SpanKind"], child["StatusCode"], child["ParentSpanId"]) == (
        "Client",
        "Unset",
        "1111111111111111",
    )
    assert child["Links.SpanId"] == ["1111111111111111"] and child["Links.TraceState"] == ["t=1"]
    assert [dict(a) for a in child["Links.Attributes"]] == [{"opentracing.ref_type": "follows_from"}]
    # the exporter's trace-id lookup is filled by its materialized view, as with the Collector
    lookup = store._backend.query_arrow(f"SELECT TraceId FROM {store._table}_trace_id_ts")
    assert lookup.column("TraceId").to_pylist() == [TRACE]

    # read back: every column as decoded, the raw OTLP span included
    assert store.scan(columns=SPAN_COLUMNS).to_pylist() == decoded.to_pylist()

    # without the side table (as for rows a Collector wrote), the analysis columns still match,
    # except hint values, which otel_traces keeps as text
    store._backend.command(f"TRUNCATE TABLE {store._side}")
    derived = store.scan(columns=ANALYSIS_COLUMNS).to_pylist()
    expected = decoded.select(list(ANALYSIS_COLUMNS)).to_pylist()
    for got, want in zip(derived, expected, strict=True):
        for column in ANALYSIS_COLUMNS:
            if column == "ingested_ns":
                assert got[column] == want["end_ns"]
            elif column in ("hints", "event_hints") and want[column] is not None:
                assert json.dumps(json.loads(got[column]), sort_keys=True) == json.dumps(
                    _as_text(json.loads(want[column])), sort_keys=True
                ), column
            else:
                assert got[column] == want[column], column


def _as_text(value: object) -> object:
    if isinstance(value, dict):
        if set(value) == {"name", "time_ns", "attributes"}:
            return {**value, "attributes": _as_text(value["attributes"])}
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    return value


def test_reopen_keeps_spans_and_uses_an_existing_table(tmp_path: Path) -> None:
    path = str(tmp_path / "spans.chdb")
    with ClickHouseSpanStore.embedded(path) as first:
        _insert_as_the_collector(first)
    with open_store(f"chdb:{path}") as again:  # type: ignore[attr-defined]
        assert again.stats().spans == 2


def test_clickhouse_urls() -> None:
    location = parse_clickhouse_url("clickhouse://alice:s%3Acret@ch.internal:9000/traces?table=spans_v2")
    assert (location.host, location.port, location.username, location.password) == (
        "ch.internal",
        9000,
        "alice",
        "s:cret",
    )
    assert (location.database, location.table, location.secure) == ("traces", "spans_v2", False)
    assert "cret" not in str(location)
    default = parse_clickhouse_url("clickhouses://ch.example")
    assert (default.port, default.database, default.table, default.secure) == (
        8443,
        "default",
        "otel_traces",
        True,
    )
    assert redact("clickhouse://alice:pw@h:8123/db") == "clickhouse://alice:***@h:8123/db"
    assert redact("spans.duckdb") == "spans.duckdb"
    for bad, reason in [
        ("clickhouse://alice:pw@h:8123/db?tabel=x", "unknown URL parameter"),
        ("clickhouse://alice:pw@h:8123/db;drop", "bad database"),
        ("clickhouse://h:notaport/db", "not a ClickHouse URL"),
        ("clickhouse:///db", "expected clickhouse://"),
    ]:
        with pytest.raises(StoreError, match=reason) as info:
            parse_clickhouse_url(bad)
        assert "pw" not in str(info.value)
    with pytest.raises(StoreError, match="unknown store URL"):
        open_store("postgres://u:pw@h/db")
    with pytest.raises(StoreError, match="needs a directory"):
        open_store("chdb:")


def test_unreachable_server_is_one_clear_line_on_the_cli(tmp_path: Path) -> None:
    pytest.importorskip("clickhouse_connect", reason="clickhouse-connect is not installed")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"clickhouse://hourglass:topsecret@127.0.0.1:{port}/otel"
    started = time.monotonic()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("hourglass")), "analyze", "--db", url, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert time.monotonic() - started < 60
    assert proc.returncode == 1, proc.stderr
    assert "topsecret" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"clickhouse://hourglass@127.0.0.1:{port}/otel" in lines[0]
    assert "cannot use the ClickHouse server" in lines[0]


def test_write_rejects_bad_partition_args_and_empty_column_selection(store: ClickHouseSpanStore) -> None:
    store.write(decode_traces_message(_otlp_request()).table)
    assert store.scan(columns=()).num_rows == 0
    with pytest.raises(ValueError, match="part"):
        store.scan_partition(-1, 2)
    assert isinstance(store.scan_partition(0, 1), pa.Table) and store.scan_partition(0, 1).num_rows == 2


def test_a_chdb_store_in_use_is_one_clear_error(store: ClickHouseSpanStore, tmp_path: Path) -> None:
    # chdb would print its own lock error and fail with a generic "Error initializing EmbeddedServer"
    with pytest.raises(StoreError, match="in use by another process"):
        open_store(f"chdb:{tmp_path / 'spans.chdb'}")
    assert store.stats().spans == 0  # the owner is unaffected


def test_retention_removes_side_rows_and_lookup_entries_too(store: ClickHouseSpanStore) -> None:
    store.write(decode_traces_message(_otlp_request()).table)
    _insert_as_the_collector(store)  # the same trace id, two more spans, no side rows

    def count(table: str) -> int:
        return int(store._backend.query_arrow(f"SELECT count() AS n FROM {table}").column("n")[0].as_py())

    assert (count(store._table), count(store._side)) == (4, 2)
    assert store.delete_older_than(BASE_NS) == 0  # the trace ended after the cutoff
    assert store.delete_older_than(BASE_NS + 10**12) == 4
    assert (count(store._table), count(store._side), count(f"{store._table}_trace_id_ts")) == (0, 0, 0)
    assert store.stats().spans == 0


# otel_traces as exporter versions before ScopeName/ScopeVersion created it (Duration Int64 then).
OLD_EXPORTER_DDL = """
CREATE TABLE otel.otel_traces (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)), TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)), ParentSpanId String CODEC(ZSTD(1)), TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)), SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration Int64 CODEC(ZSTD(1)), StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (Timestamp DateTime64(9), Name LowCardinality(String),
                   Attributes Map(LowCardinality(String), String)) CODEC(ZSTD(1)),
    Links Nested (TraceId String, SpanId String, TraceState String,
                  Attributes Map(LowCardinality(String), String)) CODEC(ZSTD(1))
) ENGINE MergeTree() PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toUnixTimestamp(Timestamp), TraceId)
"""


def _prepare(path: Path, ddl: str) -> None:
    from chdb import session

    prepared = session.Session(str(path))
    try:
        prepared.query("CREATE DATABASE IF NOT EXISTS otel ENGINE = Atomic")
        prepared.query(ddl)
        if "SpanAttributes Map" in ddl:  # rows as that exporter wrote them
            prepared.query(
                f"INSERT INTO otel.otel_traces (Timestamp, TraceId, SpanId, SpanName, SpanKind, ServiceName, "
                f"SpanAttributes, Duration, StatusCode) VALUES ({_ts(BASE_NS)}, '{TRACE}', '00f067aa0ba902b7', "
                "'GET /', 'SPAN_KIND_SERVER', 'web', map('otel.scope.name', 'old-sdk', 'http.status_code', '500'), "
                "1000000, 'STATUS_CODE_ERROR')"
            )
    finally:
        prepared.close()


def test_a_table_from_an_older_exporter_is_read_and_written(tmp_path: Path) -> None:
    path = tmp_path / "old.chdb"
    _prepare(path, OLD_EXPORTER_DDL)
    with ClickHouseSpanStore.embedded(str(path)) as store:
        store.write(decode_traces_message(_otlp_request()).table)
        rows = {r["span_id"]: r for r in store.scan(columns=SPAN_COLUMNS).to_pylist()}
        old = rows["00f067aa0ba902b7"]
        assert (old["kind"], old["status_code"], old["http_status_code"]) == (KIND_SERVER, STATUS_ERROR, 500)
        assert old["scope_name"] is None and old["end_ns"] - old["start_ns"] == 1_000_000
        assert rows["1111111111111111"]["scope_name"] is None  # the old table has no ScopeName to keep it
        assert rows["1111111111111111"]["http_status_code"] == 402
        assert store.stats().spans == 3


def test_the_json_flavour_of_otel_traces_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "json.chdb"
    _prepare(
        path,
        OLD_EXPORTER_DDL.replace("SpanAttributes Map(LowCardinality(String), String)", "SpanAttributes JSON"),
    )
    with pytest.raises(StoreError, match="JSON flavour"):
        ClickHouseSpanStore.embedded(str(path))


def test_the_scanner_path_and_the_per_span_path_give_the_same_otel_rows() -> None:
    """``to_otel_rows`` reads attributes, events and links with the C scanner; the per-span
    protobuf path (no scanner, or bytes it refuses) must give the same rows."""
    import glob

    from hourglass.collector.decode_otel import to_otel_rows
    from hourglass.collector.files import read_trace_files
    from hourglass.collector.native_decode import AVAILABLE

    if not AVAILABLE:
        pytest.skip("the C extension collector._otlpscan is not built")
    request = _otlp_request()
    extra = request.resource_spans[0].scope_spans[0].spans[0].attributes
    extra.add(key="whole", value=common_pb2.AnyValue(double_value=3.0))
    extra.add(key="big", value=common_pb2.AnyValue(double_value=1e20))
    extra.add(key="blob", value=common_pb2.AnyValue(bytes_value=b"\x00\xff"))
    extra.add(key="none", value=common_pb2.AnyValue())
    kvlist = common_pb2.AnyValue()
    kvlist.kvlist_value.values.add(key="k", value=common_pb2.AnyValue(int_value=1))
    extra.add(key="nested", value=kvlist)
    tables = [decode_traces_message(request).table]
    files = sorted(glob.glob(str(ROOT / "sample-traces" / "*.otlp.jsonl")))
    tables += [t for t in read_trace_files(files, on_error=pytest.fail) if t.num_rows]
    spans = pa.concat_tables(tables)
    fast, fast_side = to_otel_rows(spans)
    slow, slow_side = to_otel_rows(spans, native=False)
    assert fast.equals(slow) and fast_side.equals(slow_side)
    attributes = dict(fast.column("SpanAttributes")[0].as_py())
    assert (attributes["ratio"], attributes["whole"], attributes["big"]) == (
        "1.5",
        "3",
        "100000000000000000000",
    )
    assert (attributes["blob"], attributes["none"], attributes["nested"]) == ("AP8=", "", '{"k":1}')


def test_a_write_does_not_wait_for_a_long_read(store: ClickHouseSpanStore) -> None:
    """serve's Exports must not queue behind an analysis scan (chdb runs one query per session)."""
    import threading

    finished: list[float] = []

    def long_read() -> None:  # stops itself after 5 s (timeout_overflow_mode=break)
        store._backend.query_arrow(
            "SELECT count() AS n FROM system.numbers WHERE sipHash64(number) % 7 = 1 "
            "SETTINGS max_execution_time = 5, timeout_overflow_mode = 'break'"
        )
        finished.append(time.monotonic())

    reader = threading.Thread(target=long_read)
    reader.start()
    time.sleep(0.5)
    store.write(decode_traces_message(_otlp_request()).table)
    wrote = time.monotonic()
    reader.join(60)
    assert finished and wrote < finished[0], "the write waited for the read"
    assert store.stats().spans == 2


class _RecordingServer(http.server.ThreadingHTTPServer):
    """A loopback HTTP server that answers what clickhouse-connect asks of a ClickHouse server
    when it connects (the version; the settings and a check, in Native: no rows) and answers a
    read in Arrow with the ids of its external data ``hourglass_ids``, echoed; every request
    recorded (request line, content type, body)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Recorder)
        self.requests: list[tuple[str, str, bytes]] = []


class _Recorder(http.server.BaseHTTPRequestHandler):
    server: _RecordingServer

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        kind = self.headers.get("Content-Type", "")
        self.server.requests.append((self.requestline, kind, body))
        if body.startswith(b"SELECT version(), timezone()"):
            self._answer(b"25.3.1.1\tUTC\n")
        elif b"FORMAT Native" in body:
            self._answer(b"")
        else:  # a read: the ids of its external data, as the store's ids table holds them
            boundary = kind.partition("boundary=")[2].encode()
            parts = body.split(b"--" + boundary) if boundary else []
            sent = next((p for p in parts if b'name="hourglass_ids"' in p), b"")
            rows = sent.partition(b"\r\n\r\n")[2].rstrip(b"\r\n").decode().split("\n") if sent else []
            sink = pa.BufferOutputStream()
            table = pa.table({"id": pa.array(rows, pa.string())})
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            self._answer(sink.getvalue().to_pybytes())

    def _answer(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_read_of_many_ids_sends_them_beside_a_query_in_the_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a server, ids past ``INLINE_TRACE_IDS`` go as the query's external data (a TabSeparated
    table ``hourglass_ids`` of one String column ``id``, escaped), and the query goes in the
    request's body beside them, not in its URL: a read by ids (~11 KB of SQL) would otherwise
    pass the 8 KB request line a proxy allows. Other reads are sent as before (the SQL as the
    body). Run by the real clickhouse-connect client against a loopback server that records what
    it receives. (The store contract runs the reads themselves against a real server when
    HOURGLASS_TEST_CLICKHOUSE_URL names one.)"""
    pytest.importorskip("clickhouse_connect", reason="clickhouse-connect is not installed")
    from hourglass.collector import clickhouse_store
    from hourglass.collector.clickhouse_store import _ServerBackend, _tsv_ids

    for proxy in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # (loopback, not a proxy)
        monkeypatch.delenv(proxy, raising=False)
    server = _RecordingServer()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    backend = None
    try:
        backend = _ServerBackend(
            host="127.0.0.1", port=server.server_address[1], username="default", password="", secure=False
        )
        ids = [f"{i:032x}" for i in range(5_000)]
        long_sql = f"SELECT id FROM {backend.ids_table} WHERE id NOT IN ({', '.join(['NULL'] * 2_000)})"
        assert len(long_sql) > 8_192
        read = backend.query_arrow(long_sql, ids)
        assert read.column("id").to_pylist() == ids  # the ids arrived whole, in order
        line, kind, body = server.requests[-1]
        assert len(line) < 1_024, line[:200]  # the query is not in the URL
        params = parse_qs(urlsplit(line.split()[1]).query)
        assert "query" not in params and kind.startswith("multipart/form-data")
        assert b'name="query"' in body and long_sql.encode() in body
        assert params["hourglass_ids_structure"] == ["id String"]
        assert params["hourglass_ids_format"] == ["TabSeparated"]
        backend.query_arrow("SELECT 1 AS x")
        line, kind, body = server.requests[-1]
        assert not kind.startswith("multipart") and body.startswith(b"SELECT 1 AS x")
        # the second client made once, at the first read by ids: one more connection check
        assert sum(b.startswith(b"SELECT version()") for _, _, b in server.requests) == 2
        # SQL past a form field's room goes in the URL, as before
        monkeypatch.setattr(clickhouse_store, "MAX_FORM_SQL_BYTES", 1_000)
        assert backend.query_arrow(long_sql, ids[:3]).column("id").to_pylist() == ids[:3]
        line, kind, body = server.requests[-1]
        assert parse_qs(urlsplit(line.split()[1]).query)["query"][0].startswith(long_sql)
        assert sum(b.startswith(b"SELECT version()") for _, _, b in server.requests) == 2
        backend.close()
        with pytest.raises(StoreError, match="closed"):  # (no client made after the store is closed)
            backend.query_arrow(f"SELECT id FROM {backend.ids_table}", ids)
        backend = None
    finally:
        if backend is not None:
            backend.close()
        server.shutdown()
        server.server_close()
    assert _tsv_ids(["a\\b", "x\ny", "c\td"]) == b"a\\\\b\nx\\ny\nc\\td\n"
