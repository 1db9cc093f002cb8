"""The stages of a partitioned run after its extraction (``hourglass.analysis.pipeline``'s
``_analyze_partitioned``): what they compute, and what they must not cost."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.model import Finding, NearMissLog
from hourglass.analysis.spill import Spill


def test_taking_the_prefetched_traces_apart_does_not_import_pandas() -> None:
    """The run reads the exemplar and service traces once, beside the pricing, and then takes
    the services' traces out of that read (``_traces_of``); a value set made with ``pa.array`` of
    a Python list imported pandas there (~0.2 s of the deciding process, between the scoring and
    the texts, on the run's critical path)."""
    code = (
        "import sys, polars as pl\n"
        "from hourglass.analysis.pipeline import _traces_of\n"
        "t = pl.DataFrame({'trace_id': ['b', 'a', 'b', 'c'], 'x': range(4)}).to_arrow()\n"
        "got = _traces_of(t, ['B', 'c'])\n"
        "assert got.column('trace_id').to_pylist() == ['b', 'b', 'c'], got\n"
        "assert got.column('x').to_pylist() == [0, 2, 3], got\n"
        "assert got.schema == t.schema, got.schema\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def _store(tmp_path: Path) -> str:
    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path / "spans.duckdb")
    store = DuckDBSpanStore(db)
    try:
        store.write(generate_spans(2_000, seed=3))
    finally:
        store.close()
    return db


class _Recording(partitions.ProcessExecutor):
    """Worker processes that say which kinds were decided in them, and when the workstreams' pass
    (the second pricing) begins."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.submitted: list[str] = []
        self.pricings = 0
        self.workstreams_priced = threading.Event()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        started = super().submit(fn, *args)
        if started is not None:
            self.submitted.append(args[1])
        return started

    def map(
        self, phase: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]], progress: Any
    ) -> list[Any]:
        if phase == "pricing":
            self.pricings += 1
            if self.pricings == 2:
                self.workstreams_priced.set()
        return super().map(phase, fn, calls, progress)


def _extracted(
    db: str, tmp_path: Path, executor: partitions.Executor, beside: bool
) -> tuple[Any, NearMissLog]:
    notes = NearMissLog()
    spill = Spill.create(2, near=str(tmp_path))
    try:
        extracted = partitions.run_extraction(
            partitions.StoreSource(db), 3, executor, notes, spill=spill, decide_beside=beside
        )
    finally:
        spill.remove()
    return extracted, notes


def _same(a: list[Finding], b: list[Finding]) -> None:
    assert [(f.id, f.confidence, f.evidence, f.trace_ids) for f in a] == [
        (f.id, f.confidence, f.evidence, f.trace_ids) for f in b
    ]


def test_a_kind_decided_beside_the_others_is_decided_in_an_idle_worker_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the workers kept through the decision (the plan's ``keep``), the kinds decided beside
    the others (``DECIDE_BESIDE``: lock_contention's sweep) are decided in one of them, which
    reads the kind's kept rows itself, not in a thread of the deciding process, and starts
    before this process combines the partitions' critical paths: the same findings, in the
    same order, and the same near misses in the same order."""
    db = _store(tmp_path)
    expected, expected_notes = _extracted(db, tmp_path, partitions.SerialExecutor(), beside=False)
    executor = _Recording(1, keep=True)
    when_paths: list[list[str]] = []
    kept_paths = partitions.kept_paths

    def paths(spill: Spill) -> Any:
        when_paths.append(list(executor.submitted))
        return kept_paths(spill)

    monkeypatch.setattr(partitions, "kept_paths", paths)
    try:
        got, notes = _extracted(db, tmp_path, executor, beside=True)
    finally:
        executor.close()
    assert executor.submitted == list(partitions.DECIDE_BESIDE)
    assert when_paths == [list(partitions.DECIDE_BESIDE)]  # (started before the paths)
    assert any(f.kind == "lock_contention" for f in expected.findings)  # (something to compare)
    _same(got.findings, expected.findings)
    assert notes.near_misses == expected_notes.near_misses


def test_a_kind_whose_decision_failed_in_a_worker_is_decided_here(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = _store(tmp_path)
    expected, expected_notes = _extracted(db, tmp_path, partitions.SerialExecutor(), beside=False)

    class Failing(partitions.ProcessExecutor):
        def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
            failed: Future[Any] = Future()
            failed.set_exception(BrokenProcessPool("a worker died"))
            return failed

    executor = Failing(1, keep=True)
    try:
        with caplog.at_level(logging.WARNING):
            got, notes = _extracted(db, tmp_path, executor, beside=True)
    finally:
        executor.close()
    assert "deciding lock_contention in a worker process failed" in caplog.text
    _same(got.findings, expected.findings)
    assert notes.near_misses == expected_notes.near_misses


def test_workers_that_are_not_kept_leave_the_kind_to_a_thread_here() -> None:
    """Workers stopped during the decision (not ``keep``: their peaks do not fit beside it), or
    none started: nothing is submitted, the kind is decided in a thread of this process."""
    executor = partitions.ProcessExecutor(1, keep=False)
    try:
        assert executor.submit(print, "x") is None  # (no pool)
        executor.warm()
        assert executor.submit(print, "x") is None  # (its workers still starting)
    finally:
        executor.close()


def test_the_workstreams_are_priced_while_the_texts_are_written(tmp_path: Path) -> None:
    """The workstreams' what-ifs (two recommendations of one service priced together) depend on
    the report's recommendations alone: their pass runs beside the reading of the exemplars and
    the writing of the texts, not after them. The report is the same as at once."""
    from bench.analysis import generate_spans
    from hourglass.analysis.pipeline import analyze, analyze_partitioned
    from hourglass.analysis.writers import template_writer
    from hourglass.cli.analyze import _read_traces
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    db = _store(tmp_path)
    store = DuckDBSpanStore(db)
    whole = analyze(store.scan(columns=ANALYSIS_COLUMNS, string_views=True), explain=True)
    store.close()
    assert [w for w in whole["workstreams"] if len(w["recommendations"]) > 1 and w["impact"]]
    assert generate_spans  # (the store's spans: bench.analysis)
    executor = _Recording(1)
    seen: list[bool] = []

    class Waiting:
        name = "template"

        def write(self, recommendations: list[dict[str, Any]], context: Any) -> Any:
            # the workstreams' pass begins before the texts are done (before: after them)
            seen.append(executor.workstreams_priced.wait(30))
            return template_writer().write(recommendations, context)

    try:
        report, _ = analyze_partitioned(
            partitions.StoreSource(db),
            3,
            executor,
            read_traces=lambda ids: _read_traces(db, ids),
            writer=Waiting(),  # type: ignore[arg-type]
            explain=True,
        )
    finally:
        executor.close()
    assert seen == [True]
    assert executor.pricings == 2  # (the pass priced beside is the one the workstreams took)
    report.pop("generated_at"), whole.pop("generated_at")
    assert report == whole


def test_a_pricing_task_of_its_own_traces_does_not_look_them_up_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pricing task's context is made of its findings' traces (its partition's shares): every
    occurrence lies in it, so no finding's occurrences are looked up among the context's traces
    (per finding, ~a fifth of the task at 1M spans); the savings are those priced with the look-up,
    over the partition's whole context. Priced without that knowledge (serve's batches), they are
    looked up."""
    from hourglass.analysis.context import AnalysisContext
    from hourglass.analysis.model import Occurrences

    db = _store(tmp_path)
    source = partitions.StoreSource(db)
    extracted, _ = _extracted(db, tmp_path, partitions.SerialExecutor(), beside=False)
    assert extracted.trace_parts is not None
    shares = partitions.findings_by_partition(extracted.findings, extracted.trace_parts, 3)
    expected = [partitions.price(AnalysisContext.from_table(source.load(p, 3)), shares[p]) for p in range(3)]
    assert any(expected)
    looked_up: list[int] = []
    real = Occurrences.in_traces

    def in_traces(self: Occurrences, trace_ids: Any) -> Any:
        looked_up.append(len(self))
        return real(self, trace_ids)

    monkeypatch.setattr(Occurrences, "in_traces", in_traces)
    for p in range(3):
        got = partitions.price_part(source, p, 3, shares[p]).impacts
        assert got.keys() == expected[p].keys()
        for fid, (_, saved, root) in got.items():
            assert np.array_equal(saved, expected[p][fid][1]) and np.array_equal(root, expected[p][fid][2])
    assert looked_up == []
    # (a context of more traces than the share's, priced without ``everywhere``)
    ctx = AnalysisContext.from_table(source.load(0, 3))
    partitions.price(ctx, shares[0])
    assert looked_up


def _sleep_part(seconds: float, part: int, parts: int) -> int:
    time.sleep(seconds)
    return part


def test_a_run_that_fails_while_the_workstreams_are_priced_stops_that_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workstreams' pass runs in a thread of its own beside the texts; when the run fails
    meanwhile (a writer, a read, Ctrl-C to the process alone), its map is stopped before the
    executor is closed. Before, it waited on the futures of the pool closed from the run's thread,
    which are never resolved (the process never exited), or retried them on a new pool that
    nobody closed."""
    from hourglass.analysis import pipeline
    from hourglass.cli.analyze import _read_traces

    db = _store(tmp_path)
    executor = partitions.ProcessExecutor(1)
    started, ended, pools = threading.Event(), [], []
    ensure = executor._ensure

    def counted() -> Any:
        before = executor._pool
        pool = ensure()
        if pool is not before:
            pools.append(pool)
        return pool

    def slow_ahead(*args: Any) -> tuple[list[str], dict[str, Any]]:
        started.set()
        try:
            return [], executor.map("pricing", _sleep_part, [(60.0, 0, 1)], None)
        except BaseException as exc:
            ended.append(exc)
            raise

    def failing_texts(*args: Any, **kwargs: Any) -> None:
        assert started.wait(30)
        raise RuntimeError("the writer broke")

    monkeypatch.setattr(executor, "_ensure", counted)
    monkeypatch.setattr(pipeline, "_priced_ahead", slow_ahead)
    monkeypatch.setattr(pipeline, "write_texts", failing_texts)
    try:
        with pytest.raises(RuntimeError, match="the writer broke"):
            pipeline.analyze_partitioned(
                partitions.StoreSource(db), 3, executor, read_traces=lambda ids: _read_traces(db, ids)
            )
        assert [type(e) for e in ended] == [partitions.Stopped]
        assert executor._pool is None  # closed by the failed run
        made = len(pools)
        time.sleep(0.5)
        assert len(pools) == made  # and no pool started after it
    finally:
        executor.close()
