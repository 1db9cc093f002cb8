"""The embedded span store: one DuckDB file (or ``:memory:``) implementing ``hourglass.collector.store.SpanStore``.

Rules:

- Table ``spans`` has exactly the ``SPAN_SCHEMA`` columns as real columns. Arrow batches are
  inserted as they are (``con.from_arrow(batch).insert_into("spans")``); one ``write`` is one
  transaction, and DuckDB commits to its write-ahead log before the insert returns, so rows are
  durable when ``write`` returns (a kill -9 afterwards keeps them; WAL replay on the next open).
- No PRIMARY KEY: a unique index costs 2-4x on the insert path (see the cost notes). Duplicates
  (exporter retries) are removed at read time — every read keeps one row per (trace_id, span_id),
  the first ingested, and of copies in one Export the first in it (``_dedup``; ``scan``, ``scan_partition`` and ``scan_traces`` check the rows they got and pay for the
  removal only when some are copies: ``_read_spans``) — and physically by ``compact()``, which
  ``serve`` runs in the background, so after compaction "the same Export sent twice is stored
  once" holds on disk too.
- With ``ingest_log=True`` (``hourglass serve``), ``write`` appends the rows to the ingest log
  beside the file (``hourglass.collector.ingest_log``; durable when ``write`` returns) and stages them in
  memory; a loader thread inserts them into DuckDB in whole row groups, which DuckDB writes
  straight to the data file instead of its own WAL and a later checkpoint (~1.6 against ~6.7
  µs/span under load). Every read first loads what is staged, so a read sees every write that
  returned. Opening a file replays an ingest log left by a crash, whatever ``ingest_log`` says.
- One process owns the file. Each thread reads through its own cursor (DuckDB's way to share one
  database between threads); writes, compaction and retention are serialised by a lock so their
  transactions never conflict.
- ``reopen()`` (serve, now and then) closes the database and opens it again in place: an open
  DuckDB database keeps heap for every row group it wrote (~2.5 MiB per million rows). It runs
  with no heavy query, read or write in flight, and holds back those that start meanwhile.
- The queries whose memory grows with the rows they examine (the unique count of ``stats()``,
  compaction, retention, and the reads a caller runs under :meth:`DuckDBSpanStore.serialized`:
  serve's reads for its analysis worker and its questions' reads) run one at a time (``_heavy``), so their peaks do not
  add up in the process. Other reads and the inserts do not wait for them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from hourglass.collector.ingest_log import IngestLog
from hourglass.collector.schema import ANALYSIS_COLUMNS, SPAN_COLUMNS, SPAN_SCHEMA
from hourglass.collector.store import StoreStats
from hourglass.collector.trace_query import PSEUDO_TAGS, TAG_CHECK_COLUMNS, TraceQuery, tag_checked_trace_ids
from hourglass.collector.window_sql import (
    LARGEST_TRACE_SQL,
    TRACE_SIZES_SQL,
    WINDOW_ROWS_SQL,
    newest_window,
    traces_with,
    window_where,
)
from hourglass.collector.window_sql import span_conditions as _span_conditions
from hourglass.settings import default, usable_cores

_ARROW_TO_DUCKDB = {
    pa.string(): "VARCHAR",
    pa.int8(): "TINYINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    pa.binary(): "BLOB",
    pa.list_(pa.string()): "VARCHAR[]",
    pa.list_(pa.int64()): "BIGINT[]",
}

# DuckDB's buffer pool (its default is 80 % of RAM) and checkpoint size: hourglass/settings.py.
# Larger-than-memory sorts and joins spill to a temporary directory beside the file instead.
DEFAULT_MEMORY_LIMIT: str = default("store_memory_limit")
CHECKPOINT_THRESHOLD: str = default("store_checkpoint_threshold")

log = logging.getLogger("hourglass.store")

# DuckDB's row group size: an insert of at least this many rows is compressed and written straight
# to the data file; the loader inserts whole multiples of it (a remainder leaves a partial row
# group that the next checkpoint rewrites, measured at ~1.3 s per checkpoint).
ROW_GROUP_ROWS = 122_880
# Staged (logged, not yet in DuckDB) rows: the loader also loads them once the oldest has waited
# this long; ``write`` waits (backpressure, then admission control refuses Exports) above the cap.
MAX_STAGE_SECONDS: float = default("max_stage_seconds")
MAX_STAGED_ROWS = 2 * ROW_GROUP_ROWS
# ``release_cache`` leaves this much room above what it cannot evict (for concurrent reads), and
# does nothing while less than RELEASE_MIN_BYTES of the stored table is cached.
RELEASE_HEADROOM_BYTES = 32 * 2**20
RELEASE_MIN_BYTES = 32 * 2**20
# stats(): the exact counts it keeps cover the rows ingested (``ingested_ns``, stamped at decode)
# until this long before the count, so that a request decoded then and stored a little later
# does not undo them; the last COUNTS_KEPT such counts, to fall back on when it does. Each count
# examines the rows since the last kept bound, so this lag's rows are examined again by every
# count: its hash tables hold ~240 B per row (200k rows: +47 MiB), and under 20,000 spans/s a lag
# of 10 s made every count examine 200k rows or more. A decode is stored within milliseconds; a
# write held longer (backpressure) only makes the next count fall back to an older kept count.
COUNT_LAG_NS = 2 * 10**9
COUNTS_KEPT = 8
# ``reopen``: how long it waits at most for the heavy queries, reads and writes in flight to end
REOPEN_WAIT_S = 2.0
# ``reopen``: a connect that finds the file locked by another process is tried again this often
RECONNECT_TRIES = 20
RECONNECT_PAUSE_S = 0.1
# the lowest int64: a change that may alter the counts below every bound (retention)
_EVERY_BOUND = -(2**63)

# Rows are kept once per (trace_id, span_id): the first ingested copy wins, and of the copies
# ingested together (one Export that holds a span twice, with the same ``ingested_ns``) the first
# in the Export: the lowest ``rowid`` (rows are appended in their Export's order). ``compact()``
# keeps the same copy, so a read gives the same rows before and after it. Without the ``rowid``
# the window chose either copy, by the threads' order (measured: with 8 DuckDB threads, ~1 span
# in 4 read its second copy). ``_ROW``: the ``rowid`` as a column of a derived table (a subquery,
# a partition file), where ``rowid`` itself is not visible.
_ROW = "_row"


def _dedup(row: str = "rowid") -> str:
    """The window that keeps one row per (trace_id, span_id) (the rule above); ``row``: the rows'
    ``rowid`` as the source names it. The row whose (ingested_ns, rowid) is the least, as
    ``row_number() OVER (... ORDER BY ingested_ns, rowid) = 1`` keeps, without the sort within
    each key: 1.64-1.74 s of CPU against 2.44 at 1M spans (1.41-1.56 s ordered by ingested_ns
    alone, which chose either copy of one Export)."""
    return f"QUALIFY {row} = arg_min({row}, (ingested_ns, {row})) OVER (PARTITION BY trace_id, span_id)"


def _span_match(service: str | None, operation: str | None) -> tuple[str, list[Any]]:
    """SQL conditions (and their parameters) of a span of ``service`` named ``operation``
    (either None: any; not both)."""
    conditions, params = [], []
    for column, value in (("service", service), ("name", operation)):
        if value is not None:
            conditions.append(f"{column} = ?")
            params.append(value)
    if not conditions:
        raise ValueError("a service or an operation is needed")
    return " AND ".join(conditions), params


def _spans_where(condition: str = "") -> str:
    """The spans table as a derived table (every column and the ``rowid`` as ``_ROW``), of the
    rows that meet ``condition`` (SQL) when given."""
    return f"(SELECT *, rowid AS {_ROW} FROM spans{f' WHERE {condition}' if condition else ''})"


_ORDER = "ORDER BY trace_id, start_ns, span_id"


# Arrow output with string columns as string_view ("Utf8View"), the layout polars keeps strings
# in: ``pl.from_arrow`` then takes them as they are instead of copying every string (at 1M spans
# ~0.2 s of CPU, and a second copy of every string held beside the first).
_STRING_VIEWS_ON = ("SET arrow_output_version = '1.4'", "SET produce_arrow_string_view = true")
_STRING_VIEWS_OFF = ("RESET produce_arrow_string_view", "RESET arrow_output_version")


# The serialized spans compress far better and cheaper with zstd than with DuckDB's automatic
# choice (DICT_FSST): on the bench-ingest request, insert + checkpoint CPU 7.9 -> 5.2 us/row and
# the file 349 -> 85 B/row. Every other column keeps DuckDB's choice (dictionary, bitpacking...).
_COLUMN_COMPRESSION = {"raw": "zstd"}


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _read(method: _Method) -> _Method:
    """A read of the store: it waits while ``release_cache`` holds the buffer pool's limit down,
    and ``release_cache`` runs only while no read is in flight (else it skips its turn): a read
    that allocated while the limit was lowered failed with DuckDB's "Out of Memory". It also
    waits while ``reopen`` swaps the connection (which waits for the reads in flight)."""

    @functools.wraps(method)
    def gated(self: DuckDBSpanStore, *args: Any, **kwargs: Any) -> Any:
        with self._reading():
            return method(self, *args, **kwargs)

    return gated  # type: ignore[return-value]


# compactions that removed rows whose bound ``recent_arrivals`` reports (older ones: the
# incremental analysis counts every trace again)
REMOVALS_KEPT = 384  # (an hour of compactions every 10 s, serve's interval)
# scan_traces: ingest-time ranges in one query at most (more are merged, closest first)
MAX_INGESTED_RANGES = 64
# the streamed reads (``stream_traces``, ``stream_recent_arrivals``...): rows per record batch,
# what the reader holds of a result at a time beside DuckDB's own state of the query
STREAM_BATCH_ROWS = 16_384
# ``stream_traces``: rows sorted at a time at most (a part of the traces, by trace id): DuckDB's sort
# holds every row it orders, all columns, until the query ends (a batch read of 100k spans on the
# 12M-span soak store: +70 MiB of the server's RSS, against +25 to +30 MiB in parts of ~12k rows)
STREAM_SORT_ROWS = 16_384
# ``stream_traces`` sorts in parts only while its ingest range holds at most this many times
# the rows it reads (each part's query scans the whole range again)
STREAM_PARTS_RANGE_FACTOR = 4


def _stream_parts(counted: Sequence[tuple[str, int]], sort_rows: int, range_rows: int) -> list[list[str]]:
    """The traces of a streamed read (``counted``: (trace id, rows) by trace id) in parts of
    about ``sort_rows`` rows, each sorted by a query of its own; one part (the plain sorted query)
    when the ingest range they are read from holds more than ``STREAM_PARTS_RANGE_FACTOR`` times
    their rows (``range_rows``): every part's query scans that range."""
    if range_rows > STREAM_PARTS_RANGE_FACTOR * sum(n for _, n in counted):
        return [[trace_id for trace_id, _ in counted]]
    parts: list[list[str]] = [[]]
    rows = 0
    for trace_id, n in counted:
        if parts[-1] and rows + n > sort_rows:
            parts.append([])
            rows = 0
        parts[-1].append(trace_id)
        rows += n
    return parts


