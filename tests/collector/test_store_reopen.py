"""``DuckDBSpanStore.reopen``: the database file closed and opened again in place (serve does it
now and then: a live DuckDB database keeps heap for every row group it wrote). A fresh database
instance, the same rows and figures, and nothing else the store does ever notices: no write is
lost or refused, no read sees a closed connection, a read in flight is never cut."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import ANALYSIS_COLUMNS
from hourglass.collector.store import StoreStats
from tests.builders import TraceBuilder, spans_table

SECOND = 10**9
T0 = 1_700_000_000 * SECOND


def _template() -> pa.Table:
    b = TraceBuilder(service="svc")
    b.span("op", start_ms=0, dur_ms=1)
    return spans_table(b)


TEMPLATE = _template()


def _rows(first_trace: int, traces: int, spans_per_trace: int = 3, ingested_ns: int = T0) -> pa.Table:
    """``traces`` traces of ``spans_per_trace`` spans each, numbered from ``first_trace``."""
    keys = [(t, s) for t in range(first_trace, first_trace + traces) for s in range(spans_per_trace)]
    table = TEMPLATE.take([0] * len(keys))
    columns = {
        "trace_id": pa.array([f"{t:032x}" for t, _ in keys]),
        "span_id": pa.array([f"{t:08x}{s:08x}" for t, s in keys]),
        "ingested_ns": pa.array([ingested_ns + t for t, _ in keys], pa.int64()),
        "start_ns": pa.array([T0 + t * 1000 + s for t, s in keys], pa.int64()),
        "end_ns": pa.array([T0 + t * 1000 + s + 500 for t, s in keys], pa.int64()),
    }
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _recent(store: DuckDBSpanStore) -> tuple[bytes, int]:
    """(the epoch, traces) of ``recent_arrivals`` since 0; the reader not kept (a DuckDB result
    left referenced keeps its database instance alive)."""
    with store.stream_recent_arrivals(0, []) as reader:
        return reader.schema.metadata[b"epoch"], reader.read_all().num_rows


def _databases(store: DuckDBSpanStore) -> set[str]:
    with store._write_lock:  # (the writer's cursor is the loader thread's too)
        rows = store._writer.execute("SELECT database_name FROM duckdb_databases()").fetchall()
    return {str(r[0]) for r in rows}


@pytest.mark.parametrize("ingest_log", [True, False])
def test_a_reopen_opens_a_new_database_with_the_same_rows_and_figures(
    tmp_path: Path, ingest_log: bool
) -> None:
    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"), ingest_log=ingest_log, threads=1)
    try:
        store.write(_rows(0, 200))
        before = store.stats()
        assert before == StoreStats(spans=600, traces=200)
        epoch, _ = _recent(store)
        # a thread's cursor made before the reopen (the cursors belong to the old connection)
        cursor_made: list[StoreStats] = []
        seen_after: list[int] = []
        go = threading.Event()

        def other_thread() -> None:
            store._cursor()
            cursor_made.append(store.stats())
            go.wait(10)
            seen_after.append(store.trace(f"{7:032x}").num_rows)

        thread = threading.Thread(target=other_thread)
        thread.start()
        # something that lives only as long as the database instance: gone once it was really reopened
        with store._write_lock:
            store._writer.execute("ATTACH ':memory:' AS instance_probe")
        assert "instance_probe" in _databases(store)
        assert store.rows_since_open() == 600
        while not cursor_made:
            thread.join(0.01)

        assert store.reopen() is True

        assert "instance_probe" not in _databases(store)
        assert store.rows_since_open() == 0
        go.set()
        thread.join(10)
        assert seen_after == [3]
        assert store.stats() == before
        assert store._cursor().execute("SELECT count(*) FROM spans").fetchall()[0][0] == 600
        assert _recent(store) == (epoch, 200)  # (the same stored rows: not a new store)
        store.write(_rows(200, 10))
        assert store.stats() == StoreStats(spans=630, traces=210)
        assert store.rows_since_open() == 30
    finally:
        store.close()
    with DuckDBSpanStore(str(tmp_path / "s.duckdb")) as reopened:
        assert reopened.stats() == StoreStats(spans=630, traces=210)


def test_in_memory_and_read_only_stores_are_not_reopened(tmp_path: Path) -> None:
    with DuckDBSpanStore(":memory:") as memory:
        memory.write(_rows(0, 5))
        assert memory.reopen() is False  # (in memory, the database is the data)
        assert memory.stats() == StoreStats(spans=15, traces=5)
    path = str(tmp_path / "s.duckdb")
    with DuckDBSpanStore(path) as store:
        store.write(_rows(0, 5))
    with DuckDBSpanStore(path, read_only=True) as read_only:
        assert read_only.reopen() is False
        assert read_only.stats() == StoreStats(spans=15, traces=5)


def test_a_reopen_waits_for_a_read_in_flight_and_gives_up_rather_than_cut_it(tmp_path: Path) -> None:
    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"), ingest_log=True, threads=1)
    try:
        store.write(_rows(0, 300))
        ids = [f"{t:032x}" for t in range(300)]
        with store.stream_traces(ids, columns=ANALYSIS_COLUMNS, batch_rows=100, sort_rows=100) as reader:
            batches = iter(reader)
            first = next(batches)
            # from another thread (the serve maintenance's), while this read is open
            answer: list[bool] = []
            other = threading.Thread(target=lambda: answer.append(store.reopen(wait_s=0.3)))
            other.start()
            other.join(30)
            assert answer == [False]
            rest = sum(batch.num_rows for batch in batches)  # the read goes on, on its connection
        assert first.num_rows + rest == 900
        assert store.reopen() is True  # once no read is in flight
        assert store.stats() == StoreStats(spans=900, traces=300)
    finally:
        store.close()


def test_writes_and_reads_beside_reopens_never_fail_and_lose_nothing(tmp_path: Path) -> None:
    """Ingest (the ingest log's stage and loader), counts, streamed and whole reads, and the
    memory figures of /v1/stats run in threads while the store is reopened again and again."""
    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"), ingest_log=True, threads=1)
    errors: list[BaseException] = []
    stop = threading.Event()
    written = [0]
    writes_done = threading.Event()

    def guarded(work: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                work()
            except BaseException as exc:  # (reported by the test)
                errors.append(exc)

        return threading.Thread(target=run)

    def writer() -> None:
        for batch in range(150):
            store.write(_rows(batch * 20, 20, ingested_ns=T0 + batch * SECOND))
            written[0] += 60
        writes_done.set()

    def counter() -> None:
        while not stop.is_set():
            store.stats()

    def streamer() -> None:
        while not stop.is_set():
            with store.stream_recent_arrivals(0, []) as reader:
                for _ in reader:
                    pass
            with store.stream_traces([f"{t:032x}" for t in range(40)], batch_rows=16) as reader:
                for _ in reader:
                    pass

    def reader() -> None:
        while not stop.is_set():
            store.trace(f"{3:032x}")
            store.memory_usage()
            store.services()

    threads = [guarded(w) for w in (writer, counter, streamer, reader)]
    for thread in threads:
        thread.start()
    reopened = 0
    try:
        while not writes_done.is_set() or reopened < 5:
            if store.reopen(wait_s=5.0):
                reopened += 1
            if errors:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    try:
        assert not errors, errors
        assert reopened >= 5
        assert written[0] == 9000
        assert store.stats() == StoreStats(spans=9000, traces=3000)
    finally:
        store.close()
    with DuckDBSpanStore(str(tmp_path / "s.duckdb")) as again:
        assert again.stats() == StoreStats(spans=9000, traces=3000)


def test_a_failed_reopen_keeps_ingest_durable_and_the_next_one_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.duckdb")
    store = DuckDBSpanStore(path, ingest_log=True, threads=1)
    try:
        store.write(_rows(0, 10))
        store.load_staged()
        real_connect = store._connect

        def cannot_open() -> duckdb.DuckDBPyConnection:
            raise duckdb.IOException("IO Error: the disk went away")

        monkeypatch.setattr(store, "_connect", cannot_open)
        with pytest.raises(duckdb.IOException):
            store.reopen()
        assert store.rows_since_open() == -1  # (serve's maintenance then retries at its next tick)
        store.write(_rows(10, 10))  # accepted: logged (durable) and staged
        with pytest.raises(duckdb.Error):
            store.stats()  # reads fail plainly meanwhile
        monkeypatch.setattr(store, "_connect", real_connect)
        assert store.reopen() is True
        assert store.stats() == StoreStats(spans=60, traces=20)
        # failed again, then closed (shutdown): the staged rows stay in the ingest log
        monkeypatch.setattr(store, "_connect", cannot_open)
        store.write(_rows(20, 10))
        with pytest.raises(duckdb.IOException):
            store.reopen()
        store.close()
    finally:
        store.close()
    with DuckDBSpanStore(path) as again:  # the log replayed
        assert again.stats() == StoreStats(spans=90, traces=30)


def test_reopen_waits_for_a_heavy_query_at_most_its_wait(tmp_path: Path) -> None:
    """A count, compaction, retention or the analysis worker's reads (``serialized``) in
    progress: the reopen waits for it, at most ``wait_s``, then gives up."""
    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"), ingest_log=True, threads=1)
    try:
        store.write(_rows(0, 10))
        held = threading.Event()
        release = threading.Event()

        def worker_reads() -> None:
            with store.serialized():
                held.set()
                release.wait(30)

        thread = threading.Thread(target=worker_reads)
        thread.start()
        held.wait(10)
        assert store.reopen(wait_s=0.2) is False
        release.set()
        thread.join(10)
        assert store.reopen(wait_s=0.2) is True
    finally:
        store.close()


_HOLDER = """
import sys, time
from hourglass.collector.ingest_log import IngestLog
log = IngestLog(sys.argv[1])
print("ready", flush=True)
time.sleep(60)
"""


def _holding(directory: Path) -> subprocess.Popen[str]:
    """A process that holds the ingest log in ``directory`` open (as a running serve does)."""
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory)], stdout=subprocess.PIPE, text=True, cwd=root
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "ready"
    return holder


def test_a_store_whose_ingest_log_another_process_holds_is_not_opened(tmp_path: Path) -> None:
    """In the moment serve's store reopens its database, another process could open the file:
    before, `hourglass analyze --db` (or any store opener) then replayed serve's live ingest log
    and deleted it, and spans serve had acknowledged were lost. The log is locked by the process
    that has it open: the opener fails with the lock error every command explains, lets go of
    the database file at once (serve's reconnect gets it back), and the log is left as it was."""
    path = str(tmp_path / "s.duckdb")
    store = DuckDBSpanStore(path, ingest_log=True)
    store.write(_rows(0, 50, spans_per_trace=1))
    store.close()  # (the log replayed and removed: made again below, as a live serve's)
    log_dir = Path(f"{path}.ingest-log")
    log_dir.mkdir()
    (log_dir / "segment-0000000000000000.arrow").write_bytes(b"")  # a live log's content, any
    holder = _holding(log_dir)
    before = sorted(p.name for p in log_dir.iterdir())
    try:
        with pytest.raises(OSError, match="Could not set lock"):
            DuckDBSpanStore(path, ingest_log=True)
        with pytest.raises(OSError, match="in use by another process"):
            DuckDBSpanStore(path)  # (a command's open: it would replay the log)
        assert sorted(p.name for p in log_dir.iterdir()) == before  # nothing replayed, cut or removed
        duckdb.connect(path).close()  # the database file was let go of
    finally:
        holder.kill()
        holder.wait(10)
    store = DuckDBSpanStore(path)  # the holder gone: opened as before
    assert store.stats().spans == 50
    store.close()
