"""batchable_calls: the same operation called N times *at once*, one call per item — a batch endpoint
or a bulk query would do it in one.

Rule
----
Among the blocking *calls* of one parent (see :func:`hourglass.analysis.detectors._common.is_call`) that share
one normalised operation (same service and statement with literals removed, same HTTP method and
route template, same RPC method, or — for calls known only by name — the same answering server
span), take them in start order. A call is *concurrent* with the previous one when they overlap by
``_common.MAX_SEQUENTIAL_OVERLAP_SHARE`` (50 %) or more of the shorter call. A group is a candidate
when

* it has at least ``MIN_CALLS`` (5) calls — the same bar as ``n_plus_one``: fewer is a handful of
  distinct lookups rather than one request per item;
* at least ``MIN_CONCURRENT_SHARE`` (50 %) of its calls are concurrent with their predecessor (the
  code issues them together; when they run one after another it is ``n_plus_one``'s finding);
* the calls are issued *together*: at the median at least ``MIN_TOGETHER_SHARE`` (80 %) of them
  start before the first of them ends. Calls started in waves as others finish are a capped pool
  (HotROD's route calls through 3 workers) — ``fanout_concurrency_limit``'s finding, whose fix
  comes first; they are noted as a near miss here;
* it is not a retry burst (most calls failed with identical parameters);
* it is not a hedge or a duplicate: calls that all carry the **same** known parameters are not one
  call per item (left out, noted as a near miss);
* it is not a scatter-gather: calls that name a shard, partition, bucket or replica (in the name,
  route, URL or peer), or that go to different peers, address one branch each — a batch endpoint
  cannot span servers, and the fan-out detectors judge them (left out, noted as a near miss);
* at least one call is on the critical path of a parent on the critical path.

What it saves, and how it is priced
-----------------------------------
N calls issued together already overlap, so the latency gain is not the first thing a batch brings:
it is N − 1 fewer round trips, connections and server-side request overheads, and a tail that is
no longer the slowest of N draws. The intervention says exactly that: the N calls collapse
(``CollapseSpans``) into one batched call that takes the **median** single call's time plus
``PER_ITEM_COST_FRACTION`` (5 %) of the other calls' time (one round trip, a little extra work per
extra item — the same model as ``n_plus_one``). The what-if engine re-times the trace with it, so
the latency saving is what removing the slowest-of-N tail is worth (zero or less when the calls are
uniform: then the pipeline's latency floor drops the finding, and the evidence still records what
the server would save). Evidence for ranking and readers: ``calls_p50``, ``round_trips_saved_p50``
(N − 1), ``server_ms_p50`` (the calls' summed time), ``server_ms_saved_p50`` (summed − batched),
``latency_ms_p50`` (first start to last end) and ``batched_ms_p50``.

A finding also needs the concurrent groups in at least ``MIN_GROUP_SHARE`` (20 %) of the caller's
instances that make the call ``MIN_CALLS`` times (once there are 5 of them), and a server-side
saving of at least ``MIN_SERVER_SAVING_NS`` (5 ms) per request at the median — below that, a new
endpoint costs more than it saves.

Aggregation: by (caller service, caller operation, called service, normalised operation).
Confidence: 0.5 (the fix needs a batch endpoint or bulk query that may not exist yet), +0.1 when
parameters differ (one call per id), +0.1 with 5 or more traces, +0.1 when the median group has
10 or more calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import NearMissSink, Rows, call_children
from hourglass.analysis.model import Finding
from hourglass.collector.schema import STATUS_ERROR

KIND = "batchable_calls"
MIN_CALLS = 5
MIN_CONCURRENT_SHARE = 0.5
MIN_TOGETHER_SHARE = 0.8
MIN_GROUP_SHARE = 0.2
MIN_INSTANCES_FOR_SHARE = 5
MIN_SERVER_SAVING_NS = 5_000_000
PER_ITEM_COST_FRACTION = 0.05
MAX_EXEMPLARS = 5
# A call that names a shard, partition, bucket or replica addresses one branch of a scatter-gather.
PER_BRANCH = r"(?i)shard|partition|bucket|replica"
# The stored rows' shape (``hourglass.analysis.detectors.ROWS_FORMAT``): 2, ``groups`` holds the
# candidate groups only (their calls' span ids in ``spans``), ``instances`` the caller instances
# counted.
ROWS_FORMAT = 2
INSTANCE = ["caller_service", "caller_name", "op_key"]  # a caller instance that makes one call
# A candidate group's calls' span ids (``spans``) grow with the calls: a partitioned run or serve
# spills them in buckets of whole operations (``hourglass.analysis.spill``); the decision reads them
# for the groups that findings and near misses name. ``SPAN_KEY`` finds a group's: its trace, its
# caller span and its place among its partition's candidate groups (a trace is in one partition).
SPILL_KEYS = {"spans": "op_key"}
SPAN_KEY = ["trace_id", "caller_span_id", "slot"]
# one bucket's rows: these columns (None: all), of these keys (None: all)
BucketLoader = Callable[[list[str] | None, pl.Series | None], pl.DataFrame]


def _groups(calls: pl.DataFrame) -> pl.DataFrame:
    """One row per (parent, operation) with at least ``MIN_CALLS`` calls: their concurrency share,
    parameters, durations and what one batched call would take. ``calls``:
    :func:`hourglass.analysis.detectors._common.repeated_calls`."""
    key = ["parent_row", "op_key"]
    if calls.height == 0:
        return pl.DataFrame()
    same = (pl.col("parent_row") == pl.col("parent_row").shift(1)) & (
        pl.col("op_key") == pl.col("op_key").shift(1)
    )
    share = _common.overlap_share(
        pl.col("start_ns"), pl.col("_cum_end").shift(1), pl.col("duration_ns"), pl.col("duration_ns").shift(1)
    )
    ordered = calls.with_columns(
        (same & (share >= _common.MAX_SEQUENTIAL_OVERLAP_SHARE)).fill_null(False).alias("_conc")
    )
    return (
        ordered.group_by(key, maintain_order=True)
        .agg(
            *_common.caller_group_columns(),
            (pl.col("_conc").sum() / (pl.len() - 1)).alias("concurrent_share"),
            (pl.col("start_ns") < pl.col("end_ns").min()).mean().alias("together_share"),
            pl.col("params").drop_nulls().n_unique().alias("distinct_params"),
            pl.col("params").is_not_null().all().alias("params_known"),
            (pl.col("status_code") == STATUS_ERROR).mean().alias("error_share"),
            pl.col("duration_ns").sum().alias("server_ns"),
            pl.col("duration_ns").median().alias("median_ns"),
            (pl.col("end_ns").max() - pl.col("start_ns").min()).alias("latency_ns"),
            # one call per shard / partition / server rather than per item: a scatter-gather
            (
                pl.concat_str(
                    [pl.col("name"), pl.col("op_detail"), pl.col("http_url"), pl.col("peer")],
                    separator=" ",
                    ignore_nulls=True,
                )
                .str.contains(PER_BRANCH)
                .any()
                | (pl.col("peer").n_unique() > 1)
            ).alias("per_branch"),
        )
        .with_columns(
            (pl.col("median_ns") + (pl.col("server_ns") - pl.col("median_ns")) * PER_ITEM_COST_FRACTION)
            .cast(pl.Int64)
            .alias("batched_ns")
        )
        .with_columns((pl.col("server_ns") - pl.col("batched_ns")).alias("server_saving_ns"))
    )


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``instances``, per caller operation and called operation the caller
    instances that make the call at least ``MIN_CALLS`` times, concurrently or not (a count: the
    decision sums them); ``groups``, one row per such (parent, operation) group that is a
    candidate — concurrent, on the critical path, not a retry burst — the rule decides on alone.
    The other groups count only as instances, so they are not kept (at 12M stored spans on the
    soak, a third of the groups)."""
    if ctx.spans.height == 0:
        return {}
    calls = call_children(ctx)
    if calls.height < MIN_CALLS:
        return {}
    groups = _groups(_common.repeated_calls(ctx, MIN_CALLS))
    if groups.height == 0:
        return {}
    instances = groups.group_by(INSTANCE, maintain_order=True).agg(pl.len().alias("instances"))
    candidates = groups.filter(
        (pl.col("concurrent_share") >= MIN_CONCURRENT_SHARE)
        & pl.col("parent_on_critical_path")
        & pl.col("any_on_path")
        & ~((pl.col("error_share") > 0.5) & (pl.col("distinct_params") <= 1))
    ).drop("parent_row", "parent_on_critical_path", "any_on_path", "error_share")
    candidates = candidates.with_columns(slot=pl.int_range(pl.len(), dtype=pl.UInt32))
    spans = candidates.select("op_key", *SPAN_KEY, "span_id")
    return {"groups": candidates.drop("span_id"), "instances": instances, "spans": spans}


