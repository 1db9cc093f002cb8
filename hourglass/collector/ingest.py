"""Group commit and admission control between the receivers and the span store.

Receivers decode a request into an Arrow table and ``submit`` it; one writer thread takes every
table queued at that moment (up to ``max_batch_spans``), concatenates them, writes them in ONE
store transaction, and only then completes each request's future — an Export is acknowledged
only after its rows are committed. Concurrent requests therefore share commits (group commit),
and the store sees big batches, which is what DuckDB inserts fast.

Admission control keeps memory bounded under sustained overload: spans and bytes accepted but
not yet committed are capped (``max_pending_spans``, ``max_pending_bytes``). A request that would
exceed a cap is refused at once with ``Overloaded`` (the receivers answer gRPC RESOURCE_EXHAUSTED
with RetryInfo / HTTP 429 with Retry-After) instead of queueing without limit. A single request
bigger than the caps is still admitted when nothing else is pending, so it cannot be starved.

``close()`` stops admitting (``IngestClosed``), commits what is queued, and fails — never
acknowledges — anything it could not commit.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from hourglass.collector.problem_summary import ProblemSummary, split_position
from hourglass.collector.store import SpanStore
from hourglass.settings import default

log = logging.getLogger("hourglass.ingest")

# Admission control and group commits; the values and why are in the table (hourglass/settings.py).
DEFAULT_MAX_PENDING_SPANS: int = default("max_pending_spans")
DEFAULT_MAX_PENDING_BYTES: int = default("max_pending_bytes")
DEFAULT_MAX_BATCH_SPANS: int = default("max_batch_spans")
DEFAULT_RETRY_AFTER_S: float = default("overload_retry_after_seconds")


class Overloaded(Exception):
    """Too much accepted-but-uncommitted data; the client should retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# Request bytes received but not decoded yet (waiting for a decode slot), per receiver: the default
# of HOURGLASS_RECEIVE_BUDGET_BYTES.
MAX_UNDECODED_BYTES: int = default("receive_budget_bytes")


