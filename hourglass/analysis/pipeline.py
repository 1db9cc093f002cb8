"""The analysis entry point: spans in, ``hourglass.report/v1`` out.

``analyze(table_or_frame, *, writer=None, services=None, since_ns=None, explain=False)`` runs, in order:
selection (whole traces that touch ``services`` / have a span starting at or after ``since_ns``), trace repair and
critical path (:class:`hourglass.analysis.context.AnalysisContext`), every detector in
:data:`hourglass.analysis.detectors.DETECTORS`, what-if savings (:mod:`hourglass.analysis.whatif`), ranking
(:mod:`hourglass.analysis.ranking`) and the writer (the offline template writer when ``writer`` is None). A
writer that fails falls back to the template writer and the report says why.

Floors (:func:`score_findings`): a finding is reported only when a person would act on it.

* Confidence at least ``MIN_REPORTED_CONFIDENCE`` (0.2).
* A parallelization finding must save something at the root (a pattern off the critical path saves
  nothing), and its p95 saving per affected request must clear both

  - the **absolute floor of its kind**, :data:`MIN_SAVING_BY_KIND` (below it nobody rewrites code:
    the gain is within timer noise and run-to-run jitter), and
  - the **relative rule**: at least ``MIN_SAVING_SHARE`` (1 %, the detectors' own relative rule) of the median root duration of the
    affected requests — a few ms of a 2 s request is noise, while a 2 × 3 s sequence (3 s saved
    of 6 s) is not.

Every candidate dropped here is recorded as a near miss (``AnalysisContext.note_near_miss``) with
the rule and the measured value, for ``--explain``.

Also here: :class:`ContextView`, the read-only ``hourglass.analysis.writer.WriterContext`` over an analysis
(for writers that look things up), and :func:`trace_detail` for the REST API's trace view.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis import memlog, partitions, planning
from hourglass.analysis.context import AnalysisContext, to_analysis_frame
from hourglass.analysis.detectors import DETECTORS
from hourglass.analysis.detectors._common import NearMissSink
from hourglass.analysis.model import Finding, NearMiss, NearMissLog, TraceRoots
from hourglass.analysis.ranking import Scored, expected_value_ms, measured_cost, rank
from hourglass.analysis.report import MAX_EXEMPLAR_TRACES, build_report
from hourglass.analysis.spill import Spill
from hourglass.analysis.trace_index import TraceIndex
from hourglass.analysis.whatif import Impact, WhatIf
from hourglass.analysis.writer import Writer, WriterContext
from hourglass.analysis.writers import template_writer

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_REPORTED_SAVING_NS = 500_000  # below every kind's floor; kept for callers that import it
# Absolute floors on the p95 saving per affected request at the root, by kind (nanoseconds). One
# table for every parallelization detector (the detectors' own 1 ms / 1 % rules find candidates;
# these decide what is worth a reader's time). Reasons:
MIN_SAVING_BY_KIND: dict[str, int] = {
    # Issuing calls together costs futures, error handling and ordering care; under 2 ms per request
    # that is less than the jitter of one network round trip.
    "serialized_calls": 2_000_000,
    # A batch endpoint or a bulk query changes an API or a schema: worth it from 2 ms per request.
    "n_plus_one": 2_000_000,
    # Hedging or rebalancing adds load and moving parts; the detector already needs a 5 ms excess.
    "fanout_straggler": 5_000_000,
    # Raising a pool cap adds downstream load; 2 ms per request is the least that pays for it.
    "fanout_concurrency_limit": 2_000_000,
    # A lock wait is pure waste and the fix (shorter critical section) is local: 1 ms is enough.
    "lock_contention": 1_000_000,
}
# Kinds not in the table (new detectors) use this floor until they get their own row.
DEFAULT_MIN_SAVING_NS = 2_000_000
# The relative rule: the p95 saving must be at least this share of the median request (root) duration,
# unless it is at least MIN_CALLER_SHARE of the operation that must change (evidence.caller_share_p50).
MIN_SAVING_SHARE = 0.01
MIN_CALLER_SHARE = 0.25
# Below this a detector is saying "probably not a problem" (e.g. failures that a fallback almost
# always contains); a recommendation that weak costs a reader more than it offers.
MIN_REPORTED_CONFIDENCE = 0.2


def select_traces(
    frame: pl.DataFrame, *, services: list[str] | None = None, since_ns: int | None = None
) -> pl.DataFrame:
    """Whole traces with at least one span in ``services`` and one span starting at or after
    ``since_ns`` (the store's ``scan`` selects the same way, so files and store agree)."""
    if services:
        keep = frame.filter(pl.col("service").is_in(list(services))).select("trace_id").unique()
        frame = frame.join(keep, on="trace_id", how="semi")
    if since_ns is not None:
        keep = frame.filter(pl.col("start_ns") >= since_ns).select("trace_id").unique()
        frame = frame.join(keep, on="trace_id", how="semi")
    return frame


# The detectors run in two threads ("lanes"): most of their time is in polars and numpy, which
# release the GIL, and much of it is single-threaded, so on 2 cores a second lane overlaps it
# (measured at 1M spans, best of 4 on a shared machine: 1.54 s -> 1.37 s for all detectors).
# Detectors that share a cached intermediate stay in one lane, in order: serialized_calls builds
# call_children for n_plus_one, which builds repeated_calls for batchable_calls; both fan-out detectors
# share the sibling groups (all ctx.cached).
# A detector not listed runs in the first lane. Findings are assembled in DETECTORS order, so the
# report does not depend on which lane finished first.
DETECTOR_LANES: tuple[tuple[str, ...], ...] = (
    (
        "serialized_calls",
        "n_plus_one",
        "batchable_calls",
        "retry_without_backoff",
        "error_propagation",
        "missing_timeout",
    ),
    ("fanout_straggler", "fanout_concurrency_limit", "lock_contention"),
)


def _run_lane(ctx: AnalysisContext, kinds: list[str]) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for kind in kinds:
        try:
            out[kind] = DETECTORS[kind](ctx)
        except Exception as exc:  # the whole analysis fails, naming the detector
            raise RuntimeError(f"detector {kind!r} failed: {exc}") from exc
    return out


def run_detectors(ctx: AnalysisContext) -> list[Finding]:
    lanes = [[k for k in lane if k in DETECTORS] for lane in DETECTOR_LANES]
    listed = {k for lane in lanes for k in lane}
    lanes[0].extend(k for k in DETECTORS if k not in listed)
    with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="hourglass-detectors") as pool:
        futures = [pool.submit(_run_lane, ctx, lane) for lane in lanes if lane]
        found: dict[str, list[Finding]] = {}
        for future in futures:
            found.update(future.result())
    for key in [k for k in ctx.cache if k.startswith("repeated_calls/")]:  # read by detectors only
        del ctx.cache[key]
    return [finding for kind in DETECTORS for finding in found[kind]]