def decide(rows: Rows, notes: NearMissSink, buckets: Iterable[BucketLoader] | None = None) -> list[Finding]:
    """Cross-trace half: the caller's instances, the candidate groups and the floors. The rule
    reads the groups' numbers; the span ids of the calls (``spans``, or with ``buckets`` the same
    rows spilled in buckets of whole operations, ``SPILL_KEYS``) are read afterwards, only for
    the groups that need them: every group of a finding, the first of a near miss."""
    groups = rows.get("groups")
    if groups is None or groups.is_empty():
        return []
    # Caller instances that make the call MIN_CALLS times or more, concurrently or not.
    instances = {
        (service, name, op_key): int(count)
        for service, name, op_key, count in rows["instances"]
        .group_by(INSTANCE)
        .agg(pl.col("instances").sum())
        .iter_rows()
    }
    judged = [
        (key, order, _reason(groups.select(pl.all().gather(order)), instances[(key[0], key[1], key[3])]))
        for key, order in _candidates(groups)
    ]
    wanted = pl.concat(  # the groups whose calls' span ids the findings and near misses name
        [
            groups.select(pl.col([*SPAN_KEY, "op_key"]).gather(order if reason is None else order.head(1)))
            for _, order, reason in judged
        ]
    )
    span_ids = _span_ids(rows.get("spans"), buckets, wanted)
    del wanted
    findings: list[Finding] = []
    for (caller_service, caller_name, target_service, op_key), order, reason in judged:
        group = groups.select(pl.all().gather(order if reason is None else order.head(1)))
        group = group.join(span_ids, on=SPAN_KEY, how="left", maintain_order="left")
        # the signature's traces in first-seen order: their count, the first few (not one string a group)
        traces_seen = groups["trace_id"].gather(order).unique(maintain_order=True)
        trace_ids = traces_seen.head(max(5, MAX_EXEMPLARS)).to_list()  # (a near miss keeps 5)
        seen = instances[(caller_service, caller_name, op_key)]
        label = str(group["op_label"][0])
        spans = [str(group["caller_span_id"][0]), *group["span_id"][0]]
        if reason is not None:
            notes.note_near_miss(
                KIND,
                str(caller_service),
                str(caller_name),
                f"{label}: {reason}",
                trace_ids,
                spans,
                traces_seen.len(),
            )
            continue
        server_saving = _common.num(group["server_saving_ns"].median())
        occurrences = _common.batch_occurrences(
            group,
            {
                "calls": ("calls", 1),
                "server_ms": ("server_ns", 1e6),
                "batched_ms": ("batched_ns", 1e6),
                "latency_ms": ("latency_ns", 1e6),
            },
        )
        distinct_share, params_known, median_calls = _common.parameter_stats(group)
        evidence = {
            "trace_ids": _common.exemplars(trace_ids, MAX_EXEMPLARS),
            "span_ids": spans[: 1 + MAX_EXEMPLARS],
            "calls_p50": median_calls,
            "calls_max": int(_common.num(group["calls"].max())),
            "round_trips_saved_p50": median_calls - 1,
            "concurrent_share_p50": round(_common.num(group["concurrent_share"].median()), 3),
            "server_ms_p50": round(_common.num(group["server_ns"].median()) / 1e6, 3),
            "server_ms_saved_p50": round(server_saving / 1e6, 3),
            "latency_ms_p50": round(_common.num(group["latency_ns"].median()) / 1e6, 3),
            "batched_ms_p50": round(_common.num(group["batched_ns"].median()) / 1e6, 3),
            "call_ms_p50": round(_common.num(group["median_ns"].median()) / 1e6, 3),
            "different_parameters": (distinct_share >= 0.5) if params_known else None,
            "statement": str(group["op_detail"][0] or label),
            "caller_instances": seen,
        }
        findings.append(
            _common.caller_finding(
                KIND,
                (caller_service, caller_name),
                [{"service": str(target_service), "operation": label}],
                occurrences,
                _common.batch_confidence(0.5, distinct_share, median_calls, traces_seen.len()),
                evidence,
                op_key,
                bool(group["inferred_roles"].any()),
            )
        )
    return findings


