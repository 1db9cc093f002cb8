"""One read of a DuckDB store into a file per partition (``split_partitions``), each file read as
``scan_partition`` reads the same partition from the store (``read_partition_file``): the same
rows, copies removed, in the same order, the same columns and types; filters and trace ids too."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector.duckdb_store import DuckDBSpanStore, partition_file, read_partition_file
from hourglass.collector.schema import ANALYSIS_COLUMNS
from tests.builders import BASE_NS, TraceBuilder, spans_table

MS = 1_000_000


@pytest.fixture
def store(tmp_path: Path) -> DuckDBSpanStore:
    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
    builders = []
    for i in range(40):
        b = TraceBuilder(service="frontend" if i % 2 else "billing", base_ns=BASE_NS + i * 1_000 * MS)
        root = b.span("GET /", start_ms=0, dur_ms=50)
        b.span("query", parent=root, start_ms=5, dur_ms=10, service="db")
        b.span("query", parent=root, start_ms=5, dur_ms=12, service="db")  # same start: span_id orders
        builders.append(b)
    store.write(spans_table(builders))
    store.write(spans_table(builders[:5]))  # retried Exports: copies every read must remove
    return store


@pytest.mark.parametrize("parts", [1, 3, 7])
@pytest.mark.parametrize("string_views", [False, True])
def test_each_file_reads_as_scan_partition_reads_the_store(
    store: DuckDBSpanStore, tmp_path: Path, parts: int, string_views: bool
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    counts = store.split_partitions(str(folder), parts, batch_rows=7)  # many small batches
    assert sum(counts) == store.raw_row_count() == 135  # as stored, copies included
    assert sorted(p.name for p in folder.iterdir()) == [f"p{p:06d}.arrow" for p in range(parts)]
    got = [
        read_partition_file(partition_file(str(folder), p), string_views=string_views) for p in range(parts)
    ]
    want = [store.scan_partition(p, parts, string_views=string_views) for p in range(parts)]
    for piece, expected in zip(got, want, strict=True):
        assert piece.schema == expected.schema
        assert piece.to_pylist() == expected.to_pylist()
    assert sum(t.num_rows for t in got) == 120  # each span once
    wanted = sorted({t for table in want for t in table.column("trace_id").to_pylist()})[::4]
    for p in range(parts):
        by_id = read_partition_file(
            partition_file(str(folder), p), trace_ids=wanted, columns=("trace_id", "span_id")
        )
        assert (
            by_id.to_pylist()
            == store.scan_partition(p, parts, trace_ids=wanted, columns=("trace_id", "span_id")).to_pylist()
        )


def test_filters_select_whole_traces_as_scan_partition_does(store: DuckDBSpanStore, tmp_path: Path) -> None:
    late = BASE_NS + 20_000 * MS
    store.split_partitions(str(tmp_path), 4, since_ns=late, services=["billing"], columns=ANALYSIS_COLUMNS)
    got = [read_partition_file(partition_file(str(tmp_path), p)) for p in range(4)]
    want = [store.scan_partition(p, 4, since_ns=late, services=["billing"]) for p in range(4)]
    assert [t.to_pylist() for t in got] == [t.to_pylist() for t in want]
    assert sum(t.num_rows for t in got) == 30  # 10 billing traces from +20 s on, db spans included


def test_an_empty_partition_has_a_file_of_no_rows(tmp_path: Path) -> None:
    store = DuckDBSpanStore(str(tmp_path / "one.duckdb"))
    b = TraceBuilder(service="frontend")
    b.span("GET /", start_ms=0, dur_ms=5)
    store.write(spans_table(b))
    counts = store.split_partitions(str(tmp_path), 5)
    assert sorted(counts) == [0, 0, 0, 0, 1]
    for p in range(5):
        table = read_partition_file(partition_file(str(tmp_path), p))
        assert table.num_rows == counts[p]
        assert table.schema == store.scan_partition(p, 5).schema
    with pytest.raises(ValueError, match="no column"):  # the file holds what the split wrote only
        store.split_partitions(str(tmp_path), 5, columns=("trace_id", "span_id"))
        read_partition_file(partition_file(str(tmp_path), 0), columns=("service",))
    with pytest.raises(ValueError, match="parts >= 1"):
        store.split_partitions(str(tmp_path), 0)
    assert isinstance(read_partition_file(partition_file(str(tmp_path), 0), columns=()), pa.Table)


def test_of_two_copies_in_one_export_every_read_keeps_the_first(tmp_path: Path) -> None:
    """A span twice in one Export (the same ``ingested_ns``), its copies different: every read —
    ``scan``, ``scan_partition``, ``scan_traces``, ``trace``, the partition files — keeps the first
    in the Export (the lowest ``rowid``), the copy ``compact()`` keeps, so the rows are the same
    before and after it. Ordered by ``ingested_ns`` alone, the window kept either copy, by the
    order of DuckDB's threads (here 8 threads over two row groups: a quarter of the spans read
    their second copy)."""
    import numpy as np
    import pyarrow.compute as pc

    from bench.analysis import generate_spans

    first = generate_spans(70_000, seed=1)  # with its copies, more than a row group
    at = first.schema.get_field_index("ingested_ns")
    first = first.set_column(at, first.schema.field(at), pa.array(np.full(first.num_rows, BASE_NS)))
    at = first.schema.get_field_index("name")
    renamed = pc.binary_join_element_wise(first.column("name"), pa.scalar("#2"), "")
    second = first.set_column(at, first.schema.field(at), renamed)
    store = DuckDBSpanStore(str(tmp_path / "copies.duckdb"), threads=8)
    store.write(pa.concat_tables([first, second]))  # one Export
    columns = ("trace_id", "span_id", "name")

    def seconds(table: pa.Table) -> int:
        return sum(name.endswith("#2") for name in table.column("name").to_pylist())

    whole = store.scan(columns=columns)
    assert whole.num_rows > 60_000 and seconds(whole) == 0
    assert all(seconds(store.scan_partition(p, 3, columns=columns)) == 0 for p in range(3))
    some = sorted(set(whole.column("trace_id").to_pylist()))[::50]
    assert seconds(store.scan_traces(some, columns=columns)) == 0
    assert seconds(store.trace(some[0])) == 0
    folder = tmp_path / "files"
    folder.mkdir()
    store.split_partitions(str(folder), 3, columns=columns)
    files = [read_partition_file(partition_file(str(folder), p), columns=columns) for p in range(3)]
    assert sum(t.num_rows for t in files) == whole.num_rows and sum(map(seconds, files)) == 0
    assert store.compact() == whole.num_rows
    assert store.scan(columns=columns).to_pylist() == whole.to_pylist()
    store.close()


def test_trace_reads_run_the_copies_window_only_when_the_rows_hold_copies(store: DuckDBSpanStore) -> None:
    """``scan_traces`` (serve's batch reads, ``trace()``) reads the rows as they are and runs the
    window that removes copies (with its ``rowid`` tie-break, 45-65 % more CPU) only when the rows
    read hold a copy, as ``scan`` does; the rows are the same either way."""
    queries: list[str] = []
    cursor = store._cursor

    class Spy:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def sql(self, query: str, **kwargs: object) -> object:
            queries.append(query)
            return self.inner.sql(query, **kwargs)  # type: ignore[attr-defined]

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

    store._cursor = lambda: Spy(cursor())  # type: ignore[method-assign,assignment,return-value]
    ids = sorted(set(store.scan(columns=("trace_id",)).column("trace_id").to_pylist()))
    counts = cursor().execute("SELECT trace_id, count(*) FROM spans GROUP BY trace_id").fetchall()
    plain = sorted(trace_id for trace_id, rows in counts if rows == 3)  # (not in the retried Exports)
    assert 0 < len(plain) < len(ids)
    whole = store.scan()
    queries.clear()
    got = store.scan_traces(plain)
    assert got.num_rows == 3 * len(plain) and not any("QUALIFY" in q for q in queries), queries
    assert (
        got.to_pylist()
        == whole.filter(pa.compute.is_in(whole.column("trace_id"), pa.array(plain))).to_pylist()
    )
    queries.clear()
    assert store.trace(plain[0]).num_rows == 3 and not any("QUALIFY" in q for q in queries)
    with_copies = store.scan_traces(ids)
    assert any("QUALIFY" in q for q in queries) and with_copies.to_pylist() == whole.to_pylist()
    assert (
        store.scan_traces(ids, columns=("name",)).num_rows == whole.num_rows
    )  # (no key to check: the window)


def test_the_copies_window_keeps_the_least_ingested_then_the_first_written(tmp_path: Path) -> None:
    """The window that removes copies (``arg_min`` of (ingested_ns, rowid) per span) keeps the
    row ``row_number() OVER (ORDER BY ingested_ns, rowid) = 1`` keeps (and ``compact()``), with
    copies whose ingested_ns tie or not, in any order."""
    import numpy as np
    import pyarrow.compute as pc

    from bench.analysis import generate_spans

    first = generate_spans(3_000, seed=3)
    rng = np.random.default_rng(5)
    store = DuckDBSpanStore(str(tmp_path / "copies.duckdb"), threads=4)
    at, named = first.schema.get_field_index("ingested_ns"), first.schema.get_field_index("name")
    for copy in range(3):
        ingested = pa.array(BASE_NS + rng.integers(0, 3, first.num_rows))
        table = first.set_column(at, first.schema.field(at), ingested)
        renamed = pc.binary_join_element_wise(first.column("name"), pa.scalar(f"#{copy}"), "")
        store.write(table.set_column(named, first.schema.field(named), renamed))
    columns = ("trace_id", "span_id", "name")
    want = (
        store._cursor()
        .sql(
            "SELECT trace_id, span_id, name FROM spans QUALIFY row_number() OVER "
            "(PARTITION BY trace_id, span_id ORDER BY ingested_ns, rowid) = 1 "
            "ORDER BY trace_id, start_ns, span_id"
        )
        .to_arrow_table()
        .to_pylist()
    )
    assert store.scan(columns=columns).to_pylist() == want
    ids = sorted({row["trace_id"] for row in want})
    assert store.scan_traces(ids, columns=columns).to_pylist() == want
    store.compact()
    assert store.scan(columns=columns).to_pylist() == want
    store.close()
