"""The HTML report: ranked recommendations, each with an exemplar trace drawn before and after.

One self-contained page (inline CSS, inline SVG, no script, no external request) that the API
serves at ``/`` and ``hourglass report --html OUT.html`` writes to a file. Everything is
rendered on the server, so the page works offline and in any browser, and can be attached to a
ticket as is.

Each recommendation's exemplar trace is drawn as a waterfall of its spans in tree order, with a
shared time axis in milliseconds:

* bars are coloured by service (one colour per service across the whole page);
* spans on the trace's critical path are drawn at full strength with a dark outline, the others
  faded, so the chain that sets the root's end time stands out;
* the spans the recommendation is about (its evidence) get a red outline;
* beside it the same trace re-timed as if the recommendation were applied (same time scale), with
  removed spans drawn as dashed ghosts and the time saved at the root shaded and labelled.

Trace content is untrusted input: every string taken from a span or a report is HTML-escaped
(``html.escape`` with quotes) before it enters the page, in text, attributes and SVG alike.
Big traces are cut to :data:`MAX_ROWS` rows, keeping the critical path, the bottleneck spans
and their ancestors first, and the figure says how many rows were left out.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hourglass.analysis.design import DESIGN_SECTIONS

MAX_ROWS = 48  # rows per waterfall; more make the figure unreadable in a report
NS_PER_MS = 1_000_000

# Colour-blind-friendly qualitative palette (Okabe-Ito and Tableau 10 blended), mid lightness
# so white and black outlines both read on it.
PALETTE: tuple[str, ...] = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#b07aa1",
    "#76b7b2",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#86bcb6",
    "#bab0ac",
    "#8cd17d",
    "#a0cbe8",
)

# Layout of a waterfall figure, in SVG user units (pixels at 100 % zoom).
LABEL_WIDTH = 250
PANEL_WIDTH = 340
PANEL_GAP = 34
ROW_HEIGHT = 20
BAR_HEIGHT = 13
HEADER_HEIGHT = 44
FOOTER_HEIGHT = 14
INDENT = 9
MAX_INDENT_LEVELS = 8


def esc(value: object) -> str:
    """HTML/SVG-escape any value for text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


@dataclass(frozen=True)
class WaterfallSpan:
    span_id: str
    parent_span_id: str | None
    service: str
    name: str
    start_ns: int
    end_ns: int
    error: bool = False


@dataclass
class Exemplar:
    """One trace to draw for one recommendation: its spans, and the re-timed spans after the change.

    ``after`` maps span id to its re-timed (start_ns, end_ns); a span absent from it was removed
    by the change (merged into a batched call). ``after`` is None when no re-timing was possible,
    and ``note`` then says why.
    """

    trace_id: str
    spans: list[WaterfallSpan]
    critical_path: set[str] = field(default_factory=set)
    bottleneck: set[str] = field(default_factory=set)
    after: dict[str, tuple[int, int]] | None = None
    note: str | None = None
    # when ``spans`` holds only the rows to draw (``exemplars.drawn_rows``) of a larger trace: its
    # span count, its services, its (first start, last end) and its re-timed ones (None: from ``spans``)
    span_count: int | None = None
    services: set[str] | None = None
    bounds: tuple[int, int] | None = None
    after_bounds: tuple[int, int] | None = None


def spans_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[WaterfallSpan]:
    """Span rows (``hourglass.collector.schema.SPAN_SCHEMA`` columns, e.g. ``DataFrame.to_dicts()``) → spans to draw."""
    spans = []
    for row in rows:
        spans.append(
            WaterfallSpan(
                span_id=str(row["span_id"]),
                parent_span_id=row.get("parent_span_id") or None,
                service=str(row.get("service") or "?"),
                name=str(row.get("name") or "?"),
                start_ns=int(row["start_ns"]),
                end_ns=max(int(row["end_ns"]), int(row["start_ns"])),
                error=int(row.get("status_code") or 0) == 2,
            )
        )
    return spans


# ----------------------------------------------------------------------------------------------
# Waterfall layout


def tree_order(spans: Sequence[WaterfallSpan]) -> list[tuple[WaterfallSpan, int]]:
    """Spans in depth-first pre-order (children by start time) with their depth; no recursion.

    Spans whose parent is not in the trace are roots. A cycle in parent links (corrupt input)
    cannot loop: each span is emitted at most once and the leftovers are appended as roots.
    """
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[WaterfallSpan]] = {}
    for s in spans:
        parent = s.parent_span_id if s.parent_span_id in ids and s.parent_span_id != s.span_id else None
        children.setdefault(parent, []).append(s)
    for kids in children.values():
        kids.sort(key=lambda s: (s.start_ns, s.end_ns, s.span_id))
    ordered: list[tuple[WaterfallSpan, int]] = []
    seen: set[str] = set()
    stack: list[tuple[WaterfallSpan, int]] = [(s, 0) for s in reversed(children.get(None, []))]
    while True:
        while stack:
            span, depth = stack.pop()
            if span.span_id in seen:
                continue
            seen.add(span.span_id)
            ordered.append((span, depth))
            stack.extend((kid, depth + 1) for kid in reversed(children.get(span.span_id, [])))
        leftovers = [s for s in spans if s.span_id not in seen]
        if not leftovers:
            return ordered
        stack.append((min(leftovers, key=lambda s: (s.start_ns, s.span_id)), 0))


