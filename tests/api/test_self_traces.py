"""`serve --self-traces-endpoint`: Hourglass's own traces through the OpenTelemetry SDK to another OTLP
endpoint — here a second, real `hourglass serve` — and never to itself."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

from hourglass.api.self_traces import check_not_self, parse_endpoint
from tests.api.live_server import free_port
from tests.api.test_serve import ROOT, _emit, _kill, start_serve

pytestmark = pytest.mark.timeout(180)


def test_endpoints_parse_and_this_server_is_refused() -> None:
    assert parse_endpoint("collector:4317") == ("grpc", "collector", 4317, "collector:4317")
    assert parse_endpoint("grpc://10.0.0.5") == ("grpc", "10.0.0.5", 4317, "10.0.0.5:4317")
    assert parse_endpoint("http://tempo:4318") == ("http", "tempo", 4318, "http://tempo:4318/v1/traces")
    assert parse_endpoint("https://otlp.example/v1/traces")[3] == "https://otlp.example/v1/traces"
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_endpoint("ftp://x:1")
    with pytest.raises(ValueError, match="own OTLP receiver"):
        check_not_self("127.0.0.1:4317", {4317, 4318})
    with pytest.raises(ValueError, match="own OTLP receiver"):
        check_not_self("http://localhost:4318", {4317, 4318})
    check_not_self("127.0.0.1:14317", {4317, 4318})  # another port on this machine: another server
    check_not_self("hourglass.collector.invalid:4317", {4317, 4318})  # another machine


def test_serve_refuses_to_trace_into_itself(tmp_path: Path) -> None:
    port = free_port()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hourglass",
            "serve",
            "--db",
            str(tmp_path / "s.duckdb"),
            "--grpc-port",
            str(port),
            "--http-port",
            "0",
            "--api-port",
            "0",
            "--self-traces-endpoint",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "own OTLP receiver" in result.stderr


def test_own_traces_reach_another_hourglass(tmp_path: Path) -> None:
    observer = start_serve(tmp_path / "observer.duckdb", tmp_path / "observer.log")
    try:
        observed = start_serve(
            tmp_path / "observed.duckdb", tmp_path / "observed.log", "--self-traces-endpoint", observer.grpc
        )
        try:
            assert f"own traces go to {observer.grpc}" in observed.log_text()
            _emit(GrpcExporter(endpoint=observed.grpc, insecure=True, timeout=10), "shop")
            deadline = time.monotonic() + 60  # the start-up analysis run (over an empty store) is traced
            while httpx.get(f"{observed.api}/v1/stats", timeout=10).json()["analysis"]["runs"] < 1:
                assert time.monotonic() < deadline, observed.log_text()
                time.sleep(0.2)
            assert observed.stop() == 0  # shutdown flushes the batch of own spans
        finally:
            _kill(observed.process)
        deadline = time.monotonic() + 60
        while True:
            names = httpx.get(f"{observer.api}/api/services/hourglass/operations", timeout=10).json()["data"]
            if {"hourglass.analysis", "hourglass.export"} <= set(names) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {"hourglass.analysis", "hourglass.export", "hourglass.analysis.scan"} <= set(names)
        found = httpx.get(
            f"{observer.api}/api/traces",
            params={"service": "hourglass", "operation": "hourglass.analysis", "tags": '{"error":"false"}'},
            timeout=10,
        ).json()["data"]
        assert found, "the observed server's analysis run"
        spans = found[0]["spans"]
        [root] = [s for s in spans if s["operationName"] == "hourglass.analysis"]
        assert {"key": "hourglass.analysis.outcome", "type": "string", "value": "ok"} in root["tags"]
        steps = [s for s in spans if s["operationName"].startswith("hourglass.analysis.")]
        assert steps and all(s["references"][0]["spanID"] == root["spanID"] for s in steps)
        exports = httpx.get(
            f"{observer.api}/api/traces",
            params={"service": "hourglass", "operation": "hourglass.export"},
            timeout=10,
        ).json()["data"]
        assert len(exports) == 4  # the SDK exported each of the 4 spans in its own Export

    finally:
        _kill(observer.process)
