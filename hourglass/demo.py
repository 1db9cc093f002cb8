"""`make demo`: start `hourglass serve` on the embedded store, send it the sample workload's traces
through the real OTLP exporter, print the ranked recommendations and the report URL, keep serving
until Ctrl-C.

    python -m hourglass.demo --db hourglass.duckdb [--no-wait] [--exporter grpc|http] [--report-json PATH]

Ports default to 4317 (OTLP/gRPC), 4318 (OTLP/HTTP) and 8000 (API and report); a default port that
is busy is replaced by a free one, and the demo says so. An explicitly given port is used as is;
port 0 means "any free port".
``--no-wait`` prints the recommendations and stops the server (for CI and tests, where there is no
terminal to press Ctrl-C in).

The workload (``workload/``) needs the dev extras (OpenTelemetry instrumentations and exporters),
which ``make demo`` installs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from hourglass.api.settings import Settings

DEFAULT_PORTS = {"grpc": 4317, "http": 4318, "api": 8000}
console = Console(highlight=False)
if not console.is_terminal:
    # Logs and CI captures have no width to respect: keep each recommendation on one line.
    console = Console(highlight=False, width=200)


class DemoError(RuntimeError):
    """The demo could not go on; the message says which step failed and why."""


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def choose_ports(host: str, requested: dict[str, int | None]) -> tuple[dict[str, int], list[str]]:
    """Explicit ports as given; defaults, or a free port (with a note) when the default is busy."""
    ports: dict[str, int] = {}
    notes: list[str] = []
    for name, default in DEFAULT_PORTS.items():
        port = requested.get(name)
        if port == 0:
            ports[name] = _free_port(host)  # "any free port": chosen here, so the demo knows it
        elif port is not None:
            ports[name] = port
        elif _port_is_free(host, default):
            ports[name] = default
        else:
            ports[name] = _free_port(host)
            notes.append(f"port {default} ({name}) is busy: using {ports[name]} instead")
    return ports, notes


class _ServeProcess:
    """``hourglass serve`` as a child process, stopped with SIGTERM (then SIGKILL after 15 s)."""

    def __init__(self, db: str, host: str, ports: dict[str, int], log_path: Path) -> None:
        self.api_url = f"http://{host}:{ports['api']}"
        self.log_path = log_path
        command = [
            sys.executable, "-m", "hourglass", "serve",
            "--db", db, "--host", host,
            "--grpc-port", str(ports["grpc"]), "--http-port", str(ports["http"]), "--api-port", str(ports["api"]),
        ]  # fmt: skip
        self._log = log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Own process group: Ctrl-C reaches the demo, which then stops the server once, cleanly.
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DemoError(
                        f"`hourglass serve` exited with code {self.proc.returncode} while starting:\n{self.log_tail()}"
                    )
                try:
                    if client.get(f"{self.api_url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise DemoError(f"`hourglass serve` was not healthy after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        return self.proc.returncode


@dataclass
class ExportTally:
    """Spans the exporters sent and the server acknowledged, and spans whose export failed."""

    acknowledged: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, spans: int, ok: bool) -> None:
        with self.lock:
            if ok:
                self.acknowledged += spans
            else:
                self.failed += spans


def run_workload(
    host: str, ports: dict[str, int], exporter: str, scenario_names: Sequence[str] | None
) -> ExportTally:
    """Run the scenarios against the services with the real OTLP exporter; count what was acknowledged."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    from hourglass.workload.cluster import WorkloadCluster
    from hourglass.workload.scenarios import SCENARIOS, SCENARIOS_BY_NAME, drive

    tally = ExportTally()

    def make_exporter() -> SpanExporter:
        if exporter == "http":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            return HttpExporter(endpoint=f"http://{host}:{ports['http']}/v1/traces", timeout=30)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=f"{host}:{ports['grpc']}", insecure=True, timeout=30)

    class TallyingExporter(SpanExporter):
        """The real OTLP exporter, counting each batch by whether the server acknowledged it."""

        def __init__(self, inner: SpanExporter) -> None:
            self.inner = inner

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            result = self.inner.export(spans)
            tally.add(len(spans), result == SpanExportResult.SUCCESS)
            return result

        def shutdown(self) -> None:
            self.inner.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return self.inner.force_flush(timeout_millis)

    def processor() -> BatchSpanProcessor:
        # A queue big enough that nothing is dropped: the demo counts on every span arriving.
        return BatchSpanProcessor(
            TallyingExporter(make_exporter()), max_queue_size=50_000, schedule_delay_millis=500
        )

    chosen = [SCENARIOS_BY_NAME[n] for n in scenario_names] if scenario_names else list(SCENARIOS)
    with WorkloadCluster(processor) as cluster:
        for i, scenario in enumerate(chosen):
            started = time.perf_counter()
            asyncio.run(drive(scenario, cluster.urls, seed=7 + i))
            console.print(
                f"  {scenario.name:26} {scenario.requests_per_handler * 2:4} requests "
                f"in {time.perf_counter() - started:4.1f} s"
            )
    # Leaving the cluster flushed and shut down every provider: every batch has been answered.
    return tally


