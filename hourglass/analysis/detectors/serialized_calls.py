"""serialized_calls: calls made one after another that could run at the same time.

Rule
----
Candidates are the *calls* (see :func:`hourglass.analysis.detectors._common.is_call`: client/producer spans,
database/HTTP/RPC spans, server spans entered from another service, and in-process wrapper spans that
directly contain such a call) that are blocking children of a parent on the critical path, and that
have at least one sibling call. Under one
parent, in start order, a call *follows* the calls before it when

* it starts after all of them ended, or overlaps the previous call by less than
  ``_common.MAX_SEQUENTIAL_OVERLAP_SHARE`` (50 %) of the shorter of the two — clients pipeline a
  little, and a sequence whose calls overlap by a few ms is still one call after another (an
  overlap within the repair tolerance, 1 % of the parent, is clock noise and always "after"), and
* the gap since the last of them ended is at most ``MAX_GAP_FRACTION`` (50 %) of the parent's
  duration or ``MIN_MAX_GAP_NS`` (1 ms), whichever is larger — calls further apart belong to
  different phases of the request. Smaller gaps (the caller's own work between the calls) do not
  stop a run: the calls can still be overlapped, and the what-if keeps that work in place.

A *run* is a maximal chain of such calls. Members of a fan-out (a call that overlaps another call of
its own operation by ``_common.MAX_SEQUENTIAL_OVERLAP_SHARE`` or more) end a run and never join one:
"look the customer up, find drivers, then fan out to the route service" is two steps and a fan-out,
not three serialized calls. **Gate calls** end a run and never join one: a call whose
name, statement/route or target says it authenticates, authorises, validates, rate-limits, takes a
lock, checks idempotency, draws the next value of a database sequence or opens a database
connection (``GATE_PATTERN``; whole words after splitting camelCase, so an ``authors`` table or a
``tokenizer`` route is not a gate) is a precondition of the calls after it — "authenticate, then call the backend" and "get the next id,
then insert with it" are dependencies, not missed parallelism.

A run is reported when it holds at least two calls of at least two different operations (same operation repeated is ``n_plus_one``'s business: an operation that
repeats ``n_plus_one.MIN_REPEATS`` times or more in the run is left out of it, and splits it where
its calls stood), at least one call is
on the critical path, and the local saving ``sum(durations) − max(duration)`` is at least
``MIN_SAVING_NS`` (1 ms) and ``MIN_SAVING_SHARE`` (1 %) of the root's duration — below that no one
should restructure code. The occurrence's intervention runs the calls concurrently; the what-if
engine measures the saving at the root (a run off the critical path saves nothing and is dropped).

Runs are aggregated across traces by caller (service, operation); the finding's targets — and its
signature — are the called operations present in at least half of its runs (at least the two most
frequent ones), so a run that now and then misses one call does not split the finding.

Independence and confidence
---------------------------
Traces do not show data flow, so whether the second call needs the first one's result cannot be
seen directly. The detector uses what traces *can* show, across every instance of the caller (not
only the serialized ones):

* the calls' order varies between instances → they do not depend on each other (confidence 0.7+);
* the calls overlap in some instances → they can run concurrently (confidence 0.7+; 0.8+ with both);
* neither, in fewer than ``FIXED_ORDER_MIN_INSTANCES`` (10) instances, and at most one call takes
  inputs → not enough evidence either way (0.5); with two or more calls taking inputs, as below
  (too few instances to judge an order is no evidence of independence);
* neither, in 10 or more instances (same order every time, never overlapping), but every called
  operation except at most one is *self-contained* — it takes no input that an earlier call could
  have produced: an HTTP ``GET``/``HEAD`` with no path parameter, no query string and no id-like
  path segment, or a SQL ``SELECT`` with no ``WHERE`` clause and no bind parameter — so all of them
  could be shifted to the start of the sequence (Sentry's "Consecutive DB Queries" rule, extended
  to HTTP) → reported (0.6);
* neither (however many instances), and two or more calls take inputs: that is what a data
  dependency (the second call needs the first one's result, e.g. a query for ids followed by
  ``WHERE id IN (...)``, or HotROD's customer lookup before the driver search) looks like — and
  also what the most common missed opportunity looks like (several independent lookups issued one
  after another, e.g. TrainTicket's basic service resolving stations, trains, routes and then
  prices). Traces cannot tell them apart, so such a run is reported only

  - with three or more calls: a chain of two is the lookup-then-use shape and is left out,
  - modelled conservatively: every call but the **last** runs concurrently (the last call is the
    usual fan-in that combines the others' results, as the price lookup needs the routes and
    trains) — the what-if measures that,
  - when that saving is large: at least ``MIN_UNCHECKED_SAVING_NS`` (20 ms) and
    ``MIN_UNCHECKED_SAVING_SHARE`` (10 %) of the request at the median — a change with an
    unverified premise is worth a reader's check only when it would pay off visibly, and
  - with confidence ``UNCHECKED_CONFIDENCE`` (0.3) and ``independence_unverified: true`` in the
    evidence; the first action says to check which call uses which result before changing code.

  Otherwise the run is a near miss ("order fixed in 14 instances and 3 calls take inputs; ...").

A finding also needs its serialized runs in at least ``MIN_RUN_SHARE`` (20 %) of the caller's
instances once there are ``MIN_INSTANCES_FOR_SHARE`` (5) of them: a run in one request out of thirty
is a timing fluke of a caller that is otherwise fine, not a pattern.

Up to +0.1 more with the number of traces (full at 20). Sentry's "Consecutive DB Queries" detector
decides independence from the statement text alone (no WHERE clause, no parameters); here the text
is the fallback, and cross-trace order and overlap evidence — which works for any kind of call and
is measured rather than guessed — comes first.
"""

