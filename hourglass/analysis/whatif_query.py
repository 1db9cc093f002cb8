"""A user's what-if: "what if pricing were twice as fast?", re-timed like the recommendations.

``evaluate(ctx, changes, service=..., operation=...)`` applies a list of :class:`Change` to every
trace of an :class:`~analysis.context.AnalysisContext` (or only those whose root is
``service``/``operation``) with the engine that prices the recommendations
(:class:`hourglass.analysis.whatif.Retimer`), and answers::

    {"traces", "traces_changed", "saved_ms_total",
     "endpoints": [{"service", "operation", "traces", "saved_ms_total",
                    "before_ms_p50", "after_ms_p50", "before_ms_p95", "after_ms_p95"}],
     "changes": [{...the change..., "spans", "traces"}]}

Changes (the JSON of ``POST /v1/whatif``; the CLI flags build the same objects):

* ``{"recommendation": ID}`` — the recommendation's own interventions, in every trace where its
  detector finds it (so the saving agrees with the report's ``saved_ms_total``);
* ``{"speedup": {"service", "operation", "factor"}}`` — every span of that operation takes
  ``factor`` × its own time (:class:`hourglass.analysis.model.ScaleSelf`: its children keep theirs);
  ``factor`` ≥ 0, 1 changes nothing, 0 removes its own time, 2 doubles it; ``operation`` ``"*"``
  (or left out) is every operation of the service ("what if pricing were twice as fast");
* ``{"parallelize": {"service", "operation"}}`` — the blocking children of each span of that
  caller run concurrently (:class:`hourglass.analysis.model.RunConcurrently`);
* ``{"cap": {"service", "operation", "concurrency"}}`` — the blocking children of each span of
  that caller run at most ``concurrency`` at a time (:class:`hourglass.analysis.model.CapConcurrency`;
  above the current width it is "raise the pool size", below it a limit).

``saved_ms_total`` is the sum over the chosen traces of (root duration before − after), measured at
each subtree root as the recommendations are (orphaned subtrees count at their own root); negative
when a change makes things slower. Endpoint figures are per trace root. Bad input raises
:class:`WhatIfInputError` with the reason (the REST API answers 422, the CLI exits 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import Finding, kind_of
from hourglass.analysis.planning import ASKING
from hourglass.analysis.whatif import CAP, RUN_CONCURRENTLY, SCALE_SELF, Retimer, RowChanges

ChangeKind = Literal["recommendation", "speedup", "parallelize", "cap"]
CHANGE_KINDS: tuple[str, ...] = ("recommendation", "speedup", "parallelize", "cap")
MAX_CHANGES = 50
MAX_FACTOR = 1000.0
MAX_CONCURRENCY = 1_000_000
ANY_OPERATION = "*"  # speedup of a whole service


class WhatIfInputError(ValueError):
    """A change that cannot be applied: the message says which one and why."""


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    service: str = ""
    operation: str = ""
    factor: float = 1.0  # speedup
    concurrency: int = 0  # cap
    recommendation: str = ""

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "recommendation":
            return {"recommendation": self.recommendation}
        body: dict[str, Any] = {"service": self.service, "operation": self.operation}
        if self.kind == "speedup":
            body["factor"] = self.factor
        elif self.kind == "cap":
            body["concurrency"] = self.concurrency
        return {self.kind: body}

    def label(self) -> str:
        if self.kind == "recommendation":
            return f"recommendation {self.recommendation}"
        what = f"{self.kind} {self.service}:{self.operation}"
        if self.kind == "speedup":
            return f"{what} ×{self.factor:g}"
        if self.kind == "cap":
            return f"{what} to {self.concurrency}"
        return what


# ----------------------------------------------------------------------------------------------
# Parsing


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise WhatIfInputError(f"{where}: expected a non-empty string")
    if len(value) > 1000:
        raise WhatIfInputError(f"{where}: longer than 1000 characters")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WhatIfInputError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise WhatIfInputError(f"{where}: expected a finite number")
    return number


def change_from_json(item: Any, where: str = "change") -> Change:
    """One change object of ``POST /v1/whatif`` (see the module doc)."""
    if not isinstance(item, Mapping) or len(item) != 1:
        raise WhatIfInputError(
            f"{where}: expected an object with exactly one of {', '.join(CHANGE_KINDS)}, got {item!r}"[:300]
        )
    ((kind, body),) = item.items()
    if kind not in CHANGE_KINDS:
        raise WhatIfInputError(
            f"{where}: unknown change {kind!r} (expected one of {', '.join(CHANGE_KINDS)})"
        )
    if kind == "recommendation":
        return Change("recommendation", recommendation=_text(body, f"{where}.recommendation"))
    if not isinstance(body, Mapping):
        raise WhatIfInputError(f"{where}.{kind}: expected an object with service and operation")
    allowed = {"service", "operation"} | ({"factor"} if kind == "speedup" else set())
    allowed |= {"concurrency"} if kind == "cap" else set()
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise WhatIfInputError(f"{where}.{kind}: unknown field(s) {', '.join(unknown)}")
    service = _text(body.get("service"), f"{where}.{kind}.service")
    if kind == "speedup" and body.get("operation") is None:
        operation = ANY_OPERATION  # the whole service: every operation of it
    else:
        operation = _text(body.get("operation"), f"{where}.{kind}.operation")
    if operation == ANY_OPERATION and kind != "speedup":
        raise WhatIfInputError(f"{where}.{kind}.operation: name the caller's operation ('*' is for speedup)")
    if kind == "speedup":
        if "factor" not in body:
            raise WhatIfInputError(f"{where}.speedup.factor: missing (0.5 = twice as fast, 0 = no own time)")
        factor = _number(body["factor"], f"{where}.speedup.factor")
        if factor < 0 or factor > MAX_FACTOR:
            raise WhatIfInputError(
                f"{where}.speedup.factor: the factor {factor:g} is not between 0 and {MAX_FACTOR:g}"
            )
        return Change("speedup", service, operation, factor=factor)
    if kind == "cap":
        if "concurrency" not in body:
            raise WhatIfInputError(f"{where}.cap.concurrency: missing (how many children at a time)")
        k = body["concurrency"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_CONCURRENCY:
            raise WhatIfInputError(
                f"{where}.cap.concurrency: the concurrency must be a whole number >= 1, got {k!r}"
            )
        return Change("cap", service, operation, concurrency=int(k))
    return Change("parallelize", service, operation)


def changes_from_json(items: Any) -> list[Change]:
    if not isinstance(items, list):
        raise WhatIfInputError("changes: expected a list of changes")
    if not items:
        raise WhatIfInputError("changes: the list is empty; give at least one change")
    if len(items) > MAX_CHANGES:
        raise WhatIfInputError(f"changes: {len(items)} changes, at most {MAX_CHANGES}")
    return [change_from_json(item, f"changes[{i}]") for i, item in enumerate(items)]


def _split_target(text: str, flag: str, needs_value: bool) -> tuple[str, str, str]:
    """``svc:op`` or ``svc:op=value`` (the operation may hold ':' and '='; the value is after the
    last '=')."""
    value = ""
    target = text
    if needs_value:
        target, sep, value = text.rpartition("=")
        if not sep or not value.strip():
            raise WhatIfInputError(f"{flag} {text!r}: expected SERVICE:OPERATION=VALUE")
    service, sep, operation = target.partition(":")
    if not sep or not service.strip() or not operation.strip():
        raise WhatIfInputError(
            f"{flag} {text!r}: expected SERVICE:OPERATION{'=VALUE' if needs_value else ''}"
        )
    return service, operation, value.strip()


def _target_value(text: str, flag: str, convert: Callable[[str], Any], what: str) -> tuple[str, str, Any]:
    """``svc:op=value`` with the value converted (``float``, ``int``); ``what`` names the kind of
    value in the error."""
    service, operation, value = _split_target(text, flag, True)
    try:
        return service, operation, convert(value)
    except ValueError:
        raise WhatIfInputError(f"{flag} {text!r}: {value!r} is not {what}") from None


def changes_from_cli(
    *,
    speedup: Sequence[str] = (),
    recommendation: Sequence[str] = (),
    parallelize: Sequence[str] = (),
    cap: Sequence[str] = (),
) -> list[Change]:
    """The CLI flags as changes: ``--speedup svc:op=0.5`` (``svc:*=0.5``: the whole service),
    ``--recommendation ID``, ``--parallelize svc:op``, ``--cap svc:op=4``."""
    out: list[Change] = []

    def add(flag: str, text: str, item: dict[str, Any]) -> None:
        try:
            out.append(change_from_json(item, "x"))
        except WhatIfInputError as exc:
            reason = str(exc).split(": ", 1)[-1]
            raise WhatIfInputError(f"{flag} {text!r}: {reason}") from None

    for rec in recommendation:
        add("--recommendation", rec, {"recommendation": rec})
    for text in speedup:
        service, operation, factor = _target_value(text, "--speedup", float, "a number")
        add("--speedup", text, {"speedup": {"service": service, "operation": operation, "factor": factor}})
    for text in parallelize:
        service, operation, _ = _split_target(text, "--parallelize", False)
        add("--parallelize", text, {"parallelize": {"service": service, "operation": operation}})
    for text in cap:
        service, operation, k = _target_value(text, "--cap", int, "a whole number")
        add("--cap", text, {"cap": {"service": service, "operation": operation, "concurrency": k}})
    if not out:
        raise WhatIfInputError("no change given: use --speedup, --recommendation, --parallelize or --cap")
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation


FindingLookup = Callable[[str], Finding | None]


def detector_lookup(ctx: AnalysisContext) -> FindingLookup:
    """Find a recommendation's finding by its id: its kind is the id's prefix; that detector runs
    once on ``ctx`` (cached) and the finding with the same stable id is taken."""
    from hourglass.analysis.detectors import DETECTORS

    found: dict[str, dict[str, Finding]] = {}

    def lookup(rec_id: str) -> Finding | None:
        kind = kind_of(rec_id)
        detect = DETECTORS.get(kind)
        if detect is None:
            return None
        if kind not in found:
            found[kind] = {f.id: f for f in detect(ctx)}
        return found[kind].get(rec_id)

    return lookup


def _no_root(service: str | None, operation: str | None, seen: int) -> WhatIfInputError:
    """A what-if of the traces rooted at ``service``/``operation`` when none of the window's
    ``seen`` traces is."""
    where = "/".join(x for x in (service, operation) if x is not None)
    return WhatIfInputError(f"no trace has a root span {where!r} in the window ({seen} traces analysed)")


def _unknown(recommendation: str) -> WhatIfInputError:
    return WhatIfInputError(
        f"no recommendation {recommendation!r} in these traces "
        "(ids are listed by GET /v1/recommendations and `hourglass analyze`)"
    )


def _quantile(column: str, q: float) -> pl.Expr:
    return (pl.col(column).quantile(q, interpolation="linear") / 1e6).round(3)


def evaluate(
    ctx: AnalysisContext,
    changes: Sequence[Change],
    *,
    service: str | None = None,
    operation: str | None = None,
    lookup: FindingLookup | None = None,
    engine: Retimer | None = None,
) -> dict[str, Any]:
    """Apply ``changes`` to the traces of ``ctx`` rooted at ``service``/``operation`` (each filter
    optional) and measure the root latencies before and after (see the module doc)."""
    _check_changes(changes)
    part = evaluate_part(ctx, changes, service=service, operation=operation, lookup=lookup, engine=engine)
    return combine_parts([part], changes, service=service, operation=operation)


def _check_changes(changes: Sequence[Change]) -> None:
    if not changes:
        raise WhatIfInputError("changes: the list is empty; give at least one change")


@dataclass
class PartAnswer:
    """One context's share of a what-if (:func:`evaluate_part`): the parts of a window's
    partitions of whole traces add up to the answer over the window (:func:`combine_parts`);
    a trace's re-timing depends on its own spans alone."""

    traces: int  # traces chosen (rooted at service/operation)
    traces_seen: int  # traces in the context
    traces_changed: int
    saved_ns: int
    per_root: pl.DataFrame  # root_service, root_name, before, after: one row per chosen trace
    matched: list[bool]  # per change: some span of its service/operation is in the context
    spans: list[int]  # per change: spans it changes
    touched: list[int]  # per change: traces it changes


