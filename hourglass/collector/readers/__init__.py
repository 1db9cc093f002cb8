"""Trace-file readers: one module per format, each turning parsed records into OTLP data.

Every format ends in :mod:`hourglass.collector.decode` so that all sources produce the same span rows with
the raw span kept losslessly:

- :mod:`hourglass.collector.readers.otlp_json` — OTLP JSON (``TracesData`` / ``ExportTraceServiceRequest``),
  also one per line (the Collector file exporter's default JSON Lines output);
- :mod:`hourglass.collector.readers.otlp_proto` — OTLP protobuf, one message or the file exporter's
  ``format: proto`` stream (each message preceded by its length as a 4-byte big-endian integer);
- :mod:`hourglass.collector.readers.jaeger` — Jaeger JSON (query API ``{"data": [...]}``, one trace object as
  the UI downloads it, and the Jaeger model proto-JSON with base64 ids and RFC 3339 times);
- :mod:`hourglass.collector.readers.zipkin` — Zipkin v2 JSON (a list of spans, or a list of traces).

Jaeger and Zipkin readers build OTLP-JSON-shaped dicts (hex ids, nanosecond strings, typed
attribute values) and hand them to ``decode_otlp_json``. Problems are reported as
:class:`RecordProblem` with a position (a JSON path such as ``data[0].spans[3].spanID``); the
record is skipped (``skipped=True``) or kept with what is known (``skipped=False``, a warning).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from hourglass.collector.decode_common import parse_id

__all__ = [
    "ConvertedTraces",
    "InvalidRecord",
    "RecordProblem",
    "ResourceGroups",
    "check_time_ns",
    "join_path",
    "normalize_id",
    "otlp_attribute",
    "otlp_value",
]


@dataclass(frozen=True)
class RecordProblem:
    """Something wrong with one record: where (a JSON path, line or byte offset) and why."""

    position: str
    reason: str
    skipped: bool = True  # False: the record was kept with what is known (a warning)


class InvalidRecord(ValueError):
    """A record that cannot be converted; ``field`` is the path suffix naming the bad field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


@dataclass
class ConvertedTraces:
    """OTLP JSON ``TracesData`` built from a non-OTLP format, with the problems met on the way."""

    traces_data: dict[str, Any]
    records: int = 0  # spans seen in the input, kept or not
    problems: list[RecordProblem] = field(default_factory=list)


def join_path(prefix: str, suffix: str) -> str:
    """``join_path("data[0]", "spans[3]") == "data[0].spans[3]"``; index suffixes attach directly."""
    if not prefix:
        return suffix
    if not suffix:
        return prefix
    if suffix.startswith("["):
        return prefix + suffix
    return f"{prefix}.{suffix}"


def normalize_id(value: Any, size: int, *, expect: str = "hex", accept_short: bool = False) -> str:
    """An id as ``2*size`` lowercase hex characters, read by the decoders' id parser
    (``decode_common.parse_id``) with the readers' rules on top:

    - ``expect="hex"`` (Zipkin, Jaeger UI JSON): a hex string of at most ``2*size`` characters is
      left-padded with zeros (Jaeger drops leading zeros: a 31-character trace id; a 16-character,
      64-bit trace id becomes 128-bit with the high half zero). Base64 is tried only when the text
      is not hex.
    - ``expect="base64"`` (Jaeger model proto-JSON): base64 (standard or URL-safe, padding
      optional) first, then hex.
    - ``accept_short`` allows a base64 id shorter than ``size`` bytes (a 64-bit trace id, 8 bytes),
      left-padded with zero bytes.
    - Integers (Jaeger thrift-style numeric ids) are taken as unsigned big-endian values.
    - Surrounding whitespace is ignored; an empty or all-zero id is invalid (OTLP: "no id").
    """
    width = 2 * size
    if isinstance(value, bool):
        raise InvalidRecord("", f"expected an id string, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            value += 1 << 64  # thrift i64 reinterpretation
        if not 0 < value < (1 << (8 * size)):
            raise InvalidRecord("", f"numeric id {value} out of range for {size} bytes")
        return format(value, f"0{width}x")
    text = value.strip() if isinstance(value, str) else value
    if text == "":
        raise InvalidRecord("", "empty id")
    try:
        raw = parse_id(text, size, hex_first=expect == "hex", short_base64=accept_short)
    except ValueError as exc:
        raise InvalidRecord("", str(exc)) from None
    if not any(raw):
        raise InvalidRecord("", f"{text!r} is an all-zero id")
    return raw.hex()


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_time_ns(value: int, field: str) -> int:
    """``value`` when it is a possible epoch time in nanoseconds (0 to 2^63-1), else InvalidRecord."""
    if not 0 <= value <= INT64_MAX:
        raise InvalidRecord(field, f"time {value} ns is out of range")
    return value


def otlp_value(value: Any) -> dict[str, Any]:
    """A Python value as an OTLP JSON ``AnyValue`` (int64 as a string, as protobuf JSON does;
    an integer beyond int64 is kept as its decimal text)."""
    if type(value) is str:  # by far the most common: Zipkin tags are all strings
        return {"stringValue": value}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return {"intValue": str(value)}
        return {"stringValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, (bytes, bytearray)):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [otlp_value(v) for v in value if not isinstance(v, (list, dict))]}}
    if value is None:
        return {}
    return {"stringValue": str(value)}


def otlp_attribute(key: str, value: Any) -> dict[str, Any]:
    if type(value) is str:
        return {"key": key, "value": {"stringValue": value}}
    return {"key": key, "value": otlp_value(value)}


class ResourceGroups:
    """Collects spans into ``resourceSpans`` entries, one per distinct resource, and within it one
    ``scopeSpans`` per instrumentation scope (the reader's own unless a span names one).

    ``key`` identifies the resource (e.g. service name plus process tags); the attributes are built
    only for the first span of each resource.
    """

    def __init__(self, scope_name: str) -> None:
        self._scope_name = scope_name
        self._spans_by_key: dict[Any, dict[tuple[str, str], list[dict[str, Any]]]] = {}
        self._resources: dict[Any, list[dict[str, Any]]] = {}

    def has(self, key: Any) -> bool:
        return key in self._resources

    def add_resource(self, key: Any, attributes: list[dict[str, Any]]) -> None:
        self._resources[key] = attributes
        self._spans_by_key[key] = {}

    def add_span(self, key: Any, span: dict[str, Any], scope: tuple[str, str] | None = None) -> None:
        """``scope``: (name, version) the span was recorded with (e.g. a Jaeger ``otel.scope.name``
        tag); default the reader's own scope."""
        self._spans_by_key[key].setdefault(scope or (self._scope_name, ""), []).append(span)

    def traces_data(self) -> dict[str, Any]:
        resource_spans = []
        for key, scopes in self._spans_by_key.items():
            scope_spans = []
            for (name, version), spans in scopes.items():
                if not spans:
                    continue
                scope: dict[str, Any] = {"name": name}
                if version:
                    scope["version"] = version
                scope_spans.append({"scope": scope, "spans": spans})
            if scope_spans:
                resource_spans.append(
                    {"resource": {"attributes": self._resources[key]}, "scopeSpans": scope_spans}
                )
        return {"resourceSpans": resource_spans}
