"""The ``hourglass.report/v1`` object (DESIGN.md "Recommendation JSON").

Top level: ``schema``, ``generated_at``, ``traces_analyzed``, ``spans_analyzed``,
``recommendations`` and a ``writer`` block ``{"name", "fallback_reason"}``. Each recommendation::

    id, rank, kind, category, service, operation, targets, traces_affected, occurrences,
    impact {saved_ms_p50, saved_ms_p95, saved_ms_total, share_of_root_latency},
    confidence, evidence {trace_ids (<= 5 exemplars), span_ids, ...detector numbers}, title, summary, actions

``impact`` numbers are null for fault-tolerance findings without a latency estimate (their
``evidence.requests_at_risk`` says how many requests they put at risk). ``evidence.interventions``
holds, per exemplar trace, the interventions the what-if engine applied, so the "after" picture of
an exemplar can be redrawn from the report alone (:func:`analysis.whatif.retime_trace`).

Added after the writer runs (issue 13): each recommendation's ``design`` (written by the writer,
see :mod:`analysis.design`) and the report's ``workstreams`` (:mod:`analysis.workstreams`).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from analysis.ranking import Scored
from analysis.whatif import intervention_to_dict

SCHEMA = "hourglass.report/v1"
MAX_EXEMPLAR_TRACES = 5
MAX_SPAN_IDS = 20


def _json_safe(value: Any) -> Any:
    """Numbers that JSON can carry (NaN/inf become null), containers converted recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return value


def recommendation(scored: Scored, rank: int) -> dict[str, Any]:
    f = scored.finding
    trace_ids = f.trace_ids
    evidence: dict[str, Any] = dict(f.evidence)
    exemplars = [str(t) for t in (evidence.get("trace_ids") or trace_ids)][:MAX_EXEMPLAR_TRACES]
    evidence["trace_ids"] = exemplars
    if not evidence.get("span_ids"):
        first = next((o for o in f.occurrences if o.trace_id in exemplars), None)
        evidence["span_ids"] = list(first.span_ids) if first else []
    evidence["span_ids"] = [str(s) for s in evidence["span_ids"]][:MAX_SPAN_IDS]
    if f.requests_at_risk is not None:
        evidence.setdefault("requests_at_risk", int(f.requests_at_risk))
    interventions: dict[str, list[dict[str, Any]]] = {}
    for occ in f.occurrences:
        if occ.trace_id in exemplars and occ.interventions:
            interventions.setdefault(occ.trace_id, []).extend(
                intervention_to_dict(i) for i in occ.interventions
            )
    if interventions:
        evidence["interventions"] = interventions
    impact = (
        scored.impact.as_dict()
        if scored.impact is not None and scored.has_latency
        else {
            "saved_ms_p50": None,
            "saved_ms_p95": None,
            "saved_ms_total": None,
            "share_of_root_latency": None,
        }
    )
    return _json_safe(
        {
            "id": f.id,
            "rank": rank,
            "kind": f.kind,
            "category": f.category,
            "service": f.service,
            "operation": f.operation,
            "targets": [dict(t) for t in f.targets],
            "traces_affected": len(trace_ids),
            "occurrences": len(f.occurrences),
            "impact": impact,
            "confidence": round(float(f.confidence), 3),
            "evidence": evidence,
            "title": "",
            "summary": "",
            "actions": [],
        }
    )


def build_report(
    ranked: list[Scored],
    *,
    traces_analyzed: int,
    spans_analyzed: int,
    generated_at: datetime | None = None,
) -> dict[str, Any]:
    when = (generated_at or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    return {
        "schema": SCHEMA,
        "generated_at": when.isoformat().replace("+00:00", "Z"),
        "traces_analyzed": int(traces_analyzed),
        "spans_analyzed": int(spans_analyzed),
        "recommendations": [recommendation(s, i + 1) for i, s in enumerate(ranked)],
        "writer": {"name": None, "fallback_reason": None},
    }
