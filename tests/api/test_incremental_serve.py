"""`hourglass serve`'s incremental analysis, from outside: a real server fed by the real
OpenTelemetry exporter over OTLP/gRPC, read over HTTP, compared with the real CLI on the same store.

* once the traces have settled, ``GET /v1/recommendations`` has the recommendations of
  ``hourglass analyze --db`` on the same store (same ids, savings within 1 %);
* a late span for a trace already extracted marks its batch dirty: it is re-extracted and the
  report counts the span;
* a restart resumes from the stored extraction: the first round reads no spans;
* ``?since=`` is the decision over the stored rows of the window, equal to ``analyze --since``;
* retention removes the rows with the spans: after the store dropped old traces the report
  covers the recent ones only, as the CLI does on the same store;
* ``HOURGLASS_INCREMENTAL_ANALYSIS=false`` gives the same recommendations by re-analysing the store;
* ``HOURGLASS_REPORT_MAX_SPANS`` below the stored spans: the report covers the newest traces, says
  what it left out, and equals the CLI's report over those traces.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.api.live_server import (
    MS,
    ROOT,
    LiveServer,
    _provider,
    hourglass_executable,
    running_server,
    send_traces,
    wait_for_spans,
)
from tests.builders import TraceBuilder, spans_table

pytestmark = pytest.mark.timeout(120)


def _analysis(server: LiveServer) -> dict[str, Any]:
    with server.client() as client:
        analysis: dict[str, Any] = client.get("/v1/stats").json()["analysis"]
        return analysis


def _wait_for_report(server: LiveServer, traces: int, spans: int, timeout: float = 60.0) -> dict[str, Any]:
    """The report once it covers ``traces`` traces and ``spans`` spans (all settled)."""
    deadline = time.monotonic() + timeout
    with server.client() as client:
        while True:
            report: dict[str, Any] = client.get("/v1/recommendations").json()
            if report.get("traces_analyzed") == traces and report.get("spans_analyzed") == spans:
                return report
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"report covers {report.get('traces_analyzed')} traces / {report.get('spans_analyzed')} spans,"
                    f" expected {traces} / {spans}; analysis {_analysis(server)}\n{server.log_tail()}"
                )
            time.sleep(0.3)


def _stop(server: LiveServer) -> None:
    server.process.terminate()
    server.process.wait(timeout=30)


def _cli_report(db: Path, *args: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    result = subprocess.run(
        [*hourglass_executable(), "analyze", "--db", str(db), "--format", "json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _assert_same_recommendations(served: dict[str, Any], cli: dict[str, Any]) -> None:
    assert served["recommendations"], "nothing to compare"
    by_id = {r["id"]: r for r in cli["recommendations"]}
    assert [r["id"] for r in served["recommendations"]] == list(by_id)
    for rec in served["recommendations"]:
        for key, value in rec["impact"].items():
            expected = by_id[rec["id"]]["impact"][key]
            if isinstance(value, float | int) and expected is not None:
                assert value == pytest.approx(expected, rel=0.01, abs=1e-9), (rec["id"], key)
            else:
                assert value == expected, (rec["id"], key)
    assert served["traces_analyzed"] == cli["traces_analyzed"]
    assert served["spans_analyzed"] == cli["spans_analyzed"]


def _serialized_trace(base_ns: int) -> TraceBuilder:
    """GET /checkout calling three services one after another (a serialized_calls finding)."""
    b = TraceBuilder(service="frontend", base_ns=base_ns)
    root = b.span("GET /checkout", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    for i, name in enumerate(("GET users", "GET cart", "GET prices")):
        b.span(
            name,
            parent=root,
            start_ms=1 + 32 * i,
            dur_ms=30,
            kind=KIND_CLIENT,
            http_url=f"http://{name[4:]}/x",
        )
    return b


def _send_late_span(server: LiveServer, trace_id: str, base_ns: int) -> None:
    """One more client span in an already sent trace (a late arrival), under a made-up parent."""
    provider = _provider("frontend", server.grpc_endpoint, server.token)
    try:
        parent = SpanContext(
            trace_id=int(trace_id, 16), span_id=0x1234567890ABCDEF, is_remote=True, trace_flags=TraceFlags(1)
        )
        ctx = otel_trace.set_span_in_context(NonRecordingSpan(parent))
        span = provider.get_tracer("tests.incremental").start_span(
            "GET /late", context=ctx, kind=SpanKind.CLIENT, start_time=base_ns + 200 * MS
        )
        span.end(end_time=base_ns + 210 * MS)
    finally:
        provider.force_flush(30_000)
        provider.shutdown()


@pytest.mark.slow
def test_serve_report_equals_the_cli_and_follows_late_spans_and_restarts(tmp_path: Path) -> None:
    base_ns = time.time_ns() - 120_000 * MS
    with running_server(tmp_path, settle="1s") as server:
        checkout = send_traces(server, checkout=12, home=8, base_ns=base_ns)
        wait_for_spans(server, server.sent_spans)
        first = _wait_for_report(server, traces=20, spans=server.sent_spans)
        analysis = _analysis(server)
        assert analysis["incremental"] is True
        assert analysis["incremental_round"]["traces_extracted"] == 20

        _send_late_span(server, checkout[0], base_ns)
        wait_for_spans(server, server.sent_spans + 1)
        late = _wait_for_report(server, traces=20, spans=server.sent_spans + 1)
        assert [r["id"] for r in late["recommendations"]] == [r["id"] for r in first["recommendations"]]
        rounds_read = _analysis(server)["runs"]
        assert rounds_read >= 2
        _stop(server)
    cli = _cli_report(server.db)
    _assert_same_recommendations(late, cli)
    tally = _tally_marks(server.db)

    # A restart on the same store resumes from the stored extraction: nothing is read again. Nor
    # is every stored row read again for the per-trace tally: the store's clean close kept the
    # marks the tally is valid against (``DuckDBSpanStore._seal``), so a round after the restart
    # goes on with the same epoch instead of rebuilding the tally under a new one.
    with running_server(tmp_path, settle="1s") as again:
        deadline = time.monotonic() + 60
        while _analysis(again)["runs"] < 1:  # (a round of this run, not the report kept from the last)
            assert time.monotonic() < deadline, again.log_tail()
            time.sleep(0.2)
        resumed = _wait_for_report(again, traces=20, spans=server.sent_spans + 1)
        figures = _analysis(again)["incremental_round"]
        assert figures["settled_new_traces"] == 0 and figures["dirty_batches"] == 0, figures
        assert figures["partitions_read"] == 0, figures
        _assert_same_recommendations(resumed, cli)
        _stop(again)
    after = _tally_marks(server.db)
    assert after["tally_epoch"] == tally["tally_epoch"] and after["tally_upto"] >= tally["tally_upto"], (
        tally,
        after,
    )


def _tally_marks(db: Path) -> dict[str, int]:
    """The incremental sidecar's tally marks (its bound, and the store epoch it is valid in)."""
    import duckdb

    from hourglass.analysis.incremental import sidecar_path

    with duckdb.connect(sidecar_path(str(db)), read_only=True) as con:
        rows = con.execute(
            "SELECT key, value FROM meta WHERE key IN ('tally_epoch', 'tally_upto')"
        ).fetchall()
    marks = {str(k): int(v) for k, v in rows}
    assert set(marks) == {"tally_epoch", "tally_upto"}, marks
    return marks


