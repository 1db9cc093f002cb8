"""Ranking: which recommendation to act on first — every finding priced in one currency.

The currency is **milliseconds of request time across the analysed traces, weighted by
confidence**. A finding's score (``Scored.score``):

* **parallelization** findings: ``confidence × saved_ms_total`` — the expected total saving the
  what-if engine measured at the root (:mod:`hourglass.analysis.whatif`).
* **fault-tolerance** findings: ``confidence × (cost_ms_total + risk_ms)`` where

  - ``cost_ms_total`` is what the traces show the gap cost, summed over the affected traces
    (per-trace numbers from the detector's occurrences, :data:`COST_NUMBERS`):

    ============================  =====================================================================
    retry_without_backoff         time spent in failed attempts and the re-sends between them (from
                                  the first attempt's start to the end of the last failed one)
    missing_timeout               time the calls held the request past the suggested timeout (the
                                  what-if saving at the root when the engine measured one)
    error_propagation             time the failed requests ran before failing (their root duration:
                                  the user waited that long for an error and must start again)
    ============================  =====================================================================

  - ``risk_ms = RISK_SHARE (0.1) × requests_at_risk × median root duration`` of the affected
    traces: the explicit risk term for what the traces cannot show yet (a retry storm's extra load
    when the dependency is down, a hang with no deadline, an outage with no fallback). One request at
    risk weighs a tenth of a request, never the whole request.

  A fault-tolerance finding whose detector records no cost number is priced by the risk term alone.

So a lock wait of half the request in 10 requests (``~0.8 × 10 × 0.5 R``) outranks one request
with a fast-failing retry (``~0.5 × (5 ms + 0.1 R)``), while a retry storm that burns seconds in
failed attempts ranks by those seconds.

The report's ``impact`` carries the measured cost of a fault-tolerance finding as additive keys
(``cost_ms_p50``, ``cost_ms_p95``, ``cost_ms_total`` per affected trace, ``cost_share_of_root_latency``)
and ``evidence.cost_basis`` says what was measured, ``evidence.risk_ms`` the risk term.
``saved_ms_*`` stay null unless the fix saves that time (missing_timeout: a deadline cuts the
hold), so no saving is claimed for adding backoff or a fallback.

Ties are broken by confidence, then by the stable finding id, so a report is reproducible run to
run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hourglass.analysis.model import Finding
from hourglass.analysis.whatif import Impact

RISK_SHARE = 0.1
# Per-occurrence number (milliseconds) that measures a fault-tolerance finding's cost, and what it is.
COST_NUMBERS: dict[str, tuple[str, str]] = {
    "retry_without_backoff": (
        "failed_attempts_ms",
        "time spent in failed attempts and the re-sends between them, per affected request",
    ),
    "missing_timeout": (
        "held_past_timeout_ms",
        "time the calls held the request past the suggested timeout, per affected request",
    ),
    "error_propagation": (
        "failed_request_ms",
        "time the failed requests ran before failing, per failed request",
    ),
}


@dataclass
class Cost:
    """A fault-tolerance finding's measured cost, per affected trace (milliseconds)."""

    per_trace_ms: np.ndarray
    root_ms: np.ndarray
    basis: str
    risk_ms: float

    @property
    def total_ms(self) -> float:
        return float(self.per_trace_ms.sum())

    def as_impact(self) -> dict[str, float | None]:
        """The additive ``impact`` keys; none when nothing was measured (the impact stays as it was)."""
        if self.per_trace_ms.size == 0:
            return {}
        root_total = float(self.root_ms.sum())
        return {
            "cost_ms_p50": round(float(np.percentile(self.per_trace_ms, 50)), 3),
            "cost_ms_p95": round(float(np.percentile(self.per_trace_ms, 95)), 3),
            "cost_ms_total": round(self.total_ms, 3),
            "cost_share_of_root_latency": round(self.total_ms / root_total, 4) if root_total > 0 else 0.0,
        }


@dataclass
class Scored:
    finding: Finding
    impact: Impact | None
    score: float
    has_latency: bool
    cost: Cost | None = None


def measured_cost(
    finding: Finding, impact: Impact | None, root_ms_by_trace: dict[str, float], median_root_ms: float
) -> Cost | None:
    """The measured cost of a fault-tolerance finding (see the module docstring); None for others."""
    if finding.category != "fault_tolerance":
        return None
    risk_ms = RISK_SHARE * float(finding.requests_at_risk or 0) * max(median_root_ms, 0.0)
    number, basis = COST_NUMBERS.get(finding.kind, ("", ""))
    if impact is not None and impact.saved_ns.size and impact.total_ns > 0:
        # The what-if engine measured the time at the root (missing_timeout's hold past the deadline).
        return Cost(impact.saved_ns / 1e6, impact.root_ns / 1e6, basis or "measured at the root", risk_ms)
    occurrences = finding.occurrence_table
    values, _ = occurrences.number_column(number) if number else (np.zeros(0), None)
    counted = np.flatnonzero(np.isfinite(values))  # (absent: NaN)
    if not counted.size:
        return Cost(np.zeros(0), np.zeros(0), "no measured cost: ranked by the risk term", risk_ms)
    # per trace, the occurrences' values (negative ones as 0) added in occurrence order
    of = occurrences.trace_ids_at(counted).to_list()
    traces = sorted(set(of))
    position = {t: i for i, t in enumerate(traces)}
    code = np.fromiter(map(position.__getitem__, of), dtype=np.int64, count=len(of))
    kept = values[counted]
    per_trace = np.bincount(code, weights=np.where(kept < 0.0, 0.0, kept), minlength=len(traces))
    return Cost(
        per_trace,
        np.array([root_ms_by_trace.get(t, 0.0) for t in traces]),
        basis,
        risk_ms,
    )


def expected_value_ms(
    finding: Finding, impact: Impact | None, cost: Cost | None = None
) -> tuple[float, bool]:
    """(score, has_latency_saving) — see the module docstring."""
    has_saving = impact is not None and impact.saved_ns.size > 0 and impact.total_ns > 0
    if finding.category == "fault_tolerance" and cost is not None:
        return finding.confidence * (cost.total_ms + cost.risk_ms), has_saving
    if has_saving:
        assert impact is not None
        return impact.total_ns / 1e6 * finding.confidence, True
    return 0.0, False


def rank(items: list[Scored]) -> list[Scored]:
    return sorted(items, key=lambda s: (-s.score, -s.finding.confidence, s.finding.id))
