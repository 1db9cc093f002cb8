"""The workstream plan: the report's recommendations grouped into units of work, one per service
that must change, in the order they can land.

Each workstream (report key ``workstreams``, a list, largest combined saving first)::

    {"id": "ws-<service>", "service", "namespace", "owner",
     "recommendations": [ids], "kinds": [...],
     "prerequisites": ["what another team's change needs from this service", ...],
     "depends_on": [workstream ids that must land first], "parallel_with": [workstream ids],
     "wave": 1,   # workstreams of one wave can proceed in parallel; wave n waits for wave n-1
     "impact": {saved_ms_p50, saved_ms_p95, saved_ms_total, share_of_root_latency},
     "sum_of_recommendations_ms_total": 0.0,
     "title", "summary"}

``impact`` is a what-if of the whole group — every intervention of its recommendations applied to
each affected trace together, re-timed once — not a sum: two fixes on one critical path do not
add up (``sum_of_recommendations_ms_total`` is given beside it so the difference is visible).

Dependencies between services come from what a change needs downstream:

* ``n_plus_one`` whose target is a traced service: that service must offer a batch endpoint first;
* ``fanout_concurrency_limit`` on a traced target: the target must take the higher concurrency
  (capacity check, load test) before the limit is raised;
* ``retry_without_backoff`` of a write (POST/PUT/PATCH/DELETE) on a traced target: the target must
  honour an idempotency key before retries are safe.

A dependency on a service that has no recommendation of its own creates a workstream holding only
the prerequisite.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import Finding, Occurrences
from hourglass.analysis.ranking import Scored
from hourglass.analysis.sequence import fmt_ms as ms
from hourglass.analysis.whatif import Impact, WhatIf

_WRITE = re.compile(r"^\s*(POST|PUT|PATCH|DELETE)\b|\b(create|update|delete|insert|charge|pay|write)", re.I)


def _ws_id(service: str) -> str:
    return "ws-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", service).strip("-")[:80]


def _prerequisite(rec: Mapping[str, Any], traced: set[str]) -> tuple[str, str] | None:
    """(target service, what it must provide) for a recommendation that needs a downstream change."""
    kind = rec.get("kind")
    caller = str(rec.get("service"))
    for t in rec.get("targets") or []:
        service = str(t.get("service") or "")
        op = str(t.get("operation") or "")
        if not service or service == caller or service not in traced:
            continue
        if kind == "n_plus_one":
            return service, f"a batch endpoint for `{op}` (many ids in one call) that `{caller}` can call"
        if kind == "fanout_concurrency_limit":
            k = (rec.get("evidence") or {}).get("n_max")
            return service, (
                f"capacity for {k} concurrent `{op}` calls per request from `{caller}` (load test, scale out)"
                if k
                else f"capacity for more concurrent `{op}` calls from `{caller}` (load test, scale out)"
            )
        if kind == "retry_without_backoff" and _WRITE.search(op):
            return service, f"an idempotency key on `{op}` so that `{caller}` can retry it safely"
    return None


def _combined(findings: list[Finding], service: str) -> Finding | None:
    """A group's findings as one, for one what-if of all their interventions together."""
    occurrences = Occurrences.concat(
        [f.occurrence_table.take(np.flatnonzero(f.occurrence_table.has_interventions())) for f in findings]
    )
    if not occurrences:
        return None
    return Finding("workstream", "parallelization", service, "", [], occurrences, 1.0)


def _timed(ids: list[str], findings: Mapping[str, Finding]) -> list[Finding]:
    """The findings of recommendations ``ids`` that re-time something (have interventions)."""
    members = [findings[i] for i in ids if i in findings]
    return [f for f in members if f.occurrence_table.any_interventions()]


def _combined_groups(recs: list[Mapping[str, Any]], findings: Mapping[str, Finding]) -> dict[str, Finding]:
    """Workstream id -> its findings as one (:func:`_combined`), for each service whose
    recommendations hold two or more that re-time something: the what-ifs of a plan, priced
    together. The recommendations alone decide them (their services and ids, in their order)."""
    members: dict[str, list[str]] = {}  # service -> its recommendations, in the report's order
    for rec in recs:
        members.setdefault(str(rec.get("service")), []).append(rec["id"])
    combined: dict[str, Finding] = {}
    for service, ids in members.items():
        timed = _timed(ids, findings)
        if len(timed) > 1:
            joined = _combined(timed, service)
            if joined is not None:
                combined[_ws_id(service)] = joined
    return combined


def combined_findings(ranked: list[Scored], report: Mapping[str, Any]) -> list[Finding]:
    """The findings :func:`build_workstreams` of ``ranked`` and ``report`` prices together (what
    it passes to ``impacts_of``), for a caller that prices them before it builds the plan."""
    recs = list(report.get("recommendations") or [])
    if not recs:
        return []
    return list(_combined_groups(recs, {s.finding.id: s.finding for s in ranked}).values())


