"""`hourglass serve` killed with SIGKILL (no time to stop anything) in the middle of an analysis
round: its analysis worker process ends within seconds. Before, the worker went on with its round
(a minute and more on a large store), holding the store's analysis state, and only noticed the
server was gone when it sent the result. The round is made long here by a ``sitecustomize`` that,
in the worker process only, makes each round wait a minute after it starts."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.api.live_server import MS, ROOT, running_server, send_traces
from tests.orphans import left_running, linux_only, spawned

SLOW_ROUNDS = """
import os, sys, threading, time
if "--multiprocessing-fork" in sys.argv:  # a spawned process: serve's analysis worker among them
    def patch():
        while "hourglass.api.analysis_worker" not in sys.modules:
            time.sleep(0.01)
        module = sys.modules["hourglass.api.analysis_worker"]
        while not hasattr(module, "run_incremental"):
            time.sleep(0.01)
        run = module.run_incremental
        def slow(*args, **kwargs):
            open({marker!r}, "a").close()
            time.sleep(60)
            return run(*args, **kwargs)
        module.run_incremental = slow
    threading.Thread(target=patch, daemon=True).start()
"""


@linux_only
def test_the_analysis_worker_ends_when_serve_is_killed_during_a_round(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "round-started"
    (site / "sitecustomize.py").write_text(SLOW_ROUNDS.format(marker=str(marker)))
    env = {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "HOURGLASS_INCREMENTAL_ANALYSIS": "true"}
    with running_server(tmp_path, settle="0.5s", env=env) as server:
        send_traces(server, checkout=4, home=2, base_ns=time.time_ns() - 120_000 * MS)
        deadline = time.monotonic() + 60
        while not marker.exists():  # a round under way in the worker
            assert server.process.poll() is None and time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)
        workers = spawned(server.process.pid)
        assert workers, "no worker process seen"
        server.process.kill()
        server.process.wait()
        assert not left_running(workers, within=5.0)
