"""Helpers shared by detectors: operation keys, statement/route normalisation, call children.

Normalisation (polars expressions, vectorised):

* SQL (:func:`normalized_sql`): quoted strings, numbers, hex blobs, booleans and NULL literals become
  ``?``; ``IN (?, ?, ?)`` lists collapse to ``IN (?)``; whitespace collapses. Two statements that
  differ only in literals — the N+1 signature — normalise to the same text, and the result carries
  no user data (safe to show and to send to the agent).
* Routes (:func:`normalized_route`): the ``http.route`` template when the instrumentation recorded
  one; otherwise the URL path without scheme, host and query, with UUIDs, numbers, long hex/base64-like
  ids and e-mail-like segments replaced by ``{id}``.

An operation key (:func:`operation_key`) is ``service`` + the first of: normalised statement,
``METHOD route``, rpc method, span name. Its label (:func:`operation_label`) is what a person reads.

Spans known only by name (no ``db.*``/``http.*`` attributes, e.g. exports without tags):

* a name that *is* a statement or a semantic-convention summary (``SELECT shop.orders``,
  ``SELECT * FROM t WHERE id = 7``; see ``STATEMENT_NAME``) is used as the statement: normalised
  like one, and its literals are the call's parameters;
* a call whose own name says nothing (``HTTP POST``, ``GET``; ``GENERIC_CALL_NAME``) is told apart
  by the span that answered it: :func:`annotate_operations` uses the callee's server-span name (``callee_name``, route-templated)
  as the detail, so ``HTTP POST`` to two services are two operations.
"""

from __future__ import annotations

from typing import Any, Protocol

import polars as pl

from hourglass.analysis.repair import STATEMENT_NAME
from hourglass.collector.schema import KIND_CLIENT, KIND_PRODUCER, KIND_SERVER

MAX_LABEL_CHARS = 160
# A call name that does not say what is called (the HTTP client's "HTTP POST", a bare "GET"):
# such calls are told apart by the server span that answered them.
GENERIC_CALL_NAME = (
    r"(?i)^\s*(?:https?\s+)?(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS)\s*$"
    r"|^(?i:https?[._ ]?(?:request|client|call)|grpc[._ ]?(?:client|call)|request|call|send)$"
)

# What a detector's per-trace extraction returns: small named tables (candidate occurrences,
# per-instance evidence, partial counts) that its cross-trace decision reads. The rows of several
# partitions of whole traces are concatenated table by table before the decision, so a table holds
# rows or partial aggregates that the decision re-aggregates — never a result final for one part.
Rows = dict[str, pl.DataFrame]


class NearMissSink(Protocol):
    """Where a decision records a candidate it dropped (``AnalysisContext`` is one)."""

    def note_near_miss(
        self,
        kind: str,
        service: str,
        operation: str,
        reason: str,
        trace_ids: list[str] | tuple[str, ...] = (),
        span_ids: list[str] | tuple[str, ...] = (),
        traces: int = 0,
    ) -> None: ...


