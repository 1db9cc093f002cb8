"""Helpers for the tests of processes left behind by a parent killed with SIGKILL (Linux: /proc)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the multiprocessing resource tracker among them)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(") ", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def spawned(pid: int) -> list[int]:
    """``pid``'s children started by multiprocessing's spawn (its worker processes)."""
    out = []
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                out.append(child)
    return out


def running(pid: int) -> bool:
    """Still running (not exited, not a zombie waiting to be reaped by its new parent)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state not in "ZX"


def left_running(pids: list[int], within: float) -> list[int]:
    """Those of ``pids`` still running after ``within`` seconds (then killed, so no test leaves them)."""
    deadline = time.monotonic() + within
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in pids if running(p)]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left
