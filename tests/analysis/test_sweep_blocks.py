"""``_sweep._blocks`` never ends a block inside a run of one (key, microsecond): a sweep state
kept at a block's end must have folded every row of its last microsecond, or a later round that
resumes from it skips a row for good (found by review: keys [10, 20, 456, 456, 460] were cut
after the first 456)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl

from hourglass.analysis.detectors import _sweep

T0 = 1_764_000_000_000_000_000


def test_no_block_ends_inside_a_run_of_one_key_and_microsecond() -> None:
    rng = np.random.default_rng(5)
    gids = np.sort(rng.integers(1, 4, 400)).astype(np.uint64)
    keys = np.concatenate([np.sort(rng.integers(0, 40, (gids == g).sum())) for g in np.unique(gids)])
    batches = [
        {"gid": gids[i : i + 17], "start_ns": T0 + keys[i : i + 17] * 1000 + 500}
        for i in range(0, gids.size, 17)
    ]
    blocks = list(
        _sweep._blocks(
            [], pl.Series([1, 2, 3], dtype=pl.UInt64), [], lambda s: (s - T0) // 1000, batches=batches
        )
    )
    assert sum(b["gid"].size for b in blocks) == gids.size
    for before, after in itertools.pairwise(blocks):
        assert (before["gid"][-1], before["start_key"][-1]) != (after["gid"][0], after["start_key"][0])
    cut = list(
        _sweep._blocks(
            [],
            pl.Series([7], dtype=pl.UInt64),
            [],
            lambda s: (s - T0) // 1000,
            batches=[
                {"gid": np.full(5, 7, np.uint64), "start_ns": T0 + np.array([10, 20, 456, 456, 460]) * 1000}
            ],
        )
    )
    assert [b["start_key"].tolist() for b in cut] == [[10, 20, 456, 456], [460]]


def test_a_resumed_sweep_counts_the_rows_of_a_microsecond_cut_before(tmp_path: Path) -> None:
    """Round 1 keeps a state after [10, 20, 456.0, 456.5, 460] µs; round 2 adds a row at
    458 µs and resumes: the same counts and sums as a fresh pass over both files."""

    def write(name: str, us: list[float], uid0: int) -> Path:
        starts = [T0 + int(u * 1000) for u in us]
        pl.DataFrame(
            {
                "gid": [7] * len(starts),
                "op": [1] * len(starts),
                "start_ns": starts,
                "end_ns": [s + 100 for s in starts],
                "duration_ns": [100] * len(starts),
                "uid": list(range(uid0, uid0 + len(starts))),
            },
            schema_overrides={"gid": pl.UInt64, "op": pl.UInt64, "uid": pl.UInt64},
        ).write_parquet(tmp_path / name)
        return tmp_path / name

    a = write("p000000.parquet", [10, 20, 456.0, 456.5, 460], 0)
    gids = pl.Series([7], dtype=pl.UInt64)
    state = tmp_path / "sweep.state"
    with _sweep.connection(tmp_path) as con:
        _sweep.BucketSweep([a], state, con).sweep(con, gids, T0)
    b = write("p000001.parquet", [458], 100)
    with _sweep.connection(tmp_path) as con:
        resumed = _sweep.BucketSweep([a, b], state, con).sweep(con, gids, T0)[7]
        fresh = _sweep.BucketSweep([a, b], None, con).sweep(con, gids, T0)[7]
    assert resumed.started == fresh.started == 6
    assert resumed.sums == fresh.sums
    assert (resumed.peak, resumed.queued, resumed.overlapped) == (fresh.peak, fresh.queued, fresh.overlapped)
