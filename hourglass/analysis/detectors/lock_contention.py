"""lock_contention: time spent waiting for a shared resource (a lock, a queue, a pool slot).

Two kinds of evidence, reported as separate findings (explicit evidence wins: an operation with
explicit waits is not also reported as an inferred convoy).

Explicit waits (confidence 0.75, +0.1 at 5 traces, +0.05 at 20)
----------------------------------------------------------------
* **Events**: a span event that says the span started waiting (``waiting``, ``wait for``,
  ``blocked on``, ``queued``, ``lock wait``, ``contention`` ... — e.g. HotROD's "Waiting for lock
  behind 3 transactions") and an event that says it got the resource (``acquired``, ``granted``,
  ``obtained``, ``dequeued`` ...) — each naming a lock, mutex, semaphore, latch, permit, slot,
  connection, pool, queue or transaction. Wait = the first "got it" event minus the first "waiting"
  event (the span start when there is no "waiting" event). A "waiting" event without a "got it" event
  cannot be measured and is not used. "behind N" in the event name is kept as the queue depth, and
  the time from the grant to the span's end as the hold time (the critical section it ran).
* **Attributes**: a numeric hint attribute whose key names a wait (``wait``/``queue``/``acquire``/
  ``blocked``/``contention``/``lock``) *and* a time (``time``, ``duration``, ``latency``, ``delay`` or a
  unit suffix), e.g. ``db.lock_wait_ms``, ``pool.wait_time_ns``, ``queue.time``. The unit comes from
  the key's suffix (ns, us, ms, s/sec/seconds); without one, milliseconds are assumed — the unit most
  instrumentations use for un-suffixed durations. A count attribute (``lock.waiters_ahead``,
  ``queue.depth`` ...) is kept as the queue depth, never read as a time.
* **Wait spans**: a span that *is* the wait — its name pairs a resource word with a wait verb
  (``lock.acquire``, ``acquire lock``, ``pool.acquire``, ``wait for connection``, ``queue wait``,
  ``semaphore.acquire``); messaging spans (PRODUCER/CONSUMER or with a messaging destination) are never
  wait spans. Its whole duration is wait (or the wait its own attribute or events state); the
  finding's operation is its parent (the code that waits) and the wait span is the target. The
  sibling that starts as the wait ends (within 1 ms) is taken as the critical section: its duration
  is the hold time.

Each wait is clamped to the waiting span's duration and kept when it is at least ``MIN_WAIT_NS``
(1 ms: below that a lock is uncontended for any latency budget) and the span that waits is on the
critical path (a wait off the critical path costs the request nothing). A finding needs at least
``MIN_CONTENTION_RATE`` (5 %) of the acquisitions its evidence shows (every lock event pair, wait
attribute or wait span of that operation, contended or not) to have waited: a lock that makes one
request in a thousand wait a few ms is not a bottleneck. The intervention is
``ShortenSpan(span, wait)``: the critical section no longer makes anyone wait.

Inferred convoys (confidence 0.45, +0.1 for a correlation of 0.8, +0.1 at 100 spans, +0.05 at 20
traces; at most 0.8, always below explicit evidence)
-------------------------------------------------------------------------------------------------
Spans of one operation on one resource across all traces: one service, span name, statement shape
(literals masked), messaging destination, peer, route, rpc method and lock-name hint. A sweep over start/end events (sorted,
cumulative sum, at microsecond resolution with ends before starts at one instant) gives each span
the number of same-operation spans in flight when it started, itself included (``peers``). The
operation is a convoy when:

* it has at least ``MIN_SAMPLES`` (20) spans, ``peers`` reaches ``MIN_PEAK_PEERS`` (3), and at least
  ``MIN_QUEUED_SHARE`` (20 %) of spans started with a peer in flight — enough load to see a trend;
* latency grows with load: Pearson correlation of duration with ``peers`` is at least
  ``MIN_CORRELATION`` (0.6) and each extra peer adds at least ``MIN_SLOPE_SHARE`` (30 %) of the
  uncontended latency — a server with spare capacity keeps latency flat however busy it is;
* completions are spaced like a single server: for spans that were queued behind the previous
  completion, the gap between consecutive completions has a median within
  ``SERVICE_TIME_BAND`` (0.5×–1.5×) of the uncontended latency, and at most ``MAX_BUNCHED_SHARE``
  (20 %) of those gaps are shorter than a quarter of it. A pool of parallel workers finishes several
  requests close together; a lock hands the resource to one at a time.

The uncontended latency is the median duration of spans that started alone (``peers == 1``, at
least 3 of them), else the 5th percentile of all durations. Each queued span's wait is its duration
minus that latency. A convoy whose spans mostly (``NESTED_CONVOY_SHARE``, 50 %) contain a child that is
itself a convoy or an explicit wait is dropped in favour of the deeper one: the callers of a locked
operation queue because of it, not for a lock of their own.

Near misses (``--explain``): explicit evidence none of whose waits counted (under 1 ms or off the
critical path), a contention rate under 5 %, and busy operations (peak and queued share met) that
fail a later convoy rule — a latency/load correlation between ``NEAR_MISS_CORRELATION`` (0.3) and
0.6, a slope under 30 %, completions not spaced like one server, nested in a deeper convoy, or no
queued wait of 1 ms on the critical path. One per operation, with the rule and the measured value.

Reporting floor (``hourglass.analysis.pipeline.MIN_SAVING_BY_KIND``): the p95 saving at the root must be at
least 1 ms — a lock wait is pure waste and its fix (a shorter critical section) is local, so the
floor is the wait this detector already counts — and at least 1 % of the median request.
"""

from __future__ import annotations

import decimal
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis import memlog
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common, _sweep
from hourglass.analysis.detectors._common import (
    WHITESPACE_RUN,
    NearMissSink,
    Rows,
    occurrence_keys,
    stat,
    with_span_columns,
)
from hourglass.analysis.model import Finding, Occurrences, ShortenSpan
from hourglass.collector.schema import KIND_CONSUMER, KIND_PRODUCER

KIND = "lock_contention"
MIN_WAIT_NS = 1_000_000
MIN_CONTENTION_RATE = 0.05
HANDOFF_NS = 1_000_000
MIN_SAMPLES = 20
MIN_PEAK_PEERS = 3
MIN_QUEUED_SHARE = 0.2
BUSY_PREFILTER = 0.8  # margin for microsecond ties between the pre-filter and the sweep
MIN_CORRELATION = 0.6
MIN_SLOPE_SHARE = 0.3
SERVICE_TIME_BAND = (0.5, 1.5)
MAX_BUNCHED_SHARE = 0.2
NESTED_CONVOY_SHARE = 0.5
NEAR_MISS_CORRELATION = 0.3  # a busy operation is listed by --explain from half the correlation rule

