"""What-if and an endpoint's critical path over a 1M-span store: `make bench-whatif`
(`python -m bench.whatif`).

What it does, in one run:

1. builds a DuckDB span store of ``--spans`` spans (default 1,000,000; the analysis benchmark's
   mixed-shape generator, ≈ 50,000 traces) unless ``--db`` names one;
2. times, as whole processes (what a user runs: start-up, store scan, repair and critical path
   included), best of ``--rounds`` alternating rounds:

   * the baseline: ``hourglass analyze --db … --format json`` (the whole analysis);
   * ``hourglass whatif --speedup users:GET /api/users/{id}=0.5`` (one operation twice as fast);
   * ``hourglass whatif --parallelize frontend:GET /checkout`` (a caller's calls concurrent);
   * ``hourglass whatif --cap search:GET /search=2`` (a fan-out limited to 2);
   * ``hourglass whatif --recommendation <the top recommendation's id>`` (runs its detector again);
   * ``hourglass critical-path --service frontend --operation GET /checkout``;

3. prints each time beside the baseline and their ratio, and checks that ``--recommendation``
   saves what the baseline report says (within 1 %);
4. starts the real ``hourglass serve`` on the store and, once its first report is out, times the
   same questions over HTTP: the first ``POST /v1/whatif`` (it builds the server's repaired copy
   of the store), then the others (answered from that copy) and ``GET /v1/critical-path``
   (``--no-serve`` skips this part).

Target (issue 14): what-if and critical path over 1M spans answer in seconds.

A question holds a context of its window's spans, and a window larger than the memory budget holds
at once is asked in partitions of whole traces (``hourglass.api.queries``): each question runs both
with ``HOURGLASS_MEMORY_BUDGET`` raised to hold the whole store at once (:func:`budget_env`) and
under the default budget (in partitions, ``[parts]``), with its time, its process' peak RSS, and
whether both answer the same. The server runs with the budget raised.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._process import hourglass_command, stop

ROOT = Path(__file__).resolve().parents[1]


# (set by ``main``: the memory budget that holds the store's spans at once)
BUDGET_ENV: dict[str, str] = {}


def budget_env(spans: int) -> dict[str, str]:
    """``HOURGLASS_MEMORY_BUDGET`` that holds ``spans`` spans at once (the stored rows counted
    with their copies: a margin of a tenth)."""
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES

    return {"HOURGLASS_MEMORY_BUDGET": str(PROCESS_BASE_BYTES + int(spans * 1.1) * PEAK_BYTES_PER_SPAN)}


PEAK_GIB: dict[str, list[float]] = {}  # the peak RSS of each command's own process, by name


def run(args: list[str], *, at_once: bool = True, name: str | None = None) -> tuple[float, str]:
    """``hourglass ARGS`` as a process: (seconds, stdout); its peak RSS (its own process, from
    ``wait4``; not the analysis' worker processes) added to ``PEAK_GIB[name]``. ``at_once``:
    with the memory budget raised to hold the store (:data:`BUDGET_ENV`), else the default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    if at_once:
        env.update(BUDGET_ENV)
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*hourglass_command(), *args], cwd=ROOT, env=env, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"hourglass {' '.join(args)} exited {proc.returncode}:\n{stderr[-2000:]}")
    if name is not None:
        PEAK_GIB.setdefault(name, []).append(usage.ru_maxrss * 1024 / 2**30)
    return seconds, stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--db", type=Path, help="reuse this store instead of generating one")
    parser.add_argument("--no-serve", action="store_true", help="skip the questions over HTTP")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="hourglass-bench-whatif-"))
    db = args.db or tmp / "bench.duckdb"
    try:
        if args.db is None:
            from bench.analysis import build_store

            stored, seconds = build_store(db, args.spans)
            print(f"store: {stored:,} spans written to {db} in {seconds:.1f} s", flush=True)
        import duckdb

        with duckdb.connect(str(db), read_only=True) as con:
            BUDGET_ENV.update(budget_env(int(con.execute("SELECT count(*) FROM spans").fetchall()[0][0])))
        store = ["--db", str(db)]
        baseline = ["analyze", *store, "--format", "json"]
        seconds, out = run(baseline)  # also warms the page cache for every command alike
        report = json.loads(out)
        top = next(r for r in report["recommendations"] if (r["impact"] or {}).get("saved_ms_total"))
        print(
            f"warm-up: analyze {seconds:.1f} s; {report['spans_analyzed']:,} spans, "
            f"{report['traces_analyzed']:,} traces; top recommendation {top['id']} "
            f"saves {top['impact']['saved_ms_total']:,.1f} ms",
            flush=True,
        )
        commands: dict[str, list[str]] = {
            "analyze (baseline)": baseline,
            "whatif --speedup": [
                "whatif",
                *store,
                "--speedup",
                "users:GET /api/users/{id}=0.5",
                "-f",
                "json",
            ],
            "whatif --parallelize": [
                "whatif",
                *store,
                "--parallelize",
                "frontend:GET /checkout",
                "-f",
                "json",
            ],
            "whatif --cap": ["whatif", *store, "--cap", "search:GET /search=2", "-f", "json"],
            "whatif --recommendation": ["whatif", *store, "--recommendation", top["id"], "-f", "json"],
            "critical-path": [
                "critical-path",
                *store,
                "--service",
                "frontend",
                "--operation",
                "GET /checkout",
                "-f",
                "json",
            ],
        }
        # each question also under the default budget, which holds fewer spans at once than the
        # store has: asked in partitions of whole traces (``[parts]``), beside at once
        questions = [name for name in commands if name != "analyze (baseline)"]
        times: dict[str, list[float]] = {name: [] for name in commands}
        times.update({f"{name} [parts]": [] for name in questions})
        outputs: dict[str, str] = {}
        for _ in range(args.rounds):  # alternate, so a busy spell on the shared machine hits all alike
            for name, command in commands.items():
                seconds, outputs[name] = run(command, name=name)
                times[name].append(seconds)
                if name in questions:
                    seconds, outputs[f"{name} [parts]"] = run(command, at_once=False, name=f"{name} [parts]")
                    times[f"{name} [parts]"].append(seconds)
        base = min(times["analyze (baseline)"])
        print(f"\nwhole processes over {report['spans_analyzed']:,} spans, best of {args.rounds}:")
        print(f"{'command':<34}{'best s':>9}{'runs':>22}{'vs analyze':>12}{'peak GiB':>10}")
        for name, runs in times.items():
            best = min(runs)
            print(
                f"{name:<34}{best:>9.2f}{', '.join(f'{r:.2f}' for r in runs):>22}{best / base:>11.2f}x"
                f"{max(PEAK_GIB[name]):>10.2f}"
            )
        same = all(json.loads(outputs[f"{name} [parts]"]) == json.loads(outputs[name]) for name in questions)
        print(
            "[parts]: the default memory budget (1.5 GiB), asked in partitions of whole traces; the others "
            "with the budget raised to hold the store at once (peak: the command's own process; "
            "--recommendation [parts] decides the findings on worker processes first). "
            f"Same answers: {'yes' if same else 'NO'}"
        )
        priced = json.loads(outputs["whatif --recommendation"])["saved_ms_total"]
        expected = top["impact"]["saved_ms_total"]
        agree = abs(priced - expected) <= 0.01 * abs(expected)
        speedup = json.loads(outputs["whatif --speedup"])
        path = json.loads(outputs["critical-path"])
        print(
            f"\n--recommendation saves {priced:,.1f} ms, the report says {expected:,.1f} ms: "
            f"{'agree' if agree else 'DISAGREE'} (1 %)"
        )
        print(
            f"--speedup users twice as fast: {speedup['saved_ms_total']:,.1f} ms saved over "
            f"{speedup['traces_changed']:,} traces; critical path of frontend GET /checkout over "
            f"{path['traces']:,} traces: top {path['operations'][0]['service']}:{path['operations'][0]['operation']} "
            f"({path['operations'][0]['share']:.0%})"
        )
        slowest = max(min(times[name]) for name in questions)
        agree = agree and same
        verdict = "PASS" if agree and slowest <= base else "CHECK"
        print(f"slowest question {slowest:.2f} s vs the whole analysis {base:.2f} s: {verdict}")
        if not args.no_serve:
            agree = served(db, top) and agree
        return 0 if agree else 1
    finally:
        if args.db is None:
            shutil.rmtree(tmp, ignore_errors=True)


