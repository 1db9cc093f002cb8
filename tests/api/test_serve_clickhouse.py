"""`hourglass serve --db chdb:DIR`: the real OpenTelemetry SDK exporter over OTLP/gRPC into the
embedded ClickHouse store, the background analysis finding the serialized calls, and the spans
still there after a SIGTERM and a reopen (as otel_traces rows other tools can read)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from hourglass.collector.backends import open_store
from hourglass.collector.store import StoreStats
from tests.api.live_server import (
    ROOT,
    LiveServer,
    free_port,
    hourglass_executable,
    send_traces,
    wait_for_spans,
)

pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")


def test_serve_on_chdb_receives_analyses_and_keeps_spans(tmp_path: Path) -> None:
    store_dir = tmp_path / "spans.chdb"
    grpc_port, http_port, api_port = free_port(), free_port(), free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    env["HOURGLASS_SETTLE"] = "0.5s"
    cmd = [
        *hourglass_executable(),
        "serve",
        "--db",
        f"chdb:{store_dir}",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--api-port",
        str(api_port),
    ]
    with log.open("wb") as log_file:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = LiveServer(
        base_url=f"http://127.0.0.1:{api_port}",
        grpc_endpoint=f"127.0.0.1:{grpc_port}",
        db=store_dir,
        log=log,
        token=None,
        process=process,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, f"serve exited {process.returncode}:\n{server.log_tail()}"
            try:
                if httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"serve did not answer /healthz:\n{server.log_tail()}"
            time.sleep(0.2)
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
        assert "chdb:" in log.read_text()
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
    assert process.returncode == 0, server.log_tail()
    store = open_store(f"chdb:{store_dir}")
    try:
        assert store.stats() == StoreStats(spans=server.sent_spans, traces=20)
        assert store.trace(checkout_ids[0]).num_rows == 7
    finally:
        store.close()