_RESOURCE_WORDS = (
    r"lock|mutex|semaphore|latch|permit|slot|connection|conn|pool|queue|transaction|turn|monitor"
)
_ACQUIRED_EVENT = rf"(?i)(?:\b(?:acquired|granted|obtained|dequeued|got)\b.*\b(?:{_RESOURCE_WORDS})|\b(?:{_RESOURCE_WORDS})\w*[\s._-]*(?:acquired|granted|obtained|taken)\b)"
_WAIT_EVENT = rf"(?i)(?:\bwaiting\b|\bwait(?:ed|s)?[\s._-]+(?:for|on)\b|\bblocked\b|\bqueued\b|\benqueued\b|contention|contended|\b(?:{_RESOURCE_WORDS})\w*[\s._-]*wait)"
_RESOURCE_IN_EVENT = rf"(?i)\b(?:{_RESOURCE_WORDS})"
_QUEUE_DEPTH = (
    r"(?i)behind (\d+)|(\d+) (?:transactions|waiters|requests|others|tasks) (?:ahead|in queue|before)"
)
_WAIT_SPAN_NAME = (
    rf"(?i)(?:\b(?:{_RESOURCE_WORDS})\w*[\s._:/-]*(?:wait\w*|acquir\w*|checkout|check[\s._-]out|lock|get|take|borrow)\b"
    rf"|\b(?:wait\w*|acquir\w*|blocked)(?:[\s._:/-]+(?:for|on|a|the))*[\s._:/-]+(?:{_RESOURCE_WORDS})\w*"
    r"|^(?:acquire|lock|mutex\.lock|rlock|wlock)$)"
)
# "key": number, with the key naming a wait and a time; group 1 the key, group 2 the value.
_WAIT_ATTRIBUTE = r'"([^"]*(?:wait|queue|acquir|blocked|contention|lock)[^"]*)"\s*:\s*(-?[0-9]+(?:\.[0-9]+)?)'
_TIME_KEY = r"(?i)time|duration|latency|delay|elapsed|(?:^|[._-])(?:ns|us|µs|ms|s|sec|secs|seconds|nanos|micros|millis)$"
_QUEUE_DEPTH_HINT = (
    r'"[^"]*(?:waiters|ahead|behind|queue[._-]?(?:depth|length|size|position))[^"]*"\s*:\s*(\d+)'
)
_RESOURCE_HINT = (
    r'"[^"]*(?:lock|mutex|semaphore|pool|queue|resource)[._-]?(?:name|key|id|resource)?"\s*:\s*"([^"]+)"'
)


def _unit_ns() -> pl.Expr:
    key = pl.col("wait_key").str.to_lowercase()
    return (
        pl.when(key.str.contains(r"(?:^|[._-])(?:ns|nanos|nanoseconds)$"))
        .then(1.0)
        .when(key.str.contains(r"(?:^|[._-])(?:us|µs|micros|microseconds)$"))
        .then(1e3)
        .when(key.str.contains(r"(?:^|[._-])(?:ms|millis|milliseconds)$"))
        .then(1e6)
        .when(key.str.contains(r"(?:^|[._-])(?:s|sec|secs|seconds)$"))
        .then(1e9)
        .otherwise(1e6)
    )


_SPAN_COLUMNS = [
    "trace_id",
    "span_id",
    "parent_span_id",
    "service",
    "name",
    "kind",
    "start_ns",
    "duration_ns",
    "on_critical_path",
    "db_system",
    "db_statement",
    "peer",
    "messaging_destination",
    "http_route",
    "rpc_method",
    "hints",
]


def normalized_statement() -> pl.Expr:
    """The db statement with its literals replaced by ``?`` so one query shape is one resource."""
    return _statement_masked().str.replace_all(WHITESPACE_RUN, " ")


def _statement_masked(column: str = "db_statement") -> pl.Expr:
    """:func:`normalized_statement` before its whitespace runs are collapsed: literals masked."""
    return pl.col(column).str.replace_all(r"'(?:[^']|'')*'", "?").str.replace_all(r"\b\d+(?:\.\d+)?\b", "?")


def _resource() -> pl.Expr:
    return pl.coalesce(
        pl.col("hints").str.extract(_RESOURCE_HINT, 1),
        normalized_statement(),
        pl.col("messaging_destination"),
        pl.col("peer"),
        pl.col("http_route"),
        pl.col("rpc_method"),
        pl.lit(""),
    )


def _event_waits(spans: pl.DataFrame) -> pl.DataFrame:
    with_events = spans.lazy().filter(pl.col("event_names").list.len() > 0)
    events = (
        with_events.select("row", "start_ns", "duration_ns", "event_names", "event_times_ns")
        .explode(["event_names", "event_times_ns"])
        .rename({"event_names": "event", "event_times_ns": "event_ns"})
        .filter(pl.col("event").str.contains(_RESOURCE_IN_EVENT))
        .with_columns(acquired=pl.col("event").str.contains(_ACQUIRED_EVENT))
        .with_columns(waiting=~pl.col("acquired") & pl.col("event").str.contains(_WAIT_EVENT))
        .filter(pl.col("acquired") | pl.col("waiting"))
        .with_columns(
            depth=pl.coalesce(
                pl.col("event").str.extract(_QUEUE_DEPTH, 1), pl.col("event").str.extract(_QUEUE_DEPTH, 2)
            ).cast(pl.Int64)
        )
    )
    per_span = (
        events.group_by("row")
        .agg(
            pl.col("start_ns").first(),
            pl.col("duration_ns").first(),
            waiting_ns=pl.col("event_ns").filter(pl.col("waiting")).min(),
            acquired_ns=pl.col("event_ns").filter(pl.col("acquired")).min(),
            queue_depth=pl.col("depth").max(),
        )
        .filter(pl.col("acquired_ns").is_not_null())
        .with_columns(
            wait_from=pl.when(
                pl.col("waiting_ns").is_not_null() & (pl.col("waiting_ns") <= pl.col("acquired_ns"))
            )
            .then(pl.col("waiting_ns"))
            .otherwise(pl.col("start_ns"))
        )
        .select(
            "row",
            "queue_depth",
            wait_ns=(pl.col("acquired_ns") - pl.col("wait_from")).clip(0, pl.col("duration_ns")),
            source=pl.lit("events"),
            # Time held: from the grant to the end of the span (the critical section it ran).
            hold_ns=(pl.col("start_ns") + pl.col("duration_ns") - pl.col("acquired_ns")).clip(0),
        )
    )
    return per_span.collect()


def _attribute_waits(spans: pl.DataFrame) -> pl.DataFrame:
    return (
        spans.lazy()
        .filter(pl.col("hints").is_not_null())
        .select(
            "row",
            "duration_ns",
            depth=pl.col("hints").str.extract(_QUEUE_DEPTH_HINT, 1).cast(pl.Int64),
            pair=pl.col("hints").str.extract_all(_WAIT_ATTRIBUTE),
        )
        .explode("pair")
        .filter(pl.col("pair").is_not_null())
        .with_columns(
            wait_key=pl.col("pair").str.extract(_WAIT_ATTRIBUTE, 1),
            wait_value=pl.col("pair").str.extract(_WAIT_ATTRIBUTE, 2).cast(pl.Float64),
        )
        .filter(pl.col("wait_key").str.contains(_TIME_KEY))
        .with_columns(
            wait_ns=(pl.col("wait_value") * _unit_ns()).cast(pl.Int64).clip(0, pl.col("duration_ns"))
        )
        .group_by("row")
        .agg(pl.col("wait_ns").max(), queue_depth=pl.col("depth").max())
        .select(
            "row",
            "queue_depth",
            "wait_ns",
            source=pl.lit("attributes"),
            hold_ns=pl.lit(None, pl.Int64),
        )
        .collect()
    )


def _wait_span_names(spans: pl.DataFrame, names: pl.Series | None = None) -> pl.Series:
    """Span names that name a wait (matched once per distinct name, not once per span).
    ``names``: the spans' distinct names (``_common.span_names``), found here when not given."""
    names = spans["name"].unique() if names is None else names
    return names.filter(names.str.contains(_WAIT_SPAN_NAME))


