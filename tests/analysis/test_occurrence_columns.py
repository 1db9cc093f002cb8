"""A finding's occurrences held in columns (:class:`hourglass.analysis.model.Occurrences`): every
intervention kind and every shape of numbers round-trips exactly (types included: an int stays an
int, a NaN stays a NaN and an absent number stays absent), the container compares, slices, takes,
concatenates and pickles as the list it was made of, and each column accessor answers as its plain
definition over that list."""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from hourglass.analysis.model import (
    CapConcurrency,
    CollapseSpans,
    Finding,
    Intervention,
    Occurrence,
    Occurrences,
    RunConcurrently,
    ScaleSelf,
    ShortenSpan,
)
from hourglass.analysis.whatif import intervention_to_dict


def _same_exactly(a: Occurrence, b: Occurrence) -> None:
    """Equal, and equal in every type and order a report or a key could see."""
    assert (a.trace_id, a.span_ids, a.key) == (b.trace_id, b.span_ids, b.key)
    assert type(a.span_ids) is tuple
    assert [repr(iv) for iv in a.interventions] == [repr(iv) for iv in b.interventions]
    assert [type(iv) for iv in a.interventions] == [type(iv) for iv in b.interventions]
    assert list(a.numbers) == list(b.numbers)  # the names in their order
    for name, value in b.numbers.items():
        got = a.numbers[name]
        assert type(got) is type(value), name
        assert repr(got) == repr(value), name


