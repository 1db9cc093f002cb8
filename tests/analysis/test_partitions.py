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
import os
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis import partitions, worker_start
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
            (
                a["kind"],
                a["service"],
                a["operation"],
                a["reason"],
                tuple(a["trace_ids"]),
                tuple(a["span_ids"]),
                a["traces"],
            )
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
    # lock_contention decided in a thread of its own beside the other kinds (``Plan.beside``): the
    # same findings, and the same near misses in the same order as one kind after another
    beside_notes = Notes()
    beside = partitions.decide(partitions.KeptRows(spill, PARTS), beside_notes, spill, beside=True)
    assert list(beside) == list(got)
    for kind in PARTS:
        assert [_comparable(f) for f in beside[kind]] == [_comparable(f) for f in got[kind]], kind
    assert beside_notes.misses == notes.misses, f"near misses on {name}, decided beside"
    paths = partitions.kept_paths(spill)  # each partition's summarized: the same icicles
    assert paths is not None and report_critical_paths_from_summary(paths) == report_critical_paths(whole)
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


def test_a_pricing_task_ships_the_savings_without_the_traces_ids() -> None:
    """``price`` (a pricing task's result, pickled to the parent) carries each finding's per-trace
    savings and root durations, not the ids of those traces: the merged ``Impact`` drops them and
    nothing reads them. The numbers are the whole's, trace by trace."""
    from hourglass.analysis.whatif import WhatIf

    ctx = AnalysisContext.from_table(_generated())
    findings = [f for kind in PARTS for f in DETECTORS[kind](ctx)]
    priced = partitions.price(ctx, findings)
    assert priced
    whatif = WhatIf.of(ctx)
    for finding in findings:
        if finding.id not in priced:
            continue
        ids, saved, root = priced[finding.id]
        assert tuple(ids) == ()
        whole = whatif.impact(finding)
        assert whole.trace_ids  # (the in-process pricing still names them)
        assert saved.tolist() == whole.saved_ns.tolist() and root.tolist() == whole.root_ns.tolist()
        numbers = whatif.impact(finding, trace_ids=False)
        assert numbers.trace_ids == [] and numbers.saved_ns.tolist() == whole.saved_ns.tolist()
    merged = partitions.merge_impacts([priced])
    assert all(impact.trace_ids == [] for impact in merged.values())


