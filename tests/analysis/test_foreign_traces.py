"""Issue 12 part A: traces from instrumentation no one here wrote — no span kinds, database spans
known only by name, gate words inside table names, loops that pipeline a little, per-item calls
issued all at once. Each rule with its healthy counterpart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import batchable_calls, n_plus_one, serialized_calls
from hourglass.analysis.model import CollapseSpans
from hourglass.analysis.pipeline import analyze
from hourglass.collector.schema import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, KIND_UNSPECIFIED
from tests.builders import TraceBuilder, spans_table

U = KIND_UNSPECIFIED


def ctx_of(*builders: TraceBuilder) -> AnalysisContext:
    return AnalysisContext.from_table(spans_table(list(builders)))


# -- 1. roles inferred from structure ---------------------------------------------------------------


def unspecified_loop(items: int = 6, overlap_ms: float = 0.0, service: str = "catalog") -> TraceBuilder:
    """frontend handler calling GetProduct once per item, one after another; no span kinds at all."""
    b = TraceBuilder(service="frontend")
    root = b.span("Frontend/Recv", start_ms=0, dur_ms=10 + items * 31, kind=U)
    t = 5.0
    for _ in range(items):
        call = b.span("ProductCatalog/GetProduct", parent=root, start_ms=t, dur_ms=30, kind=U)
        b.span("ProductCatalog/GetProduct", parent=call, start_ms=t + 2, dur_ms=26, service=service, kind=U)
        t += 30 - overlap_ms + 1
    return b


def test_a_span_whose_child_runs_elsewhere_is_a_client_and_the_child_a_server() -> None:
    ctx = ctx_of(unspecified_loop())
    spans = ctx.spans
    client = spans.filter((spans["service"] == "frontend") & (spans["name"] == "ProductCatalog/GetProduct"))
    server = spans.filter(spans["service"] == "catalog")
    root = spans.filter(spans["name"] == "Frontend/Recv")
    assert set(client["kind"]) == {KIND_CLIENT} and client["kind_inferred"].all()
    assert set(server["kind"]) == {KIND_SERVER} and server["kind_inferred"].all()
    assert root["kind"].to_list() == [U] and not root["kind_inferred"].any()  # no child elsewhere


def test_recorded_kinds_are_never_overridden() -> None:
    b = TraceBuilder(service="frontend")
    root = b.span("GET /", start_ms=0, dur_ms=50, kind=KIND_SERVER)
    mid = b.span("render", parent=root, start_ms=1, dur_ms=40, kind=KIND_INTERNAL)
    b.span("Catalog/List", parent=mid, start_ms=2, dur_ms=30, service="catalog", kind=KIND_INTERNAL)
    spans = ctx_of(b).spans
    assert spans["kind"].to_list() == [KIND_SERVER, KIND_INTERNAL, KIND_INTERNAL]
    assert not spans["kind_inferred"].any()


def test_an_unspecified_per_item_loop_is_an_n_plus_one_marked_inferred() -> None:
    (f,) = n_plus_one.detect(ctx_of(*[unspecified_loop() for _ in range(3)]))
    assert (f.service, f.operation, f.targets[0]["service"]) == ("frontend", "Frontend/Recv", "catalog")
    assert f.evidence["inferred_roles"] is True and f.evidence["calls_p50"] == 6


def test_same_service_children_without_kind_stay_in_process() -> None:
    """Healthy twin: the same loop where every child runs in the handler's own process (template
    rendering, no call out) is no N+1."""
    b = TraceBuilder(service="frontend")
    root = b.span("Frontend/Recv", start_ms=0, dur_ms=200, kind=U)
    for i in range(6):
        b.span("render_item", parent=root, start_ms=5 + 31 * i, dur_ms=30, kind=U)
    ctx = ctx_of(b)
    assert not ctx.spans["kind_inferred"].any()
    assert n_plus_one.detect(ctx) == []


# -- 2. database spans known only by name -----------------------------------------------------------


def jpa_loop(name: str = "SELECT shop.orders", rows: int = 6, *, statements: bool = False) -> TraceBuilder:
    """A repository method loading rows one query at a time; DB spans have no kind and no db.*."""
    b = TraceBuilder(service="orders")
    root = b.span("/api/orders", start_ms=0, dur_ms=40, kind=U)
    ctl = b.span("OrderController.list", parent=root, start_ms=1, dur_ms=38, kind=U)
    for i in range(rows):
        label = f"SELECT * FROM orders WHERE id = {100 + i}" if statements else name
        b.span(label, parent=ctl, start_ms=2 + 5 * i, dur_ms=4, kind=U)
    return b


def test_semantic_convention_db_names_are_database_calls() -> None:
    (f,) = n_plus_one.detect(ctx_of(*[jpa_loop() for _ in range(3)]))
    assert f.operation == "OrderController.list" and f.evidence["statement"] == "SELECT shop.orders"
    assert f.evidence["different_parameters"] is None  # a summary hides the parameters


def test_statements_in_the_name_are_normalised_and_their_literals_are_parameters() -> None:
    (f,) = n_plus_one.detect(ctx_of(*[jpa_loop(statements=True) for _ in range(3)]))
    assert f.evidence["statement"] == "SELECT * FROM orders WHERE id = ?"
    assert f.evidence["different_parameters"] is True


def test_a_leaf_named_like_prose_is_not_a_database_call() -> None:
    """Healthy twin: 'Select shipping option' and 'update cart' leaves are in-process steps."""
    b = TraceBuilder(service="orders")
    root = b.span("/api/orders", start_ms=0, dur_ms=40, kind=U)
    for i in range(6):
        b.span(
            "Select shipping option" if i % 2 else "update cart",
            parent=root,
            start_ms=2 + 5 * i,
            dur_ms=4,
            kind=U,
        )
    ctx = ctx_of(b)
    assert not ctx.spans["kind_inferred"].any()
    assert n_plus_one.detect(ctx) == []


def test_http_post_calls_are_told_apart_by_the_span_that_answered() -> None:
    """'HTTP POST' to two services is two operations (keyed by the answering server span)."""
    b = TraceBuilder(service="basic")
    root = b.span("BasicController.query", start_ms=0, dur_ms=400, kind=U)
    for i, (svc, route) in enumerate([("station", "/api/stations/idlist"), ("train", "/api/trains/byNames")]):
        call = b.span("HTTP POST", parent=root, start_ms=5 + 100 * i, dur_ms=90, kind=U)
        b.span(route, parent=call, start_ms=6 + 100 * i, dur_ms=88, service=svc, kind=U)
    calls = serialized_calls.call_children(ctx_of(b))
    assert calls["op_label"].to_list() == [
        "HTTP POST: /api/stations/idlist",
        "HTTP POST: /api/trains/byNames",
    ]


# -- 3. gate words are words ------------------------------------------------------------------------


def three_queries(names: list[str], *, gap_ms: float = 1) -> TraceBuilder:
    b = TraceBuilder(service="library")
    root = b.span("GET /books/{id}", start_ms=0, dur_ms=200, kind=KIND_SERVER)
    t = 5.0
    for name in names:
        b.span(name, parent=root, start_ms=t, dur_ms=40, kind=KIND_CLIENT, db_system="postgresql")
        t += 40 + gap_ms
    return b


def test_tables_and_routes_containing_gate_words_are_not_gates() -> None:
    names = ["SELECT library.authors", "SELECT library.books_author", "POST /tokenizer", "GET /sessionize"]
    ctx = ctx_of(three_queries(names))
    calls = serialized_calls.call_children(ctx)
    assert not calls["is_gate"].any()
    (f,) = serialized_calls.detect(ctx)
    assert len(f.targets) == 4


def test_connect_authenticate_and_camel_case_gates_are_gates() -> None:
    names = ["db.connect", "authenticateUser", "getAuthToken", "SELECT library.blocksize"]
    gates = serialized_calls.call_children(ctx_of(three_queries(names)))
    by_name = dict(zip(gates["name"], gates["is_gate"], strict=True))
    assert by_name == {
        "db.connect": True,
        "authenticateUser": True,
        "getAuthToken": True,
        "SELECT library.blocksize": False,
    }


def test_a_connect_before_the_queries_keeps_them_out_of_the_run() -> None:
    """Healthy twin: connect, then one query — a precondition, nothing to parallelise."""
    assert serialized_calls.detect(ctx_of(three_queries(["connect", "SELECT library.authors"]))) == []


# -- 4. a loop that pipelines a little is still a loop ----------------------------------------------


def test_a_loop_whose_calls_overlap_by_a_few_ms_is_still_a_loop() -> None:
    (f,) = n_plus_one.detect(ctx_of(*[unspecified_loop(overlap_ms=4) for _ in range(3)]))
    assert f.evidence["calls_p50"] == 6


def test_mostly_concurrent_calls_are_no_loop_but_a_near_miss() -> None:
    """Healthy twin: calls overlapping by 80 % of their duration are issued concurrently."""
    ctx = ctx_of(*[unspecified_loop(overlap_ms=25) for _ in range(6)])
    assert n_plus_one.detect(ctx) == []


# -- 5. per-item calls issued all at once -----------------------------------------------------------


def fanout(items: int = 8, *, same_ids: bool = False, spread: bool = True) -> TraceBuilder:
    """GET /items/{id} issued together, one per id; one slow call when ``spread``."""
    b = TraceBuilder(service="cart")
    root = b.span("GET /cart", start_ms=0, dur_ms=120, kind=KIND_SERVER)
    for i in range(items):
        dur = 90 if (spread and i == items - 1) else 20 + i
        item = 7 if same_ids else 100 + i
        b.span("GET", parent=root, start_ms=5 + 0.2 * i, dur_ms=dur, kind=KIND_CLIENT,
               http_method="GET", http_url=f"http://catalog/items/{item}")  # fmt: skip
    return b


def test_concurrent_per_item_calls_are_batchable_with_an_honest_batched_call() -> None:
    ctx = ctx_of(*[fanout() for _ in range(5)])
    (f,) = batchable_calls.detect(ctx)
    assert (f.kind, f.service, f.operation) == ("batchable_calls", "cart", "GET /cart")
    assert f.targets == [{"service": "catalog", "operation": "GET: GET /items/{id}"}]
    assert f.evidence["round_trips_saved_p50"] == 7 and f.evidence["different_parameters"] is True
    (iv,) = f.occurrences[0].interventions
    assert isinstance(iv, CollapseSpans) and len(iv.span_ids) == 8
    # median call (23.5 ms) + 5 % of the other calls' time: one round trip, a little work per item
    durations = sorted([20 + i for i in range(7)] + [90])
    median = (durations[3] + durations[4]) / 2
    assert iv.duration_ns == int((median + 0.05 * (sum(durations) - median)) * 1e6)
    assert n_plus_one.detect(ctx) == []  # concurrent: not a loop
    report = analyze(spans_table([fanout() for _ in range(5)]))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "batchable_calls"]
    assert rec["impact"]["saved_ms_p50"] > 50  # the slowest-of-8 tail is gone


def test_the_same_id_fetched_concurrently_is_a_near_miss_not_a_batch() -> None:
    ctx = ctx_of(*[fanout(same_ids=True) for _ in range(5)])
    assert batchable_calls.detect(ctx) == []
    assert any("same parameters" in m.reason for m in ctx.near_misses if m.kind == "batchable_calls")


def shard_fanout(by_peer: bool = False) -> TraceBuilder:
    """GET /search querying 8 shards of one index at once (the demo's scatter-gather)."""
    b = TraceBuilder(service="storefront")
    root = b.span("GET /search", start_ms=0, dur_ms=120, kind=KIND_SERVER)
    for k in range(8):
        url = f"http://search/indexes/items/{'q' if by_peer else f'shards/{k}'}/search?q=lamp"
        b.span("GET", parent=root, start_ms=5 + 0.2 * k, dur_ms=90 if k == 7 else 20 + k, kind=KIND_CLIENT,
               http_method="GET", http_url=url, peer=f"search-{k}" if by_peer else None)  # fmt: skip
    return b


def test_a_scatter_gather_across_shards_or_servers_is_not_batchable() -> None:
    """One call per shard (named in the URL) or per server (different peers) is a fan-out for the
    fan-out detectors, not a request per item a batch endpoint could take: a near miss that says so.
    Its twin above (one call per item id to one server) is reported."""
    for by_peer in (False, True):
        ctx = ctx_of(*[shard_fanout(by_peer) for _ in range(5)])
        assert batchable_calls.detect(ctx) == []
        assert any("scatter-gather" in m.reason for m in ctx.near_misses if m.kind == "batchable_calls")


def test_a_handful_of_concurrent_calls_gives_nothing() -> None:
    assert batchable_calls.detect(ctx_of(*[fanout(items=3) for _ in range(5)])) == []


def test_a_sequential_loop_is_n_plus_one_not_batchable() -> None:
    ctx = ctx_of(*[unspecified_loop() for _ in range(3)])
    assert batchable_calls.detect(ctx) == []
    assert len(n_plus_one.detect(ctx)) == 1


# -- repair: an in-process span that mirrors a call beside it ---------------------------------------


def gateway(mirror_ms: float = 200.0) -> TraceBuilder:
    """A reactive gateway: the handler span sits beside the proxied call instead of around it."""
    b = TraceBuilder(service="gateway")
    root = b.span("/*", start_ms=0, dur_ms=205, kind=U)
    b.span("FilteringWebHandler.handle", parent=root, start_ms=1, dur_ms=mirror_ms, kind=U)
    call = b.span("HTTP POST", parent=root, start_ms=2, dur_ms=199, kind=U)
    b.span("/api/travel", parent=call, start_ms=3, dur_ms=197, service="travel", kind=U)
    return b


def test_a_handler_span_mirroring_the_call_beside_it_does_not_block_the_parent() -> None:
    spans = ctx_of(gateway()).spans
    mirror = spans.filter(spans["name"] == "FilteringWebHandler.handle")
    call = spans.filter(spans["name"] == "HTTP POST")
    assert mirror["blocking"].to_list() == [False] and call["on_critical_path"].to_list() == [True]


def test_a_sibling_doing_its_own_work_still_blocks() -> None:
    """Healthy twin: an in-process step half as long as the call is its own work, not a mirror."""
    spans = ctx_of(gateway(mirror_ms=100.0)).spans
    assert spans.filter(spans["name"] == "FilteringWebHandler.handle")["blocking"].to_list() == [True]


# -- old attribute keys ------------------------------------------------------------------------------


def test_opentracing_db_type_and_sql_query_keys_fill_the_db_columns(tmp_path: Path) -> None:
    from hourglass.collector.files import read_trace_files

    def attr(key: str, value: str) -> dict[str, Any]:
        return {"key": key, "value": {"stringValue": value}}

    span = {
        "traceId": "ab" * 16, "spanId": "cd" * 8, "name": "query", "startTimeUnixNano": "1000",
        "endTimeUnixNano": "2000", "attributes": [attr("db.type", "sql"), attr("sql.query", "SELECT 1")],
    }  # fmt: skip
    document = {
        "resourceSpans": [
            {
                "resource": {"attributes": [attr("service.name", "legacy")]},
                "scopeSpans": [{"spans": [span]}],
            }
        ]
    }
    path = tmp_path / "legacy.otlp.json"
    path.write_text(json.dumps(document))
    (table,) = [t for t in read_trace_files([path], on_error=lambda p: None) if t.num_rows]
    row = table.to_pylist()[0]
    assert (row["db_system"], row["db_statement"]) == ("sql", "SELECT 1")


def test_template_says_what_to_check_first_when_independence_is_unverified() -> None:
    from hourglass.analysis.template_writer import TEMPLATES

    rec = {
        "kind": "serialized_calls", "service": "planner", "operation": "plan", "targets": [],
        "traces_affected": 12, "occurrences": 12, "impact": None,
        "evidence": {"calls_p50": 4, "independence_unverified": True, "caller_instances": 12, "calls_taking_input": 4},
    }  # fmt: skip
    text = TEMPLATES["serialized_calls"](rec)
    assert text.actions[0].startswith("First check") and "evidence is weak" in text.summary
    rec["evidence"] = {"calls_p50": 4, "distinct_orders": 3}
    assert not TEMPLATES["serialized_calls"](rec).actions[0].startswith("First check")


# -- n_plus_one: a loop that dominates its endpoint, in a long request ----------------------------------


def long_request(controller_ms: float) -> TraceBuilder:
    """A 2 s request whose 'OrderController.list' runs 6 row-by-row queries of 2.5 ms."""
    b = TraceBuilder(service="orders")
    root = b.span("/api/orders", start_ms=0, dur_ms=2000, kind=KIND_SERVER)
    ctl = b.span("OrderController.list", parent=root, start_ms=1, dur_ms=controller_ms, kind=KIND_INTERNAL)
    for i in range(6):
        b.span("SELECT shop.items", parent=ctl, start_ms=2 + 2.6 * i, dur_ms=2.5, kind=U)
    b.span("render", parent=root, start_ms=controller_ms + 2, dur_ms=1990 - controller_ms, kind=KIND_INTERNAL)
    return b


def test_a_loop_dominating_its_endpoint_is_found_even_in_a_long_request() -> None:
    # saves ~12 ms: < 1 % of 2 s, but 40 % of the 30 ms endpoint it lives in
    (f,) = n_plus_one.detect(ctx_of(*[long_request(30) for _ in range(3)]))
    assert f.operation == "OrderController.list"


def test_the_same_loop_in_a_slow_endpoint_is_a_near_miss() -> None:
    """Healthy twin: 12 ms saved of a 400 ms endpoint (3 %) and of a 2 s request (0.6 %)."""
    ctx = ctx_of(*[long_request(400) for _ in range(3)])
    assert n_plus_one.detect(ctx) == []
    (miss,) = [m for m in ctx.near_misses if m.kind == "n_plus_one"]
    assert "SELECT shop.items" in miss.reason and "< 25%" in miss.reason
