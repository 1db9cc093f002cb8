"""``GET /metrics``: Hourglass's own telemetry in the Prometheus text format (``prometheus-client``).

Nothing here runs per span. Each scrape reads counters that are already kept — the receivers'
per-Export counts (``hourglass.collector.ingest.ExportCounters``), the group-commit pipeline's stats, the
store's (cached) counts and file sizes, and the counts this module accumulates once per analysis
run (``AnalysisService.run_listeners``) — through a custom collector on a registry of its own
(one per app, not prometheus-client's global default, so several apps in one process, as in
the tests, never collide).

Metrics (``protocol`` is ``grpc`` or ``http``):

* ``hourglass_export_requests_total{protocol,outcome}`` — Exports answered: ``ok``, ``invalid``,
  ``unauthenticated``, ``overloaded``, ``unavailable``, ``too_large``, ``unsupported``, ``error``.
* ``hourglass_export_duration_seconds{protocol}`` — histogram: request in to answer out (an
  acknowledged Export includes its group commit).
* ``hourglass_spans_received_total{protocol}`` — spans decoded from Exports.
* ``hourglass_spans_refused_total{protocol,reason}`` — ``invalid`` (bad ids: the rest of the Export
  is kept), ``overloaded`` / ``shutting_down`` (refused after decoding; the exporter retries),
  ``not_committed`` (the store failed; the exporter retries). Exports refused before decoding
  (busy, too large, wrong token) have no span count: see ``hourglass_export_requests_total``.
* ``hourglass_spans_stored_total{protocol}`` — spans committed and acknowledged.
* ``hourglass_ingest_commits_total``, ``hourglass_ingest_pending_spans``,
  ``hourglass_ingest_pending_bytes``, ``hourglass_ingest_refused_overloaded_total`` — the pipeline.
* ``hourglass_store_spans``, ``hourglass_store_traces`` (unique; recounted at most every 20x the
  last count's duration), ``hourglass_store_bytes`` (files on disk: database, WAL, ingest log).
* ``hourglass_analysis_runs_total{outcome}``, ``hourglass_analysis_duration_seconds`` (histogram),
  ``hourglass_analysis_last_success_timestamp_seconds``, ``hourglass_analysis_spans`` (analysed by
  the last run).
* ``hourglass_recommendations{kind,category}`` — in the current report.
* ``hourglass_llm_requests_total{model}``, ``hourglass_llm_tokens_total{model,type}``
  (``input``, ``output``, ``cache_creation_input``, ``cache_read_input``),
  ``hourglass_llm_failures_total{model}`` (runs where the agent failed and the template wrote) —
  the write-up agent.

The route needs the API token when one is set, unless ``--metrics-public`` /
``HOURGLASS_METRICS_PUBLIC=1`` (a Prometheus on the same network then scrapes it without one).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from hourglass.collector.ingest import EXPORT_SECONDS_BUCKETS, IngestPipeline
from hourglass.collector.store import SpanStore

__all__ = ["CONTENT_TYPE", "AnalysisMetrics", "HourglassCollector", "metrics_registry", "store_bytes"]

log = logging.getLogger("hourglass.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECOUNT_SPACING = 20  # see HourglassCollector._store_stats
ANALYSIS_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _bucket_pairs(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts → prometheus-client's cumulative ``(le, count)`` pairs."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*bounds, float("inf")), counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(running)))
    return out


class AnalysisMetrics:
    """Counts accumulated once per analysis run (an ``AnalysisService`` run listener)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs: dict[str, int] = {}
        self.buckets = [0] * (len(ANALYSIS_SECONDS_BUCKETS) + 1)
        self.seconds_sum = 0.0
        self.last_success: float | None = None
        self.llm_requests: dict[str, int] = {}
        self.llm_tokens: dict[tuple[str, str], int] = {}
        self.llm_failures: dict[str, int] = {}

    def __call__(self, outcome: str, seconds: float, snapshot: Any) -> None:
        with self._lock:
            self.runs[outcome] = self.runs.get(outcome, 0) + 1
            self.buckets[bisect.bisect_left(ANALYSIS_SECONDS_BUCKETS, seconds)] += 1
            self.seconds_sum += seconds
            if outcome == "ok":
                self.last_success = time.time()
            report = getattr(snapshot, "report", None)
            if isinstance(report, dict):
                self._count_llm(report.get("writer") or {})

    def _count_llm(self, writer: dict[str, Any]) -> None:
        metadata = writer.get("metadata") or {}
        failed = isinstance(metadata.get("agent"), dict)  # the agent failed: the template wrote
        run = metadata.get("agent") if failed else metadata
        if not isinstance(run, dict) or "model" not in run:
            return
        model = str(run["model"])
        self.llm_requests[model] = self.llm_requests.get(model, 0) + int(run.get("requests") or 0)
        for name, value in (run.get("usage") or {}).items():
            if isinstance(value, int):
                key = (model, name.removesuffix("_tokens"))
                self.llm_tokens[key] = self.llm_tokens.get(key, 0) + value
        if failed or "the agent failed" in str(writer.get("fallback_reason") or ""):
            self.llm_failures[model] = self.llm_failures.get(model, 0) + 1


