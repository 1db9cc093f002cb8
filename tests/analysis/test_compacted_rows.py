"""n_plus_one's decision over compacted rows (``n_plus_one.compact``: the calls' span ids held as
the words they spell, each row's occurrence key hashed beforehand; what ``partitions.combine``
makes of every partition or stored piece before combining them) is the decision over the rows as
extracted: the same findings, occurrences (span ids, interventions, numbers, keys), evidence and
near misses (with their span ids), whatever the shapes of the traces and the ids, and however the
rows are split into pieces, some held as words and some as text."""

from __future__ import annotations

from typing import Any

import polars as pl
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import _common, n_plus_one
from hourglass.analysis.model import NearMissLog
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table


def _page(
    n: int, *, gap_ms: float = 1, concurrent: bool = False, ids: str = "hex", op: str = "items"
) -> TraceBuilder:
    """A caller making ``n`` calls of one statement, one after another (or all at once)."""
    b = TraceBuilder(service="orders")
    counter = iter(range(1, 10_000))

    def span_id() -> str | None:
        if ids == "hex":
            return None  # (the builder's: lowercase hex of 16 digits)
        return f"Span-{b.trace_id[-6:]}-{next(counter)}"  # not hex: held as text

    root = b.span(
        "GET /orders", start_ms=0, dur_ms=30 + n * (9 + gap_ms), kind=KIND_SERVER, span_id=span_id()
    )
    for i in range(n):
        b.span(f"SELECT {op}", parent=root, start_ms=10 if concurrent else 10 + i * (9 + gap_ms), dur_ms=9,
               kind=KIND_CLIENT, db_system="postgresql", span_id=span_id(),
               db_statement=f"SELECT * FROM {op} WHERE order_id = {1000 + i}")  # fmt: skip
    return b


def _small(n: int = 5) -> TraceBuilder:
    """Calls too short to save the floor: a near miss."""
    b = TraceBuilder(service="cart")
    root = b.span("GET /cart", start_ms=0, dur_ms=2000, kind=KIND_SERVER)
    for i in range(n):
        b.span("SELECT lines", parent=root, start_ms=1 + i * 0.1, dur_ms=0.05, kind=KIND_CLIENT,
               db_system="postgresql", db_statement=f"SELECT * FROM lines WHERE id = {i}")  # fmt: skip
    return b


SHAPES: dict[str, list[TraceBuilder]] = {
    "one loop": [_page(10) for _ in range(6)],
    "two loops, lengths vary": [_page(5 + i, op="items") for i in range(5)]
    + [_page(12, op="tags") for _ in range(3)],
    "ids not hex in some traces": [_page(8) for _ in range(4)] + [_page(8, ids="text") for _ in range(3)],
    "ids not hex anywhere": [_page(7, ids="text") for _ in range(5)],
    "with near misses": [_page(9) for _ in range(5)] + [_small() for _ in range(4)],
    "concurrent mostly": [_page(6) for _ in range(2)] + [_page(6, concurrent=True) for _ in range(8)],
}


def _parts(builders: list[TraceBuilder], parts: int) -> list[dict[str, Any]]:
    """n_plus_one's rows of each of ``parts`` partitions of the traces (whole traces each)."""
    out = []
    size = -(-len(builders) // parts)
    for p in range(parts):
        chosen = builders[p * size : (p + 1) * size]
        if chosen:
            out.append({"n_plus_one": n_plus_one.extract(AnalysisContext.from_table(spans_table(chosen)))})
    return out


def _decided(rows: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    notes = NearMissLog()
    findings = n_plus_one.decide(rows, notes)
    made = [
        (
            f.id,
            f.confidence,
            f.evidence,
            [(o.trace_id, o.span_ids, o.interventions, o.numbers, o.key) for o in f.occurrences],
        )
        for f in findings
    ]
    return made, [repr(n) for n in notes.near_misses]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("parts", [1, 3])
def test_the_decision_over_compacted_rows_is_the_decision_over_the_rows(
    shape: str, parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    extracted = _parts(SHAPES[shape], parts)
    compacted = partitions.combine(extracted)["n_plus_one"]
    # the reference: the rows as extracted, never held as words (the decision before compact)
    with monkeypatch.context() as m:
        m.setattr(_common, "id_words", lambda lists: None)
        as_text = partitions.combine(extracted)["n_plus_one"]
        expected = _decided(as_text)
    assert as_text["sequences"][n_plus_one.SPAN_WORDS].null_count() == as_text["sequences"].height
    got = _decided(compacted)
    assert got == expected
    assert got[0] or got[1]  # (every shape decides something)
    assert (
        _decided(partitions.combine(extracted, compact=False)["n_plus_one"]) == expected
    )  # (compacted in decide)
    sequences = compacted["sequences"]
    hex_rows = sequences["caller_span_id"].str.contains("^[0-9a-f]{16}$")
    words = sequences[n_plus_one.SPAN_WORDS]
    if hex_rows.all():  # every piece's ids hex: all held as words
        assert words.null_count() == 0
    elif parts == 1 or shape == "ids not hex anywhere":  # (one piece with ids that are not hex: text)
        assert words.null_count() == sequences.height
    else:  # some pieces as words, the others as text
        assert 0 < words.null_count() < sequences.height


def test_compacted_rows_hold_the_span_ids_as_words_and_give_them_back() -> None:
    rows = _parts(SHAPES["one loop"], 1)[0]["n_plus_one"]
    compacted = n_plus_one.compact(rows)
    assert n_plus_one.compact(compacted) is compacted  # (once)
    sequences = compacted["sequences"]
    assert sequences[n_plus_one.SPAN_WORDS].dtype == pl.List(pl.UInt64)
    assert sequences["span_id"].null_count() == sequences.height  # (the text let go)
    assert (
        _common.id_text(sequences[n_plus_one.SPAN_WORDS]).to_list() == rows["sequences"]["span_id"].to_list()
    )
    assert (
        sequences[n_plus_one.KEY].to_list()
        == _common.occurrence_keys(rows["sequences"], n_plus_one.OCCURRENCE_KEY).to_list()
    )
