"""Where ``serve``'s incremental analysis keeps a batch's rows, and how it decides them (issue 11:
memory that does not grow with the store).

Run as the analysis worker runs a round (``run_incremental`` over a real DuckDB span store, the
labelled sample traces in several batches), then compared with the real ``hourglass analyze --db``
on the same store. Proven structurally, not by timing or RSS:

* a round holds one batch at a time: an extraction task writes its batch's rows and returns
  none of them;
* after a round, nothing of a batch is held in memory: every batch's rows are files (one per
  detector kind, its summaries last), the resource rows that grow with spans (the lock-convoy
  rule's ``candidates``) in Parquet buckets, never in the rows the decision loads;
* the decision reads the rows kind by kind: every batch's rows of one kind, then the next kind
  (so it never holds the rows of every kind at once);
* a restart resumes from the files (no span read), and a batch whose files were cut short is the
  only one extracted again; the report stays the CLI's.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pytest

from hourglass.analysis.detectors import PARTS
from hourglass.analysis.incremental import IncrementalAnalysis, MemoExecutor, sidecar_path
from hourglass.analysis.model import Occurrences
from hourglass.analysis.trace_index import TraceIndex
from hourglass.api.analysis_worker import StoreReader, run_incremental
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.files import read_trace_files
from hourglass.collector.schema import SPAN_COLUMNS
from tests.api.test_incremental_serve import _cli_report

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "sample-traces").glob("*.otlp.jsonl"))

pytestmark = pytest.mark.timeout(300)


def _store(db: Path) -> DuckDBSpanStore:
    store = DuckDBSpanStore(str(db))
    for table in read_trace_files([str(p) for p in SAMPLES], on_error=lambda problem: None):
        if table.num_rows:
            store.write(table.select(list(SPAN_COLUMNS)))
    return store


def _request(state: IncrementalAnalysis, **extra: Any) -> dict[str, Any]:
    """A round's request as the analysis service sends it, every stored trace settled."""
    return {
        "sidecar": state.sidecar,
        "update": True,
        "cutoff_ns": time.time_ns() + 1,  # every stored trace has settled
        "margin_ns": 5 * 10**9,
        "since_ns": None,
        "explain": False,
        **extra,
    }


State = TypeVar("State", bound=IncrementalAnalysis)


@contextlib.contextmanager
def _segmented(
    tmp_path: Path,
    kind: type[State] = IncrementalAnalysis,  # type: ignore[assignment]
) -> Iterator[tuple[Path, str, DuckDBSpanStore, State, dict[str, Any]]]:
    """The sample traces in a store and a first round over them in batches of 300 spans and
    segments of 2 batches (a state of ``kind``): (the store's file, its sidecar, the store, the
    state, the round's report); the store closed after."""
    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    store = _store(db)
    try:
        state = kind(sidecar, batch_spans=300, segment_batches=2)
        first, _ = _round(state, store)
        yield db, sidecar, store, state, first
    finally:
        store.close()


def _round(state: IncrementalAnalysis, store: DuckDBSpanStore) -> tuple[dict[str, Any], dict[str, Any]]:
    report, _, figures = run_incremental(state, StoreReader(store), _request(state))
    return report, figures


def _cli(db: Path) -> dict[str, Any]:
    return _cli_report(db)


def _same(served: dict[str, Any], cli: dict[str, Any]) -> None:
    assert served["recommendations"], "nothing to compare"
    assert [r["id"] for r in served["recommendations"]] == [r["id"] for r in cli["recommendations"]]
    for mine, theirs in zip(served["recommendations"], cli["recommendations"], strict=True):
        for key, value in mine["impact"].items():
            if isinstance(value, float | int) and theirs["impact"][key] is not None:
                assert value == pytest.approx(theirs["impact"][key], rel=0.01, abs=1e-9), (mine["id"], key)
    assert served["traces_analyzed"] == cli["traces_analyzed"]
    assert served["spans_analyzed"] == cli["spans_analyzed"]
    # the endpoints' critical paths, decided on the batches' per-endpoint aggregates
    assert served["critical_paths"] and served["critical_paths"] == cli["critical_paths"]


