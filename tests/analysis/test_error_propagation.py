"""error_propagation on hand-built traces: failures that take the root down vs. contained ones."""

from __future__ import annotations

import random

from hourglass.analysis.detectors.error_propagation import detect
from hourglass.analysis.pipeline import analyze
from hourglass.collector.schema import (
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_OK,
    STATUS_UNSET,
)
from tests.analysis._assertions import one_finding, one_recommendation, run_detector
from tests.builders import TraceBuilder, repeated_trace, spans_table, spec


def checkout_trace(
    *, payment_fails: bool, root_fails: bool, via_silent_handler: bool = False
) -> TraceBuilder:
    """frontend GET /checkout → (handler) → POST /charge (client) → payment POST /charge → charge card."""
    b = TraceBuilder(service="frontend")
    root = b.span(
        "GET /checkout",
        start_ms=0,
        dur_ms=120,
        kind=KIND_SERVER,
        status_code=STATUS_ERROR if root_fails else STATUS_UNSET,
        http_status_code=500 if root_fails else 200,
    )
    parent = root
    if via_silent_handler:
        parent = b.span("checkout handler", parent=root, start_ms=1, dur_ms=115, kind=KIND_INTERNAL)
    b.span(
        "GET cart", parent=parent, start_ms=2, dur_ms=10, kind=KIND_CLIENT, peer="cart", http_status_code=200
    )
    status = STATUS_ERROR if payment_fails else STATUS_UNSET
    outcome = {"status_code": status, "http_status_code": 503 if payment_fails else 200}  # both sides
    call = b.span(
        "POST /charge", parent=parent, start_ms=15, dur_ms=60, kind=KIND_CLIENT, peer="payment", **outcome
    )
    server = b.span(
        "POST /charge", parent=call, start_ms=16, dur_ms=58, kind=KIND_SERVER, service="payment", **outcome
    )
    b.span("charge card", parent=server, start_ms=18, dur_ms=50, service="payment", status_code=status)
    return b


def analyse(builders: list[TraceBuilder]):
    return run_detector(detect, builders)


def test_dependency_failure_reaching_the_root_is_attributed_to_the_caller() -> None:
    traces = [checkout_trace(payment_fails=True, root_fails=True) for _ in range(5)]
    traces += [checkout_trace(payment_fails=False, root_fails=False) for _ in range(15)]
    f = one_finding(analyse(traces), "error_propagation", "fault_tolerance", "frontend", "GET /checkout")
    assert f.targets == [{"service": "payment", "operation": "POST /charge"}]
    assert f.requests_at_risk == 5
    assert len(f.occurrences) == 5 and len(f.trace_ids) == 5
    assert f.evidence["failed_root_requests"] == 5
    assert f.evidence["contained_traces"] == 0
    assert f.evidence["fallback_seen"] is False
    assert f.evidence["dependency_calls"] == 20
    assert f.evidence["dependency_errors"] == 5
    assert f.evidence["dependency_error_rate"] == 0.25
    assert f.evidence["root_operations"] == [
        {"service": "frontend", "operation": "GET /checkout", "failed_requests": 5, "requests": 20}
    ]
    assert f.evidence["chain"] == [
        "payment: POST /charge",
        "frontend: POST /charge",
        "frontend: GET /checkout",
    ]
    assert f.occurrences[0].interventions == ()
    # parent first: the calling operation, its call span, then the failing dependency's entry span
    first = f.occurrences[0]
    assert len(first.span_ids) == 3
    assert first.numbers["failed_dependency_spans"] == 1.0
    assert 0.5 < f.confidence <= 0.95


def test_failures_contained_by_a_fallback_are_not_reported() -> None:
    traces = [checkout_trace(payment_fails=True, root_fails=False) for _ in range(10)]
    assert analyse(traces) == []


def test_healthy_traffic_and_a_single_failed_request_are_not_reported() -> None:
    traces = [checkout_trace(payment_fails=False, root_fails=False) for _ in range(10)]
    traces.append(checkout_trace(payment_fails=True, root_fails=True))
    assert analyse(traces) == []


def test_a_fallback_seen_in_some_traces_lowers_confidence() -> None:
    always = analyse([checkout_trace(payment_fails=True, root_fails=True) for _ in range(6)])
    sometimes = analyse(
        [checkout_trace(payment_fails=True, root_fails=True) for _ in range(6)]
        + [checkout_trace(payment_fails=True, root_fails=False) for _ in range(6)]
    )
    assert len(always) == len(sometimes) == 1
    assert sometimes[0].evidence["contained_traces"] == 6
    assert sometimes[0].evidence["fallback_seen"] is True
    assert sometimes[0].confidence < always[0].confidence
    assert sometimes[0].requests_at_risk == always[0].requests_at_risk == 6


