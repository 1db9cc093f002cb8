"""retry_without_backoff: a failed call retried at once, again and again.

Rule
----
*Attempts* of one call are sibling spans (same parent) with the same service, name, target (peer /
database / destination) and request (URL or statement when recorded), taken in start order. An
attempt is a *retry* of the one before it when

* it starts no earlier than ``SKEW_TOLERANCE_NS`` before the previous attempt ended (a retry waits
  for the failure; concurrent copies are hedged requests, not retries), and
* the previous attempt failed — status ERROR, HTTP 5xx or 429, an ``exception`` event, or its
  traced SERVER side failed (older client instrumentations leave the client span unmarked) — or the
  span carries an explicit attempt number larger than the previous one's (``http.request.resend_count``,
  ``retry.attempt``, ``retry_count``, ``attempt``... keys in ``hints``).

Explicit evidence — attempt numbers, or the parent span logging that it retries (an event or event
attribute matching ``RETRY_LOG_PATTERN``, e.g. "Retrying GetDriver after error") — raises confidence.

A chain of retries is a *retry sequence* (the first attempt plus its retries); its *gaps* run from
an attempt's end to the next attempt's start, and the k-th retry of a sequence has *retry index* k.
A sequence of 3+ attempts whose gaps strictly grow, its last gap beyond the immediate bound and at
least ``GROWTH_FACTOR`` × its first, is backoff and is set aside: the rules below judge the
signature's other sequences (a signature can mix code paths, one backing off and one not); the
constant-short-delay rule also looks at the set-aside ones, to tell noise from such a path.

Retries are judged per signature — (service, operation that retries, callee service, callee
operation), the service being the retrying operation's (usually also the attempts'; HotROD traces its
redis client calls under a service of their own, "redis-manual", while the retry loop is the driver's) — over every sequence in every trace, because one trace's gaps are noisy (scheduler
hiccups, TCP delayed ACKs add tens of milliseconds to some gaps at random). A signature lacks
backoff when it has at least ``MIN_RETRIES`` retries and either

* **immediate**: the median gap is at most ``IMMEDIATE_GAP_NS`` (5 ms: no deliberate wait), or
* **constant short delay**: the median gap is at most ``MAX_FLAT_GAP_NS`` (50 ms — below the base
  delay of common backoff policies: AWS SDKs 100 ms, gRPC 1 s, resilience4j 500 ms) and the gaps do
  not grow with the retry index: at least ``MIN_LATER_RETRIES`` retries with index ≥ 2 show a median
  gap below ``GROWTH_FACTOR`` (1.5) × the median gap of first retries (exponential backoff doubles),
  over the sequences judged, and — unless those wait less than ``OTHER_PATH_SHARE`` (half) the
  set-aside sequences' first gap (medians) — over all the signature's sequences, set-aside ones
  included. Setting aside the
  sequences that grew keeps, of a real backoff, exactly those that noise flattened (scheduling
  delays add tens of ms to some gaps): judged alone, they would look flat. Noise only adds
  delay, so those wait about the backoff's first gap or more; a path of the same signature that
  sleeps less than half of it is a code path of its own, judged alone.

Why: retrying a failing dependency immediately multiplies its load exactly when it is struggling
(a retry storm) and rarely succeeds, because the cause — overload, a restart, a rate limit — has not
had time to clear. Exponential backoff with jitter (and a retry budget) spreads retries out.

False-positive protections
--------------------------
* Retries with backoff — gaps that grow with the retry index, even with full jitter, or a median
  gap above 50 ms — are healthy: nothing is reported, even when noise leaves a few of them flat.
* A single failure, or a failure followed by a different call, is not a retry.
* Repeated successful calls are N+1 / serialized work, not retries: the earlier attempt must fail
  or say it is a resend.
* Different URLs or statements are different requests (a redirect or a loop over ids), not retries.
* Overlapping copies of a call (hedging) are not chained.
* A constant delay is only judged where growth could have shown (retries with index ≥ 2 exist).
* Where the same call is also repeated right after a *success* under the same parent (a loop over
  items whose URL or statement is not recorded), a "retry" may be the loop's next item: without
  explicit evidence, confidence is lowered by half the share of such bursts.

Confidence: 0.3, up to +0.2 with the number of bursts (log scale, full at 100), +0.2 when some
burst has 3+ attempts (again and again), +0.1 for the immediate pattern, +0.15 with explicit
evidence; capped at 0.95.

Aggregation: one finding per signature; ``operation`` is the parent span (the code that loops),
``targets`` the callee. ``evidence`` has bursts, attempts per burst (p50/max), gaps (p50/max ms,
median per retry index), the share of immediate gaps, how many bursts exhausted every attempt, the
status codes seen, whether explicit attempt attributes were seen, and the time the bursts cost:
``failed_attempts_ms`` per occurrence (from the first attempt's start to the end of the last failed
attempt: the failed attempts and the re-sends between them), ``failed_attempts_ms_p50``/``_total``
in the evidence. ``requests_at_risk`` = root requests that contained such a burst. No
interventions: adding backoff adds latency, so no latency saving is claimed; the finding is ranked
by that measured cost plus the risk term (:mod:`hourglass.analysis.ranking`).
"""

