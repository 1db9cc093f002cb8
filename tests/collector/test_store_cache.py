"""serve's store drops the table blocks DuckDB's buffer pool keeps after reading them
(``DuckDBSpanStore.release_cache``, called after every analysis run): the cache grew with the
store up to ``memory_limit`` and serve's RSS with it. What is stored is unchanged."""

from __future__ import annotations

from pathlib import Path

from hourglass.collector.duckdb_store import DuckDBSpanStore
from tests.builders import repeated_trace, spans_table, spec


def _cached(store: DuckDBSpanStore) -> int:
    rows = store._writer.execute(
        "SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'BASE_TABLE'"
    ).fetchall()
    return sum(int(r[0]) for r in rows)


def _limit(store: DuckDBSpanStore) -> str:
    return str(store._writer.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])


def test_release_cache_drops_the_cached_blocks_and_keeps_the_data(tmp_path: Path) -> None:
    path = str(tmp_path / "spans.duckdb")
    traces = repeated_trace(16_000, "svc", *(spec(f"op{i}", i, 1) for i in range(10)))
    with DuckDBSpanStore(path) as store:
        store.write(spans_table(traces))
    with DuckDBSpanStore(path, memory_limit="256MB") as store:  # the rows are in the file now
        limit = _limit(store)
        opened = _cached(store)  # one block, read at open
        before = store.scan().sort_by([("trace_id", "ascending"), ("span_id", "ascending")])
        assert before.num_rows == 160_000
        cached = _cached(store)
        # the scan's blocks stay cached: 16 to 18 blocks of 256 KiB over the one read at open (how
        # DuckDB compresses the rows' ingest times, the clock's at the write, varies run to run;
        # a bar of 4 MiB failed when it was 16). Over 1 MiB at least, for the release below to
        # be measured beyond what it may keep.
        assert cached >= opened + 3 * 2**20
        assert store.release_cache(min_bytes=2 * cached) == 0  # below the threshold: left alone
        assert _cached(store) == cached
        released = store.release_cache(min_bytes=1, headroom_bytes=0)
        # all but what the release keeps at the least (1 MiB)
        assert released >= cached - opened - 2**20 and _cached(store) <= opened + 2**20
        assert _limit(store) == limit  # the limit is back
        after = store.scan().sort_by([("trace_id", "ascending"), ("span_id", "ascending")])
        assert after.equals(before)
        store.write(spans_table(repeated_trace(10, "other", spec("late", 0, 1))))
        assert store.stats().spans == 160_010


def test_release_cache_in_memory_is_a_no_op() -> None:
    with DuckDBSpanStore(":memory:") as store:
        store.write(spans_table(repeated_trace(100, "svc", spec("a", 0, 1))))
        assert store.release_cache(min_bytes=1, headroom_bytes=0) == 0
        assert store.scan().num_rows == 100


def test_reads_during_releases_never_run_out_of_memory(tmp_path: Path) -> None:
    """serve releases the cache after each read it answers for the analysis worker while the API
    reads the store in other threads: a read must never see the lowered limit (it failed with
    DuckDB's "Out of Memory" when it allocated during a release)."""
    import threading
    import time

    path = str(tmp_path / "spans.duckdb")
    traces = repeated_trace(16_000, "svc", *(spec(f"op{i}", i, 1) for i in range(10)))
    with DuckDBSpanStore(path) as store:
        store.write(spans_table(traces))
    failures: list[BaseException] = []
    with DuckDBSpanStore(path, memory_limit="256MB") as store:
        stop = threading.Event()

        def read() -> None:
            try:
                while not stop.is_set():
                    store._stats_cache = None  # count again each time (a GROUP BY over every trace)
                    assert store.stats().spans == 160_000
                    assert store.scan(columns=("trace_id", "span_id")).num_rows == 160_000
                    stop.wait(0.05)  # the API's reads come and go
            except BaseException as exc:  # reported below
                failures.append(exc)

        readers = [threading.Thread(target=read) for _ in range(2)]
        for r in readers:
            r.start()
        released = 0
        try:
            # releases for 2 s, and until some found a gap between the reads (at most 30 s)
            started = time.monotonic()
            while not failures and time.monotonic() - started < 30:
                released += store.release_cache(min_bytes=1, headroom_bytes=0)
                if released and time.monotonic() - started > 2:
                    break
                time.sleep(0.002)
        finally:
            stop.set()
            for r in readers:
                r.join(30)
    assert not failures, failures[0]
    assert released > 0  # releases did happen between the reads


def test_a_task_s_read_only_open_caches_at_most_its_small_pool(tmp_path: Path) -> None:
    """A partition task's open (``partitions.open_for_reading``) reads under ``READ_MEMORY_LIMIT``,
    not the store's default: each of its reads scans every stored trace id, and the blocks it
    read stayed cached up to the default limit (566 MiB for one partition's read at 10M spans).
    Its reads are whole and the same as under the default."""
    from hourglass.analysis.partitions import READ_MEMORY_LIMIT, open_for_reading
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    path = str(tmp_path / "spans.duckdb")
    with DuckDBSpanStore(path) as store:
        store.write(spans_table(repeated_trace(16_000, "svc", *(spec(f"op{i}", i, 1) for i in range(10)))))
    reader = open_for_reading(path)
    try:
        assert _limit(reader) == _limit_of(READ_MEMORY_LIMIT)
        assert _limit(reader) != _limit_of("512MB")  # (the store's default is larger)
        parts = [reader.scan_partition(part, 3, columns=ANALYSIS_COLUMNS) for part in range(3)]
        some = sorted(set(parts[0].column("trace_id").to_pylist()))[:5]
        traces = reader.scan(trace_ids=some)
    finally:
        reader.close()
    # (one process opens a file with one configuration at a time)
    with DuckDBSpanStore(path, read_only=True) as default:
        for part, got in enumerate(parts):
            assert got.num_rows > 0
            assert got.equals(default.scan_partition(part, 3, columns=ANALYSIS_COLUMNS))
        assert traces.num_rows == 50 and traces.equals(default.scan(trace_ids=some))


def _limit_of(text: str) -> str:
    """DuckDB's display of a memory_limit setting of ``text``."""
    import duckdb

    with duckdb.connect() as db:
        db.execute(f"SET memory_limit = '{text}'")
        return str(db.execute("SELECT current_setting('memory_limit')").fetchall()[0][0])
