"""A small, real, instrumented microservice workload with known bottlenecks and healthy twins.

Several FastAPI services (served by uvicorn on free loopback ports, calling each other with httpx,
one of them over a real sqlite database) are instrumented with the OpenTelemetry SDK exactly as an
application team would instrument them. Each *scenario* pairs a handler with a known bottleneck
(serialized calls, N+1, a contended lock, a straggling shard, a capped worker pool, retries without
backoff) with a healthy counterpart doing the same work well; a driver sends concurrent requests to
both. The spans leave through a real OpenTelemetry exporter: the OTLP exporter to a running
``hourglass serve`` (``make demo``) or an in-memory exporter whose spans are encoded with the SDK's
own OTLP encoder into OTLP JSON Lines files (``sample-traces/``).

Not part of the installed package's layering (``api → analysis → collector``): only ``hourglass.demo``
and the tests import it.
"""
