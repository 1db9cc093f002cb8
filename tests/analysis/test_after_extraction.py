"""The stages of a partitioned run after its extraction (``hourglass.analysis.pipeline``'s
``_analyze_partitioned``): what they compute, and what they must not cost."""

from __future__ import annotations

import subprocess
import sys


def test_taking_the_prefetched_traces_apart_does_not_import_pandas() -> None:
    """The run reads the exemplar and service traces once, beside the pricing, and then takes
    the services' traces out of that read (``_traces_of``); a value set made with ``pa.array`` of
    a Python list imported pandas there (~0.2 s of the deciding process, between the scoring and
    the texts, on the run's critical path)."""
    code = (
        "import sys, polars as pl\n"
        "from hourglass.analysis.pipeline import _traces_of\n"
        "t = pl.DataFrame({'trace_id': ['b', 'a', 'b', 'c'], 'x': range(4)}).to_arrow()\n"
        "got = _traces_of(t, ['B', 'c'])\n"
        "assert got.column('trace_id').to_pylist() == ['b', 'b', 'c'], got\n"
        "assert got.column('x').to_pylist() == [0, 2, 3], got\n"
        "assert got.schema == t.schema, got.schema\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr
