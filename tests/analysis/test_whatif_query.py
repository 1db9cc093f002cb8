"""A user's what-if (analysis.whatif_query): hand-checked numbers, properties over random traces,
and agreement with the report's own savings."""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import CapConcurrency, Finding, Occurrence, ScaleSelf
from hourglass.analysis.pipeline import analyze_context
from hourglass.analysis.whatif import WhatIf, intervention_from_dict, intervention_to_dict, retime_trace
from hourglass.analysis.whatif_query import (
    Change,
    WhatIfInputError,
    changes_from_cli,
    changes_from_json,
    evaluate,
    evaluate_part,
)
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table

ROOT = Path(__file__).resolve().parents[2]
MS = 1_000_000


def two_calls() -> tuple[TraceBuilder, dict[str, str]]:
    """root 0-200: own work 0-10, A 10-60, own work 60-70, B 70-170, own tail 170-200."""
    b = TraceBuilder(service="front")
    ids = {"root": b.span("GET /x", start_ms=0, dur_ms=200, kind=KIND_SERVER)}
    ids["a"] = b.span("A", parent=ids["root"], start_ms=10, dur_ms=50, service="a", kind=KIND_CLIENT)
    ids["b"] = b.span("B", parent=ids["root"], start_ms=70, dur_ms=100, service="b", kind=KIND_CLIENT)
    return b, ids


def fan_out(sequential: bool, n: int = 4) -> TraceBuilder:
    """root 0-(end): n calls of 40 ms from 5 ms, one after another or all at once; 5 ms tail."""
    b = TraceBuilder(service="front")
    end = 5 + (40 * n if sequential else 40) + 5
    root = b.span("GET /fan", start_ms=0, dur_ms=end, kind=KIND_SERVER)
    for i in range(n):
        start = 5 + (40 * i if sequential else 0)
        b.span("shard", parent=root, start_ms=start, dur_ms=40, service="db", kind=KIND_CLIENT)
    return b


def saved(b: TraceBuilder | list[TraceBuilder], *changes: Change, **kw: str) -> float:
    ctx = AnalysisContext.from_table(spans_table(b))
    return float(evaluate(ctx, list(changes), **kw)["saved_ms_total"])


def test_speedup_scales_own_time_and_keeps_children() -> None:
    b, _ = two_calls()
    # the root's own time is 10 + 10 + 30 = 50 ms; its children take 150 ms
    assert saved(b, Change("speedup", "front", "GET /x", factor=0.0)) == pytest.approx(50.0)
    assert saved(b, Change("speedup", "front", "GET /x", factor=0.5)) == pytest.approx(25.0)
    assert saved(b, Change("speedup", "front", "GET /x", factor=2.0)) == pytest.approx(-50.0)
    # a leaf's own time is all of it: A twice as fast moves B 25 ms earlier
    assert saved(b, Change("speedup", "a", "A", factor=0.5)) == pytest.approx(25.0)
    assert saved(b, Change("speedup", "b", "B", factor=0.0)) == pytest.approx(100.0)