def wait_for_spans(api_url: str, expected: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    stored = -1
    with httpx.Client(timeout=5.0) as client:
        while time.monotonic() < deadline:
            stats = client.get(f"{api_url}/v1/stats")
            stats.raise_for_status()
            stored = int(stats.json()["spans"])
            if stored >= expected:
                return stored
            time.sleep(0.2)
    raise DemoError(f"only {stored} of {expected} exported spans were stored after {timeout_s:.0f} s")


def fetch_report(api_url: str) -> dict[str, Any]:
    with httpx.Client(timeout=300.0) as client:
        run = client.post(f"{api_url}/v1/analyses")
        if run.status_code != 200:
            raise DemoError(f"POST /v1/analyses answered {run.status_code}: {run.text}")
        response = client.get(f"{api_url}/v1/recommendations")
        if response.status_code != 200:
            raise DemoError(f"GET /v1/recommendations answered {response.status_code}: {response.text}")
        report: dict[str, Any] = response.json()
        return report


def print_recommendations(report: dict[str, Any]) -> None:
    table = Table(title="Hourglass — ranked recommendations", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("kind")
    table.add_column("where (service / operation)")
    table.add_column("saves p50", justify="right")
    table.add_column("of root", justify="right")
    table.add_column("traces", justify="right")
    table.add_column("conf.", justify="right")
    table.add_column("title")
    for rec in report.get("recommendations") or []:
        impact = rec.get("impact") or {}
        p50 = impact.get("saved_ms_p50")
        share = impact.get("share_of_root_latency")
        table.add_row(
            str(rec.get("rank")),
            str(rec.get("kind")),
            f"{rec.get('service')} / {rec.get('operation')}",
            f"{p50:.1f} ms" if isinstance(p50, int | float) else "—",
            f"{share:.0%}" if isinstance(share, int | float) else "—",
            str(rec.get("traces_affected")),
            f"{rec.get('confidence', 0):.2f}",
            str(rec.get("title") or ""),
        )
    console.print(table)
    console.print(
        f"{len(report.get('recommendations') or [])} recommendations from {report.get('traces_analyzed')} traces, "
        f"{report.get('spans_analyzed')} spans."
    )


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m hourglass.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=defaults.db, help=f"span store file (default {defaults.db})")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=None, help="default 4317, or a free port if busy")
    parser.add_argument("--http-port", type=int, default=None, help="default 4318, or a free port if busy")
    parser.add_argument("--api-port", type=int, default=None, help="default 8000, or a free port if busy")
    parser.add_argument("--exporter", choices=("grpc", "http"), default="grpc", help="OTLP exporter protocol")
    parser.add_argument("--scenario", action="append", help="run only these scenarios (repeatable)")
    parser.add_argument("--no-wait", action="store_true", help="stop after printing (no Ctrl-C needed)")
    parser.add_argument("--report-json", type=Path, help="also write the report object to this file")
    parser.add_argument("--log", type=Path, default=None, help="server log file (default: next to --db)")
    args = parser.parse_args(argv)

    # Ctrl-C and SIGTERM both stop the demo cleanly. SIGINT is set explicitly: a shell that starts
    # the demo as a background job leaves SIGINT ignored, and Python then never raises on it.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, _raise_keyboard_interrupt)
    started = time.perf_counter()
    ports, notes = choose_ports(
        args.host, {"grpc": args.grpc_port, "http": args.http_port, "api": args.api_port}
    )
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    log_path = args.log or Path(f"{args.db}.serve.log")
    console.print(
        f"Starting `hourglass serve` (store {args.db}; OTLP/gRPC :{ports['grpc']}, OTLP/HTTP :{ports['http']}, "
        f"API :{ports['api']}; log {log_path})"
    )
    server = _ServeProcess(args.db, args.host, ports, log_path)
    try:
        server.wait_healthy(timeout_s=60)
        t_ready = time.perf_counter()
        console.print(
            f"Server healthy in {t_ready - started:.1f} s. Running the workload (OTLP/{args.exporter}):"
        )
        before = wait_for_spans(server.api_url, 0, 5)
        tally = run_workload(args.host, ports, args.exporter, args.scenario)
        t_work = time.perf_counter()
        if tally.failed:
            raise DemoError(
                f"`hourglass serve` refused {tally.failed} spans ({tally.acknowledged} acknowledged); "
                f"its log:\n{server.log_tail()}"
            )
        exported = tally.acknowledged
        stored = wait_for_spans(server.api_url, before + exported, timeout_s=60)
        console.print(
            f"Workload done in {t_work - t_ready:.1f} s: {exported} spans exported, {stored} spans in the store."
        )
        report = fetch_report(server.api_url)
        t_report = time.perf_counter()
        console.print(f"Analysis took {t_report - t_work:.1f} s.\n")
        print_recommendations(report)
        if args.report_json:
            args.report_json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"\nReport:  {server.api_url}/")
        console.print(f"API:     {server.api_url}/v1/recommendations")
        console.print(f"Demo ready in {time.perf_counter() - started:.1f} s.")
        if args.no_wait:
            return 0
        console.print(
            "Serving. Point your own OpenTelemetry SDK here:\n"
            f"  OTEL_EXPORTER_OTLP_ENDPOINT=http://{args.host}:{ports['grpc']}  (OTLP/gRPC), or\n"
            f"  OTEL_EXPORTER_OTLP_ENDPOINT=http://{args.host}:{ports['http']} "
            "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf  (OTLP/HTTP)\n"
            "Press Ctrl-C to stop."
        )
        while server.proc.poll() is None:
            time.sleep(0.5)
        console.print(
            f"[red]`hourglass serve` exited with code {server.proc.returncode}[/red]\n{server.log_tail()}"
        )
        return 1
    except KeyboardInterrupt:
        console.print("\nStopping…")
        return 0
    except DemoError as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        code = server.stop()
        console.print(f"`hourglass serve` stopped (exit code {code}).")


if __name__ == "__main__":
    raise SystemExit(main())
