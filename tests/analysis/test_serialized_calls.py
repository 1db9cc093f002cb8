"""serialized_calls on hand-built traces, each with its healthy counterpart."""

from __future__ import annotations

import itertools
import random

import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import serialized_calls
from hourglass.analysis.model import RunConcurrently
from hourglass.analysis.pipeline import analyze
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.analysis._assertions import one_finding, run_detector
from tests.builders import TraceBuilder, spans_table


def checkout(
    *,
    order: tuple[str, ...] = ("users", "cart", "prices"),
    gap_ms: float = 1,
    overlap: bool = False,
    ids: bool = True,
    caller: str = "GET /checkout",
) -> TraceBuilder:
    """frontend GET /checkout calling three services; sequential unless ``overlap``; each GET takes
    an id (an input an earlier call could have produced) unless ``ids`` is False."""
    b = TraceBuilder(service="frontend")
    root = b.span(caller, start_ms=0, dur_ms=400, kind=KIND_SERVER)
    durations = {"users": 60, "cart": 80, "prices": 50}
    t = 10.0
    for name in order:
        start = 10.0 if overlap else t
        call = b.span(f"GET {name}", parent=root, start_ms=start, dur_ms=durations[name], kind=KIND_CLIENT,
                      http_method="GET", http_url=f"http://{name}/api/{name}" + ("/42" if ids else ""))  # fmt: skip
        b.span(f"GET /api/{name}/{{id}}", parent=call, start_ms=start + 1, dur_ms=durations[name] - 2,
               service=name, kind=KIND_SERVER)  # fmt: skip
        t += durations[name] + gap_ms
    return b


def detect(*builders: TraceBuilder) -> list:
    return run_detector(serialized_calls.detect, builders)


def test_three_back_to_back_calls_are_one_finding_with_run_concurrently() -> None:
    f = one_finding(
        detect(checkout(ids=False)), "serialized_calls", "parallelization", "frontend", "GET /checkout"
    )
    assert {t["service"] for t in f.targets} == {"users", "cart", "prices"}
    (iv,) = f.occurrences[0].interventions
    assert isinstance(iv, RunConcurrently) and len(iv.span_ids) == 3
    assert f.evidence["local_saving_ms_p50"] == 190 - 80


def test_saving_is_measured_at_the_root() -> None:
    report = analyze(spans_table(checkout(ids=False)))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "serialized_calls"]
    # 60 + 80 + 50 ms in a row with two 1 ms gaps -> 80 ms after the 2 ms of gaps: saves 110 ms
    assert rec["impact"]["saved_ms_p50"] == 110.0
    assert rec["impact"]["share_of_root_latency"] == round(110 / 400, 4)


def test_already_parallel_calls_give_nothing() -> None:
    assert detect(*[checkout(overlap=True) for _ in range(5)]) == []


def test_a_single_slow_call_gives_nothing() -> None:
    b = TraceBuilder(service="frontend")
    root = b.span("GET /report", start_ms=0, dur_ms=500, kind=KIND_SERVER)
    b.span("GET warehouse", parent=root, start_ms=5, dur_ms=480, kind=KIND_CLIENT, http_url="http://dwh/q")
    assert detect(b) == []


def test_calls_in_different_phases_of_the_request_give_nothing() -> None:
    # 600 ms of the caller's own work between the calls: more than half the request apart
    b = TraceBuilder(service="frontend")
    root = b.span("POST /import", start_ms=0, dur_ms=1000, kind=KIND_SERVER)
    b.span("GET schema", parent=root, start_ms=10, dur_ms=50, kind=KIND_CLIENT, http_url="http://schema/s")
    b.span("PUT rows", parent=root, start_ms=660, dur_ms=60, kind=KIND_CLIENT, http_url="http://store/rows")
    assert detect(b) == []


