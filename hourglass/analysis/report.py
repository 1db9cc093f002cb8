"""The ``hourglass.report/v1`` object (DESIGN.md "Recommendation JSON").

Top level: ``schema``, ``generated_at``, ``traces_analyzed``, ``spans_analyzed``,
``recommendations`` and a ``writer`` block ``{"name", "fallback_reason"}``. Each recommendation::

    id, rank, kind, category, service, operation, targets, traces_affected, occurrences,
    impact {saved_ms_p50, saved_ms_p95, saved_ms_total, share_of_root_latency},
    confidence, evidence {trace_ids (<= 5 exemplars), span_ids, ...detector numbers}, title, summary, actions

``impact`` savings are null for fault-tolerance findings without a latency saving (their
``evidence.requests_at_risk`` says how many requests they put at risk). Fault-tolerance findings
whose cost the traces measure also carry the additive keys ``impact.cost_ms_p50``, ``cost_ms_p95``,
``cost_ms_total`` and ``cost_share_of_root_latency`` (per affected trace), with
``evidence.cost_basis`` (what was measured) and ``evidence.risk_ms`` (the ranking's risk term,
:mod:`hourglass.analysis.ranking`). ``evidence.interventions``
holds, per exemplar trace, the interventions the what-if engine applied, so the "after" picture of
an exemplar can be redrawn from the report alone (:func:`hourglass.analysis.whatif.retime_trace`).

With ``explain`` (``hourglass analyze --explain``, ``GET /v1/recommendations?explain=true``) the
report also carries ``near_misses``: every candidate a detector (or the pipeline's floors) formed
and then dropped, as ``{kind, service, operation, reason, traces, trace_ids (<= 5 exemplars),
span_ids}`` — deduplicated by (kind, service, operation, reason), sorted by traces (most first),
then kind, service, operation and reason, and capped at ``MAX_NEAR_MISSES`` with
``near_misses_omitted`` counting the rest; a near miss of a (kind, service, operation) that is
also a recommendation is left out (the recommendation covers it). Without ``explain`` neither key
is present.

Added after the writer runs (issue 13): each recommendation's ``design`` (written by the writer,
see :mod:`hourglass.analysis.design`) and the report's ``workstreams`` (:mod:`hourglass.analysis.workstreams`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from hourglass.analysis.model import NearMiss
from hourglass.analysis.ranking import Scored
from hourglass.analysis.whatif import intervention_to_dict

SCHEMA = "hourglass.report/v1"
MAX_EXEMPLAR_TRACES = 5
MAX_SPAN_IDS = 20
MAX_NEAR_MISSES = 200


def finite(obj: Any) -> Any:
    """A copy of a JSON-like structure that JSON can carry: NaN/inf floats as null, numpy scalars
    as Python numbers, mapping keys as strings, tuples and sets as lists (sets sorted when their
    items compare, so the output does not depend on hash order); no recursion, so any depth.
    The one JSON-cleaning helper (the API's ``dumps`` falls back on it too)."""
    root: list[Any] = [obj]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, obj)]
    while stack:
        container, key, value = stack.pop()
        if isinstance(value, float):
            if not math.isfinite(value):
                container[key] = None
        elif isinstance(value, Mapping):
            copy = {str(k): v for k, v in value.items()}
            container[key] = copy
            stack.extend((copy, k, v) for k, v in copy.items())
        elif isinstance(value, (list, tuple, set, frozenset)):
            if isinstance(value, (set, frozenset)):
                try:
                    copy_list = sorted(value)
                except TypeError:
                    copy_list = list(value)
            else:
                copy_list = list(value)
            container[key] = copy_list
            stack.extend((copy_list, i, v) for i, v in enumerate(copy_list))
        elif hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
            item = value.item()
            container[key] = item
            stack.append((container, key, item))
    return root[0]


