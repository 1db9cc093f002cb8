"""Split detectors: extraction over partitions of whole traces + one decision == the whole.

For every detector in ``hourglass.analysis.detectors.PARTS`` and every trace set we have — the labelled sample
traces, a generated mix of every bench shape, the HotROD traces, the real trace files and the real
workloads in ``../shared`` — the findings of ``detect`` over all spans equal those of ``decide``
over the combined extractions of 1, 3 and 7 partitions: the same ids, confidence, evidence,
targets and occurrences (trace, spans, interventions, numbers) in the same order. The same for the
report's endpoint critical paths (``hourglass.analysis.endpoint_path``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext, to_analysis_frame
from hourglass.analysis.detectors import DETECTORS, PARTS
from hourglass.analysis.endpoint_path import (
    combine_path_rows,
    combine_path_summaries,
    critical_paths_from_rows,
    critical_paths_from_summary,
    endpoint_critical_path,
    path_rows,
    report_critical_paths_from_summary,
    summarize_path_rows,
)
from hourglass.analysis.endpoint_path import report_critical_paths as paths_from_rows
from hourglass.analysis.model import Finding, NearMissLog
from hourglass.analysis.pipeline import report_critical_paths
from hourglass.collector.files import read_trace_files

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
SAMPLE_FILES = sorted((ROOT / "sample-traces").glob("*.otlp.jsonl"))
REAL_FILES = sorted(p for p in (SHARED / "real-traces").glob("*") if p.suffix in (".json", ".jsonl", ".pb"))
WORKLOADS = sorted((SHARED / "real-workloads").glob("*.gz"))


def _read(paths: list[Path]) -> pl.DataFrame:
    tables = [
        t for t in read_trace_files([str(p) for p in paths], on_error=lambda problem: None) if t.num_rows
    ]
    return to_analysis_frame(pa.concat_tables(tables))


def _generated() -> pl.DataFrame:
    from bench.analysis import generate_spans

    return to_analysis_frame(generate_spans(40_000, seed=3))


def _hotrod(tmp: Path) -> pl.DataFrame:
    from tests.hotrod_traces import write

    return _read([write(tmp / "hotrod.json", requests=60)])


class Notes:
    """A near-miss sink that keeps what it is told, in order."""

    def __init__(self) -> None:
        self.misses: list[tuple[Any, ...]] = []

    def note_near_miss(self, *args: Any, **kwargs: Any) -> None:
        """Everything ``NearMissLog.note_near_miss`` is told, ids untruncated."""
        bound = inspect.signature(NearMissLog.note_near_miss).bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        self.misses.append(
            (a["kind"], a["service"], a["operation"], a["reason"], tuple(a["trace_ids"]), tuple(a["span_ids"]), a["traces"])
        )


def _comparable(finding: Finding) -> dict[str, Any]:
    return {
        "id": finding.id,
        "confidence": finding.confidence,
        "targets": finding.targets,
        "evidence": finding.evidence,
        "requests_at_risk": finding.requests_at_risk,
        "occurrences": [(o.trace_id, o.span_ids, o.interventions, o.numbers) for o in finding.occurrences],
    }


TRACE_SETS: dict[str, Any] = {
    "sample-traces": lambda: _read(SAMPLE_FILES),
    "generated": _generated,
    "hotrod": None,
    "real-traces": lambda: _read(REAL_FILES),
    **{f"workload-{p.name.split('-')[1]}": (lambda p=p: _read([p])) for p in WORKLOADS},
}


@pytest.fixture(scope="module", params=sorted(TRACE_SETS))
def trace_set(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, pl.DataFrame, AnalysisContext]:
    name = request.param
    if name == "real-traces" and not REAL_FILES:
        pytest.skip(f"no real trace files in {SHARED / 'real-traces'}")
    make = TRACE_SETS[name]
    frame = _hotrod(tmp_path_factory.mktemp("hotrod")) if make is None else make()
    return name, frame, AnalysisContext.from_table(frame)


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_partitioned_extraction_decides_like_the_whole(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext], parts: int
) -> None:
    name, frame, whole = trace_set
    expected = {kind: [_comparable(f) for f in DETECTORS[kind](whole)] for kind in PARTS}
    whole_notes = Notes()
    partitions.decide({k: PARTS[k].extract(whole) for k in PARTS}, whole_notes)
    pieces = partitions.split_by_trace(frame, parts)
    assert sum(p.height for p in pieces) == frame.height
    assert len({t for p in pieces for t in p["trace_id"].unique().to_list()}) == frame["trace_id"].n_unique()
    extracted = [partitions.extract(AnalysisContext.from_table(piece)) for piece in pieces]
    notes = Notes()
    got = partitions.decide(partitions.combine(extracted), notes)
    for kind in PARTS:
        assert [_comparable(f) for f in got[kind]] == expected[kind], (
            f"{kind} on {name} in {parts} partitions"
        )
    assert sorted(notes.misses) == sorted(whole_notes.misses), f"near misses on {name} in {parts} partitions"


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_partitioned_critical_paths_equal_the_whole(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext], parts: int
) -> None:
    """The report's endpoint critical paths (the page's icicles) from the combined rows of the
    partitions equal those of the whole: operations, paths and icicle nodes with their ids."""
    name, frame, whole = trace_set
    expected = report_critical_paths(whole)
    assert expected, f"no critical paths on {name}"
    pieces = partitions.split_by_trace(frame, parts)
    rows = combine_path_rows(path_rows(AnalysisContext.from_table(piece)) for piece in pieces)
    assert paths_from_rows(rows) == expected, f"critical paths on {name} in {parts} partitions"
    # serve keeps each partition's rows as per-endpoint aggregates: the same paths decided there,
    # the report's and the full ones (every endpoint's operations, paths and icicle)
    summary = combine_path_summaries(
        summarize_path_rows(path_rows(AnalysisContext.from_table(piece))) for piece in pieces
    )
    assert report_critical_paths_from_summary(summary) == expected, f"summaries of {name} in {parts}"
    assert critical_paths_from_summary(summary) == critical_paths_from_rows(rows), f"{name} in {parts}"
    assert critical_paths_from_summary(summary, top=100) == critical_paths_from_rows(rows, top=100)
    # and the same endpoint asked alone (GET /v1/critical-path) from a context of the whole
    first = expected[0]
    alone = endpoint_critical_path(
        whole, first["service"], first["operation"], top_paths=3, max_operations=12, max_icicle_nodes=60
    )
    assert alone == first


def test_rows_kept_on_disk_decide_one_kind_at_a_time_like_the_whole(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext], tmp_path: Path
) -> None:
    """With a spill every partition's rows and critical-path rows go to disk (``Spill.keep``), none
    travel back, and the decision reads one kind at a time (``KeptRows``): the findings, near
    misses and endpoint critical paths of the whole."""
    from hourglass.analysis.spill import Spill

    name, frame, whole = trace_set
    expected = {kind: [_comparable(f) for f in DETECTORS[kind](whole)] for kind in PARTS}
    whole_notes = Notes()
    partitions.decide({k: PARTS[k].extract(whole) for k in PARTS}, whole_notes)
    spill = Spill.create(2, near=str(tmp_path))
    results = [
        partitions.part_result(part, AnalysisContext.from_table(piece), spill)
        for part, piece in enumerate(partitions.split_by_trace(frame, 3))
    ]
    assert all(r.kept and r.kept_paths and not r.rows and r.paths is None for r in results)
    kept = partitions.KeptRows(spill, PARTS)
    assert list(kept) == list(PARTS)
    notes = Notes()
    got = partitions.decide(kept, notes, spill)
    for kind in PARTS:
        assert [_comparable(f) for f in got[kind]] == expected[kind], f"{kind} on {name}, rows kept on disk"
    assert sorted(notes.misses) == sorted(whole_notes.misses), f"near misses on {name}, rows kept on disk"
    paths = partitions.kept_paths(spill)
    assert paths is not None and paths_from_rows(paths) == report_critical_paths(whole)
    spill.remove()


def test_a_pricing_task_receives_the_occurrences_of_its_own_traces_only() -> None:
    """``findings_by_partition``: every finding in every share, each occurrence in the share of the
    partition holding its trace, and only there."""
    frame = _generated()
    findings = [f for kind in PARTS for f in DETECTORS[kind](AnalysisContext.from_table(frame))]
    pieces = partitions.split_by_trace(frame, 3)
    trace_parts = pl.concat(
        [p.select(pl.col("trace_id").unique(), part=pl.lit(n, pl.UInt32)) for n, p in enumerate(pieces)]
    )
    shares = partitions.findings_by_partition(findings, trace_parts, 3)
    for part, share in enumerate(shares):
        assert [f.id for f in share] == [f.id for f in findings]
        mine = set(pieces[part]["trace_id"].to_list())
        assert all(o.trace_id in mine for f in share for o in f.occurrences)
    for i, finding in enumerate(findings):
        got = sorted((o.trace_id, o.span_ids) for share in shares for o in share[i].occurrences)
        assert got == sorted((o.trace_id, o.span_ids) for o in finding.occurrences)
    assert sum(len(f.occurrences) for f in findings) > 100


def test_the_generated_mix_exercises_every_split_detector() -> None:
    """Guards the property test against passing on nothing; and every detector is split (a
    partitioned run decides only what ``PARTS`` lists)."""
    assert set(PARTS) == set(DETECTORS)
    whole = AnalysisContext.from_table(_generated())
    for kind in PARTS:
        assert DETECTORS[kind](whole), f"the generated mix has no {kind} finding"


@pytest.mark.parametrize("parts,buckets,batch_rows", [(1, 1, None), (3, 5, None), (2, 2, 7)])
def test_spilled_rows_decided_bucket_by_bucket_decide_like_the_whole(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext],
    parts: int,
    buckets: int,
    batch_rows: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tables that grow with spans (``spill.SPILLABLE``) written to Parquet buckets by each
    partition and decided one bucket at a time: the same findings and near misses as the whole.
    The convoy rule streams each bucket's rows in chunks (``_sweep``); with ``batch_rows`` of 7
    every key's rows cross many chunk cuts (and the starts of one microsecond some of them)."""
    from hourglass.analysis.detectors import _sweep
    from hourglass.analysis.spill import SPILLABLE, Spill

    if batch_rows is not None:
        monkeypatch.setattr(_sweep, "BATCH_ROWS", batch_rows)
    swept: list[int] = []
    real_sweep = _sweep.sweep
    monkeypatch.setattr(
        _sweep,
        "sweep",
        lambda *a, **k: swept.append(1) or real_sweep(*a, **k),  # type: ignore[func-returns-value]
    )
    name, frame, whole = trace_set
    expected = {kind: [_comparable(f) for f in DETECTORS[kind](whole)] for kind in SPILLABLE}
    whole_notes = Notes()
    partitions.decide({k: PARTS[k].extract(whole) for k in SPILLABLE}, whole_notes)
    spill = Spill.create(buckets, near=str(tmp_path))
    extracted = []
    for part, piece in enumerate(partitions.split_by_trace(frame, parts)):
        rows = spill.write(part, partitions.extract(AnalysisContext.from_table(piece), SPILLABLE))
        for kind, table in ((k, s.table) for k, s in SPILLABLE.items()):
            assert rows[kind][table].is_empty()  # the rows that travel back leave the table behind
        extracted.append(rows)
    spilled = {k: sum(load(None, None).height for load in spill.buckets_of(k)) for k in SPILLABLE}
    assert spilled == {k: PARTS[k].extract(whole)[s.table].height for k, s in SPILLABLE.items()}
    notes = Notes()
    got = partitions.decide(partitions.combine(extracted), notes, spill)
    for kind in SPILLABLE:
        assert [_comparable(f) for f in got[kind]] == expected[kind], (
            f"{kind} on {name} in {parts} partitions, {buckets} buckets"
        )
    assert sorted(notes.misses) == sorted(whole_notes.misses), f"near misses on {name}, {buckets} buckets"
    if any(f.evidence.get("evidence") == "inferred_convoy" for f in got["lock_contention"]):
        assert swept, "the convoy found was not decided by the streamed sweep"
    spill.remove()


def test_rows_from_a_partition_carry_their_own_values_only() -> None:
    """A few rows cut from the spans (five exemplar trace ids, a signature's names) must not drag
    the partition's string buffers along to the deciding process (pickled, as a worker returns
    them): each table pickles to about its own size."""
    import pickle

    frame = _generated()

    class Frames:
        def load(self, part: int, parts: int) -> pa.Table:
            return partitions.split_by_trace(frame, parts)[part].to_arrow()

    result = partitions.extract_part(Frames(), 0, 3)  # type: ignore[arg-type]
    tables = [(f"{k}.{n}", t) for k, rows in result.rows.items() for n, t in rows.items()]
    tables += [("traces", result.traces), ("services", result.services)]
    for name, table in tables:
        assert len(pickle.dumps(table)) <= 2 * table.estimated_size() + 8192, name
