"""SPAN_SCHEMA rows -> rows of the Collector ClickHouse exporter's ``otel_traces`` table (and
Hourglass' side table): the write half of ``hourglass.collector.otel_traces``.

A decoder like ``hourglass.collector.decode`` (one of the few modules that import the protobuf
modules, see ``tests/test_layering.py``): the span attributes, events, links and trace state live only in ``raw``, the
serialized OTLP span, so each span is parsed once; values become text the way the Collector
renders them (``pcommon.Value.AsString``).
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector import native_decode
from hourglass.collector.decode_common import FOLLOWS_FROM_LINK_ATTRIBUTE
from hourglass.collector.decode_parts import any_value_to_python
from hourglass.collector.otel_traces import (
    KIND_TEXT,
    OTEL_ARROW_SCHEMA,
    SIDE_ARROW_SCHEMA,
    STATUS_TEXT,
)
from hourglass.collector.schema import SEMANTIC_ATTRIBUTE_COLUMNS


def value_text(value: Any) -> str:
    """An attribute value as text, as the Collector's ``pcommon.Value.AsString`` renders it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _double_text(value)
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
        return _double_text(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind is None:
        return ""
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


def to_otel_rows(spans: pa.Table, *, native: bool = True) -> tuple[pa.Table, pa.Table]:
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

    # resources repeat (one per process): each distinct one is converted once, then taken per row
    encoded = pc.dictionary_encode(spans.column("resource_json").combine_chunks())
    distinct = _Maps()
    for text in encoded.dictionary.to_pylist():
        distinct.add([(k, value_text(v)) for k, v in json.loads(text).items()])
    distinct.add([])  # rows without a resource (null)
    indices = pc.fill_null(encoded.indices, len(encoded.dictionary))
    resource_attributes = distinct.array().take(indices)

    raws = spans.column("raw").to_pylist()
    missing = [i for i, r in enumerate(raws) if not r]  # none, or empty (hand-built rows)
    per_span = _native_columns(raws) if native and not missing else None
    if per_span is None:
        per_span = _python_columns(spans, raws, missing)

    empty = pa.scalar("", pa.string())
    columns: dict[str, Any] = {
        "Timestamp": timestamps,
        "TraceId": spans.column("trace_id"),
        "SpanId": spans.column("span_id"),
        "ParentSpanId": pc.fill_null(spans.column("parent_span_id"), empty),
        "SpanName": spans.column("name"),
        "SpanKind": pc.take(
            kind_text, pc.if_else(_in_range(spans.column("kind"), len(KIND_TEXT)), spans.column("kind"), 0)
        ),
        "ServiceName": spans.column("service"),
        "ResourceAttributes": resource_attributes,
        "ScopeName": pc.fill_null(spans.column("scope_name"), empty),
        "ScopeVersion": pa.nulls(n, pa.string()).fill_null(""),
        "Duration": duration,
        "StatusCode": pc.take(
            status_text,
            pc.if_else(
                _in_range(spans.column("status_code"), len(STATUS_TEXT)), spans.column("status_code"), 0
            ),
        ),
        "StatusMessage": pc.fill_null(spans.column("status_message"), empty),
        **per_span,
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


def _python_columns(spans: pa.Table, raws: list[Any], missing: list[int]) -> dict[str, pa.Array]:
    """The per-span columns by parsing each raw span (the path when the C scanner is not built,
    refuses the bytes, or rows have no raw span)."""
    n = len(raws)
    trace_states: list[str] = [""] * n
    span_attributes = _Maps()
    events = _Nested("Timestamp", "Name")
    links = _Nested("TraceId", "SpanId", "TraceState")
    fallback_rows: dict[int, dict[str, Any]] = {}
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

    return {
        "TraceState": pa.array(trace_states, pa.string()),
        "SpanAttributes": span_attributes.array(),
        **{
            f"Events.{name}": array
            for name, array in events.arrays({"Timestamp": pa.timestamp("ns"), "Name": pa.string()}).items()
        },
        **{
            f"Links.{name}": array
            for name, array in links.arrays(
                {"TraceId": pa.string(), "SpanId": pa.string(), "TraceState": pa.string()}
            ).items()
        },
    }


# -- the fast path: the C scanner over the raw spans ------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _double_text(value: float) -> str:
    """As Go's ``strconv.FormatFloat(v, 'f', -1, 64)`` (the Collector's text of a double)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return np.format_float_positional(value, trim="-")


def _native_columns(raws: list[bytes]) -> dict[str, pa.Array] | None:
    """TraceState, SpanAttributes and the Events/Links columns of every span, from one pass of
    ``hourglass.collector._otlpscan`` over the raw spans framed as one request; None when the scanner is not
    built or refuses the bytes (the per-span path then runs). Python runs per event, per link and
    per attribute that is not a string, int, bool or double — not per span or per plain attribute.
    """
    if not native_decode.AVAILABLE or not raws:
        return None
    spans_bytes = b"".join(b"\x12" + _varint(len(raw)) + raw for raw in raws)  # ScopeSpans.spans
    scope_spans = b"\x12" + _varint(len(spans_bytes)) + spans_bytes  # ResourceSpans.scope_spans
    data = b"\x0a" + _varint(len(scope_spans)) + scope_spans  # ExportTraceServiceRequest.resource_spans
    scanned = native_decode.scan(data)
    if scanned is None:
        return None
    spans, attrs, keys, events, links, _, _ = scanned
    n = len(raws)
    if len(spans) != n:
        return None
    strings = native_decode.strings
    # SpanAttributes: keys by index into the distinct-key table; values as text by type
    key_names = strings(data, keys[:, native_decode.KY_OFF], keys[:, native_decode.KY_LEN])
    attr_keys = key_names.take(pa.array(attrs[:, native_decode.AT_KEY]))
    vtype = attrs[:, native_decode.AT_VTYPE]
    is_string = vtype == native_decode.V_STRING
    text = strings(
        data,
        np.where(is_string, attrs[:, native_decode.AT_VOFF], 0),
        np.where(is_string, attrs[:, native_decode.AT_VLEN], 0),
    )
    ints = attrs[:, native_decode.AT_VINT]
    int_text = pc.cast(pa.array(ints), pa.string())
    bool_text = pc.if_else(pa.array(ints != 0), "true", "false")
    other = np.flatnonzero(
        ~np.isin(vtype, [native_decode.V_STRING, native_decode.V_INT, native_decode.V_BOOL])
    )
    other_text: list[str | None] = [None] * len(vtype)
    if len(other):
        doubles = ints[other].view(np.float64)
        for position, index in enumerate(other.tolist()):
            kind = int(vtype[index])
            if kind == native_decode.V_DOUBLE:
                other_text[index] = _double_text(float(doubles[position]))
            elif kind == native_decode.V_NONE:
                other_text[index] = ""
            else:  # bytes, array, kvlist: rare, parsed as a whole KeyValue
                start = int(attrs[index, native_decode.AT_KV_OFF])
                encoded = data[start : start + int(attrs[index, native_decode.AT_KV_LEN])]
                other_text[index] = _any_value_text(common_pb2.KeyValue.FromString(encoded).value)
    values = pc.if_else(
        pa.array(is_string),
        text,
        pc.if_else(
            pa.array(vtype == native_decode.V_INT),
            int_text,
            pc.if_else(pa.array(vtype == native_decode.V_BOOL), bool_text, pa.array(other_text, pa.string())),
        ),
    )
    attr_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(attrs[:, native_decode.AT_SPAN], minlength=n), out=attr_offsets[1:])
    columns: dict[str, pa.Array] = {
        "SpanAttributes": pa.MapArray.from_arrays(pa.array(attr_offsets), attr_keys, values),
        "TraceState": pa.array([_span_trace_state(raw) for raw in raws], pa.string()),
    }
    # Events: times and names from the scan; attributes parsed per event
    event_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(events[:, native_decode.EV_SPAN], minlength=n), out=event_offsets[1:])
    event_maps = _Maps()
    for start, length in events[:, [native_decode.EV_OFF, native_decode.EV_LEN]].tolist():
        event_maps.add_key_values(_EventFromString(data[start : start + length]).attributes)
    offsets = pa.array(event_offsets)
    columns["Events.Timestamp"] = pa.ListArray.from_arrays(
        offsets, pa.array(events[:, native_decode.EV_TIME]).cast(pa.timestamp("ns"))
    )
    columns["Events.Name"] = pa.ListArray.from_arrays(
        offsets, strings(data, events[:, native_decode.EV_NAME_OFF], events[:, native_decode.EV_NAME_LEN])
    )
    columns["Events.Attributes"] = pa.ListArray.from_arrays(offsets, event_maps.array())
    # Links: rare, parsed per link
    link_offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(links[:, native_decode.LK_SPAN], minlength=n), out=link_offsets[1:])
    link_items = _Nested("TraceId", "SpanId", "TraceState")
    for start, length in links[:, [native_decode.LK_OFF, native_decode.LK_LEN]].tolist():
        link = _LinkFromString(data[start : start + length])
        link_items.items["TraceId"].append(link.trace_id.hex())
        link_items.items["SpanId"].append(link.span_id.hex())
        link_items.items["TraceState"].append(link.trace_state)
        link_items.attributes.add_key_values(link.attributes)
    offsets = pa.array(link_offsets)
    for name in ("TraceId", "SpanId", "TraceState"):
        columns[f"Links.{name}"] = pa.ListArray.from_arrays(
            offsets, pa.array(link_items.items[name], pa.string())
        )
    columns["Links.Attributes"] = pa.ListArray.from_arrays(offsets, link_items.attributes.array())
    return columns


_EventFromString = trace_pb2.Span.Event.FromString
_LinkFromString = trace_pb2.Span.Link.FromString
_SpanFromString = trace_pb2.Span.FromString


def _span_trace_state(raw: bytes) -> str:
    # field 3 (trace_state) is rare: only spans that may hold it are parsed
    return str(_SpanFromString(raw).trace_state) if b"\x1a" in raw else ""
