"""serve's incremental pricing (``MemoExecutor``) holds little beside the contexts it prices in:
a context of a few traces at a time, and the shares of the parked findings it prices, not every
such finding's occurrences over the whole store."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pytest

from hourglass.analysis import batch_tasks, incremental, partitions
from hourglass.analysis.context import AnalysisContext, to_analysis_frame
from hourglass.analysis.detectors import DETECTORS, PARTS
from hourglass.analysis.incremental import MemoExecutor, Unit


class _State:
    """No stored pricing (the units are traces listed on the fly, not stored batches)."""

    def load_pricing(self, batch: int) -> dict[str, Any]:
        return {}

    def store_pricing(self, batch: int, entries: dict[str, Any]) -> None:
        raise AssertionError("a unit of listed traces has no stored pricing")

    def release_heap(self) -> None:
        """(nothing to return in a test)"""

    def release_memory(self) -> None:
        self.release_heap()


def test_a_rounds_pricing_prices_in_pieces_of_traces_and_holds_only_the_shares_it_prices(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two units of a round priced with every finding parked, as serve's round parks them: the
    contexts hold at most ``PRICING_SPANS`` spans (plus the rest of the trace that reaches it)
    rather than every trace a unit's findings are priced in, the parked findings hold none of
    their columns while a context is priced (only their shares taken for the units, each with its
    own columns), and the savings and call durations are the whole store's priced at once, in the
    same order."""
    from bench.analysis import generate_spans

    frame = to_analysis_frame(generate_spans(20_000, seed=11))
    whole = AnalysisContext.from_table(frame)
    findings = [f for kind in PARTS for f in DETECTORS[kind](whole) if f.occurrences]
    assert len(findings) > 5
    expected = batch_tasks.priced_in(whole, findings, True)
    for finding in findings:
        finding.occurrence_table.park(str(tmp_path))
    ids = frame["trace_id"].unique().sort().to_list()
    units = (Unit(None, ids[: len(ids) // 2], None, None), Unit(None, ids[len(ids) // 2 :], None, None))
    reads: list[int] = []

    class Source:
        def read(self, trace_ids: list[str], first: Any, last: Any) -> Any:
            table = frame.filter(pl.col("trace_id").is_in(trace_ids)).to_arrow()
            reads.append(table.num_rows)
            return table

    contexts: list[int] = []
    real_priced_in = batch_tasks.priced_in

    def recording(ctx: AnalysisContext, priced: list[Any], calls: bool) -> Any:
        contexts.append(ctx.spans.height)
        held = {f.id: f.occurrence_table.held() for f in findings if f.occurrence_table.held()}
        assert not held, f"parked findings' columns held while pricing: {held}"
        return real_priced_in(ctx, priced, calls)

    monkeypatch.setattr(batch_tasks, "priced_in", recording)
    monkeypatch.setattr(incremental, "PRICING_SPANS", 500)
    executor = MemoExecutor(_State(), units)  # type: ignore[arg-type]
    tasks = [(Source(), p, len(units), findings, True) for p in range(len(units))]
    results = executor.map("pricing", partitions.price_part, tasks, None)
    largest = int(frame.group_by("trace_id").len()["len"].max())  # type: ignore[arg-type]
    assert len(reads) == 2 and max(reads) > 2_000  # one read a unit, priced in pieces
    assert max(contexts) <= 500 + largest and len(set(contexts)) > 4
    merged = partitions.merge_impacts(r.impacts for r in results)
    assert set(merged) == set(expected.impacts)
    for fid, (_, saved, root) in expected.impacts.items():
        assert np.array_equal(merged[fid].saved_ns, saved) and np.array_equal(merged[fid].root_ns, root), fid
        assert merged[fid].saved_ns.dtype == saved.dtype
    for finding in findings:
        calls = np.concatenate([r.calls[finding.id] for r in results if finding.id in r.calls])
        assert np.array_equal(calls, expected.calls[finding.id]), finding.id
        assert calls.dtype == expected.calls[finding.id].dtype


def test_cutting_a_read_into_pieces_does_not_import_pandas() -> None:
    """serve's worker cuts a read into pieces of whole traces every round with new traces; a
    mask made with ``pa.array`` of a numpy array imported pandas there, which then stayed in
    the worker for good (~140k Python objects, ~20 MiB: the soak's worker idle 230 -> 290 MiB)."""
    import subprocess
    import sys

    code = (
        "import sys, polars as pl\n"
        "from hourglass.analysis.incremental import _trace_pieces\n"
        "t = pl.DataFrame({'trace_id': ['b', 'a', 'b', 'c', 'a', 'd'], 'x': range(6)}).to_arrow()\n"
        "pieces = [p.column('trace_id').to_pylist() for p in _trace_pieces(t, 2)]\n"
        "assert pieces == [['a', 'a'], ['b', 'b'], ['c', 'd']], pieces\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_a_trace_larger_than_a_piece_leaves_no_empty_piece() -> None:
    """A trace of more spans than a piece holds makes the piece numbers skip; the skipped
    numbers are not priced as empty pieces."""
    from hourglass.analysis.incremental import _trace_pieces

    ids = ["a"] * 61 + ["b"] * 3 + ["c"] * 20
    table = pl.DataFrame({"trace_id": ids, "x": range(len(ids))}).to_arrow()
    pieces = [p.column("trace_id").to_pylist() for p in _trace_pieces(table, 15)]
    assert all(pieces), "an empty piece"
    assert [sorted(set(p)) for p in pieces] == [["a"], ["b", "c"]]
    assert sum(len(p) for p in pieces) == len(ids)
