"""Issue 13: every recommendation carries a ``design`` a senior architect would sign, and the
report a ``workstreams`` plan.

Golden-style checks on the demo workload's recorded traces (``sample-traces/``, written by the
workload's real OpenTelemetry exporters) and on the real files in ``../shared/real-traces`` and
``../shared/real-workloads``: every field present, every number in the prose one of the
recommendation's numbers (evidence, impact, the pattern's parameters, the predicted latencies),
the pseudocode in the service's language, and the sequence diagram's participants and calls equal
to the exemplar trace's, in its order, with its measured durations.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis.agent import _numbers_in, ungrounded_in
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.design import PROSE_FIELDS
from hourglass.analysis.pipeline import analyze
from hourglass.analysis.resources import normalise_language, service_resources
from hourglass.analysis.sequence import fmt_ms
from hourglass.api.sequence_svg import parse
from hourglass.collector.files import read_trace_files
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample-traces"
SHARED = ROOT.parent / "shared"
REAL_TRACES = SHARED / "real-traces"
REAL_WORKLOADS = SHARED / "real-workloads"

DESIGN_KEYS = {"pattern", *PROSE_FIELDS, "pseudocode", "sequence", "predicted"}


@functools.cache
def sample(path: Path) -> tuple[pa.Table, dict[str, Any]]:
    """A sample file's spans and report, analysed once for every test that reads it."""
    table = read(path)
    return table, analyze(table)


def read(path: Path) -> pa.Table:
    problems: list[Any] = []
    tables = [t for t in read_trace_files([str(path)], on_error=problems.append) if t.num_rows]
    return pa.concat_tables(tables) if tables else pa.table({})


def shown_numbers(rec: dict[str, Any]) -> list[float]:
    """What a design may state: the recommendation's numbers and the design's own parameters."""
    design = rec["design"]
    return _numbers_in(
        {
            "evidence": rec["evidence"],
            "impact": rec["impact"],
            "counts": [rec["traces_affected"], rec["occurrences"], rec["confidence"]],
            "parameters": design["pattern"]["parameters"],
            "predicted": design["predicted"],
            "targets": rec["targets"],
            "operation": rec["operation"],
            "service": rec["service"],
        }
    )


def check_design_complete_and_grounded(rec: dict[str, Any], ctx_frame: pl.DataFrame | None = None) -> None:
    design = rec.get("design")
    assert isinstance(design, dict), f"{rec['id']}: no design"
    assert set(design) >= DESIGN_KEYS, f"{rec['id']}: missing {DESIGN_KEYS - set(design)}"
    assert design["pattern"]["name"] and design["pattern"]["summary"]
    assert isinstance(design["pattern"]["parameters"], dict)
    for key in PROSE_FIELDS:
        assert isinstance(design[key], str) and len(design[key]) > 40, f"{rec['id']}: {key} empty"
    assert design["pseudocode"]["code"].strip() and design["pseudocode"]["language"]
    shown = shown_numbers(rec)
    parts = [design["pattern"]["summary"], *(design[k] for k in PROSE_FIELDS)]
    # exemplar critical-path self times are facts of the exemplar, stated in the verification
    bad = ungrounded_in(parts, shown + _exemplar_numbers(design))
    assert not bad, f"{rec['kind']} {rec['id']}: numbers not in the evidence: {bad}"
    # the parameters the code is written with appear in it (unless the sketch is neutral)
    code_params = (
        "shared_deadline_ms",
        "batch_size",
        "pool_size",
        "timeout_ms",
        "base_delay_ms",
        "branch_deadline_ms",
    )
    text = design["pseudocode"]["code"]
    for key in code_params:
        value = design["pattern"]["parameters"].get(key)
        if isinstance(value, int | float) and design["pseudocode"]["language"] != "pseudocode":
            shown_as = {f"{value:.0f}", f"{value:.1f}", f"{value / 1000:g}"}
            assert any(v in text for v in shown_as), f"{rec['kind']}: {key}={value} not in the pseudocode"


def _exemplar_numbers(design: dict[str, Any]) -> list[float]:
    """Durations drawn in the diagrams (the verification names the exemplar's new critical path)."""
    out: list[float] = []
    for text in (design["sequence"].get("before") or "", design["sequence"].get("after") or ""):
        out.extend(_numbers_in(text))
    return out