def test_speedup_of_a_whole_service() -> None:
    b = TraceBuilder(service="front")
    root = b.span("GET /x", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    server = b.span("GET /price", parent=root, start_ms=10, dur_ms=80, service="pricing", kind=KIND_SERVER)
    b.span("compute", parent=server, start_ms=20, dur_ms=40, service="pricing")
    b.span("SELECT", parent=server, start_ms=60, dur_ms=20, service="db", kind=KIND_CLIENT)
    # pricing's own time: 10 (before compute) + 40 (compute) + 10 (tail) = 60 ms; db keeps its 20 ms
    everything = changes_from_json([{"speedup": {"service": "pricing", "factor": 0.5}}])
    assert everything[0].operation == "*"
    assert saved(b, *everything) == pytest.approx(30.0)
    assert saved(b, *changes_from_cli(speedup=["pricing:*=0"])) == pytest.approx(60.0)
    with pytest.raises(WhatIfInputError, match="'\\*' is for speedup"):
        changes_from_json([{"parallelize": {"service": "pricing", "operation": "*"}}])


def test_speedup_redraws_the_trace_with_children_kept() -> None:
    b, ids = two_calls()
    ctx = AnalysisContext.from_table(spans_table(b))
    f = Finding(
        "x",
        "parallelization",
        "front",
        "GET /x",
        [],
        [Occurrence(b.trace_id, (ids["root"],), (ScaleSelf(ids["root"], 0.0),))],
        1,
    )
    out = retime_trace(ctx.spans, f)
    t0 = b.base_ns
    times = {
        r["span_id"]: ((r["new_start_ns"] - t0) / MS, (r["new_end_ns"] - t0) / MS) for r in out.to_dicts()
    }
    assert times[ids["root"]] == (0, 150)
    assert times[ids["a"]] == (0, 50)
    assert times[ids["b"]] == (50, 150)


def test_cap_schedules_the_fan_out_on_k_slots() -> None:
    parallel = fan_out(sequential=False)  # 50 ms
    assert saved(parallel, Change("cap", "front", "GET /fan", concurrency=2)) == pytest.approx(-40.0)
    assert saved(parallel, Change("cap", "front", "GET /fan", concurrency=1)) == pytest.approx(-120.0)
    assert saved(parallel, Change("cap", "front", "GET /fan", concurrency=8)) == pytest.approx(0.0)
    serial = fan_out(sequential=True)  # 170 ms
    assert saved(serial, Change("cap", "front", "GET /fan", concurrency=2)) == pytest.approx(80.0)
    assert saved(serial, Change("parallelize", "front", "GET /fan")) == pytest.approx(120.0)
    assert saved(serial, Change("cap", "front", "GET /fan", concurrency=4)) == pytest.approx(120.0)


def test_cap_with_unequal_calls_takes_the_first_free_slot() -> None:
    b = TraceBuilder(service="front")
    root = b.span("GET /fan", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    for dur in (90, 10, 10, 10):  # all at once from 0
        b.span("shard", parent=root, start_ms=0, dur_ms=dur, service="db", kind=KIND_CLIENT)
    # 2 slots: 90 on one, the three 10 ms calls one after another on the other (ends 30): still 90
    assert saved(b, Change("cap", "front", "GET /fan", concurrency=2)) == pytest.approx(0.0)
    # 1 slot: 120 ms of calls + the 10 ms tail
    assert saved(b, Change("cap", "front", "GET /fan", concurrency=1)) == pytest.approx(-30.0)


def test_new_interventions_round_trip_through_the_report_json() -> None:
    for iv in (ScaleSelf("ab", 0.25), CapConcurrency(("a", "b"), 3)):
        assert intervention_from_dict(intervention_to_dict(iv)) == iv


def test_root_filters_and_endpoint_figures() -> None:
    x, _ = two_calls()
    other = fan_out(sequential=True)
    ctx = AnalysisContext.from_table(spans_table([x, other]))
    out = evaluate(ctx, [Change("speedup", "b", "B", factor=0.0)], service="front", operation="GET /x")
    assert out["traces"] == 1 and out["traces_changed"] == 1
    assert out["endpoints"] == [
        {
            "service": "front",
            "operation": "GET /x",
            "traces": 1,
            "saved_ms_total": 100.0,
            "before_ms_p50": 200.0,
            "after_ms_p50": 100.0,
            "before_ms_p95": 200.0,
            "after_ms_p95": 100.0,
        }
    ]
    assert out["changes"] == [
        {"speedup": {"service": "b", "operation": "B", "factor": 0.0}, "spans": 1, "traces": 1}
    ]
    everything = evaluate(ctx, [Change("speedup", "db", "shard", factor=0.5)])
    assert everything["traces"] == 2 and everything["saved_ms_total"] == pytest.approx(80.0)
    with pytest.raises(WhatIfInputError, match="no trace has a root span"):
        evaluate(ctx, [Change("speedup", "b", "B", factor=0.0)], service="nope")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([], "empty"),
        ("x", "list"),
        ([{"speedup": {"service": "a", "operation": "A", "factor": -1}}], "between 0"),
        ([{"speedup": {"service": "a", "operation": "A"}}], "factor: missing"),
        ([{"speedup": {"service": "a", "operation": "A", "factor": "fast"}}], "number"),
        ([{"cap": {"service": "a", "operation": "A", "concurrency": 0}}], "whole number"),
        ([{"cap": {"service": "a", "operation": "A", "concurrency": 2.5}}], "whole number"),
        ([{"parallelize": {"service": "a"}}], "operation"),
        ([{"speedup": {"operation": "A", "factor": 0.5}}], "service"),
        ([{"faster": {}}], "unknown change"),
        ([{"speedup": {}, "cap": {}}], "exactly one"),
        ([{"recommendation": ""}], "non-empty"),
    ],
)
def test_bad_changes_say_why(payload: object, reason: str) -> None:
    with pytest.raises(WhatIfInputError, match=reason):
        changes_from_json(payload)


