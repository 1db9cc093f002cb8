"""Helpers shared by detectors: operation keys, statement/route normalisation, call children,
fan-out sibling groups, failure and call-target expressions, and the pieces several detectors build
their findings from. Every detector module is a leaf: what two detectors share lives here, never in
one of them (``tests/analysis/test_detector_leaves.py``). Intermediates computed once per analysis
(call children, sibling groups) are kept with :meth:`AnalysisContext.cached`.

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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.model import (
    CollapseSpans,
    Finding,
    NearMissLog,
    Occurrence,
    Occurrences,
    hex_text,
    hex_words,
)
from hourglass.analysis.model import num as num  # detectors read it as _common.num
from hourglass.analysis.repair import STATEMENT_NAME, TOLERANCE_FRACTION, TOLERANCE_MAX_NS, TOLERANCE_MIN_NS
from hourglass.collector.schema import (
    KIND_CLIENT,
    KIND_PRODUCER,
    KIND_SERVER,
    STATUS_ERROR,
    STATUS_OK,
)

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


# Where a decision records a candidate it dropped (``AnalysisContext`` is one).
NearMissSink = NearMissLog


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
    # "" -> "/" (``templated`` written once: a when/otherwise on it computed the template twice)
    return templated.str.replace(r"^$", "/")


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
    target = target_service(pl.col("_url_host"))
    if "callee_service" in frame.columns:  # the service whose server span answered the call
        target = pl.coalesce(pl.col("callee_service"), target)
    frame = frame.with_columns(statement().alias("statement"))
    # Normalise each distinct statement / URL once (parameterised statements repeat a lot).
    statements = frame.select(pl.col("statement").unique().drop_nulls())
    # The literals masked first, the rest of the normalisation once per distinct masked text
    # (statements that differ only in their literals are most of them): normalized_sql, in two steps.
    statements = statements.with_columns(_masked=_apply(pl.col("statement"), _SQL_REPLACEMENTS[:1]))
    masked = statements.select(pl.col("_masked").unique()).with_columns(
        _apply(pl.col("_masked"), _SQL_REPLACEMENTS[1:]).str.strip_chars().alias("_sql")
    )
    statements = statements.join(masked, on="_masked", how="left").drop("_masked")
    urls = frame.select(pl.col("http_url").unique().drop_nulls())
    urls = urls.with_columns(
        route_template(pl.col("http_url")).alias("_url_route"),
        _target_host(pl.col("http_url")).alias("_url_host"),
    )
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
    ).drop("_route", "_sql", "_url_route", "_url_host")
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


def target_service(url_host: pl.Expr | None = None) -> pl.Expr:
    """The service a call goes to: the peer when recorded, the database system, the URL's host, else
    the span's own service. ``url_host``: an already computed :func:`_target_host` column."""
    url_host = _target_host(pl.col("http_url")) if url_host is None else url_host
    return pl.coalesce(pl.col("peer"), pl.col("db_system"), url_host, pl.col("service"))


def _target_host(url: pl.Expr) -> pl.Expr:
    return url.str.extract(r"^[a-zA-Z][a-zA-Z0-9+.-]*://(?:[^@/]*@)?([^/:?#]+)", 1)


# Two calls in a row are *sequential* (one after another: a loop, a serialized run) when they overlap
# by less than this share of the shorter of the two, and *concurrent* from it on. Real clients
# pipeline a little (a 2-10 ms overlap between 30 ms calls is still a loop); an absolute cap of 1 ms
# made such loops invisible.
MAX_SEQUENTIAL_OVERLAP_SHARE = 0.5


def key_changes(key: list[str]) -> pl.Expr:
    """True at each row whose ``key`` differs from the previous row's (nulls equal, as ``over``
    groups them; the first row included): the first rows of the groups of a frame sorted by key."""
    return pl.any_horizontal([pl.col(c).ne_missing(pl.col(c).shift(1)) for c in key]).fill_null(True)


def running_max(values: pl.Series, first: pl.Series) -> pl.Series:
    """``values.cum_max()`` started again at each row where ``first`` is true: what
    ``cum_max().over(key)`` gives on a frame whose rows of one key are contiguous, ``first``
    marking each key's first row. The window runs group by group (~8 ms for 40k calls in 30k
    groups); here one running maximum over the whole column, each group's values lifted above
    the previous groups' so that none carries into the next, when the lifted values fit in 64
    bits (else the window: values more than 2^62 apart, or groups whose spreads add up past 2^61)."""
    name, n = values.name, len(values)
    starts = first.fill_null(False).to_numpy().copy() if n else np.zeros(0, dtype=bool)
    if n:
        starts[0] = True
    group = np.cumsum(starts, dtype=np.int64) - 1
    if n and not values.null_count() and values.dtype.is_integer():
        v = values.cast(pl.Int64).to_numpy()
        # each group's values relative to its own minimum, lifted above the previous groups' by
        # the sum of their spreads: the lift needs room for the groups' own spreads only, not for
        # the partition's time range once per group (a store of several days, or one call with a
        # junk timestamp, would otherwise leave no room and take the window). The differences are
        # taken only where none can overflow, the sum checked in floating point first.
        if int(v.max()) - int(v.min()) < 1 << 62:
            first_rows = np.flatnonzero(starts)
            low = np.minimum.reduceat(v, first_rows)
            rel = v - low[group]
            spread = np.maximum.reduceat(rel, first_rows) + 1
            if float(spread.sum(dtype=np.float64)) < float(1 << 61):
                offset = np.cumsum(spread) - spread  # the groups before each one
                lifted = rel + offset[group]
                np.maximum.accumulate(lifted, out=lifted)
                return pl.Series(name, lifted - offset[group] + low[group]).cast(values.dtype)
    framed = pl.DataFrame({"v": values, "g": group})
    return framed.select(pl.col("v").cum_max().over("g")).to_series().alias(name)