def test_a_pricing_task_leaves_nothing_of_its_context_behind(tmp_path: Path) -> None:
    """``price_part``'s context (the partition's spans, repaired, and the what-if engine it caches,
    which refers back to it) is freed when the task returns, not left to the cyclic collector: a
    worker pricing partition after partition held every one of them."""
    import gc

    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    store.write(generate_spans(10_000, seed=5))
    store.close()
    source = partitions.StoreSource(db)
    findings = [f for kind in PARTS for f in DETECTORS[kind](AnalysisContext.from_table(source.load(0, 1)))]

    def contexts() -> int:
        return sum(isinstance(o, AnalysisContext) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = contexts()
        priced = partitions.price_part(source, 0, 2, findings, True)
        assert priced.impacts  # the what-if engine was built and used
        assert contexts() == before
    finally:
        gc.enable()


def test_the_generated_mix_exercises_every_split_detector() -> None:
    """Guards the property test against passing on nothing; and every detector is split (a
    partitioned run decides only what ``PARTS`` lists)."""
    assert set(PARTS) == set(DETECTORS)
    whole = AnalysisContext.from_table(_generated())
    for kind in PARTS:
        assert DETECTORS[kind](whole), f"the generated mix has no {kind} finding"
    # and the spilled tables' path is exercised on it (the spilled-rows test reads "absent" as empty)
    from hourglass.analysis.spill import SPILLABLE

    for kind, spilled in SPILLABLE.items():
        table = PARTS[kind].extract(whole).get(spilled.table)
        assert table is not None and table.height, f"the generated mix spills no {kind} {spilled.table} rows"


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
    every key's rows cross many chunk cuts (and the starts of one microsecond some of them), and
    the sweep's states are cut every 3 rows."""
    from hourglass.analysis.detectors import _sweep
    from hourglass.analysis.spill import SPILLABLE, Spill

    if batch_rows is not None:
        monkeypatch.setattr(_sweep, "BATCH_ROWS", batch_rows)
        monkeypatch.setattr(_sweep, "CHECKPOINT_ROWS", 3)
    swept: list[int] = []
    real_sweep = _sweep.BucketSweep.sweep
    monkeypatch.setattr(
        _sweep.BucketSweep,
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
            # the rows that travel back leave the table behind (a kind with no rows here has none)
            assert rows[kind].get(table, pl.DataFrame()).is_empty()
        extracted.append(rows)
    spilled = {k: sum(load(None, None).height for load in spill.buckets_of(k)) for k in SPILLABLE}
    assert spilled == {
        k: PARTS[k].extract(whole).get(s.table, pl.DataFrame()).height for k, s in SPILLABLE.items()
    }
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


def test_convoy_sweep_resumed_from_kept_states_decides_like_the_whole(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's rounds: each bucket of the stored batches keeps the convoy sweep's states
    (``_sweep.BucketSweep``) and the next decision resumes each resource key from the latest one
    its files still hold. Parts of whole traces in the order of their first start (as serve's
    batches; neighbours overlap in time) are added one round at a time, then one is extracted
    again with a trace less (another file), then the first one dropped (retention), then an idle
    round: every round's findings and near misses are those of the at-once detector over the
    same traces, and a round that adds a part sweeps no more rows than a pass from nothing (fewer
    on the generated mix). With ``sure`` of 1 every correlation is left to polars (the
    fallback of the statistics from the sweep's sums); with ``max_open`` of 3 a state with more
    spans in flight is not kept (and the rest of the key's rows swept at once)."""
    _convoy_rounds(trace_set, 20, None, None, tmp_path, monkeypatch)


@pytest.mark.parametrize("trace_set", ["generated", "sample-traces"], indirect=True)
@pytest.mark.parametrize(
    "variant",
    [(1 << 14, None, None), (20, 1.0, None), (20, None, 3)],
    ids=["few-states", "polars", "max-open"],
)
def test_convoy_sweep_resumed_with_few_states_or_sums_left_to_polars(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext],
    variant: tuple[int, float | None, int | None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rounds above with states kept rarely (``CHECKPOINT_ROWS`` of 16384), every
    correlation left to polars, or no state kept past 3 spans in flight: on the generated mix
    and the sample traces (their lock-contention sample among them); every set runs the default
    case above."""
    _convoy_rounds(trace_set, *variant, tmp_path, monkeypatch)


def _convoy_rounds(
    trace_set: tuple[str, pl.DataFrame, AnalysisContext],
    checkpoint_rows: int,
    sure: float | None,
    max_open: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hourglass.analysis.detectors import _sweep, lock_contention
    from hourglass.analysis.spill import BucketFiles, Spill

    monkeypatch.setattr(_sweep, "CHECKPOINT_ROWS", checkpoint_rows)
    if sure is not None:
        monkeypatch.setattr(lock_contention, "_SURE", sure)
    if max_open is not None:
        monkeypatch.setattr(_sweep, "MAX_OPEN_ENDS", max_open)
    advanced: list[int] = []
    real_advanced = _sweep.Carry.advanced

    def counted(self: _sweep.Carry, run: dict[str, Any], t0: int) -> _sweep.Carry:
        advanced.append(int(run["gid"].size))
        return real_advanced(self, run, t0)

    monkeypatch.setattr(_sweep.Carry, "advanced", counted)
    real_sweep = _sweep.BucketSweep.sweep
    compared: list[int] = []

    def checked(self: _sweep.BucketSweep, con: Any, gids: pl.Series, t0: int) -> dict[int, _sweep.Carry]:
        """Each key's sweep resumed from the kept states: the same integers as a pass from nothing."""
        got = real_sweep(self, con, gids, t0)
        if self.state is not None:
            counted_before = len(advanced)
            fresh = real_sweep(_sweep.BucketSweep(self.files, None, con), con, gids, t0)
            del advanced[counted_before:]  # not the round's
            fields = ("started", "ended", "end_max", "overlapped", "peak", "queued", "sums")
            assert {g: [getattr(c, f) for f in fields] for g, c in got.items()} == {
                g: [getattr(c, f) for f in fields] for g, c in fresh.items()
            }
            compared.append(len(got))
        return got

    monkeypatch.setattr(_sweep.BucketSweep, "sweep", checked)
    name, frame, _ = trace_set
    order = frame.group_by("trace_id").agg(pl.col("start_ns").min()).sort("start_ns", "trace_id")["trace_id"]
    chunks = [
        order.slice(i * order.len() // 4, (i + 1) * order.len() // 4 - i * order.len() // 4) for i in range(4)
    ]
    parts = [frame.filter(pl.col("trace_id").is_in(ids.implode())) for ids in chunks]
    spill = Spill.create(3, near=str(tmp_path))
    folder = Path(spill.folder) / "lock_contention.candidates"
    extracted: dict[int, dict[str, Any]] = {}

    def write(p: int) -> None:
        extracted[p] = spill.write(
            p, partitions.extract(AnalysisContext.from_table(parts[p]), ["lock_contention"])
        )

    def decide(chosen: list[int], kept: bool) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], int]:
        loads = []
        for bucket in sorted(folder.glob("b*")):
            files = tuple(f for f in sorted(bucket.glob("p*.parquet")) if int(f.stem[1:]) in chosen)
            if files:
                loads.append(BucketFiles(files, "gid", bucket / "sweep.state" if kept else None))
        notes = Notes()
        rows = partitions.combine({"lock_contention": extracted[p]["lock_contention"]} for p in chosen)
        before = len(advanced)
        found = lock_contention.decide(rows.get("lock_contention", {}), notes, loads)
        return [_comparable(f) for f in found], sorted(notes.misses), sum(advanced[before:])

    for p in range(4):
        write(p)
    rounds = [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], "rewrite", [0, 1, 2, 3], [1, 2, 3], [1, 2, 3]]
    for number, chosen in enumerate(rounds):
        if chosen == "rewrite":
            parts[2] = parts[2].filter(pl.col("trace_id") != chunks[2][0])
            write(2)
            continue
        assert isinstance(chosen, list)
        whole_notes = Notes()
        whole = AnalysisContext.from_table(pl.concat([parts[p] for p in chosen]))
        # the at-once detector (``detect`` is this with the context as the near-miss sink), once
        at_once = lock_contention.decide(lock_contention.extract(whole), whole_notes)
        expected = [_comparable(f) for f in at_once]
        found, misses, swept = decide(chosen, kept=True)
        assert found == expected, f"{name}: round over parts {chosen}"
        assert misses == sorted(whole_notes.misses), f"{name}: near misses, round over parts {chosen}"
        _, _, from_nothing = decide(chosen, kept=False)
        assert swept <= from_nothing, f"{name}: round over parts {chosen}"
        assert compared or not from_nothing
        if (
            name == "generated" and number == 3 and checkpoint_rows == 20 and max_open is None
        ):  # a part added, later in time
            assert swept < from_nothing / 2, f"round adding a part swept {swept} rows, a pass {from_nothing}"
    spill.remove()


@pytest.mark.parametrize("batch_rows", [2, 3, 1 << 18])
def test_streamed_busy_share_counts_a_long_span_of_an_earlier_chunk(
    batch_rows: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The busy pre-filter's share streamed in chunks (``_sweep.overlap_shares`` and the one pass
    of ``_sweep.BucketSweep``): a span starting while a long span of an earlier chunk still runs
    counts as overlapped wherever the chunk cuts fall — the in-memory running maximum's answer."""
    from hourglass.analysis.detectors import _sweep

    monkeypatch.setattr(_sweep, "BATCH_ROWS", batch_rows)
    monkeypatch.setattr(_sweep, "CHECKPOINT_ROWS", 2)
    t0 = 1_764_000_000_000_000_000
    # one long span, then short ones one after another inside it, then two apart after it
    starts = [t0, *(t0 + 10_000 * i for i in range(1, 9)), t0 + 200_000, t0 + 300_000]
    ends = [t0 + 100_000, *(s + 5_000 for s in starts[1:])]
    rows = pl.DataFrame(
        {
            "gid": [7] * len(starts),
            "op": [1] * len(starts),
            "start_ns": starts,
            "end_ns": ends,
            "duration_ns": [e - s for s, e in zip(starts, ends, strict=True)],
            "uid": list(range(len(starts))),
        },
        schema_overrides={"gid": pl.UInt64, "op": pl.UInt64, "uid": pl.UInt64},
    )
    path = tmp_path / "p000000.parquet"
    rows.write_parquet(path)
    expected = 8 / len(starts)  # the eight short spans inside the long one
    shares = _sweep.overlap_shares([path], pl.Series([7], dtype=pl.UInt64), t0)
    assert shares["share"].to_list() == [expected]
    with _sweep.connection(tmp_path) as con:
        carry = _sweep.BucketSweep([path], None, con).sweep(con, pl.Series([7], dtype=pl.UInt64), t0)[7]
    assert carry.overlapped / carry.started == expected
    assert carry.peak == 2 and carry.queued == 8


def test_kept_sweep_states_load_as_columns_not_an_object_per_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's worker loads every bucket's kept sweep states each round and keeps them through
    the convoy decision: they come back as columns (a few arrays), not as Python objects per state
    and per file each folded — at the 12M-span soak store those were ~400k blocks a round, which
    grew the long-lived worker's obmalloc arenas for good. Four keys, 48 states each, folded over
    three rounds of files; what loading them holds does not grow with the states."""
    import gc
    import sys

    from hourglass.analysis.detectors import _sweep

    monkeypatch.setattr(_sweep, "CHECKPOINT_ROWS", 2)
    t0 = 1_764_000_000_000_000_000
    state = tmp_path / "sweep.state"
    files: list[Path] = []
    for batch in range(3):
        starts = [t0 + (batch * 1000 + i) * 10_000 for i in range(100)]
        rows = pl.DataFrame(
            {
                "gid": [g for g in range(4) for _ in starts],
                "op": [1] * (4 * len(starts)),
                "start_ns": starts * 4,
                "end_ns": [s + 15_000 for s in starts] * 4,
                "duration_ns": [15_000] * (4 * len(starts)),
                "uid": list(range(4 * len(starts))),
            },
            schema_overrides={"gid": pl.UInt64, "op": pl.UInt64, "uid": pl.UInt64},
        )
        files.append(tmp_path / f"p{batch:06d}.parquet")
        rows.write_parquet(files[-1])
        with _sweep.connection(tmp_path) as con:
            swept = _sweep.BucketSweep(files, state, con).sweep(con, pl.Series(range(4), dtype=pl.UInt64), t0)
        assert {c.started for c in swept.values()} == {100 * len(files)}
    with _sweep.connection(tmp_path) as con:
        _sweep.BucketSweep(files, state, con)  # (polars' and DuckDB's first-use caches)
        gc.collect()
        before = sys.getallocatedblocks()
        loaded = _sweep.BucketSweep(files, state, con)
        gc.collect()
        held = sys.getallocatedblocks() - before
        # the same states resumed: no row swept again
        advanced: list[int] = []
        real = _sweep.Carry.advanced
        monkeypatch.setattr(_sweep.Carry, "advanced", lambda c, run, t: advanced.append(1) or real(c, run, t))
        again = loaded.sweep(con, pl.Series(range(4), dtype=pl.UInt64), t0)
    assert not advanced and {c.started for c in again.values()} == {300}
    assert held < 1000, f"the 192 kept states of 4 keys hold {held} Python blocks"


def test_the_sweeps_sums_are_exact_integers() -> None:
    """The load statistics come from the sweep's sums of duration and peers, summed by numpy in
    21-bit limbs: Python's integer sums, negative peers and the int64 extremes included."""
    import operator

    import numpy as np

    from hourglass.analysis.detectors._sweep import exact_sums

    def python(d: Any, p: Any) -> tuple[int, ...]:
        d, p = d.tolist(), p.tolist()
        mul = operator.mul
        return sum(d), sum(map(mul, d, d)), sum(p), sum(map(mul, p, p)), sum(map(mul, d, p))

    rng = np.random.default_rng(5)
    cases = [
        (np.array([2**62, 2**63 - 1, 1]), np.array([2**31 - 1, -(2**31), 0], dtype=np.int32)),
        (np.array([7]), np.array([-3])),
    ]
    for n in (1, 2, 1000, (1 << 20) + 7):
        cases.append((rng.integers(1, 2**63 - 1, n), rng.integers(-(2**31), 2**31 - 1, n).astype(np.int32)))
        cases.append((rng.integers(1, 10**8, n), rng.integers(1, 500, n)))
    for d, p in cases:
        assert exact_sums(d, p) == python(d, p)


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


def test_the_store_is_split_into_files_only_where_a_task_can_read_them(tmp_path: Path) -> None:
    """A DuckDB file of this machine with enough partitions is split (each task reads its file,
    the same rows as its scan); few partitions, or a ClickHouse server, are scanned by each task;
    a split that fails leaves no folder behind."""
    import duckdb

    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    store.write(generate_spans(3_000, seed=11))
    store.close()
    parts = partitions.SPLIT_MIN_PARTS
    source = partitions.StoreSource(db)
    assert partitions.split_store(source, parts - 1, near=str(tmp_path)) is None
    assert partitions.split_store(partitions.StoreSource("clickhouse://localhost:8123/db"), parts) is None
    split = partitions.split_store(source, parts, near=str(tmp_path))
    assert split is not None
    try:
        for p in range(parts):
            assert split.load(p, parts).equals(source.load(p, parts))
        with pytest.raises(ValueError, match="the files hold"):
            split.load(0, parts + 1)
    finally:
        split.remove()
    assert not list(tmp_path.glob("hourglass-partitions-*"))
    (tmp_path / "not-a-store.duckdb").write_text("not a DuckDB file")
    with pytest.raises(duckdb.Error, match="not a valid DuckDB database file"):
        partitions.split_store(
            partitions.StoreSource(str(tmp_path / "not-a-store.duckdb")), parts, near=str(tmp_path)
        )
    assert not list(tmp_path.glob("hourglass-partitions-*"))


def test_a_split_beside_the_first_round_writes_no_file_for_the_partitions_it_reads(tmp_path: Path) -> None:
    """``skip``: the partitions the workers' first round reads from the store while the split is
    written get no file (nor a read of their rows); their tasks, in any later pass, read them
    from the store: the same rows as every other partition's file and as its scan."""
    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    store.write(generate_spans(3_000, seed=11))
    store.close()
    parts = partitions.SPLIT_MIN_PARTS + 2
    source = partitions.StoreSource(db)
    split = partitions.split_store(source, parts, near=str(tmp_path), skip=2)
    assert split is not None
    try:
        written = sorted(p.name for p in Path(split.folder).iterdir())
        assert written == [f"p{p:06d}.arrow" for p in range(2, parts)]
        for p in range(parts):
            assert split.load(p, parts).equals(source.load(p, parts))
        some = source.load(0, parts)["trace_id"].to_pylist()[:3]
        assert split.load(0, parts, trace_ids=some).equals(source.load(0, parts, trace_ids=some))
    finally:
        split.remove()


def test_idle_workers_restart_during_the_decision_only_when_the_plan_says_they_fit() -> None:
    """``warm()`` starts the workers before the first task (while the store is split);
    ``idle()`` stops them, and starts new ones at once only with ``warm`` (the plan's choice)."""
    for warm in (True, False):
        executor = partitions.ProcessExecutor(1, warm=warm)
        try:
            executor.warm()
            started = executor._pool
            assert started is not None
            executor.warm()  # already started: the same pool
            assert executor._pool is started
            executor.idle()
            assert (executor._pool is not None) is warm and executor._pool is not started
            assert executor.map("extracting", pow, [(2, 1, 5)], None) == [2]  # (x, part, parts): 2**1 % 5
        finally:
            executor.close()


def test_idle_workers_are_kept_through_the_decision_when_the_plan_says_their_peaks_fit() -> None:
    """With ``keep`` (the plan's choice) ``idle()`` leaves the running workers as they are: the
    same processes run the next pass."""
    executor = partitions.ProcessExecutor(1, keep=True)
    try:
        assert executor.map("extracting", pow, [(2, 1, 5)], None) == [2]
        started = executor._pool
        assert started is not None
        pids = {p.pid for p in started.processes.started}
        assert len(pids) == 1
        executor.idle()
        assert executor._pool is started and {p.pid for p in started.processes.started} == pids
        assert executor.map("pricing", pow, [(3, 1, 5)], None) == [3]
        assert {p.pid for p in started.processes.started} == pids
    finally:
        executor.close()


def test_workers_that_share_the_cores_get_their_share_of_polars_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each worker's polars pool is sized for its share of the cores (two workers on two cores:
    one thread each), set before polars is imported there; a ``POLARS_MAX_THREADS`` the user
    set wins."""
    import os

    from hourglass.analysis import worker_start

    cores = len(os.sched_getaffinity(0))
    assert worker_start.polars_threads(1) == cores
    assert worker_start.polars_threads(cores) == 1 and worker_start.polars_threads(4 * cores) == 1
    monkeypatch.delenv("POLARS_MAX_THREADS", raising=False)
    for workers in (1, 2):
        executor = partitions.ProcessExecutor(workers)
        try:
            sizes = executor.map("extracting", pl.thread_pool_size, [()] * workers, None)
            assert sizes == [worker_start.polars_threads(workers)] * workers
        finally:
            executor.close()
    monkeypatch.setenv("POLARS_MAX_THREADS", "3")
    executor = partitions.ProcessExecutor(2)
    try:
        assert executor.map("extracting", pl.thread_pool_size, [()], None) == [3]
    finally:
        executor.close()


def _allocator_options() -> str | None:
    return os.environ.get(worker_start.ALLOCATOR_CONF)


def test_the_workers_of_a_short_lived_run_keep_the_pages_their_allocator_frees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers started with ``allocator`` (``analyze``'s: ``SHORT_LIVED_ALLOCATOR``) set polars'
    allocator options before polars is imported there, after polars' own (which the later ones
    override); a pool started without keeps polars' own; options the user set win."""
    monkeypatch.delenv(worker_start.ALLOCATOR_CONF, raising=False)
    own = worker_start.POLARS_DEFAULT_ALLOCATOR
    short = worker_start.SHORT_LIVED_ALLOCATOR
    for parent in (None, own):  # (this process' polars import sets its own: the workers inherit it)
        if parent is not None:
            monkeypatch.setenv(worker_start.ALLOCATOR_CONF, parent)
        executor = partitions.ProcessExecutor(2, allocator=short)
        try:
            assert executor.map("extracting", _allocator_options, [()] * 2, None) == [f"{own},{short}"] * 2
        finally:
            executor.close()
    executor = partitions.ProcessExecutor(1)
    try:
        assert executor.map("extracting", _allocator_options, [()], None) == [f"{own},{own}"]
    finally:
        executor.close()
    # polars' own options with transparent huge pages (POLARS_THP=1) are not the user's either
    monkeypatch.setenv("POLARS_THP", "1")
    monkeypatch.setenv(worker_start.ALLOCATOR_CONF, worker_start.POLARS_OWN_ALLOCATORS[1])
    executor = partitions.ProcessExecutor(1, allocator=short)
    try:
        (got,) = executor.map("extracting", _allocator_options, [()], None)
        assert got.endswith(f",{short}") and "thp:always" in got, got
    finally:
        executor.close()
    monkeypatch.delenv("POLARS_THP")
    monkeypatch.setenv(worker_start.ALLOCATOR_CONF, "dirty_decay_ms:0")
    executor = partitions.ProcessExecutor(1, allocator=short)
    try:
        assert executor.map("extracting", _allocator_options, [()], None) == [f"{own},dirty_decay_ms:0"]
    finally:
        executor.close()


WORKER_EXIT_SCRIPT = """
import atexit
import sys

from hourglass.analysis import partitions


def torn_down(path):
    with open(path, "w") as out:
        out.write("torn down")


if __name__ == "__mp_main__":
    # a worker imports this module as __mp_main__ before its start (the pool's initializer): this
    # handler, registered earlier than the start's, runs only if the worker goes through the teardown
    atexit.register(torn_down, sys.argv[1])


def task(part, parts):
    print(f"worker wrote {part}", end="")  # not flushed: stdout is a pipe, so block-buffered
    return part


if __name__ == "__main__":
    executor = partitions.ProcessExecutor(1)
    try:
        assert executor.map("extracting", task, [(7, 9)], None) == [7]
    finally:
        executor.close()
    print(" | pool closed")
"""


def test_a_stopped_worker_ends_at_once_with_its_output_flushed(tmp_path: Path) -> None:
    """A stopped worker ends without the interpreter's teardown (``worker_start._exit_at_once``):
    the exit handlers registered before its start never run, and what its task printed without a
    flush still reaches the stream."""
    import os
    import subprocess
    import sys

    script = tmp_path / "worker_exit.py"
    script.write_text(WORKER_EXIT_SCRIPT)
    marker = tmp_path / "torn-down"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(
        [sys.executable, str(script), str(marker)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "worker wrote 7 | pool closed\n"
    assert not marker.exists()


def _small_store(tmp_path: Path) -> partitions.StoreSource:
    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    store.write(generate_spans(5_000, seed=3))
    store.close()
    return partitions.StoreSource(db)


def test_a_cancelled_split_stops_and_leaves_no_files(tmp_path: Path) -> None:
    """``split_store`` with its ``cancel`` set stops at its next batch and removes its folder."""
    import threading

    from hourglass.collector.duckdb_store import SplitCancelled

    source = _small_store(tmp_path)
    assert partitions.splits(source, 8)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SplitCancelled):
        partitions.split_store(source, 8, near=str(tmp_path), cancel=cancel)
    assert not list(tmp_path.glob("hourglass-partitions-*"))
    split = partitions.split_store(source, 8, near=str(tmp_path), cancel=threading.Event())
    assert split is not None
    split.remove()


def test_a_cancel_interrupts_the_split_while_duckdb_builds_its_first_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--since`` or ``--service`` the split's first batch waits for DuckDB to build the
    filter over the whole store; the run's ``Cancel`` (``analyze_partitioned``) interrupts that
    query (``interrupt()``) instead of waiting for it to return a batch. DuckDB's wait is played
    by a query that returns nothing until it is interrupted."""
    import dataclasses
    import threading

    import duckdb

    from hourglass.collector.duckdb_store import Cancel, DuckDBSpanStore, SplitCancelled

    source = dataclasses.replace(_small_store(tmp_path), since_ns=0)
    started, interrupted = threading.Event(), threading.Event()
    cursor_of = DuckDBSpanStore._cursor

    class Building:  # the query's first batch, built until interrupted (30 s at most)
        def __init__(self, relation: object) -> None:
            self.relation = relation

        def to_arrow_reader(self, rows: int) -> object:
            started.set()
            if interrupted.wait(30):
                raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")
            return self.relation.to_arrow_reader(rows)  # type: ignore[attr-defined]

    class SlowCursor:
        def __init__(self, cursor: duckdb.DuckDBPyConnection) -> None:
            self.cursor = cursor

        def __getattr__(self, name: str) -> object:
            return getattr(self.cursor, name)

        def sql(self, query: str, params: object = None) -> Building:
            return Building(self.cursor.sql(query, params=params))

        def interrupt(self) -> None:
            interrupted.set()
            self.cursor.interrupt()

    monkeypatch.setattr(DuckDBSpanStore, "_cursor", lambda self: SlowCursor(cursor_of(self)))
    cancel = Cancel()
    failed: list[BaseException] = []

    def split() -> None:
        try:
            partitions.split_store(source, 8, near=str(tmp_path), cancel=cancel)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=split)
    thread.start()
    assert started.wait(30)
    cancel.set()
    thread.join(60)
    assert interrupted.is_set()  # told at once, not at the first batch
    assert len(failed) == 1 and isinstance(failed[0], SplitCancelled)
    assert not list(tmp_path.glob("hourglass-partitions-*"))
    # set before the split starts: nothing is read
    with pytest.raises(SplitCancelled):
        partitions.split_store(source, 8, near=str(tmp_path), cancel=cancel)


def test_a_run_that_fails_first_stops_the_split_written_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``analyze --db``'s split runs in a thread beside the first extraction round; when the run
    fails (or is interrupted) first, the split is told to stop instead of the process waiting for
    it to read the whole store before it can exit; a split that fails by itself (a full disk) only
    means the partitions are read from the store."""
    import threading
    import time

    from hourglass.analysis import pipeline

    source = _small_store(tmp_path)
    seen: list[str] = []

    def slow_split(source: partitions.Source, parts: int, *, cancel: threading.Event, **_: object) -> None:
        seen.append("started")
        if cancel.wait(30):
            seen.append("cancelled")
        return None

    def failing_round(*args: object, **kwargs: object) -> partitions.Extracted:
        raise RuntimeError("extraction failed")

    executor = partitions.ProcessExecutor(1)
    monkeypatch.setattr(executor, "warm", lambda: None)
    monkeypatch.setattr(partitions, "split_store", slow_split)
    monkeypatch.setattr(partitions, "run_extraction", failing_round)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="extraction failed"):
        pipeline.analyze_partitioned(source, 4, executor, read_traces=lambda ids: source.load(0, 1))
    for thread in threading.enumerate():  # the split's thread and the removal's: both end now
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(20)
    assert seen == ["started", "cancelled"] and time.monotonic() - started < 20

    def full_disk(source: partitions.Source, parts: int, **_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(partitions, "split_store", full_disk)
    assert pipeline._split_or_store(source, 4, threading.Event()) is None
    monkeypatch.undo()
    # the split before a serial run too: the run reads the store, the same report
    whole, _ = pipeline.analyze_partitioned(
        source, 4, partitions.SerialExecutor(), read_traces=lambda ids: source.load(0, 1)
    )
    monkeypatch.setattr(partitions, "split_store", full_disk)
    monkeypatch.setattr(partitions, "splits", lambda source, parts: True)
    again, _ = pipeline.analyze_partitioned(
        source, 4, partitions.SerialExecutor(), read_traces=lambda ids: source.load(0, 1)
    )
    assert {k: v for k, v in again.items() if k != "generated_at"} == {
        k: v for k, v in whole.items() if k != "generated_at"
    }


def test_early_workers_no_run_took_are_stopped_at_once() -> None:
    """Worker processes started before a run (``analyze --db``'s early pool) that no run takes
    are terminated, not left to finish starting: none is alive after ``stop`` (a pool only shut
    down leaves its workers to import the analysis first, and to wait on its queue for ever when
    the parent that started them is killed)."""
    from hourglass.analysis import worker_start

    pool, _ = worker_start.started(2)
    processes = list(pool.processes.started)
    assert len(processes) == 2
    worker_start.stop(pool)
    assert all(p.exitcode is not None for p in processes)


def test_findings_of_some_detectors_are_the_reports(tmp_path: Path) -> None:
    """``findings_partitioned`` (``hourglass whatif --db --recommendation``'s findings) extracts and
    decides the detectors asked for only, in the same partitions as ``analyze_partitioned``, and
    every finding of the report of those kinds is among them with the same occurrences, split
    into files (4 partitions) or not, spilled or not; no finding of another kind."""
    from hourglass.analysis import pipeline

    source = _small_store(tmp_path)
    _, ranked = pipeline.analyze_partitioned(
        source, 4, partitions.SerialExecutor(), read_traces=lambda ids: source.load(0, 1)
    )
    reported = {scored.finding.id: scored.finding for scored in ranked}
    kinds = {f.kind for f in reported.values()}
    assert len(kinds) >= 3
    asked = frozenset(sorted(kinds)[:2])
    for parts, buckets in ((4, 0), (2, 2)):
        found = {
            f.id: f
            for f in pipeline.findings_partitioned(
                source, parts, partitions.SerialExecutor(), asked, spill_buckets=buckets
            )
        }
        assert {f.kind for f in found.values()} <= asked
        mine = {i: f for i, f in reported.items() if f.kind in asked}
        assert mine and set(mine) <= set(found), (parts, buckets)
        for i, finding in mine.items():
            assert list(finding.occurrence_table) == list(found[i].occurrence_table), i
