"""The SQL of a DuckDB span store's windows: which span rows a read with filters takes.

Beside :mod:`hourglass.collector.duckdb_store`, which imports pyarrow: ``hourglass analyze``
counts the window it plans (:class:`hourglass.cli.analyze.EarlyWorkers`) before it starts its
worker processes, with DuckDB alone.
"""

from __future__ import annotations

from typing import Any

# What a plan reads of the window it analyses (``window_where``: "" for the whole store): its
# rows (``DuckDBSpanStore.window_rows``); the trace with the most rows and its row count
# (``largest_trace``); each trace's id hashed as the partitions take it (``scan_partition``,
# ``split_partitions``) and its rows: how many rows its largest partition of whole traces holds
# (``planning.loads_of``; ~0.03 s at 5M spans, 16 bytes a trace)
WINDOW_ROWS_SQL = "SELECT count(*) FROM spans{where}"
LARGEST_TRACE_SQL = "SELECT trace_id, count(*) FROM spans{where} GROUP BY trace_id ORDER BY 2 DESC, 1 LIMIT 1"
TRACE_SIZES_SQL = "SELECT hash(trace_id) AS h, count(*)::BIGINT AS n FROM spans{where} GROUP BY trace_id"
# The earliest ``since`` whose window holds at most ``?`` rows (NULL: none does, not even its
# newest trace's): a trace is in the window ``since`` when its last start — of its spans that
# match ``{match}``, a service filter — is at or after it, with every row it has. So the traces'
# rows summed newest last start first (ties together: the window's default frame takes a row's
# peers whole) are, at each last start, the rows of the window from that start.
NEWEST_WINDOW_SQL = (
    "SELECT min(last) FROM (SELECT last, sum(n) OVER (ORDER BY last DESC) AS held FROM ("
    "SELECT max(start_ns){match} AS last, count(*) AS n FROM spans GROUP BY trace_id"
    ") WHERE last IS NOT NULL) WHERE held <= ?"
)


def span_conditions(
    *,
    since_ns: int | None = None,
    until_ns: int | None = None,
    services: list[str] | None = None,
    trace_ids: list[str] | None = None,
    alias: str = "",
) -> tuple[list[str], list[Any]]:
    """The SQL conditions (and their parameters) of a span that matches every filter given;
    ``alias``: the spans' table alias in the query (``c`` for ``c.start_ns``)."""
    prefix = f"{alias}." if alias else ""
    conditions: list[str] = []
    params: list[Any] = []
    if since_ns is not None:
        conditions.append(f"{prefix}start_ns >= ?")
        params.append(since_ns)
    if until_ns is not None:
        conditions.append(f"{prefix}start_ns < ?")
        params.append(until_ns)
    if services is not None:
        conditions.append(f"list_contains(?, {prefix}service)")
        params.append(list(services))
    if trace_ids is not None:
        conditions.append(f"list_contains(?, {prefix}trace_id)")
        params.append([t.lower() for t in trace_ids])
    return conditions, params


def traces_with(conditions: list[str]) -> str:
    """The condition of a row of a trace with a span that matches every one of ``conditions``
    (:func:`span_conditions`'): the whole traces a filtered read takes. Their ids once each: the
    join DuckDB builds of the sub-select holds its rows, a span's id each without ``DISTINCT``
    (measured on a 10M-span store, a window of 5.8M: counting its rows peaked at 651 MiB in
    0.50 s against 185 MiB in 0.13 s; a read of four of its columns 835 MiB against 361)."""
    return f"trace_id IN (SELECT DISTINCT trace_id FROM spans WHERE {' AND '.join(conditions)})"


def newest_window(most: int, services: list[str] | None = None) -> tuple[str, list[Any]]:
    """``NEWEST_WINDOW_SQL`` and its parameters: the earliest ``since`` whose window (with the
    ``services`` filter, if any) holds at most ``most`` rows."""
    conditions, params = span_conditions(services=services)
    match = f" FILTER (WHERE {' AND '.join(conditions)})" if conditions else ""
    return NEWEST_WINDOW_SQL.format(match=match), [*params, int(most)]


def window_where(*, since_ns: int | None = None, services: list[str] | None = None) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause (with its leading space; "" without a filter) and the parameters of
    the span rows a ``scan`` with these filters reads: every row of each trace with a span that
    matches them all (for ``WINDOW_ROWS_SQL``, ``LARGEST_TRACE_SQL`` and ``TRACE_SIZES_SQL``)."""
    conditions, params = span_conditions(since_ns=since_ns, services=services)
    if not conditions:
        return "", []
    return f" WHERE {traces_with(conditions)}", params
