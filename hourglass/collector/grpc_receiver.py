"""OTLP/gRPC receiver: ``opentelemetry.proto.collector.trace.v1.TraceService/Export``.

A generic handler receives the raw request bytes (grpc does no protobuf work) and hands them to the
Export core (``hourglass.collector.export``: admission, decode, group commit), which says what
the answer is; the answer is sent only after the rows are committed. This module only translates
a ``Refusal`` into a status code (its ``google.rpc.Code``) and RetryInfo. Status codes follow the
OTLP spec:

- OK with ``partial_success`` (count and reasons) when some spans were rejected (bad ids);
- INVALID_ARGUMENT for bytes that are not an ExportTraceServiceRequest (not retryable);
- RESOURCE_EXHAUSTED with ``google.rpc.RetryInfo`` in ``grpc-status-details-bin`` when the
  pipeline is over its memory caps; UNAVAILABLE with RetryInfo while shutting down or when a
  commit failed — exporters back off and retry instead of the server running out of memory;
- UNAUTHENTICATED when a bearer token is configured and the request does not carry it.

gzip-compressed requests are decompressed by grpc; messages over ``max_message_bytes`` are
refused by grpc with RESOURCE_EXHAUSTED before any parsing. The standard ``grpc.health.v1``
service reports SERVING until shutdown starts.

Server model: grpc's synchronous server with a thread pool; the pool lets many requests wait for
a shared commit at once, which is what group commit needs. ``max_concurrent_rpcs`` is a
last-resort bound on calls waiting for a thread, far above the pool size. Decoding runs in
the handler thread (``decode_processes=0``; with the C scanner, as ``hourglass serve`` does) or,
without the C extension, in worker processes (see ``_ProcessDecoder``) so that the pure-Python
decoder does not hold the GIL the writer thread needs.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import pyarrow as pa

from hourglass.collector.decode import DecodeResult, decode_export_request
from hourglass.collector.export import ExportCore, Refusal, RefusalKind
from hourglass.collector.ingest import IngestPipeline
from hourglass.collector.responses import add_health_service, export_response, status_details_with_retry
from hourglass.settings import default

log = logging.getLogger("hourglass.grpc")

SERVICE_NAME = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT_METHOD = f"/{SERVICE_NAME}/Export"
# The tunables' one definition (value, unit, why) is the table in hourglass/settings.py.
DEFAULT_WORKERS: int = default("grpc_handler_threads")
MAX_QUEUED_RPCS_PER_WORKER = 4
REFUSAL_THREADS = 2
GRPC_LIMIT_FACTOR = 16  # grpc's bare limit, as a multiple of ours (see GrpcReceiver.__init__)
CONCURRENT_DECODES: int = default("concurrent_decodes")
SHUTDOWN_RETRY_AFTER_S: float = default("shutdown_retry_after_seconds")
RECEIVE_BUDGET_WAIT_S: float = default("receive_budget_wait_seconds")
COMMIT_TIMEOUT_S: float = default("commit_timeout_seconds")
DECODE_TIMEOUT_S: float = default("decode_timeout_seconds")
PARENT_CHECK_INTERVAL_S = 0.5
GC_GEN0_THRESHOLD = 50_000


# -- decoding in worker processes ---------------------------------------------------------------
# Decoding is Python and holds the GIL. In one process it competes with the writer thread, whose
# DuckDB insert releases the GIL but takes it back many times per commit (DuckDB checks for
# signals, registers the Arrow scan, pyarrow calls): profiles of serve under load showed the
# writer ~95 % busy and over a third of that waiting for the GIL held by decoders, with serve
# using barely more than one of the two cores. With ``decode_processes`` > 0 requests are decoded
# in that many worker processes (spawned, never forked: grpc threads are running) and come back
# as Arrow IPC streams, which read zero-copy; the serve process keeps grpc, the pipeline and the
# writer, and its GIL is mostly free.


def _exit_when_orphaned(parent_pid: int) -> None:
    """A worker whose serve process died (even by kill -9) exits instead of lingering."""
    while True:
        time.sleep(PARENT_CHECK_INTERVAL_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def tune_gc_for_decoding() -> None:
    """For a process that decodes OTLP (serve itself and its decode workers): decoding allocates
    ~20 container objects per span, so CPython's default cyclic-GC trigger (every 700 net
    allocations) runs a collection every few dozen spans; profiles of serve under load showed ~7 %
    of CPU in gc. Objects alive now (modules, app) are frozen out of collections and the
    young-generation trigger is raised; cycles are still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 50)


