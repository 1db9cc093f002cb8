"""`make demo` end to end: a real `hourglass serve` subprocess, the workload's services exporting
through the real OTLP exporters, the analysis over the store through the REST API — every
labelled bottleneck is reported and none of the healthy handlers is flagged.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workload.labels import check_report, load_labels, merge_labels, scores

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-traces"


def run_demo(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    report_path = tmp_path / "report.json"
    command = [sys.executable, "-m", "api.demo", "--db", str(tmp_path / "demo.duckdb")]
    command += ["--grpc-port", "0", "--http-port", "0", "--api-port", "0"]  # free ports, chosen by the demo
    command += ["--no-wait", "--report-json", str(report_path), *extra]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"demo exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc, json.loads(report_path.read_text())


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


@pytest.mark.timeout(120)
def test_demo_over_otlp_http_stores_every_span(tmp_path: Path) -> None:
    """One scenario through the OTLP/HTTP exporter: every exported span is stored and analysed."""
    proc, report = run_demo(tmp_path, "--exporter", "http", "--scenario", "fanout_straggler")
    exported = int(proc.stdout.split(" spans exported")[0].rsplit(" ", 1)[-1])
    assert report["spans_analyzed"] == exported
    assert any(r["kind"] == "fanout_straggler" for r in report["recommendations"])