from __future__ import annotations

import math
from typing import Any

import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors._common import (
    NearMissSink,
    Rows,
    call_target_expr,
    failed_expr,
    occurrence_keys,
    occurrences_by_chunk,
    per_unit,
    url_host_expr,
)
from hourglass.analysis.model import Finding, Occurrences
from hourglass.collector.schema import KIND_SERVER

KIND = "retry_without_backoff"
# 2: ``retries`` holds every sequence's retries, with ``backed_off`` (was: only those not backed off)
ROWS_FORMAT = 2
MIN_RETRIES = 2  # a signature needs at least two retries across its traces
IMMEDIATE_GAP_NS = 5_000_000  # 5 ms: no deliberate wait
MAX_FLAT_GAP_NS = 50_000_000  # 50 ms: a constant delay below common backoff bases
GROWTH_FACTOR = 1.5  # later retries waiting ≥ 1.5 × the first retry's gap is growing (backoff)
MIN_LATER_RETRIES = 2  # retries with index ≥ 2 needed to judge growth
# bursts not backed off whose median gap is below this share of the backed-off bursts' median
# first gap are another code path of the signature (a shorter sleep), not a backoff that noise
# flattened: noise only adds delay. (At 1.0, full-jitter backoff under noise was reported in 9 %
# of simulated windows, at 0.5 in 5 %: its growing bursts start low.)
OTHER_PATH_SHARE = 0.5
SKEW_TOLERANCE_NS = 1_000_000  # 1 ms of overlap tolerated between an attempt and its retry (clock jitter)
# An explicit attempt number among the hint attributes, e.g. {"http.request.resend_count": 2}.
ATTEMPT_HINT_PATTERN = r'"[^"]*(?:resend_count|retry_count|retries|retry[._]?attempt|attempt[._]?(?:number|count)?|retry)"\s*:\s*"?(\d+)'
TOP_CODES = 5
# The calling span says it retries (a log/event such as "Retrying GetDriver after error").
RETRY_LOG_PATTERN = r"(?i)\bretr(?:y|ying|ied|ies)\b"
SIGNATURE = ["parent_service", "parent_name", "target_service", "target_operation"]


def attempt_failed_expr() -> pl.Expr:
    """A failed attempt: failed status / HTTP code, or an exception recorded on it."""
    exception = pl.col("event_names").list.contains("exception").fill_null(False)
    return failed_expr() | exception


def attempt_number_expr() -> pl.Expr:
    return pl.col("hints").str.extract(ATTEMPT_HINT_PATTERN, 1).cast(pl.Int64, strict=False)