def _explicit_waits(spans: pl.DataFrame, names: pl.Series | None = None) -> pl.DataFrame:
    """One row per waiting span: the span to shorten, its wait, and who waits on what.
    ``names``: the spans' distinct names (``_common.span_names``), found here when not given."""
    own = pl.concat([_event_waits(spans), _attribute_waits(spans)], how="vertical_relaxed")
    own = own.sort("wait_ns", descending=True).unique(subset=["row"], keep="first")
    wait_names = _wait_span_names(spans, names).implode()
    is_wait_span = (
        pl.col("name").is_in(wait_names)
        & ~pl.col("kind").is_in([KIND_PRODUCER, KIND_CONSUMER])
        & pl.col("messaging_destination").is_null()
        & pl.col("parent_row").is_not_null()
    )
    wait_spans = (
        spans.lazy()
        .filter(is_wait_span)
        .select("row", wait_ns=pl.col("duration_ns"))
        .join(own.lazy().select("row"), on="row", how="anti")
        .with_columns(
            queue_depth=pl.lit(None, pl.Int64), source=pl.lit("wait_span"), hold_ns=pl.lit(None, pl.Int64)
        )
        .collect()
    )
    waits = pl.concat([own, wait_spans.select(own.columns)], how="vertical_relaxed")
    waits = with_span_columns(spans, waits, [*_SPAN_COLUMNS, "parent_row"])
    # The waiter: a span that carries its own wait evidence waits itself -- unless it is a wait span
    # ("lock.acquire", with or without a wait attribute), whose parent is the code that waits.
    parent_rows = waits["parent_row"]
    waits = waits.with_columns(
        in_parent=is_wait_span,
        parent_service=spans["service"].gather(parent_rows),
        parent_name=spans["name"].gather(parent_rows),
        parent_duration_ns=spans["duration_ns"].gather(parent_rows),
    )
    waits = _with_next_sibling_hold(spans, waits)
    in_parent = pl.col("in_parent")
    own_target = (
        pl.coalesce(pl.col("db_system"), pl.col("peer"), pl.col("service")),
        pl.coalesce(normalized_statement(), pl.col("messaging_destination"), pl.col("name")),
    )
    return waits.with_columns(
        waiter_service=pl.when(in_parent).then(pl.col("parent_service")).otherwise(pl.col("service")),
        waiter_name=pl.when(in_parent).then(pl.col("parent_name")).otherwise(pl.col("name")),
        waiter_duration_ns=pl.when(in_parent)
        .then(pl.col("parent_duration_ns"))
        .otherwise(pl.col("duration_ns")),
        target_service=pl.when(in_parent).then(pl.col("service")).otherwise(own_target[0]),
        target_operation=pl.when(in_parent).then(pl.col("name")).otherwise(own_target[1]),
        resource=pl.when(in_parent)
        .then(pl.coalesce(pl.col("hints").str.extract(_RESOURCE_HINT, 1), pl.col("name")))
        .otherwise(_resource()),
    )


def _with_next_sibling_hold(spans: pl.DataFrame, waits: pl.DataFrame) -> pl.DataFrame:
    """For a wait span without a measured hold, the critical section is the sibling that starts as
    the wait ends (within ``HANDOFF_NS``, 1 ms): its duration becomes ``hold_ns``."""
    need = waits.filter(pl.col("in_parent") & pl.col("hold_ns").is_null()).select(
        "row", "parent_row", t=pl.col("start_ns") + pl.col("duration_ns")
    )
    if need.is_empty():
        return waits
    siblings = (
        spans.lazy()
        .filter(pl.col("parent_row").is_in(need["parent_row"].unique().implode()))
        .select(
            "parent_row",
            t=pl.col("start_ns"),
            sibling_start=pl.col("start_ns"),
            sibling_ns=pl.col("duration_ns"),
        )
        .sort("t")
        .collect()
    )
    found = (
        need.sort("t")
        .join_asof(siblings, on="t", by="parent_row", strategy="forward", check_sortedness=False)
        .filter(pl.col("sibling_start") - pl.col("t") <= HANDOFF_NS)
        .select("row", next_hold_ns=pl.col("sibling_ns"))
    )
    return (
        waits.join(found, on="row", how="left")
        .with_columns(hold_ns=pl.coalesce(pl.col("hold_ns"), pl.col("next_hold_ns")))
        .drop("next_hold_ns")
    )


