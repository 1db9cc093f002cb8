"""Every setting and tunable of Hourglass, declared once (as Datasette's ``SETTINGS``).

Each :class:`Setting` names its ``Settings`` attribute, its environment variable (``HOURGLASS_*``),
its type, default, unit, one help text, and the flag and commands that take it. Everything else
is derived from this table:

- ``hourglass.api.settings.Settings`` (public as ``hourglass.Settings``): one attribute per setting
  with a variable, read from the environment (flags win, then variables, then these defaults);
- the Typer options of the ``hourglass`` commands (``hourglass.cli._options``): the same flag,
  help text and default wherever a setting is accepted, so ``analyze --help`` and ``serve --help``
  cannot drift;
- the README's settings and limits tables (``scripts/settings_readme.py`` writes them;
  ``tests/test_docs.py`` checks them);
- the module constants of the receivers, the ingest pipeline and the DuckDB store: the *limits*
  below (no variable, no flag) are their one definition.

This module is the ground floor: it imports nothing else of Hourglass, so every floor
(collector, analysis, api, cli) may read it (``tests/test_layering.py``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MiB = 1024 * 1024

# command names (as typed after `hourglass`)
ANALYZE, SERVE, IMPORT, REPORT, WHATIF, CRITICAL_PATH, MCP = (
    "analyze",
    "serve",
    "import",
    "report",
    "whatif",
    "critical-path",
    "mcp",
)
STORE_COMMANDS = (ANALYZE, SERVE, IMPORT, REPORT, WHATIF, CRITICAL_PATH, MCP)
QUERY_COMMANDS = (ANALYZE, REPORT, WHATIF, CRITICAL_PATH)

# how a value is read from a variable (and a flag); see Setting.parse
TYPES = ("text", "optional_text", "int", "bool", "size", "duration", "secret")


class SettingError(ValueError):
    """A HOURGLASS_* variable that cannot be read; the CLI prints it and exits 2."""


# ---------------------------------------------------------------------------------- parsers


def parse_bytes(text: str) -> int:
    """'1.5GiB', '800MB', '2G', '1073741824' -> bytes (binary multiples for both spellings)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size like 1.5GiB, 800MB or 2G")
    scale = 1024 ** "_kmgt".index(match.group(2).lower() or "_")
    return int(float(match.group(1)) * scale)


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


