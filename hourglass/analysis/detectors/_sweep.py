"""Per-key passes over spilled resource rows, streamed in bounded chunks (issue 11's memory bound).

The inferred-convoy rule (``lock_contention``) looks at every span of one resource key at once:
how many spans of the key were in flight when each started (``peers``). In the generated mix one
key holds about two thirds of all spans, so deciding it from a frame of its rows needs memory in
proportion to the store. Here the rows of a bucket (Parquet files, ``hourglass.analysis.spill``)
are read through DuckDB, which sorts them out of core under a small memory limit, and arrive in
record batches in (key, start, uid) order; each pass keeps per key a few counters and the ends of
the spans still in flight at a chunk's boundary:

* :func:`group_extents`: rows, earliest start and latest end per key (an aggregate in DuckDB);
* :func:`overlap_shares`: the busy pre-filter's share of spans that started while an earlier one
  of the key was still running (a running maximum of ends, carried across chunks);
* :func:`sweep`: ``peers`` of each span — starts counted in (time key, uid) order less the ends
  before it. Chunks are cut only where the time key changes, so the starts of one instant are
  ranked together; an end can only fall before a start of its own or an earlier chunk, so the ends
  of earlier chunks are a count plus the few still open at the cut. The result is the same
  integer for every span as the in-memory sweep's, whatever the chunk size.

Only the keys that are busy enough to judge keep a column pair (duration, peers) for the
statistics the rule computes on them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.collector.duckdb_store import quiet

BATCH_ROWS = 1 << 18  # rows per record batch read from DuckDB (tests lower it to cross chunk cuts)
MEMORY_LIMIT = "256MB"  # DuckDB's own, for the sort (it spills to the bucket folder beyond it)


@contextlib.contextmanager
def connection(near: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """One DuckDB connection for a whole decision (opening one costs tens of ms), its sorts
    spilling to a temporary folder beside ``near`` (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix="sort-", dir=near) as temp:
        con = quiet(duckdb.connect())
        try:
            con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
            con.execute("SET threads = 2")
            con.execute("SET preserve_insertion_order = false")
            con.execute(f"SET temp_directory = '{temp}'")
            yield con
        finally:
            con.close()


@contextlib.contextmanager
def _connected(
    files: Sequence[Path], con: duckdb.DuckDBPyConnection | None
) -> Iterator[duckdb.DuckDBPyConnection]:
    if con is not None:
        yield con
    else:
        with connection(Path(files[0]).parent) as own:
            yield own


def _files(files: Sequence[Path]) -> list[str]:
    return [str(f) for f in files]


