"""Issue 15.1: secrets that slipped through the redaction, and patterns that were not linear.

The leak corpus below is planted in every string the agent can send (recommendation fields,
evidence, and every tool's result) and run through the real agent path against the stand-in
Messages API on loopback; no planted value may appear in any request body.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from hourglass.analysis import redaction
from hourglass.analysis.agent import AgentLimits, AnthropicWriter
from hourglass.analysis.redaction import is_sensitive_key, redact, redact_text
from tests.analysis.test_agent import REC_A, REC_B, TRACE_ID, StubTemplateWriter, good_answer, recommendations
from tests.fake_anthropic import FakeAnthropic, json_reply, tool_use_reply

# (text with a planted secret, the secret) — one per kind that used to pass, and more kinds.
LEAK_CORPUS: list[tuple[str, str]] = [
    ('SELECT id FROM notes WHERE note <> "mysql-dq-literal-77" LIMIT 5', "mysql-dq-literal-77"),
    ("INSERT INTO audit (actor, note) VALUES (\"alice-dq-9\", 'x')", "alice-dq-9"),
    (
        "loaded key -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3pemPrivBody\n-----END RSA PRIVATE KEY----- ok",
        "MIIEpAIBAAKCAQEA3pemPrivBody",
    ),
    (
        "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQunterminated",
        "MIIEvQIBADANBgkqhkiG9w0BAQunterminated",
    ),
    (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE7/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
        "5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7",
    ),
    ("presign X-Amz-Credential=AKIDSIGV4CRED/2015/s3 done", "AKIDSIGV4CRED"),
    ("sig Signature=0a1b2c3d4e5f60718293a4b5c6d7e8f9 end", "0a1b2c3d4e5f60718293a4b5c6d7e8f9"),
    ("Cookie: theme=dark; csrftoken=cookiepair2secret; sessionid=cookiepair3secret", "cookiepair2secret"),
    ("Cookie: theme=dark; csrftoken=cookiepair2secret; sessionid=cookiepair3secret", "cookiepair3secret"),
    ("Set-Cookie: remember_me=rememberCookieValue9; Path=/; HttpOnly", "rememberCookieValue9"),
    ("boto3 config aws_secret_access_key=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY", "wJalrXUtnFEMIK7MDENG"),
    ("retrying with api_token='tok-quoted-4242'", "tok-quoted-4242"),
    ('{"x_internal_apitoken": "json-text-token-11"}', "json-text-token-11"),
    ("connect dbPassword: hunter2longer", "hunter2longer"),
    ("SELECT a FROM t -- don't cache\nWHERE ssn = 'after-comment-secret'", "after-comment-secret"),
    ("(SELECT name FROM people WHERE email_hash = 'paren-literal-secret')", "paren-literal-secret"),
    ("-- fetch the user\nSELECT * FROM users WHERE pin = 'leading-comment-secret'", "leading-comment-secret"),
    (
        "query failed: UPDATE users SET note = 'embedded-statement-secret' WHERE id = 1",
        "embedded-statement-secret",
    ),
    ("paid with 4111.1111.1111.1111 today", "4111.1111.1111.1111"),
    ("paid with 4111-1111-1111-1111 today", "4111-1111-1111-1111"),
    ("opaque handle Zk9QzT2vX8rLmN4pW7sYbC1dF3hJ5 issued", "Zk9QzT2vX8rLmN4pW7sYbC1dF3hJ5"),
    ("blob dGhpcyBpcyBhIHNlY3JldCBibG9iIDEyMzQ1Ng== in log", "dGhpcyBpcyBhIHNlY3JldCBibG9iIDEyMzQ1Ng"),
    ("reset link /reset/a1b2c3d4e5f6a7b8c9d0e1f2a3b4 sent", "a1b2c3d4e5f6a7b8c9d0e1f2a3b4"),
    ("mail to jane.roe@corp.example.org", "jane.roe@corp.example.org"),
    ("Authorization: Bearer abcDEF123ghiJKL456", "abcDEF123ghiJKL456"),
    ("postgres://svc:pg-userinfo-pass@db.internal/app", "pg-userinfo-pass"),
]

# Names and numbers that carry no secret and that the write-up needs.
KEPT = [
    "GET /api/v1/get_customer_orders_by_region/42",
    "SELECT id, total FROM orders",
    'UPDATE "Table2" SET x = ?',
    "serialized_calls-509bff0632880ceb",
    "4bf92f3577b34da6a3ce929d0e0e4736",
    "p50 118.0 ms, p95 201.5 ms over 310 traces",
    "POST /accounts/{account_id}/transfers",
]


@pytest.mark.parametrize(("text", "secret"), LEAK_CORPUS)
def test_each_planted_secret_is_redacted(text: str, secret: str) -> None:
    assert secret not in redact_text(text)
    assert secret not in str(redact({"free_text": text, "attributes": [{"key": "msg", "value": text}]}))


@pytest.mark.parametrize("text", KEPT)
def test_names_and_numbers_without_secrets_are_kept(text: str) -> None:
    assert redact_text(text) == text


@pytest.mark.parametrize(
    "key", ["x_internal_apitoken", "dbPassword", "awsSecretAccessKey", "signingKey", "my-secret-thing"]
)
def test_secret_looking_words_inside_longer_key_names(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize(
    "key", ["op_key", "wait_key", "db.cassandra.keyspace", "max_tokens_x"[:0] + "keyword", "span_ids"]
)
def test_ordinary_keys_with_key_in_them_are_kept(key: str) -> None:
    assert not is_sensitive_key(key)


# --- linear time --------------------------------------------------------------------------------

# Each unit, repeated, attacks a pattern's worst case (a run start that rescans, a lazy match
# that never closes, backtracking between two quantifiers).
_UNITS = [
    "a.", "a@", "a@a.", "eyJaaaaa-", "sk-", "?a", "?a=", "/*", "--'", "'", '"', "$a1$",
    "-----BEGIN PRIVATE KEY-----", "Bearer ", "a=\"", "token=", "a:", "Cookie: a=", "4111 ", "4.", "1.1.1.", "::",
    "/a1", "Aa1+", "a://a", "(", "SELECT ", "FROM ", " ", "\"a\" = ", "key=", "a-",
]  # fmt: skip


def _adversarial(unit: str, size: int = 1 << 20) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def _scan(text: str) -> float:
    started = time.process_time()
    for pattern in redaction.PATTERNS:
        for _ in pattern.finditer(text):
            pass
    redact_text(text)
    return time.process_time() - started


def test_every_pattern_is_linear_on_adversarial_text() -> None:
    """Each adversarial unit repeated over 128 KB, then 1 MB of all of them, through every pattern
    and the whole redaction. A quadratic pattern needs many seconds at 128 KB (the old e-mail
    pattern: 9.8 s on 80 KB, 4.5 s on 64 KB of "a.", so ~18 s here); the linear ones take ~0.2 s.
    The bounds are generous for a loaded 2-core CI machine and still below a quadratic cost."""
    timings = sorted(((_scan(_adversarial(unit, 128 << 10)), unit) for unit in _UNITS), reverse=True)
    assert timings[0][0] < 6.0, timings[:5]
    mixed = "".join(_adversarial(unit, (1 << 20) // len(_UNITS)) for unit in _UNITS)
    assert len(mixed) > 1_000_000
    assert _scan(mixed) < 30.0


def test_deeply_nested_json_in_a_string_is_redacted_as_text() -> None:
    deep = "[" * 100_000 + '"jane@example.com"' + "]" * 100_000
    out = redact({"attributes": {"note": deep}})
    assert "jane@example.com" not in out["attributes"]["note"]


# --- the real agent path ----------------------------------------------------------------------------


class LeakyContext:
    """A WriterContext whose every tool answers with the whole leak corpus in names, statements,
    status and exception messages and attributes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def _spans(self) -> list[dict[str, Any]]:
        spans = []
        for index, (text, _) in enumerate(LEAK_CORPUS):
            spans.append(
                {
                    "service": "checkout",
                    "name": text,
                    "duration_ms": 10.0 + index,
                    "status_message": text,
                    "attributes": [
                        {"key": "db.statement", "value": text},
                        {"key": "exception.message", "value": {"stringValue": text}},
                        {"key": "note", "value": text},
                    ],
                }
            )
        return spans

    def finding_evidence(self, recommendation_id: str) -> dict[str, Any] | None:
        self.calls.append("evidence")
        return {"id": recommendation_id, "occurrences": [{"trace_id": TRACE_ID, "spans": self._spans()}]}

    def critical_path(self, trace_id: str) -> list[dict[str, Any]] | None:
        self.calls.append("critical_path")
        return self._spans() if trace_id == TRACE_ID else None

    def service_neighbours(self, service: str) -> dict[str, list[dict[str, Any]]]:
        self.calls.append("neighbours")
        return {
            "callers": [
                {"service": "frontend", "operation": text, "calls": 3, "p50_ms": 4.0}
                for text, _ in LEAK_CORPUS
            ],
            "callees": [],
        }


