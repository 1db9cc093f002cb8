"""The fast OTLP decoder: the C scanner (``hourglass.collector._otlpscan``) plus column assembly in numpy/Arrow.

The dispatcher (``hourglass.collector.decode.decode_export_request``) tries this first. The scanner walks the protobuf wire
format once, with the GIL released, and returns flat int64 tables of offsets into the request
bytes; this module turns them into the ``SPAN_SCHEMA`` columns with a fixed number of numpy and
Arrow operations per request, so no Python code runs per span or per attribute in the common
case. Python still runs per *distinct* attribute key (classification, cached), per resource and
scope (a handful per request), and per span only for the rare things: links, hint attributes,
hint events and semantic values that are not plain strings/ints.

``decode_native`` returns None when the request is not the common shape (the scanner's reason:
a malformed message, an invalid id, an unknown field, invalid UTF-8 ...); the caller then runs the
pure-Python decoder (``decode_python``), which produces exactly the errors and rejections the
receivers report. The rare parts (links, hint attributes and events, values that are not plain
strings or ints, resources and scopes) are read by the same functions as there (``decode_parts``). The
two decoders give identical tables for every request both accept (``tests/test_native_decode.py``
checks this on generated, real and mutated requests).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from google.protobuf.message import DecodeError as ProtobufDecodeError

from hourglass.collector import decode_parts as parts
from hourglass.collector.decode_common import (
    HINT_CODE,
    HTTP_STATUS_INDEX,
    HTTP_STATUS_MAX,
    HTTP_STATUS_MIN,
    KEY_CODES,
    NOT_A_REQUEST,
    PLAIN_EVENT_NAMES,
    SEMANTIC_COLUMNS,
    DecodeError,
    DecodeResult,
    classify_wire_key,
    hex_id_array,
    is_hint_event,
    validity_bitmap,
)
from hourglass.collector.schema import SPAN_SCHEMA

try:
    from hourglass.collector import _otlpscan
except ImportError:  # no C compiler at install time: the pure-Python decoder does everything
    _otlpscan = None  # type: ignore[assignment]

AVAILABLE = _otlpscan is not None

# record layouts of hourglass/collector/_otlpscan.c (int64 columns)
SP_OFF, SP_LEN, SP_TRACE_ID, SP_SPAN_ID, SP_PARENT, SP_NAME_OFF, SP_NAME_LEN, SP_KIND = range(8)
SP_START, SP_END, SP_STATUS_CODE, SP_STATUS_MSG_OFF, SP_STATUS_MSG_LEN, SP_SCOPE = range(8, 14)
AT_SPAN, AT_KEY, AT_VTYPE, AT_VOFF, AT_VLEN, AT_VINT, AT_KV_OFF, AT_KV_LEN = range(8)
EV_SPAN, EV_TIME, EV_NAME_OFF, EV_NAME_LEN, EV_OFF, EV_LEN = range(6)
LK_SPAN, LK_OFF, LK_LEN = range(3)
SC_OFF, SC_LEN, SC_RESOURCE = range(3)
RS_OFF, RS_LEN = range(2)
KY_OFF, KY_LEN = range(2)
_WIDTHS = (14, 8, 2, 6, 3, 3, 2)  # spans, attributes, keys, events, links, scopes, resources
if _otlpscan is not None:
    assert _WIDTHS == (
        _otlpscan.SPAN_WIDTH,
        _otlpscan.ATTR_WIDTH,
        _otlpscan.KEY_WIDTH,
        _otlpscan.EVENT_WIDTH,
        _otlpscan.LINK_WIDTH,
        _otlpscan.SCOPE_WIDTH,
        _otlpscan.RESOURCE_WIDTH,
    ), (
        "hourglass/collector/_otlpscan.c and hourglass/collector/native_decode.py disagree on record layouts; rebuild"
    )

# AnyValue oneof field numbers
V_NONE, V_STRING, V_BOOL, V_INT, V_DOUBLE = 0, 1, 2, 3, 4

_IGNORED = -16  # key code of an attribute no column or hint uses (``classify_wire_key`` gives None)


def scan(data: bytes) -> tuple[np.ndarray, ...] | None:
    """The scanner's tables of ``data`` (spans, attributes, keys, events, links, scopes, resources:
    int64 rows in the layouts above, offsets into ``data``); None when the extension is not built
    or the bytes are not the common shape (the scanner's reason is not needed: the Python decoder
    words it)."""
    if _otlpscan is None:
        return None
    scanned = _otlpscan.scan(data)
    if isinstance(scanned, str):
        return None
    return tuple(
        np.frombuffer(table, dtype=np.int64).reshape(-1, width)
        for table, width in zip(scanned, _WIDTHS, strict=True)
    )


def strings(
    data: bytes,
    starts: np.ndarray,
    lengths: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    binary: bool = False,
) -> pa.Array:
    """An Arrow string (or binary) array of ``data`` slices, gathered in C; null where not ``valid``."""
    count = len(starts)
    offsets, values = _otlpscan.gather(
        data, np.ascontiguousarray(starts, dtype=np.int64), np.ascontiguousarray(lengths, dtype=np.int64)
    )
    validity, null_count = validity_bitmap(valid, count)
    return pa.Array.from_buffers(
        pa.binary() if binary else pa.string(),
        count,
        [validity, pa.py_buffer(offsets), pa.py_buffer(values)],
        null_count,
    )


def _hex(data_u8: np.ndarray, starts: np.ndarray, size: int, valid: np.ndarray | None = None) -> pa.Array:
    """Lowercase hex of ``size``-byte ids at ``starts`` (null where not ``valid``) as a string array."""
    if valid is not None:
        starts = np.where(valid, starts, 0)
    ids = data_u8[starts[:, None] + np.arange(size)]
    if valid is not None:
        ids[~valid] = 0
    return hex_id_array(ids.tobytes(), len(starts), size, valid)


def _key_codes(data: bytes, keys: np.ndarray) -> np.ndarray:
    """The key code (``decode_common.classify_wire_key``) of each distinct attribute key (cached across requests)."""
    cache = KEY_CODES
    classify = classify_wire_key
    codes = np.empty(len(keys), dtype=np.int64)
    for index, (offset, length) in enumerate(keys.tolist()):
        key = data[offset : offset + length]
        code = cache.get(key, -2)
        if code == -2:
            code = classify(key)
        codes[index] = _IGNORED if code is None else code
    return codes


def _semantic_columns(
    data: bytes, rows: int, attrs: np.ndarray, codes: np.ndarray
) -> dict[str, pa.Array | list[Any]]:
    """The semantic attribute columns: per span and column, the first attribute of the lowest
    priority (the rule of both decoders)."""
    columns: dict[str, pa.Array | list[Any]] = {}
    semantic = np.flatnonzero(codes >= 0)
    n_columns = len(SEMANTIC_COLUMNS)
    if len(semantic):
        code = codes[semantic]
        group = attrs[semantic, AT_SPAN] * n_columns + (code >> 4)
        order = np.lexsort((semantic, code & 15, group))
        group_sorted = group[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = group_sorted[1:] != group_sorted[:-1]
        chosen = semantic[order[first]]  # attribute index per (span, column), grouped by span
        chosen_column = group_sorted[first] % n_columns
    else:
        chosen = np.empty(0, dtype=np.int64)
        chosen_column = np.empty(0, dtype=np.int64)
    for index, column in enumerate(SEMANTIC_COLUMNS):
        picked = chosen[chosen_column == index]
        span_rows = attrs[picked, AT_SPAN]
        vtype = attrs[picked, AT_VTYPE]
        if index == HTTP_STATUS_INDEX:
            if (vtype == V_INT).all():
                values = attrs[picked, AT_VINT]
                in_range = (values >= HTTP_STATUS_MIN) & (values <= HTTP_STATUS_MAX)
                out = np.zeros(rows, dtype=np.int32)
                valid = np.zeros(rows, dtype=bool)
                out[span_rows[in_range]] = values[in_range]
                valid[span_rows[in_range]] = True
                columns[column] = pa.array(out, type=pa.int32(), mask=~valid)
                continue
        elif (vtype == V_STRING).all():
            starts = np.zeros(rows, dtype=np.int64)
            lengths = np.zeros(rows, dtype=np.int64)
            valid = np.zeros(rows, dtype=bool)
            starts[span_rows] = attrs[picked, AT_VOFF]
            lengths[span_rows] = attrs[picked, AT_VLEN]
            valid[span_rows] = True
            columns[column] = strings(data, starts, lengths, valid)
            continue
        # some value is not the plain type (an int route, a string status code, an array ...):
        # this column goes through the Python decoder's conversion, value by value
        values_list: list[Any] = [None] * rows
        for row, kv_offset, kv_length in zip(
            span_rows.tolist(),
            attrs[picked, AT_KV_OFF].tolist(),
            attrs[picked, AT_KV_LEN].tolist(),
            strict=True,
        ):
            kv = parts.key_value_from_string(data[kv_offset : kv_offset + kv_length])
            values_list[row] = parts.column_value(column, kv.value)
        columns[column] = values_list
    return columns


def _hints(data: bytes, rows: int, attrs: np.ndarray, codes: np.ndarray) -> list[str | None]:
    hints: list[str | None] = [None] * rows
    hint_attrs = np.flatnonzero(codes == HINT_CODE)
    if not len(hint_attrs):
        return hints
    per_span: dict[int, dict[str, Any]] = {}
    for row, kv_offset, kv_length in zip(
        attrs[hint_attrs, AT_SPAN].tolist(),
        attrs[hint_attrs, AT_KV_OFF].tolist(),
        attrs[hint_attrs, AT_KV_LEN].tolist(),
        strict=True,
    ):
        kv = parts.key_value_from_string(data[kv_offset : kv_offset + kv_length])
        per_span.setdefault(row, {})[kv.key] = parts.any_value_to_python(kv.value)
    for row, span_hints in per_span.items():
        hints[row] = json.dumps(span_hints, separators=(",", ":"))
    return hints


def _event_columns(data: bytes, rows: int, events: np.ndarray) -> tuple[pa.Array, pa.Array, list[str | None]]:
    counts = (
        np.bincount(events[:, EV_SPAN], minlength=rows) if len(events) else np.zeros(rows, dtype=np.int64)
    )
    span_offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(counts, out=span_offsets[1:])
    names = strings(data, events[:, EV_NAME_OFF], events[:, EV_NAME_LEN])
    times = pa.array(events[:, EV_TIME], type=pa.int64())
    offsets = pa.array(span_offsets, type=pa.int32())
    names_column = pa.ListArray.from_arrays(offsets, names, type=pa.list_(pa.string()))
    times_column = pa.ListArray.from_arrays(offsets, times, type=pa.list_(pa.int64()))
    event_hints: list[str | None] = [None] * rows
    if len(events):
        plain = PLAIN_EVENT_NAMES
        hint_names = [n for n in pc.unique(names).to_pylist() if n not in plain and is_hint_event(n)]
        if hint_names:
            is_hint = pc.is_in(names, value_set=pa.array(hint_names, type=pa.string()))
            hint_rows = np.unique(events[is_hint.to_numpy(zero_copy_only=False), EV_SPAN])
            for row in hint_rows.tolist():
                start, end = int(span_offsets[row]), int(span_offsets[row + 1])
                span_events = [data[o : o + n] for o, n in events[start:end, EV_OFF : EV_LEN + 1].tolist()]
                event_hints[row] = parts.hint_events(span_events, names.slice(start, end - start).to_pylist())
    return names_column, times_column, event_hints


def decode_native(data: bytes, ingested_ns: int) -> DecodeResult | None:
    """Rows of an ExportTraceServiceRequest/TracesData, or None when the Python decoder must run.

    Raises ``DecodeError`` only where the Python decoder would too (a malformed
    link, hint attribute or hint event inside an otherwise well-formed request).
    """
    if _otlpscan is None:
        return None
    # bytes (the receivers' type) is taken as is; anything else is copied first, so the offsets
    # refer to exactly the bytes that were scanned
    data = bytes(data)
    scanned = scan(data)
    if scanned is None:
        return None
    spans, attrs, keys, events, links, scopes, resources = scanned
    rows = len(spans)
    if rows == 0:
        return None  # nothing to gain; the Python decoder builds the empty table
    data_u8 = np.frombuffer(data, dtype=np.uint8)
    try:
        return _assemble(data, data_u8, ingested_ns, spans, attrs, keys, events, links, scopes, resources)
    except ProtobufDecodeError as exc:
        raise DecodeError(f"{NOT_A_REQUEST}: {exc}") from exc


def _assemble(
    data: bytes,
    data_u8: np.ndarray,
    ingested_ns: int,
    spans: np.ndarray,
    attrs: np.ndarray,
    keys: np.ndarray,
    events: np.ndarray,
    links: np.ndarray,
    scopes: np.ndarray,
    resources: np.ndarray,
) -> DecodeResult | None:
    rows = len(spans)
    resource_info = [
        parts.resource_columns(data[offset : offset + length] if offset >= 0 else b"")
        for offset, length in resources.tolist()
    ]
    scope_names = [
        parts.scope_name_of(data[offset : offset + length] if offset >= 0 else b"")
        for offset, length in scopes[:, SC_OFF : SC_LEN + 1].tolist()
    ]
    scope_of_span = pa.array(spans[:, SP_SCOPE])
    resource_of_span = pa.array(scopes[spans[:, SP_SCOPE], SC_RESOURCE])

    has_parent = spans[:, SP_PARENT] >= 0
    status_message_valid = spans[:, SP_STATUS_MSG_LEN] > 0
    columns: dict[str, Any] = {
        "trace_id": _hex(data_u8, spans[:, SP_TRACE_ID], 16),
        "span_id": _hex(data_u8, spans[:, SP_SPAN_ID], 8),
        "parent_span_id": _hex(data_u8, spans[:, SP_PARENT], 8, has_parent),
        "service": pa.array([info[0] for info in resource_info], type=pa.string()).take(resource_of_span),
        "name": strings(data, spans[:, SP_NAME_OFF], spans[:, SP_NAME_LEN]),
        "kind": pa.array(spans[:, SP_KIND].astype(np.int8)),
        "start_ns": pa.array(spans[:, SP_START]),
        "end_ns": pa.array(spans[:, SP_END]),
        "status_code": pa.array(spans[:, SP_STATUS_CODE].astype(np.int8)),
        "status_message": strings(
            data, spans[:, SP_STATUS_MSG_OFF], spans[:, SP_STATUS_MSG_LEN], status_message_valid
        ),
        "scope_name": pa.array(scope_names, type=pa.string()).take(scope_of_span),
        "host": pa.array([info[1] for info in resource_info], type=pa.string()).take(resource_of_span),
    }

    codes = _key_codes(data, keys)[attrs[:, AT_KEY]] if len(attrs) else np.empty(0, dtype=np.int64)
    columns.update(_semantic_columns(data, rows, attrs, codes))
    columns["hints"] = _hints(data, rows, attrs, codes)
    columns["event_names"], columns["event_times_ns"], columns["event_hints"] = _event_columns(
        data, rows, events
    )

    links_column: list[list[str]] = [[]] * rows
    follows: list[bool] = [False] * rows
    if len(links):
        for row in np.unique(links[:, LK_SPAN]).tolist():
            span_links = [data[o : o + n] for o, n in links[links[:, LK_SPAN] == row, LK_OFF:].tolist()]
            parent_offset = int(spans[row, SP_PARENT])
            parent = data[parent_offset : parent_offset + 8] if parent_offset >= 0 else b""
            links_column[row], follows[row] = parts.link_columns(span_links, parent)
    columns["links"] = links_column
    columns["follows_from"] = follows
    columns["resource_json"] = pa.array([info[2] for info in resource_info], type=pa.string()).take(
        resource_of_span
    )
    columns["raw"] = strings(data, spans[:, SP_OFF], spans[:, SP_LEN], binary=True)
    columns["ingested_ns"] = pa.array(np.full(rows, ingested_ns, dtype=np.int64))
    arrays = [
        value if isinstance(value, pa.Array) else pa.array(value, type=f.type)
        for f, value in ((f, columns[f.name]) for f in SPAN_SCHEMA)
    ]
    return DecodeResult(table=pa.Table.from_arrays(arrays, schema=SPAN_SCHEMA))
