"""The Anthropic write-up agent against a fake Messages API on 127.0.0.1 (the real SDK client, the
real HTTP wire format): tool-use turns, direct answers, malformed answers, 429/500/401, timeouts,
an unreachable endpoint, the turn limit, the write-up cache, prompt-caching markers, and planted
secrets that must appear in no request body."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hourglass.analysis.agent import (
    DEFAULT_MODEL,
    TOOLS,
    AgentLimits,
    AnthropicWriter,
    extract_json_object,
    ungrounded_numbers,
)
from hourglass.analysis.writer import WriteOutcome, WrittenText
from tests.cli import otlp_json
from tests.fake_anthropic import (
    FakeAnthropic,
    Step,
    error_reply,
    json_reply,
    message_reply,
    raw_reply,
    slow_reply,
    text_reply,
    tool_use_reply,
)

pytestmark = pytest.mark.timeout(20)

MODEL = "claude-test-model"
REC_A = "serialized_calls-00000000000000aa"
REC_B = "n_plus_one-00000000000000bb"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# Planted secrets: each must never leave the machine.
SECRET_EMAIL = "jane.doe@example.com"
SECRET_BEARER = "Bearer s3cr3tT0kenValue42xyz"
SECRET_BEARER_TOKEN = "s3cr3tT0kenValue42xyz"
SECRET_QUERY_PASSWORD = "hunter2pass"
SECRET_SSN = "078-05-1120"
SECRET_USER_ID = "user-8812731"
SECRETS = [SECRET_EMAIL, SECRET_BEARER_TOKEN, SECRET_QUERY_PASSWORD, SECRET_SSN, SECRET_USER_ID]


def recommendations(saved_p50: float = 118.0) -> list[dict[str, Any]]:
    return [
        {
            "id": REC_A,
            "rank": 1,
            "kind": "serialized_calls",
            "category": "parallelization",
            "service": "checkout",
            "operation": "POST /checkout",
            "targets": [
                {"service": "inventory", "operation": "GET /stock"},
                {"service": "pricing", "operation": "GET /price"},
            ],
            "traces_affected": 310,
            "occurrences": 942,
            "impact": {
                "saved_ms_p50": saved_p50,
                "saved_ms_p95": 201.5,
                "saved_ms_total": 40120.0,
                "share_of_root_latency": 0.41,
            },
            "confidence": 0.8,
            "evidence": {
                "trace_ids": [TRACE_ID],
                "span_ids": ["00f067aa0ba902b7"],
                "gap_ms_p50": 1.2,
                "example_url": f"https://pricing.internal/api/price?sku=77&password={SECRET_QUERY_PASSWORD}",
                "attributes": {
                    "enduser.id": SECRET_USER_ID,
                    "http.request.header.authorization": SECRET_BEARER,
                },
            },
            "title": "",
            "summary": "",
            "actions": [],
        },
        {
            "id": REC_B,
            "rank": 2,
            "kind": "n_plus_one",
            "category": "parallelization",
            "service": "orders",
            "operation": "GET /orders",
            "targets": [{"service": "orders-db", "operation": "SELECT orders_items"}],
            "traces_affected": 120,
            "occurrences": 120,
            "impact": {
                "saved_ms_p50": 64.0,
                "saved_ms_p95": 90.0,
                "saved_ms_total": 7680.0,
                "share_of_root_latency": 0.22,
            },
            "confidence": 0.9,
            "evidence": {
                "trace_ids": [TRACE_ID],
                "repeats_p50": 25,
                "statement": f"SELECT * FROM items WHERE order_id = 991 AND ssn = '{SECRET_SSN}'",
                "notified": SECRET_EMAIL,
            },
            "title": "",
            "summary": "",
            "actions": [],
        },
    ]


class PlantedContext:
    """A WriterContext whose answers carry the planted secrets in span attributes and statements."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def finding_evidence(self, recommendation_id: str) -> dict[str, Any] | None:
        self.calls.append(("evidence", recommendation_id))
        if recommendation_id not in (REC_A, REC_B):
            return None
        return {
            "id": recommendation_id,
            "occurrences": [
                {
                    "trace_id": TRACE_ID,
                    "numbers": {"saved_ms": 117.5, "serial_ms": 240.0},
                    "spans": [
                        {
                            "name": f"GET /users?email={SECRET_EMAIL}",
                            "attributes": [
                                {
                                    "key": "http.request.header.authorization",
                                    "value": {"stringValue": SECRET_BEARER},
                                },
                                {"key": "user.id", "value": {"stringValue": SECRET_USER_ID}},
                                {
                                    "key": "db.statement",
                                    "value": f"SELECT name FROM people WHERE ssn = '{SECRET_SSN}'",
                                },
                                {
                                    "key": "http.url",
                                    "value": f"https://api.example.org/login?user=jd&password={SECRET_QUERY_PASSWORD}",
                                },
                            ],
                        }
                    ],
                }
            ],
        }

    def critical_path(self, trace_id: str) -> list[dict[str, Any]] | None:
        self.calls.append(("critical_path", trace_id))
        if trace_id != TRACE_ID:
            return None
        return [
            {"service": "checkout", "name": "POST /checkout", "duration_ms": 420.0, "self_ms": 12.0},
            {
                "service": "inventory",
                "name": f"GET /stock?owner={SECRET_EMAIL}",
                "duration_ms": 180.0,
                "self_ms": 180.0,
            },
            {"service": "pricing", "name": "GET /price", "duration_ms": 160.0, "self_ms": 160.0},
        ]

    def service_neighbours(self, service: str) -> dict[str, list[dict[str, Any]]]:
        self.calls.append(("neighbours", service))
        return {
            "callers": [{"service": "frontend", "operation": "POST /buy", "calls": 310, "p50_ms": 450.0}],
            "callees": [
                {
                    "service": "inventory",
                    "operation": f"Authorization: {SECRET_BEARER}",
                    "calls": 310,
                    "p50_ms": 180.0,
                }
            ],
        }