def test_full_reanalysis_switch_gives_the_same_recommendations(tmp_path: Path) -> None:
    base_ns = time.time_ns() - 120_000 * MS
    with running_server(tmp_path, settle="1s", env={"HOURGLASS_INCREMENTAL_ANALYSIS": "false"}) as server:
        send_traces(server, checkout=12, home=8, base_ns=base_ns)
        wait_for_spans(server, server.sent_spans)
        served = _wait_for_report(server, traces=20, spans=server.sent_spans)
        assert _analysis(server)["incremental"] is False
        _stop(server)
    _assert_same_recommendations(served, _cli_report(server.db))


def test_since_window_is_a_decision_over_the_stored_rows(tmp_path: Path) -> None:
    now = time.time_ns()
    with running_server(tmp_path, settle="1s", env={"HOURGLASS_RETENTION": "0"}) as server:
        send_traces(server, checkout=6, home=4, base_ns=now - 2 * 3600 * 10**9)  # two hours ago
        old_spans = server.sent_spans
        send_traces(server, checkout=8, home=4, base_ns=now - 120 * 10**9)  # two minutes ago
        wait_for_spans(server, server.sent_spans)
        _wait_for_report(server, traces=22, spans=server.sent_spans)
        with server.client() as client:
            window = client.get("/v1/recommendations", params={"since": "30m"}).json()
        assert window["traces_analyzed"] == 12 and window["spans_analyzed"] == server.sent_spans - old_spans
        _stop(server)
    _assert_same_recommendations(window, _cli_report(server.db, "--since", "30m"))


