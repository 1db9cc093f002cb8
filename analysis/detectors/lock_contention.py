"""lock_contention: time spent waiting for a shared resource (a lock, a queue, a pool slot).

Two kinds of evidence, reported as separate findings (explicit evidence wins: an operation with
explicit waits is not also reported as an inferred convoy).

Explicit waits (confidence 0.75 and up)
---------------------------------------
* **Events**: a span event that says the span started waiting (``waiting``, ``wait for``,
  ``blocked on``, ``queued``, ``lock wait``, ``contention`` ... — e.g. HotROD's "Waiting for lock
  behind 3 transactions") and an event that says it got the resource (``acquired``, ``granted``,
  ``obtained``, ``dequeued`` ...) — each naming a lock, mutex, semaphore, latch, permit, slot,
  connection, pool, queue or transaction. Wait = the first "got it" event minus the first "waiting"
  event (the span start when there is no "waiting" event). A "waiting" event without a "got it" event
  cannot be measured and is not used. "behind N" in the event name is kept as the queue depth.
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
  finding's operation is its parent (the code that waits) and the wait span is the target.

Each wait is clamped to the waiting span's duration and kept when it is at least ``MIN_WAIT_NS``
(1 ms: below that a lock is uncontended for any latency budget) and the span that waits is on the
critical path (a wait off the critical path costs the request nothing). The intervention is
``ShortenSpan(span, wait)``: the critical section no longer makes anyone wait.

Inferred convoys (confidence 0.45 to 0.8)
-----------------------------------------
Spans of one operation on one resource (service + span name + the first of db statement, messaging
destination, peer, route, rpc method) across all traces. A sweep over start/end events (sorted,
cumulative sum; ties broken so that the one that finished first was served first) gives each span
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
"""

from __future__ import annotations

from typing import Any

import polars as pl

from analysis.context import AnalysisContext
from analysis.detectors.fanout_straggler import stat
from analysis.model import Finding, Occurrence, ShortenSpan
from collector.schema import KIND_CONSUMER, KIND_PRODUCER

KIND = "lock_contention"
MIN_WAIT_NS = 1_000_000
MIN_SAMPLES = 20
MIN_PEAK_PEERS = 3
MIN_QUEUED_SHARE = 0.2
MIN_CORRELATION = 0.6
MIN_SLOPE_SHARE = 0.3
SERVICE_TIME_BAND = (0.5, 1.5)
MAX_BUNCHED_SHARE = 0.2
NESTED_CONVOY_SHARE = 0.5

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
    return (
        pl.col("db_statement")
        .str.replace_all(r"'(?:[^']|'')*'", "?")
        .str.replace_all(r"\b\d+(?:\.\d+)?\b", "?")
        .str.replace_all(r"\s+", " ")
    )


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
        with_events.select("trace_id", "span_id", "start_ns", "duration_ns", "event_names", "event_times_ns")
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
        events.group_by("trace_id", "span_id")
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
            "trace_id",
            "span_id",
            "queue_depth",
            wait_ns=(pl.col("acquired_ns") - pl.col("wait_from")).clip(0, pl.col("duration_ns")),
            source=pl.lit("events"),
        )
    )
    return per_span.collect()