def select_rows(
    ordered: list[tuple[WaterfallSpan, int]], must_show: set[str], limit: int = MAX_ROWS
) -> list[tuple[WaterfallSpan, int]]:
    """At most ``limit`` rows in tree order: ``must_show`` spans and their ancestors first, then the rest."""
    if len(ordered) <= limit:
        return ordered
    parent_of = {s.span_id: s.parent_span_id for s, _ in ordered}
    keep: set[str] = set()
    for span_id in sorted(must_show):
        current: str | None = span_id
        hops = 0
        while current is not None and current in parent_of and current not in keep and hops < len(parent_of):
            keep.add(current)
            current = parent_of[current]
            hops += 1
    if len(keep) > limit:  # keep the earliest ones in tree order
        keep = {s.span_id for s, _ in ordered if s.span_id in keep}
        keep = set(list(s.span_id for s, _ in ordered if s.span_id in keep)[:limit])
    for span, _ in ordered:
        if len(keep) >= limit:
            break
        keep.add(span.span_id)
    return [(s, d) for s, d in ordered if s.span_id in keep]


def nice_step_ms(span_ms: float, target_ticks: int = 5) -> float:
    """A 1/2/5×10^k tick step giving about ``target_ticks`` ticks over ``span_ms``."""
    if span_ms <= 0:
        return 1.0
    raw = span_ms / target_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * magnitude:
            return float(factor * magnitude)
    return float(10 * magnitude)


def fmt_ms(ms: float) -> str:
    if ms >= 10_000:
        return f"{ms / 1000:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_tick(ms: float, step: float) -> str:
    """An axis label with no more decimals than the tick step needs."""
    if step >= 1000 and ms >= 1000:
        return f"{ms / 1000:g} s"
    decimals = 0 if step >= 1 else min(3, -math.floor(math.log10(step)))
    return f"{ms:.{decimals}f} ms"


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def assign_colours(services: Iterable[str]) -> dict[str, str]:
    """One palette colour per service, by sorted name, so a service has one colour on the whole page."""
    return {service: PALETTE[i % len(PALETTE)] for i, service in enumerate(sorted(set(services)))}