from __future__ import annotations

from functools import partial

import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import NearMissSink, Rows, call_children
from hourglass.analysis.model import Finding, Occurrences, RunConcurrently

KIND = "serialized_calls"
MAX_GAP_FRACTION = 0.5
MAJORITY_SHARE = 0.5
MIN_RUN_SHARE = 0.2
MIN_INSTANCES_FOR_SHARE = 5
MIN_MAX_GAP_NS = 1_000_000
MIN_SAVING_NS = 1_000_000
MIN_SAVING_SHARE = 0.01
FIXED_ORDER_MIN_INSTANCES = 10
MIN_UNCHECKED_SAVING_NS = 20_000_000
MIN_UNCHECKED_SAVING_SHARE = 0.1
UNCHECKED_CONFIDENCE = 0.3
NPLUSONE_REPEATS = 5  # keep in step with n_plus_one.MIN_REPEATS
MAX_EXEMPLARS = 5
# 2: the runs name their set of operations by key (``opset``, the sets in ``opsets``) and carry
# their fan-in saving, not their calls' durations; the callers' instances are patterns (``orders``)
ROWS_FORMAT = 2
_PAIR = 2**32  # a pair of positions in an order, one number: i * _PAIR + j


def _mark_fanouts(calls: pl.DataFrame) -> pl.DataFrame:
    """Adds ``in_fanout``: the call runs concurrently (overlap share >= the sequential bound) with
    another call of its operation under the same parent — a member of a fan-out, which is not a
    step of a sequence (the fan-out detectors and ``batchable_calls`` judge it)."""
    key = ["parent_row", "op_key"]
    # on the columns the rule reads only: the calls' other columns never go through the two sorts
    ordered = calls.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_pos"),
        *key,
        "start_ns",
        "row",
        "end_ns",
        "duration_ns",
    ).sort([*key, "start_ns", "row"])
    same = (pl.col("parent_row") == pl.col("parent_row").shift(1)) & (
        pl.col("op_key") == pl.col("op_key").shift(1)
    )
    share = _common.overlap_share(
        pl.col("start_ns"), pl.col("_op_end").shift(1), pl.col("duration_ns"), pl.col("duration_ns").shift(1)
    )
    # the latest end of the group's calls so far (each group's rows are contiguous after the sort)
    ordered = ordered.with_columns(
        _common.running_max(ordered["end_ns"], ordered.select(_common.key_changes(key)).to_series()).alias(
            "_op_end"
        )
    )
    ordered = ordered.with_columns(
        (same & (share >= _common.MAX_SEQUENTIAL_OVERLAP_SHARE)).fill_null(False).alias("_conc")
    ).with_columns(
        (
            pl.col("_conc") | (pl.col("_conc").shift(-1).fill_null(False) & same.shift(-1).fill_null(False))
        ).alias("in_fanout")
    )
    return calls.with_columns(ordered.sort("_pos")["in_fanout"])


