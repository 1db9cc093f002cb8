"""Exemplar pages: the trace pictures of the HTML report (spans, critical path, bottleneck and
the re-timed picture of a recommendation applied)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import polars as pl
import pyarrow as pa

from hourglass.analysis.trace_index import TraceIndex
from hourglass.api import report_html

log = logging.getLogger("hourglass.api.analysis")

TraceFetcher = Callable[[str], pa.Table]


def trace_detail(
    spans: pa.Table, report: Mapping[str, Any], index: TraceIndex | None = None
) -> dict[str, Any]:
    """``hourglass.analysis.pipeline.trace_detail``: repaired spans, critical path, touching recommendations."""
    from hourglass.analysis.pipeline import trace_detail as analysis_trace_detail

    return analysis_trace_detail(spans, dict(report), index)


def retime(spans: pa.Table | pl.DataFrame, recommendation: Mapping[str, Any]) -> pl.DataFrame:
    """The trace's repaired spans with ``new_start_ns``, ``new_end_ns`` and ``removed``, as if
    ``recommendation`` were applied (``hourglass.analysis.whatif.retime_trace``); ``spans``: raw
    span rows, or the spans of an ``AnalysisContext`` (repaired already)."""
    from hourglass.analysis.whatif import retime_trace

    frame = spans if isinstance(spans, pl.DataFrame) else pl.from_arrow(spans)
    assert isinstance(frame, pl.DataFrame)
    return retime_trace(frame, recommendation)


def build_exemplar(
    recommendation: Mapping[str, Any],
    report: Mapping[str, Any],
    fetch_trace: TraceFetcher,
    index: TraceIndex | None = None,
) -> report_html.Exemplar | None:
    """The first exemplar trace of a recommendation: spans, critical path, bottleneck, re-timing.

    Spans are drawn as the analysis sees them (repaired: clock skew corrected), so the before and
    after pictures and the critical path agree. The bottleneck spans are the recommendation's
    ``bottleneck_span_ids`` in that trace by ``index`` (the run's
    :class:`hourglass.analysis.trace_index.TraceIndex`; else one built from ``report``), as the
    REST trace view lists them. A failing analysis helper is logged and shown on the figure
    (``note``), never hidden.
    """
    index = index if index is not None else TraceIndex.from_report(report)
    evidence = recommendation.get("evidence") or {}
    trace_ids = [str(t) for t in evidence.get("trace_ids") or []]
    if not trace_ids:
        return None
    trace_id = trace_ids[0]
    raw = fetch_trace(trace_id)
    if raw.num_rows == 0:
        return report_html.Exemplar(trace_id=trace_id, spans=[], note="The trace is no longer in the store.")
    from hourglass.analysis.context import AnalysisContext
    from hourglass.analysis.pipeline import critical_path_ids

    notes: list[str] = []
    exemplar = report_html.Exemplar(trace_id=trace_id, spans=[])
    repaired: pl.DataFrame | None = None  # (repaired once, for the critical path and the re-timing)
    try:
        ctx = AnalysisContext.from_table(raw)
        repaired = ctx.spans
        exemplar.critical_path = set(critical_path_ids(ctx))
        del ctx
    except Exception as exc:
        log.exception("critical path of exemplar trace %s failed", trace_id)
        notes.append(f"Critical path unavailable ({type(exc).__name__}: {exc}).")
    try:
        retimed = retime(repaired if repaired is not None else raw, recommendation)
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
    rec_id = str(recommendation.get("id"))
    touches = index.touching(trace_id, [s.span_id for s in exemplar.spans])
    exemplar.bottleneck = next(
        (set(t.bottleneck_span_ids) for t in touches if t.recommendation_id == rec_id), set()
    )
    exemplar.note = " ".join(notes) or None
    return exemplar


def build_exemplars(
    report: Mapping[str, Any], fetch_trace: TraceFetcher, index: TraceIndex | None = None
) -> dict[str, report_html.Exemplar]:
    out: dict[str, report_html.Exemplar] = {}
    index = index if index is not None else TraceIndex.from_report(report)
    for rec in report.get("recommendations") or []:
        try:
            exemplar = build_exemplar(rec, report, fetch_trace, index)
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
