"""What detectors report and how the what-if engine re-times a trace.

A detector returns :class:`Finding` objects: one per bottleneck signature (the same bottleneck
seen in many traces is one finding), each carrying its per-trace :class:`Occurrence` list. An
occurrence says which spans are involved and which :class:`Intervention` would remove the
bottleneck in that trace; the what-if engine applies the interventions to the trace and re-times
it along its critical path, so savings are measured at the root, never as a local ``sum - max``.

A finding holds its occurrences in columns (:class:`Occurrences`, a read-only sequence of
:class:`Occurrence`), whatever it is given: at 12M stored spans a serve round held ~400k of them,
~1.5 KB each as objects from each detector's decision to the round's end. An occurrence read from
it is made on the spot: changing it changes nothing in the finding.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import numbers
import os
import pickle
import tempfile
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import polars as pl

from hourglass.analysis.report_numbers import num  # noqa: F401  (where it was)

Category = Literal["parallelization", "fault_tolerance"]


@dataclass(frozen=True, slots=True)
class RunConcurrently:
    """These sibling spans start together, at the earliest start among them (serialized calls,
    N+1 done concurrently, a fan-out whose pool cap is lifted)."""

    span_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ShortenSpan:
    """This span's duration is cut by ``by_ns`` (lock wait removed, straggler brought to the
    median, a call bounded by a timeout). Its children keep their offsets from its start."""

    span_id: str
    by_ns: int


@dataclass(frozen=True, slots=True)
class CollapseSpans:
    """N sibling calls become one batched call: the first span takes ``duration_ns`` and the
    rest disappear (N+1 → one batched query)."""

    span_ids: tuple[str, ...]
    duration_ns: int


@dataclass(frozen=True, slots=True)
class ScaleSelf:
    """This span's own time takes ``factor`` × what it took: the work before, between and after its
    blocking children (their offsets, the gaps between them and its tail) is scaled; the children
    keep their durations. ``factor`` 0 removes the span's own time, 1 changes nothing, 2 doubles it
    (a user's "what if the pricing service were twice as fast": factor 0.5 on its spans)."""

    span_id: str
    factor: float


@dataclass(frozen=True, slots=True)
class CapConcurrency:
    """These sibling spans run as one fan-out at most ``limit`` at a time: they are released
    together where the earliest one started (after the caller work that separated them, as for
    :class:`RunConcurrently`) and, in their original start order, each takes the first free slot
    of ``limit`` (a worker pool or a semaphore). A ``limit`` at least their number is
    :class:`RunConcurrently`; 1 runs them one after another."""

    span_ids: tuple[str, ...]
    limit: int


Intervention = RunConcurrently | ShortenSpan | CollapseSpans | ScaleSelf | CapConcurrency


@dataclass(slots=True)
class Occurrence:
    """One instance of a bottleneck in one trace."""

    trace_id: str
    span_ids: tuple[str, ...]  # the spans involved; for a parent/children pattern the parent first
    interventions: tuple[Intervention, ...] = ()
    numbers: dict[str, float] = field(default_factory=dict)  # per-occurrence detector numbers
    # a 64-bit hash of what the trace id, the span ids and the interventions were made of, when
    # the detector computed it in bulk over its rows (``detectors._common.occurrence_values``): what
    # serve's incremental pricing compares between rounds instead of the occurrence itself
    key: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class NearMiss:
    """A candidate a detector (or the pipeline) formed and then dropped, and why — what
    ``hourglass analyze --explain`` lists under ``near_misses`` so "nothing found" can be read.

    ``reason`` names the rule or threshold and the measured value, e.g. "saving 0.8 ms < 1 ms
    floor" or "overlap share 0.62 > 0.5: concurrent"."""

    kind: str
    service: str
    operation: str
    reason: str
    trace_ids: tuple[str, ...] = ()
    span_ids: tuple[str, ...] = ()
    traces: int = 0  # traces in which the candidate was seen (0: len(trace_ids))


class NearMissLog:
    """Where candidates formed and then dropped are recorded (``--explain``): every
    :class:`hourglass.analysis.context.AnalysisContext` is one, and a decision made outside any one
    context (over partitions) uses a bare one. Detectors run in two threads; ``list.append`` is
    atomic, so no lock is needed."""

    near_misses: list[NearMiss]

    def __init__(self) -> None:
        self.near_misses = []

    def note_near_miss(
        self,
        kind: str,
        service: str,
        operation: str,
        reason: str,
        trace_ids: list[str] | tuple[str, ...] = (),
        span_ids: list[str] | tuple[str, ...] = (),
        traces: int = 0,
    ) -> None:
        """Record a near miss, with at most 5 exemplar traces and 20 span ids."""
        self.near_misses.append(
            NearMiss(
                kind,
                service,
                operation,
                reason,
                tuple(trace_ids)[:5],
                tuple(span_ids)[:20],
                traces or len(set(trace_ids)),
            )
        )


@dataclass
class Finding:
    """A bottleneck or a fault-tolerance gap, aggregated across traces by a stable signature."""

    kind: str
    category: Category
    service: str  # where the change is made
    operation: str  # that span's name
    targets: list[dict[str, str]]  # [{"service": ..., "operation": ...}]
    # held as :class:`Occurrences` (columns) whatever is given: a list is converted when assigned
    occurrences: Sequence[Occurrence]
    confidence: float
    evidence: dict[str, Any] = field(default_factory=dict)  # aggregated detector numbers
    requests_at_risk: int | None = None  # fault-tolerance findings ranked by this when no latency
    signature_extra: str = ""  # anything else that distinguishes two findings of one kind
    # (signature, id) once computed: the pricing, the trace index and the ranking ask for a
    # finding's id per occurrence; assigning a field the signature is made of forgets it (the
    # targets' dicts are not changed in place once a finding is made)
    _ids: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SIGNATURE_FIELDS:
            object.__setattr__(self, "_ids", None)
        elif name == "occurrences" and not isinstance(value, Occurrences):
            value = Occurrences.from_list(value)
        object.__setattr__(self, name, value)

    @property
    def occurrence_table(self) -> Occurrences:
        """The occurrences as the columns they are held in."""
        occurrences = self.occurrences
        assert isinstance(occurrences, Occurrences)
        return occurrences

    def _signature_and_id(self) -> tuple[str, str]:
        if self._ids is None:
            targets = ",".join(
                sorted(f"{t.get('service', '')}/{t.get('operation', '')}" for t in self.targets)
            )
            signature = f"{self.kind}|{self.service}|{self.operation}|{targets}|{self.signature_extra}"
            digest = hashlib.sha256(signature.encode()).hexdigest()[:16]
            object.__setattr__(self, "_ids", (signature, f"{self.kind}-{digest}"))
            assert self._ids is not None
        return self._ids

    @property
    def signature(self) -> str:
        return self._signature_and_id()[0]

    @property
    def id(self) -> str:
        """Stable id: the same bottleneck gets the same id across runs."""
        return self._signature_and_id()[1]

    @property
    def trace_ids(self) -> list[str]:
        """The occurrences' trace ids, each once, in the order first seen."""
        return self.occurrence_table.unique_trace_ids()


_SIGNATURE_FIELDS = frozenset({"kind", "service", "operation", "targets", "signature_extra"})


# -- a finding's occurrences in columns -----------------------------------------------------------

_KINDS: tuple[type, ...] = (RunConcurrently, ShortenSpan, CollapseSpans, ScaleSelf, CapConcurrency)
_KIND_CODE: dict[type, int] = {cls: code for code, cls in enumerate(_KINDS)}
_ONE_SPAN_CODES = frozenset({_KIND_CODE[ShortenSpan], _KIND_CODE[ScaleSelf]})
_NO_PARAM, _INT, _FLOAT, _OBJECT = 0, 1, 2, 3  # how an intervention's parameter is held
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_CHUNK = 4096  # occurrences materialized at a time when iterating


def kind_of(finding_id: str) -> str:
    """The detector kind of a finding's (a recommendation's) id, ``<kind>-<signature hash>``
    (:meth:`Finding._signature_and_id`)."""
    return finding_id.rsplit("-", 1)[0]


def _strings(values: list[Any], what: str) -> pl.Series:
    try:
        return pl.Series(values, dtype=pl.String, strict=True)
    except (TypeError, pl.exceptions.PolarsError) as e:
        raise TypeError(f"occurrences: {what} must be strings ({e})") from None


def _gather_ranges(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the flat positions of ``rows``' ranges, one after another; their new offsets) of a flat
    column whose row ``i`` is ``offsets[i]:offsets[i + 1]``."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    new = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new[1:])
    flat = np.repeat(starts - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
    return flat, new


# per byte, its two lowercase hex digits as they lie in memory (a uint16 read in native order)
_HEX_PAIRS = np.frombuffer(b"".join(b"%02x" % byte for byte in range(256)), dtype=np.uint16)
_HEX_WIDTHS = (16, 32)  # the ids held as words: OTLP's span ids and trace ids
_HEX_DIGITS = b"0123456789abcdef"
_HEX_CHUNK = 1 << 16  # ids decoded at a time (:func:`hex_words`)


class _Ids:
    """A column of ids (a String series' values): when every one is lowercase hex of 16 or 32
    digits (OTLP's span and trace ids), held as the 64-bit words they spell, big-endian (one or
    two uint64 per id: 8 or 16 bytes instead of a polars string's 32 or 48, and no reference to
    the buffers of the frame the ids were taken from); else (any other id, a null, none at all)
    as the series itself. Exact: :meth:`series` gives the text back as it was. Made, sliced,
    gathered, joined and decoded in C-level passes, no Python object per id."""

    __slots__ = ("text", "words")

    def __init__(self, words: np.ndarray | None, text: pl.Series | None) -> None:
        self.words = words  # (n, 1 or 2) uint64, or None
        self.text = text  # the String series when not ``words``

    @classmethod
    def of(cls, series: pl.Series) -> _Ids:
        """``series`` (String) as words when it can be, else as it is."""
        words = hex_words(series)
        return cls(words, None) if words is not None else cls(None, series)

    def __len__(self) -> int:
        return len(self.words) if self.words is not None else len(self.text)  # type: ignore[arg-type]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Ids, (self.words, self.text))

    def series(self) -> pl.Series:
        """The ids as a String series (decoded from the words: made each time it is asked for)."""
        if self.words is None:
            assert self.text is not None
            return self.text
        return hex_text(self.words)

    def slice(self, start: int, length: int) -> _Ids:
        if self.words is None:
            assert self.text is not None
            return _Ids(None, self.text.slice(start, length))
        return _Ids(self.words[start : start + length], None)

    def gather(self, rows: np.ndarray) -> _Ids:
        if self.words is None:
            assert self.text is not None
            return _Ids(None, self.text.gather(pl.Series(rows, dtype=pl.Int64)))
        return _Ids(self.words[rows], None)

    @staticmethod
    def concat(parts: Sequence[_Ids]) -> _Ids:
        """The ids of ``parts`` one after another: words when every part's ids are words of one
        width (or none), else strings."""
        given = [p for p in parts if len(p)]
        if not given:
            return parts[0] if parts else _Ids(None, pl.Series("", [], dtype=pl.String))
        if len(given) == 1:
            return given[0]
        widths = {p.words.shape[1] if p.words is not None else 0 for p in given}
        if len(widths) == 1 and 0 not in widths:
            return _Ids(np.concatenate([p.words for p in given if p.words is not None]), None)
        return _Ids(None, pl.concat([p.series() for p in given]))

    @staticmethod
    def gather_from(parts: Sequence[_Ids], at: np.ndarray) -> _Ids:
        """``concat(parts).gather(at)``, without the concatenation (a copy of every part's ids)
        when the parts' ids are words of one width: only the ids at ``at`` are copied."""
        given = [p.words for p in parts if len(p)]
        if not given or any(w is None for w in given) or len({(w.shape[1], w.dtype) for w in given}) > 1:  # type: ignore[union-attr]
            return _Ids.concat(parts).gather(at)
        first = given[0]
        assert first is not None
        out = np.empty((len(at), first.shape[1]), dtype=first.dtype)
        start = 0
        for part in parts:
            if len(part):
                inside = (at >= start) & (at < start + len(part))
                out[inside] = part.words[at[inside] - start]  # type: ignore[index]
            start += len(part)
        return _Ids(out, None)

    def is_in(self, wanted: pl.Series) -> np.ndarray:
        """Per id: whether it is one of ``wanted`` (a String series)."""
        if self.words is None:
            assert self.text is not None
            return self.text.is_in(wanted.implode()).to_numpy()
        n, width = self.words.shape
        wanted = wanted.drop_nulls().unique()
        wanted = wanted.filter(wanted.str.len_bytes() == 16 * width)  # (the others are none of ours)
        coded = hex_words(wanted)
        if coded is None:  # (any left that is not lowercase hex matches none of ours either)
            wanted = wanted.filter(~wanted.str.contains("[^0-9a-f]"))
            coded = hex_words(wanted)
        if coded is None:
            return np.zeros(n, dtype=np.bool_)
        # one 64-bit key per id (its word, or its two words mixed: ids that share a first word,
        # as generated ones do, still differ), probed in a hash set of the wanted keys: memory
        # in the wanted ids, not a sort or a frame of every id; two-word candidates then checked
        # word by word (a mixed key may collide)
        found = pl.Series(_mixed(self.words)).is_in(pl.Series(_mixed(coded)).implode()).to_numpy()
        if width > 1 and found.any():
            rows = np.flatnonzero(found)
            columns = [f"w{j}" for j in range(width)]
            hit = (
                pl.DataFrame({c: self.words[rows, j] for j, c in enumerate(columns)})
                .with_row_index("row")
                .join(pl.DataFrame({c: coded[:, j] for j, c in enumerate(columns)}), on=columns, how="semi")
            )["row"].to_numpy()
            found[:] = False
            found[rows[hit]] = True
        return found

    def n_unique(self) -> int:
        """How many distinct ids."""
        if self.words is None:
            assert self.text is not None
            return self.text.n_unique()
        width = self.words.shape[1]
        return pl.DataFrame({f"w{j}": self.words[:, j] for j in range(width)}).n_unique()

    def first_unique(self, count: int) -> pl.Series:
        """The first ``count`` distinct ids in the order first seen (a String series)."""
        if self.words is None:
            assert self.text is not None
            return self.text.unique(maintain_order=True).head(count)
        width = self.words.shape[1]
        frame = pl.DataFrame({f"w{j}": self.words[:, j] for j in range(width)}).unique(maintain_order=True)
        return _Ids(
            np.ascontiguousarray(frame.head(count).to_numpy(), dtype=np.uint64).reshape(-1, width), None
        ).series()

    def unique(self) -> pl.Series:
        """The distinct ids in the order first seen (a String series)."""
        if self.words is None:
            assert self.text is not None
            return self.text.unique(maintain_order=True)
        width = self.words.shape[1]
        frame = pl.DataFrame({f"w{j}": self.words[:, j] for j in range(width)}).unique(maintain_order=True)
        return _Ids(np.ascontiguousarray(frame.to_numpy(), dtype=np.uint64).reshape(-1, width), None).series()


def _mixed(words: np.ndarray) -> np.ndarray:
    """One uint64 per row of ``words`` (shape (n, 1 or 2)): the word, or the two mixed."""
    if words.shape[1] == 1:
        return np.ascontiguousarray(words[:, 0])
    with np.errstate(over="ignore"):
        return words[:, 0] * np.uint64(0x9E3779B97F4A7C15) + words[:, 1]


def hex_text(words: np.ndarray) -> pl.Series:
    """The ids that ``words`` (shape (n, 1 or 2), :func:`hex_words`) spell, as a String series
    of lowercase hex (16 digits a word)."""
    n, width = words.shape
    if n == 0:
        return pl.Series("", [], dtype=pl.String)
    digits = _HEX_PAIRS[words.astype(">u8").view(np.uint8)]  # (n, 8 * width) digit pairs
    return pl.Series("", digits.view(f"S{16 * width}").ravel()).cast(pl.String)


def hex_words(series: pl.Series) -> np.ndarray | None:
    """The ids of ``series`` (String) as the big-endian 64-bit words they spell, shape (n, 1 or
    2), when every one is lowercase hex of 16 or 32 digits (none null; at least one); else None.
    In C-level passes: the lengths, then the ids joined into one text, checked and decoded
    (half the CPU of polars' regex check and integer parse) — ``_HEX_CHUNK`` ids at a time, so
    the text and its copies (a million ids: ~80 MiB at once) stay a few MiB beside the words."""
    n = len(series)
    if n == 0 or series.dtype != pl.String or series.null_count():
        return None
    lengths = series.str.len_bytes()
    digits = lengths.min()
    if digits not in _HEX_WIDTHS or lengths.max() != digits:
        return None
    words = np.empty((n, 2 if digits == 32 else 1), dtype=np.uint64)
    for start in range(0, n, _HEX_CHUNK):
        text = series.slice(start, _HEX_CHUNK).str.join("").item()
        if not text.isascii() or text.encode("ascii").translate(None, _HEX_DIGITS):
            return None  # (a character that is not a lowercase hex digit)
        chunk = np.frombuffer(bytes.fromhex(text), dtype=">u8")
        words[start : start + _HEX_CHUNK] = chunk.reshape(-1, words.shape[1])
    return words


@dataclass(frozen=True, slots=True)
class InterventionColumns:
    """A finding's interventions (those of the occurrences asked for), one row per intervention
    in occurrence order: the occurrence it belongs to (its position in the container), its kind
    (the position of its class in ``(RunConcurrently, ShortenSpan, CollapseSpans, ScaleSelf,
    CapConcurrency)``), its parameter (``by_ns``, ``duration_ns``, ``factor``, ``limit``; 0 for
    ``RunConcurrently``) as an integer (``int()`` of it) and as a float (``float()`` of it), and
    the span ids it names (``span_id`` as one), flat (:attr:`span_ids`, a String series, not one
    Python string each; :attr:`span_words`, the same ids as the words they spell when held so),
    ``span_counts`` per intervention."""

    owner: np.ndarray
    kind: np.ndarray
    int_param: np.ndarray
    float_param: np.ndarray
    named: _Ids
    span_counts: np.ndarray

    @property
    def span_ids(self) -> pl.Series:
        """The span ids, flat (a String series, decoded each time it is asked for)."""
        return self.named.series()

    @property
    def span_words(self) -> np.ndarray | None:
        """The span ids as big-endian 64-bit words, shape (ids, 1 or 2), when every one is
        lowercase hex of 16 or 32 digits (:func:`hex_words`); else None."""
        return self.named.words


class Occurrences(Sequence[Occurrence]):
    """A finding's occurrences held in columns: a read-only sequence of :class:`Occurrence`
    (``len``, ``[i]``, slices, iteration that materializes the objects a chunk at a time), ~10x
    smaller than the objects, with column accessors for the consumers that read every occurrence
    (the pricing's grouping and keys, the trace index, the ranking, the what-if engine).

    Columns: the trace ids; the span ids, flat, with offsets; the interventions, one row each
    (kind, parameter held as int or float as it was given, or as the object itself for any other
    type; the span ids as a range of the occurrence's own span ids when they are one, else their
    own flat column); the numbers (each occurrence's names in their order, as a code into the
    distinct name orders, and one column per name: int64 when every value is an int, float64 when
    every one is a float, else the values themselves); the keys (uint64, with which are present).
    :meth:`from_list` round-trips exactly: ids as tuples, ints stay ints.

    :meth:`park` writes the columns to a file, each on its own, and lets them go: a column is read
    back alone when next asked for, and :meth:`release` lets the read-back columns go again (serve's
    round: the findings wait there while the next kinds decide, and each stage after the decisions
    reads the columns it needs and lets them go after it)."""

    __slots__ = (
        "_has_key",
        "_iv_ex_off",
        "_iv_extra",
        "_iv_float",
        "_iv_int",
        "_iv_kind",
        "_iv_len",
        "_iv_obj",
        "_iv_off",
        "_iv_ptype",
        "_iv_start",
        "_key",
        "_n",
        "_nums",
        "_park_at",
        "_parked",
        "_shape",
        "_shapes",
        "_source",
        "_span_off",
        "_spans",
        "_trace",
    )  # fmt: skip

    _n: int
    _trace: _Ids
    _span_off: np.ndarray
    _spans: _Ids
    _iv_off: np.ndarray
    _iv_kind: np.ndarray
    _iv_start: np.ndarray  # position in the occurrence's span ids, or -1: in ``_iv_extra``
    _iv_len: np.ndarray
    _iv_ex_off: np.ndarray
    _iv_extra: _Ids
    _iv_ptype: np.ndarray
    _iv_int: np.ndarray
    _iv_float: np.ndarray
    _iv_obj: list[Any] | None
    _shape: np.ndarray
    _shapes: tuple[tuple[str, ...], ...]
    _nums: dict[str, np.ndarray | list[Any]]
    _key: np.ndarray
    _has_key: np.ndarray
    _parked: str | None  # the file of a parked table's columns (unset: never parked)
    _park_at: dict[str, tuple[int, int]]  # a parked table's columns: where each is in the file
    # a take of a parked table: (that table, the rows taken); each group of columns is taken when
    # first asked for (unset: made whole)
    _source: tuple[Occurrences, np.ndarray] | None

    # -- making ---------------------------------------------------------------------------------

    @classmethod
    def from_list(cls, occurrences: Iterable[Occurrence]) -> Occurrences:
        """The occurrences in columns (exactly: :meth:`__iter__` gives them back equal, the types
        of numbers and parameters kept)."""
        if isinstance(occurrences, Occurrences):
            return occurrences
        traces: list[Any] = []
        span_flat: list[Any] = []
        span_len: list[int] = []
        iv_count: list[int] = []
        iv_kind: list[int] = []
        iv_start: list[int] = []
        iv_len: list[int] = []
        ex_flat: list[Any] = []
        ex_len: list[int] = []
        iv_ptype: list[int] = []
        iv_param: list[Any] = []
        shape_of: dict[tuple[str, ...], int] = {}
        shape: list[int] = []
        shape_rows: list[list[int]] = []  # per shape: its occurrences
        shape_values: list[list[tuple[Any, ...]]] = []  # and their numbers' values
        num_rows: dict[str, list[int]] = {}
        num_vals: dict[str, list[Any]] = {}
        keys: list[int | None] = []
        kind_code = _KIND_CODE
        one_span = _ONE_SPAN_CODES
        n = 0
        for occ in occurrences:
            if not isinstance(occ, Occurrence):
                raise TypeError(f"occurrences: expected Occurrence, got {type(occ).__name__}")
            traces.append(occ.trace_id)
            spans = tuple(occ.span_ids)
            span_flat.extend(spans)
            span_len.append(len(spans))
            ivs = occ.interventions
            iv_count.append(len(ivs))
            for iv in ivs:
                code = kind_code.get(type(iv))
                if code is None:
                    raise TypeError(f"occurrences: unknown intervention {type(iv).__name__}")
                iv_kind.append(code)
                if code in one_span:
                    ids: tuple[Any, ...] = (iv.span_id,)  # type: ignore[union-attr]
                    param = iv.by_ns if code == 1 else iv.factor  # type: ignore[union-attr]
                else:
                    ids = tuple(iv.span_ids)  # type: ignore[union-attr]
                    param = None if code == 0 else (iv.duration_ns if code == 2 else iv.limit)  # type: ignore[union-attr]
                start = 0
                if ids:
                    try:
                        start = spans.index(ids[0])
                    except ValueError:
                        start = -1
                    if start >= 0 and spans[start : start + len(ids)] != ids:
                        start = -1
                iv_start.append(start)
                iv_len.append(len(ids))
                if start < 0:
                    ex_flat.extend(ids)
                    ex_len.append(len(ids))
                else:
                    ex_len.append(0)
                kind = type(param)
                if param is None:
                    iv_ptype.append(_NO_PARAM)
                elif kind is int and _INT64_MIN <= param <= _INT64_MAX:
                    iv_ptype.append(_INT)
                elif kind is float:
                    iv_ptype.append(_FLOAT)
                else:
                    iv_ptype.append(_OBJECT)
                iv_param.append(param)
            numbers = occ.numbers
            names = tuple(numbers)
            code_of = shape_of.get(names)
            if code_of is None:
                code_of = shape_of[names] = len(shape_of)
                shape_rows.append([])
                shape_values.append([])
            shape.append(code_of)
            shape_rows[code_of].append(n)  # (an append per occurrence, not one per number)
            shape_values[code_of].append(tuple(numbers.values()))
            keys.append(occ.key)
            n += 1
        for names, rows, tuples in zip(shape_of, shape_rows, shape_values, strict=True):
            for name, got in zip(names, zip(*tuples, strict=True), strict=True):
                num_rows.setdefault(name, []).extend(rows)
                num_vals.setdefault(name, []).extend(got)
        self = cls.__new__(cls)
        self._n = n
        self._trace = _Ids.of(_strings(traces, "trace ids"))
        self._span_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.asarray(span_len, dtype=np.int64), out=self._span_off[1:])
        self._spans = _Ids.of(_strings(span_flat, "span ids"))
        self._iv_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.asarray(iv_count, dtype=np.int64), out=self._iv_off[1:])
        m = len(iv_kind)
        self._iv_kind = np.asarray(iv_kind, dtype=np.uint8)
        self._iv_start = np.asarray(iv_start, dtype=np.int32)
        self._iv_len = np.asarray(iv_len, dtype=np.int32)
        self._iv_ex_off = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(np.asarray(ex_len, dtype=np.int64), out=self._iv_ex_off[1:])
        self._iv_extra = _Ids.of(_strings(ex_flat, "intervention span ids"))
        ptype = np.asarray(iv_ptype, dtype=np.uint8)
        self._iv_ptype = ptype
        self._iv_int = np.zeros(m, dtype=np.int64)
        self._iv_float = np.zeros(m, dtype=np.float64)
        is_int = np.flatnonzero(ptype == _INT)
        if is_int.size:
            self._iv_int[is_int] = [iv_param[i] for i in is_int.tolist()]
        is_float = np.flatnonzero(ptype == _FLOAT)
        if is_float.size:
            self._iv_float[is_float] = [iv_param[i] for i in is_float.tolist()]
        self._iv_obj = iv_param if (ptype == _OBJECT).any() else None
        if self._iv_obj is not None:
            self._iv_obj = [p if t == _OBJECT else None for p, t in zip(iv_param, iv_ptype, strict=True)]
        self._shape = np.asarray(shape, dtype=np.int32)
        self._shapes = tuple(shape_of)
        nums: dict[str, np.ndarray | list[Any]] = {}
        for name, values in num_vals.items():
            at = np.asarray(num_rows[name], dtype=np.int64)
            types = set(map(type, values))
            column: np.ndarray | list[Any]
            if types == {float}:
                column = np.zeros(n, dtype=np.float64)
                column[at] = values
            elif types == {int} and min(values) >= _INT64_MIN and max(values) <= _INT64_MAX:
                column = np.zeros(n, dtype=np.int64)
                column[at] = values
            else:
                column = [None] * n
                for i, value in zip(at.tolist(), values, strict=True):
                    column[i] = value
            nums[name] = column
        self._nums = nums
        has_key = np.fromiter((k is not None for k in keys), dtype=np.bool_, count=n)
        try:
            self._key = np.fromiter((0 if k is None else k for k in keys), dtype=np.uint64, count=n)
        except (OverflowError, TypeError, ValueError):
            raise ValueError("occurrences: a key must be an integer in [0, 2**64)") from None
        self._has_key = has_key
        return self

    @classmethod
    def concat(cls, parts: Sequence[Occurrences]) -> Occurrences:
        """The occurrences of ``parts``, one after another."""
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.from_list([])
        self = cls.__new__(cls)
        self._n = sum(p._n for p in parts)

        def offsets(arrays: list[np.ndarray]) -> np.ndarray:
            out = [np.zeros(1, dtype=np.int64)]
            base = 0
            for a in arrays:
                out.append(a[1:] + base)
                base += int(a[-1])
            return np.concatenate(out)

        self._trace = _Ids.concat([p._trace for p in parts])
        self._span_off = offsets([p._span_off for p in parts])
        self._spans = _Ids.concat([p._spans for p in parts])
        self._iv_off = offsets([p._iv_off for p in parts])
        self._iv_kind = np.concatenate([p._iv_kind for p in parts])
        self._iv_start = np.concatenate([p._iv_start for p in parts])
        self._iv_len = np.concatenate([p._iv_len for p in parts])
        self._iv_ex_off = offsets([p._iv_ex_off for p in parts])
        self._iv_extra = _Ids.concat([p._iv_extra for p in parts])
        self._iv_ptype = np.concatenate([p._iv_ptype for p in parts])
        self._iv_int = np.concatenate([p._iv_int for p in parts])
        self._iv_float = np.concatenate([p._iv_float for p in parts])
        if any(p._iv_obj is not None for p in parts):
            self._iv_obj = [x for p in parts for x in (p._iv_obj or [None] * len(p._iv_kind))]
        else:
            self._iv_obj = None
        shapes: dict[tuple[str, ...], int] = {}
        codes = []
        for p in parts:
            remap = np.array([shapes.setdefault(s, len(shapes)) for s in p._shapes] or [0], dtype=np.int32)
            codes.append(remap[p._shape])
        self._shape = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)
        self._shapes = tuple(shapes)
        names = list(dict.fromkeys(name for p in parts for name in p._nums))
        nums: dict[str, np.ndarray | list[Any]] = {}
        for name in names:
            columns = [p._nums.get(name) for p in parts]
            dtypes = {c.dtype for c in columns if isinstance(c, np.ndarray)}
            if all(isinstance(c, np.ndarray) or c is None for c in columns) and len(dtypes) == 1:
                dtype = dtypes.pop()
                nums[name] = np.concatenate(
                    [
                        c if c is not None else np.zeros(p._n, dtype=dtype)
                        for c, p in zip(columns, parts, strict=True)
                    ]
                )
            else:
                nums[name] = [
                    x
                    for c, p in zip(columns, parts, strict=True)
                    for x in (
                        c.tolist() if isinstance(c, np.ndarray) else c if c is not None else [None] * p._n
                    )
                ]
        self._nums = nums
        self._key = np.concatenate([p._key for p in parts])
        self._has_key = np.concatenate([p._has_key for p in parts])
        return self

    @classmethod
    def from_columns(
        cls,
        trace_ids: pl.Series,
        span_ids: pl.Series,
        *,
        intervention: type[RunConcurrently | CollapseSpans | CapConcurrency | ShortenSpan] | None,
        first: int = 0,
        dropped: np.ndarray | int = 0,
        parameter: pl.Series | None = None,
        shortened: tuple[pl.Series, pl.Series] | None = None,
        numbers: Mapping[str, pl.Series | np.ndarray],
        keys: pl.Series,
    ) -> Occurrences:
        """Occurrences made straight from a detector's columns, no object per occurrence: row
        ``i`` is ``Occurrence(trace_ids[i], tuple(span_ids[i]), (intervention(span_ids[i][first :
        len - dropped[i]], parameter[i]),), {name: numbers[name][i] ...}, keys[i])``: one
        intervention per occurrence, naming a run of the occurrence's own span ids (its integer
        parameter, none for ``RunConcurrently``), the numbers floats in the order given (None
        where a Series is null; a
        ``x / 1e6`` made by numpy: polars divides by a constant as a multiplication by its inverse,
        which differs from Python's ``/`` in the last bit). ``ShortenSpan``: ``shortened`` (span ids, by_ns),
        two list columns: one ``ShortenSpan(id, int(by))`` per element of an occurrence's lists (span ids equal
        to ``span_ids``: held as positions in them). ``None``: no
        intervention (``interventions=()``; no parameter, no ``shortened``). ``span_ids`` may also be
        lists of the 64-bit words the ids spell (List(UInt64), :func:`hex_words` of 16-digit ids):
        held as they are, the same occurrences as of their text. The same
        occurrences as :meth:`from_list` of those objects (``tests/analysis/test_occurrence_columns.py``)."""
        n = len(trace_ids)
        for name, column in [("trace ids", trace_ids), ("span ids", span_ids), ("keys", keys)]:
            if len(column) != n or column.null_count():
                raise ValueError(f"occurrences: {name} must be {n} values, none null")
        self = cls.__new__(cls)
        self._n = n
        self._trace = _Ids.of(trace_ids.cast(pl.String).rename(""))
        lengths = span_ids.list.len().to_numpy().astype(np.int64)
        self._span_off = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._span_off[1:])
        spans = span_ids.explode(empty_as_null=False, keep_nulls=False)
        if len(spans) != self._span_off[-1]:
            raise ValueError("occurrences: span ids must be lists of strings")
        if spans.dtype == pl.UInt64:  # (the words the ids spell: as they are held)
            if spans.null_count():  # (a null has no word; as text it stays a None span id)
                raise ValueError("occurrences: span ids given as words must have none null")
            self._spans = _Ids(np.asarray(spans.to_numpy(), dtype=np.uint64).reshape(-1, 1), None)
        else:
            self._spans = _Ids.of(spans.cast(pl.String).rename(""))
        if intervention is None:
            if parameter is not None or shortened is not None:
                raise ValueError("occurrences: no intervention takes no parameter")
            self._iv_off = np.zeros(n + 1, dtype=np.int64)
            self._iv_kind = np.zeros(0, dtype=np.uint8)
            self._iv_start = np.zeros(0, dtype=np.int32)
            self._iv_len = np.zeros(0, dtype=np.int32)
            self._iv_ex_off = np.zeros(1, dtype=np.int64)
            self._iv_extra = _Ids(None, pl.Series("", [], dtype=pl.String))
            self._iv_float = np.zeros(0, dtype=np.float64)
            self._iv_ptype = np.zeros(0, dtype=np.uint8)
            self._iv_int = np.zeros(0, dtype=np.int64)
        elif intervention is ShortenSpan:
            if shortened is None or any(len(c) != n or c.null_count() for c in shortened):
                raise ValueError(f"occurrences: ShortenSpan takes two columns of {n} lists, none null")
            counts = shortened[0].list.len().to_numpy().astype(np.int64)
            if (counts != shortened[1].list.len().to_numpy()).any():
                raise ValueError("occurrences: ShortenSpan's span ids and by_ns differ in length")
            self._iv_off = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(counts, out=self._iv_off[1:])
            code = _KIND_CODE[intervention]
            ids = shortened[0].explode(empty_as_null=False, keep_nulls=False)
            by = shortened[1].explode(empty_as_null=False, keep_nulls=False)
            m = len(ids)
            if m != self._iv_off[-1] or len(by) != m or not by.dtype.is_numeric():
                raise ValueError("occurrences: ShortenSpan's by_ns must be numbers, none null")
            self._iv_kind = np.full(m, code, dtype=np.uint8)
            self._iv_len = np.ones(m, dtype=np.int32)
            if shortened[0] is span_ids or shortened[0].equals(span_ids):
                # one per span id of the occurrence, in order (lock_contention): positions in its own ids
                self._iv_start = (np.arange(m, dtype=np.int64) - np.repeat(self._iv_off[:-1], counts)).astype(
                    np.int32
                )
                self._iv_ex_off = np.zeros(m + 1, dtype=np.int64)
                self._iv_extra = _Ids(None, pl.Series("", [], dtype=pl.String))
            else:
                self._iv_start = np.full(m, -1, dtype=np.int32)  # its span id held apart
                self._iv_ex_off = np.arange(m + 1, dtype=np.int64)
                self._iv_extra = (
                    _Ids(np.asarray(ids.to_numpy(), dtype=np.uint64).reshape(-1, 1), None)
                    if ids.dtype == pl.UInt64  # (words, as the span ids may be)
                    else _Ids.of(ids.cast(pl.String).rename(""))
                )
            self._iv_float = np.zeros(m, dtype=np.float64)
            self._iv_ptype = np.full(m, _INT, dtype=np.uint8)
            self._iv_int = by.cast(pl.Int64).to_numpy().astype(np.int64)  # (int(): toward zero)
        else:
            self._iv_off = np.arange(n + 1, dtype=np.int64)
            self._iv_kind = np.full(n, _KIND_CODE[intervention], dtype=np.uint8)
            named = np.maximum(lengths - first - np.asarray(dropped, dtype=np.int64), 0)  # (as a slice)
            self._iv_start = np.where(named > 0, first, 0).astype(np.int32)
            self._iv_len = named.astype(np.int32)
            self._iv_ex_off = np.zeros(n + 1, dtype=np.int64)
            self._iv_extra = _Ids(None, pl.Series("", [], dtype=pl.String))
            self._iv_float = np.zeros(n, dtype=np.float64)
        if intervention is None or intervention is ShortenSpan:
            pass  # (their parameters above)
        elif (parameter is None) != (intervention is RunConcurrently):
            raise ValueError(
                f"occurrences: {intervention.__name__} takes {'no' if parameter is None else 'a'} parameter"
            )
        elif parameter is None:
            self._iv_ptype = np.full(n, _NO_PARAM, dtype=np.uint8)
            self._iv_int = np.zeros(n, dtype=np.int64)
        else:
            if len(parameter) != n or parameter.null_count() or not parameter.dtype.is_integer():
                raise ValueError(f"occurrences: the parameter must be {n} integers, none null")
            self._iv_ptype = np.full(n, _INT, dtype=np.uint8)
            self._iv_int = parameter.cast(pl.Int64).to_numpy().astype(np.int64)
        self._iv_obj = None
        self._shape = np.zeros(n, dtype=np.int32)
        self._shapes = (tuple(numbers),)
        self._nums = {}
        for name, given in numbers.items():
            if len(given) != n:
                raise ValueError(f"occurrences: number {name!r} must be {n} values")
            if isinstance(given, pl.Series) and given.null_count():
                # a null is None, as an occurrence made as an object holds it (from_list keeps
                # such a column as objects: floats, and None where null)
                self._nums[name] = [None if v is None else float(v) for v in given.cast(pl.Float64).to_list()]
                continue
            values = given.cast(pl.Float64).to_numpy() if isinstance(given, pl.Series) else given
            self._nums[name] = np.asarray(values, dtype=np.float64)
        self._key = keys.cast(pl.UInt64).to_numpy().astype(np.uint64)
        self._has_key = np.ones(n, dtype=np.bool_)
        return self

    # -- reading as a sequence ------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, index: int) -> Occurrence: ...

    @overload
    def __getitem__(self, index: slice) -> Occurrences: ...

    def __getitem__(self, index: int | slice) -> Occurrence | Occurrences:
        if isinstance(index, slice):
            return self.take(np.arange(self._n, dtype=np.int64)[index])
        i = int(index)
        if i < 0:
            i += self._n
        if not 0 <= i < self._n:
            raise IndexError("occurrence index out of range")
        return self._materialize(i, i + 1)[0]

    def __iter__(self) -> Iterator[Occurrence]:
        for start in range(0, self._n, _CHUNK):
            yield from self._materialize(start, min(start + _CHUNK, self._n))

    def __repr__(self) -> str:
        return f"Occurrences({self._n} occurrences)"

    def __eq__(self, other: object) -> bool:
        """The same occurrences in the same order (as :class:`Occurrence` compares them, the key
        aside; a NaN number equals a NaN)."""
        if not isinstance(other, Occurrences | list | tuple):
            return NotImplemented
        if len(other) != self._n:
            return False
        return all(_same(a, b) for a, b in zip(self, other, strict=True))

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (tuple(getattr(self, name) for name in _COLUMNS),))

    # -- parked in a file -----------------------------------------------------------------------

    def park(self, folder: str) -> None:
        """Write the columns to a new file in ``folder``, one after another, each pickled on its
        own, and let them go: a column is read back alone the first time it is asked for (anything
        but ``len``; an accessor reads those it uses) and stays until :meth:`release`; the file
        is kept while the table lives (removed when it is dropped). Serve's round parks the
        findings while the next kinds decide and between the stages that follow (at 12M stored
        spans their columns are tens of MiB). Nothing to do when empty or parked already."""
        if self._n == 0 or getattr(self, "_parked", None) is not None:
            return
        fd, path = tempfile.mkstemp(prefix="occurrences-", suffix=".pickle", dir=folder)
        at: dict[str, tuple[int, int]] = {}
        try:
            with os.fdopen(fd, "wb") as out:
                for name in _PARKED:
                    start = out.tell()
                    pickle.dump(getattr(self, name), out, protocol=5)
                    at[name] = (start, out.tell() - start)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        for name in _PARKED:
            delattr(self, name)
        self._park_at = at
        self._parked = path

    def is_parked(self) -> bool:
        """Whether the columns live in a file (read back one by one as asked for)."""
        return getattr(self, "_parked", None) is not None

    def held(self) -> frozenset[str]:
        """The columns in memory (a parked table's: those read back since it was parked or last
        released; every one otherwise)."""
        return frozenset(name for name in _PARKED if _has_slot(self, name))

    def release(self) -> None:
        """Let the columns read back go again (a parked table; nothing otherwise): what a stage of
        serve's round read is not held through the next. A column asked for later is read from the
        file again. Safe beside readers in other threads (a reader holds what it read; what it asks
        for next is read back)."""
        if getattr(self, "_parked", None) is None:
            return
        with _UNPARKING:
            for name in _PARKED:
                with contextlib.suppress(AttributeError):
                    delattr(self, name)

    def own(self) -> None:
        """A table taken from a parked one (:meth:`take`) given every column of its own now, so
        that the columns the parked table reads back for it can be let go (:meth:`release`) while
        this one is still used: serve's pricing takes a stored batch's share of each finding and
        prices the shares later, batch by batch; taken as they are asked for, each share read
        back its finding's whole columns (span ids, interventions: at 12M stored spans ~65 MiB
        for the findings of a round's new batches) and held them through the round's pricing.
        Nothing to do for any other table."""
        if getattr(self, "_source", None) is None:
            return
        for name in _PARKED:
            getattr(self, name)  # each group of columns taken once (``__getattr__``)
        self._source = None  # (its columns are its own: the parked table is not asked again)

    def __getattr__(self, name: str) -> Any:
        """A column of a parked table, read back alone (only called for a name not set)."""
        if name in _PARKED_SET and getattr(self, "_parked", None) is not None:
            with _UNPARKING:
                if _has_slot(self, name):  # (another thread read it back meanwhile)
                    return object.__getattribute__(self, name)
                start, size = self._park_at[name]
                with open(self._parked, "rb") as given:  # type: ignore[arg-type]
                    given.seek(start)
                    # unpickled from the file, not from a copy of its bytes (that would hold
                    # the column twice while it is read back)
                    value = pickle.load(given)
                    if given.tell() != start + size:
                        raise ValueError(f"parked occurrences: {self._parked}: column {name} is damaged")
                setattr(self, name, value)
                return value
        if name in _PARKED_SET and getattr(self, "_source", None) is not None:
            with _TAKING:
                if not _has_slot(self, name):  # (else another thread took it meanwhile)
                    source, rows = self._source  # type: ignore[misc]
                    for column, value in _TAKEN_OF[name](source, rows).items():
                        setattr(self, column, value)
                return object.__getattribute__(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __del__(self) -> None:
        path = getattr(self, "_parked", None)
        if path is not None:
            with contextlib.suppress(Exception):
                os.unlink(path)

    def _materialize(self, a: int, b: int) -> list[Occurrence]:
        if a >= b:
            return []
        traces = self._trace.slice(a, b - a).series().to_list()
        s0, s1 = int(self._span_off[a]), int(self._span_off[b])
        flat = self._spans.slice(s0, s1 - s0).series().to_list()
        bounds = (self._span_off[a : b + 1] - s0).tolist()
        spans = [tuple(flat[bounds[j] : bounds[j + 1]]) for j in range(b - a)]
        i0, i1 = int(self._iv_off[a]), int(self._iv_off[b])
        ivs: list[tuple[Intervention, ...]] = [()] * (b - a)
        if i1 > i0:
            kinds = self._iv_kind[i0:i1].tolist()
            starts = self._iv_start[i0:i1].tolist()
            lengths = self._iv_len[i0:i1].tolist()
            ptypes = self._iv_ptype[i0:i1].tolist()
            ints = self._iv_int[i0:i1].tolist()
            floats = self._iv_float[i0:i1].tolist()
            objs = self._iv_obj[i0:i1] if self._iv_obj is not None else None
            e0, e1 = int(self._iv_ex_off[i0]), int(self._iv_ex_off[i1])
            extra = self._iv_extra.slice(e0, e1 - e0).series().to_list() if e1 > e0 else []
            ex_bounds = (self._iv_ex_off[i0 : i1 + 1] - e0).tolist()
            per = np.diff(self._iv_off[a : b + 1]).tolist()
            k = 0
            for j, count in enumerate(per):
                if not count:
                    continue
                own = spans[j]
                made: list[Intervention] = []
                for _ in range(count):
                    start, length = starts[k], lengths[k]
                    ids = (
                        own[start : start + length]
                        if start >= 0
                        else tuple(extra[ex_bounds[k] : ex_bounds[k + 1]])
                    )
                    ptype = ptypes[k]
                    param: Any = (
                        ints[k]
                        if ptype == _INT
                        else floats[k]
                        if ptype == _FLOAT
                        else objs[k]
                        if objs
                        else None
                    )
                    code = kinds[k]
                    if code == 0:
                        made.append(RunConcurrently(ids))
                    elif code == 1:
                        made.append(ShortenSpan(ids[0], param))
                    elif code == 2:
                        made.append(CollapseSpans(ids, param))
                    elif code == 3:
                        made.append(ScaleSelf(ids[0], param))
                    else:
                        made.append(CapConcurrency(ids, param))
                    k += 1
                ivs[j] = tuple(made)
        shapes = [self._shapes[s] for s in self._shape[a:b].tolist()] if self._shapes else [()] * (b - a)
        columns = {
            name: (column[a:b].tolist() if isinstance(column, np.ndarray) else column[a:b])
            for name, column in self._nums.items()
        }
        keys = self._key[a:b].tolist()
        has = self._has_key[a:b].tolist()
        return [
            Occurrence(
                traces[j],
                spans[j],
                ivs[j],
                {name: columns[name][j] for name in shapes[j]},
                keys[j] if has[j] else None,
            )
            for j in range(b - a)
        ]

    # -- columns --------------------------------------------------------------------------------

    def take(self, rows: np.ndarray | Sequence[int]) -> Occurrences:
        """The occurrences at positions ``rows``, in that order. Of a parked table: a table that
        takes each group of columns from it when first asked for (the pricing's split by batch
        reads the trace ids and the keys alone, unless a batch's findings are priced again)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < -self._n or rows.max() >= self._n):
            raise IndexError(f"occurrence index out of range (0..{self._n - 1})")
        rows = np.where(rows < 0, rows + self._n, rows)  # from the end, as a list's and numpy's
        out = Occurrences.__new__(Occurrences)
        out._n = len(rows)
        if self.is_parked():
            out._source = (self, rows)
            return out
        if len(rows) and rows[0] >= 0 and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all():
            return self._range(int(rows[0]), int(rows[-1]) + 1)  # a run in order: views, no copy
        for group in _TAKEN:
            for name, value in group(self, rows).items():
                setattr(out, name, value)
        return out

    def _range(self, a: int, b: int) -> Occurrences:
        """Occurrences ``a`` to ``b`` (0 <= a <= b <= len), sharing this one's columns (numpy views,
        polars slices: a slice pickles as its own values alone)."""
        out = Occurrences.__new__(Occurrences)
        out._n = b - a
        out._trace = self._trace.slice(a, b - a)
        s0, s1 = int(self._span_off[a]), int(self._span_off[b])
        out._span_off = self._span_off[a : b + 1] - s0
        out._spans = self._spans.slice(s0, s1 - s0)
        i0, i1 = int(self._iv_off[a]), int(self._iv_off[b])
        out._iv_off = self._iv_off[a : b + 1] - i0
        out._iv_kind = self._iv_kind[i0:i1]
        out._iv_start = self._iv_start[i0:i1]
        out._iv_len = self._iv_len[i0:i1]
        e0, e1 = int(self._iv_ex_off[i0]), int(self._iv_ex_off[i1])
        out._iv_ex_off = self._iv_ex_off[i0 : i1 + 1] - e0
        out._iv_extra = self._iv_extra.slice(e0, e1 - e0)
        out._iv_ptype = self._iv_ptype[i0:i1]
        out._iv_int = self._iv_int[i0:i1]
        out._iv_float = self._iv_float[i0:i1]
        out._iv_obj = self._iv_obj[i0:i1] if self._iv_obj is not None else None
        out._shape = self._shape[a:b]
        out._shapes = self._shapes
        out._nums = {name: column[a:b] for name, column in self._nums.items()}
        out._key = self._key[a:b]
        out._has_key = self._has_key[a:b]
        return out

    def trace_id_list(self) -> list[str]:
        """Each occurrence's trace id, in order."""
        return self._trace.series().to_list()

    def trace_id_series(self) -> pl.Series:
        """Each occurrence's trace id, in order (a String series; not to be changed)."""
        return self._trace.series()

    def trace_ids_at(self, rows: np.ndarray) -> pl.Series:
        """The trace ids of the occurrences at positions ``rows`` (a String series): only those
        decoded."""
        return self._trace.gather(np.asarray(rows, dtype=np.int64)).series()

    def unique_trace_ids(self) -> list[str]:
        """The distinct trace ids in the order first seen (``Finding.trace_ids``)."""
        return self._trace.unique().to_list()

    def unique_trace_series(self) -> pl.Series:
        """The distinct trace ids in the order first seen, as a String series (``Finding.trace_ids``
        without a Python string each)."""
        return self._trace.unique()

    def unique_trace_count(self) -> int:
        """How many distinct trace ids (``len(Finding.trace_ids)``, without a Python string each)."""
        return self._trace.n_unique()

    def first_trace_ids(self, count: int) -> list[str]:
        """The first ``count`` distinct trace ids in the order first seen (``Finding.trace_ids[:count]``,
        only those decoded)."""
        return self._trace.first_unique(count).to_list()

    def has_interventions(self) -> np.ndarray:
        """Per occurrence: whether it carries an intervention."""
        return self._iv_off[1:] > self._iv_off[:-1]

    def any_interventions(self) -> bool:
        return bool(self._iv_off[-1] > 0)

    def keys(self) -> tuple[np.ndarray, bool]:
        """(each occurrence's key, uint64 (0 where it has none); whether every one has one)."""
        return self._key, bool(self._has_key.all())

    def in_traces(self, trace_ids: Collection[str] | pl.Series) -> np.ndarray:
        """Per occurrence: whether its trace is one of ``trace_ids``."""
        wanted = (
            trace_ids if isinstance(trace_ids, pl.Series) else pl.Series(list(trace_ids), dtype=pl.String)
        )
        return self._trace.is_in(wanted.cast(pl.String))

    def filter_traces(self, trace_ids: Collection[str] | pl.Series) -> Occurrences:
        """The occurrences of traces ``trace_ids``, in order."""
        return self.take(np.flatnonzero(self.in_traces(trace_ids)))

    def trace_id_words(self) -> np.ndarray | None:
        """Each occurrence's trace id as the big-endian 64-bit words it spells, shape (n, 1 or 2),
        when every one is lowercase hex of 16 or 32 digits (:func:`hex_words`); else None. Not to
        be changed."""
        return self._trace.words

    def span_id_words(self) -> np.ndarray | None:
        """:meth:`span_columns`' ids as words (as :meth:`trace_id_words`), or None."""
        return self._spans.words

    def span_counts(self) -> np.ndarray:
        """How many span ids each occurrence has."""
        return np.diff(self._span_off)

    def span_columns(self) -> tuple[pl.Series, np.ndarray]:
        """(every occurrence's span ids, one after another, a String series not to be changed;
        how many each has)."""
        return self._spans.series(), np.diff(self._span_off)

    def number_column(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(the values of number ``name`` as floats, NaN where absent or not a number; whether
        each occurrence has it)."""
        present = np.zeros(self._n, dtype=np.bool_)
        for code, names in enumerate(self._shapes):
            if name in names:
                present |= self._shape == code
        column = self._nums.get(name)
        if column is None:
            return np.full(self._n, np.nan), present
        if isinstance(column, np.ndarray):
            values = column.astype(np.float64)
        else:
            values = np.array(
                # any real number (numpy scalars, Decimal): what the object path's float() took
                [float(v) if isinstance(v, numbers.Real) else np.nan for v in column],
                dtype=np.float64,
            )
        values[~present] = np.nan
        return values, present

    def intervention_columns(self, rows: np.ndarray | None = None) -> InterventionColumns:
        """The interventions of the occurrences at ``rows`` (every one when None), in
        occurrence order (:class:`InterventionColumns`)."""
        if rows is None:
            rows = np.arange(self._n, dtype=np.int64)
        ivs, iv_off = _gather_ranges(self._iv_off, np.asarray(rows, dtype=np.int64))
        owner = np.repeat(rows, np.diff(iv_off))
        lengths = self._iv_len[ivs].astype(np.int64)
        starts = self._iv_start[ivs].astype(np.int64)
        own = starts >= 0
        # each intervention's span ids as positions in the pool: the occurrences' spans, then the
        # interventions' own ones
        base = np.where(own, self._span_off[owner] + starts, len(self._spans) + self._iv_ex_off[ivs])
        total = np.zeros(len(ivs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=total[1:])
        at = np.repeat(base - total[:-1], lengths) + np.arange(total[-1], dtype=np.int64)
        span_ids = _Ids.gather_from([self._spans, self._iv_extra], at)
        ptype = self._iv_ptype[ivs]
        ints = self._iv_int[ivs].copy()
        floats = self._iv_float[ivs].copy()
        is_float = ptype == _FLOAT
        # int() of a float: toward zero (beyond int64, or NaN, held at the bounds, or 0)
        ints[is_float] = np.nan_to_num(np.clip(floats[is_float], -(2.0**63), 2.0**63 - 1024), nan=0.0).astype(
            np.int64
        )
        is_int = ptype == _INT
        floats[is_int] = ints[is_int].astype(np.float64)
        if self._iv_obj is not None:
            for j, i in enumerate(ivs.tolist()):
                if ptype[j] == _OBJECT:
                    value = self._iv_obj[i]
                    floats[j] = float(value)
                    ints[j] = min(max(int(value), _INT64_MIN), _INT64_MAX) if math.isfinite(floats[j]) else 0
        return InterventionColumns(owner, self._iv_kind[ivs], ints, floats, span_ids, lengths)


_KEPT_APART = ("_parked", "_park_at", "_source")  # (where the columns are: not pickled)
_COLUMNS = tuple(name for name in Occurrences.__slots__ if name not in _KEPT_APART)  # what pickles
_PARKED = tuple(name for name in _COLUMNS if name != "_n")  # what a parked table lets go
_PARKED_SET = frozenset(_PARKED)
_UNPARKING = threading.Lock()
_TAKING = threading.RLock()  # (a take of a take of a parked table takes from the first take)


def _taken_trace(source: Occurrences, rows: np.ndarray) -> dict[str, Any]:
    return {"_trace": source._trace.gather(rows)}


def _taken_spans(source: Occurrences, rows: np.ndarray) -> dict[str, Any]:
    flat, offsets = _gather_ranges(source._span_off, rows)
    return {"_span_off": offsets, "_spans": source._spans.gather(flat)}


def _taken_interventions(source: Occurrences, rows: np.ndarray) -> dict[str, Any]:
    ivs, iv_off = _gather_ranges(source._iv_off, rows)
    extra, ex_off = _gather_ranges(source._iv_ex_off, ivs)
    obj = source._iv_obj
    return {
        "_iv_off": iv_off,
        "_iv_kind": source._iv_kind[ivs],
        "_iv_start": source._iv_start[ivs],
        "_iv_len": source._iv_len[ivs],
        "_iv_ex_off": ex_off,
        "_iv_extra": source._iv_extra.gather(extra),
        "_iv_ptype": source._iv_ptype[ivs],
        "_iv_int": source._iv_int[ivs],
        "_iv_float": source._iv_float[ivs],
        "_iv_obj": [obj[i] for i in ivs.tolist()] if obj is not None else None,
    }


def _taken_numbers(source: Occurrences, rows: np.ndarray) -> dict[str, Any]:
    return {
        "_shape": source._shape[rows],
        "_shapes": source._shapes,
        "_nums": {
            name: (column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows.tolist()])
            for name, column in source._nums.items()
        },
    }


def _taken_keys(source: Occurrences, rows: np.ndarray) -> dict[str, Any]:
    return {"_key": source._key[rows], "_has_key": source._has_key[rows]}


# ``Occurrences.take``'s columns, in groups taken together (each group reads its own columns)
_TAKEN = (_taken_trace, _taken_spans, _taken_interventions, _taken_numbers, _taken_keys)
_TAKEN_OF = {
    name: group for group in _TAKEN for name in group(Occurrences.from_list([]), np.zeros(0, dtype=np.int64))
}
assert set(_TAKEN_OF) == _PARKED_SET


def _has_slot(table: Occurrences, name: str) -> bool:
    """Whether ``table``'s slot ``name`` is set (not read back from its file: no ``__getattr__``)."""
    try:
        object.__getattribute__(table, name)
    except AttributeError:
        return False
    return True


def _restore(state: tuple[Any, ...]) -> Occurrences:
    self = Occurrences.__new__(Occurrences)
    for name, value in zip(_COLUMNS, state, strict=True):
        setattr(self, name, value)
    return self


def _same(a: Occurrence, b: Any) -> bool:
    if a == b:
        return True
    if not isinstance(b, Occurrence) or (a.trace_id, a.span_ids, a.interventions) != (
        b.trace_id,
        b.span_ids,
        b.interventions,
    ):
        return False
    if a.numbers.keys() != b.numbers.keys():
        return False
    return all(
        x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in ((a.numbers[k], b.numbers[k]) for k in a.numbers)
    )


class TraceRoots:
    """The trace summaries a report reads (``AnalysisContext.traces``' ``trace_id`` and
    ``root_duration_ns``: pipeline.score looks up each finding's traces' root durations, the
    report counts them), compact: the ids as :class:`_Ids` (OTLP's hex ids as 64-bit words, 16
    bytes instead of a polars string's 48), the durations as they were. ``serve``'s round holds
    every stored trace's (issue 11)."""

    __slots__ = ("_durations", "_ids")

    def __init__(self, ids: _Ids, durations: pl.Series) -> None:
        self._ids = ids
        self._durations = durations

    @classmethod
    def of(cls, traces: pl.DataFrame) -> TraceRoots:
        """``traces``' (trace_id, root_duration_ns), in order."""
        return cls(_Ids.of(traces["trace_id"].cast(pl.String)), traces["root_duration_ns"])

    @classmethod
    def concat(cls, parts: Sequence[TraceRoots]) -> TraceRoots:
        """The rows of ``parts`` one after another."""
        if not parts:
            return cls.of(pl.DataFrame(schema={"trace_id": pl.String, "root_duration_ns": pl.Int64}))
        return cls(
            _Ids.concat([p._ids for p in parts]),
            pl.concat([p._durations.to_frame() for p in parts], how="vertical_relaxed").to_series(),
        )

    @property
    def height(self) -> int:
        return len(self._durations)

    def roots_of(self, trace_ids: Sequence[str] | pl.Series) -> pl.DataFrame:
        """(trace_id, root_ms) of the rows whose trace is one of ``trace_ids``, in order (as
        filtering the frame they came from)."""
        wanted = (
            trace_ids if isinstance(trace_ids, pl.Series) else pl.Series(list(trace_ids), dtype=pl.String)
        )
        rows = np.flatnonzero(self._ids.is_in(wanted.cast(pl.String)))
        found = pl.DataFrame(
            {
                "trace_id": self._ids.gather(rows).series(),
                "root_duration_ns": self._durations.gather(pl.Series(rows, dtype=pl.Int64)),
            }
        )
        # the frame's expression (a Series divided by a scalar rounds otherwise, in the last bit)
        return found.select("trace_id", root_ms=pl.col("root_duration_ns") / 1e6)
