"""Exemplar pages: the trace pictures of the HTML report (spans, critical path, bottleneck and
the re-timed picture of a recommendation applied)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
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
    rec_id = str(recommendation.get("id"))
    columns = ("span_id", "parent_span_id", "service", "name", "start_ns", "end_ns", "status_code")
    retimed: pl.DataFrame | None = None
    try:
        retimed = retime(repaired if repaired is not None else raw, recommendation)
    except Exception as exc:
        log.exception("re-timing exemplar trace %s for %s failed", trace_id, recommendation.get("id"))
        notes.append(f"Re-timing unavailable ({type(exc).__name__}: {exc}).")
    if retimed is None:
        exemplar.spans = report_html.spans_from_rows(
            raw.select([c for c in columns if c in raw.column_names]).to_pylist()
        )
        span_ids = [s.span_id for s in exemplar.spans]
    else:
        span_ids = [str(i) for i in retimed["span_id"].to_list()]
    touches = index.touching(trace_id, span_ids)
    exemplar.bottleneck = next(
        (set(t.bottleneck_span_ids) for t in touches if t.recommendation_id == rec_id), set()
    )
    if retimed is not None:
        removed = retimed["removed"].fill_null(False)
        drawn = drawn_rows(retimed, exemplar.critical_path | exemplar.bottleneck)
        # every span to the page, which orders and cuts them itself; or the rows it draws, and
        # what it measures over every span
        shown = retimed if drawn is None else retimed[drawn]
        exemplar.spans = report_html.spans_from_rows(shown.select(columns).to_dicts())
        kept = shown.filter(~shown["removed"].fill_null(False))
        exemplar.after = {
            str(i): (int(a), int(b))
            for i, a, b in zip(kept["span_id"], kept["new_start_ns"], kept["new_end_ns"], strict=True)
        }
        if drawn is None:
            moves = not all(
                exemplar.after.get(span.span_id) == (span.start_ns, span.end_ns) for span in exemplar.spans
            )
        else:
            start = retimed["start_ns"].to_numpy().astype(np.int64)
            end = np.maximum(retimed["end_ns"].to_numpy().astype(np.int64), start)
            new_start = retimed["new_start_ns"].to_numpy().astype(np.int64)
            new_end = retimed["new_end_ns"].to_numpy().astype(np.int64)
            gone = removed.to_numpy().astype(bool)
            exemplar.span_count = retimed.height
            exemplar.services = {str(s or "?") for s in retimed["service"].unique().to_list()}
            exemplar.bounds = (int(start.min()), int(end.max()))
            if not gone.all():
                exemplar.after_bounds = (int(new_start[~gone].min()), int(new_end[~gone].max()))
            moves = bool(gone.any()) or not (
                bool((new_start == start).all()) and bool((new_end == end).all())
            )
        if not moves:
            # Nothing moves (fault-tolerance gaps carry no latency estimate): one picture is enough.
            exemplar.after = None
            notes.append(
                "Applying it does not change this trace's timing; the picture shows where it happens."
            )
    exemplar.note = " ".join(notes) or None
    return exemplar


# the most levels of a trace :func:`drawn_rows` orders by columns (a deeper one is ordered as before)
DRAWN_MAX_DEPTH = 256


def drawn_rows(
    spans: pl.DataFrame, must_show: set[str], limit: int = report_html.MAX_ROWS
) -> np.ndarray | None:
    """The rows of ``spans`` (one trace's, with ``span_id``, ``parent_span_id``, ``start_ns`` and
    ``end_ns``) that the page's waterfall draws, in its tree order: what
    ``report_html.select_rows(report_html.tree_order(...), must_show, limit)`` keeps of every
    span, computed on the columns, without a Python object per span (a 100k-span exemplar took
    seconds of each report page). The rows kept hold each one's ancestors, so the page orders
    them and places each at its depth as it would among all the spans. None when every span is
    drawn anyway (``limit`` or fewer), or a span id repeats, a parent link loops or the trace is
    deeper than ``DRAWN_MAX_DEPTH``: the page is given every span then, as before."""
    n = spans.height
    if n <= limit:
        return None
    ids = spans["span_id"].cast(pl.String)
    if ids.null_count() or ids.n_unique() != n:
        return None
    start = spans["start_ns"].to_numpy().astype(np.int64)
    end = np.maximum(spans["end_ns"].to_numpy().astype(np.int64), start)  # (as ``spans_from_rows``)
    at = pl.Series(np.arange(n, dtype=np.int64))
    parent = (
        spans["parent_span_id"]
        .cast(pl.String)
        .replace_strict(ids, at, default=-1, return_dtype=pl.Int64)
        .fill_null(-1)
        .to_numpy()
    )
    parent = np.where(parent == np.arange(n), -1, parent)  # (a span its own parent is a root)
    rank = ids.rank("dense").to_numpy().astype(np.int64)
    # every span's level, from the roots down; a span never reached is in a loop of parent links
    level = np.full(n, -1, dtype=np.int64)
    level[parent < 0] = 0
    depth = 0
    while True:
        below = (parent >= 0) & (level < 0)
        below[below] = level[parent[below]] == depth
        if not below.any():
            break
        depth += 1
        if depth > DRAWN_MAX_DEPTH:
            return None
        level[below] = depth
    if (level < 0).any():
        return None
    # subtree sizes, from the deepest level up
    size = np.ones(n, dtype=np.int64)
    for d in range(depth, 0, -1):
        nodes = np.flatnonzero(level == d)
        np.add.at(size, parent[nodes], size[nodes])
    # siblings in the page's order (start, end, span id); each one's place after its parent is
    # one plus the sizes of the siblings before it
    order = np.lexsort((rank, end, start, parent))
    grouped = parent[order]
    sized = size[order]
    before = np.cumsum(sized) - sized
    first = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    group_of = np.repeat(first, np.diff(np.r_[first, n]))
    earlier = np.empty(n, dtype=np.int64)
    earlier[order] = before - before[group_of]
    place = np.zeros(n, dtype=np.int64)
    roots = level == 0
    place[roots] = earlier[roots]
    for d in range(1, depth + 1):
        nodes = np.flatnonzero(level == d)
        place[nodes] = place[parent[nodes]] + 1 + earlier[nodes]
    tree = np.argsort(place)  # the spans in tree order
    keep = ids.is_in(pl.Series(sorted(must_show), dtype=pl.String).implode()).to_numpy().astype(bool)
    climbing = np.flatnonzero(keep)
    while climbing.size:  # and their ancestors
        up = parent[climbing]
        up = np.unique(up[up >= 0])
        up = up[~keep[up]]
        keep[up] = True
        climbing = up
    if keep.sum() > limit:  # the first of them in tree order
        first_kept = tree[keep[tree]][:limit]
        keep[:] = False
        keep[first_kept] = True
    room = limit - int(keep.sum())
    if room > 0:  # then the first spans in tree order
        keep[tree[~keep[tree]][:room]] = True
    return tree[keep[tree]]


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
