"""Exemplar facts for a recommendation's design: the before/after sequence diagram (Mermaid
``sequenceDiagram`` text), the what-if's predicted root latencies and the re-timed critical path.

The diagram is built from the recommendation's first exemplar trace as the analysis sees it
(repaired spans of the :class:`~analysis.context.AnalysisContext`):

* **Scope**: the chain of spans from the root down to the *focus* span — the parent of the spans
  the finding's interventions name (or of its occurrence spans when it has none) — and the focus
  span's direct children, in start order (at most :data:`MAX_CALLS` of them).
* **Participants** are services, in order of first appearance in that scope (root first). A call
  goes from its parent's service to its *callee*: the service of its first child in another
  service (a client span and the server span it reached), else its own service when that differs
  from the caller's, else its ``peer`` / ``db_system`` (a database), else the caller itself.
* **Messages** carry the span name (the statement, when the name is only a SQL verb such as
  ``SELECT``) and its measured duration; a call to another participant gets
  a return arrow with the duration. Three or more consecutive calls of one operation to one
  callee become a ``loop`` block (N+1).
* **After**: the same scope re-timed by :func:`hourglass.analysis.whatif.retime_trace` with the finding's
  interventions: calls that ``RunConcurrently`` sit in one ``par`` block, a ``CollapseSpans``
  batch is one call (the others are gone), a ``ShortenSpan`` shows old → new duration; messages
  are ordered by their new start. A final note gives the root's duration before and after.

Names are written through :func:`mermaid_text`, which escapes the characters Mermaid gives a
meaning (``;``, ``#``, newlines) as Mermaid entity codes, so any span name survives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.critical_path import compute_critical_path
from hourglass.analysis.model import CollapseSpans, Finding, RunConcurrently, ScaleSelf, ShortenSpan
from hourglass.analysis.whatif import Impact, WhatIf, retime_trace

MAX_CALLS = 40  # focus children drawn; the rest are summarised in a note
MAX_CHAIN = 8  # ancestor hops drawn between the root and the focus span
LOOP_MIN = 3  # consecutive identical calls drawn as one loop


def fmt_ms(value: float | None) -> str:
    """Milliseconds for people, the duration format of every write-up: '0.4 ms', '12 ms', '118 ms',
    '1.42 s'."""
    if value is None:
        return "an unknown time"
    v = float(value)
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    if v >= 10:
        return f"{v:.0f} ms"
    return f"{v:.1f} ms"


def mermaid_text(value: Any, limit: int = 90) -> str:
    """A name made safe for a Mermaid message, note or alias (entity codes for ``#`` and ``;``)."""
    text = " ".join(str(value).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("#", "#35;").replace(";", "#59;")


@dataclass
class _Span:
    row: int
    span_id: str
    parent: int  # index into the trace's list, -1 for a root
    service: str
    name: str
    start: int
    end: int
    peer: str | None
    db_system: str | None


@dataclass
class _Call:
    span: int  # index into the trace's span list
    caller: str
    callee: str
    name: str
    start: int
    end: int
    group: int = -1  # RunConcurrently group in the "after" picture
    batched: int = 0  # calls merged into this one (CollapseSpans anchor)
    shortened_from: int | None = None  # old duration when a ShortenSpan applied


def call_label(name: str, statement: Any) -> str:
    """What a call is called in the diagram: its span name, or its statement when the name is only
    a SQL verb (``SELECT``: the statement tells two different queries apart)."""
    if (
        isinstance(statement, str)
        and statement.strip()
        and len(name.split()) <= 2
        and name.split()[0:1]
        and (name.split()[0].upper() in _SQL_VERBS)
    ):
        return " ".join(statement.split())
    return name


_SQL_VERBS = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "UPSERT", "MERGE", "CALL", "EXEC", "EXECUTE", "WITH"}
)


