"""The analysis worker process: the analysis runs there, away from the server's GIL.

The server process only scans the store (DuckDB, outside the GIL) and hands the Arrow table over
(:class:`AnalysisWorker`), so the analysis' CPU time never competes for the GIL with the OTLP
receivers and the API.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import re
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from hourglass.analysis import scratch, worker_start
from hourglass.analysis.trace_index import TraceIndex
from hourglass.analysis.worker_start import WatchedProcess
from hourglass.analysis.writers import select_writer
from hourglass.api import server_memory
from hourglass.settings import default, iso_ns

if TYPE_CHECKING:
    from hourglass.analysis.batch_tasks import Cluster
    from hourglass.analysis.incremental import IncrementalAnalysis
    from hourglass.analysis.model import Finding

log = logging.getLogger("hourglass.api.analysis")


# Background analysis yields the CPU to ingest: it runs at this niceness (the worker process and
# the thread that scans the store). A 75-second bench-ingest run fell from ~270k to ~110k spans/s
# once the store held millions of spans and the once-a-minute re-analysis competed at equal priority.
BACKGROUND_NICENESS = 10

# Added to the worker's polars allocator settings (jemalloc reads this variable when the process
# starts; polars puts its own decay times first, ``polars/__init__.py``): a background thread
# returns freed pages while the worker waits, and straight to the system (MADV_DONTNEED) rather
# than as "muzzy" pages that stay resident until the kernel needs them. A round's phases peak one
# after another (the rows of one detector, then the next; the pricing): with polars' settings the
# worker kept ~100-200 MiB of an earlier phase's pages through the next (a round over a 3.6M-span
# soak store: 583 -> 466 MiB resident after the convoy rule, 450 -> 366 after the first detector).
# Freed pages are returned at once (``dirty_decay_ms:0``) rather than within polars' 500 ms: the
# worker runs niced beside a busy server, its background thread then lags, and a decision's freed
# pages were still resident under the next one's (soak at 20,000 spans/s: the worker 630 against
# 705 MiB at 6M stored, 483 against 570 at 3.6M; its rounds no slower, the lag 16 s).
WORKER_MALLOC_CONF = ("_RJEM_MALLOC_CONF", "background_thread:true,muzzy_decay_ms:0,dirty_decay_ms:0")
# glibc malloc in the worker (read when the process starts; the server's environment wins): the
# round's Python lists and numpy arrays come from glibc, and with its defaults the arenas of the
# detectors' threads and a dynamic mmap threshold kept what a round freed (a 6M-span store: 212 MiB
# freed but held after a round), as in the server (``serve.tune_malloc``). Its mmap threshold is
# lower than the server's: a round's blocks of 128 KiB-1 MiB (numpy arrays of a finding's
# occurrences, the pricing's lists) came from the heap, which the round's largest phase (the first
# pricing after new batches: 126 MiB in use) had grown; the later phases' small blocks then sat
# scattered over its freed chunks, whose pages they made resident again (a 12M-span store, rounds
# after new batches: the heap resident 75-114 MiB with 41-45 in use; the round's peak 392-397 MiB,
# 377-378 with this threshold and the trims after each stage, n_plus_one's decision 392 -> 379)
WORKER_MMAP_THRESHOLD = 128 * 1024
WORKER_GLIBC_ENV = (
    ("MALLOC_ARENA_MAX", str(default("serve_malloc_arena_max"))),
    ("MALLOC_MMAP_THRESHOLD_", str(WORKER_MMAP_THRESHOLD)),
)


def lower_priority_of_this_thread() -> None:
    """Linux: a thread is a task with its own nice value; elsewhere, or when not allowed, a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICENESS))


def _worker_main(conn: Connection) -> None:
    """Loop of the analysis worker process: (table, settings, since_ns) in, ("ok", result) or
    ("error", traceback text) out, until the pipe closes."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lower_priority_of_this_thread()  # the main thread: threads started later inherit it
    import hourglass.analysis.pipeline  # noqa: F401  -- imported while waiting for the first table, not after
    from hourglass.analysis import memlog

    memlog.set_detail(server_memory.memlog_detail)  # (HOURGLASS_MEMORY_LOG=detail)
    state = _WorkerState()
    # Stopped while it waits for the server (``AnalysisWorker.close``: SIGTERM), the worker closes
    # its incremental state on the way out: the sidecar checkpointed, and an in-memory store's
    # temporary folder removed (killed, it left both: the sidecar's data all in its WAL, and one
    # /tmp/hourglass-incremental-* folder per serve run). Stopped in the middle of a round, it goes
    # at once, as before: the state's writes are whole or not at all; only the round's temporary
    # folders are removed first (nothing reads them after this process: ``analysis.scratch``).
    waiting = [True]

    def on_sigterm(signum: int, frame: Any) -> None:
        if waiting[0]:
            raise SystemExit(128 + signum)
        with contextlib.suppress(Exception):  # (on the way out, whatever happens)
            scratch.remove_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _serve_rounds(conn, waiting, state)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the closing
        worker_start.closing()  # (the parent watch sends none of its own now)
        state.close()


class _WorkerState:
    """What the worker keeps between rounds: the incremental state and the cluster's connection."""

    def __init__(self) -> None:
        self.incremental: IncrementalAnalysis | None = None
        self.cluster: Cluster | None = None  # serve --cluster: the connection to the scheduler

    def open(self, request: dict[str, Any]) -> None:
        """The incremental state of ``request["sidecar"]`` and the connection to its cluster
        (``request["cluster"]``), opened once and kept for the next requests of the same."""
        from hourglass.analysis.batch_tasks import Cluster
        from hourglass.analysis.incremental import IncrementalAnalysis

        if self.incremental is None or self.incremental.sidecar != request["sidecar"]:
            if self.incremental is not None:
                self.incremental.close()
                self.incremental = None
            self.incremental = IncrementalAnalysis(request["sidecar"], release_heap=server_memory.trim_worker)
        if self.cluster is not None and self.cluster.address != request.get("cluster"):
            self.cluster.close()
            self.cluster = None
        if self.cluster is None and request.get("cluster"):
            self.cluster = Cluster(request["cluster"])

    def close(self) -> None:
        if self.incremental is not None:
            try:
                self.incremental.close()
            except Exception:  # (on the way out: the state is whole on disk whatever happens here)
                log.warning("closing the incremental analysis state failed", exc_info=True)
            self.incremental = None
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close()
            self.cluster = None


