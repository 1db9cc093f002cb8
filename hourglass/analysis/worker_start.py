"""A partition worker process' start-up (``hourglass.analysis.partitions.ProcessExecutor``).

This module imports nothing of the analysis at its top, so a spawned worker, which imports it to find
:func:`start`, runs :func:`start` before polars is imported: polars sizes its thread pool once,
when it is first imported. Workers that share the machine's cores (two workers on two cores) each
get one polars thread, as their DuckDB reads already do: each polars operation then runs on its
own worker's core, without the two pools' threads taking turns on both (measured at 1M spans in 6
partitions on 2 workers: ~8 % less CPU, a quarter less system time).

A worker whose parent is gone — killed with SIGKILL, which leaves it no time to stop its workers —
ends too (:class:`WatchedProcess`): on Linux the kernel signals it when the parent dies
(``PR_SET_PDEATHSIG``), and everywhere a thread of its own checks every ``PARENT_CHECK_S`` that
its parent is still the process that started it. Before, such a worker waited on its pool's queue
for ever (with the pool's resource tracker, which waits for the workers).

Once its pool stops it, a worker ends at once (:func:`_exit_at_once`), without the interpreter's
teardown of everything the analysis imported and allocated: that teardown was 0.5-0.7 s of the
deciding process' wait for its workers at the end of a run (1M spans, two workers; 0.07 s without).
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing.context
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import Future

POLARS_THREADS = "POLARS_MAX_THREADS"
# polars' allocator (its own jemalloc) reads its options from this variable once, at its first
# allocation, so a worker sets it in :func:`start`, before polars is imported; polars' import
# puts its own options first (``POLARS_DEFAULT_ALLOCATOR``) and those found in the variable after
# them, which win. A process that imported polars has it set to at least polars' own, and a
# worker it spawns inherits that.
ALLOCATOR_CONF = "_RJEM_MALLOC_CONF"
POLARS_DEFAULT_ALLOCATOR = "dirty_decay_ms:500,muzzy_decay_ms:1000"
# what polars' import writes with ``POLARS_THP=1`` (transparent huge pages): its own options too
POLARS_OWN_ALLOCATORS = (
    POLARS_DEFAULT_ALLOCATOR,
    POLARS_DEFAULT_ALLOCATOR + ",thp:always,metadata_thp:always",
)
# The allocator options of a short-lived worker (``hourglass analyze``'s, which ends with its run):
# pages freed are kept for reuse for 2 s instead of polars' 0.5 s (dirty) and 1 s (muzzy). A
# partition's extraction frees and allocates hundreds of MiB again and again; returned to the
# system each time, they are faulted in (and zeroed) again at the next allocation. Measured at 1M
# spans in 6 partitions on 2 workers, 5 runs each on a busy machine (medians): system time 1.66 s
# against 2.02 (10 s: 1.84, no better), user time the same; the largest worker's peak 540 MiB
# against 510 (10 s: 577; the plan counts 518 a worker: 200 + 167k spans * 2,000 bytes), every
# process' at once 1265 MiB against 1189 (10 s: 1276), within the 1360 the plan counts for the
# workers' peaks beside the decision (``Plan.keep``). Not for long-lived processes (``serve``'s),
# which would hold those pages between rounds.
SHORT_LIVED_ALLOCATOR = "dirty_decay_ms:2000,muzzy_decay_ms:2000"


def polars_threads(workers: int) -> int:
    """Polars threads for each of ``workers`` processes sharing this machine's cores (at least 1)."""
    from hourglass.settings import usable_cores

    return max(1, usable_cores() // max(1, workers))


def start(threads: int = 0, allocator: str = "") -> None:
    """Sets the worker's polars threads (``threads`` > 0, unless the user set
    ``POLARS_MAX_THREADS``) and its allocator's options (``allocator``, e.g.
    ``SHORT_LIVED_ALLOCATOR``, unless the user set ``_RJEM_MALLOC_CONF``: a value other than
    polars' own, which the parent's polars import sets), then imports the modules its tasks use,
    before the first task."""
    if threads > 0 and POLARS_THREADS not in os.environ:
        os.environ[POLARS_THREADS] = str(threads)
    # (polars' own options, the parent's import wrote them: the worker's import writes them again,
    # with the huge pages' under POLARS_THP=1, before these)
    if allocator and os.environ.get(ALLOCATOR_CONF, POLARS_DEFAULT_ALLOCATOR) in POLARS_OWN_ALLOCATORS:
        os.environ[ALLOCATOR_CONF] = allocator
    import atexit

    if not os.environ.get("COVERAGE_PROCESS_START"):  # a coverage run's exit hook must run
        atexit.register(_exit_at_once)
    import hourglass.analysis.detectors  # the extraction's
    import hourglass.analysis.endpoint_path
    import hourglass.analysis.sequence  # the pricing's
    import hourglass.analysis.spill
    import hourglass.collector.duckdb_store  # noqa: F401  (the reads)

    # what the imports made is never garbage: out of the collector's sight, so that its full
    # collections during the tasks do not walk it each time
    gc.freeze()


PARENT_CHECK_S = 1.0  # how often a worker checks that its parent is alive (where no signal tells it)
ORPHAN_GRACE_S = 10.0  # a worker signalled by its parent watch still running after this is ended
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
KILL = getattr(signal, "SIGKILL", signal.SIGTERM)  # (no SIGKILL on Windows)


def watch_parent(parent: int, signum: int, *, pdeathsig: bool) -> None:
    """Ends this process with ``signum`` once its parent, the process ``parent`` that started it,
    is gone (killed with SIGKILL, it could not stop its workers). With ``pdeathsig`` (the process
    was started by its parent's main thread: the kernel's parent death signal follows the thread
    that started a process, not the process) on Linux, the kernel sends ``signum`` as the parent
    dies; then, as the parent may have died before that was set, its pid is checked; and a
    daemon thread checks it every ``PARENT_CHECK_S`` (the only watch elsewhere) and, once the
    parent is gone, sends ``signum`` unless the kernel did or the process is already ending on
    its own (:func:`closing`), and ends it should it still run ``ORPHAN_GRACE_S`` later. One
    signal only: a handler that closes state on the first (serve's worker) is not cut short by a
    second."""
    kernel = False
    if pdeathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # (no libc prctl: the thread's check alone)
            import ctypes

            kernel = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    if os.getppid() != parent:  # gone already, before the signal was set
        _orphaned(signum, signal_it=True)
    threading.Thread(
        target=_check_parent, args=(parent, signum, not kernel), name="hourglass-parent-watch", daemon=True
    ).start()


_closing = threading.Event()


def closing() -> None:
    """This process is ending on its own (e.g. closing its state after its parent's pipe
    closed): the parent watch sends it no signal, it only ends it after ``ORPHAN_GRACE_S``."""
    _closing.set()


def _check_parent(parent: int, signum: int, signal_it: bool) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    _orphaned(signum, signal_it=signal_it)


def _orphaned(signum: int, *, signal_it: bool) -> None:
    if signal_it and not _closing.is_set():
        os.kill(os.getpid(), signum)  # (a handler of its own runs: serve's worker closes its state)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(128 + signum)


class WatchedProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that ends with ``signum`` when the process that started it is gone
    (:func:`watch_parent`, set up before its target runs: the pool's worker loop, or serve's
    analysis worker)."""

    def __init__(self, *args: Any, signum: int = KILL, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parent_watch = (os.getpid(), int(signum), threading.current_thread() is threading.main_thread())

    def run(self) -> None:
        parent, signum, pdeathsig = self._parent_watch
        watch_parent(parent, signum, pdeathsig=pdeathsig)
        super().run()


class OwnProcesses(multiprocessing.context.SpawnContext):
    """The spawn context, keeping every process it starts: a pool's workers, which the pool
    itself keeps in a private table only. ``ProcessPoolExecutor`` starts each worker with its
    ``mp_context``'s ``Process``, as any user of a multiprocessing context does."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[multiprocessing.process.BaseProcess] = []

    def Process(self, *args: Any, **kwargs: Any) -> multiprocessing.process.BaseProcess:  # type: ignore[override]
        # (a worker's task holds nothing that must be written or released first: SIGKILL)
        process = WatchedProcess(*args, signum=KILL, **kwargs)
        self.started.append(process)
        return process


class WorkerPool(ProcessPoolExecutor):
    """The process pool of partition workers (spawned, so no thread state of this process is
    inherited; each runs :func:`start` first), which knows its worker processes
    (``processes.started``: an interrupted run terminates them rather than wait for their tasks).
    ``allocator``: the workers' allocator options (:func:`start`; "": polars' own)."""

    def __init__(self, workers: int, allocator: str = "") -> None:
        self.processes = OwnProcesses()
        super().__init__(
            max_workers=workers,
            mp_context=self.processes,
            # before polars is imported: one polars thread a worker when they share the cores
            initializer=start,
            initargs=(polars_threads(workers), allocator),
        )


def pool(workers: int, allocator: str = "") -> WorkerPool:
    """The process pool of ``workers`` partition workers (:class:`WorkerPool`)."""
    return WorkerPool(workers, allocator)


TERMINATE_GRACE_S = 2.0  # terminated workers still alive after this (all together) are killed


def terminate(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """SIGTERM to each of ``processes`` still running (a worker's task holds nothing that must be
    written or released first: what it writes is written whole, then renamed)."""
    for process in processes:
        if process.exitcode is None:
            with contextlib.suppress(OSError, ValueError):  # (gone meanwhile; closed)
                process.terminate()


def reap(processes: list[multiprocessing.process.BaseProcess]) -> None:
    """Waits for ``processes`` (terminated) to exit, emptying the list: those still alive after
    one shared grace (started to ignore SIGTERM, as ``nohup`` does) are killed."""
    import time

    deadline = time.monotonic() + TERMINATE_GRACE_S
    while processes:
        process = processes[-1]
        with contextlib.suppress(ValueError):  # (closed)
            if not _exited(process, max(deadline - time.monotonic(), 0.0)):
                process.kill()
                _exited(process, None)
        processes.pop()


REAPED_ELSEWHERE_S = 1.0  # how long an exited worker's status may take to be stored by another thread


def _exited(process: multiprocessing.process.BaseProcess, timeout: float | None) -> bool:
    """Whether ``process`` exits within ``timeout`` seconds (None: however long it takes), its exit
    code stored when it does. A pool's own thread may wait for the same worker (a pool shut down
    joins its processes): its ``waitpid`` takes the status and ours fails with ECHILD, so
    ``join`` returns and ``exitcode`` stays None until that thread stores it. The worker's sentinel
    (a pipe the kernel closes when it exits) says it has exited whoever reaps it."""
    from multiprocessing.connection import wait

    if not wait([process.sentinel], timeout):
        return False
    until = time.monotonic() + REAPED_ELSEWHERE_S
    while process.exitcode is None and time.monotonic() < until:
        time.sleep(0.005)
    return True


def ended_with(process: multiprocessing.process.BaseProcess) -> int | None:
    """``process``' exit code if it has exited, else None (at once: a process still running is not
    waited for). Its code is waited for when another thread reaped it (:func:`_exited`)."""
    with contextlib.suppress(ValueError):  # (closed)
        if _exited(process, 0.0):
            return process.exitcode
    return None


def stop(started: WorkerPool) -> None:
    """Stops a pool no run took, at once: its workers terminated (they may still be importing),
    not waited for until they would have started."""
    started.shutdown(wait=False, cancel_futures=True)
    processes = [p for p in started.processes.started if p.pid is not None]
    terminate(processes)
    reap(processes)


def ready() -> None:
    """A task that makes a worker process start: the pool starts a process for each task
    submitted while none is idle, and the process runs :func:`start` before it."""


def started(workers: int, allocator: str = "") -> tuple[WorkerPool, list[Future[None]]]:
    """A :func:`pool` whose ``workers`` processes are starting now (their interpreters and the
    analysis' imports, ~0.45 s of CPU each), and the tasks that started them (:func:`ready`)."""
    workers = max(1, workers)
    starting = pool(workers, allocator)
    return starting, [starting.submit(ready) for _ in range(workers)]


def _exit_at_once() -> None:
    """A worker's exit, once its pool has stopped it: the process ends here, its output flushed.
    Everything a task wrote is complete when the task returns (its result is sent before the next
    task is taken; files are written whole, then renamed); the threads are joined and the pool's
    finalizers have run before the interpreter gets to its ``atexit`` handlers, so what is
    skipped is the teardown of modules and objects, which nothing reads."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or its reader gone
            stream.flush()
    os._exit(0)
