"""The MCP server: coding agents query Hourglass directly (official ``mcp`` Python SDK).

Two ways to run it, the same read-only tools:

* ``hourglass mcp --db PATH`` — stdio, for an agent that starts it as a subprocess (the store is
  analysed in-process on the first call);
* ``hourglass serve`` — streamable HTTP at ``/mcp`` on the API port, behind the API's token
  (``Authorization: Bearer $HOURGLASS_API_TOKEN``), answering from the served report.

Tools (results are compact JSON; lists are paginated with ``offset``/``limit`` and say
``next_offset`` when there is more):

* ``list_recommendations`` — ranked findings, filtered by kind, service, category, severity;
* ``get_recommendation`` — one finding with its summary, actions and evidence;
* ``get_trace`` — one trace's repaired spans (critical path marked) and the findings touching it;
* ``what_if`` — re-time the traces as if changes were made (see :mod:`hourglass.analysis.whatif_query`);
* ``critical_path`` — what an endpoint waits on across its traces (:mod:`hourglass.analysis.endpoint_path`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import anyio
from pydantic import Field

from hourglass.analysis.whatif_query import WhatIfInputError
from hourglass.api.queries import FindingsFailed, QueryEngine

MAX_LIMIT = 100
MAX_SPANS_PAGE = 500
MAX_EVIDENCE_ITEMS = 20

INSTRUCTIONS = (
    "Hourglass analyses distributed traces (OpenTelemetry) and finds where requests wait: serialized "
    "calls, N+1 queries, lock contention, fan-out stragglers and pool limits, and fault-tolerance gaps. "
    "Start with list_recommendations (ranked by end-to-end latency saved), open one with "
    "get_recommendation, look at an exemplar trace with get_trace. Use critical_path to see what an "
    "endpoint waits on across all its requests, and what_if to price a change before making it "
    "(e.g. 'pricing twice as fast', 'these calls in parallel', 'pool of 8'). Savings are measured at "
    "the root span (end-to-end latency), by re-timing each trace along its critical path."
)


class ReportUnavailable(RuntimeError):
    pass


class Backend:
    """What the tools read: the current report, the store's traces and the query engine."""

    def __init__(
        self,
        report: Callable[[], Any],
        fetch_trace: Callable[[str], Any],
        queries: QueryEngine,
    ) -> None:
        """``report()`` returns the current :class:`hourglass.api.analysis_snapshot.ReportSnapshot` (waiting
        for the first if needed) or None; ``fetch_trace(trace_id)`` the stored spans (Arrow)."""
        self._report = report
        self.fetch_trace = fetch_trace
        self.queries = queries

    def snapshot(self) -> Any:
        snapshot = self._report()
        if snapshot is None:
            raise ReportUnavailable("no report yet: the store is still being analysed or holds no traces")
        return snapshot


def _compact(rec: dict[str, Any], traces_analyzed: int) -> dict[str, Any]:
    from hourglass.analysis.gate import severity

    impact = rec.get("impact") or {}
    return {
        "id": rec.get("id"),
        "rank": rec.get("rank"),
        "kind": rec.get("kind"),
        "category": rec.get("category"),
        "severity": severity(rec, traces_analyzed),
        "service": rec.get("service"),
        "operation": rec.get("operation"),
        "title": rec.get("title"),
        "saved_ms_p50": impact.get("saved_ms_p50"),
        "saved_ms_total": impact.get("saved_ms_total"),
        "share_of_root_latency": impact.get("share_of_root_latency"),
        "traces_affected": rec.get("traces_affected"),
        "confidence": rec.get("confidence"),
    }


def _trim(value: Any) -> Any:
    """Evidence without its bulk: lists cut to MAX_EVIDENCE_ITEMS, the recorded interventions left out."""
    if isinstance(value, dict):
        return {k: _trim(v) for k, v in value.items() if k != "interventions"}
    if isinstance(value, list):
        return [_trim(v) for v in value[:MAX_EVIDENCE_ITEMS]]
    return value


