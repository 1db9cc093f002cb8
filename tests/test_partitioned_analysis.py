"""`hourglass analyze --db` in partitions of whole traces: the same report as at once.

A store holding the labelled sample traces, the foreign-trace regression files and a generated mix
of every bench shape is analysed by the real CLI as a process: at once, in 3 partitions on one
worker process, in 4 partitions on 2 worker processes, in 3 partitions with the lock-convoy rule's
resource rows spilled to 5 buckets on disk, and in 3 partitions on a real Dask scheduler with
two real worker processes on 127.0.0.1 (one of them killed in the middle of its first task; and
in 4 partitions, the store split for workers that see this machine's files), and on two that act
as on other machines (each task reads the store, the client spills their resource rows). The JSON
reports (with ``--explain``) are identical but for ``generated_at``. Also: an unreachable scheduler is one line, fast; a budget too small for the
largest trace names it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dask_cluster import dask_cluster as start_dask_cluster
from tests.orphans import left_running, linux_only, spawned

ROOT = Path(__file__).resolve().parents[1]
HOURGLASS = Path(sys.executable).with_name("hourglass")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(
    *args: Any, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOURGLASS), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**ENV, **(env or {})},
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    path = tmp_path_factory.mktemp("partitioned") / "spans.duckdb"
    files = sorted((ROOT / "sample-traces").glob("*.otlp.jsonl"))
    files += sorted(p for p in (ROOT / "sample-traces" / "foreign").glob("*.otlp.json*"))
    imported = _run("import", "--db", path, *files)
    assert imported.returncode == 0, imported.stderr
    # one file again: exporter retries, copies of its spans that every read must remove
    retried = _run("import", "--db", path, files[0])
    assert retried.returncode == 0, retried.stderr
    generated = DuckDBSpanStore(str(path))  # every bench shape, the hung calls among them
    try:
        generated.write(generate_spans(20_000, seed=5, first_trace=10_000_000))
        assert generated.raw_row_count() > generated.stats().spans  # the copies are there
    finally:
        generated.close()
    return path


def _report(
    store: Path, *args: Any, stderr: list[str] | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    result = _run("analyze", "--db", store, "--format", "json", "--explain", *args, env=env)
    assert result.returncode == 0, result.stderr
    if stderr is not None:
        stderr.append(result.stderr)
    report: dict[str, Any] = json.loads(result.stdout)
    report.pop("generated_at")
    # The designs and the workstreams are compared whole: pattern, numbers, pseudocode, diagrams.
    return report


@pytest.fixture(scope="module")
def whole(store: Path) -> dict[str, Any]:
    report = _report(store, "--partitions", "1")
    kinds = {r["kind"] for r in report["recommendations"]}
    assert len(kinds) >= 6 and report["near_misses"], kinds  # the comparison has something to compare
    assert len(report["critical_paths"]) == 8 and all(p["icicle"] for p in report["critical_paths"])
    return report


@pytest.mark.parametrize(
    "args",
    [
        ("--partitions", "3", "--workers", "1"),
        ("--partitions", "4", "--workers", "2"),
        ("--partitions", "3", "--workers", "1", "--spill-buckets", "5"),
    ],
)
def test_partitions_in_this_process_or_in_workers_give_the_same_report(
    store: Path, whole: dict[str, Any], args: tuple[str, ...]
) -> None:
    assert _report(store, *args) == whole


@pytest.mark.parametrize(
    "args",
    [
        ("--partitions", "8", "--workers", "2"),
        ("--partitions", "9", "--workers", "1", "--spill-buckets", "5"),
    ],
)
def test_partitions_read_from_one_split_of_the_store_give_the_same_report(
    store: Path, whole: dict[str, Any], args: tuple[str, ...], tmp_path: Path
) -> None:
    """From SPLIT_MIN_PARTS partitions on, the store is read once into a file per partition, which
    every pass reads instead of the store; the files are gone when the command ends."""
    from hourglass.analysis.partitions import SPLIT_MIN_PARTS

    parts = int(args[1])
    assert parts >= SPLIT_MIN_PARTS
    said: list[str] = []
    env = {"TMPDIR": str(tmp_path), "HOURGLASS_MEMORY_LOG": "1"}
    assert _report(store, *args, stderr=said, env=env) == whole
    assert f"store split into {parts} partition files" in said[0]
    assert not list(tmp_path.glob("hourglass-partitions-*"))


def test_the_partition_files_are_removed_on_ctrl_c(store: Path, tmp_path: Path) -> None:
    command = [str(HOURGLASS), "analyze", "--db", str(store), "--format", "json", "--partitions", "8"]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**ENV, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = _signalled_while_splitting(process, tmp_path, signal.SIGINT)
    assert process.returncode != 0, err
    assert not list(tmp_path.glob("hourglass-partitions-*")), err


def test_sigterm_removes_the_temporary_files_and_stops_the_workers(store: Path, tmp_path: Path) -> None:
    """SIGTERM (a service manager, ``timeout``) ends the run as Ctrl-C does: its split, kept
    partitions and spilled rows removed, no worker process left behind. (Before, its workers
    finished their partitions, and wrote spilled rows after their folder was removed.)"""
    command = [str(HOURGLASS), "analyze", "--db", str(store), "--format", "json", "--partitions", "8"]
    process = subprocess.Popen(
        [*command, "--workers", "2", "--spill-buckets", "4"],
        cwd=ROOT,
        env={**ENV, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # (its workers are in its process group)
    )
    err = _signalled_while_splitting(process, tmp_path, signal.SIGTERM)
    assert process.returncode == 130, err
    assert not list(tmp_path.glob("hourglass-*")), err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)  # a process of its group still alive: a worker
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("a worker process outlived the command")


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real scheduler and two worker processes on 127.0.0.1 for the module; the first Hourglass
    task kills its worker process (once: its nanny starts a new one). Yields (address, the marker
    file written when a worker was killed)."""
    folder = tmp_path_factory.mktemp("dask")
    with start_dask_cluster(folder, die=1) as address:
        yield address, folder / "died-1"


