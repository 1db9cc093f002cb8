"""Analysis by partitions of whole traces: per-trace extraction, then one cross-trace decision.

A detector that is split (``hourglass.analysis.detectors.PARTS``) has two halves:

* ``extract(ctx) -> Rows`` reads the repaired spans of a set of *whole* traces and returns small
  named tables — candidate occurrences with their interventions, the per-instance rows that
  cross-trace evidence needs, partial counts. It never looks outside its traces.
* ``decide(rows, notes) -> list[Finding]`` applies the thresholds, shares, confidence and
  aggregation on those rows alone.

The rows of several partitions are concatenated table by table (:func:`combine`) before the
decision, so any partitioning of the traces gives the findings of the whole: the property
``tests/analysis/test_partitions.py`` checks for every split detector on the labelled, demo and
real trace files, for several partition counts.

A partition is ``hash(trace_id) mod P`` (:func:`split_by_trace`): every span of a trace lands in
the same partition, as the OpenTelemetry Collector's ``loadbalancing`` exporter routes by trace id.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing.process
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis import memlog, scratch, worker_start
from hourglass.analysis.context import AnalysisContext, compact
from hourglass.analysis.detectors import DETECTORS, PARTS
from hourglass.analysis.detectors._common import NearMissSink, Rows
from hourglass.analysis.endpoint_path import (
    PathRows,
    PathSummary,
    combine_path_rows,
    combine_path_summaries,
    path_rows,
    report_critical_paths,
    report_critical_paths_from_summary,
    summarize_path_rows,
)
from hourglass.analysis.model import Finding, NearMissLog, TraceRoots
from hourglass.analysis.planning import (  # noqa: F401  (the plan's names, as they were here)
    BUCKET_SPANS,
    DECIDE_BYTES_PER_SPAN,
    MIN_WORKER_BYTES,
    PEAK_BYTES_PER_SPAN,
    PRICE_BYTES_PER_SPAN,
    PROCESS_BASE_BYTES,
    ROWS_BYTES_PER_SPAN,
    SPLIT_BYTES,
    SPLIT_BYTES_PER_SPAN,
    SPLIT_FILTERED_BYTES,
    SPLIT_FILTERED_BYTES_PER_SPAN,
    SPLIT_MIN_PARTS,
    SUMMARY_BYTES_PER_SPAN,
    BudgetError,
    Plan,
    plan,
    split_bytes,
)
from hourglass.analysis.spill import SPILLABLE, Spill, write_whole
from hourglass.analysis.whatif import Impact, WhatIf
from hourglass.collector.schema import ANALYSIS_COLUMNS

log = logging.getLogger(__name__)

# (the memory plan lives in a module of its own, which the command line reads before it imports
# the analysis: :mod:`hourglass.analysis.planning`)


def split_by_trace(frame: pl.DataFrame, parts: int) -> list[pl.DataFrame]:
    """``frame``'s rows in ``parts`` partitions of whole traces (``hash(trace_id) mod parts``)."""
    if parts <= 1:
        return [frame]
    keyed = frame.with_columns((pl.col("trace_id").hash() % parts).alias("_partition"))
    return [keyed.filter(pl.col("_partition") == p).drop("_partition") for p in range(parts)]


def extract(ctx: AnalysisContext, kinds: Iterable[str] | None = None) -> dict[str, Rows]:
    """Every split detector's (or ``kinds``') extraction over one context."""
    chosen = PARTS if kinds is None else {k: PARTS[k] for k in kinds}
    out: dict[str, Rows] = {}
    for kind, parts in chosen.items():
        try:
            out[kind] = parts.extract(ctx)
        except Exception as exc:  # the whole analysis fails, naming the detector
            raise RuntimeError(f"detector {kind!r} failed while extracting: {exc}") from exc
    return out


def combine(extracted: Iterable[dict[str, Rows]], *, compact: bool = True) -> dict[str, Rows]:
    """The extractions of several partitions as one, table by table (empty tables dropped). With
    ``compact``, each partition's rows are first made as their kind's decision holds them
    (``DetectorParts.compact``), one partition at a time; without, they are combined as
    extracted (serve's stored segments: the rows stored as extracted)."""
    tables: dict[str, dict[str, list[pl.DataFrame]]] = {}
    for by_kind in extracted:
        for kind, rows in by_kind.items():
            made = PARTS[kind].compact if compact and kind in PARTS else None
            if made is not None:
                rows = made(rows)
            kind_tables = tables.setdefault(kind, {})
            for name, frame in rows.items():
                frames = kind_tables.setdefault(name, [])
                if frame.height or not frames:  # an empty table is kept only for its columns
                    frames.append(frame)
    return {
        kind: {name: _concat(frames) for name, frames in kind_tables.items()}
        for kind, kind_tables in tables.items()
    }


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    filled = [f for f in frames if f.height]
    if not filled:
        return frames[0]
    return filled[0] if len(filled) == 1 else pl.concat(filled, how="vertical_relaxed")


def held(kind: str, rows: Rows) -> Rows:
    """A kind's rows as serve stores them: made as its decision holds them (the kind's
    ``DetectorParts.compact``: span-id lists as words, occurrence keys hashed) and each table's
    repeated strings held once (:func:`shared_strings`). The same values and columns as the rows
    :func:`combine` compacts (which takes these as they are), so a decision on them is the same;
    loaded, they need no compaction, and they hold a fraction of the memory (at 12M stored spans,
    n_plus_one's rows: 66k sequences whose operation, label and statement are one 60-byte string
    each, stored once per row as extracted). Idempotent."""
    made = PARTS[kind].compact if kind in PARTS else None
    if made is not None:
        rows = made(rows)
    return {name: shared_strings(frame) for name, frame in rows.items()}


