"""Regression trace files for issue 12 (part A): the shapes real, foreign exports take, built here
from their description (not copied from any data set), written as OTLP JSON the way an exporter
without span kinds or semantic attributes would write them.

    .venv/bin/python -m tests.foreign_traces sample-traces/foreign    # regenerate (seeded)

One file per problem, each with a bottleneck handler and a healthy twin in the same file, and a
``<name>.labels.json`` in the format of ``sample-traces/`` (``must_find`` / ``must_not_find``).
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER, KIND_UNSPECIFIED
from tests.builders import TraceBuilder

U = KIND_UNSPECIFIED
TRACES = 12
_ATTRIBUTES = {"http_method": "http.method", "http_url": "http.url", "db_system": "db.system"}


def _jitter(rng: random.Random, ms: float) -> float:
    return round(ms * rng.uniform(0.85, 1.15), 3)


def _in_a_row(
    b: TraceBuilder,
    parent: str,
    rng: random.Random,
    calls: list[tuple[Any, ...]],
    *,
    start_ms: float,
    gap_ms: float,
    **columns: Any,
) -> None:
    """Calls under `parent`, one after another from `start_ms`, each `gap_ms` after the one before
    ends, lasting about their ms (jittered). A call is (name, ms) or, into a traced service,
    (name, ms, (service, operation)): the service's span then lasts the call but 1 ms each end."""
    t = start_ms
    for name, ms, *callee in calls:
        d = _jitter(rng, ms)
        call = b.span(name, parent=parent, start_ms=t, dur_ms=d, **columns)
        for service, operation in callee:
            b.span(operation, parent=call, start_ms=t + 1, dur_ms=d - 2, service=service, **columns)
        t += d + gap_ms


# -- 1. no span kinds anywhere: a per-item gRPC loop, structure alone says it is one -----------------


def no_kinds(rng: random.Random) -> list[TraceBuilder]:
    out = []
    for _ in range(TRACES):
        b = TraceBuilder(service="web")
        root = b.span("Web/RenderCart", start_ms=0, dur_ms=260, kind=U)
        calls = [("Inventory/GetItem", 25, ("inventory", "Inventory/GetItem"))] * rng.randint(6, 8)
        _in_a_row(b, root, rng, calls, start_ms=4.0, gap_ms=0.5, kind=U)
        twin = TraceBuilder(service="web")  # in-process rendering per item: no call out
        root = twin.span("Web/RenderWishlist", start_ms=0, dur_ms=260, kind=U)
        for i in range(7):
            twin.span("render_item", parent=root, start_ms=4 + 30 * i, dur_ms=_jitter(rng, 25), kind=U)
        out += [b, twin]
    return out


# -- 2. database spans known only by their semantic-convention name --------------------------------


def db_by_name(rng: random.Random) -> list[TraceBuilder]:
    out = []
    for _ in range(TRACES):
        b = TraceBuilder(service="orders")
        root = b.span("/api/orders/{id}", start_ms=0, dur_ms=30, kind=U)
        ctl = b.span("OrderController.get", parent=root, start_ms=0.5, dur_ms=29, kind=U)
        b.span("SELECT shop.orders", parent=ctl, start_ms=1, dur_ms=_jitter(rng, 1.5), kind=U)
        rows = [("SELECT shop.order_items", 2.5)] * rng.randint(6, 9)  # a lazy relation, row by row
        _in_a_row(b, ctl, rng, rows, start_ms=3.0, gap_ms=0.2, kind=U)
        twin = TraceBuilder(service="orders")  # the same data with one JOIN FETCH
        root = twin.span("/api/orders/{id}/summary", start_ms=0, dur_ms=12, kind=U)
        ctl = twin.span("OrderController.summary", parent=root, start_ms=0.5, dur_ms=11, kind=U)
        twin.span("SELECT shop.orders", parent=ctl, start_ms=1, dur_ms=_jitter(rng, 4), kind=U)
        out += [b, twin]
    return out


# -- 3. gate words inside table names -------------------------------------------------------------


