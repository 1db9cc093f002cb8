"""``DuckDBSpanStore.arrival_bounds``: the ingest ranges a rebuild of the incremental analysis'
per-trace figures reads one at a time hold about the rows asked for, also where many rows share
one ingest time (every row of a request does): none empty, none larger than asked but for the
rows of its last ingest time, which are never split."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector.duckdb_store import DuckDBSpanStore
from tests.builders import TraceBuilder, spans_table


def _template() -> pa.Table:
    b = TraceBuilder(service="svc")
    b.span("op", start_ms=0, dur_ms=1)
    return spans_table(b)


def _rows(stamps: list[int]) -> pa.Table:
    """A row per stamp (its ingest time), each a span of a trace of its own."""
    table = _template().take([0] * len(stamps))
    for name, values in {
        "trace_id": pa.array([f"{i + 1:032x}" for i in range(len(stamps))]),
        "ingested_ns": pa.array(stamps, pa.int64()),
    }.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def _sizes(stamps: list[int], bounds: list[int]) -> list[int]:
    return [sum(lo <= s < hi for s in stamps) for lo, hi in zip([0, *bounds], [*bounds, 2**62], strict=True)]


def _check(stamps: list[int], bounds: list[int], rows: int) -> None:
    assert bounds == sorted(set(bounds))
    sizes = _sizes(stamps, bounds)
    assert sum(sizes) == len(stamps) and min(sizes) > 0, sizes  # no range empty
    edges = [0, *bounds, 2**62]
    for lo, hi in itertools.pairwise(edges):
        inside = sorted(s for s in stamps if lo <= s < hi)
        last = inside[-1]
        assert sum(s != last for s in inside) < rows, (lo, hi)  # but for its last ingest time
    if len(stamps) > rows:  # as many ranges as the ingest times allow
        assert len(bounds) >= len(stamps) // (rows + max(stamps.count(s) for s in set(stamps))) - 1


def test_requests_of_many_rows_each(tmp_path: Path) -> None:
    stamps = [1000 + i for i in range(3) for _ in range(600)]  # three requests of 600 spans
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        store.write(_rows(stamps))
        bounds = store.arrival_bounds(500)
        assert bounds == [1001, 1002]  # a sample's quantiles gave [1000, 1001, 1002]: the first range empty
        _check(stamps, bounds, 500)
        assert store.arrival_bounds(2000) == []  # one range holds every row


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ranges_of_about_the_rows_asked_whatever_the_requests(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    stamps: list[int] = []
    at = 10**18
    while len(stamps) < 30_000:  # more rows than a sample of 20,000 held
        at += rng.randint(1, 10**6)
        stamps += [at] * rng.choice([1, 1, 5, 40, 300, 2500])
    rng.shuffle(stamps)  # as stored: not in ingest order
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        store.write(_rows(stamps))
        for rows in (1, 700, 4000, 29_999):
            _check(stamps, store.arrival_bounds(rows), rows)