def _confidence(
    bursts: int, max_attempts: int, explicit: bool, immediate: bool, in_loop_share: float
) -> float:
    value = 0.3 + 0.2 * min(1.0, math.log10(bursts + 1) / 2.0)
    if max_attempts >= 3:
        value += 0.2  # again and again, not a single retry
    if immediate:
        value += 0.1  # no wait at all, rather than a short constant one
    if explicit:
        value += 0.15  # the instrumentation itself says these are retries
    else:
        value *= 1 - 0.5 * in_loop_share  # could be a loop's next item rather than a retry
    return round(min(0.95, value), 3)


def extract(ctx: AnalysisContext) -> Rows:
    """Per-trace half: ``sequences`` (one row per retry sequence, attributed to its caller and
    callee) and ``retries`` (one row per retry of every sequence: its signature, gap, retry
    index and whether its sequence looks backed off)."""
    spans = ctx.spans
    # lazily, so each filter over the spans takes the columns selected, not every span column
    candidates = (
        spans.lazy()
        .filter(
            pl.col("parent_row").is_not_null() & (attempt_failed_expr() | attempt_number_expr().is_not_null())
        )
        .select("parent_row", "kind")
        .collect()
    )
    if candidates.height == 0:
        return {}
    # A CLIENT attempt whose traced SERVER side failed failed too, even if the client span says nothing.
    failed_by_callee = candidates.filter(pl.col("kind") == KIND_SERVER)["parent_row"].unique()
    parent_rows = pl.concat(
        [
            candidates["parent_row"],
            spans.lazy()
            .filter(pl.col("row").is_in(failed_by_callee.implode()))
            .select("parent_row")
            .collect()["parent_row"]
            .drop_nulls(),
        ]
    ).unique()
    attempts = _attempts(spans, parent_rows.implode(), failed_by_callee.implode())
    sequences = _sequences(attempts)
    if sequences.height == 0:
        return {}
    sequences = _attribute(sequences, spans)
    retries = attempts.filter(pl.col("is_retry")).join(
        sequences.select("sequence", *SIGNATURE, "backed_off"), on="sequence", how="inner"
    )
    return {
        "sequences": sequences.drop("sequence", "parent_row", "first_row"),
        "retries": retries.select(*SIGNATURE, "gap_ns", "retry_index", "backed_off"),
    }


def decide(rows: Rows, notes: NearMissSink) -> list[Finding]:
    """Cross-trace half: a signature's gaps over every sequence of every trace."""
    sequences, retries = rows.get("sequences"), rows.get("retries")
    if sequences is None or sequences.is_empty() or retries is None:
        return []
    backed_off = sequences.filter("backed_off")
    sequences = sequences.filter(~pl.col("backed_off"))
    # in one piece: grouped as the stored batches' ~150 chunks, polars' working set is ~10x the table
    judged = _judge(retries.rechunk())
    verdicts = judged.filter("lacks_backoff").drop("lacks_backoff")
    _note_near_misses(notes, sequences, backed_off, judged.filter(~pl.col("lacks_backoff")), verdicts)
    if verdicts.height == 0:
        return []
    # The reported signatures' sequences in one order whatever the partitioning: an index sorted on
    # compact keys, not the rows joined and sorted whole (each carries its attempts' span ids and codes)
    chosen = (
        sequences.select(*SIGNATURE, "trace_id", "first_start_ns", _first=pl.col("span_ids").list.first())
        .with_row_index("_row")
        .join(verdicts.select(SIGNATURE), on=SIGNATURE, how="semi")
        .sort("trace_id", "first_start_ns", "_first")
        .group_by(SIGNATURE, maintain_order=True)
        .agg("_row")
    )
    verdict_of = {tuple(r[c] for c in SIGNATURE): r for r in verdicts.iter_rows(named=True)}
    findings: list[Finding] = []
    for *group_key, at in chosen.iter_rows():
        group = sequences[pl.Series(at, dtype=pl.UInt32)]  # the whole rows of this finding's sequences only
        service, operation, target_service, target_operation = (str(v) for v in group_key)
        findings.append(
            _finding(
                service,
                operation,
                target_service,
                target_operation,
                group,
                verdict_of[tuple(group_key)],
                _occurrences(group),
            )
        )
    findings.sort(key=lambda f: (-(f.requests_at_risk or 0), f.signature))
    return findings


