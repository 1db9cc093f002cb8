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

import itertools
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa

BATCH_ROWS = 1 << 18  # rows per record batch read from DuckDB (tests lower it to cross chunk cuts)
MEMORY_LIMIT = "256MB"  # DuckDB's own, for the sort (it spills to the bucket folder beyond it)


def _connect(files: Sequence[Path]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    con.execute("SET threads = 2")
    con.execute("SET preserve_insertion_order = false")
    con.execute(f"SET temp_directory = '{tempfile.mkdtemp(prefix='sort-', dir=Path(files[0]).parent)}'")
    return con


def _files(files: Sequence[Path]) -> list[str]:
    return [str(f) for f in files]


def group_extents(files: Sequence[Path], excluded_ops: pl.Series | None, min_rows: int) -> pl.DataFrame:
    """(gid, n, lo, hi) of the keys with at least ``min_rows`` rows whose ``op`` is not excluded:
    rows, earliest start, latest end."""
    con = _connect(files)
    try:
        where = ""
        if excluded_ops is not None and excluded_ops.len():
            con.register("excluded", pa.table({"op": excluded_ops.cast(pl.UInt64).to_arrow()}))
            where = "WHERE op NOT IN (SELECT op FROM excluded)"
        table = con.sql(
            f"SELECT gid, count(*) AS n, min(start_ns) AS lo, max(end_ns) AS hi FROM read_parquet($files) {where} "
            "GROUP BY gid HAVING count(*) >= $min_rows",
            params={"files": _files(files), "min_rows": min_rows},
        ).to_arrow_table()
    finally:
        con.close()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame.cast({"gid": pl.UInt64, "n": pl.Int64, "lo": pl.Int64, "hi": pl.Int64})


def _stream(files: Sequence[Path], gids: pl.Series, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``gids`` in (gid, start_ns, uid) order, a record batch at a time."""
    con = _connect(files)
    try:
        con.register("wanted", pa.table({"gid": gids.cast(pl.UInt64).to_arrow()}))
        reader = con.sql(
            f"SELECT {', '.join(columns)} FROM read_parquet($files) WHERE gid IN (SELECT gid FROM wanted) "
            "ORDER BY gid, start_ns, uid",
            params={"files": _files(files)},
        ).to_arrow_reader(BATCH_ROWS)
        assert reader is not None
        for batch in reader:
            yield {name: batch.column(name).to_numpy() for name in columns}
    finally:
        con.close()


def _blocks(
    files: Sequence[Path],
    gids: pl.Series,
    columns: list[str],
    start_key: Callable[[np.ndarray], np.ndarray] | None,
) -> Iterator[dict[str, np.ndarray]]:
    """:func:`_stream`'s rows; with ``start_key`` (of ``start_ns``) that key as a column too, and
    the blocks re-cut so that none ends inside a run of equal (gid, start key)."""
    held: dict[str, np.ndarray] | None = None
    for batch in _stream(files, gids, columns):
        if start_key is not None:
            batch["start_key"] = start_key(batch["start_ns"])
        if held is not None:
            batch = {k: np.concatenate([held[k], batch[k]]) for k in batch}
        n = batch["gid"].size
        if start_key is None or n == 0:
            cut = n
        else:
            g, t = batch["gid"], batch["start_key"]
            same = (g[1:] == g[-1]) & (t[1:] == t[-1])  # rows equal to the last one, from the end
            changes = np.flatnonzero(~same)
            cut = int(changes[-1]) + 1 if changes.size else 0
            if cut == 0 and n:
                held = batch
                continue
        held = {k: v[cut:] for k, v in batch.items()} if cut < n else None
        yield {k: v[:cut] for k, v in batch.items()}
    if held is not None and held["gid"].size:
        yield held


def _runs(block: dict[str, np.ndarray]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The block's rows per gid, in order (a gid may continue in the next block)."""
    g = block["gid"]
    bounds = [0, *(np.flatnonzero(g[1:] != g[:-1]) + 1).tolist(), g.size]
    for a, b in itertools.pairwise(bounds):
        if b > a:
            yield int(g[a]), {k: v[a:b] for k, v in block.items()}


def overlap_shares(files: Sequence[Path], gids: pl.Series, t0: int) -> pl.DataFrame:
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

    for block in _blocks(files, gids, ["gid", "start_ns", "end_ns", "uid"], None):
        for gid, run in _runs(block):
            if gid != current:
                close()
                current, carry, overlapped, rows = gid, np.iinfo(np.int64).min, 0, 0
            start_key = (run["start_ns"] - t0) // 1000
            end_max = np.maximum.accumulate((run["end_ns"] - t0) // 1000)
            before = np.concatenate([[carry], end_max[:-1]])
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
    for block in _blocks(files, gids, columns, lambda start: (start - t0) // unit * 2 + 1):
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
            ends = np.sort(np.concatenate([group.open_ends, end_keys]))
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
