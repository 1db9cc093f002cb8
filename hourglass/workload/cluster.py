"""Run every workload service on its own free loopback port, each in its own thread and event loop
(as separate processes would be), each with its own tracer provider."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from hourglass.workload import services
from hourglass.workload.telemetry import ServiceTelemetry, SpanProcessorFactory, make_provider

LEAF_SERVICES = {
    # service -> (route, typical latency in ms)
    "inventory": ("/stock/{sku}", 15.0),
    "pricing": ("/quotes/{sku}", 20.0),
    "shipping": ("/estimates/{sku}", 12.0),
}
SERVICE_NAMES = ("storefront", "orders", "ledger", "search-index", "media", "bank", *LEAF_SERVICES)


def _bind_free_port() -> socket.socket:
    """A listening socket on a free loopback port, with TCP_NODELAY as servers set it.

    The protocol must be IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on accepted
    connections whose socket says so, and with Nagle's algorithm on, a response written as
    headers then body waits for the client's delayed ACK — a 40 ms stall after each response on a
    kept-alive connection that would show in the traces as a fake gap (and hide an immediate
    retry loop behind what looks like a backoff)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@dataclass
class _Running:
    telemetry: ServiceTelemetry
    server: uvicorn.Server
    thread: threading.Thread
    sock: socket.socket


@dataclass
class WorkloadCluster:
    """Starts the services; ``urls[service]`` is where each listens. Use as a context manager: on
    exit the servers stop and every provider is flushed and shut down, so every span has been
    handed to its exporter when the ``with`` block ends."""

    processor_factory: SpanProcessorFactory
    seed: int = 7
    startup_timeout_s: float = 15.0
    urls: dict[str, str] = field(default_factory=dict)
    _running: dict[str, _Running] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> WorkloadCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="hourglass-workload-")
        workdir = Path(self._tmp.name)
        sockets = {name: _bind_free_port() for name in SERVICE_NAMES}
        self.urls = {name: f"http://127.0.0.1:{sock.getsockname()[1]}" for name, sock in sockets.items()}
        telemetry = {
            name: ServiceTelemetry(name, make_provider(name, self.processor_factory, f"{name}-{i}"))
            for i, name in enumerate(SERVICE_NAMES)
        }
        orders_db = workdir / "orders.sqlite"
        services.create_orders_database(orders_db, self.seed)
        apps: dict[str, FastAPI] = {
            "storefront": services.storefront_app(
                telemetry["storefront"],
                {
                    n: self.urls[n]
                    for n in ("inventory", "pricing", "shipping", "search-index", "media", "bank")
                },
                self.seed,
            ),
            "orders": services.orders_app(telemetry["orders"], orders_db),
            "ledger": services.ledger_app(telemetry["ledger"], workdir / "ledger.sqlite", self.seed + 1),
            "search-index": services.search_index_app(telemetry["search-index"], self.seed + 2),
            "media": services.media_app(telemetry["media"], self.seed + 3),
            "bank": services.bank_app(telemetry["bank"], self.seed + 4),
        }
        for i, (name, (route, latency_ms)) in enumerate(LEAF_SERVICES.items()):
            apps[name] = services.leaf_service_app(telemetry[name], route, latency_ms, self.seed + 10 + i)
        for name in SERVICE_NAMES:
            config = uvicorn.Config(
                apps[name], log_level="warning", log_config=None, access_log=False, lifespan="on"
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(
                target=server.run, kwargs={"sockets": [sockets[name]]}, name=f"workload-{name}", daemon=True
            )
            self._running[name] = _Running(telemetry[name], server, thread, sockets[name])
            thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        for name, running in self._running.items():
            while not running.server.started:
                if not running.thread.is_alive():
                    raise RuntimeError(f"workload service {name!r} failed to start")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"workload service {name!r} did not start in {self.startup_timeout_s}s"
                    )
                time.sleep(0.01)

    def stop(self) -> None:
        for running in self._running.values():
            running.server.should_exit = True
        for name, running in self._running.items():
            running.thread.join(timeout=10)
            if running.thread.is_alive():
                raise RuntimeError(f"workload service {name!r} did not stop within 10 s")
            running.sock.close()
        for running in self._running.values():
            running.telemetry.provider.force_flush()
            running.telemetry.provider.shutdown()
        self._running.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
