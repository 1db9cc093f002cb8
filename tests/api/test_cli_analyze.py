"""`hourglass analyze` through the real CLI (subprocess), on files and on a store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL_TRACES = ROOT.parent / "shared" / "real-traces"
SAMPLES = ROOT / "sample-traces"
HOURGLASS = Path(sys.executable).with_name("hourglass")
SIMPLE_DB = REAL_TRACES / "zipkin-v2__simple-db-p6.json"

pytestmark = pytest.mark.timeout(120)


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    return subprocess.run(
        [str(HOURGLASS), "analyze", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=cwd,
    )


@pytest.mark.skipif(not SIMPLE_DB.exists(), reason="shared real traces not present")
def test_three_back_to_back_inserts_are_a_near_miss_not_a_recommendation(tmp_path: Path) -> None:
    """Zipkin's simple-db trace: Hibernate inserts a book, a revision and the book's audit row
    (which carries the revision's id) one after another, once. One instance shows no independence,
    every insert takes inputs, and 2 ms is far below the weak-evidence floor: a near miss that says
    so, not a recommendation to run dependent inserts concurrently."""
    result = run(SIMPLE_DB, "--format", "json", "--explain", cwd=tmp_path)  # no store, no server
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema"] == "hourglass.report/v1" and report["spans_analyzed"] == 5
    assert report["recommendations"] == []
    (miss,) = [m for m in report["near_misses"] if m["kind"] == "serialized_calls"]
    assert (miss["service"], miss["operation"]) == ("bootifulmeters", "http:/book")
    assert "order fixed in 1 instances and 3 calls take inputs" in miss["reason"]
    assert not list(tmp_path.iterdir()), "analysing files must not create a store"


@pytest.mark.skipif(not REAL_TRACES.exists(), reason="shared real traces not present")
def test_all_real_trace_files_at_once_as_markdown() -> None:
    files = sorted(
        p
        for p in REAL_TRACES.iterdir()
        if p.suffix in (".json", ".jsonl", ".pb") and not p.name.startswith("invalid")
    )
    result = run(*files, "--format", "markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("## Hourglass: ")
    assert "traces and" in result.stdout and "spans analysed" in result.stdout


def test_table_output_on_a_sample_workload() -> None:
    result = run(SAMPLES / "n_plus_one.otlp.jsonl", "--format", "table")
    assert result.returncode == 0, result.stderr
    assert "Saved p50 / p95" in result.stdout and "Batch the" in result.stdout


def test_store_and_filters(tmp_path: Path) -> None:
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.files import read_trace_files

    db = tmp_path / "spans.duckdb"
    store = DuckDBSpanStore(str(db))
    try:
        for table in read_trace_files([str(SAMPLES / "serialized_calls.otlp.jsonl")], on_error=print):
            store.write(table)
    finally:
        store.close()
    result = run("--db", db, "--format", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert any(r["kind"] == "serialized_calls" for r in report["recommendations"])
    only_other = json.loads(run("--db", db, "--service", "no-such-service", "--format", "json").stdout)
    assert only_other["traces_analyzed"] == 0
    future = json.loads(run("--db", db, "--since", "2999-01-01T00:00:00Z", "--format", "json").stdout)
    assert future["traces_analyzed"] == 0
    recent = run("--db", db, "--since", "15m", "--format", "json")
    assert recent.returncode == 0, recent.stderr


def test_a_bad_record_is_named_and_the_good_data_still_analysed(tmp_path: Path) -> None:
    lines = (SAMPLES / "n_plus_one.otlp.jsonl").read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        "\n".join(
            [lines[0], '{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": 5}]}]}]}', *lines[1:]]
        )
        + "\n"
    )
    result = run(broken, "--format", "json")
    assert result.returncode == 2
    assert f"{broken}:2" in result.stderr  # file and line
    report = json.loads(result.stdout)
    assert any(r["kind"] == "n_plus_one" for r in report["recommendations"])


def test_command_line_errors_exit_non_zero_with_a_reason(tmp_path: Path) -> None:
    missing = run(tmp_path / "nope.json")
    assert missing.returncode == 2 and "nope.json: no such file" in missing.stderr
    bad_since = run(SAMPLES / "n_plus_one.otlp.jsonl", "--since", "yesterday-ish")
    assert bad_since.returncode == 2 and "--since 'yesterday-ish'" in bad_since.stderr
    no_store = run("--db", tmp_path / "absent.duckdb")
    assert no_store.returncode == 2 and "no such store" in no_store.stderr
    both = run(SAMPLES / "n_plus_one.otlp.jsonl", "--db", tmp_path / "x.duckdb")
    assert both.returncode == 2 and "not both" in both.stderr
    bad_format = run(SAMPLES / "n_plus_one.otlp.jsonl", "--format", "yaml")
    assert bad_format.returncode == 2


def test_explain_prints_near_misses_in_every_format() -> None:
    """The retry sample: one planted retry storm is reported; the healthy twins (retries with a
    real delay, failures a fallback contains) are near misses with their reasons."""
    sample = SAMPLES / "retry_without_backoff.otlp.jsonl"
    plain = run(sample, "--format", "json")
    explained = run(sample, "--format", "json", "--explain")
    assert plain.returncode == 0 and explained.returncode == 0, explained.stderr
    report, with_misses = json.loads(plain.stdout), json.loads(explained.stdout)
    assert "near_misses" not in report
    assert [r["id"] for r in with_misses["recommendations"]] == [r["id"] for r in report["recommendations"]]
    misses = with_misses["near_misses"]
    assert with_misses["near_misses_omitted"] == 0
    retry = [m for m in misses if m["kind"] == "retry_without_backoff"]
    assert retry and retry[0]["service"] == "storefront" and "too few to judge growth" in retry[0]["reason"]
    assert retry[0]["traces"] > 0 and retry[0]["trace_ids"]
    assert any(m["kind"] == "error_propagation" and "< 2" in m["reason"] for m in misses)

    markdown = run(sample, "--format", "markdown", "--explain")
    assert markdown.returncode == 0, markdown.stderr
    assert "## Seen and not reported:" in markdown.stdout and "too few to judge growth" in markdown.stdout
    table = run(sample, "--format", "table", "--explain")
    assert table.returncode == 0, table.stderr
    text = " ".join(table.stdout.split())
    assert table.stdout.index("Saved p50 / p95") < table.stdout.index("Seen and not reported")
    assert "retry_without_backoff" in text and "too few to judge" in text


def _imported_modules(*args: str | Path, cwd: Path) -> set[str]:
    """The modules ``python -m hourglass ARGS`` imports (``-X importtime`` lists every one)."""
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hourglass", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }


# Start-up that `analyze --format json` does not use (issue 11): the Anthropic SDK, pandas (pulled in
# by pyarrow's acero and to_numpy, and by its first conversion of Python values; its refused first
# import is listed too, so a real one is told by its core), the web app, rich (the table format's).
NOT_FOR_JSON = (
    "anthropic",
    "pandas.core.frame",
    "pyarrow.acero",
    "fastapi",
    "rich.console",
    "hourglass.api.analysis_service",
)


def test_json_analysis_imports_nothing_it_does_not_use(tmp_path: Path) -> None:
    sample = SAMPLES / "n_plus_one.otlp.jsonl"
    from_file = _imported_modules(
        "analyze", sample, "--format", "json", "-o", tmp_path / "a.json", cwd=tmp_path
    )
    assert "hourglass.analysis.pipeline" in from_file  # the listing works
    # (pyarrow's first conversion of Python values, in the decoders, imported pandas: 0.25 s; the
    # orphan count joins the files' ids in pyarrow's acero)
    assert not from_file & {*NOT_FOR_JSON} - {"pyarrow.acero"}
    db = tmp_path / "spans.duckdb"
    imported = subprocess.run(
        [str(HOURGLASS), "import", str(sample), "--db", str(db)], capture_output=True, text=True, timeout=110
    )
    assert imported.returncode == 0, imported.stderr
    from_store = _imported_modules(
        "analyze", "--db", db, "--format", "json", "-o", tmp_path / "b.json", cwd=tmp_path
    )
    # nor the trace-file readers to read a store
    assert not from_store & {*NOT_FOR_JSON, "hourglass.collector.files"}
    assert (
        json.loads((tmp_path / "a.json").read_text())["recommendations"]
        == json.loads((tmp_path / "b.json").read_text())["recommendations"]
    )


def test_pyarrow_is_shown_no_pandas_until_pandas_is_asked_for() -> None:
    """The span schema's module makes pyarrow's one look for pandas with pandas refused to that
    thread: converting Python values no longer imports it, and ``to_pandas`` still works."""
    probe = (
        "import sys, hourglass.collector.schema, pyarrow as pa\n"
        "pa.array(['a', None]); pa.table({'n': [1, 2]})\n"
        "print('pandas' in sys.modules)\n"
        "print(type(pa.table({'n': [1, 2]}).to_pandas()).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "DataFrame"]


def test_the_command_line_loads_no_analysis_before_a_command_runs() -> None:
    """``import hourglass.cli`` (every command registered) imports neither polars, pyarrow nor
    numpy: ``analyze --db`` reads the store's size and starts its worker processes before it
    imports the analysis, so the workers' start-up and this process' imports overlap."""
    probe = "import sys, hourglass.cli; print(sorted({'polars', 'pyarrow', 'numpy'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
