"""Report snapshots: one analysis result, immutable once published, with its JSON pre-serialised.

Each run of the background analysis (:mod:`hourglass.api.analysis_service`) produces a
:class:`ReportSnapshot`: the report object, the recommendations indexed by id, and each
recommendation pre-serialised to JSON, so a read filters in memory and joins bytes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hourglass.analysis.report import finite as _finite
from hourglass.analysis.trace_index import TraceIndex


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__} in a report")


def dumps(obj: Any) -> bytes:
    try:
        return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # NaN or infinity somewhere: null them
        return json.dumps(_finite(obj), default=_json_default, separators=(",", ":")).encode()


@dataclass(frozen=True)
class ReportSnapshot:
    """One analysis result, immutable once published; reads share it without locks."""

    report: dict[str, Any]
    generation: int
    spans_in_store: int
    started_at: float  # unix seconds
    finished_at: float
    started_monotonic: float
    reason: str
    change_marker: int = -1  # the store's change marker when the run started (see _change_marker)
    trace_index: TraceIndex = field(default_factory=TraceIndex)
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)
    rec_json: tuple[bytes, ...] = ()
    head_json: bytes = b"{"  # the report without its recommendations, without the closing brace
    # ``"near_misses":[...],"near_misses_omitted":N`` kept apart so that ``?explain=true`` answers
    # from the cached run while the plain report keeps its shape (b"" when the run kept none).
    near_misses_json: bytes = b""

    @classmethod
    def build(
        cls,
        report: dict[str, Any],
        *,
        generation: int,
        spans_in_store: int,
        started_at: float,
        started_monotonic: float,
        reason: str,
        change_marker: int = -1,
        trace_index: TraceIndex | None = None,
    ) -> ReportSnapshot:
        explain_keys = ("near_misses", "near_misses_omitted")
        near_misses_json = b""
        if "near_misses" in report:
            explained = {k: report[k] for k in explain_keys if k in report}
            near_misses_json = dumps(explained)[1:-1]
            report = {k: v for k, v in report.items() if k not in explain_keys}
        recs = list(report.get("recommendations") or [])
        head = {k: v for k, v in report.items() if k != "recommendations"}
        head_bytes = dumps(head)
        head_json = head_bytes[:-1] + (b"," if len(head_bytes) > 2 else b"")
        return cls(
            report=report,
            generation=generation,
            spans_in_store=spans_in_store,
            started_at=started_at,
            finished_at=time.time(),
            started_monotonic=started_monotonic,
            reason=reason,
            change_marker=change_marker,
            trace_index=trace_index if trace_index is not None else TraceIndex.from_report(report),
            by_id={str(r.get("id")): r for r in recs},
            rec_json=tuple(dumps(r) for r in recs),
            head_json=head_json,
            near_misses_json=near_misses_json,
        )

    @property
    def recommendations(self) -> list[dict[str, Any]]:
        return list(self.report.get("recommendations") or [])

    def body(self, indices: list[int] | None = None, *, explain: bool = False) -> bytes:
        """The report as JSON bytes, with only the recommendations at ``indices`` when given, and
        with ``near_misses`` / ``near_misses_omitted`` when ``explain`` (empty when the run kept none)."""
        chosen = self.rec_json if indices is None else [self.rec_json[i] for i in indices]
        body = self.head_json + b'"recommendations":[' + b",".join(chosen) + b"]"
        if explain:
            body += b"," + (self.near_misses_json or b'"near_misses":[],"near_misses_omitted":0')
        return body + b"}"

    def filter_indices(
        self,
        *,
        service: str | None = None,
        kind: list[str] | None = None,
        category: str | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """Recommendations (by position, rank order kept) matching every given filter.

        ``service`` matches where the change is made or any target service; ``kind`` is any of
        the given kinds; ``limit`` keeps the first N after filtering.
        """
        out: list[int] = []
        for i, rec in enumerate(self.recommendations):
            if service is not None and rec.get("service") != service:
                targets = rec.get("targets") or []
                if not any(t.get("service") == service for t in targets):
                    continue
            if kind and rec.get("kind") not in kind:
                continue
            if category is not None and rec.get("category") != category:
                continue
            out.append(i)
            if limit is not None and len(out) >= limit:
                break
        return out
