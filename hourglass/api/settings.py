"""Settings for `hourglass serve` and the CLI: flags win, then HOURGLASS_* variables, then defaults.

Every setting here is documented in the README's settings table (a test checks it).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

DEFAULT_DB = "hourglass.duckdb"
DEFAULT_MEMORY_BUDGET = "1.5GiB"
DEFAULT_MAX_MESSAGE_BYTES = 8 * 1024 * 1024


class SettingError(ValueError):
    """A HOURGLASS_* variable that cannot be read; the CLI prints it and exits 2."""


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _env_int(name: str, default: int) -> int:
    text = _env(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise SettingError(f"{name}={text!r} is not a whole number") from None


def _env_bool(name: str, default: bool) -> bool:
    text = _env(name, "1" if default else "0").strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SettingError(f"{name}={text!r} is not a yes/no value (1, true, yes, on / 0, false, no, off)")


def _env_duration(name: str, default: str) -> float:
    text = _env(name, default)
    try:
        return parse_duration_seconds(text)
    except ValueError:
        raise SettingError(f"{name}={text!r} is not a duration like 90s, 15m, 12h, 7d") from None


def parse_bytes(text: str) -> int:
    """'1.5GiB', '800MB', '2G', '1073741824' -> bytes (binary multiples for both spellings)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size like 1.5GiB, 800MB or 2G")
    scale = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * scale)


def _env_bytes(name: str, default: str) -> int:
    text = _env(name, default)
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise SettingError(f"{name}={exc}") from None


def _api_token_from_env() -> str | None:
    """HOURGLASS_API_TOKEN, else the contents of the file HOURGLASS_API_TOKEN_FILE names (a Docker
    or Kubernetes secret mounted as a file), surrounding whitespace removed."""
    token = os.environ.get("HOURGLASS_API_TOKEN")
    if token:
        return token
    path = os.environ.get("HOURGLASS_API_TOKEN_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise SettingError(
            f"HOURGLASS_API_TOKEN_FILE={path!r}: cannot read it ({exc.strerror or exc})"
        ) from None
    if not text:
        raise SettingError(f"HOURGLASS_API_TOKEN_FILE={path!r} is empty")
    return text