def _serve_rounds(conn: Connection, waiting: list[bool], state: _WorkerState) -> None:
    sent: list[str] = []  # the files of the last result: the server has read them by its next message
    cleaned: set[str] = set()  # the result folders the server named, their leftovers removed

    def usable(folder: str | None) -> str | None:
        if folder is None or not _prepare_result_folder(folder, clean=folder not in cleaned):
            return None
        cleaned.add(folder)
        return folder

    while True:
        waiting[0] = True
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        finally:
            _remove(sent)
        waiting[0] = False
        if message[0] == "incremental":
            _, request, settings = message
            try:
                state.open(request)
                assert state.incremental is not None
                started = time.perf_counter()
                folder = usable(request.get("results"))
                outcome = run_incremental(
                    state.incremental,
                    PipeReader(conn),
                    request,
                    writer=select_writer(settings),
                    cluster=state.cluster,
                    index_folder=folder,
                )
                reply: tuple[str, Any] = ("ok", (*outcome, time.perf_counter() - started))
            except Exception:
                reply = ("error", traceback.format_exc())
                folder = None
            # the round is over (the state written): what follows, its result sent, loses nothing
            # stopped (the server stopping no longer waits for it), so SIGTERM closes the state
            waiting[0] = True
            reply, sent = _store_index(reply, folder)
            try:
                sent += _send_result(conn, reply)
            except (OSError, ValueError):
                _remove(sent)
                return
            # The report and the index are the server's now: not held here through the next
            # round (whose peak they added to), and the round's freed heap returned
            outcome = reply = None  # type: ignore[assignment]
            _round_done()
            continue
        if message[0] == "findings":  # a what-if's recommendations over a window: few, small
            _, request, settings = message
            try:
                started = time.perf_counter()
                incremental = bool(request.get("incremental"))
                if incremental:  # (the rounds' state: of a sidecar file, or in memory for a store in memory)
                    state.open(request)
                found = window_findings(
                    PipeReader(conn),
                    request,
                    state=state.incremental if incremental else None,
                    cluster=state.cluster,
                )
                reply = ("ok", (found, time.perf_counter() - started))
            except Exception:
                reply = ("error", traceback.format_exc())
            waiting[0] = True
            try:
                sent += _send_result(conn, reply)
            except (OSError, ValueError):
                _remove(sent)
                return
            found = reply = None  # type: ignore[assignment]
            _round_done()
            continue
        if message[0] == "partitioned":
            _, request, settings = message
            try:
                started = time.perf_counter()
                folder = usable(request.get("results"))
                report, index = analyze_partitions(
                    PipeReader(conn),
                    int(request["parts"]),
                    since_ns=request.get("since_ns"),
                    spill_buckets=int(request.get("spill_buckets") or 0),
                    writer=select_writer(settings),
                    explain=bool(request.get("explain")),
                    index_folder=folder,
                    release_heap=server_memory.trim_worker,
                )
                reply = ("ok", (report, index, time.perf_counter() - started))
            except Exception:
                reply = ("error", traceback.format_exc())
                folder = None
            report = index = None  # type: ignore[assignment]
            waiting[0] = True
            reply, sent = _store_index(reply, folder)
            try:
                sent += _send_result(conn, reply)
            except (OSError, ValueError):
                _remove(sent)
                return
            reply = None  # type: ignore[assignment]
            _round_done()
            continue
        shipped, settings, since_ns, explain, results = message
        try:
            started = time.perf_counter()
            table = _receive_table(shipped)
            report, index = analyze_spans(
                table, writer=select_writer(settings), since_ns=since_ns, explain=explain
            )
            result: tuple[str, Any] = ("ok", (report, index, time.perf_counter() - started))
        except Exception:
            result = ("error", traceback.format_exc())
        table = shipped = None
        waiting[0] = True
        result, sent = _store_index(result, usable(results))
        try:
            sent += _send_result(conn, result)
        except (OSError, ValueError):
            _remove(sent)
            return
        result = None  # type: ignore[assignment]
        _round_done()


def _send_result(conn: Connection, reply: tuple[str, Any]) -> list[str]:
    """Send a run's result to the server; returns the file it wrote, if any. The trace index's
    arrays grow with the store (~35 MB at 7M stored spans): through the pipe they cost each process
    ~0.1 s a round (pickled into the pipe by the worker; read in chunks, joined and unpickled into
    a copy by the server, under its GIL). So the result is pickled with its arrays out of band
    (protocol 5), the arrays written once to a file in /dev/shm (else the temp directory) that
    the server reads in one piece (:func:`_receive_result`), and only the rest goes through the
    pipe; without room for the file, all of it does."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(reply, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    total = sum(view.nbytes for view in views)
    directory = _ipc_dir(total) if total else None
    if directory is not None:
        # named after the server (the worker's parent), whose start removes those of a dead one
        fd, path = tempfile.mkstemp(
            prefix=_ipc_prefix(SHM_RESULT_PREFIX, os.getppid()), suffix=".bin", dir=directory
        )
        try:
            with os.fdopen(fd, "wb") as out:
                for view in views:
                    out.write(view)
        except OSError:
            os.unlink(path)
            log.warning("could not write the analysis result to %s; sending it through the pipe", directory)
        else:
            sizes = [view.nbytes for view in views]
            del views, buffers
            try:
                conn.send(("file", data, path, sizes))
            except BaseException:  # the server is gone: nobody will read (and remove) the file
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            return [path]
    del views, buffers
    conn.send(reply)
    return []


# the trace index files the worker writes in the result folder (:func:`_store_index`)
RESULT_PREFIX = "hourglass-result-"


def result_folder(sidecar: str | None) -> str | None:
    """Where the worker writes the trace index of a result (:func:`_store_index`): a folder in
    the incremental analysis' folder beside the store file (on the store's disk, owned by the one
    serve process of that store); None for a store that is not a file."""
    return None if sidecar is None else os.path.join(sidecar + ".d", "results")


def _prepare_result_folder(folder: str, *, clean: bool) -> bool:
    """Create ``folder`` (again, if the sidecar's folder was reset) and, when ``clean`` (the
    worker's first result there), remove the files a killed process left in it (the server
    removes each file once it has opened it; the one worker of a store is the only writer there,
    so a file found before its first result is nobody's). False when it cannot be used."""
    try:
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder) if clean else ():
            if name.startswith(RESULT_PREFIX):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
    except OSError as exc:
        log.warning("cannot keep the trace index in %s (%s): it goes with the result", folder, exc)
        return False
    return True


