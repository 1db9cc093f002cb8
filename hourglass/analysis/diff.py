"""Compare two ``hourglass.report/v1`` reports (a baseline and a candidate run of the same load test).

Recommendations are matched by ``id`` (stable: the same bottleneck gets the same id across runs).

- **new**: in the candidate, not in the baseline.
- **resolved**: in the baseline, not in the candidate.
- **grew** / **improved**: in both, and at least one of these moved by the relative threshold
  (default 25 %) AND an absolute floor, up (grew) or down (improved):

  | measure | floor | why |
  |---|---|---|
  | ``saved_ms_p50`` (root latency a fix would save per affected request) | 2 ms | the cost per request, independent of how many requests the run made |
  | saved ms per analysed trace (``saved_ms_total / traces_analyzed``) | 1 ms | cost spread over all traffic: catches a bottleneck that now hits more requests |
  | occurrences per analysed trace | 5 more occurrences | how often it happens (e.g. more retries, more N+1 rounds) |

  Normalising by ``traces_analyzed`` keeps two load tests of different lengths comparable; the
  floors keep sub-millisecond jitter from flagging a change. A measure that grew wins over one that
  shrank (a bottleneck that got slower but rarer is still reported as grown).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hourglass.analysis.report_numbers import num

DIFF_SCHEMA = "hourglass.diff/v1"
DEFAULT_GROWTH_THRESHOLD = 0.25
P50_FLOOR_MS = 2.0
PER_TRACE_FLOOR_MS = 1.0
OCCURRENCES_FLOOR = 5


@dataclass(frozen=True)
class Measures:
    saved_ms_p50: float
    saved_ms_per_trace: float
    occurrences_per_trace: float
    occurrences: int

    @classmethod
    def of(cls, recommendation: dict[str, Any], traces_analyzed: int) -> Measures:
        impact = recommendation.get("impact") or {}
        traces = max(traces_analyzed, 1)
        occurrences = int(num(recommendation.get("occurrences")))
        return cls(
            saved_ms_p50=num(impact.get("saved_ms_p50")),
            saved_ms_per_trace=num(impact.get("saved_ms_total")) / traces,
            occurrences_per_trace=occurrences / traces,
            occurrences=occurrences,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "saved_ms_p50": round(self.saved_ms_p50, 3),
            "saved_ms_per_trace": round(self.saved_ms_per_trace, 3),
            "occurrences_per_trace": round(self.occurrences_per_trace, 4),
            "occurrences": self.occurrences,
        }


def _moved(base: float, cand: float, threshold: float, floor: float) -> int:
    """+1 when ``cand`` is up by ≥ threshold (relative) and ≥ floor (absolute), -1 when down so."""
    delta = cand - base
    if abs(delta) < floor:
        return 0
    relative = abs(delta) / base if base > 0 else float("inf")
    if relative < threshold:
        return 0
    return 1 if delta > 0 else -1


@dataclass
class Change:
    recommendation: dict[str, Any]  # the candidate's recommendation
    base: Measures
    candidate: Measures
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            **_summary(self.recommendation),
            "base": self.base.as_dict(),
            "candidate": self.candidate.as_dict(),
            "reasons": self.reasons,
        }


@dataclass
class ReportDiff:
    base_traces: int
    candidate_traces: int
    threshold: float
    new: list[dict[str, Any]] = field(default_factory=list)
    grew: list[Change] = field(default_factory=list)
    improved: list[Change] = field(default_factory=list)
    resolved: list[dict[str, Any]] = field(default_factory=list)
    unchanged: list[dict[str, Any]] = field(default_factory=list)

    @property
    def regressions(self) -> list[dict[str, Any]]:
        """Recommendations that are new or grew (the candidate's objects)."""
        return [*self.new, *(c.recommendation for c in self.grew)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": DIFF_SCHEMA,
            "base": {"traces_analyzed": self.base_traces},
            "candidate": {"traces_analyzed": self.candidate_traces},
            "growth_threshold": self.threshold,
            "new": [_summary(r) for r in self.new],
            "grew": [c.as_dict() for c in self.grew],
            "improved": [c.as_dict() for c in self.improved],
            "resolved": [_summary(r) for r in self.resolved],
            "unchanged": [_summary(r) for r in self.unchanged],
        }


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "rank", "kind", "category", "service", "operation", "traces_affected", "occurrences")
    return {**{k: r.get(k) for k in keys}, "impact": r.get("impact"), "title": r.get("title")}


