"""Redaction of personal data and secrets before anything leaves the machine.

Trace content is untrusted input: span names, statements, URLs and attributes can carry emails,
credentials, user ids and literal values copied from production requests. Everything the write-up
agent sends to the Anthropic API (the recommendation objects and every tool result) passes through
:func:`redact` first.

Two rules apply, both on a copy (the input is never modified):

* **By key** — a value stored under a key that names a secret or a personal identifier
  (``password``, ``authorization``, ``cookie``, ``api_key``, ``user.id``, ``enduser.id``,
  ``customer_id``, ``account.id``, ``email``, ``ssn``, ...) is replaced by ``[REDACTED]``
  whatever it looks like, numbers included (a numeric user id is still a user id). OTLP-style
  ``{"key": ..., "value": ...}`` pairs are treated as the mapping ``key -> value``.
* **By value** — every string (dict keys too) is scanned for patterns: authorization schemes
  (``Bearer``/``Basic``/``Token``/``Digest`` credentials), JWTs, well-known API-key shapes,
  ``name=value`` secrets inside free text, URL user-info, URL query values (the path stays, each
  query value becomes ``?``), long random-looking path segments (``/reset/<token>``), SQL
  literals (strings and numbers in anything that reads as a SQL statement become ``?``), emails,
  US social security numbers, card numbers (13–19 digits that pass the Luhn check) and public IP
  addresses. JSON documents stored in strings are parsed and redacted by key as well. Private, loopback and link-local addresses are kept: they
  name infrastructure (the slow shard's host), not people.

Numbers stored as numbers are left alone unless their key is sensitive: the detector numbers
(durations, counts, shares) are exactly what the agent must see. Identifiers the analysis itself
produced (trace and span ids, recommendation ids) contain no personal data and are kept so the
agent's tools can be called with them.

The walk over nested dicts and lists uses an explicit stack, never recursion, so a deeply nested
attribute value cannot overflow the interpreter stack.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
from collections.abc import Callable
from typing import Any

REDACTED = "[REDACTED]"
EMAIL_MARK = "[EMAIL]"
SSN_MARK = "[SSN]"
CARD_MARK = "[CARD]"
IP_MARK = "[IP]"
TOKEN_MARK = "[TOKEN]"

# --- by key -----------------------------------------------------------------------------------

# A key is split into lower-case words on '.', '_', '-', ' ' and camelCase boundaries; it is
# sensitive when one word is in _SECRET_WORDS, or two consecutive words form an identity pair.
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "token",
        "apikey",
        "authorization",
        "auth",
        "cookie",
        "cookies",
        "credential",
        "credentials",
        "session",
        "sessionid",
        "jsessionid",
        "phpsessid",
        "sid",
        "email",
        "ssn",
        "phone",
        "msisdn",
        "iban",
        "enduser",
        "userid",
        "username",
        "login",
        "customerid",
        "accountid",
        "signature",
        "otp",
        "pin",
        "cvv",
        "cvc",
    }
)
_IDENTITY_OWNERS = frozenset(
    {"user", "customer", "account", "member", "client", "tenant", "person", "patient"}
)
_IDENTITY_SUFFIXES = frozenset({"id", "ids", "name", "email", "number", "no", "key", "uuid", "address"})
_SECRET_PAIRS = frozenset(
    {
        ("api", "key"),
        ("access", "key"),
        ("private", "key"),
        ("secret", "key"),
        ("card", "number"),
        ("credit", "card"),
        ("x", "api"),
        ("set", "cookie"),
        ("full", "name"),
        ("first", "name"),
        ("last", "name"),
        ("client", "secret"),
        ("refresh", "token"),
        ("id", "token"),
    }
)
# Keys whose values the analysis produced itself (ids of traces, spans, findings): never redacted
# by key even if a word matches (e.g. "span_ids" is not a user id).
_ANALYSIS_ID_KEYS = frozenset(
    {"id", "trace_id", "trace_ids", "span_id", "span_ids", "parent_span_id", "recommendation_id"}
)

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_KEY_SPLIT = re.compile(r"[._\-\s/:\[\]]+")


def _key_words(key: str) -> list[str]:
    return [w for w in _KEY_SPLIT.split(_CAMEL.sub("_", key).lower()) if w]


def is_sensitive_key(key: str) -> bool:
    """True when a value stored under ``key`` must be redacted whatever it looks like."""
    if key.lower() in _ANALYSIS_ID_KEYS:
        return False
    words = _key_words(key)
    if any(w in _SECRET_WORDS for w in words):
        return True
    for first, second in itertools.pairwise(words):
        if (first, second) in _SECRET_PAIRS:
            return True
        if first in _IDENTITY_OWNERS and second in _IDENTITY_SUFFIXES:
            return True
    return False


# --- by value ---------------------------------------------------------------------------------

_AUTH_SCHEME = re.compile(
    r"\b(Bearer|Basic|Token|Digest|Negotiate|NTLM)\s+[A-Za-z0-9._~+/=\-]{6,}", re.IGNORECASE
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]*")
_KNOWN_TOKENS = re.compile(
    r"\b(?:"
    r"sk-[A-Za-z0-9_\-]{16,}"  # Anthropic / OpenAI style secret keys
    r"|AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{20,}"
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}"  # Slack tokens
    r"|AIza[0-9A-Za-z_\-]{30,}"  # Google API keys
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}"  # Stripe keys
    r")"
)
# name=value / name: value secrets inside free text (log lines, headers, connection strings).
_INLINE_SECRET = re.compile(
    r"(?P<name>\b(?:password|passwd|pwd|passphrase|secret|client_secret|token|access_token|refresh_token|"
    r"id_token|api[_\-]?key|apikey|x-api-key|auth|authorization|cookie|set-cookie|session(?:id)?|sid)\b)"
    r"(?P<sep>[\"']?\s*[=:]\s*)"  # an optional closing quote: "password": "..." in JSON text
    r"(?!(?:Bearer|Basic|Token|Digest|Negotiate|NTLM)\s)"  # the scheme rule handles these
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@?#]+)@")
# A query string: '?' right after a URL/path character and followed by name=value pairs.
_QUERY = re.compile(r"(?<=[\w/.\-~%])\?(?P<query>[^\s#\"'<>]*=[^\s#\"'<>]*)")
_QUERY_PAIR = re.compile(r"(?P<name>[^=&;]*)(?:=(?P<value>[^&;]*))?(?P<sep>[&;]?)")
# A long random-looking path segment (a reset or session token, an API key in a route): at least
# 24 characters of [A-Za-z0-9_-] with both letters and digits, right after a '/'.
_PATH_TOKEN = re.compile(
    r"(?<=/)(?=[A-Za-z0-9_\-]*\d)(?=[A-Za-z0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{24,}(?=[/?#\s\"']|$)"
)
PATH_TOKEN_MARK = "{token}"
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
# Card numbers start with 2-6 (Mastercard, Amex, Visa, Discover, ...); nanosecond and millisecond
# timestamps of this era start with 1, so they are not mistaken for cards.
_CARD = re.compile(r"(?<![\d\-])[2-6](?:[ \-]?\d){12,18}(?![\d\-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
# IPv6 candidates (compressed forms too); ipaddress decides, so clock times like 12:30:45 stay.
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")

# SQL: a string reads as a statement when it starts with one of these verbs.
_SQL_START = re.compile(
    r"^\s*(?:/\*.*?\*/\s*)*(?:SELECT|INSERT|UPDATE|DELETE|WITH|REPLACE|MERGE|UPSERT|CALL|EXEC|EXECUTE|VALUES|"
    r"SHOW|DESCRIBE|EXPLAIN|CREATE|ALTER|DROP|TRUNCATE|GRANT|BEGIN|COPY)\b",
    re.IGNORECASE | re.DOTALL,
)
_SQL_STRING = re.compile(r"(?:[NEBX]|U&)?'(?:[^']|'')*'", re.IGNORECASE)
_SQL_DOLLAR = re.compile(r"\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$", re.DOTALL)
# A number that is a literal: not part of an identifier (t1, col_2) nor a placeholder ($1, :1).
_SQL_NUMBER = re.compile(r"(?<![\w$:.@#])[-+]?(?:0x[0-9A-Fa-f]+|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)(?![\w.])")
_SQL_DOUBLE_QUOTED = re.compile(r'"(?:[^"]|"")*"')


def _luhn_ok(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        d = ord(char) - 48
        if position % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card_sub(match: re.Match[str]) -> str:
    digits = re.sub(r"[ \-]", "", match.group(0))
    if 13 <= len(digits) <= 19 and _luhn_ok(digits):
        return CARD_MARK
    return match.group(0)


def _ip_sub(match: re.Match[str]) -> str:
    text = match.group(0)
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text  # not an address (a version string such as 1.2.3.400)
    if address.is_private or address.is_loopback or address.is_link_local or address.is_unspecified:
        return text
    return IP_MARK


def _query_sub(match: re.Match[str]) -> str:
    parts = []
    for pair in _QUERY_PAIR.finditer(match.group("query")):
        name, value, sep = pair.group("name"), pair.group("value"), pair.group("sep")
        if not name and value is None and not sep:
            continue
        parts.append(f"{name}=?" if value is not None else "?")
        parts.append(sep)
    return "?" + "".join(parts)


def _inline_secret_sub(match: re.Match[str]) -> str:
    value = match.group("value")
    if value.startswith(("?", "[")):
        return match.group(0)  # already a placeholder
    return f"{match.group('name')}{match.group('sep')}{REDACTED}"


def looks_like_sql(text: str) -> bool:
    return bool(_SQL_START.match(text))


_PLACEHOLDER_BASE = 0xF0000  # Supplementary Private Use Area-A: never in real statements
_PLACEHOLDER = re.compile("[\U000f0000-\U000ffffd]")


def redact_sql(statement: str) -> str:
    """Replace every literal in a SQL statement by ``?``: quoted strings (with '' escapes and
    dollar quoting) and numbers, keeping identifiers (double-quoted or not) and placeholders."""
    protected: list[str] = []

    def protect(match: re.Match[str]) -> str:
        protected.append(match.group(0))
        return chr(_PLACEHOLDER_BASE + len(protected) - 1)  # one private-use char, no digits

    text = _SQL_DOLLAR.sub("?", statement)
    text = _SQL_STRING.sub("?", text)
    text = _SQL_DOUBLE_QUOTED.sub(protect, text)  # quoted identifiers keep their digits
    text = _SQL_NUMBER.sub("?", text)
    return _PLACEHOLDER.sub(lambda m: protected[ord(m.group(0)) - _PLACEHOLDER_BASE], text)


def redact_text(text: str) -> str:
    """Redact secrets and personal data found by pattern in one string."""
    if not text:
        return text
    if looks_like_sql(text):
        text = redact_sql(text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _JWT.sub(TOKEN_MARK, text)
    text = _KNOWN_TOKENS.sub(TOKEN_MARK, text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _QUERY.sub(_query_sub, text)
    text = _PATH_TOKEN.sub(PATH_TOKEN_MARK, text)
    text = _INLINE_SECRET.sub(_inline_secret_sub, text)
    text = _EMAIL.sub(EMAIL_MARK, text)
    text = _SSN.sub(SSN_MARK, text)
    text = _CARD.sub(_card_sub, text)
    text = _IPV4.sub(_ip_sub, text)
    text = _IPV6.sub(_ip_sub, text)
    return text


# Keys holding a bare query string (no leading '?').
_QUERY_KEYS = frozenset({"url.query", "http.query", "query_string", "querystring", "http.query_string"})
# Keys holding a database statement. A statement that is not SQL (Redis, Memcached, a Mongo
# document) has no portable literal syntax, so only its first word (the command) is kept.
# (Only the OpenTelemetry attribute names: a detector's evidence "statement" is already normalised.)
_STATEMENT_KEYS = frozenset({"db.statement", "db.query.text", "db.query"})


def redact_statement(statement: str) -> str:
    """A database statement with its literals removed (SQL) or reduced to its command word."""
    if looks_like_sql(statement):
        return redact_text(statement)
    command = statement.strip().split(None, 1)
    if not command:
        return statement
    return redact_text(command[0]) + (" ?" if len(command) > 1 else "")


def _redact_scalar(value: Any, key: str | None) -> Any:
    if key is not None and is_sensitive_key(key) and value is not None and not isinstance(value, bool):
        return REDACTED
    if isinstance(value, str):
        lowered = key.lower() if key is not None else ""
        if lowered in _STATEMENT_KEYS:
            return redact_statement(value)
        if lowered in _QUERY_KEYS:
            return redact_text("/?" + value)[2:] if "=" in value else (REDACTED if value else value)
        embedded = _embedded_json(value)
        if embedded is not None:
            # A JSON document stored as a string (the span's hint attributes, a logged request
            # body): redact it structurally so its keys count, then store it as JSON again.
            return json.dumps(redact(embedded), separators=(",", ":"), ensure_ascii=False)
        return redact_text(value)
    return value


_MAX_EMBEDDED_JSON_CHARS = 1_000_000


def _embedded_json(text: str) -> Any:
    """The parsed value when ``text`` is a JSON object or array, else None."""
    stripped = text.strip()
    if len(stripped) < 2 or len(stripped) > _MAX_EMBEDDED_JSON_CHARS or stripped[0] not in "{[":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict | list) else None


def redact(value: Any) -> Any:
    """A redacted deep copy of a JSON-like value (dicts, lists, tuples, scalars).

    Dict keys are strings after redaction (pattern rules apply to them too). Values under a
    sensitive key are replaced whole, containers included. Walks with an explicit stack.
    """
    root: list[Any] = [None]
    # Each task: (source value, key it was stored under, setter that places the redacted copy).
    stack: list[tuple[Any, str | None, Callable[[Any], None]]] = [
        (value, None, lambda v: root.__setitem__(0, v))
    ]
    while stack:
        source, key, place = stack.pop()
        if key is not None and is_sensitive_key(key) and isinstance(source, dict | list | tuple):
            place(REDACTED)
            continue
        if isinstance(source, dict):
            copy: dict[str, Any] = {}
            place(copy)
            pair_key = source.get("key") if isinstance(source.get("key"), str) else None
            for k, v in source.items():
                new_key = redact_text(str(k))
                # OTLP attribute pairs: {"key": "user.id", "value": ...} -> judge value by "user.id".
                effective_key = pair_key if (k == "value" and pair_key is not None) else str(k)
                copy[new_key] = None
                stack.append((v, effective_key, _dict_setter(copy, new_key)))
        elif isinstance(source, list | tuple):
            items: list[Any] = [None] * len(source)
            place(items)
            for index, item in enumerate(source):
                # List items inherit the list's key: user_ids: [...] redacts every element.
                stack.append((item, key, _list_setter(items, index)))
        else:
            place(_redact_scalar(source, key))
    return root[0]


def _dict_setter(target: dict[str, Any], key: str) -> Callable[[Any], None]:
    def place(value: Any) -> None:
        target[key] = value

    return place


def _list_setter(target: list[Any], index: int) -> Callable[[Any], None]:
    def place(value: Any) -> None:
        target[index] = value

    return place
