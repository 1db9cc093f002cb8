"""The repaired context's shortcuts for spans in canonical order give what the general paths give:
parent links by a join of the keys (against the sorted lookup), siblings ordered by one packed
key (against three sorts), the trace frame from arrays (against the polars frame), the endpoint
path rows without the join on trace ids (against it)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from hourglass.analysis import context as context_module
from hourglass.analysis import endpoint_path, repair
from hourglass.analysis.context import AnalysisContext, _trace_frame, _trace_frame_in_order
from hourglass.analysis.critical_path import _order_by_parent_and_end
from hourglass.analysis.endpoint_path import path_rows

BASE = 1_760_000_000_000_000_000


def random_spans(seed: int, traces: int = 150) -> pl.DataFrame:
    """Traces of 1-30 spans with ties in start times, orphans, self parents, empty parent ids,
    several roots, cross-service children and missing kinds; in canonical order."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {c: [] for c in ("trace_id", "span_id", "parent_span_id", "service", "name")}
    rows.update(kind=[], start_ns=[], end_ns=[], host=[], follows_from=[])
    for t in range(traces):
        n = int(rng.integers(1, 30))
        ids = [f"{t:04x}{i:012x}" for i in range(n)]
        for i in range(n):
            roll = rng.random()
            if i == 0 or roll < 0.03:
                parent = None
            elif roll < 0.06:
                parent = "absent"
            elif roll < 0.08:
                parent = ids[i]
            elif roll < 0.10:
                parent = ""
            else:
                parent = ids[int(rng.integers(0, i))]
            start = BASE + int(rng.integers(0, 40)) * 1_000_000
            rows["trace_id"].append(f"{t:032x}")
            rows["span_id"].append(ids[i])
            rows["parent_span_id"].append(parent)
            rows["service"].append(f"svc{int(rng.integers(0, 4))}")
            rows["name"].append(str(rng.choice(["GET /a", "SELECT x", "work", "sql.query"])))
            rows["kind"].append(int(rng.integers(0, 6)))
            rows["start_ns"].append(start)
            rows["end_ns"].append(start + int(rng.integers(0, 30)) * 1_000_000)
            rows["host"].append(None if rng.random() < 0.2 else f"h{int(rng.integers(0, 3))}")
            rows["follows_from"].append(bool(rng.random() < 0.05))
    frame = pl.DataFrame(rows, schema_overrides={"kind": pl.Int8})
    return frame.sort(["trace_id", "start_ns", "span_id"])


def reference_parents(df: pl.DataFrame) -> np.ndarray:
    where = {(t, s): i for i, (t, s) in enumerate(zip(df["trace_id"], df["span_id"], strict=True))}
    out = []
    for t, s, p in zip(df["trace_id"], df["span_id"], df["parent_span_id"], strict=True):
        out.append(where.get((t, p), -1) if p and p != s else -1)
    return np.array(out, dtype=np.int64)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_parent_links_by_join_and_by_sorted_lookup_agree(seed: int) -> None:
    df = context_module.to_analysis_frame(random_spans(seed))
    keys = repair.span_keys(df)
    assert repair.distinct_keys(keys)
    joined = repair.link_parents(df, keys, True)
    looked_up = repair.link_parents(df, keys, False)
    np.testing.assert_array_equal(joined[0], looked_up[0])
    np.testing.assert_array_equal(joined[1], looked_up[1])
    np.testing.assert_array_equal(joined[0], reference_parents(df))


def test_duplicates_in_canonical_order_are_still_removed() -> None:
    df = random_spans(4, traces=5)
    # the same span again, a nanosecond later and longer (it wins): the rows stay in canonical order
    copy = df.head(1).with_columns(pl.col("start_ns") + 1, pl.col("end_ns") + 2)
    both = pl.concat([copy, df]).sort(["trace_id", "start_ns", "span_id"])
    assert context_module._is_canonical_order(context_module.to_analysis_frame(both))
    ctx = AnalysisContext.from_table(both)
    assert ctx.spans.height == df.height
    first = ctx.spans.filter(pl.col("span_id") == df["span_id"][0])
    assert first["end_ns"].item() - first["clock_skew_ns"].item() == df["end_ns"][0] + 2


