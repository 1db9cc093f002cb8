"""The analysis worker process: the table it gets (an Arrow IPC file it memory-maps, or the pipe)
gives the same report as analysing in-process, and no shipped file is left behind."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hourglass.analysis.incremental import sidecar_path
from hourglass.api import analysis_worker
from hourglass.api.analysis_worker import AnalysisWorker, StoreReader, analyze_spans
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import repeated_trace, spans_table, spec


def _serialized_calls_table() -> pa.Table:
    builders = repeated_trace(
        6,
        "frontend",
        spec("GET /checkout", 0, 100, kind=KIND_SERVER),
        spec("GET users", 1, 40, under=0, kind=KIND_CLIENT, http_url="http://users/u"),
        spec("GET cart", 42, 50, under=0, kind=KIND_CLIENT, http_url="http://cart/c"),
    )
    return spans_table(builders)


def _without_time(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != "generated_at"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("through_file", [True, False])
def test_worker_report_equals_in_process(
    through_file: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = _serialized_calls_table()
    monkeypatch.setattr(analysis_worker, "_ipc_dir", lambda nbytes: str(tmp_path) if through_file else None)
    files: list[str] = []  # the files the worker's results came in (not through the pipe)
    receive = analysis_worker._receive_result

    def spy(message: tuple[Any, ...]) -> tuple[Any, ...]:
        if message[0] == "file":
            files.append(message[2])
        return receive(message)

    monkeypatch.setattr(analysis_worker, "_receive_result", spy)
    worker = AnalysisWorker()
    try:
        stages: dict[str, float] = {}
        report, index = worker.run(table, stages=stages)
    finally:
        worker.close()
    expected, expected_index = analyze_spans(table)
    assert report["recommendations"], "the table holds serialized calls: the report must say so"
    assert _without_time(report) == _without_time(expected)
    assert index == expected_index
    assert set(stages) == {"worker_start", "send", "analysis", "receive"}
    assert os.listdir(tmp_path) == []
    assert len(files) == 1 and not os.path.exists(files[0])  # removed once read


@pytest.mark.parametrize("room", [True, False])
def test_a_result_travels_with_its_arrays_in_a_file_or_the_pipe(
    room: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's side (``_send_result``) and the server's (``_receive_result``) over a real
    pipe: the same result either way, the file (when there is room for it) gone once read."""
    report, index = analyze_spans(_serialized_calls_table())
    monkeypatch.setattr(analysis_worker, "_ipc_dir", lambda nbytes: str(tmp_path) if room else None)
    server, worker = multiprocessing.Pipe()
    try:
        written = analysis_worker._send_result(worker, ("ok", (report, index, 1.5)))
        assert bool(written) == room
        status, (got_report, got_index, seconds) = analysis_worker._receive_result(server.recv())
    finally:
        server.close()
        worker.close()
    assert (status, got_report, got_index, seconds) == ("ok", report, index, 1.5)
    assert os.listdir(tmp_path) == []
    trace_id = report["recommendations"][0]["evidence"]["trace_ids"][0]
    assert got_index.touching(trace_id, ["x"]) == index.touching(trace_id, ["x"]) != []


def test_a_result_with_a_result_folder_keeps_the_index_in_a_file_read_per_lookup(tmp_path: Path) -> None:
    """With a result folder (serve's store on disk) the worker writes the index's arrays to a file
    there and sends the rest; the server opens the file (its name removed at once) and answers
    lookups from it: the same index, no array of it in memory. A file a killed process left there
    is removed when the worker first uses the folder, nothing else is."""
    report, index = analyze_spans(_serialized_calls_table())
    folder = tmp_path / "store.analysis.duckdb.d" / "results"
    assert analysis_worker._prepare_result_folder(str(folder), clean=True)
    (folder / f"{analysis_worker.RESULT_PREFIX}old.bin").write_bytes(b"x")
    (folder / "keep.txt").write_text("not a result")
    assert analysis_worker._prepare_result_folder(str(folder), clean=True)
    assert sorted(os.listdir(folder)) == ["keep.txt"]
    (folder / "keep.txt").unlink()

    reply, written = analysis_worker._store_index(("ok", (report, index, 1.5)), str(folder))
    assert len(written) == 1 and Path(written[0]).parent == folder
    server, worker = multiprocessing.Pipe()
    try:
        assert analysis_worker._send_result(worker, reply) == []  # small: through the pipe
        status, (got_report, got_index, seconds) = analysis_worker._receive_result(server.recv())
    finally:
        server.close()
        worker.close()
    assert not any(isinstance(v, np.ndarray) and v.size for v in vars(got_index).values())
    got_index.open_stored()
    assert os.listdir(folder) == []  # the name removed once opened; the open file stays readable
    assert (status, got_report, got_index, seconds) == ("ok", report, index, 1.5)
    for rec in report["recommendations"]:
        for trace_id in rec["evidence"]["trace_ids"]:
            assert got_index.touching(trace_id, ["x"]) == index.touching(trace_id, ["x"]) != []
    assert got_index.touching("0" * 32, ["x"]) == index.touching("0" * 32, ["x"]) == []
    assert got_index.traces() == index.traces()


