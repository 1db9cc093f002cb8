"""The hourglass.report/v1 object: shape, ranking, texts, renderers, trace detail, real files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import Finding, Occurrence
from hourglass.analysis.pipeline import ContextView, analyze, analyze_context, trace_detail
from hourglass.analysis.ranking import Scored, rank
from hourglass.analysis.render import render_markdown, render_table
from hourglass.analysis.writer import WriteOutcome, WrittenText
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table

REAL_TRACES = Path(__file__).resolve().parents[3] / "shared" / "real-traces"
RECOMMENDATION_KEYS = [
    "id", "rank", "kind", "category", "service", "operation", "targets", "traces_affected", "occurrences",
    "impact", "confidence", "evidence", "title", "summary", "actions", "design",
]  # fmt: skip


def workload(traces: int = 6) -> pa.Table:
    """Serialized calls (order varies) plus an N+1 loop in another endpoint, plus healthy traces."""
    builders = []
    for i in range(traces):
        b = TraceBuilder(service="shop")
        root = b.span("GET /checkout", start_ms=0, dur_ms=300, kind=KIND_SERVER)
        first, second = ("users", "cart") if i % 2 else ("cart", "users")
        for svc, start in ((first, 10), (second, 111)):
            b.span(
                f"GET {svc}",
                parent=root,
                start_ms=start,
                dur_ms=100,
                kind=KIND_CLIENT,
                http_url=f"http://{svc}/x",
            )
        builders.append(b)
        n = TraceBuilder(service="shop")
        root = n.span("GET /orders", start_ms=0, dur_ms=120, kind=KIND_SERVER)
        for k in range(8):
            n.span("SELECT", parent=root, start_ms=2 + k * 14, dur_ms=13, kind=KIND_CLIENT, db_system="mysql",
                   db_statement=f"SELECT * FROM items WHERE order_id = {k}")  # fmt: skip
        builders.append(n)
        h = TraceBuilder(service="shop")
        root = h.span("GET /home", start_ms=0, dur_ms=100, kind=KIND_SERVER)
        for svc in ("ads", "news"):
            h.span(
                f"GET {svc}", parent=root, start_ms=5, dur_ms=90, kind=KIND_CLIENT, http_url=f"http://{svc}/"
            )
        builders.append(h)
    return spans_table(builders)


def test_report_has_the_design_shape() -> None:
    report = analyze(workload())
    assert list(report) == [
        "schema",
        "generated_at",
        "traces_analyzed",
        "spans_analyzed",
        "recommendations",
        "writer",
        "workstreams",
        "critical_paths",  # the busiest endpoints' critical paths for the report page (issue 14)
    ]
    assert report["schema"] == "hourglass.report/v1"
    assert report["generated_at"].endswith("Z")
    assert (report["traces_analyzed"], report["spans_analyzed"]) == (18, 6 * 3 + 6 * 9 + 6 * 3)
    assert report["writer"] == {"name": "template", "fallback_reason": None}
    kinds = [r["kind"] for r in report["recommendations"]]
    assert sorted(kinds) == ["n_plus_one", "serialized_calls"]
    for i, rec in enumerate(report["recommendations"], start=1):
        assert list(rec) == RECOMMENDATION_KEYS
        assert rec["rank"] == i and rec["category"] == "parallelization"
        assert set(rec["impact"]) == {
            "saved_ms_p50",
            "saved_ms_p95",
            "saved_ms_total",
            "share_of_root_latency",
        }
        assert 0 < len(rec["evidence"]["trace_ids"]) <= 5 and rec["evidence"]["span_ids"]
        assert rec["title"] and rec["summary"] and rec["actions"]
    serialized = next(r for r in report["recommendations"] if r["kind"] == "serialized_calls")
    assert serialized["impact"]["saved_ms_p50"] == 100.0 and serialized["traces_affected"] == 6
    assert "100 ms" in serialized["summary"] and "GET /checkout" in serialized["summary"]
    assert not any(r["operation"] == "GET /home" for r in report["recommendations"])


def test_ids_and_order_do_not_depend_on_input_order() -> None:
    table = workload()
    shuffled = table.take(np.random.default_rng(3).permutation(table.num_rows))
    a, b = analyze(table), analyze(shuffled)
    for report in (a, b):
        report.pop("generated_at")
    assert a == b


def test_no_spans_give_an_empty_report() -> None:
    from hourglass.collector.schema import empty_span_table

    report = analyze(empty_span_table())
    assert (report["traces_analyzed"], report["spans_analyzed"], report["recommendations"]) == (0, 0, [])


def test_selection_by_service_and_time_keeps_whole_traces() -> None:
    table = workload()
    assert analyze(table, services=["nobody"])["traces_analyzed"] == 0
    assert analyze(table, services=["shop"])["traces_analyzed"] == 18
    assert analyze(table, since_ns=2**62)["traces_analyzed"] == 0


def finding(kind: str, category: str, confidence: float, risk: int | None = None) -> Finding:
    return Finding(
        kind, category, "svc", f"op-{kind}", [], [Occurrence("t1", ("s",))], confidence, requests_at_risk=risk
    )


def test_ranking_by_expected_saving_and_requests_at_risk() -> None:
    big = Scored(finding("serialized_calls", "parallelization", 0.5), None, 500.0 * 0.5, True)
    small = Scored(finding("n_plus_one", "parallelization", 0.9), None, 100.0 * 0.9, True)
    risky = Scored(
        finding("error_propagation", "fault_tolerance", 0.8, risk=30), None, 30 * 0.8 * 50.0, False
    )
    ordered = [s.finding.kind for s in rank([small, risky, big])]
    assert ordered == ["error_propagation", "serialized_calls", "n_plus_one"]


def test_fault_tolerance_finding_without_latency_has_null_impact(monkeypatch: pytest.MonkeyPatch) -> None:
    import hourglass.analysis.pipeline as pipeline

    def planted(ctx: AnalysisContext) -> list[Finding]:
        trace = ctx.traces["trace_id"][0]
        return [Finding("missing_timeout", "fault_tolerance", "shop", "GET /checkout", [{"service": "cart", "operation": "GET"}],
                        [Occurrence(trace, ())], 0.7, evidence={"p50_ms": 10.0}, requests_at_risk=4)]  # fmt: skip

    monkeypatch.setattr(pipeline, "DETECTORS", {"missing_timeout": planted})
    (rec,) = analyze(workload(1))["recommendations"]
    assert rec["impact"] == {
        "saved_ms_p50": None,
        "saved_ms_p95": None,
        "saved_ms_total": None,
        "share_of_root_latency": None,
    }
    assert rec["evidence"]["requests_at_risk"] == 4 and rec["title"]


class FailingWriter:
    name = "anthropic:test"

    def write(self, recommendations: list[dict[str, Any]], context: Any) -> WriteOutcome:
        raise TimeoutError("API too slow")


class PartialWriter:
    name = "partial"

    def write(self, recommendations: list[dict[str, Any]], context: Any) -> WriteOutcome:
        first = recommendations[0]
        evidence = context.finding_evidence(first["id"])
        assert evidence["evidence"]["trace_ids"]
        path = context.critical_path(evidence["evidence"]["trace_ids"][0])
        assert path and path[0]["depth"] == 0
        return WriteOutcome(
            {first["id"]: WrittenText("Custom", "Custom summary.", ["Do it."])}, writer="partial"
        )


def test_a_failing_writer_falls_back_to_templates_and_says_why() -> None:
    report = analyze(workload(), writer=FailingWriter())
    assert report["writer"]["name"] == "template"
    assert "API too slow" in report["writer"]["fallback_reason"]
    assert all(r["title"] for r in report["recommendations"])


def test_recommendations_a_writer_skipped_are_written_by_templates() -> None:
    report = analyze(workload(), writer=PartialWriter())
    assert report["recommendations"][0]["title"] == "Custom"
    assert report["recommendations"][1]["title"] and report["writer"]["fallback_reason"]


def test_writer_context_views() -> None:
    ctx = AnalysisContext.from_table(workload(2))
    report, _ = analyze_context(ctx)
    view = ContextView(ctx, report)
    assert view.finding_evidence("nope") is None
    rec = report["recommendations"][0]
    assert view.finding_evidence(rec["id"])["kind"] == rec["kind"]
    assert view.critical_path("missing") is None
    neighbours = view.service_neighbours("shop")
    assert neighbours["callers"] == [] and neighbours["callees"] == []  # client spans stay in "shop"
    b = TraceBuilder(service="web")
    root = b.span("GET /", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    call = b.span("GET users", parent=root, start_ms=5, dur_ms=40, kind=KIND_CLIENT)
    b.span("GET /users", parent=call, start_ms=6, dur_ms=38, service="users", kind=KIND_SERVER)
    other = AnalysisContext.from_table(spans_table(b))
    view = ContextView(other, {"recommendations": []})
    assert view.service_neighbours("users") == {
        "callers": [
            {"service": "web", "operation": "GET users", "calls": 1, "p50_ms": 38.0}
        ],  # time in "users"
        "callees": [],
    }
    assert view.service_neighbours("web")["callees"] == [
        {"service": "users", "operation": "GET /users", "calls": 1, "p50_ms": 38.0}
    ]
    path = view.critical_path(b.trace_id)
    assert [p["name"] for p in path] == ["GET /", "GET users", "GET /users"]
    assert sum(p["self_ms"] for p in path) == 100.0


def test_design_facts_let_a_parked_findings_columns_go_once_made(tmp_path: Path) -> None:
    """Serve's round parks the findings' occurrences; the design facts of a recommendation read
    back its finding's columns (the exemplars' re-timing) and let them go once made, so the
    texts never hold every finding's at once (the facts are the same, and made once)."""
    ctx = AnalysisContext.from_table(workload(4))
    report, ranked = analyze_context(ctx)
    expected = {
        r["id"]: ContextView(ctx, report, ranked).design_facts(r["id"]) for r in report["recommendations"]
    }
    for scored in ranked:
        scored.finding.occurrence_table.park(str(tmp_path))
    tables = [s.finding.occurrence_table for s in ranked]
    assert all(t.is_parked() and not t.held() for t in tables)
    view = ContextView(ctx, report, ranked)
    for rec in report["recommendations"]:
        assert view.design_facts(rec["id"]) == expected[rec["id"]] is not None
        assert not any(t.held() for t in tables), rec["id"]
    assert any(expected.values())


