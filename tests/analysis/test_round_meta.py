"""What ``serve``'s round folds from each stored batch's meta (issue 11: one running total, not
every batch's at once) decides exactly what the whole decides:

* the critical-path summaries folded one piece at a time (their values written to a folder, an
  endpoint's read back at a time) give the at-once run's critical paths and the same merged
  forest as combining every piece's at once;
* the services grouped one piece at a time are the pairs of every piece grouped at once;
* the trace summaries held compact (:class:`TraceRoots`: OTLP's hex ids as 64-bit words) give
  pipeline.score the rows filtering the frame gives, hex ids or not.

Over the labelled sample traces, split into partitions of whole traces as serve's batches are.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.endpoint_path import (
    REPORT_PATHS,
    SpilledPathSummary,
    combine_path_summaries,
    critical_paths,
    critical_paths_from_summary,
    path_rows,
    summarize_path_rows,
)
from hourglass.analysis.incremental import _fold_services
from hourglass.analysis.model import TraceRoots, _mixed, hex_words
from hourglass.analysis.pipeline import _affected_roots
from hourglass.collector.files import read_trace_files

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "sample-traces").glob("*.otlp.jsonl"))
PARTS = 7


@pytest.fixture(scope="module")
def table() -> pl.DataFrame:
    tables = [
        t for t in read_trace_files([str(p) for p in SAMPLES], on_error=lambda problem: None) if t.num_rows
    ]
    return pl.concat([pl.DataFrame(t) for t in tables], how="vertical_relaxed")


def _parts(table: pl.DataFrame) -> list[AnalysisContext]:
    """The traces in ``PARTS`` partitions of whole traces (by a hash of the trace id)."""
    part = table["trace_id"].hash(seed=1) % PARTS
    return [AnalysisContext.from_table(table.filter(part == n).to_arrow()) for n in range(PARTS)]


def test_summaries_folded_one_piece_at_a_time_decide_as_the_whole(
    table: pl.DataFrame, tmp_path: Path
) -> None:
    contexts = _parts(table)
    summaries = [summarize_path_rows(path_rows(ctx)) for ctx in contexts]
    assert sum(s.roots.height > 0 for s in summaries) > 3, "the partitions must hold traces"
    folder = tmp_path / "spans[1].duckdb.d"  # ("[" in a path: part of its name, not a pattern)
    folder.mkdir()
    folded = SpilledPathSummary(str(folder))
    for summary in summaries:
        folded.add(summary)
    assert len(list(folder.iterdir())) == 3 * PARTS  # the values are on disk
    at_once = combine_path_summaries(summaries)
    assert folded.nodes is not None and folded.nodes.equals(at_once.nodes)
    assert folded.nodes.height > PARTS and folded.nodes["root"].n_unique() > 1
    assert folded.counts is not None
    assert folded.counts.sort("service", "operation").equals(
        at_once.roots.group_by("service", "operation")
        .agg(traces=pl.col("durations").list.len().sum())
        .sort("service", "operation")
    )
    whole = critical_paths(AnalysisContext.from_table(table.to_arrow()), **REPORT_PATHS)
    assert len(whole) > 1
    assert critical_paths_from_summary(at_once, **REPORT_PATHS) == whole
    assert folded.critical_paths(**REPORT_PATHS) == whole
    assert folded.report_critical_paths() == whole
    # every endpoint, every path and operation (not the report's cut): the same figures
    assert folded.critical_paths(top=100, top_paths=100) == critical_paths(
        AnalysisContext.from_table(table.to_arrow()), top=100, top_paths=100
    )
    # a folder that cannot be written (gone): the pieces held in memory, the same decision
    held = SpilledPathSummary(str(tmp_path / "gone"))
    for summary in summaries:
        held.add(summary)
    assert not (tmp_path / "gone").exists() and all(not isinstance(p, int) for p in held.pieces)
    assert held.nodes is not None and held.nodes.equals(at_once.nodes)
    assert held.report_critical_paths() == whole
    # no folder at all (the round could not make one): held in memory, the same decision
    unfiled = SpilledPathSummary(None)
    for summary in summaries:
        unfiled.add(summary)
    assert all(not isinstance(p, int) for p in unfiled.pieces)
    assert unfiled.report_critical_paths() == whole


def test_services_folded_one_piece_at_a_time_are_the_whole_grouped() -> None:
    pieces = [
        pl.DataFrame(
            {"service": ["a", "b", "a"], "scope_name": ["x", "x", None], "trace_id": ["t5", "t2", "t9"]}
        ),
        pl.DataFrame({"service": ["a", "c"], "scope_name": ["x", "y"], "trace_id": ["t1", "t7"]}),
        pl.DataFrame({"service": ["b", "a"], "scope_name": ["x", None], "trace_id": ["t3", "t0"]}),
    ]
    folded = None
    for piece in pieces:
        folded = _fold_services(folded, piece)
    assert folded is not None
    at_once = pl.concat(pieces).group_by("service", "scope_name").agg(pl.col("trace_id").min())
    order = ["service", "scope_name"]
    assert folded.sort(order, nulls_last=True).equals(at_once.sort(order, nulls_last=True))
    assert folded.filter(pl.col("service") == "a")["trace_id"].sort().to_list() == ["t0", "t1"]


MIX = 0x9E3779B97F4A7C15  # (model._mixed's multiplier)


def _collides_with(first: int, second: int) -> str:
    """The id whose two words mix to the same 64-bit key as (``first``, ``second``)'s."""
    return f"{first + 1:016x}{(second - MIX) % 2**64:016x}"


