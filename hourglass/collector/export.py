"""One OTLP trace Export, whatever the transport: admission, decode, submit, and what each failure means.

The two receivers (``grpc_receiver``, ``http_receiver``) read a request their own way and hand it to
an ``ExportCore``, which either returns an ``ExportResult`` (spans accepted, and the count and
reasons of rejected ones for ``partial_success``) or raises a ``Refusal`` of one ``RefusalKind``.
``RefusalKind`` is the one place that says what a failure is on the wire — its HTTP status and its
``google.rpc.Code`` (which is also the gRPC status code) — so the receivers only translate, as the
OpenTelemetry Collector's receivers share one Export core and one error-to-status mapping.

The steps, in the order an Export meets them:

1. ``authorised``: the bearer token, when one is configured;
2. ``admit``: a body format the receiver cannot decode is refused (HTTP 415), then the pipeline's
   caps (``Overloaded``: retry later) or its shutdown (``IngestClosed``) — before the body is read;
3. ``reserve``/``release``: the receive budget for bytes read and not yet decoded;
4. ``decode``: gzip, then protobuf or OTLP JSON; bytes that are not an Export are a bad request,
   a decoder that fails (out of memory, a worker process gone) leaves the client to retry;
5. ``submit`` to the group-commit pipeline, and ``committed`` once its future is done: only spans
   that are durably stored are acknowledged; a failed commit is never answered as a success.
"""

from __future__ import annotations

import contextlib
import enum
import hmac
import json
import logging
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from hourglass.collector import json_limits
from hourglass.collector.decode import DecodeError, DecodeResult, decode_export_request, decode_otlp_json
from hourglass.collector.ingest import (
    MAX_UNDECODED_BYTES,
    IngestClosed,
    IngestPipeline,
    Overloaded,
    UndecodedBytes,
)
from hourglass.collector.responses import (
    RPC_CODE_INVALID_ARGUMENT,
    RPC_CODE_RESOURCE_EXHAUSTED,
    RPC_CODE_UNAUTHENTICATED,
    RPC_CODE_UNAVAILABLE,
)

__all__ = ["JSON", "PROTOBUF", "ExportCore", "ExportResult", "Refusal", "RefusalKind"]

log = logging.getLogger("hourglass.export")

PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class RefusalKind(enum.Enum):
    """Why an Export is not acknowledged: (outcome label, HTTP status, ``google.rpc.Code``)."""

    UNAUTHENTICATED = ("unauthenticated", 401, RPC_CODE_UNAUTHENTICATED)
    BAD_REQUEST = ("invalid", 400, RPC_CODE_INVALID_ARGUMENT)  # not retryable
    TOO_LARGE = ("too_large", 413, RPC_CODE_RESOURCE_EXHAUSTED)
    UNSUPPORTED = ("unsupported", 415, RPC_CODE_INVALID_ARGUMENT)
    OVERLOADED = ("overloaded", 429, RPC_CODE_RESOURCE_EXHAUSTED)  # retry after ``retry_after_s``
    UNAVAILABLE = ("unavailable", 503, RPC_CODE_UNAVAILABLE)  # retry after ``retry_after_s``

    def __init__(self, outcome: str, http_status: int, rpc_code: int) -> None:
        self.outcome = outcome
        self.http_status = http_status
        self.rpc_code = rpc_code


