"""serve's whole-store analysis (a ClickHouse store; a DuckDB store with
``HOURGLASS_INCREMENTAL_ANALYSIS=false``) in partitions of whole traces: the worker reads one
partition at a time from the server, which holds the store, instead of the whole store shipped
at once. The report is the CLI's on the same store."""

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
