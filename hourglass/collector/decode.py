"""OTLP → span rows (``hourglass.collector.schema.SPAN_SCHEMA``): the one entry point of every source.

The gRPC and HTTP receivers pass raw request bytes, the trace-file readers build (or parse)
``TracesData`` messages or OTLP JSON. ``decode_export_request`` is the dispatcher: the C-backed
decoder (``native_decode``) takes the common shape of request, and every other request (or all of
them, when the extension is not built) goes through the pure-Python decoder (``decode_python``),
which gives the same rows and words every rejection and error. What both share (errors, the
result, the rules' constants, the id parser) is in ``decode_common``, the parts they read through
protobuf in ``decode_parts``; OTLP JSON becomes a message in ``decode_json``.

Rules (see ``hourglass/collector/schema.py`` for the columns):

- IDs become lowercase hex; an empty or all-zero parent id means a root span (null parent).
  A span whose trace id is not 16 bytes, whose span id is not 8 bytes,
  whose parent id is neither empty nor 8 bytes, or whose trace/span id is all zero is *rejected*:
  it is counted in ``DecodeResult.rejected`` with a reason naming its position
  (``resourceSpans[i].scopeSpans[j].spans[k]``) and the good spans beside it are kept.
- ``service`` is the resource's ``service.name`` (``unknown_service`` when absent), ``host`` the
  first of ``HOST_RESOURCE_KEYS``; ``resource_json`` (all resource attributes) is built once per
  ``ResourceSpans`` and repeated per row.
- Per attribute only the key is classified (cached); the value is read only for keys that map to a
  semantic column (per column, the first attribute of the most preferred key) or match
  ``HINT_KEY_PATTERN``.
- ``event_hints`` keeps the attributes of events whose name matches ``HINT_EVENT_PATTERN``
  (``exception.stacktrace`` is dropped: it is large and no detector reads it).
- ``follows_from`` is true when the span carries a link to its own parent whose attribute
  ``opentracing.ref_type`` is ``follows_from`` — the convention the OpenTelemetry Collector's
  Jaeger translator uses for FOLLOWS_FROM references; file readers for Jaeger/Zipkin use it too.
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf.message import DecodeError as _ProtobufDecodeError
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector import native_decode
from hourglass.collector.decode_common import MAX_ERROR_MESSAGES, NOT_A_REQUEST, DecodeError, DecodeResult
from hourglass.collector.decode_json import otlp_json_to_message
from hourglass.collector.decode_python import decode_python

__all__ = [
    "DecodeError",
    "DecodeResult",
    "decode_export_request",
    "decode_otlp_json",
    "decode_traces_message",
    "parse_traces_data",
]


def decode_export_request(
    data: bytes, *, ingested_ns: int | None = None, native: bool = True
) -> DecodeResult:
    """Rows of the bytes of an ``ExportTraceServiceRequest`` (or ``TracesData``).

    Raises ``DecodeError`` when the bytes are not such a message (also when an attribute, the
    resource or the scope inside it is malformed).

    The C-backed decoder takes the common shape; every other request (and every request when
    ``native`` is false or the extension is not built) goes through the pure-Python decoder,
    which gives the same rows.
    """
    ns = time.time_ns() if ingested_ns is None else ingested_ns
    if native:
        result = native_decode.decode_native(data, ns)
        if result is not None:
            return result
    return decode_python(data, ns)


def decode_traces_message(msg: Any, *, ingested_ns: int | None = None) -> DecodeResult:
    """Rows of an already-parsed ``TracesData`` or ``ExportTraceServiceRequest`` message."""
    return decode_export_request(msg.SerializeToString(), ingested_ns=ingested_ns)


def decode_otlp_json(obj: dict[str, Any], *, ingested_ns: int | None = None) -> DecodeResult:
    """Rows of OTLP JSON; spans that cannot be parsed are rejected with their path, the rest kept."""
    json_errors: list[str] = []
    message = otlp_json_to_message(obj, errors=json_errors)
    result = decode_traces_message(message, ingested_ns=ingested_ns)
    if json_errors:
        result.rejected += len(json_errors)
        result.errors = (json_errors + result.errors)[:MAX_ERROR_MESSAGES]
    return result


def parse_traces_data(data: bytes) -> trace_pb2.TracesData:
    """Parse bytes of a ``TracesData`` / ``ExportTraceServiceRequest`` (the same wire format).

    Raises ``DecodeError`` for bytes that are not such a message.
    """
    msg = trace_pb2.TracesData()
    try:
        msg.ParseFromString(data)
    except _ProtobufDecodeError as exc:
        raise DecodeError(f"{NOT_A_REQUEST}: {exc}") from exc
    return msg