def test_a_rounds_index_is_built_into_its_file_and_sent_as_it_is(tmp_path: Path) -> None:
    """serve's round builds the trace index into a file of the result folder a chunk at a time
    (``_built_index``): the index of the run's findings, and ``_store_index`` sends it as it is
    (no second file). A folder that cannot be written: built in memory instead."""
    from hourglass.analysis.context import AnalysisContext, to_analysis_frame
    from hourglass.analysis.pipeline import analyze_context

    report, ranked = analyze_context(AnalysisContext.from_table(to_analysis_frame(_serialized_calls_table())))
    findings = [scored.finding for scored in ranked]
    expected = analysis_worker.trace_index(report, ranked)
    assert expected.traces() > 0
    folder = tmp_path / "results"
    assert analysis_worker._prepare_result_folder(str(folder), clean=True)
    index = analysis_worker._built_index(report, findings, str(folder))
    path = index.stored_file()
    assert path is not None and os.listdir(folder) == [os.path.basename(path)]
    assert os.path.basename(path).startswith(analysis_worker.RESULT_PREFIX)
    reply, written = analysis_worker._store_index(("ok", (report, index, 1.5)), str(folder))
    assert written == [path] and reply[1][1] is index and os.listdir(folder) == [os.path.basename(path)]
    index.open_stored()
    assert index == expected and os.listdir(folder) == []
    in_memory = analysis_worker._built_index(report, findings, str(tmp_path / "missing"))
    assert in_memory.stored_file() is None and in_memory == expected


def _environ(pid: int) -> dict[str, str]:
    """A started process's environment, once it runs the new program (between fork and exec
    /proc shows the parent's original one)."""
    deadline = time.monotonic() + 30
    while True:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode().split("=", 1) for e in raw if b"=" in e)
        if analysis_worker.WORKER_MALLOC_CONF[0] in env or time.monotonic() > deadline:
            return env
        time.sleep(0.01)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc")
def test_worker_starts_with_glibc_bounds_and_the_servers_own_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # set for the server: the worker inherits it as is
    worker = AnalysisWorker()
    worker.start()
    try:
        assert worker._process is not None and worker._process.pid is not None
        env = _environ(worker._process.pid)
    finally:
        worker.close()
    assert env["MALLOC_ARENA_MAX"] == "4"
    assert env["MALLOC_MMAP_THRESHOLD_"] == dict(analysis_worker.WORKER_GLIBC_ENV)["MALLOC_MMAP_THRESHOLD_"]
    # the worker's blocks of 128 KiB and more are maps of their own (returned when freed), not the
    # heap's: lower than the server's threshold
    from hourglass.api import serve

    assert int(env["MALLOC_MMAP_THRESHOLD_"]) == 128 * 1024 < serve.MALLOC_MMAP_THRESHOLD
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the server's own environment is left as it was
    assert os.environ["MALLOC_ARENA_MAX"] == "4"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_disk", [True, False])
def test_a_stopped_worker_closes_its_incremental_state(
    on_disk: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped while it waits (serve's stop: SIGTERM), the worker closes its incremental state: the
    sidecar checkpointed (its WAL gone), an in-memory store's temporary folder removed. Killed, it
    left both (one /tmp/hourglass-incremental-* folder per serve run on an in-memory store)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the worker's temporary folders (its environment)
    path = str(tmp_path / "spans.duckdb")
    sidecar = sidecar_path(path) if on_disk else None
    worker = AnalysisWorker()
    with DuckDBSpanStore(path) as store:
        store.write(_serialized_calls_table())
        request = {
            "sidecar": sidecar,
            "update": True,
            "cutoff_ns": time.time_ns() + 1,  # every stored trace has settled
            "margin_ns": 0,
            "retention_cutoff_ns": None,
            "since_ns": None,
            "explain": False,
            "cluster": None,
        }
        try:
            report, _, _ = worker.run_incremental(request, StoreReader(store))
            process = worker._process
            assert process is not None
            if not on_disk:
                assert list(temp.glob("hourglass-incremental-*")), "the in-memory state's folder"
        finally:
            worker.close()
    assert report["recommendations"], "the store holds serialized calls: the report must say so"
    assert process.exitcode == 128 + signal.SIGTERM  # it left through its own way out, not killed
    assert not list(temp.glob("hourglass-incremental-*"))
    if sidecar is not None:
        assert os.path.exists(sidecar) and not os.path.exists(sidecar + ".wal")


def test_an_in_memory_stores_findings_are_decided_over_the_rounds_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``AnalysisService.window_findings`` (a recommendation what-if over a window asked in
    partitions) on serve's in-memory store, with its worker: decided over the rows the worker's
    incremental rounds extracted (their state in memory, no sidecar), not over the window read
    whole in one partition, which the memory budget ruled out."""
    from hourglass.api.analysis_service import AnalysisService

    read: list[tuple[Any, ...]] = []
    partition = StoreReader.partition

    def reading(self: StoreReader, *args: Any) -> pa.Table:
        read.append(args)
        return partition(self, *args)

    monkeypatch.setattr(StoreReader, "partition", reading)
    with DuckDBSpanStore(":memory:") as store:
        store.write(_serialized_calls_table())
        service = AnalysisService(store, settle_seconds=0.0)
        try:
            assert service.incremental
            ids = set(service.run_now().by_id)
            assert ids, "the store holds serialized calls: the report must say so"
            found = service.window_findings(None, ids)
            assert set(found) == ids and all(f.occurrence_table for f in found.values())
            assert service.window_findings(None, {"n_plus_one-0000000000000000"}) == {}
        finally:
            service.stop()
    assert read == []
