"""A real Dask scheduler and worker processes on 127.0.0.1 for the ``--cluster`` tests.

``dask_die_once.py`` beside this module is a worker preload for the worker-death tests: once
armed, the first Hourglass task(s) the workers start kill their worker process (through marker
files in a folder the workers share); the worker's nanny starts a new one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bench._dask import ELSEWHERE
from bench._dask import dask_cluster as _dask_cluster

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
    elsewhere: bool = False,
) -> Iterator[str]:
    """A scheduler and ``workers`` worker processes (one thread each), stopped on exit; yields the
    scheduler's address. ``die``: the first ``die`` Hourglass tasks kill their worker, from the
    start (``armed``) or once ``folder / "armed"`` is created (each death writes
    ``folder / "died-N"``). ``scheduler_env``: variables for the scheduler only (its Dask config);
    ``port``: the scheduler's (0: any free one). ``elsewhere``: the workers act as on another
    machine, not seeing the client's temporary files (``bench/dask_elsewhere.py``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if die and armed:
        (folder / "armed").touch()
    preloads = ([DIE_ONCE] if die else []) + ([ELSEWHERE] if elsewhere else [])
    env = {"HOURGLASS_TEST_DIE": str(folder), "HOURGLASS_TEST_DIE_TIMES": str(die)}
    with _dask_cluster(
        folder, workers=workers, preloads=preloads, env=env, scheduler_env=scheduler_env, port=port
    ) as address:
        yield address