def test_a_dask_cluster_gives_the_same_report(
    store: Path, whole: dict[str, Any], dask_cluster: tuple[str, Path], tmp_path: Path
) -> None:
    address, died = dask_cluster
    assert _report(store, "--cluster", address, "--partitions", "3") == whole
    assert died.read_text().startswith("hourglass-")  # a worker died mid-task: its task ran again
    # workers of this machine read its files: the store is split for them, their rows and repaired
    # spans kept in this run's folders (as local worker processes do), the same report
    said: list[str] = []
    env = {"HOURGLASS_MEMORY_LOG": "1", "TMPDIR": str(tmp_path)}
    args = ("--cluster", address, "--partitions", "4", "--spill-buckets", "3")
    assert _report(store, *args, stderr=said, env=env) == whole
    assert "its workers read this machine's files: the store is split into a file per partition" in said[0]
    assert "store split into 4 partition files" in said[0], said
    assert not list(tmp_path.glob("hourglass-*")), "the run's folders are removed"


@pytest.fixture(scope="module")
def dask_elsewhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real scheduler and two worker processes that act as on other machines: they do not see
    this machine's temporary files (``tests/dask_elsewhere.py``)."""
    with start_dask_cluster(tmp_path_factory.mktemp("dask-elsewhere"), elsewhere=True) as address:
        yield address


def test_a_dask_cluster_elsewhere_reads_the_store_and_its_rows_are_spilled_here(
    store: Path, whole: dict[str, Any], dask_elsewhere: str
) -> None:
    """Workers on other machines: each task reads its partition from the store (no split of this
    machine's they could not read), and the resource rows they return are spilled by the client,
    bucket by bucket, and decided as the local run decides them."""
    args = ("--cluster", dask_elsewhere, "--partitions", "4", "--spill-buckets", "5")
    said: list[str] = []
    assert _report(store, *args, stderr=said, env={"HOURGLASS_MEMORY_LOG": "1"}) == whole
    assert "resource rows spilled to 5 buckets" in said[0], said
    # the plan's line names the cluster, not worker processes of this machine
    assert re.search(
        rf"on the Dask cluster at {re.escape(dask_elsewhere)} \([12] Dask workers?\)", said[0]
    ), said
    assert "worker process" not in said[0] and "this machine's files" not in said[0], said
    assert "partition files" not in said[0], said  # no split


def _rows(frame: Any) -> tuple[Any, ...]:
    """A frame's schema and rows in a canonical order (a group-by's rows, and the values it
    gathers into lists, come in any order)."""

    def value(v: Any) -> Any:
        return sorted(map(repr, v)) if isinstance(v, list) else v

    return (frame.schema, sorted(repr(tuple(map(value, row))) for row in frame.rows()))


def test_a_task_that_does_not_see_the_run_folders_reads_the_store_and_returns_its_rows(
    store: Path, tmp_path: Path
) -> None:
    """A Dask worker that joined after the workers were found to see this machine's files, and
    does not: its partition is read from the store, its rows come back whole and the client keeps
    them as a task would have (the same files, so the same decision)."""
    from hourglass.analysis import partitions
    from hourglass.analysis.spill import Spill
    from hourglass.collector.duckdb_store import partition_file

    source = partitions.StoreSource(str(store))
    split = partitions.split_store(source, 4, near=str(tmp_path))
    assert split is not None
    try:
        os.remove(partition_file(split.folder, 2))  # (unseen by the reader)
        assert split.load(2, 4).equals(source.load(2, 4))
        seen, unseen = Spill.create(3, near=str(tmp_path)), Spill(str(tmp_path / "elsewhere"), 3)
        worker = partitions.extract_part(split, 2, 4, seen)
        assert worker.kept and not worker.rows
        returned = partitions.extract_part(split, 2, 4, unseen)
        assert not returned.kept and returned.rows and not (tmp_path / "elsewhere").exists()
        here = Spill.create(3, near=str(tmp_path))
        kept = partitions.keep_here(here, returned)
        assert kept.kept and kept.kept_paths == worker.kept_paths and not kept.rows and kept.paths is None
        for kind in [*partitions.PARTS, partitions.PATHS_KIND]:
            ours, theirs = here.kept(kind), seen.kept(kind)
            assert ours.keys() == theirs.keys(), kind
            for name in ours:
                assert [_rows(a) for a in ours[name]] == [_rows(b) for b in theirs[name]], (kind, name)
        for kind in partitions.SPILLABLE:
            ours_b, theirs_b = list(here.buckets_of(kind)), list(seen.buckets_of(kind))
            assert len(ours_b) == len(theirs_b), kind
            for a, b in zip(ours_b, theirs_b, strict=True):
                assert _rows(a(None, None)) == _rows(b(None, None)), kind
    finally:
        split.remove()


def test_an_unreachable_scheduler_is_one_line_within_ten_seconds(store: Path) -> None:
    started = time.monotonic()
    result = _run("analyze", "--db", store, "--cluster", "tcp://127.0.0.1:9")
    assert time.monotonic() - started < 10 + 5  # the CLI's own start-up on a loaded machine
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in lines[0]


def test_the_scaling_bench_says_where_a_partitioned_run_spent_its_time(store: Path, tmp_path: Path) -> None:
    """``bench.scaling --phases``: the phases of a real partitioned run, read from the notes its
    processes write (so a note renamed in the analysis fails here, not silently in the bench),
    adding up to the run's wall time; and the CPU of all its processes."""
    from bench._process import hourglass_command
    from bench.scaling import phases, run_process

    argv = [*hourglass_command(), "analyze", "--db", str(store), "--format", "json", "--output"]
    argv += [str(tmp_path / "report.json"), "--partitions", "4", "--workers", "2"]
    run = run_process(argv, env={"PYTHONPATH": str(ROOT), "HOURGLASS_MEMORY_LOG": "1"})
    assert run["code"] == 0, run["stderr"][-2000:]
    split = phases(run["stderr"], run["started_at"], run["wall_s"], run["pid"])
    assert split is not None, run["stderr"][-2000:]
    assert [name for name, _ in split] == [
        "start-up until a worker holds its first partition",
        "extraction",
        "decision",
        "pricing",
        "report, texts and exit",
    ]
    assert all(seconds >= 0 for _, seconds in split)
    assert split[0][1] > 0 and split[1][1] > 0  # (workers start, then extract)
    assert sum(seconds for _, seconds in split) == pytest.approx(run["wall_s"])
    assert 0 < run["cpu_s"] < run["wall_s"] * (os.cpu_count() or 1) * 1.1
    # a run without the notes (or in one process: no worker read a partition) has no phases
    assert phases("", run["started_at"], run["wall_s"], run["pid"]) is None
    one = run_process(
        [*argv[:-4], "--partitions", "1"], env={"PYTHONPATH": str(ROOT), "HOURGLASS_MEMORY_LOG": "1"}
    )
    assert one["code"] == 0 and phases(one["stderr"], one["started_at"], one["wall_s"], one["pid"]) is None


