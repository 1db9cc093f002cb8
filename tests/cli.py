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