# Collapse every whitespace run to one space. Written to match only the runs that change (two or
# more characters, or one that is not a plain space): ``\s+`` also "replaced" every single space,
# and on statements that made it the costliest step of normalisation (0.05 of 0.08 s at 1M spans).
WHITESPACE_RUN = r"\s{2,}|[^\S ]"
_SQL_LITERAL = (
    r"'(?:[^']|'')*'"  # single-quoted strings (with '' escapes)
    r"|\bx'[0-9a-fA-F]*'|\b0x[0-9a-fA-F]+\b"  # hex blobs
    r"|\b(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|[Nn][Uu][Ll][Ll])\b"
    r"|\$\d+|%s|@\w+"  # driver placeholders: $1, %s, @p
    r"|-?\b\d+(?:\.\d+)?(?:[eE][+-]?\d+)?\b"  # numbers
)
_SQL_REPLACEMENTS: tuple[tuple[str, str], ...] = (
    (_SQL_LITERAL, "?"),
    (r"([\s(=,]):[A-Za-z_]\w*", "$1?"),  # :name placeholders (not ::type casts)
    (WHITESPACE_RUN, " "),
    (r"(?i)\bIN\s*\(\s*\?(?:\s*,\s*\?)*\s*\)", "IN (?)"),
    (r"(?i)\bVALUES\s*(\(\s*\?(?:\s*,\s*\?)*\s*\))(?:\s*,\s*\(\s*\?(?:\s*,\s*\?)*\s*\))*", "VALUES $1"),
)
_URL_PREFIX = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*|[?#].*$"  # scheme://host[:port], query, fragment
# A path segment that is a value rather than part of the route: a number, a UUID, a long hex string,
# an e-mail address, or a long token of letters and digits (>= 8 characters with >= 2 digits).
_ID_SEGMENT = (
    r"^(?:-?\d+(?:\.\d+)?|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{12,}|[^@]+@[^@]+)$"
)
_TOKEN = r"^[A-Za-z0-9_~.-]{8,}$"


def _apply(expr: pl.Expr, replacements: tuple[tuple[str, str], ...]) -> pl.Expr:
    for pattern, repl in replacements:
        expr = expr.str.replace_all(pattern, repl)
    return expr


def normalized_sql(column: str = "db_statement") -> pl.Expr:
    return _apply(pl.col(column), _SQL_REPLACEMENTS).str.strip_chars()


def route_template(url: pl.Expr) -> pl.Expr:
    """URL -> path template: scheme, host, query and fragment dropped; value segments -> ``{id}``."""
    path = url.str.replace_all(_URL_PREFIX, "")
    segment = pl.element()
    is_value = segment.str.contains(_ID_SEGMENT) | (
        segment.str.contains(_TOKEN) & (segment.str.count_matches(r"\d") >= 2)
    )
    templated = (
        path.str.split("/")
        .list.eval(pl.when(is_value).then(pl.lit("{id}")).otherwise(segment))
        .list.join("/")
        .str.replace(r"/+$", "")
    )
    return pl.when(templated == "").then(pl.lit("/")).otherwise(templated)


def normalized_route() -> pl.Expr:
    """Route template of an HTTP span (null when neither route nor URL is known)."""
    return pl.coalesce(pl.col("http_route"), route_template(pl.col("http_url")))


def operation_detail(route: pl.Expr | None = None) -> pl.Expr:
    """What the operation does, literals removed: statement, METHOD route, rpc method or null.
    ``route``: an already computed :func:`normalized_route` column."""
    route = normalized_route() if route is None else route
    http = pl.when(route.is_not_null()).then(
        pl.concat_str([pl.col("http_method").fill_null(""), route], separator=" ").str.strip_chars()
    )
    return pl.coalesce(normalized_sql(), http, pl.col("rpc_method"))


def statement() -> pl.Expr:
    """The statement of a database call: ``db_statement``, else a span name that is one."""
    return pl.coalesce(
        pl.col("db_statement"), pl.when(pl.col("name").str.contains(STATEMENT_NAME)).then(pl.col("name"))
    )


def annotate_operations(frame: pl.DataFrame) -> pl.DataFrame:
    """Adds ``statement``, ``op_detail``, ``op_label``, ``op_key`` and ``target_service``, normalising
    each row once. Optional input columns: ``callee_service`` / ``callee_name`` (the server span that
    answered the call)."""
    target = target_service()
    if "callee_service" in frame.columns:  # the service whose server span answered the call
        target = pl.coalesce(pl.col("callee_service"), target)
    frame = frame.with_columns(statement().alias("statement"))
    # Normalise each distinct statement / URL once (parameterised statements repeat a lot).
    statements = frame.select(pl.col("statement").unique().drop_nulls())
    statements = statements.with_columns(normalized_sql("statement").alias("_sql"))
    urls = frame.select(pl.col("http_url").unique().drop_nulls())
    urls = urls.with_columns(route_template(pl.col("http_url")).alias("_url_route"))
    frame = (
        frame.join(statements, on="statement", how="left", maintain_order="left")
        .join(urls, on="http_url", how="left", maintain_order="left")
        .with_columns(
            pl.coalesce(pl.col("http_route"), pl.col("_url_route")).alias("_route"),
            target.alias("target_service"),
        )
    )
    http = pl.when(pl.col("_route").is_not_null()).then(
        pl.concat_str(
            [pl.col("http_method").fill_null(""), pl.col("_route")], separator=" "
        ).str.strip_chars()
    )
    callee = pl.lit(None, dtype=pl.String)
    if "callee_name" in frame.columns:  # what the answering server span calls itself, ids templated
        name = pl.col("callee_name")
        callee = pl.when(pl.col("name").str.contains(GENERIC_CALL_NAME)).then(
            pl.when(name.str.starts_with("/")).then(route_template(name)).otherwise(name)
        )
    frame = frame.with_columns(
        pl.coalesce(pl.col("_sql"), http, pl.col("rpc_method"), callee).alias("op_detail")
    ).drop("_route", "_sql", "_url_route")
    frame = frame.with_columns(operation_label(pl.col("op_detail")).alias("op_label"))
    return frame.with_columns(
        pl.concat_str([pl.col("service"), pl.col("op_label")], separator=" | ").alias("op_key")
    )


def operation_label(detail: pl.Expr | None = None) -> pl.Expr:
    """Readable operation: the span name, with its normalised detail when that says more (not when the
    name is already a template such as ``GET /users/{id}``).
    ``detail``: an already computed :func:`operation_detail` column (computing it is the costly part)."""
    detail = (operation_detail() if detail is None else detail).str.slice(0, MAX_LABEL_CHARS)
    return (
        pl.when(
            detail.is_null() | (detail == pl.col("name")) | pl.col("name").str.contains("{", literal=True)
        )
        .then(pl.col("name"))
        .when(pl.col("db_statement").is_null() & pl.col("name").str.contains(STATEMENT_NAME))
        # the name is the statement (no db.statement): show it normalised, its literals dropped
        .then(detail)
        .otherwise(pl.col("name") + pl.lit(": ") + detail)
    )


def operation_key() -> pl.Expr:
    return pl.concat_str([pl.col("service"), operation_label()], separator=" | ")


def parameters() -> pl.Expr:
    """The parameters a call carries, as far as the span shows them, else null. Needs ``statement`` and
    ``op_detail`` (:func:`annotate_operations`).

    A statement with literals in it (it differs from its normalised form); a URL of a request without
    a body (GET, HEAD, DELETE, OPTIONS). A parameterised statement (``WHERE id = ?``) or a POST/PUT
    hides its parameters: null, so "same parameters" is never claimed without evidence."""
    statement = pl.col("statement")
    has_literals = statement.str.replace_all(WHITESPACE_RUN, " ").str.strip_chars() != pl.col("op_detail")
    bodyless = pl.col("http_method").is_null() | pl.col("http_method").str.to_uppercase().is_in(
        ["GET", "HEAD", "DELETE", "OPTIONS"]
    )
    return (
        pl.when(statement.is_not_null())
        .then(pl.when(has_literals).then(statement))
        .when(pl.col("http_url").is_not_null() & bodyless)
        .then(pl.col("http_url"))
    )


def is_call() -> pl.Expr:
    """A span that waits on something outside its process: a client/producer span, a span with
    database/HTTP/RPC attributes, or a server span whose parent (the caller) is another service
    (instrumentation without client spans). Needs the ``parent_service`` column. Kinds recorded as
    UNSPECIFIED have been inferred from structure by then (:func:`hourglass.analysis.repair.infer_kinds`):
    the caller of another service is a client, a leaf named like a database operation too."""
    return (
        pl.col("kind").is_in([KIND_CLIENT, KIND_PRODUCER])
        | pl.col("db_system").is_not_null()
        | pl.col("db_statement").is_not_null()
        | pl.col("http_url").is_not_null()
        | pl.col("rpc_method").is_not_null()
        | ((pl.col("kind") == KIND_SERVER) & (pl.col("service") != pl.col("parent_service")))
    )


def target_service() -> pl.Expr:
    """The service a call goes to: the peer when recorded, the database system, the URL's host, else
    the span's own service."""
    url_host = pl.col("http_url").str.extract(r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)", 1)
    return pl.coalesce(pl.col("peer"), pl.col("db_system"), url_host, pl.col("service"))


# Two calls in a row are *sequential* (one after another: a loop, a serialized run) when they overlap
# by less than this share of the shorter of the two, and *concurrent* from it on. Real clients
# pipeline a little (a 2-10 ms overlap between 30 ms calls is still a loop); an absolute cap of 1 ms
# made such loops invisible.
MAX_SEQUENTIAL_OVERLAP_SHARE = 0.5


def overlap_share(start: pl.Expr, prev_end: pl.Expr, duration: pl.Expr, prev_duration: pl.Expr) -> pl.Expr:
    """How much of the shorter of two neighbouring calls they overlap (0: one after the other,
    1: one inside the other). Null when there is no previous call."""
    overlap = (prev_end - start).clip(lower_bound=0)
    shorter = pl.min_horizontal(duration, prev_duration).clip(lower_bound=1)
    return (overlap / shorter).clip(upper_bound=1.0)


def exemplars(trace_ids: list[str], limit: int = 5) -> list[str]:
    return list(dict.fromkeys(trace_ids))[:limit]


def num(value: Any) -> float:
    """A polars scalar (median, max, ...) as float; 0.0 for null/empty."""
    return float(value) if isinstance(value, int | float) else 0.0


def caller_group_columns() -> list[pl.Expr]:
    """The aggregations every per-caller group of calls carries (``n_plus_one``'s sequences,
    ``batchable_calls``' groups): who calls, where in the trace, what is called, which spans."""
    return [
        pl.col("trace_id").first(),
        pl.col("parent_start_ns").first(),
        pl.col("parent_span_id_").first().alias("caller_span_id"),
        pl.col("parent_service").first().alias("caller_service"),
        pl.col("parent_name").first().alias("caller_name"),
        pl.col("parent_on_critical_path").first(),
        pl.col("op_label").first(),
        pl.col("op_detail").first(),
        pl.col("target_service").first(),
        pl.col("span_id"),
        pl.len().alias("calls"),
        pl.col("on_critical_path").any().alias("any_on_path"),
        pl.col("kind_inferred").any().alias("inferred_roles"),
    ]
