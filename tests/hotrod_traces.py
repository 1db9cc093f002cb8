"""HotROD-shaped traces, as Jaeger's query API returns them (``GET /api/traces`` → ``{"data": [...]}``).

HotROD ("Rides on Demand", ``examples/hotrod`` in jaegertracing/jaeger) is the canonical tracing demo.
This module reproduces what it emits through OpenTelemetry when a user clicks its customer buttons
quickly, by simulating the program's concurrency rather than drawing finished traces:

* one **frontend** process: ``otelhttp`` server span ``/dispatch`` (the browser sends
  ``baggage: session=…, request=…``); the web page first fetches ``/config?nonse=…`` (a trace of its
  own); ``bestETA.Get`` then makes three *dependent* steps — customer, driver search with the
  customer's location, routes for the drivers found:

  - ``HTTP GET`` client span (``otelhttp`` transport) → **customer** ``/customer`` server span →
    **mysql** ``SQL SELECT`` client span (``db.system.name=mysql``, ``db.query.text``,
    ``service.peer.name=mysql``). The query holds ``tracing.Mutex`` — one lock for every request
    (a connection pool of one) — for 300 ms ± 30 ms. Its span events: "Waiting for lock behind N
    transactions" (``blockers``) only when someone held or queued for the lock, then always
    "Acquired lock; N transactions waiting behind" (``waiters``); the ``request`` baggage item is set
    as an attribute.
  - gRPC ``driver.DriverService/FindNearest`` (``otelgrpc`` client + **driver** server span, a
    1 s deadline) → **redis-manual** ``FindDriverIDs`` (20 ms ± 5) and then ``GetDriver`` (10 ms ±
    2.5) for each of the 10 drivers, one at a time. Redis' error simulator fails every fifth
    ``GetDriver`` *of the whole process* (a counter shared by concurrent requests) after 20 ms more,
    with status ERROR, an ``exception`` event and a "redis timeout" log; the driver server retries
    at once, logging "Retrying GetDriver after error" (``retry_no``) on its span, up to 3 attempts.
  - for each driver, through a worker pool of 3 goroutines shared by all requests of the
    frontend, ``HTTP GET`` → **route** ``/route`` server span (50 ms ± 12.5 of computation).

* Every log call of HotROD's span logger becomes a span event with its zap fields and ``level``;
  Jaeger shows events as ``logs`` (``event`` = the message). Span kinds are the ``span.kind`` tag,
  status ERROR is ``otel.status_code``/``error=true``, the instrumentation scope is
  ``otel.scope.name``/``version``, resource attributes are process tags.

Delays are ``delay.Sleep``: a normal draw clipped at 1 ns, plus the few tens of microseconds Go's
``time.Sleep`` overshoots; localhost hops take a few hundred microseconds. Requests arrive in bursts
of rapid clicks (a person hammering the buttons), so the MySQL lock builds a convoy in each burst
and is free again between bursts. Everything is driven by one seeded ``random.Random``: the same
seed gives the same document.

Run ``python -m tests.hotrod_traces OUT.json`` to write a file.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
import sys
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MS = 1_000_000  # nanoseconds
US = 1_000

# services/config/config.go
ROUTE_WORKER_POOL_SIZE = 3
MYSQL_GET_DELAY = 300 * MS
MYSQL_GET_DELAY_STDDEV = MYSQL_GET_DELAY // 10
REDIS_FIND_DELAY = 20 * MS
REDIS_FIND_DELAY_STDDEV = REDIS_FIND_DELAY // 4
REDIS_GET_DELAY = 10 * MS
REDIS_GET_DELAY_STDDEV = REDIS_GET_DELAY // 4
ROUTE_CALC_DELAY = 50 * MS
ROUTE_CALC_DELAY_STDDEV = ROUTE_CALC_DELAY // 4
DRIVERS_PER_SEARCH = 10  # services/driver/redis.go FindDriverIDs
GET_DRIVER_ATTEMPTS = 3  # services/driver/server.go
REDIS_ERROR_EVERY = 5  # errorSimulator.countTillError

# services/customer/database.go
CUSTOMERS = {
    123: ("Rachel's_Floral_Designs", "115,277"),
    567: ("Amazing_Coffee_Roasters", "211,653"),
    392: ("Trom_Chocolatier", "577,322"),
    731: ("Japanese_Desserts", "728,326"),
}

PORTS = {"frontend": 8080, "customer": 8081, "driver": 8082, "route": 8083}
OTELHTTP = ("go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp", "0.69.0")
OTELGRPC = ("go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc", "0.69.0")
MYSQL_SCOPE = ("mysql", "")
REDIS_SCOPE = ("redis-manual", "")
BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"
GO_UA = "Go-http-client/1.1"
EPOCH_NS = 1_795_000_000 * 1_000_000_000  # 2026-11-17, an arbitrary fixed start

# ---------------------------------------------------------------------------------------------
# Spans and traces


@dataclass
class Span:
    trace: TraceRecord
    span_id: str
    parent: Span | None
    service: str
    name: str
    kind: str | None  # "server", "client", ... or None for INTERNAL
    scope: tuple[str, str]
    start: int
    end: int = -1
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    status_error: str | None = None

    def log(self, at: int, message: str, level: str = "info", **fields: Any) -> None:
        """HotROD's spanLogger: the zap fields plus ``level`` as the event's attributes."""
        self.events.append((at, message, {**fields, "level": level}))


@dataclass
class TraceRecord:
    trace_id: str
    spans: list[Span] = field(default_factory=list)


class IdSource:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def trace_id(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def span_id(self) -> str:
        return f"{self.rng.getrandbits(64):016x}"


# ---------------------------------------------------------------------------------------------
# A small discrete-event simulator: processes are generators that yield commands.


@dataclass
class Sleep:
    ns: int


@dataclass
class Acquire:
    resource: Resource


@dataclass
class Release:
    resource: Resource


@dataclass
class Spawn:
    process: Generator[Any, Any, None]


@dataclass
class Join:
    task: Task


@dataclass
class Resource:
    """A FIFO semaphore: Go's sync.Mutex in starvation mode, or a pool fed by an unbuffered channel."""

    free: int
    waiting: deque[Generator[Any, Any, None]] = field(default_factory=deque)


