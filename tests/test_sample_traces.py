"""Every sample trace file, analysed by the real CLI, satisfies its labels file.

Runs ``hourglass analyze FILE --format json`` exactly as a user would, checks each
``<scenario>.labels.json`` (every ``must_find`` reported, no ``must_not_find``), and prints recall
and precision over all files (visible with ``pytest -s``; also in the assertion message).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hourglass.workload.labels import LabelCheck, check_report, load_labels, scores
from hourglass.workload.scenarios import SCENARIOS
from tests.cli import HOURGLASS, analyze_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-traces"
LABEL_FILES = sorted(SAMPLES.glob("*.labels.json"))


def test_every_scenario_has_a_small_trace_file_and_labels() -> None:
    names = {p.name.removesuffix(".labels.json") for p in LABEL_FILES}
    assert names == {s.name for s in SCENARIOS}
    for labels_path in LABEL_FILES:
        labels = load_labels(labels_path)
        trace_file = SAMPLES / labels["trace_file"]
        assert trace_file.is_file(), f"{labels_path.name} names a missing trace file {trace_file.name}"
        assert trace_file.stat().st_size < 1_000_000, f"{trace_file.name} should stay under 1 MB"
        assert labels["must_find"] and labels["must_not_find"]
        # Every line is one OTLP/JSON export request with hex ids, as the Collector writes them.
        first = json.loads(trace_file.read_text().splitlines()[0])
        span = first["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        assert len(span["traceId"]) == 32 and len(span["spanId"]) == 16
        int(span["traceId"], 16)


@pytest.mark.slow
def test_sample_traces_match_their_labels() -> None:
    checks: list[LabelCheck] = []
    for labels_path in LABEL_FILES:
        labels = load_labels(labels_path)
        report = analyze_file(SAMPLES / labels["trace_file"])
        assert report["schema"] == "hourglass.report/v1"
        assert report["spans_analyzed"] > 0
        checks.append(check_report(labels["scenario"], labels, report))
    summary = scores(checks)
    lines = [line for check in checks for line in check.lines()]
    text = "\n".join([*lines, f"sample traces: {summary.line()}"])
    print("\n" + text)
    assert all(check.ok for check in checks), text


@pytest.mark.timeout(120)
def test_generator_writes_otlp_jsonl_that_imports_span_for_span(tmp_path: Path) -> None:
    """Regenerate one scenario with the real script, then import it with the real CLI: every span
    the workload produced is read back, in the Collector file exporter's format, with its labels."""
    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "hourglass.workload.generate",
            "--out",
            str(tmp_path),
            "--scenario",
            "lock_contention",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert generated.returncode == 0, generated.stderr
    spans_written = int(generated.stderr.split(" spans,")[0].rsplit(" ", 1)[-1])
    trace_file = tmp_path / "lock_contention.otlp.jsonl"
    assert json.loads((tmp_path / "lock_contention.labels.json").read_text())["trace_file"] == trace_file.name
    imported = subprocess.run(
        [str(HOURGLASS), "import", "--db", str(tmp_path / "s.duckdb"), str(trace_file), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    summary = json.loads(imported.stdout)
    assert summary["per_file"][0]["format"] == "otlp-jsonl"
    assert summary["spans"] == spans_written and summary["skipped_spans"] == 0
    scenario = next(s for s in SCENARIOS if s.name == "lock_contention")
    assert summary["traces"] == 2 * scenario.requests_per_handler  # one trace per request
