"""Output forms of a ``hourglass.report/v1`` report: JSON, Markdown (for pull requests) and a rich table."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from hourglass.analysis.design import DESIGN_SECTIONS
from hourglass.analysis.sequence import fmt_ms as ms

if TYPE_CHECKING:  # rich loads for the table format only
    from rich.console import Console

FORMATS = ("json", "markdown", "table")


def render_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def _ms(value: Any) -> str:
    return "–" if value is None else ms(value)


def _share(value: Any) -> str:
    return "–" if value is None else f"{float(value) * 100:.0f} %"


def _cell(text: Any) -> str:
    """Markdown table cell: no pipes or newlines."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _saving(rec: dict[str, Any]) -> str:
    imp = rec.get("impact") or {}
    if imp.get("saved_ms_p50") is None:
        risk = (rec.get("evidence") or {}).get("requests_at_risk")
        at_risk = f"{risk} requests at risk" if risk is not None else "–"
        if imp.get("cost_ms_p50") is not None:  # the measured cost, not a saving (analysis.ranking)
            return f"costs {_ms(imp['cost_ms_p50'])} / {_ms(imp['cost_ms_p95'])}; {at_risk}"
        return at_risk
    return f"{_ms(imp['saved_ms_p50'])} / {_ms(imp['saved_ms_p95'])}"


def _near_misses_markdown(report: dict[str, Any]) -> list[str]:
    """The ``--explain`` section: candidates formed and dropped, with the rule and measured value."""
    if "near_misses" not in report:
        return []
    misses = report.get("near_misses") or []
    omitted = int(report.get("near_misses_omitted") or 0)
    lines = [
        "",
        f"## Seen and not reported: {len(misses) + omitted} near miss{'es' if len(misses) + omitted != 1 else ''}",
        "",
    ]
    if not misses:
        return [*lines, "No candidate was formed and dropped."]
    lines += ["| Kind | Where | Why not reported | Traces | Exemplar trace |", "|---|---|---|---:|---|"]
    for miss in misses:
        exemplar = next(iter(miss.get("trace_ids") or []), None)
        lines.append(
            f"| `{_cell(miss['kind'])}` | {_cell(miss['service'])} · {_cell(miss['operation'])} "
            f"| {_cell(miss['reason'])} | {miss['traces']} | {f'`{exemplar}`' if exemplar else '–'} |"
        )
    if omitted:
        lines += ["", f"… and {omitted} more near misses."]
    return lines


def _nothing_found(report: dict[str, Any], counted: bool = False) -> str:
    """The line of a report without recommendations: of no spans at all (an empty input, or a
    ``--since`` / ``--service`` window with none: not a clean bill of health), or of those it
    analysed (``counted``: with their numbers, which the table prints nowhere else)."""
    spans = int(report.get("spans_analyzed") or 0)
    if spans == 0:
        return "No spans to analyse: the input holds none, or none in its --since / --service window."
    if not counted:
        return "No bottlenecks or fault-tolerance gaps found."
    traces = int(report.get("traces_analyzed") or 0)
    return f"No bottlenecks or fault-tolerance gaps found in {traces:,} traces ({spans:,} spans)."


