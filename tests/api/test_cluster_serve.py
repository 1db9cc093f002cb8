"""`hourglass serve --cluster`: the incremental rounds' batches extracted and priced on a real Dask
scheduler with two real worker processes on 127.0.0.1, the server fed by the real OpenTelemetry
exporter over OTLP/gRPC, read over HTTP, compared with the real CLI on the same store.

* the report equals ``hourglass analyze --db`` run locally on the same store (same ids, savings
  within 1 %), although the worker running the first task was killed in the middle of it (the
  scheduler ran the task again on the other worker);
* a batch whose task fails on the cluster fails the round naming the batch: the status says so,
  the previous report stays, ingest goes on, and the next round submits the batch again;
* a scheduler that goes away fails the rounds with the cause (the report stays, ingest goes on)
  until a scheduler answers at its address again;
* a scheduler that refuses connections, or accepts them and never answers, stops ``serve`` at
  start with one line, within 10 s.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.live_server import (
    MS,
    ROOT,
    LiveServer,
    hourglass_executable,
    running_server,
    send_traces,
    wait_for_spans,
)
from tests.api.test_incremental_serve import (
    _analysis,
    _assert_same_recommendations,
    _cli_report,
    _stop,
    _wait_for_report,
)
from tests.dask_cluster import dask_cluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Scheduler and two workers; the first Hourglass task kills its worker. Yields (address,
    the file written when that happened)."""
    folder = tmp_path_factory.mktemp("dask")
    with dask_cluster(folder, die=1) as address:
        yield address, folder / "died-1"


def test_serve_on_a_cluster_reports_as_the_cli_though_a_worker_died(
    tmp_path: Path, cluster: tuple[str, Path]
) -> None:
    address, died = cluster
    base_ns = time.time_ns() - 120_000 * MS
    with running_server(tmp_path, settle="1s", env={"HOURGLASS_CLUSTER": address}) as server:
        send_traces(server, checkout=12, home=8, base_ns=base_ns)
        wait_for_spans(server, server.sent_spans)
        served = _wait_for_report(server, traces=20, spans=server.sent_spans)
        analysis = _analysis(server)
        assert analysis["cluster"] == address and analysis["last_error"] is None, analysis
        assert analysis["incremental_round"]["traces_extracted"] == 20
        _stop(server)
    assert died.read_text().startswith("hourglass-")  # the first task's worker was killed mid-task
    _assert_same_recommendations(served, _cli_report(server.db))


def _wait_for_failure(server: LiveServer, timeout: float = 60.0) -> dict[str, Any]:
    """The analysis status once a round has failed."""
    deadline = time.monotonic() + timeout
    while True:
        analysis = _analysis(server)
        if analysis["failures"]:
            return analysis
        if time.monotonic() > deadline:
            raise AssertionError(f"no failed round: {analysis}")
        time.sleep(0.2)


