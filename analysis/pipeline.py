"""The analysis entry point: spans in, ``hourglass.report/v1`` out.

``analyze(table_or_frame, *, writer=None, services=None, since_ns=None)`` runs, in order:
selection (whole traces that touch ``services`` / have a span starting at or after ``since_ns``), trace repair and
critical path (:class:`analysis.context.AnalysisContext`), every detector in
:data:`analysis.detectors.DETECTORS`, what-if savings (:mod:`analysis.whatif`), ranking
(:mod:`analysis.ranking`) and the writer (the offline template writer when ``writer`` is None). A
writer that fails falls back to the template writer and the report says why.

Parallelization findings whose re-timing saves less than ``MIN_REPORTED_SAVING_NS`` (0.5 ms) at p95
are dropped: the pattern exists but is not on the path that decides the request's latency.

Also here: :class:`ContextView`, the read-only ``analysis.writer.WriterContext`` over an analysis
(for writers that look things up), and :func:`trace_detail` for the REST API's trace view.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from analysis.context import AnalysisContext, to_analysis_frame
from analysis.detectors import DETECTORS
from analysis.model import Finding
from analysis.ranking import Scored, expected_value_ms, rank
from analysis.report import build_report
from analysis.whatif import Impact, WhatIf
from analysis.writer import Writer, WriterContext

log = logging.getLogger(__name__)

MIN_REPORTED_SAVING_NS = 500_000
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
# call_children for n_plus_one; both fan-out detectors share fanout_straggler.sibling_groups.
# A detector not listed runs in the first lane. Findings are assembled in DETECTORS order, so the
# report does not depend on which lane finished first.
DETECTOR_LANES: tuple[tuple[str, ...], ...] = (
    ("serialized_calls", "n_plus_one", "retry_without_backoff", "error_propagation", "missing_timeout"),
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
    return [finding for kind in DETECTORS for finding in found[kind]]


def _median_root_ms(ctx: AnalysisContext, trace_ids: list[str]) -> float:
    durations = ctx.traces.filter(pl.col("trace_id").is_in(pl.Series(trace_ids, dtype=pl.String).implode()))
    median = durations["root_duration_ns"].median()
    return float(median) / 1e6 if isinstance(median, int | float) else 0.0


def score_findings(ctx: AnalysisContext, findings: list[Finding]) -> list[Scored]:
    whatif = WhatIf(ctx) if findings else None
    scored: list[Scored] = []
    for finding in findings:
        if finding.confidence < MIN_REPORTED_CONFIDENCE:
            continue
        impact: Impact | None = None
        if whatif is not None and any(o.interventions for o in finding.occurrences):
            impact = whatif.impact(finding)
        if finding.category == "parallelization" and (
            impact is None
            or impact.saved_ns.size == 0
            or float(np.percentile(impact.saved_ns, 95)) < MIN_REPORTED_SAVING_NS
        ):
            continue
        median_root = _median_root_ms(ctx, finding.trace_ids) if finding.requests_at_risk else 0.0
        score, has_latency = expected_value_ms(finding, impact, median_root)
        scored.append(Scored(finding, impact, score, has_latency))
    return rank(scored)


def _template_writer() -> Writer:
    from analysis.template_writer import TemplateWriter

    return TemplateWriter()


def write_texts(report: dict[str, Any], writer: Writer | None, view: WriterContext) -> None:
    recs = report["recommendations"]
    chosen = writer or _template_writer()
    fallback_reason: str | None = None
    try:
        outcome = chosen.write(recs, view)
    except Exception as exc:
        if writer is None or getattr(chosen, "name", "") == "template":
            raise
        log.warning("writer %s failed, using the template writer: %s", getattr(chosen, "name", chosen), exc)
        fallback_reason = f"{getattr(chosen, 'name', 'writer')} failed: {exc}"
        outcome = _template_writer().write(recs, view)
    missing = [r for r in recs if r["id"] not in outcome.texts]
    if missing:  # a writer that skipped some recommendations: fill them from the templates
        filled = _template_writer().write(missing, view)
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


def add_workstreams(
    report: dict[str, Any],
    ctx: AnalysisContext,
    ranked: list[Scored],
    resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """``report["workstreams"]``: the plan of :mod:`analysis.workstreams` (empty if it fails)."""
    from analysis.workstreams import build_workstreams

    try:
        report["workstreams"] = build_workstreams(ctx, ranked, report, resources)
    except Exception:
        log.exception("the workstream plan failed")
        report["workstreams"] = []


class ContextView:
    """Read-only views of an analysis for writers (implements ``analysis.writer.WriterContext``)."""

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
        design (:func:`analysis.sequence.design_facts`), computed once per recommendation."""
        if recommendation_id not in self._facts:
            from analysis.sequence import design_facts

            rec, scored = self._recs.get(recommendation_id), self._scored.get(recommendation_id)
            facts = None
            if rec is not None and scored is not None:
                try:
                    facts = design_facts(self.ctx, scored.finding, scored.impact, rec, self.resources)
                except Exception:  # a design without diagrams beats no report
                    log.exception("design facts of %s failed", recommendation_id)
            self._facts[recommendation_id] = facts
        return self._facts[recommendation_id]

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

    def critical_path(self, trace_id: str) -> list[dict[str, Any]] | None:
        spans = self.ctx.trace_spans(trace_id)
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
        edges = self.ctx.cache.get("service_edges")
        if not isinstance(edges, pl.DataFrame):
            edges = (
                self.ctx.with_parent(
                    self.ctx.spans.filter(pl.col("parent_row").is_not_null()).select(
                        "parent_row", "service", "name", "duration_ns"
                    )
                )
                .filter(pl.col("service") != pl.col("parent_service"))
                .select("service", "name", "duration_ns", "parent_service", "parent_name")
            )
            self.ctx.cache["service_edges"] = edges

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


