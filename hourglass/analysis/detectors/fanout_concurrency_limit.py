"""fanout_concurrency_limit: a fan-out that runs at most k of its n children at a time.

Rule
----
Siblings are the blocking children of one parent that share one operation (same child service,
span name and endpoint shape, as for ``fanout_straggler``); a group needs ``n >= MIN_CHILDREN`` (3) of them. Their concurrency is measured with a
sweep: a +1 event at each start, a -1 event at each end (moved ``OVERLAP_TOLERANCE`` earlier, at most
0.5 ms or 5 % of the child's duration, so that back-to-back children whose clocks disagree by a hair
do not count as overlapping), sorted, and summed cumulatively. ``k`` is the largest concurrency
reached. One fan-out is capped when all of these hold:

* ``1 <= k < n`` — some children had to wait for a free slot;
* the first wave fills the pool: exactly ``k`` children start together at the beginning (within
  ``LAUNCH_TOLERANCE``: 1 ms or 10 % of the mean child duration, whichever is larger). A loop that
  issues calls one after another with slight overlaps starts them one by one and fails this;
* the cap is hit again and again: the number of starts that bring the concurrency up to ``k`` is at
  least ``max(2, n // k)``, the number of full rounds a pool of ``k`` needs for ``n`` tasks (the last,
  partial round never reaches ``k``). Calls that just happen to overlap reach their peak once, not
  every round.

No rule asks the next child to start the instant a slot frees: a semaphore often also covers work
after the call, and a busy event loop delays the hand-over (the sample workload shows 2-40 ms
gaps), so the hand-over gap is reported (``handover_gap_ms_p50``), not required.

Across traces (signature: parent service, parent operation, child service, child operation) a real
cap shows in most fan-outs wide enough to hit it: at least ``MIN_CAPPED_RATE`` (50 %) of the
signature's fan-outs with more than ``k`` children must be capped, or there is no finding.

``k = 1`` is a strictly sequential loop; it is left to ``serialized_calls``/``n_plus_one`` unless there
is pool evidence — a hint attribute or event on the parent or a child whose key names a pool, worker,
semaphore or concurrency/parallelism setting — because the fix for a pool of one (raise the cap) is
different from the fix for a loop (issue the calls together).

Every occurrence asks the what-if engine to start all ``n`` children together
(``RunConcurrently``): the cap lifted. Evidence reports the usual ``k`` and ``n``, how consistent
``k`` is, and the time spent queued for a slot: ``queued_ms_p50``/``p95`` per queued call (its
start minus the fan-out's first start, averaged over the calls that were not in the first wave)
and ``queued_total_ms_p50`` summed over a fan-out's children.

No finding for a fully parallel fan-out (``k = n``), for children that overlap only now and then,
or for a plain sequential loop without pool evidence.

Shared pool across requests
---------------------------
A pool shared by all concurrent requests (HotROD's route workers) caps the *operation*, not one
fan-out: inside one trace the calls run 1 to k at a time and the rules above fail. For a
signature the per-fan-out rule did not report, the calls of its queued fan-outs (some children
overlap, not all ran at once) are swept together, across traces. It is a shared pool of
``k`` (the largest concurrency reached) when all of these hold:

* at least ``MIN_SHARED_CALLS`` (30) calls in ``MIN_SHARED_TRACES`` (5) traces, and ``k >= 2``
  (one at a time across requests is a lock: ``lock_contention``);
* saturation: at least ``MIN_SATURATION`` (80 %) of the calls start by bringing the concurrency
  up to exactly ``k`` — the pool is full nearly every time a call gets in;
* hand-over: at least ``MIN_HANDOVER`` (50 %) of the calls start within ``HANDOVER_TOLERANCE``
  (1 ms or 5 % of the median call) after another call of the signature ended, and at least
  ``MIN_CROSS_TRACE_HANDOVER`` (20 %) after one *of another trace* ended. A per-request loop
  hands over only to itself; unrelated traffic starts at random concurrency levels.

Evidence adds ``shared_across_traces``, ``calls``, ``saturation``, ``handover_rate`` and
``cross_trace_handover_rate``; confidence starts at 0.6, +0.1 at 20 traces, +0.1 for saturation
of 90 %, +0.05 for pool evidence; capped at 0.9. The what-if is the same: each fan-out's
children all start together.

Confidence starts at 0.6 and rises with the number of traces (+0.1 at 5, +0.1 at 20), with a
consistent ``k`` (+0.1 when one value covers 80 % of occurrences) and with pool evidence (+0.05);
capped at 0.95.
"""

from __future__ import annotations

import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common
from hourglass.analysis.detectors._common import (
    NearMissSink,
    Rows,
    fanout_finding,
    occurrence_keys,
    occurrences_by_chunk,
    per_unit,
    sibling_groups,
    sorted_partitions,
    stat,
    target_operation,
    with_span_columns,
)
from hourglass.analysis.model import Finding, Occurrences, RunConcurrently