class _Trace:
    """One trace's spans (sorted by ``row``) as columns. ``trace[i]`` is the :class:`_Span` at index
    ``i``, made on first use: a diagram draws the chain, the focus span and its children, not every
    span of the trace (Python objects for each span of a 100k-span exemplar took ~0.7 s)."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.n = frame.height
        rows = frame["row"].to_numpy().astype(np.int64)
        parent_row = frame["parent_row"].fill_null(-1).to_numpy().astype(np.int64)
        at = np.searchsorted(rows, parent_row).clip(0, max(self.n - 1, 0))
        found = (parent_row >= 0) & (rows[at] == parent_row) if self.n else np.zeros(0, dtype=bool)
        self.parent = np.where(found, at, -1).astype(np.int64)  # index into the trace, -1 for a root
        self.start = frame["start_ns"].to_numpy().astype(np.int64)
        self.end = frame["end_ns"].to_numpy().astype(np.int64)
        self._spans: dict[int, _Span] = {}
        self._columns = frame.select("row", "span_id", "service", "name", "peer", "db_system", "db_statement")
        self._by_id: dict[str, int] | None = None
        self._kids: tuple[np.ndarray, np.ndarray] | None = None
        self._service: np.ndarray | None = None
        self._span_id_rank: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> _Span:
        i = int(i)
        span = self._spans.get(i)
        if span is None:
            row, span_id, service, name, peer, db_system, statement = self._columns.row(i)
            span = _Span(
                int(row),
                str(span_id),
                int(self.parent[i]),
                str(service),
                call_label(str(name), statement),
                int(self.start[i]),
                int(self.end[i]),
                peer,
                db_system,
            )
            self._spans[i] = span
        return span

    def roots(self) -> np.ndarray:
        return np.flatnonzero(self.parent < 0)

    @property
    def by_id(self) -> dict[str, int]:
        """Index of each span id (the last, should one repeat)."""
        if self._by_id is None:
            self._by_id = {str(s): i for i, s in enumerate(self.frame["span_id"].to_list())}
        return self._by_id

    def kids(self, i: int) -> np.ndarray:
        """The children of span ``i`` in (start, end, span id) order."""
        if self._kids is None:
            order = (
                pl.DataFrame(
                    {
                        "parent": self.parent,
                        "start": self.start,
                        "end": self.end,
                        "span_id": self.frame["span_id"].cast(pl.String),
                        "i": np.arange(self.n, dtype=np.int64),
                    }
                )
                .sort(["parent", "start", "end", "span_id"], maintain_order=True)["i"]
                .to_numpy()
            )
            self._kids = (order, self.parent[order])
        order, parents = self._kids
        return order[np.searchsorted(parents, i, "left") : np.searchsorted(parents, i, "right")]

    def service_codes(self) -> np.ndarray:
        """One integer per service name (equal names, equal codes)."""
        if self._service is None:
            self._service = (
                self.frame.select(pl.col("service").cast(pl.String).fill_null("None").rank("dense"))
                .to_series()
                .to_numpy()
                .astype(np.int64)
            )
        return self._service

    def span_id_rank(self) -> np.ndarray:
        """Each span id's place in the sorted span ids (equal ids, equal places)."""
        if self._span_id_rank is None:
            self._span_id_rank = (
                self.frame.select(pl.col("span_id").cast(pl.String).rank("dense"))
                .to_series()
                .to_numpy()
                .astype(np.int64)
            )
        return self._span_id_rank


def callee(trace: _Trace, i: int, caller: str) -> str:
    """The participant a call reaches (see the module docstring)."""
    s = trace[i]
    kids = trace.kids(i)
    if kids.size:
        other = kids[trace.service_codes()[kids] != trace.service_codes()[i]]
        if other.size:
            return trace[int(other[0])].service
    if s.service != caller:
        return s.service
    if s.peer:
        return str(s.peer)
    if s.db_system:
        return str(s.db_system)
    return caller


def _focus(trace: _Trace, named: list[int]) -> int:
    """The span whose children the diagram shows."""
    if not named:
        roots = trace.roots()
        return int(roots[0]) if roots.size else 0
    parents = trace.parent[np.asarray(named, dtype=np.int64)]
    first = named[0]
    if len(named) > 1 and bool((parents[1:] == first).all()):
        return first  # a parent/children occurrence: the parent first
    distinct = np.unique(parents)
    if distinct.size == 1:
        p = int(distinct[0])
        return p if p >= 0 else first
    return int(trace.parent[first]) if trace.parent[first] >= 0 else first


