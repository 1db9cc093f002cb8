"""What detectors report and how the what-if engine re-times a trace.

A detector returns :class:`Finding` objects: one per bottleneck signature (the same bottleneck
seen in many traces is one finding), each carrying its per-trace :class:`Occurrence` list. An
occurrence says which spans are involved and which :class:`Intervention` would remove the
bottleneck in that trace; the what-if engine applies the interventions to the trace and re-times
it along its critical path, so savings are measured at the root, never as a local ``sum - max``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

Category = Literal["parallelization", "fault_tolerance"]


def num(value: Any) -> float:
    """A number from a report field or a polars scalar (median, max, ...) as float; 0.0 for
    null, empty or anything that is not a number."""
    return float(value) if isinstance(value, int | float) else 0.0


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
    occurrences: list[Occurrence]
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
        object.__setattr__(self, name, value)

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
        return list(dict.fromkeys(o.trace_id for o in self.occurrences))


_SIGNATURE_FIELDS = frozenset({"kind", "service", "operation", "targets", "signature_extra"})
