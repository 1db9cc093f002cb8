"""What-if re-timing, numbers checked by hand."""

from __future__ import annotations

import polars as pl
import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import CollapseSpans, Finding, Occurrence, RunConcurrently, ShortenSpan
from hourglass.analysis.report import intervention_to_dict
from hourglass.analysis.whatif import WhatIf, retime_trace
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, deep_chain, repeated_trace, spans_table, spec

MS = 1_000_000


def checkout(root_ms: float = 200, b_ms: float = 80) -> tuple[TraceBuilder, dict[str, str]]:
    """root 0-200 > handler 5-195 > A 10-60, B 65-(65+b), C after B (+5 ms gap, 20 ms)."""
    b = TraceBuilder()
    ids = {"root": b.span("GET /checkout", start_ms=0, dur_ms=root_ms, kind=KIND_SERVER)}
    ids["handler"] = b.span("handler", parent=ids["root"], start_ms=5, dur_ms=root_ms - 10)
    ids["a"] = b.span("A", parent=ids["handler"], start_ms=10, dur_ms=50, kind=KIND_CLIENT)
    ids["b"] = b.span("B", parent=ids["handler"], start_ms=65, dur_ms=b_ms, kind=KIND_CLIENT)
    ids["c"] = b.span("C", parent=ids["handler"], start_ms=65 + b_ms + 5, dur_ms=20, kind=KIND_CLIENT)
    return b, ids


def finding(*occurrences: Occurrence) -> Finding:
    return Finding("serialized_calls", "parallelization", "frontend", "handler", [], list(occurrences), 0.5)


def test_run_concurrently_keeps_gaps_and_moves_dependents() -> None:
    b, ids = checkout()
    ctx = AnalysisContext.from_table(spans_table(b))
    f = finding(Occurrence(b.trace_id, (ids["a"], ids["b"]), (RunConcurrently((ids["a"], ids["b"])),)))
    # A and B start together after the 5 ms gap that separated them (at 15 ms); B ends at 95,
    # C keeps its 5 ms gap (100-120), the handler keeps its 25 ms tail (ends 145), the root its 5 ms.
    assert WhatIf(ctx).impact(f).as_dict() == {
        "saved_ms_p50": 50.0, "saved_ms_p95": 50.0, "saved_ms_total": 50.0, "share_of_root_latency": 0.25,
    }  # fmt: skip
    after = retime_trace(ctx.spans, f)
    rel = {
        r["name"]: ((r["new_start_ns"] - b.base_ns) / MS, (r["new_end_ns"] - b.base_ns) / MS)
        for r in after.iter_rows(named=True)
    }
    assert rel == {
        "GET /checkout": (0, 150), "handler": (5, 145), "A": (15, 65), "B": (15, 95), "C": (100, 120),
    }  # fmt: skip


def test_sibling_waiting_for_a_concurrent_set_waits_for_its_longest_member() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    long_ = b.span("long", parent=root, start_ms=0, dur_ms=60)
    short = b.span("short", parent=root, start_ms=60, dur_ms=20)  # 60-80
    b.span("next", parent=root, start_ms=80, dur_ms=20)  # depended on "short"
    ctx = AnalysisContext.from_table(spans_table(b))
    f = finding(Occurrence(b.trace_id, (long_, short), (RunConcurrently((long_, short)),)))
    after = {r["name"]: r for r in retime_trace(ctx.spans, f).iter_rows(named=True)}
    assert (after["next"]["new_start_ns"] - b.base_ns) / MS == 60  # after "long", not after "short"
    assert WhatIf(ctx).impact(f).total_ns == 20 * MS


def test_shorten_span_propagates_through_levels() -> None:
    b, ids = checkout()
    ctx = AnalysisContext.from_table(spans_table(b))
    f = finding(Occurrence(b.trace_id, (ids["b"],), (ShortenSpan(ids["b"], 30 * MS),)))
    assert WhatIf(ctx).impact(f).total_ns == 30 * MS