def shared_strings(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with each String column whose values repeat (at most half as many distinct
    values as rows) rebuilt so that every row's string points at one copy of its value: polars'
    strings are views (16 bytes a row) into buffers, and a gather of a column's distinct values
    shares their buffers instead of copying the bytes. The same values and dtype, so sorting,
    grouping, joining and comparing are unchanged (a Categorical would change the dtype and what
    those do); the views stay shared through pickling (Arrow IPC writes the buffers as they are),
    concatenation, gathers and filters."""
    if frame.height < 2:
        return frame
    shared: list[pl.Series] = []
    for name, dtype in frame.schema.items():
        if dtype != pl.String:
            continue
        column = frame[name]
        if column.n_unique() * 2 > column.len():
            continue
        values = column.unique().drop_nulls().sort()
        # the rank of a value among the distinct values (dense, from 1; a null stays null) is its
        # place in ``values`` + 1 (both order strings by their bytes)
        shared.append(values.gather(column.rank("dense") - 1).alias(name))
    return frame.with_columns(shared) if shared else frame


# Kinds whose decision runs mostly outside the GIL — lock_contention's sweep is DuckDB queries on
# DuckDB's own threads — decided, when the caller has room for it (``Plan.beside``), in a thread of
# their own while this thread decides the other kinds (mostly Python and polars): measured at 1M
# spans, the sweep was about half of the decision, with the worker processes idle meanwhile.
DECIDE_BESIDE = ("lock_contention",)


def decide(
    rows: Mapping[str, Rows],
    notes: NearMissSink,
    spill: Spill | None = None,
    *,
    beside: bool = False,
    progress: Progress | None = None,
    elsewhere: Elsewhere | None = None,
) -> dict[str, list[Finding]]:
    """Each split detector's decision over combined rows (with ``spill``, the tables it spilled
    read from there, one bucket at a time). With ``beside``, the kinds of ``DECIDE_BESIDE`` are
    decided in a thread of their own beside the others — or, with ``elsewhere``, in an idle
    worker process (:class:`Elsewhere`; here after all when it cannot start one, or the worker
    fails); the findings and the near misses (each kind's noted apart, then
    added in the kinds' order) are the same as one kind after another.
    ``progress``: told ("deciding", kinds decided, kinds) from this thread as they are."""
    out: dict[str, list[Finding]] = {}
    decided, kinds = 0, len(rows)
    if progress:
        progress("deciding", 0, kinds)
    aside = [k for k in rows if k in DECIDE_BESIDE] if beside and len(rows) > 1 else []
    logs = {k: _HeldNotes() for k in rows} if aside else {}
    # (the collector paused over them all when a kind is decided aside: one thread's pause must
    # not end in the middle of the other's)
    with _collector_paused() if aside else nullcontext(), ThreadPoolExecutor(1, "hourglass-decide") as pool:
        futures: dict[str, Future[list[Finding]]] = {}
        remote: set[str] = set()
        for k in aside:
            started = elsewhere.start(k, logs[k]) if elsewhere is not None else None
            if started is not None:
                futures[k] = started
                remote.add(k)
            else:
                futures[k] = pool.submit(_decide_kind, k, rows, logs[k], spill)
        for kind in rows:
            if kind not in futures:
                out[kind] = _decide_kind(kind, rows, logs.get(kind, notes), spill)
                decided += 1
                if progress:
                    progress("deciding", decided, kinds)
        for kind, future in futures.items():
            try:
                out[kind] = future.result()
            except Exception as exc:
                if kind not in remote or elsewhere is None:
                    raise
                # (its notes are told with its findings only: none held yet)
                log.warning("deciding %s in a worker process failed (%s); deciding it here", kind, exc)
                elsewhere.failed(exc)
                out[kind] = _decide_kind(kind, rows, logs[kind], spill)
            decided += 1
            if progress:
                progress("deciding", decided, kinds)
    for held in logs.values():  # in the kinds' order, as if decided one after another
        held.replay(notes)
    return {kind: out[kind] for kind in rows}


class Elsewhere:
    """Kinds of kept rows (:class:`KeptRows`) decided in a worker process of ``executor`` that
    has nothing to do meanwhile (``ProcessExecutor.submit``: the workers kept through the
    decision), each reading its kind's rows and buckets from ``spill`` itself: measured at 1M
    spans, lock_contention's sweep (about half of the decision) took turns with the other kinds
    on this process' interpreter and cores while both workers sat idle. The findings and near
    misses come back pickled, as a pricing task's do."""

    def __init__(self, executor: ProcessExecutor, spill: Spill) -> None:
        self.executor, self.spill = executor, spill
        self._early: dict[str, Future[Any] | None] = {}

    def start_early(self, kinds: Iterable[str]) -> None:
        """``kinds``' decisions started now, before this process combines what the partitions
        returned and decides the endpoints' critical paths (which they do not read), for
        :meth:`start` to take up."""
        for kind in kinds:
            self._early[kind] = self.executor.submit(decide_kept, self.spill, kind)

    def start(self, kind: str, notes: _HeldNotes) -> Future[list[Finding]] | None:
        """``kind``'s decision started in a worker (None: no worker to run it now); its near
        misses are added to ``notes`` when its findings arrive."""
        started = (
            self._early.pop(kind)
            if kind in self._early
            else self.executor.submit(decide_kept, self.spill, kind)
        )
        if started is None:
            return None
        out: Future[list[Finding]] = Future()

        def arrived(done: Future[tuple[list[Finding], list[tuple[tuple[Any, ...], dict[str, Any]]]]]) -> None:
            try:
                found, calls = done.result()
            except BaseException as exc:
                out.set_exception(exc)
                return
            notes.calls.extend(calls)
            out.set_result(found)

        started.add_done_callback(arrived)
        return out

    def failed(self, exc: BaseException) -> None:
        """A decision that failed in a worker: a pool whose worker died is closed (the next map
        starts another)."""
        if isinstance(exc, BrokenProcessPool):
            self.executor.close(wait=False)


def decide_kept(
    spill: Spill, kind: str
) -> tuple[list[Finding], list[tuple[tuple[Any, ...], dict[str, Any]]]]:
    """A worker's task: ``kind``'s decision over the rows the partitions kept in ``spill``
    (:class:`KeptRows`), with the near misses it noted (every argument, in order)."""
    held = _HeldNotes()
    found = _decide_kind(kind, KeptRows(spill, [kind]), held, spill)
    return found, held.calls


class _HeldNotes(NearMissLog):
    """A kind's near misses held as they were told (every argument), for :meth:`replay` to tell
    another sink in the kinds' order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def note_near_miss(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))

    def replay(self, notes: NearMissSink) -> None:
        for args, kwargs in self.calls:
            notes.note_near_miss(*args, **kwargs)


def _decide_kind(
    kind: str, rows: Mapping[str, Rows], notes: NearMissSink, spill: Spill | None
) -> list[Finding]:
    # ``rows[kind]`` handed on, not kept here: a decision that compacts the rows it is given
    # (``DetectorParts.compact``; spilled rows reach it as read back, not compacted per partition)
    # lets the text go once the compact form is made, instead of holding both to the end
    try:
        with _collector_paused():
            if spill is not None and kind in SPILLABLE:
                found = SPILLABLE[kind].decide(rows[kind], notes, spill.buckets_of(kind))
            else:
                found = PARTS[kind].decide(rows[kind], notes)
    except Exception as exc:
        from hourglass.collector.duckdb_store import query_interrupted

        if query_interrupted(exc):  # Ctrl-C in a DuckDB sweep of the decision: not a detector's failure
            raise KeyboardInterrupt from None
        raise RuntimeError(f"detector {kind!r} failed while deciding: {exc}") from exc
    memlog.note(f"decided {kind}")
    return found


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for one detector's decision: a decision builds up to
    ~10^5 occurrences (an object, tuples and a dict each), none in a cycle and all kept, and every
    collection these allocations trigger walks the objects built so far (with the rest of the
    process'): a third to a half of a detector's decision over a 7M-span serve store. Freed objects
    still go by reference counting; a cycle waits for the next collection (serve's analysis
    worker collects after each round)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# ----------------------------------------------------------------------------------------------
# Running partitions: where the spans come from, what a task returns, who runs the tasks


@dataclass(frozen=True)
class StoreSource:
    """Partitions read from a span store by each task itself (``scan_partition``): a DuckDB file
    opened read-only (so several processes read it at once) — on a cluster, a path every worker
    reaches (shared storage) — or a ClickHouse server URL."""

    location: str
    since_ns: int | None = None
    services: tuple[str, ...] | None = None
    # only these traces, whole (a question's: an endpoint's traces, those a what-if touches)
    trace_ids: tuple[str, ...] | None = None

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        """Partition ``part`` of ``parts`` (with ``trace_ids`` and/or the source's own, only
        those of its traces), its strings as Arrow string views where the store makes them (polars
        takes those as they are)."""
        if self.trace_ids is not None:
            trace_ids = (
                list(self.trace_ids)
                if trace_ids is None
                else sorted(set(trace_ids).intersection(self.trace_ids))  # (never others)
            )
        store = open_for_reading(self.location)
        try:
            return store.scan_partition(
                part,
                parts,
                since_ns=self.since_ns,
                services=list(self.services) if self.services else None,
                trace_ids=trace_ids,
                columns=ANALYSIS_COLUMNS,
                string_views=True,
            )
        finally:
            store.close()


@dataclass(frozen=True)
class SplitSource:
    """The partitions of one run read from their own files, written by one read of a DuckDB store
    (:func:`split_store`) in a temporary folder of this machine: each task reads its partition
    alone (``read_partition_file``: mapped, not copied), where :class:`StoreSource` reads the
    whole store for each partition and each pass. The rows and their order are those
    ``scan_partition`` gives for the same partition."""

    folder: str
    parts: int
    # partitions below ``skip`` have no file (the workers' first ones, read from the store while
    # the split was written: ``split_store``'s ``skip``); they are read from ``store``, as is any
    # partition whose file the reading process does not see (``DaskExecutor.sees``)
    skip: int = 0
    store: StoreSource | None = None

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        from hourglass.collector.duckdb_store import partition_file, read_partition_file

        if parts != self.parts or not 0 <= part < parts:
            raise ValueError(f"partition {part} of {parts}: the files hold {self.parts} partitions")
        file = partition_file(self.folder, part)
        if self.store is not None and (part < self.skip or not os.path.exists(file)):
            # (a Dask worker that joined after the workers were found to see this machine's
            # files, and does not: ``DaskExecutor.sees``)
            return self.store.load(part, parts, trace_ids)
        return read_partition_file(
            file,
            trace_ids=trace_ids,
            columns=ANALYSIS_COLUMNS,
            string_views=True,
        )

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


Source = StoreSource | SplitSource

# DuckDB's buffer pool while a whole store is split: the split streams every row once, so a block
# cached after it was read is never read again, and under the store's default limit the cache
# grew with the store (the deciding process peaked at 606 MiB splitting a 5M-span store) while
# the workers extract their first partitions beside it (``run_extraction``'s ``later``)
SPLIT_MEMORY_LIMIT = "128MB"


def splits(source: Source, parts: int) -> bool:
    """Whether :func:`split_store` writes ``source``'s partitions to files (a DuckDB file of this
    machine, ``SPLIT_MIN_PARTS`` partitions or more) rather than returning None."""
    from hourglass.collector.store import local_path

    if not isinstance(source, StoreSource) or parts < max(2, SPLIT_MIN_PARTS):
        return False
    return local_path(source.location) == source.location and source.location != ":memory:"


def trace_parts_of(source: Source, trace_ids: list[str], parts: int) -> pl.DataFrame | None:
    """(trace_id, part) of ``trace_ids`` in ``source``'s ``parts`` partitions, as its tasks read
    them: DuckDB's ``hash(trace_id) % parts`` (``scan_partition``, ``split_store``) for a DuckDB
    file's partitions (a split is always one's); None for a ClickHouse store (its own hash)."""
    from hourglass.collector.store import local_path

    if isinstance(source, StoreSource) and (
        local_path(source.location) != source.location or source.location == ":memory:"
    ):
        return None
    import duckdb

    from hourglass.collector.duckdb_store import quiet

    connection = quiet(duckdb.connect())
    try:
        connection.register("ids", pa.table({"trace_id": pa.array(trace_ids, type=pa.string())}))
        table = connection.sql(
            f"SELECT trace_id, (hash(trace_id) % {int(parts)})::BIGINT AS part FROM ids"
        ).to_arrow_table()
    finally:
        connection.close()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


# the files a run holds open beside the split's partition files: the store and DuckDB's own, the
# pipes to the worker processes, the modules' (measured: ~17 when a split of 100 partitions hit a
# limit of 64), with room to spare
OPEN_FILES_BESIDE = 48


def room_for_open_files(files: int) -> int:
    """How many files this process may open at once beside those it holds now and
    ``OPEN_FILES_BESIDE``, after raising its soft limit (``ulimit -n``, RLIMIT_NOFILE) toward its
    hard limit when ``files`` would not fit under it: the split writes every partition's file at
    once (:func:`split_store`), and a split that cannot open them failed and fell back to reading
    the whole store for every partition and pass. ``files`` or more when they fit; unlimited (no
    ``resource`` module): ``files``."""
    try:
        import resource
    except ImportError:  # (not on a Unix)
        return files
    try:
        held = len(os.listdir("/proc/self/fd"))
    except OSError:  # (no /proc: the beside count's room covers a run's usual files)
        held = 16
    need = held + files + OPEN_FILES_BESIDE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return files
    return max(0, soft - held - OPEN_FILES_BESIDE)


# what a question's split writes a span (the analysis columns as Arrow IPC: ~415 B measured on the
# soak's traces), and how much more the disk must keep free than the split writes: the store's
# ingest shares it
SPLIT_FILE_BYTES_PER_SPAN = 450
SPLIT_DISK_MARGIN = 2


def question_split_refused(
    spans: int, parts: int, free_memory: int, filtered: bool, folder: str | None
) -> str | None:
    """Why a what-if or critical-path question's window of ``spans`` spans in ``parts`` partitions
    is not read once into partition files in ``folder`` (None: ``$TMPDIR``) but scanned per
    partition; None when it is split. Not for fewer than ``SPLIT_MIN_PARTS`` partitions; nor when
    the split's own memory (``planning.split_bytes``: a ``since`` window joins its trace ids) is
    more than ``free_memory`` (what the budget leaves beside what the process holds); nor when
    this process may not open a file per partition at once; nor when the disk has less than
    ``SPLIT_DISK_MARGIN`` times what the split writes free."""
    if parts < SPLIT_MIN_PARTS:
        return f"{parts} partitions"
    if split_bytes(spans, filtered) > free_memory:
        return f"the split needs {split_bytes(spans, filtered) / 2**20:,.0f} MiB, {max(free_memory, 0) / 2**20:,.0f} MiB of the budget is left"
    if room_for_open_files(parts) < parts:
        return f"{parts} partition files cannot be open at once (ulimit -n)"
    written = spans * SPLIT_FILE_BYTES_PER_SPAN
    try:
        free_disk = shutil.disk_usage(folder or tempfile.gettempdir()).free
    except OSError as exc:
        return f"the disk of {folder or tempfile.gettempdir()}: {exc}"
    if free_disk < SPLIT_DISK_MARGIN * written:
        return (
            f"the split writes ~{written / 2**30:.1f} GiB and {folder or tempfile.gettempdir()} has "
            f"{free_disk / 2**30:.1f} GiB free"
        )
    return None


def open_files_limit() -> int | None:
    """This process' soft limit of open files (None: unlimited, or not on a Unix)."""
    try:
        import resource
    except ImportError:
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def split_store(
    source: Source,
    parts: int,
    *,
    near: str | None = None,
    cancel: threading.Event | None = None,
    skip: int = 0,
) -> SplitSource | None:
    """``source``'s partitions written to their own files (:class:`SplitSource`), by one read of
    the store, when it is a DuckDB file of this machine and ``parts`` is worth it
    (``SPLIT_MIN_PARTS``); else None (a ClickHouse store, or few partitions: the tasks scan the
    store). The folder is made in ``$TMPDIR`` (or ``near``) and removed if the split fails or is
    interrupted; the caller removes it after the run (:meth:`SplitSource.remove`). ``cancel``:
    once set, the split stops at its next batch (``SplitCancelled``) and removes its folder; a
    ``duckdb_store.Cancel`` also interrupts the store's query, so it stops at once. ``skip``:
    partitions ``0 .. skip-1`` are not written (a split beside the extraction, whose first round
    reads them from the store: ``run_extraction``'s ``later``); the split reads them from
    ``source`` (measured at 1M spans in 6 partitions, two skipped: ~0.15 s less of this process'
    CPU and 70 MB less written)."""
    if not isinstance(source, StoreSource) or not splits(source, parts):
        return None
    location = source.location
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    folder = scratch.make("partitions", near)
    try:
        # (a --since or --service filter joins the store with its matching trace ids: the
        # store's own limit, room for that join's table; the source's own trace ids are a join
        # with a list of them, planned as an unfiltered split: ``planning.split_bytes``)
        filtered = source.since_ns is not None or bool(source.services)
        store = (
            DuckDBSpanStore(location, read_only=True)
            if filtered
            else DuckDBSpanStore(location, read_only=True, memory_limit=SPLIT_MEMORY_LIMIT)
        )
        try:
            store.split_partitions(
                folder,
                parts,
                since_ns=source.since_ns,
                services=list(source.services) if source.services else None,
                columns=ANALYSIS_COLUMNS,
                cancel=cancel,
                skip=skip,
                trace_ids=list(source.trace_ids) if source.trace_ids is not None else None,
            )
        finally:
            store.close()
        # the batches' buffers, kept by Arrow's allocator for reuse (~90 MiB at 1M spans), back
        # to the system: this process decides, and the memory plan counts it without them
        pa.default_memory_pool().release_unused()
        memlog.note(f"store split into {parts} partition files")
    except BaseException:  # a failure or Ctrl-C: nothing left behind
        shutil.rmtree(folder, ignore_errors=True)
        raise
    skip = max(0, min(skip, parts))
    return SplitSource(folder, parts, skip, source)


