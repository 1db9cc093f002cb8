"""What-if, an endpoint's critical path and the MCP server, as users and agents reach them:
the real `hourglass serve` over HTTP (REST and streamable-HTTP MCP, with and without the token),
the CLI as processes over a store of the demo traces, and the real `mcp` client starting
`hourglass mcp` over stdio and calling every tool."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.api.live_server import (
    LiveServer,
    analysed_server,
    hourglass_executable,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample-traces"
TOKEN = "whatif-token"
LEDGER_TRANSFERS = "POST /accounts/{account_id}/transfers"
LEDGER_ENDPOINT = ("--service", "ledger", "--operation", LEDGER_TRANSFERS)

pytestmark = pytest.mark.timeout(300)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def hourglass(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*hourglass_executable(), *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- REST and MCP over HTTP -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with analysed_server(tmp_path_factory.mktemp("whatif"), token=TOKEN, checkout=10, home=5) as srv:
        yield srv


def test_whatif_over_rest(server: LiveServer) -> None:
    with server.client(timeout=60) as client:
        report = client.get("/v1/recommendations").json()
        rec = next(r for r in report["recommendations"] if r["kind"] == "serialized_calls")
        out = client.post("/v1/whatif", json={"changes": [{"recommendation": rec["id"]}]})
        assert out.status_code == 200, out.text
        body = out.json()
        assert body["traces"] == 15
        assert body["saved_ms_total"] == pytest.approx(rec["impact"]["saved_ms_total"], rel=0.01)

        # the users backend with no time of its own: each checkout waits 28 ms less for it; the
        # parallel /home still waits as long for the two other calls
        speedup = {"speedup": {"service": "users", "operation": "GET /users", "factor": 0}}
        body = client.post("/v1/whatif", json={"changes": [speedup]}).json()
        by_endpoint = {e["operation"]: e for e in body["endpoints"]}
        checkout, home = by_endpoint["GET /checkout"], by_endpoint["GET /home"]
        assert checkout["traces"] == 10 and home["traces"] == 5
        assert checkout["before_ms_p50"] - checkout["after_ms_p50"] == pytest.approx(28.0, abs=0.01)
        assert home["after_ms_p50"] == home["before_ms_p50"]
        assert body["saved_ms_total"] == pytest.approx(280.0, abs=0.1)
        assert body["changes"][0]["spans"] == 15

        only = client.post("/v1/whatif", json={"changes": [speedup], "operation": "GET /home"}).json()
        assert only["traces"] == 5 and only["saved_ms_total"] == 0.0

        for payload, reason in (
            ({"changes": []}, "empty"),
            (
                {"changes": [{"speedup": {"service": "users", "operation": "GET /users", "factor": -1}}]},
                "between 0",
            ),
            ({"changes": [{"speedup": {"service": "users", "operation": "nope", "factor": 0.5}}]}, "no span"),
            ({"changes": [{"recommendation": "serialized_calls-0000000000000000"}]}, "current report"),
            ({"changes": [speedup], "since": "yesterday-ish"}, "since"),
        ):
            answer = client.post("/v1/whatif", json=payload)
            assert answer.status_code == 422, (payload, answer.text)
            assert reason in json.dumps(answer.json()["detail"]), answer.text
        assert (
            client.post("/v1/whatif", content=b"{", headers={"content-type": "application/json"}).status_code
            == 422
        )
    with server.client(auth=False) as anonymous:
        assert anonymous.post("/v1/whatif", json={"changes": [speedup]}).status_code == 401


def test_critical_path_over_rest(server: LiveServer) -> None:
    with server.client(timeout=60) as client:
        answer = client.get("/v1/critical-path", params={"service": "frontend", "operation": "GET /checkout"})
        assert answer.status_code == 200, answer.text
        path = answer.json()
        assert path["traces"] == 10
        assert sum(o["share"] for o in path["operations"]) == pytest.approx(1.0, abs=1e-3)
        # the three backends' server spans are on the path, one after another
        names = {o["operation"] for o in path["operations"]}
        assert {"GET /users", "GET /cart", "GET /prices"} <= names
        assert path["paths"][0]["traces"] == 10
        missing = client.get("/v1/critical-path", params={"service": "frontend", "operation": "GET /nope"})
        assert missing.status_code == 404 and "GET /checkout" in missing.json()["detail"]
        assert client.get("/v1/critical-path", params={"service": "frontend"}).status_code == 422


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "whole-store"])
def test_a_window_larger_than_the_memory_budget_is_asked_in_partitions(
    tmp_path: Path, incremental: bool
) -> None:
    """A what-if or critical path builds the window's spans in serve's own process: one that the
    memory budget cannot hold at once (it would take the server and its ingest down at staging
    sizes) is asked in partitions of whole traces, one context at a time, and answers as the CLI
    does at once; a recommendation change over it applies the finding decided over the whole
    window (serve keeps the report, not the findings: decided again over the incremental
    analysis' stored rows, or over the window read in partitions without it), as the CLI does;
    one that fits is answered at once."""
    import time

    from tests.api.live_server import MS, SPANS_PER_TRACE, running_server, send_traces, wait_for_spans

    budget = 200 * 2**20 + 20 * 2_000 + 1_000  # 20 spans at once (hourglass.analysis.planning)
    speedup = {"speedup": {"service": "users", "operation": "GET /users", "factor": 0.5}}
    path = {"service": "frontend", "operation": "GET /checkout"}
    env = {"HOURGLASS_MEMORY_BUDGET": str(budget), "HOURGLASS_INCREMENTAL_ANALYSIS": str(incremental).lower()}
    if not incremental:  # (the whole-store analysis in partitions of its own: no plan fits this budget)
        env["HOURGLASS_SERVE_PARTITIONS"] = "2"
    with running_server(tmp_path, token=TOKEN, env=env) as server:
        send_traces(server, checkout=4, home=0, base_ns=time.time_ns() - 2 * 3600 * 1_000 * MS)
        send_traces(server, checkout=1, home=0, base_ns=time.time_ns() - 60_000 * MS)
        wait_for_spans(server, 5 * SPANS_PER_TRACE)
        with server.client(timeout=60) as client:
            whole = client.post("/v1/whatif", json={"changes": [speedup]})
            assert whole.status_code == 200, whole.text
            assert whole.json()["traces"] == 5
            whole_path = client.get("/v1/critical-path", params=path)
            assert whole_path.status_code == 200, whole_path.text
            missing = client.get("/v1/critical-path", params={**path, "operation": "GET /nope"})
            assert missing.status_code == 404 and "GET /checkout" in missing.json()["detail"]
            deadline = time.monotonic() + 60
            # (a report over all five traces: one made before the fifth settled has its finding
            # over four, and the what-if of it then differs from the CLI's over five)
            while (report := client.get("/v1/recommendations").json())["traces_analyzed"] < 5 or not report[
                "recommendations"
            ]:
                assert time.monotonic() < deadline, "no recommendation over the five traces"
                time.sleep(0.3)
            rec = report["recommendations"][0]["id"]
            applied = client.post("/v1/whatif", json={"changes": [{"recommendation": rec}]})
            assert applied.status_code == 200, applied.text
            assert applied.json()["traces_changed"] > 0 and applied.json()["saved_ms_total"] > 0
            applied_since = client.post(
                "/v1/whatif", json={"changes": [{"recommendation": rec}], "since": "3h"}
            )
            assert applied_since.status_code == 200, applied_since.text
            unknown = client.post("/v1/whatif", json={"changes": [{"recommendation": rec[:-4] + "0000"}]})
            assert unknown.status_code == 422 and "current report" in unknown.text, unknown.text
            recent = client.post("/v1/whatif", json={"changes": [speedup], "since": "10m"})
            assert recent.status_code == 200, recent.text
            assert recent.json()["traces"] == 1
            assert client.get("/v1/critical-path", params={**path, "since": "10m"}).json()["traces"] == 1
    # the same questions at once (the default budget), by the CLI over the same store
    cli = hourglass("whatif", "--db", str(server.db), "--speedup", "users:GET /users=0.5", "--format", "json")
    assert cli.returncode == 0, cli.stderr
    assert whole.json() == json.loads(cli.stdout)
    for answer, since in ((applied, ()), (applied_since, ("--since", "3h"))):
        cli = hourglass("whatif", "--db", str(server.db), "--recommendation", rec, *since, "--format", "json")
        assert cli.returncode == 0, cli.stderr
        assert answer.json() == json.loads(cli.stdout)
    cli = hourglass(
        "critical-path",
        "--db",
        str(server.db),
        "--service",
        "frontend",
        "--operation",
        "GET /checkout",
        "--format",
        "json",
    )
    assert cli.returncode == 0, cli.stderr
    assert whole_path.json() == json.loads(cli.stdout)


async def _mcp_over_http(url: str, headers: dict[str, str]) -> Any:
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await session.call_tool("list_recommendations", {"kind": "serialized_calls"})


def test_mcp_over_streamable_http_needs_the_token(server: LiveServer) -> None:
    result = anyio.run(_mcp_over_http, f"{server.base_url}/mcp", {"Authorization": f"Bearer {TOKEN}"})
    assert not result.is_error, result.content
    recs = result.structured_content["recommendations"]
    assert [r["kind"] for r in recs] == ["serialized_calls"] and recs[0]["operation"] == "GET /checkout"
    refused = httpx.post(
        f"{server.base_url}/mcp",
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Accept": "application/json, text/event-stream"},
    )
    assert refused.status_code == 401
    with pytest.raises(Exception):  # noqa: B017 -- the SDK wraps the 401 in its own error types
        anyio.run(_mcp_over_http, f"{server.base_url}/mcp", {"Authorization": "Bearer wrong"})


# -- the CLI and stdio MCP over a store of the demo traces -------------------------------------


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("demo-store") / "demo.duckdb"
    files = sorted(str(p) for p in SAMPLES.glob("*.otlp.jsonl"))
    done = hourglass("import", "--db", str(db), *files)
    assert done.returncode == 0, done.stderr
    return db


def test_the_cli_asks_a_store_window_larger_than_the_memory_budget_in_partitions(demo_store: Path) -> None:
    """`hourglass whatif` and `critical-path` hold a context of the window's spans: a store's
    window larger than the memory budget holds is asked in partitions of whole traces, one at a
    time, with the answer at once (the demo store: 3,408 spans, 1,000 at once); trace files that
    large too, through a temporary store. A what-if of every trace reads only the traces its
    change touches, and an endpoint's question the traces with a span of it. ``--partitions``
    asks the window in that many, and a recommendation change then takes its finding as
    ``analyze`` decides it over every trace."""
    budget = 200 * 2**20 + 1_000 * 2_000  # 1,000 spans at once (hourglass.analysis.planning)
    env = {**_env(), "HOURGLASS_MEMORY_BUDGET": str(budget)}
    speedup = ("--speedup", "ledger:lock.acquire ledger.journal=0.5")
    endpoint = ("--service", "ledger", "--operation", LEDGER_TRANSFERS, "--format", "json")

    def run(*args: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*hourglass_executable(), *args],
            cwd=ROOT,
            env=environment or _env(),
            capture_output=True,
            text=True,
            timeout=120,
        )

    answered: dict[tuple[str, ...], subprocess.CompletedProcess[str]] = {}
    for args, how in (
        # a what-if of every trace: only those with a span of the change are read, the others
        # are known by their roots (DuckDBSpanStore.window_roots); with --partitions, the window's
        (
            ("whatif", "--db", str(demo_store), *speedup, "--format", "json"),
            "re-timed the 48 traces the changes touch; the other 376 keep their roots' durations",
        ),
        (
            ("whatif", "--db", str(demo_store), *speedup, "--format", "json", "--partitions", "5"),
            "asked in 5 partitions of whole traces",
        ),
        # an endpoint's path: over the traces with a span of it only (read by their ids)
        (
            ("critical-path", "--db", str(demo_store), *endpoint),
            f"asked over the 48 traces with a span ledger:{LEDGER_TRANSFERS} (192 spans)",
        ),
        (("critical-path", "--db", str(demo_store), *endpoint, "--partitions", "5"), "asked in 5 partitions"),
        # a what-if of an endpoint's traces: the same
        (
            ("whatif", "--db", str(demo_store), *speedup, *endpoint),
            f"asked over the 48 traces with a span ledger:{LEDGER_TRANSFERS} (192 spans)",
        ),
    ):
        plain = args[: args.index("--partitions")] if "--partitions" in args else args
        at_once = answered[plain] = answered.get(plain) or run(*plain)  # (asked once for both)
        assert at_once.returncode == 0, at_once.stderr
        asked = run(*args, environment=env)
        assert asked.returncode == 0, asked.stderr
        assert how in asked.stderr, asked.stderr
        if "--partitions" not in args:
            assert "the store holds 3,408 spans, more than one context holds" in asked.stderr, asked.stderr
        assert json.loads(asked.stdout) == json.loads(at_once.stdout)

    # a --since window is counted as its read takes it: every row of each trace with a span in
    # it, not only the spans that start in it (a microsecond after the first span: its trace's
    # other spans are read too)
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.settings import iso_ns

    store = DuckDBSpanStore(str(demo_store), read_only=True)
    try:
        since_ns = (min(store.scan(columns=("start_ns",))["start_ns"].to_pylist()) // 1000 + 1) * 1000
        window, starting = store.window_rows(since_ns=since_ns), store.span_rows_since(since_ns)
    finally:
        store.close()
    assert starting < window
    windowed = run(
        "whatif", "--db", str(demo_store), *speedup, "--since", str(iso_ns(since_ns)), environment=env
    )
    assert windowed.returncode == 0, windowed.stderr
    assert f"the window holds {window:,} spans, more than one context holds" in windowed.stderr, (
        windowed.stderr
    )

    # trace files that large: written to a temporary store as they are read, asked in partitions,
    # the store removed after
    files = sorted(str(p) for p in SAMPLES.glob("*.otlp.jsonl"))
    tmp = demo_store.parent / "tmp"
    tmp.mkdir()
    at_once = run("whatif", *files, *speedup, "--format", "json")
    asked = run("whatif", *files, *speedup, "--format", "json", environment={**env, "TMPDIR": str(tmp)})
    assert asked.returncode == at_once.returncode == 0, asked.stderr
    assert "written to a temporary span store" in asked.stderr, asked.stderr
    assert "the files hold 3,408 spans, more than one context holds" in asked.stderr
    assert json.loads(asked.stdout) == json.loads(at_once.stdout)
    assert list(tmp.iterdir()) == []

    report = json.loads(run("analyze", "--db", str(demo_store), "--format", "json").stdout)
    lock = next(r for r in report["recommendations"] if r["kind"] == "lock_contention")
    changes = ("--recommendation", lock["id"], *speedup, "--format", "json")
    at_once = run("whatif", "--db", str(demo_store), *changes)
    asked = run("whatif", "--db", str(demo_store), "--partitions", "3", *changes)
    assert at_once.returncode == asked.returncode == 0, asked.stderr
    assert "asked in 3 partitions" in asked.stderr
    assert json.loads(asked.stdout) == json.loads(at_once.stdout)
    assert "the findings of lock_contention:" in asked.stderr  # (that detector alone)
    # a budget that holds no partition of the findings' run: said by the command asked
    asked = run("whatif", "--db", str(demo_store), *changes, environment=env)
    assert asked.returncode == 2 and asked.stderr.startswith("hourglass whatif: a memory budget of 0.20 GiB")
    # the endpoints, without --service: from one aggregation of the store's rows, as at once
    listed = [run("critical-path", "--db", str(demo_store), environment=e) for e in (None, env)]
    assert [r.returncode for r in listed] == [2, 2]
    lines = [[line for line in r.stderr.splitlines() if line.startswith("  --service")] for r in listed]
    assert lines[0] and lines[0] == lines[1], listed[1].stderr
    assert "its 424 traces counted by their roots (those of no plain root read)" in listed[1].stderr
    # an operation no trace is rooted at: none of the traces with a span of it is, so the
    # endpoints it is told to pick from come from the roots, not a pass over every span
    lock = ("--service", "ledger", "--operation", "lock.acquire ledger.journal")
    named = [run("critical-path", "--db", str(demo_store), *lock, environment=e) for e in (None, env)]
    assert [r.returncode for r in named] == [2, 2]
    assert named[0].stderr.splitlines()[-1] == named[1].stderr.splitlines()[-1], named[1].stderr
    assert "no trace has the root span ledger:lock.acquire ledger.journal (endpoints: " in named[1].stderr
    assert "counted by their roots" in named[1].stderr and "partitions" not in named[1].stderr
    # and a what-if of its traces: the window's refusal, its traces counted from the store's rows
    refused = [run("whatif", "--db", str(demo_store), *speedup, *lock, environment=e) for e in (None, env)]
    assert [r.returncode for r in refused] == [2, 2]
    assert refused[0].stderr == refused[1].stderr, refused[1].stderr  # (nothing asked in partitions)
    assert "no trace has a root span 'ledger/lock.acquire ledger.journal' in the window (424 traces" in (
        refused[1].stderr
    )


def test_the_cli_asks_an_endpoint_of_many_spans_from_a_split_of_its_own_traces(
    demo_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`critical-path --db` of an endpoint whose traces hold more spans than a few partitions do
    (but at most three quarters of the window) splits those traces alone into partition files
    and asks them as a window's partitions are, as serve does: the path the window at once
    gives, the files removed after. (The split's own memory is planned at ~272 MiB, more than a
    budget this small leaves: not counted here; nor is there room for worker processes, whose
    reading of partition files the window's own partitions test.)"""
    import tempfile

    from typer.testing import CliRunner

    from hourglass.analysis import partitions
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES, few_parts_spans
    from hourglass.cli import app
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    store = DuckDBSpanStore(str(demo_store), read_only=True)
    try:
        roots = store.window_roots(None, [])
        endpoints = roots.group_by(["root_service", "root_name"]).aggregate([]).to_pylist()
        sized = {
            (e["root_service"], e["root_name"]): store.endpoint_trace_ids(
                e["root_service"], e["root_name"], None, 10**9, 10**9
            )
            for e in endpoints
        }
        total = store.raw_row_count()
        (service, operation), (ids, spans) = max(sized.items(), key=lambda item: item[1][1])
        # a window from the middle second of the endpoint's traces: those with a span from then
        starts = store.scan(trace_ids=ids, columns=("start_ns",))["start_ns"].to_pylist()
        mid_ns = (min(starts) + max(starts)) // 2 // 10**9 * 10**9
        since_ids, since_spans = store.endpoint_trace_ids(service, operation, mid_ns, 10**9, 10**9)
        since_window = store.span_rows_since(mid_ns)
    finally:
        store.close()
    assert spans <= total * 3 // 4
    budget = PROCESS_BASE_BYTES + spans // 3 * PEAK_BYTES_PER_SPAN  # (a third of them at once)
    assert few_parts_spans(budget) < spans
    monkeypatch.setattr(partitions, "split_bytes", lambda spans, filtered=False: 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    asked = ["critical-path", "--db", str(demo_store), "--service", service, "--operation", operation]
    at_once = CliRunner().invoke(app, [*asked, "--format", "json"], env=_env())
    assert at_once.exit_code == 0, at_once.output
    env = {**_env(), "HOURGLASS_MEMORY_BUDGET": str(budget)}
    split = CliRunner().invoke(app, [*asked, "--format", "json"], env=env)
    assert split.exit_code == 0, split.output
    assert f"traces with a span {service}:{operation} hold {spans:,} spans" in split.stderr, split.stderr
    assert json.loads(split.stdout) == json.loads(at_once.stdout)
    assert not list(tmp_path.glob("hourglass-*"))  # (the split's files removed)
    # with --since: the window's traces with a span of it split whole, the window selected as read
    import datetime

    mid = datetime.datetime.fromtimestamp(mid_ns / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    since_budget = PROCESS_BASE_BYTES + since_spans // 3 * PEAK_BYTES_PER_SPAN
    assert few_parts_spans(since_budget) < since_spans <= since_window * 3 // 4 < total
    windowed = [*asked, "--since", mid, "--format", "json"]
    at_once_since = CliRunner().invoke(app, windowed, env=_env())
    since_env = {**_env(), "HOURGLASS_MEMORY_BUDGET": str(since_budget)}
    split_since = CliRunner().invoke(app, windowed, env=since_env)
    assert at_once_since.exit_code == split_since.exit_code == 0, split_since.output
    told = f"the {len(since_ids):,} traces with a span {service}:{operation} hold {since_spans:,} spans"
    assert told in split_since.stderr, split_since.stderr
    assert json.loads(split_since.stdout) == json.loads(at_once_since.stdout) != json.loads(at_once.stdout)
    # a what-if of every trace that touches those traces: the same split of them
    speedup = [
        "whatif",
        "--db",
        str(demo_store),
        "--speedup",
        f"{service}:{operation}=0.5",
        "--format",
        "json",
    ]
    at_once = CliRunner().invoke(app, speedup, env=_env())
    assert at_once.exit_code == 0, at_once.output
    split = CliRunner().invoke(app, speedup, env=env)
    assert split.exit_code == 0, split.output
    assert f"the {len(ids):,} traces the changes touch hold {spans:,} spans" in split.stderr, split.stderr
    assert json.loads(split.stdout) == json.loads(at_once.stdout)
    assert not list(tmp_path.glob("hourglass-*"))
    # a what-if of the traces rooted there: the same split of them
    rooted = [*speedup, "--service", service, "--operation", operation]
    at_once_rooted = CliRunner().invoke(app, rooted, env=_env())
    split = CliRunner().invoke(app, rooted, env=env)
    assert at_once_rooted.exit_code == split.exit_code == 0, split.output
    assert f"the {len(ids):,} traces with a span {service}:{operation} hold {spans:,} spans" in split.stderr
    assert json.loads(split.stdout) == json.loads(at_once_rooted.stdout)
    # a split that fails (a full disk): each partition of those traces alone is read from the
    # store (the others' share is the roots': read twice, they would count twice)
    with monkeypatch.context() as failing:

        def full(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        failing.setattr(partitions, "split_store", full)
        scanned = CliRunner().invoke(app, speedup, env=env)
    assert scanned.exit_code == 0, scanned.output
    assert "splitting those traces into partition files failed" in scanned.stderr, scanned.stderr
    assert json.loads(scanned.stdout) == json.loads(at_once.stdout)


def test_an_operation_of_most_traces_that_is_no_root_is_refused_without_a_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operation in every trace but the root of none (an audit call under every request):
    its traces are the whole window, too many to read by their ids, so before, `critical-path`
    and `whatif --service/--operation` made a pass over every span of the window only to refuse.
    Now the store's rows say it first — no span of it without a parent, and none of the traces
    of no plain root is rooted there — and the refusal is the one the window at once gives,
    with no pass. When a trace of no plain root is rooted there (a trace of orphans), the
    window's pass answers, as before."""
    import polars as pl
    from typer.testing import CliRunner

    from hourglass.cli import app
    from hourglass.cli import whatif as whatif_cli
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.files import read_trace_files
    from hourglass.collector.schema import SPAN_COLUMNS
    from tests.builders import with_a_span_under_every_root

    samples = sorted(str(p) for p in SAMPLES.glob("*.otlp.jsonl"))
    frame = pl.concat(
        [pl.from_arrow(t.select(list(SPAN_COLUMNS))) for t in read_trace_files(samples, on_error=print)]  # type: ignore[misc]
    )
    traces = frame["trace_id"].n_unique()
    audited = with_a_span_under_every_root(frame, "audit", "record")
    everywhere = tmp_path / "everywhere.duckdb"
    store = DuckDBSpanStore(str(everywhere))
    store.write(audited.to_arrow())
    store.close()
    budget = 200 * 2**20 + 1_000 * 2_000  # 1,000 spans at once (hourglass.analysis.planning)
    env = {**_env(), "HOURGLASS_MEMORY_BUDGET": str(budget)}
    audit_op = ["--service", "audit", "--operation", "record"]
    speedup = ["--speedup", "audit:record=0.5"]

    def asked(db: Path, *args: str, environment: dict[str, str]) -> Any:
        return CliRunner().invoke(app, [*args[:1], "--db", str(db), *args[1:]], env=environment)

    def no_pass(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a pass over the window's partitions")

    at_once = [
        asked(everywhere, c, *audit_op, *more, environment=_env())
        for c, more in (("critical-path", []), ("whatif", speedup))
    ]
    assert [r.exit_code for r in at_once] == [2, 2]
    with monkeypatch.context() as passless:
        passless.setattr(whatif_cli._Window, "asking", no_pass)
        large = [
            asked(everywhere, c, *audit_op, *more, environment=env)
            for c, more in (("critical-path", []), ("whatif", speedup))
        ]
    assert [r.exit_code for r in large] == [2, 2], large[0].output + large[1].output
    assert "no trace has the root span audit:record (endpoints: " in large[0].stderr
    assert large[0].stderr.splitlines()[-1] == at_once[0].stderr.splitlines()[-1], large[0].stderr
    assert "counted by their roots" in large[0].stderr
    assert f"no trace has a root span 'audit/record' in the window ({traces} traces" in large[1].stderr
    assert large[1].stderr.splitlines()[-1] == at_once[1].stderr.splitlines()[-1], large[1].stderr
    # a trace of orphans whose chosen root is an audit:record span: rooted there, so asked
    orphan = (
        audited.filter(pl.col("service") == "audit")
        .head(1)
        .with_columns(trace_id=pl.lit("0" * 31 + "1"), parent_span_id=pl.lit("00000000deadbeef"))
    )
    rooted = tmp_path / "rooted.duckdb"
    store = DuckDBSpanStore(str(rooted))
    store.write(pl.concat([audited, orphan]).to_arrow())
    store.close()
    path = [
        asked(rooted, "critical-path", *audit_op, "--format", "json", environment=e) for e in (_env(), env)
    ]
    assert [r.exit_code for r in path] == [0, 0], path[1].output
    assert json.loads(path[1].stdout) == json.loads(path[0].stdout)
    assert json.loads(path[1].stdout)["traces"] == 1


def test_the_cli_asks_a_windows_partitions_in_worker_processes(demo_store: Path, tmp_path: Path) -> None:
    """With two workers (``--workers``, HOURGLASS_WORKERS; default one per core) a window asked in
    partitions is split once into partition files (4 partitions: ``SPLIT_MIN_PARTS``) that the
    worker processes read and ask, two at a time: the same what-if (a recommendation's too) and
    critical path as one partition after another in this process, and the files removed after."""
    speedup = ("--speedup", "ledger:lock.acquire ledger.journal=0.5")
    report = json.loads(hourglass("analyze", "--db", str(demo_store), "--format", "json").stdout)
    lock = next(r for r in report["recommendations"] if r["kind"] == "lock_contention")
    env = {**_env(), "TMPDIR": str(tmp_path)}
    for args in (
        ("whatif", "--db", str(demo_store), *speedup, "--format", "json"),
        ("whatif", "--db", str(demo_store), "--recommendation", lock["id"], "--format", "json"),
        ("critical-path", "--db", str(demo_store), *LEDGER_ENDPOINT, "--format", "json"),
    ):
        in_turn = subprocess.run(
            [*hourglass_executable(), *args, "--partitions", "4", "--workers", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        asked = subprocess.run(
            [*hourglass_executable(), *args, "--partitions", "4"],
            cwd=ROOT,
            env={**env, "HOURGLASS_WORKERS": "2"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert in_turn.returncode == asked.returncode == 0, asked.stderr
        assert "asked in 4 partitions of whole traces\n" in in_turn.stderr, in_turn.stderr
        assert "asked in 4 partitions of whole traces on 2 worker processes" in asked.stderr, asked.stderr
        assert json.loads(asked.stdout) == json.loads(in_turn.stdout), args
        assert list(tmp_path.iterdir()) == []


def test_whatif_and_critical_path_cli(demo_store: Path) -> None:
    analyzed = hourglass("analyze", "--db", str(demo_store), "--format", "json")
    assert analyzed.returncode == 0, analyzed.stderr
    report = json.loads(analyzed.stdout)
    lock = next(r for r in report["recommendations"] if r["kind"] == "lock_contention")
    out = hourglass("whatif", "--db", str(demo_store), "--recommendation", lock["id"], "--format", "json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["saved_ms_total"] == pytest.approx(lock["impact"]["saved_ms_total"], rel=0.01)
    assert body["endpoints"][0]["operation"] == LEDGER_TRANSFERS

    table = hourglass(
        "whatif",
        "--db",
        str(demo_store),
        "--speedup",
        "ledger:lock.acquire ledger.journal=0.5",
        "--service",
        "ledger",
        "--operation",
        LEDGER_TRANSFERS,
    )
    assert table.returncode == 0, table.stderr
    assert "48 traces, 48 changed" in table.stdout and LEDGER_TRANSFERS in table.stdout

    # bad input: a clear message and exit 2 (the parsing itself is unit-tested in tests/analysis)
    for flags, reason in (
        (["--speedup", "ledger:lock.acquire ledger.journal=-2"], "between 0"),
        (["--cap", "ledger:nope=4"], "no span ledger:nope"),
    ):
        bad = hourglass("whatif", "--db", str(demo_store), *flags)
        assert bad.returncode == 2 and reason in bad.stderr, (flags, bad.stderr)

    cp = hourglass(
        "critical-path",
        "--db",
        str(demo_store),
        "--service",
        "ledger",
        "--operation",
        LEDGER_TRANSFERS,
        "--format",
        "json",
    )
    assert cp.returncode == 0, cp.stderr
    path = json.loads(cp.stdout)
    assert path["operations"][0]["operation"] == "lock.acquire ledger.journal"  # the lock wait dominates
    assert path["operations"][0]["share"] > 0.5
    listing = hourglass("critical-path", "--db", str(demo_store))
    assert listing.returncode == 2 and LEDGER_TRANSFERS in listing.stderr


async def _every_tool(db: Path) -> dict[str, Any]:
    from mcp.client.session import ClientSession
    from mcp.client.stdio import StdioServerParameters, stdio_client

    command = hourglass_executable()
    params = StdioServerParameters(
        command=command[0], args=[*command[1:], "mcp", "--db", str(db)], env=_env(), cwd=str(ROOT)
    )
    out: dict[str, Any] = {}
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        out["tools"] = {t.name: t for t in tools.tools}

        async def call(name: str, args: dict[str, Any]) -> Any:
            result = await session.call_tool(name, args)
            out.setdefault("calls", []).append((name, args, result))
            return result

        listing = await call("list_recommendations", {"limit": 2})
        first = listing.structured_content["recommendations"][0]
        await call("list_recommendations", {"offset": 2, "limit": 2, "severity": "low"})
        await call("list_recommendations", {"kind": "lock_contention"})
        detail = await call("get_recommendation", {"recommendation_id": first["id"]})
        trace_id = detail.structured_content["evidence"]["trace_ids"][0]
        await call("get_trace", {"trace_id": trace_id, "limit": 3})
        await call("what_if", {"changes": [{"recommendation": first["id"]}]})
        await call("what_if", {"changes": []})
        await call("critical_path", {})
        await call("critical_path", {"service": "ledger", "operation": LEDGER_TRANSFERS})
        await call("get_recommendation", {"recommendation_id": "nope"})
    return out


def test_mcp_stdio_calls_every_tool(demo_store: Path) -> None:
    out = anyio.run(_every_tool, demo_store)
    assert set(out["tools"]) == {
        "list_recommendations",
        "get_recommendation",
        "get_trace",
        "what_if",
        "critical_path",
    }
    for tool in out["tools"].values():
        assert tool.description and len(tool.description) > 80  # described for an agent
        assert tool.annotations.read_only_hint is True
    results = {f"{name}{json.dumps(args, sort_keys=True)}": r for name, args, r in out["calls"]}
    errors = {k for k, r in results.items() if r.is_error}
    assert errors == {
        'what_if{"changes": []}',
        'get_recommendation{"recommendation_id": "nope"}',
    }, {k: results[k].content for k in errors}
    page = results['list_recommendations{"limit": 2}'].structured_content
    assert page["total"] >= 5 and page["next_offset"] == 2 and len(page["recommendations"]) == 2
    top = page["recommendations"][0]
    assert top["kind"] == "lock_contention" and top["severity"] == "high"
    locks = results['list_recommendations{"kind": "lock_contention"}'].structured_content
    assert {r["kind"] for r in locks["recommendations"]} == {"lock_contention"}
    detail = results[f'get_recommendation{{"recommendation_id": "{top["id"]}"}}'].structured_content
    assert detail["actions"] and "interventions" not in detail["evidence"]
    trace = next(r for k, r in results.items() if k.startswith("get_trace")).structured_content
    assert len(trace["spans"]) == 3 and trace["next_offset"] == 3
    assert top["id"] in {f["id"] for f in trace["findings"]}
    priced = next(r for k, r in results.items() if k.startswith('what_if{"changes": [{')).structured_content
    assert priced["saved_ms_total"] == pytest.approx(top["saved_ms_total"], rel=0.01)
    empty = results['what_if{"changes": []}']
    assert "empty" in empty.content[0].text
    endpoints = results["critical_path{}"].structured_content["endpoints"]
    assert {"service": "ledger", "operation": LEDGER_TRANSFERS, "traces": 48} in endpoints
    path = next(r for k, r in results.items() if k.startswith('critical_path{"operation"')).structured_content
    assert path["operations"][0]["operation"] == "lock.acquire ledger.journal"
    assert "icicle" not in path  # compact for an agent


def test_mcp_without_a_store_says_so(tmp_path: Path) -> None:
    out = hourglass("mcp", "--db", str(tmp_path / "missing.duckdb"), timeout=60)
    assert out.returncode == 2 and "no such store" in out.stderr
