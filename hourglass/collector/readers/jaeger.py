"""Jaeger JSON → OTLP JSON (then :func:`hourglass.collector.decode.decode_otlp_json`).

Accepted shapes (detected from content, see :func:`is_jaeger_json`):

- the query API's ``{"data": [trace, ...]}`` (``/api/traces``), and a bare list of traces;
- one trace object as the Jaeger UI downloads it: ``{"traceID", "spans": [...], "processes": {...}}``;
- the Jaeger model proto-JSON (``api_v2`` ``Batch``/trace): ``{"spans": [...]}`` whose spans carry
  ``traceId``/``spanId`` in base64, ``startTime`` in RFC 3339, ``duration`` as a protobuf
  ``Duration`` string (``"22938000ns"`` or ``"0.022938s"``), tags as ``{key, vType, vStr|vInt64|...}``
  and an embedded ``process`` (or one ``process`` beside the spans).

Mapping (the OpenTelemetry Collector's Jaeger translator, with these choices):

- ``process.serviceName`` → resource ``service.name``; process tags → resource attributes
  (``hostname`` also as ``host.name`` so the ``host`` column is filled).
- Times: UI/query JSON ``startTime``/``duration``/log ``timestamp`` are integer microseconds;
  model JSON uses RFC 3339 and ``Duration`` strings. All become nanoseconds.
- Tags → attributes. ``span.kind`` → kind (absent: INTERNAL). ``otel.scope.name`` /
  ``otel.scope.version`` (or the older ``otel.library.*``) → the span's instrumentation scope
  (default ``hourglass.import.jaeger``). Status: ``otel.status_code``
  (``OK``/``ERROR``) wins; otherwise a true ``error`` tag means ERROR. ``otel.status_description``
  → status message. These three are not repeated as attributes (they live in the structured fields).
- Logs → events: the ``event`` field is the event name, the other fields its attributes.
- References: the parent is the first ``CHILD_OF`` reference within the same trace; without one,
  the first same-trace ``FOLLOWS_FROM`` reference is the parent and the span also carries a link to
  it with ``opentracing.ref_type=follows_from`` (``decode`` sets ``follows_from`` from that link).
  A ``CHILD_OF`` parent that also has a ``FOLLOWS_FROM`` reference is a follows-from parent too (the
  Collector's OTLP→Jaeger translator writes a follows-from parent so). Every other reference becomes a
  link with its ``opentracing.ref_type``, except a second reference to the parent itself. A reference to
  a span absent from the file stays as the parent id (analysis treats the span as an orphan).
  References to other traces never become the parent; a reference to the span itself is dropped
  with a warning (it would make the span its own parent).
- Duplicate span ids are kept (the store de-duplicates on read).
- A span whose ids or start time cannot be read is skipped with its JSON path; a bad reference is
  dropped with a warning and the span kept.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from hourglass.collector.readers import (
    ConvertedTraces,
    InvalidRecord,
    RecordProblem,
    ResourceGroups,
    check_time_ns,
    join_path,
    normalize_id,
    otlp_attribute,
)

__all__ = [
    "is_jaeger_json",
    "jaeger_api_errors",
    "jaeger_to_otlp_json",
    "jaeger_traces_to_otlp_json",
    "parse_duration_ns",
    "parse_rfc3339_ns",
]

SCOPE_NAME = "hourglass.import.jaeger"
_KINDS = {"internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
_STRUCTURED_TAGS = frozenset({"span.kind", "otel.status_code", "otel.status_description"})
# the instrumentation scope, as the Collector's OTLP->Jaeger translator writes it (and older names)
_SCOPE_NAME_TAGS = ("otel.scope.name", "otel.library.name")
_SCOPE_VERSION_TAGS = ("otel.scope.version", "otel.library.version")
REF_TYPE_KEY = "opentracing.ref_type"


def is_jaeger_json(obj: Any) -> bool:
    """True for the Jaeger JSON shapes this module reads (checked on the first span only)."""
    if isinstance(obj, dict):
        data = obj.get("data")
        if isinstance(data, list):
            return not data or (isinstance(data[0], dict) and "spans" in data[0])
        spans = obj.get("spans")
        if isinstance(spans, list) and "resourceSpans" not in obj:
            return not spans or _looks_like_jaeger_span(spans[0])
        return False
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        first = obj[0]
        return isinstance(first.get("spans"), list) and ("traceID" in first or "processes" in first)
    return False


def jaeger_api_errors(obj: Any) -> list[str]:
    """The ``errors`` of a saved Jaeger query API answer (``{"data": null, "errors": [{"code", "msg"}]}``)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("errors"), list) or "data" not in obj:
        return []
    out = []
    for error in obj["errors"]:
        if isinstance(error, dict):
            code = error.get("code")
            msg = error.get("msg") or error.get("message") or ""
            out.append(f"{msg} ({code})" if code is not None else str(msg))
        else:
            out.append(str(error))
    return out