@pytest.mark.slow
def test_a_report_over_more_spans_than_its_limit_covers_the_newest_traces(tmp_path: Path) -> None:
    """``HOURGLASS_REPORT_MAX_SPANS``: the stored traces hold more spans than that, so the report
    covers the newest whole batches (the recent traces, 84 spans: within 3/4 of the limit; the old
    ones, another 70, would pass it) and says what it left out — in the JSON, ``/v1/stats`` and
    the HTML page. It is the CLI's report over the same traces (here: ``--since 30m``)."""
    now = time.time_ns()
    env = {"HOURGLASS_RETENTION": "0", "HOURGLASS_REPORT_MAX_SPANS": "120"}
    with running_server(tmp_path, settle="1s", env=env) as server:
        send_traces(server, checkout=6, home=4, base_ns=now - 2 * 3600 * 10**9)  # two hours ago
        old_spans = server.sent_spans
        send_traces(server, checkout=8, home=4, base_ns=now - 120 * 10**9)  # two minutes ago
        recent_spans = server.sent_spans - old_spans
        assert (old_spans, recent_spans) == (70, 84)
        wait_for_spans(server, server.sent_spans)
        served = _wait_for_report(server, traces=12, spans=recent_spans)
        window = served["window"]
        assert (window["max_spans"], window["spans"]) == (120, recent_spans), window
        assert (window["spans_left_out"], window["traces_left_out"]) == (old_spans, 10), window
        assert window["from"] is not None and window["from_ns"] >= now - 121 * 10**9
        analysis = _analysis(server)
        assert analysis["incremental_round"]["window"]["spans_left_out"] == old_spans
        assert analysis["spans_at_last_run"] == recent_spans  # (what the report covers)
        with server.client() as client:
            page = client.get("/").text
            metrics = client.get("/metrics").text
        assert "This report covers the newest 84 spans" in page and "70 older stored spans" in page
        assert "hourglass_analysis_spans_left_out 70.0" in metrics
        _stop(server)
    _assert_same_recommendations(served, _cli_report(server.db, "--since", "30m"))
    # without the limit (0) the same store is reported whole
    with running_server(tmp_path, settle="1s", env={**env, "HOURGLASS_REPORT_MAX_SPANS": "0"}) as again:
        whole = _wait_for_report(again, traces=22, spans=old_spans + recent_spans)
        assert "window" not in whole
        _stop(again)


def test_retention_removes_the_rows_with_the_spans(tmp_path: Path) -> None:
    """The store's retention (serve runs it every few minutes; called directly here) drops the
    old traces; the next round drops their rows: the report equals the CLI's on what is left."""
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from tests.api.test_rest_api import _in_process

    now = time.time_ns()
    db = tmp_path / "spans.duckdb"
    store = DuckDBSpanStore(str(db))
    old = [_serialized_trace(now - 2 * 3600 * 10**9 + i * 10**9) for i in range(10)]
    recent = [_serialized_trace(now - 120 * 10**9 + i * 10**9) for i in range(12)]
    store.write(spans_table(old + recent))
    try:
        with _in_process(store) as client:
            assert client.get("/v1/recommendations").json()["traces_analyzed"] == 22
            removed = store.delete_older_than(now - 3600 * 10**9)
            assert removed == 4 * len(old)
            run = client.post("/v1/analyses").json()
            assert run["status"] == "completed", run
            kept = client.get("/v1/recommendations").json()
            figures = client.get("/v1/stats").json()["analysis"]["incremental_round"]
    finally:
        store.close()
    # the old traces' rows are gone from the stored rows (a background round started by the
    # deletion may be the one that dropped them, so the forced round's own expired count can be 0)
    assert figures["traces_extracted"] == 12, figures
    assert figures["expired_traces"] in (0, 10), figures
    assert kept["traces_analyzed"] == 12
    _assert_same_recommendations(kept, _cli_report(db))
