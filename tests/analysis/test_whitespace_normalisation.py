"""Statement normalisation collapses every whitespace run to one space (the pattern is written to
skip single spaces for speed; it must still treat tabs, newlines and runs like ``\\s+`` does)."""

from __future__ import annotations

import polars as pl
import pytest

from hourglass.analysis.detectors._common import WHITESPACE_RUN, normalized_sql

CASES = [
    "SELECT *\n  FROM t\r\nWHERE  x = 1",
    "a b",
    "a\tb",
    "a \t b",
    " x ",
    "\n",
    "",
    "a\u00a0b",
    "a \u2003 b",
    "  ",
]


@pytest.mark.parametrize("text", CASES)
def test_whitespace_run_collapses_like_backslash_s_plus(text: str) -> None:
    s = pl.Series([text], dtype=pl.String)
    assert s.str.replace_all(WHITESPACE_RUN, " ").to_list() == s.str.replace_all(r"\s+", " ").to_list()


def test_normalized_sql_collapses_newlines_and_tabs() -> None:
    frame = pl.DataFrame({"db_statement": ["SELECT *\n\tFROM items\r\n WHERE  id = 42"]})
    assert frame.select(normalized_sql())["db_statement"][0] == "SELECT * FROM items WHERE id = ?"
