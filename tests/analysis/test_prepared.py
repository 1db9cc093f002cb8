"""The pricing passes of a partitioned run price from the spans the extraction repaired
(``partitions.Prepared``), not from a second read and repair of each partition: the same savings
and call durations, and the store is not read again."""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import DETECTORS, PARTS
from hourglass.analysis.model import Finding
from hourglass.analysis.pipeline import analyze_partitioned
from hourglass.analysis.spill import write_whole


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path_factory.mktemp("prepared") / "spans.duckdb")
    spans = DuckDBSpanStore(db)
    spans.write(generate_spans(12_000, seed=11))
    spans.close()
    return db


class Unread:
    """A source whose partitions must not be read."""

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        raise AssertionError(f"partition {part} of {parts} read again ({trace_ids is not None and 'traces'})")


def _findings(source: partitions.StoreSource) -> list[Finding]:
    whole = AnalysisContext.from_table(source.load(0, 1))
    return [f for kind in PARTS for f in DETECTORS[kind](whole)]


def test_pricing_from_the_repaired_spans_equals_pricing_from_the_store(store: str, tmp_path: Path) -> None:
    source = partitions.StoreSource(store)
    findings = _findings(source)
    parts = 3
    prepared = partitions.Prepared(str(tmp_path))
    extracted = [partitions.extract_part(source, p, parts, None, prepared) for p in range(parts)]
    trace_parts = pl.concat(
        [r.traces.select("trace_id", part=pl.lit(n, pl.UInt32)) for n, r in enumerate(extracted)]
    )
    shares = partitions.findings_by_partition(findings, trace_parts, parts)
    priced_somewhere = 0
    for part in range(parts):
        again = partitions.price_part(source, part, parts, shares[part], True)
        gc.collect()
        gc.disable()
        try:
            before = sum(isinstance(o, AnalysisContext) for o in gc.get_objects())
            kept = partitions.price_part(Unread(), part, parts, shares[part], True, prepared)  # type: ignore[arg-type]
            # (the context and its what-if engine are freed when the task returns)
            assert sum(isinstance(o, AnalysisContext) for o in gc.get_objects()) == before
        finally:
            gc.enable()
        assert kept.impacts.keys() == again.impacts.keys()
        for fid, (ids, saved, root) in again.impacts.items():
            assert list(kept.impacts[fid][0]) == list(ids)
            np.testing.assert_array_equal(kept.impacts[fid][1], saved)
            np.testing.assert_array_equal(kept.impacts[fid][2], root)
        assert kept.calls.keys() == again.calls.keys()
        for fid, durations in again.calls.items():
            np.testing.assert_array_equal(kept.calls[fid], durations)
        priced_somewhere += len(again.impacts)
    assert priced_somewhere > 5


def test_the_kept_spans_are_read_without_a_copy(store: str, tmp_path: Path) -> None:
    """A kept partition is written uncompressed, so each pricing pass maps its file rather than
    decompressing it (lz4 cost ~10 ms of CPU a read of a 167k-span partition, and ~17 ms more a
    write): read through a memory map, no byte of it is allocated; the values are those kept."""
    source = partitions.StoreSource(store)
    prepared = partitions.Prepared(str(tmp_path))
    partitions.extract_part(source, 0, 2, None, prepared)
    before = pa.total_allocated_bytes()
    with pa.memory_map(prepared.file(0)) as mapped:
        table = pa.ipc.open_file(mapped).read_all()
        assert table.num_rows > 1000
        assert pa.total_allocated_bytes() == before
        kept = pl.from_arrow(table)
    assert isinstance(kept, pl.DataFrame)
    ctx = AnalysisContext.from_table(source.load(0, 2))
    partitions.part_result(0, ctx)
    assert kept.drop("predecessor").equals(ctx.spans.select(partitions._KEPT_COLUMNS))


def test_a_missing_file_is_priced_from_the_store(store: str, tmp_path: Path) -> None:
    """A partition whose repaired spans were not kept (their write failed) is read and repaired."""
    source = partitions.StoreSource(store)
    findings = _findings(source)
    prepared = partitions.Prepared(str(tmp_path / "none"))
    assert prepared.context(0, ["x"]) is None
    priced = partitions.price_part(source, 0, 1, findings, True, prepared)
    again = partitions.price_part(source, 0, 1, findings, True)
    assert priced.impacts.keys() == again.impacts.keys() and priced.impacts
    for fid, (_, saved, root) in again.impacts.items():
        np.testing.assert_array_equal(priced.impacts[fid][1], saved)
        np.testing.assert_array_equal(priced.impacts[fid][2], root)


