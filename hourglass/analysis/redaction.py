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

from hourglass.collector import json_limits

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
        ("signing", "key"),
        ("encryption", "key"),
        ("master", "key"),
        ("shared", "key"),
        ("license", "key"),
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


# Secret-looking words inside longer words ("x_internal_apitoken", "dbpassword", "aws4secretkey"):
# a word containing one of these is sensitive. "key" counts only inside a longer word that is not
# an ordinary one (a lone "key" is a map or lock key: "op_key", "wait_key" are the analysis' own).
_SECRET_SUBSTRINGS = ("token", "secret", "passw", "credential", "apikey", "privatekey", "accesskey")
_BENIGN_KEY_WORDS = frozenset(
    {"key", "keys", "keyspace", "keyspaces", "keyword", "keywords", "keyboard", "hotkey"}
)


def _secret_word(word: str) -> bool:
    if word in _SECRET_WORDS or any(part in word for part in _SECRET_SUBSTRINGS):
        return True
    return "key" in word and word not in _BENIGN_KEY_WORDS and not word.endswith("keys")


def is_sensitive_key(key: str) -> bool:
    """True when a value stored under ``key`` must be redacted whatever it looks like."""
    if key.lower() in _ANALYSIS_ID_KEYS:
        return False
    words = _key_words(key)
    if any(_secret_word(w) for w in words):
        return True
    for first, second in itertools.pairwise(words):
        if (first, second) in _SECRET_PAIRS:
            return True
        if first in _IDENTITY_OWNERS and second in _IDENTITY_SUFFIXES:
            return True
    return False


# --- by value ---------------------------------------------------------------------------------
#
# Every pattern runs in linear time on hostile input (a test feeds 1 MB of adversarial text to
# each): a pattern that scans a run of characters starts only where the run starts (a lookbehind
# for the run's own class, not ``\b``, which also matches after every '.' or '-' inside the run),
# scans it possessively (``++``, ``*+``: no backtracking into it), and bounded quantifiers are
# used wherever a match can fail late. Anything more than a pattern (PEM blocks, SQL lexing)
# is a loop that only moves forward.

