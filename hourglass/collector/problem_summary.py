"""Input problems summarised for a person: one line per kind of problem, with a count and the first
few positions, instead of one line per bad span.

A file with 300 spans missing a timestamp gives::

    traces.json: 300 skipped: spans[].timestamp: missing, and nothing in its trace has a
    time to place it by (at spans[0].timestamp, spans[1].timestamp, spans[2].timestamp,
    spans[3].timestamp, spans[4].timestamp and 295 more; --verbose lists every one)

A kind is the problem's position with its indices and line numbers dropped
(``data[0].spans[3].spanID`` → ``data[].spans[].spanID``, ``traces.jsonl:3:...`` → ``...``) and its
reason with quoted values and long numbers blanked (``'zzz' is neither 32 hex...`` → ``'…' is
neither 32 hex...``), plus whether data was dropped (``skipped``) or kept with a warning. A kind
seen once prints exactly as the problem itself (``FILE:POSITION: reason``). Memory is bounded: at
most ``first_positions`` positions per kind (all of them up to ``MAX_KEPT_POSITIONS`` with
``keep_all``) and ``MAX_KINDS_PER_SOURCE`` kinds per file; further kinds are counted together.

The same summary goes into the JSON report as ``input_warnings`` (:meth:`ProblemSummary.as_json`)
and, for OTLP Exports, into ``serve``'s log once a minute.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "DEFAULT_FIRST_POSITIONS",
    "MISSING_PARENT_REASON",
    "ProblemKind",
    "ProblemSummary",
    "kind_of",
    "note_missing_parents",
    "split_position",
]

DEFAULT_FIRST_POSITIONS = 5
MAX_KEPT_POSITIONS = 100_000
MAX_KINDS_PER_SOURCE = 200
OTHER_FIELD = "(other)"

_INDEX = re.compile(r"\[\d+\]")
_LEADING_LINE = re.compile(r"^\d+(?::\d+)?(?::|$)")
_BYTE = re.compile(r"^byte \d+:?")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_LONG_NUMBER = re.compile(r"(?<![\w.])-?\d{4,}(?:\.\d+)?(?![\w])")
# "resourceSpans[0].scopeSpans[0].spans[2].traceId: reason" (decode errors carry their path)
_PATH_PREFIX = re.compile(r"^([A-Za-z_$][\w$]*(?:\[\d+\]|\.[\w$]+)*|\[\d+\][\w$.\[\]]*): (.*)$", re.S)


def split_position(message: str) -> tuple[str | None, str]:
    """``"spans[2].traceId: reason"`` → ``("spans[2].traceId", "reason")``; no path → ``(None, message)``."""
    match = _PATH_PREFIX.match(message)
    if match is None:
        return None, message
    return match.group(1), match.group(2)


def kind_of(position: str | None, reason: str) -> tuple[str, str]:
    """(field, reason template) naming the kind of a problem (see the module doc)."""
    where = position or ""
    where = _BYTE.sub("byte …:", where)
    where = _LEADING_LINE.sub("", where)
    where = _INDEX.sub("[]", where).strip(":")
    template = _LONG_NUMBER.sub("N", _QUOTED.sub("'…'", reason))
    return where, template


@dataclass
class ProblemKind:
    source: str  # the file (or "OTLP/gRPC", "OTLP/HTTP")
    path: str  # the position without indices ("" when the problem has no position)
    template: str  # the reason with values blanked
    skipped: bool  # data was dropped (else: kept with a warning)
    reason: str  # the first problem's full reason
    count: int = 0
    positions: list[str] = field(default_factory=list)  # the first ones (or all, with keep_all)

    def line(self, *, verbose_hint: bool = True) -> str:
        """One line: the problem itself when seen once, else the count, the kind and the first positions."""
        if self.count == 1:
            where = (
                f"{self.source}:{self.positions[0]}" if self.positions and self.positions[0] else self.source
            )
            return f"{where}: {self.reason}" if self.skipped else f"{where}: warning: {self.reason}"
        what = "skipped" if self.skipped else "warnings"
        head = f"{self.source}: {self.count} {what}: "
        head += f"{self.path}: {self.reason}" if self.path else self.reason
        shown = [p for p in self.positions if p]
        if shown:
            more = self.count - len(shown)
            listed = ", ".join(shown)
            tail = f" and {more} more" if more > 0 else ""
            hint = "; --verbose lists every one" if more > 0 and verbose_hint else ""
            head += f" (at {listed}{tail}{hint})"
        return head

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "field": self.path,
            "kind": self.template,
            "reason": self.reason,
            "skipped": self.skipped,
            "count": self.count,
            "positions": [p for p in self.positions if p],
        }


class ProblemSummary:
    """Collects problems (thread-safe) and summarises them per source and kind, in first-seen order."""

    def __init__(self, *, first_positions: int = DEFAULT_FIRST_POSITIONS, keep_all: bool = False) -> None:
        self.first_positions = first_positions
        self.keep_all = keep_all
        self._kinds: dict[tuple[str, str, str, bool], ProblemKind] = {}
        self._per_source: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(
        self,
        source: str,
        position: str | None,
        reason: str,
        *,
        skipped: bool = True,
        count: int = 1,
        kind_field: str | None = None,
    ) -> None:
        """One problem (or ``count`` alike, e.g. "and 40 more spans with bad ids"); ``kind_field``
        names the kind's field when the position does not (e.g. a trace and span id)."""
        field_, template = kind_of(position, reason)
        if kind_field is not None:
            field_ = kind_field
        key = (source, field_, template, skipped)
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if self._per_source.get(source, 0) >= MAX_KINDS_PER_SOURCE:
                    key = (source, OTHER_FIELD, "other problems", skipped)
                    kind = self._kinds.get(key)
                    field_, template = OTHER_FIELD, "other problems"
                if kind is None:
                    kind = ProblemKind(source, field_, template, skipped, reason)
                    self._kinds[key] = kind
                    self._per_source[source] = self._per_source.get(source, 0) + 1
            kind.count += count
            limit = MAX_KEPT_POSITIONS if self.keep_all else self.first_positions
            if len(kind.positions) < limit:
                kind.positions.append(position or "")

    def add_problem(self, problem: Any) -> None:
        """A :class:`hourglass.collector.files.FileProblem` (``file``, ``position``, ``reason``, ``skipped``)."""
        self.add(
            problem.file,
            problem.position,
            problem.reason,
            skipped=problem.skipped,
            count=getattr(problem, "count", 1),
        )

    def kinds(self, source: str | None = None) -> list[ProblemKind]:
        with self._lock:
            return [k for k in self._kinds.values() if source is None or k.source == source]

    def lines(self, source: str | None = None, *, verbose_hint: bool = True) -> list[str]:
        return [k.line(verbose_hint=verbose_hint) for k in self.kinds(source)]

    def as_json(self) -> list[dict[str, Any]]:
        """The ``input_warnings`` of a report: one object per kind."""
        return [k.as_json() for k in self.kinds()]

    def total(self) -> int:
        return sum(k.count for k in self.kinds())

    def drain(self) -> list[ProblemKind]:
        """Every kind so far, then start afresh (serve logs and resets once a minute)."""
        with self._lock:
            kinds = list(self._kinds.values())
            self._kinds.clear()
            self._per_source.clear()
        return kinds

    def __bool__(self) -> bool:
        return bool(self._kinds)


