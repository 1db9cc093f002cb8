"""Trace files → span rows: format detection, decompression, streaming, problems with positions.

Used by ``hourglass import`` (rows go to the store) and ``hourglass analyze FILE...`` (rows go
straight to the analysis)::

    reader = TraceFileReader(on_problem=print)
    for table in reader.read(["traces.jsonl.gz", "jaeger.json"]):
        ...                      # pa.Table of collector.schema.SPAN_SCHEMA
    reader.reports               # per file: format, spans kept, spans skipped, failed or not

**Detection is by content, never by file name.** Compression first, from magic bytes (gzip
``1f 8b``, bzip2 ``BZh``, xz ``fd 37 7a 58 5a 00``, zstd ``28 b5 2f fd`` — the file exporter's
``compression: zstd`` with its native-compression gate), then the decompressed content:

- text that starts with ``{`` or ``[`` → JSON. When its first lines each look like a whole object
  (see ``_read_json``), the file is JSON Lines (the Collector file exporter's default: one
  ``TracesData`` per line; Jaeger or Zipkin documents per line work too) and is streamed line by
  line. Otherwise it is one document: OTLP JSON (``resourceSpans``; also as Jaeger ``/api/v3`` and
  Grafana Tempo wrap it), Jaeger JSON (``data``, ``spans`` + ``processes``, model proto-JSON) or Zipkin v2
  (a list) — see ``hourglass.collector.readers``.
- binary starting with ``0x0A`` → one OTLP protobuf message; binary starting with a 4-byte
  big-endian size followed by ``0x0A`` → the file exporter's length-prefixed ``format: proto`` stream,
  streamed frame by frame. The file exporter's legacy ``compression: zstd`` compresses each message
  before framing it, for ``format: proto`` and ``format: json`` alike: a frame whose payload is zstd is
  decompressed, then read as protobuf or as OTLP JSON.

**Problems** are reported through ``on_problem`` as :class:`FileProblem` and printed as
``FILE:POSITION: reason``. POSITION is a line number for JSON Lines (``traces.jsonl:3``, with the
JSON path inside the line when known: ``traces.jsonl:3:resourceSpans[0]...spans[2].traceId``), a
byte offset in the decompressed stream for protobuf streams (``traces.pb:byte 1045``), a JSON path
for documents (``jaeger.json:data[0].spans[3].spanID``), or ``LINE:COLUMN`` for JSON syntax errors.
A bad record is skipped and the good records beside it are kept: a bad span costs that span, a
bad resource in an OTLP JSON document that resource, a damaged OTLP protobuf message the
resources from the damage on, a truncated or corrupt compressed stream what comes after the damage.
``skipped=False`` problems are warnings: the record was kept with what is known (e.g. a Zipkin
span without a duration); a file found in a folder that is not a trace file is ignored with one.

**Cost**: JSON Lines and protobuf streams are read record by record and decoded in batches of
about ``batch_bytes`` (protobuf frames are concatenated — protobuf merges concatenated messages —
and JSON lines merged into one ``TracesData``), so the per-call overhead of the decoder is paid per
batch, not per record. A batch is re-decoded record by record only when it has a problem, to name
the record. A single JSON document is streamed too: the big array of the export (Jaeger ``data``,
OTLP ``resourceSpans``, a Zipkin list) is parsed element by element (``hourglass.collector.readers.json_stream``)
and converted in chunks of ``DOCUMENT_CHUNK_SPANS``; only a flat Zipkin span list is held whole
(its spans are grouped by trace before conversion) and one Jaeger trace with its ``processes``.
"""

from __future__ import annotations

import bz2
import gc
import gzip
import io
import json
import lzma
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import zstandard

from hourglass.collector import json_limits
from hourglass.collector.decode import DecodeError, DecodeResult, decode_export_request, decode_otlp_json
from hourglass.collector.readers import RecordProblem
from hourglass.collector.readers.jaeger import (
    is_jaeger_json,
    jaeger_api_errors,
    jaeger_to_otlp_json,
    jaeger_traces_to_otlp_json,
)
from hourglass.collector.readers.json_stream import JsonStreamError, iter_json_events
from hourglass.collector.readers.otlp_json import (
    is_otlp_json,
    merge_traces_data,
    resource_spans_of,
    unwrap_otlp_json,
)
from hourglass.collector.readers.otlp_proto import (
    FramingError,
    iter_length_prefixed,
    looks_like_length_prefixed,
    split_resource_spans,
)
from hourglass.collector.readers.zipkin import is_zipkin_json, zipkin_items_to_otlp_json, zipkin_to_otlp_json

__all__ = [
    "FileProblem",
    "FileReport",
    "TraceFileReader",
    "detect_format",
    "expand_path_origins",
    "expand_paths",
    "gc_tuned_for_bulk_reading",
    "read_trace_files",
]

