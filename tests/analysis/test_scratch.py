"""The temporary folders of runs whose process was killed outright are swept by the next run
(``hourglass.analysis.scratch``): only those of processes that are gone, and not young ones."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hourglass.analysis import scratch
from tests.api.live_server import hourglass_executable

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample-traces" / "n_plus_one.otlp.jsonl"


def _dead_pid() -> int:
    """The pid of a process killed with SIGKILL (and reaped): gone."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    process.kill()
    process.wait(10)
    return process.pid


def _name(kind: str, pid: int, rest: str, namespace: str = scratch.NAMESPACE) -> str:
    return f"hourglass-{kind}-{namespace}-{pid}-{rest}"


def _folder(parent: Path, name: str, *, age_s: float) -> Path:
    folder = parent / name
    (folder / "inside").mkdir(parents=True)
    (folder / "inside" / "spans.duckdb").write_bytes(b"x" * 1000)
    then = time.time() - age_s
    os.utime(folder, (then, then))
    return folder


def test_the_sweep_removes_only_old_folders_of_processes_that_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # this process started 1,000 s ago
    monkeypatch.setattr(scratch, "process_started_monotonic", lambda: time.monotonic() - 1000)
    dead = _dead_pid()
    alive = os.getppid()
    own = os.getpid()
    gone = _folder(tmp_path, _name("files", dead, "abc"), age_s=600)
    gone_split = _folder(tmp_path, _name("partitions", dead, "def"), age_s=600)
    young = _folder(tmp_path, _name("prepared", dead, "ghi"), age_s=5)  # (a reused pid's, maybe)
    living = _folder(tmp_path, _name("spill", alive, "jkl"), age_s=600)
    mine = _folder(tmp_path, _name("files", own, "mno"), age_s=120)  # made by this process
    before_me = _folder(tmp_path, _name("files", own, "pqr"), age_s=2000)  # by an earlier one of its pid
    # another pid namespace's (a container sharing $TMPDIR): its pids mean nothing here
    elsewhere = _folder(tmp_path, _name("files", dead, "stu", namespace="0123abcd"), age_s=600)
    other = _folder(tmp_path, f"hourglass-other-{scratch.NAMESPACE}-{dead}-vwx", age_s=600)  # not a run's
    old_name = _folder(tmp_path, "hourglass-prepared-vwxyz123", age_s=600)  # (no pid in its name)

    removed = scratch.sweep(str(tmp_path))

    assert sorted(removed) == sorted(str(p) for p in (gone, gone_split, before_me))
    assert not gone.exists() and not gone_split.exists() and not before_me.exists()
    for kept in (young, living, mine, elsewhere, other, old_name):
        assert kept.exists(), kept


def test_made_folders_are_named_after_their_process_and_held_when_asked(tmp_path: Path) -> None:
    folder = scratch.make("prepared", str(tmp_path), held=True)
    try:
        assert Path(folder).name.startswith(f"hourglass-prepared-{scratch.NAMESPACE}-{os.getpid()}-")
        assert scratch.OWNED.match(Path(folder).name)
        assert folder in scratch.held()
        scratch.remove_all()
        assert not Path(folder).exists() and folder not in scratch.held()
    finally:
        scratch.let_go(folder)


def test_the_next_analyze_removes_what_a_killed_run_left(tmp_path: Path) -> None:
    """The real CLI, with its temporary folder in ``tmp_path``: the folder a run killed with SIGKILL
    left there (its file analysis' store) is removed, and the report is made as ever."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    left = _folder(temp, _name("files", _dead_pid(), "k1ll3d"), age_s=600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    result = subprocess.run(
        [*hourglass_executable(), "analyze", str(SAMPLE), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**env, "TMPDIR": str(temp)},
    )
    assert result.returncode == 0, result.stderr
    assert '"recommendations"' in result.stdout
    assert not left.exists()
