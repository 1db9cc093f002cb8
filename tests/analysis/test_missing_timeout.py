"""missing_timeout on hand-built traces: hanging calls vs. always-slow ones and calls cut by a timeout."""

from __future__ import annotations

import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors.missing_timeout import detect
from hourglass.analysis.model import ShortenSpan
from hourglass.analysis.pipeline import analyze
from hourglass.analysis.whatif import WhatIf
from hourglass.collector.schema import KIND_CLIENT, KIND_PRODUCER, KIND_SERVER, STATUS_ERROR, STATUS_UNSET
from tests.analysis._assertions import one_finding, one_recommendation, run_detector
from tests.builders import TraceBuilder, spans_table

USUAL_MS = [18.0, 19.0, 20.0, 21.0, 22.0]


def home_trace(
    ads_ms: float,
    *,
    status: int = STATUS_UNSET,
    message: str | None = None,
    kind: int = KIND_CLIENT,
    traced_callee: bool = False,
) -> TraceBuilder:
    """frontend GET /home: GET /user (5 ms), then GET /ads (ads_ms), then render (3 ms)."""
    b = TraceBuilder(service="frontend")
    root = b.span("GET /home", start_ms=0, dur_ms=5 + ads_ms + 10, kind=KIND_SERVER)
    b.span("GET /user", parent=root, start_ms=1, dur_ms=3, kind=KIND_CLIENT, peer="users")
    call = b.span(
        "GET /ads",
        parent=root,
        start_ms=5,
        dur_ms=ads_ms,
        kind=kind,
        peer="ads",
        status_code=status,
        status_message=message,
    )
    if traced_callee:
        b.span("GET /ads", parent=call, start_ms=5.5, dur_ms=ads_ms - 1, kind=KIND_SERVER, service="ads")
    b.span("render", parent=root, start_ms=6 + ads_ms, dur_ms=3)
    return b


def usual(n: int, **kwargs) -> list[TraceBuilder]:
    return [home_trace(USUAL_MS[i % len(USUAL_MS)], **kwargs) for i in range(n)]


def analyse(builders: list[TraceBuilder]):
    return run_detector(detect, builders)


def test_calls_hanging_far_past_their_usual_time_get_a_timeout_recommendation() -> None:
    hung = [home_trace(ms) for ms in (2_000.0, 3_500.0, 5_200.0)]
    f = one_finding(analyse(usual(30) + hung), "missing_timeout", "fault_tolerance", "frontend", "GET /home")
    assert f.targets == [{"service": "ads", "operation": "GET /ads"}]
    assert f.requests_at_risk == 3
    assert sorted(f.trace_ids) == sorted(b.trace_id for b in hung)
    ev = f.evidence
    assert ev["calls"] == 33
    assert ev["p50_ms"] == 20.0
    assert ev["longest_ms"] == 5_200.0
    assert ev["slow_calls_without_timeout"] == 3
    assert ev["timed_out_calls"] == 0
    assert 40.0 <= ev["suggested_timeout_ms"] <= 46.0  # 2 × p99 of the healthy calls (≈ 22 ms)
    assert ev["p99_ms"] > ev["p99_healthy_ms"]
    longest = max(f.occurrences, key=lambda o: o.numbers["longest_ms"])
    (cut,) = longest.interventions
    assert isinstance(cut, ShortenSpan)
    assert cut.by_ns == pytest.approx((5_200.0 - ev["suggested_timeout_ms"]) * 1e6, rel=1e-6)
    assert cut.span_id == longest.span_ids[1]  # the parent first, then the hanging call
    assert ev["held_past_timeout_ms_total"] == pytest.approx(
        sum(ms - ev["suggested_timeout_ms"] for ms in (2_000.0, 3_500.0, 5_200.0)), rel=1e-6
    )
    assert 0.5 <= f.confidence <= 0.95


def test_an_operation_that_is_always_slow_has_no_outliers() -> None:
    traces = [home_trace(2_000.0 + 50 * (i % 7)) for i in range(30)]
    assert analyse(traces) == []


def test_a_single_hanging_call_is_not_enough() -> None:
    assert analyse([*usual(30), home_trace(4_000.0)]) == []


def test_calls_cut_at_a_consistent_ceiling_already_have_a_timeout() -> None:
    capped = [home_trace(ms, status=STATUS_ERROR) for ms in (1_000.2, 1_000.9, 1_001.5, 1_000.4)]
    assert analyse(usual(30) + capped) == []


def test_calls_ending_in_a_timeout_error_already_have_a_deadline() -> None:
    timed_out = [
        home_trace(ms, status=STATUS_ERROR, message="context deadline exceeded")
        for ms in (800.0, 1_900.0, 3_100.0)
    ]
    assert analyse(usual(30) + timed_out) == []