def _occurrences(group: pl.DataFrame) -> Occurrences:
    """One occurrence per retry sequence of ``group``: the caller and the attempts, no intervention,
    the sequence's figures as numbers (ms divided by numpy, as Python's ``/``); made in columns, no
    object per occurrence (:meth:`Occurrences.from_columns`), a chunk of sequences at a time
    (:func:`occurrences_by_chunk`)."""
    keyed = ["trace_id", "parent_span_id", "span_ids"]

    def make(start: int, length: int) -> Occurrences:
        part = group.slice(start, length)
        numbers = per_unit(
            part,
            {
                "attempts": ("attempts", 1),
                "failed_attempts": ("failed_attempts", 1),
                "median_gap_ms": ("median_gap_ns", 1e6),
                "max_gap_ms": ("max_gap_ns", 1e6),
                "retry_time_ms": ("retry_time_ns", 1e6),
                "failed_attempts_ms": ("failed_attempts_ns", 1e6),
            },
        )
        numbers["exhausted"] = part["last_failed"].fill_null(False).cast(pl.Float64).to_numpy()
        return Occurrences.from_columns(
            part["trace_id"],
            part.select(pl.concat_list("parent_span_id", "span_ids")).to_series(),
            intervention=None,
            numbers=numbers,
            keys=occurrence_keys(part, keyed),
        )

    return occurrences_by_chunk(group.height, make)


def detect(ctx: AnalysisContext) -> list[Finding]:
    return decide(extract(ctx), ctx)


def _attempts(spans: pl.DataFrame, parent_rows: pl.Series, failed_by_callee: pl.Series) -> pl.DataFrame:
    """Siblings under parents that hold a failed or numbered attempt, chained into retry sequences;
    only the attempts of sequences with at least one retry are returned."""
    key = ["parent_row", "call"]  # call: one 64-bit hash of service, name, target and request
    siblings = (
        spans.lazy()
        .filter(pl.col("parent_row").is_in(parent_rows))
        .select(
            "trace_id",
            "span_id",
            "parent_row",
            "service",
            "name",
            "start_ns",
            "end_ns",
            "row",
            "http_status_code",
            target=call_target_expr(),
            request=pl.coalesce(pl.col("http_url"), pl.col("db_statement"), pl.lit("")),
            failed=attempt_failed_expr() | pl.col("row").cast(pl.Int64).is_in(failed_by_callee),
            attempt=attempt_number_expr(),
        )
        .with_columns(call=pl.struct("service", "name", "target", "request").hash())
        .sort([*key, "start_ns", "row"])
        .collect()
    )
    same_call = pl.all_horizontal([pl.col(c) == pl.col(c).shift(1) for c in key]).fill_null(False)
    gap = pl.col("start_ns") - pl.col("end_ns").shift(1)
    explicit_resend = (pl.col("attempt") > pl.col("attempt").shift(1).fill_null(0)).fill_null(False)
    previous_failed = pl.col("failed").shift(1).fill_null(False)
    is_retry = same_call & (gap >= -SKEW_TOLERANCE_NS) & (previous_failed | explicit_resend)
    # The same call repeated right after a success: a loop over items the key cannot tell apart
    # (no URL or statement recorded), so a "retry" here may be the loop's next item.
    repeat_after_success = same_call & ~previous_failed & ~explicit_resend
    position = pl.int_range(pl.len(), dtype=pl.Int64)
    return (
        siblings.with_columns(gap_ns=gap, is_retry=is_retry, in_loop=repeat_after_success)
        .with_columns(
            pl.col("in_loop").any().over(key),  # computed row-wise first: shifts inside over() run per group
            sequence=(~pl.col("is_retry")).cum_sum(),
            retry_index=position - pl.when(~pl.col("is_retry")).then(position).forward_fill(),
        )
        .with_columns(gap_ns=pl.when(pl.col("is_retry")).then(pl.col("gap_ns")))
        .filter(pl.col("is_retry") | pl.col("is_retry").shift(-1).fill_null(False))
    )


