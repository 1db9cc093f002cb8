"""Hourglass's own traces (opt-in): ``serve --self-traces-endpoint`` / ``HOURGLASS_SELF_TRACES_ENDPOINT``
sends spans about its own work through the OpenTelemetry SDK to another OTLP endpoint (a Collector,
Jaeger, Tempo, or another Hourglass):

* ``hourglass.analysis`` — one per analysis run (outcome, spans analysed, recommendations, reason),
  with a child span per step (store_stats, scan, analysis, snapshot...) laid end to end;
* ``hourglass.export`` — one per OTLP Export answered (protocol, outcome), under load sampled by
  the SDK's batch queue (a full queue drops spans, never blocks an Export).

Off by default, and never to itself: an endpoint that is this server's own OTLP receiver would
make every Export produce more Exports, so it is refused at start-up. The provider is private to
the server (the global OpenTelemetry provider is left alone).

Endpoints: ``http://HOST:4318`` or ``https://...`` (OTLP/HTTP; ``/v1/traces`` is added when the URL
has no path) and ``HOST:4317`` or ``grpc://HOST:4317`` (OTLP/gRPC, plaintext).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context

__all__ = ["SelfTracing", "parse_endpoint", "start_self_tracing"]

SCOPE = "hourglass.self"


def parse_endpoint(endpoint: str) -> tuple[str, str, int, str]:
    """``(protocol, host, port, exporter endpoint)``; ``protocol`` is ``grpc`` or ``http``."""
    text = endpoint.strip()
    if "://" not in text:
        text = f"grpc://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("grpc", "http", "https") or not parts.hostname:
        raise ValueError(
            f"self-traces endpoint {endpoint!r}: expected HOST:PORT or grpc://HOST:PORT (OTLP/gRPC) or "
            "http(s)://HOST:PORT[/v1/traces] (OTLP/HTTP)"
        )
    if parts.scheme == "grpc":
        port = parts.port or 4317
        return "grpc", parts.hostname, port, f"{parts.hostname}:{port}"
    port = parts.port or (443 if parts.scheme == "https" else 4318)
    path = parts.path if parts.path not in ("", "/") else "/v1/traces"
    return "http", parts.hostname, port, f"{parts.scheme}://{parts.netloc}{path}"


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def _is_this_machine(host: str) -> bool:
    local = {"0.0.0.0", "::"} | _addresses(socket.gethostname())
    return any(ipaddress.ip_address(a).is_loopback or a in local for a in _addresses(host))


def check_not_self(endpoint: str, own_ports: set[int]) -> None:
    """Refuse an endpoint that is one of this server's own OTLP receivers (a feedback loop)."""
    _, host, port, _ = parse_endpoint(endpoint)
    if port in own_ports and _is_this_machine(host):
        raise ValueError(
            f"self-traces endpoint {endpoint!r} is this server's own OTLP receiver: every Export would "
            "produce more Exports. Send Hourglass's traces to another collector or Hourglass."
        )


class SelfTracing:
    """The server's private tracer provider and the listeners that turn its work into spans."""

    def __init__(self, endpoint: str, *, service_version: str = "0.1.0", exporter: Any = None) -> None:
        protocol, _, _, target = parse_endpoint(endpoint)
        if exporter is None:
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

                exporter = Grpc(endpoint=target, insecure=True, timeout=10)
            else:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

                exporter = Http(endpoint=target, timeout=10)
        resource = Resource.create(
            {
                "service.name": "hourglass",
                "service.version": service_version,
                "host.name": socket.gethostname(),
            }
        )
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer(SCOPE)
        self.endpoint = endpoint

    # -- listeners ----------------------------------------------------------------------------
    def on_export(self, protocol: str, outcome: str, seconds: float) -> None:
        end = time.time_ns()
        span = self.tracer.start_span(
            "hourglass.export",
            kind=SpanKind.SERVER,
            start_time=end - int(seconds * 1e9),
            attributes={
                "rpc.system": "grpc" if protocol == "grpc" else "http",
                "hourglass.export.outcome": outcome,
            },
        )
        if outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, outcome))
        span.end(end_time=end)

    def analysis_listener(self, service: Any) -> Any:
        """A run listener for ``AnalysisService.run_listeners`` (reads the run's steps from ``service``)."""

        def on_run(outcome: str, seconds: float, snapshot: Any) -> None:
            end = time.time_ns()
            start = end - int(seconds * 1e9)
            attributes: dict[str, Any] = {"hourglass.analysis.outcome": outcome}
            if snapshot is not None:
                report = snapshot.report
                attributes.update(
                    {
                        "hourglass.analysis.generation": snapshot.generation,
                        "hourglass.analysis.reason": snapshot.reason,
                        "hourglass.analysis.spans": int(report.get("spans_analyzed") or 0),
                        "hourglass.analysis.traces": int(report.get("traces_analyzed") or 0),
                        "hourglass.analysis.recommendations": len(report.get("recommendations") or []),
                    }
                )
            root = self.tracer.start_span("hourglass.analysis", start_time=start, attributes=attributes)
            if outcome != "ok":
                status = service.status() if hasattr(service, "status") else {}
                root.set_status(Status(StatusCode.ERROR, str(status.get("last_error") or outcome)))
            elif hasattr(service, "status"):
                cursor = start
                context = set_span_in_context(root)
                for step, ms in (service.status().get("last_stages_ms") or {}).items():
                    if step in ("html", "release"):  # after the run
                        continue
                    step_end = min(cursor + int(ms * 1e6), end)
                    self.tracer.start_span(
                        f"hourglass.analysis.{step}", context=context, start_time=cursor
                    ).end(end_time=step_end)
                    cursor = step_end
            root.end(end_time=end)

        return on_run

    def shutdown(self) -> None:
        self.provider.shutdown()


def start_self_tracing(
    endpoint: str | None, *, own_ports: set[int], analysis: Any, ingest: Any
) -> SelfTracing | None:
    """Attach the listeners when an endpoint is set (``None``: off). Raises ``ValueError`` for an
    unusable endpoint or this server's own receiver."""
    if not endpoint:
        return None
    check_not_self(endpoint, own_ports)
    tracing = SelfTracing(endpoint)
    analysis.run_listeners.append(tracing.analysis_listener(analysis))
    ingest.exports.listeners.append(tracing.on_export)
    return tracing
