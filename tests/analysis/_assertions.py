"""What the detector tests share: run one detector on hand-built traces, and pick the one finding
(or the report's one recommendation) of a kind after checking what it is about.

f = one_finding(run_detector(detect, traces), "n_plus_one", "batching", "orders", "GET /orders")
rec = one_recommendation(analyze(table), "n_plus_one", "batching", "orders", "GET /orders")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import Finding
from tests.builders import TraceBuilder, spans_table


def run_detector(
    detect: Callable[[AnalysisContext], list[Finding]], builders: Iterable[TraceBuilder]
) -> list[Finding]:
    """One detector over the given traces, through the same context the pipeline builds."""
    return detect(AnalysisContext.from_table(spans_table(list(builders))))


def one_finding(findings: list[Finding], kind: str, category: str, service: str, operation: str) -> Finding:
    """The single finding, after checking it is the expected kind and category, on this operation."""
    assert len(findings) == 1, findings
    f = findings[0]
    assert (f.kind, f.category, f.service, f.operation) == (kind, category, service, operation)
    return f


def one_recommendation(
    report: dict[str, Any], kind: str, category: str, service: str, operation: str
) -> dict[str, Any]:
    """The report's single recommendation of `kind`, checked as one_finding checks a finding."""
    recs = [r for r in report["recommendations"] if r["kind"] == kind]
    assert len(recs) == 1, [r["kind"] for r in report["recommendations"]]
    rec = recs[0]
    assert (rec["category"], rec["service"], rec["operation"]) == (category, service, operation)
    return rec
