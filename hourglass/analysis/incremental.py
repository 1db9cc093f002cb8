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
   once and kept — in memory and in a sidecar DuckDB file, so a restart resumes from it — and its
   pricing (what-if savings and call durations of the findings' occurrences in the batch,
   ``partitions.price_part``) is cached per finding and per exact set of occurrences. A round
   therefore reads only the spans of new or dirty batches (twice: extraction, then pricing of
   the findings found in them), never the whole store.

The report is the same as ``analyze_partitioned`` over the same traces (and so as the at-once
analysis: ``tests/test_partitioned_analysis.py``), the endpoints' critical paths included: each
batch keeps its critical-path rows beside its detector rows.

A ``since`` window is the decision over the batches inside the window, plus the in-window traces
of batches that straddle its edge, extracted on the fly (not stored).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import Finding, Occurrence

if TYPE_CHECKING:
    from hourglass.analysis.batch_tasks import Cluster

log = logging.getLogger(__name__)

BUCKET_NS = 3600 * 10**9  # traces are batched by the hour of their latest span start
BATCH_SPANS = 100_000  # spans per batch at most (a batch is one extraction in the worker)
MAX_ROUND_SPANS = 300_000  # new spans extracted per round at most (the rest in the next rounds)
SIDECAR_SUFFIX = ".analysis.duckdb"

# (trace ids, first ingested_ns, last ingested_ns, since_ns) -> the spans of those whole traces
ReadBatch = Callable[[list[str], int | None, int | None], pa.Table]
ReadTraces = Callable[[list[str]], pa.Table]
Arrivals = Callable[[int], pa.Table]


@dataclass
class Batch:
    """Whole traces extracted together; ``first``/``last`` bound their spans' ``ingested_ns``."""

    id: int
    trace_ids: list[str]
    first: int
    last: int


@dataclass(frozen=True)
class Unit:
    """One partition of a round: a stored batch, or in-window traces extracted on the fly."""

    batch: int | None
    trace_ids: tuple[str, ...]
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


def _occurrence_key(finding_id: str, occurrences: list[Occurrence], calls: bool) -> str:
    """What a finding's pricing in one batch depends on: its occurrences there (spans and
    interventions) and whether call durations are asked for."""
    digest = hashlib.sha1(finding_id.encode())
    digest.update(b"calls" if calls else b"-")
    for occ in occurrences:
        digest.update(repr((occ.trace_id, occ.span_ids, occ.interventions)).encode())
    return digest.hexdigest()


