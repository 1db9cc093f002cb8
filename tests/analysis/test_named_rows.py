"""The detectors build their occurrences from ``_common.named_rows``: the rows ``iter_rows(named=True)``
gives, value for value (types included), read column by column."""

from __future__ import annotations

import polars as pl

from hourglass.analysis.detectors._common import named_rows


def test_named_rows_are_iter_rows() -> None:
    frame = pl.DataFrame(
        {
            "trace_id": ["a", "b", None],
            "span_id": [["s1", "s2"], [], None],
            "calls": [3, None, 1],
            "serial_ns": [1.5, float("nan"), None],
            "flag": [True, False, None],
            "numbers": [[1, 2], [3], []],
            "pair": [{"x": 1, "y": "u"}, None, {"x": None, "y": "v"}],
        }
    )
    expected = list(frame.iter_rows(named=True))
    got = list(named_rows(frame))
    assert len(got) == 3 and repr(got) == repr(expected)
    assert [[type(v) for v in r.values()] for r in got] == [[type(v) for v in r.values()] for r in expected]
    assert list(named_rows(frame.clear())) == [] and list(named_rows(pl.DataFrame())) == []