def test_markdown_and_table_renderings_carry_the_numbers() -> None:
    report = analyze(workload())
    md = render_markdown(report)
    assert md.startswith("## Hourglass: 2 recommendations")
    assert "| 1 |" in md and "### 1. " in md and "**What to do**" in md and "<details>" in md
    table = render_table(report)
    assert "Saved p50 / p95" in table and "100 ms" in table
    empty = {**report, "recommendations": []}
    assert "No bottlenecks" in render_markdown(empty) and "No bottlenecks" in render_table(empty)
    assert (
        f"found in {report['traces_analyzed']:,} traces ({report['spans_analyzed']:,} spans)"
        in render_table(empty)
    )
    # nothing analysed (an empty --since window) is not a clean bill of health
    none = {**empty, "traces_analyzed": 0, "spans_analyzed": 0}
    for text in (render_markdown(none), render_table(none)):
        assert "No bottlenecks" not in text and "No spans to analyse" in text


def test_trace_detail_lists_path_and_touching_findings() -> None:
    table = workload(2)
    report = analyze(table)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    rec = next(r for r in report["recommendations"] if r["kind"] == "serialized_calls")
    trace_id = rec["evidence"]["trace_ids"][0]
    detail = trace_detail(frame.filter(pl.col("trace_id") == trace_id), report)
    assert detail["trace_id"] == trace_id and detail["span_count"] == 3
    assert len(detail["critical_path"]) == 3 and detail["finding_ids"] == [rec["id"]]
    assert {"span_id", "on_critical_path", "critical_ns", "blocking"} <= set(detail["spans"][0])