def build_workstreams(
    ctx: AnalysisContext | None,
    ranked: list[Scored],
    report: Mapping[str, Any],
    resources: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    traced_services: set[str] | None = None,
    impacts_of: Callable[[list[Finding]], Mapping[str, Impact]] | None = None,
) -> list[dict[str, Any]]:
    """The workstream plan of a report (see the module docstring). The services seen and the
    what-if of a group come from ``ctx``, or — for an analysis in partitions, where no context
    holds every span — from ``traced_services`` and ``impacts_of`` (all groups priced at once)."""
    resources = resources or {}
    recs = list(report.get("recommendations") or [])
    if not recs:
        return []
    findings = {s.finding.id: s.finding for s in ranked}
    traced = set(resources) | (traced_services or set())
    if ctx is not None:
        traced |= set(ctx.traces["root_service"].to_list())
        if ctx.spans.height:
            traced |= set(ctx.spans["service"].unique().to_list())
    if impacts_of is None:
        assert ctx is not None
        whatif = WhatIf.of(ctx)

        def impacts_of(found: list[Finding]) -> Mapping[str, Impact]:
            return {f.id: whatif.impact(f) for f in found}

    groups: dict[str, dict[str, Any]] = {}

    def group(service: str) -> dict[str, Any]:
        if service not in groups:
            res = resources.get(service) or {}
            groups[service] = {
                "id": _ws_id(service),
                "service": service,
                "namespace": res.get("namespace"),
                "owner": res.get("owner"),
                "recommendations": [],
                "kinds": [],
                "prerequisites": [],
                "depends_on": [],
                "parallel_with": [],
                "wave": 1,
                "impact": None,
                "sum_of_recommendations_ms_total": None,
                "title": "",
                "summary": "",
            }
        return groups[service]

    for rec in recs:
        g = group(str(rec.get("service")))
        g["recommendations"].append(rec["id"])
        if rec.get("kind") not in g["kinds"]:
            g["kinds"].append(rec.get("kind"))
    for rec in recs:
        need = _prerequisite(rec, traced)
        if need is None:
            continue
        target, what = need
        dependency = group(target)
        if what not in dependency["prerequisites"]:
            dependency["prerequisites"].append(what)
        g = groups[str(rec.get("service"))]
        if dependency["id"] not in g["depends_on"] and dependency is not g:
            g["depends_on"].append(dependency["id"])

    by_id = {g["id"]: g for g in groups.values()}
    impacts = {r["id"]: r.get("impact") for r in recs}
    for g in groups.values():
        timed = _timed(g["recommendations"], findings)
        if len(timed) == 1:  # one finding: its own what-if is the group's
            g["impact"] = dict(impacts.get(timed[0].id) or {}) or None
    combined = _combined_groups(recs, findings)
    priced = impacts_of(list(combined.values())) if combined else {}
    for g in groups.values():
        if g["id"] in combined:
            impact = priced.get(combined[g["id"]].id)
            g["impact"] = impact.as_dict() if impact is not None else None
        totals = [
            float((r.get("impact") or {}).get("saved_ms_total") or 0.0)
            for r in recs
            if r["id"] in g["recommendations"]
        ]
        g["sum_of_recommendations_ms_total"] = round(sum(totals), 3) if any(totals) else None

    # waves: longest chain of dependencies (cycles broken by the iteration bound)
    for _ in range(len(groups)):
        changed = False
        for g in groups.values():
            wave = 1 + max((by_id[d]["wave"] for d in g["depends_on"] if d in by_id), default=0)
            if wave != g["wave"] and wave <= len(groups):
                g["wave"], changed = wave, True
        if not changed:
            break

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        stack = [start]
        while stack:
            for d in by_id[stack.pop()]["depends_on"]:
                if d not in seen and d in by_id:
                    seen.add(d)
                    stack.append(d)
        return seen

    ancestors = {i: reach(i) for i in by_id}
    for g in groups.values():
        g["parallel_with"] = sorted(
            other
            for other in by_id
            if other != g["id"] and other not in ancestors[g["id"]] and g["id"] not in ancestors[other]
        )
        _describe(g, by_id, recs)

    def saving(g: dict[str, Any]) -> float:
        return float((g.get("impact") or {}).get("saved_ms_total") or 0.0)

    return sorted(groups.values(), key=lambda g: (g["wave"], -saving(g), -len(g["recommendations"]), g["id"]))


def _describe(g: dict[str, Any], by_id: Mapping[str, dict[str, Any]], recs: list[Mapping[str, Any]]) -> None:
    who = f"`{g['service']}`" + (f" ({g['namespace']})" if g.get("namespace") else "")
    owner = f", owned by {g['owner']}" if g.get("owner") else ""
    n = len(g["recommendations"])
    ranks = [str(r.get("rank")) for r in recs if r["id"] in g["recommendations"]]
    if n:
        g["title"] = (
            f"{who}: {n} change{'s' if n != 1 else ''} ({', '.join(k.replace('_', ' ') for k in g['kinds'])})"
        )
    else:
        g["title"] = f"{who}: prerequisite for other teams"
    parts = [f"Changes in {who}{owner}."]
    if n:
        parts.append(f"Recommendations {', '.join('#' + r for r in ranks)}.")
    if g["prerequisites"]:
        parts.append("Provides first: " + "; ".join(g["prerequisites"]) + ".")
    if g["depends_on"]:
        names = ", ".join(f"`{by_id[d]['service']}`" for d in g["depends_on"] if d in by_id)
        parts.append(f"Starts after {names} has landed its prerequisite.")
    imp = g.get("impact") or {}
    if imp.get("saved_ms_p50") is not None:
        parts.append(
            f"Together these changes save {ms(imp['saved_ms_p50'])} at p50 and {ms(imp['saved_ms_p95'])} at p95 "
            f"per affected request ({ms(imp.get('saved_ms_total'))} in total by a what-if of the whole group"
            + (
                f", against {ms(g['sum_of_recommendations_ms_total'])} if the single savings were added)."
                if g.get("sum_of_recommendations_ms_total")
                and abs(float(g["sum_of_recommendations_ms_total"]) - float(imp.get("saved_ms_total") or 0))
                > 0.01 * float(g["sum_of_recommendations_ms_total"])
                else ")."
            )
        )
    if g["parallel_with"]:
        names = ", ".join(f"`{by_id[o]['service']}`" for o in g["parallel_with"][:6] if o in by_id)
        parts.append(f"Can proceed in parallel with {names}.")
    g["summary"] = " ".join(parts)
