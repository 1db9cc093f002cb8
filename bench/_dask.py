"""A real Dask scheduler and worker processes on 127.0.0.1, for the benchmarks and the tests of
``--cluster`` (``tests/dask_cluster.py`` adds the worker-death preload)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")
# a worker preload: the worker acts as on another machine, not seeing the client's temporary files
ELSEWHERE = Path(__file__).with_name("dask_elsewhere.py")


def _address(scheduler_file: Path) -> str | None:
    """The address in the scheduler's file, once it is there and whole (the scheduler creates the
    file, then writes it: read in between, it was empty)."""
    try:
        return str(json.loads(scheduler_file.read_text())["address"])
    except (OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def dask_cluster(
    folder: Path,
    *,
    workers: int = 2,
    preloads: Sequence[Path] = (),
    env: dict[str, str] | None = None,
    scheduler_env: dict[str, str] | None = None,
    port: int = 0,
    pids: list[int] | None = None,
) -> Iterator[str]:
    """A scheduler and ``workers`` worker processes (one thread each, ``preloads`` preloaded),
    stopped on exit; yields the scheduler's address. ``env``: variables for every process;
    ``scheduler_env``: for the scheduler only (its Dask config); ``port``: the scheduler's (0: any
    free one); ``pids``: filled with the worker commands' process ids."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    common = {"cwd": ROOT, "env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [
        subprocess.Popen(
            [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            **{**common, "env": {**env, **(scheduler_env or {})}},  # type: ignore[call-overload]
        )
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while (address := _address(scheduler_file)) is None and time.monotonic() < deadline:
            assert procs[0].poll() is None, f"the Dask scheduler exited with {procs[0].returncode}"
            time.sleep(0.2)
        assert address is not None, f"the Dask scheduler wrote no address to {scheduler_file} in 60 s"
        assert address.startswith("tcp://127.0.0.1:")
        preload = [arg for p in preloads for arg in ("--preload", str(p))]
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [str(DASK), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                     "--host", "127.0.0.1", *preload],
                    **common,  # type: ignore[call-overload]
                )
            )  # fmt: skip
            if pids is not None:
                pids.append(procs[-1].pid)
        from distributed import Client

        if workers:  # (a scheduler without workers: nothing to wait for)
            with Client(address, timeout=30) as client:
                client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        # the workers first, then the scheduler: a worker whose scheduler is gone spends seconds
        # trying to reach it before it exits (8 s in all, against 0.5 s in this order)
        for group in (procs[1:], procs[:1]):
            for proc in group:
                proc.terminate()
            for proc in group:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=20)
