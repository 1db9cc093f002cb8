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

Mergeable (issue 11): :func:`path_rows` extracts small rows from the spans of a set of *whole*
traces — per trace its endpoint and root duration, its on-path self time per operation, its folded
path, and the partial icicle forest of those traces (a node per distinct stack, with summed times)
— and :func:`combine_path_rows` merges the rows of several partitions (the forests node by node).
:func:`critical_paths_from_rows` decides on merged rows only, so ``hourglass analyze --partitions``
gives the same ``critical_paths`` as the whole at once; the at-once run goes through the same
three steps with one partition. Icicle node ids are numbered canonically — level by level, then
by parent id, service and operation — so they do not depend on how the traces were split.
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis.context import AnalysisContext

TOP_PATHS = 5
MAX_PATH_STEPS = 40
MAX_ICICLE_NODES = 150
MIN_ICICLE_SHARE = 0.005
TOP_ENDPOINTS = 10

log = logging.getLogger(__name__)


def _ms(expr: pl.Expr) -> pl.Expr:
    return (expr / 1e6).round(3)


def endpoints(ctx: AnalysisContext) -> pl.DataFrame:
    """(service, operation, traces) of the trace roots, the busiest first."""
    return (
        ctx.traces.group_by(pl.col("root_service").alias("service"), pl.col("root_name").alias("operation"))
        .agg(pl.len().alias("traces"))
        .sort(["traces", "service", "operation"], descending=[True, False, False])
    )


@dataclass
class PathRows:
    """What :func:`path_rows` extracts from a set of whole traces (see the module docstring)."""

    traces: pl.DataFrame  # trace_id, service, operation (the root's), root_duration_ns
    operations: pl.DataFrame  # trace_id, service, name, ns: self time on the path, summed per trace
    paths: pl.DataFrame  # trace_id, key: the folded steps joined by \u001f
    # the icicle forest of these traces: id, parent (-1 for a root), depth, service, name,
    # total_ns (time on the path including descendants), self_ns; a root per endpoint (merged by
    # combine_path_rows, which adds each node's root)
    nodes: pl.DataFrame


def _own_tree_on_path(ctx: AnalysisContext, roots: pl.DataFrame) -> pl.DataFrame:
    """The on-path spans of ``roots``' traces in their root's own tree."""
    on_path = on_path_frame(ctx).join(
        roots.select("trace_id", pl.col("root_span_id").alias("_root")), on="trace_id", how="inner"
    )
    return on_path.filter(pl.col("root_span_id") == pl.col("_root")).drop("_root")


def path_rows(ctx: AnalysisContext, endpoint: tuple[str, str] | None = None) -> PathRows:
    """The rows of ``ctx``'s traces (only those rooted at ``endpoint`` = (service, operation) when
    given) that :func:`critical_paths_from_rows` needs."""
    roots = ctx.traces
    if endpoint is not None:
        roots = roots.filter((pl.col("root_service") == endpoint[0]) & (pl.col("root_name") == endpoint[1]))
    traces = roots.select(
        "trace_id",
        pl.col("root_service").alias("service"),
        pl.col("root_name").alias("operation"),
        "root_duration_ns",
    )
    in_order = _own_tree_on_path_in_order(ctx) if endpoint is None else None
    if in_order is not None:
        on_path = in_order
        trace = "_trace"  # the trace's row of ctx.traces: the same order as its id, cheaper to sort and group
    else:
        on_path = _own_tree_on_path(ctx, roots)
        trace = "trace_id"
    # (grouped by the trace's row, an integer, then named: the rows of a grouping by the id)
    operations = on_path.group_by(trace, "service", "name").agg(pl.col("critical_ns").sum().alias("ns"))
    step = pl.col("service") + pl.lit(":") + pl.col("name")
    ordered = on_path.select(trace, "start_ns", "depth", "row", step.alias("step")).sort(
        [trace, "start_ns", "depth", "row"]
    )
    folded = ordered.filter(
        (pl.col("step") != pl.col("step").shift(1))
        | (pl.col(trace) != pl.col(trace).shift(1))
        | pl.col("step").shift(1).is_null()
    )
    if in_order is not None:
        operations = operations.select(
            ctx.traces["trace_id"].gather(operations[trace]), "service", "name", "ns"
        )
        paths = _joined_steps(folded, trace)
        paths = paths.select(ctx.traces["trace_id"].gather(paths[trace]), "key")
    else:
        paths = _grouped_steps(folded, trace)
    return PathRows(traces, operations, paths, _forest(ctx, on_path))


PATH_SEPARATOR = "\u001f"  # between the steps of a path's key


def _grouped_steps(folded: pl.DataFrame, trace: str) -> pl.DataFrame:
    """Each trace's path key: its steps joined in order, by a string aggregation per group."""
    return folded.group_by(trace, maintain_order=True).agg(
        pl.col("step").str.join(PATH_SEPARATOR).alias("key")
    )


