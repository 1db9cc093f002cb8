"""Detector registry: one module per bottleneck kind, each exporting ``detect(ctx) -> list[Finding]``.

Contract::

    Detector = Callable[[AnalysisContext], list[Finding]]
    DETECTORS: dict[str, Detector]   # kind -> detect function

A detector reads :class:`hourglass.analysis.context.AnalysisContext` (repaired spans with critical-path columns),
aggregates across traces by a stable signature (one bottleneck in 10,000 traces is one Finding with
10,000 occurrences) and attaches per-trace interventions (``hourglass.analysis.model``) so the what-if engine can
measure the saving at the root. Its module docstring states its rule, thresholds and why.

Keep ``DETECTORS`` a plain dict literal with one import per detector module. A detector module
imports no other detector: what detectors share is in ``_common.py``.

Split detectors (issue 11, :mod:`hourglass.analysis.partitions`) also export ``extract(ctx) -> Rows`` — the
per-trace half, small tables from a set of whole traces — and ``decide(rows, notes) ->
list[Finding]`` — the cross-trace half on those tables alone, for any number of partitions — with
``detect(ctx) == decide(extract(ctx), ctx)``. ``PARTS`` lists them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import (
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
from hourglass.analysis.detectors._common import NearMissSink, Rows
from hourglass.analysis.model import Finding

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


@dataclass(frozen=True)
class DetectorParts:
    extract: Callable[[AnalysisContext], Rows]
    decide: Callable[[Rows, NearMissSink], list[Finding]]
    # the rows as the decision holds them, made per partition or stored piece before they are
    # combined (``partitions.combine``): what a decision keeps of every row smaller; ``decide``
    # takes rows compacted or not
    compact: Callable[[Rows], Rows] | None = None


PARTS: dict[str, DetectorParts] = {
    "fanout_straggler": DetectorParts(
        fanout_straggler.extract, fanout_straggler.decide, fanout_straggler.compact
    ),
    "fanout_concurrency_limit": DetectorParts(
        fanout_concurrency_limit.extract, fanout_concurrency_limit.decide, fanout_concurrency_limit.compact
    ),
    "lock_contention": DetectorParts(lock_contention.extract, lock_contention.decide),
    "retry_without_backoff": DetectorParts(retry_without_backoff.extract, retry_without_backoff.decide),
    "error_propagation": DetectorParts(error_propagation.extract, error_propagation.decide),
    "missing_timeout": DetectorParts(missing_timeout.extract, missing_timeout.decide),
    "batchable_calls": DetectorParts(batchable_calls.extract, batchable_calls.decide),
    "n_plus_one": DetectorParts(n_plus_one.extract, n_plus_one.decide, n_plus_one.compact),
    "serialized_calls": DetectorParts(serialized_calls.extract, serialized_calls.decide),
}

# The shape of each kind's extracted rows (a module's ``ROWS_FORMAT``, 1 when it has none). A
# detector whose ``extract`` output changes (a table or column added, removed or redefined) bumps
# it, so serve's stored rows of the older shape are extracted again, not decided on.
ROWS_FORMAT: dict[str, int] = {
    kind: int(getattr(sys.modules[parts.extract.__module__], "ROWS_FORMAT", 1))
    for kind, parts in PARTS.items()
}
