"""Hourglass: find where distributed systems wait.

The packages, from the ground up (each imports only the ones below it; ``tests/test_layering.py``):

- ``hourglass.collector``: getting spans in and keeping them (OTLP receivers, trace-file readers,
  decoding, the DuckDB / ClickHouse span store).
- ``hourglass.analysis``: understanding them (trace frames, repair, critical path, the detectors,
  what-if savings, ranking, the write-up).
- ``hourglass.api``: what people and programs talk to (the REST API, report pages, MCP, ``serve``).
- ``hourglass.cli``: the ``hourglass`` command (also ``python -m hourglass``).

The names below are the public surface other code may import from ``hourglass`` itself; they are
pinned by ``tests/test_public_surface.py``. They load on first use, so ``import hourglass`` (and
every CLI start) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # the span store
    "open_store": "hourglass.collector.backends",
    "SpanStore": "hourglass.collector.store",
    "StoreError": "hourglass.collector.store",
    # trace files (OTLP JSON / protobuf, Jaeger, Zipkin)
    "read_trace_files": "hourglass.collector.files",
    # the analysis
    "analyze": "hourglass.analysis.pipeline",
    "analyze_partitioned": "hourglass.analysis.pipeline",
    # the app and its settings
    "create_app": "hourglass.api.app",
    "Settings": "hourglass.api.settings",
}

__all__ = [
    "Settings",
    "SpanStore",
    "StoreError",
    "__version__",
    "analyze",
    "analyze_partitioned",
    "create_app",
    "open_store",
    "read_trace_files",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and editors only
    from hourglass.analysis.pipeline import analyze, analyze_partitioned
    from hourglass.api.app import create_app
    from hourglass.api.settings import Settings
    from hourglass.collector.backends import open_store
    from hourglass.collector.files import read_trace_files
    from hourglass.collector.store import SpanStore, StoreError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hourglass' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