def check_sequence_matches_exemplar(rec: dict[str, Any], table: pa.Table) -> None:
    """The 'before' diagram's participants and calls are the exemplar's: the focus span's children
    in start order, each to the service it reached, with its measured duration."""
    seq = rec["design"]["sequence"]
    if not seq.get("before"):
        return
    trace_id = seq["trace_id"]
    spans = AnalysisContext.from_table(table).trace_spans(trace_id).sort("row")
    rows = spans.to_dicts()
    by_id = {r["span_id"]: r for r in rows}
    children: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["parent_span_id"] in by_id:
            children.setdefault(r["parent_span_id"], []).append(r)
    diagram = parse(seq["before"])
    root = next(r for r in rows if r["parent_span_id"] not in by_id)
    assert diagram.display_names()[0] == root["service"], "the root's service comes first"
    # the focus span, by the documented rule: the parent of the spans the interventions name
    # (or of the evidence's spans); a parent named first with its children is the focus itself
    recorded = (rec["evidence"].get("interventions") or {}).get(trace_id) or []
    named = [i for iv in recorded for i in (iv.get("span_ids") or [iv.get("span_id")])] or list(
        rec["evidence"].get("span_ids") or []
    )
    named = [i for i in named if i in by_id]
    if not named:
        return
    parents = {by_id[i]["parent_span_id"] for i in named}
    if len(named) > 1 and all(by_id[i]["parent_span_id"] == named[0] for i in named[1:]):
        focus = by_id[named[0]]
    elif len(parents) == 1 and next(iter(parents)) in by_id:
        focus = by_id[next(iter(parents))]
    else:
        focus = by_id.get(by_id[named[0]]["parent_span_id"]) or by_id[named[0]]
    kids = sorted(
        children.get(focus["span_id"], []), key=lambda k: (k["start_ns"], k["end_ns"], k["span_id"])
    )
    alias = {v: k for k, v in diagram.names.items()}
    focus_alias = alias[focus["service"]]
    calls = [s for s in diagram.steps if s.kind == "message" and not s.dashed and s.source == focus_alias]
    drawn_ops = [m.text.rsplit(" (", 1)[0].split(" ×")[0].split(" · ")[0] for m in calls]
    names = diagram.display_names()
    # participants: the focus's service, and every callee (the service each child reached)
    for kid in kids[:40]:
        grand = [g for g in children.get(kid["span_id"], []) if g["service"] != kid["service"]]
        callee = grand[0]["service"] if grand else kid["service"]
        assert callee in names or kid["peer"] in names or kid["db_system"] in names, (
            f"{rec['id']}: {callee} missing from participants {names}"
        )
    # order: the drawn calls are the children, in start order (a bare SQL verb is shown as its statement)
    from hourglass.analysis.sequence import call_label

    for k in kids:
        k["name"] = call_label(k["name"], k["db_statement"])
        if len(k["name"]) > 90:
            k["name"] = k["name"][:89] + "…"
    order = [k["name"] for k in kids]
    assert drawn_ops and all(op in order for op in drawn_ops), f"{rec['id']}: {drawn_ops} vs {order}"
    positions = [order.index(op) for op in drawn_ops]
    first_seen = [p for i, p in enumerate(positions) if p not in positions[:i]]
    assert first_seen == sorted(first_seen), f"{rec['id']}: calls drawn out of order: {drawn_ops}"
    # durations: a single call's label carries its measured duration
    for m, op in zip(calls, drawn_ops, strict=True):
        if m.text.endswith(" ms)") and "each" not in m.text and "median" not in m.text:
            durations = {fmt_ms((k["end_ns"] - k["start_ns"]) / 1e6) for k in kids if k["name"] == op}
            assert m.text.rsplit("(", 1)[1].rstrip(")") in durations, f"{rec['id']}: {m.text} vs {durations}"


# --- the demo workload's recorded traces ---------------------------------------------------------

