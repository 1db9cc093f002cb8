"""The REST trace view and the report page show one trace the same way (issue 16), over real HTTP.

Traces whose ``cart`` server clock runs 9 ms late: the clock-skew repair moves its spans back
inside their client call. ``GET /v1/traces/{id}`` must give the repaired timings the page draws
(with the stored ones alongside), the same critical path and the same bottleneck spans, both from
the run's one trace index (``hourglass.analysis.trace_index``).
"""

from __future__ import annotations

import html
import re

import pytest

from hourglass.api.report_html import fmt_ms
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.api.test_rest_api import _in_process
from tests.builders import TraceBuilder, spans_table

pytestmark = pytest.mark.timeout(180)

SKEW_MS = 9.0


def _checkout(i: int) -> TraceBuilder:
    b = TraceBuilder(service="frontend", base_ns=1_760_000_000_000_000_000 + i * 1_000_000_000)
    root = b.span("GET /checkout", start_ms=0, dur_ms=100, kind=KIND_SERVER, host="web-1")
    for j, (service, start) in enumerate((("users", 5.0), ("cart", 35.0), ("prices", 65.0))):
        call = b.span(
            f"GET /{service}", parent=root, start_ms=start, dur_ms=25, kind=KIND_CLIENT, host="web-1"
        )
        late = (
            SKEW_MS if service == "cart" else 0.0
        )  # cart's clock is late: its server span lies outside the call
        parent = call
        # the service's server span, then its query inside it
        for name, offset, dur, kind in (
            (f"GET /{service}", 1, 23, KIND_SERVER),
            (f"SELECT {service}", 3, 18, KIND_CLIENT),
        ):
            parent = b.span(
                name,
                parent=parent,
                service=service,
                start_ms=start + offset + late,
                dur_ms=dur,
                kind=kind,
                host=f"{service}-{j}",
            )
    return b


_ROW = re.compile(r'<g class="row"><title>(.*?)</title>', re.S)
_TIMES = re.compile(r"start \+(.+?), duration (.+)")


def _page_rows(page: str, rec_id: str) -> dict[str, dict[str, object]]:
    """span id -> {start, duration, on_path, bottleneck} as the page's exemplar tooltips say."""
    anchor = "wf-" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in rec_id)
    start = page.index(f'id="{anchor}"')
    svg = page[start : page.index("</svg>", start)]
    rows: dict[str, dict[str, object]] = {}
    for raw in _ROW.findall(svg):
        lines = html.unescape(raw).split("\n")
        times = _TIMES.fullmatch(lines[1])
        assert times is not None, lines
        span_id = lines[-1].removeprefix("span ")
        roles = lines[2] if len(lines) == 4 else ""
        rows[span_id] = {
            "start": times.group(1),
            "duration": times.group(2),
            "on_path": "on the critical path" in roles,
            "bottleneck": "bottleneck span" in roles,
        }
    return rows


def test_rest_trace_view_matches_the_report_page() -> None:
    builders = [_checkout(i) for i in range(20)]
    store = DuckDBSpanStore(":memory:")
    store.write(spans_table(builders))
    stored = {b.trace_id: {r["span_id"]: r for r in b.rows} for b in builders}
    try:
        with _in_process(store) as client:
            report = client.get("/v1/recommendations").json()
            recs = [r for r in report["recommendations"] if r["kind"] == "serialized_calls"]
            assert len(recs) == 1, [
                (r["kind"], r["service"], r["operation"]) for r in report["recommendations"]
            ]
            rec = recs[0]
            trace_id = rec["evidence"]["trace_ids"][0]
            view = client.get(f"/v1/traces/{trace_id}").json()
            page = client.get("/").text
            detail = client.get(f"/v1/recommendations/{rec['id']}").json()
            other = next(b.trace_id for b in builders if b.trace_id not in rec["evidence"]["trace_ids"])
            other_view = client.get(f"/v1/traces/{other}").json()
    finally:
        store.close()

    assert view["analysis_error"] is None
    spans = {s["span_id"]: s for s in view["spans"]}
    # stored times alongside the repaired ones: start_ns/end_ns as stored, the shift beside them
    for span_id, span in spans.items():
        assert (span["start_ns"], span["end_ns"]) == (
            stored[trace_id][span_id]["start_ns"],
            stored[trace_id][span_id]["end_ns"],
        )
    skewed = [s for s in view["spans"] if s["service"] == "cart"]
    assert len(skewed) == 2 and all(s["clock_skew_ns"] == -int(SKEW_MS * 1e6) for s in skewed), skewed
    for s in skewed:  # the repaired offset, not the stored one
        raw_offset = (s["start_ns"] - min(x["start_ns"] for x in view["spans"])) / 1e6
        assert s["start_offset_ms"] == pytest.approx(raw_offset - SKEW_MS)
    assert view["duration_ms"] == pytest.approx(100.0)

    # the page draws the same spans with the same times, path and bottleneck
    rows = _page_rows(page, rec["id"])
    assert set(rows) == set(spans)
    finding = next(f for f in view["findings"] if f["id"] == rec["id"])
    assert finding["bottleneck_span_ids"], finding
    for span_id, row in rows.items():
        span = spans[span_id]
        assert row["start"] == fmt_ms(span["start_offset_ms"]), (span_id, row, span)
        assert row["duration"] == fmt_ms(span["duration_ms"]), (span_id, row, span)
        assert row["on_path"] == span["on_critical_path"] == (span_id in view["critical_path"])
        assert row["bottleneck"] == (span_id in finding["bottleneck_span_ids"])
    assert set(finding["bottleneck_span_ids"]) <= set(finding["span_ids"])
    # the recommendation's exemplars are the same view
    assert detail["exemplars"][0] == view

    # a trace that is not an exemplar still lists the recommendation (every affected trace is
    # indexed), with its own spans
    touching = [f for f in other_view["findings"] if f["id"] == rec["id"]]
    assert len(touching) == 1 and touching[0]["span_ids"], other_view["findings"]
    assert set(touching[0]["span_ids"]) <= {s["span_id"] for s in other_view["spans"]}
