"""Zipkin v2 JSON → OTLP JSON (then :func:`hourglass.collector.decode.decode_otlp_json`).

Accepted shapes: a list of spans (``/api/v2/trace/{id}``, what the UI downloads) and a list of
traces, each a list of spans (``/api/v2/traces``). Zipkin v1 (``binaryAnnotations``) is refused
with a clear message.

Mapping rules:

- ``kind`` CLIENT/SERVER/PRODUCER/CONSUMER → the OTLP kind; no kind (a local span) → INTERNAL.
- ``localEndpoint.serviceName`` → resource ``service.name`` (``unknown_service`` when absent);
  its ``ipv4``/``ipv6`` → resource ``host.ip``; its ``port`` → ``network.local.port``.
- ``remoteEndpoint.serviceName`` → ``peer.service``; its address/port → ``server.address`` /
  ``server.port`` on CLIENT, PRODUCER and local spans, and → ``network.peer.address`` /
  ``network.peer.port`` on SERVER and CONSUMER spans (there the remote end is the caller, not a
  server).
- ``tags`` → attributes, all kept under their own key. Where a Zipkin key has a current semantic
  equivalent that is absent, it is added too (``ZIPKIN_TAG_ALIASES``: ``http.path`` → ``url.path``,
  ``sql.query`` → ``db.query.text``, ``kafka.topic`` → ``messaging.destination.name``...).
  An ``error`` tag sets status ERROR; its value is the status message unless it is empty or "true".
- ``annotations`` → events (the value is the event name).
- IDs are hex (16 or 32 characters; shorter ones are left-padded, 64-bit trace ids become 128-bit).
  A 64-bit trace id equal to the low half of a 128-bit one in the same document joins that trace.
- **Times** are epoch microseconds as the Zipkin v2 spec says. What the yelp test file shows is not
  a unit mix but a precision mix: spans written by proxies (``tracer: syslog2scribe.*``) carry
  microsecond values rounded to whole milliseconds (``1571896375322000``), beside microsecond-precise
  server spans; they are read as the microseconds they are (the clock-skew adjuster absorbs the
  ±1 ms). A timestamp that is really in milliseconds (below 10^14, i.e. before March 1973 as
  microseconds, and at least 10^11) is scaled by 1000 and reported as a warning; its duration is
  left as microseconds.
- **Shared spans**: Zipkin lets a server reuse its client's span id (B3 single-host spans,
  ``shared: true``). When a trace holds both a SERVER span and a non-SERVER span with one id, the
  server half gets its own id — the first 8 bytes of sha256(``"{trace_id}:{span_id}:server"``),
  stable across imports — its parent becomes the client half, and it keeps the original id in
  ``zipkin.shared_span_id``. Children of that id are re-parented to the server half unless they run
  in the client's service and not in the server's: a client span rarely has children of its own,
  while the server's work does (Zipkin's tree builder matches on the exact local endpoint instead;
  the yelp file shows why that is too strict — the server half reports ``yelp_main/api_proxy``,
  its children ``yelp-main``). De-duplication no longer collapses the two halves. A lone server
  half keeps its id (renaming it would cut it from its parent when the client was never traced).
  Limitation: halves are paired within one document (one file, or one JSON Lines line); halves in
  different documents keep the same id and the store keeps only one of them.
- **Missing timestamp or duration**: the span is kept with what is known and a warning says so.
  A missing timestamp is taken from its earliest annotation, else its shared counterpart, else its
  parent, else the earliest span of its trace; a missing duration ends the span at its last
  annotation (or makes it zero-length). Such spans carry ``hourglass.timing_incomplete`` naming the
  missing field(s). A span with no timestamp and nothing to place it by is skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hourglass.collector.readers import (
    ConvertedTraces,
    InvalidRecord,
    RecordProblem,
    ResourceGroups,
    check_time_ns,
    normalize_id,
    otlp_attribute,
)

__all__ = [
    "ZIPKIN_TAG_ALIASES",
    "is_zipkin_json",
    "shared_server_span_id",
    "zipkin_items_to_otlp_json",
    "zipkin_to_otlp_json",
]

SCOPE_NAME = "hourglass.import.zipkin"
_KINDS = {"CLIENT": 3, "SERVER": 2, "PRODUCER": 4, "CONSUMER": 5}
ZIPKIN_TAG_ALIASES: dict[str, tuple[str, ...]] = {
    "http.path": ("url.path",),
    "http.url": ("url.full",),
    "http.method": ("http.request.method",),
    "http.status_code": ("http.response.status_code",),
    "sql.query": ("db.query.text",),
    "kafka.topic": ("messaging.destination.name",),
    "mq.topic": ("messaging.destination.name",),
}
_MIN_MICROS = 10**14  # 1973-03-03 in microseconds; below this a timestamp is not plausible µs
_MIN_MILLIS = 10**11  # 1973-03-03 in milliseconds
TIMING_INCOMPLETE_KEY = "hourglass.timing_incomplete"


def is_zipkin_json(obj: Any) -> bool:
    """A list of Zipkin spans, or a list of lists of them (decided on the first span)."""
    if not isinstance(obj, list):
        return False
    first: Any = obj[0] if obj else None
    if isinstance(first, list):
        first = first[0] if first else None
    if first is None:
        return isinstance(obj, list)
    return isinstance(first, dict) and "traceId" in first and "id" in first


def shared_server_span_id(trace_id: str, span_id: str) -> str:
    """The id given to the server half of a shared Zipkin span (deterministic, never zero)."""
    digest = hashlib.sha256(f"{trace_id}:{span_id}:server".encode()).hexdigest()[:16]
    return digest if digest != "0" * 16 else "0000000000000001"


@dataclass
class _Entry:
    path: str
    span: dict[str, Any]
    trace_id: str
    span_id: str
    parent_id: str | None
    kind: str
    service: str
    timestamp: int | None  # microseconds after the unit rule
    new_span_id: str | None = None
    extra_attributes: list[dict[str, Any]] = field(default_factory=list)


def _micros(value: Any, field_path: str, problems: list[RecordProblem]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRecord("", f"expected epoch microseconds, got {value!r}")
    try:
        micros = int(value)
    except ValueError:
        raise InvalidRecord("", f"expected epoch microseconds, got {value!r}") from None
    if _MIN_MILLIS <= micros < _MIN_MICROS:
        problems.append(
            RecordProblem(field_path, f"{micros} looks like epoch milliseconds; read as such", skipped=False)
        )
        micros *= 1000
    return micros


def _spans_with_paths(items: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for path, item in items:
        if isinstance(item, list):
            out.extend((f"{path}[{j}]", span) for j, span in enumerate(item))
        else:
            out.append((path, item))
    return out


def _id(span: dict[str, Any], key: str, size: int) -> str:
    value = span.get(key)
    if value is None:
        raise InvalidRecord(key, "missing")
    try:
        return normalize_id(value, size, expect="hex")
    except InvalidRecord as exc:
        raise InvalidRecord(key, exc.reason) from None


def _endpoint(span: dict[str, Any], key: str) -> dict[str, Any]:
    value = span.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRecord(key, f"expected an object, got {type(value).__name__}")
    return value


def zipkin_to_otlp_json(obj: list[Any]) -> ConvertedTraces:
    """Convert one Zipkin v2 JSON document to OTLP JSON; bad spans are listed and left out."""
    return zipkin_items_to_otlp_json((f"[{i}]", item) for i, item in enumerate(obj))


def zipkin_items_to_otlp_json(items: Iterable[tuple[str, Any]]) -> ConvertedTraces:
    """Convert elements of a Zipkin document given with their JSON paths: spans, or traces (lists
    of spans) — the unit a streamed ``/api/v2/traces`` answer is read in. Shared spans are paired
    within the elements given together."""
    problems: list[RecordProblem] = []
    entries: list[_Entry] = []
    records = 0
    for path, span in _spans_with_paths(items):
        records += 1
        try:
            entries.append(_entry(path, span, problems))
        except InvalidRecord as exc:
            where = f"{path}.{exc.field}" if exc.field else path
            problems.append(RecordProblem(where, exc.reason))

    _merge_mixed_length_trace_ids(entries)
    _split_shared_spans(entries)
    _fill_missing_timestamps(entries, problems)

    groups = ResourceGroups(SCOPE_NAME)
    for entry in entries:
        if entry.timestamp is None:
            continue  # reported by _fill_missing_timestamps
        try:
            key, span_json = _convert(entry, groups, problems)
        except InvalidRecord as exc:
            where = f"{entry.path}.{exc.field}" if exc.field else entry.path
            problems.append(RecordProblem(where, exc.reason))
            continue
        groups.add_span(key, span_json)
    return ConvertedTraces(groups.traces_data(), records, problems)


def _entry(path: str, span: Any, problems: list[RecordProblem]) -> _Entry:
    if not isinstance(span, dict):
        raise InvalidRecord("", f"expected a span object, got {type(span).__name__}")
    if "binaryAnnotations" in span:
        raise InvalidRecord(
            "", "Zipkin v1 JSON (binaryAnnotations) is not supported; export Zipkin v2 (/api/v2)"
        )
    trace_id = _id(span, "traceId", 16)
    span_id = _id(span, "id", 8)
    parent_id: str | None = None
    if span.get("parentId") not in (None, ""):
        try:
            parent_id = _id(span, "parentId", 8)
        except InvalidRecord as exc:
            problems.append(RecordProblem(f"{path}.parentId", f"{exc.reason}; kept as a root", skipped=False))
        if parent_id == span_id:
            problems.append(
                RecordProblem(f"{path}.parentId", "the span is its own parent; kept as a root", skipped=False)
            )
            parent_id = None
    kind = str(span.get("kind") or "").upper()
    service = _endpoint(span, "localEndpoint").get("serviceName")
    try:
        timestamp = _micros(span.get("timestamp"), f"{path}.timestamp", problems)
    except InvalidRecord as exc:
        raise InvalidRecord("timestamp", exc.reason) from None
    return _Entry(
        path=path,
        span=span,
        trace_id=trace_id,
        span_id=span_id,
        parent_id=parent_id,
        kind=kind,
        service=service if isinstance(service, str) and service else "unknown_service",
        timestamp=timestamp,
    )


def _merge_mixed_length_trace_ids(entries: list[_Entry]) -> None:
    """A 64-bit trace id whose value equals the low half of a 128-bit trace id in the same document
    is that trace (instrumentation that propagates only 64 bits; Zipkin merges them the same way)."""
    full_by_low = {e.trace_id[16:]: e.trace_id for e in entries if not e.trace_id.startswith("0" * 16)}
    if not full_by_low:
        return
    for entry in entries:
        if entry.trace_id.startswith("0" * 16):
            entry.trace_id = full_by_low.get(entry.trace_id[16:], entry.trace_id)


def _split_shared_spans(entries: list[_Entry]) -> None:
    by_id: dict[tuple[str, str], list[_Entry]] = {}
    for entry in entries:
        by_id.setdefault((entry.trace_id, entry.span_id), []).append(entry)
    # (trace, shared id) -> (server half's new id, server service, client services)
    server_halves: dict[tuple[str, str], tuple[str, str, frozenset[str]]] = {}
    for (trace_id, span_id), group in by_id.items():
        if len(group) < 2:
            continue
        servers = [e for e in group if e.kind == "SERVER"]
        if not servers or len(servers) == len(group):
            continue  # a lone half, or duplicates of one half: the store de-duplicates
        new_id = shared_server_span_id(trace_id, span_id)
        for server in servers:
            server.new_span_id = new_id
            server.parent_id = span_id
            server.extra_attributes.append(otlp_attribute("zipkin.shared_span_id", span_id))
        clients = frozenset(e.service for e in group if e.kind != "SERVER")
        server_halves[(trace_id, span_id)] = (new_id, servers[0].service, clients)
    if not server_halves:
        return
    for entry in entries:
        if entry.parent_id is None or entry.new_span_id is not None:
            continue
        half = server_halves.get((entry.trace_id, entry.parent_id))
        if half is None:
            continue
        new_id, server_service, client_services = half
        if entry.service == server_service or entry.service not in client_services:
            entry.parent_id = new_id


def _annotation_times(entry: _Entry, problems: list[RecordProblem]) -> list[int]:
    annotations = entry.span.get("annotations")
    if not isinstance(annotations, list):
        return []
    times = []
    for i, annotation in enumerate(annotations):
        if isinstance(annotation, dict):
            try:
                ts = _micros(
                    annotation.get("timestamp"), f"{entry.path}.annotations[{i}].timestamp", problems
                )
            except InvalidRecord:
                continue  # reported when the annotation is converted
            if ts is not None:
                times.append(ts)
    return times


def _fill_missing_timestamps(entries: list[_Entry], problems: list[RecordProblem]) -> None:
    missing = [e for e in entries if e.timestamp is None]
    if not missing:
        return
    first_by_id: dict[tuple[str, str], int] = {}
    first_by_trace: dict[str, int] = {}
    for e in entries:
        if e.timestamp is None:
            continue
        key = (e.trace_id, e.span_id)
        first_by_id[key] = min(first_by_id.get(key, e.timestamp), e.timestamp)
        first_by_trace[e.trace_id] = min(first_by_trace.get(e.trace_id, e.timestamp), e.timestamp)
    for e in missing:
        annotation_times = _annotation_times(e, problems)
        source = None
        if annotation_times:
            e.timestamp, source = min(annotation_times), "its earliest annotation"
        elif (e.trace_id, e.span_id) in first_by_id:
            e.timestamp, source = first_by_id[(e.trace_id, e.span_id)], "the other half of its shared span"
        elif e.parent_id is not None and (e.trace_id, e.parent_id) in first_by_id:
            e.timestamp, source = first_by_id[(e.trace_id, e.parent_id)], "its parent's start"
        elif e.trace_id in first_by_trace:
            e.timestamp, source = first_by_trace[e.trace_id], "the earliest span of its trace"
        if source is None:
            problems.append(
                RecordProblem(
                    f"{e.path}.timestamp", "missing, and nothing in its trace has a time to place it by"
                )
            )
        else:
            problems.append(
                RecordProblem(f"{e.path}.timestamp", f"missing; start taken from {source}", skipped=False)
            )


def _convert(
    entry: _Entry, groups: ResourceGroups, problems: list[RecordProblem]
) -> tuple[Any, dict[str, Any]]:
    span = entry.span
    local = _endpoint(span, "localEndpoint")
    remote = _endpoint(span, "remoteEndpoint")
    local_ip = local.get("ipv4") or local.get("ipv6")
    if not isinstance(local_ip, str):
        local_ip = None
    resource_key = (entry.service, local_ip)
    if not groups.has(resource_key):
        resource_attributes = [otlp_attribute("service.name", entry.service)]
        if isinstance(local_ip, str) and local_ip:
            resource_attributes.append(otlp_attribute("host.ip", [local_ip]))
        groups.add_resource(resource_key, resource_attributes)

    assert entry.timestamp is not None
    start_us = entry.timestamp
    incomplete = []
    if span.get("timestamp") is None:
        incomplete.append("timestamp")
    duration = span.get("duration")
    if duration is None:
        incomplete.append("duration")
        later = [t for t in _annotation_times(entry, []) if t > start_us]
        duration_us = max(later) - start_us if later else 0
        problems.append(
            RecordProblem(
                f"{entry.path}.duration",
                "missing; span ends at its last annotation" if later else "missing; kept as zero-length",
                skipped=False,
            )
        )
    elif isinstance(duration, bool) or not isinstance(duration, (int, float, str)):
        raise InvalidRecord("duration", f"expected microseconds, got {duration!r}")
    else:
        try:
            duration_us = int(duration)
        except ValueError:
            raise InvalidRecord("duration", f"expected microseconds, got {duration!r}") from None
        if duration_us < 0:
            raise InvalidRecord("duration", f"negative duration {duration_us}")

    attributes: list[dict[str, Any]] = []
    status: dict[str, Any] | None = None
    tags = span.get("tags")
    if tags is not None and not isinstance(tags, dict):
        raise InvalidRecord("tags", f"expected an object, got {type(tags).__name__}")
    tags = tags or {}
    for key, value in tags.items():
        attributes.append(otlp_attribute(str(key), value))
        aliases = ZIPKIN_TAG_ALIASES.get(key)
        if aliases is not None:
            attributes.extend(otlp_attribute(alias, value) for alias in aliases if alias not in tags)
        elif key == "error":
            text = "" if value is None else str(value)
            status = {"code": 2, "message": "" if text.lower() in ("", "true") else text}
    if "kafka.topic" in tags and "messaging.system" not in tags:
        attributes.append(otlp_attribute("messaging.system", "kafka"))
    remote_service = remote.get("serviceName")
    if isinstance(remote_service, str) and remote_service and "peer.service" not in tags:
        attributes.append(otlp_attribute("peer.service", remote_service))
    remote_ip = remote.get("ipv4") or remote.get("ipv6")
    address_key, port_key = (
        ("network.peer.address", "network.peer.port")
        if entry.kind in ("SERVER", "CONSUMER")
        else ("server.address", "server.port")
    )
    if isinstance(remote_ip, str) and remote_ip and address_key not in tags:
        attributes.append(otlp_attribute(address_key, remote_ip))
    if isinstance(remote.get("port"), int) and port_key not in tags:
        attributes.append(otlp_attribute(port_key, remote["port"]))
    if isinstance(local.get("port"), int):
        attributes.append(otlp_attribute("network.local.port", local["port"]))
    if span.get("shared") is True:
        attributes.append(otlp_attribute("zipkin.shared", True))
    if span.get("debug") is True:
        attributes.append(otlp_attribute("zipkin.debug", True))
    if incomplete:
        attributes.append(otlp_attribute(TIMING_INCOMPLETE_KEY, ",".join(incomplete)))
    attributes.extend(entry.extra_attributes)

    events = []
    annotations = span.get("annotations")
    if annotations is not None and not isinstance(annotations, list):
        raise InvalidRecord("annotations", "expected a list")
    for i, annotation in enumerate(annotations or []):
        if not isinstance(annotation, dict) or annotation.get("timestamp") is None:
            raise InvalidRecord(f"annotations[{i}]", "expected {timestamp, value}")
        try:
            ts = _micros(annotation["timestamp"], f"{entry.path}.annotations[{i}].timestamp", [])
        except InvalidRecord as exc:
            raise InvalidRecord(f"annotations[{i}].timestamp", exc.reason) from None
        assert ts is not None
        time_ns = check_time_ns(ts * 1000, f"annotations[{i}].timestamp")
        events.append({"timeUnixNano": str(time_ns), "name": str(annotation.get("value") or "")})

    kind = _KINDS.get(entry.kind, 1 if not entry.kind else 0)
    out: dict[str, Any] = {
        "traceId": entry.trace_id,
        "spanId": entry.new_span_id or entry.span_id,
        "name": str(span.get("name") or ""),
        "kind": kind,
        "startTimeUnixNano": str(check_time_ns(start_us * 1000, "timestamp")),
        "endTimeUnixNano": str(check_time_ns((start_us + duration_us) * 1000, "duration")),
        "attributes": attributes,
    }
    if entry.parent_id:
        out["parentSpanId"] = entry.parent_id
    if status is not None:
        out["status"] = status
    if events:
        out["events"] = events
    return resource_key, out
