"""Trace repair: small composable adjusters in the spirit of Jaeger's query-side adjusters.

Each adjuster is a function of the span frame (or of the numpy arrays derived from it) and does one
thing; :func:`hourglass.analysis.context.AnalysisContext.from_table` runs them in this order:

1. :func:`split_shared_spans` — Zipkin "shared" spans: a CLIENT and a SERVER span carrying the same
   span id. The server half gets a new id (``<id>:server``) and the client as its parent; the server
   service's children of that id are re-pointed at the server half (Jaeger's SpanIDDeduper).
2. :func:`deduplicate` — one row per (trace_id, span_id): the same span delivered twice (exporter
   retries, overlapping files) is kept once, the longest copy winning.
3. :func:`link_parents` — parent row index per span; a span whose parent id is absent from the trace
   is an **orphan**: kept as the root of its own subtree and flagged, and its trace is marked
   incomplete. A span naming itself as parent, and parent cycles, are cut the same way.
4. :func:`tree_depth_and_root` — depth and subtree root by pointer jumping (O(n log depth), no
   recursion, fine for 10,000-deep chains).
5. :func:`clock_skew_shift` — Jaeger's ClockSkew rule: a child on another host or service that does
   not fit inside its parent is moved inside it. When the child is shorter than the parent, the
   network latency is assumed split evenly (child start = parent start + (parent − child) / 2); when it
   is longer, only its start is aligned with the parent's. A subtree moves with its root (the
   shifts add up along the path), so spans of one host keep their relative positions. Asynchronous
   relations (FOLLOWS_FROM, messaging) are never adjusted: a consumer may legitimately run later.
6. :func:`infer_kinds` — roles for spans recorded without a kind (OpenTracing shims, Zipkin without
   ``kind``, CSV dumps): an UNSPECIFIED span whose parent runs in another service is the **server**
   side of a call (the consumer side under a PRODUCER); an UNSPECIFIED span with a child in another
   service (a child that is not a consumer) is the **client** side; an UNSPECIFIED leaf named like a
   database operation (``DB_NAME_PATTERN``: ``SELECT shop.orders``, a statement, ``sql.conn.query``)
   is a database **client** call. Spans with a recorded kind are never changed; the inferred ones are
   flagged (``kind_inferred``) so findings can say their roles came from structure.
7. :func:`blocking_flags` — whether the parent waits for the child. Not blocking: FOLLOWS_FROM
   references, messaging hand-offs (a CONSUMER child or a PRODUCER parent across services, or a
   PRODUCER→CONSUMER pair), and children that end after their (skew-corrected) parent ends by more
   than the tolerance: the parent did not wait for them. Also not blocking: a **call mirror**
   (:func:`call_mirrors`) — a childless in-process span beside a client call of the same parent and
   service that spans the same interval (reactive handlers such as Spring Cloud Gateway's
   ``FilteringWebHandler.handle`` next to the proxied ``HTTP POST``): its time *is* the call's, so
   the parent waits on the call, and a what-if that shortens the call is not held back by its mirror.

Tolerance (:func:`tolerance_ns`): 1 % of the parent's duration, at least 1 µs and at most 1 ms —
timestamps from different processes routinely disagree by tens of microseconds, and a 1 % overlap
does not change which call a parent waited for.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from hourglass.collector.schema import (
    KIND_CLIENT,
    KIND_CONSUMER,
    KIND_INTERNAL,
    KIND_PRODUCER,
    KIND_SERVER,
    KIND_UNSPECIFIED,
)

TOLERANCE_FRACTION = 0.01
TOLERANCE_MIN_NS = 1_000
TOLERANCE_MAX_NS = 1_000_000
SHARED_SERVER_SUFFIX = ":server"
_MAX_JUMPS = 64  # 2**64 levels: pointer jumping always converges before this unless there is a cycle


def tolerance_ns(parent_duration_ns: np.ndarray) -> np.ndarray:
    """Per-parent overlap tolerance (see module docstring)."""
    return np.clip(
        (parent_duration_ns * TOLERANCE_FRACTION).astype(np.int64), TOLERANCE_MIN_NS, TOLERANCE_MAX_NS
    )


def split_shared_spans(df: pl.DataFrame) -> pl.DataFrame:
    """Give the SERVER half of a Zipkin shared span its own id, parented by the CLIENT half."""
    key = ["trace_id", "span_id"]
    clients = df.filter(pl.col("kind") == KIND_CLIENT).select(key).unique()
    servers = df.filter(pl.col("kind") == KIND_SERVER).join(clients, on=key, how="semi")
    if servers.height == 0:
        return df
    shared = servers.select(
        "trace_id",
        pl.col("span_id").alias("_shared_id"),
        pl.col("service").alias("_server_service"),
    ).unique(subset=["trace_id", "_shared_id"], keep="first")
    new_id = pl.col("span_id") + SHARED_SERVER_SUFFIX
    is_server_half = (pl.col("kind") == KIND_SERVER) & pl.col("_server_service").is_not_null()
    out = (
        df.join(
            shared,
            left_on=["trace_id", "span_id"],
            right_on=["trace_id", "_shared_id"],
            how="left",
            maintain_order="left",
        )
        .with_columns(
            pl.when(is_server_half)
            .then(pl.col("span_id"))
            .otherwise(pl.col("parent_span_id"))
            .alias("parent_span_id"),
            pl.when(is_server_half).then(new_id).otherwise(pl.col("span_id")).alias("span_id"),
        )
        .drop("_server_service")
    )
    # Children recorded by the server's process point at the shared id: re-point them at the server half.
    out = out.join(
        shared,
        left_on=["trace_id", "parent_span_id"],
        right_on=["trace_id", "_shared_id"],
        how="left",
        maintain_order="left",
    )
    repoint = (
        pl.col("_server_service").is_not_null()
        & (pl.col("service") == pl.col("_server_service"))
        & ~pl.col("span_id").str.ends_with(SHARED_SERVER_SUFFIX)
    )
    return out.with_columns(
        pl.when(repoint)
        .then(pl.col("parent_span_id") + SHARED_SERVER_SUFFIX)
        .otherwise(pl.col("parent_span_id"))
        .alias("parent_span_id")
    ).drop("_server_service")


def deduplicate(df: pl.DataFrame) -> pl.DataFrame:
    """One row per (trace_id, span_id); of several copies the longest one is kept."""
    # Distinct hashes prove there is no duplicate (cheap); equal hashes are checked exactly.
    if df.select(pl.struct("trace_id", "span_id").hash().n_unique()).item() == df.height:
        return df
    if df.select(pl.struct("trace_id", "span_id").n_unique()).item() == df.height:
        return df
    df = split_shared_spans(df)
    return (
        df.with_row_index("_order")
        .sort(
            ["trace_id", "span_id", pl.col("end_ns") - pl.col("start_ns"), "_order"],
            descending=[False, False, True, False],
        )
        .unique(subset=["trace_id", "span_id"], keep="first", maintain_order=True)
        .sort("_order")
        .drop("_order")
    )


_MIX = np.uint64(0x9E3779B97F4A7C15)


def span_keys(df: pl.DataFrame) -> pl.DataFrame:
    """The lookup keys :func:`link_parents` matches, one row per row of ``df`` (which must hold each
    trace's rows together): ``trace`` (the trace's position), ``key`` (that
    position mixed with a 64-bit hash of the span id), ``parent_key`` (the same of the parent id),
    ``s2``/``p2`` (independently seeded hashes of the ids), ``has_parent_id``, ``self_parent``.
    Distinct keys prove that no two rows share (trace_id, span_id) (:func:`distinct_keys`)."""
    if df["trace_id"].null_count() == 0:
        trace = pl.col("trace_id").rle_id().cast(pl.UInt64)
    else:  # (each null id its own run, as link_parents always counted them)
        trace = ((pl.col("trace_id") != pl.col("trace_id").shift(1)).fill_null(True).cum_sum() - 1).cast(
            pl.UInt64
        )
    mixed = trace * pl.lit(int(_MIX), dtype=pl.UInt64)  # wraps around, as numpy's uint64 does
    return df.select(
        trace.alias("trace"),
        (mixed + pl.col("span_id").hash()).alias("key"),
        (mixed + pl.col("parent_span_id").hash()).alias("parent_key"),
        pl.col("span_id").hash(seed=0x5EED).alias("s2"),
        pl.col("parent_span_id").hash(seed=0x5EED).alias("p2"),
        (pl.col("parent_span_id").is_not_null() & (pl.col("parent_span_id") != "")).alias("has_parent_id"),
        (pl.col("parent_span_id") == pl.col("span_id")).fill_null(False).alias("self_parent"),
    )


def distinct_keys(keys: pl.DataFrame) -> bool:
    """Whether every row of :func:`span_keys` has its own ``key``."""
    return bool(keys["key"].n_unique() == keys.height)


def link_parents(
    df: pl.DataFrame, keys: pl.DataFrame | None = None, distinct: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parent row index per row (-1: none) and the orphan flag (had a parent id that is absent).

    ``df`` must hold each trace's rows together (the context sorts by trace first). The lookup key
    is the trace's position mixed with a 64-bit hash of the span id — integers, far cheaper than
    joining string columns — and every match is verified with an independently seeded hash of the
    ids and the trace position, so a collision can only lose a link (the span becomes an orphan),
    never make a wrong one. ``keys``: ``span_keys(df)``, when already made (``distinct``: its
    :func:`distinct_keys`, when known)."""
    ids = span_keys(df) if keys is None else keys
    trace = ids["trace"].to_numpy()
    has_parent_id = ids["has_parent_id"].to_numpy()
    if (
        distinct_keys(ids) if distinct is None else distinct
    ):  # (always, but for a hash collision) each parent key matches one row at most
        rows = pl.int_range(pl.len(), dtype=pl.Int64).alias("row")
        matched = ids.select(pl.col("parent_key").alias("key")).join(
            ids.select("key", rows), on="key", how="left", maintain_order="left"
        )
        up = matched["row"].fill_null(-1).to_numpy()
        found = up >= 0
    else:
        key = ids["key"].to_numpy()
        parent_key = ids["parent_key"].to_numpy()
        order = np.argsort(key)
        sorted_key = key[order]
        query_order = np.argsort(parent_key)  # sorted queries: searchsorted walks memory in order
        pos = np.empty(parent_key.size, dtype=np.int64)
        pos[query_order] = np.searchsorted(sorted_key, parent_key[query_order])
        pos = np.minimum(pos, max(key.size - 1, 0))
        found = (sorted_key[pos] == parent_key) if key.size else np.zeros(0, dtype=bool)
        up = order[pos] if key.size else np.zeros(0, dtype=np.int64)
    parent = np.where(found & has_parent_id & ~ids["self_parent"].to_numpy(), up, -1).astype(np.int64)
    linked = np.nonzero(parent >= 0)[0]
    if linked.size:
        up = parent[linked]
        wrong = (trace[linked] != trace[up]) | (ids["p2"].to_numpy()[linked] != ids["s2"].to_numpy()[up])
        parent[linked[wrong]] = -1
    orphan = has_parent_id & (parent < 0)
    return parent, orphan