MISSING_PARENT_REASON = "parent span is not in the input; the span is kept as the root of its own subtree (the trace is incomplete)"


def note_missing_parents(summary: ProblemSummary, files: list[tuple[str, list[pa.Table]]]) -> int:
    """Warn about spans whose parent span is in none of the files read together (a parent in another
    of the files counts as present): one kind per file, with the first positions. Returns how many.
    Vectorised: an anti-join of (trace, parent) on every (trace, span)."""
    pieces = [
        t.select(["trace_id", "span_id", "parent_span_id"]).append_column(
            "source", pa.array([index] * t.num_rows, pa.int32())
        )
        for index, (_, tables) in enumerate(files)
        for t in tables
        if t.num_rows
    ]
    if not pieces:
        return 0
    ids = pa.concat_tables(pieces)
    children = ids.filter(pc.is_valid(ids.column("parent_span_id")))
    if children.num_rows == 0:
        return 0
    present = ids.select(["trace_id", "span_id"]).rename_columns(["trace_id", "parent_span_id"])
    orphans = children.join(present, keys=["trace_id", "parent_span_id"], join_type="left anti")
    # a span delivered twice is one orphan
    orphans = orphans.group_by(["source", "trace_id", "span_id", "parent_span_id"]).aggregate([])
    if orphans.num_rows == 0:
        return 0
    orphans = orphans.sort_by([("source", "ascending"), ("trace_id", "ascending"), ("span_id", "ascending")])
    for index, (name, _) in enumerate(files):
        mine = orphans.filter(pc.equal(orphans.column("source"), index))
        if mine.num_rows:
            _note_orphans(
                summary, name, mine.num_rows, mine.slice(0, _shown(summary, mine.num_rows)).to_pylist()
            )
    return orphans.num_rows