SAMPLE_FILES = sorted(SAMPLES.glob("*.otlp.jsonl"))


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name.split(".")[0])
def test_demo_workload_designs_are_complete_grounded_and_drawn_from_the_exemplar(path: Path) -> None:
    table, report = sample(path)
    kind = path.name.split(".")[0]
    recs = report["recommendations"]
    assert any(r["kind"] == kind for r in recs), f"{kind} not found"
    for rec in recs:
        check_design_complete_and_grounded(rec)
        # the workload's services are Python (telemetry.sdk.language = python)
        assert rec["design"]["pseudocode"]["language"] == "python"
        check_sequence_matches_exemplar(rec, table)
        before = parse(rec["design"]["sequence"]["before"])
        after = parse(rec["design"]["sequence"]["after"])
        assert before.display_names() == after.display_names()
    rec = next(r for r in recs if r["kind"] == kind)
    design = rec["design"]
    predicted = design["predicted"]
    if rec["impact"]["saved_ms_p50"] is not None:
        # the what-if's predicted root latencies: after = before minus a saving, at p50
        assert predicted["root_ms_p50_after"] < predicted["root_ms_p50_before"]
        assert fmt_ms(predicted["root_ms_p50_after"]) in design["verification"]
        assert "(what-if)" in design["sequence"]["after"]
    assert report["workstreams"], "a plan for every report with recommendations"
    ws = report["workstreams"][0]
    assert rec["id"] in {i for w in report["workstreams"] for i in w["recommendations"]}
    assert ws["namespace"] == "hourglass-workload"


def test_design_patterns_follow_the_evidence() -> None:
    """Per kind, the pattern and its parameters come from the numbers."""
    got: dict[str, dict[str, Any]] = {}
    for path in SAMPLE_FILES:
        for rec in sample(path)[1]["recommendations"]:
            got.setdefault(rec["kind"], rec)
    sc = got["serialized_calls"]["design"]
    assert sc["pattern"]["name"].startswith("scatter-gather")
    assert sc["pattern"]["parameters"]["concurrent_calls"] == got["serialized_calls"]["evidence"]["calls_p50"]
    assert "asyncio.TaskGroup" in sc["pseudocode"]["code"] and "asyncio.timeout(" in sc["pseudocode"]["code"]
    assert "par 3 calls at the same time" in sc["sequence"]["after"]
    n1 = got["n_plus_one"]
    assert n1["design"]["pattern"]["parameters"]["batch_size"] == n1["evidence"]["calls_max"]
    assert "batched into one" in n1["design"]["sequence"]["after"]
    assert "loop " in n1["design"]["sequence"]["before"]
    fcl = got["fanout_concurrency_limit"]
    assert fcl["design"]["pattern"]["parameters"]["current_limit"] == fcl["evidence"]["k"]
    assert fcl["design"]["pattern"]["parameters"]["pool_size"] == fcl["evidence"]["n_max"]
    assert f"asyncio.Semaphore({fcl['evidence']['n_max']})" in fcl["design"]["pseudocode"]["code"]
    assert "at most 2 at a time" in fcl["design"]["sequence"]["before"]
    fs = got["fanout_straggler"]
    assert fs["evidence"]["pattern"] == "skew" and fs["design"]["pattern"]["name"].startswith("rebalance")
    assert fs["design"]["pattern"]["parameters"]["hedge_after_ms"] > 0
    assert "par 6 calls at the same time" in fs["design"]["sequence"]["before"]
    code = fs["design"]["pseudocode"]["code"]  # a hot shard: deadline and partial results, no hedge
    assert "asyncio.timeout(" in code and "Missing(shard)" in code and "replica" not in code
    lc = got["lock_contention"]
    assert lc["design"]["pattern"]["parameters"]["resource"] == lc["evidence"]["resource"]
    rb = got["retry_without_backoff"]
    assert rb["design"]["pattern"]["parameters"]["max_attempts"] == 3
    assert "stop_after_attempt(3)" in rb["design"]["pseudocode"]["code"]
    assert "no latency change" in rb["design"]["sequence"]["after"]


# --- languages ---------------------------------------------------------------------------------

IDIOMS = {
    "go": "errgroup",
    "java": "CompletableFuture",
    "python": "asyncio.TaskGroup",
    "nodejs": "Promise.all",
    "dotnet": "Task.WhenAll",
    "ruby": "Async",
    "rust": "tokio::try_join!",
    None: "start ",
}