def overlap_share(start: pl.Expr, prev_end: pl.Expr, duration: pl.Expr, prev_duration: pl.Expr) -> pl.Expr:
    """How much of the shorter of two neighbouring calls they overlap (0: one after the other,
    1: one inside the other). Null when there is no previous call."""
    overlap = (prev_end - start).clip(lower_bound=0)
    shorter = pl.min_horizontal(duration, prev_duration).clip(lower_bound=1)
    return (overlap / shorter).clip(upper_bound=1.0)


def exemplars(trace_ids: list[str], limit: int = 5) -> list[str]:
    return list(dict.fromkeys(trace_ids))[:limit]


def dropped_per_caller(dropped: pl.DataFrame, by: list[str], *extra: pl.Expr) -> pl.DataFrame:
    """The runs of calls a detector dropped (rows of :func:`caller_group_columns` plus ``on_path``,
    ``local_saving_ns`` and ``root_duration_ns``), one row per ``by`` (the caller, maybe with the
    operation) in first-seen order: ``trace_ids`` (sorted), the first ``caller_span_id`` and
    ``span_id`` list, ``on_path`` (runs on the critical path), ``count`` (runs), the medians
    ``saving_ms`` and ``root_ms``, and ``extra`` aggregations."""
    return dropped.group_by(by, maintain_order=True).agg(
        pl.col("trace_id").unique().sort().alias("trace_ids"),
        pl.col("caller_span_id").first(),
        pl.col("span_id").first(),
        pl.col("on_path").sum(),
        pl.len().alias("count"),
        (pl.col("local_saving_ns").median() / 1e6).alias("saving_ms"),
        (pl.col("root_duration_ns").median() / 1e6).alias("root_ms"),
        *extra,
    )


def note_caller_miss(notes: NearMissSink, kind: str, row: dict[str, Any], reason: str) -> None:
    """A near miss of a caller's run of calls: ``row`` has ``caller_service``, ``caller_name``,
    ``trace_ids``, ``caller_span_id`` and the calls' ``span_id`` list."""
    notes.note_near_miss(
        kind,
        str(row["caller_service"]),
        str(row["caller_name"]),
        reason,
        row["trace_ids"],
        [row["caller_span_id"], *row["span_id"]],
        len(row["trace_ids"]),
    )


def batch_confidence(base: float, distinct_share: float, median_calls: float, traces: int) -> float:
    """Confidence of a batching finding (``n_plus_one``, ``batchable_calls``): ``base``, +0.1 each
    when most runs carry different parameters, when a run makes 10 calls or more (p50) and when
    it is seen in 5 traces or more; capped at 0.95."""
    score = base
    if distinct_share >= 0.5:
        score += 0.1
    if median_calls >= 10:
        score += 0.1
    if traces >= 5:
        score += 0.1
    return round(min(0.95, score), 3)


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


# -- calls and their children (serialized_calls, n_plus_one, batchable_calls) ------------------

# A call that takes no input an earlier call could have produced (see the module docstring).
_INPUT_ID_SEGMENT = r"/(?:\d+|[0-9a-fA-F]{16,}|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})(?:[/?#\s]|$)"
_HTTP_INPUT = r"[{?]|" + _INPUT_ID_SEGMENT
_SQL_INPUT = r"(?i)\bwhere\b|\?|\$\d|:[a-z_]\w*|%s|%\("
# Whole words only (camelCase split first): "author", "books_author", "tokenizer", "sessionize",
# "blocksize" are not gates; "authenticate", "AuthService", "validate_token", "db.connect" are.
GATE_PATTERN = (
    r"(?:^|[^a-z])(?:auth|authn|authz|authenticat(?:e|es|ed|ion|or)|authori[sz](?:e|es|ed|ation)|log-?in|sign-?in"
    r"|o?auth2?|tokens?|sessions?|permissions?|acl|captcha|rate-?limit(?:s|er|ing|ed)?|throttle|quotas?"
    r"|verify|verification|validat(?:e|es|ed|ion|or)|locks?|acquire|mutex|idempoten(?:t|cy)"
    r"|nextval|next value|sequence|connect|connection)(?:$|[^a-z])"
)


