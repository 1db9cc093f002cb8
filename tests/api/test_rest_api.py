"""The REST API over real HTTP: `hourglass serve` fed by the OpenTelemetry SDK's OTLP/gRPC exporter.

One server per module (bearer token on), 20 traces with three serialized calls under
``frontend · GET /checkout`` and 20 healthy traces whose calls already run in parallel.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import uvicorn

from hourglass.api.analysis_service import AnalysisService
from hourglass.api.app import create_app
from hourglass.api.settings import Settings
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.api.live_server import (
    SPANS_PER_TRACE,
    LiveServer,
    analysed_server,
    free_port,
    send_traces,
    wait_for_spans,
)
from tests.builders import TraceBuilder, spans_table

pytestmark = pytest.mark.timeout(180)

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with analysed_server(tmp_path_factory.mktemp("rest"), token=TOKEN, checkout=20, home=20) as srv:
        yield srv


def _serialized(report: dict) -> dict:
    recs = [
        r
        for r in report["recommendations"]
        if r["kind"] == "serialized_calls"
        and r["service"] == "frontend"
        and r["operation"] == "GET /checkout"
    ]
    assert len(recs) == 1, [(r["kind"], r["service"], r["operation"]) for r in report["recommendations"]]
    return recs[0]


def test_health_is_open_and_v1_needs_the_token(server: LiveServer) -> None:
    with server.client(auth=False) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        for path in ("/v1/stats", "/v1/recommendations", "/v1/services", "/"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert "Bearer" in response.headers["www-authenticate"]
        assert anonymous.post("/v1/analyses").status_code == 401
        wrong = anonymous.get("/v1/stats", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        # A browser can send the token as the Basic password.
        basic = anonymous.get("/v1/stats", auth=("anyone", TOKEN))
        assert basic.status_code == 200
        assert anonymous.get("/openapi.json").status_code == 200


def test_stats_count_what_the_exporter_sent(server: LiveServer) -> None:
    with server.client() as client:
        stats = client.get("/v1/stats").json()
    assert stats["spans"] >= 40 * SPANS_PER_TRACE
    assert stats["traces"] >= 40
    assert stats["analysis"]["state"] in ("ready", "running")
    assert stats["analysis"]["runs"] >= 1


def test_recommendations_find_the_serialized_calls(server: LiveServer) -> None:
    with server.client() as client:
        report = client.get("/v1/recommendations").json()
    assert report["schema"] == "hourglass.report/v1"
    assert report["traces_analyzed"] >= 40
    assert report["spans_analyzed"] >= 40 * SPANS_PER_TRACE
    rec = _serialized(report)
    assert rec["category"] == "parallelization"
    assert rec["traces_affected"] == 20
    # Three 30 ms calls one after another; run together the root ends ~62 ms sooner.
    assert 40 <= rec["impact"]["saved_ms_p50"] <= 80, rec["impact"]
    assert set(rec["evidence"]["trace_ids"]) <= set(server.sent_traces)
    assert rec["title"] and rec["summary"] and rec["actions"]
    # The healthy, already-parallel GET /home is not reported as serialized.
    assert not any(
        r["operation"] == "GET /home" and r["kind"] == "serialized_calls" for r in report["recommendations"]
    )
    ranks = [r["rank"] for r in report["recommendations"]]
    assert ranks == sorted(ranks)


def test_recommendations_carry_a_design_and_a_workstream_plan(server: LiveServer) -> None:
    """Issue 13 over the real server: the store's resources give the language (the OpenTelemetry
    Python SDK says python), the exemplar gives the sequence diagrams."""
    with server.client() as client:
        report = client.get("/v1/recommendations").json()
        schema = client.get("/openapi.json").json()
    rec = _serialized(report)
    design = rec["design"]
    assert design["pattern"]["name"].startswith("scatter-gather")
    assert design["pseudocode"]["language"] == "python" and "asyncio" in design["pseudocode"]["code"]
    before, after = design["sequence"]["before"], design["sequence"]["after"]
    assert before.startswith("sequenceDiagram") and "par 3 calls at the same time" in after
    assert design["sequence"]["trace_id"] in rec["evidence"]["trace_ids"]
    ws = next(w for w in report["workstreams"] if rec["id"] in w["recommendations"])
    assert ws["service"] == rec["service"] and ws["impact"]["saved_ms_p50"] is not None
    assert {"Design", "Workstream"} <= set(schema["components"]["schemas"])


def _quiet(client: httpx.Client, timeout: float = 30.0) -> None:
    """Until no analysis runs and none has started for a second: the background loop may still
    run a round of its own right after the fixture's POST (it saw the spans arrive before it)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        analysis = client.get("/v1/stats").json()["analysis"]
        now = (analysis["state"], analysis["generation"])
        if now == last and now[0] == "ready":
            return
        last = now
        time.sleep(1.0)
    raise AssertionError(f"the analysis did not settle within {timeout} s: {last}")


