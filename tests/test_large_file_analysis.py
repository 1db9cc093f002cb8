"""`hourglass analyze FILE...` under the memory budget: an input of more spans than the budget
analyses at once is written to a temporary span store as it is read and analysed in partitions of
whole traces, as a store is (`--partitions` 2 or more sends any input that way). The report, the
input warnings (bad records, spans whose parent is in none of the files, copies across files) and
the exit code are the same as the analysis in memory; the temporary store is removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from hourglass.analysis import planning
from hourglass.cli.analyze import StoreRun, _at_once_spans
from hourglass.collector.problem_summary import ProblemSummary, note_missing_parents, note_missing_parents_in
from tests.api.test_input_warnings import _jaeger_file
from tests.builders import TraceBuilder, spans_table
from tests.cli import otlp_json, otlp_span

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-traces"


def _analyze(files: list[Path], tmp: Path, *more: str) -> subprocess.CompletedProcess[str]:
    tmp.mkdir(exist_ok=True)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hourglass",
            "analyze",
            *map(str, files),
            "--format",
            "json",
            "--explain",
            *more,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TMPDIR": str(tmp)},
    )


def _hourglass(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hourglass", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def _report(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(proc.stdout)
    report.pop("generated_at", None)
    return report


def test_files_through_a_temporary_store_give_the_same_report_and_warnings(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = [SAMPLES / f"{kind}.otlp.jsonl" for kind in ("n_plus_one", "serialized_calls", "lock_contention")]
    # the same spans delivered twice (a second export of one file), bad records, orphans
    copy = shutil.copy(files[0], inputs / "again.otlp.jsonl")
    bad = _jaeger_file(inputs / "bad.json", bad=30, good=4)
    orphans = inputs / "orphans.json"
    orphans.write_text(
        json.dumps(otlp_json({"lost": [otlp_span(7, i, f"child {i}", 3, i, i + 5) for i in range(1, 9)]}))
    )
    every = [*files, Path(copy), bad, orphans]
    at_once = _analyze(every, tmp_path / "t1")
    spilled = _analyze(every, tmp_path / "t2", "--partitions", "3")
    assert at_once.returncode == spilled.returncode == 2, spilled.stderr  # (records were skipped)
    assert "written to a temporary span store" in spilled.stderr
    assert "in 3 partitions of whole traces" in spilled.stderr
    expected = _report(at_once)
    assert expected["recommendations"] and {w["source"] for w in expected["input_warnings"]} >= {
        str(bad),
        str(orphans),
    }
    assert _report(spilled) == expected
    told = [line for line in spilled.stderr.splitlines() if "temporary span store" not in line]
    assert [line for line in told if "partitions of whole traces" not in line] == at_once.stderr.splitlines()
    assert not list((tmp_path / "t2").glob("hourglass-*"))  # the store and the run's files removed


def test_the_files_held_at_once_are_what_a_store_analyses_in_one_partition() -> None:
    for budget in (int(1.5 * 2**30), 3 * 2**30, 800 * 2**20):
        run = StoreRun(budget=budget, workers=2)
        most = _at_once_spans(run)
        assert planning.plan(most, budget, 2).parts == 1
        assert planning.plan(most + 1, budget, 2).parts > 1
    assert _at_once_spans(StoreRun(budget=3 * 2**30, workers=2, partitions=2)) == 0


def test_missing_parents_told_from_duckdb_as_from_memory() -> None:
    front = TraceBuilder(service="front")
    root = front.span("GET /", start_ms=0, dur_ms=10)
    back = TraceBuilder(service="back", trace_id=front.trace_id)
    back.span("handle", parent=root, start_ms=1, dur_ms=5)
    lost = TraceBuilder(service="lost")
    for i in range(9):
        lost.span(f"orphan {i}", parent=f"{0xBEEF00 + i:016x}", start_ms=1, dur_ms=2)
    files = [
        ("front.json", [spans_table(front)]),
        ("back.json", [spans_table(back), spans_table(lost)]),
        ("copy.json", [spans_table(lost)]),  # the same orphans again, in another file
    ]
    with duckdb.connect() as db:
        db.execute(
            "CREATE TABLE origins (source INTEGER, trace_id VARCHAR, span_id VARCHAR, parent_span_id VARCHAR)"
        )
        for source, (_, tables) in enumerate(files):
            for table in tables:
                ids = table.select(["trace_id", "span_id", "parent_span_id"]).append_column(
                    "source", pa.array([source] * table.num_rows, pa.int32())
                )
                db.register("ids", ids)
                db.execute("INSERT INTO origins SELECT source, trace_id, span_id, parent_span_id FROM ids")
                db.unregister("ids")
        for keep_all in (False, True):
            memory, stored = ProblemSummary(keep_all=keep_all), ProblemSummary(keep_all=keep_all)
            assert note_missing_parents(memory, files) == 18
            assert note_missing_parents_in(stored, [name for name, _ in files], db) == 18
            assert [k.as_json() for k in stored.kinds()] == [k.as_json() for k in memory.kinds()]
            assert [(k.source, k.count) for k in stored.kinds()] == [("back.json", 9), ("copy.json", 9)]


@pytest.mark.slow
def test_an_input_over_the_budget_is_analysed_in_partitions_by_analyze_and_report(tmp_path: Path) -> None:
    """No option needed: a file of more spans than the memory budget analyses at once goes through
    the temporary store, in `analyze` and in `report`, with the report of the whole file at once."""
    from bench.analysis import build_store
    from bench.files_scaling import export_store

    store = tmp_path / "spans.duckdb"
    build_store(store, 150_000)
    trace_file = tmp_path / "spans.binpb"
    export_store(store, trace_file)
    reports: dict[str, dict[str, Any]] = {}
    for budget in ("450MB", "64GiB"):  # ~131k spans at once, then all of them
        env = {**os.environ, "TMPDIR": str(tmp_path), "HOURGLASS_MEMORY_BUDGET": budget}
        for command in ("analyze", "report"):
            proc = _hourglass(env, command, str(trace_file), "--format", "json")
            assert proc.returncode == 0, proc.stderr
            spilled = f"hourglass {command}: the files are written to a temporary span store" in proc.stderr
            assert spilled == (budget == "450MB"), proc.stderr
            reports[f"{command} {budget}"] = _report(proc)
    # diff of the file against itself, both sides in partitions: nothing new, nothing gone
    env = {**os.environ, "TMPDIR": str(tmp_path), "HOURGLASS_MEMORY_BUDGET": "450MB"}
    diff = _hourglass(env, "diff", str(trace_file), str(trace_file), "--format", "json")
    assert diff.returncode == 0, diff.stderr
    assert diff.stderr.count("hourglass diff: the files are written to a temporary span store") == 2
    compared = json.loads(diff.stdout)
    assert not compared["new"] and not compared["resolved"] and not compared["grew"] and compared["unchanged"]
    whole = reports["analyze 64GiB"]
    assert len(whole["recommendations"]) >= 5 and whole["spans_analyzed"] > 140_000
    assert reports["analyze 450MB"] == whole
    assert reports["report 450MB"] == reports["report 64GiB"]
    assert not list(tmp_path.glob("hourglass-*"))


def test_diff_summarises_bad_records_as_analyze_does(tmp_path: Path) -> None:
    bad = _jaeger_file(tmp_path / "bad.json", bad=300, good=10)
    proc = subprocess.run(
        [sys.executable, "-m", "hourglass", "diff", str(bad), str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "startTime" in line]
    assert len(lines) == 2 and all(line.startswith(f"hourglass diff: {bad}: 300 skipped: ") for line in lines)