def list_recommendations(
    backend: Backend,
    kind: str | None = None,
    service: str | None = None,
    category: str | None = None,
    severity: str | None = None,
    offset: int = 0,
    limit: int = 20,
) -> dict[str, Any]:
    from hourglass.analysis.gate import SEVERITIES

    snapshot = backend.snapshot()
    report = snapshot.report
    traces = int(report.get("traces_analyzed") or 0)
    kinds = [k.strip() for k in kind.split(",") if k.strip()] if kind else None
    indices = snapshot.filter_indices(service=service or None, kind=kinds, category=category or None)
    recs = [_compact(snapshot.recommendations[i], traces) for i in indices]
    if severity:
        if severity not in SEVERITIES:
            raise ValueError(f"severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
        floor = SEVERITIES.index(severity)
        recs = [r for r in recs if SEVERITIES.index(r["severity"]) >= floor]
    offset, limit = max(0, offset), max(1, min(limit, MAX_LIMIT))
    page = recs[offset : offset + limit]
    return {
        "traces_analyzed": traces,
        "generated_at": report.get("generated_at"),
        "total": len(recs),
        "offset": offset,
        "next_offset": offset + limit if offset + limit < len(recs) else None,
        "recommendations": page,
    }


def get_recommendation(backend: Backend, recommendation_id: str) -> dict[str, Any]:
    snapshot = backend.snapshot()
    rec = snapshot.by_id.get(recommendation_id)
    if rec is None:
        raise ValueError(
            f"no recommendation {recommendation_id!r} in the current report (see list_recommendations)"
        )
    traces = int(snapshot.report.get("traces_analyzed") or 0)
    return {
        **_compact(rec, traces),
        "targets": rec.get("targets"),
        "occurrences": rec.get("occurrences"),
        "impact": rec.get("impact"),
        "summary": rec.get("summary"),
        "actions": rec.get("actions"),
        "evidence": _trim(rec.get("evidence") or {}),
    }


def get_trace(backend: Backend, trace_id: str, offset: int = 0, limit: int = 200) -> dict[str, Any]:
    import polars as pl

    from hourglass.analysis.context import AnalysisContext

    normalized = trace_id.strip().lower().rjust(32, "0")
    if len(normalized) != 32 or any(c not in "0123456789abcdef" for c in normalized):
        raise ValueError(f"trace id {trace_id!r}: expected up to 32 hex characters")
    raw = backend.fetch_trace(normalized)
    if raw.num_rows == 0:
        raise ValueError(f"trace {normalized} is not in the store")
    snapshot = None
    with contextlib.suppress(ReportUnavailable):
        snapshot = backend.snapshot()
    ctx = AnalysisContext.from_table(raw)
    spans = ctx.spans.sort(["start_ns", "depth"])
    t0 = int(spans["start_ns"].to_numpy().min())
    t_end = int(spans["end_ns"].to_numpy().max())
    # the recommendations touching it: the run's index (hourglass.analysis.trace_index), best first
    touches = (
        snapshot.trace_index.touching(normalized, spans["span_id"].to_list()) if snapshot is not None else []
    )
    findings = []
    for touch in touches:
        rec = snapshot.by_id.get(touch.recommendation_id, {}) if snapshot is not None else {}
        findings.append(
            {
                "id": touch.recommendation_id,
                "rank": rec.get("rank"),
                "kind": rec.get("kind"),
                "title": rec.get("title"),
                "span_ids": list(touch.span_ids[:MAX_EVIDENCE_ITEMS]),
                "bottleneck_span_ids": list(touch.bottleneck_span_ids[:MAX_EVIDENCE_ITEMS]),
            }
        )
    offset, limit = max(0, offset), max(1, min(limit, MAX_SPANS_PAGE))
    page = spans.slice(offset, limit).select(
        "span_id",
        pl.col("parent_span_id").alias("parent"),
        "service",
        "name",
        ((pl.col("start_ns") - t0) / 1e6).round(3).alias("start_ms"),
        (pl.col("duration_ns") / 1e6).round(3).alias("duration_ms"),
        (pl.col("critical_ns") / 1e6).round(3).alias("critical_self_ms"),
        "on_critical_path",
        "blocking",
        pl.col("status_code").alias("status"),
    )
    return {
        "trace_id": normalized,
        "span_count": spans.height,
        "duration_ms": round((t_end - t0) / 1e6, 3),
        "incomplete": bool(ctx.traces["incomplete"].any()) if ctx.traces.height else False,
        "findings": findings,
        "offset": offset,
        "next_offset": offset + limit if offset + limit < spans.height else None,
        "spans": page.to_dicts(),
    }


def what_if(
    backend: Backend,
    changes: list[dict[str, Any]],
    service: str | None = None,
    operation: str | None = None,
    since: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"changes": changes}
    for name, value in (("service", service), ("operation", operation), ("since", since)):
        if value:
            body[name] = value
    result = backend.queries.whatif(body)
    result["endpoints"] = result["endpoints"][:20]
    return result


def critical_path(
    backend: Backend, service: str | None = None, operation: str | None = None, since: str | None = None
) -> dict[str, Any]:
    if not service or not operation:
        return {
            "endpoints": backend.queries.endpoints(since, limit=30),
            "hint": "call again with service and operation",
        }
    path = backend.queries.critical_path(service, operation, since)
    if path is None:
        names = [f"{e['service']}:{e['operation']}" for e in backend.queries.endpoints(since, limit=15)]
        raise ValueError(f"no trace has the root span {service}:{operation}; endpoints: {', '.join(names)}")
    path.pop("icicle", None)
    path["operations"] = path["operations"][:30]
    return path


def build_server(backend: Backend) -> Any:
    """The MCPServer with Hourglass's read-only tools."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations

    server = MCPServer("hourglass", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING")
    read_only = ToolAnnotations(
        read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
    )

    async def call(fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return await anyio.to_thread.run_sync(lambda: fn(backend, *args, **kwargs))
        except (ValueError, WhatIfInputError, ReportUnavailable, FindingsFailed) as exc:
            raise ToolError(str(exc)) from None

    @server.tool(name="list_recommendations", annotations=read_only)
    async def list_recommendations_tool(
        kind: Annotated[
            str | None,
            Field(
                description="Only these kinds, comma-separated (the `kind` of a recommendation, e.g. "
                "serialized_calls; an unknown kind matches nothing)"
            ),
        ] = None,
        service: Annotated[
            str | None, Field(description="Where the change is made, or a target service")
        ] = None,
        category: Annotated[Literal["parallelization", "fault_tolerance"] | None, Field()] = None,
        severity: Annotated[
            Literal["low", "medium", "high"] | None, Field(description="This severity or worse")
        ] = None,
        offset: Annotated[int, Field(ge=0, description="Skip this many (pagination)")] = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="At most this many")] = 20,
    ) -> dict[str, Any]:
        """The ranked bottleneck recommendations of the current analysis, best first: each with its
        id, kind, where to change (service/operation), a title, the end-to-end latency it saves
        (saved_ms_p50 per affected request, saved_ms_total over all) and a severity. Start here;
        then get_recommendation for the details of one."""
        return await call(list_recommendations, kind, service, category, severity, offset, limit)

    @server.tool(name="get_recommendation", annotations=read_only)
    async def get_recommendation_tool(
        recommendation_id: Annotated[str, Field(description="The id from list_recommendations")],
    ) -> dict[str, Any]:
        """One recommendation in full: summary, actions, impact and the evidence behind it (detector
        numbers, exemplar trace ids and span ids: open one with get_trace)."""
        return await call(get_recommendation, recommendation_id)

    @server.tool(name="get_trace", annotations=read_only)
    async def get_trace_tool(
        trace_id: Annotated[str, Field(description="Hex trace id, e.g. from a recommendation's evidence")],
        offset: Annotated[int, Field(ge=0, description="First span of the page (spans in start order)")] = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_SPANS_PAGE, description="Spans per page")] = 200,
    ) -> dict[str, Any]:
        """One trace's repaired spans (clock skew corrected) in start order, paginated: times in ms from
        the trace's start, whether each span is on the critical path and its self time there, plus
        the recommendations that touch this trace and their spans."""
        return await call(get_trace, trace_id, offset, limit)

    @server.tool(name="what_if", annotations=read_only)
    async def what_if_tool(
        changes: Annotated[
            list[dict[str, Any]],
            Field(
                description='Changes applied together; each is one of {"recommendation": "<id>"}, '
                '{"speedup": {"service": S, "operation": O, "factor": F}} (O takes F x its own time: '
                "0.5 = twice as fast, 0 = none; its children keep theirs; O '*' = every operation of S), "
                '{"parallelize": {"service": S, "operation": O}} (the blocking children of caller O run '
                'concurrently), {"cap": {"service": S, "operation": O, "concurrency": K}} (they run at '
                "most K at a time)"
            ),
        ],
        service: Annotated[
            str | None, Field(description="Only traces whose root span is in this service")
        ] = None,
        operation: Annotated[
            str | None, Field(description="Only traces whose root span has this name")
        ] = None,
        since: Annotated[str | None, Field(description="Only traces since: 15m, 2h, 7d or ISO 8601")] = None,
    ) -> dict[str, Any]:
        """Price a change before making it: re-times every stored trace as if the changes were made,
        along each trace's critical path (the engine that prices the recommendations), and returns
        the end-to-end latency saved in total and per endpoint (p50/p95 before and after). Use it
        to compare options or to check that an idea touches the critical path at all."""
        return await call(what_if, changes, service, operation, since)

    @server.tool(name="critical_path", annotations=read_only)
    async def critical_path_tool(
        service: Annotated[
            str | None, Field(description="The endpoint's root service; omit to list endpoints")
        ] = None,
        operation: Annotated[
            str | None, Field(description="The endpoint's root span name, e.g. 'GET /checkout'")
        ] = None,
        since: Annotated[str | None, Field(description="Only traces since: 15m, 2h, 7d or ISO 8601")] = None,
    ) -> dict[str, Any]:
        """What an endpoint waits on across all its requests: for each service/operation, its self time
        on the critical path (p50, p95) and its share of the endpoint's latency (shares sum to 1),
        plus the most frequent paths. Without service and operation, lists the endpoints."""
        return await call(critical_path, service, operation, since)

    return server


# ----------------------------------------------------------------------------------------------
# streamable HTTP under `serve`


class _TokenGuard:
    """ASGI wrapper: 401 unless ``authorized(Authorization header)``. A class, not a function, so
    Starlette's ``Route`` passes it raw ASGI calls (every method) instead of a Request."""

    def __init__(self, app: Any, authorized: Callable[[str | None], bool]) -> None:
        self.app = app
        self.authorized = authorized

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            header = None
            for name, value in scope.get("headers") or []:
                if name == b"authorization":
                    header = value.decode("latin-1")
            if not self.authorized(header):
                detail = "missing or wrong bearer token (Authorization: Bearer <HOURGLASS_API_TOKEN>)"
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="hourglass"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})
                return
        await self.app(scope, receive, send)