def test_silent_internal_spans_pass_the_error_on() -> None:
    findings = analyse(
        [checkout_trace(payment_fails=True, root_fails=True, via_silent_handler=True) for _ in range(3)]
    )
    assert [(f.service, f.operation, f.requests_at_risk) for f in findings] == [
        ("frontend", "checkout handler", 3)
    ]


def test_an_explicitly_successful_intermediate_span_contains_the_error() -> None:
    traces = repeated_trace(
        4,
        "orders",
        spec("POST /orders", 0, 50, kind=KIND_SERVER, status_code=STATUS_ERROR),
        spec("load prices with fallback", 1, 30, status_code=STATUS_OK),
        spec("GET /prices", 2, 20, kind=KIND_CLIENT, peer="pricing", status_code=STATUS_ERROR),
    )
    assert analyse(traces) == []


def test_failing_database_call_is_attributed_to_the_service_that_queries_it() -> None:
    traces = repeated_trace(
        3,
        "gateway",
        spec("GET /orders/{id}", 0, 40, kind=KIND_SERVER, http_status_code=502),
        spec("GET /orders/{id}", 1, 35, kind=KIND_CLIENT, peer="orders", http_status_code=500),
        spec("GET /orders/{id}", 2, 33, kind=KIND_SERVER, service="orders", http_status_code=500),
        spec(
            "SELECT orders",
            3,
            30,
            kind=KIND_CLIENT,
            service="orders",
            db_system="postgresql",
            status_code=STATUS_ERROR,
        ),
    )
    findings = analyse(traces)
    assert len(findings) == 1
    f = findings[0]
    assert (f.service, f.operation) == ("orders", "GET /orders/{id}")
    assert f.targets == [{"service": "postgresql", "operation": "SELECT orders"}]
    assert f.requests_at_risk == 3
    assert f.evidence["chain"][0] == "orders: SELECT orders"
    assert f.evidence["chain"][-1] == "gateway: GET /orders/{id}"


def test_errors_born_in_the_root_service_itself_are_not_dependency_failures() -> None:
    traces = repeated_trace(
        4,
        "api",
        spec("POST /login", 0, 20, kind=KIND_SERVER, status_code=STATUS_ERROR),
        spec("validate password", 1, 5, status_code=STATUS_ERROR),
    )
    assert analyse(traces) == []


def test_orphan_chains_never_count_as_reaching_the_root() -> None:
    traces = repeated_trace(
        4,
        "payment",
        spec("POST /charge", 0, 20, parent="00000000deadbeef", kind=KIND_SERVER, status_code=STATUS_ERROR),
        spec("charge card", 1, 10, kind=KIND_CLIENT, peer="bank", status_code=STATUS_ERROR),
    )
    assert analyse(traces) == []


def test_a_fallback_used_by_another_caller_lowers_confidence() -> None:
    def traces(service: str, root_status: int) -> list[TraceBuilder]:
        return repeated_trace(
            4,
            service,
            spec("GET /page", 0, 30, kind=KIND_SERVER, status_code=root_status),
            spec(
                "GET /recommendations", 1, 20, kind=KIND_CLIENT, peer="recommender", status_code=STATUS_ERROR
            ),
        )

    alone = analyse(traces("web", STATUS_ERROR))
    with_other = analyse(traces("web", STATUS_ERROR) + traces("mobile-bff", STATUS_UNSET))
    assert [f.service for f in with_other] == ["web"]
    assert with_other[0].evidence["contained_by_other_callers_traces"] == 4
    assert with_other[0].confidence < alone[0].confidence


def test_end_to_end_the_report_carries_the_propagation_finding_ranked_by_risk() -> None:
    traces = [checkout_trace(payment_fails=True, root_fails=True) for _ in range(4)]
    traces += [checkout_trace(payment_fails=True, root_fails=False) for _ in range(2)]
    traces += [checkout_trace(payment_fails=False, root_fails=False) for _ in range(14)]
    report = analyze(spans_table(traces))
    rec = one_recommendation(report, "error_propagation", "fault_tolerance", "frontend", "GET /checkout")
    assert rec["targets"] == [{"service": "payment", "operation": "POST /charge"}]
    assert rec["traces_affected"] == 4
    assert rec["impact"]["saved_ms_p50"] is None
    assert rec["evidence"]["requests_at_risk"] == 4
    assert rec["evidence"]["contained_traces"] == 2
    assert rec["evidence"]["dependency_error_rate"] == 0.3
    assert rec["rank"] >= 1 and 0 < rec["confidence"] <= 1
    assert "POST /charge" in rec["title"] and rec["summary"] and rec["actions"]


