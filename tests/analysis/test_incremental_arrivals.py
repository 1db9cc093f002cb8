"""A round's arrivals read from the store's recent rows only (``recent_arrivals``), merged with the
per-trace figures the sidecar keeps of the older rows (``IncrementalAnalysis._arrivals``), equal
the whole-store read (``trace_arrivals``) round after round, and the rounds decide the same: late
spans within the margin, spans ingested exactly at a round's cutoff or re-read bound, duplicate
copies removed by compaction, retention (and spans of a trace arriving after retention removed
it), deferred traces, a sidecar reopened, and an older sidecar without the figures."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis.incremental import IncrementalAnalysis, sidecar_path
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import SPAN_SCHEMA
from tests.builders import repeated_trace, spans_table, spec

# (their reference states are not closed: temporary folders in the tests' own)
pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("temp_in_tmp_path")]

S = 10**9
MARGIN = 5 * S
T0 = 1_760_000_000 * S
TEMPLATE = spans_table(repeated_trace(1, "svc", spec("GET /a", 0, 10))).to_pylist()[0]


def _rows(rows: list[tuple[int, int, int, int, int]]) -> pa.Table:
    """(trace, span, ingested_ns, start_ns, end_ns) rows."""
    return pa.Table.from_pylist(
        [
            {
                **TEMPLATE,
                "trace_id": f"{t:032x}",
                "span_id": f"{s:016x}",
                "ingested_ns": i,
                "start_ns": a,
                "end_ns": b,
            }
            for t, s, i, a, b in rows
        ],
        schema=SPAN_SCHEMA,
    )


def _traces(state: IncrementalAnalysis) -> list[tuple[Any, ...]]:
    return state.db.execute("SELECT * FROM traces ORDER BY trace_id").fetchall()


def _outcome(state: IncrementalAnalysis, figures: Any) -> tuple[Any, ...]:
    done = {k: v for k, v in figures.as_dict().items() if k != "seconds"}
    return done, _traces(state), state.watermark


@pytest.mark.parametrize("ranged", [False, True], ids=["one-read", "rebuilt-by-ingest-ranges"])
def test_recent_arrivals_merged_with_the_kept_figures_equal_the_whole_store_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ranged: bool
) -> None:
    """``ranged``: the rebuilds read the store's rows by ingest ranges of a few rows each
    (``arrival_bounds``), into the tally range by range, then the rest as one read."""
    from hourglass.analysis import incremental

    monkeypatch.setattr(incremental, "REBUILD_RANGE_ROWS", 7)
    rng = random.Random(11)
    ranges: list[tuple[int, int]] = []  # the ingest ranges read into the tally by a rebuild
    db = tmp_path / "spans.duckdb"
    starts: list[int] = []  # the ``since`` of each read of the recent rows
    compactions_removing = 0
    with DuckDBSpanStore(str(db)) as store:
        # the reference: every round totals its traces over the whole store
        whole = IncrementalAnalysis(None, batch_spans=12, max_round_spans=25)
        checked = 0

        def recent(since_ns: int, splits: list[int], until_ns: int | None = None) -> pa.Table:
            starts.append(since_ns)
            if until_ns is not None:
                ranges.append((since_ns, until_ns))
                return store.recent_arrivals(since_ns, splits, until_ns)
            return store.recent_arrivals(since_ns, splits)

        recounts: list[int] = []  # the traces retention may have removed, counted again

        def between(trace_ids: list[str], from_ns: int, to_ns: int) -> pa.Table:
            recounts.append(len(trace_ids))
            return store.arrivals_between(trace_ids, from_ns, to_ns)

        def open_state() -> IncrementalAnalysis:
            state = IncrementalAnalysis(sidecar_path(str(db)), batch_spans=12, max_round_spans=25)
            real = state._arrivals

            def merged(reads: Any, since_ns: int, margin_ns: int) -> pl.DataFrame:
                nonlocal checked
                seen = real(reads, since_ns, margin_ns)
                expected = pl.from_arrow(store.trace_arrivals(since_ns))
                assert isinstance(expected, pl.DataFrame)
                assert seen.equals(expected), (since_ns, seen, expected)
                checked += 1
                return seen

            monkeypatch.setattr(state, "_arrivals", merged)
            return state

        kept = open_state()
        traces: dict[int, int] = {}  # trace -> spans written (its last span id)
        next_trace = 1
        for k in range(1, 41):
            cutoff = T0 + k * 10 * S
            since = max(kept.watermark - MARGIN, 0)
            writes: list[tuple[int, int, int, int, int]] = []
            for _ in range(rng.randint(1, 4)):  # new traces, some still arriving at the cutoff
                t, next_trace = next_trace, next_trace + 1
                ingested = cutoff - rng.randint(-3 * S, 12 * S)
                for _ in range(rng.randint(1, 5)):
                    traces[t] = traces.get(t, 0) + 1
                    at = T0 + k * 10 * S + rng.randint(0, S)
                    writes.append((t, traces[t], ingested + rng.randint(0, S), at, at + rng.randint(1, S)))
            if traces and k > 1:
                # a late span of a stored trace: within the margin before the last cutoff, at the
                # re-read bound (the last cutoff minus the margin), at the last cutoff, at this cutoff
                edge = kept.watermark
                for ingested in (edge - rng.randint(1, MARGIN - 1), since, edge, cutoff, cutoff - 1):
                    t = rng.choice(sorted(traces))
                    traces[t] += 1
                    at = T0 + k * 10 * S
                    writes.append((t, traces[t], ingested, at, at + S))
            store.write(_rows(writes))
            if k % 7 == 3 and traces:  # an exporter's retry: copies of spans
                for t in rng.sample(sorted(traces), 2):
                    store.write(_rows([(t, 1, cutoff - S, T0, T0 + S)]))
            if k % 7 == 6 and store.compact() > 0:  # the copies removed, counted rounds ago
                compactions_removing += 1
            if k % 6 == 0:  # retention: whole traces whose spans all ended before its cutoff
                store.delete_older_than(T0 + (k - 9) * 10 * S)
                if traces:  # a span of a trace retention may just have removed
                    t = min(traces)
                    traces[t] += 1
                    writes = [(t, traces[t], cutoff - 2 * S, T0 + k * 10 * S, T0 + k * 10 * S + S)]
                    store.write(_rows(writes))
            if k == 20:  # a restart of the worker: the sidecar reopened, its figures kept
                kept.close()
                kept = open_state()
            if k == 25:  # a restart of serve: the store closed and opened again, as it was
                store.close()
                store = DuckDBSpanStore(str(db))
            retention = store.retention_cutoff_ns
            a = whole.update(
                store.trace_arrivals, cutoff_ns=cutoff, margin_ns=MARGIN, retention_cutoff_ns=retention
            )
            b = kept.update(
                store.trace_arrivals,
                cutoff_ns=cutoff,
                margin_ns=MARGIN,
                retention_cutoff_ns=retention,
                # the first rounds as an older worker ran them: no figures kept
                recent=(
                    None
                    if k <= 2
                    else (recent, between, store.arrival_bounds)
                    if ranged
                    else (recent, between)
                ),
            )
            assert _outcome(kept, b) == _outcome(whole, a), k
        assert checked == 38
        # the recent rows only, but once after the older rounds and once after the store's first
        # compaction (it examines every trace: the store does not know which were compacted
        # before it was opened); later compactions and retention: the traces they may have
        # changed counted again. Not after the store's restart: its clean close kept what the
        # next open needs (``DuckDBSpanStore._seal``), so the kept figures stay valid
        assert starts.count(0) == 2
        if ranged:  # each rebuild read ranges from 0, each starting where the previous ended
            assert len(ranges) >= 4 and [r for r in ranges if r[0] == 0] and all(a < b for a, b in ranges)
            assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1) if ranges[i + 1][0])
        else:
            assert not ranges
        assert compactions_removing >= 2
        assert len(recounts) >= 3 + compactions_removing and all(recounts)
        whole.close()
        kept.close()
        store.close()


def test_recent_arrivals_parts_split_rows_at_the_bounds(tmp_path: Path) -> None:
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        store.write(
            _rows([(1, 1, 10, 1, 2), (1, 2, 20, 1, 3), (1, 3, 30, 1, 4), (2, 1, 29, 5, 6), (3, 1, 9, 1, 1)])
        )
        got = store.recent_arrivals(10, [20, 30]).to_pylist()
        assert [(r["trace_id"][-1], r["part"], r["spans"], r["last_end_ns"]) for r in got] == [
            ("1", 0, 1, 2),
            ("1", 1, 1, 3),
            ("1", 2, 1, 4),
            ("2", 1, 1, 6),
        ]
        with pytest.raises(ValueError, match="ascend"):
            store.recent_arrivals(0, [30, 20])
        # a range's end: its rows only (the trace read in part, as the rebuild's ranges do)
        got = store.recent_arrivals(10, [30], 30).to_pylist()
        assert [(r["trace_id"][-1], r["part"], r["spans"], r["last_end_ns"]) for r in got] == [
            ("1", 0, 2, 3),
            ("2", 0, 1, 6),
        ]


def test_arrival_bounds_split_the_rows_into_ingest_ranges(tmp_path: Path) -> None:
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as store:
        assert store.arrival_bounds(10) == []  # empty
        store.write(_rows([(t, s, 1000 + 10 * t + s, 1, 2) for t in range(1, 101) for s in range(1, 5)]))
        assert store.arrival_bounds(400) == []  # one range holds every row
        bounds = store.arrival_bounds(50)  # 400 rows: 8 ranges, 7 bounds
        assert bounds == sorted(set(bounds)) and 4 <= len(bounds) <= 7
        ingested = [1000 + 10 * t + s for t in range(1, 101) for s in range(1, 5)]
        sizes = [
            sum(lo <= i < hi for i in ingested) for lo, hi in zip([0, *bounds], [*bounds, 2**62], strict=True)
        ]
        assert sum(sizes) == 400 and max(sizes) <= 150, sizes  # sampled, so about 50 each
        with pytest.raises(ValueError, match="positive"):
            store.arrival_bounds(0)