# What the pricing reads of a partition's repaired spans (``WhatIf``'s engine, ``call_durations``)
PREPARED_COLUMNS = ("trace_id", "span_id", "start_ns", "end_ns", "blocking", "depth", "row", "parent_row")
# what a kept file holds of them: ``row`` is renumbered by :meth:`Prepared.context` anyway
_KEPT_COLUMNS = tuple(c for c in PREPARED_COLUMNS if c != "row")


@dataclass(frozen=True)
class Prepared:
    """The spans each extraction task repaired, kept for the pricing passes of the same run: one
    Arrow IPC file per partition in a temporary folder of this machine, with the columns the
    pricing reads (``PREPARED_COLUMNS``, but ``row``, which is renumbered on reading;
    uncompressed, strings in Arrow's plain layout: ~100 bytes a span, :func:`_write_kept`) and
    each span's blocking predecessor (the critical path's, which the what-if engine re-times
    from). A pricing task then takes its findings' traces from that file (:meth:`context`)
    instead of reading them from the store again and repairing them again (measured at 1M spans
    in 6 partitions: ~1.8 s of CPU over the run).
    Repair is per trace, so the rows of some traces of a repaired partition are those traces
    repaired alone, which is what the pricing read before. A file that is missing (its write
    failed: a full disk) means that partition is read and repaired as before."""

    folder: str

    @staticmethod
    def create(near: str | None = None) -> Prepared | None:
        """A fresh folder (in ``$TMPDIR``, or ``near``); None when it cannot be made."""
        try:
            # (removed by a serve worker that ends in the middle of the run)
            folder = scratch.make("prepared", near, held=True)
        except OSError as exc:
            log.warning("no folder for the repaired partitions (%s); the pricing repairs them again", exc)
            return None
        return Prepared(folder)

    def file(self, part: int) -> str:
        return os.path.join(self.folder, f"p{part:06d}.arrow")

    def write(self, part: int, ctx: AnalysisContext) -> None:
        """Keeps ``ctx``'s repaired spans as partition ``part``'s (a failed write is logged and
        leaves no file: the pricing repairs that partition again)."""
        predecessor = ctx.critical.predecessor if ctx.critical is not None else None
        if predecessor is None or predecessor.size != ctx.spans.height:
            return
        frame = ctx.spans.select(_KEPT_COLUMNS).with_columns(
            pl.Series("predecessor", predecessor, dtype=pl.Int64)
        )
        try:  # (not into a folder made again: one removed means the run has ended)
            write_whole(Path(self.file(part)), partial(_write_kept, frame), make_folder=False)
        except Exception as exc:  # (the file is only an optimisation: any failure falls back)
            log.warning(
                "keeping partition %d's repaired spans failed (%s); the pricing repairs it again", part, exc
            )
            with suppress(OSError):
                os.remove(self.file(part))

    def context(self, part: int, trace_ids: Sequence[str]) -> AnalysisContext | None:
        """A pricing context of the traces ``trace_ids`` of partition ``part`` (None: its file is
        missing): their repaired spans in the partition's order, rows and parents renumbered
        within them, with the what-if engine built on the kept predecessors. Only the pricing's
        columns, and ``traces`` holds the trace ids only: not a context for the detectors."""
        path = self.file(part)
        if not os.path.exists(path):
            return None
        whole = pl.read_ipc(path)
        keep = whole["trace_id"].is_in(pl.Series(list(trace_ids), dtype=pl.String).implode()).to_numpy()
        rows = np.flatnonzero(keep)
        renumbered = np.full(whole.height + 1, -1, dtype=np.int64)  # (the last: -1 stays -1)
        renumbered[rows] = np.arange(rows.size)
        parent = whole["parent_row"].fill_null(-1).to_numpy()[rows]
        predecessor = renumbered[whole["predecessor"].to_numpy()[rows]]
        spans = (
            whole[rows]
            .drop("predecessor")
            .with_columns(
                pl.Series("row", np.arange(rows.size, dtype=np.uint32)),
                pl.Series("parent_row", renumbered[parent], dtype=pl.Int64),
            )
            .with_columns(
                pl.when(pl.col("parent_row") >= 0)
                .then(pl.col("parent_row"))
                .otherwise(None)
                .alias("parent_row")
            )
            .select(PREPARED_COLUMNS)
        )
        del whole
        traces = spans.select(pl.col("trace_id").unique(maintain_order=True))
        ctx = AnalysisContext(spans=spans, traces=traces)
        ctx.cache["whatif"] = WhatIf(ctx, predecessor)
        return ctx

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        scratch.let_go(self.folder)


