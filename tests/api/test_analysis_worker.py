"""The analysis worker process: the table it gets (an Arrow IPC file it memory-maps, or the pipe)
gives the same report as analysing in-process, and no shipped file is left behind."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from hourglass.api import analysis_worker
from hourglass.api.analysis_worker import AnalysisWorker, analyze_spans
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
        assert (written is not None) == room
        status, (got_report, got_index, seconds) = analysis_worker._receive_result(server.recv())
    finally:
        server.close()
        worker.close()
    assert (status, got_report, got_index, seconds) == ("ok", report, index, 1.5)
    assert os.listdir(tmp_path) == []
    trace_id = report["recommendations"][0]["evidence"]["trace_ids"][0]
    assert got_index.touching(trace_id, ["x"]) == index.touching(trace_id, ["x"]) != []


def _buffer_owner(array: Any) -> Any:
    """What an array's memory belongs to (through numpy bases and memoryviews)."""
    owner = array
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base
    return owner.obj if isinstance(owner, memoryview) else owner


def test_a_result_sent_to_the_store_folder_is_mapped_and_its_leftovers_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a result folder (serve's store on disk), the arrays come back as views of the file,
    mapped (not read onto the heap), the file removed once mapped; a result file a killed process
    left there is removed when the worker first uses the folder, nothing else is."""
    report, index = analyze_spans(_serialized_calls_table())
    monkeypatch.setattr(analysis_worker, "_ipc_dir", lambda nbytes: None)  # only the folder
    folder = tmp_path / "store.analysis.duckdb.d" / "results"
    assert analysis_worker._prepare_result_folder(str(folder), clean=True)
    (folder / f"{analysis_worker.RESULT_PREFIX}old.bin").write_bytes(b"x")
    (folder / "keep.txt").write_text("not a result")
    assert analysis_worker._prepare_result_folder(str(folder), clean=True)
    assert sorted(os.listdir(folder)) == ["keep.txt"]
    (folder / "keep.txt").unlink()
    server, worker = multiprocessing.Pipe()
    try:
        written = analysis_worker._send_result(worker, ("ok", (report, index, 1.5)), str(folder))
        assert written is not None and Path(written).parent == folder
        status, (got_report, got_index, seconds) = analysis_worker._receive_result(server.recv())
    finally:
        server.close()
        worker.close()
    assert (status, got_report, got_index, seconds) == ("ok", report, index, 1.5)
    assert os.listdir(folder) == []
    arrays = [v for v in vars(got_index).values() if isinstance(v, np.ndarray) and v.nbytes]
    assert arrays and all(isinstance(_buffer_owner(a), mmap.mmap) for a in arrays)
    assert all(a.ctypes.data % analysis_worker.RESULT_ALIGNMENT == 0 for a in arrays)
    trace_id = report["recommendations"][0]["evidence"]["trace_ids"][0]
    assert got_index.touching(trace_id, ["x"]) == index.touching(trace_id, ["x"]) != []


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
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the server's own environment is left as it was
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
