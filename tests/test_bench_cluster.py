"""``bench.cluster`` run as a user runs it, on a small store in 4 partitions: a real scheduler and
two workers that read this machine's files (the store split for them) beside two that act as on
other machines, and the same report from both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_cluster_benchmark_splits_for_workers_that_see_the_files_only(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOURGLASS_", "ANTHROPIC_"))}
    argv = [sys.executable, "-m", "bench.cluster", "--spans", "20000", "--rounds", "1", "--partitions", "4"]
    done = subprocess.run(
        [*argv, "--keep", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    elsewhere = lines[lines.index(next(x for x in lines if "elsewhere:" in x)) + 1]
    here = lines[lines.index(next(x for x in lines if "files here:" in x)) + 1]
    assert "in 4 partitions" in elsewhere and "this machine's files" not in elsewhere, done.stdout
    assert "its workers read this machine's files: the store is split into a file per partition" in here
    assert "the same report: True" in done.stdout, done.stdout
