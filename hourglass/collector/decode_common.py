"""What every OTLP decoder shares: the errors, the result, the rules' constants, the one id parser.

The two decoders of ``Export`` bytes (``decode_python``, ``native_decode``), the OTLP JSON parser
(``decode_json``) and the trace-file readers (``readers``) all build on this module; it imports
neither protobuf nor any decoder, so each of them can be read on its own. The decoders' rules are
documented in ``hourglass/collector/decode.py`` (the dispatcher), the columns in ``schema.py``.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from hourglass.collector.schema import (
    ATTRIBUTE_KEY_TO_COLUMN,
    HINT_EVENT_PATTERN,
    HINT_KEY_PATTERN,
    SEMANTIC_ATTRIBUTE_COLUMNS,
)

UNKNOWN_SERVICE = "unknown_service"
FOLLOWS_FROM_LINK_ATTRIBUTE = ("opentracing.ref_type", "follows_from")
# At most this many rejection reasons are listed; the count is always exact.
MAX_ERROR_MESSAGES = 20
INT64_MAX = 2**63 - 1
# A span kind or status code the OTLP enums do not define is stored as unspecified / unset (the
# raw span keeps the number); the columns are int8.
KIND_MIN, KIND_MAX, KIND_UNSPECIFIED = 0, 5, 0
STATUS_MIN, STATUS_MAX, STATUS_UNSET = 0, 2, 0
# the range of the int32 ``http_status_code`` column
HTTP_STATUS_MIN, HTTP_STATUS_MAX = -(2**31), 2**31 - 1
# Event attributes never copied into ``event_hints`` (large, and no detector reads them).
DROPPED_EVENT_ATTRIBUTES = frozenset({"exception.stacktrace"})
# The message of bytes that are not an Export request, whichever decoder finds out.
NOT_A_REQUEST = "not an OTLP ExportTraceServiceRequest/TracesData protobuf message"


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
# trace and span ids in text (OTLP JSON, Jaeger, Zipkin)

_HEX_RE = re.compile(r"^[0-9a-fA-F]*$")


def _base64(text: str) -> bytes | None:
    """Standard or URL-safe base64, padding optional; None when ``text`` is not base64."""
    try:
        return base64.b64decode(
            text + "=" * (-len(text) % 4),
            altchars=b"-_" if "-" in text or "_" in text else None,
            validate=True,
        )
    except (binascii.Error, ValueError):
        return None


def parse_id(text: Any, size: int, *, hex_first: bool = False, short_base64: bool = False) -> bytes:
    """A trace (``size`` 16) or span (8) id written as text: hex or base64, as ``size`` bytes.

    Order: hex of exactly ``2*size`` characters, then base64 of exactly ``size`` bytes (protobuf's
    JSON mapping), then shorter hex, left-padded with zeros (exporters that drop leading zeros, as
    Jaeger does). ``hex_first`` takes any hex of at most ``2*size`` characters before base64 (Zipkin
    and Jaeger UI JSON, where ids are hex by definition); ``short_base64`` also takes base64 of 8
    bytes as a trace id (a 64-bit trace id, high half zero). Empty text is an empty id; anything
    else raises ``ValueError`` saying why.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a hex or base64 string, got {type(text).__name__}")
    if text == "":
        return b""
    width = 2 * size
    is_hex = bool(_HEX_RE.match(text))
    if is_hex and (len(text) == width or (hex_first and len(text) < width)):
        return bytes.fromhex(text.rjust(width, "0"))
    decoded = _base64(text)
    if decoded is not None and (len(decoded) == size or (short_base64 and size == 16 and len(decoded) == 8)):
        return decoded.rjust(size, b"\0")
    if is_hex and len(text) < width:
        return bytes.fromhex(text.rjust(width, "0"))
    if is_hex:
        raise ValueError(f"{text!r} is {len(text)} hex characters, expected {width}")
    raise ValueError(f"{text!r} is neither {width} hex characters nor base64 of {size} bytes")


# ---------------------------------------------------------------------------------------------
# attribute-key classification, cached per key (bytes as they appear on the wire):
#   None -> ignore;  HINT_CODE -> goes to ``hints``;  code >= 0 -> semantic column
#   ``code >> 4`` (index in SEMANTIC_COLUMNS) with priority ``code & 15`` (lower wins).
SEMANTIC_COLUMNS = tuple(SEMANTIC_ATTRIBUTE_COLUMNS)
_COLUMN_INDEX = {column: index for index, column in enumerate(SEMANTIC_COLUMNS)}
HTTP_STATUS_INDEX = _COLUMN_INDEX["http_status_code"]
HINT_CODE = -1
NO_PRIORITY = 15
KEY_CODES: dict[bytes, int | None] = {}
MAX_CACHED_KEYS = 100_000  # unbounded key cardinality must not grow memory without limit


def _key_code(key: str) -> int | None:
    mapped = ATTRIBUTE_KEY_TO_COLUMN.get(key)
    if mapped is not None:
        column, priority = mapped
        return (_COLUMN_INDEX[column] << 4) | min(priority, NO_PRIORITY - 1)
    if HINT_KEY_PATTERN.search(key):
        return HINT_CODE
    return None


def classify_wire_key(key: bytes) -> int | None:
    """The code of an attribute key (UTF-8 bytes), remembered in ``KEY_CODES``."""
    code = _key_code(key.decode("utf-8", "replace"))
    if len(KEY_CODES) >= MAX_CACHED_KEYS:
        KEY_CODES.clear()
    KEY_CODES[key] = code
    return code


# event names seen so far that are not hint events (a superset test skips a span's events at once)
PLAIN_EVENT_NAMES: set[str] = set()


def is_hint_event(name: str) -> bool:
    if name in PLAIN_EVENT_NAMES:
        return False
    if HINT_EVENT_PATTERN.search(name):
        return True
    if len(PLAIN_EVENT_NAMES) >= MAX_CACHED_KEYS:
        PLAIN_EVENT_NAMES.clear()
    PLAIN_EVENT_NAMES.add(name)
    return False


# ---------------------------------------------------------------------------------------------
# Arrow columns of ids


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