EXPLICIT_SIGNATURE = ["waiter_service", "waiter_name", "target_service", "target_operation", "resource"]
_CANDIDATE_LABELS = ["service", "name", "db_system", "peer", "hints", "db_statement", "messaging_destination",
                     "http_route", "rpc_method"]  # fmt: skip


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half. Explicit evidence: ``acquisitions`` (a partial count per signature) and
    ``waits`` (contended waits on the critical path). Inferred convoys look across concurrent
    traces, so every span is a *resource row* here — ``candidates``: resource key, operation key,
    times, ids and a tie-break key — with ``labels`` (the earliest span of each resource key, for
    the finding's names) and, to exclude and nest: ``explicit_ops`` and ``explicit_marks`` (the
    waiting spans and their parents)."""
    spans = ctx.spans
    explicit = _explicit_waits(spans, _common.span_names(ctx))
    counted = (pl.col("wait_ns") >= MIN_WAIT_NS) & pl.col("on_critical_path")
    # Every acquisition the evidence shows, contended or not (the denominator of the contention
    # rate), with what the near miss of an uncontended lock reports: partial aggregates.
    acquisitions = (
        explicit.sort("trace_id")
        .group_by(EXPLICIT_SIGNATURE, maintain_order=True)
        .agg(
            acquisitions=pl.len(),
            counted=counted.sum(),
            longest_ns=pl.col("wait_ns").max(),
            longest_on_path_ns=pl.col("wait_ns").filter(pl.col("on_critical_path")).max(),
            traces=pl.col("trace_id").n_unique(),
            trace_ids=pl.col("trace_id").unique(maintain_order=True).head(5),
        )
    )
    contended = explicit.filter(pl.col("wait_ns") >= MIN_WAIT_NS)
    waits = contended.filter(pl.col("on_critical_path")).with_columns(
        wait_share=pl.col("wait_ns") / pl.col("waiter_duration_ns").clip(1)
    )
    marks = pl.concat(
        [
            contended.select(uid=_uid("span_id")),
            contended.filter(pl.col("parent_span_id").is_not_null()).select(uid=_uid("parent_span_id")),
        ]
    ).unique()
    candidates, labels = _convoy_candidates(spans)
    return {
        "acquisitions": acquisitions,
        "waits": waits.select(
            *EXPLICIT_SIGNATURE,
            "trace_id",
            "span_id",
            "start_ns",
            "wait_ns",
            "wait_share",
            "hold_ns",
            "queue_depth",
            "source",
        ),
        "explicit_ops": contended.select(op=pl.struct("service", "name").hash()).unique(),
        "explicit_marks": marks,
        "candidates": candidates,
        "labels": labels,
    }


def decide(rows: Rows, notes: NearMissSink, buckets: Iterable[BucketLoader] | None = None) -> list[Finding]:
    """Cross-trace half: contention rates of explicit waits, and the convoy rules per resource.
    With ``buckets`` the resource rows (``candidates``) come from there instead: every row of a
    resource key in one bucket (``SPILL_KEYS``), each bucket read (``load(columns, keys)``, None:
    every column, every key) when its turn comes, so the deciding process holds one bucket of them at a time. The
    buckets are iterated three times."""
    findings = _explicit_findings(rows.get("waits"), rows.get("acquisitions"), notes)
    reasons: list[pl.DataFrame] = []  # (gid, reason) of busy groups a convoy rule dropped
    findings.extend(_convoy_findings(rows, reasons, buckets))
    _note_convoy_misses(notes, rows.get("labels"), reasons)
    return findings


# Tables of extracted rows that grow with spans and are decided per key: the key column of each,
# by which a run with little memory spills them to disk in buckets (``hourglass.analysis.spill``).
SPILL_KEYS = {"candidates": "gid"}
# one bucket's rows: these columns (None: all), of these keys (None: all)
BucketLoader = Callable[[list[str] | None, pl.Series | None], pl.DataFrame]


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)


def _explicit_findings(
    waits: pl.DataFrame | None, acquisitions: pl.DataFrame | None, notes: NearMissSink
) -> list[Finding]:
    if acquisitions is None or acquisitions.is_empty():
        return []
    sig = EXPLICIT_SIGNATURE
    acquisitions = acquisitions.group_by(sig).agg(
        pl.col("acquisitions", "counted", "traces").sum(),
        pl.col("longest_ns", "longest_on_path_ns").max(),
        trace_ids=pl.col("trace_ids")
        .list.explode(keep_nulls=False, empty_as_null=False)
        .unique()
        .sort()
        .head(5),
    )
    # Near misses: explicit wait evidence none of whose waits counted (one row per signature).
    for r in acquisitions.filter(pl.col("counted") == 0).sort(sig, nulls_last=True).iter_rows(named=True):
        notes.note_near_miss(
            KIND,
            r["waiter_service"],
            r["waiter_name"],
            f"{r['acquisitions']} waits for {r['resource'] or r['target_operation']}: longest "
            f"{r['longest_ns'] / 1e6:.3g} ms, on the critical path {(r['longest_on_path_ns'] or 0) / 1e6:.3g} ms "
            f"< {MIN_WAIT_NS / 1e6:g} ms: uncontended",
            trace_ids=r["trace_ids"],
            traces=r["traces"],
        )
    if waits is None or waits.is_empty():
        return []
    waits = waits.join(acquisitions.select(*sig, "acquisitions"), on=sig, how="left", nulls_equal=True)
    findings = []
    for frame in waits.sort(["start_ns", "trace_id", "span_id"]).partition_by(sig, maintain_order=True):
        first = frame.row(0, named=True)
        contention_rate = frame.height / max(int(first["acquisitions"] or 0), frame.height)
        if contention_rate < MIN_CONTENTION_RATE:
            notes.note_near_miss(
                KIND,
                first["waiter_service"],
                first["waiter_name"],
                f"{first['resource'] or first['target_operation']}: {frame.height} of "
                f"{first['acquisitions']} acquisitions waited ({contention_rate:.1%}) < "
                f"{MIN_CONTENTION_RATE:.0%}: rarely contended",
                trace_ids=frame["trace_id"].unique(maintain_order=True).head(5).to_list(),
                traces=frame["trace_id"].n_unique(),
            )
            continue
        sources = sorted(set(frame["source"].to_list()))
        traces = frame["trace_id"].n_unique()
        confidence = 0.75 + (0.1 if traces >= 5 else 0.0) + (0.05 if traces >= 20 else 0.0)
        evidence: dict[str, Any] = {
            "evidence": "explicit",
            "sources": sources,
            "resource": first["resource"],
            "waits": frame.height,
            "acquisitions": int(first["acquisitions"] or frame.height),
            "contention_rate": round(contention_rate, 3),
            "wait_ms_p50": stat(frame["wait_ns"], scale=1e6),
            "wait_ms_p95": stat(frame["wait_ns"], 0.95, 1e6),
            "wait_ms_total": float(frame["wait_ns"].sum()) / 1e6,
            "wait_share_p50": round(stat(frame["wait_share"]), 3),
            "wait_share_p95": round(stat(frame["wait_share"], 0.95), 3),
        }
        hold = frame["hold_ns"].drop_nulls()
        if hold.len():
            evidence["hold_ms_p50"] = stat(hold, scale=1e6)
        depth = frame["queue_depth"].drop_nulls()
        if depth.len():
            evidence["queue_depth_p50"] = stat(depth)
            evidence["queue_depth_max"] = int(depth.max())  # type: ignore[arg-type]
        findings.append(
            Finding(
                kind=KIND,
                category="parallelization",
                service=first["waiter_service"],
                operation=first["waiter_name"],
                targets=[{"service": first["target_service"], "operation": first["target_operation"]}],
                occurrences=_occurrences(frame),
                confidence=round(min(confidence, 0.95), 3),
                evidence=evidence,
                signature_extra=f"explicit|{first['resource']}",
            )
        )
    return findings


def _occurrences(frame: pl.DataFrame) -> Occurrences:
    """One occurrence per trace: every waiting span of the finding in it, each shortened by its wait
    (its key hashes the trace id, the span ids and the waits, every trace's at once). Made in
    columns, no object per occurrence (:meth:`Occurrences.from_columns` of ``ShortenSpan``): the
    traces whose count (peers or queue depth) is known and those without it (that number absent)
    apart, then put back in order. A wait's share is a number wherever its wait is."""
    count_name = "peers" if "peers" in frame.columns else "queue_depth"
    per_trace = frame.group_by("trace_id", maintain_order=True).agg(
        span_ids=pl.col("span_id"),
        waits=pl.col("wait_ns"),
        wait_ms=pl.col("wait_ns").sum() / 1e6,
        wait_share=pl.col("wait_share").max().cast(pl.Float64),
        count=pl.col(count_name).max().cast(pl.Float64),
    )
    keys = occurrence_keys(per_trace, ["trace_id", "span_ids", "waits"])
    known = per_trace["count"].is_not_null().to_numpy()
    parts, order = [], []
    for counted in (True, False):
        rows = np.flatnonzero(known == counted)
        if rows.size == 0:
            continue
        part = per_trace if rows.size == per_trace.height else per_trace[rows]
        numbers = {"wait_ms": part["wait_ms"], "wait_share": part["wait_share"]}
        if counted:
            numbers[count_name] = part["count"]
        parts.append(
            Occurrences.from_columns(
                part["trace_id"],
                part["span_ids"],
                intervention=ShortenSpan,
                shortened=(part["span_ids"], part["waits"]),  # one wait per span (one agg)
                numbers=numbers,
                keys=keys if rows.size == per_trace.height else keys.gather(rows),
            )
        )
        order.append(rows)
    if len(parts) == 1:
        return parts[0]
    return Occurrences.concat(parts).take(np.argsort(np.concatenate(order), kind="stable"))


def _dense_group(cand: pl.DataFrame) -> pl.Expr:
    """1..k numbering of the ``gid`` values in first-seen order: a hash lookup, where
    ``rank("dense")`` sorts. Only used to pack a group into the high bits of a sort key, so any
    one-to-one numbering does."""
    groups = cand["gid"].unique(maintain_order=True)
    numbers = pl.int_range(1, groups.len() + 1, dtype=pl.Int64, eager=True)
    return pl.col("gid").replace_strict(groups, numbers, return_dtype=pl.Int64)


@dataclass(frozen=True)
class _Clock:
    """Where the sweep's packed keys start and whether they fit: taken over every row the step
    sees — the whole frame, or every bucket of a spilled one — so the microsecond rounding of
    ties is the same however the resource keys were bucketed."""

    t0: int
    packed: bool

    @staticmethod
    def of(extents: Sequence[tuple[int, int, int]]) -> _Clock | None:
        """From (earliest start, latest end, groups) of frames holding disjoint groups."""
        if not extents:
            return None
        t0 = min(e[0] for e in extents)
        span_us = (max(e[1] for e in extents) - t0) // 1000
        return _Clock(t0, sum(e[2] for e in extents) < (1 << 22) and span_us < (1 << 40))


def _extent(cand: pl.DataFrame) -> tuple[int, int, int] | None:
    """(earliest start, latest end, groups) of ``cand``; None when it is empty."""
    if cand.is_empty():
        return None
    row = cand.select(pl.col("start_ns").min(), pl.col("end_ns").max(), pl.col("gid").n_unique()).row(0)
    return int(row[0]), int(row[1]), int(row[2])


def _peers_at_start(cand: pl.DataFrame, clock: _Clock) -> pl.Series:
    """For each span (columns gid, start_ns, end_ns, uid), how many spans of its group were in flight
    when it started, itself included: a sweep of +1 at each start and -1 at each end, sorted by
    (group, time) with ends before starts at one instant, summed cumulatively (every group sums to
    zero, so one running sum over the whole sorted frame is each group's concurrency).

    The sort is the cost, so (dense group, microsecond time, start flag) is packed into one int64
    key when it fits (fewer than 2**22 groups and a time range under 2**40 µs, about 12 days);
    otherwise a multi-column sort does the same at a few times the price.

    Packed, the running sum at a start is counted rather than summed: the starts ordered before
    it, itself included (by key, then ``uid``), less the ends ordered before it (an end's key is
    even, a start's odd, so they never tie): a rank and a binary search over a few int64 arrays,
    instead of sorting twice the rows with their indices — the decision's peak over one busy
    resource key (the generated mix's busiest holds about two thirds of the spans)."""
    t0 = clock.t0
    if clock.packed:
        keys = cand.select(
            g=_dense_group(cand) * (1 << 41),
            s=(pl.col("start_ns") - t0) // 1000 * 2 + 1,
            e=(pl.col("end_ns") - t0) // 1000 * 2,
        )
        group = keys["g"].to_numpy()
        start_keys = group + keys["s"].to_numpy()
        end_keys = group + keys["e"].to_numpy()
        del keys, group
        end_keys.sort()
        order = np.lexsort((cand["uid"].to_numpy(), start_keys))
        rank = np.empty(order.size, dtype=np.int64)
        rank[order] = np.arange(1, order.size + 1, dtype=np.int64)
        del order
        rank -= np.searchsorted(end_keys, start_keys, side="left")
        return pl.Series("peers", rank.astype(np.int32))
    idx = pl.int_range(pl.len(), dtype=pl.UInt32).alias("idx")
    dense = cand.select(idx, "uid", g=_dense_group(cand), s=pl.col("start_ns"), e=pl.col("end_ns"))
    events = pl.concat(
        [
            dense.select("idx", "uid", "g", t=pl.col("s"), delta=pl.lit(1, pl.Int8)),
            dense.select("idx", "uid", "g", t=pl.col("e"), delta=pl.lit(-1, pl.Int8)),
        ]
    ).sort(["g", "t", "delta", "uid"])
    sweep = events.with_columns(peers=pl.col("delta").cast(pl.Int32).cum_sum()).filter(pl.col("delta") == 1)
    peers = np.empty(cand.height, dtype=np.int32)
    peers[sweep["idx"].to_numpy()] = sweep["peers"].to_numpy()
    return pl.Series("peers", peers)


def _busy_groups(cand: pl.DataFrame, clock: _Clock) -> pl.Series:
    """The group keys (``gid``) where at least ``BUSY_PREFILTER`` × ``MIN_QUEUED_SHARE`` of the spans
    started while an earlier-started span of the group was still running — exactly the spans the
    sweep would give ``peers >= 2``, found with one sort of the starts and a running maximum of the
    ends (groups are packed into one int64 key, so a group's running maximum never leaks into the
    next). A necessary condition for a convoy: the full sweep then runs on these groups alone.
    Returns every group when the packed key does not fit."""
    t0 = clock.t0
    if not clock.packed:
        return cand["gid"].unique()
    dense = cand.select("gid", "start_ns", "end_ns", g=_dense_group(cand))
    packed = pl.col("g") * (1 << 41)
    ordered = dense.select(
        "gid",
        start_key=packed + (pl.col("start_ns") - t0) // 1000,
        end_key=packed + (pl.col("end_ns") - t0) // 1000,
    ).sort("start_key")
    overlapped = ordered.select(
        "gid", overlapped=(pl.col("start_key") < pl.col("end_key").cum_max().shift(1)).fill_null(False)
    )
    shares = overlapped.group_by("gid").agg(share=pl.col("overlapped").mean())
    return shares.filter(pl.col("share") >= BUSY_PREFILTER * MIN_QUEUED_SHARE)["gid"]


def _uid(span_column: str) -> pl.Expr:
    return pl.struct("trace_id", span_column).hash()


def _convoy_candidates(spans: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Resource rows for the convoy rule: one per span with a duration (integers but for the ids),
    and per resource key the names of its earliest span."""
    # The group key hashes every resource column (a finer split than ``_resource``'s first
    # non-null, and free of string copies); statements count by shape, normalised once per
    # distinct text.
    # (normalized_statement in two steps: the literals masked in each distinct statement, the
    # whitespace collapsed and hashed in each distinct masked text, a few; then a join, not a
    # replace_strict, gives each span its shape)
    shapes = (
        spans.select(pl.col("db_statement").unique()).drop_nulls().with_columns(_masked=_statement_masked())
    )
    masked = shapes.select(pl.col("_masked").unique()).with_columns(
        shape=pl.col("_masked").str.replace_all(WHITESPACE_RUN, " ").hash()
    )
    shapes = shapes.join(masked, on="_masked", how="left").select("db_statement", "shape")
    statement_shape = spans.select("db_statement").join(
        shapes, on="db_statement", how="left", maintain_order="left"
    )["shape"]
    resource_key = pl.struct(
        "service",
        "name",
        pl.col("hints").str.extract(_RESOURCE_HINT, 1),
        "_shape",
        "messaging_destination",
        "peer",
        "http_route",
        "rpc_method",
    ).hash()
    # The context holds each trace's spans together in trace_id order, so the running count of
    # trace changes numbers the traces in trace_id order: integers to count and sort by below.
    trace_no = (pl.col("trace_id") != pl.col("trace_id").shift(1)).fill_null(True).cum_sum().cast(pl.UInt32)
    cand = (
        spans.lazy()
        .with_columns(_trace_no=trace_no, _shape=statement_shape)
        .filter(pl.col("duration_ns") > 0)
        .select(
            "row",
            "start_ns",
            "end_ns",
            "duration_ns",
            "on_critical_path",
            "trace_id",
            "span_id",
            "_trace_no",
            gid=resource_key,
            op=pl.struct("service", "name").hash(),
            # a span and its parent as 64-bit keys: the sweep breaks ties within a microsecond by
            # ``uid`` (whatever the row order), and nesting is a match of ``puid`` against ``uid``
            uid=_uid("span_id"),
            puid=pl.when(pl.col("parent_span_id").is_not_null()).then(_uid("parent_span_id")),
        )
        .collect()
    )
    # The earliest span of each key: only spans at their key's earliest start can be it, so the
    # string sort runs on those few rows, not on every span.
    earliest = (
        cand.filter(pl.col("start_ns") == pl.col("start_ns").min().over("gid"))
        .sort(["gid", "start_ns", "trace_id", "span_id"])
        .unique(subset="gid", keep="first", maintain_order=True)
    )
    # Traces per key and the first five trace ids (sorted), counted on the trace numbers.
    # (per key, not over every distinct (key, trace) pair: one hash grouping, not two)
    firsts = cand.group_by("gid").agg(
        traces=pl.col("_trace_no").n_unique(), _trace_no=pl.col("_trace_no").unique().sort().head(5)
    )
    # each trace's first row (the trace numbers run in row order): its number and id
    trace_ids = cand.select("_trace_no", "trace_id").filter(
        (pl.col("_trace_no") != pl.col("_trace_no").shift(1)).fill_null(True)
    )
    seen = (
        firsts.explode("_trace_no")
        .join(trace_ids, on="_trace_no", how="left", maintain_order="left")
        .group_by("gid", maintain_order=True)
        .agg(pl.col("traces").first(), trace_ids=pl.col("trace_id"))
    )
    cand = cand.drop("_trace_no")
    labels = with_span_columns(
        spans, earliest.select("row", "gid", "start_ns", "trace_id", "span_id"), _CANDIDATE_LABELS
    ).join(seen, on="gid")
    # One row per span travels to the decision: the ids as text only where the span can be a
    # wait of the finding (on the critical path and at least MIN_WAIT_NS long).
    could_wait = pl.col("on_critical_path") & (pl.col("duration_ns") >= MIN_WAIT_NS)
    cand = cand.with_columns(
        trace_id=pl.when(could_wait).then(pl.col("trace_id")),
        span_id=pl.when(could_wait).then(pl.col("span_id")),
    )
    return cand.drop("row"), labels.drop("row")


def _note_convoy_misses(
    notes: NearMissSink, labels: pl.DataFrame | None, reasons: list[pl.DataFrame]
) -> None:
    """Near misses: busy operations (enough load to judge) that failed a convoy rule, one per
    operation with the first rule it failed."""
    frames = [r for r in reasons if r.height]
    if not frames or labels is None:
        return
    why = pl.concat(frames).unique("gid", keep="first", maintain_order=True)
    per_op = (
        labels.sort(["gid", "start_ns", "trace_id", "span_id"])
        .group_by("gid", maintain_order=True)
        .agg(
            pl.col("service", "name").first(),
            pl.col("traces").sum(),
            trace_ids=pl.col("trace_ids")
            .list.explode(keep_nulls=False, empty_as_null=False)
            .unique()
            .sort()
            .head(5),
        )
        .join(why, on="gid", how="inner")
        .sort("service", "name", "reason")
    )
    for r in per_op.iter_rows(named=True):
        notes.note_near_miss(
            KIND,
            r["service"],
            r["name"],
            f"no convoy: {r['reason']}",
            trace_ids=r["trace_ids"],
            traces=r["traces"],
        )


def _convoy_findings(
    rows: Rows, reasons: list[pl.DataFrame], buckets: Iterable[BucketLoader] | None = None
) -> list[Finding]:
    """The convoy rules per resource key, over every trace's resource rows (``candidates``, or
    with ``buckets`` the same rows spilled in buckets of whole resource keys, read one bucket at
    a time); busy groups a rule drops go to ``reasons`` as (gid, reason)."""
    explicit_ops = rows.get("explicit_ops")
    ops = explicit_ops["op"].unique().implode() if explicit_ops is not None and explicit_ops.height else None
    if buckets is None:
        cand = rows.get("candidates")
        if cand is None or cand.is_empty():
            return []
        cand = _sampled(cand, ops)
        sampled = _Clock.of([e for e in (_extent(cand),) if e])
        if sampled is None:
            return []
        cand = cand.filter(pl.col("gid").is_in(_busy_groups(cand, sampled).implode()))
        busy = _Clock.of([e for e in (_extent(cand),) if e])
        if busy is None:
            return []
        pieces = [_queued_convoys(cand, busy, reasons)]
    elif _streamable(loads := list(buckets)):
        pieces = _streamed_convoys(loads, explicit_ops, reasons)
    else:
        # The busy pre-filter and the sweep round times against the earliest start of the rows
        # they see (frame-wide), so the buckets are read three times: the sampled groups' extent,
        # the busy groups' extent, then the rules per resource key, one bucket at a time — the
        # busy groups found from the four columns that takes, then every column of their rows
        # alone (a group's rows share one operation, so this is ``_busy`` of the whole bucket).
        # Each bucket is read into a call's argument, which drops it as soon as a filtered or
        # sorted copy replaces it.
        narrow = ["gid", "op", "start_ns", "end_ns"]
        sampled = _Clock.of(
            [e for e in (_extent(_sampled(load(narrow, None), ops)) for load in buckets) if e]
        )
        if sampled is None:
            return []
        busy = _Clock.of(
            [e for e in (_extent(_busy(load(narrow, None), ops, sampled)) for load in buckets) if e]
        )
        if busy is None:
            return []
        pieces = []
        for load in buckets:
            gids = _busy(load(narrow, None), ops, sampled)["gid"].unique()
            if gids.len():
                pieces.append(_queued_convoys(load(None, gids), busy, reasons))
            memlog.note(f"lock_contention bucket of {gids.len()} busy resource keys")
    pieces = [(convoy, stats) for convoy, stats in pieces if convoy.height]
    if not pieces:
        return []
    # One row order whatever the bucketing: the whole frame's.
    convoy = pl.concat([c for c, _ in pieces], how="vertical_relaxed").sort(["gid", "start_ns", "uid"])
    stats = pl.concat([s for _, s in pieces], how="vertical_relaxed")
    return _convoy_verdicts(rows, convoy, stats, reasons)


def _streamed_convoys(
    loads: list[BucketLoader], explicit_ops: pl.DataFrame | None, reasons: list[pl.DataFrame]
) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """The bucketed convoy rules with each bucket's rows streamed from its files
    (``hourglass.analysis.detectors._sweep``), so no key's rows are held at once, over one DuckDB
    connection: the sampled keys' extents from per-file aggregates, then one sorted pass that
    gives each sampled key its busy pre-filter share and its sweep together (resumed, where the
    bucket keeps them — serve's stored batches — from the sweep states of the last decision, so
    only the rows from there are read), the load statistics of the keys busy enough to judge from
    the sweep's exact integer sums, and the remaining rules on every column of the keys whose
    latency grows with load (a convoy's rows are its finding's evidence). The same clocks, peers,
    float sums and reasons as :func:`_queued_convoys` over the whole frame: where a shortcut
    could differ (the busy keys' clock rounds microseconds elsewhere than the sampled keys', a
    correlation within 1e-9 of a threshold or of a rounding step, a key of several operations)
    the rows are swept again as :func:`_swept_in_three_passes` does."""
    excluded = explicit_ops["op"].unique() if explicit_ops is not None and explicit_ops.height else None
    with _sweep.connection(Path(loads[0].files[0]).parent.parent) as con:  # type: ignore[attr-defined]
        states = [_sweep.BucketSweep(load.files, getattr(load, "state", None), con) for load in loads]  # type: ignore[attr-defined]
        extents = [s.extents(excluded, MIN_SAMPLES) for s in states]
        ready = [e for e in extents if e is not None]
        sampled = _Clock.of([_group_extent(e) for e in ready if e.height])
        if len(ready) < len(extents) or (sampled is not None and not sampled.packed):
            return _swept_in_three_passes(loads, excluded, reasons, con)
        if sampled is None:
            return []
        swept = [s.sweep(con, e["gid"], sampled.t0) for s, e in zip(states, ready, strict=True)]
        share = BUSY_PREFILTER * MIN_QUEUED_SHARE
        busy_gids = [
            pl.Series(
                "gid",
                [g for g, c in sw.items() if c.started and c.overlapped / c.started >= share],
                pl.UInt64,
            )
            for sw in swept
        ]
        busy = _Clock.of(
            [
                _group_extent(b)
                for e, g in zip(ready, busy_gids, strict=True)
                if (b := e.filter(pl.col("gid").is_in(g.implode()))).height
            ]
        )
        if busy is None:
            return []
        pieces = []
        for load, files, sw, gids in zip(loads, (ld.files for ld in loads), swept, busy_gids, strict=True):  # type: ignore[attr-defined]
            if not gids.len():
                continue
            keep = (MIN_PEAK_PEERS, MIN_QUEUED_SHARE)
            if (busy.t0 - sampled.t0) % 1000 == 0:  # the same microseconds: the pass's peers
                stats, unsure = _stats_from_sums({g: sw[g] for g in gids.to_list()})
                if unsure:
                    loaded = _sweep.sweep(
                        files, pl.Series(unsure, dtype=pl.UInt64), busy.t0, busy.packed, keep, con
                    )
                    stats = pl.concat([stats, _load_stats(loaded)], how="vertical_relaxed")
            else:
                stats = _load_stats(_sweep.sweep(files, gids, busy.t0, busy.packed, keep, con))
            steep = _judge_load(stats, reasons)["gid"]
            if steep.len():  # the rules below recount these keys' peers and statistics: the same values
                pieces.append(_queued_convoys(load(None, steep), busy, reasons))
            memlog.note(f"lock_contention bucket swept: {gids.len()} busy keys, {steep.len()} loaded")
    return pieces


_STATS_SCHEMA = {
    "gid": pl.UInt64,
    "n": pl.UInt32,
    "peak": pl.Int32,
    "queued_share": pl.Float64,
    "corr": pl.Float64,
    "cov": pl.Float64,
    "var": pl.Float64,
    "slope_ns": pl.Float64,
}
_SURE = 1e-9  # a correlation this close to a threshold or a rounding step is computed by polars


def _stats_from_sums(carries: dict[int, _sweep.Carry]) -> tuple[pl.DataFrame, list[int]]:
    """:func:`_load_stats` of the keys whose sweep reaches the peak and the queued share, from
    the sweep's exact integer sums; the keys whose correlation is degenerate or within ``_SURE``
    of a value where polars' float rounding could decide otherwise (a threshold, a step of the
    two-decimal rounding of the near-miss text) are returned apart, for polars to compute."""
    rows: list[tuple[Any, ...]] = []
    unsure: list[int] = []
    edges = (MIN_CORRELATION, NEAR_MISS_CORRELATION)
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        for gid, c in carries.items():
            n = c.started
            if not n or c.peak < MIN_PEAK_PEERS or c.queued / n < MIN_QUEUED_SHARE:
                continue
            sd, sdd, sp, spp, sdp = c.sums
            num, vd, vp = n * sdp - sd * sp, n * sdd - sd * sd, n * spp - sp * sp
            if n < 2 or vd <= 0 or vp <= 0:
                unsure.append(gid)
                continue
            corr = decimal.Decimal(num) / (decimal.Decimal(vd) * decimal.Decimal(vp)).sqrt()
            step = corr * 100 - (corr * 100).to_integral_value(decimal.ROUND_FLOOR)
            if (
                any(abs(corr - decimal.Decimal(e)) < _SURE for e in edges)
                or abs(step - decimal.Decimal("0.5")) < _SURE * 100
            ):
                unsure.append(gid)
                continue
            cov, var = num / (n * (n - 1)), vp / (n * (n - 1))
            rows.append((gid, n, c.peak, c.queued / n, float(corr), cov, var, cov / var))
    return pl.DataFrame(rows, schema=_STATS_SCHEMA, orient="row"), unsure


def _swept_in_three_passes(
    loads: list[BucketLoader],
    excluded: pl.Series | None,
    reasons: list[pl.DataFrame],
    con: Any,
) -> list[tuple[pl.DataFrame, pl.DataFrame]]:
    """The bucketed convoy rules in three streamed passes over every row: the sampled keys'
    extents (an aggregate), the busy pre-filter and the sweep (sorted out of core, read in
    bounded chunks), then the load statistics on (duration, peers) of the keys busy enough to
    judge, and the remaining rules on every column of the keys whose latency grows with load."""
    files = [load.files for load in loads]  # type: ignore[attr-defined]
    extents = [_sweep.group_extents(f, excluded, MIN_SAMPLES, con) for f in files]
    sampled = _Clock.of([_group_extent(e) for e in extents if e.height])
    if sampled is None:
        return []
    busy_gids = []
    for f, extent in zip(files, extents, strict=True):
        if not extent.height or not sampled.packed:  # unpacked: no pre-filter, as _busy_groups
            busy_gids.append(extent["gid"])
            continue
        shares = _sweep.overlap_shares(f, extent["gid"], sampled.t0, con)
        busy_gids.append(shares.filter(pl.col("share") >= BUSY_PREFILTER * MIN_QUEUED_SHARE)["gid"])
    busy_extents = [
        e.filter(pl.col("gid").is_in(g.implode())) for e, g in zip(extents, busy_gids, strict=True)
    ]
    busy = _Clock.of([_group_extent(e) for e in busy_extents if e.height])
    if busy is None:
        return []
    pieces = []
    for load, f, gids in zip(loads, files, busy_gids, strict=True):
        if not gids.len():
            continue
        loaded = _sweep.sweep(f, gids, busy.t0, busy.packed, (MIN_PEAK_PEERS, MIN_QUEUED_SHARE), con)
        steep = _stats_under_load(loaded, reasons)["gid"]
        del loaded
        if steep.len():  # the rules below recount these keys' peers and statistics: the same values
            pieces.append(_queued_convoys(load(None, steep), busy, reasons))
        memlog.note(f"lock_contention bucket streamed: {gids.len()} busy keys, {steep.len()} loaded")
    return pieces


def _streamable(loads: list[BucketLoader]) -> bool:
    """Every bucket names its files (``hourglass.analysis.spill.BucketFiles``)."""
    return bool(loads) and all(getattr(load, "files", None) for load in loads)


def _group_extent(extent: pl.DataFrame) -> tuple[int, int, int]:
    """(earliest start, latest end, groups) of :func:`_sweep.group_extents`' rows."""
    row = extent.select(pl.col("lo").min(), pl.col("hi").max(), pl.len()).row(0)
    return int(row[0]), int(row[1]), int(row[2])


