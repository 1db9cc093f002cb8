"""The critical path of an endpoint across traces (CRISP-style aggregation, vectorised).

``endpoint_critical_path(ctx, service, operation)`` takes every trace whose root span is
(``service``, ``operation``) and aggregates the critical path that :mod:`hourglass.analysis.critical_path`
computed per span (``on_critical_path``, ``critical_ns`` = self time on the path)::

    {"service", "operation", "traces", "root_ms_p50", "root_ms_p95",
     "operations": [{"service", "operation", "traces", "ms_p50", "ms_p95", "ms_total", "share"}],
     "paths": [{"steps": ["svc:op", ...], "traces", "share_of_traces", "root_ms_p50"}],
     "icicle": [{"id", "parent", "service", "operation", "depth", "ms", "self_ms"}]}

* ``operations``: per (service, operation), its self time on the path summed per trace; ``ms_p50``
  / ``ms_p95`` over the traces where it is on the path (``traces`` of them); ``share`` = its total
  / the total self time on the path of all traces (the self times along a path add up to the root's
  duration, so this is its share of the endpoint's latency; the shares sum to 1).
* ``paths``: how the path varies: each trace's path as the sequence of (service, operation) in time
  order (consecutive repeats folded into one step: an N+1 loop is one step however long), the most
  frequent first.
* ``icicle``: the path as a call tree merged across traces (a node per distinct stack of
  operations from the root), ``ms`` the node's time on the path including its descendants and
  ``self_ms`` its own, both per trace on average; nodes below ``MIN_ICICLE_SHARE`` of the root are
  left out.

Only spans in the trace root's own tree count (an orphaned subtree has a path of its own that does
not decide the root's end). Everything is polars/numpy over the on-path spans.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext

TOP_PATHS = 5
MAX_PATH_STEPS = 40
MAX_ICICLE_NODES = 150
MIN_ICICLE_SHARE = 0.005
TOP_ENDPOINTS = 10


def _ms(expr: pl.Expr) -> pl.Expr:
    return (expr / 1e6).round(3)


def endpoints(ctx: AnalysisContext) -> pl.DataFrame:
    """(service, operation, traces) of the trace roots, the busiest first."""
    return (
        ctx.traces.group_by(pl.col("root_service").alias("service"), pl.col("root_name").alias("operation"))
        .agg(pl.len().alias("traces"))
        .sort(["traces", "service", "operation"], descending=[True, False, False])
    )


def endpoint_critical_path(
    ctx: AnalysisContext,
    service: str,
    operation: str,
    *,
    top_paths: int = TOP_PATHS,
    icicle: bool = True,
    max_operations: int | None = None,
    max_icicle_nodes: int = MAX_ICICLE_NODES,
    on_path_spans: pl.DataFrame | None = None,
) -> dict[str, Any] | None:
    """The aggregated critical path of the traces rooted at (service, operation); None when no
    trace is."""
    roots = ctx.traces.filter((pl.col("root_service") == service) & (pl.col("root_name") == operation))
    if roots.height == 0:
        return None
    # on-path spans of those traces, in their root's own tree
    if on_path_spans is None:
        on_path_spans = on_path_frame(ctx)
    on_path = on_path_spans.join(
        roots.select("trace_id", pl.col("root_span_id").alias("_root")), on="trace_id", how="inner"
    )
    on_path = on_path.filter(pl.col("root_span_id") == pl.col("_root")).drop("_root")
    n_traces = roots.height
    root_stats = roots.select(
        _ms(pl.col("root_duration_ns").quantile(0.5, interpolation="linear")).alias("p50"),
        _ms(pl.col("root_duration_ns").quantile(0.95, interpolation="linear")).alias("p95"),
    ).row(0)
    per_trace = on_path.group_by("trace_id", "service", "name").agg(pl.col("critical_ns").sum().alias("ns"))
    grand_total = int(per_trace["ns"].sum() or 0)
    ops = (
        per_trace.group_by("service", "name")
        .agg(
            pl.len().alias("traces"),
            _ms(pl.col("ns").quantile(0.5, interpolation="linear")).alias("ms_p50"),
            _ms(pl.col("ns").quantile(0.95, interpolation="linear")).alias("ms_p95"),
            pl.col("ns").sum().alias("_ns"),
        )
        .with_columns(
            _ms(pl.col("_ns")).alias("ms_total"),
            (pl.col("_ns") / grand_total if grand_total > 0 else pl.lit(0.0)).round(4).alias("share"),
        )
        .sort(["_ns", "service", "name"], descending=[True, False, False])
        .select(
            "service", pl.col("name").alias("operation"), "traces", "ms_p50", "ms_p95", "ms_total", "share"
        )
    )
    out: dict[str, Any] = {
        "service": service,
        "operation": operation,
        "traces": n_traces,
        "root_ms_p50": root_stats[0],
        "root_ms_p95": root_stats[1],
        "operations": (ops if max_operations is None else ops.head(max_operations)).to_dicts(),
        "paths": _paths(on_path, roots, n_traces, top_paths),
    }
    if icicle:
        out["icicle"] = _icicle(ctx, on_path, n_traces, max_icicle_nodes)
    return out


def _paths(on_path: pl.DataFrame, roots: pl.DataFrame, n_traces: int, top: int) -> list[dict[str, Any]]:
    step = pl.col("service") + pl.lit(":") + pl.col("name")
    ordered = on_path.sort(["trace_id", "start_ns", "depth"]).select("trace_id", step.alias("step"))
    folded = ordered.filter(
        (pl.col("step") != pl.col("step").shift(1))
        | (pl.col("trace_id") != pl.col("trace_id").shift(1))
        | pl.col("step").shift(1).is_null()
    )
    keyed = (
        folded.group_by("trace_id", maintain_order=True)
        .agg(pl.col("step").alias("steps"))
        .with_columns(pl.col("steps").list.join("\u001f").alias("key"))
        .join(roots.select("trace_id", "root_duration_ns"), on="trace_id")
    )
    grouped = (
        keyed.group_by("key")
        .agg(
            pl.len().alias("traces"),
            pl.col("steps").first(),
            _ms(pl.col("root_duration_ns").quantile(0.5, interpolation="linear")).alias("root_ms_p50"),
        )
        .sort(["traces", "key"], descending=[True, False])
        .head(top)
    )
    out = []
    for row in grouped.iter_rows(named=True):
        steps = list(row["steps"])
        if len(steps) > MAX_PATH_STEPS:
            steps = [*steps[: MAX_PATH_STEPS - 1], f"… {len(steps) - MAX_PATH_STEPS + 1} more"]
        out.append(
            {
                "steps": steps,
                "traces": int(row["traces"]),
                "share_of_traces": round(row["traces"] / n_traces, 4) if n_traces else 0.0,
                "root_ms_p50": row["root_ms_p50"],
            }
        )
    return out


def _icicle(
    ctx: AnalysisContext, on_path: pl.DataFrame, n_traces: int, max_nodes: int = MAX_ICICLE_NODES
) -> list[dict[str, Any]]:
    """The on-path spans merged by stack (root … span) into a tree, level by level."""
    if on_path.height == 0:
        return []
    frame = on_path.select("row", "parent_row", "depth", "critical_ns", "service", "name").sort("depth")
    rows = frame["row"].to_numpy().astype(np.int64)
    local = np.full(ctx.spans.height, -1, dtype=np.int64)
    local[rows] = np.arange(rows.size)
    parent_rows = frame["parent_row"].fill_null(-1).to_numpy().astype(np.int64)
    parent = np.where(parent_rows >= 0, local[np.where(parent_rows >= 0, parent_rows, 0)], -1)
    depth = frame["depth"].to_numpy().astype(np.int64)
    self_ns = frame["critical_ns"].to_numpy().astype(np.int64)
    op_codes = (
        frame.select(
            (pl.col("service") + pl.lit("\u001f") + pl.col("name")).cast(pl.Categorical).to_physical()
        )
        .to_series()
        .to_numpy()
        .astype(np.int64)
    )
    names = frame.select("service", "name")
    node = np.full(rows.size, -1, dtype=np.int64)
    node_parent: list[np.ndarray] = []
    node_first: list[np.ndarray] = []
    count = 0
    bounds = np.nonzero(np.diff(depth))[0] + 1
    width = int(op_codes.max()) + 1 if op_codes.size else 1
    for level in np.split(np.arange(rows.size), bounds):
        parent_node = np.where(parent[level] >= 0, node[np.maximum(parent[level], 0)], -1)
        # (parent node, operation) as one int64 in the same order as the pair: a 1-D unique is
        # several times cheaper than np.unique(axis=0) over pairs, and gives the same nodes
        keys = (parent_node + 1) * width + op_codes[level]
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        node[level] = count + inverse.reshape(-1)
        node_parent.append(unique // width - 1)
        node_first.append(level[first])
        count += unique.shape[0]
    parents_of_node = np.concatenate(node_parent)
    first_row = np.concatenate(node_first)
    # inclusive time on the path: bottom-up sums over the span tree
    inclusive = self_ns.copy()
    for level in reversed(np.split(np.arange(rows.size), bounds)):
        has = parent[level] >= 0
        np.add.at(inclusive, parent[level][has], inclusive[level][has])
    node_total = np.bincount(node, weights=inclusive, minlength=count)
    node_self = np.bincount(node, weights=self_ns, minlength=count)
    root_total = node_total[parents_of_node < 0].sum()
    keep = node_total >= MIN_ICICLE_SHARE * root_total
    keep &= node_total > 0
    # a kept node needs its parent kept (a parent's total is at least its child's)
    order = np.argsort(-node_total, kind="stable")
    chosen = order[keep[order]][:max_nodes]
    chosen_set = np.zeros(count, dtype=bool)
    chosen_set[chosen] = True
    chosen = np.sort(
        chosen[(parents_of_node[chosen] < 0) | chosen_set[np.maximum(parents_of_node[chosen], 0)]]
    )
    svc = names["service"].to_numpy()
    nm = names["name"].to_numpy()
    node_depth = depth[first_row]
    return [
        {
            "id": int(i),
            "parent": int(parents_of_node[i]) if parents_of_node[i] >= 0 else None,
            "service": str(svc[first_row[i]]),
            "operation": str(nm[first_row[i]]),
            "depth": int(node_depth[i]),
            "ms": round(float(node_total[i]) / n_traces / 1e6, 3),
            "self_ms": round(float(node_self[i]) / n_traces / 1e6, 3),
        }
        for i in chosen
    ]


def on_path_frame(ctx: AnalysisContext) -> pl.DataFrame:
    """The on-path spans with the columns the aggregation reads (filter once for many endpoints)."""
    return ctx.spans.filter(pl.col("on_critical_path")).select(
        "trace_id", "service", "name", "start_ns", "depth", "critical_ns", "row", "parent_row", "root_span_id"
    )


def critical_paths(ctx: AnalysisContext, top: int = TOP_ENDPOINTS, **options: Any) -> list[dict[str, Any]]:
    """The aggregated critical path of the ``top`` busiest endpoints (for the report page);
    ``options`` go to :func:`endpoint_critical_path`."""
    out = []
    on_path = on_path_frame(ctx)
    for service, operation, _ in endpoints(ctx).head(top).iter_rows():
        path = endpoint_critical_path(ctx, service, operation, on_path_spans=on_path, **options)
        if path is not None:
            out.append(path)
    return out