def test_runs_missing_a_call_now_and_then_stay_one_finding() -> None:
    traces = [checkout() for _ in range(4)] + [checkout(order=("users", "cart"))]
    (f,) = detect(*traces)
    assert len(f.occurrences) == 5 and {t["service"] for t in f.targets} == {"users", "cart", "prices"}


def test_authentication_before_the_call_is_a_dependency_not_a_finding() -> None:
    b = TraceBuilder(service="gateway")
    root = b.span("POST /transfer", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("POST auth-service/v1/authentications", parent=root, start_ms=2, dur_ms=30, kind=KIND_CLIENT,
           http_url="http://auth-service/v1/authentications")  # fmt: skip
    b.span(
        "POST transfers", parent=root, start_ms=33, dur_ms=60, kind=KIND_CLIENT, http_url="http://transfers/t"
    )
    assert detect(b) == []


def test_order_varying_across_traces_raises_confidence() -> None:
    varied = detect(
        *[checkout(order=o) for o in [("users", "cart", "prices"), ("cart", "users", "prices")] * 3]
    )
    fixed_few = detect(*[checkout() for _ in range(3)])
    assert len(varied) == 1 and len(fixed_few) == 1
    assert varied[0].evidence["distinct_orders"] == 2
    assert varied[0].confidence >= 0.7 > fixed_few[0].confidence


def test_two_callers_of_the_same_operations_each_have_their_own_evidence() -> None:
    """Both callers' runs have the same signature text (the same called operations): the order
    evidence of one caller must not be read for the other."""
    varied = [checkout(order=o) for o in [("users", "cart", "prices"), ("cart", "users", "prices")] * 3]
    fixed = [checkout(caller="GET /basket") for _ in range(12)]
    for builders in (varied + fixed, fixed + varied):
        by_caller = {f.operation: f for f in detect(*builders)}
        assert set(by_caller) == {"GET /checkout", "GET /basket"}
        assert by_caller["GET /checkout"].evidence["distinct_orders"] == 2
        assert by_caller["GET /basket"].evidence["distinct_orders"] == 1
        assert by_caller["GET /checkout"].evidence["caller_instances"] == 6
        assert by_caller["GET /basket"].evidence["caller_instances"] == 12


def _evidence_of_instances(
    instances: list[list[tuple[str, int, int]]], ops: set[str], tol: int
) -> tuple[int, int, int]:
    """The independence evidence of one signature straight from the rule, instance by instance:
    the calls of ``ops`` in (start, end, op) order; an order is the operations by first start (then
    key); an instance overlaps when a call starts before the latest end of the calls before it,
    less ``tol``, with an operation other than the previous call's."""
    key = {op: h for op, h in zip(sorted(ops), pl.Series(sorted(ops)).hash().to_list(), strict=True)}
    counted, orders, overlapping = 0, set(), 0
    for calls in instances:
        mine = sorted(((s, e, key[op]) for op, s, e in calls if op in ops))
        first: dict[int, int] = {}
        for s, _, k in mine:
            first.setdefault(k, s)
        if len(first) < 2:
            continue
        counted += 1
        orders.add(tuple(sorted(first, key=lambda k: (first[k], k))))
        latest = mine[0][1]
        for (_, _, prev), (s, e, k) in itertools.pairwise(mine):
            if k != prev and s < latest - tol:
                overlapping += 1
                break
            latest = max(latest, e)
    return counted, len(orders), overlapping


def test_order_and_overlap_evidence_merged_from_batches_is_the_rule_applied_to_every_instance() -> None:
    """The per-batch patterns (one row per caller and order/overlap pattern, with a count) summed
    over batches give, for any subset of a caller's operations, the same instances, distinct
    orders and overlapping instances as the rule applied to every instance's calls."""
    rnd = random.Random(11)
    for _ in range(40):
        names = [f"op{i}" for i in range(rnd.randint(2, 5))]
        instances = []
        for _ in range(rnd.randint(1, 30)):
            calls = []
            for _ in range(rnd.randint(1, 6)):
                start = rnd.randint(0, 40) * rnd.choice([1, 1000])
                calls.append((rnd.choice(names), start, start + rnd.randint(0, 50) * rnd.choice([1, 1000])))
            instances.append(calls)
        rows = [
            {
                "parent_row": i,
                "parent_service": "svc",
                "parent_name": "caller",
                "op_key": op,
                "start_ns": s,
                "end_ns": e,
                "parent_duration_ns": 1_000_000,
            }
            for i, calls in enumerate(instances)
            for op, s, e in calls
        ]
        calls_frame = pl.DataFrame(rows)
        cut = rnd.randint(0, len(instances))
        batches = [
            calls_frame.filter(pl.col("parent_row") < cut),
            calls_frame.filter(pl.col("parent_row") >= cut),
        ]
        orders = pl.concat([serialized_calls._instance_orders(b) for b in batches if b.height])
        ops = sorted(rnd.sample(names, rnd.randint(2, len(names))))
        signatures = pl.DataFrame(
            {
                "caller_service": ["svc"],
                "caller_name": ["caller"],
                "signature": [" || ".join(ops)],
                "sig_ops": [ops],
            }
        )
        got = serialized_calls._independence(orders, signatures)
        want = _evidence_of_instances(instances, set(ops), tol=10_000)  # 1 % of the 1 ms parent
        if want[0] == 0:
            assert got.height == 0
        else:
            assert got.select("instances", "distinct_orders", "overlapping_instances").row(0) == want


def test_overlap_seen_in_some_traces_raises_confidence_and_is_not_flagged_itself() -> None:
    findings = detect(*[checkout() for _ in range(4)], *[checkout(overlap=True) for _ in range(2)])
    assert len(findings) == 1
    f = findings[0]
    assert len(f.occurrences) == 4  # the parallel traces are evidence, not occurrences
    assert f.evidence["overlapping_instances"] == 2
    assert f.confidence >= 0.7


def test_fixed_order_calls_taking_inputs_are_reported_weakly_with_the_last_call_kept_after() -> None:
    """Same order in every trace, never overlapping, every call takes an id: a data dependency or
    independent lookups issued one after another — traces cannot tell. The saving is large (60 ms
    of a 400 ms request when only the calls before the last overlap), so it is reported with a low
    confidence that says so, and the what-if keeps the last call after the others."""
    (f,) = detect(*[checkout() for _ in range(12)])
    assert f.confidence == serialized_calls.UNCHECKED_CONFIDENCE < 0.5
    assert f.evidence["independence_unverified"] is True and f.evidence["calls_taking_input"] == 3
    assert f.evidence["local_saving_ms_p50"] == 60 + 80 - 80
    (iv,) = f.occurrences[0].interventions
    assert isinstance(iv, RunConcurrently) and len(iv.span_ids) == 2  # users, cart; prices stays after


def test_a_single_trace_of_calls_taking_inputs_is_not_claimed_at_medium_confidence() -> None:
    """Too few instances to judge the order is no evidence of independence: calls that take inputs
    get the weak treatment (the last call kept after the others, confidence 0.3)."""
    (f,) = detect(checkout())
    assert f.confidence == serialized_calls.UNCHECKED_CONFIDENCE
    assert f.evidence["independence_unverified"] is True and f.evidence["local_saving_ms_p50"] == 60


def test_fixed_order_calls_taking_inputs_with_a_small_saving_are_a_near_miss() -> None:
    """Healthy twin: the same fixed-order shape with a 10 ms saving in a 400 ms request (< 20 ms)."""

    def small() -> TraceBuilder:
        b = TraceBuilder(service="frontend")
        root = b.span("GET /checkout", start_ms=0, dur_ms=400, kind=KIND_SERVER)
        for i, (name, dur) in enumerate([("users", 10), ("cart", 12), ("prices", 50)]):
            b.span(f"GET {name}", parent=root, start_ms=10 + 30 * i, dur_ms=dur, kind=KIND_CLIENT,
                   http_method="GET", http_url=f"http://{name}/api/{name}/42")  # fmt: skip
        return b

    ctx = AnalysisContext.from_table(spans_table([small() for _ in range(12)]))
    assert serialized_calls.detect(ctx) == []
    (miss,) = [m for m in ctx.near_misses if m.kind == "serialized_calls"]
    assert "order fixed in 12 instances and 3 calls take inputs" in miss.reason
    assert "< 40.0 ms floor" in miss.reason and miss.traces == 12


def test_a_fixed_two_call_chain_taking_inputs_gives_nothing() -> None:
    """Lookup-then-use (HotROD's customer before the driver search): a chain of two stays quiet."""
    for traces in (12, 3):  # also with too few instances to judge the order
        ctx = AnalysisContext.from_table(
            spans_table([checkout(order=("users", "cart")) for _ in range(traces)])
        )
        assert serialized_calls.detect(ctx) == []
        assert any("a chain of two calls" in m.reason for m in ctx.near_misses)


def test_a_rare_serialized_instance_of_a_caller_gives_nothing() -> None:
    rare = [checkout(order=o) for o in [("users", "cart", "prices"), ("cart", "users", "prices")]]
    parallel = [checkout(overlap=True) for _ in range(18)]
    assert detect(*rare, *parallel) == []


def test_same_operation_repeated_is_left_to_n_plus_one() -> None:
    b = TraceBuilder(service="orders")
    root = b.span("GET /orders", start_ms=0, dur_ms=200, kind=KIND_SERVER)
    for i in range(8):
        b.span("SELECT", parent=root, start_ms=5 + i * 20, dur_ms=19, kind=KIND_CLIENT, db_system="mysql",
               db_statement=f"SELECT * FROM items WHERE id = {i}")  # fmt: skip
    assert detect(b) == []


def test_calls_under_an_async_branch_are_not_reported() -> None:
    b = TraceBuilder(service="frontend")
    root = b.span("GET /page", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    job = b.span("background refresh", parent=root, start_ms=50, dur_ms=400)  # outlives the request
    b.span("GET a", parent=job, start_ms=60, dur_ms=150, kind=KIND_CLIENT, http_url="http://a/x")
    b.span("GET b", parent=job, start_ms=211, dur_ms=150, kind=KIND_CLIENT, http_url="http://b/y")
    assert detect(b) == []


def _fixed_order_page(
    *, urls: tuple[str, ...], statements: tuple[str | None, ...] | None = None
) -> TraceBuilder:
    """frontend GET /home making the same calls in the same order every time."""
    b = TraceBuilder(service="frontend")
    root = b.span("GET /home", start_ms=0, dur_ms=300, kind=KIND_SERVER)
    t = 5.0
    for i, url in enumerate(urls):
        statement = statements[i] if statements else None
        if statement:
            b.span("SELECT", parent=root, start_ms=t, dur_ms=40, kind=KIND_CLIENT, db_system="postgresql",
                   db_statement=statement)  # fmt: skip
        else:
            b.span(f"GET {url}", parent=root, start_ms=t, dur_ms=40, kind=KIND_CLIENT, http_method="GET",
                   http_url=f"http://backend{url}")  # fmt: skip
        t += 41
    return b


def test_fixed_order_calls_that_take_no_input_are_reported() -> None:
    """Same order every time, but the later calls take nothing an earlier one could produce
    (parameterless GETs): they can all start at the beginning of the sequence."""
    findings = detect(*[_fixed_order_page(urls=("/banner", "/menu", "/footer")) for _ in range(12)])
    assert len(findings) == 1
    assert findings[0].evidence["order_fixed"] is True
    assert findings[0].evidence["calls_taking_input"] == 0
    assert findings[0].confidence < 0.7  # weaker than measured independence


def test_fixed_order_with_one_parameterised_call_first_is_still_shiftable() -> None:
    statements = ("SELECT * FROM users WHERE id = $1", "SELECT * FROM settings", "SELECT count(*) FROM news")
    findings = detect(*[_fixed_order_page(urls=("", "", ""), statements=statements) for _ in range(12)])
    assert len(findings) == 1 and findings[0].evidence["calls_taking_input"] == 1


def test_fixed_order_calls_that_take_input_stay_quiet() -> None:
    """ids first, then WHERE id IN (...): two calls with inputs in a fixed order look exactly like a
    data dependency."""
    statements = (
        "SELECT id FROM orders WHERE customer_id = $1",
        "SELECT * FROM items WHERE order_id IN ($1, $2)",
    )
    assert detect(*[_fixed_order_page(urls=("", ""), statements=statements) for _ in range(12)]) == []
    with_ids = [_fixed_order_page(urls=("/customer?customer=123", "/driver/42")) for _ in range(12)]
    assert detect(*with_ids) == []


def _overlap_pairs_by_definition(calls: list[tuple[int, int, int]], tol: int) -> set[tuple[int, int]]:
    """The pairs of operation keys (sorted) such that a call C of one starts before a call D of the
    other that precedes C in (start, end, key) order ends, less ``tol``: every pair of calls."""
    ordered = sorted(calls)
    pairs = set()
    for j, (start_c, _, op_c) in enumerate(ordered):
        for _, end_d, op_d in ordered[:j]:
            if op_d != op_c and start_c < end_d - tol:
                pairs.add((min(op_c, op_d), max(op_c, op_d)))
    return pairs


def test_the_overlapping_pairs_of_an_instance_are_every_pair_of_calls_checked() -> None:
    """``_patterns``' overlaps (swept per call, intervals merged per operation) are exactly the
    pairs of operations a check of every pair of calls finds: random instances with ties in starts
    and ends, zero-length calls, fan-outs of one operation, calls nested in others."""
    rnd = random.Random(5)
    tol = 3
    for _ in range(60):
        rows, want = [], {}
        for row in range(rnd.randint(1, 6)):
            ops = [rnd.getrandbits(63) for _ in range(rnd.randint(1, 7))]
            calls = []
            for _ in range(rnd.randint(1, 25)):
                start = rnd.randint(0, 30)
                calls.append((start, start + rnd.choice([0, 0, 1, 2, 5, 10, 40]), rnd.choice(ops)))
            want[row] = _overlap_pairs_by_definition(calls, tol)
            rows += [
                {"parent_row": row, "caller": 1, "op": op, "start_ns": s, "end_ns": e, "tol": tol}
                for s, e, op in calls
            ]
        seen = pl.DataFrame(rows, schema_overrides={"op": pl.UInt64, "caller": pl.UInt64})
        got = serialized_calls._patterns(seen)
        # back from (caller, order, overlaps, instances) to each instance's pairs of operation keys
        by_pattern: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for order, overlaps, instances in got.select("order", "overlaps", "instances").iter_rows():
            pairs = tuple(
                sorted(
                    (min(order[p // 2**32], order[p % 2**32]), max(order[p // 2**32], order[p % 2**32]))
                    for p in overlaps
                )
            )
            by_pattern[(tuple(order), pairs)] = by_pattern.get((tuple(order), pairs), 0) + instances
        expected: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for row in want:
            calls = [(r["start_ns"], r["op"]) for r in rows if r["parent_row"] == row]
            first: dict[int, int] = {}
            for s, op in sorted(calls):
                first.setdefault(op, s)
            if len(first) < 2:
                continue  # (an instance of one operation holds no pattern: _instance_orders drops it)
            order = tuple(sorted(first, key=lambda k: (first[k], k)))
            key = (order, tuple(sorted(want[row])))
            expected[key] = expected.get(key, 0) + 1
        got_multi = {k: v for k, v in by_pattern.items() if len(k[0]) >= 2}
        assert got_multi == expected
