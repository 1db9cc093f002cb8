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

    def release_heap(self) -> None:
        """(serve's worker returns freed heap pages here: nothing to do in a test)"""

    def release_memory(self) -> None:  # (the sidecar's blocks and the heap: nothing here)
        self.release_heap()


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


def test_a_finding_is_priced_the_same_on_its_own_traces_as_beside_other_traces() -> None:
    """What lets a finding's pricing key be its occurrences alone (``MemoExecutor._plan``): its
    what-if savings and call durations in a set of traces are the same whether the context holds
    its own traces only or other traces beside them (repair, the critical path, the what-if engine
    and the call durations are per trace), on generated mixed shapes and the labelled samples."""
    from pathlib import Path

    import numpy as np

    from bench.analysis import generate_spans
    from hourglass.analysis.batch_tasks import priced_in
    from hourglass.collector.files import read_trace_files

    samples = sorted((Path(__file__).resolve().parents[2] / "sample-traces").glob("*.otlp.jsonl"))
    tables = [
        t for t in read_trace_files([str(p) for p in samples], on_error=lambda problem: None) if t.num_rows
    ]
    checked = 0
    for frame in (to_analysis_frame(generate_spans(20_000, seed=11)), *map(to_analysis_frame, tables)):
        whole = AnalysisContext.from_table(frame)
        findings = [f for kind in PARTS for f in DETECTORS[kind](whole) if f.occurrences]
        beside = priced_in(whole, findings, True)  # every finding priced in one context of all traces
        for finding in findings:
            own = frame.filter(pl.col("trace_id").is_in(finding.trace_ids))
            alone = priced_in(AnalysisContext.from_table(own), [finding], True)
            assert np.array_equal(alone.calls[finding.id], beside.calls[finding.id]), finding.id
            if finding.id in beside.impacts or finding.id in alone.impacts:
                ids, saved, root = alone.impacts[finding.id]
                ids2, saved2, root2 = beside.impacts[finding.id]
                assert ids == ids2 and np.array_equal(saved, saved2) and np.array_equal(root, root2), (
                    finding.id
                )
                # a saving priced with other traces beside the finding's own
                checked += own["trace_id"].n_unique() < frame["trace_id"].n_unique()
    assert checked > 10


def test_a_finding_that_appears_in_stored_batches_is_the_only_one_priced_there(tmp_path: Any) -> None:
    """serve's rounds (``run_incremental`` on a real DuckDB store): a slow call that is one
    anecdote in the first round becomes, once two more arrive in new traces, a missing_timeout
    finding with an occurrence in a stored batch. That batch's other findings are unchanged, so
    their stored pricing is kept: the round prices that finding alone there, on its one trace
    (before, the key held a hash of every finding's traces in the batch, and the batch's every
    finding was priced again on every one of them). The report is the CLI's on the same store."""
    import time

    import pyarrow as pa

    from bench.analysis import BASE_NS, generate_spans
    from hourglass.analysis import batch_tasks
    from hourglass.analysis.incremental import IncrementalAnalysis
    from hourglass.api.analysis_worker import StoreReader, run_incremental
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER, SPAN_COLUMNS
    from tests.api.test_incremental_serve import _assert_same_recommendations, _cli_report
    from tests.builders import TraceBuilder, spans_table

    def basket(i: int, stock_ms: float) -> TraceBuilder:  # GET /basket calling GET stock once
        b = TraceBuilder("storefront", f"f{i:031x}", BASE_NS + 60 * 10**9 * (i % 60) + i * 10**6)
        root = b.span("GET /basket", start_ms=0, dur_ms=stock_ms + 4, kind=KIND_SERVER)
        b.span(
            "GET stock", parent=root, start_ms=1, dur_ms=stock_ms, kind=KIND_CLIENT, http_url="http://stock/x"
        )
        return b

    def now(table: pa.Table) -> pa.Table:
        table = table.select(list(SPAN_COLUMNS))
        at = table.column_names.index("ingested_ns")
        return table.set_column(at, "ingested_ns", pa.array([time.time_ns()] * table.num_rows, pa.int64()))

    read: set[str] = set()  # the traces of the contexts priced in
    priced: list[tuple[str, list[str]]] = []  # each finding priced, with its occurrences' traces
    real_priced_in = batch_tasks.priced_in

    def recording(ctx: AnalysisContext, findings: list[Any], calls: bool) -> Any:
        read.update(ctx.traces["trace_id"].to_list())
        priced.extend((f.id, sorted(o.trace_id for o in f.occurrences)) for f in findings)
        return real_priced_in(ctx, findings, calls)

    class Reader(StoreReader):  # counts the reads of spans by batch (extraction and pricing)
        reads = 0

        def batch(self, trace_ids: list[str], first: int | None, last: int | None) -> pa.Table:
            Reader.reads += 1
            return super().batch(trace_ids, first, last)

    db = tmp_path / "spans.duckdb"
    store = DuckDBSpanStore(str(db))
    state = IncrementalAnalysis(str(db) + ".analysis.duckdb", batch_spans=4_000)
    batch_tasks.priced_in = recording
    try:
        store.write(generate_spans(20_000, seed=5).select(list(SPAN_COLUMNS)))
        store.write(spans_table([basket(i, 30 + i % 7) for i in range(30)] + [basket(100, 1_000)]))

        def round_() -> dict[str, Any]:
            priced.clear()
            read.clear()
            Reader.reads = 0
            request = {"cutoff_ns": time.time_ns() + 1, "margin_ns": 5 * 10**9, "since_ns": None}
            return run_incremental(state, Reader(store), request)[0]

        first = round_()
        assert not any(r["service"] == "storefront" for r in first["recommendations"])
        store.write(now(spans_table([basket(101, 1_500), basket(102, 2_200)])))
        report = round_()
        new = [r["id"] for r in report["recommendations"] if r["service"] == "storefront"]
        assert len(new) == 1 and new[0].startswith("missing_timeout-")
        # its occurrence in a stored batch (trace f...64: the anecdote of the first round) priced
        # there alone, and the two new traces in the new batch: nothing else priced again, and
        # only those traces read, both batches' on one read (the other read: the new batch's
        # extraction)
        slow = [f"f{100:031x}", f"f{101:031x}", f"f{102:031x}"]
        assert sorted(priced) == [(new[0], slow[:1]), (new[0], slow[1:])]
        assert read == set(slow) and Reader.reads == 2
    finally:
        batch_tasks.priced_in = real_priced_in
        state.close()
        store.close()
    _assert_same_recommendations(report, _cli_report(db))


