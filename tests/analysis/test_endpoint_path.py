"""An endpoint's critical path across traces (analysis.endpoint_path): exact shares on hand-built
traces, the demo's lock wait dominating the ledger transfer endpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.endpoint_path import critical_paths, endpoint_critical_path, endpoints
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table

ROOT = Path(__file__).resolve().parents[2]


def first() -> TraceBuilder:
    """root 0-100: A 10-40 (A1 20-30 inside), B 40-90. Self time on the path: root 10+10, A 20, A1 10,
    B 50. A parallel C 45-60 is off the path."""
    b = TraceBuilder(service="api")
    root = b.span("GET /x", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    a = b.span("A", parent=root, start_ms=10, dur_ms=30, service="a", kind=KIND_CLIENT)
    b.span("A1", parent=a, start_ms=20, dur_ms=10, service="a")
    b.span("B", parent=root, start_ms=40, dur_ms=50, service="b", kind=KIND_CLIENT)
    b.span("C", parent=root, start_ms=45, dur_ms=15, service="c", kind=KIND_CLIENT)
    return b


def second() -> TraceBuilder:
    """root 0-100: B 10-90 only. Root 20, B 80."""
    b = TraceBuilder(service="api")
    root = b.span("GET /x", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("B", parent=root, start_ms=10, dur_ms=80, service="b", kind=KIND_CLIENT)
    return b


def other() -> TraceBuilder:
    b = TraceBuilder(service="api")
    b.span("GET /other", start_ms=0, dur_ms=10, kind=KIND_SERVER)
    return b


def test_exact_shares_and_paths() -> None:
    ctx = AnalysisContext.from_table(spans_table([first(), second(), other()]))
    path = endpoint_critical_path(ctx, "api", "GET /x")
    assert path is not None
    assert path["traces"] == 2 and path["root_ms_p50"] == 100.0
    ops = {(o["service"], o["operation"]): o for o in path["operations"]}
    assert set(ops) == {("api", "GET /x"), ("a", "A"), ("a", "A1"), ("b", "B")}  # C is off the path
    assert {k: o["share"] for k, o in ops.items()} == {
        ("api", "GET /x"): 0.2,
        ("a", "A"): 0.1,
        ("a", "A1"): 0.05,
        ("b", "B"): 0.65,
    }
    assert sum(o["share"] for o in path["operations"]) == pytest.approx(1.0)
    assert ops[("b", "B")] == {
        "service": "b",
        "operation": "B",
        "traces": 2,
        "ms_p50": 65.0,
        "ms_p95": 78.5,
        "ms_total": 130.0,
        "share": 0.65,
    }
    assert ops[("a", "A")]["traces"] == 1 and ops[("a", "A")]["ms_p50"] == 20.0
    assert path["operations"][0]["operation"] == "B"  # biggest first
    variants = {tuple(p["steps"]): p["traces"] for p in path["paths"]}
    assert variants == {
        ("api:GET /x", "a:A", "a:A1", "b:B"): 1,
        ("api:GET /x", "b:B"): 1,
    }
    # icicle: per trace on average; the root holds everything, B its 65 ms
    nodes = {(n["service"], n["operation"]): n for n in path["icicle"]}
    assert nodes[("api", "GET /x")]["ms"] == 100.0 and nodes[("api", "GET /x")]["parent"] is None
    assert nodes[("b", "B")]["ms"] == 65.0 and nodes[("b", "B")]["parent"] == nodes[("api", "GET /x")]["id"]
    assert nodes[("a", "A")]["ms"] == 15.0 and nodes[("a", "A")]["self_ms"] == 10.0
    assert nodes[("a", "A1")]["parent"] == nodes[("a", "A")]["id"]
    assert endpoint_critical_path(ctx, "api", "GET /nope") is None
    assert endpoints(ctx).rows()[0] == ("api", "GET /x", 2)
    assert [p["operation"] for p in critical_paths(ctx)] == ["GET /x", "GET /other"]


def test_repeated_calls_fold_into_one_step() -> None:
    b = TraceBuilder(service="api")
    root = b.span("GET /n", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    for i in range(5):
        b.span("SELECT", parent=root, start_ms=10 + 15 * i, dur_ms=15, service="db", kind=KIND_CLIENT)
    path = endpoint_critical_path(AnalysisContext.from_table(spans_table(b)), "api", "GET /n")
    assert path is not None
    assert path["paths"][0]["steps"] == ["api:GET /n", "db:SELECT"]
    assert {o["operation"]: o["share"] for o in path["operations"]} == {"SELECT": 0.75, "GET /n": 0.25}


def test_lock_wait_dominates_the_ledger_transfer_path() -> None:
    from hourglass.collector.files import read_trace_files

    problems: list[object] = []
    tables = read_trace_files(
        [str(ROOT / "sample-traces" / "lock_contention.otlp.jsonl")], on_error=problems.append
    )
    ctx = AnalysisContext.from_table(next(t for t in tables if t.num_rows))
    assert not problems
    path = endpoint_critical_path(ctx, "ledger", "POST /accounts/{account_id}/transfers")
    assert path is not None
    top = path["operations"][0]
    assert top["operation"] == "lock.acquire ledger.journal" and top["share"] > 0.5
    assert path["paths"][0]["steps"][1] == "ledger:lock.acquire ledger.journal"


def test_joined_steps_are_the_string_aggregation_per_trace() -> None:
    """A path's key joined by Arrow over each trace's slice of the steps is the key the
    per-trace string aggregation gives: one row per trace in the rows' order, steps in order,
    a trace of one step, non-ASCII steps; empty rows and null steps take the aggregation."""
    import polars as pl

    from hourglass.analysis.endpoint_path import PATH_SEPARATOR, _joined_steps

    def aggregated(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.group_by("_trace", maintain_order=True).agg(
            pl.col("step").str.join(PATH_SEPARATOR).alias("key")
        )

    steps = ["api:GET /", "db:SELECT", "api:GET /", "cache:get", "wörk:ünïcode", "x:" + "y" * 40]
    frame = pl.DataFrame(
        {"_trace": [0, 0, 0, 3, 7, 7], "step": steps}, schema={"_trace": pl.UInt32, "step": pl.String}
    )
    for rows in (frame, frame.slice(3), frame.slice(0, 1), frame.clear()):
        got = _joined_steps(rows, "_trace")
        assert got.schema == aggregated(rows).schema and got.equals(aggregated(rows))
    assert _joined_steps(frame, "_trace")["key"].to_list() == [
        PATH_SEPARATOR.join(steps[:3]),
        steps[3],
        PATH_SEPARATOR.join(steps[4:]),
    ]
    with_null = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 1).then(None).otherwise(pl.col("step")).alias("step")
    )
    assert _joined_steps(with_null, "_trace").equals(aggregated(with_null))
