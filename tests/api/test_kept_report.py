"""A restarted ``hourglass serve`` serves the report its last process kept, from outside: a real
server fed by the real OpenTelemetry exporter, stopped (SIGTERM) or killed (SIGKILL) and started
again on the same store, read over HTTP.

* after a clean stop the first read is answered at once with the last report (the generation it
  had, the same recommendations), not ``503 no report yet`` until the first round; the rounds of
  the new process go on from that generation;
* after a crash the report kept after the first round of the killed process is served;
* with a setting that changes what a report says, or another store file, the kept report is not
  served: the first round makes the report, as before.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from hourglass.analysis.trace_index import TraceIndex
from hourglass.api import kept_report
from hourglass.api.analysis_snapshot import ReportSnapshot
from tests.api.live_server import LiveServer, running_server, send_traces, wait_for_spans
from tests.api.test_incremental_serve import MS, _analysis, _wait_for_report

pytestmark = pytest.mark.timeout(180)


def _kept_folder(db: Path) -> Path:
    return Path(kept_report.folder_of(f"{db}.analysis.duckdb"))


def _first_read(server: LiveServer) -> tuple[int, dict[str, Any]]:
    """The first ``GET /v1/recommendations`` of a server just started: (its generation, report)."""
    with server.client() as client:
        response = client.get("/v1/recommendations")
    assert response.status_code == 200, (response.status_code, response.text, server.log_tail())
    return int(response.headers["X-Hourglass-Generation"]), response.json()


def _wait_for_a_round(server: LiveServer) -> dict[str, Any]:
    """The analysis status once a round of this process has ended."""
    deadline = time.monotonic() + 60
    while True:
        analysis = _analysis(server)
        if analysis["runs"] >= 1:
            return analysis
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.2)


def _ids(report: dict[str, Any]) -> list[str]:
    return [r["id"] for r in report["recommendations"]]


def _kept(db: Path) -> tuple[int, dict[str, Any]] | None:
    """(generation, report as served) of the report kept for ``db``'s next serve (None: none)."""
    path = _kept_folder(db) / kept_report.KEPT_FILE
    if not path.exists():
        return None
    _, snapshot = pickle.loads(path.read_bytes())
    return snapshot.generation, json.loads(snapshot.body())


def _wait_for_kept(db: Path, after: int) -> tuple[int, dict[str, Any]]:
    deadline = time.monotonic() + 60
    while (kept := _kept(db)) is None or kept[0] <= after:
        assert time.monotonic() < deadline, f"no report kept after generation {after}"
        time.sleep(0.2)
    return kept


def _serves_the_kept_report(
    server: LiveServer, kept: tuple[int, dict[str, Any]], before: dict[str, Any]
) -> None:
    """The first read of ``server`` just started is the ``kept`` report (its generation and its
    body), or one of this process's rounds if that was quicker (the same recommendations); when
    it served the kept one, it says so (in the log line written just after the report is there
    to read, or not at all when a round was first)."""
    served, report = _first_read(server)
    assert served >= kept[0], (served, kept[0])
    assert _ids(report) == _ids(before)
    if served == kept[0]:
        assert report == kept[1]
        deadline = time.monotonic() + 10
        while "serving the report kept at" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.05)


@pytest.mark.slow
def test_a_restart_serves_the_report_kept_by_the_last_process(tmp_path: Path) -> None:
    base_ns = time.time_ns() - 120_000 * MS
    with running_server(tmp_path, settle="1s") as server:
        send_traces(server, checkout=12, home=8, base_ns=base_ns)
        wait_for_spans(server, server.sent_spans)
        before = _wait_for_report(server, traces=20, spans=server.sent_spans)
        server.process.terminate()  # a clean stop keeps the report served last
        server.process.wait(timeout=30)
    assert _ids(before), "nothing to compare"
    kept = _kept(server.db)
    assert kept is not None

    # A clean stop: the kept report is there at the first read, with its generation (unless the
    # first round of this process was quicker than the read); the rounds of this process go on
    # from that generation, and the first one's report is kept at once.
    with running_server(tmp_path, settle="1s") as again:
        _serves_the_kept_report(again, kept, before)
        status = _wait_for_a_round(again)
        assert status["generation"] == kept[0] + status["runs"], status
        assert status["restored"] is False and status["last_reason"] != kept_report.RESTORED
        kept = _wait_for_kept(server.db, after=kept[0])
        again.process.kill()  # a crash: what this process kept is served next
        again.process.wait(timeout=30)

    with running_server(tmp_path, settle="1s") as crashed:
        _serves_the_kept_report(crashed, kept, before)
        _wait_for_a_round(crashed)
        crashed.process.terminate()
        crashed.process.wait(timeout=30)

    # Another report window: the kept report says something else; not served, and dropped.
    with running_server(tmp_path, settle="1s", env={"HOURGLASS_REPORT_MAX_SPANS": "100000"}) as other:
        served, _ = _first_read(other)
        assert served == 1, served
        assert "serving the report kept at" not in other.log.read_text(), other.log_tail()


def _snapshot(generation: int) -> ReportSnapshot:
    report = {
        "schema": "hourglass.report/v1",
        "generated_at": "2026-12-07T00:00:00Z",
        "traces_analyzed": 1,
        "spans_analyzed": 3,
        "recommendations": [{"id": "r1", "kind": "n_plus_one", "exemplar_trace_ids": ["ab" * 16]}],
    }
    return ReportSnapshot.build(
        report,
        generation=generation,
        spans_in_store=3,
        started_at=time.time(),
        started_monotonic=time.monotonic(),
        reason="settled",
        trace_index=TraceIndex.from_report(report),
    )


def test_a_kept_report_is_served_only_with_its_key_and_a_damaged_one_is_dropped(tmp_path: Path) -> None:
    folder = str(tmp_path / "kept")
    store = tmp_path / "store.duckdb"
    store.write_bytes(b"")
    key = kept_report.key_of(str(store), None, "template")
    assert key is not None
    kept_report.save(folder, _snapshot(7), key)
    kept_report.save(folder, _snapshot(8), key)  # replaces the first: one index file left
    assert len([n for n in os.listdir(folder) if n.startswith(kept_report.INDEX_PREFIX)]) == 1

    restored = kept_report.restore(folder, key)
    assert restored is not None
    assert restored.generation == 8 and restored.reason == kept_report.RESTORED
    assert restored.report == _snapshot(8).report and restored.rec_json == _snapshot(8).rec_json
    assert restored.trace_index == _snapshot(8).trace_index  # (read from its file)
    assert restored.change_marker == -1 and restored.started_monotonic < time.monotonic()

    # the same store made again (another inode): another store, whose report this is not
    other = {**key, "store_inode": key["store_inode"] + 1}
    assert kept_report.restore(folder, other) is None
    assert os.listdir(folder) == []  # dropped

    kept_report.save(folder, _snapshot(9), key)
    with open(os.path.join(folder, kept_report.KEPT_FILE), "r+b") as damaged:
        damaged.truncate(40)
    assert kept_report.restore(folder, key) is None
    assert os.listdir(folder) == []

    kept_report.save(folder, _snapshot(10), key)
    payload, _ = pickle.loads((Path(folder) / kept_report.KEPT_FILE).read_bytes())
    os.unlink(os.path.join(folder, payload["index_file"]))  # its index file lost
    assert kept_report.restore(folder, key) is None