def _merge_ranges(ranges: Sequence[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """``ranges`` sorted, overlapping ones joined, then neighbours joined across the smallest
    gaps until at most ``most`` remain: every value in a given range is in a returned one."""
    merged: list[list[int]] = []
    for first, last in sorted((int(a), int(b)) for a, b in ranges):
        if merged and first <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    extra = len(merged) - max(most, 1)
    if extra <= 0:
        return [(a, b) for a, b in merged]
    # close the smallest gaps between neighbours: the ranges after each closed gap join the one before
    gaps = sorted(range(len(merged) - 1), key=lambda i: (merged[i + 1][0] - merged[i][1], i))
    closed = set(gaps[:extra])
    out = [merged[0]]
    for i in range(1, len(merged)):
        if i - 1 in closed:
            out[-1] = [out[-1][0], merged[i][1]]
        else:
            out.append(merged[i])
    return [(a, b) for a, b in out]


_INT64_MAX = 2**63 - 1
_NS_PER_S = 1_000_000_000
# a trace range's ends (``_TraceRanges``) at these int32 seconds: open on that side
_OPEN_FIRST = -(2**31)
_OPEN_LAST = 2**31 - 1
# per stored trace's hash, the ingest-time range of its rows (_TraceRanges): one GROUP BY of
# the rows ingested from a bound on (all rows: _EVERY_BOUND)
_TRACE_RANGES_SQL = (
    "SELECT hash(trace_id) AS h, min(ingested_ns) AS first, max(ingested_ns) AS last"
    " FROM spans WHERE ingested_ns >= ? GROUP BY 1"
)


class SplitCancelled(Exception):
    """``split_partitions`` stopped because its caller no longer needs it (the run failed or was
    interrupted)."""


class Cancel(threading.Event):
    """A ``threading.Event`` that also calls, in the thread that sets it, what :meth:`calling`
    registered meanwhile: a DuckDB query under way is interrupted at once (``interrupt()``), where
    a flag is seen only between the batches it returns (the first batch of a ``--since`` or
    ``--service`` split waits for DuckDB to build its filter over the whole store)."""

    def __init__(self) -> None:
        super().__init__()
        self._calls: list[Callable[[], object]] = []
        self._calls_lock = threading.Lock()

    def set(self) -> None:
        with self._calls_lock:  # (held while calling: no callback runs once ``calling`` has ended)
            super().set()
            for call in self._calls:
                try:
                    call()
                except Exception:
                    log.exception("a cancellation callback failed")

    @contextlib.contextmanager
    def calling(self, call: Callable[[], object]) -> Iterator[None]:
        """``call()`` when this is set within the block (at once when it already is)."""
        with self._calls_lock:
            self._calls.append(call)
            if self.is_set():
                call()
        try:
            yield
        finally:
            with self._calls_lock:
                self._calls.remove(call)


class _TraceRanges:
    """Where each stored trace's rows lie in ingest time: per 64-bit ``hash(trace_id)`` (DuckDB's),
    the first and last ``ingested_ns`` of the rows of every trace with that hash, for every row
    ingested before ``bound`` (later rows: not necessarily). Rows are appended in ingest order and
    DuckDB keeps each row group's ingest-time range, so a query about a few traces that reads only
    their ranges (and the rows at or after ``bound``) skips every other row group: the count and
    compaction look up the older rows of the traces that just got rows this way instead of
    reading the trace ids of the whole table (at 12M spans, +190 MiB of DuckDB buffer pool per
    count). Ranges only need to contain the rows: a compaction (it removes rows) or a retention
    leaves them valid; a row written below ``bound`` lowers it; the hashes of traces a retention
    removed are dropped (:meth:`remove`).

    16 bytes per stored trace (the server holds them for every trace its retention keeps: at
    1,000 spans/s and 7 days, ~30M traces of 20 spans): the hash, and each end as whole seconds
    from ``base_s`` in 32 bits, the first rounded down and the last up (a range a second wider
    still contains the rows; a row group holds seconds of ingest at any rate worth indexing).
    An end beyond 32 bits of seconds from ``base_s`` (68 years) is open on that side.

    Held in sorted runs of at most ``RUN_MAX`` hashes, each hash in one run: a count's new hashes
    become a run of their own, merged with the newest runs while they are of like size (as a
    binary counter carries), so a count costs a few searches per run and amortised O(log n)
    copies per hash, not a copy of every stored trace's range (one array at 30M traces: ~120 ms
    at each count, beside a new array as large as the old); a retention rewrites only the runs
    that held removed hashes.

    Not thread-safe: read and changed under the store's write lock."""

    RUN_MAX = 1 << 21  # hashes a run holds at most (32 MiB): what a merge or removal copies at once

    def __init__(self, figures: dict[str, Any], bound: int) -> None:
        import numpy as np

        firsts = np.asarray(figures["first"], dtype=np.int64)
        # (the base: the earliest second, so offsets are small and mostly positive)
        self.base_s = int(firsts.min()) // _NS_PER_S if len(firsts) else 0
        self.bound = bound
        self.runs: list[_Run] = []
        self._append(
            np.asarray(figures["h"], dtype=np.uint64),
            self._down(firsts),
            self._up(np.asarray(figures["last"], dtype=np.int64)),
        )

    @classmethod
    def restored(cls, base_s: int, bound: int, runs: Iterable[tuple[Any, Any, Any]]) -> _TraceRanges | None:
        """The ranges :meth:`DuckDBSpanStore._seal` kept: ``runs``, each (hashes, first, last);
        None when they are not runs as this class holds them (each sorted, no hash twice in one,
        at most ``RUN_MAX``)."""
        import numpy as np

        ranges = cls({"h": [], "first": [], "last": []}, bound)
        ranges.base_s = int(base_s)
        for keys, first, last in runs:
            if len(keys) > cls.RUN_MAX or np.any(keys[1:] <= keys[:-1]):
                return None
            if len(keys):
                ranges.runs.append(
                    _Run(
                        keys.astype(np.uint64, copy=False),
                        first.astype(np.int32, copy=False),
                        last.astype(np.int32, copy=False),
                    )
                )
        return ranges

    def __len__(self) -> int:
        return sum(len(run.keys) for run in self.runs)

    @property
    def nbytes(self) -> int:
        return sum(run.keys.nbytes + run.first.nbytes + run.last.nbytes for run in self.runs)

    def _down(self, ns: Any) -> Any:
        """``ns`` (int64) as int32 seconds from ``base_s``, rounded down; before what 32 bits
        hold: ``_OPEN_FIRST`` (no lower end)."""
        import numpy as np

        seconds = ns // _NS_PER_S - self.base_s
        return np.where(seconds <= _OPEN_FIRST, _OPEN_FIRST, np.minimum(seconds, _OPEN_LAST - 1)).astype(
            np.int32
        )

    def _up(self, ns: Any) -> Any:
        """``ns`` (int64) as int32 seconds from ``base_s``, rounded up; past what 32 bits hold:
        ``_OPEN_LAST`` (no upper end)."""
        import numpy as np

        seconds = -(-ns // _NS_PER_S) - self.base_s
        return np.where(seconds >= _OPEN_LAST, _OPEN_LAST, np.maximum(seconds, _OPEN_FIRST + 1)).astype(
            np.int32
        )

    def _ns(self, seconds: int, *, last: bool) -> int:
        if seconds == (_OPEN_LAST if last else _OPEN_FIRST):
            return _INT64_MAX if last else -_INT64_MAX - 1
        return min(max((seconds + self.base_s) * _NS_PER_S, -_INT64_MAX - 1), _INT64_MAX)

    def ranges(self, hashes: Any) -> list[tuple[int, int]]:
        """The ingest-time ranges of the traces with these hashes (those not held: none)."""
        import numpy as np

        hashes = np.asarray(hashes, dtype=np.uint64)  # (Python ints: not compared as floats)
        out: list[tuple[int, int]] = []
        if not len(hashes):
            return out
        for run in self.runs:
            at = run.find(hashes)
            at = at[at >= 0]
            out.extend(
                (self._ns(first, last=False), self._ns(last, last=True))
                for first, last in zip(run.first[at].tolist(), run.last[at].tolist(), strict=True)
            )
        return out

    def add(self, figures: dict[str, Any], bound: int) -> None:
        """Widen the ranges with ``figures`` (``_TRACE_RANGES_SQL``'s columns, one row per hash)
        of the rows ingested from the current ``bound`` up to ``bound`` (or later)."""
        import numpy as np

        hashes = np.asarray(figures["h"], dtype=np.uint64)
        first = self._down(np.asarray(figures["first"], dtype=np.int64))
        last = self._up(np.asarray(figures["last"], dtype=np.int64))
        held = np.zeros(len(hashes), dtype=bool)
        for run in self.runs:  # (one hash, one run: no hash is widened twice)
            at = run.find(hashes)
            hit = at >= 0
            np.minimum.at(run.first, at[hit], first[hit])
            np.maximum.at(run.last, at[hit], last[hit])
            held |= hit
        if not held.all():
            new = ~held
            self._append(hashes[new], first[new], last[new])
        self.bound = max(self.bound, bound)

    def _append(self, hashes: Any, first: Any, last: Any) -> None:
        """Hashes none of the runs holds (each once), with their ends: sorted into runs of their
        own (at most ``RUN_MAX`` each), then the newest runs merged while they are of like size."""
        import numpy as np

        order = np.argsort(hashes, kind="stable")
        keys, first, last = hashes[order], first[order], last[order]
        for at in range(0, len(keys), self.RUN_MAX):  # (pieces of one sorted array: disjoint)
            end = at + self.RUN_MAX
            self.runs.append(_Run(keys[at:end].copy(), first[at:end].copy(), last[at:end].copy()))
            while (
                len(self.runs) > 1
                and len(self.runs[-2].keys) <= 2 * len(self.runs[-1].keys)
                and len(self.runs[-2].keys) + len(self.runs[-1].keys) <= self.RUN_MAX
            ):
                newer = self.runs.pop()
                self.runs[-1] = self.runs[-1].merged(newer)

    def remove(self, hashes: Any) -> int:
        """Drops these hashes' ranges (traces no longer stored); how many were held. Only the runs
        that held one are rewritten; runs left small are merged again, while they fit a run."""
        import numpy as np

        hashes = np.asarray(hashes, dtype=np.uint64)
        removed = 0
        kept: list[_Run] = []
        for run in self.runs:
            at = run.find(hashes) if len(hashes) else np.empty(0, dtype=np.int64)
            at = at[at >= 0]
            if len(at):
                removed += len(np.unique(at))
                run = run.without(at)
            if not len(run.keys):
                continue
            if kept and len(kept[-1].keys) + len(run.keys) <= self.RUN_MAX // 2:
                kept[-1] = kept[-1].merged(run)
            else:
                kept.append(run)
        self.runs = kept
        return removed


class _Run:
    """One sorted run of :class:`_TraceRanges`: hashes ascending, their ends beside them."""

    __slots__ = ("first", "keys", "last")

    def __init__(self, keys: Any, first: Any, last: Any) -> None:
        self.keys, self.first, self.last = keys, first, last

    def find(self, hashes: Any) -> Any:
        """Each hash's place in this run (-1: not held)."""
        import numpy as np

        if not len(self.keys):
            return np.full(len(hashes), -1, dtype=np.int64)
        at = np.searchsorted(self.keys, hashes).clip(max=len(self.keys) - 1)
        return np.where(self.keys[at] == hashes, at, -1)

    def merged(self, other: _Run) -> _Run:
        """This run and ``other`` (no hash in both) as one sorted run."""
        import numpy as np

        keys = np.concatenate([self.keys, other.keys])
        order = np.argsort(keys, kind="stable")  # (two sorted runs: timsort merges them in one pass)
        return _Run(
            keys[order],
            np.concatenate([self.first, other.first])[order],
            np.concatenate([self.last, other.last])[order],
        )

    def without(self, at: Any) -> _Run:
        """This run without the hashes at places ``at``."""
        import numpy as np

        keep = np.ones(len(self.keys), dtype=bool)
        keep[at] = False
        return _Run(self.keys[keep], self.first[keep], self.last[keep])


# What a clean close keeps for the next open (``DuckDBSpanStore._seal``): one row of JSON, and the
# traces' ingest ranges; both dropped by the next read-write open. The fingerprint of the rows they
# describe: how many, the first and last ingest time.
_SEAL = "hourglass_seal"
_SEAL_RANGES = "hourglass_seal_ranges"
_SEAL_VERSION = 1
_FINGERPRINT_SQL = "SELECT count(*), min(ingested_ns), max(ingested_ns) FROM spans"


def _numpy_copy(column: pa.ChunkedArray, dtype: str) -> Any:
    """``column`` (a fixed-width type, no nulls) as a writable numpy array of its own, from its
    buffer: Arrow's ``to_numpy`` imports pandas, which ``analyze --format json`` loads nowhere else."""
    import numpy as np

    array = column.combine_chunks()
    if array.null_count:
        raise ValueError(f"{column.type} column with {array.null_count} nulls")
    kind = np.dtype(dtype)
    if not len(array):
        return np.zeros(0, dtype=kind)
    return np.frombuffer(
        array.buffers()[1], dtype=kind, count=len(array), offset=array.offset * kind.itemsize
    ).copy()


def _create_table_sql() -> str:
    columns = []
    for f in SPAN_SCHEMA:
        sql_type = _ARROW_TO_DUCKDB[f.type]
        compression = _COLUMN_COMPRESSION.get(f.name)
        using = f" USING COMPRESSION '{compression}'" if compression else ""
        columns.append(f"{f.name} {sql_type}{using}{'' if f.nullable else ' NOT NULL'}")
    return "CREATE TABLE IF NOT EXISTS spans (" + ", ".join(columns) + ")"


def _check_columns(columns: Sequence[str]) -> list[str]:
    unknown = [c for c in columns if c not in SPAN_COLUMNS]
    if unknown:
        raise ValueError(f"unknown span column(s) {unknown}; known: {list(SPAN_COLUMNS)}")
    return list(columns)


def _close_cursor(cursor: duckdb.DuckDBPyConnection) -> None:
    """Close a reader's cursor even while it runs a query (a long analysis scan at shutdown):
    DuckDB refuses to close a busy connection, so the query is interrupted first."""
    try:
        cursor.close()
    except duckdb.Error:
        cursor.interrupt()
        for _ in range(100):
            try:
                cursor.close()
                return
            except duckdb.Error:
                time.sleep(0.05)
        log.warning("a reader's DuckDB cursor stayed busy at close; leaving it to the connection")


def _has_copies(cursor: duckdb.DuckDBPyConnection, table: pa.Table) -> bool:
    """Whether ``table`` may hold a (trace_id, span_id) more than once: fewer distinct hashes of
    the pair than rows (a copy, or a 64-bit hash collision, which costs only a needless dedup)."""
    if table.num_rows < 2:
        return False
    pairs = cursor.from_arrow(table.select(["trace_id", "span_id"]))
    return bool(pairs.aggregate("count(*) > count(DISTINCT hash(trace_id, span_id))").fetchall()[0][0])


def _repeats_a_span(table: pa.Table) -> bool:
    """Whether ``table`` holds a (trace_id, span_id) more than once (exactly: fewer distinct pairs
    than rows). Counted by polars in this thread, where :func:`_has_copies` needs a DuckDB
    connection: a partition file's reader opened one for this check alone, ~14 ms of CPU to open
    and ~31 ms with the check against ~12 ms here (167k spans), for every partition in each of a
    partitioned run's three passes (108 reads at 5M spans)."""
    if table.num_rows < 2:
        return False
    import polars as pl  # (not at the top: the server, which imports this module, does not use it)

    pairs = pl.from_arrow(table.select(["trace_id", "span_id"]))
    assert isinstance(pairs, pl.DataFrame)
    return pairs.n_unique() < table.num_rows


def _as_views(arrow_type: pa.DataType) -> pa.DataType:
    """``arrow_type`` with ``string`` as ``string_view`` (lists of strings too)."""
    if arrow_type == pa.string():
        return pa.string_view()
    if pa.types.is_list(arrow_type) and arrow_type.value_type == pa.string():
        return pa.list_(pa.string_view())
    return arrow_type


def _conform_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """``batch`` with its columns cast to ``schema``'s types (``DuckDBSpanStore._conform``)."""
    arrays = [batch.column(i).cast(f.type) for i, f in enumerate(schema)]
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _read_rows(
    cursor: duckdb.DuckDBPyConnection,
    selected: list[str],
    source: str,
    params: list[Any],
    *,
    string_views: bool,
    arrow_sort: bool = True,
) -> pa.Table:
    """``selected`` of the rows of ``source`` (a table expression with the span columns and the
    rows' store ``rowid`` as ``_ROW``), one row per (trace_id, span_id) (the first ingested copy,
    the first in its Export: ``_dedup``), in (trace_id, start_ns, span_id) order.

    Copies (exporter retries not compacted yet) are rare, and the window that removes them
    costs ~0.4 s of CPU per 1M spans; so the rows are read as they are and checked: as many
    distinct hashes of (trace_id, span_id) as rows proves there is no copy (~0.1 s per 1M).
    Only when the check fails (copies, or a hash collision) are they read again through the
    window. The rows checked are the rows returned, so a write committed meanwhile cannot
    slip a copy through. With ``arrow_sort`` (a read-only open), rows without copies are read in
    no order and sorted here (:func:`_in_order`), as DuckDB's plain strings: less CPU than DuckDB's ORDER BY and its
    string views (measured at 1M spans, a partition of 167k read on one thread: ~0.13 s against
    ~0.21)."""
    listed = ", ".join(selected)
    checkable = "trace_id" in selected and "span_id" in selected
    copies: bool | None = None  # None: not checked yet
    if checkable and arrow_sort and _one_thread(cursor):
        keys = [c for c in _ORDER_KEYS if c not in selected]
        query = f"SELECT {', '.join([*selected, *keys])} FROM {source}"
        unordered = cursor.sql(query, params=params or None).to_arrow_table()
        copies = _has_copies(cursor, unordered)
        if not copies and _takes_whole(unordered):
            return _in_order(unordered, selected, string_views=string_views)
        del unordered  # (too large to sort here: DuckDB's ORDER BY below; copies: the window)
    if string_views:
        for statement in _STRING_VIEWS_ON:
            cursor.execute(statement)
    try:
        table = None
        if checkable and not copies:
            query = f"SELECT {listed} FROM {source} {_ORDER}"
            table = cursor.sql(query, params=params or None).to_arrow_table()
            if _has_copies(cursor, table):  # (checked again: the rows returned are checked)
                table = None
        if table is None:
            query = f"SELECT {listed} FROM {source} {_dedup(_ROW)} {_ORDER}"
            table = cursor.sql(query, params=params or None).to_arrow_table()
    finally:
        if string_views:
            for statement in _STRING_VIEWS_OFF:
                cursor.execute(statement)
    return DuckDBSpanStore._conform(table, selected, string_views=string_views)


_ORDER_KEYS = ("trace_id", "start_ns", "span_id")

# The most bytes of text one column may hold for :func:`_in_order`: Arrow's take joins a
# column's chunks into one array, whose 32-bit offsets end at 2 GiB ("offset overflow"); DuckDB's
# ORDER BY returns batches of rows, each one well below it.
_TAKE_BYTES = 1 << 30


def _one_thread(cursor: duckdb.DuckDBPyConnection) -> bool:
    """Whether ``cursor`` runs its queries on one thread (a partition's task, serve's store): there
    Arrow's sort costs less than DuckDB's ORDER BY; on several threads DuckDB sorts in parallel
    and is faster in wall time (a whole-store read)."""
    rows = cursor.execute("SELECT current_setting('threads')").fetchall()
    return bool(rows) and int(rows[0][0]) <= 1


def _takes_whole(rows: pa.Table) -> bool:
    """Whether every column of ``rows`` fits one Arrow array (:func:`_in_order`'s take)."""
    return all(
        column.nbytes < _TAKE_BYTES
        for column in rows.columns
        if pa.types.is_string(column.type) or pa.types.is_binary(column.type)
    )


def _in_order(rows: pa.Table, selected: list[str], *, string_views: bool) -> pa.Table:
    """``selected`` of ``rows`` (which hold no span twice) in (trace_id, start_ns, span_id)
    order, as ``_ORDER`` sorts them: Arrow's sort of the three keys (strings compared bytewise,
    no ties once there is no copy), then the columns cast to the span schema's types (strings
    as views with ``string_views``: the cast points at the strings, it does not copy them)."""
    order = pc.sort_indices(rows, sort_keys=[(key, "ascending") for key in _ORDER_KEYS])
    return DuckDBSpanStore._conform(rows.select(selected).take(order), selected, string_views=string_views)


# The rows a partition file (``DuckDBSpanStore.split_partitions``) must hold whatever columns a
# reader asks for: the key of its de-duplication and its order.
# (``_ROW``, the store's ``rowid``, is written beside them: ``_dedup``'s tie-break)
_PARTITION_FILE_KEYS = ("trace_id", "span_id", "start_ns", "ingested_ns")


class _ColumnGatherer:
    """Rows of a batch's columns in a new order (``pc.take``), each column in a thread of its own
    when this machine has a core to spare: Arrow's take runs on one core and releases the GIL.
    In a store's split it was most of the deciding process' time (at 5M spans, 3.4 s before any
    worker had a partition), with a core idle: the split runs before the workers' first
    partitions when the plan has no room for both at once."""

    def __init__(self) -> None:
        cores = usable_cores()
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(min(cores, 4), thread_name_prefix="hourglass-split")
            if cores > 1
            else None
        )

    def __call__(self, columns: Sequence[pa.Array], order: pa.Array) -> list[pa.Array]:
        if self._pool is None:
            return [pc.take(c, order) for c in columns]
        return list(self._pool.map(lambda c: pc.take(c, order), columns))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def partition_file(folder: str, part: int) -> str:
    """The file of partition ``part`` that :meth:`DuckDBSpanStore.split_partitions` writes in ``folder``."""
    return os.path.join(folder, f"p{part:06d}.arrow")


def _string_array(values: Sequence[str]) -> pa.Array:
    """``values`` as an Arrow string array built from its buffers: ``pa.array`` of Python objects
    imports pandas (pyarrow checks every input for a pandas type), a third of a second of CPU in
    each pricing worker, on the run's critical path."""
    import numpy as np

    encoded = [value.encode() for value in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.LargeStringArray.from_buffers(len(encoded), pa.py_buffer(offsets), data).cast(pa.string())


def quiet(connection: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """``connection`` (and the cursors it opens) without DuckDB's progress bar, which the Python
    client draws on stderr for any query over two seconds: into serve's log (a tally rebuilt on a
    restart drew one there), and over the CLI's own bar. (A session setting: DuckDB refuses it
    in ``connect``'s config.)"""
    connection.execute("SET enable_progress_bar = false")
    return connection


def read_partition_file(
    path: str,
    *,
    trace_ids: list[str] | None = None,
    columns: Sequence[str] | None = None,
    string_views: bool = False,
) -> pa.Table:
    """One partition file (:meth:`DuckDBSpanStore.split_partitions`) as ``scan_partition`` reads the
    same partition from the store: ``columns``, one row per (trace_id, span_id) (the first
    ingested copy), in (trace_id, start_ns, span_id) order; ``trace_ids``: only those traces. The
    file is memory-mapped (not copied) and read by an in-memory DuckDB on one thread."""
    selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
    if not selected:
        return pa.table({})
    with pa.memory_map(path) as source:
        rows = pa.ipc.open_file(source).read_all()
    missing = [c for c in selected if c not in rows.column_names]
    if missing:
        raise ValueError(f"partition file {path} has no column(s) {missing}")
    if trace_ids is not None:
        rows = rows.filter(pc.is_in(rows.column("trace_id"), value_set=_string_array(trace_ids)))
    if not _repeats_a_span(rows) and _takes_whole(rows):
        # Arrow's sort of the three keys: a third of the CPU of DuckDB's ORDER BY over an Arrow
        # table (measured at 1M spans in 6 partitions: 0.33 s against 1.29)
        return _in_order(rows, selected, string_views=string_views)
    with quiet(duckdb.connect(config={"threads": 1})) as cursor:
        cursor.register("partition_rows", rows)
        return _read_rows(cursor, selected, "partition_rows", [], string_views=string_views)


# a trace's arrival figures over the rows a settle-check read groups (``trace_arrivals``,
# ``recent_arrivals``, ``arrivals_between``): its spans (physical rows), first and last arrival,
# latest start and end
_ARRIVAL_FIGURES = (
    "count(*) AS spans, min(ingested_ns) AS first_ingested_ns, max(ingested_ns) AS last_ingested_ns, "
    "max(start_ns) AS last_start_ns, max(end_ns) AS last_end_ns"
)


class DuckDBSpanStore:
    """``SpanStore`` on a DuckDB file (``path``) or in memory (``":memory:"``)."""

    def __init__(
        self,
        path: str = ":memory:",
        *,
        memory_limit: str = DEFAULT_MEMORY_LIMIT,
        ingest_log: bool = False,
        threads: int | None = None,
        read_only: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        """``ingest_log``: writes go through the ingest log and whole-row-group loads (see the
        module doc; ignored for ``:memory:``). ``threads``: DuckDB's worker threads (default:
        one per core); serve uses 1, as a parallel insert splits row groups and costs
        ~1 µs/span more. ``read_only``: reads only, so several processes (the partitions of one
        analysis) can open the file at once; an ingest log is not replayed (open the store
        once without it first) and nothing is written. ``config``: more DuckDB settings."""
        self.retention_cutoff_ns: int | None = None  # the latest delete_older_than cutoff
        self.memory_limit = memory_limit
        file_backed = path != ":memory:"
        if file_backed:
            # DuckDB expands "~" itself; the log beside the file must be found at the same place
            path = os.path.expanduser(path)
        self.path = path
        log_directory = Path(f"{path}.ingest-log")
        if file_backed and not Path(path).exists() and log_directory.exists():
            # The log of a database file that is gone: replaying it into a new file would be wrong,
            # and deleting spans is not for us to decide: set it aside, loudly.
            aside = log_directory.with_name(f"{log_directory.name}.orphaned-{time.strftime('%Y%m%dT%H%M%S')}")
            log.error(
                "ingest log %s belongs to a database file that no longer exists; moved to %s "
                "(its spans were never loaded anywhere)",
                log_directory,
                aside,
            )
            log_directory.rename(aside)
        # Checkpoint after 128 MB of WAL instead of DuckDB's 16 MB: each checkpoint compresses
        # (FSST) what was appended and the partly filled row group it went into, so frequent
        # ones made the writer the bottleneck
        # (in-process bench under load: 16 MB ~49k, 64 MB ~63k, 128 MB ~74k spans/s). Rows not
        # yet checkpointed stay in memory, which bounds the extra RSS by about the threshold.
        config = {
            "memory_limit": memory_limit,
            "checkpoint_threshold": CHECKPOINT_THRESHOLD,
            **(config or {}),
        }
        if threads is not None:
            config["threads"] = threads
        self.read_only = read_only and file_backed
        self._config = config
        self._con = self._connect()
        if not self.read_only:
            self._con.execute(_create_table_sql())
        # RLock: compaction, retention and close load the staged rows first, under the same lock
        self._write_lock = threading.RLock()
        # reads in flight, and reads held back (``_read``) while release_cache holds the buffer
        # pool's limit down or ``reopen`` swaps the connection
        self._gate = threading.Condition()
        self._reads_in_flight = 0
        self._releasing = False
        self._draining = False
        self._read_depth = threading.local()
        # rows inserted since the database was (re)opened (``reopen``), and whether a reopen
        # closed it and failed to open it again (the next reopen only opens it)
        self._rows_since_open = 0
        self._disconnected = False
        self._local = threading.local()
        self._cursors: list[tuple[threading.Thread, duckdb.DuckDBPyConnection]] = []
        self._cursors_lock = threading.Lock()
        self._writer = self._con.cursor()
        self._closed = False
        # One memory-heavy query at a time (the module doc): taken before the write lock, never
        # while holding it. Measured on serve's store: a count of 200k new rows +47 MiB, a
        # compaction of 1.2M +227 MiB, a streamed batch read +30-50 MiB; in a soak they ran side
        # by side (the round's count beside the worker's reads, compaction beside both).
        self._heavy = threading.RLock()
        # smallest ingested_ns written since the last compaction: only rows sharing a trace with
        # rows at or above it can be new duplicates. None: unknown (fresh open), examine everything.
        self._dirty_since_ns: int | None = None
        self._dirty = True
        # Bumped after every committed change (write, compaction, retention): ``stats()`` reuses its
        # last counts while it is unchanged. Counting unique spans scans the whole table (~0.2-0.5 s
        # of both cores at 1M spans), and /v1/stats is polled: each poll took that from the analysis.
        self._changes = 0
        # Compactions that removed rows since this store was opened (a per-open token, a count,
        # and the last ``REMOVALS_KEPT`` ones' ``ingested_ns`` bound: they examined the traces
        # with a row ingested at or after it, None: every trace): the incremental analysis counts
        # those traces again (``recent_arrivals``' metadata). Retention: ``retention_cutoff_ns``.
        self._removals = 0
        self._removals_epoch = int.from_bytes(os.urandom(7), "big")
        self._removals_since: list[tuple[int, int | None]] = []
        self._stats_cache: tuple[int, StoreStats] | None = None
        # Exact counts of the rows ingested before a bound, (bound_ns, unique spans, traces),
        # ascending, at most COUNTS_KEPT: stats() counts only what is at or after the last bound
        # (``_count``). A write of a row below a bound drops the counts of that bound and above;
        # compaction leaves them as they are (it removes later copies, the first one stays);
        # retention subtracts what it deletes. ``_count_watches``: the lowest ``ingested_ns`` of
        # each write (or _EVERY_BOUND for a deletion) made while a count runs, so the count knows
        # whether its figures still hold. Both under the write lock.
        self._counts: list[tuple[int, int, int]] = []
        self._count_watches: list[list[int]] = []
        # the stored traces' ingest-time ranges (built by the first count, widened by each kept
        # count): the count and compaction read the older rows of the traces that just got rows
        # there only. Under the write lock; kept by a retention (the removed traces' entries stay,
        # wider than needed) until they are more than twice the traces counted, then dropped and
        # rebuilt by the next count. ``_ranges_moved``: how many times the ranges' bound was
        # lowered or the ranges replaced (a reader that used them checks it did not change).
        self._trace_ranges: _TraceRanges | None = None
        self._ranges_moved = 0
        # what the last clean close left (:meth:`_seal`): the figures above, taken up again
        if not self.read_only and file_backed:
            self._unseal()
        # the ingest log: rows logged (durable) and staged here until the loader inserts them
        self._log: IngestLog | None = None
        self._staged: list[pa.Table] = []
        self._staged_rows = 0
        self._staged_since = 0.0  # monotonic time the oldest staged row was logged
        self._stage = threading.Condition()
        self._loader: threading.Thread | None = None
        self._stopping = False
        if file_backed and not self.read_only and (ingest_log or log_directory.exists()):
            try:
                self._log = IngestLog(log_directory)
            except OSError:  # (another process' live log: its database file let go of too)
                self._con.close()
                raise
            self._replay_log()
            if ingest_log:
                self._loader = threading.Thread(target=self._load_loop, name="hourglass-loader", daemon=True)
                self._loader.start()
            else:  # only replayed: later writes go straight to DuckDB
                self._log.close(remove=True)
                self._log = None

    # -- connections -------------------------------------------------------------------------
    def _connect(self) -> duckdb.DuckDBPyConnection:
        if self.read_only:
            return quiet(duckdb.connect(self.path, read_only=True, config=self._config))
        return quiet(duckdb.connect(self.path, config=self._config))

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._closed:
            raise RuntimeError(f"span store {self.path} is closed")
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._con.cursor()
            self._local.cursor = cursor
            with self._cursors_lock:
                # Threads come and go (the API's worker threads exit after 10 s idle): close the
                # cursors of threads that ended, or a long-running serve keeps one per thread ever used.
                for thread, stale in self._cursors:
                    if not thread.is_alive():
                        stale.close()
                self._cursors = [(t, c) for t, c in self._cursors if t.is_alive()]
                self._cursors.append((threading.current_thread(), cursor))
        return cursor

    # -- writes ------------------------------------------------------------------------------
    def write(self, spans: pa.Table) -> None:
        """Store rows of ``SPAN_SCHEMA``; returns once they are durable (committed to DuckDB, or
        with the ingest log, fsynced to the log)."""
        if spans.num_rows == 0:
            return
        if spans.schema.names != list(SPAN_COLUMNS):
            raise ValueError(f"write() needs the SPAN_SCHEMA columns in order, got {spans.schema.names}")
        if self._log is None:
            with self._write_lock:
                if self._closed:
                    raise RuntimeError(f"span store {self.path} is closed")
                self._insert(spans)
            return
        with self._stage:
            while self._staged_rows >= MAX_STAGED_ROWS and not self._closed:
                self._stage.wait(1.0)  # the loader is behind: hold the writer (admission refuses)
            if self._closed:
                raise RuntimeError(f"span store {self.path} is closed")
            self._log.append(spans)
            if not self._staged:
                self._staged_since = time.monotonic()
            self._staged.append(spans)
            self._staged_rows += spans.num_rows
            self._changes += 1
            if self._staged_rows >= ROW_GROUP_ROWS:
                self._stage.notify_all()

    def _insert(self, spans: pa.Table) -> None:
        """One DuckDB insert (the caller holds the write lock)."""
        # A relation insert, not register + "INSERT ... SELECT" + unregister: fewer round trips
        # through the Python client per statement. One auto-committed statement.
        self._writer.from_arrow(spans).insert_into("spans")
        self._changes += 1
        self._rows_since_open += spans.num_rows
        batch_min = pc.min(spans.column("ingested_ns")).as_py()
        if not self._dirty:
            self._dirty, self._dirty_since_ns = True, batch_min
        elif self._dirty_since_ns is not None:
            self._dirty_since_ns = min(self._dirty_since_ns, batch_min)
        self._rows_changed_at(batch_min)

    def _rows_changed_at(self, ingested_ns: int) -> None:
        """Rows ingested at ``ingested_ns`` (and later) were added or removed: the kept counts of
        the bounds above it no longer hold (the caller holds the write lock)."""
        if self._counts and ingested_ns < self._counts[-1][0]:
            self._counts = [kept for kept in self._counts if kept[0] <= ingested_ns]
        if self._trace_ranges is not None and ingested_ns < self._trace_ranges.bound:
            self._trace_ranges.bound = ingested_ns
            self._ranges_moved += 1
        for watch in self._count_watches:
            watch.append(ingested_ns)

    def _replay_log(self) -> None:
        assert self._log is not None
        tables = list(self._log.replay())
        rows = sum(t.num_rows for t in tables)
        if rows:
            log.warning(
                "replaying %d spans from the ingest log %s (the last run stopped without loading them)",
                rows,
                self._log.directory,
            )
            with self._write_lock:
                self._insert(pa.concat_tables(tables))
        self._log.mark_applied(self._log.next_row)

    def _load_staged(self, *, whole_row_groups: bool) -> None:
        """Insert staged rows into DuckDB: whole row groups only, or everything (before a read)."""
        if self._log is None:
            return
        with self._write_lock:  # taken first: loads happen in log order, one at a time
            with self._stage:
                staged_rows = self._staged_rows
                rows = staged_rows - staged_rows % ROW_GROUP_ROWS if whole_row_groups else staged_rows
                if rows == 0:
                    return
                combined = pa.concat_tables(self._staged)
                batch, rest = combined.slice(0, rows), combined.slice(rows)
                self._staged = [rest] if rest.num_rows else []
                self._staged_rows = rest.num_rows
                if rest.num_rows:
                    self._staged_since = time.monotonic()
                applied = self._log.applied
                self._stage.notify_all()
            try:
                self._insert(batch)
            except BaseException:
                with self._stage:  # still only in the log: put the rows back in front
                    self._staged.insert(0, batch)
                    self._staged_rows += batch.num_rows
                raise
            with self._stage:
                self._log.mark_applied(applied + rows)

    def _load_loop(self) -> None:
        while True:
            with self._stage:
                while not self._stopping:
                    if self._staged_rows >= ROW_GROUP_ROWS:
                        whole = True
                        break
                    if self._staged_rows and time.monotonic() - self._staged_since >= MAX_STAGE_SECONDS:
                        whole = False
                        break
                    self._stage.wait(1.0)
                if self._stopping:
                    return
            try:
                self._load_staged(whole_row_groups=whole)
            except Exception:
                log.exception("loading staged spans into DuckDB failed; they stay in the ingest log")
                time.sleep(1.0)

    def load_staged(self) -> None:
        """Insert every staged row now (reads do this themselves)."""
        self._load_staged(whole_row_groups=False)

    def compact(self) -> int:
        """Physically remove duplicate (trace_id, span_id) rows; returns how many were removed.

        Only traces that received rows since the previous compaction are examined, so a periodic
        compaction costs in proportion to new data, not the whole table.
        """
        with self._heavy, self._write_lock:
            self.load_staged()
            if not self._dirty:
                return 0
            since = self._dirty_since_ns
            where = "" if since is None else f"WHERE {traces_with(['ingested_ns >= ?'])}"
            params: list[Any] = [] if since is None else [since]
            index = self._trace_ranges
            if since is not None and index is not None:
                # the traces examined, their older rows read in their ingest ranges only (the
                # rows at or after the ranges' bound: all read)
                hashes = self._writer.execute(
                    "SELECT DISTINCT hash(trace_id) AS h FROM spans WHERE ingested_ns >= ?", [since]
                ).fetchnumpy()["h"]
                ranges = _merge_ranges(
                    [*index.ranges(hashes), (min(since, index.bound), _INT64_MAX)], MAX_INGESTED_RANGES
                )
                within = " OR ".join(["ingested_ns BETWEEN ? AND ?"] * len(ranges))
                where = f"WHERE ({within}) AND {where.removeprefix('WHERE ')}"
                params = [*(b for pair in ranges for b in pair), since]
            removed = self._writer.execute(
                f"""
                DELETE FROM spans WHERE rowid IN (
                    SELECT rowid FROM (
                        SELECT rowid, row_number() OVER (
                            PARTITION BY trace_id, span_id ORDER BY ingested_ns, rowid) AS copy
                        FROM spans {where}
                    ) WHERE copy > 1
                )
                """,
                params,
            ).fetchall()[0][0]
            self._dirty, self._dirty_since_ns = False, None
            self._changes += 1
            if removed:
                self._removals += 1
                self._removals_since = [*self._removals_since[-REMOVALS_KEPT + 1 :], (self._removals, since)]
            return int(removed)

    def _forget_expired_ranges(self, ranges: _TraceRanges) -> None:
        """Drops from ``ranges`` the hashes of the traces in ``_expired`` that retention just
        deleted (the caller holds the write lock), so the ranges hold the stored traces only and
        are not rebuilt from every row once the removed outnumber them. A hash that a trace
        still stored shares (a 64-bit collision) keeps its range: found by one pass over the
        stored trace ids, as the deletion's."""
        gone = self._writer.execute("SELECT DISTINCT hash(trace_id) AS h FROM _expired").fetchnumpy()["h"]
        if not len(gone):
            return
        shared = self._writer.execute(
            "SELECT DISTINCT hash(trace_id) AS h FROM spans"
            " WHERE hash(trace_id) IN (SELECT hash(trace_id) FROM _expired)"
        ).fetchnumpy()["h"]
        import numpy as np

        gone = np.asarray(gone, dtype=np.uint64)
        if len(shared):
            gone = np.setdiff1d(gone, np.asarray(shared, dtype=np.uint64))
        ranges.remove(gone)
        self._ranges_moved += 1

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Retention: drop whole traces whose last span ended before ``cutoff_ns``; spans removed."""
        with self._heavy, self._write_lock:
            self.load_staged()
            # the expired traces found once (a GROUP BY over every trace id), read by the count
            # below and by the deletion
            self._writer.execute(
                "CREATE OR REPLACE TEMP TABLE _expired AS"
                " SELECT trace_id FROM spans GROUP BY trace_id HAVING max(end_ns) < ?",
                [cutoff_ns],
            )
            counts_after: list[tuple[int, int, int]] | None = None
            try:
                if self._counts:  # what the deletion takes from the last kept count (the others go)
                    bound, spans, traces = self._counts[-1]
                    gone_spans, gone_traces = self._writer.execute(
                        """
                        SELECT count(*) FILTER (whole = 0), count(*) FILTER (whole = 1) FROM (
                            SELECT grouping(span_id) AS whole, min(ingested_ns) AS first FROM spans
                            WHERE trace_id IN (SELECT trace_id FROM _expired)
                            GROUP BY GROUPING SETS ((trace_id, span_id), (trace_id))
                        ) WHERE first < ?
                        """,
                        [bound],
                    ).fetchall()[0]
                    counts_after = [(bound, spans - int(gone_spans), traces - int(gone_traces))]
                for watch in self._count_watches:
                    watch.append(_EVERY_BOUND)
                removed = self._writer.execute(
                    "DELETE FROM spans WHERE trace_id IN (SELECT trace_id FROM _expired)"
                ).fetchall()[0][0]
                if counts_after is not None:  # (a deletion that failed leaves the counts as they were)
                    self._counts = counts_after
                if removed and self._trace_ranges is not None:
                    try:
                        self._forget_expired_ranges(self._trace_ranges)
                    except Exception:  # the deletion stands: the ranges are rebuilt at the next count
                        log.warning(
                            "span store: dropping retention's traces from the ranges failed", exc_info=True
                        )
                        self._trace_ranges = None
                        self._ranges_moved += 1
            finally:
                self._writer.execute("DROP TABLE IF EXISTS _expired")
            self._changes += 1
            ranges = self._trace_ranges
            # the ranges still hold (each still contains its trace's rows); the removed traces'
            # entries are dropped above, so this rebuild from every row (a GROUP BY of the whole
            # store at the next count) is a backstop: entries more than twice the traces counted
            traces_counted = self._counts[-1][2] if self._counts else 0
            if removed and ranges is not None and len(ranges) > 2 * max(traces_counted, 1):
                self._trace_ranges = None
                self._ranges_moved += 1
            # what retention has removed so far (the incremental analysis drops the same traces'
            # rows; the criterion is the same: the trace's last span ended before the cutoff)
            self.retention_cutoff_ns = max(self.retention_cutoff_ns or cutoff_ns, cutoff_ns)
            return int(removed)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        depth = getattr(self._read_depth, "depth", 0)  # this thread's reads in flight
        with self._gate:
            # (a reopen holds back new reads, not those nested in a read it waits for)
            while self._releasing or (self._draining and not depth):
                self._gate.wait()
            self._reads_in_flight += 1
        self._read_depth.depth = depth + 1
        try:
            yield
        finally:
            self._read_depth.depth = depth
            with self._gate:
                self._reads_in_flight -= 1
                if not self._reads_in_flight:
                    self._gate.notify_all()

    def release_cache(
        self,
        min_bytes: int = RELEASE_MIN_BYTES,
        headroom_bytes: int = RELEASE_HEADROOM_BYTES,
        *,
        wait: bool = True,
    ) -> int:
        """Drop the blocks of the stored table that DuckDB's buffer pool keeps cached after the
        queries that read them; returns the bytes released (0: less than ``min_bytes`` cached, or in memory).

        DuckDB keeps every block a query read until ``memory_limit`` forces it out, and serve's
        periodic queries read the whole table's ``trace_id`` column (the incremental analysis'
        arrivals, compaction, retention) and its recent row groups: the cache, and serve's RSS,
        grew with the store up to the limit (at 10M stored spans, one arrivals query and a batch
        read left ~280 MiB cached). A persistent block is only cached (it is re-read from the file
        when needed again), so lowering the limit to what is in use besides it, then restoring
        it, evicts just those and returns their memory. Under the write lock, so no insert runs
        meanwhile; concurrent reads keep ``headroom_bytes`` (what may stay cached)."""
        if self.path == ":memory:" or self._closed:
            return 0  # in memory, the blocks are the data
        # the write lock first (``wait`` False: not at all while a write, compaction or retention
        # holds it), so reads are not held back while this waits for it
        if not self._write_lock.acquire(blocking=wait):
            return 0
        try:
            return self._release_locked(min_bytes, headroom_bytes)
        finally:
            self._write_lock.release()

    def _release_locked(self, min_bytes: int, headroom_bytes: int) -> int:
        """``release_cache``'s work, the write lock held."""
        rows = self._writer.execute("SELECT tag, memory_usage_bytes FROM duckdb_memory()").fetchall()
        cached = sum(int(v) for tag, v in rows if tag == "BASE_TABLE")
        if cached < max(min_bytes, 1):
            return 0  # (checked before reads are held back)
        floor = max(sum(int(v) for tag, v in rows if tag != "BASE_TABLE") + headroom_bytes, 2**20)
        with self._gate:
            if self._reads_in_flight:
                return 0  # a read in flight could not allocate under the lowered limit: next time
            self._releasing = True  # reads starting now wait (_read)
        try:
            try:
                self._writer.execute(f"SET memory_limit = '{floor}B'")
            finally:
                self._writer.execute(f"SET memory_limit = '{self.memory_limit}'")
            rows = self._writer.execute(
                "SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'BASE_TABLE'"
            ).fetchall()
            return max(cached - sum(int(r[0]) for r in rows), 0)
        finally:
            with self._gate:
                self._releasing = False
                self._gate.notify_all()

    def rows_since_open(self) -> int:
        """Rows inserted into DuckDB since the database was opened or last reopened (:meth:`reopen`);
        -1 when a reopen closed it and could not open it again (the next reopen retries)."""
        return -1 if self._disconnected else self._rows_since_open

    def reopen(self, wait_s: float = REOPEN_WAIT_S) -> bool:
        """Checkpoint, close the database file and open it again, in place: the same store
        object, rows, kept counts and ingest-time ranges, and the same ``recent_arrivals``
        epoch (nothing stored changed), with a fresh DuckDB database instance. Returns whether
        it did (False: in memory or read-only, closed, or busy: see below).

        Why: a live DuckDB database keeps in memory (glibc's heap, not its buffer pool, which
        ``release_cache`` empties) state for every row group it wrote itself, ~2.3-2.5 MiB per
        million rows written, for as long as it stays open; a checkpoint keeps it too. Opened
        again, the same rows cost nearly nothing: their row groups' metadata is read back
        lazily, and even a query over the whole table brought back ~0.5 MiB at 12M rows
        (measured: written 12M rows through the ingest log with serve's periodic queries,
        heap in use 72.7 MiB; reopened every 4M rows, 52.4). A serve process that stays up
        grew by that much per million spans received.

        Safe against everything else the store does: it takes the heavy-query lock (counts,
        compaction, retention and the analysis worker's reads run before or after it), holds
        new reads back (``_read``; a thread's reads nested in its read in flight go on) until
        the reads in flight have ended, then takes the write lock (the loader's inserts wait;
        ``write`` does not: with the ingest log it only logs and stages, so ingest is neither
        refused nor slowed unless the stage fills meanwhile) and reconnects. It waits for all
        of that at most ``wait_s`` seconds, else gives up and returns False (try again later):
        a long read is never cut and no read ever sees a closed connection; a read starting
        meanwhile waits at most that long (and the reconnect: ~0.1-1 s, its checkpoint). If
        the file cannot be opened again the store stays open in name: writes go on into the
        ingest log (durable; loaded or replayed later), reads fail, and the next call retries."""
        if self.path == ":memory:" or self.read_only:
            return False  # in memory the database is the data; read-only stores write nothing
        deadline = time.monotonic() + wait_s
        if not self._heavy.acquire(timeout=max(wait_s, 0.0)):
            return False
        try:
            with self._gate:
                self._draining = True  # reads starting now wait (_reading)
            try:
                with self._gate:
                    while self._reads_in_flight:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            return False
                        self._gate.wait(remaining)
                # (a read in flight may need the write lock to end: taken only once they have)
                if not self._write_lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                    return False
                try:
                    if self._closed:
                        return False
                    self._reconnect()
                    return True
                finally:
                    self._write_lock.release()
            finally:
                with self._gate:
                    self._draining = False
                    self._gate.notify_all()
        finally:
            self._heavy.release()

    def _reconnect(self) -> None:
        """``reopen``'s swap: the write lock held, no read in flight and none starting."""
        started = time.monotonic()
        rows = self._rows_since_open
        if not self._disconnected:
            # first, while everything is still open: a checkpoint that fails leaves the store as it was
            self._writer.execute("CHECKPOINT")
            self._disconnected = True  # (from here on a retry only connects)
            with self._cursors_lock:
                for _, cursor in self._cursors:
                    _close_cursor(cursor)
                self._cursors.clear()
            # every thread's cursor belonged to the closed connection: each makes a new one
            self._local = threading.local()
            with contextlib.suppress(duckdb.Error):
                self._writer.close()
            # (closing the last connection of the database instance releases it; the next
            # ``connect`` opens the file as a new one)
            with contextlib.suppress(duckdb.Error):
                self._con.close()
        try:
            # another process may have opened the file in the moment it was closed (it finds
            # serve's ingest log locked and lets go: IngestLog): tried again for a while
            for attempt in range(RECONNECT_TRIES):
                try:
                    self._con = self._connect()
                    break
                except duckdb.IOException:
                    if attempt == RECONNECT_TRIES - 1:
                        raise
                    time.sleep(RECONNECT_PAUSE_S)
        except (duckdb.Error, OSError):
            log.exception(
                "span store %s: reopening the database failed; reads fail until it opens again", self.path
            )
            raise
        self._writer = self._con.cursor()
        self._disconnected = False
        self._rows_since_open = 0
        log.debug(
            "span store %s reopened in %.2f s (%d rows written since it was opened: the memory DuckDB kept for them is released)",
            self.path,
            time.monotonic() - started,
            rows,
        )

    def memory_usage(self) -> dict[str, Any]:
        """DuckDB's buffer pool in bytes: ``by_tag`` (``duckdb_memory()``, tags using any),
        ``used`` (their sum), ``temporary`` (spilled to disk) and ``limit`` (``memory_limit``)."""
        with self._reading():  # (not while ``reopen`` swaps the connection)
            return self._memory_usage()

    def _memory_usage(self) -> dict[str, Any]:
        rows = (
            self._cursor()
            .execute(
                "SELECT tag, memory_usage_bytes, temporary_storage_bytes FROM duckdb_memory()"
                " WHERE memory_usage_bytes > 0 OR temporary_storage_bytes > 0"
            )
            .fetchall()
        )
        limit = self._cursor().execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
        return {
            "by_tag": {str(tag): int(used) for tag, used, _ in rows if used},
            "used": sum(int(used) for _, used, _ in rows),
            "temporary": sum(int(spilled) for _, _, spilled in rows),
            "limit": str(limit),
        }

    # -- reads -------------------------------------------------------------------------------
    @_read
    def scan(
        self,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
        string_views: bool = False,
    ) -> pa.Table:
        """De-duplicated whole traces: a trace is in when any of its spans matches every filter.

        ``since_ns``/``until_ns`` bound a span's start (``since_ns <= start_ns < until_ns``);
        rows come ordered by trace_id, start_ns, span_id. ``string_views``: string columns as
        Arrow ``string_view`` (what polars holds: ``pl.from_arrow`` takes them without a copy).
        """
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        self.load_staged()
        if not selected:
            return pa.table({})
        conditions, params = _span_conditions(
            since_ns=since_ns, until_ns=until_ns, services=services, trace_ids=trace_ids
        )
        source = _spans_where()
        if conditions:
            source = _spans_where(traces_with(conditions))
        return self._read_spans(selected, source, params, string_views=string_views)

    @_read
    def scan_partition(
        self,
        part: int,
        parts: int,
        *,
        since_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
        string_views: bool = False,
    ) -> pa.Table:
        """Like ``scan``, for the traces with ``hash(trace_id) % parts == part`` only: the
        partitions of one ``parts`` split every trace into exactly one of them, whole.
        ``trace_ids``: only those of the partition's traces (the analysis' second pass reads
        the traces its findings name)."""
        if parts < 1 or not 0 <= part < parts:
            raise ValueError(f"scan_partition needs 0 <= part < parts, got part={part}, parts={parts}")
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        if not selected:
            return pa.table({})
        self.load_staged()
        in_part = f"hash(trace_id) % {int(parts)} = {int(part)}"
        conditions, params = _span_conditions(since_ns=since_ns, services=services)
        outer = [in_part]
        outer_params: list[Any] = []
        if trace_ids is not None:
            # IN (unnest) is a hash join; list_contains would compare every row with every id
            outer.append("trace_id IN (SELECT unnest(?::VARCHAR[]))")
            outer_params.append(list(trace_ids))  # as stored: these come from the analysis
        if conditions:
            conditions.insert(0, in_part)
            outer.append(traces_with(conditions))
        source = _spans_where(" AND ".join(outer))
        return self._read_spans(selected, source, outer_params + params, string_views=string_views)

    @_read
    def endpoint_trace_ids(
        self,
        service: str | None,
        operation: str | None,
        since_ns: int | None = None,
        most_spans: int | None = None,
        most_traces: int | None = None,
    ) -> tuple[list[str], int] | None:
        """(the ids of the window's traces with a span named ``operation`` in ``service`` — every
        trace whose root is that endpoint among them; either may be None: any; ``since_ns``: a
        trace with a span starting from then, as ``scan`` selects —, the span rows those traces
        hold: copies included, an upper bound of what a read of them gives); None when they hold
        more than ``most_spans`` or are more than ``most_traces`` (counted before the ids are
        fetched: the ids are held in this process). A question about the
        traces rooted at an endpoint (its critical path, a what-if of its traces) is answered
        over these traces alone (``hourglass.api.queries``): a trace's path and its re-timing
        depend on its own spans only."""
        conditions, params = _span_match(service, operation)
        if since_ns is not None:
            conditions += f" AND {traces_with(['start_ns >= ?'])}"
            params.append(since_ns)
        self.load_staged()
        cursor = self._cursor()
        traces = f"SELECT DISTINCT trace_id FROM spans WHERE {conditions}"
        spans, count = cursor.execute(
            f"WITH t AS ({traces}) SELECT (SELECT count(*) FROM spans WHERE trace_id IN "
            "(SELECT trace_id FROM t)), (SELECT count(*) FROM t)",
            params,
        ).fetchall()[0]
        if (most_spans is not None and spans > most_spans) or (
            most_traces is not None and count > most_traces
        ):
            return None
        if not spans:
            return [], 0
        ids = [row[0] for row in cursor.execute(f"{traces} ORDER BY trace_id", params).fetchall()]
        return ids, int(spans)

    @_read
    def window_roots(
        self,
        since_ns: int | None,
        spans_of: Sequence[tuple[str, str | None]] = (),
        trace_ids: Sequence[str] = (),
    ) -> pa.Table:
        """One row per trace of the window (``since_ns``: a trace with a span starting from then,
        as ``scan`` selects), in one aggregation of the span rows, for a what-if over the whole
        window that re-times only the traces its changes touch (``hourglass.analysis.
        whatif_query.whatif_of_touched_traces``). Columns ``trace_id``, ``spans`` (its span rows,
        copies included), ``root_service``, ``root_name``, ``root_duration_ns``:

        * a trace that is *asked* — it has a span of one of ``spans_of`` ((service, operation);
          operation None: any of the service), or its id is in ``trace_ids``, or its root is not
          plain (below) — has its ``trace_id`` and null root columns: it is read and repaired;
        * any other has a null ``trace_id`` and its root's service, name and duration
          (``end_ns - start_ns``, 0 when negative): what the analysis context makes of it.

        A root is plain when the trace has exactly one span row without a parent id, stored once
        (no copy of it), and, with ``since_ns``, starting from then. The context then chooses that
        span as the trace root whatever else the trace holds (a parentless span ranks before
        orphans and spans whose cycle was cut), it is the row a read keeps, and the window's
        selection of the read (a span from ``since_ns``) keeps the trace."""
        parentless = "(parent_span_id IS NULL OR parent_span_id = '')"
        window, params = "", []
        if since_ns is not None:
            window = f"WHERE {traces_with(['start_ns >= ?'])}"
            params.append(since_ns)
        touched, touched_params = [], []
        for service, operation in spans_of:
            match, match_params = _span_match(service, operation)
            touched.append(f"({match})")
            touched_params += match_params
        touched_any = f"bool_or({' OR '.join(touched)})" if touched else "false"
        plain = "a.roots = 1 AND a.trace_id NOT IN (SELECT trace_id FROM copied)"
        if since_ns is not None:
            plain += " AND a.root_start_ns >= ?"
        asked = f"a.touched OR a.trace_id IN (SELECT unnest(?::VARCHAR[])) OR NOT ({plain})"
        query = f"""
            WITH a AS (
                SELECT trace_id, count(*) AS spans, {touched_any} AS touched,
                    count(*) FILTER (WHERE {parentless}) AS roots,
                    any_value(span_id) FILTER (WHERE {parentless}) AS root_span_id,
                    any_value(service) FILTER (WHERE {parentless}) AS root_service,
                    any_value(name) FILTER (WHERE {parentless}) AS root_name,
                    any_value(start_ns) FILTER (WHERE {parentless}) AS root_start_ns,
                    any_value(greatest(end_ns - start_ns, 0)) FILTER (WHERE {parentless})
                        AS root_duration_ns
                FROM spans {window} GROUP BY trace_id
            ), copied AS (
                SELECT s.trace_id FROM spans s JOIN a
                    ON s.trace_id = a.trace_id AND s.span_id = a.root_span_id AND a.roots = 1
                GROUP BY s.trace_id HAVING count(*) > 1
            ), marked AS (SELECT a.*, {asked} AS asked FROM a)
            SELECT CASE WHEN asked THEN trace_id END AS trace_id, spans,
                CASE WHEN asked THEN NULL ELSE root_service END AS root_service,
                CASE WHEN asked THEN NULL ELSE root_name END AS root_name,
                CASE WHEN asked THEN NULL ELSE root_duration_ns END AS root_duration_ns
            FROM marked"""
        self.load_staged()
        all_params = [*touched_params, *params, list(trace_ids)]
        if since_ns is not None:
            all_params.append(since_ns)
        table: pa.Table = self._cursor().sql(query, params=all_params).to_arrow_table()
        return table

    @_read
    def has_span(
        self,
        service: str | None,
        operation: str | None,
        since_ns: int | None = None,
        parentless: bool = False,
    ) -> bool:
        """Whether a trace of the window (``since_ns``: one with a span starting from then, as
        ``scan`` selects) has a span named ``operation`` in ``service`` (either None: any); with
        ``parentless``, one without a parent id. Every stored row counts, a span's later copies
        too (a read keeps its first: they differ only if an exporter sent one span twice with
        different names or times)."""
        conditions, params = _span_match(service, operation)
        if parentless:
            conditions += " AND (parent_span_id IS NULL OR parent_span_id = '')"
        if since_ns is not None:
            conditions += f" AND {traces_with(['start_ns >= ?'])}"
            params.append(since_ns)
        self.load_staged()
        (found,) = (
            self._cursor()
            .execute(f"SELECT EXISTS (SELECT 1 FROM spans WHERE {conditions})", params)
            .fetchall()[0]
        )
        return bool(found)

    @_read
    def split_partitions(
        self,
        folder: str,
        parts: int,
        *,
        since_ns: int | None = None,
        services: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
        batch_rows: int = 262_144,
        cancel: threading.Event | None = None,
        skip: int = 0,
        trace_ids: list[str] | None = None,
    ) -> list[int]:
        """One read of the store for every partition of ``parts``: the rows ``scan_partition(p,
        parts, ...)`` selects, for each ``p``, appended to ``partition_file(folder, p)`` (Arrow
        IPC, uncompressed: a reader maps it without a copy; a file for every partition, empty
        ones too) as they stream out of DuckDB, ``batch_rows`` at a time, so this process holds
        a batch and not the store. The rows are as stored (copies included, in no order):
        :func:`read_partition_file` de-duplicates and orders them as ``scan_partition`` does.
        Returns the rows written per partition. Against ``scan_partition`` per partition, which
        reads the whole store each time (~0.09 s per million stored spans, each partition, each
        pass), this costs one read and one write of every row. ``cancel``: once set, the split
        stops at its next batch with :class:`SplitCancelled` (the files written so far stay; the
        caller removes the folder); a :class:`Cancel` also interrupts the query under way, so a
        split still waiting for its first batch stops at once too. ``skip``: partitions below it
        are neither read nor written (no file; their readers scan the store: 0 rows returned).
        ``trace_ids``: only those traces (an endpoint's, ``endpoint_trace_ids``), whole."""
        if parts < 1:
            raise ValueError(f"split_partitions needs parts >= 1, got {parts}")
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        selected += [c for c in _PARTITION_FILE_KEYS if c not in selected]
        self.load_staged()
        conditions, params = _span_conditions(since_ns=since_ns, services=services)
        wheres: list[str] = []
        if trace_ids is not None:  # (IN (unnest) is a hash join: as scan_partition's)
            wheres.append("trace_id IN (SELECT unnest(?::VARCHAR[]))")
            params = [list(trace_ids), *params]
        if conditions:  # whole traces: any span that matches brings its trace (as scan_partition)
            wheres.append(traces_with(conditions))
        source = _spans_where(" AND ".join(wheres))
        key = f"(hash(trace_id) % {int(parts)})::UINTEGER"  # scan_partition's partitions
        # (with each row's rowid: a reader keeps the copy the store's reads keep, ``_dedup``)
        query = f"SELECT {', '.join(selected)}, {_ROW}, {key} AS _partition FROM {source}"
        skip = max(0, min(int(skip), parts))
        if skip:
            query += f" WHERE {key} >= {skip}"
        cursor = self._cursor()
        cancelled = f"the split of {self.path} into {folder} was cancelled"
        # a ``Cancel`` interrupts the query itself: the first batch waits for DuckDB to build the
        # ``--since`` / ``--service`` filter over the whole store, which a flag checked between
        # batches would wait for
        with cancel.calling(cursor.interrupt) if isinstance(cancel, Cancel) else contextlib.nullcontext():
            try:
                if cancel is not None and cancel.is_set():
                    raise SplitCancelled(cancelled)
                reader = cursor.sql(query, params=params or None).to_arrow_reader(batch_rows)
                return self._write_partitions(reader, folder, parts, cancel, cancelled, skip)
            except SplitCancelled:
                raise
            except Exception as exc:  # interrupted: duckdb.InterruptException, or OSError from the reader
                if cancel is not None and cancel.is_set():
                    raise SplitCancelled(cancelled) from exc
                raise

    @staticmethod
    def _write_partitions(
        reader: pa.RecordBatchReader,
        folder: str,
        parts: int,
        cancel: threading.Event | None,
        cancelled: str,
        skip: int = 0,
    ) -> list[int]:
        """``split_partitions``' batches appended to their partitions' files (from ``skip`` on)."""
        schema = pa.schema([f for f in reader.schema if f.name != "_partition"])
        counts = [0] * parts
        writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        gather = _ColumnGatherer()
        try:
            for part in range(skip, parts):
                writers[part] = pa.ipc.new_file(partition_file(folder, part), schema)
            for batch in reader:
                if cancel is not None and cancel.is_set():
                    raise SplitCancelled(cancelled)
                if not batch.num_rows:
                    continue
                keys = batch.column(batch.num_columns - 1)
                order = pc.sort_indices(keys)
                grouped = pa.RecordBatch.from_arrays(gather(batch.columns[:-1], order), schema=schema)
                offset = 0
                for item in pc.value_counts(keys).sort("ascending", by="values"):
                    part, rows = item["values"].as_py(), item["counts"].as_py()
                    writers[part].write_batch(grouped.slice(offset, rows))
                    counts[part] += rows
                    offset += rows
        finally:
            gather.close()
            for writer in writers.values():
                writer.close()
        return counts

    def _read_spans(
        self, selected: list[str], source: str, params: list[Any], *, string_views: bool
    ) -> pa.Table:
        """``selected`` of the rows of ``source`` (a table expression over ``spans``), one row per
        (trace_id, span_id) (the first ingested copy), in (trace_id, start_ns, span_id) order
        (:func:`_read_rows`)."""
        # sorted by Arrow in read-only opens only (a partition's task): measured there; a store that
        # is written (serve's) keeps DuckDB's ORDER BY, whose sort stays inside its memory limit
        # where Arrow's holds the rows read and their sorted copy at once
        return _read_rows(
            self._cursor(), selected, source, params, string_views=string_views, arrow_sort=self.read_only
        )

    @staticmethod
    def _conform(table: pa.Table, selected: list[str], *, string_views: bool = False) -> pa.Table:
        schema = pa.schema([SPAN_SCHEMA.field(c) for c in selected])
        if string_views:
            schema = pa.schema([f.with_type(_as_views(f.type)) for f in schema])
        arrays = [table.column(i).cast(f.type) for i, f in enumerate(schema)]
        return pa.Table.from_arrays(arrays, schema=schema)

    @_read
    def trace(self, trace_id: str) -> pa.Table:
        """All spans of one trace with every column (empty table when unknown). Read in the
        trace's ingest range (and the rows after the ranges' bound) once the stored traces'
        ranges are known (``_TraceRanges``), instead of looking at every stored trace id: the
        report page reads one trace per recommendation, the REST and Jaeger APIs one per view."""
        self.load_staged()  # first: a row it loads below the ranges' bound lowers it
        trace_id = trace_id.lower()
        (h,) = self._cursor().execute("SELECT hash(?::VARCHAR)", [trace_id]).fetchall()[0]
        for _ in range(3):
            with self._write_lock:
                index, moved = self._trace_ranges, self._ranges_moved
                ranges = None if index is None else [*index.ranges([h]), (index.bound, _INT64_MAX)]
            if ranges is None:
                break
            table = self.scan_traces([trace_id], ingested_ranges=ranges, columns=SPAN_COLUMNS)
            # a write committed after the ranges were looked up, with a row of this trace below
            # their bound, lowered the bound (under the write lock, waited for here): read again,
            # else the read could hold part of that write only
            with self._write_lock:
                if self._ranges_moved == moved:
                    return table
        return self.scan(trace_ids=[trace_id], columns=SPAN_COLUMNS)

    def stats(self) -> StoreStats:
        """Unique span and trace counts (duplicates not yet compacted are not counted); the last
        counts are reused while no change was committed since they were taken."""
        # the one memory-heavy query at a time (the module doc), taken before the read gate and the
        # staged rows' load: a count waiting for a serialized read is not a read in flight (which
        # makes every release_cache meanwhile skip its turn), and counts the rows staged while it
        # waited (else its kept bound passes rows loaded after it, and the next count drops it)
        with self._heavy:
            counted, recounted = self._stats()
            if recounted:  # the count streamed the table's trace_id column: not kept in the buffer pool
                try:  # not while a write, compaction or retention holds the store: the next count's turn
                    self.release_cache(wait=False)
                except Exception:  # the count stands; the cache stays until the next release
                    log.warning("span store: releasing the buffer pool after a count failed", exc_info=True)
        return counted

    @_read
    def _stats(self) -> tuple[StoreStats, bool]:
        changes = self._changes  # read before loading: a change committed meanwhile forces a recount
        self.load_staged()
        cached = self._stats_cache
        if cached is not None and cached[0] == changes:
            return cached[1], False
        # Counting every unique (trace_id, span_id) takes seconds at 10M spans (and the traces, a
        # GROUP BY over every trace id, a hash table as big as the store's trace count): done once
        # (_count without a base), then each count adds what was ingested after the last kept bound.
        counted = None
        for attempt in range(3):  # counts that changes under it made unsure are taken again
            counted = self._count(locked=attempt == 2)
            if counted is not None:
                break
        assert counted is not None  # the last attempt holds the write lock: nothing changes under it
        self._stats_cache = (changes, counted)
        return counted, True

    def _count(self, *, locked: bool) -> StoreStats | None:
        """The unique spans and traces stored: the last kept count (bound W: rows ingested before
        W) plus the spans and traces whose first copy was ingested at or after W, found among the
        traces with a row at or after W (their older rows included: a span or trace already below
        W is not new). Keeps the count below a new bound (the latest row + 1, at most
        ``COUNT_LAG_NS`` ago). None: a write below W (or a deletion) ran meanwhile, so the counted
        rows are not those the kept count was taken with; ``locked`` holds the write lock
        throughout, so that cannot happen."""
        with self._write_lock:
            base = self._counts[-1] if self._counts else None
            watch: list[int] = []
            self._count_watches.append(watch)
            if locked:
                self._write_lock.acquire()  # held to the end of the count (released below)
        unwatched = False
        try:
            since = _EVERY_BOUND if base is None else base[0]
            with self._write_lock:  # the stored traces' ranges, when they hold every row below W
                index = self._trace_ranges
                if index is not None and index.bound < since:
                    index = None
            cursor = self._cursor()
            # one snapshot for both queries: the ranges looked up are those of the traces counted
            cursor.execute("BEGIN TRANSACTION")
            try:
                # per trace hash with a row at or after W, its rows' ingest range (every stored
                # trace's when there are no ranges yet: they are built from it)
                figures = cursor.execute(
                    _TRACE_RANGES_SQL, [since if index is not None else _EVERY_BOUND]
                ).fetchnumpy()
                params: list[Any] = [since, time.time_ns() - COUNT_LAG_NS, since, since]
                if base is None:  # every row: one aggregation each (GROUPING SETS took ~2x as long here)
                    firsts = """
                        SELECT 0 AS whole, min(ingested_ns) AS first FROM spans GROUP BY trace_id, span_id
                        UNION ALL SELECT 1, min(ingested_ns) FROM spans GROUP BY trace_id
                    """
                else:  # the traces with a row at or after W, their older rows too: read in their
                    # ingest ranges only (DuckDB skips the other row groups)
                    recent = figures["last"] >= since
                    if index is None:
                        older = list(
                            zip(
                                figures["first"][recent].tolist(),
                                figures["last"][recent].tolist(),
                                strict=True,
                            )
                        )
                    else:
                        with self._write_lock:
                            older = index.ranges(figures["h"][recent])
                    ranges = _merge_ranges([*older, (since, _INT64_MAX)], MAX_INGESTED_RANGES)
                    within = " OR ".join(["ingested_ns BETWEEN ? AND ?"] * len(ranges))
                    firsts = f"""
                        SELECT grouping(span_id) AS whole, min(ingested_ns) AS first FROM spans
                        WHERE ({within}) AND {traces_with(["ingested_ns >= ?"])}
                        GROUP BY GROUPING SETS ((trace_id, span_id), (trace_id))
                    """
                    params.extend(b for pair in ranges for b in pair)
                    params.append(since)
                params.append(since)
                row = cursor.execute(
                    f"""
                    WITH bound AS (
                        SELECT greatest(?, least(?, coalesce(max(ingested_ns) + 1, ?))) AS b
                        FROM spans WHERE ingested_ns >= ?
                    ), firsts AS ({firsts})
                    SELECT (SELECT b FROM bound),
                        count(*) FILTER (whole = 0 AND first < (SELECT b FROM bound)),
                        count(*) FILTER (whole = 0),
                        count(*) FILTER (whole = 1 AND first < (SELECT b FROM bound)),
                        count(*) FILTER (whole = 1)
                    FROM firsts WHERE first >= ?
                    """,
                    params,
                ).fetchall()[0]
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")
            bound, spans_below, spans, traces_below, traces = (int(v) for v in row)
            base_spans, base_traces = (0, 0) if base is None else base[1:]
            with self._write_lock:
                self._unwatch(watch)
                unwatched = True
                if any(changed < since for changed in watch):
                    return None  # what is below the base bound changed: its figures do not fit this count
                if not any(changed < bound for changed in watch):
                    kept = {b: (b, n, t) for b, n, t in self._counts}
                    kept[bound] = (bound, base_spans + spans_below, base_traces + traces_below)
                    self._counts = [kept[b] for b in sorted(kept)][-COUNTS_KEPT:]
                    # every row of the snapshot is in the ranges now: those below W were, those
                    # at or after W are in ``figures``; the rows written since are at or after
                    # ``bound`` (or lowered the ranges' bound)
                    if index is None:
                        self._trace_ranges = _TraceRanges(figures, bound)
                        self._ranges_moved += 1
                    elif self._trace_ranges is index:
                        index.add(figures, bound)
            return StoreStats(spans=base_spans + spans, traces=base_traces + traces)
        finally:
            with self._write_lock:
                if not unwatched:
                    self._unwatch(watch)
            if locked:
                self._write_lock.release()

    def _unwatch(self, watch: list[int]) -> None:
        """Stops recording writes for one count: its own list, by identity (two counts' lists
        are often equal, both empty)."""
        self._count_watches = [w for w in self._count_watches if w is not watch]

    @_read
    def services(self) -> list[str]:
        self.load_staged()
        rows = self._cursor().execute("SELECT DISTINCT service FROM spans ORDER BY service").fetchall()
        return [r[0] for r in rows]

    @_read
    def trace_sizes(self, since_ns: int | None = None, services: list[str] | None = None) -> tuple[Any, Any]:
        """(each trace's id hashed as this store's partitions take it, its rows), as numpy arrays
        (``TRACE_SIZES_SQL``): how many rows a partition of whole traces holds, for any count;
        of the traces a ``scan`` with the filters ``since_ns`` and ``services`` reads."""
        self.load_staged()
        where, params = window_where(since_ns=since_ns, services=services)
        found = self._cursor().execute(TRACE_SIZES_SQL.format(where=where), params).fetchnumpy()
        return found["h"], found["n"]

    @_read
    def largest_trace(
        self, since_ns: int | None = None, services: list[str] | None = None
    ) -> tuple[str, int] | None:
        """The trace with the most rows and its row count (None when the store, or the window of
        the filters ``since_ns`` and ``services``, is empty): what a partition of whole traces
        can never be smaller than."""
        self.load_staged()
        where, params = window_where(since_ns=since_ns, services=services)
        rows = self._cursor().execute(LARGEST_TRACE_SQL.format(where=where), params).fetchall()
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    @_read
    def window_rows(self, since_ns: int | None = None, services: list[str] | None = None) -> int:
        """Physical rows (copies included) of the traces a ``scan`` with the filters ``since_ns``
        and ``services`` reads: every row of each trace with a span that matches them. What a
        plan of that window's analysis counts: at 10M stored spans, a window of 1.7M is ~0.2 s
        to count, and planned on the whole store it was refused under a budget that holds it.
        Without a filter, :meth:`raw_row_count`."""
        if since_ns is None and services is None:
            return self.raw_row_count()
        self.load_staged()
        where, params = window_where(since_ns=since_ns, services=services)
        return int(self._cursor().execute(WINDOW_ROWS_SQL.format(where=where), params).fetchall()[0][0])

    @_read
    def newest_window(self, most: int, services: list[str] | None = None) -> int | None:
        """The earliest ``since_ns`` whose window (``window_rows(since_ns, services)``) holds at
        most ``most`` rows: the largest window of the newest traces a budget holds, which a
        refused analysis offers instead (None: not even the newest trace fits, or none matches)."""
        self.load_staged()
        sql, params = newest_window(most, services)
        found = self._cursor().execute(sql, params).fetchall()
        return int(found[0][0]) if found and found[0][0] is not None else None

    # -- the Jaeger query API's reads (collector.trace_query) ----------------------------------
    @_read
    def search_trace_ids(self, query: TraceQuery) -> list[str]:
        """Ids of up to ``query.limit`` traces with a span matching ``query``, newest first.

        Everything but attribute tags is filtered in SQL; a tag that lives in the raw span is
        pre-filtered in SQL on the key's bytes (hex match on ``raw``/``resource_json``) and
        checked exactly in Python on the candidate spans, streamed newest first until enough
        traces matched."""
        self.load_staged()
        conditions: list[str] = []
        params: list[Any] = []
        for condition, value in (
            ("service = ?", query.service),
            ("name = ?", query.operation),
            ("kind = ?", query.span_kind),
            ("start_ns >= ?", query.start_ns),
            ("start_ns <= ?", query.end_ns),
            ("end_ns - start_ns >= ?", query.min_duration_ns),
            ("end_ns - start_ns <= ?", query.max_duration_ns),
        ):
            if value is not None:
                conditions.append(condition)
                params.append(value)
        for key, wanted in query.tags.items():
            if key == "error":
                conditions.append("status_code = 2" if wanted.lower() == "true" else "status_code <> 2")
            elif key not in PSEUDO_TAGS:
                conditions.append("(contains(hex(raw), ?) OR contains(resource_json, ?))")
                params += [key.encode().hex().upper(), json.dumps(key)]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        cursor = self._cursor()
        if not query.tags or set(query.tags) == {"error"}:
            rows = cursor.execute(
                f"SELECT trace_id FROM spans {where} GROUP BY trace_id "
                "ORDER BY max(start_ns) DESC, trace_id LIMIT ?",
                [*params, query.limit],
            ).fetchall()
            return [r[0] for r in rows]
        reader = cursor.sql(
            f"SELECT {', '.join(TAG_CHECK_COLUMNS)} FROM spans {where} ORDER BY start_ns DESC, trace_id",
            params=params,
        ).to_arrow_reader(4096)
        return tag_checked_trace_ids(reader, query.tags, query.limit)

    @_read
    def operations(self, service: str, span_kind: int | None = None) -> list[tuple[str, int]]:
        """(span name, kind) pairs of one service, sorted."""
        self.load_staged()
        kind_filter = "" if span_kind is None else " AND kind = ?"
        params: list[Any] = [service] if span_kind is None else [service, span_kind]
        rows = (
            self._cursor()
            .execute(
                f"SELECT DISTINCT name, kind FROM spans WHERE service = ?{kind_filter} ORDER BY 1, 2", params
            )
            .fetchall()
        )
        return [(r[0], int(r[1])) for r in rows]

    @_read
    def dependencies(self, since_ns: int | None, until_ns: int | None) -> list[tuple[str, str, int]]:
        """(parent service, child service, calls): spans starting in ``[since_ns, until_ns)`` whose
        parent span belongs to another service (each span counted once)."""
        self.load_staged()
        window, params = _span_conditions(since_ns=since_ns, until_ns=until_ns, alias="c")
        window.insert(0, "p.service <> c.service")
        # a plain join, duplicates (not yet compacted) removed by counting distinct child spans:
        # 2-3x faster than de-duplicating both sides first (~100 ms at 200k spans)
        rows = (
            self._cursor()
            .execute(
                f"""
                SELECT p.service, c.service, count(DISTINCT (c.trace_id, c.span_id)) FROM spans c
                JOIN spans p ON p.trace_id = c.trace_id AND p.span_id = c.parent_span_id
                WHERE {" AND ".join(window)}
                GROUP BY 1, 2 ORDER BY 1, 2
                """,
                params,
            )
            .fetchall()
        )
        return [(r[0], r[1], int(r[2])) for r in rows]

    @_read
    def trace_arrivals(self, ingested_since_ns: int) -> pa.Table:
        """Every trace with a span ingested at or after ``ingested_since_ns`` (the incremental
        analysis' settle check): ``trace_id``, its spans (physical rows), the first and last
        ``ingested_ns`` and the latest ``start_ns`` / ``end_ns`` over all its spans. The inner
        filter prunes row groups by ``ingested_ns`` (rows are appended in ingest order)."""
        self.load_staged()
        query, params = self._trace_arrivals_query(ingested_since_ns)
        return self._cursor().sql(query, params=params).to_arrow_table()

    @contextlib.contextmanager
    def stream_trace_arrivals(self, ingested_since_ns: int) -> Iterator[pa.RecordBatchReader]:
        """``trace_arrivals`` as a stream of record batches (:meth:`_stream`)."""
        with self._stream(*self._trace_arrivals_query(ingested_since_ns)) as reader:
            yield reader

    @staticmethod
    def _trace_arrivals_query(ingested_since_ns: int) -> tuple[str, list[Any]]:
        return (
            f"""
            SELECT trace_id, {_ARRIVAL_FIGURES}
            FROM spans WHERE {traces_with(["ingested_ns >= ?"])}
            GROUP BY trace_id ORDER BY trace_id
            """,
            [int(ingested_since_ns)],
        )

    @_read
    def recent_arrivals(
        self, ingested_since_ns: int, splits: Sequence[int], until_ns: int | None = None
    ) -> pa.Table:
        """The rows ingested at or after ``ingested_since_ns`` (and before ``until_ns``, when
        given), grouped by trace and by ``part``:
        how many of the ascending ``splits`` are at or below the row's ``ingested_ns`` (0: before
        the first split). Per group: ``spans`` (physical rows), the first and last
        ``ingested_ns`` and the latest ``start_ns`` / ``end_ns``. One scan of the recent row
        groups only (pruned by ``ingested_ns``, unlike ``trace_arrivals``, which totals each
        trace over the whole table): the incremental analysis merges these with the figures it
        kept of the older rows. The schema's metadata, read before the rows: ``epoch`` (changes
        when the store is reopened), ``removals`` (compactions that removed rows so far),
        ``removals_since`` (JSON: [count, bound] of the last of them, see ``compact``) and
        ``retention`` (``retention_cutoff_ns``; empty: none yet)."""
        marks, query, params = self._recent_arrivals_query(ingested_since_ns, splits, until_ns)
        table = self._cursor().sql(query, params=params).to_arrow_table()
        return table.replace_schema_metadata(marks)

    @contextlib.contextmanager
    def stream_recent_arrivals(
        self, ingested_since_ns: int, splits: Sequence[int], until_ns: int | None = None
    ) -> Iterator[pa.RecordBatchReader]:
        """``recent_arrivals`` as a stream of record batches (:meth:`_stream`), its marks in the
        schema's metadata."""
        with self._reading():  # (the marks read, and the staged rows loaded, as in recent_arrivals)
            marks, query, params = self._recent_arrivals_query(ingested_since_ns, splits, until_ns)
            with self._stream(query, params, metadata=marks) as reader:
                yield reader

    def _recent_arrivals_query(
        self, ingested_since_ns: int, splits: Sequence[int], until_ns: int | None
    ) -> tuple[dict[str, str], str, list[Any]]:
        """(the marks, the query and its parameters) of ``recent_arrivals``; loads the staged
        rows (after reading the marks)."""
        bounds = [int(b) for b in splits]
        if bounds != sorted(bounds):
            raise ValueError(f"recent_arrivals: splits must ascend, got {bounds}")
        # read before the rows: a removal during the read changes it, and the kept figures are
        # then rebuilt at the next read (never kept as valid when they may not be)
        marks = {
            "epoch": str(self._removals_epoch),
            "removals": str(self._removals),
            "removals_since": json.dumps(self._removals_since),
            "retention": "" if self.retention_cutoff_ns is None else str(int(self.retention_cutoff_ns)),
        }
        self.load_staged()
        part = " + ".join(["(ingested_ns >= ?)::INTEGER"] * len(bounds)) or "0"
        until = "" if until_ns is None else "AND ingested_ns < ?"
        query = f"""
            SELECT trace_id, ({part})::INTEGER AS part, {_ARRIVAL_FIGURES}
            FROM spans WHERE ingested_ns >= ? {until}
            GROUP BY ALL ORDER BY trace_id, part
            """
        params = [*bounds, int(ingested_since_ns), *([] if until_ns is None else [int(until_ns)])]
        return marks, query, params

    @_read
    def arrival_bounds(self, rows: int) -> list[int]:
        """Ascending ``ingested_ns`` bounds that split the stored rows into ingest ranges of about
        ``rows`` rows each (empty: fewer rows than that): the incremental analysis rebuilds its
        per-trace figures range by range (``recent_arrivals(..., until_ns=...)``), holding one
        range's groups at a time instead of every stored trace's. Counted exactly per ingest
        time (one pass over that column; a request's rows share one): a range starts at the
        first ingest time with at least another ``rows`` rows before it, so every range holds
        rows and, but for its last ingest time's rows, fewer than ``rows`` (the rows of one
        ingest time are never split). A sample's quantiles, as before, gave equal bounds where
        many rows share an ingest time, and ranges empty or far larger than asked."""
        if rows < 1:
            raise ValueError(f"arrival_bounds: rows must be positive, got {rows}")
        self.load_staged()
        found = (
            self._cursor()
            .execute(
                """
                SELECT min(ingested_ns) FROM (
                    SELECT ingested_ns, (sum(count(*)) OVER (ORDER BY ingested_ns) - count(*)) // ? AS range
                    FROM spans GROUP BY ingested_ns
                ) WHERE range > 0 GROUP BY range ORDER BY 1
                """,
                [rows],
            )
            .fetchall()
        )
        return [int(r[0]) for r in found]

    @_read
    def arrivals_between(self, trace_ids: list[str], from_ns: int, to_ns: int) -> pa.Table:
        """These traces' rows ingested in [``from_ns``, ``to_ns``), grouped by trace (the columns
        of ``recent_arrivals`` but ``part``): the incremental analysis re-counts the traces
        retention may have removed since it kept their figures. Reads the row groups of that
        ingest range only."""
        self.load_staged()
        query, params = self._arrivals_between_query(trace_ids, from_ns, to_ns)
        return self._cursor().sql(query, params=params).to_arrow_table()

    @contextlib.contextmanager
    def stream_arrivals_between(
        self, trace_ids: list[str], from_ns: int, to_ns: int
    ) -> Iterator[pa.RecordBatchReader]:
        """``arrivals_between`` as a stream of record batches (:meth:`_stream`)."""
        with self._stream(*self._arrivals_between_query(trace_ids, from_ns, to_ns)) as reader:
            yield reader

    @staticmethod
    def _arrivals_between_query(trace_ids: list[str], from_ns: int, to_ns: int) -> tuple[str, list[Any]]:
        return (
            f"""
            SELECT trace_id, {_ARRIVAL_FIGURES}
            FROM spans WHERE ingested_ns >= ? AND ingested_ns < ?
                AND trace_id IN (SELECT unnest(?::VARCHAR[]))
            GROUP BY trace_id ORDER BY trace_id
            """,
            [int(from_ns), int(to_ns), list(trace_ids)],
        )

    @_read
    def scan_traces(
        self,
        trace_ids: list[str],
        *,
        ingested_from_ns: int | None = None,
        ingested_to_ns: int | None = None,
        ingested_ranges: Sequence[tuple[int, int]] | None = None,
        columns: tuple[str, ...] | None = None,
    ) -> pa.Table:
        """Like ``scan(trace_ids=...)``; when every span of those traces is known to have been
        ingested within [``ingested_from_ns``, ``ingested_to_ns``], only the row groups of that
        range are read (the incremental analysis reads a batch of settled traces this way).
        ``ingested_ranges``: the same for traces far apart in time, one [first, last] range each
        (or any ranges covering them: at most ``MAX_INGESTED_RANGES`` are kept, the closest
        merged); DuckDB skips the row groups outside all of them."""
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        if not selected or not trace_ids:
            return pa.Table.from_pylist([], schema=pa.schema([SPAN_SCHEMA.field(c) for c in selected]))
        self.load_staged()
        where, params = self._scan_traces_where(trace_ids, ingested_from_ns, ingested_to_ns, ingested_ranges)
        # read as they are and checked, the window run only on copies (``_read_rows``): the
        # window with its ``rowid`` tie-break cost 45-65 % more CPU than the plain read
        return self._read_spans(selected, _spans_where(where), params, string_views=False)

    @contextlib.contextmanager
    def stream_traces(
        self,
        trace_ids: list[str],
        *,
        ingested_from_ns: int | None = None,
        ingested_to_ns: int | None = None,
        ingested_ranges: Sequence[tuple[int, int]] | None = None,
        columns: tuple[str, ...] | None = None,
        batch_rows: int | None = None,
        sort_rows: int | None = None,
    ) -> Iterator[pa.RecordBatchReader]:
        """``scan_traces`` as a stream of record batches of at most ``batch_rows`` rows
        (:meth:`_stream`; default ``STREAM_BATCH_ROWS``): the same rows, in the same order,
        typed as ``scan_traces`` types them. The rows are ordered a part of the traces at a time
        (ascending trace ids, about ``sort_rows`` rows a part, default ``STREAM_SORT_ROWS``;
        counted first), each part one query, all in one transaction: one snapshot, as one query
        would read, with DuckDB's sort holding a part and not the whole read. One part when the
        ingest range holds far more rows than the read (:func:`_stream_parts`)."""
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        schema = pa.schema([SPAN_SCHEMA.field(c) for c in selected])
        if not selected or not trace_ids:
            yield pa.RecordBatchReader.from_batches(schema, iter(()))
            return
        batch_rows = STREAM_BATCH_ROWS if batch_rows is None else batch_rows
        sort_rows = STREAM_SORT_ROWS if sort_rows is None else sort_rows
        if batch_rows < 1 or sort_rows < 1:
            raise ValueError(f"stream_traces needs batch_rows, sort_rows >= 1, got {batch_rows}, {sort_rows}")
        bounds = (ingested_from_ns, ingested_to_ns, ingested_ranges)
        with self._stream_cursor() as cursor:
            cursor.execute("BEGIN TRANSACTION")  # (ended when the cursor closes)
            # the rows of each trace (copies too) in these ingest times, and how many of them are
            # copies of another, by trace id
            query, params = self._scan_traces_query(selected, trace_ids, *bounds, counts=True)
            rows_copies = cursor.execute(query, params).fetchall()
            counted = [(trace_id, rows) for trace_id, rows, _ in rows_copies]
            # the window that removes copies (its ``rowid`` tie-break: 45-65 % more CPU than the
            # plain read) runs only for the parts that hold one, as ``scan_traces`` runs it only
            # on rows that do: one snapshot, so a part's rows are the rows counted
            copied = {trace_id for trace_id, _, copies in rows_copies if copies}
            del rows_copies
            # every part's query reads the whole ingest range again: parts only where the range
            # holds not far more rows than the read (a late span of one trace can stretch a
            # batch's range over millions of rows; parts then cost many times one query)
            query, params = self._scan_traces_query(selected, trace_ids, *bounds, range_rows=True)
            in_range = int(cursor.execute(query, params).fetchall()[0][0])
            parts = _stream_parts(counted, sort_rows, in_range)

            def batches() -> Iterator[pa.RecordBatch]:
                for part in parts:
                    if not part:
                        continue
                    dedup = bool(copied) and any(trace_id in copied for trace_id in part)
                    query, params = self._scan_traces_query(selected, part, *bounds, dedup=dedup)
                    for batch in cursor.sql(query, params=params).to_arrow_reader(batch_rows):
                        yield _conform_batch(batch, schema)

            yield pa.RecordBatchReader.from_batches(schema, batches())

    @staticmethod
    def _scan_traces_where(
        trace_ids: list[str],
        ingested_from_ns: int | None,
        ingested_to_ns: int | None,
        ingested_ranges: Sequence[tuple[int, int]] | None,
        *,
        range_rows: bool = False,
    ) -> tuple[str, list[Any]]:
        """The condition (SQL) and parameters of the rows of ``trace_ids`` within the ingest
        bounds (``range_rows``: of any trace within them)."""
        conditions: list[str] = []
        params: list[Any] = []
        if not range_rows:
            # IN (unnest) is a hash join; list_contains would compare every row with every id
            conditions.append("trace_id IN (SELECT unnest(?::VARCHAR[]))")
            params.append([t.lower() for t in trace_ids])
        if ingested_from_ns is not None:
            conditions.append("ingested_ns >= ?")
            params.append(int(ingested_from_ns))
        if ingested_to_ns is not None:
            conditions.append("ingested_ns <= ?")
            params.append(int(ingested_to_ns))
        if ingested_ranges:
            ranges = _merge_ranges(ingested_ranges, MAX_INGESTED_RANGES)
            conditions.append("(" + " OR ".join(["ingested_ns BETWEEN ? AND ?"] * len(ranges)) + ")")
            params.extend(int(bound) for pair in ranges for bound in pair)
        return " AND ".join(conditions) or "true", params

    @staticmethod
    def _scan_traces_query(
        selected: list[str],
        trace_ids: list[str],
        ingested_from_ns: int | None,
        ingested_to_ns: int | None,
        ingested_ranges: Sequence[tuple[int, int]] | None,
        *,
        counts: bool = False,
        range_rows: bool = False,
        dedup: bool = True,
    ) -> tuple[str, list[Any]]:
        """``stream_traces``' query (a part of its traces; ``dedup``: through the window that
        keeps one copy of a span, ``_dedup``), or with ``counts`` the rows it reads per trace
        (copies included) and how many of them repeat a span (fewer distinct span ids than rows),
        ordered by trace id; with ``range_rows`` the number of stored rows in its ingest range
        (any trace: what each such query scans)."""
        where, params = DuckDBSpanStore._scan_traces_where(
            trace_ids, ingested_from_ns, ingested_to_ns, ingested_ranges, range_rows=range_rows
        )
        if range_rows:
            return f"SELECT count(*) FROM spans WHERE {where}", params
        if counts:
            return (
                f"SELECT trace_id, count(*), count(*) - count(DISTINCT span_id) FROM spans WHERE {where}"
                " GROUP BY trace_id ORDER BY trace_id",
                params,
            )
        window = _dedup() if dedup else ""
        query = f"SELECT {', '.join(selected)} FROM spans WHERE {where} {window} ORDER BY trace_id, start_ns, span_id"
        return query, params

    @contextlib.contextmanager
    def _stream(
        self,
        query: str,
        params: list[Any],
        *,
        schema: pa.Schema | None = None,
        metadata: dict[str, str] | None = None,
        batch_rows: int | None = None,
    ) -> Iterator[pa.RecordBatchReader]:
        """The rows of ``query`` as DuckDB produces them, ``batch_rows`` at a time (default
        ``STREAM_BATCH_ROWS``), for as long as the ``with`` block lasts: neither DuckDB (a
        streaming result) nor this process holds the whole result, only the query's own state (a
        sort's or a window's rows) and a batch.
        ``schema``: the batches cast to it (``_conform``); ``metadata``: the schema's. The query
        is one statement, so the rows are one snapshot however long they take to read; it runs
        on a cursor of its own (the result stays pending on it meanwhile), closed at the end,
        also when the reading stopped early or failed. A read of the store throughout (``_read``:
        ``release_cache`` waits for it). Loads the staged rows first."""
        batch_rows = STREAM_BATCH_ROWS if batch_rows is None else batch_rows
        if batch_rows < 1:
            raise ValueError(f"a stream needs batch_rows >= 1, got {batch_rows}")
        with self._stream_cursor() as cursor:
            source = cursor.sql(query, params=params or None).to_arrow_reader(batch_rows)
            if schema is None:
                target = source.schema
                batches: Iterator[pa.RecordBatch] = iter(source)
            else:
                target = schema
                batches = (_conform_batch(batch, schema) for batch in source)
            if metadata is not None:
                target = target.with_metadata(metadata)
                batches = (batch.replace_schema_metadata(metadata) for batch in batches)
            yield pa.RecordBatchReader.from_batches(target, batches)

    @contextlib.contextmanager
    def _stream_cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own for a streamed read (a result stays pending on it while the caller
        reads), closed at the end, also when the reading stopped early or failed; a read of the
        store throughout (``_read``: ``release_cache`` waits for it). Loads the staged rows first."""
        with self._reading():
            self.load_staged()
            if self._closed:
                raise RuntimeError(f"span store {self.path} is closed")
            cursor = self._con.cursor()
            try:
                yield cursor
            finally:
                _close_cursor(cursor)

    @contextlib.contextmanager
    def serialized(self) -> Iterator[None]:
        """For the ``with`` block, this thread's reads are the store's one memory-heavy query
        (the module doc): the block waits for a count, compaction or retention in progress, and
        those wait for it. Reentrant within one thread."""
        with self._heavy:
            yield

    @_read
    def newest_start_ns(self, rows: int) -> int | None:
        """About the start time from which the newest ``rows`` span rows start (an approximate
        quantile of ``start_ns``, in bounded memory); None when the store holds no more rows
        than that. serve's whole-store analysis cut to ``HOURGLASS_REPORT_MAX_SPANS``."""
        total = int(self._cursor().execute("SELECT count(*) FROM spans").fetchall()[0][0])
        if total <= rows:
            return None
        level = min(max(1.0 - rows / total, 0.0), 1.0)  # (a constant: DuckDB binds it as FLOAT)
        (start,) = (
            self._cursor().execute(f"SELECT approx_quantile(start_ns, {level!r}) FROM spans").fetchall()[0]
        )
        return None if start is None else int(start)

    def span_rows_since(self, since_ns: int | None) -> int:
        """Physical rows (duplicates and staged rows included) of spans starting at or after
        ``since_ns`` (None: every row): what a read of that window costs, for the query routes'
        memory guard (``hourglass.api.queries``); whole traces that straddle the edge add a few."""
        if since_ns is None:
            return self.raw_row_count()
        with self._write_lock:  # (the staged rows at least: ingest is not held for the count)
            staged = self._staged_rows
        (n,) = (
            self._cursor().execute("SELECT count(*) FROM spans WHERE start_ns >= ?", [since_ns]).fetchall()[0]
        )
        return staged + int(n)

    def raw_row_count(self) -> int:
        """Physical rows, duplicates included, staged rows too (a cheap change marker; for tests
        and compaction metrics)."""
        # under the write lock: the loader moves rows from staged to the table while holding it
        with self._write_lock:
            staged = self._staged_rows
            return staged + int(self._cursor().execute("SELECT count(*) FROM spans").fetchall()[0][0])

    def close(self) -> None:
        """Checkpoint and close; rows committed before are kept either way."""
        if self._loader is not None:  # stopped first: it takes the write lock itself
            with self._stage:
                self._stopping = True
                self._stage.notify_all()
            self._loader.join(60)
        with self._write_lock:
            if self._closed:
                return
            if self._disconnected:  # a reopen that failed: a last try, to load the staged rows
                with contextlib.suppress(duckdb.Error, OSError):
                    self._reconnect()
            if self._log is not None and not self._disconnected:  # (else they stay in the log)
                self.load_staged()
            with self._stage:
                self._closed = True
                self._stage.notify_all()
                if self._log is not None:
                    self._log.close(remove=True)
            with self._cursors_lock:
                for _, cursor in self._cursors:
                    _close_cursor(cursor)
                self._cursors.clear()
            if self._disconnected:  # nothing is open
                return
            self._writer.close()
            if self.path != ":memory:" and not self.read_only:
                # the figures for the next open (not kept: it counts everything, as after a
                # crash), then one checkpoint of the rows and them. (A checkpoint before the seal
                # and another after it: 1.0 s at 1M spans, against 0.7.) A crash before the
                # checkpoint, or a checkpoint refused (a read result left pending elsewhere holds
                # a transaction older than the seal), leaves both in the write-ahead log, which
                # the next open replays: either way the close goes on.
                try:
                    self._seal()
                except Exception:
                    log.warning(
                        "span store %s: could not keep its counts for the next open", self.path, exc_info=True
                    )
                with contextlib.suppress(duckdb.TransactionException):
                    self._con.execute("CHECKPOINT")
            self._con.close()

    def _seal(self) -> None:
        """What this open knows about the stored rows that an open cannot know without reading
        every row, kept in the file for the next open (:meth:`_unseal`): the removals epoch and
        marks that the incremental analysis' per-trace tally is valid against, the kept counts,
        the traces' ingest ranges and what compaction has yet to examine. Without it a serve
        restarted on a store of weeks rebuilt the tally from every row (~10 s at 12M spans, before
        its first report), counted every span and trace again and compacted every trace. With a
        fingerprint of the rows (count, first and last ingest time), so that rows changed by
        something else while the store was closed are not taken for these. (Under the write
        lock, everything loaded: the last thing ``close`` writes before its checkpoint.)"""
        import numpy as np

        (rows, first, last) = self._con.execute(_FINGERPRINT_SQL).fetchall()[0]
        ranges = self._trace_ranges
        state = {
            "fingerprint": [int(rows), first, last],
            "epoch": self._removals_epoch,
            "removals": self._removals,
            "removals_since": self._removals_since,
            "retention_cutoff_ns": self.retention_cutoff_ns,
            "counts": self._counts,
            "dirty": self._dirty,
            "dirty_since_ns": self._dirty_since_ns,
            "ranges": None
            if ranges is None
            else {"base_s": ranges.base_s, "bound": ranges.bound, "runs": len(ranges.runs)},
        }
        self._con.execute("BEGIN TRANSACTION")
        try:
            self._con.execute(f"CREATE OR REPLACE TABLE {_SEAL} (version INTEGER, state VARCHAR)")
            self._con.execute(
                f"INSERT INTO {_SEAL} VALUES (?, ?)", [_SEAL_VERSION, json.dumps(state, default=int)]
            )
            self._con.execute(f"DROP TABLE IF EXISTS {_SEAL_RANGES}")
            if ranges is not None:
                runs = ranges.runs
                columns = {
                    "run": np.repeat(np.arange(len(runs), dtype=np.int32), [len(r.keys) for r in runs]),
                    "h": np.concatenate([r.keys for r in runs]) if runs else np.zeros(0, np.uint64),
                    "first": np.concatenate([r.first for r in runs]) if runs else np.zeros(0, np.int32),
                    "last": np.concatenate([r.last for r in runs]) if runs else np.zeros(0, np.int32),
                }
                # (from the arrays' buffers: ``pa.array`` of a numpy array imports pandas, which
                # ``analyze --format json`` does not load otherwise)
                table = pa.Table.from_arrays(
                    [
                        pa.Array.from_buffers(pa.from_numpy_dtype(v.dtype), len(v), [None, pa.py_buffer(v)])
                        for v in columns.values()
                    ],
                    names=list(columns),
                )
                self._con.from_arrow(table).create(_SEAL_RANGES)
            self._con.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self._con.execute("ROLLBACK")
            raise

    def _sealed_runs(self, runs: int) -> Iterator[tuple[Any, Any, Any]]:
        """The kept ranges' runs, one read each (a run's rows, not every run's at once: at 30M
        traces all of them were ~1.2 GiB more at the open, once as Arrow and once as numpy)."""
        for run in range(runs):
            held = self._con.sql(
                f"SELECT h, first, last FROM {_SEAL_RANGES} WHERE run = {int(run)}"
            ).to_arrow_table()
            yield (
                _numpy_copy(held.column("h"), "uint64"),
                _numpy_copy(held.column("first"), "int32"),
                _numpy_copy(held.column("last"), "int32"),
            )

    def _unseal(self) -> None:
        """At a read-write open: the figures the last clean close kept (:meth:`_seal`), taken up
        when the rows are still those it described, then removed from the file either way (before
        anything is written: a run that ends without a clean close leaves none, and the next open
        counts everything, as it always did)."""
        tables = {
            r[0]
            for r in self._con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
                " AND schema_name = 'main'"
            ).fetchall()
        }
        if _SEAL not in tables:
            return
        try:
            found = self._con.execute(f"SELECT version, state FROM {_SEAL}").fetchall()
            state = json.loads(found[0][1]) if len(found) == 1 and found[0][0] == _SEAL_VERSION else None
            if state is not None:
                (rows, first, last) = self._con.execute(_FINGERPRINT_SQL).fetchall()[0]
                if state["fingerprint"] != [int(rows), first, last]:
                    log.info("span store %s changed since it was closed: counted again", self.path)
                    state = None
            ranges = None
            if state is not None and state["ranges"] is not None:
                ranges = _TraceRanges.restored(
                    state["ranges"]["base_s"],
                    state["ranges"]["bound"],
                    self._sealed_runs(state["ranges"]["runs"]),
                )
                if ranges is None:
                    state = None
            if state is not None:  # (every value read before any is taken: all or none)
                taken = (
                    int(state["epoch"]),
                    int(state["removals"]),
                    [(int(n), None if b is None else int(b)) for n, b in state["removals_since"]],
                    None if state["retention_cutoff_ns"] is None else int(state["retention_cutoff_ns"]),
                    [(int(b), int(n), int(t)) for b, n, t in state["counts"]],
                    bool(state["dirty"]),
                    None if state["dirty_since_ns"] is None else int(state["dirty_since_ns"]),
                )
                (
                    self._removals_epoch,
                    self._removals,
                    self._removals_since,
                    self.retention_cutoff_ns,
                    self._counts,
                    self._dirty,
                    self._dirty_since_ns,
                ) = taken
                self._trace_ranges = ranges
        except Exception:  # (a seal this open cannot read: counted again, as without one)
            log.warning(
                "span store %s: the counts kept at its last close are unreadable", self.path, exc_info=True
            )
        self._con.execute("BEGIN TRANSACTION")
        self._con.execute(f"DROP TABLE IF EXISTS {_SEAL_RANGES}")
        self._con.execute(f"DROP TABLE {_SEAL}")
        self._con.execute("COMMIT")

    def __enter__(self) -> DuckDBSpanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def query_interrupted(exc: BaseException) -> bool:
    """A DuckDB query that Ctrl-C (or SIGTERM, raised as Ctrl-C) interrupted, here or as the
    cause of ``exc``: DuckDB takes the KeyboardInterrupt the signal raised while it ran and ends
    the query with an error of its own (``RuntimeError('Query interrupted')`` in duckdb 2.0,
    ``duckdb.InterruptException`` before), which a caller would otherwise report as a failure
    (exit 1 with its traceback), or take for a failed step and go on."""
    seen: BaseException | None = exc
    for _ in range(8):  # (the chain of causes, not a cycle)
        if seen is None:
            return False
        if isinstance(seen, duckdb.InterruptException) or (
            type(seen) is RuntimeError and str(seen) == "Query interrupted"
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