def store_bytes(store: SpanStore) -> int | None:
    """Bytes the store holds on disk (its file, WAL and ingest log); None for an in-memory store."""
    own = getattr(store, "size_bytes", None)
    if callable(own):
        return int(own())
    path = getattr(store, "path", None)
    if not isinstance(path, str) or path == ":memory:":
        return None
    total = 0
    for candidate in (Path(path), Path(f"{path}.wal")):
        if candidate.is_file():
            total += candidate.stat().st_size
    log_directory = Path(f"{path}.ingest-log")
    if log_directory.is_dir():
        total += sum(p.stat().st_size for p in log_directory.iterdir() if p.is_file())
    return total


class HourglassCollector(Collector):
    """Reads the counters at scrape time (see the module doc)."""

    def __init__(
        self,
        store: SpanStore,
        *,
        analysis: Any = None,
        analysis_metrics: AnalysisMetrics | None = None,
        ingest: IngestPipeline | None = None,
    ) -> None:
        self.store = store
        self.analysis = analysis
        self.analysis_metrics = analysis_metrics
        self.ingest = ingest
        self._stats: tuple[float, float, Any] | None = None  # (when, seconds it took, StoreStats)

    def collect(self) -> Iterator[Metric]:
        if self.ingest is not None:
            yield from self._ingest_metrics(self.ingest)
        yield from self._store_metrics()
        if self.analysis_metrics is not None:
            yield from self._analysis_metrics(self.analysis_metrics)
        yield from self._report_metrics()

    def _ingest_metrics(self, pipeline: IngestPipeline) -> Iterator[Metric]:
        counts = pipeline.exports.snapshot()
        counters = (
            (
                "hourglass_export_requests",
                "OTLP Exports answered, by protocol and outcome",
                "requests",
                "outcome",
            ),
            ("hourglass_spans_received", "Spans decoded from OTLP Exports", "spans_received", None),
            (
                "hourglass_spans_refused",
                "Spans not stored, by protocol and reason",
                "spans_refused",
                "reason",
            ),
            ("hourglass_spans_stored", "Spans committed to the store and acknowledged", "spans_stored", None),
        )
        for name, documentation, key, second_label in counters:
            # counted by protocol, or by (protocol, second label)
            labels = ["protocol"] if second_label is None else ["protocol", second_label]
            family = CounterMetricFamily(name, documentation, labels=labels)
            for label_values, n in sorted(counts[key].items()):
                family.add_metric(list(label_values) if second_label else [label_values], n)
            yield family
        latency = HistogramMetricFamily(
            "hourglass_export_duration_seconds",
            "Time from an OTLP Export's arrival to its answer (an acknowledgement waits for the commit)",
            labels=["protocol"],
        )
        for protocol, (buckets, total) in sorted(counts["latency"].items()):
            latency.add_metric([protocol], _bucket_pairs(EXPORT_SECONDS_BUCKETS, buckets), total)
        yield latency
        s = pipeline.stats
        yield CounterMetricFamily(
            "hourglass_ingest_commits", "Group commits written to the store", value=s.committed_batches
        )
        yield CounterMetricFamily(
            "hourglass_ingest_refused_overloaded",
            "Exports refused for overload (admission caps, busy receivers)",
            value=s.rejected_overloaded,
        )
        yield GaugeMetricFamily(
            "hourglass_ingest_pending_spans",
            "Spans accepted and waiting for their commit",
            value=s.pending_spans,
        )
        yield GaugeMetricFamily(
            "hourglass_ingest_pending_bytes",
            "Bytes of decoded spans waiting for their commit",
            value=s.pending_bytes,
        )

    def _store_stats(self) -> Any:
        """The store's unique counts, recounted only when the last recount is at least
        ``RECOUNT_SPACING`` times its own duration ago: counting unique spans scans the table
        (~0.3 s at 1M spans), so a scrape every 15 s costs at most ~5 % of a core at any size."""
        now = time.monotonic()
        cached = self._stats
        if cached is not None and now - cached[0] < RECOUNT_SPACING * cached[1]:
            return cached[2]
        started = time.perf_counter()
        stats = self.store.stats()
        self._stats = (now, time.perf_counter() - started, stats)
        return stats

    def _store_metrics(self) -> Iterator[Metric]:
        try:
            stats = self._store_stats()
            size = store_bytes(self.store)
        except Exception:  # a scrape must not fail because the store is busy closing
            log.exception("store metrics failed")
            return
        yield GaugeMetricFamily("hourglass_store_spans", "Unique spans in the store", value=stats.spans)
        yield GaugeMetricFamily("hourglass_store_traces", "Traces in the store", value=stats.traces)
        if size is not None:
            yield GaugeMetricFamily(
                "hourglass_store_bytes", "Bytes of the store on disk (database, WAL, ingest log)", value=size
            )

    def _analysis_metrics(self, m: AnalysisMetrics) -> Iterator[Metric]:
        with m._lock:
            runs = dict(m.runs)
            buckets, total = list(m.buckets), m.seconds_sum
            last_success = m.last_success
            llm_requests, llm_tokens, llm_failures = (
                dict(m.llm_requests),
                dict(m.llm_tokens),
                dict(m.llm_failures),
            )
        family = CounterMetricFamily(
            "hourglass_analysis_runs", "Analysis runs, by outcome", labels=["outcome"]
        )
        for outcome in ("ok", "failed"):
            family.add_metric([outcome], runs.get(outcome, 0))
        yield family
        yield HistogramMetricFamily(
            "hourglass_analysis_duration_seconds",
            "Duration of whole-store analysis runs",
            buckets=_bucket_pairs(ANALYSIS_SECONDS_BUCKETS, buckets),
            sum_value=total,
        )
        if last_success is not None:
            yield GaugeMetricFamily(
                "hourglass_analysis_last_success_timestamp_seconds",
                "When the last successful analysis run finished (unix time)",
                value=last_success,
            )
        requests = CounterMetricFamily(
            "hourglass_llm_requests", "Messages API requests of the write-up agent", labels=["model"]
        )
        for model, n in sorted(llm_requests.items()):
            requests.add_metric([model], n)
        yield requests
        tokens = CounterMetricFamily(
            "hourglass_llm_tokens", "Tokens used by the write-up agent, by type", labels=["model", "type"]
        )
        for (model, kind), n in sorted(llm_tokens.items()):
            tokens.add_metric([model, kind], n)
        yield tokens
        failures = CounterMetricFamily(
            "hourglass_llm_failures",
            "Analysis runs where the write-up agent failed and the template writer took over",
            labels=["model"],
        )
        for model, n in sorted(llm_failures.items()):
            failures.add_metric([model], n)
        yield failures

    def _report_metrics(self) -> Iterator[Metric]:
        snapshot = getattr(self.analysis, "snapshot", None)
        if snapshot is None:
            return
        report = snapshot.report
        yield GaugeMetricFamily(
            "hourglass_analysis_spans",
            "Spans analysed by the last run",
            value=report.get("spans_analyzed") or 0,
        )
        window = report.get("window") or {}
        yield GaugeMetricFamily(
            "hourglass_analysis_spans_left_out",
            "Stored spans the current report leaves out (its window cut to HOURGLASS_REPORT_MAX_SPANS)",
            value=int(window.get("spans_left_out") or 0) if isinstance(window, dict) else 0,
        )
        counts: dict[tuple[str, str], int] = {}
        for rec in report.get("recommendations") or []:
            key = (str(rec.get("kind")), str(rec.get("category")))
            counts[key] = counts.get(key, 0) + 1
        family = GaugeMetricFamily(
            "hourglass_recommendations", "Recommendations in the current report", labels=["kind", "category"]
        )
        for (kind, category), n in sorted(counts.items()):
            family.add_metric([kind, category], n)
        yield family


def metrics_registry(
    store: SpanStore, *, analysis: Any = None, ingest: IngestPipeline | None = None
) -> CollectorRegistry:
    """A registry of its own for one app; attaches the analysis run listener."""
    analysis_metrics = None
    if analysis is not None and hasattr(analysis, "run_listeners"):
        analysis_metrics = AnalysisMetrics()
        analysis.run_listeners.append(analysis_metrics)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        HourglassCollector(store, analysis=analysis, analysis_metrics=analysis_metrics, ingest=ingest)
    )
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
