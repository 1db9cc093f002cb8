"""hourglass.api.queries.QueryEngine: one store context for a series of questions, rebuilt when the store changes,
freed when idle."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hourglass.analysis.whatif_query import WhatIfInputError
from hourglass.api.queries import FindingsFailed, QueryEngine
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table


def table() -> pa.Table:
    b = TraceBuilder(service="front")
    root = b.span("GET /x", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("A", parent=root, start_ms=10, dur_ms=40, service="a", kind=KIND_CLIENT)
    b.span("B", parent=root, start_ms=50, dur_ms=40, service="b", kind=KIND_CLIENT)
    return spans_table(b)


class CountingStore:
    """What QueryEngine reads: scan() (each call recorded with its since_ns) and the change marker."""

    def __init__(self) -> None:
        self.scans: list[int | None] = []
        self.changes = 1

    def scan(self, since_ns: int | None) -> pa.Table:
        self.scans.append(since_ns)
        return table()

    def change_marker(self) -> int:
        return self.changes


def test_one_scan_per_store_version_and_freed_when_idle() -> None:
    store = CountingStore()
    engine = QueryEngine(store.scan, store.change_marker, idle_seconds=60)
    body = {"changes": [{"parallelize": {"service": "front", "operation": "GET /x"}}]}
    assert engine.whatif(body)["saved_ms_total"] == pytest.approx(40.0)
    assert engine.critical_path("front", "GET /x")["traces"] == 1  # type: ignore[index]
    assert len(store.scans) == 1
    store.changes = 2  # the store changed
    engine.whatif(body)
    assert len(store.scans) == 2
    engine.whatif({**body, "since": "1h"})
    assert len(store.scans) == 3 and store.scans[-1] is not None
    engine._idle_seconds = 0.2
    engine.endpoints(since="1h")  # ready: the idle timer restarts
    deadline = time.monotonic() + 10
    while engine._cached is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine._cached is None  # freed after the idle time
    with pytest.raises(WhatIfInputError, match="unknown field"):
        engine.whatif({**body, "extra": 1})
    with pytest.raises(WhatIfInputError, match="since"):
        engine.whatif({**body, "since": "soon"})
    assert engine.critical_path("front", "GET /nope") is None


def test_under_continuous_ingest_a_recent_context_is_reused() -> None:
    store = CountingStore()
    engine = QueryEngine(store.scan, store.change_marker, reuse_seconds=60)
    body = {"changes": [{"speedup": {"service": "a", "operation": "A", "factor": 0.5}}]}
    engine.whatif(body)
    store.changes += 1  # spans keep arriving
    engine.whatif(body)
    assert len(store.scans) == 1
    engine.whatif({**body, "since": "1h"})  # another window: built
    assert len(store.scans) == 2


def test_a_recommendation_change_over_a_window_asked_in_partitions_needs_its_findings() -> None:
    """A window larger than the budget holds at once is asked in partitions: a recommendation
    change there applies the finding ``window_findings`` decides over the whole window; one the
    window's findings do not have is named, and without ``window_findings`` the change is refused."""
    store = CountingStore()
    asked: list[tuple[int | None, set[str]]] = []

    def window_findings(since_ns: int | None, ids: set[str]) -> dict[str, object]:
        asked.append((since_ns, ids))
        return {}

    def scan_partition(part: int, parts: int, since_ns: int | None) -> pa.Table:
        return table() if part == 0 else table().slice(0, 0)

    def engine(findings: object) -> QueryEngine:
        return QueryEngine(
            store.scan,
            store.change_marker,
            window_spans=lambda since_ns: 10_000_000,
            budget=2**30,
            scan_partition=scan_partition,
            window_findings=findings,  # type: ignore[arg-type]
        )

    body = {"changes": [{"recommendation": "serialized_calls-0123456789abcdef"}], "since": "1h"}
    with pytest.raises(
        WhatIfInputError, match=r"changes\[0\]: no recommendation .* among the findings of the window"
    ):
        engine(window_findings).whatif(body)
    assert (
        len(asked) == 1 and asked[0][0] is not None and asked[0][1] == {"serialized_calls-0123456789abcdef"}
    )
    with pytest.raises(WhatIfInputError, match="needs the window's findings"):
        engine(None).whatif(body)

    def failing(since_ns: int | None, ids: set[str]) -> dict[str, object]:
        raise RuntimeError("the analysis worker process died (exit code -9)\ntraceback...")

    with pytest.raises(
        FindingsFailed, match=r"serialized_calls-0123456789abcdef over the window failed: .*exit code -9\)$"
    ):
        engine(failing).whatif(body)
    # a change of another kind is answered in the partitions without them
    parallel = {"changes": [{"parallelize": {"service": "front", "operation": "GET /x"}}]}
    assert engine(None).whatif(parallel)["saved_ms_total"] == pytest.approx(40.0)
    assert store.scans == []  # (never the whole window at once)


