"""The worker's reads streamed out of the store: the server writes a read's record batches into
the Arrow IPC file the worker maps as DuckDB produces them (``DuckDBSpanStore.stream_traces``...,
``analysis_worker._answer_shipped``), so neither DuckDB nor the server holds the whole result. The
worker gets the rows of the old whole read; a read that fails in the middle reaches the worker as
that read's error and leaves no file."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hourglass.api import analysis_worker
from hourglass.api.analysis_worker import AnalysisWorker, PipeReader, StoreReader, _answer_shipped
from hourglass.collector import duckdb_store
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import ANALYSIS_COLUMNS, SPAN_COLUMNS, SPAN_SCHEMA
from tests.builders import repeated_trace, spans_table, spec


def _ingested_at(table: pa.Table, ns: int) -> pa.Table:
    at = table.schema.get_field_index("ingested_ns")
    return table.set_column(at, "ingested_ns", pa.array([ns] * table.num_rows, pa.int64()))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DuckDBSpanStore]:
    """Three exports of 40 traces (3 spans each) at 1, 2 and 3 s, and a retried part of the first
    at 4 s (copies, which every read keeps once)."""
    groups = [
        spans_table(
            repeated_trace(
                40, f"svc{g}", spec("GET /a", 0, 10), spec("SELECT", 1, 5), spec("GET b", 6, 3, under=0)
            )
        )
        for g in range(3)
    ]
    with DuckDBSpanStore(str(tmp_path / "spans.duckdb")) as opened:
        for g, table in enumerate(groups):
            opened.write(_ingested_at(table, (g + 1) * 10**9))
        opened.write(_ingested_at(groups[0].slice(0, 10), 4 * 10**9))
        yield opened


@pytest.fixture
def shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder the server writes the reads' files to (instead of /dev/shm)."""
    folder = tmp_path / "shm"
    folder.mkdir()
    monkeypatch.setattr(analysis_worker, "_ipc_dir", lambda nbytes: str(folder))
    return folder


def _requests(store: DuckDBSpanStore) -> list[tuple[Any, ...]]:
    arrivals = store.trace_arrivals(0).to_pylist()
    ids = sorted(r["trace_id"] for r in arrivals)
    bounds = {r["trace_id"]: (r["first_ingested_ns"], r["last_ingested_ns"]) for r in arrivals}
    some = ids[::7]
    return [
        ("batch", ids, 10**9, 4 * 10**9),
        ("batch", some, 10**9, 2 * 10**9),
        ("batch", ["0" * 32], 10**9, 4 * 10**9),  # no such trace: an empty read
        ("traces", some, [bounds[t] for t in some]),
        ("traces", []),
        ("recent", 2 * 10**9, [3 * 10**9]),
        ("recent", 0, [2 * 10**9, 4 * 10**9], 4 * 10**9),
        ("arrivals", 2 * 10**9),
        ("between", some, 10**9, 3 * 10**9),
        ("bounds", 100),
    ]


def _shipped_table(shipped: pa.Table | str) -> pa.Table:
    return analysis_worker._receive_table(shipped)


