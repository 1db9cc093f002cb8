"""`hourglass import` through the real console script, as a user runs it."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.files import TraceFileReader

REAL_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "real-traces"
INVALID_FILE = "invalid__otlp-json-mixed-id-encoding.json"
HOURGLASS = str(Path(sys.executable).with_name("hourglass"))

pytestmark = pytest.mark.timeout(120)


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HOURGLASS, "import", *args], capture_output=True, text=True, timeout=90, cwd=cwd)


def trace_files() -> list[Path]:
    return sorted(p for p in REAL_TRACES.iterdir() if p.name != "README.md")


def readme_spans() -> dict[str, int]:
    spans = {}
    for line in (REAL_TRACES / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and "__" in cells[0]:
            spans[cells[0]] = int(cells[3].split("/")[1])
    return spans


def distinct_spans(paths: list[Path]) -> tuple[int, int]:
    """(distinct (trace, span) ids, distinct traces) the files hold, read in-process."""
    ids: set[tuple[str, str]] = set()
    for table in TraceFileReader(on_problem=lambda p: None).read(paths):
        ids.update(
            zip(table.column("trace_id").to_pylist(), table.column("span_id").to_pylist(), strict=True)
        )
    return len(ids), len({t for t, _ in ids})


def test_every_real_file_through_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "store.duckdb"
    files = trace_files()
    result = run("--db", str(db), "--format", "json", *map(str, files), cwd=tmp_path)
    assert result.returncode == 2, result.stderr  # the invalid file's span was skipped
    summary = json.loads(result.stdout)
    expected = readme_spans()
    per_file = {Path(r["file"]).name: r for r in summary["per_file"]}
    for name, spans in expected.items():
        if name == INVALID_FILE:
            assert per_file[name]["spans"] == 0 and per_file[name]["skipped_spans"] == spans
        else:
            assert per_file[name]["spans"] == spans, name
            assert per_file[name]["skipped_spans"] == 0 and not per_file[name]["failed"], name
    assert summary["spans"] == sum(expected.values()) - expected[INVALID_FILE]
    assert summary["files_with_problems"] == [str(REAL_TRACES / INVALID_FILE)]
    assert (
        f"{REAL_TRACES / INVALID_FILE}:resourceSpans[0].scopeSpans[0].spans[0].traceId: 'zzz'"
        in result.stderr
    )
    # what is stored: every distinct span once (the same spans appear in several files)
    spans, traces = distinct_spans(files)
    assert summary["store"] == {"spans": spans, "traces": traces}
    with DuckDBSpanStore(str(db)) as store:
        assert (store.stats().spans, store.stats().traces) == (spans, traces)
        trace = store.trace("0df84e36b9e2ee3815d07f0867a5be1f")  # the 31-character Jaeger trace id
        assert trace.num_rows == 17


def test_clean_import_of_gzipped_files_and_folders_exits_0(tmp_path: Path) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    for name in (
        "zipkin-v2__skew.json",
        "otlp-jsonl__otlp2parquet-traces.jsonl",
        "otlp-proto__otlp2parquet-trace.pb",
    ):
        (folder / f"{name}.gz").write_bytes(gzip.compress((REAL_TRACES / name).read_bytes()))
    shutil.copy(REAL_TRACES / "README.md", folder / "README.md")  # not a trace: ignored with a warning
    jaeger = tmp_path / "jaeger-download.json"
    shutil.copy(REAL_TRACES / "jaeger-json__petclinic-child-longer-than-parent.json", jaeger)
    db = tmp_path / "clean.duckdb"
    result = run("--db", str(db), str(folder), str(jaeger), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Imported 33 spans in 22 traces from 4 of 5 files" in result.stdout
    assert "The store now holds 33 spans in 22 traces." in result.stdout
    assert "README.md: warning: not a trace file" in result.stderr
    # importing the same files again stores nothing new and says so
    again = run("--db", str(db), str(folder), str(jaeger), cwd=tmp_path)
    assert again.returncode == 0
    assert "The store now holds 33 spans in 22 traces (0 new; 33 were already stored" in again.stdout


def test_bad_files_are_named_with_positions_and_good_data_kept(tmp_path: Path) -> None:
    lines = (REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_text().splitlines()
    jsonl = tmp_path / "collector-export.jsonl"
    jsonl.write_text("\n".join([lines[0], "{not json", lines[1]]) + "\n")
    missing = tmp_path / "missing.json"
    db = tmp_path / "db.duckdb"
    result = run("--db", str(db), str(jsonl), str(missing), str(REAL_TRACES / INVALID_FILE), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{jsonl}:2:2: invalid JSON" in result.stderr
    assert f"{missing}: No such file or directory" in result.stderr
    assert f"{REAL_TRACES / INVALID_FILE}:resourceSpans[0].scopeSpans[0].spans[0].traceId" in result.stderr
    assert "Imported 2 spans in 2 traces from 2 of 3 files" in result.stdout
    assert "Skipped: 2 span/records and 1 unreadable file" in result.stdout
    with DuckDBSpanStore(str(db)) as store:
        assert store.stats().spans == 2


def test_store_that_cannot_be_opened_exits_1(tmp_path: Path) -> None:
    result = run("--db", str(tmp_path), str(REAL_TRACES / "zipkin-v2__skew.json"), cwd=tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path}: cannot open the store" in result.stderr


def test_db_default_comes_from_settings(tmp_path: Path) -> None:
    env_db = tmp_path / "from-env.duckdb"
    result = subprocess.run(
        [HOURGLASS, "import", str(REAL_TRACES / "zipkin-v2__simple-db-p6.json")],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOURGLASS_DB": str(env_db)},
    )
    assert result.returncode == 0, result.stderr
    assert env_db.exists() and f"into {env_db}" in result.stdout


def test_follows_from_and_shared_zipkin_spans_reach_the_store(tmp_path: Path) -> None:
    jaeger = json.loads((REAL_TRACES / "jaeger-json__petclinic-child-longer-than-parent.json").read_text())
    child = jaeger["spans"][0]
    child["references"] = [
        {"refType": "FOLLOWS_FROM", **{k: v for k, v in child["references"][0].items() if k != "refType"}}
    ]
    jaeger_path = tmp_path / "follows-from.json"
    jaeger_path.write_text(json.dumps(jaeger))
    db = tmp_path / "db.duckdb"
    result = run("--db", str(db), str(jaeger_path), str(REAL_TRACES / "zipkin-v2__skew.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with DuckDBSpanStore(str(db)) as store:
        rows = store.trace("9ced30503c58dab894a2d7598b01a87a").to_pylist()
        follows = {r["span_id"]: r["follows_from"] for r in rows}
        assert follows.pop(child["spanID"].rjust(16, "0")) is True and not any(follows.values())
        skew = store.trace("00000000000000001e223ff1f80f1c69").to_pylist()
        assert len(skew) == 4  # the client and server halves of the shared span are both kept
        assert sorted(r["kind"] for r in skew if r["name"] == "post") == [2, 3]


def test_standard_input(tmp_path: Path) -> None:
    db = tmp_path / "stdin.duckdb"
    result = subprocess.run(
        [HOURGLASS, "import", "--db", str(db), "-"],
        input=gzip.compress((REAL_TRACES / "zipkin-v2__messaging-kafka.json").read_bytes()),
        capture_output=True,
        timeout=90,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert b"Imported 28 spans in 1 trace from 1 of 1 file" in result.stdout