def _store_index(reply: tuple[str, Any], folder: str | None) -> tuple[tuple[str, Any], list[str]]:
    """(the reply with its trace index's per-trace arrays written to a file in ``folder``, the
    files written). The index covers every affected trace of the store (55 MiB of arrays at 12M
    stored spans) and the server keeps it for as long as it serves the report: received with the
    result, it was the server's heap, which grew with the store (glibc's in use 76 -> 141 MiB over
    a 10-minute soak, and twice the index while a new one arrived beside the old). In a file on
    the store's disk the server reads per lookup what it needs (``TraceIndex.open_stored``);
    mapping it instead put whole large folios of the page cache in the server's RSS on each
    lookup. An index built into its file already (an incremental round: :func:`_built_index`) is
    sent as it is. Without a folder (a store that is not a file), or when the file cannot be
    written, the arrays go with the result (:func:`_send_result`)."""
    if reply[0] == "ok" and reply[1][1].stored_file() is not None:  # (built into its file)
        return reply, [reply[1][1].stored_file()]
    if folder is None or reply[0] != "ok" or not hasattr(os, "pread"):  # (pread: not on Windows)
        return reply, []
    report, index, *rest = reply[1]
    try:
        stored, path = index.stored(folder, prefix=RESULT_PREFIX)
    except OSError as exc:
        log.warning("could not write the trace index to %s (%s): it goes with the result", folder, exc)
        return reply, []
    return ("ok", (report, stored, *rest)), [path]