def sequential_links(calls: pl.DataFrame) -> pl.DataFrame:
    """Adds ``prev_end`` (latest end of earlier calls of the same parent), ``overlap_share`` (see
    :func:`hourglass.analysis.detectors._common.overlap_share`, against the previous call), ``overlaps_prev``
    (mostly concurrent with it), ``gap_ns`` and ``follows`` (starts after them, or overlapping them by
    less than ``_common.MAX_SEQUENTIAL_OVERLAP_SHARE`` of the shorter call, with a small gap).
    ``calls`` sorted by (parent_row, start_ns)."""
    same_parent = pl.col("parent_row") == pl.col("parent_row").shift(1)
    tol = _common.tolerance(pl.col("parent_duration_ns"))
    max_gap = pl.max_horizontal(
        (pl.col("parent_duration_ns") * MAX_GAP_FRACTION).cast(pl.Int64), pl.lit(MIN_MAX_GAP_NS)
    )
    share = _common.overlap_share(
        pl.col("start_ns"), pl.col("prev_end"), pl.col("duration_ns"), pl.col("duration_ns").shift(1)
    )
    marked = _mark_fanouts(calls)
    # the latest end of the parent's calls so far (``calls`` sorted by parent: contiguous)
    cum_end = _common.running_max(
        marked["end_ns"], marked.select(_common.key_changes(["parent_row"])).to_series()
    )
    return (
        marked.with_columns(cum_end.alias("_cum_end"))
        .with_columns(pl.when(same_parent).then(pl.col("_cum_end").shift(1)).alias("prev_end"))
        .with_columns(pl.when(same_parent).then(share).alias("overlap_share"))
        .with_columns(
            (
                (pl.col("start_ns") < pl.col("prev_end") - tol)
                & (pl.col("overlap_share") >= _common.MAX_SEQUENTIAL_OVERLAP_SHARE)
            )
            .fill_null(False)
            .alias("overlaps_prev"),
            (pl.col("start_ns") - pl.col("prev_end")).alias("gap_ns"),
        )
        .with_columns(
            (
                pl.col("prev_end").is_not_null()
                & ~pl.col("overlaps_prev")
                & (pl.col("gap_ns") <= max_gap)
                & ~pl.col("is_gate")
                & ~(pl.col("is_gate").shift(1).fill_null(False) & same_parent)
                & ~pl.col("in_fanout")
                & ~(pl.col("in_fanout").shift(1).fill_null(False) & same_parent)
            ).alias("follows")
        )
        .drop("_cum_end")
    )


def _runs(linked: pl.DataFrame) -> pl.DataFrame:
    """One row per run of at least two calls of two or more operations (members listed in start
    order), with ``keep`` (on the critical path and above the saving floors) and ``on_path``."""
    runs = linked.with_columns((~pl.col("follows")).cum_sum().alias("run_id"))
    # Operations repeated N+1-style inside a run belong to n_plus_one: their calls leave the run and
    # split it where they stood (the calls around a loop are not one sequence: running them together
    # would leave the loop where it is, and the what-if would find nothing to save).
    same_parent = pl.col("parent_row") == pl.col("parent_row").shift(1)
    runs = (
        runs.with_columns((pl.len().over(["run_id", "op_key"]) >= NPLUSONE_REPEATS).alias("_loop"))
        .with_columns(
            (
                pl.col("follows")
                & ~pl.col("_loop")
                & ~(pl.col("_loop").shift(1).fill_null(False) & same_parent)
            ).alias("follows")
        )
        .with_columns((~pl.col("follows")).cum_sum().alias("run_id"))
        .filter(~pl.col("_loop"))
    )
    sizes = runs.group_by("run_id").agg(pl.len().alias("_n"))
    runs = runs.join(sizes.filter(pl.col("_n") >= 2), on="run_id", how="semi")
    runs = (
        runs.group_by("run_id", maintain_order=True)
        .agg(
            pl.col("trace_id").first(),
            pl.col("parent_row").first(),
            pl.col("parent_start_ns").first(),
            pl.col("start_ns").first().alias("first_start_ns"),
            pl.col("parent_span_id_").first().alias("caller_span_id"),
            pl.col("parent_service").first().alias("caller_service"),
            pl.col("parent_name").first().alias("caller_name"),
            pl.col("parent_on_critical_path").first(),
            pl.col("root_duration_ns").first(),
            pl.col("span_id"),
            pl.col("op_key"),
            pl.col("op_label"),
            pl.col("target_service"),
            pl.col("duration_ns").alias("durations"),
            pl.col("duration_ns").sum().alias("serial_ns"),
            pl.col("duration_ns").max().alias("longest_ns"),
            pl.col("on_critical_path").any().alias("any_on_path"),
            pl.col("kind_inferred").any().alias("inferred_roles"),
            pl.col("op_key").n_unique().alias("distinct_ops"),
            pl.len().alias("calls"),
        )
        .with_columns((pl.col("serial_ns") - pl.col("longest_ns")).alias("local_saving_ns"))
        .filter((pl.col("calls") >= 2) & (pl.col("distinct_ops") >= 2))
    )
    on_path = pl.col("parent_on_critical_path") & pl.col("any_on_path")
    floor = (pl.col("local_saving_ns") >= MIN_SAVING_NS) & (
        pl.col("local_saving_ns") >= pl.col("root_duration_ns") * MIN_SAVING_SHARE
    )
    return runs.with_columns(keep=on_path & floor, on_path=on_path)