def test_a_budget_too_small_for_the_largest_trace_names_it(store: Path) -> None:
    from hourglass.analysis import partitions

    largest = ("4bf92f3577b34da6a3ce929d0e0e4736", 500_000)
    with pytest.raises(
        partitions.BudgetError, match="trace 4bf92f3577b34da6a3ce929d0e0e4736 alone has 500,000 spans"
    ):
        partitions.plan(2_000_000, 1 << 30, 1, largest)
    # a budget that leaves each of two workers too little plans fewer workers, not hundreds of parts
    fewer = partitions.plan(6_000_000, 1 << 30, 2)
    assert fewer.workers == 1 and fewer.parts < 50
    # the workers' bases do not fit beside the decision: they are started after it, not during it
    assert not partitions.plan(12_000_000, int(1.5 * 2**30), 1).warm
    assert partitions.plan(5_000_000, int(1.5 * 2**30), 2).warm
    # the workers are kept through the decision only when their peaks fit beside it
    assert partitions.plan(1_000_000, int(1.5 * 2**30), 2).keep
    assert not partitions.plan(5_000_000, int(1.5 * 2**30), 2).keep
    # two kinds decided at once only when a second decision fits beside the first and the workers
    assert partitions.plan(1_000_000, int(1.5 * 2**30), 2).beside
    assert not partitions.plan(1_000_000, int(1.5 * 2**30), 1).beside  # its kept worker's peak
    assert not partitions.plan(5_000_000, int(1.5 * 2**30), 2).beside
    # room for the workers but not for the decision, which runs alone once they are stopped
    with pytest.raises(partitions.BudgetError, match="cannot hold the decision over 20,000,000 spans"):
        partitions.plan(20_000_000, int(2.0 * 2**30), 1)
    too_small = _run("analyze", "--db", store, "--memory-budget", "10MB")
    assert too_small.returncode == 2 and "cannot hold the analysis" in too_small.stderr


def _newest_quarter_ns(store: Path) -> int:
    """A whole second from which about the newest quarter of ``store``'s spans start."""
    import duckdb

    with duckdb.connect(str(store), read_only=True) as con:
        (start,) = con.execute("SELECT quantile_disc(start_ns, 0.75) FROM spans").fetchall()[0]
    return int(start) // 10**9 * 10**9


def _last_start_before(store: Path, before_ns: int) -> int:
    """The latest start of a trace's last span before ``before_ns``: the window of the next trace."""
    import duckdb

    with duckdb.connect(str(store), read_only=True) as con:
        (start,) = con.execute(
            "SELECT max(last) FROM (SELECT max(start_ns) AS last FROM spans GROUP BY trace_id) WHERE last < ?",
            [before_ns],
        ).fetchall()[0]
    return int(start)


def _window_rows(store: Path, since_ns: int | None, services: list[str] | None = None) -> int:
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    opened = DuckDBSpanStore(str(store), read_only=True)
    try:
        return opened.window_rows(since_ns=since_ns, services=services)
    finally:
        opened.close()


