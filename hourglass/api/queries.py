"""On-demand questions over the store: what-if and an endpoint's critical path (REST, MCP, CLI).

The background analysis keeps only the report; these questions need the repaired spans. A
:class:`QueryEngine` builds an :class:`hourglass.analysis.context.AnalysisContext` of the store (or of a
``since`` window) when first asked, and keeps the last one (with its re-timing engine) until the
store changes, so a user trying several what-ifs in a row pays the scan and repair once. One
context at a time is kept (bounded memory), and dropped after ``IDLE_SECONDS`` without a question;
building runs under a lock (no two at once).

A context holds every span of its window in memory (~2 KB a span at its peak), in the process
that asks (``serve``'s, for the REST routes and MCP over HTTP): over a store, a window of more spans
than the memory budget (``HOURGLASS_MEMORY_BUDGET``) holds at once, as the at-once analysis counts
them, is asked in partitions of whole traces read one at a time (``scan_partition``;
``whatif_query.evaluate_partitioned``, ``endpoint_path.endpoint_critical_path_partitioned``: the
same answer), not cached, rather than the server taken down by the kernel's OOM killer with the
ingest it serves (a critical path over a 1M-span store peaked at 1.54 GiB, linear in the spans).
A recommendation change over such a window applies its finding as decided over every trace of
the window: serve keeps the report, not the findings, so they are decided again for the question
(``AnalysisService.window_findings``: over the incremental analysis' stored rows, or read in
partitions), as ``hourglass whatif --db`` decides them (``cli.analyze.store_findings``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.endpoint_path import (
    endpoint_critical_path,
    endpoint_critical_path_partitioned,
    endpoints,
)
from hourglass.analysis.model import Finding
from hourglass.analysis.whatif import Retimer
from hourglass.analysis.whatif_query import (
    Change,
    FindingLookup,
    WhatIfInputError,
    changes_from_json,
    detector_lookup,
    evaluate,
    evaluate_partitioned,
)
from hourglass.api.settings import parse_since
from hourglass.collector.schema import ANALYSIS_COLUMNS

log = logging.getLogger("hourglass.api.queries")
T = TypeVar("T")

SINCE_STEP_NS = 10 * 1_000_000_000
IDLE_SECONDS = 600.0


def held_by_this_process() -> int:
    """What this process and its children (serve's analysis worker) hold resident over a fresh
    process' base (``planning.PROCESS_BASE_BYTES``), in bytes: the memory budget is the service's,
    and a question in serve's server shares the machine with the worker's rounds. 0 where it
    cannot be read (not Linux)."""
    from hourglass.analysis.planning import PROCESS_BASE_BYTES

    def resident(pid: str) -> int:
        try:
            with open(f"/proc/{pid}/statm", encoding="ascii") as statm:
                return int(statm.read().split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    pages = resident("self")
    if not pages:
        return 0
    children: set[str] = set()
    try:
        for task in os.listdir("/proc/self/task"):
            with (
                contextlib.suppress(OSError),
                open(f"/proc/self/task/{task}/children", encoding="ascii") as listed,
            ):
                children.update(listed.read().split())
    except OSError:
        pass
    pages += sum(resident(child) for child in children)
    return max(pages * os.sysconf("SC_PAGE_SIZE") - PROCESS_BASE_BYTES, 0)


QUESTION_FOLDER_PREFIX = "hourglass-question-"


def one_heavy_read(store: Any) -> contextlib.AbstractContextManager[None]:
    """For the ``with`` block: a question's read of ``store`` whose memory grows with the rows it
    looks at (the window's per-trace roots, an endpoint's trace ids, the question's split, a
    partition) is the store's one heavy query at a time (``DuckDBSpanStore.serialized``), as
    the analysis worker's reads, counts, compaction and retention are: their peaks in serve's
    process do not add up. Taken before the read (the store's order: a reopen holds it while it
    waits for the reads in flight). A store without it (ClickHouse's): nothing."""
    serialized = getattr(store, "serialized", None)
    return serialized() if callable(serialized) else contextlib.nullcontext()


@contextlib.contextmanager
def split_store_window(
    store: Any,
    since_ns: int | None,
    parts: int,
    spans: int,
    free_memory: int,
    trace_ids: list[str] | None = None,
) -> Iterator[Callable[[int, int], pa.Table] | None]:
    """For the ``with`` block: a reader of each of the ``parts`` partitions of the window
    ``since_ns`` (``spans`` spans) of a DuckDB ``store``, from files it is split into by one read
    of the store (``split_partitions``, in a folder beside the store's file, removed after); None
    when it is not split (``partitions.question_split_refused``: too few partitions, not
    ``free_memory`` enough for the split, not a file each, not disk enough) or the split failed:
    each partition is then scanned. A scan per partition reads every row of the store, so a
    question's reads grew with the square of the window: at 7.2M stored spans 14 scans of ~0.65 s
    each, against one read and one write. ``trace_ids``: only those traces of the window (an
    endpoint's: ``QueryEngine.critical_path``); their ids are the split's join, not the
    window's, so its memory is an unfiltered split's."""
    from hourglass.analysis.partitions import question_split_refused
    from hourglass.collector.duckdb_store import partition_file, read_partition_file

    path = str(getattr(store, "path", "") or "")
    near = os.path.dirname(os.path.abspath(path)) if path and path != ":memory:" else None
    folder: str | None = None
    try:
        filtered = since_ns is not None and trace_ids is None
        refused = question_split_refused(spans, parts, free_memory, filtered, near)
        if refused is not None:
            log.info("the window is scanned per partition, not split into files: %s", refused)
        else:
            try:
                folder = tempfile.mkdtemp(prefix=QUESTION_FOLDER_PREFIX, dir=near)
                with one_heavy_read(store):
                    store.split_partitions(
                        folder, parts, since_ns=since_ns, columns=ANALYSIS_COLUMNS, trace_ids=trace_ids
                    )
            except Exception as exc:  # (a full disk, an unwritable folder: the scans instead)
                log.warning(
                    "splitting the window into partition files failed (%s): each partition is scanned", exc
                )
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                folder = None
        if folder is None:
            yield None
        else:
            done = folder
            yield lambda part, _parts: read_partition_file(
                partition_file(done, part), columns=ANALYSIS_COLUMNS, string_views=True
            )
    finally:  # (also when the split itself is interrupted)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def remove_stale_question_folders(store: Any) -> None:
    """The partition folders a question left beside ``store``'s file when its process was killed
    (``split_store_window``; one process serves a DuckDB file, so none is in use when it opens)."""
    path = str(getattr(store, "path", "") or "")
    if not path or path == ":memory:" or "://" in path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            if name.startswith(QUESTION_FOLDER_PREFIX):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def release_memory() -> None:
    """The memory a partition of a question freed returned to the system (glibc's heap:
    ``malloc_trim``) before the next one is read. In serve's process glibc kept it: a what-if over
    a 7.2M-span store in 14 partitions grew the server from 0.33 to 2.6 GiB, partition after
    partition, and left it at 1.1 GiB (811 MiB of it freed but held by glibc)."""
    from hourglass.api.server_memory import trim

    pa.default_memory_pool().release_unused()  # (Arrow's allocator keeps freed blocks for reuse)
    trim()


class FindingsFailed(RuntimeError):
    """Deciding a window's findings for a recommendation change failed (the analysis worker died,
    the store could not be read): the cause is in the message."""


class WindowTooLarge(WhatIfInputError):
    """The question's window holds more spans than the memory budget allows one context."""


@dataclass
class _Cached:
    key: tuple[int, int | None]
    built_at: float  # monotonic
    ctx: AnalysisContext
    engine: Retimer
    lookup: FindingLookup


def since_from_text(since: str | None, name: str = "since") -> int | None:
    """``since`` text → unix ns rounded down to 10 s (repeated relative queries share a context);
    raises WhatIfInputError with the reason."""
    if since is None:
        return None
    try:
        since_ns = parse_since(since, name=name)
    except ValueError as exc:
        raise WhatIfInputError(str(exc)) from None
    return since_ns - since_ns % SINCE_STEP_NS


class QueryEngine:
    """What-if and critical path over a span store (``scan``) or a fixed span table."""

    def __init__(
        self,
        scan: Callable[[int | None], pa.Table],
        change_marker: Callable[[], int] = lambda: 0,
        recommendation_ids: Callable[[], set[str] | None] = lambda: None,
        idle_seconds: float = IDLE_SECONDS,
        reuse_seconds: float = 0.0,
        window_spans: Callable[[int | None], int] | None = None,
        budget: int | None = None,
        scan_partition: Callable[[int, int, int | None], pa.Table] | None = None,
        read_copies: Callable[[], int] = lambda: 1,
        window_findings: Callable[[int | None, set[str]], Mapping[str, Finding]] | None = None,
        held: Callable[[], int] = lambda: 0,
        split_window: Callable[..., contextlib.AbstractContextManager[Callable[[int, int], pa.Table] | None]]
        | None = None,
        endpoint_traces: Callable[[str | None, str | None, int | None, int], tuple[list[str], int] | None]
        | None = None,
        read_traces: Callable[[int, int, list[str]], pa.Table] | None = None,
        has_span: Callable[[str | None, str | None, int | None, bool], bool | None] | None = None,
        window_roots: Callable[[int | None, list[tuple[str, str | None]], list[str]], pa.Table | None]
        | None = None,
    ) -> None:
        """``scan(since_ns)`` returns the span rows; ``change_marker()`` changes when the store
        does; ``recommendation_ids()`` the ids of the current report (None: any detector finding).
        ``reuse_seconds``: while the store keeps changing (continuous ingest), a context younger
        than this is still used, so a series of questions does not rebuild it for each one."""
        self._scan = scan
        self._marker = change_marker
        self._recommendation_ids = recommendation_ids
        self._lock = threading.Lock()
        self._cached: _Cached | None = None
        self._idle_seconds = idle_seconds
        self._reuse_seconds = reuse_seconds
        self._expiry: threading.Timer | None = None
        # the guard (module doc): the spans a window holds, and the memory budget one context fits
        self._window_spans = window_spans
        self._budget = budget
        # ``scan_partition(part, parts, since_ns)``: a window larger than the budget is asked in
        # partitions of whole traces, one context at a time (without it, refused)
        self._scan_partition = scan_partition
        self._partitioned = threading.Lock()
        self._read_copies = read_copies  # 2: the store's engine reads in this process (chdb)
        # ``window_findings(since_ns, ids)``: the recommendations' findings over a window asked in
        # partitions, decided over all of it (serve: ``AnalysisService.window_findings``); without
        # it a recommendation change over such a window is refused
        self._window_findings = window_findings
        # what this process (and its children) hold already over a fresh one's base (bytes): a
        # question plans for the budget less that (``planning.question_room``;
        # ``held_by_this_process``)
        self._held = held
        # ``split_window(since_ns, parts, spans, free_memory)``: for the ``with`` block, a reader of
        # each partition of the window from files the store split it into in one read (None: not
        # worth it, or not possible), instead of a scan of the whole store per partition
        # (``split_store_window``)
        self._split_window = split_window
        # ``endpoint_traces(service, operation, since_ns, most_spans)``: (the ids of the window's
        # traces with a span of that endpoint, their span rows; None: more than ``most_spans``, or
        # the store cannot say), ``read_traces(part, parts, ids)`` those of ``ids`` in a
        # partition: an endpoint's critical path over a window asked in partitions is decided
        # over those traces only (``_path_of_endpoint_traces``)
        self._endpoint_traces = endpoint_traces
        self._read_traces = read_traces
        # ``has_span(service, operation, since_ns, parentless)``: whether the window has such a
        # span (what a what-if over an endpoint's traces says of the window's others), with
        # ``parentless`` one without a parent id (may a trace be rooted there: ``_rooted_nowhere``);
        # None: the store cannot say
        self._has_span = has_span
        # ``window_roots(since_ns, spans_of, trace_ids)``: one row per trace of the window, those
        # the changes touch named, the others by their roots (``DuckDBSpanStore.window_roots``;
        # None: the store cannot say): a what-if over the whole window re-times only the touched
        # (``_whatif_of_touched_traces``)
        self._window_roots = window_roots

    def _forget(self) -> None:
        with self._lock:
            self._cached = None

    def _touch(self) -> None:
        """(Re)start the idle timer that frees the cached context."""
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = threading.Timer(self._idle_seconds, self._forget)
        self._expiry.daemon = True
        self._expiry.start()

    @classmethod
    def over_store(
        cls,
        store: Any,
        recommendation_ids: Callable[[], set[str] | None] = lambda: None,
        reuse_seconds: float = 0.0,
        budget: int | None = None,
        window_findings: Callable[[int | None, set[str]], Mapping[str, Finding]] | None = None,
    ) -> QueryEngine:
        """Questions over ``store``; with ``budget`` (bytes), a window whose spans do not fit it at
        once is asked in partitions of whole traces, its recommendations' findings decided by
        ``window_findings`` (``AnalysisService.window_findings``)."""

        def scan(since_ns: int | None) -> pa.Table:
            with one_heavy_read(store):
                return store.scan(since_ns=since_ns, columns=ANALYSIS_COLUMNS)

        def marker() -> int:
            raw = getattr(store, "raw_row_count", None)
            return int(raw()) if callable(raw) else int(store.stats().spans)

        def window_spans(since_ns: int | None) -> int:
            count = getattr(store, "span_rows_since", None)
            return int(count(since_ns)) if callable(count) else marker()

        def scan_partition(part: int, parts: int, since_ns: int | None) -> pa.Table:
            with one_heavy_read(store):
                table: pa.Table = store.scan_partition(
                    part, parts, since_ns=since_ns, columns=ANALYSIS_COLUMNS
                )
            return table

        # (looked up when asked, not when the app is made: a DuckDB store names an endpoint's traces)
        def endpoint_traces(
            service: str | None, operation: str | None, since_ns: int | None, most: int
        ) -> tuple[list[str], int] | None:
            from hourglass.analysis.planning import ENDPOINT_MAX_TRACES

            named = getattr(store, "endpoint_trace_ids", None)
            if not callable(named):
                return None
            with one_heavy_read(store):
                return named(service, operation, since_ns, most, ENDPOINT_MAX_TRACES)

        def has_span(
            service: str | None, operation: str | None, since_ns: int | None, parentless: bool = False
        ) -> bool | None:
            found = getattr(store, "has_span", None)  # (looked up when asked, not when the app is made)
            if not callable(found):
                return None  # (a store without it cannot say)
            with one_heavy_read(store):  # (with since_ns, a join with the window's trace ids)
                return bool(found(service, operation, since_ns, parentless=parentless))

        def window_roots(
            since_ns: int | None, spans_of: list[tuple[str, str | None]], trace_ids: list[str]
        ) -> pa.Table | None:
            roots = getattr(store, "window_roots", None)
            if not callable(roots):
                return None
            with one_heavy_read(store):
                return roots(since_ns, spans_of, trace_ids)

        def read_traces(part: int, parts: int, trace_ids: list[str]) -> pa.Table:
            with one_heavy_read(store):
                table: pa.Table = store.scan_partition(
                    part, parts, trace_ids=trace_ids, columns=ANALYSIS_COLUMNS, string_views=True
                )
            return table

        first_split = [True]

        def split_window(
            since_ns: int | None, parts: int, spans: int, free: int, trace_ids: list[str] | None = None
        ) -> contextlib.AbstractContextManager[Callable[[int, int], pa.Table] | None]:
            if not callable(getattr(store, "split_partitions", None)):  # (a store without the method)
                return contextlib.nullcontext(None)
            if first_split[0]:  # (looked at when asked, not when the app is made)
                first_split[0] = False
                remove_stale_question_folders(store)
            return split_store_window(store, since_ns, parts, spans, free, trace_ids)

        return cls(
            scan,
            marker,
            recommendation_ids,
            reuse_seconds=reuse_seconds,
            window_spans=window_spans,
            budget=budget,
            scan_partition=scan_partition,  # (every span store reads partitions: SpanStore)
            read_copies=lambda: 2 if getattr(store, "embedded_engine", False) else 1,
            window_findings=window_findings,
            held=held_by_this_process,
            split_window=split_window,
            endpoint_traces=endpoint_traces,
            read_traces=read_traces,
            has_span=has_span,
            window_roots=window_roots,
        )

    def _parts(self, since_ns: int | None) -> int:
        """The partitions of whole traces a question over the window is asked in: 1 (at once) when
        its spans fit one context within the budget, else as many as keep each within it
        (``planning.question_parts``) when the store reads partitions; else WindowTooLarge."""
        if self._window_spans is None or self._budget is None:
            return 1
        from hourglass.analysis.planning import BudgetError, at_once_spans, question_parts

        with self._lock:
            cached = self._cached
            if cached is not None and self._reusable(cached, since_ns):
                return 1  # (built at once, and asked again before it is rebuilt)
            # let go now, as any build or partition would first: what this process holds is
            # measured without it (else a window it fills would plan partitions every other time)
            self._cached = None
            del cached
        spans = self._window_spans(since_ns)
        room = self._room()
        if self._scan_partition is not None:
            try:  # (1 when the window fits, its read's copy counted where the engine reads here)
                return question_parts(spans, room, self._read_copies())
            except BudgetError:
                pass
        if spans > at_once_spans(room):
            self._check_window(since_ns)  # (raises)
        return 1

    def _reusable(
        self, cached: _Cached, since_ns: int | None, key: tuple[int, int | None] | None = None
    ) -> bool:
        """Whether the cached context answers a question over the window ``since_ns``: built for
        it while the store is as it was, or younger than ``reuse_seconds``."""
        if cached.key[1] != since_ns:
            return False
        if time.monotonic() - cached.built_at < self._reuse_seconds:
            return True
        return cached.key == (key if key is not None else (self._marker(), since_ns))

    def _room(self) -> int:
        """The memory budget less what this process holds already (``planning.question_room``)."""
        from hourglass.analysis.planning import question_room

        assert self._budget is not None
        return question_room(self._budget, self._held())

    @contextlib.contextmanager
    def _partition_contexts(
        self, since_ns: int | None, parts: int
    ) -> Iterator[Callable[[int, int], AnalysisContext]]:
        """The contexts of the window's ``parts`` partitions, one at a time, for the ``with``
        block: read from partition files the store split the window into once (``split_window``),
        else each by a scan of the store (``scan_partition``)."""
        from hourglass.analysis.whatif_query import partition_contexts

        scan_partition = self._scan_partition
        assert scan_partition is not None  # (``_parts`` gave more than one)
        with self._lock:  # the cached context of another window is let go before the partitions
            self._cached = None
        split = None
        if self._split_window is not None and self._window_spans is not None and self._budget is not None:
            from hourglass.analysis.planning import PROCESS_BASE_BYTES

            # (the split runs before the partitions, beside what the process holds: the budget's rest)
            free = self._room() - PROCESS_BASE_BYTES
            split = self._split_window(since_ns, parts, self._window_spans(since_ns), free)
        with split if split is not None else contextlib.nullcontext(None) as read:
            load = read if read is not None else (lambda part, n: scan_partition(part, n, since_ns))
            contexts = partition_contexts(load, since_ns)

            def context(part: int, parts: int) -> AnalysisContext:
                release_memory()  # the previous partition's, freed, back to the system before the next
                return contexts(part, parts)

            yield context

    def _check_window(self, since_ns: int | None) -> None:
        """Raises :class:`WindowTooLarge` when the window holds more spans than one context may."""
        if self._window_spans is None or self._budget is None:
            return
        from hourglass.analysis.planning import at_once_spans

        most, spans = at_once_spans(self._room()), self._window_spans(since_ns)
        if spans <= most:
            return
        window = "the store" if since_ns is None else "the window"
        raise WindowTooLarge(
            f"{window} holds {spans:,} spans, more than the {most:,} a what-if or critical-path "
            f"question holds in memory at once under the {self._budget / 2**30:.2f} GiB memory budget "
            "(HOURGLASS_MEMORY_BUDGET, less what this process holds already): ask over a shorter "
            "window (since, e.g. 15m or 1h) or raise the budget"
        )

    def _context(self, since_ns: int | None) -> _Cached:
        key = (self._marker(), since_ns)
        with self._lock:
            self._touch()
            cached = self._cached
            if cached is not None and self._reusable(cached, since_ns, key):
                return cached
            self._cached = None  # free the old one before building the new one
            del cached
            if self._scan_partition is None:  # (else ``_parts`` chose to ask at once)
                self._check_window(since_ns)
            ctx = AnalysisContext.from_table(self._scan(since_ns))
            engine = Retimer(ctx.spans, ctx.critical.predecessor if ctx.critical is not None else None)
            built = _Cached(key, time.monotonic(), ctx, engine, detector_lookup(ctx))
            self._cached = built
            self._touch()  # the idle time counts from when it is ready
            return built

    def whatif(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /v1/whatif``: ``{"changes": [...], "service"?, "operation"?, "since"?}``."""
        if not isinstance(body, Mapping):
            raise WhatIfInputError("expected a JSON object with a list of changes")
        unknown = sorted(set(body) - {"changes", "service", "operation", "since"})
        if unknown:
            raise WhatIfInputError(
                f"unknown field(s) {', '.join(unknown)} (expected changes, service, operation, since)"
            )
        changes = changes_from_json(body.get("changes"))
        for name in ("service", "operation", "since"):
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or not value):
                raise WhatIfInputError(f"{name}: expected a non-empty string")
        known = self._recommendation_ids()
        if known is not None:
            for i, change in enumerate(changes):
                if change.kind == "recommendation" and change.recommendation not in known:
                    raise WhatIfInputError(
                        f"changes[{i}]: no recommendation {change.recommendation!r} in the current report"
                    )
        since_ns = since_from_text(body.get("since"))
        parts = self._parts(since_ns)
        if parts > 1:
            with self._partitioned:  # one partitioned question at a time (each holds a partition)
                # planned again once the question before (if any) is done: its partition is let go
                parts = max(self._parts(since_ns), 1)
                lookup = self._findings_of(changes, since_ns)
                try:
                    answer = self._whatif_of_endpoint_traces(
                        changes, body.get("service"), body.get("operation"), since_ns, lookup
                    )
                    if answer is None:
                        answer = self._whatif_of_touched_traces(
                            changes, body.get("service"), body.get("operation"), since_ns, lookup
                        )
                    if answer is not None:
                        return answer
                    with self._partition_contexts(since_ns, parts) as contexts:
                        return evaluate_partitioned(
                            contexts,
                            parts,
                            changes,
                            service=body.get("service"),
                            operation=body.get("operation"),
                            lookup=lookup,
                        )
                finally:
                    del lookup  # (the findings, with every occurrence of theirs)
                    release_memory()
        cached = self._context(since_ns)
        result = evaluate(
            cached.ctx,
            changes,
            service=body.get("service"),
            operation=body.get("operation"),
            lookup=cached.lookup,
            engine=cached.engine,
        )
        return result

    def _whatif_of_endpoint_traces(
        self,
        changes: Sequence[Change],
        service: str | None,
        operation: str | None,
        since_ns: int | None,
        lookup: FindingLookup | None,
    ) -> dict[str, Any] | None:
        """A what-if of the traces rooted at ``service``/``operation`` over a window asked in
        partitions, over the traces with a span of that endpoint only
        (``whatif_query.whatif_of_traces``; past a few partitions, up to three quarters of the
        window, from a split of their own: :meth:`_ask_split_traces`), in the ``_partitioned``
        lock the caller holds; None when no root is chosen, the store cannot name those traces (a
        store without the method) or they are too many to be worth it: the window's partitions answer. None rooted there: the
        window's refusal, its traces counted as its endpoints are (:meth:`_listing_of_roots`)."""
        has_span = self._has_span
        if (service is None and operation is None) or self._endpoint_traces is None or has_span is None:
            return None
        assert self._read_traces is not None
        from hourglass.analysis.planning import few_parts_spans
        from hourglass.analysis.whatif_query import PartAnswer, ask_parts, whatif_of_traces

        room, copies = self._room(), self._read_copies()
        most = few_parts_spans(room, copies)
        # up to three quarters of the window, those traces split into files of their own
        window = self._window_spans(since_ns) if self._window_spans is not None else 0
        splits = self._split_window is not None and copies == 1
        found = self._endpoint_traces(
            service, operation, since_ns, max(most, window * 3 // 4) if splits else most
        )
        seen: int | None = None
        if found is None:  # too many: the window's partitions, unless no trace can be rooted there
            listing = self._rooted_nowhere(since_ns, service, operation)
            if listing is None:
                return None
            found, seen = ([], 0), int(listing["traces"].sum())  # (the refusal, as the partitions')
        ids, spans = found

        def ask_split(ids: list[str], spans: int) -> list[PartAnswer] | None:
            return self._ask_split_traces(
                since_ns,
                ids,
                spans,
                room,
                lambda contexts, parts: ask_parts(contexts, parts, changes, lookup, service, operation),
            )

        def window_traces() -> int | None:
            # (none rooted there: the refusal counts the window's traces as its endpoints do: the
            # plain roots from the store's rows, the other traces read, as the contexts keep them)
            if seen is not None:
                return seen
            listing = self._listing_of_roots(since_ns)
            return None if listing is None else int(listing["traces"].sum())

        return whatif_of_traces(
            self._read_traces,
            ids,
            spans,
            room,
            changes,
            service=service,
            operation=operation,
            has_span=lambda svc, op: bool(has_span(svc, op, since_ns, False)),
            since_ns=since_ns,
            lookup=lookup,
            copies=copies,
            window_traces=window_traces,
            ask_many=ask_split,
        )

    def _whatif_of_touched_traces(
        self,
        changes: Sequence[Change],
        service: str | None,
        operation: str | None,
        since_ns: int | None,
        lookup: FindingLookup | None,
    ) -> dict[str, Any] | None:
        """A what-if of every trace of a window asked in partitions that reads and re-times only
        the traces its changes touch (``whatif_query.whatif_of_touched_traces``), in the
        ``_partitioned`` lock the caller holds; None when it chooses traces by their root
        (``_whatif_of_endpoint_traces``), the store cannot say which traces are touched (a
        store without the method), or they are too many to be worth it: the window's partitions answer."""
        if service is not None or operation is not None or self._window_roots is None:
            return None
        assert self._read_traces is not None
        from hourglass.analysis.planning import ENDPOINT_MAX_TRACES
        from hourglass.analysis.whatif_query import (
            PartAnswer,
            ask_parts,
            touched_by,
            whatif_of_touched_traces,
        )

        spans_of, trace_ids = touched_by(changes, lookup)
        if len(trace_ids) > ENDPOINT_MAX_TRACES:
            return None
        roots = self._window_roots(since_ns, spans_of, trace_ids)
        del trace_ids
        if roots is None:
            return None
        room, copies = self._room(), self._read_copies()
        window = self._window_spans(since_ns) if self._window_spans is not None else 0

        def ask_split(ids: list[str], spans: int) -> list[PartAnswer] | None:
            # up to three quarters of the window, the touched traces split into files of their own
            if copies != 1 or spans > window * 3 // 4:
                return None
            return self._ask_split_traces(
                since_ns,
                ids,
                spans,
                room,
                lambda contexts, parts: ask_parts(contexts, parts, changes, lookup),
            )

        handed = [roots]  # (handed over: let go of before the touched traces are read)
        del roots
        return whatif_of_touched_traces(
            self._read_traces,
            handed.pop(),
            room,
            changes,
            since_ns=since_ns,
            lookup=lookup,
            copies=copies,
            most_traces=ENDPOINT_MAX_TRACES,
            ask_many=ask_split,
        )

    def _findings_of(self, changes: Sequence[Change], since_ns: int | None) -> FindingLookup | None:
        """The findings of ``changes``' recommendations decided over the whole window
        (``window_findings``), for a what-if asked in partitions (None: no recommendation change).
        A window whose findings cannot be had (no ``window_findings``), or that has no finding of
        one of them, raises."""
        wanted = {change.recommendation for change in changes if change.kind == "recommendation"}
        if not wanted:
            return None
        spans = self._window_spans(since_ns) if self._window_spans is not None else 0
        if self._window_findings is None:
            raise WindowTooLarge(
                f"a recommendation change over a window of {spans:,} spans, more than one context "
                "holds under the memory budget (HOURGLASS_MEMORY_BUDGET), needs the window's findings: "
                "ask over a shorter window (since, e.g. 15m or 1h), or with `hourglass whatif --db`, "
                "which decides them in partitions"
            )
        try:
            found = dict(self._window_findings(since_ns, wanted))
        except Exception as exc:
            raise FindingsFailed(
                f"deciding the findings of {', '.join(sorted(wanted))} over the window failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        for i, change in enumerate(changes):
            if change.kind == "recommendation" and change.recommendation not in found:
                window = "the store" if since_ns is None else "the window"
                raise WhatIfInputError(
                    f"changes[{i}]: no recommendation {change.recommendation!r} among the findings of "
                    f"{window} ({spans:,} spans)"
                )
        return found.get

    def critical_path(self, service: str, operation: str, since: str | None = None) -> dict[str, Any] | None:
        """The endpoint's aggregated critical path; None when no trace is rooted at it."""
        since_ns = since_from_text(since)
        parts = self._parts(since_ns)
        if parts > 1:
            found = self._path_of_endpoint_traces(since_ns, service, operation)
            if found is not None:
                return found[0]
            return self._paths_in_partitions(since_ns, parts, service, operation)[1]
        cached = self._context(since_ns)
        return endpoint_critical_path(cached.ctx, service, operation)

    def _path_of_endpoint_traces(
        self, since_ns: int | None, service: str, operation: str
    ) -> tuple[dict[str, Any] | None] | None:
        """The endpoint's critical path over a window asked in partitions, decided over the
        traces with a span of that endpoint only (``whatif_query.endpoint_path_of_traces``):
        read by their ids, at once or in a few partitions, instead of every span of the window
        (on a 7.2M-span store, the path of an endpoint of 6 % of its traces was a read and a
        repair of all of them, in 14 partitions). (None,) when no trace is rooted there. None when
        the store cannot name those traces (a store without the method) or they are too many to be worth
        it (and one may be rooted there: :meth:`_rooted_nowhere`)."""
        if self._endpoint_traces is None or self._read_traces is None:
            return None
        from hourglass.analysis.planning import few_parts_spans
        from hourglass.analysis.whatif_query import endpoint_path_of_traces

        read = self._read_traces
        with self._partitioned:
            try:
                room, copies = self._room(), self._read_copies()
                most = few_parts_spans(room, copies)
                # up to three quarters of the window, those traces split into files of their own
                window = self._window_spans(since_ns) if self._window_spans is not None else 0
                splits = self._split_window is not None and copies == 1
                found = self._endpoint_traces(
                    service, operation, since_ns, max(most, window * 3 // 4) if splits else most
                )
                if found is None:  # (a non-root operation of most traces: no pass to say so)
                    return None if self._rooted_nowhere(since_ns, service, operation) is None else (None,)
                if found[1] <= most:
                    return endpoint_path_of_traces(read, *found, room, service, operation, since_ns, copies)
                return self._path_of_split_traces(since_ns, service, operation, *found, room)
            finally:
                release_memory()

    def _path_of_split_traces(
        self, since_ns: int | None, service: str, operation: str, ids: list[str], spans: int, room: int
    ) -> tuple[dict[str, Any] | None] | None:
        """The endpoint's critical path over its traces ``ids`` (``spans`` span rows: more than
        a few partitions hold, less than the window), asked from a split of their own
        (:meth:`_ask_split_traces`); None when they are not split: the window's partitions answer."""
        return self._ask_split_traces(
            since_ns,
            ids,
            spans,
            room,
            lambda contexts, parts: (
                endpoint_critical_path_partitioned(contexts, parts, service, operation)[1],
            ),
        )

    def _ask_split_traces(
        self,
        since_ns: int | None,
        ids: list[str],
        spans: int,
        room: int,
        ask: Callable[[Callable[[int, int], AnalysisContext], int], T],
    ) -> T | None:
        """``ask(load, parts)`` over the traces ``ids`` of the window (``spans`` span rows: more
        than a few partitions hold, less than the window), split by one read of the store into
        files of their own (``split_window``), ``load(part, parts)`` the context of each in turn
        (the window selected from them as from the store); None when they are not split
        (``split_store_window``: no room, no disk) or the store cannot split."""
        from hourglass.analysis.planning import PROCESS_BASE_BYTES, BudgetError, question_parts
        from hourglass.analysis.whatif_query import partition_contexts

        if self._split_window is None:
            return None
        try:
            parts = question_parts(spans, room)
        except BudgetError:
            return None
        # (the window's traces already: the split reads them whole, the window is selected after)
        with self._split_window(None, parts, spans, room - PROCESS_BASE_BYTES, ids) as read:
            if read is None:
                return None
            contexts = partition_contexts(read, since_ns)

            def context(part: int, parts: int) -> AnalysisContext:
                release_memory()  # the previous partition's, back to the system before the next
                return contexts(part, parts)

            return ask(context, parts)

    def endpoints(self, since: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The busiest trace roots (service, operation, traces)."""
        since_ns = since_from_text(since)
        parts = self._parts(since_ns)
        if parts > 1:
            listing = self._endpoints_of_roots(since_ns)
            if listing is None:
                listing = self._paths_in_partitions(since_ns, parts, None, None)[0]
            return listing.head(limit).to_dicts()
        cached = self._context(since_ns)
        return endpoints(cached.ctx).head(limit).to_dicts()

    def _endpoints_of_roots(self, since_ns: int | None) -> Any:
        """The endpoints of a window asked in partitions from one aggregation of the store's rows
        (``whatif_query.endpoints_of_roots``: the traces of a plain root counted by it, the others
        read); None when the store cannot say (a store without the method) or those others are too many:
        the window's partitions answer."""
        if self._window_roots is None or self._read_traces is None:
            return None
        with self._partitioned:
            try:
                return self._listing_of_roots(since_ns)
            finally:
                release_memory()

    def _listing_of_roots(self, since_ns: int | None) -> Any:
        """:meth:`_endpoints_of_roots` in the ``_partitioned`` lock the caller holds."""
        from hourglass.analysis.planning import ENDPOINT_MAX_TRACES
        from hourglass.analysis.whatif_query import endpoints_of_roots

        if self._window_roots is None or self._read_traces is None:
            return None
        roots = self._window_roots(since_ns, [], [])
        if roots is None:
            return None
        return endpoints_of_roots(
            self._read_traces,
            roots,
            self._room(),
            since_ns=since_ns,
            copies=self._read_copies(),
            most_traces=ENDPOINT_MAX_TRACES,
        )

    def _rooted_nowhere(self, since_ns: int | None, service: str | None, operation: str | None) -> Any:
        """The window's endpoints (:meth:`_listing_of_roots`) when none of its traces is rooted
        at ``service``/``operation`` (either None: any), in the ``_partitioned`` lock the caller
        holds: an operation in most traces but the root of none is refused without a pass over
        every span. None when one may be (a span of it without a parent: the common case, one
        query) or the store cannot say (a store without the method; too many traces of no plain root)."""
        if self._has_span is None or self._has_span(service, operation, since_ns, True) is not False:
            return None
        # (none of its spans is a plain root: only a trace of no plain root, read, can be rooted there)
        from hourglass.analysis.whatif_query import rooted_nowhere

        listing = self._listing_of_roots(since_ns)
        return listing if listing is not None and rooted_nowhere(listing, service, operation) else None

    def _paths_in_partitions(
        self, since_ns: int | None, parts: int, service: str | None, operation: str | None
    ) -> tuple[Any, dict[str, Any] | None]:
        """(the endpoints, the critical path of service/operation) of the window, in ``parts``
        partitions (``endpoint_path.endpoint_critical_path_partitioned``)."""
        with self._partitioned:
            parts = max(self._parts(since_ns), 1)  # (planned again once the question before is done)
            try:
                with self._partition_contexts(since_ns, parts) as contexts:
                    return endpoint_critical_path_partitioned(contexts, parts, service, operation)
            finally:
                release_memory()