def test_unknown_operation_is_an_error() -> None:
    b, _ = two_calls()
    ctx = AnalysisContext.from_table(spans_table(b))
    with pytest.raises(WhatIfInputError, match="no span b:Nope"):
        evaluate(ctx, [Change("speedup", "b", "Nope", factor=0.5)])
    with pytest.raises(WhatIfInputError, match="no recommendation"):
        evaluate(ctx, [Change("recommendation", recommendation="lock_contention-0000")])


def test_cli_flags() -> None:
    changes = changes_from_cli(speedup=["pricing:GET /p=q=0.5"], parallelize=["f:GET /x"], cap=["f:fan=4"])
    assert [c.as_dict() for c in changes] == [
        {"speedup": {"service": "pricing", "operation": "GET /p=q", "factor": 0.5}},
        {"parallelize": {"service": "f", "operation": "GET /x"}},
        {"cap": {"service": "f", "operation": "fan", "concurrency": 4}},
    ]
    for flags, reason in (
        ({"speedup": ["pricing=0.5"]}, "SERVICE:OPERATION"),
        ({"speedup": ["p:o=fast"]}, "not a number"),
        ({"cap": ["p:o"]}, "SERVICE:OPERATION=VALUE"),
        ({}, "no change given"),
    ):
        with pytest.raises(WhatIfInputError, match=reason):
            changes_from_cli(**flags)  # type: ignore[arg-type]


# -- properties over random traces ------------------------------------------------------------