def test_the_leak_corpus_never_reaches_the_messages_api(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeAnthropic().start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    try:
        fake.script(
            tool_use_reply(
                ("get_finding_evidence", {"recommendation_id": REC_A}),
                ("get_finding_evidence", {"recommendation_id": REC_B}),
                ("get_critical_path", {"trace_id": TRACE_ID}),
                ("get_service_neighbours", {"service": "checkout"}),
            ),
            json_reply(good_answer()),
        )
        recs = recommendations()
        recs[0]["operation"] = LEAK_CORPUS[0][0]
        recs[0]["evidence"]["statements"] = [text for text, _ in LEAK_CORPUS]
        recs[1]["evidence"]["error_message"] = " | ".join(text for text, _ in LEAK_CORPUS)
        writer = AnthropicWriter(
            StubTemplateWriter(),
            model="claude-test-model",
            limits=AgentLimits(request_timeout_s=5.0, deadline_s=15.0, max_retries=1, max_turns=6),
            cache_dir=tmp_path / "writeups",
        )
        context = LeakyContext()
        outcome = writer.write(recs, context)
        assert outcome.fallback_reason is None
        assert sorted(set(context.calls)) == ["critical_path", "evidence", "neighbours"]  # every tool ran
        assert fake.request_count == 2
        sent = fake.all_request_text()
        leaked = [secret for _, secret in LEAK_CORPUS if secret in sent]
        assert leaked == []
        for needed in ("GET /stock", TRACE_ID, "201.5", "SELECT id FROM notes WHERE note <> ?"):
            assert needed in sent
    finally:
        fake.stop()