DEFAULT_BATCH_BYTES = 8 * 1024 * 1024
# Longer first lines mean a one-line document, not JSON Lines (the Collector writes one export
# request per line: a few MiB at most with its default batch sizes).
JSONL_MAX_LINE_BYTES = 16 * 1024 * 1024
# A streamed JSON document is converted and decoded in chunks of about this many spans.
DOCUMENT_CHUNK_SPANS = 20_000
# Members whose array is streamed element by element (the bulk of every trace export).
STREAMED_KEYS = frozenset({"data", "resourceSpans", "resource_spans", "batches"})
STDIN_PATH = "-"
HEAD_BYTES = 64 * 1024
READ_BUFFER_BYTES = 1024 * 1024
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Errors a decompressor raises on truncated or corrupt input.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    zstandard.ZstdError,
    EOFError,
    gzip.BadGzipFile,
    zlib.error,
    lzma.LZMAError,
    OSError,
)


@dataclass(frozen=True)
class FileProblem:
    """A problem in one file: where and why; ``skipped`` says whether data was dropped."""

    file: str
    position: str | None
    reason: str
    skipped: bool = True
    # the records it stands for: the spans a decoded batch rejected beyond those it itemised are one
    # problem (``reason`` without their number, so that every batch's are one kind)
    count: int = 1

    def __str__(self) -> str:
        where = f"{self.file}:{self.position}" if self.position else self.file
        reason = f"and {self.count} {self.reason}" if self.count > 1 else self.reason
        return f"{where}: {reason}" if self.skipped else f"{where}: warning: {reason}"


@dataclass
class FileReport:
    """What happened to one file."""

    file: str
    format: str | None = None  # e.g. "otlp-jsonl", "zipkin-json"
    compression: str | None = None  # "gzip", "zstd", "bzip2", "xz" or None
    size_bytes: int = 0
    spans: int = 0  # rows produced
    skipped_spans: int = 0  # spans (or records) left out
    problems: int = 0  # problems that dropped data
    warnings: int = 0
    failed: bool = False  # the file, or its rest, could not be read
    from_folder: bool = False  # found by expanding a folder argument
    ignored: bool = False  # found in a folder and not a trace file at all: skipped with a warning

    @property
    def clean(self) -> bool:
        return not (self.failed or self.problems or self.skipped_spans)


class _CountingReader(io.RawIOBase):
    """Raw file wrapper that reports every byte read (the progress bar counts file bytes)."""

    def __init__(self, raw: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self._raw = raw
        self._progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)  # type: ignore[attr-defined]
        if n and self._progress is not None:
            self._progress(n)
        return n or 0


class _ZstdReader(io.RawIOBase):
    """A zstd stream of one or more frames, decompressed as it is read.

    Unlike ``zstandard``'s own stream reader, input that ends inside a frame raises ``EOFError``
    (a truncated file must be reported, not read as a shorter one).
    """

    def __init__(self, source: BinaryIO) -> None:
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._source = source
        self._pending = b""
        self._offset = 0
        self._in_frame = False
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset >= len(self._pending):
            if self._done:
                return 0
            chunk = self._source.read(READ_BUFFER_BYTES)
            if not chunk:
                self._done = True
                if self._in_frame:
                    raise EOFError("zstd data ended before the end of its frame")
                return 0
            self._pending, self._offset = self._feed(chunk), 0
        n = min(len(buffer), len(self._pending) - self._offset)
        buffer[:n] = self._pending[self._offset : self._offset + n]
        self._offset += n
        return n

    def _feed(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            self._in_frame = True
            out.append(self._frame.decompress(chunk))
            if not self._frame.eof:
                break
            chunk = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
            self._in_frame = False
        return b"".join(out)


def zstd_decompress_frame(data: bytes) -> bytes:
    """One complete zstd frame (the file exporter's per-message compression); raises ``EOFError``
    when it is cut short."""
    frame = zstandard.ZstdDecompressor().decompressobj()
    out = frame.decompress(data)
    if not frame.eof:
        raise EOFError("zstd frame is incomplete")
    return out


class _HeadThenRest(io.RawIOBase):
    """Serves bytes already read for detection, then the rest of the stream (or the error that
    cut the head short, so that the data before a truncation is still read)."""

    def __init__(self, head: bytes, rest: BinaryIO, error: BaseException | None = None) -> None:
        self._head = memoryview(head)
        self._rest = rest
        self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        # read1: one decompressor step at a time, so that a truncation loses only the data after it
        data = self._rest.read1(len(buffer))  # type: ignore[attr-defined]
        buffer[: len(data)] = data
        return len(data)


def _read_head(stream: BinaryIO, size: int) -> tuple[bytes, BaseException | None]:
    """Up to ``size`` bytes, and the decompression error that stopped the reading early, if any."""
    chunks = []
    have = 0
    error: BaseException | None = None
    while have < size:
        try:
            chunk = stream.read1(size - have)  # type: ignore[attr-defined]
        except _STREAM_ERRORS as exc:
            error = exc
            break
        if not chunk:
            break
        chunks.append(chunk)
        have += len(chunk)
    return b"".join(chunks), error


_BINARY_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def detect_format(head: bytes) -> str:
    """The format family of decompressed content from its first bytes.

    Returns ``"json"`` (JSON or JSON Lines; decided later), ``"otlp-proto"`` (one message) or
    ``"otlp-proto-stream"`` (length-prefixed); raises ``ValueError`` saying what the bytes look like.
    """
    if not head:
        raise ValueError("empty file")
    text_head = head[3:] if head.startswith(b"\xef\xbb\xbf") else head
    stripped = text_head.lstrip()
    if stripped[:1] in (b"{", b"[") and not _BINARY_CONTROL.search(text_head[:4096]):
        return "json"
    if head[0] == 0x0A:
        return "otlp-proto"
    if looks_like_length_prefixed(head):
        return "otlp-proto-stream"
    if not stripped:
        raise ValueError("the file holds only whitespace")
    if not _BINARY_CONTROL.search(text_head[:4096]):
        if re.search(rb"^\s*[{\[]", text_head, re.M):
            return "json"  # JSON Lines whose first line is damaged
        sample = stripped[:40].decode("utf-8", "replace").splitlines()[0]
        raise ValueError(
            f"not a trace file: text starting {sample!r}, not JSON; expected OTLP JSON/JSON Lines/"
            "protobuf, Jaeger JSON or Zipkin v2 JSON, optionally gzip-compressed"
        )
    raise ValueError(
        f"not a trace file this tool reads (starts with bytes {head[:8].hex(' ')}); expected OTLP JSON/"
        "JSON Lines/protobuf, Jaeger JSON or Zipkin v2 JSON, optionally gzip-compressed"
    )


def _open_decompressed(buffered: Any) -> tuple[Any, str | None]:
    magic = buffered.peek(6)[:6]
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered, mode="rb"), "gzip"
    if magic[:3] == b"BZh":
        return bz2.BZ2File(buffered, mode="rb"), "bzip2"
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(buffered, mode="rb"), "xz"
    if magic[:4] == ZSTD_MAGIC:
        return io.BufferedReader(_ZstdReader(buffered), READ_BUFFER_BYTES), "zstd"
    return buffered, None