def self_contained_call() -> pl.Expr:
    """True for a call that cannot consume an earlier sibling's result: an HTTP GET/HEAD without
    path parameters, query string or id-like path segments, or a SQL SELECT without WHERE or bind
    parameters."""
    method = pl.coalesce(
        pl.col("http_method").str.to_uppercase(), pl.col("name").str.extract(r"^([A-Z]+)\s", 1)
    )
    http_text = pl.concat_str(
        [pl.col("http_route"), pl.col("http_url"), pl.col("name")], separator=" ", ignore_nulls=True
    )
    http_ok = (
        method.is_in(["GET", "HEAD"])
        & pl.col("db_statement").is_null()
        & pl.col("rpc_method").is_null()
        & ~http_text.str.contains(_HTTP_INPUT)
    )
    sql_ok = pl.col("db_statement").str.contains(r"(?i)^\s*select\b") & ~pl.col("db_statement").str.contains(
        _SQL_INPUT
    )
    return (http_ok.fill_null(False) | sql_ok.fill_null(False)).alias("self_contained")


def tolerance(parent_duration: pl.Expr) -> pl.Expr:
    """The repair tolerance for children of a parent of this duration (overlaps within it are clock noise)."""
    return (parent_duration * TOLERANCE_FRACTION).cast(pl.Int64).clip(TOLERANCE_MIN_NS, TOLERANCE_MAX_NS)


CALL_COLUMNS = (
    "trace_id", "span_id", "row", "parent_row", "service", "name", "kind", "start_ns", "end_ns", "duration_ns",
    "status_code", "blocking", "on_critical_path", "root_duration_ns", "db_system", "db_statement",
    "http_method", "http_route", "http_url", "rpc_method", "peer", "kind_inferred",
)  # fmt: skip


# what is_call (and the choice of call children) reads
_IS_CALL_COLUMNS = ("row", "parent_row", "start_ns", "service", "parent_service", "kind", "db_system", "db_statement",
                    "http_url", "rpc_method")  # fmt: skip


def call_children(ctx: AnalysisContext) -> pl.DataFrame:
    """Blocking call children with parent columns, operation key/label and target service, sorted by
    (parent_row, start_ns). Computed once per context (``serialized_calls``, ``n_plus_one`` and
    ``batchable_calls`` read the same frame): :meth:`AnalysisContext.cached`, key ``call_children``."""
    return ctx.cached("call_children", lambda: _call_children(ctx))


def _call_children(ctx: AnalysisContext) -> pl.DataFrame:
    # Which rows are call children is decided on the few columns is_call reads (a projection of
    # the spans, not a copy of every call column of every blocking child); the call columns and the
    # parent's are gathered for the rows that survive, already in (parent_row, start_ns, row) order.
    spans = ctx.spans
    blocking = (
        spans.lazy()
        .with_columns(parent_service=pl.col("service").gather(pl.col("parent_row").fill_null(0)))
        .filter(pl.col("parent_row").is_not_null() & pl.col("blocking"))
        .select(*_IS_CALL_COLUMNS)
        .with_columns(_is_call=is_call())
        .select("row", "parent_row", "start_ns", "service", "parent_service", "_is_call")
        .collect()
    )
    calls = blocking.filter("_is_call")
    wrapper_rows = calls.select(pl.col("parent_row").alias("row")).unique()
    wrappers = blocking.filter(
        ~pl.col("_is_call")
        & (pl.col("service") == pl.col("parent_service"))
        & pl.col("row").cast(pl.Int64).is_in(wrapper_rows["row"].implode())
    )
    out = pl.concat([calls, wrappers], how="vertical_relaxed") if wrappers.height else calls
    # Only calls with a sibling call can be serialized or repeated: normalise just those.
    siblings = out.group_by("parent_row").agg(pl.len().alias("_calls")).filter(pl.col("_calls") >= 2)
    chosen = out.join(siblings.select("parent_row"), on="parent_row", how="semi").sort(
        ["parent_row", "start_ns", "row"]
    )["row"]
    out = ctx.with_parent(spans.select(pl.col(CALL_COLUMNS).gather(chosen)))
    callees = (
        spans.lazy()
        .filter((pl.col("kind") == KIND_SERVER) & pl.col("parent_row").is_not_null())
        .select(
            pl.col("parent_row").cast(pl.UInt32).alias("row"),
            pl.col("service").alias("callee_service"),
            pl.col("name").alias("callee_name"),
        )
        .unique(subset="row", keep="first")
        .collect()
    )
    remote = pl.col("callee_service") != pl.col("service")
    out = out.join(callees, on="row", how="left", maintain_order="left").with_columns(
        pl.when(remote).then(pl.col("callee_service")).alias("callee_service"),
        pl.when(remote).then(pl.col("callee_name")).alias("callee_name"),
    )
    out = annotate_operations(out)
    # The gate rule reads a call's name, detail and target: a few distinct texts, matched once each.
    gate_text = pl.concat_str(
        [pl.col("name"), pl.col("op_detail").fill_null(""), pl.col("target_service").fill_null("")],
        separator=" ",
    )
    texts = out.select(gate_text.unique().drop_nulls().alias("text"))
    gates = texts.filter(
        pl.col("text")
        .str.replace_all(r"([a-z0-9])([A-Z])", "$1 $2")
        .str.to_lowercase()
        .str.contains(GATE_PATTERN)
    )["text"]
    return out.with_columns(gate_text.is_in(gates.implode()).alias("is_gate"), self_contained_call())


