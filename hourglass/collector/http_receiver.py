"""OTLP/HTTP receiver: ``POST /v1/traces`` as a lean Starlette app (separate from the REST API).

Per the OTLP/HTTP spec:

- bodies are ``application/x-protobuf`` or ``application/json`` (anything else: 415), optionally
  ``Content-Encoding: gzip`` (a truncated or corrupt stream: 400);
- success is 200 with an ``ExportTraceServiceResponse`` in the request's content type,
  ``partial_success`` carrying the count and reasons of rejected spans; the answer is sent only
  after the rows are committed;
- bad data is 400 with a ``google.rpc.Status`` body saying why; a body over
  ``max_message_bytes`` (compressed or decompressed) is 413;
- overload is 429 with ``Retry-After`` (and RetryInfo in the Status body); shutting down or a
  failed commit is 503 with ``Retry-After`` — the client retries, nothing unstored is acknowledged;
- with a configured token, requests without ``Authorization: Bearer <token>`` get 401.

Admission, decode, group commit and what each failure means are the Export core's
(``hourglass.collector.export``), shared with the gRPC receiver; this module reads the body
(bounded, chunk by chunk) and translates a ``Refusal`` into its HTTP status and Status body.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hourglass.collector.export import JSON, PROTOBUF, ExportCore, ExportResult, Refusal, RefusalKind
from hourglass.collector.ingest import IngestPipeline
from hourglass.collector.responses import export_response, rpc_status
from hourglass.settings import default

log = logging.getLogger("hourglass.http")

SHUTDOWN_RETRY_AFTER_S: float = default("shutdown_retry_after_seconds")  # hourglass/settings.py
CONCURRENT_DECODES: int = default("concurrent_decodes")


# HTTP status of an answered Export -> the outcome label of hourglass_export_requests_total: the
# refusals' own table (RefusalKind), so a new kind of refusal cannot be counted as "error"
_OUTCOMES = {200: "ok"} | {kind.http_status: kind.outcome for kind in RefusalKind}


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "?"


def create_otlp_http_app(
    pipeline: IngestPipeline,
    *,
    max_message_bytes: int = default("max_message_bytes"),
    api_token: str | None = None,
    receive_budget_bytes: int | None = None,
) -> Starlette:
    core = ExportCore(
        pipeline,
        "http",
        max_message_bytes=max_message_bytes,
        unavailable_retry_after_s=SHUTDOWN_RETRY_AFTER_S,
        api_token=api_token,
        receive_budget_bytes=receive_budget_bytes,
    )
    # decoding holds the GIL: a couple at a time keeps the event loop free and bounds the memory
    # of half-decoded requests (the rest wait with only their compressed bodies)
    decode_slots = asyncio.Semaphore(CONCURRENT_DECODES)

    def _error_response(refusal: Refusal, content_type: str) -> Response:
        as_json = content_type == JSON
        headers = {}
        if refusal.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(refusal.retry_after_s)))
        if refusal.kind is RefusalKind.UNAUTHENTICATED:
            headers["WWW-Authenticate"] = "Bearer"
        body = rpc_status(
            refusal.kind.rpc_code, refusal.message, retry_after_s=refusal.retry_after_s, as_json=as_json
        )
        return Response(
            body,
            status_code=refusal.kind.http_status,
            media_type=JSON if as_json else PROTOBUF,
            headers=headers,
        )

    async def _read_body(request: Request, reserved: list[int]) -> bytes:
        """The body, reserving each chunk in the receive budget as it arrives (the caller
        releases ``reserved[0]``): a slow sender holds only what it has sent."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_message_bytes:
            raise Refusal(
                RefusalKind.TOO_LARGE, f"body of {declared} bytes exceeds the {max_message_bytes}-byte limit"
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_message_bytes:
                raise Refusal(RefusalKind.TOO_LARGE, f"body exceeds the {max_message_bytes}-byte limit")
            core.reserve(len(chunk))
            reserved[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _export(request: Request, content_type: str) -> ExportResult:
        if not core.authorised(request.headers.get("authorization", "")):
            raise Refusal(RefusalKind.UNAUTHENTICATED, "missing or wrong 'Authorization: Bearer <token>'")
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        core.admit(content_type, encoding)  # before reading: a refused body is never held
        reserved = [0]
        try:
            body = await _read_body(request, reserved)
            try:
                async with decode_slots:
                    # in the thread pool: inflating and decoding on the event loop would stall
                    # every other connection of this receiver meanwhile
                    result = await run_in_threadpool(core.decode, body, content_type, encoding)
            except Refusal as refusal:
                if refusal.kind is RefusalKind.BAD_REQUEST:  # one line per refused request, never a traceback
                    log.warning("OTLP/HTTP Export from %s refused (400): %.300s", _peer(request), refusal)
                raise
        finally:
            core.release(reserved[0])
        future = core.submit(result)
        error: BaseException | None = None
        try:
            await asyncio.wrap_future(future)
        except Exception as exc:
            error = exc
        return core.committed(result, error)

    async def export_traces(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        reply_type = JSON if content_type == JSON else PROTOBUF
        try:
            result = await _export(request, content_type)
        except Refusal as refusal:
            return _error_response(refusal, reply_type)
        return Response(
            export_response(result.rejected, result.error_message, as_json=reply_type == JSON),
            status_code=200,
            media_type=reply_type,
        )

    async def measured_export(request: Request) -> Response:
        started = time.perf_counter()
        response = await export_traces(request)
        outcome = _OUTCOMES.get(response.status_code, "error")
        pipeline.exports.finished("http", outcome, time.perf_counter() - started)
        return response

    return Starlette(routes=[Route("/v1/traces", measured_export, methods=["POST"])])
