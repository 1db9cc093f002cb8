"""serve's whole-store analysis (a ClickHouse store; a DuckDB store with
``HOURGLASS_INCREMENTAL_ANALYSIS=false``) in partitions of whole traces: the worker reads one
partition at a time from the server, which holds the store, instead of the whole store shipped
at once. The report is the CLI's on the same store; over more span rows than
``HOURGLASS_REPORT_MAX_SPANS`` it covers the newest of them, and is the CLI's report ``--since``
their start."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.api.live_server import MS, running_server, send_traces, wait_for_spans
from tests.api.test_incremental_serve import (
    _analysis,
    _assert_same_recommendations,
    _cli_report,
    _stop,
    _wait_for_report,
)


def _served_in_partitions(tmp_path: Path, store: str, env: dict[str, str]) -> tuple[dict, Path]:
    base_ns = time.time_ns() - 120_000 * MS
    with running_server(tmp_path, settle="1s", store=store, env=env, stop_timeout=30) as server:
        send_traces(server, checkout=12, home=8, base_ns=base_ns)
        wait_for_spans(server, server.sent_spans)
        served = _wait_for_report(server, traces=20, spans=server.sent_spans)
        analysis = _analysis(server)
        _stop(server)
    assert analysis["incremental"] is False and analysis["partitions"] == 3, analysis
    # each partition read once for the extraction, and again for the pricing's traces
    assert analysis["last_reads_ms"]["partition_count"] >= 3, analysis
    return served, server.db


def test_duckdb_store_reanalysed_in_partitions_gives_the_cli_report(tmp_path: Path) -> None:
    env = {"HOURGLASS_INCREMENTAL_ANALYSIS": "false", "HOURGLASS_SERVE_PARTITIONS": "3"}
    served, db = _served_in_partitions(tmp_path, "", env)
    _assert_same_recommendations(served, _cli_report(db))


def test_chdb_store_analysed_in_partitions_gives_the_cli_report(tmp_path: Path) -> None:
    pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")
    served, db = _served_in_partitions(tmp_path, "chdb", {"HOURGLASS_SERVE_PARTITIONS": "3"})
    _assert_same_recommendations(served, _cli_report(Path(f"chdb:{db}")))


def test_the_memory_budget_decides_the_partitions() -> None:
    """Without HOURGLASS_SERVE_PARTITIONS, a window of more spans than one context holds within
    HOURGLASS_MEMORY_BUDGET is analysed in the partitions the CLI's plan of two workers gives (the
    server's read of a partition and the worker's analysis of one); one
    that fits, at once (the window counted by ``span_rows_since`` when it is not the whole store)."""
    from types import SimpleNamespace

    from hourglass.analysis import planning
    from hourglass.api.analysis_service import AnalysisService

    class Counted:
        def span_rows_since(self, since_ns: int | None) -> int:
            return 1_000

    budget = 600 * 2**20  # (600 - 200 MiB) / 2,000 B a span: ~210k spans at once
    service = AnalysisService(
        Counted(),  # type: ignore[arg-type]
        settings=SimpleNamespace(memory_budget=budget, serve_partitions=0),
        isolate=False,
    )
    assert service._partition_plan(None, 200_000) is None
    plan = service._partition_plan(None, 400_000)
    assert plan is not None and plan.parts == planning.plan(400_000, budget, 2).parts > 1
    assert service._partition_plan(5, 400_000) is None  # the window: 1,000 spans
    service._settings = SimpleNamespace(memory_budget=budget, serve_partitions=1)
    assert service._partition_plan(None, 400_000) is None  # 1: at once, whatever the budget


@pytest.mark.parametrize("store", ["", "chdb"])
def test_a_whole_store_analysis_over_its_limit_covers_the_newest_spans(tmp_path: Path, store: str) -> None:
    """``HOURGLASS_REPORT_MAX_SPANS`` for the whole-store analysis (a ClickHouse store; DuckDB
    without incremental analysis): a store of more span rows than the limit is analysed from the
    start time of about its newest ``limit`` rows on (whole traces), and the report says what it
    left out; it is the CLI's report of that ``--since``."""
    if store:
        pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")
    now = time.time_ns()
    env = {"HOURGLASS_RETENTION": "0", "HOURGLASS_REPORT_MAX_SPANS": "50"}
    if not store:
        env["HOURGLASS_INCREMENTAL_ANALYSIS"] = "false"
    with running_server(tmp_path, settle="1s", store=store, env=env, stop_timeout=30) as server:
        send_traces(server, checkout=6, home=4, base_ns=now - 2 * 3600 * 10**9)  # two hours ago
        old_spans = server.sent_spans
        send_traces(server, checkout=8, home=4, base_ns=now - 120 * 10**9)  # two minutes ago
        wait_for_spans(server, server.sent_spans)
        deadline = time.monotonic() + 60
        with server.client() as client:
            while True:
                served = client.get("/v1/recommendations").json()
                window = served.get("window")
                if window and window["spans"] + window["spans_left_out"] == server.sent_spans:
                    break
                assert time.monotonic() < deadline, (served.get("spans_analyzed"), window, server.log_tail())
                time.sleep(0.3)
            status = client.get("/v1/stats").json()["analysis"]
        _stop(server)
    assert window["max_spans"] == 50 and 0 < served["spans_analyzed"] == window["spans"] < 84, window
    assert window["traces_left_out"] == 22 - served["traces_analyzed"]
    assert window["from_ns"] >= now - 121 * 10**9 and window["from_ns"] % 1000 == 0  # among the recent
    assert status["spans_at_last_run"] == window["spans"] and old_spans == 70
    db = Path(f"chdb:{server.db}") if store else server.db
    cli = _cli_report(db, "--since", window["from"])  # (to the microsecond: the same window)
    assert (cli["traces_analyzed"], cli["spans_analyzed"]) == (
        served["traces_analyzed"],
        served["spans_analyzed"],
    )
    assert served["recommendations"], "nothing to compare"
    assert [r["id"] for r in served["recommendations"]] == [r["id"] for r in cli["recommendations"]]


