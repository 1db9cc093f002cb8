"""``hourglass analyze --db STORE --cluster`` on a real Dask scheduler with two worker processes
(one thread each) on 127.0.0.1, in two set-ups measured in the same run, alternating:

* **files here**: the workers see the CLI's temporary folder (they run on this machine), so the
  CLI splits the store into a file per partition for them, and they keep their rows and repaired
  spans in the run's folders, as local worker processes do;
* **elsewhere** (the baseline, and how every cluster ran before): the workers act as on other
  machines (``bench/dask_elsewhere.py``: they never read the CLI's probe file), so each task of
  each pass reads its partition from the store and returns its rows to the CLI.

Prints for each: the median wall time of the whole command (start-up and store reads included),
the command's own peak RSS (``wait4``), the peak of the two workers' processes together (sampled),
and whether the two set-ups' reports are identical but for ``generated_at``.

    python -m bench.cluster [--spans 5000000] [--rounds 3] [--partitions N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench._dask import ELSEWHERE, dask_cluster
from bench._process import hourglass_command
from bench.scaling import _store, run_process


def _tree_rss(pids: list[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            total += sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    return total


def _analyze(store: Path, address: str, out: Path, workers: list[int], more: list[str]) -> dict[str, Any]:
    """One run of the command, with the workers' summed RSS sampled every 50 ms meanwhile."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], _tree_rss(workers))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        argv = [
            *hourglass_command(),
            "analyze",
            "--db",
            str(store),
            "--cluster",
            address,
            "--format",
            "json",
            *more,
        ]
        run = run_process(argv, stdout_path=str(out))
    finally:
        done.set()
        sampler.join()
    if run["code"] != 0:
        raise RuntimeError(f"hourglass analyze --cluster failed:\n{run['stderr']}")
    return run | {"workers_peak_gib": peak[0] / 1024**3, "line": run["stderr"].strip().splitlines()[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=5_000_000, help="spans in the generated store")
    parser.add_argument("--rounds", type=int, default=3, help="runs per set-up (median quoted)")
    parser.add_argument("--partitions", type=int, help="passed to `hourglass analyze` (default: its plan's)")
    parser.add_argument("--keep", help="keep the generated store in this folder (reused when present)")
    args = parser.parse_args(argv)
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="hourglass-cluster-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"bench.cluster: {os.cpu_count()} cores, {args.spans:,} spans, a scheduler and 2 workers on 127.0.0.1"
    )
    try:
        store = _store(folder, args.spans)
        more = ["--partitions", str(args.partitions)] if args.partitions else []
        runs: dict[str, list[dict[str, Any]]] = {"elsewhere": [], "files here": []}
        reports: dict[str, dict[str, Any]] = {}
        for _ in range(max(1, args.rounds)):
            for label in runs:
                pids: list[int] = []
                preloads = [ELSEWHERE] if label == "elsewhere" else []
                with dask_cluster(folder / "dask", preloads=preloads, pids=pids) as address:
                    out = folder / f"report-{label.replace(' ', '-')}.json"
                    runs[label].append(_analyze(store, address, out, pids, more))
                report = json.loads(out.read_text())
                report.pop("generated_at", None)
                reports[label] = report
        for label, done in runs.items():
            walls = [r["wall_s"] for r in done]
            print(
                f"  {label:>10}: {statistics.median(walls):6.2f} s median (runs {'/'.join(f'{w:.2f}' for w in walls)} s), "
                f"the command's peak RSS {max(r['peak_rss_gib'] for r in done):.2f} GiB, "
                f"the workers' {max(r['workers_peak_gib'] for r in done):.2f} GiB"
            )
            print(f"              {done[0]['line']}")
        base = statistics.median(r["wall_s"] for r in runs["elsewhere"])
        here = statistics.median(r["wall_s"] for r in runs["files here"])
        same = reports["elsewhere"] == reports["files here"]
        print(f"  files here / elsewhere: {here / base:.2f}x the wall time; the same report: {same}")
        return 0 if same else 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
