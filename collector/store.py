"""The span store protocol: what every backend (DuckDB now, ClickHouse later) offers.

The writer contract follows Jaeger's: ``write`` returns only after the batch is durably
persisted, so a receiver may acknowledge an Export as soon as ``write`` returns.
Reads de-duplicate by (trace_id, span_id): a span delivered twice is seen once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pyarrow as pa


@dataclass(frozen=True)
class StoreStats:
    spans: int
    traces: int


@runtime_checkable
class SpanStore(Protocol):
    def write(self, spans: pa.Table) -> None:
        """Persist rows of ``collector.schema.SPAN_SCHEMA``; return only once durable."""

    def scan(
        self,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
    ) -> pa.Table:
        """De-duplicated span rows, whole traces: a trace is included when any span matches."""

    def trace(self, trace_id: str) -> pa.Table:
        """All spans of one trace (empty table when unknown)."""

    def stats(self) -> StoreStats: ...

    def services(self) -> list[str]: ...

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Retention: drop traces whose last span ended before ``cutoff_ns``; returns spans removed."""

    def close(self) -> None: ...
