"""Issue 12 part B: one currency for ranking, per-kind floors, and the near misses of ``--explain``.

Each rule has a healthy counterpart: the currency keeps a retry storm that burns seconds on top,
the floors keep a 2 x 3 s sequence, and every detector's near miss is a candidate it really formed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import (
    error_propagation,
    fanout_concurrency_limit,
    fanout_straggler,
    lock_contention,
    missing_timeout,
    retry_without_backoff,
)
from hourglass.analysis.model import Finding, Occurrence, RunConcurrently
from hourglass.analysis.pipeline import MIN_SAVING_BY_KIND, analyze, score_findings
from hourglass.analysis.ranking import RISK_SHARE
from hourglass.analysis.render import render
from hourglass.analysis.report import MAX_NEAR_MISSES, near_miss_entries
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER, STATUS_ERROR, STATUS_OK, STATUS_UNSET
from tests.builders import TraceBuilder, repeated_trace, spans_table, spec

# -- traces ------------------------------------------------------------------------------------


def locked_trace(wait_ms: float, *, work_ms: float = 300) -> TraceBuilder:
    """customer GET /customer: the SQL query logs a lock wait of ``wait_ms`` then runs ``work_ms``."""
    b = TraceBuilder(service="customer")
    root = b.span("GET /customer", start_ms=0, dur_ms=wait_ms + work_ms + 10, kind=KIND_SERVER)
    b.span(
        "SQL SELECT",
        parent=root,
        start_ms=1,
        dur_ms=wait_ms + work_ms,
        kind=KIND_CLIENT,
        db_system="mysql",
        db_statement="SELECT * FROM customer WHERE id = ?",
        peer="mysql",
        events=[
            ("Waiting for lock behind 2 transactions", 1.0, {}),
            ("Acquired lock with 1 transactions waiting behind", 1.0 + wait_ms, {}),
        ],
    )
    return b


def retried_trace(attempt_ms: list[float], *, work_ms: float, gap_ms: float = 0.2) -> TraceBuilder:
    """shop POST /pay: POST /charge attempts (all but the last fail), re-sent at once, then work."""
    b = TraceBuilder(service="shop")
    total = sum(attempt_ms) + gap_ms * len(attempt_ms) + work_ms + 5
    root = b.span("POST /pay", start_ms=0, dur_ms=total, kind=KIND_SERVER)
    t = 1.0
    for i, ms in enumerate(attempt_ms):
        failed = i < len(attempt_ms) - 1
        b.span(
            "POST /charge",
            parent=root,
            start_ms=t,
            dur_ms=ms,
            kind=KIND_CLIENT,
            peer="bank",
            http_url="http://bank/charge",
            status_code=STATUS_ERROR if failed else STATUS_UNSET,
            http_status_code=503 if failed else 200,
        )
        t += ms + gap_ms
    b.span("render", parent=root, start_ms=t, dur_ms=work_ms)
    return b


def sequence_trace(call_ms: float, root_ms: float) -> tuple[TraceBuilder, list[str]]:
    """frontend GET /page: two independent calls one after another, the rest is local work."""
    b = TraceBuilder(service="frontend")
    root = b.span("GET /page", start_ms=0, dur_ms=root_ms, kind=KIND_SERVER)
    calls = []
    t = 1.0
    for name in ("users", "prices"):
        calls.append(
            b.span(f"GET {name}", parent=root, start_ms=t, dur_ms=call_ms, kind=KIND_CLIENT, peer=name)
        )
        t += call_ms
    return b, calls


def planted(kind: str, b: TraceBuilder, calls: list[str], confidence: float = 0.8) -> Finding:
    return Finding(
        kind=kind,
        category="parallelization",
        service=b.service,
        operation="GET /page",
        targets=[{"service": "users", "operation": "GET users"}],
        occurrences=[Occurrence(b.trace_id, tuple(calls), (RunConcurrently(tuple(calls)),))],
        confidence=confidence,
    )


# -- one currency ------------------------------------------------------------------------------


def test_a_lock_wait_of_half_the_request_outranks_one_retried_request() -> None:
    # One request waits 310 ms of its 620 ms for a lock; another retried a fast-failing call twice
    # (2 x 5 ms) in a 600 ms request. Priced by the whole request the retry came first.
    report = analyze(spans_table([locked_trace(310), retried_trace([5, 5, 5], work_ms=580)]))
    kinds = [r["kind"] for r in report["recommendations"]]
    assert kinds == ["lock_contention", "retry_without_backoff"], kinds
    retry = report["recommendations"][1]
    assert retry["impact"]["saved_ms_p50"] is None  # adding backoff saves nothing: no saving claimed
    assert retry["impact"]["cost_ms_total"] == pytest.approx(10.2, abs=0.5)  # two failed attempts + gaps
    assert "failed attempts" in retry["evidence"]["cost_basis"]
    assert retry["evidence"]["failed_attempts_ms_total"] == pytest.approx(10.2, abs=0.5)
    assert retry["evidence"]["risk_ms"] == pytest.approx(RISK_SHARE * 1 * 601.6, rel=0.01)


def test_a_retry_storm_that_burns_seconds_ranks_above_a_small_lock_wait() -> None:
    storms = [retried_trace([250, 250, 250, 250, 20], work_ms=50) for _ in range(10)]
    small_locks = [locked_trace(3, work_ms=100) for _ in range(10)]
    report = analyze(spans_table(storms + small_locks))
    kinds = [r["kind"] for r in report["recommendations"]]
    assert kinds[0] == "retry_without_backoff", kinds
    assert "lock_contention" in kinds
    storm = report["recommendations"][0]
    assert storm["impact"]["cost_ms_p50"] == pytest.approx(1000.6, abs=1)  # four 250 ms failures each
    assert storm["impact"]["cost_share_of_root_latency"] > 0.8


def test_error_propagation_is_priced_by_the_failed_requests_time() -> None:
    traces = repeated_trace(
        3,
        "shop",
        spec("POST /pay", 0, 200, kind=KIND_SERVER, status_code=STATUS_ERROR),
        spec("POST bank", 5, 150, kind=KIND_CLIENT, peer="bank", status_code=STATUS_ERROR),
    )
    (rec,) = analyze(spans_table(traces))["recommendations"]
    assert rec["kind"] == "error_propagation"
    assert rec["impact"]["cost_ms_total"] == 600.0 and rec["impact"]["saved_ms_total"] is None
    assert rec["evidence"]["failed_request_ms_total"] == 600.0


# -- floors ------------------------------------------------------------------------------------


def test_a_two_by_three_second_sequence_is_reported() -> None:
    b, calls = sequence_trace(3_000, 6_100)
    ctx = AnalysisContext.from_table(spans_table(b))
    (kept,) = score_findings(ctx, [planted("serialized_calls", b, calls)])
    assert kept.impact is not None and kept.impact.total_ns == 3_000_000_000
    assert ctx.near_misses == []


def test_a_few_ms_of_a_two_second_request_is_a_near_miss_not_a_finding() -> None:
    b, calls = sequence_trace(8, 2_000)
    ctx = AnalysisContext.from_table(spans_table(b))
    assert score_findings(ctx, [planted("serialized_calls", b, calls)]) == []
    (miss,) = ctx.near_misses
    assert miss.kind == "serialized_calls" and miss.trace_ids == (b.trace_id,)
    assert miss.reason == "p95 saving 8 ms < 1% of the 2,000 ms median request (20 ms)"


def test_absolute_floor_per_kind() -> None:
    # 1.5 ms saved of a 20 ms request clears the relative rule (7.5 %) but not serialized_calls'
    # 2 ms floor; a lock wait of 1.5 ms clears lock_contention's 1 ms floor.
    assert (
        MIN_SAVING_BY_KIND["serialized_calls"] == 2_000_000
        and MIN_SAVING_BY_KIND["lock_contention"] == 1_000_000
    )
    b, calls = sequence_trace(1.5, 20)
    ctx = AnalysisContext.from_table(spans_table(b))
    kept = score_findings(ctx, [planted("serialized_calls", b, calls), planted("lock_contention", b, calls)])
    assert [s.finding.kind for s in kept] == ["lock_contention"]
    (miss,) = ctx.near_misses
    assert miss.reason == "p95 saving 1.5 ms < 2 ms floor for serialized_calls"


def test_low_confidence_and_off_path_findings_are_near_misses() -> None:
    b, calls = sequence_trace(50, 200)
    ctx = AnalysisContext.from_table(spans_table(b))
    no_saving = planted("n_plus_one", b, calls)
    # (a finding's occurrences are read-only columns: the first one replaced, not changed in place)
    no_saving.occurrences = [
        replace(o, interventions=()) if i == 0 else o for i, o in enumerate(no_saving.occurrences)
    ]
    assert score_findings(ctx, [planted("serialized_calls", b, calls, confidence=0.1), no_saving]) == []
    reasons = sorted(m.reason for m in ctx.near_misses)
    assert reasons == [
        "confidence 0.10 < 0.2 floor",
        "no saving at the root: the pattern is off the critical path",
    ]


# -- near misses of the six detectors ------------------------------------------------------------


def reasons(ctx: AnalysisContext, kind: str) -> list[str]:
    return [m.reason for m in ctx.near_misses if m.kind == kind]


def test_fanout_straggler_near_miss_for_a_balanced_fanout() -> None:
    traces = []
    for _ in range(4):
        b = TraceBuilder(service="search")
        root = b.span("GET /search", start_ms=0, dur_ms=60, kind=KIND_SERVER)
        for shard, ms in enumerate((40, 44, 48)):
            b.span("GET shard", parent=root, start_ms=1, dur_ms=ms, kind=KIND_CLIENT, peer=f"shard-{shard}")
        traces.append(b)
    ctx = AnalysisContext.from_table(spans_table(traces))
    assert fanout_straggler.detect(ctx) == []
    (reason,) = reasons(ctx, "fanout_straggler")
    assert reason.startswith("balanced fan-out to search GET shard: slowest branch at most 1.1x the median")
    assert ctx.near_misses[0].traces == 4 and len(ctx.near_misses[0].trace_ids) == 4


def test_fanout_concurrency_limit_near_miss_for_calls_that_reach_their_peak_once() -> None:
    # Two calls start together, then two more one after another: the pool of 2 fills only once.
    traces = []
    for _ in range(3):
        b = TraceBuilder(service="gallery")
        root = b.span("GET /album", start_ms=0, dur_ms=50, kind=KIND_SERVER)
        for start in (1, 1, 12, 23):
            b.span("GET thumb", parent=root, start_ms=start, dur_ms=10, kind=KIND_CLIENT, peer="media")
        traces.append(b)
    ctx = AnalysisContext.from_table(spans_table(traces))
    assert fanout_concurrency_limit.detect(ctx) == []
    (reason,) = reasons(ctx, "fanout_concurrency_limit")
    assert reason.startswith("gallery GET thumb: no pool cap in 3 queued fan-outs")


def test_lock_contention_near_miss_for_an_uncontended_lock() -> None:
    ctx = AnalysisContext.from_table(spans_table([locked_trace(0.3) for _ in range(3)]))
    assert lock_contention.detect(ctx) == []
    (reason,) = reasons(ctx, "lock_contention")
    assert "longest 0.3 ms" in reason and reason.endswith("< 1 ms: uncontended")


def test_retry_near_miss_for_retries_with_backoff() -> None:
    traces = []
    for _ in range(3):
        b = TraceBuilder(service="shop")
        root = b.span("POST /pay", start_ms=0, dur_ms=400, kind=KIND_SERVER)
        t = 1.0
        for i, gap in enumerate((20, 80, 160, 0)):
            failed = i < 3
            b.span("POST /charge", parent=root, start_ms=t, dur_ms=5, kind=KIND_CLIENT, peer="bank",
                   status_code=STATUS_ERROR if failed else STATUS_OK, http_status_code=503 if failed else 200)  # fmt: skip
            t += 5 + gap
        traces.append(b)
    ctx = AnalysisContext.from_table(spans_table(traces))
    assert retry_without_backoff.detect(ctx) == []
    (reason,) = reasons(ctx, "retry_without_backoff")
    assert (
        reason
        == "3 retried bursts to bank POST /charge: gaps grow within each burst (backoff): last gap 160.0 ms"
    )


def test_error_propagation_near_miss_for_contained_failures() -> None:
    traces = repeated_trace(
        3,
        "shop",
        spec("GET /home", 0, 100, kind=KIND_SERVER, status_code=STATUS_OK),
        spec("GET ads", 5, 20, kind=KIND_CLIENT, peer="ads", status_code=STATUS_ERROR),
    )
    ctx = AnalysisContext.from_table(spans_table(traces))
    assert error_propagation.detect(ctx) == []
    (reason,) = reasons(ctx, "error_propagation")
    assert reason == "failures of ads GET ads contained in 3 traces: a fallback works"


def test_missing_timeout_near_miss_for_a_single_slow_call() -> None:
    traces = []
    for i in range(25):
        b = TraceBuilder(service="frontend")
        ads_ms = 2_000.0 if i == 0 else 20.0 + i % 3
        root = b.span("GET /home", start_ms=0, dur_ms=ads_ms + 10, kind=KIND_SERVER)
        b.span("GET /ads", parent=root, start_ms=5, dur_ms=ads_ms, kind=KIND_CLIENT, peer="ads")
        traces.append(b)
    ctx = AnalysisContext.from_table(spans_table(traces))
    assert missing_timeout.detect(ctx) == []
    (reason,) = reasons(ctx, "missing_timeout")
    assert reason == "calls to ads: 1 slow call without a timeout < 2 (longest 2,000 ms)"


# -- the report's near_misses ------------------------------------------------------------------


def test_report_has_near_misses_only_with_explain_and_renders_them() -> None:
    table = spans_table([locked_trace(0.3) for _ in range(2)])
    plain = analyze(table)
    assert "near_misses" not in plain and "near_misses_omitted" not in plain
    explained = analyze(table, explain=True)
    assert {k: v for k, v in explained.items() if not k.startswith("near_misses")} == {
        **plain,
        "generated_at": explained["generated_at"],
    }
    misses = explained["near_misses"]
    assert explained["near_misses_omitted"] == 0
    assert [m["kind"] for m in misses] == ["lock_contention"]
    assert set(misses[0]) == {"kind", "service", "operation", "reason", "traces", "trace_ids", "span_ids"}
    assert misses[0]["traces"] == 2
    table_text = render(explained, "table")
    assert table_text.index("No bottlenecks") < table_text.index("Seen and not reported")
    assert "uncontended" in table_text
    markdown = render(explained, "markdown")
    assert "## Seen and not reported: 1 near miss" in markdown and "uncontended" in markdown
    assert "Seen and not reported" not in render(plain, "markdown") + render(plain, "table")


def test_near_misses_are_deduplicated_sorted_and_capped() -> None:
    from hourglass.analysis.model import NearMiss

    many = [NearMiss("k", "svc", f"op{i:04d}", "why", ("t1",), traces=1) for i in range(MAX_NEAR_MISSES + 7)]
    many += [
        NearMiss("k", "svc", "op0003", "why", ("t2",), traces=3),
        NearMiss("a", "svc", "x", "why", traces=3),
    ]
    entries, omitted = near_miss_entries(many)
    assert len(entries) == MAX_NEAR_MISSES and omitted == 8
    assert [(e["kind"], e["operation"]) for e in entries[:3]] == [
        ("a", "x"),
        ("k", "op0003"),
        ("k", "op0000"),
    ]
    assert entries[1]["trace_ids"] == ["t1", "t2"] and entries[1]["traces"] == 3


def test_near_misses_covered_by_a_recommendation_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import hourglass.analysis.pipeline as pipeline

    b, calls = sequence_trace(50, 200)

    def planted_detector(ctx: AnalysisContext) -> list[Finding]:
        ctx.note_near_miss(
            "serialized_calls", "frontend", "GET /page", "another target dropped", [b.trace_id]
        )
        ctx.note_near_miss("serialized_calls", "frontend", "GET /other", "saving too small", [b.trace_id])
        return [planted("serialized_calls", b, calls)]

    monkeypatch.setattr(pipeline, "DETECTORS", {"serialized_calls": planted_detector})
    report = analyze(spans_table(b), explain=True)
    assert [r["operation"] for r in report["recommendations"]] == ["GET /page"]
    assert [m["operation"] for m in report["near_misses"]] == ["GET /other"]