def _write_kept(frame: pl.DataFrame, path: Path) -> None:
    """``frame`` as a Prepared file, uncompressed (as the split's partition files: a reader maps
    it rather than decompressing it), its strings in Arrow's plain layout (offsets and bytes), not
    as string views; read back they are the same values. Each file is written once and read by
    both pricing passes. Measured on a partition of 167k spans (one polars thread, CPU): written
    in 7 ms and read with half its traces gathered in 8 ms, 16.8 MB; lz4-compressed, as before,
    24 ms and 18 ms, 6.5 MB; string views, uncompressed, 10 ms and 13 ms, 19.4 MB. At 1M spans in 6
    partitions: ~0.2 s less CPU over the run (6 writes, 12 reads), 100 MB of temporary files
    instead of 39 (beside the split's, uncompressed too: 143 MB for its 4 files)."""
    frame.write_ipc(path, compression="uncompressed", compat_level=pl.CompatLevel.oldest())


# DuckDB's buffer pool of a read-only open (``open_for_reading``): a task's read of its partition
# (``scan_partition``) and the read of the exemplars' traces by id both scan every stored trace id,
# and DuckDB kept what they read cached up to the store's default limit (512MB), a cache that grew
# with the store and that no later read of the same open uses. At 10M spans a partition's read
# peaked at 566 MiB (370 under this limit, and no slower: every worker's first partitions are read
# so), a read of 60 traces by id at 480 MiB (237), and the deciding process of ``analyze --db`` at
# 789 MiB beside the pricing (618). The rows read are Arrow's, outside the pool (a read of 2.5M
# spans under a 64MB limit took it, faster than under 512MB).
READ_MEMORY_LIMIT = "128MB"


def open_for_reading(location: str) -> Any:
    """The store a ``--db`` value names, opened for reading by one partition task: a DuckDB file
    read-only (so several processes read it at once), a ClickHouse server or chdb directory as
    ``hourglass.collector.store.open_store`` opens it."""
    from hourglass.collector.backends import open_store
    from hourglass.collector.store import local_path

    if local_path(location) == location and location != ":memory:":
        from hourglass.collector.duckdb_store import DuckDBSpanStore

        return DuckDBSpanStore(location, read_only=True, threads=1, memory_limit=READ_MEMORY_LIMIT)
    return open_store(location)


@dataclass
class PartResult:
    """What one partition's extraction returns: every split detector's rows, the partition's
    trace summaries (``AnalysisContext.traces``) and its span count."""

    part: int
    rows: dict[str, Rows]
    traces: pl.DataFrame
    spans: int
    services: pl.DataFrame  # (service, scope_name, trace_id): each pair once, with one of its traces
    paths: PathRows | None = None  # the endpoints' critical-path rows (hourglass.analysis.endpoint_path)
    # with a spill: ``rows`` and ``paths`` written to its folder instead (``Spill.keep``; ``rows``
    # empty, ``paths`` None), and whether the path rows were there to write
    kept: bool = False
    kept_paths: bool = False


PATHS_KIND = "_paths"  # the kind under which a partition's critical-path summary is kept (Spill.keep)


def extract_part(
    source: Source,
    part: int,
    parts: int,
    spill: Spill | None = None,
    prepared: Prepared | None = None,
    kinds: frozenset[str] | None = None,
) -> PartResult:
    """One task of the first pass: read a partition, repair it and extract it (:func:`part_result`);
    with ``prepared``, its repaired spans kept there for the pricing (:class:`Prepared`); with
    ``kinds``, those detectors' rows only, and no critical-path rows (findings asked for alone)."""
    if spill is not None and not os.path.isdir(spill.folder):
        # (a Dask worker that does not see this machine's files after all: every row returned, for
        # the deciding process to keep: ``keep_here``)
        spill = None
    table = source.load(part, parts)
    memlog.note(f"extract {part + 1}/{parts} read")
    ctx = AnalysisContext.from_table(table)
    del table
    memlog.note(f"extract {part + 1}/{parts} context")
    if prepared is not None:
        prepared.write(part, ctx)
    result = part_result(part, ctx, spill, kinds)
    del ctx
    # the spans' Arrow buffers, kept by Arrow's allocator for reuse (~80 MiB a partition of 166k
    # spans), back to the system: a worker kept through the decision (``Plan.keep``) holds less
    pa.default_memory_pool().release_unused()
    memlog.note(f"extract {part + 1}/{parts} rows")
    return result


def spill_here(spill: Spill, result: PartResult) -> PartResult:
    """``result`` with its spillable tables written to ``spill``'s buckets by this process (the
    rows of a task that could not reach the spill folder: a Dask worker on another machine); the
    same files and the same rows as if the task had spilled them itself."""
    return replace(result, rows=spill.write(result.part, result.rows))


def keep_here(spill: Spill, result: PartResult) -> PartResult:
    """``result``, of a task that was given ``spill`` but did not see its folder (a Dask worker
    that joined after the workers were found to see this machine's files), kept in ``spill`` by
    this process as :func:`part_result` keeps it in a task: the same files, so the decision reads
    every partition alike."""
    if result.kept:
        return result
    rows = spill.write(result.part, result.rows)
    spill.keep(result.part, rows)
    if result.paths is not None:
        spill.keep(result.part, {PATHS_KIND: dict(vars(summarize_path_rows(result.paths)))})
    return replace(result, rows={}, paths=None, kept=True, kept_paths=result.paths is not None)


def part_result(
    part: int, ctx: AnalysisContext, spill: Spill | None = None, kinds: frozenset[str] | None = None
) -> PartResult:
    """Every detector's rows of ``ctx``'s traces (with ``spill``, the tables that grow with spans
    written to its buckets instead) and the endpoints' critical-path rows, each table compacted
    (:func:`compact`) so that it holds none of the spans' memory; with ``spill``, every table
    written to its folder instead (:meth:`Spill.keep`) and none returned. ``kinds``: those
    detectors' rows only, and no critical-path rows."""
    services = ctx.spans.group_by("service", "scope_name").agg(pl.col("trace_id").min())
    rows = extract(ctx, kinds)
    paths = path_rows_or_none(ctx) if kinds is None else None
    if spill is not None:  # every row to disk: the deciding process reads one kind at a time
        # not compacted first: polars writes a table's own values, not the spans' buffers its
        # strings share (a compaction was ~8 % of a partition's extraction at 1M spans)
        rows = spill.write(part, rows)
        spill.keep(part, rows)
        if paths is not None:  # aggregated per endpoint here: a tenth of the rows, decided the same
            spill.keep(part, {PATHS_KIND: dict(vars(summarize_path_rows(paths)))})
        result = PartResult(part, {}, compact(ctx.traces), ctx.spans.height, compact(services), None, True)
        result.kept_paths = paths is not None
        return result
    rows = {kind: {name: compact(frame) for name, frame in tables.items()} for kind, tables in rows.items()}
    if paths is not None:
        paths = PathRows(
            compact(paths.traces), compact(paths.operations), compact(paths.paths), compact(paths.nodes)
        )
    return PartResult(part, rows, compact(ctx.traces), ctx.spans.height, compact(services), paths)


class KeptRows(Mapping[str, Rows]):
    """The partitions' rows that :meth:`Spill.keep` wrote, one kind's tables read and combined
    (:func:`combine`) when that kind is looked up, so a decision over ``.items()`` holds one kind
    at a time. A kind whose extraction returned no table has no rows (``{}``), as in :func:`combine`."""

    def __init__(self, spill: Spill, kinds: Iterable[str]) -> None:
        self.spill = spill
        self.kinds = list(kinds)

    def __getitem__(self, kind: str) -> Rows:
        if kind not in self.kinds:
            raise KeyError(kind)
        tables = self.spill.kept(kind)
        return {name: _concat(frames) for name, frames in tables.items() if frames}

    def __iter__(self) -> Iterator[str]:
        return iter(self.kinds)

    def __len__(self) -> int:
        return len(self.kinds)


