"""Redaction: every pattern that can carry personal data or secrets, by key and by value."""

from __future__ import annotations

import json

import pytest

from hourglass.analysis.redaction import (
    CARD_MARK,
    EMAIL_MARK,
    IP_MARK,
    REDACTED,
    SSN_MARK,
    TOKEN_MARK,
    is_sensitive_key,
    redact,
    redact_sql,
    redact_statement,
    redact_text,
)

# --- by value: one test per pattern -----------------------------------------------------------


def test_email_is_replaced() -> None:
    assert redact_text("sent receipt to jane.doe+shop@example.co.uk ok") == f"sent receipt to {EMAIL_MARK} ok"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer eyJhbGciOi.abc-def_123", f"Authorization: Bearer {REDACTED}"),
        ("authorization=Basic dXNlcjpwYXNzd29yZA==", f"authorization=Basic {REDACTED}"),
        ("header token abcdef0123456789 sent", f"header token {REDACTED} sent"),
    ],
)
def test_authorization_schemes_lose_their_credentials(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_jwt_anywhere_is_replaced() -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ.SflKxwRJSMeKKF2QT4fwpM"
    assert redact_text(f"cookie-less jwt {jwt} end") == f"cookie-less jwt {TOKEN_MARK} end"


@pytest.mark.parametrize(
    "token",
    [
        "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
        "xoxb-123456789012-abcdefghijkl",
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    ],
)
def test_known_api_key_shapes_are_replaced(token: str) -> None:
    assert token not in redact_text(f"using key {token} now")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("login failed password=hunter2 for", "hunter2"),
        ("api_key: 'abc123xyz'", "abc123xyz"),
        ('{"client_secret":"s3cr3t-value"}', "s3cr3t-value"),
        ("Cookie: session=deadbeef42", "deadbeef42"),
    ],
)
def test_inline_name_value_secrets_are_replaced(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out
    assert REDACTED in out or "?" in out


def test_url_query_values_are_replaced_path_kept() -> None:
    out = redact_text(
        "GET https://shop.example.com/v1/users/search?email=bob%40x.com&password=hunter2&page=3#top"
    )
    assert out == "GET https://shop.example.com/v1/users/search?email=?&password=?&page=?#top"


def test_relative_target_query_values_are_replaced() -> None:
    assert redact_text("/api/orders?customer=4711&token=abc") == "/api/orders?customer=?&token=?"


def test_url_userinfo_is_replaced() -> None:
    out = redact_text("connect postgres://app:Sup3rS3cret@db.internal:5432/orders")
    assert "Sup3rS3cret" not in out and "app:" not in out
    assert out.endswith(f"postgres://{REDACTED}@db.internal:5432/orders")


def test_sql_string_and_number_literals_become_placeholders() -> None:
    statement = (
        "SELECT id, total FROM orders WHERE ssn = '123-45-6789' AND name = 'O''Brien' "
        "AND amount > 250.75 AND t2.flag = 1 LIMIT 10"
    )
    out = redact_sql(statement)
    assert (
        out
        == "SELECT id, total FROM orders WHERE ssn = ? AND name = ? AND amount > ? AND t2.flag = ? LIMIT ?"
    )


def test_sql_keeps_identifiers_and_bind_placeholders() -> None:
    out = redact_sql('UPDATE "Table2" SET x = 5 WHERE id = $1 AND y = :2 AND z = ?')
    assert out == 'UPDATE "Table2" SET x = ? WHERE id = $1 AND y = :2 AND z = ?'


def test_sql_dollar_quoted_strings_are_replaced() -> None:
    assert (
        redact_sql("INSERT INTO notes VALUES ($tag$ secret note $tag$, 3)")
        == "INSERT INTO notes VALUES (?, ?)"
    )


def test_sql_is_detected_in_free_text_values() -> None:
    assert redact_text("select * from users where email='a@b.io'") == "select * from users where email=?"


def test_non_sql_statement_keeps_only_its_command() -> None:
    assert redact_statement("SET session:8f2c user-secret-value") == "SET ?"
    assert redact_statement("HGETALL user:42") == "HGETALL ?"


def test_ssn_is_replaced() -> None:
    assert redact_text("ssn 078-05-1120 on file") == f"ssn {SSN_MARK} on file"


def test_card_numbers_pass_luhn_to_be_replaced() -> None:
    assert redact_text("card 4111 1111 1111 1111 charged") == f"card {CARD_MARK} charged"
    assert redact_text("card 5500-0000-0000-0004") == f"card {CARD_MARK}"
    # Not Luhn-valid: an order number stays.
    assert redact_text("order 4111111111111112") == "order 4111111111111112"


def test_timestamps_are_not_mistaken_for_cards() -> None:
    assert (
        redact_text("start 1732752000123456789 end 1732752000123")
        == "start 1732752000123456789 end 1732752000123"
    )


def test_public_ips_replaced_private_kept() -> None:
    out = redact_text(
        "client 81.2.69.160 via 10.1.2.3 and 127.0.0.1 at 12:30:45, v6 2606:4700:4700::1111 fe80::1"
    )
    assert out == f"client {IP_MARK} via 10.1.2.3 and 127.0.0.1 at 12:30:45, v6 {IP_MARK} fe80::1"


def test_detector_numbers_in_text_are_untouched() -> None:
    text = "p50 118.0 ms, p95 201.5 ms over 310 traces (41% of root latency)"
    assert redact_text(text) == text


# --- by key -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "user.id",
        "enduser.id",
        "userId",
        "customer_id",
        "account.id",
        "http.request.header.authorization",
        "http.request.header.x-api-key",
        "db.password",
        "session_id",
        "user.email",
        "cookie",
        "credit_card_number",
    ],
)
def test_sensitive_keys(key: str) -> None:
    assert is_sensitive_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "trace_id",
        "span_ids",
        "id",
        "service",
        "operation",
        "user_agent",
        "saved_ms_p50",
        "http.status_code",
        "db.system",
    ],
)
def test_ordinary_keys(key: str) -> None:
    assert not is_sensitive_key(key)


