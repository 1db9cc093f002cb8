"""Ingest benchmark: OTLP/gRPC Exports into a real `hourglass serve`, beside the transport ceiling.

    python -m bench.ingest [--seconds 15] [--senders 2] [--concurrency 12] [--quick]

What it does, all in one run on this machine:

1. builds a pool of pre-serialized 1000-span ``ExportTraceServiceRequest``s (5 resources × 200
   spans, 100 traces of 10 spans, 8 realistic attributes and 1 event per span, ~400 B/span);
   each send rewrites an 8-byte placeholder inside every trace id (one ``bytes.replace``), so
   every request carries unique trace ids without re-encoding;
2. **ceiling**: separate sender processes send them for ``--seconds`` to a receiver that answers
   without parsing (same grpc server model as serve: sync server, thread pool, generic handler);
3. **serve**: the same load against a real ``hourglass serve`` subprocess on a fresh DuckDB file;
   it counts acknowledged spans, samples the RSS of serve and its child processes (psutil),
   then stops serve with SIGTERM, opens the file and verifies that every acknowledged span is
   stored;
4. **OTLP/HTTP**: the same load as 3 over OTLP/HTTP (protobuf, keep-alive), for comparison;
5. **overload**: a short phase with 2 x 200 concurrent Exports (more than serve takes: 64 handler
   threads, 256 calls outstanding); serve must answer RESOURCE_EXHAUSTED with RetryInfo (senders
   back off for the advised delay; refusals without it are counted apart, as an OpenTelemetry
   Collector exporter would drop those batches) and its peak RSS must stay bounded.

Targets (issue 2): ≥ 100,000 spans/s durably stored and ≥ 0.10 of the ceiling, memory bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing as mp
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2

from bench._process import start_serve

ROOT = Path(__file__).resolve().parents[1]
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PLACEHOLDER = b"HGPLHOLD"  # first 8 bytes of every trace id in a template, rewritten per send
SPANS_PER_REQUEST = 1000
SPANS_PER_TRACE = 10
RESOURCES = 5
TEMPLATES = 4


# -- the load -----------------------------------------------------------------------------------
def _kv(key: str, value: str | int | float | bool) -> common_pb2.KeyValue:
    kv = common_pb2.KeyValue(key=key)
    if isinstance(value, bool):
        kv.value.bool_value = value
    elif isinstance(value, int):
        kv.value.int_value = value
    elif isinstance(value, float):
        kv.value.double_value = value
    else:
        kv.value.string_value = value
    return kv


def build_template(seed: int) -> bytes:
    """One 1000-span request whose trace ids all start with ``PLACEHOLDER``."""
    rng = random.Random(seed)
    request = trace_service_pb2.ExportTraceServiceRequest()
    services = ["frontend", "checkout", "inventory", "payments", "shipping"]
    per_resource = SPANS_PER_REQUEST // RESOURCES
    base = time.time_ns() - 60 * 10**9  # recent: retention (by span end time) must not drop the load
    span_counter = 0
    for r in range(RESOURCES):
        rs = request.resource_spans.add()
        rs.resource.attributes.extend(
            [
                _kv("service.name", services[r]),
                _kv("service.version", "2.4.1"),
                _kv("host.name", f"node-{r}"),
                _kv("telemetry.sdk.language", "python"),
                _kv("deployment.environment", "staging"),
            ]
        )
        scope = rs.scope_spans.add()
        scope.scope.name = "opentelemetry.instrumentation.fastapi"
        for i in range(per_resource):
            span_counter += 1
            trace_index = (r * per_resource + i) // SPANS_PER_TRACE
            position = (r * per_resource + i) % SPANS_PER_TRACE
            span = scope.spans.add()
            span.trace_id = PLACEHOLDER + struct.pack(">Q", trace_index + 1)
            span.span_id = struct.pack(">Q", span_counter)
            if position:
                span.parent_span_id = struct.pack(">Q", span_counter - position)
            start = base + rng.randrange(10**9)
            span.start_time_unix_nano = start
            span.end_time_unix_nano = start + rng.randrange(10**5, 10**8)
            if position % 3 == 1:
                span.name = "SELECT orders"
                span.kind = 3
                span.attributes.extend(
                    [
                        _kv("db.system.name", "postgresql"),
                        _kv("db.query.text", f"SELECT * FROM orders WHERE customer_id = ${rng.randrange(9)}"),
                        _kv("db.namespace", "shop"),
                        _kv("server.address", "pg-primary"),
                        _kv("server.port", 5432),
                        _kv("db.operation.name", "SELECT"),
                        _kv("db.collection.name", "orders"),
                        _kv("thread.name", "worker-3"),
                    ]
                )
            else:
                span.name = "GET /api/orders/{id}"
                span.kind = 2
                span.attributes.extend(
                    [
                        _kv("http.request.method", "GET"),
                        _kv("http.route", "/api/orders/{id}"),
                        _kv("url.full", f"http://frontend/api/orders/{rng.randrange(10**6)}"),
                        _kv("http.response.status_code", 200),
                        _kv("server.address", "frontend"),
                        _kv("user_agent.original", "Mozilla/5.0 (X11; Linux x86_64)"),
                        _kv("network.protocol.version", "1.1"),
                        _kv("client.address", "10.0.3.17"),
                    ]
                )
            event = span.events.add()
            event.name = "message"
            event.time_unix_nano = start + 1000
            event.attributes.extend([_kv("message.type", "SENT"), _kv("message.id", 1)])
            if rng.random() < 0.05:
                span.status.code = 2
                span.status.message = "upstream timeout"
    return request.SerializeToString()


# -- senders ------------------------------------------------------------------------------------
def retry_delay(err: grpc.RpcError) -> float | None:
    """The server's RetryInfo delay; None when the refusal carries none (the OpenTelemetry
    Collector's exporter then treats RESOURCE_EXHAUSTED as permanent and drops the data)."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _sender_process(
    target: str, phase: int, sender_id: int, threads: int, seconds: float, start_at: float, out: mp.Queue
) -> None:
    templates = [build_template(seed) for seed in range(TEMPLATES)]
    deadline = start_at + seconds
    acked = [0] * threads
    refused = [0] * threads
    refused_without_retry_info = [0] * threads
    errors: list[str] = []

    def run(thread_id: int) -> None:
        channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)])
        call = channel.unary_unary(EXPORT_METHOD)
        counter = 0
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < deadline:
            counter += 1
            prefix = struct.pack(">BBHI", phase, sender_id, thread_id, counter)  # unique in the run
            data = templates[counter % TEMPLATES].replace(PLACEHOLDER, prefix)
            try:
                call(data, timeout=30)
                acked[thread_id] += SPANS_PER_REQUEST
            except grpc.RpcError as err:
                code = err.code()
                if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                    refused[thread_id] += 1
                    delay = retry_delay(err)
                    if delay is None:
                        refused_without_retry_info[thread_id] += 1
                        delay = 0.5
                    time.sleep(min(delay, max(0.0, deadline - time.time())))
                else:
                    errors.append(f"{code}: {err.details()}")
                    return
        channel.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((sum(acked), sum(refused), sum(refused_without_retry_info), errors))


