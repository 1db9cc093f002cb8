"""``DuckDBSpanStore.stats()`` keeps exact counts of the rows ingested before a bound and counts
only what came at or after it: its figures must equal a recount of the whole table after any mix
of writes (copies of stored spans, rows ingested earlier than rows already counted), compactions
and retention, also while writes run beside the counts."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import SPAN_COLUMNS
from hourglass.collector.store import StoreStats
from tests.builders import TraceBuilder, spans_table

SECOND = 10**9


def _template() -> pa.Table:
    b = TraceBuilder(service="svc")
    b.span("op", start_ms=0, dur_ms=1)
    return spans_table(b)


TEMPLATE = _template()


def _rows(keys: list[tuple[int, int]], ingested_ns: int, end_ns: int) -> pa.Table:
    """One row per (trace, span) number, all ingested at ``ingested_ns``, ending at ``end_ns``."""
    table = TEMPLATE.take([0] * len(keys))
    columns = {
        "trace_id": pa.array([f"{t:032x}" for t, _ in keys]),
        "span_id": pa.array([f"{s:016x}" for _, s in keys]),
        "ingested_ns": pa.array([ingested_ns] * len(keys), pa.int64()),
        "start_ns": pa.array([end_ns - 1000] * len(keys), pa.int64()),
        "end_ns": pa.array([end_ns] * len(keys), pa.int64()),
    }
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _recount(store: DuckDBSpanStore) -> StoreStats:
    store.load_staged()
    spans, traces = (
        store._cursor()
        .execute("SELECT count(DISTINCT (trace_id, span_id)), count(DISTINCT trace_id) FROM spans")
        .fetchall()[0]
    )
    return StoreStats(spans=int(spans), traces=int(traces))


@pytest.fixture(params=["file", "file-ingest-log", "memory"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], DuckDBSpanStore]]:
    opened: list[DuckDBSpanStore] = []

    def factory() -> DuckDBSpanStore:
        path = str(tmp_path / "spans.duckdb")
        if request.param == "file":
            store = DuckDBSpanStore(path)
        elif request.param == "file-ingest-log":
            store = DuckDBSpanStore(path, ingest_log=True, threads=1)
        else:
            store = DuckDBSpanStore(":memory:")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_counts_equal_a_recount_after_every_change(
    make_store: Callable[[], DuckDBSpanStore], seed: int
) -> None:
    rng = random.Random(seed)
    store = make_store()
    clock = time.time_ns() - 3600 * SECOND  # ingest stamps: an hour ago onwards, a second apart
    incremental = 0  # counts that started from a kept count
    for step in range(120):
        action = rng.random()
        if action < 0.7:  # a write: new spans, re-sent ones (copies), spans of stored traces
            clock += SECOND
            stamp = clock
            late = rng.random()
            if late < 0.15:  # stamped before rows already counted (a slow request)
                stamp = clock - rng.randint(1, 40) * SECOND
            elif late < 0.2:  # older than every kept count
                stamp = clock - 10_000 * SECOND
            keys = [(rng.randint(1, 60), rng.randint(1, 8)) for _ in range(rng.randint(1, 30))]
            store.write(_rows(keys, stamp, end_ns=clock + rng.randint(-50, 50) * SECOND))
        elif action < 0.85:
            store.compact()
        elif action < 0.95:
            store.delete_older_than(clock + rng.randint(-60, 0) * SECOND)
        else:
            store._stats_cache = None  # counted again with nothing changed
        if store._counts:
            incremental += 1
        assert store.stats() == _recount(store), f"step {step}"
        assert store._count_watches == []
    assert incremental > 50  # the kept counts were used, not only whole recounts


def test_counts_stay_exact_while_writes_and_retention_run_beside_them(
    make_store: Callable[[], DuckDBSpanStore],
) -> None:
    store = make_store()
    now = time.time_ns()
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        rng = random.Random(7)
        try:
            for i in range(400):
                if stop.is_set():
                    return
                # stamps around now, out of order (as requests decoded in parallel are)
                stamp = now - 30 * SECOND + i * SECOND // 10 - rng.randint(0, 20) * SECOND
                keys = [(rng.randint(1, 200), rng.randint(1, 4)) for _ in range(20)]
                store.write(_rows(keys, stamp, end_ns=now - rng.randint(0, 100) * SECOND))
                if i % 100 == 99:
                    store.delete_older_than(now - 90 * SECOND)
                if i % 50 == 25:
                    store.compact()
        except BaseException as exc:  # reported below
            failures.append(exc)

    def count() -> None:  # serve counts from API threads and the round at once
        try:
            while writer.is_alive():
                counted = store.stats()
                assert counted.spans >= counted.traces >= 0
        except BaseException as exc:  # reported below
            failures.append(exc)

    writer = threading.Thread(target=write)
    counters = [threading.Thread(target=count) for _ in range(3)]
    writer.start()
    for counter in counters:
        counter.start()
    try:
        count()
    finally:
        stop.set()
        writer.join(60)
        for counter in counters:
            counter.join(60)
    assert not failures
    assert store._count_watches == []  # every count stopped watching writes (none left to grow)
    assert store.stats() == _recount(store)
    store._stats_cache = None
    assert store.stats() == _recount(store)


class _CountInterrupted:
    """The store's cursor for this thread, running ``before`` / ``after`` around stats()' count
    query: writes that land while a count runs, at the worst moments."""

    def __init__(self, cursor: object, before: Callable[[], None], after: Callable[[], None]) -> None:
        self._cursor, self._before, self._after = cursor, before, after

    def execute(self, sql: str, *args: object) -> object:
        counting = "WITH bound AS" in sql
        if counting:
            self._before()  # DuckDB runs the whole query in execute(): before it, so in its snapshot
        result = self._cursor.execute(sql, *args)  # type: ignore[attr-defined]
        if counting:
            self._after()  # its rows computed, not yet read by the count
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self._cursor, name)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_write_below_the_bound_during_a_count_is_not_lost(tmp_path: Path, when: str) -> None:
    """A row stamped below the kept bound written as the count starts (in its snapshot, but not in
    the kept figures: the count is taken again), or below the new bound right after the count's
    snapshot (not in it: the new bound is not kept)."""
    now = time.time_ns()
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        store.write(_rows([(1, 1), (1, 2)], now - 100 * SECOND, end_ns=now))
        assert store.stats() == StoreStats(spans=2, traces=1)  # kept: bound at the last row + 1
        store.write(_rows([(2, 1)], now - 50 * SECOND, end_ns=now))
        stamp = now - 200 * SECOND if when == "before" else now - 60 * SECOND
        done: list[bool] = []

        def late_write() -> None:
            if not done:
                done.append(True)
                store.write(_rows([(3, 1), (1, 3)], stamp, end_ns=now))

        nothing = lambda: None  # noqa: E731
        store._cursor()  # the thread's cursor, made now to wrap it
        store._local.cursor = _CountInterrupted(
            store._local.cursor,
            late_write if when == "before" else nothing,
            late_write if when == "after" else nothing,
        )
        store._stats_cache = None
        counted = store.stats()
        assert done
        expected = StoreStats(spans=5, traces=3) if when == "before" else StoreStats(spans=3, traces=2)
        assert counted == expected
        assert store.stats() == _recount(store) == StoreStats(spans=5, traces=3)


def _check_ranges(store: DuckDBSpanStore) -> None:
    """Every stored row ingested before the ranges' bound lies in its trace hash's range: each
    hash read from the runs at once (in one run only), and a sample asked through ``ranges``."""
    import numpy as np

    ranges = store._trace_ranges
    if ranges is None:
        return
    rows = (
        store._cursor()
        .execute("SELECT hash(trace_id), ingested_ns FROM spans WHERE ingested_ns < ?", [ranges.bound])
        .fetchall()
    )
    hashes = np.array(sorted({h for h, _ in rows}), dtype=np.uint64)
    covering: dict[int, tuple[int, int]] = {}
    for run in ranges.runs:
        at = run.find(hashes)
        hit = at >= 0
        for h, first, last in zip(
            hashes[hit].tolist(), run.first[at[hit]].tolist(), run.last[at[hit]].tolist(), strict=True
        ):
            assert h not in covering, f"hash {h} in two runs"
            covering[h] = (ranges._ns(first, last=False), ranges._ns(last, last=True))
    for h in hashes[:: max(1, len(hashes) // 16)].tolist():
        assert ranges.ranges([h]) == [covering[h]] if h in covering else not ranges.ranges([h])
    for h, ingested in rows:
        held = covering.get(h)
        assert held is not None and held[0] <= ingested <= held[1], (h, ingested)


@pytest.mark.parametrize(("seed", "run_max"), [(4, None), (5, None), (6, 4)])
def test_compaction_in_the_traces_ranges_keeps_the_first_copy_of_every_span(
    make_store: Callable[[], DuckDBSpanStore], seed: int, run_max: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counts and compactions read the older rows of the traces that got rows in those traces'
    ingest ranges (``_TraceRanges``): after any mix of writes (re-sent spans of old traces, rows
    stamped before counted ones), counts, compactions and retention, each compaction leaves
    exactly the first ingested copy of every span, and the ranges cover every row below their
    bound. ``run_max``: the ranges held in runs of at most that many hashes (many runs)."""
    from hourglass.collector.duckdb_store import _TraceRanges

    if run_max is not None:
        monkeypatch.setattr(_TraceRanges, "RUN_MAX", run_max)
    rng = random.Random(seed)
    store = make_store()
    clock = time.time_ns() - 3600 * SECOND
    ranged = 0  # compactions that ran with the ranges
    for step in range(150):
        action = rng.random()
        if action < 0.6:
            clock += SECOND
            stamp = clock
            if rng.random() < 0.2:  # stamped before rows already counted
                stamp = clock - rng.randint(1, 400) * SECOND
            # old traces (low numbers) get re-sent spans and new ones far apart in time
            keys = [(rng.randint(1, 40), rng.randint(1, 6)) for _ in range(rng.randint(1, 20))]
            keys += [(step * 100 + rng.randint(1, 3), 1)]
            store.write(_rows(keys, stamp, end_ns=clock + rng.randint(-50, 50) * SECOND))
        elif action < 0.75:
            store.load_staged()
            firsts = sorted(
                store._cursor()
                .execute("SELECT trace_id, span_id, min(ingested_ns) FROM spans GROUP BY ALL")
                .fetchall()
            )
            ranged += store._trace_ranges is not None and store._dirty_since_ns is not None
            store.compact()
            kept = sorted(
                store._cursor().execute("SELECT trace_id, span_id, ingested_ns FROM spans").fetchall()
            )
            assert kept == firsts, f"step {step}"
        elif action < 0.8:
            store.delete_older_than(clock + rng.randint(-300, -100) * SECOND)
        if rng.random() < 0.3:  # not after every change: compactions also follow late writes uncounted
            assert store.stats() == _recount(store), f"step {step}"
        _check_ranges(store)
    assert ranged > 10
    assert store.stats() == _recount(store)