class Refusal(Exception):
    """An Export that is not acknowledged; ``retry_after_s`` is set when the client should retry."""

    def __init__(self, kind: RefusalKind, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class ExportResult:
    """An acknowledged Export: every accepted span is stored; ``rejected`` spans (bad ids) were not."""

    accepted: int
    rejected: int = 0
    error_message: str = ""


def _gunzip(body: bytes, limit: int) -> bytes:
    decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Refusal(RefusalKind.BAD_REQUEST, f"body is not valid gzip: {exc}") from None
    if len(out) > limit:
        raise Refusal(RefusalKind.TOO_LARGE, f"decompressed body exceeds the {limit}-byte limit")
    if not decompressor.eof:
        raise Refusal(RefusalKind.BAD_REQUEST, "gzip body is truncated (stream ended early)")
    return out


class ExportCore:
    """The Export of one receiver (``protocol`` labels its metrics: ``grpc`` or ``http``).

    ``decoder``, when set, decodes protobuf bodies instead of ``decode_export_request`` (the gRPC
    receiver's worker processes); ``unavailable_retry_after_s`` is the retry advice when the
    server is shutting down or could not decode or store an Export.
    """

    def __init__(
        self,
        pipeline: IngestPipeline,
        protocol: str,
        *,
        max_message_bytes: int,
        unavailable_retry_after_s: float,
        api_token: str | None = None,
        receive_budget_bytes: int | None = None,
        decoder: Callable[[bytes], DecodeResult] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.protocol = protocol
        self.max_message_bytes = max_message_bytes
        self.unavailable_retry_after_s = unavailable_retry_after_s
        self._expected_auth = f"Bearer {api_token}".encode() if api_token else None
        self.decoder = decoder
        # The receive budget: bytes of requests being read, or read and not yet decoded; one
        # request is let through when none is held, so it is at least one message.
        self.receive_budget_bytes = receive_budget_bytes or max(MAX_UNDECODED_BYTES, 2 * max_message_bytes)
        self._undecoded = UndecodedBytes(
            max(self.receive_budget_bytes, max_message_bytes),
            pipeline.retry_after_s,
            pipeline.count_overload_refusal,
        )

    # -- admission ------------------------------------------------------------------------------
    def authorised(self, given: bytes | str | None) -> bool:
        """Whether ``given`` (the ``authorization`` header or metadata) carries the configured token."""
        if self._expected_auth is None:
            return True
        if given is None:
            return False
        return hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected_auth)

    def admit(self, content_type: str = PROTOBUF, encoding: str = "identity") -> None:
        """Before the body is read: refuse a format this core cannot decode, or a full or closing pipeline."""
        if content_type not in (PROTOBUF, JSON):
            raise Refusal(
                RefusalKind.UNSUPPORTED,
                f"unsupported content type {content_type!r}; use {PROTOBUF} or {JSON}",
            )
        if encoding not in ("gzip", "identity", ""):
            raise Refusal(RefusalKind.UNSUPPORTED, f"unsupported content encoding {encoding!r}; use gzip")
        with self._refusals():
            self.pipeline.check_capacity()

    def reserve(self, size: int, *, wait_s: float = 0.0) -> None:
        """Hold ``size`` bytes of the receive budget, waiting up to ``wait_s`` for room."""
        with self._refusals():
            self._undecoded.reserve(size, wait_s=wait_s)

    def release(self, size: int) -> None:
        self._undecoded.release(size)

    # -- decode, submit, commit ----------------------------------------------------------------
    def decode(self, body: bytes, content_type: str = PROTOBUF, encoding: str = "identity") -> DecodeResult:
        """Rows of an admitted body (blocking: HTTP runs it in a worker thread)."""
        try:
            if encoding == "gzip":
                body = _gunzip(body, self.max_message_bytes)
            if content_type == PROTOBUF:
                decoder = self.decoder
                return decode_export_request(body) if decoder is None else decoder(body)
            try:
                obj = json_limits.loads(body)
            except json_limits.JsonTooDeep as exc:
                raise DecodeError(f"body is refused: {exc}") from None
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DecodeError(f"body is not valid JSON: {exc}") from None
            return decode_otlp_json(obj)
        except DecodeError as exc:
            raise Refusal(RefusalKind.BAD_REQUEST, str(exc)) from None
        except MemoryError:  # a pathological request: retryable, never UNKNOWN
            log.error("out of memory decoding an Export of %d bytes", len(body))
            raise Refusal(
                RefusalKind.UNAVAILABLE, "out of memory decoding the request", self.unavailable_retry_after_s
            ) from None
        except (BrokenProcessPool, futures.TimeoutError) as exc:
            # not decoded, nothing stored: the exporter retries, the server keeps serving
            log.error("decode worker failed: %r", exc)
            raise Refusal(
                RefusalKind.UNAVAILABLE,
                f"decoding failed in a worker process: {exc!r}",
                self.unavailable_retry_after_s,
            ) from None

    def submit(self, result: DecodeResult) -> futures.Future[int]:
        """Queue the rows for the next group commit; the future is done once they are stored."""
        self.pipeline.exports.decoded(self.protocol, result.table.num_rows, result.rejected, result.errors)
        with self._refusals():
            return self.pipeline.submit(result.table, protocol=self.protocol)

    def committed(self, result: DecodeResult, error: BaseException | None) -> ExportResult:
        """The answer once the submitted future is done (``error``: why it failed, if it did)."""
        if error is not None:  # not committed: the exporter must retry, never a false ack
            log.error("Export not committed: %s", error)
            self.pipeline.exports.refused(self.protocol, "not_committed", result.table.num_rows)
            raise Refusal(
                RefusalKind.UNAVAILABLE, f"spans were not committed: {error}", self.unavailable_retry_after_s
            )
        self.pipeline.exports.stored(self.protocol, result.table.num_rows)
        return ExportResult(result.table.num_rows, result.rejected, result.error_message())

    def export(
        self,
        body: bytes,
        *,
        held: bool = False,
        decode_slots: AbstractContextManager[Any] | None = None,
        commit_timeout_s: float | None = None,
    ) -> ExportResult:
        """The whole Export of protobuf bytes, blocking until stored. ``held``: the bytes are
        already in the receive budget; ``decode_slots``: a context manager bounding decodes at once."""
        with self._refusals():
            self.pipeline.check_capacity()
        if not held:
            self.reserve(len(body))
        try:
            with decode_slots if decode_slots is not None else contextlib.nullcontext():
                result = self.decode(body)
        finally:
            if not held:
                self.release(len(body))
        future = self.submit(result)
        error: BaseException | None = None
        try:
            future.result(timeout=commit_timeout_s)
        except Exception as exc:
            error = exc
        return self.committed(result, error)

    @contextlib.contextmanager
    def _refusals(self) -> Iterator[None]:
        """The pipeline's own exceptions as refusals."""
        try:
            yield
        except Overloaded as exc:
            raise Refusal(RefusalKind.OVERLOADED, str(exc), exc.retry_after_s) from None
        except IngestClosed as exc:
            raise Refusal(RefusalKind.UNAVAILABLE, str(exc), self.unavailable_retry_after_s) from None
