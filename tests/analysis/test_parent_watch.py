"""The parent watch of worker processes (``worker_start.WatchedProcess``) ends a worker whose
parent was killed with SIGKILL with one signal only, so a worker that closes its state on that
signal (serve's analysis worker) is not cut short by a second one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.orphans import left_running, linux_only

# The parent: starts a WatchedProcess (SIGTERM) from its main thread, then waits to be killed.
PARENT = """
import sys, time
from hourglass.analysis.worker_start import WatchedProcess
from tests.analysis.test_parent_watch import slow_closer
p = WatchedProcess(target=slow_closer, args=(sys.argv[1],), signum=15)
p.start()
print(p.pid, flush=True)
time.sleep(60)
"""


def slow_closer(folder: str) -> None:
    """A worker that, on SIGTERM, takes 1.5 s to close (as serve's worker checkpoints its
    state), its default action back while it does (a second SIGTERM would end the closing)."""

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    Path(folder, "ready").write_text("")
    try:
        while True:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(1.5)
        Path(folder, "closed").write_text("")


@linux_only
def test_an_orphaned_worker_gets_one_signal_and_finishes_closing(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=root, env=env
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline, "the worker did not start"
            assert parent.poll() is None, "the parent ended"
            time.sleep(0.05)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 8
        while not (tmp_path / "closed").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "closed").exists(), "the worker's closing was cut short (a second signal)"
        assert left_running([child], within=10) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