def _http_sender_process(
    url: str, phase: int, sender_id: int, threads: int, seconds: float, start_at: float, out: mp.Queue
) -> None:
    """The same load as ``_sender_process`` over OTLP/HTTP (protobuf), one keep-alive connection per thread."""
    templates = [build_template(seed) for seed in range(TEMPLATES)]
    deadline = start_at + seconds
    parsed = urllib.parse.urlsplit(url)
    acked = [0] * threads
    refused = [0] * threads
    errors: list[str] = []

    def run(thread_id: int) -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
        counter = 0
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < deadline:
            counter += 1
            prefix = struct.pack(">BBHI", phase, sender_id, thread_id, counter)
            data = templates[counter % TEMPLATES].replace(PLACEHOLDER, prefix)
            connection.request(
                "POST", parsed.path, body=data, headers={"Content-Type": "application/x-protobuf"}
            )
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                acked[thread_id] += SPANS_PER_REQUEST
            elif response.status in (429, 503):
                refused[thread_id] += 1
                delay = float(response.getheader("Retry-After") or 0.5)
                time.sleep(min(delay, max(0.0, deadline - time.time())))
            else:
                errors.append(f"HTTP {response.status}")
                return
        connection.close()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    out.put((sum(acked), sum(refused), 0, errors))


