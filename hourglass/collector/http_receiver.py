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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import zlib

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hourglass.collector import json_limits
from hourglass.collector.decode import (
    RPC_CODE_INVALID_ARGUMENT,
    RPC_CODE_RESOURCE_EXHAUSTED,
    RPC_CODE_UNAUTHENTICATED,
    RPC_CODE_UNAVAILABLE,
    DecodeError,
    DecodeResult,
    decode_export_request,
    decode_otlp_json,
    export_response,
    rpc_status,
)
from hourglass.collector.ingest import (
    MAX_UNDECODED_BYTES,
    IngestClosed,
    IngestPipeline,
    Overloaded,
    UndecodedBytes,
)
from hourglass.settings import default

log = logging.getLogger("hourglass.http")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
SHUTDOWN_RETRY_AFTER_S: float = default("shutdown_retry_after_seconds")  # hourglass/settings.py
CONCURRENT_DECODES: int = default("concurrent_decodes")
RPC_CODE_OUT_OF_RANGE_SIZE = RPC_CODE_RESOURCE_EXHAUSTED


# HTTP status of an answered Export -> the outcome label of hourglass_export_requests_total
_OUTCOMES = {
    200: "ok",
    400: "invalid",
    401: "unauthenticated",
    413: "too_large",
    415: "unsupported",
    429: "overloaded",
    503: "unavailable",
}


class _RequestError(Exception):
    def __init__(
        self, http_status: int, rpc_code: int, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.rpc_code = rpc_code
        self.message = message
        self.retry_after_s = retry_after_s


def _gunzip(body: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _RequestError(400, RPC_CODE_INVALID_ARGUMENT, f"body is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise _RequestError(
            413, RPC_CODE_OUT_OF_RANGE_SIZE, f"decompressed body exceeds the {limit}-byte limit"
        )
    if not decompressor.eof:
        raise _RequestError(400, RPC_CODE_INVALID_ARGUMENT, "gzip body is truncated (stream ended early)")
    return out


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client is not None else "?"


def create_otlp_http_app(
    pipeline: IngestPipeline,
    *,
    max_message_bytes: int = 32 * 1024 * 1024,
    api_token: str | None = None,
    receive_budget_bytes: int | None = None,
) -> Starlette:
    expected_auth = f"Bearer {api_token}".encode() if api_token else None
    # decoding holds the GIL: a couple at a time keeps the event loop free and bounds the memory
    # of half-decoded requests (the rest wait with only their compressed bodies)
    decode_slots = asyncio.Semaphore(CONCURRENT_DECODES)
    undecoded = UndecodedBytes(
        receive_budget_bytes or max(MAX_UNDECODED_BYTES, 2 * max_message_bytes),
        pipeline.retry_after_s,
        pipeline.count_overload_refusal,
    )

    def _error_response(error: _RequestError, content_type: str) -> Response:
        as_json = content_type == JSON
        headers = {}
        if error.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
        if error.http_status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        body = rpc_status(error.rpc_code, error.message, retry_after_s=error.retry_after_s, as_json=as_json)
        return Response(
            body, status_code=error.http_status, media_type=JSON if as_json else PROTOBUF, headers=headers
        )

    async def _read_body(request: Request, reserved: list[int]) -> bytes:
        """The body, reserving each chunk in the undecoded-bytes budget as it arrives (the caller
        releases ``reserved[0]``): a slow sender holds only what it has sent."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_message_bytes:
            raise _RequestError(
                413,
                RPC_CODE_OUT_OF_RANGE_SIZE,
                f"body of {declared} bytes exceeds the {max_message_bytes}-byte limit",
            )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_message_bytes:
                raise _RequestError(
                    413, RPC_CODE_OUT_OF_RANGE_SIZE, f"body exceeds the {max_message_bytes}-byte limit"
                )
            undecoded.reserve(len(chunk))
            reserved[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(body: bytes, content_type: str, gzipped: bool) -> DecodeResult:
        # runs in the thread pool: inflating up to max_message_bytes on the event loop would stall
        # every other connection of this receiver meanwhile
        if gzipped:
            body = _gunzip(body, max_message_bytes)
        if content_type == PROTOBUF:
            return decode_export_request(body)
        try:
            obj = json_limits.loads(body)
        except json_limits.JsonTooDeep as exc:
            raise DecodeError(f"body is refused: {exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DecodeError(f"body is not valid JSON: {exc}") from None
        return decode_otlp_json(obj)

    async def export_traces(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        reply_type = JSON if content_type == JSON else PROTOBUF
        try:
            if expected_auth is not None:
                given = request.headers.get("authorization", "").encode()
                if not hmac.compare_digest(given, expected_auth):
                    raise _RequestError(
                        401, RPC_CODE_UNAUTHENTICATED, "missing or wrong 'Authorization: Bearer <token>'"
                    )
            if content_type not in (PROTOBUF, JSON):
                raise _RequestError(
                    415,
                    RPC_CODE_INVALID_ARGUMENT,
                    f"unsupported content type {content_type!r}; use {PROTOBUF} or {JSON}",
                )
            encoding = request.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("gzip", "identity", ""):
                raise _RequestError(
                    415, RPC_CODE_INVALID_ARGUMENT, f"unsupported content encoding {encoding!r}; use gzip"
                )
            pipeline.check_capacity()  # before reading: a refused body is never held
            reserved = [0]
            try:
                body = await _read_body(request, reserved)
                try:
                    async with decode_slots:
                        result = await run_in_threadpool(_decode, body, content_type, encoding == "gzip")
                except DecodeError as exc:
                    # one line per refused request, never a traceback
                    log.warning("OTLP/HTTP Export from %s refused (400): %.300s", _peer(request), exc)
                    raise _RequestError(400, RPC_CODE_INVALID_ARGUMENT, str(exc)) from None
                except MemoryError:  # a pathological request: retryable, never UNKNOWN
                    raise _RequestError(
                        503,
                        RPC_CODE_UNAVAILABLE,
                        "out of memory decoding the request",
                        SHUTDOWN_RETRY_AFTER_S,
                    ) from None
            finally:
                undecoded.release(reserved[0])
            pipeline.exports.decoded("http", result.table.num_rows, result.rejected, result.errors)
            future = pipeline.submit(result.table, protocol="http")
            try:
                await asyncio.wrap_future(future)
            except Exception as exc:
                log.error("Export not committed: %s", exc)
                pipeline.exports.refused("http", "not_committed", result.table.num_rows)
                raise _RequestError(
                    503, RPC_CODE_UNAVAILABLE, f"spans were not committed: {exc}", SHUTDOWN_RETRY_AFTER_S
                ) from None
        except _RequestError as error:
            return _error_response(error, reply_type)
        except Overloaded as exc:
            return _error_response(
                _RequestError(429, RPC_CODE_RESOURCE_EXHAUSTED, str(exc), exc.retry_after_s), reply_type
            )
        except IngestClosed as exc:
            return _error_response(
                _RequestError(503, RPC_CODE_UNAVAILABLE, str(exc), SHUTDOWN_RETRY_AFTER_S), reply_type
            )
        pipeline.exports.stored("http", result.table.num_rows)
        return Response(
            export_response(result.rejected, result.error_message(), as_json=reply_type == JSON),
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