def test_asynchronous_hand_offs_hold_nothing_up() -> None:
    traces = [home_trace(USUAL_MS[i % 5], kind=KIND_PRODUCER) for i in range(30)]
    traces += [home_trace(ms, kind=KIND_PRODUCER) for ms in (2_000.0, 3_000.0, 4_000.0)]
    assert analyse(traces) == []


def test_the_deadline_goes_on_the_lowest_hanging_call_not_every_caller() -> None:
    def trace(db_ms: float) -> TraceBuilder:
        b = TraceBuilder(service="gateway")
        root = b.span("GET /orders", start_ms=0, dur_ms=db_ms + 20, kind=KIND_SERVER)
        call = b.span(
            "GET /orders", parent=root, start_ms=1, dur_ms=db_ms + 15, kind=KIND_CLIENT, peer="orders"
        )
        server = b.span(
            "GET /orders", parent=call, start_ms=2, dur_ms=db_ms + 12, kind=KIND_SERVER, service="orders"
        )
        load = b.span("load", parent=server, start_ms=3, dur_ms=db_ms + 8, service="orders")
        b.span(
            "SELECT orders",
            parent=load,
            start_ms=4,
            dur_ms=db_ms,
            kind=KIND_CLIENT,
            service="orders",
            db_system="postgresql",
        )
        return b

    findings = analyse([trace(5.0 + i % 3) for i in range(25)] + [trace(ms) for ms in (1_500.0, 2_500.0)])
    assert [(f.service, f.operation, f.targets) for f in findings] == [
        ("orders", "load", [{"service": "postgresql", "operation": "SELECT orders"}])
    ]


def test_traced_callee_names_the_target_and_an_uninstrumented_caller_is_blamed_via_the_parent() -> None:
    traced = analyse(
        usual(25, traced_callee=True) + [home_trace(ms, traced_callee=True) for ms in (900.0, 1_700.0)]
    )
    assert [(f.service, f.operation, f.targets) for f in traced] == [
        ("frontend", "GET /home", [{"service": "ads", "operation": "GET /ads"}])
    ]

    def bare(ms: float) -> TraceBuilder:
        b = TraceBuilder(service="frontend")
        root = b.span("GET /home", start_ms=0, dur_ms=ms + 10, kind=KIND_SERVER)
        handler = b.span("load ads", parent=root, start_ms=1, dur_ms=ms + 4)
        b.span("GET /ads", parent=handler, start_ms=2, dur_ms=ms, kind=KIND_SERVER, service="ads")
        return b

    findings = analyse([bare(USUAL_MS[i % 5]) for i in range(25)] + [bare(ms) for ms in (1_200.0, 2_600.0)])
    assert [(f.service, f.operation, f.targets) for f in findings] == [
        ("frontend", "load ads", [{"service": "ads", "operation": "GET /ads"}])
    ]


def test_the_what_if_engine_measures_the_deadline_saving_at_the_root() -> None:
    ctx = AnalysisContext.from_table(
        spans_table(usual(30) + [home_trace(ms) for ms in (2_000.0, 3_500.0, 5_200.0)])
    )
    (finding,) = detect(ctx)
    impact = WhatIf(ctx).impact(finding)
    held_ms = {o.trace_id: o.numbers["held_past_timeout_ms"] for o in finding.occurrences}
    saved_ms = dict(zip(impact.trace_ids, (impact.saved_ns / 1e6).tolist(), strict=True))
    assert saved_ms == pytest.approx(held_ms, abs=0.01)


def test_end_to_end_the_report_carries_the_timeout_finding_with_its_root_saving() -> None:
    hung = [home_trace(ms) for ms in (2_000.0, 3_500.0, 5_200.0)]
    report = analyze(spans_table(usual(30) + hung))
    rec = one_recommendation(report, "missing_timeout", "fault_tolerance", "frontend", "GET /home")
    assert rec["rank"] == 1
    assert rec["traces_affected"] == 3
    impact = rec["impact"]
    assert impact["saved_ms_p50"] == pytest.approx(3_500.0 - rec["evidence"]["suggested_timeout_ms"], abs=0.5)
    assert impact["saved_ms_total"] > impact["saved_ms_p95"] >= impact["saved_ms_p50"] > 0
    assert 0.9 < impact["share_of_root_latency"] < 1.0
    assert rec["evidence"]["requests_at_risk"] == 3
    assert rec["evidence"]["interventions"]  # exemplar deadlines for the report's "after" view
    assert "GET /ads" in rec["title"] and rec["summary"] and rec["actions"]


