"""retry_without_backoff on hand-built traces: immediate retry bursts vs. backoff and other repeats."""

from __future__ import annotations

import itertools
import random

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors.retry_without_backoff import detect
from hourglass.analysis.pipeline import analyze
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_UNSET
from tests.analysis._assertions import one_finding, one_recommendation, run_detector
from tests.builders import TraceBuilder, repeated_trace, spans_table, spec


def product_trace(
    gaps_ms: list[float],
    *,
    outcomes: list[bool],
    attempt_ms: float = 8,
    traced_callee: bool = False,
    url: str | None = "http://inventory/items/42",
    resend_attr: bool = False,
    mark_failures: bool = True,
) -> TraceBuilder:
    """GET /product calls GET /inventory len(outcomes) times; outcome True = success; gaps between."""
    assert len(gaps_ms) == len(outcomes) - 1
    b = TraceBuilder(service="product")
    total = len(outcomes) * attempt_ms + sum(gaps_ms) + 10
    root = b.span("GET /product", start_ms=0, dur_ms=total, kind=KIND_SERVER)
    t = 2.0
    for i, ok in enumerate(outcomes):
        failed = not ok and mark_failures
        call = b.span(
            "GET /inventory",
            parent=root,
            start_ms=t,
            dur_ms=attempt_ms,
            kind=KIND_CLIENT,
            peer="inventory",
            http_url=url,
            status_code=STATUS_ERROR if failed else STATUS_UNSET,
            http_status_code=503 if failed else 200,
            hints={"http.request.resend_count": i} if resend_attr and i > 0 else None,
        )
        if traced_callee:
            b.span(
                "GET /items/{id}",
                parent=call,
                start_ms=t + 0.5,
                dur_ms=attempt_ms - 1,
                kind=KIND_SERVER,
                service="inventory",
                status_code=STATUS_ERROR if failed else STATUS_UNSET,
            )
        t += attempt_ms + (gaps_ms[i] if i < len(gaps_ms) else 0)
    b.span("render", parent=root, start_ms=t + 1, dur_ms=3)
    return b


def analyse(builders: list[TraceBuilder]):
    return run_detector(detect, builders)


def test_immediate_retries_of_a_failing_call_are_one_finding() -> None:
    traces = [product_trace([0.2, 0.1, 0.3], outcomes=[False, False, False, True]) for _ in range(5)]
    traces += [product_trace([], outcomes=[True]) for _ in range(5)]
    f = one_finding(analyse(traces), "retry_without_backoff", "fault_tolerance", "product", "GET /product")
    assert f.targets == [{"service": "inventory", "operation": "GET /inventory"}]
    assert f.requests_at_risk == 5
    assert len(f.occurrences) == 5 and len(f.trace_ids) == 5
    ev = f.evidence
    assert ev["bursts"] == 5
    assert ev["attempts_per_burst_p50"] == 4 and ev["attempts_per_burst_max"] == 4
    assert ev["retries_total"] == 15
    assert 0.1 <= ev["gap_ms_p50"] <= 0.3 and ev["gap_ms_max"] == 0.3
    assert ev["exhausted_bursts"] == 0
    assert ev["failure_status_codes"] == {"503": 15}
    assert ev["retried_operations"] == ["GET /inventory"]
    assert ev["pattern"] == "immediate"
    assert ev["gap_ms_p50_by_retry_index"] == [0.2, 0.1, 0.3]
    assert ev["explicit_attempt_attributes"] is False
    occ = f.occurrences[0]
    assert len(occ.span_ids) == 5  # the parent, then the four attempts
    assert occ.numbers["attempts"] == 4 and occ.numbers["failed_attempts"] == 3
    assert occ.interventions == ()
    assert f.confidence >= 0.6


def test_retries_with_exponential_backoff_are_healthy() -> None:
    traces = [product_trace([100, 200, 400], outcomes=[False, False, False, True]) for _ in range(5)]
    assert analyse(traces) == []


def test_small_but_growing_gaps_are_backoff() -> None:
    traces = [product_trace([0.5, 1, 2, 8], outcomes=[False, False, False, False, True]) for _ in range(5)]
    assert analyse(traces) == []


def test_a_single_failure_is_not_a_retry() -> None:
    traces = [product_trace([], outcomes=[False]) for _ in range(5)]
    assert analyse(traces) == []


def test_repeated_successful_calls_are_not_retries() -> None:
    traces = [product_trace([0.1, 0.1, 0.1], outcomes=[True, True, True, True]) for _ in range(5)]
    assert analyse(traces) == []


