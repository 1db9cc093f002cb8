"""n_plus_one on hand-built traces, healthy counterparts, and the normalisation it relies on."""

from __future__ import annotations

import polars as pl
import pytest

from hourglass.analysis.detectors import _common, n_plus_one
from hourglass.analysis.model import CollapseSpans
from hourglass.analysis.pipeline import analyze
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER, STATUS_ERROR
from tests.analysis._assertions import one_finding, run_detector
from tests.builders import TraceBuilder, spans_table


def orders_page(
    n: int = 10, *, concurrent: bool = False, same_params: bool = False, error: bool = False
) -> TraceBuilder:
    b = TraceBuilder(service="orders")
    root = b.span("GET /orders", start_ms=0, dur_ms=20 + n * 10, kind=KIND_SERVER)
    b.span("SELECT orders", parent=root, start_ms=1, dur_ms=8, kind=KIND_CLIENT, db_system="postgresql",
           db_statement="SELECT * FROM orders WHERE user_id = 7")  # fmt: skip
    for i in range(n):
        item = 1 if same_params else 1000 + i
        b.span("SELECT items", parent=root, start_ms=10 if concurrent else 10 + i * 10, dur_ms=9, kind=KIND_CLIENT,
               db_system="postgresql", db_statement=f"SELECT * FROM items WHERE order_id = {item} AND state = 'open'",
               status_code=STATUS_ERROR if error else 0)  # fmt: skip
    return b


def detect(*builders: TraceBuilder) -> list:
    return run_detector(n_plus_one.detect, builders)


def test_repeated_query_with_different_parameters_is_one_finding() -> None:
    findings = detect(*[orders_page() for _ in range(6)])
    f = one_finding(findings, "n_plus_one", "parallelization", "orders", "GET /orders")
    assert f.targets == [
        {
            "service": "postgresql",
            "operation": "SELECT items: SELECT * FROM items WHERE order_id = ? AND state = ?",
        }
    ]
    assert len(f.occurrences) == 6 and f.evidence["calls_p50"] == 10 and f.evidence["different_parameters"]
    (iv,) = f.occurrences[0].interventions
    assert isinstance(iv, CollapseSpans) and len(iv.span_ids) == 10
    assert iv.duration_ns == 9_000_000 + int(0.05 * 81_000_000)
    assert f.confidence >= 0.8


def test_saving_is_measured_at_the_root() -> None:
    report = analyze(spans_table(orders_page()))
    (rec,) = [r for r in report["recommendations"] if r["kind"] == "n_plus_one"]
    # ten 9 ms queries 1 ms apart (10-109 ms) become one 13.05 ms query; the 9 gaps of 1 ms stay
    assert rec["impact"]["saved_ms_p50"] == pytest.approx(90 - 13.05, abs=0.01)


def test_fewer_than_five_repeats_give_nothing() -> None:
    assert detect(orders_page(n=4)) == []


def test_concurrent_repeats_give_nothing() -> None:
    assert detect(orders_page(concurrent=True)) == []


def test_identical_parameters_are_reported_as_a_cacheable_repeat() -> None:
    (f,) = detect(orders_page(same_params=True))
    assert not f.evidence["different_parameters"]


def test_parameterised_statements_do_not_claim_identical_parameters() -> None:
    b = TraceBuilder(service="orders")
    root = b.span("GET /orders", start_ms=0, dur_ms=120, kind=KIND_SERVER)
    for i in range(8):
        b.span("SELECT items", parent=root, start_ms=5 + i * 14, dur_ms=13, kind=KIND_CLIENT, db_system="sqlite",
               db_statement="SELECT * FROM items WHERE order_id = ?")  # fmt: skip
    (f,) = detect(b)
    assert f.evidence["different_parameters"] is None


def test_failing_identical_calls_are_a_retry_burst_not_n_plus_one() -> None:
    assert detect(orders_page(same_params=True, error=True)) == []


