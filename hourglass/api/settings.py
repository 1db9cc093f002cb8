"""Settings for `hourglass serve` and the CLI: flags win, then HOURGLASS_* variables, then defaults.

Every setting is declared once, in :data:`hourglass.settings.SETTINGS` (variable, type, default,
help, flag); :class:`Settings` is built from that table, and the README's settings table is
generated from it (``tests/test_docs.py`` checks both ways).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hourglass.settings import (
    MAX_SINCE_SECONDS,
    SETTING,
    SETTINGS,
    SettingError,
    parse_bytes,
    parse_duration_seconds,
    parse_since,
)

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MEMORY_BUDGET",
    "MAX_SINCE_SECONDS",
    "SETTING_ENV_VARS",
    "SettingError",
    "Settings",
    "parse_bytes",
    "parse_duration_seconds",
    "parse_since",
]

DEFAULT_DB: str = SETTING["db"].default
DEFAULT_MEMORY_BUDGET: str = SETTING["memory_budget"].shown
DEFAULT_MAX_MESSAGE_BYTES: int = SETTING["max_message_bytes"].default


def _from_table(name: str) -> Any:
    """A dataclass field whose value is read, when a Settings is made, from the setting's variable."""
    setting = SETTING[name]
    if setting.env is None or not setting.attribute:
        raise ValueError(f"setting {name} is not a Settings attribute")
    return field(default_factory=setting.from_env)


@dataclass
class Settings:
    """One attribute per setting with a variable in :data:`hourglass.settings.SETTINGS` (same
    name, same order); what each means is the table's help text."""

    db: str = _from_table("db")
    host: str = _from_table("host")
    grpc_port: int = _from_table("grpc_port")
    http_port: int = _from_table("http_port")
    api_port: int = _from_table("api_port")
    api_token: str | None = _from_table("api_token")
    max_message_bytes: int = _from_table("max_message_bytes")
    receive_budget_bytes: int = _from_table("receive_budget_bytes")
    tls_cert: str | None = _from_table("tls_cert")
    tls_key: str | None = _from_table("tls_key")
    tls_client_ca: str | None = _from_table("tls_client_ca")
    header_timeout_seconds: float = _from_table("header_timeout_seconds")
    body_timeout_seconds: float = _from_table("body_timeout_seconds")
    keepalive_timeout_seconds: float = _from_table("keepalive_timeout_seconds")
    max_connections: int = _from_table("max_connections")
    grpc_max_idle_seconds: float = _from_table("grpc_max_idle_seconds")
    grpc_keepalive_seconds: float = _from_table("grpc_keepalive_seconds")
    retention_seconds: float = _from_table("retention_seconds")
    settle_seconds: float = _from_table("settle_seconds")
    incremental_analysis: bool = _from_table("incremental_analysis")
    serve_partitions: int = _from_table("serve_partitions")
    report_max_spans: int = _from_table("report_max_spans")
    metrics_public: bool = _from_table("metrics_public")
    self_traces_endpoint: str | None = _from_table("self_traces_endpoint")
    memory_budget: int = _from_table("memory_budget")
    workers: int = _from_table("workers")
    cluster: str | None = _from_table("cluster")
    llm_model: str = _from_table("llm_model")


_ATTRIBUTES = [s.name for s in SETTINGS if s.env is not None and s.attribute]
if [f.name for f in fields(Settings)] != _ATTRIBUTES:  # pragma: no cover - caught at import by every test
    raise RuntimeError(
        f"Settings and hourglass.settings.SETTINGS disagree: {[f.name for f in fields(Settings)]} != {_ATTRIBUTES}"
    )

# attribute -> variable, for every Settings attribute (and the variables that only feed one)
SETTING_ENV_VARS: dict[str, str] = {s.name: s.env for s in SETTINGS if s.env is not None}
