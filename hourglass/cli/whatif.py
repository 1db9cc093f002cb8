"""`hourglass whatif` and `hourglass critical-path`: ask the traces a question, no server needed.

    hourglass whatif --db hourglass.duckdb --speedup pricing:GET /price=0.5
    hourglass whatif traces.jsonl --recommendation lock_contention-1a2b3c4d5e6f7a8b
    hourglass whatif --parallelize "frontend:GET /checkout" --operation "GET /checkout"
    hourglass whatif --cap "search:fanout=8" --format json
    hourglass critical-path --service ledger --operation "POST /accounts/{account_id}/transfers"

``whatif`` re-times every trace (or those whose root is ``--service``/``--operation``) as if the
changes were made, with the engine that prices the recommendations (:mod:`hourglass.analysis.whatif_query`),
and prints the root latency before and after per endpoint. ``critical-path`` aggregates an
endpoint's critical path over its traces (:mod:`hourglass.analysis.endpoint_path`); without ``--service`` and
``--operation`` it lists the endpoints. A window of more spans than one context holds within the
memory budget (or ``--partitions N``) is asked in partitions of whole traces, one at a time (trace
files through a temporary store, as ``analyze`` reads them): the same answer. Exit codes: 0 — answered; 2 — bad input (the message says
which flag and why) or skipped records in files; 1 — the store could not be opened.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from hourglass.analysis.planning import ENDPOINT_MAX_TRACES, at_once_spans, few_parts_spans
from hourglass.api.settings import Settings
from hourglass.cli._app import app
from hourglass.cli._options import option
from hourglass.cli._options import since_ns as since_option_ns
from hourglass.cli.analyze import (
    EXIT_STORE,
    _progress_bar,
    _read_files,
    _terminate_as_interrupt,
    open_store_for_analysis,
    read_store,
)
from hourglass.settings import CRITICAL_PATH, WHATIF

T = TypeVar("T")

EXIT_INPUT = 2


class QueryFormat(StrEnum):
    json = "json"
    table = "table"


def _fail(command: str, message: str, code: int = EXIT_INPUT) -> typer.Exit:
    typer.echo(f"hourglass {command}: {message}", err=True)
    return typer.Exit(code)


@dataclass
class _Window:
    """A store's window of more spans than one context holds within the memory budget: asked in
    ``parts`` partitions of whole traces, one context at a time (``contexts(part, parts)``)."""

    path: str
    since_ns: int | None
    parts: int
    contexts: Callable[[int, int], Any]
    chosen: int = 0  # --partitions (0: the memory budget's)
    remove: Callable[[], None] | None = None  # the temporary store of trace files, removed after
    split: Any = None  # the window's partition files (``_SplitOnFirstRead``), removed after
    workers: int = 1  # worker processes the partitions are asked in (1: this process, in turn)
    runner: Any = None  # their ``partitions.ProcessExecutor``, once started (``asking``)
    told: str = ""  # the plan's line, said when the partitions are asked (``asking``)
    cores: int = 1  # the worker processes asked for (--workers: 0 resolved), the findings' run's
    holds: str = ""  # what the window holds, said of a question asked otherwise
    spans: int = 0  # the span rows of the window

    def asking(
        self, progress: Callable[[str, int, int], None] | None
    ) -> tuple[Callable[[int, int], Any], Any, Any]:
        """(``load(part, parts)``, runner, ``trace_parts``) to ask the partitions with: this
        process' contexts in turn, or, on 2+ ``workers``, their worker processes (started now,
        while this one splits the window into partition files, which each task then reads
        itself), with where each trace is (``partitions.trace_parts_of``)."""
        if self.told:
            typer.echo(self.told, err=True)
        if self.workers < 2:
            return self.contexts, None, None
        from functools import partial

        from hourglass.analysis.partitions import ProcessExecutor, trace_parts_of
        from hourglass.analysis.planning import PROCESS_BASE_BYTES
        from hourglass.analysis.whatif_query import SourceContexts
        from hourglass.analysis.worker_start import SHORT_LIVED_ALLOCATOR

        self.runner = ProcessExecutor(self.workers, warm=False, allocator=SHORT_LIVED_ALLOCATOR)
        self.runner.warm()
        if progress:
            progress("reading the window into partition files", 0, 0)
        # the split's room: the budget less this process' base and the starting workers'
        source = self.split.source_for(self.parts, self.workers * PROCESS_BASE_BYTES)
        return SourceContexts(source, self.since_ns), self.runner, partial(trace_parts_of, source)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        if self.split is not None:
            self.split.remove()
        if self.remove is not None:
            self.remove()


def _context(
    command: str,
    files: list[Path] | None,
    db: str | None,
    since: str | None,
    partitions: int = 0,
    workers: int = 0,
) -> tuple[Any, int]:
    """(AnalysisContext of the files or the store — a :class:`_Window` of the store when its
    window is larger than one context holds within the memory budget —, number of skipped records)."""
    since_ns = since_option_ns(command, since)
    if files and db is not None:
        raise _fail(command, "give trace files or --db, not both")
    problems = 0
    # the question holds every span of its window in memory at once (~2 KB a span at its peak):
    # files larger than the memory budget holds are refused before they are held; a store's window
    # that large is asked in partitions of whole traces, one at a time
    settings = Settings()
    most = at_once_spans(settings.memory_budget)
    workers = _workers(workers or settings.workers)
    if files:
        # files of more spans than one context holds are written, as they are read, to a
        # temporary span store (as `analyze` does), which is asked in partitions and removed after
        read = _read_files(
            list(files),
            command,
            at_once_spans=0 if partitions > 1 else most,
            on_spill=lambda spans: typer.echo(
                f"hourglass {command}: the files are written to a temporary span store in "
                f"{tempfile.gettempdir()} as they are read (more spans than one context holds)",
                err=True,
            ),
        )
        problems = read.problems
        if read.store is not None:
            try:
                window = _window(
                    command,
                    read.store,
                    since_ns,
                    read.spans,
                    settings.memory_budget,
                    partitions,
                    "the files hold",
                    workers,
                )
            except BaseException:
                read.remove()
                raise
            window.remove = read.remove
            return window, problems
        assert read.table is not None
        table = read.table
    else:
        path = db or settings.db
        store = open_store_for_analysis(path, command)
        try:
            count = getattr(store, "window_rows", None)  # (every row of the window's traces: what is read)
            spans = int(count(since_ns=since_ns)) if callable(count) else int(store.raw_row_count())
        finally:
            store.close()
        if spans * _read_copies(path) > most or partitions > 1:
            return (
                _window(command, path, since_ns, spans, settings.memory_budget, partitions, workers=workers),
                problems,
            )
        table = read_store(path, services=None, since_ns=since_ns)
    from hourglass.analysis.context import AnalysisContext, to_analysis_frame
    from hourglass.analysis.pipeline import select_traces

    frame = select_traces(to_analysis_frame(table), since_ns=since_ns)
    return AnalysisContext.from_table(frame), problems


def _window(
    command: str,
    path: str,
    since_ns: int | None,
    spans: int,
    budget: int,
    partitions: int = 0,
    holds: str | None = None,
    workers: int = 1,
    trace_ids: list[str] | None = None,
) -> _Window:
    """The window ``since_ns`` of the store at ``path`` (``spans`` span rows) asked in partitions
    of whole traces, as many as ``partitions`` or the ``budget`` needs, on up to ``workers``
    worker processes. ``trace_ids``: only those traces of it (``spans``: theirs), read whole and
    split into partition files of their own, the window selected from them as they are read."""
    from hourglass.analysis.partitions import StoreSource
    from hourglass.analysis.planning import BudgetError, question_plan, question_workers
    from hourglass.analysis.whatif_query import partition_contexts

    what = "the store" if since_ns is None else "the window"
    holds = holds or f"{what} holds"
    if trace_ids is not None:
        what = "those traces"  # (what a failed split names)
    # an embedded ClickHouse store is opened by one process at a time: asked in this one
    copies = _read_copies(path)
    large = (
        f"hourglass {command}: {holds} {spans:,} spans, more than one context holds under the "
        f"{budget / 2**30:.2f} GiB memory budget"
    )
    cores = workers
    if partitions > 1:
        parts = partitions
        workers = 1 if copies > 1 else question_workers(spans, parts, budget, workers)
        told = f"hourglass {command}: {what} asked in {parts} partitions of whole traces{_on(workers)}"
    else:
        try:
            parts, workers = question_plan(spans, budget, workers, copies)
        except BudgetError as exc:
            raise _fail(command, f"{exc}: raise HOURGLASS_MEMORY_BUDGET") from None
        told = f"{large}: asked in {parts} partitions of whole traces{_on(workers)}"
    source = (
        StoreSource(path, since_ns)
        if trace_ids is None
        else StoreSource(path, trace_ids=tuple(trace_ids))  # (whole: the window selected as read)
    )
    split = _SplitOnFirstRead(command, what, source, spans, budget)
    return _Window(
        path,
        since_ns,
        parts,
        partition_contexts(split.load, since_ns),
        partitions,
        split=split,
        workers=workers,
        told=told,
        holds=large,
        cores=cores,
        spans=spans,
    )


def _workers(chosen: int) -> int:
    """Worker processes for a question's partitions: ``chosen`` (--workers, HOURGLASS_WORKERS),
    or 0: one per core."""
    from hourglass.settings import usable_cores

    return chosen if chosen > 0 else usable_cores()


def _on(workers: int) -> str:
    return f" on {workers} worker processes" if workers > 1 else ""


class _SplitOnFirstRead:
    """A DuckDB file's window read once into a file per partition (``partitions.split_store``, as
    `analyze` does) when its first partition is asked for, not the whole store scanned for each
    partition (the reads grew with the square of the window); after the recommendations' findings,
    which `analyze`'s own run reads and splits. Scanned instead when the split does not fit
    (``partitions.question_split_refused``) or fails."""

    def __init__(self, command: str, what: str, source: Any, spans: int, budget: int) -> None:
        self.command, self.what, self.source, self.spans, self.budget = command, what, source, spans, budget
        self.split: Any = None
        self.tried = False

    def load(self, part: int, parts: int) -> Any:
        return self.source_for(parts).load(part, parts)

    def source_for(self, parts: int, held: int = 0) -> Any:
        """Where the partitions are read from: the window's partition files, split now when it
        was not tried yet (in a process of ``held`` bytes over its own base: the workers'
        bases), else the store (``partitions.StoreSource``, which each read scans). Pickles."""
        if not self.tried:
            self.tried = True
            self.split = self._split(parts, held)
        return self.split if self.split is not None else self.source

    def _split(self, parts: int, held: int = 0) -> Any:
        from hourglass.analysis.partitions import question_split_refused, split_store
        from hourglass.analysis.planning import PROCESS_BASE_BYTES

        # (an endpoint's traces: their ids are the split's join, not the window's, so its memory
        # is an unfiltered split's, as serve plans it)
        filtered = self.source.since_ns is not None
        free = self.budget - PROCESS_BASE_BYTES - held
        refused = question_split_refused(self.spans, parts, free, filtered, None)
        if refused is not None:
            return None
        try:
            return split_store(self.source, parts)  # (None: a ClickHouse store)
        except Exception as exc:  # (a full disk: the scans instead)
            typer.echo(
                f"hourglass {self.command}: splitting {self.what} into partition files failed ({exc}); "
                "each partition is read from the store",
                err=True,
            )
            return None

    def remove(self) -> None:
        if self.split is not None:
            self.split.remove()


def _large_window(
    db: str | None,
    since: str | None,
    command: str,
    method: str,
    ask: Callable[[Any, int | None, int, int], T],
) -> tuple[tuple[str, int | None, int, int], T] | None:
    """((the store's path, the window's since_ns, its span rows, the read's copies), ``ask(the
    store's ``method``, since_ns, copies, span rows)``) of a store whose window is too large for
    one context under the memory budget; None when it fits at once or the store has no such
    method (a store without the method)."""
    since_ns = since_option_ns(command, since)
    settings = Settings()
    path = db or settings.db
    store = open_store_for_analysis(path, command)
    try:
        count, answer = getattr(store, "window_rows", None), getattr(store, method, None)
        if not callable(count) or not callable(answer):
            return None
        window = int(count(since_ns=since_ns))
        copies = _read_copies(path)
        if window * copies <= at_once_spans(settings.memory_budget):
            return None
        return (path, since_ns, window, copies), ask(answer, since_ns, copies, window)
    finally:
        store.close()


def _endpoint_path(
    db: str | None, since: str | None, service: str, operation: str, workers: int = 0
) -> tuple[dict[str, Any] | None, Any] | None:
    """(the critical path of (service, operation), None) over a store's window too large for one
    context, decided over the traces with a span of that endpoint only instead of every span of
    the window: read by their ids, at once or in a few partitions
    (``whatif_query.endpoint_path_of_traces``); more of them, up to three quarters of the
    window, split into partition files of their own and asked as a window is, on ``workers``
    (:func:`_path_of_split_traces`). (None, None) when none of them is rooted there (then no
    trace of the window is); (None, the window's endpoints) when they are too many to be worth
    it but the store's rows show no trace is rooted there (:func:`_rooted_nowhere`); None when
    the window fits at once, the store cannot name those traces (a store without the method) or they are
    too many (and one may be rooted there)."""
    command = "critical-path"
    settings = Settings()

    def named(find: Any, since_ns: int | None, copies: int, window: int) -> Any:
        most = few_parts_spans(settings.memory_budget, copies)
        # (an embedded ClickHouse store is not split: a few partitions only)
        return find(
            service,
            operation,
            since_ns,
            max(most, window * 3 // 4) if copies == 1 else most,
            ENDPOINT_MAX_TRACES,
        )

    large = _large_window(db, since, command, "endpoint_trace_ids", named)
    if large is None:
        return None
    (path, since_ns, window, copies), found = large
    if found is None:  # (a non-root operation of most traces: refused without a pass)
        listing = _rooted_nowhere(command, path, since_ns, copies, service, operation)
        if listing is None:
            return None
        _say_counted_by_roots(command, since_ns, window, int(listing["traces"].sum()))
        return None, listing
    ids, spans = found
    if spans > few_parts_spans(settings.memory_budget, copies):
        split = _path_of_split_traces(path, since_ns, ids, spans, service, operation, workers)
        return None if split is None else (split[0], None)
    from hourglass.analysis.partitions import StoreSource
    from hourglass.analysis.whatif_query import endpoint_path_of_traces

    source = StoreSource(path)  # (the whole traces: the window is selected from them as read)
    asked = endpoint_path_of_traces(
        source.load, ids, spans, settings.memory_budget, service, operation, since_ns, copies
    )
    if asked is None or asked[0] is None:
        return None if asked is None else (None, None)
    what = "the store" if since_ns is None else "the window"
    typer.echo(
        f"hourglass {command}: {what} holds {window:,} spans, more than one context holds under the "
        f"{settings.memory_budget / 2**30:.2f} GiB memory budget: asked over the {len(ids):,} traces "
        f"with a span {service}:{operation} ({spans:,} spans)",
        err=True,
    )
    return asked[0], None


def _rooted_nowhere(
    command: str, path: str, since_ns: int | None, copies: int, service: str | None, operation: str | None
) -> Any:
    """The endpoints of the store's window (:func:`_listing_of_roots`) when none of its traces is
    rooted at ``service``/``operation`` (either None: any), for a refusal without a pass over
    every span; None when one may be (a span of it without a parent: the common case, one
    query), or the store cannot say (a store without the method; too many traces of no plain root)."""
    store = open_store_for_analysis(path, command)
    try:
        has_span, roots_of = getattr(store, "has_span", None), getattr(store, "window_roots", None)
        if not callable(has_span) or not callable(roots_of):
            return None
        if has_span(service, operation, since_ns, parentless=True):
            return None
        # (none of its spans is a plain root: only a trace of no plain root, read, can be rooted there)
        roots = roots_of(since_ns)
    finally:
        store.close()
    listing = _listing_of_roots(path, roots, since_ns, copies)
    from hourglass.analysis.whatif_query import rooted_nowhere

    return listing if listing is not None and rooted_nowhere(listing, service, operation) else None


def _path_of_split_traces(
    path: str,
    since_ns: int | None,
    ids: list[str],
    spans: int,
    service: str,
    operation: str,
    workers: int,
) -> tuple[dict[str, Any] | None] | None:
    """(the endpoint's critical path,) over its traces ``ids`` (``spans`` span rows: more than a
    few partitions hold, less than the window), asked from a split of their own
    (:func:`_window_of_traces`), as serve asks them (``QueryEngine._path_of_split_traces``);
    None when they are not split: the window's partitions answer. Measured on a 7.2M-span
    store, the path of an endpoint of 58 % of its spans: 22 partitions of its traces instead of
    the window's 38."""
    holds = f"the {len(ids):,} traces with a span {service}:{operation} hold"
    window = _window_of_traces("critical-path", path, since_ns, ids, spans, workers, holds)
    if window is None:
        return None
    return (_paths_of_window(window, service, operation)[1],)


def _window_of_traces(
    command: str, path: str, since_ns: int | None, ids: list[str], spans: int, workers: int, holds: str
) -> _Window | None:
    """The traces ``ids`` of the window ``since_ns`` of the store at ``path`` (``spans`` span
    rows: more than a few partitions hold) as a :class:`_Window` of their own: split by one read
    of the store into partition files, asked on up to ``workers`` worker processes (0: the
    settings'), the window selected from the whole traces as they are read. None when the split
    would not happen (no room beside the workers, too few partitions, no disk:
    ``partitions.question_split_refused``) or the plan refuses: the window's partitions answer."""
    from hourglass.analysis.partitions import question_split_refused
    from hourglass.analysis.planning import PROCESS_BASE_BYTES, BudgetError, question_plan

    settings = Settings()
    budget = settings.memory_budget
    chosen = _workers(workers or settings.workers)
    try:
        parts, on = question_plan(spans, budget, chosen, 1)
    except BudgetError:
        return None
    held = on * PROCESS_BASE_BYTES if on > 1 else 0  # (the split's room: as ``_Window.asking``)
    if question_split_refused(spans, parts, budget - PROCESS_BASE_BYTES - held, False, None) is not None:
        return None
    return _window(command, path, since_ns, spans, budget, 0, holds, chosen, trace_ids=ids)


def _whatif_of_endpoint(
    window: _Window, changes: Any, service: str | None, operation: str | None, lookup: Any
) -> dict[str, Any] | None:
    """The what-if of the traces rooted at --service/--operation over a store's window too large
    for one context, over the traces with a span of that endpoint only
    (``whatif_query.whatif_of_traces``) instead of every span of the window (past a few
    partitions, up to three quarters of the window, split into files of their own and asked on
    the workers: :func:`_window_of_traces`); None when no root is
    chosen, ``--partitions`` was given, the store cannot name those traces (a store without the method)
    or they are too many to be worth it. When none is rooted there, the window's refusal
    (WhatIfInputError), its traces counted as its endpoints are (:func:`_listing_of_roots`)."""
    if (service is None and operation is None) or window.chosen > 1:
        return None
    settings = Settings()
    copies = _read_copies(window.path)
    store = open_store_for_analysis(window.path, "whatif")
    try:
        named = getattr(store, "endpoint_trace_ids", None)
        if not callable(named) or not callable(getattr(store, "has_span", None)):
            return None
        few = few_parts_spans(settings.memory_budget, copies)
        found = named(
            service,
            operation,
            window.since_ns,
            max(few, window.spans * 3 // 4) if copies == 1 else few,  # (past few: split)
            ENDPOINT_MAX_TRACES,
        )
    finally:
        store.close()
    if found is None:  # too many: a pass over the window, unless no trace can be rooted there
        listing = _rooted_nowhere("whatif", window.path, window.since_ns, copies, service, operation)
        if listing is None:
            return None
        ids, spans, seen = [], 0, int(listing["traces"].sum())  # (the refusal below, as the pass's)
    else:
        (ids, spans), seen = found, None

    root = ":".join(x for x in (service, operation) if x is not None)
    split: list[bool] = []

    def ask_split(ids: list[str], spans: int) -> list[Any] | None:
        # more than a few partitions hold: those traces split into files of their own and asked
        # on the workers, as an endpoint's critical path is (the plan's line says so)
        holds = f"the {len(ids):,} traces with a span {root} hold"
        shares = _shares_of_split_traces(window, ids, spans, holds, changes, lookup, service, operation)
        split.append(shares is not None)
        return shares

    from hourglass.analysis.partitions import StoreSource
    from hourglass.analysis.whatif_query import whatif_of_traces

    def has_span(svc: str | None, op: str | None) -> bool:
        opened = open_store_for_analysis(window.path, "whatif")
        try:
            return bool(opened.has_span(svc, op, window.since_ns))
        finally:
            opened.close()

    def window_traces() -> int | None:
        # (none rooted there: the refusal counts the window's traces as its endpoints are, from
        # the store's rows and the traces of no plain root read, not from a pass over every span)
        if seen is not None:
            return seen
        opened = open_store_for_analysis(window.path, "whatif")
        try:
            roots_of = getattr(opened, "window_roots", None)
            roots = roots_of(window.since_ns) if callable(roots_of) else None
        finally:
            opened.close()
        listing = None if roots is None else _listing_of_roots(window.path, roots, window.since_ns, copies)
        return None if listing is None else int(listing["traces"].sum())

    result = whatif_of_traces(
        StoreSource(window.path).load,  # (the whole traces: the window is selected from them as read)
        ids,
        spans,
        settings.memory_budget,
        changes,
        service=service,
        operation=operation,
        has_span=has_span,
        since_ns=window.since_ns,
        lookup=lookup,
        copies=copies,
        window_traces=window_traces,
        ask_many=ask_split,
    )
    if result is not None and not any(split):
        typer.echo(
            f"{window.holds}: asked over the {len(ids):,} traces with a span {root} ({spans:,} spans)",
            err=True,
        )
    return result


def _whatif_of_touched(window: _Window, changes: Any, lookup: Any) -> dict[str, Any] | None:
    """The what-if of every trace of a store's window too large for one context that reads and
    re-times only the traces the changes touch (``whatif_query.whatif_of_touched_traces``), the
    others known by their roots: read by their ids in a few partitions, or, more of them (up to
    three quarters of the window), split into partition files of their own and asked on the
    workers (:func:`_window_of_traces`); None when ``--partitions`` was given, the store cannot
    say which traces are touched (a store without the method), or they are too many to be worth it."""
    if window.chosen > 1:
        return None
    from hourglass.analysis.partitions import StoreSource
    from hourglass.analysis.whatif_query import touched_by, whatif_of_touched_traces

    settings = Settings()
    spans_of, trace_ids = touched_by(changes, lookup)
    if len(trace_ids) > ENDPOINT_MAX_TRACES:
        return None
    store = open_store_for_analysis(window.path, "whatif")
    try:
        roots_of = getattr(store, "window_roots", None)
        if not callable(roots_of):
            return None
        roots = roots_of(window.since_ns, spans_of, trace_ids)
    finally:
        store.close()
    del trace_ids
    total, asked = roots.num_rows, roots.num_rows - roots["trace_id"].null_count
    handed = [roots]  # (handed over: let go of before the touched traces are read)
    del roots
    copies = _read_copies(window.path)

    def ask_split(ids: list[str], spans: int) -> list[Any] | None:
        # more than a few partitions hold, up to three quarters of the window: those traces split
        # into files of their own and asked on the workers (serve: from a split of their own too)
        if copies != 1 or spans > window.spans * 3 // 4:
            return None
        holds = f"the {len(ids):,} traces the changes touch hold"
        return _shares_of_split_traces(window, ids, spans, holds, changes, lookup)

    result = whatif_of_touched_traces(
        StoreSource(window.path).load,  # (the whole traces: the window is selected from them as read)
        handed.pop(),
        settings.memory_budget,
        changes,
        since_ns=window.since_ns,
        lookup=lookup,
        copies=copies,
        most_traces=ENDPOINT_MAX_TRACES,
        ask_many=ask_split,
    )
    if result is not None:
        typer.echo(
            f"{window.holds}: re-timed the {asked:,} traces the changes touch; the other "
            f"{total - asked:,} keep their roots' durations",
            err=True,
        )
    return result


def _shares_of_split_traces(
    window: _Window,
    ids: list[str],
    spans: int,
    holds: str,
    changes: Any,
    lookup: Any,
    service: str | None = None,
    operation: str | None = None,
) -> list[Any] | None:
    """Each partition's share of a what-if of the traces ``ids`` of ``window`` (``spans`` span
    rows; ``holds``: what the plan's line says of them), asked from a split of their own
    (:func:`_window_of_traces`) on the window's workers; None when they are not split."""
    traces = _window_of_traces("whatif", window.path, window.since_ns, ids, spans, window.cores, holds)
    if traces is None:
        return None
    try:
        return _shares_of_window(traces, changes, lookup, service, operation)
    finally:
        traces.close()


def _shares_of_window(
    window: _Window,
    changes: Any,
    lookup: Any,
    service: str | None = None,
    operation: str | None = None,
) -> list[Any]:
    """Each partition's share of a what-if of ``window`` (``whatif_query.answers_partitioned``):
    in this process in turn or on its workers, with a progress bar."""
    from hourglass.analysis.whatif_query import answers_partitioned

    with _progress_bar() as progress:
        contexts, runner, trace_parts = window.asking(progress)
        return answers_partitioned(
            contexts,
            window.parts,
            changes,
            service=service,
            operation=operation,
            lookup=lookup,
            runner=runner,
            progress=progress,
            trace_parts=trace_parts,
        )


def _read_copies(path: str) -> int:
    """2 for an embedded ClickHouse, whose read of a window is held in this process beside its
    context (``planning.question_parts``); else 1."""
    return 2 if path.startswith("chdb:") else 1


def _window_findings(command: str, window: _Window, ids: set[str]) -> dict[str, Any]:
    """The findings of ``window`` by id, decided over all its traces as ``analyze`` decides them
    (in partitions: ``analyze.store_findings``, on the workers the question was given), for its
    recommendation changes ``ids``: their detectors only."""
    from hourglass.analysis.model import kind_of
    from hourglass.cli.analyze import StoreRun, store_findings

    settings = Settings()
    run = StoreRun(budget=settings.memory_budget, workers=window.cores, partitions=window.chosen)
    return store_findings(window.path, run, window.since_ns, command, frozenset(kind_of(i) for i in ids))


def _ms(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.1f}"


def _whatif_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['traces']} traces, {result['traces_changed']} changed; "
        f"root latency saved in total: {_ms(result['saved_ms_total'])} ms",
        "",
        "changes:",
    ]
    for change in result["changes"]:
        what = json.dumps({k: v for k, v in change.items() if k not in ("spans", "traces")})
        lines.append(f"  {what}: {change['spans']} spans in {change['traces']} traces")
    lines += ["", f"{'endpoint':<56} {'traces':>7} {'p50 before→after ms':>22} {'p95 before→after ms':>22}"]
    for e in result["endpoints"]:
        name = f"{e['service']}:{e['operation']}"
        p50 = f"{_ms(e['before_ms_p50'])}→{_ms(e['after_ms_p50'])}"
        p95 = f"{_ms(e['before_ms_p95'])}→{_ms(e['after_ms_p95'])}"
        lines.append(f"{name[:56]:<56} {e['traces']:>7} {p50:>22} {p95:>22}")
    return "\n".join(lines) + "\n"


def _path_table(path: dict[str, Any]) -> str:
    lines = [
        f"{path['service']}:{path['operation']} — {path['traces']} traces, root p50 {_ms(path['root_ms_p50'])} ms, "
        f"p95 {_ms(path['root_ms_p95'])} ms",
        "",
        f"{'on the critical path (self time)':<56} {'share':>6} {'p50 ms':>9} {'p95 ms':>9} {'traces':>7}",
    ]
    for op in path["operations"]:
        name = f"{op['service']}:{op['operation']}"
        lines.append(
            f"{name[:56]:<56} {op['share'] * 100:>5.1f}% {_ms(op['ms_p50']):>9} {_ms(op['ms_p95']):>9} {op['traces']:>7}"
        )
    lines += ["", "most frequent paths:"]
    for variant in path["paths"]:
        lines.append(f"  {variant['share_of_traces'] * 100:5.1f}% of traces ({variant['traces']}):")
        lines.append("      " + " → ".join(variant["steps"]))
    return "\n".join(lines) + "\n"


def _emit(text: str, output: Path | None) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)


FilesArg = Annotated[
    list[Path] | None, typer.Argument(help="Trace files instead of the store (any supported format)")
]
FormatOpt = Annotated[QueryFormat, typer.Option("--format", "-f", help="table or json")]
OutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout")
]


