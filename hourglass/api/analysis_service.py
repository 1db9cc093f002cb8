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

The analysis itself runs in a long-lived worker process (:class:`AnalysisWorker`): the server
process only scans the store (DuckDB, outside the GIL) and hands the Arrow table over, so the
analysis' CPU time never competes for the GIL with the OTLP receivers and the API.

Each run produces an immutable :class:`ReportSnapshot`: the report object, the recommendations
indexed by id, and each recommendation pre-serialised to JSON, so a read filters in memory and
joins bytes. The HTML page (with its exemplar waterfalls, which need the exemplar traces from the
store) is rendered right after the run, in the same background thread.

Runs are serialised by a lock; a run asked for while another is in progress waits for it and,
if that run started after the request, returns its result instead of analysing twice.
Failures are never swallowed: the error is logged with its traceback, kept in
:meth:`AnalysisService.status` (served by ``/v1/stats`` and ``POST /v1/analyses``), and the last
good report keeps being served.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import multiprocessing
import os
import tempfile
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import polars as pl
import pyarrow as pa

from hourglass.analysis.trace_index import TraceIndex
from hourglass.analysis.writers import select_writer
from hourglass.api import report_html
from hourglass.collector.schema import ANALYSIS_COLUMNS
from hourglass.collector.store import SpanStore

log = logging.getLogger("hourglass.api.analysis")

TraceFetcher = Callable[[str], pa.Table]

WINDOW_CACHE_SIZE = 8  # analyses of a `since` window kept per report generation


# ----------------------------------------------------------------------------------------------
# Serialisation


def _finite(obj: Any) -> Any:
    """A copy of a JSON-like structure with NaN/inf floats as null (JSON has no NaN); no recursion."""
    root: list[Any] = [obj]
    stack: list[tuple[Any, Any, Any]] = [(root, 0, obj)]
    while stack:
        container, key, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            container[key] = None
        elif isinstance(value, Mapping):
            copy = dict(value)
            container[key] = copy
            stack.extend((copy, k, v) for k, v in copy.items())
        elif isinstance(value, (list, tuple)):
            copy_list = list(value)
            container[key] = copy_list
            stack.extend((copy_list, i, v) for i, v in enumerate(copy_list))
    return root[0]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__} in a report")


def dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # NaN or infinity somewhere: null them
        return json.dumps(_finite(obj), default=_json_default, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ReportSnapshot:
    """One analysis result, immutable once published; reads share it without locks."""

    report: dict[str, Any]
    generation: int
    spans_in_store: int
    started_at: float  # unix seconds
    finished_at: float
    started_monotonic: float
    reason: str
    change_marker: int = -1  # the store's change marker when the run started (see _change_marker)
    trace_index: TraceIndex = field(default_factory=TraceIndex)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    rec_json: tuple[bytes, ...] = ()
    head_json: bytes = b"{"  # the report without its recommendations, without the closing brace
    # ``"near_misses":[...],"near_misses_omitted":N`` kept apart so that ``?explain=true`` answers
    # from the cached run while the plain report keeps its shape (b"" when the run kept none).
    near_misses_json: bytes = b""

    @classmethod
    def build(
        cls,
        report: dict[str, Any],
        *,
        generation: int,
        spans_in_store: int,
        started_at: float,
        started_monotonic: float,
        reason: str,
        change_marker: int = -1,
        trace_index: TraceIndex | None = None,
    ) -> ReportSnapshot:
        explain_keys = ("near_misses", "near_misses_omitted")
        near_misses_json = b""
        if "near_misses" in report:
            explained = {k: report[k] for k in explain_keys if k in report}
            near_misses_json = dumps(explained)[1:-1]
            report = {k: v for k, v in report.items() if k not in explain_keys}
        recs = list(report.get("recommendations") or [])
        head = {k: v for k, v in report.items() if k != "recommendations"}
        head_bytes = dumps(head)
        head_json = head_bytes[:-1] + (b"," if len(head_bytes) > 2 else b"")
        return cls(
            report=report,
            generation=generation,
            spans_in_store=spans_in_store,
            started_at=started_at,
            finished_at=time.time(),
            started_monotonic=started_monotonic,
            reason=reason,
            change_marker=change_marker,
            trace_index=trace_index if trace_index is not None else TraceIndex.from_report(report),
            by_id={str(r.get("id")): r for r in recs},
            rec_json=tuple(dumps(r) for r in recs),
            head_json=head_json,
            near_misses_json=near_misses_json,
        )

    @property
    def recommendations(self) -> list[dict[str, Any]]:
        return list(self.report.get("recommendations") or [])

    def body(self, indices: list[int] | None = None, *, explain: bool = False) -> bytes:
        """The report as JSON bytes, with only the recommendations at ``indices`` when given, and
        with ``near_misses`` / ``near_misses_omitted`` when ``explain`` (empty when the run kept none)."""
        chosen = self.rec_json if indices is None else [self.rec_json[i] for i in indices]
        body = self.head_json + b'"recommendations":[' + b",".join(chosen) + b"]"
        if explain:
            body += b"," + (self.near_misses_json or b'"near_misses":[],"near_misses_omitted":0')
        return body + b"}"

    def filter_indices(
        self,
        *,
        service: str | None = None,
        kind: list[str] | None = None,
        category: str | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """Recommendations (by position, rank order kept) matching every given filter.

        ``service`` matches where the change is made or any target service; ``kind`` is any of
        the given kinds; ``limit`` keeps the first N after filtering.
        """
        out: list[int] = []
        for i, rec in enumerate(self.recommendations):
            if service is not None and rec.get("service") != service:
                targets = rec.get("targets") or []
                if not any(t.get("service") == service for t in targets):
                    continue
            if kind and rec.get("kind") not in kind:
                continue
            if category is not None and rec.get("category") != category:
                continue
            out.append(i)
            if limit is not None and len(out) >= limit:
                break
        return out


# ----------------------------------------------------------------------------------------------
# Exemplars: the trace pictures of the HTML report


def trace_detail(
    spans: pa.Table, report: Mapping[str, Any], index: TraceIndex | None = None
) -> dict[str, Any]:
    """``hourglass.analysis.pipeline.trace_detail``: repaired spans, critical path, touching recommendations."""
    from hourglass.analysis.pipeline import trace_detail as analysis_trace_detail

    return analysis_trace_detail(spans, dict(report), index)


def retime(spans: pa.Table, recommendation: Mapping[str, Any]) -> pl.DataFrame:
    """The trace's repaired spans with ``new_start_ns``, ``new_end_ns`` and ``removed``, as if
    ``recommendation`` were applied (``hourglass.analysis.whatif.retime_trace``)."""
    from hourglass.analysis.whatif import retime_trace

    frame = pl.from_arrow(spans)
    assert isinstance(frame, pl.DataFrame)
    return retime_trace(frame, recommendation)


def build_exemplar(
    recommendation: Mapping[str, Any],
    report: Mapping[str, Any],
    fetch_trace: TraceFetcher,
    index: TraceIndex | None = None,
) -> report_html.Exemplar | None:
    """The first exemplar trace of a recommendation: spans, critical path, bottleneck, re-timing.

    Spans are drawn as the analysis sees them (repaired: clock skew corrected), so the before and
    after pictures and the critical path agree. The bottleneck spans are the recommendation's
    ``bottleneck_span_ids`` in that trace by ``index`` (the run's
    :class:`hourglass.analysis.trace_index.TraceIndex`; else one built from ``report``), as the
    REST trace view lists them. A failing analysis helper is logged and shown on the figure
    (``note``), never hidden.
    """
    index = index if index is not None else TraceIndex.from_report(report)
    evidence = recommendation.get("evidence") or {}
    trace_ids = [str(t) for t in evidence.get("trace_ids") or []]
    if not trace_ids:
        return None
    trace_id = trace_ids[0]
    raw = fetch_trace(trace_id)
    if raw.num_rows == 0:
        return report_html.Exemplar(trace_id=trace_id, spans=[], note="The trace is no longer in the store.")
    notes: list[str] = []
    exemplar = report_html.Exemplar(trace_id=trace_id, spans=[])
    try:
        exemplar.critical_path = set(trace_detail(raw, report, index)["critical_path"])
    except Exception as exc:
        log.exception("critical path of exemplar trace %s failed", trace_id)
        notes.append(f"Critical path unavailable ({type(exc).__name__}: {exc}).")
    try:
        retimed = retime(raw, recommendation)
        exemplar.spans = report_html.spans_from_rows(
            retimed.select(
                "span_id", "parent_span_id", "service", "name", "start_ns", "end_ns", "status_code"
            ).to_dicts()
        )
        kept = retimed.filter(~pl.col("removed").fill_null(False))
        exemplar.after = {
            str(i): (int(a), int(b))
            for i, a, b in zip(kept["span_id"], kept["new_start_ns"], kept["new_end_ns"], strict=True)
        }
    except Exception as exc:
        log.exception("re-timing exemplar trace %s for %s failed", trace_id, recommendation.get("id"))
        notes.append(f"Re-timing unavailable ({type(exc).__name__}: {exc}).")
        columns = ("span_id", "parent_span_id", "service", "name", "start_ns", "end_ns", "status_code")
        exemplar.spans = report_html.spans_from_rows(
            raw.select([c for c in columns if c in raw.column_names]).to_pylist()
        )
    if exemplar.after is not None and all(
        exemplar.after.get(span.span_id) == (span.start_ns, span.end_ns) for span in exemplar.spans
    ):
        # Nothing moves (fault-tolerance gaps carry no latency estimate): one picture is enough.
        exemplar.after = None
        notes.append("Applying it does not change this trace's timing; the picture shows where it happens.")
    rec_id = str(recommendation.get("id"))
    touches = index.touching(trace_id, [s.span_id for s in exemplar.spans])
    exemplar.bottleneck = next(
        (set(t.bottleneck_span_ids) for t in touches if t.recommendation_id == rec_id), set()
    )
    exemplar.note = " ".join(notes) or None
    return exemplar


def build_exemplars(
    report: Mapping[str, Any], fetch_trace: TraceFetcher, index: TraceIndex | None = None
) -> dict[str, report_html.Exemplar]:
    out: dict[str, report_html.Exemplar] = {}
    index = index if index is not None else TraceIndex.from_report(report)
    for rec in report.get("recommendations") or []:
        try:
            exemplar = build_exemplar(rec, report, fetch_trace, index)
        except Exception:
            log.exception("exemplar of recommendation %s failed", rec.get("id"))
            continue
        if exemplar is not None:
            out[str(rec.get("id"))] = exemplar
    return out


def table_trace_fetcher(table: pa.Table) -> TraceFetcher:
    """Exemplar traces looked up in an in-memory span table (reports from files)."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)

    def fetch(trace_id: str) -> pa.Table:
        return frame.filter(pl.col("trace_id") == trace_id).to_arrow()

    return fetch


# ----------------------------------------------------------------------------------------------
# The worker process


# Background analysis yields the CPU to ingest: it runs at this niceness (the worker process and
# the thread that scans the store). A 75-second bench-ingest run fell from ~270k to ~110k spans/s
# once the store held millions of spans and the once-a-minute re-analysis competed at equal priority.
BACKGROUND_NICENESS = 10
STALE_DURATION_FACTOR = 10


def lower_priority_of_this_thread() -> None:
    """Linux: a thread is a task with its own nice value; elsewhere, or when not allowed, a no-op."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICENESS))


def _worker_main(conn: Connection) -> None:
    """Loop of the analysis worker process: (table, settings, since_ns) in, ("ok", result) or
    ("error", traceback text) out, until the pipe closes."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    lower_priority_of_this_thread()  # the main thread: threads started later inherit it
    import hourglass.analysis.pipeline  # noqa: F401  -- imported while waiting for the first table, not after

    while True:
        try:
            shipped, settings, since_ns, explain = conn.recv()
        except (EOFError, OSError):
            return
        try:
            started = time.perf_counter()
            table = _receive_table(shipped)
            report, index = analyze_spans(
                table, writer=select_writer(settings), since_ns=since_ns, explain=explain
            )
            result: tuple[str, Any] = ("ok", (report, index, time.perf_counter() - started))
        except Exception:
            result = ("error", traceback.format_exc())
        table = shipped = None
        try:
            conn.send(result)
        except (OSError, ValueError):
            return


def _ipc_dir(nbytes: int) -> str | None:
    """Where to put a span table for the worker: /dev/shm (memory, no disk I/O) when it has room
    for it twice over, else the temp directory when it has; None: ship it through the pipe."""
    for directory in ("/dev/shm", tempfile.gettempdir()):
        try:
            fs = os.statvfs(directory)
        except OSError:
            continue
        if os.access(directory, os.W_OK) and fs.f_bavail * fs.f_frsize > 2 * nbytes:
            return directory
    return None


def _ship_table(table: pa.Table) -> tuple[pa.Table | str, str | None]:
    """(what to send, file to delete after the run). The table is written once as an Arrow IPC
    file that the worker memory-maps (no copy): pickling 1M spans (~200 MB) through the pipe cost
    ~0.4-0.9 s of both processes and a second copy in memory. Without room for the file it goes
    through the pipe."""
    directory = _ipc_dir(table.nbytes)
    if directory is None:
        return table, None
    fd, path = tempfile.mkstemp(prefix="hourglass-analysis-", suffix=".arrow", dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw, pa.ipc.new_file(raw, table.schema) as writer:
            writer.write_table(table)
    except OSError:
        os.unlink(path)
        log.warning("could not write the span table to %s; sending it through the pipe", directory)
        return table, None
    return path, path


def _receive_table(shipped: pa.Table | str) -> pa.Table:
    if isinstance(shipped, pa.Table):
        return shipped
    mapped = pa.memory_map(shipped, "r")
    # The mapping outlives the name: unlinked at once, the file cannot be left behind in /dev/shm
    # by a server killed mid-run (the sender also unlinks it, for a worker that died first).
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shipped)
    return pa.ipc.open_file(mapped).read_all()


class AnalysisWorker:
    """Runs :func:`analyze_spans` in a separate, long-lived process.

    The analysis is CPU-bound for seconds to a minute at 1M spans, partly in Python; in the server
    process it would hold the GIL away from the OTLP receivers and the API. The worker gets the
    scanned span table (an Arrow IPC file in /dev/shm that it memory-maps, else pickled through
    the pipe), picks the writer itself (the Anthropic
    agent is not picklable) and returns the report and the trace index. One request at a time; a
    worker that dies is restarted on the next run, and its death is an error of that run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        """Start the process now (it takes ~1 s to import polars and the analysis), so the first
        run does not wait for it."""
        with self._lock:
            self._ensure()

    def _ensure(self) -> Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self._kill()
            context = multiprocessing.get_context("spawn")
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(child,), name="hourglass-analysis-worker", daemon=True
            )
            process.start()
            child.close()
            self._process, self._conn = process, parent
        return self._conn

    def run(
        self,
        table: pa.Table,
        *,
        settings: Any = None,
        since_ns: int | None = None,
        stages: dict[str, float] | None = None,
        explain: bool = False,
    ) -> tuple[dict[str, Any], TraceIndex]:
        """The report (with ``near_misses`` when ``explain``) and trace index; ``stages`` (when given) gets the seconds spent starting the
        process (``worker_start``), shipping the table (``send``), analysing in the worker
        (``analysis``) and waiting for and receiving the result beyond that (``receive``)."""
        stages = {} if stages is None else stages
        with self._lock:
            started = time.perf_counter()
            conn = self._ensure()
            stages["worker_start"] = time.perf_counter() - started
            started = time.perf_counter()
            shipped, written = _ship_table(table)
            try:
                conn.send((shipped, settings, since_ns, explain))
                stages["send"] = time.perf_counter() - started
                started = time.perf_counter()
                status, payload = conn.recv()
                waited = time.perf_counter() - started
            except (EOFError, OSError) as exc:
                code = self._process.exitcode if self._process is not None else None
                self._kill()
                raise RuntimeError(f"the analysis worker process died (exit code {code}): {exc!r}") from exc
            finally:
                if written is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(written)
        if status != "ok":
            raise RuntimeError(f"analysis failed in the worker process:\n{payload}")
        report, index, analysis_s = payload
        stages["analysis"] = analysis_s
        stages["receive"] = max(waited - analysis_s, 0.0)
        return report, index

    def _kill(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._process is not None:
            if self._process.is_alive():
                self._process.terminate()
                self._process.join(5)
                if self._process.is_alive():
                    self._process.kill()
                    self._process.join(5)
            self._process = None

    def close(self) -> None:
        """Stop the worker, also in the middle of a run (that run then fails)."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()  # unblocks a run waiting in recv(); it then cleans up
        with self._lock:
            self._kill()


# ----------------------------------------------------------------------------------------------
# The service


def analyze_spans(
    table: pa.Table,
    *,
    writer: Any = None,
    services: list[str] | None = None,
    since_ns: int | None = None,
    explain: bool = False,
) -> tuple[dict[str, Any], TraceIndex]:
    """``hourglass.analysis.pipeline.analyze``, plus which recommendations touch each affected trace
    (``explain``: the report carries ``near_misses``).

    The report lists only a few exemplar traces per recommendation; the API's trace view needs
    every affected trace, so the run's findings are indexed with it
    (:meth:`hourglass.analysis.trace_index.TraceIndex.build`).
    """
    from hourglass.analysis.context import AnalysisContext, to_analysis_frame
    from hourglass.analysis.pipeline import analyze_context, select_traces
    from hourglass.analysis.resources import service_resources

    resources = service_resources(table)
    frame = select_traces(to_analysis_frame(table), services=services, since_ns=since_ns)
    report, ranked = analyze_context(
        AnalysisContext.from_table(frame), writer=writer, explain=explain, resources=resources
    )
    return report, TraceIndex.build(report, [scored.finding for scored in ranked])


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
        self._runs = 0
        self._failures = 0
        self._generation = 0
        self._windows: OrderedDict[tuple[int, int], ReportSnapshot] = OrderedDict()
        # Called after every background/requested run with (outcome "ok"|"failed", seconds, snapshot
        # or None): the /metrics counters (api.metrics). A listener's error is logged, never raised.
        self.run_listeners: list[Callable[[str, float, ReportSnapshot | None], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        if self._worker is not None:
            self._worker.start()
        self._thread = threading.Thread(target=self._loop, name="hourglass-analysis", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._worker is not None:
            self._worker.close()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        lower_priority_of_this_thread()  # its store scans run in this thread (one DuckDB thread)
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
                elif snapshot is None or now - snapshot.started_monotonic >= self.stale_after_seconds():
                    reason = "stale"  # spans keep arriving without a pause
            if reason is not None and now >= retry_at:
                first = False
                try:
                    self.run_now(reason=reason)
                    backoff = 1.0
                except Exception:
                    # Logged and recorded by run_now; the last good report keeps being served.
                    retry_at = time.monotonic() + backoff
                    backoff = min(backoff * 2, 60.0)
            self._stop.wait(self.poll_seconds)

    # -- running -----------------------------------------------------------------------------

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

    def _run_analysis(
        self, *, since_ns: int | None = None, stages: dict[str, float] | None = None
    ) -> tuple[dict[str, Any], TraceIndex, int, int]:
        """One analysis of the store; ``stages`` (when given) gets the seconds of each step."""
        stages = {} if stages is None else stages
        started = time.perf_counter()
        marker = self._change_marker()
        spans_in_store = self.store.stats().spans
        stages["store_stats"] = time.perf_counter() - started
        started = time.perf_counter()
        table = self.store.scan(since_ns=since_ns, columns=ANALYSIS_COLUMNS)
        from hourglass.analysis.resources import attach_store_resources

        table = attach_store_resources(table, self.store)  # services' languages, for the designs
        stages["scan"] = time.perf_counter() - started
        if self._worker is not None:
            report, index = self._worker.run(
                table, settings=self._settings, since_ns=since_ns, stages=stages, explain=True
            )
        else:
            started = time.perf_counter()
            report, index = analyze_spans(
                table, writer=self._resolve_writer(), since_ns=since_ns, explain=True
            )
            stages["analysis"] = time.perf_counter() - started
        del table
        return report, index, spans_in_store, marker

    def run_now(self, reason: str = "requested") -> ReportSnapshot:
        """Analyse the whole store now and publish the result (coalescing concurrent requests)."""
        requested = time.monotonic()
        with self._run_lock:
            current = self._snapshot
            if current is not None and current.started_monotonic >= requested:
                return current  # a run that started after this request has just finished
            started_monotonic = time.monotonic()
            started_at = time.time()
            with self._state_lock:
                self._running_since = started_at
            stages: dict[str, float] = {}
            try:
                report, index, spans_in_store, marker = self._run_analysis(stages=stages)
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
            try:
                started = time.perf_counter()
                self.html(snapshot)
                with self._state_lock:
                    self._last_stages_s = {**stages, "html": time.perf_counter() - started}
            except Exception as exc:
                log.exception("rendering the HTML report failed")
                self._record_error(exc)
        if self.freeze_gc:
            # A long-lived report is ~100k Python objects at 1M spans; every full collection would
            # walk them again (100-300 ms with the GIL held: the p99 of every request). Collect the
            # run's garbage once now, then move the survivors out of the collector's sight. The
            # snapshot holds no reference cycles, so replacing it still frees it by refcount.
            gc.collect()
            gc.freeze()
        return snapshot

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
            page = report_html.render_report_html(
                snapshot.report, exemplars, source=f"analysis #{snapshot.generation}, finished {generated}"
            ).encode()
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
                # receive, snapshot (all inside last_duration_ms) and html (rendered after it)
                "last_stages_ms": {k: round(v * 1000, 1) for k, v in self._last_stages_s.items()},
                "last_reason": snapshot.reason if snapshot else None,
                "spans_at_last_run": snapshot.spans_in_store if snapshot else None,
                "last_error": self._last_error,
                "last_error_at": _iso(self._last_error_at),
                "settle_seconds": self.settle_seconds,
                "max_staleness_seconds": self.max_staleness_seconds,
                "stale_after_seconds": round(self.stale_after_seconds(), 1),
            }


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
