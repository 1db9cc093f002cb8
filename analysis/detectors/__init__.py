"""Detector registry: one module per bottleneck kind, each exporting ``detect(ctx) -> list[Finding]``.

Contract::

    Detector = Callable[[AnalysisContext], list[Finding]]
    DETECTORS: dict[str, Detector]   # kind -> detect function

A detector reads :class:`analysis.context.AnalysisContext` (repaired spans with critical-path columns),
aggregates across traces by a stable signature (one bottleneck in 10,000 traces is one Finding with
10,000 occurrences) and attaches per-trace interventions (``analysis.model``) so the what-if engine can
measure the saving at the root. Its module docstring states its rule, thresholds and why.

Keep ``DETECTORS`` a plain dict literal with one import per detector module.
"""

from __future__ import annotations

from collections.abc import Callable

from analysis.context import AnalysisContext
from analysis.detectors import (
    batchable_calls,
    error_propagation,
    fanout_concurrency_limit,
    fanout_straggler,
    lock_contention,
    missing_timeout,
    n_plus_one,
    retry_without_backoff,
    serialized_calls,
)
from analysis.model import Finding

Detector = Callable[[AnalysisContext], list[Finding]]

DETECTORS: dict[str, Detector] = {
    "serialized_calls": serialized_calls.detect,
    "n_plus_one": n_plus_one.detect,
    "batchable_calls": batchable_calls.detect,
    "fanout_straggler": fanout_straggler.detect,
    "fanout_concurrency_limit": fanout_concurrency_limit.detect,
    "lock_contention": lock_contention.detect,
    "retry_without_backoff": retry_without_backoff.detect,
    "error_propagation": error_propagation.detect,
    "missing_timeout": missing_timeout.detect,
}