def _joined_steps(folded: pl.DataFrame, trace: str) -> pl.DataFrame:
    """:func:`_grouped_steps` of rows sorted by ``trace`` (each trace's rows together, no null step): the
    steps of a trace joined by Arrow, its rows a slice of one list array, instead of a string
    aggregation per group (at 167k spans, 8.7k traces: ~1 ms against ~6)."""
    import pyarrow.compute as pc  # (here: the extraction's workers have it, other readers need not)

    traces = folded[trace].to_numpy()
    if traces.size == 0 or folded["step"].null_count():
        return _grouped_steps(folded, trace)
    first = np.flatnonzero(np.concatenate(([True], traces[1:] != traces[:-1])))
    # (the offsets from a buffer and the separator from a polars column: pa.array and pa.scalar
    # of Python values import pandas, which analyze --format json does not load)
    bounds = np.append(first, traces.size).astype(np.int64)
    offsets = pa.Array.from_buffers(pa.int64(), bounds.size, [None, pa.py_buffer(bounds)])
    steps = folded["step"].to_arrow().cast(pa.large_string())
    separator = pl.Series([PATH_SEPARATOR], dtype=pl.String).to_arrow().cast(pa.large_string())[0]
    keys = pl.from_arrow(pc.binary_join(pa.LargeListArray.from_arrays(offsets, steps), separator))
    assert isinstance(keys, pl.Series)
    return pl.DataFrame(
        [pl.Series(trace, traces[first], dtype=folded.schema[trace]), keys.cast(pl.String).alias("key")]
    )


def _own_tree_on_path_in_order(ctx: AnalysisContext) -> pl.DataFrame | None:
    """:func:`_own_tree_on_path` of every trace when the spans hold each trace's rows together in
    ``ctx.traces``' order (a context's canonical order), with ``_trace``, the trace's row there,
    instead of ``trace_id`` and ``root_span_id``:
    a span is in its root's tree when its ``root_span_id`` is its trace's, compared row by row
    instead of joined. None when the spans are not in that order."""
    spans, traces = ctx.spans, ctx.traces
    if spans.height == 0 or spans["trace_id"].null_count():
        return None
    trace = spans.select(pl.col("trace_id").rle_id()).to_series().to_numpy()
    first = np.flatnonzero(np.diff(trace, prepend=-1))
    if first.size != traces.height or not spans["trace_id"].gather(first).equals(traces["trace_id"]):
        return None
    if not traces["trace_id"].is_sorted():  # (the rows' order is the ids' order: paths come out in it)
        return None
    on = np.flatnonzero(spans["on_critical_path"].to_numpy())
    own = (spans["root_span_id"].gather(on) == traces["root_span_id"].gather(trace[on])).fill_null(False)
    rows = on[own.to_numpy()]
    # (the trace told by ``_trace``: its id and root are not gathered for every span on the path)
    columns = [c for c in _ON_PATH_COLUMNS if c not in ("trace_id", "root_span_id")]
    return spans.select(columns)[rows].with_columns(pl.Series("_trace", trace[rows]))


_NODE_SCHEMA = {
    "id": pl.Int64,
    "parent": pl.Int64,
    "depth": pl.Int64,
    "service": pl.String,
    "name": pl.String,
    "total_ns": pl.Int64,
    "self_ns": pl.Int64,
}
_MERGED_SCHEMA = {**_NODE_SCHEMA, "root": pl.Int64}


