"""Exemplar pages: the trace pictures of the HTML report (spans, critical path, bottleneck and
the re-timed picture of a recommendation applied)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl
import pyarrow as pa

from hourglass.api import report_html

log = logging.getLogger("hourglass.api.analysis")

TraceFetcher = Callable[[str], pa.Table]


def _span_ids(value: Any) -> list[str]:
    """Span ids from a list of ids or of span dicts (``{"span_id": ...}``)."""
    out: list[str] = []
    for item in value or []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Mapping) and item.get("span_id") is not None:
            out.append(str(item["span_id"]))
    return out


def critical_path_ids(detail: Mapping[str, Any]) -> list[str]:
    """The critical path's span ids from an ``hourglass.analysis.pipeline.trace_detail`` result."""
    for key in ("critical_path", "critical_path_span_ids", "critical_path_ids"):
        if key in detail:
            return _span_ids(detail[key])
    spans = detail.get("spans") or []
    return [str(s["span_id"]) for s in spans if isinstance(s, Mapping) and s.get("on_critical_path")]


def finding_ids(detail: Mapping[str, Any]) -> list[str]:
    """The recommendation ids that touch the trace, from a ``trace_detail`` result."""
    for key in ("findings", "recommendations", "finding_ids", "recommendation_ids"):
        if key in detail:
            out = []
            for item in detail[key] or []:
                if isinstance(item, str):
                    out.append(item)
                elif isinstance(item, Mapping) and item.get("id") is not None:
                    out.append(str(item["id"]))
            return out
    return []


def trace_detail(spans: pa.Table, report: Mapping[str, Any]) -> dict[str, Any]:
    from hourglass.analysis.pipeline import trace_detail as analysis_trace_detail

    return dict(analysis_trace_detail(spans, dict(report)))


def retime(spans: pa.Table, recommendation: Mapping[str, Any]) -> pl.DataFrame:
    """The trace's repaired spans with ``new_start_ns``, ``new_end_ns`` and ``removed``, as if
    ``recommendation`` were applied (``hourglass.analysis.whatif.retime_trace``)."""
    from hourglass.analysis.whatif import retime_trace

    frame = pl.from_arrow(spans)
    assert isinstance(frame, pl.DataFrame)
    return retime_trace(frame, recommendation)


def _intervention_span_ids(recommendation: Mapping[str, Any], trace_id: str) -> set[str]:
    """Spans named by the interventions the report recorded for this exemplar trace."""
    recorded = ((recommendation.get("evidence") or {}).get("interventions") or {}).get(trace_id) or []
    out: set[str] = set()
    for iv in recorded:
        if isinstance(iv, Mapping):
            out.update(str(s) for s in iv.get("span_ids") or [])
            if iv.get("span_id") is not None:
                out.add(str(iv["span_id"]))
    return out


def build_exemplar(
    recommendation: Mapping[str, Any], report: Mapping[str, Any], fetch_trace: TraceFetcher
) -> report_html.Exemplar | None:
    """The first exemplar trace of a recommendation: spans, critical path, bottleneck, re-timing.

    Spans are drawn as the analysis sees them (repaired: clock skew corrected), so the before and
    after pictures and the critical path agree. The bottleneck spans are the ones the recorded
    interventions name (else the evidence's span ids). A failing analysis helper is logged and
    shown on the figure (``note``), never hidden.
    """
    evidence = recommendation.get("evidence") or {}
    trace_ids = [str(t) for t in evidence.get("trace_ids") or []]
    if not trace_ids:
        return None
    trace_id = trace_ids[0]
    raw = fetch_trace(trace_id)
    if raw.num_rows == 0:
        return report_html.Exemplar(trace_id=trace_id, spans=[], note="The trace is no longer in the store.")
    notes: list[str] = []
    exemplar = report_html.Exemplar(trace_id=trace_id, spans=[])
    try:
        exemplar.critical_path = set(critical_path_ids(trace_detail(raw, report)))
    except Exception as exc:
        log.exception("critical path of exemplar trace %s failed", trace_id)
        notes.append(f"Critical path unavailable ({type(exc).__name__}: {exc}).")
    try:
        retimed = retime(raw, recommendation)
        exemplar.spans = report_html.spans_from_rows(
            retimed.select(
                "span_id", "parent_span_id", "service", "name", "start_ns", "end_ns", "status_code"
            ).to_dicts()
        )
        kept = retimed.filter(~pl.col("removed").fill_null(False))
        exemplar.after = {
            str(i): (int(a), int(b))
            for i, a, b in zip(kept["span_id"], kept["new_start_ns"], kept["new_end_ns"], strict=True)
        }
    except Exception as exc:
        log.exception("re-timing exemplar trace %s for %s failed", trace_id, recommendation.get("id"))
        notes.append(f"Re-timing unavailable ({type(exc).__name__}: {exc}).")
        columns = ("span_id", "parent_span_id", "service", "name", "start_ns", "end_ns", "status_code")
        exemplar.spans = report_html.spans_from_rows(
            raw.select([c for c in columns if c in raw.column_names]).to_pylist()
        )
    if exemplar.after is not None and all(
        exemplar.after.get(span.span_id) == (span.start_ns, span.end_ns) for span in exemplar.spans
    ):
        # Nothing moves (fault-tolerance gaps carry no latency estimate): one picture is enough.
        exemplar.after = None
        notes.append("Applying it does not change this trace's timing; the picture shows where it happens.")
    present = {s.span_id for s in exemplar.spans}
    named = _intervention_span_ids(recommendation, trace_id) or set(_span_ids(evidence.get("span_ids")))
    exemplar.bottleneck = named & present
    exemplar.note = " ".join(notes) or None
    return exemplar


def build_exemplars(report: Mapping[str, Any], fetch_trace: TraceFetcher) -> dict[str, report_html.Exemplar]:
    out: dict[str, report_html.Exemplar] = {}
    for rec in report.get("recommendations") or []:
        try:
            exemplar = build_exemplar(rec, report, fetch_trace)
        except Exception:
            log.exception("exemplar of recommendation %s failed", rec.get("id"))
            continue
        if exemplar is not None:
            out[str(rec.get("id"))] = exemplar
    return out


def table_trace_fetcher(table: pa.Table) -> TraceFetcher:
    """Exemplar traces looked up in an in-memory span table (reports from files)."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)

    def fetch(trace_id: str) -> pa.Table:
        return frame.filter(pl.col("trace_id") == trace_id).to_arrow()

    return fetch