@pytest.mark.slow
def test_a_failed_batch_is_named_the_report_stays_and_the_next_round_retries(tmp_path: Path) -> None:
    """A scheduler that gives up on a task as soon as its worker dies (allowed-failures 0), and
    the first two Hourglass tasks after arming kill their workers: the batch's task and its one
    retry both die, so the round fails; the next round's task runs."""
    folder = tmp_path / "dask"
    folder.mkdir()
    no_second_chance = {"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    base_ns = time.time_ns() - 120_000 * MS
    with (
        dask_cluster(folder, die=2, armed=False, scheduler_env=no_second_chance) as address,
        running_server(tmp_path, settle="1s", env={"HOURGLASS_CLUSTER": address}) as server,
    ):
        send_traces(server, checkout=6, home=4, base_ns=base_ns)
        wait_for_spans(server, server.sent_spans)
        first = _wait_for_report(server, traces=10, spans=server.sent_spans)

        (folder / "armed").touch()
        send_traces(server, checkout=6, home=4, base_ns=base_ns + 30_000 * MS)
        wait_for_spans(server, server.sent_spans)  # ingest goes on
        failed = _wait_for_failure(server)
        error = str(failed["last_error"])
        first_line = error.splitlines()[0]
        assert "extracting batch " in first_line and "on the Dask cluster failed twice" in first_line, error
        assert "KilledWorker" in first_line, error
        assert (folder / "died-2").exists()  # its task was submitted again before the round failed
        with server.client() as client:  # the previous report stays
            kept = client.get("/v1/recommendations").json()
        assert (kept["traces_analyzed"], kept["spans_analyzed"]) == (10, first["spans_analyzed"])

        later = _wait_for_report(server, traces=20, spans=server.sent_spans)  # a later round retried
        assert _analysis(server)["last_error"] is None
        _stop(server)
    log = server.log.read_text()
    assert "KilledWorker" in log  # and the log says it
    # its first failure too, naming the batch as the round's error does (not "partition 1/1")
    first_try = (
        r"extracting batch \d+ \(\d+ traces, partition \d+/\d+\) failed on the Dask cluster \(KilledWorker"
    )
    assert re.search(first_try, log), log[-4000:]
    assert " of partition " not in log, log[-4000:]
    _assert_same_recommendations(later, _cli_report(server.db))


@pytest.mark.slow
def test_a_scheduler_that_goes_away_fails_the_rounds_until_it_is_back(tmp_path: Path) -> None:
    """serve keeps ingesting and serving its last report; the rounds fail with the cause; once a
    scheduler answers at the address again, the next round catches up."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    base_ns = time.time_ns() - 120_000 * MS
    with contextlib.ExitStack() as serving:
        with dask_cluster(tmp_path / "first", workers=1, port=port) as address:
            env = {"HOURGLASS_CLUSTER": address}
            server = serving.enter_context(running_server(tmp_path, settle="1s", env=env))
            send_traces(server, checkout=6, home=4, base_ns=base_ns)
            wait_for_spans(server, server.sent_spans)
            _wait_for_report(server, traces=10, spans=server.sent_spans)
        # the scheduler and its worker are gone
        send_traces(server, checkout=6, home=4, base_ns=base_ns + 30_000 * MS)
        wait_for_spans(server, server.sent_spans)
        failed = _wait_for_failure(server)
        assert address in str(failed["last_error"]).splitlines()[0], failed["last_error"]
        with server.client() as client:
            assert client.get("/v1/recommendations").json()["traces_analyzed"] == 10
        with dask_cluster(tmp_path / "second", workers=1, port=port):
            later = _wait_for_report(server, traces=20, spans=server.sent_spans)
            _stop(server)
    _assert_same_recommendations(later, _cli_report(server.db))


def _serve_with_cluster(
    tmp_path: Path, address: str, *, flag: bool
) -> tuple[float, subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    args = ["--cluster", address] if flag else []
    if not flag:
        env["HOURGLASS_CLUSTER"] = address
    started = time.monotonic()
    result = subprocess.run(
        [*hourglass_executable(), "serve", "--db", str(tmp_path / "spans.duckdb"), "--host", "127.0.0.1",
         "--grpc-port", "0", "--http-port", "0", "--api-port", "0", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
    )  # fmt: skip
    return time.monotonic() - started, result


def test_an_unreachable_scheduler_stops_serve_at_start_in_one_line(tmp_path: Path) -> None:
    seconds, refused = _serve_with_cluster(tmp_path, "tcp://127.0.0.1:9", flag=True)
    assert refused.returncode == 1 and seconds < 10 + 5, (seconds, refused.stderr)  # + the CLI's start
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in lines[0], lines
    assert "listening" not in refused.stdout

    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        seconds, unanswered = _serve_with_cluster(tmp_path, address, flag=False)
    assert unanswered.returncode == 1 and seconds < 10 + 5, (seconds, unanswered.stderr)
    lines = unanswered.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach the Dask scheduler at {address} within 8 s: " in lines[0], lines
    assert not lines[0].endswith(": "), lines  # the cause is said
