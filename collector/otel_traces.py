"""The OpenTelemetry Collector ClickHouse exporter's ``otel_traces`` table, both ways.

The table is the exporter's own (``exporter/clickhouseexporter``, Map flavour, the one with
``ScopeName``/``ScopeVersion``): same column names, types, codecs, indexes, ``PARTITION BY`` and
``ORDER BY``, so Hourglass reads what a Collector already wrote there and what Hourglass writes is
read by the tools built on that schema (Grafana's ClickHouse data source, SigNoz-style queries).
Hourglass never alters it.

- Writing (``to_otel_rows``): each ``SPAN_SCHEMA`` row becomes one ``otel_traces`` row. The span
  attributes, events with their attributes, links, trace state come from ``raw`` (the serialized
  OTLP span) and the resource attributes from ``resource_json``; values are rendered as text the
  way the Collector does (``pcommon.Value.AsString``: ints in decimal, bools ``true``/``false``,
  bytes base64, arrays and maps as JSON). ``SpanKind``/``StatusCode`` are written as the current
  exporter writes them (``Server``, ``Error``...). The scope version is not in ``SPAN_SCHEMA``:
  written empty. A row without ``raw`` gets its attributes back from the semantic columns and hints.
- What ``otel_traces`` cannot hold faithfully (``ingested_ns``, typed ``hints``/``event_hints``,
  ``resource_json``, ``raw``) goes to the side table ``<table>_hourglass``, keyed by
  (trace_id, span_id).
- Reading (``select_expressions``): every other ``SPAN_SCHEMA`` column is derived from the
  ``otel_traces`` columns in SQL, the same way ``collector.decode`` derives it from OTLP: kind and
  status from either spelling (``Server`` or ``SPAN_KIND_SERVER``), the semantic columns from
  ``SpanAttributes`` by ``SEMANTIC_ATTRIBUTE_COLUMNS`` priority, host from ``ResourceAttributes``,
  links and follows-from from ``Links.*``. For rows a Collector wrote (no side row), ``hints``,
  ``event_hints`` and ``resource_json`` are derived too (attribute values then are text, as
  ClickHouse holds them), ``raw`` is null, and ``ingested_ns`` is the span's end (ClickHouse keeps
  no insertion time per row).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.proto.trace.v1 import trace_pb2

from collector.schema import (
    HINT_EVENT_PATTERN,
    HINT_KEY_PATTERN,
    HOST_RESOURCE_KEYS,
    KIND_NAMES,
    SEMANTIC_ATTRIBUTE_COLUMNS,
    SPAN_COLUMNS,
)

UNKNOWN_SERVICE = "unknown_service"  # collector.decode.UNKNOWN_SERVICE (decode is not imported: it is heavy)
FOLLOWS_FROM_LINK_ATTRIBUTE = ("opentracing.ref_type", "follows_from")
DROPPED_EVENT_ATTRIBUTES = ("exception.stacktrace",)

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

SIDE_COLUMNS: tuple[str, ...] = ("ingested_ns", "hints", "event_hints", "resource_json", "raw")

OTEL_COLUMNS: tuple[str, ...] = (
    "Timestamp",
    "TraceId",
    "SpanId",
    "ParentSpanId",
    "TraceState",
    "SpanName",
    "SpanKind",
    "ServiceName",
    "ResourceAttributes",
    "ScopeName",
    "ScopeVersion",
    "SpanAttributes",
    "Duration",
    "StatusCode",
    "StatusMessage",
    "Events.Timestamp",
    "Events.Name",
    "Events.Attributes",
    "Links.TraceId",
    "Links.SpanId",
    "Links.TraceState",
    "Links.Attributes",
)

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
SIDE_ARROW_SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.string()),
        pa.field("span_id", pa.string()),
        pa.field("Timestamp", pa.timestamp("ns")),
        pa.field("ingested_ns", pa.int64()),
        pa.field("hints", pa.string()),
        pa.field("event_hints", pa.string()),
        pa.field("resource_json", pa.string()),
        pa.field("raw", pa.binary()),
    ]
)

# Written as the current exporter writes them (ptrace SpanKind/StatusCode String()).
KIND_TEXT = {0: "Unspecified", 1: "Internal", 2: "Server", 3: "Client", 4: "Producer", 5: "Consumer"}
STATUS_TEXT = {0: "Unset", 1: "Ok", 2: "Error"}


# -- writing -----------------------------------------------------------------------------------
def value_text(value: Any) -> str:
    """An attribute value as text, as the Collector's ``pcommon.Value.AsString`` renders it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"))


