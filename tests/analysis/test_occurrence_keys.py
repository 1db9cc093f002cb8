"""Occurrence keys: serve's incremental pricing reuses a stored batch's pricing of a finding while
that finding's occurrences there are the same, compared by the keys their detectors hashed in bulk
(``Occurrence.key``, ``detectors._common.occurrence_values``) rather than by writing every occurrence
out each round. A key must follow what the pricing depends on (trace, spans, interventions) and
nothing about how the rows were partitioned, and hash the same in every process."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import polars as pl

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext, to_analysis_frame
from hourglass.analysis.detectors import DETECTORS, PARTS
from hourglass.analysis.detectors._common import occurrence_keys, occurrence_values
from hourglass.analysis.incremental import _occurrence_key
from hourglass.analysis.model import NearMissLog, Occurrence, RunConcurrently, ShortenSpan

KEYED = {  # the detectors that hash their occurrences' rows
    "serialized_calls",
    "n_plus_one",
    "batchable_calls",
    "fanout_straggler",
    "fanout_concurrency_limit",
    "retry_without_backoff",
    "error_propagation",
    "lock_contention",
    "missing_timeout",
}


def _content(o: Occurrence) -> tuple[Any, ...]:
    return (o.trace_id, o.span_ids, o.interventions)


def test_keys_follow_the_occurrences_not_the_partitions() -> None:
    from bench.analysis import generate_spans

    frame = to_analysis_frame(generate_spans(40_000, seed=3))
    whole = {kind: DETECTORS[kind](AnalysisContext.from_table(frame)) for kind in PARTS}
    pieces = partitions.split_by_trace(frame, 3)
    extracted = [partitions.extract(AnalysisContext.from_table(piece)) for piece in pieces]
    parted = partitions.decide(partitions.combine(extracted), NearMissLog())
    keyed = 0
    for kind in PARTS:
        if kind in KEYED:  # the spans give every keyed detector occurrences to key
            assert any(f.occurrences for f in whole[kind]), kind
        first = {(f.id, _content(o)): o.key for f in whole[kind] for o in f.occurrences}
        second = {(f.id, _content(o)): o.key for f in parted[kind] for o in f.occurrences}
        assert first == second, kind  # the same occurrences, the same keys, however partitioned
        if kind in KEYED:
            assert None not in first.values(), kind
            keyed += len(first)
            by_key: dict[int | None, tuple[Any, ...]] = {}
            for (_, content), key in first.items():  # different occurrences, different keys
                assert by_key.setdefault(key, content) == content, kind
    assert keyed > 1000


def test_a_key_changes_with_what_the_occurrence_is_made_of_and_hashes_alike_in_every_process() -> None:
    frame = pl.DataFrame(
        {"trace_id": ["t1", "t1", "t2"], "span_id": [["a", "b"], ["a", "bb"], ["a", "b"]], "n": [1, 1, 2]}
    )
    rows = list(occurrence_values(frame, ["trace_id", "span_id", "n"], ["trace_id", "span_id"]))
    assert [r[:-1] for r in rows] == [("t1", ("a", "b"), 1), ("t1", ("a", "bb"), 1), ("t2", ("a", "b"), 2)]
    keys = [r[-1] for r in rows]
    assert len(set(keys)) == 3
    assert keys == occurrence_keys(frame, ["trace_id", "span_id"]).to_list()
    changed_n = frame.with_columns(n=pl.lit(9))
    assert [r[-1] for r in occurrence_values(changed_n, ["n"], ["trace_id", "span_id"])] == keys
    flagged = [r[-1] for r in occurrence_values(frame, [], ["trace_id", "span_id"], True)]
    assert not set(flagged) & set(keys)  # a finding-level input the occurrences depend on
    code = (
        "import polars as pl\n"
        "from hourglass.analysis.detectors._common import occurrence_values\n"
        f"frame = pl.DataFrame({frame.to_dict(as_series=False)!r})\n"
        "print([r[-1] for r in occurrence_values(frame, [], ['trace_id', 'span_id'])])\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert other.stdout.strip() == repr(keys)


def test_a_key_depends_on_its_row_alone() -> None:
    """A detector hashes every finding's rows at once and splits them afterwards (error_propagation):
    a row's key is the same whatever rows it is hashed with."""
    frame = pl.DataFrame(
        {
            "trace_id": [f"t{i % 7}" for i in range(300)],
            "ids": [[f"s{i}", f"s{i + 1}"] if i % 5 else [] for i in range(300)],
            "held": [i * 1_000 if i % 3 else None for i in range(300)],
        }
    )
    whole = occurrence_keys(frame, ["trace_id", "ids", "held"]).to_list()
    for start, length in ((0, 1), (5, 17), (120, 100), (299, 1)):
        piece = frame.slice(start, length)
        assert occurrence_keys(piece, ["trace_id", "ids", "held"]).to_list() == whole[start : start + length]
    rechunked = pl.concat([frame.slice(0, 150), frame.slice(150)], rechunk=False)
    assert occurrence_keys(rechunked, ["trace_id", "ids", "held"]).to_list() == whole