def _chain(trace: _Trace, focus: int) -> list[int]:
    chain = [focus]
    while trace.parent[chain[-1]] >= 0 and len(chain) < 10_000:
        chain.append(int(trace.parent[chain[-1]]))
    chain.reverse()
    if len(chain) > MAX_CHAIN + 1:  # root, the last hops above the focus
        chain = [chain[0], *chain[-MAX_CHAIN:]]
    return chain


@dataclass
class Diagram:
    participants: list[str]
    lines: list[str]

    def text(self) -> str:
        alias = {p: f"P{i + 1}" for i, p in enumerate(self.participants)}
        head = ["sequenceDiagram"] + [
            f"    participant {alias[p]} as {mermaid_text(p, 60)}" for p in self.participants
        ]
        body = []
        for line in self.lines:
            for p, a in alias.items():  # participants are written as NUL + name + NUL
                line = line.replace("\x00" + p + "\x00", a)
            body.append("    " + line)
        return "\n".join(head + body)


class _Builder:
    def __init__(self) -> None:
        self.participants: list[str] = []
        self.lines: list[str] = []

    def p(self, name: str) -> str:
        if name not in self.participants:
            self.participants.append(name)
        return "\x00" + name + "\x00"

    def add(self, line: str) -> None:
        self.lines.append(line)


def _call_lines(b: _Builder, calls: list[_Call], indent: str = "") -> None:
    for c in calls:
        dur = c.end - c.start
        label = mermaid_text(c.name)
        if c.batched > 1:
            label = f"{label} · {c.batched} calls batched into one ({fmt_ms(dur / 1e6)})"
        elif c.shortened_from is not None and c.shortened_from != dur:
            label = f"{label} ({fmt_ms(c.shortened_from / 1e6)} → {fmt_ms(dur / 1e6)})"
        else:
            label = f"{label} ({fmt_ms(dur / 1e6)})"
        b.add(f"{indent}{b.p(c.caller)}->>{b.p(c.callee)}: {label}")
        if c.callee != c.caller:
            b.add(f"{indent}{b.p(c.callee)}-->>{b.p(c.caller)}: {fmt_ms(dur / 1e6)}")


OVERLAP_TOLERANCE_NS = 50_000  # calls overlapping less than this are back to back (clock jitter)
MAX_PAR_LINES = 8  # a wider concurrent wave is drawn one line per operation


def waves(calls: list[_Call]) -> list[list[_Call]]:
    """Calls (sorted by start) grouped into waves of calls whose intervals overlap."""
    out: list[list[_Call]] = []
    wave_end = None
    for c in calls:
        if out and wave_end is not None and c.start < wave_end - OVERLAP_TOLERANCE_NS:
            out[-1].append(c)
            wave_end = max(wave_end, c.end)
        else:
            out.append([c])
            wave_end = c.end
    return out


def max_concurrency(calls: list[_Call]) -> int:
    events = sorted([(c.start, 1) for c in calls] + [(c.end - OVERLAP_TOLERANCE_NS, -1) for c in calls])
    level = best = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        best = max(best, level)
    return best


