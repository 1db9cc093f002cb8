"""Extracted rows that grow with spans, kept on disk in buckets of whole keys (issue 11's memory bound).

Most extracted rows are few: one per candidate occurrence or per signature. A table whose rows
grow with the spans themselves and that the decision groups by a key — the lock-convoy rule's
resource rows (``lock_contention.candidates``, one row per span with a duration, ~80 bytes a span
measured on the generated mix, two thirds of every extracted byte), or missing_timeout's
``calls`` (every call's operation and duration, for each operation's exact median), or
batchable_calls' ``spans`` (the span ids of every candidate group's calls) — would make the
deciding process grow with the store. So a partitioned run writes such a table, in each partition's task,
to Parquet files bucketed by ``hash(key) mod B`` (``<folder>/<kind>.<table>/b<bucket>/p<part>``),
leaves an empty table of the same columns in the rows that travel back, and the decision reads
the files one bucket at a time: every row of a key is in one bucket, so a rule per key sees all
of its rows, and the deciding process holds one bucket, not the table.

``SPILLABLE`` lists the tables and their keys (``SPILL_KEYS`` of the detector's module) and the
detector's decision that takes the buckets. ``tests/analysis/test_partitions.py`` checks the
findings and near misses are those of the whole for several bucket counts.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from hourglass.analysis import scratch
from hourglass.analysis.detectors import batchable_calls, lock_contention, missing_timeout
from hourglass.analysis.detectors._common import NearMissSink, Rows
from hourglass.analysis.model import Finding


def write_whole(target: Path, write: Callable[[Path], object], *, make_folder: bool = True) -> None:
    """``write`` to a file of this process beside ``target``, then renamed into place: a reader
    sees the file whole or not at all, and a retried task (another process) writes it again.
    A write that fails (a full disk, an interruption) removes its unfinished file and raises.
    ``make_folder=False``: the folder must exist (one removed meanwhile is not made again: the
    write raises FileNotFoundError)."""
    if make_folder:
        target.parent.mkdir(parents=True, exist_ok=True)
    unfinished = target.with_name(f".{target.stem}.{os.getpid()}.tmp")
    try:
        write(unfinished)
        os.replace(unfinished, target)
    except BaseException:
        with suppress(OSError):
            os.remove(unfinished)
        raise


_TABLES_HEADER = struct.Struct("<Q")  # the length of the JSON index that follows it


def write_tables(tables: dict[str, pl.DataFrame], target: Path) -> None:
    """``tables`` to one file: a JSON index of their names and lengths, then each table as Arrow
    IPC (lz4), as ``frame.write_ipc`` writes it to a file of its own (the frame's own values,
    not the buffers its strings may share). :func:`read_tables` reads it."""
    blobs: list[bytes] = []
    for frame in tables.values():
        buffer = io.BytesIO()
        frame.write_ipc(buffer, compression="lz4")
        blobs.append(buffer.getvalue())
    index = json.dumps([[name, len(blob)] for name, blob in zip(tables, blobs, strict=True)]).encode()
    with open(target, "wb") as out:
        out.write(_TABLES_HEADER.pack(len(index)))
        out.write(index)
        for blob in blobs:
            out.write(blob)


def read_tables(source: Path) -> dict[str, pl.DataFrame]:
    """The tables :func:`write_tables` wrote, in its order."""
    data = memoryview(source.read_bytes())
    (length,) = _TABLES_HEADER.unpack_from(data)
    at = _TABLES_HEADER.size + length
    out: dict[str, pl.DataFrame] = {}
    for name, size in json.loads(bytes(data[_TABLES_HEADER.size : at])):
        out[name] = pl.read_ipc(io.BytesIO(data[at : at + size]))
        at += size
    return out


@dataclass(frozen=True)
class Spillable:
    """A detector's table decided per key: its name, its key column, the decision taking buckets."""

    table: str
    key: str
    decide: Callable[[Rows, NearMissSink, Iterable[lock_contention.BucketLoader]], list[Finding]]


SPILLABLE: dict[str, Spillable] = {
    "lock_contention": Spillable(*next(iter(lock_contention.SPILL_KEYS.items())), lock_contention.decide),
    "missing_timeout": Spillable(*next(iter(missing_timeout.SPILL_KEYS.items())), missing_timeout.decide),
    "batchable_calls": Spillable(*next(iter(batchable_calls.SPILL_KEYS.items())), batchable_calls.decide),
}


@dataclass(frozen=True)
class BucketFiles:
    """One bucket's reader: ``load(columns, keys)`` (None: every column, every key) reads its
    Parquet files (``files``, in partition order, for a decision that streams them itself);
    ``state``: where that decision may keep what it derived from them for the next one (serve's
    stored batches; None: nothing kept)."""

    files: tuple[Path, ...]
    key: str
    state: Path | None = None

    def __call__(self, columns: list[str] | None, keys: pl.Series | None) -> pl.DataFrame:
        return _read(list(self.files), self.key, columns, keys)