class MemoExecutor:
    """Runs a round's partition tasks in this process, remembering each stored batch's
    extraction and its pricing per finding, so only new or dirty batches are read. The context
    of a batch extracted in this round is kept for its pricing in the same round (no second read
    and repair), so a round holds the contexts of its new batches (at most ``max_round_spans``).

    With a ``cluster`` (``serve --cluster``, :mod:`hourglass.analysis.batch_tasks`) the batches to
    extract or price are read here and run as Dask tasks, a round's worth submitted together
    (:meth:`_on_cluster`); the spans of the batches extracted are kept (as Arrow tables, not
    contexts) for the round's pricing."""

    workers = 1

    def __init__(
        self, state: IncrementalAnalysis, units: tuple[Unit, ...], cluster: Cluster | None = None
    ) -> None:
        self.state, self.units = state, units
        self.read_units = 0  # partitions whose spans were read this round (a figure for status)
        self.contexts: dict[int, AnalysisContext] = {}
        self._unit_of: dict[str, int] | None = None
        self.cluster = cluster
        self.tables: dict[int, pa.Table] = {}  # with a cluster: the spans read this round
        self._done: dict[tuple[str, int], Any] = {}  # with a cluster: (phase, part) -> the task's result

    def map(
        self,
        phase: str,
        fn: Callable[..., Any],
        calls: list[tuple[Any, ...]],
        progress: partitions.Progress | None,
    ) -> list[Any]:
        if fn is partitions.extract_part:
            if self.cluster is not None:
                todo = [args for args in calls if self._stored(self.units[args[1]]) is None]
                self._on_cluster("extracting", todo, lambda args: ())
            return [self._extracted(args) for args in calls]
        if fn is partitions.price_part:
            if not calls:
                return []
            findings, with_calls = calls[0][3], calls[0][4]
            grouped = self._group(findings)
            if self.cluster is not None:
                missing = {
                    args[1]: self._missing(args, grouped.get(args[1], {}), with_calls)[2] for args in calls
                }
                todo = [args for args in calls if missing[args[1]]]
                self._on_cluster("pricing", todo, lambda args: (missing[args[1]], with_calls))
            return [self._priced(args, grouped.get(args[1], {}), with_calls) for args in calls]
        raise RuntimeError(f"incremental analysis: unexpected partition task {fn!r} ({phase})")

    def idle(self) -> None:
        """Nothing to stop: the round's tasks run in this process."""

    def _group(self, findings: list[Finding]) -> dict[int, dict[str, tuple[Finding, list[Occurrence]]]]:
        """unit -> finding id -> (finding, its occurrences in that unit's traces)."""
        if self._unit_of is None:
            self._unit_of = {t: i for i, unit in enumerate(self.units) for t in unit.trace_ids}
        out: dict[int, dict[str, tuple[Finding, list[Occurrence]]]] = {}
        for finding in findings:
            for occ in finding.occurrences:
                unit = self._unit_of.get(occ.trace_id)
                if unit is not None:
                    out.setdefault(unit, {}).setdefault(finding.id, (finding, []))[1].append(occ)
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

    def _context(self, source: Any, part: int) -> AnalysisContext:
        ctx = self.contexts.get(part)
        if ctx is None:
            self.read_units += 1
            ctx = self._retrying(
                "reading", part, lambda: AnalysisContext.from_table(source.load(part, len(self.units)))
            )
        return ctx

    def _on_cluster(
        self, phase: str, todo: list[tuple[Any, ...]], extra: Callable[[tuple[Any, ...]], tuple[Any, ...]]
    ) -> None:
        """The ``todo`` partition tasks of ``phase`` as Dask tasks, a round's worth of batches
        (``max_round_spans``) submitted at a time, their spans read here as they are submitted;
        the results wait in ``_done`` for :meth:`_extract` / :meth:`_price`. The spans of the
        batches extracted are kept for their pricing in this round; those read only to price
        stored batches (the findings changed) are dropped after their tasks, so however many
        batches a new finding touches, a round holds a bounded share of them."""
        from hourglass.analysis import batch_tasks

        assert self.cluster is not None
        fn = batch_tasks.extract_table if phase == "extracting" else batch_tasks.price_table
        keep = phase == "extracting"

        def jobs(chunk: list[tuple[Any, ...]]) -> Iterator[tuple[str, int, pa.Table, tuple[Any, ...]]]:
            for args in chunk:
                source, part = args[0], args[1]
                table = self.tables.get(part)
                if table is None:
                    self.read_units += 1
                    table = self._retrying(
                        "reading", part, functools.partial(source.load, part, len(self.units))
                    )
                    if keep:
                        self.tables[part] = table
                yield self._label(part), part, table, extra(args)

        step = max(1, self.state.max_round_spans // max(1, self.state.batch_spans))
        for start in range(0, len(todo), step):
            done = self.cluster.run(phase, fn, jobs(todo[start : start + step]), len(self.units))
            self._done.update({(phase, part): result for part, result in done.items()})

    def _label(self, part: int) -> str:
        unit = self.units[part]
        where = f"batch {unit.batch}" if unit.batch is not None else "the window's edge traces"
        return f"{where} ({len(unit.trace_ids)} traces, partition {part + 1}/{len(self.units)})"

    def _stored(self, unit: Unit) -> partitions.PartResult | None:
        """The stored extraction of ``unit``'s batch (None: not stored, or not a stored batch)."""
        return self.state.extracted.get(unit.batch) if unit.batch is not None else None

    def _extract(self, source: Any, part: int) -> partitions.PartResult:
        """One partition's extraction: the cluster's result, else here (compacted: a batch's rows
        stay in memory for the rounds to come, without its spans)."""
        if self.cluster is not None:
            result: partitions.PartResult = self._done.pop(("extracting", part))
            return result
        ctx = self._context(source, part)
        result = self._retrying("extracting", part, lambda: partitions.part_result(part, ctx))
        self.contexts[part] = ctx  # for the pricing of this round
        return result

    def _price(self, source: Any, part: int, missing: list[Finding], calls: bool) -> partitions.Priced:
        """``missing``'s pricing in one partition: the cluster's result, else here."""
        if self.cluster is not None:
            priced: partitions.Priced = self._done.pop(("pricing", part))
            return priced
        from hourglass.analysis.batch_tasks import priced_in

        ctx = self._context(source, part)
        return self._retrying("pricing", part, lambda: priced_in(ctx, missing, calls))

    def _extracted(self, args: tuple[Any, ...]) -> partitions.PartResult:
        source, part = args[0], args[1]  # (source, part, parts[, spill]): nothing spills here
        unit = self.units[part]
        stored = self._stored(unit)
        if stored is not None:
            return stored
        result = self._extract(source, part)
        if unit.batch is not None:
            self.state.store_extraction(unit.batch, result)
        return result

    def _missing(
        self, args: tuple[Any, ...], here: dict[str, tuple[Finding, list[Occurrence]]], calls: bool
    ) -> tuple[dict[str, PricedEntry], dict[str, str], list[Finding]]:
        """(the unit's pricing cache, each finding's occurrence key, the findings not priced yet)."""
        unit = self.units[args[1]]
        cache = self.state.priced.setdefault(unit.batch, {}) if unit.batch is not None else {}
        keys = {fid: _occurrence_key(fid, occs, calls) for fid, (_, occs) in here.items()}
        missing = [f for fid, (f, _) in here.items() if fid not in cache or cache[fid][0] != keys[fid]]
        return cache, keys, missing

    def _priced(
        self, args: tuple[Any, ...], here: dict[str, tuple[Finding, list[Occurrence]]], calls: bool
    ) -> partitions.Priced:
        source, part = args[0], args[1]
        unit = self.units[part]
        cache, keys, missing = self._missing(args, here, calls)
        if missing:
            fresh = self._price(source, part, missing, calls)
            for f in missing:
                cache[f.id] = (keys[f.id], fresh.impacts.get(f.id), fresh.calls.get(f.id))
            if unit.batch is not None:
                self.state.store_pricing(unit.batch, {f.id: cache[f.id] for f in missing})
        impacts = {fid: cache[fid][1] for fid in here if cache[fid][1] is not None}
        durations = {fid: cache[fid][2] for fid in here if cache[fid][2] is not None}
        return partitions.Priced(impacts, durations)

    def close(self) -> None:
        self.contexts.clear()
        self.tables.clear()
        self._done.clear()


PricedEntry = tuple[str, Any, Any]  # (occurrence key, PricedImpact | None, call durations | None)


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
    oldest_deferred_ns: int | None = None  # last span arrival of the earliest-settled one of them
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
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


class IncrementalAnalysis:
    """The extraction state of one span store (see the module doc), kept in ``sidecar`` (a DuckDB
    file; None: in memory only)."""

    def __init__(
        self, sidecar: str | None, *, batch_spans: int = BATCH_SPANS, max_round_spans: int = MAX_ROUND_SPANS
    ) -> None:
        self.batch_spans = batch_spans
        self.max_round_spans = max_round_spans
        self.sidecar = sidecar
        if sidecar and os.path.exists(sidecar) and _identity(sidecar) != _stored_identity(sidecar):
            # the span store was deleted and created again: this state describes other traces
            log.warning("incremental analysis: %s belongs to another store file; starting afresh", sidecar)
            _remove_state(sidecar)
        self.db = duckdb.connect(sidecar or ":memory:")
        self.db.execute("SET threads TO 1")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS traces (trace_id VARCHAR PRIMARY KEY, batch BIGINT, spans BIGINT,"
            " first_ingested_ns BIGINT, last_ingested_ns BIGINT, last_start_ns BIGINT, last_end_ns BIGINT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value BIGINT)")
        watermark = self.db.execute("SELECT value FROM meta WHERE key = 'watermark'").fetchall()
        self.watermark = int(watermark[0][0]) if watermark else 0
        # Each batch's extraction and pricing are pickles in a folder beside the sidecar (DuckDB
        # binds a large BLOB parameter slowly: 8 s for one 100k-span batch's rows).
        self.folder = Path(sidecar + ".d") if sidecar else None
        if self.folder is not None:
            self.folder.mkdir(exist_ok=True)
        self.extracted: dict[int, partitions.PartResult] = {}
        self.priced: dict[int, dict[str, PricedEntry]] = {}
        for path in sorted(self.folder.glob("*.pickle")) if self.folder is not None else ():
            kind, _, number = path.stem.partition("-")
            try:
                loaded = pickle.loads(path.read_bytes())
            except Exception:  # a file cut short by a crash: that batch is extracted again
                log.warning("incremental analysis: %s unreadable; its batch is extracted again", path)
                path.unlink(missing_ok=True)
                continue
            if kind == "extracted":
                self.extracted[int(number)] = loaded
            elif kind == "priced":
                self.priced[int(number)] = loaded
        # per batch: its traces and their ingest-time bounds, rebuilt from the traces table
        self.batches: dict[int, Batch] = {}
        self._load_batches()
        self.last = RoundFigures()
        if sidecar:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('store_inode', ?)", [_identity(sidecar)])

    def _load_batches(self) -> None:
        rows = self.db.execute(
            "SELECT batch, list(trace_id ORDER BY trace_id), min(first_ingested_ns), max(last_ingested_ns)"
            " FROM traces GROUP BY batch"
        ).fetchall()
        self.batches = {int(b): Batch(int(b), list(ids), int(lo), int(hi)) for b, ids, lo, hi in rows}

    # -- persistence -------------------------------------------------------------------------

    def _write(self, name: str, value: Any) -> None:
        if self.folder is None:
            return
        path = self.folder / f"{name}.pickle"
        partial = path.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(value, protocol=5))
        partial.replace(path)  # whole or not at all

    def store_extraction(self, batch: int, result: partitions.PartResult) -> None:
        self.extracted[batch] = result
        self._write(f"extracted-{batch}", result)

    def store_pricing(self, batch: int, entries: dict[str, PricedEntry]) -> None:
        del entries  # already in self.priced[batch]; the batch's pricing is written whole
        self._write(f"priced-{batch}", self.priced.get(batch, {}))

    def _forget(self, batches: Iterable[int]) -> None:
        for b in sorted(set(batches)):
            self.extracted.pop(b, None)
            self.priced.pop(b, None)
            if self.folder is not None:
                for kind in ("extracted", "priced"):
                    (self.folder / f"{kind}-{b}.pickle").unlink(missing_ok=True)

    def close(self) -> None:
        self.db.close()

    # -- one round ---------------------------------------------------------------------------

    def update(
        self, arrivals: Arrivals, *, cutoff_ns: int, margin_ns: int, retention_cutoff_ns: int | None
    ) -> RoundFigures:
        """Bring the batches up to date with the store: new settled traces batched, batches with
        late spans or expired traces marked for re-extraction."""
        figures = RoundFigures()
        started = time.perf_counter()
        seen = pl.from_arrow(arrivals(max(self.watermark - margin_ns, 0)))
        assert isinstance(seen, pl.DataFrame)
        figures.seconds["arrivals"] = time.perf_counter() - started
        started = time.perf_counter()
        settled = seen.filter(pl.col("last_ingested_ns") < cutoff_ns)
        pending = seen.filter(pl.col("last_ingested_ns") >= cutoff_ns)
        dirty: set[int] = set()
        self.db.execute("BEGIN")
        try:
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
                # a late span: the trace keeps its batch, with its new figures
                self.db.execute(
                    "UPDATE traces SET spans = s.spans, first_ingested_ns = s.first_ingested_ns,"
                    " last_ingested_ns = s.last_ingested_ns, last_start_ns = s.last_start_ns,"
                    " last_end_ns = s.last_end_ns FROM settled_now s WHERE traces.trace_id = s.trace_id"
                )
                self.db.unregister("settled_now")
                if new.height and new["spans"].sum() > self.max_round_spans:
                    # a bounded round (memory, and a report that keeps refreshing): the traces that
                    # settled first now, the others in the next rounds
                    new = new.sort("last_ingested_ns", "trace_id")
                    keep = max(1, int((new["spans"].cum_sum() <= self.max_round_spans).sum()))
                    deferred = new.slice(keep)
                    new = new.slice(0, keep)
                    figures.deferred = deferred.height
                    figures.pending_spans += int(deferred["spans"].sum())
                    figures.oldest_deferred_ns = int(deferred["last_ingested_ns"].to_numpy().min())
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
        self._load_batches()
        for b in list(self.extracted):  # batches whose traces all expired
            if b not in self.batches:
                self._forget([b])
        figures.dirty_batches = len(dirty)
        figures.batches = len(self.batches)
        figures.traces = sum(len(b.trace_ids) for b in self.batches.values())
        figures.seconds["plan"] = time.perf_counter() - started
        figures.pending = pending.height + figures.deferred
        figures.pending_spans += int(pending["spans"].sum()) if pending.height else 0
        return figures

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

    def units(
        self, since_ns: int | None, read_window: Callable[[list[str]], tuple[int, int]] | None = None
    ) -> tuple[Unit, ...]:
        """The partitions of a report: every batch; with ``since_ns`` the batches whose traces
        all have a span starting at or after it, plus one unit of the in-window traces of the
        batches that straddle it."""
        if since_ns is None:
            return tuple(
                Unit(b.id, tuple(b.trace_ids), b.first, b.last) for _, b in sorted(self.batches.items())
            )
        rows = self.db.execute(
            "SELECT batch, min(last_start_ns) >= ?, max(last_start_ns) >= ? FROM traces GROUP BY batch ORDER BY batch",
            [since_ns, since_ns],
        ).fetchall()
        out: list[Unit] = []
        straddling: list[int] = []
        for b, all_in, any_in in rows:
            batch = self.batches[int(b)]
            if all_in:
                out.append(Unit(batch.id, tuple(batch.trace_ids), batch.first, batch.last))
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

    def settled_in_report(self) -> int:
        return sum(len(self.batches[b].trace_ids) for b in self.extracted if b in self.batches)


def _store_file(sidecar: str) -> str:
    return sidecar[: -len(SIDECAR_SUFFIX)]


def _identity(sidecar: str) -> int:
    """The span store file's inode (a deleted and re-created store gets another one)."""
    try:
        return os.stat(_store_file(sidecar)).st_ino
    except OSError:
        return -1


def _stored_identity(sidecar: str) -> int | None:
    try:
        with duckdb.connect(sidecar, read_only=True) as db:
            rows = db.execute("SELECT value FROM meta WHERE key = 'store_inode'").fetchall()
    except duckdb.Error:
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