def serialized_traces(language: str | None, count: int = 8) -> pa.Table:
    """``checkout`` calls inventory, pricing and shipping one after another, in varying order."""
    resource = {"service.name": "checkout", "service.namespace": "shop", "team": "payments-team"}
    if language:
        resource["telemetry.sdk.language"] = language
    builders = []
    for i in range(count):
        b = TraceBuilder(service="checkout")
        root = b.span("POST /checkout", start_ms=0, dur_ms=200, kind=KIND_SERVER)
        order = ["inventory", "pricing", "shipping"]
        order = order[i % 3 :] + order[: i % 3]
        for j, svc in enumerate(order):
            client = b.span(f"GET /{svc}", parent=root, start_ms=5 + j * 60, dur_ms=55, kind=KIND_CLIENT)
            b.span(
                f"GET /{svc}", parent=client, start_ms=6 + j * 60, dur_ms=52, service=svc, kind=KIND_SERVER
            )
        for row in b.rows:
            if row["service"] == "checkout":
                row["resource_json"] = json.dumps(resource)
        builders.append(b)
    return spans_table(builders)


@pytest.mark.parametrize("language", ["go", "java", "python", "nodejs", "dotnet", "ruby", "rust", None])
def test_pseudocode_is_in_the_language_of_the_service_that_changes(language: str | None) -> None:
    report = analyze(serialized_traces(language))
    rec = next(r for r in report["recommendations"] if r["kind"] == "serialized_calls")
    code = rec["design"]["pseudocode"]
    assert code["language"] == (language or "pseudocode")
    assert IDIOMS[language] in code["code"]
    for svc in ("inventory", "pricing", "shipping"):  # the real operations, named
        assert f"GET /{svc}" in code["code"]
    check_design_complete_and_grounded(rec)
    ws = report["workstreams"][0]
    assert ws["service"] == "checkout" and ws["namespace"] == "shop" and ws["owner"] == "payments-team"
    seq = parse(rec["design"]["sequence"]["before"])
    assert seq.display_names()[0] == "checkout"
    assert set(seq.display_names()[1:]) == {"inventory", "pricing", "shipping"}


@pytest.mark.parametrize(
    ("runtime", "language"),
    [("Go-2.30.0", "go"), ("CPython", "python"), ("Java-1.8.1", "java"), ("Node-3.18.1", "nodejs"),
     ("CSharp-1.0", "dotnet"), ("webjs", "webjs"), ("zig", None)],
)  # fmt: skip
def test_language_names_from_sdk_runtime_and_jaeger_client_tags(runtime: str, language: str | None) -> None:
    assert normalise_language(runtime) == language


def test_languages_from_sdk_runtime_and_jaeger_client_tags() -> None:
    table = pa.table(
        {
            "service": ["a", "a", "b", "c", "d"],
            "resource_json": [
                json.dumps({"telemetry.sdk.language": "go", "service.namespace": "ns"}),
                json.dumps({"telemetry.sdk.language": "go", "service.namespace": "ns"}),
                json.dumps({"jaeger.version": "Java-1.8.1", "service.owner": "team-b"}),
                "not json",
                None,
            ],
        }
    )
    got = service_resources(table)
    assert got["a"] == {"language": "go", "namespace": "ns", "owner": None}
    assert got["b"]["language"] == "java" and got["b"]["owner"] == "team-b"
    assert got["c"]["language"] is None and got["d"]["language"] is None


@pytest.mark.parametrize(
    ("scope", "language"),
    [
        ("go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp", "go"),
        ("io.opentelemetry.spring-webmvc-6.0", "java"),
        ("opentelemetry.instrumentation.fastapi", "python"),
        ("@opentelemetry/instrumentation-http", "nodejs"),
        ("OpenTelemetry.Instrumentation.AspNetCore", "dotnet"),
        ("Microsoft.AspNetCore", "dotnet"),
        ("OpenTelemetry::Instrumentation::Rack", "ruby"),
        ("io.opentelemetry.contrib.php.laravel", "php"),
        ("my-tracer", None),
    ],
)
def test_language_names_from_instrumentation_scopes(scope: str, language: str | None) -> None:
    from hourglass.analysis.resources import language_from_scope

    assert language_from_scope(scope) == language


