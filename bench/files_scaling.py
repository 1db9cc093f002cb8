"""What a user waits for when analysing a large saved trace file: `hourglass analyze FILE`.

`make bench-files` (`python -m bench.files_scaling`). In one run it

1. generates a DuckDB store of mixed-shape traces (``--spans``, default 2M; the generator of
   :mod:`bench.analysis`, so the traces carry the bottlenecks the detectors find) and exports it as
   one OTLP protobuf file — the OpenTelemetry Collector file exporter's length-prefixed
   ``format: proto`` stream, each frame a ``TracesData`` of one service's spans, made from the
   serialized spans the store keeps (``--keep DIR`` keeps store and file between runs);
2. runs the real command as a process, ``hourglass analyze FILE --format json``, which analyses a
   file of more spans than the memory budget holds at once through a temporary span store in
   partitions of whole traces, and as the **baseline in the same run** the same command with a
   memory budget that holds it all at once (``--memory-budget 1TiB``: the whole file in one table
   and one polars context, as every file was analysed before), alternating (``--rounds``, median
   quoted); wall time from outside, peak RSS of all the command's processes (sampled) and of its
   largest one (``wait4``);
3. checks that both reports carry the same recommendations (ids, and savings within 1 %) and prints
   the figures beside the default memory budget (1.5 GiB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import tempfile
from pathlib import Path
from typing import Any

from bench._process import hourglass_command
from bench.ingest import _kv
from bench.scaling import run_process

BUDGET_GIB = 1.5
FRAME_SPANS = 5_000  # spans per TracesData frame of the exported file


def export_store(db: Path, out: Path) -> int:
    """The store's spans as a length-prefixed OTLP protobuf stream: a ``TracesData`` frame per
    ``FRAME_SPANS`` spans, one resource per service and host, each span made from its columns (ids,
    name, kind, times, status, the semantic attributes under their current keys, the hint
    attributes). Returns the spans written."""
    import duckdb
    from opentelemetry.proto.trace.v1 import trace_pb2

    from hourglass.collector.schema import SEMANTIC_ATTRIBUTE_COLUMNS

    semantic = list(SEMANTIC_ATTRIBUTE_COLUMNS)
    columns = ["trace_id", "span_id", "parent_span_id", "service", "host", "scope_name", "name", "kind"]
    columns += ["start_ns", "end_ns", "status_code", "status_message", "hints", *semantic]
    written = 0
    with duckdb.connect(str(db), read_only=True) as con, out.open("wb") as file:
        cursor = con.execute(f"SELECT {', '.join(columns)} FROM spans ORDER BY trace_id, start_ns")
        while batch := cursor.fetchmany(FRAME_SPANS):
            message = trace_pb2.TracesData()
            scopes: dict[tuple[str, str | None, str], Any] = {}
            for row in batch:
                r = dict(zip(columns, row, strict=True))
                key = (r["service"], r["host"], r["scope_name"] or "")
                scope = scopes.get(key)
                if scope is None:
                    resource = message.resource_spans.add()
                    resource.resource.attributes.append(_kv("service.name", r["service"]))
                    if r["host"]:
                        resource.resource.attributes.append(_kv("host.name", r["host"]))
                    scope = scopes[key] = resource.scope_spans.add()
                    scope.scope.name = key[2]
                span = scope.spans.add()
                span.trace_id = bytes.fromhex(r["trace_id"])
                span.span_id = bytes.fromhex(r["span_id"])
                if r["parent_span_id"]:
                    span.parent_span_id = bytes.fromhex(r["parent_span_id"])
                span.name, span.kind = r["name"], int(r["kind"])
                span.start_time_unix_nano, span.end_time_unix_nano = int(r["start_ns"]), int(r["end_ns"])
                span.status.code = int(r["status_code"])
                if r["status_message"]:
                    span.status.message = r["status_message"]
                for column in semantic:
                    if r[column] is not None:
                        span.attributes.append(_kv(SEMANTIC_ATTRIBUTE_COLUMNS[column][0], r[column]))
                for name, value in json.loads(r["hints"] or "{}").items():
                    span.attributes.append(
                        _kv(name, value if isinstance(value, bool | int | float) else str(value))
                    )
            data = message.SerializeToString()
            file.write(struct.pack(">I", len(data)) + data)
            written += len(batch)
    return written


def _recommendations(path: Path) -> dict[str, float]:
    report = json.loads(path.read_text())
    return {
        r["id"]: float((r.get("impact") or {}).get("saved_ms_total") or 0.0)
        for r in report["recommendations"]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=2_000_000, help="spans in the file (default 2M)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each command (median quoted)")
    parser.add_argument(
        "--keep", help="keep the generated store and file in this folder (reused when present)"
    )
    args = parser.parse_args(argv)

    from bench.analysis import build_store

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hourglass-bench-files-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        db = folder / f"spans-{args.spans}.duckdb"
        trace_file = folder / f"spans-{args.spans}.binpb"
        if not trace_file.exists():
            if not db.exists():
                spans, seconds = build_store(db, args.spans)
                print(f"generated {spans:,} spans in {seconds:.1f} s")
            spans = export_store(db, trace_file)
            print(f"exported {spans:,} spans to {trace_file} ({trace_file.stat().st_size / 2**20:,.0f} MiB)")
        runs: dict[str, list[dict[str, Any]]] = {"bounded": [], "at once": []}
        outs = {"bounded": folder / "bounded.json", "at once": folder / "at-once.json"}
        extra = {"bounded": [], "at once": ["--memory-budget", "1TiB"]}
        for _ in range(args.rounds):
            for label in runs:
                argv_ = [*hourglass_command(), "analyze", str(trace_file), "--format", "json"]
                argv_ += ["--output", str(outs[label]), *extra[label]]
                result = run_process(argv_)
                if result["code"] != 0:
                    print(f"{label}: exit {result['code']}\n{result['stderr']}")
                    return 1
                runs[label].append(result)
        for label, results in runs.items():
            wall = statistics.median(r["wall_s"] for r in results)
            tree = max(r["tree_peak_gib"] for r in results)
            largest = max(r["peak_rss_gib"] for r in results)
            each = ", ".join(f"{r['wall_s']:.1f}" for r in results)
            print(
                f"hourglass analyze FILE ({args.spans:,} spans), {label:8s}: {wall:6.1f} s "
                f"(runs {each}), peak {tree:.2f} GiB all processes, "
                f"{largest:.2f} GiB largest process"
            )
        bounded, whole = _recommendations(outs["bounded"]), _recommendations(outs["at once"])
        same = bounded.keys() == whole.keys() and all(
            abs(bounded[k] - whole[k]) <= 0.01 * max(abs(whole[k]), 1e-9) for k in whole
        )
        peak = max(r["tree_peak_gib"] for r in runs["bounded"])
        print(
            f"same recommendations ({len(whole)}, savings within 1 %): {'yes' if same else 'NO'}; "
            f"bounded peak {peak:.2f} GiB against the {BUDGET_GIB} GiB default budget: "
            f"{'within' if peak <= BUDGET_GIB else 'OVER'}"
        )
        return 0 if same else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
