"""Ranking: which recommendation to act on first.

Every finding gets an *expected value* in one unit, milliseconds of root latency across the
analysed traces, weighted by confidence:

* findings with a what-if estimate: ``saved_ms_total × confidence`` (the expected total saving);
* fault-tolerance findings without a latency estimate: ``requests_at_risk × confidence ×`` the median
  root duration of the affected traces — the request time put at risk when the dependency fails or
  hangs. A finding that carries neither is ranked last, by confidence.

Ties are broken by the stable finding id so a report is reproducible run to run.
"""

from __future__ import annotations

from dataclasses import dataclass

from analysis.model import Finding
from analysis.whatif import Impact


@dataclass
class Scored:
    finding: Finding
    impact: Impact | None
    score: float
    has_latency: bool


def expected_value_ms(finding: Finding, impact: Impact | None, median_root_ms: float) -> tuple[float, bool]:
    """(score, has_latency_estimate) — see the module docstring."""
    if impact is not None and impact.saved_ns.size and impact.total_ns > 0:
        return impact.total_ns / 1e6 * finding.confidence, True
    if finding.requests_at_risk:
        return finding.requests_at_risk * finding.confidence * max(median_root_ms, 1.0), False
    return 0.0, False


def rank(items: list[Scored]) -> list[Scored]:
    return sorted(items, key=lambda s: (-s.score, -s.finding.confidence, s.finding.id))