def test_a_count_reads_the_new_traces_ranges_not_the_whole_table(tmp_path: Path) -> None:
    """With many row groups stored, a count after a few new rows (some of an old trace) caches a
    small part of what the count over every stored trace id cached (the whole trace_id, span_id
    and ingested_ns columns), and is exact."""
    path = str(tmp_path / "spans.duckdb")
    start = time.time_ns() - 7200 * SECOND
    with DuckDBSpanStore(path) as store:
        for group in range(8):  # 8 row groups of 4 spans per trace, a second apart each
            keys = [(group * 30_720 + t, s) for t in range(30_720) for s in range(4)]
            store.write(_rows(keys, start + group * SECOND, end_ns=start))
    with DuckDBSpanStore(path, memory_limit="256MB") as store:
        assert store.stats() == StoreStats(spans=8 * 122_880, traces=8 * 30_720)
        store.write(_rows([(1, 9), (10**6, 1), (10**6, 2), (5, 0)], start + 100 * SECOND, end_ns=start))
        store.release_cache(min_bytes=1, headroom_bytes=0)

        def cached() -> int:
            return int(store.memory_usage()["by_tag"].get("BASE_TABLE", 0))

        before = cached()
        assert store._stats()[0] == StoreStats(spans=8 * 122_880 + 3, traces=8 * 30_720 + 1)
        ranged = cached() - before
        store.release_cache(min_bytes=1, headroom_bytes=0)
        before = cached()
        store._cursor().execute(  # what the count read before: every row's trace id and span id
            "SELECT count(DISTINCT (trace_id, span_id)), min(ingested_ns) FROM spans"
            " WHERE trace_id IN (SELECT trace_id FROM spans WHERE ingested_ns >= ?)",
            [start + 100 * SECOND],
        ).fetchall()
        whole = cached() - before
        assert whole > 4 * max(ranged, 1), (ranged, whole)
        assert store.stats() == _recount(store)