def _emit(b: _Builder, calls: list[_Call]) -> None:
    """Calls in time order: overlapping calls in ``par`` blocks (saying how many ran at once),
    runs of one operation one after another in a ``loop``, the rest one by one."""
    grouped = waves(calls)
    i = 0
    while i < len(grouped):
        wave = grouped[i]
        if len(wave) > 1:
            at_once = max_concurrency(wave)
            label = (
                f"{len(wave)} calls at the same time"
                if at_once >= len(wave)
                else f"{len(wave)} calls, at most {at_once} at a time"
            )
            b.add(f"par {label}")
            if len(wave) <= MAX_PAR_LINES:
                for k, m in enumerate(wave):
                    if k:
                        b.add("and")
                    _call_lines(b, [m], "    ")
            else:
                kinds: dict[tuple[str, str], list[_Call]] = {}
                for m in wave:
                    kinds.setdefault((m.callee, m.name), []).append(m)
                for k, ((callee_name, name), members) in enumerate(kinds.items()):
                    if k:
                        b.add("and")
                    durations = sorted(x.end - x.start for x in members)
                    slowest, median = durations[-1], durations[len(durations) // 2]
                    caller = members[0].caller
                    b.add(
                        f"    {b.p(caller)}->>{b.p(callee_name)}: {mermaid_text(name)} ×{len(members)} "
                        f"(median {fmt_ms(median / 1e6)}, slowest {fmt_ms(slowest / 1e6)})"
                    )
                    if callee_name != caller:
                        b.add(f"    {b.p(callee_name)}-->>{b.p(caller)}: {fmt_ms(slowest / 1e6)}")
            b.add("end")
            i += 1
            continue
        c = wave[0]
        j = i
        while (
            j < len(grouped)
            and len(grouped[j]) == 1
            and grouped[j][0].batched <= 1
            and grouped[j][0].shortened_from is None
            and (grouped[j][0].callee, grouped[j][0].name) == (c.callee, c.name)
        ):
            j += 1
        run = [w[0] for w in grouped[i:j]]
        if len(run) >= LOOP_MIN:
            durations = sorted(x.end - x.start for x in run)
            median = durations[len(durations) // 2]
            span_ms = (max(x.end for x in run) - min(x.start for x in run)) / 1e6
            b.add(f"loop {len(run)} calls one after another ({fmt_ms(span_ms)} in all)")
            b.add(
                f"    {b.p(c.caller)}->>{b.p(c.callee)}: {mermaid_text(c.name)} ({fmt_ms(median / 1e6)} each, median)"
            )
            if c.callee != c.caller:
                b.add(f"    {b.p(c.callee)}-->>{b.p(c.caller)}: {fmt_ms(median / 1e6)}")
            b.add("end")
            i = j
            continue
        _call_lines(b, [c])
        i += 1


def _diagram(
    trace: _Trace,
    chain: list[int],
    new_start: np.ndarray,
    new_end: np.ndarray,
    removed: np.ndarray | None,
    groups: dict[int, int],
    batched: dict[int, int],
    shortened: dict[int, int],
    root_before_ns: int | None,
) -> Diagram:
    def took(i: int) -> int:
        return int(new_end[i]) - int(new_start[i])

    b = _Builder()
    root = trace[chain[0]]
    root_ns = took(chain[0])
    b.p(root.service)
    if root_before_ns is None:
        b.add(f"Note over {b.p(root.service)}: {mermaid_text(root.name)} · {fmt_ms(root_ns / 1e6)}")
    else:
        b.add(
            f"Note over {b.p(root.service)}: {mermaid_text(root.name)} · "
            f"{fmt_ms(root_before_ns / 1e6)} → {fmt_ms(root_ns / 1e6)} (what-if)"
        )
    shown = [chain[0]]
    for i in chain[1:]:
        prev = trace[shown[-1]].service
        s = trace[i]
        if s.service != prev:
            b.add(f"{b.p(prev)}->>{b.p(s.service)}: {mermaid_text(s.name)} ({fmt_ms(took(i) / 1e6)})")
            shown.append(i)
    focus = chain[-1]
    fs = trace[focus]
    if focus != chain[0]:
        b.add(f"Note over {b.p(fs.service)}: {mermaid_text(fs.name)} · {fmt_ms(took(focus) / 1e6)}")
    children = trace.kids(focus)
    if removed is not None:
        children = children[~removed[children]]
    # by new start, then start, then span id; ties keep the children's order (a stable sort)
    children = children[
        np.lexsort((trace.span_id_rank()[children], trace.start[children], new_start[children]))
    ]
    more = max(0, len(children) - MAX_CALLS)
    calls = [
        _Call(
            k,
            fs.service,
            callee(trace, k, fs.service),
            trace[k].name,
            int(new_start[k]),
            int(new_end[k]),
            groups.get(k, -1),
            batched.get(k, 0),
            shortened.get(k),
        )
        for k in (int(k) for k in children[:MAX_CALLS])
    ]
    _emit(b, calls)
    if more:
        b.add(f"Note over {b.p(fs.service)}: {more} more calls not drawn")
    for i in reversed(shown[1:]):
        parent_service = trace[shown[shown.index(i) - 1]].service
        b.add(f"{b.p(trace[i].service)}-->>{b.p(parent_service)}: {fmt_ms(took(i) / 1e6)}")
    return Diagram(b.participants, b.lines)


def _named_rows(finding: Finding, trace_id: str, trace: _Trace) -> tuple[list[int], list[Any]]:
    by_id = trace.by_id
    named: list[int] = []
    interventions: list[Any] = []
    for occ in finding.occurrence_table.filter_traces([trace_id]):
        interventions.extend(occ.interventions)
        for iv in occ.interventions:
            ids = (iv.span_id,) if isinstance(iv, ShortenSpan | ScaleSelf) else iv.span_ids
            named.extend(by_id[s] for s in ids if s in by_id)
        if not occ.interventions:
            named.extend(by_id[s] for s in occ.span_ids if s in by_id)
    return list(dict.fromkeys(named)), interventions


def _percentile_ms(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)) / 1e6, 3) if values.size else None