def _note_dropped_runs(notes: NearMissSink, dropped: pl.DataFrame, span_ids: pl.Series) -> None:
    """One near miss per caller whose runs were all too small or off the critical path (``dropped``:
    the runs without their span ids, ``_row`` their position in ``span_ids``)."""
    # a caller's first run's span ids, taken by position (the other runs' lists are not read)
    per_caller = _common.dropped_per_caller(
        dropped.with_columns(pl.col("_row").alias("span_id")), ["caller_service", "caller_name"]
    )
    per_caller = per_caller.with_columns(span_ids.gather(per_caller["span_id"]).alias("span_id"))
    for r in per_caller.iter_rows(named=True):
        if r["on_path"] == 0:
            reason = f"{r['count']} sequential runs, none on the critical path"
        else:
            floor_ms = max(MIN_SAVING_NS / 1e6, r["root_ms"] * MIN_SAVING_SHARE)
            reason = (
                f"saving p50 {r['saving_ms']:.2f} ms < {floor_ms:.2f} ms floor "
                f"(max of {MIN_SAVING_NS / 1e6:g} ms and {MIN_SAVING_SHARE:.0%} of the {r['root_ms']:.1f} ms request)"
            )
        _common.note_caller_miss(notes, KIND, r, reason)


def _assign_signatures(runs: pl.DataFrame, opsets: pl.DataFrame, op_keys: pl.DataFrame) -> pl.DataFrame:
    """One signature per caller: the called operations present in at least ``MAJORITY_SHARE`` of its
    runs (at least the two most frequent), so runs that miss a call now and then stay one finding.
    ``runs`` name their set of operations by a 64-bit key (``opset``), ``opsets`` maps each set to
    its operations' keys (``ops``), ``op_keys`` each operation's key (``op``) to the operation
    (``op_key``). One row per caller: ``sig_ops`` (sorted) and ``signature``."""
    caller = ["caller_service", "caller_name"]
    per_op = (
        runs.group_by([*caller, "opset"])
        .agg(pl.len().alias("_runs_with_set"))
        .join(opsets, on="opset")
        .select(*caller, "_runs_with_set", op="ops")
        .explode("op")
        .group_by([*caller, "op"])
        .agg(pl.col("_runs_with_set").sum().alias("_runs_with_op"))
        .join(op_keys, on="op", how="left")
        .join(runs.group_by(caller).agg(pl.len().alias("_runs")), on=caller)
        .sort([*caller, "_runs_with_op", "op_key"], descending=[False, False, True, False])
        .with_columns(pl.int_range(pl.len()).over(caller).alias("_rank"))
        .filter((pl.col("_runs_with_op") >= pl.col("_runs") * MAJORITY_SHARE) | (pl.col("_rank") < 2))
    )
    return (
        per_op.group_by(caller)
        .agg(pl.col("op_key").sort().alias("sig_ops"))
        .with_columns(pl.col("sig_ops").list.join(" || ").alias("signature"))
    )


def _caller_hash(service: str, name: str) -> pl.Expr:
    return pl.struct(pl.col(service).alias("caller_service"), pl.col(name).alias("caller_name")).hash()


def _instance_orders(calls: pl.DataFrame) -> pl.DataFrame:
    """The order and overlap evidence of every caller instance that holds two or more operations
    (the only instances that can hold two of a signature's), as partial aggregates that merge
    exactly across batches: one row per caller (64-bit key) and *pattern* — ``order``, the
    instance's operations (64-bit keys) by their first call's start (then key), and ``overlaps``,
    the pairs of them (positions in ``order``, ``i * 2**32 + j``, ``i < j``) a call of one overlaps
    a later call of the other (see below) — with ``instances``, how many instances show it.

    :func:`_independence` restricts a pattern to a signature's operations, which is exact: the
    order of a subset is the order filtered (each operation's first start does not depend on the
    others), and two different operations of the subset overlap in the sense of the sequence rule
    (in (start, end, key) order, a call starting before the latest end of the calls before it,
    less the repair tolerance, with an operation other than the previous call's) exactly when a
    call of one starts before a call of the other that precedes it ends, less the tolerance — so
    the decision reads rows per caller and pattern, not per call: a few per caller where calls
    come in a few fixed orders, whatever the number of stored instances."""
    multi = (
        calls.group_by("parent_row")
        .agg(pl.col("op_key").n_unique().alias("_ops"))
        .filter(pl.col("_ops") >= 2)
    )
    seen = calls.join(multi.select("parent_row"), on="parent_row", how="semi").select(
        "parent_row",
        caller=_caller_hash("parent_service", "parent_name"),
        op=pl.col("op_key").hash(),
        start_ns="start_ns",
        end_ns="end_ns",
        tol=_common.tolerance(pl.col("parent_duration_ns")),
    )
    return _patterns(seen)