def _sequences(attempts: pl.DataFrame) -> pl.DataFrame:
    """One row per retry sequence of ≥ 2 attempts; ``backed_off`` marks sequences of 3+ attempts
    whose gaps strictly grow, the last beyond the immediate bound and ≥ 1.5 × the first (set
    aside by the caller, and listed as near misses)."""
    retry_gap = pl.col("gap_ns").filter(pl.col("is_retry"))
    return (
        attempts.group_by("sequence")
        .agg(
            pl.col("trace_id").first(),
            pl.col("parent_row").first(),
            pl.col("service").first(),
            pl.col("name").first(),
            pl.col("target").first(),
            pl.col("in_loop").first(),
            pl.col("request").first(),
            attempts=pl.len(),
            failed_attempts=pl.col("failed").sum(),
            last_failed=pl.col("failed").last(),
            explicit=pl.col("attempt").is_not_null().any(),
            span_ids=pl.col("span_id"),
            first_row=pl.col("row").first().cast(pl.Int64),
            first_start_ns=pl.col("start_ns").first(),
            first_end_ns=pl.col("end_ns").first(),
            last_end_ns=pl.col("end_ns").last(),
            last_failed_end_ns=pl.col("end_ns").filter(pl.col("failed")).max(),
            codes=pl.col("http_status_code").filter(pl.col("failed")).drop_nulls(),
            median_gap_ns=retry_gap.median(),
            max_gap_ns=retry_gap.max(),
            first_gap_ns=retry_gap.first(),
            last_gap_ns=retry_gap.last(),
            growing=(retry_gap.diff().drop_nulls() > 0).all(),
        )
        .filter(pl.col("attempts") >= 2)
        .with_columns(
            backed_off=(pl.col("attempts") >= 3)
            & pl.col("growing")
            & (pl.col("last_gap_ns") > IMMEDIATE_GAP_NS)
            # grown, not jittered: a constant delay's noise makes half its 3-attempt sequences "grow"
            & (pl.col("last_gap_ns") >= GROWTH_FACTOR * pl.col("first_gap_ns"))
        )
        .with_columns(
            retry_time_ns=pl.col("last_end_ns") - pl.col("first_end_ns"),
            # The sequence's cost to the request: its failed attempts and the re-sends between them.
            failed_attempts_ns=(pl.col("last_failed_end_ns") - pl.col("first_start_ns")).clip(0).fill_null(0),
        )
    )


def _attribute(sequences: pl.DataFrame, spans: pl.DataFrame) -> pl.DataFrame:
    """Parent operation (where the loop lives) and callee: the attempts' SERVER child in another
    service when traced, else the call's target."""
    first_rows = sequences["first_row"].implode()
    callees = (
        spans.lazy()
        .filter(pl.col("parent_row").is_in(first_rows) & (pl.col("kind") == KIND_SERVER))
        .select(pl.col("parent_row").alias("first_row"), callee_service="service", callee_name="name")
        .unique("first_row")
        .collect()
    )
    parents = (
        spans.lazy()
        .filter(pl.col("row").is_in(sequences["parent_row"].implode()))
        .select(
            pl.col("row").cast(pl.Int64).alias("parent_row"),
            parent_span_id="span_id",
            parent_service="service",
            parent_name="name",
            parent_logs_retry=(
                pl.col("event_names")
                .list.eval(pl.element().str.contains(RETRY_LOG_PATTERN))
                .list.any()
                .fill_null(False)
                | pl.col("event_hints").str.contains(RETRY_LOG_PATTERN).fill_null(False)
            ),
        )
        .collect()
    )
    callee_elsewhere = pl.col("callee_service").is_not_null() & (
        pl.col("callee_service") != pl.col("service")
    )
    return (
        sequences.join(callees, on="first_row", how="left")
        .join(parents, on="parent_row", how="left")
        .with_columns(
            target_service=pl.when(callee_elsewhere)
            .then(pl.col("callee_service"))
            .when(pl.col("target") != "")
            .then(pl.col("target"))
            .otherwise(pl.coalesce(url_host_expr("request"), pl.col("service"))),
            target_operation=pl.coalesce(pl.col("callee_name"), pl.col("name")),
        )
    )


