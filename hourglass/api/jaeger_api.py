"""The Jaeger query API (``/api/...``) over the span store: Grafana's Jaeger data source and the
Jaeger UI read Hourglass's traces directly, so a recommendation's exemplar opens in Grafana.

Endpoints (the Jaeger query service's HTTP JSON API, same paths, parameters and shapes):

* ``GET /api/services`` — service names.
* ``GET /api/services/{service}/operations`` — span names of a service.
* ``GET /api/operations?service=&spanKind=`` — ``[{name, spanKind}]`` (newer Jaeger UI / Grafana).
* ``GET /api/traces/{traceID}`` — one trace (404 with ``errors`` when unknown).
* ``GET /api/traces?service=&operation=&start=&end=&minDuration=&maxDuration=&limit=&tags=``
  — search; ``start``/``end`` in microseconds since the epoch, durations as Go durations
  (``1.2ms``, ``500us``, ``2s``), ``tags`` a JSON object (``{"http.status_code":"500"}``) or
  repeated ``tag=key:value``; ``lookback`` (``1h``, ``2d``) when ``start`` is absent; also
  ``traceID=`` (repeatable) to fetch given traces.
* ``GET /api/dependencies?endTs=&lookback=`` — service call graph, both in milliseconds.

Every answer is Jaeger's envelope ``{"data", "total", "limit", "offset", "errors"}``; errors are
``[{"code", "msg"}]`` with the same HTTP status. The routes need the API token when one is set
(Grafana: basic auth with the token as password, or an ``Authorization: Bearer`` custom header).

The trace JSON is Jaeger's UI model (``model/json``): ``startTime``/``duration`` and log
``timestamp`` are integer MICROseconds (start and end are each truncated to the microsecond,
so a span keeps its order and end), tags are ``{key, type, value}`` with types
``string|bool|int64|float64|binary`` (binary as base64; arrays and maps as JSON text),
``references`` put the parent first as ``CHILD_OF`` (Grafana nests spans under ``CHILD_OF``
only), a follows-from parent repeated as ``FOLLOWS_FROM`` (as the Collector's OTLP→Jaeger translator
writes it), and each link as ``FOLLOWS_FROM``; span kind, status and scope become the tags the
OpenTelemetry Collector's Jaeger translator writes (``span.kind``, ``otel.status_code``,
``otel.status_description``, ``error=true``, ``otel.scope.name``); the resource is the process
(``service.name`` → ``serviceName``, the other attributes → process tags). Hourglass's own Jaeger
reader (``hourglass.collector.readers.jaeger``) reads this back to the same spans: ids, parents (follows-from
too), services, names, kinds (except UNSPECIFIED, read back as INTERNAL), status, scope and
microsecond timings; the added ``error=true`` tag comes back as an attribute, arrays and maps as
JSON text, and link attributes are not kept.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import anyio
import pyarrow as pa
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from hourglass.collector.readers.jaeger import parse_duration_ns
from hourglass.collector.schema import KIND_NAMES, SPAN_COLUMNS, STATUS_ERROR, STATUS_OK
from hourglass.collector.span_details import TypedValue, span_details
from hourglass.collector.store import SpanStore
from hourglass.collector.trace_query import (
    KIND_NUMBERS,
    TraceQuery,
    dependencies,
    operations,
    search_trace_ids,
)

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "add_jaeger_routes", "jaeger_traces"]

DEFAULT_LIMIT = 100  # the Jaeger query service's default
MAX_LIMIT = 1500
MAX_TRACE_IDS = 200
DEFAULT_DEPENDENCY_LOOKBACK_MS = 24 * 3600 * 1000


class JaegerError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


def envelope(
    data: Any, *, total: int | None = None, errors: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Jaeger's ``structuredResponse``."""
    if total is None:
        total = len(data) if isinstance(data, list) else 0
    return {"data": data, "total": total, "limit": 0, "offset": 0, "errors": errors}


def _error_response(error: JaegerError) -> JSONResponse:
    return JSONResponse(
        envelope(None, total=0, errors=[{"code": error.code, "msg": error.msg}]), status_code=error.code
    )