def render_waterfall_svg(exemplar: Exemplar, colours: Mapping[str, str], *, figure_id: str) -> str:
    """The before/after waterfall of one exemplar trace as an inline ``<svg>`` element."""
    spans = exemplar.spans
    if not spans:
        return '<p class="muted">The exemplar trace has no spans in the store.</p>'
    ordered = tree_order(spans)
    rows = select_rows(ordered, exemplar.critical_path | exemplar.bottleneck)
    hidden = (exemplar.span_count if exemplar.span_count is not None else len(ordered)) - len(rows)

    before_start, t_end = exemplar.bounds or (min(s.start_ns for s in spans), max(s.end_ns for s in spans))
    before_ms = (t_end - before_start) / NS_PER_MS
    after = exemplar.after
    t0 = before_start
    after_end_ms: float | None = None  # the re-timed trace's end, in ms from t0
    after_ms: float | None = None  # the re-timed trace's duration
    if after is not None and (exemplar.after_bounds is not None or after):
        after_start, after_end = exemplar.after_bounds or (
            min(start for start, _ in after.values()),
            max(end for _, end in after.values()),
        )
        t0 = min(t0, after_start)
        after_end_ms = (after_end - t0) / NS_PER_MS
        after_ms = (after_end - after_start) / NS_PER_MS
    total_ms = max((t_end - t0) / NS_PER_MS, 1e-3)
    step = nice_step_ms(total_ms)
    scale = (PANEL_WIDTH - 8) / total_ms  # px per ms, shared by both panels

    panels = [("before", LABEL_WIDTH)]
    if after is not None:
        panels.append(("after", LABEL_WIDTH + PANEL_WIDTH + PANEL_GAP))
    width = LABEL_WIDTH + len(panels) * PANEL_WIDTH + (len(panels) - 1) * PANEL_GAP + 70
    height = HEADER_HEIGHT + len(rows) * ROW_HEIGHT + FOOTER_HEIGHT + (16 if hidden else 0)

    out: list[str] = [
        f'<svg class="waterfall" id="{esc(figure_id)}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{esc("Waterfall of trace " + exemplar.trace_id)}">',
        f'<defs><pattern id="{esc(figure_id)}-saved" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="6" height="6" fill="#e8f6ec"/>'
        '<line x1="0" y1="0" x2="0" y2="6" stroke="#59a14f" stroke-width="2"/></pattern></defs>',
    ]
    # Panel headings, axis ticks and grid lines.
    for panel, x0 in panels:
        if panel == "before":
            heading = f"Before · {fmt_ms(before_ms)}"
        else:
            heading = f"After (re-timed) · {fmt_ms(after_ms or 0.0)}"
            saved = before_ms - (after_ms or 0.0)
            if saved > 0:
                share = saved / before_ms if before_ms > 0 else 0.0
                heading += f" · saves {fmt_ms(saved)} ({share:.0%})"
        out.append(f'<text class="panel-title" x="{x0}" y="13">{esc(heading)}</text>')
        ticks = math.floor(total_ms / step + 1e-9)
        for i in range(ticks + 1):
            x = x0 + i * step * scale
            out.append(
                f'<line class="grid" x1="{x:.1f}" y1="{HEADER_HEIGHT - 6}" x2="{x:.1f}" '
                f'y2="{HEADER_HEIGHT + len(rows) * ROW_HEIGHT}"/>'
                f'<text class="tick" x="{x:.1f}" y="{HEADER_HEIGHT - 10}" text-anchor="middle">'
                f"{esc(fmt_tick(i * step, step))}</text>"
            )
    out.append(
        f'<text class="axis-label" x="0" y="{HEADER_HEIGHT - 10}">service · operation</text>'
        f'<line class="axis" x1="0" y1="{HEADER_HEIGHT - 3}" x2="{width - 70}" y2="{HEADER_HEIGHT - 3}"/>'
    )

    for row in range(1, len(rows), 2):
        y = HEADER_HEIGHT + row * ROW_HEIGHT
        out.append(f'<rect class="stripe" x="0" y="{y}" width="{width - 70}" height="{ROW_HEIGHT}"/>')

    # The time saved at the root, shaded in the after panel between the new and the old end.
    if after is not None and after_end_ms is not None:
        x0 = LABEL_WIDTH + PANEL_WIDTH + PANEL_GAP
        old_end_x = x0 + (t_end - t0) / NS_PER_MS * scale
        new_end_x = x0 + after_end_ms * scale
        y_top = HEADER_HEIGHT
        y_bottom = HEADER_HEIGHT + len(rows) * ROW_HEIGHT
        if old_end_x - new_end_x > 0.5:
            saved_ms = (old_end_x - new_end_x) / scale
            out.append(
                f'<g class="saved"><title>{esc(f"Saved at the root: {fmt_ms(saved_ms)}")}</title>'
                f'<rect x="{new_end_x:.1f}" y="{y_top}" width="{old_end_x - new_end_x:.1f}" '
                f'height="{y_bottom - y_top}" fill="url(#{esc(figure_id)}-saved)" opacity="0.8"/>'
                f'<line class="old-end" x1="{old_end_x:.1f}" y1="{y_top}" x2="{old_end_x:.1f}" y2="{y_bottom}"/>'
                f'<text class="saved-label" x="{(new_end_x + old_end_x) / 2:.1f}" y="{y_bottom + 12}" '
                f'text-anchor="middle">{esc("−" + fmt_ms(saved_ms))}</text></g>'
            )

    for row, (span, depth) in enumerate(rows):
        y = HEADER_HEIGHT + row * ROW_HEIGHT
        on_path = span.span_id in exemplar.critical_path
        is_bottleneck = span.span_id in exemplar.bottleneck
        indent = min(depth, MAX_INDENT_LEVELS) * INDENT
        label_chars = max(8, (LABEL_WIDTH - indent - 14) // 6)
        label = truncate(f"{span.service} · {span.name}", label_chars)
        marker = ""
        if is_bottleneck:
            marker = f'<rect class="marker-bottleneck" x="{indent}" y="{y + 4}" width="4" height="{BAR_HEIGHT - 1}"/>'
        elif on_path:
            marker = (
                f'<rect class="marker-path" x="{indent}" y="{y + 4}" width="4" height="{BAR_HEIGHT - 1}"/>'
            )
        duration_ms = (span.end_ns - span.start_ns) / NS_PER_MS
        offset_ms = (span.start_ns - t0) / NS_PER_MS
        roles = [r for r, on in (("on the critical path", on_path), ("bottleneck span", is_bottleneck)) if on]
        if span.error:
            roles.append("error status")
        tooltip = (
            f"{span.service} · {span.name}\nstart +{fmt_ms(offset_ms)}, duration {fmt_ms(duration_ms)}"
            + (f"\n{', '.join(roles)}" if roles else "")
            + f"\nspan {span.span_id}"
        )
        out.append(
            f'<g class="row"><title>{esc(tooltip)}</title>{marker}'
            f'<text class="label{" label-path" if on_path else ""}" x="{indent + 8}" y="{y + 14}">'
            f"{esc(label)}</text>"
        )
        colour = colours.get(span.service, PALETTE[0])
        classes = ["bar"]
        if on_path:
            classes.append("bar-path")
        if is_bottleneck:
            classes.append("bar-bottleneck")
        if span.error:
            classes.append("bar-error")
        for panel, x0 in panels:
            if panel == "before":
                start, end = span.start_ns, span.end_ns
            else:
                assert after is not None
                if span.span_id not in after:
                    x = x0 + (span.start_ns - t0) / NS_PER_MS * scale
                    w = max((span.end_ns - span.start_ns) / NS_PER_MS * scale, 1.5)
                    out.append(
                        f'<rect class="bar-removed" x="{x:.1f}" y="{y + 3.5:.1f}" width="{w:.1f}" '
                        f'height="{BAR_HEIGHT}" rx="2"/>'
                    )
                    continue
                start, end = after[span.span_id]
            x = x0 + (start - t0) / NS_PER_MS * scale
            w = max((end - start) / NS_PER_MS * scale, 1.5)
            out.append(
                f'<rect class="{" ".join(classes)}" x="{x:.1f}" y="{y + 3.5:.1f}" width="{w:.1f}" '
                f'height="{BAR_HEIGHT}" rx="2" fill="{esc(colour)}"/>'
            )
            text = fmt_ms((end - start) / NS_PER_MS)
            text_width = 5.6 * len(text)
            text_x, anchor, text_class = x + w + 3, "start", "dur"
            if text_x + text_width > x0 + PANEL_WIDTH + PANEL_GAP - 4:
                if w > text_width + 8:  # no room after the bar: inside it, at its end
                    text_x, anchor, text_class = x + w - 4, "end", "dur dur-inside"
                else:
                    text_x, anchor = x - 3, "end"
            if span.error:
                out.append(f'<circle class="error-dot" cx="{x + 4:.1f}" cy="{y + 10:.1f}" r="3.2"/>')
            out.append(
                f'<text class="{text_class}" x="{text_x:.1f}" y="{y + 13.5}" text-anchor="{anchor}">'
                f"{esc(text)}</text>"
            )
        out.append("</g>")
    if hidden:
        y = HEADER_HEIGHT + len(rows) * ROW_HEIGHT + 24
        out.append(
            f'<text class="hidden-note" x="0" y="{y}">'
            f"{esc(f'{hidden} more spans not shown (critical path and bottleneck spans are kept).')}</text>"
        )
    out.append("</svg>")
    return "".join(out)


def legend_html(colours: Mapping[str, str], services: Iterable[str]) -> str:
    items = []
    for service in sorted(set(services)):
        items.append(
            f'<span class="legend-item"><span class="swatch" style="background:{esc(colours[service])}"></span>'
            f"{esc(service)}</span>"
        )
    items.append('<span class="legend-item"><span class="swatch swatch-path"></span>critical path</span>')
    items.append(
        '<span class="legend-item"><span class="swatch swatch-bottleneck"></span>bottleneck span</span>'
    )
    items.append(
        '<span class="legend-item"><span class="swatch swatch-off"></span>off the critical path</span>'
    )
    items.append(
        '<span class="legend-item"><span class="swatch swatch-removed"></span>removed by the change</span>'
    )
    items.append('<span class="legend-item"><span class="swatch swatch-saved"></span>time saved</span>')
    return f'<div class="legend">{"".join(items)}</div>'


# ----------------------------------------------------------------------------------------------
# The page

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#dfe3ea; --bg:#f6f7f9; --card:#fff; --accent:#3b5bdb;
  --bad:#d62728; --good:#2f9e44; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
  color:var(--fg); background:var(--bg); }