def test_a_partitioned_run_reads_each_partition_once(store: str) -> None:
    """Every read of the pricing passes (the findings' traces, ``trace_ids`` given) came from the
    store before; now only the extraction reads each partition, and the report is the same."""
    reads: list[tuple[int, bool]] = []

    class Counted(partitions.StoreSource):
        def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
            reads.append((part, trace_ids is not None))
            return super().load(part, parts, trace_ids)

    from hourglass.cli.analyze import _read_traces

    def run(source: Any) -> dict[str, Any]:
        report, _ = analyze_partitioned(
            source,
            3,
            partitions.SerialExecutor(),
            read_traces=lambda ids: _read_traces(store, ids),
            explain=True,
        )
        report.pop("generated_at", None)
        return report

    report = run(Counted(store))
    assert sorted(reads) == [(0, False), (1, False), (2, False)]
    assert report["recommendations"]
    # the same report as the pricing from the store (its repaired spans not kept)
    reads.clear()
    original = partitions.Prepared.create
    try:
        partitions.Prepared.create = staticmethod(lambda near=None: None)  # type: ignore[method-assign]
        again = run(Counted(store))
    finally:
        partitions.Prepared.create = original  # type: ignore[method-assign]
    assert any(traced for _, traced in reads)
    assert report == again