def _json_value_kind(value: Any) -> str | None:
    if is_otlp_json(value):
        return "otlp-json"
    if is_zipkin_json(value):
        return "zipkin-json"
    if is_jaeger_json(value):
        return "jaeger-json"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:6])
        return f"a JSON object with keys {keys}" if keys else "an empty JSON object"
    if isinstance(value, list):
        first = value[0] if value else None
        return f"a JSON list of {type(first).__name__}" if value else "an empty JSON list"
    return f"a JSON {type(value).__name__}"


_PATH_PREFIX = re.compile(r"^([A-Za-z_$][\w$]*(?:\[\d+\]|\.[\w$]+)*|\[\d+\][\w$.\[\]]*): (.*)$", re.S)


def _split_path(message: str) -> tuple[str | None, str]:
    match = _PATH_PREFIX.match(message)
    if match is None:
        return None, message
    return match.group(1), match.group(2)


def _join_position(prefix: str, path: str | None) -> str | None:
    if prefix and path:
        return f"{prefix}:{path}"
    return prefix or path


class TraceFileReader:
    """Reads trace files into span tables, reporting problems as it goes (see the module doc)."""

    def __init__(
        self,
        *,
        on_problem: Callable[[FileProblem], None],
        progress: Callable[[int], None] | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
    ) -> None:
        self._on_problem = on_problem
        self._progress = progress
        self._batch_bytes = batch_bytes
        self.reports: list[FileReport] = []
        # JSON Lines: problems of a batch are held until it is decoded, then told in line order
        self._held: list[FileProblem] | None = None

    # ----------------------------------------------------------------------------------------
    def read(self, paths: Iterable[str | Path]) -> Iterator[pa.Table]:
        """Span tables from every file in turn (directories are expanded, see :func:`expand_paths`)."""
        for path, from_folder in expand_path_origins(paths):
            yield from self.read_file(path, from_folder=from_folder)

    def read_file(self, path: str | Path, *, from_folder: bool = False) -> Iterator[pa.Table]:
        """Span tables from one file. ``from_folder``: the file was found by expanding a folder, so
        one that is not a trace file at all (a README, a labels file) is ignored with a warning
        instead of counting as a failure; a named file always counts. ``-`` reads standard input."""
        stdin = str(path) == STDIN_PATH
        report = FileReport(file="<stdin>" if stdin else str(path), from_folder=from_folder)
        self.reports.append(report)
        try:
            # closed below; the generator outlives a with block
            raw = sys.stdin.buffer if stdin else open(path, "rb")  # noqa: SIM115
        except OSError as exc:
            self._problem(report, None, exc.strerror or str(exc), fatal=True)
            return
        try:
            try:
                report.size_bytes = 0 if stdin else Path(path).stat().st_size
            except OSError:
                report.size_bytes = 0
            buffered = io.BufferedReader(_CountingReader(raw, self._progress), READ_BUFFER_BYTES)
            try:
                stream, report.compression = _open_decompressed(buffered)
                head, head_error = _read_head(stream, HEAD_BYTES)
                if not head and head_error is not None:
                    raise head_error
                family = detect_format(head)
            except _STREAM_ERRORS as exc:  # the compressed data is damaged
                self._problem(
                    report,
                    None,
                    f"{report.compression or 'file'} data truncated or corrupt: {exc}",
                    fatal=True,
                )
                return
            except ValueError as exc:  # detect_format: not a trace file
                if from_folder:
                    self._ignore(report, str(exc))
                else:
                    self._problem(report, None, str(exc), fatal=True)
                return
            body = io.BufferedReader(_HeadThenRest(head, stream, head_error), READ_BUFFER_BYTES)
            if family == "json":
                yield from self._read_json(report, body)
            elif family == "otlp-proto":
                yield from self._read_proto_message(report, body)
            else:
                yield from self._read_proto_stream(report, body)
            if not (report.spans or report.skipped_spans or report.problems or report.ignored):
                self._warning(report, None, "the file holds no spans")
        finally:
            if not stdin:
                raw.close()

    # ----------------------------------------------------------------------------------------
    def _problem(self, report: FileReport, position: str | None, reason: str, *, fatal: bool = False) -> None:
        if fatal:
            report.failed = True
        report.problems += 1
        self._tell(FileProblem(report.file, position, reason))

    def _tell(self, problem: FileProblem) -> None:
        if self._held is not None:
            self._held.append(problem)
        else:
            self._on_problem(problem)

    def _release_held(self) -> None:
        held, self._held = self._held or [], []
        held.sort(key=lambda p: int(p.position.split(":", 1)[0]) if p.position else 0)
        for problem in held:
            self._on_problem(problem)

    def _ignore(self, report: FileReport, reason: str) -> None:
        report.ignored = True
        self._warning(report, None, f"{reason}; ignored (found in a folder)")

    def _warning(self, report: FileReport, position: str | None, reason: str) -> None:
        report.warnings += 1
        self._tell(FileProblem(report.file, position, reason, skipped=False))

    def _record_problems(self, report: FileReport, prefix: str, problems: list[RecordProblem]) -> None:
        for problem in problems:
            position = _join_position(prefix, problem.position)
            if problem.skipped:
                report.skipped_spans += 1
                self._problem(report, position, problem.reason)
            else:
                self._warning(report, position, problem.reason)

    def _decode_rejections(
        self, report: FileReport, prefix: str, result: DecodeResult, converted: bool
    ) -> None:
        if not result.rejected:
            return
        report.skipped_spans += result.rejected
        note = " (in the OTLP data converted from this record)" if converted else ""
        for message in result.errors:
            path, reason = _split_path(message)
            report.problems += 1
            self._tell(
                FileProblem(report.file, _join_position(prefix, path), f"{reason}; span skipped{note}")
            )
        more = result.rejected - len(result.errors)
        if more > 0:
            report.problems += 1
            self._tell(FileProblem(report.file, prefix or None, "more spans skipped for bad ids", count=more))

    def _emit(self, report: FileReport, table: pa.Table) -> Iterator[pa.Table]:
        if table.num_rows:
            report.spans += table.num_rows
            yield table

    # ----------------------------------------------------------------------------------------
    # JSON and JSON Lines

    def _convert(self, report: FileReport, prefix: str, value: Any) -> tuple[dict[str, Any], bool] | None:
        """OTLP JSON for one parsed document, converting Jaeger/Zipkin; None when not a trace document."""
        value = unwrap_otlp_json(value)
        kind = _json_value_kind(value)
        api_errors = jaeger_api_errors(value)
        if api_errors:  # the query API's own errors, saved with (or instead of) the data
            reason = f"the Jaeger query API answered with errors: {'; '.join(api_errors)}"
            if kind is None:
                self._problem(report, prefix or None, reason, fatal=not prefix)
                return None
            self._warning(report, prefix or None, reason)
        if kind is None and not prefix and report.from_folder:
            self._ignore(report, f"not a trace document: {_describe(value)}")
            return None
        if kind is None:
            if prefix:  # a line of a JSON Lines file: one record skipped
                report.skipped_spans += 1
            self._problem(
                report,
                prefix or None,
                f"not a trace document: {_describe(value)} (expected OTLP JSON 'resourceSpans', Jaeger "
                "JSON 'data'/'spans' or a Zipkin v2 list of spans)",
            )
            return None
        if report.format is None:
            report.format = kind
        if kind == "otlp-json":
            return value, False
        try:
            converted = zipkin_to_otlp_json(value) if kind == "zipkin-json" else jaeger_to_otlp_json(value)
        except (TypeError, AttributeError, ValueError) as exc:  # a document of a wrong shape deep inside
            self._problem(report, prefix or None, f"cannot read this {kind} document: {exc}")
            return None
        self._record_problems(report, prefix, converted.problems)
        return converted.traces_data, True

    def _decode_batch(
        self, report: FileReport, batch: list[tuple[str, dict[str, Any], bool]]
    ) -> Iterator[pa.Table]:
        if not batch:
            return
        if len(batch) > 1:
            try:
                merged = decode_otlp_json(merge_traces_data([doc for _, doc, _ in batch]))
            except DecodeError:
                merged = None
            if merged is not None and not merged.rejected:
                yield from self._emit(report, merged.table)
                return
        for prefix, doc, converted in batch:  # one by one, to say which record holds the problem
            try:
                result = decode_otlp_json(doc)
            except DecodeError as exc:
                resources = resource_spans_of(doc)
                if len(resources) > 1:  # a bad resource or scope: keep the other resources
                    yield from self._decode_resources(report, prefix, resources, converted)
                    continue
                path, reason = _split_path(str(exc))
                report.skipped_spans += 1
                self._problem(report, _join_position(prefix, path), f"{reason}; record skipped")
                continue
            self._decode_rejections(report, prefix, result, converted)
            yield from self._emit(report, result.table)

    def _decode_resources(
        self,
        report: FileReport,
        prefix: str,
        resources: list[Any],
        converted: bool,
        *,
        first: int = 0,
        key: str = "resourceSpans",
    ) -> Iterator[pa.Table]:
        """Decode a document's ``resourceSpans`` one at a time, so that one bad resource or scope
        (which the decoder refuses whole) costs only its own spans; paths keep their real index
        (``first`` is the index of ``resources[0]`` in the document, ``key`` the array's name)."""
        for offset, resource in enumerate(resources):

            def real_path(message: str, index: int = first + offset) -> str:
                return message.replace("resourceSpans[0]", f"{key}[{index}]", 1)

            try:
                result = decode_otlp_json({"resourceSpans": [resource]})
            except DecodeError as exc:
                path, reason = _split_path(real_path(str(exc)))
                spans = _count_spans(resource)
                report.skipped_spans += max(spans, 1)
                self._problem(report, _join_position(prefix, path), f"{reason}; its {spans} spans skipped")
                continue
            result.errors = [real_path(message) for message in result.errors]
            self._decode_rejections(report, prefix, result, converted)
            yield from self._emit(report, result.table)

    def _read_json(self, report: FileReport, body: BinaryIO) -> Iterator[pa.Table]:
        """JSON Lines or one document? Decided on the first three non-empty lines, without parsing
        them (a one-line document may be huge): JSON Lines when two of them look like whole objects
        or arrays (``{`` ... ``}``), or the first does and another line follows. A line longer than
        ``JSONL_MAX_LINE_BYTES`` means one document. A file of one line is a document (positions
        then read ``data[0]...``, not ``1:data[0]...``)."""
        first_lines: list[bytes] = []
        looks_whole: list[bool] = []
        try:
            while len(looks_whole) < 3:
                line = body.readline(JSONL_MAX_LINE_BYTES)
                if not line:
                    break
                first_lines.append(line)
                if not line.strip():
                    continue
                complete = line.endswith(b"\n") or len(line) < JSONL_MAX_LINE_BYTES
                looks_whole.append(complete and _looks_whole(line))
                if not complete:
                    break
        except _STREAM_ERRORS as exc:
            self._problem(
                report, None, f"{report.compression or 'file'} data truncated or corrupt: {exc}", fatal=True
            )
            return
        jsonl = looks_whole.count(True) >= 2 or (len(looks_whole) >= 2 and looks_whole[0])
        if jsonl:
            yield from self._read_jsonl(report, first_lines, body)
        else:
            yield from self._read_json_document(report, first_lines, body)

    def _read_json_document(
        self, report: FileReport, first_lines: list[bytes], body: BinaryIO
    ) -> Iterator[pa.Table]:
        """One JSON document, streamed: the elements of its big array (Jaeger ``data``, OTLP
        ``resourceSpans``, a Zipkin list of traces) are converted and decoded in chunks of about
        ``DOCUMENT_CHUNK_SPANS`` spans, so memory follows the chunk, not the file. Shapes whose parts
        depend on each other (a flat Zipkin span list, one Jaeger trace with its ``processes``) are
        gathered whole first."""
        stream = io.BufferedReader(_HeadThenRest(b"".join(first_lines), body), READ_BUFFER_BYTES)
        damage = "the document is cut short or corrupt"
        try:
            yield from self._document_events(report, iter_json_events(stream, STREAMED_KEYS))
        except JsonStreamError as exc:
            kept = "; the traces before are kept" if report.spans else ""
            self._problem(
                report, f"{exc.line}:{exc.column}", f"invalid JSON: {exc.message}{kept}", fatal=True
            )
        except UnicodeDecodeError as exc:
            self._problem(report, None, f"not UTF-8 text: {exc.reason}", fatal=True)
        except _STREAM_ERRORS as exc:
            damage = f"{report.compression or 'file'} data truncated or corrupt ({exc})"
            kept = "; the traces before are kept" if report.spans else ""
            self._problem(report, None, f"{damage}{kept}", fatal=True)

    def _document_events(
        self, report: FileReport, events: Iterator[tuple[str, Any, Any]]
    ) -> Iterator[pa.Table]:
        _, top, _ = next(events)
        members: dict[str, Any] = {}
        scalar: Any = None
        gathered: list[Any] = []  # items of a shape that must be read whole
        gathered_key: str | None = None
        unit: str | None = None  # what a streamed item is: jaeger-trace, zipkin-trace, otlp-resource
        chunk: list[tuple[str, Any]] = []
        chunk_spans = 0
        # a flat Zipkin span list: spans grouped by trace (low 64 bits of the id, as Zipkin pairs
        # 64- and 128-bit ids), converted a group of traces at a time once the list is read
        zipkin_traces: dict[str, list[tuple[str, Any]]] = {}
        for event, where, value in events:
            if event == "member":
                members[where] = value
                continue
            if event == "value":
                scalar = value
                continue
            if event == "array":
                if gathered_key is None:
                    gathered_key = where  # kept even when the array is empty
                continue
            key, index = where
            if unit is None:
                unit = _stream_unit(key, value)
            if unit == "gather":
                gathered.append(value)
                continue
            if unit == "zipkin-span":
                trace = value.get("traceId") if isinstance(value, dict) else None
                group = trace[-16:].lower() if isinstance(trace, str) else repr(trace)
                zipkin_traces.setdefault(group, []).append((f"[{index}]", value))
                continue
            chunk.append((f"{key}[{index}]" if key else f"[{index}]", value))
            chunk_spans += _unit_spans(unit, value)
            if chunk_spans >= DOCUMENT_CHUNK_SPANS:
                yield from self._decode_units(report, unit, chunk)
                chunk, chunk_spans = [], 0
        if unit == "zipkin-span":
            for spans in zipkin_traces.values():
                chunk.extend(spans)
                if len(chunk) >= DOCUMENT_CHUNK_SPANS:
                    yield from self._decode_units(report, "zipkin-trace", chunk)
                    chunk = []
            zipkin_traces.clear()
            unit = "zipkin-trace"
        if unit not in (None, "gather"):
            yield from self._decode_units(report, unit, chunk)
            errors = jaeger_api_errors({"data": None, **members})
            if errors:
                self._warning(report, None, f"the Jaeger query API answered with errors: {'; '.join(errors)}")
            return
        # nothing streamed: the whole document, as it was
        if top == "array":
            document: Any = gathered
        elif top == "object":
            document = members
            if gathered_key is not None:
                document[gathered_key] = gathered
        else:
            document = scalar
        converted = self._convert(report, "", document)
        if converted is None:
            report.failed = not report.ignored
            return
        yield from self._decode_batch(report, [("", converted[0], converted[1])])

    def _decode_units(
        self, report: FileReport, unit: str, chunk: list[tuple[str, Any]]
    ) -> Iterator[pa.Table]:
        if not chunk:
            return
        if report.format is None:
            report.format = {"jaeger-trace": "jaeger-json", "zipkin-trace": "zipkin-json"}.get(
                unit, "otlp-json"
            )
        if unit == "otlp-resource":
            key = chunk[0][0].split("[", 1)[0]
            first = int(chunk[0][0][len(key) + 1 : -1])
            resources = [value for _, value in chunk]
            try:
                result = decode_otlp_json({"resourceSpans": resources})
            except DecodeError:
                result = None
            if result is not None and not result.rejected:
                yield from self._emit(report, result.table)
            else:  # one resource at a time, to name the bad ones by their real index
                yield from self._decode_resources(report, "", resources, False, first=first, key=key)
            return
        if unit == "jaeger-trace":
            converted = jaeger_traces_to_otlp_json(chunk)
        else:
            converted = zipkin_items_to_otlp_json(chunk)
        self._record_problems(report, "", converted.problems)
        yield from self._decode_batch(report, [("", converted.traces_data, True)])

    def _read_jsonl(self, report: FileReport, first_lines: list[bytes], body: BinaryIO) -> Iterator[pa.Table]:
        report.format = None  # set from the first good line, suffixed with "l" below
        self._held = []
        try:
            yield from self._jsonl_lines(report, first_lines, body)
        finally:
            self._held = None

    def _jsonl_lines(
        self, report: FileReport, first_lines: list[bytes], body: BinaryIO
    ) -> Iterator[pa.Table]:
        batch: list[tuple[str, dict[str, Any], bool]] = []
        batch_bytes = 0
        lineno = 0
        stream_error: BaseException | None = None

        def lines() -> Iterator[bytes]:
            yield from first_lines
            yield from body

        try:
            for line in lines():
                lineno += 1
                if not line.strip():
                    continue
                if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                try:
                    value = json_limits.loads(line)
                except json_limits.JsonTooDeep as exc:
                    report.skipped_spans += 1
                    self._problem(report, str(lineno), f"{exc}; line skipped")
                    continue
                except json.JSONDecodeError as exc:
                    report.skipped_spans += 1
                    self._problem(report, f"{lineno}:{exc.colno}", f"invalid JSON: {exc.msg}; line skipped")
                    continue
                except UnicodeDecodeError as exc:
                    report.skipped_spans += 1
                    self._problem(report, str(lineno), f"not UTF-8 text: {exc.reason}; line skipped")
                    continue
                converted = self._convert(report, str(lineno), value)
                if converted is None:
                    continue
                batch.append((str(lineno), converted[0], converted[1]))
                batch_bytes += len(line)
                if batch_bytes >= self._batch_bytes:
                    yield from self._decode_batch(report, batch)
                    self._release_held()
                    batch, batch_bytes = [], 0
        except _STREAM_ERRORS as exc:
            stream_error = exc
        yield from self._decode_batch(report, batch)
        self._release_held()
        if report.format is not None and not report.format.endswith("l"):
            report.format += "l"  # otlp-jsonl, jaeger-jsonl, zipkin-jsonl
        if stream_error is not None:
            self._problem(
                report,
                str(lineno + 1),
                f"{report.compression or 'file'} data truncated or corrupt ({stream_error}); "
                f"the lines before are kept, the rest of the file is lost",
                fatal=True,
            )
            self._release_held()

    # ----------------------------------------------------------------------------------------
    # protobuf

    def _read_proto_message(self, report: FileReport, body: BinaryIO) -> Iterator[pa.Table]:
        report.format = "otlp-proto"
        chunks = []
        stream_error: BaseException | None = None
        try:
            while chunk := body.read1(READ_BUFFER_BYTES):  # type: ignore[attr-defined]
                chunks.append(chunk)
        except _STREAM_ERRORS as exc:
            stream_error = exc
        data = b"".join(chunks)
        if stream_error is None:
            try:
                result = decode_export_request(data)
            except DecodeError:
                pass  # damaged somewhere: keep the resources that are whole, below
            else:
                self._decode_rejections(report, "", result, False)
                yield from self._emit(report, result.table)
                return
        yield from self._read_proto_pieces(report, data, report_damage=stream_error is None)
        if stream_error is not None:
            self._problem(
                report,
                f"byte {len(data)}",
                f"{report.compression or 'file'} data truncated or corrupt ({stream_error}); "
                "the whole resources before are kept",
                fatal=True,
            )

    def _read_proto_pieces(
        self, report: FileReport, data: bytes, *, report_damage: bool
    ) -> Iterator[pa.Table]:
        """A damaged message, one top-level ``resourceSpans`` at a time: keep every whole resource.
        ``report_damage=False`` when the caller reports the cause (a truncated compressed stream)."""
        pieces, damage = split_resource_spans(data)
        for offset, piece in pieces:
            try:
                result = decode_export_request(piece)
            except DecodeError as exc:
                report.skipped_spans += 1
                self._problem(report, f"byte {offset}", f"{exc}; this resourceSpans is skipped")
                continue
            self._decode_rejections(report, f"byte {offset}", result, False)
            yield from self._emit(report, result.table)
        if damage is not None and report_damage:
            report.skipped_spans += 1
            self._problem(
                report,
                f"byte {damage[0]}",
                f"not a whole OTLP protobuf message: {damage[1]}; the rest is lost",
                fatal=True,
            )

    def _decode_frames(self, report: FileReport, frames: list[tuple[int, bytes]]) -> Iterator[pa.Table]:
        if not frames:
            return
        if len(frames) > 1:
            try:
                merged = decode_export_request(b"".join(message for _, message in frames))
            except DecodeError:
                merged = None
            if merged is not None and not merged.rejected:
                yield from self._emit(report, merged.table)
                return
        for offset, message in frames:
            position = f"byte {offset}"
            try:
                result = decode_export_request(message)
            except DecodeError as exc:
                report.skipped_spans += 1
                self._problem(report, position, f"{exc}; message skipped")
                continue
            self._decode_rejections(report, position, result, False)
            yield from self._emit(report, result.table)

    def _json_frame(self, report: FileReport, position: str, payload: bytes) -> Iterator[pa.Table]:
        """A frame holding OTLP JSON (the file exporter's ``format: json`` with legacy compression)."""
        try:
            value = json_limits.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError, json_limits.JsonTooDeep) as exc:
            report.skipped_spans += 1
            self._problem(report, position, f"invalid JSON in the message: {exc}; message skipped")
            return
        converted = self._convert(report, position, value)
        if converted is not None:
            yield from self._decode_batch(report, [(position, converted[0], converted[1])])

    def _read_proto_stream(self, report: FileReport, body: BinaryIO) -> Iterator[pa.Table]:
        report.format = "otlp-proto-stream"
        frames: list[tuple[int, bytes]] = []
        size = 0
        failure: tuple[str, str] | None = None
        try:
            for offset, message in iter_length_prefixed(body):
                if message[:4] == ZSTD_MAGIC:
                    try:
                        message = zstd_decompress_frame(message)
                    except (EOFError, zstandard.ZstdError) as exc:
                        report.skipped_spans += 1
                        self._problem(report, f"byte {offset}", f"zstd-compressed message unreadable: {exc}")
                        continue
                if message.lstrip()[:1] == b"{":
                    report.format = "otlp-json-stream"
                    yield from self._json_frame(report, f"byte {offset}", message)
                    continue
                frames.append((offset, message))
                size += len(message)
                if size >= self._batch_bytes:
                    yield from self._decode_frames(report, frames)
                    frames, size = [], 0
        except FramingError as exc:
            failure = (f"byte {exc.offset}", f"{exc.reason}; the messages before are kept")
        except _STREAM_ERRORS as exc:
            end = frames[-1][0] + 4 + len(frames[-1][1]) if frames else 0
            failure = (
                f"byte {end}" if frames else "",
                f"{report.compression or 'file'} data truncated or corrupt ({exc}); the messages before are kept",
            )
        yield from self._decode_frames(report, frames)
        if failure is not None:
            self._problem(report, failure[0] or None, failure[1], fatal=True)


