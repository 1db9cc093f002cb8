"""The serve process's memory: its breakdown in ``/v1/stats`` (a real ``hourglass serve``), the
serve store's own buffer pool limit, glibc's settings, and the rounds' bookkeeping after a run
(``release``, the page rendered in its own thread)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

from hourglass.api import serve as serve_module
from hourglass.api import server_memory
from tests.api import test_serve
from tests.api.test_serve import Serve, _emit

pytestmark = pytest.mark.timeout(120)


serve = test_serve.serve  # the same fixture: a real `hourglass serve` on a fresh store


def _stats(serve: Serve) -> dict:
    reply = httpx.get(f"{serve.api}/v1/stats", timeout=10)
    reply.raise_for_status()
    return reply.json()


def test_stats_show_where_the_server_memory_is(serve: Serve) -> None:
    _emit(GrpcExporter(endpoint=serve.grpc, insecure=True, timeout=10), "memory")
    deadline = time.monotonic() + 60
    stats = _stats(serve)
    # the startup run ends with its release step; its page is rendered in its own thread
    while "release" not in stats["analysis"]["last_stages_ms"] and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = _stats(serve)
    assert "release" in stats["analysis"]["last_stages_ms"], stats["analysis"]
    page = httpx.get(f"{serve.api}/", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()

    memory = stats["server_memory"]
    assert memory["python_blocks"] > 0
    assert memory["arrow"]["backend"] == "jemalloc"  # serve's choice for Arrow's pool
    assert memory["arrow"]["allocated"] >= 0
    duckdb_part = memory["duckdb"]
    assert duckdb_part["used"] == sum(duckdb_part["by_tag"].values())
    # serve's store has serve's own buffer pool limit, as DuckDB spells it
    expected = duckdb.connect(config={"memory_limit": serve_module.STORE_MEMORY_LIMIT})
    assert duckdb_part["limit"] == expected.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    if sys.platform.startswith("linux"):
        assert memory["rss"] > memory["anon"] > 0
        assert memory["glibc"]["in_use"] > 0 and memory["glibc"]["free"] >= 0
        allocator = memory["duckdb_allocator"]
        assert allocator["resident"] >= allocator["allocated"] > 0


@pytest.mark.skipif(server_memory.LIBC is None, reason="glibc only")
def test_tune_malloc_sets_glibc_unless_the_environment_does() -> None:
    assert serve_module.tune_malloc(env={}) == {
        "MALLOC_ARENA_MAX": serve_module.MALLOC_ARENA_MAX,
        "MALLOC_MMAP_THRESHOLD_": serve_module.MALLOC_MMAP_THRESHOLD,
    }
    # a variable the user set is glibc's own setting already: left alone
    assert serve_module.tune_malloc(env={"MALLOC_ARENA_MAX": "8"}) == {
        "MALLOC_MMAP_THRESHOLD_": serve_module.MALLOC_MMAP_THRESHOLD
    }
    assert serve_module.tune_malloc(env={"MALLOC_ARENA_MAX": "8", "MALLOC_MMAP_THRESHOLD_": "65536"}) == {}


_LARGE_BLOCKS = """
import json, sys
from hourglass.api import serve, server_memory
if sys.argv[1] == "tuned":
    serve.tune_malloc(env={})