def iso_ns(ns: int | None) -> str | None:
    """Unix nanoseconds as an ISO 8601 UTC time to the microsecond (what ``--since`` and
    ``?since=`` take back exactly: :func:`parse_since`), e.g. a report window's start."""
    if ns is None:
        return None
    moment = datetime.fromtimestamp(ns // 10**9, UTC).replace(microsecond=ns // 1000 % 10**6)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or ``taskset``'s share,
    not the machine's count), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def format_bytes(value: int) -> str:
    """8388608 -> '8 MiB', 1610612736 -> '1.5 GiB' (as the README writes sizes)."""
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if value >= scale and (value * 10) % scale == 0:
            return f"{value / scale:g} {unit}"
    return str(value)


def format_duration(seconds: float) -> str:
    """604800 -> '7d', 300 -> '5m', 60 -> '60s', 0.25 -> '0.25s' (as the variables take them)."""
    for unit, scale in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds > scale and seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Setting:
    """One setting. ``env`` None and ``flag`` None: a fixed limit (its one definition is here).

    ``default`` is the value itself (bytes, seconds, ...), never its text. ``shown_default``
    overrides how the default reads in help and README (else derived from type and unit);
    ``details`` is README-only text after ``help``.
    """

    name: str
    type: str
    default: Any
    help: str
    env: str | None = None
    flag: str | None = None
    commands: tuple[str, ...] = ()
    unit: str | None = None
    shown_default: str | None = None
    details: str = ""
    attribute: bool = True  # an attribute of Settings (when it has a variable)

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"setting {self.name}: unknown type {self.type!r}")
        if self.env is not None and not self.env.startswith("HOURGLASS_"):
            raise ValueError(f"setting {self.name}: variables are HOURGLASS_*")
        if bool(self.flag) != bool(self.commands):
            raise ValueError(f"setting {self.name}: a flag needs the commands that take it, and back")

    @property
    def fixed(self) -> bool:
        return self.env is None and self.flag is None

    @property
    def shown(self) -> str:
        """The default as a user reads it: '8 MiB', '7d', 'unset'."""
        if self.shown_default is not None:
            return self.shown_default
        if self.default is None:
            return "unset"
        if self.type == "bool":
            return "1" if self.default else "0"
        if self.type == "duration" or self.unit == "seconds":
            return format_duration(float(self.default))
        if self.type == "size" or self.unit == "bytes":
            return format_bytes(int(self.default))
        return str(self.default)

    def cli_help(self) -> str:
        """The one help text of its flag, in every command that takes it."""
        where = []
        if self.env:
            where.append(f"env {self.env}")
        if self.default is not None or self.shown_default is not None:
            where.append(f"default {self.shown}")
        text = self.help[0].upper() + self.help[1:]
        return f"{text} ({'; '.join(where)})" if where else text

    def parse(self, text: str, source: str | None = None) -> Any:
        """The value of ``text`` as this setting's type; :class:`SettingError` naming ``source``
        (default: the variable) and the expected form."""
        source = source or self.env or self.name
        if self.type in ("text", "secret"):
            return text
        if self.type == "optional_text":
            return text or None
        if self.type == "int":
            try:
                return int(text)
            except ValueError:
                raise SettingError(f"{source}={text!r} is not a whole number") from None
        if self.type == "bool":
            value = text.strip().lower()
            if value in ("1", "true", "yes", "on"):
                return True
            if value in ("0", "false", "no", "off", ""):
                return False
            raise SettingError(
                f"{source}={value!r} is not a yes/no value (1, true, yes, on / 0, false, no, off)"
            )
        if self.type == "duration":
            try:
                return parse_duration_seconds(text)
            except ValueError:
                raise SettingError(f"{source}={text!r} is not a duration like 90s, 15m, 12h, 7d") from None
        try:  # size
            return parse_bytes(text)
        except ValueError as exc:
            raise SettingError(f"{source}={exc}") from None

    def from_env(self, env: Mapping[str, str] | None = None) -> Any:
        """The value in ``env`` (default ``os.environ``), else the default."""
        env = os.environ if env is None else env
        reader = _READERS.get(self.name)
        if reader is not None:
            return reader(self, env)
        if self.env is None or self.env not in env:
            return self.default
        if self.type == "optional_text":
            return env[self.env] or None
        return self.parse(env[self.env])


def _api_token(setting: Setting, env: Mapping[str, str]) -> str | None:
    """HOURGLASS_API_TOKEN, else the contents of the file HOURGLASS_API_TOKEN_FILE names (a Docker
    or Kubernetes secret mounted as a file), surrounding whitespace removed."""
    token = env.get(setting.env or "")
    if token:
        return token
    file_var = SETTING["api_token_file"].env or ""
    path = env.get(file_var)
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except OSError as exc:
        raise SettingError(f"{file_var}={path!r}: cannot read it ({exc.strerror or exc})") from None
    if not text:
        raise SettingError(f"{file_var}={path!r} is empty")
    return text


_READERS: dict[str, Callable[[Setting, Mapping[str, str]], Any]] = {"api_token": _api_token}

# Claude Sonnet 5.5: the current Sonnet on the models overview (Sonnet 5 is legacy, Sonnet 4 retired).
DEFAULT_LLM_MODEL = "claude-sonnet-5-5"

