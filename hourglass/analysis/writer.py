"""The write-up: each recommendation's title, summary, actions and design.

Two writers stand behind one protocol: the offline template writer (always available) and the
Anthropic agent (used when ``ANTHROPIC_API_KEY`` is set). A writer receives the ranked
recommendation objects of a ``hourglass.report/v1`` report (numbers filled in, text empty) and a
read-only :class:`WriterContext`; it returns the texts, and the report records which writer wrote
them and why a fallback happened. ``hourglass.analysis.writers`` picks the writer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class WrittenText:
    title: str
    summary: str
    actions: list[str]
    # the recommendation's ``design`` (analysis.design.build_design), when the writer wrote one
    design: dict[str, Any] | None = None


@dataclass
class WriteOutcome:
    texts: dict[str, WrittenText]  # recommendation id -> text
    writer: str  # "template" or "anthropic:<model>"
    fallback_reason: str | None = None  # why the agent was not (fully) used
    metadata: dict[str, Any] = field(default_factory=dict)


class WriterContext(Protocol):
    """Read-only views of the analysed spans, for writers that look things up (the agent's tools)."""

    def finding_evidence(self, recommendation_id: str) -> dict[str, Any] | None: ...

    def critical_path(self, trace_id: str) -> list[dict[str, Any]] | None:
        """Spans on the trace's critical path, root first: service, name, duration and self time in ms."""

    def service_neighbours(self, service: str) -> dict[str, list[dict[str, Any]]]:
        """{"callers": [...], "callees": [...]}, each {"service", "operation", "calls", "p50_ms"}."""

    # Optional (writers look it up with getattr): the facts a ``design`` is written from —
    # the service's language, the exemplar's before/after sequence diagrams, the what-if's
    # predicted root latencies (analysis.sequence.design_facts).
    # def design_facts(self, recommendation_id: str) -> dict[str, Any] | None: ...


class Writer(Protocol):
    name: str

    def write(self, recommendations: list[dict[str, Any]], context: WriterContext) -> WriteOutcome: ...