def kept_paths(spill: Spill) -> PathSummary | None:
    """Every partition's kept critical-path summary (``summarize_path_rows`` of its rows) as one
    (:func:`combine_path_summaries`), which ``report_critical_paths_from_summary`` decides as
    ``report_critical_paths`` decides the rows: the deciding process reads and merges a few
    rows per endpoint and partition instead of a row per trace and per trace's operation
    (measured at 1M spans in 6 partitions: 0.57 s of the deciding process before its decision)."""
    tables = spill.kept(PATHS_KIND)
    if not tables:
        return None
    names = [f.name for f in fields(PathSummary)]
    per_part = zip(*(tables[name] for name in names), strict=True)
    return combine_path_summaries(PathSummary(*frames) for frames in per_part)


def path_rows_or_none(ctx: AnalysisContext) -> PathRows | None:
    """The critical-path rows, or None when they fail (a picture must never cost the report)."""
    try:
        return path_rows(ctx)
    except Exception:
        log.exception("critical-path rows of a partition failed")
        return None


# trace ids (always ``()``: :func:`price` neither computes nor ships them), saved ns, root ns
PricedImpact = tuple[Sequence[str], np.ndarray, np.ndarray]


def impact_numbers(priced: PricedImpact | None) -> PricedImpact | None:
    """A partition's pricing of a finding as the round keeps it: its per-trace savings and root
    durations (what :func:`merge_impacts` combines: the ranking and the report read their sums
    and percentiles), without trace ids, which nothing reads after the pricing (serve's
    incremental rounds keep every stored batch's: at 12M stored spans 330k strings, ~30 MiB).
    :func:`price` gives none; an older state's stored pricing may hold them."""
    return None if priced is None else ((), priced[1], priced[2])


@dataclass
class Priced:
    """What the second pass returns for one partition: the what-if saving of each finding in its
    traces, and the durations of the calls each finding names (for the designs' call statistics)."""

    impacts: dict[str, PricedImpact]
    calls: dict[str, np.ndarray]


def price_part(
    source: Source,
    part: int,
    parts: int,
    findings: list[Finding],
    calls: bool = False,
    prepared: Prepared | None = None,
) -> Priced:
    """One task of the second pass: the what-if saving of each finding in this partition's
    traces (per-trace savings are independent of other traces, so the parts add up exactly),
    and with ``calls`` the durations of the calls each finding names here. With ``prepared``
    the traces are taken from the spans the extraction repaired (:class:`Prepared`)."""
    from hourglass.analysis.sequence import call_durations

    # Only the findings' own traces are priced and measured, and repair is per trace: the context
    # is built of those alone (about a third of the spans of the benchmark's mixed store), read
    # alone: the store filters the partition's rows by trace id.
    wanted = sorted({t for f in findings for t in f.occurrence_table.trace_id_list()})
    ctx = prepared.context(part, wanted) if prepared is not None else None
    if ctx is None:
        ctx = AnalysisContext.from_table(source.load(part, parts, trace_ids=wanted))
    memlog.note(f"price {part + 1}/{parts} context")
    # the context holds every trace of the findings' occurrences (the shares of this partition:
    # ``findings_by_partition``): none is left out, so each finding's are not looked up again
    everywhere = ctx.traces.height == len(wanted) and set(ctx.traces["trace_id"].to_list()) == set(wanted)
    try:
        durations = {f.id: call_durations(ctx, f) for f in findings} if calls else {}
        priced = Priced(price(ctx, findings, everywhere=everywhere), durations)
    finally:
        # the what-if engine the context caches (``WhatIf.of``) refers back to it: a cycle, which
        # only the cyclic collector frees, and it seldom ran in a worker between pricing tasks, so
        # a worker kept every task's context (spans, repair, engine): 1M spans in 12 partitions,
        # +11 MiB of Arrow buffers and ~19 MiB resident a task; a worker pricing 18 partitions
        # of a 5M-span store grew from 258 to 743 MiB)
        ctx.cache.clear()
    memlog.note(f"price {part + 1}/{parts} priced")
    return priced


def price(
    ctx: AnalysisContext, findings: list[Finding], *, everywhere: bool = False
) -> dict[str, PricedImpact]:
    """The what-if saving of each finding's occurrences that lie in ``ctx``'s traces: the
    per-trace savings and root durations, without the traces' ids (:data:`PricedImpact`: the
    merged :class:`Impact` has none, so a worker neither builds nor pickles a string per trace).
    ``everywhere``: every occurrence's trace is one of ``ctx``'s (the caller checked), so none is
    looked up (a look-up of every occurrence's trace among the context's, per finding, was ~a
    fifth of a pricing task at 1M spans)."""
    here = ctx.traces["trace_id"]
    out: dict[str, PricedImpact] = {}
    whatif: WhatIf | None = None
    for finding in findings:
        occurrences = finding.occurrence_table
        if not occurrences.any_interventions():
            continue
        timed = occurrences.has_interventions()
        mine = occurrences.take(np.flatnonzero(timed if everywhere else timed & occurrences.in_traces(here)))
        if not mine:
            continue
        whatif = whatif or WhatIf.of(ctx)
        impact = whatif.impact(replace(finding, occurrences=mine), trace_ids=False)
        out[finding.id] = ((), impact.saved_ns, impact.root_ns)
    return out


def findings_by_partition(
    findings: list[Finding], trace_parts: pl.DataFrame, parts: int
) -> list[list[Finding]]:
    """Per partition, every finding with the occurrences of that partition's traces only: what a
    pricing task needs, since a trace's saving and its calls' durations are of that trace alone.
    Sent whole, every task would unpickle every occurrence of the store (measured at 10M spans: a
    pricing worker of 100k spans peaking at 1.2 GiB against 0.6 GiB for its extraction)."""
    shares: list[list[Finding]] = [[] for _ in range(parts)]
    lookup = trace_parts.select(pl.col("trace_id").cast(pl.String), pl.col("part").cast(pl.Int64)).unique(
        "trace_id", keep="last", maintain_order=True
    )
    # each occurrence's partition, every finding's at once (-1: in no partition's traces, so no
    # task would price it)
    tables = [finding.occurrence_table for finding in findings]
    ends = np.cumsum([len(table) for table in tables])
    part_of = (
        pl.concat([table.trace_id_series() for table in tables] or [pl.Series([], dtype=pl.String)])
        .to_frame("trace_id")
        .join(lookup, on="trace_id", how="left", maintain_order="left")["part"]
        .fill_null(-1)
        .to_numpy()
    )
    for finding, table, end in zip(findings, tables, ends.tolist(), strict=True):
        mine = part_of[end - len(table) : end]
        for part in range(parts):
            shares[part].append(replace(finding, occurrences=table.take(np.flatnonzero(mine == part))))
    return shares


def merge_impacts(parts: Iterable[dict[str, PricedImpact]]) -> dict[str, Impact]:
    """The partitions' savings per finding as one :class:`Impact` each: the per-trace savings
    and root durations, partition after partition, without the trace ids (:func:`impact_numbers`)."""
    collected: dict[str, list[PricedImpact]] = {}
    for priced in parts:
        for finding_id, impact in priced.items():
            collected.setdefault(finding_id, []).append(impact)
    return {
        finding_id: Impact(
            trace_ids=[],
            saved_ns=np.concatenate([saved for _, saved, _ in pieces]),
            root_ns=np.concatenate([root for _, _, root in pieces]),
        )
        for finding_id, pieces in collected.items()
    }


def numbered_parts(parts: Iterable[int], total: int) -> str:
    """Partitions (numbered from 0) as the user counts them, runs of them as ranges:
    "partition 2 of 3", "partitions 1, 3-4 and 6-28 of 28"."""
    numbers = sorted({p + 1 for p in parts})
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    named = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
    return f"partition{'s' if len(numbers) > 1 else ''} {listed} of {total}"


def how_workers_died(pool: Any) -> str:
    """How the processes of a broken pool (:class:`worker_start.WorkerPool`) that died ended, for
    the user: a signal by name (SIGKILL: most often the system's out-of-memory killer), or an exit
    code. The workers the pool itself stops once it is broken (SIGTERM) are not the cause."""
    ended: list[str] = []
    killed = False
    for process in getattr(getattr(pool, "processes", None), "started", []):
        with suppress(Exception):  # (a process object that cannot say: left out)
            code = worker_start.ended_with(process)
            if code is None or code == 0 or code == -signal.SIGTERM:
                continue
            if code < 0:
                try:
                    name = signal.Signals(-code).name
                except ValueError:
                    name = f"signal {-code}"
                killed = killed or name == "SIGKILL"
                ended.append(f"worker process {process.pid} was killed by {name}")
            else:
                ended.append(f"worker process {process.pid} exited with code {code}")
    if not ended:
        return "a worker process died"
    return "; ".join(ended) + (" (out of memory, or killed)" if killed else "")


class PartitionError(RuntimeError):
    """A partition task that failed twice (the first failure is retried once)."""

    def __init__(self, phase: str, part: int, parts: int, cause: BaseException | str) -> None:
        self.part, self.parts = part, parts
        super().__init__(f"{phase} of partition {part + 1}/{parts} failed twice: {cause}")