class Recording(IncrementalAnalysis):
    """Records what the decision loads: (kind, batch, resource rows in the loaded rows)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loads: list[tuple[str, int, int]] = []

    def load_rows(self, batch: int, kind: str) -> Any:
        rows = super().load_rows(batch, kind)
        candidates = rows.get("candidates")
        self.loads.append((kind, batch, 0 if candidates is None else candidates.height))
        return rows


def test_batch_rows_live_on_disk_and_are_decided_kind_by_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    returned: list[Any] = []  # what each extraction task returned to the round
    extracted = MemoExecutor._extracted

    def recording(self: MemoExecutor, args: tuple[Any, ...]) -> Any:
        result = extracted(self, args)
        returned.append(result)
        return result

    monkeypatch.setattr(MemoExecutor, "_extracted", recording)
    parked: list[tuple[int, bool]] = []  # each parked table: its length, whether it let its columns go
    park = Occurrences.park

    def parking(self: Occurrences, folder: str) -> None:
        park(self, folder)
        parked.append((len(self), self.is_parked()))

    monkeypatch.setattr(Occurrences, "park", parking)
    # when the trace index is built (the round's last stage): each finding's occurrences, whether
    # parked and which columns the stages before left in memory
    at_index: list[tuple[str, bool, frozenset[str]]] = []
    build = TraceIndex.build

    def building(report: dict[str, Any], findings: list[Any]) -> TraceIndex:
        at_index.extend((f.kind, f.occurrence_table.is_parked(), f.occurrence_table.held()) for f in findings)
        return build(report, findings)

    monkeypatch.setattr(TraceIndex, "build", staticmethod(building))
    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    store = _store(db)
    try:
        state = Recording(sidecar, batch_spans=500)
        report, figures = _round(state, store)
        batches = set(state.batches)
        assert len(batches) >= 3, figures
        assert state.stored == batches
        assert len(returned) == len(batches) and all(r is None for r in returned), returned
        # nothing of a batch stays in memory: no frame, table or extraction among the state's values
        held = [name for name, value in vars(state).items() if _holds_rows(value)]
        assert not held, held
        # the decision loaded every batch's rows of one kind, then the next kind
        kinds = [kind for kind, _, _ in state.loads]
        runs = [k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k]
        assert len(runs) == len(set(runs)), runs  # each kind loaded in one run
        for kind in set(kinds):
            assert sorted(b for k, b, _ in state.loads if k == kind) == sorted(batches), kind
        # the lock-convoy resource rows never among them: spilled, one file per batch and bucket
        assert all(n == 0 for kind, _, n in state.loads if kind == "lock_contention")
        spilled = {p.stem for p in (state.folder / "spill").rglob("p*.parquet")}
        assert spilled and spilled <= {f"p{b:06d}" for b in batches}
        # and beside them the convoy sweep's states, for the next round to resume from
        assert list((state.folder / "spill").rglob("sweep.state"))
        assert any(r["id"].startswith("lock_contention") for r in report["recommendations"]), [
            r["id"] for r in report["recommendations"]
        ]
        # the findings' occurrences (every kind's, the last too) waited on disk while the next
        # kinds decided and through the stages after, and their files went with the round's findings
        assert parked and all(was for n, was in parked if n), parked
        assert not list(state.parked.iterdir())
        # the round's critical-path values went with it (its folder removed once decided)
        assert report["critical_paths"] and not list(state.folder.glob("hourglass-paths-*"))
        # every kind's (the last decided too), each stage letting go of the columns it read back
        assert {kind for kind, _, _ in at_index} >= {"serialized_calls", "lock_contention"}, at_index
        assert all(was and not held for _, was, held in at_index), at_index
        state.close()
    finally:
        store.close()
    cli = _cli(db)
    _same(report, cli)

    # A restart resumes from the files: no span is read, the report is the same.
    store = DuckDBSpanStore(str(db))
    try:
        left = Path(sidecar + ".d") / "parked" / "occurrences-crash.pickle"
        left.write_bytes(b"left by a crash")
        again = IncrementalAnalysis(sidecar)
        assert not left.exists()
        assert again.stored == batches
        resumed, figures = _round(again, store)
        assert figures["partitions_read"] == 0, figures
        _same(resumed, cli)
        again.close()
        # a batch whose summaries were never written (a crash mid-way) is extracted again, alone
        cut = min(batches)
        (Path(sidecar + ".d") / f"b{cut:06d}" / "meta.pickle").unlink()
        third = IncrementalAnalysis(sidecar)
        assert third.stored == batches - {cut}
        redone, figures = _round(third, store)
        assert figures["partitions_read"] == 1, figures
        _same(redone, cli)
        third.close()
    finally:
        store.close()


def test_rows_of_an_older_shape_are_extracted_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A detector whose rows changed shape (its ``ROWS_FORMAT`` bumped) makes a restarted serve
    extract every batch again rather than decide on rows it cannot read; an unchanged format
    resumes from the files."""
    from hourglass.analysis import incremental

    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    store = _store(db)
    try:
        with caplog.at_level(logging.WARNING, logger=incremental.log.name):
            state = IncrementalAnalysis(sidecar, batch_spans=500)
        assert not caplog.records, "a new sidecar has no rows of an older shape"
        first, _ = _round(state, store)
        batches = set(state.batches)
        assert len(batches) >= 3
        state.close()
        same = IncrementalAnalysis(sidecar)
        assert same.stored == batches
        same.close()
        monkeypatch.setitem(incremental.ROWS_FORMAT, "n_plus_one", 2)
        again = IncrementalAnalysis(sidecar)
        assert again.stored == set() and set(again.batches) == batches
        assert not list((Path(sidecar + ".d") / "spill").rglob("*.parquet"))
        redone, figures = _round(again, store)
        assert figures["partitions_read"] == len(batches), figures
        assert again.stored == batches
        again.close()
        assert [r["id"] for r in redone["recommendations"]] == [r["id"] for r in first["recommendations"]]
        # the new mark is kept: the next start resumes
        kept = IncrementalAnalysis(sidecar)
        assert kept.stored == batches
        kept.close()
        # stored rows hold polars hashes: another polars version extracts again too
        monkeypatch.setattr(incremental.pl, "__version__", "0.0.0-other")
        other = IncrementalAnalysis(sidecar)
        assert other.stored == set()
        other.close()
    finally:
        store.close()