SETTINGS: tuple[Setting, ...] = (
    # -- where the spans are --------------------------------------------------------------------
    Setting(
        "db", "text", "hourglass.duckdb",
        "span store: a DuckDB file, clickhouse://USER:PASS@HOST:8123/DATABASE or chdb:DIR",
        env="HOURGLASS_DB", flag="--db", commands=STORE_COMMANDS,
    ),
    Setting(
        "since", "optional_text", None,
        "only traces with a span starting since 15m, 2h, 7d ago or an ISO time (2026-11-27T12:00:00Z)",
        flag="--since", commands=QUERY_COMMANDS, shown_default="all",
    ),
    # -- serve: where it listens ----------------------------------------------------------------
    Setting(
        "host", "text", "127.0.0.1",
        "interface serve listens on (0.0.0.0 to accept other hosts)",
        env="HOURGLASS_HOST", flag="--host", commands=(SERVE,),
    ),
    Setting(
        "grpc_port", "int", 4317, "OTLP/gRPC port; 0 = any free port",
        env="HOURGLASS_GRPC_PORT", flag="--grpc-port", commands=(SERVE,),
    ),
    Setting(
        "http_port", "int", 4318, "OTLP/HTTP port; 0 = any free port",
        env="HOURGLASS_HTTP_PORT", flag="--http-port", commands=(SERVE,),
    ),
    Setting(
        "api_port", "int", 8000, "REST API and report page port; 0 = any free port",
        env="HOURGLASS_API_PORT", flag="--api-port", commands=(SERVE,),
    ),
    Setting(
        "api_token", "secret", None,
        "bearer token required by the REST API and the OTLP receivers",
        env="HOURGLASS_API_TOKEN",
    ),
    Setting(
        "api_token_file", "optional_text", None,
        "read HOURGLASS_API_TOKEN from this file instead (e.g. a Docker or Kubernetes secret)",
        env="HOURGLASS_API_TOKEN_FILE", attribute=False,
    ),
    # -- serve: what it accepts -----------------------------------------------------------------
    # 8 MiB: an OpenTelemetry Collector batch (batch processor / exporter batcher default of 8192
    # spans at ~0.3-1 KB each) fits; grpc's and the Collector's own default is 4 MiB.
    Setting(
        "max_message_bytes", "int", 8 * MiB, "largest accepted Export (gRPC and HTTP)",
        env="HOURGLASS_MAX_MESSAGE_BYTES", flag="--max-message-bytes", commands=(SERVE,), unit="bytes",
        details="an OpenTelemetry Collector batch of 8192 spans (its batch processor's default) fits; "
        "the Collector's and grpc's own default is 4 MiB. Raise it with the Collector's "
        "`send_batch_max_size` in mind",
    ),
    Setting(
        "receive_budget_bytes", "int", 64 * MiB,
        "bytes of Exports being received or waiting to be decoded, per receiver",
        env="HOURGLASS_RECEIVE_BUDGET_BYTES", unit="bytes",
        details="a gRPC call reserves `HOURGLASS_MAX_MESSAGE_BYTES` *before* its message is read "
        "(keeping only the real size once read), an HTTP body each chunk as it arrives. Beyond it: "
        "`RESOURCE_EXHAUSTED` with RetryInfo / 429 with `Retry-After`",
    ),
    Setting(
        "tls_cert", "optional_text", None,
        "PEM certificate (chain): serve OTLP/gRPC, OTLP/HTTP and the API over TLS",
        env="HOURGLASS_TLS_CERT", flag="--tls-cert", commands=(SERVE,),
    ),
    Setting(
        "tls_key", "optional_text", None, "PEM private key of --tls-cert",
        env="HOURGLASS_TLS_KEY", flag="--tls-key", commands=(SERVE,),
    ),
    Setting(
        "tls_client_ca", "optional_text", None,
        "PEM CA: OTLP clients (gRPC and HTTP) must present a certificate it signed (mutual TLS); "
        "the API port asks for none",
        env="HOURGLASS_TLS_CLIENT_CA", flag="--tls-client-ca", commands=(SERVE,),
    ),
    Setting(
        "header_timeout_seconds", "duration", 10.0,
        "an HTTP connection must send a whole request head within this (after connecting or its "
        "previous response), and a gRPC connection finish its handshake; else it is closed",
        env="HOURGLASS_HEADER_TIMEOUT", unit="seconds",
    ),
    Setting(
        "body_timeout_seconds", "duration", 60.0,
        "an HTTP request must send its whole body within this after its head",
        env="HOURGLASS_BODY_TIMEOUT", unit="seconds",
    ),
    Setting(
        "keepalive_timeout_seconds", "duration", 30.0,
        "an idle HTTP keep-alive connection is closed after this",
        env="HOURGLASS_KEEPALIVE_TIMEOUT", unit="seconds",
    ),
    Setting(
        "max_connections", "int", 1000,
        "per HTTP port: with this many connections open, further requests get 503",
        env="HOURGLASS_MAX_CONNECTIONS",
    ),
    Setting(
        "grpc_max_idle_seconds", "duration", 300.0,
        "a gRPC connection with no call for this long is closed (GOAWAY; clients reconnect when needed)",
        env="HOURGLASS_GRPC_MAX_IDLE", unit="seconds",
    ),
    Setting(
        "grpc_keepalive_seconds", "duration", 60.0,
        "the gRPC server pings a connection idle this long and drops it when no answer comes within 20 s",
        env="HOURGLASS_GRPC_KEEPALIVE", unit="seconds",
    ),
    # -- serve: keeping and analysing -----------------------------------------------------------
    Setting(
        "retention_seconds", "duration", 7 * 86400.0,
        "drop traces that ended longer ago than this, e.g. 12h, 7d; 0 keeps all (checked every"
        " 5 minutes, or every tenth of a shorter retention)",
        env="HOURGLASS_RETENTION", flag="--retention", commands=(SERVE,), unit="seconds",
    ),
    Setting(
        "settle_seconds", "duration", 10.0,
        "quiet time after the last new span before the background analysis re-runs",
        env="HOURGLASS_SETTLE", unit="seconds",
    ),
    Setting(
        "incremental_analysis", "bool", True,
        "serve on a DuckDB store extracts each settled trace once (state in <db>.analysis.duckdb) and "
        "decides over the stored rows; false re-analyses the whole store each time",
        env="HOURGLASS_INCREMENTAL_ANALYSIS", shown_default="true",
    ),
    Setting(
        "serve_partitions", "int", 0,
        "serve's whole-store analysis (a ClickHouse store, or HOURGLASS_INCREMENTAL_ANALYSIS=false) "
        "in this many partitions of whole traces, read one at a time by its worker",
        env="HOURGLASS_SERVE_PARTITIONS",
        shown_default="0: as many as the memory budget needs, 1 when it fits",
    ),
    Setting(
        "report_max_spans", "int", 20_000_000,
        "serve's report covers at most about this many span rows: when its window (the whole "
        "retention, or a since window) stores more, it covers the newest traces up to it (whole "
        "batches of the incremental analysis; from the start time of the newest rows in a "
        "whole-store analysis) and its window says what was left out, so a round's time and "
        "memory stop growing with the store; 0 covers the whole window",
        env="HOURGLASS_REPORT_MAX_SPANS", shown_default="20000000",
    ),
    Setting(
        "metrics_public", "bool", False,
        "serve /metrics without the API token (a Prometheus scraping on a trusted network)",
        env="HOURGLASS_METRICS_PUBLIC", flag="--metrics-public/--metrics-private", commands=(SERVE,),
        shown_default="0 (private)",
    ),
    Setting(
        "self_traces_endpoint", "optional_text", None,
        "send Hourglass's own traces (analysis runs, Exports) to this OTLP endpoint: HOST:4317 (gRPC) "
        "or http://HOST:4318; never its own receivers",
        env="HOURGLASS_SELF_TRACES_ENDPOINT", flag="--self-traces-endpoint", commands=(SERVE,),
        shown_default="unset (off)",
    ),
    # -- the analysis ---------------------------------------------------------------------------
    Setting(
        "memory_budget", "size", parse_bytes("1.5GiB"),
        "peak memory an analysis plans for, e.g. 1.5GiB: a larger store or file input is analysed in "
        "partitions of whole traces (analyze, report, diff, serve's whole-store analysis); a what-if or critical-path window larger "
        "than it holds at once is asked in partitions (serve, whatif, critical-path)",
        env="HOURGLASS_MEMORY_BUDGET", flag="--memory-budget", commands=(ANALYZE,), unit="bytes",
        shown_default="1.5GiB",
    ),
    Setting(
        "workers", "int", 0, "worker processes for the partitions of one analysis (whatif, critical-path: of a window "
        "asked in partitions)",
        env="HOURGLASS_WORKERS", flag="--workers", commands=(ANALYZE, WHATIF, CRITICAL_PATH),
        shown_default="0 (one per core)",
    ),
    Setting(
        "cluster", "optional_text", None,
        "Dask scheduler address (tcp://HOST:8786) whose workers extract the partitions (analyze: they "
        "must reach the store at the same path or URL; serve: each batch's spans travel with its task)",
        env="HOURGLASS_CLUSTER", flag="--cluster", commands=(ANALYZE, SERVE),
    ),
    Setting(
        "partitions", "int", 0,
        "analyse the store (or the files) in this many partitions of whole traces (whatif, "
        "critical-path: ask the store in them, on as many --workers processes as the memory budget holds "
        "a partition each)",
        flag="--partitions", commands=(ANALYZE, WHATIF, CRITICAL_PATH),
        shown_default="0: as many as the memory budget needs, 1 when it fits",
    ),
    Setting(
        "memory_log", "bool", False,
        "diagnostic: the partitioned analysis (analyze's decider and workers, serve's rounds) and "
        "serve's server (each read it ships to the analysis worker, each report it publishes and "
        "renders) print each process's resident memory and each phase's peak on standard error, "
        "with the time of day (UTC)",
        env="HOURGLASS_MEMORY_LOG", attribute=False,
    ),
    # -- the write-up agent ---------------------------------------------------------------------
    Setting(
        "llm_model", "text", DEFAULT_LLM_MODEL, "model of the write-up agent",
        env="HOURGLASS_LLM_MODEL",
    ),
    Setting(
        "cache_dir", "optional_text", None,
        "the agent's write-ups are cached in its writeups/ folder",
        env="HOURGLASS_CACHE_DIR", attribute=False,
        shown_default="~/.cache/hourglass (or $XDG_CACHE_HOME/hourglass)",
    ),
    # -- fixed limits: the one definition of the receivers', the pipeline's and the store's -----
    # Handler threads mostly wait for a group commit (the scan releases the GIL, DuckDB works in the
    # loader): enough of them that an Export beyond the admission caps reaches admission control at
    # once and is refused with RetryInfo, instead of waiting behind committing ones.
    Setting("grpc_handler_threads", "int", 64, "OTLP/gRPC handler threads"),
    # The C scan releases the GIL but the column assembly holds it, so more gain nothing and each
    # holds its half-built columns; the other requests wait holding only their bytes.
    Setting("concurrent_decodes", "int", 2, "Exports decoded at once, per receiver (in-process decoding)"),
    Setting(
        "shutdown_retry_after_seconds", "duration", 5.0,
        "retry advice in UNAVAILABLE answers (serve shutting down, spans not committed)",
        unit="seconds",
    ),
    # Reads of ordinary requests take milliseconds, so a short wait turns bursts into a queue.
    Setting(
        "receive_budget_wait_seconds", "duration", 0.25,
        "how long a gRPC Export waits for room in the receive budget before it is refused",
        unit="seconds",
    ),
    Setting(
        "commit_timeout_seconds", "duration", 120.0,
        "longest a gRPC Export waits for its spans' commit before it is answered UNAVAILABLE",
        unit="seconds",
    ),
    Setting(
        "decode_timeout_seconds", "duration", 60.0,
        "longest a gRPC Export's decoding in a worker process may take", unit="seconds",
    ),
    # ~100k decoded spans (~900 B each as Arrow) may wait for a commit: two full group commits.
    Setting(
        "max_pending_spans", "int", 100_000,
        "decoded spans waiting for a commit before Exports are refused (admission control)",
    ),
    Setting(
        "max_pending_bytes", "int", 96 * MiB,
        "bytes of decoded spans waiting for a commit before Exports are refused", unit="bytes",
    ),
    Setting("max_batch_spans", "int", 50_000, "most spans in one group commit"),
    Setting(
        "overload_retry_after_seconds", "duration", 1.0,
        "retry advice (RetryInfo, Retry-After) in the answers to refused Exports", unit="seconds",
    ),
    # DuckDB's buffer pool defaults to 80 % of RAM; one serve on a shared machine should stay small.
    # Larger-than-memory sorts and joins spill to a temporary directory beside the file instead.
    Setting("store_memory_limit", "text", "512MB", "DuckDB's buffer pool (memory_limit) of a store"),
    Setting(
        "serve_store_memory_limit", "text", "256MB",
        "DuckDB's buffer pool (memory_limit) of serve's store: the stored table's cached blocks and "
        "the reads for the analysis worker (a larger sort or join spills to a temporary directory)",
    ),
    Setting(
        "serve_malloc_arena_max", "int", 2,
        "glibc malloc arenas of the serve process (M_ARENA_MAX; MALLOC_ARENA_MAX in its environment "
        "wins): without it each of the receivers' and API's threads may get its own arena",
    ),
    Setting(
        "serve_malloc_mmap_threshold", "int", 1 * MiB,
        "allocations of at least this many bytes in the serve process get their own mapping, "
        "returned when freed (M_MMAP_THRESHOLD; MALLOC_MMAP_THRESHOLD_ in its environment wins)",
        unit="bytes",
    ),
    Setting("store_checkpoint_threshold", "text", "128MB", "DuckDB's WAL size that triggers a checkpoint"),
    Setting(
        "max_stage_seconds", "duration", 10.0,
        "logged spans are loaded into DuckDB at the latest once the oldest has waited this long",
        unit="seconds",
    ),
)  # fmt: skip