def note_missing_parents_in(summary: ProblemSummary, names: list[str], db: Any) -> int:
    """:func:`note_missing_parents` of spans held in a DuckDB table rather than in memory:
    ``origins(source, trace_id, span_id, parent_span_id)`` of connection ``db``, ``source`` the
    index in ``names`` of the file each row came from (``hourglass analyze`` of files larger than
    its memory budget keeps them so: the anti-join runs under DuckDB's memory limit). The same
    warnings, counts and first positions."""
    orphans = """
        SELECT DISTINCT source, trace_id, span_id, parent_span_id FROM origins c
        WHERE parent_span_id IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM origins p WHERE p.trace_id = c.trace_id AND p.span_id = c.parent_span_id)
    """
    # (with keep_all: as many as the summary keeps; the rest are counted on the last one shown).
    # One pass of the anti-join: each file's count rides on its first row (0.25 s a pass at 1M).
    shown = MAX_KEPT_POSITIONS if summary.keep_all else summary.first_positions
    rows = db.execute(
        f"""SELECT source, trace_id, span_id, parent_span_id, n, total FROM (
                SELECT *, row_number() OVER (PARTITION BY source ORDER BY trace_id, span_id) AS n,
                    count(*) OVER (PARTITION BY source) AS total
                FROM ({orphans})) WHERE n <= ? ORDER BY source, trace_id, span_id""",
        [max(shown, 1)],
    ).fetchall()
    counts = {source: total for source, _, _, _, n, total in rows if n == 1}
    for index, name in enumerate(names):
        count = int(counts.get(index, 0))
        if count:
            first = [
                {"trace_id": t, "span_id": s, "parent_span_id": p}
                for source, t, s, p, n, _ in rows
                if source == index and n <= shown
            ]
            _note_orphans(summary, name, count, first)
    return int(sum(counts.values()))


def _shown(summary: ProblemSummary, count: int) -> int:
    return count if summary.keep_all else summary.first_positions


def _note_orphans(summary: ProblemSummary, name: str, count: int, first: list[dict[str, Any]]) -> None:
    """One file's spans whose parent is in none of the files: its first ones as positions, the
    rest counted on the last."""
    for i, row in enumerate(first):
        summary.add(
            name,
            f"trace {row['trace_id']} span {row['span_id']} (parent {row['parent_span_id']})",
            MISSING_PARENT_REASON,
            skipped=False,
            count=count - len(first) + 1 if i == len(first) - 1 else 1,
            kind_field="",
        )
