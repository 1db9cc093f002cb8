"""The span count of an incremental round (``analysis_service._Counting``) runs after the round
has read its new spans, not ahead of them: the store runs one memory-heavy query at a time
(``DuckDBSpanStore.serialized``), and a count started with the round took it first, so the
round's first read waited for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hourglass.api.analysis_service import AnalysisService
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
from tests.builders import TraceBuilder, spans_table


def _trace() -> TraceBuilder:
    b = TraceBuilder(service="svc", base_ns=time.time_ns())
    root = b.span("GET /", start_ms=0, dur_ms=10, kind=KIND_SERVER)
    b.span("call", parent=root, start_ms=1, dur_ms=5, kind=KIND_CLIENT)
    return b


class _Recording(DuckDBSpanStore):
    """A store that notes its span counts and its reads of traces by id (a round's batches of new
    traces; the exemplars', within their ingest ranges), in order."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.events: list[str] = []
        self.events_lock = threading.Lock()

    def _note(self, event: str) -> None:
        with self.events_lock:
            self.events.append(event)

    def stats(self) -> Any:
        self._note("count")
        return super().stats()

    def stream_traces(self, *args: Any, **kwargs: Any) -> Any:
        self._note("exemplars" if kwargs.get("ingested_ranges") else "batch")
        return super().stream_traces(*args, **kwargs)

    def scan_traces(self, *args: Any, **kwargs: Any) -> Any:
        self._note("exemplars" if kwargs.get("ingested_ranges") else "batch")
        return super().scan_traces(*args, **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "worker"])
def test_the_rounds_span_count_runs_after_its_reads_of_new_spans(tmp_path: Path, isolate: bool) -> None:
    store = _Recording(str(tmp_path / "spans.duckdb"))
    service = AnalysisService(
        store,
        settle_seconds=0.0,
        isolate=isolate,
        writer="auto" if isolate else None,
        render_html=False,
    )
    try:
        store.write(spans_table([_trace() for _ in range(3)]))
        store.events.clear()
        snapshot = service.run_now("requested")
        assert snapshot.report["traces_analyzed"] == 3
        assert service.status()["spans_at_last_run"] == 6
        events = list(store.events)
        assert "batch" in events, events  # the round read its new traces' spans
        assert events.count("count") == 1, events
        # every read of the new spans came first (the exemplars' traces may be read after it)
        last_batch = max(i for i, event in enumerate(events) if event == "batch")
        assert events.index("count") > last_batch, events
    finally:
        service.stop()
        store.close()