def served(db: Path, top: dict[str, Any]) -> bool:
    """The same questions to a running ``hourglass serve`` over HTTP (see the module doc)."""
    import httpx

    from bench.api import free_port, wait_for_report

    api_port = free_port()
    base_url = f"http://127.0.0.1:{api_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    env["HOURGLASS_SETTLE"] = "5s"
    env["HOURGLASS_RETENTION"] = "36500d"  # the generated spans are dated in the past: keep them
    env.update(BUDGET_ENV)
    log_path = db.with_suffix(".serve.log")
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port()), "--api-port", str(api_port)]
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [*hourglass_command(), "serve", "--db", str(db), *ports],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        started = time.perf_counter()
        stats = wait_for_report(base_url, {}, 900, server)
        print(
            f"\nserve: first report after {time.perf_counter() - started:.1f} s over {stats['spans']:,} spans"
        )
        questions: list[tuple[str, str, dict[str, Any] | None, dict[str, str] | None]] = [
            (
                "POST /v1/whatif --recommendation (first: builds the copy)",
                "POST",
                {"changes": [{"recommendation": top["id"]}]},
                None,
            ),
            (
                "POST /v1/whatif --recommendation (again)",
                "POST",
                {"changes": [{"recommendation": top["id"]}]},
                None,
            ),
            (
                "POST /v1/whatif --speedup",
                "POST",
                {
                    "changes": [
                        {"speedup": {"service": "users", "operation": "GET /api/users/{id}", "factor": 0.5}}
                    ]
                },
                None,
            ),
            (
                "POST /v1/whatif --cap",
                "POST",
                {"changes": [{"cap": {"service": "search", "operation": "GET /search", "concurrency": 2}}]},
                None,
            ),
            ("GET /v1/critical-path", "GET", None, {"service": "frontend", "operation": "GET /checkout"}),
        ]
        agree = True
        print(f"{'question over HTTP':<58}{'seconds':>9}")
        with httpx.Client(base_url=base_url, timeout=600) as client:
            for name, method, body, params in questions:
                t0 = time.perf_counter()
                answer = client.request(
                    method,
                    "/v1/whatif" if method == "POST" else "/v1/critical-path",
                    json=body,
                    params=params,
                )
                seconds = time.perf_counter() - t0
                answer.raise_for_status()
                print(f"{name:<58}{seconds:>9.2f}")
                if "recommendation" in name:
                    saved = answer.json()["saved_ms_total"]
                    agree = agree and abs(saved - top["impact"]["saved_ms_total"]) <= 0.01 * abs(
                        top["impact"]["saved_ms_total"]
                    )
        print(f"served --recommendation agrees with the report (1 %): {agree}")
        return agree
    finally:
        stop(server, 60)


if __name__ == "__main__":
    sys.exit(main())
