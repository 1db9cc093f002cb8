"""A real `hourglass serve` on free loopback ports, fed by the real OpenTelemetry SDK exporter.

Used by the REST, browser and schemathesis tests. Traces carry a known bottleneck: under the
``frontend`` server span ``GET /checkout`` three client calls run one after another (30 ms each),
while ``GET /home`` makes three calls in parallel (the healthy counterpart, no finding expected).
Span times are set explicitly, so the traces are the same on a slow machine.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from bench._process import hourglass_command

ROOT = Path(__file__).resolve().parents[2]
MS = 1_000_000
CALL_MS = 30
SPANS_PER_TRACE = 7  # a server span, three client calls and their three server spans
CHECKOUT_CALLS = (("users", "GET /users"), ("cart", "GET /cart"), ("prices", "GET /prices"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hourglass_executable() -> list[str]:
    """The venv's console script (what users run), else ``python -m hourglass``."""
    return hourglass_command()


@dataclass
class LiveServer:
    base_url: str
    grpc_endpoint: str
    db: Path
    log: Path
    token: str | None
    process: subprocess.Popen[bytes]
    sent_traces: list[str] = field(default_factory=list)
    sent_spans: int = 0

    def client(self, *, auth: bool = True, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if (auth and self.token) else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@contextlib.contextmanager
def running_server(
    tmp: Path,
    *,
    token: str | None = None,
    settle: str = "0.5s",
    env: dict[str, str] | None = None,
    store: str = "",
    stop_timeout: float = 15,
) -> Iterator[LiveServer]:
    """Start `hourglass serve` on free ports over a fresh DuckDB file; stop it (SIGTERM, then kill
    after ``stop_timeout`` s). ``env`` adds variables (e.g. ANTHROPIC_* to point the write-up agent
    at a fake server); ``store="chdb"`` serves from a fresh embedded ClickHouse store instead."""
    extra_env = env or {}
    grpc_port, http_port, api_port = free_port(), free_port(), free_port()
    db = tmp / ("spans.chdb" if store == "chdb" else "hourglass.duckdb")
    log = tmp / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    env["HOURGLASS_SETTLE"] = settle
    env.update(extra_env)
    if token:
        env["HOURGLASS_API_TOKEN"] = token
    cmd = [
        *hourglass_executable(),
        "serve",
        "--db",
        f"{store}:{db}" if store else str(db),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--api-port",
        str(api_port),
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = LiveServer(
        base_url=f"http://127.0.0.1:{api_port}",
        grpc_endpoint=f"127.0.0.1:{grpc_port}",
        db=db,
        log=log,
        token=token,
        process=process,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"hourglass serve exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"hourglass serve did not answer /healthz in 60 s:\n{server.log_tail()}")
            time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@contextlib.contextmanager
def analysed_server(tmp: Path, *, token: str, checkout: int, home: int) -> Iterator[LiveServer]:
    """running_server fed ``checkout`` and ``home`` traces, all of them stored, then analysed once
    (POST /v1/analyses answered 200)."""
    with running_server(tmp, token=token) as server:
        send_traces(server, checkout=checkout, home=home)
        wait_for_spans(server, (checkout + home) * SPANS_PER_TRACE)
        with server.client() as client:
            run = client.post("/v1/analyses")
            assert run.status_code == 200, run.text
        yield server


def _provider(service: str, endpoint: str, token: str | None) -> TracerProvider:
    resource = Resource.create({"service.name": service, "host.name": f"{service}-1"})
    provider = TracerProvider(resource=resource)
    headers = {"authorization": f"Bearer {token}"} if token else None
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=10, headers=headers)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def send_traces(
    server: LiveServer, *, checkout: int = 20, home: int = 20, base_ns: int | None = None
) -> list[str]:
    """Send ``checkout`` serialized and ``home`` parallel traces through the OTLP/gRPC exporter.

    Returns the checkout trace ids (hex). Each trace has 1 root + 3 client + 3 backend spans.
    """
    base_ns = base_ns if base_ns is not None else time.time_ns() - 120_000 * MS
    providers = {
        name: _provider(name, server.grpc_endpoint, server.token)
        for name in ("frontend", "users", "cart", "prices")
    }
    front = providers["frontend"].get_tracer("tests.live_server")
    checkout_ids: list[str] = []
    spans = 0
    try:
        for i in range(checkout + home):
            serialized = i < checkout
            t0 = base_ns + i * 1_000 * MS
            calls = len(CHECKOUT_CALLS)
            root_end = t0 + ((5 + calls * (CALL_MS + 1) + 3) if serialized else (5 + CALL_MS + 3)) * MS
            root = front.start_span(
                "GET /checkout" if serialized else "GET /home",
                kind=SpanKind.SERVER,
                start_time=t0,
                attributes={
                    "http.request.method": "GET",
                    "http.route": "/checkout" if serialized else "/home",
                },
            )
            root_ctx = otel_trace.set_span_in_context(root)
            for j, (backend, op) in enumerate(CHECKOUT_CALLS):
                start = t0 + ((5 + j * (CALL_MS + 1)) if serialized else 5) * MS
                end = start + CALL_MS * MS
                client = front.start_span(
                    op,
                    context=root_ctx,
                    kind=SpanKind.CLIENT,
                    start_time=start,
                    attributes={
                        "http.request.method": "GET",
                        "server.address": backend,
                        "peer.service": backend,
                    },
                )
                server_span = (
                    providers[backend]
                    .get_tracer("tests.live_server")
                    .start_span(
                        op,
                        context=otel_trace.set_span_in_context(client),
                        kind=SpanKind.SERVER,
                        start_time=start + 1 * MS,
                        attributes={"http.route": op.split(" ", 1)[1]},
                    )
                )
                server_span.set_status(Status(StatusCode.OK))
                server_span.end(end_time=end - 1 * MS)
                client.end(end_time=end)
                spans += 2
            root.end(end_time=root_end)
            spans += 1
            if serialized:
                checkout_ids.append(format(root.get_span_context().trace_id, "032x"))
    finally:
        for provider in providers.values():
            provider.force_flush(30_000)
            provider.shutdown()
    server.sent_traces.extend(checkout_ids)
    server.sent_spans += spans
    return checkout_ids


def wait_for_spans(server: LiveServer, count: int, timeout: float = 60.0) -> None:
    with server.client() as client:
        deadline = time.monotonic() + timeout
        while True:
            spans = client.get("/v1/stats").json().get("spans")
            if spans == count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"store has {spans} spans, expected {count}:\n{server.log_tail()}")
            time.sleep(0.2)
