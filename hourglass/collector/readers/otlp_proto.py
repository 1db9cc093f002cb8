"""OTLP protobuf files: one binary ``TracesData``/``ExportTraceServiceRequest``, or the Collector file
exporter's ``format: proto`` stream.

The file exporter (opentelemetry-collector-contrib ``exporter/fileexporter``, ``file_writer.go``,
``exportMessageAsBuffer``) writes each marshalled message preceded by its size as a 4-byte
big-endian unsigned integer; it uses the same framing for JSON when ``compression`` is set. The
framing needs no protobuf classes, so it lives here; parsing is :mod:`hourglass.collector.decode`.

Detection: a ``TracesData`` message starts with the tag of field 1 (``resource_spans``, wire type 2),
byte ``0x0A``; a length-prefixed stream starts with a big-endian size whose first byte is zero for
any message under 16 MiB, followed by that same ``0x0A`` (or nothing, for an empty message) — or by
the zstd magic number when the exporter's legacy ``compression: zstd`` compressed each message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

__all__ = [
    "FRAME_HEADER_BYTES",
    "FramingError",
    "iter_length_prefixed",
    "looks_like_length_prefixed",
    "split_resource_spans",
]

FRAME_HEADER_BYTES = 4
_HEADER = struct.Struct(">I")
FIELD_1_LEN_TAG = 0x0A
ZSTD_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"  # legacy ``compression: zstd`` compresses each message


class FramingError(ValueError):
    """A length-prefixed stream that ends inside a frame; ``offset`` is the frame's start."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


def looks_like_length_prefixed(head: bytes) -> bool:
    """True when ``head`` (the first bytes of a file) starts like a length-prefixed OTLP stream."""
    if len(head) < FRAME_HEADER_BYTES or head[0] != 0:
        return False
    (size,) = _HEADER.unpack_from(head)
    if size == 0:
        return True
    payload = head[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + 4]
    return payload[:1] == bytes([FIELD_1_LEN_TAG]) or payload == ZSTD_FRAME_MAGIC


def iter_length_prefixed(
    stream: BinaryIO, *, max_message_bytes: int = 1 << 30
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(byte offset of the frame, message bytes)`` for each frame, reading frame by frame.

    Raises :class:`FramingError` for a header or message cut short by the end of the stream, or
    a size over ``max_message_bytes`` (a corrupt header would otherwise ask for gigabytes).
    """
    offset = 0
    while True:
        header = stream.read(FRAME_HEADER_BYTES)
        if not header:
            return
        if len(header) < FRAME_HEADER_BYTES:
            raise FramingError(offset, f"stream ends inside a frame header ({len(header)} of 4 bytes)")
        (size,) = _HEADER.unpack(header)
        if size > max_message_bytes:
            raise FramingError(
                offset, f"frame header says {size} bytes, over the {max_message_bytes}-byte limit"
            )
        message = stream.read(size)
        if len(message) < size:
            raise FramingError(
                offset, f"truncated message: header says {size} bytes, only {len(message)} remain"
            )
        yield offset, message
        offset += FRAME_HEADER_BYTES + size


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the base-128 varint at ``pos``; ValueError when it is cut short."""
    value = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("ends inside a varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def split_resource_spans(data: bytes) -> tuple[list[tuple[int, bytes]], tuple[int, str] | None]:
    """Cut the bytes of a ``TracesData`` into its top-level ``resource_spans`` records.

    Each piece (tag, length and body) is itself a valid ``TracesData`` holding one resource, so a
    message the decoder refuses whole can be decoded piece by piece and lose only the damaged
    resource. Returns ``(pieces with their byte offsets, (offset, reason) of the first damage or
    None)``; reading stops at the first damage (nothing after it can be framed). Fields other than
    ``resource_spans`` are skipped as protobuf parsers do.
    """
    pieces: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        start = pos
        try:
            tag, pos = _varint(data, pos)
            wire_type = tag & 7
            if wire_type == 2:
                length, pos = _varint(data, pos)
                if pos + length > len(data):
                    return pieces, (
                        start,
                        f"truncated: a field says {length} bytes, only {len(data) - pos} remain",
                    )
                pos += length
            elif wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
                if pos > len(data):
                    return pieces, (start, "truncated inside a fixed-size field")
            else:
                return pieces, (start, f"unreadable field (wire type {wire_type})")
        except ValueError as exc:
            return pieces, (start, str(exc))
        if tag >> 3 == 1 and wire_type == 2:
            pieces.append((start, data[start:pos]))
    return pieces, None