big = bytearray(16 * 2**20)  # mapped; freeing it raises glibc's dynamic threshold to its size
del big
before = server_memory.glibc_heap()["mmapped"]
blocks = [bytearray(4 * 2**20) for _ in range(4)]
print(json.dumps(server_memory.glibc_heap()["mmapped"] - before))
"""


@pytest.mark.skipif(server_memory.LIBC is None, reason="glibc only")
def test_large_blocks_stay_out_of_the_heap_with_the_fixed_mmap_threshold() -> None:
    """glibc raises its mmap threshold to the size of each mapped block freed (up to 32 MiB), so
    in a long-running server the tables and pickles of a few MiB came from the heap, where freeing
    them fragments it; with serve's fixed threshold they are mapped (and unmapped when freed)."""
    import json
    import subprocess

    def mapped(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run(
            [sys.executable, "-c", _LARGE_BLOCKS, mode], capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return int(json.loads(out.stdout))

    assert mapped("default") == 0  # glibc's dynamic threshold: the heap
    assert mapped("tuned") >= 4 * 4 * 2**20


@pytest.mark.timeout(120)
def test_every_read_answered_for_the_worker_is_followed_by_a_cache_release(tmp_path: Path) -> None:
    """The worker's reads of a round (recent arrivals, batches, traces by id) are answered by the server,
    which drops what each read left cached in the store before the next one (StoreReader.release)."""
    from hourglass.analysis.incremental import sidecar_path
    from hourglass.api.analysis_worker import AnalysisWorker, StoreReader
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from tests.api.test_analysis_worker import _serialized_calls_table

    released: list[str] = []

    class Counting(StoreReader):
        def release(self) -> None:
            released.append("release")
            super().release()

    path = str(tmp_path / "spans.duckdb")
    worker = AnalysisWorker()
    with DuckDBSpanStore(path) as store:
        store.write(_serialized_calls_table())
        request = {
            "sidecar": sidecar_path(path),
            "update": True,
            "cutoff_ns": time.time_ns() + 1,  # every stored trace has settled
            "margin_ns": 0,
            "retention_cutoff_ns": None,
            "since_ns": None,
            "explain": True,
            "cluster": None,
        }
        reads: dict[str, float] = {}
        try:
            report, _, _ = worker.run_incremental(request, Counting(store), reads=reads)
        finally:
            worker.close()
    assert report["recommendations"], "the store holds serialized calls: the report must say so"
    answered = sum(int(v) for k, v in reads.items() if k.endswith("_count"))
    assert reads.get("recent_count") == 1 and reads.get("batch_count", 0) >= 1
    assert len(released) == answered


def test_the_serve_store_has_its_own_pool_and_a_returning_allocator(tmp_path: Path) -> None:
    store = serve_module.open_serve_store(str(tmp_path / "spans.duckdb"))
    try:
        cursor = store._cursor()  # type: ignore[attr-defined]
        setting = "SELECT current_setting('allocator_background_threads'), current_setting('memory_limit')"
        background, limit = cursor.execute(setting).fetchone()
        expected = duckdb.connect(config={"memory_limit": serve_module.STORE_MEMORY_LIMIT})
        assert background is True
        assert limit == expected.execute("SELECT current_setting('memory_limit')").fetchone()[0]
    finally:
        store.close()


def _open_paths(pid: int) -> list[str]:
    """What the process's descriptors point at; one closed between the listing and its read (the
    server's threads keep opening and closing files) is skipped."""
    paths = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):
            paths.append(os.readlink(fd))
    return paths


@pytest.mark.timeout(180)
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc")
@pytest.mark.parametrize("incremental", ["true", "false"])
def test_the_trace_index_is_a_mapped_file_not_the_servers_heap(tmp_path: Path, incremental: str) -> None:
    """The trace index of the served report grows with the store (every affected trace): the
    worker writes its arrays to a file beside the store which the server opens (its name removed
    at once) and reads per lookup, not its memory, nor mapped; every affected trace answers."""
    from tests.api.live_server import running_server, send_traces, wait_for_spans

    env = {"HOURGLASS_INCREMENTAL_ANALYSIS": incremental}
    with running_server(tmp_path, settle="1s", env=env) as server:
        checkout = send_traces(server, checkout=12, home=8)
        wait_for_spans(server, server.sent_spans)
        with server.client() as client:
            assert client.post("/v1/analyses").status_code == 200
            report = client.get("/v1/recommendations").json()
            views = {t: client.get(f"/v1/traces/{t}").json() for t in checkout}
        pid = server.process.pid
        maps = Path(f"/proc/{pid}/maps").read_text()
        opened = _open_paths(pid)
        folder = Path(f"{server.db}.analysis.duckdb.d") / "results"
        left = sorted(os.listdir(folder))
    assert report["traces_analyzed"] == 20 and report["recommendations"], report
    exemplars = {t for r in report["recommendations"] for t in r["evidence"]["trace_ids"]}
    beyond = [t for t in checkout if t not in exemplars]
    assert beyond, "every checkout trace an exemplar: nothing shows the index's own entries"
    for trace_id in checkout:  # each affected trace, also those the report does not name
        findings = views[trace_id]["findings"]
        assert findings and all(f["span_ids"] for f in findings), (trace_id, views[trace_id])
    index_files = [p for p in opened if p.startswith(f"{folder}/hourglass-result-")]
    assert index_files and all(p.endswith("(deleted)") for p in index_files), opened
    assert "hourglass-result-" not in maps
    assert left == []  # each index file's name removed once opened


@pytest.mark.skipif(server_memory.duckdb_allocator() is None, reason="DuckDB's bundled jemalloc only")
def test_the_worker_returns_the_pages_duckdb_freed() -> None:
    """DuckDB's allocator keeps the pages of what it freed (a dropped table, evicted blocks)
    resident; the worker's release (``trim_worker``) returns them to the system at once."""
    db = duckdb.connect()
    try:
        db.execute(
            "CREATE TABLE t AS SELECT range AS i, repeat('x', 50) || range::VARCHAR AS s FROM range(1000000)"
        )
        db.execute("DROP TABLE t")
        held = server_memory.duckdb_allocator()
        assert held is not None and held["resident"] - held["allocated"] > 40 * server_memory.MiB
        server_memory.trim_worker()
        after = server_memory.duckdb_allocator()
        assert after is not None and after["resident"] < held["resident"] - 40 * server_memory.MiB
    finally:
        db.close()


def test_the_servers_reads_for_the_worker_return_the_pages_duckdb_freed(tmp_path: Path) -> None:
    """Between a round's reads the server returns what DuckDB's allocator keeps of them (a read's
    result, evicted blocks: freed, but resident for reuse until its decay): ``StoreReader.release``."""
    from hourglass.api.analysis_worker import StoreReader
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
    db = duckdb.connect()
    try:
        db.execute(
            "CREATE TABLE t AS SELECT range AS i, repeat('x', 50) || range::VARCHAR AS s FROM range(1000000)"
        )
        db.execute("DROP TABLE t")  # freed: what a shipped read leaves behind
        held = server_memory.duckdb_allocator()
        assert held is not None and held["resident"] - held["allocated"] > 40 * server_memory.MiB
        StoreReader(store).release()
        after = server_memory.duckdb_allocator()
        assert after is not None and after["resident"] < held["resident"] - 40 * server_memory.MiB
    finally:
        db.close()
        store.close()
