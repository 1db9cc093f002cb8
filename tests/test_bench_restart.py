"""``bench.restart_serve`` run as a user runs it, on a small store: serve restarted after a clean
stop goes on from what the store's close kept, after a crash it rebuilds the incremental tally
from every row (the worker's ``bounds`` read: the ingest ranges of that rebuild); after either,
the report the last process kept is served until the first round."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_restart_benchmark_shows_the_kept_figures_and_the_crash_baseline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOURGLASS_", "ANTHROPIC_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.restart_serve",
            "--stored",
            "20k",
            "--rounds",
            "1",
            "--keep",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any("after a crash (baseline: rebuilt)" in line for line in lines), done.stdout
    assert any("after a clean stop (kept)" in line for line in lines), done.stdout
    runs = json.loads(lines[-1])
    (clean,), (crash,) = runs["clean"], runs["crash"]
    assert "bounds" in crash["reads"], crash  # the tally rebuilt from every row
    assert "bounds" not in clean["reads"], clean
    assert clean["first_round_s"] > clean["listening_s"] > 0
    # the report the last process kept is served until the first round (whose generation goes
    # on from it: a first round of its own was generation 1), after a clean stop and a crash alike
    for run in (clean, crash):
        assert 0 < run["report_s"] <= run["first_round_s"], run
        assert run["round_generation"] > run["report_generation"] > 1, run
