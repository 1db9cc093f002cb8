"""missing_timeout: calls left running far past their usual time, with no deadline to cut them.

Rule
----
A finding names the operation that makes the call (the call span's parent: where the deadline is
set) as ``operation`` and the callee as ``targets``.

A *call* is a blocking, non-root span that crosses a boundary: a CLIENT span, a span carrying
``db_system`` / ``rpc_method`` (an outgoing call instrumented as INTERNAL), or a SERVER span whose
parent is not a CLIENT span (the caller's side was not instrumented). SERVER spans under a CLIENT
span are represented by that client call. An *operation* is (service, name, target, endpoint) with
target the peer / database / destination of the call, and endpoint the route template (``http.route``,
else the URL path with ids masked) when the span name is a generic HTTP one (``GET``, ``HTTP GET``):
one client calling two endpoints of a host has two usual latencies (HotROD's frontend names its
300 ms+ ``/customer`` calls and its 50 ms ``/route`` calls both ``HTTP GET`` to ``0.0.0.0``; mixed,
every ``/customer`` call looked like a hang).

For every operation with at least ``MIN_CALLS`` calls, with p50 its median duration, a call is an
*outlier* when it lasts at least ``OUTLIER_FACTOR`` (10) × p50 and at least ``MIN_EXCESS_NS``
(200 ms) more than p50, and it sits on the critical path (it held the request up). An outlier whose
excess is mostly (≥ ``EXPLAINED_SHARE``) explained by a slow call beneath it is not counted: the
deadline belongs on the lowest call that hung, not on every caller above it.

An outlier *timed out* when it carries timeout evidence: HTTP 408/504, or a status message, event
or hint mentioning timeout / deadline / cancel. An operation is reported when at least
``MIN_OUTLIERS`` outliers did not time out, and

* most of its outliers are not timed out (otherwise a deadline exists and works), and
* its outliers do not cluster at one ceiling: when at least 3 outliers and at least half of them end
  within ``CEILING_BAND`` (3 %) of the longest one, something cuts them at a consistent bound — a
  timeout exists (perhaps a loose one), so the operation is not reported.

A finding (one calling operation → callee) also needs slow calls in at least ``MIN_OUTLIERS``
distinct requests.

Why: a call without a deadline holds its caller (and the user) for as long as the dependency takes
to fail; a deadline derived from the operation's healthy latency, with a fallback or a fast error,
bounds the damage and frees the caller's threads and connections.

What-if: each outlier gets ``ShortenSpan(span, duration − timeout)`` where the suggested timeout is
``TIMEOUT_MARGIN`` (2) × the p99 of the operation's non-outlier calls (at least ``MIN_TIMEOUT_NS``,
10 ms): the latency the request would
have had with that deadline and an instant fallback. The what-if engine measures it at the root.

Confidence: 0.4 + 0.3 × min(1, log10(slow calls + 1) / 1.5), + 0.15 when the longest call is 30× the
median or more, + 0.1 with 100+ calls; × 0.7 when some calls of the operation did time out (a
deadline may exist on another path); capped at 0.95.

Operations that stay open by design (names matching ``LONG_BY_DESIGN``: streams, long polls,
watches, subscriptions, waits) are not judged.

False-positive protections: an operation that is always slow has a high p50 and no outliers; a
single slow call, or slow calls in a single request, are below ``MIN_OUTLIERS``; calls cut at a consistent ceiling or ending in timeout
errors already have a deadline; off-critical-path and non-blocking (async) calls hold nothing up;
callers whose slowness is explained by a hanging call beneath them are not double-reported.

Near misses (``--explain``): operations with slow calls set aside by the rules above (too few
without a timeout, most timed out, cut at one ceiling) and callers whose slow calls fall in a single
request, each with the rule and the measured counts.

No saving floor: fault-tolerance findings are ranked by what the traces show they cost plus a risk
term (:mod:`hourglass.analysis.ranking`); the pipeline only asks for a confidence of 0.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import (
    NearMissSink,
    Rows,
    call_target_expr,
    occurrence_values,
    route_template,
    url_host_expr,
)
from hourglass.analysis.model import Finding, Occurrence, ShortenSpan
from hourglass.collector.schema import KIND_CLIENT, KIND_INTERNAL, KIND_SERVER

KIND = "missing_timeout"
MIN_CALLS = 20  # enough samples for a meaningful median
OUTLIER_FACTOR = 10.0  # an outlier lasts at least 10 × the operation's median
MIN_EXCESS_NS = 200_000_000  # and at least 200 ms longer than the median (GC pauses and jitter stay below)
MIN_OUTLIERS = 2  # slow calls (per operation) and held requests (per finding); one is an anecdote
EXPLAINED_SHARE = 0.5  # a caller's excess explained at least this much by a hanging call beneath it
CEILING_BAND = 0.03  # outliers within 3 % of the longest one are "at the ceiling"
CEILING_MIN_CALLS = 3
TIMEOUT_MARGIN = 2.0  # suggested deadline = 2 × p99 of the healthy calls
MIN_TIMEOUT_NS = 10_000_000  # but never below 10 ms: sub-millisecond deadlines are not practical
TIMEOUT_TEXT = r"(?i)time[ -]?out|timed out|deadline|cancel"
# Calls that stay open by design (streams, long polls, watches, subscriptions): long is not hung.
LONG_BY_DESIGN = r"(?i)\bstream|streaming|\bsubscribe\b|long.?poll|\bpoll\b|\bwatch\b|websocket|\bsse\b|\blisten\b|\bwait\b"
# HTTP client span names that say nothing about the endpoint ("GET", "HTTP GET", "http.request"),
# the same names fanout_straggler tells apart by endpoint.
GENERIC_HTTP_NAME = (
    r"(?i)^(?:https?[ ._-]?)?(?:(?:GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS)|request|client[ ._-]?request)?$"
)


def _call_expr() -> pl.Expr:
    outgoing = (pl.col("kind") == KIND_CLIENT) | pl.col("db_system").is_not_null()
    outgoing |= pl.col("rpc_method").is_not_null() & (pl.col("kind") == KIND_INTERNAL)
    uninstrumented_caller = (pl.col("kind") == KIND_SERVER) & (pl.col("parent_kind") != KIND_CLIENT)
    return pl.col("blocking") & ~pl.col("is_root") & (outgoing | uninstrumented_caller)


def _timed_out_expr() -> pl.Expr:
    return (
        pl.col("http_status_code").is_in([408, 504]).fill_null(False)
        | pl.col("status_message").str.contains(TIMEOUT_TEXT).fill_null(False)
        | pl.col("event_hints").str.contains(TIMEOUT_TEXT).fill_null(False)
        | pl.col("hints").str.contains(TIMEOUT_TEXT).fill_null(False)
        | pl.col("event_names").list.eval(pl.element().str.contains(TIMEOUT_TEXT)).list.any().fill_null(False)
    )


OP = ["service", "name", "target", "endpoint"]

# ``calls`` grows with the calls themselves (a row per call): a partitioned run or serve spills it
# in buckets of whole operations (``hourglass.analysis.spill``), and the decision reads only the
# calls of the operations with slow calls — the only ones whose usual latency matters.
SPILL_KEYS = {"calls": "op_key"}
# one bucket's rows: these columns (None: all), of these keys (None: all)
BucketLoader = Callable[[list[str] | None, pl.Series | None], pl.DataFrame]
# The stored rows' shape (``hourglass.analysis.detectors.ROWS_FORMAT``): 2, ``calls`` spilled.
ROWS_FORMAT = 2


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half. ``calls``: every call as (operation key, duration) — the usual latency of
    an operation is a cross-trace statistic; ``operations``: the key's names; ``slow``: the calls
    that could be outliers whatever the usual latency turns out to be (on the critical path and at
    least ``MIN_EXCESS_NS`` long, since an outlier lasts p50 + 200 ms or more), with their timeout
    evidence, attribution and their slow call ancestors (nearest first) for the explained-caller
    rule."""
    spans = ctx.spans
    parent_kind = spans["kind"].gather(spans["parent_row"].fill_null(0)).alias("parent_kind")
    # lazily, so the filter takes the columns selected, not every span column
    calls = (
        spans.lazy()
        .with_columns(parent_kind)
        .filter(_call_expr())
        .select(
            "row",
            "parent_row",
            "duration_ns",
            "on_critical_path",
            "service",
            "name",
            "http_url",
            "http_route",
            target=call_target_expr(),
        )
        .collect()
    )
    calls = _with_endpoint(calls, _common.span_names(ctx)).with_columns(op_key=pl.struct(OP).hash())
    operations = calls.select("op_key", *OP).unique(subset="op_key", keep="first")
    slow = calls.filter(pl.col("on_critical_path") & (pl.col("duration_ns") >= MIN_EXCESS_NS))
    out: Rows = {"calls": calls.select("op_key", "duration_ns"), "operations": operations}
    if slow.height == 0:
        return out
    slow = slow.with_columns(
        ancestors=_slow_ancestors(
            slow["row"].cast(pl.Int64).to_numpy(), spans["parent_row"].fill_null(-1).to_numpy()
        )
    )
    detail = (
        spans.lazy()
        .filter(pl.col("row").is_in(slow["row"].implode()))
        .select("row", "trace_id", "span_id", timed_out=_timed_out_expr())
        .collect()
    )
    slow = _attribute(slow.join(detail, on="row", how="left"), spans)
    # Ancestors as span ids: rows are positions in this part only.
    ids = slow.select(pl.col("row").cast(pl.Int64), "span_id")
    ancestors = (
        slow.select("span_id", "ancestors")
        .explode("ancestors")
        .join(ids.rename({"row": "ancestors", "span_id": "ancestor_id"}), on="ancestors", how="left")
        .group_by("span_id", maintain_order=True)
        .agg(ancestor_ids=pl.col("ancestor_id").drop_nulls())
    )
    out["slow"] = slow.drop("ancestors", "parent_row").join(ancestors, on="span_id", how="left")
    return out