def evaluate_part(
    ctx: AnalysisContext,
    changes: Sequence[Change],
    *,
    service: str | None = None,
    operation: str | None = None,
    lookup: FindingLookup | None = None,
    engine: Retimer | None = None,
) -> PartAnswer:
    """:func:`evaluate` over the traces of ``ctx``, before the answer is made; a change whose
    span is not in ``ctx`` changes nothing here (:func:`combine_parts` says when none matched
    anywhere). ``lookup``: the recommendations' findings; one it does not know raises."""
    spans = ctx.spans
    traces = ctx.traces
    if service is not None:
        traces = traces.filter(pl.col("root_service") == service)
    if operation is not None:
        traces = traces.filter(pl.col("root_name") == operation)
    engine = engine or Retimer(spans, ctx.critical.predecessor if ctx.critical is not None else None)
    selected = np.zeros(spans.height, dtype=bool)
    if traces.height:
        selected = spans["trace_id"].is_in(traces["trace_id"].implode()).to_numpy()
    if traces.height == ctx.traces.height:
        selected[:] = True
    names = spans.select("service", "name")
    rows_l: list[np.ndarray] = []
    owner_l: list[np.ndarray] = []
    kinds_l: list[np.ndarray] = []
    ivalues_l: list[np.ndarray] = []
    fvalues_l: list[np.ndarray] = []
    n_iv = 0
    matched: list[bool] = []
    changed_spans: list[int] = []
    touched: list[int] = []
    trace_index = _trace_index(spans)
    for change in changes:
        if change.kind == "recommendation":
            finding = (lookup or detector_lookup(ctx))(change.recommendation)
            if finding is None:
                raise _unknown(change.recommendation)
            # (occurrences in traces of other contexts resolve to no row here, and are dropped)
            rows, owner, types, ivalues, fvalues = engine._resolve(finding, None)
            keep = selected[rows]
            rows, owner = rows[keep], owner[keep]
            kinds = np.zeros(ivalues.size, dtype=np.int64)
            if types.size:
                kinds[owner] = types
            matched.append(True)
        else:
            in_service = names["service"] == change.service
            if change.operation != ANY_OPERATION:
                in_service = in_service & (names["name"] == change.operation)
            match = in_service.to_numpy()
            matched.append(bool(match.any()))
            targets = np.nonzero(match & selected)[0]
            if change.kind == "speedup":
                rows, owner = targets, np.arange(targets.size, dtype=np.int64)
                kinds = np.full(targets.size, SCALE_SELF, dtype=np.int64)
                ivalues = np.zeros(targets.size, dtype=np.int64)
                fvalues = np.full(targets.size, change.factor, dtype=np.float64)
            else:
                children, owner = engine._children_of(targets)
                keep = engine.blocking[children]
                rows, owner = children[keep], owner[keep]
                kind = RUN_CONCURRENTLY if change.kind == "parallelize" else CAP
                kinds = np.full(targets.size, kind, dtype=np.int64)
                ivalues = np.full(targets.size, change.concurrency, dtype=np.int64)
                fvalues = np.ones(targets.size, dtype=np.float64)
        rows_l.append(rows)
        owner_l.append(owner + n_iv)
        kinds_l.append(kinds)
        ivalues_l.append(ivalues)
        fvalues_l.append(fvalues)
        n_iv += ivalues.size
        touched.append(int(np.unique(trace_index[rows]).size) if rows.size else 0)
        changed_spans.append(int(np.unique(rows).size))
    extra = RowChanges(
        np.concatenate(rows_l),
        np.concatenate(owner_l),
        np.concatenate(kinds_l),
        np.concatenate(ivalues_l),
        np.concatenate(fvalues_l),
    )
    plan = engine.plan(None, extra=extra)
    new_dur, _, _ = engine.retime(plan)
    old_dur = engine.dur
    is_root = engine.parent < 0
    root_rows = np.nonzero(is_root & selected)[0]
    saved = old_dur[root_rows] - new_dur[root_rows]
    changed = np.unique(trace_index[root_rows[saved != 0]]).size
    main = (
        traces.select("trace_id", pl.col("root_span_id").alias("span_id"), "root_service", "root_name")
        .join(spans.select("trace_id", "span_id", "row"), on=["trace_id", "span_id"], how="inner")
        .unique(subset="trace_id", keep="first")
    )
    main_rows = main["row"].to_numpy().astype(np.int64)
    per_root = main.select("root_service", "root_name").with_columns(
        pl.Series("before", old_dur[main_rows]), pl.Series("after", new_dur[main_rows])
    )
    from hourglass.analysis.context import compact

    # its own strings: cut from the spans', they would keep every partition's string buffers alive
    # until the answer is made (a what-if over a 7.2M-span store in 14 partitions: 2.2 GiB held)
    per_root = compact(per_root)
    return PartAnswer(
        traces=int(traces.height),
        traces_seen=int(ctx.traces.height),
        traces_changed=int(changed),
        saved_ns=int(saved.sum()),
        per_root=per_root,
        matched=matched,
        spans=changed_spans,
        touched=touched,
    )