def _kept_writes_fail(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """What a full disk does to the kept files' writes: part of the file written, then ``error``
    (the spill's files, written the same way, are left alone)."""
    real = pl.DataFrame.write_ipc

    def write_ipc(self: pl.DataFrame, file: Any, *args: Any, **kwargs: Any) -> Any:
        if "hourglass-prepared-" in str(file) or "kept" in str(file):
            Path(file).write_bytes(b"x" * 100_000)
            raise error
        return real(self, file, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_ipc", write_ipc)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), pl.exceptions.ComputeError("io")])
def test_a_failed_write_leaves_no_file(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    ctx = AnalysisContext.from_table(partitions.StoreSource(store).load(0, 2))
    (tmp_path / "kept").mkdir()
    prepared = partitions.Prepared(str(tmp_path / "kept"))
    _kept_writes_fail(monkeypatch, error)
    prepared.write(0, ctx)  # (logged, not raised: the file is only an optimisation)
    assert os.listdir(tmp_path / "kept") == []
    assert prepared.context(0, ["x"]) is None


def test_write_whole_removes_an_unfinished_file(tmp_path: Path) -> None:
    def interrupted(path: Path) -> None:
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_whole(tmp_path / "f.arrow", interrupted)
    assert os.listdir(tmp_path) == []
    # a folder that is gone is not made again (the run that kept files there has ended)
    with pytest.raises(FileNotFoundError):
        write_whole(tmp_path / "gone" / "f.arrow", lambda p: p.write_bytes(b"x"), make_folder=False)
    assert not (tmp_path / "gone").exists()


def test_a_run_whose_kept_writes_fail_reports_the_same(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hourglass.cli.analyze import _read_traces

    def run() -> dict[str, Any]:
        report, _ = analyze_partitioned(
            partitions.StoreSource(store),
            3,
            partitions.SerialExecutor(),
            read_traces=lambda ids: _read_traces(store, ids),
            explain=True,
        )
        report.pop("generated_at", None)
        return report

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    report = run()
    _kept_writes_fail(monkeypatch, OSError(28, "No space left on device"))
    assert run() == report
    _wait_for_removals()
    assert not list(tmp_path.glob("hourglass-prepared-*"))


def test_the_kept_file_is_without_rows(store: str, tmp_path: Path) -> None:
    """(``row`` is renumbered on reading: not kept. Uncompressed since the file is mapped, not
    decompressed: ``test_the_kept_spans_are_read_without_a_copy``.)"""
    ctx = AnalysisContext.from_table(partitions.StoreSource(store).load(0, 1))
    partitions.extract_part(partitions.StoreSource(store), 0, 1, None, partitions.Prepared(str(tmp_path)))
    kept = pl.read_ipc(tmp_path / "p000000.arrow")
    assert "row" not in kept.columns and kept.height == ctx.spans.height


@dataclass(frozen=True)
class FailingSource(partitions.StoreSource):
    """Partition 0 always fails; partition 1 fails once, then its retry is slow: it is still
    being extracted (in a worker) when the run has failed."""

    mark: str = ""

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        if part == 0:
            raise RuntimeError("partition 0 is broken")
        if part == 1 and trace_ids is None:
            if not os.path.exists(self.mark):
                Path(self.mark).touch()
                raise RuntimeError("partition 1 fails once")
            time.sleep(2)
        return super().load(part, parts, trace_ids)


def _wait_for_removals() -> None:
    for thread in threading.enumerate():
        if thread.name == "hourglass-beside":
            thread.join(60)


def test_a_failed_run_leaves_no_kept_files(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails while a worker still extracts (the pool abandoned) removes its kept
    files after that worker has exited, and the worker does not make their folder again."""
    from hourglass.cli.analyze import _read_traces

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    executor = partitions.ProcessExecutor(2)
    try:
        with pytest.raises(partitions.PartitionError):
            analyze_partitioned(
                FailingSource(store, mark=str(tmp_path / "mark")),
                4,
                executor,
                read_traces=lambda ids: _read_traces(store, ids),
            )
    finally:
        executor.close()
    # the abandoned worker finishes its slow partition (on the old code: wrote it after the removal)
    deadline = time.monotonic() + 60
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    _wait_for_removals()
    assert not list(tmp_path.glob("hourglass-prepared-*"))


@dataclass(frozen=True)
class BlockedSource(partitions.StoreSource):
    """Partition 1 is read only once ``release`` exists (a partition that takes long to extract);
    it writes each worker's pid to ``pids``."""

    release: str = ""
    pids: str = ""

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        Path(self.pids, str(os.getpid())).touch()
        if part == 1 and trace_ids is None:
            deadline = time.monotonic() + 300
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().load(part, parts, trace_ids)


@pytest.mark.parametrize("table", ["private table", "no private table"])
def test_an_interrupted_run_terminates_its_workers_instead_of_waiting_for_their_tasks(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str
) -> None:
    """Interrupted while a worker still extracts a partition, the run stops that worker instead
    of waiting for its task to end (seconds on a large partition), then removes its kept and
    spilled files: no worker process and no file outlive it. (On the old code the worker ran on, and the
    removal waited for it, until the partition was released.) The workers are known without the
    pool's private table of its processes (``_processes``, which a Python upgrade may rename:
    "no private table"; on the old code the abandoned workers were then not waited for at all)."""
    from hourglass.cli.analyze import _read_traces

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    release, pids = tmp_path / "release", tmp_path / "pids"
    pids.mkdir()
    executor = partitions.ProcessExecutor(2)

    def interrupt(phase: str, done: int, total: int) -> None:
        if table == "no private table" and executor._pool is not None:
            # (the pool's manager thread keeps its own reference to the table)
            monkeypatch.setattr(executor._pool, "_processes", {})
        raise KeyboardInterrupt  # (Ctrl-C, or SIGTERM in analyze --db) once a partition is done

    try:
        with pytest.raises(KeyboardInterrupt):
            analyze_partitioned(
                BlockedSource(store, release=str(release), pids=str(pids)),
                4,
                executor,
                read_traces=lambda ids: _read_traces(store, ids),
                progress=interrupt,
                spill_buckets=3,
            )
        workers = {int(p.name) for p in pids.iterdir()}
        assert workers and os.getpid() not in workers
        deadline = time.monotonic() + 60  # (the blocked partition is not released meanwhile)
        while multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not multiprocessing.active_children()
        for pid in workers:
            with pytest.raises(ProcessLookupError):  # (exited and reaped)
                os.kill(pid, 0)
        _wait_for_removals()
        assert not list(tmp_path.glob("hourglass-prepared-*"))
        assert not list(tmp_path.glob("hourglass-spill-*"))  # (no worker wrote after its removal)
    finally:
        release.touch()
        executor.close()


def _stubborn(folder: str, part: int, parts: int) -> int:
    """Partition 1 ignores SIGTERM (a worker started so, as by ``nohup``), then runs on; partition
    0 ends once it does."""
    import signal

    if part == 1:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        Path(folder, "ignoring").write_text(str(os.getpid()))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            time.sleep(0.05)
    deadline = time.monotonic() + 60
    while not Path(folder, "ignoring").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return part


def test_an_abandoned_worker_that_ignores_sigterm_is_killed(tmp_path: Path) -> None:
    """A worker that ignores SIGTERM is killed after ``TERMINATE_GRACE_S``: an interrupted run
    never waits for its task (on the old code it did, here for the task's 300 s)."""
    import signal

    executor = partitions.ProcessExecutor(2)

    def interrupt(phase: str, done: int, total: int) -> None:
        raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            executor.map("extracting", _stubborn, [(str(tmp_path), 0, 2), (str(tmp_path), 1, 2)], interrupt)
        stubborn = int((tmp_path / "ignoring").read_text())
        deadline = time.monotonic() + 60
        while multiprocessing.active_children() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not multiprocessing.active_children()
        with pytest.raises(ProcessLookupError):  # (killed and reaped)
            os.kill(stubborn, signal.SIGKILL)
    finally:
        for process in multiprocessing.active_children():
            process.kill()
        executor.close()