def test_failing_calls_to_different_urls_are_a_loop_not_a_retry() -> None:
    calls = [
        spec("GET /inventory", 2 + i * 10, 10, under=0, kind=KIND_CLIENT, peer="inventory",
             http_url=f"http://inventory/items/{i}", status_code=STATUS_ERROR)
        for i in range(4)
    ]  # fmt: skip
    traces = repeated_trace(3, "product", spec("GET /products", 0, 60, kind=KIND_SERVER), *calls)
    assert analyse(traces) == []


def test_hedged_concurrent_copies_are_not_retries() -> None:
    calls = [
        spec("GET /inventory", 2 + i, 30, under=0, kind=KIND_CLIENT, peer="inventory",
             status_code=STATUS_ERROR if i < 2 else STATUS_UNSET)
        for i in range(3)
    ]  # fmt: skip
    traces = repeated_trace(3, "product", spec("GET /product", 0, 40, kind=KIND_SERVER), *calls)
    assert analyse(traces) == []


def test_exhausted_bursts_and_traced_callee() -> None:
    traces = [product_trace([0.0, 0.0], outcomes=[False, False, False], traced_callee=True) for _ in range(3)]
    findings = analyse(traces)
    assert len(findings) == 1
    f = findings[0]
    assert f.targets == [{"service": "inventory", "operation": "GET /items/{id}"}]
    assert f.evidence["exhausted_bursts"] == 3 and f.evidence["exhausted_share"] == 1.0
    assert f.occurrences[0].numbers["exhausted"] == 1.0


def test_explicit_resend_count_marks_retries_even_without_error_status() -> None:
    traces = [
        product_trace([0.1, 0.1], outcomes=[False, False, True], resend_attr=True, mark_failures=False)
        for _ in range(4)
    ]
    findings = analyse(traces)
    assert len(findings) == 1
    assert findings[0].evidence["explicit_attempt_attributes"] is True
    assert findings[0].evidence["attempts_per_burst_max"] == 3
    plain = analyse([product_trace([0.1, 0.1], outcomes=[False, False, True]) for _ in range(4)])
    assert findings[0].confidence > plain[0].confidence


def test_exception_events_mark_a_failed_attempt() -> None:
    calls = [
        spec("SELECT job", 1 + i * 5.05, 5, under=0, kind=KIND_CLIENT, db_system="postgresql",
             events=[("exception", 1 + i * 5.05 + 4, {"exception.type": "OperationalError"})] if i < 2 else ())
        for i in range(3)
    ]  # fmt: skip
    traces = repeated_trace(3, "worker", spec("process job", 0, 40), *calls)
    findings = analyse(traces)
    assert [(f.service, f.operation, f.targets[0]["service"]) for f in findings] == [
        ("worker", "process job", "postgresql")
    ]
    assert findings[0].evidence["attempts_per_burst_max"] == 3


def test_a_constant_short_delay_that_never_grows_is_no_backoff() -> None:
    """Gaps of ~40 ms on every retry (a fixed sleep, or TCP delayed ACKs on an immediate loop)."""
    traces = [
        product_trace([40 + i % 3, 41, 40.5, 42], outcomes=[False, False, False, False, True])
        for i in range(6)
    ]
    findings = analyse(traces)
    assert len(findings) == 1
    ev = findings[0].evidence
    assert ev["pattern"] == "constant_short_delay"
    assert 40 <= ev["gap_ms_p50"] <= 42
    assert ev["immediate_gap_share"] == 0.0


def test_full_jitter_backoff_with_some_short_first_gaps_is_healthy() -> None:
    """Exponential backoff with full jitter: first waits can be tiny, later ones grow on the whole
    (though not in every sequence)."""
    first_gaps = [1.0, 3.0, 7.0, 2.0, 12.0, 0.5]
    traces = [
        product_trace([g, 35 + 5 * i, 90 + 7 * i if i % 2 else 20 + i], outcomes=[False, False, False, True])
        for i, g in enumerate(first_gaps)
    ]
    assert analyse(traces) == []


def test_a_backoff_whose_noise_flattened_a_few_bursts_is_healthy() -> None:
    """Exponential backoff from ~20 ms: most bursts grow (set aside), a few were flattened by
    scheduling delays (45, 40, 50 ms), and some bursts retried once. Judged alone, the bursts left
    look like a constant ~45 ms delay; over all the signature's bursts the gaps double."""
    traces = [product_trace([20, 45, 90], outcomes=[False, False, False, True]) for _ in range(10)]
    traces += [product_trace([45, 40, 50], outcomes=[False, False, False, True]) for _ in range(3)]
    traces += [product_trace([30], outcomes=[False, True]) for _ in range(2)]
    ctx = AnalysisContext.from_table(spans_table(traces))
    assert detect(ctx) == []
    (miss,) = [m for m in ctx.near_misses if m.kind == "retry_without_backoff"]
    assert "over all the bursts later retries wait" in miss.reason, miss


