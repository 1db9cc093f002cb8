"""A round that settles more traces than it extracts (``max_round_spans``) takes first those the
report's window of the newest ``HOURGLASS_REPORT_MAX_SPANS`` will hold, oldest first among them,
then the older backlog: serve started on a store far larger than its window (a first start, or
its rows extracted again after an upgrade) shows its newest traces within a few rounds, not after
extracting every older one. The report's lag counts the deferred traces the window will hold."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from hourglass.analysis.incremental import IncrementalAnalysis
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import SPAN_SCHEMA
from tests.builders import repeated_trace, spans_table, spec

# (their reference states are not closed: temporary folders in the tests' own)
pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("temp_in_tmp_path")]

S = 10**9
T0 = 1_760_000_000 * S
TEMPLATE = spans_table(repeated_trace(1, "svc", spec("GET /a", 0, 10))).to_pylist()[0]


def _store(path: Path) -> DuckDBSpanStore:
    """Traces 1..10 of 10 spans each, trace ``i`` ingested and started at second ``i``."""
    store = DuckDBSpanStore(str(path))
    rows = [
        {
            **TEMPLATE,
            "trace_id": f"{t:032x}",
            "span_id": f"{s:016x}",
            "ingested_ns": T0 + t * S + s,
            "start_ns": T0 + t * S,
            "end_ns": T0 + t * S + 1000,
        }
        for t in range(1, 11)
        for s in range(1, 11)
    ]
    store.write(pa.Table.from_pylist(rows, schema=SPAN_SCHEMA))
    return store


def _extracted(state: IncrementalAnalysis) -> list[int]:
    return [int(t, 16) for (t,) in state.db.execute("SELECT trace_id FROM traces ORDER BY 1").fetchall()]


def _round(state: IncrementalAnalysis, store: DuckDBSpanStore, window: int | None) -> dict[str, object]:
    figures = state.update(
        store.trace_arrivals,
        cutoff_ns=T0 + 100 * S,
        margin_ns=5 * S,
        retention_cutoff_ns=None,
        window_spans=window,
    )
    return figures.as_dict()


def test_the_window_s_traces_are_extracted_before_the_older_backlog(tmp_path: Path) -> None:
    with _store(tmp_path / "spans.duckdb") as store:
        state = IncrementalAnalysis(None, batch_spans=10, max_round_spans=30)
        # the window holds the newest 40 spans: traces 7-10; three fit a round, the oldest first
        first = _round(state, store, 40)
        assert _extracted(state) == [7, 8, 9]
        assert first["deferred_traces"] == 7 and first["deferred_outside_window"] == 6
        assert first["oldest_deferred_ingested_ns"] == T0 + 10 * S + 10  # trace 10's last span
        # trace 10 and the window is full (7-9 extracted): then the backlog, the oldest first
        second = _round(state, store, 40)
        assert _extracted(state) == [1, 2, 7, 8, 9, 10]
        assert second["deferred_traces"] == 4 and second["deferred_outside_window"] == 4
        assert second["oldest_deferred_ingested_ns"] is None  # (no trace the window holds waits)
        _round(state, store, 40)
        _round(state, store, 40)
        assert _extracted(state) == list(range(1, 11))  # every trace, whatever the window


def test_without_a_window_the_traces_that_settled_first_go_first(tmp_path: Path) -> None:
    with _store(tmp_path / "spans.duckdb") as store:
        state = IncrementalAnalysis(None, batch_spans=10, max_round_spans=30)
        first = _round(state, store, None)
        assert _extracted(state) == [1, 2, 3]
        assert first["deferred_outside_window"] == 0
        assert first["oldest_deferred_ingested_ns"] == T0 + 4 * S + 10
        # a window that holds every stored span changes nothing
        state = IncrementalAnalysis(None, batch_spans=10, max_round_spans=30)
        _round(state, store, 100)
        assert _extracted(state) == [1, 2, 3]
