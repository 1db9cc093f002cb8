"""The detectors build their occurrences from ``_common.column_values``: each column's values as
``Series.to_list`` gives them (types included), a list column without null lists as tuples read
from one flat list — whatever the chunks, slices, empty lists and nulls inside the lists."""

from __future__ import annotations

import polars as pl

from hourglass.analysis.detectors._common import column_values


def _expected(series: pl.Series) -> list[object]:
    values = series.to_list()
    if isinstance(series.dtype, pl.List) and not series.dtype.inner.is_nested() and not series.null_count():
        return [tuple(v) for v in values]
    return values


def test_column_values_are_to_list() -> None:
    frame = pl.DataFrame(
        {
            "trace_id": ["a", "b", None, "d"],
            "span_id": [["s1", "s2"], [], ["s3", None], ["s4"]],
            "with_null_list": [["x"], None, [], ["y"]],
            "calls": [3, None, 1, 2],
            "serial_ns": [1.5, float("nan"), None, 2.0],
            "flag": [True, False, None, True],
            "numbers": [[1, 2], [3], [], [None]],
            "nested": [[[1]], [], [[2, 3], []], None],
            "pair": [{"x": 1, "y": "u"}, None, {"x": None, "y": "v"}, {"x": 2, "y": None}],
        }
    )
    chunked = pl.concat([frame.slice(0, 1), frame.slice(1, 2), frame.slice(3)], rechunk=False)
    assert chunked.n_chunks() == 3
    for f in (frame, chunked, frame.slice(1, 2), chunked.slice(1, 3), frame.clear()):
        got = column_values(f, f.columns)
        expected = [_expected(f[c]) for c in f.columns]
        assert repr(got) == repr(expected), f
        assert [[type(v) for v in col] for col in got] == [[type(v) for v in col] for col in expected]
    assert column_values(frame, ["span_id"]) == [[("s1", "s2"), (), ("s3", None), ("s4",)]]
    assert column_values(frame, ["with_null_list"]) == [[["x"], None, [], ["y"]]]  # as to_list