def render_markdown(report: dict[str, Any]) -> str:
    recs = report.get("recommendations") or []
    lines = [
        f"## Hourglass: {len(recs)} recommendation{'s' if len(recs) != 1 else ''}",
        "",
        f"{report.get('traces_analyzed', 0)} traces and {report.get('spans_analyzed', 0)} spans analysed "
        f"({report.get('generated_at', '')}).",
        "",
    ]
    if not recs:
        lines.append(_nothing_found(report))
        return "\n".join([*lines, *_near_misses_markdown(report)]) + "\n"
    lines += [
        "| # | Recommendation | Where | Saved p50 / p95 | Share of latency | Confidence | Traces |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for rec in recs:
        lines.append(
            f"| {rec['rank']} | {_cell(rec['title'])} | {_cell(rec['service'])} · {_cell(rec['operation'])} "
            f"| {_cell(_saving(rec))} | {_share((rec.get('impact') or {}).get('share_of_root_latency'))} "
            f"| {rec['confidence']:.2f} | {rec['traces_affected']} |"
        )
    for rec in recs:
        ev = rec.get("evidence") or {}
        lines += ["", f"### {rec['rank']}. {rec['title']}", "", rec["summary"], ""]
        if rec.get("actions"):
            lines.append("**What to do**")
            lines.append("")
            lines += [f"- {a}" for a in rec["actions"]]
            lines.append("")
        numbers = {
            k: v
            for k, v in ev.items()
            if k not in ("trace_ids", "span_ids", "interventions") and isinstance(v, int | float | str | bool)
        }
        lines += [
            "<details><summary>Evidence</summary>",
            "",
            f"- kind: `{rec['kind']}` ({rec['category']}), id `{rec['id']}`",
            f"- exemplar traces: {', '.join(f'`{t}`' for t in ev.get('trace_ids') or []) or '–'}",
        ]
        lines += [f"- {k}: {v}" for k, v in numbers.items()]
        lines += ["", "</details>"]
        lines += design_markdown(rec.get("design"))
    lines += workstreams_markdown(report.get("workstreams"))
    return "\n".join([*lines, *_near_misses_markdown(report)]) + "\n"


_FENCE_LANG = {"nodejs": "typescript", "dotnet": "csharp", "pseudocode": "text"}


def _fence(code: str, lang: str) -> list[str]:
    fence = "```"
    while fence in code:
        fence += "`"
    return [f"{fence}{lang}", code, fence]


def design_markdown(design: Any) -> list[str]:
    """A recommendation's ``design``: pattern, the six prose sections, pseudocode and the
    before/after sequence diagrams (Mermaid, which GitHub and GitLab draw in place)."""
    if not isinstance(design, dict):
        return []
    pattern = design.get("pattern") or {}
    params = pattern.get("parameters") or {}
    lines = ["", f"**Design: {pattern.get('name', '')}**", ""]
    if pattern.get("summary"):
        lines += [str(pattern["summary"]), ""]
    if params:
        lines += [", ".join(f"`{k}` = {v}" for k, v in params.items() if v is not None), ""]
    for key, heading in DESIGN_SECTIONS:
        if design.get(key):
            lines += [f"- **{heading}.** {design[key]}"]
    code = design.get("pseudocode") or {}
    if code.get("code"):
        lang = str(code.get("language") or "text")
        lines += ["", f"Pseudocode ({lang}):", "", *_fence(str(code["code"]), _FENCE_LANG.get(lang, lang))]
    seq = design.get("sequence") or {}
    for key, heading in (
        ("before", "Before (exemplar trace, measured)"),
        ("after", "After (what-if re-timing)"),
    ):
        if seq.get(key):
            lines += ["", f"{heading}:", "", *_fence(str(seq[key]), "mermaid")]
    return lines


def workstreams_markdown(workstreams: Any) -> list[str]:
    """The workstream plan: one row per unit of work, in waves."""
    if not workstreams:
        return []
    lines = [
        "",
        "## Workstreams",
        "",
        "| Wave | Workstream | Recommendations | Depends on | Combined saving p50 / p95 |",
        "|---:|---|---|---|---|",
    ]
    for ws in workstreams:
        imp = ws.get("impact") or {}
        saving = (
            f"{_ms(imp.get('saved_ms_p50'))} / {_ms(imp.get('saved_ms_p95'))}"
            if imp.get("saved_ms_p50") is not None
            else "–"
        )
        lines.append(
            f"| {ws.get('wave', '')} | {_cell(ws.get('title', ws.get('id')))} "
            f"| {len(ws.get('recommendations') or [])} | {_cell(', '.join(ws.get('depends_on') or []) or '–')} "
            f"| {saving} |"
        )
    lines.append("")
    lines += [f"- **{_cell(ws.get('id'))}**: {ws.get('summary', '')}" for ws in workstreams]
    return lines


def render_table(report: dict[str, Any], console: Console | None = None) -> str:
    """The report as a rich table (returned as text; colours only when ``console`` is a terminal)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    recs = report.get("recommendations") or []
    table = Table(
        title=f"Hourglass — {report.get('traces_analyzed', 0)} traces, {report.get('spans_analyzed', 0)} spans",
        box=box.SIMPLE_HEAVY,
        show_lines=False,
    )
    table.add_column("#", justify="right")
    table.add_column("Recommendation", overflow="fold", ratio=3)
    table.add_column("Where", overflow="fold", ratio=2)
    table.add_column("Saved p50 / p95", justify="right")
    table.add_column("Share", justify="right")
    table.add_column("Conf.", justify="right")
    table.add_column("Traces", justify="right")
    for rec in recs:
        table.add_row(
            str(rec["rank"]),
            rec["title"],
            f"{rec['service']} · {rec['operation']}",
            _saving(rec),
            _share((rec.get("impact") or {}).get("share_of_root_latency")),
            f"{rec['confidence']:.2f}",
            str(rec["traces_affected"]),
        )
    out = console or Console(width=140, record=True, force_terminal=False, color_system=None)
    with out.capture() as capture:
        if recs:
            out.print(table)
        else:
            out.print(_nothing_found(report, counted=True))
        if "near_misses" in report:
            _print_near_misses(out, report)
    return capture.get()


def _print_near_misses(out: Console, report: dict[str, Any]) -> None:
    """The ``--explain`` table, printed after the recommendations."""
    from rich import box
    from rich.table import Table

    misses = report.get("near_misses") or []
    omitted = int(report.get("near_misses_omitted") or 0)
    if not misses:
        out.print("Near misses: no candidate was formed and dropped.")
        return
    table = Table(
        title=f"Seen and not reported — {len(misses) + omitted} near miss{'es' if len(misses) + omitted != 1 else ''}",
        box=box.SIMPLE_HEAVY,
        show_lines=False,
    )
    table.add_column("Kind", overflow="fold")
    table.add_column("Where", overflow="fold", ratio=2)
    table.add_column("Why not reported", overflow="fold", ratio=3)
    table.add_column("Traces", justify="right")
    table.add_column("Exemplar trace", overflow="fold")
    for miss in misses:
        table.add_row(
            miss["kind"],
            f"{miss['service']} · {miss['operation']}",
            miss["reason"],
            str(miss["traces"]),
            next(iter(miss.get("trace_ids") or []), "–"),
        )
    out.print(table)
    if omitted:
        out.print(f"… and {omitted} more near misses (see --format json).")


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "json":
        return render_json(report)
    if fmt == "markdown":
        return render_markdown(report)
    if fmt == "table":
        return render_table(report)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