def test_a_trace_read_in_its_ingest_range_is_the_whole_trace(
    make_store: Callable[[], DuckDBSpanStore],
) -> None:
    """``trace()`` reads one trace in its ingest range once the ranges are known: the same rows as
    the read over every stored trace id, with spans written far apart in time, stamped before
    counted rows (no count since), copies, compactions and retention between the reads. (One seed:
    a second one doubled its 12 s in the suite.)"""
    rng = random.Random(6)
    store = make_store()
    clock = time.time_ns() - 3600 * SECOND
    ranged = 0
    for step in range(120):
        action = rng.random()
        if action < 0.6:
            clock += SECOND
            stamp = clock if rng.random() > 0.2 else clock - rng.randint(1, 400) * SECOND
            keys = [(rng.randint(1, 30), rng.randint(1, 6)) for _ in range(rng.randint(1, 10))]
            store.write(_rows(keys, stamp, end_ns=clock + rng.randint(-50, 50) * SECOND))
        elif action < 0.7:
            store.compact()
        elif action < 0.75:
            store.delete_older_than(clock + rng.randint(-300, -100) * SECOND)
        elif action < 0.9:
            store.stats()
        trace_id = f"{rng.randint(1, 31):032x}"
        ranged += store._trace_ranges is not None
        expected = store.scan(trace_ids=[trace_id], columns=SPAN_COLUMNS)
        assert store.trace(trace_id).equals(expected), f"step {step}"
        assert store.trace(trace_id.upper()).equals(expected)
    assert ranged > 50