def recommendation(scored: Scored, rank: int) -> dict[str, Any]:
    f = scored.finding
    # the traces counted and the first exemplars decoded, not a Python string per trace
    # (``f.trace_ids``: a finding over 10^5 traces made ~10^5 strings here)
    table = f.occurrence_table
    evidence: dict[str, Any] = dict(f.evidence)
    exemplars = [str(t) for t in (evidence.get("trace_ids") or table.first_trace_ids(MAX_EXEMPLAR_TRACES))][
        :MAX_EXEMPLAR_TRACES
    ]
    evidence["trace_ids"] = exemplars
    # the occurrences of the exemplar traces, materialized (not every one of the finding)
    shown = f.occurrence_table.filter_traces(exemplars)
    if not evidence.get("span_ids"):
        first = shown[0] if shown else None
        evidence["span_ids"] = list(first.span_ids) if first else []
    evidence["span_ids"] = [str(s) for s in evidence["span_ids"]][:MAX_SPAN_IDS]
    if f.requests_at_risk is not None:
        evidence.setdefault("requests_at_risk", int(f.requests_at_risk))
    interventions: dict[str, list[dict[str, Any]]] = {}
    for occ in shown:
        if occ.interventions:
            interventions.setdefault(occ.trace_id, []).extend(
                intervention_to_dict(i) for i in occ.interventions
            )
    if interventions:
        evidence["interventions"] = interventions
    if scored.cost is not None:  # fault tolerance: what the traces show it cost (analysis.ranking)
        evidence["cost_basis"] = scored.cost.basis
        evidence["risk_ms"] = round(scored.cost.risk_ms, 3)
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
    if scored.cost is not None:
        impact = {**impact, **scored.cost.as_impact()}
    return finite(
        {
            "id": f.id,
            "rank": rank,
            "kind": f.kind,
            "category": f.category,
            "service": f.service,
            "operation": f.operation,
            "targets": [dict(t) for t in f.targets],
            "traces_affected": table.unique_trace_count(),
            "occurrences": len(f.occurrences),
            "impact": impact,
            "confidence": round(float(f.confidence), 3),
            "evidence": evidence,
            "title": "",
            "summary": "",
            "actions": [],
        }
    )


def near_miss_entries(
    near_misses: list[NearMiss], limit: int = MAX_NEAR_MISSES
) -> tuple[list[dict[str, Any]], int]:
    """(entries, omitted): near misses deduplicated by (kind, service, operation, reason) — trace
    ids merged, the largest trace count kept — sorted deterministically and capped at ``limit``."""
    merged: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for miss in near_misses:
        key = (str(miss.kind), str(miss.service), str(miss.operation), str(miss.reason))
        entry = merged.get(key)
        traces = int(miss.traces or len(set(miss.trace_ids)))
        if entry is None:
            merged[key] = {
                "kind": key[0],
                "service": key[1],
                "operation": key[2],
                "reason": key[3],
                "traces": traces,
                "trace_ids": [str(t) for t in dict.fromkeys(miss.trace_ids)][:MAX_EXEMPLAR_TRACES],
                "span_ids": [str(s) for s in dict.fromkeys(miss.span_ids)][:MAX_SPAN_IDS],
            }
            continue
        entry["traces"] = max(entry["traces"], traces)
        entry["trace_ids"] = list(dict.fromkeys([*entry["trace_ids"], *map(str, miss.trace_ids)]))[
            :MAX_EXEMPLAR_TRACES
        ]
        if not entry["span_ids"]:
            entry["span_ids"] = [str(s) for s in dict.fromkeys(miss.span_ids)][:MAX_SPAN_IDS]
    ordered = sorted(
        merged.values(), key=lambda e: (-e["traces"], e["kind"], e["service"], e["operation"], e["reason"])
    )
    return ordered[:limit], max(len(ordered) - limit, 0)


def build_report(
    ranked: list[Scored],
    *,
    traces_analyzed: int,
    spans_analyzed: int,
    generated_at: datetime | None = None,
    near_misses: list[NearMiss] | None = None,
) -> dict[str, Any]:
    """The report; ``near_misses`` (given only with ``explain``) adds the two near-miss keys."""
    when = (generated_at or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    recommendations = []
    for i, s in enumerate(ranked):
        recommendations.append(recommendation(s, i + 1))
        # the columns of its parked occurrences read back (serve's round: the trace ids, the
        # exemplars' rows) let go before the next finding's are read, not held until every
        # finding's are (``Occurrences.release``; nothing for occurrences held in memory)
        s.finding.occurrence_table.release()
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": when.isoformat().replace("+00:00", "Z"),
        "traces_analyzed": int(traces_analyzed),
        "spans_analyzed": int(spans_analyzed),
        "recommendations": recommendations,
        "writer": {"name": None, "fallback_reason": None},
    }
    if near_misses is not None:
        entries, omitted = near_miss_entries(near_misses)
        report["near_misses"] = finite(entries)
        report["near_misses_omitted"] = omitted
    return report