SETTING: dict[str, Setting] = {s.name: s for s in SETTINGS}
if len(SETTING) != len(SETTINGS):  # pragma: no cover - a duplicate name in the table
    raise RuntimeError("two settings with one name")


def default(name: str) -> Any:
    """The default of the setting ``name`` (``KeyError`` for a name not in the table)."""
    return SETTING[name].default


def env_var(name: str) -> str:
    """The variable of the setting ``name``."""
    var = SETTING[name].env
    if var is None:
        raise KeyError(f"setting {name} has no variable")
    return var


def settings_for(command: str) -> list[Setting]:
    """The settings whose flag ``command`` takes, in table order."""
    return [s for s in SETTINGS if command in s.commands]


# ---------------------------------------------------------------------------------- README


def _code(text: str) -> str:
    return f"`{text}`"


def readme_settings_table() -> str:
    """The README's table of settings (variables and flags), generated from :data:`SETTINGS`."""
    lines = [
        "| variable | flag | default | meaning |",
        "|---|---|---|---|",
    ]
    for s in SETTINGS:
        if s.fixed:
            continue
        flag = "–"
        if s.flag:
            commands = ", ".join(s.commands) if s.commands != STORE_COMMANDS else "every command with a store"
            flag = f"`{s.flag.split('/')[0]}` ({commands})"
        meaning = s.help + (f". {s.details[0].upper()}{s.details[1:]}" if s.details else "")
        lines.append(f"| {_code(s.env) if s.env else '–'} | {flag} | {_code(s.shown)} | {meaning} |")
    return "\n".join(lines) + "\n"


def readme_limits_table() -> str:
    """The README's table of fixed limits (no variable, no flag)."""
    lines = ["| limit | value | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        if s.fixed:
            lines.append(f"| {_code(s.name)} | {_code(s.shown)} | {s.help} |")
    return "\n".join(lines) + "\n"


README_BLOCKS: dict[str, Callable[[], str]] = {
    "settings-table": readme_settings_table,
    "limits-table": readme_limits_table,
}


def render_readme(text: str) -> str:
    """``text`` (the README) with each generated block replaced by its current contents. A block is
    the lines between ``<!-- NAME: generated from hourglass/settings.py -->`` and ``<!-- /NAME -->``."""
    for name, build in README_BLOCKS.items():
        start = f"<!-- {name}: generated from hourglass/settings.py -->\n"
        end = f"<!-- /{name} -->"
        head, found, rest = text.partition(start)
        if not found or end not in rest:
            raise ValueError(f"README has no block {start.strip()} ... {end}")
        _, _, tail = rest.partition(end)
        text = head + start + build() + end + tail
    return text
