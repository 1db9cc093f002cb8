"""`hourglass serve` as users run it: the real CLI in a subprocess, the real SDK exporters.

Ports are chosen by the server (``--*-port 0``) and read from its startup lines.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import SPAN_COLUMNS

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    log: Path
    db: Path
    grpc: str
    http: str
    api: str

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict[str, int]:
        reply = httpx.get(f"{self.api}/v1/stats", timeout=10)
        reply.raise_for_status()
        data = reply.json()
        return {"spans": data["spans"], "traces": data["traces"]}

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def start_serve(db: Path, log: Path, *extra: str) -> Serve:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOURGLASS_", "ANTHROPIC_"))}
    cmd = [sys.executable, "-m", "hourglass", "serve", "--db", str(db), "--host", "127.0.0.1"]
    cmd += ["--grpc-port", "0", "--http-port", "0", "--api-port", "0", *extra]
    with log.open("ab") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        return _wait_until_serving(process, db, log)
    except BaseException:
        _kill(process)
        raise


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def _wait_until_serving(process: subprocess.Popen[bytes], db: Path, log: Path) -> Serve:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # (the last run's lines: a restart appends to the same log; its gRPC line comes first)
        text = "OTLP/gRPC listening on" + log.read_text(errors="replace").split("OTLP/gRPC listening on")[-1]
        found = {
            "grpc": re.search(r"OTLP/gRPC listening on (\S+)", text),
            "http": re.search(r"OTLP/HTTP listening on (\S+)", text),
            "api": re.search(r"REST API listening on (\S+)", text),
        }
        if all(found.values()):
            serve = Serve(process, log, db, **{k: m.group(1) for k, m in found.items() if m})
            try:
                if httpx.get(f"{serve.api}/healthz", timeout=5).status_code == 200:
                    return serve
            except httpx.HTTPError:
                pass
        if process.poll() is not None:
            raise RuntimeError(f"serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    raise RuntimeError(f"serve did not start:\n{log.read_text(errors='replace')}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    server = start_serve(tmp_path / "spans.duckdb", tmp_path / "serve.log")
    try:
        yield server
    finally:
        _kill(server.process)


def _emit(exporter: object, service: str) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": service, "host.name": "box-1"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[arg-type]
    tracer = provider.get_tracer("test.lib")
    with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER) as root:
        root.set_attribute("http.request.method", "GET")
        root.set_attribute("http.route", "/orders")
        for i in range(3):
            with tracer.start_as_current_span("SELECT orders", kind=SpanKind.CLIENT) as db:
                db.set_attribute("db.system", "postgresql")
                db.set_attribute("db.statement", f"SELECT * FROM orders WHERE id = {i}")
                db.add_event("lock.wait", {"lock.name": "orders", "waiters": i})
        root.set_status(Status(StatusCode.ERROR, "one failed"))
    provider.shutdown()


def test_sdk_exporters_grpc_and_http_every_span_once(serve: Serve) -> None:
    _emit(GrpcExporter(endpoint=serve.grpc, insecure=True, timeout=10), "via-grpc")
    _emit(HttpExporter(endpoint=serve.http, timeout=10), "via-http")
    assert serve.stats() == {"spans": 8, "traces": 2}
    assert serve.stop() == 0
    assert "stopped:" in serve.log_text()
    with DuckDBSpanStore(str(serve.db)) as store:
        assert store.raw_row_count() == 8
        rows = store.scan(columns=SPAN_COLUMNS).to_pylist()
    assert {r["service"] for r in rows} == {"via-grpc", "via-http"}
    for service in ("via-grpc", "via-http"):
        mine = [r for r in rows if r["service"] == service]
        root = next(r for r in mine if r["name"] == "GET /orders")
        children = [r for r in mine if r["name"] == "SELECT orders"]
        assert len(children) == 3 and all(c["parent_span_id"] == root["span_id"] for c in children)
        assert root["http_method"] == "GET" and root["http_route"] == "/orders"
        assert root["status_code"] == 2 and root["status_message"] == "one failed"
        assert root["host"] == "box-1" and json.loads(root["resource_json"])["service.name"] == service
        assert sorted(c["db_statement"] for c in children) == [
            f"SELECT * FROM orders WHERE id = {i}" for i in range(3)
        ]
        assert all(c["event_names"] == ["lock.wait"] for c in children)
        hints = sorted(json.loads(c["event_hints"])[0]["attributes"]["waiters"] for c in children)
        assert hints == [0, 1, 2]
        original = trace_pb2.Span.FromString(root["raw"])
        assert original.name == "GET /orders" and len(original.attributes) == 2


def test_same_export_twice_is_stored_once(serve: Serve) -> None:
    memory = InMemorySpanExporter()
    _emit(memory, "twice")
    body = encode_spans(memory.get_finished_spans()).SerializeToString()  # the SDK exporters' encoder
    with grpc.insecure_channel(serve.grpc) as channel:
        for _ in range(2):  # an exporter retry after a lost response sends the same bytes again
            channel.unary_unary(EXPORT_METHOD)(body, timeout=10)
    reply = httpx.post(
        serve.http, content=body, headers={"content-type": "application/x-protobuf"}, timeout=10
    )
    assert reply.status_code == 200
    assert serve.stats() == {"spans": 4, "traces": 1}
    assert serve.stop() == 0  # shutdown compacts
    with DuckDBSpanStore(str(serve.db)) as store:
        assert store.raw_row_count() == 4


def test_bad_input_gets_clear_errors_and_server_keeps_serving(serve: Serve) -> None:
    _emit(GrpcExporter(endpoint=serve.grpc, insecure=True, timeout=10), "good")
    with grpc.insecure_channel(serve.grpc) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(EXPORT_METHOD)(b"\xff\xff garbage", timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    reply = httpx.post(
        serve.http, json={"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5, "traceId": 3}]}]}]}
    )
    assert reply.status_code == 200 and reply.json()["partialSuccess"]["rejectedSpans"] == "1"
    truncated = httpx.post(
        serve.http,
        content=b"\x1f\x8b\x08\x00\x00\x00",
        headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"},
    )
    assert truncated.status_code == 400
    assert serve.stats() == {"spans": 4, "traces": 1}


def _unique_request(index: int, spans: int = 50) -> bytes:
    msg = trace_service_pb2.ExportTraceServiceRequest()
    rs = msg.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "kill9"
    batch = rs.scope_spans.add().spans
    for j in range(spans):
        s = batch.add(name="op", start_time_unix_nano=10**18, end_time_unix_nano=10**18 + 5)
        s.trace_id = (index + 1).to_bytes(16, "big")
        s.span_id = (index * 1000 + j + 1).to_bytes(8, "big")
    return msg.SerializeToString()


def test_kill_9_keeps_every_acknowledged_export(tmp_path: Path) -> None:
    db, log = tmp_path / "k.duckdb", tmp_path / "serve.log"
    server = start_serve(db, log)
    acked: list[int] = []
    acked_lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        with grpc.insecure_channel(server.grpc) as channel:
            call = channel.unary_unary(EXPORT_METHOD)
            index = worker
            while not stop.is_set():
                try:
                    call(_unique_request(index), timeout=10)
                except grpc.RpcError:
                    return  # the server died: this Export was not acknowledged
                with acked_lock:
                    acked.append(index)
                index += 4

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while len(acked) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
    finally:
        _kill(server.process)
        stop.set()
        for t in threads:
            t.join(20)
    assert len(acked) >= 40
    restarted = start_serve(db, tmp_path / "restart.log")
    try:
        with acked_lock:
            expected = {f"{i + 1:032x}" for i in acked}
        stats = restarted.stats()
        assert stats["spans"] >= 50 * len(expected)
        assert restarted.stop() == 0
    finally:
        _kill(restarted.process)
    with DuckDBSpanStore(str(db)) as store:
        stored = set(store.scan(columns=("trace_id",)).column("trace_id").to_pylist())
        counts = store.stats()
    missing = expected - stored
    assert not missing, f"{len(missing)} acknowledged Exports lost after kill -9"
    assert counts.spans == 50 * counts.traces  # no partial Export: each commit is all-or-nothing


def test_sigterm_with_exports_in_flight_acks_only_committed(tmp_path: Path) -> None:
    server = start_serve(tmp_path / "t.duckdb", tmp_path / "serve.log")
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def sender(worker: int) -> None:
        with grpc.insecure_channel(server.grpc) as channel:
            call = channel.unary_unary(EXPORT_METHOD)
            for k in range(400):
                index = worker + 8 * k
                try:
                    call(_unique_request(index, spans=200), timeout=20)
                    ok = True
                except grpc.RpcError:
                    ok = False
                with lock:
                    results.append((index, ok))
                if not ok:
                    return

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(results) < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.stop() == 0
    finally:
        _kill(server.process)
        for t in threads:
            t.join(30)
    with DuckDBSpanStore(str(server.db)) as store:
        stored = set(store.scan(columns=("trace_id",)).column("trace_id").to_pylist())
    acked = {f"{i + 1:032x}" for i, ok in results if ok}
    assert acked <= stored
    assert "shutting down" in server.log_text()


def test_run_serve_in_process_runs_retention_and_stops_on_event(tmp_path: Path) -> None:
    """The python-level entry point; retention periodically removes traces older than the window."""
    from hourglass.api.serve import ServeEndpoints, run_serve
    from hourglass.api.settings import Settings

    settings = Settings()
    settings.db = str(tmp_path / "retention.duckdb")
    settings.grpc_port = settings.http_port = settings.api_port = 0
    settings.api_token = None
    settings.retention_seconds = 3600.0
    ready, stop = threading.Event(), threading.Event()
    bound: list[ServeEndpoints] = []
    thread = threading.Thread(
        target=run_serve,
        args=(settings, ready, stop),
        kwargs={"compact_interval_s": 0.3, "retention_interval_s": 0.3, "on_ready": bound.append},
        daemon=True,
    )
    thread.start()
    try:
        assert ready.wait(60)
        now = time.time_ns()
        request = trace_service_pb2.ExportTraceServiceRequest()
        spans = request.resource_spans.add().scope_spans.add().spans
        for tid, end in ((1, now - 2 * 3600 * 10**9), (2, now)):  # one trace 2 h old, one fresh
            span = spans.add(name="op", start_time_unix_nano=end - 1000, end_time_unix_nano=end)
            span.trace_id, span.span_id = tid.to_bytes(16, "big"), tid.to_bytes(8, "big")
        with grpc.insecure_channel(bound[0].grpc) as channel:
            channel.unary_unary(EXPORT_METHOD)(request.SerializeToString(), timeout=10)
        deadline = time.monotonic() + 20
        stats = None
        while time.monotonic() < deadline:
            stats = httpx.get(f"{bound[0].api}/v1/stats", timeout=10).json()
            if stats["spans"] == 1:
                break
            time.sleep(0.2)
        assert stats is not None and (stats["spans"], stats["traces"]) == (1, 1)
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    with DuckDBSpanStore(settings.db) as store:
        assert store.scan(columns=("trace_id",)).column("trace_id").to_pylist() == [f"{2:032x}"]


@pytest.mark.parametrize("flag", ["--grpc-port", "--http-port", "--api-port"])
def test_busy_port_is_a_clear_error(tmp_path: Path, flag: str) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        ports = {"--grpc-port": "0", "--http-port": "0", "--api-port": "0", flag: str(port)}
        cmd = [sys.executable, "-m", "hourglass", "serve", "--db", str(tmp_path / "x.duckdb")]
        result = subprocess.run(
            [*cmd, *[item for pair in ports.items() for item in pair]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "cannot listen for" in result.stderr and str(port) in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("HOURGLASS_RETENTION", "banana", "HOURGLASS_RETENTION='banana' is not a duration like 90s"),
        ("HOURGLASS_API_PORT", "eighty", "HOURGLASS_API_PORT='eighty' is not a whole number"),
    ],
)
def test_bad_setting_variable_is_a_clear_error(tmp_path: Path, variable: str, value: str, says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOURGLASS_")}
    result = subprocess.run(
        [sys.executable, "-m", "hourglass", "serve", "--db", str(tmp_path / "x.duckdb")],
        cwd=ROOT,
        env={**env, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_listening_sockets_give_accepted_connections_tcp_nodelay() -> None:
    """Without TCP_NODELAY, Nagle plus delayed ACKs add ~40 ms to keep-alive responses."""
    import asyncio
    import socket

    from hourglass.api.serve import _listen

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=_listen("127.0.0.1", 0, "test"))
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_short_retention_runs_every_tenth_of_it_not_in_whole_compaction_ticks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--retention 2m`` runs a retention pass every 12 s (a tenth of it), beside the compaction
    every 10 s. Before, the passes waited for the compaction's 10-s ticks: every 20 s. Driven on a
    clock of the test's own (the maintenance loop's waits advance it), so nothing is timed."""
    import asyncio
    import types

    from hourglass.api import serve

    clock = [1000.0]
    passes: list[tuple[str, float]] = []

    class Store:
        def compact(self) -> int:
            passes.append(("compaction", clock[0]))
            return 0

        def delete_older_than(self, cutoff_ns: int) -> int:
            passes.append(("retention", clock[0]))
            return 0

    shutdown = asyncio.Event()

    async def wait_for(awaitable: Any, timeout: float) -> None:
        awaitable.close()  # (the shutdown's wait: never awaited, the clock moves instead)
        clock[0] += timeout
        if clock[0] > 1000.0 + 125:
            shutdown.set()
            return
        raise TimeoutError

    async def to_thread(fn: Any, *args: Any) -> Any:
        return fn(*args)

    fake_asyncio = types.SimpleNamespace(
        wait_for=wait_for, to_thread=to_thread, TimeoutError=asyncio.TimeoutError
    )
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time_ns=lambda: int(clock[0] * 1e9))
    monkeypatch.setattr(serve, "asyncio", fake_asyncio)
    monkeypatch.setattr(serve, "time", fake_time)
    settings = types.SimpleNamespace(retention_seconds=120.0)
    asyncio.run(serve._maintenance(Store(), settings, shutdown, 10.0))  # type: ignore[arg-type]

    def times(kind: str) -> list[float]:
        return [round(t - 1000.0, 6) for k, t in passes if k == kind]

    assert times("retention") == [10.0 + 12 * n for n in range(10)]  # 10, 22, 34, ... 118
    assert times("compaction") == [10.0 * n for n in range(1, 13)]  # every 10 s, as before