class UndecodedBytes:
    """Admission for request bytes a receiver holds before decoding them: the pipeline's caps only
    count decoded rows, and requests waiting for a decode slot hold their bytes meanwhile. Over
    ``limit`` an Export is refused (``Overloaded``: gRPC RESOURCE_EXHAUSTED with RetryInfo, HTTP
    429); one request is always let through when none is held, so a request bigger than the
    limit is not starved."""

    def __init__(self, limit: int, retry_after_s: float, on_refuse: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.held = 0
        self._on_refuse = on_refuse  # the pipeline's overload counter
        self._lock = threading.Condition(threading.Lock())

    def reserve(self, size: int, *, wait_s: float = 0.0) -> None:
        """Hold ``size`` bytes, waiting up to ``wait_s`` for room; else ``Overloaded``."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while self.held and self.held + size > self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(remaining)
            refuse = bool(self.held and self.held + size > self.limit)
            if not refuse:
                self.held += size
            held = self.held
        if refuse:
            if self._on_refuse is not None:
                self._on_refuse()
            raise Overloaded(
                f"ingest overloaded: {held} bytes of Exports being received or waiting to be decoded "
                f"(limit {self.limit}); retry after {self.retry_after_s:g}s",
                self.retry_after_s,
            )

    def release(self, size: int) -> None:
        with self._lock:
            self.held -= size
            self._lock.notify_all()

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        self.reserve(size)
        try:
            yield
        finally:
            self.release(size)


class IngestClosed(Exception):
    """The pipeline is shutting down and admits nothing new."""


@dataclass
class _Pending:
    table: pa.Table
    nbytes: int
    future: Future[int]


@dataclass
class IngestStats:
    committed_spans: int = 0
    committed_batches: int = 0
    committed_requests: int = 0
    rejected_overloaded: int = 0
    failed_requests: int = 0
    pending_spans: int = 0
    pending_bytes: int = 0
    peak_pending_bytes: int = 0


# Export latency buckets (seconds): an acknowledged Export waits for its group commit.
EXPORT_SECONDS_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class ExportCounters:
    """Per-protocol counts the receivers keep, once per Export (never per span), for ``/metrics``:
    Exports by outcome with their latency, spans received, refused (by reason) and stored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (protocol, outcome) -> Exports
        self.spans_received: dict[str, int] = {}
        self.spans_refused: dict[tuple[str, str], int] = {}  # (protocol, reason) -> spans
        self.spans_stored: dict[str, int] = {}
        # protocol -> (count per bucket of EXPORT_SECONDS_BUCKETS plus +Inf, sum of seconds)
        self.latency: dict[str, tuple[list[int], float]] = {}
        # rejected spans by kind of problem, logged by serve once a minute (then reset)
        self.problems = ProblemSummary()
        # called with (protocol, outcome, seconds) after each Export (serve's own traces, opt-in)
        self.listeners: list[Callable[[str, str, float], None]] = []

    def decoded(self, protocol: str, accepted: int, rejected: int, errors: Sequence[str] = ()) -> None:
        """An Export decoded: ``accepted`` spans go on to the store, ``rejected`` had bad ids
        (``errors``: the decoder's first reasons, "path: reason"; summarised for serve's log)."""
        with self._lock:
            self.spans_received[protocol] = self.spans_received.get(protocol, 0) + accepted + rejected
            if rejected:
                key = (protocol, "invalid")
                self.spans_refused[key] = self.spans_refused.get(key, 0) + rejected
        if rejected:
            source = f"OTLP/{'gRPC' if protocol == 'grpc' else protocol.upper()}"
            for message in errors:
                position, reason = split_position(message)
                self.problems.add(source, position, reason)
            if rejected > len(errors):
                self.problems.add(
                    source,
                    None,
                    "more spans rejected (the decoder lists the first ones only)",
                    count=rejected - len(errors),
                )

    def stored(self, protocol: str, spans: int) -> None:
        with self._lock:
            self.spans_stored[protocol] = self.spans_stored.get(protocol, 0) + spans

    def refused(self, protocol: str, reason: str, spans: int) -> None:
        with self._lock:
            key = (protocol, reason)
            self.spans_refused[key] = self.spans_refused.get(key, 0) + spans

    def finished(self, protocol: str, outcome: str, seconds: float) -> None:
        """An Export answered (``ok``, ``invalid``, ``overloaded``, ``unavailable``...) after ``seconds``."""
        index = bisect.bisect_left(EXPORT_SECONDS_BUCKETS, seconds)
        with self._lock:
            key = (protocol, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1
            buckets, total = self.latency.get(protocol) or ([0] * (len(EXPORT_SECONDS_BUCKETS) + 1), 0.0)
            buckets[index] += 1
            self.latency[protocol] = (buckets, total + seconds)
        for listener in self.listeners:
            try:
                listener(protocol, outcome, seconds)
            except Exception:  # telemetry about an Export must never fail the Export
                log.exception("Export listener failed")

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy of every count."""
        with self._lock:
            return {
                "requests": dict(self.requests),
                "spans_received": dict(self.spans_received),
                "spans_refused": dict(self.spans_refused),
                "spans_stored": dict(self.spans_stored),
                "latency": {p: (list(b), t) for p, (b, t) in self.latency.items()},
            }


class IngestPipeline:
    """One writer thread in front of a ``SpanStore``: group commit + bounded admission."""

    def __init__(
        self,
        store: SpanStore,
        *,
        max_pending_spans: int = DEFAULT_MAX_PENDING_SPANS,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        max_batch_spans: int = DEFAULT_MAX_BATCH_SPANS,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        self.store = store
        self.max_pending_spans = max_pending_spans
        self.max_pending_bytes = max_pending_bytes
        self.max_batch_spans = max_batch_spans
        self.retry_after_s = retry_after_s
        self.stats = IngestStats()
        self.exports = ExportCounters()  # kept by the receivers, read by /metrics
        self._queue: deque[_Pending] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._writer = threading.Thread(target=self._run, name="hourglass-writer", daemon=True)
        self._writer.start()

    # -- admission ---------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Cheap pre-check before decoding: raise ``Overloaded``/``IngestClosed`` when full/closing."""
        if self._closing:
            raise IngestClosed("hourglass is shutting down")
        s = self.stats
        if s.pending_spans >= self.max_pending_spans or s.pending_bytes >= self.max_pending_bytes:
            self.count_overload_refusal()
            raise Overloaded(self._overload_message(), self.retry_after_s)

    def count_overload_refusal(self) -> None:
        """Count an Export refused for overload (also by a receiver's own limits)."""
        with self._cond:  # receiver threads reject concurrently: an unlocked += loses counts
            self.stats.rejected_overloaded += 1

    def _overload_message(self) -> str:
        s = self.stats
        return (
            f"ingest overloaded: {s.pending_spans} spans / {s.pending_bytes} bytes waiting for commit "
            f"(limits {self.max_pending_spans} spans, {self.max_pending_bytes} bytes); retry after "
            f"{self.retry_after_s:g}s"
        )

    def submit(self, table: pa.Table, protocol: str | None = None) -> Future[int]:
        """Queue rows for the next commit; the future resolves to the row count once committed.

        Raises ``Overloaded`` when admitting the rows would exceed a cap, ``IngestClosed`` when closing
        (the refused spans are counted in ``exports`` under ``protocol`` when given).
        """
        future: Future[int] = Future()
        rows = table.num_rows
        if rows == 0:
            future.set_result(0)
            return future
        nbytes = table.nbytes
        with self._cond:
            if self._closing:
                if protocol is not None:
                    self.exports.refused(protocol, "shutting_down", rows)
                raise IngestClosed("hourglass is shutting down")
            s = self.stats
            busy = s.pending_spans > 0
            if busy and (
                s.pending_spans + rows > self.max_pending_spans
                or s.pending_bytes + nbytes > self.max_pending_bytes
            ):
                s.rejected_overloaded += 1
                if protocol is not None:
                    self.exports.refused(protocol, "overloaded", rows)
                raise Overloaded(self._overload_message(), self.retry_after_s)
            s.pending_spans += rows
            s.pending_bytes += nbytes
            s.peak_pending_bytes = max(s.peak_pending_bytes, s.pending_bytes)
            self._queue.append(_Pending(table, nbytes, future))
            self._cond.notify()
        return future

    def write(self, table: pa.Table, timeout: float | None = None) -> int:
        """Submit and wait for the commit (for synchronous callers)."""
        return self.submit(table).result(timeout=timeout)

    # -- the writer --------------------------------------------------------------------------
    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        rows = 0
        while self._queue and (not batch or rows + self._queue[0].table.num_rows <= self.max_batch_spans):
            item = self._queue.popleft()
            batch.append(item)
            rows += item.table.num_rows
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue and self._closing:
                    return
                batch = self._take_batch()
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        rows = sum(item.table.num_rows for item in batch)
        nbytes = sum(item.nbytes for item in batch)
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            tables = [item.table for item in batch]
            combined = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
            self.store.write(combined)
        except BaseException as exc:  # every waiting request must learn that its rows are not stored
            error = exc
            log.error("commit of %d spans from %d requests failed: %s", rows, len(batch), exc)
        with self._cond:
            s = self.stats
            s.pending_spans -= rows
            s.pending_bytes -= nbytes
            if error is None:
                s.committed_spans += rows
                s.committed_batches += 1
                s.committed_requests += len(batch)
            else:
                s.failed_requests += len(batch)
        for item in batch:
            if error is None:
                item.future.set_result(item.table.num_rows)
            else:
                item.future.set_exception(error)
        log.debug(
            "committed %d spans (%d requests) in %.1f ms",
            rows,
            len(batch),
            1e3 * (time.perf_counter() - started),
        )

    # -- shutdown ----------------------------------------------------------------------------
    def close(self, timeout: float | None = 30.0) -> None:
        """Stop admitting, commit everything queued, fail what could not be committed in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._writer.join(timeout)
        if self._writer.is_alive():
            with self._cond:
                leftover = list(self._queue)
                self._queue.clear()
            for item in leftover:
                item.future.set_exception(IngestClosed("shut down before these spans could be committed"))
            log.error("writer did not finish within %ss; %d queued requests failed", timeout, len(leftover))

    @property
    def closing(self) -> bool:
        return self._closing
