"""fanout_straggler: a parallel fan-out held back by its slowest branch.

Rule
----
A *fan-out* is a group of at least ``MIN_BRANCHES`` (3) blocking children of one parent that share
one operation (same child service and span name, and for generic HTTP client names such as ``GET``
the same endpoint shape: the route, or the URL path with its numeric segments masked, so calls to
``/shards/3/search`` group while a ``GET`` to another endpoint does not) and all run at the same
time: every child starts
before the earliest-finishing child ends (``max(start) < min(end)``). A fan-out that starts its
children in waves is a concurrency limit, not a straggler (see ``fanout_concurrency_limit``).

The fan-out has a *straggler* when its slowest child dominates:

* ``max >= STRAGGLER_RATIO (2.0) × median`` of the children's durations — the parent waits at least
  twice as long as a typical branch needs; below 2× the spread is ordinary jitter and hedging would
  add load for little gain;
* ``max - median >= MIN_EXCESS_NS (5 ms)`` — shaving less than 5 ms is not worth a recommendation and
  is within timer noise of many exporters;
* the straggler is on the trace's critical path — otherwise shortening it saves nothing at the root.

Every child that passes the first two tests is a straggler of that fan-out; the occurrence shortens
each of them to the median branch duration (``ShortenSpan(span, duration - median)``) and the
what-if engine measures what that saves at the root.

Skew or tail
------------
Occurrences are aggregated across traces by (parent service, parent operation, child service,
child operation). For each occurrence the slowest branch is identified by the first of these that
tells the siblings apart: a shard/partition/bucket/replica attribute (``hints``), the peer
(``peer.service`` / ``server.address``), the host of the server span that answered the call, the
call's URL without its query string (``/shards/3/search``), the child's own host, and finally the
branch's launch position. If one branch is the slowest in
``SKEW_SHARE`` (60 %) or more of at least ``MIN_TRACES_FOR_PATTERN`` (3) occurrences — far above the
``1/n`` a random tail gives — the pattern is ``"skew"`` (a hot shard/host: rebalance or split it);
otherwise ``"tail"`` (random slowness: hedged requests, per-branch timeouts). With fewer than three
occurrences the pattern is ``"undetermined"``.

No finding when the fan-outs are balanced, or when stragglers are rare: a signature needs
``MIN_STRAGGLER_RATE`` (10 %) of its fan-outs to straggle. Balanced fan-outs on a busy host throw
an occasional 2× branch (3 % of the sample workload's healthy review searches); a tail worth
hedging is a systematic one.

Confidence starts at 0.55 and rises with the number of traces (+0.15 at 5, +0.1 at 20), with the
straggler rate (+0.1 when at least half the fan-outs straggle) and with an identified skewed branch
(+0.05); capped at 0.95.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import (
    NearMissSink,
    Rows,
    fanout_finding,
    occurrences_by_chunk,
    sibling_groups,
    sorted_partitions,
    stat,
    target_operation,
    with_span_columns,
)
from hourglass.analysis.model import Finding, Occurrences, ShortenSpan
from hourglass.collector.schema import KIND_SERVER

KIND = "fanout_straggler"
MIN_BRANCHES = 3
STRAGGLER_RATIO = 2.0
MIN_EXCESS_NS = 5_000_000
SKEW_SHARE = 0.6
MIN_TRACES_FOR_PATTERN = 3
MIN_STRAGGLER_RATE = 0.10

_CHILD_COLUMNS = [
    "trace_id",
    "span_id",
    "parent_span_id",
    "service",
    "name",
    "on_critical_path",
    "peer",
    "host",
    "hints",
    "http_url",
]
# A shard/partition-like attribute value inside the hints JSON object.
_SHARD_HINT = r'"[^"]*(?:shard|partition|bucket|replica)[^"]*"\s*:\s*"?([^",}\]]+)'


def _branch_labels(spans: pl.DataFrame, kids: pl.DataFrame) -> pl.DataFrame:
    """Adds ``branch`` and ``branch_source``: the first identity that tells siblings apart."""
    # The host of the server span that answered each branch (its child), found by row numbers.
    server_hosts = (
        spans.lazy()
        .filter(
            (pl.col("kind") == KIND_SERVER)
            & pl.col("host").is_not_null()
            & pl.col("parent_row").is_in(kids["row"].cast(pl.Int64).implode())
        )
        .select(row=pl.col("parent_row").cast(pl.UInt32), server_host=pl.col("host"))
        .unique(subset=["row"], keep="first")
    )
    kids = (
        kids.lazy()
        # siblings that start together numbered by span id: the rank's ties follow the rows' order,
        # which the unordered joins before left to the run ("position 0" in one run of a report,
        # "position 1" in the next, for the same fan-out)
        .sort(["group_id", "start_ns", "span_id"])
        .join(server_hosts, on="row", how="left", maintain_order="left")
        .with_columns(
            shard=pl.col("hints").str.extract(_SHARD_HINT, 1),
            url=pl.col("http_url").str.replace(r"[?#].*$", ""),
            position=(pl.col("start_ns").rank("ordinal").over("group_id") - 1).cast(pl.Utf8),
        )
        .collect()
    )
    candidates = ["shard", "peer", "server_host", "url", "host"]
    distinct = kids.group_by("group_id").agg(
        [(pl.col(c).n_unique() > 1) & pl.col(c).is_not_null().all() for c in candidates]
    )
    choose_label: Any = pl.when(pl.lit(False)).then(pl.lit(None, pl.Utf8))
    choose_source: Any = pl.when(pl.lit(False)).then(pl.lit(None, pl.Utf8))
    for c in candidates:
        choose_label = choose_label.when(pl.col(f"{c}_distinct")).then(pl.col(c))
        choose_source = choose_source.when(pl.col(f"{c}_distinct")).then(pl.lit(c))
    distinct = distinct.rename({c: f"{c}_distinct" for c in candidates})
    return (
        kids.join(distinct, on="group_id", how="left")
        .with_columns(
            branch=choose_label.otherwise(pl.lit("position ") + pl.col("position")),
            branch_source=choose_source.otherwise(pl.lit("position")),
        )
        .drop([*(f"{c}_distinct" for c in candidates), "shard", "url", "position", "server_host"])
    )


SIGNATURE = ["parent_service", "parent_name", "service", "name", "endpoint"]
# an occurrence's span ids and how much each straggler is shortened
ID_LISTS = ["child_ids", "straggler_ids"]
KEY = "_key"
KEYED = ["trace_id", "parent_span_id", "child_ids", "straggler_ids", "shorten_by"]
# what a finding takes of its rows only, when it makes their occurrences (:func:`compact`'s columns)
LISTS = [*ID_LISTS, "shorten_by", *(c + _common.WORDS for c in ID_LISTS), KEY]


def compact(rows: Rows) -> Rows:
    """The occurrences as the decision holds them, made piece by piece before the pieces are
    combined (``partitions.combine``): the branches' and stragglers' span-id lists as the words
    the ids spell, and each row's occurrence key (:func:`_common.compact_id_lists`). Rows
    compacted already (or none) are returned as they are; :func:`decide` compacts what it is given."""
    occurrences = rows.get("occurrences")
    if occurrences is None or KEY in occurrences.columns or not occurrences.height:
        return rows
    return {**rows, "occurrences": _common.compact_id_lists(occurrences, ID_LISTS, KEYED, KEY)}


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``occurrences`` (one row per fan-out whose straggler is on the critical
    path, with its branches and the straggler shortening) and ``fanouts`` (parallel fan-outs seen
    per signature, a partial count that :func:`decide` sums)."""
    spans = ctx.spans
    kids = sibling_groups(ctx, MIN_BRANCHES)
    # Fan-outs that ran fully in parallel: every child started before the first one finished.
    kids = kids.filter(pl.col("last_start_ns") < pl.col("first_end_ns"))
    if kids.is_empty():
        return {}
    sig = SIGNATURE
    groups = kids.group_by("group_id").agg(
        pl.col(["row", "parent_row"]).first(),
        median_ns=pl.col("duration_ns").median(),
        max_ns=pl.col("duration_ns").max(),
    )
    generic = _common.generic_names(ctx)
    groups = with_span_columns(spans, groups, [*sig, "trace_id"], generic)
    straggles = (pl.col("max_ns") >= STRAGGLER_RATIO * pl.col("median_ns")) & (
        (pl.col("max_ns") - pl.col("median_ns")) >= MIN_EXCESS_NS
    )
    # Per signature (partial aggregates the decision adds up): fan-outs seen, and for the near
    # miss of a balanced signature, how close its fan-outs came to straggling.
    # (the fan-outs are not sorted first: the decision sums these rows per signature, whatever
    # their order, and the first five trace ids are the five smallest either way)
    fanouts_seen = (
        groups.with_columns(straggles=straggles)
        .group_by(sig)
        .agg(
            fanouts_seen=pl.len(),
            straggling=pl.col("straggles").sum(),
            ratio_max=(pl.col("max_ns") / pl.col("median_ns").clip(1)).max(),
            excess_max_ns=(pl.col("max_ns") - pl.col("median_ns")).max(),
            traces=pl.col("trace_id").n_unique(),
            trace_ids=pl.col("trace_id").unique().sort().head(5),
        )
    )
    groups = groups.filter(straggles)
    kids = kids.join(groups.select("group_id", "median_ns"), on="group_id", how="inner")
    kids = with_span_columns(
        spans, kids, [*_CHILD_COLUMNS, "parent_service", "parent_name", "endpoint"], generic
    )
    kids = kids.with_columns(
        is_straggler=(pl.col("duration_ns") >= STRAGGLER_RATIO * pl.col("median_ns"))
        & ((pl.col("duration_ns") - pl.col("median_ns")) >= MIN_EXCESS_NS),
        is_slowest=pl.col("duration_ns").rank("ordinal", descending=True).over("group_id") == 1,
    )
    hit_groups = kids.filter(pl.col("is_slowest") & pl.col("on_critical_path")).select("group_id")
    # Straggling fan-outs whose slowest branch is off the critical path (near misses when a
    # signature has no other).
    off_path = (
        kids.filter(pl.col("is_slowest"))
        .join(hit_groups, on="group_id", how="anti")
        .sort("trace_id", "span_id")
        .group_by(sig, maintain_order=True)
        .agg(
            fanouts=pl.len(),
            traces=pl.col("trace_id").n_unique(),
            trace_ids=pl.col("trace_id").unique(maintain_order=True).head(5),
            span_ids=pl.col("span_id").head(5),
        )
    )
    if hit_groups.is_empty():
        return {"fanouts": fanouts_seen, "off_path": off_path}
    kids = kids.join(hit_groups, on="group_id", how="semi")
    kids = _branch_labels(spans, kids)
    occurrences = (
        # span_id breaks start ties (fan-out children often start together): a stable report
        kids.sort(["group_id", "start_ns", "span_id"])
        .group_by("group_id", maintain_order=True)
        .agg(
            pl.col([*sig, "trace_id", "parent_span_id", "n", "median_ns"]).first(),
            child_ids=pl.col("span_id"),
            straggler_ids=pl.col("span_id").filter(pl.col("is_straggler")),
            shorten_by=(pl.col("duration_ns") - pl.col("median_ns"))
            .filter(pl.col("is_straggler"))
            .cast(pl.Int64),
            max_ns=pl.col("duration_ns").max(),
            slow_branch=pl.col("branch").sort_by("duration_ns", descending=True, maintain_order=True).first(),
            branch_source=pl.col("branch_source").first(),
            root_start=pl.col("start_ns").min(),
        )
        .drop("group_id")
    )
    return {"occurrences": occurrences, "fanouts": fanouts_seen, "off_path": off_path}