def repeated_calls(ctx: AnalysisContext, min_calls: int) -> pl.DataFrame:
    """The call children (:func:`call_children`) of (parent, operation) groups of at least
    ``min_calls`` calls — the columns those detectors read — with ``params`` (:func:`parameters`)
    and ``_cum_end`` (the latest end of the group's calls so far), sorted by (parent_row, op_key,
    start_ns, span_id). Computed once per context and ``min_calls`` (``n_plus_one`` and
    ``batchable_calls`` read the same frame): :meth:`AnalysisContext.cached`, key
    ``repeated_calls/<min_calls>``, dropped when the detectors are done
    (``hourglass.analysis.pipeline.run_detectors``)."""
    return ctx.cached(f"repeated_calls/{min_calls}", lambda: _repeated_calls(call_children(ctx), min_calls))


# the call columns n_plus_one and batchable_calls read from repeated_calls (besides params, _cum_end)
_REPEATED_CALL_COLUMNS = (
    "trace_id", "span_id", "parent_row", "parent_start_ns", "parent_span_id_", "parent_service", "parent_name",
    "parent_on_critical_path", "parent_duration_ns", "root_duration_ns", "name", "op_key", "op_label", "op_detail",
    "target_service", "start_ns", "end_ns", "duration_ns", "status_code", "on_critical_path", "kind_inferred",
    "http_url", "peer",
)  # fmt: skip


# ... and what ``parameters`` reads besides
_REPEATED_CALL_INPUTS = list(
    dict.fromkeys([*_REPEATED_CALL_COLUMNS, "statement", "op_detail", "http_method", "http_url"])
)


def _repeated_calls(calls: pl.DataFrame, min_calls: int) -> pl.DataFrame:
    key = ["parent_row", "op_key"]
    # groups with fewer calls are dropped before the sort (most call groups)
    # (on the columns kept and those ``parameters`` reads: the filter does not copy every call column)
    calls = calls.select(_REPEATED_CALL_INPUTS).filter(pl.len().over(key) >= min_calls)
    calls = (
        calls.with_columns(parameters().alias("params"))
        .select(*_REPEATED_CALL_COLUMNS, "params")
        .sort([*key, "start_ns", "span_id"])
    )
    # the latest end of the group's calls so far (each group's rows are contiguous after the sort)
    return calls.with_columns(
        running_max(calls["end_ns"], calls.select(key_changes(key)).to_series()).alias("_cum_end")
    )


# -- failed calls and their targets (error_propagation, retry_without_backoff, missing_timeout) -


def failed_expr() -> pl.Expr:
    """A span that reports failure: status ERROR, or an HTTP 5xx / 429 not overridden by status OK."""
    http = pl.col("http_status_code")
    return (pl.col("status_code") == STATUS_ERROR) | (
        (pl.col("status_code") != STATUS_OK) & ((http >= 500) | (http == 429)).fill_null(False)
    )


def call_target_expr() -> pl.Expr:
    """What an outgoing call talks to (peer, database system, destination); "" for other spans.
    (Findings name a URL's host when none of these is recorded: :func:`url_host_expr`.)

    Only CLIENT/PRODUCER spans use ``peer``: on a SERVER span the peer is the *caller's* address,
    which varies per connection and would split one operation into many."""
    outgoing = pl.col("kind").is_in([KIND_CLIENT, KIND_PRODUCER])
    return (
        pl.when(outgoing)
        .then(pl.coalesce(pl.col("peer"), pl.col("db_system"), pl.col("messaging_destination"), pl.lit("")))
        .otherwise(pl.coalesce(pl.col("db_system"), pl.col("messaging_destination"), pl.lit("")))
    )


URL_HOST_PATTERN = r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/@?#]*@)?([^/:?#]+)"


def url_host_expr(column: str = "http_url") -> pl.Expr:
    """The host of a URL column (null when it is not a URL). A regex per value: use it on the few
    rows a finding names, never as a grouping key over every span."""
    return pl.col(column).str.extract(URL_HOST_PATTERN, 1)


# -- fan-out sibling groups (fanout_straggler, fanout_concurrency_limit, lock_contention) ------


def stat(series: pl.Series, quantile: float = 0.5, scale: float = 1.0) -> float:
    """A quantile of a numeric series divided by ``scale`` (0.0 for an empty series)."""
    value = series.quantile(quantile, interpolation="linear") if series.len() else None
    return float(value) / scale if isinstance(value, int | float) else 0.0


