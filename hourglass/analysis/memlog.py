"""Where a process's memory goes, phase by phase (``HOURGLASS_MEMORY_LOG=1``): a diagnostic.

``note(phase)`` prints, on standard error, this process's resident memory now and its peak since
the previous note (Linux: the peak is read from ``VmHWM`` and reset through ``clear_refs``, so
each line's peak belongs to the phase it closes), e.g.::

    hourglass memory: pid 4242 extract 3/16 done: rss 612 MiB, phase peak 1180 MiB

Partitioned analysis notes its phases in the deciding process and in each worker (spawned
workers inherit the variable), which is how the peak of a large ``analyze --db`` is attributed to
a process and a phase. Without the variable ``note`` does nothing. ``HOURGLASS_MEMORY_LOG=detail``
adds where the anonymous memory is (Linux, glibc): glibc's main heap resident (``[heap]``: its
pages in use and those freed but not trimmed), Python's small-object arenas, glibc's bytes in use
and freed, DuckDB's allocator, and the rest (polars' and Arrow's allocators) — a few ms a note.
"""

from __future__ import annotations

import os
import sys

from hourglass.settings import env_var

ENV = env_var("memory_log")


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
    sys.stderr.write(
        f"hourglass memory: pid {os.getpid()} {phase}: rss {rss // 1024} MiB, phase peak {peak // 1024} MiB"
        f"{_parts() if os.environ.get(ENV, '').strip().lower() == 'detail' else ''}\n"
    )
    sys.stderr.flush()


def _parts() -> str:
    """``HOURGLASS_MEMORY_LOG=detail``: the anonymous resident memory by allocator (MiB): glibc's
    main heap resident (``[heap]``) and its own maps (``mmapped``), Python's small-object arenas
    (1 MiB each on 64-bit builds), DuckDB's jemalloc resident, and the rest (``other``: polars'
    jemalloc, Arrow's pool, glibc's other arenas); then glibc's bytes in use and freed (freed
    bytes may be resident or not: a trim returns their pages but glibc still counts them)."""
    from hourglass.api import server_memory

    rollup = server_memory.smaps_rollup() or {}
    glibc = server_memory.glibc_heap() or {}
    duck = server_memory.duckdb_allocator() or {}
    mib = 2**20
    heap = 0  # resident: glibc's main heap ([heap])
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as smaps:
            in_heap = False
            for line in smaps:
                first = line.split()
                if first and "-" in first[0] and len(first) >= 5:
                    in_heap = first[-1] == "[heap]"
                elif in_heap and first and first[0] == "Rss:":
                    heap += int(first[1]) * 1024
    except OSError:
        pass
    arenas = _obmalloc_arenas()
    mapped, resident = glibc.get("mmapped", 0), duck.get("resident", 0)
    other = rollup.get("anon", 0) - heap - mapped - resident - max(arenas, 0) * mib
    return (
        f" [anon {rollup.get('anon', 0) / mib:.0f}: [heap] {heap / mib:.0f}, mmapped {mapped / mib:.0f},"
        f" obmalloc arenas {arenas}, duckdb {resident / mib:.0f}, other {other / mib:.0f};"
        f" glibc in use {glibc.get('in_use', 0) / mib:.0f}, free {glibc.get('free', 0) / mib:.0f};"
        f" py kblocks {sys.getallocatedblocks() // 1000}]"
    )


def _obmalloc_arenas() -> int:
    """Python's small-object arenas allocated now (``sys._debugmallocstats``, read from fd 2)."""
    import tempfile

    try:
        with tempfile.TemporaryFile() as out:
            sys.stderr.flush()
            saved = os.dup(2)
            try:
                os.dup2(out.fileno(), 2)
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            out.seek(0)
            for line in out.read().decode("ascii", "replace").splitlines():
                if line.startswith("# arenas allocated current"):
                    return int(line.split("=")[1].replace(",", "").strip())
    except (OSError, ValueError, AttributeError):
        pass
    return -1
