"""Trace frames: the repaired spans every detector reads, with critical-path columns.

Contract (detectors code against it; keep these names working)::

    @dataclass
    class AnalysisContext(NearMissLog):
        spans: pl.DataFrame   # one row per span, repaired, sorted by (trace_id, start_ns, span_id)
        traces: pl.DataFrame  # one row per trace
        @classmethod
        def from_table(cls, table: pa.Table | pl.DataFrame) -> AnalysisContext

``spans`` columns: every ``hourglass.collector.schema.ANALYSIS_COLUMNS`` column (``start_ns``/``end_ns`` after
clock-skew correction), plus

========================  =====  ==================================================================
kind                      i8     the recorded kind, or the role inferred from structure for an
                                 UNSPECIFIED span (:func:`hourglass.analysis.repair.infer_kinds`)
kind_inferred             bool   ``kind`` was inferred (mark findings built on it)
duration_ns               i64    end_ns - start_ns
is_root                   bool   no parent, or parent missing (orphan)
orphan                    bool   had a parent id that is absent from the trace
blocking                  bool   the parent waits for it: False for FOLLOWS_FROM, messaging hand-offs
                                 (PRODUCER/CONSUMER across services), children ending after the parent
                                 ends beyond tolerance; True for roots
depth                     i32    0 for roots
on_critical_path          bool   on the critical path of its subtree root
critical_ns               i64    this span's self time on the critical path (0 off the path)
root_span_id              str    span id of its subtree root (the trace root, or an orphan root)
root_duration_ns          i64    that root's duration
row                       u32    row index of this frame, for joins
parent_row                i64    row index of the parent (null for roots)
clock_skew_ns             i64    shift applied to start/end by the clock-skew adjuster
========================  =====  ==================================================================

``traces`` columns: trace_id, root_span_id, root_service, root_name, root_start_ns,
root_duration_ns, span_count, incomplete (orphans, several roots or no parentless root).
The trace root is the parentless span (orphans only when there is none), the longest one when there
are several.

Repair rules are in :mod:`hourglass.analysis.repair`, the critical path in :mod:`hourglass.analysis.critical_path`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis import repair
from hourglass.analysis.critical_path import CriticalPath, compute_critical_path
from hourglass.analysis.model import NearMiss, NearMissLog
from hourglass.collector.schema import ANALYSIS_COLUMNS, SPAN_SCHEMA

T = TypeVar("T")

_ANALYSIS_SCHEMA = pa.schema([SPAN_SCHEMA.field(c) for c in ANALYSIS_COLUMNS])

TRACE_COLUMNS = (
    "trace_id",
    "root_span_id",
    "root_service",
    "root_name",
    "root_start_ns",
    "root_duration_ns",
    "span_count",
    "incomplete",
)


def to_analysis_frame(table: pa.Table | pl.DataFrame) -> pl.DataFrame:
    """The ANALYSIS_COLUMNS of ``table`` as polars, typed as SPAN_SCHEMA; absent columns are null."""
    df = table if isinstance(table, pl.DataFrame) else pl.from_arrow(table)
    if not isinstance(df, pl.DataFrame):  # pl.from_arrow returns a Series for arrays
        raise TypeError("expected a table of span rows")
    schema = _polars_schema()
    missing = [pl.lit(None, dtype=schema[c]).alias(c) for c in ANALYSIS_COLUMNS if c not in df.columns]
    if missing:
        df = df.with_columns(missing)
    return df.select([pl.col(c).cast(schema[c]) for c in ANALYSIS_COLUMNS])


@cache
def _polars_schema() -> pl.Schema:
    """ANALYSIS_COLUMNS' polars types. (An empty table built from null arrays: pyarrow's
    ``Schema.empty_table`` imports pandas, a third of a second of start-up.)"""
    empty = pl.from_arrow(
        pa.Table.from_arrays([pa.nulls(0, f.type) for f in _ANALYSIS_SCHEMA], schema=_ANALYSIS_SCHEMA)
    )
    assert isinstance(empty, pl.DataFrame)
    return empty.schema


@dataclass
class AnalysisContext(NearMissLog):
    spans: pl.DataFrame
    traces: pl.DataFrame
    critical: CriticalPath | None = field(default=None, repr=False)
    cache: dict[str, Any] = field(default_factory=dict, repr=False)  # see cached()
    near_misses: list[NearMiss] = field(default_factory=list, repr=False)  # NearMissLog.note_near_miss

    @classmethod
    def from_table(cls, table: pa.Table | pl.DataFrame) -> AnalysisContext:
        # one chunk per column (a store's read comes in batches): every pass below, and every
        # detector's, reads contiguous columns
        df = to_analysis_frame(table).rechunk()
        # Canonical order (trace_id, start_ns, span_id): a trace's spans are contiguous and the
        # report does not depend on input order. Stores already return rows in this order, and
        # then the parent links' keys, all distinct, prove there is no duplicate to remove.
        in_order = df["trace_id"].null_count() == 0 and _is_canonical_order(df)
        keys = repair.span_keys(df) if in_order else None
        distinct = keys is not None and repair.distinct_keys(keys)
        if not distinct:
            df = repair.deduplicate(df)
            if not _is_canonical_order(df):
                df = df.sort(["trace_id", "start_ns", "span_id"])
            keys = repair.span_keys(df)
            distinct = repair.distinct_keys(keys)
        assert keys is not None  # (made on both paths)
        start = df["start_ns"].to_numpy().astype(np.int64)
        end = df["end_ns"].to_numpy().astype(np.int64)
        end = np.maximum(end, start)  # a negative duration is a broken clock: treat as zero-length
        parent, orphan = repair.link_parents(df, keys, distinct)
        trace = keys["trace"].to_numpy().astype(np.int64)  # each row's trace position
        del keys
        had_parent_id = orphan | (parent >= 0)
        parent, depth, root = repair.tree_depth_and_root(parent, start)
        orphan = had_parent_id & (parent < 0)
        codes = df.select(
            pl.col("service").cast(pl.Categorical).to_physical().cast(pl.Int64).alias("s"),
            pl.col("host").fill_null("").cast(pl.Categorical).to_physical().cast(pl.Int64).alias("h"),
        )
        service_code = codes["s"].to_numpy()
        host_code = codes["h"].to_numpy()
        db_named = df.select(pl.col("name").str.contains(repair.DB_NAME_PATTERN).fill_null(False))
        kind, kind_inferred = repair.infer_kinds(
            parent, df["kind"].fill_null(0).to_numpy(), service_code, db_named.to_series().to_numpy()
        )
        follows = df["follows_from"].fill_null(False).to_numpy()
        asynchronous = repair.messaging_or_follows(parent, kind, service_code, follows)
        shift = repair.clock_skew_shift(parent, start, end, host_code, service_code, asynchronous)
        start = start + shift
        end = end + shift
        blocking = repair.blocking_flags(parent, start, end, asynchronous)
        blocking &= ~repair.call_mirrors(parent, start, end, kind, service_code)
        cp = compute_critical_path(parent, start, end, blocking)
        duration = end - start
        span_ids = df["span_id"]
        spans = df.with_columns(
            pl.Series("kind", kind, dtype=pl.Int8),
            pl.Series("kind_inferred", kind_inferred),
            pl.Series("start_ns", start),
            pl.Series("end_ns", end),
            pl.Series("duration_ns", duration),
            pl.Series("is_root", parent < 0),
            pl.Series("orphan", orphan),
            pl.Series("blocking", blocking),
            pl.Series("depth", depth, dtype=pl.Int32),
            pl.Series("on_critical_path", cp.on_path),
            pl.Series("critical_ns", cp.critical_ns),
            pl.Series("root_span_id", span_ids.gather(root)),
            pl.Series("root_duration_ns", duration[root]),
            pl.Series("row", np.arange(df.height, dtype=np.uint32)),
            _null_below_zero(pl.Series("parent_row", parent, dtype=pl.Int64)),  # null for roots
            pl.Series("clock_skew_ns", shift),
        )
        traces = None
        if df["trace_id"].null_count() == 0:  # (a run of null ids is one trace here, not in a group_by)
            traces = _trace_frame_in_order(spans, trace, parent < 0, orphan, start, duration)
        return cls(spans=spans, traces=_trace_frame(spans) if traces is None else traces, critical=cp)

    # -- conveniences shared by detectors, what-if and writers -----------------------------------

    @property
    def parents(self) -> pl.DataFrame:
        """Parent columns by row, to join on ``parent_row``: parent_service, parent_name, ...
        (built once, kept under the key ``parents``)."""
        return self.cached("parents", self._parent_columns)

    def _parent_columns(self) -> pl.DataFrame:
        return self.spans.select(
            pl.col("row").cast(pl.Int64).alias("parent_row"),
            pl.col("service").alias("parent_service"),
            pl.col("name").alias("parent_name"),
            pl.col("span_id").alias("parent_span_id_"),
            pl.col("start_ns").alias("parent_start_ns"),
            pl.col("end_ns").alias("parent_end_ns"),
            pl.col("duration_ns").alias("parent_duration_ns"),
            pl.col("on_critical_path").alias("parent_on_critical_path"),
            pl.col("kind").alias("parent_kind"),
        )

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """``build()``, computed once per context and kept under ``key`` for its lifetime: the one
        place an intermediate shared by detectors, what-if and writers is kept (nothing is cached
        in module globals). A key names what is kept and every parameter it depends on. Keys in use:

        ``parents``                  :attr:`parents`
        ``call_children``            blocking call children (:func:`hourglass.analysis.detectors._common.call_children`)
        ``repeated_calls/<n>``       call children of groups of at least n calls of one operation (``_common.repeated_calls``;
                                     dropped after the detectors)
        ``sibling_groups/<n>``       fan-out sibling groups of at least n members (``_common.sibling_groups``)
        ``scope_languages``          language per instrumentation scope (:mod:`hourglass.analysis.sequence`)
        ``service_edges``, ``service_edges_all``, ``call_stats``   the pipeline's (:mod:`hourglass.analysis.pipeline`)

        Detectors run in two threads: detectors that read one key stay in one lane
        (``pipeline.DETECTOR_LANES``), so a value is not built twice (it would be the same value)."""
        if key in self.cache:
            return self.cache[key]
        value = build()
        self.cache[key] = value
        return value

    def with_parent(self, frame: pl.DataFrame | None = None) -> pl.DataFrame:
        """``frame`` (default: all non-root spans) with its parent's columns (``parents``), gathered
        by ``parent_row`` (null for roots) — a positional gather, cheaper than a join."""
        base = self.spans.filter(pl.col("parent_row").is_not_null()) if frame is None else frame
        index = base["parent_row"]
        parents = self.parents.drop("parent_row")
        return base.with_columns([parents[c].gather(index) for c in parents.columns])

    def trace_spans(self, trace_id: str) -> pl.DataFrame:
        return self.spans.filter(pl.col("trace_id") == trace_id)

    def summary(self) -> dict[str, Any]:
        return {"traces": self.traces.height, "spans": self.spans.height}


def _null_below_zero(series: pl.Series) -> pl.Series:
    """``series`` with null for its negative values: on the series alone (a pass over the whole
    frame rechunked every column; ``pa.array`` with a mask imports pandas, ~20 MiB of each worker)."""
    return series.to_frame().select(pl.when(pl.col(series.name) >= 0).then(pl.col(series.name))).to_series()


def _is_canonical_order(df: pl.DataFrame) -> bool:
    if df.height < 2:
        return True
    t, s, i = pl.col("trace_id"), pl.col("start_ns"), pl.col("span_id")
    later = (t > t.shift(1)) | (
        (t == t.shift(1)) & ((s > s.shift(1)) | ((s == s.shift(1)) & (i > i.shift(1))))
    )
    return bool(df.select(later.slice(1).all()).item())


def _trace_frame_in_order(
    spans: pl.DataFrame,
    trace: np.ndarray,
    is_root: np.ndarray,
    orphan: np.ndarray,
    start: np.ndarray,
    duration: np.ndarray,
) -> pl.DataFrame | None:
    """:func:`_trace_frame` of spans in canonical order (``trace``: each row's trace position),
    from their arrays: the roots ordered by numpy, the counts per trace by its runs, strings
    gathered once per trace. None when two roots of a trace tie on the order of the choice
    (``_trace_frame`` decides those) or there are no spans."""
    n = spans.height
    if n == 0:
        return None
    first = np.flatnonzero(np.diff(trace, prepend=-1))  # each trace's first row
    roots = np.flatnonzero(is_root)
    by_choice = roots[np.lexsort((start[roots], ~duration[roots], orphan[roots], trace[roots]))]
    t, o, d, s = trace[by_choice], orphan[by_choice], duration[by_choice], start[by_choice]
    if ((t[1:] == t[:-1]) & (o[1:] == o[:-1]) & (d[1:] == d[:-1]) & (s[1:] == s[:-1])).any():
        return None
    chosen = by_choice[np.flatnonzero(np.diff(t, prepend=-1))]
    if chosen.size != first.size:  # (every trace has a root: cycles are cut)
        return None
    incomplete = (
        np.logical_or.reduceat(orphan, first)
        | (np.add.reduceat(is_root.astype(np.int64), first) > 1)
        | ~np.logical_or.reduceat(is_root & ~orphan, first)
    )
    return pl.DataFrame(
        [
            spans["trace_id"].gather(chosen),
            spans["span_id"].gather(chosen).alias("root_span_id"),
            spans["service"].gather(chosen).alias("root_service"),
            spans["name"].gather(chosen).alias("root_name"),
            pl.Series("root_start_ns", start[chosen], dtype=pl.Int64),
            pl.Series("root_duration_ns", duration[chosen], dtype=pl.Int64),
            pl.Series("span_count", np.diff(np.append(first, n)), dtype=pl.UInt32),
            pl.Series("incomplete", incomplete, dtype=pl.Boolean),
        ]
    )


def _trace_frame(spans: pl.DataFrame) -> pl.DataFrame:
    if spans.height == 0:
        return pl.DataFrame(
            schema={
                "trace_id": pl.String,
                "root_span_id": pl.String,
                "root_service": pl.String,
                "root_name": pl.String,
                "root_start_ns": pl.Int64,
                "root_duration_ns": pl.Int64,
                "span_count": pl.UInt32,
                "incomplete": pl.Boolean,
            }
        )
    per_trace = spans.group_by("trace_id").agg(
        pl.len().cast(pl.UInt32).alias("span_count"),
        pl.col("orphan").any().alias("_any_orphan"),
        pl.col("is_root").sum().alias("_roots"),
        (pl.col("is_root") & ~pl.col("orphan")).any().alias("_has_true_root"),
    )
    roots = (
        spans.filter(pl.col("is_root"))
        .sort(["trace_id", "orphan", "duration_ns", "start_ns"], descending=[False, False, True, False])
        .unique(subset="trace_id", keep="first", maintain_order=True)
        .select(
            "trace_id",
            pl.col("span_id").alias("root_span_id"),
            pl.col("service").alias("root_service"),
            pl.col("name").alias("root_name"),
            pl.col("start_ns").alias("root_start_ns"),
            pl.col("duration_ns").alias("root_duration_ns"),
        )
    )
    return (
        roots.join(per_trace, on="trace_id", how="left")
        .with_columns(
            (pl.col("_any_orphan") | (pl.col("_roots") > 1) | ~pl.col("_has_true_root")).alias("incomplete")
        )
        .select(TRACE_COLUMNS)
        .sort("trace_id")
    )


def compact(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` holding only its own values. A few rows cut from the spans (five exemplar trace
    ids, a signature's names) keep sharing the spans' string buffers, and a frame travels to
    another process, or stays alive there, with every byte of those buffers: measured on 1M spans,
    313 MiB of pickled rows for 42 MiB of values (a one-row table carried 5 MiB of trace ids). A
    copy through Arrow's plain string layout keeps just the values; a frame of other columns, or
    one whose column types would not survive the trip, is returned as it is."""
    if not any(_has_strings(dtype) for dtype in frame.dtypes):
        return frame
    copied = pl.from_arrow(frame.to_arrow(compat_level=pl.CompatLevel.oldest()))
    return copied if isinstance(copied, pl.DataFrame) and copied.schema == frame.schema else frame


def _has_strings(dtype: pl.DataType) -> bool:
    if dtype in (pl.String, pl.Binary):
        return True
    inner = getattr(dtype, "inner", None)
    if inner is not None:
        return _has_strings(inner)
    fields = getattr(dtype, "fields", None)
    return any(_has_strings(f.dtype) for f in fields or ())