def decide(rows: Rows, notes: NearMissSink) -> list[Finding]:
    """Cross-trace half: straggler rate, skew or tail, confidence — on :func:`extract`'s rows of
    any number of partitions."""
    rows = compact(rows)
    fanouts = rows.get("fanouts")
    if fanouts is None or fanouts.is_empty():
        return []
    first_ids = (
        pl.col("trace_ids").list.explode(keep_nulls=False, empty_as_null=False).unique().sort().head(5)
    )
    fanouts_seen = fanouts.group_by(SIGNATURE).agg(
        pl.col("fanouts_seen", "straggling", "traces").sum(),
        pl.col("ratio_max", "excess_max_ns").max(),
        trace_ids=first_ids,
    )
    _note_balanced(notes, fanouts_seen)
    occurrences = rows.get("occurrences")
    found = occurrences.select(SIGNATURE).unique() if occurrences is not None and occurrences.height else None
    off_path = rows.get("off_path")
    if off_path is not None and off_path.height:
        off = (
            off_path.sort(pl.col("trace_ids").list.first())
            .group_by(SIGNATURE, maintain_order=True)
            .agg(
                pl.col("fanouts", "traces").sum(),
                trace_ids=first_ids,
                span_ids=pl.col("span_ids").first(),
            )
        )
        if found is not None:
            off = off.join(found, on=SIGNATURE, how="anti")
        _note_off_critical_path(notes, off)
    if occurrences is None or occurrences.is_empty():
        return []
    # each signature's occurrences in order, one signature copied at a time (not every row joined
    # with its signature's count, sorted, then split); the count joined per signature
    counts = fanouts_seen.select(*SIGNATURE, "fanouts_seen")
    # the span-id lists stay where they are (``_row``: a row's position): a finding takes its
    # rows' lists a chunk at a time, when it makes their occurrences
    lists = occurrences.select(LISTS)
    findings: list[Finding] = []
    for signature in sorted_partitions(
        occurrences.drop(LISTS).with_row_index("_row"),
        SIGNATURE,
        ["root_start", "trace_id", "parent_span_id"],
    ):
        count = signature.head(1).select(SIGNATURE).join(counts, on=SIGNATURE, how="left")["fanouts_seen"]
        frame = signature.with_columns(pl.lit(count[0], count.dtype).alias("fanouts_seen"))
        finding = _finding(frame, lists, notes)
        if finding is not None:
            findings.append(finding)
    return findings