def _reason(group: pl.DataFrame, seen: int) -> str | None:
    """Why a signature's candidate groups (``seen``: its caller's instances) make no finding;
    None when they make one."""
    server_saving = _common.num(group["server_saving_ns"].median())
    same_params = bool((group["params_known"] & (group["distinct_params"] == 1)).all())
    together = _common.num(group["together_share"].median())
    if seen >= MIN_INSTANCES_FOR_SHARE and group.height < MIN_GROUP_SHARE * seen:
        return f"issued together in {group.height} of {seen} instances < {MIN_GROUP_SHARE:.0%}"
    if together < MIN_TOGETHER_SHARE:
        return (
            f"only {together:.0%} < {MIN_TOGETHER_SHARE:.0%} of the calls start before the first one ends: "
            "started in waves by a capped pool (fanout_concurrency_limit's finding)"
        )
    if _common.num(group["per_branch"].mean()) >= 0.5:
        return (
            "one call per shard, partition or server, not per item: a scatter-gather, which "
            "fanout_straggler and fanout_concurrency_limit judge (a batch endpoint cannot span servers)"
        )
    if same_params:
        return "every call carries the same parameters: a duplicate or hedged request, not one per item"
    if server_saving < MIN_SERVER_SAVING_NS:
        return f"server time saved p50 {server_saving / 1e6:.2f} ms < {MIN_SERVER_SAVING_NS / 1e6:g} ms floor"
    return None