def _attribute_waits(spans: pl.DataFrame) -> pl.DataFrame:
    return (
        spans.lazy()
        .filter(pl.col("hints").is_not_null())
        .select(
            "trace_id",
            "span_id",
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
        .group_by("trace_id", "span_id")
        .agg(pl.col("wait_ns").max(), queue_depth=pl.col("depth").max())
        .select(
            "trace_id",
            "span_id",
            "queue_depth",
            "wait_ns",
            source=pl.lit("attributes"),
        )
        .collect()
    )


def _explicit_waits(spans: pl.DataFrame) -> pl.DataFrame:
    """One row per waiting span: the span to shorten, its wait, and who waits on what."""
    cols = spans.lazy().select(_SPAN_COLUMNS)
    own = pl.concat([_event_waits(spans), _attribute_waits(spans)], how="vertical_relaxed")
    own = own.sort("wait_ns", descending=True).unique(subset=["trace_id", "span_id"], keep="first")
    is_wait_span = (
        pl.col("name").str.contains(_WAIT_SPAN_NAME)
        & ~pl.col("kind").is_in([KIND_PRODUCER, KIND_CONSUMER])
        & pl.col("messaging_destination").is_null()
        & pl.col("parent_span_id").is_not_null()
    )
    parents = cols.select(
        "trace_id",
        pl.col("span_id").alias("parent_span_id"),
        pl.col("service").alias("waiter_service"),
        pl.col("name").alias("waiter_name"),
        pl.col("duration_ns").alias("waiter_duration_ns"),
    )
    # A span that carries its own wait evidence waits itself -- unless it is a wait span (e.g.
    # "lock.acquire" with a lock.wait_ms attribute), whose parent is the code that waits.
    own_target = (
        pl.coalesce(pl.col("db_system"), pl.col("peer"), pl.col("service")),
        pl.coalesce(normalized_statement(), pl.col("messaging_destination"), pl.col("name")),
    )
    in_parent = is_wait_span & pl.col("waiter_name").is_not_null()
    carriers = (
        cols.join(own.lazy(), on=["trace_id", "span_id"], how="inner")
        .join(parents, on=["trace_id", "parent_span_id"], how="left")
        .with_columns(
            waiter_service=pl.when(in_parent).then(pl.col("waiter_service")).otherwise(pl.col("service")),
            waiter_name=pl.when(in_parent).then(pl.col("waiter_name")).otherwise(pl.col("name")),
            waiter_duration_ns=pl.when(in_parent)
            .then(pl.col("waiter_duration_ns"))
            .otherwise(pl.col("duration_ns")),
            target_service=pl.when(in_parent).then(pl.col("service")).otherwise(own_target[0]),
            target_operation=pl.when(in_parent).then(pl.col("name")).otherwise(own_target[1]),
            resource=_resource(),
        )
    )
    wait_spans = (
        cols.filter(is_wait_span)
        .join(parents, on=["trace_id", "parent_span_id"], how="inner")
        .with_columns(
            queue_depth=pl.lit(None, pl.Int64),
            wait_ns=pl.col("duration_ns"),
            source=pl.lit("wait_span"),
            target_service=pl.col("service"),
            target_operation=pl.col("name"),
            resource=pl.coalesce(pl.col("hints").str.extract(_RESOURCE_HINT, 1), pl.col("name")),
        )
        .join(own.lazy().select("trace_id", "span_id"), on=["trace_id", "span_id"], how="anti")
    )
    keep = [
        "trace_id",
        "span_id",
        "start_ns",
        "on_critical_path",
        "waiter_service",
        "waiter_name",
        "waiter_duration_ns",
        "target_service",
        "target_operation",
        "resource",
        "wait_ns",
        "queue_depth",
        "source",
    ]
    return pl.concat([carriers.select(keep), wait_spans.select(keep)], how="vertical_relaxed").collect()


def detect(ctx: AnalysisContext) -> list[Finding]:
    spans = ctx.spans
    explicit = _explicit_waits(spans)
    findings = _explicit_findings(explicit)
    explicit_ops = explicit.filter(pl.col("wait_ns") >= MIN_WAIT_NS).select(
        pl.col("target_service").alias("service"), pl.col("target_operation").alias("name")
    )
    findings.extend(_convoy_findings(spans, explicit, explicit_ops))
    return findings


def _explicit_findings(waits: pl.DataFrame) -> list[Finding]:
    waits = waits.filter((pl.col("wait_ns") >= MIN_WAIT_NS) & pl.col("on_critical_path")).with_columns(
        wait_share=pl.col("wait_ns") / pl.col("waiter_duration_ns").clip(1)
    )
    if waits.is_empty():
        return []
    sig = ["waiter_service", "waiter_name", "target_service", "target_operation", "resource"]
    findings = []
    for frame in waits.sort(["start_ns", "trace_id"]).partition_by(sig, maintain_order=True):
        first = frame.row(0, named=True)
        sources = sorted(set(frame["source"].to_list()))
        traces = frame["trace_id"].n_unique()
        confidence = 0.75 + (0.1 if traces >= 5 else 0.0) + (0.05 if traces >= 20 else 0.0)
        evidence: dict[str, Any] = {
            "evidence": "explicit",
            "sources": sources,
            "resource": first["resource"],
            "waits": frame.height,
            "wait_ms_p50": stat(frame["wait_ns"], scale=1e6),
            "wait_ms_p95": stat(frame["wait_ns"], 0.95, 1e6),
            "wait_ms_total": float(frame["wait_ns"].sum()) / 1e6,
            "wait_share_p50": round(stat(frame["wait_share"]), 3),
            "wait_share_p95": round(stat(frame["wait_share"], 0.95), 3),
        }
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


def _occurrences(frame: pl.DataFrame) -> list[Occurrence]:
    per_trace = frame.group_by("trace_id", maintain_order=True).agg(
        span_ids=pl.col("span_id"),
        waits=pl.col("wait_ns"),
        wait_ns=pl.col("wait_ns").sum(),
        wait_share=pl.col("wait_share").max(),
        peers=pl.col("peers").max() if "peers" in frame.columns else pl.col("queue_depth").max(),
    )
    occurrences = []
    for row in per_trace.iter_rows(named=True):
        numbers = {"wait_ms": row["wait_ns"] / 1e6, "wait_share": float(row["wait_share"])}
        if row["peers"] is not None:
            numbers["peers" if "peers" in frame.columns else "queue_depth"] = float(row["peers"])
        occurrences.append(
            Occurrence(
                trace_id=row["trace_id"],
                span_ids=tuple(row["span_ids"]),
                interventions=tuple(
                    ShortenSpan(span_id=sid, by_ns=int(w))
                    for sid, w in zip(row["span_ids"], row["waits"], strict=True)
                ),
                numbers=numbers,
            )
        )
    return occurrences


def _convoy_findings(
    spans: pl.DataFrame, explicit: pl.DataFrame, explicit_ops: pl.DataFrame
) -> list[Finding]:
    cand = (
        spans.lazy()
        .filter(pl.col("duration_ns") > 0)
        .select([*_SPAN_COLUMNS, "end_ns"])
        .with_columns(resource=_resource())
        .join(explicit_ops.lazy().unique(), on=["service", "name"], how="anti")
    )
    keys = ["service", "name", "resource"]
    groups = (
        cand.group_by(keys).agg(n=pl.len()).filter(pl.col("n") >= MIN_SAMPLES).with_row_index("gid").collect()
    )
    if groups.is_empty():
        return []
    cand_df = cand.join(groups.lazy().select([*keys, "gid"]), on=keys, how="inner").collect()

    # Sweep: +1 at each start, -1 at each end; ends before starts at one instant, and among starts at
    # one instant, the one that ended first (served first) counts first.
    cand_df = cand_df.with_row_index("row_id")
    sweep = (
        pl.concat(
            [
                cand_df.select(
                    "gid", "row_id", t=pl.col("start_ns"), delta=pl.lit(1, pl.Int32), tie=pl.col("end_ns")
                ),
                cand_df.select(
                    "gid", "row_id", t=pl.col("end_ns"), delta=pl.lit(-1, pl.Int32), tie=pl.col("end_ns")
                ),
            ]
        )
        .sort(["gid", "t", "delta", "tie"])
        .with_columns(peers=pl.col("delta").cum_sum())
        .filter(pl.col("delta") == 1)
        .select("row_id", "peers")
    )
    cand_df = cand_df.join(sweep, on="row_id", how="inner")

    base_expr = (
        pl.when((pl.col("peers") == 1).sum() >= 3)
        .then(pl.col("duration_ns").filter(pl.col("peers") == 1).median())
        .otherwise(pl.col("duration_ns").quantile(0.05))
    )
    stats = (
        cand_df.group_by("gid")
        .agg(
            n=pl.len(),
            peak=pl.col("peers").max(),
            queued_share=(pl.col("peers") >= 2).mean(),
            corr=pl.corr("duration_ns", "peers"),
            cov=pl.cov("duration_ns", "peers"),
            var=pl.col("peers").cast(pl.Float64).var(),
            base_ns=base_expr,
        )
        .with_columns(slope_ns=pl.col("cov") / pl.col("var"))
        .filter(
            (pl.col("peak") >= MIN_PEAK_PEERS)
            & (pl.col("queued_share") >= MIN_QUEUED_SHARE)
            & (pl.col("corr") >= MIN_CORRELATION)
            & (pl.col("slope_ns") >= MIN_SLOPE_SHARE * pl.col("base_ns"))
            & (pl.col("base_ns") > 0)
        )
    )
    if stats.is_empty():
        return []
    convoy = cand_df.join(stats.select("gid", "base_ns", "corr", "slope_ns"), on="gid", how="inner")

    # Completion spacing of spans that were queued behind the previous completion.
    spacing = (
        convoy.sort(["gid", "end_ns"])
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
        .filter(
            (pl.col("gaps") >= MIN_SAMPLES // 2)
            & (pl.col("gap_p50") >= SERVICE_TIME_BAND[0] * pl.col("base_ns"))
            & (pl.col("gap_p50") <= SERVICE_TIME_BAND[1] * pl.col("base_ns"))
            & (pl.col("bunched") <= MAX_BUNCHED_SHARE)
        )
        .select("gid", "gap_p50")
    )
    if spacing.is_empty():
        return []
    convoy = convoy.join(spacing, on="gid", how="inner")

    # Prefer the deepest convoy: drop groups whose spans mostly contain a convoy or explicit wait.
    flagged_children = pl.concat(
        [
            convoy.select("trace_id", "parent_span_id"),
            explicit.filter(pl.col("wait_ns") >= MIN_WAIT_NS)
            .select("trace_id", "span_id")
            .join(spans.select("trace_id", "span_id", "parent_span_id"), on=["trace_id", "span_id"])
            .select("trace_id", "parent_span_id"),
            # A waiting span of the explicit kind is a flagged "child" of itself.
            explicit.filter(pl.col("wait_ns") >= MIN_WAIT_NS).select(
                "trace_id", pl.col("span_id").alias("parent_span_id")
            ),
        ]
    ).unique()
    nested = (
        convoy.join(
            flagged_children.rename({"parent_span_id": "span_id"}).with_columns(
                has_flagged_child=pl.lit(True)
            ),
            on=["trace_id", "span_id"],
            how="left",
        )
        .group_by("gid")
        .agg(nested_share=pl.col("has_flagged_child").fill_null(False).mean())
    )
    convoy = convoy.join(
        nested.filter(pl.col("nested_share") < NESTED_CONVOY_SHARE).select("gid"), on="gid", how="semi"
    )
    if convoy.is_empty():
        return []

    convoy = convoy.with_columns(
        wait_ns=(pl.col("duration_ns") - pl.col("base_ns")).clip(0).cast(pl.Int64),
        wait_share=((pl.col("duration_ns") - pl.col("base_ns")).clip(0) / pl.col("duration_ns")),
    )
    findings = []
    for frame in convoy.sort(["start_ns", "trace_id"]).partition_by("gid", maintain_order=True):
        first = frame.row(0, named=True)
        group_stats = stats.filter(pl.col("gid") == first["gid"]).row(0, named=True)
        waiting = frame.filter(
            (pl.col("peers") >= 2) & (pl.col("wait_ns") >= MIN_WAIT_NS) & pl.col("on_critical_path")
        )
        if waiting.is_empty():
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