@dataclass
class Task:
    done: bool = False
    joiners: list[Generator[Any, Any, None]] = field(default_factory=list)


class Simulator:
    def __init__(self) -> None:
        self.now = 0
        self._heap: list[tuple[int, int, Generator[Any, Any, None], Any]] = []
        self._seq = itertools.count()
        self._tasks: dict[int, Task] = {}

    def start(self, process: Generator[Any, Any, None], at: int) -> Task:
        task = Task()
        self._tasks[id(process)] = task
        self._wake(process, at, None)
        return task

    def _wake(self, process: Generator[Any, Any, None], at: int, value: Any) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), process, value))

    def run(self) -> None:
        while self._heap:
            at, _, process, value = heapq.heappop(self._heap)
            self.now = at
            self._step(process, value)

    def _step(self, process: Generator[Any, Any, None], value: Any) -> None:
        try:
            command = process.send(value)
        except StopIteration:
            task = self._tasks.pop(id(process))
            task.done = True
            for joiner in task.joiners:
                self._wake(joiner, self.now, None)
            return
        if isinstance(command, Sleep):
            self._wake(process, self.now + max(0, command.ns), None)
        elif isinstance(command, Acquire):
            if command.resource.free > 0:
                command.resource.free -= 1
                self._wake(process, self.now, None)
            else:
                command.resource.waiting.append(process)
        elif isinstance(command, Release):
            if command.resource.waiting:
                self._wake(command.resource.waiting.popleft(), self.now, None)
            else:
                command.resource.free += 1
            self._wake(process, self.now, None)
        elif isinstance(command, Spawn):
            self._wake(process, self.now, self.start(command.process, self.now))
        elif isinstance(command, Join):
            if command.task.done:
                self._wake(process, self.now, None)
            else:
                command.task.joiners.append(process)
        else:  # pragma: no cover - a programming error in this module
            raise TypeError(f"unknown command {command!r}")