# -- span rows → Jaeger JSON ----------------------------------------------------------------------


def _tag(key: str, typed: TypedValue) -> dict[str, Any]:
    return {"key": key, "type": typed[0], "value": typed[1]}


def _plain_tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    if isinstance(value, str):
        return {"key": key, "type": "string", "value": value}
    return {"key": key, "type": "string", "value": json.dumps(value, separators=(",", ":"))}


def _process(resource_json: str | None, service: str) -> dict[str, Any]:
    try:
        attributes = json.loads(resource_json) if resource_json else {}
    except ValueError:
        attributes = {}
    if not isinstance(attributes, dict):
        attributes = {}
    tags = [_plain_tag(k, v) for k, v in attributes.items() if k != "service.name"]
    return {"serviceName": service, "tags": tags}


def _span(row: dict[str, Any], process_id: str) -> dict[str, Any]:
    trace_id, span_id = row["trace_id"], row["span_id"]
    details = span_details(row.get("raw"))
    start_us = row["start_ns"] // 1000
    end_us = row["end_ns"] // 1000
    references = []
    parent = row.get("parent_span_id")
    follows_parent = bool(row.get("follows_from"))
    if parent:
        # CHILD_OF first: Grafana nests a span under its CHILD_OF reference only, the Jaeger UI under
        # the first reference; a follows-from parent then repeats as FOLLOWS_FROM (as the Collector's
        # OTLP→Jaeger translator writes it, and as collector.readers.jaeger reads it back)
        references.append({"refType": "CHILD_OF", "traceID": trace_id, "spanID": parent})
        if follows_parent:
            references.append({"refType": "FOLLOWS_FROM", "traceID": trace_id, "spanID": parent})
    for link_trace, link_span, _ in details.links:
        if link_trace == trace_id and link_span == parent:
            continue  # the link that marks the follows-from parent, written above
        references.append({"refType": "FOLLOWS_FROM", "traceID": link_trace, "spanID": link_span})
    tags = [_tag(key, typed) for key, typed in details.attributes]
    present = {key for key, _ in details.attributes}
    kind_name = KIND_NAMES.get(row["kind"], "unspecified")
    if kind_name != "unspecified" and "span.kind" not in present:
        tags.append({"key": "span.kind", "type": "string", "value": kind_name})
    status = row["status_code"]
    if status in (STATUS_OK, STATUS_ERROR):
        tags.append(
            {
                "key": "otel.status_code",
                "type": "string",
                "value": "ERROR" if status == STATUS_ERROR else "OK",
            }
        )
        if row.get("status_message"):
            tags.append({"key": "otel.status_description", "type": "string", "value": row["status_message"]})
    if status == STATUS_ERROR and "error" not in present:
        tags.append({"key": "error", "type": "bool", "value": True})
    if row.get("scope_name") and "otel.scope.name" not in present:
        tags.append({"key": "otel.scope.name", "type": "string", "value": row["scope_name"]})
    logs = []
    for time_ns, name, attributes in details.events:
        fields = [{"key": "event", "type": "string", "value": name}] if name else []
        fields += [_tag(key, typed) for key, typed in attributes]
        logs.append({"timestamp": time_ns // 1000, "fields": fields})
    return {
        "traceID": trace_id,
        "spanID": span_id,
        "operationName": row["name"],
        "references": references,
        "startTime": start_us,
        "duration": max(end_us - start_us, 0),
        "tags": tags,
        "logs": logs,
        "processID": process_id,
        "warnings": None,
    }


def jaeger_traces(table: pa.Table, order: list[str] | None = None) -> list[dict[str, Any]]:
    """Span rows (``SPAN_SCHEMA`` columns, ``raw`` and ``resource_json`` included) → Jaeger UI trace
    objects, one per trace id, in ``order`` (default: as met). Spans are sorted by start time."""
    by_trace: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        by_trace.setdefault(row["trace_id"], []).append(row)
    out = []
    for trace_id in order if order is not None else list(by_trace):
        rows = by_trace.get(trace_id)
        if not rows:
            continue
        rows.sort(key=lambda r: (r["start_ns"], r["span_id"]))
        processes: dict[str, dict[str, Any]] = {}
        process_ids: dict[tuple[str, str | None], str] = {}
        spans = []
        seen: set[str] = set()
        for row in rows:
            if row["span_id"] in seen:  # a duplicate delivery not yet compacted
                continue
            seen.add(row["span_id"])
            key = (row["service"], row.get("resource_json"))
            process_id = process_ids.get(key)
            if process_id is None:
                process_id = f"p{len(process_ids) + 1}"
                process_ids[key] = process_id
                processes[process_id] = _process(row.get("resource_json"), row["service"])
            spans.append(_span(row, process_id))
        out.append({"traceID": trace_id, "spans": spans, "processes": processes, "warnings": None})
    return out


# -- request parameters ---------------------------------------------------------------------------


INT64_MAX = (1 << 63) - 1


def _bounded(value_ns: int, name: str, text: str) -> int:
    if not -INT64_MAX <= value_ns <= INT64_MAX:
        raise JaegerError(400, f"unable to parse param '{name}': {text!r} is out of range")
    return value_ns


def _micros(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return _bounded(int(value) * 1000, name, value)
    except ValueError:
        raise JaegerError(
            400, f"unable to parse param '{name}': {value!r} is not microseconds since the epoch"
        ) from None


def _duration(value: str | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return _bounded(parse_duration_ns(value), name, value)
    except (ValueError, OverflowError):
        raise JaegerError(
            400, f"unable to parse param '{name}': {value!r} is not a duration like 1.2ms, 500us, 2s"
        ) from None


def _tags(tags_json: list[str], tag_pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for text in tags_json:
        try:
            parsed = json.loads(text)
        except ValueError:
            raise JaegerError(400, f"malformed 'tags' parameter {text!r}: expected a JSON object") from None
        if not isinstance(parsed, dict):
            raise JaegerError(400, f"malformed 'tags' parameter {text!r}: expected a JSON object")
        for key, value in parsed.items():
            out[str(key)] = value if isinstance(value, str) else json.dumps(value)
    for pair in tag_pairs:
        key, sep, value = pair.partition(":")
        if not sep or not key:
            raise JaegerError(400, f"malformed 'tag' parameter {pair!r}: expected key:value")
        out[key] = value
    return out


def _trace_id(text: str) -> str:
    cleaned = text.strip().lower()
    if not cleaned or len(cleaned) > 32 or any(c not in "0123456789abcdef" for c in cleaned):
        raise JaegerError(400, f"malformed trace id {text!r}: expected up to 32 hex characters")
    return cleaned.rjust(32, "0")


# -- the router -----------------------------------------------------------------------------------


def add_jaeger_routes(app: FastAPI, store: SpanStore, require_token: Callable[..., Any]) -> None:
    """Register the ``/api`` routes over ``store`` on ``app`` (plain app routes, so the route table
    lists them); ``require_token`` is the app's token dependency."""

    def get(path: str, summary: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        return app.get("/api" + path, tags=["jaeger"], dependencies=[Depends(require_token)], summary=summary)

    async def answer(work: Callable[[], dict[str, Any]]) -> JSONResponse:
        try:
            body = await anyio.to_thread.run_sync(work)
        except JaegerError as error:
            return _error_response(error)
        return JSONResponse(body)

    def fetch(trace_ids: list[str]) -> list[dict[str, Any]]:
        if not trace_ids:
            return []
        table = store.scan(trace_ids=trace_ids, columns=SPAN_COLUMNS)
        return jaeger_traces(table, order=trace_ids)

    @get("/services", "Service names (Jaeger query API)")
    async def services() -> JSONResponse:
        return await answer(lambda: envelope(store.services()))

    @get("/services/{service}/operations", "Span names of a service (Jaeger query API)")
    async def service_operations(service: str) -> JSONResponse:
        def work() -> dict[str, Any]:
            names = sorted({name for name, _ in operations(store, service)})
            return envelope(names)

        return await answer(work)

    @get("/operations", "Operations with their span kind (Jaeger query API)")
    async def operations_route(
        service: Annotated[str | None, Query()] = None,
        span_kind: Annotated[str | None, Query(alias="spanKind")] = None,
    ) -> JSONResponse:
        def work() -> dict[str, Any]:
            if not service:
                raise JaegerError(400, "parameter 'service' is required")
            kind = None
            if span_kind:
                kind = KIND_NUMBERS.get(span_kind.lower())
                if kind is None:
                    raise JaegerError(400, f"unsupported span kind {span_kind!r}")
            pairs = operations(store, service, kind)
            data = [{"name": name, "spanKind": KIND_NAMES.get(k, "unspecified")} for name, k in pairs]
            return envelope(data)

        return await answer(work)

    @get("/traces/{trace_id}", "One trace (Jaeger query API)")
    async def get_trace(trace_id: str) -> JSONResponse:
        def work() -> dict[str, Any]:
            normalized = _trace_id(trace_id)
            traces = fetch([normalized])
            if not traces:
                raise JaegerError(404, "trace not found")
            return envelope(traces)

        return await answer(work)

    @get("/traces", "Search traces (Jaeger query API)")
    async def find_traces(request: Request) -> JSONResponse:
        params = request.query_params

        def work() -> dict[str, Any]:
            trace_ids = [_trace_id(t) for t in params.getlist("traceID") if t]
            if trace_ids:
                if len(trace_ids) > MAX_TRACE_IDS:
                    raise JaegerError(400, f"at most {MAX_TRACE_IDS} traceID parameters")
                return envelope(fetch(list(dict.fromkeys(trace_ids))))
            service = params.get("service") or None
            if service is None:
                raise JaegerError(400, "parameter 'service' is required")
            limit_text = params.get("limit") or ""
            try:
                limit = int(limit_text) if limit_text else DEFAULT_LIMIT
            except ValueError:
                raise JaegerError(400, f"unable to parse param 'limit': {limit_text!r}") from None
            if limit <= 0:
                limit = DEFAULT_LIMIT
            start_ns = _micros(params.get("start"), "start")
            end_ns = _micros(params.get("end"), "end")
            lookback = params.get("lookback")
            if start_ns is None and lookback and lookback != "custom":
                back_ns = _duration(lookback, "lookback") or 0
                start_ns = _bounded(
                    (end_ns if end_ns is not None else time.time_ns()) - back_ns, "lookback", lookback
                )
            min_duration = _duration(params.get("minDuration"), "minDuration")
            max_duration = _duration(params.get("maxDuration"), "maxDuration")
            if min_duration is not None and max_duration is not None and max_duration < min_duration:
                raise JaegerError(400, "'maxDuration' must be greater than or equal to 'minDuration'")
            operation = params.get("operation") or None
            if operation == "all":  # the Jaeger UI's "all operations"
                operation = None
            query = TraceQuery(
                service=service,
                operation=operation,
                start_ns=start_ns,
                end_ns=end_ns,
                min_duration_ns=min_duration,
                max_duration_ns=max_duration,
                tags=_tags(params.getlist("tags"), params.getlist("tag")),
                limit=min(limit, MAX_LIMIT),
            )
            return envelope(fetch(search_trace_ids(store, query)))

        return await answer(work)

    @get("/dependencies", "Service dependency graph (Jaeger query API)")
    async def get_dependencies(
        end_ts: Annotated[str | None, Query(alias="endTs")] = None,
        lookback: Annotated[str | None, Query()] = None,
    ) -> JSONResponse:
        def work() -> dict[str, Any]:
            try:
                end_ms = int(end_ts) if end_ts else time.time_ns() // 1_000_000
                back_ms = int(lookback) if lookback else DEFAULT_DEPENDENCY_LOOKBACK_MS
            except ValueError:
                raise JaegerError(400, "'endTs' and 'lookback' are milliseconds") from None
            until_ns = _bounded(end_ms * 1_000_000, "endTs", str(end_ts))
            since_ns = _bounded(until_ns - back_ms * 1_000_000, "lookback", str(lookback))
            edges = dependencies(store, since_ns, until_ns)
            return envelope([{"parent": p, "child": c, "callCount": n} for p, c, n in edges])

        return await answer(work)
