"""The HTML report page: waterfall drawing, escaping of untrusted trace text, self-containment."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hourglass.api.report_html import (
    MAX_ROWS,
    Exemplar,
    WaterfallSpan,
    fmt_tick,
    nice_step_ms,
    render_report_html,
    render_waterfall_svg,
    select_rows,
    tree_order,
)

MS = 1_000_000
SVG_NS = "{http://www.w3.org/2000/svg}"
EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def _serialized_exemplar(name_of_second: str = "GET /cart") -> Exemplar:
    spans = [
        WaterfallSpan("root", None, "frontend", "GET /checkout", 0, 330 * MS),
        WaterfallSpan("a", "root", "frontend", "GET /users", 5 * MS, 105 * MS),
        WaterfallSpan("a1", "a", "users", "SELECT user", 10 * MS, 100 * MS),
        WaterfallSpan("b", "root", "frontend", name_of_second, 107 * MS, 207 * MS),
        WaterfallSpan("c", "root", "frontend", "GET /prices", 210 * MS, 320 * MS, error=True),
    ]
    after = {
        "root": (0, 125 * MS),
        "a": (5 * MS, 105 * MS),
        "a1": (10 * MS, 100 * MS),
        "b": (5 * MS, 105 * MS),
        "c": (5 * MS, 115 * MS),
    }
    return Exemplar("0af7651916cd43dd8448eb211c80319c", spans, {"root", "c"}, {"a", "b", "c"}, after)


def _report(**rec_fields: object) -> dict[str, object]:
    rec = {
        "id": "serialized_calls-0123456789abcdef",
        "rank": 1,
        "kind": "serialized_calls",
        "category": "parallelization",
        "service": "frontend",
        "operation": "GET /checkout",
        "targets": [{"service": "frontend", "operation": "GET /users"}],
        "traces_affected": 20,
        "occurrences": 20,
        "impact": {
            "saved_ms_p50": 205.0,
            "saved_ms_p95": 210.0,
            "saved_ms_total": 4100.0,
            "share_of_root_latency": 0.62,
        },
        "confidence": 0.8,
        "evidence": {"trace_ids": ["0af7651916cd43dd8448eb211c80319c"], "span_ids": ["a", "b", "c"]},
        "title": "Run the three calls of GET /checkout concurrently",
        "summary": "They run one after another.",
        "actions": ["Issue them together (asyncio.gather)."],
    }
    rec.update(rec_fields)
    return {
        "schema": "hourglass.report/v1",
        "generated_at": "2026-11-28T00:00:00Z",
        "traces_analyzed": 20,
        "spans_analyzed": 100,
        "recommendations": [rec],
    }


def _svg_root(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, or this raises


def test_waterfall_marks_critical_path_bottleneck_and_saving() -> None:
    ex = _serialized_exemplar()
    svg = render_waterfall_svg(ex, {"frontend": "#4e79a7", "users": "#f28e2b"}, figure_id="wf-1")
    root = _svg_root(svg)
    bars = [r for r in root.iter(f"{SVG_NS}rect") if "bar" in (r.get("class") or "").split()]
    assert len(bars) == 2 * 5  # before and after, one bar per span
    bottleneck = [r for r in bars if "bar-bottleneck" in r.get("class", "")]
    on_path = [r for r in bars if "bar-path" in r.get("class", "")]
    assert len(bottleneck) == 2 * 3
    assert len(on_path) == 2 * 2
    texts = "".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "Before · 330 ms" in texts
    assert "saves 205 ms (62%)" in texts
    assert "−205 ms" in texts
    # Same time scale in both panels: the re-timed root bar is 125/330 of the original.
    root_before, root_after = sorted(
        (r for r in on_path if "bar-bottleneck" not in r.get("class", "")), key=lambda r: float(r.get("x", 0))
    )
    ratio = float(root_after.get("width", 0)) / float(root_before.get("width", 1))
    assert abs(ratio - 125 / 330) < 0.01
    # Tooltips on every row.
    titles = [t.text or "" for t in root.iter(f"{SVG_NS}title")]
    assert any("GET /prices" in t and "error status" in t and "bottleneck span" in t for t in titles)


def test_removed_spans_are_drawn_as_ghosts() -> None:
    ex = _serialized_exemplar()
    assert ex.after is not None
    del ex.after["b"]
    svg = render_waterfall_svg(ex, {}, figure_id="wf-2")
    ghosts = [r for r in _svg_root(svg).iter(f"{SVG_NS}rect") if r.get("class") == "bar-removed"]
    assert len(ghosts) == 1


def test_untrusted_strings_are_escaped_everywhere() -> None:
    ex = _serialized_exemplar(name_of_second=EVIL)
    ex = Exemplar(
        ex.trace_id,
        [*ex.spans, WaterfallSpan("d", "root", EVIL, "x", 0, MS)],
        ex.critical_path,
        ex.bottleneck,
        ex.after,
    )
    page = render_report_html(
        _report(
            title=EVIL, summary=EVIL, actions=[EVIL], service=EVIL, evidence={"trace_ids": [EVIL], EVIL: EVIL}
        ),
        {"serialized_calls-0123456789abcdef": ex},
    )
    assert "<script" not in page
    assert "<img" not in page
    assert "&lt;script&gt;" in page
    # The SVG of the page stays well-formed XML.
    svg = re.search(r"<svg class=\"waterfall\".*?</svg>", page, re.S)
    assert svg is not None
    _svg_root(svg.group(0))


def test_backticks_become_code_after_escaping() -> None:
    page = render_report_html(_report(summary="calls `GET /a?x=<b>` then `<script>`", title="`svc` slow"))
    assert "<code>GET /a?x=&lt;b&gt;</code>" in page
    assert "<code>&lt;script&gt;</code>" in page
    assert "<script" not in page


def test_page_is_self_contained() -> None:
    page = render_report_html(_report(), {"serialized_calls-0123456789abcdef": _serialized_exemplar()})
    # No scripts, no external resources: the only URL is the SVG namespace identifier.
    assert "<script" not in page
    urls = set(re.findall(r"(?:https?:)?//[^\s\"')<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert not re.search(r"\b(src|href)=\"(?!#)", page)
    assert "Content-Security-Policy" in page
    assert "Run the three calls of GET /checkout concurrently" in page
    assert 'href="#rec-serialized_calls-0123456789abcdef"' in page


def test_empty_report_says_so() -> None:
    page = render_report_html(
        {"schema": "hourglass.report/v1", "traces_analyzed": 5, "spans_analyzed": 9, "recommendations": []}
    )
    assert "No bottlenecks found" in page
    assert '<svg class="waterfall"' not in page


def test_big_trace_is_cut_keeping_path_and_bottleneck() -> None:
    spans = [WaterfallSpan("r", None, "svc", "root", 0, 10_000 * MS)]
    spans += [WaterfallSpan(f"s{i}", "r", "svc", f"op{i}", i * MS, (i + 1) * MS) for i in range(10_000)]
    ex = Exemplar("t" * 32, spans, critical_path={"r", "s9999"}, bottleneck={"s5000"})
    ordered = tree_order(spans)
    assert len(ordered) == 10_001
    rows = select_rows(ordered, ex.critical_path | ex.bottleneck)
    ids = [s.span_id for s, _ in rows]
    assert len(rows) == MAX_ROWS
    assert {"r", "s9999", "s5000"} <= set(ids)
    svg = render_waterfall_svg(ex, {}, figure_id="big")
    assert "9953 more spans not shown" in svg


def test_tree_order_survives_cycles_and_orphans() -> None:
    spans = [
        WaterfallSpan("a", "b", "s", "a", 0, MS),
        WaterfallSpan("b", "a", "s", "b", MS, 2 * MS),  # a cycle: corrupt input
        WaterfallSpan("c", "missing", "s", "c", 0, MS),  # an orphan
        WaterfallSpan("d", "d", "s", "d", 0, MS),  # its own parent
    ]
    ordered = tree_order(spans)
    assert sorted(s.span_id for s, _ in ordered) == ["a", "b", "c", "d"]


def test_axis_ticks_are_round() -> None:
    assert nice_step_ms(330) == 100
    assert nice_step_ms(0.9) == 0.2
    assert fmt_tick(200, 100) == "200 ms"
    assert fmt_tick(0.4, 0.2) == "0.4 ms"
    assert fmt_tick(4000, 1000) == "4 s"


# ----------------------------------------------------------------------------------------------
# `hourglass report` through the real console script

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample-traces" / "serialized_calls.otlp.jsonl"


def _hourglass(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = ROOT / ".venv" / "bin" / "hourglass"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hourglass"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
def test_report_cli_from_files_and_from_a_store(tmp_path: Path) -> None:
    # Files alone: a good file and a broken one beside it.
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"resourceSpans": [ {"oops": \n')
    out = tmp_path / "report.html"
    done = _hourglass("report", "--html", str(out), str(SAMPLE), str(broken), cwd=tmp_path)
    assert done.returncode == 2, done.stderr  # written, but something was skipped
    assert "broken.jsonl" in done.stderr
    page = out.read_text()
    assert '<svg class="waterfall"' in page
    assert "serialized_calls" in page and "After (re-timed)" in page
    assert "<script" not in page

    as_json = _hourglass("report", "--format", "json", str(SAMPLE), cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["schema"] == "hourglass.report/v1"
    serialized = [r for r in report["recommendations"] if r["kind"] == "serialized_calls"]
    assert serialized

    as_markdown = _hourglass("report", "--format", "markdown", str(SAMPLE), cwd=tmp_path)
    assert as_markdown.returncode == 0, as_markdown.stderr
    assert serialized[0]["id"] in as_markdown.stdout

    # The same spans through a store give the same recommendations and the same page content.
    db = tmp_path / "store.duckdb"
    imported = _hourglass("import", "--db", str(db), str(SAMPLE), cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    from_store = tmp_path / "from-store.html"
    done = _hourglass("report", "--db", str(db), "--html", str(from_store), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    store_page = from_store.read_text()
    for rec in report["recommendations"]:
        assert f'id="rec-{rec["id"]}"' in store_page

    missing = _hourglass("report", "--db", str(tmp_path / "nope.duckdb"), "--html", str(out), cwd=tmp_path)
    assert missing.returncode == 2 and "no such store" in missing.stderr


# --- issue 13: sequence diagrams, design, workstreams ---------------------------------------------

SEQUENCE = "\n".join(
    [
        "sequenceDiagram",
        "    participant P1 as frontend",
        "    participant P2 as users",
        "    participant P3 as cart#59; v2 #35;1",
        "    Note over P1: GET /checkout · 310 ms",
        "    par 2 calls at the same time",
        "        P1->>P2: GET /users (100 ms)",
        "        P2-->>P1: 100 ms",
        "    and",
        "        P1->>P3: GET /cart (100 ms)",
        "        P3-->>P1: 100 ms",
        "    end",
        "    loop 3 calls one after another (30 ms in all)",
        "        P1->>P1: compute (10 ms each, median)",
        "    end",
    ]
)


def test_sequence_diagram_parses_participants_messages_and_blocks() -> None:
    from hourglass.api.sequence_svg import parse, render_sequence_svg

    seq = parse(SEQUENCE)
    assert seq.display_names() == ["frontend", "users", "cart; v2 #1"]
    kinds = [s.kind for s in seq.steps]
    assert kinds.count("message") == 5 and kinds.count("block") == 2 and kinds.count("end") == 2
    svg = render_sequence_svg(SEQUENCE, figure_id="seq-1", title="Before")
    root = _svg_root(svg)
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG_NS}text")]
    assert texts.count("frontend") == 2  # a box at the top and at the bottom of each lifeline
    assert "cart; v2 #1" in texts
    assert any(t.startswith("GET /users (100 ms)") for t in texts)
    assert len(list(root.iter(f"{SVG_NS}marker"))) == 1
    blocks = [g for g in root.iter(f"{SVG_NS}g") if "seq-block" in (g.get("class") or "")]
    assert {b.get("class") for b in blocks} == {"seq-block seq-block-par", "seq-block seq-block-loop"}
    assert render_sequence_svg("sequenceDiagram", figure_id="x") == ""


def test_untrusted_names_in_sequence_diagrams_are_escaped() -> None:
    from hourglass.api.sequence_svg import render_sequence_svg

    evil = EVIL.replace("#", "#35;").replace(";", "#59;")
    text = f"sequenceDiagram\n participant P1 as {evil}\n P1->>P1: {evil} (1 ms)\n Note over P1: {evil}"
    svg = render_sequence_svg(text, figure_id='a"b')
    assert "<script" not in svg and "<img" not in svg
    _svg_root(svg)


def test_page_shows_design_sequences_and_workstreams() -> None:
    design = {
        "pattern": {
            "name": "scatter-gather with one shared deadline",
            "parameters": {"shared_deadline_ms": 101.5},
            "summary": "Start the `3` calls together.",
        },
        "rationale": "Because " + EVIL,
        "dependencies": "None between the calls.",
        "consistency": "None for reads.",
        "failure_handling": "Cancel the others.",
        "verification": "Watch `GET /checkout`.",
        "tests": "Fault-inject one call.",
        "pseudocode": {"language": "python", "code": "async with asyncio.TaskGroup() as tg:  # " + EVIL},
        "sequence": {"before": SEQUENCE, "after": SEQUENCE, "trace_id": "0af7651916cd43dd8448eb211c80319c"},
        "predicted": {},
    }
    report = _report(design=design)
    report["workstreams"] = [
        {
            "id": "ws-frontend",
            "service": "frontend",
            "namespace": "shop",
            "owner": "team-a",
            "wave": 1,
            "recommendations": ["serialized_calls-0123456789abcdef"],
            "depends_on": [],
            "parallel_with": [],
            "impact": {"saved_ms_p50": 205.0, "saved_ms_p95": 210.0},
            "title": "`frontend`: 1 change",
            "summary": "Changes in `frontend`.",
        }
    ]
    page = render_report_html(report, {})
    assert page.count('<svg class="sequence"') == 2
    assert "Design: scatter-gather with one shared deadline" in page
    assert "shared_deadline_ms = 101.500" in page
    assert '<section class="workstreams">' in page and "team-a" in page
    assert "<script" not in page and "<img src=x" not in page
    assert "asyncio.TaskGroup" in page