def _any_value_text(value: Any) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return str(value.string_value)
    if kind == "int_value":
        return str(value.int_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "double_value":
        return repr(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind is None:
        return ""
    from collector.decode import any_value_to_python  # arrays and maps only: rare

    return json.dumps(any_value_to_python(value), separators=(",", ":"))


def _attributes(key_values: Any) -> list[tuple[str, str]]:
    return [(kv.key, _any_value_text(kv.value)) for kv in key_values]


def _fallback_attributes(row: dict[str, Any]) -> list[tuple[str, str]]:
    """Span attributes rebuilt from the columns when a row has no ``raw`` span."""
    attributes: list[tuple[str, str]] = []
    for column, keys in SEMANTIC_ATTRIBUTE_COLUMNS.items():
        value = row.get(column)
        if value is not None:
            attributes.append((keys[0], value_text(value)))
    if row.get("hints"):
        attributes.extend((k, value_text(v)) for k, v in json.loads(row["hints"]).items())
    return attributes


class _Maps:
    """A growing ``map<string, string>`` column (flat keys and values plus offsets)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.values: list[str] = []
        self.offsets: list[int] = [0]

    def add(self, pairs: list[tuple[str, str]]) -> None:
        for key, value in pairs:
            self.keys.append(key)
            self.values.append(value)
        self.offsets.append(len(self.keys))

    def add_key_values(self, key_values: Any) -> None:
        for kv in key_values:
            self.keys.append(kv.key)
            self.values.append(_any_value_text(kv.value))
        self.offsets.append(len(self.keys))

    def array(self) -> pa.Array:
        return pa.MapArray.from_arrays(
            pa.array(self.offsets, pa.int32()),
            pa.array(self.keys, pa.string()),
            pa.array(self.values, pa.string()),
        )


class _Nested:
    """The ``list<...>`` columns of one Nested (Events or Links): shared offsets per span."""

    def __init__(self, *names: str) -> None:
        self.offsets: list[int] = [0]
        self.items: dict[str, list[Any]] = {name: [] for name in names}
        self.attributes = _Maps()

    def close_span(self) -> None:
        self.offsets.append(len(self.attributes.offsets) - 1)

    def arrays(self, types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
        offsets = pa.array(self.offsets, pa.int32())
        out = {
            name: pa.ListArray.from_arrays(offsets, pa.array(values, types[name]))
            for name, values in self.items.items()
        }
        out["Attributes"] = pa.ListArray.from_arrays(offsets, self.attributes.array())
        return out


def to_otel_rows(spans: pa.Table) -> tuple[pa.Table, pa.Table]:
    """(otel_traces rows, side-table rows) for ``SPAN_SCHEMA`` rows.

    One protobuf parse per span (the attributes, events and links live only in ``raw``), appending
    to flat key/value lists that become Arrow map and list arrays in one step each; the plain
    columns are converted as whole Arrow arrays.
    """
    n = spans.num_rows
    start = spans.column("start_ns").combine_chunks()
    end = spans.column("end_ns").combine_chunks()
    timestamps = start.cast(pa.timestamp("ns"))
    duration = pc.max_element_wise(pc.subtract(end, start), 0).cast(pa.uint64())
    kind_text = pa.array([KIND_TEXT[k] for k in range(len(KIND_TEXT))], pa.string())
    status_text = pa.array([STATUS_TEXT[s] for s in range(len(STATUS_TEXT))], pa.string())

    resource_cache: dict[str | None, list[tuple[str, str]]] = {None: []}
    resources = _Maps()
    for text in spans.column("resource_json").to_pylist():
        attrs = resource_cache.get(text)
        if attrs is None:
            attrs = [(k, value_text(v)) for k, v in json.loads(text).items()]
            resource_cache[text] = attrs
        resources.add(attrs)

    trace_states: list[str] = [""] * n
    span_attributes = _Maps()
    events = _Nested("Timestamp", "Name")
    links = _Nested("TraceId", "SpanId", "TraceState")
    raws = spans.column("raw").to_pylist()
    fallback_rows: dict[int, dict[str, Any]] = {}
    missing = [i for i, r in enumerate(raws) if not r]  # none, or empty (hand-built rows)
    if missing:
        fallback_rows = dict(zip(missing, spans.take(missing).to_pylist(), strict=True))
    parse = trace_pb2.Span.FromString
    event_times, event_names = events.items["Timestamp"], events.items["Name"]
    link_traces, link_spans, link_states = (links.items[k] for k in ("TraceId", "SpanId", "TraceState"))
    for i, encoded in enumerate(raws):
        if encoded:
            span = parse(encoded)
            trace_states[i] = span.trace_state
            span_attributes.add_key_values(span.attributes)
            for event in span.events:
                event_times.append(event.time_unix_nano)
                event_names.append(event.name)
                events.attributes.add_key_values(event.attributes)
            for link in span.links:
                link_traces.append(link.trace_id.hex())
                link_spans.append(link.span_id.hex())
                link_states.append(link.trace_state)
                links.attributes.add_key_values(link.attributes)
        else:
            row = fallback_rows[i]
            span_attributes.add(_fallback_attributes(row))
            for name, time_ns in zip(row["event_names"] or [], row["event_times_ns"] or [], strict=False):
                event_times.append(time_ns)
                event_names.append(name)
                events.attributes.add([])
            row_links = [link.split(":", 1) for link in row["links"] or []]
            if row["follows_from"] and row["parent_span_id"]:
                row_links.append([row["trace_id"], row["parent_span_id"]])
            for index, (trace_id, span_id) in enumerate(row_links):
                link_traces.append(trace_id)
                link_spans.append(span_id)
                link_states.append("")
                follows = row["follows_from"] and index == len(row_links) - 1
                links.attributes.add([FOLLOWS_FROM_LINK_ATTRIBUTE] if follows else [])
        events.close_span()
        links.close_span()

    empty = pa.scalar("", pa.string())
    event_arrays = events.arrays({"Timestamp": pa.timestamp("ns"), "Name": pa.string()})
    link_arrays = links.arrays({"TraceId": pa.string(), "SpanId": pa.string(), "TraceState": pa.string()})
    columns: dict[str, Any] = {
        "Timestamp": timestamps,
        "TraceId": spans.column("trace_id"),
        "SpanId": spans.column("span_id"),
        "ParentSpanId": pc.fill_null(spans.column("parent_span_id"), empty),
        "TraceState": pa.array(trace_states, pa.string()),
        "SpanName": spans.column("name"),
        "SpanKind": pc.take(
            kind_text, pc.if_else(_in_range(spans.column("kind"), len(KIND_TEXT)), spans.column("kind"), 0)
        ),
        "ServiceName": spans.column("service"),
        "ResourceAttributes": resources.array(),
        "ScopeName": pc.fill_null(spans.column("scope_name"), empty),
        "ScopeVersion": pa.nulls(n, pa.string()).fill_null(""),
        "SpanAttributes": span_attributes.array(),
        "Duration": duration,
        "StatusCode": pc.take(
            status_text,
            pc.if_else(
                _in_range(spans.column("status_code"), len(STATUS_TEXT)), spans.column("status_code"), 0
            ),
        ),
        "StatusMessage": pc.fill_null(spans.column("status_message"), empty),
        **{f"Events.{name}": array for name, array in event_arrays.items()},
        **{f"Links.{name}": array for name, array in link_arrays.items()},
    }
    arrays = []
    for f in OTEL_ARROW_SCHEMA:
        value = columns[f.name]
        if isinstance(value, pa.ChunkedArray):
            value = value.combine_chunks()
        arrays.append(value.cast(f.type))
    otel = pa.Table.from_arrays(arrays, schema=OTEL_ARROW_SCHEMA)
    side = pa.Table.from_arrays(
        [
            timestamps if name == "Timestamp" else spans.column(name).combine_chunks()
            for name in SIDE_ARROW_SCHEMA.names
        ],
        schema=SIDE_ARROW_SCHEMA,
    )
    return otel, side


def _in_range(column: Any, size: int) -> Any:
    return pc.and_(pc.greater_equal(column, 0), pc.less(column, size))


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
    dropped = "[" + ", ".join(quote(k) for k in DROPPED_EVENT_ATTRIBUTES) + "]"
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
        "end_ns": end,
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
