"""A rebuild of the incremental analysis' per-trace figures (the tally), read from the store range
by range, that is cut short (the worker killed or a read failing) resumes where its committed
ranges reached, when the store removed no rows since; otherwise it starts over. Either way the
round decides as a round over the whole store does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hourglass.analysis import incremental
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


def _rows(rows: list[tuple[int, int, int]]) -> pa.Table:
    """(trace, span, ingested_ns) rows, each span 1 s long starting at its trace's ingest time."""
    return pa.Table.from_pylist(
        [
            {
                **TEMPLATE,
                "trace_id": f"{t:032x}",
                "span_id": f"{s:016x}",
                "ingested_ns": i,
                "start_ns": i,
                "end_ns": i + S,
            }
            for t, s, i in rows
        ],
        schema=SPAN_SCHEMA,
    )


class Cut(Exception):
    """The round cut short."""


def _outcome(state: IncrementalAnalysis, figures: Any) -> tuple[Any, ...]:
    done = {k: v for k, v in figures.as_dict().items() if k != "seconds"}
    traces = state.db.execute("SELECT * FROM traces ORDER BY trace_id").fetchall()
    return done, traces, state.watermark


@pytest.mark.parametrize("removed_meanwhile", [False, True], ids=["resumed", "started-over"])
def test_a_rebuild_cut_short_resumes_where_its_ranges_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removed_meanwhile: bool
) -> None:
    monkeypatch.setattr(incremental, "REBUILD_RANGE_ROWS", 10)
    db = tmp_path / "spans.duckdb"
    with DuckDBSpanStore(str(db)) as store:
        # 60 traces of 3 spans, one ingest time per trace (a request each), 1 s apart
        store.write(_rows([(t, s, T0 + t * S) for t in range(1, 61) for s in range(1, 4)]))
        cutoff = T0 + 200 * S
        ranged: list[tuple[int, int]] = []  # (since, until) of each range read
        cut_at: list[int] = [3]  # the range read that fails (0: none)

        def recent(since_ns: int, splits: list[int], until_ns: int | None = None) -> pa.Table:
            if until_ns is not None and until_ns > since_ns:
                ranged.append((since_ns, until_ns))
                if len(ranged) == cut_at[0]:
                    raise Cut("the worker stopped")
                return store.recent_arrivals(since_ns, splits, until_ns)
            if until_ns is not None:
                return store.recent_arrivals(since_ns, splits, until_ns)
            return store.recent_arrivals(since_ns, splits)

        reads = (recent, store.arrivals_between, store.arrival_bounds)
        state = IncrementalAnalysis(sidecar_path(str(db)), batch_spans=12, max_round_spans=1000)
        whole = IncrementalAnalysis(None, batch_spans=12, max_round_spans=1000)  # the reference
        # a first round as an older worker ran it (no figures kept): the next one rebuilds them
        for analysis in (state, whole):
            analysis.update(
                store.trace_arrivals, cutoff_ns=cutoff, margin_ns=MARGIN, retention_cutoff_ns=None
            )
        cutoff += 10 * S
        with pytest.raises(Cut):
            state.update(
                store.trace_arrivals,
                cutoff_ns=cutoff,
                margin_ns=MARGIN,
                retention_cutoff_ns=None,
                recent=reads,
            )
        reached = ranged[1][1]  # two ranges committed
        assert state._meta("tally_ranges_upto") == reached
        if removed_meanwhile:  # a copy of a span, written and compacted: the kept ranges may not hold
            store.write(_rows([(1, 1, T0 + 100 * S)]))
            assert store.compact() == 1
        state.close()
        # a new worker
        state = IncrementalAnalysis(sidecar_path(str(db)), batch_spans=12, max_round_spans=1000)
        ranged.clear()
        cut_at[0] = 0
        got = state.update(
            store.trace_arrivals, cutoff_ns=cutoff, margin_ns=MARGIN, retention_cutoff_ns=None, recent=reads
        )
        assert ranged[0][0] == (0 if removed_meanwhile else reached)  # not read again when they hold
        assert all(ranged[i][1] == ranged[i + 1][0] for i in range(len(ranged) - 1))
        assert state._meta("tally_ranges_upto") is None  # the round committed: the tally has its bound
        expected = whole.update(
            store.trace_arrivals, cutoff_ns=cutoff, margin_ns=MARGIN, retention_cutoff_ns=None
        )
        assert _outcome(state, got) == _outcome(whole, expected)
        # the next round reads the recent rows only, from the tally's bound
        ranged.clear()
        store.write(_rows([(61, 1, cutoff + S)]))
        state.update(
            store.trace_arrivals,
            cutoff_ns=cutoff + 10 * S,
            margin_ns=MARGIN,
            retention_cutoff_ns=None,
            recent=reads,
        )
        assert ranged == []
        whole.close()
        state.close()