def decide(rows: Rows, notes: NearMissSink, buckets: Iterable[BucketLoader] | None = None) -> list[Finding]:
    """Cross-trace half: usual latency per operation, outliers, deadlines evidence, attribution.
    With ``buckets`` the calls come from there (``SPILL_KEYS``: every call of an operation in one
    bucket), only those of the operations with slow calls read: only they can have outliers, so
    the calls held are those operations', not every call's."""
    slow = rows.get("slow")
    if slow is None or slow.is_empty():
        return []
    op = OP
    labels = rows["operations"].unique(subset="op_key", keep="first")
    calls = rows["calls"]
    if buckets is not None:
        judged = labels.join(slow.select("op_key").unique(), on="op_key", how="semi").filter(
            ~pl.col("name").str.contains(LONG_BY_DESIGN)
        )["op_key"]
        loaded = [load(["op_key", "duration_ns"], judged) for load in buckets] if judged.len() else []
        calls = pl.concat([calls.select("op_key", "duration_ns"), *loaded], how="vertical_relaxed")
    stats = (
        calls.group_by("op_key")
        .agg(calls=pl.len(), p50_ns=pl.col("duration_ns").median())
        .join(labels, on="op_key")
        .filter((pl.col("calls") >= MIN_CALLS) & (pl.col("p50_ns") > 0))  # no usual latency: no judgement
        .filter(~pl.col("name").str.contains(LONG_BY_DESIGN))
    )
    threshold = pl.max_horizontal(pl.col("p50_ns") * OUTLIER_FACTOR, pl.col("p50_ns") + MIN_EXCESS_NS)
    outliers = (
        slow.join(stats.select("op_key", "calls", "p50_ns"), on="op_key", how="inner")
        .filter(pl.col("duration_ns") >= threshold)
        .with_columns(excess_ns=pl.col("duration_ns") - pl.col("p50_ns"))
    )
    if outliers.height == 0:
        return []
    outliers = _drop_explained_callers(outliers)

    per_op = (
        outliers.group_by(op)
        .agg(
            outlier_calls=pl.len(),
            timed_out_calls=pl.col("timed_out").sum(),
            longest_ns=pl.col("duration_ns").max(),
            at_ceiling=(pl.col("duration_ns") >= pl.col("duration_ns").max() * (1 - CEILING_BAND)).sum(),
        )
        .with_columns(missing=pl.col("outlier_calls") - pl.col("timed_out_calls"))
    )
    few = pl.col("missing") < MIN_OUTLIERS
    has_deadline = pl.col("timed_out_calls") * 2 >= pl.col("outlier_calls")
    at_ceiling = (pl.col("at_ceiling") >= CEILING_MIN_CALLS) & (
        pl.col("at_ceiling") * 2 >= pl.col("outlier_calls")
    )
    _note_dropped_operations(notes, outliers, per_op.filter(few | has_deadline | at_ceiling), op)
    per_op = per_op.filter(~(few | has_deadline | at_ceiling))
    if per_op.height == 0:
        return []

    # Healthy latency of the reported operations: every call that is not an outlier.
    reported_ops = stats.join(per_op.select(op), on=op, how="semi")
    healthy = (
        calls.join(reported_ops.select("op_key", *op, "p50_ns"), on="op_key")
        .group_by(op)
        .agg(
            p99_ns=pl.col("duration_ns").quantile(0.99, "linear"),
            p99_healthy_ns=pl.col("duration_ns")
            .filter(pl.col("duration_ns") < threshold)
            .quantile(0.99, "linear"),
        )
    )
    per_op = (
        per_op.join(stats.drop("op_key"), on=op)
        .join(healthy, on=op)
        .with_columns(
            timeout_ns=pl.max_horizontal(pl.col("p99_healthy_ns") * TIMEOUT_MARGIN, pl.lit(MIN_TIMEOUT_NS))
            .round()
            .cast(pl.Int64)
        )
    )
    reported = (
        outliers.filter(~pl.col("timed_out"))
        .join(per_op.select(*op, "timeout_ns"), on=op)
        .with_columns(held_ns=(pl.col("duration_ns") - pl.col("timeout_ns")).clip(lower_bound=0))
        .sort("trace_id", "row")
    )

    signature = ["caller_service", "caller_operation", "target_service", "target_operation"]
    findings: list[Finding] = []
    per_op_rows = {tuple(r[c] for c in op): r for r in per_op.iter_rows(named=True)}
    for key, group in reported.partition_by(signature, as_dict=True, maintain_order=True).items():
        caller_service, caller_operation, target_service, target_operation = (str(v) for v in key)
        if group["trace_id"].n_unique() < MIN_OUTLIERS:
            # this caller's share of the slow calls is one request: an anecdote
            notes.note_near_miss(
                KIND,
                caller_service,
                caller_operation,
                f"{group.height} slow call(s) to {target_service} {target_operation} without a timeout "
                f"(longest {group['duration_ns'].max() / 1e6:,.0f} ms) in 1 request < {MIN_OUTLIERS}: an anecdote",  # type: ignore[operator]
                trace_ids=group["trace_id"].unique(maintain_order=True).to_list(),
                span_ids=group["span_id"].head(5).to_list(),
            )
            continue
        op_rows = [per_op_rows[k] for k in group.select(op).unique(maintain_order=True).iter_rows()]
        findings.append(
            _finding(caller_service, caller_operation, target_service, target_operation, group, op_rows)
        )
    findings.sort(key=lambda f: (-(f.requests_at_risk or 0), f.signature))
    return findings


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)


