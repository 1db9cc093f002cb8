"""The parts of an Export both decoders read through protobuf: attribute values, resources, scopes,
links and hint events, and the lean wire view of ``TracesData``.

The C-backed decoder (``native_decode``) finds where these parts are and reads the common ones
itself; the rare ones (a value that is not a plain string or int, hint attributes and events,
links, each distinct resource and scope) it hands to these functions, exactly as the pure-Python
decoder (``decode_python``) does, so both give the same values and raise the same errors.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector.decode_common import (
    DROPPED_EVENT_ATTRIBUTES,
    FOLLOWS_FROM_LINK_ATTRIBUTE,
    HTTP_STATUS_MAX,
    HTTP_STATUS_MIN,
    UNKNOWN_SERVICE,
    is_hint_event,
)
from hourglass.collector.schema import HOST_RESOURCE_KEYS


def any_value_to_python(value: common_pb2.AnyValue) -> Any:
    """An OTLP ``AnyValue`` as plain JSON-able Python (bytes as base64). Iterative, no recursion."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        return value.double_value
    box: list[Any] = [None]
    stack: list[tuple[common_pb2.AnyValue, Any, Any]] = [(value, box, 0)]
    while stack:
        item, parent, slot = stack.pop()
        kind = item.WhichOneof("value")
        if kind == "array_value":
            values = item.array_value.values
            out_list: list[Any] = [None] * len(values)
            parent[slot] = out_list
            stack.extend((v, out_list, i) for i, v in enumerate(values))
        elif kind == "kvlist_value":
            out_dict: dict[str, Any] = {}
            parent[slot] = out_dict
            stack.extend((kv.value, out_dict, kv.key) for kv in item.kvlist_value.values)
        elif kind == "bytes_value":
            parent[slot] = base64.b64encode(item.bytes_value).decode("ascii")
        elif kind is None:
            parent[slot] = None
        else:
            parent[slot] = getattr(item, kind)
    return box[0]


def attributes_to_dict(attributes: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}


def column_value(column: str, value: common_pb2.AnyValue) -> Any:
    """A semantic attribute as its column type: int for http_status_code, text otherwise."""
    kind = value.WhichOneof("value")
    if column == "http_status_code":
        code: int | None = None
        if kind == "int_value":
            code = value.int_value
        elif kind == "string_value" and (text := value.string_value.strip()).isascii() and text.isdigit():
            code = int(text)
        elif kind == "double_value" and math.isfinite(value.double_value):
            code = int(value.double_value)
        # the column is int32: a value no HTTP status can have is dropped, not an error for the request
        return code if code is not None and HTTP_STATUS_MIN <= code <= HTTP_STATUS_MAX else None
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return None
    converted = any_value_to_python(value)
    return converted if isinstance(converted, str) else json.dumps(converted)


# ---------------------------------------------------------------------------------------------
# The lean view: a wire-compatible mirror of TracesData whose resources, scopes, attributes and
# links stay undecoded ``bytes``. Parsing it costs ~0.1 µs/span against ~0.7 µs for the full
# message, iterating attributes yields plain bytes instead of KeyValue wrappers, and
# ``SerializeToString`` of a lean span gives exactly the bytes of the OTLP ``Span``.