def http_route(
    backend: Backend, authorized: Callable[[str | None], bool], host: str
) -> tuple[Any, Callable[[], Any]]:
    """(a Starlette route for ``/mcp`` that checks the token, the lifespan context the session
    manager needs while the app runs)."""
    from starlette.routing import Route

    server = build_server(backend)
    inner = server.streamable_http_app(
        streamable_http_path="/mcp", stateless_http=True, json_response=True, host=host
    )
    mcp_app = next(r for r in inner.routes if getattr(r, "path", None) == "/mcp").app

    guarded = _TokenGuard(mcp_app, authorized)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    return Route("/mcp", endpoint=guarded, include_in_schema=False), lifespan


# ----------------------------------------------------------------------------------------------
# stdio: `hourglass mcp --db PATH`


def run_stdio(db: str) -> None:
    from hourglass.api.analysis_service import AnalysisService
    from hourglass.api.settings import Settings
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    store = DuckDBSpanStore(db)
    try:
        service = AnalysisService(store, isolate=False, render_html=False, freeze_gc=False)

        def ids() -> set[str] | None:
            snapshot = service.snapshot
            return set(snapshot.by_id) if snapshot is not None else None

        backend = Backend(
            report=lambda: service.wait_first(600.0),
            fetch_trace=store.trace,
            queries=QueryEngine.over_store(
                store,
                recommendation_ids=ids,
                budget=Settings().memory_budget,
                window_findings=service.window_findings,
            ),
        )
        build_server(backend).run("stdio")
    finally:
        store.close()
