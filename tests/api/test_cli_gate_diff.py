"""CI gate (`hourglass analyze --fail-on`) and `hourglass diff`, through the real CLI.

Inputs are the sample traces (a real instrumented workload) and, for "grew", two fresh runs of the
workload's lock scenario at different load — a load test replayed before and after a change.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hourglass.analysis.diff import diff_reports
from hourglass.analysis.gate import GATE_EXIT_CODE, GateSpec, GateSpecError, gate, severity

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample-traces"
HOURGLASS = Path(sys.executable).with_name("hourglass")
N_PLUS_ONE = SAMPLES / "n_plus_one.otlp.jsonl"
SERIALIZED = SAMPLES / "serialized_calls.otlp.jsonl"

pytestmark = pytest.mark.timeout(300)


def hourglass(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOURGLASS), *map(str, args)], capture_output=True, text=True, timeout=240, cwd=ROOT
    )


@pytest.fixture(scope="module")
def n_plus_one_report() -> dict[str, Any]:
    proc = hourglass("analyze", N_PLUS_ONE, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


# --------------------------------------------------------------------------- severity rules


def _rec(share: float | None, confidence: float, traces_affected: int = 10, kind: str = "n_plus_one") -> dict:
    impact = None if share is None else {"share_of_root_latency": share, "saved_ms_p50": 10.0}
    return {"kind": kind, "category": "parallelization", "impact": impact, "confidence": confidence,
            "traces_affected": traces_affected}  # fmt: skip


def test_severity_rules_at_their_thresholds() -> None:
    assert severity(_rec(0.20, 0.5), 100) == "high"
    assert severity(_rec(0.19, 0.9), 100) == "medium"
    assert severity(_rec(0.30, 0.49), 100) == "medium"  # big but unsure: not high
    assert severity(_rec(0.05, 0.9), 100) == "medium"
    assert severity(_rec(0.049, 0.9), 100) == "low"
    # No latency estimate: judged by the share of traces put at risk.
    assert severity(_rec(None, 0.8, traces_affected=10), 100) == "high"
    assert severity(_rec(None, 0.8, traces_affected=9), 100) == "medium"
    assert severity(_rec(None, 0.8, traces_affected=1), 200) == "low"


def test_gate_spec_tokens() -> None:
    spec = GateSpec.parse(["medium", "lock_contention,fault-tolerance"])
    assert spec.min_severity == "medium" and spec.kinds == {"lock_contention"}
    assert spec.categories == {"fault_tolerance"}
    assert GateSpec.parse(["low,high"]).min_severity == "low"  # the broadest severity named wins
    low = _rec(0.01, 0.9, kind="serialized_calls")
    assert not spec.matches(low, 100)
    assert spec.matches({**low, "kind": "lock_contention"}, 100)
    assert spec.matches({**low, "category": "fault_tolerance"}, 100)
    assert spec.matches(_rec(0.5, 0.9), 100)  # high >= medium
    with pytest.raises(GateSpecError, match="unknown value 'seriallized_calls'"):
        GateSpec.parse(["seriallized_calls"])
    with pytest.raises(GateSpecError):
        GateSpec.parse([" , "])


# --------------------------------------------------------------------------- analyze --fail-on


def test_fail_on_kind_that_is_present_exits_3_and_names_it(n_plus_one_report: dict[str, Any]) -> None:
    expected = [r["id"] for r in n_plus_one_report["recommendations"] if r["kind"] == "n_plus_one"]
    assert expected, "the N+1 sample must yield an n_plus_one recommendation"
    proc = hourglass("analyze", N_PLUS_ONE, "--format", "json", "--fail-on", "n_plus_one")
    assert proc.returncode == GATE_EXIT_CODE, proc.stderr
    assert json.loads(proc.stdout)["recommendations"], "the report is still printed"
    assert "FAILED" in proc.stderr
    for rid in expected:
        assert rid in proc.stderr


def test_fail_on_absent_kind_passes(n_plus_one_report: dict[str, Any]) -> None:
    assert not any(r["kind"] == "fanout_straggler" for r in n_plus_one_report["recommendations"])
    proc = hourglass(
        "analyze", N_PLUS_ONE, "--format", "json", "--fail-on", "fanout_straggler,retry_without_backoff"
    )
    assert proc.returncode == 0, proc.stderr
    assert "passed" in proc.stderr


def test_fail_on_severity_agrees_with_the_rules(n_plus_one_report: dict[str, Any]) -> None:
    for level in ("low", "high"):
        expected = gate(n_plus_one_report, GateSpec.parse([level]))
        proc = hourglass("analyze", N_PLUS_ONE, "--format", "markdown", "--fail-on", level)
        assert proc.returncode == (GATE_EXIT_CODE if expected else 0), proc.stderr
        for match in expected:
            assert match.recommendation["id"] in proc.stderr
    # "low" is the floor: every recommendation matches it.
    assert len(gate(n_plus_one_report, GateSpec.parse(["low"]))) == len(n_plus_one_report["recommendations"])


def test_fail_on_typo_is_a_usage_error() -> None:
    proc = hourglass("analyze", N_PLUS_ONE, "--fail-on", "hgih")
    assert proc.returncode == 2
    assert "unknown value 'hgih'" in proc.stderr


# --------------------------------------------------------------------------- diff


def test_diff_reports_new_and_resolved_between_trace_sets(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    shutil.copy(SERIALIZED, candidate)
    shutil.copy(N_PLUS_ONE, candidate)

    forward = hourglass("diff", SERIALIZED, candidate, "--format", "json")
    assert forward.returncode == 0, forward.stderr
    result = json.loads(forward.stdout)
    assert result["schema"] == "hourglass.diff/v1"
    assert any(r["kind"] == "n_plus_one" for r in result["new"])
    assert not result["resolved"], "nothing of the baseline disappeared"
    assert result["base"]["traces_analyzed"] < result["candidate"]["traces_analyzed"]

    gated = hourglass("diff", SERIALIZED, candidate, "--fail-on", "n_plus_one")
    assert gated.returncode == GATE_EXIT_CODE, gated.stderr
    assert "NEW" in gated.stdout

    # A quoted glob names the same set of files as the folder.
    by_glob = hourglass("diff", SERIALIZED, str(candidate / "*.otlp.jsonl"), "--format", "json")
    assert by_glob.returncode == 0, by_glob.stderr
    assert {r["id"] for r in json.loads(by_glob.stdout)["new"]} == {r["id"] for r in result["new"]}
    no_match = hourglass("diff", SERIALIZED, str(candidate / "*.nothing"))
    assert no_match.returncode == 1 and "pattern matches no files" in no_match.stderr

    backward = hourglass("diff", candidate, SERIALIZED, "--format", "markdown", "--fail-on", "n_plus_one")
    assert backward.returncode == 0, backward.stderr
    assert "| resolved | n_plus_one |" in backward.stdout
    assert backward.stdout.startswith("## Hourglass diff")


def test_diff_of_the_same_spans_from_store_file_and_saved_report_is_empty(tmp_path: Path) -> None:
    store = tmp_path / "store.duckdb"
    imported = hourglass("import", "--db", store, N_PLUS_ONE)
    assert imported.returncode == 0, imported.stderr
    saved = tmp_path / "base-report.json"
    analysed = hourglass("analyze", N_PLUS_ONE, "--format", "json", "--output", saved)
    assert analysed.returncode == 0, analysed.stderr

    for base in (store, saved):
        proc = hourglass("diff", base, N_PLUS_ONE, "--format", "json", "--fail-on-new")
        assert proc.returncode == 0, f"{base.name}: {proc.stderr}"
        result = json.loads(proc.stdout)
        assert not result["new"] and not result["resolved"] and not result["grew"], base.name
        assert result["unchanged"], base.name


def test_diff_input_errors_name_the_input(tmp_path: Path) -> None:
    proc = hourglass("diff", tmp_path / "missing.jsonl", N_PLUS_ONE)
    assert proc.returncode == 1
    assert "missing.jsonl: no such file or folder" in proc.stderr
    proc = hourglass("diff", N_PLUS_ONE, N_PLUS_ONE, "--format", "yaml")
    assert proc.returncode == 2


@pytest.mark.slow
def test_diff_flags_a_lock_that_grew_under_more_load(tmp_path: Path) -> None:
    """The same ledger code replayed at 4 and then 12 concurrent clients: the journal lock's
    convoy gets longer, so its lock_contention recommendation is new or grew and the gate fails."""
    from hourglass.workload.generate import otlp_json_lines, record_scenario
    from hourglass.workload.scenarios import SCENARIOS_BY_NAME

    scenario = SCENARIOS_BY_NAME["lock_contention"]
    paths = {}
    for name, concurrency in (("base", 4), ("candidate", 12)):
        spans = record_scenario(dataclasses.replace(scenario, concurrency=concurrency), seed=11)
        paths[name] = tmp_path / f"{name}.otlp.jsonl"
        paths[name].write_text("".join(line + "\n" for line in otlp_json_lines(spans)))

    proc = hourglass("diff", paths["base"], paths["candidate"], "--format", "json", "--fail-on-new")
    assert proc.returncode == GATE_EXIT_CODE, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    regressed = [*result["new"], *result["grew"]]
    assert any(r["kind"] == "lock_contention" and r["service"] == "ledger" for r in regressed), json.dumps(
        result, indent=1
    )[:4000]
    text = hourglass("diff", paths["base"], paths["candidate"])
    assert text.returncode == 0
    assert "lock_contention at ledger" in text.stdout


def test_diff_growth_uses_normalised_measures() -> None:
    """Unit check of the documented thresholds: per-request p50 saving up 25 % and ≥ 2 ms."""

    def report(traces: int, p50: float, total: float, occurrences: int) -> dict[str, Any]:
        rec = {"id": "x", "kind": "lock_contention", "occurrences": occurrences, "traces_affected": occurrences,
               "impact": {"saved_ms_p50": p50, "saved_ms_total": total}}  # fmt: skip
        return {"traces_analyzed": traces, "recommendations": [rec]}

    assert diff_reports(report(100, 10, 1000, 50), report(100, 12.6, 1260, 50)).grew  # +26 %, +2.6 ms
    assert not diff_reports(report(100, 10, 1000, 50), report(100, 12.4, 1240, 50)).grew  # +24 %
    assert not diff_reports(report(100, 1, 100, 50), report(100, 1.9, 190, 50)).grew  # +90 % but < 2 ms/1 ms
    # Twice the traffic with the same per-request cost is not growth.
    assert diff_reports(report(100, 10, 1000, 50), report(200, 10, 2000, 100)).unchanged
    assert diff_reports(report(100, 10, 1000, 50), report(100, 5, 500, 50)).improved