def analyze_context(
    ctx: AnalysisContext,
    *,
    writer: Writer | None = None,
    resources: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, Any], list[Scored]]:
    """``resources``: {service: {"language", "namespace", "owner"}} (:mod:`analysis.resources`)."""
    ranked = score_findings(ctx, run_detectors(ctx))
    report = build_report(ranked, traces_analyzed=ctx.traces.height, spans_analyzed=ctx.spans.height)
    write_texts(report, writer, ContextView(ctx, report, ranked, resources))
    add_workstreams(report, ctx, ranked, resources)
    return report, ranked


def analyze(
    table_or_frame: pa.Table | pl.DataFrame,
    *,
    writer: Writer | None = None,
    services: list[str] | None = None,
    since_ns: int | None = None,
) -> dict[str, Any]:
    """Analyse span rows (``collector.schema.SPAN_SCHEMA``) into a ``hourglass.report/v1`` dict."""
    from analysis.resources import service_resources

    resources = service_resources(table_or_frame)
    frame = select_traces(to_analysis_frame(table_or_frame), services=services, since_ns=since_ns)
    report, _ = analyze_context(AnalysisContext.from_table(frame), writer=writer, resources=resources)
    return report


def trace_detail(spans_of_one_trace: pa.Table | pl.DataFrame, report: dict[str, Any]) -> dict[str, Any]:
    """One trace for the REST API: repaired spans, critical path span ids (root first) and the ids
    of the report's recommendations that touch it (exemplar trace or one of their span ids)."""
    ctx = AnalysisContext.from_table(spans_of_one_trace)
    spans = ctx.spans
    trace_ids = spans["trace_id"].unique().to_list()
    span_ids = set(spans["span_id"].to_list())
    path = spans.filter(pl.col("on_critical_path")).sort(["depth", "start_ns"])["span_id"].to_list()
    touching = []
    for rec in report.get("recommendations", []):
        ev = rec.get("evidence") or {}
        if set(ev.get("trace_ids") or []) & set(trace_ids) or set(ev.get("span_ids") or []) & span_ids:
            touching.append(rec["id"])
    columns = [
        "span_id",
        "parent_span_id",
        "service",
        "name",
        "kind",
        "start_ns",
        "end_ns",
        "duration_ns",
        "status_code",
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
        "finding_ids": touching,
    }