def test_a_window_is_planned_on_its_own_spans_not_the_stores(store: Path) -> None:
    """``analyze --db --since`` plans on the rows of the window's traces: under a budget too small
    for the whole store but large enough for the window, the window is analysed (before, planned
    on the store's rows, it was refused), with the report of the same window under the default
    budget; in partitions, its line counts the window's spans, not the store's. The refusal of
    the whole store says a window may fit, in the words of the command that asks."""
    from datetime import UTC, datetime

    from hourglass.analysis import partitions, planning

    since_ns = _newest_quarter_ns(store)
    since = datetime.fromtimestamp(since_ns // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stored, window = _window_rows(store, None), _window_rows(store, since_ns)
    assert 0 < window < stored // 2
    # at once for the window, and too small for the store whatever its partitions
    budget = planning.PROCESS_BASE_BYTES + planning.PEAK_BYTES_PER_SPAN * ((window + stored) // 2)
    assert planning.at_once_spans(budget) >= window
    with pytest.raises(partitions.BudgetError):
        partitions.plan(stored, budget, 1)
    refused = _run("analyze", "--db", store, "--memory-budget", budget, "--workers", 1)
    assert refused.returncode == 2 and "cannot hold the analysis" in refused.stderr
    # it offers the largest window of the newest traces that fits: no smaller than the quarter
    offered = re.search(
        r"raise --memory-budget, or analyse a window of it: --since (\S+) holds its newest ([\d,]+) spans, "
        r"which fit$",
        refused.stderr.strip(),
    )
    assert offered is not None, refused.stderr
    from hourglass.settings import parse_since

    offered_ns = parse_since(offered[1])
    fitting = int(offered[2].replace(",", ""))
    assert offered_ns <= since_ns and window <= fitting == _window_rows(store, offered_ns) < stored
    # the largest: with the trace whose last span started just before it (to the microsecond
    # written), it would not fit
    before = _last_start_before(store, offered_ns - 1_000)
    assert fitting <= planning.at_once_spans(budget) < _window_rows(store, before)
    assert _report(store, "--since", offered[1], "--memory-budget", budget, "--workers", 1)["recommendations"]
    # a --service window too large: the newest of its traces that fit, the filter kept
    serviced = _window_rows(store, None, ["frontend"])
    tight = planning.PROCESS_BASE_BYTES + planning.PEAK_BYTES_PER_SPAN * (serviced // 2)
    with pytest.raises(partitions.BudgetError):
        partitions.plan(serviced, tight, 1)
    refused = _run(
        "analyze", "--db", store, "--service", "frontend", "--memory-budget", tight, "--workers", 1
    )
    offered = re.search(
        r"--since (\S+) with the same --service holds its newest ([\d,]+) spans, which fit$",
        refused.stderr.strip(),
    )
    assert refused.returncode == 2 and offered is not None, refused.stderr
    fitting = int(offered[2].replace(",", ""))
    assert (
        fitting == _window_rows(store, parse_since(offered[1]), ["frontend"]) <= planning.at_once_spans(tight)
    )
    # a command without --memory-budget names the setting it reads instead
    settings = {"HOURGLASS_MEMORY_BUDGET": str(budget), "HOURGLASS_WORKERS": "1"}
    report = _run("report", "--db", store, "--format", "json", env=settings)
    assert report.returncode == 2 and report.stderr.startswith("hourglass report: "), report.stderr
    assert "raise HOURGLASS_MEMORY_BUDGET, or analyse a window" in report.stderr
    small = _report(store, "--since", since, "--memory-budget", budget, "--workers", 1)
    assert small["recommendations"] and small == _report(store, "--since", since)
    told: list[str] = []
    assert _report(store, "--since", since, "--partitions", 3, stderr=told) == small
    assert f"{window:,} spans in 3 partitions" in told[0], told[0]
    # a service the store does not hold: an empty report, and a line naming those it holds
    typo = _run("analyze", "--db", store, "--service", "frontnd")
    assert typo.returncode == 0 and "No spans to analyse" in typo.stdout
    assert "no service 'frontnd' in the store; it holds " in typo.stderr and "frontend" in typo.stderr


def test_analyze_db_ends_without_the_interpreters_teardown(
    store: Path, whole: dict[str, Any], tmp_path: Path
) -> None:
    """Once its report is written, ``analyze --db`` over a DuckDB file, and its worker processes,
    end at once: an exit handler registered at start-up (a ``sitecustomize``) never runs in them,
    while it does after ``analyze FILES``. The report is whole, the partition files are removed, and a
    gate's exit code is kept."""
    site = tmp_path / "site"
    site.mkdir()
    marker = tmp_path / "torn-down"
    (site / "sitecustomize.py").write_text(  # in the command's processes (not multiprocessing's tracker)
        "import atexit, sys\n"
        f"atexit.register(lambda: 'hourglass' in sys.modules and open({str(marker)!r}, 'a').close())\n"
    )
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "TMPDIR": str(temp)}
    assert _report(store, "--partitions", "8", "--workers", "2", env=env) == whole
    assert not marker.exists()
    assert not list(temp.glob("hourglass-partitions-*"))
    gated = _run("analyze", "--db", store, "--format", "json", "--fail-on", "any", env=env)
    assert gated.returncode == 3, gated.stderr
    assert json.loads(gated.stdout)["recommendations"] and not marker.exists()
    sample = ROOT / "sample-traces" / "n_plus_one.otlp.jsonl"
    files = _run("analyze", sample, "--format", "json", env=env)
    assert files.returncode == 0, files.stderr
    assert marker.exists()  # the hook works: a run that tears the interpreter down runs it


def test_the_pricing_counts_a_partition_s_prepared_pricing_not_its_extraction_peak() -> None:
    """While the workers price, each holds its partition's pricing from the Prepared file
    (``PRICE_BYTES_PER_SPAN`` a span), not an extraction's peak; while they extract, this process
    holds the trace summaries (``SUMMARY_BYTES_PER_SPAN``), not the rows. Counting the extraction
    peaks beside the rows left a 10M-span store one worker under the default budget (measured:
    69 s against 46 on two, ``bench.scaling``). Each phase of every plan still fits its budget."""
    from hourglass.analysis import partitions as p

    gib = 2**30
    assert p.plan(10_000_000, int(1.5 * gib), 2, split=True).workers == 2
    assert p.plan(1_000_000, int(1.5 * gib), 2, split=True) == p.Plan(
        1_000_000, 6, 2, 1, True, True, True, True, True
    )  # the 1M benchmark's plan: as before
    for budget in (600, 800, 1024, 1536, 2048, 4096):
        for spans in (500_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000):
            for workers in (1, 2, 4):
                try:
                    got = p.plan(spans, budget * 2**20, workers)
                except p.BudgetError:
                    continue
                if got.parts == 1:
                    continue
                bases = (got.workers + 1) * p.PROCESS_BASE_BYTES
                part = -(-spans // got.parts)
                extracting = (
                    bases + spans * p.SUMMARY_BYTES_PER_SPAN + got.workers * part * p.PEAK_BYTES_PER_SPAN
                )
                pricing = bases + spans * p.ROWS_BYTES_PER_SPAN + got.workers * part * p.PRICE_BYTES_PER_SPAN
                assert max(extracting, pricing) <= budget * 2**20, (budget, spans, workers, got)


def test_the_plan_splits_the_store_beside_the_workers_only_when_both_fit() -> None:
    """A store that this machine splits into partition files is split by the deciding process
    beside the workers' first partitions; the plan counted neither (that process' rows only, 80 MB
    at 1M spans, against the split's ~250 MiB): 6 partitions of 1M spans under an 800 MiB budget
    meant the split and a first partition's peak together, ~970 MiB. Now the split runs beside
    them only when both fit, else before them, while they start (``Plan.split_beside``), else not
    at all (``Plan.split``: the tasks read the store), in the same partitions; the split's memory
    grows with the store (``split_bytes``), and no budget that the plan without a split holds is
    refused."""
    from hourglass.analysis import partitions as p

    def first_round(plan: p.Plan, split: int) -> int:
        bases = (plan.workers + 1) * p.PROCESS_BASE_BYTES
        peaks = plan.workers * -(-plan.spans // plan.parts) * p.PEAK_BYTES_PER_SPAN
        split = split if plan.split else 0
        return bases + max(split, plan.spans * p.ROWS_BYTES_PER_SPAN) + (peaks if plan.split_beside else 0)

    for budget in (600, 700, 800, 900, 1024, 1536, 2048):
        for spans in (1_000_000, 2_000_000, 5_000_000):
            for filtered in (False, True):
                try:
                    plain = p.plan(spans, budget * 2**20, 2)
                except p.BudgetError:  # (too small a budget for any plan: as it was)
                    continue
                got = p.plan(spans, budget * 2**20, 2, split=True, filtered=filtered)
                assert (got.parts, got.workers) == (plain.parts, plain.workers) and plain.split_beside
                assert first_round(got, p.split_bytes(spans, filtered)) <= budget * 2**20, (
                    budget,
                    spans,
                    got,
                )
                assert got.split or not got.split_beside
    assert p.split_bytes(2_000_000) > p.split_bytes(1_000_000) > p.SPLIT_BYTES
    # the measured peaks over the split's start (MiB, PROCESS_BASE_BYTES counted for the process)
    for spans, filtered, measured in [(1, False, 249), (2, False, 287), (5, False, 322), (1, True, 383)]:
        assert p.split_bytes(spans * 1_000_000, filtered) >= measured * 2**20
    assert all(p.split_bytes(n * 1_000_000, True) >= m * 2**20 for n, m in [(5, 708), (10, 910)])
    # windows of a store (its rows, thousands), each trace id of the window's join once
    for window, stored, measured in [
        (1_670, 10_000, 757),
        (830, 10_000, 652),
        (7_500, 10_000, 917),
        (410, 5_000, 411),
    ]:
        assert p.split_bytes(window * 1_000, True, stored * 1_000) >= measured * 2**20
    assert p.split_bytes(1_000_000, filtered=True) > p.split_bytes(1_000_000)
    assert not p.plan(1_000_000, 800 * 2**20, 2, split=True).split_beside
    assert p.plan(1_000_000, 800 * 2**20, 2, split=True).split
    assert p.plan(1_000_000, 1536 * 2**20, 2, split=True).split_beside  # the benchmark's run: as before
    # budgets that refused the run (the split counted even before the workers did not fit): the
    # run goes on, its tasks reading the store
    for spans, budget, filtered in [
        (1_000_000, 800, True),
        (1_000_000, 700, True),
        (1_000_000, 600, False),
        (5_000_000, 900, True),
        (5_000_000, 1024, True),
    ]:
        got = p.plan(spans, budget * 2**20, 2, split=True, filtered=filtered)
        assert not got.split and not got.split_beside, (spans, budget, filtered, got)
    # (a filtered split's join holds each trace id once: at 2M spans, it fits before the workers)
    got = p.plan(2_000_000, 900 * 2**20, 2, split=True, filtered=True)
    assert got.split and not got.split_beside
    assert p.plan(400_000, 700 * 2**20, 1, split=True).parts < p.SPLIT_MIN_PARTS  # not split: as it was


def test_a_split_that_does_not_fit_beside_the_workers_is_written_before_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``split_beside=False``: the store is split before the extraction (whose every partition
    then reads the files), not in a thread beside its first round; ``split_files=False``
    (``Plan.split``): not split at all, every partition read from the store."""
    import threading

    from hourglass.analysis import partitions, pipeline
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from tests.builders import TraceBuilder, spans_table

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    builders = []
    for i in range(12):
        b = TraceBuilder(service="frontend", base_ns=1_700_000_000_000_000_000 + i * 10**9)
        b.span("GET /", start_ms=0, dur_ms=5)
        builders.append(b)
    store.write(spans_table(builders))
    store.close()
    source = partitions.StoreSource(db)
    seen: list[tuple[str, object]] = []
    split_store = partitions.split_store

    def recorded(*args: object, **kwargs: object) -> object:
        seen.append(("split", threading.current_thread() is threading.main_thread()))
        return split_store(*args, **kwargs)  # type: ignore[arg-type]

    def extraction(
        source: partitions.Source, parts: int, *args: object, later: object = None, **_: object
    ) -> None:
        seen.append(("extraction", (type(source).__name__, later)))
        raise RuntimeError("stop here")

    monkeypatch.setattr(partitions, "split_store", recorded)
    monkeypatch.setattr(partitions, "run_extraction", extraction)
    for beside, files in ((True, True), (False, True), (False, False)):
        executor = partitions.ProcessExecutor(1)
        monkeypatch.setattr(executor, "warm", lambda: None)
        seen.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            pipeline.analyze_partitioned(
                source,
                4,
                executor,
                read_traces=lambda ids: source.load(0, 1),
                split_beside=beside,
                split_files=files,
            )
        for thread in threading.enumerate():  # the split's thread, the removal's
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join(20)
        if beside:  # (the split in a thread of its own, the extraction's first round from the store)
            got: dict[str, Any] = dict(seen)
            assert got["split"] is False and got["extraction"][0] == "StoreSource" and got["extraction"][1]
        elif files:
            assert seen == [("split", True), ("extraction", ("SplitSource", None))]
        else:
            assert seen == [("extraction", ("StoreSource", None))]


def test_a_run_started_to_ignore_sigterm_keeps_ignoring_it() -> None:
    """``nohup``-like starts ignore SIGTERM on purpose: the analysis' handler is not installed then."""
    from hourglass.cli.analyze import _terminate_as_interrupt

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with _terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


def _signalled_while_splitting(process: subprocess.Popen[str], tmp_path: Path, signum: int) -> str:
    """Sends ``signum`` to an ``analyze`` run once its split into partition files (in
    ``tmp_path``) is under way; its standard error once it ended."""
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("hourglass-partitions-*/p000007.arrow")):  # split under way
            assert process.poll() is None and time.monotonic() < deadline, "no partition files seen"
            time.sleep(0.01)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    return err


def _exemplar_run(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], list[list[str]]]:
    """(a store's report in 3 partitions on a worker process, its report at once, the reads of
    traces by id the partitioned run made, in order); without ``generated_at``."""
    from bench.analysis import generate_spans
    from hourglass.analysis import partitions, pipeline
    from hourglass.analysis.pipeline import analyze
    from hourglass.cli.analyze import _read_traces
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    store.write(generate_spans(6_000, seed=11))
    whole = analyze(store.scan(columns=ANALYSIS_COLUMNS, string_views=True), explain=True)
    store.close()
    reads: list[list[str]] = []

    def read_traces(trace_ids: list[str]) -> Any:
        reads.append(list(trace_ids))
        return _read_traces(db, trace_ids)

    executor = partitions.ProcessExecutor(1)
    try:
        report, _ = pipeline.analyze_partitioned(
            partitions.StoreSource(db), 3, executor, read_traces=read_traces, explain=True
        )
    finally:
        executor.close()
    report.pop("generated_at"), whole.pop("generated_at")
    return report, whole, reads


def test_the_exemplars_traces_come_from_the_read_beside_the_pricing(tmp_path: Path) -> None:
    """The report's exemplar traces are read with the services' traces, beside the pricing, in
    one read of the store (every finding's first exemplars are read then): no second read of
    the store for them after the report is made; the report is the same as at once."""
    report, whole, reads = _exemplar_run(tmp_path)
    exemplars = {t for r in report["recommendations"] for t in r["evidence"]["trace_ids"]}
    assert len(exemplars) > 1
    assert exemplars <= set(reads[0])  # read first, beside the pricing
    assert not [ids for ids in reads[1:] if exemplars <= set(ids)]  # and not read again
    assert report == whole


def test_exemplar_traces_beyond_what_is_held_together_are_read_one_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The exemplar traces held together for the texts are bounded by spans (traces of tens of
    thousands of spans each took the deciding process past its budget): with room for none, each
    design reads its exemplar alone, and the report is the same as at once, designs included."""
    from hourglass.analysis import planning

    monkeypatch.setattr(planning, "exemplar_spans", lambda spans, parts: 0)
    report, whole, reads = _exemplar_run(tmp_path)
    designs = [r for r in report["recommendations"] if (r.get("design") or {}).get("sequence")]
    assert designs, "no design drew an exemplar"
    alone = [ids for ids in reads if len(ids) == 1]
    assert {r["evidence"]["trace_ids"][0] for r in designs} <= {ids[0] for ids in alone}
    assert report == whole


def _big_traces(count: int, calls: int) -> Any:
    """``count`` traces of a request making ``calls`` queries one after another (an N+1 over a
    whole table), with fixed ids: which partition each falls in is the same in every run."""
    from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
    from tests.builders import TraceBuilder, spans_table

    builders = []
    for n in range(count):
        b = TraceBuilder(service="reports", trace_id=f"{0xB16 << 112 | n:032x}")
        root = b.span("GET /report", start_ms=0, dur_ms=calls + 5, kind=KIND_SERVER)
        for i in range(calls):
            b.span(
                "SELECT items",
                parent=root,
                start_ms=1 + i,
                dur_ms=0.9,
                kind=KIND_CLIENT,
                db_system="postgresql",
                db_statement="SELECT * FROM items WHERE id = ?",
            )
        builders.append(b)
    return spans_table(builders)


@pytest.mark.slow
def test_partitions_stay_within_the_plan_whatever_the_sizes_of_the_traces(tmp_path: Path) -> None:
    """A few traces of thousands of spans among small ones: by the hash of their ids some
    partitions of the planned count hold several, far more rows than a worker's room. The plan
    takes as many more partitions as it needs for its largest to fit (its rows those a read of
    that partition returns); ``analyze --db`` runs that plan, and its report is the same as at
    once."""
    from bench.analysis import generate_spans
    from hourglass.analysis import planning
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = tmp_path / "spans.duckdb"
    store = DuckDBSpanStore(str(db))
    try:
        store.write(generate_spans(100_000, seed=3))
        store.write(_big_traces(12, 8_000))
        spans = store.raw_row_count()
        budget = 480 * 2**20  # one worker, 6 partitions planned by the spans alone

        def largest(parts: int) -> int:
            return max(store.scan_partition(p, parts, columns=("trace_id",)).num_rows for p in range(parts))

        unbalanced = planning.plan(spans, budget, 2)
        room = planning.worker_room(spans, budget, unbalanced.workers)
        assert largest(unbalanced.parts) * planning.PEAK_BYTES_PER_SPAN > room  # (what the plan is for)
        balanced = planning.plan(spans, budget, 2, loads=planning.loads_of(*store.trace_sizes()))
        assert balanced.parts > unbalanced.parts and balanced.workers == unbalanced.workers
        assert balanced.largest_part == largest(balanced.parts)
        assert balanced.largest_part * planning.PEAK_BYTES_PER_SPAN <= room
    finally:
        store.close()
    said: list[str] = []
    report = _report(db, "--memory-budget", str(budget), stderr=said)
    assert f" in {balanced.parts} partitions of whole traces" in said[0], said[0]
    assert report == _report(db, "--partitions", "1")


def test_the_workers_started_before_the_analysis_is_imported_run_its_partitions(
    store: Path, whole: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``analyze --db`` starts the worker processes its plan needs from the store's span count
    alone, before it imports the analysis (``EarlyWorkers``); the run takes those workers (no
    second pool) and its report is the same as at once."""
    from hourglass.analysis import partitions, planning
    from hourglass.analysis.render import render
    from hourglass.cli.analyze import EarlyWorkers, StoreRun, analyze_store

    monkeypatch.setattr(planning, "PEAK_BYTES_PER_SPAN", 100_000)  # this small store in partitions
    run = StoreRun(budget=1536 * 2**20, workers=2)
    assert partitions.plan(20_000, run.budget, 2).parts > 1
    pools: list[object] = []
    original = partitions.worker_start.pool
    monkeypatch.setattr(
        partitions.worker_start, "pool", lambda n, *more: pools.append(more) or original(n, *more)
    )
    early = EarlyWorkers.start(str(store), run, since_ns=None, services=None)
    assert early is not None and early.workers == 2 and len(pools) == 1
    try:
        report = analyze_store(
            str(store), run, services=None, since_ns=None, writer=None, explain=True, early=early
        )
    finally:
        early.release()
    assert early.take(2) is None and len(pools) == 1  # taken by the run, which started no other pool
    # short-lived workers: polars' allocator keeps the pages it frees for reuse
    assert pools == [(partitions.worker_start.SHORT_LIVED_ALLOCATOR,)]
    got = json.loads(render({**report, "input_warnings": []}, "json"))
    got.pop("generated_at")
    assert got == {**whole, "input_warnings": []}
    # not a DuckDB file, or partitions given: nothing started early
    assert EarlyWorkers.start(str(store) + ".missing", run, since_ns=None, services=None) is None
    assert (
        EarlyWorkers.start(str(store), StoreRun(run.budget, 2, partitions=3), since_ns=None, services=None)
        is None
    )
    # a window that fits at once starts none either: planned on its own rows, not the store's
    since_ns = _newest_quarter_ns(store)
    window = _window_rows(store, since_ns)
    assert partitions.plan(window, run.budget, 2).parts == 1
    assert EarlyWorkers.start(str(store), run, since_ns=since_ns, services=None) is None


def test_a_store_another_process_reads_is_analysed_by_the_early_workers_plan(
    store: Path, whole: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run with early workers plans from what their read-only connection counted (the spans and
    the largest trace) and does not open the store again: the second, read-write open failed
    ("Could not set lock on file", exit 1) whenever another process had the file open, such as
    the workers of another ``analyze --db`` of the same store. A store with an ingest log (a
    crashed serve's) starts no early workers: the run's read-write open replays the log first."""
    from hourglass.analysis import planning
    from hourglass.analysis.render import render
    from hourglass.cli.analyze import EarlyWorkers, StoreRun, analyze_store

    monkeypatch.setattr(planning, "PEAK_BYTES_PER_SPAN", 100_000)  # this small store in partitions
    run = StoreRun(budget=1536 * 2**20, workers=2)
    reader = subprocess.Popen(  # another process with the store open (read-only, as a run's workers)
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1], read_only=True); "
            "print('open', flush=True); sys.stdin.read()",
            str(store),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "open"
        early = EarlyWorkers.start(str(store), run, since_ns=None, services=None)
        assert early is not None
        try:
            report = analyze_store(
                str(store), run, services=None, since_ns=None, writer=None, explain=True, early=early
            )
        finally:
            early.release()
    finally:
        assert reader.stdin is not None
        reader.stdin.close()
        reader.wait(30)
    got = json.loads(render({**report, "input_warnings": []}, "json"))
    got.pop("generated_at")
    assert got == {**whole, "input_warnings": []}
    logged = tmp_path / "logged.duckdb"
    logged.write_bytes(store.read_bytes())
    Path(f"{logged}.ingest-log").mkdir()
    assert EarlyWorkers.start(str(logged), run, since_ns=None, services=None) is None


def _wait_or_touch(path: str, part: int, parts: int) -> bool:
    """A task for the executor: partition 0 waits (up to 30 s) until ``path`` exists and says
    whether it did; any other touches ``path``."""
    if part:
        Path(path).touch()
        return True
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_calls_that_come_later_run_beside_the_first_round(tmp_path: Path) -> None:
    """The extraction's later partitions (read from the split once it is written) are queued as
    soon as the split is there, behind the first round, not after the whole first round: a
    worker done with its first partition goes on at once instead of idling until the slowest one
    of that round is done. Here the first round's partition 0 can only finish once a later
    partition has run, on the other worker."""
    from concurrent.futures import Future

    from hourglass.analysis import partitions

    marker, other = str(tmp_path / "later"), str(tmp_path / "first")
    split: Future[str] = Future()
    executor = partitions.ProcessExecutor(2)
    try:
        split.set_result(marker)
        results = executor.map(
            "extracting",
            _wait_or_touch,
            [(marker, 0, 3), (other, 1, 3)],
            None,
            (split, lambda path: [(path, 2, 3)], 1),
        )
    finally:
        executor.close()
    assert results == [True, True, True]


def _part_number(path: str, part: int, parts: int) -> int:
    return part


def test_a_worker_lost_as_the_later_calls_are_queued_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that dies while the split is written breaks the pool before its task's future
    fails: the later calls' submit then raises ``BrokenProcessPool`` itself. They stay pending and
    run on the new pool, as after any worker's death, instead of ending the run with a traceback
    (the submit's error was not caught)."""
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from hourglass.analysis import partitions

    executor = partitions.ProcessExecutor(2)
    ensure = executor._ensure
    raised: list[int] = []

    class BreaksOnce:
        def __init__(self, pool: Any) -> None:
            self.pool = pool

        def submit(self, fn: Any, *args: Any) -> Any:
            if args[1] == 2 and not raised:
                raised.append(args[1])
                raise BrokenProcessPool("a process in the process pool was terminated abruptly")
            return self.pool.submit(fn, *args)

    monkeypatch.setattr(executor, "_ensure", lambda: BreaksOnce(ensure()))
    split: Future[str] = Future()
    split.set_result(str(tmp_path))
    try:
        results = executor.map(
            "extracting",
            _part_number,
            [(str(tmp_path), 0, 3), (str(tmp_path), 1, 3)],
            None,
            (split, lambda path: [(path, 2, 3)], 1),
        )
    finally:
        executor.close()
    assert raised == [2]
    assert results == [0, 1, 2]


def _killed_on_part_one(folder: str, part: int, parts: int) -> int:
    """A task whose worker is killed (SIGKILL, as the out-of-memory killer does) on partition 1:
    the first time only when ``folder`` is given a marker, else every time."""
    marker = Path(folder) / "died-once"
    if part == 1 and not (marker.exists() and marker.read_text() == "once"):
        if marker.exists():
            marker.write_text("once")
        os.kill(os.getpid(), signal.SIGKILL)
    return part


def test_a_worker_killed_mid_task_is_said_once_and_its_partition_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker process that dies (here SIGKILL) is retried once, and the user is told so in one
    line naming the signal and what is run again; a second death ends the run naming the
    partition and the signal, not a bare "terminated abruptly". The calls the dead worker may
    have been running are run one at a time, so the one named is the one that kills its worker:
    before, every call lost with it was charged, and the run could fail naming an innocent call
    queued behind it (here partition 3, which never ran)."""
    from hourglass.analysis import partitions

    (tmp_path / "died-once").write_text("")
    calls = [(str(tmp_path), p, 3) for p in range(3)]
    executor = partitions.ProcessExecutor(1)
    try:
        with caplog.at_level("WARNING", logger="hourglass.analysis.partitions"):
            assert executor.map("extracting", _killed_on_part_one, list(calls), None) == [0, 1, 2]
    finally:
        executor.close()
    warned = [r.getMessage() for r in caplog.records if r.name == "hourglass.analysis.partitions"]
    assert len(warned) == 1, warned
    said = re.fullmatch(
        r"extracting: worker process \d+ was killed by SIGKILL \(out of memory, or killed\); "
        r"partitions? ([-\d, and]+) of 3 retried once(, one at a time \(the worker was running one of them\))?",
        warned[0],
    )
    assert said is not None, warned[0]
    # (one worker: the call queued behind the one it ran may have been taken from the queue too)
    assert said[1] in ("2", "2-3"), warned[0]
    assert partitions.numbered_parts([5, 0, 2, 3, 7, 6], 28) == "partitions 1, 3-4 and 6-8 of 28"
    (tmp_path / "died-once").unlink()  # now it dies every time
    executor = partitions.ProcessExecutor(1)
    try:
        with pytest.raises(
            partitions.PartitionError,
            match=r"extracting of partition 2/3 failed twice: worker process \d+ was killed by SIGKILL",
        ):
            executor.map("extracting", _killed_on_part_one, list(calls), None)
    finally:
        executor.close()


def test_ctrl_c_during_a_query_of_the_store_ends_as_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (or SIGTERM) while DuckDB runs one of the command's queries (the store's size, its
    largest trace: the first seconds of a 5M-span run) ends the run as an interrupt anywhere else
    does: exit 130, no traceback. DuckDB takes the KeyboardInterrupt and raises its own
    ``RuntimeError('Query interrupted')`` instead, which the command reported as a crash (exit 1,
    the traceback on the terminal)."""
    from typer.testing import CliRunner

    from bench.analysis import generate_spans
    from hourglass.cli import app
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    path = tmp_path / "spans.duckdb"
    written = DuckDBSpanStore(str(path))
    written.write(generate_spans(2_000, seed=3))
    written.close()

    def interrupted(self: DuckDBSpanStore) -> int:
        raise RuntimeError("Query interrupted")  # what duckdb 2.0 raises on SIGINT during a query

    monkeypatch.setattr(DuckDBSpanStore, "raw_row_count", interrupted)
    result = CliRunner().invoke(app, ["analyze", "--db", str(path), "--format", "json", "--workers", "1"])
    assert result.exit_code == 130, (result.output, result.exception)
    assert "Traceback" not in result.output
    monkeypatch.undo()
    other = RuntimeError("Query failed")  # any other error stays an error
    monkeypatch.setattr(DuckDBSpanStore, "raw_row_count", lambda self: (_ for _ in ()).throw(other))
    result = CliRunner().invoke(app, ["analyze", "--db", str(path), "--format", "json", "--workers", "1"])
    assert result.exit_code != 130 and result.exception is other


def test_a_cluster_without_workers_says_the_run_waits_for_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A scheduler that answers but has no worker (none started yet, all gone) leaves the run's
    tasks waiting, with nothing to show on the progress bar: the command says so at once rather
    than seem hung. (Dask's tasks do wait for a worker to connect; the run goes on then.)"""
    import logging

    from hourglass.analysis import partitions

    with (
        start_dask_cluster(tmp_path / "dask", workers=0) as address,
        caplog.at_level(logging.WARNING, logger="hourglass.analysis.partitions"),
    ):
        partitions.DaskExecutor(address).close()
    said = [r.getMessage() for r in caplog.records]
    assert any(f"the Dask cluster at {address} has no workers yet" in line for line in said), said


@linux_only
@pytest.mark.parametrize("moment", ["as they start", "while they work"])
def test_the_workers_end_when_the_command_is_killed(store: Path, tmp_path: Path, moment: str) -> None:
    """``analyze --db`` killed with SIGKILL cannot stop its worker processes: they end by
    themselves within seconds (before, they waited on their pool's queue for ever), whether the
    parent died before a worker had set its watch (as they start) or after (while they work)."""
    command = [str(HOURGLASS), "analyze", "--db", str(store), "--format", "json", "--partitions", "8"]
    process = subprocess.Popen(
        [*command, "--workers", "2"],
        cwd=ROOT,
        env={**ENV, "TMPDIR": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(workers) < 2:
            assert process.poll() is None and time.monotonic() < deadline, "no worker processes seen"
            workers = spawned(process.pid)
            time.sleep(0.01)
        if moment == "while they work":
            while not list(tmp_path.glob("hourglass-partitions-*/p000007.arrow")):  # split under way
                assert process.poll() is None and time.monotonic() < deadline, "no partition files seen"
                time.sleep(0.01)
        process.kill()
    finally:
        process.kill()
        process.wait()
    assert not left_running(workers, within=5.0)


def _limited_report(store: Path, soft: int, hard: int, *args: str) -> tuple[dict[str, Any], str]:
    """The JSON report of ``analyze --db`` run with an open-files limit of ``soft`` (``hard``), and
    its standard error."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    result = subprocess.run(
        [str(HOURGLASS), "analyze", "--db", str(store), "--format", "json", "--explain", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**ENV, "HOURGLASS_MEMORY_LOG": "1"},
        preexec_fn=limit,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    report.pop("generated_at")
    return report, result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX limits")
def test_a_split_of_more_files_than_the_open_files_limit_raises_it_or_says_so(
    store: Path, whole: dict[str, Any]
) -> None:
    """The split writes every partition's file at once. Above the soft open-files limit it failed
    with "Too many open files" and the run read the whole store for every partition and pass.
    Now the soft limit is raised toward the hard one; when the hard one is too low too,
    ``--partitions`` is lowered to what fits, in one line; below the split's minimum, the
    partitions are read from the store, also said in one line. The report is the same."""
    raised, said = _limited_report(store, 64, 4096, "--partitions", "20")  # (64 < ~17 held + 20 + 48)
    assert raised == whole
    assert "store split into 20 partition files" in said and "failed" not in said, said
    capped, said = _limited_report(store, 80, 80, "--partitions", "30")
    assert capped == whole
    lines = [line for line in said.splitlines() if line.startswith("hourglass analyze:")]
    assert "30 partition files open at once are more than this process may open" in lines[0], said
    parts = int(lines[0].rsplit(": ", 1)[1].split()[0])
    assert 4 <= parts < 30 and f"in {parts} partitions" in lines[1], said
    assert f"store split into {parts} partition files" in said and "failed" not in said, said
    unsplit, said = _limited_report(store, 40, 40, "--partitions", "8")
    assert unsplit == whole
    assert "each partition is read from the store instead" in said and "store split" not in said, said
    assert "failed" not in said, said


@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal")
def test_the_progress_bar_shows_every_phase_on_a_terminal(
    store: Path, whole: dict[str, Any], tmp_path: Path
) -> None:
    """On a terminal the bar (on stderr) shows each phase as it runs: after the extraction it
    stayed at "N/N" through the decision, the pricing and the report (seconds of silence at 5M
    spans); now the detectors decided are counted and each step after the pricing has its row.
    The report written to a file is the same; without a terminal there is no bar."""
    import pty
    import re
    import threading

    out = tmp_path / "report.json"
    command = [str(HOURGLASS), "analyze", "--db", str(store), "--format", "json", "--explain"]
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [*command, "--partitions", "4", "--workers", "1", "-o", str(out)],
        cwd=ROOT,
        env={**ENV, "TERM": "xterm-256color", "COLUMNS": "120"},
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # (the terminal closed: the command ended)
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert process.wait(timeout=240) == 0
        reader.join(30)
    finally:
        process.kill()
        os.close(master)
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode("utf-8", "replace"))
    report = json.loads(out.read_text())
    report.pop("generated_at")
    assert report == whole
    kinds = re.findall(r"deciding detectors\s.*?(\d+)/(\d+)", shown)
    assert kinds and kinds[-1][0] == kinds[-1][1] and int(kinds[-1][1]) >= 6, shown[-3000:]
    for step in [
        "extracting partitions",
        "pricing partitions",
        "scoring the findings",
        "making the report",
        "writing the recommendations' texts",
        "planning the workstreams",
    ]:
        assert step in shown, (step, shown[-3000:])
    said: list[str] = []
    _report(store, "--partitions", "4", "--workers", "1", stderr=said)
    assert "deciding" not in said[0] and "extracting partitions" not in said[0], said
