"""What a user waits for: the whole `hourglass analyze --db` process at 1M, 5M and 10M spans.

`make bench-scaling` (`python -m bench.scaling`). In one run it

1. generates DuckDB stores of mixed-shape traces (``--sizes``, default 1M, 5M and 10M spans; the
   generator of :mod:`bench.analysis`, a million spans at a time; ``--keep DIR`` keeps them
   between runs, since building 10M spans takes a minute or two);
2. times the **reference pass** on the 1M store in a process of its own — one polars join of every
   span to its parent plus the sibling-order flag (:func:`bench.analysis.reference_pass`), best of
   3 on the frame in memory; the store load and the process start-up are printed beside it;
3. runs the real command, ``hourglass analyze --db STORE --format json``, as a process for each
   size (``--rounds`` times, alternating with the reference process, median quoted), measuring
   its wall time from outside and its peak RSS from the kernel's accounting of the finished child
   (``wait4``'s ``ru_maxrss``) — start-up, imports, the store read, the analysis and the JSON
   written to a file all included;
4. prints each figure beside the targets of issue 11: 1M spans end to end ≤ 8 × the reference
   pass and ≤ 1.5 GiB peak; 5M and 10M spans ≤ 2 GiB peak, time growing linearly.

``--large-traces 0.4`` puts that share of each store's spans in traces of 2k to 100k spans (an
N+1 over a whole table, a fan-out to thousands of calls, a batch import:
:func:`bench.analysis.generate_large_traces`), beside the small ones, as real stores hold them:
partitions of whole traces by their ids' hash are then far from even, which the plan must see.

``--workers 1,2`` runs the command with each worker count (a store larger than the memory budget
is analysed in partitions on that many processes; one that fits, at once); ``--memory-budget``
is passed through. Peak memory is printed for the command's own process and for all its
processes together (sampled); the targets are checked on the latter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._process import hourglass_command

TARGET_RATIO_1M = 8.0
TARGET_RSS_1M_GIB = 1.5
TARGET_RSS_LARGE_GIB = 2.0
REFERENCE_ROUNDS = 3
ROOT = Path(__file__).resolve().parents[1]


def run_process(argv: list[str], *, stdout_path: str | None = None) -> dict[str, Any]:
    """Runs ``argv`` to completion: wall seconds, the peak RSS (GiB) of that process from the
    kernel's accounting of the finished child (``wait4``), and the peak of the whole process tree
    (it and its worker processes, summed), sampled every 50 ms with psutil; exit code."""
    import psutil

    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL  # noqa: SIM115
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, cwd=ROOT)
    reaped: dict[str, Any] = {}

    def reap() -> None:
        _, status, usage = os.wait4(proc.pid, 0)
        reaped.update(status=status, usage=usage, wall=time.perf_counter() - started)

    errors: list[bytes] = []
    waiter = threading.Thread(target=reap, daemon=True)
    drain = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    waiter.start()
    drain.start()
    tree_peak = 0
    root = psutil.Process(proc.pid)
    while waiter.is_alive():
        with contextlib.suppress(psutil.Error):
            tree_peak = max(
                tree_peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
            )
        waiter.join(0.05)
    drain.join(5)
    if stdout_path:
        out.close()  # type: ignore[union-attr]
    return {
        "wall_s": reaped["wall"],
        "peak_rss_gib": reaped["usage"].ru_maxrss / 1024**2,
        "tree_peak_gib": tree_peak / 1024**3,
        "code": os.waitstatus_to_exitcode(reaped["status"]),
        "stderr": b"".join(errors).decode(errors="replace")[-2000:],
    }


def reference_child(db_path: str) -> dict[str, Any]:
    """In a child process: load the store into polars, then the reference pass, best of 3."""
    import polars as pl

    from bench.analysis import reference_pass
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    started = time.perf_counter()
    store = DuckDBSpanStore(db_path)
    table = store.scan(columns=ANALYSIS_COLUMNS)
    store.close()
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    del table
    load_s = time.perf_counter() - started
    runs = []
    for _ in range(REFERENCE_ROUNDS):
        t = time.perf_counter()
        reference_pass(frame)
        runs.append(time.perf_counter() - t)
    return {"spans": frame.height, "load_s": load_s, "reference_s": min(runs), "runs": runs}


BUDGET: str | None = None  # --memory-budget passed to every run (None: the CLI's default)
LARGE_SHARE = 0.0  # --large-traces: the share of each store's spans in traces of 2k-100k spans


def _analyze_argv(db: Path, out: Path, workers: int | None) -> list[str]:
    argv = [*hourglass_command(), "analyze", "--db", str(db), "--format", "json", "--output", str(out)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if BUDGET is not None:
        argv += ["--memory-budget", BUDGET]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,5000000,10000000", help="comma-separated span counts")
    parser.add_argument("--rounds", type=int, default=3, help="runs of the command per size (median quoted)")
    parser.add_argument("--workers", default="1,2", help="worker counts, when `analyze` has --workers")
    parser.add_argument("--keep", help="keep the generated stores in this folder (reused when present)")
    parser.add_argument("--memory-budget", help="passed to every `hourglass analyze` (default: the CLI's)")
    parser.add_argument(
        "--large-traces",
        type=float,
        default=0.0,
        help="share of each store's spans in traces of 2k-100k spans (bench.analysis.generate_large_traces)",
    )
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference:
        print(json.dumps(reference_child(args.reference)))
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    global BUDGET, LARGE_SHARE
    BUDGET = args.memory_budget
    LARGE_SHARE = max(0.0, min(args.large_traces, 0.9))
    workers: list[int | None] = [int(w) for w in args.workers.split(",")]
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hourglass-scaling-"))
    folder.mkdir(parents=True, exist_ok=True)
    large = f", {LARGE_SHARE:.0%} of the spans in traces of 2k-100k spans" if LARGE_SHARE else ""
    print(f"bench.scaling: {os.cpu_count()} cores, sizes {sizes}{large}, stores in {folder}")
    try:
        return _run(folder, sizes, workers, max(1, args.rounds))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def _store(folder: Path, size: int) -> Path:
    from bench.analysis import build_store

    large = f"-large{round(LARGE_SHARE * 100)}" if LARGE_SHARE else ""
    path = folder / f"spans-{size}{large}.duckdb"
    if not path.exists():
        # built in a process of its own: the kernel's peak of each command measured after this is
        # that of a child forked from this process, which counts this process's pages at the fork
        # (a 5M store built here left it at ~1.5 GiB, and every command's peak read that)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            stored, build_s = pool.apply(build_store, (path, size, None, LARGE_SHARE))
        print(f"  generated and stored {stored:,} spans in {build_s:.1f} s")
    return path


def _run(folder: Path, sizes: list[int], workers: list[int | None], rounds: int) -> int:
    stores = {size: _store(folder, size) for size in sizes}
    ref_store = stores[min(sizes, key=lambda s: abs(s - 1_000_000))]
    out = folder / "report.json"
    reference: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for size in sizes:
        for w in workers:
            runs = []
            for round_no in range(rounds if size <= 1_000_000 else 1):
                if stores[size] == ref_store and (round_no < rounds):
                    ref = run_process(
                        [sys.executable, "-m", "bench.scaling", "--reference", str(ref_store)],
                        stdout_path=str(folder / "reference.json"),
                    )
                    if ref["code"] != 0:
                        print(ref["stderr"], file=sys.stderr)
                        return 1
                    reference.append(
                        ref | json.loads((folder / "reference.json").read_text().strip().splitlines()[-1])
                    )
                run = run_process(_analyze_argv(stores[size], out, w))
                if run["code"] != 0:
                    print(f"hourglass analyze failed on {size:,} spans:\n{run['stderr']}", file=sys.stderr)
                    return 1
                runs.append(run)
            report = json.loads(out.read_text())
            row = {
                "size": size,
                "workers": w,
                "spans": report["spans_analyzed"],
                "recommendations": len(report["recommendations"]),
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "walls": [r["wall_s"] for r in runs],
                "peak_rss_gib": max(r["peak_rss_gib"] for r in runs),
                # the sampled sum can miss a short spike that wait4 saw in the command's own process
                "tree_peak_gib": max(max(r["tree_peak_gib"], r["peak_rss_gib"]) for r in runs),
            }
            rows.append(row)
            label = "1 process" if w is None else f"{w} worker(s)"
            print(
                f"{row['spans']:>11,} spans, {label}: hourglass analyze --db {row['wall_s']:6.2f} s "
                f"(runs {'/'.join(f'{x:.2f}' for x in row['walls'])} s), peak RSS {row['peak_rss_gib']:.2f} GiB "
                f"(all processes {row['tree_peak_gib']:.2f} GiB), "
                f"{row['recommendations']} recommendations"
            )
    ref_s = min(r["reference_s"] for r in reference)
    ref = reference[0]
    print(
        f"\nreference pass on {ref['spans']:,} spans: {ref_s:.3f} s (best of {REFERENCE_ROUNDS} x {len(reference)} "
        f"processes; that process also loaded the store in {min(r['load_s'] for r in reference):.2f} s, "
        f"{statistics.median(r['wall_s'] for r in reference):.2f} s and "
        f"{max(r['peak_rss_gib'] for r in reference):.2f} GiB as a whole process)"
    )
    verdicts = []
    for row in rows:
        size_label = f"{row['spans']:,} spans" + (
            "" if row["workers"] is None else f", {row['workers']} worker(s)"
        )
        if stores[row["size"]] == ref_store:
            ratio = row["wall_s"] / ref_s
            ok = ratio <= TARGET_RATIO_1M and row["tree_peak_gib"] <= TARGET_RSS_1M_GIB
            verdicts.append(
                f"{size_label}: {ratio:.1f}x the reference pass end to end (target <= {TARGET_RATIO_1M:.0f}x), "
                f"peak {row['tree_peak_gib']:.2f} GiB all processes (target <= {TARGET_RSS_1M_GIB} GiB): "
                f"{'MET' if ok else 'NOT MET'}"
            )
        else:
            ok = row["tree_peak_gib"] <= TARGET_RSS_LARGE_GIB
            verdicts.append(
                f"{size_label}: peak {row['tree_peak_gib']:.2f} GiB all processes (target <= "
                f"{TARGET_RSS_LARGE_GIB:.0f} GiB): {'MET' if ok else 'NOT MET'}"
            )
    print("\n".join(verdicts))
    per_span = [f"{r['wall_s'] / r['spans'] * 1e6:.2f}" for r in rows]
    print("µs per span by size (flat = linear): " + ", ".join(per_span))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
