"""Regenerate ``sample-traces/``: run each scenario's services and load, collect the spans with the
SDK's in-memory exporter, and write them with the SDK's own OTLP encoder as OTLP JSON Lines (one
``ExportTraceServiceRequest`` per line, as the OpenTelemetry Collector's file exporter writes), next
to ``<scenario>.labels.json``.

    python -m hourglass.workload.generate --out sample-traces [--scenario NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from hourglass.workload.cluster import WorkloadCluster
from hourglass.workload.scenarios import SCENARIOS, SCENARIOS_BY_NAME, Scenario, drive

SPANS_PER_LINE = 200  # one Export request per line, about the size an SDK batch processor sends
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


def _hex_ids(message: dict[str, Any]) -> None:
    """OTLP/JSON writes trace and span ids as hex, where protobuf's JSON mapping writes base64."""
    for key in _ID_FIELDS:
        if message.get(key):
            message[key] = base64.b64decode(message[key]).hex()


def otlp_json_lines(spans: Sequence[ReadableSpan], spans_per_line: int = SPANS_PER_LINE) -> Iterable[str]:
    """Encode spans as OTLP/JSON ``ExportTraceServiceRequest`` lines (hex ids, integer enums)."""
    for start in range(0, len(spans), spans_per_line):
        request = encode_spans(spans[start : start + spans_per_line])
        document = json_format.MessageToDict(request, use_integers_for_enums=True)
        for resource_spans in document.get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    _hex_ids(span)
                    for link in span.get("links", []):
                        _hex_ids(link)
        yield json.dumps(document, separators=(",", ":"))


def record_scenario(scenario: Scenario, seed: int = 7) -> list[ReadableSpan]:
    """Run the services and the scenario's load; return every finished span, in end order."""
    exporter = InMemorySpanExporter()
    with WorkloadCluster(lambda: SimpleSpanProcessor(exporter), seed=seed) as cluster:
        asyncio.run(drive(scenario, cluster.urls, seed))
    return list(exporter.get_finished_spans())


def write_scenario(scenario: Scenario, out: Path, seed: int = 7) -> tuple[Path, int]:
    spans = record_scenario(scenario, seed)
    spans.sort(key=lambda s: s.start_time or 0)
    trace_path = out / f"{scenario.name}.otlp.jsonl"
    with trace_path.open("w") as f:
        for line in otlp_json_lines(spans):
            f.write(line + "\n")
    labels_path = out / f"{scenario.name}.labels.json"
    labels = {"trace_file": trace_path.name, **scenario.labels()}
    labels_path.write_text(json.dumps(labels, indent=2) + "\n")
    return trace_path, len(spans)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("sample-traces"), help="output folder")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS_BY_NAME), help="only these (repeatable)"
    )
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = [SCENARIOS_BY_NAME[n] for n in args.scenario] if args.scenario else list(SCENARIOS)
    for scenario in chosen:
        started = time.perf_counter()
        path, count = write_scenario(scenario, args.out, args.seed)
        size_kb = path.stat().st_size / 1024
        print(
            f"{path}: {count} spans, {size_kb:.0f} KiB in {time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