def _endpoint() -> pl.Expr:
    """The call's endpoint shape: the route, else the URL path with every segment that holds a
    digit replaced by ``{}`` (``/shards/3/search`` → ``/shards/{}/search``); null when neither is
    known. Generic client span names (``GET``, ``HTTP GET``) would otherwise put calls to different
    endpoints in one group."""
    path = (
        pl.col("http_url")
        .str.replace(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*", "")
        .str.replace(r"[?#].*$", "")
        .str.replace_all(r"/[^/]*[0-9][^/]*", "/{}")
    )
    return pl.coalesce(pl.col("http_route"), path)


def target_operation(name: str, endpoint: str) -> str:
    """The child operation as a finding names it: the span name, with the endpoint shape appended
    when the name is a generic HTTP one (``HTTP GET`` → ``HTTP GET /route``)."""
    return f"{name} {endpoint}" if endpoint else name


# HTTP client span names that say nothing about the endpoint ("GET", "HTTP GET", "http.request").
_GENERIC_HTTP_NAME = (
    r"(?i)^(?:https?[ ._-]?)?(?:(?:GET|POST|PUT|DELETE|PATCH|HEAD|OPTIONS)|request|client[ ._-]?request)?$"
)


def _generic_names(spans: pl.DataFrame) -> pl.Series:
    names = spans["name"].unique()
    return names.filter(names.str.contains(_GENERIC_HTTP_NAME))


def span_names(ctx: AnalysisContext) -> pl.Series:
    """The distinct span names of ``ctx``, to find the names a rule matches by a regular expression
    once per name, not once per span (the distinct names cost a hashing of every span's name, and
    several detectors ask): :meth:`AnalysisContext.cached`, key ``span_names``."""
    return ctx.cached("span_names", lambda: ctx.spans["name"].unique())


def generic_names(ctx: AnalysisContext) -> pl.Series:
    """The distinct span names of ``ctx`` that are generic HTTP ones (``_GENERIC_HTTP_NAME``), for
    :func:`with_span_columns`' ``generic``: :meth:`AnalysisContext.cached`, key ``generic_names``."""

    def build() -> pl.Series:
        names = span_names(ctx)
        return names.filter(names.str.contains(_GENERIC_HTTP_NAME))

    return ctx.cached("generic_names", build)


def sibling_groups(ctx: AnalysisContext, min_children: int) -> pl.DataFrame:
    """See :func:`_sibling_groups`. Computed once per context and ``min_children`` (both fan-out
    detectors group the same siblings): :meth:`AnalysisContext.cached`, key
    ``sibling_groups/<min_children>``."""
    return ctx.cached(
        f"sibling_groups/{min_children}",
        lambda: _sibling_groups(ctx.spans, min_children, generic_names(ctx)),
    )


# a call span's columns the sibling groups carry
_CALL_COLUMNS = ("row", "parent_row", "start_ns", "end_ns", "duration_ns")


def _sibling_groups(spans: pl.DataFrame, min_children: int, generic: pl.Series | None = None) -> pl.DataFrame:
    """Blocking children grouped by (parent, child service, child name, endpoint shape — see
    :func:`_endpoint`), one row per child, for groups with at least ``min_children`` members:
    ``row``, ``parent_row``, ``start_ns``, ``end_ns``, ``duration_ns`` and per group ``group_id``,
    ``n``, ``first_start_ns``, ``last_start_ns``, ``first_end_ns``. Other span columns are fetched
    for the few rows that need them with :func:`with_span_columns`.

    The group key is a 64-bit hash and the frame carries only integers: windows over it stay cheap
    at a million spans, where carrying string columns through a join costs more than the whole
    detector may. The endpoint (regular expressions over URLs, the dearest step) is computed only
    for children already in a group of ``min_children`` by name whose span name is a generic HTTP
    one (``GET``, ``HTTP GET``, ``http.request``): any other name is the instrumentation's own
    statement of what the call is. ``generic``: :func:`generic_names` (found here when not given)."""
    by_name = (
        spans.lazy()
        .filter(pl.col("blocking") & pl.col("parent_row").is_not_null())
        .select(
            *_CALL_COLUMNS,
            name_key=pl.struct("parent_row", "service", "name").hash(),
            needs_endpoint=pl.col("name").is_in(
                (_generic_names(spans) if generic is None else generic).implode()
            )
            & (pl.col("http_url").is_not_null() | pl.col("http_route").is_not_null()),
        )
        .with_columns(n=pl.len().over("name_key"))
        .filter(pl.col("n") >= min_children)
        .collect()
    )
    endpoint_key = np.zeros(by_name.height, dtype=np.uint64)
    needs = by_name["needs_endpoint"].to_numpy()
    if needs.any():
        rows = by_name["row"].filter(by_name["needs_endpoint"])
        calls = pl.DataFrame([spans["http_route"].gather(rows), spans["http_url"].gather(rows)])
        endpoint_key[needs] = calls.select(_endpoint().hash()).to_series().to_numpy()
    return (
        by_name.lazy()
        .with_columns(endpoint_key=pl.Series(endpoint_key))
        .select(
            *_CALL_COLUMNS,
            group_id=pl.struct("name_key", "endpoint_key").hash(),
        )
        # (the group's figures with its size, before the small groups are dropped: one grouping
        # of the rows by group_id, not a second one of the rows left)
        .with_columns(
            n=pl.len().over("group_id"),
            first_start_ns=pl.col("start_ns").min().over("group_id"),
            last_start_ns=pl.col("start_ns").max().over("group_id"),
            first_end_ns=pl.col("end_ns").min().over("group_id"),
        )
        .filter(pl.col("n") >= min_children)
        .collect()
    )


def with_span_columns(
    spans: pl.DataFrame, frame: pl.DataFrame, columns: list[str], generic: pl.Series | None = None
) -> pl.DataFrame:
    """Adds span ``columns`` by ``row``; ``parent_service``/``parent_name`` come by ``parent_row``
    and ``endpoint`` is :func:`_endpoint` for a call with a generic HTTP name, else "" (and ""
    when unknown). ``generic``: the spans' generic names (:func:`generic_names`; else found
    among the names of these rows — a span's name is one of them exactly when it is generic)."""
    if spans.height and spans["row"][-1] != spans.height - 1:
        raise ValueError("spans.row must be each span's position in the frame (AnalysisContext contract)")
    rows = frame["row"]
    derived = ("parent_service", "parent_name", "endpoint")
    own = [spans[c].gather(rows) for c in columns if c not in derived]
    if "endpoint" in columns:
        names = next((s for s in own if s.name == "name"), None)
        if names is None:
            names = spans["name"].gather(rows)
        if generic is None:
            generic = _generic_names(names.to_frame("name"))
        is_generic = names.is_in(generic.implode()).fill_null(False)
        # the endpoint's regular expressions run on the calls with a generic name alone
        endpoint = pl.repeat("", len(rows), dtype=pl.String, eager=True)
        if is_generic.any():
            at = rows.filter(is_generic)
            call = pl.DataFrame([spans["http_route"].gather(at), spans["http_url"].gather(at)])
            values = call.select(_endpoint().fill_null("")).to_series()
            endpoint = endpoint.scatter(is_generic.arg_true(), values)
        own.append(endpoint.alias("endpoint"))
    parents = [
        spans[c.removeprefix("parent_")].gather(frame["parent_row"]).alias(c)
        for c in columns
        if c in ("parent_service", "parent_name")
    ]
    return frame.with_columns(own + parents)


def sorted_partitions(
    frame: pl.DataFrame, by: list[str], order: list[str], keep: pl.Expr | None = None
) -> Iterator[pl.DataFrame]:
    """What ``frame.filter(keep).sort(order).partition_by(by, maintain_order=True)`` gives: the
    rows ``keep`` selects, split by the values of ``by``, each partition in ``order`` and the
    partitions in the order of their first row. Sorted and split as row numbers, then each column
    taken for every partition at once, so the rows are copied once, into the partitions (not into
    the whole frame sorted, then again into the partitions): a decision over ~10^5 occurrence rows
    with id lists held an extra copy of them. Each column is made contiguous on its own before it
    is taken from (rows combined from many stored batches are as many chunks, and taking rows
    across chunks is several times slower). ``order`` must tell a partition's rows apart (a tie
    between two rows of one partition may come out in either order, as with the sort)."""
    if frame.is_empty():
        return
    ranked = np.asarray(frame.select(pl.arg_sort_by(order)).to_series().to_numpy(), dtype=np.int64)
    if keep is not None:
        kept = frame.select(keep.fill_null(False)).to_series().to_numpy()
        ranked = ranked[kept[ranked]]
    groups = frame.select(by).with_row_index("_row").group_by(by).agg("_row")["_row"]
    group_of = np.empty(frame.height, dtype=np.int64)
    for number, rows in enumerate(groups):
        group_of[rows.to_numpy()] = number
    in_order = group_of[ranked]
    # by group (stable: each group's rows stay in ``order``), the groups by their first row
    by_group = np.argsort(in_order, kind="stable")
    bounds = np.flatnonzero(np.diff(in_order[by_group])) + 1
    pieces = sorted(
        np.split(by_group, bounds) if by_group.size else [], key=lambda positions: int(positions[0])
    )
    if not pieces:
        return
    taken = [pl.Series(ranked[piece]) for piece in pieces]
    columns: list[list[pl.Series]] = [[] for _ in pieces]
    for name in frame.columns:
        whole = frame[name].rechunk()
        for piece, rows in zip(columns, taken, strict=True):
            piece.append(whole.gather(rows))
        del whole
    del taken
    while columns:
        yield pl.DataFrame(columns.pop(0))


def fanout_finding(
    kind: str,
    first: dict[str, Any],
    occurrences: Sequence[Occurrence],
    confidence: float,
    evidence: dict[str, Any],
) -> Finding:
    """A fan-out detector's finding: the parent operation of ``first`` (a row with the fan-out
    signature: parent_service, parent_name, service, name, endpoint) waits on the child operation;
    the endpoint shape is part of the signature; confidence rounded and capped at 0.95."""
    return Finding(
        kind=kind,
        category="parallelization",
        service=first["parent_service"],
        operation=first["parent_name"],
        targets=[
            {"service": first["service"], "operation": target_operation(first["name"], first["endpoint"])}
        ],
        occurrences=occurrences,
        confidence=round(min(confidence, 0.95), 3),
        evidence=evidence,
        signature_extra=first["endpoint"],
    )


def column_values(frame: pl.DataFrame, names: list[str]) -> list[list[Any]]:
    """Columns ``names`` of ``frame``, each as a Python list (``Series.to_list``), but a column of
    lists without null lists as a list of tuples: the same values as ``to_list`` gives, read from
    one flat list (a list column's own ``to_list`` builds each row's list apart, ~3x the time).
    A detector zips the few columns its occurrences need, row by row (not a dict of every column
    per row: at 200k occurrences a round, those dicts and the unused columns' values cost more
    than the occurrences themselves)."""
    return [_values(frame.get_column(name)) for name in names]


def _values(series: pl.Series) -> list[Any]:
    dtype = series.dtype
    if not isinstance(dtype, pl.List) or dtype.inner.is_nested() or series.null_count():
        return series.to_list()
    flat = series.explode(empty_as_null=False, keep_nulls=False).to_list()
    ends = np.cumsum(series.list.len().to_numpy(), dtype=np.int64).tolist()
    return [tuple(flat[start:end]) for start, end in zip([0, *ends], ends, strict=False)]


OCCURRENCE_KEY_SEED = 0x6F6363  # polars hash_rows seed of the occurrence keys


def occurrence_keys(frame: pl.DataFrame, columns: list[str], *extra: bool | int | str) -> pl.Series:
    """The occurrences' ``key`` (:class:`Occurrence`), one per row of ``frame``: a 64-bit hash,
    in bulk, of ``columns`` (the columns the occurrence's trace id, span ids and interventions are
    made of) and ``extra`` (the finding's values they also depend on). A row's key depends on that
    row alone, so a detector may hash every finding's rows at once and split them afterwards.
    Within one polars version the same values hash the same in every process."""
    hashed = frame.select(columns)
    if extra:
        hashed = hashed.with_columns(pl.lit(value).alias(f"_extra{i}") for i, value in enumerate(extra))
    return hashed.hash_rows(seed=OCCURRENCE_KEY_SEED)


def occurrence_values(
    frame: pl.DataFrame, names: list[str], key_columns: list[str], *extra: bool | int | str
) -> Iterator[tuple[Any, ...]]:
    """Row by row, the values of columns ``names`` of ``frame`` (:func:`column_values`) followed
    by the row's occurrence key (:func:`occurrence_keys` of ``key_columns`` and ``extra``)."""
    keys = occurrence_keys(frame, key_columns, *extra).to_list()
    return zip(*column_values(frame, names), keys, strict=True)


def _lists(offsets: np.ndarray, values: pa.Array) -> pl.Series:
    """A list column: row ``i`` is ``values[offsets[i]:offsets[i + 1]]``."""
    made = pl.from_arrow(pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), values))
    assert isinstance(made, pl.Series)
    return made.rename("")


