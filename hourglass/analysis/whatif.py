"""What-if savings: re-time traces as if a finding's interventions were applied.

Re-timing rule (the dependency structure is read from the original timings):

* A blocking child depends on the **latest sibling that ended before it started** (within the
  overlap tolerance of :mod:`hourglass.analysis.repair`) and keeps its gap after it; a child with no such
  sibling keeps its offset from the parent's start. Non-blocking children keep their offsets.
* A parent's end moves with the work that determined it: its duration changes by the change of
  its last-finishing blocking child's end (its own tail after that child is kept), minus any
  ``ShortenSpan`` applied to the parent itself. Changes propagate level by level to the root.
* ``RunConcurrently``: the members start together where the earliest one started, after the caller
  work that separated them (the sum of the gaps between consecutive members is kept, so only the
  calls' own time is overlapped: a conservative estimate). Siblings that waited for a member now
  wait for the longest one.
* ``ShortenSpan``: the span's duration is cut by ``by_ns`` (never below zero); children keep their
  offsets from its start.
* ``CollapseSpans``: the earliest member takes ``duration_ns``, the others take no time (their gaps
  are kept, as for ``RunConcurrently``).
* ``ScaleSelf``: the span's own time is scaled: the offsets and gaps of its blocking children (the
  caller work before and between them) and its tail after the last one; children keep their
  durations.
* ``CapConcurrency``: as ``RunConcurrently``, but the members, in start order, each take the first
  free slot of ``limit`` (greedy list scheduling); siblings that waited for a member wait for the
  member that ends last.

saved = old root duration − new root duration, per affected trace (all of a finding's occurrences in
one trace are applied together). A finding's impact: p50/p95 of that per-trace saving, the total,
and ``share_of_root_latency`` = total saved / sum of the root durations of the affected traces.

Everything runs on numpy arrays over the whole span frame: only the intervened spans and their
ancestors ("dirty" spans) are re-timed, all affected traces at once, one numpy step per tree level
that holds a dirty span (pointer jumping within a level for chains of siblings).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.critical_path import sibling_predecessor
from hourglass.analysis.model import (
    CapConcurrency,
    CollapseSpans,
    Finding,
    Intervention,
    Occurrence,
    RunConcurrently,
    ScaleSelf,
    ShortenSpan,
)
from hourglass.analysis.repair import pointer_jump_sum

# Intervention types in the engine's arrays.
SHORTEN, COLLAPSE, RUN_CONCURRENTLY, SCALE_SELF, CAP = 0, 1, 2, 3, 4
# the type above of each intervention kind code of :class:`InterventionColumns` (RunConcurrently,
# ShortenSpan, CollapseSpans, ScaleSelf, CapConcurrency)
_WHATIF_TYPE = np.array([RUN_CONCURRENTLY, SHORTEN, COLLAPSE, SCALE_SELF, CAP], dtype=np.int64)


@dataclass
class RowChanges:
    """Interventions given directly by row of the engine's arrays (a user's what-if over many spans:
    no per-span Python objects). Entry i puts ``rows[i]`` in intervention ``owner[i]``; per
    intervention: ``kinds`` (SHORTEN, COLLAPSE, RUN_CONCURRENTLY, SCALE_SELF, CAP), ``ivalues``
    (by_ns, duration_ns or limit) and ``fvalues`` (ScaleSelf factor)."""

    rows: np.ndarray
    owner: np.ndarray
    kinds: np.ndarray
    ivalues: np.ndarray
    fvalues: np.ndarray


@dataclass
class Impact:
    # the affected traces, in the order of ``saved_ns`` (empty from a partitioned pricing, which
    # keeps the numbers only: ``hourglass.analysis.partitions.merge_impacts``)
    trace_ids: list[str]
    saved_ns: np.ndarray  # per affected trace
    root_ns: np.ndarray  # old root duration per affected trace

    @property
    def total_ns(self) -> int:
        return int(self.saved_ns.sum())

    def as_dict(self) -> dict[str, float | None]:
        if self.saved_ns.size == 0:
            return {
                "saved_ms_p50": None,
                "saved_ms_p95": None,
                "saved_ms_total": None,
                "share_of_root_latency": None,
            }
        root_total = float(self.root_ns.sum())
        return {
            "saved_ms_p50": round(float(np.percentile(self.saved_ns, 50)) / 1e6, 3),
            "saved_ms_p95": round(float(np.percentile(self.saved_ns, 95)) / 1e6, 3),
            "saved_ms_total": round(self.total_ns / 1e6, 3),
            "share_of_root_latency": round(self.total_ns / root_total, 4) if root_total > 0 else 0.0,
        }


@dataclass
class _Plan:
    """One finding's interventions as per-row overrides (rows of the engine's arrays)."""

    dirty: np.ndarray  # bool, intervened rows and their ancestors
    shorten_ns: np.ndarray  # int64, sum of ShortenSpan cuts
    fixed_ns: np.ndarray  # int64, -1 = no override (CollapseSpans)
    removed: np.ndarray  # bool, collapsed away
    pred: np.ndarray  # int64, dependency per row after RunConcurrently overrides
    gap: np.ndarray  # int64, gap after pred (or offset from parent start when pred < 0)
    concurrent_set: np.ndarray  # int64, RunConcurrently group of a member, -1 otherwise
    waits_for_set: np.ndarray  # int64, RunConcurrently group a sibling waited for, -1 otherwise
    self_cut_ns: np.ndarray | None = None  # int64, own time removed by ScaleSelf (< 0: added)
    set_limit: np.ndarray | None = None  # int64 per concurrent set: CapConcurrency slots, -1 none
    set_position: np.ndarray | None = None  # int64 per row: start-order position in its set


class Retimer:
    """Re-timing engine over arrays of one span frame (a whole context or a single trace)."""

    def __init__(self, spans: pl.DataFrame, predecessor: np.ndarray | None = None) -> None:
        """``predecessor``: the blocking sibling each row follows, when already known (the context's
        critical path computed it with the same rule); computed here otherwise."""
        self.spans = spans
        n = spans.height
        self.n = n
        self.start = spans["start_ns"].to_numpy().astype(np.int64)
        self.end = spans["end_ns"].to_numpy().astype(np.int64)
        self.dur = self.end - self.start
        self.blocking = spans["blocking"].to_numpy().astype(bool)
        self.depth = spans["depth"].to_numpy().astype(np.int64)
        parent = spans["parent_row"].fill_null(-1).to_numpy().astype(np.int64)
        if n and "row" in spans.columns:
            first_row = int(spans["row"][0])
            rows = spans["row"].to_numpy().astype(np.int64)
            if not np.array_equal(rows, np.arange(first_row, first_row + n)):
                raise ValueError("Retimer needs a contiguous row range (one trace or a whole context)")
            parent = np.where(parent >= 0, parent - first_row, -1)
            if ((parent < -1) | (parent >= n)).any():
                raise ValueError("a span's parent lies outside the given spans")
        self.parent = parent
        if predecessor is not None and predecessor.size == n:
            pred = predecessor
        else:
            pred = np.full(n, -1, dtype=np.int64)
            rows_sorted, prev, _, _ = sibling_predecessor(parent, self.start, self.end, self.blocking)
            has_prev = prev >= 0
            pred[rows_sorted[has_prev]] = rows_sorted[prev[has_prev]]
        self.pred = pred
        p = np.where(parent >= 0, parent, 0)
        self.base_gap = np.where(
            pred >= 0, self.start - self.end[np.where(pred >= 0, pred, 0)], self.start - self.start[p]
        )
        # children by parent (CSR) for expanding a set of parents into their children
        child_rows = np.nonzero(parent >= 0)[0]
        order = np.argsort(parent[child_rows], kind="stable")
        self.child_rows = child_rows[order]
        counts = np.bincount(parent[child_rows], minlength=n) if n else np.zeros(0, dtype=np.int64)
        self.child_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # (trace_id, span_id) -> row: 64-bit hash keys sorted once, matches verified with a second,
        # independently seeded hash of each id (see rows_of).
        hashed = spans.select(
            pl.struct("trace_id", "span_id").hash().alias("k"),
            pl.col("trace_id").hash(seed=0x5EED).alias("t"),
            pl.col("span_id").hash(seed=0x5EED).alias("s"),
        )
        keys = hashed["k"].to_numpy()
        self._key_order = np.argsort(keys)
        self._sorted_keys = keys[self._key_order]
        self._check_trace = hashed["t"].to_numpy()
        self._check_span = hashed["s"].to_numpy()

    # -- helpers -------------------------------------------------------------------------------

    def _children_of(self, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(children rows, index into ``parents`` of each child's parent)."""
        lo = self.child_offsets[parents]
        counts = self.child_offsets[parents + 1] - lo
        total = int(counts.sum())
        if total == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        owner = np.repeat(np.arange(parents.size), counts)
        starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        return self.child_rows[np.arange(total) + starts], owner

    def _ancestors_and_self(self, rows: np.ndarray) -> np.ndarray:
        mark = np.zeros(self.n, dtype=bool)
        frontier = rows
        while frontier.size:  # duplicates are harmless: the frontier never grows
            frontier = frontier[~mark[frontier]]
            mark[frontier] = True
            frontier = self.parent[frontier]
            frontier = frontier[frontier >= 0]
        return mark

    def rows_of(self, keys: list[tuple[str, str]]) -> np.ndarray:
        """Row per (trace_id, span_id); -1 where unknown."""
        return self._rows_of_columns([k[0] for k in keys], [k[1] for k in keys])

    def _rows_of_columns(
        self, trace_ids: list[str] | pl.Series, span_ids: list[str] | pl.Series
    ) -> np.ndarray:
        """Row per (trace_ids[i], span_ids[i]); -1 where unknown."""
        if len(trace_ids) == 0 or self.n == 0:
            return np.full(len(trace_ids), -1, dtype=np.int64)
        probe = pl.DataFrame(
            {"trace_id": trace_ids, "span_id": span_ids},
            schema={"trace_id": pl.String, "span_id": pl.String},
        ).select(
            pl.struct("trace_id", "span_id").hash().alias("k"),
            pl.col("trace_id").hash(seed=0x5EED).alias("t"),
            pl.col("span_id").hash(seed=0x5EED).alias("s"),
        )
        query = probe["k"].to_numpy()
        pos = np.minimum(np.searchsorted(self._sorted_keys, query), self.n - 1)
        found = np.where(self._sorted_keys[pos] == query, self._key_order[pos], -1).astype(np.int64)
        ok = found >= 0
        rows = found[ok]
        verified = (self._check_trace[rows] == probe["t"].to_numpy()[ok]) & (
            self._check_span[rows] == probe["s"].to_numpy()[ok]
        )
        found[np.nonzero(ok)[0][~verified]] = -1
        return found

    # -- plan ----------------------------------------------------------------------------------

    def plan(
        self, finding: Finding | None, trace_ids: set[str] | None = None, extra: RowChanges | None = None
    ) -> _Plan:
        """The finding's interventions (and ``extra`` ones already given by row) as per-row
        overrides, vectorised over all its occurrences."""
        rows, owner, types, ivalues, fvalues = self._resolve(finding, trace_ids)
        if extra is not None and extra.rows.size:
            base = ivalues.size
            rows = np.concatenate([rows, extra.rows.astype(np.int64)])
            owner = np.concatenate([owner, extra.owner.astype(np.int64) + base])
            types = np.concatenate([types, extra.kinds.astype(np.int64)[extra.owner]])
            ivalues = np.concatenate([ivalues, extra.ivalues.astype(np.int64)])
            fvalues = np.concatenate([fvalues, extra.fvalues.astype(np.float64)])
        return self._plan_from(rows, owner, types, ivalues, fvalues)

    def _resolve(
        self, finding: Finding | None, trace_ids: set[str] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(rows, intervention index per row, its type per row, int value and float value per
        intervention): one entry per (intervention, span id), every span id resolved in one join."""
        if finding is None:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, empty, np.zeros(0, dtype=np.float64)
        # read off the finding's occurrence columns: only those of ``trace_ids`` taken
        occurrences = finding.occurrence_table
        wanted = None if trace_ids is None else np.flatnonzero(occurrences.in_traces(trace_ids))
        ivs = occurrences.intervention_columns(wanted)
        iv_type = _WHATIF_TYPE[ivs.kind]
        # the parameter per type: a shortening or a batched duration (>= 0), a pool's limit
        # (>= 1), a factor (>= 0; NaN as 0) for ScaleSelf, which alone reads a float
        iv_value = np.where(
            (iv_type == SHORTEN) | (iv_type == COLLAPSE),
            np.maximum(ivs.int_param, 0),
            np.where(iv_type == CAP, np.maximum(ivs.int_param, 1), 0),
        ).astype(np.int64)
        factor = ivs.float_param
        iv_float = np.where(iv_type == SCALE_SELF, np.where(factor > 0.0, factor, 0.0), 1.0).astype(
            np.float64
        )
        key_traces = occurrences.trace_ids_at(np.repeat(ivs.owner, ivs.span_counts))
        iv_of_key = np.repeat(np.arange(len(ivs.kind), dtype=np.int64), ivs.span_counts)
        rows = self._rows_of_columns(key_traces, ivs.span_ids)
        known = rows >= 0
        rows, owner = rows[known], iv_of_key[known]
        types = iv_type[owner] if owner.size else owner
        return rows, owner, types, iv_value, iv_float

    def _plan_from(
        self, rows: np.ndarray, owner: np.ndarray, types: np.ndarray, values: np.ndarray, fvalues: np.ndarray
    ) -> _Plan:
        n = self.n
        shorten = np.zeros(n, dtype=np.int64)
        self_cut = np.zeros(n, dtype=np.int64)
        fixed = np.full(n, -1, dtype=np.int64)
        removed = np.zeros(n, dtype=bool)
        pred = self.pred.copy()
        gap = self.base_gap.copy()
        cset = np.full(n, -1, dtype=np.int64)
        waits = np.full(n, -1, dtype=np.int64)
        touched = [rows[(types != RUN_CONCURRENTLY) & (types != CAP)]]
        # ShortenSpan
        is_short = types == SHORTEN
        np.add.at(shorten, rows[is_short], values[owner[is_short]])
        # Members of one intervention in start order; the first one of each is its anchor.
        order = np.lexsort((rows, self.start[rows], owner))
        rows, owner, types = rows[order], owner[order], types[order]
        keep = np.ones(rows.size, dtype=bool)
        keep[1:] = (rows[1:] != rows[:-1]) | (owner[1:] != owner[:-1])  # a span named twice counts once
        rows, owner, types = rows[keep], owner[keep], types[keep]
        first_of = np.ones(rows.size, dtype=bool)
        first_of[1:] = owner[1:] != owner[:-1]
        # CollapseSpans: the anchor takes the batched duration, the rest take none.
        col = types == COLLAPSE
        anchor = col & first_of
        fixed[rows[anchor]] = values[owner[anchor]]
        rest = col & ~first_of
        fixed[rows[rest]] = 0
        removed[rows[rest]] = True
        # RunConcurrently and CapConcurrency: blocking siblings of one parent only.
        run = ((types == RUN_CONCURRENTLY) | (types == CAP)) & self.blocking[rows]
        r_rows, r_owner = rows[run], owner[run]
        r_types = types[run]
        set_limit = np.zeros(0, dtype=np.int64)
        set_pos = np.full(n, -1, dtype=np.int64)
        if r_rows.size:
            group_first = np.ones(r_rows.size, dtype=bool)
            group_first[1:] = r_owner[1:] != r_owner[:-1]
            group_id = np.cumsum(group_first) - 1
            starts = np.nonzero(group_first)[0]
            sizes = np.diff(np.append(starts, r_rows.size))
            parents = self.parent[r_rows]
            same_parent = np.minimum.reduceat(parents, starts) == np.maximum.reduceat(parents, starts)
            valid = (sizes >= 2) & same_parent
            gaps = np.zeros(r_rows.size, dtype=np.int64)
            gaps[1:] = np.clip(self.start[r_rows[1:]] - self.end[r_rows[:-1]], 0, None)
            gaps[group_first] = 0
            kept = np.add.reduceat(gaps, starts)
            # a cap below the set's size schedules it on that many slots; otherwise no limit (-1)
            limits = np.where(r_types[starts] == CAP, values[r_owner[starts]], -1)
            set_limit = np.where((limits > 0) & (limits < sizes), limits, -1)
            position = np.arange(r_rows.size) - starts[group_id]
            member = valid[group_id]
            r_rows, group_id, position = r_rows[member], group_id[member], position[member]
            anchor_rows = r_rows[np.nonzero(group_first[member])[0]] if r_rows.size else r_rows
            anchor_of_group = np.full(valid.size, -1, dtype=np.int64)
            anchor_of_group[group_id[group_first[member]]] = anchor_rows
            anchors = anchor_of_group[group_id]
            pred[r_rows] = self.pred[anchors]
            gap[r_rows] = self.base_gap[anchors] + kept[group_id]
            cset[r_rows] = group_id
            set_pos[r_rows] = position
            # Siblings that waited for a member now wait for the whole set.
            has_pred = self.pred >= 0
            pred_set = np.where(has_pred, cset[np.where(has_pred, self.pred, 0)], -1)
            dependents = np.nonzero((pred_set >= 0) & (cset < 0))[0]
            waits[dependents] = pred_set[dependents]
            touched.append(r_rows)
        # ScaleSelf: the caller work before, between and after the blocking children scales.
        scale = types == SCALE_SELF
        s_rows, s_factor = rows[scale], fvalues[owner[scale]]
        if s_rows.size:
            s_rows, first = np.unique(s_rows, return_index=True)
            s_factor = s_factor[first]
            factor_of = np.ones(n, dtype=np.float64)
            factor_of[s_rows] = s_factor
            children, own = self._children_of(s_rows)
            keep_children = self.blocking[children]
            children, own = children[keep_children], own[keep_children]
            last_end = np.zeros(s_rows.size, dtype=np.int64)
            if children.size:
                np.maximum.at(last_end, own, self.end[children] - self.start[s_rows[own]])
                g = gap[children]
                gap[children] = np.where(g > 0, np.rint(g * s_factor[own]).astype(np.int64), g)
            tail = np.maximum(0, self.dur[s_rows] - last_end)
            self_cut[s_rows] = tail - np.rint(tail * s_factor).astype(np.int64)
        all_touched = np.concatenate(touched) if touched else np.empty(0, dtype=np.int64)
        dirty = self._ancestors_and_self(all_touched) if all_touched.size else np.zeros(n, dtype=bool)
        return _Plan(dirty, shorten, fixed, removed, pred, gap, cset, waits, self_cut, set_limit, set_pos)

    # -- re-time -------------------------------------------------------------------------------

    def retime(self, plan: _Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(new duration, relative end inside the parent, relative-end-known flag) per row."""
        new_dur = self.dur.copy()
        rel_end = np.zeros(self.n, dtype=np.int64)
        rel_known = np.zeros(self.n, dtype=bool)
        dirty_rows = np.nonzero(plan.dirty)[0]
        if dirty_rows.size == 0:
            return new_dur, rel_end, rel_known
        local = np.full(self.n, -1, dtype=np.int64)
        depths = self.depth[dirty_rows]
        order = np.argsort(-depths, kind="stable")
        dirty_rows, depths = dirty_rows[order], depths[order]
        bounds = np.nonzero(np.diff(depths))[0] + 1
        for level in np.split(dirty_rows, bounds):
            children, owner = self._children_of(level)
            keep = self.blocking[children]
            children, owner = children[keep], owner[keep]
            delta = np.zeros(level.size, dtype=np.int64)
            if children.size:
                pred = plan.pred[children].copy()
                waits = plan.waits_for_set[children]
                # a concurrent set's member ends at its slot's end (its own duration unless capped)
                span_of = new_dur[children]
                sets = plan.concurrent_set[children]
                if plan.set_limit is not None and plan.set_position is not None and (sets >= 0).any():
                    in_set = np.nonzero(sets >= 0)[0]
                    capped = in_set[plan.set_limit[sets[in_set]] > 0]
                    if capped.size:
                        span_of = span_of.copy()
                        span_of[capped] = _schedule_ends(
                            sets[capped],
                            plan.set_position[children[capped]],
                            new_dur[children[capped]],
                            plan.set_limit,
                        )
                if (waits >= 0).any():
                    in_set = np.nonzero(sets >= 0)[0]
                    msets = sets[in_set]
                    # the member that ends last (members of one set are released together)
                    by = np.lexsort((-span_of[in_set], msets))
                    first_of_set = np.ones(by.size, dtype=bool)
                    first_of_set[1:] = msets[by][1:] != msets[by][:-1]
                    best = np.full(int(plan.concurrent_set.max()) + 1, -1, dtype=np.int64)
                    best[msets[by][first_of_set]] = children[in_set][by][first_of_set]
                    w = waits >= 0
                    pred[w] = best[waits[w]]
                value = plan.gap[children] + span_of
                local[children] = np.arange(children.size)
                local_pred = np.where(pred >= 0, local[np.where(pred >= 0, pred, 0)], -1)
                ends = pointer_jump_sum(local_pred, value)
                local[children] = -1
                rel_end[children] = ends
                rel_known[children] = True
                parent_start = self.start[level[owner]]
                old_max = np.full(level.size, np.iinfo(np.int64).min, dtype=np.int64)
                new_max = old_max.copy()
                np.maximum.at(old_max, owner, self.end[children] - parent_start)
                np.maximum.at(new_max, owner, ends)
                has = old_max > np.iinfo(np.int64).min
                delta[has] = new_max[has] - old_max[has]
            cut = plan.shorten_ns[level]
            if plan.self_cut_ns is not None:
                cut = cut + plan.self_cut_ns[level]
            dur = np.maximum(0, self.dur[level] - cut + delta)
            fixed = plan.fixed_ns[level]
            new_dur[level] = np.where(fixed >= 0, fixed, dur)
        return new_dur, rel_end, rel_known

    def _compression(self, plan: _Plan, new_dur: np.ndarray) -> np.ndarray:
        """Per row, the factor by which shortened ancestors compress its time: the work inside a
        ``ShortenSpan`` (a straggler's server span and its queries, say) gets faster with it, so
        its untouched descendants are scaled into the shortened span instead of sticking out of it."""
        factor = np.ones(self.n, dtype=np.float64)
        shortened = np.nonzero(plan.shorten_ns > 0)[0]
        if shortened.size == 0:
            return factor
        ratio = np.ones(self.n, dtype=np.float64)
        has_dur = self.dur[shortened] > 0
        ratio[shortened[has_dur]] = new_dur[shortened[has_dur]] / self.dur[shortened[has_dur]]
        frontier = shortened
        while frontier.size:  # top-down through the shortened subtrees, one level per step
            children, owner = self._children_of(frontier)
            if children.size == 0:
                break
            factor[children] = factor[frontier[owner]] * ratio[frontier[owner]]
            frontier = children
        return factor

    def new_times(self, plan: _Plan) -> tuple[np.ndarray, np.ndarray]:
        """New absolute (start, end) per row."""
        new_dur, rel_end, rel_known = self.retime(plan)
        has = self.parent >= 0
        p = np.where(has, self.parent, 0)
        offset = self.start - self.start[p]
        compress = self._compression(plan, new_dur)
        scaled = ~plan.dirty & (compress < 1.0)
        new_dur = np.where(scaled, (self.dur * compress).astype(np.int64), new_dur)
        offset = np.where(scaled, (offset * compress).astype(np.int64), offset)
        parent_dirty = plan.dirty[p] & has
        rel_start = np.where(parent_dirty & rel_known & ~scaled, rel_end - new_dur, offset)
        rel_start = np.where(has, rel_start, 0)
        top = np.arange(self.n)
        for _ in range(64):
            nxt = np.where(self.parent[top] >= 0, self.parent[top], top)
            if np.array_equal(nxt, top):
                break
            top = nxt
        new_start = self.start[top] + pointer_jump_sum(self.parent, rel_start)
        return new_start, new_start + new_dur


def _schedule_ends(sets: np.ndarray, position: np.ndarray, dur: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """End of each member of capped concurrent sets, relative to the set's release: members in start
    order (``position``) each take the slot of their set that frees first (greedy list scheduling on
    ``limit[set]`` slots). One numpy step per position, all sets at once."""
    ids, local = np.unique(sets, return_inverse=True)
    width = int(position.max()) + 1
    slots = int(limit[ids].max())
    out = np.zeros(sets.size, dtype=np.int64)
    matrix = np.full((ids.size, width), -1, dtype=np.int64)
    matrix[local, position] = np.arange(sets.size)
    # batches of sets keep the slot matrix small
    batch = max(1, 4_000_000 // max(slots, 1))
    for lo in range(0, ids.size, batch):
        hi = min(ids.size, lo + batch)
        free = np.zeros((hi - lo, slots), dtype=np.int64)
        free[np.arange(slots)[None, :] >= limit[ids[lo:hi]][:, None]] = np.iinfo(np.int64).max
        for j in range(width):
            members = matrix[lo:hi, j]
            has = np.nonzero(members >= 0)[0]
            if has.size == 0:
                continue
            m = members[has]
            slot = np.argmin(free[has], axis=1)
            end = free[has, slot] + dur[m]
            free[has, slot] = end
            out[m] = end
    return out


class WhatIf:
    """Savings of findings over one analysis context.

    The saving is measured at the root of the subtree that holds the intervention: the trace root for
    a complete trace; the orphan's subtree root when spans above it are missing (a saving inside an
    orphaned subtree is real even though the trace cannot say how it reaches the true root). Several
    subtrees of one trace add up; their root durations make the trace's ``root_ns``.
    """

    def __init__(self, ctx: AnalysisContext, predecessor: np.ndarray | None = None) -> None:
        """``predecessor``: the blocking sibling each row of ``ctx.spans`` follows, when the
        context has no critical path of its own that knows it (a pricing context built from the
        spans an extraction repaired: ``hourglass.analysis.partitions.Prepared``)."""
        self.ctx = ctx
        if predecessor is None and ctx.critical is not None:
            predecessor = ctx.critical.predecessor
        self.engine = Retimer(ctx.spans, predecessor)
        trace_ids = ctx.spans["trace_id"]
        self._trace_index = (trace_ids != trace_ids.shift(1)).fill_null(True).cum_sum().to_numpy() - 1
        self._trace_ids = trace_ids
        self._is_root = self.engine.parent < 0

    @classmethod
    def of(cls, ctx: AnalysisContext) -> WhatIf:
        """The context's engine, built once (its arrays and id index are read-only after
        construction): the pricing, the designs' call statistics and the workstreams share it."""
        cached = ctx.cache.get("whatif")
        if not isinstance(cached, WhatIf) or cached.ctx is not ctx:
            cached = cls(ctx)
            ctx.cache["whatif"] = cached
        return cached

    def impact(self, finding: Finding, *, trace_ids: bool = True) -> Impact:
        """The finding's saving per affected trace; without ``trace_ids``, the numbers only (its
        ``trace_ids`` empty: a partitioned pricing ships and keeps nothing else)."""
        if not finding.occurrences or not finding.occurrence_table.any_interventions():
            ids = finding.trace_ids if trace_ids else []
            return Impact(ids, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        plan = self.engine.plan(finding)
        new_dur, _, _ = self.engine.retime(plan)
        roots = np.nonzero(plan.dirty & self._is_root)[0]
        if roots.size == 0:
            return Impact([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        old = self.engine.dur[roots]
        saved = old - new_dur[roots]  # net: a change that makes a trace slower counts against it
        traces, first, inverse = np.unique(self._trace_index[roots], return_index=True, return_inverse=True)
        saved_per_trace = np.bincount(inverse, weights=saved, minlength=traces.size).astype(np.int64)
        root_per_trace = np.bincount(inverse, weights=old, minlength=traces.size).astype(np.int64)
        ids = self._trace_ids.gather(pl.Series(roots[first])).to_list() if trace_ids else []
        return Impact(ids, saved_per_trace, root_per_trace)


def _finding_from_recommendation(rec: Mapping[str, Any], spans: pl.DataFrame) -> Finding:
    """A Finding carrying the interventions a report recommendation recorded for this trace
    (``evidence.interventions``); when the report has none for it, the recommendation's detector is
    run on the trace and its finding with the same id is used."""
    trace_id = str(spans["trace_id"][0]) if spans.height else ""
    recorded = ((rec.get("evidence") or {}).get("interventions") or {}).get(trace_id)
    if recorded:
        return Finding(
            kind=str(rec.get("kind", "")),
            category=rec.get("category", "parallelization"),
            service=str(rec.get("service", "")),
            operation=str(rec.get("operation", "")),
            targets=list(rec.get("targets") or []),
            occurrences=[Occurrence(trace_id, (), tuple(intervention_from_dict(d) for d in recorded))],
            confidence=float(rec.get("confidence") or 0.0),
        )
    from hourglass.analysis.detectors import DETECTORS

    detect = DETECTORS.get(str(rec.get("kind")))
    if detect is not None:
        for finding in detect(AnalysisContext.from_table(spans)):
            if finding.id == rec.get("id"):
                return finding
    return Finding(str(rec.get("kind", "")), "parallelization", "", "", [], [], 0.0)


def retime_trace(spans_of_one_trace: pl.DataFrame, finding: Finding | Mapping[str, Any]) -> pl.DataFrame:
    """The trace's spans with ``new_start_ns``, ``new_end_ns`` and ``removed`` after applying the
    finding's interventions for this trace (the HTML report draws "after" from it).

    ``finding`` is a :class:`Finding` or a report recommendation dict. ``spans_of_one_trace`` holds
    spans of an :class:`AnalysisContext` (with its ``row``/``parent_row`` columns) or raw span rows
    (they are repaired first)."""
    spans = spans_of_one_trace
    if "parent_row" not in spans.columns or "blocking" not in spans.columns:
        spans = AnalysisContext.from_table(spans).spans
    else:
        spans = spans.sort("row")
    trace_ids = set(spans["trace_id"].unique().to_list())
    if len(trace_ids) > 1:
        raise ValueError("retime_trace takes the spans of one trace")
    if not isinstance(finding, Finding):
        finding = _finding_from_recommendation(finding, spans)
    engine = Retimer(spans)
    plan = engine.plan(finding, trace_ids=trace_ids)
    new_start, new_end = engine.new_times(plan)
    return spans.with_columns(
        pl.Series("new_start_ns", new_start),
        pl.Series("new_end_ns", new_end),
        pl.Series("removed", plan.removed),
    )


def intervention_to_dict(iv: Intervention) -> dict[str, Any]:
    if isinstance(iv, RunConcurrently):
        return {"type": "run_concurrently", "span_ids": list(iv.span_ids)}
    if isinstance(iv, ShortenSpan):
        return {"type": "shorten_span", "span_id": iv.span_id, "by_ns": int(iv.by_ns)}
    if isinstance(iv, ScaleSelf):
        return {"type": "scale_self", "span_id": iv.span_id, "factor": float(iv.factor)}
    if isinstance(iv, CapConcurrency):
        return {"type": "cap_concurrency", "span_ids": list(iv.span_ids), "limit": int(iv.limit)}
    return {"type": "collapse_spans", "span_ids": list(iv.span_ids), "duration_ns": int(iv.duration_ns)}


def intervention_from_dict(d: Mapping[str, Any]) -> Intervention:
    kind = d.get("type")
    if kind == "run_concurrently":
        return RunConcurrently(tuple(str(s) for s in d["span_ids"]))
    if kind == "shorten_span":
        return ShortenSpan(str(d["span_id"]), int(d["by_ns"]))
    if kind == "collapse_spans":
        return CollapseSpans(tuple(str(s) for s in d["span_ids"]), int(d["duration_ns"]))
    if kind == "scale_self":
        return ScaleSelf(str(d["span_id"]), float(d["factor"]))
    if kind == "cap_concurrency":
        return CapConcurrency(tuple(str(s) for s in d["span_ids"]), int(d["limit"]))
    raise ValueError(f"unknown intervention type {kind!r}")
