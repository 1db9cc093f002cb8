"""Critical path on tricky shapes: async children, overlaps, tolerance, 10,000-span traces."""

from __future__ import annotations

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.critical_path import compute_critical_path
from hourglass.collector.schema import KIND_SERVER
from tests.builders import TraceBuilder, deep_chain, spans_table

MS = 1_000_000


def path_of(ctx: AnalysisContext) -> dict[str, int]:
    """name -> critical self time (ms) for spans on the critical path."""
    on = ctx.spans.filter(pl.col("on_critical_path"))
    return {r["name"]: r["critical_ns"] / MS for r in on.iter_rows(named=True)}


def assert_self_times_add_up(ctx: AnalysisContext) -> None:
    sums = ctx.spans.group_by("root_span_id").agg(
        pl.col("critical_ns").sum(), pl.col("root_duration_ns").first()
    )
    assert (sums["critical_ns"] == sums["root_duration_ns"]).all()


def checked_path(b: TraceBuilder) -> dict[str, int]:
    """The critical path of the built trace (as path_of), once its self times add up to the root's."""
    ctx = AnalysisContext.from_table(spans_table(b))
    assert_self_times_add_up(ctx)
    return path_of(ctx)


def test_sequential_children_are_all_on_the_path() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("a", parent=root, start_ms=10, dur_ms=30)
    b.span("b", parent=root, start_ms=40, dur_ms=40)  # back to back with a
    assert checked_path(b) == {"root": 30, "a": 30, "b": 40}


def test_overlapping_children_only_the_last_finishing_chain_counts() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("short", parent=root, start_ms=10, dur_ms=20)  # 10-30, hidden by "long"
    b.span("long", parent=root, start_ms=10, dur_ms=60)  # 10-70
    b.span("after", parent=root, start_ms=75, dur_ms=20)  # 75-95
    assert checked_path(b) == {"root": 20, "long": 60, "after": 20}


def test_small_overlap_from_skew_still_counts_as_sequential() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=200, kind=KIND_SERVER)
    b.span("a", parent=root, start_ms=0, dur_ms=100.5)  # ends 0.5 ms after b starts: within 1 ms tolerance
    b.span("b", parent=root, start_ms=100, dur_ms=100)
    ctx = AnalysisContext.from_table(spans_table(b))
    path = path_of(ctx)
    assert set(path) == {"root", "a", "b"}
    assert path["a"] == 100  # clipped at b's start: no time counted twice
    assert_self_times_add_up(ctx)


def test_async_children_are_never_on_the_path() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("async", parent=root, start_ms=50, dur_ms=500)  # outlives the root: not waited for
    b.span("linked", parent=root, start_ms=10, dur_ms=85, follows_from=True)
    b.span("sync", parent=root, start_ms=20, dur_ms=30)
    assert checked_path(b) == {"root": 70, "sync": 30}


def test_nested_path_descends_into_the_chosen_child() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    mid = b.span("mid", parent=root, start_ms=10, dur_ms=80)
    b.span("leaf1", parent=mid, start_ms=20, dur_ms=20)
    b.span("leaf2", parent=mid, start_ms=15, dur_ms=50)  # 15-65: last-finishing in mid
    other = b.span("other", parent=root, start_ms=0, dur_ms=10)  # 0-10: right before mid
    b.span("under other", parent=other, start_ms=1, dur_ms=8)
    assert checked_path(b) == {"root": 10, "other": 2, "under other": 8, "mid": 30, "leaf2": 50}


def test_orphan_subtree_gets_its_own_path() -> None:
    b = TraceBuilder()
    b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    lost = b.span("lost", parent="ffffffffffffffff", start_ms=0, dur_ms=50)
    b.span("x", parent=lost, start_ms=10, dur_ms=10)
    ctx = AnalysisContext.from_table(spans_table(b))
    assert path_of(ctx) == {"root": 100, "lost": 40, "x": 10}


def test_ten_thousand_span_deep_chain() -> None:
    b, _ = deep_chain(10_000, root_ms=20_000)
    ctx = AnalysisContext.from_table(spans_table(b))
    assert ctx.spans["depth"].max() == 9_999
    assert ctx.spans["on_critical_path"].all()
    assert_self_times_add_up(ctx)


def test_ten_thousand_span_wide_trace_with_sequential_and_parallel_children() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=30_000, kind=KIND_SERVER)
    for i in range(5_000):  # 5,000 back-to-back children...
        b.span(f"seq{i}", parent=root, start_ms=i * 5, dur_ms=5)
    for i in range(4_999):  # ...and 4,999 short ones running beside them
        b.span(f"par{i}", parent=root, start_ms=i * 5, dur_ms=2)
    ctx = AnalysisContext.from_table(spans_table(b))
    on = ctx.spans.filter(pl.col("on_critical_path"))["name"].to_list()
    assert len(on) == 5_001 and all(n == "root" or n.startswith("seq") for n in on)
    assert_self_times_add_up(ctx)


def test_arrays_directly_match_hand_computed_path() -> None:
    # root 0-100; children: c1 0-40, c2 35-60 (overlaps c1 by 5: not sequential), c3 60-100
    parent = np.array([-1, 0, 0, 0])
    start = np.array([0, 0, 35, 60]) * MS
    end = np.array([100, 40, 60, 100]) * MS
    cp = compute_critical_path(parent, start, end, np.ones(4, dtype=bool))
    assert cp.on_path.tolist() == [True, False, True, True]
    assert (cp.critical_ns / MS).tolist() == [35, 0, 25, 40]
