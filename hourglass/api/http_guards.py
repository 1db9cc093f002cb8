"""Guards for the HTTP ports of `hourglass serve` (the REST API and OTLP/HTTP) against hostile or
broken clients, and clear answers when the store's disk is full.

* :func:`guarded_h11_protocol` — uvicorn's h11 protocol with read deadlines: a connection must
  send a complete request head within ``header_timeout`` seconds of connecting (or of its
  previous response: an idle keep-alive connection is closed by uvicorn's ``timeout_keep_alive``
  first), and a request body within ``body_timeout`` seconds of its head. Slow-loris senders and
  sockets that connect and say nothing are closed instead of being held forever (each is a file
  descriptor and a little memory). The concurrency limit is uvicorn's ``limit_concurrency``
  (503 beyond it), set by ``hourglass.api.serve``.
* :class:`JsonDepthGuard` — a JSON request body nested deeper than
  :data:`hourglass.collector.json_limits.MAX_JSON_DEPTH` is answered 400 before any handler parses it
  (``json.loads`` would recurse until ``RecursionError``: a 500 and a traceback per request).
* :class:`DiskFullGuard` — a read that fails because the store's disk is full (the staged rows
  it must load first cannot be written) is answered 503 with ``Retry-After`` and a body saying
  why, instead of 500.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from typing import Any

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from hourglass.collector import json_limits

log = logging.getLogger("hourglass.http")

DISK_FULL_RETRY_AFTER_S = 30
MAX_JSON_BODY_BYTES = 8 * 1024 * 1024  # API bodies are small; OTLP bodies have their own limit


def guarded_h11_protocol(header_timeout: float, body_timeout: float) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with the two read deadlines."""

    class GuardedH11Protocol(H11Protocol):
        _phase = "head"
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm("head", header_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                if self.conn.their_state is h11.IDLE:
                    self._arm("head", header_timeout)  # the next request's head, if any
                else:
                    self._follow()  # a pipelined request already under way

        def _follow(self) -> None:
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._phase != "body":
                self._arm("body", body_timeout)
            elif state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR) and self._phase != "done":
                self._phase = "done"
                self._disarm()

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expire, phase, seconds)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self, phase: str, seconds: float) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            log.info("%sclosing a connection: no complete request %s within %gs", prefix, phase, seconds)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.transport.close()

    return GuardedH11Protocol


def _json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> tuple[Message, Message]:
    body = json.dumps({"detail": detail}).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return (
        {"type": "http.response.start", "status": status, "headers": raw_headers},
        {"type": "http.response.body", "body": body},
    )


class JsonDepthGuard:
    """Refuses JSON bodies nested too deep (400) or too large (413) before the app parses them."""

    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_JSON_BODY_BYTES) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        content_type = dict(scope["headers"]).get(b"content-type", b"").split(b";")[0].strip().lower()
        if not (content_type == b"application/json" or content_type.endswith(b"+json")):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                for part in _json_error(413, f"JSON body over {self.max_body_bytes} bytes"):
                    await send(part)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            json_limits.check_json_depth(body)
        except json_limits.JsonTooDeep as exc:
            client = scope.get("client")
            log.warning(
                "request %s %s from %s refused (400): %s", scope["method"], scope["path"], client, exc
            )
            for part in _json_error(400, f"request body refused: {exc}"):
                await send(part)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def is_disk_full(exc: BaseException) -> bool:
    """True for a failure caused by a full disk (or an exhausted quota), however it was wrapped."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current).lower()
        if "no space left on device" in text or "disk is full" in text or "disk quota exceeded" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class DiskFullGuard:
    """Answers 503 with ``Retry-After`` (not 500) when a request fails because the disk is full."""

    def __init__(self, app: ASGIApp, retry_after_s: int = DISK_FULL_RETRY_AFTER_S) -> None:
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started or not is_disk_full(exc):
                raise
            log.error(
                "%s %s: the store's disk is full (%s); answered 503", scope["method"], scope["path"], exc
            )
            detail = (
                "the store's disk is full, so the spans staged for it cannot be loaded and this read "
                f"cannot be answered; free space on the store's volume and retry ({type(exc).__name__}: {exc})"
            )
            for part in _json_error(503, detail, {"Retry-After": str(self.retry_after_s)}):
                await send(part)


def install(app: Any) -> None:
    """Add the body and disk-full guards to a Starlette/FastAPI app (outermost: the disk guard)."""
    app.add_middleware(JsonDepthGuard)
    app.add_middleware(DiskFullGuard)
