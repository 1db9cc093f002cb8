"""The OpenTelemetry Collector ClickHouse exporter's ``otel_traces`` table, both ways.

The table is the exporter's own (``exporter/clickhouseexporter``, Map flavour, the one with
``ScopeName``/``ScopeVersion``): same column names, types, codecs, indexes, ``PARTITION BY`` and
``ORDER BY``, so Hourglass reads what a Collector already wrote there and what Hourglass writes is
read by the tools built on that schema (Grafana's ClickHouse data source, SigNoz-style queries).
Hourglass never alters it.

- Writing (``hourglass.collector.decode_otel.to_otel_rows``): each ``SPAN_SCHEMA`` row becomes one ``otel_traces`` row. The span
  attributes, events with their attributes, links, trace state come from ``raw`` (the serialized
  OTLP span) and the resource attributes from ``resource_json``; values are rendered as text the
  way the Collector does (``pcommon.Value.AsString``: ints in decimal, bools ``true``/``false``,
  bytes base64, arrays and maps as JSON). ``SpanKind``/``StatusCode`` are written as the current
  exporter writes them (``Server``, ``Error``...). The scope version is not in ``SPAN_SCHEMA``:
  written empty. A row without ``raw`` gets its attributes back from the semantic columns and hints.
- What ``otel_traces`` cannot hold faithfully (``ingested_ns``, an ``end_ns`` before ``start_ns``, typed ``hints``/``event_hints``,
  ``resource_json``, ``raw``) goes to the side table ``<table>_hourglass``, keyed by
  (trace_id, span_id).
- Reading (``select_expressions``): every other ``SPAN_SCHEMA`` column is derived from the
  ``otel_traces`` columns in SQL, the same way ``hourglass.collector.decode`` derives it from OTLP: kind and
  status from either spelling (``Server`` or ``SPAN_KIND_SERVER``), the semantic columns from
  ``SpanAttributes`` by ``SEMANTIC_ATTRIBUTE_COLUMNS`` priority, host from ``ResourceAttributes``,
  links and follows-from from ``Links.*``. For rows a Collector wrote (no side row), ``hints``,
  ``event_hints`` and ``resource_json`` are derived too (attribute values then are text, as
  ClickHouse holds them), ``raw`` is null, and ``ingested_ns`` is the span's end (ClickHouse keeps
  no insertion time per row).
"""

from __future__ import annotations

import pyarrow as pa

from hourglass.collector.decode_common import (
    DROPPED_EVENT_ATTRIBUTES,
    FOLLOWS_FROM_LINK_ATTRIBUTE,
    UNKNOWN_SERVICE,
)
from hourglass.collector.schema import (
    HINT_EVENT_PATTERN,
    HINT_KEY_PATTERN,
    HOST_RESOURCE_KEYS,
    KIND_NAMES,
    SEMANTIC_ATTRIBUTE_COLUMNS,
    SPAN_COLUMNS,
)

