"""Dask worker preload (``dask worker --preload tests/dask_die_once.py``): the first Hourglass task
that any worker sharing ``$HOURGLASS_TEST_DIE_ONCE`` starts kills that worker process a moment
after it begins (the marker file makes it once per cluster), as a machine lost mid-task would."""

from __future__ import annotations

import os
import threading
from typing import Any

from distributed import WorkerPlugin


class DieOnce(WorkerPlugin):
    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing" or not str(key).startswith("hourglass-"):
            return
        try:
            fd = os.open(os.environ["HOURGLASS_TEST_DIE_ONCE"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except (FileExistsError, KeyError):
            return
        os.write(fd, str(key).encode())
        os.close(fd)
        threading.Timer(0.2, os._exit, (17,)).start()  # while the task runs


async def dask_setup(worker: Any) -> None:
    await worker.plugin_add(DieOnce(), name="hourglass-test-die-once")
