"""One JSON document read piece by piece, so that a big trace export never sits in memory whole.

Trace exports put nearly all their bytes in one array: Zipkin's list of spans or of traces,
Jaeger's ``{"data": [trace, ...]}``, OTLP's ``{"resourceSpans": [...]}``. :func:`iter_json_events`
yields the elements of that array one at a time (parsed by the standard library's C scanner,
``json.JSONDecoder.raw_decode``) and every other object member whole. Memory is then bounded by
the largest element (one trace, one resource), not by the file.

Events:

- ``("start", "array" | "object" | "value", None)`` first; for ``"value"`` (a top-level scalar) the
  next event is ``("value", None, value)``;
- ``("array", key, None)`` when a streamed array begins (``key`` None for the top-level array),
  then ``("item", (key, index), value)`` for each of its elements — the top-level array's, or the
  array of a member whose key is in ``stream_keys``;
- ``("member", key, value)`` for every other member of a top-level object.

A syntax error raises :class:`JsonStreamError` with the line and column of the document.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from hourglass.collector.json_limits import MAX_JSON_DEPTH, json_depth

__all__ = ["JsonStreamError", "iter_json_events"]

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
CHUNK_CHARS = 1 << 20


class JsonStreamError(ValueError):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{line}:{column}: {message}")
        self.message = message
        self.line = line
        self.column = column


class _Buffer:
    """Text read so far (minus what was consumed), with the line count of the consumed part."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text = ""
        self.pos = 0
        self.eof = False
        self._lines_before = 0  # newlines in text already dropped
        self._line_start_offset = 0  # absolute offset of the last dropped newline + 1
        self._dropped = 0  # characters dropped from the front

    def more(self, at_least: int = CHUNK_CHARS) -> bool:
        if self.eof:
            return False
        raw = self._stream.read(at_least)
        if not raw:
            self.eof = True
            self.text += self._decoder.decode(b"", final=True)
            return False
        if self.pos > CHUNK_CHARS:  # drop consumed text, keeping line numbers right
            consumed = self.text[: self.pos]
            newlines = consumed.count("\n")
            if newlines:
                self._lines_before += newlines
                self._line_start_offset = self._dropped + consumed.rindex("\n") + 1
            self._dropped += self.pos
            self.text = self.text[self.pos :]
            self.pos = 0
        self.text += self._decoder.decode(raw)
        return True

    def skip_whitespace(self) -> str:
        """The next non-whitespace character (consumed only by the caller), '' at the end."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return ""

    def value(self) -> Any:
        """Parse the value at ``pos``; reads more text while the value is incomplete."""
        want = CHUNK_CHARS
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
            except RecursionError:  # nested deeper than the interpreter allows: never a crash
                raise self.error(f"a value nested deeper than {MAX_JSON_DEPTH} levels", self.pos) from None
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise self.error(exc.msg, exc.pos) from None
                self.more(want)
                want *= 2  # a big value: read in growing steps, so re-parsing stays linear
                continue
            if end == len(self.text) and not self.eof and self.text[self.pos] not in '{["':
                # a number may continue in the next chunk: make sure it has ended
                self.more()
                continue
            depth = json_depth(self.text[self.pos : end])
            if depth > MAX_JSON_DEPTH:
                raise self.error(
                    f"a value nested {depth} levels deep (the limit is {MAX_JSON_DEPTH})", self.pos
                )
            self.pos = end
            return value

    def expect(self, chars: str, what: str) -> str:
        char = self.skip_whitespace()
        if not char:
            raise self.error(f"the document ends early (expected {what})", self.pos)
        if char not in chars:
            raise self.error(f"expected {what}", self.pos)
        self.pos += 1
        return char

    def error(self, message: str, pos: int) -> JsonStreamError:
        absolute = self._dropped + pos
        before = self.text[:pos]
        newlines = before.count("\n")
        line = self._lines_before + newlines + 1
        column = pos - before.rindex("\n") if newlines else absolute - self._line_start_offset + 1
        return JsonStreamError(message, line, column)


def iter_json_events(stream: BinaryIO, stream_keys: frozenset[str]) -> Iterator[tuple[str, Any, Any]]:
    """Events of the JSON document in ``stream`` (see the module doc)."""
    buf = _Buffer(stream)
    first = buf.skip_whitespace()
    if first == "[":
        yield ("start", "array", None)
        buf.pos += 1
        yield from _array_items(buf, None)
    elif first == "{":
        yield ("start", "object", None)
        buf.pos += 1
        if buf.skip_whitespace() == "}":
            buf.pos += 1
        else:
            while True:
                if buf.skip_whitespace() != '"':
                    raise buf.error("expected a member name in double quotes", buf.pos)
                key = buf.value()
                buf.expect(":", "':'")
                if key in stream_keys and buf.skip_whitespace() == "[":
                    buf.pos += 1
                    yield from _array_items(buf, key)
                else:
                    buf.skip_whitespace()
                    yield ("member", key, buf.value())
                if buf.expect(",}", "',' or '}'") == "}":
                    break
    elif first == "":
        raise buf.error("empty document", buf.pos)
    else:
        yield ("start", "value", None)
        yield ("value", None, buf.value())
    if buf.skip_whitespace():
        raise buf.error("extra data after the document", buf.pos)


def _array_items(buf: _Buffer, key: str | None) -> Iterator[tuple[str, Any, Any]]:
    yield ("array", key, None)
    if buf.skip_whitespace() == "]":
        buf.pos += 1
        return
    index = 0
    while True:
        if not buf.skip_whitespace():
            raise buf.error("the document ends inside an array", buf.pos)
        yield ("item", (key, index), buf.value())
        index += 1
        if buf.expect(",]", "',' or ']'") == "]":
            return
