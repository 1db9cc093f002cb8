"""`hourglass analyze`: ranked recommendations from trace files or from the store, no server needed.

    hourglass analyze traces.jsonl jaeger.json           # files alone: no --db, no server
    hourglass analyze --db hourglass.duckdb --since 2h   # the store
    hourglass analyze --service checkout --format markdown > findings.md

``--since`` takes a duration (``90s``, ``15m``, ``2h``, ``7d``) or an ISO 8601 time
(``2026-11-27T12:00:00Z``); whole traces with a span starting at or after it are analysed.
``--service`` (repeatable) keeps whole traces that touch the service. ``--explain`` adds the near
misses — every candidate a detector formed and then dropped, with the rule and the measured value —
to every format (``near_misses`` in JSON; a section after the recommendations in markdown and table).

Bad records in files are reported on stderr as ``FILE:POSITION: reason`` — a kind of problem met
many times as one line with its count and first positions (``--verbose``: every one) — and skipped;
the good data beside them is still analysed and the report printed, with the same summary under
``input_warnings`` in ``--format json``. Exit codes: 0 — everything read and analysed;
2 — the report was printed but input was skipped, or the command line was wrong (a missing file,
a bad ``--since``); 1 — the store could not be opened; 3 — ``--fail-on`` matched a recommendation
(the CI gate; rules and severities in ``hourglass.analysis.gate``; takes precedence over 2).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NamedTuple

import typer

from hourglass.api.settings import Settings, parse_bytes
from hourglass.cli._app import app
from hourglass.cli._options import option
from hourglass.cli._options import since_ns as since_option_ns
from hourglass.settings import ANALYZE, default

if TYPE_CHECKING:  # (imported where used: a run on a store imports them after its workers start)
    import pyarrow as pa

    from hourglass.collector.problem_summary import ProblemSummary

EXIT_OK, EXIT_STORE, EXIT_INPUT = 0, 1, 2


class OutputFormat(StrEnum):
    json = "json"
    markdown = "markdown"
    table = "table"


def _fail(message: str, code: int = EXIT_INPUT, command: str = "analyze") -> typer.Exit:
    typer.echo(f"hourglass {command}: {message}", err=True)
    return typer.Exit(code)


def read_files(
    paths: list[Path],
    command: str = "analyze",
    *,
    verbose: bool = False,
    summary: ProblemSummary | None = None,
) -> tuple[pa.Table, int]:
    """Every span in the files. Problems are printed (prefixed with the ``command`` name) as one line
    per kind of problem per file, with a count and the first positions (``verbose``: every problem,
    as ``FILE:POSITION: reason``); ``summary`` collects them (the report's ``input_warnings``).
    Spans whose parent span is in none of the files are one warning per file. Returns (table, number of
    problems that skipped data)."""
    read = _read_files(paths, command, verbose=verbose, summary=summary)
    assert read.table is not None
    return read.table, read.problems


@dataclass
class FileSpans:
    """The spans of trace files: in memory (``table``), or, for an input larger than the memory
    budget holds at once, in a temporary DuckDB store (``store``, in ``folder``: :meth:`remove`)."""

    problems: int
    table: pa.Table | None = None
    store: str | None = None
    folder: str | None = None
    spans: int = 0

    def remove(self) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)


# What ``hourglass analyze FILE...`` writes to its temporary store at a time, and the DuckDB memory
# of the missing-parent check's anti-join over the rows' origins (it spills beyond it)
FILE_STORE_WRITE_ROWS = 250_000
FILE_ORIGINS_MEMORY_LIMIT = "256MB"


def _read_files(
    paths: list[Path],
    command: str = "analyze",
    *,
    verbose: bool = False,
    summary: ProblemSummary | None = None,
    at_once_spans: int | None = None,
    on_spill: Callable[[int], None] | None = None,
) -> FileSpans:
    """:func:`read_files`; with ``at_once_spans``, an input of more spans is written, as it is
    read, to a temporary DuckDB store instead of held (``on_spill(spans read so far)`` is called
    once, when that starts): the spans read so far, then every table as the reader streams it,
    and beside them each span's file, trace, span and parent ids for the missing-parent warnings
    (an anti-join in DuckDB). Memory then holds a write's batch, not the input."""
    import pyarrow as pa

    from hourglass.collector.files import FileProblem, TraceFileReader, expand_path_origins
    from hourglass.collector.problem_summary import ProblemSummary, note_missing_parents
    from hourglass.collector.schema import empty_span_table

    for path in paths:
        if not path.exists():
            raise _fail(f"{path}: no such file", command=command)
    problems = 0
    collected = summary if summary is not None else ProblemSummary()

    def on_error(problem: FileProblem) -> None:
        nonlocal problems
        if problem.skipped:
            problems += 1
        collected.add_problem(problem)
        if verbose:
            typer.echo(f"hourglass {command}: {problem}", err=True)

    reader = TraceFileReader(on_problem=on_error)
    per_file: list[tuple[str, list[pa.Table]]] = []
    spilled: _FileStore | None = None
    spans = 0
    try:
        for source, (path, from_folder) in enumerate(expand_path_origins([str(p) for p in paths])):
            file_tables: list[pa.Table] = []
            for table in reader.read_file(path, from_folder=from_folder):
                if not table.num_rows:
                    continue
                spans += table.num_rows
                if spilled is not None:
                    spilled.add(source, table)
                    continue
                file_tables.append(table)
                if at_once_spans is not None and spans > at_once_spans:
                    if on_spill is not None:
                        on_spill(spans)
                    spilled = _FileStore()
                    for held_source, (_, tables) in enumerate([*per_file, ("", file_tables)]):
                        for held in tables:
                            spilled.add(held_source, held)
                    per_file, file_tables = [(name, []) for name, _ in per_file], []
            per_file.append((reader.reports[-1].file, file_tables))
        names = [name for name, _ in per_file]
        if spilled is not None:
            spilled.missing_parents(collected, names)
        else:
            # spans whose parent is in none of the files: kept (repair makes them roots), told once per file
            note_missing_parents(collected, per_file)
        for kind in collected.kinds():
            if not (verbose and kind.count == 1):  # verbose: a lone problem is already printed
                typer.echo(f"hourglass {command}: {kind.line(verbose_hint=not verbose)}", err=True)
        if spilled is not None:
            spilled.close()
            return FileSpans(problems, store=spilled.path, folder=spilled.folder, spans=spans)
    except BaseException:
        if spilled is not None:
            spilled.close()
            spilled.remove()
        raise
    tables = [t for _, file_tables in per_file for t in file_tables]
    table = pa.concat_tables(tables) if tables else empty_span_table()
    return FileSpans(problems, table=table, spans=spans)


class _FileStore:
    """The temporary DuckDB store of :func:`_read_files` (``spans.duckdb`` in a folder of
    ``$TMPDIR``), with the rows' origins beside it: (source, trace_id, span_id, parent_span_id) in a
    Parquet file per write, which the missing-parent check reads. (They were a DuckDB table: its
    inserts, anti-join and checkpoint took 1.3 s of a 1M-span file, the Parquet files 0.6 s.)"""

    def __init__(self) -> None:
        from hourglass.analysis import scratch
        from hourglass.collector.duckdb_store import DuckDBSpanStore

        self.folder = scratch.make("files")  # (swept by a later run if this process is killed)
        self.path = os.path.join(self.folder, "spans.duckdb")
        self.store = DuckDBSpanStore(self.path)
        self.origins = os.path.join(self.folder, "origins")
        os.mkdir(self.origins)
        self.origin_files = 0
        self.pending: list[tuple[int, pa.Table]] = []
        self.pending_rows = 0
        self.closed = False

    def add(self, source: int, table: pa.Table) -> None:
        self.pending.append((source, table))
        self.pending_rows += table.num_rows
        if self.pending_rows >= FILE_STORE_WRITE_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        tables = [t for _, t in self.pending]
        self.store.write(pa.concat_tables(tables) if len(tables) > 1 else tables[0])
        ids = pa.concat_tables(
            [
                t.select(["trace_id", "span_id", "parent_span_id"]).append_column(
                    "source", pa.array([source] * t.num_rows, pa.int32())
                )
                for source, t in self.pending
            ]
        )
        pq.write_table(ids, os.path.join(self.origins, f"{self.origin_files:06d}.parquet"))
        self.origin_files += 1
        self.pending, self.pending_rows = [], 0

    def missing_parents(self, summary: ProblemSummary, names: list[str]) -> None:
        import duckdb

        from hourglass.collector.duckdb_store import quiet
        from hourglass.collector.problem_summary import note_missing_parents_in

        self._flush()
        if not self.origin_files:
            return
        with quiet(duckdb.connect()) as db:
            db.execute(f"SET memory_limit = '{FILE_ORIGINS_MEMORY_LIMIT}'")
            db.execute("SET threads TO 1")
            db.execute("SET temp_directory = ?", [os.path.join(self.folder, "origins.tmp")])
            db.read_parquet(os.path.join(self.origins, "*.parquet")).create_view("origins")
            note_missing_parents_in(summary, names, db)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._flush()
        self.store.close()

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass(frozen=True)
class StoreRun:
    """How a store analysis may run: its memory budget, worker processes, a Dask scheduler."""

    budget: int
    workers: int
    cluster: str | None = None
    partitions: int = 0  # 0: from the budget
    spill_buckets: int = 0  # 0: from the budget


def analyze_store(
    path: str,
    run: StoreRun,
    *,
    services: list[str] | None,
    since_ns: int | None,
    writer: Any,
    explain: bool,
    early: EarlyWorkers | None = None,
    command: str = "analyze",
) -> dict[str, Any]:
    """The report of a store: at once when it fits the memory budget, else in partitions of
    whole traces (:func:`hourglass.analysis.pipeline.analyze_partitioned`) in worker processes or on the
    Dask cluster, with a progress bar on a terminal. ``early``: worker processes started before
    the analysis was imported (:class:`EarlyWorkers`), which the run takes when its plan has as
    many. ``command``: the one that asks (its name starts a refusal's line)."""
    import gc

    from hourglass.analysis import partitions
    from hourglass.analysis.pipeline import analyze
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    gc.freeze()  # (as a worker does after its imports: ``worker_start.start``)

    def partitioned(plan: Any) -> dict[str, Any]:  # (``run`` as it is then: one worker for chdb)
        return _run_partitions(
            path,
            run,
            plan,
            services=services,
            since_ns=since_ns,
            writer=writer,
            explain=explain,
            early=early,
            command=command,
        )[0]

    counted = early.counted if early is not None else None
    if counted is not None:  # the early workers' plan: the store is not opened again
        return partitioned(
            _store_plan(
                path,
                run,
                counted.spans,
                lambda: counted.largest,
                since_ns,
                services,
                command,
                loads=counted.loads,
                stored=counted.stored,
            ),
        )
    store = open_store_for_analysis(path, command)
    try:
        stored = store.raw_row_count()
        spans = _window_rows(store, since_ns, services, stored)
        if spans == 0 and services:
            _tell_unknown_services(store, services, command)
        if path.startswith("chdb:"):  # one process at a time opens an embedded ClickHouse
            run = StoreRun(run.budget, 1, run.cluster, run.partitions, run.spill_buckets)
        try:
            if run.partitions or run.cluster is None:
                plan = _local_plan(store, path, run, spans, since_ns, services, command, stored=stored)
            else:  # the cluster's workers hold the partitions; this process decides, by buckets
                local = partitions.plan(spans, run.budget, 1)
                plan = partitions.Plan(spans, max(2, local.parts), 0, local.buckets)
        except partitions.BudgetError as exc:
            fitting = functools.partial(_fitting_window, store, run, stored, services)
            raise _fail(_refusal(exc, since_ns, services, command, fitting), command=command) from None
        if plan.parts == 1 and run.cluster is None:
            from hourglass.analysis.resources import attach_store_resources

            if early is not None:  # (analysed in this process: no workers held beside it)
                early.release()

            # the services' languages ride along in the table's metadata (for the designs' pseudocode)
            # string views: polars takes the strings as they are, without a copy
            table = attach_store_resources(
                store.scan(since_ns=since_ns, services=services, columns=ANALYSIS_COLUMNS, string_views=True),
                store,
            )
            store.close()
            return analyze(table, writer=writer, services=services, since_ns=since_ns, explain=explain)
    finally:
        store.close()
    return partitioned(plan)


def _tell_unknown_services(store: Any, services: list[str], command: str) -> None:
    """One line when ``--service`` names a service the store does not hold: its empty report
    would otherwise read as a clean one (a typo, another casing). Names the services it holds."""
    held = getattr(store, "services", None)
    if held is None:
        return
    names = [str(n) for n in held()]
    unknown = [s for s in services if s not in names]
    if not unknown:
        return
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    typer.echo(
        f"hourglass {command}: no service {', '.join(map(repr, unknown))} in the store; "
        f"it holds {shown or 'no spans'}",
        err=True,
    )


def _window_rows(store: Any, since_ns: int | None, services: list[str] | None, stored: int) -> int:
    """The span rows of the window of ``store`` (of ``stored`` rows) that the filters
    ``since_ns`` and ``services`` select: every row of each trace with a span that matches them
    (``window_rows``; ``stored`` without a filter, or from a store that cannot count them)."""
    rows = getattr(store, "window_rows", None)
    if (since_ns is None and not services) or rows is None:
        return stored
    return int(rows(since_ns=since_ns, services=services or None))


def _local_plan(
    store: Any,
    path: str,
    run: StoreRun,
    spans: int,
    since_ns: int | None,
    services: list[str] | None,
    command: str = "analyze",
    stored: int | None = None,
) -> Any:
    """The plan of a run of this machine over the open ``store``'s window of ``spans`` spans
    (those the filters ``since_ns`` and ``services`` select, of its ``stored`` rows): in
    ``--partitions`` when given (on as many workers, at most), else :func:`_store_plan`'s. An
    embedded ClickHouse is read and analysed in this one process, its engine's read of a partition
    held beside the partition's analysis: planned as two processes holding a partition each, run
    in one (measured at 1M spans: planned as one, 2 partitions, 1.68 GiB under a 1.5 GiB budget)."""
    from dataclasses import replace

    from hourglass.analysis import partitions

    if run.partitions:
        buckets = partitions.plan(spans, run.budget, run.workers).buckets
        return partitions.Plan(spans, run.partitions, min(run.workers, run.partitions), buckets)
    largest_of = getattr(store, "largest_trace", None)
    sizes = getattr(store, "trace_sizes", None)
    filters = {"since_ns": since_ns, "services": services or None}  # (as ``_window_rows`` counts)

    def largest() -> tuple[str, int] | None:
        return largest_of(**filters) if largest_of is not None else None

    loads = None
    if sizes is not None:  # (its partitions' rows: the store read once, when there are several)
        from hourglass.analysis.planning import PartitionLoads, loads_of

        read: list[PartitionLoads] = []

        def loads(counts: list[int]) -> dict[int, int]:
            if not read:
                read.append(loads_of(*sizes(**filters)))
            return read[0](counts)

    if path.startswith("chdb:"):
        # (at once too: the read's copy beside the analysis; planned as one, 250k spans peaked
        # at 1.31 GiB under a 0.78 GiB budget)
        planned = _store_plan(
            path,
            replace(run, workers=2),
            spans,
            largest,
            since_ns,
            services,
            command,
            copies=2,
            loads=loads,
            stored=stored,
            store=store,
        )
        return replace(planned, workers=1) if planned.parts > 1 else planned
    return _store_plan(
        path, run, spans, largest, since_ns, services, command, loads=loads, stored=stored, store=store
    )


def _store_plan(
    path: str,
    run: StoreRun,
    spans: int,
    largest_trace: Callable[[], tuple[str, int] | None],
    since_ns: int | None,
    services: list[str] | None,
    command: str = "analyze",
    copies: int = 1,
    loads: Callable[[list[int]], dict[int, int]] | None = None,
    stored: int | None = None,
    store: Any = None,
) -> Any:
    """The memory plan of a run of this machine over the window of ``spans`` spans (those the
    filters ``since_ns`` and ``services`` select) of the store at ``path`` of ``stored`` rows:
    with the store split into partition files where the split's memory fits, and partitions no
    smaller than its largest trace (``largest_trace()``, asked only when there are several) and
    no larger than planned whatever its traces' sizes (``loads``: ``planning.PartitionLoads``);
    ``copies`` 2: at once, the spans held twice (``planning.plan``). A refusal offers the largest
    window of the newest traces that fits, when the open ``store`` is given to say it."""
    from hourglass.analysis import partitions

    split = partitions.splits(partitions.StoreSource(path), partitions.SPLIT_MIN_PARTS)
    filtered = since_ns is not None or bool(services)
    try:
        plan = partitions.plan(
            spans, run.budget, run.workers, split=split, filtered=filtered, copies=copies, stored=stored
        )
        if plan.parts > 1:  # the largest trace bounds how small a partition can be
            plan = partitions.plan(
                spans,
                run.budget,
                run.workers,
                largest_trace(),
                split=split,
                filtered=filtered,
                copies=copies,
                loads=loads,
                stored=stored,
            )
    except partitions.BudgetError as exc:
        fitting = (
            None
            if store is None
            else functools.partial(_fitting_window, store, run, stored, services, copies)
        )
        raise _fail(_refusal(exc, since_ns, services, command, fitting), command=command) from None
    return plan


# the commands that take ``--since`` and ``--service`` (diff does not), ``--memory-budget`` (the
# others read HOURGLASS_MEMORY_BUDGET only) and ``--workers``
_WINDOWED = ("analyze", "report", "whatif")
_BUDGETED = ("analyze",)
_WORKERS = ("analyze", "whatif")


def _refusal(
    exc: Exception,
    since_ns: int | None,
    services: list[str] | None,
    command: str,
    fitting: Callable[[], tuple[int, int] | None] | None = None,
) -> str:
    """A plan's refusal (``planning.BudgetError``, which names ``analyze``'s flags) for
    ``command``'s line: the settings it takes instead of the flags it lacks (diff and report have
    neither ``--memory-budget`` nor ``--workers``); a refusal of the spans of the whole store or
    of a window, which a smaller window may not have, offers ``fitting()`` where the command takes
    the filters (:func:`_fitting_window`: the ``--since`` of the largest window of the newest
    traces that fits, and its spans; asked only then: it reads the store, ~1 s at 10M spans),
    else names the filters."""
    message = str(exc)
    if command not in _BUDGETED:
        message = message.replace("--memory-budget", "HOURGLASS_MEMORY_BUDGET")
    if command not in _WORKERS:
        message = message.replace("--workers", "HOURGLASS_WORKERS")
    if command not in _WINDOWED or "cannot hold the" not in message:
        return message
    whole = since_ns is None and not services
    offered = fitting() if fitting is not None else None
    if offered is not None:
        from hourglass.settings import iso_ns

        since, spans = offered
        window = "a window of it" if since_ns is None else "a shorter window"
        same = " with the same --service" if services else ""
        message += f", or analyse {window}: --since {iso_ns(since)}{same} holds its newest {spans:,} spans, which fit"
    elif whole:
        message += ", or analyse a window of it (--since 6h, --service S)"
    return message


def _fitting_window(
    store: Any, run: StoreRun, stored: int | None, services: list[str] | None, copies: int = 1
) -> tuple[int, int] | None:
    """(the ``--since``, in ns, and the span rows) of the largest window of ``store``'s newest
    traces (of ``services``, where given) whose analysis ``run``'s memory budget holds: what a
    refused run offers instead of a guess (a staging store weeks old, refused whole). None when
    no window fits (not even its newest trace's), or the store cannot say (``newest_window``).
    The most span rows a plan accepts with partitions no smaller than a worker is worth
    (``MIN_WORKER_BYTES`` of room: at the edge of a budget, a window is planned in thousands of
    partitions of a few traces each) are searched (plans are arithmetic, and hold fewer spans in
    less memory); the store then finds the earliest ``--since`` whose window holds no more."""
    from hourglass.analysis import planning

    newest = getattr(store, "newest_window", None)
    rows = getattr(store, "window_rows", None)
    if newest is None or rows is None or not stored:
        return None

    # (the store's largest trace, of the services: no smaller than any window's)
    largest_of = getattr(store, "largest_trace", None)
    largest = largest_of(services=services or None) if largest_of is not None else None

    def fits(spans: int) -> bool:  # in partitions worth a worker's base (not thousands of tiny ones)
        try:
            chosen = planning.plan(spans, run.budget, run.workers, largest, copies=copies)
        except planning.BudgetError:
            return False
        room = planning.worker_room(spans, run.budget, max(1, chosen.workers))
        return chosen.parts == 1 or room >= planning.MIN_WORKER_BYTES

    low, high = 0, stored
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    since = newest(low, services or None) if low else None
    if since is None:
        return None
    since = -(-since // 1000) * 1000  # (to the microsecond ``iso_ns`` writes: up, a window no larger)
    spans = int(rows(since_ns=since, services=services or None))
    return (since, spans) if spans else None


def store_findings(
    path: str, run: StoreRun, since_ns: int | None, command: str, kinds: frozenset[str] | None = None
) -> dict[str, Any]:
    """Every finding of the store's window (``since_ns``) by id, decided as ``analyze`` decides
    them, in partitions of whole traces (what-if's recommendation changes over a window one
    context cannot hold: a detector run on one partition decides over its traces only). With
    ``kinds``, those detectors' findings only, as decided before the pricing
    (``pipeline.findings_partitioned``; a finding's occurrences do not depend on it): also those
    the scoring then leaves out of the report (a saving below its floor), as a window asked at
    once finds them (``whatif_query.detector_lookup``)."""
    from hourglass.analysis import partitions

    if path.startswith("chdb:"):  # one process at a time opens an embedded ClickHouse
        run = StoreRun(run.budget, 1, run.cluster, run.partitions, run.spill_buckets)
    store = open_store_for_analysis(path, command)
    try:
        stored = store.raw_row_count()
        spans = _window_rows(store, since_ns, None, stored)
        plan = _local_plan(store, path, run, spans, since_ns, None, command, stored=stored)
    except partitions.BudgetError as exc:
        fitting = functools.partial(_fitting_window, store, run, stored, None)
        raise _fail(_refusal(exc, since_ns, None, command, fitting), command=command) from None
    finally:
        store.close()
    if kinds is not None and run.cluster is None:
        from hourglass.analysis.detectors import PARTS

        known = frozenset(k for k in kinds if k in PARTS)  # (an id of no detector: no finding)
        if not known:
            return {}
        return {f.id: f for f in _findings_in_partitions(path, run, plan, since_ns, known, command)}
    _, ranked = _run_partitions(
        path,
        run,
        plan,
        services=None,
        since_ns=since_ns,
        writer=None,
        explain=False,
        early=None,
        command=command,
    )
    return {scored.finding.id: scored.finding for scored in ranked}


def _findings_in_partitions(
    path: str, run: StoreRun, plan: Any, since_ns: int | None, kinds: frozenset[str], command: str
) -> list[Any]:
    """:func:`store_findings` of ``kinds`` on this machine: ``plan``'s partitions extracted by
    those detectors only and decided (``pipeline.findings_partitioned``), with a progress bar."""
    from hourglass.analysis import partitions
    from hourglass.analysis.pipeline import findings_partitioned

    source = partitions.StoreSource(path, since_ns)
    if plan.split and partitions.splits(source, plan.parts):
        plan = _within_open_files(plan, chosen=bool(run.partitions))
    executor = _executor(run, plan, in_process=path.startswith("chdb:"))
    typer.echo(
        f"hourglass {command}: the findings of {', '.join(sorted(kinds))}: {plan.describe(run.budget)}",
        err=True,
    )
    try:
        with _progress_bar() as progress:
            return findings_partitioned(
                source,
                plan.parts,
                executor,
                kinds,
                progress=progress,
                spill_buckets=plan.buckets,
                decide_beside=plan.beside,
                split_beside=plan.split_beside,
                split_files=plan.split,
            )
    except partitions.PartitionError as exc:
        raise _fail(str(exc), code=EXIT_STORE, command=command) from None
    finally:
        executor.close()


def _run_partitions(
    path: str,
    run: StoreRun,
    plan: Any,
    *,
    services: list[str] | None,
    since_ns: int | None,
    writer: Any,
    explain: bool,
    early: EarlyWorkers | None,
    command: str = "analyze",
) -> tuple[dict[str, Any], list[Any]]:
    """:func:`analyze_store`'s run of ``plan``, in partitions of whole traces: the report and the
    ranked findings."""
    from hourglass.analysis import partitions
    from hourglass.analysis.pipeline import analyze_partitioned

    spans = plan.spans
    source = partitions.StoreSource(path, since_ns, tuple(services) if services else None)
    if run.spill_buckets:
        plan = partitions.Plan(
            spans,
            plan.parts,
            plan.workers,
            run.spill_buckets,
            plan.warm,
            plan.keep,
            split_beside=plan.split_beside,
            split=plan.split,
        )
    if run.cluster is None and plan.split and partitions.splits(source, plan.parts):
        plan = _within_open_files(plan, chosen=bool(run.partitions))
    executor = _executor(run, plan, in_process=path.startswith("chdb:"), early=early)
    described = plan.describe(run.budget)
    if run.cluster is not None:  # the workers' rows are spilled here (partitions.DaskExecutor)
        plan = partitions.Plan(spans, plan.parts, executor.workers, plan.buckets)
        shared = partitions.splits(source, plan.parts) and executor.sees(tempfile.gettempdir())
        if shared:  # its workers read this machine's files: the store is split once, as for local workers
            plan = _within_open_files(plan, chosen=bool(run.partitions))
        described = plan.describe(run.budget, run.cluster, executor.connected)
        if shared and plan.split:
            described += (
                "; its workers read this machine's files: the store is split into a file per partition"
            )
    typer.echo(f"hourglass {command}: {described}", err=True)
    try:
        with _progress_bar() as progress:
            report, ranked = analyze_partitioned(
                source,
                plan.parts,
                executor,
                read_traces=lambda trace_ids: _read_traces(path, trace_ids),
                writer=writer,
                explain=explain,
                progress=progress,
                spill_buckets=plan.buckets,
                decide_beside=plan.beside,
                split_beside=plan.split_beside,
                split_files=plan.split,
            )
    except partitions.PartitionError as exc:
        raise _fail(str(exc), code=EXIT_STORE, command=command) from None
    finally:
        executor.close()
    return report, ranked


def _within_open_files(plan: Any, *, chosen: bool) -> Any:
    """``plan``, whose store is split into a file per partition, all open at once while it is
    written: this process' open-files limit raised toward its hard limit when they need it
    (``partitions.room_for_open_files``); when even that is too few, one line, and partitions
    ``--partitions`` asked for (``chosen``) are as many as fit, else (the memory budget's, which
    fewer would not hold) the split is not made and each partition is read from the store. Before,
    the split failed with "Too many open files" and the run read the store for every partition
    and pass, saying only that the split failed."""
    from dataclasses import replace

    from hourglass.analysis import partitions

    room = partitions.room_for_open_files(plan.parts)
    if room >= plan.parts:
        return plan
    limit = partitions.open_files_limit()
    too_many = (
        f"{plan.parts} partition files open at once are more than this process may open "
        f"(ulimit -n {limit}, its hard limit too)"
    )
    if chosen and room >= partitions.SPLIT_MIN_PARTS:
        typer.echo(f"hourglass analyze: {too_many}: {room} partitions instead", err=True)
        return replace(plan, parts=room, workers=min(plan.workers, room))
    typer.echo(
        f"hourglass analyze: {too_many}: each partition is read from the store instead "
        "(slower; raise the limit to split the store once)",
        err=True,
    )
    return replace(plan, split=False, split_beside=False)


def _executor(
    run: StoreRun, plan: Any, *, in_process: bool = False, early: EarlyWorkers | None = None
) -> Any:
    """The Dask cluster, else worker processes — one at least, so this process, which decides,
    holds the extracted rows and never a partition's spans (the memory plan counts on it); in
    this process only for an embedded ClickHouse (``in_process``), which one process opens at a
    time."""
    from hourglass.analysis import partitions, worker_start

    if run.cluster is not None:
        try:
            return partitions.DaskExecutor(run.cluster)
        except partitions.ClusterError as exc:
            raise _fail(str(exc), code=EXIT_STORE) from None
    if in_process:
        return partitions.SerialExecutor()
    workers = max(1, plan.workers)
    started = early.take(workers) if early is not None else None
    if early is not None and started is None:  # (another number: not held beside this run's)
        early.release()
    return partitions.ProcessExecutor(
        workers,
        warm=plan.warm,
        keep=plan.keep,
        started=started,
        # (short-lived: they end with the run)
        allocator=worker_start.SHORT_LIVED_ALLOCATOR,
    )


class Counted(NamedTuple):
    """What a run's plan reads of a store (:class:`EarlyWorkers`): the span rows of the window it
    analyses, its largest trace, its partitions' loads (``planning.PartitionLoads``) and the
    store's rows (more than the window's under a ``--since`` or ``--service`` filter)."""

    spans: int
    largest: tuple[str, int] | None
    loads: Callable[[list[int]], dict[int, int]] | None
    stored: int


class EarlyWorkers:
    """The worker processes of a run on a DuckDB file, started before this process imports the
    analysis (polars, the detectors, the pipeline: ~0.4 s of CPU, which a run spent before it
    started its workers, one core idle): the store's span count is read with DuckDB alone and the
    memory plan (:mod:`hourglass.analysis.planning`, which imports nothing heavy) says whether the
    run needs worker processes and how many. The run takes them (:meth:`take`) when its own plan
    has as many; else they are stopped (:meth:`release`).

    ``counted``: the window's span count and its largest trace (what the run's plan needs), read
    by the same read-only connection while the workers start, so the run does not open the store
    again (None: not read, the run opens the store as without early workers). Before, the run
    opened it a second time, read-write: besides the second count (~0.03 s of this process' CPU
    before its plan), that open failed ("Could not set lock on file") whenever another process
    had the file open, such as the workers of another ``analyze --db`` of the same store."""

    def __init__(self, workers: int, started: tuple[Any, list[Any]], counted: Counted | None = None) -> None:
        self.workers = workers
        self._started: tuple[Any, list[Any]] | None = started
        self.counted = counted

    @classmethod
    def start(
        cls, path: str, run: StoreRun, *, since_ns: int | None, services: list[str] | None
    ) -> EarlyWorkers | None:
        """The workers of ``run`` on the store at ``path``, starting, planned on the rows of the
        window the filters ``since_ns`` and ``services`` select; None when it is not a DuckDB
        file of this machine, has no partitions to run in workers, cannot be read now (the run
        then opens it as it did and says why) or has an ingest log to replay (a crashed
        ``serve``'s: the run's read-write open replays it before anything reads the store)."""
        from hourglass.analysis import planning, worker_start
        from hourglass.collector.window_sql import (
            LARGEST_TRACE_SQL,
            TRACE_SIZES_SQL,
            WINDOW_ROWS_SQL,
            window_where,
        )

        if run.cluster is not None or run.partitions or not _is_duckdb_file(path) or not os.path.isfile(path):
            return None
        if os.path.exists(f"{path}.ingest-log"):  # (``DuckDBSpanStore``'s log beside the file)
            return None
        try:
            import duckdb

            connection = duckdb.connect(path, read_only=True)
            # (as ``duckdb_store.quiet``, not imported yet: it imports pyarrow)
            connection.execute("SET enable_progress_bar = false")
        except Exception:  # (not a store, held by a writer: the run says it)
            return None
        try:
            where, params = window_where(since_ns=since_ns, services=services)
            try:
                # (the rows ``raw_row_count`` counts: a store opened afresh has none staged; and
                # those of the window, as ``DuckDBSpanStore.window_rows`` counts them)
                stored = int(connection.execute("SELECT count(*) FROM spans").fetchall()[0][0])
                spans = stored
                if where:
                    spans = int(
                        connection.execute(WINDOW_ROWS_SQL.format(where=where), params).fetchall()[0][0]
                    )
                chosen = planning.plan(
                    spans, run.budget, run.workers, split=True, filtered=bool(where), stored=stored
                )
            except Exception:  # (not a store, a budget too small, interrupted: the run says it)
                return None
            if chosen.parts <= 1:
                return None
            workers = max(1, chosen.workers)
            early = cls(workers, worker_start.started(workers, worker_start.SHORT_LIVED_ALLOCATOR))
            from hourglass.collector.duckdb_store import query_interrupted

            try:  # (while the workers start) what ``DuckDBSpanStore.largest_trace`` and ``trace_sizes`` read
                largest = connection.execute(LARGEST_TRACE_SQL.format(where=where), params).fetchall()
                sizes = connection.execute(TRACE_SIZES_SQL.format(where=where), params).fetchnumpy()
            except Exception as exc:
                if query_interrupted(exc):  # Ctrl-C: the run ends, its workers stopped
                    early.release()
                    raise KeyboardInterrupt from None
                return early  # (the run opens the store and reads it again)
            early.counted = Counted(
                spans,
                (str(largest[0][0]), int(largest[0][1])) if largest else None,
                planning.loads_of(sizes["h"], sizes["n"]),
                stored,
            )
            return early
        finally:
            connection.close()

    def take(self, workers: int) -> tuple[Any, list[Any]] | None:
        """The started pool and its start-up tasks, for a run of ``workers`` worker processes (None:
        another number, or taken already)."""
        if self._started is None or workers != self.workers:
            return None
        started, self._started = self._started, None
        return started

    def release(self) -> None:
        """Stops the workers at once unless a run took them (terminated, as an interrupted run's)."""
        if self._started is not None:
            from hourglass.analysis import worker_start

            pool, self._started = self._started[0], None
            worker_start.stop(pool)


def _read_traces(path: str, trace_ids: list[str]) -> pa.Table:
    from hourglass.analysis.partitions import open_for_reading
    from hourglass.collector.schema import SPAN_COLUMNS

    store = open_for_reading(path)
    try:
        table: pa.Table = store.scan(trace_ids=trace_ids, columns=SPAN_COLUMNS)
        return table
    finally:
        store.close()


# what the bar says of a phase (``partitions.Progress``'s first argument) counted in these units;
# a phase with a total of 0 is a step of its own, with no count (its bar pulses while it runs)
_PHASE_TEXTS = {
    "extracting": "extracting partitions",
    "deciding": "deciding detectors",
    "pricing": "pricing partitions",
    "pricing workstreams": "pricing the workstreams' partitions",
    "asking": "asking partitions",  # (whatif, critical-path: ``whatif_query.ASKING``)
}


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress bar on stderr when it is a terminal: a row per phase of the run, as it starts —
    the partitions extracted, the detectors decided, the partitions priced, then the steps after
    them (scoring, the report, its texts, the workstreams) — each with its time; a row stays when
    its phase is done (the bar is removed at the end)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, Task, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Count(MofNCompleteColumn):
        """done/total for a counted phase; nothing for a step."""

        def render(self, task: Task) -> Text:
            return super().render(task) if task.fields.get("counted") else Text("")

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        Count(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        redirect_stdout=False,  # (the report goes to stdout: never through the bar)
    ) as bar:
        current: list[tuple[str, Any, bool]] = []  # (phase, its row, counted)

        def update(phase: str, done: int, total: int) -> None:
            if not current or current[-1][0] != phase:  # a new phase: the step before it is done
                if current and not current[-1][2]:
                    bar.update(current[-1][1], total=1, completed=1)
                counted = total > 0
                text = _PHASE_TEXTS.get(phase, phase) if counted else phase
                row = bar.add_task(text, total=total if counted else None, counted=counted)
                current.append((phase, row, counted))
            if current[-1][2]:
                bar.update(current[-1][1], completed=done, total=total)

        yield update


def read_store(path: str, *, services: list[str] | None, since_ns: int | None) -> pa.Table:
    """Every span of the store's selected traces, at once (commands that need them all)."""
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    store = open_store_for_analysis(path)
    try:
        table: pa.Table = store.scan(since_ns=since_ns, services=services, columns=ANALYSIS_COLUMNS)
        return table
    finally:
        store.close()


def open_store_for_analysis(path: str, command: str = "analyze") -> Any:
    """The store at ``path``, or the ``command``'s one-line error (exit 1; a missing file: 2)."""
    from hourglass.collector.backends import open_store
    from hourglass.collector.store import StoreError, local_path, redact

    local = local_path(path)
    if local is not None and local != ":memory:" and not Path(local).exists():
        raise _fail(
            f"{path}: no such store (import traces with `hourglass import`, or give trace files)",
            command=command,
        )
    try:
        return open_store(path)
    except StoreError as exc:
        raise _fail(str(exc), code=EXIT_STORE, command=command) from exc
    except Exception as exc:  # duckdb raises IOException when a running server holds the file
        from hourglass.api.store_errors import store_open_problem

        raise _fail(store_open_problem(redact(path), exc), code=EXIT_STORE, command=command) from None


def exit_code(report: dict[str, Any], input_problems: int) -> int:
    """The command's exit status (one place, so options such as --fail-on can extend it)."""
    return EXIT_INPUT if input_problems else EXIT_OK


def _sweep_leftovers() -> None:
    """The temporary folders of runs whose process was killed outright (the out-of-memory killer:
    a file analysis' temporary store, a split copy of a store) removed in a thread of its own
    (:func:`hourglass.analysis.scratch.sweep`), beside the run, without a word: the run's output
    stays the same whatever was left. A daemon: what it leaves half-removed the next run removes."""
    from hourglass.analysis import scratch

    threading.Thread(target=scratch.sweep, name="hourglass-sweep", daemon=True).start()


@app.command("analyze")
def analyze_command(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Trace files to analyse (OTLP JSON/JSONL/protobuf, Jaeger, Zipkin); no server needed"
        ),
    ] = None,
    db: Annotated[str | None, option("db", ANALYZE)] = None,
    service: Annotated[
        list[str] | None, typer.Option("--service", help="Only traces touching this service (repeatable)")
    ] = None,
    since: Annotated[str | None, option("since", ANALYZE)] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="json, markdown (for pull requests) or table")
    ] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout")
    ] = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="Also list the near misses: candidates seen and dropped, with the rule and the measured value",
        ),
    ] = False,
    memory_budget: Annotated[str | None, option("memory_budget", ANALYZE)] = None,
    partitions: Annotated[int, option("partitions", ANALYZE)] = default("partitions"),
    workers: Annotated[int | None, option("workers", ANALYZE)] = None,
    cluster: Annotated[str | None, option("cluster", ANALYZE)] = None,
    spill_buckets: Annotated[
        int,
        typer.Option(
            "--spill-buckets",
            hidden=True,
            help="Spill the extracted rows that grow with spans to this many buckets (default 0: as the "
            "memory budget needs); for tests",
        ),
    ] = 0,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Print every input problem, not one line per kind of problem"),
    ] = False,
    fail_on: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-on",
            help="CI gate: exit 3 when a recommendation matches a kind, a category, a severity "
            "(low|medium|high: that or worse) or 'any'; comma-separated or repeated",
        ),
    ] = None,
) -> None:
    """Find serialized calls, N+1, lock contention, fan-out problems and fault-tolerance gaps."""
    settings = Settings()
    since_ns = since_option_ns("analyze", since)
    gate_spec = None
    if fail_on:
        from hourglass.analysis.gate import GateSpec, GateSpecError

        try:
            gate_spec = GateSpec.parse(fail_on)
        except GateSpecError as exc:
            raise _fail(str(exc)) from None
    problems = 0
    if files and db is not None:
        raise _fail("give trace files or --db, not both (files are analysed without a store)")
    budget = settings.memory_budget
    if memory_budget is not None:
        try:
            budget = parse_bytes(memory_budget)
        except ValueError as exc:
            raise _fail(f"--memory-budget {exc}") from None
    if workers is not None and workers < 0:
        raise _fail("--workers must be 0 (one per core) or more")
    if partitions < 0:
        raise _fail("--partitions must be 0 (from the memory budget) or more")
    if spill_buckets < 0:
        raise _fail("--spill-buckets must be 0 (from the memory budget) or more")
    run = StoreRun(
        budget=budget,
        workers=(workers if workers is not None else settings.workers) or os.cpu_count() or 1,
        cluster=cluster or settings.cluster,
        partitions=partitions,
        spill_buckets=spill_buckets,
    )
    # SIGTERM ends a store's run as Ctrl-C does (its temporary files removed, its workers
    # stopped) from before its workers start: a worker started and then left by a parent killed
    # while importing would wait on its pool's queue for ever
    guard = contextlib.ExitStack()
    # (files too: a large input is written to a temporary store, removed on the way out)
    guard.enter_context(_terminate_as_interrupt())
    _sweep_leftovers()
    spilled = False
    early: EarlyWorkers | None = None
    try:
        # a store analysed in worker processes: they start now, while this process imports the
        # analysis (~0.4 s of CPU), instead of after it
        early = (
            None
            if files
            else EarlyWorkers.start(db or settings.db, run, since_ns=since_ns, services=service or None)
        )
        from hourglass.analysis.pipeline import analyze
        from hourglass.analysis.render import render
        from hourglass.analysis.writers import select_writer
        from hourglass.collector.problem_summary import ProblemSummary

        input_problems = ProblemSummary()
        writer = select_writer(settings)
        if files:
            read = _read_files(
                list(files),
                verbose=verbose,
                summary=input_problems,
                at_once_spans=_at_once_spans(run),
                on_spill=lambda spans: _tell_spill(run),
            )
            problems = read.problems
            if read.table is not None:
                report = analyze(
                    read.table, writer=writer, services=service, since_ns=since_ns, explain=explain
                )
            else:
                spilled = True
                try:
                    assert read.store is not None
                    # run on this machine: a cluster's workers do not reach the temporary store
                    local = StoreRun(run.budget, run.workers, None, run.partitions, run.spill_buckets)
                    report = analyze_store(
                        read.store, local, services=service, since_ns=since_ns, writer=writer, explain=explain
                    )
                finally:
                    read.remove()
        else:
            report = analyze_store(
                db or settings.db,
                run,
                services=service,
                since_ns=since_ns,
                writer=writer,
                explain=explain,
                early=early,
            )
    except Exception as exc:
        from hourglass.collector.duckdb_store import query_interrupted

        if not files and query_interrupted(exc):  # Ctrl-C (or SIGTERM) during a query of the store
            raise KeyboardInterrupt from None  # (exit 130, no traceback, as anywhere else in the run)
        raise
    finally:
        try:
            if early is not None:  # (not taken by the run: stopped)
                early.release()
        finally:
            guard.close()
    ends_at_once = spilled or (not files and run.cluster is None and _is_duckdb_file(db or settings.db))
    # additive to hourglass.report/v1: the problems met in the input files, one entry per kind
    report["input_warnings"] = input_problems.as_json()
    text = render(report, output_format.value)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)
    code = exit_code(report, problems)
    if gate_spec is not None:
        from hourglass.analysis.gate import GATE_EXIT_CODE, gate, gate_lines

        matches = gate(report, gate_spec)
        for line in gate_lines(matches, ",".join(fail_on or [])):
            typer.echo(line, err=True)
        if matches:
            code = GATE_EXIT_CODE
    if ends_at_once:
        _end_at_once(code)
    if code:
        raise typer.Exit(code)