@dataclass
class LoadResult:
    acked_spans: int
    refused: int
    refused_without_retry_info: int
    seconds: float
    errors: list[str]

    @property
    def spans_per_s(self) -> float:
        return self.acked_spans / self.seconds


def run_load(
    target: str, *, phase: int, senders: int, concurrency: int, seconds: float, http: bool = False
) -> LoadResult:
    """``target``: host:port for gRPC, or the OTLP/HTTP URL with ``http``."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    start_at = time.time() + 3.0  # every sender has built its templates by then
    sender = _http_sender_process if http else _sender_process
    procs = [
        ctx.Process(target=sender, args=(target, phase, i, concurrency, seconds, start_at, queue))
        for i in range(senders)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
    return LoadResult(
        acked_spans=sum(r[0] for r in results),
        refused=sum(r[1] for r in results),
        refused_without_retry_info=sum(r[2] for r in results),
        seconds=seconds,
        errors=[e for r in results for e in r[3]],
    )


# -- the transport ceiling: a receiver that answers without parsing ------------------------------
def null_receiver_main(port_file: str) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=32),
        options=[("grpc.max_receive_message_length", 64 << 20)],
        maximum_concurrent_rpcs=64,
    )
    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(lambda request, context: b"")},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


class RssSampler:
    """Samples the RSS of a process and all its children (serve's decode and analysis workers) every 50 ms,
    summed (shared pages count twice: an upper bound): the peak, and peaks per half of the
    sampling window (under sustained overload a bounded server's second-half peak does not
    exceed the first's by much; an unbounded queue keeps growing)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
                for child in self.process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):  # a child may exit between the calls
                        rss += child.memory_info().rss
                self.peak = max(self.peak, rss)
                self.samples.append((time.monotonic(), rss))
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def half_peaks(self, skip_s: float = 3.0) -> tuple[int, int]:
        """Peak RSS in the first and second half of the window, after ``skip_s`` of sender start-up."""
        if not self.samples:
            return 0, 0
        start = self.samples[0][0] + skip_s
        window = [(t, r) for t, r in self.samples if t >= start] or self.samples
        middle = (window[0][0] + window[-1][0]) / 2
        first = max((r for t, r in window if t <= middle), default=0)
        second = max((r for t, r in window if t > middle), default=first)
        return first, second

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 120) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def _stored_unique_spans(db: Path) -> int:
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    with DuckDBSpanStore(str(db)) as store:
        return store.stats().spans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each measured phase")
    parser.add_argument("--senders", type=int, default=2, help="sender processes")
    parser.add_argument("--concurrency", type=int, default=12, help="concurrent Exports per sender process")
    parser.add_argument("--overload-seconds", type=float, default=8.0)
    parser.add_argument(
        "--overload-concurrency", type=int, default=200, help="concurrent Exports per sender when overloading"
    )
    parser.add_argument(
        "--quick", action="store_true", help="5-second phases (a smoke run, not the reported figure)"
    )
    parser.add_argument("--null-receiver", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.null_receiver:
        null_receiver_main(args.null_receiver)
        return 0
    if args.quick:
        args.seconds, args.overload_seconds = 5.0, 4.0

    print(
        f"hourglass ingest benchmark: {args.senders} sender processes × {args.concurrency} concurrent Exports, "
        f"{SPANS_PER_REQUEST} spans/request, {args.seconds:g} s per phase, {os.cpu_count()} CPUs; "
        f"load average before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    template_bytes = len(build_template(0))
    print(f"request: {template_bytes} bytes ({template_bytes / SPANS_PER_REQUEST:.0f} B/span)", flush=True)

    with tempfile.TemporaryDirectory(prefix="hourglass-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        # 1. ceiling
        port_file = tmp / "null.port"
        null = subprocess.Popen(
            [sys.executable, "-m", "bench.ingest", "--null-receiver", str(port_file)], cwd=ROOT
        )
        try:
            while not port_file.exists() or not port_file.read_text():
                time.sleep(0.05)
            ceiling = run_load(
                f"127.0.0.1:{port_file.read_text()}",
                phase=1,
                senders=args.senders,
                concurrency=args.concurrency,
                seconds=args.seconds,
            )
        finally:
            _stop(null, 10)
        print(f"ceiling (answer without parsing): {ceiling.spans_per_s:,.0f} spans/s", flush=True)

        # 2. serve
        db = tmp / "bench.duckdb"
        proc, addresses = start_serve(db, tmp / "serve.log", timeout=60)
        target, http_url = addresses["grpc"], addresses["http"]
        try:
            with RssSampler(proc.pid) as rss:
                loaded = run_load(
                    target, phase=2, senders=args.senders, concurrency=args.concurrency, seconds=args.seconds
                )
            # 2b. the same load over OTLP/HTTP
            with RssSampler(proc.pid) as http_rss:
                http_loaded = run_load(
                    http_url,
                    phase=4,
                    senders=args.senders,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                    http=True,
                )
            # 3. overload
            with RssSampler(proc.pid) as overload_rss:
                overload = run_load(
                    target,
                    phase=3,
                    senders=args.senders,
                    concurrency=args.overload_concurrency,
                    seconds=args.overload_seconds,
                )
        finally:
            code = _stop(proc)
        stored = _stored_unique_spans(db)
        expected = loaded.acked_spans + http_loaded.acked_spans + overload.acked_spans
        if code != 0:
            print((tmp / "serve.log").read_text(errors="replace")[-3000:])
        db_mb = sum(f.stat().st_size for f in tmp.glob("bench.duckdb*")) / 1e6

    stored_rate = loaded.spans_per_s if stored >= expected else float("nan")
    ratio = stored_rate / ceiling.spans_per_s if ceiling.spans_per_s else float("nan")
    rows = [
        ("transport ceiling (no parsing)", f"{ceiling.spans_per_s:,.0f}", "", ""),
        (
            "hourglass serve, acked + stored",
            f"{stored_rate:,.0f}",
            f"{rss.peak / 2**20:,.0f}",
            f"{loaded.refused}",
        ),
        (
            "same load over OTLP/HTTP, acked + stored",
            f"{http_loaded.spans_per_s if stored >= expected else float('nan'):,.0f}",
            f"{http_rss.peak / 2**20:,.0f}",
            f"{http_loaded.refused}",
        ),
        (
            f"overload ({args.senders}×{args.overload_concurrency} concurrent)",
            f"{overload.spans_per_s:,.0f}",
            f"{overload_rss.peak / 2**20:,.0f}",
            f"{overload.refused}",
        ),
    ]
    print()
    print(
        f"{'phase':<40} {'spans/s':>12} {'peak RSS MiB':>13} {'refused':>8}   (RSS: serve + its child processes)"
    )
    for name, rate, peak, refused in rows:
        print(f"{name:<40} {rate:>12} {peak:>13} {refused:>8}")
    print()
    print(
        f"acknowledged spans: {expected:,}; stored unique spans after shutdown: {stored:,} "
        f"({'all acknowledged spans stored' if stored >= expected else 'MISSING SPANS'}); serve exit code {code}; "
        f"store {db_mb:,.0f} MB"
    )
    without_retry_info = loaded.refused_without_retry_info + overload.refused_without_retry_info
    print(
        f"refusals without RetryInfo (an OpenTelemetry Collector exporter drops these): {without_retry_info:,} "
        f"of {loaded.refused + overload.refused:,}"
    )
    first, second = overload_rss.half_peaks()
    bounded = second <= first * 1.15 + 32 * 2**20
    verdict = "bounded" if bounded else "STILL GROWING"
    if args.overload_seconds < 8:
        verdict = f"phase too short to judge a plateau; {verdict} so far"
    print(
        f"overload peak RSS: first half {first / 2**20:,.0f} MiB, second half {second / 2**20:,.0f} MiB "
        f"({verdict})"
    )
    print(
        f"stored / ceiling: {ratio:.2f}   (targets: >= 100,000 spans/s, >= 0.10 of the ceiling, bounded RSS)"
    )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    errors = loaded.errors + http_loaded.errors + overload.errors + ceiling.errors
    for e in errors[:5]:
        print(f"sender error: {e}")
    return 0 if stored >= expected and code == 0 and not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
