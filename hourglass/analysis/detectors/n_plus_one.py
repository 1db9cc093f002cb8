"""n_plus_one: the same operation called again and again, one call after another, under one parent.

Rule
----
Among the blocking *calls* of one parent (see :func:`hourglass.analysis.detectors._common.is_call`) that share
one normalised operation — same service and same statement with literals removed, or same HTTP
method and route template (ids, numbers and UUIDs in the path become ``{id}``), or same RPC method —
take them in start order. A call continues the sequence when it starts after the previous call of that
operation ended, or overlaps it by less than ``_common.MAX_SEQUENTIAL_OVERLAP_SHARE`` (50 %) of the
shorter of the two (clients pipeline a little: a loop whose calls overlap by a few ms is still a
loop); calls that overlap more are already concurrent and break the sequence (see ``batchable_calls``
for those). A sequence is reported when

* it has at least ``MIN_REPEATS`` (5) calls — Sentry's N+1 DB detector uses the same bar: fewer
  repetitions are usually a handful of distinct lookups, not a loop;
* the calls carry **different parameters** (different literal statements or URLs), or the same
  parameters (then the fix is to cache or hoist the call, and the evidence says so); when the spans
  record neither statement nor URL the evidence says the parameters are unknown;
* it is not a retry burst: sequences where most calls failed with identical parameters belong to
  ``retry_without_backoff``;
* the time it could save is at least ``MIN_SAVING_NS`` (1 ms) and either ``MIN_SAVING_SHARE`` (1 %)
  of the root's duration or — summed over every loop of that caller instance —
  ``MIN_CALLER_SHARE`` (25 %) of the caller's own duration, and at least one call is on the critical
  path. The second arm keeps the classic ORM N+1 (a repository method loading two relations row by
  row, 5 + 5 queries of 0.8 ms in a 13 ms endpoint) that a 1 % share of a 700 ms request would hide:
  it dominates the endpoint it lives in, whoever calls it, and it grows with the data.

A finding also needs its sequences in at least ``MIN_SEQUENCE_SHARE`` (20 %) of the requests that
make the call that often, once there are ``MIN_INSTANCES_FOR_SHARE`` (5) of them: a fan-out that
is concurrent in most requests and happens to run one-by-one in a few is not an N+1 loop. For the
same reason, when the calls overlap one another in at least ``MAX_CONCURRENT_SHARE`` (50 %) of those
requests, the code issues them concurrently and the one-by-one requests are waiting for a shared,
starved worker pool (HotROD's route calls without its MySQL mutex): batching is not the fix there.

Batching model (the intervention): the N calls collapse into one call that takes as long as the
slowest of them plus ``PER_ITEM_COST_FRACTION`` (5 %) of the others' time — one round trip instead of
N, with a little extra work for the extra rows. The caller's work between calls is kept. The what-if
engine measures the saving at the root.

Aggregation: by (caller service, caller operation, called service, normalised operation).
Confidence: 0.6, +0.1 when parameters differ (a classic loop over ids), +0.1 when the median
sequence has 10 or more calls, +0.1 with 5 or more traces; capped at 0.95.
"""

from __future__ import annotations

import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import NearMissSink, Rows, call_children
from hourglass.analysis.model import CollapseSpans, Finding, Occurrences
from hourglass.collector.schema import STATUS_ERROR

KIND = "n_plus_one"
MIN_REPEATS = 5
PER_ITEM_COST_FRACTION = 0.05
MIN_SAVING_NS = 1_000_000
MIN_SAVING_SHARE = 0.01
MAX_EXEMPLARS = 5
MIN_SEQUENCE_SHARE = 0.2
MAX_CONCURRENT_SHARE = 0.5
MIN_INSTANCES_FOR_SHARE = 5
MIN_CALLER_SHARE = 0.25


def _ordered_calls(calls: pl.DataFrame) -> pl.DataFrame:
    """Calls of (parent, operation) groups of at least ``MIN_REPEATS``, in start order, with
    ``_continues``: the call starts after every earlier call of its group ended. ``calls``:
    :func:`hourglass.analysis.detectors._common.repeated_calls` (a sequence is a chain inside one
    (parent, operation) group: groups with fewer than MIN_REPEATS calls cannot hold one)."""
    tol = _common.tolerance(pl.col("parent_duration_ns"))
    same = (pl.col("parent_row") == pl.col("parent_row").shift(1)) & (
        pl.col("op_key") == pl.col("op_key").shift(1)
    )
    share = _common.overlap_share(
        pl.col("start_ns"), pl.col("_cum_end").shift(1), pl.col("duration_ns"), pl.col("duration_ns").shift(1)
    )
    ordered = calls.with_columns(
        (
            same
            & (
                (pl.col("start_ns") >= pl.col("_cum_end").shift(1) - tol)
                | (share < _common.MAX_SEQUENTIAL_OVERLAP_SHARE)
            )
        )
        .fill_null(False)
        .alias("_continues")
    )
    return ordered.with_columns(same.fill_null(False).alias("_same_group"))