def _looks_like_jaeger_span(span: Any) -> bool:
    return isinstance(span, dict) and "operationName" in span


# ---------------------------------------------------------------------------------------------
# times

_RFC3339 = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d{1,9})\d*)?"
    r"(?P<tz>[Zz]|[+-]\d{2}:?\d{2})?$"
)
_DURATION = re.compile(r"(?P<num>-?\d+(?:\.\d+)?)(?P<unit>ns|us|µs|ms|s|m|h)")
_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def parse_rfc3339_ns(text: str) -> int:
    """RFC 3339 / ISO 8601 timestamp (fraction up to nanoseconds, offset or Z) → epoch nanoseconds.

    A timestamp without an offset is taken as UTC.
    """
    match = _RFC3339.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not an RFC 3339 timestamp")
    tz = match.group("tz") or "+00:00"
    if tz in ("Z", "z"):
        tz = "+00:00"
    elif ":" not in tz:
        tz = f"{tz[:3]}:{tz[3:]}"
    moment = datetime.fromisoformat(match.group("base").replace("t", "T").replace(" ", "T") + tz)
    frac = (match.group("frac") or "").ljust(9, "0")
    return int(moment.timestamp()) * 1_000_000_000 + int(frac)


def parse_duration_ns(text: str) -> int:
    """A protobuf ``Duration`` JSON string (``"1.5s"``) or Go-style (``"22938000ns"``, ``"1m2.5s"``) → ns."""
    stripped = text.strip()
    total = 0.0
    pos = 0
    for match in _DURATION.finditer(stripped):
        if match.start() != pos:
            break
        total += float(match.group("num")) * _UNIT_NS[match.group("unit")]
        pos = match.end()
    if pos == 0 or pos != len(stripped):
        raise ValueError(f"{text!r} is not a duration like '22938000ns' or '0.022938s'")
    return round(total)


def _micros_to_ns(value: Any, field: str) -> int:
    if isinstance(value, bool):
        raise InvalidRecord(field, f"expected microseconds, got {value!r}")
    if isinstance(value, int):
        return value * 1000
    if isinstance(value, float):
        return round(value * 1000)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value) * 1000
    raise InvalidRecord(field, f"expected integer microseconds, got {value!r}")


def _time_ns(value: Any, field: str) -> int:
    """UI JSON: integer microseconds; model JSON: RFC 3339 text."""
    if value is None:
        raise InvalidRecord(field, "missing")
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        try:
            return check_time_ns(parse_rfc3339_ns(value), field)
        except ValueError as exc:
            raise InvalidRecord(field, str(exc)) from None
    return check_time_ns(_micros_to_ns(value, field), field)


def _duration_ns(value: Any, field: str) -> int:
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        try:
            return parse_duration_ns(value)
        except ValueError as exc:
            raise InvalidRecord(field, str(exc)) from None
    return _micros_to_ns(value, field)


# ---------------------------------------------------------------------------------------------
# tags


def _tag_value(tag: dict[str, Any], field: str) -> Any:
    """A Jaeger tag/log field value as Python (UI JSON ``type``/``value``; model ``vType``/``v*``)."""
    if "vType" in tag or any(k in tag for k in ("vStr", "vInt64", "vBool", "vFloat64", "vBinary")):
        vtype = str(tag.get("vType") or "STRING").upper()  # proto3 JSON omits the zero enum STRING
        raw: Any = {
            "STRING": tag.get("vStr", ""),
            "BOOL": tag.get("vBool", False),
            "INT64": tag.get("vInt64", 0),
            "FLOAT64": tag.get("vFloat64", 0.0),
            "BINARY": tag.get("vBinary", ""),
        }.get(vtype)
    else:
        vtype = str(tag.get("type") or "").upper()
        raw = tag.get("value")
        if not vtype:
            return raw if isinstance(raw, (str, bool, int, float)) else json.dumps(raw)
    try:
        if vtype == "STRING":
            return raw if isinstance(raw, str) else str(raw)
        if vtype == "BOOL":
            return raw if isinstance(raw, bool) else str(raw).lower() == "true"
        if vtype == "INT64":
            return int(raw)
        if vtype == "FLOAT64":
            return float(raw)
        if vtype == "BINARY":
            if isinstance(raw, str):
                return base64.b64decode(raw)
            if isinstance(raw, list):
                return bytes(raw)
            raise InvalidRecord(field, f"binary tag value {raw!r} is not base64 text")
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidRecord(field, f"{vtype.lower()} tag value {raw!r}: {exc}") from None
    raise InvalidRecord(field, f"unknown tag type {vtype!r}")


