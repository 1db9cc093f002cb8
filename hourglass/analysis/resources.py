"""Per-service resource facts the write-up needs: the SDK language, the namespace and the owner.

The store keeps resource attributes in ``resource_json`` (once per resource, repeated per span),
which the analysis frame leaves out. These helpers read it cheaply — one ``unique`` over
``(service, resource_json)`` for a table that carries the column, or a scan of one trace per
service for a store — and return ``{service: {"language", "namespace", "owner"}}``.

Where the language comes from, first match wins:

* ``telemetry.sdk.language`` (OpenTelemetry SDKs: go, java, python, nodejs, dotnet, ruby, php,
  rust, cpp, erlang, swift, webjs);
* ``process.runtime.name`` (``CPython`` → python, ``OpenJDK Runtime Environment`` → java, ...);
* a Jaeger client's ``jaeger.version`` process tag (``Go-2.30.0`` → go, ``Java-1.8.1`` → java,
  ``Python-4.8.0`` → python, ``Node-3.18.1`` → nodejs, ``CSharp-1.0`` → dotnet).

Traces with none of these (Zipkin files, the real-workloads files) get no language; the writer
then writes neutral pseudocode. The owner comes from ``service.owner``, ``team``, ``owner`` or
``app.owner``.

A table read from the store carries no ``resource_json`` column: :func:`attach_store_resources`
puts the mapping in the table's schema metadata (Arrow keeps it through IPC and pickling), and
:func:`service_resources` reads it back from there.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

log = logging.getLogger(__name__)

METADATA_KEY = b"hourglass.service_resources"
LANGUAGES = (
    "go",
    "java",
    "python",
    "nodejs",
    "dotnet",
    "ruby",
    "php",
    "rust",
    "cpp",
    "erlang",
    "swift",
    "webjs",
)
_ALIASES = {
    "golang": "go",
    "node": "nodejs",
    "node.js": "nodejs",
    "javascript": "nodejs",
    "js": "nodejs",
    "typescript": "nodejs",
    "csharp": "dotnet",
    "c#": "dotnet",
    ".net": "dotnet",
    "c++": "cpp",
    "cpython": "python",
    "pypy": "python",
    "openjdk runtime environment": "java",
    "java(tm) se runtime environment": "java",
    "jvm": "java",
    "kotlin": "java",
    "scala": "java",
    ".net core": "dotnet",
    ".net framework": "dotnet",
    "elixir": "erlang",
}
OWNER_KEYS = ("service.owner", "team", "owner", "app.owner", "service.team")
MAX_RESOURCES_PER_SERVICE = 8

ServiceResources = dict[str, dict[str, str | None]]


def normalise_language(value: Any) -> str | None:
    """``"Go"`` → ``"go"``, ``"CPython"`` → ``"python"``, ``"Java-1.8.1"`` → ``"java"``; None if unknown."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().lower()
    if text in LANGUAGES:
        return text
    if text in _ALIASES:
        return _ALIASES[text]
    head = text.split("-", 1)[0].split("/", 1)[0].strip()
    if head in LANGUAGES:
        return head
    return _ALIASES.get(head)


def resource_facts(attributes: dict[str, Any]) -> dict[str, str | None]:
    """The language, namespace and owner named by one resource's attributes."""
    language = None
    for key in ("telemetry.sdk.language", "process.runtime.name", "jaeger.version"):
        language = normalise_language(attributes.get(key))
        if language:
            break
    owner = next((str(attributes[k]) for k in OWNER_KEYS if attributes.get(k)), None)
    namespace = attributes.get("service.namespace")
    return {
        "language": language,
        "namespace": str(namespace) if namespace else None,
        "owner": owner,
    }


def _merge(facts: list[dict[str, str | None]]) -> dict[str, str | None]:
    """One service's facts from its resources: the most common non-empty value of each field."""
    out: dict[str, str | None] = {}
    for key in ("language", "namespace", "owner"):
        values = [str(f[key]) for f in facts if f.get(key)]
        out[key] = max(sorted(set(values)), key=values.count) if values else None
    return out


def _from_pairs(pairs: list[tuple[str, str | None]]) -> ServiceResources:
    per_service: dict[str, list[dict[str, str | None]]] = {}
    bad = 0
    # sorted: which resources a service's first MAX_RESOURCES_PER_SERVICE are must not depend on input order
    for service, text in sorted(pairs, key=lambda p: (str(p[0]), p[1] or "")):
        facts = per_service.setdefault(str(service), [])
        if not text or len(facts) >= MAX_RESOURCES_PER_SERVICE:
            continue
        try:
            attributes = json.loads(text)
        except ValueError:
            bad += 1
            continue
        if isinstance(attributes, dict):
            facts.append(resource_facts(attributes))
    if bad:
        log.warning("%d resource_json values were not JSON; their services' language is unknown", bad)
    return {service: _merge(facts) for service, facts in per_service.items()}


def service_resources(table: pa.Table | pl.DataFrame | None) -> ServiceResources:
    """``{service: {"language", "namespace", "owner"}}`` from span rows with a ``resource_json``
    column, or from the mapping :func:`attach_store_resources` put in the table's metadata.
    An empty mapping when neither is there."""
    if table is None:
        return {}
    if isinstance(table, pa.Table):
        meta = table.schema.metadata or {}
        if METADATA_KEY in meta:
            try:
                data = json.loads(meta[METADATA_KEY])
            except ValueError:
                return {}
            return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}
        if "resource_json" not in table.column_names or "service" not in table.column_names:
            return {}
        return _from_pairs(_unique_pairs(table.column("service"), table.column("resource_json")))
    else:
        if "resource_json" not in table.columns or "service" not in table.columns:
            return {}
        frame = table.select("service", "resource_json")
    assert isinstance(frame, pl.DataFrame)
    # resource_json repeats per span: unique pairs are few (one per resource)
    pairs = frame.unique(maintain_order=True).rows()
    return _from_pairs([(s, r) for s, r in pairs])