def _note_dropped_operations(
    notes: NearMissSink, outliers: pl.DataFrame, dropped: pl.DataFrame, op: list[str]
) -> None:
    """Near misses, one per call operation with slow calls that the rules set aside: too few
    without a timeout, most of them timed out (a deadline exists), or cut at one ceiling."""
    if dropped.height == 0:
        return
    exemplars = (
        outliers.join(dropped.select(op), on=op, how="semi")
        .sort("trace_id", "span_id")
        .group_by(op, maintain_order=True)
        .agg(
            trace_ids=pl.col("trace_id").unique(maintain_order=True).head(5),
            span_ids=pl.col("span_id").head(5),
            traces=pl.col("trace_id").n_unique(),
        )
    )
    rows = dropped.join(exemplars, on=op, how="left").sort(op)
    for r in rows.iter_rows(named=True):  # one per operation
        outliers_n, timed_out = int(r["outlier_calls"]), int(r["timed_out_calls"])
        longest_ms = r["longest_ns"] / 1e6
        if timed_out * 2 >= outliers_n:
            reason = f"{timed_out} of {outliers_n} slow calls timed out: a deadline exists"
        elif r["at_ceiling"] >= CEILING_MIN_CALLS and r["at_ceiling"] * 2 >= outliers_n:
            reason = (
                f"{r['at_ceiling']} of {outliers_n} slow calls end within {CEILING_BAND:.0%} of the longest "
                f"({longest_ms:,.0f} ms): cut at a consistent bound, a timeout exists"
            )
        else:
            reason = (
                f"{r['missing']} slow call without a timeout < {MIN_OUTLIERS} (longest {longest_ms:,.0f} ms)"
            )
        where = f" to {r['target']}" if r["target"] else ""
        notes.note_near_miss(
            KIND,
            str(r["service"]),
            str(r["name"]),
            f"calls{where}{' ' + r['endpoint'] if r['endpoint'] else ''}: {reason}",
            trace_ids=r["trace_ids"] or (),
            span_ids=r["span_ids"] or (),
            traces=int(r["traces"] or 0),
        )