def _affected_roots(traces: pl.DataFrame | TraceRoots, trace_ids: list[str] | pl.Series) -> pl.DataFrame:
    """trace_id and root duration (ms) of ``trace_ids`` (``traces``: ``AnalysisContext.traces``,
    or its columns held compact: ``serve``'s round)."""
    if isinstance(traces, TraceRoots):
        return traces.roots_of(trace_ids)
    ids = pl.Series(trace_ids, dtype=pl.String).implode()
    return traces.filter(pl.col("trace_id").is_in(ids)).select(
        "trace_id", root_ms=pl.col("root_duration_ns") / 1e6
    )


def _fmt_ms(value_ms: float) -> str:
    return f"{value_ms:.3g} ms" if value_ms < 10 else f"{value_ms:,.0f} ms"


def saving_floor_reason(
    kind: str, saved_p95_ms: float, median_root_ms: float, caller_share: float | None = None
) -> str | None:
    """Why a parallelization saving is below the floors (None when it clears them).
    ``caller_share``: the saving's share of the operation that must change (``evidence.
    caller_share_p50``); at ``MIN_CALLER_SHARE`` or more the relative rule is waived — a loop that
    is a quarter of its endpoint is worth fixing even deep inside a long request."""
    floor_ms = MIN_SAVING_BY_KIND.get(kind, DEFAULT_MIN_SAVING_NS) / 1e6
    if saved_p95_ms < floor_ms:
        return f"p95 saving {_fmt_ms(saved_p95_ms)} < {_fmt_ms(floor_ms)} floor for {kind}"
    relative_ms = MIN_SAVING_SHARE * median_root_ms
    if saved_p95_ms < relative_ms and (caller_share is None or caller_share < MIN_CALLER_SHARE):
        return (
            f"p95 saving {_fmt_ms(saved_p95_ms)} < {MIN_SAVING_SHARE:.0%} of the {_fmt_ms(median_root_ms)} "
            f"median request ({_fmt_ms(relative_ms)})"
        )
    return None


def _drop(notes: NearMissSink, finding: Finding, reason: str) -> None:
    exemplar = finding.occurrences[0] if finding.occurrences else None
    notes.note_near_miss(
        finding.kind,
        finding.service,
        finding.operation,
        reason,
        trace_ids=finding.trace_ids[:5],
        span_ids=exemplar.span_ids if exemplar is not None else (),
        traces=len(finding.trace_ids),
    )


def score_findings(ctx: AnalysisContext, findings: list[Finding]) -> list[Scored]:
    """Prices every finding (:mod:`hourglass.analysis.ranking`) and applies the floors (module docstring);
    dropped findings become near misses. The what-if engine re-times ``ctx``'s traces."""
    whatif = WhatIf.of(ctx) if findings else None

    def impact_of(finding: Finding) -> Impact | None:
        if whatif is None or not finding.occurrence_table.any_interventions():
            return None
        return whatif.impact(finding)

    return score(findings, impact_of=impact_of, traces=ctx.traces, notes=ctx)


def score(
    findings: list[Finding],
    *,
    impact_of: Callable[[Finding], Impact | None],
    traces: pl.DataFrame | TraceRoots,
    notes: NearMissSink,
) -> list[Scored]:
    """:func:`score_findings` given each finding's what-if impact (computed over the whole, or
    partition by partition) and the trace summaries (``AnalysisContext.traces``)."""
    scored: list[Scored] = []
    for finding in findings:
        if finding.confidence < MIN_REPORTED_CONFIDENCE:
            _drop(notes, finding, f"confidence {finding.confidence:.2f} < {MIN_REPORTED_CONFIDENCE} floor")
            continue
        impact = impact_of(finding)
        # (its traces as one String series, not a Python string each: 10^5 traces at 12M stored spans)
        roots = _affected_roots(traces, finding.occurrence_table.unique_trace_series())
        median = roots["root_ms"].median() if roots.height else None
        median_root = float(median) if isinstance(median, int | float) else 0.0
        if finding.category == "parallelization":
            if impact is None or impact.saved_ns.size == 0 or impact.total_ns <= 0:
                _drop(notes, finding, "no saving at the root: the pattern is off the critical path")
                continue
            reason = saving_floor_reason(
                finding.kind,
                float(np.percentile(impact.saved_ns, 95)) / 1e6,
                median_root,
                finding.evidence.get("caller_share_p50"),
            )
            if reason is not None:
                _drop(notes, finding, reason)
                continue
        cost = None
        if finding.category == "fault_tolerance":  # per-trace roots only where a cost is measured
            by_trace = dict(zip(roots["trace_id"].to_list(), roots["root_ms"].to_list(), strict=True))
            cost = measured_cost(finding, impact, by_trace, median_root)
        sc, has_latency = expected_value_ms(finding, impact, cost)
        scored.append(Scored(finding, impact, sc, has_latency, cost))
    return rank(scored)


def write_texts(report: dict[str, Any], writer: Writer | None, view: WriterContext) -> None:
    recs = report["recommendations"]
    chosen = writer or template_writer()
    fallback_reason: str | None = None
    try:
        outcome = chosen.write(recs, view)
    except Exception as exc:
        if writer is None or getattr(chosen, "name", "") == "template":
            raise
        log.warning("writer %s failed, using the template writer: %s", getattr(chosen, "name", chosen), exc)
        fallback_reason = f"{getattr(chosen, 'name', 'writer')} failed: {exc}"
        outcome = template_writer().write(recs, view)
    missing = [r for r in recs if r["id"] not in outcome.texts]
    if missing:  # a writer that skipped some recommendations: fill them from the templates
        filled = template_writer().write(missing, view)
        outcome.texts.update(filled.texts)
        fallback_reason = (
            fallback_reason
            or outcome.fallback_reason
            or (f"{len(missing)} recommendation(s) written by the template writer")
        )
    for rec in recs:
        text = outcome.texts[rec["id"]]
        rec["title"], rec["summary"], rec["actions"] = text.title, text.summary, list(text.actions)
        if text.design is not None:
            rec["design"] = text.design
    report["writer"] = {"name": outcome.writer, "fallback_reason": fallback_reason or outcome.fallback_reason}
    if outcome.metadata:
        report["writer"]["metadata"] = outcome.metadata