class StubTemplateWriter:
    """Stands in for the template writer: deterministic text naming the id."""

    name = "template"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def write(self, recommendations: list[dict[str, Any]], context: Any) -> WriteOutcome:
        self.calls.append([r["id"] for r in recommendations])
        texts = {
            r["id"]: WrittenText(
                f"template title {r['id']}", f"template summary {r['id']}", ["template action"]
            )
            for r in recommendations
        }
        return WriteOutcome(texts=texts, writer="template")


def good_answer(ids: tuple[str, ...] = (REC_A, REC_B)) -> dict[str, Any]:
    texts = {
        REC_A: {
            "title": "Run `GET /stock` and `GET /price` in parallel in `checkout`",
            "summary": "`POST /checkout` waits for `GET /stock` before calling `GET /price`. Running them together "
            "saves 118 ms at p50 and 201.5 ms at p95 across 310 traces (41% of root latency).",
            "actions": ["Issue `GET /stock` and `GET /price` concurrently in `POST /checkout`."],
        },
        REC_B: {
            "title": "Batch `SELECT orders_items` in `GET /orders`",
            "summary": "`GET /orders` runs `SELECT orders_items` 25 times per request; one batched query saves 64 ms at p50.",
            "actions": [
                "Load the items of all orders with one `IN (...)` query.",
                "Add a test that counts the queries.",
            ],
        },
    }
    return {rid: texts[rid] for rid in ids}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeAnthropic]:
    server = FakeAnthropic().start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("HOURGLASS_CACHE_DIR", str(tmp_path / "cache"))
    try:
        yield server
    finally:
        server.stop()


def make_writer(tmp_path: Path, **limits: Any) -> tuple[AnthropicWriter, StubTemplateWriter]:
    fallback = StubTemplateWriter()
    settings = {"request_timeout_s": 2.0, "deadline_s": 8.0, "max_retries": 2, "max_turns": 6} | limits
    writer = AnthropicWriter(
        fallback, model=MODEL, limits=AgentLimits(**settings), cache_dir=tmp_path / "writeups"
    )
    return writer, fallback


# --- answers ---------------------------------------------------------------------------------


def test_direct_answer_without_tools(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()))
    writer, fallback = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == f"anthropic:{MODEL}"
    assert outcome.fallback_reason is None
    assert outcome.texts[REC_A].title == good_answer()[REC_A]["title"]
    assert outcome.texts[REC_B].actions == good_answer()[REC_B]["actions"]
    assert fallback.calls == []
    assert fake.request_count == 1
    assert fake.paths == ["/v1/messages"]
    request = fake.requests[0]
    assert request["model"] == MODEL
    assert "tool_choice" not in request
    assert [t["name"] for t in request["tools"]] == [
        "get_finding_evidence",
        "get_critical_path",
        "get_design_facts",
        "get_service_neighbours",
    ]
    assert REC_A in request["messages"][0]["content"][0]["text"]
    assert outcome.metadata["requests"] == 1 and outcome.metadata["cache"] == "miss"


