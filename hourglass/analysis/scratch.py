"""The temporary folders of the runs in progress in this process, for a process that ends in the
middle of one without unwinding it.

A run removes its own temporary folders when it ends, fails or is interrupted (the repaired
partitions kept for the pricing: ``partitions.Prepared``; the spilled rows: ``spill.Spill``; the
incremental state of a store in memory). ``serve``'s analysis worker, stopped in the middle of a
round, ends at once instead (SIGTERM's default: its state's writes are whole or not at all), and
left them in the system's temporary folder: the repaired spans of every partition extracted so
far, ~100 bytes a span (a whole-store analysis of 5M spans: ~500 MB), at every such stop. It now
removes the folders held here first (:func:`remove_all`).

Imports nothing of the analysis: the worker's signal handler imports it before any round."""

from __future__ import annotations

import shutil

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