def test_a_fixed_sleep_path_beside_a_backoff_path_of_the_same_call_is_flagged() -> None:
    """One code path backs off (100, 200, 400 ms), another sleeps a fixed 20 ms (each as many
    bursts): over all the bursts the gaps grow, but the ones left wait less than the backoff's
    first gap, so they are no backoff flattened by noise (which only adds delay): reported."""
    traces = [product_trace([100, 200, 400], outcomes=[False, False, False, True]) for _ in range(5)]
    traces += [product_trace([20, 20, 20], outcomes=[False, False, False, True]) for _ in range(5)]
    (finding,) = analyse(traces)
    assert finding.evidence["pattern"] == "constant_short_delay"
    assert finding.evidence["bursts"] == 5 and finding.evidence["gap_ms_p50"] == 20


def test_a_constant_delay_is_flagged_though_jitter_makes_some_bursts_grow() -> None:
    """A fixed ~40 ms sleep with a few ms of jitter: half the 3-attempt bursts grow a little by
    chance. That is not backoff (no burst's last gap reaches 1.5 x its first)."""
    traces = [
        product_trace([40 + (3 if i % 2 else -1), 41, 42], outcomes=[False, False, False, True])
        for i in range(8)
    ]
    (finding,) = analyse(traces)
    assert finding.evidence["pattern"] == "constant_short_delay"
    assert finding.evidence["bursts"] == 8


def test_a_constant_delay_above_common_backoff_bases_is_not_flagged() -> None:
    traces = [product_trace([200, 200, 200], outcomes=[False, False, False, True]) for _ in range(5)]
    assert analyse(traces) == []


def test_end_to_end_the_report_carries_the_retry_finding_ranked_by_risk() -> None:
    traces = [product_trace([0.2, 0.1, 0.3], outcomes=[False, False, False, True]) for _ in range(5)]
    traces += [product_trace([100, 200, 400], outcomes=[False, False, False, True]) for _ in range(5)]
    traces += [product_trace([], outcomes=[True]) for _ in range(10)]
    report = analyze(spans_table(traces))
    assert report["traces_analyzed"] == 20
    rec = one_recommendation(report, "retry_without_backoff", "fault_tolerance", "product", "GET /product")
    assert rec["traces_affected"] == 5 and rec["occurrences"] == 5
    assert rec["impact"]["saved_ms_p50"] is None  # backoff adds latency: no saving is claimed
    assert rec["evidence"]["requests_at_risk"] == 5
    assert rec["evidence"]["trace_ids"] and rec["evidence"]["span_ids"]
    assert rec["rank"] >= 1 and 0 < rec["confidence"] <= 1
    assert "GET /inventory" in rec["title"] and rec["summary"] and rec["actions"]
    assert "immediately" in rec["summary"] and "up to 4" in rec["summary"]


def test_a_loop_over_unnamed_items_with_sporadic_failures_lowers_confidence() -> None:
    """GET /inventory repeated per item with no URL recorded: F S S F S looks like retries, or a loop."""
    looped = [product_trace([0.2] * 4, outcomes=[False, True, True, False, True], url=None) for _ in range(5)]
    retried = [product_trace([0.2], outcomes=[False, True], url=None) for _ in range(10)]  # as many bursts
    (loop_finding,) = analyse(looped)
    (retry_finding,) = analyse(retried)
    assert loop_finding.evidence["in_loop_share"] == 1.0
    assert retry_finding.evidence["in_loop_share"] == 0.0
    assert loop_finding.confidence < retry_finding.confidence


def test_a_caller_logging_its_retries_is_explicit_evidence() -> None:
    """HotROD-style: GetDriver per driver (no id recorded), the caller logs 'Retrying GetDriver after error'."""

    starts = list(itertools.accumulate([1.0] + [10.1] * 5))  # 1.0, then += 10.1
    calls = [
        spec("GetDriver", t, 10, under=0, kind=KIND_CLIENT, service="driver", peer="redis",
             status_code=STATUS_ERROR if failed else STATUS_UNSET)
        for t, failed in zip(starts, (False, True, False, False, True, False), strict=True)
    ]  # fmt: skip

    def traces(events: list) -> list[TraceBuilder]:
        return repeated_trace(
            5, "driver", spec("FindNearest", 0, 80, kind=KIND_SERVER, events=events), *calls
        )

    (plain,) = analyse(traces([]))
    (logged,) = analyse(traces([("error", 20, {"message": "Retrying GetDriver after error", "retry_no": 1})]))
    assert plain.targets == [{"service": "redis", "operation": "GetDriver"}]
    assert plain.evidence["in_loop_share"] == 1.0 and plain.evidence["retries_logged_by_caller"] is False
    assert logged.evidence["retries_logged_by_caller"] is True
    assert logged.confidence > plain.confidence