def group_extents(
    files: Sequence[Path],
    excluded_ops: pl.Series | None,
    min_rows: int,
    con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """(gid, n, lo, hi) of the keys with at least ``min_rows`` rows whose ``op`` is not excluded:
    rows, earliest start, latest end."""
    with _connected(files, con) as con:
        where = ""
        if excluded_ops is not None and excluded_ops.len():
            con.register("excluded", pa.table({"op": excluded_ops.cast(pl.UInt64).to_arrow()}))
            where = "WHERE op NOT IN (SELECT op FROM excluded)"
        table = con.sql(
            f"SELECT gid, count(*) AS n, min(start_ns) AS lo, max(end_ns) AS hi FROM read_parquet($files) {where} "
            "GROUP BY gid HAVING count(*) >= $min_rows",
            params={"files": _files(files), "min_rows": min_rows},
        ).to_arrow_table()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.cast({"gid": pl.UInt64, "n": pl.Int64, "lo": pl.Int64, "hi": pl.Int64})


def _numpy_columns(batch: pa.RecordBatch, columns: list[str]) -> dict[str, np.ndarray]:
    """``columns`` of ``batch`` as numpy arrays (no copy: integer columns without nulls), through
    polars: pyarrow's own ``to_numpy`` imports pandas, a third of a second of CPU in the process
    that decides."""
    frame = pl.from_arrow(batch.select(columns))
    assert isinstance(frame, pl.DataFrame)
    return {name: frame[name].to_numpy() for name in columns}


def _stream(
    files: Sequence[Path], gids: pl.Series, columns: list[str], con: duckdb.DuckDBPyConnection | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``gids`` in (gid, start_ns, uid) order, a record batch at a time."""
    with _connected(files, con) as con:
        con.register("wanted", pa.table({"gid": gids.cast(pl.UInt64).to_arrow()}))
        reader = con.sql(
            f"SELECT {', '.join(columns)} FROM read_parquet($files) WHERE gid IN (SELECT gid FROM wanted) "
            "ORDER BY gid, start_ns, uid",
            params={"files": _files(files)},
        ).to_arrow_reader(BATCH_ROWS)
        assert reader is not None
        for batch in reader:
            yield _numpy_columns(batch, columns)


def _blocks(
    files: Sequence[Path],
    gids: pl.Series,
    columns: list[str],
    start_key: Callable[[np.ndarray], np.ndarray] | None,
    con: duckdb.DuckDBPyConnection | None = None,
    batches: Iterable[dict[str, np.ndarray]] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`_stream`'s rows (or ``batches``, in the same order); with ``start_key`` (of
    ``start_ns``) that key as a column too, and the blocks re-cut so that none ends inside a run
    of equal (gid, start key)."""
    held: dict[str, np.ndarray] | None = None
    for batch in batches if batches is not None else _stream(files, gids, columns, con):
        if start_key is not None:
            batch["start_key"] = start_key(batch["start_ns"])
        if held is not None:
            batch = {k: np.concatenate([held[k], batch[k]]) for k in batch}
        n = batch["gid"].size
        if start_key is None or n == 0:
            cut = n
        else:
            g, t = batch["gid"], batch["start_key"]
            # the block ends after the last row that differs from the last one (before, the
            # equality was taken from the second row on and the cut fell one row early, inside
            # a run of one microsecond: a kept state then resumed after a row it never folded)
            same = (g == g[-1]) & (t == t[-1])
            changes = np.flatnonzero(~same)
            cut = int(changes[-1]) + 1 if changes.size else 0
            if cut == 0 and n:
                held = batch
                continue
        held = {k: v[cut:] for k, v in batch.items()} if cut < n else None
        yield {k: v[:cut] for k, v in batch.items()}
    if held is not None and held["gid"].size:
        yield held


def _merged(ordered: np.ndarray, more: np.ndarray) -> np.ndarray:
    """``ordered`` (sorted) and ``more`` as one sorted array: ``more`` sorted and placed between
    the ends still open, without sorting those again (a key with millions of spans in flight
    carries millions of open ends from chunk to chunk)."""
    more = np.sort(more)
    if not ordered.size:
        return more
    at = np.searchsorted(ordered, more, side="right") + np.arange(more.size)
    out = np.empty(ordered.size + more.size, dtype=np.int64)
    placed = np.zeros(out.size, dtype=bool)
    placed[at] = True
    out[at] = more
    out[~placed] = ordered
    return out


def _runs(block: dict[str, np.ndarray]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The block's rows per gid, in order (a gid may continue in the next block)."""
    g = block["gid"]
    bounds = [0, *(np.flatnonzero(g[1:] != g[:-1]) + 1).tolist(), g.size]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            yield int(g[a]), {k: v[a:b] for k, v in block.items()}


def overlap_shares(
    files: Sequence[Path], gids: pl.Series, t0: int, con: duckdb.DuckDBPyConnection | None = None
) -> pl.DataFrame:
    """(gid, share): per key, the share of spans (in start order) that started, at microsecond
    resolution from ``t0``, before the latest end of the spans that started before them."""
    gid_out: list[int] = []
    share_out: list[float] = []
    current: int | None = None
    carry = np.iinfo(np.int64).min
    overlapped = rows = 0

    def close() -> None:
        if current is not None:
            gid_out.append(current)
            share_out.append(overlapped / rows)

    for block in _blocks(files, gids, ["gid", "start_ns", "end_ns", "uid"], None, con):
        for gid, run in _runs(block):
            if gid != current:
                close()
                current, carry, overlapped, rows = gid, np.iinfo(np.int64).min, 0, 0
            start_key = (run["start_ns"] - t0) // 1000
            end_max = np.maximum.accumulate((run["end_ns"] - t0) // 1000)
            # the latest end before each row: of this chunk's earlier rows or of earlier chunks'
            before = np.maximum(np.concatenate([[carry], end_max[:-1]]), carry)
            overlapped += int(np.count_nonzero(start_key < before))
            rows += start_key.size
            carry = max(carry, int(end_max[-1]))
    close()
    return pl.DataFrame({"gid": gid_out, "share": share_out}, schema={"gid": pl.UInt64, "share": pl.Float64})


@dataclass
class _Group:
    gid: int
    started: int = 0
    ended: int = 0
    open_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    peak: int = 0
    queued: int = 0
    durations: list[np.ndarray] = field(default_factory=list)
    peers: list[np.ndarray] = field(default_factory=list)


def sweep(
    files: Sequence[Path],
    gids: pl.Series,
    t0: int,
    packed: bool,
    keep: tuple[int, float],
    con: duckdb.DuckDBPyConnection | None = None,
) -> pl.DataFrame:
    """(gid, duration_ns, peers) in (gid, start_ns, uid) order, for the keys whose spans reach
    ``keep`` = (peak peers, share of spans started with a peer in flight); ``peers`` as the
    in-memory sweep gives it: microsecond keys from ``t0`` when ``packed``, else nanoseconds,
    ends before starts at one instant, starts of one instant in ``uid`` order."""
    unit = 1000 if packed else 1
    kept: list[pl.DataFrame] = []
    group: _Group | None = None

    def close() -> None:
        if group is None or not group.started:
            return
        if group.peak >= keep[0] and group.queued / group.started >= keep[1]:
            kept.append(
                pl.DataFrame(
                    {
                        "gid": np.full(group.started, group.gid, dtype=np.uint64),
                        "duration_ns": np.concatenate(group.durations),
                        "peers": np.concatenate(group.peers),
                    }
                )
            )

    columns = ["gid", "start_ns", "end_ns", "duration_ns", "uid"]
    for block in _blocks(files, gids, columns, lambda start: (start - t0) // unit * 2 + 1, con):
        for gid, run in _runs(block):
            if group is None or gid != group.gid:
                close()
                group = _Group(gid)
            start_keys = run["start_key"]
            end_keys = (run["end_ns"] - t0) // unit * 2
            rank = np.empty(start_keys.size, dtype=np.int64)
            rank[np.lexsort((run["uid"], start_keys))] = np.arange(
                group.started + 1, group.started + start_keys.size + 1, dtype=np.int64
            )
            ends = _merged(group.open_ends, end_keys)
            peers = (rank - group.ended - np.searchsorted(ends, start_keys, side="left")).astype(np.int32)
            # the next chunk's starts are later than this one's last: ends before it are counted
            done = int(np.searchsorted(ends, start_keys[-1], side="left"))
            group.ended += done
            group.open_ends = ends[done:]
            group.started += start_keys.size
            group.peak = max(group.peak, int(peers.max()))
            group.queued += int(np.count_nonzero(peers >= 2))
            group.durations.append(run["duration_ns"])
            group.peers.append(peers)
    close()
    if not kept:
        return pl.DataFrame(schema={"gid": pl.UInt64, "duration_ns": pl.Int64, "peers": pl.Int32})
    return pl.concat(kept)


# -- one pass, resumed from saved sweep states (serve's rounds) ------------------------------------
#
# A span's ``peers`` and whether it overlapped an earlier one depend on the spans of its key that
# started at or before it (same microsecond from the clock's t0 included); a span starting in a
# later microsecond changes neither. So the state of the sweep of a key after every span starting
# before microsecond ``k`` — counters, the ends still open, the running maximum of ends, and the
# integer sums the load statistics are made of — is final as long as no span of the key starting
# before ``k`` arrives. :class:`BucketSweep` keeps such states (:class:`Carry`) per key beside a
# bucket's files, each with the files whose rows it folded (by name, inode, mtime and size: a
# batch extracted again is another file); a round resumes each key from its latest state that
# the files still hold and that no new file's rows start before, and streams only the rows
# starting from there. Everything is exact: the same integers as the whole pass, whatever state
# it resumed from (``tests/analysis/test_partitions.py``).

CHECKPOINT_ROWS = 1 << 14  # a key's rows between two kept sweep states
CHECKPOINTS = 48  # kept sweep states per key at most (the latest ones)
# A state with more spans in flight is not kept (its size is theirs): a key that busy is swept
# from an earlier state, or from its first row.
MAX_OPEN_ENDS = 1 << 12
_STATE_VERSION = 2
_NO_END = int(np.iinfo(np.int64).min)

Ident = tuple[str, int, int, int]


def _ident(path: Path) -> Ident:
    st = path.stat()
    return (path.name, st.st_ino, st.st_mtime_ns, st.st_size)


_IDENT_SCHEMA = {"name": pl.String, "ino": pl.UInt64, "mtime": pl.Int64, "size": pl.Int64}


def _idents(files: Sequence[Path]) -> pl.DataFrame:
    """:func:`_ident` of each file, as a frame (name, ino, mtime, size): columns, not a tuple of
    four objects per file held through the decision."""
    return pl.DataFrame([_ident(f) for f in files], schema=_IDENT_SCHEMA, orient="row")


def _places(table: pl.DataFrame, idents: pl.DataFrame) -> np.ndarray:
    """Each row of ``table``'s place in ``idents`` (-1: none)."""
    found = table.join(idents.with_row_index("at"), on=list(_IDENT_SCHEMA), how="left", maintain_order="left")
    return found["at"].fill_null(-1).to_numpy().astype(np.int64)


@dataclass(frozen=True)
class Carry:
    """The sweep of one key's rows (in (start_ns, uid) order) that start before microsecond
    ``key`` from t0: rows (``started``), ends counted before the last start (``ended``) and those
    still open, the latest end (µs) and the rows that started before it (``overlapped``: the
    busy pre-filter's share), the highest ``peers``, the rows with ``peers >= 2`` and the exact
    sums (duration d, peers p) Σd, Σd², Σp, Σp², Σdp of the load statistics."""

    key: int | None = None  # None: no row yet
    started: int = 0
    ended: int = 0
    open_ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    end_max: int = _NO_END
    overlapped: int = 0
    peak: int = 0
    queued: int = 0
    sums: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    def advanced(self, run: dict[str, np.ndarray], t0: int) -> Carry:
        """After ``run``: rows of this key in (start_ns, uid) order, whole microseconds, all
        starting at or after ``key``; the same integers as :func:`overlap_shares` and
        :func:`sweep` (packed) give over them."""
        start_us = (run["start_ns"] - t0) // 1000
        end_us = (run["end_ns"] - t0) // 1000
        end_max = np.maximum.accumulate(end_us)
        before = np.maximum(np.concatenate([np.array([self.end_max], np.int64), end_max[:-1]]), self.end_max)
        start_keys = start_us * 2 + 1
        rank = np.arange(self.started + 1, self.started + start_keys.size + 1, dtype=np.int64)
        tied = start_keys[1:] == start_keys[:-1]
        if tied.any():  # rows arrive in start order: only the starts of one microsecond go by uid
            among = np.zeros(start_keys.size, dtype=bool)
            among[1:] |= tied
            among[:-1] |= tied
            at = np.flatnonzero(among)
            rank[at[np.lexsort((run["uid"][at], start_keys[at]))]] = rank[at]
        ends = _merged(self.open_ends, end_us * 2)
        peers = rank - self.ended - np.searchsorted(ends, start_keys, side="left")
        done = int(np.searchsorted(ends, start_keys[-1], side="left"))
        sums = exact_sums(run["duration_ns"], peers)
        return Carry(
            key=int(start_us[-1]) + 1,
            started=self.started + start_keys.size,
            ended=self.ended + done,
            open_ends=ends[done:],
            end_max=max(self.end_max, int(end_max[-1])),
            overlapped=self.overlapped + int(np.count_nonzero(start_us < before)),
            peak=max(self.peak, int(peers.max())),
            queued=self.queued + int(np.count_nonzero(peers >= 2)),
            sums=(
                self.sums[0] + sums[0],
                self.sums[1] + sums[1],
                self.sums[2] + sums[2],
                self.sums[3] + sums[3],
                self.sums[4] + sums[4],
            ),
        )


_LIMB = 21  # bits: a product of two limbs summed over 2**20 rows fits in an int64


def _limbs(x: np.ndarray) -> list[np.ndarray]:
    """``x`` (int64, none negative) as three 21-bit limbs, lowest first."""
    mask = (1 << _LIMB) - 1
    return [x & mask, (x >> _LIMB) & mask, x >> (2 * _LIMB)]


def exact_sums(d: np.ndarray, p: np.ndarray) -> tuple[int, int, int, int, int]:
    """Σd, Σd², Σp, Σp², Σdp of two int64 columns, exact (Python integers): each column less its
    minimum, in 21-bit limbs whose products numpy sums 2**20 rows at a time without overflow."""
    if not d.size:
        return 0, 0, 0, 0, 0
    d0, p0 = int(d.min()), int(p.min())
    sd = sdd = sp = spp = sdp = 0  # of d - d0 and p - p0
    for i in range(0, d.size, 1 << 20):
        dl = _limbs(d[i : i + (1 << 20)].astype(np.int64) - d0)
        pl_ = _limbs(p[i : i + (1 << 20)].astype(np.int64) - p0)
        for j, x in enumerate(dl):
            sd += int(x.sum()) << (_LIMB * j)
        for j, x in enumerate(pl_):
            sp += int(x.sum()) << (_LIMB * j)
        for j, x in enumerate(dl):
            for k, y in enumerate(dl):
                sdd += int(np.dot(x, y)) << (_LIMB * (j + k))
            for k, y in enumerate(pl_):
                sdp += int(np.dot(x, y)) << (_LIMB * (j + k))
        for j, x in enumerate(pl_):
            for k, y in enumerate(pl_):
                spp += int(np.dot(x, y)) << (_LIMB * (j + k))
    n = d.size
    return (
        sd + n * d0,
        sdd + 2 * d0 * sd + n * d0 * d0,
        sp + n * p0,
        spp + 2 * p0 * sp + n * p0 * p0,
        sdp + d0 * sp + p0 * sd + n * d0 * p0,
    )


def _cuts(keys: np.ndarray, every: int) -> list[int]:
    """Where to cut a run of start keys into pieces of about ``every`` rows, between keys."""
    changes = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    cuts: list[int] = []
    last = 0
    while True:
        i = int(np.searchsorted(changes, last + every, side="left"))
        if i >= changes.size:
            return cuts
        last = int(changes[i])
        cuts.append(last)


_SUM_BYTES = 32  # an exact sum in a kept state: signed, little-endian (a larger one: state not kept)
_COUNTS = ("key", "started", "ended", "end_max", "overlapped", "peak", "queued")


def _no_states() -> dict[str, np.ndarray]:
    """Kept sweep states as columns, none: gid, the integer fields of :class:`Carry`, the five
    exact sums as bytes, the ends still open (all states' in one array, ``open_at`` the offsets)
    and ``folded``: which files of the bucket's table each state's rows came from."""
    states = {"gid": np.zeros(0, np.uint64)}
    states.update({name: np.zeros(0, np.int64) for name in _COUNTS})
    states["sums"] = np.zeros((0, 5 * _SUM_BYTES), np.uint8)
    states["open_at"] = np.zeros(1, np.int64)
    states["open_ends"] = np.zeros(0, np.int64)
    states["folded"] = np.zeros((0, 0), bool)
    return states


def _states_of(gids: list[int], carries: list[Carry], folded: np.ndarray) -> dict[str, np.ndarray]:
    """``carries`` (of keys ``gids``, each folding every file where ``folded`` is set) as columns;
    a carry whose sums do not fit ``_SUM_BYTES`` is left out (the key is swept from an earlier
    state then)."""
    kept = []
    sums = []
    for n, c in enumerate(carries):
        try:
            sums.append(b"".join(s.to_bytes(_SUM_BYTES, "little", signed=True) for s in c.sums))
        except OverflowError:
            continue
        kept.append(n)
    states = _no_states()
    if not kept:
        states["folded"] = np.zeros((0, folded.size), bool)
        return states
    chosen = [carries[n] for n in kept]
    states["gid"] = np.array([gids[n] for n in kept], dtype=np.uint64)
    for name in _COUNTS:
        states[name] = np.array([getattr(c, name) for c in chosen], dtype=np.int64)
    states["sums"] = np.frombuffer(b"".join(sums), dtype=np.uint8).reshape(len(kept), 5 * _SUM_BYTES)
    states["open_at"] = np.concatenate([[0], np.cumsum([c.open_ends.size for c in chosen])]).astype(np.int64)
    states["open_ends"] = np.concatenate([c.open_ends for c in chosen]).astype(np.int64)
    states["folded"] = np.broadcast_to(folded, (len(kept), folded.size)).copy()
    return states


def _taken(states: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The states at ``rows``, in that order."""
    out = {name: states[name][rows] for name in ("gid", *_COUNTS, "sums", "folded")}
    lengths = np.diff(states["open_at"])[rows]
    out["open_at"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    starts = states["open_at"][:-1][rows]
    at = np.repeat(starts - out["open_at"][:-1], lengths) + np.arange(int(lengths.sum()), dtype=np.int64)
    out["open_ends"] = states["open_ends"][at]
    return out


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {name: np.concatenate([p[name] for p in parts]) for name in ("gid", *_COUNTS, "sums", "open_ends")}
    out["folded"] = np.concatenate([p["folded"] for p in parts], axis=0)
    lengths = np.concatenate([np.diff(p["open_at"]) for p in parts])
    out["open_at"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return out


def _carry_at(states: dict[str, np.ndarray], row: int) -> Carry:
    raw = states["sums"][row].tobytes()
    a, b = int(states["open_at"][row]), int(states["open_at"][row + 1])
    return Carry(
        key=int(states["key"][row]),
        started=int(states["started"][row]),
        ended=int(states["ended"][row]),
        open_ends=states["open_ends"][a:b].copy(),
        end_max=int(states["end_max"][row]),
        overlapped=int(states["overlapped"][row]),
        peak=int(states["peak"][row]),
        queued=int(states["queued"][row]),
        sums=tuple(  # type: ignore[arg-type]
            int.from_bytes(raw[j * _SUM_BYTES : (j + 1) * _SUM_BYTES], "little", signed=True)
            for j in range(5)
        ),
    )


class BucketSweep:
    """One bucket's files, the per-file aggregates of each key (rows, operation, earliest and
    latest start, latest end) and the saved sweep states, read from ``state`` (None: nothing
    kept between decisions).

    What is kept lives across rounds of a long-lived process and is read and written every
    round, so it is held in columns (numpy arrays, one polars frame), not in Python objects per
    key, per state or per file: a state of the sweep is a row, the files it folded a row of
    booleans over the bucket's table of files (by name, inode, mtime and size)."""

    def __init__(self, files: Sequence[Path], state: Path | None, con: duckdb.DuckDBPyConnection) -> None:
        self.files = [f if isinstance(f, Path) else Path(f) for f in files]
        self.state = state
        self.idents = _idents(self.files)
        saved: dict[str, Any] = {}
        if state is not None and state.exists():
            try:
                loaded = pickle.loads(state.read_bytes())
                if isinstance(loaded, dict) and loaded.get("version") == _STATE_VERSION:
                    saved = loaded
            except Exception:  # a state cut short: swept again from the files
                saved = {}
        n = self.idents.height
        table: pl.DataFrame = saved["table"] if saved else pl.DataFrame(schema=_IDENT_SCHEMA)
        self.table = table  # the saved states' files: the current ones, then any other they folded
        self.to_current = _places(table, self.idents)
        aggregated = np.zeros(n, dtype=bool)
        parts: list[pl.DataFrame] = []
        if saved:
            done = self.to_current[saved["aggregated"]]
            aggregated[done[done >= 0]] = True
            aggs: pl.DataFrame = saved["aggs"]
            if aggs.height:
                file = self.to_current[aggs["file"].to_numpy()]
                parts.append(
                    aggs.with_columns(file=pl.Series(file.astype(np.int32))).filter(pl.col("file") >= 0)
                )
        missing = [f for f, done in zip(self.files, aggregated.tolist(), strict=True) if not done]
        if missing:
            table_ = con.sql(
                "SELECT filename, gid, op, count(*) AS n, min(start_ns) AS lo, max(end_ns) AS hi,"
                " max(start_ns) AS smax FROM read_parquet($files, filename = true) GROUP BY ALL",
                params={"files": _files(missing)},
            ).to_arrow_table()
            frame = pl.from_arrow(table_)
            assert isinstance(frame, pl.DataFrame)
            by_name = {str(f): i for i, f in enumerate(self.files)}
            parts.append(
                frame.cast(
                    {
                        "gid": pl.UInt64,
                        "op": pl.UInt64,
                        "n": pl.Int64,
                        "lo": pl.Int64,
                        "hi": pl.Int64,
                        "smax": pl.Int64,
                    }
                )
                .with_columns(file=pl.col("filename").replace_strict(by_name, return_dtype=pl.Int32))
                .drop("filename")
            )
        # every file's aggregates, ``file`` the file's place (one frame for all, not one per file)
        parts = [p for p in parts if p.height]
        self.all = pl.concat(parts) if parts else pl.DataFrame()
        self.t0: int | None = saved.get("t0")
        states = _no_states()
        if saved:
            states = dict(saved["states"])
            states["folded"] = np.unpackbits(states.pop("packed"), axis=1, count=table.height).astype(bool)
        self.states = states
        known = self.to_current >= 0
        # a state that folded a file no longer there is not resumed from (kept while its key is not decided)
        self.foreign: np.ndarray = np.asarray(states["folded"][:, ~known].any(axis=1))
        self.folded = np.zeros((states["gid"].size, n), dtype=bool)  # over the current files
        self.folded[:, self.to_current[known]] = states["folded"][:, known]

    def extents(self, excluded_ops: pl.Series | None, min_rows: int) -> pl.DataFrame | None:
        """:func:`group_extents` from the aggregates; None when a key holds rows of several
        operations (a 64-bit hash collision: the pre-filter is row by row then)."""
        schema = {"gid": pl.UInt64, "n": pl.Int64, "lo": pl.Int64, "hi": pl.Int64}
        if self.all.is_empty():
            return pl.DataFrame(schema=schema)
        if self.all.group_by("gid").agg(pl.col("op").n_unique())["op"].max() != 1:
            return None
        rows = self.all
        if excluded_ops is not None and excluded_ops.len():
            rows = rows.filter(~pl.col("op").is_in(excluded_ops.cast(pl.UInt64).implode()))
        return (
            rows.group_by("gid")
            .agg(pl.col("n").sum(), pl.col("lo").min(), pl.col("hi").max())
            .filter(pl.col("n") >= min_rows)
            .cast(schema)  # type: ignore[arg-type]
        )

    def sweep(self, con: duckdb.DuckDBPyConnection, gids: pl.Series, t0: int) -> dict[int, Carry]:
        """Each key's :class:`Carry` over all its rows (microseconds from ``t0``), resumed from
        the kept states; the states are then kept again (with ``state``)."""
        states = self.states if self.t0 == t0 else _no_states()
        same_t0 = self.t0 == t0
        gid_list = gids.to_list()
        per_key = (
            self.all.filter(pl.col("gid").is_in(gids.cast(pl.UInt64).implode())).sort("gid")
            if not self.all.is_empty()
            else pl.DataFrame(schema={"gid": pl.UInt64, "file": pl.Int32, "lo": pl.Int64, "smax": pl.Int64})
        )
        pk_gid = per_key["gid"].to_numpy()
        pk_file = per_key["file"].to_numpy().astype(np.int64)
        pk_lo = per_key["lo"].to_numpy()
        pk_smax = per_key["smax"].to_numpy()
        st_gid = states["gid"]
        st_order = np.argsort(st_gid, kind="stable")  # each key's states together, in kept order
        st_sorted = st_gid[st_order]
        st_key = states["key"]
        start: dict[int, Carry] = {}
        valid: list[np.ndarray] = []  # the rows of the states still valid, per key of the round
        wanted_gid: list[int] = []
        wanted_from: list[int] = []
        needed = np.zeros(len(self.files), dtype=bool)
        for gid in gid_list:
            a, b = np.searchsorted(pk_gid, gid, side="left"), np.searchsorted(pk_gid, gid, side="right")
            file, lo, smax = pk_file[a:b], pk_lo[a:b], pk_smax[a:b]
            c, d = np.searchsorted(st_sorted, gid, side="left"), np.searchsorted(st_sorted, gid, side="right")
            rows = st_order[c:d] if same_t0 else st_order[:0]
            if rows.size:
                # valid: every file folded is still there, and no other file of the key starts before it
                since_ns = t0 + st_key[rows] * 1000
                early = ~self.folded[rows][:, file] & (lo[None, :] < since_ns[:, None])
                rows = rows[~self.foreign[rows] & ~early.any(axis=1)]
            valid.append(rows)
            carry = _carry_at(states, int(rows[np.argmax(st_key[rows])])) if rows.size else Carry()
            start[gid] = carry
            since = _NO_END if carry.key is None else t0 + carry.key * 1000
            touched = file[smax >= since]
            if touched.size:
                needed[touched] = True
                wanted_gid.append(gid)
                wanted_from.append(since)
        result = dict(start)
        new: dict[int, list[Carry]] = {gid: [] for gid in wanted_gid}
        if wanted_gid:
            con.register(
                "wanted",
                # through polars: ``pa.array`` of Python ints imports pandas (a third of a second)
                pl.DataFrame(
                    {"gid": wanted_gid, "since": wanted_from}, schema={"gid": pl.UInt64, "since": pl.Int64}
                ).to_arrow(),
            )
            columns = ["gid", "start_ns", "end_ns", "duration_ns", "uid"]
            reader = con.sql(
                f"SELECT {', '.join('r.' + c for c in columns)} FROM read_parquet($files) r JOIN wanted w"
                " ON r.gid = w.gid WHERE r.start_ns >= w.since ORDER BY r.gid, r.start_ns, r.uid",
                params={"files": _files([self.files[f] for f in np.flatnonzero(needed).tolist()])},
            ).to_arrow_reader(BATCH_ROWS)
            assert reader is not None
            batches = (_numpy_columns(b, columns) for b in reader)
            blocks = _blocks([], gids, columns, lambda start: (start - t0) // 1000, batches=batches)
            for block in blocks:
                for gid, run in _runs(block):
                    carry = result[gid]
                    cuts = [*_cuts(run["start_key"], CHECKPOINT_ROWS), run["gid"].size]
                    a = 0
                    for b in cuts:
                        if b <= a:
                            continue
                        if carry.open_ends.size > MAX_OPEN_ENDS:  # no state kept: the rest at once
                            b = run["gid"].size  # (each piece sorts the ends still open)
                        carry = carry.advanced({k: v[a:b] for k, v in run.items()}, t0)
                        a = b
                        if carry.open_ends.size <= MAX_OPEN_ENDS:  # a state stays small
                            kept_here = new[gid]
                            kept_here.append(carry)
                            if len(kept_here) > 2 * CHECKPOINTS:
                                del kept_here[:-CHECKPOINTS]
                    result[gid] = carry
            con.unregister("wanted")
        if self.state is not None:
            self._keep(states, gid_list, valid, new, t0)
        return result

    def _keep(
        self,
        states: dict[str, np.ndarray],
        gid_list: list[int],
        valid: list[np.ndarray],
        new: dict[int, list[Carry]],
        t0: int,
    ) -> None:
        """Saves the latest ``CHECKPOINTS`` states of each key of the round (those still valid
        and the new ones, which folded every current file) and the kept ones of other keys."""
        n = self.idents.height
        round_gids = np.array(gid_list, dtype=np.uint64)
        others = np.flatnonzero(~np.isin(states["gid"], round_gids))
        # the table: the current files, then the others the kept states folded
        old = np.flatnonzero(self.to_current < 0)
        old = old[states["folded"][others][:, old].any(axis=0)] if others.size else old[:0]
        width = n + old.size
        folded_all = np.zeros(width, dtype=bool)
        folded_all[:n] = True
        new_gids = [g for g, cs in new.items() for _ in cs]
        fresh = _states_of(new_gids, [c for cs in new.values() for c in cs], folded_all)
        kept_rows = np.concatenate([others, *valid]).astype(np.int64)
        kept = _taken(states, kept_rows)
        folded = np.zeros((kept_rows.size, width), dtype=bool)
        folded[:, :n] = self.folded[kept_rows]
        folded[:, n:] = states["folded"][kept_rows][:, old]
        kept["folded"] = folded
        both = _joined([kept, fresh])
        # per key of the round: its valid states then its new ones, by key (stable), the latest ones
        of_round = np.arange(both["gid"].size) >= others.size
        order = np.lexsort((np.arange(both["gid"].size), both["key"], both["gid"]))
        g = both["gid"][order]
        from_end = np.searchsorted(g, g, side="right") - np.arange(g.size)  # 1 for a key's latest
        chosen = order[~of_round[order] | (from_end <= CHECKPOINTS)]
        saved = _taken(both, chosen)
        saved["packed"] = np.packbits(saved.pop("folded"), axis=1)
        self._save(
            {
                "version": _STATE_VERSION,
                "t0": t0,
                "table": pl.concat([self.idents, self.table.select(pl.all().gather(old))]),
                "aggregated": np.arange(width) < n,
                "aggs": self.all,
                "states": saved,
            }
        )

    def _save(self, value: object) -> None:
        assert self.state is not None
        unfinished = self.state.with_name(f".{self.state.name}.{os.getpid()}.tmp")
        unfinished.write_bytes(pickle.dumps(value, protocol=5))
        os.replace(unfinished, self.state)