def _forest(ctx: AnalysisContext, on_path: pl.DataFrame) -> pl.DataFrame:
    """The on-path spans merged by stack (root … span) into a forest, level by level: one node
    per distinct stack, its time on the path with and without its descendants summed over traces."""
    if on_path.height == 0:
        return pl.DataFrame(schema=_NODE_SCHEMA)
    frame = on_path.select("row", "parent_row", "depth", "critical_ns", "service", "name").sort(
        "depth", maintain_order=True
    )
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
    n_ops = int(op_codes.max()) + 1
    node = np.full(rows.size, -1, dtype=np.int64)
    node_parent: list[np.ndarray] = []
    node_first: list[np.ndarray] = []
    count = 0
    bounds = np.nonzero(np.diff(depth))[0] + 1
    for level in np.split(np.arange(rows.size), bounds):
        parent_node = np.where(parent[level] >= 0, node[np.maximum(parent[level], 0)], -1)
        # one int64 key per (parent node, operation): a 1-D unique, far cheaper than rows of two
        keys = (parent_node + 1) * n_ops + op_codes[level]
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        node[level] = count + inverse.reshape(-1)
        node_parent.append(unique // n_ops - 1)
        node_first.append(level[first])
        count += unique.shape[0]
    # inclusive time on the path: bottom-up sums over the span tree
    inclusive = self_ns.copy()
    for level in reversed(np.split(np.arange(rows.size), bounds)):
        has = parent[level] >= 0
        np.add.at(inclusive, parent[level][has], inclusive[level][has])
    first_row = np.concatenate(node_first)
    totals = np.zeros(count, dtype=np.int64)
    selfs = np.zeros(count, dtype=np.int64)
    np.add.at(totals, node, inclusive)
    np.add.at(selfs, node, self_ns)
    return pl.DataFrame(
        {
            "id": np.arange(count, dtype=np.int64),
            "parent": np.concatenate(node_parent).astype(np.int64),
            "depth": depth[first_row],
            "service": frame["service"].gather(first_row),
            "name": frame["name"].gather(first_row),
            "total_ns": totals,
            "self_ns": selfs,
        },
        schema=_NODE_SCHEMA,
    )


def _merge_forests(forests: list[pl.DataFrame]) -> pl.DataFrame:
    """Partial forests as one: nodes with the same stack (parent node, service, name) add up; ids
    numbered canonically — by depth, then parent id, service and name — and each node's ``root``."""
    # (parent's key index, service, name) -> [key index, total, self]
    merged: dict[tuple[int, str, str], list[int]] = {}
    keys: list[tuple[int, str, str]] = []
    depths: list[int] = []
    for forest in forests:
        mine: dict[int, int] = {}  # this forest's node id -> key index
        for nid, parent, depth, service, name, total, own in forest.sort("depth", "id").iter_rows():
            key = (mine[parent] if parent >= 0 else -1, service, name)
            entry = merged.get(key)
            if entry is None:
                entry = merged[key] = [len(keys), 0, 0]
                keys.append(key)
                depths.append(depth)
            entry[1] += total
            entry[2] += own
            mine[nid] = entry[0]
    # canonical ids: a node's parent is numbered before it (it is one level up)
    canonical = [-1] * len(keys)
    order = sorted(range(len(keys)), key=lambda k: depths[k])
    out: list[tuple[int, int, int, str, str, int, int, int]] = []
    start = 0
    while start < len(order):
        end = start
        while end < len(order) and depths[order[end]] == depths[order[start]]:
            end += 1
        level = sorted(
            order[start:end],
            key=lambda k: (canonical[keys[k][0]] if keys[k][0] >= 0 else -1, keys[k][1], keys[k][2]),
        )
        for k in level:
            canonical[k] = len(out)
            parent_key, service, name = keys[k]
            _, total, own = merged[keys[k]]
            parent = canonical[parent_key] if parent_key >= 0 else -1
            root = out[parent][7] if parent >= 0 else len(out)
            out.append((len(out), parent, depths[k], service, name, total, own, root))
        start = end
    return pl.DataFrame(out, schema=_MERGED_SCHEMA, orient="row")


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    """The frames of several partitions as one (the first, empty, when every one is)."""
    filled = [f for f in frames if f.height]
    if not filled:
        return frames[0]
    return filled[0] if len(filled) == 1 else pl.concat(filled, how="vertical_relaxed")


def combine_path_rows(parts: Iterable[PathRows]) -> PathRows:
    """The rows of several partitions of whole traces as one."""
    pieces = list(parts)
    if not pieces:
        raise ValueError("combine_path_rows needs the rows of at least one partition")

    return PathRows(
        traces=_concat([p.traces for p in pieces]),
        operations=_concat([p.operations for p in pieces]),
        paths=_concat([p.paths for p in pieces]),
        nodes=_merge_forests([p.nodes for p in pieces]),
    )


@dataclass
class PathSummary:
    """:class:`PathRows` aggregated per endpoint (the root's service and operation), without a
    row per trace: what :func:`critical_paths_from_summary` needs to decide exactly what
    :func:`critical_paths_from_rows` decides on the rows — every figure there is a count, a sum
    or a quantile over one endpoint's traces, so the values are kept as lists per group. ``serve``
    keeps a batch's summary instead of its rows (issue 11: the trace ids and path keys of every
    trace were most of what a round re-read): one 8-byte value per trace, per trace and on-path
    operation, and per trace's path."""

    roots: pl.DataFrame  # service, operation, durations: the root duration (ns) of each trace
    operations: pl.DataFrame  # service, operation (the endpoint), op_service, op_name, ns: per trace
    paths: pl.DataFrame  # service, operation, key, durations: the root duration of each trace with that path
    nodes: pl.DataFrame  # the icicle forest (PathRows.nodes; merged by combine_path_summaries)


_ENDPOINT = ["service", "operation"]


def summarize_path_rows(rows: PathRows) -> PathSummary:
    """``rows`` (of whole traces, each trace once) aggregated per endpoint."""
    ends = rows.traces.select("trace_id", *_ENDPOINT, "root_duration_ns")
    roots = ends.group_by(_ENDPOINT).agg(pl.col("root_duration_ns").alias("durations")).sort(_ENDPOINT)
    operations = (
        rows.operations.select("trace_id", op_service="service", op_name="name", ns="ns")
        .join(ends.select("trace_id", *_ENDPOINT), on="trace_id")
        .group_by(*_ENDPOINT, "op_service", "op_name")
        .agg(pl.col("ns"))
        .sort(*_ENDPOINT, "op_service", "op_name")
    )
    paths = (
        rows.paths.select("trace_id", "key")
        .join(ends.select("trace_id", *_ENDPOINT, "root_duration_ns"), on="trace_id")
        .group_by(*_ENDPOINT, "key")
        .agg(pl.col("root_duration_ns").alias("durations"))
        .sort(*_ENDPOINT, "key")
    )
    return PathSummary(roots, operations, paths, rows.nodes)


def combine_path_summaries(parts: Iterable[PathSummary]) -> PathSummary:
    """The summaries of several partitions of whole traces as one (their groups side by side:
    the decision reads a group's values wherever they are; the forests merged node by node)."""
    pieces = list(parts)
    if not pieces:
        raise ValueError("combine_path_summaries needs the summary of at least one partition")

    return PathSummary(
        roots=_concat([p.roots for p in pieces]),
        operations=_concat([p.operations for p in pieces]),
        paths=_concat([p.paths for p in pieces]),
        nodes=_merge_forests([p.nodes for p in pieces]),
    )


def _of_endpoint(frame: pl.DataFrame, service: str, operation: str) -> pl.DataFrame:
    return frame.filter((pl.col("service") == service) & (pl.col("operation") == operation))


def critical_paths_from_summary(
    summary: PathSummary, top: int = TOP_ENDPOINTS, **options: Any
) -> list[dict[str, Any]]:
    """:func:`critical_paths_from_rows` decided on the per-endpoint aggregates of the rows
    (:func:`summarize_path_rows`, :func:`combine_path_summaries`): the same list."""
    return _critical_paths_of_endpoints(
        summary.roots.select(*_ENDPOINT, traces=pl.col("durations").list.len()),
        lambda service, operation, frame: _of_endpoint(getattr(summary, frame), service, operation),
        summary.nodes,
        top,
        **options,
    )


class SpilledPathSummary:
    """A :class:`PathSummary` folded piece by piece with its values on disk: the groups' lists of
    values (most of a summary's bytes: a value per trace, per trace and on-path operation) written
    a file per piece and frame, and only the trace counts per endpoint and the merged forest held;
    :meth:`critical_paths` reads one endpoint's groups back at a time (issue 11: a round held
    every endpoint's values through the decision). Decides exactly what
    :func:`critical_paths_from_summary` decides on every piece's summary combined (each figure is
    a count, a sum or a quantile over one endpoint's values, whatever their order). A piece whose
    files cannot be written (a full disk), or every piece without a ``folder``, is held in memory
    instead, as before. A piece whose frames are already in files of their own
    (:func:`write_path_values`: serve's segments, written once with the segment) is read from
    there, not written again."""

    _FRAMES = ("roots", "operations", "paths")

    def __init__(self, folder: str | None) -> None:
        self.folder = Path(folder) if folder is not None else None  # made and removed by the caller
        # each piece's files' number, the folder of its own files, or the piece held
        self.pieces: list[int | Path | PathSummary] = []
        self.counts: pl.DataFrame | None = None  # service, operation, traces
        self.nodes: pl.DataFrame | None = None
        self._indexes: dict[Path, PathIndex] = {}  # a written piece's folder -> its index

    def add(self, part: PathSummary, written: Path | None = None) -> None:
        """``part`` folded in: its frames written, its counts summed, its forest merged (as
        ``combine_path_summaries`` over every piece at once: a merged forest without its ``root``
        column is a forest again, whose canonical ids and summed times do not depend on the
        grouping). ``written``: a folder where ``part``'s frames are already
        (:func:`write_path_values`), read from there."""
        if written is not None:
            self.add_written(path_counts(part), part.nodes, written)
            return
        number = len(self.pieces)
        try:
            if self.folder is None:  # (the caller could not make one: it said so)
                self.pieces.append(replace(part, nodes=part.nodes.clear()))
            else:
                for name in self._FRAMES:
                    # (compressed: read back decoded into the round's memory, not mapped)
                    getattr(part, name).write_ipc(self._file(number, name), compression="lz4")
                self.pieces.append(number)
        except OSError:
            log.warning("critical-path summary not written to %s; held in memory", self.folder, exc_info=True)
            for name in self._FRAMES:
                with contextlib.suppress(OSError):
                    self._file(number, name).unlink(missing_ok=True)
            self.pieces.append(replace(part, nodes=part.nodes.clear()))
        self._fold(path_counts(part), part.nodes)

    def add_written(self, counts: pl.DataFrame, nodes: pl.DataFrame, written: Path) -> None:
        """A piece whose frames of values are in ``written`` (:func:`write_path_values`) folded in
        from its trace counts per endpoint (:func:`path_counts`) and its forest alone: its values
        are read from there when an endpoint is decided."""
        self.pieces.append(written)
        self._fold(counts, nodes)

    def _fold(self, counts: pl.DataFrame, nodes: pl.DataFrame) -> None:
        self.counts = (
            counts
            if self.counts is None
            else pl.concat([self.counts, counts], how="vertical_relaxed")
            .group_by(_ENDPOINT)
            .agg(pl.col("traces").sum())
        )
        self.nodes = _merge_forests([nodes] if self.nodes is None else [self.nodes.drop("root"), nodes])

    def _file(self, number: int, name: str) -> Path:
        if self.folder is None:
            raise OSError("no folder for the critical-path summaries' values")
        return self.folder / f"{number:06d}-{name}.arrow"

    def _of_endpoint(self, service: str, operation: str, name: str) -> pl.DataFrame:
        """The endpoint's groups in frame ``name`` of every piece, in one (the pieces' in order;
        the pieces' files read together: one query per endpoint and frame, not per piece)."""
        endpoint = (pl.col("service") == service) & (pl.col("operation") == operation)
        frames: list[pl.DataFrame | None] = []
        queries: list[pl.LazyFrame] = []
        for piece in self.pieces:
            if isinstance(piece, Path):
                if piece not in self._indexes:  # (read once a round)
                    self._indexes[piece] = _path_index(piece)
                frames.append(_read_endpoint(piece, self._indexes[piece], name, service, operation))
                continue
            frames.append(None)
            queries.append(
                # (glob=False: a folder's "[" or "*" is part of its name, not a pattern)
                pl.scan_ipc(self._file(piece, name), glob=False).filter(endpoint)
                if isinstance(piece, int)
                else getattr(piece, name).lazy().filter(endpoint)
            )
        collected = iter(pl.collect_all(queries) if queries else [])
        return _concat([frame if frame is not None else next(collected) for frame in frames])

    def critical_paths(self, top: int = TOP_ENDPOINTS, **options: Any) -> list[dict[str, Any]]:
        """:func:`critical_paths_from_summary` of every piece's summary combined."""
        if self.counts is None or self.nodes is None:
            raise ValueError("SpilledPathSummary.critical_paths needs the summary of at least one piece")
        return _critical_paths_of_endpoints(self.counts, self._of_endpoint, self.nodes, top, **options)

    def report_critical_paths(self) -> list[dict[str, Any]]:
        """:func:`report_critical_paths_from_summary` of every piece's summary combined."""
        try:
            return self.critical_paths(**REPORT_PATHS)
        except Exception:
            log.exception("critical paths of the endpoints failed")
            return []


def path_counts(summary: PathSummary) -> pl.DataFrame:
    """The traces of each endpoint of ``summary`` (service, operation, traces)."""
    return summary.roots.select(*_ENDPOINT, traces=pl.col("durations").list.len())


_PATH_INDEX = "index.pickle"  # (:func:`write_path_values`) frame -> endpoint -> where its rows are
# an index of one folder: frame -> endpoint (None: the frame's columns, no row) -> (offset, bytes)
PathIndex = dict[str, dict[tuple[str, str] | None, tuple[int, int]]]


def write_path_values(summary: PathSummary, folder: Path) -> None:
    """``summary``'s frames of values (``roots``, ``operations``, ``paths``) written to ``folder``
    (made), read back through ``SpilledPathSummary.add_written``: a file per frame holding each
    endpoint's rows (in their order) as an Arrow IPC stream of its own (lz4), and first the
    frame's columns without rows; ``index.pickle`` (written last) says where each is. An endpoint
    decided is read alone (:func:`_read_endpoint`, decoded by polars), not filtered out of the
    whole frame, which every endpoint decoded again (0.6 s of a round at 7M stored spans)."""
    folder.mkdir(parents=True, exist_ok=True)
    index: PathIndex = {}
    for name in SpilledPathSummary._FRAMES:
        frame: pl.DataFrame = getattr(summary, name)
        where: dict[tuple[str, str] | None, tuple[int, int]] = {}
        at = 0
        with open(folder / f"{name}.ipcs", "wb") as out:
            parts: list[tuple[tuple[str, str] | None, pl.DataFrame]] = [(None, frame.clear())]
            parts += [
                ((key[0], key[1]), part)
                for key, part in frame.partition_by(_ENDPOINT, maintain_order=True, as_dict=True).items()
            ]
            for key, part in parts:
                buffer = io.BytesIO()
                # (compressed: read back decoded into the round's memory, not mapped)
                part.write_ipc_stream(buffer, compression="lz4")
                blob = buffer.getvalue()
                out.write(blob)
                where[key] = (at, len(blob))
                at += len(blob)
        index[name] = where
    (folder / _PATH_INDEX).write_bytes(pickle.dumps(index, protocol=5))


def _path_index(folder: Path) -> PathIndex:
    """The index of the values in ``folder`` (:func:`write_path_values`)."""
    index: PathIndex = pickle.loads((folder / _PATH_INDEX).read_bytes())
    return index


def _read_endpoint(folder: Path, index: PathIndex, name: str, service: str, operation: str) -> pl.DataFrame:
    """The rows of (``service``, ``operation``) in frame ``name`` of the values in ``folder``
    (:func:`write_path_values`), in their order, as filtering the frame gives them (none for a
    null service or operation: equal to nothing)."""
    where = index[name]
    at, size = (
        where.get((service, operation), where[None])
        if service is not None and operation is not None
        else where[None]
    )
    with open(folder / f"{name}.ipcs", "rb") as source:
        source.seek(at)
        blob = source.read(size)
    return pl.read_ipc_stream(io.BytesIO(blob))


def _critical_paths_of_endpoints(
    counts: pl.DataFrame,
    of_endpoint: Callable[[str, str, str], pl.DataFrame],
    nodes: pl.DataFrame,
    top: int,
    **options: Any,
) -> list[dict[str, Any]]:
    """The critical paths of the ``top`` endpoints with the most traces (``counts``: service,
    operation, traces; a row per endpoint and piece or summed), each decided on its groups
    (``of_endpoint(service, operation, frame)``: the endpoint's rows of a summary's ``roots``,
    ``operations`` or ``paths``, each read when its figures are taken and dropped after)."""
    busiest = (
        counts.group_by(_ENDPOINT)
        .agg(pl.col("traces").sum())
        .sort(["traces", "service", "operation"], descending=[True, False, False])
        .head(top)
    )
    out = []
    for service, operation, _ in busiest.iter_rows():
        durations = of_endpoint(service, operation, "roots")["durations"].explode()
        if durations.len() == 0:
            continue
        # each group's values in one list (a group has a row per partition), then its figures
        # over the list: no row per value
        op_stats = (
            of_endpoint(service, operation, "operations")
            .group_by(service="op_service", name="op_name")
            .agg(pl.col("ns").list.explode(keep_nulls=False, empty_as_null=False))
            .select("service", "name", traces=pl.col("ns").list.len(), **_list_stats("ns", sum_as="_ns"))
        )
        path_stats = (
            of_endpoint(service, operation, "paths")
            .group_by("key")
            .agg(pl.col("durations").list.explode(keep_nulls=False, empty_as_null=False))
            .select("key", traces=pl.col("durations").list.len(), **_list_stats("durations"))
        )
        out.append(
            _endpoint_path(
                service,
                operation,
                durations,
                op_stats,
                path_stats,
                nodes,
                top_paths=options.get("top_paths", TOP_PATHS),
                icicle=options.get("icicle", True),
                max_operations=options.get("max_operations"),
                max_icicle_nodes=options.get("max_icicle_nodes", MAX_ICICLE_NODES),
            )
        )
    return out


def endpoint_critical_path(
    ctx: AnalysisContext, service: str, operation: str, **options: Any
) -> dict[str, Any] | None:
    """The aggregated critical path of the traces rooted at (service, operation); None when no
    trace is. ``options``: those of :func:`endpoint_path_from_rows`."""
    rows = combine_path_rows([path_rows(ctx, (service, operation))])
    return endpoint_path_from_rows(rows, service, operation, **options)


def endpoint_critical_path_partitioned(
    load: Callable[[int, int], AnalysisContext],
    parts: int,
    service: str | None,
    operation: str | None,
    *,
    runner: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any] | None]:
    """(:func:`endpoints`, :func:`endpoint_critical_path` of (service, operation) when both are
    given) of a window too large for one context: ``load(part, parts)`` builds the context of each
    partition of whole traces in turn (one held at a time); their endpoint rows are combined, as
    the partitioned analysis combines them, and decided once. ``runner``
    (``whatif_query.PartsRunner``): the partitions are asked in its worker processes instead,
    several at once (``load`` must pickle: ``whatif_query.SourceContexts``). ``progress(phase,
    done, parts)`` as partitions are answered."""
    from hourglass.analysis.planning import ASKING

    shares: list[tuple[pl.DataFrame, PathRows | None]]
    if runner is not None:
        calls = [(load, part, parts, service, operation) for part in range(parts)]
        shares = runner.map(ASKING, critical_path_part, calls, progress)
    else:
        shares = []
        for part in range(parts):
            shares.append(critical_path_part(load, part, parts, service, operation))
            if progress:
                progress(ASKING, part + 1, parts)
    listing = (
        _concat([share for share, _ in shares])
        .group_by("service", "operation")
        .agg(pl.col("traces").sum())
        .sort(["traces", "service", "operation"], descending=[True, False, False])
    )
    rows = [made for _, made in shares if made is not None]
    if service is None or operation is None or not rows:
        return listing, None
    return listing, endpoint_path_from_rows(combine_path_rows(rows), service, operation)


