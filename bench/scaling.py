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
processes together (sampled); the targets are checked on the latter. The CPU time of all of
them is printed too, as the cores they kept busy (sampled as well: the command ends before its
worker processes, so the kernel's accounting of the finished child leaves theirs out).

``--phases`` runs each command once more with ``HOURGLASS_MEMORY_LOG=1`` (not counted in the
medians) and prints where that run's wall time went, from the notes its processes write
(:mod:`hourglass.analysis.memlog`): start-up until a worker holds its first partition, the
extraction, the decision, the pricing, then the report, the texts and the exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
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


def run_process(
    argv: list[str], *, stdout_path: str | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs ``argv`` to completion: wall seconds, the peak RSS (GiB) of that process from the
    kernel's accounting of the finished child (``wait4``), and the peak of the whole process tree
    (it and its worker processes, summed), sampled every 50 ms with psutil; the CPU seconds of the
    tree, each process' own as last sampled (the last few ms of each are missed; ``wait4``'s
    count of the command includes the workers it waited for, but not those it left running);
    exit code. ``env``: variables set for that run."""
    import psutil

    out = open(stdout_path, "wb") if stdout_path else subprocess.DEVNULL  # noqa: SIM115
    started_at = time.time()
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, **env} if env else None
    )
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
    cpu: dict[int, float] = {}  # each process of the tree: its CPU seconds, as last sampled
    root = psutil.Process(proc.pid)
    while waiter.is_alive():
        with contextlib.suppress(psutil.Error):
            children = root.children(recursive=True)
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in [root, *children]))
            for process in [root, *children]:
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()  # (its own: not that of children it waited for)
                    cpu[process.pid] = times.user + times.system
        waiter.join(0.05)
    drain.join(5)
    if stdout_path:
        out.close()  # type: ignore[union-attr]
    return {
        "wall_s": reaped["wall"],
        "peak_rss_gib": reaped["usage"].ru_maxrss / 1024**2,
        "tree_peak_gib": tree_peak / 1024**3,
        "cpu_s": sum(cpu.values()),
        "code": os.waitstatus_to_exitcode(reaped["status"]),
        "stderr": b"".join(errors).decode(errors="replace"),
        "started_at": started_at,
        "pid": proc.pid,
    }


_NOTE = re.compile(
    r"hourglass memory: pid (\d+) (.*?): rss \d+ MiB, phase peak \d+ MiB at (\d\d):(\d\d):(\d\d\.\d+) UTC"
)
_FIRST_READ = re.compile(r"extract \d+/\d+ read$")


def phases(stderr: str, started_at: float, wall_s: float, pid: int) -> list[tuple[str, float]] | None:
    """Where the wall time of a partitioned ``analyze`` run went, from its processes' memory notes
    (``HOURGLASS_MEMORY_LOG=1``; ``pid``: the command's, which decides; ``started_at``: when it
    was started, by this clock): (phase, seconds) in order, ending at ``wall_s``. None when the
    run was not partitioned (no worker read a partition) or a phase's note is missing."""
    day = started_at - started_at % 86_400
    notes: list[tuple[int, str, float]] = []
    for m in _NOTE.finditer(stderr):
        at = day + int(m[3]) * 3600 + int(m[4]) * 60 + float(m[5])
        if at < started_at - 3600:  # (past midnight UTC)
            at += 86_400
        notes.append((int(m[1]), m[2], at - started_at))
    first_read = [t for p, what, t in notes if p != pid and _FIRST_READ.search(what)]
    extracted = [t for p, what, t in notes if p == pid and what == "extraction results received"]
    decided = [t for _, what, t in notes if what.startswith("decided ")]
    priced = [t for p, what, t in notes if p == pid and what == "pricing results combined"]
    if not (first_read and extracted and decided and priced):
        return None
    ends = [
        ("start-up until a worker holds its first partition", min(first_read)),
        ("extraction", extracted[0]),
        ("decision", max(decided)),
        ("pricing", priced[0]),
        ("report, texts and exit", wall_s),
    ]
    out, before = [], 0.0
    for name, end in ends:
        out.append((name, max(0.0, end - before)))
        before = max(before, end)
    return out


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
    parser.add_argument(
        "--phases",
        action="store_true",
        help="run each command once more with HOURGLASS_MEMORY_LOG=1 and print where its time went",
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
        return _run(folder, sizes, workers, max(1, args.rounds), args.phases)
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


def _run(
    folder: Path, sizes: list[int], workers: list[int | None], rounds: int, with_phases: bool = False
) -> int:
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
                        print(ref["stderr"][-2000:], file=sys.stderr)
                        return 1
                    reference.append(
                        ref | json.loads((folder / "reference.json").read_text().strip().splitlines()[-1])
                    )
                run = run_process(_analyze_argv(stores[size], out, w))
                if run["code"] != 0:
                    print(
                        f"hourglass analyze failed on {size:,} spans:\n{run['stderr'][-2000:]}",
                        file=sys.stderr,
                    )
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
                "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            }
            rows.append(row)
            label = "1 process" if w is None else f"{w} worker(s)"
            print(
                f"{row['spans']:>11,} spans, {label}: hourglass analyze --db {row['wall_s']:6.2f} s "
                f"(runs {'/'.join(f'{x:.2f}' for x in row['walls'])} s), peak RSS {row['peak_rss_gib']:.2f} GiB "
                f"(all processes {row['tree_peak_gib']:.2f} GiB), "
                f"{row['recommendations']} recommendations; CPU {row['cpu_s']:.1f} s of all processes, "
                f"{row['cpu_s'] / row['wall_s']:.2f} of {os.cpu_count()} cores busy"
            )
            if with_phases:
                _print_phases(_analyze_argv(stores[size], out, w))
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


def _print_phases(argv: list[str]) -> None:
    """One more run of ``argv`` with its memory notes, and where its wall time went."""
    run = run_process(argv, env={"HOURGLASS_MEMORY_LOG": "1"})
    if run["code"] != 0:
        print(f"    where the time went: that run failed (exit {run['code']}):\n{run['stderr'][-2000:]}")
        return
    split = phases(run["stderr"], run["started_at"], run["wall_s"], run["pid"])
    if split is None:
        print(f"    where the time went: not a partitioned run ({run['wall_s']:.2f} s)")
        return
    print(
        f"    where the time went (one more run with HOURGLASS_MEMORY_LOG=1, {run['wall_s']:.2f} s): "
        + ", ".join(f"{name} {s:.2f} s ({s / run['wall_s']:.0%})" for name, s in split)
    )


if __name__ == "__main__":
    raise SystemExit(main())
