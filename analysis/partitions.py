"""Analysis by partitions of whole traces: per-trace extraction, then one cross-trace decision.

A detector that is split (``analysis.detectors.PARTS``) has two halves:

* ``extract(ctx) -> Rows`` reads the repaired spans of a set of *whole* traces and returns small
  named tables — candidate occurrences with their interventions, the per-instance rows that
  cross-trace evidence needs, partial counts. It never looks outside its traces.
* ``decide(rows, notes) -> list[Finding]`` applies the thresholds, shares, confidence and
  aggregation on those rows alone.

The rows of several partitions are concatenated table by table (:func:`combine`) before the
decision, so any partitioning of the traces gives the findings of the whole: the property
``tests/analysis/test_partitions.py`` checks for every split detector on the labelled, demo and
real trace files, for several partition counts.

A partition is ``hash(trace_id) mod P`` (:func:`split_by_trace`): every span of a trace lands in
the same partition, as the OpenTelemetry Collector's ``loadbalancing`` exporter routes by trace id.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl

from analysis.context import AnalysisContext
from analysis.detectors import PARTS
from analysis.detectors._common import NearMissSink, Rows
from analysis.model import Finding


def split_by_trace(frame: pl.DataFrame, parts: int) -> list[pl.DataFrame]:
    """``frame``'s rows in ``parts`` partitions of whole traces (``hash(trace_id) mod parts``)."""
    if parts <= 1:
        return [frame]
    keyed = frame.with_columns((pl.col("trace_id").hash() % parts).alias("_partition"))
    return [keyed.filter(pl.col("_partition") == p).drop("_partition") for p in range(parts)]


def extract(ctx: AnalysisContext, kinds: Iterable[str] | None = None) -> dict[str, Rows]:
    """Every split detector's (or ``kinds``') extraction over one context."""
    chosen = PARTS if kinds is None else {k: PARTS[k] for k in kinds}
    out: dict[str, Rows] = {}
    for kind, parts in chosen.items():
        try:
            out[kind] = parts.extract(ctx)
        except Exception as exc:  # the whole analysis fails, naming the detector
            raise RuntimeError(f"detector {kind!r} failed while extracting: {exc}") from exc
    return out


def combine(extracted: Iterable[dict[str, Rows]]) -> dict[str, Rows]:
    """The extractions of several partitions as one, table by table (empty tables dropped)."""
    tables: dict[str, dict[str, list[pl.DataFrame]]] = {}
    for by_kind in extracted:
        for kind, rows in by_kind.items():
            kind_tables = tables.setdefault(kind, {})
            for name, frame in rows.items():
                frames = kind_tables.setdefault(name, [])
                if frame.height or not frames:  # an empty table is kept only for its columns
                    frames.append(frame)
    return {
        kind: {name: _concat(frames) for name, frames in kind_tables.items()}
        for kind, kind_tables in tables.items()
    }


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame:
    filled = [f for f in frames if f.height]
    if not filled:
        return frames[0]
    return filled[0] if len(filled) == 1 else pl.concat(filled, how="vertical_relaxed")


def decide(rows: dict[str, Rows], notes: NearMissSink) -> dict[str, list[Finding]]:
    """Each split detector's decision over combined rows."""
    out: dict[str, list[Finding]] = {}
    for kind, kind_rows in rows.items():
        try:
            out[kind] = PARTS[kind].decide(kind_rows, notes)
        except Exception as exc:
            raise RuntimeError(f"detector {kind!r} failed while deciding: {exc}") from exc
    return out