def _patterns(seen: pl.DataFrame) -> pl.DataFrame:
    """:func:`_instance_orders` of calls (``parent_row``: the instance, ``caller``, ``op``,
    ``start_ns``, ``end_ns``, ``tol``: the repair tolerance of the parent)."""
    seen = seen.sort(["parent_row", "start_ns", "end_ns", "op"]).with_columns(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("_at")
    )
    ops = (
        seen.group_by(["parent_row", "op"])
        .agg(pl.col("start_ns").min())
        .sort(["parent_row", "start_ns", "op"])
        .with_columns(pl.int_range(pl.len(), dtype=pl.UInt64).over("parent_row").alias("pos"))
    )
    orders = ops.group_by("parent_row", maintain_order=True).agg(pl.col("op").alias("order"))
    against = _overlapping_pairs(seen, ops)
    return (
        seen.group_by("parent_row")
        .agg(pl.col("caller").first())
        .join(orders, on="parent_row")
        .join(against, on="parent_row", how="left")
        .with_columns(pl.col("overlaps").fill_null(pl.lit([], dtype=pl.List(pl.UInt64))))
        .group_by(["caller", "order", "overlaps"])
        .agg(pl.len().cast(pl.Int64).alias("instances"))
        .sort("caller", "instances")
    )


def _overlapping_pairs(seen: pl.DataFrame, ops: pl.DataFrame) -> pl.DataFrame:
    """Per instance (``parent_row``), its ``overlaps``: the pairs of its operations' positions
    (``ops``' ``pos``) such that a call C of one starts before a call D of the other that precedes
    C (in ``seen``'s order, ``_at``) ends, less the tolerance: ``start(C) < end(D) - tol``.

    Swept per call D, not per call and operation (that was every call times every operation of
    its instance: 25M rows for one caller of 5,000 distinct calls): in (start, end, op) order the
    calls C after D that start before ``end(D) - tol`` are the positions from D's next up to the
    first position of the instance that starts at or after it, an interval found by an as-of
    join. Each operation's intervals are merged (the part of D's not covered by the earlier
    calls' of its operation), so the positions expanded are the union of what the operation's
    calls cover, however many of its calls overlap (a fan-out of 5,000 calls to one operation:
    ~5,000), and only overlapping calls expand at all."""
    at = seen.select("parent_row", "op", "_at", thr=pl.col("end_ns") - pl.col("tol")).drop_nulls("thr")
    # the first position of each start in its instance, and each instance's end
    firsts = (
        seen.group_by(["parent_row", "start_ns"])
        .agg(pl.col("_at").min().cast(pl.Int64).alias("_hi"))
        .sort("start_ns")
    )
    ends = seen.group_by("parent_row").agg((pl.col("_at").max().cast(pl.Int64) + 1).alias("_end"))
    spans = (
        at.sort("thr")
        .join_asof(
            firsts,
            left_on="thr",
            right_on="start_ns",
            by="parent_row",
            strategy="forward",
            check_sortedness=False,
        )
        .join(ends, on="parent_row")
        .select(
            "parent_row",
            other="op",
            _at=pl.col("_at").cast(pl.Int64),
            lo=pl.col("_at").cast(pl.Int64) + 1,
            hi=pl.coalesce("_hi", "_end"),
        )
        .filter(pl.col("hi") > pl.col("lo"))
        .sort(["parent_row", "other", "_at"])
        .with_columns(
            # the latest ``hi`` of the operation's earlier rows: the running maximum of the group
            # at the previous row when that row is the group's (the groups are contiguous), taken
            # by one shift over the frame — a shift inside ``over`` runs group by group, ~30x slower
            lo=pl.max_horizontal(
                "lo",
                pl.when(
                    (pl.col("parent_row") == pl.col("parent_row").shift(1))
                    & (pl.col("other") == pl.col("other").shift(1))
                )
                .then(pl.col("hi").cum_max().over(["parent_row", "other"]).shift(1))
                .fill_null(0),
            )
        )
        .filter(pl.col("hi") > pl.col("lo"))
    )
    covered = spans.select("parent_row", "other", c=pl.int_ranges("lo", "hi")).explode("c")
    covered = covered.with_columns(op=seen.get_column("op").gather(covered.get_column("c")))
    pos = ops.select("parent_row", "op", "pos")
    return (
        covered.filter(pl.col("op") != pl.col("other"))
        .join(pos, on=["parent_row", "op"])
        .join(pos.select("parent_row", other="op", other_pos="pos"), on=["parent_row", "other"])
        .select(
            "parent_row",
            pair=pl.min_horizontal("pos", "other_pos") * _PAIR + pl.max_horizontal("pos", "other_pos"),
        )
        .unique()
        .group_by("parent_row")
        .agg(pl.col("pair").sort().alias("overlaps"))
    )


