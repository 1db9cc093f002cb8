"""A finding's traces counted and its first exemplars decoded from the occurrence table
(``Occurrences.unique_trace_count`` / ``first_trace_ids``, what the report reads instead of
``Finding.trace_ids``, a Python string per trace) are those of ``Finding.trace_ids``: ids held
as words or as text, repeated or not, parked or not."""

from __future__ import annotations

import random

import pytest

from hourglass.analysis.model import CollapseSpans, Occurrence, Occurrences


def _table(style: str) -> Occurrences:
    rng = random.Random(style)
    traces = [f"{rng.getrandbits(128):032x}" for _ in range(40)]
    if style == "text":
        traces[7] = "Trace-Not-Hex"
    chosen = [rng.choice(traces) for _ in range(300)]
    return Occurrences.from_list(
        Occurrence(t, (f"{i:016x}", f"{i + 1:016x}"), (CollapseSpans((f"{i + 1:016x}",), 5),))
        for i, t in enumerate(chosen)
    )


@pytest.mark.parametrize("style", ["words", "text"])
@pytest.mark.parametrize("count", [0, 1, 5, 40, 100])
def test_trace_counts_and_first_exemplars_are_those_of_the_trace_ids(
    style: str, count: int, tmp_path
) -> None:
    table = _table(style)
    assert (table._trace.words is None) == (style == "text")
    unique = table.unique_trace_ids()
    for t in (table, table.take(list(range(0, 300, 7)))):
        expected = t.unique_trace_ids()
        assert t.unique_trace_count() == len(expected)
        assert t.first_trace_ids(count) == expected[:count]
    table.park(str(tmp_path))
    assert table.unique_trace_count() == len(unique) and table.first_trace_ids(count) == unique[:count]


def test_the_report_lets_each_findings_read_back_columns_go(tmp_path) -> None:
    """build_report reads a parked finding's columns back (its trace ids, its exemplars' rows) and
    lets them go again before the next finding's: serve's round held every finding's at once."""
    from hourglass.analysis import model
    from hourglass.analysis.ranking import Scored
    from hourglass.analysis.report import build_report
    from tests.analysis.test_n_plus_one import detect, orders_page

    findings = [*detect(*[orders_page() for _ in range(6)]), *detect(*[orders_page(n=7) for _ in range(4)])]
    assert len(findings) == 2
    expected = build_report(
        [Scored(f, None, 1.0, False) for f in findings], traces_analyzed=10, spans_analyzed=1
    )
    for f in findings:
        f.occurrence_table.park(str(tmp_path))
    report = build_report(
        [Scored(f, None, 1.0, False) for f in findings], traces_analyzed=10, spans_analyzed=1
    )
    for key in ("generated_at",):
        report.pop(key), expected.pop(key)
    assert report == expected
    for f in findings:
        assert not [n for n in model._PARKED if model._has_slot(f.occurrence_table, n)]


@pytest.mark.parametrize("style", ["words", "text"])
def test_the_roots_of_a_findings_trace_series_are_those_of_its_trace_ids(style: str) -> None:
    """pipeline.score looks up a finding's traces' roots by its trace-id series (not a Python
    string per trace): the same rows as by the list."""
    import polars as pl

    from hourglass.analysis.model import TraceRoots

    table = _table(style)
    ids = table.unique_trace_ids()
    assert table.unique_trace_series().to_list() == ids
    everyone = [*ids[::2], "0" * 32, *ids[1::2]]
    roots = TraceRoots.of(
        pl.DataFrame({"trace_id": everyone, "root_duration_ns": list(range(len(everyone)))})
    )
    picked = table.take(list(range(0, 300, 3)))
    expected = roots.roots_of(picked.unique_trace_ids())
    assert roots.roots_of(picked.unique_trace_series()).equals(expected) and expected.height > 3
