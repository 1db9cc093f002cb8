"""One line per kind of input problem, with a count and the first positions."""

from __future__ import annotations

from hourglass.collector.files import FileProblem
from hourglass.collector.problem_summary import (
    MAX_KINDS_PER_SOURCE,
    ProblemSummary,
    kind_of,
    note_missing_parents,
)
from tests.builders import TraceBuilder, spans_table


def test_kinds_ignore_indices_line_numbers_and_values() -> None:
    assert kind_of("data[0].spans[3].spanID", "missing") == ("data[].spans[].spanID", "missing")
    assert kind_of(
        "3:resourceSpans[0].scopeSpans[1].spans[2].traceId", "'zzz' is neither 32 hex characters"
    ) == (
        "resourceSpans[].scopeSpans[].spans[].traceId",
        "'…' is neither 32 hex characters",
    )
    assert kind_of("12:4", "invalid JSON: Expecting value; line skipped") == (
        "",
        "invalid JSON: Expecting value; line skipped",
    )
    assert kind_of("byte 1045", "message skipped") == ("byte …", "message skipped")
    assert kind_of("[7].timestamp", "1571896375322 looks like epoch milliseconds; read as such") == (
        "[].timestamp",
        "N looks like epoch milliseconds; read as such",
    )
    assert kind_of(None, "the file holds no spans") == ("", "the file holds no spans")


def test_three_hundred_alike_are_one_line_and_a_lone_one_is_printed_as_is() -> None:
    summary = ProblemSummary()
    for i in range(300):
        summary.add_problem(FileProblem("t.json", f"data[0].spans[{i}].startTime", "missing"))
    summary.add_problem(
        FileProblem("t.json", "data[0].spans[300].duration", "missing; kept as 0", skipped=False)
    )
    summary.add_problem(FileProblem("other.json", None, "the file holds no spans", skipped=False))
    assert summary.lines() == [
        "t.json: 300 skipped: data[].spans[].startTime: missing (at data[0].spans[0].startTime, "
        "data[0].spans[1].startTime, data[0].spans[2].startTime, data[0].spans[3].startTime, "
        "data[0].spans[4].startTime and 295 more; --verbose lists every one)",
        "t.json:data[0].spans[300].duration: warning: missing; kept as 0",
        "other.json: warning: the file holds no spans",
    ]
    assert summary.total() == 302
    first = summary.as_json()[0]
    assert first == {
        "source": "t.json",
        "field": "data[].spans[].startTime",
        "kind": "missing",
        "reason": "missing",
        "skipped": True,
        "count": 300,
        "positions": [f"data[0].spans[{i}].startTime" for i in range(5)],
    }
    every = ProblemSummary(keep_all=True)
    for i in range(300):
        every.add("t.json", f"[{i}].timestamp", "missing")
    assert len(every.kinds()[0].positions) == 300


def test_kinds_per_file_are_bounded() -> None:
    summary = ProblemSummary()
    for i in range(MAX_KINDS_PER_SOURCE + 50):
        summary.add("f.json", f"field_{i}", f"reason {i}")
    kinds = summary.kinds("f.json")
    assert len(kinds) == MAX_KINDS_PER_SOURCE + 1
    assert kinds[-1].path == "(other)" and kinds[-1].count == 50


def test_missing_parents_are_one_warning_per_file() -> None:
    b = TraceBuilder(service="a")
    root = b.span("root", start_ms=0, dur_ms=10)
    b.span("child", parent=root, start_ms=1, dur_ms=2)
    for i in range(7):
        b.span(f"orphan {i}", parent=f"{0xDEAD00 + i:016x}", start_ms=1, dur_ms=2)
    summary = ProblemSummary()
    assert note_missing_parents(summary, [("x.json", [spans_table(b)])]) == 7
    [kind] = summary.kinds()
    assert kind.source == "x.json" and kind.count == 7 and not kind.skipped and len(kind.positions) == 5
    assert kind.positions[0].startswith(f"trace {b.trace_id} span ")
    assert "and 2 more" in kind.line()
    assert note_missing_parents(ProblemSummary(), [("y.json", [spans_table(TraceBuilder())])]) == 0


def test_a_parent_in_another_file_of_the_same_run_is_present() -> None:
    """Per-service exports of one trace: the client spans in one file, the server spans in another."""
    front = TraceBuilder(service="front")
    root = front.span("GET /", start_ms=0, dur_ms=10)
    back = TraceBuilder(service="back", trace_id=front.trace_id)
    back.span("handle", parent=root, start_ms=1, dur_ms=5)
    back.span("lost", parent="00000000000000ff", start_ms=1, dur_ms=5)
    summary = ProblemSummary()
    files = [("front.json", [spans_table(front)]), ("back.json", [spans_table(back)])]
    assert note_missing_parents(summary, files) == 1
    [kind] = summary.kinds()
    assert kind.source == "back.json" and kind.count == 1 and "(parent 00000000000000ff)" in kind.positions[0]