def read_files(paths: list[Path]) -> pa.Table:
    from hourglass.collector.files import read_trace_files

    problems: list[Any] = []
    tables = [t for t in read_trace_files([str(p) for p in paths], on_error=problems.append) if t.num_rows]
    return pa.concat_tables(tables)


def real_trace_files() -> list[Path]:
    return sorted(
        p
        for p in REAL_TRACES.iterdir()
        if p.suffix in (".json", ".jsonl", ".pb") and not p.name.startswith("invalid")
    )


@pytest.mark.skipif(not REAL_TRACES.exists(), reason="shared real traces not present")
@pytest.mark.parametrize("path", real_trace_files() if REAL_TRACES.exists() else [], ids=lambda p: p.name)
def test_every_real_trace_file_analyses(path: Path) -> None:
    report = analyze(read_files([path]))
    assert report["spans_analyzed"] > 0
    for rec in report["recommendations"]:
        assert rec["title"]
        saved = rec["impact"]["saved_ms_p50"]
        assert saved is None or saved >= 0


@pytest.mark.skipif(not REAL_TRACES.exists(), reason="shared real traces not present")
def test_same_spans_from_files_and_from_the_store_give_the_same_report(tmp_path: Path) -> None:
    from hourglass.analysis.resources import attach_store_resources
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    files = (
        real_trace_files()
        + sorted((Path(__file__).resolve().parents[2] / "sample-traces").glob("*.jsonl"))[:2]
    )
    table = read_files(files)
    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
    try:
        store.write(table)
        # as the CLI and the server read it: the services' languages ride along (issue 13)
        stored = attach_store_resources(store.scan(columns=ANALYSIS_COLUMNS), store)
    finally:
        store.close()
    from_files, from_store = analyze(table), analyze(stored)
    for report in (from_files, from_store):
        report.pop("generated_at")
    assert from_files["recommendations"], "the workload should produce findings"
    assert from_files == from_store


def test_findings_below_the_confidence_floor_are_not_recommended() -> None:
    from hourglass.analysis.pipeline import MIN_REPORTED_CONFIDENCE, score_findings

    b = TraceBuilder(service="shop")
    root = b.span("POST /pay", start_ms=0, dur_ms=100, kind=KIND_SERVER, status_code=2)
    call = b.span("POST bank", parent=root, start_ms=5, dur_ms=50, kind=KIND_CLIENT, status_code=2)
    ctx = AnalysisContext.from_table(spans_table(b))

    def finding(confidence: float) -> Finding:
        return Finding(
            kind="error_propagation", category="fault_tolerance", service="shop", operation="POST /pay",
            targets=[{"service": "bank", "operation": "POST bank"}],
            occurrences=[Occurrence(trace_id=b.trace_id, span_ids=(root, call))],
            confidence=confidence, requests_at_risk=1,
        )  # fmt: skip

    kept = score_findings(ctx, [finding(MIN_REPORTED_CONFIDENCE), finding(MIN_REPORTED_CONFIDENCE / 4)])
    assert [s.finding.confidence for s in kept] == [MIN_REPORTED_CONFIDENCE]
