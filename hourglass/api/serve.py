"""`hourglass serve`: OTLP/gRPC + OTLP/HTTP receivers and the REST API in one process, one store.

Startup prints one line per endpoint (with the port actually bound: ``0`` picks a free one).

Shutdown (SIGTERM or SIGINT, or ``stop_event``), in this order, so that nothing uncommitted is
acknowledged and nothing acknowledged is lost:

1. the receivers stop accepting (gRPC health turns NOT_SERVING, new RPCs are refused, new HTTP
   connections are not accepted) while requests already in flight run to completion — their
   rows are still committed by the pipeline, and only then answered;
2. the ingest pipeline closes: it commits what is queued and fails (never acknowledges) what it
   could not commit;
3. the REST API stops, duplicates are compacted, the store is checkpointed and closed; exit 0.

Maintenance runs in the background: compaction of duplicate spans every
``COMPACT_INTERVAL_S`` seconds and retention (``Settings.retention_seconds``; 0 disables it)
every ``RETENTION_INTERVAL_S`` seconds, or every tenth of a shorter retention
(:func:`retention_every`); after a compaction tick, once ``REOPEN_ROWS`` rows were written, the
store's database is reopened in place (not more often than every ``REOPEN_INTERVAL_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import uvicorn

from hourglass.api import server_memory
from hourglass.api.http_guards import guarded_h11_protocol
from hourglass.api.self_traces import SelfTracing, start_self_tracing
from hourglass.api.settings import Settings
from hourglass.api.store_errors import store_open_problem
from hourglass.collector import native_decode
from hourglass.collector.backends import open_store
from hourglass.collector.grpc_receiver import GrpcKeepalive, GrpcReceiver, GrpcTls, tune_gc_for_decoding
from hourglass.collector.http_receiver import create_otlp_http_app
from hourglass.collector.ingest import IngestPipeline
from hourglass.collector.store import SpanStore, StoreError, redact
from hourglass.settings import default

log = logging.getLogger("hourglass.serve")

# Compaction examines the rows ingested since the last one (and the older rows of their traces):
# its memory grows with them (the span store's window over 200k rows: +45 MiB of DuckDB, 1.2M:
# +227 MiB, near serve's buffer pool limit). Every 10 s under 20,000 spans/s it stays near what a
# round's batch read takes, at about the same CPU per row as once a minute.
COMPACT_INTERVAL_S = 10.0
RETENTION_INTERVAL_S = 300.0
# The span store's DuckDB database keeps ~2.3-2.5 MiB of glibc heap per million rows it wrote
# for as long as it stays open (a 10-minute soak at 20,000 spans/s: +25-30 MiB of the server's
# heap); reopened, the same rows cost nearly nothing (``DuckDBSpanStore.reopen``). The
# maintenance reopens it after a compaction tick once this many rows were written since it was
# opened, at most every ``REOPEN_INTERVAL_S`` (so at most ~REOPEN_ROWS' worth is held; a reopen
# holds the store's inserts and reads for ~0.1-1 s, its checkpoint).
REOPEN_ROWS = 1_000_000
REOPEN_INTERVAL_S = 120.0
REOPEN_RETRY_S = 30.0  # after a reopen that gave up
# a retention shorter than RETENTION_CHECKS * RETENTION_INTERVAL_S is checked this many times over
RETENTION_CHECKS = 10
RECEIVER_GRACE_S = 10
PIPELINE_CLOSE_TIMEOUT_S = 60.0
# With the C scanner (collector.native_decode) OTLP/gRPC requests are decoded in the handler
# threads: the scan releases the GIL and the rest is a few numpy/Arrow calls per request
# (bench-ingest, 2 senders x 12: in-process 145k-162k spans/s, worker processes 86k). Without the
# extension (no C compiler at install) the pure-Python decoder holds the GIL, so it runs in this
# many worker processes instead (one per core, at most 2).
DECODE_PROCESSES = 0 if native_decode.AVAILABLE else max(1, min(2, os.cpu_count() or 1))
# One DuckDB thread for the serve store: a parallel insert splits row groups (each thread writes
# its own), which the next checkpoint merges and rewrites; ~1 µs/span more (bench-ingest notes).
STORE_THREADS = 1
# DuckDB's buffer pool of the serve store (hourglass/settings.py): what serve's reads leave cached
# grows up to it between two releases (release_cache after each analysis run), so it bounds
# that part of serve's RSS; reads for the analysis are batches of at most ~100k spans.
STORE_MEMORY_LIMIT: str = default("serve_store_memory_limit")
# DuckDB's allocator (a jemalloc of its own) returns the pages its reads freed in a background
# thread: without it, after the reads of a round it kept them (a round's batch reads over a 4.8M-span
# store: 12 MiB allocated, 173 MiB resident, unchanged seconds later; with it, 19 MiB after 3 s)
STORE_CONFIG = {"allocator_background_threads": True}
# glibc malloc in the serve process (see tune_malloc)
MALLOC_ARENA_MAX: int = default("serve_malloc_arena_max")
MALLOC_MMAP_THRESHOLD: int = default("serve_malloc_mmap_threshold")
_M_ARENA_MAX, _M_MMAP_THRESHOLD = -8, -3  # mallopt's parameter numbers (malloc.h)


@dataclass
class ServeEndpoints:
    grpc: str
    http: str
    api: str


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to ``run_serve`` (one shutdown sequence)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int, what: str) -> socket.socket:
    """A listening socket, so that a busy port is a one-line error naming the endpoint.

    The protocol is given explicitly: asyncio sets TCP_NODELAY on accepted connections only when
    ``sock.proto == IPPROTO_TCP``, and without it Nagle plus delayed ACKs add ~40 ms to every
    keep-alive response (the API benchmark's /healthz floor went from 3 ms to 44 ms)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class StoreUnavailable(OSError):
    """The store file cannot be opened; the message names it and says what to do."""


def open_serve_store(path: str) -> SpanStore:
    """The serve store (any ``--db`` form), or :class:`StoreUnavailable` with one line naming the
    file and the fix (``hourglass.collector.store.StoreError`` for a bad URL or an unreachable server)."""
    try:
        return open_store(
            path, serve=True, threads=STORE_THREADS, memory_limit=STORE_MEMORY_LIMIT, config=STORE_CONFIG
        )
    except StoreError:
        raise
    except (duckdb.Error, OSError) as exc:
        raise StoreUnavailable(store_open_problem(redact(path), exc)) from None


class TlsSettingError(ValueError):
    """TLS files missing, unreadable or not PEM; the CLI prints it and exits 2."""


def _read_pem(path: str, what: str, flag: str) -> bytes:
    try:
        data = open(path, "rb").read()  # noqa: SIM115 - a small file read whole
    except OSError as exc:
        raise TlsSettingError(f"{flag} {path}: cannot read the {what}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsSettingError(f"{flag} {path}: not a PEM file (expected a -----BEGIN ...----- block)")
    return data


def _load_tls(settings: Settings) -> GrpcTls | None:
    """The certificate, key and optional client CA, checked before anything listens."""
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise TlsSettingError("--tls-client-ca needs --tls-cert and --tls-key (TLS must be on)")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise TlsSettingError("--tls-cert and --tls-key go together (HOURGLASS_TLS_CERT / HOURGLASS_TLS_KEY)")
    cert = _read_pem(settings.tls_cert, "certificate", "--tls-cert")
    key = _read_pem(settings.tls_key, "private key", "--tls-key")
    client_ca = (
        _read_pem(settings.tls_client_ca, "client CA", "--tls-client-ca") if settings.tls_client_ca else None
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:  # the same check uvicorn makes, but now: one clear line instead of a traceback later
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsSettingError(
            f"--tls-cert {settings.tls_cert} / --tls-key {settings.tls_key}: not a matching certificate and key ({exc})"
        ) from None
    return GrpcTls(cert_chain=cert, private_key=key, client_ca=client_ca)


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def _warn_about_exposure(settings: Settings) -> None:
    """A clear warning at start-up when other hosts can reach serve without a token or TLS."""
    if _is_loopback(settings.host):
        return
    if not settings.api_token:
        _say(
            f"WARNING: listening on {settings.host} (reachable from other hosts) with no token: anyone who "
            "can connect can send spans and read every trace; set HOURGLASS_API_TOKEN"
        )
    if not settings.tls_cert:
        _say(
            f"WARNING: listening on {settings.host} without TLS: spans, reports and the token travel in "
            "clear text; pass --tls-cert and --tls-key (HOURGLASS_TLS_CERT / HOURGLASS_TLS_KEY)"
        )


def _http_hardening(settings: Settings, tls: GrpcTls | None, *, client_ca: bool) -> dict[str, Any]:
    """uvicorn settings shared by the OTLP/HTTP and API ports: read deadlines (a guarded h11
    protocol), keep-alive timeout, concurrency limit, and TLS (mutual on the OTLP port only)."""
    options: dict[str, Any] = {
        "http": guarded_h11_protocol(settings.header_timeout_seconds, settings.body_timeout_seconds),
        "timeout_keep_alive": settings.keepalive_timeout_seconds,
        "limit_concurrency": settings.max_connections,
    }
    if tls is not None:
        options["ssl_certfile"] = settings.tls_cert
        options["ssl_keyfile"] = settings.tls_key
        if client_ca and settings.tls_client_ca:
            options["ssl_ca_certs"] = settings.tls_client_ca
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return options


def _bound_port(server: uvicorn.Server) -> int:
    for listener in server.servers:
        for sock in listener.sockets:
            return int(sock.getsockname()[1])
    raise RuntimeError("uvicorn server has no listening socket")


def _say(text: str) -> None:
    print(f"hourglass: {text}", flush=True)


async def _serve_async(
    settings: Settings,
    ready: threading.Event | None,
    stop: threading.Event | None,
    endpoints_out: list[ServeEndpoints],
    compact_interval_s: float,
    on_ready: Callable[[ServeEndpoints], None] | None,
    retention_interval_s: float = RETENTION_INTERVAL_S,
) -> None:
    from hourglass.api.app import create_app

    tls = _load_tls(settings)
    if settings.cluster:  # a wrong address fails the start, in one line, before anything listens
        from hourglass.analysis.partitions import check_scheduler

        await asyncio.to_thread(check_scheduler, settings.cluster)
    _warn_about_exposure(settings)
    store = open_serve_store(settings.db)
    from hourglass.api.queries import remove_stale_question_folders

    # the partition files of a question a killed serve was answering, beside the store (gigabytes)
    remove_stale_question_folders(store)
    if not native_decode.AVAILABLE:
        log.warning(
            "the C extension collector._otlpscan is not built (no C compiler at install?): OTLP decoding "
            "uses the pure-Python decoder, about 3x slower; reinstall with gcc available"
        )
    pipeline = IngestPipeline(store)
    grpc_receiver = GrpcReceiver(
        pipeline,
        host=settings.host,
        port=settings.grpc_port,
        max_message_bytes=settings.max_message_bytes,
        api_token=settings.api_token,
        decode_processes=DECODE_PROCESSES,
        receive_budget_bytes=settings.receive_budget_bytes,
        tls=tls,
        keepalive=GrpcKeepalive(
            keepalive_s=settings.grpc_keepalive_seconds,
            max_idle_s=settings.grpc_max_idle_seconds,
            handshake_timeout_s=settings.header_timeout_seconds,
        ),
    )
    loop = asyncio.get_running_loop()
    shutdown = asyncio.Event()

    def request_shutdown(*_: Any) -> None:
        loop.call_soon_threadsafe(shutdown.set)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, request_shutdown)
    if stop is not None:

        def wait_for_stop() -> None:
            stop.wait()
            request_shutdown()

        threading.Thread(target=wait_for_stop, daemon=True).start()

    http_server = _Server(
        uvicorn.Config(
            create_otlp_http_app(
                pipeline,
                max_message_bytes=settings.max_message_bytes,
                api_token=settings.api_token,
                receive_budget_bytes=settings.receive_budget_bytes,
            ),
            host=settings.host,
            port=settings.http_port,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=RECEIVER_GRACE_S,
            **_http_hardening(settings, tls, client_ca=True),
        )
    )
    api_app = create_app(store, settings=settings, ingest=pipeline)
    api_app.state.analysis.say = _say  # (a kept report served after a restart: said with the rest)
    self_tracing: SelfTracing | None = None
    api_server = _Server(
        uvicorn.Config(
            api_app,
            host=settings.host,
            port=settings.api_port,
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=5,
            **_http_hardening(settings, tls, client_ca=False),
        )
    )
    tasks: list[asyncio.Task[None]] = []
    try:
        grpc_port = grpc_receiver.start()
        http_socket = _listen(settings.host, settings.http_port, "OTLP/HTTP")
        api_socket = _listen(settings.host, settings.api_port, "the REST API")
        tasks = [
            asyncio.create_task(http_server.serve(sockets=[http_socket])),
            asyncio.create_task(api_server.serve(sockets=[api_socket])),
        ]
        while not (http_server.started and api_server.started):
            done = [t for t in tasks if t.done()]
            if done:
                for t in done:
                    t.result()  # re-raise a bind error
                raise RuntimeError("an HTTP server stopped during startup")
            await asyncio.sleep(0.02)
        scheme = "https" if tls is not None else "http"
        endpoints = ServeEndpoints(
            grpc=f"{settings.host}:{grpc_port}",
            http=f"{scheme}://{settings.host}:{_bound_port(http_server)}/v1/traces",
            api=f"{scheme}://{settings.host}:{_bound_port(api_server)}",
        )
        endpoints_out.append(endpoints)
        if settings.self_traces_endpoint:
            self_tracing = start_self_tracing(
                settings.self_traces_endpoint,
                own_ports={grpc_port, _bound_port(http_server)},
                analysis=api_app.state.analysis,
                ingest=pipeline,
            )
            _say(f"own traces go to {settings.self_traces_endpoint}")
        _say(f"OTLP/gRPC listening on {endpoints.grpc}")
        _say(f"OTLP/HTTP listening on {endpoints.http}")
        _say(f"REST API listening on {endpoints.api} (GET /healthz, /v1/stats, /v1/recommendations)")
        _say(f"MCP server (streamable HTTP) at {endpoints.api}/mcp")
        if settings.api_token:
            _say("bearer token required on all endpoints (HOURGLASS_API_TOKEN)")
        if tls is not None:
            mutual = (
                "; OTLP clients must present a certificate signed by --tls-client-ca" if tls.client_ca else ""
            )
            _say(f"TLS on all three ports (certificate {settings.tls_cert}){mutual}")
        if on_ready is not None:
            on_ready(endpoints)
        if ready is not None:
            ready.set()
        # the store's size said once counted, after the listening lines: the receivers take spans
        # meanwhile, and a count after a crash reads every row (~7 s at 10M spans; a clean stop
        # kept it: DuckDBSpanStore._seal), which kept those lines back
        counting = threading.Thread(
            target=_say_store_size,
            args=(store, settings.db, shutdown),
            name="hourglass-store-size",
            daemon=True,
        )
        counting.start()

        maintenance = asyncio.create_task(
            _maintenance(store, settings, shutdown, compact_interval_s, retention_interval_s, pipeline)
        )
        await shutdown.wait()
        _say("shutting down: refusing new Exports, committing the ones in flight")
        grpc_receiver.begin_shutdown()
        http_server.should_exit = True
        await asyncio.gather(asyncio.to_thread(grpc_receiver.stop, RECEIVER_GRACE_S), tasks[0])
        await asyncio.to_thread(pipeline.close, PIPELINE_CLOSE_TIMEOUT_S)
        log_rejected_spans(pipeline)
        maintenance.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await maintenance
        api_server.should_exit = True
        await tasks[1]
        removed = await asyncio.to_thread(store.compact)
        try:
            stats = store.stats()
            holds = f"store holds {stats.spans:,} spans, {stats.traces:,} traces"
        except Exception as exc:  # a count is not worth failing the shutdown for: the data is committed
            holds = f"store not counted ({type(exc).__name__}: {exc})"
        _say(
            f"stopped: {pipeline.stats.committed_spans} spans committed this run, {removed} duplicates "
            f"compacted; {holds}"
        )
    finally:
        if self_tracing is not None:
            self_tracing.shutdown()
        for task in tasks:
            if not task.done():
                task.cancel()
        if not pipeline.closing:
            grpc_receiver.stop(0)
            pipeline.close(PIPELINE_CLOSE_TIMEOUT_S)
        store.close()


def _say_store_size(store: SpanStore, db: str, shutdown: asyncio.Event) -> None:
    """``store``'s spans and traces, said when counted (a count that fails is said too, unless
    serve is shutting down: its close ends the count)."""
    started = time.monotonic()
    try:
        stats = store.stats()
    except Exception as exc:
        if not shutdown.is_set():
            log.warning("could not count the spans of the store %s: %s", redact(db), exc)
        return
    took = time.monotonic() - started
    counted = f", counted in {took:.1f} s" if took >= 1 else ""
    _say(f"store {redact(db)} holds {stats.spans:,} spans, {stats.traces:,} traces{counted}")


def retention_every(retention_seconds: float, interval_s: float, compact_interval_s: float) -> float:
    """Seconds between two retention passes: ``interval_s`` (5 minutes), or a tenth of a
    retention shorter than ten of those, not more often than the compaction runs. (With a fixed 5
    minutes, a short retention set to try it, ``--retention 2m``, kept traces up to 7 minutes old.)"""
    return min(interval_s, max(compact_interval_s, retention_seconds / RETENTION_CHECKS))


async def _maintenance(
    store: SpanStore,
    settings: Settings,
    shutdown: asyncio.Event,
    compact_interval_s: float,
    retention_interval_s: float = RETENTION_INTERVAL_S,
    pipeline: IngestPipeline | None = None,
    reopen_rows: int = REOPEN_ROWS,
    reopen_interval_s: float = REOPEN_INTERVAL_S,
) -> None:
    # each on its own schedule: a retention every 12 s (a tenth of --retention 2m) ran at the
    # compaction's 10-s ticks, so every 20 s
    started = time.monotonic()
    next_compaction = next_retention = started + compact_interval_s
    next_reopen = started + reopen_interval_s
    while not shutdown.is_set():
        wake = next_compaction
        if settings.retention_seconds > 0:
            wake = min(wake, next_retention)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(shutdown.wait(), timeout=max(0.0, wake - time.monotonic()))
        if pipeline is not None:
            log_rejected_spans(pipeline)
        if shutdown.is_set():
            return
        now = time.monotonic()
        compacting = now >= next_compaction
        retaining = settings.retention_seconds > 0 and now >= next_retention
        try:
            if compacting:
                removed = await asyncio.to_thread(store.compact)
                if removed:
                    log.info("compaction removed %d duplicate spans", removed)
                # compaction read every recent trace's rows (an error: logged below)
                release_cache = getattr(store, "release_cache", None)
                if callable(release_cache):
                    await asyncio.to_thread(release_cache)
        except Exception:  # maintenance must not stop ingest; the error is reported and retried
            log.exception("store maintenance failed")
        try:
            if retaining:
                cutoff = time.time_ns() - int(settings.retention_seconds * 1e9)
                dropped = await asyncio.to_thread(store.delete_older_than, cutoff)
                if dropped:
                    _say(f"retention removed {dropped} spans older than {settings.retention_seconds:g}s")
        except Exception:
            log.exception("store maintenance failed")
        # each pass's next time counted from its end: a slow pass is followed by a whole
        # interval's rest (these passes hold the store's locks against ingest and the rounds'
        # reads), and one that failed is tried again then, not at once
        if compacting:
            next_compaction = time.monotonic() + compact_interval_s
        if retaining:
            every = retention_every(settings.retention_seconds, retention_interval_s, compact_interval_s)
            next_retention = time.monotonic() + every
        try:
            # after a compaction tick (the reopen returns False when the store stayed busy for
            # its whole wait, and a failed one raises: a later tick tries again)
            if compacting and time.monotonic() >= next_reopen and _reopen_due(store, reopen_rows):
                # (a reopen that gave up, the store busy for its whole wait, held new reads back
                # meanwhile: the next try a while later, not at the next tick)
                done = await asyncio.to_thread(store.reopen)  # type: ignore[attr-defined]
                next_reopen = time.monotonic() + (reopen_interval_s if done else REOPEN_RETRY_S)
        except Exception:  # maintenance must not stop ingest; the error is reported and retried
            log.exception("store maintenance failed")


def _reopen_due(store: SpanStore, rows: int) -> bool:
    """Whether the store has a database to reopen (``DuckDBSpanStore.reopen``) with at least
    ``rows`` rows written since it was opened, or one that a reopen left closed."""
    written = getattr(store, "rows_since_open", None)
    if not callable(written) or not callable(getattr(store, "reopen", None)):
        return False
    count = written()
    return bool(count < 0 or count >= rows)


def log_rejected_spans(pipeline: IngestPipeline) -> None:
    """Spans the receivers rejected since the last call, one log line per kind of problem with a
    count and the first positions (collector.problem_summary), instead of one line per span."""
    kinds = pipeline.exports.problems.drain()
    if not kinds:
        return
    total = sum(k.count for k in kinds)
    log.warning(
        "rejected %d spans in OTLP Exports since the last report (the rest of each Export was stored):", total
    )
    for kind in kinds:
        log.warning("  %s", kind.line(verbose_hint=False))


def tune_malloc(env: dict[str, str] | None = None) -> dict[str, int]:
    """Bound glibc malloc's heap in the serve process; returns what was set (mallopt name ->
    value). Without it the heap grew over a soak although what was in use did not: every
    receiver, API and loader thread may get an arena of its own (up to 8 per core), and the memory
    freed in one is not reused by the others; and glibc raises its mmap threshold to the size of
    each large block freed (up to 32 MiB), after which the span tables shipped to the analysis
    worker and the pickled results received from it were carved from the heap instead of
    mapped and unmapped. A variable set in the environment (``MALLOC_ARENA_MAX``,
    ``MALLOC_MMAP_THRESHOLD_``) wins; elsewhere than glibc, nothing is done."""
    env = dict(os.environ) if env is None else env
    if server_memory.LIBC is None or not hasattr(server_memory.LIBC, "mallopt"):
        return {}
    done: dict[str, int] = {}
    for variable, parameter, value in (
        ("MALLOC_ARENA_MAX", _M_ARENA_MAX, MALLOC_ARENA_MAX),
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD),
    ):
        if variable in env or value <= 0:
            continue
        if server_memory.LIBC.mallopt(parameter, value) == 1:
            done[variable] = value
        else:
            log.warning("mallopt(%s, %d) failed; glibc's default stays", variable, value)
    return done


def _use_jemalloc_for_arrow() -> None:
    """Arrow's default pool (mimalloc) returns freed pages eagerly and re-faults them as zeroed
    huge pages: ~11 % of serve's CPU in perf under load was the kernel clearing pages. jemalloc
    keeps dirty pages for reuse; the ingest benchmark showed ~160 MiB lower peak RSS, same
    throughput. ``ARROW_DEFAULT_MEMORY_POOL`` still wins when set."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow build without jemalloc keeps its default
        log.debug("pyarrow has no jemalloc pool; keeping %s", pa.default_memory_pool().backend_name)


def run_serve(
    settings: Settings,
    ready_event: threading.Event | None = None,
    stop_event: threading.Event | None = None,
    *,
    compact_interval_s: float = COMPACT_INTERVAL_S,
    retention_interval_s: float = RETENTION_INTERVAL_S,
    on_ready: Callable[[ServeEndpoints], None] | None = None,
) -> ServeEndpoints:
    """Run until SIGTERM/SIGINT (main thread) or ``stop_event``; returns the bound endpoints.

    ``on_ready`` is called with the bound endpoints (ports chosen when 0 was asked for) before
    ``ready_event`` is set — for the demo and tests that start serve in-process.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tune_gc_for_decoding()
    tune_malloc()  # before the receivers' threads start
    _use_jemalloc_for_arrow()
    endpoints: list[ServeEndpoints] = []
    asyncio.run(
        _serve_async(
            settings, ready_event, stop_event, endpoints, compact_interval_s, on_ready, retention_interval_s
        )
    )
    return endpoints[0]