def _sampled(cand: pl.DataFrame, explicit_ops: pl.Series | None) -> pl.DataFrame:
    """The resource rows of groups with enough spans to judge, explicit waits' operations left out."""
    if explicit_ops is not None:
        cand = cand.filter(~pl.col("op").is_in(explicit_ops))
    return cand.with_columns(n=pl.len().over("gid")).filter(pl.col("n") >= MIN_SAMPLES).drop("n")


def _busy(cand: pl.DataFrame, explicit_ops: pl.Series | None, clock: _Clock) -> pl.DataFrame:
    """:func:`_sampled`, then the busy groups alone."""
    cand = _sampled(cand, explicit_ops)
    return cand.filter(pl.col("gid").is_in(_busy_groups(cand, clock).implode())) if cand.height else cand


def _stats_under_load(cand: pl.DataFrame, reasons: list[pl.DataFrame]) -> pl.DataFrame:
    """Per group of ``cand`` (gid, duration_ns, peers; rows in (gid, start_ns, uid) order, so float
    sums are the same however the rows were gathered): the load statistics of the groups busy
    enough to judge whose latency grows with load; the busy ones whose latency does not go to
    ``reasons`` when the correlation is at least the near-miss threshold."""
    return _judge_load(_load_stats(cand), reasons)


