"""``GET /metrics``: Prometheus text parsed with prometheus-client's own parser; the counters move
as spans arrive through the real OpenTelemetry exporters at a real `hourglass serve`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from prometheus_client.parser import text_string_to_metric_families

from hourglass.api.app import create_app
from hourglass.api.metrics import AnalysisMetrics
from hourglass.api.settings import Settings
from hourglass.collector.decode import decode_otlp_json
from hourglass.collector.duckdb_store import DuckDBSpanStore
from tests.api.test_serve import EXPORT_METHOD, Serve, _emit, _kill, start_serve

pytestmark = pytest.mark.timeout(180)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    server = start_serve(tmp_path / "spans.duckdb", tmp_path / "serve.log", "--metrics-public")
    try:
        yield server
    finally:
        _kill(server.process)


def _scrape(serve: Serve) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = httpx.get(f"{serve.api}/metrics", timeout=30)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return samples(reply.text)


def test_counters_move_as_spans_arrive(serve: Serve) -> None:
    before = _scrape(serve)
    assert value(before, "hourglass_spans_stored_total", protocol="grpc") == 0
    assert value(before, "hourglass_store_spans") == 0

    _emit(GrpcExporter(endpoint=serve.grpc, insecure=True, timeout=10), "via-grpc")  # 4 spans
    _emit(HttpExporter(endpoint=serve.http, timeout=10), "via-http")  # 4 spans
    with grpc.insecure_channel(serve.grpc) as channel, pytest.raises(grpc.RpcError):
        channel.unary_unary(EXPORT_METHOD)(b"\xff\xff garbage", timeout=10)
    partly_bad = {"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "x", "traceId": "zz"}]}]}]}
    assert httpx.post(serve.http, json=partly_bad, timeout=10).status_code == 200

    after = _scrape(serve)
    for protocol in ("grpc", "http"):
        assert value(after, "hourglass_spans_received_total", protocol=protocol) == 4 + (protocol == "http")
        assert value(after, "hourglass_spans_stored_total", protocol=protocol) == 4
        assert value(after, "hourglass_export_requests_total", protocol=protocol, outcome="ok") >= 1
        # the SDK exports each span as it ends (SimpleSpanProcessor): one histogram count per Export
        count = value(after, "hourglass_export_duration_seconds_count", protocol=protocol)
        assert count == sum(
            value(after, "hourglass_export_requests_total", protocol=protocol, outcome=o)
            for o in (
                "ok",
                "invalid",
                "overloaded",
                "unavailable",
                "unauthenticated",
                "too_large",
                "unsupported",
            )
        )
        assert value(after, "hourglass_export_duration_seconds_bucket", protocol=protocol, le="+Inf") == count
        assert value(after, "hourglass_export_duration_seconds_sum", protocol=protocol) > 0
    assert value(after, "hourglass_export_requests_total", protocol="grpc", outcome="invalid") == 1
    assert value(after, "hourglass_spans_refused_total", protocol="http", reason="invalid") == 1
    assert value(after, "hourglass_store_spans") == 8
    assert value(after, "hourglass_store_traces") == 2
    assert value(after, "hourglass_store_bytes") > 0
    assert value(after, "hourglass_ingest_commits_total") >= 1

    # the background analysis runs once the spans settle (HOURGLASS_SETTLE is unset: 10 s default;
    # POST /v1/analyses runs it now)
    assert httpx.post(f"{serve.api}/v1/analyses", timeout=120).status_code == 200
    final = _scrape(serve)
    assert value(final, "hourglass_analysis_runs_total", outcome="ok") >= 1
    assert value(final, "hourglass_analysis_duration_seconds_count") >= 1
    assert value(final, "hourglass_analysis_spans") == 8
    assert value(final, "hourglass_analysis_last_success_timestamp_seconds") > time.time() - 600
    recommendations = sum(v for (name, _), v in final.items() if name == "hourglass_recommendations")
    report = httpx.get(f"{serve.api}/v1/recommendations", timeout=30).json()
    assert recommendations == len(report["recommendations"])


KNOWN = {
    "resourceSpans": [
        {
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "a"}}]},
            "scopeSpans": [
                {
                    "spans": [
                        {
                            "traceId": "0af7651916cd43dd8448eb211c80319c",
                            "spanId": "b7ad6b7169203331",
                            "name": "GET /",
                            "startTimeUnixNano": "1764000000000000000",
                            "endTimeUnixNano": "1764000000100000000",
                        }
                    ]
                }
            ],
        }
    ]
}


def _app(token: str | None, public: bool) -> tuple[TestClient, DuckDBSpanStore]:
    store = DuckDBSpanStore()
    store.write(decode_otlp_json(KNOWN).table)
    app = create_app(store, settings=Settings(api_token=token, metrics_public=public), start_analysis=False)
    return TestClient(app), store


def test_token_unless_public_and_one_registry_per_app() -> None:
    private, store1 = _app("secret", public=False)
    public, store2 = _app("secret", public=True)  # a second app in the same process: no collision
    with private, public:
        assert private.get("/metrics").status_code == 401
        reply = private.get("/metrics", headers={"Authorization": "Bearer secret"})
        assert reply.status_code == 200
        assert value(samples(reply.text), "hourglass_store_spans") == 1
        assert value(samples(public.get("/metrics").text), "hourglass_store_spans") == 1
        # not on prometheus-client's global registry (that one only has the process collectors)
        from prometheus_client import REGISTRY, generate_latest

        assert b"hourglass_" not in generate_latest(REGISTRY)
    store1.close()
    store2.close()


class _Snapshot:
    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report


def test_llm_calls_tokens_and_failures_are_counted_per_run() -> None:
    metrics = AnalysisMetrics()
    usage = {"input_tokens": 1200, "output_tokens": 300, "cache_read_input_tokens": 50}
    ok = {"name": "anthropic:m", "metadata": {"model": "m", "requests": 3, "usage": usage}}
    failed = {
        "name": "template",
        "fallback_reason": "rate limited",
        "metadata": {"agent": {"model": "m", "requests": 1, "usage": {"input_tokens": 10}}},
    }
    metrics("ok", 1.5, _Snapshot({"writer": ok}))
    metrics("ok", 0.2, _Snapshot({"writer": failed}))
    metrics("ok", 0.1, _Snapshot({"writer": {"name": "template"}}))  # no agent configured
    metrics("failed", 0.05, None)
    assert metrics.runs == {"ok": 3, "failed": 1}
    assert metrics.llm_requests == {"m": 4}
    assert metrics.llm_tokens == {("m", "input"): 1210, ("m", "output"): 300, ("m", "cache_read_input"): 50}
    assert metrics.llm_failures == {"m": 1}
    assert sum(metrics.buckets) == 4


def test_store_counts_are_recounted_at_most_every_20x_their_duration() -> None:
    """Unique counts scan the table: a scrape every few seconds must not keep a big store busy."""
    from prometheus_client import CollectorRegistry, generate_latest

    from hourglass.api.metrics import HourglassCollector
    from hourglass.collector.store import StoreStats

    class SlowStats:
        path = ":memory:"
        calls = 0
        took = 0.0  # the last count's own time: 100 ms asked, more on a loaded machine

        def stats(self) -> StoreStats:
            SlowStats.calls += 1
            started = time.perf_counter()
            time.sleep(0.1)  # a count that takes 100 ms: recounted at most every 2 s
            SlowStats.took = time.perf_counter() - started
            return StoreStats(spans=SlowStats.calls, traces=1)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(HourglassCollector(SlowStats()))  # type: ignore[arg-type]
    first = value(samples(generate_latest(registry).decode()), "hourglass_store_spans")
    again = value(samples(generate_latest(registry).decode()), "hourglass_store_spans")
    assert (first, again, SlowStats.calls) == (1, 1, 1)
    # 20x the count's own time as it ran (a loaded machine stretches the 100 ms), with a margin
    time.sleep(20 * SlowStats.took * 1.1 + 0.3)
    assert value(samples(generate_latest(registry).decode()), "hourglass_store_spans") == 2
