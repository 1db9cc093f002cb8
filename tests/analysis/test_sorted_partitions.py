"""``sorted_partitions``: the fan-out detectors' decisions split their occurrence rows by signature
in order one partition at a time; the partitions must be those of filter, sort, partition_by."""

from __future__ import annotations

import random

import polars as pl
import pytest

from hourglass.analysis.detectors._common import sorted_partitions


def frame(seed: int, rows: int) -> pl.DataFrame:
    rng = random.Random(seed)
    return pl.DataFrame(
        {
            "service": [
                rng.choice(["a", "b", None, "a long service name of more than twelve bytes"])
                for _ in range(rows)
            ],
            "name": [rng.choice(["GET", "q"]) for _ in range(rows)],
            "start": [rng.randrange(5) for _ in range(rows)],
            "trace_id": [f"{rng.randrange(1 << 64):016x}" for _ in range(rows)],
            "k": [rng.randrange(4) for _ in range(rows)],
            "ids": [[f"{i:04x}" for i in range(rng.randrange(3))] for _ in range(rows)],
        }
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("keep", [None, pl.col("k") >= 2, pl.col("k") > 9])
def test_sorted_partitions_are_those_of_filter_sort_partition_by(seed: int, keep: pl.Expr | None) -> None:
    f = frame(seed, [0, 1, 7, 300][seed % 4])
    by, order = ["service", "name"], ["start", "trace_id"]
    expected = (f if keep is None else f.filter(keep)).sort(order).partition_by(by, maintain_order=True)
    got = list(sorted_partitions(f, by, order, keep))
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.equals(e)