@dataclass(frozen=True)
class Buckets:
    """The spilled rows of one table: a reader per bucket holding files (:class:`BucketFiles`),
    called when the decision gets to it, so nothing keeps a bucket alive but the decision itself.
    Each iteration reads the files again."""

    folder: Path
    count: int
    key: str

    def __iter__(self) -> Iterator[BucketFiles]:
        for bucket in range(self.count):
            files = sorted((self.folder / f"b{bucket:05d}").glob("p*.parquet"))
            if files:  # in partition order, as the combined rows would be
                yield BucketFiles(tuple(files), self.key)


def _read(files: list[Path], key: str, columns: list[str] | None, keys: pl.Series | None) -> pl.DataFrame:
    if keys is None:
        return pl.read_parquet(files, columns=columns)
    scan = pl.scan_parquet(files).filter(pl.col(key).is_in(keys.implode()))
    return (scan if columns is None else scan.select(columns)).collect()


@dataclass(frozen=True)
class Spill:
    """Where a partitioned run spills (a folder every task of this machine reaches) and into how
    many buckets."""

    folder: str
    buckets: int

    @staticmethod
    def create(buckets: int, near: str | None = None) -> Spill:
        """A fresh folder (in ``$TMPDIR``, or beside ``near``) for one run's spilled rows."""
        # (removed by a serve worker that ends in the middle of the run)
        return Spill(scratch.make("spill", near, held=True), max(1, buckets))

    def _table_folder(self, kind: str, table: str) -> Path:
        return Path(self.folder) / f"{kind}.{table}"

    def write(self, part: int, rows: dict[str, Rows]) -> dict[str, Rows]:
        """Writes the spillable tables of one partition's ``rows`` to their buckets; returns the
        rows with those tables emptied (their columns kept). A retried task writes the same files
        again (each written whole, then renamed into place)."""
        out = dict(rows)
        for kind, spillable in SPILLABLE.items():
            frame = rows.get(kind, {}).get(spillable.table)
            if frame is None:
                continue
            if frame.height:
                if self.buckets == 1:  # (every row in bucket 0: not copied into a piece first,
                    # ~20 ms of a partition of 167k spans for lock_contention's resource rows)
                    pieces: dict[tuple[Any, ...], pl.DataFrame] = {(0,): frame}
                else:
                    bucket = (pl.col(spillable.key).hash(seed=0) % self.buckets).alias("_bucket")
                    pieces = frame.with_columns(bucket).partition_by(
                        "_bucket", as_dict=True, include_key=False
                    )
                for (number,), piece in pieces.items():
                    folder = self._table_folder(kind, spillable.table) / f"b{int(number):05d}"
                    write_whole(
                        folder / f"p{part:06d}.parquet",
                        partial(piece.write_parquet, compression="lz4", statistics=False),
                    )
            out[kind] = {**rows[kind], spillable.table: frame.clear()}
        return out

    def keep(self, part: int, tables: dict[str, dict[str, pl.DataFrame]]) -> None:
        """Writes every table of one partition (``{kind: {table: frame}}``, empty ones too, for
        their columns) to ``<folder>/rows/<kind>/p<part>.tables``, one file a kind (each table
        Arrow IPC, lz4, :func:`write_tables`), for :meth:`kept`: the deciding process then holds
        one kind's rows at a time, not every kind's of every partition while the others extract.
        One file a kind, not a table: a partition's ~45 tables were as many files created, renamed
        and removed (~25 ms of its ~540 ms at 1M spans). A retried task writes the same files again."""
        for kind, named in tables.items():
            target = Path(self.folder) / "rows" / kind / f"p{part:06d}.tables"
            write_whole(target, partial(write_tables, named))

    def kept(self, kind: str) -> dict[str, list[pl.DataFrame]]:
        """The frames :meth:`keep` wrote for ``kind``, per table (in the tables' names' order), in
        partition order (read now; nothing when the kind kept none; lz4-compressed, so
        decompressed into memory, not mapped)."""
        folder = Path(self.folder) / "rows" / kind
        if not folder.is_dir():
            return {}
        out: dict[str, list[pl.DataFrame]] = {}
        for file in sorted(folder.glob("p*.tables")):
            for name, frame in read_tables(file).items():
                out.setdefault(name, []).append(frame)
        return dict(sorted(out.items()))

    def buckets_of(self, kind: str) -> Buckets:
        return Buckets(self._table_folder(kind, SPILLABLE[kind].table), self.buckets, SPILLABLE[kind].key)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        scratch.let_go(self.folder)
