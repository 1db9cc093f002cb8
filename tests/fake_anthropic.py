"""A fake Anthropic Messages API on 127.0.0.1 for agent tests (like httpx's test transports: a real
server speaking the real wire format, so the real SDK client is exercised end to end).

``POST /v1/messages`` answers from a script of steps, one per request, in order; every request body
is recorded (raw bytes and parsed JSON) so tests can assert what left the machine. When the script
runs out, the ``default`` step answers (by default a 500 that names the problem, so a test that
sends more requests than it scripted fails loudly rather than hanging).

Steps:
* :func:`text_reply` / :func:`tool_use_reply` / :func:`message_reply` — a 200 with a Message.
* :func:`error_reply` — an error status with the API's error body; ``retry-after-ms`` is set small
  so the SDK's retries stay fast.
* :func:`slow_reply` — sleep (interruptibly) before answering, to trip client timeouts.
* a callable ``(request_json) -> step`` — a step computed from the request.

Usage::

    with FakeAnthropic() as fake:
        fake.script(text_reply('{"id": {...}}'))
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_message_ids = itertools.count(1)


@dataclass
class Step:
    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    raw_body: bytes | None = None  # sent verbatim instead of ``body`` (for non-JSON answers)


StepLike = Step | Callable[[dict[str, Any]], Step]


def message_reply(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", *, usage: dict[str, int] | None = None
) -> Step:
    return Step(
        body={
            "id": f"msg_fake_{next(_message_ids)}",
            "type": "message",
            "role": "assistant",
            "model": "(set from request)",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage
            or {
                "input_tokens": 100,
                "output_tokens": 50,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
    )


def text_reply(text: str, stop_reason: str = "end_turn") -> Step:
    return message_reply([{"type": "text", "text": text}], stop_reason)


def json_reply(answer: Any, *, preamble: str = "") -> Step:
    return text_reply(preamble + json.dumps(answer))


def tool_use_reply(*calls: tuple[str, dict[str, Any]], text: str | None = None) -> Step:
    """A turn in which the model calls one or more tools (``(name, input)`` pairs)."""
    content: list[dict[str, Any]] = []
    if text:
        content.append({"type": "text", "text": text})
    for name, tool_input in calls:
        content.append(
            {"type": "tool_use", "id": f"toolu_fake_{next(_message_ids)}", "name": name, "input": tool_input}
        )
    return message_reply(content, "tool_use")


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_reply(status: int, message: str = "fake error", *, retry_after_ms: int = 5) -> Step:
    return Step(
        status=status,
        body={"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}},
        headers={"retry-after-ms": str(retry_after_ms)},
    )


def slow_reply(delay_s: float, then: Step | None = None) -> Step:
    step = then or text_reply("{}")
    return Step(
        status=step.status, body=step.body, headers=step.headers, delay_s=delay_s, raw_body=step.raw_body
    )


def raw_reply(raw: bytes, status: int = 200, content_type: str = "text/html") -> Step:
    return Step(status=status, raw_body=raw, headers={"content-type": content_type})


class FakeAnthropic:
    """The server. Start with ``with FakeAnthropic() as fake`` or :meth:`start` / :meth:`stop`."""

    def __init__(self, default: StepLike | None = None) -> None:
        self._steps: list[StepLike] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.default: StepLike = default or error_reply(500, "fake server: no scripted response left")
        self.requests: list[dict[str, Any]] = []  # parsed JSON bodies of POST /v1/messages
        self.raw_bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- script -----------------------------------------------------------------------------
    def script(self, *steps: StepLike) -> FakeAnthropic:
        with self._lock:
            self._steps.extend(steps)
        return self

    def _next_step(self, request: dict[str, Any]) -> Step:
        with self._lock:
            step = self._steps.pop(0) if self._steps else self.default
        return step(request) if callable(step) else step

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def all_request_text(self) -> str:
        """Every request body sent so far, decoded, joined: for "never sent" assertions."""
        with self._lock:
            return "\n".join(b.decode("utf-8", "replace") for b in self.raw_bodies)

    # --- lifecycle --------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        assert self._server is not None, "server not started"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def start(self) -> FakeAnthropic:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                return

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    parsed = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    parsed = {"_unparsable": raw.decode("utf-8", "replace")}
                with fake._lock:
                    fake.raw_bodies.append(raw)
                    fake.requests.append(parsed)
                    fake.headers.append({k.lower(): v for k, v in self.headers.items()})
                    fake.paths.append(self.path)
                if self.path.split("?")[0] != "/v1/messages":
                    self._send(
                        Step(
                            status=404,
                            body={
                                "type": "error",
                                "error": {"type": "not_found_error", "message": self.path},
                            },
                        )
                    )
                    return
                step = fake._next_step(parsed)
                if step.delay_s and fake._stopping.wait(step.delay_s):
                    return  # shutting down: drop the request
                if step.status == 200 and step.raw_body is None and "model" in step.body:
                    step = Step(
                        status=200,
                        body={**step.body, "model": parsed.get("model", "unknown")},
                        headers=step.headers,
                    )
                self._send(step)

            def _send(self, step: Step) -> None:
                payload = step.raw_body if step.raw_body is not None else json.dumps(step.body).encode()
                try:
                    self.send_response(step.status)
                    headers = {"content-type": "application/json", "request-id": "req_fake", **step.headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout fired): nothing to answer

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
