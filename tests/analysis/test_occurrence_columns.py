"""A finding's occurrences held in columns (:class:`hourglass.analysis.model.Occurrences`): every
intervention kind and every shape of numbers round-trips exactly (types included: an int stays an
int, a NaN stays a NaN and an absent number stays absent), the container compares, slices, takes,
concatenates and pickles as the list it was made of, and each column accessor answers as its plain
definition over that list."""

from __future__ import annotations

import gc
import math
import os
import pickle
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
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


# -- ids held compactly ---------------------------------------------------------------------------


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(4 * digits):0{digits}x}"


def _id_styled_occurrences(seed: int, n: int, trace_ids: list[str], span_ids: list[str]) -> list[Occurrence]:
    """Occurrences whose trace ids and span ids are drawn from the pools given (the interventions
    naming the occurrence's own spans, or a few of the pool's)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        spans = tuple(rng.choice(span_ids) for _ in range(rng.choice([0, 1, 3, 9])))
        ivs: list[Intervention] = []
        if spans:
            ivs.append(RunConcurrently(spans[1:]) if rng.random() < 0.5 else CapConcurrency(spans, 2))
        if rng.random() < 0.3:
            ivs.append(ShortenSpan(rng.choice(span_ids), rng.randrange(10**9)))
        out.append(Occurrence(rng.choice(trace_ids), spans, tuple(ivs), {"calls": float(len(spans))}))
    return out


_EDGE_HEX = [
    "0" * 16,  # leading zeros kept
    "f" * 16,  # 2**64 - 1
    "8000000000000000",  # the sign bit
    "00000000000000ff",
]
_NOT_WORDS = [
    "ABCDEF0123456789",  # upper case: kept as text (its case is part of the id)
    "abcdef012345678",  # 15 digits
    "abcdef01234567890",  # 17
    "abcdefg123456789",  # not hex
    "",
    "é" * 8,  # 16 bytes, not hex
    "0x" + "1" * 14,
    "+" + "1" * 15,  # (an integer parse would take it)
    " " + "1" * 15,
    "1" * 15 + "\n",
]


@pytest.mark.parametrize(
    "style",
    ["hex", "hex-edges", "upper", "mixed-widths", "non-hex", "empty-string", "hex-and-one-other"],
)
def test_ids_round_trip_whatever_their_shape(style: str) -> None:
    """Every id comes back as it was, whether the column's ids are all lowercase hex of 16 or 32
    digits (held as words) or not (held as text): the objects, slices, takes, concatenations with
    other tables, pickles and every accessor answer as the plain definitions over the list."""
    rng = random.Random(style)
    traces = [_hex(rng, 32) for _ in range(60)]
    spans = [_hex(rng, 16) for _ in range(400)]
    if style == "hex-edges":
        traces += ["0" * 32, "f" * 32, "0" * 16 + "f" * 16]
        spans += _EDGE_HEX
    elif style == "upper":
        traces = [t.upper() for t in traces]
        spans = [s.upper() for s in spans]
    elif style == "mixed-widths":
        traces = [t[:16] if i % 2 else t for i, t in enumerate(traces)]
        spans = [s + s if i % 3 == 0 else s for i, s in enumerate(spans)]
    elif style == "non-hex":
        traces = [f"trace-{i}" for i in range(60)]
        spans = [f"span-{i}" for i in range(400)]
    elif style == "empty-string":
        traces += [""]
        spans += [""]
    elif style == "hex-and-one-other":
        traces += [rng.choice(_NOT_WORDS)]
        spans += _NOT_WORDS
    occurrences = _id_styled_occurrences(11, 1500, traces, spans)
    table = Occurrences.from_list(occurrences)
    for got, want in zip(table, occurrences, strict=True):
        _same_exactly(got, want)
    assert pickle.loads(pickle.dumps(table)) == occurrences
    for part in (slice(7, 900), slice(None, None, -2), slice(3, 3)):
        assert table[part] == occurrences[part]
        assert pickle.loads(pickle.dumps(table[part])) == occurrences[part]
    rows = np.array([1499, 0, 7, 7, 640, -2])
    assert table.take(rows) == [occurrences[i] for i in rows]
    assert table.trace_ids_at(rows).to_list() == [occurrences[i].trace_id for i in rows]
    assert table.trace_id_series().to_list() == [o.trace_id for o in occurrences]
    assert table.unique_trace_ids() == list(dict.fromkeys(o.trace_id for o in occurrences))
    got_spans, counts = table.span_columns()
    assert got_spans.to_list() == [s for o in occurrences for s in o.span_ids]
    assert counts.tolist() == [len(o.span_ids) for o in occurrences]
    named = [
        s
        for o in occurrences
        for iv in o.interventions
        for s in ((iv.span_id,) if isinstance(iv, ShortenSpan) else iv.span_ids)
    ]
    assert table.intervention_columns().span_ids.to_list() == named
    # asked with ids of every shape: the same id in another case, length or form is another id
    wanted = set(rng.sample(sorted({o.trace_id for o in occurrences}), 12))
    wanted |= {t.upper() for t in list(wanted)[:3]} | {t[:16] for t in wanted} | set(_NOT_WORDS)
    wanted |= {traces[0].upper(), traces[0][:31], "x" + traces[0][1:]}
    assert table.in_traces(wanted).tolist() == [o.trace_id in wanted for o in occurrences]
    assert table.filter_traces(wanted) == [o for o in occurrences if o.trace_id in wanted]
    assert table.in_traces(set()).tolist() == [False] * len(occurrences)
    # joined with tables of other shapes (words of another width, text, none)
    others = [
        HAND_MADE,
        _id_styled_occurrences(12, 50, [_hex(rng, 16) for _ in range(5)], [_hex(rng, 32) for _ in range(9)]),
        _id_styled_occurrences(13, 50, traces, spans),
        [],
    ]
    for other in others:
        for parts in ([occurrences[:700], other, occurrences[700:]], [other, occurrences]):
            joined = Occurrences.concat([Occurrences.from_list(p) for p in parts])
            want = [o for p in parts for o in p]
            assert joined == want
            assert joined.trace_id_list() == [o.trace_id for o in want]
            assert joined.span_columns()[0].to_list() == [s for o in want for s in o.span_ids]


def test_hex_ids_are_held_as_the_words_they_spell() -> None:
    """OTLP's ids (lowercase hex: 32 digits a trace id, 16 a span id) are held as 16 and 8 bytes,
    not as strings: a table of them pickles at well under half the size of the same table whose
    ids are text (one id upper case: every id of its column is then held as it is)."""
    rng = random.Random(14)
    traces = [_hex(rng, 32) for _ in range(3000)]
    spans = [_hex(rng, 16) for _ in range(20000)]
    occurrences = [Occurrence(rng.choice(traces), tuple(rng.sample(spans, 12)), (), {}) for _ in range(5000)]
    as_text = [
        replace(o, trace_id=o.trace_id.upper(), span_ids=tuple(s.upper() for s in o.span_ids))
        for o in occurrences
    ]
    words, text = Occurrences.from_list(occurrences), Occurrences.from_list(as_text)
    assert words == occurrences and text == as_text
    ids = 5000 * (32 + 12 * 16)  # the ids' characters
    others = 40  # bytes per occurrence of the other columns (offsets, keys, ...)
    assert len(pickle.dumps(text)) > ids
    assert len(pickle.dumps(words)) < ids / 2 + 5000 * others  # the ids' bytes
    # a take, a slice, a concatenation and a pickle keep them as words (no text comes back)
    for table in (words.take(np.arange(4999, -1, -7)), words[10:4000], Occurrences.concat([words, words])):
        assert len(pickle.dumps(table)) < len(table) * (16 + 12 * 8 + others) + 10_000


def test_empty_tables_of_any_making() -> None:
    import polars as pl

    empty = Occurrences.from_list([])
    made = Occurrences.from_columns(
        pl.Series([], dtype=pl.String),
        pl.Series([], dtype=pl.List(pl.String)),
        intervention=RunConcurrently,
        numbers={},
        keys=pl.Series([], dtype=pl.UInt64),
    )
    for table in (empty, made, empty[0:0], made.take([]), Occurrences.concat([empty, made])):
        assert len(table) == 0 and table == [] and list(table) == []
        assert pickle.loads(pickle.dumps(table)) == []
        assert table.trace_id_list() == [] and table.unique_trace_ids() == []
        assert table.span_columns()[0].to_list() == []
        assert table.in_traces({"a" * 32}).tolist() == []
        assert table.intervention_columns().span_ids.to_list() == []
    hexed = Occurrences.from_list([Occurrence("a" * 32, ("b" * 16,), (RunConcurrently(("b" * 16,)),))])
    assert Occurrences.concat([empty, hexed, made]) == list(hexed)


# -- parked in a file -----------------------------------------------------------------------------


def test_a_parked_table_reads_back_only_the_columns_asked_for(tmp_path: Path) -> None:
    """``park``: the columns written to one file and let go (``len`` still answers); whatever reads
    next (an occurrence, an accessor, a take, a pickle) reads back exactly the columns it uses, each
    alone, and gets them as they were; ``release`` lets them go again (the file stays, and a column
    asked for later is read again); a parked table dropped removes its file."""
    occurrences = _random_occurrences(15, 2000)
    table = Occurrences.from_list(occurrences)
    folder = str(tmp_path)
    every = table.held()
    assert "_trace" in every and "_nums" in every and "_n" not in every
    readers = [  # (what each reads, as its repr: a NaN number compares; the columns it needs, None: all)
        (lambda t: repr(list(t)), None),
        (lambda t: repr(t[17]), None),
        (lambda t: t.trace_id_list(), {"_trace"}),
        (lambda t: t.span_columns()[0].to_list(), {"_spans", "_span_off"}),
        (lambda t: t.keys()[0].tolist(), {"_key", "_has_key"}),
        (lambda t: t.number_column("calls")[1].tolist(), {"_shapes", "_shape", "_nums"}),
        (lambda t: t.has_interventions().tolist(), {"_iv_off"}),
        (lambda t: t.intervention_columns().span_ids.to_list(), None),
        (lambda t: repr(list(t.take([5, 1]))), None),
        (lambda t: repr(list(pickle.loads(pickle.dumps(t)))), None),
    ]
    table.park(folder)
    assert table.is_parked() and len(os.listdir(folder)) == 1 and table.held() == frozenset()
    for column in ("_trace", "_spans", "_span_off", "_nums", "_key"):
        with pytest.raises(AttributeError):
            object.__getattribute__(table, column)  # let go, not merely hidden
    assert len(table) == len(occurrences) and table.held() == frozenset()  # (len reads no column)
    whole = Occurrences.from_list(occurrences)
    for read, needs in readers:
        want = read(whole)
        got = read(table)
        assert got == want
        assert table.is_parked() and len(os.listdir(folder)) == 1  # (the file stays)
        if needs is not None:
            assert table.held() == needs, read
        table.release()
        assert table.held() == frozenset()
        assert read(table) == want  # (read from the file again)
        table.release()
    assert table == occurrences
    table.park(folder)  # (parked already: nothing more)
    assert len(os.listdir(folder)) == 1
    whole.release()  # (not parked: nothing to let go)
    assert whole.held() == every and whole == occurrences
    del table
    gc.collect()
    assert os.listdir(folder) == []
    empty = Occurrences.from_list([])
    empty.park(folder)
    assert not empty.is_parked() and os.listdir(folder) == [] and empty == []


def test_a_take_of_a_parked_table_reads_only_the_columns_asked_for(tmp_path: Path) -> None:
    """A take (or slice) of a parked table takes each group of columns from it when first asked
    for: keys alone read the keys back; every way of reading it gives what a take of the whole
    table gives, a take of that take too; the source's release does not change it."""
    occurrences = _random_occurrences(18, 2500)
    whole = Occurrences.from_list(occurrences)
    table = Occurrences.from_list(occurrences)
    table.park(str(tmp_path))
    rng = np.random.default_rng(3)
    for rows in (rng.integers(-2500, 2500, 700), np.arange(100, 900), np.zeros(0, dtype=np.int64)):
        want = whole.take(rows)
        taken = table.take(rows)
        assert len(taken) == len(want) and table.held() == frozenset() and not taken.is_parked()
        assert taken.keys()[0].tolist() == want.keys()[0].tolist()
        assert table.held() <= {"_key", "_has_key"}
        assert taken.held() == {"_key", "_has_key"}
        assert taken.trace_id_list() == want.trace_id_list()
        table.release()
        assert (
            taken.intervention_columns().span_ids.to_list() == want.intervention_columns().span_ids.to_list()
        )
        assert repr(list(taken)) == repr(list(want))
        again = table.take(rows).take(np.arange(len(rows))[::-1])
        assert repr(list(again)) == repr(list(want.take(np.arange(len(rows))[::-1])))
        assert repr(list(pickle.loads(pickle.dumps(table.take(rows))))) == repr(list(want))
        table.release()
    assert repr(list(table[10:40])) == repr(list(whole[10:40])) and table == occurrences


