"""The ClickHouse span store: the OpenTelemetry Collector's ``otel_traces`` table, on a server
(``clickhouse://USER:PASS@HOST:8123/DATABASE``, through ``clickhouse-connect``) or embedded
(``chdb:PATH``, through ``chdb``). Implements ``hourglass.collector.store.SpanStore``.

Layout (see ``hourglass.collector.otel_traces``): spans go to ``<table>`` (default ``otel_traces``) exactly
as the Collector's ClickHouse exporter writes them, plus ``<table>_hourglass``, a side table with
what that schema cannot hold faithfully (``ingested_ns``, a negative duration, typed hints, the resource JSON, the raw
OTLP span). The exporter's lookup table ``<table>_trace_id_ts`` and its materialized view are
created too when missing, so tools that find traces through it work on what Hourglass writes.
A table a Collector already created is used as it is: Hourglass analyses those traces in place.

Durability — what an acknowledged Export means:

- Server: every ``write`` is an INSERT with ``async_insert=1, wait_for_async_insert=1``: the
  server batches the small inserts of many Exports into one part (many small synchronous inserts
  make "too many parts" errors), and answers only after that part is written to its disks. So
  ``write`` returning — and the Export being acknowledged — means the server accepted the rows
  into a written part, as a synchronous INSERT does; on a replicated table, ``insert_quorum``
  in the server's profile decides how many replicas hold it. Whether the part is fsynced is the
  server's ``fsync_after_insert`` setting (off by default in ClickHouse: a power loss within
  seconds of the Export can lose it; a server crash or restart cannot).
- chdb: every ``write`` is a synchronous INSERT into the embedded engine; it returns after the
  part files are written into the directory. A killed process keeps them (tested with SIGKILL);
  like the server default, parts are not fsynced, so a power loss right after can lose the last ones.
- The side-table row is written before the ``otel_traces`` row, so a failed write leaves no
  half-visible span: reads start from ``otel_traces``.

Reads de-duplicate by (trace_id, span_id) (an Export retried is seen once; duplicates stay on
disk: ClickHouse's merges do not remove them and an ``ALTER ... DELETE`` per compaction would
rewrite whole parts, so ``compact()`` removes nothing and returns 0). Copies within one Export are
not written: only the first in the Export is stored (``_first_copies``), the copy DuckDB's reads keep. Retention
(``delete_older_than``) uses lightweight ``DELETE``; the table's own TTL, when a Collector set
one, applies as well.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from hourglass.collector.decode_otel import to_otel_rows
from hourglass.collector.otel_traces import (
    OTEL_COLUMNS,
    OTEL_TRACES_DDL,
    SIDE_COLUMNS,
    SIDE_TABLE_DDL,
    TRACE_ID_TS_DDL,
    TRACE_ID_TS_MV_DDL,
    UNKNOWN_SERVICE,
    quote,
    select_expressions,
)
from hourglass.collector.schema import ANALYSIS_COLUMNS, SPAN_COLUMNS, SPAN_SCHEMA
from hourglass.collector.store import StoreError, StoreStats, redact

log = logging.getLogger("hourglass.store")
# clickhouse-connect logs each failed request itself; without this it reaches stderr through
# logging's last-resort handler beside our one-line error (serve's own handlers still get it).
logging.getLogger("clickhouse_connect").addHandler(logging.NullHandler())

DEFAULT_TABLE = "otel_traces"
DEFAULT_DATABASE = "default"
CHDB_DATABASE = "otel"
# A read of more trace ids than this (``scan``/``scan_partition`` with ``trace_ids``: an endpoint's
# traces, ``endpoint_trace_ids``) sends them beside its query as a table (``_Backend.query_arrow``'s
# ``ids``) rather than writing them into its SQL (an IN list, twice: the rows and their side
# rows), which ClickHouse's default max_query_size (256 KiB) held only up to ~2,000 ids.
INLINE_TRACE_IDS = 64
# Columns older exporter versions did not create (-> how a read fills them in).
OPTIONAL_OTEL_COLUMNS = {
    "ScopeName": "''",
    "ScopeVersion": "''",
    "TraceState": "''",
    "Links.TraceState": "CAST([] AS Array(String))",
}
# stats() counts unique spans on the server (a full pass): reused for this long unless this
# store wrote or deleted meanwhile (/v1/stats is polled; a Collector may write at any time).
STATS_MAX_AGE_S = 5.0
CONNECT_TIMEOUT_S = 10
# The largest SQL a read with external data sends in a form field of its request's body (the rest,
# in its URL): a server's ``http_max_field_value_size`` (128 KiB by default) less the FORMAT
# clause clickhouse-connect appends
MAX_FORM_SQL_BYTES = 128 * 1024 - 64
# Settings of every server INSERT (see the module doc).
SERVER_INSERT_SETTINGS = {"async_insert": 1, "wait_for_async_insert": 1}
# Map columns, async inserts waited for, lightweight DELETE without experimental settings.
MIN_SERVER_VERSION = (23, 3)
# join_use_nulls: a span without a side row gets NULLs there (how the reads tell them apart);
# short-circuit: the derived hints of spans that have a side row are not computed at all.
_READ_SETTINGS = "SETTINGS join_use_nulls = 1, short_circuit_function_evaluation = 'force_enable'"
# The otel_traces columns the reads use (not TraceState, ScopeVersion, Links.TraceState).
_READ_OTEL_COLUMNS = tuple(
    c for c in OTEL_COLUMNS if c not in ("TraceState", "ScopeVersion", "Links.TraceState")
)


class _Backend(Protocol):
    # the SQL of the table of ``query_arrow``'s ``ids`` (one String column, ``id``)
    ids_table: str

    def command(self, sql: str) -> None: ...

    def query_arrow(self, sql: str, ids: Sequence[str] | None = None) -> pa.Table: ...

    def insert_arrow(self, table: str, data: pa.Table) -> None: ...

    def close(self) -> None: ...


def _tsv_ids(ids: Sequence[str]) -> bytes:
    """``ids`` as the rows of a one-column TabSeparated table (its escapes: a backslash, a tab, a
    newline written with a backslash)."""
    escaped = (i.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n") for i in ids)
    return "".join(f"{i}\n" for i in escaped).encode()


class _ServerBackend:
    # ``ids`` go as external data of the query (a temporary table of the query alone)
    ids_table = "hourglass_ids"

    def __init__(self, *, host: str, port: int, username: str, password: str, secure: bool):
        try:
            import clickhouse_connect
        except ImportError as exc:
            raise StoreError(
                "the ClickHouse store needs clickhouse-connect: pip install 'hourglass[clickhouse]'"
            ) from exc

        def connect(**more: Any) -> Any:  # (a closure: its repr names no password)
            return clickhouse_connect.get_client(
                host=host,
                port=port,
                username=username,
                password=password,
                # the user's default database: every statement names its database, which may not exist yet
                secure=secure,
                connect_timeout=CONNECT_TIMEOUT_S,
                # no session: the client is shared by the API's threads, and a session admits one query at a time
                autogenerate_session_id=False,
                **more,
            )

        self._connect = connect
        self._client = connect()
        # the client of the reads that send ids beside them, made at the first such read
        self._ids_client: Any = None
        self._ids_lock = threading.Lock()
        self._closed = False

    def version(self) -> tuple[int, ...]:
        text = str(self._client.server_version)
        return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())

    def command(self, sql: str) -> None:
        self._client.command(sql)

    def query_arrow(self, sql: str, ids: Sequence[str] | None = None) -> pa.Table:
        if ids is None:
            return self._client.query_arrow(sql)
        from clickhouse_connect.driver.external import ExternalData

        external = ExternalData(
            file_name=f"{self.ids_table}.tsv", data=_tsv_ids(ids), fmt="TabSeparated", structure="id String"
        )
        # (SQL past a form field's room, e.g. a what-if's many long names: in the URL, as before)
        client = self._with_ids() if len(sql.encode()) <= MAX_FORM_SQL_BYTES else self._client
        return client.query_arrow(sql, external_data=external)

    def _with_ids(self) -> Any:
        """The client of the reads with external data: its query sent in the request's body (a
        form field beside the ids' file) instead of in its URL, where clickhouse-connect puts the
        query of a read with external data. A read by ids is ~9 KB of SQL (11 KB encoded for a
        URL), over the 8 KB request line that proxies commonly allow (nginx's default buffers). A
        form field holds up to ``http_max_field_value_size`` (128 KiB by default): a larger query
        goes in the URL as before (:data:`MAX_FORM_SQL_BYTES`). A client of its own: the setting is
        the client's, and the other reads stay as they are sent. Made at the first read that needs
        it (its connection checks are a few round trips)."""
        with self._ids_lock:
            if self._closed:
                raise StoreError("the ClickHouse store is closed")
            if self._ids_client is None:
                self._ids_client = self._connect(form_encode_query_params=True)
            return self._ids_client

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        self._client.insert_arrow(table, data, settings=SERVER_INSERT_SETTINGS)

    def close(self) -> None:
        with self._ids_lock:  # (a read making the second client meanwhile finds the store closed)
            self._closed = True
            ids_client, self._ids_client = self._ids_client, None
        self._client.close()
        if ids_client is not None:
            ids_client.close()


class _ChdbBackend:
    """Two chdb sessions on one directory: one writes, one reads. A chdb session runs one query
    at a time, so with a single session an Export waited for a whole analysis scan (measured: an
    INSERT behind a long SELECT took as long as the SELECT; on a second session, 0.4 s)."""

    # ``ids`` are read by chdb's Python() table function from the local of ``query_arrow``
    ids_table = "Python(hourglass_ids)"

    def __init__(self, path: str):
        try:
            from chdb import session
        except ImportError as exc:
            raise StoreError("the chdb store needs chdb: pip install 'hourglass[chdb]'") from exc
        self._writer = session.Session(path)
        try:
            self._reader = session.Session(path)
        except BaseException:
            self._writer.close()
            raise
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    def command(self, sql: str) -> None:
        with self._write_lock:
            self._writer.query(sql, "CSV")

    def query_arrow(self, sql: str, ids: Sequence[str] | None = None) -> pa.Table:
        # (the name ``ids_table`` reads in this frame, when the query names it)
        hourglass_ids = None if ids is None else pa.table({"id": pa.array(list(ids), type=pa.string())})  # noqa: F841
        with self._read_lock:
            result = self._reader.query(sql, "ArrowTable")
        return result if isinstance(result, pa.Table) else pa.table({})

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        columns = ", ".join(f"`{c}`" for c in data.column_names)
        with self._write_lock:
            # chdb's Python() table function reads the Arrow table ``data`` of this frame
            self._writer.query(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM Python(data)", "CSV")

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._write_lock:
            self._writer.close()


@dataclass(frozen=True)
class ClickHouseLocation:
    """A parsed ``clickhouse://`` URL (password kept out of ``str``)."""

    host: str
    port: int
    username: str
    password: str
    database: str
    table: str
    secure: bool

    def __str__(self) -> str:
        scheme = "clickhouses" if self.secure else "clickhouse"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}/{self.database}?table={self.table}"


