"""SPAN_SCHEMA rows -> rows of the Collector ClickHouse exporter's ``otel_traces`` table (and
Hourglass' side table): the write half of ``collector.otel_traces``.

A decoder like ``collector.decode`` (hence the name: only ``collector/decode*.py`` import the
protobuf modules): the span attributes, events, links and trace state live only in ``raw``, the
serialized OTLP span, so each span is parsed once; values become text the way the Collector
renders them (``pcommon.Value.AsString``).
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.proto.trace.v1 import trace_pb2

from collector.otel_traces import (
    FOLLOWS_FROM_LINK_ATTRIBUTE,
    KIND_TEXT,
    OTEL_ARROW_SCHEMA,
    SIDE_ARROW_SCHEMA,
    STATUS_TEXT,
)
from collector.schema import SEMANTIC_ATTRIBUTE_COLUMNS


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