def _with_endpoint(calls: pl.DataFrame, names: pl.Series | None = None) -> pl.DataFrame:
    """Adds ``endpoint`` (and drops the URL columns): the route template of calls whose span name is
    a generic HTTP one, "" for the others. Each distinct URL is templated once. ``names``: the
    distinct names of the spans (``_common.span_names``: a superset of the calls'), else the calls'."""
    names = calls["name"].unique() if names is None else names
    generic = names.filter(names.str.contains(GENERIC_HTTP_NAME))
    if generic.is_empty():  # no call to template: every endpoint is ""
        return calls.with_columns(endpoint=pl.lit("")).drop("http_url", "http_route")
    is_generic = pl.col("name").is_in(generic.implode())
    urls = calls.filter(is_generic).select(pl.col("http_url").unique().drop_nulls())
    urls = urls.with_columns(route_template(pl.col("http_url")).alias("_url_route"))
    endpoint = pl.coalesce(pl.col("http_route"), pl.col("_url_route"), pl.lit(""))
    return (
        calls.join(urls, on="http_url", how="left", maintain_order="left")
        .with_columns(endpoint=pl.when(is_generic).then(endpoint).otherwise(pl.lit("")))
        .drop("http_url", "http_route", "_url_route")
    )


def _slow_ancestors(rows: np.ndarray, parent_row: np.ndarray) -> pl.Series:
    """For each of the slow calls at ``rows``, the rows of its slow call ancestors, nearest first
    (vectorised over the calls, one step per tree level, no recursion)."""
    is_slow = np.zeros(len(parent_row), dtype=bool)
    is_slow[rows] = True
    owners: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    cursor = parent_row[rows].astype(np.int64)
    active = cursor >= 0
    while active.any():
        hit = np.flatnonzero(active & is_slow[np.where(active, cursor, 0)])
        owners.append(hit)
        hits.append(cursor[hit])
        cursor = np.where(active, parent_row[np.where(active, cursor, 0)], -1)
        active &= cursor >= 0
    found = pl.DataFrame(
        {
            "i": np.concatenate([np.arange(len(rows)), *owners]),
            "a": np.concatenate([np.full(len(rows), -1), *hits]),
        },
        schema={"i": pl.Int64, "a": pl.Int64},
    )  # levels in order: nearest ancestor first; -1 keeps calls with no slow ancestor
    lists = found.group_by("i", maintain_order=True).agg(pl.col("a").filter(pl.col("a") >= 0)).sort("i")
    return lists["a"].alias("ancestors")


