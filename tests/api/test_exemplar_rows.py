"""``exemplars.drawn_rows``: the rows of a large exemplar trace that the report page draws,
computed on the columns, are the rows ``report_html`` keeps when given every span (its tree order,
the critical path, the bottleneck and their ancestors first), on random trees with ties, orphans,
spans their own parent and deep chains; traces it cannot order so are left to the page."""

from __future__ import annotations

import random

import polars as pl
import pytest

from hourglass.api import report_html
from hourglass.api.exemplars import DRAWN_MAX_DEPTH, drawn_rows


def _trace(rng: random.Random, n: int) -> pl.DataFrame:
    ids = [f"{i:016x}" for i in rng.sample(range(1, 10 * n), n)]
    rows = []
    for i, span_id in enumerate(ids):
        roll = rng.random()
        if i == 0 or roll < 0.03:
            parent = None if roll < 0.015 else "ffffffffffffffff"  # a root, or an orphan
        elif roll < 0.05:
            parent = span_id  # its own parent: a root
        else:
            parent = ids[rng.randrange(max(0, i - rng.choice([1, 3, 50])), i)]  # deep and wide
        start = rng.choice([0, 5, 5, 10]) * 1_000 + rng.randrange(0, 3) * 1_000_000 * (i % 7)
        end = start + rng.choice([-10, 0, 1_000, 2_000_000])  # (an end before the start too)
        rows.append({"span_id": span_id, "parent_span_id": parent, "service": f"s{i % 5}", "name": "op",
                     "start_ns": start, "end_ns": end, "status_code": 0})  # fmt: skip
    return pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=rng.randrange(1 << 30))


def _page_rows(frame: pl.DataFrame, must_show: set[str]) -> list[tuple[str, int]]:
    spans = report_html.spans_from_rows(frame.to_dicts())
    rows = report_html.select_rows(report_html.tree_order(spans), must_show)
    return [(s.span_id, depth) for s, depth in rows]


@pytest.mark.parametrize("seed", range(12))
def test_the_drawn_rows_are_the_rows_the_page_keeps_of_every_span(seed: int) -> None:
    rng = random.Random(seed)
    frame = _trace(rng, rng.choice([60, 200, 1500]))
    ids = frame["span_id"].to_list()
    must_show = set(rng.sample(ids, rng.choice([0, 1, 5, 80]))) | {"not-in-this-trace"}
    drawn = drawn_rows(frame, must_show)
    assert drawn is not None
    expected = _page_rows(frame, must_show)
    assert frame[drawn]["span_id"].to_list() == [span_id for span_id, _ in expected]
    # the page, given only the drawn rows, draws them in the same order at the same depths
    assert _page_rows(frame[drawn], must_show) == expected
    assert len(expected) == report_html.MAX_ROWS


def test_traces_it_cannot_order_are_left_to_the_page() -> None:
    rng = random.Random(7)
    small = _trace(rng, 30)
    assert drawn_rows(small, set()) is None  # every span is drawn anyway
    frame = _trace(rng, 100)
    ids = frame["span_id"].to_list()
    repeated = frame.with_columns(pl.Series("span_id", [ids[0], *ids[:-1]]))
    assert drawn_rows(repeated, set()) is None
    looped = frame.with_columns(  # the first two spans each other's parent
        pl.when(pl.col("span_id") == ids[0]).then(pl.lit(ids[1]))
        .when(pl.col("span_id") == ids[1]).then(pl.lit(ids[0]))
        .otherwise(pl.col("parent_span_id")).alias("parent_span_id")
    )  # fmt: skip
    assert drawn_rows(looped, set()) is None
    chain = pl.DataFrame(
        {
            "span_id": [f"{i:016x}" for i in range(1, DRAWN_MAX_DEPTH + 3)],
            "parent_span_id": [None, *(f"{i:016x}" for i in range(1, DRAWN_MAX_DEPTH + 2))],
            "start_ns": list(range(DRAWN_MAX_DEPTH + 2)),
            "end_ns": [10**6] * (DRAWN_MAX_DEPTH + 2),
        }
    )
    assert drawn_rows(chain, set()) is None
