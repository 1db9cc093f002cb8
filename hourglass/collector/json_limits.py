"""Bounded-depth JSON parsing for every place Hourglass parses JSON from outside.

``json.loads`` recurses in C for every nested array or object: 100 k levels raise
``RecursionError`` (a 500 and a traceback per request before this module), and a few hundred
levels that do parse would overflow any recursive consumer later. Real OTLP, Jaeger and Zipkin
documents nest a dozen levels, an attribute value holding a JSON document a few dozen more, so
``MAX_JSON_DEPTH`` levels is far above anything legitimate.

:func:`json_depth` is linear and vectorised (no Python loop per character): escapes are blanked
with two ``bytes.replace``, everything but quotes and brackets is dropped with ``bytes.translate``,
and numpy tells brackets inside strings (odd number of quotes before them) from structural ones,
whose running sum's maximum is the depth (~0.1 s for 30 MB). Documents whose total count of ``[``/``{`` is within the limit skip even that (two
``bytes.count`` calls), which is every ordinary request.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

MAX_JSON_DEPTH = 512

# every byte but quotes and brackets, deleted by bytes.translate
_NOT_STRUCTURAL = bytes(set(range(256)) - set(b'"[]{}'))


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than the limit; ``depth`` is how deep it goes."""

    def __init__(self, depth: int, limit: int) -> None:
        super().__init__(f"JSON nested {depth} levels deep (the limit is {limit})")
        self.depth = depth
        self.limit = limit


def json_depth(data: bytes | bytearray | memoryview | str, *, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply the arrays and objects of a JSON text nest (0 for a scalar). When there are no
    more than ``limit`` opening brackets in all, returns their count (an upper bound, cheaply)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    openers = raw.count(b"[") + raw.count(b"{")
    if openers <= limit:
        return openers
    # Escapes, left to right as a parser reads them: each "\\\\" pair is one escaped backslash,
    # and a backslash left before a quote escapes it. Neither is structural: blank them out.
    raw = raw.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    structural = np.frombuffer(raw.translate(None, _NOT_STRUCTURAL), dtype=np.uint8)
    if structural.size == 0:
        return 0
    quote = structural == ord('"')
    outside = (np.cumsum(quote, dtype=np.int64) & 1) == 0  # quotes now delimit strings exactly
    opens = outside & ((structural == ord("[")) | (structural == ord("{")))
    closes = outside & ((structural == ord("]")) | (structural == ord("}")))
    steps = opens.astype(np.int32) - closes.astype(np.int32)
    return max(0, int(np.cumsum(steps, dtype=np.int64).max()))


def check_json_depth(data: bytes | bytearray | memoryview | str, *, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`JsonTooDeep` when ``data`` nests deeper than ``limit``."""
    depth = json_depth(data, limit=limit)
    if depth > limit:
        raise JsonTooDeep(depth, limit)


def loads(data: bytes | bytearray | str, *, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that raises :class:`JsonTooDeep` (a ``ValueError``) instead of recursing
    without bound. ``json.JSONDecodeError`` and ``UnicodeDecodeError`` pass through unchanged."""
    check_json_depth(data, limit=limit)
    try:
        return json.loads(data)
    except RecursionError:  # a lower interpreter limit than ours: still a clear refusal
        raise JsonTooDeep(json_depth(data, limit=0), limit) from None