@app.command("whatif")
def whatif_command(
    files: FilesArg = None,
    db: Annotated[str | None, option("db", WHATIF)] = None,
    speedup: Annotated[
        list[str] | None,
        typer.Option(
            "--speedup",
            help="SERVICE:OPERATION=FACTOR: that operation takes FACTOR × its own time (0.5 = twice as "
            "fast, 0 = none; its children keep theirs); SERVICE:*=FACTOR for the whole service; repeatable",
        ),
    ] = None,
    recommendation: Annotated[
        list[str] | None,
        typer.Option("--recommendation", help="Apply that recommendation (its id in the report); repeatable"),
    ] = None,
    parallelize: Annotated[
        list[str] | None,
        typer.Option(
            "--parallelize", help="SERVICE:OPERATION: that caller's blocking children run concurrently"
        ),
    ] = None,
    cap: Annotated[
        list[str] | None,
        typer.Option(
            "--cap", help="SERVICE:OPERATION=K: that caller's blocking children run at most K at a time"
        ),
    ] = None,
    service: Annotated[
        str | None, typer.Option("--service", help="Only traces whose root is in this service")
    ] = None,
    operation: Annotated[
        str | None, typer.Option("--operation", help="Only traces whose root span has this name")
    ] = None,
    since: Annotated[str | None, option("since", WHATIF)] = None,
    partitions: Annotated[int, option("partitions", WHATIF)] = 0,
    workers: Annotated[int, option("workers", WHATIF)] = 0,
    output_format: FormatOpt = QueryFormat.table,
    output: OutputOpt = None,
) -> None:
    """What if an operation were faster, a caller parallel, a pool bigger, a recommendation done?"""
    from hourglass.analysis.partitions import PartitionError
    from hourglass.analysis.whatif_query import (
        WhatIfInputError,
        changes_from_cli,
        combine_parts,
        evaluate,
    )

    try:
        changes = changes_from_cli(
            speedup=speedup or (),
            recommendation=recommendation or (),
            parallelize=parallelize or (),
            cap=cap or (),
        )
    except WhatIfInputError as exc:
        raise _fail("whatif", str(exc)) from None
    with _terminate_as_interrupt():  # (SIGTERM too removes a temporary store of trace files)
        ctx, problems = _context("whatif", files, db, since, partitions, workers)
        try:
            if isinstance(ctx, _Window):
                lookup = None
                wanted = {change.recommendation for change in changes if change.kind == "recommendation"}
                if wanted:
                    lookup = _window_findings("whatif", ctx, wanted).get
                result = _whatif_of_endpoint(ctx, changes, service, operation, lookup)
                if result is None and service is None and operation is None:
                    result = _whatif_of_touched(ctx, changes, lookup)
                if result is None:
                    shares = _shares_of_window(ctx, changes, lookup, service, operation)
                    result = combine_parts(shares, changes, service=service, operation=operation)
            else:
                result = evaluate(ctx, changes, service=service, operation=operation)
        except WhatIfInputError as exc:
            raise _fail("whatif", str(exc)) from None
        except PartitionError as exc:
            raise _fail("whatif", str(exc), EXIT_STORE) from None
        finally:
            if isinstance(ctx, _Window):
                ctx.close()
    text = json.dumps(result, indent=2) + "\n" if output_format is QueryFormat.json else _whatif_table(result)
    _emit(text, output)
    if problems:
        raise typer.Exit(EXIT_INPUT)


