"""The stored raw span, read back: attributes, events and links with Jaeger-typed values.

A span row keeps its serialized OTLP ``Span`` in the ``raw`` column; the trace queries
(``trace_query``) and the Jaeger query API read what the columns do not hold from here.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector.decode_parts import any_value_to_python

__all__ = ["SpanDetails", "TypedValue", "span_details", "typed_value"]

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