def test_the_pricing_key_of_a_finding_in_a_batch() -> None:
    keyed = [
        Occurrence("t1", ("a", "b"), (RunConcurrently(("a", "b")),), key=11),
        Occurrence("t2", ("c",), key=12),
    ]
    again = [
        Occurrence("t1", ("a", "b"), (RunConcurrently(("a", "b")),), key=11),
        Occurrence("t2", ("c",), key=12),
    ]
    assert _occurrence_key("f", keyed, True) == _occurrence_key("f", again, True)
    assert _occurrence_key("f", keyed, True) != _occurrence_key("f", keyed, False)
    assert _occurrence_key("f", keyed, True) != _occurrence_key("g", keyed, True)
    again[1].key = 13
    assert _occurrence_key("f", keyed, True) != _occurrence_key("f", again, True)
    assert _occurrence_key("f", keyed, True) != _occurrence_key("f", keyed[:1], True)
    # occurrences without keys (made one by one): written out, interventions included
    plain = [Occurrence("t1", ("a",), (ShortenSpan("a", 5),))]
    assert _occurrence_key("f", plain, True) == _occurrence_key(
        "f", [Occurrence("t1", ("a",), (ShortenSpan("a", 5),))], True
    )
    assert _occurrence_key("f", plain, True) != _occurrence_key(
        "f", [Occurrence("t1", ("a",), (ShortenSpan("a", 6),))], True
    )
    assert _occurrence_key("f", plain + keyed, True) != _occurrence_key("f", keyed, True)


class _State:
    """The stored pricing of one batch (``IncrementalAnalysis.load_pricing``/``store_pricing``)."""

    def __init__(self, entries: dict[str, Any]) -> None:
        self.entries, self.stored = entries, 0

    def load_pricing(self, batch: int) -> dict[str, Any]:
        return self.entries

    def store_pricing(self, batch: int, entries: dict[str, Any]) -> None:
        self.stored += 1


def test_pricing_stored_under_written_out_keys_is_kept_for_the_same_occurrences() -> None:
    """A sidecar priced before the occurrences had keys: an entry whose occurrences are the same is
    re-keyed and stored, not priced again; one whose occurrences changed is priced again."""
    import hashlib

    from hourglass.analysis.incremental import KEYED_PREFIX, MemoExecutor, Unit, _written_key
    from hourglass.analysis.model import Finding

    def finding(by_ns: int) -> Finding:
        occurrences = [
            Occurrence("t1", ("a", "b"), (ShortenSpan("a", by_ns),), key=by_ns),
            Occurrence("t2", ("c",), (ShortenSpan("c", 1),), key=7),
        ]
        return Finding("fanout_straggler", "parallelization", "svc", "op", [], occurrences, 1.0)

    among = hashlib.sha1(b"t1\nt2").hexdigest()
    old = finding(5)
    legacy = {old.id: (_written_key(old.id, old.occurrences, True) + among, "impact", "calls")}
    for current, carried in ((finding(5), True), (finding(6), False)):
        state = _State(dict(legacy))
        executor = MemoExecutor(state, (Unit(0, ("t1", "t2"), None, None),))  # type: ignore[arg-type]
        plan = executor._plan(0, executor._group([current])[0], True)
        assert plan.carried is carried and plan.missing == ([] if carried else [current])
        if carried:
            assert state.entries[current.id][0].startswith(KEYED_PREFIX)
            priced = executor._priced((None, 0), plan, True)
            assert priced.impacts == {current.id: "impact"} and state.stored == 1
            again = MemoExecutor(state, executor.units)  # type: ignore[arg-type]
            assert again._plan(0, again._group([current])[0], True).carried is False  # stored re-keyed
