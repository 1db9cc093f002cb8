"""The workload's services: small FastAPI apps with real downstream calls, a real sqlite database
and a real lock. Each bottleneck handler has a healthy twin doing the same work well.

Latencies come from short ``asyncio.sleep``/``time.sleep`` calls standing in for the work a real
dependency does (tens of milliseconds at most, so a whole run takes seconds), drawn from seeded
random generators so runs are repeatable. The database work is real: the items table has no index
on ``order_id``, so every per-order query scans it, as an unindexed query in production does.

| service | bottleneck handler | healthy twin |
|---|---|---|
| storefront | ``GET /checkout/{cart_id}/serial``: stock, quote and shipping estimate awaited one after another | ``GET /checkout/{cart_id}/parallel``: the same three calls with ``asyncio.gather`` |
| orders | ``GET /customers/{customer_id}/orders``: list orders, then one items query per order (N+1) | ``GET /customers/{customer_id}/orders/batched``: one ``IN (...)`` query |
| ledger | ``POST /accounts/{account_id}/transfers``: every transfer takes one global journal lock | ``GET /accounts/{account_id}/statement``: busy work under a per-account lock nobody else wants |
| storefront | ``GET /search/products``: fan-out to 6 shards (~40 ms), shard 3 holds the hot products and always takes ~200 ms | ``GET /search/reviews``: fan-out to 6 balanced shards |
| storefront | ``GET /albums/{album_id}/gallery``: 8 thumbnails through ``asyncio.Semaphore(2)`` | ``GET /albums/{album_id}/slideshow``: 8 thumbnails, all at once |
| storefront | ``POST /orders/{order_id}/payment``: a flaky bank (fails 60 %) retried at once, up to 6 times | ``POST /subscriptions/{subscription_id}/renewal``: retried with exponential backoff (50 ms base, equal jitter) |
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException
from opentelemetry import trace

from hourglass.workload.telemetry import RESEND_COUNT_EXTENSION, URL_TEMPLATE_EXTENSION, ServiceTelemetry

SERIAL_STEPS = (
    ("inventory", "/stock/{sku}"),
    ("pricing", "/quotes/{sku}"),
    ("shipping", "/estimates/{sku}"),
)
SHARD_COUNT = 6
SLOW_SHARD = 3  # the "products" index keeps its hot products on shard 3
# Fan-out branch latencies stay well above the CPU an in-process HTTP hop costs (~1-2 ms of
# instrumentation, h11 and FastAPI per call, all under one GIL, on a shared 2-core machine): with
# 10 ms shards, six concurrent branches queued on the CPU and a balanced fan-out grew real tails.
SHARD_MS = 40.0
SLOW_SHARD_MS = 200.0
THUMBNAIL_MS = 30.0
ALBUM_SIZE = 8
THUMBNAIL_POOL_SIZE = 2
PAYMENT_MAX_ATTEMPTS = 6
RENEWAL_BACKOFF_BASE_S = 0.05
BANK_FAILURE_RATE = 0.6
ITEMS_ROWS = 80_000
ORDERS_PER_CUSTOMER = 10
CUSTOMERS = 60


def _jitter_ms(rng: random.Random, base_ms: float, spread_ms: float) -> float:
    return max(0.5, base_ms + rng.uniform(-spread_ms, spread_ms))


async def _call(
    client: httpx.AsyncClient, method: str, template: str, path: str, resend_count: int = 0, **kwargs: Any
) -> httpx.Response:
    """One instrumented downstream call; the template names its CLIENT span, ``resend_count``
    (the attempt number of a retry) becomes ``http.request.resend_count`` as the HTTP semantic
    conventions define it."""
    extensions: dict[str, Any] = {URL_TEMPLATE_EXTENSION: template}
    if resend_count:
        extensions[RESEND_COUNT_EXTENSION] = resend_count
    return await client.request(method, path, extensions=extensions, **kwargs)


# --------------------------------------------------------------------------- leaf services


def leaf_service_app(telemetry: ServiceTelemetry, route: str, base_ms: float, seed: int) -> FastAPI:
    """inventory / pricing / shipping: one GET route that takes ``base_ms`` ± 3 ms."""
    app = FastAPI(title=telemetry.name)
    rng = random.Random(seed)

    async def handler(sku: int) -> dict[str, Any]:
        await asyncio.sleep(_jitter_ms(rng, base_ms, 3.0) / 1000)
        return {"sku": sku, "service": telemetry.name}

    app.add_api_route(route, handler, methods=["GET"])
    telemetry.instrument_app(app)
    return app


def search_index_app(telemetry: ServiceTelemetry, seed: int) -> FastAPI:
    """Two indexes split into shards: ``products`` has a hot shard, ``reviews`` is balanced."""
    app = FastAPI(title=telemetry.name)
    rng = random.Random(seed)

    @app.get("/indexes/{index}/shards/{shard_id}/search")
    async def search_shard(index: str, shard_id: int, q: str = "") -> dict[str, Any]:
        if index == "products" and shard_id == SLOW_SHARD:
            delay_ms = _jitter_ms(rng, SLOW_SHARD_MS, 15.0)
        else:
            delay_ms = _jitter_ms(rng, SHARD_MS, 4.0)
        await asyncio.sleep(delay_ms / 1000)
        return {"index": index, "shard": shard_id, "hits": rng.randrange(50)}

    telemetry.instrument_app(app)
    return app


def media_app(telemetry: ServiceTelemetry, seed: int) -> FastAPI:
    app = FastAPI(title=telemetry.name)
    rng = random.Random(seed)

    @app.get("/images/{image_id}/thumbnail")
    async def thumbnail(image_id: int) -> dict[str, Any]:
        await asyncio.sleep(_jitter_ms(rng, THUMBNAIL_MS, 3.0) / 1000)
        return {"image_id": image_id, "bytes": 4096}

    telemetry.instrument_app(app)
    return app


def bank_app(telemetry: ServiceTelemetry, seed: int) -> FastAPI:
    """A payment provider that answers 503 to 60 % of charge attempts."""
    app = FastAPI(title=telemetry.name)
    rng = random.Random(seed)

    @app.post("/charges")
    async def charge(amount_cents: int = 1000) -> dict[str, Any]:
        await asyncio.sleep(_jitter_ms(rng, 4.0, 1.0) / 1000)
        if rng.random() < BANK_FAILURE_RATE:
            raise HTTPException(status_code=503, detail="issuer temporarily unavailable")
        return {"status": "captured", "amount_cents": amount_cents}

    telemetry.instrument_app(app)
    return app


# --------------------------------------------------------------------------- orders (sqlite)


def create_orders_database(path: Path, seed: int) -> None:
    """Customers' orders and their items. ``order_items`` deliberately has no index on
    ``order_id``: every per-order lookup scans the table."""
    rng = random.Random(seed)
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            DROP TABLE IF EXISTS orders;
            DROP TABLE IF EXISTS order_items;
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL,
                                 placed_at TEXT NOT NULL, status TEXT NOT NULL);
            CREATE INDEX orders_by_customer ON orders (customer_id);
            CREATE TABLE order_items (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL,
                                      sku TEXT NOT NULL, quantity INTEGER NOT NULL,
                                      unit_price REAL NOT NULL);
            """
        )
        orders = [
            (customer * ORDERS_PER_CUSTOMER + n + 1, customer, f"2026-11-{1 + n:02d}", "shipped")
            for customer in range(CUSTOMERS)
            for n in range(ORDERS_PER_CUSTOMER)
        ]
        db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
        order_count = len(orders)
        db.executemany(
            "INSERT INTO order_items (order_id, sku, quantity, unit_price) VALUES (?, ?, ?, ?)",
            (
                (
                    rng.randrange(1, order_count + 1),
                    f"SKU-{rng.randrange(5000):05d}",
                    rng.randrange(1, 5),
                    round(rng.uniform(1, 200), 2),
                )
                for _ in range(ITEMS_ROWS)
            ),
        )