def predicted(impact: Impact | None) -> dict[str, float | None]:
    """Root latency of the affected traces before and after, from the what-if (p50, p95, ms)."""
    if impact is None or impact.saved_ns.size == 0:
        return {
            "root_ms_p50_before": None,
            "root_ms_p95_before": None,
            "root_ms_p50_after": None,
            "root_ms_p95_after": None,
        }
    after = impact.root_ns - impact.saved_ns
    return {
        "root_ms_p50_before": _percentile_ms(impact.root_ns, 50),
        "root_ms_p95_before": _percentile_ms(impact.root_ns, 95),
        "root_ms_p50_after": _percentile_ms(after, 50),
        "root_ms_p95_after": _percentile_ms(after, 95),
    }


def exemplar_facts(
    ctx: AnalysisContext, finding: Finding, impact: Impact | None, trace_id: str
) -> dict[str, Any]:
    """Sequence diagrams and re-timing facts of one exemplar trace (see the module docstring)."""
    frame = ctx.trace_spans(trace_id)
    if frame.height == 0:
        return {}
    frame = frame.sort("row")
    trace = _Trace(frame)
    named, interventions = _named_rows(finding, trace_id, trace)
    focus = _focus(trace, named)
    chain = _chain(trace, focus)
    before = _diagram(trace, chain, trace.start, trace.end, None, {}, {}, {}, None)

    retimed = retime_trace(frame, finding)
    new_start = retimed["new_start_ns"].to_numpy().astype(np.int64)
    new_end = retimed["new_end_ns"].to_numpy().astype(np.int64)
    removed = np.asarray(retimed["removed"].to_numpy(), dtype=bool)
    by_id = trace.by_id
    groups: dict[int, int] = {}
    batched: dict[int, int] = {}
    shortened: dict[int, int] = {}
    for g, iv in enumerate(interventions):
        if isinstance(iv, RunConcurrently):
            for sid in iv.span_ids:
                if sid in by_id:
                    groups[by_id[sid]] = g
        elif isinstance(iv, CollapseSpans):
            members = [by_id[s] for s in iv.span_ids if s in by_id]
            if members:
                anchor = min(members, key=lambda i: int(trace.start[i]))
                batched[anchor] = len(members)
        elif isinstance(iv, ShortenSpan) and iv.span_id in by_id:
            i = by_id[iv.span_id]
            shortened[i] = int(trace.end[i]) - int(trace.start[i])
    # a "group" of one member is no concurrency
    sizes: dict[int, int] = {}
    for g in groups.values():
        sizes[g] = sizes.get(g, 0) + 1
    groups = {i: g for i, g in groups.items() if sizes[g] > 1}
    root = chain[0]
    root_before = trace[root].end - trace[root].start
    root_after = int(new_end[root]) - int(new_start[root])
    changed = bool(interventions) and (root_after != root_before or bool(removed.any()) or bool(groups))
    after = _diagram(
        trace,
        chain,
        new_start,
        new_end,
        removed,
        groups,
        batched,
        shortened,
        root_before if changed else None,
    )
    if not changed:  # no re-timing for this kind: say so rather than draw a silent copy
        after.lines.append(
            f"Note over {_Builder().p(trace[root].service)}: the what-if predicts no latency change; "
            "the design changes how failures are handled"
        )
    # the critical path after the change
    blocking = frame["blocking"].to_numpy().astype(bool)
    cp = compute_critical_path(trace.parent, new_start, new_end, blocking)
    critical = np.asarray(cp.critical_ns, dtype=np.int64)
    on_path = np.flatnonzero(np.asarray(cp.on_path, dtype=bool) & ~removed)
    # most critical time first, then the earlier start (a stable sort: ties keep span order)
    path_rows = on_path[np.lexsort((trace.start[on_path], -critical[on_path]))][:5]
    critical_after = [
        {
            "service": trace[i].service,
            "operation": trace[i].name,
            "self_ms": round(int(critical[i]) / 1e6, 3),
        }
        for i in (int(i) for i in path_rows)
        if critical[i] > 0
    ]
    calls = [
        {
            "service": callee(trace, k, trace[focus].service),
            "operation": trace[k].name,
            "ms": round((trace[k].end - trace[k].start) / 1e6, 3),
        }
        for k in (int(k) for k in trace.kids(focus)[:MAX_CALLS])
    ]
    return {
        "trace_id": trace_id,
        "root": {"service": trace[root].service, "operation": trace[root].name},
        "focus": {"service": trace[focus].service, "operation": trace[focus].name},
        "participants": before.participants,
        "sequence": {"before": before.text(), "after": after.text()},
        "exemplar_root_ms_before": round(root_before / 1e6, 3),
        "exemplar_root_ms_after": round(root_after / 1e6, 3),
        "critical_path_after": critical_after,
        "calls": calls,
    }