def test_pricing_stored_with_the_batch_traces_hash_is_kept_for_the_same_occurrences() -> None:
    """Keys asking for call durations once ended with a hash of every finding's traces in the batch
    (``among``): a stored entry whose key is the current one plus such a hash is re-keyed and
    stored, not priced again; one of other occurrences is priced again (alone: only its traces)."""
    import hashlib

    from hourglass.analysis.incremental import MemoExecutor, Unit
    from hourglass.analysis.model import Finding

    def finding(by_ns: int) -> Finding:
        occurrences = [Occurrence("t1", ("a", "b"), (ShortenSpan("a", by_ns),), key=by_ns)]
        return Finding("fanout_straggler", "parallelization", "svc", "op", [], occurrences, 1.0)

    other = Finding("n_plus_one", "parallelization", "svc", "op", [], [Occurrence("t2", ("c",), key=3)], 1.0)
    among = hashlib.sha1(b"t1\nt2\nt3").hexdigest()
    old = finding(5)
    legacy = {
        old.id: (_occurrence_key(old.id, old.occurrences, True) + among, "impact", "calls"),
        other.id: (_occurrence_key(other.id, other.occurrences, True) + among, "other", "calls"),
    }
    for current, carried in ((finding(5), True), (finding(6), False)):
        state = _State(dict(legacy))
        executor = MemoExecutor(state, (Unit(0, ("t1", "t2", "t3"), None, None),))  # type: ignore[arg-type]
        plan = executor._plan(0, executor._group([current, other])[0], True)
        assert plan.carried and plan.missing == ([] if carried else [current])
        assert plan.wanted == (frozenset() if carried else {"t1"})
        assert state.entries[other.id] == (
            _occurrence_key(other.id, other.occurrences, True),
            "other",
            "calls",
        )
        # without call durations the keys never had the hash: a key of another length stays stale
        plain = MemoExecutor(_State(dict(legacy)), executor.units)  # type: ignore[arg-type]
        assert len(plain._plan(0, plain._group([current, other])[0], False).missing) == 2


def test_a_pricing_pass_holds_the_stored_pricing_for_that_pass_only() -> None:
    """A pricing pass reads each batch's stored pricing and lets it go when it ends (not held
    through the scoring and the report); the next pass (the workstreams') reads it again. The
    savings the passes give are combined without their trace ids (``merge_impacts``)."""
    import numpy as np

    from hourglass.analysis.incremental import MemoExecutor, Unit
    from hourglass.analysis.model import Finding

    class _Loads(_State):
        loads = 0

        def load_pricing(self, batch: int) -> dict[str, Any]:
            self.loads += 1
            return super().load_pricing(batch)

    found = Finding(
        "fanout_straggler", "parallelization", "svc", "op", [], [Occurrence("t1", ("a",), key=1)], 1.0
    )
    stored = (["t1"], np.array([5]), np.array([9]))
    state = _Loads({found.id: (_occurrence_key(found.id, found.occurrences, True), stored, np.array([2.0]))})
    executor = MemoExecutor(state, (Unit(0, ("t1",), None, None),))  # type: ignore[arg-type]
    for n in (1, 2):
        (priced,) = executor.map("pricing", partitions.price_part, [(None, 0, 1, [found], True)], None)
        assert priced.impacts == {found.id: stored} and state.loads == n and executor.pricing == {}
    (merged,) = partitions.merge_impacts([priced.impacts, priced.impacts]).values()
    assert merged.trace_ids == [] and merged.saved_ns.tolist() == [5, 5] and merged.root_ns.tolist() == [9, 9]