def _note_balanced(notes: NearMissSink, fanouts: pl.DataFrame) -> None:
    """Near misses: parallel fan-outs of a signature where no fan-out has a straggler (one row per
    signature)."""
    for r in fanouts.filter(pl.col("straggling") == 0).sort(SIGNATURE).iter_rows(named=True):
        notes.note_near_miss(
            KIND,
            r["parent_service"],
            r["parent_name"],
            f"balanced fan-out to {r['service']} {target_operation(r['name'], r['endpoint'])}: slowest branch at most "
            f"{r['ratio_max']:.2g}x the median (at most +{r['excess_max_ns'] / 1e6:.3g} ms) in {r['fanouts_seen']} "
            f"fan-outs; a straggler needs >= {STRAGGLER_RATIO:g}x and +{MIN_EXCESS_NS / 1e6:g} ms",
            trace_ids=r["trace_ids"],
            traces=r["traces"],
        )


def _note_off_critical_path(notes: NearMissSink, off: pl.DataFrame) -> None:
    """Near misses: signatures whose straggling fan-outs all had their slowest branch off the
    critical path (shortening it would save nothing at the root)."""
    for r in off.sort(SIGNATURE).iter_rows(named=True):
        notes.note_near_miss(
            KIND,
            r["parent_service"],
            r["parent_name"],
            f"straggler to {r['service']} {target_operation(r['name'], r['endpoint'])} off the critical path in all "
            f"{r['fanouts']} straggling fan-outs: shortening it saves nothing at the root",
            trace_ids=r["trace_ids"],
            span_ids=r["span_ids"],
            traces=r["traces"],
        )


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)


