"""Restart benchmark: a real `hourglass serve` stopped and started again on a large store, as a
staging target is on every deploy or host reboot.

    python -m bench.restart_serve [--stored 5M] [--rounds 2] [--keep DIR]

Seeds a store with ``--stored`` spans of the soak's shapes (``bench.soak_serve.seed_store``),
runs serve on it until every settled trace is extracted (the backlog a first start has), stops
it, then restarts it ``--rounds`` times after each of two kinds of stop, alternating:

* ``clean``: serve stopped with SIGTERM, as a deploy or Ctrl-C stops it; the store's close keeps
  what the next start would otherwise read every row for (``DuckDBSpanStore._seal``);
* ``crash``: serve killed (SIGKILL, the baseline): nothing kept, the counts, the traces' ingest
  ranges and the incremental tally are rebuilt from every row, as every restart did before.

Each restart is the whole process (start-up, imports, the store's open included): the seconds
until serve says it is listening, until the first ``GET /v1/recommendations`` is answered with a
report (the one the last process kept, ``hourglass.api.kept_report``), until its first analysis
round ends (the report then is of this run; before the kept report, the first read waited for
it: the baseline of the report's figure), and where that round went (``/v1/stats``: its stages
and the reads the worker asked of the server). No spans are sent meanwhile, so the round holds the
restart's own cost only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench._process import start_serve, stop
from bench.soak_serve import _spans, seed_store


def _analysis(api: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{api}/v1/stats", timeout=60) as response:
        stats: dict[str, Any] = json.load(response)
    return stats.get("analysis") or {}


def _first_round(api: str, started: float, timeout: float) -> tuple[float, dict[str, Any]]:
    """(seconds from ``started`` until the first round of this run ended, its figures)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        analysis = _analysis(api)
        if (analysis.get("runs") or 0) >= 1 and analysis.get("last_stages_ms", {}).get("html") is not None:
            return time.monotonic() - started, analysis
        time.sleep(0.2)
    raise RuntimeError(f"no analysis round ended within {timeout:.0f} s")


def _first_report(api: str, started: float, timeout: float) -> tuple[float, int]:
    """(seconds from ``started`` until ``GET /v1/recommendations`` answered with a report, that
    report's generation); a read before any report waits for the first one, then says 503: read
    again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{api}/v1/recommendations", timeout=timeout) as response:
                response.read()
                return time.monotonic() - started, int(response.headers["X-Hourglass-Generation"])
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
        time.sleep(0.1)
    raise RuntimeError(f"no report served within {timeout:.0f} s")


def restart(db: Path, log: Path, *, then_kill: bool, timeout: float) -> dict[str, Any]:
    """serve started on ``db`` and timed up to the end of its first round; then stopped cleanly,
    or killed (``then_kill``: the next start is a restart after a crash)."""
    started = time.monotonic()
    proc, addresses = start_serve(db, log, timeout=timeout)
    listening = time.monotonic() - started
    try:
        report, generation = _first_report(addresses["api"], started, timeout)
        first, analysis = _first_round(addresses["api"], started, timeout)
    except BaseException:
        stop(proc, 120)
        raise
    if then_kill:
        _crash(proc.pid)
        proc.wait(30)
    else:
        stop(proc, 120)
    stages = {k: v / 1000 for k, v in (analysis.get("last_stages_ms") or {}).items()}
    reads = analysis.get("last_reads_ms") or {}
    return {
        "listening_s": listening,
        "report_s": report,
        # the first report's generation, and the first round's (a kept report's is the last
        # process's, which the rounds of this one go on from)
        "report_generation": generation,
        "round_generation": analysis.get("generation"),
        "first_round_s": first,
        "stages_s": stages,
        "reads": {
            k: (reads.get(f"{k}_count", 0), reads[k] / 1000) for k in reads if not k.endswith("_count")
        },
    }


def _crash(pid: int) -> None:
    """serve killed as a crash kills it (SIGKILL, nothing of its shutdown runs), then its analysis
    worker given the time to notice and exit (it watches its parent), as it does after a crash."""
    import psutil  # (as bench.soak_serve, which reads serve's process tree)

    def running(child: psutil.Process) -> bool:  # (an exited child not reaped yet, a zombie, is not)
        try:
            return child.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    children = psutil.Process(pid).children()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while any(running(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)


def catch_up(db: Path, log: Path, timeout: float) -> None:
    """serve run on ``db`` until no settled trace waits to be extracted, then stopped cleanly."""
    proc, addresses = start_serve(db, log, timeout=timeout)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            analysis = _analysis(addresses["api"])
            figures = analysis.get("incremental_round") or {}
            if (analysis.get("runs") or 0) >= 1 and figures.get("deferred_traces", 1) == 0:
                return
            time.sleep(1)
        raise RuntimeError(f"serve did not extract the seeded store within {timeout:.0f} s")
    finally:
        stop(proc, 120)


def _line(kind: str, run: dict[str, Any]) -> str:
    stages = ", ".join(f"{k} {v:.2f}" for k, v in run["stages_s"].items() if v >= 0.01)
    reads = ", ".join(f"{k} {n}x {s:.2f}" for k, (n, s) in run["reads"].items())
    return (
        f"  after a {kind:5s} stop: listening {run['listening_s']:5.1f} s, report served "
        f"{run['report_s']:5.1f} s, first round ends {run['first_round_s']:6.1f} s"
        f"  ({stages}; reads: {reads or 'none'})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stored", default="5M", help="spans in the seeded store (default 5M)")
    parser.add_argument("--rounds", type=int, default=2, help="restarts after each kind of stop")
    parser.add_argument("--keep", type=Path, help="keep the store in this folder (reused when present)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each serve may take")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="hourglass-restart-"))
    folder.mkdir(parents=True, exist_ok=True)
    db = folder / "spans.duckdb"
    try:
        if not db.exists():
            began = time.monotonic()
            stored = seed_store(db, _spans(args.stored))
            print(f"seeded {db} with {stored:,} spans ({time.monotonic() - began:.0f} s)", flush=True)
            began = time.monotonic()
            catch_up(db, folder / "serve-catch-up.log", args.timeout)
            print(f"serve extracted them all ({time.monotonic() - began:.0f} s), then stopped", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {"clean": [], "crash": []}
        # each start follows the stop of the start before: clean, killed, clean, killed ...
        restart(db, folder / "serve-first.log", then_kill=False, timeout=args.timeout)  # (a clean stop first)
        for n in range(args.rounds):
            after_clean = restart(db, folder / f"serve-{n}-a.log", then_kill=True, timeout=args.timeout)
            runs["clean"].append(after_clean)
            print(_line("clean", after_clean), flush=True)
            after_crash = restart(db, folder / f"serve-{n}-b.log", then_kill=False, timeout=args.timeout)
            runs["crash"].append(after_crash)
            print(_line("crash", after_crash), flush=True)
        print(f"\nrestart of serve on {db} (median of {args.rounds}):")
        for kind, label in (
            ("crash", "after a crash (baseline: rebuilt)"),
            ("clean", "after a clean stop (kept)"),
        ):
            listening = statistics.median(r["listening_s"] for r in runs[kind])
            report = statistics.median(r["report_s"] for r in runs[kind])
            first = statistics.median(r["first_round_s"] for r in runs[kind])
            print(
                f"  {label:36s} listening {listening:5.1f} s, report served {report:5.1f} s"
                f" (before the kept report: at the first round's end, {first:6.1f} s)"
            )
        print(json.dumps(runs))
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
