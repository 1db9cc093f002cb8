"""Hand-built traces for unit tests: rows of collector.schema.SPAN_SCHEMA without a decoder.

b = TraceBuilder(service="frontend")
root = b.span("GET /checkout", start_ms=0, dur_ms=300, kind=KIND_SERVER)
b.span("SELECT user", parent=root, start_ms=10, dur_ms=50, service="users-db", kind=KIND_CLIENT,
       db_system="sqlite", db_statement="SELECT * FROM users WHERE id = ?")
table = spans_table(b)            # or spans_table([b1, b2, ...])
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from hourglass.collector.schema import KIND_INTERNAL, KIND_SERVER, SPAN_SCHEMA, STATUS_UNSET

BASE_NS = 1_760_000_000_000_000_000  # an arbitrary epoch time in 2025
_trace_counter = itertools.count(1)
_span_counter = itertools.count(1)


class TraceBuilder:
    def __init__(
        self, service: str = "frontend", trace_id: str | None = None, base_ns: int = BASE_NS
    ) -> None:
        self.service = service
        self.trace_id = trace_id or f"{next(_trace_counter):032x}"
        self.base_ns = base_ns
        self.rows: list[dict[str, Any]] = []

    def span(
        self,
        name: str,
        *,
        start_ms: float,
        dur_ms: float,
        parent: str | None = None,
        service: str | None = None,
        kind: int = KIND_INTERNAL,
        status_code: int = STATUS_UNSET,
        span_id: str | None = None,
        events: Iterable[tuple[str, float, dict[str, Any]]] = (),
        hints: dict[str, Any] | None = None,
        links: Iterable[str] = (),
        follows_from: bool = False,
        **columns: Any,
    ) -> str:
        """Add a span; times in milliseconds from the builder's base; returns its span id."""
        sid = span_id or f"{next(_span_counter):016x}"
        start = self.base_ns + int(start_ms * 1_000_000)
        events = list(events)
        event_hints = [
            {"name": n, "time_ns": self.base_ns + int(t * 1_000_000), "attributes": a}
            for n, t, a in events
            if a
        ]
        row: dict[str, Any] = {name_: None for name_ in SPAN_SCHEMA.names}
        row.update(
            trace_id=self.trace_id,
            span_id=sid,
            parent_span_id=parent,
            service=service or self.service,
            name=name,
            kind=kind,
            start_ns=start,
            end_ns=start + int(dur_ms * 1_000_000),
            status_code=status_code,
            event_names=[n for n, _, _ in events],
            event_times_ns=[self.base_ns + int(t * 1_000_000) for _, t, _ in events],
            event_hints=json.dumps(event_hints) if event_hints else None,
            hints=json.dumps(hints) if hints else None,
            links=list(links),
            follows_from=follows_from,
            resource_json=json.dumps({"service.name": service or self.service}),
            raw=b"",
            ingested_ns=self.base_ns,
        )
        unknown = set(columns) - set(SPAN_SCHEMA.names)
        if unknown:
            raise TypeError(f"unknown span columns: {sorted(unknown)}")
        row.update(columns)
        self.rows.append(row)
        return sid


def spans_table(builders: TraceBuilder | Iterable[TraceBuilder]) -> pa.Table:
    if isinstance(builders, TraceBuilder):
        builders = [builders]
    rows = [row for b in builders for row in b.rows]
    return pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)


def spec(name: str, start_ms: float, dur_ms: float, **arguments: Any) -> dict[str, Any]:
    """One span for repeated_trace: TraceBuilder.span's arguments, plus "under" (see there)."""
    return {"name": name, "start_ms": start_ms, "dur_ms": dur_ms, **arguments}


def repeated_trace(copies: int, service: str, *spans: dict[str, Any]) -> list[TraceBuilder]:
    """`copies` traces alike, each built from the same spans (`spec`s), in order. A span is the child
    of the span before it (the first is the root), unless it gives its parent's span id (`parent=`)
    or the position of its parent in `spans` (`under=`)."""
    traces = []
    for _ in range(copies):
        b = TraceBuilder(service=service)
        ids: list[str] = []
        for s in spans:
            arguments = dict(s)
            under = arguments.pop("under", len(ids) - 1)
            if "parent" not in arguments:
                arguments["parent"] = ids[under] if ids else None
            ids.append(b.span(arguments.pop("name"), **arguments))
        traces.append(b)
    return traces


def deep_chain(depth: int, root_ms: float) -> tuple[TraceBuilder, str]:
    """One trace `depth` spans deep: s0, a server span `root_ms` long, then s1, s2, … each the only
    child of the one before, starting 1 ms after it and ending 1 ms before it. Returns the builder
    and the deepest span's id."""
    b = TraceBuilder()
    parent = b.span("s0", start_ms=0, dur_ms=root_ms, kind=KIND_SERVER)
    for i in range(1, depth):
        parent = b.span(f"s{i}", parent=parent, start_ms=i, dur_ms=root_ms - 2 * i)
    return b, parent


def with_a_span_under_every_root(frame: Any, service: str, name: str) -> Any:
    """``frame`` (span rows, a polars DataFrame) with one more span under each parentless span:
    ``service``/``name``, 1 µs long, 1 µs after its parent starts (an audit call every request
    makes: an operation of every trace, the root of none)."""
    import polars as pl

    roots = frame.filter(pl.col("parent_span_id").is_null())
    added = roots.with_columns(
        parent_span_id=pl.col("span_id"),
        span_id=pl.col("span_id").str.slice(0, 8) + pl.lit("a0d17a0d"),
        service=pl.lit(service),
        name=pl.lit(name),
        start_ns=pl.col("start_ns") + 1000,
        end_ns=pl.col("start_ns") + 2000,
    )
    return pl.concat([frame, added])
