"""CI gate: which recommendations of an ``hourglass.report/v1`` report match ``--fail-on``.

``--fail-on`` takes comma-separated tokens (the option may also be repeated); a recommendation
matches when it matches ANY token:

- a **kind** (``serialized_calls``, ``n_plus_one``, ``lock_contention``, ...): that kind;
- a **category** (``parallelization``, ``fault_tolerance``): that category;
- a **severity** (``low``, ``medium``, ``high``): that severity *or worse* — ``medium`` also
  matches ``high``;
- ``any``: every recommendation.

Severity comes from the report's own numbers, so it means the same for every kind:

- latency findings (a ``share_of_root_latency`` is reported and > 0):
  ``high`` when applying it would save ≥ 20 % of the affected requests' end-to-end latency with
  confidence ≥ 0.5; ``medium`` when it saves ≥ 5 %; otherwise ``low``. 20 % is where a fix is
  visible to users on its own; below 5 % it is within run-to-run noise of a load test.
- findings without a latency estimate (most fault-tolerance gaps): by the share of analysed
  traces they put at risk — ``high`` at ≥ 10 % with confidence ≥ 0.5, ``medium`` at ≥ 1 %,
  otherwise ``low``.

A matched gate makes ``hourglass analyze`` exit with :data:`GATE_EXIT_CODE` (3), distinct from
usage errors (2) and failures (1), so a pipeline can tell "bottleneck found" from "tool broke".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hourglass.analysis.report_numbers import num

GATE_EXIT_CODE = 3

SEVERITIES = ("low", "medium", "high")
CATEGORIES = ("parallelization", "fault_tolerance")

HIGH_LATENCY_SHARE = 0.20
MEDIUM_LATENCY_SHARE = 0.05
HIGH_TRACE_SHARE = 0.10
MEDIUM_TRACE_SHARE = 0.01
HIGH_MIN_CONFIDENCE = 0.5


def severity(recommendation: dict[str, Any], traces_analyzed: int) -> str:
    """``low`` | ``medium`` | ``high`` from the recommendation's own numbers (rules above)."""
    impact = recommendation.get("impact") or {}
    confidence = num(recommendation.get("confidence"))
    share = num(impact.get("share_of_root_latency"))
    if share > 0:
        if share >= HIGH_LATENCY_SHARE and confidence >= HIGH_MIN_CONFIDENCE:
            return "high"
        return "medium" if share >= MEDIUM_LATENCY_SHARE else "low"
    at_risk = num(recommendation.get("traces_affected")) / traces_analyzed if traces_analyzed > 0 else 0.0
    if at_risk >= HIGH_TRACE_SHARE and confidence >= HIGH_MIN_CONFIDENCE:
        return "high"
    return "medium" if at_risk >= MEDIUM_TRACE_SHARE else "low"


def registered_kinds() -> set[str]:
    """Kinds of the detectors in the registry (the one list of kinds), so a new detector's kind is
    accepted at once."""
    from hourglass.analysis.detectors import DETECTORS

    return set(DETECTORS)


class GateSpecError(ValueError):
    """A ``--fail-on`` token that is no kind, category, severity or ``any``."""


@dataclass(frozen=True)
class GateSpec:
    kinds: frozenset[str]
    categories: frozenset[str]
    min_severity: str | None  # the lowest severity named; None when no severity was named
    match_all: bool = False

    @classmethod
    def parse(cls, values: Iterable[str], extra_kinds: Iterable[str] = ()) -> GateSpec:
        """Parse ``--fail-on`` values (each comma-separated). Unknown tokens raise
        :class:`GateSpecError` naming the valid ones: a typo must not silently pass a CI gate."""
        known_kinds = registered_kinds() | set(extra_kinds)
        kinds: set[str] = set()
        categories: set[str] = set()
        severities: list[str] = []
        match_all = False
        tokens = [t.strip().lower().replace("-", "_") for v in values for t in v.split(",")]
        if not any(tokens):
            raise GateSpecError("--fail-on needs at least one kind, category or severity")
        for token in tokens:
            if not token:
                continue
            if token == "any":
                match_all = True
            elif token in SEVERITIES:
                severities.append(token)
            elif token in CATEGORIES:
                categories.add(token)
            elif token in known_kinds:
                kinds.add(token)
            else:
                raise GateSpecError(
                    f"--fail-on: unknown value {token!r}; use a severity ({', '.join(SEVERITIES)}), "
                    f"a category ({', '.join(CATEGORIES)}), a kind ({', '.join(sorted(known_kinds))}) or 'any'"
                )
        min_severity = min(severities, key=SEVERITIES.index) if severities else None
        return cls(frozenset(kinds), frozenset(categories), min_severity, match_all)

    def matches(self, recommendation: dict[str, Any], traces_analyzed: int) -> bool:
        if self.match_all:
            return True
        if recommendation.get("kind") in self.kinds or recommendation.get("category") in self.categories:
            return True
        if self.min_severity is not None:
            level = SEVERITIES.index(severity(recommendation, traces_analyzed))
            return level >= SEVERITIES.index(self.min_severity)
        return False


@dataclass(frozen=True)
class GateMatch:
    recommendation: dict[str, Any]
    severity: str

    def line(self) -> str:
        r = self.recommendation
        impact = r.get("impact") or {}
        saved = impact.get("saved_ms_p50")
        saved_text = f", saves p50 {saved:.1f} ms" if isinstance(saved, int | float) else ""
        return (
            f"#{r.get('rank')} {r.get('kind')} [{self.severity}] at {r.get('service')} / {r.get('operation')}"
            f" ({r.get('traces_affected')} traces{saved_text}) id={r.get('id')}"
        )


def gate(report: dict[str, Any], spec: GateSpec) -> list[GateMatch]:
    """The report's recommendations that match ``spec``, in rank order."""
    traces = int(num(report.get("traces_analyzed")))
    return [
        GateMatch(r, severity(r, traces))
        for r in report.get("recommendations") or []
        if spec.matches(r, traces)
    ]


def gate_lines(matches: Sequence[GateMatch], spec_text: str) -> list[str]:
    if not matches:
        return [f"gate --fail-on {spec_text}: passed (no matching recommendation)"]
    return [
        f"gate --fail-on {spec_text}: FAILED — {len(matches)} matching recommendation(s):",
        *(f"  {m.line()}" for m in matches),
    ]