# A run of token characters (base64, base64url, hex, ids): the unit the token rules look at.
_RUN = r"A-Za-z0-9_\-"
_AUTH_SCHEME = re.compile(
    r"(?<![A-Za-z0-9_])(Bearer|Basic|Token|Digest|Negotiate|NTLM|AWS4-HMAC-SHA256|AWS)[ \t]++"
    r"[A-Za-z0-9._~+/=\-]{6,}+",
    re.IGNORECASE,
)
_JWT = re.compile(rf"(?<![{_RUN}])eyJ[{_RUN}]{{5,}}+\.[{_RUN}]{{5,}}+\.[{_RUN}]*+")
_KNOWN_TOKENS = re.compile(
    rf"(?<![{_RUN}])(?:"
    rf"sk-[{_RUN}]{{16,}}+"  # Anthropic / OpenAI style secret keys
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}+"  # AWS access key ids
    r"|gh[pousr]_[A-Za-z0-9]{20,}+"  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{20,}+"
    r"|xox[abposr]-[A-Za-z0-9\-]{10,}+"  # Slack tokens
    rf"|AIza[{_RUN}]{{30,}}+"  # Google API keys
    r"|(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{10,}+"  # Stripe keys
    r")"
)
# PEM blocks (private keys above all; certificates too, they cost nothing to drop).
_PEM_BEGIN = "-----BEGIN "
_PEM_END = re.compile(r"-----END [A-Z0-9 ]{0,64}-----")
PEM_MARK = "[PEM BLOCK]"
# A Cookie / Set-Cookie header: every pair after it, up to the end of the line or the quote.
_COOKIE_HEADER = re.compile(
    r"(?<![A-Za-z0-9_\-])(?P<name>(?:set-)?cookies?)(?P<sep>[\"']?[ \t]*+[=:][ \t]*+[\"']?)"
    r"(?P<value>[^\r\n\"']++)",
    re.IGNORECASE,
)
# name=value / name: value secrets inside free text (log lines, headers, connection strings): the
# name is a whole word (dots, dashes and underscores included) judged by _secret_name, so
# secret-looking names inside longer names count (aws_secret_access_key, x-api-token, dbPassword).
_INLINE_SECRET = re.compile(
    r"(?<![A-Za-z0-9_.\-])(?P<name>[A-Za-z0-9_.\-]++)"
    r"(?P<sep>[\"']?[ \t]*+[=:][ \t]*+)"  # an optional closing quote: "password": "..." in JSON text
    r"(?P<value>\"[^\"\r\n]{0,4096}\"|'[^'\r\n]{0,4096}'|[^\s&;,'\"]++)",
)
_INLINE_SCHEME = re.compile(r"(?:Bearer|Basic|Token|Digest|Negotiate|NTLM|AWS4-HMAC-SHA256)\s", re.IGNORECASE)
_INLINE_WORDS = frozenset(
    {"pwd", "auth", "authorization", "cookie", "session", "sessionid", "sid", "signature", "sig", "otp",
     "credential", "credentials", "x-amz-signature", "x-amz-credential", "x-amz-security-token"}
)  # fmt: skip
_INLINE_SUBSTRINGS = ("token", "secret", "passw", "key", "credential", "signature", "passphrase")
_URL_USERINFO = re.compile(
    r"(?P<scheme>(?<![a-zA-Z0-9+.\-])[a-zA-Z][a-zA-Z0-9+.\-]*+://)(?P<userinfo>[^/\s@?#]++)@"
)
# A query string: '?' right after a URL/path character; its pairs lose their values.
_QUERY = re.compile(r"(?<=[\w/.\-~%])\?(?P<query>[^\s#\"'<>?]*+)")
_QUERY_PAIR = re.compile(r"(?P<name>[^=&;]*)(?:=(?P<value>[^&;]*))?(?P<sep>[&;]?)")
# A long random-looking path segment (a reset or session token, an API key in a route): at least
# 24 characters of [A-Za-z0-9_-] with both letters and digits, right after a '/'.
_PATH_TOKEN = re.compile(r"(?<=/)[A-Za-z0-9_\-]{24,}+(?=[/?#\s\"']|$)")
PATH_TOKEN_MARK = "{token}"
# The catch-all: a long run of token characters that looks random (see _random_looking).
_LONG_TOKEN = re.compile(r"(?<![A-Za-z0-9_\-+/=~])[A-Za-z0-9_\-+/~]{20,}+=*+")
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]++@(?P<domain>[A-Za-z0-9\-]++(?:\.[A-Za-z0-9\-]++)++)"
)
_SSN = re.compile(r"(?<![\d\-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d\-])")
# Card numbers start with 2-6 (Mastercard, Amex, Visa, Discover, ...), digits grouped by spaces,
# dashes or dots; nanosecond and millisecond timestamps of this era start with 1.
_CARD = re.compile(r"(?<![\d\-.])[2-6](?:[ \-.]?\d){12,18}(?![\d\-]|\.\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
# IPv6 candidates (compressed forms too); ipaddress decides, so clock times like 12:30:45 stay.
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")

# SQL: a string is a statement when one of these verbs starts it (after comments and opening
# parentheses), or when one appears anywhere followed by a clause word (a statement quoted in a
# log line or an exception message): literals are removed from the verb on.
_SQL_VERBS = (
    r"SELECT|INSERT|UPDATE|DELETE|WITH|REPLACE|MERGE|UPSERT|CALL|EXEC|EXECUTE|VALUES|SHOW|DESCRIBE|"
    r"EXPLAIN|CREATE|ALTER|DROP|TRUNCATE|GRANT|BEGIN|COPY"
)
_SQL_VERB_AT = re.compile(rf"(?:{_SQL_VERBS})\b", re.IGNORECASE)
_SQL_LEADING = re.compile(r"\s++|--[^\r\n]*+|/\*(?:[^*]++|\*(?!/))*+(?:\*/)?|\(")
_SQL_CLAUSE = re.compile(r"(?<![A-Za-z0-9_])(?:FROM|INTO|SET|WHERE|VALUES)(?![A-Za-z0-9_])", re.IGNORECASE)
_SQL_EMBEDDED_VERB = re.compile(
    r"(?<![A-Za-z0-9_])(?:SELECT|INSERT|UPDATE|DELETE|MERGE|UPSERT|REPLACE)\s", re.IGNORECASE
)
_SQL_EMBEDDED_REACH = 4096  # how far before its clause word a statement's verb may be
# One lexer for every literal and comment, left to right, so a quote inside a comment or a
# comment marker inside a string cannot shift what is read as a literal.
_SQL_TOKEN = re.compile(
    r"(?P<string>(?:[NEBXnebx]|[Uu]&)?'[^']*+(?:''[^']*+)*+'?)"
    r'|(?P<dquoted>"[^"]*+(?:""[^"]*+)*+"?)'
    r"|(?P<backtick>`[^`]*+`?)"
    r"|(?P<line_comment>(?:--|#)[^\r\n]*+)"
    r"|(?P<block_comment>/\*(?:[^*]++|\*(?!/))*+(?:\*/)?)"
    r"|(?P<dollar>\$(?:[A-Za-z_][A-Za-z0-9_]*+)?\$)"
    r"|(?P<number>(?<![\w$:.@#])[-+]?(?:0x[0-9A-Fa-f]++|\d++(?:\.\d++)?(?:[eE][-+]?\d++)?)(?![\w.]))"
    r"|(?P<word>[A-Za-z_][A-Za-z0-9_$]*+)"
)
# Words before a double-quoted name that make it an identifier (a table, an index, ...).
_SQL_IDENTIFIER_BEFORE = frozenset(
    {"FROM", "JOIN", "UPDATE", "INTO", "TABLE", "INDEX", "VIEW", "EXISTS", "ON"}
)
_SQL_LEFT_OPERAND = re.compile(
    r"(?<!\s)\s*+(?:\.|=|<>|!=|<=|>=|<|>|(?:IS|IN|LIKE|ILIKE|BETWEEN|AS|SET)\b)", re.IGNORECASE
)


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
    digits = re.sub(r"[ \-.]", "", match.group(0))
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


def _email_sub(match: re.Match[str]) -> str:
    tld = match.group("domain").rsplit(".", 1)[-1]
    if len(tld) >= 2 and tld.isalpha():
        return EMAIL_MARK
    return match.group(0)


def _query_sub(match: re.Match[str]) -> str:
    query = match.group("query")
    if "=" not in query:
        return match.group(0)
    parts = []
    for pair in _QUERY_PAIR.finditer(query):
        name, value, sep = pair.group("name"), pair.group("value"), pair.group("sep")
        if not name and value is None and not sep:
            continue
        parts.append(f"{name}=?" if value is not None else "?")
        parts.append(sep)
    return "?" + "".join(parts)


def _secret_name(name: str) -> bool:
    lowered = name.lower()
    if lowered in _INLINE_WORDS:
        return True
    return any(part in lowered for part in _INLINE_SUBSTRINGS) and lowered not in _BENIGN_KEY_WORDS


def _inline_secret_sub(match: re.Match[str]) -> str:
    value = match.group("value")
    if (
        not _secret_name(match.group("name"))
        or value.startswith(("?", "[", "{token}"))
        or value in ('""', "''")
    ):
        return match.group(0)  # not a secret's name, or already a placeholder
    if _INLINE_SCHEME.match(match.string, match.start("value")):
        return match.group(0)  # "Authorization: Bearer x": the scheme rule handles the credential
    return f"{match.group('name')}{match.group('sep')}{REDACTED}"


def _cookie_sub(match: re.Match[str]) -> str:
    return f"{match.group('name')}{match.group('sep')}{REDACTED}"


def _path_token_sub(match: re.Match[str]) -> str:
    segment = match.group(0)
    has_digit = any(c.isdigit() for c in segment)
    has_letter = any(c.isalpha() for c in segment)
    return PATH_TOKEN_MARK if has_digit and has_letter else segment


_HEX = frozenset("0123456789abcdefABCDEF")


def _random_looking(token: str) -> bool:
    """A credential-like run: some part (between '-', '_', '.') of 16+ characters mixing letters
    and at least two digits, or the whole run mixing upper case, lower case and digits (base64).
    Kept: 16- and 32-digit hex (span and trace ids, the analysis' own recommendation ids), and
    words without digits (long route and function names)."""
    body = token.rstrip("=")
    digits = sum(c.isdigit() for c in body)
    if digits < 2:
        return False
    for part in re.split(r"[_\-.]", body):
        if len(part) < 16 or not any(c.isalpha() for c in part):
            continue
        if len(part) in (16, 32) and all(c in _HEX for c in part):
            continue  # an id: trace (32), span (16), recommendation id suffix (16)
        if sum(c.isdigit() for c in part) >= 2:
            return True
    has_upper = any(c.isupper() for c in body)
    has_lower = any(c.islower() for c in body)
    return has_upper and has_lower and len(body) >= 24 and ("/" in body or "+" in body or digits >= 4)


def _long_token_sub(match: re.Match[str]) -> str:
    return TOKEN_MARK if _random_looking(match.group(0)) else match.group(0)


def _redact_pem(text: str) -> str:
    """PEM blocks (``-----BEGIN ...-----`` to the matching END, or to the end of the text when
    the END is missing) become one mark. A forward-only loop: linear however many BEGINs."""
    if _PEM_BEGIN not in text:
        return text
    out: list[str] = []
    position = 0
    while (begin := text.find(_PEM_BEGIN, position)) >= 0:
        out.append(text[position:begin])
        out.append(PEM_MARK)
        end = _PEM_END.search(text, begin + len(_PEM_BEGIN))
        position = end.end() if end is not None else len(text)
    out.append(text[position:])
    return "".join(out)


def _sql_start(text: str) -> int:
    """Where the SQL verb of a statement starts (after leading comments and parentheses), or -1."""
    position = 0
    while (leading := _SQL_LEADING.match(text, position)) is not None and leading.end() > position:
        position = leading.end()
    return position if _SQL_VERB_AT.match(text, position) else -1


def looks_like_sql(text: str) -> bool:
    return _sql_start(text) >= 0


def _double_quoted_is_identifier(text: str, start: int, end: int, previous_word: str | None) -> bool:
    """A double-quoted token is an identifier (kept) after FROM/JOIN/UPDATE/INTO/..., after or
    before a '.', or as the left operand of a comparison or assignment; anything else is a MySQL
    string literal (``WHERE note <> "..."``, ``VALUES ("...")``) and is redacted."""
    before = text[max(0, start - 1) : start]
    if before == ".":
        return True
    if previous_word is not None and previous_word.upper() in _SQL_IDENTIFIER_BEFORE:
        return True
    return _SQL_LEFT_OPERAND.match(text, end) is not None


def redact_sql(statement: str) -> str:
    """Replace every literal in a SQL statement by ``?``: quoted strings of every style ('...',
    E'...', MySQL "..." literals, dollar quoting) and numbers; comments lose their text; kept are
    keywords, identifiers (bare, backticked, double-quoted where they name something) and
    placeholders ($1, :name, ?)."""
    out: list[str] = []
    position = 0
    previous_word: str | None = None  # the last bare word, for the double-quote rule
    last_end = 0
    while (token := _SQL_TOKEN.search(statement, position)) is not None:
        out.append(statement[position : token.start()])
        kind = token.lastgroup
        text = token.group(0)
        if kind == "word":
            out.append(text)
            previous_word = text
        elif kind == "string" or kind == "number":
            out.append("?")
            previous_word = None
        elif kind == "dquoted":
            is_name = _double_quoted_is_identifier(statement, token.start(), token.end(), previous_word)
            out.append(text if is_name and text.endswith('"') and len(text) <= 130 else "?")
            previous_word = None
        elif kind == "backtick":
            out.append(text)
            previous_word = None
        elif kind == "line_comment":
            out.append(text[:2] if text.startswith("--") else "#")
        elif kind == "block_comment":
            out.append("/* */")
        else:  # a dollar-quote opener: the literal runs to the same tag (to the end if unclosed)
            close = statement.find(text, token.end())
            out.append("?")
            position = len(statement) if close < 0 else close + len(text)
            last_end = position
            continue
        position = token.end()
        last_end = position
    out.append(statement[max(position, last_end) :])
    return "".join(out)


def _redact_sql_anywhere(text: str) -> str:
    start = _sql_start(text)
    if start >= 0:
        return text[:start] + redact_sql(text[start:])
    # A verb followed (within _SQL_EMBEDDED_REACH) by a clause word: each clause word looks back
    # only over text no earlier clause word looked at, so the search stays linear.
    looked = 0
    for clause in _SQL_CLAUSE.finditer(text):
        verb = _SQL_EMBEDDED_VERB.search(
            text, max(looked, clause.start() - _SQL_EMBEDDED_REACH), clause.start()
        )
        if verb is not None:
            return text[: verb.start()] + redact_sql(text[verb.start() :])
        looked = clause.start()
    return text


def redact_text(text: str) -> str:
    """Redact secrets and personal data found by pattern in one string."""
    if not text:
        return text
    text = _redact_pem(text)
    text = _redact_sql_anywhere(text)
    text = _AUTH_SCHEME.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    text = _JWT.sub(TOKEN_MARK, text)
    text = _KNOWN_TOKENS.sub(TOKEN_MARK, text)
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", text)
    text = _QUERY.sub(_query_sub, text)
    text = _PATH_TOKEN.sub(_path_token_sub, text)
    text = _COOKIE_HEADER.sub(_cookie_sub, text)
    text = _INLINE_SECRET.sub(_inline_secret_sub, text)
    text = _EMAIL.sub(_email_sub, text)
    text = _SSN.sub(SSN_MARK, text)
    text = _CARD.sub(_card_sub, text)
    text = _LONG_TOKEN.sub(_long_token_sub, text)
    text = _IPV4.sub(_ip_sub, text)
    text = _IPV6.sub(_ip_sub, text)
    return text


# Every compiled pattern above, for the linear-time test.
PATTERNS: tuple[re.Pattern[str], ...] = (
    _AUTH_SCHEME, _JWT, _KNOWN_TOKENS, _PEM_END, _COOKIE_HEADER, _INLINE_SECRET, _INLINE_SCHEME,
    _URL_USERINFO, _QUERY, _QUERY_PAIR, _PATH_TOKEN, _LONG_TOKEN, _EMAIL, _SSN, _CARD, _IPV4, _IPV6,
    _SQL_VERB_AT, _SQL_LEADING, _SQL_CLAUSE, _SQL_EMBEDDED_VERB, _SQL_TOKEN, _SQL_LEFT_OPERAND,
)  # fmt: skip


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
        value = json_limits.loads(stripped)  # bounded depth: a deep document is redacted as text
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
