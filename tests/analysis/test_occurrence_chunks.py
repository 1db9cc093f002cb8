"""Occurrences made a chunk of rows at a time (``_common.occurrences_by_chunk``, what the detectors
use so that the working set of making a large finding's occurrences is one chunk's) and ids decoded
a chunk at a time (``model.hex_words``) are exactly those made whole: the same occurrences, keys and
numbers, and the ids held the same way (as words when every id of the column is lowercase hex of
one width, else as text), wherever in the rows an id of another shape falls."""

from __future__ import annotations

import pickle
import random

import numpy as np
import polars as pl
import pytest

from hourglass.analysis import model
from hourglass.analysis.detectors import _common
from hourglass.analysis.model import CollapseSpans, Occurrences, ShortenSpan


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(4 * digits):0{digits}x}"


def _frame(style: str, n: int) -> pl.DataFrame:
    rng = random.Random(style)
    traces = [_hex(rng, 32) for _ in range(n)]
    parents = [_hex(rng, 16) for _ in range(n)]
    children = [[_hex(rng, 16) for _ in range(rng.choice([0, 1, 3, 9]))] for _ in range(n)]
    if style == "other-in-last-chunk":  # one id not held as a word, late in the rows
        parents[-2] = "Span-Not-Hex"
        traces[-1] = traces[-1].upper()
    elif style == "other-in-first-chunk":
        children[0] = [*children[0], "x" * 16]
    elif style == "mixed-widths":
        traces[n // 2] = traces[n // 2][:16]
    stragglers = [rng.sample(c, k=rng.randrange(len(c) + 1)) for c in children]
    return pl.DataFrame(
        {
            "trace_id": traces,
            "parent": parents,
            "children": pl.Series(children, dtype=pl.List(pl.String)),
            "stragglers": pl.Series(stragglers, dtype=pl.List(pl.String)),
            "by": pl.Series(
                [[rng.uniform(-1e9, 1e9) for _ in s] for s in stragglers], dtype=pl.List(pl.Float64)
            ),
            "batched_ns": [rng.randrange(10**12) for _ in range(n)],
        }
    )


def _held(table: Occurrences) -> tuple[object, ...]:
    """How each id column is held: words (and their width) or text."""
    ids = (table._trace, table._spans, table._iv_extra)
    return tuple(None if i.words is None else i.words.shape[1] for i in ids)


@pytest.mark.parametrize("style", ["hex", "other-in-last-chunk", "other-in-first-chunk", "mixed-widths"])
@pytest.mark.parametrize("intervention", [CollapseSpans, ShortenSpan])
def test_occurrences_made_by_chunk_are_those_made_whole(
    style: str, intervention: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    frame = _frame(style, 230)
    keys = _common.occurrence_keys(frame, ["trace_id", "parent", "children", "batched_ns"])

    def make(start: int, length: int) -> Occurrences:
        part = frame.slice(start, length)
        spans = part.select(pl.concat_list(pl.col("parent"), pl.col("children"))).to_series()
        extra = (
            {"shortened": (part["stragglers"], part["by"])}
            if intervention is ShortenSpan
            else {"first": 1, "parameter": part["batched_ns"]}
        )
        return Occurrences.from_columns(
            part["trace_id"],
            spans,
            intervention=intervention,
            numbers=_common.per_unit(part, {"batched_ms": ("batched_ns", 1e6)}),
            keys=keys.slice(start, length),
            **extra,  # type: ignore[arg-type]
        )

    whole = make(0, frame.height)
    for chunk in (1, 7, 64, 229, 230, 1000):
        monkeypatch.setattr(_common, "OCCURRENCE_CHUNK", chunk)
        monkeypatch.setattr(model, "_HEX_CHUNK", max(chunk // 3, 1))
        made = _common.occurrences_by_chunk(frame.height, make)
        assert made == list(whole)
        assert made.keys()[0].tolist() == whole.keys()[0].tolist()
        assert _held(made) == _held(whole)
        assert pickle.loads(pickle.dumps(made)) == list(whole)
    # the whole made with words where its ids allow it (the point of holding them so)
    assert _held(whole)[1] == (1 if style in ("hex", "mixed-widths") else None)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 16])
def test_ids_decoded_by_chunk_are_those_decoded_whole(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "_HEX_CHUNK", chunk)
    rng = random.Random(chunk)
    ids = [_hex(rng, 32) for _ in range(11)]
    words = model.hex_words(pl.Series(ids))
    assert words is not None and words.shape == (11, 2)
    assert model.hex_text(words).to_list() == ids
    for at in (0, 4, 10):  # an id that is not lowercase hex, wherever it falls: none held as words
        for other in ("G" * 32, ids[at].upper(), " " + ids[at][1:]):
            assert model.hex_words(pl.Series([*ids[:at], other, *ids[at + 1 :]])) is None
    assert model.hex_words(pl.Series([*ids[:10], ids[10][:16]])) is None  # widths differ
    spans = [_hex(rng, 16) for _ in range(7)]
    got = model.hex_words(pl.Series(spans))
    assert got is not None and got.shape == (7, 1)
    assert np.array_equal(got[:, 0], np.array([int(s, 16) for s in spans], dtype=np.uint64))
