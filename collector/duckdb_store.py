"""The embedded span store: one DuckDB file (or ``:memory:``) implementing ``collector.store.SpanStore``.

Rules:

- Table ``spans`` has exactly the ``SPAN_SCHEMA`` columns as real columns. Arrow batches are
  inserted as they are (``con.from_arrow(batch).insert_into("spans")``); one ``write`` is one
  transaction, and DuckDB commits to its write-ahead log before the insert returns, so rows are
  durable when ``write`` returns (a kill -9 afterwards keeps them; WAL replay on the next open).
- No PRIMARY KEY: a unique index costs 2-4x on the insert path (see the cost notes). Duplicates
  (exporter retries) are removed at read time — every read keeps one row per (trace_id, span_id),
  the first ingested — and physically by ``compact()``, which ``serve`` runs in the background,
  so after compaction "the same Export sent twice is stored once" holds on disk too.
- One process owns the file. Each thread reads through its own cursor (DuckDB's way to share one
  database between threads); writes, compaction and retention are serialised by a lock so their
  transactions never conflict.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from collector.schema import ANALYSIS_COLUMNS, SPAN_COLUMNS, SPAN_SCHEMA
from collector.store import StoreStats

_ARROW_TO_DUCKDB = {
    pa.string(): "VARCHAR",
    pa.int8(): "TINYINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN",
    pa.binary(): "BLOB",
    pa.list_(pa.string()): "VARCHAR[]",
    pa.list_(pa.int64()): "BIGINT[]",
}

# DuckDB's buffer pool defaults to 80 % of RAM; one serve on a shared machine should stay small.
# Larger-than-memory sorts and joins spill to a temporary directory beside the file instead.
DEFAULT_MEMORY_LIMIT = "512MB"
CHECKPOINT_THRESHOLD = "128MB"

# Rows are kept once per (trace_id, span_id): the first ingested copy wins.
_DEDUP = "QUALIFY row_number() OVER (PARTITION BY trace_id, span_id ORDER BY ingested_ns) = 1"


# The serialized spans compress far better and cheaper with zstd than with DuckDB's automatic
# choice (DICT_FSST): on the bench-ingest request, insert + checkpoint CPU 7.9 -> 5.2 us/row and
# the file 349 -> 85 B/row. Every other column keeps DuckDB's choice (dictionary, bitpacking...).
_COLUMN_COMPRESSION = {"raw": "zstd"}


def _create_table_sql() -> str:
    columns = []
    for f in SPAN_SCHEMA:
        sql_type = _ARROW_TO_DUCKDB[f.type]
        compression = _COLUMN_COMPRESSION.get(f.name)
        using = f" USING COMPRESSION '{compression}'" if compression else ""
        columns.append(f"{f.name} {sql_type}{using}{'' if f.nullable else ' NOT NULL'}")
    return "CREATE TABLE IF NOT EXISTS spans (" + ", ".join(columns) + ")"


def _check_columns(columns: Sequence[str]) -> list[str]:
    unknown = [c for c in columns if c not in SPAN_COLUMNS]
    if unknown:
        raise ValueError(f"unknown span column(s) {unknown}; known: {list(SPAN_COLUMNS)}")
    return list(columns)


class DuckDBSpanStore:
    """``SpanStore`` on a DuckDB file (``path``) or in memory (``":memory:"``)."""

    def __init__(self, path: str = ":memory:", *, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> None:
        self.path = path
        # Checkpoint after 128 MB of WAL instead of DuckDB's 16 MB: each checkpoint compresses
        # (FSST) what was appended and the partly filled row group it went into, so frequent
        # ones made the writer the bottleneck
        # (in-process bench under load: 16 MB ~49k, 64 MB ~63k, 128 MB ~74k spans/s). Rows not
        # yet checkpointed stay in memory, which bounds the extra RSS by about the threshold.
        self._con = duckdb.connect(
            path, config={"memory_limit": memory_limit, "checkpoint_threshold": CHECKPOINT_THRESHOLD}
        )
        self._con.execute(_create_table_sql())
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._cursors: list[tuple[threading.Thread, duckdb.DuckDBPyConnection]] = []
        self._cursors_lock = threading.Lock()
        self._writer = self._con.cursor()
        self._closed = False
        # smallest ingested_ns written since the last compaction: only rows sharing a trace with
        # rows at or above it can be new duplicates. None: unknown (fresh open), examine everything.
        self._dirty_since_ns: int | None = None
        self._dirty = True
        # Bumped after every committed change (write, compaction, retention): ``stats()`` reuses its
        # last counts while it is unchanged. Counting unique spans scans the whole table (~0.2-0.5 s
        # of both cores at 1M spans), and /v1/stats is polled: each poll took that from the analysis.
        self._changes = 0
        self._stats_cache: tuple[int, StoreStats] | None = None

    # -- connections -------------------------------------------------------------------------
    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._closed:
            raise RuntimeError(f"span store {self.path} is closed")
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._con.cursor()
            self._local.cursor = cursor
            with self._cursors_lock:
                # Threads come and go (the API's worker threads exit after 10 s idle): close the
                # cursors of threads that ended, or a long-running serve keeps one per thread ever used.
                for thread, stale in self._cursors:
                    if not thread.is_alive():
                        stale.close()
                self._cursors = [(t, c) for t, c in self._cursors if t.is_alive()]
                self._cursors.append((threading.current_thread(), cursor))
        return cursor

    # -- writes ------------------------------------------------------------------------------
    def write(self, spans: pa.Table) -> None:
        """Insert rows of ``SPAN_SCHEMA``; returns once the transaction is committed (durable)."""
        if spans.num_rows == 0:
            return
        if spans.schema.names != list(SPAN_COLUMNS):
            raise ValueError(f"write() needs the SPAN_SCHEMA columns in order, got {spans.schema.names}")
        with self._write_lock:
            if self._closed:
                raise RuntimeError(f"span store {self.path} is closed")
            # A relation insert, not register + "INSERT ... SELECT" + unregister: DuckDB's Python
            # client takes the GIL back repeatedly while it runs a statement (signal checks,
            # registering the view), and in serve the decoders hold the GIL, so the writer
            # waited for it. Same single auto-committed statement, same column order.
            self._writer.from_arrow(spans).insert_into("spans")
            self._changes += 1
            batch_min = pc.min(spans.column("ingested_ns")).as_py()
            if not self._dirty:
                self._dirty, self._dirty_since_ns = True, batch_min
            elif self._dirty_since_ns is not None:
                self._dirty_since_ns = min(self._dirty_since_ns, batch_min)

    def compact(self) -> int:
        """Physically remove duplicate (trace_id, span_id) rows; returns how many were removed.

        Only traces that received rows since the previous compaction are examined, so a periodic
        compaction costs in proportion to new data, not the whole table.
        """
        with self._write_lock:
            if not self._dirty:
                return 0
            since = self._dirty_since_ns
            where = (
                ""
                if since is None
                else "WHERE trace_id IN (SELECT trace_id FROM spans WHERE ingested_ns >= ?)"
            )
            params: list[Any] = [] if since is None else [since]
            removed = self._writer.execute(
                f"""
                DELETE FROM spans WHERE rowid IN (
                    SELECT rowid FROM (
                        SELECT rowid, row_number() OVER (
                            PARTITION BY trace_id, span_id ORDER BY ingested_ns, rowid) AS copy
                        FROM spans {where}
                    ) WHERE copy > 1
                )
                """,
                params,
            ).fetchall()[0][0]
            self._dirty, self._dirty_since_ns = False, None
            self._changes += 1
            return int(removed)

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Retention: drop whole traces whose last span ended before ``cutoff_ns``; spans removed."""
        with self._write_lock:
            removed = self._writer.execute(
                """
                DELETE FROM spans WHERE trace_id IN (
                    SELECT trace_id FROM spans GROUP BY trace_id HAVING max(end_ns) < ?
                )
                """,
                [cutoff_ns],
            ).fetchall()[0][0]
            self._changes += 1
            return int(removed)

    # -- reads -------------------------------------------------------------------------------
    def scan(
        self,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: list[str] | None = None,
        columns: tuple[str, ...] | None = None,
    ) -> pa.Table:
        """De-duplicated whole traces: a trace is in when any of its spans matches every filter.

        ``since_ns``/``until_ns`` bound a span's start (``since_ns <= start_ns < until_ns``);
        rows come ordered by trace_id, start_ns, span_id.
        """
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        conditions: list[str] = []
        params: list[Any] = []
        if since_ns is not None:
            conditions.append("start_ns >= ?")
            params.append(since_ns)
        if until_ns is not None:
            conditions.append("start_ns < ?")
            params.append(until_ns)
        if services is not None:
            conditions.append("list_contains(?, service)")
            params.append(list(services))
        if trace_ids is not None:
            conditions.append("list_contains(?, trace_id)")
            params.append([t.lower() for t in trace_ids])
        source = "spans"
        if conditions:
            source = f"(SELECT * FROM spans WHERE trace_id IN (SELECT trace_id FROM spans WHERE {' AND '.join(conditions)}))"
        query = (
            f"SELECT {', '.join(selected)} FROM {source} {_DEDUP} ORDER BY trace_id, start_ns, span_id"
            if selected
            else "SELECT 1 WHERE false"
        )
        table = self._cursor().sql(query, params=params or None).to_arrow_table()
        return self._conform(table, selected)

    @staticmethod
    def _conform(table: pa.Table, selected: list[str]) -> pa.Table:
        schema = pa.schema([SPAN_SCHEMA.field(c) for c in selected])
        arrays = [table.column(i).cast(f.type) for i, f in enumerate(schema)]
        return pa.Table.from_arrays(arrays, schema=schema)

    def trace(self, trace_id: str) -> pa.Table:
        """All spans of one trace with every column (empty table when unknown)."""
        return self.scan(trace_ids=[trace_id], columns=SPAN_COLUMNS)

    def stats(self) -> StoreStats:
        """Unique span and trace counts (duplicates not yet compacted are not counted); the last
        counts are reused while no change was committed since they were taken."""
        changes = self._changes  # read before counting: a change committed meanwhile forces a recount
        cached = self._stats_cache
        if cached is not None and cached[0] == changes:
            return cached[1]
        spans, traces = (
            self._cursor()
            .execute(
                "SELECT count(*), count(DISTINCT trace_id) FROM (SELECT DISTINCT trace_id, span_id FROM spans)"
            )
            .fetchall()[0]
        )
        counted = StoreStats(spans=int(spans), traces=int(traces))
        self._stats_cache = (changes, counted)
        return counted

    def services(self) -> list[str]:
        rows = self._cursor().execute("SELECT DISTINCT service FROM spans ORDER BY service").fetchall()
        return [r[0] for r in rows]

    def raw_row_count(self) -> int:
        """Physical rows, duplicates included (for tests and compaction metrics)."""
        return int(self._cursor().execute("SELECT count(*) FROM spans").fetchall()[0][0])

    def close(self) -> None:
        """Checkpoint and close; rows committed before are kept either way."""
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            with self._cursors_lock:
                for _, cursor in self._cursors:
                    cursor.close()
                self._cursors.clear()
            self._writer.close()
            if self.path != ":memory:":
                self._con.execute("CHECKPOINT")
            self._con.close()

    def __enter__(self) -> DuckDBSpanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