def test_language_from_the_instrumentation_scope_when_the_resource_is_silent() -> None:
    table = serialized_traces(None)
    rows = table.to_pylist()
    for row in rows:
        row["scope_name"] = "io.opentelemetry.spring-webmvc-6.0" if row["service"] == "checkout" else None
    report = analyze(pa.Table.from_pylist(rows, schema=table.schema))
    rec = next(r for r in report["recommendations"] if r["kind"] == "serialized_calls")
    assert rec["design"]["pseudocode"]["language"] == "java"


def test_store_scan_carries_languages_to_the_analysis(tmp_path: Path) -> None:
    """A store scan has no resource_json column: the languages ride in the table's metadata."""
    from hourglass.analysis.resources import attach_store_resources
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    store = DuckDBSpanStore(str(tmp_path / "s.duckdb"))
    try:
        store.write(serialized_traces("java"))
        table = attach_store_resources(store.scan(columns=ANALYSIS_COLUMNS), store)
    finally:
        store.close()
    assert "resource_json" not in table.column_names
    assert service_resources(table)["checkout"]["language"] == "java"
    report = analyze(table)
    rec = next(r for r in report["recommendations"] if r["kind"] == "serialized_calls")
    assert rec["design"]["pseudocode"]["language"] == "java"


# --- workstreams -------------------------------------------------------------------------------


def test_a_batch_endpoint_lands_before_its_callers_batch() -> None:
    """N+1 over HTTP to a traced service: that service's workstream comes first."""
    builders = []
    for _ in range(6):
        b = TraceBuilder(service="orders")
        root = b.span("GET /orders", start_ms=0, dur_ms=140, kind=KIND_SERVER)
        for i in range(10):
            c = b.span(
                "GET /items/{id}",
                parent=root,
                start_ms=5 + i * 12,
                dur_ms=10,
                kind=KIND_CLIENT,
                http_method="GET",
                http_url=f"http://items/items/{i}",
            )
            b.span(
                "GET /items/{id}",
                parent=c,
                start_ms=6 + i * 12,
                dur_ms=8,
                service="items",
                kind=KIND_SERVER,
                http_route="/items/{id}",
            )
        builders.append(b)
    report = analyze(spans_table(builders))
    recs = [r for r in report["recommendations"] if r["kind"] == "n_plus_one"]
    assert recs, [r["kind"] for r in report["recommendations"]]
    by_service = {w["service"]: w for w in report["workstreams"]}
    orders, items = by_service["orders"], by_service["items"]
    assert recs[0]["id"] in orders["recommendations"]
    assert items["recommendations"] == [] and "batch endpoint" in items["prerequisites"][0]
    assert orders["depends_on"] == [items["id"]]
    assert items["wave"] == 1 and orders["wave"] == 2
    assert orders["id"] not in items["parallel_with"]


def test_combined_saving_is_a_what_if_of_the_group_not_a_sum() -> None:
    from hourglass.analysis.model import Finding
    from hourglass.analysis.pipeline import analyze_context
    from hourglass.analysis.whatif import WhatIf

    table = pa.concat_tables(
        [read(SAMPLES / "serialized_calls.otlp.jsonl"), read(SAMPLES / "fanout_straggler.otlp.jsonl")]
    )
    ctx = AnalysisContext.from_table(table)
    report, ranked = analyze_context(ctx)
    storefront = next(w for w in report["workstreams"] if w["service"] == "storefront")
    assert len(storefront["recommendations"]) >= 2
    members = [s.finding for s in ranked if s.finding.id in storefront["recommendations"]]
    group = Finding(
        "g", "parallelization", "storefront", "", [], [o for f in members for o in f.occurrences], 1.0
    )
    expected = WhatIf(ctx).impact(group).as_dict()
    assert storefront["impact"] == expected
    singles = sum(
        r["impact"]["saved_ms_total"] or 0
        for r in report["recommendations"]
        if r["id"] in storefront["recommendations"]
    )
    assert storefront["sum_of_recommendations_ms_total"] == pytest.approx(singles, abs=0.01)


# --- real files --------------------------------------------------------------------------------


def _real_files() -> list[Path]:
    files = []
    if REAL_TRACES.is_dir():
        files += [
            p for p in sorted(REAL_TRACES.iterdir()) if p.suffix != ".md" and not p.name.startswith("invalid")
        ]
    if REAL_WORKLOADS.is_dir():
        files += sorted(REAL_WORKLOADS.glob("*.gz"))
    return files


