"""The memory plan of a partitioned analysis: how many partitions of whole traces, on how many
worker processes, with or without the store split into partition files (:func:`plan`).

Pure arithmetic on the store's span count and the memory budget, in a module that imports
nothing of the analysis: ``hourglass analyze --db`` plans before it imports polars and the
detectors, so that its worker processes start while it imports them
(``hourglass.cli.analyze``). :mod:`hourglass.analysis.partitions` runs the plan (and re-exports
these names).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

# From this many partitions on, a run on a DuckDB file reads the store once into a file per
# partition (``partitions.split_store``) rather than scanning the whole store for each partition
# in each pass (extraction, pricing, the workstreams' pricing). CPU measured at 1M spans in 6
# partitions: the split 0.94 s and the six files read 0.64 s, against 1.84 s for six
# ``scan_partition``s, each of which reads every row of the store to find its partition's (at 5M
# spans ~0.45 s a scan on top of its own rows); so from 2-3 partitions on the split costs less,
# and more so as the store grows.
SPLIT_MIN_PARTS = 4


# Memory model behind the choice of partitions (peak RSS, measured with HOURGLASS_MEMORY_LOG=1 and
# bench.scaling on mixed traces at 1M and 5M spans): a process that analyses spans costs
# PROCESS_BASE_BYTES (interpreter, polars, pyarrow, duckdb: 145-155 MiB at the deciding process'
# start, 170-195 MiB for a worker once it has read its first partition) plus PEAK_BYTES_PER_SPAN
# for each span it holds — the read, the repaired frame and the detectors' intermediates at their
# peak (a worker's peak over its start: ~2.1 KB a span in partitions of 125k spans, ~1.9 KB in
# partitions of 312k). A partitioned run extracts in worker processes only (one at least), so
# the process that decides holds no spans. It holds the trace summaries while the workers extract
# (every extracted row is on disk: ``Spill.keep``): ~35 B a span at 1M, ~20 at 5M; then, through
# the pricing pass, while the workers read the findings' traces, the findings and what the
# decision left allocated: ROWS_BYTES_PER_SPAN of the whole (512 MiB over the start at 5M,
# ~180 at 1M; without a spill, under --cluster, the rows themselves, ~136 resident). The plan
# keeps room for the workers' extraction peaks beside the summaries and for their pricing beside
# ROWS_BYTES_PER_SPAN (SUMMARY_ and PRICE_BYTES_PER_SPAN below); it used to count
# full partitions beside the rows, from when a pricing task read and repaired its partition again.
# The decision runs with the workers idle (each holds its base: ``ProcessExecutor.idle`` starts
# them anew; or, when even their peaks over a partition fit beside the decision, ``Plan.keep``,
# they are left as they are, which spares two start-ups), one detector's rows at a time, the lock-convoy rule's resource rows streamed from
# their buckets under DuckDB's own memory limit (``hourglass.analysis.detectors._sweep``, whatever
# one key holds): DECIDE_BYTES_PER_SPAN (a peak of 644 MiB over the start at 5M, ~245 at 1M,
# when it was counted 130; since the spill of one file per kind and the exemplars' reads under
# READ_MEMORY_LIMIT, 129-349 MiB at 5M (the lock-convoy sweep's DuckDB peak varies run to run) and
# 320 at 10M: 100 keeps the 5M figure's margin, and lets the default budget run ~14.9M spans, not
# 10.8M: a 14M-span store measured 0.95 GiB all processes on the one worker it plans).
# The buckets no longer bound memory; BUCKET_SPANS spans a bucket keeps each bucket's sort, with
# keys spread evenly, within that limit.
#
# The pricing pass is not bounded by a full partition any more: a pricing task of a run on this
# machine prices from its partition's Prepared file (the few columns its extraction kept, mapped,
# with only the findings' traces gathered), PRICE_BYTES_PER_SPAN a span of its partition over its
# base (measured at 10M spans in 52 partitions: ~190 B, 194-228 MiB a worker), while this process
# holds ROWS_BYTES_PER_SPAN of the whole (measured at 10M: 641 MiB over its start at the pricing's
# peak, 67 B a span, the exemplars' traces read beside included). While the workers extract, it
# holds the trace summaries only: SUMMARY_BYTES_PER_SPAN (measured 209 MiB over its start at 10M,
# 21 B a span; ~35 at 1M). Counting the workers' full extraction peaks beside the pricing's rows
# left a 10M-span store one worker under the default budget (69 s against 45 s on two, whose peak
# measured 1.55 GiB in 56 partitions under a 2 GiB budget). A pricing task whose partition has no
# Prepared file (its write failed: a full disk) reads and repairs the partition, as an extraction
# does: up to PEAK_BYTES_PER_SPAN a span, which the budget does not count beside the rows.
PROCESS_BASE_BYTES = 200 * 2**20
PEAK_BYTES_PER_SPAN = 2_000
ROWS_BYTES_PER_SPAN = 80
SUMMARY_BYTES_PER_SPAN = 40
PRICE_BYTES_PER_SPAN = 400
DECIDE_BYTES_PER_SPAN = 100
BUCKET_SPANS = 2_000_000
MIN_WORKER_BYTES = 256 * 2**20  # below this a worker process is not worth its base cost
# The split of a DuckDB store into partition files (``split_store``), written by a thread of the
# deciding process while the workers extract their first partitions (``run_extraction``'s
# ``later``) when it fits beside their peaks, else before them, while they start
# (``Plan.split_beside``), else not at all: the workers read their partitions from the store
# (``scan_partition``; ``Plan.split``). Its memory (DuckDB's scan and buffer pool,
# ``SPLIT_MEMORY_LIMIT``, and the batches in flight) grows with the store. Measured with
# ``split_store`` alone into 8 files in a process of 119 MiB (its peak RSS): 434 MiB at 1M spans,
# ~487 at 2M (trace ids doubled), 522 at 5M; in ``analyze --db`` at 1M the deciding process
# peaked at 409-449 MiB splitting. Counted over PROCESS_BASE_BYTES: SPLIT_BYTES +
# SPLIT_BYTES_PER_SPAN a span (283 MiB at 1M, 295 at 2M, 329 at 5M): a line at or above every
# point (the growth slows as the store grows: it is not linear).
SPLIT_BYTES = 272 * 2**20
SPLIT_BYTES_PER_SPAN = 12
# A ``--since`` or ``--service`` filter also joins the store with the window's trace ids
# (``window_sql.traces_with``), whatever the split's memory limit, and scans the store's rows
# outside the window. Measured over a 128 MiB process splitting into 8 files, every trace
# matching: 383 MiB at 1M spans, 708 at 5M, 910 at 10M; a window of 1.67M spans of a 10M-span
# store 757, of 0.83M 652, of 7.5M 917; of 0.84M of a 5M-span store 487, of 0.41M 411; of 0.17M
# of a 1M-span store 187. Counted as SPLIT_FILTERED_BYTES + SPLIT_FILTERED_BYTES_PER_SPAN a span
# of the window + SPLIT_FILTERED_OUTSIDE_BYTES_PER_SPAN a row outside it: at or above every point
# (401 MiB at 1M, 725 at 5M, 1131 at 10M; 789, 755, 1028; 555, 537; 367). Before the join took
# the trace ids once each, it held one a span of the window: 1003 MiB at 5M, 856 for the 1.67M
# window of 10M, and these were 384 MiB, 112 and 48 bytes.
SPLIT_FILTERED_BYTES = 320 * 2**20
SPLIT_FILTERED_BYTES_PER_SPAN = 85
SPLIT_FILTERED_OUTSIDE_BYTES_PER_SPAN = 42


# The exemplar traces a partitioned run reads together for the recommendations' texts (after the
# pricing, beside the rows ROWS_BYTES_PER_SPAN counts): at most half a partition's spans (a context
# of them is well within a worker's room over a partition), and never less than this; the others
# are read a trace at a time (``pipeline._exemplars_held``), the largest no more than a worker's
# room (``_plan`` refuses a larger trace).
MIN_EXEMPLAR_SPANS = 20_000


def exemplar_spans(spans: int, parts: int) -> int:
    """The most spans of exemplar traces held together by a run of ``spans`` in ``parts``."""
    return max(MIN_EXEMPLAR_SPANS, -(-spans // max(1, parts)) // 2)


def at_once_spans(budget: int) -> int:
    """The most spans one process analyses at once, in memory, within ``budget`` bytes (a store's
    plan of one partition; what trace files, what-if and critical-path windows are held to)."""
    return max(0, (budget - PROCESS_BASE_BYTES) // PEAK_BYTES_PER_SPAN)


# the phase a what-if or critical-path question's partitions are counted under (``partitions.
# Progress``: the CLI's bar; a partition that fails twice: "asking of partition 2/38 failed twice")
ASKING = "asking"

# the smallest room a question is given in a process that holds much already (``question_room``):
# partitions of this many spans at least, rather than a refusal
MIN_QUESTION_SPANS = 50_000


def question_room(budget: int, held: int) -> int:
    """The budget a what-if or critical-path question plans for in a process that already holds
    ``held`` bytes over ``PROCESS_BASE_BYTES`` (serve's server: its store's cache, the ingest
    buffers, the reports, and its analysis worker beside it): what is left of ``budget``, and never less than room for
    ``MIN_QUESTION_SPANS`` spans (nor more than ``budget``), so a busy server answers in smaller
    partitions instead of refusing. Planned on the budget alone, a question over a 7.2M-span
    store took serve from 0.33 to 1.13 GiB, and under 20,000 spans/s of ingest the server
    holds ~0.6 GiB before it asks."""
    floor = min(budget, PROCESS_BASE_BYTES + MIN_QUESTION_SPANS * PEAK_BYTES_PER_SPAN)
    return max(budget - max(held, 0), floor)


def question_parts(spans: int, budget: int, copies: int = 1) -> int:
    """The partitions of whole traces a what-if or critical-path question over a window of
    ``spans`` spans is answered in, one context at a time, within ``budget`` bytes (1: at once).
    A quarter more than the even split: partitions by a hash of the trace id are not even.
    ``copies`` 2: the store's engine runs in the asking process (chdb), whose read of a partition
    is held there beside its context (measured at 1M spans over chdb: 2 partitions, 1.82 GiB;
    4, 1.30 GiB; 8, 0.97 GiB)."""
    most = at_once_spans(budget)
    if spans * copies <= most:
        return 1
    if most < 1:
        raise BudgetError(
            f"a memory budget of {budget / 2**30:.2f} GiB cannot hold one context (at least "
            f"{(PROCESS_BASE_BYTES + PEAK_BYTES_PER_SPAN) / 2**30:.2f} GiB)"
        )
    return -(-spans * copies * 5 // (4 * most))


def question_plan(spans: int, budget: int, workers: int, copies: int = 1) -> tuple[int, int]:
    """(partitions, worker processes) of a what-if or critical-path question over a window of
    ``spans`` spans within ``budget`` bytes, on up to ``workers`` processes. One process
    (:func:`question_parts`, asked in this one) when the window fits at once, ``copies`` is 2
    (an embedded ClickHouse store: opened by one process at a time), or no two workers have
    ``MIN_WORKER_BYTES`` each beside the bases; else each worker holds a partition at a time in
    its share of the budget (the asking process holds the answers' per-trace rows only), in
    whole rounds of the workers: ~2x smaller partitions on 2 workers, asked two at a time."""
    serial = question_parts(spans, budget, copies)
    if serial <= 1 or copies > 1:
        return serial, 1
    for count in range(max(1, workers), 1, -1):
        room = (budget - (count + 1) * PROCESS_BASE_BYTES) // count
        if room < MIN_WORKER_BYTES:
            continue
        most = room // PEAK_BYTES_PER_SPAN
        parts = -(-spans * 5 // (4 * most))
        return max(count, -(-parts // count) * count), count
    return serial, 1


# the most traces a question names by id (an endpoint's: ``DuckDBSpanStore.endpoint_trace_ids``),
# whose ids the asking process holds (~80 B each with Python's own): ~40 MiB
ENDPOINT_MAX_TRACES = 500_000


def few_parts_spans(budget: int, copies: int = 1) -> int:
    """The most spans a question asks in fewer partitions than a window is split into files for
    (``SPLIT_MIN_PARTS``, :func:`question_parts`), within ``budget``: the traces of one endpoint
    read by their ids (``whatif_query.endpoint_path_of_traces``) are worth it up to this."""
    return (SPLIT_MIN_PARTS - 1) * 4 * at_once_spans(budget) // (5 * max(1, copies))


def question_workers(spans: int, parts: int, budget: int, workers: int) -> int:
    """Worker processes for a question over ``spans`` spans in ``parts`` partitions the user
    chose (--partitions): as many of ``workers`` as hold a partition each within ``budget``
    beside this process (1: asked in this process, one partition at a time)."""
    per_part = PROCESS_BASE_BYTES + -(-spans * 5 // (4 * max(1, parts))) * PEAK_BYTES_PER_SPAN
    for count in range(min(max(1, workers), parts), 1, -1):
        if PROCESS_BASE_BYTES + count * per_part <= budget:
            return count
    return 1


def split_bytes(spans: int, filtered: bool = False, stored: int | None = None) -> int:
    """The memory the split of a store of ``spans`` spans takes over the deciding process' base
    (``SPLIT_BYTES``; ``filtered``: a ``--since`` or ``--service`` filter, whose window holds
    ``spans`` of the store's ``stored`` rows: those outside it are scanned too)."""
    if filtered:
        outside = max(0, (spans if stored is None else stored) - spans)
        return (
            SPLIT_FILTERED_BYTES
            + spans * SPLIT_FILTERED_BYTES_PER_SPAN
            + outside * SPLIT_FILTERED_OUTSIDE_BYTES_PER_SPAN
        )
    return SPLIT_BYTES + spans * SPLIT_BYTES_PER_SPAN


class BudgetError(ValueError):
    """The memory budget cannot hold the analysis (one line, for the CLI)."""


@dataclass(frozen=True)
class Plan:
    """How one analysis runs: ``parts`` partitions of whole traces on ``workers`` processes."""

    spans: int
    parts: int
    workers: int
    buckets: int = 0  # the spilled rows' buckets (``hourglass.analysis.spill``); 0: not spilled
    warm: bool = True  # the workers start anew while this process decides (``ProcessExecutor.idle``)
    # the workers are kept, not stopped, while this process decides: what they may still hold from
    # their last partition fits beside the decision (``ProcessExecutor.idle``)
    keep: bool = False
    # the kinds of ``DECIDE_BESIDE`` are decided in a thread of their own beside the others
    # (``partitions.decide``): two decisions' working sets fit at once beside the workers
    beside: bool = False
    # the store is split into partition files (``split_store``) beside the workers' first
    # partitions; False: before them, while they start (the split and their peaks do not fit at once)
    split_beside: bool = True
    # the store is split into partition files at all (``split_store``); False: the budget holds
    # not even the split beside the workers' bases, so each task reads its partition from the
    # store (``scan_partition``), as a store of fewer partitions is read
    split: bool = True
    # the span rows of the largest partition, where the store said (``loads``; 0: not known, the
    # partitions are about ``spans / parts`` each)
    largest_part: int = 0

    def describe(self, budget: int, cluster: str | None = None, cluster_workers: int = 0) -> str:
        """The plan's line: where its partitions run — ``workers`` processes of this machine, or
        the Dask ``cluster`` at that address with ``cluster_workers`` workers connected."""
        where = f"on {max(1, self.workers)} worker process{'es' if self.workers > 1 else ''}"
        if cluster is not None:
            connected = (
                f"{cluster_workers} Dask worker{'s' if cluster_workers != 1 else ''}"
                if cluster_workers
                else "no Dask worker yet"
            )
            where = f"on the Dask cluster at {cluster} ({connected})"
        spilled = f", resource rows spilled to {self.buckets} buckets" if self.buckets else ""
        return (
            f"{self.spans:,} spans in {self.parts} partitions of whole traces {where}{spilled} "
            f"(memory budget {budget / 2**30:.2f} GiB)"
        )


def plan(
    spans: int,
    budget: int,
    workers: int,
    largest_trace: tuple[str, int] | None = None,
    *,
    split: bool = False,
    filtered: bool = False,
    copies: int = 1,
    loads: PartitionLoads | None = None,
    stored: int | None = None,
) -> Plan:
    """The fewest partitions that keep the analysis within ``budget`` bytes on ``workers``
    processes (one partition, in this process, when everything fits: with ``copies`` 2, its
    spans twice, as an embedded ClickHouse's read of them is held beside their analysis). ``split``: the store is
    one that a run of ``SPLIT_MIN_PARTS`` partitions or more splits into partition files
    (``partitions.splits``: a DuckDB file of this machine), which this process does beside the workers'
    first partitions when the split (:func:`split_bytes`, more with ``filtered``: a ``--since``
    or ``--service`` filter, whose window holds ``spans`` of the store's ``stored`` rows) fits
    beside their peaks, else before them, while they start
    (``Plan.split_beside``), else not at all (``Plan.split`` False: each task reads its partition
    from the store, as without ``split``). A small budget costs the split's time (~1 s at 1M
    spans) or a read of the whole store per partition and pass, never more partitions nor a
    refused run: the partitions are those of the plan without ``split``."""
    chosen = _plan(spans, budget, workers, largest_trace, copies, loads)
    if not split or chosen.parts < SPLIT_MIN_PARTS:  # (too few partitions to be split)
        return chosen
    splitting = split_bytes(spans, filtered, stored)
    bases = (chosen.workers + 1) * PROCESS_BASE_BYTES
    peaks = chosen.workers * max(-(-spans // chosen.parts), chosen.largest_part) * PEAK_BYTES_PER_SPAN
    if bases + max(spans * ROWS_BYTES_PER_SPAN, splitting) + peaks <= budget:
        return chosen
    if bases + max(spans * ROWS_BYTES_PER_SPAN, splitting) <= budget:
        return replace(chosen, split_beside=False)
    return replace(chosen, split_beside=False, split=False)


def worker_room(spans: int, budget: int, workers: int) -> int:
    """Each of ``workers`` worker processes' room over its base, in bytes, in a run of ``spans``
    spans within ``budget``: the largest partition's extraction peak it can hold."""
    bases = (workers + 1) * PROCESS_BASE_BYTES
    # beside this process' trace summaries while they extract (a partition's peak), beside its
    # rows while they price (a partition's pricing)
    extracting = (budget - bases - spans * SUMMARY_BYTES_PER_SPAN) // workers
    pricing = (budget - bases - spans * ROWS_BYTES_PER_SPAN) // workers
    # the largest partition both allow, as the room of an extraction's peak
    return min(extracting, pricing * PEAK_BYTES_PER_SPAN // PRICE_BYTES_PER_SPAN)


def _plan(
    spans: int,
    budget: int,
    workers: int,
    largest_trace: tuple[str, int] | None = None,
    copies: int = 1,
    loads: PartitionLoads | None = None,
) -> Plan:
    """:func:`plan` of a store read by each task (not split)."""
    whole = PROCESS_BASE_BYTES + copies * spans * PEAK_BYTES_PER_SPAN
    if whole <= budget:
        return Plan(spans, 1, 1)
    workers = max(1, workers)
    per_worker = worker_room(spans, budget, workers)
    if per_worker < MIN_WORKER_BYTES and workers > 1:
        # fewer processes, each with room for a useful partition, beat hundreds of tiny ones (every
        # partition is one more scan of the store)
        return _plan(spans, budget, workers - 1, largest_trace, copies, loads)
    if per_worker <= 0:
        held = spans * ROWS_BYTES_PER_SPAN
        need = 2 * PROCESS_BASE_BYTES + held + 1_000 * PEAK_BYTES_PER_SPAN
        raise BudgetError(
            f"a memory budget of {budget / 2**30:.2f} GiB cannot hold the analysis of {spans:,} spans "
            f"(at least {need / 2**30:.2f} GiB): raise --memory-budget"
        )
    if largest_trace is not None and largest_trace[1] * PEAK_BYTES_PER_SPAN > per_worker:
        trace_id, count = largest_trace
        raise BudgetError(
            f"trace {trace_id} alone has {count:,} spans and needs about "
            f"{count * PEAK_BYTES_PER_SPAN / 2**30:.2f} GiB, more than the {per_worker / 2**30:.2f} GiB each of "
            f"{workers} worker(s) gets from a {budget / 2**30:.2f} GiB budget: raise --memory-budget or lower --workers"
        )
    deciding = PROCESS_BASE_BYTES + spans * DECIDE_BYTES_PER_SPAN
    if deciding > budget:  # the decision runs alone, once the workers are stopped
        raise BudgetError(
            f"a memory budget of {budget / 2**30:.2f} GiB cannot hold the decision over {spans:,} spans "
            f"(about {deciding / 2**30:.2f} GiB): raise --memory-budget"
        )
    # (``copies``: a caller plans them as that many workers, each a partition's room; with fewer,
    # each partition holds them in its worker's room)
    held_copies = copies if workers < copies else 1
    parts = max(2, -(-spans * held_copies * PEAK_BYTES_PER_SPAN // per_worker))
    # whole rounds of ``workers`` partitions: 7 on 2 workers ran the 7th alone while the other
    # worker idled (4 rounds of 1/7 of the work against 4 of 1/8); smaller partitions only use less
    parts = -(-parts // workers) * workers
    largest_part = 0
    if loads is not None and parts > 1:  # partitions of as many spans as planned, whatever the traces
        parts, largest_part = _balanced(
            parts, workers, per_worker // (held_copies * PEAK_BYTES_PER_SPAN), loads
        )
    buckets = max(1, -(-spans // BUCKET_SPANS))
    workers = min(workers, int(parts))
    # the workers of the pricing start while this process decides when their bases fit beside it
    warm = deciding + workers * PROCESS_BASE_BYTES <= budget
    # or they are kept as they are, when even their peaks over a partition fit beside it: two
    # fewer interpreters to start (~0.6 s of CPU each, on a core the decision would leave idle
    # only on an idle machine) and no wait for the old ones to exit
    per_part = max(-(-spans // parts), largest_part)
    keep = deciding + workers * (PROCESS_BASE_BYTES + per_part * PEAK_BYTES_PER_SPAN) <= budget
    # two kinds decided at once (``beside``): room for a second decision's working set beside the
    # first and beside what the workers hold meanwhile (their peaks when kept, their bases when warm)
    held = workers * PROCESS_BASE_BYTES if warm or keep else 0
    held += workers * per_part * PEAK_BYTES_PER_SPAN if keep else 0
    beside = deciding + spans * DECIDE_BYTES_PER_SPAN + held <= budget
    return Plan(spans, int(parts), workers, int(buckets), warm, keep, beside, largest_part=largest_part)


# a plan tries partition counts up to this many times the one its span count gives, when traces of
# very different sizes leave a partition of whole traces (``hash(trace_id) % parts``) above it
_MOST_PARTS_FACTOR = 8

# ``loads(counts)``: for each partition count, the span rows of its largest partition
PartitionLoads = Callable[[list[int]], dict[int, int]]


def _balanced(parts: int, workers: int, most: int, loads: PartitionLoads) -> tuple[int, int]:
    """(the fewest partitions, from ``parts`` on in steps of ``workers``, whose largest holds no
    more than ``most`` span rows, and its rows). A store's partitions are whole traces by a hash
    of their ids, so one of a few traces of 100k spans among small ones holds several of them by
    chance: at 3.1M spans in 16 partitions planned at 196k each, the largest held 368k and its
    worker peaked at 1.06 GiB, the run at 2.2 GiB under a 1.5 GiB budget. More partitions spread
    them, not steadily (64 held 217k there, 42 199k): each count is tried in turn, the first that
    fits taken (the count planned, on most stores: one look). When none up to
    ``_MOST_PARTS_FACTOR`` times as many fits (a few giant traces that keep meeting), the one
    whose largest is least."""
    best: tuple[int, int] | None = None
    for count in range(parts, parts * _MOST_PARTS_FACTOR + 1, workers):
        load = loads([count]).get(count, 0)
        if load <= most:
            return count, load
        if best is None or load < best[1]:
            best = (count, load)
    assert best is not None
    return best


def loads_of(hashes: Any, rows: Any) -> PartitionLoads:
    """:data:`PartitionLoads` of a store whose traces have these hashes of their ids (the
    store's own, as its partitions take them) and these span rows (numpy arrays)."""
    import numpy as np

    h = np.asarray(hashes, dtype=np.uint64)
    n = np.asarray(rows, dtype=np.int64)

    def loads(counts: list[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for count in counts:
            placed = (h % np.uint64(count)).astype(np.int64)
            out[count] = int(np.bincount(placed, weights=n, minlength=count).max()) if n.size else 0
        return out

    return loads
