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
beside the store instead (:meth:`TraceIndex.stored`), and the server reads what a lookup needs
from it (:meth:`TraceIndex.open_stored`: ``pread``, from the page cache), so the index it keeps
for as long as a report is served is not in its memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

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


# the spans of :meth:`TraceIndex._pack` sorted this many at a time (whole entries per chunk): 2 MiB
# per column of the sort's working arrays
_SPAN_CHUNK = 1 << 18

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
    changed: list[Any], changed_of: list[np.ndarray], exemplars: int, tables: list[Any]
) -> _RowWords | None:
    """:class:`_RowWords` of the changed spans :meth:`TraceIndex.build` collected (``changed``:
    one part per exemplar, then one per finding, a finding's words there once counted) when they
    would be read as words (as :func:`_word_arrays` would), else None."""
    findings = [part for part in changed[exemplars:] if len(part)]
    widths = {part.shape[1] for part in findings if isinstance(part, np.ndarray)}
    if not findings or any(not isinstance(part, np.ndarray) for part in findings) or len(widths) != 1:
        return None
    (width,) = widths
    given: list[np.ndarray] = []
    for part in changed[:exemplars]:
        if len(part):
            words = hex_words(pl.Series(list(part), dtype=pl.String))
            if words is None or words.shape[1] != width:
                return None
            given.append(words)
    counts = np.concatenate(changed_of)
    if not counts.sum():
        return None
    return _RowWords(given, counts[:exemplars], tables, width)


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
    def build(cls, report: Mapping[str, Any], findings: Iterable[Finding]) -> TraceIndex:
        """The index of a report and the findings of the run that made it (rule 1 for every
        affected trace; findings the report does not carry are ignored).

        The per-trace part is built in columns (numpy), not as per-trace Python objects:
        what each occurrence adds is read off it once (its trace, its spans, the spans its
        interventions name), and the entries are then made unique, sorted and packed in bulk."""
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
        # then each finding's (a series, or the words of its hex ids as the finding holds them)
        trace_parts: list[Sequence[str] | pl.Series | np.ndarray] = [entry_traces]
        involved: list[Sequence[str] | pl.Series | np.ndarray] = []
        involved_of: list[np.ndarray] = [np.zeros(exemplars, dtype=np.int64)]
        finding_recs: list[int] = []
        finding_sizes: list[int] = []
        word_tables: list[Any] = []
        for finding in cls.indexed(report, findings):
            rec_code = code[finding.id]  # the id once per finding, not per occurrence
            own = finding.occurrence_table
            finding_recs.append(rec_code)
            finding_sizes.append(len(own))
            trace_words = own.trace_id_words()
            trace_parts.append(own.trace_id_series() if trace_words is None else trace_words)
            span_words = own.span_id_words()
            involved.append(own.span_columns()[0] if span_words is None else span_words)
            involved_of.append(own.span_counts())
            ivs = own.intervention_columns()
            named_owner = np.repeat(ivs.owner, ivs.span_counts)
            named_ids: pl.Series | np.ndarray | None = ivs.span_words  # (words: no null)
            if named_ids is None:
                named_ids = ivs.span_ids  # the ids the interventions name, per occurrence
                if named_ids.null_count():  # a ShortenSpan or ScaleSelf of no span id names none
                    kept = named_ids.is_not_null()
                    named_owner = named_owner[kept.to_numpy()]
                    named_ids = named_ids.filter(kept)
            changed_of.append(np.bincount(named_owner, minlength=len(own)).astype(np.int64))
            word_tables.append(own)  # (its named ids read again a chunk at a time when words)
            changed.append(named_ids)
            ivs = named_owner = named_ids = None  # type: ignore[assignment]
        # the named ids as words, a chunk of rows at a time (no copy of every finding's at once)
        # when every finding holds them so, and the exemplars' are such ids, of one width
        reader = _changed_reader(changed, changed_of, exemplars, word_tables)
        memlog.note("trace index: the findings' columns read")
        if reader is not None:
            changed = []  # (the words each finding holds: not held through the packing)
        recs_of = np.repeat(np.asarray(finding_recs, dtype=np.int64), finding_sizes)
        index._pack(
            trace_parts,
            np.concatenate([np.asarray(entry_recs, dtype=np.int64), recs_of]),
            involved,
            np.concatenate(involved_of),
            changed if reader is None else reader,
            np.concatenate(changed_of),
        )
        return index

    def _pack(
        self,
        entry_traces: list[Sequence[str] | pl.Series | np.ndarray],
        entry_recs: np.ndarray,
        involved: list[Sequence[str] | pl.Series | np.ndarray],
        involved_of: np.ndarray,
        changed: list[Sequence[str] | pl.Series | np.ndarray] | _RowWords,
        changed_of: np.ndarray,
    ) -> None:
        """The columns of :meth:`build` packed: trace ids sorted (in the byte order the lookup
        searches in), each trace's entries by recommendation, each entry's span ids sorted and
        unique.

        OTLP's ids (lowercase hex, :func:`_hex_words`) are sorted as the 64-bit words they spell,
        each entry's spans brought together first so that the sort finds them nearly in order
        (:func:`_row_order`); any other ids are coded by their rank among the distinct ones (one
        sort of the strings), the rest in integers."""
        rows = sum(len(part) for part in entry_traces)  # (the entries' trace ids, in parts)
        hexed, entry_text = _words(entry_traces, rows)
        if hexed is not None:
            words, size = hexed
            keyed = [*words, entry_recs.astype(np.uint64)]  # (trace, recommendation)
            order = _row_order(np.zeros(rows, dtype=np.int64), keyed)
            keyed = [column[order] for column in keyed]
            first = _changes(keyed)  # the first row of each entry
            trace_first = _changes(keyed[:-1])[first]  # per entry: the first of its trace
            self._trace_ids = _hex_bytes([column[first][trace_first] for column in keyed[:-1]], size)
            self._entry_recs = keyed[-1][first].astype(np.int32)
            position = np.empty(rows, dtype=np.int64)  # each row's entry
            position[order] = np.cumsum(first) - 1
            starts = np.flatnonzero(trace_first)
            trace_hex = True
        else:
            traces, trace_code = _coded(list(chain.from_iterable(entry_text)))
            recs = max(len(self._recs), 1)
            entry_key = trace_code * recs + entry_recs
            keys = _distinct(entry_key)  # sorted: by trace, then recommendation
            position = np.searchsorted(keys, entry_key)
            order = np.argsort(position, kind="stable")
            trace_of = keys // recs
            starts = np.flatnonzero(np.r_[True, trace_of[1:] != trace_of[:-1]]) if len(keys) else trace_of
            self._trace_ids, trace_hex = _compact(traces[trace_of[starts]])
            self._entry_recs = (keys % recs).astype(np.int32)
        entries = len(self._entry_recs)
        self._entries = np.concatenate([starts, [entries]]).astype(np.int64)
        # the spans need only each row's entry and the rows' order: the rest not held through them
        hexed = entry_text = None  # type: ignore[assignment]
        memlog.note("trace index: entries sorted")
        keyed = words = first = trace_first = starts = None  # type: ignore[assignment]

        def spans(
            parts: list[Sequence[str] | pl.Series | np.ndarray] | _RowWords, counts: np.ndarray
        ) -> tuple[np.ndarray, np.ndarray, bool]:
            """(offsets per entry, span ids, whether hex-packed), each entry's sorted and unique."""
            reading: tuple[_Words | _RowWords, int] | None
            text: list[Sequence[str] | pl.Series]
            if isinstance(parts, _RowWords):
                reading, text = (parts, 8 * parts.width), []
            else:
                reading, text = _word_reader(parts, int(counts.sum()))
            hexed = reading
            if hexed is None:
                names, code = _coded(list(chain.from_iterable(text)))
                width = max(len(names), 1)
                owned = _distinct(np.repeat(position, counts) * width + code)  # by entry, then span id
                group = owned // width
                packed, hex_ids = _compact(names[owned % width])
                at = np.searchsorted(group, np.arange(entries + 1), side="left")
                return at.astype(np.int64), packed, hex_ids
            words, size = hexed
            # the rows' spans in entry order (each row's own spans stay together), then sorted
            # and made unique per entry; a chunk of whole entries at a time (about _SPAN_CHUNK
            # spans), so the working arrays of the sort are a chunk's, not every span's (at 12M
            # stored spans, 3M: the index's build was the round's peak, 200 MiB above the report)
            lengths = counts[order]
            out_start = np.cumsum(lengths) - lengths  # each ordered row's first place in the output
            shift = (np.cumsum(counts) - counts)[order] - out_start
            row_entry = position[order]  # non-decreasing
            total, rows = int(lengths.sum()), len(lengths)
            firsts = np.flatnonzero(_changes([row_entry])) if rows else np.zeros(0, dtype=np.int64)
            cuts = np.r_[firsts, rows]  # a chunk starts where an entry does
            cut_at = np.r_[out_start[firsts], total]
            bounds = np.unique(
                np.r_[0, cuts[np.searchsorted(cut_at, np.arange(_SPAN_CHUNK, total, _SPAN_CHUNK))], rows]
            )
            # each chunk's unique spans written after the last's, and counted per entry: no list
            # of the chunks' results joined at the end (twice the output at once)
            out = np.empty(total, dtype=f"S{size}")
            filled = 0
            per_entry = np.zeros(entries, dtype=np.int64)
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                lo = int(out_start[a])
                hi = int(out_start[b]) if b < rows else total
                group = np.repeat(row_entry[a:b], lengths[a:b])
                if isinstance(words, _RowWords):
                    chunk = words.take_rows(order[a:b], lengths[a:b])
                else:
                    take = np.repeat(shift[a:b], lengths[a:b]) + np.arange(lo, hi, dtype=np.int64)
                    chunk = words.take(take)
                    del take
                ranked = _row_order(group, chunk)
                group = group[ranked]
                chunk = [column[ranked] for column in chunk]
                del ranked
                keep = _changes([group, *chunk])
                kept = _hex_bytes([column[keep] for column in chunk], size)
                out[filled : filled + len(kept)] = kept
                filled += len(kept)
                low = int(row_entry[a])  # the chunk's entries: low to row_entry[b - 1]
                counted = np.bincount(group[keep] - low)
                per_entry[low : low + len(counted)] += counted
                del group, chunk, keep, kept
            del words
            # (the spans repeated within an entry dropped: a copy of what is left, unless that is
            # nearly all of it)
            packed = out[:filled] if filled >= total - total // 16 else out[:filled].copy()
            at = np.zeros(entries + 1, dtype=np.int64)
            np.cumsum(per_entry, out=at[1:])
            return at, packed, True

        self._involved, self._involved_ids, involved_hex = spans(involved, involved_of)
        memlog.note("trace index: involved spans packed")
        self._changed, self._changed_ids, changed_hex = spans(changed, changed_of)
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