@app.command("critical-path")
def critical_path_command(
    files: FilesArg = None,
    db: Annotated[str | None, option("db", CRITICAL_PATH)] = None,
    service: Annotated[str | None, typer.Option("--service", help="The endpoint's root service")] = None,
    operation: Annotated[
        str | None, typer.Option("--operation", help="The endpoint's root span name")
    ] = None,
    since: Annotated[str | None, option("since", CRITICAL_PATH)] = None,
    partitions: Annotated[int, option("partitions", CRITICAL_PATH)] = 0,
    workers: Annotated[int, option("workers", CRITICAL_PATH)] = 0,
    output_format: FormatOpt = QueryFormat.table,
    output: OutputOpt = None,
) -> None:
    """What an endpoint waits on across its traces: self time on the critical path per operation."""
    rooted, found = True, None
    if not files and service is not None and operation is not None and partitions <= 1:
        found = _endpoint_path(db, since, service, operation, workers)
        if found is not None and found[0] is not None:
            text = (
                json.dumps(found[0], indent=2) + "\n"
                if output_format is QueryFormat.json
                else _path_table(found[0])
            )
            _emit(text, output)
            return
        # (None, listing): no trace with a span of it is rooted there, so none is: the endpoints
        # to name are listed from the window's roots, not from a pass over every span (12 s at 7.2M)
        rooted = found is None
    listed = None if found is None else found[1]
    if (
        listed is None
        and not files
        and (service is None or operation is None or not rooted)
        and partitions <= 1
    ):
        listed = _endpoints_of_store(db, since)
    problems, listing, path = (
        (0, listed, None)
        if listed is not None
        else _critical_path_pass(files, db, since, partitions, workers, service, operation)
    )
    if service is None or operation is None:
        names = "\n".join(
            f"  --service {s!r} --operation {o!r}  ({n} traces)" for s, o, n in listing.head(20).iter_rows()
        )
        raise _fail(
            "critical-path", "give --service and --operation of an endpoint (a trace root):\n" + names
        )
    if path is None:
        names = ", ".join(f"{s}:{o}" for s, o, _ in listing.head(10).iter_rows())
        raise _fail(
            "critical-path",
            f"no trace has the root span {service}:{operation}"
            + (f" (endpoints: {names})" if names else " (no traces)"),
        )
    text = json.dumps(path, indent=2) + "\n" if output_format is QueryFormat.json else _path_table(path)
    _emit(text, output)
    if problems:
        raise typer.Exit(EXIT_INPUT)


