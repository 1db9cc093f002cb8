"""Incremental analysis for ``serve``: settled traces are extracted once, the report is a decision
over the stored rows.

A trace has *settled* when none of its spans arrived (``ingested_ns``) for the settle time. Each
round (:meth:`IncrementalAnalysis.round`):

1. asks the span store for the traces with a span ingested since the last round's cutoff (minus
   a margin): new settled traces are grouped into *batches* of whole traces (same time bucket of
   their latest start, at most ``batch_spans`` spans); a settled trace already in a batch whose
   span count or last arrival changed (a late span) makes its batch *dirty*;
2. drops the traces that retention removed (their batches are re-extracted from what is left);
3. runs :func:`hourglass.analysis.pipeline.analyze_partitioned` with one partition per batch,
   through :class:`MemoExecutor`: a batch's extraction (``partitions.extract_part``) is computed
   once and kept on disk only, in a folder beside the sidecar DuckDB file (so a restart resumes
   from it), and its pricing (what-if savings and call durations of the findings' occurrences in
   the batch, ``partitions.price_part``) is cached there per finding and per exact set of
   occurrences. A round therefore reads only the spans of new or dirty batches for their
   extraction, then, in the batches whose pricing changed, the traces of the findings priced
   again alone (by id: a finding's pricing depends on its own traces only), never the whole store. With a Dask cluster (``serve --cluster``) both run as tasks on it, the
   spans read here and sent with each task (:mod:`hourglass.analysis.batch_tasks`).

Memory does not grow with the store's rows (issue 11: serve under sustained ingest): nothing of
a batch stays in memory between rounds. The decision (:meth:`IncrementalAnalysis.extraction`)
reads the stored rows one detector kind at a time (the combined rows of one kind, decided, then
dropped), and the resource rows that grow with spans (``hourglass.analysis.spill``: the
lock-convoy rule's ``candidates``) are written once per batch to Parquet buckets of whole
resource keys and decided bucket by bucket, as the CLI's partitioned runs do; each bucket keeps
the convoy sweep's states of the last round (``hourglass.analysis.detectors._sweep.BucketSweep``),
so a round sweeps a resource key's rows from where new batches' rows start, not from its first
row. What the round still holds whole is what the report is made of: the trace summaries (a
trace's id and root duration) and the endpoints' critical-path summaries (per endpoint, the values
its percentiles and counts are taken over: ``endpoint_path.PathSummary``, not a row per trace).
Runs of ``SEGMENT_BATCHES`` consecutive stored batches are also kept combined (a *segment*), so a
round reads a file per segment and kind rather than one per batch.

The report is the same as ``analyze_partitioned`` over the same traces (and so as the at-once
analysis: ``tests/test_partitioned_analysis.py``), the endpoints' critical paths included: each
batch keeps its critical-path summary beside its detector rows.

A ``since`` window is the decision over the batches inside the window, plus the in-window traces
of batches that straddle its edge, extracted on the fly (not stored).

A round's decision still reads every row of its window, so its time and peak grow with the
window's spans. serve caps them (``HOURGLASS_REPORT_MAX_SPANS``): a window of more spans is cut
to its newest whole batches (:meth:`IncrementalAnalysis.units`), the whole retention's in steps
so that the rounds between two cuts resume what they keep from the last round.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis import memlog, partitions, scratch
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import DETECTORS, PARTS, ROWS_FORMAT
from hourglass.analysis.detectors._common import NearMissSink, Rows
from hourglass.analysis.endpoint_path import (
    PathRows,
    PathSummary,
    SpilledPathSummary,
    combine_path_summaries,
    path_counts,
    summarize_path_rows,
    write_path_values,
)
from hourglass.analysis.model import Finding, Occurrence, Occurrences, TraceRoots
from hourglass.analysis.spill import SPILLABLE, BucketFiles, Buckets, Spill, write_whole
from hourglass.collector.duckdb_store import quiet

if TYPE_CHECKING:
    from hourglass.analysis.batch_tasks import Cluster

log = logging.getLogger(__name__)

BUCKET_NS = 3600 * 10**9  # traces are batched by the hour of their latest span start
# a cut of the whole retention's report to HOURGLASS_REPORT_MAX_SPANS keeps this share of it: the
# window then grows with new batches until the next cut (``IncrementalAnalysis._newest``)
CUT_KEEPS = 0.75
BATCH_SPANS = 100_000  # spans per batch at most (a batch is one extraction in the worker)
# spans priced in one context at most (``MemoExecutor._priced_in_pieces``): a round's pricing
# reads the traces of its findings in several batches at once, up to ``BATCH_SPANS`` spans
PRICING_SPANS = 20_000
# New spans extracted per round at most (the rest in the next rounds): a report that keeps
# refreshing after a restart with a large backlog. Not a memory bound (a round holds one batch at a
# time): under sustained ingest a round must take in what arrived during the one before, or the
# backlog grows (20,000 spans/s and 30 s rounds: 600k spans a round).
MAX_ROUND_SPANS = 1_500_000
# serve --cluster: batches read and submitted to the cluster at a time (their spans travel in the
# tasks and are held here until those tasks are done; the workers compute them together)
CLUSTER_BATCHES_IN_FLIGHT = 3
SIDECAR_SUFFIX = ".analysis.duckdb"
# the columns of the trace summaries (``AnalysisContext.traces``) a round reads: pipeline.score
# reads the root duration of each finding's traces, the report counts them
TRACE_COLUMNS = ("trace_id", "root_duration_ns")
# stored batches whose rows (each kind's, and their meta) are also kept combined in one
# *segment*, so a round reads a file per segment instead of one per batch: with small batches (a
# round's arrivals under sustained ingest) the per-frame cost of reading thousands of small
# pickles, not their bytes, was the cost. One level, so a dirty batch (a late span, retention)
# costs the re-reading of at most this many batches' files to build its segment again.
SEGMENT_BATCHES = 16
# The spilled tables also kept combined per segment (``segments/s.../spill/<kind>.<table>/b<bucket>
# .parquet``: its members' files of that bucket, one after another), read instead of a file per
# batch and bucket: missing_timeout's calls and batchable_calls' span ids are read whole (of the
# judged keys) every round, and the per-file cost of ~1,600 small Parquet files (7M stored spans,
# 116 batches) was most of missing_timeout's decision (0.24 s of 0.31; 0.04 s from the segments'
# files). Not lock_contention's: its sweep keeps states per batch file (``_sweep.BucketSweep``) and
# reads only the files it has not folded yet.
COMBINED_SPILL = ("missing_timeout", "batchable_calls")
# The stored rows' holding (``partitions.held``), kept in the sidecar's meta as ``rows_held``: rows
# stored without the mark (main before it, 4655ec1) or with an older one are rewritten held on start
ROWS_HELD = 1
SPILL_BUCKETS = 16  # buckets of whole resource keys of the stored resource rows (fixed per sidecar)
PATHS_PREFIX = "hourglass-paths-"  # a round's critical-path summaries' values (SpilledPathSummary)
SIDECAR_MEMORY_LIMIT = "256MB"  # the sidecar connection's buffer pool (DuckDB's default: 80 % of RAM)
# Between rounds the sidecar's buffer pool is emptied of the table blocks the round read (the
# traces table: ~30 MiB at 12M stored spans, growing with the store) by lowering its limit to this
# for a moment (``IncrementalAnalysis.release_memory``)
SIDECAR_IDLE_LIMIT = "1MB"

# (trace ids, first ingested_ns, last ingested_ns, since_ns) -> the spans of those whole traces
ReadBatch = Callable[[list[str], int | None, int | None], pa.Table]
ReadTraces = Callable[[list[str]], pa.Table]
Arrivals = Callable[[int], pa.Table]
# (since ns, ascending splits) -> the rows ingested since, grouped by trace and part
# (``DuckDBSpanStore.recent_arrivals``)
RecentArrivals = Callable[[int, list[int]], pa.Table]
# (trace ids, from ns, to ns) -> those traces' rows ingested in [from, to), grouped by trace
# (``DuckDBSpanStore.arrivals_between``)
ArrivalsBetween = Callable[[list[str], int, int], pa.Table]
# rows -> ascending ingest-time bounds splitting the store's rows into ranges of about that many
# (``DuckDBSpanStore.arrival_bounds``); with it, ``RecentArrivals`` takes a third argument: the
# range's end (exclusive)
ArrivalBounds = Callable[[int], list[int]]
ArrivalReads = tuple[RecentArrivals, ArrivalsBetween] | tuple[RecentArrivals, ArrivalsBetween, ArrivalBounds]
# the tally rebuilt (``IncrementalAnalysis._arrivals``) from ingest ranges of about this many rows
# each: one range's per-trace groups held at a time, here and in the store's query (at 12M stored
# spans one read of every row held ~160 MiB in the server and ~120 MiB here)
REBUILD_RANGE_ROWS = 1_000_000
# what a rebuild's ranges committed so far (meta 'tally_ranges_<key>'): the ingest time they
# reached and the store's marks (epoch, removals, retention) of their first read
_REACHED = ("upto", "epoch", "removals", "retention")
# the upsert of a view's rows (``{source}``: ``FROM ... WHERE ...``) into the tally
_INTO_TALLY = """
    INSERT INTO tally SELECT trace_id, spans, first_ingested_ns, last_ingested_ns,
                             last_start_ns, last_end_ns {source}
    ON CONFLICT (trace_id) DO UPDATE SET spans = tally.spans + excluded.spans,
        first_ingested_ns = least(tally.first_ingested_ns, excluded.first_ingested_ns),
        last_ingested_ns = greatest(tally.last_ingested_ns, excluded.last_ingested_ns),
        last_start_ns = greatest(tally.last_start_ns, excluded.last_start_ns),
        last_end_ns = greatest(tally.last_end_ns, excluded.last_end_ns)