def _stored_rows(sidecar: str) -> dict[Path, dict[str, Any]]:
    """Every stored rows file of a sidecar (batches and segments) and its tables."""
    import pickle

    folder = Path(sidecar + ".d")
    files = [*folder.glob("b*/rows-*.pickle"), *folder.glob("segments/s*/rows-*.pickle")]
    return {f: pickle.loads(f.read_bytes()) for f in sorted(files)}


def _string_bytes(column: Any) -> tuple[int, int]:
    """(bytes of a String column's string buffers, bytes of its distinct values)."""
    import polars as pl

    array = column.to_arrow(compat_level=pl.CompatLevel.newest())
    chunks = array.chunks if isinstance(array, pa.ChunkedArray) else [array]
    held = sum(b.size for c in chunks for b in c.buffers()[2:] if b is not None)
    return held, int(column.unique().drop_nulls().str.len_bytes().sum())


def test_stored_rows_are_held_and_rows_stored_before_are_converted_on_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's rows are stored as the decision holds them (``partitions.held``: the span-id
    lists as words and the occurrence keys made, each repeated string's bytes once), so a round
    loads them without compacting them. A sidecar whose rows were stored as extracted (main
    before 4655ec1 + this change: no ``rows_held`` mark) has them rewritten held on start,
    batches and segments, without extracting again; the reports are the same throughout."""
    import polars as pl

    from hourglass.analysis import partitions

    with _segmented(tmp_path, IncrementalAnalysis) as (db, sidecar, store, state, first):
        batches = set(state.batches)
        assert len(batches) >= 5 and state.segments
        state.close()
        stored = _stored_rows(sidecar)
        # the table each compacted kind's decision holds compacted
        compacted = {
            "n_plus_one": "sequences",
            "fanout_straggler": "occurrences",
            "fanout_concurrency_limit": "fanouts",
        }
        assert set(compacted) == {k for k, parts in PARTS.items() if parts.compact is not None}
        made = [
            f
            for f, rows in stored.items()
            if rows.get(compacted.get(f.name[5:-7], ""), pl.DataFrame()).height
        ]
        assert made, "no rows of a compacted kind stored"
        shared = 0
        for f, rows in stored.items():
            if f in made:
                assert "_key" in rows[compacted[f.name[5:-7]]].columns, f
            for table in rows.values():
                for name, dtype in table.schema.items():
                    column = table[name]
                    if str(dtype) == "String" and table.height > 1 and column.n_unique() * 2 <= table.height:
                        held, distinct = _string_bytes(column)
                        if f.parent.name.startswith("b"):  # (a segment: once per batch)
                            assert held <= distinct, (f, name, held, distinct)
                        shared += 1
        assert shared, "no repeated strings stored"

        # the same store's rows as a sidecar without the mark holds them: as extracted
        shutil.rmtree(sidecar + ".d")
        Path(sidecar).unlink()
        monkeypatch.setattr(partitions, "held", lambda kind, rows: rows)
        older = IncrementalAnalysis(sidecar, batch_spans=300, segment_batches=2)
        as_before, _ = _round(older, store)
        older.db.execute("DELETE FROM meta WHERE key = 'rows_held'")
        older.close()
        monkeypatch.undo()
        before = _stored_rows(sidecar)
        assert all("_key" not in before[f][compacted[f.name[5:-7]]].columns for f in made)

        converted = IncrementalAnalysis(sidecar, segment_batches=2)
        assert converted.stored == batches and converted.segments
        after = _stored_rows(sidecar)
        assert set(after) == set(before)
        for f in made:
            assert "_key" in after[f][compacted[f.name[5:-7]]].columns, f
        resumed, figures = _round(converted, store)
        assert figures["partitions_read"] == 0, figures
        converted.close()
        # the mark kept: the next start leaves the files as they are
        mtimes = {f: f.stat().st_mtime_ns for f in after}
        IncrementalAnalysis(sidecar, segment_batches=2).close()
        assert {f: f.stat().st_mtime_ns for f in after} == mtimes
    assert as_before["recommendations"] == first["recommendations"]
    assert resumed["recommendations"] == first["recommendations"]
    _same(resumed, _cli(db))


def _holds_rows(value: Any) -> bool:
    import polars as pl

    from hourglass.analysis.partitions import PartResult

    if isinstance(value, pl.DataFrame | pa.Table | PartResult):
        return True
    if isinstance(value, dict):
        return any(_holds_rows(v) for v in value.values())
    return False


def test_batches_stored_with_critical_path_rows_are_summarized_when_read(tmp_path: Path) -> None:
    """A sidecar written before the batches kept per-endpoint aggregates holds each batch's
    critical-path rows (``PathRows``): a round resumes from them (no span read) and its critical
    paths are still the CLI's."""
    import pickle

    from hourglass.analysis.context import AnalysisContext
    from hourglass.analysis.endpoint_path import PathRows, PathSummary, path_rows

    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    store = _store(db)
    try:
        state = IncrementalAnalysis(sidecar, batch_spans=500)
        _round(state, store)
        reader = StoreReader(store)
        for batch in state.batches.values():  # each batch's meta as the older layout wrote it
            meta = Path(sidecar + ".d") / f"b{batch.id:06d}" / "meta.pickle"
            traces, services, spans, summary = pickle.loads(meta.read_bytes())
            assert isinstance(summary, PathSummary)
            ctx = AnalysisContext.from_table(reader.batch(batch.trace_ids, batch.first, batch.last))
            meta.write_bytes(pickle.dumps((traces, services, spans, path_rows(ctx))))
        state.close()
        again = IncrementalAnalysis(sidecar)
        assert isinstance(pickle.loads(meta.read_bytes())[3], PathRows)
        resumed, figures = _round(again, store)
        # and written back summarized, once
        assert isinstance(pickle.loads(meta.read_bytes())[3], PathSummary)
        assert figures["partitions_read"] == 0, figures
        again.close()
    finally:
        store.close()
    _same(resumed, _cli(db))