Process = Generator[Any, Any, Any]

# ---------------------------------------------------------------------------------------------
# HotROD


class HotROD:
    """Shared state of one HotROD deployment (``hotrod all``): the MySQL mutex, the redis error
    counter and the frontend's route worker pool are shared by every concurrent request."""

    def __init__(self, rng: random.Random, sim: Simulator, mysql_mutex: bool = True) -> None:
        self.rng = rng
        self.mysql_mutex = mysql_mutex  # false: ``hotrod all -M`` (config.MySQLMutexDisabled)
        self.sim = sim
        self.ids = IdSource(rng)
        self.mysql_lock = Resource(free=1)
        self.mysql_waiters: list[str] = []  # tracing.Mutex.waiters: the holder and those queued
        self.redis_count_till_error = 0  # errorSimulator starts at 0: the first GetDriver fails
        self.route_pool = Resource(free=ROUTE_WORKER_POOL_SIZE)
        self.traces: list[TraceRecord] = []
        self.request_ids: dict[str, str] = {}  # trace id -> the ``request`` baggage item the browser sent
        self.client_port = itertools.count(51_000)

    # -- timing helpers ---------------------------------------------------------------------
    def delay(self, mean: int, stddev: int) -> int:
        """pkg/delay.Sleep plus the overshoot of Go's time.Sleep (tens of microseconds)."""
        return max(1, round(self.rng.gauss(mean, stddev))) + round(self.rng.uniform(20, 90) * US)

    def hop(self) -> int:
        """One localhost hop: connection reuse, headers, scheduling (~0.15-0.5 ms)."""
        return round(self.rng.uniform(150, 500) * US)

    def tick(self) -> int:
        """A few microseconds of Go code between two instrumented statements."""
        return round(self.rng.uniform(5, 40) * US)

    def span(
        self,
        trace: TraceRecord,
        parent: Span | None,
        service: str,
        name: str,
        kind: str | None,
        scope: tuple[str, str],
        **attributes: Any,
    ) -> Span:
        span = Span(trace, self.ids.span_id(), parent, service, name, kind, scope, self.sim.now)
        span.attributes.update(attributes)
        trace.spans.append(span)
        return span

    # -- otelhttp ---------------------------------------------------------------------------
    def http_get(self, trace: TraceRecord, parent: Span, target: str, path_query: str) -> Process:
        """tracing.HTTPClient.GetJSON: an otelhttp client span around the call to ``target``."""
        port = PORTS[target]
        client = self.span(
            trace,
            parent,
            parent.service,
            "HTTP GET",
            "client",
            OTELHTTP,
            **{
                "http.request.method": "GET",
                "url.full": f"http://0.0.0.0:{port}{path_query}",
                "server.address": "0.0.0.0",
                "server.port": port,
                "network.protocol.version": "1.1",
            },
        )
        yield Sleep(self.hop())
        handler = self.customer_handler if target == "customer" else self.route_handler
        status = yield from self.http_server(trace, client, target, path_query, GO_UA, handler)
        yield Sleep(self.hop())
        client.attributes["http.response.status_code"] = status
        if status >= 400:
            client.attributes["error.type"] = str(status)
            client.status_error = ""
        client.end = self.sim.now
        return status

    def http_server(
        self,
        trace: TraceRecord,
        parent: Span | None,
        service: str,
        path_query: str,
        user_agent: str,
        handler: Any,
    ) -> Process:
        """otelhttp.NewHandler(handler, pattern): a server span named after the mux pattern."""
        path, _, _query = path_query.partition("?")
        server = self.span(
            trace,
            parent,
            service,
            path,
            "server",
            OTELHTTP,
            **{
                "http.request.method": "GET",
                "url.scheme": "http",
                "server.address": "0.0.0.0",
                "server.port": PORTS[service],
                "network.peer.address": "127.0.0.1" if parent else "172.18.0.1",
                "network.peer.port": next(self.client_port),
                "user_agent.original": user_agent,
                "client.address": "127.0.0.1" if parent else "172.18.0.1",
                "url.path": path,
                "network.protocol.version": "1.1",
                "http.route": path,
            },
        )
        yield Sleep(self.tick())
        server.log(self.sim.now, "HTTP request received", method="GET", url=path_query)
        status, body_size = yield from handler(trace, server, path_query)
        yield Sleep(self.tick())
        server.attributes["http.response.status_code"] = status
        server.attributes["http.response.body.size"] = body_size
        if status >= 500:
            server.attributes["error.type"] = str(status)
            server.status_error = ""
        server.end = self.sim.now
        return status

    # -- customer + mysql -------------------------------------------------------------------
    def customer_handler(self, trace: TraceRecord, server: Span, path_query: str) -> Process:
        customer_id = int(path_query.rsplit("=", 1)[1])
        server.log(self.sim.now, "Loading customer", customer_id=customer_id)
        yield Sleep(self.tick())
        query = self.span(
            trace,
            server,
            "mysql",
            "SQL SELECT",
            "client",
            MYSQL_SCOPE,
            **{
                "db.system.name": "mysql",
                "db.operation.name": "SELECT",
                "service.peer.name": "mysql",
                "db.query.text": f"SELECT * FROM customer WHERE customer_id={customer_id}",
            },
        )
        if not self.mysql_mutex:
            yield Sleep(self.delay(MYSQL_GET_DELAY, MYSQL_GET_DELAY_STDDEV))
            query.end = self.sim.now
            yield Sleep(self.tick())
            return 200, 96
        # tracing.Mutex.Lock
        session = self.request_ids[trace.trace_id]
        query.attributes["request"] = session
        if self.mysql_waiters:
            query.log(
                self.sim.now,
                f"Waiting for lock behind {len(self.mysql_waiters)} transactions",
                blockers=go_list(self.mysql_waiters),
            )
        self.mysql_waiters.append(session)
        yield Acquire(self.mysql_lock)
        behind = [w for w in self.mysql_waiters if w != session]
        query.log(
            self.sim.now, f"Acquired lock; {len(behind)} transactions waiting behind", waiters=go_list(behind)
        )
        yield Sleep(self.delay(MYSQL_GET_DELAY, MYSQL_GET_DELAY_STDDEV))
        self.mysql_waiters.remove(session)
        yield Release(self.mysql_lock)
        query.end = self.sim.now
        yield Sleep(self.tick())
        return 200, 96

    # -- driver + redis ---------------------------------------------------------------------
    def find_nearest(self, trace: TraceRecord, parent: Span, location: str) -> Process:
        """driver.Client.FindNearest (otelgrpc client, 1 s deadline) → driver.Server.FindNearest.
        otelgrpc 0.69 (HotROD's go.mod) defaults to the current RPC conventions: ``rpc.system.name``,
        a fully qualified ``rpc.method`` and a string ``rpc.response.status_code``."""
        rpc = {"rpc.system.name": "grpc", "rpc.method": "driver.DriverService/FindNearest"}
        client = self.span(
            trace,
            parent,
            "frontend",
            "driver.DriverService/FindNearest",
            "client",
            OTELGRPC,
            **rpc,
            **{"server.address": "0.0.0.0", "server.port": PORTS["driver"]},
        )
        yield Sleep(self.hop())
        server = self.span(
            trace,
            client,
            "driver",
            "driver.DriverService/FindNearest",
            "server",
            OTELGRPC,
            **rpc,
            **{"network.peer.address": "127.0.0.1", "network.peer.port": 50_214},
        )
        yield Sleep(self.tick())
        server.log(self.sim.now, "Searching for nearby drivers", location=location)
        drivers = yield from self.search_drivers(trace, server, location)
        code = "OK" if drivers is not None else "UNKNOWN"  # a plain Go error is codes.Unknown
        for span in (server, client):
            if span is client:
                yield Sleep(self.hop())
            span.attributes["rpc.response.status_code"] = code
            if code != "OK":
                span.attributes["error.type"] = code
                span.status_error = "redis timeout"
            span.end = self.sim.now
        return drivers

    def redis_get(self, trace: TraceRecord, server: Span, name: str, params: dict[str, str]) -> Span:
        """A client span of the driver's hand-instrumented Redis calls: a GET, with its parameters."""
        attributes = {"db.system.name": "redis", "db.operation.name": "GET", **params}
        return self.span(trace, server, "redis-manual", name, "client", REDIS_SCOPE, **attributes)

    def search_drivers(self, trace: TraceRecord, server: Span, location: str) -> Process:
        find = self.redis_get(trace, server, "FindDriverIDs", {"param.driver.location": location})
        yield Sleep(self.delay(REDIS_FIND_DELAY, REDIS_FIND_DELAY_STDDEV))
        driver_ids = [f"T7{self.rng.randrange(100_000):05d}C" for _ in range(DRIVERS_PER_SEARCH)]
        find.log(self.sim.now, "Found drivers", drivers=go_list(driver_ids))
        find.end = self.sim.now
        found: list[tuple[str, str]] = []
        for driver_id in driver_ids:
            yield Sleep(self.tick())
            result: tuple[str, str] | None = None
            for attempt in range(GET_DRIVER_ATTEMPTS):
                result = yield from self.get_driver(trace, server, driver_id)
                if result is not None:
                    break
                yield Sleep(self.tick())
                server.log(
                    self.sim.now,
                    "Retrying GetDriver after error",
                    level="error",
                    retry_no=attempt + 1,
                    error="redis timeout",
                )
            if result is None:
                server.log(
                    self.sim.now,
                    "Failed to get driver after 3 attempts",
                    level="error",
                    error="redis timeout",
                )
                return None
            found.append(result)
        server.log(
            self.sim.now,
            "Search successful",
            driver_count=len(found),
            locations=json.dumps(
                [{"driver_id": d, "location": loc} for d, loc in found], separators=(",", ":")
            ),
        )
        return found

    def get_driver(self, trace: TraceRecord, server: Span, driver_id: str) -> Process:
        span = self.redis_get(trace, server, "GetDriver", {"param.driverID": driver_id})
        yield Sleep(self.delay(REDIS_GET_DELAY, REDIS_GET_DELAY_STDDEV))
        # errorSimulator.checkError: a counter shared by every request of the driver process.
        self.redis_count_till_error -= 1
        if self.redis_count_till_error <= 0:
            self.redis_count_till_error = REDIS_ERROR_EVERY
            yield Sleep(2 * REDIS_GET_DELAY + round(self.rng.uniform(20, 90) * US))
            span.events.append(
                (
                    self.sim.now,
                    "exception",
                    {"exception.type": "*errors.errorString", "exception.message": "redis timeout"},
                )
            )
            span.status_error = "An error occurred"
            span.log(self.sim.now, "redis timeout", level="error", driver_id=driver_id, error="redis timeout")
            span.end = self.sim.now
            return None
        span.log(self.sim.now, "Got driver's ID", driverID=driver_id)
        span.end = self.sim.now
        location = f"{self.rng.randrange(1000)},{self.rng.randrange(1000)}"
        return driver_id, location

    # -- route ------------------------------------------------------------------------------
    def route_handler(self, trace: TraceRecord, server: Span, path_query: str) -> Process:
        yield Sleep(self.delay(ROUTE_CALC_DELAY, ROUTE_CALC_DELAY_STDDEV))  # computeRoute
        return 200, 80

    def route_job(self, trace: TraceRecord, root: Span, pickup: str, dropoff: str) -> Process:
        """One pool job of bestETA.getRoutes: route.Client.FindRoute, then free the worker."""
        yield Sleep(self.tick())
        root.log(self.sim.now, "Finding route", pickup=pickup, dropoff=dropoff)
        query = f"/route?dropoff={dropoff.replace(',', '%2C')}&pickup={pickup.replace(',', '%2C')}"
        yield from self.http_get(trace, root, "route", query)
        yield Sleep(self.tick())
        yield Release(self.route_pool)

    # -- frontend ---------------------------------------------------------------------------
    def click(self, session: str, request_no: int, customer_id: int) -> Process:
        """The web page's button handler: GET /config, then GET /dispatch (separate traces)."""
        config_trace = TraceRecord(self.ids.trace_id())
        self.traces.append(config_trace)
        nonse = f"{self.rng.random():.16f}"
        yield from self.http_server(
            config_trace, None, "frontend", f"/config?nonse={nonse}", BROWSER_UA, self.config_handler
        )
        yield Sleep(round(self.rng.uniform(2, 6) * MS))  # browser round trip before the next ajax call
        trace = TraceRecord(self.ids.trace_id())
        self.traces.append(trace)
        self.request_ids[trace.trace_id] = f"{session}-{request_no}"
        nonse = f"{self.rng.random():.16f}"
        yield from self.http_server(
            trace,
            None,
            "frontend",
            f"/dispatch?customer={customer_id}&nonse={nonse}",
            BROWSER_UA,
            self.dispatch,
        )

    def config_handler(self, trace: TraceRecord, server: Span, path_query: str) -> Process:
        yield Sleep(round(self.rng.uniform(30, 120) * US))
        return 200, 42

    def dispatch(self, trace: TraceRecord, root: Span, path_query: str) -> Process:
        customer_id = int(path_query.split("customer=", 1)[1].split("&", 1)[0])
        name, location = CUSTOMERS[customer_id]
        root.log(self.sim.now, "Getting customer", customer_id=customer_id)
        yield Sleep(self.tick())
        yield from self.http_get(trace, root, "customer", f"/customer?customer={customer_id}")
        yield Sleep(self.tick())
        root.log(self.sim.now, "Found customer", customer=f"&{{{customer_id} {name} {location}}}")
        root.log(self.sim.now, "Finding nearest drivers", location=location)
        yield Sleep(self.tick())
        drivers = yield from self.find_nearest(trace, root, location)
        if drivers is None:
            yield Sleep(self.tick())
            root.log(
                self.sim.now,
                "request failed",
                level="error",
                error="rpc error: code = Unknown desc = redis timeout",
            )
            return 500, 72
        root.log(self.sim.now, "Found drivers", drivers=go_list([f"{{{d} {loc}}}" for d, loc in drivers]))
        tasks: list[Task] = []
        for _driver_id, driver_location in drivers:
            yield Acquire(self.route_pool)  # pool.Execute blocks until a worker takes the job
            tasks.append((yield Spawn(self.route_job(trace, root, driver_location, location))))
        for task in tasks:
            yield Join(task)
        yield Sleep(self.tick())
        etas = [max(2, int(self.rng.gauss(5, 3))) for _ in drivers]
        best = min(range(len(drivers)), key=etas.__getitem__)
        root.log(self.sim.now, "Found routes", routes=f"[{len(drivers)} routes]")
        root.log(self.sim.now, "Dispatch successful", driver=drivers[best][0], eta=f"{etas[best]}m0s")
        return 200, 44


