"""Where a process's memory goes, phase by phase (``HOURGLASS_MEMORY_LOG=1``): a diagnostic.

``note(phase)`` prints, on standard error, this process's resident memory now and its peak since
the previous note (Linux: the peak is read from ``VmHWM`` and reset through ``clear_refs``, so
each line's peak belongs to the phase it closes) and the time of day (UTC, to the millisecond: the
processes of one run are timed on one clock), e.g.::

    hourglass memory: pid 4242 extract 3/16 done: rss 612 MiB, phase peak 1180 MiB at 05:27:01.123 UTC

Partitioned analysis notes its phases in the deciding process and in each worker (spawned
workers inherit the variable), which is how the peak of a large ``analyze --db`` is attributed to
a process and a phase. Without the variable ``note`` does nothing. ``HOURGLASS_MEMORY_LOG=detail``
adds what ``set_detail`` registered (serve's analysis worker: where the anonymous memory is, by
allocator: ``hourglass.api.server_memory.memlog_detail``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from hourglass.settings import env_var

ENV = env_var("memory_log")
# ``detail``: what a note adds (``set_detail``: serve's analysis worker registers
# ``hourglass.api.server_memory.memlog_detail``)
_detail: Callable[[], str] | None = None


def set_detail(detail: Callable[[], str] | None) -> None:
    """What each note adds with ``HOURGLASS_MEMORY_LOG=detail`` (None: nothing)."""
    global _detail
    _detail = detail


def enabled() -> bool:
    return os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def note(phase: str) -> None:
    """One line: this process's resident memory and its peak since the last note."""
    if not enabled():
        return
    rss, peak = _status_kib("VmRSS"), _status_kib("VmHWM")
    try:  # a fresh peak for the next phase
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        pass
    now = time.time()
    at = f"{time.strftime('%H:%M:%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}"
    try:  # (a diagnostic line never fails the run: a closed or broken stderr, `2>&1 | head`)
        sys.stderr.write(
            f"hourglass memory: pid {os.getpid()} {phase}: rss {rss // 1024} MiB, phase peak {peak // 1024} MiB"
            f" at {at} UTC"
            f"{_detail() if _detail is not None and os.environ.get(ENV, '').strip().lower() == 'detail' else ''}\n"
        )
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
