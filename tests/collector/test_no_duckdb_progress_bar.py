"""DuckDB's Python client draws a progress bar on stderr for any query that runs over two
seconds. Hourglass' connections turn it off: serve's log got one when a restart rebuilt the
incremental tally, and on a terminal it is drawn over the CLI's own progress bar.

Checked in a child process with real standard streams: under pytest's captured ones DuckDB
leaves the bar off by itself, so the check would pass whatever the code does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, sys, threading
import duckdb
from hourglass.analysis.detectors import _sweep
from hourglass.analysis.incremental import IncrementalAnalysis, sidecar_path
from hourglass.collector.duckdb_store import DuckDBSpanStore
from tests.builders import TraceBuilder, spans_table

def bar(con):
    return bool(con.execute("SELECT current_setting('enable_progress_bar')").fetchall()[0][0])

folder = sys.argv[1]
db = folder + "/spans.duckdb"
seen = {"plain": bar(duckdb.connect())}
store = DuckDBSpanStore(db)
trace = TraceBuilder()
trace.span("GET /", start_ms=0, dur_ms=5)
store.write(spans_table(trace))
seen["store"] = bar(store._cursor())
other = []  # a cursor of another thread (the API's, the loader's)
thread = threading.Thread(target=lambda: other.append(bar(store._cursor())))
thread.start(); thread.join(10)
seen["store, another thread"] = other[0]
assert store.reopen()
seen["store, reopened"] = bar(store._cursor())
store.close()
reader = DuckDBSpanStore(db, read_only=True)
seen["store, read-only"] = bar(reader._cursor())
reader.close()
state = IncrementalAnalysis(sidecar_path(db))
seen["incremental sidecar"] = bar(state.db)
state.close()
with _sweep.connection(__import__("pathlib").Path(folder)) as con:
    seen["sweep"] = bar(con)
print(json.dumps(seen))
"""


def test_hourglass_connections_draw_no_progress_bar(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen.pop("plain") is True  # DuckDB's default here: the check below can fail
    assert seen == dict.fromkeys(seen, False)
    assert len(seen) == 6