def test_a_short_retention_is_applied_more_often_than_every_five_minutes() -> None:
    """Retention runs every 5 minutes, or every tenth of a shorter retention (not more often
    than compaction): with a fixed 5 minutes, ``--retention 2m`` (a short retention, set to see it
    work) kept traces up to 7 minutes old. The default 7 days still runs every 5 minutes."""
    import asyncio

    from hourglass.api.serve import RETENTION_INTERVAL_S, _maintenance, retention_every
    from hourglass.api.settings import Settings

    assert retention_every(7 * 86400.0, RETENTION_INTERVAL_S, 10.0) == RETENTION_INTERVAL_S
    assert retention_every(120.0, RETENTION_INTERVAL_S, 10.0) == 12.0
    assert retention_every(30.0, RETENTION_INTERVAL_S, 10.0) == 10.0  # (not more often than compaction)

    cutoffs: list[int] = []

    class Store:
        def compact(self) -> int:
            return 0

        def delete_older_than(self, cutoff_ns: int) -> int:
            cutoffs.append(cutoff_ns)
            return 0

    settings = Settings()
    settings.retention_seconds = 0.5  # a tenth: 0.05 s, as often as this compaction

    async def run() -> None:
        shutdown = asyncio.Event()
        task = asyncio.create_task(_maintenance(Store(), settings, shutdown, 0.05))  # type: ignore[arg-type]
        deadline = time.monotonic() + 20
        while len(cutoffs) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        shutdown.set()
        await task

    asyncio.run(run())
    assert len(cutoffs) >= 3  # (before: once, then not for 5 minutes)