def _flat_in_judged() -> pl.Expr:
    """Over :func:`_judge`'s sequences judged, later retries wait less than 1.5 × the first."""
    return pl.col("later_gap_p50_ns") < GROWTH_FACTOR * pl.col("first_gap_p50_ns").clip(
        lower_bound=IMMEDIATE_GAP_NS
    )


def _judge(retries: pl.DataFrame) -> pl.DataFrame:
    """Signatures whose retries wait (almost) nothing, or a constant short delay; with the gap
    numbers. ``retries``: every sequence's; the figures are those of the sequences not backed off,
    except ``all_grow`` (later retries wait ≥ 1.5 × the first over every sequence, and the
    sequences judged wait at least half the backed-off ones' first gaps)."""
    first = pl.col("retry_index") == 1
    later = pl.col("retry_index") >= 2
    judged = ~pl.col("backed_off")
    gap = pl.col("gap_ns")
    # over every sequence: later retries wait >= 1.5 x the first, and the sequences judged wait
    # about the set-aside ones' first gaps at least: that backoff's, flattened by noise (which
    # only adds delay), not a shorter sleep of another path
    all_grow = (
        (later.sum() >= MIN_LATER_RETRIES)
        & (
            gap.filter(later).median() >= GROWTH_FACTOR * gap.filter(first).median().clip(IMMEDIATE_GAP_NS)
        ).fill_null(False)
        & (gap.filter(judged).median() >= OTHER_PATH_SHARE * gap.filter(~judged & first).median()).fill_null(
            True
        )
    )
    stats = (
        retries.group_by(SIGNATURE)
        .agg(
            retries=judged.sum(),
            gap_p50_ns=pl.col("gap_ns").filter(judged).median(),
            gap_max_ns=pl.col("gap_ns").filter(judged).max(),
            immediate_share=(pl.col("gap_ns").filter(judged) <= IMMEDIATE_GAP_NS).mean(),
            first_gap_p50_ns=pl.col("gap_ns").filter(judged & first).median(),
            later_gap_p50_ns=pl.col("gap_ns").filter(judged & later).median(),
            later_retries=(judged & later).sum(),
            all_grow=all_grow,
        )
        .filter(pl.col("retries") > 0)  # every sequence backed off: nothing to judge
    )
    by_index = (
        retries.filter(judged)
        .with_columns(index=pl.col("retry_index").clip(upper_bound=5))
        .group_by([*SIGNATURE, "index"])
        .agg(p50=pl.col("gap_ns").median())
        .sort("index")
        .group_by(SIGNATURE)
        .agg(gap_p50_ms_by_retry_index=(pl.col("p50") / 1e6).round(3))
    )
    immediate = pl.col("gap_p50_ns") <= IMMEDIATE_GAP_NS
    flat = (
        (pl.col("gap_p50_ns") <= MAX_FLAT_GAP_NS)
        & (pl.col("later_retries") >= MIN_LATER_RETRIES)
        & _flat_in_judged()
        & ~pl.col("all_grow")  # the sequences set aside included, the gaps grow: noise flattened the rest
    )
    return (
        stats.with_columns(lacks_backoff=(pl.col("retries") >= MIN_RETRIES) & (immediate | flat))
        .with_columns(
            pattern=pl.when(immediate).then(pl.lit("immediate")).otherwise(pl.lit("constant_short_delay"))
        )
        .join(by_index, on=SIGNATURE, how="left")
    )