def test_a_trace_read_while_a_write_below_the_ranges_bound_commits_is_not_torn(
    make_store: Callable[[], DuckDBSpanStore],
) -> None:
    """A write committed between ``trace()``'s look-up of the ranges and its query, with a row of
    that trace stamped below their bound and outside its range (an Export stamped earlier than it
    was inserted) and one stamped now: the read holds both rows or neither, never half the write."""
    store = make_store()
    t0 = time.time_ns() - 3600 * SECOND
    store.write(_rows([(1, 1)], t0, end_ns=t0))
    for i in range(1, 50):
        store.write(_rows([(100 + i, 1)], t0 + i * 60 * SECOND, end_ns=t0))
    store.stats()
    assert store._trace_ranges is not None and store._trace_ranges.bound > t0 + 20 * 60 * SECOND
    real = store.scan_traces
    writes = []

    def racing(*args: object, **kwargs: object) -> pa.Table:
        if not writes:
            late = pa.concat_tables(
                [
                    _rows([(1, 2)], t0 + 20 * 60 * SECOND, end_ns=t0),
                    _rows([(1, 3)], time.time_ns() - 5 * SECOND, end_ns=t0),
                ]
            )
            store.write(late)
            writes.append(late)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    store.scan_traces = racing  # type: ignore[method-assign]
    got = store.trace(f"{1:032x}")
    store.scan_traces = real  # type: ignore[method-assign]
    assert writes and sorted(got.column("span_id").to_pylist()) == [f"{s:016x}" for s in (1, 2, 3)]


def test_retention_drops_the_removed_traces_from_the_trace_ranges(
    make_store: Callable[[], DuckDBSpanStore],
) -> None:
    """The ranges still hold after a retention (each still contains its trace's rows): kept, so
    the next count, compaction and trace read need not rebuild them from every row (a GROUP BY
    of the whole store), with the removed traces' entries dropped, so they hold the stored
    traces only however many retention has removed."""
    store = make_store()
    t0 = time.time_ns() - 3600 * SECOND
    for i in range(40):
        store.write(_rows([(i + 1, 1), (i + 1, 2)], t0 + i * SECOND, end_ns=t0 + i * SECOND))
    store.stats()
    ranges = store._trace_ranges
    assert ranges is not None and len(ranges) == 40
    assert store.delete_older_than(t0 + 10 * SECOND) == 20  # 10 traces of 40 gone
    assert store._trace_ranges is ranges and len(ranges) == 30
    assert store.stats() == _recount(store) == StoreStats(spans=60, traces=30)
    for i in (5, 25):
        trace_id = f"{i:032x}"
        assert store.trace(trace_id).equals(store.scan(trace_ids=[trace_id], columns=SPAN_COLUMNS))
    assert store.delete_older_than(t0 + 30 * SECOND) == 40  # 10 traces left of 40
    assert store._trace_ranges is ranges and len(ranges) == 10
    assert store.stats() == _recount(store) == StoreStats(spans=20, traces=10)
    _check_ranges(store)
    # a span of a removed trace arriving later: a trace of one span, counted and read as such
    store.write(_rows([(3, 7)], time.time_ns(), end_ns=time.time_ns()))
    assert store.stats() == _recount(store) == StoreStats(spans=21, traces=11)
    assert store._trace_ranges is ranges and len(ranges) == 11
    assert store.trace(f"{3:032x}").num_rows == 1
    _check_ranges(store)