def critical_path_part(
    load: Callable[[int, int], AnalysisContext],
    part: int,
    parts: int,
    service: str | None,
    operation: str | None,
) -> tuple[pl.DataFrame, PathRows | None]:
    """Partition ``part``'s share of :func:`endpoint_critical_path_partitioned` (a worker's task
    when it runs elsewhere): its endpoints and, when both are given, (service, operation)'s path
    rows."""
    from hourglass.analysis.context import compact

    ctx = load(part, parts)
    try:
        # each with its own strings: cut from the spans', they would keep every partition's string
        # buffers alive until the answer is made (a critical path over a 7.2M-span store in 14
        # partitions: 2.1 GiB held)
        listing = compact(endpoints(ctx))
        if service is None or operation is None:
            return listing, None
        made = path_rows(ctx, (service, operation))
        return listing, PathRows(
            *(compact(frame) for frame in (made.traces, made.operations, made.paths, made.nodes))
        )
    finally:
        ctx.cache.clear()


def endpoint_path_from_rows(
    rows: PathRows,
    service: str,
    operation: str,
    *,
    top_paths: int = TOP_PATHS,
    icicle: bool = True,
    max_operations: int | None = None,
    max_icicle_nodes: int = MAX_ICICLE_NODES,
) -> dict[str, Any] | None:
    """:func:`endpoint_critical_path` decided on (combined) rows."""
    roots = rows.traces.filter((pl.col("service") == service) & (pl.col("operation") == operation))
    if roots.height == 0:
        return None
    per_trace = rows.operations.join(roots.select("trace_id"), on="trace_id", how="semi")
    keyed = rows.paths.join(roots.select("trace_id", "root_duration_ns"), on="trace_id")
    return _endpoint_path(
        service,
        operation,
        roots["root_duration_ns"],
        per_trace.group_by("service", "name").agg(traces=pl.len(), **_stats(pl.col("ns"), sum_as="_ns")),
        keyed.group_by("key").agg(traces=pl.len(), **_stats(pl.col("root_duration_ns"))),
        rows.nodes,
        top_paths=top_paths,
        icicle=icicle,
        max_operations=max_operations,
        max_icicle_nodes=max_icicle_nodes,
    )


