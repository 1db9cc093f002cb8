"""Critical path of every trace, vectorised (Jaeger's critical path / CRISP, without recursion).

Rule (per span, as Jaeger's ``computeCriticalPath``): start at the span's end; take the
last-finishing *blocking* child that ends at or before the current point; that child is on the
path; move the current point to the child's start and repeat; time not covered by the chosen
children is the span's own (self) time on the path. Back-to-back siblings are sequential; a child
that starts up to the tolerance (:func:`hourglass.analysis.repair.tolerance_ns`) before the previous one ended
still counts as following it, so small overlaps from clock skew do not hide sequential work.

How it is computed without walking the tree span by span:

* The choice at a parent depends only on its own children. Children of all parents are sorted
  once by (parent, end); each child's predecessor in the chain ("the last child ending before I
  start") is one ``searchsorted`` over that sorted array, with groups made disjoint by offsets.
* Each parent's chain is then followed from its last-finishing child, all parents at once: one numpy
  step per chain position (the longest chain of sequential siblings bounds the number of steps).
* A span is on the critical path when it and all its ancestors are chain members (pointer jumping).
* Self time: the span's effective interval (clipped to its parent's start and to the start of the
  chain member after it) minus the effective intervals of its own chain children. Along the path the
  self times add up to the root's duration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hourglass.analysis.repair import pointer_jump_all, tolerance_ns


@dataclass
class CriticalPath:
    on_path: np.ndarray  # bool per row
    critical_ns: np.ndarray  # int64 per row: self time on the critical path (0 off the path)
    chain_member: np.ndarray  # bool per row: chosen in its parent's chain (root: True)
    effective_start: np.ndarray  # int64 per row
    effective_end: np.ndarray  # int64 per row
    predecessor: np.ndarray  # int64 per row: the blocking sibling it follows (-1: none), for what-if


def sibling_predecessor(
    parent: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray, member: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the member children (``member`` true, parent >= 0): sorted order by (parent, end) and,
    per sorted position, the sorted position of the last sibling ending before this one starts
    (within tolerance), or -1.

    Returns (rows_sorted, prev_pos, group_start_pos, group_end_pos).
    """
    rows = np.nonzero(member & (parent >= 0))[0]
    if rows.size == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, empty, empty
    par = parent[rows]
    order = _order_by_parent_and_end(par, start_ns[rows], end_ns[rows], start_ns[par])
    rows = rows[order]
    par = par[order]
    ends = end_ns[rows]
    n = rows.size
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    new_group[1:] = par[1:] != par[:-1]
    group_id = np.cumsum(new_group) - 1
    group_first = np.nonzero(new_group)[0]
    group_last = np.append(group_first[1:], n) - 1
    gstart = group_first[group_id]
    gend = group_last[group_id]
    # Disjoint key ranges per group: key = end - group's first end + offset, offsets separated by gaps.
    base = ends[group_first]
    span_len = ends[group_last] - base
    offsets = np.zeros(group_first.size, dtype=np.int64)
    if group_first.size > 1:
        offsets[1:] = np.cumsum(span_len[:-1] + 2)
    key = ends - base[group_id] + offsets[group_id]
    tol = tolerance_ns(end_ns[par] - start_ns[par])
    query = start_ns[rows] + tol - base[group_id]
    query = np.clip(query, -1, span_len[group_id]) + offsets[group_id]
    found = np.searchsorted(key, query, side="right") - 1
    positions = np.arange(n)
    prev = np.minimum(found, positions - 1)
    prev = np.where(prev >= gstart, prev, -1)
    return rows, prev, gstart, gend


_PACKED_LIMIT = 1 << 62
_VALUE_LIMIT = 1 << 61  # (an end minus a start stays inside int64)


def _order_by_parent_and_end(
    par: np.ndarray, start: np.ndarray, end: np.ndarray, parent_start: np.ndarray
) -> np.ndarray:
    """The order of rows by (parent, end, start, position). Usually one stable argsort of one int64
    key, parent and end packed (the end relative to the parent's start, which keeps it small), which
    is nearly sorted already: children follow their parent in the frame's order. Rows of one parent
    that end together keep their positions; that is the order by start too when their starts do not
    decrease, else (and when the key would not fit) two more argsorts."""
    n = par.size
    values = (end, start, parent_start)
    if n and max(max(abs(int(v.min())), abs(int(v.max()))) for v in values) < _VALUE_LIMIT:
        rel = end - parent_start
        low = int(rel.min())
        span = int(rel.max()) - low + 1
        if (int(par.max()) + 1) * span < _PACKED_LIMIT:
            order = np.argsort(par.astype(np.int64) * span + (rel - low), kind="stable")
            p, e, s = par[order], end[order], start[order]
            tie = (p[1:] == p[:-1]) & (e[1:] == e[:-1])
            if not (tie & (s[1:] < s[:-1])).any():
                return order
    # Sort by (parent, end, start) with two cheap argsorts instead of a 3-key lexsort: the stable
    # sort by start then end gives each row its rank, and parent * n + rank is a unique int64 key.
    by_start = np.argsort(start, kind="stable")
    by_end = by_start[np.argsort(end[by_start], kind="stable")]
    rank = np.empty(n, dtype=np.int64)
    rank[by_end] = np.arange(n)
    return np.argsort(par.astype(np.int64) * n + rank)


def compute_critical_path(
    parent: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray, blocking: np.ndarray
) -> CriticalPath:
    n = parent.size
    is_root = parent < 0
    rows, prev, gstart, gend = sibling_predecessor(parent, start_ns, end_ns, blocking)
    chain_member = is_root.copy()
    # "current point" each chain member was chosen against: parent end for the last-finishing child.
    current = end_ns.copy()
    if rows.size:
        last_positions = gend[np.nonzero(np.diff(gstart, append=-1))[0]]  # one per sibling group
        frontier = last_positions
        current[rows[frontier]] = end_ns[parent[rows[frontier]]]
        while frontier.size:
            chain_member[rows[frontier]] = True
            nxt = prev[frontier]
            keep = nxt >= 0
            nxt, src = nxt[keep], frontier[keep]
            current[rows[nxt]] = start_ns[rows[src]]
            frontier = nxt
    has = ~is_root
    p = np.where(has, parent, 0)
    eff_start = np.where(has, np.maximum(start_ns, start_ns[p]), start_ns)
    eff_end = np.where(has, np.minimum(np.minimum(end_ns, current), end_ns[p]), end_ns)
    eff_end = np.maximum(eff_end, eff_start)
    predecessor = np.full(n, -1, dtype=np.int64)
    if rows.size:
        has_prev = prev >= 0
        predecessor[rows[has_prev]] = rows[prev[has_prev]]
    on_path = pointer_jump_all(parent, chain_member)
    # Covered time of each chain child inside its parent's effective interval.
    child = np.nonzero(has & chain_member)[0]
    cp = parent[child]
    covered = np.maximum(
        0, np.minimum(eff_end[child], eff_end[cp]) - np.maximum(eff_start[child], eff_start[cp])
    )
    covered_sum = np.zeros(n, dtype=np.int64)
    np.add.at(covered_sum, cp, covered)
    self_time = np.maximum(0, eff_end - eff_start - covered_sum)
    critical_ns = np.where(on_path, self_time, 0).astype(np.int64)
    return CriticalPath(on_path, critical_ns, chain_member, eff_start, eff_end, predecessor)