def _identifier(name: str, what: str, url: str) -> str:
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise StoreError(f"{url}: bad {what} {name!r} (letters, digits and _ only)")
    return name


def parse_clickhouse_url(url: str) -> ClickHouseLocation:
    """``clickhouse://USER:PASS@HOST:PORT/DATABASE?table=otel_traces`` (``clickhouses://`` for TLS)."""
    redacted = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise StoreError(f"{redacted}: not a ClickHouse URL ({exc})") from None
    if parts.scheme not in ("clickhouse", "clickhouses") or not parts.hostname:
        raise StoreError(f"{redacted}: expected clickhouse://USER:PASS@HOST:8123/DATABASE")
    secure = parts.scheme == "clickhouses"
    query = parse_qs(parts.query)
    unknown = set(query) - {"table"}
    if unknown:
        raise StoreError(f"{redacted}: unknown URL parameter(s) {sorted(unknown)}; known: table")
    database = unquote(parts.path.strip("/")) or DEFAULT_DATABASE
    table = query.get("table", [DEFAULT_TABLE])[-1]
    return ClickHouseLocation(
        host=parts.hostname,
        port=port or (8443 if secure else 8123),
        username=unquote(parts.username or "default"),
        password=unquote(parts.password or ""),
        database=_identifier(database, "database", redacted),
        table=_identifier(table, "table", redacted),
        secure=secure,
    )