def _span_ids(
    spans: pl.DataFrame | None, buckets: Iterable[BucketLoader] | None, wanted: pl.DataFrame
) -> pl.DataFrame:
    """The calls' span ids (``SPAN_KEY`` and ``span_id``) of the ``wanted`` groups (``SPAN_KEY``
    and ``op_key``), from ``spans`` and, with ``buckets``, the spilled rows of their operations."""
    keys = wanted.select(SPAN_KEY)
    pieces = [] if spans is None else [spans.select(*SPAN_KEY, "span_id").join(keys, on=SPAN_KEY, how="semi")]
    if buckets is not None:
        ops = wanted["op_key"].unique()
        for load in buckets:
            pieces.append(_bucket_span_ids(load, ops, keys))
    if not pieces:
        return keys.clear().with_columns(span_id=pl.lit([], dtype=pl.List(pl.String)))
    return pl.concat(pieces, how="vertical_relaxed")


def _bucket_span_ids(load: BucketLoader, ops: pl.Series, keys: pl.DataFrame) -> pl.DataFrame:
    """The span ids of the groups ``keys`` (``SPAN_KEY``) among one bucket's spilled rows of the
    operations ``ops``. Read from the bucket's files (``hourglass.analysis.spill.BucketFiles``)
    with the wanted callers in the filter too, so that the span-id lists of the other groups of
    those operations are never decoded (a near miss wants one group of an operation whose groups
    hold ~0.5M span ids at 12M spans); another loader's rows are read whole, then joined."""
    files = getattr(load, "files", None)
    if files is None or not files:
        return load([*SPAN_KEY, "span_id"], ops).join(keys, on=SPAN_KEY, how="semi")
    hashed = pl.struct(SPAN_KEY).hash(seed=0)  # (equal keys hash equal: a superset, joined exactly below)
    wanted = pl.col(getattr(load, "key", "op_key")).is_in(ops.implode()) & hashed.is_in(
        keys.select(hashed).to_series().unique().implode()
    )
    rows = pl.scan_parquet(list(files)).filter(wanted).select(*SPAN_KEY, "span_id").collect()
    return rows.join(keys, on=SPAN_KEY, how="semi")


def _candidates(groups: pl.DataFrame) -> list[tuple[tuple[Any, ...], pl.Series]]:
    """The candidate groups per (caller service, caller operation, called service, operation) as
    row numbers, in one order whatever the partitioning: the callers' instances as they appear in
    the traces (sorted by trace, caller start, caller span, operation), each signature in the order
    of its first instance. The order is computed on row numbers, the groups are not copied."""
    signature = ["caller_service", "caller_name", "target_service", "op_key"]
    order = groups.select(
        pl.int_range(pl.len(), dtype=pl.Int64).sort_by(
            "trace_id", "parent_start_ns", "caller_span_id", "op_key"
        )
    )
    rank = np.empty(groups.height, dtype=np.int64)
    rank[order.to_series().to_numpy()] = np.arange(groups.height)
    del order
    per_signature = (
        groups.select(signature)
        .with_columns(_row=pl.int_range(pl.len(), dtype=pl.Int64), _rank=rank)
        .group_by(signature)
        .agg(pl.col("_rank").min().alias("_first"), pl.col("_row").sort_by("_rank").alias("_rows"))
        .sort("_first")
    )
    return list(zip(per_signature.select(signature).iter_rows(), per_signature["_rows"], strict=True))


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)
