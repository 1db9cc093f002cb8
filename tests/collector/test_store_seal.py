"""What a clean close keeps for the next open of the store (``DuckDBSpanStore._seal``): the
removals epoch and marks the incremental analysis' per-trace tally is valid against, the kept
counts, the traces' ingest ranges and what compaction has yet to examine. Taken up only when the
rows are those it described, removed by the next read-write open either way (a run that then
stops without a clean close leaves none), and never by a read-only open."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from hourglass.collector.duckdb_store import _SEAL, _SEAL_RANGES, DuckDBSpanStore
from hourglass.collector.store import StoreStats
from tests.collector.test_store_reopen import SECOND, T0, _rows

pytestmark = pytest.mark.timeout(120)


def _figures(store: DuckDBSpanStore) -> dict[str, Any]:
    ranges = store._trace_ranges
    return {
        "epoch": store._removals_epoch,
        "removals": store._removals,
        "removals_since": list(store._removals_since),
        "retention": store.retention_cutoff_ns,
        "counts": list(store._counts),
        "dirty": (store._dirty, store._dirty_since_ns),
        "ranges": None
        if ranges is None
        else (
            ranges.base_s,
            ranges.bound,
            [(r.keys.tolist(), r.first.tolist(), r.last.tolist()) for r in ranges.runs],
        ),
    }


def _recount(store: DuckDBSpanStore) -> StoreStats:
    spans, traces = (
        store._cursor()
        .execute("SELECT count(DISTINCT (trace_id, span_id)), count(DISTINCT trace_id) FROM spans")
        .fetchall()[0]
    )
    return StoreStats(spans=int(spans), traces=int(traces))


def _sealed(path: Path) -> set[str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()} & {
            _SEAL,
            _SEAL_RANGES,
        }


def _used_store(path: Path) -> dict[str, Any]:
    """A store written, counted, compacted and retained, then closed: its figures at the close."""
    store = DuckDBSpanStore(str(path))
    store.write(_rows(1, 40, ingested_ns=T0))
    store.write(_rows(100, 30, ingested_ns=T0 + 10 * SECOND))
    store.stats()
    store.write(_rows(5, 2, ingested_ns=T0 + 20 * SECOND))  # copies: compacted below
    store.write(_rows(200, 10, ingested_ns=T0 + 30 * SECOND))
    assert store.compact() == 6
    store.delete_older_than(T0 + 1000 * 10)  # (the first traces' spans all end before it)
    store.stats()
    figures = _figures(store)
    assert figures["counts"] and figures["ranges"] is not None and figures["removals"] >= 1
    assert figures["retention"] is not None and len(figures["ranges"][2][0][0]) > 0
    store.close()
    return figures


def test_a_clean_close_keeps_the_figures_for_the_next_open(tmp_path: Path) -> None:
    path = tmp_path / "spans.duckdb"
    before = _used_store(path)
    assert _sealed(path) == {_SEAL, _SEAL_RANGES}
    with DuckDBSpanStore(str(path), read_only=True) as reader:  # (a reader leaves it where it is)
        assert reader._counts == []
    assert _sealed(path) == {_SEAL, _SEAL_RANGES}
    store = DuckDBSpanStore(str(path))
    try:
        assert _sealed_open(store) == set()  # taken out at once: a crash from here leaves none
        assert _figures(store) == before
        assert store.stats() == _recount(store)
        # and the figures go on as if the store had never been closed
        store.write(_rows(300, 5, ingested_ns=T0 + 40 * SECOND))
        store.write(_rows(101, 1, ingested_ns=T0 + 41 * SECOND))  # a copy below a kept bound
        assert store.stats() == _recount(store)
        assert store.compact() == 3
        assert store.stats() == _recount(store)
        assert store.trace(f"{300:032x}").num_rows == 3
    finally:
        store.close()


def _sealed_open(store: DuckDBSpanStore) -> set[str]:
    rows = store._cursor().execute("SELECT table_name FROM duckdb_tables()").fetchall()
    return {r[0] for r in rows} & {_SEAL, _SEAL_RANGES}


@pytest.mark.parametrize("change", ["insert", "delete"])
def test_rows_changed_while_the_store_was_closed_are_counted_again(
    tmp_path: Path, change: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.duckdb"
    before = _used_store(path)
    with duckdb.connect(str(path)) as con:  # another tool, with the store closed
        if change == "insert":
            con.register("more", _rows(400, 1, ingested_ns=T0 + 35 * SECOND))
            con.execute("INSERT INTO spans SELECT * FROM more")
        else:
            con.execute("DELETE FROM spans WHERE trace_id = ?", [f"{120:032x}"])
    with caplog.at_level(logging.INFO, logger="hourglass.store"):
        store = DuckDBSpanStore(str(path))
    try:
        assert "changed since it was closed" in caplog.text
        now = _figures(store)
        assert now["epoch"] != before["epoch"] and now["counts"] == [] and now["ranges"] is None
        assert now["dirty"] == (True, None)  # every trace compacted again
        assert _sealed_open(store) == set()
        assert store.stats() == _recount(store)
    finally:
        store.close()


def test_a_run_that_stops_without_closing_leaves_no_figures(tmp_path: Path) -> None:
    path = tmp_path / "spans.duckdb"
    before = _used_store(path)
    child = (
        "import os, sys\n"
        "from hourglass.collector.duckdb_store import DuckDBSpanStore\n"
        "store = DuckDBSpanStore(sys.argv[1])\n"
        "os._exit(0)\n"  # killed: no close
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", child, str(path)], cwd=root, timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr
    store = DuckDBSpanStore(str(path))
    try:
        now = _figures(store)
        assert now["epoch"] != before["epoch"] and now["counts"] == [] and now["ranges"] is None
        assert store.stats() == _recount(store)
    finally:
        store.close()


def test_an_unreadable_seal_is_dropped_and_the_store_counted_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spans.duckdb"
    before = _used_store(path)
    with duckdb.connect(str(path)) as con:
        con.execute(f"UPDATE {_SEAL} SET state = '{{not json'")
    with caplog.at_level(logging.WARNING, logger="hourglass.store"):
        store = DuckDBSpanStore(str(path))
    try:
        assert "unreadable" in caplog.text
        assert _figures(store)["epoch"] != before["epoch"] and _sealed_open(store) == set()
        assert store.stats() == _recount(store)
    finally:
        store.close()


def test_ranges_that_are_not_sorted_runs_are_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "spans.duckdb"
    before = _used_store(path)
    with duckdb.connect(str(path)) as con:
        con.execute(f"UPDATE {_SEAL_RANGES} SET h = 7")  # every hash the same
    store = DuckDBSpanStore(str(path))
    try:
        now = _figures(store)
        assert now["epoch"] != before["epoch"] and now["ranges"] is None and now["counts"] == []
        assert store.stats() == _recount(store)
    finally:
        store.close()


def test_an_empty_store_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "spans.duckdb"
    DuckDBSpanStore(str(path)).close()
    with DuckDBSpanStore(str(path)) as store:
        assert store.stats() == StoreStats(spans=0, traces=0)
        store.write(pa.concat_tables([_rows(1, 2)]))
        assert store.stats() == StoreStats(spans=6, traces=2)
