"""Pydantic models of the REST API's responses: they make the OpenAPI schema precise.

The report objects follow the ``hourglass.report/v1`` contract (DESIGN.md). Models allow extra
fields so the analysis can add detector numbers and metadata without breaking clients; the
fields listed here are the ones clients may rely on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def kinds() -> list[str]:
    """The kinds of recommendation: the detector registry's, in its order (the one list of kinds).
    Read when a schema is built, not at import, so starting the app does not load the detectors."""
    from hourglass.analysis.detectors import DETECTORS

    return list(DETECTORS)


def _kind_enum(schema: dict[str, Any]) -> None:
    schema["enum"] = kinds()


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Health(BaseModel):
    status: Literal["ok"]


class ErrorBody(BaseModel):
    detail: Any = Field(description="What was wrong with the request")


class Target(_Open):
    service: str
    operation: str


class Impact(_Open):
    saved_ms_p50: float | None = Field(None, description="Root latency saved per affected trace, median, ms")
    saved_ms_p95: float | None = Field(None, description="Root latency saved per affected trace, p95, ms")
    saved_ms_total: float | None = Field(None, description="Root latency saved over all affected traces, ms")
    share_of_root_latency: float | None = Field(
        None, description="Saved latency / root latency of affected traces"
    )
    cost_ms_p50: float | None = Field(
        None,
        description="Fault tolerance: measured cost per affected trace, median, ms (evidence.cost_basis)",
    )
    cost_ms_p95: float | None = Field(
        None, description="Fault tolerance: measured cost per affected trace, p95, ms"
    )
    cost_ms_total: float | None = Field(
        None, description="Fault tolerance: measured cost over all affected traces, ms"
    )
    cost_share_of_root_latency: float | None = Field(
        None, description="Fault tolerance: measured cost / root latency of affected traces"
    )


class Evidence(_Open):
    trace_ids: list[str] = Field(default_factory=list, description="Exemplar trace ids, best first")
    span_ids: list[str] = Field(default_factory=list, description="Spans involved in the exemplars")


class Pattern(_Open):
    name: str = Field(description="The named pattern chosen for this case")
    parameters: dict[str, Any] = Field(default_factory=dict, description="Its parameters, from the evidence")
    summary: str = ""


class Pseudocode(_Open):
    language: str = Field(description="The service's telemetry.sdk.language, or 'pseudocode' when unknown")
    code: str


class Sequence(_Open):
    before: str | None = Field(None, description="Mermaid sequenceDiagram of the exemplar trace, measured")
    after: str | None = Field(None, description="The same flow as the what-if re-times it")
    trace_id: str | None = None


class Design(_Open):
    pattern: Pattern
    rationale: str
    dependencies: str
    consistency: str
    failure_handling: str
    verification: str
    tests: str
    predicted: dict[str, Any] = Field(
        default_factory=dict, description="Root p50/p95 before and after (what-if, ms); the new critical path"
    )
    pseudocode: Pseudocode
    sequence: Sequence


class Workstream(_Open):
    id: str
    service: str = Field(description="The service that must change")
    namespace: str | None = None
    owner: str | None = None
    recommendations: list[str] = Field(default_factory=list, description="Recommendation ids")
    prerequisites: list[str] = Field(
        default_factory=list, description="What other teams' changes need from it"
    )
    depends_on: list[str] = Field(default_factory=list, description="Workstream ids that must land first")
    parallel_with: list[str] = Field(default_factory=list)
    wave: int = Field(1, description="Workstreams of one wave can proceed in parallel")
    impact: Impact | None = Field(None, description="What-if of the whole group (not a sum)")
    title: str = ""
    summary: str = ""


class Recommendation(_Open):
    id: str = Field(description="Stable id: the same bottleneck gets the same id across runs")
    rank: int
    kind: str = Field(description="The detector that found it", json_schema_extra=_kind_enum)
    category: str = Field(description="parallelization or fault_tolerance")
    service: str = Field(description="Where the change is made")
    operation: str
    targets: list[Target] = Field(default_factory=list)
    traces_affected: int
    occurrences: int
    impact: Impact
    confidence: float
    evidence: Evidence
    title: str
    summary: str
    actions: list[str]
    design: Design | None = None


class NearMiss(_Open):
    kind: str = Field(json_schema_extra=_kind_enum)
    service: str
    operation: str
    reason: str = Field(description="The rule or threshold and the measured value")
    traces: int = Field(description="Traces in which the candidate was seen")
    trace_ids: list[str] = Field(default_factory=list, description="Exemplar trace ids (at most 5)")
    span_ids: list[str] = Field(default_factory=list)


class ReportWindow(_Open):
    max_spans: int = Field(description="HOURGLASS_REPORT_MAX_SPANS: the most spans a report of serve covers")
    spans: int = Field(description="The spans of the traces this report covers")
    spans_left_out: int = Field(description="Stored spans of the window this report leaves out (its oldest)")
    traces_left_out: int | None = Field(
        None, description="Traces left out (null: a since window re-analysed whole, counted by spans only)"
    )
    from_: str | None = Field(
        None, alias="from", description="The earliest start of a covered trace's latest span (UTC)"
    )
    from_ns: int | None = None


class Report(_Open):
    schema_: str = Field("hourglass.report/v1", alias="schema")
    generated_at: str
    traces_analyzed: int
    spans_analyzed: int
    recommendations: list[Recommendation]
    near_misses: list[NearMiss] | None = Field(
        None, description="With explain=true: candidates seen and dropped, and why (absent otherwise)"
    )
    near_misses_omitted: int | None = Field(None, description="With explain=true: near misses beyond the cap")
    workstreams: list[Workstream] = Field(default_factory=list)
    window: ReportWindow | None = Field(
        None,
        description="Present when serve cut the report's window to its newest traces "
        "(HOURGLASS_REPORT_MAX_SPANS): what it covers and what it left out",
    )


class TraceSpan(_Open):
    span_id: str
    parent_span_id: str | None
    service: str
    name: str
    kind: str = Field(description="internal, server, client, producer, consumer or unspecified")
    start_ns: int = Field(description="Start as stored (before repair), unix ns")
    end_ns: int = Field(
        description="End as stored (before repair; a negative duration reads as zero), unix ns"
    )
    clock_skew_ns: int = Field(
        0, description="Shift the clock-skew repair applied: the repaired start is start_ns + clock_skew_ns"
    )
    start_offset_ms: float = Field(
        description="Repaired start relative to the trace's repaired start, ms (as the report page draws it)"
    )
    duration_ms: float = Field(description="Repaired duration, ms")
    status_code: int = Field(description="0 unset, 1 ok, 2 error")
    status_message: str | None = None
    on_critical_path: bool
    critical_ms: float = Field(0.0, description="Its own time on the critical path, ms (0 off the path)")


class FindingRef(_Open):
    id: str
    rank: int | None = None
    kind: str | None = None
    category: str | None = None
    title: str | None = None
    span_ids: list[str] = Field(
        default_factory=list,
        description="This trace's spans the finding involves (hourglass.analysis.trace_index)",
    )
    bottleneck_span_ids: list[str] = Field(
        default_factory=list,
        description="This trace's spans the change acts on (else its evidence spans here): what the report page marks",
    )


class TraceDetail(_Open):
    trace_id: str
    span_count: int
    duration_ms: float = Field(
        description="Repaired: from the first repaired start to the last repaired end, ms"
    )
    services: list[str]
    critical_path: list[str] = Field(description="Span ids on the critical path, root first")
    analysis_error: str | None = Field(
        None, description="Why the critical path could not be computed (the spans are still shown)"
    )
    findings: list[FindingRef] = Field(
        description="Recommendations of the current report touching this trace"
    )
    spans: list[TraceSpan] = Field(
        description="The repaired spans (clock skew corrected, duplicates dropped, shared client/server spans "
        "split) in repaired start order"
    )


class RecommendationDetail(Recommendation):
    exemplars: list[TraceDetail] = Field(description="Exemplar traces still in the store")


class ServiceInfo(BaseModel):
    name: str
    recommendations: int = Field(description="Recommendations of the current report made in or targeting it")


class Services(BaseModel):
    services: list[ServiceInfo]


class AnalysisStatus(_Open):
    state: Literal["pending", "running", "ready", "failed"]
    generation: int
    runs: int
    failures: int
    running_since: str | None
    last_started_at: str | None
    last_finished_at: str | None
    last_duration_ms: float | None
    last_reason: str | None
    restored: bool = Field(
        False,
        description="The report served is the one the last serve of this store kept, until this "
        "process's first analysis replaces it (last_reason 'restored')",
    )
    spans_at_last_run: int | None
    last_error: str | None
    last_error_at: str | None
    settle_seconds: float
    max_staleness_seconds: float


class Stats(_Open):
    spans: int
    traces: int
    analysis: AnalysisStatus
    server_memory: dict[str, Any] | None = None


class AnalysisRun(_Open):
    status: Literal["completed", "accepted", "failed"]
    generation: int
    generated_at: str | None = None
    traces_analyzed: int | None = None
    spans_analyzed: int | None = None
    recommendations: int | None = None
    duration_ms: float | None = None
    error: str | None = None
    analysis: AnalysisStatus


# -- what-if and an endpoint's critical path (issue 14) -------------------------------------------


class WhatIfRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    changes: list[dict[str, Any]] = Field(
        description='Changes applied together, each one of {"recommendation": ID}, '
        '{"speedup": {"service", "operation", "factor"}} (that operation takes factor × its own time; '
        '0.5 = twice as fast, 0 = no own time, children keep theirs; operation "*" = the whole service), '
        '{"parallelize": {"service", '
        '"operation"}} (that caller\'s blocking children run concurrently) or {"cap": {"service", '
        '"operation", "concurrency"}} (they run at most K at a time)'
    )
    service: str | None = Field(None, description="Only traces whose root span is in this service")
    operation: str | None = Field(None, description="Only traces whose root span has this name")
    since: str | None = Field(None, description="Only traces since then: 15m, 12h, 7d or an ISO 8601 time")


class WhatIfEndpoint(_Open):
    service: str
    operation: str
    traces: int
    saved_ms_total: float
    before_ms_p50: float
    after_ms_p50: float
    before_ms_p95: float
    after_ms_p95: float


class WhatIfResult(_Open):
    traces: int = Field(description="Traces the changes were applied to (after the root filters)")
    traces_changed: int = Field(description="Of those, traces whose root duration changed")
    saved_ms_total: float = Field(
        description="Root latency saved over all those traces, ms (negative: slower)"
    )
    endpoints: list[WhatIfEndpoint] = Field(
        description="Per trace root (service, operation), most saved first"
    )
    changes: list[dict[str, Any]] = Field(
        description="The changes, each with the spans and traces it touched"
    )


class PathOperation(_Open):
    service: str
    operation: str
    traces: int = Field(description="Traces where it is on the critical path")
    ms_p50: float = Field(description="Its self time on the path per such trace, median, ms")
    ms_p95: float
    ms_total: float
    share: float = Field(
        description="Its share of the endpoint's time on the critical path (the shares sum to 1)"
    )


class PathVariant(_Open):
    steps: list[str] = Field(description="service:operation along the path in time order (repeats folded)")
    traces: int
    share_of_traces: float
    root_ms_p50: float | None


class IcicleNode(_Open):
    id: int
    parent: int | None
    service: str
    operation: str
    depth: int
    ms: float = Field(description="Time on the path including descendants, per trace on average")
    self_ms: float


class EndpointCriticalPath(_Open):
    service: str
    operation: str
    traces: int
    root_ms_p50: float | None
    root_ms_p95: float | None
    operations: list[PathOperation]
    paths: list[PathVariant]
    icicle: list[IcicleNode] = Field(default_factory=list)