def _drop_explained_callers(outliers: pl.DataFrame) -> pl.DataFrame:
    """Remove outliers whose excess is mostly explained by an outlier call beneath them: each
    outlier's nearest outlier ancestor (the first of its slow ancestors that is an outlier) is
    dropped when one such descendant's excess is at least ``EXPLAINED_SHARE`` of its own."""
    keys = outliers.select("trace_id", "span_id", "excess_ns")
    nearest = (
        outliers.select("trace_id", "span_id", "excess_ns", "ancestor_ids")
        .with_row_index("_i")
        .explode("ancestor_ids")
        .with_row_index("_pos")
        .join(
            keys.select("trace_id", ancestor_ids="span_id", _is_outlier=pl.lit(True)),
            on=["trace_id", "ancestor_ids"],
            how="inner",
        )
        .sort("_pos")
        .unique(subset="_i", keep="first")
        .group_by("trace_id", "ancestor_ids")
        .agg(largest_below=pl.col("excess_ns").max())
    )
    explained = (
        keys.join(
            nearest, left_on=["trace_id", "span_id"], right_on=["trace_id", "ancestor_ids"], how="inner"
        )
        .filter(
            (pl.col("largest_below") >= EXPLAINED_SHARE * pl.col("excess_ns")) & (pl.col("largest_below") > 0)
        )
        .select("trace_id", "span_id")
    )
    return outliers.join(explained, on=["trace_id", "span_id"], how="anti", maintain_order="left")


