"""The SpanStore contract: every backend runs this suite (DuckDB file and :memory:, embedded
ClickHouse through chdb, and a ClickHouse server when HOURGLASS_TEST_CLICKHOUSE_URL names one)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector.backends import open_store
from hourglass.collector.clickhouse_store import ClickHouseSpanStore
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import ANALYSIS_COLUMNS, SPAN_COLUMNS, SPAN_SCHEMA
from hourglass.collector.store import SpanStore, StoreStats
from tests.builders import BASE_NS, TraceBuilder, spans_table

StoreFactory = Callable[[], SpanStore]
MS = 1_000_000


CLICKHOUSE_URL = os.environ.get("HOURGLASS_TEST_CLICKHOUSE_URL")
needs_chdb = pytest.mark.skipif(
    __import__("importlib").util.find_spec("chdb") is None,
    reason="chdb is not installed (pip install -e '.[dev]')",
)
needs_server = pytest.mark.skipif(
    not CLICKHOUSE_URL,
    reason="HOURGLASS_TEST_CLICKHOUSE_URL is not set (clickhouse://USER:PASS@HOST:8123/DATABASE)",
)


def _server_store(table: str) -> ClickHouseSpanStore:
    """A store on its own table of the test server (dropped by the fixture)."""
    assert CLICKHOUSE_URL is not None
    separator = "&" if "?" in CLICKHOUSE_URL else "?"
    return ClickHouseSpanStore.connect(f"{CLICKHOUSE_URL}{separator}table={table}")


def _drop_server_tables(store: ClickHouseSpanStore) -> None:
    table = store._table
    for suffix in ("_trace_id_ts_mv", "_trace_id_ts", "_hourglass", ""):
        store._backend.command(f"DROP TABLE IF EXISTS {table}{suffix}")


@pytest.fixture(
    params=[
        "duckdb-file",
        "duckdb-file-ingest-log",
        "duckdb-memory",
        pytest.param("chdb", marks=needs_chdb),
        pytest.param("clickhouse-server", marks=needs_server),
    ]
)
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    opened: list[SpanStore] = []
    server_table = f"hourglass_test_{uuid.uuid4().hex[:12]}"

    def factory() -> SpanStore:
        if request.param == "chdb":
            store: SpanStore = ClickHouseSpanStore.embedded(str(tmp_path / "spans.chdb"))
        elif request.param == "clickhouse-server":
            store = _server_store(server_table)
        elif request.param == "duckdb-file":
            store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
        elif request.param == "duckdb-file-ingest-log":  # as serve opens it
            store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"), ingest_log=True, threads=1)
        else:
            store = DuckDBSpanStore(":memory:")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        if request.param == "clickhouse-server" and isinstance(store, ClickHouseSpanStore):
            _drop_server_tables(store)
        store.close()


def _two_traces() -> tuple[TraceBuilder, TraceBuilder]:
    a = TraceBuilder(service="frontend")
    root = a.span("GET /a", start_ms=0, dur_ms=100)
    a.span("SELECT", parent=root, start_ms=10, dur_ms=20, service="db", db_system="postgresql")
    b = TraceBuilder(service="billing", base_ns=BASE_NS + 10_000 * MS)
    b.span("POST /pay", start_ms=0, dur_ms=50)
    return a, b


def _three_traces(store: SpanStore, c_name: str) -> tuple[TraceBuilder, TraceBuilder, TraceBuilder]:
    """:func:`_two_traces` and c, one frontend span ``c_name`` 20 s after a, written to ``store``
    (c twice: its rows count twice)."""
    a, b = _two_traces()  # a: frontend GET /a > db SELECT; b: billing POST /pay, 10 s later
    c = TraceBuilder(service="frontend", base_ns=BASE_NS + 20_000 * MS)
    c.span(c_name, start_ms=0, dur_ms=30)
    store.write(spans_table([a, b, c]))
    store.write(spans_table([c]))
    return a, b, c


def test_is_a_span_store(make_store: StoreFactory) -> None:
    assert isinstance(make_store(), SpanStore)


def test_write_scan_round_trip(make_store: StoreFactory) -> None:
    store = make_store()
    a, b = _two_traces()
    table = spans_table([a, b])
    store.write(table)
    everything = store.scan(columns=SPAN_COLUMNS)
    assert everything.schema == SPAN_SCHEMA
    assert sorted(everything.to_pylist(), key=lambda r: r["span_id"]) == sorted(
        table.to_pylist(), key=lambda r: r["span_id"]
    )
    default = store.scan()
    assert tuple(default.column_names) == ANALYSIS_COLUMNS
    assert store.stats() == StoreStats(spans=3, traces=2)
    assert store.services() == ["billing", "db", "frontend"]


def test_duplicates_are_seen_once_and_compacted(make_store: StoreFactory) -> None:
    store = make_store()
    a, b = _two_traces()
    store.write(spans_table([a, b]))
    store.write(spans_table([a]))  # the same Export retried
    assert store.stats() == StoreStats(spans=3, traces=2)
    assert store.scan().num_rows == 3
    assert store.trace(a.trace_id).num_rows == 2
    if isinstance(store, DuckDBSpanStore):
        assert store.raw_row_count() == 5
        assert store.compact() == 2
        assert store.raw_row_count() == 3
        store.write(spans_table([b]))
        assert store.stats() == StoreStats(spans=3, traces=2)  # a copy of a compacted row is not counted
        assert store.compact() == 1  # incremental compaction still finds the new duplicate
        assert store.raw_row_count() == 3


def test_the_first_ingested_copy_wins_in_every_read(make_store: StoreFactory) -> None:
    """A span stored twice with different content (written again later with another end): every
    read keeps the first ingested copy, whether it reads the whole store, a partition or some
    traces of a partition (by ids in the query's SQL or beside it), with Arrow string views or
    plain strings."""
    import polars as pl

    store = make_store()
    a, b = _two_traces()
    first = spans_table([a, b])
    store.write(first)
    rewritten = [  # (parentless, renamed: a ClickHouse read of a partition kept this copy)
        {
            **row,
            "end_ns": row["end_ns"] + 7 * MS,
            "ingested_ns": row["ingested_ns"] + 1_000 * MS,
            "name": "a later copy",
            "parent_span_id": None,
        }
        for row in spans_table([a]).to_pylist()
    ]
    store.write(pa.Table.from_pylist(rewritten, schema=SPAN_SCHEMA))
    columns = ("trace_id", "span_id", "end_ns", "name", "parent_span_id")
    reads = {
        "scan": store.scan(columns=columns),
        "scan, string views": store.scan(columns=columns, string_views=True),
        "partitions": [store.scan_partition(p, 3, columns=columns) for p in range(3)],
        "partitions, ids, string views": [
            store.scan_partition(p, 3, columns=columns, trace_ids=[a.trace_id, b.trace_id], string_views=True)
            for p in range(3)
        ],
    }
    many = [a.trace_id, b.trace_id, *(f"{i:032x}" for i in range(100))]  # (ClickHouse: beside the query)
    reads["partitions, many ids"] = [
        store.scan_partition(p, 3, columns=columns, trace_ids=many) for p in range(3)
    ]
    keep = list(columns)
    want = pl.from_arrow(first.select(keep)).sort("span_id").to_dicts()
    for name, read in reads.items():
        frames = [pl.from_arrow(t) for t in (read if isinstance(read, list) else [read])]
        got = pl.concat([f for f in frames if isinstance(f, pl.DataFrame)]).select(keep).sort("span_id")
        assert got.to_dicts() == want, name


def test_copies_of_the_same_timing_resolve_to_one_copy_in_every_read(make_store: StoreFactory) -> None:
    """A span written again later with the same start and end but another name and parent:
    every read — the whole store, its partitions, some of its traces by id (in the SQL or
    beside it) — keeps the same one copy (DuckDB: the first ingested; ClickHouse, whose copies of
    one timing share a side row: the first by name and parent), so no two reads of a trace differ."""
    import polars as pl

    store = make_store()
    a, b = _two_traces()
    store.write(spans_table([a, b]))
    again = [
        {
            **row,
            "name": "AAA renamed",
            "parent_span_id": "00000000cafef00d",
            "ingested_ns": row["ingested_ns"] + MS,
        }
        for row in spans_table([a]).to_pylist()
    ]
    store.write(pa.Table.from_pylist(again, schema=SPAN_SCHEMA))
    columns = ("trace_id", "span_id", "name", "parent_span_id", "end_ns")
    many = [a.trace_id, b.trace_id, *(f"{i:032x}" for i in range(100))]
    reads = [
        [store.scan(columns=columns)],
        [store.scan_partition(p, 3, columns=columns) for p in range(3)],
        [store.scan_partition(p, 2, columns=columns, trace_ids=[a.trace_id]) for p in range(2)],
        [store.scan_partition(p, 3, columns=columns, trace_ids=many) for p in range(3)],
    ]
    kept = [
        pl.concat([f for t in read if isinstance(f := pl.from_arrow(t), pl.DataFrame)])
        .filter(pl.col("trace_id") == a.trace_id)
        .sort("span_id")
        .to_dicts()
        for read in reads
    ]
    assert len(kept[0]) == len(again) and all(k == kept[0] for k in kept), kept
    if isinstance(store, DuckDBSpanStore):
        assert {r["name"] for r in kept[0]} != {"AAA renamed"}


def test_string_views_hold_the_same_rows(make_store: StoreFactory) -> None:
    """``string_views=True``: the same rows in the same order, string columns (and lists of
    strings) as Arrow string_view where the backend makes them; polars reads both alike."""
    store = make_store()
    a, b = _two_traces()
    store.write(spans_table([a, b]))
    plain = store.scan(columns=SPAN_COLUMNS)
    views = store.scan(columns=SPAN_COLUMNS, string_views=True)
    assert views.column_names == plain.column_names
    assert views.to_pylist() == plain.to_pylist()
    if isinstance(store, DuckDBSpanStore):
        assert views.schema.field("trace_id").type == pa.string_view()
        assert views.schema.field("event_names").type == pa.list_(pa.string_view())
        assert views.schema.field("raw").type == pa.binary()
        assert store.scan(columns=SPAN_COLUMNS).schema == SPAN_SCHEMA  # plain reads are unchanged
    import polars as pl

    assert pl.from_arrow(views).equals(pl.from_arrow(plain))


def test_scan_partition_reads_only_the_traces_asked_for(make_store: StoreFactory) -> None:
    """``trace_ids``: the partition's traces among them, whole; over all partitions, those traces."""
    store = make_store()
    builders = []
    for i in range(12):
        b = TraceBuilder(service="frontend", base_ns=BASE_NS + i * 1_000 * MS)
        root = b.span("GET /", start_ms=0, dur_ms=50)
        b.span("child", parent=root, start_ms=5, dur_ms=10, service="db")
        builders.append(b)
    store.write(spans_table(builders))
    wanted = [b.trace_id for b in builders[::3]]
    columns = ("trace_id", "span_id", "start_ns")
    pieces = [store.scan_partition(p, 3, columns=columns, trace_ids=wanted) for p in range(3)]
    whole = [store.scan_partition(p, 3, columns=columns) for p in range(3)]
    for piece, all_of_part in zip(pieces, whole, strict=True):
        in_part = [r for r in all_of_part.to_pylist() if r["trace_id"] in wanted]
        assert piece.to_pylist() == in_part
    assert sum(p.num_rows for p in pieces) == 2 * len(wanted)
    assert all(store.scan_partition(p, 3, trace_ids=[]).num_rows == 0 for p in range(3))


def test_trace_sizes_give_the_rows_of_every_partition_of_whole_traces(make_store: StoreFactory) -> None:
    """``trace_sizes``: each trace's id hashed as the store's partitions take it and its rows, so
    that a plan knows how many rows the largest partition of any count holds (traces of very
    different sizes: a partition by hash can hold several large ones)."""
    from hourglass.analysis.planning import loads_of

    store = make_store()
    builders = []
    for i in range(30):
        b = TraceBuilder(service="frontend", base_ns=BASE_NS + i * 1_000 * MS)
        root = b.span("GET /", start_ms=0, dur_ms=500)
        for j in range(1 + (i % 7) * (i % 5) * 3):
            b.span("child", parent=root, start_ms=1 + j, dur_ms=1, service="db")
        builders.append(b)
    store.write(spans_table(builders))
    loads = loads_of(*store.trace_sizes())
    for parts in (1, 2, 3, 5, 8):
        rows = [store.scan_partition(p, parts, columns=("trace_id",)).num_rows for p in range(parts)]
        assert loads([parts]) == {parts: max(rows)}, (parts, rows)


def test_a_windows_rows_sizes_and_largest_trace_are_those_a_filtered_read_takes(
    make_store: StoreFactory,
) -> None:
    """``window_rows``, ``trace_sizes`` and (where a store has it) ``largest_trace`` with the
    filters ``since_ns`` and ``services``: of every row of each trace with a span that matches
    them, as ``scan`` selects the traces (copies counted, as ``raw_row_count`` counts them).
    What ``analyze --db --since`` plans on: before, the whole store's rows, and a window that
    fits the memory budget was refused because the store did not."""
    store = make_store()
    a, b, c = _three_traces(store, "GET /c")
    later = BASE_NS + 5_000 * MS
    windows = {  # filters -> the traces a read takes, and their rows
        (None, None): ({a.trace_id, b.trace_id, c.trace_id}, 5),
        (later, None): ({b.trace_id, c.trace_id}, 3),
        (None, ("db",)): ({a.trace_id}, 2),  # (the whole trace of a span of the service)
        (later, ("frontend",)): ({c.trace_id}, 2),
        (later, ("db",)): (set(), 0),
    }
    for (since_ns, services), (traces, rows) in windows.items():
        named = list(services) if services is not None else None
        read = store.scan(since_ns=since_ns, services=named, columns=("trace_id",))
        assert set(read.column("trace_id").to_pylist()) == traces, (since_ns, services)
        assert store.window_rows(since_ns=since_ns, services=named) == rows, (since_ns, services)
        _, counts = store.trace_sizes(since_ns=since_ns, services=named)
        assert (len(counts), int(sum(counts))) == (len(traces), rows), (since_ns, services)
        largest = getattr(store, "largest_trace", None)
        if largest is not None:  # (the most rows; of several, the first id)
            held = {a.trace_id: 2, b.trace_id: 1, c.trace_id: 2}
            first = min(traces, key=lambda t: (-held[t], t)) if traces else None
            expected = (first, held[first]) if first is not None else None
            assert largest(since_ns=since_ns, services=named) == expected, (since_ns, services)
    assert store.window_rows() == store.raw_row_count() == 5


def test_the_newest_window_a_number_of_rows_holds(make_store: StoreFactory) -> None:
    """``newest_window(most, services)``: the earliest ``since_ns`` whose window holds at most
    ``most`` rows (``window_rows``), None when not even the newest trace fits. What a refused
    ``analyze --db`` offers: the largest window of the newest traces its budget holds."""
    store = make_store()
    _three_traces(store, "GET /c")  # rows: a 2, b 1, c 2 (its copy)
    newest = getattr(store, "newest_window", None)
    if newest is None:
        pytest.skip("this store offers no window")
    db_start, b_start, c_start = BASE_NS + 10 * MS, BASE_NS + 10_000 * MS, BASE_NS + 20_000 * MS
    expected = {
        (0, None): None,
        (1, None): None,  # (c alone has 2 rows)
        (2, None): c_start,
        (3, None): b_start,
        (4, None): b_start,  # (a's 2 more rows do not fit)
        (5, None): db_start,  # (a's last start: its db span's)
        (50, None): db_start,
        (1, ("db",)): None,
        (2, ("db",)): db_start,
        (3, ("frontend",)): c_start,
        (4, ("frontend",)): BASE_NS,  # (a's last frontend start: its root's, not its db span's)
        (9, ("billing", "frontend")): BASE_NS,
        (9, ("nosuch",)): None,
    }
    for (most, services), since_ns in expected.items():
        named = list(services) if services is not None else None
        assert newest(most, named) == since_ns, (most, services)
        if since_ns is not None:  # (the largest such window: the values above)
            assert store.window_rows(since_ns=since_ns, services=named) <= most, (most, services)


def test_an_endpoints_traces_and_whether_a_span_is_there(make_store: StoreFactory) -> None:
    """``endpoint_trace_ids``: the window's traces with a span of (service, operation) — either
    may be None —, sorted, and the span rows they hold (copies included); None past a limit.
    ``has_span``: whether the window has such a span, with ``parentless`` one without a parent
    (an empty parent id is none). What a question over an endpoint's traces asks of a store."""
    store = make_store()
    a, b, c = _three_traces(store, "GET /a")
    later = BASE_NS + 5_000 * MS
    assert store.endpoint_trace_ids("frontend", "GET /a") == (sorted([a.trace_id, c.trace_id]), 4)
    assert store.endpoint_trace_ids("frontend", "GET /a", later) == ([c.trace_id], 2)
    assert store.endpoint_trace_ids("db", None) == ([a.trace_id], 2)
    assert store.endpoint_trace_ids(None, "POST /pay") == ([b.trace_id], 1)
    assert store.endpoint_trace_ids("nobody", None) == ([], 0)
    assert store.endpoint_trace_ids("frontend", None, most_spans=3) is None
    assert store.endpoint_trace_ids("frontend", None, most_traces=1) is None
    assert store.has_span("db", "SELECT") and not store.has_span("db", "SELECT", later)
    assert not store.has_span("db", "SELECT", parentless=True)
    assert store.has_span("billing", None, later, parentless=True)
    assert not store.has_span("nobody", None)


def test_an_endpoint_of_thousands_of_traces_is_named_and_read_by_id(make_store: StoreFactory) -> None:
    """An endpoint's traces are named and read by their ids however many they are: a ClickHouse
    store sends more than ``INLINE_TRACE_IDS`` beside the query rather than in its SQL (whose
    default max_query_size of 256 KiB held ~2,000 ids, twice in a read: it named none past that).
    The same spans come back as through the window's partitions."""
    store = make_store()
    traces = []
    for i in range(7_500):  # (5,000 of them the endpoint's: ~360 KB of ids written twice)
        t = TraceBuilder(service="frontend", base_ns=BASE_NS + i * MS)
        root = t.span("GET /many" if i % 3 else "GET /other", start_ms=0, dur_ms=20)
        t.span("SELECT", parent=root, start_ms=5, dur_ms=5, service="db", db_system="postgresql")
        traces.append(t)
    store.write(spans_table(traces))
    wanted = sorted(t.trace_id for i, t in enumerate(traces) if i % 3)
    found = store.endpoint_trace_ids("frontend", "GET /many")
    assert found == (wanted, 2 * len(wanted))
    ids = found[0]
    pieces = [store.scan_partition(p, 3, trace_ids=ids, columns=("trace_id", "span_id")) for p in range(3)]
    window = [store.scan_partition(p, 3, columns=("trace_id", "span_id", "name")) for p in range(3)]
    for piece, whole in zip(pieces, window, strict=True):
        kept = {r["trace_id"] for r in whole.to_pylist() if r["name"] == "GET /many"}
        assert piece.to_pylist() == [
            {"trace_id": r["trace_id"], "span_id": r["span_id"]}
            for r in whole.to_pylist()
            if r["trace_id"] in kept
        ]
    assert sum(p.num_rows for p in pieces) == 2 * len(wanted)
    read = store.scan(trace_ids=ids[:100] + ids[-100:], columns=("trace_id",))
    assert sorted(set(read.column("trace_id").to_pylist())) == sorted(ids[:100] + ids[-100:])


def test_scan_filters_return_whole_traces(make_store: StoreFactory) -> None:
    store = make_store()
    a, b = _two_traces()
    store.write(spans_table([a, b]))
    by_service = store.scan(services=["db"])
    assert set(by_service.column("trace_id").to_pylist()) == {a.trace_id}
    assert by_service.num_rows == 2  # the whole trace, not only the db span
    late = store.scan(since_ns=BASE_NS + 5_000 * MS)
    assert set(late.column("trace_id").to_pylist()) == {b.trace_id}
    early = store.scan(until_ns=BASE_NS + 5_000 * MS)
    assert set(early.column("trace_id").to_pylist()) == {a.trace_id}
    assert store.scan(trace_ids=[b.trace_id.upper()]).num_rows == 1
    assert store.scan(services=["nobody"]).num_rows == 0
    narrow = store.scan(columns=("trace_id", "span_id", "hints"))
    assert narrow.column_names == ["trace_id", "span_id", "hints"]
    with pytest.raises(ValueError, match="unknown span column"):
        store.scan(columns=("nope",))


def test_trace_and_unknown_trace(make_store: StoreFactory) -> None:
    store = make_store()
    a, _ = _two_traces()
    store.write(spans_table(a))
    spans = store.trace(a.trace_id)
    assert spans.num_rows == 2 and spans.schema == SPAN_SCHEMA
    assert spans.column("start_ns").to_pylist() == sorted(spans.column("start_ns").to_pylist())
    empty = store.trace("f" * 32)
    assert empty.num_rows == 0 and empty.schema == SPAN_SCHEMA


def test_retention_drops_whole_old_traces(make_store: StoreFactory) -> None:
    store = make_store()
    a, b = _two_traces()
    store.write(spans_table([a, b]))
    removed = store.delete_older_than(BASE_NS + 1_000 * MS)  # a ended at +100 ms, b at +10.05 s
    assert removed == 2
    assert store.stats() == StoreStats(spans=1, traces=1)
    assert store.delete_older_than(0) == 0


def test_stats_follow_every_change_between_reads(make_store: StoreFactory) -> None:
    """stats() may reuse its counts between reads, but never across a write or a deletion."""
    store = make_store()
    a, b = _two_traces()
    assert store.stats() == StoreStats(spans=0, traces=0)
    store.write(spans_table([a]))
    assert store.stats() == StoreStats(spans=2, traces=1)
    assert store.stats() == StoreStats(spans=2, traces=1)
    store.write(spans_table([b]))
    assert store.stats() == StoreStats(spans=3, traces=2)
    store.delete_older_than(BASE_NS + 1_000 * MS)  # drops trace a
    assert store.stats() == StoreStats(spans=1, traces=1)


def test_empty_store_and_empty_write(make_store: StoreFactory) -> None:
    store = make_store()
    store.write(SPAN_SCHEMA.empty_table())
    assert store.stats() == StoreStats(spans=0, traces=0)
    assert store.scan().num_rows == 0
    assert store.services() == []


def test_write_rejects_wrong_schema(make_store: StoreFactory) -> None:
    store = make_store()
    with pytest.raises(ValueError, match="SPAN_SCHEMA"):
        store.write(pa.table({"trace_id": ["a"]}))


def test_file_store_survives_reopen(tmp_path: Path) -> None:
    path = str(tmp_path / "reopen.duckdb")
    a, b = _two_traces()
    with DuckDBSpanStore(path) as store:
        store.write(spans_table([a, b]))
    with DuckDBSpanStore(path) as store:
        assert store.stats() == StoreStats(spans=3, traces=2)


@pytest.mark.parametrize("backend", ["duckdb", pytest.param("chdb", marks=needs_chdb)])
def test_write_is_durable_across_kill_9(tmp_path: Path, backend: str) -> None:
    """A row whose write() returned survives a SIGKILL right after (DuckDB: WAL replay on the next
    open; chdb: the INSERT's part files are written before it returns)."""
    path = tmp_path / ("killed.duckdb" if backend == "duckdb" else "killed.chdb")
    location = str(path) if backend == "duckdb" else f"chdb:{path}"
    script = textwrap.dedent(
        f"""
        import sys, time
        from hourglass.collector.backends import open_store
        from tests.builders import TraceBuilder, spans_table
        store = open_store({location!r})
        for i in range(5):
            b = TraceBuilder(service="s", trace_id=f"{{i + 1:032x}}")
            b.span("op", start_ms=0, dur_ms=1)
            store.write(spans_table(b))
            print("committed", i, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(5)]
        assert lines[-1].strip() == "committed 4"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    store = open_store(location)
    try:
        assert store.stats() == StoreStats(spans=5, traces=5)
    finally:
        store.close()


def test_close_interrupts_a_reader_still_running_a_query(tmp_path: Path) -> None:
    # serve stopping while the background analysis scans a big store: DuckDB refuses to close a
    # busy cursor, and close() raised ResourceInUseException (serve exited 1 after storing all)
    import threading
    import time

    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"), ingest_log=True, threads=1)
    errors: list[str] = []

    def long_query() -> None:
        try:
            store._cursor().execute("SELECT count(*) FROM range(3000000000) a, range(10) b").fetchall()
        except Exception as exc:
            errors.append(type(exc).__name__)

    reader = threading.Thread(target=long_query)
    reader.start()
    time.sleep(0.5)
    store.close()
    reader.join(30)
    assert not reader.is_alive() and errors


def test_scan_partition_splits_whole_traces(make_store: StoreFactory) -> None:
    """Every trace lands in exactly one partition, whole, in scan's row order; filters as in scan."""
    store = make_store()
    builders = []
    for i in range(24):
        b = TraceBuilder(service="frontend" if i % 2 else "billing", base_ns=BASE_NS + i * 1_000 * MS)
        root = b.span("GET /", start_ms=0, dur_ms=50)
        b.span("child", parent=root, start_ms=5, dur_ms=10, service="db")
        builders.append(b)
    store.write(spans_table(builders))
    store.write(spans_table(builders[:3]))  # retried Exports: still seen once
    everything = store.scan(columns=("trace_id", "span_id", "start_ns"))
    parts = 4
    pieces = [
        store.scan_partition(p, parts, columns=("trace_id", "span_id", "start_ns")) for p in range(parts)
    ]
    seen: dict[str, int] = {}
    for part, piece in enumerate(pieces):
        assert piece.column_names == ["trace_id", "span_id", "start_ns"]
        rows = piece.to_pylist()
        assert rows == sorted(rows, key=lambda r: (r["trace_id"], r["start_ns"], r["span_id"]))
        for trace_id in set(piece.column("trace_id").to_pylist()):
            assert trace_id not in seen, "a trace in two partitions"
            seen[trace_id] = part
    assert sum(p.num_rows for p in pieces) == everything.num_rows == 48
    assert len({part for part in seen.values()}) > 1  # 24 traces do not all hash alike
    late = BASE_NS + 12_000 * MS
    filtered = [store.scan_partition(p, parts, since_ns=late, services=["billing"]) for p in range(parts)]
    expected = store.scan(since_ns=late, services=["billing"])
    combined = pa.concat_tables(filtered).sort_by([("trace_id", "ascending"), ("start_ns", "ascending")])
    assert combined.num_rows == expected.num_rows == 12  # 6 billing traces from +12 s on, db spans included
    assert combined.to_pylist() == expected.to_pylist()
    assert tuple(filtered[0].column_names) == ANALYSIS_COLUMNS
    with pytest.raises(ValueError, match="part"):
        store.scan_partition(4, 4)


def test_every_read_orders_rows_written_in_any_order(make_store: StoreFactory) -> None:
    """Rows written in no order (traces interleaved, a trace's spans backwards, spans that start
    together) come back in (trace_id, start_ns, span_id) order from ``scan`` and ``scan_partition``,
    whatever columns are asked for (the order's keys among them or not) and as string views too.
    DuckDB reads them as stored and they are sorted after the read (``_in_order``)."""
    store = make_store()
    builders = []
    for i in range(12):
        b = TraceBuilder(service="frontend", base_ns=BASE_NS + (i % 3) * MS)
        root = b.span("GET /", start_ms=0, dur_ms=50)
        for k in range(4):  # two pairs that start together: span_id decides
            b.span(f"call {k}", parent=root, start_ms=5 + k // 2, dur_ms=3, service="db")
        builders.append(b)
    table = spans_table(builders)
    rows = table.to_pylist()
    order = [*range(0, len(rows), 2), *reversed(range(1, len(rows), 2))]  # interleaved, backwards
    store.write(pa.Table.from_pylist([rows[i] for i in order], schema=table.schema))
    expected = sorted(rows, key=lambda r: (r["trace_id"], r["start_ns"], r["span_id"]))
    for columns in (("trace_id", "span_id", "start_ns", "name"), ("name", "span_id", "trace_id")):
        want = [{c: r[c] for c in columns} for r in expected]
        assert store.scan(columns=columns).to_pylist() == want
        pieces = [store.scan_partition(p, 3, columns=columns).to_pylist() for p in range(3)]
        for piece in pieces:  # each partition: its traces' rows, in the same order
            traces = {r["trace_id"] for r in piece}
            assert piece == [r for r in want if r["trace_id"] in traces]
        assert sum(len(piece) for piece in pieces) == len(want)
    viewed = store.scan(columns=("trace_id", "span_id", "start_ns"), string_views=True)
    assert viewed.to_pylist() == [{c: r[c] for c in ("trace_id", "span_id", "start_ns")} for r in expected]


def test_a_span_ending_before_it_starts_is_kept_as_it_came(make_store: StoreFactory) -> None:
    """Clock skew the analysis repairs: the store keeps end_ns < start_ns as written (otel_traces
    has only a Duration, so the ClickHouse stores keep the end in their side table)."""
    store = make_store()
    b = TraceBuilder(service="skewed")
    root = b.span("GET /", start_ms=0, dur_ms=40)
    b.span("child", parent=root, start_ms=10, dur_ms=-3)
    table = spans_table(b)
    store.write(table)
    got = store.scan(columns=("span_id", "start_ns", "end_ns")).to_pylist()
    want = table.select(["span_id", "start_ns", "end_ns"]).to_pylist()
    assert sorted(got, key=lambda r: r["span_id"]) == sorted(want, key=lambda r: r["span_id"])
    assert any(r["end_ns"] < r["start_ns"] for r in got)


def test_of_two_copies_in_one_export_every_read_keeps_the_first(make_store: StoreFactory) -> None:
    """A span twice in one Export (the same ``ingested_ns``), its copies different (another
    name, which sorts first, and another end): every read keeps the first copy in the Export, on
    every backend (DuckDB: the lowest ``rowid``; ClickHouse: the later copies of one write are
    not stored). On the old ClickHouse store either copy could be kept."""
    store = make_store()
    traces = [TraceBuilder(service=f"svc{i % 3}", base_ns=BASE_NS + i * 1_000 * MS) for i in range(40)]
    for t in traces:
        root = t.span("GET /a", start_ms=0, dur_ms=100)
        t.span("SELECT", parent=root, start_ms=10, dur_ms=20)
    first = spans_table(traces)
    # one Export, each copy right after its first (a copy ahead of other spans: the ClickHouse store
    # once kept the Export's first rows, a copy among them, and lost as many spans at its end)
    rows: list[dict[str, object]] = []
    for i, row in enumerate(first.to_pylist()):
        rows.append(row)
        if i % 2 == 0:
            rows.append({**row, "name": f"!{row['name']}", "end_ns": row["end_ns"] + 7 * MS})
    store.write(pa.Table.from_pylist(rows, schema=SPAN_SCHEMA))
    columns = ("trace_id", "span_id", "name", "end_ns")
    want = sorted(first.select(list(columns)).to_pylist(), key=lambda r: (r["trace_id"], r["span_id"]))
    ids = [t.trace_id for t in traces]
    reads = {
        "scan": [store.scan(columns=columns)],
        "partitions": [store.scan_partition(p, 3, columns=columns) for p in range(3)],
        "partitions, ids": [store.scan_partition(p, 3, columns=columns, trace_ids=ids) for p in range(3)],
        "traces": [store.trace(t).select(list(columns)) for t in ids],
    }
    for name, tables in reads.items():
        got = sorted(
            (row for table in tables for row in table.to_pylist()),
            key=lambda r: (r["trace_id"], r["span_id"]),
        )
        assert got == want, name
    assert store.stats() == StoreStats(spans=first.num_rows, traces=len(traces))
