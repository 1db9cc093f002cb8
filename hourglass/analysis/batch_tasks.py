"""``serve --cluster``: a batch's extraction and pricing as tasks on a Dask cluster.

``serve``'s span store is a DuckDB file that ``serve`` holds open for writing, and DuckDB lets no
other process open such a file, not even read-only ("Could not set lock on file"); the spans
acknowledged but not yet loaded are in ``serve``'s ingest log, which only ``serve`` reads. So the
Dask workers never read the store: the analysis worker process reads the spans from ``serve``,
as for a local round (``incremental.BatchSource``), and sends them with the task — a batch's
spans (at most ``incremental.BATCH_SPANS``) to extract it, the findings' traces of a batch alone
(read by id) to price them there, ``incremental.CLUSTER_BATCHES_IN_FLIGHT`` batches at a time. A
task returns what the local round computes: the batch's compacted rows (:func:`extract_table`),
which ``serve`` writes to its sidecar folder as they come back, or the findings' savings and call
durations in the batch (:func:`price_table`). What is kept, and the decision, stay in ``serve``. The workers need Hourglass installed, and nothing else: no shared storage, no route to
``serve``'s disk, so they may be on any machine that reaches the scheduler.

Failures (``partitions.DaskExecutor``): a task that raises, or whose workers died more often than
the scheduler allows (``distributed.scheduler.allowed-failures``), is submitted once more; then the
round fails naming the batch (:class:`BatchError`), the service keeps the last report and shows
the cause in its status and log, and the next round submits the batch again. A connection to the
scheduler that was lost is opened again at the next round.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pyarrow as pa

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import Finding


def priced_in(ctx: AnalysisContext, findings: list[Finding], calls: bool) -> partitions.Priced:
    """The what-if savings of ``findings``' occurrences in ``ctx``'s traces and, with ``calls``,
    the durations of the calls each names there (one batch's pricing, here or on a worker)."""
    from hourglass.analysis.sequence import call_durations

    durations = {f.id: call_durations(ctx, f) for f in findings} if calls else {}
    return partitions.Priced(partitions.price(ctx, findings), durations)


def extract_table(table: pa.Table, part: int, parts: int) -> partitions.PartResult:
    """A Dask task: one batch's rows from its spans (``partitions.part_result``)."""
    del parts  # named in the task's failure
    return partitions.part_result(part, AnalysisContext.from_table(table))


def price_table(
    table: pa.Table, part: int, parts: int, findings: list[Finding], calls: bool
) -> partitions.Priced:
    """A Dask task: ``findings``' pricing in one batch (:func:`priced_in`)."""
    del part, parts
    ctx = AnalysisContext.from_table(table)
    try:
        return priced_in(ctx, findings, calls)
    finally:  # the what-if engine it caches refers back to it: freed with the task, not by the collector
        ctx.cache.clear()


class BatchError(partitions.PartitionError):
    """A batch's task that failed on the cluster (after its retry): the batch is named."""

    def __init__(self, phase: str, label: str, part: int, parts: int, cause: str) -> None:
        RuntimeError.__init__(self, f"{phase} {label} on the Dask cluster failed twice: {cause}")
        self.part, self.parts = part, parts


class Cluster:
    """The analysis worker's connection to a Dask scheduler: opened at the first round that needs
    it (a :class:`partitions.ClusterError` of one line when it cannot be), kept between rounds,
    opened again when it was lost."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._executor: partitions.DaskExecutor | None = None

    def _connected(self) -> partitions.DaskExecutor:
        executor = self._executor
        if executor is not None and executor.client.status != "running":
            self.close()
            executor = None
        if executor is None:
            executor = self._executor = partitions.DaskExecutor(self.address)
        return executor

    def run(
        self,
        phase: str,
        fn: Any,
        jobs: Iterable[tuple[str, int, pa.Table, tuple[Any, ...]]],
        parts: int,
        arrived: Callable[[int, Any], None],
    ) -> None:
        """``fn(table, part, parts, *args)`` for each job ``(label, part, table, args)`` as one
        task each, all submitted before any result is awaited; ``arrived(part, result)`` as each
        result comes back (the results are not held together here)."""
        executor = self._connected()
        labels: dict[int, str] = {}
        calls: list[tuple[Any, ...]] = []
        for label, part, table, args in jobs:
            labels[part] = label
            calls.append((table, part, parts, *args))
        if not calls:
            return
        try:
            with warnings.catch_warnings():
                # the spans travel in the task (bounded by the batch size): by design
                warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
                warnings.filterwarnings("ignore", message=".*[Ll]arge object.*")
                executor.map(phase, fn, calls, None, arrived, labels)
        except partitions.PartitionError as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            if executor.client.status != "running":
                self.close()
            raise BatchError(
                phase, labels[exc.part], exc.part, parts, f"{type(cause).__name__}: {cause}"
            ) from cause  # (not the executor's error, which names the round's partition N/M, not the batch)

    def close(self) -> None:
        if self._executor is not None:
            with contextlib.suppress(Exception):
                self._executor.close()
            self._executor = None