def _independence(orders: pl.DataFrame, signatures: pl.DataFrame) -> pl.DataFrame:
    """Per signature (caller and operations): instances of the caller holding >= 2 of its
    operations, how many distinct orders they show, and how many show two different operations
    overlapping — from the callers' patterns (:func:`_instance_orders`), each restricted to the
    signature's operations."""
    caller = ["caller_service", "caller_name"]
    signatures = signatures.select(*caller, "signature", pl.col("sig_ops").alias("op_key")).with_columns(
        sig=pl.int_range(pl.len(), dtype=pl.UInt32), caller=_caller_hash(*caller)
    )
    sig_ops = signatures.explode("op_key").select("sig", op=pl.col("op_key").hash(), _in=pl.lit(True))
    patterns = (
        orders.group_by(["caller", "order", "overlaps"])
        .agg(pl.col("instances").sum())
        .join(signatures.select("sig", "caller"), on="caller")
        .with_columns(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_p"))
    )
    members = (
        patterns.select("_p", "sig", op="order")
        .explode("op")
        .with_columns(pl.int_range(pl.len(), dtype=pl.UInt64).over("_p").alias("pos"))
        .join(sig_ops, on=["sig", "op"], how="semi", maintain_order="left")
    )
    restricted = (
        members.group_by("_p", maintain_order=True)
        .agg(pl.col("op").alias("order"))
        .filter(pl.col("order").list.len() >= 2)
    )
    pairs = (
        patterns.select("_p", pair="overlaps")
        .explode("pair")
        .drop_nulls("pair")
        .select("_p", i=pl.col("pair") // _PAIR, j=pl.col("pair") % _PAIR)
        .join(members.select("_p", i="pos"), on=["_p", "i"], how="semi")
        .join(members.select("_p", j="pos"), on=["_p", "j"], how="semi")
        .select("_p")
        .unique()
        .with_columns(_overlap=pl.lit(True))
    )
    return (
        restricted.join(patterns.select("_p", "sig", "instances"), on="_p")
        .join(pairs, on="_p", how="left")
        .group_by("sig")
        .agg(
            pl.col("instances").sum(),
            pl.col("order").n_unique().alias("distinct_orders"),
            pl.col("instances")
            .filter(pl.col("_overlap").fill_null(False))
            .sum()
            .alias("overlapping_instances"),
        )
        .join(signatures.select("sig", *caller, "signature"), on="sig")
        .select(*caller, "signature", "instances", "distinct_orders", "overlapping_instances")
    )


def confidence(
    instances: int, distinct_orders: int, overlapping: int, traces: int, shiftable: bool = False
) -> float | None:
    """Confidence from cross-trace independence evidence, or None when the evidence points to a
    data dependency (see the module docstring). ``shiftable``: every called operation but at most
    one is self-contained."""
    varies, overlaps = distinct_orders > 1, overlapping > 0
    if varies or overlaps:
        base = 0.8 if (varies and overlaps) else 0.7
    elif not shiftable:
        return None
    elif instances < FIXED_ORDER_MIN_INSTANCES:
        base = 0.5
    else:
        base = 0.6
    return round(min(0.95, base + 0.1 * min(1.0, traces / 20)), 3)


def _fan_in_saving() -> pl.Expr:
    """Local saving when every call but the last runs concurrently (the last one may need the
    others' results): sum - max over the calls before the last (0 for a run of two); the decision
    reads it for runs whose independence is unverified."""
    n = pl.col("durations").list.len()
    head = pl.col("durations").list.slice(0, n - 1)
    return pl.when(n >= 3).then(head.list.sum() - head.list.max()).otherwise(0).cast(pl.Int64)


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``runs`` (every run of two or more operations, kept or not), ``opsets``
    (the runs' sets of operations), ``labels`` (each operation's first call: its label and
    callee), ``self_contained`` (per operation, whether every call here is self-contained) and
    ``orders`` (per caller, the order/overlap patterns of its instances with two or more
    operations and how many show each, for the evidence across traces). Every table merges
    across batches by concatenation; the decision reads rows per run and per pattern, none per
    call."""
    if ctx.spans.height == 0:
        return {}
    calls = call_children(ctx)
    if calls.height < 2:
        return {}
    runs = _runs(sequential_links(calls)).with_columns(
        pl.col("op_key").list.eval(pl.element().hash()).list.unique().list.sort().alias("_ops"),
        _fan_in_saving().alias("fan_in_ns"),
    )
    runs = runs.with_columns(pl.col("_ops").hash().alias("opset"))
    labels = (
        # the columns kept, then sorted (not every call column through the sort)
        calls.select(
            "op_key",
            "op_label",
            "target_service",
            "trace_id",
            "parent_start_ns",
            "parent_span_id_",
            "start_ns",
            "span_id",
        )
        .sort("trace_id", "parent_start_ns", "parent_span_id_", "start_ns", "span_id")
        .unique(subset="op_key", keep="first", maintain_order=True)
    )
    return {
        # what the decision reads of a run: its set of operations as a 64-bit key (``opsets``: the
        # set's operations' keys, their text in ``labels``) and its fan-in saving, no per-call
        # labels, callees or durations
        "runs": runs.select(
            "trace_id",
            "parent_start_ns",
            "first_start_ns",
            "caller_span_id",
            "caller_service",
            "caller_name",
            "root_duration_ns",
            "span_id",
            "opset",
            "fan_in_ns",
            "serial_ns",
            "inferred_roles",
            "calls",
            "local_saving_ns",
            "keep",
            "on_path",
        ),
        "opsets": runs.select("opset", ops="_ops").unique(subset="opset", maintain_order=True),
        "labels": labels,
        "self_contained": calls.group_by("op_key").agg(pl.col("self_contained").all()),
        "orders": _instance_orders(calls),
    }


def decide(rows: Rows, notes: NearMissSink) -> list[Finding]:
    """Cross-trace half: signatures, independence evidence, confidence, findings."""
    runs = rows.get("runs")
    if runs is None or runs.is_empty():
        return []
    # The runs' lists of span ids stay where they are: the decision reads the other columns
    # (``_row``: the run's position) and takes a finding's runs' lists at the end.
    lists = runs.select("span_id")
    runs = runs.drop("span_id").with_row_index("_row")
    # One order whatever the partitioning: the callers' instances as they appear in the traces.
    runs = runs.sort("trace_id", "parent_start_ns", "caller_span_id", "first_start_ns")
    _note_dropped_runs(notes, runs.filter(~pl.col("keep")), lists["span_id"])
    runs = runs.filter("keep")
    if runs.height == 0:
        return []
    labels = (
        rows["labels"]
        .sort("trace_id", "parent_start_ns", "parent_span_id_", "start_ns", "span_id")
        .unique(subset="op_key", keep="first", maintain_order=True)
        .select("op_key", "op_label", "target_service")
    )
    signatures = _assign_signatures(
        runs,
        rows["opsets"].unique(subset="opset", keep="first"),
        labels.select(op=pl.col("op_key").hash(), op_key="op_key"),
    )
    # per caller: its signature and the evidence (a caller has one signature)
    evidence = {
        (row["caller_service"], row["caller_name"]): row
        for row in _independence(rows["orders"], signatures).iter_rows(named=True)
    }
    signature_of = {
        (row["caller_service"], row["caller_name"]): (row["signature"], row["sig_ops"])
        for row in signatures.iter_rows(named=True)
    }
    self_contained_ops = set(
        rows["self_contained"]
        .group_by("op_key")
        .agg(pl.col("self_contained").all())
        .filter("self_contained")["op_key"]
        .to_list()
    )
    findings: list[Finding] = []
    for (caller_service, caller_name), group in runs.group_by(
        ["caller_service", "caller_name"], maintain_order=True
    ):
        ev = evidence.get((caller_service, caller_name), {})
        signature, sig_op_keys = signature_of[(caller_service, caller_name)]
        instances = int(ev.get("instances") or 0)
        distinct_orders = int(ev.get("distinct_orders") or 0)
        overlapping = int(ev.get("overlapping_instances") or 0)
        # the caller's traces in first-seen order: their count, the first few (not one string a run)
        traces_seen = group["trace_id"].unique(maintain_order=True)
        trace_ids = traces_seen.head(max(5, MAX_EXEMPLARS)).to_list()  # (a near miss keeps 5)
        takes_input = sum(1 for op in sig_op_keys if op not in self_contained_ops)
        shiftable = takes_input <= 1
        score = confidence(instances, distinct_orders, overlapping, traces_seen.len(), shiftable)
        first_spans = [group["caller_span_id"][0], *lists["span_id"][int(group["_row"][0])]]
        caller = (str(caller_service), str(caller_name))

        if instances >= MIN_INSTANCES_FOR_SHARE and group.height < MIN_RUN_SHARE * instances:
            notes.note_near_miss(
                KIND,
                *caller,
                f"run in {group.height} of {instances} instances < {MIN_RUN_SHARE:.0%}: "
                "a timing fluke of a caller that is otherwise fine",
                trace_ids,
                first_spans,
                traces_seen.len(),
            )
            continue
        order_fixed = distinct_orders <= 1 and overlapping == 0
        if order_fixed and not shiftable and _common.num(group["calls"].median()) < 3:
            notes.note_near_miss(
                KIND,
                *caller,
                f"order fixed in {instances} instances and {takes_input} calls take inputs; "
                "a chain of two calls looks like a data dependency",
                trace_ids,
                first_spans,
                traces_seen.len(),
            )
            continue
        unchecked = score is None  # fixed order, 2+ calls take inputs: maybe a data dependency
        if unchecked:
            saving = _common.num(group["fan_in_ns"].median())
            root = _common.num(group["root_duration_ns"].median())
            floor = max(MIN_UNCHECKED_SAVING_NS, MIN_UNCHECKED_SAVING_SHARE * root)
            if saving < floor or _common.num(group["calls"].median()) < 3:
                notes.note_near_miss(
                    KIND,
                    *caller,
                    f"order fixed in {instances} instances and {takes_input} calls take inputs; "
                    + (
                        "a chain of two calls looks like a data dependency"
                        if _common.num(group["calls"].median()) < 3
                        else f"saving p50 without the last call {saving / 1e6:.1f} ms < {floor / 1e6:.1f} ms floor"
                    ),
                    trace_ids,
                    first_spans,
                    traces_seen.len(),
                )
                continue
            group = group.filter(pl.col("fan_in_ns") > 0)
            if group.height == 0:
                continue
            score = UNCHECKED_CONFIDENCE
        assert score is not None
        # the caller and its calls, run concurrently (but the last one when unchecked): made in
        # columns, no object per occurrence (``Occurrences.from_columns``), a chunk of runs at a
        # time (``_common.occurrences_by_chunk``), their span-id lists taken for that chunk only
        occurrences = _common.occurrences_by_chunk(
            group.height, partial(_occurrences, group, lists, unchecked)
        )
        sig_ops = pl.DataFrame({"op_key": sig_op_keys}, schema={"op_key": pl.String})
        targets = [
            {"service": str(svc), "operation": str(op)}
            for svc, op in sig_ops.join(labels, on="op_key", how="left", maintain_order="left")
            .select("target_service", "op_label")
            .iter_rows()
        ]
        local = group["fan_in_ns"] if unchecked else group["local_saving_ns"]
        evidence_numbers = {
            "trace_ids": _common.exemplars(trace_ids, MAX_EXEMPLARS),
            "span_ids": list(occurrences[0].span_ids),
            "calls_p50": _common.num(group["calls"].median()),
            "serial_ms_p50": round(_common.num(group["serial_ns"].median()) / 1e6, 3),
            "local_saving_ms_p50": round(_common.num(local.median()) / 1e6, 3),
            "caller_instances": instances,
            "distinct_orders": distinct_orders,
            "overlapping_instances": overlapping,
            "order_fixed": distinct_orders <= 1 and overlapping == 0,
            "calls_taking_input": takes_input,
        }
        if unchecked:
            # Weak evidence: the same order every time and calls that take inputs. The what-if keeps
            # the last call after the others (it may combine their results).
            evidence_numbers["independence_unverified"] = True
            evidence_numbers["last_call_kept_after"] = True
        findings.append(
            _common.caller_finding(
                KIND,
                (caller_service, caller_name),
                targets,
                occurrences,
                score,
                evidence_numbers,
                signature,
                bool(group["inferred_roles"].any()),
            )
        )
    return findings


def _occurrences(
    group: pl.DataFrame, lists: pl.DataFrame, unchecked: bool, start: int, length: int
) -> Occurrences:
    """The occurrences of the runs ``start`` to ``start + length`` of a finding's ``group`` (their
    span-id lists: the rows ``_row`` of ``lists``)."""
    part = group.slice(start, length)
    part = pl.concat([part, lists[part["_row"]]], how="horizontal")
    return Occurrences.from_columns(
        part["trace_id"],
        part.select(pl.concat_list(pl.col("caller_span_id"), pl.col("span_id"))).to_series(),
        intervention=RunConcurrently,
        first=1,
        dropped=1 if unchecked else 0,
        parameter=None,
        numbers=_common.per_unit(
            part,
            {
                "calls": ("calls", 1),
                "serial_ms": ("serial_ns", 1e6),
                "local_saving_ms": ("fan_in_ns" if unchecked else "local_saving_ns", 1e6),
            },
        ),
        keys=_common.occurrence_keys(part, ["trace_id", "caller_span_id", "span_id"], unchecked),
    )


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)