def id_words(lists: pl.Series) -> pl.Series | None:
    """A column of span-id lists (List(String), none null) as lists of the 64-bit words the ids
    spell (List(UInt64), as :func:`hourglass.analysis.model.hex_words` reads them: 8 bytes an id
    instead of a polars string's 32) when every id is lowercase hex of 16 digits (OTLP's span
    ids); else None. Made by polars, in its own memory. :func:`id_text` gives the lists back."""
    if lists.dtype != pl.List(pl.String) or lists.null_count() or not len(lists):
        return None
    flat = lists.explode(empty_as_null=False, keep_nulls=False)
    if flat.null_count() or (flat.str.len_bytes() != 16).any() or flat.str.contains("[^0-9a-f]").any():
        return None
    del flat
    return lists.list.eval(pl.element().str.to_integer(base=16, dtype=pl.UInt64)).rename("")


def id_text(words: pl.Series) -> pl.Series:
    """The span-id lists that ``words`` (:func:`id_words`) spell, as List(String)."""
    lengths = words.list.len().fill_null(0).to_numpy().astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = words.explode(empty_as_null=False, keep_nulls=False).to_numpy().astype(np.uint64)
    text = hex_text(flat.reshape(-1, 1)) if len(flat) else pl.Series("", [], dtype=pl.String)
    return _lists(offsets, text.cast(pl.String).to_arrow().cast(pa.large_string()))


