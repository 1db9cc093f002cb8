"""The pricing passes of a partitioned run price from the spans the extraction repaired
(``partitions.Prepared``), not from a second read and repair of each partition: the same savings
and call durations, and the store is not read again."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import DETECTORS, PARTS
from hourglass.analysis.model import Finding
from hourglass.analysis.pipeline import analyze_partitioned


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    from bench.analysis import generate_spans
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    db = str(tmp_path_factory.mktemp("prepared") / "spans.duckdb")
    spans = DuckDBSpanStore(db)
    spans.write(generate_spans(12_000, seed=11))
    spans.close()
    return db


class Unread:
    """A source whose partitions must not be read."""

    def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
        raise AssertionError(f"partition {part} of {parts} read again ({trace_ids is not None and 'traces'})")


def _findings(source: partitions.StoreSource) -> list[Finding]:
    whole = AnalysisContext.from_table(source.load(0, 1))
    return [f for kind in PARTS for f in DETECTORS[kind](whole)]


def test_pricing_from_the_repaired_spans_equals_pricing_from_the_store(store: str, tmp_path: Path) -> None:
    source = partitions.StoreSource(store)
    findings = _findings(source)
    parts = 3
    prepared = partitions.Prepared(str(tmp_path))
    extracted = [partitions.extract_part(source, p, parts, None, prepared) for p in range(parts)]
    trace_parts = pl.concat(
        [r.traces.select("trace_id", part=pl.lit(n, pl.UInt32)) for n, r in enumerate(extracted)]
    )
    shares = partitions.findings_by_partition(findings, trace_parts, parts)
    priced_somewhere = 0
    for part in range(parts):
        again = partitions.price_part(source, part, parts, shares[part], True)
        gc.collect()
        gc.disable()
        try:
            before = sum(isinstance(o, AnalysisContext) for o in gc.get_objects())
            kept = partitions.price_part(Unread(), part, parts, shares[part], True, prepared)  # type: ignore[arg-type]
            # (the context and its what-if engine are freed when the task returns)
            assert sum(isinstance(o, AnalysisContext) for o in gc.get_objects()) == before
        finally:
            gc.enable()
        assert kept.impacts.keys() == again.impacts.keys()
        for fid, (ids, saved, root) in again.impacts.items():
            assert list(kept.impacts[fid][0]) == list(ids)
            np.testing.assert_array_equal(kept.impacts[fid][1], saved)
            np.testing.assert_array_equal(kept.impacts[fid][2], root)
        assert kept.calls.keys() == again.calls.keys()
        for fid, durations in again.calls.items():
            np.testing.assert_array_equal(kept.calls[fid], durations)
        priced_somewhere += len(again.impacts)
    assert priced_somewhere > 5


def test_a_missing_file_is_priced_from_the_store(store: str, tmp_path: Path) -> None:
    """A partition whose repaired spans were not kept (their write failed) is read and repaired."""
    source = partitions.StoreSource(store)
    findings = _findings(source)
    prepared = partitions.Prepared(str(tmp_path / "none"))
    assert prepared.context(0, ["x"]) is None
    priced = partitions.price_part(source, 0, 1, findings, True, prepared)
    again = partitions.price_part(source, 0, 1, findings, True)
    assert priced.impacts.keys() == again.impacts.keys() and priced.impacts
    for fid, (_, saved, root) in again.impacts.items():
        np.testing.assert_array_equal(priced.impacts[fid][1], saved)
        np.testing.assert_array_equal(priced.impacts[fid][2], root)


def test_a_partitioned_run_reads_each_partition_once(store: str) -> None:
    """Every read of the pricing passes (the findings' traces, ``trace_ids`` given) came from the
    store before; now only the extraction reads each partition, and the report is the same."""
    reads: list[tuple[int, bool]] = []

    class Counted(partitions.StoreSource):
        def load(self, part: int, parts: int, trace_ids: list[str] | None = None) -> pa.Table:
            reads.append((part, trace_ids is not None))
            return super().load(part, parts, trace_ids)

    from hourglass.cli.analyze import _read_traces

    def run(source: Any) -> dict[str, Any]:
        report, _ = analyze_partitioned(
            source,
            3,
            partitions.SerialExecutor(),
            read_traces=lambda ids: _read_traces(store, ids),
            explain=True,
        )
        report.pop("generated_at", None)
        return report

    report = run(Counted(store))
    assert sorted(reads) == [(0, False), (1, False), (2, False)]
    assert report["recommendations"]
    # the same report as the pricing from the store (its repaired spans not kept)
    reads.clear()
    original = partitions.Prepared.create
    try:
        partitions.Prepared.create = staticmethod(lambda near=None: None)  # type: ignore[method-assign]
        again = run(Counted(store))
    finally:
        partitions.Prepared.create = original  # type: ignore[method-assign]
    assert any(traced for _, traced in reads)
    assert report == again
