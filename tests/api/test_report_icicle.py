"""The report page's "Where each endpoint waits" section: an icicle per endpoint as inline SVG."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

from hourglass.analysis.pipeline import analyze
from hourglass.api.report_html import render_report_html
from hourglass.collector.files import read_trace_files

ROOT = Path(__file__).resolve().parents[2]


def test_icicle_of_the_ledger_transfers_shows_the_lock_wait() -> None:
    problems: list[object] = []
    tables = read_trace_files(
        [str(ROOT / "sample-traces" / "lock_contention.otlp.jsonl")], on_error=problems.append
    )
    report = analyze(next(t for t in tables if t.num_rows))
    assert not problems
    paths = {p["operation"]: p for p in report["critical_paths"]}
    assert set(paths) == {"POST /accounts/{account_id}/transfers", "GET /accounts/{account_id}/statement"}
    page = render_report_html(report, {})
    HTMLParser().feed(page)  # well-formed enough to parse
    section = page[page.index('id="critical-paths"') :]
    assert "<script" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>]+", section))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # nothing loaded from anywhere
    figures = re.findall(r'<svg class="icicle" id="icicle-(\d+)".*?</svg>', section, re.S)
    assert len(figures) == 2
    transfers = next(i for i, p in enumerate(report["critical_paths"]) if p["operation"].startswith("POST"))
    svg = re.search(rf'<svg class="icicle" id="icicle-{transfers}".*?</svg>', section, re.S)
    assert svg is not None
    ET.fromstring(svg.group(0))  # well-formed XML, or this raises
    boxes = {
        title.split("\n")[0]: float(width)
        for title, width in re.findall(
            r"<title>([^<]*)</title><rect [^>]*?\swidth=\"([\d.]+)\"", svg.group(0)
        )
    }
    root = boxes["ledger · POST /accounts/{account_id}/transfers"]
    lock = boxes["ledger · lock.acquire ledger.journal"]
    assert root > 1000 and lock > 0.5 * root  # the lock wait takes most of the endpoint's width
    assert "lock.acquire ledger.journal" in section and "of traces:" in section