def test_values_under_sensitive_keys_are_replaced_numbers_included() -> None:
    out = redact({"user.id": 48213, "customer_id": "C-991", "enduser.id": "alice", "http.status_code": 200})
    assert out == {
        "user.id": REDACTED,
        "customer_id": REDACTED,
        "enduser.id": REDACTED,
        "http.status_code": 200,
    }


def test_otlp_attribute_pairs_are_judged_by_their_key() -> None:
    attributes = [
        {"key": "user.id", "value": {"intValue": "42"}},
        {"key": "http.url", "value": {"stringValue": "https://a.example/x?ssn=078-05-1120"}},
        {"key": "db.statement", "value": "SELECT 1 FROM t WHERE email = 'x@y.io'"},
    ]
    out = redact(attributes)
    assert out[0] == {"key": "user.id", "value": REDACTED}
    assert out[1] == {"key": "http.url", "value": {"stringValue": "https://a.example/x?ssn=?"}}
    assert out[2]["value"] == "SELECT ? FROM t WHERE email = ?"


def test_url_query_key_holds_a_bare_query_string() -> None:
    assert redact({"url.query": "email=a@b.io&page=2"}) == {"url.query": "email=?&page=?"}


def test_statement_key_redacts_non_sql() -> None:
    assert redact({"db.statement": "GET user:42:profile"}) == {"db.statement": "GET ?"}
    # A detector's normalised statement (an operation template) is not a raw db statement.
    assert redact({"statement": "GET /images/{id}/thumbnail"}) == {"statement": "GET /images/{id}/thumbnail"}


def test_containers_under_sensitive_keys_are_replaced_whole() -> None:
    assert redact({"user_ids": [1, 2, 3], "credentials": {"user": "a", "pass": "b"}}) == {
        "user_ids": REDACTED,
        "credentials": REDACTED,
    }


def test_redaction_is_deep_and_does_not_modify_the_input() -> None:
    original = {
        "evidence": {
            "spans": [{"name": "GET /u?email=a@b.io", "attrs": {"password": "pw"}}],
            "saved_ms": 12.5,
        }
    }
    snapshot = json.dumps(original, sort_keys=True)
    out = redact(original)
    assert json.dumps(original, sort_keys=True) == snapshot
    assert out == {
        "evidence": {"spans": [{"name": "GET /u?email=?", "attrs": {"password": REDACTED}}], "saved_ms": 12.5}
    }


def test_keys_themselves_are_redacted() -> None:
    assert redact({"bob@example.com": 3}) == {EMAIL_MARK: 3}


def test_analysis_ids_are_kept() -> None:
    value = {
        "id": "serialized_calls-0123456789abcdef",
        "trace_ids": ["4bf92f3577b34da6a3ce929d0e0e4736"],
        "span_ids": ["00f067aa0ba902b7"],
    }
    assert redact(value) == value


def test_deep_nesting_does_not_recurse() -> None:
    value: dict[str, object] = {"leaf": "mail me at x@y.io"}
    for _ in range(5000):  # far past the interpreter's recursion limit
        value = {"n": value}
    out = redact(value)
    depth = 0
    while "n" in out:
        out = out["n"]
        depth += 1
    assert depth == 5000
    assert out == {"leaf": f"mail me at {EMAIL_MARK}"}


def test_json_documents_inside_strings_are_redacted_by_key_too() -> None:
    hints = json.dumps({"user.id": "u-77", "lock.wait_ms": 12.5, "note": "ping bob@example.com"})
    out = redact({"hints": hints, "plain": "[not json"})
    assert json.loads(out["hints"]) == {
        "user.id": REDACTED,
        "lock.wait_ms": 12.5,
        "note": f"ping {EMAIL_MARK}",
    }
    assert out["plain"] == "[not json"


def test_long_random_path_segments_are_replaced() -> None:
    assert (
        redact_text("POST /password-reset/k9QzT2vX8rLmN4pW7sYbC1dF/confirm")
        == "POST /password-reset/{token}/confirm"
    )
    # Ordinary long route names (no digits) and short ids stay.
    assert (
        redact_text("GET /api/v1/get_customer_orders_by_region/42")
        == "GET /api/v1/get_customer_orders_by_region/42"
    )
