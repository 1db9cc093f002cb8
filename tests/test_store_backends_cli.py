"""The same report from DuckDB and embedded ClickHouse (chdb) on the labelled sample traces,
through the real CLI as a process: ``hourglass import --db X FILES`` then ``hourglass analyze --db X``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hourglass.workload.labels import check_report, load_labels

pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample-traces"
HOURGLASS = Path(sys.executable).with_name("hourglass")


def _run(*args: str) -> str:
    proc = subprocess.run([str(HOURGLASS), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"hourglass {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


def _report(db: str, files: list[str]) -> dict[str, Any]:
    imported = json.loads(_run("import", "--db", db, *files, "--format", "json"))
    assert imported["skipped_spans"] == 0 and not imported["failed_files"]
    return _analyzed(db)


def _analyzed(db: str, *options: str) -> dict[str, Any]:
    report = json.loads(_run("analyze", "--db", db, "--format", "json", *options))
    report.pop("generated_at")
    return report


@pytest.mark.slow
def test_duckdb_and_chdb_give_the_same_report_on_the_sample_traces(tmp_path: Path) -> None:
    files = sorted(str(p) for p in SAMPLES.glob("*.otlp.jsonl"))
    assert files
    duck = _report(str(tmp_path / "spans.duckdb"), files)
    click = _report(f"chdb:{tmp_path / 'spans.chdb'}", files)
    assert click["spans_analyzed"] == duck["spans_analyzed"] > 0
    assert click["recommendations"], "the sample traces hold known bottlenecks"
    assert click == duck
    # in partitions (an embedded ClickHouse store is opened once per process: the partitions'
    # reads and the services' trace read take turns, none beside another)
    assert _analyzed(f"chdb:{tmp_path / 'spans.chdb'}", "--partitions", "3") == duck
    # and the report from the ClickHouse store finds what each scenario's labels require
    for labels_path in sorted(SAMPLES.glob("*.labels.json")):
        check = check_report(labels_path.name, load_labels(labels_path), click)
        assert not check.missed, f"{labels_path.name}: missed {check.missed}"


@pytest.mark.slow
def test_an_endpoints_questions_over_a_chdb_store_too_large_for_one_context(tmp_path: Path) -> None:
    """`critical-path` and `whatif --service/--operation` over an embedded ClickHouse store whose
    spans one context does not hold under the budget read the endpoint's traces by their ids
    (the store names them), and answer as the store at once does."""
    db = f"chdb:{tmp_path / 'spans.chdb'}"
    _run("import", "--db", db, *sorted(str(p) for p in SAMPLES.glob("*.otlp.jsonl")))
    endpoint = ("--service", "ledger", "--operation", "POST /accounts/{account_id}/transfers")
    budget = {"HOURGLASS_MEMORY_BUDGET": str(200 * 2**20 + 1_000 * 2_000)}  # (1,000 spans at once)
    for question in (
        ("critical-path", "--db", db, *endpoint, "--format", "json"),
        ("whatif", "--db", db, *endpoint, "--speedup", "ledger:*=0.5", "--format", "json"),
    ):
        at_once = json.loads(_run(*question))
        asked = subprocess.run(
            [str(HOURGLASS), *question],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("HOURGLASS_")}, **budget},
        )
        assert asked.returncode == 0, asked.stderr
        assert "asked over the 48 traces with a span ledger:POST" in asked.stderr, asked.stderr
        assert json.loads(asked.stdout) == at_once


def _asked(question: tuple[str, ...], budget: int) -> subprocess.CompletedProcess[str]:
    """``hourglass QUESTION`` as a process under a memory budget of ``budget`` bytes."""
    return subprocess.run(
        [str(HOURGLASS), *question],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("HOURGLASS_")},
            "HOURGLASS_MEMORY_BUDGET": str(budget),
        },
    )


@pytest.mark.slow
def test_a_chdb_store_is_analysed_at_once_only_when_its_read_fits_beside_the_analysis(tmp_path: Path) -> None:
    """An embedded ClickHouse holds its read of the spans in the analysing process beside their
    analysis: a store whose spans fit the budget once but not twice is analysed in partitions
    (planned at once, 250k spans peaked at 1.31 GiB under a 0.78 GiB budget), the same report."""
    from bench.analysis import generate_spans
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES
    from hourglass.collector.clickhouse_store import ClickHouseSpanStore

    path = tmp_path / "spans.chdb"
    store = ClickHouseSpanStore.embedded(str(path))
    try:
        store.write(generate_spans(120_000))  # (the benchmark's mixed shapes)
        spans = store.raw_row_count()
    finally:
        store.close()
    db = f"chdb:{path}"
    budget = PROCESS_BASE_BYTES + spans * PEAK_BYTES_PER_SPAN * 3 // 2  # (once, not twice)
    asked = _asked(("analyze", "--db", db, "--format", "json"), budget)
    assert asked.returncode == 0, asked.stderr
    assert f"{spans:,} spans in " in asked.stderr and " partitions of whole traces" in asked.stderr, (
        asked.stderr
    )
    report = json.loads(asked.stdout)
    report.pop("generated_at")
    assert report == _analyzed(db)


def test_a_whole_window_whatif_over_a_chdb_store_re_times_only_the_touched_traces(tmp_path: Path) -> None:
    """`whatif --db chdb:...` of every trace of a window one context does not hold re-times only
    the traces its change touches (``ClickHouseSpanStore.window_roots``: the others keep their
    roots' durations), and `critical-path` without an endpoint lists the endpoints from the same
    aggregation: the answers of the store at once."""
    db = f"chdb:{tmp_path / 'spans.chdb'}"
    _run("import", "--db", db, *sorted(str(p) for p in SAMPLES.glob("*.otlp.jsonl")))
    budget = 200 * 2**20 + 1_000 * 2_000  # (1,000 spans at once)
    question = (
        "whatif",
        "--db",
        db,
        "--speedup",
        "ledger:POST /accounts/{account_id}/transfers=0.5",
        "--format",
        "json",
    )
    at_once = json.loads(_run(*question))
    asked = _asked(question, budget)
    assert asked.returncode == 0, asked.stderr
    assert "traces the changes touch; the other" in asked.stderr, asked.stderr
    assert json.loads(asked.stdout) == at_once
    listing = _asked(("critical-path", "--db", db), budget)
    assert listing.returncode == 2 and "counted by their roots" in listing.stderr, listing.stderr
    assert "--service 'ledger' --operation 'POST /accounts/{account_id}/transfers'" in listing.stderr