@pytest.mark.skipif(not _real_files(), reason=f"{REAL_TRACES} and {REAL_WORKLOADS} absent")
@pytest.mark.parametrize("path", _real_files(), ids=lambda p: p.name[:40])
def test_real_files_designs_are_complete_grounded_and_drawn_from_the_exemplar(path: Path) -> None:
    table = read(path)
    if table.num_rows == 0:
        pytest.skip(f"{path.name}: no spans")
    report = analyze(table)
    from hourglass.analysis.resources import scope_languages

    by_scope = scope_languages(AnalysisContext.from_table(table).spans)
    languages = {s: r.get("language") for s, r in service_resources(table).items()}
    languages = {s: languages.get(s) or by_scope.get(s) for s in set(languages) | set(by_scope)}
    for rec in report["recommendations"]:
        check_design_complete_and_grounded(rec)
        check_sequence_matches_exemplar(rec, table)
        expected = languages.get(rec["service"])
        language = rec["design"]["pseudocode"]["language"]
        assert language == expected or (
            language == "pseudocode" and expected in (None, "cpp", "erlang", "swift", "webjs", "php")
        ), f"{path.name}: {rec['service']} is {expected}, pseudocode in {language}"
    ids = {i for w in report["workstreams"] for i in w["recommendations"]}
    assert ids == {r["id"] for r in report["recommendations"]}


# --- kinds without sample files, sparse evidence, unknown kinds ---------------------------------


def test_missing_timeout_design_sets_the_timeout_at_the_measured_healthy_p99() -> None:
    from tests.analysis.test_missing_timeout import home_trace, usual

    hung = [home_trace(ms) for ms in (2_000.0, 3_500.0, 5_200.0)]
    table = spans_table(usual(30) + hung)
    rec = next(r for r in analyze(table)["recommendations"] if r["kind"] == "missing_timeout")
    check_design_complete_and_grounded(rec)
    check_sequence_matches_exemplar(rec, table)
    design = rec["design"]
    assert design["pattern"]["parameters"]["timeout_ms"] == rec["evidence"]["suggested_timeout_ms"]
    assert fmt_ms(rec["evidence"]["suggested_timeout_ms"]) in design["pattern"]["summary"]
    assert "→" in design["sequence"]["after"]  # the hung call, cut at the timeout by the what-if


def test_error_propagation_design_is_a_fallback_with_a_breaker() -> None:
    from tests.analysis.test_error_propagation import checkout_trace

    traces = [checkout_trace(payment_fails=True, root_fails=True) for _ in range(4)]
    traces += [checkout_trace(payment_fails=True, root_fails=False) for _ in range(2)]
    traces += [checkout_trace(payment_fails=False, root_fails=False) for _ in range(14)]
    table = spans_table(traces)
    rec = next(r for r in analyze(table)["recommendations"] if r["kind"] == "error_propagation")
    check_design_complete_and_grounded(rec)
    assert "circuit breaker" in rec["design"]["pattern"]["name"]
    assert "no latency change" in rec["design"]["sequence"]["after"]


@pytest.mark.parametrize(
    "kind",
    [
        "serialized_calls",
        "n_plus_one",
        "fanout_straggler",
        "fanout_concurrency_limit",
        "lock_contention",
        "retry_without_backoff",
        "error_propagation",
        "missing_timeout",
        "concurrent",
        "a_kind_from_the_future",
    ],
)
@pytest.mark.parametrize(
    "language", ["go", "java", "python", "nodejs", "dotnet", "ruby", "php", "rust", "cpp", None]
)
def test_every_kind_gets_a_complete_design_from_sparse_evidence(kind: str, language: str | None) -> None:
    """Real evidence may lack any number: the design stays complete and says so in words, never
    'None' and never an invented number."""
    from hourglass.analysis.design import build_design

    rec = {
        "id": f"{kind}-1", "kind": kind, "category": "fault_tolerance" if "retry" in kind else "parallelization",
        "service": "svc", "operation": "GET /x", "targets": [], "traces_affected": 4, "occurrences": 4,
        "impact": {"saved_ms_p50": None, "saved_ms_p95": None, "saved_ms_total": None, "share_of_root_latency": None},
        "confidence": 0.5, "evidence": {},
    }  # fmt: skip
    design = build_design(rec, {"language": language})
    assert set(design) >= DESIGN_KEYS
    for key in PROSE_FIELDS:
        assert design[key] and "None" not in design[key], (key, design[key])
    assert "None" not in design["pattern"]["summary"]
    assert design["pseudocode"]["code"] and "None" not in design["pseudocode"]["code"]
    assert not ungrounded_in([design["pattern"]["summary"], *(design[k] for k in PROSE_FIELDS)], [4, 0.5])