def _stats(values: pl.Expr, *, sum_as: str | None = None) -> dict[str, pl.Expr]:
    """The p50 (``_p50``) and p95 (``_p95``) of ``values`` (and their sum as ``sum_as``): over a
    column in a group, or over the elements of a list column (``values.list.eval``) — the same
    quantiles of the same values."""
    out = {
        "_p50": values.quantile(0.5, interpolation="linear"),
        "_p95": values.quantile(0.95, interpolation="linear"),
    }
    if sum_as is not None:
        out[sum_as] = values.sum()
    return out


def _list_stats(values: str, *, sum_as: str | None = None) -> dict[str, pl.Expr]:
    """:func:`_stats` of the elements of each row's list column ``values``."""
    lists = pl.col(values)
    out = {
        name: lists.list.eval(pl.element().quantile(q, interpolation="linear")).list.first()
        for name, q in (("_p50", 0.5), ("_p95", 0.95))
    }
    if sum_as is not None:
        out[sum_as] = lists.list.sum()
    return out


def _endpoint_path(
    service: str,
    operation: str,
    durations: pl.Series,
    op_stats: pl.DataFrame,
    path_stats: pl.DataFrame,
    nodes: pl.DataFrame,
    *,
    top_paths: int,
    icicle: bool,
    max_operations: int | None,
    max_icicle_nodes: int,
) -> dict[str, Any]:
    """The endpoint's critical path from its traces' root durations (``durations``), the
    statistics of its traces' on-path self time per operation (``op_stats``: service, name,
    traces, ``_p50``/``_p95``/``_ns`` of the self times: :func:`_stats`), those of its folded
    paths (``path_stats``: key, traces, ``_p50`` of the root durations of the traces with that
    path) and the merged forest. Every figure is a count, a sum or a quantile over the endpoint's
    traces, so :class:`PathRows` (grouped) and their per-endpoint aggregates
    (:class:`PathSummary`, lists of values per group) decide the same."""
    n_traces = durations.len()
    roots = durations.alias("root_duration_ns").to_frame()
    root_stats = roots.select(
        _ms(pl.col("root_duration_ns").quantile(0.5, interpolation="linear")).alias("p50"),
        _ms(pl.col("root_duration_ns").quantile(0.95, interpolation="linear")).alias("p95"),
    ).row(0)
    grand_total = int(op_stats["_ns"].sum() or 0)
    ops = (
        op_stats.with_columns(ms_p50=_ms(pl.col("_p50")), ms_p95=_ms(pl.col("_p95")))
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
        "paths": _paths(path_stats, n_traces, top_paths),
    }
    if icicle:
        out["icicle"] = _icicle(nodes, service, operation, n_traces, max_icicle_nodes)
    return out


