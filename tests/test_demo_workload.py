"""`make demo` end to end: a real `hourglass serve` subprocess, the workload's services exporting
through the real OTLP exporters, the analysis over the store through the REST API — every
labelled bottleneck is reported and none of the healthy handlers is flagged.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from hourglass.workload.labels import check_report, load_labels, merge_labels, scores

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-traces"


def kill_tree(proc: subprocess.Popen[str]) -> None:
    """Kill the demo and its `hourglass serve` child (own session) if a test left them running."""
    if proc.poll() is not None:
        return
    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    proc.kill()
    proc.wait(timeout=10)


def run_demo(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "hourglass.demo", "--db", str(tmp_path / "demo.duckdb")]
    command += ["--grpc-port", "0", "--http-port", "0", "--api-port", "0"]  # free ports, chosen by the demo
    command += ["--no-wait", "--report-json", str(report_path), *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        kill_tree(proc)
    completed = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    assert completed.returncode == 0, f"demo exited {completed.returncode}:\n{stdout}\n{stderr}"
    return completed, json.loads(report_path.read_text())


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_demo_finds_every_labelled_bottleneck_and_no_healthy_one(tmp_path: Path) -> None:
    proc, report = run_demo(tmp_path)
    out = proc.stdout
    assert "ranked recommendations" in out
    assert "Report:  http://127.0.0.1:" in out and "/v1/recommendations" in out
    assert "`hourglass serve` stopped (exit code 0)" in out
    exported = int(out.split(" spans exported")[0].rsplit(" ", 1)[-1])
    assert report["spans_analyzed"] >= exported > 0

    labels = merge_labels(load_labels(p) for p in sorted(SAMPLES.glob("*.labels.json")))
    check = check_report("demo workload", labels, report)
    text = "\n".join([*check.lines(), f"demo workload: {scores([check]).line()}"])
    print("\n" + text)
    assert check.ok, text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_over_otlp_http_stores_every_span(tmp_path: Path) -> None:
    """One scenario through the OTLP/HTTP exporter: every exported span is stored and analysed."""
    proc, report = run_demo(tmp_path, "--exporter", "http", "--scenario", "fanout_straggler")
    exported = int(proc.stdout.split(" spans exported")[0].rsplit(" ", 1)[-1])
    assert report["spans_analyzed"] == exported
    assert any(r["kind"] == "fanout_straggler" for r in report["recommendations"])


@pytest.mark.timeout(180)
def test_demo_keeps_serving_until_ctrl_c_then_stops_the_server(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "hourglass.demo",
        "--db",
        str(tmp_path / "demo.duckdb"),
        "--scenario",
        "n_plus_one",
    ]
    command += ["--grpc-port", "0", "--http-port", "0", "--api-port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[str] = []
    serving = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Press Ctrl-C" in line:
                serving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert serving.wait(120), "demo never reached serving:\n" + "".join(lines)
        api_url = next(line.split()[1] for line in lines if line.startswith("Report:"))
        assert httpx.get(f"{api_url}healthz", timeout=5).status_code == 200, "still serving after printing"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
        reader.join(timeout=10)
        output = "".join(lines)
        assert "Stopping" in output and "`hourglass serve` stopped (exit code 0)" in output
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{api_url}healthz", timeout=2)
    finally:
        kill_tree(proc)


def test_busy_default_ports_are_replaced_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from hourglass import demo

    with socket.socket() as busy, socket.socket() as spare:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        spare.bind(("127.0.0.1", 0))
        busy_port, spare_port = busy.getsockname()[1], spare.getsockname()[1]
        spare.close()  # free: the default stays as is
        monkeypatch.setattr(demo, "DEFAULT_PORTS", {"grpc": busy_port, "http": spare_port, "api": busy_port})
        ports, notes = demo.choose_ports("127.0.0.1", {"grpc": None, "http": None, "api": 12345})
    assert ports["grpc"] not in (busy_port, 0) and ports["http"] == spare_port and ports["api"] == 12345
    assert notes == [f"port {busy_port} (grpc) is busy: using {ports['grpc']} instead"]