def parse_duration_seconds(text: str) -> float:
    """'90', '90s', '15m', '12h', '7d' -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


MAX_SINCE_SECONDS = 100 * 365 * 86400


def parse_since(text: str, now_ns: int | None = None, name: str = "since") -> int:
    """``since`` for the CLI and the REST API alike -> unix nanoseconds: a duration back from now
    ('90s', '15m', '12h', '7d') or an ISO 8601 time (UTC when it names no timezone). ``name`` is
    how the caller spells the parameter in its error messages ('since', '--since')."""
    text = text.strip()
    now_ns = time.time_ns() if now_ns is None else now_ns
    if re.fullmatch(r"\d+(\.\d+)?[smhdw]?", text, re.IGNORECASE):
        seconds = parse_duration_seconds(text)
        if seconds > MAX_SINCE_SECONDS:
            raise ValueError(f"{name} {text!r}: duration longer than 100 years")
        return now_ns - int(seconds * 1e9)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{name} {text!r}: expected a duration back from now such as 15m, 2h or 7d, or an ISO time "
            "such as 2026-11-27T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000) * 1000


@dataclass
class Settings:
    db: str = field(default_factory=lambda: _env("HOURGLASS_DB", DEFAULT_DB))
    host: str = field(default_factory=lambda: _env("HOURGLASS_HOST", "127.0.0.1"))
    grpc_port: int = field(default_factory=lambda: _env_int("HOURGLASS_GRPC_PORT", 4317))
    http_port: int = field(default_factory=lambda: _env_int("HOURGLASS_HTTP_PORT", 4318))
    api_port: int = field(default_factory=lambda: _env_int("HOURGLASS_API_PORT", 8000))
    api_token: str | None = field(default_factory=lambda: _api_token_from_env())
    # 8 MiB: an OpenTelemetry Collector batch (batch processor / exporter batcher default of 8192
    # spans at ~0.3-1 KB each) fits; grpc's and the Collector's own default is 4 MiB.
    max_message_bytes: int = field(
        default_factory=lambda: _env_int("HOURGLASS_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)
    )
    # bytes of Exports being received or waiting to be decoded, per receiver, before refusals
    receive_budget_bytes: int = field(
        default_factory=lambda: _env_int("HOURGLASS_RECEIVE_BUDGET_BYTES", 64 * 1024 * 1024)
    )
    tls_cert: str | None = field(default_factory=lambda: os.environ.get("HOURGLASS_TLS_CERT") or None)
    tls_key: str | None = field(default_factory=lambda: os.environ.get("HOURGLASS_TLS_KEY") or None)
    tls_client_ca: str | None = field(
        default_factory=lambda: os.environ.get("HOURGLASS_TLS_CLIENT_CA") or None
    )
    header_timeout_seconds: float = field(
        default_factory=lambda: _env_duration("HOURGLASS_HEADER_TIMEOUT", "10s")
    )
    body_timeout_seconds: float = field(
        default_factory=lambda: _env_duration("HOURGLASS_BODY_TIMEOUT", "60s")
    )
    keepalive_timeout_seconds: float = field(
        default_factory=lambda: _env_duration("HOURGLASS_KEEPALIVE_TIMEOUT", "30s")
    )
    max_connections: int = field(default_factory=lambda: _env_int("HOURGLASS_MAX_CONNECTIONS", 1000))
    grpc_max_idle_seconds: float = field(
        default_factory=lambda: _env_duration("HOURGLASS_GRPC_MAX_IDLE", "5m")
    )
    grpc_keepalive_seconds: float = field(
        default_factory=lambda: _env_duration("HOURGLASS_GRPC_KEEPALIVE", "60s")
    )
    retention_seconds: float = field(default_factory=lambda: _env_duration("HOURGLASS_RETENTION", "7d"))
    settle_seconds: float = field(default_factory=lambda: _env_duration("HOURGLASS_SETTLE", "10s"))
    # serve: extract each settled trace once and decide over the stored rows (False: re-analyse
    # the whole store every time, as before; the soak benchmark's baseline)
    incremental_analysis: bool = field(
        default_factory=lambda: _env_bool("HOURGLASS_INCREMENTAL_ANALYSIS", True)
    )
    llm_model: str = field(default_factory=lambda: _env("HOURGLASS_LLM_MODEL", "claude-sonnet-5-5"))
    # The analysis: peak memory it plans for, worker processes, and a Dask cluster to run on.
    memory_budget: int = field(
        default_factory=lambda: _env_bytes("HOURGLASS_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET)
    )
    workers: int = field(default_factory=lambda: _env_int("HOURGLASS_WORKERS", 0))  # 0: one per core
    cluster: str | None = field(default_factory=lambda: os.environ.get("HOURGLASS_CLUSTER") or None)
    # /metrics without the API token (a Prometheus scraping on a trusted network)
    metrics_public: bool = field(default_factory=lambda: _env_bool("HOURGLASS_METRICS_PUBLIC", False))
    # Hourglass's own traces to another OTLP endpoint (api.self_traces); None: off
    self_traces_endpoint: str | None = field(
        default_factory=lambda: os.environ.get("HOURGLASS_SELF_TRACES_ENDPOINT") or None
    )


SETTING_ENV_VARS: dict[str, str] = {f.name: f"HOURGLASS_{f.name.upper()}" for f in fields(Settings)}
SETTING_ENV_VARS["retention_seconds"] = "HOURGLASS_RETENTION"
SETTING_ENV_VARS["settle_seconds"] = "HOURGLASS_SETTLE"
for _name in ("header_timeout", "body_timeout", "keepalive_timeout", "grpc_max_idle", "grpc_keepalive"):
    SETTING_ENV_VARS[f"{_name}_seconds"] = f"HOURGLASS_{_name.upper()}"