def test_a_parked_table_read_by_several_threads_at_once(tmp_path: Path) -> None:
    """Threads reading a parked table's columns while another releases them read the same, and
    so do threads reading one take of it (its columns taken as first asked for)."""
    occurrences = _random_occurrences(16, 3000)
    table = Occurrences.from_list(occurrences)
    want = table.span_columns()[0].to_list()
    rows = np.arange(2999, 0, -3)
    want_taken = table.take(rows).span_columns()[0].to_list()
    table.park(str(tmp_path))

    def read(i: int) -> list[str]:
        if i % 3 == 0:
            table.release()
        return table.span_columns()[0].to_list()

    for _ in range(5):
        taken = table.take(rows)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(read, range(12)))
            got_taken = list(pool.map(lambda t: t.span_columns()[0].to_list(), [taken] * 8))
        assert all(g == want for g in got)
        assert all(g == want_taken for g in got_taken)
        table.release()
    assert len(os.listdir(tmp_path)) == 1


def test_a_table_that_cannot_be_parked_stays_whole(tmp_path: Path) -> None:
    """A file that cannot be written (no such folder; a full disk) is an OSError and the table
    keeps its columns (serve's round then keeps them in memory)."""
    occurrences = _random_occurrences(17, 300)
    table = Occurrences.from_list(occurrences)
    with pytest.raises(OSError):
        table.park(str(tmp_path / "missing"))
    assert not table.is_parked() and table == occurrences