def _unique_pairs(services: pa.ChunkedArray, texts: pa.ChunkedArray) -> list[tuple[str, str | None]]:
    """The distinct (service, resource_json) pairs, in Arrow without copying the repeated strings:
    each column dictionary-encoded, the pairs of codes made unique with numpy. (Arrow's own
    ``group_by`` would load ``pyarrow.acero``, which imports pandas: half a second of start-up.)"""
    if len(services) == 0:
        return []
    s_dict = services.combine_chunks().dictionary_encode()
    t_dict = texts.combine_chunks().dictionary_encode()
    s_codes = _codes(s_dict.indices)
    t_codes = _codes(t_dict.indices)
    keys = np.unique(s_codes * (len(t_dict.dictionary) + 1) + t_codes)
    s_names = [None, *s_dict.dictionary.to_pylist()]
    t_names = [None, *t_dict.dictionary.to_pylist()]
    width = len(t_dict.dictionary) + 1
    return [(s_names[k // width], t_names[k % width]) for k in keys.tolist()]


def _codes(indices: pa.Array) -> np.ndarray:
    """Dictionary indices + 1 as int64, 0 for null."""
    codes = pl.from_arrow(indices)  # through polars: pyarrow's to_numpy imports pandas
    assert isinstance(codes, pl.Series)
    return (codes.cast(pl.Int64).fill_null(-1) + 1).to_numpy()


# Instrumentation scope (library) names that give the language away, first match wins.
_SCOPE_HINTS: tuple[tuple[str, str], ...] = (
    ("io.opentelemetry.contrib.php", "php"),
    ("opentelemetry-php", "php"),
    ("go.opentelemetry.io", "go"),
    ("github.com/", "go"),
    ("io.opentelemetry.", "java"),
    ("org.springframework", "java"),
    ("io.micrometer", "java"),
    ("opentelemetry.instrumentation.", "python"),
    ("opentelemetry.sdk", "python"),
    ("@opentelemetry/", "nodejs"),
    ("microsoft.", "dotnet"),
    ("system.net.http", "dotnet"),
    ("opentelemetry::instrumentation::", "ruby"),
    ("tracing-opentelemetry", "rust"),
)


def language_from_scope(scope_name: Any) -> str | None:
    """The language an instrumentation scope name implies (``go.opentelemetry.io/contrib/...`` → go,
    ``io.opentelemetry.spring-webmvc-6.0`` → java, ``opentelemetry.instrumentation.flask`` →
    python, ``@opentelemetry/instrumentation-http`` → nodejs, ``OpenTelemetry.Instrumentation.AspNetCore``
    → dotnet); None when it says nothing."""
    if not isinstance(scope_name, str) or not scope_name:
        return None
    text = scope_name.strip().lower()
    # .NET scopes are PascalCase dotted names: check them before Python's dotted prefix
    if scope_name.startswith("OpenTelemetry.Instrumentation.") or scope_name.startswith("Microsoft."):
        return "dotnet"
    for prefix, language in _SCOPE_HINTS:
        if text.startswith(prefix):
            return language
    return None


def scope_languages(spans: pl.DataFrame) -> dict[str, str]:
    """{service: language} from the instrumentation scope names of its spans (one ``unique`` over
    (service, scope_name)); the most common implied language per service."""
    if spans.height == 0 or "scope_name" not in spans.columns:
        return {}
    pairs = spans.select("service", "scope_name").unique().rows()
    votes: dict[str, list[str]] = {}
    for service, scope in pairs:
        language = language_from_scope(scope)
        if language:
            votes.setdefault(str(service), []).append(language)
    return {s: max(sorted(set(v)), key=v.count) for s, v in votes.items()}


def store_resources(store: Any, table: pa.Table) -> ServiceResources:
    """The resources of every service in ``table`` (scanned without ``resource_json``), read from
    ``store`` through one trace per service (``SpanStore.scan(trace_ids=..., columns=...)``)."""
    if table.num_rows == 0 or "service" not in table.column_names or "trace_id" not in table.column_names:
        return {}
    frame = pl.from_arrow(table.select(["service", "trace_id"]))
    assert isinstance(frame, pl.DataFrame)
    sample = frame.group_by("service").agg(pl.col("trace_id").first())["trace_id"].unique().to_list()
    try:
        rows = store.scan(trace_ids=sample, columns=("service", "resource_json"))
    except Exception as exc:  # a store without the column: languages stay unknown
        log.warning("could not read service resources from the store: %s", exc)
        return {}
    return service_resources(rows)


def attach_store_resources(table: pa.Table, store: Any) -> pa.Table:
    """``table`` with its services' resources (from ``store``) in the schema metadata, so the
    analysis (maybe in another process) can name each service's language."""
    if "resource_json" in table.column_names:
        return table
    resources = store_resources(store, table)
    meta = dict(table.schema.metadata or {})
    meta[METADATA_KEY] = json.dumps(resources, sort_keys=True).encode()
    return table.replace_schema_metadata(meta)