def pointer_fixpoint(nxt: np.ndarray) -> np.ndarray:
    """Follow ``nxt`` until it stops moving (``nxt[i] == i`` marks an end), by pointer doubling:
    log2(longest chain) vectorised steps, no recursion; at most ``_MAX_JUMPS`` (a cycle never
    stops moving)."""
    for _ in range(_MAX_JUMPS):
        jumped = nxt[nxt]
        if np.array_equal(jumped, nxt):
            break
        nxt = jumped
    return nxt


def _break_cycles(parent: np.ndarray, start_ns: np.ndarray) -> np.ndarray:
    """Cut parent links that never reach a root. Every cycle has an edge whose parent does not start
    before its child; cutting those edges among unresolved spans breaks every cycle."""
    top = pointer_fixpoint(np.where(parent >= 0, parent, np.arange(parent.size)))
    unresolved = parent[top] >= 0
    if not unresolved.any():
        return parent
    parent = parent.copy()
    cut = unresolved & (parent >= 0)
    cut[cut] = start_ns[parent[cut]] >= start_ns[cut]
    parent[cut] = -1
    return _break_cycles(parent, start_ns) if cut.any() else parent


def pointer_jump_sum(parent: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sum of ``values`` over each row and all its ancestors (list ranking by pointer jumping)."""
    total = values.copy()
    anc = parent.copy()
    for _ in range(_MAX_JUMPS):
        idx = np.nonzero(anc >= 0)[0]
        if idx.size == 0:
            break
        up = anc[idx]
        total[idx] = total[idx] + total[up]
        anc[idx] = anc[up]
    return total


def pointer_jump_all(parent: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """True where ``flags`` holds for the row and every ancestor."""
    ok = flags.copy()
    anc = parent.copy()
    for _ in range(_MAX_JUMPS):
        idx = np.nonzero((anc >= 0) & ok)[0]
        if idx.size == 0:
            break
        up = anc[idx]
        ok[idx] = ok[up]
        anc[idx] = anc[up]
    return ok


def tree_depth_and_root(
    parent: np.ndarray, start_ns: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(parent with cycles cut, depth, subtree root row) for every row."""
    parent = _break_cycles(parent, start_ns)
    rows = np.arange(parent.size)
    depth = pointer_jump_sum(parent, (parent >= 0).astype(np.int64))
    root = pointer_fixpoint(np.where(parent >= 0, parent, rows))
    return parent, depth.astype(np.int32), root


# An UNSPECIFIED leaf with this name is a database call: a statement or a semantic-convention summary
# (``{operation} {namespace}.{table}``, upper-case keyword as the conventions and drivers write it), or
# a driver span name (Go's otelsql ``sql.conn.query``, ``jdbc.query``, ``sql.query``, ``db.query``).
STATEMENT_NAME = r"^\s*(?:SELECT|INSERT|UPDATE|DELETE|MERGE|UPSERT|REPLACE|CALL|EXEC|EXECUTE|WITH)\s+\S"
DB_NAME_PATTERN = (
    STATEMENT_NAME
    + r"|^(?i:(?:sql|jdbc|db|mysql|pg|postgres|postgresql|sqlite)(?:\.conn)?\.(?:query|exec|execute|statement))$"
)


def infer_kinds(
    parent: np.ndarray, kind: np.ndarray, service_code: np.ndarray, db_named: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(kind with roles inferred for UNSPECIFIED spans, inferred flag) — rule 6 of the module docstring.
    ``db_named``: the span's name matches ``DB_NAME_PATTERN``."""
    kind = kind.astype(np.int8, copy=True)
    unspecified = kind == KIND_UNSPECIFIED
    if not unspecified.any():
        return kind, np.zeros(kind.size, dtype=bool)
    has = parent >= 0
    p = np.where(has, parent, 0)
    cross = has & (service_code != service_code[p])
    server = unspecified & cross & (kind[p] != KIND_PRODUCER)
    consumer = unspecified & cross & (kind[p] == KIND_PRODUCER)
    calls_out = np.zeros(kind.size, dtype=bool)
    calls_out[p[cross & (kind != KIND_CONSUMER) & ~consumer]] = True
    has_child = np.zeros(kind.size, dtype=bool)
    has_child[p[has]] = True
    client = unspecified & ~server & ~consumer & (calls_out | (~has_child & db_named))
    kind[server] = KIND_SERVER
    kind[consumer] = KIND_CONSUMER
    kind[client] = KIND_CLIENT
    return kind, server | consumer | client


def messaging_or_follows(
    parent: np.ndarray, kind: np.ndarray, service_code: np.ndarray, follows_from: np.ndarray
) -> np.ndarray:
    """Relations the parent never waits for by construction: FOLLOWS_FROM and messaging hand-offs."""
    has = parent >= 0
    p = np.where(has, parent, 0)
    pkind = kind[p]
    cross_service = service_code != service_code[p]
    messaging = (
        ((kind == KIND_CONSUMER) & cross_service)
        | ((pkind == KIND_PRODUCER) & cross_service)
        | ((pkind == KIND_PRODUCER) & (kind == KIND_CONSUMER))
    )
    return has & (follows_from | messaging)


def clock_skew_shift(
    parent: np.ndarray,
    start_ns: np.ndarray,
    end_ns: np.ndarray,
    host_code: np.ndarray,
    service_code: np.ndarray,
    asynchronous: np.ndarray,
) -> np.ndarray:
    """Nanoseconds to add to each span's start and end (see rule 5 in the module docstring)."""
    has = parent >= 0
    p = np.where(has, parent, 0)
    other_clock = (host_code != host_code[p]) | (service_code != service_code[p])
    candidate = has & other_clock & ~asynchronous
    ps, pe = start_ns[p], end_ns[p]
    pdur, cdur = pe - ps, end_ns - start_ns
    outside = (start_ns < ps) | (end_ns > pe)
    longer = cdur > pdur
    centred = ps + (pdur - cdur) // 2 - start_ns
    aligned = np.where(start_ns < ps, ps - start_ns, 0)
    local = np.where(candidate & outside, np.where(longer, aligned, centred), 0).astype(np.int64)
    if not local.any():
        return local
    return pointer_jump_sum(parent, local)


MIRROR_TOLERANCE_FRACTION = 0.02
MIRROR_TOLERANCE_MIN_NS = 1_000_000


def call_mirrors(
    parent: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray, kind: np.ndarray, service_code: np.ndarray
) -> np.ndarray:
    """True for a childless INTERNAL/UNSPECIFIED span that mirrors a CLIENT sibling of its service:
    it starts no later than the call (within tolerance), ends with it (within ``max(1 ms, 2 %)`` of
    its duration) and the call covers at least 90 % of it."""
    has = parent >= 0
    has_child = np.zeros(parent.size, dtype=bool)
    has_child[parent[has]] = True
    leaf = np.nonzero(has & ~has_child & ((kind == KIND_UNSPECIFIED) | (kind == KIND_INTERNAL)))[0]
    calls = np.nonzero(has & (kind == KIND_CLIENT))[0]
    out = np.zeros(parent.size, dtype=bool)
    if leaf.size == 0 or calls.size == 0:
        return out
    left = pl.DataFrame({"p": parent[leaf], "s": service_code[leaf], "row": leaf})
    right = pl.DataFrame({"p": parent[calls], "s": service_code[calls], "call": calls})
    pairs = left.join(right, on=["p", "s"], how="inner")
    if pairs.height == 0:
        return out
    row, call = pairs["row"].to_numpy(), pairs["call"].to_numpy()
    dur = end_ns[row] - start_ns[row]
    tol = np.maximum((dur * MIRROR_TOLERANCE_FRACTION).astype(np.int64), MIRROR_TOLERANCE_MIN_NS)
    mirror = (
        (start_ns[row] <= start_ns[call] + tol)
        & (np.abs(end_ns[row] - end_ns[call]) <= tol)
        & ((end_ns[call] - start_ns[call]) >= 0.9 * dur)
        & (row != call)
    )
    out[row[mirror]] = True
    return out


def blocking_flags(
    parent: np.ndarray, start_ns: np.ndarray, end_ns: np.ndarray, asynchronous: np.ndarray
) -> np.ndarray:
    """True where the parent waits for the child (roots: True). Times are skew-corrected."""
    has = parent >= 0
    p = np.where(has, parent, 0)
    tol = tolerance_ns(end_ns[p] - start_ns[p])
    outlives = end_ns > end_ns[p] + tol
    return ~has | (~asynchronous & ~outlives)