def _tags(tags: Any, field: str) -> list[tuple[str, Any]]:
    if tags is None:
        return []
    if not isinstance(tags, list):
        raise InvalidRecord(field, f"expected a list of tags, got {type(tags).__name__}")
    out = []
    for i, tag in enumerate(tags):
        if not isinstance(tag, dict) or not isinstance(tag.get("key"), str):
            raise InvalidRecord(f"{field}[{i}]", "expected a tag object with a string key")
        out.append((tag["key"], _tag_value(tag, f"{field}[{i}]")))
    return out


# ---------------------------------------------------------------------------------------------
# conversion


def _iter_traces(obj: Any) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(obj, list):
        items: list[Any] = obj
        prefix = ""
    elif isinstance(obj.get("data"), list):
        items = obj["data"]
        prefix = "data"
    else:
        return [("", obj)]
    return [(f"{prefix}[{i}]", trace) for i, trace in enumerate(items)]


class _Converter:
    def __init__(self) -> None:
        self.groups = ResourceGroups(SCOPE_NAME)
        self.problems: list[RecordProblem] = []
        self.records = 0
        self._resource_keys: dict[int, str] = {}

    def trace(self, path: str, trace: Any) -> None:
        if not isinstance(trace, dict):
            self.problems.append(
                RecordProblem(path or "$", f"expected a trace object, got {type(trace).__name__}")
            )
            return
        spans = trace.get("spans")
        spans_path = join_path(path, "spans")
        if not isinstance(spans, list):
            self.problems.append(RecordProblem(spans_path, "expected a list of spans"))
            return
        processes = trace.get("processes")
        if processes is not None and not isinstance(processes, dict):
            self.problems.append(RecordProblem(join_path(path, "processes"), "expected an object"))
            processes = None
        batch_process = trace.get("process")
        for i, span in enumerate(spans):
            self.records += 1
            span_path = f"{spans_path}[{i}]"
            try:
                self.span(span_path, span, processes or {}, batch_process, path)
            except InvalidRecord as exc:
                self.problems.append(RecordProblem(join_path(span_path, exc.field), exc.reason))

    def _resource_key(self, process: dict[str, Any], process_path: str) -> str:
        """The resource of a process; a process without a service name or with bad tags costs no
        spans: it becomes ``unknown_service`` / loses the bad tags, with a warning (once per process)."""
        cached = self._resource_keys.get(id(process))
        if cached is not None:
            return cached
        service = process.get("serviceName")
        if not isinstance(service, str) or not service:
            self.problems.append(
                RecordProblem(
                    join_path(process_path, "serviceName"),
                    "missing; spans kept as unknown_service",
                    skipped=False,
                )
            )
            service = "unknown_service"
        try:
            tags = _tags(process.get("tags"), "tags")
        except InvalidRecord as exc:
            self.problems.append(
                RecordProblem(
                    join_path(process_path, exc.field), f"{exc.reason}; process tags dropped", skipped=False
                )
            )
            tags = []
        key = json.dumps([service, tags], default=repr, sort_keys=True)
        if not self.groups.has(key):
            attributes = [otlp_attribute("service.name", service)]
            keys = {k for k, _ in tags}
            attributes.extend(otlp_attribute(k, v) for k, v in tags if k != "service.name")
            hostname = dict(tags).get("hostname")
            if "host.name" not in keys and isinstance(hostname, str):
                attributes.append(otlp_attribute("host.name", hostname))
            self.groups.add_resource(key, attributes)
        self._resource_keys[id(process)] = key
        return key

    def span(
        self,
        path: str,
        span: Any,
        processes: dict[str, Any],
        batch_process: Any,
        trace_path: str,
    ) -> None:
        if not isinstance(span, dict):
            raise InvalidRecord("", f"expected a span object, got {type(span).__name__}")
        model = "traceID" not in span and "traceId" in span
        tid_key, sid_key = ("traceId", "spanId") if model else ("traceID", "spanID")
        expect = "base64" if model else "hex"
        trace_id = _id(span.get(tid_key), 16, expect, tid_key)
        span_id = _id(span.get(sid_key), 8, expect, sid_key)

        process = span.get("process")
        process_path = join_path(path, "process")
        if not isinstance(process, dict):
            process_id = span.get("processID")
            if process_id is not None:
                if not isinstance(process_id, str):
                    raise InvalidRecord("processID", f"expected a process key, got {process_id!r}")
                process = processes.get(process_id)
                if not isinstance(process, dict):
                    raise InvalidRecord("processID", f"{process_id!r} is not in the trace's processes")
                process_path = join_path(trace_path, f"processes.{process_id}")
            elif isinstance(batch_process, dict):
                process = batch_process
                process_path = join_path(trace_path, "process")
            else:
                raise InvalidRecord("process", "span has neither process nor processID")
        resource_key = self._resource_key(process, process_path)

        start_ns = _time_ns(span.get("startTime"), "startTime")
        duration = span.get("duration")
        if duration is None:
            duration_ns = 0
            self.problems.append(
                RecordProblem(join_path(path, "duration"), "missing; kept as 0", skipped=False)
            )
        else:
            duration_ns = _duration_ns(duration, "duration")
            if duration_ns < 0:
                self.problems.append(
                    RecordProblem(
                        join_path(path, "duration"), f"negative ({duration!r}); kept as 0", skipped=False
                    )
                )
                duration_ns = 0

        kind = 1
        status_code = 0
        status_message = ""
        error_tag = False
        otel_status: str | None = None
        attributes = []
        scope_name: str | None = None
        scope_version = ""
        for key, value in _tags(span.get("tags"), "tags"):
            if key in _SCOPE_NAME_TAGS and isinstance(value, str) and value:
                scope_name = scope_name or value
            elif key in _SCOPE_VERSION_TAGS and isinstance(value, str):
                scope_version = scope_version or value
            elif key == "span.kind":
                kind = _KINDS.get(str(value).lower(), 0)
            elif key == "otel.status_code":
                otel_status = str(value).upper()
            elif key == "otel.status_description":
                status_message = str(value)
            else:
                if key == "error" and (value is True or str(value).lower() == "true"):
                    error_tag = True
                attributes.append(otlp_attribute(key, value))
        if otel_status in ("ERROR", "OK"):
            status_code = 2 if otel_status == "ERROR" else 1
        elif error_tag:
            status_code = 2
        warnings = span.get("warnings")
        if isinstance(warnings, list) and warnings:
            attributes.append(otlp_attribute("jaeger.warnings", [str(w) for w in warnings]))

        parent_id, links = self._references(path, span, trace_id, span_id, model, expect)

        out: dict[str, Any] = {
            "traceId": trace_id,
            "spanId": span_id,
            "name": str(span.get("operationName") or ""),
            "kind": kind,
            "startTimeUnixNano": str(start_ns),
            "endTimeUnixNano": str(check_time_ns(start_ns + duration_ns, "duration")),
            "attributes": attributes,
        }
        if parent_id:
            out["parentSpanId"] = parent_id
        if links:
            out["links"] = links
        if status_code:
            out["status"] = {"code": status_code, "message": status_message}
        flags = span.get("flags")
        if isinstance(flags, int) and not isinstance(flags, bool):
            out["flags"] = flags & 0x01  # Jaeger's sampled bit is W3C's; its debug bit (2) has no place
        events = self._logs(span.get("logs"))
        if events:
            out["events"] = events
        self.groups.add_span(resource_key, out, None if scope_name is None else (scope_name, scope_version))

    def _references(
        self, path: str, span: dict[str, Any], trace_id: str, span_id: str, model: bool, expect: str
    ) -> tuple[str | None, list[dict[str, Any]]]:
        refs: list[tuple[str, str, str]] = []  # (ref_type, trace_id, span_id)
        legacy_parent = span.get("parentSpanID")
        if legacy_parent not in (None, "", "0", 0):
            try:
                refs.append(("child_of", trace_id, normalize_id(legacy_parent, 8, expect=expect)))
            except InvalidRecord as exc:
                self._warn_ref(join_path(path, "parentSpanID"), exc.reason)
        references = span.get("references")
        if references is not None and not isinstance(references, list):
            self._warn_ref(join_path(path, "references"), "expected a list")
            references = None
        tid_key, sid_key = ("traceId", "spanId") if model else ("traceID", "spanID")
        for i, ref in enumerate(references or []):
            ref_path = join_path(path, f"references[{i}]")
            if not isinstance(ref, dict):
                self._warn_ref(ref_path, "expected an object")
                continue
            # proto3 JSON omits CHILD_OF (0); some encoders write the enum number
            raw_type = ref.get("refType") or 0
            ref_type = {0: "child_of", 1: "follows_from"}.get(raw_type, "") if type(raw_type) is int else ""
            ref_type = ref_type or str(raw_type).lower()
            if ref_type not in ("child_of", "follows_from"):
                self._warn_ref(
                    join_path(ref_path, "refType"), f"unknown reference type {ref.get('refType')!r}"
                )
                continue
            try:
                ref_trace = _id(ref.get(tid_key, ref.get("traceID", ref.get("traceId"))), 16, expect, tid_key)
                ref_span = _id(ref.get(sid_key, ref.get("spanID", ref.get("spanId"))), 8, expect, sid_key)
            except InvalidRecord as exc:
                self._warn_ref(join_path(ref_path, exc.field), exc.reason)
                continue
            if ref_trace == trace_id and ref_span == span_id:
                self._warn_ref(ref_path, "the span references itself")
                continue
            refs.append((ref_type, ref_trace, ref_span))

        parent: tuple[str, str, str] | None = None
        for wanted in ("child_of", "follows_from"):
            parent = next((r for r in refs if r[0] == wanted and r[1] == trace_id), None)
            if parent is not None:
                break
        links = []
        # a follows-from parent: the only reference to it is FOLLOWS_FROM, or CHILD_OF followed by a
        # FOLLOWS_FROM to the same span (the OpenTelemetry Collector's Jaeger translator and
        # Hourglass's own /api write it so, because Grafana nests a span under CHILD_OF only)
        if parent is not None and (
            parent[0] == "follows_from" or any(r[0] == "follows_from" and r[1:] == parent[1:] for r in refs)
        ):
            links.append(_link(("follows_from", parent[1], parent[2])))
        for ref in refs:
            if parent is not None and ref[1:] == parent[1:]:
                continue
            links.append(_link(ref))
        return (parent[2] if parent else None), links

    def _warn_ref(self, position: str, reason: str) -> None:
        self.problems.append(
            RecordProblem(position, f"{reason}; reference dropped, span kept", skipped=False)
        )

    def _logs(self, logs: Any) -> list[dict[str, Any]]:
        if not logs:
            return []
        if not isinstance(logs, list):
            raise InvalidRecord("logs", "expected a list")
        events = []
        for i, log in enumerate(logs):
            if not isinstance(log, dict):
                raise InvalidRecord(f"logs[{i}]", "expected an object")
            time_ns = _time_ns(log.get("timestamp"), f"logs[{i}].timestamp")
            name = ""
            attributes = []
            for key, value in _tags(log.get("fields"), f"logs[{i}].fields"):
                if key == "event" and isinstance(value, str) and not name:
                    name = value
                else:
                    attributes.append(otlp_attribute(key, value))
            events.append({"timeUnixNano": str(time_ns), "name": name, "attributes": attributes})
        return events