def test_slow_calls_split_across_callers_need_two_requests_each() -> None:
    def trace(root: str, ads_ms: float) -> TraceBuilder:
        b = TraceBuilder(service="frontend")
        handler = b.span(root, start_ms=0, dur_ms=ads_ms + 10, kind=KIND_SERVER)
        b.span("GET /ads", parent=handler, start_ms=5, dur_ms=ads_ms, kind=KIND_CLIENT, peer="ads")
        return b

    traces = [trace("GET /home" if i % 2 else "GET /cart", USUAL_MS[i % 5]) for i in range(30)]
    assert analyse([*traces, trace("GET /home", 2_500.0), trace("GET /cart", 3_100.0)]) == []
    findings = analyse([*traces, trace("GET /home", 2_500.0), trace("GET /home", 3_100.0)])
    assert [(f.operation, f.requests_at_risk) for f in findings] == [("GET /home", 2)]


def test_a_very_fast_operation_gets_a_practical_minimum_deadline() -> None:
    fast = [home_trace(0.3 + 0.05 * (i % 3)) for i in range(30)]
    findings = analyse([*fast, home_trace(900.0), home_trace(1_400.0)])
    (f,) = findings
    assert f.evidence["suggested_timeout_ms"] == 10.0
    assert {o.interventions[0].by_ns for o in f.occurrences} == {890_000_000, 1_390_000_000}


def test_without_peer_the_url_host_names_the_target() -> None:
    def trace(ms: float) -> TraceBuilder:
        b = TraceBuilder(service="frontend")
        root = b.span("GET /home", start_ms=0, dur_ms=ms + 10, kind=KIND_SERVER)
        b.span(
            "GET ads",
            parent=root,
            start_ms=5,
            dur_ms=ms,
            kind=KIND_CLIENT,
            http_url="http://ads.internal/v1/ads",
        )
        return b

    (f,) = analyse([trace(USUAL_MS[i % 5]) for i in range(25)] + [trace(1_500.0), trace(2_200.0)])
    assert f.targets == [{"service": "ads.internal", "operation": "GET ads"}]


def test_calls_that_stay_open_by_design_are_not_judged() -> None:
    def trace(ms: float) -> TraceBuilder:
        b = TraceBuilder(service="frontend")
        root = b.span("GET /feed", start_ms=0, dur_ms=ms + 10, kind=KIND_SERVER)
        b.span("LongPoll updates", parent=root, start_ms=5, dur_ms=ms, kind=KIND_CLIENT, peer="feed")
        return b

    assert analyse([trace(USUAL_MS[i % 5]) for i in range(25)] + [trace(1_500.0), trace(2_200.0)]) == []


def two_endpoint_trace(customer_ms: float, route_ms: float, routes: int = 4) -> TraceBuilder:
    """HotROD's frontend: ``HTTP GET`` to /customer, then ``routes`` × ``HTTP GET`` to /route (the last
    one taking ``route_ms``, the others 50 ms), all to one host."""
    b = TraceBuilder(service="frontend")
    calls = [("/customer?customer=123", customer_ms)] + [("/route?pickup=1%2C2", 50.0)] * (routes - 1)
    calls.append(("/route?pickup=3%2C4", route_ms))
    root = b.span("/dispatch", start_ms=0, dur_ms=sum(ms + 1 for _, ms in calls) + 5, kind=KIND_SERVER)
    start = 1.0
    for path, ms in calls:
        b.span(
            "HTTP GET",
            parent=root,
            start_ms=start,
            dur_ms=ms,
            kind=KIND_CLIENT,
            peer="0.0.0.0",
            http_method="GET",
            http_url=f"http://0.0.0.0:8081{path}",
        )
        start += ms + 1
    return b


def test_generic_http_names_are_judged_per_endpoint() -> None:
    """A slow endpoint is not a hung call of a fast endpoint that shares its generic span name."""
    slow_customer = [300.0 + 60 * (i % 25) for i in range(25)]  # 0.3-1.7 s: a lock convoy, not a hang
    builders = [two_endpoint_trace(ms, 50.0) for ms in slow_customer]
    assert analyse(builders) == []
    # A real hang on one endpoint is still found, and judged against that endpoint's latency.
    hung = [two_endpoint_trace(400.0, ms) for ms in (2_000.0, 3_100.0)]
    (f,) = analyse(builders + hung)
    assert f.evidence["calls"] == 27 * 4
    assert f.evidence["p50_ms"] == 50.0
    assert f.evidence["longest_ms"] == 3_100.0
    assert sorted(f.trace_ids) == sorted(b.trace_id for b in hung)