WORDS = "_words"  # the suffix of a list column's words (:func:`compact_id_lists`)


def compact_id_lists(frame: pl.DataFrame, columns: list[str], keyed: list[str], key: str) -> pl.DataFrame:
    """``frame`` as a decision holds it: each span-id list column of ``columns`` as the words its
    ids spell (``column + WORDS``, :func:`id_words`; the text column then null) when every id of
    every one of them is lowercase hex of 16 digits, else left as text (the words null); and each
    row's occurrence key (``key``: :func:`occurrence_keys` of ``keyed``, hashed on the text, so
    the keys are those made of the rows as extracted). The same columns either way, so frames
    compacted apart combine. :func:`id_lists` reads a column back."""
    n = frame.height
    keys = occurrence_keys(frame, keyed).alias(key)
    words: list[pl.Series] = []
    for column in columns:
        made = id_words(frame[column])
        if made is None:
            break
        words.append(made)
    if len(words) == len(columns):
        return frame.with_columns(
            *(pl.repeat(None, n, dtype=pl.List(pl.String), eager=True).alias(c) for c in columns),
            *(w.alias(c + WORDS) for c, w in zip(columns, words, strict=True)),
            keys,
        )
    del words
    return frame.with_columns(
        *(pl.repeat(None, n, dtype=pl.List(pl.UInt64), eager=True).alias(c + WORDS) for c in columns), keys
    )