def random_trace(seed: int) -> TraceBuilder:
    """A random tree: each span's children run one after another or all at once, with gaps."""
    rng = np.random.default_rng(seed)
    b = TraceBuilder(service="s0")
    spans = [(b.span("root", start_ms=0, dur_ms=1000, kind=KIND_SERVER), 0.0, 1000.0, 0)]
    i = 0
    while i < len(spans) and len(spans) < 40:
        sid, start, dur, depth = spans[i]
        i += 1
        if depth >= 4 or dur < 4:
            continue
        k = int(rng.integers(0, 5))
        sequential = bool(rng.integers(0, 2))
        t = start + float(rng.uniform(0, dur * 0.1))
        for _ in range(k):
            room = start + dur - t
            if room <= 1:
                break
            d = float(rng.uniform(0.2, 0.6 if sequential else 0.95)) * room
            op = f"op{int(rng.integers(0, 6))}"
            child = b.span(op, parent=sid, start_ms=t, dur_ms=d, service=f"s{int(rng.integers(0, 3))}")
            spans.append((child, t, d, depth + 1))
            if sequential:
                t += d + float(rng.uniform(0, room * 0.05))
    return b


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1), factor=st.floats(0, 1))
def test_properties_of_speedups(seed: int, factor: float) -> None:
    b = random_trace(seed)
    ctx = AnalysisContext.from_table(spans_table(b))
    root_ms = float(ctx.traces["root_duration_ns"][0]) / MS
    ops = ctx.spans.select("service", "name").unique().rows()
    on_path = set(ctx.spans.filter("on_critical_path").select("service", "name").unique().rows())
    for service, name in ops:
        same = evaluate(ctx, [Change("speedup", service, name, factor=1.0)])
        assert same["saved_ms_total"] == 0.0 and same["traces_changed"] == 0
        out = evaluate(ctx, [Change("speedup", service, name, factor=factor)])
        # a speed-up never slows the root and never saves more than the root took
        assert -1e-3 <= out["saved_ms_total"] <= root_ms + 1e-3
        if (service, name) not in on_path:
            assert out["saved_ms_total"] == pytest.approx(0.0, abs=1e-3)
    every = evaluate(ctx, [Change("speedup", s, n, factor=0.0) for s, n in ops])
    assert every["saved_ms_total"] == pytest.approx(root_ms, abs=1e-3)  # no time left at all


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**32 - 1))
def test_properties_of_parallelize_and_cap(seed: int) -> None:
    b = random_trace(seed)
    ctx = AnalysisContext.from_table(spans_table(b))
    root_ms = float(ctx.traces["root_duration_ns"][0]) / MS
    for service, name in ctx.spans.select("service", "name").unique().rows():
        par = evaluate(ctx, [Change("parallelize", service, name)])["saved_ms_total"]
        assert -1e-3 <= par <= root_ms
        wide = evaluate(ctx, [Change("cap", service, name, concurrency=1000)])["saved_ms_total"]
        assert wide == pytest.approx(par, abs=1e-3)  # a cap above the width is no cap
        one = evaluate(ctx, [Change("cap", service, name, concurrency=1)])["saved_ms_total"]
        assert one <= par + 1e-3


# -- agreement with the report ----------------------------------------------------------------


def test_applying_a_recommendation_saves_what_the_report_says() -> None:
    from hourglass.collector.files import read_trace_files

    files = sorted(glob.glob(str(ROOT / "sample-traces" / "*.otlp.jsonl")))
    problems: list[object] = []
    table = pa.concat_tables([t for t in read_trace_files(files, on_error=problems.append) if t.num_rows])
    assert not problems
    ctx = AnalysisContext.from_table(table)
    report, _ = analyze_context(ctx)
    priced = [r for r in report["recommendations"] if r["impact"]["saved_ms_total"]]
    assert len(priced) >= 5
    for rec in priced:
        out = evaluate(ctx, [Change("recommendation", recommendation=rec["id"])])
        assert out["saved_ms_total"] == pytest.approx(rec["impact"]["saved_ms_total"], rel=0.01), rec["kind"]
        assert out["traces_changed"] == rec["traces_affected"]
    # the same engine: a recommendation given as a Finding through WhatIf prices the same
    assert WhatIf(ctx).impact(Finding("x", "parallelization", "", "", [], [], 0)).total_ns == 0