def reference_order(par: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    return np.lexsort((np.arange(par.size), start, end, par))


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_siblings_ordered_by_one_packed_key_as_by_three_sorts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 2000
    par = np.sort(rng.integers(0, 300, n)).astype(np.int64)
    rng.shuffle(par[: n // 3])  # partly out of order
    start = BASE + rng.integers(0, 50, n) * 1000
    end = start + rng.integers(0, 20, n) * 1000  # many ties on (parent, end), starts either way
    parent_start = BASE + rng.integers(-5, 5, n) * 1000
    expected = reference_order(par, start, end)
    np.testing.assert_array_equal(_order_by_parent_and_end(par, start, end, parent_start), expected)
    # ties whose starts only rise in position order: the packed key alone
    start_rising = np.sort(start)
    expected = reference_order(par, start_rising, end)
    np.testing.assert_array_equal(_order_by_parent_and_end(par, start_rising, end, parent_start), expected)
    # values too far apart to pack
    far = end.copy()
    far[0] = 1 << 62
    expected = reference_order(par, start, far)
    np.testing.assert_array_equal(_order_by_parent_and_end(par, start, far, parent_start), expected)


@pytest.mark.parametrize("seed", [8, 9, 10])
def test_trace_frame_from_arrays_equals_the_polars_frame(seed: int) -> None:
    ctx = AnalysisContext.from_table(random_spans(seed))
    spans = ctx.spans
    assert (
        spans["orphan"].any()
        and (spans.group_by("trace_id").agg(pl.col("is_root").sum())["is_root"] > 1).any()
    )
    expected = _trace_frame(spans)
    assert ctx.traces.equals(expected)
    assert ctx.traces.schema == expected.schema


def test_roots_tied_on_the_choice_take_the_polars_frame() -> None:
    df = pl.DataFrame(
        {
            "trace_id": ["t1", "t1", "t2"],
            "span_id": ["a", "b", "c"],
            "parent_span_id": [None, None, None],
            "service": ["s", "s", "s"],
            "name": ["x", "y", "z"],
            "kind": [2, 2, 2],
            "start_ns": [BASE, BASE, BASE],
            "end_ns": [BASE + 10, BASE + 10, BASE + 5],
        },
        schema_overrides={"kind": pl.Int8},
    )
    ctx = AnalysisContext.from_table(df)
    spans = ctx.spans
    trace = np.array([0, 0, 1])
    args = (spans["is_root"].to_numpy(), spans["orphan"].to_numpy())
    times = (spans["start_ns"].to_numpy(), spans["duration_ns"].to_numpy())
    assert _trace_frame_in_order(spans, trace, *args, *times) is None
    assert ctx.traces.equals(_trace_frame(spans))
    assert ctx.traces["incomplete"].to_list() == [True, False]


@pytest.mark.parametrize("seed", [11, 12])
def test_endpoint_path_rows_without_the_join_equal_the_join(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = AnalysisContext.from_table(random_spans(seed, traces=300))
    assert endpoint_path._own_tree_on_path_in_order(ctx) is not None
    fast = path_rows(ctx)
    monkeypatch.setattr(endpoint_path, "_own_tree_on_path_in_order", lambda ctx: None)
    joined = path_rows(ctx)
    assert fast.traces.equals(joined.traces)
    key = ["trace_id", "service", "name"]
    assert fast.operations.sort(key).equals(joined.operations.sort(key))
    assert fast.paths.equals(joined.paths)
    assert fast.nodes.equals(joined.nodes)


def test_spans_out_of_the_traces_order_take_the_join() -> None:
    ctx = AnalysisContext.from_table(random_spans(13, traces=20))
    shuffled = AnalysisContext(spans=ctx.spans.reverse(), traces=ctx.traces)
    assert endpoint_path._own_tree_on_path_in_order(shuffled) is None


def test_a_context_in_any_input_order_is_the_same() -> None:
    df = random_spans(14)
    canonical = AnalysisContext.from_table(df)
    shuffled = AnalysisContext.from_table(df.sample(fraction=1.0, shuffle=True, seed=3))
    assert canonical.spans.equals(shuffled.spans)
    assert canonical.traces.equals(shuffled.traces)


def test_building_a_context_does_not_import_pandas() -> None:
    """parent_row's nulls were made by ``pa.array`` of a numpy array with a mask, which imports
    pandas: ~20 MiB more in every worker for the rest of its life."""
    code = (
        "import sys, polars as pl\n"
        "from hourglass.analysis.context import AnalysisContext\n"
        "df = pl.DataFrame({'trace_id': ['t', 't'], 'span_id': ['a', 'b'], 'parent_span_id': [None, 'a'],\n"
        "    'service': ['s', 's'], 'name': ['x', 'y'], 'start_ns': [1, 2], 'end_ns': [9, 5]})\n"
        "ctx = AnalysisContext.from_table(df)\n"
        "assert ctx.spans['parent_row'].to_list() == [None, 0]\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_null_trace_ids_take_the_general_paths() -> None:
    """A null trace id is not a trace (each such span its own run when linking parents, one
    group in the polars trace frame): the shortcuts step aside."""
    df = random_spans(15, traces=4).with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(None).otherwise(pl.col("trace_id")).alias("trace_id")
    )
    ctx = AnalysisContext.from_table(df)
    assert ctx.traces.equals(_trace_frame(ctx.spans))
    assert endpoint_path._own_tree_on_path_in_order(ctx) is None
    path_rows(ctx)


def test_the_root_chosen_from_arrays_orders_the_widest_duration_last() -> None:
    """A root whose duration wraps to the lowest int64 (end - start = 2^63) is the shortest to the
    polars frame's descending sort; numpy's ``-duration`` left that value as it was, so it came
    first and the arrays chose it as the trace's root."""
    frame = pl.DataFrame(
        {
            "trace_id": ["a"] * 3,
            "span_id": ["1", "2", "3"],
            "parent_span_id": [None, None, "2"],
            "service": ["s"] * 3,
            "name": ["x", "y", "z"],
            "kind": [0, 0, 0],
            "start_ns": [-(2**62), BASE, BASE + 10],
            "end_ns": [2**62, BASE + 100, BASE + 20],
            "host": [None] * 3,
            "follows_from": [False] * 3,
        },
        schema_overrides={"kind": pl.Int8},
    )
    ctx = AnalysisContext.from_table(frame)
    assert ctx.traces["root_span_id"].to_list() == ["2"]
    assert ctx.traces["root_duration_ns"].to_list() == [100]
