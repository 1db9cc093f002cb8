"""Trace-file reading speed per format: `make bench-import` (`python -m bench.import_files`).

What it does, in one run:

1. generates the same traces (``--spans``, default 100,000; 20 spans a trace, 6 attributes and one
   event a span) in four files: OTLP JSON Lines (the Collector file exporter's default), the file
   exporter's length-prefixed protobuf stream, Zipkin v2 JSON and Jaeger query-API JSON;
2. for each file times ``hourglass.collector.files.TraceFileReader`` — detection, parsing, conversion to
   OTLP (Jaeger/Zipkin), decoding to span rows, with the GC thresholds ``hourglass import`` uses —
   and, as the **baseline in the same run**, the bare
   parse nothing can avoid: ``json.loads`` of every line or of the document for the JSON formats,
   frame splitting plus ``TracesData.ParseFromString`` (through ``hourglass.collector.decode.parse_traces_data``)
   for the protobuf stream;
3. prints spans/s for both and their ratio (how many times the bare parse the whole read costs).

There is no target in the issue; the figures show where time goes (the decoder's fast OTLP-JSON
path keeps JSON formats within a small multiple of ``json.loads``).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hourglass.collector.decode import parse_traces_data
from hourglass.collector.decode_json import otlp_json_to_message
from hourglass.collector.files import TraceFileReader, gc_tuned_for_bulk_reading
from hourglass.collector.readers.otlp_proto import iter_length_prefixed

SPANS_PER_TRACE = 20
BASE_US = 1_760_000_000_000_000


def _traces(n_spans: int) -> list[list[dict[str, Any]]]:
    """Neutral span records (hex ids, microsecond times) every writer below renders."""
    rnd = random.Random(7)
    traces = []
    for t in range(max(1, n_spans // SPANS_PER_TRACE)):
        trace_id = f"{rnd.getrandbits(128):032x}"
        span_ids = [f"{rnd.getrandbits(64):016x}" for _ in range(SPANS_PER_TRACE)]
        traces.append(
            [
                {
                    "trace_id": trace_id,
                    "span_id": span_ids[i],
                    "parent_id": span_ids[0] if i else None,
                    "service": f"svc-{t % 7}",
                    "name": f"op-{i % 5}",
                    "start_us": BASE_US + t * 1000 + i * 10,
                    "duration_us": 500 + i,
                    "tags": {
                        "http.method": "GET",
                        "db.system": "postgresql",
                        "db.statement": "SELECT * FROM orders WHERE id = ?",
                        "retry.count": 1,
                        "note": "x" * 24,
                        "size": 512,
                    },
                }
                for i in range(SPANS_PER_TRACE)
            ]
        )
    return traces


def _otlp_value(value: Any) -> dict[str, Any]:
    return {"intValue": str(value)} if isinstance(value, int) else {"stringValue": value}


def _otlp_document(trace: list[dict[str, Any]]) -> dict[str, Any]:
    spans = []
    for s in trace:
        span = {
            "traceId": s["trace_id"],
            "spanId": s["span_id"],
            "name": s["name"],
            "kind": 3,
            "startTimeUnixNano": str(s["start_us"] * 1000),
            "endTimeUnixNano": str((s["start_us"] + s["duration_us"]) * 1000),
            "attributes": [{"key": k, "value": _otlp_value(v)} for k, v in s["tags"].items()],
            "events": [{"timeUnixNano": str(s["start_us"] * 1000 + 5), "name": "log"}],
            "status": {},
        }
        if s["parent_id"]:
            span["parentSpanId"] = s["parent_id"]
        spans.append(span)
    service = trace[0]["service"]
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [{"scope": {"name": "bench"}, "spans": spans}],
            }
        ]
    }


def _zipkin_span(s: dict[str, Any]) -> dict[str, Any]:
    span = {
        "traceId": s["trace_id"],
        "id": s["span_id"],
        "kind": "CLIENT",
        "name": s["name"],
        "timestamp": s["start_us"],
        "duration": s["duration_us"],
        "localEndpoint": {"serviceName": s["service"], "ipv4": "10.0.0.7"},
        "remoteEndpoint": {"serviceName": "postgres"},
        "tags": {k: str(v) for k, v in s["tags"].items()},
        "annotations": [{"timestamp": s["start_us"], "value": "log"}],
    }
    if s["parent_id"]:
        span["parentId"] = s["parent_id"]
    return span


def _jaeger_trace(trace: list[dict[str, Any]]) -> dict[str, Any]:
    spans = []
    for s in trace:
        spans.append(
            {
                "traceID": s["trace_id"],
                "spanID": s["span_id"],
                "operationName": s["name"],
                "references": [{"refType": "CHILD_OF", "traceID": s["trace_id"], "spanID": s["parent_id"]}]
                if s["parent_id"]
                else [],
                "startTime": s["start_us"],
                "duration": s["duration_us"],
                "tags": [
                    {"key": "span.kind", "type": "string", "value": "client"},
                    *(
                        {"key": k, "type": "int64" if isinstance(v, int) else "string", "value": v}
                        for k, v in s["tags"].items()
                    ),
                ],
                "logs": [
                    {
                        "timestamp": s["start_us"],
                        "fields": [{"key": "event", "type": "string", "value": "log"}],
                    }
                ],
                "processID": "p1",
            }
        )
    return {
        "traceID": trace[0]["trace_id"],
        "spans": spans,
        "processes": {"p1": {"serviceName": trace[0]["service"], "tags": []}},
    }


def write_files(folder: Path, n_spans: int) -> dict[str, Path]:
    traces = _traces(n_spans)
    documents = [_otlp_document(t) for t in traces]
    paths = {
        "otlp-jsonl": folder / "traces.jsonl",
        "otlp-proto-stream": folder / "traces.binpb",
        "zipkin-json": folder / "zipkin.json",
        "jaeger-json": folder / "jaeger.json",
    }
    paths["otlp-jsonl"].write_text("".join(json.dumps(d) + "\n" for d in documents))
    with paths["otlp-proto-stream"].open("wb") as out:
        for document in documents:
            message = otlp_json_to_message(document).SerializeToString()
            out.write(struct.pack(">I", len(message)) + message)
    paths["zipkin-json"].write_text(json.dumps([_zipkin_span(s) for t in traces for s in t]))
    paths["jaeger-json"].write_text(json.dumps({"data": [_jaeger_trace(t) for t in traces]}))
    return paths


def _baseline(fmt: str, path: Path) -> None:
    if fmt == "otlp-jsonl":
        with path.open("rb") as f:
            for line in f:
                json.loads(line)
    elif fmt == "otlp-proto-stream":
        with path.open("rb") as f:
            for _, message in iter_length_prefixed(f):
                parse_traces_data(message)
    else:
        json.loads(path.read_bytes())


def _read(path: Path) -> int:
    problems: list[object] = []
    reader = TraceFileReader(on_problem=problems.append)
    with gc_tuned_for_bulk_reading():  # as `hourglass import` reads
        spans = sum(t.num_rows for t in reader.read([path]))
    if problems:
        raise SystemExit(f"bench data has problems: {problems[:3]}")
    return spans


def _best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hourglass-bench-import-") as tmp:
        paths = write_files(Path(tmp), args.spans)
        print(
            f"{'format':<18} {'MiB':>7} {'spans':>8} {'read spans/s':>13} {'bare parse spans/s':>19} {'ratio':>6}"
        )
        for fmt, path in paths.items():
            spans = _read(path)
            read_s = _best_of(args.repeats, functools.partial(_read, path))
            parse_s = _best_of(args.repeats, functools.partial(_baseline, fmt, path))
            size = path.stat().st_size / 2**20
            print(
                f"{fmt:<18} {size:7.1f} {spans:8d} {spans / read_s:13,.0f} {spans / parse_s:19,.0f}"
                f" {read_s / parse_s:5.1f}x"
            )


if __name__ == "__main__":
    main()