def _check_not_in_use(path: str) -> None:
    """One process owns a chdb directory (ClickHouse flocks its ``status`` file): say so clearly
    instead of letting chdb fail with a generic initialisation error."""
    status = os.path.join(path, "status")
    try:
        fd = os.open(status, os.O_RDONLY)
    except OSError:
        return  # a new directory
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise StoreError(
            f"chdb:{path}: in use by another process (a running `hourglass serve`?); one process owns "
            "a chdb store: stop it, or query its REST API"
        ) from None
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause ("Connection refused", "Authentication failed"...)."""
    root: BaseException = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    text = str(root).strip() or str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _first_copies(spans: pa.Table) -> pa.Table:
    """``spans`` (one Export) with only the first copy of each (trace_id, span_id) it holds
    twice or more: the copy every read keeps, as the DuckDB store's reads keep the first in its
    Export (the lowest ``rowid``). ClickHouse cannot tell copies of one write apart on reading
    (``otel_traces`` has no column for their order, and its parts are sorted by name and time,
    not written order), so the later ones are not stored at all. Copies from different Exports
    are stored, and removed on reading. The rows unchanged (the same table) when no span repeats,
    which a count of the distinct joined ids shows (~50 us a write of 100 spans, ~0.2 us a span
    beyond: a tenth of building the ``otel_traces`` rows; two pairs that join alike only send
    the write through the exact grouping)."""
    if spans.num_rows < 2:
        return spans
    joined = pc.binary_join_element_wise(spans.column("trace_id"), spans.column("span_id"), "/")
    if pc.count_distinct(joined).as_py() == spans.num_rows:
        return spans
    keys = spans.select(["trace_id", "span_id"])
    firsts = (
        keys.append_column("_row", pa.array(range(spans.num_rows), pa.int64()))
        .group_by(["trace_id", "span_id"], use_threads=False)
        .aggregate([("_row", "min")])
        .column("_row_min")
    )
    # each span's first row, in the Export's order (the rows' numbers sorted: not the positions
    # that would sort them)
    return spans.take(firsts.take(pc.sort_indices(firsts)))


def _check_columns(columns: Sequence[str]) -> list[str]:
    unknown = [c for c in columns if c not in SPAN_COLUMNS]
    if unknown:
        raise ValueError(f"unknown span column(s) {unknown}; known: {list(SPAN_COLUMNS)}")
    return list(columns)


def _int(value: int) -> str:
    return str(int(value))


def _strings(values: Sequence[str]) -> str:
    return "[" + ", ".join(quote(str(v)) for v in values) + "]"


def _named_span(service: str | None, operation: str | None) -> str:
    """SQL condition of a span row of ``service`` named ``operation`` (either None: any; not
    both), as the reads name them (an empty ServiceName is ``unknown_service``)."""
    conditions = []
    if service is not None:
        names = [service, ""] if service == UNKNOWN_SERVICE else [service]
        conditions.append(f"ServiceName IN {_strings(names)}")
    if operation is not None:
        conditions.append(f"SpanName = {quote(operation)}")
    if not conditions:
        raise ValueError("a service or an operation is needed")
    return " AND ".join(conditions)


# ``window_roots``' rows (DuckDBSpanStore.window_roots' columns)
WINDOW_ROOTS_SCHEMA = pa.schema(
    [
        ("trace_id", pa.string()),
        ("spans", pa.int64()),
        ("root_service", pa.string()),
        ("root_name", pa.string()),
        ("root_duration_ns", pa.int64()),
    ]
)


def _conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A query's answer as ``schema``'s columns: dictionaries decoded, types cast (ClickHouse
    answers non-Nullable columns as non-null Arrow fields: that flag dropped); chdb answers an
    empty result without columns: ``schema``'s empty table."""
    if table.num_columns == 0:
        return schema.empty_table()
    arrays = []
    for f in schema:
        column = table.column(f.name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        arrays.append(column.cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _ids_of(trace_ids: Sequence[str] | None) -> list[str] | None:
    """The ids a read sends beside its query (lowercase, as stored), when ``_span_conditions``
    names them as the backend's ``ids_table`` (more than ``INLINE_TRACE_IDS``); else None."""
    if trace_ids is None or len(trace_ids) <= INLINE_TRACE_IDS:
        return None
    return [t.lower() for t in trace_ids]


class ClickHouseSpanStore:
    """``SpanStore`` on ClickHouse: use ``ClickHouseSpanStore.connect(url)`` or ``.embedded(path)``."""

    def __init__(self, backend: _Backend, *, database: str, table: str, name: str) -> None:
        self._backend = backend
        self.path = name  # for messages, like DuckDBSpanStore.path
        # chdb: the engine runs in this process, so a read's buffers are held here beside its
        # result (what-if and critical-path questions plan for both: ``planning.question_parts``)
        self.embedded_engine = isinstance(backend, _ChdbBackend)
        self._db = database
        self._table = f"{database}.{table}"
        self._side = f"{database}.{table}_hourglass"
        self._write_lock = threading.Lock()
        self._closed = False
        self._changes = 0  # bumped after each write and deletion this store made
        self._stats_cache: tuple[int, float, StoreStats] | None = None
        for ddl in (OTEL_TRACES_DDL, SIDE_TABLE_DDL, TRACE_ID_TS_DDL, TRACE_ID_TS_MV_DDL):
            backend.command(ddl.format(db=database, table=table, ttl="", ttl_start=""))
        # A table an older exporter created lacks the newer columns: read them as empty, write without.
        self._absent = self._check_table(database, table)

    def _check_table(self, database: str, table: str) -> tuple[str, ...]:
        """The optional exporter columns the existing table lacks; ``StoreError`` when it is not an
        exporter traces table Hourglass can read (a required column missing, the JSON flavour)."""
        described = self._backend.query_arrow(
            f"SELECT name, type FROM system.columns WHERE database = {quote(database)} AND table = {quote(table)}"
        )
        types = dict(
            zip(described.column("name").to_pylist(), described.column("type").to_pylist(), strict=True)
        )
        missing = [c for c in OTEL_COLUMNS if c not in OPTIONAL_OTEL_COLUMNS and c not in types]
        if missing:
            raise StoreError(
                f"{self.path}: table {self._table} is not an otel_traces table: no column(s) {missing}"
            )
        for column in ("ResourceAttributes", "SpanAttributes"):
            if not str(types[column]).startswith("Map("):
                raise StoreError(
                    f"{self.path}: {self._table}.{column} is {types[column]}; Hourglass reads the exporter's "
                    "Map flavour of otel_traces, not its JSON flavour"
                )
        return tuple(c for c in OPTIONAL_OTEL_COLUMNS if c not in types)

    @classmethod
    def connect(cls, url: str) -> ClickHouseSpanStore:
        """A ClickHouse server; raises ``StoreError`` (one line, no password) when unreachable."""
        location = parse_clickhouse_url(url)
        try:
            backend = _ServerBackend(
                host=location.host,
                port=location.port,
                username=location.username,
                password=location.password,
                secure=location.secure,
            )
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"{location}: cannot use the ClickHouse server: {_reason(exc)}") from exc
        try:
            version = backend.version()
            if version < MIN_SERVER_VERSION:
                wanted = ".".join(map(str, MIN_SERVER_VERSION))
                raise StoreError(
                    f"{location}: ClickHouse {'.'.join(map(str, version))} is too old; Hourglass needs {wanted} "
                    "or later (Map columns, waited-for async inserts, lightweight DELETE)"
                )
            # as the exporter does: the database is created when missing (only then: creating
            # needs a grant that reading and writing an existing one does not)
            exists = backend.query_arrow(
                f"SELECT count() AS n FROM system.databases WHERE name = {quote(location.database)}"
            )
            if int(exists.column("n")[0].as_py()) == 0:
                backend.command(f"CREATE DATABASE IF NOT EXISTS {location.database}")
            return cls(backend, database=location.database, table=location.table, name=str(location))
        except BaseException as exc:
            backend.close()
            if isinstance(exc, StoreError | KeyboardInterrupt):
                raise
            raise StoreError(f"{location}: cannot use the ClickHouse server: {_reason(exc)}") from exc

    @classmethod
    def embedded(cls, path: str, *, table: str = DEFAULT_TABLE) -> ClickHouseSpanStore:
        """Embedded ClickHouse (chdb) in directory ``path`` (created when missing)."""
        if path != ":memory:":
            path = os.path.expanduser(path)
            if os.path.exists(path) and not os.path.isdir(path):
                raise StoreError(f"chdb:{path}: not a directory (a chdb store is a directory)")
            _check_not_in_use(path)
        try:
            backend = _ChdbBackend(path)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(f"chdb:{path}: cannot open the embedded ClickHouse: {exc}") from exc
        try:
            backend.command(f"CREATE DATABASE IF NOT EXISTS {CHDB_DATABASE} ENGINE = Atomic")
            return cls(backend, database=CHDB_DATABASE, table=table, name=f"chdb:{path}")
        except BaseException:
            backend.close()
            raise

    # -- writes ------------------------------------------------------------------------------
    def write(self, spans: pa.Table) -> None:
        """Store rows of ``SPAN_SCHEMA``; returns once the server (or chdb) acknowledged the
        INSERTs (see the module doc for what that guarantees)."""
        if spans.num_rows == 0:
            return
        if spans.schema.names != list(SPAN_COLUMNS):
            raise ValueError(f"write() needs the SPAN_SCHEMA columns in order, got {spans.schema.names}")
        otel, side = to_otel_rows(_first_copies(spans))
        with self._write_lock:
            self._check_open()
            self._backend.insert_arrow(self._side, side)  # first: see the module doc
            self._backend.insert_arrow(
                self._table, otel.drop_columns(list(self._absent)) if self._absent else otel
            )
            self._changes += 1

    def compact(self) -> int:
        """Nothing to do: reads de-duplicate (see the module doc); returns 0."""
        return 0

    def delete_older_than(self, cutoff_ns: int) -> int:
        """Retention: drop whole traces whose last span ended before ``cutoff_ns``; rows removed.

        One lightweight DELETE per table with the old traces as a subquery (a DELETE is a pass
        over the table, so it is not repeated per batch of trace ids); the side table and the
        trace-id lookup first, as the subquery reads ``otel_traces``.
        """
        old = (
            f"SELECT TraceId FROM {self._table} GROUP BY TraceId "
            f"HAVING max(toUnixTimestamp64Nano(Timestamp) + toInt64(Duration)) < {_int(cutoff_ns)}"
        )
        with self._write_lock:
            self._check_open()
            counted = self._backend.query_arrow(
                f"SELECT count() AS n FROM {self._table} WHERE TraceId IN ({old})"
            )
            rows = int(counted.column("n")[0].as_py())
            if rows == 0:
                return 0
            self._backend.command(f"DELETE FROM {self._side} WHERE trace_id IN ({old})")
            self._backend.command(f"DELETE FROM {self._table}_trace_id_ts WHERE TraceId IN ({old})")
            self._backend.command(f"DELETE FROM {self._table} WHERE TraceId IN ({old})")
            self._changes += 1
            return rows

    # -- reads -------------------------------------------------------------------------------
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
        """De-duplicated whole traces: a trace is in when any of its spans matches every filter.

        ``since_ns``/``until_ns`` bound a span's start (``since_ns <= start_ns < until_ns``);
        rows come ordered by trace_id, start_ns, span_id. ``string_views`` is accepted for the
        protocol; strings come as plain Arrow strings.
        """
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        return self._read(
            selected,
            self._span_conditions(
                since_ns=since_ns,
                until_ns=until_ns,
                services=services,
                trace_ids=trace_ids,
                ids_table=self._backend.ids_table,
            ),
            partition=None,
            ids=_ids_of(trace_ids),
        )

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
        """Like ``scan``, for the traces with ``cityHash64(TraceId) % parts == part`` only: the
        partitions of one ``parts`` split every trace into exactly one of them, whole;
        ``trace_ids``: only those of its traces."""
        if parts < 1 or not 0 <= part < parts:
            raise ValueError(f"scan_partition needs 0 <= part < parts, got part={part}, parts={parts}")
        selected = _check_columns(columns if columns is not None else ANALYSIS_COLUMNS)
        return self._read(
            selected,
            self._span_conditions(
                since_ns=since_ns, services=services, trace_ids=trace_ids, ids_table=self._backend.ids_table
            ),
            partition=(part, parts),
            ids=_ids_of(trace_ids),
        )

    @staticmethod
    def _span_conditions(
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        services: list[str] | None = None,
        trace_ids: Sequence[str] | None = None,
        ids_table: str,
    ) -> list[str]:
        """The conditions of a read; more ``trace_ids`` than ``INLINE_TRACE_IDS`` are named as the
        table ``ids_table`` (the backend's: the read sends them as ``_ids_of``'s)."""
        conditions: list[str] = []
        # on Timestamp itself, so ClickHouse prunes the toDate(Timestamp) partitions
        if since_ns is not None:
            conditions.append(f"Timestamp >= fromUnixTimestamp64Nano(toInt64({_int(since_ns)}))")
        if until_ns is not None:
            conditions.append(f"Timestamp < fromUnixTimestamp64Nano(toInt64({_int(until_ns)}))")
        if services is not None:
            wanted = _strings(services)
            unknown = " OR ServiceName = ''" if "unknown_service" in services else ""
            conditions.append(f"(ServiceName IN {wanted}{unknown})")
        if trace_ids is not None:
            # ids are written in lowercase hex (by the Collector too): the bloom-filter index applies
            if len(trace_ids) > INLINE_TRACE_IDS:
                conditions.append(f"TraceId IN (SELECT id FROM {ids_table})")
            else:
                conditions.append(f"TraceId IN {_strings([t.lower() for t in trace_ids])}")
        return conditions

    def _read(
        self,
        selected: list[str],
        conditions: list[str],
        *,
        partition: tuple[int, int] | None,
        ids: list[str] | None = None,
    ) -> pa.Table:
        self._check_open()
        if not selected:
            return pa.table({})
        trace_filter: list[str] = []
        side_filter: list[str] = []
        if partition is not None:
            part, parts = partition
            trace_filter.append(f"cityHash64(TraceId) % {_int(parts)} = {_int(part)}")
            side_filter.append(f"cityHash64(trace_id) % {_int(parts)} = {_int(part)}")
        if conditions:
            matching = f"SELECT TraceId FROM {self._table} WHERE {' AND '.join(trace_filter + conditions)}"
            trace_filter.append(f"TraceId IN ({matching})")
            side_filter.append(f"trace_id IN ({matching})")
        side_needed = [c for c in SIDE_COLUMNS if c in selected]
        # a span's copies (an Export sent again): every read keeps the same one, whichever rows it
        # reads, and of copies that differ in timing the first ingested, as DuckDB's reads do.
        # Each otel row is joined with the first ingested side row of its own timing (start, and
        # end: the Duration, floored at 0), the otel rows of a span ordered by that side row's
        # ingestion (rows without one, a Collector's, after them), then by their content. Copies
        # of the same timing share a side row: of those, the one first by name and parent is kept
        # (DuckDB keeps the first ingested), with the first ingested one's side columns.
        # (``LIMIT 1 BY`` alone kept any copy, and another one in another read of the same trace.)
        exprs = {c: e.replace("e.x_", "o.x_") for c, e in select_expressions(side=True).items()}
        o_where = f"WHERE {' AND '.join(trace_filter)}" if trace_filter else ""
        e_where = f"WHERE {' AND '.join(side_filter)}" if side_filter else ""
        read = ", ".join(
            f"{OPTIONAL_OTEL_COLUMNS[c]} AS `{c}`" if c in self._absent else f"`{c}`"
            for c in _READ_OTEL_COLUMNS
        )
        side_columns = "".join(f", {c} AS x_{c}" for c in side_needed if c != "ingested_ns")
        query = (
            f"SELECT {', '.join(f'{exprs[c]} AS {c}' for c in selected)} FROM ("
            f"SELECT o.*, e.* FROM (SELECT {read}, toInt64(Duration) AS o_duration "
            f"FROM {self._table} {o_where}) AS o "
            "LEFT JOIN (SELECT trace_id AS x_trace_id, span_id AS x_span_id, Timestamp AS x_start, "
            "greatest(end_ns - toUnixTimestamp64Nano(Timestamp), 0) AS x_duration, "
            f"ingested_ns AS x_ingested_ns{side_columns} FROM {self._side} {e_where} "
            "ORDER BY ingested_ns LIMIT 1 BY trace_id, span_id, Timestamp, x_duration) AS e "
            "ON o.TraceId = e.x_trace_id AND o.SpanId = e.x_span_id AND o.Timestamp = e.x_start "
            "AND o.o_duration = e.x_duration "
            "ORDER BY o.TraceId, o.SpanId, e.x_ingested_ns IS NULL, e.x_ingested_ns, o.Timestamp, "
            "o.o_duration, o.SpanName, o.ParentSpanId LIMIT 1 BY o.TraceId, o.SpanId) AS o "
        )
        order = ", ".join(exprs[c] for c in ("trace_id", "start_ns", "span_id"))
        query += f"ORDER BY {order} {_READ_SETTINGS}"
        return self._conform(self._backend.query_arrow(query, ids), selected)

    @staticmethod
    def _conform(table: pa.Table, selected: list[str]) -> pa.Table:
        return _conformed(table, pa.schema([SPAN_SCHEMA.field(c) for c in selected]))

    def _span_match(self, service: str | None, operation: str | None, since_ns: int | None) -> str:
        """SQL condition of a span of ``service`` named ``operation`` (either None: any; not both),
        as the reads name them (an empty ServiceName is ``unknown_service``), in a trace of the
        window (``since_ns``: a trace with a span starting from then, as ``scan`` selects)."""
        conditions = [_named_span(service, operation)]
        if since_ns is not None:
            conditions.append(self._in_window(since_ns))
        return " AND ".join(conditions)

    def _in_window(self, since_ns: int) -> str:
        """SQL condition of a row of a trace of the window from ``since_ns`` (one with a span row
        starting from then, as ``scan`` selects)."""
        return (
            f"TraceId IN (SELECT TraceId FROM {self._table} "
            f"WHERE Timestamp >= fromUnixTimestamp64Nano(toInt64({_int(since_ns)})))"
        )

    def window_roots(
        self,
        since_ns: int | None,
        spans_of: Sequence[tuple[str, str | None]] = (),
        trace_ids: Sequence[str] = (),
    ) -> pa.Table:
        """One row per trace of the window, in one aggregation of the span rows, as
        ``DuckDBSpanStore.window_roots``: ``trace_id`` (null unless the trace is asked),
        ``spans`` (its span rows, copies included), and for a trace not asked its root's
        ``root_service``, ``root_name`` and ``root_duration_ns``. A trace is asked when it has a
        span of one of ``spans_of``, its id is in ``trace_ids``, or its root is not plain.

        A root is plain when the trace has exactly one span row without a parent id, stored once
        (no copy of it), and, with ``since_ns``, starting from then: DuckDB's rule, since a read
        here keeps the first ingested copy of a span as DuckDB's do (``_read``). Its duration is
        the stored ``Duration`` (end minus start, 0 when negative: a read's ``end_ns -
        start_ns`` floored at 0). Two aggregations: the span rows per span (its copies), then
        per trace."""
        self._check_open()
        parentless = "ParentSpanId = ''"
        where = f"WHERE {self._in_window(since_ns)}" if since_ns is not None else ""
        touched = " OR ".join(f"({_named_span(service, operation)})" for service, operation in spans_of)
        plain = "roots = 1 AND root_rows = 1"
        if since_ns is not None:
            plain += f" AND root_start_ns >= {_int(since_ns)}"
        ids = _ids_of(trace_ids)  # (many: sent beside the query)
        if not trace_ids:
            named = "0"
        elif ids is not None:
            named = f"trace_id IN (SELECT id FROM {self._backend.ids_table})"
        else:
            named = f"trace_id IN {_strings([t.lower() for t in trace_ids])}"
        query = f"""
            SELECT if(asked, trace_id, NULL) AS trace_id, spans,
                if(asked, NULL, if(root_service = '', {quote(UNKNOWN_SERVICE)}, toString(root_service)))
                    AS root_service,
                if(asked, NULL, toString(root_name)) AS root_name,
                if(asked, NULL, toInt64(root_duration)) AS root_duration_ns
            FROM (
                SELECT lower(TraceId) AS trace_id, toInt64(sum(rows)) AS spans,
                    max(touched) AS touched, sum(parentless) AS roots,
                    anyIf(rows, parentless > 0) AS root_rows,
                    anyIf(service, parentless > 0) AS root_service,
                    anyIf(name, parentless > 0) AS root_name,
                    anyIf(start_ns, parentless > 0) AS root_start_ns,
                    anyIf(duration, parentless > 0) AS root_duration,
                    (touched OR {named} OR NOT ({plain})) AS asked
                FROM (
                    SELECT TraceId, count() AS rows, countIf({parentless}) AS parentless,
                        {f"countIf({touched}) > 0" if touched else "0"} AS touched,
                        anyIf(ServiceName, {parentless}) AS service,
                        anyIf(SpanName, {parentless}) AS name,
                        anyIf(toUnixTimestamp64Nano(Timestamp), {parentless}) AS start_ns,
                        anyIf(Duration, {parentless}) AS duration
                    FROM {self._table} {where} GROUP BY TraceId, SpanId
                )
                GROUP BY TraceId
            )"""
        return _conformed(self._backend.query_arrow(query, ids), WINDOW_ROOTS_SCHEMA)

    def has_span(
        self,
        service: str | None,
        operation: str | None,
        since_ns: int | None = None,
        parentless: bool = False,
    ) -> bool:
        """Whether a trace of the window has a span named ``operation`` in ``service`` (either
        None: any); with ``parentless``, one without a parent id. Every stored row counts, a
        span's copies too (``DuckDBSpanStore.has_span``)."""
        self._check_open()
        where = self._span_match(service, operation, since_ns)
        if parentless:
            where += " AND ParentSpanId = ''"
        rows = self._backend.query_arrow(
            f"SELECT count() AS n FROM (SELECT 1 FROM {self._table} WHERE {where} LIMIT 1)"
        )
        return int(rows.column("n")[0].as_py()) > 0

    def endpoint_trace_ids(
        self,
        service: str | None,
        operation: str | None,
        since_ns: int | None = None,
        most_spans: int | None = None,
        most_traces: int | None = None,
    ) -> tuple[list[str], int] | None:
        """(the ids of the window's traces with a span named ``operation`` in ``service``, sorted;
        the span rows those traces hold, copies included), as ``DuckDBSpanStore.
        endpoint_trace_ids``; None when they hold more than ``most_spans`` or are more than
        ``most_traces`` (counted before the ids are fetched). A read of them by id sends them
        beside its query, however many (``INLINE_TRACE_IDS``)."""
        self._check_open()
        where = self._span_match(service, operation, since_ns)
        traces = f"SELECT DISTINCT TraceId FROM {self._table} WHERE {where}"
        counted = self._backend.query_arrow(
            f"SELECT (SELECT count() FROM {self._table} WHERE TraceId IN ({traces})) AS spans, "
            f"(SELECT count() FROM ({traces})) AS traces"
        )
        spans, count = int(counted.column("spans")[0].as_py()), int(counted.column("traces")[0].as_py())
        if (most_spans is not None and spans > most_spans) or (
            most_traces is not None and count > most_traces
        ):
            return None
        if not spans:
            return [], 0
        found = self._backend.query_arrow(
            f"SELECT DISTINCT lower(TraceId) AS id FROM {self._table} WHERE {where} ORDER BY id"
        )
        return [str(i) for i in found.column("id").to_pylist()], spans

    def trace(self, trace_id: str) -> pa.Table:
        """All spans of one trace with every column (empty table when unknown)."""
        return self.scan(trace_ids=[trace_id], columns=SPAN_COLUMNS)

    def stats(self) -> StoreStats:
        """Unique span and trace counts. Counted by the server; the last counts are reused for up to
        ``STATS_MAX_AGE_S`` while this store wrote and deleted nothing (others, such as a Collector
        writing into the same table, show within that time)."""
        self._check_open()
        changes = self._changes  # read before counting: a change meanwhile forces a recount
        cached = self._stats_cache
        if cached is not None and cached[0] == changes and time.monotonic() - cached[1] < STATS_MAX_AGE_S:
            return cached[2]
        taken = time.monotonic()
        counts = self._backend.query_arrow(
            f"SELECT uniqExact(TraceId, SpanId) AS spans, uniqExact(TraceId) AS traces FROM {self._table}"
        )
        counted = StoreStats(
            spans=int(counts.column("spans")[0].as_py()), traces=int(counts.column("traces")[0].as_py())
        )
        self._stats_cache = (changes, taken, counted)
        return counted

    def services(self) -> list[str]:
        self._check_open()
        rows = self._backend.query_arrow(
            f"SELECT DISTINCT if(ServiceName = '', 'unknown_service', toString(ServiceName)) AS service "
            f"FROM {self._table} ORDER BY service"
        )
        return [str(s) for s in rows.column("service").to_pylist()] if rows.num_columns else []

    def newest_start_ns(self, rows: int) -> int | None:
        """About the start time from which the newest ``rows`` span rows start (ClickHouse's
        sampled ``quantile`` of the start times); None when the table holds no more rows than
        that. serve's whole-store analysis cut to ``HOURGLASS_REPORT_MAX_SPANS``."""
        total = self.raw_row_count()
        if total <= rows:
            return None
        level = min(max(1.0 - rows / total, 0.0), 1.0)
        found = self._backend.query_arrow(
            f"SELECT toInt64(quantile({level!r})(toUnixTimestamp64Nano(Timestamp))) AS t FROM {self._table}"
        )
        value = found.column("t")[0].as_py() if found.num_rows else None
        return None if value is None else int(value)

    def span_rows_since(self, since_ns: int | None) -> int:
        """Physical rows of spans starting at or after ``since_ns`` (None: every row)."""
        if since_ns is None:
            return self.raw_row_count()
        self._check_open()
        rows = self._backend.query_arrow(
            f"SELECT count() AS n FROM {self._table} "
            f"WHERE Timestamp >= fromUnixTimestamp64Nano(toInt64({_int(since_ns)}))"
        )
        return int(rows.column("n")[0].as_py())

    def _window_where(self, since_ns: int | None, services: list[str] | None) -> str:
        """The ``WHERE`` clause (with its leading space; "" without a filter) of the rows a read
        with the filters ``since_ns`` and ``services`` takes: every row of each trace with a span
        that matches them all (as ``_read`` selects them)."""
        conditions = self._span_conditions(since_ns=since_ns, services=services, ids_table="")
        if not conditions:
            return ""
        return f" WHERE TraceId IN (SELECT TraceId FROM {self._table} WHERE {' AND '.join(conditions)})"

    def window_rows(self, since_ns: int | None = None, services: list[str] | None = None) -> int:
        """Physical rows (copies included) of the traces a read with the filters ``since_ns`` and
        ``services`` takes (every row of each trace with a span that matches them): what a plan
        of that window's analysis counts. Without a filter, :meth:`raw_row_count`."""
        if since_ns is None and services is None:
            return self.raw_row_count()
        self._check_open()
        where = self._window_where(since_ns, services)
        rows = self._backend.query_arrow(f"SELECT count() AS n FROM {self._table}{where}")
        return int(rows.column("n")[0].as_py())

    def newest_window(self, most: int, services: list[str] | None = None) -> int | None:
        """The earliest ``since_ns`` whose window (``window_rows(since_ns, services)``) holds at
        most ``most`` rows: each trace's last start (of its spans of ``services``) and rows,
        summed newest first, ties together (the window's default frame, as DuckDB's
        ``NEWEST_WINDOW_SQL``). None: not even the newest trace fits, or none matches."""
        self._check_open()
        start = "toUnixTimestamp64Nano(Timestamp)"
        conditions = self._span_conditions(services=services, ids_table="")
        match = " AND ".join(conditions) or "1"
        rows = self._backend.query_arrow(
            f"SELECT min(last) AS since, count() AS n FROM (SELECT last, sum(n) OVER (ORDER BY last DESC) AS held "
            f"FROM (SELECT maxIf({start}, {match}) AS last, count() AS n FROM {self._table} GROUP BY TraceId "
            f"HAVING countIf({match}) > 0)) WHERE held <= {_int(most)}"
        )
        found = rows.column("n")[0].as_py() and rows.column("since")[0].as_py()
        return int(found) if found else None

    def trace_sizes(self, since_ns: int | None = None, services: list[str] | None = None) -> tuple[Any, Any]:
        """(each trace's id hashed as this store's partitions take it, ``cityHash64(TraceId)``,
        its physical rows), as numpy arrays: how many rows a partition of whole traces holds, for
        any count (``planning.loads_of``); of the traces a read with the filters ``since_ns`` and
        ``services`` takes."""
        import polars as pl  # (pyarrow's own to_numpy imports pandas)

        self._check_open()
        where = self._window_where(since_ns, services)
        rows = self._backend.query_arrow(
            f"SELECT cityHash64(TraceId) AS h, count() AS n FROM {self._table}{where} GROUP BY TraceId"
        )
        frame = pl.from_arrow(rows)
        assert isinstance(frame, pl.DataFrame)
        return frame["h"].cast(pl.UInt64).to_numpy(), frame["n"].cast(pl.Int64).to_numpy()

    def raw_row_count(self) -> int:
        """Physical ``otel_traces`` rows, duplicates included."""
        self._check_open()
        rows = self._backend.query_arrow(f"SELECT count() AS n FROM {self._table}")
        return int(rows.column("n")[0].as_py())

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"span store {self.path} is closed")

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
            self._backend.close()

    def __enter__(self) -> ClickHouseSpanStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["OTEL_COLUMNS", "ClickHouseLocation", "ClickHouseSpanStore", "parse_clickhouse_url", "redact"]