def test_a_worker_stopped_in_the_middle_of_a_partitioned_analysis_leaves_no_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's worker, stopped (SIGTERM) while it analyses the store in partitions, ends at once as
    before, but removes the run's temporary folders first: the repaired partitions kept for the
    pricing (~100 bytes a span) were left in the system's temporary folder at every such stop."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from bench.analysis import generate_spans
    from hourglass.api.analysis_service import AnalysisService
    from hourglass.api.settings import Settings
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # (the worker is spawned: it reads it afresh)
    spans = generate_spans(200_000)  # spans of the last minutes, received a while ago: settled
    shift = time.time_ns() - 600 * 10**9 - pc.min(spans["start_ns"]).as_py()
    for column in ("start_ns", "end_ns"):
        spans = spans.set_column(spans.schema.get_field_index(column), column, pc.add(spans[column], shift))
    received = pa.array([time.time_ns() - 300 * 10**9] * spans.num_rows, pa.int64())
    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
    store.write(spans.set_column(spans.schema.get_field_index("ingested_ns"), "ingested_ns", received))
    service = AnalysisService(
        store,
        settle_seconds=0.2,
        poll_seconds=0.05,
        render_html=False,
        settings=Settings(incremental_analysis=False, serve_partitions=3),
    )
    service.start()
    try:
        deadline = time.monotonic() + 60
        while not list(scratch.glob("hourglass-prepared-*/p*.arrow")):  # a partition extracted
            assert time.monotonic() < deadline and service.status()["runs"] == 0, service.status()
            time.sleep(0.02)
    finally:
        service.stop()
        store.close()
    assert not list(scratch.iterdir())
