"""The temporary folders of Hourglass' runs: named after the process that made them, held while
their run uses them, and swept when that process died without removing them.

A run removes its own temporary folders when it ends, fails or is interrupted (the repaired
partitions kept for the pricing: ``partitions.Prepared``; the spilled rows: ``spill.Spill``; the
incremental state of a store in memory). ``serve``'s analysis worker, stopped in the middle of a
round, ends at once instead (SIGTERM's default: its state's writes are whole or not at all), and
left them in the system's temporary folder: the repaired spans of every partition extracted so
far, ~100 bytes a span (a whole-store analysis of 5M spans: ~500 MB), at every such stop. It now
removes the folders held here first (:func:`remove_all`).

A process killed outright (SIGKILL, the kernel's out-of-memory killer) removes nothing: a file
analysis' temporary store, a split of a store (a copy of it), the repaired partitions. Each such
folder in ``$TMPDIR`` is named ``hourglass-<kind>-<namespace>-<pid>-...`` (:func:`make`), and the
next ``hourglass analyze`` or ``serve`` removes the folders of processes that are gone
(:func:`sweep`). ``<namespace>`` names the pid namespace: containers that share ``$TMPDIR`` each
have their own pids, and a live run of another container looks dead from here (its run may last
hours, longer than any age would guard), so only folders of this namespace are judged.

Imports nothing of the analysis: the worker's signal handler imports it before any round."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time

# (no lock: ``set.add``, ``discard`` and ``copy`` are each one step under the GIL, and a lock taken
# by the main thread when the signal came would never be released to the handler it runs)
_held: set[str] = set()


def hold(folder: str) -> None:
    """``folder`` belongs to a run of this process until :func:`let_go`."""
    _held.add(str(folder))


def let_go(folder: str) -> None:
    """``folder`` is removed (or kept on purpose) by its run: no longer :func:`remove_all`'s."""
    _held.discard(str(folder))


def held() -> list[str]:
    return sorted(_held.copy())


def remove_all() -> None:
    """Removes every folder held (for a process about to end in the middle of its runs)."""
    for folder in sorted(_held.copy()):
        _held.discard(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _namespace() -> str:
    """8 hex digits naming this process' pid namespace (its inode, where ``/proc`` tells it; else
    the host name, which a container has of its own)."""
    try:
        ident = os.readlink("/proc/self/ns/pid")
    except OSError:
        ident = socket.gethostname()
    return hashlib.sha1(ident.encode(), usedforsecurity=False).hexdigest()[:8]


NAMESPACE = _namespace()
# the folders :func:`make` names: ``hourglass-<kind>-<namespace>-<pid>-<random>``
OWNED = re.compile(
    r"^hourglass-(?:files|partitions|prepared|spill|incremental)-(?P<ns>[0-9a-f]{8})-(?P<pid>\d{1,10})-",
    re.ASCII,
)
# a folder this young is never swept (its process may have just made it, under a reused pid)
LEFTOVER_AGE_S = 60.0


def make(kind: str, near: str | None = None, *, held: bool = False) -> str:
    """A fresh folder ``hourglass-<kind>-<namespace>-<this pid>-...`` in ``near`` (default
    ``$TMPDIR``); ``held``: :func:`hold` it too."""
    folder = tempfile.mkdtemp(prefix=f"hourglass-{kind}-{NAMESPACE}-{os.getpid()}-", dir=near)
    if held:
        hold(folder)
    return folder


def process_started_monotonic() -> float:
    """When this process started, on the monotonic clock (``/proc/self/stat``'s start time; raises
    where there is none)."""
    with open("/proc/self/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[19])  # field 22: start time in clock ticks after boot
    return ticks / os.sysconf("SC_CLK_TCK")


def leftovers(directory: str, pattern: re.Pattern[str], min_age_s: float) -> list[str]:
    """The entries of ``directory`` whose name matches ``pattern`` (its group ``pid``: the process
    that made it; a group ``ns``, if any: :data:`NAMESPACE`, else the entry is not judged) and
    whose process is gone, older than ``min_age_s``. An entry of a live
    process is not one (also another user's, whose pid cannot be signalled), nor one of this
    process' own pid unless it is older than this process (a program that is always the same pid:
    pid 1 in a container). Never raises: a name it cannot read is left out."""
    found: list[str] = []
    now = time.time()
    try:
        started: float | None = now - time.monotonic() + process_started_monotonic()
    except Exception:  # (no /proc: entries of this pid are kept)
        started = None
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        match = pattern.match(name)
        if match is None or match.groupdict().get("ns", NAMESPACE) != NAMESPACE:
            continue
        path = os.path.join(directory, name)
        try:
            pid = int(match.group("pid"))
            modified = os.stat(path).st_mtime
            if now - modified < min_age_s or pid <= 0:
                continue
            if pid == os.getpid():
                if started is None or modified >= started:
                    continue
            else:
                try:
                    os.kill(pid, 0)
                    continue  # alive
                except ProcessLookupError:
                    pass
        except (OSError, OverflowError, ValueError):  # alive, not ours (EPERM); gone; a bad name
            continue
        found.append(path)
    return found


def sweep(directory: str | None = None) -> list[str]:
    """Removes the folders :func:`make` made in ``directory`` (default ``$TMPDIR``) whose process
    is gone, older than ``LEFTOVER_AGE_S`` (:func:`leftovers`); returns them. Never raises: what
    it cannot remove is left alone."""
    removed: list[str] = []
    for path in leftovers(directory or tempfile.gettempdir(), OWNED, LEFTOVER_AGE_S):
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
            removed.append(path)
    return removed
