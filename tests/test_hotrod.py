"""Hourglass on HotROD-shaped traces (Jaeger's "Rides on Demand" demo), through the real CLI.

``tests/hotrod_traces.py`` simulates HotROD's services as its source code runs them (OpenTelemetry
span names, kinds, attributes, span events, delays, the shared MySQL mutex, the redis error
simulator, the frontend's worker pool of 3) for 40 overlapping /dispatch requests and writes them
as Jaeger's query API returns them. ``hourglass analyze FILE --format json`` must find HotROD's four
known bottlenecks and nothing a HotROD expert would call wrong:

1. lock contention on the mysql ``SQL SELECT`` (the "Waiting for lock behind N transactions" /
   "Acquired lock; N transactions waiting behind" events: a connection pool of one);
2. N+1 in the driver service: ``GetDriver`` against redis once per driver, one after another;
3. ``GetDriver`` failing with "redis timeout" and retried at once ("Retrying GetDriver after error");
4. the frontend's route calls capped at 3 concurrent (``RouteWorkerPoolSize``);

and not: customer → driver → route reported as serialized (each step needs the previous one's
result: the driver search needs the customer's location, routes need the drivers), a straggler in
the balanced route fan-out, or a "missing timeout" on calls whose latency is the lock convoy.

Run with ``-s`` to see the report's (kind, service, operation, confidence, saved_ms_p50) list.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import cli
from tests.hotrod_traces import (
    DRIVERS_PER_SEARCH,
    MYSQL_GET_DELAY,
    ROUTE_WORKER_POOL_SIZE,
    generate,
    write,
)

REQUESTS = 40

pytestmark = pytest.mark.timeout(180)


def analyze_file(path: Path, label: str) -> dict[str, Any]:
    """`hourglass analyze FILE --format json` through the real CLI; prints the findings (``-s``)."""
    result = cli.analyze_file(path, timeout=150)
    print(f"\n{label} report (kind, service, operation, confidence, saved_ms_p50):")
    for rec in result["recommendations"]:
        print(
            f"  {rec['kind']:<26} {rec['service']:<13} {rec['operation']:<34} "
            f"{rec['confidence']:<5} {rec['impact']['saved_ms_p50']}"
        )
    return result


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = write(tmp_path_factory.mktemp("hotrod") / "hotrod-jaeger.json", seed=7, requests=REQUESTS)
    return analyze_file(path, "HotROD")


def findings(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [rec for rec in report["recommendations"] if rec["kind"] == kind]


def one(report: dict[str, Any], kind: str) -> dict[str, Any]:
    found = findings(report, kind)
    listed = [(r["kind"], r["service"], r["operation"]) for r in report["recommendations"]]
    assert len(found) == 1, f"expected one {kind} finding, got {len(found)}; report: {listed}"
    return found[0]


# -- the generator itself ---------------------------------------------------------------------


def test_generator_is_deterministic_and_shaped_like_hotrod() -> None:
    document = generate(seed=7, requests=REQUESTS)
    assert document == generate(seed=7, requests=REQUESTS)
    assert document != generate(seed=8, requests=REQUESTS)
    traces = document["data"]
    dispatches = [t for t in traces if any(s["operationName"] == "/dispatch" for s in t["spans"])]
    assert len(dispatches) == REQUESTS  # plus one /config trace per click
    assert len(traces) == 2 * REQUESTS
    services = {p["serviceName"] for t in dispatches for p in t["processes"].values()}
    assert services == {"frontend", "customer", "mysql", "driver", "redis-manual", "route"}

    def spans(trace: dict[str, Any], name: str) -> list[dict[str, Any]]:
        return [s for s in trace["spans"] if s["operationName"] == name]

    def events(span: dict[str, Any]) -> list[str]:
        return [next(f["value"] for f in log["fields"] if f["key"] == "event") for log in span["logs"]]

    waited = 0
    for trace in dispatches:
        (query,) = spans(trace, "SQL SELECT")
        tags = {t["key"]: t["value"] for t in query["tags"]}
        assert tags["span.kind"] == "client" and tags["db.system.name"] == "mysql"
        assert tags["db.query.text"].startswith("SELECT * FROM customer WHERE customer_id=")
        names = events(query)
        assert names[-1].startswith("Acquired lock; ") and names[-1].endswith(" transactions waiting behind")
        if len(names) == 2:  # "Waiting for lock behind N transactions" only when someone held the lock
            assert names[0].startswith("Waiting for lock behind ")
            waited += 1
        assert query["duration"] >= 0.7 * MYSQL_GET_DELAY / 1_000
        get_driver = spans(trace, "GetDriver")
        failed = [s for s in get_driver if {"key": "error", "type": "bool", "value": True} in s["tags"]]
        assert len(get_driver) == DRIVERS_PER_SEARCH + len(failed)
        service_of = {pid: p["serviceName"] for pid, p in trace["processes"].items()}
        (driver_server,) = [
            s
            for s in spans(trace, "driver.DriverService/FindNearest")
            if service_of[s["processID"]] == "driver"
        ]
        assert events(driver_server).count("Retrying GetDriver after error") == len(failed)
        assert len(spans(trace, "/route")) == DRIVERS_PER_SEARCH
    # Bursts of clicks: most requests queue for the lock, the first of each burst does not.
    assert REQUESTS // 2 < waited < REQUESTS


def test_route_calls_never_exceed_the_worker_pool() -> None:
    for trace in generate(seed=7, requests=REQUESTS)["data"]:
        calls = [
            (s["startTime"], s["startTime"] + s["duration"])
            for s in trace["spans"]
            if s["operationName"] == "HTTP GET"
            and any(t["key"] == "url.full" and "/route?" in t["value"] for t in s["tags"])
        ]
        edges = sorted([(start, 1) for start, _ in calls] + [(end, -1) for _, end in calls])
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        assert peak <= ROUTE_WORKER_POOL_SIZE


# -- HotROD's known bottlenecks -----------------------------------------------------------------


def test_mysql_lock_contention_is_found_from_the_lock_events(report: dict[str, Any]) -> None:
    rec = one(report, "lock_contention")
    assert (rec["service"], rec["operation"]) == ("mysql", "SQL SELECT")
    assert rec["evidence"]["evidence"] == "explicit"
    assert rec["evidence"]["hold_ms_p50"] == pytest.approx(MYSQL_GET_DELAY / 1e6, rel=0.15)
    assert rec["evidence"]["queue_depth_max"] >= 3
    assert rec["confidence"] >= 0.8
    assert rec["impact"]["saved_ms_p50"] > 100


def test_get_driver_loop_is_n_plus_one(report: dict[str, Any]) -> None:
    rec = one(report, "n_plus_one")
    assert (rec["service"], rec["operation"]) == ("driver", "driver.DriverService/FindNearest")
    assert [t["operation"] for t in rec["targets"]] == ["GetDriver"]
    assert rec["evidence"]["calls_p50"] >= DRIVERS_PER_SEARCH
    assert rec["traces_affected"] == REQUESTS
    assert rec["impact"]["saved_ms_p50"] > 50


def test_get_driver_retries_without_backoff(report: dict[str, Any]) -> None:
    rec = one(report, "retry_without_backoff")
    # The retry loop lives in the driver service's FindNearest handler (services/driver/server.go).
    assert (rec["service"], rec["operation"]) == ("driver", "driver.DriverService/FindNearest")
    assert [t["operation"] for t in rec["targets"]] == ["GetDriver"]
    assert rec["evidence"]["pattern"] == "immediate"
    assert rec["evidence"]["retries_logged_by_caller"] is True
    assert rec["confidence"] >= 0.6


def test_route_fanout_is_capped_at_three(report: dict[str, Any]) -> None:
    rec = one(report, "fanout_concurrency_limit")
    assert (rec["service"], rec["operation"]) == ("frontend", "/dispatch")
    assert "/route" in rec["targets"][0]["operation"]
    assert rec["evidence"]["k"] == ROUTE_WORKER_POOL_SIZE
    assert rec["evidence"]["n_p50"] == DRIVERS_PER_SEARCH
    assert rec["evidence"]["capped_rate"] >= 0.8


# -- what a HotROD expert would call wrong ------------------------------------------------------


def test_dependent_customer_driver_route_steps_are_not_serialized(report: dict[str, Any]) -> None:
    assert findings(report, "serialized_calls") == []


def test_balanced_route_fanout_has_no_straggler(report: dict[str, Any]) -> None:
    assert findings(report, "fanout_straggler") == []


def test_customer_latency_is_the_lock_convoy_not_a_missing_timeout(report: dict[str, Any]) -> None:
    """The frontend's ``HTTP GET`` to /customer takes 0.3-2 s because it queues for the mysql lock;
    the 50 ms ``HTTP GET`` calls to /route are another endpoint and say nothing about its usual time."""
    assert findings(report, "missing_timeout") == []


def test_nothing_else_is_claimed_with_confidence(report: dict[str, Any]) -> None:
    expected = {
        ("lock_contention", "mysql"),
        ("n_plus_one", "driver"),
        ("retry_without_backoff", "driver"),
        ("fanout_concurrency_limit", "frontend"),
    }
    unexpected = [
        (r["kind"], r["service"], r["operation"], r["confidence"])
        for r in report["recommendations"]
        if r["confidence"] >= 0.5 and (r["kind"], r["service"]) not in expected
    ]
    assert unexpected == []


# -- HotROD run with -M (the tutorial's first fix: no MySQL mutex) -------------------------------
# Requests now overlap, so their route calls compete for the frontend's one pool of 3 workers.


@pytest.fixture(scope="module")
def report_without_mutex(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("hotrod-M") / "hotrod-jaeger.json"
    write(path, seed=7, requests=REQUESTS, mysql_mutex=False)
    return analyze_file(path, "HotROD -M")


def test_without_the_mutex_there_is_no_lock_event_and_no_lock_contention(
    report_without_mutex: dict[str, Any],
) -> None:
    document = generate(seed=7, requests=REQUESTS, mysql_mutex=False)
    queries = [s for t in document["data"] for s in t["spans"] if s["operationName"] == "SQL SELECT"]
    assert len(queries) == REQUESTS and not any(s["logs"] for s in queries)
    assert findings(report_without_mutex, "lock_contention") == []
    # The driver's bottlenecks do not depend on the mutex.
    assert one(report_without_mutex, "retry_without_backoff")["service"] == "driver"
    driver_loops = [r for r in findings(report_without_mutex, "n_plus_one") if r["service"] == "driver"]
    assert [r["targets"][0]["operation"] for r in driver_loops] == ["GetDriver"]


def test_without_the_mutex_the_shared_route_pool_is_still_found(report_without_mutex: dict[str, Any]) -> None:
    # one pool of 3 shared by all concurrent /dispatch requests: inside one trace the route calls
    # run 1-3 at a time, so only the sweep across traces (the detector's second rule) shows it
    rec = one(report_without_mutex, "fanout_concurrency_limit")
    assert rec["evidence"]["k"] == ROUTE_WORKER_POOL_SIZE
    assert rec["evidence"]["shared_across_traces"] is True
    assert "shared" in rec["title"]


def test_without_the_mutex_starved_route_calls_are_not_n_plus_one(
    report_without_mutex: dict[str, Any],
) -> None:
    assert [r for r in findings(report_without_mutex, "n_plus_one") if r["service"] == "frontend"] == []


def test_exemplar_traces_are_distinct(report: dict[str, Any]) -> None:
    for rec in report["recommendations"]:
        exemplars = rec["evidence"]["trace_ids"]
        assert exemplars and len(exemplars) == len(set(exemplars)), (rec["kind"], exemplars)
