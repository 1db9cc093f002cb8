"""Input problems a person can read: `hourglass analyze FILE`, `hourglass import FILE` and `serve`'s log
print one line per kind of problem with a count and the first positions (``--verbose``: every one);
``analyze --format json`` carries the same summary under ``input_warnings``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.test_serve import _kill, start_serve

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]
REAL_TRACES = (ROOT / ".." / "shared" / "real-traces").resolve()
ZIPKIN_FILES = sorted(REAL_TRACES.glob("zipkin-v2__*.json"))


def hourglass(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hourglass", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def _jaeger_file(path: Path, bad: int, good: int) -> Path:
    """One Jaeger trace document: ``bad`` spans without a start time, then ``good`` whole ones."""
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    spans: list[dict[str, Any]] = []
    for i in range(bad + good):
        span: dict[str, Any] = {
            "traceID": trace_id,
            "spanID": f"{i + 1:016x}",
            "operationName": "GET /x",
            "references": [],
            "duration": 1000,
            "processID": "p1",
        }
        if i >= bad:
            span["startTime"] = 1_764_000_000_000_000 + i
        spans.append(span)
    document = {"data": [{"traceID": trace_id, "spans": spans, "processes": {"p1": {"serviceName": "api"}}}]}
    path.write_text(json.dumps(document))
    return path


def _lines(stderr: str, needle: str) -> list[str]:
    return [line for line in stderr.splitlines() if needle in line]


def test_300_bad_spans_are_one_line_on_analyze_with_the_same_summary_in_the_report(tmp_path: Path) -> None:
    path = _jaeger_file(tmp_path / "bad.json", bad=300, good=10)
    result = hourglass("analyze", str(path), "--format", "json")
    assert result.returncode == 2, result.stderr  # data was skipped; the report is still printed
    [line] = _lines(result.stderr, "startTime")
    assert line == (
        f"hourglass analyze: {path}: 300 skipped: data[].spans[].startTime: missing (at "
        + ", ".join(f"data[0].spans[{i}].startTime" for i in range(5))
        + " and 295 more; --verbose lists every one)"
    )
    report = json.loads(result.stdout)
    assert report["schema"] == "hourglass.report/v1" and report["spans_analyzed"] == 10
    assert report["input_warnings"] == [
        {
            "source": str(path),
            "field": "data[].spans[].startTime",
            "kind": "missing",
            "reason": "missing",
            "skipped": True,
            "count": 300,
            "positions": [f"data[0].spans[{i}].startTime" for i in range(5)],
        }
    ]


def test_300_bad_spans_are_one_line_on_import(tmp_path: Path) -> None:
    path = _jaeger_file(tmp_path / "bad.json", bad=300, good=10)
    db = tmp_path / "spans.duckdb"
    result = hourglass("import", "--db", str(db), "--format", "json", str(path))
    assert result.returncode == 2
    [line] = _lines(result.stderr, "startTime")
    assert line.startswith(
        f"{path}: 300 skipped: data[].spans[].startTime: missing (at data[0].spans[0].startTime,"
    )
    summary = json.loads(result.stdout)
    assert summary["spans"] == 10 and summary["skipped_spans"] == 300
    assert [(w["count"], w["field"]) for w in summary["input_warnings"]] == [
        (300, "data[].spans[].startTime")
    ]
    verbose = hourglass("import", "--db", str(db), "--verbose", str(path))
    every = _lines(verbose.stderr, "startTime: missing")
    assert len(every) == 301  # each position, then the summary line (without the --verbose hint)
    assert every[0] == f"{path}:data[0].spans[0].startTime: missing"
    assert "--verbose" not in every[-1] and "300 skipped" in every[-1]


@pytest.mark.skipif(not ZIPKIN_FILES, reason="the shared real-traces folder is not here")
def test_real_zipkin_files_warn_only_about_what_is_wrong_with_them(tmp_path: Path) -> None:
    """The five real Zipkin files as they are, and the yelp trace (16 spans) as it arrives from a
    tracer that lost every duration and some timestamps."""
    spans = json.loads((REAL_TRACES / "zipkin-v2__yelp.json").read_text())
    for i, span in enumerate(spans):
        span.pop("duration", None)
        if i % 4 == 1:
            span.pop("timestamp", None)
    damaged = tmp_path / "yelp-damaged.json"
    damaged.write_text(json.dumps(spans))
    result = hourglass("analyze", *map(str, ZIPKIN_FILES), str(damaged), "--format", "json")
    assert result.returncode == 0, result.stderr  # warnings only: everything was kept
    warnings = json.loads(result.stdout)["input_warnings"]
    real = [w for w in warnings if w["source"] != str(damaged)]
    # messaging2: 6 spans whose parentId is in none of the files (the folder's README says "7 orphan
    # spans"; counted in the file, 6 of its 11 spans name a parent it does not hold)
    assert [(Path(w["source"]).name, w["count"], w["skipped"]) for w in real] == [
        ("zipkin-v2__messaging2.json", 6, False)
    ]
    [line] = _lines(result.stderr, "messaging2.json")
    assert "6 warnings: parent span is not in the input" in line and "and 1 more" in line
    by_field: dict[str, int] = {}
    for w in warnings:
        if w["source"] == str(damaged):
            by_field[w["field"]] = by_field.get(w["field"], 0) + w["count"]
    assert by_field["[].duration"] == 16 and by_field["[].timestamp"] == 4
    lines = _lines(result.stderr, "yelp-damaged.json")
    assert len(lines) == len(warnings) - len(real) < 16 + 4  # one line per kind, not one per span


def test_serve_logs_rejected_spans_once_per_kind(tmp_path: Path) -> None:
    serve = start_serve(tmp_path / "spans.duckdb", tmp_path / "serve.log")
    try:
        spans = [
            {
                "traceId": "0af7651916cd43dd8448eb211c80319c" if i < 5 else "not-an-id",
                "spanId": f"{i + 1:016x}",
                "name": "GET /x",
                "startTimeUnixNano": "1764000000000000000",
                "endTimeUnixNano": "1764000000100000000",
            }
            for i in range(45)
        ]
        body = {"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}
        reply = httpx.post(serve.http, json=body, timeout=30)
        assert reply.status_code == 200 and reply.json()["partialSuccess"]["rejectedSpans"] == "40"
        assert serve.stop() == 0  # the summary is logged at the latest at shutdown
    finally:
        _kill(serve.process)
    log = serve.log_text()
    assert "rejected 40 spans in OTLP Exports" in log
    kinds = [line for line in log.splitlines() if "OTLP/HTTP: " in line]
    assert len(kinds) == 2, log  # the decoder's first reasons as one kind, the unlisted rest as another
    assert "resourceSpans[].scopeSpans[].spans[].traceId" in kinds[0] and "(at resourceSpans[0]" in kinds[0]
    assert sum(int(line.split("OTLP/HTTP: ")[1].split()[0]) for line in kinds) == 40


def test_spans_rejected_beyond_the_itemised_ones_are_counted_in_one_kind(tmp_path: Path) -> None:
    """A decoded batch names its first few rejected spans and counts the rest in one problem: that
    problem stands for all of them (they were summarised as one span each, one kind per number)."""
    import struct

    from opentelemetry.proto.trace.v1 import trace_pb2

    message = trace_pb2.TracesData()
    resource = message.resource_spans.add()
    name = resource.resource.attributes.add()
    name.key, name.value.string_value = "service.name", "svc"
    scope = resource.scope_spans.add()
    for i in range(3000):
        span = scope.spans.add()
        span.span_id, span.name = (i + 1).to_bytes(8, "big"), "op"
        span.start_time_unix_nano, span.end_time_unix_nano = 10**18, 10**18 + 1000
        span.trace_id = b"" if i % 3 else (i + 1).to_bytes(16, "big")  # two of three without a trace id
    data = message.SerializeToString()
    path = tmp_path / "bad-ids.binpb"
    path.write_bytes(b"".join(struct.pack(">I", len(data)) + data for _ in range(3)))
    result = hourglass("analyze", str(path), "--format", "json")
    assert result.returncode == 2, result.stderr
    warnings = json.loads(result.stdout)["input_warnings"]
    assert sum(w["count"] for w in warnings if w["skipped"]) == 6000  # every rejected span, once
    assert len(warnings) == 2 and len(_lines(result.stderr, "skipped")) == 2
    [more] = [w for w in warnings if w["kind"] == "more spans skipped for bad ids"]
    assert more["positions"] == ["byte 0", "byte 120037", "byte 240074"]