def _reference_findings(builders: list[TraceBuilder]) -> dict[tuple[str, str, str, str], set[str]]:
    """The rule of the module docstring, walked span by span in plain Python (small inputs only)."""
    result: dict[tuple[str, str, str, str], set[str]] = {}
    for b in builders:
        spans = {r["span_id"]: r for r in b.rows}
        children: dict[str, list[str]] = {}
        for r in b.rows:
            if r["parent_span_id"]:
                children.setdefault(r["parent_span_id"], []).append(r["span_id"])

        def failed(r: dict) -> bool:
            code = r["http_status_code"]
            return r["status_code"] == STATUS_ERROR or (
                r["status_code"] != STATUS_OK and code is not None and (code >= 500 or code == 429)
            )

        def outgoing(r: dict) -> bool:
            return r["kind"] == KIND_CLIENT or r["db_system"] is not None

        def silent(r: dict) -> bool:
            return (
                r["kind"] == KIND_INTERNAL
                and r["status_code"] == STATUS_UNSET
                and r["http_status_code"] is None
            )

        for r in b.rows:
            if not failed(r) or not r["parent_span_id"]:
                continue
            if any(failed(spans[c]) for c in children.get(r["span_id"], [])):
                continue
            if outgoing(r):
                dep = call = r
            else:
                dep = r
                while dep["parent_span_id"] and spans[dep["parent_span_id"]]["service"] == dep["service"]:
                    dep = spans[dep["parent_span_id"]]
                if not dep["parent_span_id"] or not failed(dep):
                    continue
                call = spans[dep["parent_span_id"]]
            caller = spans[call["parent_span_id"]] if outgoing(call) and call["parent_span_id"] else call
            node, propagated = dep, True
            while node["parent_span_id"]:
                node = spans[node["parent_span_id"]]
                is_root = not node["parent_span_id"]
                if not (failed(node) or (silent(node) and not is_root)):
                    propagated = False
                    break
            if not propagated:
                continue
            target = (dep["peer"] or dep["db_system"] or dep["name"]) if outgoing(dep) else dep["service"]
            key = (call["service"], caller["name"], target, dep["name"])
            result.setdefault(key, set()).add(b.trace_id)
    return {k: v for k, v in result.items() if len(v) >= 2}


def test_vectorised_rule_matches_a_plain_walk_on_random_trees() -> None:
    rng = random.Random(20261128)
    services = ["gateway", "orders", "stock"]
    builders = []
    for _ in range(150):
        b = TraceBuilder(service="gateway")
        root = b.span(
            "GET /page",
            start_ms=0,
            dur_ms=1000,
            kind=KIND_SERVER,
            status_code=rng.choice([STATUS_ERROR, STATUS_UNSET, STATUS_UNSET]),
        )
        nodes = [(root, "gateway", 0.0, 1000.0)]
        for _ in range(rng.randint(1, 12)):
            parent, parent_service, start, dur = rng.choice(nodes)
            service = rng.choice([parent_service, parent_service, rng.choice(services)])
            kind = rng.choice([KIND_CLIENT, KIND_SERVER, KIND_INTERNAL])
            child_start, child_dur = start + dur * 0.05, dur * 0.8
            status = rng.choice([STATUS_ERROR, STATUS_UNSET, STATUS_UNSET, STATUS_OK])
            sid = b.span(
                f"op{rng.randint(0, 3)}",
                parent=parent,
                start_ms=child_start,
                dur_ms=child_dur,
                service=service,
                kind=kind,
                status_code=status,
                peer=rng.choice([None, "db-host"]) if kind == KIND_CLIENT else None,
                db_system=rng.choice([None, None, "postgresql"]),
                http_status_code=rng.choice([None, None, 500, 200]),
            )
            nodes.append((sid, service, child_start, child_dur))
        builders.append(b)
    expected = _reference_findings(builders)
    found = {
        (f.service, f.operation, f.targets[0]["service"], f.targets[0]["operation"]): set(f.trace_ids)
        for f in analyse(builders)
    }
    assert expected, "the random traces should contain propagating failures"
    assert found == expected