def gate_words(rng: random.Random) -> list[TraceBuilder]:
    out = []
    for i in range(TRACES):
        b = TraceBuilder(service="library")
        root = b.span("GET /books/{id}", start_ms=0, dur_ms=200, kind=KIND_SERVER)
        names = ["SELECT library.authors", "SELECT library.books_author", "SELECT library.reviews"]
        if i % 2:
            names = [names[1], names[0], names[2]]
        queries = [(name, 45) for name in names]
        _in_a_row(b, root, rng, queries, start_ms=4.0, gap_ms=0.5, kind=KIND_CLIENT, db_system="postgresql")
        twin = TraceBuilder(service="library")  # connect and authenticate first: preconditions
        root = twin.span("GET /members/{id}", start_ms=0, dur_ms=200, kind=KIND_SERVER)
        queries = [(name, 45) for name in ["connect", "authenticateMember", "SELECT library.members"]]
        _in_a_row(
            twin, root, rng, queries, start_ms=4.0, gap_ms=0.5, kind=KIND_CLIENT, db_system="postgresql"
        )
        out += [b, twin]
    return out


# -- 4. a loop whose calls overlap by a few ms --------------------------------------------------------


def pipelined_loop(rng: random.Random) -> list[TraceBuilder]:
    out = []
    for _ in range(TRACES):
        b = TraceBuilder(service="feed")
        root = b.span("GET /feed", start_ms=0, dur_ms=300, kind=KIND_SERVER)
        t = 4.0
        for i in range(8):
            d = _jitter(rng, 32)
            b.span("GET", parent=root, start_ms=t, dur_ms=d, kind=KIND_CLIENT, http_method="GET",
                   http_url=f"http://posts/posts/{1000 + i}")  # fmt: skip
            t += d - rng.uniform(2, 6)  # the client sends the next request a few ms early
        out.append(b)
    return out


# -- 5. per-item calls issued all at once ----------------------------------------------------------


def concurrent_per_item(rng: random.Random) -> list[TraceBuilder]:
    out = []
    for _ in range(TRACES):
        for handler, same in (("GET /cart", False), ("GET /banner", True)):
            b = TraceBuilder(service="shop")
            root = b.span(handler, start_ms=0, dur_ms=130, kind=KIND_SERVER)
            n = rng.randint(8, 12)
            slow = rng.randrange(n)
            for i in range(n):
                d = _jitter(rng, 110 if i == slow else 18)
                item = 7 if same else 100 + i
                b.span("GET", parent=root, start_ms=3 + 0.3 * i, dur_ms=d, kind=KIND_CLIENT, http_method="GET",
                       http_url=f"http://catalog/items/{item}")  # fmt: skip
            out.append(b)
    return out


# -- 6. fixed-order calls that take inputs --------------------------------------------------------


def sequential_inputs(rng: random.Random) -> list[TraceBuilder]:
    out = []
    for _ in range(TRACES):
        b = TraceBuilder(service="planner")
        root = b.span("PlannerController.plan", start_ms=0, dur_ms=420, kind=U)
        steps = [("stations", "/api/stations/idlist", 90), ("trains", "/api/trains/byNames", 60),
                 ("routes", "/api/routes/byIds", 80), ("prices", "/api/prices/query", 120)]  # fmt: skip
        calls = [("HTTP POST", ms, (svc, route)) for svc, route, ms in steps]
        _in_a_row(b, root, rng, calls, start_ms=3.0, gap_ms=1, kind=U)
        twin = TraceBuilder(service="planner")  # look the user up, then use it: a chain of two
        root = twin.span("PlannerController.profile", start_ms=0, dur_ms=300, kind=U)
        steps = [("users", "/api/users/byToken", 120), ("history", "/api/history/byUser", 150)]
        calls = [("HTTP POST", ms, (svc, route)) for svc, route, ms in steps]
        _in_a_row(twin, root, rng, calls, start_ms=3.0, gap_ms=1, kind=U)
        out += [b, twin]
    return out


ALL_KINDS = (
    "serialized_calls", "n_plus_one", "batchable_calls", "lock_contention", "fanout_straggler",
    "fanout_concurrency_limit",
)  # fmt: skip


def _not(service: str, operation: str, kinds: tuple[str, ...] = ALL_KINDS) -> list[dict[str, str]]:
    return [{"kind": k, "service": service, "operation": operation} for k in kinds]


