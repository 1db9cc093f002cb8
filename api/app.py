"""The FastAPI application factory: REST API and report pages over a span store."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from collector.store import SpanStore


def create_app(store: SpanStore, **options: Any) -> FastAPI:
    app = FastAPI(title="Hourglass", version="0.1.0")
    app.state.store = store

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/stats")
    def stats() -> dict[str, int]:
        s = store.stats()
        return {"spans": s.spans, "traces": s.traces}

    return app