class SegmentRecording(Recording):
    """Also records the segments the decision loads: (kind, members)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.segment_loads: list[tuple[str, tuple[int, ...]]] = []

    def load_segment_rows(self, members: tuple[int, ...], kind: str) -> Any:
        self.segment_loads.append((kind, members))
        return super().load_segment_rows(members, kind)


def test_consecutive_batches_are_read_as_segments_with_the_same_report(tmp_path: Path) -> None:
    """Stored batches are combined into segments of ``segment_batches`` consecutive batches after
    a round; the next rounds read a segment instead of its batches' files, and decide the CLI's
    report. A dirty batch drops its segment (its batches are read alone until it is built
    again); a restart resumes the segments; a segment cut short by a crash is dropped."""
    with _segmented(tmp_path, SegmentRecording) as (db, sidecar, store, state, first):
        batches = sorted(state.batches)
        assert len(batches) >= 5, batches
        # built after the round: consecutive pairs, the odd one out alone
        assert sorted(state.segments) == [tuple(batches[i : i + 2]) for i in range(0, len(batches) - 1, 2)]
        state.loads.clear()
        again, figures = _round(state, store)
        assert figures["partitions_read"] == 0, figures
        alone = {b for _, b, _ in state.loads}
        assert alone == set(batches) - {b for m in state.segments for b in m}, (alone, state.segments)
        assert {m for _, m in state.segment_loads} == set(state.segments)
        # a dirty batch: its segment is dropped, the batch extracted again, the segment rebuilt
        dirty = batches[0]
        state._forget({dirty})
        assert all(dirty not in m for m in state.segments)
        state.loads.clear()
        redone, figures = _round(state, store)
        assert figures["partitions_read"] == 1, figures
        assert (dirty, batches[1]) in state.segments
        state.close()
        # a restart resumes the segments; one cut short (no members file) is dropped
        partial = next(iter(state.segments.values()))
        (partial / "members.pickle").unlink()
        resumed_state = SegmentRecording(sidecar, segment_batches=2)
        assert len(resumed_state.segments) == len(state.segments) - 1
        resumed, figures = _round(resumed_state, store)
        assert figures["partitions_read"] == 0, figures
        assert set(resumed_state.segments) == set(state.segments)
        resumed_state.close()
    cli = _cli(db)
    for report in (first, again, redone, resumed):
        _same(report, cli)
        assert report["recommendations"] == first["recommendations"]


def test_segments_keep_their_spilled_calls_and_path_values_with_the_same_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment keeps its members' spilled tables of ``COMBINED_SPILL`` combined, a file per
    bucket; the decision reads those instead of a file per member and bucket (lock_contention's
    still per batch: its sweep keeps states per file). It keeps its critical-path values in files
    of their own too, which a round reads rather than writing them again. A segment stored before
    (no ``spill`` or ``paths`` folder) gets them after the next round. The reports are the same
    throughout."""
    from hourglass.analysis import endpoint_path, incremental
    from hourglass.analysis.incremental import COMBINED_SPILL

    written: list[Path] = []  # the folders of values each round's pieces were read from
    real_add = endpoint_path.SpilledPathSummary.add_written

    def add_written(self: endpoint_path.SpilledPathSummary, counts: Any, nodes: Any, folder: Path) -> None:
        written.append(folder)
        real_add(self, counts, nodes, folder)

    monkeypatch.setattr(endpoint_path.SpilledPathSummary, "add_written", add_written)

    read: list[Path] = []  # the files of each bucket the decisions were given
    real_iter = incremental.BatchBuckets.__iter__

    def recording(self: incremental.BatchBuckets) -> Any:
        for bucket in real_iter(self):
            read.extend(bucket.files)
            yield bucket

    monkeypatch.setattr(incremental.BatchBuckets, "__iter__", recording)
    with _segmented(tmp_path, IncrementalAnalysis) as (db, _, store, state, first):
        assert state.segments
        for folder in state.segments.values():
            assert (folder / "spill").is_dir()
            assert {f.name for f in (folder / "paths").iterdir()} == {
                "roots.ipcs",
                "operations.ipcs",
                "paths.ipcs",
                "index.pickle",
            }
        combined = {
            f.relative_to(folder / "spill")
            for folder in state.segments.values()
            for f in (folder / "spill").glob("*/b*.parquet")
        }
        assert {f.parts[0].split(".")[0] for f in combined} == set(COMBINED_SPILL), combined
        read.clear()
        written.clear()
        again, _ = _round(state, store)
        assert sorted(written) == sorted(folder / "paths" for folder in state.segments.values())
        members = {b for m in state.segments for b in m}
        for kind in COMBINED_SPILL:
            mine = [f for f in read if any(part.startswith(f"{kind}.") for part in f.parts)]
            assert any("segments" in f.parts for f in mine), (kind, mine)
            per_batch = {int(f.stem[1:]) for f in mine if "segments" not in f.parts}
            assert not per_batch & members, (kind, per_batch, members)
        # an older segment (no combined files) gets them after a round
        older = next(iter(state.segments.values()))
        shutil.rmtree(older / "spill")
        shutil.rmtree(older / "paths")
        (older / "head.pickle").unlink()
        redone, _ = _round(state, store)
        assert (older / "spill").is_dir() and (older / "paths").is_dir()
        assert (older / "head.pickle").exists()
        state.close()
    for report in (again, redone):
        assert report["recommendations"] == first["recommendations"]
        assert report["critical_paths"] == first["critical_paths"]
    _same(first, _cli(db))