def _at_once_spans(run: StoreRun) -> int:
    """The most spans of trace files ``hourglass analyze`` analyses at once, in memory, under the
    run's memory budget (as a store's plan of one partition); a larger input goes through a
    temporary store and partitions of whole traces. ``--partitions`` 2 or more: none at once."""
    from hourglass.analysis.planning import at_once_spans

    return 0 if run.partitions > 1 else at_once_spans(run.budget)


def _tell_spill(run: StoreRun, command: str = "analyze") -> None:
    import tempfile

    reason = (
        f"--partitions {run.partitions}"
        if run.partitions > 1
        else f"more than the {_at_once_spans(run):,} spans the {run.budget / 2**30:.2f} GiB memory budget "
        "analyses at once"
    )
    typer.echo(
        f"hourglass {command}: the files are written to a temporary span store in {tempfile.gettempdir()} "
        f"as they are read ({reason}) and analysed in partitions of whole traces",
        err=True,
    )


END_JOIN_S = 30.0  # the run's own threads (the partition files' removal) end well within this


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager, ``timeout``, ``kill``) ends the run as Ctrl-C does: a
    KeyboardInterrupt, so the run's temporary folders (the split, the kept partitions) are
    removed and its worker processes stopped instead of left behind. Only in the main thread
    (where signal handlers run); the previous handler is restored after."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # (started to ignore it: kept so)
    ):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_duckdb_file(path: str) -> bool:
    from hourglass.collector.store import local_path

    return local_path(path) == path and path != ":memory:" and not path.startswith("chdb:")


def _end_at_once(code: int) -> None:
    """The end of ``analyze --db`` over a DuckDB file once its report is written: the threads
    still running joined (the partition files' removal), the logs and the output flushed, then
    the process ends without the interpreter's teardown of the analysis' objects and modules —
    ~0.3 s after a 1M-span run, in which nothing is written: the store was opened read-only and
    is closed, the worker processes are stopped. A thread still alive after ``END_JOIN_S`` (not the
    run's own: a pool some code left open) makes it return, and the interpreter ends as usual; so
    does a coverage run (its exit hook must run)."""
    import logging
    import threading
    import time

    if os.environ.get("COVERAGE_PROCESS_START"):
        return
    deadline = time.monotonic() + END_JOIN_S
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():  # not the run's own: the interpreter's usual end instead
                return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or its reader gone
            stream.flush()
    os._exit(code)
