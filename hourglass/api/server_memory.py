"""Where the serve process's memory is: a breakdown for ``/v1/stats`` (``server_memory``) and the
soak benchmark.

RSS alone says that the server grows, not what: the breakdown splits it into

* ``rss`` / ``anon`` / ``file`` / ``shmem`` (``/proc/self/smaps_rollup``): anonymous memory is the
  heaps; ``file`` the mapped libraries and files;
* ``glibc``: the C heap of glibc's malloc (``mallinfo2``): bytes in use (``in_use``: gRPC,
  protobuf, numpy and Python's larger objects allocate here)
  and bytes freed but still held by its arenas (``free``, what ``malloc_trim`` may return);
* ``arrow``: what pyarrow's default pool has allocated, and its backend (serve uses jemalloc);
* ``duckdb``: the span store's buffer pool by tag (``duckdb_memory()``: ``BASE_TABLE`` is cached
  blocks of the stored table, the others the memory of queries in flight) and its limit;
* ``duckdb_allocator``: DuckDB's own allocator (a jemalloc inside its module, not glibc's):
  bytes allocated (the buffer pool and everything else DuckDB holds, e.g. query results) and
  resident (with the freed pages it keeps for reuse);
* ``python``: bytes traced by ``tracemalloc`` when it runs (``PYTHONTRACEMALLOC=1``), else None;
  ``python_blocks``: the objects' blocks Python's allocator holds (``sys.getallocatedblocks``).

Each part is read in well under a millisecond (the DuckDB part is one query), so ``/v1/stats``
carries it always. On a system without ``/proc`` or glibc those parts are None.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import tracemalloc
from typing import Any

import pyarrow as pa

MiB = 2**20


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc() -> Any:
    """glibc (``malloc_trim``, ``mallinfo2``, ``mallopt``), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
    return libc


LIBC = _glibc()


def smaps_rollup() -> dict[str, int] | None:
    """This process's resident memory by kind, in bytes (Linux), else None."""
    wanted = {"Rss": "rss", "Anonymous": "anon", "Pss_File": "file", "Pss_Shmem": "shmem"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[wanted[key]] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return out or None


def glibc_heap() -> dict[str, int] | None:
    """glibc malloc's heap: bytes in use (small chunks and mmapped ones) and freed but held."""
    if LIBC is None or not hasattr(LIBC, "mallinfo2"):
        return None
    info = LIBC.mallinfo2()
    return {
        "in_use": int(info.uordblks + info.hblkhd),
        "free": int(info.fordblks),
        "mmapped": int(info.hblkhd),
        "arena": int(info.arena),
    }


def _duckdb_mallctl() -> Any:
    """``mallctl`` of the jemalloc built into DuckDB's module (``duckdb_je_mallctl``), or None."""
    try:
        import _duckdb

        lib = ctypes.CDLL(_duckdb.__file__)
        mallctl = lib.duckdb_je_mallctl
    except (ImportError, OSError, AttributeError):
        return None
    mallctl.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    mallctl.restype = ctypes.c_int
    return mallctl


_DUCKDB_MALLCTL = _duckdb_mallctl()


def duckdb_allocator() -> dict[str, int] | None:
    """DuckDB's own allocator (its bundled jemalloc: the buffer pool, query results, the Arrow
    tables it builds): bytes ``allocated`` and ``resident`` (with the pages it keeps for reuse)."""
    if _DUCKDB_MALLCTL is None:
        return None
    epoch = ctypes.c_uint64(1)
    if _DUCKDB_MALLCTL(b"epoch", None, None, ctypes.byref(epoch), ctypes.sizeof(epoch)) != 0:
        return None
    out: dict[str, int] = {}
    for name in ("allocated", "resident"):
        value, size = ctypes.c_size_t(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_size_t))
        if _DUCKDB_MALLCTL(f"stats.{name}".encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
            return None
        out[name] = int(value.value)
    return out


def breakdown(store: Any) -> dict[str, Any]:
    """The serve process's memory, by part (see the module doc); sizes in bytes."""
    pool = pa.default_memory_pool()
    duckdb_part: dict[str, Any] | None = None
    memory_usage = getattr(store, "memory_usage", None)
    if callable(memory_usage):
        with contextlib.suppress(Exception):  # a closed store: no figure, never a failed /v1/stats
            duckdb_part = memory_usage()
    return {
        **(smaps_rollup() or {"rss": None}),
        "glibc": glibc_heap(),
        "arrow": {"backend": pool.backend_name, "allocated": int(pool.bytes_allocated())},
        "duckdb": duckdb_part,
        "duckdb_allocator": duckdb_allocator(),
        "python": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
        "python_blocks": sys.getallocatedblocks(),
    }


def trim() -> None:
    """Return glibc's freed heap pages to the system (``malloc_trim``; a no-op elsewhere)."""
    if LIBC is not None:
        LIBC.malloc_trim(0)


# ``mallctl`` index that names every arena of a jemalloc (``MALLCTL_ARENAS_ALL``)
_ALL_ARENAS = 4096


def purge_duckdb() -> None:
    """Return the pages DuckDB's own allocator freed (its bundled jemalloc keeps them resident for
    reuse until its decay, which without background threads runs only when DuckDB allocates
    again) to the system now: ``arena.<all>.purge``. A no-op without that allocator."""
    if _DUCKDB_MALLCTL is not None:
        _DUCKDB_MALLCTL(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, 0)


def trim_worker() -> None:
    """The analysis worker's freed memory returned: glibc's (:func:`trim`) and DuckDB's
    (:func:`purge_duckdb`: the worker's DuckDB is its sidecar, whose evicted blocks stay resident
    otherwise)."""
    trim()
    purge_duckdb()


def memlog_detail() -> str:
    """What a memory note adds with ``HOURGLASS_MEMORY_LOG=detail`` (``memlog.set_detail``): the anonymous resident memory by allocator (MiB): glibc's
    main heap resident (``[heap]``) and its own maps (``mmapped``), Python's small-object arenas
    (1 MiB each on 64-bit builds), DuckDB's jemalloc resident, and the rest (``other``: polars'
    jemalloc, Arrow's pool, glibc's other arenas); then glibc's bytes in use and freed (freed
    bytes may be resident or not: a trim returns their pages but glibc still counts them)."""
    rollup = smaps_rollup() or {}
    glibc = glibc_heap() or {}
    duck = duckdb_allocator() or {}
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
