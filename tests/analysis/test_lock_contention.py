"""lock_contention on hand-built traces: explicit lock events, wait attributes, wait spans, and
convoys inferred across concurrent traces — each with its healthy counterpart."""

from __future__ import annotations

import heapq
import json
import random
from pathlib import Path

import polars as pl
import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors.lock_contention import (
    BUSY_PREFILTER,
    MIN_QUEUED_SHARE,
    _busy_groups,
    _Clock,
    _extent,
    _peers_at_start,
    detect,
)
from hourglass.analysis.model import ShortenSpan
from hourglass.collector.schema import KIND_CLIENT, KIND_CONSUMER, KIND_SERVER
from tests.analysis._assertions import one_finding, run_detector
from tests.builders import BASE_NS, TraceBuilder, spans_table
from tests.cli import analyze_file


def analyse(builders: list[TraceBuilder]):
    return run_detector(detect, builders)


def customer_trace(wait_ms: float, behind: int, customer_id: int) -> tuple[TraceBuilder, str]:
    """HotROD's customer service: the MySQL query takes a process-wide lock and logs its wait."""
    b = TraceBuilder(service="customer")
    root = b.span("HTTP GET /customer", start_ms=0, dur_ms=wait_ms + 310, kind=KIND_SERVER)
    events = []
    if behind:
        events.append((f"Waiting for lock behind {behind} transactions", 1.0, {"blockers": "[a b]"}))
    events.append((f"Acquired lock with {max(behind - 1, 0)} transactions waiting behind", 1.0 + wait_ms, {}))
    sql = b.span(
        "SQL SELECT",
        parent=root,
        start_ms=1,
        dur_ms=wait_ms + 300,
        kind=KIND_CLIENT,
        service="customer",
        db_system="mysql",
        db_statement=f"SELECT * FROM customer WHERE customer_id={customer_id}",
        peer="mysql",
        events=events,
    )
    return b, sql


def test_lock_wait_events_are_one_finding_with_wait_share_and_shortened_query() -> None:
    built = [customer_trace(wait_ms=300.0 * (i % 3), behind=i % 3, customer_id=100 + i) for i in range(9)]
    f = one_finding(
        analyse([b for b, _ in built]), "lock_contention", "parallelization", "customer", "SQL SELECT"
    )
    assert f.targets == [{"service": "mysql", "operation": "SELECT * FROM customer WHERE customer_id=?"}]
    assert f.evidence["evidence"] == "explicit" and f.evidence["sources"] == ["events"]
    # Six traces waited, 300 ms or 600 ms; the three that got the lock at once are not occurrences.
    assert len(f.occurrences) == 6
    assert f.evidence["wait_ms_p50"] == pytest.approx(450)
    assert f.evidence["queue_depth_max"] == 2
    assert f.evidence["hold_ms_p50"] == pytest.approx(300)  # the query ran 300 ms under the lock
    assert f.evidence["wait_share_p50"] == pytest.approx((300 / 600 + 600 / 900) / 2, abs=1e-3)
    sql_by_trace = {b.trace_id: sql for b, sql in built}
    for occ in f.occurrences:
        (cut,) = occ.interventions
        assert isinstance(cut, ShortenSpan) and cut.span_id == sql_by_trace[occ.trace_id]
        assert cut.by_ns in (300_000_000, 600_000_000)
        assert occ.numbers["wait_ms"] == cut.by_ns / 1e6
    assert f.confidence >= 0.85


def test_uncontended_lock_gives_nothing() -> None:
    assert analyse([customer_trace(wait_ms=0.0, behind=0, customer_id=i)[0] for i in range(5)]) == []


