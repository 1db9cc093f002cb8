"""The span store protocol: what every backend (DuckDB, ClickHouse server, embedded chdb) offers.
``hourglass.collector.backends.open_store`` turns a ``--db`` value into one of them.

The writer contract follows Jaeger's: ``write`` returns only after the batch is durably
persisted (each backend's docstring says what that means for it), so a receiver may acknowledge
an Export as soon as ``write`` returns.
Reads de-duplicate by (trace_id, span_id): a span delivered twice is seen once.

``--db`` forms: a DuckDB file path (or ``:memory:``), ``clickhouse://USER:PASS@HOST:8123/DATABASE``
(``clickhouses://`` for TLS; ``?table=NAME`` for another table than ``otel_traces``), and
``chdb:PATH`` (embedded ClickHouse in directory PATH).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # (annotations only: the command line reads this module before pyarrow)
    import pyarrow as pa

CLICKHOUSE_SCHEMES = ("clickhouse://", "clickhouses://")
CHDB_PREFIX = "chdb:"


class StoreError(RuntimeError):
    """A store that cannot be opened or reached (bad URL, server down, missing extra): one line."""


@dataclass(frozen=True)
class StoreStats:
    spans: int
    traces: int


@runtime_checkable
class SpanStore(Protocol):
    def write(self, spans: pa.Table) -> None:
        """Persist rows of ``hourglass.collector.schema.SPAN_SCHEMA``; return only once durable."""

    def scan(
        self,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
        string_views: bool = False,
    ) -> pa.Table:
        """De-duplicated span rows, whole traces: a trace is included when any span matches.
        ``string_views``: string columns as Arrow ``string_view`` where the backend can produce
        them (polars takes those without a copy); plain strings otherwise."""

    def scan_partition(
        self,
        part: int,
        parts: int,
        *,
        since_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
        string_views: bool = False,
    ) -> pa.Table:
        """``scan`` restricted to partition ``part`` of ``parts`` by a hash of the trace id: every
        trace falls in exactly one partition, whole; rows in (trace_id, start_ns, span_id) order.
        ``trace_ids``: only those traces of the partition."""

    def trace(self, trace_id: str) -> pa.Table:
        """All spans of one trace (empty table when unknown)."""

    def stats(self) -> StoreStats: ...

    def services(self) -> list[str]: ...

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Retention: drop traces whose last span ended before ``cutoff_ns``; returns spans removed."""

    def compact(self) -> int:
        """Physically remove duplicate rows where the backend does (returns how many; 0 when it
        leaves them to read-time de-duplication)."""

    def close(self) -> None: ...


def redact(location: str) -> str:
    """``location`` without a password (for messages and logs)."""
    if not is_clickhouse(location) or "@" not in location:
        return location
    scheme, rest = location.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in credentials else user}@{host}"


def is_clickhouse(location: str) -> bool:
    return location.startswith(CLICKHOUSE_SCHEMES)


def local_path(location: str) -> str | None:
    """The file or directory a ``--db`` value names (None for a server URL)."""
    if is_clickhouse(location):
        return None
    if location.startswith(CHDB_PREFIX):
        return location[len(CHDB_PREFIX) :]
    return location
