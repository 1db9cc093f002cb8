"""``serve --cluster``'s incremental rounds at the seams, on a real Dask scheduler with two real
worker processes on 127.0.0.1: ``run_incremental`` over a real DuckDB span store (the labelled
sample traces in several batches), as the analysis worker runs a round, the report compared with
the real ``hourglass analyze --db`` on the same store (or with the same round run locally).

* each batch's extraction runs on the cluster and is written to disk as it comes back: the round
  receives none of the rows (what a local round does, ``test_incremental_rows.py``);
* a pricing task is sent the spans of the findings' traces of its batch alone (read by id), not
  the batch;
* a late span re-extracts its batch alone, on the cluster, and writes it again;
* a ``since`` window's edge traces are extracted on the cluster and not stored; the report is the
  local round's;
* a restart submits no extraction; retention re-extracts what is left of a batch on the cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.batch_tasks import Cluster
from hourglass.analysis.incremental import IncrementalAnalysis, MemoExecutor, sidecar_path
from hourglass.api.analysis_worker import StoreReader, run_incremental
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import SPAN_COLUMNS
from tests.analysis.test_incremental_rows import _cli, _request, _same, _store
from tests.dask_cluster import dask_cluster

pytestmark = pytest.mark.timeout(300)


class Watched(Cluster):
    """The real connection, recording each task's phase, label, partition and the trace ids and
    row count of the spans sent with it."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.jobs: list[tuple[str, str, int, frozenset[str], int]] = []

    def run(
        self,
        phase: str,
        fn: Any,
        jobs: Iterable[tuple[str, int, pa.Table, tuple[Any, ...]]],
        parts: int,
        arrived: Any,
    ) -> None:
        def seen() -> Iterator[tuple[str, int, pa.Table, tuple[Any, ...]]]:
            for label, part, table, args in jobs:
                ids = frozenset(table.column("trace_id").to_pylist())
                self.jobs.append((phase, label, part, ids, table.num_rows))
                yield label, part, table, args

        super().run(phase, fn, seen(), parts, arrived)

    def taken(self) -> list[tuple[str, str, int, frozenset[str], int]]:
        jobs, self.jobs = self.jobs, []
        return jobs


def _late_span(store: DuckDBSpanStore, trace_id: str) -> None:
    """One more span in ``trace_id``, ingested now: a child of one of its spans."""
    rows = store.scan(trace_ids=[trace_id], columns=list(SPAN_COLUMNS)).slice(0, 1)
    parent = rows.column("span_id")[0].as_py()
    late = rows.set_column(
        rows.schema.get_field_index("span_id"),
        "span_id",
        pa.array(["1a7e5a11"], rows.schema.field("span_id").type),
    )
    late = late.set_column(
        late.schema.get_field_index("parent_span_id"),
        "parent_span_id",
        pa.array([parent], late.schema.field("parent_span_id").type),
    )
    late = late.set_column(
        late.schema.get_field_index("ingested_ns"),
        "ingested_ns",
        pa.array([time.time_ns()], late.schema.field("ingested_ns").type),
    )
    store.write(late)