def service_edges(ctx: AnalysisContext) -> pl.DataFrame:
    """Every span called from another service: service, name, duration_ns, parent_service, parent_name."""
    return (
        ctx.with_parent(
            ctx.spans.filter(pl.col("parent_row").is_not_null()).select(
                "parent_row", "service", "name", "duration_ns"
            )
        )
        .filter(pl.col("service") != pl.col("parent_service"))
        .select("service", "name", "duration_ns", "parent_service", "parent_name")
    )


def add_workstreams(
    report: dict[str, Any],
    ctx: AnalysisContext,
    ranked: list[Scored],
    resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """``report["workstreams"]``: the plan of :mod:`hourglass.analysis.workstreams` (empty if it fails)."""
    from hourglass.analysis.workstreams import build_workstreams

    try:
        report["workstreams"] = build_workstreams(ctx, ranked, report, resources)
    except Exception:
        log.exception("the workstream plan failed")
        report["workstreams"] = []


class ContextView:
    """Read-only views of an analysis for writers (implements ``hourglass.analysis.writer.WriterContext``)."""

    def __init__(
        self,
        ctx: AnalysisContext,
        report: dict[str, Any],
        ranked: list[Scored] | None = None,
        resources: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.ctx = ctx
        self._recs = {r["id"]: r for r in report.get("recommendations", [])}
        self._scored = {s.finding.id: s for s in ranked or []}
        self.resources = resources or {}
        self._facts: dict[str, dict[str, Any] | None] = {}

    def design_facts(self, recommendation_id: str) -> dict[str, Any] | None:
        """Language, exemplar sequence diagrams and predicted root latencies for a recommendation's
        design (:func:`hourglass.analysis.sequence.design_facts`), computed once per recommendation."""
        if recommendation_id not in self._facts:
            from hourglass.analysis.sequence import design_facts

            rec, scored = self._recs.get(recommendation_id), self._scored.get(recommendation_id)
            facts = None
            if rec is not None and scored is not None:
                try:
                    ctx = self._context_of(rec)
                    facts = design_facts(ctx, scored.finding, scored.impact, rec, self.resources)
                    del ctx
                except Exception:  # a design without diagrams beats no report
                    log.exception("design facts of %s failed", recommendation_id)
                finally:
                    # the columns of its parked occurrences that the exemplars' re-timing read back
                    # (its trace ids, spans and interventions: at 12M stored spans up to ~12 MiB a
                    # finding) let go before the next recommendation's, not held until every
                    # text is written (serve's round; nothing for occurrences in memory)
                    scored.finding.occurrence_table.release()
            self._facts[recommendation_id] = facts
        return self._facts[recommendation_id]

    def _context_of(self, rec: Mapping[str, Any]) -> AnalysisContext:
        """The context a recommendation's design reads its exemplar traces from."""
        return self.ctx

    def finding_evidence(self, recommendation_id: str) -> dict[str, Any] | None:
        rec = self._recs.get(recommendation_id)
        if rec is None:
            return None
        keys = ("id", "kind", "category", "service", "operation", "targets", "traces_affected", "occurrences")
        return {
            **{k: rec[k] for k in keys},
            "impact": rec["impact"],
            "confidence": rec["confidence"],
            "evidence": rec["evidence"],
        }

    def trace_spans(self, trace_id: str) -> pl.DataFrame:
        """The repaired spans of one trace (with critical-path columns)."""
        return self.ctx.trace_spans(trace_id)

    def service_edges(self) -> pl.DataFrame:
        """Every cross-service call: service, name, duration_ns, parent_service, parent_name."""
        edges = self.ctx.cache.get("service_edges")
        if not isinstance(edges, pl.DataFrame):
            edges = service_edges(self.ctx)
            self.ctx.cache["service_edges"] = edges
        return edges

    def critical_path(self, trace_id: str) -> list[dict[str, Any]] | None:
        spans = self.trace_spans(trace_id)
        if spans.height == 0:
            return None
        path = spans.filter(pl.col("on_critical_path")).sort(["depth", "start_ns"])
        return [
            {
                "span_id": r["span_id"],
                "service": r["service"],
                "name": r["name"],
                "depth": r["depth"],
                "duration_ms": round(r["duration_ns"] / 1e6, 3),
                "self_ms": round(r["critical_ns"] / 1e6, 3),
            }
            for r in path.iter_rows(named=True)
        ]

    def service_neighbours(self, service: str) -> dict[str, list[dict[str, Any]]]:
        edges = self.service_edges()

        def summarise(frame: pl.DataFrame, svc: str, op: str) -> list[dict[str, Any]]:
            agg = (
                frame.group_by(svc, op)
                .agg(pl.len().alias("calls"), (pl.col("duration_ns").median() / 1e6).alias("p50_ms"))
                .sort(["calls", svc, op], descending=[True, False, False])
                .head(50)
            )
            return [
                {"service": s, "operation": o, "calls": int(c), "p50_ms": round(float(p or 0), 3)}
                for s, o, c, p in agg.iter_rows()
            ]

        callers = summarise(edges.filter(pl.col("service") == service), "parent_service", "parent_name")
        callees = summarise(edges.filter(pl.col("parent_service") == service), "service", "name")
        return {"callers": callers, "callees": callees}


def uncovered_near_misses(near_misses: list[NearMiss], ranked: list[Scored]) -> list[NearMiss]:
    """Near misses of a (kind, service, operation) that is not reported: a reported one covers
    them (e.g. an explicit lock wait reported, its inferred convoy dropped)."""
    reported = {(s.finding.kind, s.finding.service, s.finding.operation) for s in ranked}
    return [m for m in near_misses if (m.kind, m.service, m.operation) not in reported]


def analyze_context(
    ctx: AnalysisContext,
    *,
    writer: Writer | None = None,
    explain: bool = False,
    resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[Scored]]:
    """Detect, score and write; with ``explain`` the report carries ``near_misses``.
    ``resources``: {service: {"language", "namespace", "owner"}} (:mod:`hourglass.analysis.resources`)."""
    findings = run_detectors(ctx)
    # The endpoints' critical paths read the repaired spans only: they are computed beside the
    # pricing and the write-up (in polars and numpy, which release the GIL), which leave the
    # second core idle, once the two detector lanes are done with it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hourglass-paths") as side:
        paths = side.submit(report_critical_paths, ctx)
        ranked = score_findings(ctx, findings)
        near_misses = uncovered_near_misses(ctx.near_misses, ranked) if explain else None
        report = build_report(
            ranked,
            traces_analyzed=ctx.traces.height,
            spans_analyzed=ctx.spans.height,
            near_misses=near_misses,
        )
        write_texts(report, writer, ContextView(ctx, report, ranked, resources))
        add_workstreams(report, ctx, ranked, resources)
        report["critical_paths"] = paths.result()
    return report, ranked


def report_critical_paths(ctx: AnalysisContext) -> list[dict[str, Any]]:
    """The busiest endpoints' critical paths across traces, compact, for the report page's icicles
    (``hourglass.analysis.endpoint_path.report_critical_paths``; a partitioned run decides the same
    figures on the partitions' combined rows)."""
    from hourglass.analysis.endpoint_path import combine_path_rows, path_rows
    from hourglass.analysis.endpoint_path import report_critical_paths as from_rows

    try:
        rows = combine_path_rows([path_rows(ctx)])
    except Exception:  # a picture must never cost the recommendations
        log.exception("critical-path rows of the endpoints failed")
        return []
    return from_rows(rows)


def analyze(
    table_or_frame: pa.Table | pl.DataFrame,
    *,
    writer: Writer | None = None,
    services: list[str] | None = None,
    since_ns: int | None = None,
    explain: bool = False,
) -> dict[str, Any]:
    """Analyse span rows (``hourglass.collector.schema.SPAN_SCHEMA``) into a ``hourglass.report/v1`` dict
    (with ``near_misses`` when ``explain``)."""
    from hourglass.analysis.resources import service_resources

    resources = service_resources(table_or_frame)
    frame = select_traces(to_analysis_frame(table_or_frame), services=services, since_ns=since_ns)
    report, _ = analyze_context(
        AnalysisContext.from_table(frame), writer=writer, explain=explain, resources=resources
    )
    return report


class PartitionedView(ContextView):
    """:class:`ContextView` when no context holds every span: its context holds the exemplar
    traces (repair is per trace, so their spans are the same), the calls' statistics and the
    services' scope languages come measured over every partition, another trace is read when
    asked for, and the service edges are gathered partition by partition the first time a writer
    asks (the agent's tool)."""

    def __init__(
        self,
        ctx: AnalysisContext,
        report: dict[str, Any],
        ranked: list[Scored],
        resources: Mapping[str, Mapping[str, Any]],
        source: partitions.Source,
        parts: int,
        read_traces: Callable[[list[str]], pa.Table],
        held: set[str] | None = None,
    ) -> None:
        """``held``: the exemplar traces ``ctx`` holds (None: every one; else the others are read
        when a design asks for one, a trace at a time: :func:`_exemplars_held`)."""
        super().__init__(ctx, report, ranked, resources)
        self._source, self._parts, self._read_traces = source, parts, read_traces
        self._held = held

    def _context_of(self, rec: Mapping[str, Any]) -> AnalysisContext:
        """The shared context, unless the recommendation's first exemplar trace (the one its
        design draws: :func:`sequence.design_facts`) is not held there: then a context of that
        trace alone, read now and let go after the design, with the shared one's measured
        figures (the calls' statistics, the scopes' languages)."""
        trace_ids = [str(t) for t in (rec.get("evidence") or {}).get("trace_ids") or []]
        if self._held is None or not trace_ids or trace_ids[0] in self._held:
            return self.ctx
        alone = AnalysisContext.from_table(self._read_traces(trace_ids[:1]))
        for key in ("call_stats", "scope_languages"):
            if key in self.ctx.cache:
                alone.cache[key] = self.ctx.cache[key]
        return alone

    def trace_spans(self, trace_id: str) -> pl.DataFrame:
        spans = self.ctx.trace_spans(trace_id)
        if spans.height:
            return spans
        return AnalysisContext.from_table(self._read_traces([trace_id])).spans

    def service_edges(self) -> pl.DataFrame:
        edges = self.ctx.cache.get("service_edges_all")
        if not isinstance(edges, pl.DataFrame):
            edges = pl.concat(
                [
                    service_edges(AnalysisContext.from_table(self._source.load(p, self._parts)))
                    for p in range(self._parts)
                ]
            )
            self.ctx.cache["service_edges_all"] = edges
        return edges


def analyze_partitioned(
    source: partitions.Source,
    parts: int,
    executor: partitions.Executor,
    *,
    read_traces: Callable[[list[str]], pa.Table],
    writer: Writer | None = None,
    explain: bool = False,
    progress: partitions.Progress | None = None,
    spill_buckets: int = 0,
    extraction: Callable[[NearMissSink], partitions.Extracted] | None = None,
    decide_beside: bool = False,
    split_beside: bool = True,
    split_files: bool = True,
    release_heap: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], list[Scored]]:
    """:func:`_analyze_partitioned`; on a DuckDB file of this machine, with enough partitions, the
    store is first read once into a file per partition (:func:`partitions.split_store`) that the
    tasks of every pass read instead of scanning the store, while the worker processes start; the
    files are removed when the run ends, fails or is interrupted (by a thread of their own, which
    the process waits for before it exits). On a Dask cluster only when its workers read this
    machine's temporary files (``DaskExecutor.sees``: they run here, or mount it), and the
    extraction's repaired spans are kept for the pricing only then too; never for an
    ``extraction`` of the caller's. With worker
    processes and more partitions than workers, the split is written by a thread of its own while
    the workers extract their first partitions straight from the store
    (:func:`partitions.run_extraction`'s ``later``): they would otherwise wait for it, idle;
    unless ``split_beside`` is False (``partitions.Plan.split_beside``: the memory budget has no
    room for the split beside the workers' peaks), when it is written first, while they start.
    ``split_files`` False (``partitions.Plan.split``: the budget has no room for the split even
    beside the workers' bases): no split, every task reads its partition from the store.
    ``release_heap``: called after each stage that follows the pricing (:func:`_analyze_partitioned`)."""
    here = extraction is None and (
        isinstance(executor, partitions.SerialExecutor | partitions.ProcessExecutor)
        or (isinstance(executor, partitions.DaskExecutor) and executor.sees(tempfile.gettempdir()))
    )
    with _run_sources(
        source,
        parts,
        executor,
        here=here,
        progress=progress,
        split_beside=split_beside,
        split_files=split_files,
    ) as (read_from, later, prepared):
        return _analyze_partitioned(
            read_from,
            parts,
            executor,
            read_traces=read_traces,
            writer=writer,
            explain=explain,
            progress=progress,
            spill_buckets=spill_buckets,
            extraction=extraction,
            decide_beside=decide_beside,
            later=later,
            prepared=prepared,
            release_heap=release_heap,
        )


def findings_partitioned(
    source: partitions.Source,
    parts: int,
    executor: partitions.SerialExecutor | partitions.ProcessExecutor,
    kinds: frozenset[str],
    *,
    progress: partitions.Progress | None = None,
    spill_buckets: int = 0,
    decide_beside: bool = False,
    split_beside: bool = True,
    split_files: bool = True,
) -> list[Finding]:
    """The findings of the detectors ``kinds`` over ``parts`` partitions of whole traces, decided
    as :func:`analyze_partitioned` decides them (the same partitions, split and workers), without
    the other detectors, the critical paths, the pricing, the report or its texts: what a what-if
    of recommendations of those kinds applies (``hourglass whatif --db --recommendation``), as
    serve decides them for its questions (``hourglass.api.analysis_worker.window_findings``)."""
    with _run_sources(
        source,
        parts,
        executor,
        here=True,
        progress=progress,
        split_beside=split_beside,
        split_files=split_files,
        keep_prepared=False,
    ) as (read_from, later, _):
        spill = Spill.create(spill_buckets) if spill_buckets > 0 else None
        try:
            extracted = partitions.run_extraction(
                read_from,
                parts,
                executor,
                NearMissLog(),
                progress,
                spill,
                decide_beside=decide_beside,
                later=later,
                kinds=kinds,
            )
        except BaseException:
            if isinstance(executor, partitions.ProcessExecutor):  # no worker writes to the spill after
                executor.close(wait=False)
                executor.settle()
            raise
        finally:
            if spill is not None:
                spill.remove()
        return extracted.findings


@contextmanager
def _run_sources(
    source: partitions.Source,
    parts: int,
    executor: partitions.Executor,
    *,
    here: bool,
    progress: partitions.Progress | None,
    split_beside: bool,
    split_files: bool,
    keep_prepared: bool = True,
) -> Iterator[tuple[partitions.Source, Future[partitions.Source | None] | None, partitions.Prepared | None]]:
    """For the ``with`` block of a partitioned run: (where its partitions are read, the split
    being written beside its extraction or None, where the extraction keeps its repaired spans
    for the pricing or None), as :func:`analyze_partitioned` describes them; ``here``: the
    executor's tasks run on this machine or see its temporary files (a split and kept spans are
    made only then; kept spans only with ``keep_prepared``). The files are removed when the block ends, fails or is
    interrupted."""
    split = None
    later: Future[partitions.Source | None] | None = None
    from hourglass.collector.duckdb_store import Cancel

    prepared: partitions.Prepared | None = None
    # set when the run ends first (failed, interrupted): the split stops, its query interrupted
    cancel = Cancel()
    if here and isinstance(executor, partitions.ProcessExecutor):
        executor.warm()
    if split_files and here:
        beside = (
            split_beside
            and isinstance(executor, partitions.ProcessExecutor | partitions.DaskExecutor)
            and parts > executor.workers
        )
        if beside and partitions.splits(source, parts):
            # (the partitions the workers' first round reads from the store are not written)
            first = min(parts, max(1, executor.workers))
            later = _beside(lambda: _split_or_store(source, parts, cancel, skip=first))
        if later is None:  # (a split that fails: the store read instead, as beside)
            if progress and partitions.splits(source, parts):
                progress("splitting the store into partition files", 0, 0)
            split = _split_or_store(source, parts, cancel)
    try:
        if here and keep_prepared:  # the extraction's repaired spans kept for the pricing passes
            prepared = partitions.Prepared.create()
        yield split or source, later, prepared
    except BaseException:
        cancel.set()  # (a split still being written stops at once and removes its files)
        if isinstance(executor, partitions.ProcessExecutor) and (prepared is not None or not keep_prepared):
            executor.close(wait=False)  # (interrupted: no more tasks; its workers terminated)
        raise
    finally:
        if prepared is not None:  # once no worker of the run writes to it (a failed run's may)
            _beside(partial(_remove_prepared, prepared, executor))
        if split is not None:  # removed beside what follows (the workers' exit, the rendering):
            _beside(split.remove)  # the process waits for it before it exits
        elif later is not None:  # (once written: a run that failed first waits for it here)
            _beside(lambda: _remove_split(later))


def _exemplar_ids(report: Mapping[str, Any]) -> list[str]:
    """The recommendations' exemplar trace ids: in rank order, each recommendation's in its order."""
    wanted = [
        str(t)
        for r in report.get("recommendations") or []
        for t in (r.get("evidence") or {}).get("trace_ids") or []
    ]
    return list(dict.fromkeys(wanted))


def _exemplars_held(ordered: list[str], counts: Mapping[str, int], limit: int) -> set[str]:
    """Of the exemplar traces ``ordered`` (:func:`_exemplar_ids`), those read together for the
    recommendations' texts: every one whose spans (``counts``) still fit in ``limit`` with those
    taken before. Exemplars of a few spans all fit (one read of the store for all); traces of tens
    of thousands of spans each (a batch job, an N+1 over a whole table) would not: held together
    they took the deciding process to 1.3 GiB at 3M spans. The others are read a trace at a time
    when a design draws one (``PartitionedView``)."""
    held: set[str] = set()
    total = 0
    for trace_id in ordered:
        spans = int(counts.get(trace_id) or 0)
        if total + spans <= limit:
            held.add(trace_id)
            total += spans
    return held


def _exemplar_context(
    report: Mapping[str, Any],
    traces: pl.DataFrame | Any,
    limit: int,
    read: Callable[[list[str]], pa.Table],
) -> tuple[AnalysisContext, set[str] | None]:
    """(the context of the exemplar traces held together, which those are: None for all of
    them). Their spans are counted from the run's trace summaries (``traces``' ``span_count``);
    without those (serve's compact ones) from the rows read, the ones not held let go before the
    context is made of the others."""
    ordered = _exemplar_ids(report)
    if isinstance(traces, pl.DataFrame) and "span_count" in traces.columns:
        found = traces.filter(pl.col("trace_id").is_in(pl.Series(ordered, dtype=pl.String).implode()))
        counts = dict(zip(found["trace_id"].to_list(), found["span_count"].to_list(), strict=True))
        held = _exemplars_held(ordered, counts, limit)
        table = read(sorted(held))
    else:
        table = read(ordered)
        ids = pl.from_arrow(table.select(["trace_id"]))
        assert isinstance(ids, pl.DataFrame)
        tallied = ids.group_by("trace_id").len()
        counts = dict(zip(tallied["trace_id"].to_list(), tallied["len"].to_list(), strict=True))
        held = _exemplars_held(ordered, counts, limit)
        if len(held) < len(ordered):
            table = _traces_of(table, sorted(held))
    return AnalysisContext.from_table(table), None if len(held) == len(ordered) else held


def _remove_prepared(prepared: partitions.Prepared, executor: object) -> None:
    """Removes the run's kept partitions after the workers of a failed run (closed without
    waiting: terminated in their task) have exited: one of them could write a file after the
    removal."""
    if isinstance(executor, partitions.ProcessExecutor):
        executor.settle()
    prepared.remove()


def _split_or_store(
    source: partitions.Source, parts: int, cancel: threading.Event, *, skip: int = 0
) -> partitions.SplitSource | None:
    """The store split into partition files (:func:`partitions.split_store`), before the run or
    beside it; a split that fails (a full disk) is logged and the partitions are read from the
    store instead (None), as the workers' first ones are when it is written beside them."""
    try:
        return partitions.split_store(source, parts, cancel=cancel, skip=skip)
    except Exception as exc:
        from hourglass.collector.duckdb_store import query_interrupted

        if query_interrupted(exc):  # Ctrl-C during the split: the run ends, it does not go on
            raise KeyboardInterrupt from None
        if not cancel.is_set():
            log.warning(
                "splitting the store into partition files failed (%s); reading the store instead", exc
            )
        return None


def _remove_split(later: Future[partitions.Source | None]) -> None:
    """Removes the partition files of a split written beside the run, once it has ended (a split
    that failed removed its own)."""
    try:
        split = later.result()
    except BaseException:
        return
    if isinstance(split, partitions.SplitSource):
        split.remove()


def _exemplar_candidates(findings: list[Finding]) -> set[str]:
    """The trace ids a report of ``findings`` may show as exemplars: each finding's first
    ``MAX_EXEMPLAR_TRACES`` (``report.recommendation``'s choice, whatever the ranking keeps)."""
    out: set[str] = set()
    for f in findings:
        # (only those decoded: ``f.trace_ids`` makes a string of every trace a finding covers)
        chosen = f.evidence.get("trace_ids") or f.occurrence_table.first_trace_ids(MAX_EXEMPLAR_TRACES)
        out.update(str(t) for t in chosen[:MAX_EXEMPLAR_TRACES])
    return out


def _traces_of(table: pa.Table, trace_ids: list[str]) -> pa.Table:
    """The rows of ``table`` (``read_traces``' rows of more traces) of ``trace_ids`` only, in
    their order: what ``read_traces(trace_ids)`` returns (a store matches ids lowercased)."""
    import pyarrow.compute as pc

    # (the value set made by polars: ``pa.array`` of a Python list imports pandas, ~0.2 s of
    # this process' time between the scoring and the texts, on the run's critical path)
    wanted = pl.Series(sorted({t.lower() for t in trace_ids}), dtype=pl.String).to_arrow().cast(pa.string())
    return table.filter(pc.is_in(table.column("trace_id").cast(pa.string()), value_set=wanted))


def _priced_ahead(
    ranked: list[Scored],
    report: dict[str, Any],
    priced_together: Callable[[list[Finding], partitions.Progress | None], dict[str, Impact]],
    counted: list[tuple[int, int]] | None,
) -> tuple[list[str], dict[str, Impact]]:
    """The findings the workstream plan of ``ranked`` and ``report`` prices together
    (``workstreams.combined_findings``), priced: their ids and impacts. ``counted``: the pricing's
    progress (done, total) kept there, for the thread that plans to tell."""
    from hourglass.analysis.workstreams import combined_findings

    found = combined_findings(ranked, report)
    if not found:
        return [], {}

    def told(_: str, done: int, total: int) -> None:
        if counted is not None:
            counted.append((done, total))

    return [f.id for f in found], priced_together(found, told if counted is not None else None)


def _let_go(findings: list[Finding]) -> None:
    """The columns of parked occurrences that a stage read back let go again before the next
    (serve's round parks them: :meth:`Occurrences.release`; nothing for occurrences in memory)."""
    for finding in findings:
        finding.occurrence_table.release()


def _beside(fn: Callable[[], T], *, daemon: bool = False) -> Future[T]:
    """``fn()`` run in a thread of its own, beside what this thread does next (a thread that is
    not a daemon: the process waits for it before it exits, so a removal is never cut short;
    ``daemon`` for work that may be cut short: a pricing)."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="hourglass-beside", daemon=daemon).start()
    return future


def _analyze_partitioned(
    source: partitions.Source,
    parts: int,
    executor: partitions.Executor,
    *,
    read_traces: Callable[[list[str]], pa.Table],
    writer: Writer | None = None,
    explain: bool = False,
    progress: partitions.Progress | None = None,
    spill_buckets: int = 0,
    extraction: Callable[[NearMissSink], partitions.Extracted] | None = None,
    decide_beside: bool = False,
    later: Future[partitions.Source | None] | None = None,
    prepared: partitions.Prepared | None = None,
    release_heap: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], list[Scored]]:
    """:func:`analyze_context` over ``parts`` partitions of whole traces, run by ``executor``:
    extraction of each partition, one decision over the combined rows, then a second pass that
    prices the findings' what-if savings partition by partition (a trace's saving depends only on
    that trace) and measures the calls they name. Same findings, savings, ranking, near misses and
    designs as the whole at once (the partition tests); memory bounded by a partition, not the
    store. ``read_traces(ids)`` reads whole traces by id (every column): the exemplars the designs
    draw, and one trace per service for the services' resources (read from a thread of its own,
    beside the pricing, unless ``extraction`` is given). A workstream of two or more
    re-timed recommendations is priced in a third pass. The endpoints' critical paths (the page's
    icicles) are decided on the rows each partition extracted
    (:func:`hourglass.analysis.endpoint_path.path_rows`), as at once. With ``spill_buckets`` the
    extracted tables that grow with spans are spilled to that many buckets in a temporary folder
    (``hourglass.analysis.spill``; the executor's tasks must reach it) and decided bucket by
    bucket. ``extraction(notes)``, when given, is the first pass instead of
    :func:`partitions.run_extraction` (``serve``'s incremental analysis decides stored rows, kind
    by kind: ``hourglass.analysis.incremental``). ``decide_beside``: some kinds are decided in a
    thread of their own beside the others (``partitions.Plan.beside``: the memory plan has room).
    ``later``: the partition files being written beside the extraction, which every pass after
    the extraction's first round reads (:func:`partitions.run_extraction`). ``prepared``: where the
    extraction keeps the spans it repaired, which the pricing passes read instead of repairing
    them again (:class:`partitions.Prepared`). ``release_heap`` (serve's worker: ``malloc_trim``)
    is called after the scoring, the report, the texts and the workstreams: each frees much of
    what the one before made (the pricing's results, the scores), and glibc keeps the pages of
    its heap that they touched resident until a trim; the stages after reuse a few of its free
    chunks, scattered over it (a 12M-span store: 45 MiB in use, 107 MiB resident from the
    scoring to the texts)."""
    release = release_heap or (lambda: None)

    def step(phase: str) -> None:  # a step of the run with no count, on the bar
        if progress:
            progress(phase, 0, 0)

    from hourglass.analysis.sequence import duration_stats

    notes = NearMissLog()
    removed: Future[None] | None = None
    if extraction is not None:
        extracted = extraction(notes)
    else:
        spill = Spill.create(spill_buckets) if spill_buckets > 0 else None
        try:
            extracted = partitions.run_extraction(
                source,
                parts,
                executor,
                notes,
                progress,
                spill,
                decide_beside=decide_beside,
                later=later,
                prepared=prepared,
            )
        except BaseException:
            if spill is not None:
                spill.remove()
            raise
        if later is not None:  # written by now (the extraction's later rounds read it)
            source = later.result() or source
        if spill is not None:  # its many small files removed beside the pricing (~1 s on a busy disk)
            removed = _beside(spill.remove)
    one_per_service = extracted.services.group_by("service").agg(pl.col("trace_id").min())["trace_id"]
    service_ids = sorted(set(one_per_service.to_list()))
    # one trace per service (their resources) read beside the pricing, which this process only
    # waits for when its tasks run elsewhere (worker processes, a cluster). Not beside tasks run
    # here: an embedded ClickHouse store (chdb) opens once per process, and a task's open and this
    # read's would meet; a caller's own extraction comes with a read_traces called from this
    # thread only
    beside = extraction is None and not isinstance(executor, partitions.SerialExecutor)
    # with them, every finding's exemplar traces (the report's are among them): one read of the
    # store beside the pricing instead of a second one after it, on the run's critical path
    prefetched = sorted(set(service_ids) | _exemplar_candidates(extracted.findings)) if beside else []
    service_traces = _beside(lambda: read_traces(prefetched)) if beside else None
    kept = [f for f in extracted.findings if f.confidence >= MIN_REPORTED_CONFIDENCE]
    impacts, calls = partitions.run_pricing(
        source,
        parts,
        executor,
        kept,
        progress,
        calls=True,
        trace_parts=extracted.trace_parts,
        prepared=prepared,
    )
    # the calls' statistics the designs read, made now: every call's duration (at 12M stored
    # spans ~20 MiB) not held through the scoring and the report
    call_stats = {fid: duration_stats(d) for fid, d in calls.items()}
    del calls
    _let_go(extracted.findings)
    step("scoring the findings")
    ranked = score(
        extracted.findings, impact_of=lambda f: impacts.get(f.id), traces=extracted.traces, notes=notes
    )
    _let_go(extracted.findings)
    release()
    memlog.note("findings scored")
    step("making the report")
    near_misses = uncovered_near_misses(notes.near_misses, ranked) if explain else None
    report = build_report(
        ranked,
        traces_analyzed=extracted.traces.height,
        spans_analyzed=extracted.spans,
        near_misses=near_misses,
    )

    def priced_together(found: list[Finding], told: partitions.Progress | None) -> dict[str, Impact]:
        return partitions.run_pricing(
            source, parts, executor, found, told, trace_parts=extracted.trace_parts, prepared=prepared
        )[0]

    # The workstreams' what-ifs (the recommendations of one service priced together) depend on
    # the report's recommendations alone: priced from here, in a thread of their own, while this
    # one reads the services' and exemplars' traces and writes the texts (the worker processes
    # idle meanwhile), instead of after them. Only where the services' traces are read beside
    # the pricing (``beside``): not for tasks run in this process (a store opened once per
    # process), nor a caller's extraction (serve's round parks the findings' occurrences, which
    # the stages between let go: priced after them, as before).
    counted: list[tuple[int, int]] = []  # the pass' progress, told from this thread when planned
    ahead = (
        _beside(
            lambda: _priced_ahead(ranked, report, priced_together, counted if progress else None), daemon=True
        )
        if beside
        else None
    )
    try:
        return _after_pricing(
            report,
            ranked,
            extracted,
            ahead=ahead,
            counted=counted,
            priced_together=priced_together,
            service_traces=service_traces,
            service_ids=service_ids,
            prefetched=prefetched,
            removed=removed,
            read_traces=read_traces,
            call_stats=call_stats,
            source=source,
            parts=parts,
            writer=writer,
            progress=progress,
            step=step,
            release=release,
        )
    except BaseException:
        if ahead is not None:
            _stop_ahead(executor, ahead)
        raise


STOP_AHEAD_S = 5.0  # how long a failed run waits for the workstreams' pricing to stop


def _stop_ahead(executor: partitions.Executor, ahead: Future[Any]) -> None:
    """The workstreams' pricing, running beside a run that failed or was interrupted, stopped
    before the run's caller closes the executor and removes the files it reads: its map would
    wait on the futures of a pool closed from this thread, which are never resolved, or retry them
    on a new pool (:meth:`partitions.ProcessExecutor.stop`). A cluster's map ends with its client."""
    if isinstance(executor, partitions.ProcessExecutor):
        executor.stop()
        wait([ahead], timeout=STOP_AHEAD_S)


def _after_pricing(
    report: dict[str, Any],
    ranked: list[Scored],
    extracted: partitions.Extracted,
    *,
    ahead: Future[tuple[list[str], dict[str, Impact]]] | None,
    counted: list[tuple[int, int]],
    priced_together: Callable[[list[Finding], partitions.Progress | None], dict[str, Impact]],
    service_traces: Future[pa.Table] | None,
    service_ids: list[str],
    prefetched: list[str],
    removed: Future[Any] | None,
    read_traces: Callable[[list[str]], pa.Table],
    call_stats: dict[str, Any],
    source: partitions.Source,
    parts: int,
    writer: Writer | None,
    progress: partitions.Progress | None,
    step: Callable[[str], None],
    release: Callable[[], None],
) -> tuple[dict[str, Any], list[Scored]]:
    """The stages after the pricing of :func:`_analyze_partitioned`: the services' resources, the
    recommendations' texts, the workstreams (priced ``ahead`` when they were)."""
    from hourglass.analysis.resources import scope_languages, service_resources

    _let_go(extracted.findings)
    read = service_traces.result() if service_traces is not None else None
    resources = service_resources(
        _traces_of(read, service_ids) if read is not None else read_traces(service_ids)
    )
    if removed is not None:
        removed.result()
    exemplars = sorted(
        {t for r in report["recommendations"] for t in (r.get("evidence") or {}).get("trace_ids") or []}
    )
    release()
    memlog.note("report made")
    step("writing the recommendations' texts")
    prefetched_all = read is not None and set(exemplars) <= set(prefetched)
    ctx, held = _exemplar_context(
        report,
        extracted.traces,
        planning.exemplar_spans(extracted.spans, parts),
        partial(_traces_of, read) if prefetched_all else read_traces,
    )
    del read
    memlog.note(
        f"the exemplars' traces read ({len(exemplars) if held is None else len(held)} of {len(exemplars)})"
    )
    ctx.cache["call_stats"] = call_stats
    ctx.cache["scope_languages"] = scope_languages(extracted.services)
    view = PartitionedView(ctx, report, ranked, resources, source, parts, read_traces, held)
    write_texts(report, writer, view)
    del view
    _let_go(extracted.findings)
    release()
    memlog.note("texts written")

    def priced_workstreams(_: str, done: int, total: int) -> None:  # (rows of their own on the bar)
        if progress:
            progress("pricing workstreams", done, total)

    def impacts_of(found: list[Finding]) -> dict[str, Impact]:
        if ahead is not None:
            ids, priced = ahead.result()
            if ids == [f.id for f in found]:  # (the same recommendations: the same findings)
                for done, total in counted[-1:]:
                    priced_workstreams("", done, total)
                return priced
        return priced_together(found, priced_workstreams if progress else None)

    from hourglass.analysis.workstreams import build_workstreams

    step("planning the workstreams")

    try:
        report["workstreams"] = build_workstreams(
            None,
            ranked,
            report,
            resources,
            traced_services=set(extracted.services["service"].to_list()),
            impacts_of=impacts_of,
        )
    except Exception:
        log.exception("the workstream plan failed")
        report["workstreams"] = []
    _let_go(extracted.findings)
    release()
    memlog.note("workstreams planned")
    # The endpoints' critical paths, decided on the partitions' combined rows: the same as at once.
    report["critical_paths"] = extracted.critical_paths
    return report, ranked


def critical_path_ids(ctx: AnalysisContext) -> list[str]:
    """The span ids of the critical path of ``ctx``'s trace, root first (by depth, then start)."""
    return ctx.spans.filter(pl.col("on_critical_path")).sort(["depth", "start_ns"])["span_id"].to_list()


def trace_detail(
    spans_of_one_trace: pa.Table | pl.DataFrame, report: dict[str, Any], index: TraceIndex | None = None
) -> dict[str, Any]:
    """One trace as the analysis sees it, for the REST API, MCP and the report page: the repaired
    spans (clock skew corrected, duplicates dropped, shared spans split; ``clock_skew_ns`` is the
    shift each got), the critical path's span ids (root first) and the recommendations touching
    it (``touches``: :class:`hourglass.analysis.trace_index.Touch`, best first, by ``index`` — the
    run's own when given, else one built from ``report`` alone; ``finding_ids`` their ids)."""
    ctx = AnalysisContext.from_table(spans_of_one_trace)
    spans = ctx.spans
    trace_ids = spans["trace_id"].unique().to_list()
    path = critical_path_ids(ctx)
    index = index if index is not None else TraceIndex.from_report(report)
    touches = [t for trace_id in trace_ids for t in index.touching(trace_id, spans["span_id"].to_list())]
    columns = [
        "span_id",
        "parent_span_id",
        "service",
        "name",
        "kind",
        "kind_inferred",
        "start_ns",
        "end_ns",
        "duration_ns",
        "status_code",
        "status_message",
        "depth",
        "is_root",
        "orphan",
        "blocking",
        "on_critical_path",
        "critical_ns",
        "clock_skew_ns",
    ]
    return {
        "trace_id": trace_ids[0] if len(trace_ids) == 1 else None,
        "span_count": spans.height,
        "incomplete": bool(ctx.traces["incomplete"].any()) if ctx.traces.height else False,
        "spans": spans.sort(["depth", "start_ns"]).select(columns).to_dicts(),
        "critical_path": path,
        "touches": touches,
        "finding_ids": [t.recommendation_id for t in touches],
    }
