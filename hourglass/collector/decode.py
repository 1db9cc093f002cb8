"""OTLP messages → span rows (``hourglass.collector.schema.SPAN_SCHEMA``): the only module that imports ``*_pb2``.

Every source ends here: the gRPC and HTTP receivers pass raw request bytes, the trace-file readers
build (or parse) ``TracesData`` messages. The decoder is the mirror of the SDK's pure encode
functions: one function per input shape, no state besides small caches.

Rules (see ``hourglass/collector/schema.py`` for the columns):

- IDs become lowercase hex; an empty or all-zero parent id means a root span (null parent).
  A span whose trace id is not 16 bytes, whose span id is not 8 bytes,
  whose parent id is neither empty nor 8 bytes, or whose trace/span id is all zero is *rejected*:
  it is counted in ``DecodeResult.rejected`` with a reason naming its position
  (``resourceSpans[i].scopeSpans[j].spans[k]``) and the good spans beside it are kept.
- ``service`` is the resource's ``service.name`` (``unknown_service`` when absent), ``host`` the
  first of ``HOST_RESOURCE_KEYS``; ``resource_json`` (all resource attributes) is built once per
  ``ResourceSpans`` and repeated per row.
- Performance is the point (the notes measured ~5.6 µs/span to read every attribute value in
  Python against ~2 µs for everything else): per attribute only ``kv.key`` is read and classified
  through a dict cache; the value is read only for keys that map to a semantic column or match
  ``HINT_KEY_PATTERN``. Columns are built as Python lists and turned into one Arrow table per call.
- ``event_hints`` keeps the attributes of events whose name matches ``HINT_EVENT_PATTERN``
  (``exception.stacktrace`` is dropped: it is large and no detector reads it).
- ``follows_from`` is true when the span carries a link to its own parent whose attribute
  ``opentracing.ref_type`` is ``follows_from`` — the convention the OpenTelemetry Collector's
  Jaeger translator uses for FOLLOWS_FROM references; file readers for Jaeger/Zipkin use it too.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError as _ProtobufDecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector.schema import (
    ATTRIBUTE_KEY_TO_COLUMN,
    HINT_EVENT_PATTERN,
    HINT_KEY_PATTERN,
    HOST_RESOURCE_KEYS,
    SEMANTIC_ATTRIBUTE_COLUMNS,
    SPAN_SCHEMA,
)

__all__ = [
    "FOLLOWS_FROM_LINK_ATTRIBUTE",
    "DecodeError",
    "DecodeResult",
    "TracesData",
    "add_health_service",
    "decode_export_request",
    "decode_otlp_json",
    "decode_traces_message",
    "export_response",
    "otlp_json_to_message",
    "parse_traces_data",
    "rpc_status",
    "status_details_with_retry",
]

TracesData = trace_pb2.TracesData
UNKNOWN_SERVICE = "unknown_service"
FOLLOWS_FROM_LINK_ATTRIBUTE = ("opentracing.ref_type", "follows_from")
# At most this many rejection reasons are listed; the count is always exact.
MAX_ERROR_MESSAGES = 20
_INT64_MAX = 2**63 - 1
# A span kind or status code the OTLP enums do not define is stored as unspecified / unset (the
# raw span keeps the number); the columns are int8.
KIND_MIN, KIND_MAX, KIND_UNSPECIFIED = 0, 5, 0
STATUS_MIN, STATUS_MAX, STATUS_UNSET = 0, 2, 0
# the range of the int32 ``http_status_code`` column
HTTP_STATUS_MIN, HTTP_STATUS_MAX = -(2**31), 2**31 - 1
# Event attributes never copied into ``event_hints`` (large, and no detector reads them).
DROPPED_EVENT_ATTRIBUTES = frozenset({"exception.stacktrace"})


class DecodeError(ValueError):
    """Input that cannot be decoded at all (unparsable bytes, JSON of the wrong shape)."""


@dataclass
class DecodeResult:
    table: pa.Table
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return self.table.num_rows

    def error_message(self) -> str:
        """One line for ``partial_success.error_message`` and CLI output."""
        if not self.rejected:
            return ""
        shown = "; ".join(self.errors)
        more = self.rejected - len(self.errors)
        suffix = f"; and {more} more" if more > 0 else ""
        return f"{self.rejected} span(s) rejected: {shown}{suffix}"


# ---------------------------------------------------------------------------------------------
# attribute-key classification, cached per key (bytes as they appear on the wire):
#   None -> ignore;  HINT_CODE -> goes to ``hints``;  code >= 0 -> semantic column
#   ``code >> 4`` (index in _SEMANTIC_COLUMNS) with priority ``code & 15`` (lower wins).
_SEMANTIC_COLUMNS = tuple(SEMANTIC_ATTRIBUTE_COLUMNS)
_COLUMN_INDEX = {column: index for index, column in enumerate(_SEMANTIC_COLUMNS)}
_HTTP_STATUS_INDEX = _COLUMN_INDEX["http_status_code"]
HINT_CODE = -1
_NO_PRIORITY = 15
_KEY_CODES: dict[bytes, int | None] = {}
_MAX_CACHED_KEYS = 100_000  # unbounded key cardinality must not grow memory without limit


def _key_code(key: str) -> int | None:
    mapped = ATTRIBUTE_KEY_TO_COLUMN.get(key)
    if mapped is not None:
        column, priority = mapped
        return (_COLUMN_INDEX[column] << 4) | min(priority, _NO_PRIORITY - 1)
    if HINT_KEY_PATTERN.search(key):
        return HINT_CODE
    return None


def _classify_wire_key(key: bytes) -> int | None:
    code = _key_code(key.decode("utf-8", "replace"))
    if len(_KEY_CODES) >= _MAX_CACHED_KEYS:
        _KEY_CODES.clear()
    _KEY_CODES[key] = code
    return code


# event names seen so far that are not hint events (a superset test skips a span's events at once)
_PLAIN_EVENT_NAMES: set[str] = set()


def _is_hint_event(name: str) -> bool:
    if name in _PLAIN_EVENT_NAMES:
        return False
    if HINT_EVENT_PATTERN.search(name):
        return True
    if len(_PLAIN_EVENT_NAMES) >= _MAX_CACHED_KEYS:
        _PLAIN_EVENT_NAMES.clear()
    _PLAIN_EVENT_NAMES.add(name)
    return False


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


def _attributes_to_dict(attributes: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: any_value_to_python(kv.value) for kv in attributes}


def _column_value(column: str, value: common_pb2.AnyValue) -> Any:
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


def _span_problem(span: Any) -> str | None:
    """Why a span is rejected: an id of the wrong size or all zero, or a time beyond int64."""
    trace_id, span_id, parent_id = span.trace_id, span.span_id, span.parent_span_id
    if len(trace_id) != 16:
        return f"trace_id is {len(trace_id)} bytes, expected 16"
    if len(span_id) != 8:
        return f"span_id is {len(span_id)} bytes, expected 8"
    if parent_id and len(parent_id) != 8:
        return f"parent_span_id is {len(parent_id)} bytes, expected 8 or empty"
    if not any(trace_id):
        return "trace_id is all zero"
    if not any(span_id):
        return "span_id is all zero"
    for field_name in ("start_time_unix_nano", "end_time_unix_nano"):
        if getattr(span, field_name) > _INT64_MAX:
            return f"{field_name} {getattr(span, field_name)} is beyond int64 (after the year 2262)"
    return None


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


_LEAN = _build_lean_classes()
# The view the decoder reads: the same layout with ``Span.events`` as undecoded bytes. Reading
# events through upb wrappers cost ~1.8 µs/span (one wrapper per event, per access); the bytes are
# read in bulk with numpy instead (``_event_columns``). Parsing a request with ``_LeanTracesData``
# first keeps the validation exactly as strict as before (it is C-only, ~0.1 µs/span).
_LEAN_EVENT_BYTES = _build_lean_classes(events_as_bytes=True)
_LeanTracesData = _LEAN["TracesData"]
_LeanTracesDataEventBytes = _LEAN_EVENT_BYTES["TracesData"]
_KeyValue = common_pb2.KeyValue
_KeyValueFromString = common_pb2.KeyValue.FromString
_LeanEventFromString = _LEAN["Event"].FromString


_TRACE_ID_LENGTHS = frozenset({16})
_SPAN_ID_LENGTHS = frozenset({8})
_PARENT_ID_LENGTHS = frozenset({0, 8})
_ZERO_TRACE_ID = bytes(16)
_ZERO_SPAN_ID = bytes(8)
_STATUS_CACHE: dict[bytes, tuple[int, str | None]] = {b"": (0, None)}
# serialized semantic (or ignored) KeyValue -> (code, value); only short ones, as high-cardinality values
# (full URLs, statements) would only churn the cache
_SEMANTIC_VALUE_CACHE: dict[bytes, tuple[int, Any]] = {}
_VALUE_CACHE_MAX_BYTES = 96
# cached for short KeyValues whose key maps to nothing: repeated ones (user agent, port...) then
# cost one lookup instead of key slicing and classification
_IGNORED_ATTRIBUTE: tuple[int, Any] = (-16, None)
_STATUS_CACHE_MAX_KEY_BYTES = 256


def _status(encoded: bytes) -> tuple[int, str | None]:
    """(code, message or None) of a serialized ``Status``; short ones are cached (they repeat)."""
    cached = _STATUS_CACHE.get(encoded)
    if cached is not None:
        return cached
    status = _LEAN["Status"].FromString(encoded)
    result = (status.code, status.message or None)
    if len(encoded) <= _STATUS_CACHE_MAX_KEY_BYTES:
        if len(_STATUS_CACHE) >= _MAX_CACHED_KEYS:
            _STATUS_CACHE.clear()
            _STATUS_CACHE[b""] = (0, None)
        _STATUS_CACHE[encoded] = result
    return result


def _attribute_key(encoded: bytes) -> str:
    """The key of a serialized ``KeyValue`` (the slow path: long keys or unusual field order)."""
    return _KeyValueFromString(encoded).key


def _semantic_value(encoded: bytes, key_end: int, column_index: int) -> Any:
    """The value of a semantic attribute, from its serialized ``KeyValue``.

    Fast paths read the wire bytes directly: ``0x12 len 0x0a len <utf-8>`` (a short string) and
    ``0x12 len 0x18 <varint>`` (a small int, for http_status_code). Anything else is parsed.
    """
    size = len(encoded)
    if (
        key_end > 0
        and size > key_end + 3
        and encoded[key_end] == 0x12
        and encoded[key_end + 1] == size - key_end - 2
    ):
        tag = encoded[key_end + 2]
        if column_index != _HTTP_STATUS_INDEX:
            if tag == 0x0A and encoded[key_end + 3] == size - key_end - 4:
                return encoded[key_end + 4 :].decode("utf-8", "replace")
        elif tag == 0x18:
            if size == key_end + 4 and encoded[key_end + 3] < 0x80:
                return encoded[key_end + 3]
            if size == key_end + 5 and encoded[key_end + 4] < 0x80:
                return (encoded[key_end + 3] & 0x7F) | (encoded[key_end + 4] << 7)
    return _column_value(_SEMANTIC_COLUMNS[column_index], _KeyValueFromString(encoded).value)


def _hint_events(events: Any, names: list[str]) -> str | None:
    """``event_hints`` of one span from its serialized events (``names`` in the same order)."""
    hint_events = []
    for index, name in enumerate(names):
        if _is_hint_event(name):
            event = _LeanEventFromString(events[index])
            attributes: dict[str, Any] = {}
            for encoded in event.attributes:
                kv = _KeyValueFromString(encoded)
                if kv.key not in DROPPED_EVENT_ATTRIBUTES:
                    attributes[kv.key] = any_value_to_python(kv.value)
            hint_events.append({"name": name, "time_ns": event.time_unix_nano, "attributes": attributes})
    return json.dumps(hint_events, separators=(",", ":")) if hint_events else None


def validity_bitmap(valid: np.ndarray | None, count: int) -> tuple[pa.Buffer | None, int]:
    """Arrow validity bitmap and null count of a boolean mask (None, or all true: no bitmap)."""
    if valid is None:
        return None, 0
    null_count = count - int(np.count_nonzero(valid))
    if not null_count:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), null_count


def hex_id_array(ids: bytes, count: int, size: int, valid: np.ndarray | None = None) -> pa.Array:
    """``count`` ids of ``size`` bytes each, concatenated in ``ids``, as lowercase hex strings (one
    ``bytes.hex`` over all of them instead of one per id); null where not ``valid``."""
    offsets = np.arange(0, 2 * size * count + 1, 2 * size, dtype=np.int32)
    validity, null_count = validity_bitmap(valid, count)
    return pa.StringArray.from_buffers(
        count, pa.py_buffer(offsets), pa.py_buffer(ids.hex().encode("ascii")), validity, null_count
    )


def _hex_ids(ids: list[bytes], size: int, *, empty_or_zero_is_null: bool = False) -> pa.Array:
    """Lowercase hex of validated ids (each ``size`` bytes, or empty when nullable)."""
    count = len(ids)
    if empty_or_zero_is_null:
        zero = bytes(size)
        ids = [i or zero for i in ids]
    data = b"".join(ids)
    valid: np.ndarray | None = None
    if empty_or_zero_is_null and count:
        valid = np.asarray(np.frombuffer(data, dtype=np.uint8).reshape(count, size).any(axis=1))
    return hex_id_array(data, count, size, valid)


def _event_columns(all_events: list[Any]) -> tuple[pa.Array, pa.Array, list[str | None]]:
    """``event_names``, ``event_times_ns`` and ``event_hints`` from each span's serialized events.

    Fast path (every event as the SDKs and the Collector write it: ``0x09 <fixed64 time> 0x12
    <name length < 128> <name>`` first): the times and names are sliced out of all events at once
    with numpy and become Arrow list arrays directly. Anything else (other field order, long
    names, invalid UTF-8, a time beyond int64) goes through the parsed ``Event`` messages. Only
    spans that carry an event whose name matches ``HINT_EVENT_PATTERN`` get per-span work.
    """
    rows = len(all_events)
    counts = np.fromiter(map(len, all_events), dtype=np.int64, count=rows)
    span_offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(counts, out=span_offsets[1:])
    flat: list[bytes] = list(itertools.chain.from_iterable(all_events))
    fast = _event_names_and_times_fast(flat)
    if fast is not None:
        names_array, times_array = fast
    else:
        events = [_LeanEventFromString(e) for e in flat]
        names_array = pa.array([e.name for e in events], type=pa.string())
        # a time beyond int64 (after the year 2262) is not a time: null
        times_array = pa.array(
            [e.time_unix_nano if e.time_unix_nano <= _INT64_MAX else None for e in events], type=pa.int64()
        )
    offsets = pa.array(span_offsets, type=pa.int32())
    names_column = pa.ListArray.from_arrays(offsets, names_array, type=pa.list_(pa.string()))
    times_column = pa.ListArray.from_arrays(offsets, times_array, type=pa.list_(pa.int64()))

    event_hints: list[str | None] = [None] * rows
    if flat:
        unique_names = pc.unique(names_array).to_pylist()
        plain = _PLAIN_EVENT_NAMES
        hint_names = [n for n in unique_names if n not in plain and _is_hint_event(n)]
        if hint_names:
            is_hint = pc.is_in(names_array, value_set=pa.array(hint_names, type=pa.string()))
            event_rows = np.repeat(np.arange(rows), counts)
            hint_rows = np.unique(event_rows[is_hint.to_numpy(zero_copy_only=False)])
            for row in hint_rows.tolist():
                start, end = int(span_offsets[row]), int(span_offsets[row + 1])
                names = names_array.slice(start, end - start).to_pylist()
                event_hints[row] = _hint_events(all_events[row], names)
    return names_column, times_column, event_hints


def _event_names_and_times_fast(flat: list[bytes]) -> tuple[pa.Array, pa.Array] | None:
    """Names and times of serialized events in the ``0x09 <fixed64> 0x12 <len> <name>`` layout.

    None when any event has another layout, a name that is not UTF-8, or a time beyond int64.
    """
    count = len(flat)
    if count == 0:
        return pa.array([], type=pa.string()), pa.array([], type=pa.int64())
    lengths = np.fromiter(map(len, flat), dtype=np.int64, count=count)
    if int(lengths.min()) < 11:
        return None
    buffer = np.frombuffer(b"".join(flat), dtype=np.uint8)
    starts = np.zeros(count, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    name_lengths = buffer[starts + 10].astype(np.int64)
    if not (
        bool((buffer[starts] == 0x09).all())
        and bool((buffer[starts + 9] == 0x12).all())
        and bool((name_lengths < 0x80).all())
        and bool((11 + name_lengths <= lengths).all())
    ):
        return None
    times = buffer[(starts + 1)[:, None] + np.arange(8)].copy().view("<u8").ravel()
    if int(times.max()) > _INT64_MAX:
        return None
    name_offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(name_lengths, out=name_offsets[1:])
    total = int(name_offsets[-1])
    gather = np.repeat(starts + 11 - name_offsets[:-1], name_lengths) + np.arange(total, dtype=np.int64)
    names = pa.StringArray.from_buffers(
        count, pa.py_buffer(name_offsets.astype(np.int32)), pa.py_buffer(buffer[gather].tobytes())
    )
    try:
        names.validate(full=True)  # UTF-8, as the parsed message would have required
    except pa.ArrowInvalid:
        return None
    return names, pa.array(times.astype(np.int64), type=pa.int64())


def _links(links: Any, parent_id: bytes) -> tuple[list[str], bool]:
    texts = []
    follows = False
    for encoded in links:
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
    resource_attrs = _attributes_to_dict(resource.attributes)
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


def _decode_lean(msg: Any, ingested_ns: int) -> DecodeResult:
    kept: list[Any] = []  # valid lean spans, in row order
    # ids as raw bytes (validated); hex text is made for all rows at once (``_hex_ids``)
    trace_ids: list[bytes] = []
    span_ids: list[bytes] = []
    parent_ids: list[bytes] = []
    services: list[str] = []
    scope_names: list[str | None] = []
    hosts: list[str | None] = []
    resource_jsons: list[str] = []
    rejected = 0
    errors: list[str] = []

    # pass 1: validate ids, resource and scope columns
    for ri, resource_spans in enumerate(msg.resource_spans):
        service, host, resource_json = resource_columns(resource_spans.resource)
        resource_start = len(kept)
        for si, scope_spans in enumerate(resource_spans.scope_spans):
            scope_name = scope_name_of(scope_spans.scope)
            scope_start = len(kept)
            scope_list = list(scope_spans.spans)
            scope_trace_ids = [s.trace_id for s in scope_list]
            scope_span_ids = [s.span_id for s in scope_list]
            scope_parent_ids = [s.parent_span_id for s in scope_list]
            # the common case checked at C speed: every id well-formed, none all-zero, times in int64
            if (
                set(map(len, scope_trace_ids)) <= _TRACE_ID_LENGTHS
                and set(map(len, scope_span_ids)) <= _SPAN_ID_LENGTHS
                and set(map(len, scope_parent_ids)) <= _PARENT_ID_LENGTHS
                and _ZERO_TRACE_ID not in scope_trace_ids
                and _ZERO_SPAN_ID not in scope_span_ids
                and max((s.start_time_unix_nano for s in scope_list), default=0) <= _INT64_MAX
                and max((s.end_time_unix_nano for s in scope_list), default=0) <= _INT64_MAX
            ):
                kept.extend(scope_list)
                trace_ids.extend(scope_trace_ids)
                span_ids.extend(scope_span_ids)
                parent_ids.extend(scope_parent_ids)
                scope_names.extend([scope_name] * len(scope_list))
                continue
            for pi, span in enumerate(scope_list):
                problem = _span_problem(span)
                if problem is None:
                    kept.append(span)
                    trace_ids.append(span.trace_id)
                    span_ids.append(span.span_id)
                    parent_ids.append(span.parent_span_id)
                    continue
                rejected += 1
                if len(errors) < MAX_ERROR_MESSAGES:
                    errors.append(f"resourceSpans[{ri}].scopeSpans[{si}].spans[{pi}]: {problem}")
            scope_names.extend([scope_name] * (len(kept) - scope_start))
        count = len(kept) - resource_start
        services.extend([service] * count)
        hosts.extend([host] * count)
        resource_jsons.extend([resource_json] * count)

    rows = len(kept)
    # pass 2: plain fields, one comprehension per column (no per-row appends)
    statuses = [_status(s.status) for s in kept]
    kinds = [s.kind for s in kept]
    if kinds and (min(kinds) < KIND_MIN or max(kinds) > KIND_MAX):
        kinds = [k if KIND_MIN <= k <= KIND_MAX else KIND_UNSPECIFIED for k in kinds]
    status_codes = [st[0] for st in statuses]
    if status_codes and (min(status_codes) < STATUS_MIN or max(status_codes) > STATUS_MAX):
        status_codes = [c if STATUS_MIN <= c <= STATUS_MAX else STATUS_UNSET for c in status_codes]
    columns: dict[str, Any] = {
        "trace_id": _hex_ids(trace_ids, 16),
        "span_id": _hex_ids(span_ids, 8),
        "parent_span_id": _hex_ids(parent_ids, 8, empty_or_zero_is_null=True),
        "service": services,
        "name": [s.name for s in kept],
        "kind": kinds,
        "start_ns": [s.start_time_unix_nano for s in kept],
        "end_ns": [s.end_time_unix_nano for s in kept],
        "status_code": status_codes,
        "status_message": [st[1] for st in statuses],
        "scope_name": scope_names,
        "host": hosts,
    }

    # pass 3: attributes — only the key of each is looked at; values only for the keys that count
    semantic_values: list[list[Any]] = [[None] * rows for _ in _SEMANTIC_COLUMNS]
    semantic_priority: list[list[int]] = [[_NO_PRIORITY] * rows for _ in _SEMANTIC_COLUMNS]
    hints: list[str | None] = [None] * rows
    key_codes = _KEY_CODES
    classify = _classify_wire_key
    missing = -2
    value_cache = _SEMANTIC_VALUE_CACHE
    for row, attributes in enumerate([s.attributes for s in kept]):
        span_hints: dict[str, Any] | None = None
        # One rule for both decoders: per column, the value of the first attribute with the most
        # preferred key is read, and only that one — the others are never parsed, so a malformed
        # value under a less preferred key (http.status_code garbage beside a valid
        # http.response.status_code) is ignored whatever the order, as the C path does. Values
        # are therefore read after every key of the span has been seen.
        chosen: dict[int, tuple[bytes, int, int]] | None = None
        for encoded in attributes:
            # low-cardinality semantic attributes (method, route, status, peer...) repeat byte for
            # byte across spans: one lookup of the whole KeyValue gives column, priority and value
            cached = value_cache.get(encoded)
            if cached is not None:
                cached_code, value = cached
                if cached_code < 0:  # an attribute no column or hint uses
                    continue
                index = cached_code >> 4
                priorities = semantic_priority[index]
                if (cached_code & 15) < priorities[row]:
                    priorities[row] = cached_code & 15
                    semantic_values[index][row] = value
                continue
            # a serialized KeyValue starts 0x0a <key length> <key>: one dict lookup per key
            if len(encoded) >= 2 and encoded[0] == 0x0A and encoded[1] < 0x80:
                key_end = 2 + encoded[1]
                key = encoded[2:key_end]
                code = key_codes.get(key, missing)
                if code == missing:
                    code = classify(key)
            else:
                key_end = -1
                code = classify(_attribute_key(encoded).encode())
            if code is None:
                if len(encoded) <= _VALUE_CACHE_MAX_BYTES:
                    if len(value_cache) >= _MAX_CACHED_KEYS:
                        value_cache.clear()
                    value_cache[encoded] = _IGNORED_ATTRIBUTE
                continue
            if code == HINT_CODE:
                kv = _KeyValueFromString(encoded)
                if span_hints is None:
                    span_hints = {}
                span_hints[kv.key] = any_value_to_python(kv.value)
                continue
            index = code >> 4
            priorities = semantic_priority[index]
            if (code & 15) < priorities[row]:
                priorities[row] = code & 15
                if chosen is None:
                    chosen = {}
                chosen[index] = (encoded, key_end, code)
                semantic_values[index][row] = None  # read below, once the best key is known
        if chosen is not None:
            for index, (encoded, key_end, code) in chosen.items():
                if semantic_priority[index][row] != code & 15:
                    continue  # a cached value of a more preferred key came later
                value = _semantic_value(encoded, key_end, index)
                semantic_values[index][row] = value
                if len(encoded) <= _VALUE_CACHE_MAX_BYTES:
                    if len(value_cache) >= _MAX_CACHED_KEYS:
                        value_cache.clear()
                    value_cache[encoded] = (code, value)
        if span_hints is not None:
            hints[row] = json.dumps(span_hints, separators=(",", ":"))
    for index, column in enumerate(_SEMANTIC_COLUMNS):
        columns[column] = semantic_values[index]
    columns["hints"] = hints

    # pass 4: events and links
    all_events = [s.events for s in kept]
    columns["event_names"], columns["event_times_ns"], columns["event_hints"] = _event_columns(all_events)
    links_col: list[list[str]] = [[]] * rows
    follows: list[bool] = [False] * rows
    for row, span in enumerate(kept):
        if span.links:
            links_col[row], follows[row] = _links(span.links, span.parent_span_id)
    columns["links"] = links_col
    columns["follows_from"] = follows
    columns["resource_json"] = resource_jsons
    columns["raw"] = [s.SerializeToString() for s in kept]
    columns["ingested_ns"] = [ingested_ns] * rows
    arrays = [
        value if isinstance(value, pa.Array) else pa.array(value, type=f.type)
        for f, value in ((f, columns[f.name]) for f in SPAN_SCHEMA)
    ]
    table = pa.Table.from_arrays(arrays, schema=SPAN_SCHEMA)
    return DecodeResult(table=table, rejected=rejected, errors=errors)


def decode_traces_message(msg: Any, *, ingested_ns: int | None = None) -> DecodeResult:
    """Rows of an already-parsed ``TracesData`` or ``ExportTraceServiceRequest`` message."""
    return decode_export_request(msg.SerializeToString(), ingested_ns=ingested_ns)


# ---------------------------------------------------------------------------------------------
# protobuf bytes


def parse_traces_data(data: bytes) -> trace_pb2.TracesData:
    """Parse bytes of a ``TracesData`` / ``ExportTraceServiceRequest`` (the same wire format).

    Raises ``DecodeError`` for bytes that are not such a message.
    """
    msg = trace_pb2.TracesData()
    try:
        msg.ParseFromString(data)
    except _ProtobufDecodeError as exc:
        raise DecodeError(
            f"not an OTLP ExportTraceServiceRequest/TracesData protobuf message: {exc}"
        ) from exc
    return msg


def decode_export_request(
    data: bytes, *, ingested_ns: int | None = None, native: bool = True
) -> DecodeResult:
    """Rows of the bytes of an ``ExportTraceServiceRequest`` (or ``TracesData``).

    Raises ``DecodeError`` when the bytes are not such a message (also when an attribute, the
    resource or the scope inside it is malformed).

    The C scanner (``hourglass.collector.native_decode``) decodes the common shape; every other request
    (and every request when ``native`` is false or the extension is not built) goes through the
    pure-Python decoder below, which gives the same rows.
    """
    ns = time.time_ns() if ingested_ns is None else ingested_ns
    if native:
        from hourglass.collector.native_decode import decode_native

        result = decode_native(data, ns)
        if result is not None:
            return result
    lean = _LeanTracesDataEventBytes()
    try:
        _LeanTracesData().ParseFromString(data)  # validates the events' structure too
        lean.ParseFromString(data)
        return _decode_lean(lean, ns)
    except _ProtobufDecodeError as exc:
        raise DecodeError(
            f"not an OTLP ExportTraceServiceRequest/TracesData protobuf message: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------------
# OTLP JSON

_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")
_ID_FIELDS = (("traceId", "trace_id", 16), ("spanId", "span_id", 8), ("parentSpanId", "parent_span_id", 8))
_LINK_ID_FIELDS = (("traceId", "trace_id", 16), ("spanId", "span_id", 8))


def decode_json_id(text: Any, size: int) -> bytes:
    """An OTLP JSON id: hex per the OTLP spec, or base64 (protobuf's default JSON mapping).

    Order: exact-length hex, then base64 decoding to exactly ``size`` bytes, then hex with its
    leading zeros dropped (seen in Jaeger exports). Empty text is an empty id. Anything else raises
    ``ValueError`` saying why.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a hex or base64 string, got {type(text).__name__}")
    if text == "":
        return b""
    is_hex = bool(_HEX_RE.match(text))
    if is_hex and len(text) == 2 * size:
        return bytes.fromhex(text)
    try:
        decoded = base64.b64decode(
            text + "=" * (-len(text) % 4),
            altchars=b"-_" if "-" in text or "_" in text else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is not None and len(decoded) == size:
        return decoded
    if is_hex and len(text) < 2 * size:
        return bytes.fromhex(text.rjust(2 * size, "0"))
    if is_hex:
        raise ValueError(f"{text!r} is {len(text)} hex characters, expected {2 * size}")
    raise ValueError(f"{text!r} is neither {2 * size} hex characters nor base64 of {size} bytes")


def _get(obj: dict[str, Any], camel: str, snake: str) -> Any:
    value = obj.get(camel)
    return obj.get(snake) if value is None else value


def _normalise_ids(
    span: dict[str, Any], path: str, fields: tuple[tuple[str, str, int], ...]
) -> dict[str, Any]:
    """A shallow copy of ``span`` with its id fields as base64 (what protobuf's JSON parser reads)."""
    out = dict(span)
    for camel, snake, size in fields:
        for key in (camel, snake):
            if key in out and out[key] is not None:
                try:
                    raw = decode_json_id(out[key], size)
                except ValueError as exc:
                    raise DecodeError(f"{path}.{camel}: {exc}") from None
                out[key] = base64.b64encode(raw).decode("ascii")
    return out


def _require_list(value: Any, path: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DecodeError(f"{path}: expected a list, got {type(value).__name__}")
    return value


def _require_dict(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DecodeError(f"{path}: expected an object, got {type(value).__name__}")
    return value


def _parse_into(obj: Any, message: Any, path: str) -> None:
    try:
        json_format.ParseDict(obj, message, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"{path}: {exc}") from None


# Fast path for OTLP JSON spans (added by the trace-file import): ``json_format.ParseDict`` is pure
# Python and costs ~250 µs for a span with a handful of attributes and an event; building the
# messages through their (C, upb) constructors costs a small fraction of that. The fast path takes
# only the common camelCase shape with scalar attribute values and returns None for anything else
# (snake_case keys, arrays, kvlists, bytes, odd types), which then goes through ParseDict and gets its
# exact error messages. A test checks both paths serialize to the same bytes.
_SPAN_KINDS: dict[str, int] = dict(trace_pb2.Span.SpanKind.items())
_STATUS_CODES: dict[str, int] = dict(trace_pb2.Status.StatusCode.items())
_FAST_SPAN_KEYS = frozenset(
    {
        "traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano", "endTimeUnixNano",
        "attributes", "events", "links", "status", "traceState", "flags",
        "droppedAttributesCount", "droppedEventsCount", "droppedLinksCount",
    }
)  # fmt: skip
_FAST_EVENT_KEYS = frozenset({"timeUnixNano", "name", "attributes", "droppedAttributesCount"})
_FAST_LINK_KEYS = frozenset(
    {"traceId", "spanId", "traceState", "attributes", "droppedAttributesCount", "flags"}
)
_INT_TEXT = re.compile(r"-?[0-9]+")


class _NotFast(Exception):
    """The fast path does not handle this input; ParseDict does."""


def _fast_int(value: Any) -> int:
    if type(value) is int:
        return value
    if type(value) is str and _INT_TEXT.fullmatch(value):
        return int(value)
    raise _NotFast


def _fast_enum(value: Any, names: dict[str, int]) -> int:
    if type(value) is int:
        return value
    if type(value) is str and value in names:
        return names[value]
    raise _NotFast


def _fast_attributes(items: Any) -> list[common_pb2.KeyValue]:
    if not items:
        if items is None or items == []:
            return []
        raise _NotFast
    if type(items) is not list:
        raise _NotFast
    out = []
    for kv in items:
        if type(kv) is not dict or not 1 <= len(kv) <= 2 or type(kv.get("key")) is not str:
            raise _NotFast
        if len(kv) == 1:
            out.append(common_pb2.KeyValue(key=kv["key"]))
            continue
        value = kv.get("value")
        if type(value) is not dict or len(value) > 1:
            raise _NotFast
        if not value:
            out.append(common_pb2.KeyValue(key=kv["key"], value=common_pb2.AnyValue()))
            continue
        ((kind, x),) = value.items()
        if kind == "arrayValue":
            if type(x) is not dict or not {"values"}.issuperset(x) or type(x.get("values", [])) is not list:
                raise _NotFast
            array = common_pb2.ArrayValue(values=[_fast_scalar(item) for item in x.get("values", [])])
            out.append(common_pb2.KeyValue(key=kv["key"], value=common_pb2.AnyValue(array_value=array)))
        else:
            out.append(common_pb2.KeyValue(key=kv["key"], value=_fast_scalar(value)))
    return out


def _fast_scalar(value: Any) -> common_pb2.AnyValue:
    """A scalar OTLP JSON ``AnyValue`` (string, int, bool, double, bytes); anything else is not fast."""
    if type(value) is not dict or len(value) != 1:
        raise _NotFast
    ((kind, x),) = value.items()
    if kind == "stringValue" and type(x) is str:
        return common_pb2.AnyValue(string_value=x)
    if kind == "intValue":
        return common_pb2.AnyValue(int_value=_fast_int(x))
    if kind == "boolValue" and type(x) is bool:
        return common_pb2.AnyValue(bool_value=x)
    if kind == "doubleValue" and type(x) in (int, float):
        return common_pb2.AnyValue(double_value=x)
    if kind == "bytesValue" and type(x) is str:
        try:
            return common_pb2.AnyValue(bytes_value=base64.b64decode(x, validate=True))
        except (binascii.Error, ValueError):
            raise _NotFast from None
    raise _NotFast


def _fast_id(value: Any, size: int) -> bytes:
    try:
        return decode_json_id(value, size)
    except ValueError:
        raise _NotFast from None  # ParseDict's path reports the canonical message


def _fast_span(span: Any) -> trace_pb2.Span | None:
    """The span built through message constructors, or None when the input needs ParseDict."""
    if type(span) is not dict or not _FAST_SPAN_KEYS.issuperset(span):
        return None
    try:
        fields: dict[str, Any] = {
            "trace_id": _fast_id(span.get("traceId", ""), 16),
            "span_id": _fast_id(span.get("spanId", ""), 8),
            "attributes": _fast_attributes(span.get("attributes")),
        }
        if span.get("parentSpanId") is not None:
            fields["parent_span_id"] = _fast_id(span["parentSpanId"], 8)
        for key, field_name in (
            ("startTimeUnixNano", "start_time_unix_nano"),
            ("endTimeUnixNano", "end_time_unix_nano"),
            ("droppedAttributesCount", "dropped_attributes_count"),
            ("droppedEventsCount", "dropped_events_count"),
            ("droppedLinksCount", "dropped_links_count"),
            ("flags", "flags"),
        ):
            if span.get(key) is not None:
                fields[field_name] = _fast_int(span[key])
        for key, field_name in (("name", "name"), ("traceState", "trace_state")):
            if span.get(key) is not None:
                if type(span[key]) is not str:
                    raise _NotFast
                fields[field_name] = span[key]
        if span.get("kind") is not None:
            fields["kind"] = _fast_enum(span["kind"], _SPAN_KINDS)
        status = span.get("status")
        if status is not None:
            if type(status) is not dict or not {"code", "message"}.issuperset(status):
                raise _NotFast
            message = status.get("message")
            if message is not None and type(message) is not str:
                raise _NotFast
            code = status.get("code")
            status_msg = trace_pb2.Status(message=message or "")
            status_msg.code = _fast_enum(code, _STATUS_CODES) if code is not None else 0  # type: ignore[assignment]
            fields["status"] = status_msg
        events = span.get("events")
        if events:
            if type(events) is not list:
                raise _NotFast
            built_events = []
            for event in events:
                if type(event) is not dict or not _FAST_EVENT_KEYS.issuperset(event):
                    raise _NotFast
                name = event.get("name")
                if name is not None and type(name) is not str:
                    raise _NotFast
                time_ns = event.get("timeUnixNano")
                dropped = event.get("droppedAttributesCount")
                built_events.append(
                    trace_pb2.Span.Event(
                        time_unix_nano=_fast_int(time_ns) if time_ns is not None else 0,
                        name=name or "",
                        attributes=_fast_attributes(event.get("attributes")),
                        dropped_attributes_count=_fast_int(dropped) if dropped is not None else 0,
                    )
                )
            fields["events"] = built_events
        elif events not in (None, []):
            raise _NotFast
        links = span.get("links")
        if links:
            if type(links) is not list:
                raise _NotFast
            built_links = []
            for link in links:
                if type(link) is not dict or not _FAST_LINK_KEYS.issuperset(link):
                    raise _NotFast
                state = link.get("traceState")
                if state is not None and type(state) is not str:
                    raise _NotFast
                link_fields: dict[str, Any] = {
                    "trace_id": _fast_id(link.get("traceId", ""), 16),
                    "span_id": _fast_id(link.get("spanId", ""), 8),
                    "trace_state": state or "",
                    "attributes": _fast_attributes(link.get("attributes")),
                }
                for key, field_name in (
                    ("droppedAttributesCount", "dropped_attributes_count"),
                    ("flags", "flags"),
                ):
                    if link.get(key) is not None:
                        link_fields[field_name] = _fast_int(link[key])
                built_links.append(trace_pb2.Span.Link(**link_fields))
            fields["links"] = built_links
        elif links not in (None, []):
            raise _NotFast
        return trace_pb2.Span(**fields)
    except (_NotFast, ValueError, TypeError, OverflowError):
        return None


def otlp_json_to_message(obj: dict[str, Any], *, errors: list[str] | None = None) -> trace_pb2.TracesData:
    """OTLP JSON (``TracesData`` or ``ExportTraceServiceRequest``) → a ``TracesData`` message.

    Accepts hex or base64 IDs, nanoseconds as integers or strings, enums as numbers or names,
    camelCase or snake_case keys, and the pre-1.0 ``instrumentationLibrarySpans`` naming.

    A bad span (undecodable id, a field of the wrong type) raises ``DecodeError`` with its path,
    e.g. ``resourceSpans[0].scopeSpans[1].spans[3].traceId: 'zzz' is neither hex nor base64`` —
    unless ``errors`` is given: then the span is left out, the reason appended to ``errors``, and
    the good spans beside it are kept. A bad resource or scope always raises.
    """
    root = _require_dict(obj, "$")
    message = trace_pb2.TracesData()
    resource_list = _require_list(_get(root, "resourceSpans", "resource_spans"), "resourceSpans")
    for ri, rs_obj in enumerate(resource_list):
        rs_path = f"resourceSpans[{ri}]"
        rs_dict = _require_dict(rs_obj, rs_path)
        rs_msg = message.resource_spans.add()
        if rs_dict.get("resource") is not None:
            _parse_into(rs_dict["resource"], rs_msg.resource, f"{rs_path}.resource")
        schema_url = _get(rs_dict, "schemaUrl", "schema_url")
        if isinstance(schema_url, str):
            rs_msg.schema_url = schema_url
        scope_list_obj = _get(rs_dict, "scopeSpans", "scope_spans")
        if scope_list_obj is None:
            scope_list_obj = _get(rs_dict, "instrumentationLibrarySpans", "instrumentation_library_spans")
        for si, ss_obj in enumerate(_require_list(scope_list_obj, f"{rs_path}.scopeSpans")):
            ss_path = f"{rs_path}.scopeSpans[{si}]"
            ss_dict = _require_dict(ss_obj, ss_path)
            ss_msg = rs_msg.scope_spans.add()
            scope = ss_dict.get("scope")
            if scope is None:
                scope = _get(ss_dict, "instrumentationLibrary", "instrumentation_library")
            if scope is not None:
                _parse_into(scope, ss_msg.scope, f"{ss_path}.scope")
            ss_schema_url = _get(ss_dict, "schemaUrl", "schema_url")
            if isinstance(ss_schema_url, str):
                ss_msg.schema_url = ss_schema_url
            for pi, span_obj in enumerate(_require_list(ss_dict.get("spans"), f"{ss_path}.spans")):
                span_path = f"{ss_path}.spans[{pi}]"
                fast = _fast_span(span_obj)
                if fast is not None:
                    ss_msg.spans.append(fast)
                    continue
                try:
                    span_dict = _normalise_ids(_require_dict(span_obj, span_path), span_path, _ID_FIELDS)
                    links = span_dict.get("links")
                    if links is not None:
                        span_dict["links"] = [
                            _normalise_ids(
                                _require_dict(link, f"{span_path}.links[{li}]"),
                                f"{span_path}.links[{li}]",
                                _LINK_ID_FIELDS,
                            )
                            for li, link in enumerate(_require_list(links, f"{span_path}.links"))
                        ]
                    span_msg = trace_pb2.Span()
                    _parse_into(span_dict, span_msg, span_path)
                except DecodeError as exc:
                    if errors is None:
                        raise
                    errors.append(str(exc))
                    continue
                ss_msg.spans.append(span_msg)
    return message


def decode_otlp_json(obj: dict[str, Any], *, ingested_ns: int | None = None) -> DecodeResult:
    """Rows of OTLP JSON; spans that cannot be parsed are rejected with their path, the rest kept."""
    json_errors: list[str] = []
    message = otlp_json_to_message(obj, errors=json_errors)
    result = decode_traces_message(message, ingested_ns=ingested_ns)
    if json_errors:
        result.rejected += len(json_errors)
        result.errors = (json_errors + result.errors)[:MAX_ERROR_MESSAGES]
    return result


# ---------------------------------------------------------------------------------------------
# responses (the receivers serialize through these so that pb2 stays here)


def export_response(rejected: int = 0, error_message: str = "", *, as_json: bool = False) -> bytes:
    """An ``ExportTraceServiceResponse``; ``partial_success`` is set only when spans were rejected."""
    response = trace_service_pb2.ExportTraceServiceResponse()
    if rejected or error_message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = error_message
    if as_json:
        return json.dumps(json_format.MessageToDict(response)).encode()
    return response.SerializeToString()


def rpc_status(
    code: int, message: str, *, retry_after_s: float | None = None, as_json: bool = False
) -> bytes:
    """A ``google.rpc.Status`` (the OTLP/HTTP error body), with ``RetryInfo`` when retry is advised.

    ``code`` is a ``google.rpc.Code`` number (3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE...).
    """
    status = status_pb2.Status(message=message)
    status.code = code
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
        status.details.add().Pack(retry)
    if as_json:
        return json.dumps(json_format.MessageToDict(status)).encode()
    return status.SerializeToString()


def status_details_with_retry(code: int, message: str, retry_after_s: float) -> bytes:
    """Bytes for gRPC trailing metadata ``grpc-status-details-bin`` (a Status holding RetryInfo)."""
    return rpc_status(code, message, retry_after_s=retry_after_s)


RPC_CODE_INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
RPC_CODE_RESOURCE_EXHAUSTED = code_pb2.RESOURCE_EXHAUSTED
RPC_CODE_UNAVAILABLE = code_pb2.UNAVAILABLE
RPC_CODE_UNAUTHENTICATED = code_pb2.UNAUTHENTICATED


def add_health_service(server: Any) -> Any:
    """Register the standard ``grpc.health.v1.Health`` service on a grpc server; returns the servicer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(
        "opentelemetry.proto.collector.trace.v1.TraceService", health_pb2.HealthCheckResponse.SERVING
    )
    return servicer


# -- the stored raw span, read back (the Jaeger query API, tag search) ----------------------------

TypedValue = tuple[str, Any]  # (Jaeger value type: string|bool|int64|float64|binary, value)


def typed_value(value: common_pb2.AnyValue) -> TypedValue:
    """An OTLP ``AnyValue`` as a Jaeger-typed value: bytes as base64 ``binary``; arrays and
    key-value lists as their JSON text (Jaeger tags have no composite type, as in the Collector's
    OTLP→Jaeger translator)."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return "string", value.string_value
    if kind == "bool_value":
        return "bool", value.bool_value
    if kind == "int_value":
        return "int64", value.int_value
    if kind == "double_value":
        return "float64", value.double_value
    if kind == "bytes_value":
        return "binary", base64.b64encode(value.bytes_value).decode("ascii")
    if kind is None:
        return "string", ""
    return "string", json.dumps(any_value_to_python(value), separators=(",", ":"))


@dataclass
class SpanDetails:
    """What a stored span keeps only in its ``raw`` bytes: attributes, events and links."""

    attributes: list[tuple[str, TypedValue]]
    events: list[tuple[int, str, list[tuple[str, TypedValue]]]]  # (time_ns, name, attributes)
    links: list[tuple[str, str, list[tuple[str, TypedValue]]]]  # (trace_id hex, span_id hex, attributes)
    trace_state: str = ""


def span_details(raw: bytes | None) -> SpanDetails:
    """Parse the serialized OTLP ``Span`` of a stored row (``raw`` column; empty when absent)."""
    span = trace_pb2.Span.FromString(raw or b"")
    return SpanDetails(
        attributes=[(kv.key, typed_value(kv.value)) for kv in span.attributes],
        events=[
            (int(e.time_unix_nano), e.name, [(kv.key, typed_value(kv.value)) for kv in e.attributes])
            for e in span.events
        ],
        links=[
            (
                link.trace_id.hex(),
                link.span_id.hex(),
                [(kv.key, typed_value(kv.value)) for kv in link.attributes],
            )
            for link in span.links
        ],
        trace_state=span.trace_state,
    )