def test_retention_whose_ranges_update_fails_still_deletes_and_counts_right(
    make_store: Callable[[], DuckDBSpanStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropping the removed traces from the ranges fails after the deletion: the deletion
    stands, the ranges are dropped (rebuilt at the next count) and the counts are exact."""
    store = make_store()
    t0 = time.time_ns() - 3600 * SECOND
    for i in range(20):
        store.write(_rows([(i + 1, 1), (i + 1, 2)], t0 + i * SECOND, end_ns=t0 + i * SECOND))
    assert store.stats() == StoreStats(spans=40, traces=20)

    def failing(ranges: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(store, "_forget_expired_ranges", failing)
    assert store.delete_older_than(t0 + 5 * SECOND) == 10
    assert store._trace_ranges is None
    assert store.stats() == _recount(store) == StoreStats(spans=30, traces=15)
    assert store._trace_ranges is not None and len(store._trace_ranges) == 15
    _check_ranges(store)


@pytest.mark.parametrize("run_max", [None, 512])
def test_trace_ranges_widen_and_insert_in_hash_order(
    run_max: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_TraceRanges.add`` widens the range of a hash it holds and inserts new hashes in order
    (searched by ``ranges``): checked against a dict over 50 additions that repeat a third of
    the hashes held, hashes above 2^63 included; each range is the true one widened to whole
    seconds (what it keeps: 32-bit seconds), never narrower. ``remove`` drops hashes and keeps
    the others' ranges. ``run_max``: runs so small that the first ranges are split over two
    and merges stop at the cap."""
    import numpy as np

    from hourglass.collector.duckdb_store import _TraceRanges

    if run_max is not None:
        monkeypatch.setattr(_TraceRanges, "RUN_MAX", run_max)

    rng = np.random.default_rng(1)
    truth: dict[int, tuple[int, int]] = {}
    second = 1_000_000_000
    now = 1_796_000_000 * second  # (ingest times of this decade, in ns)

    def figures(n: int) -> dict[str, np.ndarray]:
        hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        if truth:
            hashes[: n // 3] = rng.choice(np.array(list(truth), dtype=np.uint64), n // 3)
        hashes = np.unique(hashes)
        # (an hour of ingest, some rows on a second's boundary)
        first = (
            now + rng.integers(0, 3600, len(hashes)) * second + rng.choice([0, 1, 999_999_999], len(hashes))
        )
        return {"h": hashes, "first": first, "last": first + rng.integers(0, 3 * second, len(hashes))}

    def record(f: dict[str, np.ndarray]) -> None:
        for h, a, b in zip(f["h"].tolist(), f["first"].tolist(), f["last"].tolist(), strict=True):
            held = truth.get(h)
            truth[h] = (a, b) if held is None else (min(a, held[0]), max(b, held[1]))

    start = figures(1000)
    ranges = _TraceRanges(start, 0)
    record(start)
    for step in range(50):
        more = figures(300)
        ranges.add(more, step)
        record(more)
    assert ranges.bound == 49
    assert len(ranges) == len(truth) and ranges.nbytes == 16 * len(truth)
    for run in ranges.runs:  # sorted runs, a hash in one run only
        assert bool(np.all(run.keys[1:] > run.keys[:-1])) and len(run.keys) <= ranges.RUN_MAX
    assert len(np.unique(np.concatenate([run.keys for run in ranges.runs]))) == len(truth)
    # (merged while of like size: not a run per addition; capped runs: at least a half-full one
    # per two runs)
    assert len(ranges.runs) < 15 + 4 * len(truth) // ranges.RUN_MAX
    for h, (first, last) in truth.items():
        assert ranges.ranges([h]) == [(first // second * second, -(-last // second) * second)]
    assert ranges.ranges([h for h in range(5)]) == []  # (none of these held)
    # removal: a third of the hashes held and some never held; the rest as they were
    held = np.array(list(truth), dtype=np.uint64)
    gone = held[::3]
    assert ranges.remove(np.concatenate([gone, np.arange(5, dtype=np.uint64)])) == len(gone)
    assert len(ranges) == len(truth) - len(gone)
    assert ranges.ranges(gone) == []
    for h in held[1::3].tolist():
        first, last = truth[h]
        assert ranges.ranges([h]) == [(first // second * second, -(-last // second) * second)]
    # a removed hash seen again: a new range, its own rows only
    ranges.add({"h": gone[:1], "first": np.array([now]), "last": np.array([now])}, 50)
    assert ranges.ranges(gone[:1]) == [(now, now)]


def test_trace_ranges_beyond_32_bits_of_seconds_are_open_on_that_side() -> None:
    """An end more than 68 years from the ranges' base second does not fit their 32-bit seconds:
    the range is open on that side (it still contains the rows), whether made so or widened to it."""
    import numpy as np

    from hourglass.collector.duckdb_store import _INT64_MAX, _TraceRanges

    second = 1_000_000_000
    now = 1_796_000_000 * second
    far = 100 * 365 * 86_400 * second  # a century
    h = np.array([1, 2, 3, 4], dtype=np.uint64)
    first = np.array([now, now, now + far, now - 2 * second], dtype=np.int64)
    last = np.array([now + second // 2, now + far, now + far + 1, now], dtype=np.int64)
    ranges = _TraceRanges({"h": h, "first": first, "last": last}, 0)
    assert ranges.ranges([1]) == [(now, now + second)]
    assert ranges.ranges([2]) == [(now, _INT64_MAX)]
    assert ranges.ranges([4]) == [(now - 2 * second, now)]  # (the base: the earliest second)
    (third,) = ranges.ranges([3])
    assert third[0] <= now + far and third[1] == _INT64_MAX
    ranges.add(
        {"h": np.array([1], dtype=np.uint64), "first": np.array([now - far]), "last": np.array([now])}, 1
    )
    assert ranges.ranges([1]) == [(-_INT64_MAX - 1, now + second)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("heavy", ["count", "compact", "retention"])
def test_counts_compaction_and_retention_wait_for_a_serialized_read(tmp_path: Path, heavy: str) -> None:
    """The store's memory-heavy queries run one at a time: a count of its spans, a compaction or
    a retention asked for while a thread reads under ``serialized()`` (serve's reads for its
    analysis worker) waits for that read to end, so their peaks do not add up (in a soak the
    round's count ran beside the worker's reads, compaction beside both)."""
    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"))
    try:
        store.write(_rows([(t, s) for t in range(50) for s in range(4)], 1 * SECOND, 2 * SECOND))
        store.write(_rows([(0, 0), (1, 1)], 2 * SECOND, 2 * SECOND))  # copies: compaction's work
        run: Callable[[], object] = {
            "count": store.stats,
            "compact": store.compact,
            "retention": lambda: store.delete_older_than(3 * SECOND),
        }[heavy]
        with store.serialized():
            other = threading.Thread(target=run)
            other.start()
            other.join(0.5)  # (done at once when nothing holds it back)
            assert other.is_alive()
            # the rows stay readable meanwhile (a read not serialized does not wait)
            assert store.scan(columns=("trace_id",)).num_rows >= 200
        other.join(30)
        assert not other.is_alive()
        assert store.stats() == _recount(store)
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_a_count_waiting_for_a_serialized_read_does_not_hold_back_the_cache_release(tmp_path: Path) -> None:
    """A count that waits for a serialized read waits outside the read gate: it is not a read in
    flight, so the release of the buffer pool the read ends with (serve's ``reader.release()``)
    still frees what the read cached (it skipped its turn while a count waited)."""
    path = str(tmp_path / "s.duckdb")
    store = DuckDBSpanStore(path)
    for i in range(10):
        rows = [(t, s) for t in range(i * 20_000, (i + 1) * 20_000) for s in range(4)]
        store.write(_rows(rows, (i + 1) * SECOND, 2 * SECOND))
    store.stats()
    store.close()
    store = DuckDBSpanStore(path)  # (nothing cached yet)
    try:
        store.write(_rows([(999_999, 1)], 20 * SECOND, 2 * SECOND))  # a change: the next count recounts
        with store.serialized():
            store.scan(columns=("trace_id", "span_id", "raw"))  # the worker's read
            count = threading.Thread(target=store.stats)
            count.start()
            count.join(0.3)
            assert count.is_alive()  # (waiting for the read)
            released = store.release_cache(min_bytes=1, headroom_bytes=0)
            assert released > 0
        count.join(30)
        assert not count.is_alive()
        assert store.stats() == _recount(store)
    finally:
        store.close()