def _load_stats(cand: pl.DataFrame) -> pl.DataFrame:
    """Per group of ``cand`` (gid, duration_ns, peers): rows, peak and queued share of ``peers``,
    correlation, covariance and slope of duration against ``peers``."""
    return (
        cand.group_by("gid")
        .agg(
            n=pl.len(),
            peak=pl.col("peers").max(),
            queued_share=(pl.col("peers") >= 2).mean(),
            corr=pl.corr("duration_ns", "peers"),
            cov=pl.cov("duration_ns", "peers"),
            var=pl.col("peers").cast(pl.Float64).var(),
        )
        .with_columns(slope_ns=pl.col("cov") / pl.col("var"))
        .cast(_STATS_SCHEMA)  # type: ignore[arg-type]
    )


def _judge_load(stats: pl.DataFrame, reasons: list[pl.DataFrame]) -> pl.DataFrame:
    """:func:`_load_stats`' groups busy enough to judge whose latency grows with load; the busy
    ones whose latency does not go to ``reasons`` when the correlation is at least the near-miss
    threshold."""
    stats = stats.filter((pl.col("peak") >= MIN_PEAK_PEERS) & (pl.col("queued_share") >= MIN_QUEUED_SHARE))
    # Busy enough to judge from here on: a group dropped below is a near miss.
    flat = ~(pl.col("corr") >= MIN_CORRELATION).fill_null(False)
    reasons.append(  # only near misses: every busy operation has a flat latency, those are not news
        stats.filter(flat & (pl.col("corr") >= NEAR_MISS_CORRELATION)).select(
            "gid",
            reason=pl.format(
                "latency does not grow with load (correlation with concurrent peers {} < {})",
                pl.col("corr").fill_nan(None).round(2),
                pl.lit(MIN_CORRELATION),
            ),
        )
    )
    return stats.filter(~flat)