header.top { background:#1d2330; color:#fff; padding:18px 32px; }
header.top h1 { margin:0; font-size:22px; font-weight:600; letter-spacing:.2px; }
header.top h1 .icon { vertical-align:-3px; margin-right:8px; }
header.top .meta { color:#c4cad6; font-size:13px; margin-top:4px; }
main { max-width:1340px; margin:0 auto; padding:20px 32px 48px; }
.cards { display:flex; gap:14px; flex-wrap:wrap; margin:4px 0 20px; }
.stat { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px 16px; min-width:150px; }
.stat .v { font-size:22px; font-weight:600; }
.stat .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.5px; }
.window-note { background:#fff8e1; border:1px solid #f1dd9b; border-radius:8px; padding:8px 14px; margin:0 0 18px; }
table.summary { width:100%; border-collapse:collapse; background:var(--card); border:1px solid var(--line);
  border-radius:8px; overflow:hidden; margin-bottom:28px; }
table.summary th, table.summary td { padding:7px 10px; border-bottom:1px solid var(--line); text-align:left;
  vertical-align:top; }
table.summary th { background:#eef1f6; font-size:12px; text-transform:uppercase; letter-spacing:.4px;
  color:var(--muted); }
table.summary td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
table.summary a { color:var(--accent); text-decoration:none; }
section.rec { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:18px 22px;
  margin:0 0 22px; }
section.rec h2 { margin:0 0 6px; font-size:18px; }
section.rec h2 .rank { color:var(--muted); font-weight:500; margin-right:6px; }
.badges { margin:0 0 10px; }
.badge { display:inline-block; font-size:12px; padding:1px 8px; border-radius:10px; margin:0 6px 4px 0;
  background:#eef1f6; color:#394150; border:1px solid var(--line); }
.badge.parallelization { background:#e7f0ff; border-color:#c6d8fb; color:#1f4aa8; }
.badge.fault_tolerance { background:#fff0e6; border-color:#f8d3b8; color:#a2460d; }
.impact { display:flex; gap:22px; flex-wrap:wrap; margin:8px 0 12px; }
.impact div { min-width:110px; }
.impact .v { font-size:17px; font-weight:600; font-variant-numeric:tabular-nums; }
.impact .k { font-size:12px; color:var(--muted); }
.summary-text { margin:6px 0 10px; max-width:980px; }
ul.actions { margin:4px 0 12px 20px; padding:0; max-width:980px; }
details.evidence { margin:6px 0 12px; color:var(--muted); font-size:13px; }
details.evidence dl { display:grid; grid-template-columns:max-content 1fr; gap:2px 14px; margin:8px 0 0; }
details.evidence dt { font-weight:600; color:#394150; }
details.evidence dd { margin:0; word-break:break-all; }
figure.exemplar { margin:10px 0 0; padding:12px; border:1px solid var(--line); border-radius:8px; background:#fbfcfd;
  overflow-x:auto; }
figure.exemplar figcaption { font-size:13px; color:var(--muted); margin-bottom:8px; }
figure.exemplar code { font-size:12px; }
.legend { display:flex; flex-wrap:wrap; gap:4px 14px; font-size:12px; color:#394150; margin:8px 0 0; }
.legend-item { display:inline-flex; align-items:center; gap:5px; }
.swatch { display:inline-block; width:16px; height:10px; border-radius:2px; }
.swatch-path { background:#8a93a6; outline:2px solid #1d2330; outline-offset:-2px; }
.swatch-bottleneck { background:#8a93a6; outline:2px solid var(--bad); outline-offset:-2px; }
.swatch-off { background:#8a93a6; opacity:.4; }
.swatch-removed { border:1.5px dashed #7b8394; }
.swatch-saved { background:repeating-linear-gradient(45deg,#59a14f 0 2px,#e8f6ec 2px 6px); }
svg.waterfall { display:block; font-family:inherit; }
svg.waterfall .panel-title { font-size:13px; font-weight:600; fill:#1d2330; }
svg.waterfall .tick, svg.waterfall .axis-label { font-size:10.5px; fill:#5b6475; }
svg.waterfall .grid { stroke:#e6e9ef; stroke-width:1; }
svg.waterfall .axis { stroke:#c9ced8; stroke-width:1; }
svg.waterfall .stripe { fill:#f3f5f8; }
svg.waterfall .label { font-size:11.5px; fill:#5b6475; }
svg.waterfall .label-path { fill:#1d2330; font-weight:600; }
svg.waterfall .bar { opacity:.42; }
svg.waterfall .bar-path { opacity:1; stroke:#1d2330; stroke-width:1.2; }
svg.waterfall .bar-bottleneck { opacity:1; stroke:#d62728; stroke-width:2.2; }
svg.waterfall .error-dot { fill:#d62728; stroke:#fff; stroke-width:1; }
svg.waterfall .bar-removed { fill:none; stroke:#7b8394; stroke-width:1.2; stroke-dasharray:3 2; }
svg.waterfall .marker-path { fill:#1d2330; }
svg.waterfall .marker-bottleneck { fill:#d62728; }
svg.waterfall .dur { font-size:10px; fill:#5b6475; font-variant-numeric:tabular-nums; }
svg.waterfall .dur-inside { fill:#fff; font-weight:600; }
svg.waterfall .old-end { stroke:#2f9e44; stroke-width:1.2; stroke-dasharray:4 3; }
svg.waterfall .saved-label { font-size:11px; font-weight:700; fill:#2f9e44; }
svg.waterfall .hidden-note { font-size:11px; fill:#5b6475; font-style:italic; }
svg.waterfall g.row:hover .label { fill:var(--accent); }
.empty { background:var(--card); border:1px dashed var(--line); border-radius:10px; padding:28px; text-align:center;
  color:var(--muted); }
.muted { color:var(--muted); }
.summary-text code, ul.actions code { font:12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  background:#eef1f6; border:1px solid var(--line); border-radius:4px; padding:0 4px; }
footer { color:var(--muted); font-size:12px; text-align:center; padding:16px; }
"""


HOURGLASS_ICON = (
    '<svg class="icon" width="18" height="22" viewBox="0 0 18 22" aria-hidden="true">'
    '<path d="M2 1h14M2 21h14M4 1c0 6 10 7 10 10S4 15 4 21M14 1c0 6-10 7-10 10s10 4 10 10" '
    'fill="none" stroke="#f2b632" stroke-width="2" stroke-linecap="round"/>'
    '<path d="M6.5 18.5 9 15.5l2.5 3z" fill="#f2b632"/></svg>'
)


_CODE_SPAN = re.compile(r"`([^`\n]{1,300})`")


def prose(text: object) -> str:
    """Escape writer text, then show its `backtick` spans (names of services, operations) as code."""
    return _CODE_SPAN.sub(r"<code>\1</code>", esc(text))


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _ms(value: Any) -> str:
    return "—" if value is None else fmt_ms(float(value))


def _share(value: Any) -> str:
    return "—" if value is None else f"{float(value):.0%}"


def _anchor(rec: Mapping[str, Any]) -> str:
    return "rec-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in str(rec.get("id", "")))


def _evidence_html(evidence: Mapping[str, Any]) -> str:
    rows = []
    for key, value in evidence.items():
        if key in ("trace_ids", "span_ids"):
            shown = ", ".join(str(v) for v in list(value or [])[:5])
            more = len(value or []) - 5
            value_text = shown + (f" (+{more} more)" if more > 0 else "")
        elif isinstance(value, float):
            value_text = f"{value:,.3f}".rstrip("0").rstrip(".")
        elif isinstance(value, (list, tuple)):
            value_text = ", ".join(str(v) for v in value[:8]) + (" …" if len(value) > 8 else "")
        elif isinstance(value, dict):
            value_text = ", ".join(f"{k}={v}" for k, v in list(value.items())[:8])
        else:
            value_text = str(value)
        rows.append(f"<dt>{esc(key)}</dt><dd>{esc(truncate(value_text, 400))}</dd>")
    if not rows:
        return ""
    return f'<details class="evidence"><summary>Evidence</summary><dl>{"".join(rows)}</dl></details>'


def render_report_html(
    report: Mapping[str, Any],
    exemplars: Mapping[str, Exemplar] | None = None,
    *,
    title: str = "Hourglass report",
    source: str | None = None,
) -> str:
    """The whole page for a ``hourglass.report/v1`` object; ``exemplars`` maps recommendation id → trace."""
    exemplars = exemplars or {}
    recs: list[Mapping[str, Any]] = list(report.get("recommendations") or [])
    services: set[str] = set()
    for ex in exemplars.values():
        services.update(ex.services if ex.services is not None else (s.service for s in ex.spans))
    endpoint_paths = list(report.get("critical_paths") or [])
    services.update(icicle_services(endpoint_paths))
    colours = assign_colours(services)

    generated = report.get("generated_at") or ""
    meta_bits = [f"generated {generated}" if generated else None, source]
    writer = report.get("writer")
    writer_name = writer.get("name") if isinstance(writer, Mapping) else writer
    if writer_name:
        meta_bits.append(f"written by {writer_name}")
    if isinstance(writer, Mapping) and writer.get("fallback_reason"):
        meta_bits.append(f"(fallback: {writer['fallback_reason']})")
    meta = " · ".join(b for b in meta_bits if b)

    total_saved = sum(float((r.get("impact") or {}).get("saved_ms_total") or 0.0) for r in recs)
    parts: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # Nothing on this page may load from anywhere: no script, no remote style, image or font.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">",
        f"<title>{esc(title)}</title><style>{CSS}{DESIGN_CSS}{_sequence_css()}</style></head><body>",
        f'<header class="top"><h1>{HOURGLASS_ICON} {esc(title)}</h1>'
        f'<div class="meta">{esc(meta)}</div></header><main>',
        '<div class="cards">',
        f'<div class="stat"><div class="v">{_num(report.get("traces_analyzed", 0))}</div>'
        '<div class="k">traces analysed</div></div>',
        f'<div class="stat"><div class="v">{_num(report.get("spans_analyzed", 0))}</div>'
        '<div class="k">spans analysed</div></div>',
        f'<div class="stat"><div class="v">{len(recs)}</div><div class="k">recommendations</div></div>',
        f'<div class="stat"><div class="v">{esc(fmt_ms(total_saved))}</div>'
        '<div class="k">latency saved, all traces</div></div>',
        "</div>",
    ]
    window = report.get("window")
    if isinstance(window, Mapping) and window.get("spans_left_out"):
        parts.append(
            f'<p class="window-note">This report covers the newest {_num(window.get("spans", 0))} spans '
            f"(traces from {esc(str(window.get('from') or '?')[:19].replace('T', ' '))} UTC on); "
            f"{_num(window.get('spans_left_out', 0))} older stored spans of "
            f"{_num(window.get('traces_left_out', 0))} traces are left out "
            "(HOURGLASS_REPORT_MAX_SPANS).</p>"
        )
    if not recs:
        parts.append(
            '<div class="empty"><h2>No bottlenecks found</h2><p>None of the analysed traces shows serialized '
            "calls, N+1 queries, lock contention, fan-out imbalance or fault-tolerance gaps worth a change."
            "</p></div>"
        )
    else:
        parts.append(
            '<table class="summary"><thead><tr><th>#</th><th>Recommendation</th><th>Kind</th><th>Where</th>'
            '<th class="num">Saved p50</th><th class="num">Saved p95</th><th class="num">Share of root</th>'
            '<th class="num">Traces</th><th class="num">Confidence</th></tr></thead><tbody>'
        )
        for rec in recs:
            impact = rec.get("impact") or {}
            parts.append(
                f"<tr><td>{esc(rec.get('rank', ''))}</td>"
                f'<td><a href="#{esc(_anchor(rec))}">{prose(rec.get("title") or rec.get("kind"))}</a></td>'
                f"<td>{esc(rec.get('kind'))}</td>"
                f"<td>{esc(rec.get('service'))} · {esc(rec.get('operation'))}</td>"
                f'<td class="num">{_ms(impact.get("saved_ms_p50"))}</td>'
                f'<td class="num">{_ms(impact.get("saved_ms_p95"))}</td>'
                f'<td class="num">{_share(impact.get("share_of_root_latency"))}</td>'
                f'<td class="num">{_num(rec.get("traces_affected"))}</td>'
                f'<td class="num">{_share(rec.get("confidence"))}</td></tr>'
            )
        parts.append("</tbody></table>")
    parts.append(workstreams_html(report))
    for rec in recs:
        parts.append(_recommendation_html(rec, exemplars.get(str(rec.get("id"))), colours))
    parts.append(critical_paths_html(endpoint_paths, colours))
    parts.append(
        f"</main><footer>Hourglass · {esc(report.get('schema', 'hourglass.report/v1'))} · "
        "self-contained page: no scripts, nothing loaded from the network</footer></body></html>"
    )
    return "".join(parts)


def _recommendation_html(
    rec: Mapping[str, Any], exemplar: Exemplar | None, colours: Mapping[str, str]
) -> str:
    impact = rec.get("impact") or {}
    category = str(rec.get("category") or "")
    targets = ", ".join(
        f"{t.get('service', '')} · {t.get('operation', '')}" for t in rec.get("targets") or []
    )
    out = [
        f'<section class="rec" id="{esc(_anchor(rec))}">',
        f'<h2><span class="rank">#{esc(rec.get("rank", ""))}</span>{prose(rec.get("title") or rec.get("kind"))}</h2>',
        '<div class="badges">',
        f'<span class="badge {esc(category)}">{esc(category.replace("_", " "))}</span>',
        f'<span class="badge">{esc(rec.get("kind"))}</span>',
        f'<span class="badge">in {esc(rec.get("service"))} · {esc(rec.get("operation"))}</span>',
    ]
    if targets:
        out.append(f'<span class="badge">calls {esc(targets)}</span>')
    out.append(f'<span class="badge">id {esc(rec.get("id"))}</span></div>')
    out.append('<div class="impact">')
    figures = [
        ("saved per trace, p50", _ms(impact.get("saved_ms_p50"))),
        ("saved per trace, p95", _ms(impact.get("saved_ms_p95"))),
        ("saved in total", _ms(impact.get("saved_ms_total"))),
        ("share of root latency", _share(impact.get("share_of_root_latency"))),
        ("traces affected", _num(rec.get("traces_affected"))),
        ("occurrences", _num(rec.get("occurrences"))),
        ("confidence", _share(rec.get("confidence"))),
    ]
    at_risk = rec.get("requests_at_risk")
    if at_risk is None:
        at_risk = (rec.get("evidence") or {}).get("requests_at_risk")
    if at_risk is not None:
        figures.append(("requests at risk", _num(at_risk)))
    for key, value in figures:
        out.append(f'<div><div class="v">{esc(value)}</div><div class="k">{esc(key)}</div></div>')
    out.append("</div>")
    if rec.get("summary"):
        out.append(f'<p class="summary-text">{prose(rec.get("summary"))}</p>')
    actions = rec.get("actions") or []
    if actions:
        out.append('<ul class="actions">' + "".join(f"<li>{prose(a)}</li>" for a in actions) + "</ul>")
    out.append(_evidence_html(rec.get("evidence") or {}))
    if exemplar is not None:
        figure_id = "wf-" + _anchor(rec)[4:]
        out.append(
            f'<figure class="exemplar"><figcaption>Exemplar trace <code>{esc(exemplar.trace_id)}</code>'
            + (
                ": before, and re-timed as if this recommendation were applied (same time scale)."
                if exemplar.after is not None
                else "."
            )
            + " Hover a span for details."
            + (f" {esc(exemplar.note)}" if exemplar.note else "")
            + "</figcaption>"
        )
        out.append(render_waterfall_svg(exemplar, colours, figure_id=figure_id))
        out.append(
            legend_html(
                colours,
                exemplar.services if exemplar.services is not None else {s.service for s in exemplar.spans},
            )
        )
        out.append("</figure>")
    out.append(design_html(rec))
    out.append("</section>")
    return "".join(out)


# ----------------------------------------------------------------------------------------------
# Where each endpoint waits: the critical path aggregated across its traces, as an icicle (issue 14)

ICICLE_WIDTH = 1180
ICICLE_ROW = 26
ICICLE_MIN_LABEL_PX = 56


def icicle_services(paths: Iterable[Mapping[str, Any]]) -> set[str]:
    return {str(n.get("service")) for p in paths for n in p.get("icicle") or []}


def render_icicle_svg(path: Mapping[str, Any], colours: Mapping[str, str], *, figure_id: str) -> str:
    """One endpoint's merged critical path (``hourglass.analysis.endpoint_path`` icicle nodes) as inline SVG: the
    root spans the full width; each node sits under its parent with a width proportional to its time on
    the path (per trace on average); the uncovered part of a node is its own time."""
    nodes = [n for n in path.get("icicle") or [] if isinstance(n, Mapping)]
    if not nodes:
        return ""
    children: dict[int | None, list[Mapping[str, Any]]] = {}
    for node in nodes:
        children.setdefault(node.get("parent"), []).append(node)
    roots = children.get(None, [])
    total = sum(float(n.get("ms") or 0.0) for n in roots) or 1.0
    scale = ICICLE_WIDTH / total
    placed: list[tuple[Mapping[str, Any], float, float, int]] = []  # node, x, width, level
    stack = [(n, 0.0, 0) for n in reversed(roots)]
    x_next_root = 0.0  # several roots (only if the data has them) sit side by side
    while stack:  # depth-first with an explicit stack: no recursion
        node, x, level = stack.pop()
        if level == 0:
            x = x_next_root
            x_next_root += float(node.get("ms") or 0.0) * scale
        width = float(node.get("ms") or 0.0) * scale
        placed.append((node, x, width, level))
        kids = sorted(children.get(node.get("id"), []), key=lambda k: -float(k.get("ms") or 0.0))
        cursor = x
        pending = []
        for kid in kids:
            pending.append((kid, cursor, level + 1))
            cursor += float(kid.get("ms") or 0.0) * scale
        stack.extend(reversed(pending))
    levels = 1 + max(level for _, _, _, level in placed)
    height = levels * ICICLE_ROW + 4
    out = [
        f'<svg class="icicle" id="{esc(figure_id)}" xmlns="http://www.w3.org/2000/svg" width="{ICICLE_WIDTH}" height="{height}" '
        f'viewBox="0 0 {ICICLE_WIDTH} {height}" role="img" '
        f'aria-label="Critical path of {esc(path.get("service"))} {esc(path.get("operation"))}">'
    ]
    for node, x, width, level in placed:
        y = level * ICICLE_ROW
        service = str(node.get("service"))
        colour = colours.get(service, "#8a93a6")
        ms = float(node.get("ms") or 0.0)
        self_ms = float(node.get("self_ms") or 0.0)
        share = ms / total
        tip = (
            f"{service} · {node.get('operation')}\n{fmt_ms(ms)} on the critical path per request "
            f"({share:.0%} of the endpoint), {fmt_ms(self_ms)} of it its own time"
        )
        out.append(
            f'<g class="node"><title>{esc(tip)}</title>'
            f'<rect x="{x:.1f}" y="{y + 1}" width="{max(width - 1, 0.5):.1f}" height="{ICICLE_ROW - 3}" '
            f'rx="2" fill="{esc(colour)}" stroke="#1d2330" stroke-width="0.6"/>'
        )
        if width >= ICICLE_MIN_LABEL_PX:
            chars = int(width / 6.6)
            label = truncate(f"{node.get('operation')} · {fmt_ms(ms)}", chars)
            out.append(
                f'<text x="{x + 4:.1f}" y="{y + ICICLE_ROW / 2 + 3:.1f}" font-size="11" fill="#fff" '
                f'font-weight="600">{esc(label)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def critical_paths_html(paths: list[Mapping[str, Any]], colours: Mapping[str, str]) -> str:
    """The "Where each endpoint waits" section: per endpoint, its icicle, the operations with the largest
    share of the critical path and the most frequent paths."""
    if not paths:
        return ""
    out = [
        '<section class="rec" id="critical-paths"><h2>Where each endpoint waits</h2>',
        '<p class="muted">The critical path of each endpoint merged across its traces (self time on the '
        "path, per request on average): wide boxes are where requests wait. Width = time on the critical "
        "path including what it waits on below it; the uncovered part of a box is its own time.</p>",
    ]
    for i, path in enumerate(paths):
        ops = list(path.get("operations") or [])[:5]
        variants = list(path.get("paths") or [])[:3]
        out.append(
            f'<figure class="exemplar"><figcaption><strong>{esc(path.get("service"))} · '
            f"{esc(path.get('operation'))}</strong> — {_num(path.get('traces'))} traces, root p50 "
            f"{_ms(path.get('root_ms_p50'))}, p95 {_ms(path.get('root_ms_p95'))}</figcaption>"
        )
        out.append(render_icicle_svg(path, colours, figure_id=f"icicle-{i}"))
        in_icicle = sorted({str(n.get("service")) for n in path.get("icicle") or []})
        if in_icicle:
            swatches = "".join(
                f'<span class="legend-item"><span class="swatch" style="background:{esc(colours.get(s, "#8a93a6"))}">'
                f"</span>{esc(s)}</span>"
                for s in in_icicle
            )
            out.append(
                f'<div class="legend">{swatches}<span class="legend-item muted">box width: mean time '
                "on the critical path per request</span></div>"
            )
        if ops:
            out.append(
                '<table class="summary"><thead><tr><th>On the critical path</th><th class="num">Share</th>'
                '<th class="num">Self p50</th><th class="num">Self p95</th><th class="num">Traces</th></tr>'
                "</thead><tbody>"
            )
            for op in ops:
                out.append(
                    f"<tr><td>{esc(op.get('service'))} · {esc(op.get('operation'))}</td>"
                    f'<td class="num">{_share(op.get("share"))}</td>'
                    f'<td class="num">{_ms(op.get("ms_p50"))}</td><td class="num">{_ms(op.get("ms_p95"))}</td>'
                    f'<td class="num">{_num(op.get("traces"))}</td></tr>'
                )
            out.append("</tbody></table>")
        for variant in variants:
            out.append(
                f'<div class="muted">{_share(variant.get("share_of_traces"))} of traces: '
                f"{esc(' → '.join(str(s) for s in variant.get('steps') or []))}</div>"
            )
        out.append("</figure>")
    out.append("</section>")
    return "".join(out)


# Design (issue 13): sequence diagrams, pattern, prose sections, pseudocode; the workstream plan


def _sequence_css() -> str:
    from hourglass.api.sequence_svg import SEQUENCE_CSS

    return SEQUENCE_CSS


def design_html(rec: Mapping[str, Any]) -> str:
    """A recommendation's ``design``: before/after sequence diagrams as inline SVG (drawn here from
    the Mermaid text), the pattern and its parameters, the prose sections and the pseudocode."""
    from hourglass.api.sequence_svg import render_sequence_svg

    design = rec.get("design")
    if not isinstance(design, Mapping):
        return ""
    out = ['<div class="design">']
    seq = design.get("sequence") or {}
    figure_id = "seq-" + _anchor(rec)[4:]
    diagrams = [
        render_sequence_svg(str(seq[key]), figure_id=f"{figure_id}-{key}", title=title)
        for key, title in (("before", "Before · measured"), ("after", "After · what-if re-timing"))
        if seq.get(key)
    ]
    diagrams = [d for d in diagrams if d]
    if diagrams:
        trace = f" of exemplar trace <code>{esc(seq.get('trace_id'))}</code>" if seq.get("trace_id") else ""
        out.append(
            f'<figure class="sequences"><figcaption>Sequence{trace}: who calls whom, in order, with the measured '
            "durations, and the same flow as the what-if re-times it.</figcaption>"
            f'<div class="sequence-pair">{"".join(diagrams)}</div></figure>'
        )
    pattern = design.get("pattern") or {}
    params = pattern.get("parameters") or {}
    out.append(f"<h3>Design: {esc(pattern.get('name', ''))}</h3>")
    if params:
        out.append(
            '<div class="badges">'
            + "".join(
                f'<span class="badge param">{esc(k)} = {esc(_num(v, 3) if isinstance(v, float) else v)}</span>'
                for k, v in params.items()
                if v is not None
            )
            + "</div>"
        )
    if pattern.get("summary"):
        out.append(f'<p class="summary-text">{prose(pattern["summary"])}</p>')
    rows = [
        f"<dt>{esc(heading)}</dt><dd>{prose(design[key])}</dd>"
        for key, heading in DESIGN_SECTIONS
        if design.get(key)
    ]
    if rows:
        out.append(f'<dl class="design-sections">{"".join(rows)}</dl>')
    code = design.get("pseudocode") or {}
    if code.get("code"):
        out.append(
            f'<details class="pseudocode" open><summary>Pseudocode ({esc(code.get("language") or "pseudocode")})'
            f"</summary><pre><code>{esc(code['code'])}</code></pre></details>"
        )
    out.append("</div>")
    return "".join(out)


def workstreams_html(report: Mapping[str, Any]) -> str:
    """The workstream plan: units of work per service, their waves, dependencies and combined saving."""
    workstreams = report.get("workstreams") or []
    if not workstreams:
        return ""
    rows = []
    for ws in workstreams:
        imp = ws.get("impact") or {}
        rows.append(
            f'<tr id="{esc(ws.get("id"))}"><td class="num">{esc(ws.get("wave", ""))}</td>'
            f'<td>{prose(ws.get("title") or ws.get("id"))}<div class="muted">{prose(ws.get("summary", ""))}</div></td>'
            f"<td>{esc(ws.get('owner') or ws.get('namespace') or '—')}</td>"
            f"<td>{esc(', '.join(ws.get('depends_on') or []) or '—')}</td>"
            f'<td class="num">{_ms(imp.get("saved_ms_p50"))}</td><td class="num">{_ms(imp.get("saved_ms_p95"))}</td></tr>'
        )
    return (
        '<section class="workstreams"><h2>Workstreams</h2><p class="muted">One unit of work per service that must '
        "change. Workstreams of one wave can proceed in parallel; a later wave waits for what it depends on. "
        "The saving is a what-if of the whole group, not a sum.</p>"
        '<table class="summary"><thead><tr><th class="num">Wave</th><th>Workstream</th><th>Owner</th>'
        '<th>Depends on</th><th class="num">Saved p50</th><th class="num">Saved p95</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table></section>"
    )


DESIGN_CSS = """
.design { margin-top:14px; border-top:1px solid var(--line); padding-top:10px; }
.design h3 { margin:10px 0 6px; font-size:15px; }
.badge.param { background:#f3f0ff; border-color:#d9d0fb; color:#4b3a99; font-variant-numeric:tabular-nums; }
dl.design-sections { display:grid; grid-template-columns:max-content 1fr; gap:4px 14px; margin:8px 0; max-width:1100px; }
dl.design-sections dt { font-weight:600; color:#394150; }
dl.design-sections dd { margin:0; }
dl.design-sections code { font:12.5px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background:#eef1f6;
  border:1px solid var(--line); border-radius:4px; padding:0 4px; }
details.pseudocode pre { background:#1d2330; color:#e8ecf3; padding:10px 12px; border-radius:6px; overflow-x:auto;
  font:12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
figure.sequences { margin:10px 0 0; padding:12px; border:1px solid var(--line); border-radius:8px; background:#fbfcfd;
  overflow-x:auto; }
figure.sequences figcaption { font-size:13px; color:var(--muted); margin-bottom:8px; }
.sequence-pair { display:flex; flex-wrap:wrap; gap:14px; align-items:flex-start; }
section.workstreams h2 { font-size:18px; margin:0 0 4px; }
"""
