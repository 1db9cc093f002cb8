"""serve's whole-store analysis (a ClickHouse store, or ``HOURGLASS_INCREMENTAL_ANALYSIS=false``):
memory and time of the first analysis of a real ``hourglass serve`` over a stored store.

    python -m bench.serve_whole_store [--spans 1000000] [--store chdb|duckdb] [--db PATH] [--rounds 1]

Builds (or takes, ``--db``) a store of ``--spans`` generated spans of the analysis benchmark's
mixed shapes (``bench.analysis.generate_spans``), then starts ``hourglass serve`` on it as a
process twice per round, alternating:

* **at once** (``HOURGLASS_SERVE_PARTITIONS=1``): the store scanned whole in the server and
  analysed whole in its worker — what every run did before (the baseline);
* **partitioned** (the default): more spans than one context holds within
  ``HOURGLASS_MEMORY_BUDGET`` (1.5 GiB) are analysed in partitions of whole traces, each read
  from the server when the worker asks for it.

For each it prints the first analysis' seconds (``last_duration_ms`` of ``GET /v1/stats``: the
scan, the shipping and the analysis), the wall time from the start of the process to its report,
and the peak RSS (sampled every 0.2 s) of the server, of its worker, and of both summed; then
whether both reports give the same recommendations (ids, savings within 1 %).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._process import start_serve
from bench.soak_serve import RssSampler, _get, _stop_serve

GIB = 2**30
WRITE_CHUNK = 200_000


def build(path: str, spans: int) -> int:
    """A store at ``path`` (``chdb:DIR`` or a DuckDB file) of ``spans`` generated spans."""
    from bench.analysis import generate_spans
    from hourglass.collector.backends import open_store

    store = open_store(path)
    try:
        written = 0
        table = generate_spans(spans)
        for offset in range(0, table.num_rows, WRITE_CHUNK):
            store.write(table.slice(offset, WRITE_CHUNK))
            written += min(WRITE_CHUNK, table.num_rows - offset)
        return written
    finally:
        store.close()


def one_run(db: str, label: str, env: dict[str, str], folder: Path) -> dict[str, Any]:
    """serve on ``db`` until its first analysis ends: its figures and report."""
    started = time.perf_counter()
    # retention off: the generated spans are older than its default 7 days
    env = {"HOURGLASS_INCREMENTAL_ANALYSIS": "false", "HOURGLASS_RETENTION": "0", **env}
    proc, urls = start_serve(Path(db), folder / f"serve-{label}.log", env=env, timeout=180)
    sampler = RssSampler(proc.pid, every=0.2)
    high = (0, 0, 0)
    try:
        deadline = time.monotonic() + 1800
        while True:
            analysis = _get(f"{urls['api']}/v1/stats")["analysis"]
            high = max(high, sampler.take())
            if analysis.get("runs", 0) >= 1 or analysis.get("failures", 0):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"no analysis from serve ({label}): {analysis}")
            time.sleep(0.2)
        wall = time.perf_counter() - started
        if analysis.get("failures"):
            raise RuntimeError(f"serve's analysis failed ({label}): {analysis.get('last_error')}")
        report = _get(f"{urls['api']}/v1/recommendations")
    finally:
        high = max(high, sampler.take())
        sampler.stop()
        _stop_serve(proc)
    return {
        "label": label,
        "analysis_s": (analysis.get("last_duration_ms") or 0) / 1000,
        "wall_s": wall,
        "peak_gib": high[0] / GIB,
        "server_gib": high[1] / GIB,
        "worker_gib": high[2] / GIB,
        "partitions": analysis.get("partitions"),
        "spans": report.get("spans_analyzed"),
        "savings": {r["id"]: r["impact"].get("saved_ms_p50") for r in report.get("recommendations", [])},
    }


def same_report(a: dict[str, float | None], b: dict[str, float | None]) -> bool:
    if list(a) != list(b):
        return False
    for rid, value in a.items():
        other = b[rid]
        if value is None or other is None:
            if value != other:
                return False
        elif abs(value - other) > 0.01 * max(abs(value), abs(other), 1e-9):
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--store", choices=("chdb", "duckdb"), default="chdb")
    parser.add_argument("--db", help="a store to use as it is (chdb:DIR or a DuckDB file)")
    parser.add_argument("--keep", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-baseline", action="store_true", help="only the partitioned run (the store at once may not fit)"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--partitions", type=int, default=0, help="HOURGLASS_SERVE_PARTITIONS of the partitioned runs"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hg-serve-whole-", dir=args.keep) as tmp:
        folder = Path(tmp)
        db = args.db
        if db is None:
            db = f"chdb:{folder / 'spans.chdb'}" if args.store == "chdb" else str(folder / "spans.duckdb")
            began = time.perf_counter()
            written = build(db, args.spans)
            print(f"built {db}: {written:,} spans in {time.perf_counter() - began:.0f} s", flush=True)
        chosen = {"HOURGLASS_SERVE_PARTITIONS": str(args.partitions)} if args.partitions else {}
        configs = [("at-once", {"HOURGLASS_SERVE_PARTITIONS": "1"}), ("partitioned", chosen)]
        if args.no_baseline:
            configs = configs[1:]
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in configs}
        for _ in range(args.rounds):
            for label, env in configs:
                run = one_run(db, label, env, folder)
                runs[label].append(run)
                print(
                    f"{label:12s} partitions {run['partitions']}: analysis {run['analysis_s']:6.1f} s, "
                    f"start to report {run['wall_s']:6.1f} s, peak {run['peak_gib']:.2f} GiB "
                    f"(server {run['server_gib']:.2f}, worker {run['worker_gib']:.2f}), "
                    f"{run['spans']:,} spans",
                    flush=True,
                )
    if args.no_baseline:
        return 0
    before, after = runs["at-once"], runs["partitioned"]
    print(
        f"\nserve's whole-store analysis of {before[0]['spans']:,} spans ({args.store}), median of {args.rounds}:"
    )
    for name, key, unit in (
        ("start to report", "wall_s", "s"),
        ("analysis", "analysis_s", "s"),
        ("peak, all", "peak_gib", "GiB"),
        ("peak, server", "server_gib", "GiB"),
        ("peak, worker", "worker_gib", "GiB"),
    ):
        b = statistics.median(r[key] for r in before)
        a = statistics.median(r[key] for r in after)
        print(f"  {name:16s} at once {b:7.2f} {unit:3s}  partitioned {a:7.2f} {unit:3s}  ({a / b:.2f}x)")
    agree = all(
        same_report(before[0]["savings"], r["savings"]) and r["spans"] == before[0]["spans"]
        for r in before + after
    )
    print(
        f"  same spans analysed and recommendations (ids, p50 savings within 1 %): {'yes' if agree else 'NO'}"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