def _finding(frame: pl.DataFrame, lists: pl.DataFrame, notes: NearMissSink | None = None) -> Finding | None:
    """A signature's finding from its fan-outs ``frame`` (their span-id lists: the rows ``_row``
    of ``lists``), or None (a near miss when ``notes``)."""
    first = frame.row(0, named=True)
    traces = frame["trace_id"].n_unique()
    fanouts_seen = int(first["fanouts_seen"])
    rate = frame.height / fanouts_seen if fanouts_seen else 1.0
    if rate < MIN_STRAGGLER_RATE:
        if notes is not None:
            notes.note_near_miss(
                KIND,
                first["parent_service"],
                first["parent_name"],
                f"stragglers to {first['service']} {target_operation(first['name'], first['endpoint'])} in {frame.height} "
                f"of {fanouts_seen} fan-outs ({rate:.0%}) < {MIN_STRAGGLER_RATE:.0%}: occasional, not systematic",
                trace_ids=frame["trace_id"].unique(maintain_order=True).head(5).to_list(),
                traces=traces,
            )
        return None

    branch_counts = frame["slow_branch"].value_counts(sort=True)
    top_branch = str(branch_counts[0, "slow_branch"])
    top_share = float(branch_counts[0, "count"]) / frame.height
    if traces < MIN_TRACES_FOR_PATTERN:
        pattern = "undetermined"
    elif top_share >= SKEW_SHARE:
        pattern = "skew"
    else:
        pattern = "tail"
    branch_source = frame["branch_source"].mode().sort().item(0)

    ratio = frame["max_ns"] / frame["median_ns"]
    excess = frame["max_ns"] - frame["median_ns"]
    # the parent and its children, each straggler shortened to the median: made in columns, no
    # object per occurrence (``Occurrences.from_columns``); the numbers divided by numpy (as Python)
    median_ns = frame["median_ns"].cast(pl.Float64).to_numpy()
    max_ns = frame["max_ns"].cast(pl.Float64).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        over = np.where(median_ns != 0, max_ns / median_ns, np.inf)  # (``if median_ns``: 0 -> inf)

    def make(start: int, length: int) -> Occurrences:  # (a chunk of rows at a time: occurrences_by_chunk)
        part, rows = frame.slice(start, length), slice(start, start + length)
        part = pl.concat([part, lists[part["_row"]]], how="horizontal")
        spans = _common.id_lists(part, "child_ids", "parent_span_id")
        stragglers = _common.id_lists(part, "straggler_ids", words=spans.dtype == pl.List(pl.UInt64))
        return Occurrences.from_columns(
            part["trace_id"],
            spans,
            intervention=ShortenSpan,
            shortened=(stragglers, part["shorten_by"]),
            numbers={
                "branches": part["n"].cast(pl.Float64),
                "median_ms": median_ns[rows] / 1e6,
                "max_ms": max_ns[rows] / 1e6,
                "max_over_median": over[rows],
                "stragglers": stragglers.list.len().cast(pl.Float64),
            },
            keys=part[KEY],
        )

    occurrences = occurrences_by_chunk(frame.height, make)
    confidence = 0.55
    confidence += 0.15 if traces >= 5 else 0.0
    confidence += 0.10 if traces >= 20 else 0.0
    confidence += 0.10 if rate >= 0.5 else 0.0
    confidence += 0.05 if pattern == "skew" and branch_source != "position" else 0.0
    evidence = {
        "pattern": pattern,
        "slow_branch": top_branch,
        "slow_branch_share": round(top_share, 3),
        "branch_identity": branch_source,
        "branches_p50": stat(frame["n"]),
        "fanouts_seen": fanouts_seen,
        "fanouts_with_straggler": frame.height,
        "straggler_rate": round(rate, 3),
        "median_branch_ms_p50": stat(frame["median_ns"], scale=1e6),
        "slowest_branch_ms_p50": stat(frame["max_ns"], scale=1e6),
        "slowest_branch_ms_p95": stat(frame["max_ns"], 0.95, 1e6),
        "max_over_median_p50": stat(ratio),
        "excess_ms_p50": stat(excess, scale=1e6),
        "excess_ms_p95": stat(excess, 0.95, 1e6),
    }
    return fanout_finding(KIND, first, occurrences, confidence, evidence)