def _attribute(reported: pl.DataFrame, spans: pl.DataFrame) -> pl.DataFrame:
    """Who sets the deadline, on what: the operation that makes the call (the call span's parent, in
    the call's service) and the callee (the traced SERVER child, else the call's target); a SERVER
    span with an uninstrumented caller is attributed to its parent (the caller) and targets itself."""
    rows = reported["row"].cast(pl.Int64).implode()
    # lazily, so each filter takes the columns selected, not every span column
    callees = (
        spans.lazy()
        .filter(pl.col("parent_row").is_in(rows) & (pl.col("kind") == KIND_SERVER))
        .select(pl.col("parent_row").alias("row"), callee_service="service", callee_name="name")
        .unique("row")
        .collect()
    )
    own = (
        spans.lazy()
        .filter(pl.col("row").is_in(reported["row"].implode()))
        .select(pl.col("row").cast(pl.Int64), "kind", url_host=url_host_expr())
        .collect()
    )
    parents = (
        spans.lazy()
        .filter(pl.col("row").is_in(reported["parent_row"].implode()))
        .select(
            pl.col("row").cast(pl.Int64).alias("parent_row"),
            parent_service="service",
            parent_name="name",
            parent_span_id="span_id",
        )
        .collect()
    )
    server_side = pl.col("kind") == KIND_SERVER
    return (
        reported.with_columns(pl.col("row").cast(pl.Int64))
        .join(own, on="row", how="left")
        .join(callees, on="row", how="left")
        .join(parents, on="parent_row", how="left")
        .with_columns(
            caller_service=pl.when(server_side).then(pl.col("parent_service")).otherwise(pl.col("service")),
            caller_operation=pl.col("parent_name"),
            target_service=pl.when(server_side)
            .then(pl.col("service"))
            .when(pl.col("callee_service").is_not_null())
            .then(pl.col("callee_service"))
            .when(pl.col("target") != "")
            .then(pl.col("target"))
            .otherwise(pl.coalesce(pl.col("url_host"), pl.col("service"))),
            target_operation=pl.when(server_side)
            .then(pl.col("name"))
            .otherwise(pl.coalesce(pl.col("callee_name"), pl.col("name"))),
        )
        .sort("trace_id", "row")
    )