def go_list(items: list[str]) -> str:
    """``fmt.Sprintf("%v", []string{...})``."""
    return "[" + " ".join(items) + "]"


# ---------------------------------------------------------------------------------------------
# Arrivals and the Jaeger document


def click_times(rng: random.Random, requests: int) -> list[int]:
    """Bursts of rapid clicks (every ~80-250 ms), 3-6 s apart: a person trying to break the demo."""
    times: list[int] = []
    now = 0
    while len(times) < requests:
        for _ in range(min(rng.randint(6, 12), requests - len(times))):
            times.append(now)
            now += round(rng.uniform(80, 250) * MS)
        now += round(rng.uniform(3, 6) * 1_000 * MS)
    return times


def generate(seed: int = 7, requests: int = 40, mysql_mutex: bool = True) -> dict[str, Any]:
    """Simulate ``requests`` clicks on the HotROD page and return Jaeger's ``/api/traces`` document.
    ``mysql_mutex=False`` runs HotROD as ``-M`` does (the tutorial's first fix): queries run in
    parallel, so requests overlap and their route calls compete for the frontend's shared pool."""
    rng = random.Random(seed)
    sim = Simulator()
    hotrod = HotROD(rng, sim, mysql_mutex)
    session = str(rng.randrange(1, 10_000))
    for number, at in enumerate(click_times(rng, requests), start=1):
        customer_id = rng.choice(sorted(CUSTOMERS))
        sim.start(hotrod.click(session, number, customer_id), at)
    sim.run()
    return {
        "data": [jaeger_trace(trace) for trace in hotrod.traces],
        "total": 0,
        "limit": 0,
        "offset": 0,
        "errors": None,
    }


