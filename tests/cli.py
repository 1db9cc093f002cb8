"""The real `hourglass` command as the tests run it: a separate process, bounded in time.

report = analyze_file(path)                     # hourglass analyze PATH --format json
path.write_text(json.dumps(otlp_json({"frontend": spans})))
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.builders import BASE_NS

HOURGLASS = Path(sys.executable).with_name("hourglass")


def analyze_file(path: Path, *, timeout: float = 180) -> dict[str, Any]:
    """`hourglass analyze PATH --format json` as a process; its report (the command must exit 0)."""
    proc = subprocess.run(
        [str(HOURGLASS), "analyze", str(path), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"hourglass analyze {path.name} exited {proc.returncode}:\n{proc.stderr}"
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def otlp_span(
    trace: int, span: int, name: str, kind: int, start_ms: float, end_ms: float, *, url: str | None = None
) -> dict[str, Any]:
    """Span `span` of trace `trace` as an OTLP/JSON span object: span 0 is the root, the others its
    children. Trace t starts t seconds after BASE_NS, its times in ms from there; `url` is url.full."""

    def ns(ms: float) -> str:
        return str(BASE_NS + trace * 10**9 + int(ms * 1e6))

    result: dict[str, Any] = {
        "traceId": f"{trace + 1:032x}",
        "spanId": f"{trace + 1:08x}{span:08x}",
        "name": name,
        "kind": kind,
        "startTimeUnixNano": ns(start_ms),
        "endTimeUnixNano": ns(end_ms),
    }
    if span:
        result["parentSpanId"] = f"{trace + 1:08x}{0:08x}"
    if url is not None:
        result["attributes"] = [{"key": "url.full", "value": {"stringValue": url}}]
    return result


def otlp_json(spans_by_service: Mapping[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """An OTLP/JSON export document: one resource per service, holding its OTLP/JSON span objects."""
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [{"scope": {"name": "test"}, "spans": spans}],
            }
            for service, spans in spans_by_service.items()
        ]
    }