def orders_app(telemetry: ServiceTelemetry, database: Path) -> FastAPI:
    from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor

    app = FastAPI(title=telemetry.name)
    local = threading.local()

    def connection() -> Any:
        # One instrumented connection per worker thread, as a sync FastAPI handler would hold.
        conn = getattr(local, "conn", None)
        if conn is None:
            raw = sqlite3.connect(database, check_same_thread=False)
            conn = SQLite3Instrumentor.instrument_connection(raw, tracer_provider=telemetry.provider)
            local.conn = conn
        return conn

    def list_orders(customer_id: int) -> list[tuple[Any, ...]]:
        cur = connection().cursor()
        cur.execute(
            "SELECT id, placed_at, status FROM orders WHERE customer_id = ? ORDER BY id", (customer_id,)
        )
        return list(cur.fetchall())

    @app.get("/customers/{customer_id}/orders")
    def orders_with_items(customer_id: int) -> list[dict[str, Any]]:
        result = []
        for order_id, placed_at, status in list_orders(customer_id):
            cur = connection().cursor()
            cur.execute(
                "SELECT sku, quantity, unit_price FROM order_items WHERE order_id = ? ORDER BY sku",
                (order_id,),
            )
            items = [{"sku": s, "quantity": q, "unit_price": p} for s, q, p in cur.fetchall()]
            result.append({"id": order_id, "placed_at": placed_at, "status": status, "items": items})
        return result

    @app.get("/customers/{customer_id}/orders/batched")
    def orders_with_items_batched(customer_id: int) -> list[dict[str, Any]]:
        orders = list_orders(customer_id)
        ids = [row[0] for row in orders]
        items_by_order: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
        if ids:
            placeholders = ", ".join("?" for _ in ids)
            cur = connection().cursor()
            cur.execute(
                "SELECT order_id, sku, quantity, unit_price FROM order_items "
                f"WHERE order_id IN ({placeholders}) ORDER BY order_id, sku",
                ids,
            )
            for order_id, sku, quantity, price in cur.fetchall():
                items_by_order[order_id].append({"sku": sku, "quantity": quantity, "unit_price": price})
        return [
            {"id": oid, "placed_at": placed, "status": status, "items": items_by_order[oid]}
            for oid, placed, status in orders
        ]

    telemetry.instrument_app(app)
    return app