@pytest.mark.parametrize("ids", ["hex", "text", "mixed", "generated"])
def test_compact_trace_roots_give_the_rows_the_frame_gives(ids: str) -> None:
    hex_ids = [f"{n:032x}" for n in (7, 3, 2**100 + 5, 2**64 + 3, 3 + 2**80)]
    text_ids = ["t-1", "t-2", "T3", "", "t-5"]
    # generated ids share their first word; two of them mix to one key (told apart word by word)
    generated = [f"5a5a0000000000df{n:016x}" for n in (1, 2, 3)]
    generated += [_collides_with(0x5A5A0000000000DF, 2), f"5a5a0000000000e0{5:016x}"]
    chosen = {"hex": hex_ids, "text": text_ids, "mixed": hex_ids[:3] + text_ids[:2], "generated": generated}[
        ids
    ]
    durations = [10_000_000, 2_500_000, None, 7_000_001, 123]
    pieces = [
        pl.DataFrame({"trace_id": chosen[:2], "root_duration_ns": durations[:2]}),
        pl.DataFrame(schema={"trace_id": pl.String, "root_duration_ns": pl.Int64}),
        pl.DataFrame({"trace_id": chosen[2:] + chosen[:1], "root_duration_ns": [*durations[2:], 99]}),
    ]
    frame = pl.concat(pieces, how="vertical_relaxed")
    roots = TraceRoots.concat([TraceRoots.of(p) for p in pieces])
    assert roots.height == frame.height == 6
    # a duplicated id (two rows), a null duration, an id not stored, ids of other widths
    # (the generated pair mixes to one key: asking for one must not give the other)
    for wanted in [
        chosen[:1],
        [chosen[1]],
        chosen[1:4],
        ["nope", chosen[4], f"{5:016x}", chosen[0].upper()],
        [],
        chosen,
    ]:
        expected = _affected_roots(frame, wanted)
        got = _affected_roots(roots, wanted)
        assert got.equals(expected), (wanted, got, expected)
    assert _affected_roots(roots, chosen[:1]).height == 2
    if ids == "generated":
        words = hex_words(pl.Series([chosen[1], chosen[3]]))
        assert words is not None and _mixed(words)[0] == _mixed(words)[1]
        assert _affected_roots(roots, [chosen[1]])["trace_id"].to_list() == [chosen[1]]
    assert TraceRoots.concat([]).height == 0
