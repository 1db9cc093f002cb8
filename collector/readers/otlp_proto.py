"""OTLP protobuf files: one binary ``TracesData``/``ExportTraceServiceRequest``, or the Collector file
exporter's ``format: proto`` stream.

The file exporter (opentelemetry-collector-contrib ``exporter/fileexporter``, ``file_writer.go``,
``exportMessageAsBuffer``) writes each marshalled message preceded by its size as a 4-byte
big-endian unsigned integer; it uses the same framing for JSON when ``compression`` is set. The
framing needs no protobuf classes, so it lives here; parsing is :mod:`collector.decode`.

Detection: a ``TracesData`` message starts with the tag of field 1 (``resource_spans``, wire type 2),
byte ``0x0A``; a length-prefixed stream starts with a big-endian size whose first byte is zero for
any message under 16 MiB, followed by that same ``0x0A`` (or nothing, for an empty message) — or by
the zstd magic number when the exporter's legacy ``compression: zstd`` compressed each message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

__all__ = ["FRAME_HEADER_BYTES", "FramingError", "iter_length_prefixed", "looks_like_length_prefixed"]

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