def test_shortening_a_span_off_the_critical_path_saves_nothing() -> None:
    b = TraceBuilder()
    root = b.span("root", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("slow", parent=root, start_ms=0, dur_ms=90)
    fast = b.span("fast", parent=root, start_ms=0, dur_ms=40)
    ctx = AnalysisContext.from_table(spans_table(b))
    f = finding(Occurrence(b.trace_id, (fast,), (ShortenSpan(fast, 30 * MS),)))
    assert WhatIf(ctx).impact(f).total_ns == 0


def test_collapse_spans_keeps_first_and_removes_the_rest() -> None:
    b, ids = checkout()
    ctx = AnalysisContext.from_table(spans_table(b))
    members = (ids["a"], ids["b"], ids["c"])
    f = finding(Occurrence(b.trace_id, members, (CollapseSpans(members, 60 * MS),)))
    # A takes 60 ms (10-70); B and C take no time but keep their 5 ms gaps: last end 80 instead of 170.
    assert WhatIf(ctx).impact(f).total_ns == 90 * MS
    after = retime_trace(ctx.spans, f)
    assert after.filter(pl.col("removed"))["name"].sort().to_list() == ["B", "C"]


def test_per_trace_savings_give_p50_p95_total_and_share() -> None:
    traces = [checkout(b_ms=b_ms) for b_ms in (60, 80, 100, 120)]
    ctx = AnalysisContext.from_table(spans_table([t for t, _ in traces]))
    f = finding(
        *(Occurrence(t.trace_id, (i["a"], i["b"]), (RunConcurrently((i["a"], i["b"])),)) for t, i in traces)
    )
    impact = WhatIf(ctx).impact(f)
    # saving = min(A, B) = 50 ms in every trace (A is 50 ms, B at least 60 ms)
    assert sorted(impact.saved_ns.tolist()) == [50 * MS] * 4
    assert impact.as_dict()["share_of_root_latency"] == pytest.approx(200 / 800)


def test_savings_differ_per_trace_and_only_affected_traces_count() -> None:
    t1, i1 = checkout(b_ms=80)
    t2, i2 = checkout(b_ms=30)  # B shorter than A: saving is B's 30 ms
    t3, _ = checkout()  # unaffected
    ctx = AnalysisContext.from_table(spans_table([t1, t2, t3]))
    f = finding(
        Occurrence(t1.trace_id, (i1["a"], i1["b"]), (RunConcurrently((i1["a"], i1["b"])),)),
        Occurrence(t2.trace_id, (i2["a"], i2["b"]), (RunConcurrently((i2["a"], i2["b"])),)),
    )
    impact = WhatIf(ctx).impact(f)
    assert impact.trace_ids == [t1.trace_id, t2.trace_id]
    assert impact.saved_ns.tolist() == [50 * MS, 30 * MS]
    assert impact.as_dict()["saved_ms_p50"] == 40.0


def test_retime_trace_from_a_report_recommendation_and_raw_spans() -> None:
    b, ids = checkout()
    occ = Occurrence(b.trace_id, (ids["a"], ids["b"]), (RunConcurrently((ids["a"], ids["b"])),))
    rec = {
        "id": "serialized_calls-x", "kind": "serialized_calls", "category": "parallelization",
        "evidence": {"interventions": {b.trace_id: [intervention_to_dict(i) for i in occ.interventions]}},
    }  # fmt: skip
    raw = pl.from_arrow(spans_table(b))
    assert isinstance(raw, pl.DataFrame)
    after = retime_trace(raw, rec)
    root = after.filter(pl.col("span_id") == ids["root"]).row(0, named=True)
    assert (root["new_end_ns"] - root["new_start_ns"]) / MS == 150


def test_deep_trace_is_retimed_without_recursion() -> None:
    b, parent = deep_chain(5_000, root_ms=30_000)
    ctx = AnalysisContext.from_table(spans_table(b))
    f = finding(Occurrence(b.trace_id, (parent,), (ShortenSpan(parent, 1_000 * MS),)))
    assert WhatIf(ctx).impact(f).total_ns == 1_000 * MS


def test_retime_trace_reruns_the_detector_when_the_report_recorded_no_interventions() -> None:
    from hourglass.analysis.pipeline import analyze

    builders = repeated_trace(
        2,
        "shop",
        spec("GET /checkout", 0, 300, kind=KIND_SERVER),
        spec("GET users", 10, 100, under=0, kind=KIND_CLIENT, http_url="http://users/u"),
        spec("GET cart", 111, 100, under=0, kind=KIND_CLIENT, http_url="http://cart/c"),
    )
    (rec,) = analyze(spans_table(builders))["recommendations"]
    rec["evidence"].pop("interventions")
    raw = pl.from_arrow(spans_table(builders[1]))
    assert isinstance(raw, pl.DataFrame)
    after = retime_trace(raw, rec)
    root = after.filter(pl.col("name") == "GET /checkout").row(0, named=True)
    assert (root["new_end_ns"] - root["new_start_ns"]) / MS == 200


def test_saving_inside_an_orphaned_subtree_is_measured_at_its_root() -> None:
    b = TraceBuilder()
    b.span("root", start_ms=0, dur_ms=500, kind=KIND_SERVER)
    lost = b.span("lost handler", parent="ffffffffffffffff", start_ms=100, dur_ms=200)
    a = b.span("a", parent=lost, start_ms=110, dur_ms=80)
    c = b.span("c", parent=lost, start_ms=190, dur_ms=100)
    ctx = AnalysisContext.from_table(spans_table(b))
    impact = WhatIf(ctx).impact(finding(Occurrence(b.trace_id, (a, c), (RunConcurrently((a, c)),))))
    assert impact.saved_ns.tolist() == [80 * MS] and impact.root_ns.tolist() == [200 * MS]


def test_retimed_trace_compresses_the_work_inside_a_shortened_span() -> None:
    """A straggler brought to the median takes its server span and queries with it: in the drawn
    "after" trace nothing sticks out of the shortened span, and the trace's envelope ends where the
    engine's root ends (the report page's "saves X ms" is read from that envelope)."""
    b = TraceBuilder(service="front")
    root = b.span("GET /search", start_ms=0, dur_ms=300, kind=KIND_SERVER)
    branches = []
    for duration in (50, 52, 280):
        call = b.span("GET shard", parent=root, start_ms=5, dur_ms=duration, kind=KIND_CLIENT)
        server = b.span(
            "search", parent=call, start_ms=6, dur_ms=duration - 2, kind=KIND_SERVER, service="idx"
        )
        b.span("scan", parent=server, start_ms=8, dur_ms=duration - 6, service="idx")
        branches.append(call)
    ctx = AnalysisContext.from_table(spans_table(b))
    straggler = Finding(
        "fanout_straggler", "parallelization", "front", "GET /search", [],
        [Occurrence(b.trace_id, (root, branches[2]), (ShortenSpan(branches[2], 228_000_000),))], 0.9,
    )  # fmt: skip
    saved_ns = int(WhatIf(ctx).impact(straggler).saved_ns[0])
    after = retime_trace(ctx.spans, straggler)
    envelope = int(after["new_end_ns"].max() - after["new_start_ns"].min())
    assert envelope == 300_000_000 - saved_ns
    slow = after.filter(pl.col("span_id") == branches[2]).row(0, named=True)
    inside = after.filter(pl.col("service") == "idx")
    assert (inside["new_end_ns"] <= max(slow["new_end_ns"], 0) + 5_000_000).all()
