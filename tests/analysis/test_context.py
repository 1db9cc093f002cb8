"""Trace repair and the derived columns of AnalysisContext."""

from __future__ import annotations

import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.collector.schema import (
    ANALYSIS_COLUMNS,
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_PRODUCER,
    KIND_SERVER,
)
from tests.builders import TraceBuilder, spans_table

MS = 1_000_000


def by_name(ctx: AnalysisContext) -> dict[str, dict]:
    return {r["name"]: r for r in ctx.spans.iter_rows(named=True)}


def test_contract_columns_and_types() -> None:
    b = TraceBuilder()
    root = b.span("GET /", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("child", parent=root, start_ms=10, dur_ms=20)
    ctx = AnalysisContext.from_table(spans_table(b))
    schema = ctx.spans.schema
    for column in ANALYSIS_COLUMNS:
        assert column in schema
    expected = {
        "duration_ns": pl.Int64, "is_root": pl.Boolean, "orphan": pl.Boolean, "blocking": pl.Boolean,
        "depth": pl.Int32, "on_critical_path": pl.Boolean, "critical_ns": pl.Int64, "root_span_id": pl.String,
        "root_duration_ns": pl.Int64, "row": pl.UInt32,
    }  # fmt: skip
    for column, dtype in expected.items():
        assert schema[column] == dtype, column
    assert ctx.traces.columns == [
        "trace_id", "root_span_id", "root_service", "root_name", "root_start_ns", "root_duration_ns",
        "span_count", "incomplete",
    ]  # fmt: skip
    assert ctx.spans["row"].to_list() == list(range(ctx.spans.height))
    assert ctx.from_table(pl.from_arrow(spans_table(b))).spans.height == 2  # polars input works too


def test_duplicates_are_kept_once_and_the_longest_copy_wins() -> None:
    b = TraceBuilder()
    root = b.span("GET /", start_ms=0, dur_ms=100, kind=KIND_SERVER, span_id="00000000000000aa")
    b.span("child", parent=root, start_ms=10, dur_ms=20, span_id="00000000000000bb")
    b.span("child", parent=root, start_ms=10, dur_ms=25, span_id="00000000000000bb")
    ctx = AnalysisContext.from_table(spans_table(b))
    assert ctx.spans.height == 2
    assert by_name(ctx)["child"]["duration_ns"] == 25 * MS


def test_zipkin_shared_span_is_split_into_client_and_server() -> None:
    b = TraceBuilder(service="web")
    root = b.span("GET /", start_ms=0, dur_ms=100, kind=KIND_SERVER, span_id="00000000000000a1")
    b.span("call", parent=root, start_ms=10, dur_ms=50, kind=KIND_CLIENT, span_id="00000000000000b2")
    b.span(
        "serve",
        parent=root,
        start_ms=12,
        dur_ms=45,
        kind=KIND_SERVER,
        service="api",
        span_id="00000000000000b2",
    )
    b.span("query", parent="00000000000000b2", start_ms=15, dur_ms=30, service="api", kind=KIND_CLIENT)
    ctx = AnalysisContext.from_table(spans_table(b))
    spans = by_name(ctx)
    assert spans["serve"]["span_id"] == "00000000000000b2:server"
    assert spans["serve"]["parent_span_id"] == "00000000000000b2"
    assert spans["query"]["parent_span_id"] == "00000000000000b2:server"
    assert spans["query"]["depth"] == 3
    assert not ctx.traces["incomplete"][0]


def test_orphans_are_roots_of_their_subtree_and_mark_the_trace_incomplete() -> None:
    b = TraceBuilder()
    root = b.span("GET /", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("child", parent=root, start_ms=10, dur_ms=20)
    lost = b.span("lost", parent="ffffffffffffffff", start_ms=30, dur_ms=10)
    b.span("under lost", parent=lost, start_ms=31, dur_ms=5)
    ctx = AnalysisContext.from_table(spans_table(b))
    spans = by_name(ctx)
    assert spans["lost"]["orphan"] and spans["lost"]["is_root"]
    assert spans["under lost"]["root_span_id"] == lost and spans["under lost"]["depth"] == 1
    assert not spans["child"]["orphan"] and spans["child"]["root_span_id"] == root
    trace = ctx.traces.row(0, named=True)
    assert trace["incomplete"] and trace["root_span_id"] == root and trace["span_count"] == 4


def test_parent_cycles_are_cut_instead_of_looping() -> None:
    b = TraceBuilder()
    b.span("a", parent="0000000000000b0b", start_ms=0, dur_ms=10, span_id="0000000000000a0a")
    b.span("b", parent="0000000000000a0a", start_ms=1, dur_ms=5, span_id="0000000000000b0b")
    b.span("self", parent="0000000000000c0c", start_ms=2, dur_ms=1, span_id="0000000000000c0c")
    ctx = AnalysisContext.from_table(spans_table(b))
    spans = by_name(ctx)
    assert spans["a"]["is_root"] and spans["b"]["parent_row"] == spans["a"]["row"]
    assert spans["self"]["is_root"]
    assert ctx.traces["incomplete"][0]


def test_clock_skew_moves_a_server_span_inside_its_client_call() -> None:
    # zipkin-lens skew.json: the server starts 65 ms before the client call that caused it.
    b = TraceBuilder(service="frontend")
    root = b.span("GET /", start_ms=0, dur_ms=200, kind=KIND_SERVER)
    call = b.span("call backend", parent=root, start_ms=100, dur_ms=60, kind=KIND_CLIENT)
    server = b.span(
        "handle", parent=call, start_ms=35, dur_ms=40, service="backend", kind=KIND_SERVER, host="b1"
    )
    b.span("db", parent=server, start_ms=40, dur_ms=20, service="backend", kind=KIND_CLIENT, host="b1")
    ctx = AnalysisContext.from_table(spans_table(b))
    spans = by_name(ctx)
    base = spans["GET /"]["start_ns"]
    # latency split evenly: (60 - 40) / 2 = 10 ms after the client starts
    assert spans["handle"]["start_ns"] - base == 110 * MS
    assert spans["handle"]["clock_skew_ns"] == 75 * MS
    # the server's own children move with it (same host, same clock)
    assert spans["db"]["start_ns"] - base == 115 * MS
    assert spans["handle"]["blocking"] and spans["handle"]["on_critical_path"]


def test_same_service_child_outliving_its_parent_is_not_shifted_but_non_blocking() -> None:
    b = TraceBuilder()
    root = b.span("GET /", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("fire and forget", parent=root, start_ms=90, dur_ms=200)
    b.span("tiny overrun", parent=root, start_ms=50, dur_ms=50.5)  # 0.5 ms past the end: within tolerance
    ctx = AnalysisContext.from_table(spans_table(b))
    spans = by_name(ctx)
    assert spans["fire and forget"]["clock_skew_ns"] == 0
    assert not spans["fire and forget"]["blocking"]
    assert spans["tiny overrun"]["blocking"]


def test_follows_from_and_messaging_children_are_non_blocking() -> None:
    b = TraceBuilder(service="orders")
    root = b.span("POST /order", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("audit", parent=root, start_ms=10, dur_ms=20, follows_from=True)
    send = b.span("publish", parent=root, start_ms=40, dur_ms=5, kind=KIND_PRODUCER)
    b.span("consume", parent=send, start_ms=300, dur_ms=50, service="mailer", kind=KIND_CONSUMER)
    b.span("work", parent=root, start_ms=50, dur_ms=30, kind=KIND_CLIENT)
    ctx = AnalysisContext.from_table(spans_table(b))
    spans = by_name(ctx)
    assert not spans["audit"]["blocking"]
    assert spans["publish"]["blocking"]  # the send itself is waited for
    assert not spans["consume"]["blocking"]
    assert spans["consume"]["clock_skew_ns"] == 0  # asynchronous: never "corrected" into the producer
    assert spans["work"]["blocking"]