@pytest.mark.parametrize(("batch_rows", "sort_rows"), [(7, 10_000), (30, 10), (10_000, 1), (10_000, 10_000)])
def test_a_streamed_read_is_the_whole_read_in_batches_of_at_most_batch_rows(
    batch_rows: int, sort_rows: int, store: DuckDBSpanStore, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(duckdb_store, "STREAM_BATCH_ROWS", batch_rows)
    monkeypatch.setattr(duckdb_store, "STREAM_SORT_ROWS", sort_rows)
    reader = StoreReader(store)
    for request in _requests(store):
        expected = reader.answer(request)
        shipped, written = _answer_shipped(reader, request)
        assert written is not None and shipped == written  # a file, the worker maps it
        batches = pa.ipc.open_file(pa.memory_map(written))
        sizes = [batches.get_batch(i).num_rows for i in range(batches.num_record_batches)]
        assert all(0 < n <= batch_rows for n in sizes), (request[0], sizes)
        got = _shipped_table(shipped)
        assert not os.path.exists(written)  # unlinked once mapped
        assert got.schema.equals(expected.schema, check_metadata=True), request[0]
        assert got.equals(expected), request[0]  # the same rows in the same order
        if request[0] == "batch" and expected.num_rows > batch_rows and sort_rows >= expected.num_rows:
            assert len(sizes) == -(-expected.num_rows // batch_rows)
    assert store._reads_in_flight == 0


def test_a_batch_cut_across_a_trace_still_holds_the_trace_whole_and_once(
    store: DuckDBSpanStore, shm: Path
) -> None:
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    with store.stream_traces(ids, columns=ANALYSIS_COLUMNS, batch_rows=4) as batches:
        parts = list(batches)
    # 3 spans a trace, 4 rows a batch: most traces straddle two batches
    assert {b.num_rows for b in parts[:-1]} == {4}
    table = pa.Table.from_batches(parts)
    assert table.num_rows == 3 * len(ids)  # the retried copies once
    assert table.column("trace_id").to_pylist() == sorted(table.column("trace_id").to_pylist())
    assert table.equals(store.scan_traces(ids, columns=ANALYSIS_COLUMNS))


def test_the_parts_of_a_read_sorted_apart_are_one_snapshot(store: DuckDBSpanStore) -> None:
    """Each part of the traces is its own query (sorted apart, ``sort_rows``), all in one
    transaction: a write committed between two parts is not in the read, as with one query."""
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    before = store.scan_traces(ids)
    # a late span of the last trace (the last part), ingested within the times read
    row = store.scan_traces(ids[-1:], columns=SPAN_COLUMNS).slice(0, 1).to_pylist()[0]
    late = pa.Table.from_pylist([{**row, "span_id": "f" * 16, "ingested_ns": 2 * 10**9}], schema=SPAN_SCHEMA)
    with store.stream_traces(ids, batch_rows=3, sort_rows=3) as batches:
        rows = iter(batches)
        got = [next(rows)]  # the first trace's part: its query has run, the last one's not yet
        store.write(late)
        got += list(rows)
    assert pa.Table.from_batches(got).equals(before)  # not the late span
    assert store.scan_traces(ids).num_rows == before.num_rows + 1  # it was written


def test_a_stream_left_early_ends_its_query_and_lets_the_cache_be_released(store: DuckDBSpanStore) -> None:
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    with store.stream_traces(ids, batch_rows=5) as batches:
        next(iter(batches))
        assert store._reads_in_flight == 1  # release_cache waits for it
    assert store._reads_in_flight == 0
    assert store.scan_traces(ids[:1]).num_rows == 3  # the store reads on


def test_a_read_failing_mid_stream_is_that_reads_error_and_leaves_no_file(
    store: DuckDBSpanStore, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(duckdb_store, "STREAM_BATCH_ROWS", 10)
    conformed = duckdb_store._conform_batch
    calls = [0]

    def failing_third(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("the store broke mid-read")
        return conformed(batch, schema)

    monkeypatch.setattr(duckdb_store, "_conform_batch", failing_third)
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    with pytest.raises(RuntimeError, match="broke mid-read"):
        _answer_shipped(StoreReader(store), ("batch", ids, None, None))
    assert calls[0] == 3  # two batches were written before it failed
    assert os.listdir(shm) == []
    assert store._reads_in_flight == 0
    monkeypatch.setattr(duckdb_store, "_conform_batch", conformed)
    assert StoreReader(store).answer(("batch", ids, None, None)).num_rows == 3 * len(ids)


def test_the_file_is_made_once_the_first_rows_are_read(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the query runs before its first rows (a sort), no file exists: a server stopped
    then leaves none behind."""
    schema = pa.schema([("a", pa.int64())])
    seen: list[list[str]] = []

    def batches() -> Iterator[pa.RecordBatch]:
        seen.append(os.listdir(shm))
        yield pa.record_batch([pa.array([1, 2])], schema=schema)
        seen.append(os.listdir(shm))
        raise RuntimeError("the query failed")

    with pytest.raises(RuntimeError, match="the query failed"):
        analysis_worker._ship_stream(pa.RecordBatchReader.from_batches(schema, batches()))
    assert seen[0] == [] and len(seen[1]) == 1
    assert os.listdir(shm) == []


class _BreakingReader(StoreReader):
    """A store reader whose ``batch`` stream fails after its first record batch."""

    def stream(self, request: tuple[Any, ...]) -> contextlib.AbstractContextManager[pa.RecordBatchReader]:
        table = self.answer(request)

        def batches() -> Iterator[pa.RecordBatch]:
            yield from table.to_batches(max_chunksize=5)[:1]
            raise OSError("the disk under the store went away")  # (an OSError of the read, not the file)

        return contextlib.nullcontext(pa.RecordBatchReader.from_batches(table.schema, batches()))


@pytest.mark.timeout(60)
def test_the_worker_gets_a_mid_stream_failure_as_the_error_of_that_read(
    store: DuckDBSpanStore, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's side of a round (``AnalysisWorker.run_incremental``) against a worker played
    by a thread on the other end of the pipe: a read that fails after its first batch was written
    is answered with an error, which the worker's ``PipeReader`` raises; the file is gone."""
    import multiprocessing

    parent, child = multiprocessing.Pipe()
    worker = AnalysisWorker()
    monkeypatch.setattr(worker, "_ensure", lambda: parent)
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    seen: dict[str, Any] = {}

    def play_worker() -> None:
        assert child.recv()[0] == "incremental"  # the round's request
        pipe = PipeReader(child)
        try:
            pipe.batch(ids, None, None)
        except RuntimeError as exc:
            seen["error"] = str(exc)
            seen["files"] = os.listdir(shm)
        seen["next"] = pipe.batch(ids[:2], None, None).num_rows  # the session goes on
        child.send(("error", "Traceback ...\nValueError: the round stopped here"))

    player = threading.Thread(target=play_worker)
    player.start()
    reader = _BreakingReader(store)
    calls = [0]
    original = reader.stream

    def stream(request: tuple[Any, ...]) -> contextlib.AbstractContextManager[pa.RecordBatchReader]:
        calls[0] += 1
        return original(request) if calls[0] == 1 else StoreReader.stream(reader, request)

    monkeypatch.setattr(reader, "stream", stream)
    with pytest.raises(RuntimeError, match="the round stopped here"):
        worker.run_incremental({"sidecar": "x"}, reader)
    player.join(10)
    assert "the disk under the store went away" in seen["error"]
    assert "could not read spans" in seen["error"]
    assert seen["files"] == []
    assert seen["next"] == 6
    assert os.listdir(shm) == []


@pytest.mark.timeout(60)
def test_a_span_count_asked_for_during_a_read_of_the_worker_runs_after_it(
    store: DuckDBSpanStore, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers the worker's reads as the store's one memory-heavy query at a time:
    a count of the store's spans (the round's, started beside the worker, or one of /v1/stats)
    asked for while a read is answered runs once that read is shipped and its cache released,
    not beside it (a soak's server peaked where the count's hash tables and a read's sort met)."""
    import multiprocessing

    parent, child = multiprocessing.Pipe()
    worker = AnalysisWorker()
    monkeypatch.setattr(worker, "_ensure", lambda: parent)
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    reading = threading.Event()
    counted_while_reading: list[bool] = []
    original_count = store._count

    def count(**kwargs: Any) -> Any:
        counted_while_reading.append(reading.is_set())
        return original_count(**kwargs)

    monkeypatch.setattr(store, "_count", count)
    counters: list[threading.Thread] = []
    reader = StoreReader(store)
    original_stream = reader.stream

    @contextlib.contextmanager
    def stream(request: tuple[Any, ...]) -> Iterator[pa.RecordBatchReader]:
        with original_stream(request) as batches:
            reading.set()
            counter = threading.Thread(target=store.stats)
            counter.start()
            counters.append(counter)
            counter.join(0.5)  # (done at once when nothing holds it back)
            try:
                yield batches
            finally:
                reading.clear()

    monkeypatch.setattr(reader, "stream", stream)
    got: list[int] = []

    def play_worker() -> None:
        assert child.recv()[0] == "incremental"  # the round's request
        got.append(PipeReader(child).batch(ids, None, None).num_rows)
        child.send(("error", "Traceback ...\nValueError: the round stopped here"))

    player = threading.Thread(target=play_worker)
    player.start()
    with pytest.raises(RuntimeError, match="the round stopped here"):
        worker.run_incremental({"sidecar": "x"}, reader)
    player.join(10)
    counters[0].join(10)
    assert got == [360]
    assert counted_while_reading == [False]


def test_a_file_that_cannot_be_written_sends_the_read_whole_through_the_pipe(
    store: DuckDBSpanStore, shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FullDisk:
        def __init__(self, *args: Any) -> None:
            pass

        def write_batch(self, batch: pa.RecordBatch) -> None:
            raise OSError(28, "No space left on device")

        write_table = write_batch

        def close(self) -> None:
            pass

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    monkeypatch.setattr(analysis_worker.pa.ipc, "new_file", FullDisk)
    reader = StoreReader(store)
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    request = ("batch", ids, None, None)
    shipped, written = _answer_shipped(reader, request)
    assert written is None and isinstance(shipped, pa.Table)
    assert shipped.equals(reader.answer(request))
    assert os.listdir(shm) == []
    assert store._reads_in_flight == 0


def _data_queries(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The trace ids of each data query ``stream_traces`` runs (not its counts), recorded."""
    queries: list[list[str]] = []
    original = DuckDBSpanStore._scan_traces_query

    def recorded(
        selected: list[str], trace_ids: list[str], *args: Any, **kwargs: Any
    ) -> tuple[str, list[Any]]:
        if not kwargs.get("counts") and not kwargs.get("range_rows"):
            queries.append(list(trace_ids))
        return original(selected, trace_ids, *args, **kwargs)

    monkeypatch.setattr(DuckDBSpanStore, "_scan_traces_query", staticmethod(recorded))
    return queries


def test_a_read_from_an_ingest_range_far_wider_than_its_rows_is_one_query(
    store: DuckDBSpanStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part's query scans the read's whole ingest range: a few traces read from a range of
    many more rows (a batch whose ``last`` a late span raised) are sorted by one query, not one
    query a part (each scanning the range again)."""
    first = sorted(
        {
            r["trace_id"]
            for r in store.scan(columns=["trace_id", "ingested_ns"]).to_pylist()
            if r["ingested_ns"] == 10**9
        }
    )[:5]
    expected = store.scan_traces(first, ingested_from_ns=10**9, ingested_to_ns=4 * 10**9)
    queries = _data_queries(monkeypatch)
    with store.stream_traces(first, ingested_from_ns=10**9, ingested_to_ns=4 * 10**9, sort_rows=3) as batches:
        got = pa.Table.from_batches(list(batches), schema=batches.schema)
    assert got.equals(expected) and got.num_rows >= 15
    assert len(queries) == 1  # 15+ rows read of 370 in the range: not 5 parts of 3 rows


def test_a_read_from_an_ingest_range_of_about_its_rows_is_sorted_in_parts(
    store: DuckDBSpanStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    second = sorted(
        {
            r["trace_id"]
            for r in store.scan(columns=["trace_id", "ingested_ns"]).to_pylist()
            if r["ingested_ns"] == 2 * 10**9
        }
    )
    expected = store.scan_traces(second, ingested_from_ns=2 * 10**9, ingested_to_ns=2 * 10**9)
    queries = _data_queries(monkeypatch)
    with store.stream_traces(
        second, ingested_from_ns=2 * 10**9, ingested_to_ns=2 * 10**9, sort_rows=3
    ) as batches:
        got = pa.Table.from_batches(list(batches), schema=batches.schema)
    assert got.equals(expected) and got.num_rows == 120
    assert len(queries) == 40  # 3 rows a trace, a part each


def test_stream_parts_bounds_the_parts_by_the_rows_of_the_range() -> None:
    counted = [(f"{i:032x}", 3) for i in range(10)]
    assert len(duckdb_store._stream_parts(counted, 6, 120)) == 5
    assert duckdb_store._stream_parts(counted, 6, 121) == [[t for t, _ in counted]]
    assert duckdb_store._stream_parts([], 6, 100) == [[]]


def test_a_table_whose_writing_is_interrupted_leaves_no_file(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only an OSError: whatever stops the writing (here a KeyboardInterrupt) removes the
    file and goes on as it is (only an OSError falls back to the pipe)."""

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(analysis_worker.pa.ipc, "new_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        analysis_worker._ship_table(pa.table({"a": [1, 2]}))
    assert os.listdir(shm) == []


def test_a_stream_whose_file_cannot_be_begun_closes_it(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sinks: list[Any] = []
    real = pa.OSFile

    def recorded(*args: Any) -> Any:
        sinks.append(real(*args))
        return sinks[-1]

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(analysis_worker.pa, "OSFile", recorded)
    monkeypatch.setattr(analysis_worker.pa.ipc, "new_file", full)
    schema = pa.schema([("a", pa.int64())])
    reader = pa.RecordBatchReader.from_batches(schema, [pa.record_batch([pa.array([1])], schema=schema)])
    with pytest.raises(analysis_worker._WriteFailed):
        analysis_worker._ship_stream(reader)
    assert len(sinks) == 1 and sinks[0].closed
    assert os.listdir(shm) == []


def test_the_files_of_a_dead_server_are_removed_and_a_live_ones_kept(tmp_path: Path) -> None:
    """A server killed (SIGKILL, OOM) between making a span file and its unlinking leaves it in
    /dev/shm; the files are named after the server's pid, and a worker's start removes those of
    pids that are gone, once they are older than any read (a server in another pid namespace
    looks dead from here), and this process's own pid's from before it started (pid 1 in a
    container). A name it cannot judge never stops the sweep."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with contextlib.suppress(ProcessLookupError):
        os.kill(gone.pid, 0)
        pytest.skip("the pid was reused already")
    names = {
        "dead_span": f"hourglass-analysis-{gone.pid}-abc.arrow",
        "dead_result": f"hourglass-result-{gone.pid}-abc.bin",
        "dead_but_young": f"hourglass-analysis-{gone.pid}-young.arrow",
        "live_span": f"hourglass-analysis-{os.getppid()}-abc.arrow",
        "mine_before_me": f"hourglass-analysis-{os.getpid()}-old.arrow",
        "mine": f"hourglass-analysis-{os.getpid()}-abc.arrow",
        "unnamed": "hourglass-analysis-abc.arrow",  # an older server's: no pid, not ours to judge
        "other": f"something-{gone.pid}-abc.arrow",
        "overflow": "hourglass-analysis-2147483648-abc.arrow",  # os.kill: OverflowError
    }
    names["too_long"] = "hourglass-analysis-" + "9" * 200 + "-abc.arrow"
    old = time.time() - 2 * analysis_worker.LEFTOVER_AGE_S
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"x")
        if key not in ("dead_but_young", "mine"):
            os.utime(tmp_path / name, (old, old))
    removed = analysis_worker.remove_dead_servers_files((str(tmp_path), str(tmp_path / "missing")))
    gone_keys = ("dead_span", "dead_result", "mine_before_me")
    assert sorted(removed) == sorted(str(tmp_path / names[k]) for k in gone_keys)
    assert sorted(os.listdir(tmp_path)) == sorted(v for k, v in names.items() if k not in gone_keys)


def test_a_span_file_is_named_after_the_server(shm: Path) -> None:
    _, written = analysis_worker._ship_table(pa.table({"a": [1]}))
    assert written is not None and os.path.basename(written).startswith(f"hourglass-analysis-{os.getpid()}-")
    assert analysis_worker._IPC_FILE.match(os.path.basename(written))


def test_a_worker_start_removes_the_files_of_dead_servers_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dead servers' span files, and the folders of runs killed outright (beside)."""
    swept: list[str] = []
    monkeypatch.setattr(analysis_worker, "remove_dead_servers_files", lambda: swept.append("files") or [])
    monkeypatch.setattr(analysis_worker, "_sweep_folders", lambda: swept.append("folders"))
    worker = AnalysisWorker()
    try:
        worker.start()
        worker._kill()  # a worker that died: restarted, without sweeping again
        worker.start()
    finally:
        worker.close()
    deadline = time.monotonic() + 10
    while len(swept) < 2 and time.monotonic() < deadline:  # (the folders' sweep: in a thread)
        time.sleep(0.01)
    assert sorted(swept) == ["files", "folders"]


def test_a_stream_outgrowing_its_room_in_shm_is_streamed_again_into_the_temp_dir(
    store: DuckDBSpanStore, shm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The room is checked once when a stream begins; the file may then take half of it, checked
    after each batch: beyond, the read starts again in the temp directory (not whole through the
    pipe), and there beyond its budget too, it is read again whole (``_ship_table``)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(analysis_worker.tempfile, "gettempdir", lambda: str(temp))
    room = {str(shm): 2_000, str(temp): 10**12}
    monkeypatch.setattr(analysis_worker, "_free_bytes", lambda directory: room[directory])
    monkeypatch.setattr(duckdb_store, "STREAM_BATCH_ROWS", 10)
    reader = StoreReader(store)
    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    request = ("batch", ids, None, None)
    expected = reader.answer(request)
    shipped, written = _answer_shipped(reader, request)
    assert written is not None and os.path.dirname(written) == str(temp)
    assert os.listdir(shm) == []
    assert _shipped_table(shipped).equals(expected)
    room[str(temp)] = 2_000
    shipped, written = _answer_shipped(reader, request)
    assert os.listdir(temp) == []  # read again whole (``_ship_table``, its own room check)
    assert _shipped_table(shipped).equals(expected)
    assert os.listdir(shm) == []
    assert store._reads_in_flight == 0


def test_a_streamed_read_runs_the_copies_window_only_for_parts_that_hold_copies(
    store: DuckDBSpanStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As ``scan_traces`` does, a streamed read runs the window that removes copies (its ``rowid``
    tie-break: 45-65 % more CPU) only on parts of its traces that hold a copy (counted in the same
    snapshot as the rows read); the rows are the same. (On the old code every part ran it.)"""
    queries: list[tuple[list[str], str]] = []
    original = DuckDBSpanStore._scan_traces_query

    def recorded(
        selected: list[str], trace_ids: list[str], *args: Any, **kwargs: Any
    ) -> tuple[str, list[Any]]:
        query, params = original(selected, trace_ids, *args, **kwargs)
        if not kwargs.get("counts") and not kwargs.get("range_rows"):
            queries.append((list(trace_ids), query))
        return query, params

    ids = sorted(r["trace_id"] for r in store.trace_arrivals(0).to_pylist())
    counts = dict(store._cursor().execute("SELECT trace_id, count(*) FROM spans GROUP BY 1").fetchall())
    copied = {trace_id for trace_id, rows in counts.items() if rows > 3}  # (the retried Export's)
    assert 0 < len(copied) < len(ids)
    expected = store.scan_traces(ids)
    monkeypatch.setattr(DuckDBSpanStore, "_scan_traces_query", staticmethod(recorded))
    with store.stream_traces(ids, sort_rows=3) as batches:  # a part a trace
        got = pa.Table.from_batches(list(batches), schema=batches.schema)
    assert got.equals(expected) and got.num_rows == 3 * len(ids)
    assert len(queries) == len(ids)
    for part, query in queries:
        assert ("QUALIFY" in query) == bool(copied & set(part)), part
    queries.clear()
    plain = [t for t in ids if t not in copied]
    with store.stream_traces(plain) as batches:  # one part, no copies
        got = pa.Table.from_batches(list(batches), schema=batches.schema)
    assert got.equals(store.scan_traces(plain)) and not any("QUALIFY" in q for _, q in queries)
    queries.clear()
    with store.stream_traces(ids) as batches:  # one part, copies
        got = pa.Table.from_batches(list(batches), schema=batches.schema)
    assert got.equals(expected) and [("QUALIFY" in q) for _, q in queries] == [True]


def test_of_two_copies_in_one_export_a_streamed_read_keeps_the_first(tmp_path: Path) -> None:
    """A span twice in one Export, its copies different: a streamed read keeps the first in the
    Export (the lowest ``rowid``), as ``scan_traces`` does, in parts with copies and without."""
    import pyarrow.compute as pc

    table = spans_table(repeated_trace(30, "svc", spec("GET /a", 0, 10), spec("SELECT", 1, 5)))
    table = _ingested_at(table, 10**9)
    named = table.schema.get_field_index("name")
    renamed = pc.binary_join_element_wise(table.column("name"), pa.scalar("#2"), "")
    second = table.slice(0, 20).set_column(named, table.schema.field(named), renamed.slice(0, 20))
    with DuckDBSpanStore(str(tmp_path / "copies.duckdb"), threads=4) as opened:
        opened.write(pa.concat_tables([table, second]))  # one Export: copies after the firsts
        ids = sorted(set(table.column("trace_id").to_pylist()))
        for sort_rows in (2, 10_000):
            with opened.stream_traces(ids, sort_rows=sort_rows) as batches:
                got = pa.Table.from_batches(list(batches), schema=batches.schema)
            assert got.num_rows == table.num_rows
            assert not any(name.endswith("#2") for name in got.column("name").to_pylist())
            assert got.equals(opened.scan_traces(ids))
