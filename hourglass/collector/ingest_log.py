"""The ingest log: a write-ahead log of span batches in front of the DuckDB span table.

Why: DuckDB compresses a row group once, when it is written straight to the data file, only
for inserts of at least one full row group (122,880 rows). Smaller inserts go to DuckDB's own
write-ahead log and are compressed again at every checkpoint. Under load, group commits are a
few thousand spans each, and that path cost ~6.7 µs of the writer per span (half of it in
checkpoints), which capped ingest near 150k spans/s. Here a group commit is made durable by
appending its Arrow IPC to this log and fsyncing it (~0.3 µs/span). The rows are staged in
memory and loaded into DuckDB in whole row groups (~1.6 µs/span). Measured in bench/ingest.py.

Contract (``hourglass.collector.duckdb_store.DuckDBSpanStore`` uses it when opened with ``ingest_log=True``):

- ``append(table)`` returns once the batch is on disk (fdatasync): an Export is acknowledged
  after that. Rows are numbered in log order; ``applied`` is how many leading rows are in DuckDB.
- Records are ``MAGIC | crc32 | first_row | row_count | length | Arrow IPC stream``. A torn or
  corrupt tail (a crash in the middle of an append, which was therefore never acknowledged) is
  cut off when the log is opened; the good records before it are kept.
- ``replay()`` gives every logged row not yet applied, after a crash. A crash between a DuckDB
  insert and the ``applied`` update re-inserts those rows: the store tolerates duplicates (reads
  keep one row per span; compaction removes them).
- ``mark_applied(rows)`` persists the count (write + fsync + rename) and deletes segments whose
  rows are all applied.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # (not on Windows: no lock there)
    fcntl = None  # type: ignore[assignment]

import pyarrow as pa

log = logging.getLogger("hourglass.ingest_log")

MAGIC = b"HGL1"
_HEADER = struct.Struct("<4sIQQQ")  # magic, crc32 of the payload, first row, rows, payload length
SEGMENT_BYTES = 128 * 1024 * 1024
_SEGMENT_GLOB = "segment-*.hglog"
_APPLIED_FILE = "applied"


@dataclass
class _Segment:
    path: Path
    first_row: int
    end_row: int  # one past the last row logged in it


def _segment_path(directory: Path, first_row: int) -> Path:
    return directory / f"segment-{first_row:020d}.hglog"


def _ipc_bytes(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


_LOCK_FILE = "lock"


class IngestLogInUse(OSError):
    """Another process has this ingest log open (a running ``hourglass serve``)."""


class IngestLog:
    """Append-only, segmented, checksummed log of Arrow tables in ``directory``.

    One process at a time: an open log holds an exclusive ``flock`` on ``directory/lock`` until
    it is closed (or its process ends), and opening a log another process holds raises
    :class:`IngestLogInUse` before anything in it is read, cut or replayed. (The database file's
    own lock does not cover the log: serve's store reopens its database now and then, and in
    that moment another process could open the file, replay serve's live log and delete it.)"""

    def __init__(self, directory: str | Path, *, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            # the new directory's entry lives in its parent: make it durable before any segment
            # in it is trusted (an fsynced segment in a directory a crash forgets is lost)
            _fsync_directory(self.directory)
            _fsync_directory(self.directory.parent)
        self._lock: int | None = os.open(self.directory / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            self._lock = None
            raise IngestLogInUse(
                f"Could not set lock on file {self.directory}: the ingest log is in use by another process "
                "(a running `hourglass serve`?)"
            ) from None
        self.segment_bytes = segment_bytes
        self.applied = self._read_applied()
        self._segments: list[_Segment] = []
        self.next_row = self.applied
        for first_row, path in sorted(
            (int(p.stem.split("-")[1]), p) for p in self.directory.glob(_SEGMENT_GLOB)
        ):
            end_row, good_bytes = self._scan_segment(path, first_row)
            if good_bytes < path.stat().st_size:
                log.warning(
                    "ingest log %s: cutting a torn or corrupt tail at byte %d (%d bytes; never acknowledged)",
                    path,
                    good_bytes,
                    path.stat().st_size - good_bytes,
                )
                with path.open("r+b") as f:
                    f.truncate(good_bytes)
                    os.fsync(f.fileno())
            self._segments.append(_Segment(path, first_row, end_row))
            self.next_row = max(self.next_row, end_row)
        self._file: int | None = None
        self._file_bytes = 0

    # -- reading -------------------------------------------------------------------------------
    def _read_applied(self) -> int:
        try:
            return int((self.directory / _APPLIED_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    @staticmethod
    def _records(path: Path) -> Iterator[tuple[int, int, int, memoryview]]:
        """(byte offset after the record, first_row, rows, payload) of every intact record."""
        data = memoryview(path.read_bytes())
        position = 0
        while position + _HEADER.size <= len(data):
            magic, crc, first_row, rows, length = _HEADER.unpack_from(data, position)
            start = position + _HEADER.size
            end = start + length
            if magic != MAGIC or end > len(data):
                return
            payload = data[start:end]
            if zlib.crc32(payload) != crc:
                return
            position = end
            yield position, first_row, rows, payload

    def _scan_segment(self, path: Path, first_row: int) -> tuple[int, int]:
        end_row, good_bytes = first_row, 0
        for position, record_first, rows, _ in self._records(path):
            end_row, good_bytes = record_first + rows, position
        return end_row, good_bytes

    def replay(self) -> Iterator[pa.Table]:
        """Every logged row not yet applied, in log order."""
        for segment in self._segments:
            if segment.end_row <= self.applied:
                continue
            for _, first_row, rows, payload in self._records(segment.path):
                if first_row + rows <= self.applied:
                    continue
                table = pa.ipc.open_stream(pa.py_buffer(bytes(payload))).read_all()
                skip = max(0, self.applied - first_row)
                yield table.slice(skip) if skip else table

    # -- writing -------------------------------------------------------------------------------
    def _open_segment(self) -> int:
        path = _segment_path(self.directory, self.next_row)
        if path.exists() and self._scan_segment(path, self.next_row)[1] != path.stat().st_size:
            # left torn by an append whose cut failed: keep its good records, write elsewhere
            path = path.with_name(f"{path.stem}-{time.time_ns()}.hglog")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # the same file may already be listed (empty: reopened after a failed first append, or
        # found empty at start-up): one entry per file, or mark_applied would delete the live one
        self._segments = [segment for segment in self._segments if segment.path != path]
        self._segments.append(_Segment(path, self.next_row, self.next_row))
        self._file_bytes = os.fstat(fd).st_size
        _fsync_directory(self.directory)
        return fd

    def append(self, table: pa.Table) -> None:
        """Log ``table`` and make it durable (fdatasync) before returning."""
        rows = table.num_rows
        if rows == 0:
            return
        if self._file is None or self._file_bytes >= self.segment_bytes:
            if self._file is not None:
                os.close(self._file)
            self._file = self._open_segment()
        payload = _ipc_bytes(table)
        header = _HEADER.pack(MAGIC, zlib.crc32(payload), self.next_row, rows, payload.size)
        try:
            written = os.writev(self._file, [header, payload])
            if written != len(header) + payload.size:  # a short write on a full disk: fail, never ack
                raise OSError(f"ingest log {self._segments[-1].path}: short write ({written} bytes)")
            os.fdatasync(self._file)
        except OSError:
            # Not acknowledged. Cut what this append left so that later records do not follow a
            # torn one (replay stops at the first bad record); if even that fails, the next
            # append starts a new segment file.
            with contextlib.suppress(OSError):
                os.ftruncate(self._file, self._file_bytes)
                os.fdatasync(self._file)
            os.close(self._file)
            self._file = None
            raise
        self._file_bytes += written
        self.next_row += rows
        self._segments[-1].end_row = self.next_row

    def mark_applied(self, rows: int) -> None:
        """Record that the first ``rows`` logged rows are in the store; drop segments no longer needed."""
        if rows <= self.applied:
            return
        self.applied = rows
        temporary = self.directory / f"{_APPLIED_FILE}.tmp"
        with temporary.open("w") as f:
            f.write(str(rows))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.directory / _APPLIED_FILE)
        # the rename is durable only once the directory is: without this a crash could bring
        # back the old count, and the segments deleted below would be replayed from nothing
        _fsync_directory(self.directory)
        keep: list[_Segment] = []
        drop: list[_Segment] = []
        for index, segment in enumerate(self._segments):
            is_current = index == len(self._segments) - 1 and self._file is not None
            (drop if segment.end_row <= rows and not is_current else keep).append(segment)
        in_use = {segment.path for segment in keep}
        for segment in drop:
            if segment.path not in in_use:  # never a file a kept entry still writes or needs
                segment.path.unlink(missing_ok=True)
        self._segments = keep

    def close(self, *, remove: bool = False) -> None:
        """Close the open segment; with ``remove`` (everything applied), delete the log."""
        if self._file is not None:
            os.close(self._file)
            self._file = None
        if remove and self.applied >= self.next_row:
            for segment in self._segments:
                segment.path.unlink(missing_ok=True)
            self._segments = []
            (self.directory / _APPLIED_FILE).unlink(missing_ok=True)
            if self._lock is not None:  # (still held: no other process uses the log meanwhile)
                (self.directory / _LOCK_FILE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # something else lives there: leave it
                self.directory.rmdir()
        if self._lock is not None:
            os.close(self._lock)  # (the flock goes with it)
            self._lock = None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
