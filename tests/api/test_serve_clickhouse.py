"""`hourglass serve --db chdb:DIR`: the real OpenTelemetry SDK exporter over OTLP/gRPC into the
embedded ClickHouse store, the background analysis finding the serialized calls, and the spans
still there after a SIGTERM and a reopen (as otel_traces rows other tools can read)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hourglass.collector.backends import open_store
from hourglass.collector.store import StoreStats
from tests.api.live_server import running_server, send_traces, wait_for_spans

pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")


def test_serve_on_chdb_receives_analyses_and_keeps_spans(tmp_path: Path) -> None:
    with running_server(tmp_path, store="chdb", stop_timeout=30) as server:
        checkout_ids = send_traces(server, checkout=10, home=10)
        wait_for_spans(server, server.sent_spans)
        with server.client() as client:
            deadline = time.monotonic() + 60
            while True:
                report = client.get("/v1/recommendations").json()
                found = [
                    r
                    for r in report["recommendations"]
                    if r["kind"] == "serialized_calls" and r["operation"] == "GET /checkout"
                ]
                if found and report["spans_analyzed"] == server.sent_spans:
                    break
                assert time.monotonic() < deadline, f"no finding:\n{report}\n{server.log_tail()}"
                time.sleep(0.5)
        assert found[0]["traces_affected"] == 10
        assert set(found[0]["evidence"]["trace_ids"]) <= set(checkout_ids)
        assert "chdb:" in server.log.read_text()
    assert server.process.returncode == 0, server.log_tail()
    store = open_store(f"chdb:{server.db}")
    try:
        assert store.stats() == StoreStats(spans=server.sent_spans, traces=20)
        assert store.trace(checkout_ids[0]).num_rows == 7
    finally:
        store.close()