KIND = "fanout_concurrency_limit"
ROWS_FORMAT = 2  # 2: capped fan-outs carry their calls' starts and ends; pool_calls holds the others
MIN_CHILDREN = 3
OVERLAP_TOLERANCE_NS = 500_000
OVERLAP_TOLERANCE_SHARE = 0.05
LAUNCH_TOLERANCE_NS = 1_000_000
LAUNCH_TOLERANCE_SHARE = 0.10
MIN_CAPPED_RATE = 0.5
MIN_SHARED_CALLS = 30
MIN_SHARED_TRACES = 5
MIN_SATURATION = 0.8
MIN_HANDOVER = 0.5
MIN_CROSS_TRACE_HANDOVER = 0.2
HANDOVER_TOLERANCE_NS = 1_000_000
HANDOVER_TOLERANCE_SHARE = 0.05
SIGNATURE = ["parent_service", "parent_name", "service", "name", "endpoint"]
# A hint key (JSON object key) or an event name that speaks of a pool or a concurrency cap.
_POOL_HINT = r'(?i)"[^"]*(?:pool|worker|semaphore|concurren|parallelism|max_in_flight|permits?)[^"]*"\s*:'
_POOL_EVENT = r"(?i)pool|worker|semaphore|permit|slot"


def _pool_evidence_groups(spans: pl.DataFrame, kids: pl.DataFrame) -> pl.Series:
    """The group ids whose children or parent carry a pool hint attribute or a pool event."""
    has_hint = pl.col("hints").str.contains(_POOL_HINT).fill_null(False)
    has_event = (
        pl.col("event_names").list.eval(pl.element().str.contains(_POOL_EVENT)).list.any().fill_null(False)
    )
    flagged_rows = (
        spans.lazy()
        .filter(pl.col("hints").is_not_null() | (pl.col("event_names").list.len() > 0))
        .filter(has_hint | has_event)
        .select(pl.col("row").cast(pl.Int64))
        .collect()
        .to_series()
        .implode()
    )
    flagged = kids.filter(
        pl.col("row").cast(pl.Int64).is_in(flagged_rows) | pl.col("parent_row").is_in(flagged_rows)
    )
    return flagged["group_id"].unique()


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``widths`` (fan-outs per signature and width, a partial count),
    ``fanouts`` (one row per capped fan-out of the per-fan-out rule, with its children's starts and
    ends) and ``pool_calls`` (the calls of the other queued fan-outs whose children overlap). The
    shared-pool rule sweeps, across traces, the calls of every queued fan-out whose children
    overlap: those of ``pool_calls`` and those of the capped fan-outs marked ``in_pool``, taken
    from their ``fanouts`` rows only for the signatures it judges (:func:`_pool_calls`) — on
    serve's soak nearly every such call is a capped fan-out's of a signature the per-fan-out rule
    reports, so the decision neither holds nor reads a row per call for them. Fan-outs are
    keyed by ``fanout_id``, a hash of the trace, the parent span and the signature, so partitions
    never collide."""
    spans = ctx.spans
    all_kids = sibling_groups(ctx, MIN_CHILDREN)
    if all_kids.is_empty():
        return {}
    generic = _common.generic_names(ctx)
    widths = (
        with_span_columns(
            spans,
            all_kids.group_by("group_id").agg(pl.col(["row", "parent_row", "n"]).first()),
            SIGNATURE,
            generic,
        )
        .group_by([*SIGNATURE, "n"])
        .agg(fanouts=pl.len())
    )
    # Fully parallel fan-outs (every child started before the first ended) cannot be capped.
    queued_kids = all_kids.filter(pl.col("last_start_ns") >= pl.col("first_end_ns"))
    if queued_kids.is_empty():
        return {"widths": widths}
    pooled = _pool_evidence_groups(spans, queued_kids)
    overlapping = _overlapping_groups(queued_kids)
    capped, uncapped = _capped_fanouts(spans, queued_kids, pooled, overlapping, generic)
    # a capped fan-out's calls are kept once, in its ``fanouts`` row (its children's ids, starts
    # and ends): the shared-pool rule takes them from there for the signatures it judges
    folded = capped.filter("in_pool")["group_id"] if capped.height else pl.Series("group_id", [], pl.UInt64)
    return {
        "widths": widths,
        "fanouts": capped.drop("group_id") if capped.height else capped,
        "uncapped": uncapped,
        "pool_calls": _overlapping_calls(
            spans,
            queued_kids.filter(~pl.col("group_id").is_in(folded.implode())),
            pooled,
            overlapping,
            generic,
        ),
    }


KEY = "_key"
KEYED = ["trace_id", "parent_span_id", "child_ids"]
# what a finding takes of its fan-outs' rows only, when it makes their occurrences (:func:`compact`'s)
LISTS = ["child_ids", "child_ids" + _common.WORDS, KEY]


def compact(rows: Rows) -> Rows:
    """The fan-outs as the decision holds them, made piece by piece before the pieces are combined
    (``partitions.combine``): the children's span-id lists as the words the ids spell, and each
    row's occurrence key (:func:`_common.compact_id_lists`). Rows compacted already (or none) are returned
    as they are; :func:`decide` compacts what it is given."""
    fanouts = rows.get("fanouts")
    if fanouts is None or KEY in fanouts.columns or not fanouts.height:
        return rows
    return {**rows, "fanouts": _common.compact_id_lists(fanouts, ["child_ids"], KEYED, KEY)}


def decide(rows: Rows, notes: NearMissSink) -> list[Finding]:
    """Cross-trace half: the capped rate per signature, and the shared-pool sweep across traces."""
    rows = compact(rows)
    misses: list[Miss] = []  # (signature, reason, traces, count)
    _no_cap_misses(rows.get("uncapped"), rows.get("fanouts"), misses)
    fanouts = rows.get("fanouts")
    per_fanout = (
        None
        if fanouts is None or fanouts.is_empty()
        else fanouts.drop("child_starts", "child_ends", "in_pool")
    )
    findings = _per_fanout_findings(per_fanout, rows.get("widths"), misses)
    del per_fanout
    found = {tuple(f.evidence["signature"]) for f in findings}
    findings += _shared_pool_findings(_pool_calls(rows.get("pool_calls"), fanouts, found), found, misses)
    found = {tuple(f.evidence["signature"]) for f in findings}
    noted: set[tuple[str, ...]] = set()
    for signature, reason, trace_ids, traces in misses:  # one per signature: the first rule it failed
        if signature in found or signature in noted:
            continue
        noted.add(signature)
        parent_service, parent_name, service, name, endpoint = signature
        notes.note_near_miss(
            KIND,
            parent_service,
            parent_name,
            f"{service} {target_operation(name, endpoint)}: {reason}",
            trace_ids=trace_ids,
            traces=traces,
        )
    for finding in findings:
        del finding.evidence["signature"]
    return findings


Miss = tuple[tuple[str, ...], str, list[str], int]


def _signature_misses(frame: pl.DataFrame, reason: pl.Expr, misses: list[Miss]) -> None:
    """Appends one near miss per signature of ``frame`` (one row per fan-out or call, with
    SIGNATURE and trace_id), ``reason`` an aggregate expression giving the text (one that does not
    depend on the order of a signature's rows: the rows are not sorted, each signature's first
    trace ids are)."""
    rows = (
        frame.group_by(SIGNATURE)
        .agg(
            reason=reason,
            trace_ids=pl.col("trace_id").unique().sort().head(5),
            traces=pl.col("trace_id").n_unique(),
        )
        .sort(SIGNATURE)
    )
    for r in rows.iter_rows(named=True):
        misses.append(
            (tuple(str(r[c]) for c in SIGNATURE), str(r["reason"]), list(r["trace_ids"]), r["traces"])
        )


def _no_cap_misses(uncapped: pl.DataFrame | None, capped: pl.DataFrame | None, misses: list[Miss]) -> None:
    """Signatures none of whose queued fan-outs showed a cap (counts per shape, from every part)."""
    if uncapped is None or uncapped.is_empty():
        return
    if capped is not None and capped.height:
        uncapped = uncapped.join(capped.select(SIGNATURE).unique(), on=SIGNATURE, how="anti")
    weighted = [pl.col(c).repeat_by("count").list.explode() for c in ("k", "n", "first_wave")]
    rows = (
        uncapped.group_by(SIGNATURE)
        .agg(
            fanouts=pl.col("count").sum(),
            k=weighted[0].median().round(0).cast(pl.Int64),
            n=weighted[1].median().round(0).cast(pl.Int64),
            first_wave=weighted[2].median().round(0).cast(pl.Int64),
            traces=pl.col("traces").sum(),
            trace_ids=pl.col("trace_ids")
            .list.explode(keep_nulls=False, empty_as_null=False)
            .unique()
            .sort()
            .head(5),
        )
        .sort(SIGNATURE)
    )
    for r in rows.iter_rows(named=True):
        misses.append(
            (
                tuple(str(r[c]) for c in SIGNATURE),
                f"no pool cap in {r['fanouts']} queued fan-outs: the first wave does not fill a pool of k or k is "
                f"reached once (k p50 {r['k']}, n p50 {r['n']}, first wave p50 {r['first_wave']})",
                list(r["trace_ids"]),
                int(r["traces"]),
            )
        )


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)


def _fanout_id() -> pl.Expr:
    return pl.struct("trace_id", "parent_span_id", *SIGNATURE).hash().alias("fanout_id")


def _concurrency_sweep(calls: pl.DataFrame, key: str, end_column: str) -> pl.DataFrame:
    """Concurrency of the calls per ``key``: a +1 event at each start and a -1 event at each
    ``end_column``, sorted by (key, time, delta) so that ends at the same instant come before
    starts; the cumulative sum over the whole frame is the per-key concurrency because every key's
    deltas sum to zero. Columns: key, t, delta, concurrency and ``k``, the key's maximum (no span
    column: events tied on (key, t, delta) are alike, so their order changes no figure, and the
    shared-pool rule sweeps every pooled call across traces at once)."""
    starts = calls.select(key, t=pl.col("start_ns"), delta=pl.lit(1, pl.Int32))
    ends = calls.select(key, t=pl.col(end_column), delta=pl.lit(-1, pl.Int32))
    sweep = (
        pl.concat([starts, ends])
        .sort([key, "t", "delta"])
        .with_columns(concurrency=pl.col("delta").cum_sum())
    )
    return sweep.join(sweep.group_by(key).agg(k=pl.col("concurrency").max()), on=key)


def _capped_fanouts(
    spans: pl.DataFrame,
    kids: pl.DataFrame,
    pooled: pl.Series,
    overlapping: pl.Series,
    generic: pl.Series | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The per-fan-out rule (module doc, first part) inside each trace: the capped fan-outs (with
    their ``group_id``; ``in_pool`` when their children overlap, ``overlapping``), and the others
    counted per signature and shape."""
    # Cheap pre-filter before the sweep: a cap of k >= 2 starts at least two children together;
    # k = 1 needs pool evidence. Sequential loops (most sibling groups) stop here.
    launch_tol = pl.max_horizontal(
        pl.lit(LAUNCH_TOLERANCE_NS), (pl.col("duration_ns").mean() * LAUNCH_TOLERANCE_SHARE).cast(pl.Int64)
    )
    early = kids.group_by("group_id").agg(
        launch_tol_ns=launch_tol,
        first_wave=(pl.col("start_ns") <= pl.col("first_start_ns").first() + launch_tol).sum(),
    )
    early = early.filter((pl.col("first_wave") >= 2) | pl.col("group_id").is_in(pooled.implode()))
    if early.is_empty():
        return pl.DataFrame(), pl.DataFrame()
    kids = kids.join(early.select("group_id", "launch_tol_ns"), on="group_id", how="inner")
    kids = with_span_columns(spans, kids, [*SIGNATURE, "trace_id", "span_id", "parent_span_id"], generic)

    overlap_tol = pl.min_horizontal(
        pl.lit(OVERLAP_TOLERANCE_NS), (pl.col("duration_ns") * OVERLAP_TOLERANCE_SHARE).cast(pl.Int64)
    )
    kids = kids.with_columns(sweep_end_ns=pl.col("end_ns") - overlap_tol)

    sweep = _concurrency_sweep(kids, "group_id", "sweep_end_ns")
    k_per_group = sweep.group_by("group_id").agg(pl.col("k").first())
    # Each start that brings the concurrency up to k is one time the cap was hit.
    cap_hits = sweep.group_by("group_id").agg(
        cap_hits=((pl.col("delta") == 1) & (pl.col("concurrency") == pl.col("k"))).sum()
    )
    kids = kids.join(k_per_group, on="group_id").join(cap_hits, on="group_id")

    # The latest sibling end at or before each child's start: the slot it took over.
    ends_sorted = (
        kids.select("group_id", prev_end_ns=pl.col("sweep_end_ns"))
        .sort("prev_end_ns")
        .with_columns(t=pl.col("prev_end_ns"))
    )
    kids = (
        kids.with_columns(t=pl.col("start_ns"))
        .sort("t")
        .join_asof(ends_sorted, on="t", by="group_id", strategy="backward", check_sortedness=False)
        .drop("t")
    )
    first_wave = pl.col("start_ns") <= pl.col("first_start_ns") + pl.col("launch_tol_ns")
    fanouts = (
        kids.with_columns(first_wave=first_wave)
        .sort(["group_id", "start_ns", "row"])
        .group_by("group_id", maintain_order=True)
        .agg(
            pl.col(
                [*SIGNATURE, "trace_id", "parent_span_id", "n", "k", "cap_hits", "first_start_ns"]
            ).first(),
            child_ids=pl.col("span_id"),
            child_starts=pl.col("start_ns"),
            child_ends=pl.col("end_ns"),
            first_wave=pl.col("first_wave").sum(),
            handover_gap_ns=(pl.col("start_ns") - pl.col("prev_end_ns"))
            .filter(~pl.col("first_wave"))
            .median(),
            queued_ns=(pl.col("start_ns") - pl.col("first_start_ns")).sum(),
            queued_per_call_ns=(pl.col("start_ns") - pl.col("first_start_ns"))
            .filter(~pl.col("first_wave"))
            .mean(),
            makespan_ns=pl.col("end_ns").max() - pl.col("start_ns").min(),
            longest_child_ns=pl.col("duration_ns").max(),
        )
        .with_columns(
            capped=(pl.col("k") >= 1)
            & (pl.col("k") < pl.col("n"))
            & (pl.col("first_wave") == pl.col("k"))
            & (pl.col("cap_hits") >= pl.max_horizontal(pl.lit(2), pl.col("n") // pl.col("k")))
        )
    )
    # Fan-outs that showed no cap, as counts per (signature, k, n, first wave) for the near miss of
    # a signature none of whose fan-outs is capped (medians from the counts are exact).
    uncapped = (
        fanouts.filter(~pl.col("capped"))
        .group_by([*SIGNATURE, "k", "n", "first_wave"])
        .agg(
            count=pl.len(),
            traces=pl.col("trace_id").n_unique(),
            trace_ids=pl.col("trace_id").unique().sort().head(5),
        )
    )
    groups = fanouts.filter("capped").with_columns(
        pool_evidence=pl.col("group_id").is_in(pooled.implode()),
        in_pool=pl.col("group_id").is_in(overlapping.implode()),
    )
    # k = 1 without pool evidence is left out in the decision (and listed as a near miss there).
    return groups.with_columns(_fanout_id()), uncapped


def _per_fanout_findings(
    groups: pl.DataFrame | None, widths: pl.DataFrame | None, misses: list[Miss]
) -> list[Finding]:
    """The per-fan-out rule across traces: a signature's capped fan-outs must be most of those
    wide enough to hit the cap; k = 1 needs pool evidence."""
    if groups is None or groups.is_empty() or widths is None:
        return []
    _signature_misses(
        groups.filter((pl.col("k") < 2) & ~pl.col("pool_evidence")),
        pl.format(
            "k = 1 in {} fan-outs without pool evidence: a sequential loop, left to serialized_calls / n_plus_one",
            pl.len(),
        ),
        misses,
    )
    findings = []
    # the children's span-id lists stay where they are (``_row``: a fan-out's position): a finding
    # takes its rows' lists a chunk at a time, when it makes their occurrences
    lists = groups.select(LISTS)
    for frame in sorted_partitions(
        groups.drop(LISTS).with_row_index("_row"),
        SIGNATURE,
        ["first_start_ns", "trace_id", "parent_span_id"],
        (pl.col("k") >= 2) | pl.col("pool_evidence"),
    ):
        k_mode = int(frame["k"].mode().min())  # type: ignore[arg-type]
        # Fan-outs of this signature wide enough to hit the cap: a real cap shows in most of them.
        wide = int(
            widths.join(frame.select(SIGNATURE).head(1), on=SIGNATURE, how="semi")
            .filter(pl.col("n") > k_mode)["fanouts"]
            .sum()
        )
        rate = frame.height / max(wide, 1)
        if rate < MIN_CAPPED_RATE:
            misses.append(
                (
                    tuple(first_of(frame, c) for c in SIGNATURE),
                    f"capped at k = {k_mode} in {frame.height} of {wide} fan-outs wider than k "
                    f"({rate:.0%}) < {MIN_CAPPED_RATE:.0%}: no consistent cap",
                    frame["trace_id"].unique(maintain_order=True).head(5).to_list(),
                    frame["trace_id"].n_unique(),
                )
            )
            continue
        finding = _finding(frame, k_mode, rate, wide, lists)
        finding.evidence["signature"] = [first_of(frame, c) for c in SIGNATURE]
        findings.append(finding)
    return findings


def first_of(frame: pl.DataFrame, column: str) -> str:
    return str(frame[column][0])


def _overlapping_groups(kids: pl.DataFrame) -> pl.Series:
    """The queued fan-outs of ``kids`` whose children overlap somewhere (a plain sequential loop
    never does, and loops are most queued groups): their ``group_id``."""
    return (
        kids.lazy()
        .sort(["group_id", "start_ns"])
        # the group's running maximum at the previous row when that row is the group's (the
        # groups are contiguous): one shift over the frame, not a shift inside ``over`` (group by group)
        .with_columns(
            prev_end_max=pl.when(pl.col("group_id") == pl.col("group_id").shift(1)).then(
                pl.col("end_ns").cum_max().over("group_id").shift(1)
            )
        )
        .group_by("group_id")
        .agg(overlaps=(pl.col("start_ns") < pl.col("prev_end_max")).any())
        .filter("overlaps")
        .select("group_id")
        .collect()
        .to_series()
    )


# a pool call's columns, in their order (``pool_calls`` rows and the calls of capped fan-outs)
_POOL_COLUMNS = [
    "start_ns",
    "end_ns",
    "duration_ns",
    "n",
    *SIGNATURE,
    "trace_id",
    "span_id",
    "parent_span_id",
    "pool_evidence",
    "fanout_id",
]


def _overlapping_calls(
    spans: pl.DataFrame,
    kids: pl.DataFrame,
    pooled: pl.Series,
    overlapping: pl.Series,
    generic: pl.Series | None = None,
) -> pl.DataFrame:
    """The calls of the queued fan-outs ``kids`` whose children overlap (``overlapping``) — loops
    are dropped before any string column is fetched — with their signature and pool evidence."""
    kids = kids.filter(pl.col("group_id").is_in(overlapping.implode()))
    if kids.is_empty():
        return pl.DataFrame()
    kids = with_span_columns(spans, kids, [*SIGNATURE, "trace_id", "span_id", "parent_span_id"], generic)
    return (
        kids.with_columns(pool_evidence=pl.col("group_id").is_in(pooled.implode()), fanout_id=_fanout_id())
        .sort(["fanout_id", "start_ns", "row"])
        .select(_POOL_COLUMNS)
    )


def _pool_calls(
    calls: pl.DataFrame | None, fanouts: pl.DataFrame | None, found: set[tuple[str, ...]]
) -> pl.DataFrame | None:
    """The calls the shared-pool rule sweeps: of the signatures the per-fan-out rule did not
    report (:func:`_unreported`), the stored ``pool_calls`` and the calls of the capped fan-outs
    ``in_pool``, one row per child from their ``fanouts`` rows (each fan-out's calls in the order
    its rows had: by start, then span)."""
    calls = _unreported(calls, found)
    if fanouts is None or fanouts.is_empty():
        return calls
    capped = _unreported(fanouts, found)  # (then in_pool: only the unreported rows copied)
    assert capped is not None
    capped = capped.filter("in_pool")
    if capped.is_empty():
        return calls
    if "child_ids" + _common.WORDS in capped.columns:  # (compacted: the ids as text again)
        capped = capped.with_columns(_common.id_lists(capped, "child_ids", words=False).alias("child_ids"))
    exploded = (
        capped.select(
            *SIGNATURE,
            "trace_id",
            "parent_span_id",
            "n",
            "pool_evidence",
            "fanout_id",
            span_id="child_ids",
            start_ns="child_starts",
            end_ns="child_ends",
        )
        .explode(["span_id", "start_ns", "end_ns"])
        .with_columns(duration_ns=pl.col("end_ns") - pl.col("start_ns"))
        .select(_POOL_COLUMNS)
    )
    if calls is None or calls.is_empty():
        return exploded
    return pl.concat([calls, exploded], how="vertical_relaxed")


def _unreported(kids: pl.DataFrame | None, found: set[tuple[str, ...]]) -> pl.DataFrame | None:
    """The pool calls of the signatures the per-fan-out rule did not report, in their order: the
    shared-pool rule judges each signature on its own calls, and of a signature found it makes
    neither a finding nor a near miss (:func:`decide` notes none for a signature found). On a
    store whose pool calls are mostly one capped fan-out's (serve's soak: 600k of 620k), sweeping
    those was most of the decision's working set. (Signatures compared as the rules compare them:
    their values as text.)"""
    if kids is None or kids.is_empty() or not found:
        return kids
    text = [f"_found_{i}" for i in range(len(SIGNATURE))]
    reported = pl.DataFrame(
        [
            pl.Series(name, values, pl.String)
            for name, values in zip(text, zip(*found, strict=True), strict=True)
        ]
    )
    as_text = [
        pl.col(c).cast(pl.String).fill_null("None").alias(t) for c, t in zip(SIGNATURE, text, strict=True)
    ]
    return kids.with_columns(as_text).join(reported, on=text, how="anti", maintain_order="left").drop(text)


def _shared_pool_findings(
    kids: pl.DataFrame | None, found: set[tuple[str, ...]], misses: list[Miss]
) -> list[Finding]:
    """The shared-pool rule (module doc, second part), over the calls of every trace's queued,
    overlapping fan-outs."""
    if kids is None or kids.height < MIN_SHARED_CALLS:
        return []
    kids = kids.with_columns(signature_id=pl.struct(SIGNATURE).hash())
    per_signature = kids.group_by("signature_id").agg(
        calls=pl.len(), traces=pl.col("trace_id").n_unique(), median_ns=pl.col("duration_ns").median()
    )
    signatures = per_signature.height
    per_signature = per_signature.filter(
        (pl.col("calls") >= MIN_SHARED_CALLS) & (pl.col("traces") >= MIN_SHARED_TRACES)
    )
    if per_signature.is_empty():
        return []
    if per_signature.height < signatures:  # the calls of the signatures judged, in their order
        kids = kids.filter(pl.col("signature_id").is_in(per_signature["signature_id"].implode()))
    # (the calls are not copied with each signature's median: only the hand-over reads it)
    medians = per_signature.select("signature_id", "median_ns")

    # Concurrency across traces: the sweep of the fan-out rule, by signature instead of fan-out.
    sweep = _concurrency_sweep(kids, "signature_id", "end_ns")
    k = sweep.group_by("signature_id").agg(pl.col("k").first())
    saturation = (
        sweep.filter(pl.col("delta") == 1)
        .group_by("signature_id")
        .agg(saturation=(pl.col("concurrency") == pl.col("k")).mean())
    )
    del sweep  # two events per call: not held through the rest
    # Hand-over: the latest end of another call of the signature at or before each start.
    tolerance = pl.max_horizontal(
        pl.lit(HANDOVER_TOLERANCE_NS), (pl.col("median_ns") * HANDOVER_TOLERANCE_SHARE).cast(pl.Int64)
    )
    # ties at one instant are ordered by trace, so the report does not depend on row order
    previous_ends = kids.select("signature_id", t=pl.col("end_ns"), end_trace=pl.col("trace_id")).sort(
        ["t", "end_trace"]
    )
    handover = (
        kids.select("signature_id", "trace_id", t=pl.col("start_ns"))
        .join(medians, on="signature_id", how="left", maintain_order="left")
        .sort("t")
        .join_asof(
            previous_ends.with_columns(prev_end_ns=pl.col("t")),
            on="t",
            by="signature_id",
            strategy="backward",
            check_sortedness=False,
        )
        .with_columns(handed=(pl.col("t") - pl.col("prev_end_ns") <= tolerance).fill_null(False))
        .group_by("signature_id")
        .agg(
            handover_rate=pl.col("handed").mean(),
            cross_trace_handover_rate=(pl.col("handed") & (pl.col("end_trace") != pl.col("trace_id"))).mean(),
        )
    )
    judged = (
        per_signature.join(k, on="signature_id")
        .join(saturation, on="signature_id")
        .join(handover, on="signature_id")
        .with_columns(
            shared=(pl.col("k") >= 2)
            & (pl.col("saturation") >= MIN_SATURATION)
            & (pl.col("handover_rate") >= MIN_HANDOVER)
            & (pl.col("cross_trace_handover_rate") >= MIN_CROSS_TRACE_HANDOVER)
        )
    )
    not_shared = judged.filter(~pl.col("shared"))
    if not_shared.height:
        # one near miss per signature (as _signature_misses), its calls grouped by the signature's
        # hash rather than copied with the verdict's columns and grouped by its five strings
        reasons = (
            kids.filter(pl.col("signature_id").is_in(not_shared["signature_id"].implode()))
            .group_by("signature_id")
            .agg(
                pl.col(SIGNATURE).first(),
                trace_ids=pl.col("trace_id").unique().sort().head(5),
                traces=pl.col("trace_id").n_unique(),
            )
            .join(not_shared, on="signature_id")
            .select(
                *SIGNATURE,
                "trace_ids",
                "traces",
                reason=pl.format(
                    "not a shared pool across requests: peak concurrency k = {} (needs >= 2), saturation {} "
                    "(needs >= {}), hand-over {} (needs >= {}), across traces {} (needs >= {})",
                    pl.col("k"),
                    pl.col("saturation").round(2),
                    pl.lit(MIN_SATURATION),
                    pl.col("handover_rate").round(2),
                    pl.lit(MIN_HANDOVER),
                    pl.col("cross_trace_handover_rate").round(2),
                    pl.lit(MIN_CROSS_TRACE_HANDOVER),
                ),
            )
            .sort(SIGNATURE)
        )
        for r in reasons.iter_rows(named=True):
            misses.append(
                (tuple(str(r[c]) for c in SIGNATURE), str(r["reason"]), list(r["trace_ids"]), r["traces"])
            )
    shared = judged.filter("shared")
    if shared.is_empty():
        return []
    findings = []
    for stats in shared.sort(["calls", "signature_id"], descending=[True, False]).iter_rows(named=True):
        calls = kids.filter(pl.col("signature_id") == stats["signature_id"])
        if tuple(first_of(calls, c) for c in SIGNATURE) in found:
            continue
        fanouts = (
            calls.group_by("fanout_id", maintain_order=True)
            .agg(
                pl.col([*SIGNATURE, "trace_id", "parent_span_id", "n"]).first(),
                child_ids=pl.col("span_id"),
                first_start_ns=pl.col("start_ns").min(),
                queued_ns=(pl.col("start_ns") - pl.col("start_ns").min()).sum(),
                queued_per_call_ns=(pl.col("start_ns") - pl.col("start_ns").min())
                .filter(pl.col("start_ns") > pl.col("start_ns").min())
                .mean(),
                makespan_ns=pl.col("end_ns").max() - pl.col("start_ns").min(),
                longest_child_ns=pl.col("duration_ns").max(),
                k=pl.lit(stats["k"], pl.Int64),
                cap_hits=pl.lit(0, pl.Int64),
                handover_gap_ns=pl.lit(None, pl.Int64),
                pool_evidence=pl.col("pool_evidence").any(),
            )
            .sort(["first_start_ns", "trace_id", "parent_span_id"])
        )
        finding = _finding(fanouts, int(stats["k"]), 1.0, fanouts.height)
        evidence = finding.evidence
        for key in ("k_share", "capped_rate", "handover_gap_ms_p50"):
            evidence.pop(key, None)
        evidence.update(
            shared_across_traces=True,
            calls=int(stats["calls"]),
            saturation=round(float(stats["saturation"]), 3),
            handover_rate=round(float(stats["handover_rate"]), 3),
            cross_trace_handover_rate=round(float(stats["cross_trace_handover_rate"]), 3),
        )
        traces = int(stats["traces"])
        confidence = 0.6 + (0.1 if traces >= 20 else 0.0) + (0.1 if stats["saturation"] >= 0.9 else 0.0)
        confidence += 0.05 if evidence["pool_evidence"] else 0.0
        finding.confidence = round(min(confidence, 0.9), 3)
        finding.evidence["signature"] = [first_of(calls, c) for c in SIGNATURE]
        findings.append(finding)
    return findings


def _finding(
    frame: pl.DataFrame, k_mode: int, rate: float, wide_fanouts: int, lists: pl.DataFrame | None = None
) -> Finding:
    """A signature's finding from its capped fan-outs ``frame`` (their children's span ids: the
    column ``child_ids``, or with ``lists`` its rows ``_row``)."""
    first = frame.row(0, named=True)
    traces = frame["trace_id"].n_unique()
    k_share = float((frame["k"] == k_mode).sum()) / frame.height
    pool_evidence = bool(frame["pool_evidence"].any())
    # the parent and its children, the children run concurrently: made in columns, no object
    # per occurrence (``Occurrences.from_columns``)

    def make(start: int, length: int) -> Occurrences:  # (a chunk of rows at a time: occurrences_by_chunk)
        part = frame.slice(start, length)
        if lists is not None:
            part = pl.concat([part, lists[part["_row"]]], how="horizontal")
        compacted = "child_ids" + _common.WORDS in part.columns
        spans = (
            _common.id_lists(part, "child_ids", "parent_span_id")
            if compacted
            else part.select(pl.concat_list(pl.col("parent_span_id"), pl.col("child_ids"))).to_series()
        )
        made = part.select(
            spans.alias("_spans"),
            pl.col("queued_per_call_ns").fill_null(0),  # (``or 0``)
            "k",
            "n",
            "queued_ns",
            "makespan_ns",
            "longest_child_ns",
            "cap_hits",
        )
        return Occurrences.from_columns(
            part["trace_id"],
            made["_spans"],
            intervention=RunConcurrently,
            first=1,
            dropped=0,
            parameter=None,
            numbers=per_unit(
                made,
                {
                    "k": ("k", 1),
                    "n": ("n", 1),
                    "queued_ms": ("queued_ns", 1e6),
                    "queued_per_call_ms": ("queued_per_call_ns", 1e6),
                    "makespan_ms": ("makespan_ns", 1e6),
                    "longest_child_ms": ("longest_child_ns", 1e6),
                    "cap_hits": ("cap_hits", 1),
                },
            ),
            keys=part[KEY] if compacted else occurrence_keys(part, KEYED),
        )

    occurrences = occurrences_by_chunk(frame.height, make)
    confidence = 0.6
    confidence += 0.1 if traces >= 5 else 0.0
    confidence += 0.1 if traces >= 20 else 0.0
    confidence += 0.1 if k_share >= 0.8 else 0.0
    confidence += 0.05 if pool_evidence else 0.0
    evidence = {
        "k": k_mode,
        "k_share": round(k_share, 3),
        "n_p50": stat(frame["n"]),
        "n_max": int(frame["n"].max() or 0),  # type: ignore[arg-type]
        "queued_ms_p50": stat(frame["queued_per_call_ns"].drop_nulls(), scale=1e6),
        "queued_ms_p95": stat(frame["queued_per_call_ns"].drop_nulls(), 0.95, 1e6),
        "queued_total_ms_p50": stat(frame["queued_ns"], scale=1e6),
        "makespan_ms_p50": stat(frame["makespan_ns"], scale=1e6),
        "longest_child_ms_p50": stat(frame["longest_child_ns"], scale=1e6),
        "pool_evidence": pool_evidence,
        "handover_gap_ms_p50": stat(frame["handover_gap_ns"].drop_nulls(), scale=1e6),
        "wide_fanouts": wide_fanouts,
        "capped_rate": round(rate, 3),
    }
    return fanout_finding(KIND, first, occurrences, confidence, evidence)