def _critical_path_pass(
    files: Any,
    db: str | None,
    since: str | None,
    partitions: int,
    workers: int,
    service: str | None,
    operation: str | None,
) -> tuple[int, Any, dict[str, Any] | None]:
    """(the input problems, the endpoints, the path of service/operation when both are given)
    of one pass over the spans: at once, or the window's partitions."""
    from hourglass.analysis.endpoint_path import (
        endpoint_critical_path,
        endpoints,
    )

    with _terminate_as_interrupt():  # (SIGTERM too removes a temporary store of trace files)
        ctx, problems = _context("critical-path", files, db, since, partitions, workers)
        if isinstance(ctx, _Window):  # one pass over the partitions: the endpoints and the path
            listing, path = _paths_of_window(ctx, service, operation)
    if not isinstance(ctx, _Window):
        listing = endpoints(ctx)
        path = (
            None if service is None or operation is None else endpoint_critical_path(ctx, service, operation)
        )
    return problems, listing, path


def _paths_of_window(
    window: _Window, service: str | None, operation: str | None
) -> tuple[Any, dict[str, Any] | None]:
    """(the endpoints, the path of service/operation when both are given) of one pass over the
    partitions of ``window`` (closed after), with a progress bar."""
    from hourglass.analysis.endpoint_path import endpoint_critical_path_partitioned
    from hourglass.analysis.partitions import PartitionError

    with _terminate_as_interrupt():  # (SIGTERM too removes the partition files)
        try:
            with _progress_bar() as progress:
                contexts, runner, _ = window.asking(progress)
                return endpoint_critical_path_partitioned(
                    contexts, window.parts, service, operation, runner=runner, progress=progress
                )
        except PartitionError as exc:
            raise _fail("critical-path", str(exc), EXIT_STORE) from None
        finally:
            window.close()