def _queued_convoys(
    cand: pl.DataFrame, clock: _Clock, reasons: list[pl.DataFrame]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The rules that look at one resource key at a time, over the busy groups in ``cand``: the
    spans of the groups that pass them (with ``peers``, ``base_ns`` and ``gap_p50``) and the
    groups' statistics."""
    if cand.is_empty():
        return cand, pl.DataFrame()
    # One row order whatever the partitioning, so float sums (covariance, variance) are identical.
    cand = cand.sort(["gid", "start_ns", "uid"])
    cand = cand.with_columns(peers=_peers_at_start(cand, clock))

    base_expr = (
        pl.when((pl.col("peers") == 1).sum() >= 3)
        .then(pl.col("duration_ns").filter(pl.col("peers") == 1).median())
        .otherwise(pl.col("duration_ns").quantile(0.05))
    )
    stats = _stats_under_load(cand, reasons)
    if stats.is_empty():
        return cand.clear(), stats
    convoy = cand.join(stats.select("gid"), on="gid", how="semi")
    stats = stats.join(convoy.group_by("gid").agg(base_ns=base_expr), on="gid")
    steep = (pl.col("base_ns") > 0) & (pl.col("slope_ns") >= MIN_SLOPE_SHARE * pl.col("base_ns"))
    reasons.append(
        stats.filter(~steep).select(
            "gid",
            reason=pl.format(
                "each extra peer adds {} ms < {}% of the {} ms uncontended latency",
                (pl.col("slope_ns") / 1e6).round(3),
                pl.lit(round(MIN_SLOPE_SHARE * 100)),
                (pl.col("base_ns") / 1e6).round(3),
            ),
        )
    )
    stats = stats.filter(steep)
    convoy = convoy.join(stats.select("gid", "base_ns"), on="gid", how="inner")

    # Completion spacing of spans that were queued behind the previous completion.
    spacing = (
        convoy.sort(["gid", "end_ns", "uid"])
        .with_columns(
            prev_end=pl.col("end_ns").shift(1),
            same_group=pl.col("gid") == pl.col("gid").shift(1),
        )
        .filter(pl.col("same_group") & (pl.col("peers") >= 2) & (pl.col("prev_end") >= pl.col("start_ns")))
        .with_columns(gap=pl.col("end_ns") - pl.col("prev_end"))
        .group_by("gid")
        .agg(
            gaps=pl.len(),
            gap_p50=pl.col("gap").median(),
            bunched=(pl.col("gap") < 0.25 * pl.col("base_ns")).mean(),
            base_ns=pl.col("base_ns").first(),
        )
    )
    single_server = (
        (pl.col("gaps") >= MIN_SAMPLES // 2)
        & (pl.col("gap_p50") >= SERVICE_TIME_BAND[0] * pl.col("base_ns"))
        & (pl.col("gap_p50") <= SERVICE_TIME_BAND[1] * pl.col("base_ns"))
        & (pl.col("bunched") <= MAX_BUNCHED_SHARE)
    )
    reasons.append(
        convoy.select("gid", "base_ns")
        .unique("gid")
        .join(spacing.drop("base_ns"), on="gid", how="left")
        .filter(~single_server.fill_null(False))
        .select(
            "gid",
            reason=pl.format(
                "completions not spaced like one server: {} queued completions, gap p50 {} ms vs {} ms "
                "uncontended, {} bunched (a pool of parallel workers)",
                pl.col("gaps").fill_null(0),
                (pl.col("gap_p50") / 1e6).round(3),
                (pl.col("base_ns") / 1e6).round(3),
                pl.col("bunched").round(2),
            ),
        )
    )
    spacing = spacing.filter(single_server).select("gid", "gap_p50")
    return convoy.join(spacing, on="gid", how="inner"), stats.join(spacing, on="gid")


def _convoy_verdicts(
    rows: Rows, convoy: pl.DataFrame, stats: pl.DataFrame, reasons: list[pl.DataFrame]
) -> list[Finding]:
    """The rule that looks across resource keys (a convoy nested in another), then the findings."""

    # Prefer the deepest convoy: drop groups whose spans mostly contain a convoy or explicit wait
    # (an explicit waiting span counts as containing itself).
    marks = pl.concat(
        [
            convoy.select(uid=pl.col("puid")).drop_nulls(),
            *[m for m in (rows.get("explicit_marks"),) if m is not None and m.height],
        ],
        how="vertical_relaxed",
    )["uid"].unique()
    convoy = convoy.with_columns(_marked=pl.col("uid").is_in(marks.implode()))
    nested = convoy.group_by("gid").agg(nested_share=pl.col("_marked").mean())
    reasons.append(
        nested.filter(pl.col("nested_share") >= NESTED_CONVOY_SHARE).select(
            "gid",
            reason=pl.format(
                "nested: {} of its spans contain a deeper convoy or explicit wait, judged there",
                (pl.col("nested_share") * 100).round(0).cast(pl.Int64).cast(pl.String) + pl.lit("%"),
            ),
        )
    )
    convoy = convoy.join(
        nested.filter(pl.col("nested_share") < NESTED_CONVOY_SHARE).select("gid"), on="gid", how="semi"
    ).drop("_marked")
    if convoy.is_empty():
        return []
    labels = (
        rows["labels"]
        .sort(["gid", "start_ns", "trace_id", "span_id"])
        .unique(subset="gid", keep="first", maintain_order=True)
        .with_columns(resource=_resource())
        .select("gid", "service", "name", "db_system", "peer", "resource")
    )

    convoy = convoy.with_columns(
        wait_ns=(pl.col("duration_ns") - pl.col("base_ns")).clip(0).cast(pl.Int64),
        wait_share=((pl.col("duration_ns") - pl.col("base_ns")).clip(0) / pl.col("duration_ns")),
    )
    findings = []
    for frame in convoy.sort(["start_ns", "trace_id", "span_id"]).partition_by("gid", maintain_order=True):
        first = frame.row(0, named=True) | labels.filter(pl.col("gid") == frame["gid"][0]).row(0, named=True)
        group_stats = stats.filter(pl.col("gid") == first["gid"]).row(0, named=True)
        waiting = frame.filter(
            (pl.col("peers") >= 2) & (pl.col("wait_ns") >= MIN_WAIT_NS) & pl.col("on_critical_path")
        )
        if waiting.is_empty():
            reasons.append(
                pl.DataFrame(
                    {
                        "gid": [first["gid"]],
                        "reason": [f"no queued wait >= {MIN_WAIT_NS / 1e6:g} ms on the critical path"],
                    },
                    schema={"gid": convoy.schema["gid"], "reason": pl.String},
                )
            )
            continue
        traces = waiting["trace_id"].n_unique()
        confidence = 0.45
        confidence += 0.1 if group_stats["corr"] >= 0.8 else 0.0
        confidence += 0.1 if group_stats["n"] >= 100 else 0.0
        confidence += 0.05 if traces >= 20 else 0.0
        resource = first["resource"] or first["name"]
        evidence = {
            "evidence": "inferred_convoy",
            "resource": resource,
            "spans_seen": int(group_stats["n"]),
            "waits": waiting.height,
            "peers_peak": int(group_stats["peak"]),
            "peers_p50": stat(frame["peers"]),
            "queued_share": round(float(group_stats["queued_share"]), 3),
            "latency_vs_peers_correlation": round(float(group_stats["corr"]), 3),
            "added_ms_per_peer": float(group_stats["slope_ns"]) / 1e6,
            "uncontended_ms": float(first["base_ns"]) / 1e6,
            "service_time_ms": float(first["gap_p50"]) / 1e6,
            "wait_ms_p50": stat(waiting["wait_ns"], scale=1e6),
            "wait_ms_p95": stat(waiting["wait_ns"], 0.95, 1e6),
            "wait_ms_total": float(waiting["wait_ns"].sum()) / 1e6,
            "wait_share_p50": round(stat(waiting["wait_share"]), 3),
            "wait_share_p95": round(stat(waiting["wait_share"], 0.95), 3),
        }
        findings.append(
            Finding(
                kind=KIND,
                category="parallelization",
                service=first["service"],
                operation=first["name"],
                targets=[
                    {
                        "service": first["db_system"] or first["peer"] or first["service"],
                        "operation": resource,
                    }
                ],
                occurrences=_occurrences(waiting),
                confidence=round(min(confidence, 0.8), 3),
                evidence=evidence,
                signature_extra=f"inferred|{resource}",
            )
        )
    return findings