def test_repeats_of_a_rest_route_with_ids_in_the_path() -> None:
    b = TraceBuilder(service="web")
    root = b.span("GET /feed", start_ms=0, dur_ms=200, kind=KIND_SERVER)
    for i in range(7):
        b.span("GET", parent=root, start_ms=5 + i * 25, dur_ms=24, kind=KIND_CLIENT, http_method="GET",
               http_url=f"http://users:8080/api/users/{1000 + i}/profile?lang=en")  # fmt: skip
    (f,) = detect(b)
    assert f.targets == [{"service": "users", "operation": "GET: GET /api/users/{id}/profile"}]


@pytest.mark.parametrize(
    ("statement", "normalised"),
    [
        ("SELECT * FROM t WHERE id = 42", "SELECT * FROM t WHERE id = ?"),
        (
            "SELECT * FROM t WHERE name = 'O''Brien' AND x > -3.5e2",
            "SELECT * FROM t WHERE name = ? AND x > ?",
        ),
        ("SELECT * FROM t WHERE id IN (1, 2,3)", "SELECT * FROM t WHERE id IN (?)"),
        ("SELECT * FROM t WHERE id = $1", "SELECT * FROM t WHERE id = ?"),
        ("INSERT INTO t (a, b) VALUES (1, 'x'), (2, 'y')", "INSERT INTO t (a, b) VALUES (?, ?)"),
        ("UPDATE  t\n SET flag = true WHERE h = 0xFF", "UPDATE t SET flag = ? WHERE h = ?"),
        ("SELECT col1, t2.col FROM t2", "SELECT col1, t2.col FROM t2"),
    ],
)
def test_sql_normalisation(statement: str, normalised: str) -> None:
    out = pl.DataFrame({"db_statement": [statement]}).select(_common.normalized_sql())
    assert out.item() == normalised


@pytest.mark.parametrize(
    ("url", "route"),
    [
        ("http://h/api/users/42", "/api/users/{id}"),
        ("https://h:8443/a/0b3e6f2c-1d4a-4c8e-9a51-2f6b7c8d9e0a/b?x=1", "/a/{id}/b"),
        ("http://h/orders/12/items/7", "/orders/{id}/items/{id}"),
        ("http://h/files/5f2b9c0d1e3a4b6c", "/files/{id}"),
        ("http://h/u/jane@example.com/settings", "/u/{id}/settings"),
        ("http://h/", "/"),
        ("/static/app.js", "/static/app.js"),
        ("http://h/api/v1/users/a7Bx92kQ3z", "/api/v1/users/{id}"),  # version segments stay
        ("http://h/ipv6/h264/", "/ipv6/h264"),
    ],
)
def test_route_normalisation(url: str, route: str) -> None:
    out = pl.DataFrame(
        {"http_url": [url], "http_route": [None]}, schema={"http_url": pl.String, "http_route": pl.String}
    )
    assert out.select(_common.normalized_route()).item() == route


def test_a_fan_out_that_is_sequential_only_now_and_then_gives_nothing() -> None:
    assert detect(orders_page(), *[orders_page(concurrent=True) for _ in range(9)]) == []


def _route_calls(*, one_at_a_time: bool) -> TraceBuilder:
    """frontend /dispatch calling GET /route for 6 drivers through a shared pool of 3 workers."""
    b = TraceBuilder(service="frontend")
    root = b.span("/dispatch", start_ms=0, dur_ms=400, kind=KIND_SERVER)
    for i in range(6):
        start = 10 + (i * 52 if one_at_a_time else (i // 3) * 52)
        b.span("HTTP GET", parent=root, start_ms=start, dur_ms=50, kind=KIND_CLIENT, http_method="GET",
               http_url=f"http://route:8083/route?pickup={i}&dropoff={i + 1}")  # fmt: skip
    return b


def test_a_starved_shared_pool_is_not_a_loop_to_batch() -> None:
    """The calls overlap (3 at a time) in most requests: the code issues them concurrently, and the
    requests that ran them one by one were waiting for the shared pool's workers."""
    mostly_concurrent = [_route_calls(one_at_a_time=False) for _ in range(7)]
    starved = [_route_calls(one_at_a_time=True) for _ in range(3)]
    assert detect(*mostly_concurrent, *starved) == []
    # The same one-by-one requests with no concurrent instances beside them are an N+1 loop.
    assert len(detect(*[_route_calls(one_at_a_time=True) for _ in range(10)])) == 1
