"""Numbers read from report fields, in a module of their own that imports nothing heavy: the
report's readers (``hourglass.analysis.diff``, ``hourglass.analysis.gate``) are imported by every
``hourglass`` command, and a run of ``analyze --db`` starts its workers before it imports polars."""

from __future__ import annotations

from typing import Any


def num(value: Any) -> float:
    """A number from a report field or a polars scalar (median, max, ...) as float; 0.0 for
    null, empty or anything that is not a number."""
    return float(value) if isinstance(value, int | float) else 0.0