def id_lists(frame: pl.DataFrame, column: str, head: str | None = None, *, words: bool = True) -> pl.Series:
    """The lists of ``column`` of a frame compacted by :func:`compact_id_lists` (rows from pieces
    held as words and as text alike), each headed by the row's ``head`` id when given: as words
    (List(UInt64)) when ``words`` and every one of them is held so (the head's words made from its
    text), else as text (List(String))."""
    held = frame[column + WORDS]
    if words and not held.null_count():
        if head is None:
            return held
        heads = hex_words(frame[head]) if len(frame) else None
        if heads is not None and heads.shape[1] == 1:
            return pl.select(pl.concat_list(pl.Series(heads[:, 0]), held)).to_series()
    text = frame[column]
    if held.null_count() < len(held):
        text = pl.select(pl.coalesce(text, id_text(held))).to_series().rename(column)
    return text if head is None else pl.select(pl.concat_list(frame[head], text)).to_series()


OCCURRENCE_CHUNK = 1 << 14  # rows of a finding made into occurrences at a time (:func:`occurrences_by_chunk`)


def occurrences_by_chunk(rows: int, make: Callable[[int, int], Occurrences]) -> Occurrences:
    """The occurrences of ``rows`` rows made ``OCCURRENCE_CHUNK`` rows at a time (``make(start,
    length)``: those of rows ``start`` to ``start + length``) and concatenated: the same
    occurrences as ``make(0, rows)`` (a row's occurrence and key depend on that row alone), but
    the working set of making them — the span-id lists taken and joined, exploded, their text
    decoded into words: ~100 bytes a span id — is one chunk's, not the finding's (a finding of
    70k occurrences at 12M spans names a million span ids)."""
    if rows <= OCCURRENCE_CHUNK:
        return make(0, rows)
    return Occurrences.concat(
        [make(start, min(OCCURRENCE_CHUNK, rows - start)) for start in range(0, rows, OCCURRENCE_CHUNK)]
    )


def batch_occurrences(group: pl.DataFrame, numbers: dict[str, tuple[str, float]]) -> Occurrences:
    """One occurrence per caller instance of ``group`` (rows of :func:`caller_group_columns` with
    ``batched_ns``): the caller and its calls, collapsed into one call of ``batched_ns``;
    ``numbers``: each number's column and divisor (the value ``float(column) / divisor``, as
    Python divides). Made in columns, no object per occurrence (:meth:`Occurrences.from_columns`)."""
    keyed = ["trace_id", "caller_span_id", "span_id", "batched_ns"]

    def make(start: int, length: int) -> Occurrences:
        part = group.slice(start, length)
        made = part.select(
            pl.concat_list(pl.col("caller_span_id"), pl.col("span_id")).alias("_spans"),
            pl.col("batched_ns").cast(pl.Int64).alias("_batched"),  # (int(): toward zero)
        )
        return Occurrences.from_columns(
            part["trace_id"],
            made["_spans"],
            intervention=CollapseSpans,
            first=1,
            dropped=0,
            parameter=made["_batched"],
            numbers=per_unit(part, numbers),
            keys=occurrence_keys(part, keyed),
        )

    return occurrences_by_chunk(group.height, make)


def per_unit(frame: pl.DataFrame, numbers: dict[str, tuple[str, float]]) -> dict[str, np.ndarray]:
    """Number name -> ``float(value) / divisor`` of its column's values, divided by numpy (as
    Python's ``/``: polars divides by a constant as a multiplication by its inverse, which can
    differ in the last bit); a divisor of 1 is the float itself."""
    return {
        name: frame[column].cast(pl.Float64).to_numpy() / divisor
        if divisor != 1
        else frame[column].cast(pl.Float64).to_numpy()
        for name, (column, divisor) in numbers.items()
    }


def parameter_stats(group: pl.DataFrame) -> tuple[float, bool, float]:
    """Of a batching candidate's caller instances (``distinct_params``, ``params_known``,
    ``calls``): the share whose calls carry different parameters, whether any call's parameters
    are known at all, and the median number of calls."""
    return (
        num((group["distinct_params"] > 1).mean()),
        bool(group["params_known"].any()),
        num(group["calls"].median()),
    )


def caller_finding(
    kind: str,
    caller: tuple[Any, Any],
    targets: list[dict[str, str]],
    occurrences: Sequence[Occurrence],
    confidence: float,
    evidence: dict[str, Any],
    signature_extra: Any,
    inferred_roles: bool,
) -> Finding:
    """A finding about the calls one caller operation makes (``serialized_calls``, ``n_plus_one``,
    ``batchable_calls``): ``caller`` is its (service, operation), ``signature_extra`` tells its
    call patterns apart, and ``inferred_roles`` (a call's kind inferred from structure) is marked
    last in the evidence."""
    if inferred_roles:
        evidence["inferred_roles"] = True
    return Finding(
        kind=kind,
        category="parallelization",
        service=str(caller[0]),
        operation=str(caller[1]),
        targets=targets,
        occurrences=occurrences,
        confidence=confidence,
        evidence=evidence,
        signature_extra=str(signature_extra),
    )