def test_prompt_caching_markers_on_system_tools_and_payload(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    writer.write(recommendations(), PlantedContext())
    request = fake.requests[0]
    assert request["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert request["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert request["messages"][0]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    markers = json.dumps(request).count('"cache_control"')
    assert markers <= 4  # the API allows at most four breakpoints


def test_tool_use_turns_then_answer(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(
        tool_use_reply(
            ("get_finding_evidence", {"recommendation_id": REC_A}),
            ("get_critical_path", {"trace_id": TRACE_ID}),
        ),
        tool_use_reply(("get_service_neighbours", {"service": "checkout"}), text="Checking the callers."),
        json_reply(good_answer()),
    )
    writer, _ = make_writer(tmp_path)
    context = PlantedContext()
    outcome = writer.write(recommendations(), context)
    assert outcome.fallback_reason is None
    assert outcome.writer == f"anthropic:{MODEL}"
    assert context.calls == [("evidence", REC_A), ("critical_path", TRACE_ID), ("neighbours", "checkout")]
    assert fake.request_count == 3
    assert outcome.metadata["tool_calls"] == [
        "get_finding_evidence",
        "get_critical_path",
        "get_service_neighbours",
    ]

    second = fake.requests[1]["messages"]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]
    assert [b["type"] for b in second[1]["content"]] == [
        "tool_use",
        "tool_use",
    ]  # the model's turn, echoed back
    results = second[2]["content"]
    assert [r["type"] for r in results] == ["tool_result", "tool_result"]
    assert results[0]["tool_use_id"] == second[1]["content"][0]["id"]
    assert "117.5" in results[0]["content"]  # the evidence's numbers reach the model
    assert json.loads(results[1]["content"])["spans"][0]["duration_ms"] == 420.0
    third = fake.requests[2]["messages"]
    assert json.loads(third[4]["content"][0]["content"])["callers"][0]["calls"] == 310


def test_tool_errors_are_reported_to_the_model_not_fatal(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(
        tool_use_reply(
            ("get_finding_evidence", {"recommendation_id": "no-such-id"}),
            ("get_critical_path", {"trace_id": "../../etc/passwd"}),
            ("delete_everything", {}),
        ),
        json_reply(good_answer()),
    )
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.fallback_reason is None
    results = fake.requests[1]["messages"][2]["content"]
    assert all(r["is_error"] for r in results)
    assert "unknown recommendation id" in results[0]["content"]
    assert "no tool named" in results[2]["content"]
    assert outcome.metadata["tool_errors"] == 3


def test_answer_inside_prose_and_code_fence_is_found(fake: FakeAnthropic, tmp_path: Path) -> None:
    body = json.dumps(good_answer(), indent=2)
    fake.script(text_reply(f"Here are the write-ups {{as asked}}:\n```json\n{body}\n```\nLet me know."))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.fallback_reason is None
    assert outcome.texts[REC_B].title == good_answer()[REC_B]["title"]


def test_list_shaped_answer_is_accepted() -> None:
    answer = [{"id": REC_A, **good_answer()[REC_A]}]
    assert extract_json_object(f"result: {json.dumps({'recommendations': answer})}", [REC_A]) == {
        "recommendations": answer
    }


def test_non_json_answer_falls_back(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(text_reply("I think you should parallelise the calls. Hope this helps!"))
    writer, fallback = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None and "not JSON" in outcome.fallback_reason
    assert outcome.texts[REC_A].title == f"template title {REC_A}"
    assert fallback.calls == [[REC_A, REC_B]]


def test_wrong_shape_answer_falls_back(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply({REC_A: {"title": "", "summary": 3}, REC_B: ["not", "an", "object"]}))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None
    assert "usable for none" in outcome.fallback_reason and "missing title" in outcome.fallback_reason
    # The rejected answer is remembered for this content: asking again would cost and fail again.
    again = writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 1
    assert again.writer == "template" and again.fallback_reason and "missing title" in again.fallback_reason


def test_missing_id_gets_template_text(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer((REC_A,)) | {"made-up-id": good_answer()[REC_B]}))
    writer, fallback = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == f"anthropic:{MODEL}"
    assert outcome.texts[REC_A].title == good_answer()[REC_A]["title"]
    assert outcome.texts[REC_B].title == f"template title {REC_B}"
    assert fallback.calls == [[REC_B]]
    assert outcome.fallback_reason is not None
    assert REC_B in outcome.fallback_reason and "not covered" in outcome.fallback_reason
    assert outcome.metadata["template_ids"] == [REC_B]


def test_invented_numbers_are_rejected(fake: FakeAnthropic, tmp_path: Path) -> None:
    answer = good_answer()
    answer[REC_B]["summary"] = "Batching saves 999 ms and makes the page 7.5x faster."
    fake.script(json_reply(answer))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.texts[REC_A].title == good_answer()[REC_A]["title"]
    assert outcome.texts[REC_B].title == f"template title {REC_B}"
    assert outcome.fallback_reason is not None and "999 ms" in outcome.fallback_reason


def test_grounding_allows_rounding_units_and_percentages() -> None:
    shown = [118.0, 201.5, 0.41, 40120.0, 310.0]
    text = WrittenText(
        "Save about 120 ms",
        "Saves 118 ms (0.2 s at p95, 41% of root latency, 40.1 s in total, 40,120 ms) in 310 traces; "
        "the N+1 in `GET /v2/items` and 5xx answers, p95 and 2 calls.",
        ["Do it."],
    )
    assert ungrounded_numbers(text, shown) == []
    assert ungrounded_numbers(WrittenText("t", "saves 150 ms", ["x"]), shown) == ["150 ms"]


@pytest.mark.parametrize(("stop_reason", "reason"), [("max_tokens", "max_tokens"), ("refusal", "refused")])
def test_truncated_or_refused_answer_falls_back(
    fake: FakeAnthropic, tmp_path: Path, stop_reason: str, reason: str
) -> None:
    fake.script(text_reply('{"partial": ', stop_reason=stop_reason))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None and reason in outcome.fallback_reason


def test_thinking_blocks_are_echoed_back_and_ignored_in_the_answer(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    thinking = {"type": "thinking", "thinking": "Look at the evidence first.", "signature": "sig-abc"}
    tool_call = {
        "type": "tool_use",
        "id": "toolu_1",
        "name": "get_finding_evidence",
        "input": {"recommendation_id": REC_B},
    }
    fake.script(
        message_reply([thinking, tool_call], "tool_use"),
        message_reply([thinking, {"type": "text", "text": json.dumps(good_answer())}]),
    )
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.fallback_reason is None
    echoed = fake.requests[1]["messages"][1]["content"]
    assert echoed[0] == thinking


# --- failures of the API ---------------------------------------------------------------------


def test_rate_limited_then_success(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(error_reply(429, "rate limited"), json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.fallback_reason is None
    assert fake.request_count == 2
    assert outcome.metadata["attempts"] == 2


def test_server_errors_until_fallback(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = error_reply(500, "internal")
    writer, _ = make_writer(tmp_path, max_retries=2)
    outcome = writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 3
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None
    assert "500" in outcome.fallback_reason and "after 3 attempts" in outcome.fallback_reason
    assert outcome.texts[REC_A].title == f"template title {REC_A}"
    assert outcome.metadata["agent"]["attempts"] == 3


def test_overloaded_529_is_retried(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(error_reply(529, "overloaded"), json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    assert writer.write(recommendations(), PlantedContext()).fallback_reason is None


def test_authentication_error_is_not_retried(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(error_reply(401, "invalid x-api-key"))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 1
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None
    assert "401" in outcome.fallback_reason and "invalid x-api-key" in outcome.fallback_reason


def test_retry_after_beyond_the_deadline_gives_up_at_once(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(error_reply(429, "slow down", retry_after_ms=60_000))
    writer, _ = make_writer(tmp_path, deadline_s=3.0)
    started = time.monotonic()
    outcome = writer.write(recommendations(), PlantedContext())
    assert time.monotonic() - started < 1.5
    assert fake.request_count == 1
    assert outcome.fallback_reason is not None and "deadline" in outcome.fallback_reason


def test_timeout_falls_back(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = slow_reply(3.0, json_reply(good_answer()))
    writer, _ = make_writer(tmp_path, request_timeout_s=0.3, max_retries=1)
    started = time.monotonic()
    outcome = writer.write(recommendations(), PlantedContext())
    elapsed = time.monotonic() - started
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None and "timed out" in outcome.fallback_reason
    assert fake.request_count == 2  # the first attempt and one retry
    assert elapsed < 2.5


def test_overall_deadline_bounds_the_write(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = slow_reply(3.0)
    writer, _ = make_writer(tmp_path, request_timeout_s=5.0, deadline_s=0.6, max_retries=3)
    started = time.monotonic()
    outcome = writer.write(recommendations(), PlantedContext())
    assert time.monotonic() - started < 2.0
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None


def test_unreachable_endpoint_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and now has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    writer, _ = make_writer(tmp_path, max_retries=1)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None and "unreachable" in outcome.fallback_reason


def test_html_instead_of_json_falls_back(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(raw_reply(b"<html><body>proxy login</body></html>"))
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == "template"
    assert outcome.fallback_reason


def test_too_many_turns_falls_back(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = lambda request: tool_use_reply(("get_service_neighbours", {"service": "checkout"}))
    writer, _ = make_writer(tmp_path, max_turns=3)
    outcome = writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 3
    assert outcome.writer == "template"
    assert outcome.fallback_reason is not None and "3 turns" in outcome.fallback_reason
    # The last allowed turn forbids tools and says so.
    assert fake.requests[2]["tool_choice"] == {"type": "none"}
    assert "tool_choice" not in fake.requests[1]
    assert fake.requests[2]["messages"][-1]["content"][-1]["type"] == "text"


# --- cache -----------------------------------------------------------------------------------


def _sent_ids(request: dict[str, Any]) -> list[str]:
    text = request["messages"][0]["content"][0]["text"]
    payload = json.loads(text[text.index("<recommendations>") + 17 : text.index("</recommendations>")])
    return [rec["id"] for rec in payload]


def test_unchanged_report_is_answered_from_the_cache(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()))
    first_writer, _ = make_writer(tmp_path)
    first = first_writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 1
    assert first.metadata["cache"] == "miss"

    second_writer, fallback = make_writer(tmp_path)  # a new process would build a new writer
    second = second_writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 1  # no API call
    assert second.metadata["cache"] == "hit" and second.metadata["requests"] == 0
    assert second.writer == f"anthropic:{MODEL}"
    assert second.fallback_reason is None
    assert second.texts == first.texts
    assert fallback.calls == []


def test_only_changed_recommendations_are_sent_again(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    writer.write(recommendations(), PlantedContext())

    changed = recommendations(saved_p50=150.0)  # one number of REC_A changed (its text says 118 ms)
    changed[0]["rank"], changed[1]["rank"] = 2, 1  # ranks moved: not a content change
    changed[1]["evidence"]["trace_ids"] = ["ffffffffffffffffffffffffffffffff"]  # other exemplars: neither
    answer = good_answer((REC_A,))
    answer[REC_A]["summary"] = answer[REC_A]["summary"].replace("118 ms", "150 ms")
    fake.script(json_reply(answer))
    outcome = writer.write(changed, PlantedContext())
    assert fake.request_count == 2
    assert _sent_ids(fake.requests[1]) == [REC_A]
    assert outcome.metadata["cache"] == "partial" and outcome.metadata["cache_hits"] == 1
    assert outcome.fallback_reason is None
    assert set(outcome.texts) == {REC_A, REC_B}


def test_uncovered_recommendations_are_asked_again_rejected_ones_are_not(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    answer = good_answer((REC_A,))
    fake.script(json_reply(answer))
    writer, _ = make_writer(tmp_path)
    first = writer.write(recommendations(), PlantedContext())
    assert first.texts[REC_B].title == f"template title {REC_B}"
    # REC_B was left out: the next run asks for it alone, REC_A comes from the cache.
    bad = good_answer((REC_B,))
    bad[REC_B]["summary"] = "Saves 4321 ms."
    fake.script(json_reply(bad))
    second = writer.write(recommendations(), PlantedContext())
    assert _sent_ids(fake.requests[1]) == [REC_B]
    assert second.texts[REC_A] == first.texts[REC_A]
    assert second.fallback_reason is not None and "4321" in second.fallback_reason
    # The rejection is remembered: an unchanged report makes no further request.
    third = writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 2
    assert third.texts == second.texts and third.fallback_reason == second.fallback_reason


def test_agent_failure_keeps_cached_texts(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()))
    writer, _ = make_writer(tmp_path, max_retries=0)
    first = writer.write(recommendations(), PlantedContext())
    fake.default = error_reply(500, "down")
    outcome = writer.write(recommendations(saved_p50=99.0), PlantedContext())
    assert outcome.writer == f"anthropic:{MODEL}"
    assert outcome.texts[REC_B] == first.texts[REC_B]
    assert outcome.texts[REC_A].title == f"template title {REC_A}"
    assert outcome.fallback_reason is not None and "500" in outcome.fallback_reason


def test_failures_are_not_cached(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(text_reply("not json"), json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    assert writer.write(recommendations(), PlantedContext()).writer == "template"
    assert writer.write(recommendations(), PlantedContext()).writer == f"anthropic:{MODEL}"
    assert fake.request_count == 2


def test_corrupt_cache_entry_is_a_miss(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()), json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    writer.write(recommendations(), PlantedContext())
    entries = sorted((tmp_path / "writeups").glob("*.json"))
    assert len(entries) == 4  # by content and latest by id, for each recommendation
    for entry in entries:
        entry.write_text("{not json", encoding="utf-8")
    outcome = writer.write(recommendations(), PlantedContext())
    assert fake.request_count == 2
    assert outcome.fallback_reason is None
    stored = {json.loads(e.read_text(encoding="utf-8"))["recommendation_id"] for e in entries}
    assert stored == {REC_A, REC_B}


def test_model_is_part_of_the_cache_key(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()), json_reply(good_answer()))
    writer, fallback = make_writer(tmp_path)
    writer.write(recommendations(), PlantedContext())
    other = AnthropicWriter(
        fallback, model="claude-other", limits=writer.limits, cache_dir=tmp_path / "writeups"
    )
    other.write(recommendations(), PlantedContext())
    assert fake.request_count == 2
    assert fake.requests[1]["model"] == "claude-other"


# --- privacy ---------------------------------------------------------------------------------


def test_planted_secrets_appear_in_no_request_body(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(
        tool_use_reply(
            ("get_finding_evidence", {"recommendation_id": REC_A}),
            ("get_finding_evidence", {"recommendation_id": REC_B}),
            ("get_critical_path", {"trace_id": TRACE_ID}),
            ("get_service_neighbours", {"service": "inventory"}),
        ),
        json_reply(good_answer()),
    )
    writer, _ = make_writer(tmp_path)
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.fallback_reason is None
    assert fake.request_count == 2
    sent = fake.all_request_text()
    for secret in SECRETS:
        assert secret not in sent, f"{secret!r} left the machine"
    assert "Bearer s3cr3t" not in sent
    # ... while the numbers and names the write-up needs did reach the model.
    for needed in (
        "201.5",
        "117.5",
        "POST /checkout",
        TRACE_ID,
        "https://api.example.org/login?user=?&password=?",
    ):
        assert needed in sent


def test_default_model_is_the_current_sonnet() -> None:
    assert DEFAULT_MODEL.startswith("claude-sonnet-")
    assert TOOLS[-1]["cache_control"] == {"type": "ephemeral"}


def test_model_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOURGLASS_LLM_MODEL", "claude-from-env")
    writer = AnthropicWriter(StubTemplateWriter())
    assert writer.name == "anthropic:claude-from-env"
    monkeypatch.delenv("HOURGLASS_LLM_MODEL")
    assert AnthropicWriter(StubTemplateWriter()).model == DEFAULT_MODEL


def test_empty_report_makes_no_request(fake: FakeAnthropic, tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path)
    outcome = writer.write([], PlantedContext())
    assert outcome.texts == {} and fake.request_count == 0


# --- choosing the writer ---------------------------------------------------------------------


def test_select_writer_without_a_key_is_the_template_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("hourglass.analysis.template_writer")
    from hourglass.analysis.writers import select_writer

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert not isinstance(select_writer(), AnthropicWriter)
    assert not isinstance(select_writer({"HOURGLASS_LLM_MODEL": "claude-x"}), AnthropicWriter)


def test_select_writer_with_a_key_is_the_agent(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("hourglass.analysis.template_writer")
    from hourglass.analysis.writers import select_writer

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.setenv("HOURGLASS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("HOURGLASS_LLM_MODEL", raising=False)
    writer = select_writer()
    assert isinstance(writer, AnthropicWriter)
    assert writer.name == f"anthropic:{DEFAULT_MODEL}"
    assert writer.cache is not None and writer.cache.directory == tmp_path / "writeups"
    assert not isinstance(writer.fallback, AnthropicWriter)

    class SettingsLike:
        llm_model = "claude-from-settings"

    assert select_writer(SettingsLike()).name == "anthropic:claude-from-settings"
    env_writer = select_writer(
        {
            "ANTHROPIC_API_KEY": "k",
            "HOURGLASS_LLM_MODEL": "claude-env-map",
            "HOURGLASS_CACHE_DIR": str(tmp_path),
        }
    )
    assert env_writer.name == "anthropic:claude-env-map"


def test_select_writer_with_an_env_mapping_talks_to_its_base_url(
    fake: FakeAnthropic, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("hourglass.analysis.template_writer")
    from hourglass.analysis.writers import select_writer

    base_url = fake.base_url
    monkeypatch.delenv("ANTHROPIC_BASE_URL")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    fake.script(json_reply(good_answer()))
    writer = select_writer(
        {"ANTHROPIC_API_KEY": "sk-map", "ANTHROPIC_BASE_URL": base_url, "HOURGLASS_CACHE_DIR": str(tmp_path)}
    )
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.fallback_reason is None
    sent = fake.headers[0]
    assert sent.get("x-api-key") == "sk-map" or sent.get("authorization") == "Bearer sk-map"


# --- end to end: the pipeline and the CLI with the agent pointed at the fake server -----------

E2E_MODEL = "claude-e2e-model"


def _request_payload(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The recommendation objects the agent sent (from the first user message)."""
    text = request["messages"][0]["content"][0]["text"]
    start, end = text.index("<recommendations>") + len("<recommendations>"), text.index("</recommendations>")
    payload: list[dict[str, Any]] = json.loads(text[start:end])
    return payload


def fake_model_step(request: dict[str, Any]) -> Step:
    """A scripted model: first turn calls all three tools on the top recommendation, the next turn
    answers for every id with numbers taken from the payload (so they are grounded)."""
    payload = _request_payload(request)
    last = request["messages"][-1]
    answered_tools = isinstance(last["content"], list) and any(
        b.get("type") == "tool_result" for b in last["content"]
    )
    if not answered_tools:
        top = payload[0]
        return tool_use_reply(
            ("get_finding_evidence", {"recommendation_id": top["id"]}),
            ("get_critical_path", {"trace_id": top["evidence"]["trace_ids"][0]}),
            ("get_service_neighbours", {"service": top["service"]}),
        )
    answer = {
        rec["id"]: {
            "title": f"Fake model: fix {rec['kind']} in `{rec['service']}`",
            "summary": f"Seen in {rec['traces_affected']} traces (fake model summary).",
            "actions": [f"Change `{rec['operation']}` (fake model action)."],
        }
        for rec in payload
    }
    return json_reply(answer)


def planted_n_plus_one_traces(count: int = 6) -> list[Any]:
    """N+1 traces whose span names, statements, URLs and attributes carry the planted secrets."""
    from hourglass.collector.schema import KIND_CLIENT, KIND_SERVER
    from tests.builders import TraceBuilder

    builders = []
    for n in range(count):
        # ids of their own, not the builders' process-wide count: an id of digits only reads as a
        # number the model was shown ("...0017" grounds "17"), which would depend on test order
        b = TraceBuilder(service="orders-api", trace_id=f"a{n + 1:031x}")
        root = b.span(
            f"GET /orders?email={SECRET_EMAIL}&password={SECRET_QUERY_PASSWORD}",
            start_ms=0,
            dur_ms=140,
            kind=KIND_SERVER,
            http_method="GET",
            http_url=f"https://shop.example.com/orders?password={SECRET_QUERY_PASSWORD}",
            status_message=f"served {SECRET_EMAIL}",
            hints={"enduser.id": SECRET_USER_ID, "http.request.header.authorization": SECRET_BEARER},
        )
        for i in range(10):
            b.span(
                f"SELECT * FROM items WHERE order_id = {100 + i} AND ssn = '{SECRET_SSN}'",
                parent=root,
                start_ms=5 + i * 12,
                dur_ms=10,
                service="orders-db",
                kind=KIND_CLIENT,
                db_system="postgresql",
                db_statement=f"SELECT * FROM items WHERE order_id = {100 + i} AND ssn = '{SECRET_SSN}'",
            )
        b.span(
            f"POST /audit {SECRET_BEARER}",
            parent=root,
            start_ms=126,
            dur_ms=8,
            service="audit",
            kind=KIND_CLIENT,
        )
        builders.append(b)
    return builders


def agent_report(tmp_path: Path, **limits: Any) -> dict[str, Any]:
    """The pipeline's report on the planted N+1 traces, written by the agent (E2E_MODEL, at the fake
    API) with the template writer to fall back on."""
    from hourglass.analysis.pipeline import analyze
    from hourglass.analysis.template_writer import TemplateWriter
    from tests.builders import spans_table

    writer = AnthropicWriter(
        TemplateWriter(),
        model=E2E_MODEL,
        limits=AgentLimits(request_timeout_s=2, deadline_s=8, **limits),
        cache_dir=tmp_path / "w",
    )
    return analyze(spans_table(planted_n_plus_one_traces()), writer=writer)


def test_pipeline_report_written_by_the_agent(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = fake_model_step
    report = agent_report(tmp_path)

    assert report["recommendations"], "the planted N+1 must be found"
    assert report["writer"]["name"] == f"anthropic:{E2E_MODEL}"
    assert report["writer"]["fallback_reason"] is None
    for rec in report["recommendations"]:
        assert rec["title"].startswith("Fake model: fix ")
        assert rec["actions"][0].endswith("(fake model action).")
    assert fake.request_count == 2
    sent = fake.all_request_text()
    for secret in SECRETS:
        assert secret not in sent, f"{secret!r} left the machine"
    # The tools really ran over the analysed spans (critical path names, redacted, reached the model).
    results = [b for b in fake.requests[1]["messages"][-1]["content"] if b["type"] == "tool_result"]
    evidence, path, neighbours = (json.loads(r["content"]) for r in results)
    assert evidence["id"] == report["recommendations"][0]["id"]
    assert path["spans"][0]["name"] == "GET /orders?email=?&password=?"
    assert path["spans"][0]["duration_ms"] == 140.0
    assert {c["service"] for c in neighbours["callees"]} >= {"orders-db", "audit"}


def test_pipeline_report_falls_back_when_the_api_fails(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = error_reply(500, "upstream exploded")
    report = agent_report(tmp_path, max_retries=1)
    assert report["recommendations"]
    assert report["writer"]["name"] == "template"
    reason = report["writer"]["fallback_reason"]
    assert reason is not None and "500" in reason and "upstream exploded" in reason
    assert all(
        rec["title"] and not rec["title"].startswith("Fake model") for rec in report["recommendations"]
    )
    assert fake.request_count == 2


def _otlp_json_line(builders: list[Any]) -> str:
    """OTLP/JSON (one ExportTraceServiceRequest) for builder spans, with the planted secrets also
    in span attributes — the file a user would hand to `hourglass analyze`."""
    spans_by_service: dict[str, list[dict[str, Any]]] = {}
    for b in builders:
        for row in b.rows:
            attributes = [{"key": "enduser.id", "value": {"stringValue": SECRET_USER_ID}}]
            if row["db_statement"]:
                attributes += [
                    {"key": "db.system", "value": {"stringValue": row["db_system"]}},
                    {"key": "db.statement", "value": {"stringValue": row["db_statement"]}},
                ]
            if row["http_url"]:
                attributes += [
                    {"key": "http.method", "value": {"stringValue": "GET"}},
                    {"key": "http.url", "value": {"stringValue": row["http_url"]}},
                    {"key": "http.request.header.authorization", "value": {"stringValue": SECRET_BEARER}},
                ]
            span = {
                "traceId": row["trace_id"],
                "spanId": row["span_id"],
                "name": row["name"],
                "kind": row["kind"],
                "startTimeUnixNano": str(row["start_ns"]),
                "endTimeUnixNano": str(row["end_ns"]),
                "attributes": attributes,
            }
            if row["parent_span_id"]:
                span["parentSpanId"] = row["parent_span_id"]
            spans_by_service.setdefault(row["service"], []).append(span)
    return json.dumps(otlp_json(spans_by_service))


def _run_cli(args: list[str], env: dict[str, str]) -> Any:
    import os
    import subprocess
    import sys

    hourglass = Path(sys.executable).with_name("hourglass")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "HOURGLASS_"))} | env
    return subprocess.run(
        [str(hourglass), *args], capture_output=True, text=True, env=full_env, timeout=60, check=False
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cli_analyze_uses_the_agent_when_a_key_is_set(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = fake_model_step
    trace_file = tmp_path / "planted.otlp.json"
    trace_file.write_text(_otlp_json_line(planted_n_plus_one_traces()), encoding="utf-8")
    env = {
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "ANTHROPIC_BASE_URL": fake.base_url,
        "HOURGLASS_LLM_MODEL": E2E_MODEL,
        "HOURGLASS_CACHE_DIR": str(tmp_path / "cache"),
    }
    result = _run_cli(["analyze", str(trace_file), "--format", "json"], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["writer"]["name"] == f"anthropic:{E2E_MODEL}"
    assert report["recommendations"] and all(
        r["title"].startswith("Fake model") for r in report["recommendations"]
    )
    assert fake.request_count == 2
    sent = fake.all_request_text()
    for secret in SECRETS:
        assert secret not in sent, f"{secret!r} left the machine"

    # Same report again: the write-up comes from the cache, no API call.
    again = _run_cli(["analyze", str(trace_file), "--format", "json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["recommendations"][0]["title"] == report["recommendations"][0]["title"]
    assert fake.request_count == 2


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_cli_analyze_reports_the_fallback_reason(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.default = error_reply(401, "invalid x-api-key")
    trace_file = tmp_path / "planted.otlp.json"
    trace_file.write_text(_otlp_json_line(planted_n_plus_one_traces()), encoding="utf-8")
    env = {
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "ANTHROPIC_BASE_URL": fake.base_url,
        "HOURGLASS_CACHE_DIR": str(tmp_path / "cache"),
    }
    result = _run_cli(["analyze", str(trace_file), "--format", "json"], env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["writer"]["name"] == "template"
    assert "401" in report["writer"]["fallback_reason"]
    assert fake.requests[0]["model"] == DEFAULT_MODEL


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rest_api_report_is_written_by_the_agent_too(fake: FakeAnthropic, tmp_path: Path) -> None:
    """`hourglass serve` (real process, real OTLP exporter) writes with the same agent as the CLI."""
    from tests.api.live_server import running_server, send_traces, wait_for_spans

    fake.default = fake_model_step
    env = {
        "ANTHROPIC_API_KEY": "sk-test-not-a-real-key",
        "ANTHROPIC_BASE_URL": fake.base_url,
        "HOURGLASS_LLM_MODEL": E2E_MODEL,
        "HOURGLASS_CACHE_DIR": str(tmp_path / "cache"),
    }
    with running_server(tmp_path, settle="0.3s", env=env) as server:
        send_traces(server, checkout=8, home=2)
        wait_for_spans(server, 10 * 7)
        with server.client() as client:
            assert client.post("/v1/analyses").status_code == 200
            report = client.get("/v1/recommendations").json()
    assert report["recommendations"], "the live server's serialized calls must be found"
    assert report["writer"]["name"] == f"anthropic:{E2E_MODEL}", report["writer"]
    assert all(r["title"].startswith("Fake model") for r in report["recommendations"])
    assert fake.request_count >= 2
    assert all(r["model"] == E2E_MODEL for r in fake.requests)


def test_cache_directory_resolution(tmp_path: Path) -> None:
    from hourglass.analysis.agent import default_cache_dir

    assert default_cache_dir({"HOURGLASS_CACHE_DIR": str(tmp_path)}) == tmp_path / "writeups"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "hourglass" / "writeups"
    assert default_cache_dir({}) == Path.home() / ".cache" / "hourglass" / "writeups"


def test_unwritable_cache_does_not_cost_the_write_up(fake: FakeAnthropic, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be", encoding="utf-8")
    fake.script(json_reply(good_answer()))
    writer = AnthropicWriter(
        StubTemplateWriter(), model=MODEL, limits=AgentLimits(deadline_s=5), cache_dir=blocker / "w"
    )
    outcome = writer.write(recommendations(), PlantedContext())
    assert outcome.writer == f"anthropic:{MODEL}" and outcome.fallback_reason is None
    assert "cache_error" in outcome.metadata


def test_text_still_true_of_drifted_numbers_is_reused(fake: FakeAnthropic, tmp_path: Path) -> None:
    fake.script(json_reply(good_answer()))
    writer, _ = make_writer(tmp_path)
    first = writer.write(recommendations(), PlantedContext())
    drifted = writer.write(recommendations(saved_p50=118.4), PlantedContext())  # "118 ms" is still true
    assert fake.request_count == 1
    assert drifted.texts == first.texts
    assert drifted.metadata["cache_reused"] == 1 and drifted.fallback_reason is None
    fake.script(json_reply(good_answer((REC_A,))))
    outcome = writer.write(recommendations(saved_p50=131.0), PlantedContext())  # "118 ms" is no longer true
    assert fake.request_count == 2
    assert _sent_ids(fake.requests[1]) == [REC_A]
    assert outcome.texts[REC_A].title == f"template title {REC_A}"  # the old answer no longer passes


def test_cache_prunes_entries_unused_for_a_month(tmp_path: Path) -> None:
    import os

    from hourglass.analysis.agent import WriteupCache

    cache = WriteupCache(tmp_path, max_age_s=30 * 86400)
    cache.put("old", {"text": {"title": "t", "summary": "s", "actions": ["a"]}})
    cache.put("used", {"text": {"title": "t", "summary": "s", "actions": ["a"]}})
    month_ago = time.time() - 31 * 86400
    for name in ("old", "used"):
        os.utime(tmp_path / f"{name}.json", (month_ago, month_ago))
    assert cache.get("used") is not None  # a hit refreshes the entry
    assert cache.prune() == 1
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["used.json"]


def test_settings_default_model_matches_the_agent_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from hourglass.api.settings import Settings

    monkeypatch.delenv("HOURGLASS_LLM_MODEL", raising=False)
    assert Settings().llm_model == DEFAULT_MODEL


def test_connect_timeout_is_short_even_with_a_long_request_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A listener whose accept queue is full drops SYNs, like a firewalled route: the connection
    never completes. The write falls back after the connect timeout, not the request timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the accept queue
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
        writer = AnthropicWriter(
            StubTemplateWriter(),
            model=MODEL,
            limits=AgentLimits(request_timeout_s=10.0, connect_timeout_s=0.3, deadline_s=10.0, max_retries=0),
            cache_dir=tmp_path / "w",
        )
        started = time.monotonic()
        outcome = writer.write(recommendations(), PlantedContext())
        assert time.monotonic() - started < 3.0
        assert outcome.writer == "template"
        assert outcome.fallback_reason is not None and "timed out" in outcome.fallback_reason
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --- designs (issue 13) -----------------------------------------------------------------------


def test_design_sections_are_checked_one_by_one(fake: FakeAnthropic, tmp_path: Path) -> None:
    """A design section whose numbers disagree with the evidence, or pseudocode in another
    language, keeps the template's text; a grounded section from the model is used."""
    from hourglass.analysis.design import build_design

    answer = good_answer()
    answer[REC_A]["design"] = {
        "rationale": "Running `GET /stock` and `GET /price` together saves 999 ms per request.",
        "tests": "Script the two fakes: both succeed, one fails, one hangs past the shared deadline.",
        "verification": "Watch `POST /checkout`: the what-if saves 118 ms at p50 and 201.5 ms at p95.",
        "pseudocode": {"language": "go", "code": "g, ctx := errgroup.WithContext(ctx)"},
    }
    fake.script(json_reply(answer))
    writer, _ = make_writer(tmp_path)
    recs = recommendations()
    outcome = writer.write(recs, PlantedContext())
    draft = build_design(recs[0], {})
    design = outcome.texts[REC_A].design
    assert design is not None
    assert design["rationale"] == draft["rationale"]  # 999 ms is not in the evidence
    assert design["pseudocode"] == draft["pseudocode"]  # the service's language is unknown here
    assert design["tests"] == answer[REC_A]["design"]["tests"]
    assert design["verification"] == answer[REC_A]["design"]["verification"]
    assert design["pattern"] == draft["pattern"]  # never the model's to change
    assert sorted(outcome.metadata["design_fields_from_template"][REC_A]) == ["pseudocode", "rationale"]
    # REC_B's answer had no design: the template's draft in full
    assert outcome.texts[REC_B].design == build_design(recs[1], {})
    # the model saw the drafts (without the diagrams)
    payload = _request_payload(fake.requests[0])
    assert all("design" in item and "sequence" not in item["design"] for item in payload)


def test_pipeline_designs_reach_the_model_redacted_and_come_back_checked(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    def model(request: dict[str, Any]) -> Step:
        payload = _request_payload(request)
        last = request["messages"][-1]
        if not (
            isinstance(last["content"], list) and any(b.get("type") == "tool_result" for b in last["content"])
        ):
            return tool_use_reply(("get_design_facts", {"recommendation_id": payload[0]["id"]}))
        return json_reply(
            {
                rec["id"]: {
                    "title": f"Fake model: fix {rec['kind']}",
                    "summary": f"Seen in {rec['traces_affected']} traces.",
                    "actions": ["Batch the query."],
                    "design": {
                        "consistency": "One read per row at one snapshot: no change for readers.",
                        "failure_handling": "Retry the calls 17 times.",
                    },
                }
                for rec in payload
            }
        )

    fake.default = model
    report = agent_report(tmp_path)
    rec = report["recommendations"][0]
    assert rec["title"].startswith("Fake model")
    design = rec["design"]
    assert design["consistency"].startswith("One read per row")
    assert "17 times" not in design["failure_handling"]  # 17 is in no evidence: the template's text
    assert design["sequence"]["before"].startswith("sequenceDiagram")  # drawn locally, never by the model
    sent = fake.all_request_text()
    for secret in SECRETS:
        assert secret not in sent, f"{secret!r} left the machine"
    payload = _request_payload(fake.requests[0])
    assert payload[0]["design"]["pattern"]["name"] == design["pattern"]["name"]
    (result,) = [b for b in fake.requests[1]["messages"][-1]["content"] if b["type"] == "tool_result"]
    facts = json.loads(result["content"])
    assert "sequence" not in facts["exemplar"] and facts["exemplar"]["calls"]
    assert facts["root_ms_p50_before"] is not None and facts["call_stats"]["count"] > 0