def test_wait_attribute_with_unit_suffix() -> None:
    builders = []
    for wait in (35, 40, 45):
        b = TraceBuilder(service="inventory")
        root = b.span("POST /reserve", start_ms=0, dur_ms=wait + 30, kind=KIND_SERVER)
        b.span(
            "UPDATE stock",
            parent=root,
            start_ms=2,
            dur_ms=wait + 20,
            kind=KIND_CLIENT,
            db_system="postgresql",
            db_statement="UPDATE stock SET qty = qty - 1 WHERE sku = 'A-1'",
            hints={"db.lock_wait_ms": wait, "db.lock.mode": "RowExclusiveLock"},
        )
        builders.append(b)
    (f,) = analyse(builders)
    assert f.evidence["sources"] == ["attributes"]
    assert f.operation == "UPDATE stock"
    assert f.targets == [
        {"service": "postgresql", "operation": "UPDATE stock SET qty = qty - ? WHERE sku = ?"}
    ]
    assert sorted(o.interventions[0].by_ns for o in f.occurrences) == [35_000_000, 40_000_000, 45_000_000]


def test_wait_attribute_in_seconds_and_counts_are_not_durations() -> None:
    b = TraceBuilder(service="jobs")
    root = b.span("run job", start_ms=0, dur_ms=500, kind=KIND_SERVER)
    b.span(
        "claim job",
        parent=root,
        start_ms=1,
        dur_ms=400,
        hints={"queue.wait_seconds": 0.25, "queue.waiters": 7},
    )
    (f,) = analyse([b])
    (occ,) = f.occurrences
    assert occ.interventions[0].by_ns == 250_000_000


def test_wait_span_shortened_and_reported_under_its_parent() -> None:
    builders, waits = [], {}
    for wait in (40, 60, 80, 0.2):
        b = TraceBuilder(service="orders")
        root = b.span("POST /orders", start_ms=0, dur_ms=wait + 60, kind=KIND_SERVER)
        acquire = b.span(
            "pool.acquire", parent=root, start_ms=1, dur_ms=wait, hints={"db.pool.name": "orders-rw"}
        )
        b.span(
            "INSERT order",
            parent=root,
            start_ms=1 + wait,
            dur_ms=50,
            kind=KIND_CLIENT,
            db_system="postgresql",
        )
        builders.append(b)
        waits[b.trace_id] = (acquire, wait)
    (f,) = analyse(builders)
    assert (f.service, f.operation) == ("orders", "POST /orders")
    assert f.targets == [{"service": "orders", "operation": "pool.acquire"}]
    assert f.evidence["resource"] == "orders-rw"
    assert f.evidence["sources"] == ["wait_span"]
    assert len(f.occurrences) == 3  # the 0.2 ms acquire is below the 1 ms floor
    assert f.evidence["hold_ms_p50"] == pytest.approx(50)  # INSERT order runs as the wait ends
    for occ in f.occurrences:
        acquire, wait = waits[occ.trace_id]
        assert occ.interventions == (ShortenSpan(acquire, int(wait * 1e6)),)


def test_messaging_spans_are_not_waits() -> None:
    b = TraceBuilder(service="worker")
    root = b.span("process batch", start_ms=0, dur_ms=300, kind=KIND_SERVER)
    b.span(
        "wait for queue message",
        parent=root,
        start_ms=1,
        dur_ms=200,
        kind=KIND_CONSUMER,
        messaging_destination="jobs",
    )
    b.span("queue wait", parent=root, start_ms=201, dur_ms=90, messaging_destination="jobs")
    assert analyse([b]) == []


def server_traces(
    arrivals_ms: list[float], service_ms: list[float], servers: int
) -> tuple[list[TraceBuilder], dict[str, tuple[str, float]]]:
    """Requests to POST /checkout, each running UPDATE inventory on a database that serves
    ``servers`` statements at a time in arrival order. Returns the builders and, per trace, the
    statement span and its queueing time."""
    free = [0.0] * servers
    heapq.heapify(free)
    builders, waits = [], {}
    for arrival, service in zip(arrivals_ms, service_ms, strict=True):
        begin = max(arrival + 1, heapq.heappop(free))
        finish = begin + service
        heapq.heappush(free, finish)
        b = TraceBuilder(service="checkout", base_ns=BASE_NS + int(arrival * 1e6))
        root = b.span("POST /checkout", start_ms=0, dur_ms=finish - arrival + 2, kind=KIND_SERVER)
        stmt = b.span(
            "UPDATE inventory",
            parent=root,
            start_ms=1,
            dur_ms=finish - arrival - 1,
            kind=KIND_CLIENT,
            db_system="postgresql",
            db_statement=f"UPDATE inventory SET qty = qty - 1 WHERE sku = {int(arrival) % 50}",
        )
        builders.append(b)
        waits[b.trace_id] = (stmt, begin - (arrival + 1))
    return builders, waits