# The exporter's traces table (Map flavour); {db}, {table} and {ttl} are filled in.
OTEL_TRACES_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table} (
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    ParentSpanId String CODEC(ZSTD(1)),
    TraceState String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    SpanKind LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    ResourceAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    ScopeName String CODEC(ZSTD(1)),
    ScopeVersion String CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(ZSTD(1)),
    StatusCode LowCardinality(String) CODEC(ZSTD(1)),
    StatusMessage String CODEC(ZSTD(1)),
    Events Nested (
        Timestamp DateTime64(9),
        Name LowCardinality(String),
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    Links Nested (
        TraceId String,
        SpanId String,
        TraceState String,
        Attributes Map(LowCardinality(String), String)
    ) CODEC(ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_res_attr_key mapKeys(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_res_attr_value mapValues(ResourceAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp))
{ttl}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""

# The exporter's trace-id -> time range lookup (and the view filling it): tools find a trace's
# time window there before reading otel_traces.
TRACE_ID_TS_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table}_trace_id_ts (
    TraceId String CODEC(ZSTD(1)),
    Start SimpleAggregateFunction(min, DateTime) CODEC(ZSTD(1)),
    End SimpleAggregateFunction(max, DateTime) CODEC(ZSTD(1))
) ENGINE = MergeTree
PARTITION BY toStartOfWeek(Start)
ORDER BY (TraceId)
{ttl_start}
SETTINGS index_granularity = 8192, ttl_only_drop_parts = 1
"""
TRACE_ID_TS_MV_DDL = """
CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{table}_trace_id_ts_mv
TO {db}.{table}_trace_id_ts
AS SELECT TraceId, min(Timestamp) AS Start, max(Timestamp) AS End
FROM {db}.{table}
WHERE TraceId != ''
GROUP BY TraceId
"""

# Hourglass' side table: what otel_traces cannot hold faithfully, one row per written span.
SIDE_TABLE_DDL = """
CREATE TABLE IF NOT EXISTS {db}.{table}_hourglass (
    trace_id String CODEC(ZSTD(1)),
    span_id String CODEC(ZSTD(1)),
    Timestamp DateTime64(9) CODEC(Delta, ZSTD(1)),
    ingested_ns Int64 CODEC(Delta, ZSTD(1)),
    end_ns Int64 CODEC(Delta, ZSTD(1)),
    hints Nullable(String) CODEC(ZSTD(1)),
    event_hints Nullable(String) CODEC(ZSTD(1)),
    resource_json Nullable(String) CODEC(ZSTD(1)),
    raw Nullable(String) CODEC(ZSTD(3))
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (trace_id, span_id)
{ttl}
SETTINGS index_granularity = 8192
"""

# end_ns too: otel_traces keeps a Duration, which cannot be negative (a span ending before it starts,
# clock skew the analysis repairs, is written with Duration 0)
SIDE_COLUMNS: tuple[str, ...] = ("ingested_ns", "end_ns", "hints", "event_hints", "resource_json", "raw")


_ATTRIBUTES = pa.map_(pa.string(), pa.string())
OTEL_ARROW_SCHEMA = pa.schema(
    [
        pa.field("Timestamp", pa.timestamp("ns")),
        pa.field("TraceId", pa.string()),
        pa.field("SpanId", pa.string()),
        pa.field("ParentSpanId", pa.string()),
        pa.field("TraceState", pa.string()),
        pa.field("SpanName", pa.string()),
        pa.field("SpanKind", pa.string()),
        pa.field("ServiceName", pa.string()),
        pa.field("ResourceAttributes", _ATTRIBUTES),
        pa.field("ScopeName", pa.string()),
        pa.field("ScopeVersion", pa.string()),
        pa.field("SpanAttributes", _ATTRIBUTES),
        pa.field("Duration", pa.uint64()),
        pa.field("StatusCode", pa.string()),
        pa.field("StatusMessage", pa.string()),
        pa.field("Events.Timestamp", pa.list_(pa.timestamp("ns"))),
        pa.field("Events.Name", pa.list_(pa.string())),
        pa.field("Events.Attributes", pa.list_(_ATTRIBUTES)),
        pa.field("Links.TraceId", pa.list_(pa.string())),
        pa.field("Links.SpanId", pa.list_(pa.string())),
        pa.field("Links.TraceState", pa.list_(pa.string())),
        pa.field("Links.Attributes", pa.list_(_ATTRIBUTES)),
    ]
)
OTEL_COLUMNS: tuple[str, ...] = tuple(OTEL_ARROW_SCHEMA.names)
SIDE_ARROW_SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.string()),
        pa.field("span_id", pa.string()),
        pa.field("Timestamp", pa.timestamp("ns")),
        pa.field("ingested_ns", pa.int64()),
        pa.field("end_ns", pa.int64()),
        pa.field("hints", pa.string()),
        pa.field("event_hints", pa.string()),
        pa.field("resource_json", pa.string()),
        pa.field("raw", pa.binary()),
    ]
)

# Written as the current exporter writes them (ptrace SpanKind/StatusCode String()).
KIND_TEXT = {0: "Unspecified", 1: "Internal", 2: "Server", 3: "Client", 4: "Producer", 5: "Consumer"}
STATUS_TEXT = {0: "Unset", 1: "Ok", 2: "Error"}


# -- reading -----------------------------------------------------------------------------------
def quote(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _regex(pattern: str) -> str:
    return quote("(?i)" + pattern)


def _kind_sql() -> str:
    # 'Server' (current exporter) or 'SPAN_KIND_SERVER' (older exporters): both read
    name = "lower(replaceRegexpOne(o.SpanKind, '^(?i)SPAN_KIND_', ''))"
    cases = ", ".join(f"{name} = {quote(text)}, {number}" for number, text in KIND_NAMES.items() if number)
    return f"toInt8(multiIf({cases}, 0))"


def _status_sql() -> str:
    name = "lower(replaceRegexpOne(o.StatusCode, '^(?i)STATUS_CODE_', ''))"
    return f"toInt8(multiIf({name} = 'ok', 1, {name} = 'error', 2, 0))"


def _first_present(map_column: str, keys: tuple[str, ...], *, non_empty: bool = False) -> str:
    if non_empty:
        cases = [f"{map_column}[{quote(k)}] != '', {map_column}[{quote(k)}]" for k in keys]
    else:
        cases = [f"mapContains({map_column}, {quote(k)}), {map_column}[{quote(k)}]" for k in keys]
    return f"multiIf({', '.join(cases)}, NULL)"


def _http_status_sql(keys: tuple[str, ...]) -> str:
    value = _first_present("o.SpanAttributes", keys)
    # a digit string (an int attribute, as text) or a number written by a double attribute
    return (
        f"accurateCastOrNull(if(match(trim({value}), '^[0-9]+$'), toFloat64OrNull(trim({value})), "
        f"toFloat64OrNull({value})), 'Int32')"
    )


_SEMANTIC_KEYS: tuple[str, ...] = tuple(k for keys in SEMANTIC_ATTRIBUTE_COLUMNS.values() for k in keys)


def _derived_hints_sql() -> str:
    semantic = "[" + ", ".join(quote(k) for k in _SEMANTIC_KEYS) + "]"
    kept = f"mapFilter((k, v) -> match(k, {_regex(HINT_KEY_PATTERN.pattern)}) AND NOT has({semantic}, k), o.SpanAttributes)"
    return f"if(empty({kept}), NULL, toJSONString({kept}))"


def _derived_event_hints_sql() -> str:
    dropped = "[" + ", ".join(quote(k) for k in sorted(DROPPED_EVENT_ATTRIBUTES)) + "]"
    events = (
        "arrayFilter(ev -> match(ev.1, " + _regex(HINT_EVENT_PATTERN.pattern) + "), "
        "arrayZip(o.`Events.Name`, o.`Events.Timestamp`, o.`Events.Attributes`))"
    )
    each = (
        "arrayMap(ev -> concat('{\"name\":', toJSONString(ev.1), ',\"time_ns\":', "
        "toString(toUnixTimestamp64Nano(ev.2)), ',\"attributes\":', "
        f"toJSONString(mapFilter((k, v) -> NOT has({dropped}, k), ev.3)), '}}'), {events})"
    )
    return f"if(empty({events}), NULL, concat('[', arrayStringConcat({each}, ','), ']'))"


def _follows_from_sql() -> str:
    key, value = (quote(x) for x in FOLLOWS_FROM_LINK_ATTRIBUTE)
    return (
        "arrayExists((s, a) -> o.ParentSpanId != '' AND lower(s) = lower(o.ParentSpanId) "
        f"AND lower(a[{key}]) = {value}, o.`Links.SpanId`, o.`Links.Attributes`)"
    )


def select_expressions(*, side: bool) -> dict[str, str]:
    """column -> SQL expression over ``o`` (otel_traces) and, with ``side``, ``e`` (the side
    table, LEFT JOINed with join_use_nulls: ``e.x_span_id IS NULL`` when a Collector wrote the row)."""
    start = "toUnixTimestamp64Nano(o.Timestamp)"
    end = f"({start} + toInt64(o.Duration))"
    exprs: dict[str, str] = {
        "trace_id": "lower(o.TraceId)",
        "span_id": "lower(o.SpanId)",
        "parent_span_id": "if(o.ParentSpanId = '', NULL, lower(o.ParentSpanId))",
        "service": f"if(o.ServiceName = '', {quote(UNKNOWN_SERVICE)}, toString(o.ServiceName))",
        "name": "toString(o.SpanName)",
        "kind": _kind_sql(),
        "start_ns": start,
        "status_code": _status_sql(),
        "status_message": "if(o.StatusMessage = '', NULL, o.StatusMessage)",
        "scope_name": "if(o.ScopeName = '', NULL, o.ScopeName)",
        "host": _first_present("o.ResourceAttributes", HOST_RESOURCE_KEYS, non_empty=True),
    }
    for column, keys in SEMANTIC_ATTRIBUTE_COLUMNS.items():
        exprs[column] = (
            _http_status_sql(keys)
            if column == "http_status_code"
            else _first_present("o.SpanAttributes", keys)
        )
    derived = {
        "hints": _derived_hints_sql(),
        "event_hints": _derived_event_hints_sql(),
        "resource_json": "toJSONString(o.ResourceAttributes)",
        "raw": "NULL",
        "ingested_ns": end,
        "end_ns": end,
    }
    exprs.update(
        {
            "event_names": "arrayMap(x -> toString(x), o.`Events.Name`)",
            "event_times_ns": "arrayMap(t -> toUnixTimestamp64Nano(t), o.`Events.Timestamp`)",
            "links": "arrayMap((t, s) -> concat(lower(t), ':', lower(s)), o.`Links.TraceId`, o.`Links.SpanId`)",
            "follows_from": _follows_from_sql(),
        }
    )
    for column, expression in derived.items():
        exprs[column] = f"if(e.x_span_id IS NULL, {expression}, e.x_{column})" if side else expression
    assert set(exprs) == set(SPAN_COLUMNS)
    return exprs
