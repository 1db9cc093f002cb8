"""fanout_concurrency_limit on hand-built traces: pools of k, parallel fan-outs, sequential loops."""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Any

import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors.fanout_concurrency_limit import decide, detect, extract
from hourglass.analysis.model import RunConcurrently
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.analysis._assertions import one_finding, run_detector
from tests.builders import TraceBuilder, spans_table
from tests.cli import analyze_file, otlp_json, otlp_span


def pooled_trace(
    durations_ms: list[float], workers: int, *, parent_hints: dict[str, Any] | None = None
) -> tuple[TraceBuilder, list[str]]:
    """GET /dispatch computes one route per driver through a pool of ``workers``: each task starts
    the moment a worker frees up (HotROD's route worker pool has this shape)."""
    b = TraceBuilder(service="frontend")
    free_at = [2.0] * workers
    heapq.heapify(free_at)
    plan = []
    for dur in durations_ms:
        start = heapq.heappop(free_at)
        plan.append((start, dur))
        heapq.heappush(free_at, start + dur)
    end = max(s + d for s, d in plan)
    root = b.span("HTTP GET /dispatch", start_ms=0, dur_ms=end + 3, kind=KIND_SERVER, hints=parent_hints)
    ids = [
        b.span("HTTP GET /route", parent=root, start_ms=s, dur_ms=d, kind=KIND_CLIENT, peer="route")
        for s, d in plan
    ]
    return b, ids


def analyse(builders: list[TraceBuilder]):
    return run_detector(detect, builders)


DURATIONS = [50, 55, 48, 52, 60, 45, 51, 49, 58, 53]


def test_pool_of_three_is_found_with_k_n_and_all_children_run_concurrently() -> None:
    built = [pooled_trace(DURATIONS[i:] + DURATIONS[:i], 3) for i in range(5)]
    findings = analyse([b for b, _ in built])
    f = one_finding(findings, "fanout_concurrency_limit", "parallelization", "frontend", "HTTP GET /dispatch")
    assert f.targets == [{"service": "frontend", "operation": "HTTP GET /route"}]
    assert f.evidence["k"] == 3 and f.evidence["k_share"] == 1.0
    assert f.evidence["n_p50"] == 10
    assert f.evidence["pool_evidence"] is False
    assert len(f.occurrences) == 5
    ids_by_trace = {b.trace_id: ids for b, ids in built}
    for occ in f.occurrences:
        (run,) = occ.interventions
        assert isinstance(run, RunConcurrently)
        assert sorted(run.span_ids) == sorted(ids_by_trace[occ.trace_id])
        assert occ.numbers["k"] == 3 and occ.numbers["n"] == 10
        assert occ.numbers["longest_child_ms"] == 60
    assert f.evidence["queued_ms_p50"] > 0
    assert f.confidence >= 0.8


def test_queued_time_is_the_sum_of_start_delays() -> None:
    # Pool of 2, four 10 ms tasks: starts at 2, 2, 12, 12 ms -> 20 ms queued in total.
    b, _ = pooled_trace([10, 10, 10, 10], 2)
    (f,) = analyse([b])
    (occ,) = f.occurrences
    assert occ.numbers["queued_ms"] == pytest.approx(20)
    assert occ.numbers["queued_per_call_ms"] == pytest.approx(10)
    assert f.evidence["queued_ms_p50"] == pytest.approx(10)
    assert f.evidence["queued_total_ms_p50"] == pytest.approx(20)
    assert occ.numbers["makespan_ms"] == pytest.approx(20)


def test_fully_parallel_fanout_gives_nothing() -> None:
    assert analyse([pooled_trace(DURATIONS, len(DURATIONS))[0] for _ in range(3)]) == []


def test_sequential_loop_without_pool_evidence_is_left_to_serialized_calls() -> None:
    assert analyse([pooled_trace([20, 22, 21, 25], 1)[0] for _ in range(3)]) == []