def _build_lean_classes(*, events_as_bytes: bool = False) -> dict[str, Any]:
    suffix = "_event_bytes" if events_as_bytes else ""
    fdp = descriptor_pb2.FileDescriptorProto(
        name=f"hourglass/lean_trace{suffix}.proto", package=f"hourglass.lean{suffix}", syntax="proto3"
    )
    fd = descriptor_pb2.FieldDescriptorProto
    b, s, m, f64, f32, i32, u32 = (
        fd.TYPE_BYTES,
        fd.TYPE_STRING,
        fd.TYPE_MESSAGE,
        fd.TYPE_FIXED64,
        fd.TYPE_FIXED32,
        fd.TYPE_INT32,
        fd.TYPE_UINT32,
    )
    layout: dict[str, list[tuple[str, int, int, bool, str | None]]] = {
        "TracesData": [("resource_spans", 1, m, True, "ResourceSpans")],
        "ResourceSpans": [
            ("resource", 1, b, False, None),
            ("scope_spans", 2, m, True, "ScopeSpans"),
            ("schema_url", 3, s, False, None),
        ],
        "ScopeSpans": [
            ("scope", 1, b, False, None),
            ("spans", 2, m, True, "Span"),
            ("schema_url", 3, s, False, None),
        ],
        "Span": [
            ("trace_id", 1, b, False, None),
            ("span_id", 2, b, False, None),
            ("trace_state", 3, s, False, None),
            ("parent_span_id", 4, b, False, None),
            ("name", 5, s, False, None),
            ("kind", 6, i32, False, None),
            ("start_time_unix_nano", 7, f64, False, None),
            ("end_time_unix_nano", 8, f64, False, None),
            ("attributes", 9, b, True, None),
            ("dropped_attributes_count", 10, u32, False, None),
            ("events", 11, m, True, "Event"),  # bytes in the events-as-bytes view below
            ("dropped_events_count", 12, u32, False, None),
            ("links", 13, b, True, None),
            ("dropped_links_count", 14, u32, False, None),
            ("status", 15, b, False, None),  # bytes: most spans repeat a few statuses
            ("flags", 16, f32, False, None),
        ],
        "Event": [
            ("time_unix_nano", 1, f64, False, None),
            ("name", 2, s, False, None),
            ("attributes", 3, b, True, None),
            ("dropped_attributes_count", 4, u32, False, None),
        ],
        "Status": [("message", 2, s, False, None), ("code", 3, i32, False, None)],
    }
    if events_as_bytes:
        layout["Span"] = [("events", 11, b, True, None) if f[0] == "events" else f for f in layout["Span"]]
    for message_name, fields in layout.items():
        message = fdp.message_type.add(name=message_name)
        for field_name, number, field_type, repeated, type_name in fields:
            f = message.field.add(
                name=field_name,
                number=number,
                type=field_type,
                label=fd.LABEL_REPEATED if repeated else fd.LABEL_OPTIONAL,
            )
            if type_name:
                f.type_name = f".{fdp.package}.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{fdp.package}.{name}"))
        for name in layout
    }


LEAN = _build_lean_classes()
# The view the Python decoder reads: the same layout with ``Span.events`` as undecoded bytes.
# Reading events through upb wrappers cost ~1.8 µs/span (one wrapper per event, per access); the
# bytes are read in bulk with numpy instead. Parsing a request with ``LEAN["TracesData"]`` first
# keeps the validation exactly as strict as before (it is C-only, ~0.1 µs/span).
LEAN_EVENT_BYTES = _build_lean_classes(events_as_bytes=True)
key_value_from_string = common_pb2.KeyValue.FromString
_lean_event_from_string = LEAN["Event"].FromString


def hint_events(events: Any, names: list[str]) -> str | None:
    """``event_hints`` of one span from its serialized events (``names`` in the same order)."""
    found = []
    for index, name in enumerate(names):
        if is_hint_event(name):
            event = _lean_event_from_string(events[index])
            attributes: dict[str, Any] = {}
            for encoded in event.attributes:
                kv = key_value_from_string(encoded)
                if kv.key not in DROPPED_EVENT_ATTRIBUTES:
                    attributes[kv.key] = any_value_to_python(kv.value)
            found.append({"name": name, "time_ns": event.time_unix_nano, "attributes": attributes})
    return json.dumps(found, separators=(",", ":")) if found else None


def link_columns(encoded_links: Any, parent_id: bytes) -> tuple[list[str], bool]:
    """(``trace_id:span_id`` of each serialized link, whether one is a FOLLOWS_FROM link to the parent)."""
    texts = []
    follows = False
    for encoded in encoded_links:
        link = trace_pb2.Span.Link.FromString(encoded)
        texts.append(f"{link.trace_id.hex()}:{link.span_id.hex()}")
        if parent_id and link.span_id == parent_id:
            for kv in link.attributes:
                if (
                    kv.key == FOLLOWS_FROM_LINK_ATTRIBUTE[0]
                    and kv.value.string_value.lower() == FOLLOWS_FROM_LINK_ATTRIBUTE[1]
                ):
                    follows = True
    return texts, follows


def resource_columns(encoded: bytes) -> tuple[str, str | None, str]:
    """(service, host, resource_json) of a serialized ``Resource`` (b"" when absent)."""
    resource = resource_pb2.Resource.FromString(encoded)
    resource_attrs = attributes_to_dict(resource.attributes)
    service_value = resource_attrs.get("service.name")
    service = str(service_value) if service_value not in (None, "") else UNKNOWN_SERVICE
    host: str | None = None
    for host_key in HOST_RESOURCE_KEYS:
        host_value = resource_attrs.get(host_key)
        if host_value not in (None, ""):
            host = str(host_value)
            break
    return service, host, json.dumps(resource_attrs, separators=(",", ":"))


def scope_name_of(encoded: bytes) -> str | None:
    """The name of a serialized ``InstrumentationScope``, None when empty."""
    return common_pb2.InstrumentationScope.FromString(encoded).name or None
