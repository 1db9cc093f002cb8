"""The last report of ``serve``, kept beside its store, so that a restart serves it at once.

Before, a restarted serve answered ``503 no report yet`` until the first round of the new
process ended: on a 10M-span store 9 s after a clean stop and 30 s after a crash, growing with the
store; a staging target is restarted on every deploy. Now each published report (at most every
``KEEP_EVERY_S``, and the last one when serve stops) is written to ``<sidecar>.d/kept-report``:
the snapshot as served (its pickled report, JSON and small fields) and its trace index's arrays in
a file of their own (``TraceIndex.stored``, read per lookup as the served index is). A restart
serves it as soon as the analysis thread starts, marked restored (``status()["restored"]``,
``last_reason`` "restored", the page says so) with its own generation and finish time, until the
first round of the new process replaces it; nothing a round does waits for it or reads it.

It is restored only when it was written for this store file (its inode: a store deleted and made
again is another store, as the sidecar itself says), by the same Hourglass code (a hash of the
package's sources: any other build writes other rows and texts) and with the same settings that
shape a report (window, retention, writer). Anything else, or a file that cannot be read, is
dropped with one log line and the restart waits for its first round, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

from hourglass.analysis.trace_index import TraceIndex
from hourglass.api.analysis_snapshot import ReportSnapshot

log = logging.getLogger("hourglass.api.kept_report")

FORMAT = 1
FOLDER = "kept-report"
KEPT_FILE = "kept.pickle"
INDEX_PREFIX = "trace-index-"
# a published report is kept at most this often (and when serve stops): its index is a copy of the
# served one's file, ~55 MiB at 12M stored spans; the first round after a start replaces a kept
# report within seconds whatever its age, so keeping it more often buys nothing but writes
KEEP_EVERY_S = 300.0
RESTORED = "restored"  # the reason of a snapshot served from the kept report
# the settings that change what a report says: the window it covers, what retention leaves, the
# kind of analysis and who writes its texts (a port or a token does not)
_REPORT_SETTINGS = ("report_max_spans", "retention_seconds", "incremental_analysis", "llm_model")

_code_hash: str | None = None


def code_hash() -> str:
    """A hash of every source file of the ``hourglass`` package (its relative path and bytes),
    read once per process: a report is restored by the code that wrote it, whatever the version
    string says (an editable install keeps one version across every change)."""
    global _code_hash
    if _code_hash is None:
        root = Path(__file__).resolve().parents[1]
        digest = hashlib.blake2b(digest_size=16)
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        _code_hash = digest.hexdigest()
    return _code_hash


def folder_of(sidecar: str) -> str:
    """Where the report of the store whose incremental state is ``sidecar`` is kept."""
    return os.path.join(sidecar + ".d", FOLDER)


def key_of(store_path: str, settings: Any, writer: str) -> dict[str, Any] | None:
    """What a kept report must have been written with to be restored (``writer``: what writes
    its texts); None when the store file cannot be looked at, so nothing is kept for it."""
    try:
        inode = os.stat(store_path).st_ino
    except OSError:
        return None
    return {
        "format": FORMAT,
        "code": code_hash(),
        "store_inode": inode,
        "settings": {name: getattr(settings, name, None) for name in _REPORT_SETTINGS},
        "writer": writer,
    }


def save(folder: str, snapshot: ReportSnapshot, key: dict[str, Any]) -> None:
    """Keep ``snapshot`` in ``folder`` (replacing the one kept before): its index's arrays in a
    new file, then the rest in one pickle moved into place, then the older index files removed.
    A crash at any step leaves the last complete one, or none that reads (then dropped)."""
    os.makedirs(folder, exist_ok=True)
    index, index_path = snapshot.trace_index.stored(folder, prefix=INDEX_PREFIX)
    try:
        kept = dataclasses.replace(snapshot, trace_index=index)
        payload = {"key": key, "index_file": os.path.basename(index_path), "kept_at": time.time()}
        fd, tmp = tempfile.mkstemp(prefix="kept-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                pickle.dump((payload, kept), out, protocol=pickle.HIGHEST_PROTOCOL)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, os.path.join(folder, KEPT_FILE))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(index_path)
        raise
    _remove_others(folder, keep=os.path.basename(index_path))


def _remove_others(folder: str, keep: str | None) -> None:
    """The files of ``folder`` other than the kept pickle and ``keep`` (older index files, a
    write a crash interrupted). An index file still open by the snapshot served now stays
    readable through its open file."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name not in (KEPT_FILE, keep):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))


def restore(folder: str, key: dict[str, Any]) -> ReportSnapshot | None:
    """The snapshot kept in ``folder``, ready to serve (its index file opened and left in place,
    for the next restart), marked :data:`RESTORED`; None when there is none, or it was kept
    with another ``key`` or cannot be read (then it is removed, with one log line)."""
    path = os.path.join(folder, KEPT_FILE)
    if not os.path.exists(path):
        return None
    why: str
    try:
        with open(path, "rb") as raw:
            payload, kept = pickle.load(raw)
        if not isinstance(kept, ReportSnapshot) or not isinstance(payload, dict):
            why = "it is not a kept report"
        elif payload.get("key") != key:
            differs = sorted(
                k for k in {**key, **payload.get("key", {})} if key.get(k) != payload["key"].get(k)
            )
            why = f"it was kept with another {', '.join(differs)}"
        else:
            index = kept.trace_index
            _relocate(index, os.path.join(folder, str(payload["index_file"])))
            index.open_stored(consume=False)
            _remove_others(folder, keep=str(payload["index_file"]))
            return dataclasses.replace(
                kept, started_monotonic=float("-inf"), reason=RESTORED, change_marker=-1
            )
    except Exception as exc:  # (a truncated or foreign file: what a crash or another build leaves)
        why = f"it cannot be read ({type(exc).__name__}: {exc})"
    log.info("the report kept in %s is not served: %s; the first analysis makes one", folder, why)
    _remove_others(folder, keep=None)
    with contextlib.suppress(OSError):
        os.unlink(path)
    return None


def _relocate(index: TraceIndex, path: str) -> None:
    """Point a stored index at ``path`` (where its file is now: the store's folder may have been
    moved since it was kept). Its arrays share one file object."""
    stored = getattr(index, "_trace_ids", None)
    file = getattr(stored, "file", None)
    if file is None:
        raise ValueError("the kept trace index has no file")
    file.path = path