def _paths(path_stats: pl.DataFrame, n_traces: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` most frequent paths of ``path_stats`` (key, traces, ``_p50`` of their root
    durations)."""
    grouped = (
        path_stats.sort(["traces", "key"], descending=[True, False])
        .head(top)
        .with_columns(root_ms_p50=_ms(pl.col("_p50")))
    )
    out = []
    for row in grouped.iter_rows(named=True):
        steps = row["key"].split("\u001f")
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
    nodes: pl.DataFrame, service: str, operation: str, n_traces: int, max_nodes: int = MAX_ICICLE_NODES
) -> list[dict[str, Any]]:
    """The endpoint's tree of the merged forest (its root: the root node (service, operation)),
    numbered from 0 in the forest's canonical order, as the page draws it."""
    root = nodes.filter(
        (pl.col("parent") < 0) & (pl.col("service") == service) & (pl.col("name") == operation)
    )
    if root.height == 0:
        return []
    tree = nodes.filter(pl.col("root") == root["id"][0])
    renumber = np.full(nodes.height, -1, dtype=np.int64)
    renumber[tree["id"].to_numpy()] = np.arange(tree.height)
    old_parent = tree["parent"].to_numpy()
    parents_of_node = np.where(old_parent >= 0, renumber[np.maximum(old_parent, 0)], -1)
    node_total = tree["total_ns"].to_numpy().astype(np.float64)
    node_self = tree["self_ns"].to_numpy().astype(np.float64)
    count = tree.height
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
    svc = tree["service"].to_numpy()
    nm = tree["name"].to_numpy()
    node_depth = tree["depth"].to_numpy()
    return [
        {
            "id": int(i),
            "parent": int(parents_of_node[i]) if parents_of_node[i] >= 0 else None,
            "service": str(svc[i]),
            "operation": str(nm[i]),
            "depth": int(node_depth[i]),
            "ms": round(float(node_total[i]) / n_traces / 1e6, 3),
            "self_ms": round(float(node_self[i]) / n_traces / 1e6, 3),
        }
        for i in chosen
    ]


_ON_PATH_COLUMNS = (
    "trace_id",
    "service",
    "name",
    "start_ns",
    "depth",
    "critical_ns",
    "row",
    "parent_row",
    "root_span_id",
)


def on_path_frame(ctx: AnalysisContext, rows: np.ndarray | None = None) -> pl.DataFrame:
    """The on-path spans with the columns the aggregation reads (filter once for many endpoints);
    ``rows``: those rows instead (on the path, in order)."""
    if rows is not None:
        return ctx.spans.select(_ON_PATH_COLUMNS)[rows]
    return ctx.spans.filter(pl.col("on_critical_path")).select(_ON_PATH_COLUMNS)


def endpoints_of_rows(rows: PathRows) -> pl.DataFrame:
    """(service, operation, traces) of the trace roots in ``rows``, the busiest first."""
    return (
        rows.traces.group_by("service", "operation")
        .agg(pl.len().alias("traces"))
        .sort(["traces", "service", "operation"], descending=[True, False, False])
    )


def critical_paths_from_rows(
    rows: PathRows, top: int = TOP_ENDPOINTS, **options: Any
) -> list[dict[str, Any]]:
    """The aggregated critical path of the ``top`` busiest endpoints, decided on (combined) rows;
    ``options`` go to :func:`endpoint_path_from_rows`."""
    out = []
    for service, operation, _ in endpoints_of_rows(rows).head(top).iter_rows():
        path = endpoint_path_from_rows(rows, service, operation, **options)
        if path is not None:
            out.append(path)
    return out


def critical_paths(ctx: AnalysisContext, top: int = TOP_ENDPOINTS, **options: Any) -> list[dict[str, Any]]:
    """The aggregated critical path of the ``top`` busiest endpoints (for the report page);
    ``options`` go to :func:`endpoint_critical_path`."""
    return critical_paths_from_rows(combine_path_rows([path_rows(ctx)]), top, **options)


# the report page's icicles: the busiest endpoints, compact (the full figures are at
# ``GET /v1/critical-path``)
REPORT_PATHS = {"top": 8, "top_paths": 3, "max_operations": 12, "max_icicle_nodes": 60}


def report_critical_paths(rows: PathRows) -> list[dict[str, Any]]:
    """The report's ``critical_paths`` from (combined) rows; empty, and logged, when they fail: a
    picture must never cost the recommendations."""
    try:
        return critical_paths_from_rows(rows, **REPORT_PATHS)
    except Exception:
        log.exception("critical paths of the endpoints failed")
        return []


def report_critical_paths_from_summary(summary: PathSummary) -> list[dict[str, Any]]:
    """:func:`report_critical_paths` from (combined) per-endpoint aggregates of the rows."""
    try:
        return critical_paths_from_summary(summary, **REPORT_PATHS)
    except Exception:
        log.exception("critical paths of the endpoints failed")
        return []