def _link(ref: tuple[str, str, str]) -> dict[str, Any]:
    return {"traceId": ref[1], "spanId": ref[2], "attributes": [otlp_attribute(REF_TYPE_KEY, ref[0])]}


def _id(value: Any, size: int, expect: str, field: str) -> str:
    if value is None:
        raise InvalidRecord(field, "missing")
    try:
        return normalize_id(value, size, expect=expect, accept_short=size == 16)
    except InvalidRecord as exc:
        raise InvalidRecord(field, exc.reason) from None


def jaeger_to_otlp_json(obj: Any) -> ConvertedTraces:
    """Convert one Jaeger JSON document (any shape :func:`is_jaeger_json` accepts) to OTLP JSON.

    Bad spans are left out and listed in ``problems`` with their JSON path; the rest is kept.
    """
    return jaeger_traces_to_otlp_json(_iter_traces(obj))


def jaeger_traces_to_otlp_json(traces: Iterable[tuple[str, Any]]) -> ConvertedTraces:
    """Convert Jaeger trace objects given with their JSON paths (``("data[7]", trace)``) — the unit
    a streamed ``{"data": [...]}`` document is read in."""
    converter = _Converter()
    for path, trace in traces:
        converter.trace(path, trace)
    return ConvertedTraces(converter.groups.traces_data(), converter.records, converter.problems)
