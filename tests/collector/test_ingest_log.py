"""hourglass.collector.ingest_log and the store's ingest-log mode: durable on append, loaded in whole row
groups, read-your-writes, replay after a crash, torn tails cut."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector import duckdb_store
from hourglass.collector.duckdb_store import ROW_GROUP_ROWS, DuckDBSpanStore
from hourglass.collector.ingest_log import IngestLog
from tests.builders import TraceBuilder, spans_table


def _batch(first: int, count: int) -> pa.Table:
    """``count`` spans in traces of 5, numbered from ``first`` (unique ids)."""
    builders = []
    for t in range(first // 5, (first + count) // 5):
        builder = TraceBuilder(trace_id=f"{t + 1:032x}")
        root = builder.span("root", start_ms=0, dur_ms=10)
        for c in range(4):
            builder.span(f"child-{c}", parent=root, start_ms=c, dur_ms=1)
        builders.append(builder)
    return spans_table(builders)


def test_log_round_trip_partial_apply_and_segments(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    ingest_log = IngestLog(directory, segment_bytes=1)  # every append opens a new segment
    batches = [_batch(i * 10, 10) for i in range(4)]
    for batch in batches:
        ingest_log.append(batch)
    assert ingest_log.next_row == 40
    assert len(list(directory.glob("segment-*.hglog"))) == 4
    ingest_log.mark_applied(15)  # the first segment and half of the second are in the store
    assert len(list(directory.glob("segment-*.hglog"))) == 3
    ingest_log.close()

    reopened = IngestLog(directory)
    assert reopened.applied == 15 and reopened.next_row == 40
    replayed = pa.concat_tables(list(reopened.replay()))
    assert replayed.equals(pa.concat_tables(batches).slice(15))


def _two_records(directory: Path) -> Path:
    """A closed log of two 10-row records in one segment; returns the segment."""
    ingest_log = IngestLog(directory)
    ingest_log.append(_batch(0, 10))
    ingest_log.append(_batch(10, 10))
    ingest_log.close()
    [segment] = directory.glob("segment-*.hglog")
    return segment


def test_torn_tail_is_cut_and_earlier_records_kept(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    segment = _two_records(directory)
    size = segment.stat().st_size
    with segment.open("r+b") as f:  # a crash in the middle of the second append
        f.truncate(size - 100)
    reopened = IngestLog(directory)
    assert reopened.next_row == 10
    assert pa.concat_tables(list(reopened.replay())).num_rows == 10
    reopened.append(_batch(20, 10))  # appends continue after the cut
    reopened.close()
    assert IngestLog(directory).next_row == 20


def test_corrupt_record_ends_the_log(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    segment = _two_records(directory)
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the last record's payload: its checksum fails
    segment.write_bytes(bytes(data))
    assert IngestLog(directory).next_row == 10


def test_store_reads_see_staged_rows_and_close_removes_the_log(tmp_path: Path) -> None:
    db = tmp_path / "spans.duckdb"
    store = DuckDBSpanStore(str(db), ingest_log=True, threads=1)
    store.write(_batch(0, 50))
    assert (tmp_path / "spans.duckdb.ingest-log").is_dir()
    assert store.raw_row_count() == 50  # staged, counted without loading
    assert store.stats().spans == 50  # a read loads what is staged first
    store.write(_batch(50, 50))
    assert store.scan().num_rows == 100
    assert store.trace(f"{1:032x}").num_rows == 5
    store.close()
    assert not (tmp_path / "spans.duckdb.ingest-log").exists()
    with DuckDBSpanStore(str(db)) as reopened:
        assert reopened.stats().spans == 100


def test_loader_inserts_whole_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(duckdb_store, "ROW_GROUP_ROWS", 100)
    inserted: list[int] = []
    original = DuckDBSpanStore._insert

    def spy(self: DuckDBSpanStore, spans: pa.Table) -> None:
        inserted.append(spans.num_rows)
        original(self, spans)

    monkeypatch.setattr(DuckDBSpanStore, "_insert", spy)
    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"), ingest_log=True, threads=1)
    for i in range(5):
        store.write(_batch(i * 70, 70))  # 350 rows: the loader takes 300 in multiples of 100
    deadline = time.monotonic() + 10
    while sum(inserted) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(inserted) == 300 and all(n % 100 == 0 for n in inserted)
    assert store.stats().spans == 350  # the read loads the remaining 50
    assert inserted[-1] == 50
    store.close()


def _write_then_die(db: str, batches: int) -> None:
    store = DuckDBSpanStore(db, ingest_log=True, threads=1)
    store.write(_batch(0, ROW_GROUP_ROWS // 1000 * 5))  # staged only: below a row group
    for i in range(1, batches):
        store.write(_batch(i * 1000, 1000))
    os._exit(0)  # no close: as after kill -9, every write() that returned must survive


def test_rows_written_before_a_crash_are_replayed_on_open(tmp_path: Path) -> None:
    db = str(tmp_path / "spans.duckdb")
    DuckDBSpanStore(db).close()  # the database file exists, as under serve
    child = multiprocessing.get_context("spawn").Process(target=_write_then_die, args=(db, 6))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert (tmp_path / "spans.duckdb.ingest-log").is_dir()
    with DuckDBSpanStore(db) as store:  # any open replays; this one writes directly afterwards
        assert store.stats().spans == ROW_GROUP_ROWS // 1000 * 5 + 5 * 1000
    assert not (tmp_path / "spans.duckdb.ingest-log").exists()


def test_log_of_a_deleted_database_is_not_replayed(tmp_path: Path) -> None:
    db = tmp_path / "spans.duckdb"
    directory = tmp_path / "spans.duckdb.ingest-log"
    ingest_log = IngestLog(directory)
    ingest_log.append(_batch(0, 10))
    ingest_log.close()
    with DuckDBSpanStore(str(db)) as store:
        assert store.stats().spans == 0
    assert not directory.exists()
    [aside] = tmp_path.glob("spans.duckdb.ingest-log.orphaned-*")  # set aside, not deleted
    assert pa.concat_tables(list(IngestLog(aside).replay())).num_rows == 10


def test_a_home_relative_path_finds_its_log_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DuckDB expands "~" (HOURGLASS_DB=~/x.duckdb from a unit file); the log must follow it
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    DuckDBSpanStore("~/spans.duckdb").close()
    ingest_log = IngestLog(tmp_path / "spans.duckdb.ingest-log")  # as a killed serve leaves it
    ingest_log.append(_batch(0, 10))
    ingest_log.close()
    with DuckDBSpanStore("~/spans.duckdb") as store:
        assert store.stats().spans == 10


def test_an_empty_segment_reopened_is_not_deleted_under_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # found in review: a segment file reopened (after a failed first append, or found empty at
    # start-up) was listed twice, and mark_applied deleted the live file
    directory = tmp_path / "log"
    ingest_log = IngestLog(directory)
    real_fdatasync = os.fdatasync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", disk_full)
    with pytest.raises(OSError):
        ingest_log.append(_batch(0, 10))
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    first, second = _batch(10, 10), _batch(20, 10)
    ingest_log.append(first)
    ingest_log.append(second)
    ingest_log.mark_applied(10)
    ingest_log.close()
    assert pa.concat_tables(list(IngestLog(directory).replay())).equals(second)


def test_a_failed_append_leaves_no_torn_record_before_later_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "log"
    ingest_log = IngestLog(directory)
    first, lost, last = _batch(0, 10), _batch(10, 10), _batch(20, 10)
    ingest_log.append(first)
    real_fdatasync = os.fdatasync

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdatasync", disk_full)
    with pytest.raises(OSError, match="No space"):
        ingest_log.append(lost)  # written, but not durable: not acknowledged
    monkeypatch.setattr(os, "fdatasync", real_fdatasync)
    ingest_log.append(last)  # acknowledged: must be readable after it
    ingest_log.close()
    replayed = pa.concat_tables(list(IngestLog(directory).replay()))
    assert replayed.equals(pa.concat_tables([first, last]))


def test_directory_entries_are_fsynced_after_mkdir_and_after_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15.7: a new log directory and the applied-count rename survive a power cut only when
    the directories holding their entries are fsynced, not only after a new segment."""
    from hourglass.collector import ingest_log

    events: list[tuple[str, str]] = []
    real_fsync_directory = ingest_log._fsync_directory
    real_replace = os.replace

    def fsync_directory(directory: Path) -> None:
        events.append(("fsync", str(directory)))
        real_fsync_directory(directory)

    def replace(src: object, dst: object) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest_log, "_fsync_directory", fsync_directory)
    monkeypatch.setattr(ingest_log.os, "replace", replace)
    directory = tmp_path / "nested" / "db.ingest-log"
    log = IngestLog(directory)
    assert ("fsync", str(directory)) in events and ("fsync", str(directory.parent)) in events
    log.append(_batch(0, 10))
    events.clear()
    log.mark_applied(10)
    replaced = events.index(("replace", str(directory / "applied")))
    assert ("fsync", str(directory)) in events[replaced + 1 :]
    log.close()