def test_a_partitions_share_of_an_answer_holds_none_of_its_spans() -> None:
    """Each partition's share of a what-if or critical-path answer is kept until the answer is
    made: it must hold its own few values (``context.compact``), not string views into the
    partition's buffers, which would keep every partition's strings alive (a question over 14
    partitions of a 7.2M-span store held 2.2 GiB of them in serve's process). Polars' own size
    estimate counts only the bytes a view uses, so the test follows the frames through compact."""
    from hourglass.analysis import context, endpoint_path
    from hourglass.collector.files import read_trace_files

    files = sorted(glob.glob(str(ROOT / "sample-traces" / "*.otlp.jsonl")))
    table = pa.concat_tables([t for t in read_trace_files(files, on_error=lambda p: None) if t.num_rows])
    ctx = AnalysisContext.from_table(table)
    compacted: list[pl.DataFrame] = []
    real = context.compact

    def compact(frame: pl.DataFrame) -> pl.DataFrame:
        made = real(frame)
        compacted.append(made)
        return made

    speedup = Change("speedup", service="users", operation="GET /users", factor=0.5)
    busiest = endpoint_path.endpoints(ctx).row(0, named=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(context, "compact", compact)
        share = evaluate_part(ctx, [speedup])
        kept: list[endpoint_path.PathRows] = []
        combine = endpoint_path.combine_path_rows

        def combining(rows: list[endpoint_path.PathRows]) -> endpoint_path.PathRows:
            kept.extend(rows)
            return combine(rows)

        mp.setattr(endpoint_path, "combine_path_rows", combining)
        _, path = endpoint_path.endpoint_critical_path_partitioned(
            lambda part, parts: ctx, 1, busiest["service"], busiest["operation"]
        )
    assert share.per_root.height and any(share.per_root is frame for frame in compacted)
    assert path is not None and len(kept) == 1
    for frame in (kept[0].traces, kept[0].operations, kept[0].paths, kept[0].nodes):
        assert any(frame is made for made in compacted)


def test_a_question_is_planned_on_the_workers_that_have_room() -> None:
    """A window too large for one context is asked on up to ``workers`` processes when each has
    ``MIN_WORKER_BYTES`` beside the bases (its share of the budget: smaller partitions, in whole
    rounds of the workers); in this process alone, in turn, when the window fits at once, when
    no two workers have room, or for an embedded ClickHouse store (opened by one process at a
    time)."""
    from hourglass.analysis.planning import (
        MIN_WORKER_BYTES,
        PEAK_BYTES_PER_SPAN,
        PROCESS_BASE_BYTES,
        question_parts,
        question_plan,
        question_workers,
    )

    budget = 1536 * 2**20
    assert question_plan(100_000, budget, 2) == (1, 1)  # at once
    serial = question_parts(7_200_000, budget)
    parts, workers = question_plan(7_200_000, budget, 2)
    assert workers == 2 and parts % 2 == 0 and parts > serial
    room = (budget - 3 * PROCESS_BASE_BYTES) // 2
    assert -(-7_200_000 // parts) * PEAK_BYTES_PER_SPAN <= room  # a partition's peak in a worker's share
    assert question_plan(7_200_000, budget, 1) == (serial, 1)
    assert question_plan(7_200_000, budget, 2, copies=2) == (question_parts(7_200_000, budget, 2), 1)
    small = 3 * PROCESS_BASE_BYTES + 2 * MIN_WORKER_BYTES - 1  # no two workers with room
    assert question_plan(7_200_000, small, 2) == (question_parts(7_200_000, small), 1)
    assert question_plan(7_200_000, 4 * budget, 3)[1] == 3
    # --partitions N: the workers that hold a partition each beside the asking process
    assert question_workers(3_408, 4, budget, 2) == 2
    assert question_workers(7_200_000, 13, budget, 2) == 1  # (one 700k-span partition: 1.5 GiB)
    assert question_workers(7_200_000, 40, budget, 8) == 2  # (225k-span partitions: 2 fit)
    assert question_workers(7_200_000, 1, 4 * budget, 2) == 1


@dataclass(frozen=True)
class _FileParts:
    """``load(part, parts)`` of partitions written to Arrow IPC files (pickles: the worker
    processes read each file themselves); ``failing`` partition raises every time."""

    folder: str
    failing: int = -1

    def __call__(self, part: int, parts: int) -> AnalysisContext:
        if part == self.failing:
            raise OSError(f"partition file {part} is unreadable")
        return AnalysisContext.from_table(pl.read_ipc(Path(self.folder) / f"{part}.arrow"))


def test_a_window_asked_in_worker_processes_answers_as_in_turn(tmp_path: Path) -> None:
    """The partitions of a window asked in worker processes (``runner``: a real
    ``ProcessExecutor`` of two) give the same what-if — speedup, parallelize and a recommendation
    (its finding decided over the whole window and handed to the tasks) — and the same critical
    path as asked one after another in this process; an unknown recommendation is refused before
    any partition is asked, and a partition that fails twice names itself."""
    from hourglass.analysis import endpoint_path, partitions
    from hourglass.analysis.whatif_query import ANY_OPERATION, ASKING, detector_lookup, evaluate_partitioned
    from hourglass.collector.files import read_trace_files

    files = sorted(glob.glob(str(ROOT / "sample-traces" / "*.otlp.jsonl")))
    table = pa.concat_tables([t for t in read_trace_files(files, on_error=lambda p: None) if t.num_rows])
    whole = AnalysisContext.from_table(table)
    parts = 3
    for part, frame in enumerate(partitions.split_by_trace(pl.from_arrow(table), parts)):  # type: ignore[arg-type]
        frame.write_ipc(tmp_path / f"{part}.arrow")
    load = _FileParts(str(tmp_path))
    report, _ = analyze_context(whole)
    rec = next(r["id"] for r in report["recommendations"] if r["impact"]["saved_ms_total"])
    lookup = detector_lookup(whole)
    busiest = endpoint_path.endpoints(whole).row(0, named=True)
    speedup = Change("speedup", service=busiest["service"], operation=ANY_OPERATION, factor=0.5)
    parallel = Change("parallelize", service=busiest["service"], operation=busiest["operation"])
    runner = partitions.ProcessExecutor(2, warm=False)
    told: list[tuple[str, int, int]] = []

    def trace_parts(trace_ids: list[str], parts: int, shift: int = 0) -> pl.DataFrame:
        ids = pl.Series("trace_id", trace_ids, dtype=pl.String)  # (split_by_trace's partitions)
        return ids.to_frame().with_columns(part=((ids.hash() % parts + shift) % parts).cast(pl.Int64))

    recommendation = Change("recommendation", recommendation=rec)
    try:
        for changes in ([speedup], [parallel], [recommendation, speedup]):
            in_turn = evaluate_partitioned(load, parts, changes, lookup=lookup)
            asked = evaluate_partitioned(
                load, parts, changes, lookup=lookup, runner=runner, progress=lambda *a: told.append(a)
            )
            assert asked == in_turn == evaluate(whole, changes, lookup=lookup), changes
            # each task given its own traces' occurrences only: the same answer
            shared = evaluate_partitioned(
                load, parts, changes, lookup=lookup, runner=runner, trace_parts=trace_parts
            )
            assert shared == in_turn, changes
        assert told[-1] == (ASKING, parts, parts)
        # (the shares are what the tasks apply: given another partition's, the saving is lost)
        misplaced = evaluate_partitioned(
            load,
            parts,
            [recommendation],
            lookup=lookup,
            runner=runner,
            trace_parts=lambda ids, parts: trace_parts(ids, parts, shift=1),
        )
        assert misplaced["saved_ms_total"] == 0 < in_turn["saved_ms_total"]
        for service, operation in ((busiest["service"], busiest["operation"]), (None, None)):
            listing, path = endpoint_path.endpoint_critical_path_partitioned(load, parts, service, operation)
            listing_w, path_w = endpoint_path.endpoint_critical_path_partitioned(
                load, parts, service, operation, runner=runner
            )
            assert listing_w.equals(listing) and path_w == path
        with pytest.raises(WhatIfInputError, match="no recommendation 'nope-1'"):
            evaluate_partitioned(
                load, parts, [Change("recommendation", recommendation="nope-1")], lookup=lookup, runner=runner
            )
        with pytest.raises(
            partitions.PartitionError, match=r"asking of partition 2/3 failed twice: .*unreadable"
        ):
            evaluate_partitioned(_FileParts(str(tmp_path), failing=1), parts, [speedup], runner=runner)
    finally:
        runner.close()
