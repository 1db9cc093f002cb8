"""The Jaeger query API (``/api/...``): the exact JSON the Jaeger UI and Grafana's Jaeger data source
read, the query paths Grafana calls, and a round trip through the real server and the real
``hourglass import`` (API → file → import → the same spans).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from hourglass.api.app import create_app
from hourglass.api.jaeger_api import jaeger_traces
from hourglass.api.settings import Settings
from hourglass.collector.decode import decode_otlp_json
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.readers.jaeger import jaeger_to_otlp_json
from hourglass.collector.schema import SPAN_COLUMNS
from hourglass.collector.trace_query import TraceQuery, dependencies, operations, search_trace_ids
from tests.api.live_server import LiveServer, running_server, send_traces, wait_for_spans

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]

TRACE = "0af7651916cd43dd8448eb211c80319c"
OTHER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ROOT_SPAN, CALL, QUEUED = "b7ad6b7169203331", "00f067aa0ba902b7", "53995c3f42cd8ad8"
T0 = 1_764_000_000_123_456_789  # ns: sub-microsecond digits on purpose (Jaeger keeps microseconds)


def _attr(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "value": value}


KNOWN_TRACE = {
    "resourceSpans": [
        {
            "resource": {
                "attributes": [
                    _attr("service.name", {"stringValue": "checkout"}),
                    _attr("host.name", {"stringValue": "checkout-1"}),
                    _attr("process.pid", {"intValue": "4242"}),
                ]
            },
            "scopeSpans": [
                {
                    "scope": {"name": "shop.checkout"},
                    "spans": [
                        {
                            "traceId": TRACE,
                            "spanId": ROOT_SPAN,
                            "name": "POST /checkout",
                            "kind": 2,
                            "startTimeUnixNano": str(T0),
                            "endTimeUnixNano": str(T0 + 250_000_999),
                            "attributes": [
                                _attr("http.request.method", {"stringValue": "POST"}),
                                _attr("http.response.status_code", {"intValue": "500"}),
                                _attr("retry", {"boolValue": False}),
                                _attr("load", {"doubleValue": 0.75}),
                                _attr("blob", {"bytesValue": "AAEC"}),
                                _attr(
                                    "ids", {"arrayValue": {"values": [{"intValue": "1"}, {"intValue": "2"}]}}
                                ),
                            ],
                            "events": [
                                {
                                    "timeUnixNano": str(T0 + 1_500),
                                    "name": "lock acquired",
                                    "attributes": [_attr("wait.ms", {"intValue": "12"})],
                                }
                            ],
                            "status": {"code": 2, "message": "payment failed"},
                        },
                        {
                            "traceId": TRACE,
                            "spanId": CALL,
                            "parentSpanId": ROOT_SPAN,
                            "name": "GET /prices",
                            "kind": 3,
                            "startTimeUnixNano": str(T0 + 10_000_500),
                            "endTimeUnixNano": str(T0 + 40_000_000),
                            "attributes": [_attr("peer.service", {"stringValue": "prices"})],
                            "links": [{"traceId": OTHER_TRACE, "spanId": "00000000000000ab"}],
                        },
                    ],
                }
            ],
        },
        {
            "resource": {"attributes": [_attr("service.name", {"stringValue": "mailer"})]},
            "scopeSpans": [
                {
                    "scope": {"name": "shop.mailer"},
                    "spans": [
                        {
                            "traceId": TRACE,
                            "spanId": QUEUED,
                            "parentSpanId": ROOT_SPAN,
                            "name": "send receipt",
                            "kind": 5,
                            "startTimeUnixNano": str(T0 + 300_000_000),
                            "endTimeUnixNano": str(T0 + 302_000_000),
                            "links": [
                                {
                                    "traceId": TRACE,
                                    "spanId": ROOT_SPAN,
                                    "attributes": [
                                        _attr("opentracing.ref_type", {"stringValue": "follows_from"})
                                    ],
                                }
                            ],
                            "status": {"code": 1},
                        }
                    ],
                }
            ],
        },
    ]
}


@pytest.fixture
def store() -> Iterator[DuckDBSpanStore]:
    with DuckDBSpanStore() as s:
        s.write(decode_otlp_json(KNOWN_TRACE).table)
        yield s


@pytest.fixture
def client(store: DuckDBSpanStore) -> Iterator[TestClient]:
    app = create_app(store, settings=Settings(api_token=None), start_analysis=False)
    with TestClient(app) as c:
        yield c


def _types(value: Any) -> Any:
    """The JSON shape of a value: dicts by key, lists by their first item, scalars by type name."""
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(value[0])] if value else []
    return type(value).__name__


SPAN_KEYS = {
    "traceID",
    "spanID",
    "operationName",
    "references",
    "startTime",
    "duration",
    "tags",
    "logs",
    "processID",
    "warnings",
}


def test_trace_is_the_jaeger_ui_json_exactly(client: TestClient) -> None:
    reply = client.get(f"/api/traces/{TRACE}")
    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {"data", "total", "limit", "offset", "errors"}
    assert (body["total"], body["limit"], body["offset"], body["errors"]) == (1, 0, 0, None)
    [trace] = body["data"]
    assert set(trace) == {"traceID", "spans", "processes", "warnings"}
    assert trace["traceID"] == TRACE and trace["warnings"] is None
    assert trace["processes"] == {
        "p1": {
            "serviceName": "checkout",
            "tags": [
                {"key": "host.name", "type": "string", "value": "checkout-1"},
                {"key": "process.pid", "type": "int64", "value": 4242},
            ],
        },
        "p2": {"serviceName": "mailer", "tags": []},
    }
    root, call, queued = trace["spans"]
    for span in trace["spans"]:
        assert set(span) == SPAN_KEYS
        assert _types(
            {k: span[k] for k in ("traceID", "spanID", "operationName", "startTime", "duration")}
        ) == {
            "traceID": "str",
            "spanID": "str",
            "operationName": "str",
            "startTime": "int",
            "duration": "int",
        }
        assert span["warnings"] is None
        for tag in span["tags"]:
            assert set(tag) == {"key", "type", "value"}
            assert tag["type"] in {"string", "bool", "int64", "float64", "binary"}
    assert root == {
        "traceID": TRACE,
        "spanID": ROOT_SPAN,
        "operationName": "POST /checkout",
        "references": [],
        "startTime": T0 // 1000,  # microseconds, truncated
        "duration": (T0 + 250_000_999) // 1000 - T0 // 1000,
        "tags": [
            {"key": "http.request.method", "type": "string", "value": "POST"},
            {"key": "http.response.status_code", "type": "int64", "value": 500},
            {"key": "retry", "type": "bool", "value": False},
            {"key": "load", "type": "float64", "value": 0.75},
            {"key": "blob", "type": "binary", "value": "AAEC"},
            {"key": "ids", "type": "string", "value": "[1,2]"},
            {"key": "span.kind", "type": "string", "value": "server"},
            {"key": "otel.status_code", "type": "string", "value": "ERROR"},
            {"key": "otel.status_description", "type": "string", "value": "payment failed"},
            {"key": "error", "type": "bool", "value": True},
            {"key": "otel.scope.name", "type": "string", "value": "shop.checkout"},
        ],
        "logs": [
            {
                "timestamp": (T0 + 1_500) // 1000,
                "fields": [
                    {"key": "event", "type": "string", "value": "lock acquired"},
                    {"key": "wait.ms", "type": "int64", "value": 12},
                ],
            }
        ],
        "processID": "p1",
        "warnings": None,
    }
    assert call["references"] == [
        {"refType": "CHILD_OF", "traceID": TRACE, "spanID": ROOT_SPAN},
        {"refType": "FOLLOWS_FROM", "traceID": OTHER_TRACE, "spanID": "00000000000000ab"},
    ]
    assert call["processID"] == "p1"
    # a follows-from parent: CHILD_OF (Grafana nests under it) then FOLLOWS_FROM, as the Collector writes it
    assert queued["references"] == [
        {"refType": "CHILD_OF", "traceID": TRACE, "spanID": ROOT_SPAN},
        {"refType": "FOLLOWS_FROM", "traceID": TRACE, "spanID": ROOT_SPAN},
    ]
    assert queued["processID"] == "p2"
    assert {"key": "span.kind", "type": "string", "value": "consumer"} in queued["tags"]
    assert {"key": "otel.status_code", "type": "string", "value": "OK"} in queued["tags"]


def test_trace_errors_are_jaeger_errors(client: TestClient) -> None:
    missing = client.get(f"/api/traces/{'f' * 32}")
    assert missing.status_code == 404
    assert missing.json() == {
        "data": None,
        "total": 0,
        "limit": 0,
        "offset": 0,
        "errors": [{"code": 404, "msg": "trace not found"}],
    }
    bad = client.get("/api/traces/not-hex")
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 400
    # leading zeros are optional, as Jaeger drops them
    assert client.get(f"/api/traces/{TRACE.lstrip('0').upper()}").json()["data"][0]["traceID"] == TRACE


def test_grafana_query_paths(client: TestClient) -> None:
    # the data source's health check and the query editor's pickers
    assert client.get("/api/services").json()["data"] == ["checkout", "mailer"]
    assert client.get("/api/services/checkout/operations").json()["data"] == ["GET /prices", "POST /checkout"]
    assert client.get("/api/operations", params={"service": "checkout"}).json()["data"] == [
        {"name": "GET /prices", "spanKind": "client"},
        {"name": "POST /checkout", "spanKind": "server"},
    ]
    assert client.get("/api/operations", params={"service": "checkout", "spanKind": "server"}).json()[
        "data"
    ] == [{"name": "POST /checkout", "spanKind": "server"}]

    def search(**params: Any) -> list[str]:
        reply = client.get("/api/traces", params=params)
        assert reply.status_code == 200, reply.text
        return [t["traceID"] for t in reply.json()["data"]]

    start_us, end_us = T0 // 1000, T0 // 1000 + 1_000_000
    assert search(service="checkout", start=start_us, end=end_us, limit=20) == [TRACE]
    assert search(service="checkout", start=end_us, end=end_us + 10) == []  # the window excludes it
    # minDuration / maxDuration as Go durations, on one span of the service (the 30 ms client call)
    assert search(service="checkout", operation="GET /prices", minDuration="1.2ms", maxDuration="30ms") == [
        TRACE
    ]
    assert search(service="checkout", operation="GET /prices", minDuration="31ms") == []
    assert search(service="checkout", minDuration="0.25s") == [TRACE]  # the 250 ms root
    # tags: Grafana sends a JSON object; the Jaeger UI also repeats tag=key:value
    assert search(service="checkout", tags=json.dumps({"http.response.status_code": "500"})) == [TRACE]
    assert search(service="checkout", tags=json.dumps({"http.response.status_code": "404"})) == []
    assert search(service="checkout", tags=json.dumps({"error": "true"})) == [TRACE]
    assert search(service="mailer", tags=json.dumps({"error": "true"})) == []
    assert search(service="checkout", tags=json.dumps({"host.name": "checkout-1"})) == [TRACE]  # process tag
    assert search(service="checkout", tag="wait.ms:12") == [TRACE]  # a log field
    assert search(service="checkout", tags=json.dumps({"retry": "false", "span.kind": "server"})) == [TRACE]
    assert search(traceID=TRACE.lstrip("0")) == [TRACE]
    # the call graph Grafana's node graph draws: checkout -> mailer (the consumer span)
    deps = client.get("/api/dependencies", params={"endTs": T0 // 1_000_000 + 60_000, "lookback": 3_600_000})
    assert deps.json()["data"] == [{"parent": "checkout", "child": "mailer", "callCount": 1}]


def test_search_errors_say_which_parameter(client: TestClient) -> None:
    for params, word in (
        ({}, "service"),
        ({"service": "checkout", "minDuration": "fast"}, "minDuration"),
        ({"service": "checkout", "start": "yesterday"}, "start"),
        ({"service": "checkout", "tags": "{not json"}, "tags"),
        ({"service": "checkout", "limit": "many"}, "limit"),
        ({"service": "checkout", "start": "9" * 30}, "start"),
        ({"service": "checkout", "maxDuration": "9" * 400 + "h"}, "maxDuration"),
        ({"service": "checkout", "lookback": "9" * 20 + "h"}, "lookback"),
    ):
        reply = client.get("/api/traces", params=params)
        assert reply.status_code == 400, params
        [error] = reply.json()["errors"]
        assert error["code"] == 400 and word in error["msg"], error


def test_generic_search_matches_the_duckdb_search(store: DuckDBSpanStore) -> None:
    """A store without its own search (e.g. a new backend) gets the same answers from scan()."""

    class ScanOnly:
        def __init__(self, inner: DuckDBSpanStore) -> None:
            self.scan = inner.scan

    for query in (
        TraceQuery(service="checkout"),
        TraceQuery(service="checkout", operation="GET /prices", min_duration_ns=1_200_000),
        TraceQuery(service="checkout", min_duration_ns=31_000_000, operation="GET /prices"),
        TraceQuery(service="checkout", tags={"error": "true"}),
        TraceQuery(service="checkout", tags={"wait.ms": "12"}),
        TraceQuery(service="mailer", tags={"host.name": "checkout-1"}),
    ):
        assert search_trace_ids(ScanOnly(store), query) == search_trace_ids(store, query), query  # type: ignore[arg-type]
    scan_only = ScanOnly(store)
    for window in ((None, None), (T0, T0 + 400_000_000), (T0 + 301_000_000, None)):
        assert dependencies(scan_only, *window) == dependencies(store, *window), window  # type: ignore[arg-type]
    assert operations(scan_only, "checkout") == operations(store, "checkout")  # type: ignore[arg-type]


def test_output_reads_back_through_the_jaeger_reader(store: DuckDBSpanStore) -> None:
    table = store.scan(trace_ids=[TRACE], columns=SPAN_COLUMNS)
    document = {"data": jaeger_traces(table)}
    again = decode_otlp_json(jaeger_to_otlp_json(json.loads(json.dumps(document))).traces_data).table
    _assert_same_spans(table.to_pylist(), again.to_pylist())


def _assert_same_spans(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> None:
    """Same span count, ids, parents, services, names, kinds, status, scope and microsecond timings."""

    def key(row: dict[str, Any]) -> tuple[Any, ...]:
        return (
            row["trace_id"],
            row["span_id"],
            row["parent_span_id"],
            row["service"],
            row["name"],
            row["kind"],
            row["start_ns"] // 1000 * 1000,
            row["end_ns"] // 1000 * 1000,
            row["status_code"],
            bool(row["follows_from"]),
            row["scope_name"],
        )

    assert len(after) == len(before)
    assert sorted(key(r) for r in after) == sorted(key(r) for r in before)
    # the read-back times are exactly the microsecond-truncated originals
    assert all(r["start_ns"] % 1000 == 0 and r["end_ns"] % 1000 == 0 for r in after)


# -- the real server over HTTP, and the real `hourglass import` ------------------------------------

TOKEN = "jaeger-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with running_server(tmp_path_factory.mktemp("jaeger"), token=TOKEN) as srv:
        send_traces(srv, checkout=3, home=2)
        wait_for_spans(srv, 5 * 7)
        yield srv


def test_round_trip_through_the_server_and_hourglass_import(server: LiveServer, tmp_path: Path) -> None:
    trace_id = server.sent_traces[0]
    with server.client() as client:
        assert client.get("/api/services").json()["data"] == ["cart", "frontend", "prices", "users"]
        exported = client.get(f"/api/traces/{trace_id}")
        assert exported.status_code == 200
        stored = client.get(f"/v1/traces/{trace_id}").json()["spans"]
        found = client.get(
            "/api/traces", params={"service": "frontend", "operation": "GET /checkout", "limit": 10}
        ).json()
    # Grafana authenticates with basic auth (token as password) or a bearer header; without: 401
    assert httpx.get(f"{server.base_url}/api/services", timeout=10).status_code == 401
    basic = httpx.get(f"{server.base_url}/api/services", auth=("grafana", TOKEN), timeout=10)
    assert basic.status_code == 200
    assert sorted(t["traceID"] for t in found["data"]) == sorted(server.sent_traces)

    saved = tmp_path / "exported.json"
    saved.write_bytes(exported.content)
    db = tmp_path / "reimported.duckdb"
    result = subprocess.run(
        [sys.executable, "-m", "hourglass", "import", "--db", str(db), "--format", "json", str(saved)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["spans"] == len(stored) == 7
    with DuckDBSpanStore(str(db)) as reimported:
        rows = reimported.trace(trace_id).to_pylist()
    kinds = {"unspecified": 0, "internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
    before = [
        {
            "trace_id": trace_id,
            "span_id": s["span_id"],
            "parent_span_id": s["parent_span_id"],
            "service": s["service"],
            "name": s["name"],
            "kind": kinds[s["kind"]],
            "start_ns": s["start_ns"],
            "end_ns": s["end_ns"],
            "status_code": s["status_code"],
            "follows_from": False,
            "scope_name": "tests.live_server",  # the SDK tracer's name, carried as otel.scope.name
        }
        for s in stored
    ]
    _assert_same_spans(before, rows)


def test_a_span_delivered_twice_is_one_call_and_one_span(store: DuckDBSpanStore) -> None:
    store.write(decode_otlp_json(KNOWN_TRACE).table)  # an exporter retry, not compacted yet
    assert dependencies(store, None, None) == [("checkout", "mailer", 1)]
    [trace] = jaeger_traces(store.scan(trace_ids=[TRACE], columns=SPAN_COLUMNS))
    assert len(trace["spans"]) == 3