def call_durations(ctx: AnalysisContext, finding: Finding) -> np.ndarray:
    """Durations (ns) of the calls a finding's occurrences name in ``ctx``'s traces: the occurrence
    spans minus those that are the parent of another named span (the caller)."""
    occurrences = finding.occurrence_table
    span_ids, counts = occurrences.span_columns()
    trace_ids = occurrences.trace_ids_at(np.repeat(np.arange(len(counts)), counts))
    empty = np.zeros(0, dtype=np.float64)
    if len(span_ids) == 0 or ctx.spans.height == 0:
        return empty
    # the what-if engine's (trace_id, span_id) index (built once per context) finds the rows; a
    # join of the ids against every span cost ~0.1 s per finding at 1M spans
    engine = WhatIf.of(ctx).engine
    rows = engine._rows_of_columns(trace_ids, span_ids)
    named = np.unique(rows[rows >= 0])
    if named.size == 0:
        return empty
    parents = engine.parent[named]
    calls = named[~np.isin(named, parents[parents >= 0])]
    return engine.dur[calls].astype(np.float64)


def duration_stats(d: np.ndarray) -> dict[str, float]:
    """count and p50/p95/p99 (ms) of call durations in ns ({} when there are none)."""
    if d.size == 0:
        return {}
    return {
        "count": int(d.size),
        "p50_ms": round(float(np.percentile(d, 50)) / 1e6, 3),
        "p95_ms": round(float(np.percentile(d, 95)) / 1e6, 3),
        "p99_ms": round(float(np.percentile(d, 99)) / 1e6, 3),
    }


def call_stats(ctx: AnalysisContext, finding: Finding) -> dict[str, float]:
    """p50/p95/p99 (ms) of the calls a finding's occurrences name, across all its traces."""
    return duration_stats(call_durations(ctx, finding))


def design_facts(
    ctx: AnalysisContext,
    finding: Finding,
    impact: Impact | None,
    rec: Mapping[str, Any],
    resources: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Everything a writer needs beyond the recommendation object to write its ``design``."""
    service = str(rec.get("service") or finding.service)
    res = dict(resources.get(service) or {})
    language = res.get("language")
    language_source = "resource" if language else None
    if not language:  # no SDK attribute: the instrumentation scope may still say it
        from hourglass.analysis.resources import scope_languages

        by_scope = ctx.cached("scope_languages", lambda: scope_languages(ctx.spans))
        language = by_scope.get(service)
        language_source = "instrumentation scope" if language else None
    facts: dict[str, Any] = {
        "service": service,
        "language": language,
        "language_source": language_source,
        "namespace": res.get("namespace"),
        "owner": res.get("owner"),
        **predicted(impact),
        # measured over every trace: a partitioned analysis puts them in the cache (its context
        # holds only the exemplar traces)
        "call_stats": ctx.cache.get("call_stats", {}).get(finding.id) or call_stats(ctx, finding),
    }
    trace_ids = [str(t) for t in (rec.get("evidence") or {}).get("trace_ids") or []]
    for trace_id in trace_ids[:3]:
        ex = exemplar_facts(ctx, finding, impact, trace_id)
        if ex:
            facts["exemplar"] = ex
            break
    return facts