def _stream_unit(key: str | None, item: Any) -> str:
    """What the items of a streamed array are, decided on the first one; "gather" when they must
    be read whole (their conversion needs the rest of the document)."""
    if key in ("resourceSpans", "resource_spans", "batches"):
        return "otlp-resource"
    if (
        isinstance(item, dict)
        and isinstance(item.get("spans"), list)
        and (key == "data" or "processes" in item)
    ):
        return "jaeger-trace"
    if key is None and isinstance(item, list):
        return "zipkin-trace"  # /api/v2/traces: a list of traces, each a list of spans
    if key is None and isinstance(item, dict) and "traceId" in item and "id" in item:
        return "zipkin-span"  # /api/v2/trace/{id} or a UI download: one list of spans
    return "gather"


def _unit_spans(unit: str, item: Any) -> int:
    if unit == "otlp-resource":
        return _count_spans(item)
    if unit == "jaeger-trace":
        return len(item["spans"])
    return len(item) if isinstance(item, list) else 1


def _count_spans(resource: Any) -> int:
    """Spans in one OTLP JSON ``resourceSpans`` entry, as far as its shape allows counting."""
    scopes = resource.get("scopeSpans") if isinstance(resource, dict) else None
    if not isinstance(scopes, list):
        return 0
    return sum(len(s["spans"]) for s in scopes if isinstance(s, dict) and isinstance(s.get("spans"), list))