Progress = Callable[[str, int, int], None]  # (phase, done, total)


class Stopped(RuntimeError):
    """A map of a :class:`ProcessExecutor` that :meth:`ProcessExecutor.stop` ended: the run it was
    part of failed or was interrupted in another thread."""


class SerialExecutor:
    """Partitions one after another in this process: bounded memory, one core for the detectors."""

    workers = 1

    def map(
        self, phase: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]], progress: Progress | None
    ) -> list[Any]:
        results = []
        for done, args in enumerate(calls):
            try:
                results.append(fn(*args))
            except MemoryError:
                raise
            except Exception as first:
                log.warning(
                    "%s of partition %d/%d failed (%s); retrying once", phase, args[1] + 1, args[2], first
                )
                try:
                    results.append(fn(*args))
                except Exception as exc:
                    raise PartitionError(phase, args[1], args[2], exc) from exc
            if progress:
                progress(phase, done + 1, len(calls))
        return results

    def close(self) -> None:
        pass

    def idle(self) -> None:
        pass


STOP_CHECK_S = 0.25  # how often a map of a ProcessExecutor looks whether it was stopped


class ProcessExecutor:
    """Partitions in ``workers`` worker processes of this machine (spawned, so no thread state of
    this process is inherited). A task that raises, or whose worker dies, is retried once."""

    def __init__(
        self,
        workers: int,
        *,
        warm: bool = True,
        keep: bool = False,
        started: tuple[worker_start.WorkerPool, list[Future[None]]] | None = None,
        allocator: str = "",
    ) -> None:
        """``started``: a pool of ``workers`` processes already starting (``worker_start.started``:
        the command line starts them before it imports the analysis), used as this executor's.
        ``allocator``: the allocator options of the workers it starts (``worker_start.start``:
        ``SHORT_LIVED_ALLOCATOR`` for ``analyze``'s; "": polars' own)."""
        self.workers = max(1, workers)
        self.allocator = allocator
        self.warm_when_idle = warm  # False: idle() stops the workers only (the memory plan's choice)
        self.keep_when_idle = keep  # True: idle() keeps the workers as they are (the plan's choice)
        self._pool: worker_start.WorkerPool | None = None
        self._starting: list[Future[None]] = []  # idle()'s start-up tasks
        if started is not None:
            self._pool, self._starting = started
        # the workers of pools closed without waiting (a task failed, the run was interrupted) not
        # yet seen to exit: settle() waits for them
        self._abandoned: list[multiprocessing.process.BaseProcess] = []
        self._stop = threading.Event()  # stop(): the maps of other threads end (Stopped)

    def _ensure(self) -> worker_start.WorkerPool:
        if any(f.done() and not f.cancelled() and f.exception() is not None for f in self._starting):
            self.close(wait=False)  # a worker died starting up: its pool is broken, start anew
        self._starting = []
        if self._pool is None:
            self._pool = worker_start.pool(self.workers, self.allocator)
        return self._pool

    def map(
        self,
        phase: str,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        progress: Progress | None,
        more: tuple[Future[Any], Callable[[Any], list[tuple[Any, ...]]], int] | None = None,
    ) -> list[Any]:
        """``fn(*call)`` for each of ``calls`` in the workers, results in their order. ``more``:
        (a future, what makes further calls of its result, how many): those calls are submitted
        as soon as the future is done, behind the ones still queued or running, and their results
        follow; a worker that finishes its call first goes on with them instead of waiting for
        the others' (the extraction's first round, read from the store while the split is written:
        :func:`run_extraction`)."""
        try:
            return self._map(phase, fn, calls, progress, more)
        except Stopped:  # (the thread that stopped it closes the pool)
            raise
        except BaseException:  # failed, or interrupted (Ctrl-C, SIGTERM): the running tasks are
            self.close(wait=False)  # stopped, not waited for (their results are not wanted)
            raise

    def stop(self) -> None:
        """Ends the maps running in other threads (a pass priced beside the run's main thread)
        within a fraction of a second, with :class:`Stopped`, before this thread closes the pool
        (``close``): a map waits on its pool's futures, which a pool shut down from another thread
        never resolves, and would otherwise start a new pool to retry them."""
        self._stop.set()

    def _map(
        self,
        phase: str,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        progress: Progress | None,
        more: tuple[Future[Any], Callable[[Any], list[tuple[Any, ...]]], int] | None = None,
    ) -> list[Any]:
        calls = list(calls)
        total = len(calls) + (more[2] if more is not None else 0)
        results: list[Any] = [None] * len(calls)
        failures = [0] * len(calls)
        pending = set(range(len(calls)))
        finished = 0
        # The calls a worker's death may have been running, when it could be more than one: run
        # one at a time, so the one that kills its worker again is the one named. A pool's
        # workers take its calls in the order they were submitted, the first ``workers + 1`` of
        # them at once (a call queue of one more than the workers), so a call later than those
        # had not started. A call suspected once that dies alone has died twice.
        alone: list[int] = []
        suspected: set[int] = set()
        while pending or more is not None:
            if self._stop.is_set():
                raise Stopped(f"{phase} stopped: the run ended")
            pool = self._ensure()
            order = [alone[0]] if alone else sorted(pending)  # (submitted, in this order)
            futures = {pool.submit(fn, *calls[i]): i for i in order}
            running: set[Future[Any]] = set(futures)
            broken = False
            lost: list[int] = []  # the calls a worker's death cost, to run again
            while running or more is not None:
                waited: set[Future[Any]] = running | ({more[0]} if more is not None else set())
                done, _ = wait(waited, timeout=STOP_CHECK_S, return_when=FIRST_COMPLETED)
                if self._stop.is_set():
                    raise Stopped(f"{phase} stopped: the run ended")
                if more is not None and more[0] in done:
                    extra = more[1](more[0].result())
                    more = None
                    for call in extra:
                        calls.append(call)
                        results.append(None)
                        failures.append(0)
                        pending.add(len(calls) - 1)
                        if not broken and not alone:  # (while calls run alone, they wait their turn)
                            try:
                                future = pool.submit(fn, *call)
                            except BrokenProcessPool:  # a worker died meanwhile, not yet seen in
                                broken = True  # ``done``: the call stays pending for the new pool
                                continue
                            futures[future] = len(calls) - 1
                            order.append(len(calls) - 1)
                            running.add(future)
                for future in done & running:
                    running.discard(future)
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except BrokenProcessPool:  # a worker died: charged below, once all have ended
                        broken = True
                        lost.append(i)
                        continue
                    except Exception as exc:
                        failures[i] += 1
                        if failures[i] > 1:
                            raise PartitionError(phase, calls[i][1], calls[i][2], exc) from exc
                        log.warning(
                            "%s of partition %d/%d failed (%s); retrying once",
                            phase,
                            calls[i][1] + 1,
                            calls[i][2],
                            exc,
                        )
                        continue
                    pending.discard(i)
                    if alone and alone[0] == i:
                        alone.pop(0)
                    finished += 1
                    if progress:
                        progress(phase, finished, total)
            if broken:
                if lost:
                    self._charge_death(phase, pool, calls, failures, order, lost, alone, suspected)
                self.close(wait=False)
        return results

    def _charge_death(
        self,
        phase: str,
        pool: Any,
        calls: list[tuple[Any, ...]],
        failures: list[int],
        order: list[int],
        lost: list[int],
        alone: list[int],
        suspected: set[int],
    ) -> None:
        """A worker died, costing the calls ``lost`` (``order``: the pool's calls as submitted):
        the call it ran is charged a failure when it can be told (it ran alone, or it is the only
        one of those that had started) and the run fails once one has failed twice; else those
        that had started are set to run one at a time (``alone``, ``suspected``). Said in one line
        per death."""
        how = how_workers_died(pool)
        lost_set = set(lost)
        started = [i for i in order if i in lost_set][: self.workers + 1]
        total = calls[lost[0]][2]
        if len(started) == 1:
            i = started[0]
            failures[i] += 1
            if failures[i] > 1 or i in suspected:
                raise PartitionError(phase, calls[i][1], calls[i][2], how)
            log.warning("%s: %s; %s retried once", phase, how, numbered_parts([calls[i][1]], total))
            return
        alone[:] = started
        suspected.update(started)
        log.warning(
            "%s: %s; %s retried once, one at a time (the worker was running one of them)",
            phase,
            how,
            numbered_parts([calls[i][1] for i in started], total),
        )

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        """``fn(*args)`` in a worker of the pool as it is (the workers kept through the decision:
        ``keep``), beside what this process does; None when there is no such pool (stopped, or
        its workers still starting) or it is broken."""
        if self._pool is None or not self.keep_when_idle or self._starting:
            return None
        try:
            return self._pool.submit(fn, *args)
        except (BrokenProcessPool, RuntimeError):  # (broken, or shut down)
            return None

    def warm(self) -> None:
        """Start the worker processes now (their interpreters and the analysis' imports, ~0.4 s
        of CPU each), while this process does something else (reads the store into partition
        files: :func:`split_store`), instead of before the first task."""
        if self._pool is None:
            pool = self._ensure()
            self._starting = [pool.submit(_start_worker) for _ in range(self.workers)]

    def idle(self) -> None:
        """Nothing to run for a while (this process decides): stop the workers, so the memory
        they keep from their last partition is not held beside the decision's, and start new
        ones at once: their start-up (an interpreter and the analysis' imports, ~0.4 s of CPU
        each) runs while this process decides, on the core the decision leaves idle, instead of
        before the next ``map``'s first task. (A new worker holds its imports only: the base
        cost the memory plan already counts for every worker.) With ``keep`` (the plan found
        room for the workers' peaks beside the decision) the workers are left running as they
        are: no new interpreters, and no wait for the old ones to exit."""
        if self.keep_when_idle and self._pool is not None:
            return
        self.close()
        if not self.warm_when_idle:  # their bases do not fit beside the decision: started by the next map
            return
        pool = self._ensure()
        # a process is started per task submitted while none is idle
        self._starting = [pool.submit(_start_worker) for _ in range(self.workers)]

    def close(self, wait: bool = True) -> None:
        """Stop the worker processes, waiting for them to exit, so none outlives the command.
        ``wait=False`` when a task failed or the run was interrupted and the pool is abandoned:
        its tasks still running are not waited for (seconds on a large partition) but their
        workers terminated (:func:`worker_start.terminate`)."""
        pool = self._pool
        self._stop.clear()  # (the maps it stopped have ended: the next one runs)
        if pool is None:
            return
        self._pool = None
        pool.shutdown(wait=wait, cancel_futures=True)
        if not wait:
            self._abandoned.extend(p for p in pool.processes.started if p.pid is not None)
            worker_start.terminate(self._abandoned)
            self.settle()

    def settle(self) -> None:
        """Wait for the workers of pools closed without waiting (a failed or interrupted run's)
        to exit (terminated by :meth:`close`: at once): the tasks they were running write no
        more files after this (what the run kept, removed after it, is not written again)."""
        worker_start.reap(self._abandoned)


