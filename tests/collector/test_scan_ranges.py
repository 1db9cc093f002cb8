"""``DuckDBSpanStore.scan_traces(ingested_ranges=...)``: whole traces by id read within their
ingest-time ranges (serve's incremental rounds read the exemplars' traces this way instead of
looking at every stored trace id) give the same rows as ``scan(trace_ids=...)``."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from hourglass.collector.duckdb_store import DuckDBSpanStore, _merge_ranges
from hourglass.collector.schema import SPAN_COLUMNS
from tests.builders import repeated_trace, spans_table, spec

KEYS = [("trace_id", "ascending"), ("span_id", "ascending")]


def _ingested_at(table: pa.Table, ns: int) -> pa.Table:
    at = table.schema.get_field_index("ingested_ns")
    return table.set_column(at, "ingested_ns", pa.array([ns] * table.num_rows, pa.int64()))


def test_traces_read_within_their_ingest_ranges_are_the_traces_read_by_id(tmp_path: Path) -> None:
    groups = [
        spans_table(repeated_trace(50, f"svc{g}", spec("GET /a", 0, 10), spec("SELECT", 1, 5)))
        for g in range(3)
    ]
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        for g, table in enumerate(groups):
            store.write(_ingested_at(table, (g + 1) * 10**9))
        store.write(_ingested_at(groups[0].slice(0, 4), 4 * 10**9))  # an exporter's retry: copies
        arrivals = store.trace_arrivals(0).to_pylist()
        bounds = {r["trace_id"]: (r["first_ingested_ns"], r["last_ingested_ns"]) for r in arrivals}
        # a trace of the first group not retried (ingested at 1 s only) and one of the third (3 s)
        ids = [groups[0]["trace_id"][10].as_py(), groups[2]["trace_id"][0].as_py()]
        assert bounds[ids[0]] == (10**9, 10**9) and bounds[ids[1]] == (3 * 10**9, 3 * 10**9)
        ids += random.Random(1).sample(sorted(bounds), 10)
        expected = store.scan(trace_ids=ids, columns=SPAN_COLUMNS).sort_by(KEYS)
        got = store.scan_traces(ids, ingested_ranges=[bounds[t] for t in ids], columns=SPAN_COLUMNS)
        assert got.sort_by(KEYS).equals(expected)
        assert got.num_rows == 2 * len(set(ids))  # the copies of the retried export read once

        # the ranges bound the read: the third group's trace is outside the first group's range
        first_only = store.scan_traces(ids[:2], ingested_ranges=[bounds[ids[0]]], columns=SPAN_COLUMNS)
        assert set(first_only["trace_id"].to_pylist()) == {ids[0]}
        assert pc.max(first_only["ingested_ns"]).as_py() <= bounds[ids[0]][1]


def test_merged_ranges_cover_every_given_range_within_the_bound() -> None:
    rng = random.Random(7)
    ranges = [(a, a + rng.randint(0, 50)) for a in rng.sample(range(10**6), 2_000)]
    for most in (1, 5, 64, 5_000):
        merged = _merge_ranges(ranges, most)
        assert len(merged) <= most
        assert merged == sorted(merged) and all(a <= b for a, b in merged)
        assert all(merged[i][1] < merged[i + 1][0] for i in range(len(merged) - 1))
        for first, last in ranges:
            assert any(a <= first and last <= b for a, b in merged)
    assert _merge_ranges([(5, 6), (1, 3), (2, 4)], 64) == [(1, 4), (5, 6)]