def _remove(paths: list[str]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    paths.clear()


def _receive_result(message: tuple[Any, ...]) -> tuple[Any, ...]:
    """A result as the worker sent it (:func:`_send_result`): the arrays' file read into one block
    of this process's memory (not mapped: the index is the server's, counted in its RSS, and the
    file's pages are freed at once), which the arrays are read-only views of; the file removed."""
    if message[0] != "file":
        return message
    _, data, path, sizes = message
    try:
        with open(path, "rb", buffering=0) as raw:
            block = raw.read()  # one read (the file's size from fstat), the GIL released
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if len(block) != sum(sizes):
        raise EOFError(f"the analysis result file {path} holds {len(block)} of {sum(sizes)} bytes")
    view = memoryview(block)
    ends = list(itertools.accumulate(sizes))
    buffers = [view[end - size : end] for end, size in zip(ends, sizes, strict=True)]
    result: tuple[Any, ...] = pickle.loads(data, buffers=buffers)
    return result


def _round_done() -> None:
    """After a run, while the worker waits for the next: the cycles among the run's objects
    collected now rather than when the next run allocates, and the C heap's freed pages returned
    to the system (``malloc_trim``: glibc keeps what the run's threads freed in their arenas)."""
    gc.collect()
    server_memory.trim_worker()
    from hourglass.analysis import memlog

    memlog.note("round done, waiting")


def _failed(trace: str) -> RuntimeError:
    """A run that failed in the worker: its cause on the first line (the status shows it), then
    the worker's traceback."""
    lines = trace.strip().splitlines()
    return RuntimeError(f"analysis failed in the worker process: {lines[-1] if lines else '?'}\n{trace}")


def _ipc_dirs() -> tuple[str, ...]:
    """Where the files between the server and its worker go (:func:`_ipc_dir`)."""
    return ("/dev/shm", tempfile.gettempdir())


# the files between the server and its worker: PREFIX<server pid>-XXXX.arrow/.bin; a server killed
# (SIGKILL, OOM) between making one and its unlinking leaves it behind, and the next server's
# worker start removes it (:func:`remove_dead_servers_files`)
SPAN_PREFIX = "hourglass-analysis-"
SHM_RESULT_PREFIX = "hourglass-result-"
_IPC_FILE = re.compile(
    r"^(?:hourglass-analysis-|hourglass-result-)(?P<pid>\d{1,10})-.*\.(?:arrow|bin)$", re.ASCII
)


def _ipc_prefix(prefix: str, server_pid: int) -> str:
    return f"{prefix}{server_pid}-"


# A file younger than this is never taken for a leftover: a live server's file exists only while
# one read is shipped (seconds), and a server in another pid namespace (a container sharing
# /dev/shm or /tmp) has a pid that looks dead from here
LEFTOVER_AGE_S = 600.0


def _sweep_folders() -> None:
    """:func:`hourglass.analysis.scratch.sweep`, each folder removed logged."""
    try:
        for path in scratch.sweep():
            log.warning("removed %s, left by a process that was killed", path)
    except Exception:  # (never raises; a daemon thread's error would only be printed)
        log.exception("removing the folders of killed processes failed")


def remove_dead_servers_files(directories: tuple[str, ...] | None = None) -> list[str]:
    """Remove the span and result files (:data:`SPAN_PREFIX`...) in ``directories`` (default
    :func:`_ipc_dirs`) left by a server that is gone; returns them. A file is a leftover when it
    is older than :data:`LEFTOVER_AGE_S` and its pid is not alive (another user's alive pid
    keeps it), or it carries this process's own pid but is older than this process (a server
    that is always the same pid: pid 1 in a container). Never raises: a name it cannot read is
    left alone."""
    removed = []
    for directory in _ipc_dirs() if directories is None else directories:
        for path in scratch.leftovers(directory, _IPC_FILE, LEFTOVER_AGE_S):
            with contextlib.suppress(OSError):
                os.unlink(path)
                removed.append(path)
    return removed


def _ipc_dir(nbytes: int) -> str | None:
    """Where to put a span table for the worker: /dev/shm (memory, no disk I/O) when it has room
    for it twice over, else the temp directory when it has; None: ship it through the pipe."""
    for directory in _ipc_dirs():
        try:
            fs = os.statvfs(directory)
        except OSError:
            continue
        if os.access(directory, os.W_OK) and fs.f_bavail * fs.f_frsize > 2 * nbytes:
            return directory
    return None


def _ship_table(table: pa.Table) -> tuple[pa.Table | str, str | None]:
    """(what to send, file to delete after the run). The table is written once as an Arrow IPC
    file that the worker memory-maps (no copy): pickling 1M spans (~200 MB) through the pipe cost
    ~0.4-0.9 s of both processes and a second copy in memory. Without room for the file it goes
    through the pipe."""
    directory = _ipc_dir(table.nbytes)
    if directory is None:
        return table, None
    fd, path = tempfile.mkstemp(prefix=_ipc_prefix(SPAN_PREFIX, os.getpid()), suffix=".arrow", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw, pa.ipc.new_file(raw, table.schema) as writer:
            writer.write_table(table)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if not isinstance(exc, OSError):
            raise
        log.warning("could not write the span table to %s; sending it through the pipe", directory)
        return table, None
    return path, path


# A streamed read's file is written only where there is room for twice this much (its size is not
# known before the rows are read): a read the worker asks for is a batch of at most
# ``incremental.BATCH_SPANS`` spans (~20 MiB as Arrow on the soak store), a few exemplar traces, or
# one row per trace of the recent rows. A file that fills its directory anyway is read again
# and shipped whole (:func:`_answer_shipped`).
STREAM_ROOM_BYTES = 64 * 2**20


class _WriteFailed(Exception):
    """Writing a streamed read's file failed (the directory filled up meanwhile...): the read is
    done again and shipped by :func:`_ship_table`."""


def _free_bytes(directory: str) -> int:
    """The bytes free to an unprivileged writer in ``directory``'s file system (0: unknown)."""
    try:
        fs = os.statvfs(directory)
    except OSError:
        return 0
    return fs.f_bavail * fs.f_frsize


class _OverBudget(_WriteFailed):
    """A streamed read's file outgrew half the room its directory had when it began (other reads'
    files and the store's own may fill it too): the read is streamed again into the temp
    directory (:func:`_answer_shipped`)."""

    def __init__(self, directory: str, written: int, budget: int) -> None:
        super().__init__(f"{written} bytes written to {directory}, more than its budget of {budget}")
        self.directory = directory


def _ship_stream(
    batches: pa.RecordBatchReader, directory: str | None = None
) -> tuple[pa.Table | str, str | None]:
    """:func:`_ship_table` of a read that streams out of the store: each record batch written to
    the Arrow IPC file as it comes (the worker maps the file as before; the table it reads is
    chunked), so this process holds one batch of the rows, never all of them. An error of the
    read stops it as it is, and one of writing the file as :class:`_WriteFailed`; either way the
    file is removed. Without room for a file the rows are read whole and go through the pipe.
    ``directory``: the file's (default :func:`_ipc_dir`); the file may take half the room it has
    at the start, checked after each batch (:class:`_OverBudget` beyond)."""
    directory = _ipc_dir(STREAM_ROOM_BYTES) if directory is None else directory
    if directory is None:
        return batches.read_all(), None
    budget = _free_bytes(directory) // 2
    rows = iter(batches)
    # the file made once the query has produced its first rows, not while it runs: a server that
    # stops meanwhile (its reading thread is a daemon) leaves no file behind for that time
    batch = next(rows, None)
    fd, path = tempfile.mkstemp(prefix=_ipc_prefix(SPAN_PREFIX, os.getpid()), suffix=".arrow", dir=directory)
    os.close(fd)
    try:
        try:
            sink = pa.OSFile(path, "wb")
        except OSError as exc:
            raise _WriteFailed(str(exc)) from exc
        with sink:
            try:
                writer = pa.ipc.new_file(sink, batches.schema)
            except OSError as exc:
                raise _WriteFailed(str(exc)) from exc
            while batch is not None:
                try:
                    writer.write_batch(batch)
                    written = sink.tell()
                except OSError as exc:
                    raise _WriteFailed(str(exc)) from exc
                if written > budget:
                    raise _OverBudget(directory, written, budget)
                batch = next(rows, None)  # the read's own errors go as they are
            try:
                writer.close()
            except OSError as exc:
                raise _WriteFailed(str(exc)) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return path, path


def _answer_shipped(reader: StoreReader, request: tuple[Any, ...]) -> tuple[pa.Table | str, str | None]:
    """One read of the worker (``request``), answered and shipped (:func:`_ship_stream` when the
    store streams it, else :func:`_ship_table`): (what to send, the file written, if any). A read
    whose file outgrew its budget in /dev/shm is streamed again into the temp directory; one whose
    file could not be written is read again and shipped whole."""
    from hourglass.analysis import memlog

    shipped = _answered(reader, request)
    memlog.note(f"server: the worker's {request[0]} read shipped")
    return shipped


def _answered(reader: StoreReader, request: tuple[Any, ...]) -> tuple[pa.Table | str, str | None]:
    try:
        try:
            with reader.stream(request) as batches:
                return _ship_stream(batches)
        except _OverBudget as exc:
            directory = tempfile.gettempdir()
            if os.path.realpath(exc.directory) == os.path.realpath(directory):
                raise
            log.warning(
                "a span read for the analysis worker outgrew its room (%s); streaming it to %s",
                exc,
                directory,
            )
            with reader.stream(request) as batches:
                return _ship_stream(batches, directory)
    except _WriteFailed as exc:
        log.warning("could not write a span read for the analysis worker (%s); reading it again", exc)
    return _ship_table(reader.answer(request))


def _receive_table(shipped: pa.Table | str) -> pa.Table:
    if isinstance(shipped, pa.Table):
        return shipped
    mapped = pa.memory_map(shipped, "r")
    # The mapping outlives the name: unlinked at once, the file cannot be left behind in /dev/shm
    # by a server killed mid-run (the sender also unlinks it, for a worker that died first).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shipped)
    return pa.ipc.open_file(mapped).read_all()


class AnalysisWorker:
    """Runs :func:`analyze_spans` in a separate, long-lived process.

    The analysis is CPU-bound for seconds to a minute at 1M spans, partly in Python; in the server
    process it would hold the GIL away from the OTLP receivers and the API. The worker gets the
    scanned span table (an Arrow IPC file in /dev/shm that it memory-maps, else pickled through
    the pipe), picks the writer itself (the Anthropic
    agent is not picklable) and returns the report and the trace index. One request at a time; a
    worker that dies is restarted on the next run, and its death is an error of that run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._swept = False  # the files of dead servers removed (remove_dead_servers_files)

    def start(self) -> None:
        """Start the process now (it takes ~1 s to import polars and the analysis), so the first
        run does not wait for it."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self._kill()
            if not self._swept:  # this worker's first process
                self._swept = True
                try:
                    for path in remove_dead_servers_files():
                        log.info("removed %s, left by a server that is gone", path)
                    # (a run's folders, of a process killed outright: beside, as they may be large)
                    threading.Thread(target=_sweep_folders, name="hourglass-sweep", daemon=True).start()
                except Exception:  # a sweep that fails never keeps the worker from starting
                    log.exception("removing files left by servers that are gone failed")
            context = multiprocessing.get_context("spawn")
            parent, child = context.Pipe()
            # (a server killed with SIGKILL: the worker ends too, its state closed when it waits
            # for a round, as when the server stops it)
            process = WatchedProcess(
                target=_worker_main,
                args=(child,),
                name="hourglass-analysis-worker",
                daemon=True,
                signum=signal.SIGTERM,
            )
            name, value = WORKER_MALLOC_CONF
            before = os.environ.get(name)
            os.environ[name] = f"{before},{value}" if before else value  # the spawned process's copy
            added = [n for n, _ in WORKER_GLIBC_ENV if n not in os.environ]
            os.environ.update((n, v) for n, v in WORKER_GLIBC_ENV if n in added)
            try:
                process.start()
            finally:
                if before is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = before
                for n in added:
                    os.environ.pop(n, None)
            child.close()
            self._process, self._conn = process, parent
        return self._conn

    def run(
        self,
        table: pa.Table,
        *,
        settings: Any = None,
        since_ns: int | None = None,
        stages: dict[str, float] | None = None,
        explain: bool = False,
        results: str | None = None,
    ) -> tuple[dict[str, Any], TraceIndex]:
        """The report (with ``near_misses`` when ``explain``) and trace index (read from a file in
        the folder ``results``, when given: :func:`_store_index`); ``stages`` (when given) gets the seconds spent starting the
        process (``worker_start``), shipping the table (``send``), analysing in the worker
        (``analysis``) and waiting for and receiving the result beyond that (``receive``)."""
        stages = {} if stages is None else stages
        started = time.perf_counter()
        shipped, written = _ship_table(table)  # a failure here is ours, not the worker's
        shipping = time.perf_counter() - started
        try:
            with self._session(stages) as conn:
                started = time.perf_counter()
                conn.send((shipped, settings, since_ns, explain, results))
                stages["send"] = shipping + time.perf_counter() - started
                started = time.perf_counter()
                status, payload = _receive_result(conn.recv())
                waited = time.perf_counter() - started
        finally:
            if written is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(written)
        if status != "ok":
            raise _failed(payload)
        report, index, analysis_s = payload
        index.open_stored()
        stages["analysis"] = analysis_s
        stages["receive"] = max(waited - analysis_s, 0.0)
        return report, index

    def run_incremental(
        self,
        request: dict[str, Any],
        reader: StoreReader,
        *,
        settings: Any = None,
        stages: dict[str, float] | None = None,
        reads: dict[str, float] | None = None,
    ) -> tuple[dict[str, Any], TraceIndex, dict[str, Any]]:
        """One incremental round in the worker (:func:`run_incremental`), answering its span
        reads from ``reader`` (the store, read in this process) until it sends the result.
        ``reads`` (when given) gets the seconds of those reads by request kind (``arrivals``,
        ``batch``, ``traces``: reading the store and shipping the table) and their count
        (``batch_count``...); their sum is ``stages["scan"]``."""
        report, index, figures, _ = self._asked(("incremental", request, settings), reader, stages, reads)
        index.open_stored()  # (its arrays in a file of request["results"]: _store_index)
        return report, index, figures

    def run_partitioned(
        self,
        request: dict[str, Any],
        reader: StoreReader,
        *,
        settings: Any = None,
        stages: dict[str, float] | None = None,
        reads: dict[str, float] | None = None,
    ) -> tuple[dict[str, Any], TraceIndex]:
        """The report of a store too large for the worker to hold at once, analysed there in
        ``request["parts"]`` partitions of whole traces one after another
        (:func:`analyze_partitions`); each partition and each exemplar trace is read here from
        ``reader`` when the worker asks for it, so neither process holds the whole store.
        ``request``: parts, since_ns, spill_buckets, explain, results (as :meth:`run`'s). ``reads``
        as :meth:`run_incremental`'s (``partition``, ``traces``)."""
        report, index, _ = self._asked(("partitioned", request, settings), reader, stages, reads)
        index.open_stored()
        return report, index

    def findings(
        self, request: dict[str, Any], reader: StoreReader, *, settings: Any = None
    ) -> dict[str, Finding]:
        """The findings of a window decided in the worker (:func:`window_findings`; ``request``:
        ids, since_ns, and incremental (True) with sidecar and cluster as :meth:`run_incremental`'s,
        or parts and spill_buckets as :meth:`run_partitioned`'s), its span reads answered from
        ``reader``; after the round the worker runs, if any."""
        found, _ = self._asked(("findings", request, settings), reader, None, None)
        return dict(found)

    def _asked(
        self,
        message: tuple[Any, ...],
        reader: StoreReader,
        stages: dict[str, float] | None,
        reads: dict[str, float] | None,
    ) -> Any:
        """The worker's result of ``message``, its span reads answered from ``reader``
        (:func:`_converse`); their seconds in ``stages["scan"]`` (and by kind in ``reads``), the
        rest of the wait in ``stages["analysis"]``. A failure in the worker raises."""
        stages = {} if stages is None else stages
        reads = {} if reads is None else reads
        with self._session(stages) as conn:
            started = time.perf_counter()
            status, payload, reading = _converse(conn, message, reader, reads)
        if status != "ok":
            raise _failed(payload)
        stages["scan"] = reading  # the worker's reads of the store, answered here
        stages["analysis"] = max(time.perf_counter() - started - reading, 0.0)
        return payload

    @contextlib.contextmanager
    def _session(self, stages: dict[str, float]) -> Iterator[Connection]:
        """One conversation with the worker: the lock held, the process started if needed (its
        seconds in ``stages["worker_start"]``), and a worker that dies mid-way killed and reported
        as one RuntimeError with its exit code."""
        with self._lock:
            started = time.perf_counter()
            conn = self._ensure()
            stages["worker_start"] = time.perf_counter() - started
            try:
                yield conn
            except (EOFError, OSError) as exc:
                code = self._process.exitcode if self._process is not None else None
                self._kill()
                raise RuntimeError(f"the analysis worker process died (exit code {code}): {exc!r}") from exc

    def _kill(self, *, signalled: bool = False) -> None:
        """The worker stopped: SIGTERM (unless ``signalled`` already: a second one ends its
        closing of the state), 5 s to go, then SIGKILL."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if self._process.is_alive():
                if not signalled:
                    self._process.terminate()
                self._process.join(5)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)
            self._process = None

    def close(self) -> None:
        """Stop the worker, also in the middle of a run (that run then fails)."""
        process = self._process
        signalled = process is not None and process.is_alive()
        if process is not None and signalled:
            process.terminate()  # unblocks a run waiting in recv(); it then cleans up
        with self._lock:
            self._kill(signalled=signalled)


def _converse(
    conn: Connection, message: tuple[Any, ...], reader: StoreReader, reads: dict[str, float]
) -> tuple[str, Any, float]:
    """Send ``message`` to the worker and answer its span reads from ``reader`` (the store, read
    in this process) until it sends its result: (status, payload, seconds spent reading).
    ``reads`` gets those seconds by request kind and their count (``batch``, ``batch_count``...)."""
    reading = 0.0
    shipped_files: list[str] = []  # the worker unlinks each when it maps it; these if it died first
    try:
        conn.send(message)
        while True:
            answer = _receive_result(conn.recv())
            if answer[0] != "ask":
                status, payload = answer
                return status, payload, reading
            read_started = time.perf_counter()
            # one memory-heavy query of the store at a time (a count of its spans, a
            # compaction wait for this read and its release, and it for them)
            with reader.serialized():
                try:
                    # streamed from the store into the file the worker maps: neither DuckDB
                    # nor this process holds the whole read (a failed one leaves no file)
                    shipped, written = _answer_shipped(reader, answer[1])
                except Exception as exc:
                    log.exception("reading spans for the analysis worker failed")
                    conn.send(("error", f"{type(exc).__name__}: {exc}"))
                    continue
                if written is not None:
                    shipped_files.append(written)
                conn.send(("table", shipped))
                del shipped  # a table sent through the pipe is not kept until the next read
                reader.release()
            took = time.perf_counter() - read_started
            reading += took
            kind = str(answer[1][0])
            reads[kind] = reads.get(kind, 0.0) + took
            reads[f"{kind}_count"] = reads.get(f"{kind}_count", 0) + 1
    finally:
        for path in shipped_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def analyze_spans(
    table: pa.Table,
    *,
    writer: Any = None,
    services: list[str] | None = None,
    since_ns: int | None = None,
    explain: bool = False,
) -> tuple[dict[str, Any], TraceIndex]:
    """``hourglass.analysis.pipeline.analyze``, plus which recommendations touch each affected trace
    (``explain``: the report carries ``near_misses``).

    The report lists only a few exemplar traces per recommendation; the API's trace view needs
    every affected trace, so the run's findings are indexed with it
    (:meth:`hourglass.analysis.trace_index.TraceIndex.build`).
    """
    from hourglass.analysis.context import AnalysisContext, to_analysis_frame
    from hourglass.analysis.pipeline import analyze_context, select_traces
    from hourglass.analysis.resources import service_resources

    resources = service_resources(table)
    frame = select_traces(to_analysis_frame(table), services=services, since_ns=since_ns)
    report, ranked = analyze_context(
        AnalysisContext.from_table(frame), writer=writer, explain=explain, resources=resources
    )
    return report, trace_index(report, ranked)


def trace_index(report: dict[str, Any], ranked: list[Any]) -> TraceIndex:
    """Which reported recommendations touch each affected trace
    (:meth:`hourglass.analysis.trace_index.TraceIndex.build` over the run's findings)."""
    return TraceIndex.build(report, [scored.finding for scored in ranked])


def _built_index(
    report: dict[str, Any],
    findings: list[Any],
    folder: str | None,
    release: Callable[[], None] | None = None,
) -> TraceIndex:
    """:meth:`TraceIndex.build` into a file of ``folder`` (a chunk at a time: its arrays never all
    held), or in memory without one or when the file cannot be written (:func:`_store_index`
    then tries again, else the arrays go with the result). ``release``: the freed heap returned
    after each range of trace ids while it is built into the file (:meth:`TraceIndex.build`)."""
    if folder is not None and hasattr(os, "pread"):  # (pread: not on Windows)
        try:
            return TraceIndex.build(report, findings, folder=folder, prefix=RESULT_PREFIX, release=release)
        except OSError as exc:
            log.warning("could not write the trace index to %s (%s): built in memory", folder, exc)
    return TraceIndex.build(report, findings)


# ----------------------------------------------------------------------------------------------
# Incremental analysis (hourglass.analysis.incremental): the worker asks the server for spans


class StoreReader:
    """The span reads an incremental round needs, straight from a store (in-process runs; in the
    worker process :class:`PipeReader` forwards the same calls to the server)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def arrivals(self, ingested_since_ns: int) -> pa.Table:
        return self.store.trace_arrivals(ingested_since_ns)

    @property
    def can_read_recent(self) -> bool:
        """Whether the store groups its recent rows alone (``recent_arrivals``)."""
        return callable(getattr(self.store, "recent_arrivals", None))

    def recent(self, ingested_since_ns: int, splits: list[int], until_ns: int | None = None) -> pa.Table:
        if until_ns is None:
            return self.store.recent_arrivals(ingested_since_ns, splits)
        return self.store.recent_arrivals(ingested_since_ns, splits, until_ns)

    def bounds(self, rows: int) -> list[int]:
        """Ingest-time bounds splitting the store's rows into ranges of about ``rows`` (none:
        the store cannot tell; its rows are then read as one range)."""
        arrival_bounds = getattr(self.store, "arrival_bounds", None)
        return list(arrival_bounds(rows)) if callable(arrival_bounds) else []

    def between(self, trace_ids: list[str], from_ns: int, to_ns: int) -> pa.Table:
        return self.store.arrivals_between(trace_ids, from_ns, to_ns)

    def batch(self, trace_ids: list[str], first: int | None, last: int | None) -> pa.Table:
        from hourglass.collector.schema import ANALYSIS_COLUMNS

        return self.store.scan_traces(
            trace_ids, ingested_from_ns=first, ingested_to_ns=last, columns=ANALYSIS_COLUMNS
        )

    def traces(self, trace_ids: list[str], ranges: list[tuple[int, int]] | None = None) -> pa.Table:
        """Whole traces by id, every column; ``ranges``: their spans' ingest-time ranges when
        known (``IncrementalAnalysis.ingested_ranges``), so the store reads only those row groups
        instead of every stored trace id (a 4.8M-span store: 0.03-0.06 s instead of 0.6-1.3 s)."""
        from hourglass.collector.schema import SPAN_COLUMNS

        if not trace_ids:
            return self.store.scan(trace_ids=[""], columns=SPAN_COLUMNS)
        scan_traces = getattr(self.store, "scan_traces", None)
        if ranges and callable(scan_traces):
            table: pa.Table = scan_traces(trace_ids, ingested_ranges=ranges, columns=SPAN_COLUMNS)
            return table
        return self.store.scan(trace_ids=trace_ids, columns=SPAN_COLUMNS)

    def partition(self, part: int, parts: int, since_ns: int | None, trace_ids: list[str] | None) -> pa.Table:
        """Partition ``part`` of ``parts`` of the store's traces (``scan_partition``: whole traces
        by a hash of their id), those begun since ``since_ns``; with ``trace_ids``, only those."""
        from hourglass.collector.schema import ANALYSIS_COLUMNS

        table: pa.Table = self.store.scan_partition(
            part, parts, since_ns=since_ns, trace_ids=trace_ids, columns=ANALYSIS_COLUMNS
        )
        return table

    def answer(self, request: tuple[Any, ...]) -> pa.Table:
        """One request of the worker: ("arrivals", ns) | ("batch", ids, first, last) |
        ("traces", ids[, ranges]) | ("partition", part, parts, since_ns, ids)."""
        kind, *args = request
        if kind == "partition":
            return self.partition(*args)
        if kind == "arrivals":
            return self.arrivals(*args)
        if kind == "recent":
            return self.recent(*args)
        if kind == "bounds":
            return pa.table({"bound": pa.array(self.bounds(*args), pa.int64())})
        if kind == "between":
            return self.between(*args)
        if kind == "batch":
            return self.batch(*args)
        if kind == "traces":
            return self.traces(*args)
        raise ValueError(f"unknown request from the analysis worker: {kind!r}")

    def stream(self, request: tuple[Any, ...]) -> contextlib.AbstractContextManager[pa.RecordBatchReader]:
        """:meth:`answer` as record batches, for the ``with`` block: the store's streamed read
        where it has one (a DuckDB store: ``stream_traces``, ``stream_recent_arrivals``...: the
        rows come out of the query a batch at a time, one snapshot), else the answer read whole."""
        kind, *args = request
        store = self.store
        if kind == "batch" and callable(getattr(store, "stream_traces", None)):
            from hourglass.collector.schema import ANALYSIS_COLUMNS

            trace_ids, first, last = args
            return store.stream_traces(
                trace_ids, ingested_from_ns=first, ingested_to_ns=last, columns=ANALYSIS_COLUMNS
            )
        if (
            kind == "traces"
            and len(args) > 1
            and args[0]
            and args[1]
            and callable(getattr(store, "stream_traces", None))
        ):
            from hourglass.collector.schema import SPAN_COLUMNS

            # (whole traces within their ingest ranges: without ranges, ``traces`` reads them whole)
            return store.stream_traces(args[0], ingested_ranges=args[1], columns=SPAN_COLUMNS)
        streams = {
            "recent": "stream_recent_arrivals",
            "arrivals": "stream_trace_arrivals",
            "between": "stream_arrivals_between",
        }
        if kind in streams and callable(method := getattr(store, streams[kind], None)):
            return method(*args)
        return contextlib.nullcontext(self.answer(request).to_reader())

    def serialized(self) -> contextlib.AbstractContextManager[None]:
        """For the ``with`` block, the reads are the store's one memory-heavy query at a time
        (``DuckDBSpanStore.serialized``: its span count, compaction and retention wait for them,
        and they for those) when the store has such a rule; else nothing."""
        method = getattr(getattr(self, "store", None), "serialized", None)
        return method() if callable(method) else contextlib.nullcontext()

    def release(self) -> None:
        """Drop what the reads left cached in the store (``release_cache``: DuckDB keeps the
        blocks a query read until its memory limit): between a round's reads, so the cache does
        not build up over the round (the blocks are re-read from the file, still compressed, when
        asked for again)."""
        release_cache = getattr(self.store, "release_cache", None)
        if callable(release_cache):
            try:
                release_cache()
            except Exception:  # memory not returned is no reason to fail the round
                log.exception("releasing the store's cache failed")
        # and the pages the read's result and the evicted blocks leave in DuckDB's own allocator,
        # which keeps them resident for reuse until its decay (a server's RSS swung by ~100 MiB
        # with them between a round's reads)
        server_memory.purge_duckdb()


class PipeReader(StoreReader):
    """:class:`StoreReader` calls sent to the server process through the worker's pipe."""

    def __init__(self, conn: Connection) -> None:
        super().__init__(None)
        self.conn = conn

    def _ask(self, *request: Any) -> pa.Table:
        self.conn.send(("ask", request))
        status, payload = self.conn.recv()
        if status != "table":
            raise RuntimeError(f"the server could not read spans for the analysis: {payload}")
        return _receive_table(payload)

    def arrivals(self, ingested_since_ns: int) -> pa.Table:
        return self._ask("arrivals", ingested_since_ns)

    @property
    def can_read_recent(self) -> bool:
        return True  # the server's store: serve's incremental rounds run on DuckDB stores only

    def recent(self, ingested_since_ns: int, splits: list[int], until_ns: int | None = None) -> pa.Table:
        return self._ask("recent", ingested_since_ns, splits, until_ns)

    def bounds(self, rows: int) -> list[int]:
        return [int(b) for b in self._ask("bounds", rows).column("bound").to_pylist()]

    def between(self, trace_ids: list[str], from_ns: int, to_ns: int) -> pa.Table:
        return self._ask("between", trace_ids, from_ns, to_ns)

    def batch(self, trace_ids: list[str], first: int | None, last: int | None) -> pa.Table:
        return self._ask("batch", trace_ids, first, last)

    def traces(self, trace_ids: list[str], ranges: list[tuple[int, int]] | None = None) -> pa.Table:
        return self._ask("traces", trace_ids, ranges)

    def partition(self, part: int, parts: int, since_ns: int | None, trace_ids: list[str] | None) -> pa.Table:
        return self._ask("partition", part, parts, since_ns, trace_ids)


class ReaderSource:
    """A ``partitions.Source`` (by shape: ``load``) whose partitions are read through a
    :class:`StoreReader`: in serve's analysis worker, asked of the server, which holds the store
    (an embedded ClickHouse or an in-memory DuckDB is open in one process only)."""

    def __init__(self, reader: StoreReader, since_ns: int | None) -> None:
        self.reader = reader
        self.since_ns = since_ns

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        return self.reader.partition(part, parts, self.since_ns, trace_ids)


def analyze_partitions(
    reader: StoreReader,
    parts: int,
    *,
    since_ns: int | None = None,
    spill_buckets: int = 0,
    writer: Any = None,
    explain: bool = False,
    index_folder: str | None = None,
    release_heap: Callable[[], None] | None = None,
) -> tuple[dict[str, Any], TraceIndex]:
    """The report and trace index of the store behind ``reader`` in ``parts`` partitions of whole
    traces, one after another in this process (``hourglass.analysis.pipeline.analyze_partitioned``):
    serve's analysis of a store it does not analyse incrementally (ClickHouse;
    ``HOURGLASS_INCREMENTAL_ANALYSIS=false``) once the store holds more spans than one context
    fits in the memory budget. The same report as :func:`analyze_spans` on the same spans."""
    from hourglass.analysis import memlog, partitions
    from hourglass.analysis.pipeline import analyze_partitioned

    executor = partitions.SerialExecutor()
    try:
        report, ranked = analyze_partitioned(
            ReaderSource(reader, since_ns),  # type: ignore[arg-type]
            parts,
            executor,
            read_traces=lambda trace_ids: reader.traces(trace_ids),
            writer=writer,
            explain=explain,
            spill_buckets=spill_buckets,
            split_files=False,
            release_heap=release_heap,
        )
    finally:
        executor.close()
    memlog.note("report built")
    findings = TraceIndex.indexed(report, [scored.finding for scored in ranked])
    del ranked
    index = _built_index(report, findings, index_folder, release_heap)
    memlog.note(f"trace index built ({index.traces()} traces)")
    return report, index


def window_findings(
    reader: StoreReader,
    request: dict[str, Any],
    *,
    state: IncrementalAnalysis | None = None,
    cluster: Cluster | None = None,
) -> dict[str, Finding]:
    """The findings ``request["ids"]`` of the window ``request["since_ns"]`` (None: the whole
    store), decided over every trace of the window as the report of that window decides them,
    without the pricing, the texts or a cut to ``HOURGLASS_REPORT_MAX_SPANS``: what a
    recommendation what-if applies over a window too large for one context (``hourglass.api.queries``;
    serve keeps its reports, not their findings). With ``state`` (an incremental serve), decided
    over its stored rows, as a round's report is (the traces no round has extracted yet are not
    in them), leaving the rounds' state as it was; else read and extracted in
    ``request["parts"]`` partitions of whole traces, one after another (``request["spill_buckets"]``
    as :func:`analyze_partitions`'). An id the window's findings do not have is not in the result."""
    from hourglass.analysis import partitions
    from hourglass.analysis.model import NearMissLog, kind_of

    wanted = set(request["ids"])
    since_ns = request.get("since_ns")
    notes = NearMissLog()
    if state is not None:
        from hourglass.analysis.incremental import BatchSource, MemoExecutor

        window, whole = state.window, state.whole_window  # the rounds' (units() sets both)
        try:
            units = state.units(since_ns)
            # the rounds' own window (the whole retention, and their report not cut): the
            # lock-convoy sweep resumes from their states as their next round would (the same
            # batches: nothing is read or extracted here); any other keeps none for them
            state.whole_window = since_ns is None and whole and window is None
            if not units:
                return {}
            memo = MemoExecutor(state, units, cluster)
            try:
                # only the detectors of the ids decide
                kinds = {kind_of(i) for i in wanted}
                extracted = state.extraction(units, BatchSource(units, reader.batch), memo, notes, kinds)
            finally:
                memo.close()
        finally:
            state.window, state.whole_window = window, whole
            state.release_memory()
    else:
        from hourglass.analysis.spill import Spill

        buckets = int(request.get("spill_buckets") or 0)
        spill = Spill.create(buckets) if buckets > 0 else None
        executor = partitions.SerialExecutor()
        try:
            extracted = partitions.run_extraction(
                ReaderSource(reader, since_ns),  # type: ignore[arg-type]
                max(int(request.get("parts") or 1), 1),
                executor,
                notes,
                None,
                spill,
            )
        finally:
            executor.close()
            if spill is not None:
                spill.remove()
    return {f.id: f for f in extracted.findings if f.id in wanted}


def run_incremental(
    state: IncrementalAnalysis,
    reader: StoreReader,
    request: dict[str, Any],
    *,
    writer: Any = None,
    cluster: Cluster | None = None,
    index_folder: str | None = None,
) -> tuple[dict[str, Any], TraceIndex, dict[str, Any]]:
    """One incremental round (``request["update"]``: bring the batches up to date first) and the
    report over the batches of the window (``request["since_ns"]``); with the round's figures.
    With ``cluster`` the batches read this round are extracted and priced on the Dask cluster
    (:mod:`hourglass.analysis.batch_tasks`). With ``index_folder`` the trace index is built into
    a file there (:meth:`TraceIndex.build`; :func:`_store_index` of the worker's result)."""
    from hourglass.analysis import memlog
    from hourglass.analysis.incremental import BatchSource, MemoExecutor
    from hourglass.analysis.pipeline import analyze_partitioned

    figures = state.last
    if request.get("update", True):
        figures = state.update(
            reader.arrivals,
            recent=(reader.recent, reader.between, reader.bounds) if reader.can_read_recent else None,
            cutoff_ns=int(request["cutoff_ns"]),
            margin_ns=int(request["margin_ns"]),
            retention_cutoff_ns=request.get("retention_cutoff_ns"),
            # the rounds' report (of the whole retention) holds the newest ``max_spans``
            window_spans=request.get("max_spans") if request.get("since_ns") is None else None,
        )
        state.last = figures
        # the sidecar's table blocks the update read (its traces table: ~40 MiB at 12M stored
        # spans) let go before the decision, not held under every phase of the round after it
        state.release_memory()
    units = state.units(request.get("since_ns"), max_spans=request.get("max_spans"))
    started = time.perf_counter()
    if not units:
        empty = reader.traces([])
        report, index = analyze_spans(empty, writer=writer, explain=bool(request.get("explain")))
    else:
        executor = MemoExecutor(state, units, cluster)
        source = BatchSource(units, reader.batch)
        report, ranked = analyze_partitioned(
            # a partitions.Source and Executor by shape (load; map/close/workers)
            source,  # type: ignore[arg-type]
            len(units),
            executor,  # type: ignore[arg-type]
            # the exemplars' and designs' traces: stored ones, read within their ingest times
            read_traces=lambda trace_ids: reader.traces(trace_ids, state.ingested_ranges(trace_ids)),
            writer=writer,
            explain=bool(request.get("explain")),
            # the stored rows decided kind by kind (the rows of every batch are never held at once)
            extraction=lambda notes: state.extraction(units, source, executor, notes),
            release_heap=state.release_heap,
        )
        executor.close()
        state.release_heap()  # (the pricing's and the scoring's freed pages, before the index's)
        memlog.note("report built")
        # the index reads the reported findings' occurrences alone: the ranking's scores, savings
        # and costs, and the findings the report does not carry, let go before it is built
        findings = TraceIndex.indexed(report, [scored.finding for scored in ranked])
        del ranked
        index = _built_index(report, findings, index_folder, state.release_heap)
        del findings
        memlog.note(f"trace index built ({index.traces()} traces)")
        figures.units_read = executor.read_units
    state.release_memory()  # (the sidecar's table blocks this round read: not held until the next)
    figures.seconds["report"] = time.perf_counter() - started
    window = state.window.as_dict() if state.window is not None else None
    if window is not None:  # (cut to its newest batches: the report says what it left out)
        report["window"] = {**window, "from": iso_ns(window["from_ns"])}
    return report, index, {**figures.as_dict(), "cutoff_ns": request.get("cutoff_ns"), "window": window}
