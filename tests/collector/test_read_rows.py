"""Which way a DuckDB store's read orders its rows: Arrow's sort after an unordered read where it
costs less (one DuckDB thread, columns that fit one Arrow array), DuckDB's ORDER BY elsewhere;
the rows the same either way."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector import duckdb_store
from hourglass.collector.duckdb_store import DuckDBSpanStore
from tests.builders import BASE_NS, TraceBuilder, spans_table

MS = 1_000_000
COLUMNS = ("trace_id", "span_id", "start_ns", "name", "db_statement")


def _write(store: DuckDBSpanStore) -> list[dict[str, object]]:
    builders = []
    for i in range(9):
        b = TraceBuilder(service="frontend", base_ns=BASE_NS + (i % 3) * MS)
        root = b.span("GET /", start_ms=0, dur_ms=50)
        for k in range(4):
            b.span(f"call {k}", parent=root, start_ms=5 + k // 2, dur_ms=3, service="db")
        builders.append(b)
    table = spans_table(builders)
    rows = table.to_pylist()
    store.write(pa.Table.from_pylist(list(reversed(rows)), schema=table.schema))
    ordered = sorted(rows, key=lambda r: (r["trace_id"], r["start_ns"], r["span_id"]))
    return [{c: r[c] for c in COLUMNS} for r in ordered]


def _sorted_here(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = duckdb_store._in_order

    def counted(rows: pa.Table, *args: object, **kwargs: object) -> pa.Table:
        calls.append(rows.num_rows)
        return real(rows, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(duckdb_store, "_in_order", counted)
    return calls


@pytest.mark.parametrize(("threads", "read_only"), [(1, True), (2, True), (1, False)])
def test_arrow_sorts_only_read_only_reads_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int, read_only: bool
) -> None:
    """A partition's task (a read-only open on one thread) sorts its rows with Arrow. On several
    threads DuckDB's ORDER BY sorts in parallel (faster in wall time: a whole-store read of
    ``analyze`` in one process, ``report``, ``diff``); a store that is written (serve's) keeps
    DuckDB's sort, inside its memory limit (Arrow's holds the rows and their sorted copy)."""
    path = str(tmp_path / "spans.duckdb")
    with DuckDBSpanStore(path) as store:
        want = _write(store)
    calls = _sorted_here(monkeypatch)
    with DuckDBSpanStore(path, threads=threads, read_only=read_only) as store:
        assert store.scan(columns=COLUMNS).to_pylist() == want
        assert store.scan(columns=COLUMNS, string_views=True).to_pylist() == want
    assert bool(calls) == (threads == 1 and read_only)


def test_a_column_too_large_for_one_array_is_ordered_by_duckdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrow's take joins a column's chunks into one array, which ends at 2 GiB of text ("offset
    overflow": a store read of a few million spans with long statements failed); such a read is
    ordered by DuckDB, in batches (here the limit is lowered to a few bytes)."""
    path = str(tmp_path / "spans.duckdb")
    with DuckDBSpanStore(path) as store:
        want = _write(store)
    calls = _sorted_here(monkeypatch)
    with DuckDBSpanStore(path, threads=1, read_only=True) as store:
        assert store.scan(columns=COLUMNS).to_pylist() == want
        assert len(calls) == 1  # (the limit as it is: sorted here)
        monkeypatch.setattr(duckdb_store, "_TAKE_BYTES", 64)
        assert store.scan(columns=COLUMNS).to_pylist() == want
        assert store.scan_partition(0, 1, columns=COLUMNS).to_pylist() == want
    assert len(calls) == 1