def test_pool_of_one_with_pool_evidence_is_a_limit() -> None:
    built = [
        pooled_trace([20, 22, 21, 25], 1, parent_hints={"db.pool.max_connections": 1})[0] for _ in range(3)
    ]
    (f,) = analyse(built)
    assert f.evidence["k"] == 1
    assert f.evidence["pool_evidence"] is True


def test_children_at_unrelated_times_are_not_a_staircase() -> None:
    # Overlapping but not a pool: the peak of three in flight is reached once, then calls come
    # one or two at a time as the parent gets round to them.
    b = TraceBuilder(service="api")
    root = b.span("GET /feed", start_ms=0, dur_ms=300, kind=KIND_SERVER)
    for start, dur in [(1, 40), (1, 40), (20, 40), (95, 40), (120, 40), (160, 30)]:
        b.span("fetch post", parent=root, start_ms=start, dur_ms=dur, kind=KIND_CLIENT)
    assert analyse([b]) == []


def test_back_to_back_with_clock_jitter_still_counts_as_a_slot_handover() -> None:
    # Pool of 2 whose next task starts 0.1 ms *before* the previous one's recorded end.
    b = TraceBuilder(service="api")
    root = b.span("POST /import", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    for start, dur in [(1, 30), (1, 30), (30.9, 30), (30.9, 30), (60.8, 30), (60.8, 30)]:
        b.span("insert batch", parent=root, start_ms=start, dur_ms=dur, kind=KIND_CLIENT)
    (f,) = analyse([b])
    assert f.evidence["k"] == 2 and f.evidence["n_max"] == 6


def gallery_trace(round_starts_ms: list[float], dur_ms: float = 14) -> TraceBuilder:
    """Rounds of two thumbnails through a semaphore of 2, with the slack a busy event loop adds
    between a slot freeing and the next task running (as in the sample workload's traces)."""
    b = TraceBuilder(service="storefront")
    root = b.span(
        "GET /albums/{album_id}/gallery",
        start_ms=0,
        dur_ms=round_starts_ms[-1] + dur_ms + 10,
        kind=KIND_SERVER,
    )
    for start in round_starts_ms:
        for offset in (0.0, 0.6):
            b.span(
                "GET /images/{image_id}/thumbnail",
                parent=root,
                start_ms=start + offset,
                dur_ms=dur_ms,
                kind=KIND_CLIENT,
            )
    return b


def test_semaphore_rounds_with_slow_handovers_are_still_a_cap() -> None:
    (f,) = analyse([gallery_trace([1, 30, 84, 145]) for _ in range(4)])
    assert f.evidence["k"] == 2 and f.evidence["n_p50"] == 8
    assert f.evidence["handover_gap_ms_p50"] > 10
    assert f.evidence["capped_rate"] == 1.0


def test_a_cap_seen_in_one_fanout_of_many_is_chance() -> None:
    # One fan-out looks capped; three equally wide fan-outs of the same operation ran fully parallel.
    capped = gallery_trace([1, 30, 84, 145])
    parallel = [gallery_trace([1, 1.1, 1.2, 1.3]) for _ in range(3)]
    assert analyse([capped, *parallel]) == []


def test_waves_with_a_partial_last_round() -> None:
    # Ten tasks in waves of three (batches awaited together): 3 + 3 + 3 + 1.
    b = TraceBuilder(service="api")
    root = b.span("GET /b", start_ms=0, dur_ms=50, kind=KIND_SERVER)
    for i in range(10):
        b.span("fetch item", parent=root, start_ms=1 + (i // 3) * 10, dur_ms=9.99, kind=KIND_CLIENT)
    (f,) = analyse([b])
    assert f.evidence["k"] == 3
    (occ,) = f.occurrences
    assert occ.numbers["cap_hits"] == 3
    # queued: 3 × 10 + 3 × 20 + 1 × 30 ms
    assert occ.numbers["queued_ms"] == pytest.approx(120)
    assert occ.numbers["queued_per_call_ms"] == pytest.approx(120 / 7)


def test_end_to_end_saving_is_the_queueing_removed() -> None:
    from hourglass.analysis.pipeline import analyze

    # Four 10 ms tasks through a pool of two take 20 ms; all at once they take 10 ms. The root
    # (25 ms: 2 ms before, 3 ms after) gets 10 ms back in each of the three traces.
    report = analyze(spans_table([pooled_trace([10, 10, 10, 10], 2)[0] for _ in range(3)]))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "fanout_concurrency_limit"]
    assert (rec["service"], rec["operation"]) == ("frontend", "HTTP GET /dispatch")
    impact = rec["impact"]
    assert impact["saved_ms_p50"] == pytest.approx(10, abs=0.01)
    assert impact["saved_ms_total"] == pytest.approx(30, abs=0.05)
    assert impact["share_of_root_latency"] == pytest.approx(30 / 75, abs=1e-3)
    assert rec["evidence"]["k"] == 2


def test_generic_client_span_names_are_split_by_endpoint() -> None:
    # HotROD's shape: one "HTTP GET" to the customer service, then ten "HTTP GET" route calls
    # through a pool of three. Span names alone would put the customer call in the route fan-out.
    builders = []
    for _ in range(3):
        b = TraceBuilder(service="frontend")
        free = [40.0] * 3
        heapq.heapify(free)
        plan = []
        for i in range(10):
            start = heapq.heappop(free)
            plan.append((start, 50.0 + 3 * (i % 4)))
            heapq.heappush(free, start + plan[-1][1])
        end = max(s + d for s, d in plan)
        root = b.span("HTTP GET /dispatch", start_ms=0, dur_ms=end + 2, kind=KIND_SERVER)
        b.span(
            "HTTP GET",
            parent=root,
            start_ms=1,
            dur_ms=30,
            kind=KIND_CLIENT,
            http_url="http://customer:8081/customer?customer=123",
        )
        for i, (s, d) in enumerate(plan):
            b.span(
                "HTTP GET",
                parent=root,
                start_ms=s,
                dur_ms=d,
                kind=KIND_CLIENT,
                http_url=f"http://route:8083/route?pickup={i},{i}&dropoff=7,7",
            )
        builders.append(b)
    (f,) = analyse(builders)
    assert f.evidence["k"] == 3 and f.evidence["n_p50"] == 10
    assert f.targets == [{"service": "frontend", "operation": "HTTP GET /route"}]


def test_no_spans_and_a_lone_zero_length_span_give_nothing() -> None:
    from hourglass.collector.schema import empty_span_table

    assert detect(AnalysisContext.from_table(empty_span_table())) == []
    b = TraceBuilder(service="api")
    b.span("tick", start_ms=0, dur_ms=0)
    assert analyse([b]) == []


def test_cli_reports_a_route_pool_from_an_otlp_json_file(tmp_path: Path) -> None:
    # HotROD's dispatch: ten "HTTP GET" route calls through three workers, as OTLP JSON.
    spans = []
    for t in range(4):
        free = [1.0] * 3
        heapq.heapify(free)
        calls = []
        for _ in range(10):
            start = heapq.heappop(free)
            calls.append((start, 40.0))
            heapq.heappush(free, start + 40.0)
        end = max(s + d for s, d in calls) + 2
        spans.append(otlp_span(t, 0, "HTTP GET /dispatch", 2, 0, end))
        for i, (s, d) in enumerate(calls):
            spans.append(
                otlp_span(t, i + 1, "HTTP GET", 3, s, s + d, url=f"http://route:8083/route?pickup={i}")
            )
    path = tmp_path / "dispatch.otlp.json"
    path.write_text(json.dumps(otlp_json({"frontend": spans})))
    report = analyze_file(path, timeout=120)
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "fanout_concurrency_limit"]
    assert (rec["service"], rec["operation"]) == ("frontend", "HTTP GET /dispatch")
    assert rec["targets"] == [{"service": "frontend", "operation": "HTTP GET /route"}]
    assert rec["evidence"]["k"] == 3
    # Four rounds of 40 ms become one: 120 ms back per trace.
    assert rec["impact"]["saved_ms_p50"] == pytest.approx(120, abs=0.01)
    assert rec["traces_affected"] == 4


# -- a pool shared by every concurrent request (the second rule) ---------------------------------
def shared_pool_traces(
    requests: int, workers: int | None, *, arrival_gap_ms: float, seed: int = 3, per_request: bool = False
) -> list[TraceBuilder]:
    """``requests`` /dispatch traces arriving every ``arrival_gap_ms``, each with 10 route calls.
    ``workers``: one FIFO pool of that size shared by all requests (None: no pool, every call
    starts when its request submits it); ``per_request``: each request has its own pool instead."""
    import random

    rng = random.Random(seed)
    shared_free = [0.0] * (workers or 0)
    builders = []
    for r in range(requests):
        arrival = r * arrival_gap_ms
        own_free = [arrival] * (workers or 0)
        free = own_free if per_request else shared_free
        plan = []
        for _ in range(10):
            dur = rng.uniform(40, 60)
            if workers is None:
                start = arrival + rng.uniform(0, 30)
            else:
                start = max(arrival, heapq.heappop(free))
                heapq.heappush(free, start + dur)
            plan.append((start, dur))
        b = TraceBuilder(service="frontend")
        end = max(s + d for s, d in plan)
        root = b.span("HTTP GET /dispatch", start_ms=arrival, dur_ms=end - arrival + 2, kind=KIND_SERVER)
        for s, d in sorted(plan):
            b.span("HTTP GET /route", parent=root, start_ms=s, dur_ms=d, kind=KIND_CLIENT, peer="route")
        builders.append(b)
    return builders


def test_a_pool_shared_across_requests_is_found() -> None:
    # requests arrive faster than a pool of 3 drains 10 calls: each trace runs 1-3 calls at a
    # time, so only the sweep across traces shows the cap
    [finding] = analyse(shared_pool_traces(30, 3, arrival_gap_ms=120))
    assert finding.evidence["shared_across_traces"] is True
    assert finding.evidence["k"] == 3
    assert finding.evidence["saturation"] >= 0.8
    assert finding.evidence["cross_trace_handover_rate"] >= 0.2
    assert finding.targets == [{"service": "frontend", "operation": "HTTP GET /route"}]
    assert all(isinstance(o.interventions[0], RunConcurrently) for o in finding.occurrences)


def test_the_capped_fanout_of_a_shared_pool_is_swept_from_its_fanouts_row() -> None:
    # the first request has the pool to itself: its fan-out is capped (the per-fan-out rule, not
    # reported: 1 of 30), so its calls are stored once, in its ``fanouts`` row, not as pool calls;
    # the sweep across traces still counts them, and they are the finding's first occurrence
    ctx = AnalysisContext.from_table(spans_table(shared_pool_traces(30, 3, arrival_gap_ms=120)))
    rows = extract(ctx)
    assert rows["fanouts"]["in_pool"].to_list() == [True]
    assert rows["pool_calls"].height == 290
    [finding] = decide(rows, ctx)
    assert finding.evidence["shared_across_traces"] is True
    assert finding.evidence["calls"] == 300 and len(finding.occurrences) == 30
    first = finding.occurrences[0]
    assert first.trace_id == rows["fanouts"]["trace_id"][0]
    assert list(first.span_ids[1:]) == rows["fanouts"]["child_ids"][0].to_list()


def test_a_per_request_pool_is_reported_once_by_the_fanout_rule() -> None:
    [finding] = analyse(shared_pool_traces(30, 3, arrival_gap_ms=120, per_request=True))
    assert finding.evidence["k"] == 3 and "shared_across_traces" not in finding.evidence


def test_overlapping_requests_without_a_pool_give_nothing() -> None:
    assert analyse(shared_pool_traces(30, None, arrival_gap_ms=40)) == []


def test_sequential_loops_of_overlapping_requests_are_not_a_shared_pool() -> None:
    # each request calls one at a time (a pool of 1 of its own): globally ~4 run at once and each
    # call follows the end of its own predecessor, never another request's
    assert analyse(shared_pool_traces(30, 1, arrival_gap_ms=130, per_request=True)) == []