def diff_reports(
    base: dict[str, Any], candidate: dict[str, Any], threshold: float = DEFAULT_GROWTH_THRESHOLD
) -> ReportDiff:
    if threshold <= 0:
        raise ValueError(f"growth threshold must be > 0, got {threshold}")
    base_traces = int(num(base.get("traces_analyzed")))
    cand_traces = int(num(candidate.get("traces_analyzed")))
    base_by_id = {r["id"]: r for r in base.get("recommendations") or []}
    cand_by_id = {r["id"]: r for r in candidate.get("recommendations") or []}
    result = ReportDiff(base_traces, cand_traces, threshold)
    for rid, rec in cand_by_id.items():
        if rid not in base_by_id:
            result.new.append(rec)
            continue
        before = Measures.of(base_by_id[rid], base_traces)
        after = Measures.of(rec, cand_traces)
        moves = {
            "saved_ms_p50": _moved(before.saved_ms_p50, after.saved_ms_p50, threshold, P50_FLOOR_MS),
            "saved_ms_per_trace": _moved(
                before.saved_ms_per_trace, after.saved_ms_per_trace, threshold, PER_TRACE_FLOOR_MS
            ),
            "occurrences_per_trace": _moved(
                before.occurrences_per_trace, after.occurrences_per_trace, threshold, 0
            )
            if abs(after.occurrences - before.occurrences) >= OCCURRENCES_FLOOR
            else 0,
        }
        up = [f"{name} up" for name, move in moves.items() if move > 0]
        down = [f"{name} down" for name, move in moves.items() if move < 0]
        if up:
            result.grew.append(Change(rec, before, after, up))
        elif down:
            result.improved.append(Change(rec, before, after, down))
        else:
            result.unchanged.append(rec)
    result.resolved = [r for rid, r in base_by_id.items() if rid not in cand_by_id]
    return result


def _where(r: dict[str, Any]) -> str:
    return f"{r.get('kind')} at {r.get('service')} / {r.get('operation')}"


def _impact_text(r: dict[str, Any]) -> str:
    impact = r.get("impact") or {}
    p50 = impact.get("saved_ms_p50")
    share = impact.get("share_of_root_latency")
    parts = [f"{r.get('traces_affected')} traces"]
    if isinstance(p50, int | float):
        parts.append(f"saves p50 {p50:.1f} ms")
    if isinstance(share, int | float):
        parts.append(f"{share:.0%} of root latency")
    return ", ".join(parts)


def _change_text(c: Change) -> str:
    b, a = c.base, c.candidate
    return (
        f"p50 saving {b.saved_ms_p50:.1f} → {a.saved_ms_p50:.1f} ms, "
        f"per trace {b.saved_ms_per_trace:.2f} → {a.saved_ms_per_trace:.2f} ms, "
        f"occurrences/trace {b.occurrences_per_trace:.2f} → {a.occurrences_per_trace:.2f}"
    )


def render_text(d: ReportDiff) -> str:
    lines = [
        f"baseline: {d.base_traces} traces, candidate: {d.candidate_traces} traces "
        f"(growth threshold {d.threshold:.0%})",
        f"{len(d.new)} new, {len(d.grew)} grew, {len(d.improved)} improved, {len(d.resolved)} resolved, "
        f"{len(d.unchanged)} unchanged",
    ]
    for title, items in (("NEW", d.new), ("RESOLVED", d.resolved)):
        for r in items:
            lines.append(f"{title:9} {_where(r)} ({_impact_text(r)}) id={r.get('id')}")
    for title, changes in (("GREW", d.grew), ("IMPROVED", d.improved)):
        for c in changes:
            lines.append(
                f"{title:9} {_where(c.recommendation)}: {_change_text(c)} id={c.recommendation.get('id')}"
            )
    return "\n".join(lines) + "\n"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(d: ReportDiff) -> str:
    out = [
        "## Hourglass diff",
        "",
        f"Baseline **{d.base_traces}** traces, candidate **{d.candidate_traces}** traces; "
        f"**{len(d.new)} new**, **{len(d.grew)} grew**, {len(d.improved)} improved, "
        f"{len(d.resolved)} resolved, {len(d.unchanged)} unchanged (growth threshold {d.threshold:.0%}).",
        "",
    ]
    if d.new or d.grew or d.improved or d.resolved:
        out += ["| change | kind | where | numbers | id |", "|---|---|---|---|---|"]
        for label, items in (("new", d.new), ("resolved", d.resolved)):
            for r in items:
                where = f"{r.get('service')} / {r.get('operation')}"
                out.append(
                    f"| {label} | {_md_cell(r.get('kind'))} | {_md_cell(where)} | {_md_cell(_impact_text(r))} "
                    f"| `{_md_cell(r.get('id'))}` |"
                )
        for label, changes in (("grew", d.grew), ("improved", d.improved)):
            for c in changes:
                r = c.recommendation
                where = f"{r.get('service')} / {r.get('operation')}"
                out.append(
                    f"| {label} | {_md_cell(r.get('kind'))} | {_md_cell(where)} | {_md_cell(_change_text(c))} "
                    f"| `{_md_cell(r.get('id'))}` |"
                )
    else:
        out.append("No bottleneck changed.")
    return "\n".join(out) + "\n"