def jaeger_tag(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"key": key, "type": "bool", "value": value}
    if isinstance(value, int):
        return {"key": key, "type": "int64", "value": value}
    if isinstance(value, float):
        return {"key": key, "type": "float64", "value": value}
    return {"key": key, "type": "string", "value": str(value)}


HOST = "4f0c1a7e9b2d"  # the container's hostname (hotrod all: every service in one process)


def jaeger_trace(trace: TraceRecord) -> dict[str, Any]:
    """One trace as Jaeger's query service renders OTLP spans in its v1 JSON model."""
    process_ids: dict[str, str] = {}
    spans = []
    # The batch span processor exports spans as they end.
    for span in sorted(trace.spans, key=lambda s: s.end):
        assert span.end >= span.start, f"span {span.name} never ended"
        process_id = process_ids.setdefault(span.service, f"p{len(process_ids) + 1}")
        tags = [jaeger_tag("otel.scope.name", span.scope[0])]
        if span.scope[1]:
            tags.append(jaeger_tag("otel.scope.version", span.scope[1]))
        tags += [jaeger_tag(k, v) for k, v in span.attributes.items()]
        if span.kind:
            tags.append(jaeger_tag("span.kind", span.kind))
        if span.status_error is not None:
            tags.append(jaeger_tag("otel.status_code", "ERROR"))
            tags.append(jaeger_tag("error", True))
            if span.status_error:
                tags.append(jaeger_tag("otel.status_description", span.status_error))
        logs = [
            {
                "timestamp": (EPOCH_NS + at) // US,
                "fields": [jaeger_tag("event", name)] + [jaeger_tag(k, v) for k, v in attrs.items()],
            }
            for at, name, attrs in span.events
        ]
        references = []
        if span.parent is not None:
            references.append(
                {"refType": "CHILD_OF", "traceID": trace.trace_id, "spanID": span.parent.span_id}
            )
        spans.append(
            {
                "traceID": trace.trace_id,
                "spanID": span.span_id,
                "flags": 1,  # sampled
                "operationName": span.name,
                "references": references,
                "startTime": (EPOCH_NS + span.start) // US,
                "duration": (span.end - span.start) // US,
                "tags": tags,
                "logs": logs,
                "processID": process_id,
                "warnings": None,
            }
        )
    processes = {
        pid: {
            "serviceName": service,
            "tags": [
                jaeger_tag("host.name", HOST),
                jaeger_tag("os.type", "linux"),
                jaeger_tag("telemetry.sdk.language", "go"),
                jaeger_tag("telemetry.sdk.name", "opentelemetry"),
                jaeger_tag("telemetry.sdk.version", "1.44.0"),
            ],
        }
        for service, pid in process_ids.items()
    }
    return {"traceID": trace.trace_id, "spans": spans, "processes": processes, "warnings": None}


def write(path: Path, seed: int = 7, requests: int = 40, mysql_mutex: bool = True) -> Path:
    path.write_text(json.dumps(generate(seed, requests, mysql_mutex)))
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.hotrod_traces OUT.json")
    write(Path(sys.argv[1]))