def test_a_segment_that_cannot_be_completed_costs_neither_the_report_nor_the_next_rounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making or completing a segment (its combined spill, its head) only speeds the next rounds
    up: when it fails (a full disk), the round still returns its report, the segment is left
    incomplete (its batches' own files read), and a later round completes it."""
    from hourglass.analysis import incremental

    real = incremental.IncrementalAnalysis._spill_segment
    with _segmented(tmp_path, IncrementalAnalysis) as (_, _, store, state, first):
        older = next(iter(state.segments.values()))
        shutil.rmtree(older / "spill")

        def full_disk(self: Any, members: Any, target: Path) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(incremental.IncrementalAnalysis, "_spill_segment", full_disk)
        failed, _ = _round(state, store)
        assert not (older / "spill").is_dir()
        monkeypatch.setattr(incremental.IncrementalAnalysis, "_spill_segment", real)
        mended, _ = _round(state, store)
        assert (older / "spill").is_dir()
        state.close()
    for report in (failed, mended):
        assert report["recommendations"] == first["recommendations"]


def test_a_round_releases_the_heap_after_each_phase_that_freed_much(tmp_path: Path) -> None:
    """``release_heap`` (serve's worker: ``malloc_trim``) is called after each segment's meta is
    folded in, after the critical paths are decided and after each kind is decided, before the
    next kind's rows are loaded (so a kind's freed pages are not resident under the next's), then
    after the pricing, after each stage that follows it (the scoring, the report, the texts, the
    workstreams) and before the trace index is built; the report is the same as without it."""
    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    store = _store(db)
    events: list[str] = []
    releasing: list[str] = []  # who called release_heap, after the decisions

    def release() -> None:
        events.append("released")
        releasing.append(sys._getframe(1).f_code.co_name)

    class Loads(SegmentRecording):
        def load_rows(self, batch: int, kind: str) -> Any:
            events.append(kind)
            return super().load_rows(batch, kind)

        def load_segment_rows(self, members: tuple[int, ...], kind: str) -> Any:
            events.append(kind)
            return super().load_segment_rows(members, kind)

        def load_segment_meta(self, members: tuple[int, ...]) -> Any:
            events.append("segment meta")
            return super().load_segment_meta(members)

        def load_segment_head(self, members: tuple[int, ...]) -> Any:  # (what a round reads of it)
            events.append("segment meta")
            return super().load_segment_head(members)

    try:
        state = Loads(sidecar, batch_spans=300, segment_batches=2, release_heap=release)
        first, _ = _round(state, store)
        assert state.segments, "no segments to read in the next round"
        events.clear()
        releasing.clear()
        again, _ = _round(state, store)
        state.close()
    finally:
        store.close()
    kinds = [e for i, e in enumerate(events) if e not in ("released", "segment meta") and events[i - 1] != e]
    assert kinds == list(PARTS), kinds
    # released after the update (the sidecar's blocks it read), each segment's meta released
    # after it is folded in, then once more after the critical paths
    metas = events[: events.index(kinds[0])]
    assert metas == ["released"] + ["segment meta", "released"] * len(state.segments) + ["released"], metas
    # each kind's decision followed by a release before the next kind's rows are loaded
    decisions = events[len(metas) :]
    for kind, following in zip(PARTS, [*list(PARTS)[1:], None], strict=True):
        last = len(decisions) - 1 - decisions[::-1].index(kind)
        assert decisions[last + 1] == "released", (kind, decisions[last : last + 3])
        if following is not None:
            assert decisions.index(following) == last + 2, (kind, following)
    # then the pricing (MemoExecutor.map); after it the scoring, the report and the texts, the
    # workstreams' pricing and the workstreams; and the round once the report is built
    assert releasing[0] == "release_memory", releasing  # (after the update)
    # (the stages after the pricing are a function of their own: ``_after_pricing``)
    after = ["_analyze_partitioned", "_after_pricing", "_after_pricing", "release_memory", "_after_pricing"]
    assert releasing[-8:] == ["release_memory", *after, "run_incremental", "release_memory"], releasing
    cli = _cli(db)
    for report in (first, again):
        _same(report, cli)
    assert {**again, "generated_at": None} == {**first, "generated_at": None}


def test_a_crashed_rounds_leftovers_are_removed_when_the_state_opens(tmp_path: Path) -> None:
    """A round that died mid-way leaves its on-the-fly units' spill folder, its critical-path
    values and parked occurrences in the sidecar's folder: the next start removes them (nothing
    else reads them)."""
    sidecar = str(tmp_path / "spans.duckdb.analysis.duckdb")
    IncrementalAnalysis(sidecar).close()
    folder = Path(sidecar + ".d")
    (folder / "hourglass-spill-abc123" / "kind.table" / "b0").mkdir(parents=True)
    (folder / "hourglass-spill-abc123" / "kind.table" / "b0" / "p000001.parquet").write_bytes(b"x")
    (folder / "parked" / "occurrences-1.pickle").write_bytes(b"x")
    (folder / "hourglass-paths-xyz789").mkdir()  # the critical-path summaries' values
    (folder / "hourglass-paths-xyz789" / "000000-roots.arrow").write_bytes(b"x")
    state = IncrementalAnalysis(sidecar)
    try:
        assert not list(folder.glob("hourglass-spill-*")) and not list(folder.glob("hourglass-paths-*"))
        assert state.parked.is_dir() and not list(state.parked.iterdir())
    finally:
        state.close()


def test_a_sidecar_open_in_another_process_is_kept(tmp_path: Path) -> None:
    """A second serve of the same store (or a restarted worker while the old one still holds the
    sidecar) gets a clear error naming the sidecar; the state it cannot open is not removed as if it
    belonged to another store file."""
    import subprocess
    import sys

    from hourglass.analysis.incremental import StateInUse

    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    _store(db).close()
    IncrementalAnalysis(sidecar).close()  # a sidecar made for this store
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, sys; db = duckdb.connect({sidecar!r}); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(StateInUse, match="open in another process") as raised:
            IncrementalAnalysis(sidecar)
        assert sidecar in str(raised.value)
        assert Path(sidecar).exists()
    finally:
        holder.communicate("", timeout=30)
    # once the other process is gone, the state is this store's and is opened as it was
    again = IncrementalAnalysis(sidecar)
    assert Path(sidecar).exists()
    again.close()


def _pool(state: IncrementalAnalysis) -> int:
    """Bytes of the sidecar's tables held in its buffer pool."""
    rows = state.db.execute(
        "SELECT sum(memory_usage_bytes) FROM duckdb_memory() WHERE tag = 'BASE_TABLE'"
    ).fetchall()
    return int(rows[0][0] or 0)


def test_a_round_leaves_the_sidecars_table_blocks_out_of_memory(tmp_path: Path) -> None:
    """The blocks of the sidecar's tables a round read (they grow with the store) are not held in
    its buffer pool while serve's worker waits for the next round; its memory limit is back to
    what the rounds use, and the next round reads them again to the same report."""
    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    store = _store(db)
    state = IncrementalAnalysis(sidecar, batch_spans=500)
    try:
        first, _ = _round(state, store)
        state.db.execute("CHECKPOINT")  # the tables' rows in blocks of the file
        limit = state.db.execute("SELECT current_setting('memory_limit')").fetchone()
        state.db.execute("SELECT count(*), max(trace_id), sum(spans) FROM traces").fetchall()
        assert _pool(state) > 2**20, "a read of the traces table holds its blocks"
        state.release_memory()
        assert _pool(state) < 2**20  # (SIDECAR_IDLE_LIMIT)
        assert state.db.execute("SELECT current_setting('memory_limit')").fetchone() == limit
        state.db.execute("SELECT count(*), max(trace_id), sum(spans) FROM traces").fetchall()
        assert _pool(state) > 0
        released: list[int] = []
        at_decision: list[int] = []

        def release() -> None:
            released.append(_pool(state))
            IncrementalAnalysis.release_memory(state)

        def extraction(*args: Any) -> Any:
            at_decision.append(_pool(state))
            return IncrementalAnalysis.extraction(state, *args)

        state.release_memory = release  # type: ignore[method-assign]
        state.extraction = extraction  # type: ignore[method-assign]
        state.db.execute("SELECT count(*), max(trace_id), sum(spans) FROM traces").fetchall()
        again, _ = _round(state, store)
        # released after the update (its read of the traces table not held under the decision
        # and the stages after it), after the pricing, and when the round ends
        assert len(released) >= 3, released
        assert len(at_decision) == 1 and at_decision[0] < released[0], (at_decision, released)
        assert _pool(state) < 2**20
        assert state.db.execute("SELECT current_setting('memory_limit')").fetchone() == limit
        assert again["recommendations"] == first["recommendations"]
    finally:
        state.close()
        store.close()


def test_a_corrupt_sidecar_is_started_afresh_not_taken_for_one_in_use(tmp_path: Path) -> None:
    """DuckDB's error for a corrupt file speaks of a "block": that is not a lock held by another
    process, so the state is made again (as before the in-use check), not refused every round."""
    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    _store(db).close()
    IncrementalAnalysis(sidecar).close()
    size = Path(sidecar).stat().st_size
    with open(sidecar, "r+b") as f:  # every block after the headers overwritten: checksums fail
        f.seek(12288)
        f.write(b"\xff" * (size - 12288))
    state = IncrementalAnalysis(sidecar)
    assert state.stored == set()
    state.close()


def test_an_in_memory_state_keeps_its_tables_in_memory_at_the_end_of_a_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a sidecar file the tables are the data: the end-of-round release does not lower
    the limit (which pushed them to a temporary folder under the working directory)."""
    monkeypatch.chdir(tmp_path)
    state = IncrementalAnalysis(None)
    try:
        state.db.execute("CREATE TABLE filler AS SELECT range AS i, repeat('x', 100) AS s FROM range(200000)")
        state.release_memory()
        assert not (tmp_path / ".tmp").exists()
        assert state.db.execute("SELECT count(*) FROM filler").fetchall() == [(200000,)]
    finally:
        state.close()


@pytest.mark.parametrize(
    "values",
    [
        [None] * 5,
        ["", "", None, "a", ""],
        ["é", "e", "é", "E", None, "e"],
        ["SELECT * FROM orders WHERE customer_id = ?"] * 50 + ["b" * 40] * 50,
        [f"distinct value number {i}" for i in range(10)],  # (no repeats: left as it is)
    ],
)
def test_shared_strings_keep_the_values_and_hold_each_repeated_one_once(values: list[str | None]) -> None:
    import polars as pl

    from hourglass.analysis.partitions import shared_strings

    frame = pl.DataFrame({"s": pl.Series(values, dtype=pl.String), "n": list(range(len(values)))})
    shared = shared_strings(frame)
    assert shared.schema == frame.schema and shared.equals(frame)
    assert shared.sort("s", "n").equals(frame.sort("s", "n"))
    if frame["s"].n_unique() * 2 <= frame.height:
        held, distinct = _string_bytes(shared["s"])
        assert held <= distinct


def _copied(store: DuckDBSpanStore, trace_ids: list[str], prefix: str, later_ns: int) -> int:
    """These traces written again under new ids (``prefix`` for their first characters), their
    spans ``later_ns`` later and ingested now: newer traces of the same shapes; their spans."""
    import pyarrow.compute as pc

    table = store.scan(trace_ids=trace_ids, columns=SPAN_COLUMNS)
    moved = {
        "trace_id": pc.utf8_replace_slice(table["trace_id"], 0, len(prefix), prefix),
        "start_ns": pc.add(table["start_ns"], later_ns),
        "end_ns": pc.add(table["end_ns"], later_ns),
        "ingested_ns": pa.array([time.time_ns()] * table.num_rows, pa.int64()),
    }
    for name, column in moved.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    store.write(table)
    return int(table.num_rows)


def test_a_report_cut_to_its_newest_batches_is_the_cli_report_of_their_traces(tmp_path: Path) -> None:
    """``max_spans`` (serve's ``HOURGLASS_REPORT_MAX_SPANS``) below the stored spans: the whole
    retention's report covers the newest whole batches, within ``CUT_KEEPS`` of the limit, and is
    the CLI's report over exactly their traces (the lock-convoy finding among them, its sweep
    resumed from the states the rounds keep). The window moves in steps: newer batches join it
    while it fits (the batches left out stay out), the next cut keeps the newest again; once the
    stored spans fit under the limit nothing is left out. A ``since`` window of more spans than
    the limit is cut to the limit itself and leaves the rounds' batches as they were; one of
    traces in straddling batches alone is not cut (not emptied)."""
    from hourglass.analysis.incremental import CUT_KEEPS

    with _segmented(tmp_path) as (_, _sidecar, store, state, first):
        total = first["spans_analyzed"]
        limit = int(total * 0.9)
        reader = StoreReader(store)
        states = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("sweep.state")}
        assert states, "the first round kept no sweep state"
        cut, _, figures = run_incremental(state, reader, _request(state, max_spans=limit))
        window = cut["window"]
        assert figures["window"] == {k: v for k, v in window.items() if k != "from"}
        assert window["spans"] == cut["spans_analyzed"] <= limit * CUT_KEEPS, window
        assert window["spans"] + window["spans_left_out"] == total
        assert cut["traces_analyzed"] + window["traces_left_out"] == first["traces_analyzed"]
        assert "lock_contention" in {r["kind"] for r in cut["recommendations"]}
        # the newest batches: each kept one's latest span start is after every left-out one's
        kept = {u.batch for u in state.units(None, max_spans=limit)}
        left_out = set(state.left_out)
        assert kept and left_out and kept | left_out == set(state.batches)
        newest = {b: state.batches[b].newest_start_ns for b in state.batches}
        assert min(newest[b] for b in kept) >= max(newest[b] for b in left_out)
        # the whole retention's rounds keep the sweep's states, cut or not
        assert any(p.stat().st_mtime_ns != t for p, t in states.items() if p.exists())

        # newer traces that fit: they join the window, nothing more is left out
        one = min(kept)
        added = _copied(store, list(state.batches[one].trace_ids), "0dd1", 2 * 3600 * 10**9)
        grown, _, _ = run_incremental(state, reader, _request(state, max_spans=limit))
        assert grown["spans_analyzed"] == cut["spans_analyzed"] + added <= limit, grown["window"]
        assert state.left_out == left_out
        # more than fit: cut again, to the newest
        more = [t for b in sorted(kept) for t in state.batches[b].trace_ids]
        _copied(store, more, "0dd2", 3 * 3600 * 10**9)
        again, _, _ = run_incremental(state, reader, _request(state, max_spans=limit))
        assert again["spans_analyzed"] <= limit * CUT_KEEPS and state.left_out > left_out
        now_kept = sorted(u.batch for u in state.units(None, max_spans=limit))
        assert min(state.batches[b].newest_start_ns for b in now_kept) > max(newest.values())

        # a since window (all of it) of more spans than the limit: cut to the limit, in one go
        left_out = set(state.left_out)
        since, _, _ = run_incremental(
            state, reader, _request(state, max_spans=limit, since_ns=1, update=False)
        )
        assert limit * CUT_KEEPS < since["spans_analyzed"] <= limit, since["window"]
        assert state.left_out == left_out
        # one of straddling batches alone (each holds traces before and after its start): not cut
        start = max(b.oldest_start_ns for b in state.batches.values()) + 1
        edge, _, _ = run_incremental(
            state, reader, _request(state, max_spans=1, since_ns=start, update=False)
        )
        assert edge["traces_analyzed"] > 0 and "window" not in edge

        # the CLI over the first cut's batches' traces alone
        trace_ids = [t for b in sorted(kept) for t in state.batches[b].trace_ids]
        part = tmp_path / "kept.duckdb"
        kept_store = DuckDBSpanStore(str(part))
        kept_store.write(store.scan(trace_ids=trace_ids, columns=SPAN_COLUMNS))
        kept_store.close()

        # everything fits under the limit again: nothing left out
        whole, _, _ = run_incremental(state, reader, _request(state, max_spans=10**9))
        assert "window" not in whole and not state.left_out
        state.close()
    _same(cut, _cli(part))


def test_a_windows_findings_are_the_cli_findings_and_leave_the_rounds_as_they_were(tmp_path: Path) -> None:
    """``window_findings`` (a recommendation what-if over a window larger than one context, in
    serve): the findings asked, decided over the stored rows of every batch of the window, are
    the ones ``hourglass whatif --db`` decides (``cli.analyze.store_findings``) occurrence for
    occurrence, the lock-convoy finding's sweep resumed from the rounds' states or started over
    when the rounds' report is cut; only the asked ids' detectors decide; the rounds' window,
    left-out batches and report are as they were."""
    from hourglass.analysis import partitions
    from hourglass.api.analysis_worker import window_findings
    from hourglass.cli.analyze import StoreRun, store_findings

    with _segmented(tmp_path) as (_db, _sidecar, store, state, first):
        reader = StoreReader(store)
        ids = [r["id"] for r in first["recommendations"]]
        assert any(i.startswith("lock_contention-") for i in ids)
        copy = DuckDBSpanStore(str(tmp_path / "cli.duckdb"))  # (the store is open for writing here)
        copy.write(store.scan(columns=SPAN_COLUMNS))
        copy.close()
        run = StoreRun(budget=2**31, workers=1, partitions=2)
        cli = store_findings(str(tmp_path / "cli.duckdb"), run, None, "whatif")

        def same(found: dict[str, Any]) -> None:
            assert sorted(found) == sorted(ids)
            for i in ids:
                assert found[i].occurrence_table == cli[i].occurrence_table, i
                assert found[i].confidence == cli[i].confidence, i

        same(window_findings(reader, {"ids": ids, "since_ns": None}, state=state))
        # a since window whose start falls inside batches: their in-window traces extracted on the
        # fly (the edge unit) beside the stored rows of the batches wholly inside it
        starts = sorted(store.scan(columns=["start_ns"])["start_ns"].to_pylist())
        since_ns = starts[len(starts) // 2]
        assert any(len(u.trace_ids) and u.batch is None for u in state.units(since_ns)), "no edge unit"
        state.units(None)  # (the rounds' window again)
        in_window = store_findings(str(tmp_path / "cli.duckdb"), run, since_ns, "whatif")
        found = window_findings(reader, {"ids": ids, "since_ns": since_ns}, state=state)
        assert set(in_window) & set(ids) and set(in_window) & set(ids) <= set(found)
        for i in set(in_window) & set(ids):
            assert found[i].occurrence_table == in_window[i].occurrence_table, i
        one = next(i for i in ids if i.startswith("serialized_calls-"))
        asked: list[str] = []
        real_decide = partitions.decide

        def deciding(rows: Any, *args: Any) -> Any:
            asked.extend(rows)
            return real_decide(rows, *args)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(partitions, "decide", deciding)
            assert list(
                window_findings(reader, {"ids": [one, "n_plus_one-0000000000000000"]}, state=state)
            ) == [one]
        assert sorted(set(asked)) == ["n_plus_one", "serialized_calls"]

        # the rounds' report cut: decided afresh over every batch, the rounds' state untouched
        limit = int(first["spans_analyzed"] * 0.9)
        cut, _, _ = run_incremental(state, reader, _request(state, max_spans=limit))
        window, left_out = state.window, set(state.left_out)
        assert window is not None and left_out
        states = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("sweep.state")}
        same(window_findings(reader, {"ids": ids, "since_ns": None}, state=state))
        assert state.window == window and state.left_out == left_out and state.whole_window
        assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("sweep.state")} == states
        again, _, _ = run_incremental(state, reader, _request(state, max_spans=limit, update=False))
        assert again["recommendations"] == cut["recommendations"] and again["window"] == cut["window"]
        state.close()