# --------------------------------------------------------------------------- ledger (a real lock)


class TracedLock:
    """A ``threading.Lock`` whose acquisition is a ``lock.acquire {name}`` span, as lock-aware
    instrumentation records it: ``lock.name``, ``lock.key`` (which instance, for keyed locks),
    ``lock.waiters_ahead`` (threads already queued when this one arrived) and ``lock.wait_ms``
    (time spent waiting)."""

    def __init__(self, name: str, tracer: trace.Tracer, key: str = "") -> None:
        self.name = name
        self.key = key
        self._lock = threading.Lock()
        self._tracer = tracer
        self._waiting = 0
        self._waiting_guard = threading.Lock()

    def __enter__(self) -> TracedLock:
        attributes = {"lock.name": self.name, "lock.key": self.key}
        with self._tracer.start_as_current_span(f"lock.acquire {self.name}", attributes=attributes) as span:
            with self._waiting_guard:
                ahead = self._waiting
                self._waiting += 1
            started = time.perf_counter()
            self._lock.acquire()
            waited_ms = (time.perf_counter() - started) * 1000
            with self._waiting_guard:
                self._waiting -= 1
            span.set_attribute("lock.waiters_ahead", ahead)
            span.set_attribute("lock.wait_ms", round(waited_ms, 3))
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def ledger_app(telemetry: ServiceTelemetry, database: Path, seed: int) -> FastAPI:
    from opentelemetry.instrumentation.sqlite3 import SQLite3Instrumentor

    app = FastAPI(title=telemetry.name)
    tracer = telemetry.provider.get_tracer("ledger.journal")
    journal_lock = TracedLock("ledger.journal", tracer, "all")
    account_locks: dict[int, TracedLock] = {}
    account_locks_guard = threading.Lock()
    rng = random.Random(seed)
    rng_guard = threading.Lock()
    with sqlite3.connect(database) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY, account_id INTEGER, amount INTEGER)"
        )
    local = threading.local()

    def connection() -> Any:
        conn = getattr(local, "conn", None)
        if conn is None:
            raw = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=30)
            conn = SQLite3Instrumentor.instrument_connection(raw, tracer_provider=telemetry.provider)
            local.conn = conn
        return conn

    def work_ms(base_ms: float) -> float:
        with rng_guard:
            return _jitter_ms(rng, base_ms, 1.0)

    @app.post("/accounts/{account_id}/transfers")
    def post_transfer(account_id: int, amount: int = 100) -> dict[str, Any]:
        # Every transfer appends to one journal under one global lock: requests queue on it.
        with journal_lock, tracer.start_as_current_span("journal.append"):
            connection().cursor().execute(
                "INSERT INTO journal (account_id, amount) VALUES (?, ?)", (account_id, amount)
            )
            time.sleep(work_ms(20.0) / 1000)  # stands in for the journal's fsync
        return {"account_id": account_id, "posted": amount}

    @app.get("/accounts/{account_id}/statement")
    def statement(account_id: int) -> dict[str, Any]:
        # Busy, but under a per-account lock nobody else contends: latency does not grow with load.
        with account_locks_guard:
            lock = account_locks.setdefault(account_id, TracedLock("ledger.account", tracer, str(account_id)))
        with lock, tracer.start_as_current_span("statement.render"):
            time.sleep(work_ms(20.0) / 1000)
        return {"account_id": account_id, "lines": 12}

    telemetry.instrument_app(app)
    return app


# --------------------------------------------------------------------------- storefront


