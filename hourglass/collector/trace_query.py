"""Trace search over a span store: the reads behind the Jaeger query API (``hourglass.api.jaeger_api``).

A store may answer these itself (``DuckDBSpanStore.search_trace_ids``, ``.operations``,
``.dependencies``: one SQL query each); any other ``SpanStore`` gets the generic versions here,
built on ``SpanStore.scan`` with the time and service filters pushed down to the store.

Search semantics are Jaeger's: a trace matches when ONE of its spans matches every criterion —
service, operation (span name), span start within ``[start_ns, end_ns]``, span duration within
``[min_duration_ns, max_duration_ns]`` and every tag. A tag matches a span attribute, a resource
(process) attribute or an event (log) attribute whose value, as text, equals the asked value
(booleans as ``true``/``false``), or one of the fields Jaeger shows as tags: ``error`` (status
ERROR), ``span.kind``, ``otel.status_code``, ``otel.status_description``. Traces come newest first.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hourglass.collector.schema import KIND_NAMES, STATUS_ERROR, STATUS_OK, STATUS_UNSET
from hourglass.collector.span_details import TypedValue, span_details
from hourglass.collector.store import SpanStore

__all__ = [
    "KIND_NUMBERS",
    "PSEUDO_TAGS",
    "TAG_CHECK_COLUMNS",
    "TraceQuery",
    "dependencies",
    "operations",
    "search_trace_ids",
    "span_matches_tags",
    "tag_text",
]

KIND_NUMBERS = {name: number for number, name in KIND_NAMES.items()}
STATUS_NAMES = {STATUS_UNSET: "UNSET", STATUS_OK: "OK", STATUS_ERROR: "ERROR"}
# Tags answered from columns, not from the raw span.
PSEUDO_TAGS = frozenset({"error", "span.kind", "otel.status_code", "otel.status_description"})
# Columns the tag check reads for each candidate span.
TAG_CHECK_COLUMNS = ("trace_id", "kind", "status_code", "status_message", "raw", "resource_json")


@dataclass(frozen=True)
class TraceQuery:
    service: str | None = None
    operation: str | None = None
    span_kind: int | None = None
    start_ns: int | None = None  # span start >= start_ns
    end_ns: int | None = None  # span start <= end_ns
    min_duration_ns: int | None = None
    max_duration_ns: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    limit: int = 100

    @property
    def raw_tags(self) -> dict[str, str]:
        """Tags that need the raw span (or resource) to check."""
        return {k: v for k, v in self.tags.items() if k not in PSEUDO_TAGS}


def tag_text(value: TypedValue | Any) -> str:
    """The text a tag value is compared as (Jaeger compares tag values as strings)."""
    if isinstance(value, tuple) and len(value) == 2:
        value = value[1]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _pseudo_tag_matches(
    key: str, wanted: str, kind: int, status_code: int, status_message: str | None
) -> bool:
    if key == "error":
        return (status_code == STATUS_ERROR) == (wanted.lower() == "true")
    if key == "span.kind":
        return KIND_NAMES.get(kind, "unspecified") == wanted.lower()
    if key == "otel.status_code":
        return STATUS_NAMES.get(status_code, "") == wanted.upper()
    return (status_message or "") == wanted  # otel.status_description


def span_matches_tags(
    tags: dict[str, str],
    *,
    kind: int,
    status_code: int,
    status_message: str | None,
    raw: bytes | None,
    resource_attributes: dict[str, Any],
) -> bool:
    """Whether one span carries every tag (see the module doc)."""
    raw_wanted = {}
    for key, wanted in tags.items():
        if key in PSEUDO_TAGS:
            if not _pseudo_tag_matches(key, wanted, kind, status_code, status_message):
                return False
        else:
            raw_wanted[key] = wanted
    if not raw_wanted:
        return True
    details = span_details(raw)
    found: dict[str, list[str]] = {}
    for key, value in details.attributes:
        found.setdefault(key, []).append(tag_text(value))
    for _, _, attributes in details.events:
        for key, value in attributes:
            found.setdefault(key, []).append(tag_text(value))
    for key, wanted in raw_wanted.items():
        if wanted in found.get(key, ()):
            continue
        if key in resource_attributes and tag_text(resource_attributes[key]) == wanted:
            continue
        return False
    return True


class _ResourceCache:
    """``resource_json`` text → its attributes, parsed once per distinct resource."""

    def __init__(self) -> None:
        self._parsed: dict[str | None, dict[str, Any]] = {}

    def __call__(self, text: str | None) -> dict[str, Any]:
        parsed = self._parsed.get(text)
        if parsed is None:
            try:
                value = json.loads(text) if text else {}
            except ValueError:
                value = {}
            parsed = value if isinstance(value, dict) else {}
            if len(self._parsed) < 10_000:
                self._parsed[text] = parsed
        return parsed


def tag_checked_trace_ids(
    batches: Iterable[pa.RecordBatch | pa.Table], tags: dict[str, str], limit: int
) -> list[str]:
    """Trace ids, in the order met, of the first spans that carry every tag, until ``limit``
    distinct traces (batches hold ``TAG_CHECK_COLUMNS``)."""
    resources = _ResourceCache()
    out: list[str] = []
    seen: set[str] = set()
    for batch in batches:
        columns = {name: batch.column(name).to_pylist() for name in TAG_CHECK_COLUMNS}
        for i, trace_id in enumerate(columns["trace_id"]):
            if trace_id in seen:
                continue
            if span_matches_tags(
                tags,
                kind=columns["kind"][i],
                status_code=columns["status_code"][i],
                status_message=columns["status_message"][i],
                raw=columns["raw"][i],
                resource_attributes=resources(columns["resource_json"][i]),
            ):
                seen.add(trace_id)
                out.append(trace_id)
                if len(out) >= limit:
                    return out
    return out


# -- generic versions over SpanStore.scan ---------------------------------------------------------


def _span_mask(table: pa.Table, query: TraceQuery) -> pa.ChunkedArray | pa.Array:
    mask = pc.is_valid(table.column("trace_id"))
    if query.service is not None:
        mask = pc.and_(mask, pc.equal(table.column("service"), query.service))
    if query.operation is not None:
        mask = pc.and_(mask, pc.equal(table.column("name"), query.operation))
    if query.span_kind is not None:
        mask = pc.and_(mask, pc.equal(table.column("kind"), query.span_kind))
    start = table.column("start_ns")
    if query.start_ns is not None:
        mask = pc.and_(mask, pc.greater_equal(start, query.start_ns))
    if query.end_ns is not None:
        mask = pc.and_(mask, pc.less_equal(start, query.end_ns))
    duration = pc.subtract(table.column("end_ns"), start)
    if query.min_duration_ns is not None:
        mask = pc.and_(mask, pc.greater_equal(duration, query.min_duration_ns))
    if query.max_duration_ns is not None:
        mask = pc.and_(mask, pc.less_equal(duration, query.max_duration_ns))
    return mask


def search_trace_ids(store: SpanStore, query: TraceQuery) -> list[str]:
    """Ids of up to ``query.limit`` matching traces, newest first."""
    own = getattr(store, "search_trace_ids", None)
    if callable(own):
        return list(own(query))
    columns: tuple[str, ...] = (
        "trace_id",
        "service",
        "name",
        "kind",
        "start_ns",
        "end_ns",
        "status_code",
        "status_message",
    )
    if query.raw_tags:
        columns += ("raw", "resource_json")
    table = store.scan(
        since_ns=query.start_ns,
        until_ns=None if query.end_ns is None else query.end_ns + 1,
        services=None if query.service is None else [query.service],
        columns=columns,
    )
    matching = table.filter(_span_mask(table, query))
    order = pc.sort_indices(matching, sort_keys=[("start_ns", "descending"), ("trace_id", "ascending")])
    matching = matching.take(order)
    if not query.tags:
        ids: list[str] = []
        seen: set[str] = set()
        for trace_id in matching.column("trace_id").to_pylist():
            if trace_id not in seen:
                seen.add(trace_id)
                ids.append(trace_id)
                if len(ids) >= query.limit:
                    break
        return ids
    if not query.raw_tags:
        matching = matching.append_column("raw", pa.nulls(matching.num_rows, pa.binary()))
        matching = matching.append_column("resource_json", pa.nulls(matching.num_rows, pa.string()))
    return tag_checked_trace_ids([matching], query.tags, query.limit)


def operations(store: SpanStore, service: str, span_kind: int | None = None) -> list[tuple[str, int]]:
    """(span name, kind) pairs seen in one service, sorted."""
    own = getattr(store, "operations", None)
    if callable(own):
        return list(own(service, span_kind))
    table = store.scan(services=[service], columns=("service", "name", "kind"))
    mask = pc.equal(table.column("service"), service)
    if span_kind is not None:
        mask = pc.and_(mask, pc.equal(table.column("kind"), span_kind))
    pairs = table.filter(mask).select(["name", "kind"]).group_by(["name", "kind"]).aggregate([])
    return sorted(zip(pairs.column("name").to_pylist(), pairs.column("kind").to_pylist(), strict=True))


def dependencies(store: SpanStore, since_ns: int | None, until_ns: int | None) -> list[tuple[str, str, int]]:
    """(parent service, child service, calls) for spans whose parent is in another service, among
    spans starting in ``[since_ns, until_ns)``."""
    own = getattr(store, "dependencies", None)
    if callable(own):
        return list(own(since_ns, until_ns))
    table = store.scan(
        since_ns=since_ns,
        until_ns=until_ns,
        columns=("trace_id", "span_id", "parent_span_id", "service", "start_ns"),
    )
    in_window = pc.is_valid(table.column("parent_span_id"))
    if since_ns is not None:
        in_window = pc.and_(in_window, pc.greater_equal(table.column("start_ns"), since_ns))
    if until_ns is not None:
        in_window = pc.and_(in_window, pc.less(table.column("start_ns"), until_ns))
    children = (
        table.filter(in_window)
        .select(["trace_id", "span_id", "parent_span_id", "service"])
        .rename_columns(["trace_id", "child_span_id", "span_id", "child_service"])
    )
    parents = table.select(["trace_id", "span_id", "service"])

    joined = children.join(parents, keys=["trace_id", "span_id"], join_type="inner")
    joined = joined.filter(pc.not_equal(joined.column("service"), joined.column("child_service")))
    counts = joined.group_by(["service", "child_service"]).aggregate([("child_span_id", "count")])
    return sorted(
        zip(
            counts.column("service").to_pylist(),
            counts.column("child_service").to_pylist(),
            counts.column("child_span_id_count").to_pylist(),
            strict=True,
        )
    )