"""


class StoredTraceIds(Sequence[str]):
    """A stored batch's trace ids (sorted), read from the sidecar's ``traces`` table each time
    they are iterated or indexed, not held: a worker that kept every batch's ids as Python
    strings held ~150 MiB more at 600k stored traces, growing with the store, and a round only
    needs the ids of the batches it reads (their count is known)."""

    __slots__ = ("_count", "_db", "batch")

    def __init__(self, db: duckdb.DuckDBPyConnection, batch: int, count: int) -> None:
        self._db, self.batch, self._count = db, batch, count

    def _load(self) -> list[str]:
        rows = self._db.execute("SELECT trace_id FROM traces WHERE batch = ? ORDER BY trace_id", [self.batch])
        return [r[0] for r in rows.fetchall()]

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __getitem__(self, index: Any) -> Any:
        return self._load()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StoredTraceIds) and (self._db, self.batch) == (other._db, other.batch):
            return self._count == other._count
        return isinstance(other, Sequence) and list(self) == list(other)

    # equal to a list (or tuple) of the same ids, so not hashable, like a list: a hash of its own
    # differed from the tuple's it equals, and one of the ids read the sidecar at every hash
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"StoredTraceIds(batch={self.batch}, {self._count} traces)"


@dataclass
class Batch:
    """Whole traces extracted together; ``first``/``last`` bound their spans' ``ingested_ns``;
    ``trace_ids`` read from the sidecar when asked (:class:`StoredTraceIds`)."""

    id: int
    trace_ids: Sequence[str]
    first: int
    last: int
    spans: int = 0  # its traces' span rows as stored (copies not yet compacted count)
    newest_start_ns: int = 0  # the latest ``last_start_ns`` of its traces
    oldest_start_ns: int = 0  # the earliest ``last_start_ns`` of its traces


@dataclass(frozen=True)
class Unit:
    """One partition of a round: a stored batch, or in-window traces extracted on the fly."""

    batch: int | None
    trace_ids: Sequence[str]  # a stored batch's: StoredTraceIds (read when asked)
    first: int | None
    last: int | None


@dataclass(frozen=True)
class BatchSource:
    """``partitions.Source`` over the units of one round: partition ``p`` is unit ``p``, read
    from the span store through ``read`` (in ``serve``: a request to the server process)."""

    units: tuple[Unit, ...]
    read: ReadBatch

    def load(self, part: int, parts: int) -> pa.Table:
        unit = self.units[part]
        return self.read(list(unit.trace_ids), unit.first, unit.last)


@dataclass(frozen=True)
class BatchBuckets(Buckets):
    """The spilled rows of one table for the units of one round: in each bucket, the file of
    every stored batch of the round (in the units' order), then those of the units extracted on
    the fly (``extra``, a folder of the same layout) — the decision reads what the CLI's spilled
    run over the same traces would."""

    batches: tuple[int, ...] = ()
    extra: Path | None = None
    keep_state: bool = False  # the decision's derived state kept per bucket (every stored batch, none other)
    # runs of ``batches`` (a segment's members, in order) -> the folder of their files combined,
    # one per bucket (``IncrementalAnalysis._spill_segment``), read instead of the members' files
    combined: tuple[tuple[tuple[int, ...], Path], ...] = ()

    def _sources(self) -> list[int | Path]:
        """``batches`` in order, each run of a segment with combined files as its folder."""
        starting = {members[0]: (members, folder) for members, folder in self.combined}
        out: list[int | Path] = []
        i = 0
        while i < len(self.batches):
            run = starting.get(self.batches[i])
            if run is not None and self.batches[i : i + len(run[0])] == run[0]:
                out.append(run[1])
                i += len(run[0])
            else:
                out.append(self.batches[i])
                i += 1
        return out

    def __iter__(self) -> Iterator[BucketFiles]:
        sources = self._sources()
        for bucket in range(self.count):
            name = f"b{bucket:05d}"
            present = set(os.listdir(self.folder / name)) if (self.folder / name).is_dir() else set()
            files: list[Path] = []
            for source in sources:
                if isinstance(source, Path):  # (no file: none of the segment's rows in this bucket)
                    if (combined := source / f"{name}.parquet").exists():
                        files.append(combined)
                elif (f := f"p{source:06d}.parquet") in present:
                    files.append(self.folder / name / f)
            if self.extra is not None:
                files += sorted((self.extra / name).glob("p*.parquet"))
            if files:
                state = self.folder / name / "sweep.state" if self.keep_state else None
                yield BucketFiles(tuple(files), self.key, state)


@dataclass(frozen=True)
class BatchSpill(Spill):
    """``Spill`` of the stored batches (files named by batch id), restricted to ``batches``, with
    the round's on-the-fly units spilled in ``extra`` (files named by unit)."""

    batches: tuple[int, ...] = ()
    extra: Spill | None = None
    keep_state: bool = False  # ``batches`` are every stored batch: what a decision derives is kept
    # the round's segments (runs of ``batches``) whose spilled rows are kept combined: their folders
    segments: tuple[tuple[tuple[int, ...], Path], ...] = ()

    def buckets_of(self, kind: str) -> Buckets:
        table = SPILLABLE[kind].table
        extra = self.extra._table_folder(kind, table) if self.extra is not None else None
        combined = (
            tuple((members, folder / "spill" / f"{kind}.{table}") for members, folder in self.segments)
            if kind in COMBINED_SPILL
            else ()
        )
        return BatchBuckets(
            self._table_folder(kind, table),
            self.buckets,
            SPILLABLE[kind].key,
            self.batches,
            extra,
            self.keep_state,
            combined,
        )


def _occurrence_key(finding_id: str, occurrences: Sequence[Occurrence], calls: bool) -> str:
    """What a finding's pricing in one batch depends on: its occurrences there (spans and
    interventions) and whether call durations are asked for. The occurrences' own keys when
    their detector hashed its rows in bulk (``Occurrence.key``: an array of integers hashed, for
    the polars version that made them), else the occurrences written out one by one."""
    keys, every = Occurrences.from_list(occurrences).keys()  # (a list as given by hand: once in columns)
    if not every:
        return _written_key(finding_id, occurrences, calls)
    digest = hashlib.sha1(finding_id.encode())
    digest.update(b"calls" if calls else b"-")
    digest.update(f"keys {pl.__version__}:".encode())
    digest.update(np.ascontiguousarray(keys, dtype=np.uint64).tobytes())
    return KEYED_PREFIX + digest.hexdigest()


KEYED_PREFIX = "k:"  # a pricing key made of the occurrences' keys (written-out ones have none)
_DIGEST_CHARS = 40  # a SHA-1 hex digest


def _without_among(key: str, calls: bool) -> str:
    """A stored pricing key without the hash of the batch's priced traces that keys asking for call
    durations once had appended (``among``: every finding's traces in the batch, so one finding
    appearing in or leaving a batch made every finding there stale); other keys as they are."""
    base = len(KEYED_PREFIX) + _DIGEST_CHARS if key.startswith(KEYED_PREFIX) else _DIGEST_CHARS
    return key[:base] if calls and len(key) == base + _DIGEST_CHARS else key


def _written_key(finding_id: str, occurrences: Sequence[Occurrence], calls: bool) -> str:
    """The pricing key of occurrences written out one by one (the only kind before the
    occurrences had keys: a sidecar's stored pricing may still be keyed so)."""
    digest = hashlib.sha1(finding_id.encode())
    digest.update(b"calls" if calls else b"-")
    for occ in occurrences:
        digest.update(repr((occ.trace_id, occ.span_ids, occ.interventions)).encode())
    return digest.hexdigest()


class MemoExecutor:
    """Runs a round's partition tasks, remembering each stored batch's extraction and its pricing
    per finding, so only new or dirty batches are read. Nothing of a batch's spans outlives its
    task: an extraction reads the batch, writes its rows and drops it; a pricing reads the
    findings' traces of the batch alone (by id) into their own context, as
    ``partitions.price_part`` builds it. So a round holds one batch at a time, however many it
    extracts. The stored batches' pricing is read from disk when a pricing pass starts and
    dropped when it ends.

    With a ``cluster`` (``serve --cluster``, :mod:`hourglass.analysis.batch_tasks`) the same work
    runs as Dask tasks, the spans read here and sent with each task (:meth:`_on_cluster`): a
    batch's spans for its extraction, the findings' traces of a batch alone (read by id, as
    here) for its pricing. ``CLUSTER_BATCHES_IN_FLIGHT`` batches are read and submitted at a time
    (the workers compute them together); the spans of a submission are dropped when its tasks are
    done, and each extraction that comes back is written at once
    (:meth:`IncrementalAnalysis.store_extraction`) and not kept, so a cluster round holds the spans
    of a few batches, not the round's."""

    workers = 1

    def __init__(
        self, state: IncrementalAnalysis, units: tuple[Unit, ...], cluster: Cluster | None = None
    ) -> None:
        self.state, self.units = state, units
        self.read_units = 0  # partitions extracted this round, their spans read (a figure for status)
        self.pricing: dict[int, dict[str, PricedEntry]] = {}  # stored batch -> its pricing, this round
        # stored batch -> its unit (position), and the other units' trace ids -> unit; built once
        self._unit_of: tuple[dict[int, int], dict[str, int]] | None = None
        self.cluster = cluster
        # part -> its pricing computed ahead of ``_priced`` this map (a cluster task's result, or
        # priced with other batches' stale findings on one read: ``_priced_together``)
        self._fresh: dict[int, partitions.Priced] = {}

    def map(
        self,
        phase: str,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        progress: partitions.Progress | None,
    ) -> list[Any]:
        if fn is partitions.extract_part:
            if self.cluster is not None:
                return self._extracted_on_cluster(calls)
            return [self._extracted(args) for args in calls]
        if fn is partitions.price_part:
            if not calls:
                return []
            findings, with_calls = calls[0][3], calls[0][4]
            # each unit's occurrences taken for its plan alone (kept only for what is priced again)
            grouped = self._group_rows(findings)
            plans = {
                args[1]: self._plan(args[1], _taken(grouped.pop(args[1], {})), with_calls) for args in calls
            }
            del grouped
            self._own_shares(findings, plans)
            try:
                if self.cluster is not None:
                    self._on_cluster(
                        "pricing",
                        [args for args in calls if plans[args[1]].missing],
                        lambda args: self._read_wanted(args[0], args[1], plans[args[1]].wanted),
                        lambda args: (plans[args[1]].missing, with_calls),
                        self._fresh.__setitem__,
                    )
                else:
                    self._priced_together(calls, plans, with_calls)
                return [self._priced(args, plans[args[1]], with_calls) for args in calls]
            finally:
                self._fresh.clear()
                # the batches' pricing read from disk again by a later pass (the workstreams'), not
                # held through the scoring and the report (at 12M stored spans ~45 MiB; reading it
                # again: ~0.1 s)
                self.pricing.clear()
                del plans
                # the sidecar's table blocks the pricing read (the traces' batches) let go too
                self.state.release_memory()  # with the findings grouped per batch, the batches' caches
        raise RuntimeError(f"incremental analysis: unexpected partition task {fn!r} ({phase})")

    @staticmethod
    def _own_shares(findings: list[Finding], plans: dict[int, _Pricing]) -> None:
        """The shares of the findings to price (their occurrences in one unit, taken from the
        round's parked findings: :meth:`Occurrences.take`) given their own columns, a finding at a
        time, and each finding's columns read back for them (and for the keys) let go at once: a
        round's pricing then holds its new batches' shares of the findings, not every such
        finding's occurrences over the whole store (read back as a share is first priced, they
        were held until the pricing ended: at 12M stored spans ~65 MiB under every context it
        built, growing with the store)."""
        shares: dict[str, list[Occurrences]] = {}
        for plan in plans.values():
            for share in plan.missing:
                shares.setdefault(share.id, []).append(share.occurrence_table)
        for finding in findings:
            for table in shares.pop(finding.id, ()):
                table.own()
            finding.occurrence_table.release()

    def idle(self) -> None:
        """Nothing to stop: the round's tasks run in this process (or on the cluster, per task)."""

    def _group(self, findings: list[Finding]) -> dict[int, dict[str, tuple[Finding, Occurrences]]]:
        """unit -> finding id -> (finding, its occurrences in that unit's traces)."""
        return {unit: _taken(here) for unit, here in self._group_rows(findings).items()}

    def _group_rows(self, findings: list[Finding]) -> dict[int, dict[str, tuple[Finding, _Rows]]]:
        """:meth:`_group` before the occurrences are taken: unit -> finding id -> (finding, the
        positions of its occurrences in that unit's traces, per table), taken a unit at a time
        (:func:`_taken`) rather than a copy of every finding's occurrences at once."""
        if self._unit_of is None:
            self._unit_of = self._trace_units()
        out: dict[int, dict[str, tuple[Finding, _Rows]]] = {}
        for finding in findings:
            occurrences = finding.occurrence_table
            if not occurrences:
                continue
            # each occurrence's unit looked up in bulk (a join, no Python string per trace), then
            # the occurrences split by unit in their order (a stable sort), the finding's id asked once
            units = self._units_of(occurrences.trace_id_series())
            occurrences.release()  # (a parked table's trace ids, read back: not held for the others')
            order = np.argsort(units, kind="stable")
            ordered = units[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            fid = finding.id
            for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(order)], strict=True):
                unit = int(ordered[start])
                if unit >= 0:
                    here = out.setdefault(unit, {})
                    if fid in here:  # two findings of one id: their occurrences together, as one
                        here[fid][1].append((occurrences, order[start:end]))
                    else:
                        here[fid] = (finding, [(occurrences, order[start:end])])
        return out

    def _trace_units(self) -> tuple[dict[int, int], dict[str, int]]:
        """The round's stored batches' units (their traces are looked up in the sidecar), and
        the trace ids of the other units (listed: the window's edge) and their units."""
        stored: dict[int, int] = {}
        listed: dict[str, int] = {}
        for i, unit in enumerate(self.units):
            if isinstance(unit.trace_ids, StoredTraceIds) and unit.batch is not None:
                stored[unit.batch] = i
            else:
                listed.update(dict.fromkeys(unit.trace_ids, i))
        return stored, listed

    def _units_of(self, trace_ids: pl.Series) -> np.ndarray:
        """Each trace's unit (-1: in none of the round's; the last unit listing it otherwise)."""
        if self._unit_of is None:
            self._unit_of = self._trace_units()
        stored, listed = self._unit_of
        out = np.full(len(trace_ids), -1, dtype=np.int64)
        if stored:
            batches = self.state.batches_of(trace_ids)
            known = batches >= 0
            lookup = np.full(int(batches.max(initial=0)) + 1, -1, dtype=np.int64)
            for batch, unit in stored.items():
                if batch < len(lookup):
                    lookup[batch] = unit
            out[known] = lookup[batches[known]]
        if listed:
            other = np.fromiter(
                (listed.get(t, -1) for t in trace_ids.to_list()), dtype=np.int64, count=len(trace_ids)
            )
            out = np.maximum(out, other)
        return out

    def _retrying(self, what: str, part: int, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except MemoryError:
            raise
        except Exception as first:
            log.warning("%s of batch partition %d failed (%s); retrying once", what, part, first)
            try:
                return fn()
            except Exception as exc:
                raise partitions.PartitionError(what, part, len(self.units), exc) from exc

    def _read(self, source: Any, part: int) -> pa.Table:
        """A unit's spans, for its extraction."""
        self.read_units += 1
        return self._retrying("reading", part, functools.partial(source.load, part, len(self.units)))

    def _read_wanted(self, source: Any, part: int, wanted: frozenset[str]) -> pa.Table:
        """The spans of a unit's ``wanted`` traces alone, read by id (repair is per trace), as
        ``partitions.price_part`` prices them: a few traces of the batch, not the batch."""
        unit = self.units[part]
        return self._retrying("reading", part, lambda: source.read(sorted(wanted), unit.first, unit.last))

    def _kept(self, part: int, result: partitions.PartResult) -> partitions.PartResult | None:
        """A unit's extraction as the round takes it: a batch's is stored at once and not
        returned (None: its rows are on disk), so a round's new batches are not held together;
        a unit extracted on the fly (not a stored batch) is returned."""
        batch = self.units[part].batch
        if batch is None:
            return result
        self.state.store_extraction(batch, result)
        return None

    def _extracted(self, args: tuple[Any, ...]) -> partitions.PartResult | None:
        """One unit's extraction here, read from the store (:meth:`_kept`)."""
        source, part = args[0], args[1]  # (source, part, parts[, spill]): the state spills its batches
        table = self._read(source, part)
        # compacted: the rows are written (and pickled) without their spans' buffers
        result = self._retrying(
            "extracting", part, lambda: partitions.part_result(part, AnalysisContext.from_table(table))
        )
        return self._kept(part, result)

    def _extracted_on_cluster(self, calls: list[tuple[Any, ...]]) -> list[partitions.PartResult | None]:
        """The units' extractions as Dask tasks, each kept (:meth:`_kept`) as it comes back."""
        out: dict[int, partitions.PartResult | None] = {}
        self._on_cluster(
            "extracting",
            calls,
            lambda args: self._read(args[0], args[1]),
            lambda args: (),
            lambda part, result: out.__setitem__(part, self._kept(part, result)),
        )
        return [out[args[1]] for args in calls]

    def _on_cluster(
        self,
        phase: str,
        todo: list[tuple[Any, ...]],
        read: Callable[[tuple[Any, ...]], pa.Table],
        extra: Callable[[tuple[Any, ...]], tuple[Any, ...]],
        arrived: Callable[[int, Any], None],
    ) -> None:
        """The ``todo`` partition tasks of ``phase`` as Dask tasks (``batch_tasks.extract_table``
        or ``price_table`` on the spans ``read`` returns, with ``extra``'s arguments),
        ``CLUSTER_BATCHES_IN_FLIGHT`` at a time, their spans read here as they are submitted and
        dropped once that submission's tasks are done; ``arrived(part, result)`` as each result
        comes back (in order)."""
        from hourglass.analysis import batch_tasks

        assert self.cluster is not None
        fn = batch_tasks.extract_table if phase == "extracting" else batch_tasks.price_table

        def jobs(chunk: list[tuple[Any, ...]]) -> Iterator[tuple[str, int, pa.Table, tuple[Any, ...]]]:
            for args in chunk:
                yield self._label(args[1]), args[1], read(args), extra(args)

        step = max(1, CLUSTER_BATCHES_IN_FLIGHT)
        for start in range(0, len(todo), step):
            self.cluster.run(phase, fn, jobs(todo[start : start + step]), len(self.units), arrived)

    def _label(self, part: int) -> str:
        unit = self.units[part]
        where = f"batch {unit.batch}" if unit.batch is not None else "the window's edge traces"
        return f"{where} ({len(unit.trace_ids)} traces, partition {part + 1}/{len(self.units)})"

    def _plan(self, part: int, here: dict[str, tuple[Finding, Occurrences]], calls: bool) -> _Pricing:
        """A unit's pricing: its cache (a stored batch's, read from disk once a round), each
        finding's key, the findings not priced yet and the traces to read for them.

        A finding's savings and call durations in a batch depend on its own occurrences' traces
        alone (repair, the critical path, the what-if engine and ``sequence.call_durations`` are
        per trace: ``tests/analysis/test_occurrence_keys.py`` prices a finding with and without
        other traces beside its own), so its key is its occurrences' and nothing of the other
        findings of the batch; and a finding priced again is priced on its own traces (those of
        the findings missing here), not on every finding's traces of the batch."""
        unit = self.units[part]
        cache: dict[str, PricedEntry] = {}
        if unit.batch is not None:
            if unit.batch not in self.pricing:
                self.pricing[unit.batch] = self.state.load_pricing(unit.batch)
            cache = self.pricing[unit.batch]
        keys = {fid: _occurrence_key(fid, occs, calls) for fid, (_, occs) in here.items()}
        carried = False
        for fid, (_, occs) in here.items():
            stored = cache.get(fid)
            if stored is None or stored[0] == keys[fid]:
                continue
            old = _without_among(stored[0], calls)
            if old == keys[fid] or (
                keys[fid].startswith(KEYED_PREFIX)
                and not old.startswith(KEYED_PREFIX)
                and old == _written_key(fid, occs, calls)
            ):
                # priced under an older key of the same occurrences (one with the hash of every
                # finding's traces in the batch appended, or written out before the occurrences had
                # keys): kept, re-keyed (once per stored entry), not priced again
                cache[fid] = (keys[fid], stored[1], stored[2])
                carried = True
        # each with its occurrences in this unit only: what is priced here, whatever else a
        # context holds (``_priced_together``), and all a cluster task receives
        missing = [
            replace(f, occurrences=occs)
            for fid, (f, occs) in here.items()
            if fid not in cache or cache[fid][0] != keys[fid]
        ]
        wanted = frozenset(t for f in missing for t in f.occurrence_table.trace_id_list())
        return _Pricing(cache, wanted, keys, missing, carried)

    def _priced_together(
        self, calls: list[tuple[Any, ...]], plans: dict[int, _Pricing], with_calls: bool
    ) -> None:
        """The stored batches with findings to price again, several on one read: their wanted
        traces read together (at most ``batch_spans`` spans a read, as one batch's extraction) into
        one context, each batch's findings priced there (``_fresh``). A finding's pricing depends
        on its own traces alone, so it is the same as on its batch's read; but a cross-trace value
        that moves (missing_timeout's timeout: the p99 of every trace's healthy calls) makes one
        finding stale in nearly every stored batch, and a read per batch cost a scan of the
        batch's spans each (on the 7M-span soak store: 82 reads, 20-26 s, for a few traces
        each)."""
        todo = [args for args in calls if plans[args[1]].missing and self.units[args[1]].batch is not None]
        if len(todo) < 2:
            return  # one read either way (``_priced``)
        wanted = sorted(set().union(*(plans[args[1]].wanted for args in todo)))
        spans = self.state.spans_by_batch(wanted)
        group: list[tuple[Any, ...]] = []
        held = 0
        for args in todo:
            size = spans.get(self.units[args[1]].batch, 0)
            if group and held + size > self.state.batch_spans:
                self._price_group(group, plans, with_calls)
                group, held = [], 0
            group.append(args)
            held += size
        self._price_group(group, plans, with_calls)

    def _price_group(
        self, group: list[tuple[Any, ...]], plans: dict[int, _Pricing], with_calls: bool
    ) -> None:
        if len(group) < 2:
            return  # read alone (``_priced``)
        parts = [args[1] for args in group]
        units = [self.units[p] for p in parts]
        ids = sorted(set().union(*(plans[p].wanted for p in parts)))
        firsts, lasts = [u.first for u in units], [u.last for u in units]
        first = None if None in firsts else min(f for f in firsts if f is not None)
        last = None if None in lasts else max(x for x in lasts if x is not None)
        source = group[0][0]
        table = self._retrying("reading", parts[0], lambda: source.read(ids, first, last))
        self._fresh.update(self._priced_in_pieces(table, {p: plans[p].missing for p in parts}, with_calls))

    def _priced_in_pieces(
        self, table: pa.Table, missing: dict[int, list[Finding]], calls: bool
    ) -> dict[int, partitions.Priced]:
        """Each unit's ``missing`` findings priced in ``table``'s traces (``priced_in``), a
        piece of at most ``PRICING_SPANS`` spans of whole traces at a time (:func:`_trace_pieces`):
        one context and what-if engine of a piece's spans at a time, not of a read's (a round's
        new batches priced together: up to ``batch_spans`` spans, which cost ~1 KiB of context and
        engine a span). A trace's pricing is of that trace alone, and the pieces are runs of the
        traces in the order a context sorts them, so the pieces' savings and call durations one
        after another are the whole table's, in its order (:func:`_joined`)."""
        from hourglass.analysis.batch_tasks import priced_in

        out: dict[int, list[partitions.Priced]] = {part: [] for part in missing}
        for piece in _trace_pieces(table, PRICING_SPANS):
            ctx = AnalysisContext.from_table(piece)
            del piece
            try:
                for part, findings in missing.items():
                    price = functools.partial(priced_in, ctx, findings, calls)
                    out[part].append(self._retrying("pricing", part, price))
            finally:  # (the what-if engine it caches refers back to it: freed now, not by the collector)
                ctx.cache.clear()
            del ctx
        return {part: _joined(pieces) for part, pieces in out.items()}

    def _priced(self, args: tuple[Any, ...], plan: _Pricing, calls: bool) -> partitions.Priced:
        source, part = args[0], args[1]
        unit = self.units[part]
        cache, missing = plan.cache, plan.missing
        if missing:
            fresh = self._fresh.get(part)
            if fresh is None:
                table = self._read_wanted(source, part, plan.wanted)
                fresh = self._priced_in_pieces(table, {part: missing}, calls)[part]
                del table
            for f in missing:
                priced = partitions.impact_numbers(fresh.impacts.get(f.id))
                cache[f.id] = (plan.keys[f.id], priced, fresh.calls.get(f.id))
        if unit.batch is not None and (missing or plan.carried):
            self.state.store_pricing(unit.batch, cache)
        impacts = {fid: cache[fid][1] for fid in plan.keys if cache[fid][1] is not None}
        durations = {fid: cache[fid][2] for fid in plan.keys if cache[fid][2] is not None}
        return partitions.Priced(impacts, durations)

    def close(self) -> None:
        self.pricing.clear()
        self._fresh.clear()


_Rows = list[tuple[Occurrences, np.ndarray]]  # positions in occurrence tables, table by table


def _trace_pieces(table: pa.Table, spans: int) -> Iterator[pa.Table]:
    """``table``'s rows as tables of whole traces of about ``spans`` spans each (a trace is not
    cut: a piece ends with the trace that reaches the count), each piece a run of the trace ids
    in their sorted order (as ``AnalysisContext`` orders its traces), the pieces in that order.
    The table itself when it holds no more than ``spans`` rows."""
    if table.num_rows <= spans:
        yield table
        return
    ids = pl.from_arrow(table.column("trace_id"))
    assert isinstance(ids, pl.Series)
    ids = ids.cast(pl.String)
    # each trace's piece: where its first span falls among the spans of the traces sorted by id
    sizes = pl.DataFrame({"trace_id": ids}).group_by("trace_id").len().sort("trace_id")
    before = sizes["len"].cum_sum() - sizes["len"]
    sizes = sizes.with_columns(piece=(before // spans).cast(pl.Int64))
    piece_of = pl.DataFrame({"trace_id": ids}).join(
        sizes.select("trace_id", "piece"), on="trace_id", how="left", maintain_order="left"
    )["piece"]
    del ids, sizes, before
    # (the pieces that have a trace: one larger than ``spans`` skips numbers, and an empty piece
    # would still be priced, every finding of the share in an empty context)
    for piece in piece_of.unique().sort().to_list():
        # (the mask made by polars: ``pa.array`` of a numpy array imports pandas, which stayed
        # in serve's worker for good: ~140k Python objects and ~20 MiB)
        yield table.filter((piece_of == piece).to_arrow())


def _joined(pieces: list[partitions.Priced]) -> partitions.Priced:
    """The pricing of consecutive pieces of one table's traces (:func:`_trace_pieces`) as the
    whole table's: each finding's per-trace savings, root durations and call durations, piece
    after piece (a finding priced in none of the pieces has no saving, as in the whole)."""
    if len(pieces) == 1:
        return pieces[0]
    impacts: dict[str, partitions.PricedImpact] = {}
    for fid in dict.fromkeys(fid for piece in pieces for fid in piece.impacts):
        parts = [piece.impacts[fid] for piece in pieces if fid in piece.impacts]
        impacts[fid] = (
            (),
            np.concatenate([saved for _, saved, _ in parts]),
            np.concatenate([root for _, _, root in parts]),
        )
    calls = {
        fid: np.concatenate([piece.calls[fid] for piece in pieces if fid in piece.calls])
        for fid in dict.fromkeys(fid for piece in pieces for fid in piece.calls)
    }
    return partitions.Priced(impacts, calls)


def _taken(here: dict[str, tuple[Finding, _Rows]]) -> dict[str, tuple[Finding, Occurrences]]:
    """finding id -> (finding, the occurrences at its positions, one table's after another's)."""
    out: dict[str, tuple[Finding, Occurrences]] = {}
    for fid, (finding, parts) in here.items():
        taken = [table.take(rows) for table, rows in parts]
        out[fid] = (finding, taken[0] if len(taken) == 1 else Occurrences.concat(taken))
    return out


@dataclass
class _Pricing:
    """One unit's pricing in a round (:meth:`MemoExecutor._plan`)."""

    cache: dict[str, PricedEntry]  # finding id -> its entry (the stored batch's, updated in place)
    wanted: frozenset[str]  # the traces read to price ``missing``: those of their occurrences in the unit
    keys: dict[str, str]  # finding id -> what its pricing here depends on
    missing: list[Finding]  # the findings whose entry is absent or stale
    carried: bool = False  # entries priced under written-out keys, re-keyed (to be stored)


# a segment's head (``IncrementalAnalysis.load_segment_head``): trace summaries, services, spans,
# the critical paths' trace counts per endpoint and forest (None: no critical-path summary)
_SegmentHead = tuple[TraceRoots, pl.DataFrame, int, pl.DataFrame | None, pl.DataFrame | None]

PricedEntry = tuple[str, Any, Any]  # (occurrence key, PricedImpact | None, call durations | None)


@dataclass(frozen=True)
class ReportWindow:
    """A report cut to the newest batches of its window (:meth:`IncrementalAnalysis.units` with
    ``max_spans``): what it covers and what it left out."""

    max_spans: int
    spans: int  # the spans of the batches kept
    spans_left_out: int
    traces_left_out: int
    from_ns: int | None  # the earliest latest-span-start of a kept trace

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_spans": self.max_spans,
            "spans": self.spans,
            "spans_left_out": self.spans_left_out,
            "traces_left_out": self.traces_left_out,
            "from_ns": self.from_ns,
        }


@dataclass
class RoundFigures:
    """What one round did (``status`` and the soak benchmark print these)."""

    settled_new: int = 0
    dirty_batches: int = 0
    expired_traces: int = 0
    batches: int = 0
    traces: int = 0
    units_read: int = 0
    pending: int = 0  # traces with spans that have not settled yet, or left for the next round
    deferred: int = 0  # settled traces left for the next round (max_round_spans)
    pending_spans: int = 0  # the spans of the pending traces
    # last span arrival of the earliest-settled one of them that the report's window will hold
    oldest_deferred_ns: int | None = None
    deferred_outside_window: int = 0  # of the deferred traces, those the window will not hold
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "settled_new_traces": self.settled_new,
            "dirty_batches": self.dirty_batches,
            "expired_traces": self.expired_traces,
            "batches": self.batches,
            "traces_extracted": self.traces,
            "partitions_read": self.units_read,
            "pending_traces": self.pending,
            "pending_spans": self.pending_spans,
            "deferred_traces": self.deferred,
            "oldest_deferred_ingested_ns": self.oldest_deferred_ns,
            "deferred_outside_window": self.deferred_outside_window,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


class IncrementalAnalysis:
    """The extraction state of one span store (see the module doc), kept in ``sidecar`` (a DuckDB
    file; None: in memory only)."""

    def __init__(
        self,
        sidecar: str | None,
        *,
        batch_spans: int = BATCH_SPANS,
        max_round_spans: int = MAX_ROUND_SPANS,
        segment_batches: int = SEGMENT_BATCHES,
        release_heap: Callable[[], None] | None = None,
    ) -> None:
        self.batch_spans = batch_spans
        # called where a round has just freed much (each segment's meta folded in, the critical
        # paths decided, each kind decided): serve's worker returns the C heap's freed pages there
        # (``malloc_trim``). glibc reuses the free chunks of its heap, which is as large as the
        # biggest round made it, before it maps new memory, and keeps the pages a chunk touched
        # once it is freed again until a trim: a round's phases, one after another, left their
        # pages resident through the next (a 12M-span store: +110 MiB more held through every
        # decision from the second round on, growing with the store)
        self.release_heap = release_heap or (lambda: None)
        self.segment_batches = segment_batches
        self.max_round_spans = max_round_spans
        self.sidecar = sidecar
        if sidecar and os.path.exists(sidecar) and _identity(sidecar) != _stored_identity(sidecar):
            # the span store was deleted and created again: this state describes other traces
            log.warning("incremental analysis: %s belongs to another store file; starting afresh", sidecar)
            _remove_state(sidecar)
        self.db = quiet(duckdb.connect(sidecar or ":memory:"))
        self.db.execute("SET threads TO 1")
        self.db.execute(f"SET memory_limit = '{SIDECAR_MEMORY_LIMIT}'")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS traces (trace_id VARCHAR PRIMARY KEY, batch BIGINT, spans BIGINT,"
            " first_ingested_ns BIGINT, last_ingested_ns BIGINT, last_start_ns BIGINT, last_end_ns BIGINT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value BIGINT)")
        # Every stored trace's arrival figures over the store's rows ingested before
        # meta 'tally_upto' (rows re-read later are counted after it only), valid while the store
        # removed no rows since (meta 'tally_removals': a hash of the store's removals token):
        # a round then reads only the recent rows (``_arrivals``).
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS tally (trace_id VARCHAR PRIMARY KEY, spans BIGINT,"
            " first_ingested_ns BIGINT, last_ingested_ns BIGINT, last_start_ns BIGINT, last_end_ns BIGINT)"
        )
        watermark = self.db.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchall()
        self.watermark = int(watermark[0][0]) if watermark else 0
        # Each batch's rows live on disk only, in a folder beside the sidecar (a temporary one
        # without a sidecar): ``b<batch>/`` holds one pickle per detector kind, the batch's trace
        # summaries and critical-path summary (``meta``, written last: a batch without it is extracted
        # again) and its pricing; ``spill/`` the resource rows in Parquet buckets
        # (``spill/<kind>.<table>/b<bucket>/p<batch>.parquet``). Pickles, not DuckDB BLOBs: DuckDB
        # binds a large BLOB parameter slowly (8 s for one 100k-span batch's rows).
        self._temporary = sidecar is None
        # (a temporary one held: removed by a serve worker that ends in the middle of a round)
        self.folder = Path(sidecar + ".d") if sidecar else Path(scratch.make("incremental", held=True))
        self.folder.mkdir(exist_ok=True)
        for legacy in self.folder.glob("*.pickle"):  # an older layout: those batches are extracted again
            legacy.unlink(missing_ok=True)
        self._check_rows_format()
        self.spill = Spill(str(self.folder / "spill"), SPILL_BUCKETS)
        # ``parked/``: a round's findings' occurrences while the next kinds decide and the stages after
        # (``Occurrences.park``); what a crash left there is removed
        self.parked = self.folder / "parked"
        shutil.rmtree(self.parked, ignore_errors=True)
        self.parked.mkdir(exist_ok=True)  # (a file the removal could not take stays; it is never read)
        for spill in self.folder.glob("hourglass-spill-*"):  # a crashed round's on-the-fly units' spill
            shutil.rmtree(spill, ignore_errors=True)
        for spill in self.folder.glob(f"{PATHS_PREFIX}*"):  # a crashed round's critical-path values
            shutil.rmtree(spill, ignore_errors=True)
        # per batch: its traces and their ingest-time bounds, rebuilt from the traces table
        self.batches: dict[int, Batch] = {}
        self._load_batches()
        self.stored: set[int] = set()  # batches whose rows are on disk, whole
        for path in self.folder.glob("b*"):
            number = int(path.name[1:]) if path.name[1:].isdigit() else None
            if number is not None and number in self.batches and (path / "meta.pickle").exists():
                self.stored.add(number)
        leftovers = {int(p.name[1:]) for p in self.folder.glob("b*") if p.name[1:].isdigit()} - self.stored
        leftovers |= {
            int(f.stem[1:]) for f in Path(self.spill.folder).glob("*/b*/p*.parquet") if f.stem[1:].isdigit()
        } - self.stored
        self._remove_files(leftovers)  # a batch cut short by a crash, or one retention emptied
        # ``segments/s<first>-<last>/``: the combined rows and meta of consecutive stored batches
        # (``members.pickle``, written last, names them); valid while every member is stored
        self.segments: dict[tuple[int, ...], Path] = {}
        (self.folder / "segments").mkdir(exist_ok=True)
        for path in sorted((self.folder / "segments").iterdir()):
            try:
                members = tuple(pickle.loads((path / "members.pickle").read_bytes()))
            except Exception:  # cut short by a crash
                members = ()
            if members and set(members) <= self.stored:
                self.segments[members] = path
            else:
                shutil.rmtree(path, ignore_errors=True)
        self.last = RoundFigures()
        self.window: ReportWindow | None = None  # the last units()' cut, if it cut
        self.whole_window = False  # the last units() were the whole retention's (not a since window's)
        self.left_out: set[int] = set()  # batches the report of the whole retention left out
        if sidecar:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('store_inode', ?)", [_identity(sidecar)])

    def _check_rows_format(self) -> None:
        """Stored rows of an older shape (a detector's ``ROWS_FORMAT`` changed since they were
        written) are removed, rows, segments, spill and pricing alike, so every batch is extracted
        again: deciding on them would be wrong or fail. A sidecar without the mark has rows of
        the first shapes (or none: a new sidecar). The mark includes polars' version: stored rows
        hold polars hashes of keys (operations, callers), stable only within one version."""
        current = _rows_format_mark(ROWS_FORMAT)
        found = self.db.execute("SELECT value FROM meta WHERE key = 'rows_format'").fetchall()
        batches = any(p.is_dir() and p.name[1:].isdigit() for p in self.folder.glob("b*"))
        if found:
            stored = int(found[0][0])
        else:
            stored = _rows_format_mark(dict.fromkeys(ROWS_FORMAT, 1)) if batches else current
        if stored != current:
            log.warning("incremental analysis: the stored rows have an older shape; extracting again")
            for path in self.folder.iterdir():
                if path.is_dir() and (path.name in ("segments", "spill") or path.name[1:].isdigit()):
                    shutil.rmtree(path, ignore_errors=True)
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('rows_format', ?)", [current])
        held = self.db.execute("SELECT value FROM meta WHERE key = 'rows_held'").fetchall()
        if not held or int(held[0][0]) != ROWS_HELD:
            self._hold_stored_rows()
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('rows_held', ?)", [ROWS_HELD])

    def _hold_stored_rows(self) -> None:
        """Stored rows written before they were stored as held (``partitions.held``: a sidecar
        without the ``rows_held`` mark, or an older one) rewritten so, batches and segments: the
        same values, decided the same, but a round loads them without compacting them and holds
        less (once, on the first start; a crash midway converts again, ``held`` being idempotent)."""
        files = [
            f
            for pattern in ("b*/rows-*.pickle", "segments/s*/rows-*.pickle")
            for f in self.folder.glob(pattern)
            if f.parent.name[1:].replace("-", "").isdigit()
        ]
        if not files:
            return
        log.info("incremental analysis: storing %d row files as held rows", len(files))
        for path in files:
            kind = path.name[len("rows-") : -len(".pickle")]
            try:
                rows = pickle.loads(path.read_bytes())
            except Exception:  # a file cut short by a crash: left to the checks that read it
                continue
            self._write(path, partitions.held(kind, rows))
            del rows

    def _load_batches(self) -> None:
        rows = self.db.execute(
            "SELECT batch, count(*), min(first_ingested_ns), max(last_ingested_ns), sum(spans),"
            " max(last_start_ns), min(last_start_ns) FROM traces GROUP BY batch"
        ).fetchall()
        self.batches = {
            int(b): Batch(
                int(b),
                StoredTraceIds(self.db, int(b), int(n)),
                int(lo),
                int(hi),
                int(spans),
                int(new),
                int(old),
            )
            for b, n, lo, hi, spans, new, old in rows
        }

    def batches_of(self, trace_ids: pl.Series) -> np.ndarray:
        """Each of these traces' stored batch (-1: not stored), looked up in the sidecar (a join
        on the ids given: nothing of every stored trace is held here)."""
        out = np.full(len(trace_ids), -1, dtype=np.int64)
        if not len(trace_ids):
            return out
        wanted = pl.DataFrame({"trace_id": trace_ids.cast(pl.String)}).with_row_index("i").to_arrow()
        self.db.register("wanted_traces", wanted)
        try:
            found = self.db.execute(
                "SELECT w.i, t.batch FROM wanted_traces w JOIN traces t USING (trace_id)"
            ).fetchnumpy()
        finally:
            self.db.unregister("wanted_traces")
        out[np.asarray(found["i"], dtype=np.int64)] = np.asarray(found["batch"], dtype=np.int64)
        return out

    # -- persistence -------------------------------------------------------------------------

    def _batch_folder(self, batch: int) -> Path:
        return self.folder / f"b{batch:06d}"

    def _write(self, path: Path, value: Any) -> None:
        partial_path = path.with_suffix(".partial")
        partial_path.write_bytes(pickle.dumps(value, protocol=5))
        partial_path.replace(path)  # whole or not at all

    def store_extraction(self, batch: int, result: partitions.PartResult) -> None:
        """Writes a batch's rows: the resource rows to the spill buckets, each kind's rows to its
        own file (the decision reads one kind at a time), the rest (``meta``) last."""
        folder = self._batch_folder(batch)
        folder.mkdir(exist_ok=True)
        rows = self.spill.write(batch, result.rows)
        for kind, tables in rows.items():  # held: as the decision holds them (``partitions.held``)
            self._write(folder / f"rows-{kind}.pickle", partitions.held(kind, tables))
        # the trace summaries' columns a round reads, the critical-path rows as their
        # per-endpoint aggregates (a 13th of the bytes)
        traces = result.traces.select(TRACE_COLUMNS)
        self._write(folder / "meta.pickle", (traces, result.services, result.spans, _summary(result.paths)))
        self.stored.add(batch)

    def load_rows(self, batch: int, kind: str) -> Rows:
        path = self._batch_folder(batch) / f"rows-{kind}.pickle"
        return pickle.loads(path.read_bytes()) if path.exists() else {}

    def load_meta(self, batch: int) -> tuple[pl.DataFrame, pl.DataFrame, int, PathSummary | None]:
        """(trace summaries, services, span count, critical-path summary or None) of a stored
        batch (a batch stored with its critical-path rows, before they were summarized, gets
        them summarized here, and its file rewritten so)."""
        path = self._batch_folder(batch) / "meta.pickle"
        traces, services, spans, paths = pickle.loads(path.read_bytes())
        if isinstance(paths, PathRows):  # written as store_extraction writes it now, once
            traces, paths = traces.select(TRACE_COLUMNS), _summary(paths)
            self._write(path, (traces, services, spans, paths))
        return traces, services, spans, paths

    def load_pricing(self, batch: int) -> dict[str, PricedEntry]:
        path = self._batch_folder(batch) / "priced.pickle"
        try:
            priced: dict[str, PricedEntry] = pickle.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except Exception:  # a file cut short by a crash: priced again
            log.warning("incremental analysis: %s unreadable; that batch is priced again", path)
            return {}
        # (a batch priced before the trace ids were dropped: without them, as the round keeps them)
        return {
            fid: (key, partitions.impact_numbers(impact), calls)
            for fid, (key, impact, calls) in priced.items()
        }

    def spans_by_batch(self, trace_ids: list[str]) -> dict[int, int]:
        """Of these stored traces, the spans in each batch (as last seen settled)."""
        rows = self.db.execute(
            "SELECT batch, sum(spans) FROM traces WHERE trace_id IN (SELECT unnest(?::VARCHAR[])) GROUP BY batch",
            [trace_ids],
        ).fetchall()
        return {int(b): int(n) for b, n in rows}

    def store_pricing(self, batch: int, entries: dict[str, PricedEntry]) -> None:
        """The batch's whole pricing cache (``entries``) written."""
        if batch in self.stored:
            self._write(self._batch_folder(batch) / "priced.pickle", entries)

    def _remove_files(self, batches: Iterable[int]) -> None:
        for b in sorted(set(batches)):
            shutil.rmtree(self._batch_folder(b), ignore_errors=True)
            for path in Path(self.spill.folder).glob(f"*/b*/p{b:06d}.parquet"):
                path.unlink(missing_ok=True)

    def _forget(self, batches: Iterable[int]) -> None:
        chosen = set(batches)
        self.stored -= chosen
        self._remove_files(chosen)
        for members in [m for m in self.segments if chosen.intersection(m)]:
            shutil.rmtree(self.segments.pop(members), ignore_errors=True)

    # -- segments: the rows of consecutive batches combined -----------------------------------

    def load_segment_rows(self, members: tuple[int, ...], kind: str) -> Rows:
        path = self.segments[members] / f"rows-{kind}.pickle"
        return pickle.loads(path.read_bytes()) if path.exists() else {}

    def load_segment_meta(
        self, members: tuple[int, ...]
    ) -> tuple[pl.DataFrame, pl.DataFrame, int, PathSummary | None]:
        meta: tuple[pl.DataFrame, pl.DataFrame, int, PathSummary | None] = pickle.loads(
            (self.segments[members] / "meta.pickle").read_bytes()
        )
        return meta

    def load_segment_head(self, members: tuple[int, ...]) -> _SegmentHead | None:
        """What a round reads of a segment's meta when its critical-path values are in files of
        their own (``paths/``): its trace summaries already compact, its services and span count,
        its critical paths' trace counts per endpoint and forest (None when the segment has no
        such files: read its meta)."""
        folder = self.segments[members]
        try:
            head: _SegmentHead = pickle.loads((folder / "head.pickle").read_bytes())
        except FileNotFoundError:
            return None
        if head[3] is not None and not (folder / "paths" / "index.pickle").exists():
            return None
        return head

    def _write_head(
        self, folder: Path, meta: tuple[pl.DataFrame, pl.DataFrame, int, PathSummary | None]
    ) -> None:
        """A segment's values of its critical paths (``paths/``), then its ``head.pickle``
        (:meth:`load_segment_head`), from its meta."""
        traces, services, spans, paths = meta
        if paths is not None:
            write_path_values(paths, folder / "paths")
        head: _SegmentHead = (
            TraceRoots.of(traces),
            services,
            spans,
            path_counts(paths) if paths is not None else None,
            paths.nodes if paths is not None else None,
        )
        self._write(folder / "head.pickle", head)

    def compact(self) -> None:
        """Every run of ``segment_batches`` stored batches, consecutive among the known batches
        and in no segment yet, combined into a segment (each kind's rows concatenated in batch
        order, as a round combines them; the meta's frames likewise, the critical-path
        summaries' forests merged)."""
        if self.segment_batches < 2:
            return
        self._complete_segments()
        segmented = {b for members in self.segments for b in members}
        run: list[int] = []
        for b in [*sorted(self.batches), None]:
            if b is not None and b in self.stored and b not in segmented:
                run.append(b)
                continue
            for start in range(0, len(run) - self.segment_batches + 1, self.segment_batches):
                self._write_segment(tuple(run[start : start + self.segment_batches]))
            run = []

    def _write_segment(self, members: tuple[int, ...]) -> None:
        folder = self.folder / "segments" / f"s{members[0]:06d}-{members[-1]:06d}"
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for kind in PARTS:
            rows = partitions.combine(({kind: self.load_rows(b, kind)} for b in members), compact=False).get(
                kind, {}
            )
            if rows:
                self._write(partial / f"rows-{kind}.pickle", rows)
            del rows
        metas = [self.load_meta(b) for b in members]
        paths = [m[3] for m in metas]
        summary = None
        if all(p is not None for p in paths):
            summary = combine_path_summaries(p for p in paths if p is not None)
            summary.nodes = summary.nodes.drop("root")  # a forest again, merged with the others
        meta = (
            pl.concat([m[0] for m in metas], how="vertical_relaxed"),
            pl.concat([m[1] for m in metas], how="vertical_relaxed"),
            sum(m[2] for m in metas),
            summary,
        )
        self._write(partial / "meta.pickle", meta)
        self._write_head(partial, meta)
        self._spill_segment(members, partial / "spill")
        self._write(partial / "members.pickle", list(members))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        self.segments[members] = folder

    def _spill_segment(self, members: tuple[int, ...], target: Path) -> None:
        """The spilled tables of ``COMBINED_SPILL`` of a segment's members combined into
        ``target`` (``<kind>.<table>/b<bucket>.parquet``: the members' files of the bucket one
        after another, as a round reads them; none when no member has rows there)."""
        for kind in COMBINED_SPILL:
            name = f"{kind}.{SPILLABLE[kind].table}"
            for bucket in range(self.spill.buckets):
                folder = Path(self.spill.folder) / name / f"b{bucket:05d}"
                files = [f for b in members if (f := folder / f"p{b:06d}.parquet").exists()]
                if not files:
                    continue
                rows = pl.read_parquet(files)
                write_whole(
                    target / name / f"b{bucket:05d}.parquet",
                    functools.partial(rows.write_parquet, compression="lz4", statistics=False),
                )
                del rows
        target.mkdir(parents=True, exist_ok=True)  # (the mark of a segment combined so)

    def _complete_segments(self) -> None:
        """The segments stored before their spilled tables were kept combined, or their
        critical-path values in files of their own, get them now (once; a copy cut short is made
        again)."""
        for members, folder in self.segments.items():
            if not (folder / "spill").is_dir():
                partial = folder / "spill.partial"
                shutil.rmtree(partial, ignore_errors=True)
                self._spill_segment(members, partial)
                partial.rename(folder / "spill")
            if not (folder / "head.pickle").exists() or (
                (folder / "paths").is_dir() and not (folder / "paths" / "index.pickle").exists()
            ):
                # (the head first: a round reads the segment's meta until both are whole again)
                (folder / "head.pickle").unlink(missing_ok=True)
                shutil.rmtree(folder / "paths", ignore_errors=True)
                self._write_head(folder, self.load_segment_meta(members))

    def _pieces(self, units: tuple[Unit, ...]) -> list[tuple[int, tuple[int, ...] | None]]:
        """The round's units in order as (position of the first, the members of a segment that
        stands for the units from there, or None for that unit alone)."""
        starting = {members[0]: members for members in self.segments}
        out: list[tuple[int, tuple[int, ...] | None]] = []
        p = 0
        while p < len(units):
            batch = units[p].batch
            members = starting.get(batch) if batch is not None else None
            if members is not None and tuple(u.batch for u in units[p : p + len(members)]) == members:
                out.append((p, members))
                p += len(members)
            else:
                out.append((p, None))
                p += 1
        return out

    def release_memory(self) -> None:
        """The sidecar connection's buffer pool emptied of the blocks of its tables read so far
        (they are in the file; a later read reads them again), so that they are not held while
        the worker waits, growing with the store, nor under the phases of a round after the
        reads: serve's round releases after the update (its traces table: ~40 MiB at 12M stored
        spans, held under the decision and every stage after it), after each pricing pass, and
        when it ends. DuckDB evicts what it can when its memory limit is lowered (and says so
        when what is pinned stays above it: that is no error here); the limit is then set back,
        and the freed pages returned (``release_heap``: serve's worker purges DuckDB's
        allocator, which keeps them resident otherwise)."""
        if self.sidecar is None:
            self.release_heap()
            return  # in memory the tables are the data: a lowered limit would spill them to disk
        try:
            try:
                self.db.execute(f"SET memory_limit = '{SIDECAR_IDLE_LIMIT}'")
            except duckdb.OutOfMemoryException:
                pass  # evicted what could be; pinned blocks (indexes, in-memory tables) stay
            finally:
                self.db.execute(f"SET memory_limit = '{SIDECAR_MEMORY_LIMIT}'")
        except duckdb.Error:  # the round's report stands; the blocks stay until the next round
            log.warning("incremental analysis: emptying the sidecar's buffer pool failed", exc_info=True)
        self.release_heap()  # (the freed pages returned: DuckDB's allocator keeps them otherwise)

    def close(self) -> None:
        self.db.close()
        self.remove_temporary()

    def remove_temporary(self) -> None:
        """The temporary folder of a state without a sidecar (a store in memory) removed; a state
        of a sidecar keeps its folder. Such a state cannot outlive its process: a serve worker that
        ends in the middle of a round removes it too (:mod:`hourglass.analysis.scratch`)."""
        if self._temporary:
            shutil.rmtree(self.folder, ignore_errors=True)
            scratch.let_go(str(self.folder))

    # -- the decision over the stored rows ----------------------------------------------------

    def extraction(
        self,
        units: tuple[Unit, ...],
        source: BatchSource,
        executor: MemoExecutor,
        notes: NearMissSink,
        kinds: Collection[str] | None = None,
    ) -> partitions.Extracted:
        """The first pass of a round (``analyze_partitioned``'s ``extraction``): the units not
        stored yet are extracted (``executor``: read, extracted, a batch's rows written), then
        each split detector decides on the combined rows of every unit, one kind at a time,
        the resource rows bucket by bucket. Same findings as ``partitions.run_extraction`` over
        the same units. ``kinds``: only those detectors decide (a what-if's recommendations:
        ``analysis_worker.window_findings``)."""
        missing = [p for p, unit in enumerate(units) if unit.batch is None or unit.batch not in self.stored]
        fresh = executor.map(
            "extracting", partitions.extract_part, [(source, p, len(units), None) for p in missing], None
        )
        # units extracted on the fly (a ``since`` window's edge) are not stored: their rows stay
        # here for this round, their resource rows in a spill of their own
        extra = (
            Spill.create(SPILL_BUCKETS, near=str(self.folder))
            if any(u.batch is None for u in units)
            else None
        )
        on_the_fly: dict[int, partitions.PartResult] = {}
        summary_folder: str | None = None  # the critical-path summaries' values while this round decides
        try:
            for p, result in zip(missing, fresh, strict=True):
                if units[p].batch is None:
                    assert extra is not None and result is not None
                    result.rows = extra.write(p, result.rows)
                    on_the_fly[p] = result
            del fresh

            def meta(p: int, unit: Unit) -> tuple[pl.DataFrame, pl.DataFrame, int, PathSummary | None]:
                if p in on_the_fly:
                    r = on_the_fly[p]
                    return r.traces, r.services, r.spans, _summary(r.paths)
                assert unit.batch is not None
                return self.load_meta(unit.batch)

            # the stored batches in segments read as one (same rows, same order); each piece's
            # meta folded in as it is read (the services grouped, the critical-path summaries'
            # values written to a folder of this round's, their counts and forests merged), so
            # the round holds one running total, not every piece's
            pieces = self._pieces(units)
            traces_of: list[TraceRoots] = []
            all_services: pl.DataFrame | None = None
            spans = 0
            complete = bool(units)
            try:
                summary_folder = tempfile.mkdtemp(prefix=PATHS_PREFIX, dir=self.folder)
            except OSError as exc:  # (a full disk: the values held in memory, as before)
                log.warning("critical-path summaries held in memory this round: %s", exc)
            summary: SpilledPathSummary | None = SpilledPathSummary(summary_folder)
            for p, members in pieces:
                head = self.load_segment_head(members) if members is not None else None
                if head is not None:  # (a segment's values are in files of its own: not written again)
                    assert members is not None
                    roots, services, count, counts, nodes = head
                    traces_of.append(roots)
                    all_services = _fold_services(all_services, services)
                    spans += count
                    complete = complete and counts is not None and nodes is not None
                    if summary is not None and counts is not None and nodes is not None and complete:
                        summary.add_written(counts, nodes, self.segments[members] / "paths")
                    else:
                        summary = None
                    del head, roots, services, counts, nodes
                    self.release_heap()
                    continue
                traces, services, count, paths = (
                    meta(p, units[p]) if members is None else self.load_segment_meta(members)
                )
                traces_of.append(TraceRoots.of(traces))
                all_services = _fold_services(all_services, services)
                spans += count
                complete = complete and paths is not None
                if summary is not None and paths is not None and complete:
                    summary.add(paths)
                else:
                    summary = None
                del traces, services, paths
                if members is not None:  # (a segment's: 16 batches' frames freed)
                    self.release_heap()
            # the trace summaries the report reads (pipeline.score: each finding's traces' root
            # durations; their count), in no particular order (each is looked up by id), held
            # compact (the ids as 64-bit words: a third of the bytes)
            all_traces = TraceRoots.concat(traces_of)
            all_services = (
                all_services if all_services is not None else pl.DataFrame(schema=_SERVICES_SCHEMA)
            ).sort("service", "scope_name")
            del traces_of
            memlog.note("trace summaries and services combined")
            # every unit's path rows or none (as partitions.run_extraction); decided now, then dropped
            critical_paths = summary.report_critical_paths() if complete and summary is not None else []
            del summary
            if summary_folder is not None:
                shutil.rmtree(summary_folder, ignore_errors=True)
            self.release_heap()
            memlog.note("critical paths decided")
            stored = tuple(u.batch for u in units if u.batch is not None)
            batch_spill = BatchSpill(  # a window's rounds keep nothing (a whole round's state stays)
                self.spill.folder,
                self.spill.buckets,
                stored,
                extra,
                # the whole retention's report (cut to its newest batches or not): a since
                # window's decision keeps nothing, so it leaves the rounds' states as they were
                extra is None and self.whole_window,
                tuple(
                    (members, self.segments[members])
                    for _, members in pieces
                    if members is not None and (self.segments[members] / "spill").is_dir()
                ),
            )
            decided: dict[str, list[Finding]] = {}
            for kind in PARTS if kinds is None else [k for k in PARTS if k in kinds]:
                rows = partitions.combine(
                    {kind: on_the_fly[p].rows.get(kind, {})}
                    if p in on_the_fly
                    else {kind: self.load_rows(units[p].batch, kind)}  # type: ignore[arg-type]
                    if members is None
                    else {kind: self.load_segment_rows(members, kind)}
                    for p, members in pieces
                )
                memlog.note(f"rows of {kind} combined")
                found = partitions.decide(rows, notes, batch_spill)
                del rows
                # its occurrences wait on disk while the next kinds decide, and through the
                # stages after the decisions, each of which reads back the columns it uses and
                # lets them go after it (``pipeline._analyze_partitioned``: ``Occurrences.release``)
                for finding in (f for fs in found.values() for f in fs):
                    with contextlib.suppress(OSError):  # (a full disk: they stay in memory)
                        finding.occurrence_table.park(str(self.parked))
                decided.update(found)
                del found
                self.release_heap()  # the kind's rows and working set freed
        finally:
            if summary_folder is not None:
                shutil.rmtree(summary_folder, ignore_errors=True)
            if extra is not None:
                extra.remove()
        # for the next rounds, which read segments faster but not differently: a segment that
        # cannot be made or completed now (a full disk, a file it reads cut short) is left to the
        # next round (its batches' own files are read meanwhile), never costs this round's report
        try:
            self.compact()
        except Exception:
            log.warning("incremental analysis: combining stored batches into segments failed", exc_info=True)
        findings = [f for kind in DETECTORS for f in decided.get(kind, [])]
        return partitions.Extracted(findings, all_traces, spans, all_services, critical_paths)

    # -- one round ---------------------------------------------------------------------------

    def _meta(self, key: str) -> int | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
        return int(row[0][0]) if row else None

    def _arrivals(self, reads: ArrivalReads, since_ns: int, margin_ns: int) -> pl.DataFrame:
        """What ``trace_arrivals(since_ns)`` answers (each trace with a row ingested at or after
        ``since_ns``, its figures over all its rows), from the store's rows ingested since the
        tally's bound only, merged with the tally; the tally then takes the rows read here that
        no later round re-reads (up to ``since_ns - margin_ns``: the next round reads from its
        watermark minus the margin, and that watermark is never below ``since_ns``, the deferred
        traces' settle time included). Without a valid tally (first round, an older sidecar, the
        store reopened or more compactions than it lists, the next bound behind the tally's),
        every row is read once, grouped by trace, and the tally rebuilt from them. Rows removed
        since the last read: the kept traces a compaction examined (a row ingested at or after
        its bound) and those retention may have removed (their kept rows all ended before its
        cutoff: it removes whole traces whose spans all did) are counted again from the store,
        within their ingest times (``_recount``). A rebuild (with ``reads``' third, the store's
        ``arrival_bounds``) reads the rows below the new bound range by range into the tally
        (``_tally_ranges``), then the rest as usual. Runs in ``update``'s transaction."""
        recent, between = reads[0], reads[1]
        bounds_of = reads[2] if len(reads) > 2 else None
        upto = self._meta("tally_upto")
        kept_epoch, kept_removals = self._meta("tally_epoch"), self._meta("tally_removals")
        kept_retention = self._meta("tally_retention")
        rebuild = upto is None or upto > since_ns
        start = 0 if rebuild else int(upto)  # type: ignore[arg-type]
        bound = max(start, since_ns - margin_ns)
        removed_since: int | None = None
        if not rebuild:
            table = recent(start, [bound, since_ns])
            marks = _StoreMarks.of(table)
            # compactions that removed rows since: the traces each examined (None: unknown)
            removed_since = marks.removed_since(kept_removals) if kept_epoch == marks.epoch else None
            if removed_since is None:
                rebuild, start, bound = True, 0, max(since_ns - margin_ns, 0)
                del table
        if rebuild:
            # the tally emptied (or a rebuild cut short resumed); the marks of the first read: a
            # removal during the later ones is seen next round
            start, first_marks = self._tally_ranges(recent, bounds_of, bound)
            table = recent(start, [bound, since_ns])
            marks = first_marks or _StoreMarks.of(table)
        self.db.register("recent_rows", table)
        try:
            if not rebuild:
                if removed_since is not None and removed_since < 2**63:
                    # a compaction removes later copies of spans, each ingested at or after its
                    # bound (the smallest ingest time written since the previous compaction, which
                    # removed the copies written before): a kept trace that lost one had its last
                    # kept row there
                    self._recount(between, start, "last_ingested_ns >= ?", [removed_since])
                retention = marks.retention
                if retention is not None and (kept_retention is None or retention > kept_retention):
                    self._recount(between, start, "last_end_ns < ?", [retention])
            # the traces seen (a row at or after since_ns), totalled over the tally and every
            # part read (the parts are disjoint ingest ranges: each row counted once)
            seen = pl.from_arrow(
                self.db.sql(
                    """
                    WITH rows AS (
                        SELECT trace_id, spans, first_ingested_ns, last_ingested_ns, last_start_ns,
                               last_end_ns FROM recent_rows
                        WHERE trace_id IN (SELECT trace_id FROM recent_rows WHERE part = 2)
                        UNION ALL
                        SELECT trace_id, spans, first_ingested_ns, last_ingested_ns, last_start_ns,
                               last_end_ns FROM tally
                        WHERE trace_id IN (SELECT trace_id FROM recent_rows WHERE part = 2)
                    )
                    SELECT trace_id, sum(spans)::BIGINT AS spans,
                           min(first_ingested_ns) AS first_ingested_ns,
                           max(last_ingested_ns) AS last_ingested_ns,
                           max(last_start_ns) AS last_start_ns, max(last_end_ns) AS last_end_ns
                    FROM rows GROUP BY trace_id ORDER BY trace_id
                    """
                ).to_arrow_table()
            )
            # the rows below the new bound join the tally (read for the last time)
            self.db.execute(_INTO_TALLY.format(source="FROM recent_rows WHERE part = 0"))
        finally:
            self.db.unregister("recent_rows")
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('tally_upto', ?)", [bound])
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('tally_epoch', ?)", [marks.epoch])
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('tally_removals', ?)", [marks.removals])
        if marks.retention is None:
            self.db.execute("DELETE FROM meta WHERE key = 'tally_retention'")
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('tally_retention', ?)", [marks.retention])
        assert isinstance(seen, pl.DataFrame)
        return seen

    def _tally_ranges(
        self, recent: RecentArrivals, bounds_of: ArrivalBounds | None, upto: int
    ) -> tuple[int, _StoreMarks | None]:
        """A rebuild's first part: the tally emptied, then the store's rows ingested before the
        last of its range bounds (``bounds_of(REBUILD_RANGE_ROWS)``) at or below ``upto`` read
        range by range into it, each range's groups dropped before the next is read. Returns
        where the ranges ended (0: none read) and the first read's marks (None: none). Each
        range is committed with the point it reached (meta 'tally_ranges_upto', and the first
        read's marks): a rebuild cut short resumes there when the store removed no rows since
        (the same marks), instead of reading every row again."""
        done = self._meta("tally_ranges_upto")
        first: _StoreMarks | None = None
        start = 0
        if done is not None and bounds_of is not None and done <= upto:
            now = _StoreMarks.of(recent(done, [done], done))  # type: ignore[call-arg]  # no rows: the marks
            kept = tuple(self._meta(f"tally_ranges_{key}") for key in _REACHED[1:])
            if (now.epoch, now.removals, now.retention) == kept:
                start, first = int(done), now
        if not start:
            self.db.execute("DELETE FROM tally")
        ends = [end for end in bounds_of(REBUILD_RANGE_ROWS) if start < end <= upto] if bounds_of else []
        if ends:
            # Each range committed on its own: one transaction held every stored trace's new
            # figures in memory until its end. ``update``'s transaction has written nothing else
            # yet (this is its first step); without 'tally_upto' a round cut short here is rebuilt
            # by the next one, from where its ranges reached.
            self.db.execute("DELETE FROM meta WHERE key = 'tally_upto'")
            self.db.execute("COMMIT")
            try:
                for end in ends:
                    rows = recent(start, [end], end)  # type: ignore[call-arg]
                    first = first or _StoreMarks.of(rows)
                    self.db.execute("BEGIN")
                    try:
                        self.db.register("range_rows", rows)
                        try:
                            self.db.execute(_INTO_TALLY.format(source="FROM range_rows"))
                        finally:
                            self.db.unregister("range_rows")
                        reached = (end, first.epoch, first.removals, first.retention)
                        for key, value in zip(_REACHED, reached, strict=True):
                            self.db.execute("DELETE FROM meta WHERE key = ?", [f"tally_ranges_{key}"])
                            if value is not None:
                                self.db.execute(
                                    "INSERT INTO meta VALUES (?, ?)", [f"tally_ranges_{key}", value]
                                )
                        self.db.execute("COMMIT")
                    except BaseException:
                        self.db.execute("ROLLBACK")
                        raise
                    del rows
                    start = end
            finally:
                self.db.execute("BEGIN")  # ``update``'s transaction again (it commits or rolls back)
        # gone when the round commits (the tally then has its bound): a round cut short after
        # this keeps them
        self.db.execute(
            f"DELETE FROM meta WHERE key IN ({', '.join(repr(f'tally_ranges_{k}') for k in _REACHED)})"
        )
        return start, first

    def _recount(self, between: ArrivalsBetween, upto: int, where: str, params: list[Any]) -> None:
        """The kept figures of the traces ``where`` selects counted again from the store's rows
        ingested before ``upto`` (the tally's bound), within their ingest times; those without
        such rows left (retention removed them) dropped."""
        ids, first = self.db.execute(
            f"SELECT list(trace_id), min(first_ingested_ns) FROM tally WHERE {where}", params
        ).fetchall()[0]
        if not ids:
            return
        recounted = between(list(ids), int(first), upto)
        self.db.execute("DELETE FROM tally WHERE trace_id IN (SELECT unnest(?::VARCHAR[]))", [list(ids)])
        self.db.register("recounted", recounted)
        try:
            self.db.execute(
                "INSERT INTO tally SELECT trace_id, spans, first_ingested_ns, last_ingested_ns,"
                " last_start_ns, last_end_ns FROM recounted"
            )
        finally:
            self.db.unregister("recounted")

    def update(
        self,
        arrivals: Arrivals,
        *,
        cutoff_ns: int,
        margin_ns: int,
        retention_cutoff_ns: int | None,
        recent: ArrivalReads | None = None,
        window_spans: int | None = None,
    ) -> RoundFigures:
        """Bring the batches up to date with the store: new settled traces batched, batches with
        late spans or expired traces marked for re-extraction. ``recent``: the store's recent
        rows grouped by trace (``recent_arrivals``), merged with the figures kept of the older
        ones; without it ``arrivals`` totals each recent trace over the whole store.
        ``window_spans``: the span rows the report's window holds (serve's
        ``HOURGLASS_REPORT_MAX_SPANS``; None or 0: every stored trace), so that a round with
        more settled traces than it extracts takes those the window will hold first."""
        figures = RoundFigures()
        self.db.execute("BEGIN")
        try:
            started = time.perf_counter()
            since_ns = max(self.watermark - margin_ns, 0)
            if recent is not None:
                seen = self._arrivals(recent, since_ns, margin_ns)
                memlog.note(f"arrivals merged ({seen.height} traces seen)")
            else:
                whole = pl.from_arrow(arrivals(since_ns))
                assert isinstance(whole, pl.DataFrame)
                seen = whole
                # the figures kept would miss these reads' rows: rebuilt when next used
                self.db.execute("DELETE FROM meta WHERE key = 'tally_upto'")
            figures.seconds["arrivals"] = time.perf_counter() - started
            started = time.perf_counter()
            settled = seen.filter(pl.col("last_ingested_ns") < cutoff_ns)
            pending = seen.filter(pl.col("last_ingested_ns") >= cutoff_ns)
            dirty: set[int] = set()
            if settled.height:
                self.db.register("settled_now", settled.to_arrow())
                known = self.db.execute(
                    "SELECT s.trace_id, t.batch FROM settled_now s JOIN traces t USING (trace_id)"
                    " WHERE s.spans <> t.spans OR s.last_ingested_ns <> t.last_ingested_ns"
                    " OR s.first_ingested_ns <> t.first_ingested_ns"
                ).fetchall()
                dirty.update(int(b) for _, b in known)
                new = pl.from_arrow(
                    self.db.sql(
                        "SELECT * FROM settled_now s WHERE NOT EXISTS"
                        " (SELECT 1 FROM traces t WHERE t.trace_id = s.trace_id)"
                    ).to_arrow_table()
                )
                assert isinstance(new, pl.DataFrame)
                # a late span: the trace keeps its batch, with its new figures (only the rows
                # that changed are rewritten: the traces seen again are mostly unchanged, e.g. the
                # window's traces extracted while an older backlog holds the re-read back)
                self.db.execute(
                    "UPDATE traces SET spans = s.spans, first_ingested_ns = s.first_ingested_ns,"
                    " last_ingested_ns = s.last_ingested_ns, last_start_ns = s.last_start_ns,"
                    " last_end_ns = s.last_end_ns FROM settled_now s WHERE traces.trace_id = s.trace_id"
                    " AND (traces.spans IS DISTINCT FROM s.spans"
                    " OR traces.first_ingested_ns IS DISTINCT FROM s.first_ingested_ns"
                    " OR traces.last_ingested_ns IS DISTINCT FROM s.last_ingested_ns"
                    " OR traces.last_start_ns IS DISTINCT FROM s.last_start_ns"
                    " OR traces.last_end_ns IS DISTINCT FROM s.last_end_ns)"
                )
                self.db.unregister("settled_now")
                if new.height and new["spans"].sum() > self.max_round_spans:
                    # a bounded round (memory, and a report that keeps refreshing): the traces that
                    # settled first now, the others in the next rounds; those the report's window
                    # will hold before those it will not (a backlog older than the window: a first
                    # start on a large store, or its rows extracted again after an upgrade)
                    in_window = self._in_window(new, window_spans)
                    new = new.with_columns(_outside=~in_window if in_window is not None else pl.lit(False))
                    new = new.sort("_outside", "last_ingested_ns", "trace_id")
                    keep = max(1, int((new["spans"].cum_sum() <= self.max_round_spans).sum()))
                    deferred = new.slice(keep)
                    new = new.slice(0, keep).drop("_outside")
                    figures.deferred = deferred.height
                    figures.pending_spans += int(deferred["spans"].sum())
                    waiting = deferred.filter(~pl.col("_outside"))
                    figures.deferred_outside_window = deferred.height - waiting.height
                    if waiting.height:  # (the report's lag: of the traces its window will hold)
                        figures.oldest_deferred_ns = int(waiting["last_ingested_ns"].to_numpy().min())
                    # the next arrivals must see them again
                    cutoff_ns = min(cutoff_ns, int(deferred["last_ingested_ns"].to_numpy().min()))
                figures.settled_new = new.height
                self._add_batches(new)
            if retention_cutoff_ns is not None:
                expired = self.db.execute(
                    "SELECT batch, count(*) FROM traces WHERE last_end_ns < ? GROUP BY batch",
                    [retention_cutoff_ns],
                ).fetchall()
                if expired:
                    figures.expired_traces = sum(int(n) for _, n in expired)
                    self.db.execute("DELETE FROM traces WHERE last_end_ns < ?", [retention_cutoff_ns])
                    dirty.update(int(b) for b, _ in expired)
            self._forget(dirty)
            self.watermark = cutoff_ns
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('watermark', ?)", [cutoff_ns])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        memlog.note("arrivals committed")
        self._load_batches()
        self._forget(b for b in list(self.stored) if b not in self.batches)  # traces all expired
        figures.dirty_batches = len(dirty)
        figures.batches = len(self.batches)
        figures.traces = sum(len(b.trace_ids) for b in self.batches.values())
        figures.seconds["plan"] = time.perf_counter() - started
        figures.pending = pending.height + figures.deferred
        figures.pending_spans += int(pending["spans"].sum()) if pending.height else 0
        return figures

    def _in_window(self, new: pl.DataFrame, window_spans: int | None) -> pl.Series | None:
        """Which of the ``new`` settled traces the report's window of the newest
        ``window_spans`` span rows will hold, about as :meth:`_newest` cuts it (by latest span
        start, the stored batches' and these traces' together; an order of work, so an estimate
        is enough); None when every one will (no window, or all fit in it)."""
        if not window_spans or window_spans <= 0:
            return None
        times = np.concatenate(
            [
                new["last_start_ns"].to_numpy().astype(np.int64),
                np.array([b.newest_start_ns for b in self.batches.values()], dtype=np.int64),
            ]
        )
        spans = np.concatenate(
            [
                new["spans"].to_numpy().astype(np.int64),
                np.array([b.spans for b in self.batches.values()], dtype=np.int64),
            ]
        )
        if int(spans.sum()) <= window_spans:
            return None
        order = np.argsort(-times, kind="stable")
        held = np.cumsum(spans[order]) <= window_spans
        if not held.any():  # (the newest alone is more than the window: it is what the window holds)
            held[0] = True
        threshold = int(times[order][held].min())
        return new["last_start_ns"] >= threshold

    def _add_batches(self, new: pl.DataFrame) -> None:
        if new.height == 0:
            return
        first_id = int(self.db.execute("SELECT coalesce(max(batch), -1) + 1 FROM traces").fetchall()[0][0])
        ordered = new.sort("last_start_ns", "trace_id").with_columns(
            (pl.col("last_start_ns") // BUCKET_NS).alias("_bucket")
        )
        batch_of = np.empty(ordered.height, dtype=np.int64)
        batch, filled, bucket = first_id - 1, self.batch_spans, None
        for i, (b, n) in enumerate(
            zip(ordered["_bucket"].to_list(), ordered["spans"].to_list(), strict=True)
        ):
            if b != bucket or filled + n > self.batch_spans:
                batch, filled, bucket = batch + 1, 0, b
            filled += n
            batch_of[i] = batch
        rows = ordered.drop("_bucket").with_columns(pl.Series("batch", batch_of))
        self.db.register("new_traces", rows.to_arrow())
        self.db.execute(
            "INSERT INTO traces SELECT trace_id, batch, spans, first_ingested_ns, last_ingested_ns,"
            " last_start_ns, last_end_ns FROM new_traces"
        )
        self.db.unregister("new_traces")

    def ingested_ranges(self, trace_ids: list[str]) -> list[tuple[int, int]] | None:
        """Each of these traces' [first, last] ``ingested_ns`` as last seen settled (what its
        extraction read), or None when one of them is not a stored trace: a read of these traces
        by id then need only look at those ingest times (``scan_traces(ingested_ranges=...)``)."""
        wanted = sorted(set(trace_ids))
        if not wanted:
            return None
        rows = self.db.execute(
            "SELECT first_ingested_ns, last_ingested_ns FROM traces"
            " WHERE trace_id IN (SELECT unnest(?::VARCHAR[]))",
            [wanted],
        ).fetchall()
        if len(rows) != len(wanted):
            return None
        return [(int(first), int(last)) for first, last in rows]

    def units(
        self,
        since_ns: int | None,
        read_window: Callable[[list[str]], tuple[int, int]] | None = None,
        *,
        max_spans: int | None = None,
    ) -> tuple[Unit, ...]:
        """The partitions of a report: every batch; with ``since_ns`` the batches whose traces
        all have a span starting at or after it, plus one unit of the in-window traces of the
        batches that straddle it. With ``max_spans`` (serve's ``HOURGLASS_REPORT_MAX_SPANS``),
        a window of more spans than that is cut to its newest whole batches (:meth:`_newest`);
        :attr:`window` then says what was left out (None when nothing was)."""
        units = self._units(since_ns)
        self.window = None
        self.whole_window = since_ns is None
        if max_spans is not None and max_spans > 0 and units:
            units = self._newest(units, max_spans, whole=since_ns is None)
        return units

    def _newest(self, units: tuple[Unit, ...], max_spans: int, *, whole: bool) -> tuple[Unit, ...]:
        """``units`` cut to the newest stored batches (by their traces' latest span start, then
        batch id) whose span rows add up to at most ``max_spans`` (at least one batch), in batch
        order; as they are when they hold no more. What a round decides over then grows no
        more with the store (serve's rounds, for weeks under steady traffic: each round's
        decision reads every row of its window). Whole batches, not a time cut: a cut inside a
        batch would extract its newer traces again every round. A ``since`` window's edge unit
        (its in-window traces of batches that straddle the window's start, extracted on the fly)
        is left out of a cut; a window of such traces alone is not cut.

        ``whole`` (the rounds' report of the whole retention): the window moves in steps. A
        batch left out stays out (:attr:`left_out`, until the stored spans fit under the limit
        again; not kept over a restart), and a cut keeps ``CUT_KEEPS`` of ``max_spans``, so the
        window then grows with new batches for a while before the next cut. A decision that
        resumes from the last round's (the lock-convoy sweep's states of a resource key,
        ``BucketSweep``) resumes only over the same older batches: a window cut every round
        would make it start over every round."""
        stored = [(u.batch, u) for u in units if u.batch is not None and u.batch in self.batches]
        edge = [t for u in units if u.batch is None or u.batch not in self.batches for t in u.trace_ids]
        edge_spans = 0
        if edge:
            edge_spans = int(
                self.db.execute(
                    "SELECT coalesce(sum(spans), 0) FROM traces WHERE trace_id IN (SELECT unnest(?::VARCHAR[]))",
                    [edge],
                ).fetchall()[0][0]
            )
        total = edge_spans + sum(self.batches[b].spans for b, _ in stored)
        if total <= max_spans or not stored:
            if whole:
                self.left_out.clear()  # (everything fits again: nothing stays out)
            return units
        candidates = stored
        if whole:
            self.left_out &= set(self.batches)  # (batches retention emptied are gone)
            candidates = [(b, u) for b, u in stored if b not in self.left_out] or stored
            if len(candidates) == len(stored):
                self.left_out.clear()  # (every batch kept at the last cut is gone: cut afresh)
        if not whole:
            limit = max_spans
        elif sum(self.batches[b].spans for b, _ in candidates) > max_spans:
            limit = max(int(max_spans * CUT_KEEPS), 1)  # a step: the newest CUT_KEEPS of the limit
        else:
            limit = total  # (the batches not left out before: all of them)
        kept: list[tuple[int, Unit]] = []
        spans = 0
        for batch, unit in sorted(
            candidates, key=lambda pair: (-self.batches[pair[0]].newest_start_ns, -pair[0])
        ):
            if kept and spans + self.batches[batch].spans > limit:
                break
            kept.append((batch, unit))
            spans += self.batches[batch].spans
        kept.sort(key=lambda pair: pair[0])
        if whole:
            self.left_out |= {b for b, _ in stored} - {b for b, _ in kept}
        self.window = ReportWindow(
            max_spans=max_spans,
            spans=spans,
            spans_left_out=total - spans,
            traces_left_out=sum(len(u.trace_ids) for u in units) - sum(len(u.trace_ids) for _, u in kept),
            from_ns=min(self.batches[b].oldest_start_ns for b, _ in kept),
        )
        return tuple(unit for _, unit in kept)

    def _units(self, since_ns: int | None) -> tuple[Unit, ...]:
        if since_ns is None:
            return tuple(Unit(b.id, b.trace_ids, b.first, b.last) for _, b in sorted(self.batches.items()))
        rows = self.db.execute(
            "SELECT batch, min(last_start_ns) >= ?, max(last_start_ns) >= ? FROM traces GROUP BY batch ORDER BY batch",
            [since_ns, since_ns],
        ).fetchall()
        out: list[Unit] = []
        straddling: list[int] = []
        for b, all_in, any_in in rows:
            batch = self.batches[int(b)]
            if all_in:
                out.append(Unit(batch.id, batch.trace_ids, batch.first, batch.last))
            elif any_in:
                straddling.append(batch.id)
        if straddling:
            edge = self.db.execute(
                "SELECT list(trace_id ORDER BY trace_id), min(first_ingested_ns), max(last_ingested_ns) FROM traces"
                " WHERE list_contains(?, batch) AND last_start_ns >= ?",
                [straddling, since_ns],
            ).fetchall()[0]
            out.append(Unit(None, tuple(edge[0]), int(edge[1]), int(edge[2])))
        return tuple(out)


@dataclass(frozen=True)
class _StoreMarks:
    """A ``recent_arrivals`` answer's marks (its schema's metadata): the store's open (as a
    BIGINT hash), compactions that removed rows (count, and [count, bound] of the last ones) and
    retention cutoff (None: none yet)."""

    epoch: int
    removals: int
    removals_since: tuple[tuple[int, int | None], ...]
    retention: int | None

    @classmethod
    def of(cls, table: pa.Table) -> _StoreMarks:
        metadata = table.schema.metadata or {}
        epoch = int.from_bytes(hashlib.blake2b(metadata.get(b"epoch", b""), digest_size=7).digest(), "big")
        since = json.loads(metadata.get(b"removals_since", b"[]"))
        retention = metadata.get(b"retention", b"")
        return cls(
            epoch,
            int(metadata.get(b"removals", b"0")),
            tuple((int(n), None if b is None else int(b)) for n, b in since),
            int(retention) if retention else None,
        )

    def removed_since(self, kept: int | None) -> int | None:
        """The lowest bound of the compactions that removed rows after the ``kept``-th (2**63:
        none); None when unknown (no count kept, a compaction of every trace, or not listed)."""
        if kept is None or kept > self.removals:
            return None
        newer = [bound for n, bound in self.removals_since if n > kept]
        if len(newer) != self.removals - kept or any(b is None for b in newer):
            return None
        return min((b for b in newer if b is not None), default=2**63)


_SERVICES_SCHEMA = {"service": pl.String, "scope_name": pl.String, "trace_id": pl.String}


def _fold_services(total: pl.DataFrame | None, part: pl.DataFrame) -> pl.DataFrame:
    """The (service, scope_name) pairs of ``total`` and ``part``, each once with the least of
    their trace ids (as grouping every piece's pairs at once: a min of mins)."""
    both = part if total is None else pl.concat([total, part], how="vertical_relaxed")
    return both.group_by("service", "scope_name").agg(pl.col("trace_id").min())


def _summary(paths: PathRows | PathSummary | None) -> PathSummary | None:
    """A partition's critical-path rows as their per-endpoint aggregates (what a round decides)."""
    return summarize_path_rows(paths) if isinstance(paths, PathRows) else paths


def _rows_format_mark(formats: dict[str, int]) -> int:
    """One number for every kind's rows format (a stable hash, fits a BIGINT)."""
    text = ",".join(f"{kind}={formats[kind]}" for kind in sorted(formats)) + f",polars={pl.__version__}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "big")


def _store_file(sidecar: str) -> str:
    return sidecar[: -len(SIDECAR_SUFFIX)]


def _identity(sidecar: str) -> int:
    """The span store file's inode (a deleted and re-created store gets another one)."""
    try:
        return os.stat(_store_file(sidecar)).st_ino
    except OSError:
        return -1


class StateInUse(RuntimeError):
    """The sidecar is open in another process (another ``serve`` of the same store, or a worker
    that has not exited yet)."""


def _stored_identity(sidecar: str) -> int | None:
    """The store inode the sidecar was made for (None: unreadable, so not this store's). A sidecar
    another process holds open is not unreadable: that raises :class:`StateInUse` rather than
    let the caller remove a state that is in use (and then make a second file beside it)."""
    try:
        with duckdb.connect(sidecar, read_only=True) as db:
            rows = db.execute("SELECT value FROM meta WHERE key = 'store_inode'").fetchall()
    except duckdb.Error as e:
        text = str(e)
        # DuckDB's words for a file another process (or connection) holds; not any error that
        # mentions a block or a path with "lock" in it (a corrupt sidecar is rebuilt, as before)
        if (
            "Could not set lock on file" in text
            or "Conflicting lock" in text
            or "different configuration" in text
        ):
            raise StateInUse(
                f"incremental analysis: {sidecar} is open in another process, so its state is kept"
                f" and not analysed here ({text.splitlines()[0]})"
            ) from e
        return None
    return int(rows[0][0]) if rows else None


def _remove_state(sidecar: str) -> None:
    import shutil

    for path in (sidecar, sidecar + ".wal"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    shutil.rmtree(sidecar + ".d", ignore_errors=True)


def sidecar_path(db_location: str) -> str | None:
    """Where ``serve`` keeps the extraction state of a DuckDB store file (None: in memory)."""
    if (
        not db_location
        or db_location == ":memory:"
        or "://" in db_location
        or db_location.startswith("chdb:")
    ):
        return None
    return os.fspath(db_location) + SIDECAR_SUFFIX
