"""``DuckDBSpanStore.stats()`` counts traces from the rows since its last count (the traces of
the rows below a cut kept from before, ``_count_traces``), not by grouping every stored row by
trace each time: the count equals a whole-table count after writes of new traces, late spans of
old ones, duplicate copies and their compaction, retention, and rows written below the cut."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.collector import duckdb_store
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import SPAN_SCHEMA
from tests.builders import repeated_trace, spans_table, spec

S = 10**9
T0 = 1_760_000_000 * S
TEMPLATE = spans_table(repeated_trace(1, "svc", spec("GET /a", 0, 10))).to_pylist()[0]


def _rows(rows: list[tuple[int, int, int, int]]) -> pa.Table:
    """(trace, span, ingested_ns, end_ns) rows."""
    return pa.Table.from_pylist(
        [
            {
                **TEMPLATE,
                "trace_id": f"{t:032x}",
                "span_id": f"{s:016x}",
                "ingested_ns": i,
                "start_ns": e - 1,
                "end_ns": e,
            }
            for t, s, i, e in rows
        ],
        schema=SPAN_SCHEMA,
    )


def _whole(store: DuckDBSpanStore) -> int:
    return int(store._writer.execute("SELECT count(DISTINCT trace_id) FROM spans").fetchall()[0][0])


def test_trace_count_from_the_rows_since_the_cut_equals_the_whole_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(duckdb_store, "TRACE_CUT_LAG_NS", 3 * S)
    rng = random.Random(5)
    spans: dict[int, int] = {}
    next_trace, kept_counts, whole_counts = 1, 0, 0
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        assert store.stats().traces == 0
        for k in range(1, 60):
            now = T0 + k * S
            writes = []
            for _ in range(rng.randint(0, 3)):  # new traces
                t, next_trace = next_trace, next_trace + 1
                for _ in range(rng.randint(1, 3)):
                    spans[t] = spans.get(t, 0) + 1
                    writes.append((t, spans[t], now + rng.randint(0, S - 1), now))
            for t in rng.sample(sorted(spans), min(2, len(spans))):  # late spans of older traces
                spans[t] += 1
                writes.append((t, spans[t], now, now))
            if k % 9 == 4 and spans:  # copies of spans, compacted later
                t = rng.choice(sorted(spans))
                writes.append((t, 1, now, now))
            if k % 13 == 7:  # a new trace and a late span written below the cut (an import)
                t, next_trace = next_trace, next_trace + 1
                spans[t] = 1
                writes += [(t, 1, T0, T0), (min(spans), spans[min(spans)] + 1, T0, T0)]
                spans[min(spans)] += 1
            if writes:
                store.write(_rows(writes))
            if k % 5 == 0:
                store.compact()
            if k % 17 == 0:  # retention: whole traces whose spans all ended before the cutoff
                store.delete_older_than(now - 20 * S)
            if k % 2 or k % 17 == 0:
                counted = store.stats().traces
                assert counted == _whole(store), k
                kept_counts += store._traces_below is not None
                whole_counts += 1
        assert kept_counts >= whole_counts // 2  # the counts mostly started from a kept cut