SCENARIOS: dict[str, tuple[Callable[[random.Random], list[TraceBuilder]], str, dict[str, Any]]] = {
    "no_kinds_loop": (
        no_kinds,
        "No span kinds anywhere: web calls inventory GetItem once per cart item, one after another; "
        "the twin renders wishlist items in process.",
        {
            "must_find": [{"kind": "n_plus_one", "service": "web", "operation": "Web/RenderCart"}],
            "must_not_find": _not("web", "Web/RenderWishlist"),
        },
    ),
    "db_by_name": (
        db_by_name,
        "Database spans named only '{operation} {namespace}.{table}': order items loaded row by row; "
        "the twin loads everything with one query.",
        {
            "must_find": [{"kind": "n_plus_one", "service": "orders", "operation": "OrderController.get"}],
            "must_not_find": _not("orders", "OrderController.summary"),
        },
    ),
    "gate_words": (
        gate_words,
        "Three independent queries on authors/books_author/reviews tables (order varies) run one after "
        "another; the twin connects and authenticates before its query (preconditions).",
        {
            "must_find": [{"kind": "serialized_calls", "service": "library", "operation": "GET /books/{id}"}],
            "must_not_find": _not("library", "GET /members/{id}"),
        },
    ),
    "pipelined_loop": (
        pipelined_loop,
        "A loop of 8 post fetches whose client sends each request 2-6 ms before the previous one ends.",
        {
            "must_find": [{"kind": "n_plus_one", "service": "feed", "operation": "GET /feed"}],
            "must_not_find": _not("feed", "GET /feed", ("batchable_calls", "fanout_straggler")),
        },
    ),
    "concurrent_per_item": (
        concurrent_per_item,
        "8-12 GET /items/{id} issued together, one per cart item, one slow; the twin fetches the same "
        "banner item 8-12 times concurrently (a duplicate, not a batch).",
        {
            "must_find": [{"kind": "batchable_calls", "service": "shop", "operation": "GET /cart"}],
            "must_not_find": _not(
                "shop", "GET /banner", ("batchable_calls", "n_plus_one", "serialized_calls")
            ),
        },
    ),
    "sequential_inputs": (
        sequential_inputs,
        "Four POSTs taking inputs (stations, trains, routes, prices) in the same order in every request; "
        "the twin is a lookup-then-use chain of two.",
        {
            "must_find": [
                {"kind": "serialized_calls", "service": "planner", "operation": "PlannerController.plan"}
            ],
            "must_not_find": _not("planner", "PlannerController.profile"),
        },
    ),
}


def to_otlp_json(builders: list[TraceBuilder]) -> dict[str, Any]:
    """One OTLP/JSON export request; kind omitted when unspecified, as such exporters write it."""
    by_service: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for b in builders:
        for row in b.rows:
            span: dict[str, Any] = {
                "traceId": row["trace_id"],
                "spanId": row["span_id"],
                "name": row["name"],
                "startTimeUnixNano": str(row["start_ns"]),
                "endTimeUnixNano": str(row["end_ns"]),
            }
            if row["parent_span_id"]:
                span["parentSpanId"] = row["parent_span_id"]
            if row["kind"]:
                span["kind"] = row["kind"]
            attributes = [
                {"key": key, "value": {"stringValue": row[column]}}
                for column, key in _ATTRIBUTES.items()
                if row.get(column)
            ]
            if attributes:
                span["attributes"] = attributes
            by_service[row["service"]].append(span)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [{"scope": {"name": "foreign-export"}, "spans": spans}],
            }
            for service, spans in sorted(by_service.items())
        ]
    }


def generate(out: Path, seed: int = 12) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (build, description, labels) in SCENARIOS.items():
        rng = random.Random(f"{seed}-{name}")
        trace_file = out / f"{name}.otlp.json"
        trace_file.write_text(json.dumps(to_otlp_json(build(rng)), separators=(",", ":")) + "\n")
        document = {"trace_file": trace_file.name, "scenario": name, "description": description, **labels}
        (out / f"{name}.labels.json").write_text(json.dumps(document, indent=2) + "\n")
        written.append(trace_file)
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1] if len(sys.argv) > 1 else "sample-traces/foreign")):
        print(path)