def test_the_finding_names_the_service_of_the_retrying_operation() -> None:
    """HotROD traces its redis calls under their own service ("redis-manual") while the retry loop is
    the driver's FindNearest handler: the finding names the driver, where the backoff goes."""
    calls = [
        spec("GetDriver", 1 + 10.1 * i, 10, under=0, kind=KIND_CLIENT, service="redis-manual",
             db_system="redis", status_code=STATUS_ERROR if failed else STATUS_UNSET)
        for i, failed in enumerate((True, False, False, True, False))
    ]  # fmt: skip
    root = spec("driver.DriverService/FindNearest", 0, 80, kind=KIND_SERVER)
    traces = repeated_trace(5, "driver", root, *calls)
    (f,) = analyse(traces)
    assert (f.service, f.operation) == ("driver", "driver.DriverService/FindNearest")
    assert f.targets == [{"service": "redis", "operation": "GetDriver"}]
    assert f.evidence["bursts"] == 10
    assert f.evidence["trace_ids"] == [b.trace_id for b in traces]  # exemplars: distinct traces


def test_without_peer_or_traced_callee_the_url_host_names_the_target() -> None:
    calls = [
        spec("POST charge", 2 + 31 * i, 30, under=0, kind=KIND_CLIENT,
             http_url="https://user@bank.example:8443/charge?x=1", status_code=STATUS_ERROR if i < 3 else 0)
        for i in range(4)
    ]  # fmt: skip
    (f,) = analyse(repeated_trace(3, "payments", spec("POST /pay", 0, 140, kind=KIND_SERVER), *calls))
    assert (f.service, f.operation, f.targets) == (
        "payments",
        "POST /pay",
        [{"service": "bank.example", "operation": "POST charge"}],
    )


def test_a_failed_server_side_marks_an_unmarked_client_attempt_as_failed() -> None:
    calls = [
        span
        for i in range(3)
        for span in (
            # old client instrumentation: no status, no HTTP code on the call; the error on its server side
            spec("GET /inventory", 1 + 8.1 * i, 8, under=0, kind=KIND_CLIENT, peer="inventory"),
            spec("GET /items/{id}", 1.5 + 8.1 * i, 7, kind=KIND_SERVER, service="inventory",
                 status_code=STATUS_ERROR if i < 2 else STATUS_UNSET),
        )
    ]  # fmt: skip
    (f,) = analyse(repeated_trace(3, "product", spec("GET /product", 0, 50, kind=KIND_SERVER), *calls))
    assert f.targets == [{"service": "inventory", "operation": "GET /items/{id}"}]
    assert f.evidence["attempts_per_burst_max"] == 3


def _noisy_bursts(policy: str, rng: random.Random) -> TraceBuilder:
    """One burst of 2-4 attempts of a handler with ``policy``, its gaps delayed as a loaded
    machine delays them: most by < 1 ms, one in seven by up to 40 ms (scheduling)."""
    attempts = rng.choice([2, 3, 3, 4])
    gaps = []
    for k in range(attempts - 1):
        if policy == "equal jitter from 25 ms":
            base = 25 * 2**k
            gap = base / 2 + rng.uniform(0, base / 2)
        elif policy == "full jitter from 50 ms":
            gap = rng.uniform(0, 50 * 2**k)
        else:  # a fixed 40 ms sleep
            gap = 40 + rng.uniform(-3, 3)
        gaps.append(gap + (rng.uniform(0, 40) if rng.random() < 0.15 else rng.uniform(0, 1)))
    return product_trace(gaps, outcomes=[False] * (attempts - 1) + [True])


def test_backoff_under_scheduling_noise_is_rarely_flagged_and_a_fixed_sleep_always() -> None:
    """Many windows of 25 bursts each, gaps delayed at random as on a loaded machine. Judging
    only the bursts that did not grow, the detector flagged the 25 ms backoff in 14 % of 150 such
    windows and the full-jitter one in 87 %; a fixed sleep must still be flagged every time."""
    rng = random.Random(7)
    flagged = {}
    for policy in ("equal jitter from 25 ms", "full jitter from 50 ms", "fixed 40 ms"):
        windows = [[_noisy_bursts(policy, rng) for _ in range(25)] for _ in range(40)]
        flagged[policy] = sum(bool(analyse(window)) for window in windows)
    assert flagged["equal jitter from 25 ms"] == 0, flagged
    assert flagged["full jitter from 50 ms"] <= 4, flagged
    assert flagged["fixed 40 ms"] == 40, flagged
