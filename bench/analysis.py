"""Whole-analysis time on a generated store: `make bench-analysis` (`python -m bench.analysis`).

What it does, in one run:

1. generates span stores of 250k, 500k and 1M spans (``--sizes``) — about 20 spans a trace
   (≈ 50,000 traces at 1M) in mixed shapes: serialized calls (order varying in some traces),
   N+1 queries, fan-outs with a hot shard, 3-at-a-time pools, lock waits, immediate retries, errors
   reaching the root, hung calls, and healthy traces (parallel calls, big balanced trees). The
   generator is vectorised: one small template per shape, crossed with the trace numbers in polars;
2. for each size, in a fresh process (so its peak RSS is its own): loads the spans from the DuckDB
   store (timed: **load**), times the **reference pass** — one polars pass that joins every span to
   its parent and flags children that start after their previous sibling ended — and then the
   **whole analysis** (repair + critical path + all detectors + what-if + ranking + template
   writer, i.e. ``hourglass.analysis.pipeline.analyze``) on the same in-memory frame, so the ratio compares
   like with like; it prints both (best of 3 alternating rounds, every run shown), their ratio,
   the load time and the total (load + analysis) beside them, the recommendations found and the
   peak RSS.

Targets (issue 3): whole analysis ≤ 10× the reference pass, peak memory ≤ 4 GiB, time growing
linearly with spans.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from hourglass.collector.schema import (
    ANALYSIS_COLUMNS,
    KIND_CLIENT,
    KIND_INTERNAL,
    KIND_SERVER,
    SPAN_SCHEMA,
    STATUS_ERROR,
    STATUS_UNSET,
)

TARGET_RATIO = 10.0
# Best of several runs on both sides: the machines are shared, and a single run mostly measures
# the neighbours. The runs alternate (reference, analysis, reference, ...) so a busy or a quiet
# spell lands on both sides alike instead of flattering one of them.
ROUNDS = 3
TARGET_RSS_GIB = 4.0
BASE_NS = 1_764_000_000_000_000_000
GOLDEN = 0x9E3779B97F4A7C15

S, C, N = KIND_SERVER, KIND_CLIENT, KIND_INTERNAL
# A template row: (parent index, service, name, kind, start ms, duration ms, extra columns)
Row = tuple[int, str, str, int, float, float, dict[str, Any]]


def _serialized() -> list[Row]:
    return [
        (-1, "frontend", "GET /checkout", S, 0, 200, {"http_method": "GET", "http_route": "/checkout"}),
        (
            0,
            "frontend",
            "GET users",
            C,
            5,
            50,
            {"http_method": "GET", "http_url": "http://users/api/users/{n}"},
        ),
        (1, "users", "GET /api/users/{id}", S, 6, 48, {"http_route": "/api/users/{id}"}),
        (
            2,
            "users",
            "SELECT",
            C,
            8,
            40,
            {"db_system": "postgresql", "db_statement": "SELECT * FROM users WHERE id = {n}"},
        ),
        (
            0,
            "frontend",
            "GET cart",
            C,
            56,
            70,
            {"http_method": "GET", "http_url": "http://cart/api/carts/{n}"},
        ),
        (4, "cart", "GET /api/carts/{id}", S, 57, 68, {"http_route": "/api/carts/{id}"}),
        (5, "cart", "redis GET", C, 58, 60, {"db_system": "redis", "db_statement": "GET cart:{n}"}),
        (
            0,
            "frontend",
            "GET recommendations",
            C,
            127,
            60,
            {"http_method": "GET", "http_url": "http://recs/api/recs?u={n}"},
        ),
        (7, "recs", "GET /api/recs", S, 128, 58, {"http_route": "/api/recs"}),
        (8, "recs", "model.predict", N, 130, 50, {}),
        (0, "frontend", "render", N, 188, 10, {}),
    ]


def _n_plus_one() -> list[Row]:
    rows: list[Row] = [
        (-1, "orders", "GET /orders", S, 0, 130, {"http_method": "GET", "http_route": "/orders"}),
        (
            0,
            "orders",
            "SELECT orders",
            C,
            2,
            8,
            {"db_system": "mysql", "db_statement": "SELECT * FROM orders WHERE user_id = {n}"},
        ),
    ]
    for k in range(14):
        rows.append(
            (
                0,
                "orders",
                "SELECT items",
                C,
                11 + k * 8.5,
                8,
                {"db_system": "mysql", "db_statement": "SELECT * FROM items WHERE order_id = {n}" + f"{k}"},
            )
        )
    return rows


def _straggler() -> list[Row]:
    rows: list[Row] = [
        (-1, "search", "GET /search", S, 0, 260, {"http_method": "GET", "http_route": "/search"})
    ]
    for k in range(8):
        dur = 240 if k == 3 else 40 + 3 * k
        rows.append(
            (0, "search", "query shard", C, 5, dur, {"peer": f"shard-{k}", "hints": json.dumps({"shard": k})})
        )
    for k in range(8):
        dur = 238 if k == 3 else 38 + 3 * k
        rows.append(
            (1 + k, f"index-{k % 4}", "Search", S, 6, dur, {"rpc_method": "Search", "host": f"shard-{k}"})
        )
    return rows


def _pool() -> list[Row]:
    rows: list[Row] = [
        (-1, "thumbs", "POST /thumbnails", S, 0, 205, {"http_method": "POST", "http_route": "/thumbnails"})
    ]
    for k in range(12):
        wave = k // 3
        rows.append(
            (
                0,
                "thumbs",
                "resize",
                C,
                2 + wave * 50,
                48,
                {"peer": "imaging", "http_url": "http://imaging/resize"},
            )
        )
    return rows


def _lock() -> list[Row]:
    return [
        (-1, "inventory", "POST /reserve", S, 0, 120, {"http_method": "POST", "http_route": "/reserve"}),
        (
            0,
            "inventory",
            "UPDATE stock",
            C,
            5,
            105,
            {
                "db_system": "postgresql",
                "db_statement": "UPDATE stock SET n = n - 1 WHERE sku = {n}",
                "hints": json.dumps({"db.lock_wait_ms": 90}),
            },
        ),
        (0, "inventory", "publish", N, 111, 5, {}),
    ]


def _retry() -> list[Row]:
    err = {"status_code": STATUS_ERROR, "http_status_code": 503}
    return [
        (-1, "payments", "POST /pay", S, 0, 140, {"http_method": "POST", "http_route": "/pay"}),
        (
            0,
            "payments",
            "POST charge",
            C,
            2,
            30,
            {"http_method": "POST", "http_url": "http://bank/charge", **err},
        ),
        (
            0,
            "payments",
            "POST charge",
            C,
            33,
            30,
            {"http_method": "POST", "http_url": "http://bank/charge", **err},
        ),
        (
            0,
            "payments",
            "POST charge",
            C,
            64,
            30,
            {"http_method": "POST", "http_url": "http://bank/charge", **err},
        ),
        (0, "payments", "POST charge", C, 95, 40, {"http_method": "POST", "http_url": "http://bank/charge"}),
    ]


def _error() -> list[Row]:
    return [
        (
            -1,
            "gateway",
            "GET /profile",
            S,
            0,
            60,
            {
                "http_method": "GET",
                "http_route": "/profile",
                "status_code": STATUS_ERROR,
                "http_status_code": 500,
            },
        ),
        (
            0,
            "gateway",
            "GET profile",
            C,
            2,
            55,
            {
                "http_method": "GET",
                "http_url": "http://profile/p/{n}",
                "status_code": STATUS_ERROR,
                "http_status_code": 500,
            },
        ),
        (1, "profile", "GET /p/{id}", S, 3, 53, {"http_route": "/p/{id}", "status_code": STATUS_ERROR}),
        (
            2,
            "profile",
            "SELECT",
            C,
            5,
            48,
            {
                "db_system": "postgresql",
                "db_statement": "SELECT * FROM profiles WHERE id = {n}",
                "status_code": STATUS_ERROR,
            },
        ),
    ]


def _inventory(stock_ms: float) -> list[Row]:
    """GET /inventory calling the stock service; ``stock_ms`` is 20 in most traces and seconds in a
    few (the "hung" shape): the same operation, so the few are outliers far past its usual time."""
    return [
        (-1, "shop", "GET /inventory", S, 0, stock_ms + 15, {"http_method": "GET", "http_route": "/inventory"}),
        (0, "shop", "GET stock", C, 5, stock_ms, {"http_method": "GET", "http_url": "http://stock/levels", "peer": "stock"}),
        (0, "shop", "render", N, stock_ms + 7, 5, {}),
    ]  # fmt: skip


def _batch() -> list[Row]:
    """GET /cart fetching its 8 items from the catalog at once, one GET per item id: a batch
    endpoint would take them in one call (batchable_calls)."""
    rows: list[Row] = [(-1, "cart", "GET /cart", S, 0, 70, {"http_method": "GET", "http_route": "/cart"})]
    for k in range(8):
        rows.append(
            (0, "cart", "GET item", C, 5 + 0.1 * k, 60 if k == 7 else 20 + k,
             {"http_method": "GET", "http_url": f"http://catalog/items/{{n}}{k}", "peer": "catalog"})
        )  # fmt: skip
    return rows


def _healthy_parallel() -> list[Row]:
    rows: list[Row] = [(-1, "frontend", "GET /home", S, 0, 80, {"http_method": "GET", "http_route": "/home"})]
    for k, svc in enumerate(["ads", "news", "weather", "stocks"]):
        rows.append(
            (
                0,
                "frontend",
                f"GET {svc}",
                C,
                3 + k,
                60 + 2 * k,
                {"http_method": "GET", "http_url": f"http://{svc}/api"},
            )
        )
        rows.append((1 + 2 * k, svc, "GET /api", S, 4 + k, 58 + 2 * k, {"http_route": "/api"}))
    return rows


def _healthy_big() -> list[Row]:
    rows: list[Row] = [
        (-1, "batch", "POST /import", S, 0, 400, {"http_method": "POST", "http_route": "/import"})
    ]
    for k in range(10):  # ten stages, each a small parallel tree
        stage = len(rows)
        rows.append((0, "batch", f"stage {k}", N, 2 + k * 39, 38, {}))
        for j in range(5):
            rows.append((stage, "batch", "work", N, 3 + k * 39, 30 + j, {}))
    return rows


SHAPES: dict[str, tuple[float, list[Row]]] = {
    # name: (share of traces, template); about 20 spans a trace on average
    "serialized": (0.14, _serialized()),
    "n_plus_one": (0.12, _n_plus_one()),
    "straggler": (0.10, _straggler()),
    "pool": (0.08, _pool()),
    "lock": (0.08, _lock()),
    "retry": (0.07, _retry()),
    "error": (0.05, _error()),
    "inventory": (0.05, _inventory(20)),
    "hung": (0.003, _inventory(2_500)),
    "batch": (0.03, _batch()),
    "healthy_parallel": (0.16, _healthy_parallel()),
    "healthy_big": (0.20, _healthy_big()),
}


def _hex16(values: np.ndarray) -> pl.Series:
    """uint64 -> 16 lowercase hex characters, vectorised (big-endian bytes, hex-encoded)."""
    raw = values.astype(">u8").tobytes()
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(values), [None, pa.py_buffer(raw)])
    series = pl.Series(arr.cast(pa.binary()))
    return series.bin.encode("hex")


def _template_frame(rows: list[Row]) -> pl.DataFrame:
    extra_cols = (
        "db_system",
        "db_statement",
        "http_method",
        "http_route",
        "http_url",
        "http_status_code",
        "rpc_method",
        "peer",
        "hints",
        "host",
        "status_code",
    )
    data: dict[str, list[Any]] = {
        "tpl": list(range(len(rows))),
        "tpl_parent": [r[0] for r in rows],
        "service": [r[1] for r in rows],
        "name": [r[2] for r in rows],
        "kind": [r[3] for r in rows],
        "rel_start_ms": [float(r[4]) for r in rows],
        "dur_ms": [float(r[5]) for r in rows],
    }
    for col in extra_cols:
        data[col] = [r[6].get(col) for r in rows]
    return pl.DataFrame(
        data,
        schema_overrides={
            "http_status_code": pl.Int32,
            "status_code": pl.Int8,
            "kind": pl.Int8,
            "tpl": pl.Int64,
            "tpl_parent": pl.Int64,
            "db_system": pl.String,
            "db_statement": pl.String,
            "http_method": pl.String,
            "http_route": pl.String,
            "http_url": pl.String,
            "rpc_method": pl.String,
            "peer": pl.String,
            "hints": pl.String,
            "host": pl.String,
        },
    )


def generate_spans(target_spans: int, seed: int = 7, first_trace: int = 0) -> pa.Table:
    """About ``target_spans`` spans (whole traces) of mixed shapes as a SPAN_SCHEMA table; trace
    numbers start at ``first_trace``, so chunks generated with different starts never collide."""
    rng = np.random.default_rng(seed)
    mean_size = sum(share * len(rows) for share, rows in SHAPES.values())
    n_traces = max(len(SHAPES), int(target_spans / mean_size))
    frames = []
    next_trace = first_trace
    for name, (share, rows) in SHAPES.items():
        count = max(1, round(n_traces * share))
        trace_no = np.arange(next_trace, next_trace + count, dtype=np.uint64)
        next_trace += count
        per_trace = pl.DataFrame(
            {
                "trace_no": trace_no,
                "scale": rng.uniform(0.8, 1.3, count),
                "offset_ns": (np.sort(rng.uniform(0, 3.6e12, count))).astype(np.int64),  # over one hour
                # the serialized shape swaps its first two calls in a fifth of the traces
                "swap": rng.random(count) < (0.2 if name == "serialized" else 0.0),
            }
        )
        frames.append(
            per_trace.join(_template_frame(rows), how="cross").with_columns(pl.lit(name).alias("shape"))
        )
    df = pl.concat(frames, how="vertical_relaxed")
    # swapped order: "GET users" subtree starts where "GET cart" started and vice versa
    swap_shift = (
        pl.when(pl.col("swap") & pl.col("tpl").is_in([1, 2, 3]))
        .then(pl.lit(51.0))
        .when(pl.col("swap") & pl.col("tpl").is_in([4, 5, 6]))
        .then(pl.lit(-51.0))
        .otherwise(pl.lit(0.0))
    )
    df = df.with_columns(
        (
            pl.lit(BASE_NS)
            + pl.col("offset_ns")
            + ((pl.col("rel_start_ms") + swap_shift) * pl.col("scale") * 1e6).cast(pl.Int64)
        ).alias("start_ns"),
        (pl.col("dur_ms") * pl.col("scale") * 1e6).cast(pl.Int64).alias("_dur"),
    ).with_columns((pl.col("start_ns") + pl.col("_dur")).alias("end_ns"))
    trace_no = df["trace_no"].to_numpy().astype(np.uint64)
    tpl = df["tpl"].to_numpy().astype(np.uint64)
    tpl_parent = df["tpl_parent"].to_numpy()
    mult = np.uint64(GOLDEN)
    with np.errstate(over="ignore"):
        span_key = (trace_no * np.uint64(256) + tpl + np.uint64(1)) * mult
        parent_key = (
            trace_no * np.uint64(256) + np.maximum(tpl_parent, 0).astype(np.uint64) + np.uint64(1)
        ) * mult
        trace_key = (trace_no + np.uint64(1)) * mult
    n = df.height
    text_n = pl.col("trace_no").cast(pl.String)
    out = df.with_columns(
        (pl.lit("5bd1e995") + _hex16(trace_key) + pl.lit("00c0ffee")).alias("trace_id"),
        _hex16(span_key).alias("span_id"),
        pl.when(pl.col("tpl_parent") >= 0).then(_hex16(parent_key)).otherwise(None).alias("parent_span_id"),
        pl.col("db_statement").str.replace_all("{n}", text_n, literal=True),
        pl.col("http_url").str.replace_all("{n}", text_n, literal=True),
        pl.col("status_code").fill_null(STATUS_UNSET),
        pl.lit(None, dtype=pl.String).alias("status_message"),
        pl.lit("bench").alias("scope_name"),
        pl.lit(None, dtype=pl.String).alias("messaging_destination"),
        pl.lit(None, dtype=pl.String).alias("event_hints"),
        pl.lit(False).alias("follows_from"),
        pl.lit(None, dtype=pl.String).alias("resource_json"),
        pl.lit(b"", dtype=pl.Binary).alias("raw"),
        (pl.lit(BASE_NS) + pl.col("offset_ns")).alias("ingested_ns"),
    )
    del tpl_parent
    table = out.select(
        [c for c in SPAN_SCHEMA.names if c not in ("event_names", "event_times_ns", "links")]
    ).to_arrow()
    empty_str = pa.array([[]] * 1, type=pa.list_(pa.string()))
    lists = {
        "event_names": pa.ListArray.from_arrays(np.zeros(n + 1, dtype=np.int32), pa.array([], pa.string())),
        "event_times_ns": pa.ListArray.from_arrays(np.zeros(n + 1, dtype=np.int32), pa.array([], pa.int64())),
        "links": pa.ListArray.from_arrays(np.zeros(n + 1, dtype=np.int32), pa.array([], pa.string())),
    }
    del empty_str
    arrays = [lists[f.name] if f.name in lists else table.column(f.name) for f in SPAN_SCHEMA]
    return pa.Table.from_arrays(arrays, names=SPAN_SCHEMA.names).cast(SPAN_SCHEMA)


# Traces of thousands to 100k spans (a report's N+1 over a whole table, a fan-out to thousands of
# calls, a batch import of rows of inserts), which real stores hold beside their many small ones:
# ``generate_large_traces``, ``build_store(large_share=...)``
LARGE_TRACE_SPANS = (2_000, 10_000, 50_000, 100_000)


def generate_large_traces(target_spans: int, seed: int = 7, first_trace: int = 0) -> pa.Table:
    """About ``target_spans`` spans in traces of ``LARGE_TRACE_SPANS`` spans (sizes drawn at
    random), of three shapes in turn: an N+1 (``reports``: GET /report querying ``SELECT items``
    one row after another), a fan-out (``gateway``: GET /prices calling ``GET /price``
    thousands of times at once), a batch import (``batch``: POST /import, each ``import row``
    making 50 ``INSERT lines``). Trace numbers start at ``first_trace``; their ids never meet
    :func:`generate_spans`' (another prefix)."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < target_spans:
        sizes.append(int(rng.choice(LARGE_TRACE_SPANS)))
    if sum(sizes) > target_spans and len(sizes) > 1:
        sizes[-1] = max(52, target_spans - sum(sizes[:-1]))
    k = np.array(sizes, dtype=np.int64)
    n = int(k.sum())
    trace = np.repeat(np.arange(len(k), dtype=np.int64), k)
    starts = np.repeat(np.cumsum(k) - k, k)
    idx = np.arange(n, dtype=np.int64) - starts  # the span's place in its trace (0: the root)
    shape = trace % 3  # 0 N+1, 1 fan-out, 2 batch import
    offset = np.repeat((rng.uniform(0, 3.6e12, len(k))).astype(np.int64), k)
    base = BASE_NS + offset
    ms = 1_000_000
    # the batch import: rows of 51 spans after the root, an ``import row`` then its 50 inserts
    row_no, in_row = (idx - 1) // 51, (idx - 1) % 51
    jitter = rng.integers(0, 5 * ms, n)
    fan_dur = rng.integers(20 * ms, 380 * ms, n)
    start = np.where(
        idx == 0,
        base,
        np.where(
            shape == 0,
            base + ms + (idx - 1) * ms,
            np.where(
                shape == 1, base + ms + jitter, base + ms + row_no * 60 * ms + np.maximum(in_row - 1, 0) * ms
            ),
        ),
    )
    size = np.repeat(k, k)
    root_end = np.where(
        shape == 0,
        base + (size + 5) * ms,
        np.where(shape == 1, base + 400 * ms, base + (size // 51 + 2) * 60 * ms),
    )
    end = np.where(
        idx == 0,
        root_end,
        np.where(
            shape == 0,
            start + 900_000,
            np.where(shape == 1, start + fan_dur, np.where(in_row == 0, start + 55 * ms, start + 800_000)),
        ),
    )
    global_no = np.arange(n, dtype=np.int64) + first_trace * 1_000_003
    root_no = global_no - idx
    parent_no = np.where(idx == 0, -1, np.where((shape == 2) & (in_row > 0), global_no - in_row, root_no))
    client = (idx > 0) & ((shape != 2) | (in_row > 0))
    kind = np.where(idx == 0, 2, np.where(client, 3, 1)).astype(np.int8)
    shape_is = pl.col("shape")
    frame = pl.DataFrame(
        {
            "trace_no": trace + first_trace,
            "span_no": global_no,
            "parent_no": parent_no,
            "shape": shape,
            "root": idx == 0,
            "client": client,
            "kind": kind,
            "start_ns": start,
            "end_ns": end,
        }
    ).with_columns(
        pl.when(shape_is == 0)
        .then(pl.lit("reports"))
        .when(shape_is == 1)
        .then(pl.lit("gateway"))
        .otherwise(pl.lit("batch"))
        .alias("service"),
        pl.when(pl.col("root"))
        .then(
            pl.when(shape_is == 0)
            .then(pl.lit("GET /report"))
            .when(shape_is == 1)
            .then(pl.lit("GET /prices"))
            .otherwise(pl.lit("POST /import"))
        )
        .when(shape_is == 0)
        .then(pl.lit("SELECT items"))
        .when(shape_is == 1)
        .then(pl.lit("GET /price"))
        .when(pl.col("client"))
        .then(pl.lit("INSERT lines"))
        .otherwise(pl.lit("import row"))
        .alias("name"),
        pl.when(pl.col("client") & (shape_is == 0))
        .then(pl.lit("postgresql"))
        .when(pl.col("client") & (shape_is == 2))
        .then(pl.lit("mysql"))
        .otherwise(None)
        .alias("db_system"),
        pl.when(pl.col("client") & (shape_is == 0))
        .then(pl.lit("SELECT * FROM items WHERE id = ?"))
        .when(pl.col("client") & (shape_is == 2))
        .then(pl.lit("INSERT INTO lines VALUES (?)"))
        .otherwise(None)
        .alias("db_statement"),
        pl.when(pl.col("client") & (shape_is == 1))
        .then(pl.lit("http://pricing/price"))
        .otherwise(None)
        .alias("http_url"),
    )
    out = frame.with_columns(
        (pl.lit("b16b16b1") + pl.col("trace_no").cast(pl.String).str.zfill(24)).alias("trace_id"),
        pl.col("span_no").cast(pl.String).str.zfill(16).alias("span_id"),
        pl.when(pl.col("parent_no") >= 0)
        .then(pl.col("parent_no").cast(pl.String).str.zfill(16))
        .otherwise(None)
        .alias("parent_span_id"),
        pl.when(pl.col("http_url").is_not_null()).then(pl.lit("GET")).otherwise(None).alias("http_method"),
        pl.lit(STATUS_UNSET, dtype=pl.Int8).alias("status_code"),
        pl.lit("bench").alias("scope_name"),
        pl.lit(False).alias("follows_from"),
        pl.lit(b"", dtype=pl.Binary).alias("raw"),
    ).with_columns((pl.col("start_ns").min().over("trace_no")).alias("ingested_ns"))
    columns = {}
    for field in SPAN_SCHEMA:
        if field.name in out.columns:
            columns[field.name] = out[field.name].to_arrow().cast(field.type)
        else:
            columns[field.name] = pa.nulls(n, field.type)
    return pa.Table.from_pydict(columns, schema=SPAN_SCHEMA)


GENERATE_CHUNK_SPANS = 1_000_000


def build_store(
    path: Path, spans: int, shift_ns: Callable[[int], int] | None = None, large_share: float = 0.0
) -> tuple[int, float]:
    """A DuckDB store of about ``spans`` spans, generated and written a million spans at a time
    (so a 10M-span store never needs the whole table in memory). ``shift_ns``: each chunk's
    times (start, end, ingest) moved by ``shift_ns(chunk number)`` and its rows written in ingest
    order (else every chunk spans the same hour from ``BASE_NS``). ``large_share``: that share of
    each chunk's spans in traces of thousands to 100k spans (:func:`generate_large_traces`)."""
    import pyarrow.compute as pc

    from hourglass.collector.duckdb_store import DuckDBSpanStore

    started = time.perf_counter()
    store = DuckDBSpanStore(str(path))
    try:
        first_trace = 0
        for chunk_no, chunk_start in enumerate(range(0, spans, GENERATE_CHUNK_SPANS)):
            size = min(GENERATE_CHUNK_SPANS, spans - chunk_start)
            large = int(size * large_share)
            table = generate_spans(size - large, seed=7 + chunk_no, first_trace=first_trace)
            if large:
                table = pa.concat_tables(
                    [table, generate_large_traces(large, seed=11 + chunk_no, first_trace=first_trace)]
                )
            first_trace += size  # more than the traces in the chunk: numbers never collide
            if shift_ns is not None:
                shift = pa.scalar(shift_ns(chunk_no), pa.int64())
                for name in ("start_ns", "end_ns", "ingested_ns"):
                    at = table.schema.get_field_index(name)
                    table = table.set_column(at, table.schema.field(at), pc.add(table.column(name), shift))
                table = table.sort_by("ingested_ns")
            for offset in range(0, table.num_rows, 250_000):
                store.write(table.slice(offset, 250_000))
            del table
        stored = store.stats().spans
    finally:
        store.close()
    return stored, time.perf_counter() - started


def reference_pass(frame: pl.DataFrame) -> int:
    """Join every span to its parent; flag children starting after their previous sibling ended."""
    parents = frame.select(
        "trace_id", pl.col("span_id").alias("parent_span_id"), pl.col("start_ns").alias("parent_start")
    )
    joined = frame.join(parents, on=["trace_id", "parent_span_id"], how="left")
    flagged = joined.sort(["trace_id", "parent_span_id", "start_ns"]).with_columns(
        (
            (pl.col("start_ns") >= pl.col("end_ns").shift(1))
            & (pl.col("parent_span_id") == pl.col("parent_span_id").shift(1))
            & (pl.col("trace_id") == pl.col("trace_id").shift(1))
        ).alias("after_previous_sibling")
    )
    return int(flagged["after_previous_sibling"].sum())


def measure(db_path: str) -> dict[str, Any]:
    """Runs in a child process: load, reference pass, whole analysis; returns the figures."""
    from hourglass.analysis.pipeline import analyze
    from hourglass.collector.duckdb_store import DuckDBSpanStore

    store = DuckDBSpanStore(db_path)
    started = time.perf_counter()
    table = store.scan(columns=ANALYSIS_COLUMNS)
    load_s = time.perf_counter() - started
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    del table
    # Like for like: the analysis is timed from the same in-memory frame the reference pass gets.
    # The store scan is timed on its own, and the total (load + analysis) is printed beside it.
    reference_runs, analysis_runs, analysis_cpu = [], [], []
    report: dict[str, Any] = {}
    for _ in range(ROUNDS):
        started = time.perf_counter()
        reference_pass(frame)
        reference_runs.append(time.perf_counter() - started)
        started, cpu_started = time.perf_counter(), time.process_time()
        report = analyze(frame)
        analysis_runs.append(time.perf_counter() - started)
        analysis_cpu.append(time.process_time() - cpu_started)
    del frame
    store.close()
    reference_s, analysis_s = min(reference_runs), min(analysis_runs)
    kinds: dict[str, int] = {}
    for rec in report["recommendations"]:
        kinds[rec["kind"]] = kinds.get(rec["kind"], 0) + 1
    return {
        "spans": report["spans_analyzed"],
        "traces": report["traces_analyzed"],
        "load_s": load_s,
        "reference_s": reference_s,
        "analysis_s": analysis_s,
        "analysis_runs": analysis_runs,
        "reference_runs": reference_runs,
        "analysis_cpu_s": min(analysis_cpu),
        "recommendations": len(report["recommendations"]),
        "kinds": kinds,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="250000,500000,1000000", help="comma-separated span counts")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"bench.analysis: {os.cpu_count()} cores, sizes {sizes}")
    results = []
    with tempfile.TemporaryDirectory(prefix="hourglass-bench-") as tmp:
        for size in sizes:
            path = Path(tmp) / f"spans-{size}.duckdb"
            stored, build_s = build_store(path, size)
            print(f"  generated and stored {stored:,} spans in {build_s:.1f} s")
            child = subprocess.run(
                [sys.executable, "-m", "bench.analysis", "--measure", str(path)],
                capture_output=True,
                text=True,
                check=False,
                cwd=Path(__file__).resolve().parents[1],
            )
            if child.returncode != 0:
                print(child.stderr, file=sys.stderr)
                return 1
            r = json.loads(child.stdout.strip().splitlines()[-1])
            results.append(r)
            print(
                f"{r['spans']:>9,} spans {r['traces']:>7,} traces | store built in {build_s:5.1f} s | "
                f"reference pass {r['reference_s']:.2f} s | "
                f"whole analysis {r['analysis_s']:.2f} s ({r['analysis_s'] / r['reference_s']:.1f}x reference) | "
                f"store load {r['load_s']:.2f} s, load + analysis {r['load_s'] + r['analysis_s']:.2f} s | "
                f"runs: reference {'/'.join(f'{x:.2f}' for x in r['reference_runs'])} s, "
                f"analysis {'/'.join(f'{x:.2f}' for x in r['analysis_runs'])} s "
                f"(cpu {r['analysis_cpu_s']:.2f} s) | "
                f"peak RSS {r['peak_rss_gib']:.2f} GiB | {r['recommendations']} recommendations {r['kinds']}"
            )
            path.unlink(missing_ok=True)
    last = results[-1]
    ratio = last["analysis_s"] / last["reference_s"]
    per_span = [r["analysis_s"] / r["spans"] * 1e6 for r in results]
    print(
        f"\nlargest: whole analysis {last['analysis_s']:.2f} s = {ratio:.1f}x the reference pass "
        f"(target <= {TARGET_RATIO:.0f}x): {'MET' if ratio <= TARGET_RATIO else 'NOT MET'} "
        f"(plus store load {last['load_s']:.2f} s: load + analysis {last['load_s'] + last['analysis_s']:.2f} s); "
        f"peak RSS {last['peak_rss_gib']:.2f} GiB (target <= {TARGET_RSS_GIB:.0f} GiB): "
        f"{'MET' if last['peak_rss_gib'] <= TARGET_RSS_GIB else 'NOT MET'}"
    )
    print("per-span cost by size (µs/span, flat = linear): " + ", ".join(f"{p:.2f}" for p in per_span))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