def storefront_app(telemetry: ServiceTelemetry, urls: dict[str, str], seed: int) -> FastAPI:
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Clients are created and closed on the server's own event loop.
        clients.update({name: telemetry.http_client(url) for name, url in urls.items()})
        yield
        await telemetry.aclose()

    app = FastAPI(title=telemetry.name, lifespan=lifespan)
    rng = random.Random(seed)

    def step_call(service: str, template: str, sku: int) -> Callable[[], Awaitable[Any]]:
        path = template.replace("{sku}", str(sku))
        return lambda: _call(clients[service], "GET", template, path)

    @app.get("/checkout/{cart_id}/serial")
    async def checkout_serial(cart_id: int) -> dict[str, Any]:
        # The three lookups do not depend on each other, yet each waits for the previous one.
        # The step order comes from the cart's configuration and varies between carts.
        steps = list(SERIAL_STEPS)
        rng.shuffle(steps)
        for service, template in steps:
            response = await step_call(service, template, cart_id)()
            response.raise_for_status()
        return {"cart_id": cart_id, "ready": True}

    @app.get("/checkout/{cart_id}/parallel")
    async def checkout_parallel(cart_id: int) -> dict[str, Any]:
        responses = await asyncio.gather(*(step_call(s, t, cart_id)() for s, t in SERIAL_STEPS))
        for response in responses:
            response.raise_for_status()
        return {"cart_id": cart_id, "ready": True}

    async def fan_out_search(index: str, q: str) -> dict[str, Any]:
        template = f"/indexes/{index}/shards/{{shard_id}}/search"

        async def one(shard: int) -> Any:
            response = await _call(
                clients["search-index"],
                "GET",
                template,
                template.replace("{shard_id}", str(shard)),
                params={"q": q},
            )
            response.raise_for_status()
            return response.json()

        results = await asyncio.gather(*(one(shard) for shard in range(SHARD_COUNT)))
        return {"index": index, "hits": sum(r["hits"] for r in results)}

    @app.get("/search/products")
    async def search_products(q: str = "") -> dict[str, Any]:
        return await fan_out_search("products", q)

    @app.get("/search/reviews")
    async def search_reviews(q: str = "") -> dict[str, Any]:
        return await fan_out_search("reviews", q)

    async def thumbnail(image_id: int) -> Any:
        template = "/images/{image_id}/thumbnail"
        response = await _call(clients["media"], "GET", template, f"/images/{image_id}/thumbnail")
        response.raise_for_status()
        return response.json()

    @app.get("/albums/{album_id}/gallery")
    async def gallery(album_id: int) -> dict[str, Any]:
        # At most two thumbnails in flight per album: eight renders take four rounds.
        thumbnail_pool = asyncio.Semaphore(THUMBNAIL_POOL_SIZE)

        async def pooled(image_id: int) -> Any:
            async with thumbnail_pool:
                return await thumbnail(image_id)

        images = range(album_id * ALBUM_SIZE, (album_id + 1) * ALBUM_SIZE)
        thumbs = await asyncio.gather(*(pooled(i) for i in images))
        return {"album_id": album_id, "thumbnails": len(thumbs)}

    @app.get("/albums/{album_id}/slideshow")
    async def slideshow(album_id: int) -> dict[str, Any]:
        images = range(album_id * ALBUM_SIZE, (album_id + 1) * ALBUM_SIZE)
        thumbs = await asyncio.gather(*(thumbnail(i) for i in images))
        return {"album_id": album_id, "thumbnails": len(thumbs)}

    async def charge(idempotency_key: str, attempt: int) -> httpx.Response:
        return await _call(
            clients["bank"],
            "POST",
            "/charges",
            "/charges",
            resend_count=attempt,
            params={"amount_cents": 1999},
            headers={"Idempotency-Key": idempotency_key},
        )

    @app.post("/orders/{order_id}/payment")
    async def pay_order(order_id: int) -> dict[str, Any]:
        # Retries a failing charge immediately, again and again: a retry storm when the bank is down.
        key = f"order-{order_id}"
        for attempt in range(PAYMENT_MAX_ATTEMPTS):
            response = await charge(key, attempt)
            if response.status_code < 500:
                return {"order_id": order_id, "attempts": attempt + 1}
        raise HTTPException(status_code=502, detail="payment provider unavailable")

    @app.post("/subscriptions/{subscription_id}/renewal")
    async def renew_subscription(subscription_id: int) -> dict[str, Any]:
        # Exponential backoff with "equal jitter" (half fixed, half random): 25-50 ms after the
        # first failure, then doubling — many times the ~4 ms a charge attempt takes. (With a
        # 25 ms base, on a loaded 2-core CI machine scheduling delays of tens of ms made a few
        # retry sequences' gaps not grow, and the handler was once judged to lack backoff.)
        key = f"subscription-{subscription_id}"
        for attempt in range(PAYMENT_MAX_ATTEMPTS):
            response = await charge(key, attempt)
            if response.status_code < 500:
                return {"subscription_id": subscription_id, "attempts": attempt + 1}
            if attempt + 1 < PAYMENT_MAX_ATTEMPTS:
                await asyncio.sleep(rng.uniform(0.5, 1.0) * RENEWAL_BACKOFF_BASE_S * (2**attempt))
        raise HTTPException(status_code=502, detail="payment provider unavailable")

    telemetry.instrument_app(app)
    return app