def _listing_of_roots(path: str, roots: Any, since_ns: int | None, copies: int) -> Any:
    """``whatif_query.endpoints_of_roots`` of the store at ``path`` from its ``window_roots``
    rows (the traces of no plain root read by their ids); None when those are too many."""
    from hourglass.analysis.partitions import StoreSource
    from hourglass.analysis.whatif_query import endpoints_of_roots

    return endpoints_of_roots(
        StoreSource(path).load,
        roots,
        Settings().memory_budget,
        since_ns=since_ns,
        copies=copies,
        most_traces=ENDPOINT_MAX_TRACES,
    )


def _endpoints_of_store(db: str | None, since: str | None) -> Any:
    """The endpoints of a store's window too large for one context, from one aggregation of its
    rows (``whatif_query.endpoints_of_roots``) instead of a pass over every span; None when the
    window fits at once, the store cannot say (a store without the method) or too many traces need
    reading: the window's own pass lists them."""
    command = "critical-path"
    large = _large_window(
        db, since, command, "window_roots", lambda roots_of, since_ns, *_: roots_of(since_ns)
    )
    if large is None:
        return None
    (path, since_ns, window, copies), roots = large
    listing = _listing_of_roots(path, roots, since_ns, copies)
    if listing is not None:
        _say_counted_by_roots(command, since_ns, window, roots.num_rows)
    return listing


def _say_counted_by_roots(command: str, since_ns: int | None, window: int, traces: int) -> None:
    what = "the store" if since_ns is None else "the window"
    typer.echo(
        f"hourglass {command}: {what} holds {window:,} spans, more than one context holds under the "
        f"{Settings().memory_budget / 2**30:.2f} GiB memory budget: its {traces:,} traces "
        "counted by their roots (those of no plain root read)",
        err=True,
    )