def combine_parts(
    parts: Sequence[PartAnswer],
    changes: Sequence[Change],
    *,
    service: str | None = None,
    operation: str | None = None,
) -> dict[str, Any]:
    """The answer (module doc) of the contexts whose shares are ``parts``: disjoint sets of whole
    traces, so counts and savings add up and the endpoints' percentiles are those of all their
    traces. Raises what :func:`evaluate` raises: no chosen trace, a change that matches no span."""
    chosen = sum(p.traces for p in parts)
    if chosen == 0 and (service is not None or operation is not None):
        raise _no_root(service, operation, sum(p.traces_seen for p in parts))
    echo: list[dict[str, Any]] = []
    for i, change in enumerate(changes):
        if not any(p.matched[i] for p in parts):
            raise WhatIfInputError(
                f"{change.label()}: no span {change.service}:{change.operation} in the "
                "window (service and operation are the span's service.name and span name)"
            )
        echo.append(
            {
                **change.as_dict(),
                "spans": sum(p.spans[i] for p in parts),
                "traces": sum(p.touched[i] for p in parts),
            }
        )
    filled = [p.per_root for p in parts if p.per_root.height] or [parts[0].per_root]
    per_root = pl.concat(filled, how="vertical_relaxed") if len(filled) > 1 else filled[0]
    endpoints_frame = (
        per_root.group_by("root_service", "root_name")
        .agg(
            pl.len().alias("traces"),
            ((pl.col("before") - pl.col("after")).sum() / 1e6).round(3).alias("saved_ms_total"),
            _quantile("before", 0.5).alias("before_ms_p50"),
            _quantile("after", 0.5).alias("after_ms_p50"),
            _quantile("before", 0.95).alias("before_ms_p95"),
            _quantile("after", 0.95).alias("after_ms_p95"),
        )
        .sort(
            ["saved_ms_total", "traces", "root_service", "root_name"], descending=[True, True, False, False]
        )
        .rename({"root_service": "service", "root_name": "operation"})
    )
    return {
        "traces": int(chosen),
        "traces_changed": int(sum(p.traces_changed for p in parts)),
        "saved_ms_total": round(float(sum(p.saved_ns for p in parts)) / 1e6, 3),
        "endpoints": endpoints_frame.to_dicts(),
        "changes": echo,
    }


