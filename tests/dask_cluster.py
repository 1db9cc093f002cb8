"""A real Dask scheduler and worker processes on 127.0.0.1 for the ``--cluster`` tests.

``dask_die_once.py`` beside this module is a worker preload for the worker-death tests: once
armed, the first Hourglass task(s) the workers start kill their worker process (through marker
files in a folder the workers share); the worker's nanny starts a new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")
DIE_ONCE = Path(__file__).with_name("dask_die_once.py")


@contextlib.contextmanager
def dask_cluster(
    folder: Path,
    *,
    workers: int = 2,
    die: int = 0,
    armed: bool = True,
    scheduler_env: dict[str, str] | None = None,
    port: int = 0,
) -> Iterator[str]:
    """A scheduler and ``workers`` worker processes (one thread each), stopped on exit; yields the
    scheduler's address. ``die``: the first ``die`` Hourglass tasks kill their worker, from the
    start (``armed``) or once ``folder / "armed"`` is created (each death writes
    ``folder / "died-N"``). ``scheduler_env``: variables for the scheduler only (its Dask config);
    ``port``: the scheduler's (0: any free one)."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOURGLASS_TEST_DIE": str(folder)}
    env["HOURGLASS_TEST_DIE_TIMES"] = str(die)
    if die and armed:
        (folder / "armed").touch()
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
        while not scheduler_file.exists() and time.monotonic() < deadline:
            assert procs[0].poll() is None, f"the Dask scheduler exited with {procs[0].returncode}"
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        assert address.startswith("tcp://127.0.0.1:")
        preload = ["--preload", str(DIE_ONCE)] if die else []
        for _ in range(workers):
            procs.append(
                subprocess.Popen(
                    [str(DASK), "worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                     "--host", "127.0.0.1", *preload],
                    **common,  # type: ignore[call-overload]
                )
            )  # fmt: skip
        from distributed import Client

        if workers:  # (a scheduler without workers: nothing to wait for)
            with Client(address, timeout=30) as client:
                client.wait_for_workers(workers, timeout=60)
        yield address
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