def _concurrent_instances(ordered: pl.DataFrame) -> pl.DataFrame:
    """Per (caller service, caller operation, operation): caller instances whose calls overlap
    one another (the code makes them concurrently) and instances in all — partial counts."""
    per_instance = ordered.group_by(["parent_row", "parent_service", "parent_name", "op_key"]).agg(
        (pl.col("_same_group") & ~pl.col("_continues")).any().alias("overlaps")
    )
    return per_instance.group_by(["parent_service", "parent_name", "op_key"]).agg(
        pl.col("overlaps").sum().alias("overlapping"), pl.len().alias("instances")
    )


def _sequences(ordered: pl.DataFrame) -> pl.DataFrame:
    """One row per sequence of at least ``MIN_REPEATS`` calls, with ``keep``: on the critical
    path, not a retry burst, and above the saving floors; and ``retry``."""
    ordered = ordered.with_columns((~pl.col("_continues")).cum_sum().alias("seq_id"))
    sequences = (
        ordered.group_by("seq_id", maintain_order=True)
        .agg(
            *_common.caller_group_columns(),
            pl.col("parent_row").first(),
            pl.col("start_ns").first().alias("first_start_ns"),
            pl.col("parent_duration_ns").first(),
            pl.col("root_duration_ns").first(),
            pl.col("op_key").first(),
            pl.col("params").drop_nulls().n_unique().alias("distinct_params"),
            pl.col("params").is_not_null().any().alias("params_known"),
            (pl.col("status_code") == STATUS_ERROR).mean().alias("error_share"),
            pl.col("duration_ns").sum().alias("serial_ns"),
            pl.col("duration_ns").max().alias("longest_ns"),
        )
        .filter(pl.col("calls") >= MIN_REPEATS)
        .with_columns(
            (pl.col("longest_ns") + ((pl.col("serial_ns") - pl.col("longest_ns")) * PER_ITEM_COST_FRACTION))
            .cast(pl.Int64)
            .alias("batched_ns")
        )
        .with_columns((pl.col("serial_ns") - pl.col("batched_ns")).alias("local_saving_ns"))
        # Every loop of the caller together (a JPA entity loading two relations row by row is two loops)
        .with_columns(pl.col("local_saving_ns").sum().over("parent_row").alias("caller_saving_ns"))
    )
    on_path = pl.col("parent_on_critical_path") & pl.col("any_on_path")
    retry = (pl.col("error_share") > 0.5) & (pl.col("distinct_params") <= 1)
    floor = (pl.col("local_saving_ns") >= MIN_SAVING_NS) & (
        (pl.col("local_saving_ns") >= pl.col("root_duration_ns") * MIN_SAVING_SHARE)
        | (pl.col("caller_saving_ns") >= pl.col("parent_duration_ns") * MIN_CALLER_SHARE)
    )
    return sequences.with_columns(keep=on_path & ~retry & floor, retry=retry, on_path=on_path)


def _note_dropped(notes: NearMissSink, sequences: pl.DataFrame, rows: pl.Series) -> None:
    """One near miss per caller and operation whose sequences (the rows ``rows`` of ``sequences``,
    in order) were all too small or off the critical path (retry bursts are retry_without_backoff's).
    The span-id list is taken for each near miss's first sequence only."""
    if rows.len() == 0:
        return
    dropped = sequences.select(DROPPED_COLUMNS)[rows].with_columns(rows.alias("span_id"))
    per_caller = _common.dropped_per_caller(
        dropped,
        ["caller_service", "caller_name", "op_label"],
        (pl.col("caller_saving_ns") / pl.col("parent_duration_ns")).median().alias("caller_share"),
    )
    # (``span_id`` above is the row of the group's first sequence: its list in its place)
    per_caller = per_caller.with_columns(_span_text(sequences, per_caller["span_id"]))
    for r in per_caller.iter_rows(named=True):
        if r["on_path"] == 0:
            reason = f"{r['count']} sequences, none on the critical path"
        else:
            reason = (
                f"saving p50 {r['saving_ms']:.2f} ms < max({MIN_SAVING_NS / 1e6:g} ms, "
                f"{MIN_SAVING_SHARE:.0%} of the {r['root_ms']:.1f} ms request) and the caller's loops "
                f"save {r['caller_share']:.0%} < {MIN_CALLER_SHARE:.0%} of it"
            )
        _common.note_caller_miss(notes, KIND, r, f"{r['op_label']}: {reason}")


