"""Check an ``hourglass.report/v1`` report against scenario labels; recall and precision.

A label ``{"kind", "service", "operation"}`` matches a recommendation of the same ``kind`` whose
``(service, operation)`` — or one of its ``targets`` — is the label's service and one of its
operations (``operation`` is a span name or a list of acceptable span names).

- **recall** = must_find labels matched / must_find labels.
- **precision** = recommendations matching a must_find label / recommendations matching any label
  (must_find or must_not_find). Recommendations matching no label (e.g. an ``error_propagation``
  on the flaky bank, which is true but not what the scenario is about) are listed as *unlabelled*
  and left out of precision, so a correct extra finding does not count as a false alarm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _operations(label: dict[str, Any]) -> set[str]:
    operation = label["operation"]
    return {operation} if isinstance(operation, str) else set(operation)


def label_matches(label: dict[str, Any], recommendation: dict[str, Any]) -> bool:
    if recommendation.get("kind") != label["kind"]:
        return False
    places = [(recommendation.get("service"), recommendation.get("operation"))]
    places += [(t.get("service"), t.get("operation")) for t in recommendation.get("targets") or []]
    operations = _operations(label)
    return any(service == label["service"] and operation in operations for service, operation in places)


def describe(recommendation: dict[str, Any]) -> str:
    impact = recommendation.get("impact") or {}
    return (
        f"{recommendation.get('kind')} at {recommendation.get('service')} / {recommendation.get('operation')}"
        f" (saved p50 {impact.get('saved_ms_p50')} ms, confidence {recommendation.get('confidence')})"
    )


@dataclass
class LabelCheck:
    name: str
    found: list[dict[str, Any]] = field(default_factory=list)
    missed: list[dict[str, Any]] = field(default_factory=list)
    true_positives: list[dict[str, Any]] = field(default_factory=list)  # recommendations
    false_alarms: list[dict[str, Any]] = field(default_factory=list)  # recommendations
    unlabelled: list[dict[str, Any]] = field(default_factory=list)  # recommendations

    @property
    def ok(self) -> bool:
        return not self.missed and not self.false_alarms

    def lines(self) -> list[str]:
        out = [
            f"{self.name}: found {len(self.found)}/{len(self.found) + len(self.missed)} labelled bottlenecks"
        ]
        out += [f"  MISSED {m['kind']} at {m['service']} / {m['operation']}" for m in self.missed]
        out += [f"  FALSE ALARM {describe(r)}" for r in self.false_alarms]
        out += [f"  unlabelled {describe(r)}" for r in self.unlabelled]
        return out


def check_report(name: str, labels: dict[str, Any], report: dict[str, Any]) -> LabelCheck:
    recommendations = report.get("recommendations") or []
    result = LabelCheck(name)
    for label in labels.get("must_find", []):
        (result.found if any(label_matches(label, r) for r in recommendations) else result.missed).append(
            label
        )
    for recommendation in recommendations:
        if any(label_matches(label, recommendation) for label in labels.get("must_find", [])):
            result.true_positives.append(recommendation)
        elif any(label_matches(label, recommendation) for label in labels.get("must_not_find", [])):
            result.false_alarms.append(recommendation)
        else:
            result.unlabelled.append(recommendation)
    return result


def merge_labels(label_sets: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"must_find": [], "must_not_find": []}
    for labels in label_sets:
        merged["must_find"] += labels.get("must_find", [])
        merged["must_not_find"] += labels.get("must_not_find", [])
    return merged


def load_labels(path: Path) -> dict[str, Any]:
    labels: dict[str, Any] = json.loads(path.read_text())
    return labels


@dataclass
class Scores:
    recall: float
    precision: float
    labelled: int
    found: int
    true_positives: int
    false_alarms: int
    unlabelled: int

    def line(self) -> str:
        return (
            f"recall {self.recall:.2f} ({self.found}/{self.labelled} labelled bottlenecks found), "
            f"precision {self.precision:.2f} ({self.true_positives} correct, {self.false_alarms} false alarms "
            f"on healthy handlers), {self.unlabelled} unlabelled recommendations"
        )


def scores(checks: Sequence[LabelCheck]) -> Scores:
    found = sum(len(c.found) for c in checks)
    labelled = found + sum(len(c.missed) for c in checks)
    tp = sum(len(c.true_positives) for c in checks)
    fp = sum(len(c.false_alarms) for c in checks)
    return Scores(
        recall=found / labelled if labelled else 1.0,
        precision=tp / (tp + fp) if tp + fp else 1.0,
        labelled=labelled,
        found=found,
        true_positives=tp,
        false_alarms=fp,
        unlabelled=sum(len(c.unlabelled) for c in checks),
    )