def bursty_arrivals(n: int, seed: int, mean_gap_ms: float) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(1 / mean_gap_ms)
        out.append(t)
    return out


def test_convoy_on_one_row_is_inferred_across_traces() -> None:
    rng = random.Random(3)
    arrivals = bursty_arrivals(80, seed=11, mean_gap_ms=12.0)
    service = [10.0 + rng.uniform(-1, 1) for _ in arrivals]
    builders, waits = server_traces(arrivals, service, servers=1)
    findings = analyse(builders)
    assert len(findings) == 1, [(f.service, f.operation) for f in findings]
    f = findings[0]
    assert (f.service, f.operation) == ("checkout", "UPDATE inventory")  # not the POST /checkout callers
    assert f.evidence["evidence"] == "inferred_convoy"
    assert f.targets == [
        {"service": "postgresql", "operation": "UPDATE inventory SET qty = qty - ? WHERE sku = ?"}
    ]
    assert f.evidence["latency_vs_peers_correlation"] >= 0.6
    assert f.evidence["uncontended_ms"] == pytest.approx(10, abs=1.5)
    assert f.evidence["service_time_ms"] == pytest.approx(10, abs=1.5)
    assert f.evidence["added_ms_per_peer"] > 3
    assert 0.45 <= f.confidence <= 0.8
    # Each queued statement is shortened by about its true queueing time.
    errors = []
    for occ in f.occurrences:
        (cut,) = occ.interventions
        stmt, true_wait = waits[occ.trace_id]
        assert cut.span_id == stmt
        errors.append(abs(cut.by_ns / 1e6 - true_wait))
    assert len(f.occurrences) >= 20
    assert sorted(errors)[len(errors) // 2] < 1.5


@pytest.mark.parametrize(
    ("seed", "statements", "arrival_seed", "mean_gap_ms", "servers"),
    [
        # Same load on a database with plenty of capacity: many statements overlap, none waits.
        pytest.param(5, 80, 11, 3.0, 64, id="busy_operation_with_flat_latency"),
        # Eight workers overloaded: latency grows with load, but completions come eight at a time,
        # not one service time apart, so this is not a lock.
        pytest.param(9, 160, 4, 1.3, 8, id="saturated_parallel_pool_is_not_a_single_server_convoy"),
    ],
)
def test_parallel_servers_give_nothing(
    seed: int, statements: int, arrival_seed: int, mean_gap_ms: float, servers: int
) -> None:
    rng = random.Random(seed)
    arrivals = bursty_arrivals(statements, seed=arrival_seed, mean_gap_ms=mean_gap_ms)
    service = [10.0 + rng.uniform(-1, 1) for _ in arrivals]
    builders, _ = server_traces(arrivals, service, servers=servers)
    assert analyse(builders) == []


def _clock(frame: pl.DataFrame) -> _Clock:
    clock = _Clock.of([e for e in (_extent(frame),) if e])
    assert clock is not None
    return clock


def test_packed_peer_count_equals_the_sorted_sweep_on_microsecond_times() -> None:
    # On whole-microsecond times the packed count (a rank less a binary search) and the sorted
    # sweep (ends before starts at one instant, then by uid) count exactly the same, ties included.
    rng = random.Random(5)
    rows = []
    for gid in (3, 4, 5):
        for _ in range(400):
            start = rng.randrange(0, 2_000) * 1000
            rows.append((gid, start, start + rng.randrange(1, 300) * 1000))
    frame = pl.DataFrame(rows, schema=["gid", "start_ns", "end_ns"], orient="row").with_columns(
        pl.col("gid").cast(pl.UInt64), uid=pl.Series([rng.getrandbits(64) for _ in rows], dtype=pl.UInt64)
    )
    packed = _clock(frame)
    assert packed.packed
    wide = _Clock(packed.t0, packed=False)
    assert _peers_at_start(frame, packed).to_list() == _peers_at_start(frame, wide).to_list()


def test_peer_sweep_packed_and_wide_time_ranges_agree() -> None:
    # Two operations; the second spans 20 days, too wide for the packed int64 sort key, so the
    # fallback sort runs for it alone and both paths are checked against a direct count.
    rng = random.Random(2)
    rows = []
    for gid, horizon_ns in ((7, 10_000_000_000), (9, 20 * 86_400 * 10**9)):
        for _ in range(60):
            start = rng.randrange(0, horizon_ns // 1000) * 1000
            rows.append((gid, start, start + rng.randrange(1, 50) * (horizon_ns // 2000)))
    expected = [
        sum(1 for g2, s2, e2 in rows if g2 == g and s2 <= s < e2 and (s2, e2) != (s, e)) + 1
        for g, s, e in rows
    ]
    for subset in (rows[:60], rows):
        frame = pl.DataFrame(subset, schema=["gid", "start_ns", "end_ns"], orient="row").with_columns(
            pl.col("gid").cast(pl.UInt64), uid=pl.int_range(pl.len(), dtype=pl.UInt64)
        )
        got = _peers_at_start(frame, _clock(frame)).to_list()
        want = expected[: len(subset)]
        assert sum(abs(a - b) for a, b in zip(got, want, strict=True)) <= 2  # ties within one µs


def test_end_to_end_saving_is_the_lock_wait() -> None:
    from hourglass.analysis.pipeline import analyze

    # Waits of 0, 300 and 600 ms (three traces each); the query is the root's last work, so the
    # root gets each wait back: p50 of [300]*3 + [600]*3 is 450 ms, 2700 ms in all, against root
    # durations of 3 × 610 + 3 × 910 ms.
    built = [customer_trace(wait_ms=300.0 * (i % 3), behind=i % 3, customer_id=i) for i in range(9)]
    report = analyze(spans_table([b for b, _ in built]))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "lock_contention"]
    assert (rec["service"], rec["operation"]) == ("customer", "SQL SELECT")
    assert rec["traces_affected"] == 6
    impact = rec["impact"]
    assert impact["saved_ms_p50"] == pytest.approx(450, abs=0.01)
    assert impact["saved_ms_total"] == pytest.approx(2700, abs=0.05)
    assert impact["share_of_root_latency"] == pytest.approx(2700 / (3 * 610 + 3 * 910), abs=1e-3)


def test_end_to_end_convoy_saving_matches_the_true_queueing() -> None:
    from hourglass.analysis.pipeline import analyze

    rng = random.Random(3)
    arrivals = bursty_arrivals(80, seed=11, mean_gap_ms=12.0)
    service = [10.0 + rng.uniform(-1, 1) for _ in arrivals]
    builders, waits = server_traces(arrivals, service, servers=1)
    report = analyze(spans_table(builders))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "lock_contention"]
    assert rec["operation"] == "UPDATE inventory"
    (finding,) = analyse(builders)
    assert rec["traces_affected"] == len(finding.trace_ids)
    true_total_ms = sum(waits[t][1] for t in finding.trace_ids)
    # The statement is the root's last work, so removing its queueing gives the root that time
    # back; the inferred wait (duration minus the uncontended ~10 ms) is within a few percent.
    assert rec["impact"]["saved_ms_total"] == pytest.approx(true_total_ms, rel=0.1)


def test_wait_span_with_its_own_wait_attribute_reports_that_wait_under_the_handler() -> None:
    # The sample ledger's shape: "lock.acquire ledger.journal" states its wait; the journal append
    # that follows is the critical section.
    builders = []
    for wait in (30.0, 50.0, 70.0):
        b = TraceBuilder(service="ledger")
        root = b.span("POST /accounts/{account_id}/transfers", start_ms=0, dur_ms=wait + 30, kind=KIND_SERVER)
        b.span(
            "lock.acquire ledger.journal",
            parent=root,
            start_ms=2,
            dur_ms=wait + 0.4,
            hints={"lock.name": "ledger.journal", "lock.wait_ms": wait, "lock.waiters_ahead": 2},
        )
        b.span("journal.append", parent=root, start_ms=2.5 + wait, dur_ms=20)
        builders.append(b)
    (f,) = analyse(builders)
    assert (f.service, f.operation) == ("ledger", "POST /accounts/{account_id}/transfers")
    assert f.targets == [{"service": "ledger", "operation": "lock.acquire ledger.journal"}]
    assert f.evidence["sources"] == ["attributes"] and f.evidence["resource"] == "ledger.journal"
    assert f.evidence["wait_ms_p50"] == pytest.approx(50)  # the attribute, not the span's 50.4 ms
    assert f.evidence["hold_ms_p50"] == pytest.approx(20)
    assert f.evidence["queue_depth_max"] == 2
    assert f.evidence["wait_share_p50"] == pytest.approx(50 / 80, abs=1e-3)


def test_a_lock_that_rarely_makes_anyone_wait_is_not_a_bottleneck() -> None:
    # One contended acquisition in 40: under the 5 % contention rate.
    built = [customer_trace(wait_ms=0.0, behind=0, customer_id=i)[0] for i in range(39)]
    built.append(customer_trace(wait_ms=20.0, behind=1, customer_id=99)[0])
    assert analyse(built) == []
    (f,) = analyse(built[-10:])
    assert f.evidence["acquisitions"] == 10 and f.evidence["contention_rate"] == 0.1


def test_no_spans_and_a_lone_zero_length_span_give_nothing() -> None:
    from hourglass.collector.schema import empty_span_table

    assert detect(AnalysisContext.from_table(empty_span_table())) == []
    b = TraceBuilder(service="api")
    b.span("tick", start_ms=0, dur_ms=0)
    assert analyse([b]) == []


def hotrod_jaeger_json(waits_ms: list[float]) -> dict:
    """HotROD's customer lookups as the Jaeger query API returns them: the MySQL span logs
    "Waiting for lock behind N transactions" and "Acquired lock with N transactions waiting behind"."""
    base_us = 1_760_000_000_000_000
    traces = []
    for i, wait in enumerate(waits_ms):
        trace_id = f"{i + 1:016x}"
        start = base_us + i * 2_000_000
        wait_us = int(wait * 1000)
        logs = []
        if wait:
            logs.append(
                {
                    "timestamp": start + 1_100,
                    "fields": [
                        {"key": "event", "type": "string", "value": "Waiting for lock behind 2 transactions"},
                        {"key": "blockers", "type": "string", "value": "[731-4 731-5]"},
                    ],
                }
            )
        logs.append(
            {
                "timestamp": start + 1_100 + wait_us,
                "fields": [
                    {
                        "key": "event",
                        "type": "string",
                        "value": "Acquired lock with 0 transactions waiting behind",
                    }
                ],
            }
        )
        traces.append(
            {
                "traceID": trace_id,
                "spans": [
                    {
                        "traceID": trace_id,
                        "spanID": f"{i + 1:08x}00000001",
                        "operationName": "HTTP GET /customer",
                        "references": [],
                        "startTime": start,
                        "duration": wait_us + 310_000,
                        "tags": [{"key": "span.kind", "type": "string", "value": "server"}],
                        "logs": [],
                        "processID": "p1",
                    },
                    {
                        "traceID": trace_id,
                        "spanID": f"{i + 1:08x}00000002",
                        "operationName": "SQL SELECT",
                        "references": [
                            {"refType": "CHILD_OF", "traceID": trace_id, "spanID": f"{i + 1:08x}00000001"}
                        ],
                        "startTime": start + 1_000,
                        "duration": wait_us + 300_000,
                        "tags": [
                            {"key": "span.kind", "type": "string", "value": "client"},
                            {
                                "key": "sql.query",
                                "type": "string",
                                "value": f"SELECT * FROM customer WHERE customer_id={i}",
                            },
                        ],
                        "logs": logs,
                        "processID": "p2",
                    },
                ],
                "processes": {
                    "p1": {"serviceName": "customer", "tags": []},
                    "p2": {"serviceName": "mysql", "tags": []},
                },
            }
        )
    return {"data": traces}


def test_cli_reports_hotrod_lock_waits_from_a_jaeger_file(tmp_path: Path) -> None:
    path = tmp_path / "hotrod.json"
    path.write_text(json.dumps(hotrod_jaeger_json([0, 250, 500, 0, 250, 500])))
    report = analyze_file(path, timeout=120)
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "lock_contention"]
    assert (rec["service"], rec["operation"]) == ("mysql", "SQL SELECT")
    assert rec["traces_affected"] == 4
    # The query is the handler's last work: each trace gets its wait back at the root.
    assert rec["impact"]["saved_ms_p50"] == pytest.approx(375, abs=0.5)
    assert rec["impact"]["saved_ms_total"] == pytest.approx(1500, abs=1)
    assert rec["evidence"]["queue_depth_max"] == 2


def test_busy_group_prefilter_keeps_exactly_the_groups_the_sweep_finds_queued() -> None:
    rng = random.Random(8)
    rows = []
    for gid in range(1, 41):
        load = gid / 40  # from nearly idle to saturated
        t = 0
        for _ in range(50):
            t += int(rng.expovariate(load / 10_000_000))
            rows.append((gid, t, t + rng.randrange(5_000_000, 15_000_000)))
    frame = pl.DataFrame(rows, schema=["gid", "start_ns", "end_ns"], orient="row").with_columns(
        pl.col("gid").cast(pl.UInt64), uid=pl.int_range(pl.len(), dtype=pl.UInt64)
    )
    queued = (
        frame.with_columns(peers=_peers_at_start(frame, _clock(frame)))
        .group_by("gid")
        .agg(share=(pl.col("peers") >= 2).mean())
    )
    expected = set(queued.filter(pl.col("share") >= BUSY_PREFILTER * MIN_QUEUED_SHARE)["gid"].to_list())
    kept = set(_busy_groups(frame, _clock(frame)).to_list())
    assert 0 < len(kept) < 40
    assert kept == expected


def test_occurrences_with_and_without_a_queue_depth_keep_their_order_and_numbers() -> None:
    """A finding's occurrences, one per trace in order of first wait, made in columns: a trace whose
    waits report a queue depth carries it, one whose waits report none has no such number (the
    two made apart and put back in order), and each waiting span is shortened by its own wait."""
    from hourglass.analysis.detectors._common import occurrence_keys
    from hourglass.analysis.detectors.lock_contention import _occurrences
    from hourglass.analysis.model import Occurrence

    frame = pl.DataFrame(
        {
            "trace_id": ["t1", "t2", "t1", "t3", "t4", "t3"],
            "span_id": ["a", "b", "c", "d", "e", "f"],
            "wait_ns": [5_000_000, 7_000_000, 3_000_000, 9_000_000, 4_000_000, 1_000_000],
            "wait_share": [0.5, 0.25, 0.75, 0.125, 1.0, 0.5],
            "queue_depth": [3, None, None, None, 2, 5],
        }
    )
    got = _occurrences(frame)
    keys = occurrence_keys(
        frame.group_by("trace_id", maintain_order=True).agg(
            span_ids=pl.col("span_id"), waits=pl.col("wait_ns")
        ),
        ["trace_id", "span_ids", "waits"],
    ).to_list()
    want = [
        Occurrence("t1", ("a", "c"), (ShortenSpan("a", 5_000_000), ShortenSpan("c", 3_000_000)),
                   {"wait_ms": 8.0, "wait_share": 0.75, "queue_depth": 3.0}, key=keys[0]),
        Occurrence("t2", ("b",), (ShortenSpan("b", 7_000_000),), {"wait_ms": 7.0, "wait_share": 0.25},
                   key=keys[1]),
        Occurrence("t3", ("d", "f"), (ShortenSpan("d", 9_000_000), ShortenSpan("f", 1_000_000)),
                   {"wait_ms": 10.0, "wait_share": 0.5, "queue_depth": 5.0}, key=keys[2]),
        Occurrence("t4", ("e",), (ShortenSpan("e", 4_000_000),), {"wait_ms": 4.0, "wait_share": 1.0, "queue_depth": 2.0},
                   key=keys[3]),
    ]  # fmt: skip
    assert list(got) == want
    assert [o.key for o in got] == keys
    assert [list(o.numbers) for o in got] == [list(o.numbers) for o in want]
