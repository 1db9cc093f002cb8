"""Which recommendations touch a trace: one definition, one index, built by the analysis.

The REST trace view (``GET /v1/traces/{id}``, also the exemplars of ``GET /v1/recommendations/{id}``),
MCP's ``get_trace`` and the report page's exemplar waterfalls all ask the same question of a
report; they all answer it with a :class:`TraceIndex`.

**Definition.** A recommendation *touches* a trace T when

1. T holds one of its finding's occurrences (every affected trace — known to the run that made
   the report, which builds the index with its findings: :meth:`TraceIndex.build`), or
2. T is one of its exemplar traces (``evidence.trace_ids``), or
3. one of its evidence span ids (``evidence.span_ids``) is a span of T.

Built from a report alone (:meth:`TraceIndex.from_report`, e.g. a report read back from JSON) only
2 and 3 are known.

For a touching recommendation, two sets of T's spans (each restricted to the spans T has):

* ``span_ids`` — every span of T it involves: the spans of its occurrences in T, the spans its
  interventions in T name, and its evidence span ids in T;
* ``bottleneck_span_ids`` — the spans the change acts on in T: the spans its interventions in T
  name (the what-if engine's, also recorded in the report as ``evidence.interventions`` for the
  exemplar traces); for a recommendation that re-times nothing in T, its evidence span ids in T.
  The report page marks these as "bottleneck span".

The index is a few dicts of the recommendations and, per trace, numpy arrays (see
:class:`TraceIndex`), so it travels from the analysis worker process by pickle, cheaply (the
arrays out of band, in a file the server reads: ``hourglass.api.analysis_worker``). The per-trace
arrays grow with the store (55 MiB at 12M stored spans); serve's worker writes them to a file
beside the store instead, a chunk at a time as it builds them (:meth:`TraceIndex.build` into a
folder: the file :meth:`TraceIndex.stored` writes of an index in memory), and the server reads
what a lookup needs from it (:meth:`TraceIndex.open_stored`: ``pread``, from the page cache), so
the index it keeps for as long as a report is served is not in its memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar

import numpy as np
import polars as pl

from hourglass.analysis import memlog
from hourglass.analysis.model import Finding, hex_text, hex_words


@dataclass(frozen=True)
class Touch:
    """One recommendation touching one trace (see the module docstring)."""

    recommendation_id: str
    span_ids: tuple[str, ...]
    bottleneck_span_ids: tuple[str, ...]


def intervention_span_ids(interventions: Iterable[Mapping[str, Any]]) -> set[str]:
    """The span ids the interventions name (``hourglass.analysis.whatif.intervention_to_dict`` form)."""
    out: set[str] = set()
    for iv in interventions:
        if isinstance(iv, Mapping):
            out.update(str(s) for s in iv.get("span_ids") or [])
            if iv.get("span_id") is not None:
                out.add(str(iv["span_id"]))
    return out


def _text_array(values: list[str]) -> np.ndarray:
    """Strings as one fixed-width bytes array (UTF-8): a few bytes each instead of a Python object."""
    if not values:
        return np.array([], dtype="S1")
    return np.array([v.encode() for v in values], dtype=bytes)


def _texts(values: np.ndarray, hexed: bool = False) -> tuple[str, ...]:
    """The strings of an array of :func:`_text_array` (``hexed``: of :func:`_hex_packed`)."""
    if hexed:
        width = values.dtype.itemsize  # numpy drops the trailing zero bytes of an element
        return tuple(v.ljust(width, b"\0").hex() for v in values.tolist())
    return tuple(v.decode() for v in values.tolist())


_NIBBLE = np.full(256, 255, dtype=np.uint8)  # the value of a lowercase hex digit's byte, else 255
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def _hex_packed(texts: np.ndarray) -> np.ndarray | None:
    """A sorted :func:`_text_array` of ids that are all lowercase hex of one even length (OTLP's
    trace and span ids) as the bytes they spell, half the width and in the same order; None when
    they are not all such."""
    width = texts.dtype.itemsize
    if len(texts) == 0 or width % 2:
        return None
    nibbles = _NIBBLE[np.ascontiguousarray(texts).view(np.uint8).reshape(len(texts), width)]
    if (nibbles == 255).any():  # not hex, upper case, or shorter (padded with zero bytes)
        return None
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(f"S{width // 2}").ravel()


def _compact(texts: np.ndarray) -> tuple[np.ndarray, bool]:
    """(``texts`` hex-packed when they can be, whether they are)."""
    packed = _hex_packed(texts)
    return (texts, False) if packed is None else (packed, True)


def _hex_key(text: str, width: int) -> bytes | None:
    """The key of ``text`` in an array hex-packed to ``width`` bytes (None: it cannot be in it)."""
    if len(text) != 2 * width or not all(c in "0123456789abcdef" for c in text):
        return None
    return bytes.fromhex(text)


def _coded(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct values sorted, as :func:`_text_array`; each value's position among them):
    one sort of the strings (numpy, fixed-width bytes), the rest in integers."""
    try:
        texts = np.array(values, dtype=bytes) if values else _text_array([])  # ASCII, in C
    except UnicodeEncodeError:
        texts = _text_array(values)
    order = np.argsort(texts, kind="stable")
    ordered = texts[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    code = np.empty(len(order), dtype=np.int64)
    code[order] = np.cumsum(first) - 1
    return ordered[first], code


def _distinct(values: np.ndarray) -> np.ndarray:
    """The distinct integers, sorted."""
    values = np.sort(values)
    keep = np.ones(len(values), dtype=bool)
    keep[1:] = values[1:] != values[:-1]
    return values[keep]


def _joined(parts: Iterable[Sequence[str] | pl.Series]) -> str | None:
    """The ids of ``parts`` (sequences or String series of ids, one after another) joined by
    newlines, in C-level loops (a series' by polars: no Python string per id); None when they
    are not all strings."""
    texts = []
    for part in parts:
        if isinstance(part, pl.Series):
            if part.null_count() or part.dtype != pl.String:
                return None
            if len(part):  # (an empty part adds no newline)
                texts.append(part.str.join("\n").item())
        elif part:
            try:
                texts.append("\n".join(part))
            except TypeError:
                return None
    return "\n".join(texts)


# the spans of :meth:`TraceIndex._pack` sorted this many at a time (whole entries per chunk): 0.5
# MiB per column of the sort's working arrays (1 << 18 spans: the sort's ~20 MiB was the largest
# part of the index's peak in serve's worker, ~2/3 of it at 2.4M stored spans; no slower)
_SPAN_CHUNK = 1 << 16
# the rows (occurrences) whose keys and named span ids :meth:`TraceIndex.build` reads at a time
_ROW_CHUNK = 1 << 13
# about the rows (occurrences and exemplars) :meth:`TraceIndex.build` packs at a time when there
# are more: those of one range of trace ids, read from each finding and packed before the next
# range's (:meth:`TraceIndex._bucketed`)
_BUCKET_ROWS = 1 << 16

_HEX_OR_NEWLINE = b"0123456789abcdef\n"
_SEPARATOR = ord("\n")


def _hex_words(text: str | None, n: int) -> tuple[list[np.ndarray], int] | None:
    """``n`` ids joined by newlines (:func:`_joined`), when they are all lowercase hex of one even
    length (OTLP's trace and span ids), as the bytes they spell, read as big-endian 64-bit words
    (the last one zero padded) so that the ids' words compare as their text does: (the words, one
    uint64 column per word; bytes per id); None when they are not all such (or there are none).
    In C-level passes over the text: the checks, then one hex decode."""
    if text is None or n == 0:
        return None
    if not text.isascii():  # (a flag of the string: no pass over it)
        return None
    width = (len(text) + 1) // n - 1
    if len(text) != n * (width + 1) - 1 or width <= 0 or width % 2:
        return None
    data = text.encode("ascii")
    # only hex digits and newlines, a newline after every ``width`` characters, and (the decoded
    # length) ``width`` digits per id: every id is ``width`` lowercase hex digits
    if data.translate(None, _HEX_OR_NEWLINE):
        return None
    if not (np.frombuffer(data, dtype=np.uint8)[width :: width + 1] == _SEPARATOR).all():
        return None
    del data
    size = width // 2
    try:
        packed = np.frombuffer(bytes.fromhex(text), dtype=np.uint8)  # fromhex skips the newlines
    except ValueError:
        return None
    del text
    if len(packed) != n * size:
        return None
    words = -(-size // 8)
    if size != 8 * words:
        padded = np.zeros((n, 8 * words), dtype=np.uint8)
        padded[:, :size] = packed.reshape(n, size)
        packed = padded.reshape(-1)
    rows = packed.view(">u8").reshape(n, words)
    return [rows[:, j].astype(np.uint64) for j in range(words)], size


def _word_arrays(parts: list[Sequence[str] | pl.Series | np.ndarray]) -> list[np.ndarray] | None:
    """The words of the ids of ``parts`` as the parts give them, one (ids, words) array per
    non-empty part, when a part holds words (a finding's ids as it holds them:
    ``hourglass.analysis.model.hex_words``, lowercase hex of 16 or 32 digits) and every part is
    such words, or ids of that shape, of one width; else None."""
    if not any(isinstance(part, np.ndarray) for part in parts):
        return None
    arrays: list[np.ndarray] = []
    for part in parts:
        if not len(part):
            continue
        if isinstance(part, np.ndarray):
            words: np.ndarray | None = part
        else:
            try:
                series = part if isinstance(part, pl.Series) else pl.Series(list(part), dtype=pl.String)
            except (TypeError, pl.exceptions.PolarsError):
                series = None
            words = None if series is None else hex_words(series)
        if words is None or (arrays and arrays[0].shape[1] != words.shape[1]):
            return None
        arrays.append(words)
    return arrays or None


def _as_text(parts: list[Sequence[str] | pl.Series | np.ndarray]) -> list[Sequence[str] | pl.Series]:
    return [hex_text(part) if isinstance(part, np.ndarray) else part for part in parts]


def _words(
    parts: list[Sequence[str] | pl.Series | np.ndarray], n: int
) -> tuple[tuple[list[np.ndarray], int] | None, list[Sequence[str] | pl.Series]]:
    """(:func:`_hex_words` of the ``n`` ids of ``parts``, one after another; the parts as text).
    A part is a sequence or a String series of ids, or the words of ids a finding holds as words
    (``hourglass.analysis.model.hex_words``: lowercase hex of 16 or 32 digits): when every part
    is such words, or ids of that shape, of one width, the words are taken as they are (no text
    made, joined and parsed again); else the text of every part is read as before."""
    arrays = _word_arrays(parts)
    if arrays is not None:
        joined = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        return ([joined[:, j].copy() for j in range(joined.shape[1])], 8 * joined.shape[1]), []
    text = _as_text(parts)
    return _hex_words(_joined(text), n), text


class _Words:
    """The words of ids (:func:`_hex_words`), read by their positions among the ids: kept in the
    parts they came in (a finding's own words, not copied nor joined; read-only here), or as one
    column per word."""

    def __init__(
        self, arrays: list[np.ndarray] | None = None, columns: list[np.ndarray] | None = None
    ) -> None:
        self.arrays, self.columns = arrays or [], columns
        self.starts = np.cumsum([0, *(len(a) for a in self.arrays)])
        self.width = len(columns) if columns is not None else self.arrays[0].shape[1]

    def column(self, j: int) -> np.ndarray:
        """Word ``j`` of every id (uint64, a copy)."""
        if self.columns is not None:
            return self.columns[j].copy()
        out = np.empty(int(self.starts[-1]), dtype=np.uint64)
        for array, a in zip(self.arrays, self.starts[:-1].tolist(), strict=True):
            out[a : a + len(array)] = array[:, j]
        return out

    def take(self, rows: np.ndarray) -> list[np.ndarray]:
        """The words of the ids at ``rows``: one uint64 column per word."""
        if self.columns is not None:
            return [column[rows] for column in self.columns]
        if len(self.arrays) == 1:
            return [self.arrays[0][rows, j].astype(np.uint64) for j in range(self.width)]
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = [np.empty(len(rows), dtype=np.uint64) for _ in range(self.width)]
        for p in np.unique(part).tolist():
            mask = part == p
            local = rows[mask] - self.starts[p]
            for j, column in enumerate(out):
                column[mask] = self.arrays[p][local, j]
        return out


class _RowWords:
    """The words of the span ids the interventions of findings' occurrences name, read a chunk of
    rows at a time (:meth:`take_rows`) from each finding's occurrences, so that every finding's
    named ids are never copied out at once: the rows are first some rows whose ids are given as
    words (``given``, one array per row: the exemplars), then each finding's occurrences."""

    def __init__(
        self, given: list[np.ndarray], given_counts: np.ndarray, findings: list[Any], width: int
    ) -> None:
        self.width = width
        self.given = np.concatenate(given) if given else np.zeros((0, width), dtype=np.uint64)
        self.given_at = np.zeros(len(given_counts) + 1, dtype=np.int64)
        np.cumsum(given_counts, out=self.given_at[1:])
        self.findings = findings  # their ``occurrence_table``s
        self.firsts = np.cumsum([len(given_counts), *(len(own) for own in findings)])

    def take_rows(self, rows: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
        """The words of the ids of ``rows`` (``lengths`` each), row after row: one uint64 column
        per word."""
        out = [np.empty(int(lengths.sum()), dtype=np.uint64) for _ in range(self.width)]
        part = np.searchsorted(self.firsts, rows, side="right")  # 0: given; p: finding p - 1
        ends = np.cumsum(lengths)
        for p in np.unique(part).tolist():
            mask = part == p
            local = rows[mask] - (self.firsts[p - 1] if p else 0)
            counts = lengths[mask]
            if not counts.sum():  # (its named ids need not be words)
                continue
            if p == 0:
                words = self.given[_ranges(self.given_at[local], counts)]
            else:
                words = self.findings[p - 1].intervention_columns(local).span_words
            at = _ranges(ends[mask] - counts, counts)
            for j, column in enumerate(out):
                column[at] = words[:, j]
        return out


def _changed_reader(
    given_parts: list[Any], changed_of: list[np.ndarray], widths: list[int | None], tables: list[Any]
) -> _RowWords | None:
    """:class:`_RowWords` of the changed spans :meth:`TraceIndex.build` collected (``given_parts``:
    one part per exemplar; ``widths``: per finding, the width of the words its named ids are
    held as, None when they are not words, 0 when it names none) when they would be read as
    words (as :func:`_word_arrays` would), else None."""
    named = {width for width in widths if width != 0}
    if not named or None in named or len(named) != 1:
        return None
    (width,) = named
    assert width is not None
    given: list[np.ndarray] = []
    for part in given_parts:
        if len(part):
            words = hex_words(pl.Series(list(part), dtype=pl.String))
            if words is None or words.shape[1] != width:
                return None
            given.append(words)
    counts = np.concatenate(changed_of)
    if not counts.sum():
        return None
    return _RowWords(given, counts[: len(given_parts)], tables, width)


def _named_counts(occurrences: Any, a: int, b: int) -> tuple[np.ndarray, int | None]:
    """(how many span ids the interventions of occurrences ``a`` to ``b`` name, each; the width of
    the words they are held as, None when they are not words: ``None`` ids, of a ShortenSpan or
    ScaleSelf of no span id, name none)."""
    ivs = occurrences.intervention_columns(np.arange(a, b, dtype=np.int64))
    owner = np.repeat(ivs.owner, ivs.span_counts) - a
    words = ivs.span_words
    if words is None:
        ids = ivs.span_ids
        if ids.null_count():
            owner = owner[ids.is_not_null().to_numpy()]
    return np.bincount(owner, minlength=b - a).astype(np.int64), None if words is None else words.shape[1]


def _named_ids(occurrences: Any) -> pl.Series | np.ndarray:
    """The span ids the interventions of every occurrence name, one after another (those of
    :func:`_named_counts`): the words they are held as, else a String series."""
    ivs = occurrences.intervention_columns()
    if ivs.span_words is not None:
        return ivs.span_words
    ids = ivs.span_ids
    return ids.filter(ids.is_not_null()) if ids.null_count() else ids


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of ``n`` rows ``size`` at a time."""
    for a in range(0, n, size):
        yield a, min(a + size, n)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions ``starts[i] .. starts[i] + lengths[i] - 1``, range after range."""
    total = np.cumsum(lengths)
    return np.repeat(starts - (total - lengths), lengths) + np.arange(
        int(total[-1]) if len(total) else 0, dtype=np.int64
    )


def _word_reader(
    parts: list[Sequence[str] | pl.Series | np.ndarray], n: int
) -> tuple[tuple[_Words, int] | None, list[Sequence[str] | pl.Series]]:
    """:func:`_words`, the words read by position from the parts (:class:`_Words`) rather than
    joined into new columns of every id."""
    arrays = _word_arrays(parts)
    if arrays is not None:
        return (_Words(arrays=arrays), 8 * arrays[0].shape[1]), []
    text = _as_text(parts)
    hexed = _hex_words(_joined(text), n)
    return (None if hexed is None else (_Words(columns=hexed[0]), hexed[1])), text


def _hex_bytes(words: list[np.ndarray], size: int) -> np.ndarray:
    """Ids' :func:`_hex_words` as the bytes of the ids (as :func:`_hex_packed` gives them)."""
    raw = np.empty((len(words[0]), 8 * len(words)), dtype=np.uint8)
    for j, column in enumerate(words):
        raw[:, 8 * j : 8 * j + 8] = column.astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.ascontiguousarray(raw[:, :size]).view(f"S{size}").ravel()


def _row_order(group: np.ndarray, words: list[np.ndarray]) -> np.ndarray:
    """The stable order of rows by ``group`` (small non-negative integers), then ``words`` (uint64
    columns, compared left to right). One sort of 64-bit keys, the group in the high bits and the
    first word's leading bits below it (quick on rows already in group order: the stable sort
    keeps the runs it finds), then the rows whose keys tie put in full order among themselves
    (the places of a run of equal keys in the order are the run's whatever its rows' order)."""
    bits = max(int(group.max(initial=0)).bit_length(), 1)
    key = (group.astype(np.uint64) << np.uint64(64 - bits)) | (words[0] >> np.uint64(bits))
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    same = ordered[1:] == ordered[:-1]
    if same.any():
        tied = np.zeros(len(order), dtype=bool)
        tied[1:] = same
        tied[:-1] |= same
        rows = order[tied]
        order[tied] = rows[np.lexsort((*(w[rows] for w in reversed(words)), group[rows]))]
    return order


def _key_order(words: _Words, recs: np.ndarray) -> np.ndarray:
    """:func:`_row_order` of the rows by (the words of their ids, ``recs``) in one group, reading
    only the first word of every row and all of the key of the rows whose first word's leading
    bits tie (not every row's key copied at once)."""
    n = len(recs)
    key = words.column(0)  # (its own copy: shifted in place)
    key >>= np.uint64(1)  # (as _row_order keys one group: the word's leading 63 bits)
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    del key
    same = ordered[1:] == ordered[:-1]
    del ordered
    if same.any():
        tied = np.zeros(n, dtype=bool)
        tied[1:] = same
        tied[:-1] |= same
        rows = order[tied]
        keys = [*words.take(rows), recs[rows].astype(np.uint64)]
        order[tied] = rows[np.lexsort(tuple(reversed(keys)))]
    return order


def _changes(columns: list[np.ndarray]) -> np.ndarray:
    """Per row of equally long columns: whether it differs from the row before (the first: True)."""
    out = np.zeros(len(columns[0]), dtype=bool)
    out[:1] = True
    for column in columns:
        out[1:] |= column[1:] != column[:-1]
    return out


class _StoredFile:
    """The file a stored index's arrays are read from (:meth:`TraceIndex.stored`): read with
    ``pread`` (the page cache's pages, nothing mapped into the process), by any thread. Pickled
    as its path: the reader opens it again (:meth:`TraceIndex.open_stored`)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "fd": None}

    def open(self, *, consume: bool) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if consume:  # the open file outlives its name: nothing is left behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def read(self, offset: int, size: int) -> bytes:
        if self.fd is None:
            raise RuntimeError(f"the trace index stored in {self.path} is not open (TraceIndex.open_stored)")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise EOFError(f"the trace index file {self.path} ends before byte {offset + size}")
        return data

    def __del__(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _copy_file(source: _StoredFile, fd: int) -> None:
    """The whole of ``source`` (open) written to ``fd`` by the kernel (``copy_file_range``), else
    read and written a piece at a time: never the whole file in this process's memory."""
    assert source.fd is not None
    size = os.fstat(source.fd).st_size
    done = 0
    if hasattr(os, "copy_file_range"):
        with contextlib.suppress(OSError):  # (not between these file systems: piece by piece)
            while done < size:
                copied = os.copy_file_range(source.fd, fd, size - done, done, done)
                if copied <= 0:
                    break
                done += copied
    while done < size:
        done += os.pwrite(fd, source.read(done, min(_COPY_PIECE, size - done)), done)


_COPY_PIECE = 8 << 20


class _StoredArray:
    """A one-dimensional array in a :class:`_StoredFile`, read per access: an element, a slice
    (as numpy gives them) or, in :meth:`searchsorted`, the elements of a binary search."""

    def __init__(self, file: _StoredFile, offset: int, dtype: np.dtype[Any], length: int) -> None:
        self.file, self.offset, self.dtype, self.length = file, offset, dtype, length

    def __len__(self) -> int:
        return self.length

    def _read(self, start: int, count: int) -> np.ndarray:
        size = self.dtype.itemsize
        return np.frombuffer(self.file.read(self.offset + start * size, count * size), dtype=self.dtype)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.length)
            if step != 1:
                raise IndexError("a stored array reads contiguous slices only")
            count = max(stop - start, 0)
            return self._read(start, count) if count else np.zeros(0, dtype=self.dtype)
        i = int(key)
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {int(key)} out of range for a stored array of {self.length}")
        return self._read(i, 1)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def searchsorted(self, key: bytes) -> int:
        """As ``np.searchsorted`` (left) of ``key`` in this sorted bytes array: elements compared
        as numpy does, zero-padded to a common width, byte by byte."""
        width = max(self.dtype.itemsize, len(key))
        wanted = key.ljust(width, b"\0")
        size = self.dtype.itemsize
        low, high = 0, self.length
        while low < high:
            middle = (low + high) // 2
            element = self.file.read(self.offset + middle * size, size).ljust(width, b"\0")
            if element < wanted:
                low = middle + 1
            else:
                high = middle
        return low


# the per-trace arrays (what grows with the store), in the order a stored index's file holds them
_ARRAYS = ("_trace_ids", "_entries", "_entry_recs", "_involved", "_changed", "_involved_ids", "_changed_ids")
_STORED_ALIGNMENT = 64  # each array's offset in the file


class _Sink:
    """Where :meth:`TraceIndex._pack` puts the per-trace arrays, one after another in the order
    of :data:`_ARRAYS`: each begins with its length (or, None, as long as what is appended to it
    until it ends), then its elements are put by position (or appended)."""

    def begin(self, name: str, dtype: np.dtype[Any], length: int | None, capacity: int = 0) -> None:
        raise NotImplementedError

    def put(self, name: str, start: int, values: np.ndarray) -> None:
        raise NotImplementedError

    def append(self, name: str, values: np.ndarray) -> None:
        raise NotImplementedError

    def end(self, name: str) -> None:
        raise NotImplementedError

    def whole(self, name: str, values: np.ndarray) -> None:
        """An array put in one piece."""
        self.begin(name, values.dtype, len(values))
        self.put(name, 0, values)

    def result(self) -> dict[str, Any]:
        """The arrays, by name."""
        raise NotImplementedError

    def discard(self) -> None:
        """After an error: nothing left behind."""


class _MemorySink(_Sink):
    """The arrays in memory (an appended one in an array of its capacity, copied to its length
    unless that is nearly all of it)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}

    def begin(self, name: str, dtype: np.dtype[Any], length: int | None, capacity: int = 0) -> None:
        self.arrays[name] = np.empty(capacity if length is None else length, dtype=dtype)
        self.filled[name] = 0

    def put(self, name: str, start: int, values: np.ndarray) -> None:
        self.arrays[name][start : start + len(values)] = values

    def append(self, name: str, values: np.ndarray) -> None:
        self.put(name, self.filled[name], values)
        self.filled[name] += len(values)

    def end(self, name: str) -> None:
        array, filled = self.arrays[name], self.filled[name]
        self.arrays[name] = (
            array[:filled] if filled >= len(array) - len(array) // 16 else array[:filled].copy()
        )

    def whole(self, name: str, values: np.ndarray) -> None:
        self.arrays[name] = values

    def result(self) -> dict[str, Any]:
        return dict(self.arrays)


class _FileSink(_Sink):
    """The arrays written to a new file in ``folder`` as they are put, where
    :meth:`TraceIndex.stored` would write them (each at the next multiple of
    ``_STORED_ALIGNMENT`` after the last, zeros between): the result reads them from it."""

    def __init__(self, folder: str, prefix: str) -> None:
        self.fd, self.path = tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=folder)
        self.end_offset = 0  # where the arrays begun so far end
        self.placed: dict[str, tuple[int, np.dtype[Any], int | None]] = {}  # name -> offset, dtype, length
        self.appended = 0  # the elements of the array being appended to

    def begin(self, name: str, dtype: np.dtype[Any], length: int | None, capacity: int = 0) -> None:
        expected = _ARRAYS[len(self.placed)]
        if name != expected or any(placed is None for _, _, placed in self.placed.values()):
            raise RuntimeError(f"trace index file: {name} begun before {expected} (or an unfinished array)")
        offset = self.end_offset + (-self.end_offset % _STORED_ALIGNMENT)
        self.placed[name] = (offset, np.dtype(dtype), length)
        self.end_offset = offset + (dtype.itemsize * length if length is not None else 0)
        self.appended = 0

    def put(self, name: str, start: int, values: np.ndarray) -> None:
        offset, dtype, _ = self.placed[name]
        data = np.ascontiguousarray(values, dtype=dtype).view(np.uint8)
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
        at = offset + start * dtype.itemsize
        while view:
            done = os.pwrite(self.fd, view, at)
            view, at = view[done:], at + done

    def append(self, name: str, values: np.ndarray) -> None:
        self.put(name, self.appended, values)
        self.appended += len(values)

    def end(self, name: str) -> None:
        offset, dtype, _ = self.placed[name]
        self.placed[name] = (offset, dtype, self.appended)
        self.end_offset = offset + dtype.itemsize * self.appended

    def result(self) -> dict[str, Any]:
        if list(self.placed) != list(_ARRAYS):
            raise RuntimeError(f"trace index file: arrays {list(self.placed)} written, not {list(_ARRAYS)}")
        os.ftruncate(self.fd, self.end_offset)  # (the zeros after a last array that is empty)
        os.close(self.fd)
        self.fd = -1
        file = _StoredFile(self.path)
        return {
            name: _StoredArray(file, offset, dtype, int(length or 0))
            for name, (offset, dtype, length) in self.placed.items()
        }

    def discard(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _joined_words(parts: list[Any]) -> list[Sequence[str] | pl.Series | np.ndarray]:
    """Parts of ids' words (arrays of one width) as one array (none: no part)."""
    given = [part for part in parts if len(part)]
    return [np.concatenate(given) if len(given) > 1 else given[0]] if given else []


def _rows_in(words: np.ndarray, low: np.uint64 | None, high: np.uint64 | None) -> np.ndarray:
    """The rows of trace ids' ``words`` whose first word is from ``low`` (None: any) to before
    ``high`` (None: any): one bucket of :meth:`TraceIndex._bucketed`."""
    keep = np.ones(len(words), dtype=bool)
    if low is not None:
        keep &= words[:, 0] >= low
    if high is not None:
        keep &= words[:, 0] < high
    return np.flatnonzero(keep)


def _bucket_rows(
    own: Any, low: np.uint64 | None, high: np.uint64 | None, widths: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | tuple[()] | None:
    """The occurrences of ``own`` (a finding's ``Occurrences``) in one bucket of
    :meth:`TraceIndex._bucketed` (:func:`_rows_in` ``low`` and ``high``): (their trace
    ids' words; their span ids' words, one occurrence after another; how many each has; the
    words of the span ids their interventions name, likewise; how many each names), copies of
    those rows alone; () when none is in the bucket; None when these ids are not all words, or of
    another width than the first seen of their kind (``widths``)."""
    words = own.trace_id_words()
    if words is None or widths.setdefault("trace", words.shape[1]) != words.shape[1]:
        return None
    rows = _rows_in(words, low, high)
    if not len(rows):
        return ()
    traces = words[rows]
    counts = own.span_counts()
    spans_of = counts[rows].astype(np.int64)
    spans = np.zeros((0, 1), dtype=np.uint64)
    if spans_of.any():
        span_words = own.span_id_words()
        if span_words is None or widths.setdefault("span", span_words.shape[1]) != span_words.shape[1]:
            return None
        spans = span_words[_ranges((np.cumsum(counts) - counts)[rows], spans_of)]
    del counts
    ivs = own.intervention_columns(rows)
    named_of = np.bincount(
        np.repeat(np.searchsorted(rows, ivs.owner), ivs.span_counts), minlength=len(rows)
    ).astype(np.int64)
    named = np.zeros((0, 1), dtype=np.uint64)
    if named_of.any():
        named_words = ivs.span_words
        if named_words is None or widths.setdefault("named", named_words.shape[1]) != named_words.shape[1]:
            return None
        named = named_words
    return traces, spans, spans_of, named, named_of


class _Streams:
    """The per-trace arrays made a bucket at a time (:meth:`TraceIndex._bucketed`), each appended
    to as its elements come, whatever the others': in memory (chunks, joined at the end), or each
    in a file of its own in ``folder``, copied at the end into one new file there where
    :meth:`TraceIndex.stored` would write them (the parts' files then removed), which the result
    reads them from."""

    # the dtype of an array nothing is appended to (as :meth:`TraceIndex._pack` makes it empty)
    EMPTY: ClassVar[dict[str, np.dtype[Any]]] = {
        "_trace_ids": np.dtype("S1"),
        "_entries": np.dtype(np.int64),
        "_entry_recs": np.dtype(np.int32),
        "_involved": np.dtype(np.int64),
        "_changed": np.dtype(np.int64),
        "_involved_ids": np.dtype("S1"),
        "_changed_ids": np.dtype("S1"),
    }

    def __init__(self, folder: str | None, prefix: str) -> None:
        self.folder, self.prefix = folder, prefix
        self.length = dict.fromkeys(_ARRAYS, 0)
        self.dtype: dict[str, np.dtype[Any] | None] = dict.fromkeys(_ARRAYS)
        self.chunks: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
        self.files: dict[str, tuple[int, str]] = {}  # name -> its part's file (fd, path)
        self.made: str | None = None  # the file of the result

    def append(self, name: str, values: np.ndarray) -> None:
        if not len(values):
            return
        dtype = self.dtype[name]
        if dtype is None:
            dtype = self.dtype[name] = values.dtype
        elif values.dtype != dtype:
            raise ValueError(f"trace index: {name} of {values.dtype} after {dtype}")
        if self.folder is None:
            self.chunks[name].append(np.array(values, copy=True))  # (not a view of a bucket's arrays)
        else:
            if name not in self.files:
                fd, path = tempfile.mkstemp(prefix=f"{self.prefix}part-", suffix=".bin", dir=self.folder)
                self.files[name] = (fd, path)
            _write(self.files[name][0], np.ascontiguousarray(values), None)
        self.length[name] += len(values)

    def result(self) -> dict[str, Any]:
        """The arrays, by name (the parts' files removed)."""
        dtypes = {name: self.dtype[name] or self.EMPTY[name] for name in _ARRAYS}
        if self.folder is None:
            return {
                name: np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtypes[name])
                for name, chunks in self.chunks.items()
            }
        fd, self.made = tempfile.mkstemp(prefix=self.prefix, suffix=".bin", dir=self.folder)
        file = _StoredFile(self.made)
        out: dict[str, Any] = {}
        try:
            offset = 0
            for name in _ARRAYS:
                offset += -offset % _STORED_ALIGNMENT
                size = self.length[name] * dtypes[name].itemsize
                if size:
                    _copy(self.files[name][0], fd, offset, size)
                out[name] = _StoredArray(file, offset, dtypes[name], self.length[name])
                offset += size
            os.ftruncate(fd, offset)  # (the zeros before a last array that is empty)
        finally:
            os.close(fd)
        self._remove_parts()
        return out

    def _remove_parts(self) -> None:
        for fd, path in self.files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.files = {}

    def discard(self) -> None:
        """After an error, or when the buckets are not used: nothing left behind."""
        self._remove_parts()
        self.chunks = {name: [] for name in _ARRAYS}
        if self.made is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.made)
            self.made = None


def _write(fd: int, values: np.ndarray, at: int | None) -> None:
    """The bytes of ``values`` written to ``fd`` at ``at`` (None: where the file's offset is)."""
    view = memoryview(values.view(np.uint8)).cast("B")  # type: ignore[arg-type]
    while view:
        done = os.write(fd, view) if at is None else os.pwrite(fd, view, at)
        view = view[done:]
        if at is not None:
            at += done


def _copy(source: int, target: int, at: int, size: int) -> None:
    """The first ``size`` bytes of file ``source`` copied into file ``target`` at ``at`` (in the
    kernel where it can: no copy through this process's memory)."""
    done = 0
    while done < size:
        try:
            step = os.copy_file_range(source, target, size - done, done, at + done)
        except (AttributeError, OSError):  # (not on this system, or not between these files)
            step = 0
        if step <= 0:
            data = os.pread(source, min(size - done, 1 << 20), done)
            if not data:
                raise OSError(
                    "trace index: a part's file ends early"
                )  # (an OSError: the index is built in memory instead)
            os.pwrite(target, data, at + done)
            step = len(data)
        done += step


class _BucketSink(_Sink):
    """One bucket's arrays (:meth:`TraceIndex._pack` of the rows of one range of trace ids)
    appended to ``streams`` after those of the buckets before it: each array's elements taken in
    order, the entries' and the span ids' positions moved past the buckets' before, the first
    offset of each entry's spans (0) and the trace's entries' last (their count) left to the
    whole (:meth:`TraceIndex._bucketed` puts them once)."""

    def __init__(self, streams: _Streams) -> None:
        self.streams = streams
        self.base = {
            "_entries": streams.length["_entry_recs"],
            "_involved": streams.length["_involved_ids"],
            "_changed": streams.length["_changed_ids"],
        }
        self.size: dict[str, int | None] = {}
        self.filled: dict[str, int] = {}
        self.dtype: dict[str, np.dtype[Any]] = {}

    def begin(self, name: str, dtype: np.dtype[Any], length: int | None, capacity: int = 0) -> None:
        self.size[name], self.filled[name], self.dtype[name] = length, 0, np.dtype(dtype)

    def put(self, name: str, start: int, values: np.ndarray) -> None:
        if start != self.filled[name]:
            raise RuntimeError(f"trace index bucket: {name} put at {start}, not after {self.filled[name]}")
        self.filled[name] += len(values)
        values = np.asarray(values, dtype=self.dtype[name])
        if name == "_entries":
            size = self.size[name]
            assert size is not None
            values = values[: max(size - 1 - start, 0)] + self.base[name]
        elif name in ("_involved", "_changed"):
            values = (values[1:] if start == 0 else values) + self.base[name]
        self.streams.append(name, values)

    def append(self, name: str, values: np.ndarray) -> None:
        self.put(name, self.filled[name], values)

    def end(self, name: str) -> None:
        pass


@dataclass(eq=False)
class TraceIndex:
    """trace id → recommendation id → (involved span ids, changed span ids), plus each
    recommendation's evidence span ids and rank; look a trace up with :meth:`touching`.

    The per-trace part covers every affected trace of the store (a third to two thirds of its
    traces), so it is packed in arrays rather than held as Python objects: the server keeps the
    index of its current report for as long as the report is served (a dict of tuples of span id
    strings per trace was ~2 KiB per trace, growing with the store by ~0.2 GiB per million traces
    indexed), and the analysis worker sends it to the server each round. Sorted trace ids (bytes)
    with each one's entries; per entry a recommendation (its position in ``_recs``) and two
    ranges of sorted span ids (bytes), the involved ones and the changed ones.
    """

    # recommendation id -> its evidence span ids
    evidence_spans: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # evidence span id -> the recommendations naming it
    by_span: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # recommendation id -> rank (the order of the answers)
    ranks: dict[str, int] = field(default_factory=dict)
    _recs: tuple[str, ...] = ()
    _trace_ids: np.ndarray = field(default_factory=lambda: _text_array([]))  # sorted
    _entries: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # per trace +1
    _entry_recs: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    _involved: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # per entry +1
    _changed: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))  # per entry +1
    _involved_ids: np.ndarray = field(default_factory=lambda: _text_array([]))
    _changed_ids: np.ndarray = field(default_factory=lambda: _text_array([]))
    # whether _trace_ids, _involved_ids, _changed_ids hold hex ids as the bytes they spell (half
    # the memory of their text: :func:`_hex_packed`)
    _hexed: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> TraceIndex:
        """The index of a report alone: exemplar traces and evidence span ids (rules 2 and 3)."""
        return cls.build(report, ())

    @staticmethod
    def indexed(report: Mapping[str, Any], findings: Iterable[Finding]) -> list[Finding]:
        """The findings :meth:`build` reads (rule 1): those the report carries, in order."""
        carried = {str(r["id"]) for r in report.get("recommendations") or [] if r.get("id") is not None}
        return [finding for finding in findings if finding.id in carried]

    @classmethod
    def build(
        cls,
        report: Mapping[str, Any],
        findings: Iterable[Finding],
        *,
        folder: str | None = None,
        prefix: str = "trace-index-",
        release: Callable[[], None] | None = None,
    ) -> TraceIndex:
        """The index of a report and the findings of the run that made it (rule 1 for every
        affected trace; findings the report does not carry are ignored).

        The per-trace part is built in columns (numpy), not as per-trace Python objects:
        what each occurrence adds is read off it once (its trace, its spans, the spans its
        interventions name), and the entries are then made unique, sorted and packed in bulk, a
        chunk at a time. With ``folder`` the per-trace arrays are written to a new file there as
        each chunk is made (the file :meth:`stored` writes, byte for byte) and the index returned
        reads them from it, so they are never all held (serve's worker: 55 MiB at 12M stored
        spans, and as much again of working copies); the file is the reader's to remove
        (:meth:`open_stored`), and an error removes it. ``release`` (serve's worker:
        ``malloc_trim``) is called after each range of trace ids is packed (:meth:`_bucketed`)."""
        index = cls()
        recs = [r for r in report.get("recommendations") or [] if r.get("id") is not None]
        by_span: dict[str, list[str]] = {}
        for position, rec in enumerate(recs):
            rec_id = str(rec["id"])
            rank = rec.get("rank")
            index.ranks[rec_id] = int(rank) if isinstance(rank, int) else position + 1
            spans = tuple(str(s) for s in (rec.get("evidence") or {}).get("span_ids") or [])
            index.evidence_spans[rec_id] = spans
            for span_id in spans:
                by_span.setdefault(span_id, []).append(rec_id)
        index.by_span = {s: tuple(dict.fromkeys(ids)) for s, ids in by_span.items()}
        index._recs = tuple(index.ranks)
        code = {rec_id: i for i, rec_id in enumerate(index._recs)}
        # Columns: the entries (trace, recommendation) and, per entry, its involved and changed
        # span ids (in parts: sequences of ids listing them entry after entry; ``*_of``: how
        # many each entry adds).
        entry_traces: list[str] = []
        entry_recs: list[int] = []
        changed: list[Sequence[str] | pl.Series | np.ndarray] = []
        changed_of: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        for rec in recs:  # rule 2: the exemplars, changed where their recorded interventions act
            evidence = rec.get("evidence") or {}
            recorded = evidence.get("interventions") or {}
            for trace_id in evidence.get("trace_ids") or []:
                named = intervention_span_ids(recorded.get(trace_id) or [])
                entry_traces.append(str(trace_id))
                entry_recs.append(code[str(rec["id"])])
                changed.append(sorted(named))
                changed_of.append(np.array([len(named)], dtype=np.int64))
        # rule 1: every occurrence of a reported finding, read off the finding's occurrence columns
        # (``Occurrences``) rather than one Python iteration per occurrence
        exemplars = len(entry_traces)
        indexed = cls.indexed(report, findings)
        rows = exemplars + sum(len(finding.occurrence_table) for finding in indexed)
        if rows > _BUCKET_ROWS:  # (in ranges of trace ids: not every finding's columns at once)
            arrays = index._bucketed(
                entry_traces, entry_recs, changed, changed_of, indexed, code, folder, prefix, release
            )
            if arrays is not None:
                for name, value in arrays.items():
                    setattr(index, name, value)
                return index
        # then each finding's (a series, or the words of its hex ids as the finding holds them)
        trace_parts: list[Sequence[str] | pl.Series | np.ndarray] = [entry_traces]
        involved: list[Sequence[str] | pl.Series | np.ndarray] = []
        involved_of: list[np.ndarray] = [np.zeros(exemplars, dtype=np.int64)]
        finding_recs: list[int] = []
        finding_sizes: list[int] = []
        tables: list[Any] = []
        widths: list[int | None] = []  # per finding: its named ids' words' width (None: not words; 0: none)
        for finding in indexed:
            own = finding.occurrence_table
            finding_recs.append(code[finding.id])  # the id once per finding, not per occurrence
            finding_sizes.append(len(own))
            trace_words = own.trace_id_words()
            trace_parts.append(own.trace_id_series() if trace_words is None else trace_words)
            span_words = own.span_id_words()
            involved.append(own.span_columns()[0] if span_words is None else span_words)
            involved_of.append(own.span_counts())
            # how many ids its interventions name per occurrence, a chunk of occurrences at a
            # time (their ids are read again when packed: not every finding's copied at once)
            counts = np.zeros(len(own), dtype=np.int64)
            width: int | None = 0
            for a, b in _chunks(len(own), _ROW_CHUNK):
                counts[a:b], words = _named_counts(own, a, b)
                width = None if words is None or width is None else words
            changed_of.append(counts)
            tables.append(own)
            widths.append(width if counts.any() else 0)
        # the named ids as words, a chunk of rows at a time, when every finding holds them so and
        # the exemplars' are such ids, of one width; else every finding's read (as text) here
        reader = _changed_reader(changed, changed_of, widths, tables)
        if reader is None:
            changed.extend(_named_ids(own) for own in tables)
        else:
            changed = []
        memlog.note("trace index: the findings' columns read")
        # per row (the exemplars', then each finding's occurrences): its recommendation, and how
        # many involved and changed span ids it has (the parts not held beside them)
        row_recs = np.concatenate(
            [
                np.asarray(entry_recs, dtype=np.int64),
                np.repeat(np.asarray(finding_recs, dtype=np.int64), finding_sizes),
            ]
        )
        row_involved = np.concatenate(involved_of)
        row_changed = np.concatenate(changed_of)
        del entry_recs, involved_of, changed_of
        sink: _Sink = _MemorySink() if folder is None else _FileSink(folder, prefix)
        try:
            index._pack(
                trace_parts,
                row_recs,
                involved,
                row_involved,
                changed if reader is None else reader,
                row_changed,
                sink,
            )
            arrays = sink.result()
        except BaseException:
            sink.discard()
            raise
        for name, value in arrays.items():
            setattr(index, name, value)
        return index

    def _bucketed(
        self,
        ex_traces: list[str],
        ex_recs: list[int],
        ex_named: list[Sequence[str] | pl.Series | np.ndarray],
        ex_named_of: list[np.ndarray],
        findings: list[Finding],
        code: Mapping[str, int],
        folder: str | None,
        prefix: str,
        release: Callable[[], None] | None = None,
    ) -> dict[str, Any] | None:
        """The per-trace arrays of :meth:`build` made a range of trace ids at a time (a bucket:
        about ``_BUCKET_ROWS`` rows, the ranges cut at quantiles of the trace ids' first words),
        when every id is held as words (OTLP's hex ids; None otherwise: :meth:`build` packs every
        row at once). Each bucket's rows are read from each finding in turn, which then lets its
        columns go (a parked finding's: :meth:`Occurrences.release`), and packed
        (:meth:`_pack`) after the bucket before it (:class:`_BucketSink`): a trace's entries are
        all in one bucket and the buckets' trace ids follow each other in order, so the arrays
        are the ones every row packed at once gives, while only one finding's columns and one
        bucket's rows are held (serve's worker at 12M stored spans: ~47 MiB of columns and as
        much again of working copies were held at once). ``release`` is called after each
        bucket: what a bucket freed (many arrays of a finding's rows in it, each of tens of KiB,
        from glibc's heap) is not kept resident under the next's (serve's worker: ``malloc_trim``;
        at 12M stored spans the heap grew by 25 MiB over the buckets without it)."""
        ex = len(ex_traces)
        widths: dict[str, int] = {}  # the words' widths: trace ids, span ids, named span ids

        def words_of(ids: list[str], kind: str) -> np.ndarray | None:
            words = hex_words(pl.Series(ids, dtype=pl.String)) if ids else np.zeros((0, 1), dtype=np.uint64)
            if words is None or (ids and widths.setdefault(kind, words.shape[1]) != words.shape[1]):
                return None
            return words

        ex_words = words_of(ex_traces, "trace")
        flat = [str(s) for part in ex_named for s in part]
        named_words = words_of(flat, "named")
        if ex_words is None or named_words is None:
            return None
        named_of = np.concatenate(ex_named_of).astype(np.int64)  # per exemplar: the ids it names
        named_at = np.cumsum(named_of) - named_of
        ex_rec = np.asarray(ex_recs, dtype=np.int64)
        # the buckets: quantiles of every row's first word of its trace id
        firsts = [ex_words[:, 0]] if ex else []
        for finding in findings:
            own = finding.occurrence_table
            if len(own):
                words = own.trace_id_words()
                if words is None or widths.setdefault("trace", words.shape[1]) != words.shape[1]:
                    own.release()
                    return None
                firsts.append(words[:, 0].copy())
                own.release()
        first = np.sort(np.concatenate(firsts))
        del firsts
        rows, buckets = len(first), -(-len(first) // max(_BUCKET_ROWS, 1))
        splits = np.unique(first[(np.arange(1, buckets, dtype=np.int64) * rows) // buckets])
        del first
        memlog.note(f"trace index: {len(splits) + 1} buckets planned")
        streams = _Streams(folder, prefix)
        try:
            streams.append("_involved", np.zeros(1, dtype=np.int64))
            streams.append("_changed", np.zeros(1, dtype=np.int64))
            for bucket in range(len(splits) + 1):
                low = splits[bucket - 1] if bucket else None
                high = splits[bucket] if bucket < len(splits) else None
                here = _rows_in(ex_words, low, high) if ex else np.zeros(0, dtype=np.int64)
                trace_parts: list[Sequence[str] | pl.Series | np.ndarray] = [ex_words[here]]
                rec_parts = [ex_rec[here]]
                involved: list[Sequence[str] | pl.Series | np.ndarray] = []
                involved_of = [np.zeros(len(here), dtype=np.int64)]
                changed: list[Sequence[str] | pl.Series | np.ndarray] = [
                    named_words[_ranges(named_at[here], named_of[here])]
                ]
                changed_of = [named_of[here]]
                for finding in findings:
                    own = finding.occurrence_table
                    if not len(own):
                        continue
                    try:
                        part = _bucket_rows(own, low, high, widths)
                    finally:
                        own.release()
                    if part is None:
                        streams.discard()
                        return None
                    if part:
                        traces, spans, spans_of, named, named_here = part
                        trace_parts.append(traces)
                        rec_parts.append(np.full(len(traces), code[finding.id], dtype=np.int64))
                        involved.append(spans)
                        involved_of.append(spans_of)
                        changed.append(named)
                        changed_of.append(named_here)
                if not sum(len(p) for p in rec_parts):
                    continue
                before = (streams.length["_involved_ids"], streams.length["_changed_ids"])
                # each kind of ids in one array (read by position in it, not in parts), the
                # parts let go
                trace_parts, involved, changed = (
                    _joined_words(trace_parts),
                    _joined_words(involved),
                    _joined_words(changed),
                )
                sink = _BucketSink(streams)
                self._pack(
                    trace_parts,
                    np.concatenate(rec_parts),
                    involved,
                    np.concatenate(involved_of),
                    changed,
                    np.concatenate(changed_of),
                    sink,
                    notes=False,
                )
                del trace_parts, rec_parts, involved, involved_of, changed, changed_of, sink
                trace_hex, involved_hex, changed_hex = self._hexed
                if not trace_hex or any(
                    streams.length[name] > count and not hexed
                    for name, count, hexed in zip(
                        ("_involved_ids", "_changed_ids"), before, (involved_hex, changed_hex), strict=True
                    )
                ):
                    streams.discard()  # (not the ids of every row: packed as they are, at once)
                    return None
                if release is not None:
                    release()
                memlog.note(f"trace index: bucket {bucket + 1}/{len(splits) + 1} packed")
            streams.append("_entries", np.array([streams.length["_entry_recs"]], dtype=np.int64))
            arrays = streams.result()
        except BaseException:
            streams.discard()
            raise
        self._hexed = (True, streams.length["_involved_ids"] > 0, streams.length["_changed_ids"] > 0)
        return arrays

    def _pack(
        self,
        entry_traces: list[Sequence[str] | pl.Series | np.ndarray],
        entry_recs: np.ndarray,
        involved: list[Sequence[str] | pl.Series | np.ndarray],
        involved_of: np.ndarray,
        changed: list[Sequence[str] | pl.Series | np.ndarray] | _RowWords,
        changed_of: np.ndarray,
        sink: _Sink,
        *,
        notes: bool = True,
    ) -> None:
        """The columns of :meth:`build` packed into ``sink``: trace ids sorted (in the byte order
        the lookup searches in), each trace's entries by recommendation, each entry's span ids
        sorted and unique (``notes``: its phases noted, :mod:`memlog`).

        OTLP's ids (lowercase hex, :func:`_hex_words`) are sorted as the 64-bit words they spell:
        the rows' keys (trace, recommendation) sorted first, then the trace ids and entries put a
        chunk of sorted rows at a time, then each entry's spans, a chunk of entries at a time,
        each entry's brought together first so that the sort finds them nearly in order
        (:func:`_row_order`). Any other ids are coded by their rank among the distinct ones (one
        sort of the strings), the rest in integers, and put whole."""
        rows = sum(len(part) for part in entry_traces)  # (the entries' trace ids, in parts)
        reading, entry_text = _word_reader(entry_traces, rows)
        position: np.ndarray | None = None  # each row's entry (made when a text path needs it)
        if reading is not None:
            trace_words, size = reading
            order = _key_order(trace_words, entry_recs)  # by (trace, recommendation)
            # per sorted row: whether it starts an entry, and a trace (a chunk at a time: no sorted
            # copy of every key)
            first = np.zeros(rows, dtype=bool)
            trace_first = np.zeros(rows, dtype=bool)
            for a, b in _chunks(rows, _ROW_CHUNK):
                before = max(a - 1, 0)  # (the row before the chunk, to compare its first with)
                here = order[before:b]
                sorted_keys = [*trace_words.take(here), entry_recs[here]]
                first[a:b] = _changes(sorted_keys)[a - before :]
                trace_first[a:b] = _changes(sorted_keys[:-1])[a - before :]
                del sorted_keys, here
            traces, entries = int(trace_first.sum()), int(first.sum())
            sink.begin("_trace_ids", np.dtype(f"S{size}"), traces)
            sink.begin("_entries", np.dtype(np.int64), traces + 1)
            sink.begin("_entry_recs", np.dtype(np.int32), entries)
            trace_at = entry_at = 0
            for a, b in _chunks(rows, _ROW_CHUNK):
                here, starts_entry, starts_trace = order[a:b], first[a:b], trace_first[a:b]
                trace_rows = here[starts_trace]
                sink.put("_trace_ids", trace_at, _hex_bytes(trace_words.take(trace_rows), size))
                sink.put("_entry_recs", entry_at, entry_recs[here[starts_entry]].astype(np.int32))
                # each trace's first entry (a trace starts where an entry does)
                entry_of = entry_at + np.cumsum(starts_entry) - 1
                sink.put("_entries", trace_at, entry_of[starts_trace].astype(np.int64))
                trace_at += len(trace_rows)
                entry_at += int(starts_entry.sum())
            sink.put("_entries", traces, np.array([entries], dtype=np.int64))
            row_entry = np.cumsum(first) - 1  # per sorted row: its entry (non-decreasing)
            trace_hex = True
            trace_words = first = trace_first = None  # type: ignore[assignment]
        else:
            texts, trace_code = _coded(list(chain.from_iterable(entry_text)))
            recs = max(len(self._recs), 1)
            entry_key = trace_code * recs + entry_recs
            keys = _distinct(entry_key)  # sorted: by trace, then recommendation
            position = np.searchsorted(keys, entry_key)
            order = np.argsort(position, kind="stable")
            trace_of = keys // recs
            starts = np.flatnonzero(np.r_[True, trace_of[1:] != trace_of[:-1]]) if len(keys) else trace_of
            trace_ids, trace_hex = _compact(texts[trace_of[starts]])
            entries = len(keys)
            sink.whole("_trace_ids", trace_ids)
            sink.whole("_entries", np.concatenate([starts, [entries]]).astype(np.int64))
            sink.whole("_entry_recs", (keys % recs).astype(np.int32))
            row_entry = position[order]
            texts = trace_code = entry_key = keys = trace_of = starts = trace_ids = None  # type: ignore[assignment]
        sink.begin("_involved", np.dtype(np.int64), entries + 1)
        sink.begin("_changed", np.dtype(np.int64), entries + 1)
        # the spans need only each row's entry and the rows' order: the rest not held through them
        reading = entry_text = None  # type: ignore[assignment]
        if notes:
            memlog.note("trace index: entries sorted")

        def spans(
            parts: list[Sequence[str] | pl.Series | np.ndarray] | _RowWords,
            counts: np.ndarray,
            offsets: str,
            ids: str,
        ) -> bool:
            """Each entry's span ids, sorted and unique, into ``ids`` and where each entry's start
            into ``offsets``; whether they are hex-packed."""
            nonlocal position
            reading: tuple[_Words | _RowWords, int] | None
            text: list[Sequence[str] | pl.Series]
            if isinstance(parts, _RowWords):
                reading, text = (parts, 8 * parts.width), []
            else:
                reading, text = _word_reader(parts, int(counts.sum()))
            if reading is None:
                if position is None:
                    position = np.empty(rows, dtype=np.int64)
                    position[order] = row_entry
                names, code = _coded(list(chain.from_iterable(text)))
                width = max(len(names), 1)
                owned = _distinct(np.repeat(position, counts) * width + code)  # by entry, then span id
                group = owned // width
                packed, hex_ids = _compact(names[owned % width])
                sink.put(
                    offsets, 0, np.searchsorted(group, np.arange(entries + 1), side="left").astype(np.int64)
                )
                sink.whole(ids, packed)
                return hex_ids
            words, size = reading
            # the rows' spans in entry order (each row's own spans stay together), then sorted
            # and made unique per entry; a chunk of whole entries at a time (about _SPAN_CHUNK
            # spans), so the working arrays of the sort are a chunk's, not every span's, and each
            # chunk's unique spans are put after the last's (in a file: written, not held)
            lengths = counts[order]
            total, n = int(lengths.sum()), len(lengths)
            out_start = np.cumsum(lengths) - lengths  # each ordered row's first place among them
            firsts = np.flatnonzero(_changes([row_entry])) if n else np.zeros(0, dtype=np.int64)
            cut_at = np.r_[out_start[firsts], total]
            bounds = np.unique(
                np.r_[
                    0,
                    np.r_[firsts, n][np.searchsorted(cut_at, np.arange(_SPAN_CHUNK, total, _SPAN_CHUNK))],
                    n,
                ]
            )
            del out_start, firsts, cut_at
            # each row's first id among the parts' (only when they are read by position)
            row_starts = np.cumsum(counts) - counts if isinstance(words, _Words) else None
            sink.begin(ids, np.dtype(f"S{size}"), None, capacity=total)
            sink.put(offsets, 0, np.zeros(1, dtype=np.int64))
            written = 0
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                group = np.repeat(row_entry[a:b], lengths[a:b])
                if isinstance(words, _RowWords):
                    chunk = words.take_rows(order[a:b], lengths[a:b])
                else:
                    assert row_starts is not None
                    chunk = words.take(_ranges(row_starts[order[a:b]], lengths[a:b]))
                ranked = _row_order(group, chunk)
                group = group[ranked]
                chunk = [column[ranked] for column in chunk]
                del ranked
                keep = _changes([group, *chunk])
                sink.append(ids, _hex_bytes([column[keep] for column in chunk], size))
                low = int(row_entry[a])  # the chunk's entries: low to row_entry[b - 1]
                counted = np.bincount(group[keep] - low, minlength=int(row_entry[b - 1]) + 1 - low)
                sink.put(offsets, low + 1, written + np.cumsum(counted))
                written += int(counted.sum())
                del group, chunk, keep, counted
            sink.end(ids)
            return True

        involved_hex = spans(involved, involved_of, "_involved", "_involved_ids")
        if notes:
            memlog.note("trace index: involved spans packed")
        changed_hex = spans(changed, changed_of, "_changed", "_changed_ids")
        if notes:
            memlog.note("trace index: changed spans packed")
        self._hexed = (trace_hex, involved_hex, changed_hex)

    def _entries_of(self, trace_id: str) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """{recommendation id: (involved span ids, changed span ids)} of one trace (rules 1, 2)."""
        trace_hex, involved_hex, changed_hex = self._hexed
        ids = self._trace_ids
        key = _hex_key(trace_id, ids.dtype.itemsize) if trace_hex else trace_id.encode()
        if key is None:
            return {}
        at = int(ids.searchsorted(key))  # (a stored array: a binary search of reads)
        if at >= len(ids) or ids[at] != key.rstrip(b"\0"):  # an element reads without its trailing zeros
            return {}
        out = {}
        for entry in range(int(self._entries[at]), int(self._entries[at + 1])):
            involved = self._involved_ids[self._involved[entry] : self._involved[entry + 1]]
            changed = self._changed_ids[self._changed[entry] : self._changed[entry + 1]]
            out[self._recs[int(self._entry_recs[entry])]] = (
                _texts(involved, involved_hex),
                _texts(changed, changed_hex),
            )
        return out

    def touching(self, trace_id: str, span_ids: Iterable[str]) -> list[Touch]:
        """The recommendations touching trace ``trace_id`` whose spans are ``span_ids``, best
        rank first, each with its spans there (sorted)."""
        present = set(span_ids)
        entries = self._entries_of(trace_id)
        for span_id in present:
            for rec_id in self.by_span.get(span_id, ()):
                entries.setdefault(rec_id, ((), ()))
        out = []
        for rec_id, (involved, changed) in entries.items():
            evidence = [s for s in self.evidence_spans.get(rec_id, ()) if s in present]
            changed_here = sorted(s for s in changed if s in present)
            out.append(
                Touch(
                    recommendation_id=rec_id,
                    span_ids=tuple(sorted({*involved, *changed, *evidence} & present)),
                    bottleneck_span_ids=tuple(changed_here or sorted(set(evidence))),
                )
            )
        out.sort(key=lambda t: (self.ranks.get(t.recommendation_id, 10**9), t.recommendation_id))
        return out

    def __eq__(self, other: object) -> bool:
        """Same recommendations and the same entries for every trace (arrays compared by value,
        stored or not)."""
        if not isinstance(other, TraceIndex):
            return NotImplemented
        mine, theirs = vars(self), vars(other)
        return all(
            np.array_equal(np.asarray(value), np.asarray(theirs[name]))
            if name in _ARRAYS
            else value == theirs[name]
            for name, value in mine.items()
        )

    def stored(self, folder: str, *, prefix: str = "trace-index-") -> tuple[TraceIndex, str]:
        """(this index with its per-trace arrays written to a new file in ``folder``, the file).
        The copy holds where each array is, not the arrays: it pickles small, and a reader opens
        the file (:meth:`open_stored`) and reads what each lookup needs. The file is the
        reader's to remove (``open_stored(consume=True)``); an error writing it removes it."""
        fd, path = tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=folder)
        source = self._one_stored_file()
        if source is not None:  # stored already: its file copied by the kernel, not read in here
            try:
                _copy_file(source, fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            finally:
                os.close(fd)
            file = _StoredFile(path)
            copied = {name: getattr(self, name) for name in _ARRAYS}
            moved = {name: _StoredArray(file, a.offset, a.dtype, a.length) for name, a in copied.items()}
            return dataclasses.replace(self, **moved), path  # type: ignore[arg-type]
        file = _StoredFile(path)
        arrays: dict[str, _StoredArray] = {}
        try:
            with os.fdopen(fd, "wb") as out:
                offset = 0
                for name in _ARRAYS:
                    array = np.ascontiguousarray(getattr(self, name))
                    pad = -offset % _STORED_ALIGNMENT
                    out.write(bytes(pad))
                    offset += pad
                    arrays[name] = _StoredArray(file, offset, array.dtype, len(array))
                    out.write(array.data)
                    offset += array.nbytes
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return dataclasses.replace(self, **arrays), path  # type: ignore[arg-type]

    def _one_stored_file(self) -> _StoredFile | None:
        """The open file every per-trace array of this index is read from (None: some are held,
        or the file is not open)."""
        files = {
            id(v.file): v.file for v in (getattr(self, n) for n in _ARRAYS) if isinstance(v, _StoredArray)
        }
        if len(files) != 1 or not all(isinstance(getattr(self, n), _StoredArray) for n in _ARRAYS):
            return None
        (file,) = files.values()
        return file if file.fd is not None else None

    def stored_file(self) -> str | None:
        """The file this index reads its per-trace arrays from (:meth:`stored`, or :meth:`build`
        into a folder); None when it holds them."""
        value = self._trace_ids
        return value.file.path if isinstance(value, _StoredArray) else None

    def open_stored(self, *, consume: bool = True) -> None:
        """Open the file of an index made by :meth:`stored` (and passed on by pickle) so that its
        lookups read it; ``consume``: remove its name at once (the open file stays readable for
        as long as this index lives). Nothing to do for an index that holds its arrays."""
        for name in _ARRAYS:
            value = getattr(self, name)
            if isinstance(value, _StoredArray):
                value.file.open(consume=consume)
                return

    def traces(self) -> int:
        """How many traces the index names (rules 1 and 2)."""
        return len(self._trace_ids)