def _looks_whole(line: bytes) -> bool:
    """A line that starts and ends like one JSON object or array (the JSON Lines test)."""
    text = line.strip()
    if text.startswith(b"\xef\xbb\xbf"):
        text = text[3:].lstrip()
    return (text[:1] == b"{" and text.endswith(b"}")) or (text[:1] == b"[" and text.endswith(b"]"))


def expand_path_origins(paths: Iterable[str | Path]) -> list[tuple[Path, bool]]:
    """``(file, found_in_a_folder)``: files as given; a folder stands for the files under it
    (recursively, sorted, hidden files and folders skipped)."""
    out: list[tuple[Path, bool]] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            out.extend((p, True) for p in found)
        else:
            out.append((path, False))
    return out


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """The files :func:`expand_path_origins` finds, without their origin."""
    return [path for path, _ in expand_path_origins(paths)]


# Reading builds and drops millions of small dicts and lists, none of them in cycles; with the
# default thresholds (700, 10, 10) the cyclic collector keeps re-walking the live ones and costs
# 30-50 % of the read (measured on the bench-import files). Bulk readers raise the thresholds.
BULK_GC_THRESHOLDS = (100_000, 50, 100)


@contextmanager
def gc_tuned_for_bulk_reading() -> Iterator[None]:
    """Raise the cyclic GC thresholds while a command reads trace files; restore them after.

    Process-wide, so it is for commands (``hourglass import``, ``analyze FILE...``), not for the
    server. Memory is unaffected: the objects are freed by reference counting as before."""
    previous = gc.get_threshold()
    gc.set_threshold(*BULK_GC_THRESHOLDS)
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def read_trace_files(
    paths: Iterable[str | Path],
    *,
    on_error: Callable[[FileProblem], None],
    progress: Callable[[int], None] | None = None,
) -> Iterator[pa.Table]:
    """Span tables from trace files; problems go to ``on_error`` (see :class:`TraceFileReader`)."""
    return TraceFileReader(on_problem=on_error, progress=progress).read(paths)