def _note_near_misses(
    notes: NearMissSink,
    sequences: pl.DataFrame,
    backed_off: pl.DataFrame,
    healthy: pl.DataFrame,
    reported: pl.DataFrame,
) -> None:
    """Near misses, one per signature: retry sequences whose gaps grow (backoff), and signatures
    judged not to lack backoff, with the rule and the measured gaps."""
    ms = 1e6
    why = healthy.select(
        *SIGNATURE,
        reason=pl.when(pl.col("retries") < MIN_RETRIES)
        .then(pl.format("{} retry < {} needed", pl.col("retries"), pl.lit(MIN_RETRIES)))
        .when(pl.col("gap_p50_ns") > MAX_FLAT_GAP_NS)
        .then(
            pl.format(
                "median gap {} ms > {} ms: a deliberate delay",
                (pl.col("gap_p50_ns") / ms).round(3),
                pl.lit(MAX_FLAT_GAP_NS // 1_000_000),
            )
        )
        .when(pl.col("later_retries") < MIN_LATER_RETRIES)
        .then(
            pl.format(
                "median gap {} ms > {} ms and {} later retries: too few to judge growth",
                (pl.col("gap_p50_ns") / ms).round(3),
                pl.lit(IMMEDIATE_GAP_NS // 1_000_000),
                pl.col("later_retries"),
            )
        )
        .when(pl.col("all_grow") & _flat_in_judged())
        .then(
            pl.format(
                "median gap {} ms, flat in the bursts that did not grow, but over all the bursts later "
                "retries wait >= {} x the first retry (backoff; noise flattened a few)",
                (pl.col("gap_p50_ns") / ms).round(3),
                pl.lit(GROWTH_FACTOR),
            )
        )
        .otherwise(
            pl.format(
                "gaps grow: later retries wait {} ms >= {} x the first retry's {} ms (backoff)",
                (pl.col("later_gap_p50_ns") / ms).round(3),
                pl.lit(GROWTH_FACTOR),
                (pl.col("first_gap_p50_ns") / ms).round(3),
            )
        ),
    )
    counted = sequences.join(why, on=SIGNATURE, how="inner")
    growing = backed_off.join(reported.select(SIGNATURE), on=SIGNATURE, how="anti").with_columns(
        reason=pl.format(
            "gaps grow within each burst (backoff): last gap {} ms", (pl.col("last_gap_ns") / ms).round(3)
        )
    )
    both = pl.concat(
        [
            counted.select(*SIGNATURE, "trace_id", "reason", "span_ids", rule=pl.lit(0)),
            growing.select(*SIGNATURE, "trace_id", "reason", "span_ids", rule=pl.lit(1)),
        ]
    )
    if both.height == 0:
        return
    rows = (  # the signature-level verdict first, then the bursts that backed off; by trace within each
        both.sort("rule", "trace_id", pl.col("span_ids").list.first())
        .group_by(SIGNATURE, maintain_order=True)
        .agg(
            pl.col("reason").first(),
            bursts=pl.len(),
            trace_ids=pl.col("trace_id").unique(maintain_order=True).head(5),
            traces=pl.col("trace_id").n_unique(),
            span_ids=pl.col("span_ids").first(),
        )
        .sort(SIGNATURE)
    )
    for r in rows.iter_rows(named=True):  # one per signature
        notes.note_near_miss(
            KIND,
            str(r["parent_service"]),
            str(r["parent_name"]),
            f"{r['bursts']} retried bursts to {r['target_service']} {r['target_operation']}: {r['reason']}",
            trace_ids=r["trace_ids"],
            span_ids=r["span_ids"] or (),
            traces=r["traces"],
        )


def _finding(
    service: str,
    operation: str,
    target_service: str,
    target_operation: str,
    group: pl.DataFrame,
    verdict: dict[str, Any],
    occurrences: Occurrences,
) -> Finding:
    """The finding of one signature: ``group``, its sequences in order; ``verdict``, its row of
    :func:`_judge`."""
    stats = group.select(
        traces=pl.col("trace_id").n_unique(),
        bursts=pl.len(),
        attempts_p50=pl.col("attempts").median(),
        attempts_max=pl.col("attempts").max(),
        retries_total=(pl.col("attempts") - 1).sum(),
        retry_time_ms_p50=pl.col("retry_time_ns").median() / 1e6,
        failed_attempts_ms_total=pl.col("failed_attempts_ns").sum() / 1e6,
        failed_attempts_ms_p50=pl.col("failed_attempts_ns").median() / 1e6,
        exhausted_bursts=pl.col("last_failed").sum(),
        explicit=pl.col("explicit").any(),
        parent_logs_retry=pl.col("parent_logs_retry").any(),
        in_loop_share=pl.col("in_loop").mean(),
        retried_operations=pl.col("name").unique().sort().implode(),
    ).row(0, named=True)
    codes = (
        group.select(pl.col("codes").explode().drop_nulls().value_counts())
        .unnest("codes")
        .sort(["count", "codes"], descending=[True, False])
        .head(TOP_CODES)
    )
    bursts = int(stats["bursts"])
    immediate = verdict["pattern"] == "immediate"
    evidence: dict[str, Any] = {
        "pattern": verdict["pattern"],
        "bursts": bursts,
        "traces_with_bursts": int(stats["traces"]),
        "attempts_per_burst_p50": float(stats["attempts_p50"]),
        "attempts_per_burst_max": int(stats["attempts_max"]),
        "retries_total": int(stats["retries_total"]),
        "gap_ms_p50": round(verdict["gap_p50_ns"] / 1e6, 3),
        "gap_ms_max": round(verdict["gap_max_ns"] / 1e6, 3),
        "gap_ms_p50_by_retry_index": verdict["gap_p50_ms_by_retry_index"],
        "immediate_gap_share": round(float(verdict["immediate_share"]), 4),
        "retry_time_ms_p50": round(float(stats["retry_time_ms_p50"]), 3),
        "failed_attempts_ms_p50": round(float(stats["failed_attempts_ms_p50"]), 3),
        "failed_attempts_ms_total": round(float(stats["failed_attempts_ms_total"]), 3),
        "exhausted_bursts": int(stats["exhausted_bursts"]),
        "exhausted_share": round(int(stats["exhausted_bursts"]) / bursts, 4),
        "explicit_attempt_attributes": bool(stats["explicit"]),
        "retries_logged_by_caller": bool(stats["parent_logs_retry"]),
        "in_loop_share": round(float(stats["in_loop_share"]), 4),
        "failure_status_codes": {str(r[0]): int(r[1]) for r in codes.iter_rows()},
        "retried_operations": list(stats["retried_operations"]),
        # Distinct traces: one trace often holds several bursts (HotROD retries ~2 drivers a request).
        "trace_ids": group["trace_id"].unique(maintain_order=True).head(10).to_list(),
        "span_ids": [sid for o in occurrences[:10] for sid in o.span_ids[1:3]],
    }
    return Finding(
        kind=KIND,
        category="fault_tolerance",
        service=service,
        operation=operation,
        targets=[{"service": target_service, "operation": target_operation}],
        occurrences=occurrences,
        confidence=_confidence(
            bursts,
            int(stats["attempts_max"]),
            bool(stats["explicit"] or stats["parent_logs_retry"]),
            immediate,
            float(stats["in_loop_share"]),
        ),
        evidence=evidence,
        requests_at_risk=int(stats["traces"]),
    )