def _random_occurrences(seed: int, n: int) -> list[Occurrence]:
    rng = random.Random(seed)
    traces = [f"{rng.getrandbits(128):032x}" for _ in range(max(n // 3, 1))] + ["trace-é", ""]
    out = []
    for _ in range(n):
        trace = rng.choice(traces)
        spans = tuple(f"{rng.getrandbits(64):016x}" for _ in range(rng.choice([0, 1, 2, 5, 12])))
        if spans and rng.random() < 0.2:
            spans = (*spans, spans[0])  # a span repeated
        ivs: list[Intervention] = []
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            own = (
                list(spans) if spans and rng.random() < 0.7 else [f"x{rng.getrandbits(20)}" for _ in range(3)]
            )
            cut = rng.randrange(len(own) + 1)
            part = tuple(own[cut:]) if rng.random() < 0.5 else tuple(rng.sample(own, k=len(own)))
            one = own[0]
            ivs.append(
                rng.choice(
                    [
                        RunConcurrently(part),
                        ShortenSpan(one, rng.randrange(-5, 10**12)),
                        CollapseSpans(part, rng.randrange(10**9)),
                        ScaleSelf(one, rng.choice([0.5, 0, 2, 1.0, float("inf")])),
                        CapConcurrency(part, rng.randrange(1, 9)),
                        ShortenSpan(one, 3.7),  # type: ignore[arg-type]  # a float where an int is declared
                        CollapseSpans(part, 2**70),  # beyond int64
                    ]
                )
            )
        numbers: dict[str, Any] = {}
        for name in rng.sample(["calls", "wait_ms", "share", "count", "odd"], k=rng.randrange(6)):
            numbers[name] = {
                "calls": float(rng.randrange(50)),
                "wait_ms": rng.choice([rng.random() * 100, float("nan"), float("inf"), -0.0]),
                "share": rng.random(),
                "count": rng.randrange(-3, 2**40),  # ints stay ints
                "odd": rng.choice([1, 2.5, None, np.float64(0.25), 2**65]),  # mixed types
            }[name]
        key = rng.choice([None, rng.getrandbits(64), 0, 2**64 - 1])
        out.append(Occurrence(trace, spans, tuple(ivs), numbers, key=key))
    return out


HAND_MADE = [
    Occurrence("t1", ("p", "a", "b"), (CollapseSpans(("a", "b"), 7),), {"calls": 2.0, "n": 2}, key=5),
    Occurrence(
        "t2",
        ("p", "q"),
        (
            RunConcurrently(("p", "q")),
            ShortenSpan("elsewhere", 4),
            ScaleSelf("q", 0.5),
            ScaleSelf("p", 0),
            CapConcurrency(("q", "p"), 2),
            RunConcurrently(()),
        ),
        {"n": 4, "wait_ms": float("nan")},
    ),
    Occurrence("t1", (), (), {}),
    Occurrence("t3", ("a",), (ShortenSpan(None, 2),), {"x": None}, key=2**64 - 1),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(
    "occurrences", [HAND_MADE, _random_occurrences(1, 400), _random_occurrences(2, 9000), []]
)
def test_round_trip_is_exact(occurrences: list[Occurrence]) -> None:
    table = Occurrences.from_list(occurrences)
    assert len(table) == len(occurrences)
    back = list(table)
    assert len(back) == len(occurrences)
    for got, want in zip(back, occurrences, strict=True):
        _same_exactly(got, want)
    for i in (0, len(occurrences) // 2, len(occurrences) - 1, -1):
        if occurrences:
            _same_exactly(table[i], occurrences[i])
    assert table == occurrences and occurrences == table
    again = pickle.loads(pickle.dumps(table))
    assert isinstance(again, Occurrences)
    for got, want in zip(again, occurrences, strict=True):
        _same_exactly(got, want)


def test_kinds_and_parameters_are_kept_apart() -> None:
    """Each kind comes back as its own class, with its parameter as given (no int made a float)."""
    for iv in [
        RunConcurrently(("a", "b")),
        ShortenSpan("a", 3),
        ShortenSpan("b", 3.0),  # type: ignore[arg-type]
        CollapseSpans(("a",), 4),
        ScaleSelf("a", 1),
        ScaleSelf("a", 1.0),
        CapConcurrency(("a", "b"), 3),
    ]:
        (got,) = Occurrences.from_list([Occurrence("t", ("a", "b"), (iv,))])
        assert repr(got.interventions[0]) == repr(iv)
        assert intervention_to_dict(got.interventions[0]) == intervention_to_dict(iv)


def test_equality_is_the_lists() -> None:
    occurrences = _random_occurrences(3, 300)
    table = Occurrences.from_list(occurrences)
    assert table == Occurrences.from_list(list(occurrences))
    assert table != occurrences[:-1]
    assert table != [*occurrences[:-1], replace(occurrences[-1], trace_id="other")]
    changed = replace(occurrences[10], numbers={**occurrences[10].numbers, "new": 1.0})
    assert table != [*occurrences[:10], changed, *occurrences[11:]]
    assert table != occurrences[::-1]
    assert table == [replace(o, key=None) for o in occurrences]  # the key is not compared, as Occurrence
    assert (table == "text") is False


def test_slices_takes_and_concatenation_are_the_lists() -> None:
    occurrences = _random_occurrences(4, 700)
    table = Occurrences.from_list(occurrences)
    for part in (slice(5, 50), slice(None, None, -3), slice(690, 900), slice(0, 0)):
        got = table[part]
        assert isinstance(got, Occurrences)
        assert got == occurrences[part]
        assert pickle.loads(pickle.dumps(got)) == occurrences[part]
        assert got.intervention_columns().span_ids.to_list() == [
            s
            for o in occurrences[part]
            for iv in o.interventions
            for s in ((iv.span_id,) if isinstance(iv, ShortenSpan | ScaleSelf) else iv.span_ids)
        ]
    rows = np.array([699, 0, 5, 5, 300])
    assert table.take(rows) == [occurrences[i] for i in rows]
    other = Occurrences.from_list(HAND_MADE)
    joined = Occurrences.concat([table.take([3, 1]), other, Occurrences.from_list([]), table[600:]])
    assert joined == [occurrences[3], occurrences[1], *HAND_MADE, *occurrences[600:]]
    for got, want in zip(
        joined, [occurrences[3], occurrences[1], *HAND_MADE, *occurrences[600:]], strict=True
    ):
        _same_exactly(got, want)
    assert Occurrences.concat([]) == []


def test_accessors_answer_as_their_plain_definitions() -> None:
    occurrences = _random_occurrences(5, 3000)
    table = Occurrences.from_list(occurrences)
    finding = Finding("k", "parallelization", "svc", "op", [], occurrences, 1.0)
    assert isinstance(finding.occurrences, Occurrences)
    assert finding.trace_ids == list(dict.fromkeys(o.trace_id for o in occurrences))
    assert table.trace_id_list() == [o.trace_id for o in occurrences]
    assert table.has_interventions().tolist() == [bool(o.interventions) for o in occurrences]
    assert table.any_interventions() == any(o.interventions for o in occurrences)
    keys, every = table.keys()
    assert every == all(o.key is not None for o in occurrences)
    assert keys.tolist() == [o.key or 0 for o in occurrences]
    wanted = set(random.Random(6).sample(sorted({o.trace_id for o in occurrences}), 40))
    assert table.in_traces(wanted).tolist() == [o.trace_id in wanted for o in occurrences]
    assert table.filter_traces(wanted) == [o for o in occurrences if o.trace_id in wanted]
    spans, counts = table.span_columns()
    assert spans.to_list() == [s for o in occurrences for s in o.span_ids]
    assert counts.tolist() == [len(o.span_ids) for o in occurrences]
    for name in ("calls", "wait_ms", "count", "odd", "absent"):
        values, present = table.number_column(name)
        assert present.tolist() == [name in o.numbers for o in occurrences]
        for value, o in zip(values.tolist(), occurrences, strict=True):
            want = o.numbers.get(name)
            want = float(want) if isinstance(want, int | float) else math.nan
            assert value == want or (math.isnan(value) and math.isnan(want))
    rows = np.array(sorted(random.Random(7).sample(range(len(occurrences)), 500)))
    ivs = table.intervention_columns(rows)
    plain = [(i, iv) for i in rows.tolist() for iv in occurrences[i].interventions]
    assert ivs.owner.tolist() == [i for i, _ in plain]
    kinds = (RunConcurrently, ShortenSpan, CollapseSpans, ScaleSelf, CapConcurrency)
    assert ivs.kind.tolist() == [kinds.index(type(iv)) for _, iv in plain]
    named = [(iv.span_id,) if isinstance(iv, ShortenSpan | ScaleSelf) else iv.span_ids for _, iv in plain]
    assert ivs.span_counts.tolist() == [len(n) for n in named]
    assert ivs.span_ids.to_list() == [s for n in named for s in n]
    params = [getattr(iv, name, 0) for _, iv in plain for name in [_PARAM[type(iv)]]]
    assert ivs.float_param.tolist() == [float(p) for p in params]
    assert ivs.int_param[np.abs(ivs.float_param) < 2**62].tolist() == [
        int(p) for p in params if abs(p) < 2**62
    ]


_PARAM = {
    RunConcurrently: "none",
    ShortenSpan: "by_ns",
    CollapseSpans: "duration_ns",
    ScaleSelf: "factor",
    CapConcurrency: "limit",
}


def test_a_finding_converts_a_list_and_keeps_a_container() -> None:
    occurrences = _random_occurrences(8, 50)
    finding = Finding("k", "parallelization", "svc", "op", [], occurrences, 1.0)
    table = finding.occurrences
    assert isinstance(table, Occurrences) and table == occurrences
    assert replace(finding).occurrences is table  # not converted again
    finding.occurrences = occurrences[:3]
    assert isinstance(finding.occurrences, Occurrences) and finding.occurrences == occurrences[:3]
    assert pickle.loads(pickle.dumps(finding)) == finding


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="expected Occurrence"):
        Occurrences.from_list([("t", ("a",))])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="span ids must be strings"):
        Occurrences.from_list([Occurrence("t", (1, 2))])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        Occurrences.from_list([Occurrence("t", (), key=-1)])


@pytest.mark.parametrize("kind", [RunConcurrently, CollapseSpans, CapConcurrency])
@pytest.mark.parametrize("dropped", [0, 1])
def test_columns_made_from_a_frame_are_the_objects_of_their_definition(kind: type, dropped: int) -> None:
    """``Occurrences.from_columns`` (what the detectors that make the most occurrences build) gives
    the occurrences its docstring defines, as :meth:`Occurrences.from_list` of those objects."""
    import polars as pl

    rng = random.Random(9)
    n = 2500
    frame = pl.DataFrame(
        {
            "trace_id": [f"{rng.getrandbits(128):032x}" for _ in range(n)],
            "parent": [f"{rng.getrandbits(64):016x}" for _ in range(n)],
            "children": [
                [f"{rng.getrandbits(64):016x}" for _ in range(rng.choice([0, 1, 3, 40]))] for _ in range(n)
            ],
            "param": [rng.randrange(-(2**40), 2**40) for _ in range(n)],
            "a_ns": [rng.randrange(10**12) for _ in range(n)],
            "b": [rng.choice([0.5, float("nan"), float("inf"), -0.0, 3.0]) for _ in range(n)],
            "key": pl.Series([rng.getrandbits(64) for _ in range(n)], dtype=pl.UInt64),
        }
    )
    made = frame.select(pl.concat_list(pl.col("parent"), pl.col("children")).alias("spans"))
    table = Occurrences.from_columns(
        frame["trace_id"],
        made["spans"],
        intervention=kind,
        first=1,
        dropped=dropped,
        parameter=None if kind is RunConcurrently else frame["param"],
        numbers={"a_ms": frame["a_ns"].to_numpy() / 1e6, "b": frame["b"], "calls": frame["a_ns"]},
        keys=frame["key"],
    )
    want = []
    for trace, parent, children, param, a_ns, b, key in frame.iter_rows():
        named = tuple(children[: len(children) - dropped] if dropped else children)
        iv = kind(named) if kind is RunConcurrently else kind(named, int(param))
        numbers = {"a_ms": a_ns / 1e6, "b": b, "calls": float(a_ns)}
        want.append(Occurrence(trace, (parent, *children), (iv,), numbers, key=key))
    assert len(table) == n
    for got, expected in zip(table, want, strict=True):
        _same_exactly(got, expected)
    assert table == Occurrences.from_list(want)
    assert table.take([5, 1]) == [want[5], want[1]]
    assert pickle.loads(pickle.dumps(table)) == want
    ivs = table.intervention_columns()
    assert ivs.span_ids.to_list() == [s for o in want for iv in o.interventions for s in iv.span_ids]


def test_shortened_spans_made_from_a_frame_are_the_objects_of_their_definition() -> None:
    """``from_columns`` of ``ShortenSpan`` (``fanout_straggler``): one per element of the
    occurrence's (span ids, by_ns) lists, ``int(by)`` of a float toward zero."""
    import polars as pl

    rng = random.Random(10)
    n = 1500
    children = [[f"{rng.getrandbits(64):016x}" for _ in range(rng.choice([0, 2, 5]))] for _ in range(n)]
    stragglers = [rng.sample(c, k=rng.randrange(len(c) + 1)) for c in children]
    frame = pl.DataFrame(
        {
            "trace_id": [f"{rng.getrandbits(128):032x}" for _ in range(n)],
            "parent": [f"{rng.getrandbits(64):016x}" for _ in range(n)],
            "children": pl.Series(children, dtype=pl.List(pl.String)),
            "stragglers": pl.Series(stragglers, dtype=pl.List(pl.String)),
            "by": pl.Series(
                [[rng.uniform(-1e9, 1e9) for _ in s] for s in stragglers], dtype=pl.List(pl.Float64)
            ),
            "key": pl.Series([rng.getrandbits(64) for _ in range(n)], dtype=pl.UInt64),
        }
    )
    table = Occurrences.from_columns(
        frame["trace_id"],
        frame.select(pl.concat_list(pl.col("parent"), pl.col("children"))).to_series(),
        intervention=ShortenSpan,
        shortened=(frame["stragglers"], frame["by"]),
        numbers={"stragglers": frame["stragglers"].list.len()},
        keys=frame["key"],
    )
    want = [
        Occurrence(
            trace,
            (parent, *kids),
            tuple(ShortenSpan(s, int(b)) for s, b in zip(slow, by, strict=True)),
            {"stragglers": float(len(slow))},
            key=key,
        )
        for trace, parent, kids, slow, by, key in frame.iter_rows()
    ]
    for got, expected in zip(table, want, strict=True):
        _same_exactly(got, expected)
    assert table == Occurrences.from_list(want)
    assert table.intervention_columns().span_ids.to_list() == [s for slow in stragglers for s in slow]


def test_takes_from_the_end_and_out_of_range() -> None:
    """Negative positions count from the end (as a list's); a position past either end is an
    IndexError, not garbage."""
    occurrences = _random_occurrences(7, 40)
    table = Occurrences.from_list(occurrences)
    rows = [-1, 0, -40, 17, -3]
    assert table.take(rows) == [occurrences[i] for i in rows]
    for bad in ([40], [-41], [0, 40]):
        with pytest.raises(IndexError):
            table.take(bad)


def test_numpy_numbers_count_as_numbers() -> None:
    """A number a detector gave as a numpy scalar is a number in its column (the object path's
    ``float()`` took it; the measured cost sums it)."""
    occurrences = [
        Occurrence("t1", ("a",), numbers={"held_ms": np.float32(2.5)}),
        Occurrence("t2", ("b",), numbers={"held_ms": np.int64(3)}),
        Occurrence("t3", ("c",), numbers={"held_ms": "n/a"}),
    ]
    values, present = Occurrences.from_list(occurrences).number_column("held_ms")
    assert values[:2].tolist() == [2.5, 3.0] and math.isnan(values[2])
    assert present.tolist() == [True, True, True]


def test_columns_without_an_intervention_are_the_objects_of_their_definition() -> None:
    """``from_columns`` with no intervention (``retry_without_backoff``, ``error_propagation``):
    ``interventions=()``, the numbers floats in the order given; a parameter is a clear error."""
    import polars as pl

    rng = random.Random(11)
    n = 1200
    frame = pl.DataFrame(
        {
            "trace_id": [f"{rng.getrandbits(128):032x}" for _ in range(n)],
            "spans": [
                [f"{rng.getrandbits(64):016x}" for _ in range(rng.choice([0, 1, 4]))] for _ in range(n)
            ],
            "a_ns": [rng.randrange(10**12) for _ in range(n)],
            "key": pl.Series([rng.getrandbits(64) for _ in range(n)], dtype=pl.UInt64),
        }
    )
    frame = frame.with_columns(pl.col("spans").cast(pl.List(pl.String)))
    table = Occurrences.from_columns(
        frame["trace_id"],
        frame["spans"],
        intervention=None,
        numbers={"a_ms": frame["a_ns"].to_numpy() / 1e6, "calls": frame["a_ns"]},
        keys=frame["key"],
    )
    want = [
        Occurrence(trace, tuple(spans), (), {"a_ms": a_ns / 1e6, "calls": float(a_ns)}, key=key)
        for trace, spans, a_ns, key in frame.iter_rows()
    ]
    for got, expected in zip(table, want, strict=True):
        _same_exactly(got, expected)
    assert table == Occurrences.from_list(want)
    assert table.take([7, 2]) == [want[7], want[2]]
    assert Occurrences.concat([table, table[:3]]) == [*want, *want[:3]]
    assert pickle.loads(pickle.dumps(table)) == want
    assert table.intervention_columns().span_ids.to_list() == []
    with pytest.raises(ValueError, match="no intervention takes no parameter"):
        Occurrences.from_columns(
            frame["trace_id"],
            frame["spans"],
            intervention=None,
            parameter=frame["a_ns"],
            numbers={},
            keys=frame["key"],
        )


def test_each_own_span_shortened_made_from_a_frame_is_the_objects_of_its_definition() -> None:
    """``from_columns`` of ``ShortenSpan`` whose span ids are the occurrence's own, one each in
    order (``lock_contention``): the same occurrences, the ids held as positions in the
    occurrence's own (nothing held apart), as :meth:`Occurrences.from_list` holds them."""
    import polars as pl

    rng = random.Random(12)
    n = 900
    spans = [[f"{rng.getrandbits(64):016x}" for _ in range(rng.choice([1, 2, 7]))] for _ in range(n)]
    frame = pl.DataFrame(
        {
            "trace_id": [f"{rng.getrandbits(128):032x}" for _ in range(n)],
            "spans": pl.Series(spans, dtype=pl.List(pl.String)),
            "waits": pl.Series([[rng.randrange(10**10) for _ in s] for s in spans], dtype=pl.List(pl.Int64)),
            "key": pl.Series([rng.getrandbits(64) for _ in range(n)], dtype=pl.UInt64),
        }
    )
    table = Occurrences.from_columns(
        frame["trace_id"],
        frame["spans"],
        intervention=ShortenSpan,
        shortened=(frame["spans"], frame["waits"]),
        numbers={"waits": frame["waits"].list.len()},
        keys=frame["key"],
    )
    want = [
        Occurrence(
            trace,
            tuple(ids),
            tuple(ShortenSpan(s, w) for s, w in zip(ids, waits, strict=True)),
            {"waits": float(len(ids))},
            key=key,
        )
        for trace, ids, waits, key in frame.iter_rows()
    ]
    for got, expected in zip(table, want, strict=True):
        _same_exactly(got, expected)
    assert table == Occurrences.from_list(want)
    assert len(table._iv_extra) == 0 and len(Occurrences.from_list(want)._iv_extra) == 0
    assert table.take([3, 0]) == [want[3], want[0]]
    assert pickle.loads(pickle.dumps(table)) == want
    assert table.intervention_columns().span_ids.to_list() == [s for ids in spans for s in ids]
