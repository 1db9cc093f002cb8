"""Background analysis for the API: re-analyse the store as traces settle, serve cached reports.

Reads must be fast and must never block ingest, so the REST API never analyses on a request's
path. One background thread watches the store and re-runs the whole analysis when

* new spans arrived and nothing new arrived for ``settle_seconds`` (the traces have settled:
  their late spans are in), or
* new spans keep arriving without a pause, and the cached report is older than
  ``max_staleness_seconds`` (default ``max(6 × settle, 60 s)``), so a busy system still gets
  fresh reports — or than ``STALE_DURATION_FACTOR`` (10) times the last run's duration, if that
  is longer: under continuous ingest into a big store, re-analysis then takes at most about a
  tenth of the time instead of running back to back against ingest.

With incremental analysis (the default on a DuckDB store, :mod:`hourglass.analysis.incremental`)
a run is a *round*: the traces settled since the last round are extracted once and the report is
decided over the stored rows, so under continuous ingest rounds run every
:meth:`AnalysisService.incremental_interval` seconds instead of waiting for staleness.

The analysis itself runs in a long-lived worker process (:class:`AnalysisWorker`, in
:mod:`hourglass.api.analysis_worker`): the server
process only scans the store (DuckDB, outside the GIL) and hands the Arrow table over, so the
analysis' CPU time never competes for the GIL with the OTLP receivers and the API.

Each run produces an immutable :class:`ReportSnapshot`: the report object, the recommendations
indexed by id, and each recommendation pre-serialised to JSON, so a read filters in memory and
joins bytes. The HTML page (with its exemplar waterfalls, which need the exemplar traces from the
store) is rendered right after the run in a thread of its own, so the next round does not wait for
it (a reader of the page before it is done renders it then).

Rounds follow each other as the traces settle: the loop looks again as soon as a run ends (a
round due under continuous ingest starts at once), and what a run leaves behind in this process
is returned to the system after it (:func:`release_memory`).

Runs are serialised by a lock; a run asked for while another is in progress waits for it and,
if that run started after the request, returns its result instead of analysing twice.
Failures are never swallowed: the error is logged with its traceback, kept in
:meth:`AnalysisService.status` (served by ``/v1/stats`` and ``POST /v1/analyses``), and the last
good report keeps being served.

The module is split along its seams: this one schedules (the service loop, staleness,
``run_now``, status); :mod:`hourglass.api.analysis_worker` is the worker process and the table
shipping; :mod:`hourglass.api.analysis_snapshot` the report snapshots and their JSON;
:mod:`hourglass.api.exemplars` the exemplar pictures of the page. The names other modules used
from here stay importable from here.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import pickle
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from hourglass.analysis import memlog
from hourglass.analysis.trace_index import TraceIndex
from hourglass.analysis.writers import select_writer
from hourglass.api import kept_report, report_html, server_memory
from hourglass.api.analysis_snapshot import ReportSnapshot, dumps
from hourglass.api.analysis_worker import (
    AnalysisWorker,
    StoreReader,
    analyze_spans,
    lower_priority_of_this_thread,
    result_folder,
    run_incremental,
)
from hourglass.api.exemplars import (
    build_exemplar,
    build_exemplars,
    retime,
    table_trace_fetcher,
    trace_detail,
)
from hourglass.collector.schema import ANALYSIS_COLUMNS
from hourglass.collector.store import SpanStore
from hourglass.settings import default, iso_ns

__all__ = [
    "AnalysisService",
    "AnalysisWorker",
    "ReportSnapshot",
    "TraceIndex",
    "analyze_spans",
    "build_exemplar",
    "build_exemplars",
    "dumps",
    "retime",
    "select_writer",
    "table_trace_fetcher",
    "trace_detail",
]

log = logging.getLogger("hourglass.api.analysis")

WINDOW_CACHE_SIZE = 8  # analyses of a `since` window kept per report generation
STALE_DURATION_FACTOR = 10
# runs the loop starts as traces settle; any other run (startup, requested, first read) takes
# every stored trace as settled
SCHEDULED_REASONS = ("settled", "settling", "stale")


class AnalysisService:
    """Runs the analysis in a background thread as traces settle and keeps the latest report."""

    def __init__(
        self,
        store: SpanStore,
        *,
        settle_seconds: float = 10.0,
        max_staleness_seconds: float | None = None,
        poll_seconds: float | None = None,
        writer: Any = "auto",
        settings: Any = None,
        isolate: bool = True,
        render_html: bool = True,
        freeze_gc: bool = True,
    ) -> None:
        self.store = store
        self.settle_seconds = max(float(settle_seconds), 0.0)
        self.max_staleness_seconds = (
            max_staleness_seconds if max_staleness_seconds is not None else max(6 * self.settle_seconds, 60.0)
        )
        self.poll_seconds = (
            poll_seconds if poll_seconds is not None else min(max(self.settle_seconds / 4, 0.2), 2.0)
        )
        self._writer = writer
        self._writer_resolved = writer != "auto"
        self._settings = settings
        # The analysis runs in a worker process unless a writer object was given (not picklable).
        self._worker = AnalysisWorker() if isolate and writer == "auto" else None
        # Incremental analysis (hourglass.analysis.incremental): each settled trace extracted once,
        # the report decided over the stored rows. Needs a store that knows when spans arrived
        # (DuckDB's trace_arrivals); HOURGLASS_INCREMENTAL_ANALYSIS=false: the whole store each run.
        self._incremental_enabled = (
            bool(getattr(settings, "incremental_analysis", True)) if settings is not None else True
        )
        self._incremental: bool | None = None  # decided on first use (the store is not touched before)
        self._incremental_state: Any = None  # in-process runs (no worker): IncrementalAnalysis
        self._incremental_lock = threading.Lock()
        self._incremental_figures: dict[str, Any] = {}
        # serve --cluster: the incremental rounds extract and price their batches on this Dask
        # scheduler (hourglass.analysis.batch_tasks); the decision stays here
        self.cluster: str | None = getattr(settings, "cluster", None) if settings is not None else None
        self._cluster_connection: Any = None  # in-process runs (no worker): batch_tasks.Cluster
        self._cluster_unused_said = False
        self.render_html = render_html
        self.freeze_gc = freeze_gc
        self._snapshot: ReportSnapshot | None = None
        self._html: tuple[int, bytes] | None = None
        self._run_lock = threading.Lock()
        self._html_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._first_done = threading.Event()  # set when the first run ends, well or not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running_since: float | None = None
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._last_duration_s: float | None = None
        self._last_stages_s: dict[str, float] = {}  # seconds per step of the last run (status)
        self._last_reads: dict[str, float] = {}  # the worker's reads answered here, by kind (status)
        self._last_partitions: int | None = None  # the last whole-store run's partitions (status)
        # the report page is rendered in its own thread, so the next round need not wait for it
        self._page_wanted: ReportSnapshot | None = None
        self._page_thread: threading.Thread | None = None
        self._runs = 0
        self._failures = 0
        self._generation = 0
        self._windows: OrderedDict[tuple[int, int], ReportSnapshot] = OrderedDict()
        # the last report kept beside the store for a restart (kept_report): where and with what
        # key (None: not worked out yet; False: nothing kept for this store), and when last kept
        self._keeping: tuple[str, dict[str, Any]] | bool | None = None
        self._background = False  # start() ran: a service that lives on (serve's), not one read
        self._kept: tuple[int, float] | None = None  # (generation, monotonic time) of the last kept
        self._keep_lock = threading.Lock()
        self._keep_failures = 0
        # Called after every background/requested run with (outcome "ok"|"failed", seconds, snapshot
        # or None): the /metrics counters (api.metrics). A listener's error is logged, never raised.
        self.run_listeners: list[Callable[[str, float, ReportSnapshot | None], None]] = []
        # what this service tells the person running it (serve: a line on its output, as the
        # store's size); the log at INFO otherwise
        self.say: Callable[[str], None] = log.info

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._background = True  # (its reports are kept for a restart: kept_report)
        if self._worker is not None:
            self._worker.start()
        self._thread = threading.Thread(target=self._loop, name="hourglass-analysis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.close()
        loop = self._thread
        if loop is not None:
            loop.join(timeout)
            self._thread = None
        page = self._page_thread
        if page is not None:
            page.join(timeout)  # it reads the store, which the caller closes next
        snapshot = self._snapshot
        if snapshot is not None:  # the report a restart serves until its first round
            self._keep(snapshot, now=True)
        if self._cluster_connection is not None:
            self._cluster_connection.close()
            self._cluster_connection = None
        self._close_incremental_state(running=loop is not None and loop.is_alive())

    def _close_incremental_state(self, *, running: bool) -> None:
        """The in-process incremental state (no worker) closed once its rounds stopped: the
        sidecar's connection let go, and a store in memory's temporary folder removed (it was left
        in the system's temporary folder, one per stop). Not while a round still runs (the loop
        did not end within ``stop``'s timeout): that round keeps using it, and the state is whole
        on disk between its writes."""
        if running or not self._incremental_lock.acquire(timeout=1.0):
            log.warning("the analysis is still running: its incremental state is left open")
            return
        try:
            state, self._incremental_state = self._incremental_state, None
        finally:
            self._incremental_lock.release()
        if state is not None:
            try:
                state.close()
            except Exception:  # (on the way out: the state is whole on disk whatever happens here)
                log.warning("closing the incremental analysis state failed", exc_info=True)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        lower_priority_of_this_thread()  # its store scans run in this thread (one DuckDB thread)
        self._restore_kept()
        last_seen: int | None = None
        last_change = time.monotonic()
        first = True
        retry_at = 0.0  # after a failed run, wait before the next attempt (doubling, up to a minute)
        backoff = 1.0
        while not self._stop.is_set():
            try:
                count = self._change_marker()
            except Exception as exc:
                log.exception("store stats failed; retrying")
                self._record_error(exc)
                self._stop.wait(max(self.poll_seconds, 1.0))
                continue
            now = time.monotonic()
            if count != last_seen:
                last_seen, last_change = count, now
            snapshot = self._snapshot
            reason: str | None = None
            if first or self._runs == 0:
                reason = "startup"  # whatever is stored already has settled: report it at once
            elif snapshot is None or count != snapshot.change_marker:
                if now - last_change >= self.settle_seconds:
                    reason = "settled"
                elif self.incremental and (
                    snapshot is None or now - snapshot.started_monotonic >= self.incremental_interval()
                ):
                    reason = "settling"  # a round costs only what settled since the last one
                elif snapshot is None or now - snapshot.started_monotonic >= self.stale_after_seconds():
                    reason = "stale"  # spans keep arriving without a pause
            if reason is not None and now >= retry_at:
                first = False
                try:
                    self.run_now(reason=reason, seen_marker=count if reason in SCHEDULED_REASONS else None)
                    backoff = 1.0
                    # look again at once: under continuous ingest the next round is due as soon
                    # as this one ended (incremental_interval), and a poll's wait is lag
                    continue
                except Exception:
                    # Logged and recorded by run_now; the last good report keeps being served.
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, 60.0)
            self._stop.wait(self.poll_seconds)

    # -- running -----------------------------------------------------------------------------

    @property
    def incremental(self) -> bool:
        if self._incremental is None:
            self._incremental = self._incremental_enabled and callable(
                getattr(self.store, "trace_arrivals", None)
            )
        return self._incremental

    def incremental_interval(self) -> float:
        """Seconds between incremental rounds under continuous ingest: half the settle time
        (1-10 s), and never less than the last round took (analysis at most half the time)."""
        return max(min(max(self.settle_seconds / 2, 1.0), 10.0), self._last_duration_s or 0.0)

    def stale_after_seconds(self) -> float:
        """How old the report may get while spans keep arriving (see the module doc)."""
        return max(self.max_staleness_seconds, STALE_DURATION_FACTOR * (self._last_duration_s or 0.0))

    def _resolve_writer(self) -> Any:
        if not self._writer_resolved:
            self._writer = select_writer(self._settings)
            self._writer_resolved = True
        return self._writer

    def _record_error(self, exc: BaseException) -> None:
        with self._state_lock:
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._last_error_at = time.time()

    def _change_marker(self) -> int:
        """A number that changes when spans are written: the store's physical row count when it
        offers one (``raw_row_count``, cheap: no de-duplication), else its span count."""
        raw_row_count = getattr(self.store, "raw_row_count", None)
        if callable(raw_row_count):
            return int(raw_row_count())
        return int(self.store.stats().spans)

    def _run_incremental(
        self, *, since_ns: int | None, stages: dict[str, float], everything: bool = False
    ) -> tuple[dict[str, Any], TraceIndex, int, int]:
        """One incremental round (the report of the window ``since_ns``; the whole retention
        window advances the extraction state first). ``everything``: a run asked for (startup,
        ``POST /v1/analyses``, a first read) takes every stored trace as settled, as the whole-store
        analysis did; a trace that gets more spans later is re-extracted like any late arrival."""
        marker = self._change_marker()
        # The unique span count (what the status shows as the spans the run covered) examines
        # every trace written since the last compaction (1-2 s at 10M stored under 20,000
        # spans/s): counted in a thread of its own while the worker runs the round, not before it;
        # not beside the worker's reads (the store runs one memory-heavy query at a time:
        # ``DuckDBSpanStore.serialized``), so its hash tables and a read's sort do not add up.
        count = _Counting(self.store, stages)
        now_ns = time.time_ns()
        # imported here: the incremental module loads the detectors (~0.3 s), which starting the
        # app does not need
        from hourglass.analysis.incremental import sidecar_path

        sidecar = sidecar_path(str(getattr(self.store, "path", ":memory:")))
        request = {
            "sidecar": sidecar,
            "update": since_ns is None,
            "cutoff_ns": now_ns + 1 if everything else now_ns - int(self.settle_seconds * 1e9),
            # arrivals are re-read from a settle time before the last cutoff: a span acknowledged
            # a little after it got its ingest time is still seen
            "margin_ns": int(max(self.settle_seconds, 5.0) * 1e9),
            # rows go with the traces retention removed from the store (serve's maintenance)
            "retention_cutoff_ns": getattr(self.store, "retention_cutoff_ns", None),
            "since_ns": since_ns,
            # the report's window cut to its newest spans up to this (HOURGLASS_REPORT_MAX_SPANS)
            "max_spans": self._report_max_spans(),
            "explain": True,
            "cluster": self.cluster,
            # the trace index comes back in a file there, read per lookup (not in this process)
            "results": result_folder(sidecar),
        }
        try:
            report, index, figures = self._incremental_round(request, stages)
        except BaseException:
            with contextlib.suppress(Exception):  # the round's error is the one to tell
                count.result()
            raise
        spans_in_store = count.result()
        if since_ns is None:
            with self._state_lock:
                self._incremental_figures = figures
            if figures.get("pending_traces"):
                marker = -1  # traces still settling: the loop runs another round for them
                # the run's span count is what it covers (spans_at_last_run in the status)
                spans_in_store = max(spans_in_store - int(figures.get("pending_spans") or 0), 0)
            spans_in_store = _covered(report, spans_in_store)
        return report, index, spans_in_store, marker

    def _report_max_spans(self) -> int | None:
        """``HOURGLASS_REPORT_MAX_SPANS`` (None: no cut)."""
        chosen = getattr(self._settings, "report_max_spans", None) if self._settings is not None else None
        value = int(default("report_max_spans") if chosen is None else chosen)
        return value if value > 0 else None

    def _incremental_round(
        self, request: dict[str, Any], stages: dict[str, float]
    ) -> tuple[dict[str, Any], TraceIndex, dict[str, Any]]:
        """The round of ``request`` in the analysis worker (or here without one)."""
        reader = StoreReader(self.store)
        if self._worker is not None:
            reads: dict[str, float] = {}
            report, index, figures = self._worker.run_incremental(
                request, reader, settings=self._settings, stages=stages, reads=reads
            )
            with self._state_lock:
                self._last_reads = reads
        else:
            from hourglass.analysis.incremental import IncrementalAnalysis

            started = time.perf_counter()
            with self._incremental_lock:
                if self._incremental_state is None:
                    self._incremental_state = IncrementalAnalysis(request["sidecar"])
                if self.cluster and self._cluster_connection is None:
                    from hourglass.analysis.batch_tasks import Cluster

                    self._cluster_connection = Cluster(self.cluster)
                report, index, figures = run_incremental(
                    self._incremental_state,
                    reader,
                    request,
                    writer=self._resolve_writer(),
                    cluster=self._cluster_connection,
                )
            stages["analysis"] = time.perf_counter() - started
        return report, index, figures

    def _run_analysis(
        self,
        *,
        since_ns: int | None = None,
        stages: dict[str, float] | None = None,
        everything: bool = True,
    ) -> tuple[dict[str, Any], TraceIndex, int, int]:
        """One analysis of the store; ``stages`` (when given) gets the seconds of each step."""
        stages = {} if stages is None else stages
        if self.incremental:
            return self._run_incremental(since_ns=since_ns, stages=stages, everything=everything)
        if self.cluster and not self._cluster_unused_said:
            self._cluster_unused_said = True
            log.warning(
                "--cluster %s is used by the incremental analysis only (a DuckDB store, "
                "HOURGLASS_INCREMENTAL_ANALYSIS on): this store is re-analysed in serve",
                self.cluster,
            )
        started = time.perf_counter()
        marker = self._change_marker()
        stats = self.store.stats()
        spans_in_store = stats.spans
        asked_since = since_ns
        since_ns = self._newest_since(since_ns)
        plan = self._partition_plan(since_ns, spans_in_store)
        stages["store_stats"] = time.perf_counter() - started
        if plan is not None:
            report, index = self._run_partitioned(plan, since_ns, stages)
            report = self._cut(report, asked_since, since_ns, stats)
            return report, index, _covered(report, spans_in_store), marker
        with self._state_lock:
            self._last_partitions = 1
        started = time.perf_counter()
        table = self.store.scan(since_ns=since_ns, columns=ANALYSIS_COLUMNS)
        from hourglass.analysis.resources import attach_store_resources

        table = attach_store_resources(table, self.store)  # services' languages, for the designs
        stages["scan"] = time.perf_counter() - started
        if self._worker is not None:
            from hourglass.analysis.incremental import sidecar_path

            results = result_folder(sidecar_path(str(getattr(self.store, "path", ":memory:"))))
            report, index = self._worker.run(
                table,
                settings=self._settings,
                since_ns=since_ns,
                stages=stages,
                explain=True,
                results=results,
            )
        else:
            started = time.perf_counter()
            report, index = analyze_spans(
                table, writer=self._resolve_writer(), since_ns=since_ns, explain=True
            )
            stages["analysis"] = time.perf_counter() - started
        del table
        report = self._cut(report, asked_since, since_ns, stats)
        return report, index, _covered(report, spans_in_store), marker

    def _newest_since(self, since_ns: int | None) -> int | None:
        """The window of a whole-store analysis (a ClickHouse store, or no incremental analysis)
        cut to its newest ``HOURGLASS_REPORT_MAX_SPANS`` span rows, about (the traces with a span
        starting from the store's ``newest_start_ns``), as the incremental rounds cut theirs: each
        run re-reads its window, so without the cut its time (and an embedded ClickHouse's
        memory) grew with the store for as long as serve ran. ``since_ns`` as it is when the
        window holds no more, or the store cannot tell."""
        limit = self._report_max_spans()
        newest_start = getattr(self.store, "newest_start_ns", None)
        if limit is None or not callable(newest_start):
            return since_ns
        start = newest_start(limit)
        if start is None:
            return since_ns
        start = int(start) - int(start) % 1000  # (whole microseconds: what --since and ?since= take)
        return since_ns if since_ns is not None and since_ns >= start else start

    def _cut(
        self, report: dict[str, Any], asked_since: int | None, since_ns: int | None, stats: Any
    ) -> dict[str, Any]:
        """``report`` with its ``window`` when :meth:`_newest_since` cut it (what it left out)."""
        if since_ns == asked_since or since_ns is None:
            return report
        spans = int(report.get("spans_analyzed") or 0)
        whole = asked_since is None  # (a since window's own span and trace counts are not known)
        counted = getattr(self.store, "span_rows_since", None)
        in_window = stats.spans if whole or not callable(counted) else int(counted(asked_since))
        left_out = in_window - spans
        report["window"] = {
            "max_spans": self._report_max_spans(),
            "spans": spans,
            "spans_left_out": max(int(left_out), 0),
            "traces_left_out": max(stats.traces - int(report.get("traces_analyzed") or 0), 0)
            if whole
            else None,
            "from_ns": since_ns,
            "from": iso_ns(since_ns),
        }
        return report

    def _partition_plan(self, since_ns: int | None, spans_in_store: int) -> Any:
        """The plan (``hourglass.analysis.planning.plan``) of a whole-store analysis of the
        window ``since_ns`` in partitions of whole traces, when its spans are more than one
        context holds within the memory budget (``HOURGLASS_MEMORY_BUDGET``), or in
        ``HOURGLASS_SERVE_PARTITIONS`` of them when that is set; None: at once.
        Before, every run read the whole window into this process and the worker, so a ClickHouse
        store (not analysed incrementally) took memory in proportion to its spans."""
        from hourglass.analysis import planning
        from hourglass.settings import default

        budget = int(getattr(self._settings, "memory_budget", None) or default("memory_budget"))
        counted = getattr(self.store, "span_rows_since", None)
        spans = int(counted(since_ns)) if since_ns is not None and callable(counted) else spans_in_store
        chosen_parts = int(getattr(self._settings, "serve_partitions", 0) or 0)  # HOURGLASS_SERVE_PARTITIONS
        if chosen_parts == 1 or (chosen_parts == 0 and spans <= planning.at_once_spans(budget)):
            return None
        try:
            # planned as for two workers: two processes hold a partition each, the server its read
            # (measured at 1M spans over an embedded ClickHouse: 2 partitions planned for one
            # process, the server's peak 1.12 GiB and both 1.63; 6 partitions, 0.85 and 1.14, in
            # the same time)
            # (partitions by rows, whatever the traces: the window's, as its partitions take them)
            sizes = getattr(self.store, "trace_sizes", None)
            loads = planning.loads_of(*sizes(since_ns=since_ns)) if callable(sizes) else None
            chosen = planning.plan(spans, budget, 2, loads=loads)
        except planning.BudgetError as exc:
            if chosen_parts == 0:  # (the message names --memory-budget: serve reads the variable)
                raise RuntimeError(f"{exc} (HOURGLASS_MEMORY_BUDGET)") from None
            chosen = planning.Plan(spans, chosen_parts, 1)
        if chosen_parts > 1:
            return planning.Plan(spans, chosen_parts, 1, chosen.buckets)
        return chosen if chosen.parts > 1 else None

    def window_findings(self, since_ns: int | None, ids: set[str]) -> dict[str, Any]:
        """The findings ``ids`` of the window ``since_ns`` (None: the whole store) by id, decided
        over every trace of the window as its report decides them
        (``analysis_worker.window_findings``): what a recommendation what-if over a window
        larger than one context applies (``hourglass.api.queries``). An incremental serve decides
        them over its stored rows; else the window is read in the partitions of its plan (at
        least one), in the worker. An id the window does not have is not in the result."""
        from hourglass.api.analysis_worker import StoreReader, window_findings

        reader = StoreReader(self.store)
        request: dict[str, Any] = {"ids": sorted(ids), "since_ns": since_ns}
        if self.incremental:
            from hourglass.analysis.incremental import IncrementalAnalysis, sidecar_path

            request["incremental"] = True
            request["sidecar"] = sidecar_path(str(getattr(self.store, "path", ":memory:")))
            request["cluster"] = self.cluster
            if self._worker is not None:
                return self._worker.findings(request, reader, settings=self._settings)
            with self._incremental_lock:
                if self._incremental_state is None:
                    self._incremental_state = IncrementalAnalysis(request["sidecar"])
                found = window_findings(
                    reader, request, state=self._incremental_state, cluster=self._cluster_connection
                )
            # their occurrences parked in the state's folder read back into memory, as the worker's
            # come through its pipe: the question applies them after the lock, beside later rounds
            return dict(pickle.loads(pickle.dumps(found, protocol=pickle.HIGHEST_PROTOCOL)))
        plan = self._partition_plan(since_ns, self.store.stats().spans)
        request["parts"] = plan.parts if plan is not None else 1
        request["spill_buckets"] = plan.buckets if plan is not None else 0
        if self._worker is not None:
            return self._worker.findings(request, reader, settings=self._settings)
        return window_findings(reader, request)

    def _run_partitioned(
        self, plan: Any, since_ns: int | None, stages: dict[str, float]
    ) -> tuple[dict[str, Any], TraceIndex]:
        """:meth:`_run_analysis` of ``plan``: in the worker, one partition at a time, each read
        from the store here when the worker asks for it (:meth:`AnalysisWorker.run_partitioned`)."""
        from hourglass.api.analysis_worker import StoreReader, analyze_partitions

        reader = StoreReader(self.store)
        if self._worker is not None:
            from hourglass.analysis.incremental import sidecar_path

            request = {
                "parts": plan.parts,
                "since_ns": since_ns,
                "spill_buckets": plan.buckets,
                "explain": True,
                "results": result_folder(sidecar_path(str(getattr(self.store, "path", ":memory:")))),
            }
            reads: dict[str, float] = {}
            report, index = self._worker.run_partitioned(
                request, reader, settings=self._settings, stages=stages, reads=reads
            )
            with self._state_lock:
                self._last_reads = reads
                self._last_partitions = plan.parts
            return report, index
        started = time.perf_counter()
        report, index = analyze_partitions(
            reader,
            plan.parts,
            since_ns=since_ns,
            spill_buckets=plan.buckets,
            writer=self._resolve_writer(),
            explain=True,
        )
        stages["analysis"] = time.perf_counter() - started
        with self._state_lock:
            self._last_partitions = plan.parts
        return report, index

    def run_now(self, reason: str = "requested", *, seen_marker: int | None = None) -> ReportSnapshot:
        """Analyse the whole store now and publish the result (coalescing concurrent requests).
        ``seen_marker``: the store's change marker that made the background loop ask for this
        run; a run that finished meanwhile at that marker (``POST /v1/analyses`` while the loop
        waited for it) already covers it, and its report is returned instead of a second run."""
        requested = time.monotonic()
        with self._run_lock:
            current = self._snapshot
            if current is not None and current.started_monotonic >= requested:
                return current  # a run that started after this request has just finished
            if seen_marker is not None and current is not None and current.change_marker == seen_marker:
                return current  # what the loop saw change is in the report already
            started_monotonic = time.monotonic()
            started_at = time.time()
            with self._state_lock:
                self._running_since = started_at
            stages: dict[str, float] = {}
            try:
                report, index, spans_in_store, marker = self._run_analysis(
                    stages=stages, everything=reason not in SCHEDULED_REASONS
                )
                built = time.perf_counter()
                snapshot = ReportSnapshot.build(
                    report,
                    trace_index=index,
                    generation=self._generation + 1,
                    spans_in_store=spans_in_store,
                    change_marker=marker,
                    started_at=started_at,
                    started_monotonic=started_monotonic,
                    reason=reason,
                )
                stages["snapshot"] = time.perf_counter() - built
                memlog.note("server: report snapshot built")
            except Exception as exc:
                if self._stop.is_set():
                    log.info("analysis run (%s) interrupted by shutdown", reason)
                else:
                    log.exception("analysis run failed (%s)", reason)
                with self._state_lock:
                    self._failures += 1
                    self._running_since = None
                self._record_error(exc)
                self._notify_run("failed", time.time() - started_at, None)
                self._first_done.set()  # readers waiting for a first report get the error now
                raise
            with self._state_lock:
                self._generation = snapshot.generation
                self._snapshot = snapshot
                self._runs += 1
                self._last_duration_s = snapshot.finished_at - started_at
                self._last_stages_s = stages
                self._running_since = None
                self._last_error = None
                self._windows.clear()
            self._first_done.set()
            self._notify_run("ok", snapshot.finished_at - started_at, snapshot)
            log.info(
                "analysis %d (%s): %s spans, %d recommendations in %.2f s (%s)",
                snapshot.generation,
                reason,
                report.get("spans_analyzed"),
                len(snapshot.by_id),
                self._last_duration_s,
                ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()),
            )
        if self.render_html:
            self._render_page_soon(snapshot)
        self._keep(snapshot)
        started = time.perf_counter()
        if self.freeze_gc:
            # A long-lived report is ~100k Python objects at 1M spans; every full collection would
            # walk them again (100-300 ms with the GIL held: the p99 of every request). Collect the
            # run's garbage once now, then move the survivors out of the collector's sight. The
            # snapshot holds no reference cycles, so replacing it still frees it by refcount.
            gc.collect()
            gc.freeze()
        release_memory(self.store)
        memlog.note("server: report published, memory released")
        with self._state_lock:
            if self._generation == snapshot.generation:
                self._last_stages_s["release"] = time.perf_counter() - started
        return snapshot

    def _keep_where(self) -> tuple[str, dict[str, Any]] | None:
        """Where this store's report is kept and the key it is kept with (None: a store that is
        not a file of this machine, or no ``pread`` to read a kept index with)."""
        if self._keeping is None:
            self._keeping = False
            path = getattr(self.store, "path", None)
            if isinstance(path, str) and hasattr(os, "pread"):
                from hourglass.analysis.incremental import sidecar_path

                sidecar = sidecar_path(path)
                # (who writes the texts, without making the writer: the agent's SDK is the
                # worker's import, not the server's)
                writer = (
                    type(self._writer).__name__
                    if self._writer_resolved
                    else ("agent" if os.environ.get("ANTHROPIC_API_KEY") else "template")
                )
                key = kept_report.key_of(path, self._settings, writer) if sidecar else None
                if sidecar and key is not None:
                    self._keeping = (kept_report.folder_of(sidecar), key)
        return self._keeping if isinstance(self._keeping, tuple) else None

    def _restore_kept(self) -> None:
        """Serve the report kept by the last process of this store (:mod:`kept_report`) until the
        first round of this one replaces it; its generation goes on from there."""
        try:
            where = self._keep_where()
            restored = kept_report.restore(*where) if where is not None else None
        except Exception:  # (never in the way of the rounds: they make a report anyway)
            log.warning("could not look for a kept report", exc_info=True)
            return
        if restored is None:
            return
        with self._state_lock:
            if self._snapshot is not None:  # a round was quicker
                return
            self._snapshot = restored
            self._generation = max(self._generation, restored.generation)
            # (kept already; the first round of this run is kept at once: a crash then restores it)
            self._kept = (restored.generation, float("-inf"))
        self._first_done.set()  # (readers waiting for a first report take this one)
        self.say(
            f"serving the report kept at {_iso(restored.finished_at)} (analysis {restored.generation},"
            f" {len(restored.by_id)} recommendations) until this run's first analysis"
        )

    def _keep(self, snapshot: ReportSnapshot, *, now: bool = False) -> None:
        """Keep ``snapshot`` for a restart when ``KEEP_EVERY_S`` passed since the last one kept
        (``now``: at once, as serve stops); a restored one, or one kept already, is not kept
        again. A failure is logged: the rounds go on, and a restart waits for its first one."""
        if snapshot.reason == kept_report.RESTORED or not self._background:
            return
        with self._keep_lock:
            kept = self._kept
            if kept is not None and (
                kept[0] >= snapshot.generation
                or (not now and time.monotonic() - kept[1] < kept_report.KEEP_EVERY_S)
            ):
                return
            where = None
            try:
                where = self._keep_where()
                if where is None:
                    return
                kept_report.save(where[0], snapshot, where[1])
            except Exception as exc:
                self._keep_failures += 1
                folder = where[0] if where is not None else "the store's folder"
                # (said the first time, then with the count every 60th: at most every five hours)
                if self._keep_failures % 60 == 1:
                    log.warning(
                        "could not keep the report for a restart in %s (%s; %d time(s) so far)",
                        folder,
                        exc,
                        self._keep_failures,
                    )
            self._kept = (snapshot.generation, time.monotonic())

    def _render_page_soon(self, snapshot: ReportSnapshot) -> None:
        """Render the report page of ``snapshot`` in the page thread (started when none runs): it
        reads the exemplar traces from the store, seconds in a large one, and the loop starts the
        next round meanwhile. A newer snapshot asked for before it starts replaces it; a reader of
        the page before it is done renders it itself (``html`` renders each generation once)."""
        with self._state_lock:
            self._page_wanted = snapshot
            if self._page_thread is not None and self._page_thread.is_alive():
                return
            self._page_thread = threading.Thread(
                target=self._page_loop, name="hourglass-report-page", daemon=True
            )
            self._page_thread.start()

    def _page_loop(self) -> None:
        lower_priority_of_this_thread()
        while not self._stop.is_set():
            with self._state_lock:
                snapshot, self._page_wanted = self._page_wanted, None
                if snapshot is None:
                    self._page_thread = None
                    return
            started = time.perf_counter()
            try:
                self.html(snapshot)
            except Exception as exc:
                log.exception("rendering the HTML report failed")
                self._record_error(exc)
                continue
            memlog.note("server: report page rendered")
            with self._state_lock:
                if self._generation == snapshot.generation:
                    self._last_stages_s["html"] = time.perf_counter() - started

    def _notify_run(self, outcome: str, seconds: float, snapshot: ReportSnapshot | None) -> None:
        for listener in list(self.run_listeners):
            try:
                listener(outcome, seconds, snapshot)
            except Exception:
                log.exception("analysis run listener failed")

    # -- reads -------------------------------------------------------------------------------

    @property
    def snapshot(self) -> ReportSnapshot | None:
        return self._snapshot

    def wait_first(self, timeout: float) -> ReportSnapshot | None:
        """The current report, waiting up to ``timeout`` s for the first run (started if not yet)."""
        if self._snapshot is not None:
            return self._snapshot
        if not self.running:
            try:
                return self.run_now(reason="first read")
            except Exception:
                return None
        self._first_done.wait(timeout)
        return self._snapshot

    def window(self, since_ns: int) -> ReportSnapshot:
        """A report over spans since ``since_ns`` (analysed on demand, cached per generation)."""
        generation = self._generation
        key = (generation, since_ns)
        with self._state_lock:
            cached = self._windows.get(key)
            if cached is not None:
                self._windows.move_to_end(key)
                return cached
        started_monotonic, started_at = time.monotonic(), time.time()
        report, index, spans_in_store, marker = self._run_analysis(since_ns=since_ns)
        snapshot = ReportSnapshot.build(
            report,
            trace_index=index,
            generation=generation,
            spans_in_store=spans_in_store,
            started_at=started_at,
            started_monotonic=started_monotonic,
            reason="window",
            change_marker=marker,
        )
        with self._state_lock:
            self._windows[key] = snapshot
            while len(self._windows) > WINDOW_CACHE_SIZE:
                self._windows.popitem(last=False)
        return snapshot

    def html(self, snapshot: ReportSnapshot | None = None) -> bytes:
        """The HTML page of a report (the current one by default), rendered once per generation."""
        snapshot = snapshot or self._snapshot
        if snapshot is None:
            raise RuntimeError("no report yet")
        cached = self._html
        if cached is not None and cached[0] == snapshot.generation:
            return cached[1]
        with self._html_lock:
            cached = self._html
            if cached is not None and cached[0] == snapshot.generation:
                return cached[1]
            exemplars = build_exemplars(snapshot.report, self.store.trace, snapshot.trace_index)
            generated = datetime.fromtimestamp(snapshot.finished_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            source = f"analysis #{snapshot.generation}, finished {generated}"
            if snapshot.reason == kept_report.RESTORED:
                source += ", kept from before serve restarted (the next analysis replaces it)"
            page = report_html.render_report_html(snapshot.report, exemplars, source=source).encode()
            if self._html is None or self._html[0] <= snapshot.generation:
                self._html = (snapshot.generation, page)
            return page

    def status(self) -> dict[str, Any]:
        with self._state_lock:
            snapshot = self._snapshot
            if self._running_since is not None:
                state = "running"
            elif snapshot is None:
                state = "failed" if self._last_error else "pending"
            else:
                state = "ready"
            return {
                "state": state,
                "generation": self._generation,
                "runs": self._runs,
                "failures": self._failures,
                "running_since": _iso(self._running_since),
                "last_started_at": _iso(snapshot.started_at) if snapshot else None,
                "last_finished_at": _iso(snapshot.finished_at) if snapshot else None,
                "last_duration_ms": round(self._last_duration_s * 1000, 1) if self._last_duration_s else None,
                # where the last run's time went: store_stats, scan, worker_start, send, analysis,
                # receive, snapshot (all inside last_duration_ms), then release (collecting its
                # garbage, returning memory) and html (the page, rendered in its own thread)
                "last_stages_ms": {k: round(v * 1000, 1) for k, v in self._last_stages_s.items()},
                # the incremental round's reads of the store for the worker ("scan"), by kind:
                # recent (the recent rows by trace: arrivals), between (traces compaction or
                # retention changed, counted again), batch (a batch's spans), traces (exemplars'
                # and pricing's traces by id)
                "last_reads_ms": {
                    k: (v if k.endswith("_count") else round(v * 1000, 1))
                    for k, v in self._last_reads.items()
                },
                "last_reason": snapshot.reason if snapshot else None,
                # the report served is the one kept by the last process of this store, until the
                # first round of this one (kept_report)
                "restored": snapshot is not None and snapshot.reason == kept_report.RESTORED,
                "spans_at_last_run": snapshot.spans_in_store if snapshot else None,
                "last_error": self._last_error,
                "last_error_at": _iso(self._last_error_at),
                "settle_seconds": self.settle_seconds,
                "max_staleness_seconds": self.max_staleness_seconds,
                "stale_after_seconds": round(self.stale_after_seconds(), 1),
                "incremental": self.incremental,
                # a whole-store run (not incremental): the partitions of whole traces its worker
                # read one at a time (1: the store at once; HOURGLASS_MEMORY_BUDGET decides)
                "partitions": None if self.incremental else self._last_partitions,
                # serve --cluster: the Dask scheduler the rounds' batches run on (None: here)
                "cluster": self.cluster if self.incremental else None,
                # the last incremental round: traces settled and extracted, batches, what it read
                "incremental_round": dict(self._incremental_figures),
            }


class _Counting:
    """``store.stats().spans`` counted in a thread of its own (started at once); ``result()``
    waits for it and raises what the count raised. Its seconds go to ``stages["store_stats"]``."""

    def __init__(self, store: Any, stages: dict[str, float]) -> None:
        self._store, self._stages = store, stages
        self._spans: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._count, name="hourglass-span-count", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        started = time.perf_counter()
        try:
            self._spans = int(self._store.stats().spans)
        except BaseException as exc:  # handed to result()
            self._error = exc
        finally:
            self._stages["store_stats"] = time.perf_counter() - started

    def result(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._spans is not None
        return self._spans


def release_memory(store: Any) -> None:
    """After a run, return to the system what the run's reads left behind in this process: the
    store's cached blocks (``release_cache``: DuckDB keeps what a query read until its memory limit
    forces it out, so serve's RSS grew with the store), glibc's freed heap pages (the DuckDB
    results, the worker's unpickled index and report) and Arrow's pool's unused memory."""
    release_cache = getattr(store, "release_cache", None)
    if callable(release_cache):
        try:
            release_cache()
        except Exception:
            log.exception("releasing the store's cache failed")
    with contextlib.suppress(Exception):
        pa.default_memory_pool().release_unused()
    server_memory.trim()


def _covered(report: dict[str, Any], spans_in_store: int) -> int:
    """The spans a run covers (the status' ``spans_at_last_run``): the store's, or the report's
    when its window was cut to ``HOURGLASS_REPORT_MAX_SPANS``."""
    return int(report.get("spans_analyzed") or 0) if report.get("window") else spans_in_store


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
