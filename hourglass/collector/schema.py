"""The span row: the one contract between ingest and analysis.

Every source (OTLP/gRPC, OTLP/HTTP, every trace-file format) ends as rows of this Arrow schema,
produced by :mod:`hourglass.collector.decode` from OTLP protobuf messages. The fields the analyses need are
real columns; everything else is kept losslessly in ``raw`` (the serialized OTLP ``Span``) and
``resource_json`` (the resource attributes, once per resource, repeated per row — DuckDB's
dictionary compression makes the repeat nearly free).

Semantic attribute columns are filled from the first matching attribute key in
``SEMANTIC_ATTRIBUTE_COLUMNS`` (current OpenTelemetry semantic conventions first, then the older
names). Attributes whose key matches ``HINT_KEY_PATTERN`` (lock, queue, wait, retry, shard, ...)
are collected into ``hints`` as a JSON object: detectors read their explicit evidence there.
"""

from __future__ import annotations

import re
import sys
import threading

import pyarrow as pa


class _NoPandasForThisThread:
    """An import finder that refuses ``pandas`` to one thread (the others import it as usual)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" and threading.get_ident() == self.thread:
            raise ImportError("pandas is not offered to pyarrow's first look for it")


def _pyarrow_without_pandas() -> None:
    """pyarrow asks once whether pandas is installed, on the first conversion of Python or numpy
    values (``pa.array``, ``pa.table`` of lists...), to recognise pandas objects, and imports it to
    find out: 0.25 s and ~30 MB in every process that decodes spans, though Hourglass never hands
    pyarrow a pandas object. That first look is made here with pandas refused; pyarrow then never
    asks again, and code that asks for pandas outright (``to_pandas``) still gets it."""
    if "pandas" in sys.modules:
        return
    refuse = _NoPandasForThisThread()
    sys.meta_path.insert(0, refuse)
    try:
        pa.array([0])
    finally:
        sys.meta_path.remove(refuse)


_pyarrow_without_pandas()


# OTLP SpanKind numbers.
KIND_UNSPECIFIED, KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = range(6)
KIND_NAMES = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}

# OTLP status codes.
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

SPAN_SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.string(), nullable=False),  # 32 lowercase hex characters
        pa.field("span_id", pa.string(), nullable=False),  # 16 lowercase hex characters
        pa.field("parent_span_id", pa.string()),  # null for a root span
        pa.field("service", pa.string(), nullable=False),  # resource service.name
        pa.field("name", pa.string(), nullable=False),
        pa.field("kind", pa.int8(), nullable=False),  # OTLP SpanKind number
        pa.field("start_ns", pa.int64(), nullable=False),  # unix epoch nanoseconds
        pa.field("end_ns", pa.int64(), nullable=False),
        pa.field("status_code", pa.int8(), nullable=False),  # 0 unset, 1 ok, 2 error
        pa.field("status_message", pa.string()),
        pa.field("scope_name", pa.string()),
        pa.field("host", pa.string()),  # host.name / k8s.pod.name / service.instance.id
        pa.field("db_system", pa.string()),
        pa.field("db_statement", pa.string()),
        pa.field("http_method", pa.string()),
        pa.field("http_route", pa.string()),
        pa.field("http_url", pa.string()),
        pa.field("http_status_code", pa.int32()),
        pa.field("rpc_method", pa.string()),
        pa.field("peer", pa.string()),  # peer.service / server.address / net.peer.name
        pa.field("messaging_destination", pa.string()),
        pa.field("hints", pa.string()),  # JSON object of hint attributes, null when none
        pa.field("event_names", pa.list_(pa.string())),
        pa.field("event_times_ns", pa.list_(pa.int64())),
        pa.field("event_hints", pa.string()),  # JSON list of {name, time_ns, attributes} for hint events
        pa.field("links", pa.list_(pa.string())),  # "trace_id:span_id" of each link
        pa.field("follows_from", pa.bool_()),  # parent reference is FOLLOWS_FROM (Jaeger/Zipkin)
        pa.field("resource_json", pa.string()),
        pa.field("raw", pa.binary()),  # serialized opentelemetry.proto.trace.v1.Span
        pa.field("ingested_ns", pa.int64(), nullable=False),
    ]
)

SPAN_COLUMNS: tuple[str, ...] = tuple(SPAN_SCHEMA.names)

# Columns the analyses read; ``raw`` and ``resource_json`` stay in the store unless asked for.
ANALYSIS_COLUMNS: tuple[str, ...] = tuple(c for c in SPAN_COLUMNS if c not in ("raw", "resource_json"))

# column -> attribute keys, most current convention first.
SEMANTIC_ATTRIBUTE_COLUMNS: dict[str, tuple[str, ...]] = {
    # db.type: the OpenTracing tag; sql.query: the statement key of older agents (Datadog, Elastic)
    "db_system": ("db.system.name", "db.system", "db.type"),
    "db_statement": ("db.query.text", "db.statement", "db.query.summary", "sql.query"),
    "http_method": ("http.request.method", "http.method"),
    "http_route": ("http.route",),
    "http_url": ("url.full", "http.url", "url.path", "http.target"),
    "http_status_code": ("http.response.status_code", "http.status_code"),
    "rpc_method": ("rpc.method",),
    # service.peer.name replaced peer.service in semantic conventions 1.39 (HotROD sets it on its mysql span)
    "peer": (
        "service.peer.name",
        "peer.service",
        "server.address",
        "net.peer.name",
        "net.sock.peer.addr",
        "network.peer.address",
    ),
    "messaging_destination": ("messaging.destination.name", "messaging.destination"),
}

# attribute key -> (column, priority); lower priority wins when a span carries several.
ATTRIBUTE_KEY_TO_COLUMN: dict[str, tuple[str, int]] = {
    key: (column, priority)
    for column, keys in SEMANTIC_ATTRIBUTE_COLUMNS.items()
    for priority, key in enumerate(keys)
}

HOST_RESOURCE_KEYS: tuple[str, ...] = ("host.name", "k8s.pod.name", "service.instance.id", "container.id")

# Attribute keys worth keeping as detector evidence (explicit lock/queue waits, retries, shards...).
HINT_KEY_PATTERN = re.compile(
    r"lock|queue|wait|retry|retries|attempt|resend|shard|partition|timeout|deadline|pool|worker"
    r"|concurren|semaphore|mutex|backoff|fallback|exception\.type|error\.type|bucket|replica",
    re.IGNORECASE,
)
# Event names worth keeping with their attributes in ``event_hints``.
HINT_EVENT_PATTERN = re.compile(
    r"lock|queue|wait|retry|attempt|timeout|deadline|exception|error|acquire|backoff|fallback",
    re.IGNORECASE,
)


def empty_span_table() -> pa.Table:
    return SPAN_SCHEMA.empty_table()