@pytest.mark.slow
def test_cluster_rounds_store_each_batch_and_price_the_findings_traces_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    returned: list[Any] = []  # what the extraction on the cluster handed the round
    # unit -> the traces of the findings' occurrences there, in each pricing pass
    wanted: dict[int, set[frozenset[str]]] = {}
    on_cluster = MemoExecutor._extracted_on_cluster
    mapped = MemoExecutor.map

    def recording(self: MemoExecutor, calls: list[tuple[Any, ...]]) -> Any:
        result = on_cluster(self, calls)
        returned.extend(result)
        return result

    def grouping(self: MemoExecutor, phase: str, fn: Any, calls: list[tuple[Any, ...]], progress: Any) -> Any:
        if fn is partitions.price_part and calls:
            for unit, here in self._group(calls[0][3]).items():
                wanted.setdefault(unit, set()).add(
                    frozenset(o.trace_id for _, occs in here.values() for o in occs)
                )
        return mapped(self, phase, fn, calls, progress)

    monkeypatch.setattr(MemoExecutor, "_extracted_on_cluster", recording)
    monkeypatch.setattr(MemoExecutor, "map", grouping)
    db = tmp_path / "spans.duckdb"
    sidecar = sidecar_path(str(db))
    assert sidecar is not None
    with dask_cluster(tmp_path / "dask") as address:
        cluster = Watched(address)
        store = _store(db)
        try:
            state = IncrementalAnalysis(sidecar, batch_spans=500)
            report, _, _ = run_incremental(state, StoreReader(store), _request(state), cluster=cluster)
            batches = set(state.batches)
            assert len(batches) >= 3
            jobs = cluster.taken()
            extracting = [j for j in jobs if j[0] == "extracting"]
            assert sorted(label.split()[1] for _, label, *_ in extracting) == sorted(str(b) for b in batches)
            assert state.stored == batches and returned == [None] * len(batches), returned
            # pricing: each task got the findings' traces of its batch, read by id, not the batch
            pricing = [j for j in jobs if j[0] == "pricing"]
            assert pricing, jobs
            for _, _, part, ids, _ in pricing:
                assert ids in wanted[part], (part, ids, wanted[part])
            batch_rows = {part: rows for _, _, part, _, rows in extracting}
            assert sum(rows for *_, rows in pricing) < sum(batch_rows[part] for _, _, part, _, _ in pricing)
            state.close()
        finally:
            store.close()
        _same(report, _cli(db))

        # A late span: its batch alone is extracted again, on the cluster, and written again.
        store = DuckDBSpanStore(str(db))
        try:
            state = IncrementalAnalysis(sidecar, batch_spans=500)
            dirty = min(batches)
            _late_span(store, state.batches[dirty].trace_ids[0])
            returned.clear()
            late, _, figures = run_incremental(state, StoreReader(store), _request(state), cluster=cluster)
            assert figures["dirty_batches"] == 1, figures
            assert [label.split()[1] for phase, label, *_ in cluster.taken() if phase == "extracting"] == [
                str(dirty)
            ]
            assert returned == [None] and state.stored == batches
            assert (Path(sidecar + ".d") / f"b{dirty:06d}" / "meta.pickle").exists()
            state.close()
        finally:
            store.close()
        cli = _cli(db)
        _same(late, cli)
        assert late["spans_analyzed"] == report["spans_analyzed"] + 1

        store = DuckDBSpanStore(str(db))
        try:
            # A restart: nothing is extracted; the report is the CLI's.
            state = IncrementalAnalysis(sidecar, batch_spans=500)
            resumed, _, figures = run_incremental(state, StoreReader(store), _request(state), cluster=cluster)
            assert figures["partitions_read"] == 0 and not cluster.taken(), figures
            _same(resumed, cli)

            # A since window through a batch: its in-window traces extracted on the cluster, not
            # stored; the report is the same round's run here.
            starts = sorted(
                int(s)
                for (s,) in state.db.execute(
                    "SELECT last_start_ns FROM traces WHERE batch = ?", [max(batches)]
                ).fetchall()
            )
            since = next(s for s in starts if s > starts[0])
            window = _request(state, update=False, since_ns=since)
            returned.clear()
            windowed, _, _ = run_incremental(state, StoreReader(store), window, cluster=cluster)
            edge = [j for j in cluster.taken() if j[0] == "extracting"]
            assert [label.split(" (")[0] for _, label, *_ in edge] == ["the window's edge traces"], edge
            assert len(returned) == 1 and returned[0] is not None  # the round's alone, not stored
            assert state.stored == batches
            local, _, _ = run_incremental(state, StoreReader(store), window)
            _same(windowed, local)

            # Retention: what is left of the batches is extracted again on the cluster; the report
            # is a fresh local state's with the same retention.
            ends = sorted(int(e) for (e,) in state.db.execute("SELECT last_end_ns FROM traces").fetchall())
            cutoff = ends[len(ends) // 3]
            kept, _, figures = run_incremental(
                state, StoreReader(store), _request(state, retention_cutoff_ns=cutoff), cluster=cluster
            )
            assert figures["expired_traces"] > 0, figures
            redone = {label.split()[1] for phase, label, *_ in cluster.taken() if phase == "extracting"}
            assert redone and redone <= {str(b) for b in batches}, redone
            assert state.stored == set(state.batches)
            state.close()
            fresh = IncrementalAnalysis(None, batch_spans=500)
            expected, _, _ = run_incremental(
                fresh, StoreReader(store), _request(fresh, retention_cutoff_ns=cutoff)
            )
            fresh.close()
            assert kept["traces_analyzed"] == expected["traces_analyzed"] < cli["traces_analyzed"]
            _same(kept, expected)
        finally:
            store.close()
            cluster.close()