# A task that makes a worker process start (``warm``, ``idle``): ``worker_start.start``, the
# pool's initializer, imports the modules its tasks use.
_start_worker = worker_start.ready


class ClusterError(RuntimeError):
    """The Dask scheduler cannot be reached (or ``distributed`` is not installed)."""


def _check_reachable(address: str, timeout_s: float) -> None:
    """Fail at once on a scheduler that refuses connections (Dask itself retries until its timeout)."""
    match = re.fullmatch(r"(?:tcp://)?\[?([^\]]+?)\]?:(\d+)/?", address.strip())
    if match is None:
        raise ClusterError(f"{address}: not a Dask scheduler address like tcp://HOST:8786")
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def check_scheduler(address: str, timeout_s: float = 8.0) -> None:
    """A Dask scheduler answers at ``address`` (its ``identity``: a port that accepts connections
    is not enough — a proxy or another service may), else one :class:`ClusterError` line, within
    ``timeout_s`` (``distributed``'s own connect retries for longer, then raises a traceback)."""
    import asyncio

    try:
        from distributed.core import rpc
    except ImportError:
        raise ClusterError(
            "--cluster needs the Dask 'distributed' package: pip install 'hourglass[cluster]'"
        ) from None
    _check_reachable(address, timeout_s / 2)  # refused: at once rather than after the timeout

    async def identity() -> Any:
        async with rpc(address, timeout=timeout_s / 2) as scheduler:
            return await asyncio.wait_for(scheduler.identity(), timeout_s / 2)

    try:
        info = asyncio.run(identity())
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s: "
            f"{str(exc) or 'no answer (' + type(exc).__name__ + ')'}"
        ) from None
    except Exception as exc:  # something answered that does not speak Dask's protocol
        raise ClusterError(
            f"{address} is not a Dask scheduler (its answer: {type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    if not isinstance(info, dict) or info.get("type") != "Scheduler":
        raise ClusterError(f"{address} is not a Dask scheduler (it answered {info!r:.80})")


class DaskExecutor:
    """Partitions as tasks on an existing Dask distributed cluster. Each task reads its partition
    itself (:class:`StoreSource`: a store path on storage every worker shares, or a ClickHouse
    URL), so only the small extracted rows travel; the decision runs here, on the client. A task
    that fails — it raised, or the workers running it died more often than the scheduler allows
    (``distributed.scheduler.allowed-failures``, default 3: until then Dask reschedules it itself)
    — is submitted once more, then the run fails naming the partition.

    The workers may be on other machines, so they never write a run's spill folder: an extraction
    task returns every row, and this process writes the spillable tables to their buckets as each
    partition's rows arrive (:func:`spill_here`), so it holds one partition's rows of those tables
    at a time, never the whole table."""

    def __init__(self, address: str, *, timeout_s: float = 10.0) -> None:
        try:
            from distributed import Client
        except ImportError as exc:
            raise ClusterError(
                "--cluster needs the Dask 'distributed' package: pip install 'hourglass[cluster]'"
            ) from exc
        check_scheduler(address, timeout_s * 0.8)
        try:
            self.client = Client(address, timeout=timeout_s, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s: {exc}"
            ) from None
        connected = len(self.client.scheduler_info().get("workers", {}))
        if not connected:  # (a run that would wait without a word, with no progress to show)
            log.warning(
                "the Dask cluster at %s has no workers yet: its tasks wait for one to connect", address
            )
        self.connected = connected  # the Dask workers connected at the start (the plan's line)
        self.workers = max(1, connected)
        self._run = uuid.uuid4().hex[:8]
        self._maps = 0  # each map's tasks get their own keys (a second pricing pass is other work)
        self._sees: dict[str, bool] = {}

    def sees(self, folder: str, timeout_s: float = 10.0) -> bool:
        """Whether every Dask worker connected now reads the files this process writes in
        ``folder`` (the workers run on this machine, or mount it at the same path): a file of a
        random token is written there and read back by a task pinned to each worker, within
        ``timeout_s`` (remembered per folder). Then a run's partition files and kept repaired
        spans (``split_store``, :class:`Prepared`) are made there for them, as for worker
        processes, instead of every task of every pass reading the store; a worker that joins
        later and does not see them reads the store (:meth:`SplitSource.load`,
        :meth:`Prepared.context`)."""
        if folder in self._sees:
            return self._sees[folder]
        workers = list(self.client.scheduler_info().get("workers", {}))
        token = uuid.uuid4().hex
        seen = False
        try:
            with tempfile.NamedTemporaryFile(
                "w", dir=folder, prefix="hourglass-probe-", delete=False
            ) as file:
                file.write(token)
            path = file.name
        except OSError:
            self._sees[folder] = False
            return False
        try:
            if workers:
                probes = [
                    self.client.submit(
                        _reads_token, path, token, workers=[w], allow_other_workers=False, pure=False
                    )
                    for w in workers
                ]
                deadline = time.monotonic() + timeout_s
                try:
                    seen = all(
                        p.result(timeout=max(0.0, deadline - time.monotonic())) is True for p in probes
                    )
                except Exception as exc:  # (a worker too slow to answer, or gone: not shared)
                    log.info("probing whether the Dask workers see %s failed (%s)", folder, exc)
                    seen = False
                finally:
                    self.client.cancel(probes)
        finally:
            with suppress(OSError):
                os.remove(path)
        self._sees[folder] = seen
        return seen

    def map(
        self,
        phase: str,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        progress: Progress | None,
        arrived: Callable[[int, Any], Any] | None = None,
        labels: Mapping[int, str] | None = None,
    ) -> list[Any]:
        """``fn(*args)`` for each of ``calls`` as one task each; with ``arrived``, each result is
        replaced by ``arrived(part, result)`` as it comes back (in order), so the caller need not
        hold the results together (``serve --cluster`` writes each batch's rows there).
        ``labels``: what a failed task's log line calls each part (``serve``: its batch), instead
        of "partition N/M"."""
        spills: dict[int, Spill] = {}
        kept: dict[int, Spill] = {}
        if fn is extract_part:  # (source, part, parts, spill): the spill is written here
            given = {i: args[3] for i, args in enumerate(calls) if len(args) > 3 and args[3] is not None}
            if given and all(self.sees(str(Path(s.folder).parent)) for s in given.values()):
                kept = given  # the workers write and keep the rows there themselves, as local ones do
            else:
                spills = given
                calls = [
                    (*args[:3], None, *args[4:]) if i in spills else args for i, args in enumerate(calls)
                ]
        self._maps += 1

        def submit(i: int, attempt: int) -> Any:
            key = f"hourglass-{self._run}-{self._maps}-{phase}-{calls[i][1]}-{attempt}"
            return self.client.submit(fn, *calls[i], pure=False, key=key)

        futures = [submit(i, 0) for i in range(len(calls))]
        results: list[Any] = [None] * len(calls)
        for i in range(len(calls)):  # in order: the progress counts finished prefixes
            try:
                try:
                    results[i] = futures[i].result()
                except Exception as first:  # it raised, or its workers died (KilledWorker): once more
                    if labels is not None and calls[i][1] in labels:
                        log.warning(
                            "%s %s failed on the Dask cluster (%s: %s); retrying once",
                            phase, labels[calls[i][1]], type(first).__name__, first,
                        )  # fmt: skip
                    else:
                        log.warning(
                            "%s of partition %d/%d failed on the cluster (%s: %s); retrying once",
                            phase, calls[i][1] + 1, calls[i][2], type(first).__name__, first,
                        )  # fmt: skip
                    futures[i] = submit(i, 1)
                    results[i] = futures[i].result()
            except Exception as exc:
                self.client.cancel([f for f in futures if f is not None])
                raise PartitionError(phase, calls[i][1], calls[i][2], f"{type(exc).__name__}: {exc}") from exc
            futures[i].release()  # the worker may drop its copy of the rows
            futures[i] = None
            if i in spills:
                results[i] = spill_here(spills[i], results[i])
            elif i in kept:  # (a worker that did not see the folder after all returned them)
                results[i] = keep_here(kept[i], results[i])
            if arrived is not None:
                results[i] = arrived(calls[i][1], results[i])
            if progress:
                progress(phase, i + 1, len(calls))
        return results

    def close(self) -> None:
        self.client.close()

    def idle(self) -> None:
        pass


def _reads_token(path: str, token: str) -> bool:
    """A Dask worker's probe (:meth:`DaskExecutor.sees`): whether it reads ``token`` at ``path``."""
    try:
        with open(path) as file:
            return file.read() == token
    except OSError:
        return False


Executor = SerialExecutor | ProcessExecutor | DaskExecutor


@dataclass
class Extracted:
    """The first pass over every partition: findings decided on the combined rows, the trace
    summaries and span count of the whole."""

    findings: list[Finding]
    traces: pl.DataFrame | TraceRoots  # (serve's round: compact)
    spans: int
    services: pl.DataFrame  # (service, scope_name, trace_id): each pair once, with one of its traces
    # the report's endpoint critical paths, decided on every partition's rows (empty when one failed)
    critical_paths: list[dict[str, Any]] = field(default_factory=list)
    trace_parts: pl.DataFrame | None = None  # (trace_id, part): the partition of each trace


def run_extraction(
    source: Source,
    parts: int,
    executor: Executor,
    notes: NearMissSink,
    progress: Progress | None = None,
    spill: Spill | None = None,
    *,
    decide_beside: bool = False,
    later: Future[Source | None] | None = None,
    prepared: Prepared | None = None,
    kinds: frozenset[str] | None = None,
) -> Extracted:
    """Extract every partition (in ``executor``) and decide each split detector on the combined
    rows (with ``spill``, the tables that grow with spans go through its buckets on disk: the
    executor's tasks must reach its folder; with ``decide_beside``, some kinds in a thread of
    their own beside the others: :func:`decide`). With ``later`` (the store being split into
    partition files beside this: :func:`split_store`), the first ``executor.workers`` partitions
    are read from ``source`` itself, so the workers extract while the split is written instead
    of waiting for it, and the others from the files once they are there (None: from ``source``):
    worker processes queue them as soon as the split is written, so a worker that finishes its
    first partition goes on with them without waiting for the others' first partitions (one
    core idled until the slowest of the first round was done: ~0.1 s at 1M spans on 2 workers).
    ``prepared``: each task keeps its repaired spans there for the pricing (:class:`Prepared`).
    ``kinds``: those detectors only are extracted and decided, and no critical path (the findings
    of a what-if's recommendations)."""
    memlog.note("extraction starts")
    more: tuple[Any, ...] = (prepared,) if prepared is not None else ()  # (serve's executor takes four)
    if kinds is not None:
        more = (prepared, kinds)
    calls = [(source, p, parts, spill, *more) for p in range(parts)]
    if later is None:
        results = executor.map("extracting", extract_part, calls, progress)
    else:
        first = min(parts, max(1, executor.workers))

        def rest(split: Source | None) -> list[tuple[Any, ...]]:
            return [(split or source, p, parts, spill, *more) for p in range(first, parts)]

        if isinstance(executor, ProcessExecutor):  # the rest queued as soon as the split is written
            results = executor.map(
                "extracting", extract_part, calls[:first], progress, (later, rest, parts - first)
            )
        else:
            results = executor.map("extracting", extract_part, calls[:first], _offset(progress, 0, parts))
            if first < parts:
                results += executor.map(
                    "extracting", extract_part, rest(later.result()), _offset(progress, first, parts)
                )
    # the workers are done: stopped now, so the memory they keep from their last partition is not
    # held beside the combined rows and the decision
    executor.idle()
    # a kind decided beside the others in a worker kept idle through the decision, which reads
    # its kept rows itself (not a thread of this process): started before the rows are combined
    elsewhere = (
        Elsewhere(executor, spill)
        if spill is not None
        and results
        and all(r.kept for r in results)
        and isinstance(executor, ProcessExecutor)
        else None
    )
    chosen = [k for k in PARTS if kinds is None or k in kinds]
    if elsewhere is not None and decide_beside and len(chosen) > 1:  # (as ``decide`` takes them)
        elsewhere.start_early(k for k in chosen if k in DECIDE_BESIDE)
    if progress:
        progress("combining the partitions' rows", 0, 0)
    trace_parts = pl.concat(  # by task: the n-th result is partition n of this run
        [r.traces.select("trace_id", part=pl.lit(n, pl.UInt32)) for n, r in enumerate(results)],
        how="vertical_relaxed",
    )
    traces = pl.concat([r.traces for r in results], how="vertical_relaxed").sort("trace_id")
    services = pl.concat([r.services for r in results], how="vertical_relaxed")
    services = (
        services.group_by("service", "scope_name").agg(pl.col("trace_id").min()).sort("service", "scope_name")
    )
    spans = sum(r.spans for r in results)
    memlog.note("extraction results received")
    rows: Mapping[str, Rows]
    critical_paths: list[dict[str, Any]] = []
    # decided now, so that the decision below holds the few icicles and not every trace's path rows
    if spill is not None and results and all(r.kept for r in results):
        rows = KeptRows(spill, chosen)
        summary = kept_paths(spill) if all(r.kept_paths for r in results) else None
        if summary is not None:
            critical_paths = report_critical_paths_from_summary(summary)
        del summary
    else:
        rows = combine(r.rows for r in results)
        # every partition's rows or none: icicles of some traces only would be wrong, not smaller
        complete = bool(results) and all(r.paths is not None for r in results)
        paths = combine_path_rows(r.paths for r in results if r.paths is not None) if complete else None
        critical_paths = report_critical_paths(paths) if paths is not None else []
        del paths
    del results  # the partitions' own copies: the decision holds the combined rows alone
    memlog.note("rows combined, critical paths decided")
    decided = decide(rows, notes, spill, beside=decide_beside, progress=progress, elsewhere=elsewhere)
    findings = [f for kind in DETECTORS for f in decided.get(kind, [])]
    return Extracted(findings, traces, spans, services, critical_paths, trace_parts)


def _offset(progress: Progress | None, done: int, total: int) -> Progress | None:
    """``progress`` for a map over the partitions from ``done`` on, counted among ``total``."""
    if progress is None:
        return None
    return lambda phase, finished, _: progress(phase, done + finished, total)


def run_pricing(
    source: Source,
    parts: int,
    executor: Executor,
    findings: list[Finding],
    progress: Progress | None = None,
    *,
    calls: bool = False,
    trace_parts: pl.DataFrame | None = None,
    prepared: Prepared | None = None,
) -> tuple[dict[str, Impact], dict[str, np.ndarray]]:
    """The second pass: each finding's what-if saving, partition by partition; with ``calls``
    also the durations of the calls each finding names, over every partition. With
    ``trace_parts`` (:attr:`Extracted.trace_parts`) each task receives the occurrences of its own
    traces only (:func:`findings_by_partition`). ``prepared``: the spans the extraction repaired,
    which the tasks price from instead of reading and repairing their partitions again
    (:class:`Prepared`)."""
    if not findings or (not calls and not any(f.occurrence_table.any_interventions() for f in findings)):
        return {}, {}
    # an executor of its own (serve's incremental rounds) receives every finding and groups them itself
    shares = None
    if trace_parts is not None and isinstance(executor, SerialExecutor | ProcessExecutor | DaskExecutor):
        shares = findings_by_partition(findings, trace_parts, parts)
    # a partition without any of the findings' traces is not read at all
    more = (prepared,) if prepared is not None else ()
    tasks = [
        (source, p, parts, shares[p] if shares else findings, calls, *more)
        for p in range(parts)
        if not shares or shares[p]
    ]
    del shares
    results = executor.map("pricing", price_part, tasks, progress)
    memlog.note("pricing results received")
    durations: dict[str, np.ndarray] = {}
    if calls:
        for f in findings:
            pieces = [r.calls[f.id] for r in results if f.id in r.calls]
            durations[f.id] = np.concatenate(pieces) if pieces else np.zeros(0)
    impacts = merge_impacts(r.impacts for r in results)
    del results
    memlog.note("pricing results combined")
    return impacts, durations
