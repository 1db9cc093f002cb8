"""OTLP messages → span rows (``collector.schema.SPAN_SCHEMA``): the only module that imports ``*_pb2``.

Every source ends here: the gRPC and HTTP receivers pass raw request bytes, the trace-file readers
build (or parse) ``TracesData`` messages. The decoder is the mirror of the SDK's pure encode
functions: one function per input shape, no state besides small caches.

Rules (see ``collector/schema.py`` for the columns):

- IDs become lowercase hex. A span whose trace id is not 16 bytes, whose span id is not 8 bytes,
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
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError as _ProtobufDecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from collector.schema import (
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
# attribute-key classification cache: key -> None (ignore) | (column, priority) | _HINT
_HINT = ("__hint__", 0)
_KEY_CLASS: dict[str, tuple[str, int] | None] = {}
_MISSING = ("__missing__", -1)
_MAX_CACHED_KEYS = 100_000  # unbounded key cardinality must not grow memory without limit


def _classify_key(key: str) -> tuple[str, int] | None:
    cached = _KEY_CLASS.get(key, _MISSING)
    if cached is not _MISSING:
        return cached
    mapped = ATTRIBUTE_KEY_TO_COLUMN.get(key)
    if mapped is not None:
        result: tuple[str, int] | None = mapped
    elif HINT_KEY_PATTERN.search(key):
        result = _HINT
    else:
        result = None
    if len(_KEY_CLASS) >= _MAX_CACHED_KEYS:
        _KEY_CLASS.clear()
    _KEY_CLASS[key] = result
    return result


_KEY_CLASS_BYTES: dict[bytes, tuple[str, int] | None] = {}


def _classify_encoded_key(key: bytes) -> tuple[str, int] | None:
    result = _classify_key(key.decode("utf-8", "replace"))
    if len(_KEY_CLASS_BYTES) >= _MAX_CACHED_KEYS:
        _KEY_CLASS_BYTES.clear()
    _KEY_CLASS_BYTES[key] = result
    return result


_EVENT_CLASS: dict[str, bool] = {}


def _is_hint_event(name: str) -> bool:
    hit = _EVENT_CLASS.get(name)
    if hit is None:
        hit = bool(HINT_EVENT_PATTERN.search(name))
        if len(_EVENT_CLASS) >= _MAX_CACHED_KEYS:
            _EVENT_CLASS.clear()
        _EVENT_CLASS[name] = hit
    return hit


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
        if kind == "int_value":
            return value.int_value
        if kind == "string_value" and value.string_value.strip().isdigit():
            return int(value.string_value)
        if kind == "double_value":
            return int(value.double_value)
        return None
    if kind == "string_value":
        return value.string_value
    if kind is None:
        return None
    converted = any_value_to_python(value)
    return converted if isinstance(converted, str) else json.dumps(converted)


def _id_problem(trace_id: bytes, span_id: bytes, parent_id: bytes) -> str | None:
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
    return None


_SEMANTIC_COLUMNS = tuple(SEMANTIC_ATTRIBUTE_COLUMNS)


# ---------------------------------------------------------------------------------------------
# The lean view: a wire-compatible mirror of TracesData whose resources, scopes, attributes and
# links stay undecoded ``bytes``. Parsing it costs ~0.1 µs/span against ~0.7 µs for the full
# message, iterating attributes yields plain bytes instead of KeyValue wrappers, and
# ``SerializeToString`` of a lean span gives exactly the bytes of the OTLP ``Span``.


def _build_lean_classes() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="hourglass/lean_trace.proto", package="hourglass.lean", syntax="proto3"
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
            ("events", 11, m, True, "Event"),
            ("dropped_events_count", 12, u32, False, None),
            ("links", 13, b, True, None),
            ("dropped_links_count", 14, u32, False, None),
            ("status", 15, m, False, "Status"),
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
                f.type_name = f".hourglass.lean.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"hourglass.lean.{name}"))
        for name in layout
    }


_LEAN = _build_lean_classes()
_LeanTracesData = _LEAN["TracesData"]
_KeyValue = common_pb2.KeyValue
_KeyValueFromString = common_pb2.KeyValue.FromString


def _attribute_key(encoded: bytes) -> str:
    """The key of a serialized ``KeyValue`` (the slow path: long keys or unusual field order)."""
    return _KeyValueFromString(encoded).key


def _string_or_parse(encoded: bytes, key_end: int) -> Any:
    """Fast path for ``KeyValue{key, value{string_value}}`` with short lengths; None otherwise."""
    # layout after the key: 0x12 <len> 0x0a <len> <utf-8>
    if len(encoded) > key_end + 3 and encoded[key_end] == 0x12 and encoded[key_end + 2] == 0x0A:
        value_len = encoded[key_end + 1]
        text_len = encoded[key_end + 3]
        if value_len < 0x80 and text_len < 0x80 and value_len == text_len + 2:
            return encoded[key_end + 4 : key_end + 4 + text_len].decode("utf-8", "replace")
    return None


def _decode_lean(msg: Any, ingested_ns: int) -> DecodeResult:
    trace_ids: list[str] = []
    span_ids: list[str] = []
    parent_ids: list[str | None] = []
    services: list[str] = []
    names: list[str] = []
    kinds: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    status_codes: list[int] = []
    status_messages: list[str | None] = []
    scope_names: list[str | None] = []
    hosts: list[str | None] = []
    event_names: list[list[str]] = []
    event_times: list[list[int]] = []
    links_col: list[list[str]] = []
    follows: list[bool] = []
    resource_jsons: list[str] = []
    raws: list[bytes] = []
    # sparse columns: (row, value); most spans carry none of these
    semantic: dict[str, list[tuple[int, Any]]] = {c: [] for c in _SEMANTIC_COLUMNS}
    hints_sparse: list[tuple[int, str]] = []
    event_hints_sparse: list[tuple[int, str]] = []
    rejected = 0
    errors: list[str] = []

    key_class = _KEY_CLASS_BYTES
    classify = _classify_encoded_key
    hint = _HINT
    missing: Any = _MISSING
    empty: list[Any] = []
    row = 0
    for ri, resource_spans in enumerate(msg.resource_spans):
        resource = resource_pb2.Resource.FromString(resource_spans.resource)
        resource_attrs = _attributes_to_dict(resource.attributes)
        service_value = resource_attrs.get("service.name")
        service = str(service_value) if service_value not in (None, "") else UNKNOWN_SERVICE
        host: str | None = None
        for host_key in HOST_RESOURCE_KEYS:
            host_value = resource_attrs.get(host_key)
            if host_value not in (None, ""):
                host = str(host_value)
                break
        resource_json = json.dumps(resource_attrs, separators=(",", ":"))
        resource_start = row
        for si, scope_spans in enumerate(resource_spans.scope_spans):
            scope_name = common_pb2.InstrumentationScope.FromString(scope_spans.scope).name or None
            scope_start = row
            for pi, span in enumerate(scope_spans.spans):
                trace_id = span.trace_id
                span_id = span.span_id
                parent_id = span.parent_span_id
                if len(trace_id) != 16 or len(span_id) != 8 or (parent_id and len(parent_id) != 8):
                    problem = _id_problem(trace_id, span_id, parent_id)
                else:
                    problem = None if any(trace_id) and any(span_id) else _id_problem(trace_id, span_id, b"")
                if problem is not None:
                    rejected += 1
                    if len(errors) < MAX_ERROR_MESSAGES:
                        errors.append(f"resourceSpans[{ri}].scopeSpans[{si}].spans[{pi}]: {problem}")
                    continue
                trace_ids.append(trace_id.hex())
                span_ids.append(span_id.hex())
                parent_ids.append(parent_id.hex() if parent_id else None)
                names.append(span.name)
                kinds.append(span.kind)
                starts.append(span.start_time_unix_nano)
                ends.append(span.end_time_unix_nano)
                status = span.status
                status_codes.append(status.code)
                status_messages.append(status.message or None)

                found: dict[str, tuple[int, Any]] | None = None
                span_hints: dict[str, Any] | None = None
                for encoded in span.attributes:
                    # serialized KeyValue: 0x0a <key length> <key> ...; one dict lookup per attribute
                    if encoded[0] == 0x0A and encoded[1] < 0x80:
                        key_end = 2 + encoded[1]
                        key_bytes = encoded[2:key_end]
                        cls = key_class.get(key_bytes, missing)
                        if cls is missing:
                            cls = classify(key_bytes)
                    else:
                        key_end = -1
                        cls = classify(_attribute_key(encoded).encode())
                    if cls is None:
                        continue
                    if cls is hint:
                        kv = _KeyValueFromString(encoded)
                        if span_hints is None:
                            span_hints = {}
                        span_hints[kv.key] = any_value_to_python(kv.value)
                        continue
                    column, priority = cls
                    if found is None:
                        found = {}
                    previous = found.get(column)
                    if previous is None or priority < previous[0]:
                        value = (
                            _string_or_parse(encoded, key_end)
                            if key_end > 0 and column != "http_status_code"
                            else None
                        )
                        if value is None:
                            value = _column_value(column, _KeyValueFromString(encoded).value)
                        found[column] = (priority, value)
                if found is not None:
                    for column, (_, value) in found.items():
                        semantic[column].append((row, value))
                if span_hints is not None:
                    hints_sparse.append((row, json.dumps(span_hints, separators=(",", ":"))))

                events = span.events
                if events:
                    names_of_events = [e.name for e in events]
                    event_names.append(names_of_events)
                    event_times.append([e.time_unix_nano for e in events])
                    hint_events = None
                    for index, event_name in enumerate(names_of_events):
                        if _is_hint_event(event_name):
                            event = events[index]
                            attributes: dict[str, Any] = {}
                            for encoded in event.attributes:
                                kv = _KeyValueFromString(encoded)
                                if kv.key not in DROPPED_EVENT_ATTRIBUTES:
                                    attributes[kv.key] = any_value_to_python(kv.value)
                            if hint_events is None:
                                hint_events = []
                            hint_events.append(
                                {
                                    "name": event_name,
                                    "time_ns": event.time_unix_nano,
                                    "attributes": attributes,
                                }
                            )
                    if hint_events is not None:
                        event_hints_sparse.append((row, json.dumps(hint_events, separators=(",", ":"))))
                else:
                    event_names.append(empty)
                    event_times.append(empty)

                links = span.links
                if links:
                    link_texts = []
                    is_follows = False
                    for encoded in links:
                        link = trace_pb2.Span.Link.FromString(encoded)
                        link_texts.append(f"{link.trace_id.hex()}:{link.span_id.hex()}")
                        if parent_id and link.span_id == parent_id:
                            for kv in link.attributes:
                                if (
                                    kv.key == FOLLOWS_FROM_LINK_ATTRIBUTE[0]
                                    and kv.value.string_value.lower() == FOLLOWS_FROM_LINK_ATTRIBUTE[1]
                                ):
                                    is_follows = True
                    links_col.append(link_texts)
                    follows.append(is_follows)
                else:
                    links_col.append(empty)
                    follows.append(False)
                raws.append(span.SerializeToString())
                row += 1
            scope_names.extend([scope_name] * (row - scope_start))
        count = row - resource_start
        services.extend([service] * count)
        hosts.extend([host] * count)
        resource_jsons.extend([resource_json] * count)
    columns: dict[str, Any] = {
        "trace_id": trace_ids,
        "span_id": span_ids,
        "parent_span_id": parent_ids,
        "service": services,
        "name": names,
        "kind": kinds,
        "start_ns": starts,
        "end_ns": ends,
        "status_code": status_codes,
        "status_message": status_messages,
        "scope_name": scope_names,
        "host": hosts,
    }
    for column in _SEMANTIC_COLUMNS:
        columns[column] = _fill_sparse(row, semantic[column])
    columns["hints"] = _fill_sparse(row, hints_sparse)
    columns["event_names"] = event_names
    columns["event_times_ns"] = event_times
    columns["event_hints"] = _fill_sparse(row, event_hints_sparse)
    columns["links"] = links_col
    columns["follows_from"] = follows
    columns["resource_json"] = resource_jsons
    columns["raw"] = raws
    columns["ingested_ns"] = [ingested_ns] * row
    arrays = [pa.array(columns[f.name], type=f.type) for f in SPAN_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=SPAN_SCHEMA)
    return DecodeResult(table=table, rejected=rejected, errors=errors)


def decode_traces_message(msg: Any, *, ingested_ns: int | None = None) -> DecodeResult:
    """Rows of an already-parsed ``TracesData`` or ``ExportTraceServiceRequest`` message."""
    return decode_export_request(msg.SerializeToString(), ingested_ns=ingested_ns)


def _fill_sparse(length: int, sparse: list[tuple[int, Any]]) -> list[Any]:
    out: list[Any] = [None] * length
    for index, value in sparse:
        out[index] = value
    return out


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


def decode_export_request(data: bytes, *, ingested_ns: int | None = None) -> DecodeResult:
    """Rows of the bytes of an ``ExportTraceServiceRequest`` (or ``TracesData``).

    Raises ``DecodeError`` when the bytes are not such a message (also when an attribute, the
    resource or the scope inside it is malformed).
    """
    lean = _LeanTracesData()
    try:
        lean.ParseFromString(data)
        return _decode_lean(lean, time.time_ns() if ingested_ns is None else ingested_ns)
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
    status = status_pb2.Status(code=code, message=message)
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