def test_etag_answers_not_modified_until_the_next_run(server: LiveServer) -> None:
    with server.client() as client:
        _quiet(client)
        first = client.get("/v1/recommendations")
        etag = first.headers["etag"]
        again = client.get("/v1/recommendations", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert client.get("/v1/recommendations", headers={"If-None-Match": '"other"'}).status_code == 200
        assert client.post("/v1/analyses").status_code == 200
        fresh = client.get("/v1/recommendations", headers={"If-None-Match": etag})
        assert fresh.status_code == 200 and fresh.headers["etag"] != etag


def test_recommendation_filters(server: LiveServer) -> None:
    with server.client() as client:
        full = client.get("/v1/recommendations").json()["recommendations"]
        by_kind = client.get("/v1/recommendations", params={"kind": "serialized_calls"}).json()[
            "recommendations"
        ]
        assert by_kind and all(r["kind"] == "serialized_calls" for r in by_kind)
        assert (
            client.get("/v1/recommendations", params={"kind": "no_such_kind"}).json()["recommendations"] == []
        )
        both = client.get("/v1/recommendations", params={"kind": "no_such_kind,serialized_calls"}).json()
        assert [r["id"] for r in both["recommendations"]] == [r["id"] for r in by_kind]
        by_service = client.get("/v1/recommendations", params={"service": "frontend"}).json()[
            "recommendations"
        ]
        assert _serialized({"recommendations": by_service})
        assert client.get("/v1/recommendations", params={"service": "nobody"}).json()["recommendations"] == []
        par = client.get("/v1/recommendations", params={"category": "parallelization"}).json()[
            "recommendations"
        ]
        assert all(r["category"] == "parallelization" for r in par)
        assert client.get("/v1/recommendations", params={"category": "bogus"}).status_code == 422
        limited = client.get("/v1/recommendations", params={"limit": 1}).json()["recommendations"]
        assert [r["id"] for r in limited] == [r["id"] for r in full[:1]]
        assert client.get("/v1/recommendations", params={"limit": 0}).status_code == 422
        # `since` analyses the window: the spans were sent ~2 minutes back in time.
        recent = client.get("/v1/recommendations", params={"since": "1h"}).json()
        assert _serialized(recent)["traces_affected"] == 20
        future = client.get("/v1/recommendations", params={"since": "2999-01-01T00:00:00Z"}).json()
        assert future["recommendations"] == []
        bad = client.get("/v1/recommendations", params={"since": "yesterday-ish"})
        assert bad.status_code == 422 and "since" in bad.text


def test_recommendation_detail_has_exemplar_traces(server: LiveServer) -> None:
    with server.client() as client:
        rec = _serialized(client.get("/v1/recommendations").json())
        detail = client.get(f"/v1/recommendations/{rec['id']}").json()
        assert detail["id"] == rec["id"]
        assert detail["exemplars"], detail
        exemplar = detail["exemplars"][0]
        assert exemplar["trace_id"] in server.sent_traces
        assert exemplar["span_count"] == SPANS_PER_TRACE
        root = next(s for s in exemplar["spans"] if s["parent_span_id"] is None)
        assert root["name"] == "GET /checkout"
        assert exemplar["critical_path"][0] == root["span_id"]
        assert any(f["id"] == rec["id"] for f in exemplar["findings"])
        assert client.get("/v1/recommendations/serialized_calls-0000000000000000").status_code == 404
        assert client.get("/v1/recommendations/bad%20id!").status_code == 422


def test_trace_endpoint(server: LiveServer) -> None:
    trace_id = server.sent_traces[0]
    with server.client() as client:
        body = client.get(f"/v1/traces/{trace_id}").json()
        assert body["trace_id"] == trace_id
        assert body["span_count"] == SPANS_PER_TRACE
        assert sorted(body["services"]) == ["cart", "frontend", "prices", "users"]
        names = {s["name"] for s in body["spans"]}
        assert {"GET /checkout", "GET /users", "GET /cart", "GET /prices"} <= names
        on_path = {s["span_id"] for s in body["spans"] if s["on_critical_path"]}
        assert on_path == set(body["critical_path"])
        # Serialized calls are all on the critical path: each one sets when the next can start.
        client_calls = [s for s in body["spans"] if s["kind"] == "client"]
        assert len(client_calls) == 3 and all(s["on_critical_path"] for s in client_calls)
        assert any(f["kind"] == "serialized_calls" for f in body["findings"])
        # Upper-case ids are the same trace.
        assert client.get(f"/v1/traces/{trace_id.upper()}").json()["trace_id"] == trace_id
        # Malformed → 422, unknown → 404, never a 500.
        for bad in ("xyz", "0" * 33, "g" * 32, "%20", "1234-5678"):
            response = client.get(f"/v1/traces/{bad}")
            assert response.status_code == 422, (bad, response.status_code, response.text)
        unknown = client.get("/v1/traces/" + "ab" * 16)
        assert unknown.status_code == 404 and "not in the store" in unknown.json()["detail"]


def test_services(server: LiveServer) -> None:
    with server.client() as client:
        services = {s["name"]: s["recommendations"] for s in client.get("/v1/services").json()["services"]}
    assert {"frontend", "users", "cart", "prices"} <= set(services)
    assert services["frontend"] >= 1


def test_html_report_page(server: LiveServer) -> None:
    with server.client() as client:
        page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<svg class="waterfall"' in page.text
    assert "GET /checkout" in page.text
    assert "After (re-timed)" in page.text


def test_background_analysis_picks_up_new_traces(server: LiveServer) -> None:
    """No POST: new spans settle (0.5 s) and the background thread re-analyses on its own."""
    with server.client() as client:
        before = client.get("/v1/stats").json()
        send_traces(server, checkout=5, home=0)
        expected = before["spans"] + 5 * SPANS_PER_TRACE
        wait_for_spans(server, expected)
        deadline = time.monotonic() + 60
        while True:
            stats = client.get("/v1/stats").json()
            if stats["analysis"]["spans_at_last_run"] == expected and stats["analysis"]["state"] == "ready":
                break
            assert time.monotonic() < deadline, stats
            time.sleep(0.2)
        assert stats["analysis"]["generation"] > before["analysis"]["generation"]
        rec = _serialized(client.get("/v1/recommendations").json())
        assert rec["traces_affected"] == 25
    assert Path(server.db).exists()


def test_post_analyses_reruns_now(server: LiveServer) -> None:
    with server.client() as client:
        generation = client.get("/v1/stats").json()["analysis"]["generation"]
        run = client.post("/v1/analyses").json()
        assert run["status"] == "completed"
        assert run["generation"] > generation
        assert run["recommendations"] >= 1
        assert run["spans_analyzed"] >= 40 * SPANS_PER_TRACE
        accepted = client.post("/v1/analyses", params={"wait": "false"})
        assert accepted.status_code == 202 and accepted.json()["status"] == "accepted"


class _ScanFailsStore(DuckDBSpanStore):
    """A store whose reads for the analysis fail (a broken disk): the API must say so, not hang."""

    def scan(self, **kwargs: Any) -> pa.Table:
        raise OSError("disk on fire")


@contextlib.contextmanager
def _in_process(store: DuckDBSpanStore) -> Iterator[httpx.Client]:
    """create_app in-process under uvicorn on a free port (real HTTP), no token."""
    port = free_port()
    app = create_app(store, settings=Settings(api_token=None, settle_seconds=0.2), first_report_timeout=20)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(30)


def test_failed_analysis_is_reported_not_hidden() -> None:
    """Over a store whose scans fail: the API says so at once, with the reason."""
    store = _ScanFailsStore(":memory:")
    try:
        with _in_process(store) as client:
            assert client.get("/healthz").status_code == 200
            started = time.monotonic()
            response = client.get("/v1/recommendations")
            assert response.status_code == 503, response.text
            assert "disk on fire" in response.json()["detail"]
            assert time.monotonic() - started < 15  # the failed first run ends the wait
            assert response.headers["retry-after"]
            stats = client.get("/v1/stats").json()
            assert stats["analysis"]["state"] == "failed"
            assert "disk on fire" in stats["analysis"]["last_error"]
            assert client.get("/").status_code == 503
            run = client.post("/v1/analyses")
            assert run.status_code == 500 and "disk on fire" in run.json()["detail"]
    finally:
        store.close()


def test_corrupt_traces_are_served_not_500() -> None:
    """Parent cycles, self-parents, orphans and a 5,000-span trace: the trace view answers 200."""
    cyclic = TraceBuilder(service="svc")
    cyclic.span("a", start_ms=0, dur_ms=10, span_id="a" * 16, parent="b" * 16)
    cyclic.span("b", start_ms=1, dur_ms=5, span_id="b" * 16, parent="a" * 16)
    cyclic.span("self", start_ms=2, dur_ms=1, span_id="c" * 16, parent="c" * 16)
    cyclic.span("orphan", start_ms=3, dur_ms=1, span_id="d" * 16, parent="e" * 16)
    big = TraceBuilder(service="svc")
    root = big.span("root", start_ms=0, dur_ms=6000, kind=KIND_SERVER)
    for i in range(4999):
        big.span(f"step {i}", parent=root, start_ms=i, dur_ms=1, kind=KIND_CLIENT)
    store = DuckDBSpanStore(":memory:")
    store.write(spans_table([cyclic, big]))
    try:
        with _in_process(store) as client:
            for builder, count in ((cyclic, 4), (big, 5000)):
                response = client.get(f"/v1/traces/{builder.trace_id}")
                assert response.status_code == 200, response.text[:500]
                body = response.json()
                assert body["span_count"] == count
                assert body["critical_path"] or body["analysis_error"]
            assert client.get("/v1/recommendations").status_code == 200
            page = client.get("/")
            assert page.status_code == 200
    finally:
        store.close()


def test_a_slow_analysis_is_rerun_at_most_a_tenth_of_the_time() -> None:
    # a 30 s analysis of a big store re-run every 60 s would compete with ingest half the time
    service = AnalysisService(
        DuckDBSpanStore(":memory:"), settle_seconds=10.0, writer=None, render_html=False
    )
    assert service.stale_after_seconds() == 60.0
    service._last_duration_s = 0.5
    assert service.stale_after_seconds() == 60.0
    service._last_duration_s = 30.0
    assert service.stale_after_seconds() == 300.0
    service.store.close()


def test_continuous_ingest_still_gets_fresh_reports(temp_in_tmp_path: Path) -> None:
    """Spans arriving every 100 ms never settle (settle 1 s); the staleness bound (2 s) re-runs anyway.
    Stopped, the analysis in this process (no worker) closes its incremental state: a store in
    memory's state kept its rows in a temporary folder, left behind at every stop."""
    tmp_path = temp_in_tmp_path
    store = DuckDBSpanStore(":memory:")
    service = AnalysisService(
        store,
        settle_seconds=1.0,
        max_staleness_seconds=2.0,
        poll_seconds=0.1,
        render_html=False,
        writer=None,  # (a writer object keeps the analysis in this process)
    )
    stop = threading.Event()

    def ingest() -> None:
        while not stop.is_set():
            b = TraceBuilder(service="svc")
            root = b.span("GET /", start_ms=0, dur_ms=10, kind=KIND_SERVER)
            b.span("call", parent=root, start_ms=1, dur_ms=5, kind=KIND_CLIENT)
            store.write(spans_table(b))
            stop.wait(0.1)

    writer = threading.Thread(target=ingest, daemon=True)
    writer.start()
    service.start()
    try:
        first = service.wait_first(30)
        assert first is not None
        deadline = time.monotonic() + 30
        while (service.snapshot or first).generation < first.generation + 2:
            assert time.monotonic() < deadline, service.status()
            time.sleep(0.1)
        latest = service.snapshot
        assert latest is not None and latest.spans_in_store > first.spans_in_store
        # whole-store runs wait for staleness; incremental rounds run as traces settle
        assert latest.reason in ("stale", "settling")
        # the state's folder while it runs (the test's own check that it looks in the right place)
        assert list(tmp_path.glob("hourglass-incremental-*"))
    finally:
        stop.set()
        writer.join(5)
        service.stop()
        store.close()
    assert not list(tmp_path.glob("hourglass-incremental-*"))


def test_a_worker_stopped_in_the_middle_of_a_round_leaves_no_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's analysis worker, stopped while it extracts a large batch of a store in memory,
    removes its incremental state's temporary folder on the way out (it left one per stop in
    the system's temporary folder); stopped between rounds, it always did."""
    from bench.analysis import generate_spans

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # (the worker is spawned: it reads it afresh)
    store = DuckDBSpanStore(":memory:")
    b = TraceBuilder(service="svc")
    b.span("call", parent=b.span("GET /", start_ms=0, dur_ms=10, kind=KIND_SERVER), start_ms=1, dur_ms=5)
    store.write(spans_table(b))
    service = AnalysisService(store, settle_seconds=0.2, poll_seconds=0.05, render_html=False)
    service.start()
    try:
        assert service.wait_first(30) is not None
        assert list(tmp_path.glob("hourglass-incremental-*"))  # the worker's state, in its folder
        # a round of seconds: 100k spans of the last minutes, received now
        burst = generate_spans(100_000)
        shift = time.time_ns() - 60 * 10**9 - pc.min(burst["start_ns"]).as_py()
        for column in ("start_ns", "end_ns"):
            burst = burst.set_column(
                burst.schema.get_field_index(column), column, pc.add(burst[column], shift)
            )
        received = pa.array([time.time_ns()] * burst.num_rows, pa.int64())
        store.write(burst.set_column(burst.schema.get_field_index("ingested_ns"), "ingested_ns", received))
        deadline = time.monotonic() + 30
        seen: dict[str, float] = {}  # a round's start -> when this test first saw it running
        while True:  # until a round has run for 0.3 s: the burst's (the others take milliseconds)
            assert time.monotonic() < deadline, service.status()
            running = service.status()["running_since"]
            if running is not None and time.monotonic() - seen.setdefault(running, time.monotonic()) > 0.3:
                break
            time.sleep(0.02)
    finally:
        service.stop()
        store.close()
    assert not list(tmp_path.glob("hourglass-incremental-*"))


def test_background_runs_asked_for_over_rest_are_bounded(tmp_path: Path) -> None:
    """A burst of POST /v1/analyses?wait=false starts one run and queues one more, not a thread
    per request: the queued run starts after every request of the burst, so it covers them all."""
    from fastapi.testclient import TestClient

    store = DuckDBSpanStore(str(tmp_path / "burst.duckdb"))
    service = AnalysisService(store, isolate=False, writer=None)
    release = threading.Event()
    calls: list[str] = []

    def slow_run_now(reason: str = "requested") -> Any:
        calls.append(reason)
        release.wait(10)

    service.run_now = slow_run_now  # type: ignore[method-assign]
    try:
        app = create_app(store, analysis=service, start_analysis=False, settings=Settings())
        with TestClient(app) as client:
            for _ in range(20):
                assert client.post("/v1/analyses", params={"wait": "false"}).status_code == 202
            requested = [t for t in threading.enumerate() if t.name == "hourglass-analysis-request"]
            assert 1 <= len(requested) <= 2
            release.set()
            deadline = time.monotonic() + 10
            while len(calls) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert len(calls) == 2
    finally:
        release.set()
        store.close()


def test_a_scheduled_run_is_skipped_when_a_run_meanwhile_covered_what_it_saw(tmp_path: Path) -> None:
    """The background loop asks for a round because the store changed; when a run asked for over
    REST (POST /v1/analyses) took the lock first and covered that change, the loop's round returns
    that report instead of running again; a change it did not cover still runs."""

    def trace() -> TraceBuilder:  # received now (its ingest time is its base)
        b = TraceBuilder(service="svc", base_ns=time.time_ns())
        root = b.span("GET /", start_ms=0, dur_ms=10, kind=KIND_SERVER)
        b.span("call", parent=root, start_ms=1, dur_ms=5, kind=KIND_CLIENT)
        return b

    store = DuckDBSpanStore(str(tmp_path / "seen.duckdb"))
    service = AnalysisService(store, settle_seconds=0.0, isolate=False, writer=None, render_html=False)
    try:
        store.write(spans_table([trace(), trace()]))
        seen = service._change_marker()  # what the loop saw before the requested run
        requested = service.run_now("requested")
        assert requested.change_marker == seen
        again = service.run_now("settled", seen_marker=seen)
        assert again is requested and again.generation == requested.generation
        store.write(spans_table(trace()))
        newer = service.run_now("settled", seen_marker=service._change_marker())
        assert newer.generation == requested.generation + 1
        assert newer.report["traces_analyzed"] == 3
    finally:
        service.stop()
        store.close()


def test_explain_adds_near_misses_from_the_cached_run(server: LiveServer) -> None:
    """``?explain=true`` (the real `hourglass serve`, analysis in its worker process): the same
    report plus ``near_misses``; without it the report keeps its shape."""
    with server.client() as client:
        plain = client.get("/v1/recommendations")
        explained = client.get("/v1/recommendations", params={"explain": "true"})
        filtered = client.get("/v1/recommendations", params={"explain": "true", "kind": "serialized_calls"})
    assert plain.status_code == explained.status_code == filtered.status_code == 200
    body, with_misses = plain.json(), explained.json()
    assert "near_misses" not in body and "near_misses_omitted" not in body
    assert isinstance(with_misses["near_misses"], list) and isinstance(
        with_misses["near_misses_omitted"], int
    )
    if plain.headers["x-hourglass-generation"] == explained.headers["x-hourglass-generation"]:
        assert {k: v for k, v in with_misses.items() if not k.startswith("near_misses")} == body
    assert [r["kind"] for r in filtered.json()["recommendations"]] == ["serialized_calls"]
    assert "near_misses" in filtered.json()


def test_explain_lists_what_was_seen_and_dropped_over_http() -> None:
    """An uncontended lock and a fast-failing call a fallback contains: nothing to report, and
    ``?explain=true`` says why."""
    traces = []
    for _ in range(3):
        b = TraceBuilder(service="customer")
        root = b.span("GET /customer", start_ms=0, dur_ms=40, kind=KIND_SERVER, status_code=1)
        b.span(
            "SQL SELECT", parent=root, start_ms=1, dur_ms=30, kind=KIND_CLIENT, db_system="mysql",
            events=[("Waiting for lock behind 1 transactions", 1.0, {}), ("Acquired lock", 1.3, {})],
        )  # fmt: skip
        b.span("GET ads", parent=root, start_ms=2, dur_ms=3, kind=KIND_CLIENT, peer="ads", status_code=2)
        traces.append(b)
    store = DuckDBSpanStore(":memory:")
    store.write(spans_table(traces))
    try:
        with _in_process(store) as client:
            plain = client.get("/v1/recommendations")
            explained = client.get("/v1/recommendations?explain=true")
    finally:
        store.close()
    assert plain.status_code == 200 and explained.status_code == 200, explained.text
    assert plain.json()["recommendations"] == [] and "near_misses" not in plain.json()
    misses = {m["kind"]: m for m in explained.json()["near_misses"]}
    assert set(misses) >= {"lock_contention", "error_propagation"}, misses
    assert misses["lock_contention"]["reason"].endswith("< 1 ms: uncontended")
    assert (
        misses["error_propagation"]["reason"]
        == "failures of ads GET ads contained in 3 traces: a fallback works"
    )
    assert misses["error_propagation"]["traces"] == 3 and len(misses["error_propagation"]["trace_ids"]) == 3
