"""The FastAPI application factory: REST API and report pages over a span store.

Routes (all ``/v1`` routes and the report page need ``Authorization: Bearer <token>`` when
``Settings.api_token`` / ``HOURGLASS_API_TOKEN`` is set; the page also accepts HTTP Basic with the
token as password, so a browser can open it; ``/healthz`` and the OpenAPI docs stay open):

* ``GET /healthz`` — liveness.
* ``GET /v1/stats`` — stored span and trace counts, and the background analysis' state.
* ``GET /v1/recommendations`` — the cached ``hourglass.report/v1`` report, filtered in memory by
  ``service``, ``kind``, ``category`` and ``limit``; ``since`` analyses that window on demand;
  ``explain=true`` adds ``near_misses`` (candidates seen and dropped, kept by the background run).
* ``GET /v1/recommendations/{id}`` — one recommendation with its exemplar traces.
* ``GET /v1/traces/{trace_id}`` — one trace's spans, critical path and the findings touching it
  (:func:`trace_view`: timings repaired as the report page draws them, stored ones alongside).
* ``GET /v1/services`` — services seen in the store, with their recommendation counts.
* ``POST /v1/analyses`` — re-run the analysis now.
* ``POST /v1/whatif`` — re-time the stored traces as if the given changes were made
  (:mod:`hourglass.analysis.whatif_query`).
* ``GET /v1/critical-path`` — an endpoint's critical path aggregated across its traces
  (:mod:`hourglass.analysis.endpoint_path`).
* ``/mcp`` — the MCP server (streamable HTTP, :mod:`hourglass.api.mcp_server`), behind the same token.
* ``GET /`` — the HTML report.

Reads never analyse on the request path (see :mod:`hourglass.api.analysis_service`): the hot routes are
``async`` and only join pre-serialised JSON bytes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
from fastapi import Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response, Security
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hourglass.api import http_guards, server_memory
from hourglass.api import rest_models as m
from hourglass.api.analysis_service import AnalysisService
from hourglass.api.analysis_snapshot import ReportSnapshot
from hourglass.api.exemplars import trace_detail
from hourglass.api.jaeger_api import add_jaeger_routes
from hourglass.api.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from hourglass.api.metrics import metrics_registry
from hourglass.api.metrics import render as render_metrics
from hourglass.api.settings import Settings, parse_since
from hourglass.collector.ingest import IngestPipeline
from hourglass.collector.schema import KIND_NAMES
from hourglass.collector.store import SpanStore

log = logging.getLogger("hourglass.api")

TRACE_ID_PATTERN = r"^[0-9a-fA-F]{1,32}$"  # hex, leading zeros optional (stored left-padded to 32)
RECOMMENDATION_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,200}$"
SINCE_STEP_NS = 10 * 1_000_000_000
MAX_EXEMPLARS = 3  # exemplar traces returned with one recommendation
JSON = "application/json"

_bearer = HTTPBearer(auto_error=False, description="Needed when HOURGLASS_API_TOKEN is set")


def _authorized(header: str | None, token: str) -> bool:
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return hmac.compare_digest(value.encode(), token.encode())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        _, _, password = decoded.partition(":")
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def create_app(
    store: SpanStore,
    *,
    settings: Settings | None = None,
    analysis: AnalysisService | None = None,
    writer: Any = "auto",
    start_analysis: bool = True,
    first_report_timeout: float = 30.0,
    ingest: IngestPipeline | None = None,
) -> FastAPI:
    """The Hourglass HTTP app over ``store``.

    ``settings`` supplies ``api_token`` and ``settle_seconds`` (default: ``Settings()``, i.e. the
    ``HOURGLASS_*`` variables). ``analysis`` may be a prepared :class:`AnalysisService`; otherwise
    one is made with ``writer`` ("auto": the Anthropic agent when configured, else the template).
    With ``start_analysis`` the background thread runs for the app's lifespan. A read that
    arrives before the first report waits for it up to ``first_report_timeout`` seconds.
    ``ingest``: the receivers' pipeline (``serve``), whose counters ``/metrics`` exposes.
    """
    settings = settings or Settings()
    service = analysis or AnalysisService(
        store, settle_seconds=settings.settle_seconds, writer=writer, settings=settings
    )
    token = settings.api_token

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if start_analysis:
            service.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                for enter in app.state.lifespans:  # e.g. the MCP session manager
                    await stack.enter_async_context(enter())
                yield
        finally:
            if start_analysis:
                await anyio.to_thread.run_sync(service.stop)

    app = FastAPI(
        title="Hourglass",
        version="0.1.0",
        description="Ranked parallelization and fault-tolerance recommendations from distributed traces.",
        lifespan=lifespan,
    )
    app.state.store = store
    app.state.analysis = service
    app.state.settings = settings
    app.state.lifespans = []
    http_guards.install(app)  # deep/oversized JSON bodies -> 400/413; a full disk -> 503 (issue 15)

    async def require_token(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
    ) -> None:
        if token is None:
            return
        if _authorized(request.headers.get("authorization"), token):
            return
        raise HTTPException(
            status_code=401,
            detail="missing or wrong bearer token (Authorization: Bearer <HOURGLASS_API_TOKEN>)",
            headers={"WWW-Authenticate": 'Bearer realm="hourglass", Basic realm="hourglass"'},
        )

    auth_errors: dict[int | str, dict[str, Any]] = {
        401: {"model": m.ErrorBody, "description": "Token needed"}
    }

    def v1(method: str, path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a ``/v1`` route on the app itself (plain routes: the route table lists them)
        with the token check and its 401 answer documented."""
        responses = {**auth_errors, **kwargs.pop("responses", {})}
        return app.api_route(
            "/v1" + path,
            methods=[method],
            dependencies=[Depends(require_token)],
            responses=responses,
            **kwargs,
        )

    async def current_snapshot() -> ReportSnapshot:
        snapshot = service.snapshot
        if snapshot is None:
            snapshot = await anyio.to_thread.run_sync(service.wait_first, first_report_timeout)
        if snapshot is None:
            status = service.status()
            raise HTTPException(
                status_code=503,
                detail=f"no report yet (analysis {status['state']}"
                + (f": {status['last_error']}" if status["last_error"] else "")
                + ")",
                headers={"Retry-After": "5"},
            )
        return snapshot

    @app.get("/healthz", response_model=m.Health, tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @v1("GET", "/stats", response_model=m.Stats, tags=["service"])
    def stats() -> dict[str, Any]:
        """Stored span and trace counts, the state of the background analysis, and where this
        process's memory is (``server_memory``: :mod:`hourglass.api.server_memory`)."""
        s = store.stats()
        return {
            "spans": s.spans,
            "traces": s.traces,
            "analysis": service.status(),
            "server_memory": server_memory.breakdown(store),
        }

    @v1(
        "GET",
        "/recommendations",
        response_model=m.Report,
        tags=["recommendations"],
        responses={
            422: {"description": "Bad filter"},
            503: {"model": m.ErrorBody, "description": "No report yet"},
        },
    )
    async def recommendations(
        service_name: Annotated[
            str | None,
            Query(alias="service", max_length=500, description="Where the change is made, or a target"),
        ] = None,
        kind: Annotated[
            list[str] | None,
            Query(
                description="One or more kinds, as in Recommendation.kind (repeat the parameter or "
                "separate with commas)"
            ),
        ] = None,
        category: Annotated[Literal["parallelization", "fault_tolerance"] | None, Query()] = None,
        since: Annotated[
            str | None,
            Query(
                max_length=64,
                description="Only spans since then: a duration back from now (15m, 12h, 7d) or an ISO 8601 "
                "time. Analyses that window on demand (slower than the cached report).",
            ),
        ] = None,
        limit: Annotated[
            int | None, Query(ge=1, le=10_000, description="At most this many, best first")
        ] = None,
        explain: Annotated[
            bool,
            Query(
                description="Also list the near misses: every candidate a detector formed and then dropped, "
                "with the rule and the measured value (from the same analysis run)"
            ),
        ] = False,
        if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
    ) -> Response:
        """The ranked recommendations (``hourglass.report/v1``), from the cached report.

        The ``ETag`` names the analysis run (the same URL gives the same body until the next run),
        so a poller sending ``If-None-Match`` gets ``304 Not Modified`` until there is news.
        ``since`` answers carry no ETag: their window moves with the clock.
        """
        if since is not None:
            try:
                since_ns = parse_since(since)
            except ValueError as exc:
                raise HTTPException(status_code=422, detail=str(exc)) from None
            # Whole 10 s steps, so repeated relative queries ("1h") share one cached window analysis.
            since_ns -= since_ns % SINCE_STEP_NS
            snapshot = await anyio.to_thread.run_sync(service.window, since_ns)
        else:
            snapshot = await current_snapshot()
        headers = {"X-Hourglass-Generation": str(snapshot.generation)}
        if since is None:
            etag = f'"hourglass-{snapshot.generation}-{int(snapshot.started_at * 1000)}"'
            headers["ETag"] = etag
            if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
                return Response(status_code=304, headers=headers)
        kinds = [k.strip() for item in kind or [] for k in item.split(",") if k.strip()] or None
        if service_name is None and kinds is None and category is None and limit is None:
            return Response(snapshot.body(explain=explain), media_type=JSON, headers=headers)
        indices = snapshot.filter_indices(service=service_name, kind=kinds, category=category, limit=limit)
        return Response(snapshot.body(indices, explain=explain), media_type=JSON, headers=headers)

    def _trace_view(trace_id: str, snapshot: ReportSnapshot | None) -> dict[str, Any] | None:
        stored = store.trace(trace_id)
        if stored.num_rows == 0:
            return None
        return trace_view(trace_id, stored, snapshot)

    @v1(
        "GET",
        "/traces/{trace_id}",
        response_model=m.TraceDetail,
        tags=["traces"],
        responses={
            404: {"model": m.ErrorBody, "description": "Unknown trace"},
            422: {"description": "Bad id"},
        },
    )
    def trace(
        trace_id: Annotated[
            str,
            Path(
                pattern=TRACE_ID_PATTERN, description="Hex trace id (32 characters; leading zeros optional)"
            ),
        ],
    ) -> dict[str, Any]:
        """One trace: its spans, its critical path and the recommendations that touch it."""
        normalized = trace_id.lower().rjust(32, "0")
        view = _trace_view(normalized, service.snapshot)
        if view is None:
            raise HTTPException(status_code=404, detail=f"trace {normalized} is not in the store")
        return view

    @v1(
        "GET",
        "/recommendations/{recommendation_id}",
        response_model=m.RecommendationDetail,
        tags=["recommendations"],
        responses={404: {"model": m.ErrorBody, "description": "Unknown recommendation"}},
    )
    def recommendation(
        recommendation_id: Annotated[str, Path(pattern=RECOMMENDATION_ID_PATTERN)],
    ) -> dict[str, Any]:
        """One recommendation of the current report, with up to three exemplar traces."""
        snapshot = service.wait_first(first_report_timeout)
        rec = snapshot.by_id.get(recommendation_id) if snapshot is not None else None
        if snapshot is None or rec is None:
            raise HTTPException(
                status_code=404, detail=f"no recommendation {recommendation_id!r} in the current report"
            )
        exemplars = []
        for trace_id in ((rec.get("evidence") or {}).get("trace_ids") or [])[:MAX_EXEMPLARS]:
            view = _trace_view(str(trace_id), snapshot)
            if view is not None:
                exemplars.append(view)
        return {**rec, "exemplars": exemplars}

    @v1("GET", "/services", response_model=m.Services, tags=["service"])
    def services() -> dict[str, Any]:
        """Services seen in the store, with how many current recommendations concern each."""
        counts: dict[str, int] = dict.fromkeys(store.services(), 0)
        snapshot = service.snapshot
        for rec in snapshot.recommendations if snapshot is not None else []:
            concerned = {rec.get("service")} | {t.get("service") for t in rec.get("targets") or []}
            for name in concerned:
                if name:
                    counts[str(name)] = counts.get(str(name), 0) + 1
        return {"services": [{"name": n, "recommendations": c} for n, c in sorted(counts.items())]}

    @v1(
        "POST",
        "/analyses",
        response_model=m.AnalysisRun,
        tags=["recommendations"],
        responses={202: {"model": m.AnalysisRun, "description": "Started (wait=false)"}},
    )
    def run_analysis(
        response: Response,
        wait: Annotated[
            bool, Query(description="Wait for the run to finish (default) or return at once")
        ] = True,
    ) -> dict[str, Any]:
        """Re-run the analysis now over everything stored; returns the new report's summary."""
        if not wait:
            if requested_runs.acquire(blocking=False):
                threading.Thread(target=_run_quietly, name="hourglass-analysis-request", daemon=True).start()
            # else: one run is in progress and another already queued behind it; the queued one starts
            # after this request, so it covers it (run_now coalesces) — no thread per request.
            response.status_code = 202
            return {
                "status": "accepted",
                "generation": service.status()["generation"],
                "analysis": service.status(),
            }
        try:
            snapshot = service.run_now(reason="requested")
        except Exception as exc:
            raise HTTPException(
                status_code=500, detail=f"analysis failed: {type(exc).__name__}: {exc}"
            ) from exc
        report = snapshot.report
        return {
            "status": "completed",
            "generation": snapshot.generation,
            "generated_at": report.get("generated_at"),
            "traces_analyzed": report.get("traces_analyzed"),
            "spans_analyzed": report.get("spans_analyzed"),
            "recommendations": len(snapshot.by_id),
            "duration_ms": round((snapshot.finished_at - snapshot.started_at) * 1000, 1),
            "analysis": service.status(),
        }

    # At most two background runs asked for over REST: one running, one queued behind it.
    requested_runs = threading.BoundedSemaphore(2)

    def _run_quietly() -> None:
        # A failure is logged and recorded in the status by run_now.
        try:
            with contextlib.suppress(Exception):
                service.run_now(reason="requested")
        finally:
            requested_runs.release()

    _add_query_routes(app, v1, store, service)
    _add_mcp_route(app, lambda header: token is None or _authorized(header, token), settings.host)
    # -- issue 17: the Jaeger query API for Grafana and the Jaeger UI (api.jaeger_api), and
    # Hourglass's own Prometheus metrics (api.metrics; open with settings.metrics_public) ----------
    add_jaeger_routes(app, store, require_token)
    registry = metrics_registry(store, analysis=service, ingest=ingest)

    @app.get(
        "/metrics",
        tags=["service"],
        response_class=PlainTextResponse,
        dependencies=[] if settings.metrics_public else [Depends(require_token)],
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def metrics() -> Response:
        """Hourglass's own telemetry in the Prometheus text format (see api.metrics)."""
        body = await anyio.to_thread.run_sync(render_metrics, registry)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    @app.get(
        "/",
        response_class=HTMLResponse,
        tags=["report"],
        dependencies=[Depends(require_token)],
        responses={401: {"description": "Token needed"}, 503: {"description": "No report yet"}},
    )
    async def report_page() -> Response:
        """The HTML report: ranked recommendations with before/after trace waterfalls."""
        snapshot = await current_snapshot()
        page = await anyio.to_thread.run_sync(service.html, snapshot)
        return HTMLResponse(page)

    return app


# -- issue 14: what-if and an endpoint's critical path --------------------------------------------


def _add_query_routes(
    app: FastAPI, v1: Callable[..., Any], store: SpanStore, service: AnalysisService
) -> None:
    """``POST /v1/whatif`` and ``GET /v1/critical-path``: answered from a context of the store that
    :class:`hourglass.api.queries.QueryEngine` builds on first use and keeps until the store changes."""
    from hourglass.analysis.whatif_query import WhatIfInputError
    from hourglass.api.queries import FindingsFailed, QueryEngine

    def current_ids() -> set[str] | None:
        snapshot = service.snapshot
        return set(snapshot.by_id) if snapshot is not None else None

    # under continuous ingest a context up to a settle period old (at least 30 s) answers the next
    # questions instead of rebuilding for each (the report itself is that old at least)
    reuse = max(30.0, float(getattr(app.state.settings, "settle_seconds", 0.0)))
    # a window larger than the memory budget holds at once is asked in partitions of whole traces,
    # one context at a time, not built whole in this process
    budget = getattr(app.state.settings, "memory_budget", None)
    queries = QueryEngine.over_store(
        store,
        recommendation_ids=current_ids,
        reuse_seconds=reuse,
        budget=budget,
        # a recommendation change over a window asked in partitions: its findings over all of it
        window_findings=service.window_findings,
    )
    app.state.queries = queries

    @v1(
        "POST",
        "/whatif",
        response_model=m.WhatIfResult,
        tags=["what-if"],
        responses={
            422: {"description": "A change that cannot be applied, with the reason"},
            500: {
                "description": "The findings a recommendation change needs could not be decided, with the cause"
            },
        },
    )
    def whatif(body: m.WhatIfRequest) -> dict[str, Any]:
        """Re-time the stored traces as if the changes were made, along each trace's critical path
        with the engine that prices the recommendations; root latency before and after, per endpoint."""
        try:
            return queries.whatif(body.model_dump(exclude_none=True))
        except WhatIfInputError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        except FindingsFailed as exc:  # (logged: the worker's traceback is in its cause)
            log.error("what-if: %s", exc, exc_info=exc.__cause__)
            raise HTTPException(status_code=500, detail=str(exc)) from None

    @v1(
        "GET",
        "/critical-path",
        response_model=m.EndpointCriticalPath,
        tags=["what-if"],
        responses={
            404: {"model": m.ErrorBody, "description": "No trace rooted at that endpoint"},
            422: {"description": "Bad parameter"},
        },
    )
    def critical_path(
        service_name: Annotated[
            str, Query(alias="service", min_length=1, max_length=500, description="The root span's service")
        ],
        operation: Annotated[
            str, Query(min_length=1, max_length=1000, description="The root span's name (the endpoint)")
        ],
        since: Annotated[
            str | None, Query(max_length=64, description="Only traces since then: 15m, 12h, 7d or ISO 8601")
        ] = None,
    ) -> dict[str, Any]:
        """What the endpoint waits on across all its traces: each operation's self time on the critical
        path (p50, p95, share of the endpoint's latency), the most frequent paths, and an icicle tree."""
        try:
            path = queries.critical_path(service_name, operation, since)
        except WhatIfInputError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        if path is None:
            busiest = ", ".join(
                f"{e['service']}:{e['operation']}" for e in queries.endpoints(since, limit=10)
            )
            raise HTTPException(
                status_code=404,
                detail=f"no trace has the root span {service_name}:{operation} in the window"
                + (f" (endpoints: {busiest})" if busiest else " (no traces)"),
            )
        return path


def _add_mcp_route(app: FastAPI, authorized: Callable[[str | None], bool], host: str) -> None:
    """``/mcp``: the MCP server over streamable HTTP (:mod:`hourglass.api.mcp_server`), behind the token."""
    try:
        from hourglass.api.mcp_server import Backend, http_route
    except ImportError as exc:  # the mcp SDK missing from an install: the REST API still works
        log.warning("MCP server unavailable at /mcp: %s", exc)
        return
    service: AnalysisService = app.state.analysis
    store: SpanStore = app.state.store
    backend = Backend(
        report=lambda: service.wait_first(30.0),
        fetch_trace=lambda trace_id: store.trace(trace_id),
        queries=app.state.queries,
    )
    route, lifespan = http_route(backend, authorized, host)
    app.router.routes.append(route)
    app.state.lifespans.append(lifespan)


# -- one trace: the REST view ----------------------------------------------------------------------


def trace_view(trace_id: str, stored: Any, snapshot: ReportSnapshot | None) -> dict[str, Any]:
    """``GET /v1/traces/{trace_id}`` (and the exemplars of a recommendation) from the stored spans.

    Timing contract: the spans are the analysis' repaired spans
    (:func:`hourglass.analysis.pipeline.trace_detail`) — the ones the critical path, the what-if
    engine and the report page's waterfalls use. ``start_ns``/``end_ns`` are the stored (raw)
    times, ``clock_skew_ns`` the shift the clock-skew repair applied, and ``start_offset_ms`` /
    ``duration_ms`` (and the trace's ``duration_ms``) the repaired ones: ``start_offset_ms`` =
    (``start_ns`` + ``clock_skew_ns`` − the repaired trace start) / 1e6, which is what the page's
    tooltips show. The recommendations touching it come from the run's
    :class:`hourglass.analysis.trace_index.TraceIndex`. When repair fails the stored times are
    shown as they are (every ``clock_skew_ns`` 0) and ``analysis_error`` says why.
    """
    report = snapshot.report if snapshot is not None else {"recommendations": []}
    index = snapshot.trace_index if snapshot is not None else None
    analysis_error = None
    try:
        detail = trace_detail(stored, report, index)
        rows = detail["spans"]
        kinds = [0 if r["kind_inferred"] else r["kind"] for r in rows]  # as recorded
    except Exception as exc:
        # The stored spans are still worth showing; the failure is logged and in the answer.
        log.exception("critical path of trace %s failed", trace_id)
        analysis_error = f"{type(exc).__name__}: {exc}"
        detail = {"critical_path": [], "touches": []}
        rows = [
            {**r, "clock_skew_ns": 0, "on_critical_path": False, "critical_ns": 0} for r in stored.to_pylist()
        ]
        kinds = [r["kind"] for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["start_ns"], rows[i]["span_id"]))
    t0 = min(r["start_ns"] for r in rows)
    t_end = max(r["end_ns"] for r in rows)
    by_id = snapshot.by_id if snapshot is not None else {}
    findings = []
    for touch in detail["touches"]:
        rec = by_id.get(touch.recommendation_id, {})
        findings.append(
            {
                "id": touch.recommendation_id,
                "rank": rec.get("rank"),
                "kind": rec.get("kind"),
                "category": rec.get("category"),
                "title": rec.get("title"),
                "span_ids": list(touch.span_ids),
                "bottleneck_span_ids": list(touch.bottleneck_span_ids),
            }
        )
    return {
        "trace_id": trace_id,
        "span_count": len(rows),
        "duration_ms": (t_end - t0) / 1e6,
        "services": sorted({r["service"] for r in rows}),
        "critical_path": list(detail["critical_path"]),
        "analysis_error": analysis_error,
        "findings": findings,
        "spans": [
            {
                "span_id": r["span_id"],
                "parent_span_id": r["parent_span_id"],
                "service": r["service"],
                "name": r["name"],
                "kind": KIND_NAMES.get(kinds[i], "unspecified"),
                "start_ns": r["start_ns"] - r["clock_skew_ns"],
                "end_ns": r["end_ns"] - r["clock_skew_ns"],
                "clock_skew_ns": r["clock_skew_ns"],
                "start_offset_ms": (r["start_ns"] - t0) / 1e6,
                "duration_ms": (r["end_ns"] - r["start_ns"]) / 1e6,
                "status_code": r["status_code"],
                "status_message": r.get("status_message"),
                "on_critical_path": bool(r["on_critical_path"]),
                "critical_ms": r["critical_ns"] / 1e6,
            }
            for i, r in ((i, rows[i]) for i in order)
        ],
    }