def test_a_question_plans_for_the_budget_less_what_the_process_holds() -> None:
    """A what-if or critical-path question in serve's process plans its partitions for the memory
    budget less what the process holds already (its store's cache, ingest buffers, reports), down
    to room for ``MIN_QUESTION_SPANS`` spans a partition: more, smaller partitions in a busy
    server, never a refusal; with nothing held, the budget's own plan."""
    from hourglass.analysis.planning import (
        MIN_QUESTION_SPANS,
        PEAK_BYTES_PER_SPAN,
        PROCESS_BASE_BYTES,
        at_once_spans,
        question_room,
    )

    budget = 1536 * 2**20
    assert question_room(budget, 0) == budget
    assert question_room(budget, 2**30) == budget - 2**30
    assert question_room(budget, 10 * 2**30) == PROCESS_BASE_BYTES + MIN_QUESTION_SPANS * PEAK_BYTES_PER_SPAN
    tiny = PROCESS_BASE_BYTES + 20 * PEAK_BYTES_PER_SPAN
    assert question_room(tiny, 2**30) == tiny  # (never more than the budget)
    store = CountingStore()
    held = [0]
    engine = QueryEngine(
        store.scan,
        store.change_marker,
        window_spans=lambda since_ns: 7_200_000,
        budget=budget,
        scan_partition=lambda part, parts, since_ns: table().slice(0, 0),
        held=lambda: held[0],
    )
    alone = engine._parts(None)
    held[0] = 900 * 2**20
    busy = engine._parts(None)
    assert alone == -(-7_200_000 * 5 // (4 * at_once_spans(budget)))
    assert busy == -(-7_200_000 * 5 // (4 * at_once_spans(budget - held[0]))) > alone
    held[0] = 10 * 2**30
    assert engine._parts(None) == -(-7_200_000 * 5 // (4 * MIN_QUESTION_SPANS))


def test_what_serve_holds_counts_its_children() -> None:
    """``held_by_this_process``: the memory budget is the service's, so a question in serve's
    server counts what its children (the analysis worker) hold beside it."""
    import subprocess
    import sys

    from hourglass.api.queries import held_by_this_process

    before = held_by_this_process()
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; x = b'x' * (300 * 2**20); print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert held_by_this_process() - before >= 250 * 2**20
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_window_in_partitions_is_split_once_and_answers_as_scanned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A question over a DuckDB store's window in partitions reads the window once into partition
    files beside the store (``split_store_window``), removed after, instead of scanning the whole
    store for every partition: the same answers as the scans, which a failed split falls back to."""
    import glob as globbing

    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES

    store = _sample_store(tmp_path)
    budget = PROCESS_BASE_BYTES + 300 * PEAK_BYTES_PER_SPAN  # (300 spans at once: many partitions)
    scans: list[int] = []
    scan_partition = store.scan_partition

    def scanning(part: int, parts: int, **kwargs: object) -> pa.Table:
        scans.append(part)
        return scan_partition(part, parts, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "scan_partition", scanning)
    from hourglass.analysis import partitions

    # (a budget this small has no room for the split's own memory: left out here)
    monkeypatch.setattr(partitions, "split_bytes", lambda spans, filtered=False: 0)
    try:
        stale = tmp_path / "hourglass-question-left-by-a-killed-serve"
        stale.mkdir()
        split = QueryEngine.over_store(store, budget=budget)
        # (the window's partitions: the endpoint's traces alone, and the touched traces alone, are
        # the next tests')
        split._endpoint_traces = split._window_roots = None
        assert split._parts(None) >= 4
        made: list[str] = []
        real_split = store.split_partitions

        def splitting(folder: str, *args: object, **kwargs: object) -> object:
            made.append(folder)
            return real_split(folder, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(store, "split_partitions", splitting)
        busiest = split.endpoints()[0]
        assert scans == []
        service, operation = busiest["service"], busiest["operation"]
        body = {"changes": [{"speedup": {"service": service, "operation": "*", "factor": 0.5}}]}
        answer = split.whatif(body)
        assert answer["saved_ms_total"] > 0
        path = split.critical_path(service, operation)
        assert not stale.exists()  # (removed before the first split over the store)
        assert scans == [] and made and all(Path(folder).parent == tmp_path for folder in made)
        assert not globbing.glob(str(tmp_path / "hourglass-question-*"))  # (beside the store, removed after)
        scanned = QueryEngine.over_store(store, budget=budget)
        scanned._split_window = scanned._endpoint_traces = scanned._window_roots = None
        assert scanned.whatif(body) == answer and scans
        assert scanned.critical_path(service, operation) == path
        scans.clear()

        def failing(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store, "split_partitions", failing)
        unsplit = QueryEngine.over_store(store, budget=budget)
        unsplit._window_roots = None
        assert unsplit.whatif(body) == answer and scans
        assert not globbing.glob(str(tmp_path / "hourglass-question-*"))
    finally:
        store.close()


def _sample_store(tmp_path: Path) -> Any:
    """A DuckDB store of the sample traces (3,408 spans)."""
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.files import read_trace_files
    from hourglass.collector.schema import SPAN_COLUMNS

    samples = sorted(
        str(p) for p in (Path(__file__).resolve().parents[2] / "sample-traces").glob("*.otlp.jsonl")
    )
    store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
    for part in read_trace_files(samples, on_error=lambda problem: None):
        if part.num_rows:
            store.write(part.select(list(SPAN_COLUMNS)))
    return store


def _sample_frame(tmp_path: Path) -> Any:
    """The sample traces' span rows (every column) as a polars DataFrame, read from a store of
    them made in ``tmp_path / "sample"``."""
    import polars as pl

    from hourglass.collector.schema import SPAN_COLUMNS

    (tmp_path / "sample").mkdir()
    sample = _sample_store(tmp_path / "sample")
    try:
        frame = pl.from_arrow(sample.scan(columns=tuple(SPAN_COLUMNS)))
    finally:
        sample.close()
    assert isinstance(frame, pl.DataFrame)
    return frame


def _sample_store_read_by_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    """A DuckDB store of the sample traces (its window split with no memory of its own counted)
    and the rows of each of its reads of traces by id, as they are made."""
    from hourglass.analysis import partitions

    store = _sample_store(tmp_path)
    monkeypatch.setattr(partitions, "split_bytes", lambda spans, filtered=False: 0)
    read: list[int] = []
    scan_partition = store.scan_partition

    def reading(part: int, parts: int, **kwargs: object) -> pa.Table:
        table = scan_partition(part, parts, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("trace_ids") is not None:
            read.append(table.num_rows)
        return table

    monkeypatch.setattr(store, "scan_partition", reading)
    return store, read


def test_an_endpoints_critical_path_reads_only_the_traces_with_its_spans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over a window asked in partitions, an endpoint's critical path is decided over the traces
    with a span of that endpoint only (``DuckDBSpanStore.endpoint_trace_ids``), read by their
    ids: the same path as the window's partitions give, with or without ``since``, and for an
    endpoint no trace is rooted at (None); where those traces would need as many partitions as
    a window is split for, the window's partitions answer."""
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES

    store, read = _sample_store_read_by_ids(tmp_path, monkeypatch)
    try:
        total = store.raw_row_count()
        budget = PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 2  # (half the store at once)
        engine = QueryEngine.over_store(store, budget=budget)
        monkeypatch.setattr(engine, "_held", lambda: 0)
        window = QueryEngine.over_store(store, budget=budget)
        window._endpoint_traces = None
        assert engine._parts(None) > 1
        import datetime

        starts = store.scan(columns=("start_ns",))["start_ns"]  # (the samples span ~26 s)
        middle = (pa.compute.min(starts).as_py() + pa.compute.max(starts).as_py()) // 2
        mid = datetime.datetime.fromtimestamp(middle / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        asked = 0
        traces: dict[str | None, int] = {}
        for endpoint in [(e["service"], e["operation"]) for e in window.endpoints(limit=50)]:
            _, spans = store.endpoint_trace_ids(*endpoint)  # type: ignore[misc]
            if spans * 5 // 4 > total // 2:  # (more than a context: the next partitions' test)
                continue
            for since in (None, mid):
                read.clear()
                path = engine.critical_path(*endpoint, since=since)
                # (those traces only; none read when none of them is in the window)
                assert (read or path is None) and sum(read) <= spans < total, endpoint
                assert path == window.critical_path(*endpoint, since=since), (endpoint, since)
                asked += path is not None
                traces[since] = traces.get(since, 0) + (path["traces"] if path else 0)
        assert asked >= 3
        assert 0 < traces[mid] < traces[None]  # (the window from since: fewer of its traces)
        read.clear()
        assert engine.critical_path("no-such-service", "GET /") is None and read == []
        # as many partitions as a window is split for: the window's partitions instead
        busiest = window.endpoints()[0]
        small = QueryEngine.over_store(store, budget=PROCESS_BASE_BYTES + 50 * PEAK_BYTES_PER_SPAN)
        monkeypatch.setattr(small, "_held", lambda: 0)
        read.clear()
        assert small.critical_path(busiest["service"], busiest["operation"]) == window.critical_path(
            busiest["service"], busiest["operation"]
        )
        assert read == []
    finally:
        store.close()


@pytest.mark.slow
def test_an_endpoint_with_many_spans_is_asked_from_a_split_of_its_own_traces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint whose traces hold more spans than a few partitions do, but at most three
    quarters of the window, has its traces alone split into files (``split_partitions`` with
    their ids) and asked partition by partition: the same path as the window's partitions; and
    so are the traces a what-if of the whole window touches (a speedup of that endpoint)."""
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES, few_parts_spans

    store, read = _sample_store_read_by_ids(tmp_path, monkeypatch)
    split_ids: list[int | None] = []
    split_partitions = store.split_partitions

    def splitting(folder: str, parts: int, **kwargs: object) -> object:
        ids = kwargs.get("trace_ids")
        split_ids.append(len(ids) if isinstance(ids, list) else None)
        return split_partitions(folder, parts, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "split_partitions", splitting)
    try:
        total = store.raw_row_count()
        budget = PROCESS_BASE_BYTES + 100 * PEAK_BYTES_PER_SPAN  # (100 spans at once)
        engine = QueryEngine.over_store(store, budget=budget)
        window = QueryEngine.over_store(store, budget=budget)
        window._endpoint_traces = window._window_roots = None
        for made in (engine, window):
            monkeypatch.setattr(made, "_held", lambda: 0)
        asked = 0
        for endpoint in [(e["service"], e["operation"]) for e in window.endpoints(limit=50)]:
            ids, spans = store.endpoint_trace_ids(*endpoint)  # type: ignore[misc]
            if not few_parts_spans(budget) < spans <= total * 3 // 4:
                continue
            split_ids.clear()
            read.clear()
            path = engine.critical_path(*endpoint)
            assert split_ids == [len(ids)] and read == [], endpoint  # (its traces split, not scanned)
            assert path is not None and path == window.critical_path(*endpoint), endpoint
            roots = store.window_roots(None, [endpoint])
            touched = roots.num_rows - roots["trace_id"].null_count
            split_ids.clear()
            read.clear()
            body = {
                "changes": [{"speedup": {"service": endpoint[0], "operation": endpoint[1], "factor": 0.5}}]
            }
            answer = engine.whatif(body)
            assert split_ids == [touched] and read == [], endpoint  # (the touched traces split, not scanned)
            assert answer == window.whatif(body) and answer["traces_changed"] > 0, endpoint
            # a what-if of the traces rooted there: its traces split too
            rooted = {**body, "service": endpoint[0], "operation": endpoint[1]}
            split_ids.clear()
            answer = engine.whatif(rooted)
            assert split_ids == [len(ids)] and read == [], endpoint
            assert answer == window.whatif(rooted) and answer["traces_changed"] > 0, endpoint
            asked += 1
        assert asked >= 2
    finally:
        store.close()


def test_a_whatif_of_an_endpoints_traces_reads_only_the_traces_with_its_spans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A what-if of the traces rooted at an endpoint, over a window asked in partitions, is
    answered over the traces with a span of that endpoint only: the same answer as the window's
    partitions — for a change inside those traces, a recommendation, a change whose span is only
    in the window's other traces (it changes none of them), with or without ``since`` — and the
    same refusal of a change whose span is nowhere in the window (the store is asked)."""
    from hourglass.analysis.context import AnalysisContext
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES
    from hourglass.analysis.whatif_query import detector_lookup

    store, read = _sample_store_read_by_ids(tmp_path, monkeypatch)
    try:
        whole = AnalysisContext.from_table(store.scan())
        lookup = detector_lookup(whole)

        def window_findings(since_ns: int | None, ids: set[str]) -> dict[str, object]:
            return {i: lookup(i) for i in ids if lookup(i) is not None}

        total = store.raw_row_count()
        budget = PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 2  # (half the store at once)
        engines = [
            QueryEngine.over_store(store, budget=budget, window_findings=window_findings)  # type: ignore[arg-type]
            for _ in range(2)
        ]
        engine, window = engines
        window._endpoint_traces = None
        for made in engines:
            monkeypatch.setattr(made, "_held", lambda: 0)
        assert engine._parts(None) > 1
        ledger = ("ledger", "POST /accounts/{account_id}/transfers")
        _, spans = store.endpoint_trace_ids(*ledger)  # type: ignore[misc]
        assert spans * 5 // 4 <= total // 2  # (its traces at once)
        ids, _ = store.endpoint_trace_ids(*ledger)  # type: ignore[misc]
        in_ledger = set(store.scan(trace_ids=ids, columns=("service",))["service"].to_pylist())
        elsewhere = next(s for s in store.services() if s not in in_ledger)  # (in the window's other traces)
        assert not store.has_span("no-such-service", None)
        report = analyze_report(whole)
        lock = next(r["id"] for r in report["recommendations"] if r["kind"] == "lock_contention")
        bodies = [
            {"changes": [{"speedup": {"service": "ledger", "operation": "*", "factor": 0.5}}]},
            {"changes": [{"recommendation": lock}]},
            {"changes": [{"speedup": {"service": elsewhere, "operation": "*", "factor": 0.5}}]},
            {
                "changes": [{"speedup": {"service": "ledger", "operation": "*", "factor": 0.5}}],
                "service": "ledger",
            },
        ]
        starts = store.scan(columns=("start_ns",))["start_ns"]
        middle = (pa.compute.min(starts).as_py() + pa.compute.max(starts).as_py()) // 2
        import datetime

        mid = datetime.datetime.fromtimestamp(middle / 1e9, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for body in bodies:
            for since in (None, mid) if "recommendation" not in str(body) else (None,):
                asked = {"service": ledger[0], "operation": ledger[1], **body}
                if since is not None:
                    asked["since"] = since
                read.clear()
                answer = engine.whatif(asked)
                assert read and sum(read) < total, asked  # (the endpoint's traces only)
                assert answer == window.whatif(asked), asked
                if elsewhere in str(body):
                    assert answer["changes"][0]["traces"] == 0 and answer["traces"] > 0
        # an endpoint no trace is rooted at (a span inside traces, one nowhere): the window's
        # refusal, its traces counted from the store's rows, none of the window's partitions
        # read; an unknown recommendation is still said first
        windows = _window_reads(store, monkeypatch)
        speedup = {"changes": [{"speedup": {"service": "ledger", "operation": "*", "factor": 0.5}}]}
        unknown = {"changes": [{"recommendation": "lock_contention-000000000000"}]}
        for endpoint in (("ledger", "lock.acquire ledger.journal"), ("no-such-service", "GET /")):
            for body, since in ((speedup, None), (speedup, mid), (unknown, None)):
                asked = {"service": endpoint[0], "operation": endpoint[1], **body}
                if since is not None:
                    asked["since"] = since
                refusals: list[tuple[str, bool]] = []
                for made in (engine, window):
                    windows.clear()
                    with pytest.raises(WhatIfInputError) as refused:
                        made.whatif(asked)
                    refusals.append((str(refused.value), any(windows)))
                assert refusals[0][0] == refusals[1][0] and not refusals[0][1], (asked, refusals)
                said = "no trace has a root span" if body is speedup else "no recommendation"
                assert said in refusals[0][0], refusals
        # the store's answers themselves: the window from since, and a cap on the spans
        first, last = pa.compute.min(starts).as_py(), pa.compute.max(starts).as_py()
        assert store.has_span("ledger", None, first) and not store.has_span("ledger", None, last + 1)
        assert store.has_span(None, ledger[1]) and not store.has_span("ledger", "no-such-operation")
        assert store.endpoint_trace_ids(*ledger, last + 1) == ([], 0)
        assert store.endpoint_trace_ids(*ledger, most_spans=spans - 1) is None
        assert store.endpoint_trace_ids(*ledger, most_traces=len(ids) - 1) is None
        assert store.endpoint_trace_ids(*ledger, most_traces=len(ids)) == (ids, spans)
        assert store.endpoint_trace_ids(*ledger, most_spans=spans) == store.endpoint_trace_ids(*ledger)
        # (serve's since is rounded to 10 s, and no endpoint of the samples crosses a round 10 s:
        # the helpers themselves, from the middle of the endpoint's own traces)
        from hourglass.analysis.endpoint_path import endpoint_critical_path_partitioned
        from hourglass.analysis.whatif_query import (
            Change,
            endpoint_path_of_traces,
            evaluate_partitioned,
            partition_contexts,
            whatif_of_traces,
        )
        from hourglass.collector.schema import ANALYSIS_COLUMNS

        roots = store.scan(trace_ids=ids, columns=("start_ns",))["start_ns"].to_pylist()
        since_ns = sorted(roots)[len(roots) // 2]
        later, later_spans = store.endpoint_trace_ids(*ledger, since_ns)  # type: ignore[misc]
        assert 0 < len(later) < len(ids) and later_spans < spans

        def by_ids(part: int, parts: int, trace_ids: list[str]) -> pa.Table:
            return store.scan_partition(part, parts, trace_ids=trace_ids, columns=ANALYSIS_COLUMNS)

        def in_window(part: int, parts: int) -> pa.Table:
            return store.scan_partition(part, parts, since_ns=since_ns, columns=ANALYSIS_COLUMNS)

        contexts = partition_contexts(in_window, since_ns)
        for changes in (
            [Change("speedup", service="ledger", operation="*", factor=0.5)],
            [Change("speedup", service=elsewhere, operation="*", factor=0.5)],
        ):
            fast = whatif_of_traces(
                by_ids,
                later,
                later_spans,
                budget,
                changes,
                service=ledger[0],
                operation=ledger[1],
                has_span=lambda svc, op: store.has_span(svc, op, since_ns),
                since_ns=since_ns,
            )
            assert fast == evaluate_partitioned(contexts, 3, changes, service=ledger[0], operation=ledger[1])
            assert fast is not None and 0 < fast["traces"] < len(ids)
        path = endpoint_path_of_traces(by_ids, later, later_spans, budget, *ledger, since_ns)
        assert path == (endpoint_critical_path_partitioned(contexts, 3, *ledger)[1],)
        nowhere = {"changes": [{"speedup": {"service": "no-such-service", "operation": "*", "factor": 0.5}}]}
        for made in engines:
            with pytest.raises(WhatIfInputError, match="no span no-such-service"):
                made.whatif({**nowhere, "service": ledger[0], "operation": ledger[1]})
    finally:
        store.close()


NOT_PLAIN = ("copied root", "orphans only", "two roots")  # (the awkward roots read, not aggregated)


def _engine_and_window(
    store: Any, budget: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[QueryEngine, QueryEngine]:
    """Two engines over ``store`` under ``budget`` (nothing counted as held already): one as serve
    makes it, one whose window's partitions answer every question (no endpoint's traces named)."""
    engine = QueryEngine.over_store(store, budget=budget)
    window = QueryEngine.over_store(store, budget=budget)
    window._endpoint_traces = None
    for made in (engine, window):
        monkeypatch.setattr(made, "_held", lambda: 0)
    return engine, window


def _window_reads(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per partition ``store`` reads from now on: True for a partition of the window
    (every trace), False for one of some traces read by their ids."""
    windows: list[bool] = []
    scanned = store.scan_partition

    def partition(part: int, parts: int, **kwargs: Any) -> pa.Table:
        windows.append(kwargs.get("trace_ids") is None)
        return scanned(part, parts, **kwargs)

    monkeypatch.setattr(store, "scan_partition", partition)
    return windows


def _store_with_awkward_roots(tmp_path: Path, backend: str = "duckdb") -> tuple[Any, dict[str, str], int]:
    """The sample traces in a DuckDB store (``backend`` "chdb": an embedded ClickHouse store),
    five of them with awkward roots: a root stored twice
    (first with a parent id, then without), a trace of orphans only, a trace with two parentless
    spans, a root that ends before it starts, and a root whose parent id is empty rather than
    null (the last two are still one plain parentless span); and a trace all of whose spans
    start before ``since_ns`` but for a later copy of one of them (a read keeps the first, so
    the window from ``since_ns`` has not got it). By trace id, which; and ``since_ns``, the
    start of the middle root + 1 ns."""
    import polars as pl

    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from hourglass.collector.schema import SPAN_SCHEMA

    frame = _sample_frame(tmp_path)
    assert isinstance(frame, pl.DataFrame)
    parentless = pl.col("parent_span_id").is_null()
    traces = frame.filter(parentless).group_by("trace_id").len().filter(pl.col("len") == 1)["trace_id"]
    multi = frame.group_by("trace_id").len().filter(pl.col("len") > 2)["trace_id"]
    chosen = [t for t in sorted(traces.to_list()) if t in set(multi.to_list())][:5]
    awkward = dict(
        zip(
            chosen, ("copied root", "orphans only", "two roots", "negative root", "empty parent"), strict=True
        )
    )
    which = pl.col("trace_id").replace_strict(awkward, default="")
    # a root stored first with a parent id that is nowhere, then again without one (longer and
    # renamed): a read keeps the first, so the trace has no parentless span
    copy = frame.filter(parentless & (which == "copied root")).with_columns(
        end_ns=pl.col("end_ns") + 10**9, name=pl.lit("a later copy")
    )
    starts = sorted(frame.filter(parentless)["start_ns"].to_list())
    since_ns = starts[len(starts) // 2] + 1
    last = frame.group_by("trace_id").agg(pl.col("start_ns").max())
    early = sorted(set(last.filter(pl.col("start_ns") < since_ns)["trace_id"].to_list()) - set(chosen))
    late = frame.filter((pl.col("trace_id") == early[0]) & ~parentless).head(1)
    awkward[early[0]] = "late copy"
    copy = pl.concat([copy, late.with_columns(start_ns=pl.lit(since_ns), end_ns=pl.lit(since_ns + 1000))])
    first_child = (pl.col("trace_id") == chosen[2]) & ~parentless
    first_child = first_child & (pl.int_range(pl.len()) == first_child.arg_max())
    frame = frame.with_columns(
        parent_span_id=pl.when(parentless & (which == "orphans only"))
        .then(pl.lit("00000000deadbeef"))
        .when(first_child)
        .then(None)
        .when(parentless & (which == "copied root"))  # (its parentless copy is written later)
        .then(pl.lit("00000000cafef00d"))
        .when(parentless & (which == "empty parent"))
        .then(pl.lit(""))
        .otherwise("parent_span_id"),
        end_ns=pl.when(parentless & (which == "negative root"))
        .then(pl.col("start_ns") - 5)
        .otherwise("end_ns"),
    )
    if backend == "chdb":
        from hourglass.collector.clickhouse_store import ClickHouseSpanStore

        store: Any = ClickHouseSpanStore.embedded(str(tmp_path / "spans.chdb"))
    else:
        store = DuckDBSpanStore(str(tmp_path / "spans.duckdb"))
    for rows in (frame, copy):
        table = rows.to_arrow()
        store.write(table.cast(pa.schema([SPAN_SCHEMA.field(name) for name in table.column_names])))
    return store, awkward, since_ns


BACKENDS = [
    "duckdb",
    pytest.param(
        "chdb",
        marks=pytest.mark.skipif(
            __import__("importlib").util.find_spec("chdb") is None, reason="chdb is not installed"
        ),
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_whatif_over_the_window_re_times_only_the_traces_its_changes_touch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A what-if of every trace of a window asked in partitions reads and re-times only the
    traces its changes touch and those whose root is not one plain parentless span
    (``DuckDBSpanStore.window_roots``, ``ClickHouseSpanStore.window_roots``): the same answer as
    the window's partitions — a speedup of one operation, of a whole service, parallelize, cap,
    a recommendation, several at once, with and without ``since`` — the same refusal of a change
    whose span is nowhere, and the traces with awkward roots are read, not taken from the
    aggregation. The same over an embedded ClickHouse store."""
    import polars as pl

    from hourglass.analysis.context import AnalysisContext
    from hourglass.analysis.endpoint_path import endpoint_critical_path_partitioned
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES
    from hourglass.analysis.whatif_query import (
        Change,
        detector_lookup,
        endpoints_of_roots,
        evaluate_partitioned,
        partition_contexts,
        touched_by,
        whatif_of_touched_traces,
    )
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    store, awkward, since_ns = _store_with_awkward_roots(tmp_path, backend)
    try:
        whole = AnalysisContext.from_table(store.scan())
        assert whole.traces.filter(pl.col("trace_id").is_in(list(awkward))).height == len(awkward)
        lookup = detector_lookup(whole)
        report = analyze_report(whole)
        recommendation = report["recommendations"][0]["id"]  # type: ignore[index]

        def window_findings(since_ns: int | None, ids: set[str]) -> dict[str, object]:
            return {i: lookup(i) for i in ids if lookup(i) is not None}

        total = store.raw_row_count()
        budget = PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 2  # (half the store at once)
        engine, window = (
            QueryEngine.over_store(store, budget=budget, window_findings=window_findings)  # type: ignore[arg-type]
            for _ in range(2)
        )
        window._window_roots = None
        for made in (engine, window):
            monkeypatch.setattr(made, "_held", lambda: 0)
        assert engine._parts(None) > 1
        read: list[list[str]] = []
        scan_partition = store.scan_partition

        def reading(part: int, parts: int, **kwargs: Any) -> pa.Table:
            if kwargs.get("trace_ids") is not None:
                read.append(list(kwargs["trace_ids"]))
            return scan_partition(part, parts, **kwargs)

        monkeypatch.setattr(store, "scan_partition", reading)
        ledger = {"service": "ledger", "operation": "POST /accounts/{account_id}/transfers"}
        bodies: list[dict[str, Any]] = [
            {"changes": [{"speedup": {**ledger, "factor": 0.5}}]},
            {"changes": [{"speedup": {"service": "ledger", "operation": "*", "factor": 2}}]},
            {"changes": [{"parallelize": ledger}, {"cap": {**ledger, "concurrency": 1}}]},
            {"changes": [{"recommendation": recommendation}]},
        ]
        for body in bodies:
            read.clear()
            answer = engine.whatif(body)
            assert answer == window.whatif(body), body
            asked = {t for ids in read for t in ids}
            assert asked and len(asked) < whole.traces.height, body  # (the touched traces only)
            assert {t for t, what in awkward.items() if what in NOT_PLAIN} <= asked, body
            assert answer["traces"] == whole.traces.height, body
            assert answer["traces_changed"] > 0 or "parallelize" in str(body), body
        nowhere = {"changes": [{"speedup": {"service": "no-such-service", "operation": "*", "factor": 0.5}}]}
        for made in (engine, window):
            with pytest.raises(WhatIfInputError, match="no span no-such-service"):
                made.whatif(nowhere)
        # the endpoints (the MCP tool's listing, a 404's hint) are counted the same way
        read.clear()
        listing = engine.endpoints(limit=1000)
        assert listing == window.endpoints(limit=1000)
        assert sum(e["traces"] for e in listing) == whole.traces.height
        asked = {t for ids in read for t in ids}
        assert asked & set(awkward) == {t for t, what in awkward.items() if what in NOT_PLAIN}
        # every trace the store takes from its aggregation has the root the context chooses: the
        # root ending before it starts and the empty parent id among them; the others are named
        roots = store.window_roots(None)
        named = set(roots["trace_id"].drop_null().to_pylist())
        assert {t for t, what in awkward.items() if what in NOT_PLAIN} <= named
        assert not named & {t for t, what in awkward.items() if what not in NOT_PLAIN}
        plain = whole.traces.filter(~pl.col("trace_id").is_in(list(named)))
        by_root = ["root_service", "root_name", "root_duration_ns"]
        taken = pl.from_arrow(roots).filter(pl.col("trace_id").is_null()).select(by_root)
        assert isinstance(taken, pl.DataFrame) and taken.height == plain.height
        assert taken.sort(by_root).equals(plain.select(by_root).sort(by_root))
        # with since (serve's is rounded to 10 s: the helper itself, from the middle of the window,
        # where a trace is in the window by a later copy of a span only, and so not in it)

        def by_ids(part: int, parts: int, trace_ids: list[str]) -> pa.Table:
            return store.scan_partition(part, parts, trace_ids=trace_ids, columns=ANALYSIS_COLUMNS)

        def in_window(part: int, parts: int) -> pa.Table:
            return store.scan_partition(part, parts, since_ns=since_ns, columns=ANALYSIS_COLUMNS)

        for changes in (
            [Change("speedup", service="ledger", operation="*", factor=0.5)],
            [Change("recommendation", recommendation=recommendation)],
        ):
            spans_of, trace_ids = touched_by(changes, lookup)
            roots = store.window_roots(since_ns, spans_of, trace_ids)
            fast = whatif_of_touched_traces(by_ids, roots, budget, changes, since_ns=since_ns, lookup=lookup)
            contexts = partition_contexts(in_window, since_ns)
            assert fast == evaluate_partitioned(contexts, 3, changes, lookup=lookup), changes
            assert fast is not None and 0 < fast["traces"] < whole.traces.height
        listed = endpoints_of_roots(by_ids, store.window_roots(since_ns), budget, since_ns=since_ns)
        assert listed is not None
        assert listed.equals(endpoint_critical_path_partitioned(contexts, 3, None, None)[0])
        # too many traces to name: the window's partitions answer
        spans_of, trace_ids = touched_by([Change("speedup", service="ledger", operation="*")], lookup)
        roots = store.window_roots(None, spans_of, trace_ids)
        named = roots.num_rows - roots["trace_id"].null_count
        assert (
            whatif_of_touched_traces(
                by_ids,
                roots,
                budget,
                [Change("speedup", service="ledger", operation="*")],
                most_traces=named - 1,
            )
            is None
        )
    finally:
        store.close()


def test_where_each_trace_is_is_where_the_split_and_the_scans_put_it(tmp_path: Path) -> None:
    """``partitions.trace_parts_of`` (which partition's task gets a recommendation's occurrences
    in a trace) agrees with the partitions the window's split files and ``scan_partition`` hold."""
    from hourglass.analysis import partitions

    _sample_store(tmp_path).close()
    path = str(tmp_path / "spans.duckdb")
    source = partitions.StoreSource(path)
    split = partitions.split_store(source, 5)
    assert split is not None
    every: list[dict[str, int]] = []
    try:
        for where in (split, source):
            held = {
                trace_id: part
                for part in range(5)
                for trace_id in set(where.load(part, 5)["trace_id"].to_pylist())
            }
            told = partitions.trace_parts_of(where, sorted(held), 5)
            assert told is not None and len(held) > 100
            assert dict(zip(told["trace_id"].to_list(), told["part"].to_list(), strict=True)) == held
            every.append(held)
    finally:
        split.remove()
    assert every[0] == every[1] and len(set(every[0].values())) == 5
    assert partitions.trace_parts_of(partitions.StoreSource("chdb:./elsewhere"), ["a"], 5) is None


def analyze_report(ctx: object) -> dict[str, object]:
    from hourglass.analysis.pipeline import analyze_context

    report, _ = analyze_context(ctx)  # type: ignore[arg-type]
    return report


def test_a_cached_context_is_not_counted_against_the_question_that_replaces_it() -> None:
    """A context built at once is reused by the next question over the same window (not planned
    in partitions because it is held); one that will not be reused is let go before what the
    process holds is measured, so the plan does not count it."""
    store = CountingStore()
    budget = 1536 * 2**20
    engine: QueryEngine

    def held() -> int:  # (a held context counts as a gigabyte)
        return 2**30 if engine._cached is not None else 0

    engine = QueryEngine(
        store.scan,
        store.change_marker,
        window_spans=lambda since_ns: 500_000,
        budget=budget,
        scan_partition=lambda part, parts, since_ns: table().slice(0, 0),
        held=held,
    )
    body = {"changes": [{"parallelize": {"service": "front", "operation": "GET /x"}}]}
    engine.whatif(body)
    assert engine._cached is not None and len(store.scans) == 1
    assert engine._parts(None) == 1  # reused as it is
    engine.whatif(body)
    assert len(store.scans) == 1
    store.changes = 2  # the store changed: the context is rebuilt, planned without the old one
    assert engine._parts(None) == 1 and engine._cached is None
    engine.whatif(body)
    assert len(store.scans) == 2


def test_a_questions_split_needs_partitions_memory_files_and_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """``question_split_refused``: a window is split into partition files only with enough
    partitions, room in the budget for the split (more with a ``since`` filter), a file each
    under ``ulimit -n`` and twice what it writes free on the disk."""
    import shutil as shutil_module
    from collections import namedtuple

    from hourglass.analysis import partitions
    from hourglass.analysis.planning import split_bytes

    spans, free = 7_200_000, 2**30
    assert partitions.question_split_refused(spans, 14, free, False, None) is None
    assert "3 partitions" in str(partitions.question_split_refused(spans, 3, free, False, None))
    assert "the split needs" in str(
        partitions.question_split_refused(spans, 14, split_bytes(spans, True) - 1, True, None)
    )
    assert partitions.question_split_refused(spans, 14, split_bytes(spans, False), False, None) is None
    monkeypatch.setattr(partitions, "room_for_open_files", lambda files: files - 1)
    assert "ulimit" in str(partitions.question_split_refused(spans, 14, free, False, None))
    monkeypatch.undo()
    usage = namedtuple("usage", "total used free")
    written = spans * partitions.SPLIT_FILE_BYTES_PER_SPAN
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(0, 0, 2 * written - 1))
    assert "GiB free" in str(partitions.question_split_refused(spans, 14, free, False, None))
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(0, 0, 2 * written))
    assert partitions.question_split_refused(spans, 14, free, False, None) is None


def test_a_questions_reads_of_the_store_are_its_one_heavy_query_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve's questions read the store in the server's process, beside the reads the analysis
    worker runs there under ``DuckDBSpanStore.serialized``. Each question read whose memory grows
    with the rows it looks at (the window's roots, an endpoint's trace ids, a split, a partition,
    the window at once) holds the store's heavy-query lock, so it waits for a count, compaction,
    retention or the worker's read in progress rather than adding its peak to theirs; and the
    answer after the wait is the answer."""
    import threading

    from hourglass.analysis import partitions
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES

    monkeypatch.setattr(
        partitions, "split_bytes", lambda spans, filtered=False: 0
    )  # (a split of 3,408 spans)
    store = _sample_store(tmp_path)
    try:
        heavy = store._heavy
        owned: dict[str, list[bool]] = {}

        def under_lock(name: str, real: Any) -> Any:
            def read(*args: Any, **kwargs: Any) -> Any:
                owned.setdefault(name, []).append(heavy._is_owned())
                return real(*args, **kwargs)

            return read

        for name in ("window_roots", "endpoint_trace_ids", "split_partitions", "scan_partition", "scan"):
            monkeypatch.setattr(store, name, under_lock(name, getattr(store, name)))
        total = store.raw_row_count()
        half = QueryEngine.over_store(store, budget=PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 2)
        split = QueryEngine.over_store(store, budget=PROCESS_BASE_BYTES + 100 * PEAK_BYTES_PER_SPAN)
        split._endpoint_traces = split._window_roots = None  # (the window's partitions: split)
        whole = QueryEngine.over_store(store)
        for engine in (half, split):
            monkeypatch.setattr(engine, "_held", lambda: 0)
        endpoints = [(e["service"], e["operation"]) for e in whole.endpoints(limit=3)]
        service, operation = endpoints[1]
        body = {"changes": [{"speedup": {"service": service, "operation": operation, "factor": 0.5}}]}
        expected = whole.whatif(body), whole.critical_path(service, operation)
        for engine in (half, split):
            assert [(e["service"], e["operation"]) for e in engine.endpoints(limit=3)] == endpoints
            assert (engine.whatif(body), engine.critical_path(service, operation)) == expected
        assert set(owned) == {
            "window_roots",
            "endpoint_trace_ids",
            "split_partitions",
            "scan_partition",
            "scan",
        }
        assert all(all(calls) for calls in owned.values()), {k: v.count(False) for k, v in owned.items()}

        # a question asked while another thread holds the lock waits for it, then answers
        path = whole.critical_path(*endpoints[0])
        holding, release = threading.Event(), threading.Event()

        def hold() -> None:
            with store.serialized():
                holding.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert holding.wait(10)
        answered: list[Any] = []
        asking = threading.Thread(target=lambda: answered.append(half.critical_path(*endpoints[0])))
        asking.start()
        asking.join(0.5)
        waited = asking.is_alive() and not answered
        release.set()
        holder.join(10)
        asking.join(30)
        assert waited and answered == [path]
    finally:
        store.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refusal_of_an_endpoint_no_trace_is_rooted_at_counts_the_windows_traces_as_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A what-if of an endpoint no trace is rooted at is refused with the window's count of
    traces, taken from the store's rows (``_listing_of_roots``) instead of a pass: the count of
    the traces the window's contexts keep. ``window_roots`` has a row for a trace whose only span
    from ``since`` is a later copy, which a read drops: its rows alone would count one trace too
    many."""
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES
    from hourglass.analysis.whatif_query import Change, WhatIfInputError, partition_contexts, whatif_of_traces
    from hourglass.collector.schema import ANALYSIS_COLUMNS

    store, _, since_ns = _store_with_awkward_roots(tmp_path, backend)
    try:
        total = store.raw_row_count()
        engine = QueryEngine.over_store(store, budget=PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 2)
        monkeypatch.setattr(engine, "_held", lambda: 0)
        for since in (None, since_ns):
            contexts = partition_contexts(
                lambda part, parts, since=since: store.scan_partition(
                    part, parts, since_ns=since, columns=ANALYSIS_COLUMNS
                ),
                since,
            )
            kept = sum(contexts(part, 3).traces.height for part in range(3))
            listed = int(engine._listing_of_roots(since)["traces"].sum())
            rows = store.window_roots(since).num_rows
            assert listed == kept and (rows == kept) == (since is None), (since, listed, kept, rows)
            with pytest.raises(WhatIfInputError) as refused:
                whatif_of_traces(
                    lambda part, parts, ids: store.scan_partition(part, parts, trace_ids=ids),
                    [],
                    0,
                    PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN,
                    [Change(kind="speedup", service="ledger", operation="*", factor=0.5)],
                    service="no-such-service",
                    operation="GET /",
                    has_span=lambda service, operation: True,
                    since_ns=since,
                    window_traces=lambda since=since: int(engine._listing_of_roots(since)["traces"].sum()),
                )
            assert f"in the window ({kept} traces analysed)" in str(refused.value)
    finally:
        store.close()


def test_serve_refuses_an_operation_of_most_traces_that_is_no_root_without_a_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operation in every trace but the root of none: its traces are more than three
    quarters of the window, so the window's partitions used to answer, a pass over every span
    only to say no trace is rooted there. serve now says it from the store's rows (no span of it
    without a parent; the traces of no plain root read): the same answers as the window's
    partitions give — no critical path, the what-if's refusal with the window's count of traces
    — and none of the window's partitions read. A trace of orphans rooted at it is asked."""
    import polars as pl

    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES, few_parts_spans
    from hourglass.analysis.whatif_query import WhatIfInputError
    from hourglass.collector.duckdb_store import DuckDBSpanStore
    from tests.builders import with_a_span_under_every_root

    frame = _sample_frame(tmp_path)
    audited = with_a_span_under_every_root(frame, "audit", "record")
    orphan = (
        audited.filter(pl.col("service") == "audit")
        .head(1)
        .with_columns(trace_id=pl.lit("0" * 31 + "1"), parent_span_id=pl.lit("00000000deadbeef"))
    )
    speedup = {"changes": [{"speedup": {"service": "audit", "operation": "record", "factor": 0.5}}]}
    import datetime

    starts = sorted(frame["start_ns"].to_list())  # (a window from the middle: a `since` too)
    mid = datetime.datetime.fromtimestamp(starts[len(starts) // 2] / 1e9, datetime.UTC).isoformat()

    def ask(name: str, rows: Any, rooted: bool) -> None:
        store = DuckDBSpanStore(str(tmp_path / f"{name}.duckdb"))
        try:
            store.write(rows.to_arrow())
            total = store.raw_row_count()
            budget = PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 4  # (a quarter at once)
            engine, window = _engine_and_window(store, budget, monkeypatch)
            assert engine._parts(None) > 1
            _, spans = store.endpoint_trace_ids("audit", "record")  # type: ignore[misc]
            assert spans > max(total * 3 // 4, few_parts_spans(budget))  # (too many to read by id)
            windows = _window_reads(store, monkeypatch)
            for since in (mid, None):
                answers: list[Any] = []
                for made in (engine, window):
                    windows.clear()
                    path = made.critical_path("audit", "record", since=since)
                    refusals: list[str | None] = []
                    for endpoint in ({"service": "audit", "operation": "record"}, {"service": "audit"}):
                        try:
                            made.whatif({**endpoint, "since": since, **speedup})
                            refusals.append(None)
                        except WhatIfInputError as exc:
                            refusals.append(str(exc))
                    answers.append((path, refusals, any(windows)))
                assert answers[0][:2] == answers[1][:2], (name, since, answers)
                assert answers[1][2]  # (the window's partitions read)
                assert rooted or not answers[0][2], (since, answers)  # (none read)
            if rooted:
                assert answers[0][0] is not None and answers[0][0]["traces"] == 1
            else:
                assert answers[0][0] is None and not answers[0][2], answers  # (none read)
                traces = frame["trace_id"].n_unique()
                refusals = answers[0][1]
                assert f"no trace has a root span 'audit/record' in the window ({traces} traces" in str(
                    refusals[0]
                )
                assert f"no trace has a root span 'audit' in the window ({traces} traces" in str(refusals[1])
        finally:
            store.close()

    ask("everywhere", audited, False)
    ask("rooted", pl.concat([audited, orphan]), True)

    # a store that cannot name an endpoint's traces nor say which spans it holds (a store
    # of another backend): the window's partitions answer, and refuse the same
    class Unnamed:
        def __init__(self, store: Any) -> None:
            self._store = store

        def __getattr__(self, name: str) -> Any:
            if name in ("has_span", "endpoint_trace_ids", "window_roots"):
                raise AttributeError(name)
            return getattr(self._store, name)

    store = DuckDBSpanStore(str(tmp_path / "everywhere.duckdb"))
    try:
        budget = PROCESS_BASE_BYTES + store.raw_row_count() * PEAK_BYTES_PER_SPAN // 4
        unnamed = QueryEngine.over_store(Unnamed(store), budget=budget)
        monkeypatch.setattr(unnamed, "_held", lambda: 0)
        assert unnamed.critical_path("audit", "record") is None
        with pytest.raises(WhatIfInputError, match="no trace has a root span 'audit/record' in the window"):
            unnamed.whatif({"service": "audit", "operation": "record", **speedup})
    finally:
        store.close()


@pytest.mark.parametrize("inline", [64, 0], ids=["ids-in-sql", "ids-beside-the-query"])
def test_an_endpoints_questions_over_an_embedded_clickhouse_store_read_its_traces_by_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: int
) -> None:
    """A ClickHouse store names an endpoint's traces too (however many: read by
    their ids): over a window asked in partitions, an endpoint's critical path and a what-if of
    its traces read those traces alone and answer as the window's partitions do. Its ids are
    written into the reads' SQL or, past ``INLINE_TRACE_IDS``, sent beside it as a table (here
    every id, with the threshold at 0)."""
    pytest.importorskip("chdb", reason="chdb is not installed (pip install -e '.[dev]')")
    from hourglass.analysis.planning import PEAK_BYTES_PER_SPAN, PROCESS_BASE_BYTES
    from hourglass.collector import clickhouse_store
    from hourglass.collector.clickhouse_store import ClickHouseSpanStore

    monkeypatch.setattr(clickhouse_store, "INLINE_TRACE_IDS", inline)
    from hourglass.collector.files import read_trace_files
    from hourglass.collector.schema import SPAN_COLUMNS

    samples = sorted(
        str(p) for p in (Path(__file__).resolve().parents[2] / "sample-traces").glob("*.otlp.jsonl")
    )
    store = ClickHouseSpanStore.embedded(str(tmp_path / "spans.chdb"))
    try:
        for part in read_trace_files(samples, on_error=lambda problem: None):
            if part.num_rows:
                store.write(part.select(list(SPAN_COLUMNS)))
        total = store.raw_row_count()
        budget = PROCESS_BASE_BYTES + total * PEAK_BYTES_PER_SPAN // 2  # (half the store at once)
        engine, window = _engine_and_window(store, budget, monkeypatch)
        assert engine._parts(None) > 1
        windows = _window_reads(store, monkeypatch)
        ledger = ("ledger", "POST /accounts/{account_id}/transfers")
        speedup = {"changes": [{"speedup": {"service": "ledger", "operation": "*", "factor": 0.5}}]}
        answers = []
        for made in (engine, window):
            windows.clear()
            answers.append(
                (
                    made.critical_path(*ledger),
                    made.whatif({"service": ledger[0], "operation": ledger[1], **speedup}),
                    windows.copy(),
                )
            )
        assert answers[0][0] is not None and answers[0][:2] == answers[1][:2]
        assert answers[0][2] and not any(answers[0][2]), answers[0][2]  # (read by their ids only)
        assert all(answers[1][2])  # (the window's partitions)
    finally:
        store.close()
