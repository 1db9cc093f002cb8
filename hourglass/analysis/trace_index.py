"""Which recommendations touch a trace: one definition, one index, built by the analysis.

The REST trace view (``GET /v1/traces/{id}``, also the exemplars of ``GET /v1/recommendations/{id}``),
MCP's ``get_trace`` and the report page's exemplar waterfalls all ask the same question of a
report; they all answer it with a :class:`TraceIndex`.

**Definition.** A recommendation *touches* a trace T when

1. T holds one of its finding's occurrences (every affected trace — known to the run that made
   the report, which builds the index with its findings: :meth:`TraceIndex.build`), or
2. T is one of its exemplar traces (``evidence.trace_ids``), or
3. one of its evidence span ids (``evidence.span_ids``) is a span of T.

Built from a report alone (:meth:`TraceIndex.from_report`, e.g. a report read back from JSON) only
2 and 3 are known.

For a touching recommendation, two sets of T's spans (each restricted to the spans T has):

* ``span_ids`` — every span of T it involves: the spans of its occurrences in T, the spans its
  interventions in T name, and its evidence span ids in T;
* ``bottleneck_span_ids`` — the spans the change acts on in T: the spans its interventions in T
  name (the what-if engine's, also recorded in the report as ``evidence.interventions`` for the
  exemplar traces); for a recommendation that re-times nothing in T, its evidence span ids in T.
  The report page marks these as "bottleneck span".

The index is plain dicts and tuples, so it travels from the analysis worker process by pickle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hourglass.analysis.model import Finding
from hourglass.analysis.whatif import intervention_to_dict


@dataclass(frozen=True)
class Touch:
    """One recommendation touching one trace (see the module docstring)."""

    recommendation_id: str
    span_ids: tuple[str, ...]
    bottleneck_span_ids: tuple[str, ...]


def intervention_span_ids(interventions: Iterable[Mapping[str, Any]]) -> set[str]:
    """The span ids the interventions name (``hourglass.analysis.whatif.intervention_to_dict`` form)."""
    out: set[str] = set()
    for iv in interventions:
        if isinstance(iv, Mapping):
            out.update(str(s) for s in iv.get("span_ids") or [])
            if iv.get("span_id") is not None:
                out.add(str(iv["span_id"]))
    return out


@dataclass
class TraceIndex:
    """trace id → recommendation id → (involved span ids, changed span ids), plus each
    recommendation's evidence span ids and rank; look a trace up with :meth:`touching`."""

    # trace id -> {recommendation id: (span ids of its occurrences there, span ids its interventions there name)}
    by_trace: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = field(default_factory=dict)
    # recommendation id -> its evidence span ids
    evidence_spans: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # evidence span id -> the recommendations naming it
    by_span: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # recommendation id -> rank (the order of the answers)
    ranks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> TraceIndex:
        """The index of a report alone: exemplar traces and evidence span ids (rules 2 and 3)."""
        return cls.build(report, ())

    @classmethod
    def build(cls, report: Mapping[str, Any], findings: Iterable[Finding]) -> TraceIndex:
        """The index of a report and the findings of the run that made it (rule 1 for every
        affected trace; findings the report does not carry are ignored)."""
        index = cls()
        recs = [r for r in report.get("recommendations") or [] if r.get("id") is not None]
        by_span: dict[str, list[str]] = {}
        for position, rec in enumerate(recs):
            rec_id = str(rec["id"])
            rank = rec.get("rank")
            index.ranks[rec_id] = int(rank) if isinstance(rank, int) else position + 1
            evidence = rec.get("evidence") or {}
            spans = tuple(str(s) for s in evidence.get("span_ids") or [])
            index.evidence_spans[rec_id] = spans
            for span_id in spans:
                by_span.setdefault(span_id, []).append(rec_id)
            recorded = evidence.get("interventions") or {}
            for trace_id in evidence.get("trace_ids") or []:
                changed = intervention_span_ids(recorded.get(trace_id) or [])
                index._add(str(trace_id), rec_id, (), changed)
        index.by_span = {s: tuple(dict.fromkeys(ids)) for s, ids in by_span.items()}
        for finding in findings:
            if finding.id not in index.ranks:
                continue
            for occurrence in finding.occurrences:
                changed = intervention_span_ids(intervention_to_dict(iv) for iv in occurrence.interventions)
                index._add(occurrence.trace_id, finding.id, occurrence.span_ids, changed)
        return index

    def _add(self, trace_id: str, rec_id: str, involved: Iterable[str], changed: Iterable[str]) -> None:
        entries = self.by_trace.setdefault(trace_id, {})
        old_involved, old_changed = entries.get(rec_id, ((), ()))
        entries[rec_id] = (tuple(sorted({*old_involved, *involved})), tuple(sorted({*old_changed, *changed})))

    def touching(self, trace_id: str, span_ids: Iterable[str]) -> list[Touch]:
        """The recommendations touching trace ``trace_id`` whose spans are ``span_ids``, best
        rank first, each with its spans there (sorted)."""
        present = set(span_ids)
        entries = dict(self.by_trace.get(trace_id, {}))
        for span_id in present:
            for rec_id in self.by_span.get(span_id, ()):
                entries.setdefault(rec_id, ((), ()))
        out = []
        for rec_id, (involved, changed) in entries.items():
            evidence = [s for s in self.evidence_spans.get(rec_id, ()) if s in present]
            changed_here = sorted(s for s in changed if s in present)
            out.append(
                Touch(
                    recommendation_id=rec_id,
                    span_ids=tuple(sorted({*involved, *changed, *evidence} & present)),
                    bottleneck_span_ids=tuple(changed_here or sorted(set(evidence))),
                )
            )
        out.sort(key=lambda t: (self.ranks.get(t.recommendation_id, 10**9), t.recommendation_id))
        return out

    def traces(self) -> int:
        """How many traces the index names (rules 1 and 2)."""
        return len(self.by_trace)