def test_a_null_number_made_from_columns_is_none_as_made_from_objects() -> None:
    """A detector's number column with nulls (a statistic of nothing): the occurrences made from
    the columns hold None there, as those made from the objects the object path built."""
    import polars as pl

    frame = pl.DataFrame(
        {
            "trace_id": ["a" * 32, "b" * 32, "c" * 32],
            "spans": [["1" * 16], ["2" * 16, "3" * 16], []],
            "mean_ns": pl.Series([1_500_000, None, 2_000_000], dtype=pl.Int64),
            "none": pl.Series([None, None, None], dtype=pl.Float64),
            "key": pl.Series([1, 2, 3], dtype=pl.UInt64),
        }
    ).with_columns(pl.col("spans").cast(pl.List(pl.String)))
    table = Occurrences.from_columns(
        frame["trace_id"],
        frame["spans"],
        intervention=None,
        numbers={"mean_ns": frame["mean_ns"], "none": frame["none"]},
        keys=frame["key"],
    )
    want = [
        Occurrence(
            trace, tuple(spans), (), {"mean_ns": None if mean is None else float(mean), "none": None}, key=key
        )
        for trace, spans, mean, _, key in frame.iter_rows()
    ]
    for got, expected in zip(table, want, strict=True):
        _same_exactly(got, expected)
    assert table == Occurrences.from_list(want)
    assert Occurrences.concat([table, Occurrences.from_list(want)]) == [*want, *want]
    assert pickle.loads(pickle.dumps(table)) == want
    with pytest.raises(ValueError, match="must be 3 values"):
        Occurrences.from_columns(
            frame["trace_id"],
            frame["spans"],
            intervention=None,
            numbers={"x": frame["mean_ns"][:2]},
            keys=frame["key"],
        )


def test_a_null_span_id_given_as_text_stays_a_none_span_id() -> None:
    """The columns' form takes what the objects' form takes: a null among a row's span ids (as
    text) is that occurrence's None span id, not an error that stops the whole analysis; only
    ids given as 64-bit words must have none null (a null has no word)."""
    made = Occurrences.from_columns(
        pl.Series(["a" * 32]),
        pl.Series([["0000000000000001", None]]),
        intervention=None,
        numbers={},
        keys=pl.Series([1], dtype=pl.UInt64),
    )
    assert made[0].span_ids == ("0000000000000001", None)
    with pytest.raises(ValueError, match="words"):
        Occurrences.from_columns(
            pl.Series(["a" * 32]),
            pl.Series([[1, None]], dtype=pl.List(pl.UInt64)),
            intervention=None,
            numbers={},
            keys=pl.Series([1], dtype=pl.UInt64),
        )
