"""The pure-Python OTLP decoder: bytes of an ``ExportTraceServiceRequest`` (or ``TracesData``) → span rows.

The dispatcher (``hourglass.collector.decode``) runs it for every request the C-backed decoder
(``native_decode``) does not take, and for all of them without the C extension; it gives the same
rows, and it is the one that words every rejection and error the receivers report. The rules are
in ``decode.py``'s docstring.

Performance is the point (reading every attribute value in Python measured ~5.6 µs/span against
~2 µs for everything else): the request is parsed into a lean view (``decode_parts.LEAN``) whose
attributes, links, resources and events stay bytes; per attribute only the key is read and
classified through a dict cache, and the value only for keys that map to a semantic column or
match ``HINT_KEY_PATTERN``. Columns are built as Python lists and turned into one Arrow table per call.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError as ProtobufDecodeError

from hourglass.collector.decode_common import (
    HINT_CODE,
    HTTP_STATUS_INDEX,
    INT64_MAX,
    KEY_CODES,
    KIND_MAX,
    KIND_MIN,
    KIND_UNSPECIFIED,
    MAX_CACHED_KEYS,
    MAX_ERROR_MESSAGES,
    NO_PRIORITY,
    NOT_A_REQUEST,
    PLAIN_EVENT_NAMES,
    SEMANTIC_COLUMNS,
    STATUS_MAX,
    STATUS_MIN,
    STATUS_UNSET,
    DecodeError,
    DecodeResult,
    classify_wire_key,
    hex_id_array,
    is_hint_event,
)
from hourglass.collector.decode_parts import (
    LEAN,
    LEAN_EVENT_BYTES,
    any_value_to_python,
    column_value,
    hint_events,
    key_value_from_string,
    link_columns,
    resource_columns,
    scope_name_of,
)
from hourglass.collector.schema import SPAN_SCHEMA

__all__ = ["decode_python"]

_LeanTracesData = LEAN["TracesData"]
_LeanTracesDataEventBytes = LEAN_EVENT_BYTES["TracesData"]
_LeanEventFromString = LEAN["Event"].FromString


def decode_python(data: bytes, ingested_ns: int) -> DecodeResult:
    """Rows of the bytes of an ``ExportTraceServiceRequest`` (or ``TracesData``).

    Raises ``DecodeError`` when the bytes are not such a message (also when an attribute, the
    resource or the scope inside it is malformed).
    """
    lean = _LeanTracesDataEventBytes()
    try:
        _LeanTracesData().ParseFromString(data)  # validates the events' structure too
        lean.ParseFromString(data)
        return _decode_lean(lean, ingested_ns)
    except ProtobufDecodeError as exc:
        raise DecodeError(f"{NOT_A_REQUEST}: {exc}") from exc


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
        if getattr(span, field_name) > INT64_MAX:
            return f"{field_name} {getattr(span, field_name)} is beyond int64 (after the year 2262)"
    return None


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
    status = LEAN["Status"].FromString(encoded)
    result = (status.code, status.message or None)
    if len(encoded) <= _STATUS_CACHE_MAX_KEY_BYTES:
        if len(_STATUS_CACHE) >= MAX_CACHED_KEYS:
            _STATUS_CACHE.clear()
            _STATUS_CACHE[b""] = (0, None)
        _STATUS_CACHE[encoded] = result
    return result


def _attribute_key(encoded: bytes) -> str:
    """The key of a serialized ``KeyValue`` (the slow path: long keys or unusual field order)."""
    return key_value_from_string(encoded).key


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
        if column_index != HTTP_STATUS_INDEX:
            if tag == 0x0A and encoded[key_end + 3] == size - key_end - 4:
                return encoded[key_end + 4 :].decode("utf-8", "replace")
        elif tag == 0x18:
            if size == key_end + 4 and encoded[key_end + 3] < 0x80:
                return encoded[key_end + 3]
            if size == key_end + 5 and encoded[key_end + 4] < 0x80:
                return (encoded[key_end + 3] & 0x7F) | (encoded[key_end + 4] << 7)
    return column_value(SEMANTIC_COLUMNS[column_index], key_value_from_string(encoded).value)


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
            [e.time_unix_nano if e.time_unix_nano <= INT64_MAX else None for e in events], type=pa.int64()
        )
    offsets = pa.array(span_offsets, type=pa.int32())
    names_column = pa.ListArray.from_arrays(offsets, names_array, type=pa.list_(pa.string()))
    times_column = pa.ListArray.from_arrays(offsets, times_array, type=pa.list_(pa.int64()))

    event_hints: list[str | None] = [None] * rows
    if flat:
        unique_names = pc.unique(names_array).to_pylist()
        plain = PLAIN_EVENT_NAMES
        hint_names = [n for n in unique_names if n not in plain and is_hint_event(n)]
        if hint_names:
            is_hint = pc.is_in(names_array, value_set=pa.array(hint_names, type=pa.string()))
            event_rows = np.repeat(np.arange(rows), counts)
            hint_rows = np.unique(event_rows[is_hint.to_numpy(zero_copy_only=False)])
            for row in hint_rows.tolist():
                start, end = int(span_offsets[row]), int(span_offsets[row + 1])
                names = names_array.slice(start, end - start).to_pylist()
                event_hints[row] = hint_events(all_events[row], names)
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
    if int(times.max()) > INT64_MAX:
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
                and max((s.start_time_unix_nano for s in scope_list), default=0) <= INT64_MAX
                and max((s.end_time_unix_nano for s in scope_list), default=0) <= INT64_MAX
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
    semantic_values: list[list[Any]] = [[None] * rows for _ in SEMANTIC_COLUMNS]
    semantic_priority: list[list[int]] = [[NO_PRIORITY] * rows for _ in SEMANTIC_COLUMNS]
    hints: list[str | None] = [None] * rows
    key_codes = KEY_CODES
    classify = classify_wire_key
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
                    if len(value_cache) >= MAX_CACHED_KEYS:
                        value_cache.clear()
                    value_cache[encoded] = _IGNORED_ATTRIBUTE
                continue
            if code == HINT_CODE:
                kv = key_value_from_string(encoded)
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
                    if len(value_cache) >= MAX_CACHED_KEYS:
                        value_cache.clear()
                    value_cache[encoded] = (code, value)
        if span_hints is not None:
            hints[row] = json.dumps(span_hints, separators=(",", ":"))
    for index, column in enumerate(SEMANTIC_COLUMNS):
        columns[column] = semantic_values[index]
    columns["hints"] = hints

    # pass 4: events and links
    all_events = [s.events for s in kept]
    columns["event_names"], columns["event_times_ns"], columns["event_hints"] = _event_columns(all_events)
    links_col: list[list[str]] = [[]] * rows
    follows: list[bool] = [False] * rows
    for row, span in enumerate(kept):
        if span.links:
            links_col[row], follows[row] = link_columns(span.links, span.parent_span_id)
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
