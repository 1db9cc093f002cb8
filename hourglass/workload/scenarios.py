"""Scenarios: a bottleneck handler, its healthy twin, the load that exercises both, and the labels
a correct analysis must satisfy.

A label names a finding by ``kind``, ``service`` and ``operation`` (the span name where the change
is made; ``operation`` may list several acceptable span names, e.g. the request handler or the
lock-wait span inside it). ``must_find`` lists what the analysis must report; ``must_not_find``
lists the healthy twin under every bottleneck kind the workload exercises — a healthy handler
flagged with any of them is a false alarm.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from typing import Any

import httpx

BOTTLENECK_KINDS = (
    "serialized_calls",
    "n_plus_one",
    "lock_contention",
    "fanout_straggler",
    "fanout_concurrency_limit",
    "retry_without_backoff",
)
_ROUTE_PARAM = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class Endpoint:
    service: str
    method: str
    route: str  # the FastAPI route template; the server span is named "{method} {route}"
    query: str = ""

    @property
    def operation(self) -> str:
        return f"{self.method} {self.route}"

    def path(self, key: int) -> str:
        path = _ROUTE_PARAM.sub(str(key), self.route)
        return f"{path}?{self.query}" if self.query else path


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # the bottleneck kind the bad handler exhibits
    description: str
    bottleneck: Endpoint
    healthy: Endpoint
    requests_per_handler: int
    concurrency: int
    # Other span names in the bottleneck's service that are acceptable places to report it.
    also_acceptable_operations: tuple[str, ...] = ()
    # Span names inside the healthy twin that must not be flagged either (e.g. its own lock wait).
    healthy_inner_operations: tuple[str, ...] = ()
    key_space: int = 1_000_000  # request keys (cart, customer, account ids) are drawn from this range

    def labels(self) -> dict[str, Any]:
        operations = [self.bottleneck.operation, *self.also_acceptable_operations]
        healthy = [self.healthy.operation, *self.healthy_inner_operations]
        return {
            "scenario": self.name,
            "description": self.description,
            "must_find": [
                {
                    "kind": self.kind,
                    "service": self.bottleneck.service,
                    "operation": operations if len(operations) > 1 else operations[0],
                }
            ],
            "must_not_find": [
                {
                    "kind": kind,
                    "service": self.healthy.service,
                    "operation": healthy if len(healthy) > 1 else healthy[0],
                }
                for kind in BOTTLENECK_KINDS
            ],
        }


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="serialized_calls",
        kind="serialized_calls",
        description="Checkout awaits three independent lookups (stock, quote, shipping estimate) one after "
        "another, in an order that varies per cart; the healthy twin gathers them concurrently.",
        bottleneck=Endpoint("storefront", "GET", "/checkout/{cart_id}/serial"),
        healthy=Endpoint("storefront", "GET", "/checkout/{cart_id}/parallel"),
        requests_per_handler=40,
        concurrency=4,
    ),
    Scenario(
        name="n_plus_one",
        kind="n_plus_one",
        description="Order history lists a customer's orders, then runs one unindexed items query per order "
        "(SELECT ... WHERE order_id = ?) over sqlite; the healthy twin loads all items with one IN (...) query.",
        bottleneck=Endpoint("orders", "GET", "/customers/{customer_id}/orders"),
        healthy=Endpoint("orders", "GET", "/customers/{customer_id}/orders/batched"),
        requests_per_handler=30,
        concurrency=2,
        key_space=60,
    ),
    Scenario(
        name="lock_contention",
        kind="lock_contention",
        description="Every transfer appends to the ledger journal under one global threading.Lock held for "
        "~20 ms; eight concurrent clients queue on it. The healthy twin renders statements (busy ~20 ms) under "
        "a per-account lock nobody else contends, so its latency does not grow with load.",
        bottleneck=Endpoint("ledger", "POST", "/accounts/{account_id}/transfers"),
        healthy=Endpoint("ledger", "GET", "/accounts/{account_id}/statement"),
        requests_per_handler=48,
        concurrency=8,
        also_acceptable_operations=("lock.acquire ledger.journal", "journal.append"),
        healthy_inner_operations=("lock.acquire ledger.account", "statement.render"),
    ),
    Scenario(
        name="fanout_straggler",
        kind="fanout_straggler",
        description="Product search fans out to 6 shards and shard 3 (hot products) always takes ~200 ms "
        "against ~40 ms for the others; review search fans out to 6 balanced shards (~40 ms).",
        bottleneck=Endpoint("storefront", "GET", "/search/products", query="q=lamp"),
        healthy=Endpoint("storefront", "GET", "/search/reviews", query="q=lamp"),
        requests_per_handler=30,
        concurrency=2,
    ),
    Scenario(
        name="fanout_concurrency_limit",
        kind="fanout_concurrency_limit",
        description="The gallery renders an album's 8 thumbnails (~30 ms each) through asyncio.Semaphore(2): "
        "four rounds of two. The slideshow renders the same 8 thumbnails all at once.",
        bottleneck=Endpoint("storefront", "GET", "/albums/{album_id}/gallery"),
        healthy=Endpoint("storefront", "GET", "/albums/{album_id}/slideshow"),
        requests_per_handler=24,
        concurrency=2,
    ),
    Scenario(
        name="retry_without_backoff",
        kind="retry_without_backoff",
        description="Order payment retries a flaky bank (503 on 60 % of charges) immediately, up to 6 "
        "attempts; subscription renewal retries the same bank with exponential backoff (50 ms base, doubling, equal jitter).",
        bottleneck=Endpoint("storefront", "POST", "/orders/{order_id}/payment"),
        healthy=Endpoint("storefront", "POST", "/subscriptions/{subscription_id}/renewal"),
        requests_per_handler=40,
        concurrency=4,
    ),
)
SCENARIOS_BY_NAME = {s.name: s for s in SCENARIOS}


async def drive(
    scenario: Scenario, base_urls: dict[str, str], seed: int, request_timeout_s: float = 30.0
) -> None:
    """Send the scenario's requests to both handlers, interleaved, ``concurrency`` at a time.

    The load generator itself is not traced, as a real one usually is not: every trace's root is the
    entry service's SERVER span. Error answers are expected (the flaky bank); transport failures are
    not and raise."""
    rng = random.Random(seed)
    requests: list[tuple[Endpoint, int]] = []
    for i in range(scenario.requests_per_handler):
        requests.append((scenario.bottleneck, rng.randrange(scenario.key_space)))
        requests.append(
            (scenario.healthy, rng.randrange(scenario.key_space) if scenario.key_space < 1000 else i)
        )
    gate = asyncio.Semaphore(scenario.concurrency)
    async with httpx.AsyncClient(timeout=request_timeout_s) as client:

        async def send(endpoint: Endpoint, key: int) -> None:
            async with gate:
                url = base_urls[endpoint.service] + endpoint.path(key)
                response = await client.request(endpoint.method, url)
                # The payment handlers answer 502 when every attempt failed: that is the scenario.
                expected_failure = scenario.kind == "retry_without_backoff" and response.status_code == 502
                if response.status_code >= 400 and not expected_failure:
                    raise RuntimeError(
                        f"{endpoint.operation} answered {response.status_code}: {response.text}"
                    )

        await asyncio.gather(*(send(endpoint, key) for endpoint, key in requests))