def _finding(
    caller_service: str,
    caller_operation: str,
    target_service: str,
    target_operation: str,
    group: pl.DataFrame,
    op_rows: list[dict[str, Any]],
) -> Finding:
    # one occurrence per trace, its slow calls in the group's order; its key hashes the trace id,
    # the caller's span id, the calls' span ids and what each was held past the timeout
    per_trace = group.group_by("trace_id", maintain_order=True).agg(
        parent_span_id=pl.col("parent_span_id").first(),
        span_ids=pl.col("span_id"),
        held_ns=pl.col("held_ns"),
        duration_ns=pl.col("duration_ns"),
        excess_ns=pl.col("excess_ns"),
        timeout_ns=pl.col("timeout_ns").first(),
    )
    keyed = ["trace_id", "parent_span_id", "span_ids", "held_ns"]
    occurrences = [
        Occurrence(
            trace_id=trace_id,
            span_ids=tuple(dict.fromkeys([parent_span_id, *span_ids])),
            interventions=tuple(
                ShortenSpan(span_id=span_id, by_ns=int(held))
                for span_id, held in zip(span_ids, held_ns, strict=True)
                if held > 0
            ),
            numbers={
                "longest_ms": max(duration_ns) / 1e6,
                "excess_over_p50_ms": sum(excess_ns) / 1e6,
                "held_past_timeout_ms": sum(held_ns) / 1e6,
                "timeout_ms": timeout_ns / 1e6,
                "slow_calls": float(len(span_ids)),
            },
            key=key,
        )
        for trace_id, parent_span_id, span_ids, held_ns, duration_ns, excess_ns, timeout_ns, key in occurrence_values(
            per_trace, [*keyed, "duration_ns", "excess_ns", "timeout_ns"], keyed
        )
    ]
    main = max(op_rows, key=lambda r: r["calls"])
    calls = sum(int(r["calls"]) for r in op_rows)
    slow = group.height
    timed_out = sum(int(r["timed_out_calls"]) for r in op_rows)
    held = group.select(
        total=pl.col("held_ns").sum() / 1e6,
        p50=pl.col("held_ns").median() / 1e6,
        longest=pl.col("duration_ns").max(),
    ).row(0, named=True)
    ratio = held["longest"] / main["p50_ns"] if main["p50_ns"] else float("inf")
    evidence: dict[str, Any] = {
        "calls": calls,
        "p50_ms": round(main["p50_ns"] / 1e6, 3),
        "p99_ms": round(main["p99_ns"] / 1e6, 3),
        "p99_healthy_ms": round(main["p99_healthy_ns"] / 1e6, 3),
        "longest_ms": round(held["longest"] / 1e6, 3),
        "longest_over_p50": round(ratio, 1),
        "outlier_threshold_ms": round(
            max(main["p50_ns"] * OUTLIER_FACTOR, main["p50_ns"] + MIN_EXCESS_NS) / 1e6, 3
        ),
        "slow_calls_without_timeout": slow,
        "slow_call_share": round(slow / calls, 4),
        "timed_out_calls": timed_out,
        "suggested_timeout_ms": round(main["timeout_ns"] / 1e6, 3),
        "requests_held": len(occurrences),
        "held_past_timeout_ms_total": round(held["total"], 3),
        "held_past_timeout_ms_p50": round(held["p50"], 3),
        "trace_ids": [o.trace_id for o in occurrences[:10]],
        "span_ids": [sid for o in occurrences[:10] for sid in o.span_ids[1:2]],
    }
    confidence = 0.4 + 0.3 * min(1.0, math.log10(slow + 1) / 1.5)
    confidence += 0.15 if ratio >= 30 else 0.0
    confidence += 0.1 if calls >= 100 else 0.0
    if timed_out:
        confidence *= 0.7  # some calls of this operation do time out: a deadline may exist elsewhere
    return Finding(
        kind=KIND,
        category="fault_tolerance",
        service=caller_service,
        operation=caller_operation,
        targets=[{"service": target_service, "operation": target_operation}],
        occurrences=occurrences,
        confidence=round(min(0.95, confidence), 3),
        evidence=evidence,
        requests_at_risk=len(occurrences),
    )
