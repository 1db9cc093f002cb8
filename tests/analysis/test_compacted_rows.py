"""Decisions over compacted rows (a detector's ``compact``: its span-id lists held as the words
the ids spell, each row's occurrence key hashed beforehand; what ``partitions.combine`` makes of
every partition or stored piece before combining them) are the decisions over the rows as
extracted: the same findings, occurrences (span ids, interventions, numbers, keys), evidence and
near misses (with their span ids), whatever the shapes of the traces and the ids, and however the
rows are split into pieces, some held as words and some as text. n_plus_one, fanout_straggler
and fanout_concurrency_limit (its per-fan-out rule and its pool sweep across traces)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import (
    PARTS,
    _common,
    fanout_concurrency_limit,
    fanout_straggler,
    n_plus_one,
)
from hourglass.analysis.model import NearMissLog
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.analysis.test_fanout_concurrency_limit import DURATIONS, pooled_trace, shared_pool_traces
from tests.analysis.test_fanout_straggler import search_trace
from tests.builders import TraceBuilder, spans_table


def _text_ids(b: TraceBuilder) -> TraceBuilder:
    """``b`` with span ids that are not lowercase hex (held as text)."""
    for row in b.rows:
        row["span_id"] = f"Span-{row['span_id']}"
        if row["parent_span_id"] is not None:
            row["parent_span_id"] = f"Span-{row['parent_span_id']}"
    return b


def _page(n: int, *, gap_ms: float = 1, concurrent: bool = False, op: str = "items") -> TraceBuilder:
    """A caller making ``n`` calls of one statement, one after another (or all at once)."""
    b = TraceBuilder(service="orders")
    root = b.span("GET /orders", start_ms=0, dur_ms=30 + n * (9 + gap_ms), kind=KIND_SERVER)
    for i in range(n):
        b.span(f"SELECT {op}", parent=root, start_ms=10 if concurrent else 10 + i * (9 + gap_ms), dur_ms=9,
               kind=KIND_CLIENT, db_system="postgresql",
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


SHAPES: dict[str, Callable[[], list[TraceBuilder]]] = {
    "n+1: one loop": lambda: [_page(10) for _ in range(6)],
    "n+1: two loops, lengths vary": lambda: (
        [_page(5 + i) for i in range(5)] + [_page(12, op="tags") for _ in range(3)]
    ),
    "n+1: ids not hex in some traces": lambda: (
        [_page(8) for _ in range(4)] + [_text_ids(_page(8)) for _ in range(3)]
    ),
    "n+1: ids not hex anywhere": lambda: [_text_ids(_page(7)) for _ in range(5)],
    "n+1: with near misses": lambda: [_page(9) for _ in range(5)] + [_small() for _ in range(4)],
    "n+1: concurrent mostly": lambda: (
        [_page(6) for _ in range(2)] + [_page(6, concurrent=True) for _ in range(8)]
    ),
    "fan-out: skew": lambda: [search_trace([40, 42, 200 + 10 * i, 41]) for i in range(6)],
    "fan-out: tail, branches vary": lambda: [
        search_trace([40 + (90 if i % 3 == j else 0) for j in range(3 + i % 3)]) for i in range(9)
    ],
    "fan-out: ids not hex in some traces": lambda: (
        [search_trace([40, 41, 250, 42]) for _ in range(4)]
        + [_text_ids(search_trace([40, 41, 250, 42])) for _ in range(3)]
    ),
    "fan-out: ids not hex anywhere": lambda: [_text_ids(search_trace([40, 300, 41])) for _ in range(5)],
    "fan-out: balanced beside": lambda: (
        [search_trace([40, 42, 250, 41]) for _ in range(5)]
        + [search_trace([40, 42, 43], shard_attr=True) for _ in range(3)]
    ),
    "pool: per fan-out": lambda: [pooled_trace(DURATIONS, 3)[0] for _ in range(6)],
    "pool: ids not hex in some traces": lambda: (
        [pooled_trace(DURATIONS, 3)[0] for _ in range(4)]
        + [_text_ids(pooled_trace(DURATIONS, 3)[0]) for _ in range(3)]
    ),
    "pool: ids not hex anywhere": lambda: [_text_ids(pooled_trace(DURATIONS, 2)[0]) for _ in range(5)],
    "pool: shared across traces": lambda: shared_pool_traces(30, 3, arrival_gap_ms=120),
    "pool: shared, ids not hex in some traces": lambda: [
        _text_ids(b) if i % 10 == 0 else b
        for i, b in enumerate(shared_pool_traces(30, 3, arrival_gap_ms=120))
    ],
}
KIND_OF = {"n+1": "n_plus_one", "fan-out": "fanout_straggler", "pool": "fanout_concurrency_limit"}
TABLE = {"n_plus_one": "sequences", "fanout_straggler": "occurrences", "fanout_concurrency_limit": "fanouts"}
WORDS = {
    "n_plus_one": [n_plus_one.SPAN_WORDS],
    "fanout_straggler": ["child_ids_words", "straggler_ids_words"],
    "fanout_concurrency_limit": ["child_ids_words"],
}


def _parts(kind: str, builders: list[TraceBuilder], parts: int) -> list[dict[str, Any]]:
    """``kind``'s rows of each of ``parts`` partitions of the traces (consecutive whole traces)."""
    out = []
    size = -(-len(builders) // parts)
    for p in range(parts):
        chosen = builders[p * size : (p + 1) * size]
        if chosen:
            out.append({kind: PARTS[kind].extract(AnalysisContext.from_table(spans_table(chosen)))})
    return out


def _decided(kind: str, rows: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    notes = NearMissLog()
    findings = PARTS[kind].decide(rows, notes)
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
    kind = KIND_OF[shape.split(":")[0]]
    extracted = _parts(kind, SHAPES[shape](), parts)
    compacted = partitions.combine(extracted)[kind]
    # the reference: the rows as extracted, never held as words (the decision before compact)
    with monkeypatch.context() as m:
        m.setattr(_common, "id_words", lambda lists: None)
        as_text = partitions.combine(extracted)[kind]
        expected = _decided(kind, as_text)
    for column in WORDS[kind]:
        assert as_text[TABLE[kind]][column].null_count() == as_text[TABLE[kind]].height
    got = _decided(kind, compacted)
    assert got == expected
    assert got[0] or got[1]  # (every shape decides something)
    assert (
        _decided(kind, partitions.combine(extracted, compact=False)[kind]) == expected
    )  # (compacted in decide)
    table = compacted[TABLE[kind]]
    words = table[WORDS[kind][0]]
    if "not hex" not in shape:  # every piece's ids hex: all held as words
        assert words.null_count() == 0
    elif parts == 1 or "anywhere" in shape:  # (one piece with ids that are not hex: text)
        assert words.null_count() == table.height
    elif "shared" not in shape:  # some pieces as words, the others as text
        assert 0 < words.null_count() < table.height


def test_compacted_rows_hold_the_span_ids_as_words_and_give_them_back() -> None:
    rows = _parts("n_plus_one", SHAPES["n+1: one loop"](), 1)[0]["n_plus_one"]
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
    assert (
        _common.id_lists(sequences, "span_id", words=False).to_list()
        == rows["sequences"]["span_id"].to_list()
    )
    fanouts = _parts("fanout_straggler", SHAPES["fan-out: skew"](), 1)[0]["fanout_straggler"]
    compacted_fanouts = fanout_straggler.compact(fanouts)["occurrences"]
    assert compacted_fanouts["child_ids_words"].dtype == pl.List(pl.UInt64)
    for column in ("child_ids", "straggler_ids"):
        assert (
            _common.id_lists(compacted_fanouts, column, words=False).to_list()
            == fanouts["occurrences"][column].to_list()
        )
    pools = _parts("fanout_concurrency_limit", SHAPES["pool: per fan-out"](), 1)[0][
        "fanout_concurrency_limit"
    ]
    compacted_pools = fanout_concurrency_limit.compact(pools)["fanouts"]
    assert compacted_pools["child_ids_words"].dtype == pl.List(pl.UInt64)
    assert (
        _common.id_lists(compacted_pools, "child_ids", words=False).to_list()
        == pools["fanouts"]["child_ids"].to_list()
    )
