"""One line, naming the file and what to do, when a store file cannot be opened (issue 15.7).

DuckDB's messages are long and sometimes span lines (a corrupt block, a lock held by another
process with its PID, a newer storage version); every command that opens a store says the same
thing the same way: ``PATH: cannot open the store (FIRST LINE OF THE REASON); WHAT TO DO``.
"""

from __future__ import annotations


def store_open_problem(path: str, exc: BaseException) -> str:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    lowered = text.lower()
    if "could not set lock" in lowered or "conflicting lock" in lowered:
        advice = (
            "another process has it open (a running `hourglass serve`?): stop it, or use its REST API and "
            "report page instead"
        )
    elif "permission denied" in lowered:
        advice = "this user cannot read or write it: fix its permissions, or pass another --db"
    elif "no space left" in lowered or "disk is full" in lowered:
        advice = "the disk is full: free space on its volume and retry"
    else:
        advice = (
            "the file is damaged or not an Hourglass store: move it aside (or restore a backup) and start "
            "again, or pass another --db"
        )
    return f"{path}: cannot open the store ({reason}); {advice}"
