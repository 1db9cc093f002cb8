"""OTLP JSON: ``TracesData`` or ``ExportTraceServiceRequest`` (the same JSON shape).

The decoding itself (hex or base64 ids, string or integer nanoseconds, enum names or numbers) is
:func:`hourglass.collector.decode.decode_otlp_json`; this module recognises the shape and merges several
documents (lines of a JSON Lines file) into one ``TracesData`` so they are decoded in one call.
"""

from __future__ import annotations

from typing import Any

__all__ = ["is_otlp_json", "merge_traces_data", "resource_spans_of", "unwrap_otlp_json"]

_KEYS = ("resourceSpans", "resource_spans")


def is_otlp_json(obj: Any) -> bool:
    """A JSON object with ``resourceSpans`` (or protobuf's snake_case ``resource_spans``)."""
    return isinstance(obj, dict) and any(key in obj for key in _KEYS)


def unwrap_otlp_json(obj: Any) -> Any:
    """OTLP JSON as trace backends wrap it → a plain ``TracesData``; anything else unchanged.

    - Jaeger ``/api/v3``: ``{"result": {"resourceSpans": [...]}}``;
    - Grafana Tempo ``/api/v2/traces/{id}``: ``{"trace": {"resourceSpans": [...]}}``;
    - Tempo ``/api/traces/{id}`` and Grafana's trace download: ``{"batches": [...]}`` (Tempo's name
      for ``resourceSpans``), also inside ``trace``.
    """
    if not isinstance(obj, dict):
        return obj
    for wrapper in ("result", "trace"):
        inner = obj.get(wrapper)
        if (
            len(obj) <= 2
            and isinstance(inner, dict)
            and (is_otlp_json(inner) or isinstance(inner.get("batches"), list))
        ):
            obj = inner
            break
    if "resourceSpans" not in obj and isinstance(obj.get("batches"), list):
        return {"resourceSpans": obj["batches"]}
    return obj


def resource_spans_of(obj: dict[str, Any]) -> list[Any]:
    """The ``resourceSpans`` list of an OTLP JSON object (empty when absent or null)."""
    for key in _KEYS:
        value = obj.get(key)
        if value is not None:
            return value if isinstance(value, list) else [value]
    return []


def merge_traces_data(documents: list[dict[str, Any]]) -> dict[str, Any]:
    """One ``TracesData`` holding the ``resourceSpans`` of every document, in order.

    Merging is what protobuf does for concatenated messages, so decoding the merge yields exactly
    the rows of decoding each document; the caller re-decodes documents one by one only when the
    merged decode reports a problem, to say which document it was in.
    """
    if len(documents) == 1:
        return documents[0]
    merged: list[Any] = []
    for document in documents:
        merged.extend(resource_spans_of(document))
    return {"resourceSpans": merged}
