"""hourglass.api.queries.QueryEngine: one store context for a series of questions, rebuilt when the store changes,
freed when idle."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from hourglass.analysis.whatif_query import WhatIfInputError
from hourglass.api.queries import QueryEngine
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table


def table() -> pa.Table:
    b = TraceBuilder(service="front")
    root = b.span("GET /x", start_ms=0, dur_ms=100, kind=KIND_SERVER)
    b.span("A", parent=root, start_ms=10, dur_ms=40, service="a", kind=KIND_CLIENT)
    b.span("B", parent=root, start_ms=50, dur_ms=40, service="b", kind=KIND_CLIENT)
    return spans_table(b)


class CountingStore:
    """What QueryEngine reads: scan() (each call recorded with its since_ns) and the change marker."""

    def __init__(self) -> None:
        self.scans: list[int | None] = []
        self.changes = 1

    def scan(self, since_ns: int | None) -> pa.Table:
        self.scans.append(since_ns)
        return table()

    def change_marker(self) -> int:
        return self.changes


def test_one_scan_per_store_version_and_freed_when_idle() -> None:
    store = CountingStore()
    engine = QueryEngine(store.scan, store.change_marker, idle_seconds=60)
    body = {"changes": [{"parallelize": {"service": "front", "operation": "GET /x"}}]}
    assert engine.whatif(body)["saved_ms_total"] == pytest.approx(40.0)
    assert engine.critical_path("front", "GET /x")["traces"] == 1  # type: ignore[index]
    assert len(store.scans) == 1
    store.changes = 2  # the store changed
    engine.whatif(body)
    assert len(store.scans) == 2
    engine.whatif({**body, "since": "1h"})
    assert len(store.scans) == 3 and store.scans[-1] is not None
    engine._idle_seconds = 0.2
    engine.endpoints(since="1h")  # ready: the idle timer restarts
    deadline = time.monotonic() + 10
    while engine._cached is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine._cached is None  # freed after the idle time
    with pytest.raises(WhatIfInputError, match="unknown field"):
        engine.whatif({**body, "extra": 1})
    with pytest.raises(WhatIfInputError, match="since"):
        engine.whatif({**body, "since": "soon"})
    assert engine.critical_path("front", "GET /nope") is None


def test_under_continuous_ingest_a_recent_context_is_reused() -> None:
    store = CountingStore()
    engine = QueryEngine(store.scan, store.change_marker, reuse_seconds=60)
    body = {"changes": [{"speedup": {"service": "a", "operation": "A", "factor": 0.5}}]}
    engine.whatif(body)
    store.changes += 1  # spans keep arriving
    engine.whatif(body)
    assert len(store.scans) == 1
    engine.whatif({**body, "since": "1h"})  # another window: built
    assert len(store.scans) == 2
