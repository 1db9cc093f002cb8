"""OTLP JSON (``TracesData`` or ``ExportTraceServiceRequest``) → a ``TracesData`` protobuf message.

The OTLP/HTTP receiver's JSON bodies and every trace-file format end here (Jaeger and Zipkin
readers build OTLP JSON first); the message is then decoded like protobuf bytes
(``hourglass.collector.decode.decode_otlp_json``). Ids go through the one id parser
(``decode_common.parse_id``).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector.decode_common import DecodeError, parse_id

__all__ = ["otlp_json_to_message"]

_ID_FIELDS = (("traceId", "trace_id", 16), ("spanId", "span_id", 8), ("parentSpanId", "parent_span_id", 8))
_LINK_ID_FIELDS = (("traceId", "trace_id", 16), ("spanId", "span_id", 8))


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
                    raw = parse_id(out[key], size)
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
    out = []
    for kv in _fast_items(items):
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


def _fast_count(value: Any) -> int:
    """An optional integer field: absent or null is 0."""
    return 0 if value is None else _fast_int(value)


def _fast_text(value: Any) -> str:
    """An optional string field: absent or null is empty."""
    if value is None:
        return ""
    if type(value) is not str:
        raise _NotFast
    return value


def _fast_items(items: Any) -> list[Any]:
    """An optional JSON list: absent or null is empty."""
    if not items:
        if items is None or items == []:
            return []
        raise _NotFast
    if type(items) is not list:
        raise _NotFast
    return items


def _fast_list(items: Any, keys: frozenset[str]) -> list[dict[str, Any]]:
    """An optional list of objects (events, links) with no key beside ``keys``; absent is empty."""
    items = _fast_items(items)
    for item in items:
        if type(item) is not dict or not keys.issuperset(item):
            raise _NotFast
    return items


def _fast_id(value: Any, size: int) -> bytes:
    try:
        return parse_id(value, size)
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
        events = _fast_list(span.get("events"), _FAST_EVENT_KEYS)
        if events:
            fields["events"] = [
                trace_pb2.Span.Event(
                    time_unix_nano=_fast_count(event.get("timeUnixNano")),
                    name=_fast_text(event.get("name")),
                    attributes=_fast_attributes(event.get("attributes")),
                    dropped_attributes_count=_fast_count(event.get("droppedAttributesCount")),
                )
                for event in events
            ]
        links = _fast_list(span.get("links"), _FAST_LINK_KEYS)
        if links:
            fields["links"] = [
                trace_pb2.Span.Link(
                    trace_id=_fast_id(link.get("traceId", ""), 16),
                    span_id=_fast_id(link.get("spanId", ""), 8),
                    trace_state=_fast_text(link.get("traceState")),
                    attributes=_fast_attributes(link.get("attributes")),
                    dropped_attributes_count=_fast_count(link.get("droppedAttributesCount")),
                    flags=_fast_count(link.get("flags")),
                )
                for link in links
            ]
        return trace_pb2.Span(**fields)
    except (_NotFast, ValueError, TypeError, OverflowError):
        return None


def otlp_json_to_message(obj: dict[str, Any], *, errors: list[str] | None = None) -> trace_pb2.TracesData:
    """OTLP JSON (``TracesData`` or ``ExportTraceServiceRequest``) → a ``TracesData`` message.

    Accepts hex or base64 IDs, nanoseconds as integers or strings, enums as numbers or names,
    camelCase or snake_case keys, and the pre-1.0 ``instrumentationLibrarySpans`` naming.

    A bad span (undecodable id, a field of the wrong type) raises ``DecodeError`` with its path,
    e.g. ``resourceSpans[0].scopeSpans[1].spans[3].traceId: 'zzz' is neither 32 hex characters nor base64 of 16 bytes`` —
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