CALLER_OP = ["parent_service", "parent_name", "op_key"]


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``sequences`` (every sequence of ``MIN_REPEATS``+ calls, kept or not) and
    ``instances`` (per caller and operation: instances making the call ``MIN_REPEATS``+ times and
    how many of them overlap — partial counts)."""
    if ctx.spans.height == 0:
        return {}
    calls = call_children(ctx)
    if calls.height < MIN_REPEATS:
        return {}
    ordered = _ordered_calls(_common.repeated_calls(ctx, MIN_REPEATS))
    sequences = _sequences(ordered)
    if sequences.height == 0:
        return {}
    return {"sequences": sequences.drop("parent_row", "seq_id"), "instances": _concurrent_instances(ordered)}


# The order of the sequences whatever the partitioning: the callers' instances as they appear in the traces.
ORDER = ["trace_id", "parent_start_ns", "caller_span_id", "op_key", "first_start_ns"]
FINDING_KEY = ["caller_service", "caller_name", "target_service", "op_key"]
# What a finding reads of every one of its sequences (taken for its rows only; the caller's span id
# and the span-id lists taken apart, the labels of its first sequence alone)
GROUP_COLUMNS = ["trace_id", "calls", "distinct_params", "params_known", "serial_ns", "batched_ns",
                 "caller_saving_ns", "parent_duration_ns", "inferred_roles"]  # fmt: skip
DROPPED_COLUMNS = ["caller_service", "caller_name", "op_label", "trace_id", "caller_span_id", "on_path",
                   "local_saving_ns", "root_duration_ns", "caller_saving_ns", "parent_duration_ns"]  # fmt: skip
OCCURRENCE_KEY = ["trace_id", "caller_span_id", "span_id", "batched_ns"]


# The columns :func:`compact` adds: the calls' span ids as words, and the occurrence key
SPAN_WORDS = "span_id" + _common.WORDS
KEY = "_key"


def compact(rows: Rows) -> Rows:
    """The sequences as the decision holds them, made piece by piece before the pieces are
    combined (``partitions.combine``): the calls' span-id lists as the 64-bit words the ids spell
    (:data:`SPAN_WORDS`; a million span ids at 12M stored spans, ~8 MiB instead of ~30 as
    strings) and each row's occurrence key (:data:`KEY`, of :data:`OCCURRENCE_KEY`):
    :func:`_common.compact_id_lists`. Rows compacted already (or none) are returned as they are;
    :func:`decide` compacts what it is given otherwise."""
    sequences = rows.get("sequences")
    if sequences is None or KEY in sequences.columns or not sequences.height:
        return rows
    return {**rows, "sequences": _common.compact_id_lists(sequences, ["span_id"], OCCURRENCE_KEY, KEY)}


def _span_text(sequences: pl.DataFrame, at: pl.Series) -> pl.Series:
    """The calls' span-id lists (List(String)) of the rows ``at`` of compacted ``sequences``."""
    return _common.id_lists(sequences.select("span_id", SPAN_WORDS)[at], "span_id", words=False)


def _span_lists(sequences: pl.DataFrame, at: pl.Series) -> pl.Series:
    """Per row ``at`` of compacted ``sequences``: the caller's span id and its calls', as words
    (List(UInt64)) when every one of them is held so, else as text."""
    return _common.id_lists(
        sequences.select("caller_span_id", "span_id", SPAN_WORDS)[at], "span_id", "caller_span_id"
    )