def test_the_maintenance_reopens_the_store_after_enough_rows_and_says_so_once_at_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A live DuckDB database keeps heap for every row group it wrote (~2.3-2.5 MiB per million
    rows): serve's maintenance reopens the store once ``reopen_rows`` rows were written since it
    was opened, at most every ``reopen_interval_s``; one debug line each time."""
    import asyncio
    import logging

    from hourglass.api.serve import _maintenance
    from hourglass.api.settings import Settings
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from tests.builders import TraceBuilder, spans_table

    b = TraceBuilder(service="svc")
    b.span("op", start_ms=0, dur_ms=1)
    rows = spans_table(b)
    settings = Settings()
    settings.retention_seconds = 0
    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"), ingest_log=True, threads=1)
    caplog.set_level(logging.DEBUG, logger="hourglass.store")

    def reopened() -> int:
        return sum("reopened" in r.getMessage() for r in caplog.records if r.name == "hourglass.store")

    async def run(reopen_rows: int, interval_s: float, until: int, seconds: float = 20.0) -> None:
        """The maintenance ticking every 0.02 s until ``until`` reopens were logged (at most
        ``seconds``), and ~10 ticks more."""
        shutdown = asyncio.Event()
        task = asyncio.create_task(
            _maintenance(
                store, settings, shutdown, 0.02, reopen_rows=reopen_rows, reopen_interval_s=interval_s
            )
        )
        deadline = time.monotonic() + seconds
        while reopened() < until and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        shutdown.set()
        await task

    try:
        store.write(rows)
        store.load_staged()
        asyncio.run(run(reopen_rows=10**6, interval_s=0.0, until=1, seconds=0.3))
        assert reopened() == 0  # fewer rows than that written
        assert store.rows_since_open() == 1
        asyncio.run(run(reopen_rows=1, interval_s=0.0, until=1))
        assert reopened() == 1  # once: no row written since
        assert store.rows_since_open() == 0
        store.write(rows)
        store.load_staged()
        asyncio.run(run(reopen_rows=1, interval_s=3600.0, until=2, seconds=0.3))
        assert reopened() == 1  # not before the interval (from the maintenance's start)
        assert store.scan().num_rows == 1  # (the same span twice: one kept)
    finally:
        store.close()


def test_the_store_size_is_said_after_the_listening_lines(tmp_path: Path) -> None:
    """The receivers take spans before the store is counted, and a count after a crash reads
    every row (seconds at 10M spans): serve says it is listening at once, and the store's size
    when counted."""
    db, log = tmp_path / "s.duckdb", tmp_path / "serve.log"
    with DuckDBSpanStore(str(db)) as store:
        store.write(_stored_rows(3, spans=4))
    server = start_serve(db, log)
    try:
        deadline = time.monotonic() + 30
        while "holds" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = log.read_text().splitlines()
        said = [i for i, line in enumerate(lines) if "holds 12 spans, 3 traces" in line]
        listening = [i for i, line in enumerate(lines) if "REST API listening" in line]
        assert said and listening and listening[0] < said[0], lines
        assert server.stop() == 0
    finally:
        _kill(server.process)


def _stored_rows(traces: int, spans: int) -> Any:
    from tests.builders import TraceBuilder, spans_table

    built = []
    for _ in range(traces):
        b = TraceBuilder(base_ns=time.time_ns() - 60 * 10**9)
        root = b.span("GET /", start_ms=0, dur_ms=10)
        for k in range(spans - 1):
            b.span(f"child {k}", parent=root, start_ms=1 + k, dur_ms=1)
        built.append(b)
    return spans_table(built)