class PartsRunner(Protocol):
    """What runs a question's partitions elsewhere: ``partitions.ProcessExecutor`` (its ``map``
    retries a failed partition once, then raises naming it)."""

    workers: int

    def map(
        self, phase: str, fn: Callable[..., Any], calls: list[tuple[Any, ...]], progress: Any
    ) -> list[Any]: ...


def evaluate_partitioned(
    load: Callable[[int, int], AnalysisContext],
    parts: int,
    changes: Sequence[Change],
    *,
    service: str | None = None,
    operation: str | None = None,
    lookup: FindingLookup | None = None,
    runner: PartsRunner | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    trace_parts: Callable[[list[str], int], pl.DataFrame | None] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate` over a window too large for one context: the shares of
    :func:`answers_partitioned`, combined (:func:`combine_parts`)."""
    answers = answers_partitioned(
        load,
        parts,
        changes,
        service=service,
        operation=operation,
        lookup=lookup,
        runner=runner,
        progress=progress,
        trace_parts=trace_parts,
    )
    return combine_parts(answers, changes, service=service, operation=operation)


def answers_partitioned(
    load: Callable[[int, int], AnalysisContext],
    parts: int,
    changes: Sequence[Change],
    *,
    service: str | None = None,
    operation: str | None = None,
    lookup: FindingLookup | None = None,
    runner: PartsRunner | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    trace_parts: Callable[[list[str], int], pl.DataFrame | None] | None = None,
) -> list[PartAnswer]:
    """Each partition's share (:func:`evaluate_part`) of a window too large for one context:
    ``load(part, parts)`` builds the context of each partition of whole traces in turn (one held
    at a time). ``lookup`` gives the recommendations' findings as decided
    over the whole window (a detector run on one partition would decide over its traces only);
    without it a recommendation change raises. ``runner``: the partitions are asked in its worker
    processes instead, several at once (``load`` must pickle: a :class:`SourceContexts`), each
    given the findings its changes name; the same answer (a trace's re-timing depends on its own
    spans alone). ``trace_parts(trace_ids, parts)`` (``partitions.trace_parts_of``): the partition
    of each trace id (trace_id, part), so that each task is given the occurrences of its own
    traces only, not every occurrence of the window (None, or not given: every task gets them
    all). ``progress(ASKING, done, parts)`` as partitions are answered."""
    _check_changes(changes)
    if lookup is None and any(change.kind == "recommendation" for change in changes):
        raise WhatIfInputError("a recommendation change needs the window's findings")
    if runner is not None:
        findings: dict[str, Finding] = {}
        for change in changes:
            if change.kind == "recommendation":
                assert lookup is not None
                found = lookup(change.recommendation)
                if found is None:
                    raise _unknown(change.recommendation)
                findings[change.recommendation] = found
        shares = _findings_by_partition(findings, parts, trace_parts)
        calls = [
            (load, part, parts, list(changes), service, operation, shares[part] if shares else findings)
            for part in range(parts)
        ]
        return list(runner.map(ASKING, evaluate_part_task, calls, progress))
    return _ask_in_turn(load, parts, changes, service, operation, lookup, progress)


def _ask_in_turn(
    load: Callable[[int, int], AnalysisContext],
    parts: int,
    changes: Sequence[Change],
    service: str | None,
    operation: str | None,
    lookup: FindingLookup | None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[PartAnswer]:
    """Each partition's share, one context at a time in this process."""
    answers = []
    for part in range(parts):
        ctx = load(part, parts)
        answers.append(evaluate_part(ctx, changes, service=service, operation=operation, lookup=lookup))
        ctx.cache.clear()  # (the engine the context caches refers back to it: freed at once)
        del ctx
        if progress:
            progress(ASKING, part + 1, parts)
    return answers


def _findings_by_partition(
    findings: dict[str, Finding],
    parts: int,
    trace_parts: Callable[[list[str], int], pl.DataFrame | None] | None,
) -> list[dict[str, Finding]] | None:
    """Per partition, ``findings`` with the occurrences of its traces only (None: not known where
    the traces are): sent whole, every task would unpickle every occurrence of the window, as
    the pricing's tasks once did (``partitions.findings_by_partition``)."""
    if not findings or trace_parts is None:
        return None
    from hourglass.analysis.partitions import findings_by_partition

    ids = sorted({t for f in findings.values() for t in f.occurrence_table.trace_id_series().to_list()})
    where = trace_parts(ids, parts)
    if where is None:
        return None
    keys = list(findings)
    shares = findings_by_partition([findings[k] for k in keys], where, parts)
    return [dict(zip(keys, share, strict=True)) for share in shares]


def evaluate_part_task(
    load: Callable[[int, int], AnalysisContext],
    part: int,
    parts: int,
    changes: list[Change],
    service: str | None,
    operation: str | None,
    findings: dict[str, Finding],
) -> PartAnswer:
    """A worker's task (:func:`evaluate_partitioned` with a ``runner``): partition ``part``'s
    share of the answer."""
    ctx = load(part, parts)
    try:
        return evaluate_part(ctx, changes, service=service, operation=operation, lookup=findings.get)
    finally:
        ctx.cache.clear()


@dataclass(frozen=True)
class SourceContexts:
    """``load(part, parts)`` of a question asked in worker processes: a partition of
    ``source`` (``partitions.SplitSource``, ``partitions.StoreSource``: each read by the task
    itself) made into its context as :func:`partition_contexts` makes it; pickles."""

    source: Any
    since_ns: int | None = None

    def __call__(self, part: int, parts: int) -> AnalysisContext:
        return partition_contexts(self.source.load, self.since_ns)(part, parts)


def partition_contexts(
    load: Callable[[int, int], pa.Table], since_ns: int | None = None
) -> Callable[[int, int], AnalysisContext]:
    """``load(part, parts)`` (a partition's spans: ``partitions.StoreSource.load``, a store's
    ``scan_partition``) made into the context of its traces selected as a window's are
    (``pipeline.select_traces``: whole traces with a span from ``since_ns``), for
    :func:`evaluate_partitioned` and ``endpoint_path.endpoint_critical_path_partitioned``."""

    def context(part: int, parts: int) -> AnalysisContext:
        from hourglass.analysis.context import to_analysis_frame
        from hourglass.analysis.pipeline import select_traces

        frame = select_traces(to_analysis_frame(load(part, parts)), since_ns=since_ns)
        return AnalysisContext.from_table(frame)

    return context


def endpoint_path_of_traces(
    read: Callable[[int, int, list[str]], pa.Table],
    trace_ids: list[str],
    spans: int,
    room: int,
    service: str,
    operation: str,
    since_ns: int | None = None,
    copies: int = 1,
) -> tuple[dict[str, Any] | None] | None:
    """The critical path of the endpoint (``service``, ``operation``) over a window too large for
    one context, decided over the traces with a span of that endpoint only: ``trace_ids``, which
    hold ``spans`` span rows (``DuckDBSpanStore.endpoint_trace_ids``; every trace rooted there is
    among them, and a trace's path depends on its own spans alone, so the path is the window's).
    ``read(part, parts, ids)``: those of ``ids`` in partition ``part`` of ``parts``, whole (a
    store's ``scan_partition``); within ``room`` bytes (``planning.question_parts``), the
    window selected as a question's is (``since_ns``). Returns (the path,) — (None,): no trace
    of the window is rooted there —, or None when those traces need as many partitions as a
    window is split into files for (``SPLIT_MIN_PARTS``): ask the window instead."""
    from hourglass.analysis.endpoint_path import endpoint_critical_path_partitioned

    if not trace_ids:
        return (None,)
    asked = _traces_in_few_parts(read, trace_ids, spans, room, copies, since_ns)
    if asked is None:
        return None
    contexts, parts = asked
    return (endpoint_critical_path_partitioned(contexts, parts, service, operation)[1],)


def _traces_in_few_parts(
    read: Callable[[int, int, list[str]], pa.Table],
    trace_ids: list[str],
    spans: int,
    room: int,
    copies: int,
    since_ns: int | None,
) -> tuple[Callable[[int, int], AnalysisContext], int] | None:
    """(``load(part, parts)`` of ``trace_ids``' contexts, the window selected from them, and the
    partitions they need within ``room``), or None when they need as many partitions as a window
    is split into files for (``SPLIT_MIN_PARTS``) or none fits: asked over the window instead."""
    from hourglass.analysis.planning import SPLIT_MIN_PARTS, BudgetError, question_parts

    try:
        parts = question_parts(spans, room, copies)
    except BudgetError:
        return None
    if parts >= SPLIT_MIN_PARTS:  # (past ``planning.few_parts_spans``)
        return None
    return partition_contexts(lambda part, n: read(part, n, trace_ids), since_ns), parts


def whatif_of_traces(
    read: Callable[[int, int, list[str]], pa.Table],
    trace_ids: list[str],
    spans: int,
    room: int,
    changes: Sequence[Change],
    *,
    service: str | None,
    operation: str | None,
    has_span: Callable[[str, str | None], bool],
    since_ns: int | None = None,
    lookup: FindingLookup | None = None,
    copies: int = 1,
    window_traces: Callable[[], int | None] | None = None,
    ask_many: Callable[[list[str], int], list[PartAnswer] | None] | None = None,
) -> dict[str, Any] | None:
    """:func:`evaluate` of the traces rooted at ``service``/``operation`` (one at least) over a
    window too large for one context, over the traces with a span of that endpoint only:
    ``trace_ids``, which hold ``spans`` span rows (``DuckDBSpanStore.endpoint_trace_ids``; every
    trace rooted there is among them, and a trace's re-timing depends on its own spans alone),
    read by ``read(part, parts, ids)`` as :func:`endpoint_path_of_traces` reads them. What the
    answer says of the rest of the window — whether a change's span is in it at all — is asked
    of the store (``has_span(service, operation)``: None for every operation of the service).
    When no trace of the window is rooted there, the window's refusal, with its count of traces
    from ``window_traces()`` (the window's traces as its contexts keep them: the sum of
    :func:`endpoints_of_roots`); None when that is not given or says None (the window's own pass
    says so). When those traces need as many partitions as a window is split into files for
    (``SPLIT_MIN_PARTS``), ``ask_many(ids, spans)`` asks them (from a split of their own), its
    shares of the traces rooted there (:func:`ask_parts`) or None: ask the window."""
    _check_changes(changes)
    if lookup is None and any(change.kind == "recommendation" for change in changes):
        raise WhatIfInputError("a recommendation change needs the window's findings")
    answers: list[PartAnswer] = []
    if trace_ids:
        asked = _traces_in_few_parts(read, trace_ids, spans, room, copies, since_ns)
        if asked is not None:
            contexts, parts = asked
            answers = _ask_in_turn(contexts, parts, changes, service, operation, lookup)
        else:
            many = ask_many(trace_ids, spans) if ask_many is not None else None
            if many is None:
                return None
            answers = many
    if not sum(answer.traces for answer in answers):
        # (no trace with a span of it is rooted there, so none of the window is)
        seen = window_traces() if window_traces is not None else None
        if seen is None:
            return None
        for change in changes:  # (as the window's partitions: an unknown one is said first)
            if (
                change.kind == "recommendation"
                and lookup is not None
                and lookup(change.recommendation) is None
            ):
                raise _unknown(change.recommendation)
        raise _no_root(service, operation, seen)
    for i, change in enumerate(changes):
        if change.kind != "recommendation" and not any(answer.matched[i] for answer in answers):
            # (not in these traces; in the window's others, it changes none of the chosen ones)
            answers[0].matched[i] = has_span(
                change.service, None if change.operation == ANY_OPERATION else change.operation
            )
    return combine_parts(answers, changes, service=service, operation=operation)


def touched_by(
    changes: Sequence[Change], lookup: FindingLookup | None
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """What ``changes`` can touch in a window: ((service, operation) of the spans a speedup,
    parallelize or cap change names, operation None for every operation of the service), and
    the trace ids of the recommendations' occurrences (``lookup``: the window's findings). A
    trace with neither keeps every duration under these changes. An unknown recommendation raises."""
    spans_of: list[tuple[str, str | None]] = []
    trace_ids: set[str] = set()
    for change in changes:
        if change.kind == "recommendation":
            finding = lookup(change.recommendation) if lookup is not None else None
            if finding is None:
                raise _unknown(change.recommendation)
            trace_ids.update(finding.occurrence_table.trace_id_series().to_list())
        else:
            spans_of.append((change.service, None if change.operation == ANY_OPERATION else change.operation))
    return spans_of, sorted(trace_ids)


def whatif_of_touched_traces(
    read: Callable[[int, int, list[str]], pa.Table],
    roots: pa.Table,
    room: int,
    changes: Sequence[Change],
    *,
    since_ns: int | None = None,
    lookup: FindingLookup | None = None,
    copies: int = 1,
    most_traces: int | None = None,
    ask_many: Callable[[list[str], int], list[PartAnswer] | None] | None = None,
) -> dict[str, Any] | None:
    """:func:`evaluate` of every trace of a window too large for one context, re-timing only the
    traces ``changes`` can touch. ``roots``: one row per trace of the window
    (``DuckDBSpanStore.window_roots`` of :func:`touched_by`'s spans and ids): a trace to read has
    its ``trace_id`` (and its span rows, ``spans``); any other is known by its root's service,
    name and duration, which the changes leave as they are (a trace's re-timing depends on its
    own spans alone, and only a change's own spans or a recommendation's occurrences move
    anything). Those traces are read by ``read(part, parts, ids)``, whole, and asked as a
    window's partitions are; the others add their roots (before = after) to the endpoints'
    figures and the window's count. The same answer as the window's partitions give. When the
    traces to read need as many partitions as a window is split into files for
    (``SPLIT_MIN_PARTS``), ``ask_many(ids, spans)`` asks them (serve: from a split of their own),
    its shares (:func:`ask_parts`) or None. None when they are more than ``most_traces``, or
    need that many partitions and ``ask_many`` did not answer: ask the window instead."""
    _check_changes(changes)
    split = _named_and_rest(roots, most_traces)
    if split is None:
        return None
    rest, ids, spans = split
    # the untouched traces' share first, its own copy: the per-trace rows let go of before the
    # touched traces are read (``roots`` too: a caller that hands it over keeps no reference)
    from hourglass.analysis.context import compact

    untouched = PartAnswer(
        traces=rest.height,
        traces_seen=rest.height,
        traces_changed=0,
        saved_ns=0,
        per_root=compact(
            rest.select(
                pl.col("root_service").cast(pl.String),
                pl.col("root_name").cast(pl.String),
                pl.col("root_duration_ns").cast(pl.Int64).alias("before"),
                pl.col("root_duration_ns").cast(pl.Int64).alias("after"),
            )
        ),
        # (a recommendation is matched wherever it is known; a span change, where its span is)
        matched=[change.kind == "recommendation" for change in changes],
        spans=[0] * len(changes),
        touched=[0] * len(changes),
    )
    del rest, roots
    answers: list[PartAnswer] = []
    if ids:
        found = _traces_in_few_parts(read, ids, spans, room, copies, since_ns)
        if found is not None:
            answers = ask_parts(*found, changes, lookup)
        else:
            shares = ask_many(ids, spans) if ask_many is not None else None
            if shares is None:
                return None
            answers = shares
    answers.append(untouched)
    return combine_parts(answers, changes)


def endpoints_of_roots(
    read: Callable[[int, int, list[str]], pa.Table],
    roots: pa.Table,
    room: int,
    *,
    since_ns: int | None = None,
    copies: int = 1,
    most_traces: int | None = None,
) -> pl.DataFrame | None:
    """``endpoint_path.endpoints`` (service, operation, traces: the trace roots, the busiest
    first) of a window too large for one context, from ``roots`` (``DuckDBSpanStore.window_roots``
    with no change): the traces of a plain root counted by it, the others read by their ids
    (``read(part, parts, ids)``, in up to 3 partitions) and counted by the root their context
    chooses. The window's own listing. None when those are more than ``most_traces`` or need
    more partitions: ask the window instead."""
    from hourglass.analysis.endpoint_path import endpoints

    split = _named_and_rest(roots, most_traces)
    if split is None:
        return None
    rest, ids, spans = split
    counted = [
        rest.group_by(
            pl.col("root_service").cast(pl.String).alias("service"),
            pl.col("root_name").cast(pl.String).alias("operation"),
        ).agg(pl.len().alias("traces"))
    ]
    if ids:
        found = _traces_in_few_parts(read, ids, spans, room, copies, since_ns)
        if found is None:
            return None
        contexts, parts = found
        for part in range(parts):
            counted.append(endpoints(contexts(part, parts)))
    return (
        pl.concat(counted, how="vertical_relaxed")
        .group_by("service", "operation")
        .agg(pl.col("traces").sum())
        .sort(["traces", "service", "operation"], descending=[True, False, False])
    )


def rooted_nowhere(listing: pl.DataFrame, service: str | None, operation: str | None) -> bool:
    """Whether no trace of the endpoints ``listing`` (:func:`endpoints_of_roots`) is rooted at
    ``service``/``operation`` (either None: any)."""
    matches = listing
    if service is not None:
        matches = matches.filter(pl.col("service") == service)
    if operation is not None:
        matches = matches.filter(pl.col("operation") == operation)
    return matches.height == 0


def _named_and_rest(roots: pa.Table, most_traces: int | None) -> tuple[pl.DataFrame, list[str], int] | None:
    """``DuckDBSpanStore.window_roots``' rows as (the traces known by their roots, the ids of
    those to read, sorted, and their span rows); None when those are more than ``most_traces``."""
    frame = pl.from_arrow(roots)
    assert isinstance(frame, pl.DataFrame)
    named = frame.filter(pl.col("trace_id").is_not_null())
    if most_traces is not None and named.height > most_traces:
        return None
    return (
        frame.filter(pl.col("trace_id").is_null()),
        named["trace_id"].sort().to_list(),
        int(named["spans"].sum()),
    )


def ask_parts(
    load: Callable[[int, int], AnalysisContext],
    parts: int,
    changes: Sequence[Change],
    lookup: FindingLookup | None,
    service: str | None = None,
    operation: str | None = None,
) -> list[PartAnswer]:
    """The shares of the traces of ``parts`` contexts ``load(part, parts)`` (rooted at
    ``service``/``operation`` when given), one at a time: what the ``ask_many`` of
    :func:`whatif_of_touched_traces` and :func:`whatif_of_traces` returns for the traces it is given."""
    return _ask_in_turn(load, parts, changes, service, operation, lookup)


def _trace_index(spans: pl.DataFrame) -> np.ndarray:
    """Per row, the ordinal of its trace (a trace's rows are contiguous in a context)."""
    if spans.height == 0:
        return np.zeros(0, dtype=np.int64)
    ids = spans["trace_id"]
    return (ids != ids.shift(1)).fill_null(True).cum_sum().to_numpy().astype(np.int64) - 1