def _decode_worker_init(parent_pid: int) -> None:
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    tune_gc_for_decoding()


def _decode_worker_ready() -> int:
    return os.getpid()


def _decode_to_ipc(request: bytes) -> tuple[pa.Buffer, int, list[str]]:
    """``decode_export_request`` in a worker: (Arrow IPC stream of the table, rejected, errors)."""
    result = decode_export_request(request)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, result.table.schema) as writer:
        writer.write_table(result.table)
    return sink.getvalue(), result.rejected, result.errors


class _ProcessDecoder:
    """A pool of decode worker processes; ``decode`` has the contract of ``decode_export_request``."""

    def __init__(self, processes: int) -> None:
        self._pool = futures.ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_decode_worker_init,
            initargs=(os.getpid(),),
        )
        # start every worker now (in the background) rather than on the first requests
        self._warmup = [self._pool.submit(_decode_worker_ready) for _ in range(processes)]

    def decode(self, request: bytes) -> DecodeResult:
        ipc, rejected, errors = self._pool.submit(_decode_to_ipc, request).result(timeout=DECODE_TIMEOUT_S)
        table = pa.ipc.open_stream(ipc).read_all()
        return DecodeResult(table=table, rejected=rejected, errors=errors)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _CountingExecutor(futures.ThreadPoolExecutor):
    """The handler pool, counting calls submitted and not yet finished (running or queued)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outstanding = 0
        self._count_lock = threading.Lock()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._count_lock:
            self.outstanding += 1

        def counted() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                with self._count_lock:
                    self.outstanding -= 1

        try:
            return super().submit(counted)
        except BaseException:
            with self._count_lock:
                self.outstanding -= 1
            raise


class _ExportHandlers(grpc.GenericRpcHandler):
    """Export's handler, chosen per call in grpc's polling thread: the real one, or, when more
    calls are outstanding than the receiver takes, one that refuses with RetryInfo."""

    def __init__(self, receiver: GrpcReceiver) -> None:
        self._receiver = receiver
        # Export is unary on the wire, but served as stream-unary: grpc then reads the request
        # message only when the handler asks for it (next() on the iterator), so the handler
        # first checks the token and reserves the bytes in the receive budget, and a call that
        # is refused never has its message read into memory at all.
        self._export = grpc.stream_unary_rpc_method_handler(
            _measured(receiver.export_stream, receiver.pipeline),
            request_deserializer=None,
            response_serializer=None,
        )
        measured_refusal = _measured(receiver.refuse_busy, receiver.pipeline)

        # refusals run in their own small pool: the handler pool may be full of Exports waiting
        # for a commit, and a refusal must not wait behind them (grpc's per-handler pool hook)
        def refuse(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            return measured_refusal(request_iterator, context)

        refuse.experimental_thread_pool = receiver._refusal_executor  # type: ignore[attr-defined]
        self._refuse = grpc.stream_unary_rpc_method_handler(
            refuse, request_deserializer=None, response_serializer=None
        )

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != EXPORT_METHOD:
            return None
        receiver = self._receiver
        if receiver._executor.outstanding >= receiver.max_queued_calls:
            return self._refuse
        return self._export


_GRPC_STATUS = {code.value[0]: code for code in grpc.StatusCode}

# gRPC status of an answered Export -> the outcome label of hourglass_export_requests_total, from
# the refusals' own table (RefusalKind). Two kinds share a status: grpc itself refuses a message
# over max_message_bytes before the handler runs (so RESOURCE_EXHAUSTED here is OVERLOADED), and
# UNSUPPORTED (a content type) exists on HTTP only (so INVALID_ARGUMENT is BAD_REQUEST).
_OUTCOMES = {grpc.StatusCode.OK: "ok"} | {
    _GRPC_STATUS[kind.rpc_code]: kind.outcome
    for kind in RefusalKind
    if kind not in (RefusalKind.TOO_LARGE, RefusalKind.UNSUPPORTED)
}


def _measured(handler: Any, pipeline: IngestPipeline) -> Any:
    """``handler`` counting its Export's outcome and latency in ``pipeline.exports`` (once per call)."""

    def call(request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            response = handler(request, context)
        except BaseException:
            outcome = _OUTCOMES.get(context.code(), "error")
            pipeline.exports.finished("grpc", outcome, time.perf_counter() - started)
            raise
        pipeline.exports.finished("grpc", "ok", time.perf_counter() - started)
        return response

    return call


@dataclass(frozen=True)
class GrpcTls:
    """Server certificate and key (PEM bytes); with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS)."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class GrpcKeepalive:
    """Connection housekeeping (grpc core channel arguments): ping an idle client every
    ``keepalive_s`` and drop it when no answer comes within ``keepalive_timeout_s``; close
    connections with no call for ``max_idle_s``; accept client pings no more often than
    every ``min_client_ping_s`` (the OpenTelemetry exporters' default keepalive is off); close a
    connection that has not completed its TLS and HTTP/2 handshake within ``handshake_timeout_s``
    (a socket that connects and says nothing)."""

    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_idle_s: float = 300.0
    min_client_ping_s: float = 10.0
    handshake_timeout_s: float = 10.0

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_connection_idle_ms", int(self.max_idle_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_client_ping_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
            # no BDP probing: it grows each stream's HTTP/2 window towards the message size, so
            # grpc buffered whole requests that the handlers had not asked for yet (32 x 12 MB
            # Exports: +305 MiB with it, +144 MiB without, against a 64 MiB receive budget)
            ("grpc.http2.bdp_probe", 0),
        ]


# google.rpc.Code number -> gRPC status (the same numbering)
_UNAUTHENTICATED = Refusal(
    RefusalKind.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer <token>' metadata"
)


def _abort(context: grpc.ServicerContext, refusal: Refusal) -> NoReturn:
    """Answer a refused Export: its status code, and RetryInfo when the client should retry."""
    if refusal.retry_after_s is not None:
        details = status_details_with_retry(refusal.kind.rpc_code, refusal.message, refusal.retry_after_s)
        context.set_trailing_metadata((("grpc-status-details-bin", details),))
    context.abort(_GRPC_STATUS[refusal.kind.rpc_code], refusal.message)
    raise AssertionError("abort raises")


class GrpcReceiver:
    """The OTLP/gRPC endpoint; ``start()`` binds and returns the port (0 picks a free one)."""

    def __init__(
        self,
        pipeline: IngestPipeline,
        *,
        host: str = "127.0.0.1",
        port: int = 4317,
        max_message_bytes: int = default("max_message_bytes"),
        api_token: str | None = None,
        workers: int = DEFAULT_WORKERS,
        max_concurrent_rpcs: int | None = None,
        decode_processes: int = 0,
        receive_budget_bytes: int | None = None,
        tls: GrpcTls | None = None,
        keepalive: GrpcKeepalive | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.host = host
        self.port = port
        self.max_message_bytes = max_message_bytes
        self.decode_processes = decode_processes
        self._decoder: _ProcessDecoder | None = None
        # in-process decodes hold the GIL: a couple at once is enough; with worker processes,
        # one request per worker is decoded at a time and the others wait with their bytes only
        self._decode_slots = threading.BoundedSemaphore(decode_processes or CONCURRENT_DECODES)
        # A read reserves max_message_bytes of the core's receive budget before grpc reads the
        # message (its size is not known yet) and keeps only the real size once read; a call that
        # finds no room within RECEIVE_BUDGET_WAIT_S is refused with RESOURCE_EXHAUSTED and RetryInfo.
        self.core = ExportCore(
            pipeline,
            "grpc",
            max_message_bytes=max_message_bytes,
            unavailable_retry_after_s=SHUTDOWN_RETRY_AFTER_S,
            api_token=api_token,
            receive_budget_bytes=receive_budget_bytes,
        )
        self.receive_budget_bytes = self.core.receive_budget_bytes
        self.tls = tls
        self._executor = _CountingExecutor(max_workers=workers, thread_name_prefix="hourglass-grpc")
        self._refusal_executor = futures.ThreadPoolExecutor(
            max_workers=REFUSAL_THREADS, thread_name_prefix="hourglass-grpc-refuse"
        )
        # Calls beyond this many (running or waiting for a handler thread) are answered at once
        # with RESOURCE_EXHAUSTED and RetryInfo. grpc's own limit (maximum_concurrent_rpcs) refuses
        # with no RetryInfo, which an OpenTelemetry Collector exporter treats as permanent (the
        # batch is dropped), so it stays a last resort far above this one. Calls waiting for a
        # thread hold no request bytes yet: grpc reads the message when a thread takes the call.
        self.max_queued_calls = max_concurrent_rpcs or workers * MAX_QUEUED_RPCS_PER_WORKER
        self._server = grpc.server(
            self._executor,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
                *(keepalive or GrpcKeepalive()).options(),
            ],
            maximum_concurrent_rpcs=self.max_queued_calls * GRPC_LIMIT_FACTOR,
        )
        self._server.add_generic_rpc_handlers((_ExportHandlers(self),))
        self._health = add_health_service(self._server)

    def start(self) -> int:
        try:
            address = f"{self.host}:{self.port}"
            if self.tls is None:
                bound = self._server.add_insecure_port(address)
            else:
                bound = self._server.add_secure_port(address, self.tls.server_credentials())
        except RuntimeError as exc:  # grpc reports a busy port this way
            raise OSError(f"cannot listen for OTLP/gRPC on {self.host}:{self.port}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen for OTLP/gRPC on {self.host}:{self.port}")
        self.port = bound
        if self.decode_processes > 0:
            self._decoder = _ProcessDecoder(self.decode_processes)
            self.core.decoder = self._decoder.decode
        self._server.start()
        return bound

    def begin_shutdown(self) -> None:
        """Report NOT_SERVING to health checks; new Exports are refused by the closing pipeline."""
        self._health.enter_graceful_shutdown()

    def stop(self, grace: float = 10.0) -> None:
        self._health.enter_graceful_shutdown()
        self._server.stop(grace).wait(grace + 1)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._refusal_executor.shutdown(wait=False, cancel_futures=True)
        if self._decoder is not None:
            self._decoder.close()

    # -- the RPC -----------------------------------------------------------------------------
    def _authorised(self, context: grpc.ServicerContext) -> bool:
        for key, value in context.invocation_metadata():
            if key == "authorization":
                return self.core.authorised(value)
        return self.core.authorised(None)

    def refuse_busy(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        if not self._authorised(context):  # a wrong token is told so, busy or not
            _abort(context, _UNAUTHENTICATED)
        retry_after_s = self.pipeline.retry_after_s
        self.pipeline.count_overload_refusal()
        _abort(
            context,
            Refusal(
                RefusalKind.OVERLOADED,
                f"ingest overloaded: more than {self.max_queued_calls} Exports in progress; retry after "
                f"{retry_after_s:g}s",
                retry_after_s,
            ),
        )

    def export_stream(self, request_iterator: Any, context: grpc.ServicerContext) -> Any:
        """Export, reading the request only once its bytes fit the receive budget."""
        if not self._authorised(context):
            _abort(context, _UNAUTHENTICATED)
        core = self.core
        try:
            core.admit()
            core.reserve(self.max_message_bytes, wait_s=RECEIVE_BUDGET_WAIT_S)
        except Refusal as refusal:
            _abort(context, refusal)
        reserved = self.max_message_bytes
        try:
            request = next(request_iterator, None)
            if request is None:
                _abort(context, Refusal(RefusalKind.BAD_REQUEST, "the call carried no request message"))
            core.release(reserved - len(request))  # keep only what the request holds
            reserved = len(request)
            return self._export(request, context, reserved=True)
        finally:
            core.release(reserved)

    def export(self, request: bytes, context: grpc.ServicerContext) -> Any:
        """Export of request bytes already read (the unary form, for callers in process)."""
        if not self._authorised(context):
            _abort(context, _UNAUTHENTICATED)
        return self._export(request, context, reserved=False)

    def _export(self, request: bytes, context: grpc.ServicerContext, *, reserved: bool) -> Any:
        try:
            result = self.core.export(
                request, held=reserved, decode_slots=self._decode_slots, commit_timeout_s=COMMIT_TIMEOUT_S
            )
        except Refusal as refusal:
            _abort(context, refusal)
        return export_response(result.rejected, result.error_message)
