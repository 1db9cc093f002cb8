"""OpenTelemetry wiring for the workload's services: one TracerProvider per service, as separate
processes would have, each with its own span processor (built by the caller's factory, so the
same services export through the OTLP exporter or into memory)."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from fastapi import FastAPI
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor, RequestInfo
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span

SpanProcessorFactory = Callable[[], SpanProcessor]

# The request extension that carries a client call's URL template (the route it calls), so the
# client span is named "{method} {template}" as the HTTP semantic conventions recommend, instead of
# the bare "{method}" the httpx instrumentation uses when it does not know the template.
URL_TEMPLATE_EXTENSION = "hourglass.url_template"
RESEND_COUNT_EXTENSION = "hourglass.resend_count"
_PATH_NUMBER = re.compile(r"/\d+(?=/|$)")


@dataclass
class ServiceTelemetry:
    """The tracer provider of one service and the instrumentation helpers bound to it."""

    name: str
    provider: TracerProvider
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    def instrument_app(self, app: FastAPI) -> None:
        # ASGI "http send"/"http receive" spans are transport noise, as most deployments configure.
        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=self.provider, exclude_spans=["receive", "send"]
        )

    def http_client(self, base_url: str, timeout_s: float = 10.0) -> httpx.AsyncClient:
        """An httpx client whose requests become CLIENT spans named by their route template."""
        client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        HTTPXClientInstrumentor.instrument_client(
            client, tracer_provider=self.provider, request_hook=_async_name_client_span
        )
        self._clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()
        self._clients.clear()


def _template_for(info: RequestInfo) -> str:
    extensions = info.extensions or {}
    template = extensions.get(URL_TEMPLATE_EXTENSION)
    if isinstance(template, str):
        return template
    url = info.url if isinstance(info.url, httpx.URL) else httpx.URL(str(info.url))
    return _PATH_NUMBER.sub("/{id}", url.path)


async def _async_name_client_span(span: Span, info: RequestInfo) -> None:
    template = _template_for(info)
    method = info.method.decode() if isinstance(info.method, bytes) else str(info.method)
    span.update_name(f"{method} {template}")
    span.set_attribute("url.template", template)
    resend_count = (info.extensions or {}).get(RESEND_COUNT_EXTENSION)
    if isinstance(resend_count, int) and resend_count > 0:
        span.set_attribute("http.request.resend_count", resend_count)


def make_provider(service: str, processor_factory: SpanProcessorFactory, instance: str) -> TracerProvider:
    resource = Resource.create(
        {
            "service.name": service,
            "service.namespace": "hourglass-workload",
            "service.version": "1.0.0",
            "service.instance.id": instance,
            "deployment.environment.name": "workload",
        }
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor_factory())
    return provider
