"""``open_store``: the backend a ``--db`` value names (a DuckDB file, a ClickHouse server, chdb).

The backends import the protocol from ``hourglass.collector.store``; this module imports the
backends, so the protocol never imports an implementation.
"""

from __future__ import annotations

from typing import Any

from hourglass.collector.store import CHDB_PREFIX, SpanStore, StoreError, is_clickhouse


def open_store(
    location: str, *, serve: bool = False, threads: int | None = None, **duckdb_options: Any
) -> SpanStore:
    """The store a ``--db`` value names. ``serve``: opened by ``hourglass serve`` (DuckDB then
    writes through its ingest log). Raises ``StoreError`` with a one-line reason."""
    if is_clickhouse(location):
        from hourglass.collector.clickhouse_store import ClickHouseSpanStore

        return ClickHouseSpanStore.connect(location)
    if location.startswith(CHDB_PREFIX):
        from hourglass.collector.clickhouse_store import ClickHouseSpanStore

        path = location[len(CHDB_PREFIX) :]
        if not path:
            raise StoreError("chdb: needs a directory, e.g. chdb:./spans.chdb")
        return ClickHouseSpanStore.embedded(path)
    if "://" in location:
        raise StoreError(
            f"{location.rsplit('@', 1)[-1]}: unknown store URL; use a DuckDB file path, "
            "clickhouse://USER:PASS@HOST:8123/DATABASE or chdb:PATH"
        )
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    if serve:
        duckdb_options.setdefault("ingest_log", True)
    return DuckDBSpanStore(location, threads=threads, **duckdb_options)
