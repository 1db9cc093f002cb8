"""Dask worker preload (``dask worker --preload tests/dask_die_once.py``): once the file
``$HOURGLASS_TEST_DIE/armed`` exists, the Hourglass tasks that the workers sharing that folder
start kill their worker process as they begin executing, as a machine lost mid-task would —
``$HOURGLASS_TEST_DIE_TIMES`` of them in all (default 1), each writing ``died-N`` (its task's key)
into the folder. The worker's nanny starts a new process."""

from __future__ import annotations

import os
from typing import Any

from distributed import WorkerPlugin


class DieOnce(WorkerPlugin):
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing" or not str(key).startswith("hourglass-"):
            return
        folder = os.environ.get("HOURGLASS_TEST_DIE")
        if not folder or not os.path.exists(os.path.join(folder, "armed")):
            return
        for n in range(1, int(os.environ.get("HOURGLASS_TEST_DIE_TIMES", "1")) + 1):
            try:
                fd = os.open(os.path.join(folder, f"died-{n}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, str(key).encode())
            os.close(fd)
            os._exit(17)  # the task is executing on this worker: a small batch could finish first otherwise
            return


async def dask_setup(worker: Any) -> None:
    await worker.plugin_add(DieOnce(), name="hourglass-test-die-once")