def decide(rows: Rows, notes: NearMissSink) -> list[Finding]:
    """Cross-trace half: a caller's sequential share and concurrency, confidence, findings.

    Decided on the sequences' key and numeric columns (:func:`compact`: the span-id lists held as
    words, the occurrence keys hashed when the rows were compacted): the rows are ordered by an
    index sorted on :data:`ORDER` (not sorted whole: each row carries its calls' span-id list),
    and the span-id lists are taken only for the sequences a finding or a near miss names."""
    rows = compact(rows)
    sequences = rows.get("sequences")
    if sequences is None or sequences.is_empty():
        return []
    order = sequences.select(pl.arg_sort_by(ORDER, maintain_order=True)).to_series()
    flags = sequences.select(
        pl.col("keep").gather(order).alias("keep"),
        (~pl.col("keep") & ~pl.col("retry")).gather(order).alias("drop"),
    )
    _note_dropped(notes, sequences, order.filter(flags["drop"]))
    kept = order.filter(flags["keep"])
    del order, flags
    totals = rows["instances"].group_by(CALLER_OP).agg(pl.col("overlapping", "instances").sum())
    key_of = pl.concat_str(CALLER_OP, separator="\x1f")
    concurrent_share = dict(totals.select(key_of, pl.col("overlapping") / pl.col("instances")).iter_rows())
    instances = dict(totals.select(key_of, "instances").iter_rows())
    # every kept row's occurrence key at once (a key depends on its row alone), taken per finding below
    keys = sequences[KEY]
    groups = (
        sequences.select(FINDING_KEY)
        .with_row_index("_row")[kept]
        .group_by(FINDING_KEY, maintain_order=True)
        .agg(pl.col("_row"))
    )
    findings: list[Finding] = []
    for caller_service, caller_name, target_service, op_key, at in groups.iter_rows():
        at = pl.Series("_row", at, dtype=pl.UInt32)
        group = sequences.select(GROUP_COLUMNS)[at]
        first = int(at[0])
        label = str(sequences["op_label"][first])
        key = f"{caller_service}\x1f{caller_name}\x1f{op_key}"
        seen = instances.get(key, 0)
        share = concurrent_share.get(key, 0.0)
        if seen >= MIN_INSTANCES_FOR_SHARE and (
            group.height < MIN_SEQUENCE_SHARE * seen or share >= MAX_CONCURRENT_SHARE
        ):
            # the code makes these calls concurrently; sequential requests are a starved pool
            notes.note_near_miss(
                KIND,
                str(caller_service),
                str(caller_name),
                f"{label}: "
                + (
                    f"calls overlap in {share:.0%} >= {MAX_CONCURRENT_SHARE:.0%} of {seen} instances: concurrent"
                    if share >= MAX_CONCURRENT_SHARE
                    else f"one after another in {group.height} of {seen} instances < {MIN_SEQUENCE_SHARE:.0%}"
                ),
                group["trace_id"]
                .unique(maintain_order=True)
                .to_list(),  # (in the rows' order: the same every run)
                [sequences["caller_span_id"][first], *_span_text(sequences, at.head(1))[0]],
                seen,
            )
            continue
        occurrences = _occurrences(group, sequences, at, keys.gather(at))
        trace_ids = group["trace_id"].unique(maintain_order=True)
        distinct_share, params_known, median_calls = _common.parameter_stats(group)
        statement = str(sequences["op_detail"][first] or label)
        findings.append(
            _common.caller_finding(
                KIND,
                (caller_service, caller_name),
                [{"service": str(target_service), "operation": label}],
                occurrences,
                _common.batch_confidence(0.6, distinct_share, median_calls, trace_ids.len()),
                {
                    "trace_ids": trace_ids.head(MAX_EXEMPLARS).to_list(),
                    "span_ids": list(occurrences[0].span_ids[: 1 + MAX_EXEMPLARS]),
                    "calls_p50": median_calls,
                    "calls_max": int(_common.num(group["calls"].max())),
                    "serial_ms_p50": round(_common.num(group["serial_ns"].median()) / 1e6, 3),
                    "call_ms_p50": round(
                        _common.num((group["serial_ns"] / group["calls"]).median()) / 1e6, 3
                    ),
                    # None: the spans record no statement or URL, so parameters cannot be compared
                    "different_parameters": (distinct_share >= 0.5) if params_known else None,
                    "statement": statement,
                    # the caller's loops' saving as a share of the caller (the operation to change)
                    "caller_share_p50": round(
                        _common.num((group["caller_saving_ns"] / group["parent_duration_ns"]).median()), 3
                    ),
                },
                op_key,
                bool(group["inferred_roles"].any()),
            )
        )
    return findings


def _occurrences(group: pl.DataFrame, sequences: pl.DataFrame, at: pl.Series, keys: pl.Series) -> Occurrences:
    """One occurrence per sequence of ``group`` (the rows ``at`` of ``sequences``; ``keys``: their
    occurrence keys): the caller and its calls, collapsed into one call of ``batched_ns`` — the
    occurrences of :func:`_common.batch_occurrences`, with only these rows' span-id lists taken:
    at once when every row's are held as words (:func:`compact`: taken as they are, their working
    set a few copies of 8 bytes an id), else a chunk of rows at a time
    (:func:`_common.occurrences_by_chunk`: their text decoded into words a chunk at a time)."""

    def make(start: int, length: int) -> Occurrences:
        part, rows = group.slice(start, length), at.slice(start, length)
        spans = _span_lists(sequences, rows)
        return Occurrences.from_columns(
            part["trace_id"],
            spans,
            intervention=CollapseSpans,
            first=1,
            dropped=0,
            parameter=part["batched_ns"].cast(pl.Int64),  # (int(): toward zero)
            numbers=_common.per_unit(
                part,
                {
                    "calls": ("calls", 1),
                    "distinct_parameters": ("distinct_params", 1),
                    "serial_ms": ("serial_ns", 1e6),
                    "batched_ms": ("batched_ns", 1e6),
                },
            ),
            keys=keys.slice(start, length),
        )

    if not sequences[SPAN_WORDS].null_count():  # (held as words: no text to decode, no chunks)
        return make(0, group.height)
    return _common.occurrences_by_chunk(group.height, make)


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)