def test_markdown_shows_the_design_and_the_plan() -> None:
    from hourglass.analysis.render import render_markdown

    _, report = sample(SAMPLES / "serialized_calls.otlp.jsonl")
    text = render_markdown(report)
    rec = report["recommendations"][0]
    assert f"**Design: {rec['design']['pattern']['name']}**" in text
    for heading in (
        "Why this pattern",
        "Dependencies and races",
        "Consistency",
        "Failure handling",
        "Verification",
        "Tests",
    ):
        assert f"- **{heading}.** " in text
    assert "```python\n" in text and text.count("```mermaid\n") == 2
    assert rec["design"]["sequence"]["before"] in text
    assert "## Workstreams" in text and "| 1 | `storefront` (hourglass-workload)" in text


def test_hotrod_go_services_get_go_designs(tmp_path: Path) -> None:
    """Jaeger's HotROD (Go services, OpenTelemetry SDK) as its source code runs them."""
    from tests.hotrod_traces import write

    table = read(write(tmp_path / "hotrod.json"))
    report = analyze(table)
    assert report["recommendations"]
    for rec in report["recommendations"]:
        check_design_complete_and_grounded(rec)
        check_sequence_matches_exemplar(rec, table)
        assert rec["design"]["pseudocode"]["language"] == "go"
    n1 = next(r for r in report["recommendations"] if r["kind"] == "n_plus_one")
    code = n1["design"]["pseudocode"]["code"]
    assert "getDriverBatch" in code and "QueryContext" not in code  # Redis calls: a batch call, not SQL
    fcl = next(r for r in report["recommendations"] if r["kind"] == "fanout_concurrency_limit")
    assert f"g.SetLimit({fcl['evidence']['n_max']})" in fcl["design"]["pseudocode"]["code"]


def test_a_large_exemplar_is_drawn_from_its_focus_not_from_every_span(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An N+1 over a whole table: the diagram shows the first calls and counts the rest, with
    each call's callee, and only the spans it draws become Python objects (a 100k-span exemplar
    as one object per span took ~0.7 s of a report)."""
    from hourglass.analysis import sequence

    made: list[Any] = []

    class Watched(sequence._Trace):
        def __init__(self, frame: pl.DataFrame) -> None:
            super().__init__(frame)
            made.append(self)

    monkeypatch.setattr(sequence, "_Trace", Watched)
    calls = 3000
    builders = []
    for _ in range(6):
        b = TraceBuilder(service="orders")
        root = b.span("GET /export", start_ms=0, dur_ms=10 + calls * 2, kind=KIND_SERVER)
        for i in range(calls):
            client = b.span("GET /item", parent=root, start_ms=5 + i * 2, dur_ms=1.5, kind=KIND_CLIENT)
            if i < 2:  # the first calls reach the items service: it is their callee
                b.span("GET /item", parent=client, start_ms=5.1 + i * 2, dur_ms=1.2, service="items",
                       kind=KIND_SERVER)  # fmt: skip
        builders.append(b)
    report = analyze(spans_table(builders))
    rec = next(r for r in report["recommendations"] if r["kind"] == "n_plus_one")
    before = rec["design"]["sequence"]["before"]
    assert f"Note over P1: {calls - sequence.MAX_CALLS} more calls not drawn" in before
    assert "P1->>P2: GET /item (1.5 ms)" in before  # the first call reaches items (P2)
    assert f"loop {sequence.MAX_CALLS - 2} calls one after another" in before
    check_sequence_matches_exemplar(rec, spans_table(builders))
    assert made and all(trace.n > calls for trace in made)
    assert max(len(trace._spans) for trace in made) <= 3 * sequence.MAX_CALLS
