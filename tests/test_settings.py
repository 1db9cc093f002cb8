"""One table of settings (``hourglass.settings.SETTINGS``) and one list of kinds (the detector
registry): everything that shows, reads or documents a setting or a kind is made from them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from hourglass.api.settings import SETTING_ENV_VARS, SettingError, Settings
from hourglass.settings import SETTING, SETTINGS, STORE_COMMANDS, Setting

ROOT = Path(__file__).resolve().parents[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("HOURGLASS_", "ANTHROPIC_"))}


# ------------------------------------------------------------------------------ Settings


def test_defaults_are_todays(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults users rely on (README, deploy files) do not move by accident."""
    for var in SETTING_ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    s = Settings()
    assert (s.db, s.host, s.grpc_port, s.http_port, s.api_port) == (
        "hourglass.duckdb",
        "127.0.0.1",
        4317,
        4318,
        8000,
    )
    assert (s.max_message_bytes, s.receive_budget_bytes) == (8 * 2**20, 64 * 2**20)
    assert (s.header_timeout_seconds, s.body_timeout_seconds, s.keepalive_timeout_seconds) == (10, 60, 30)
    assert (s.max_connections, s.grpc_max_idle_seconds, s.grpc_keepalive_seconds) == (1000, 300, 60)
    assert (s.retention_seconds, s.settle_seconds) == (7 * 86400, 10)
    assert (s.memory_budget, s.workers, s.cluster) == (int(1.5 * 2**30), 0, None)
    assert s.llm_model == "claude-sonnet-5-5"
    assert s.api_token is None and s.tls_cert is None and s.tls_key is None and s.tls_client_ca is None
    assert s.metrics_public is False and s.self_traces_endpoint is None
    assert (s.serve_partitions, s.report_max_spans) == (0, 20_000_000)


def test_every_variable_is_read_with_its_type(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    values = {
        "HOURGLASS_DB": ("x.duckdb", "db", "x.duckdb"),
        "HOURGLASS_GRPC_PORT": ("0", "grpc_port", 0),
        "HOURGLASS_MAX_MESSAGE_BYTES": ("1048576", "max_message_bytes", 1048576),
        "HOURGLASS_MEMORY_BUDGET": ("800MB", "memory_budget", 800 * 2**20),
        "HOURGLASS_RETENTION": ("12h", "retention_seconds", 12 * 3600),
        "HOURGLASS_GRPC_MAX_IDLE": ("2m", "grpc_max_idle_seconds", 120),
        "HOURGLASS_METRICS_PUBLIC": ("yes", "metrics_public", True),
        "HOURGLASS_CLUSTER": ("", "cluster", None),
        "HOURGLASS_SELF_TRACES_ENDPOINT": ("otel:4317", "self_traces_endpoint", "otel:4317"),
        "HOURGLASS_LLM_MODEL": ("claude-x", "llm_model", "claude-x"),
    }
    for var, (text, _, _) in values.items():
        monkeypatch.setenv(var, text)
    secret = tmp_path / "token"
    secret.write_text("  s3cret\n")
    monkeypatch.delenv("HOURGLASS_API_TOKEN", raising=False)
    monkeypatch.setenv("HOURGLASS_API_TOKEN_FILE", str(secret))
    s = Settings()
    for var, (_, attribute, expected) in values.items():
        assert getattr(s, attribute) == expected, var
    assert s.api_token == "s3cret"


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("HOURGLASS_WORKERS", "many", "HOURGLASS_WORKERS='many' is not a whole number"),
        ("HOURGLASS_MEMORY_BUDGET", "lots", "HOURGLASS_MEMORY_BUDGET='lots' is not a size like 1.5GiB"),
        ("HOURGLASS_METRICS_PUBLIC", "maybe", "HOURGLASS_METRICS_PUBLIC='maybe' is not a yes/no value"),
        ("HOURGLASS_SETTLE", "soon", "HOURGLASS_SETTLE='soon' is not a duration like 90s"),
    ],
)
def test_a_bad_variable_is_one_line_from_the_cli(
    tmp_path: Path, variable: str, value: str, says: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hourglass", "analyze", "--db", str(tmp_path / "none.duckdb")],
        cwd=ROOT,
        env={**_clean_env(), variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_attributes_are_the_table() -> None:
    from dataclasses import fields

    assert [f.name for f in fields(Settings)] == [s.name for s in SETTINGS if s.env and s.attribute]
    assert {s.name: s.env for s in SETTINGS if s.env} == SETTING_ENV_VARS


def test_a_setting_declaration_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown type"):
        Setting("x", "float", 1.0, "x")
    with pytest.raises(ValueError, match="HOURGLASS_"):
        Setting("x", "int", 1, "x", env="X")
    with pytest.raises(ValueError, match="a flag needs the commands"):
        Setting("x", "int", 1, "x", flag="--x")
    with pytest.raises(SettingError, match="is not a whole number"):
        SETTING["workers"].parse("1.5")


def test_the_collector_reads_its_limits_from_the_table() -> None:
    """The receivers', the pipeline's, the store's and serve's constants are the table's limits,
    unchanged."""
    from hourglass.api import serve
    from hourglass.collector import duckdb_store, grpc_receiver, http_receiver, ingest

    expected: dict[Any, dict[str, tuple[str, Any]]] = {
        grpc_receiver: {
            "DEFAULT_WORKERS": ("grpc_handler_threads", 64),
            "CONCURRENT_DECODES": ("concurrent_decodes", 2),
            "SHUTDOWN_RETRY_AFTER_S": ("shutdown_retry_after_seconds", 5.0),
            "RECEIVE_BUDGET_WAIT_S": ("receive_budget_wait_seconds", 0.25),
            "COMMIT_TIMEOUT_S": ("commit_timeout_seconds", 120.0),
            "DECODE_TIMEOUT_S": ("decode_timeout_seconds", 60.0),
        },
        http_receiver: {
            "SHUTDOWN_RETRY_AFTER_S": ("shutdown_retry_after_seconds", 5.0),
            "CONCURRENT_DECODES": ("concurrent_decodes", 2),
        },
        ingest: {
            "DEFAULT_MAX_PENDING_SPANS": ("max_pending_spans", 100_000),
            "DEFAULT_MAX_PENDING_BYTES": ("max_pending_bytes", 96 * 2**20),
            "DEFAULT_MAX_BATCH_SPANS": ("max_batch_spans", 50_000),
            "DEFAULT_RETRY_AFTER_S": ("overload_retry_after_seconds", 1.0),
            "MAX_UNDECODED_BYTES": ("receive_budget_bytes", 64 * 2**20),
        },
        duckdb_store: {
            "DEFAULT_MEMORY_LIMIT": ("store_memory_limit", "512MB"),
            "CHECKPOINT_THRESHOLD": ("store_checkpoint_threshold", "128MB"),
            "MAX_STAGE_SECONDS": ("max_stage_seconds", 10.0),
        },
        serve: {
            "STORE_MEMORY_LIMIT": ("serve_store_memory_limit", "256MB"),
            "MALLOC_ARENA_MAX": ("serve_malloc_arena_max", 2),
            "MALLOC_MMAP_THRESHOLD": ("serve_malloc_mmap_threshold", 2**20),
        },
    }
    for module, constants in expected.items():
        for constant, (name, value) in constants.items():
            assert getattr(module, constant) == SETTING[name].default == value, (
                f"{module.__name__}.{constant}"
            )
    used = {name for constants in expected.values() for name, _ in constants.values()}
    assert {s.name for s in SETTINGS if s.fixed} <= used, "a fixed limit that nothing reads"


def test_the_model_default_is_declared_once() -> None:
    from hourglass.analysis import agent

    assert SETTING["llm_model"].default == agent.DEFAULT_MODEL
    assert (agent.MODEL_ENV, agent.CACHE_DIR_ENV) == ("HOURGLASS_LLM_MODEL", "HOURGLASS_CACHE_DIR")
    sources = [
        p
        for p in (ROOT / "hourglass").rglob("*.py")
        if p.name != "settings.py" or p.parent.name != "hourglass"
    ]
    repeated = [str(p.relative_to(ROOT)) for p in sources if SETTING["llm_model"].default in p.read_text()]
    assert not repeated, f"the model default is written out again in {repeated}"


# ------------------------------------------------------------------------------ the CLI


def _commands() -> dict[str, Any]:
    """The click commands Typer builds for `hourglass` (name -> command with ``.params``)."""
    from hourglass.cli import app

    group: Any = typer.main.get_command(app)
    return dict(group.commands)


def test_every_settings_flag_is_declared_from_the_table() -> None:
    """A flag of the table has the table's help wherever it appears, and appears in exactly the
    commands the table lists: no command declares one by hand."""
    by_flag = {s.flag.split("/")[0]: s for s in SETTINGS if s.flag}
    seen: dict[str, set[str]] = {s.name: set() for s in SETTINGS if s.flag}
    wrong = []
    for command_name, command in _commands().items():
        for param in command.params:
            for opt in param.opts:
                setting = by_flag.get(opt)
                if setting is None:
                    continue
                seen[setting.name].add(command_name)
                if getattr(param, "help", None) != setting.cli_help():
                    wrong.append(f"hourglass {command_name} {opt}: help differs from the table")
    assert not wrong, "\n".join(wrong)
    assert seen == {s.name: set(s.commands) for s in SETTINGS if s.flag}
    assert set(SETTING["db"].commands) == set(STORE_COMMANDS) == set(_commands()) - {"diff"}


def _help(command: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "hourglass", command, "--help"],
        cwd=ROOT,
        env={**_clean_env(), "COLUMNS": "400", "TERMINAL_WIDTH": "400"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return re.sub(r"\s+", " ", out.stdout)


def test_analyze_and_serve_help_say_the_same_of_a_setting() -> None:
    """The real `--help` of the commands: one text per setting, naming its variable and default."""
    texts = {command: _help(command) for command in ("analyze", "serve", "report", "mcp")}
    for command, text in texts.items():
        assert SETTING["db"].cli_help() in text, command
        assert "HOURGLASS_DB" in text and "hourglass.duckdb" in text
    for name in ("memory_budget", "workers", "cluster", "since"):
        assert SETTING[name].cli_help() in texts["analyze"], name
    for name in ("grpc_port", "http_port", "api_port", "max_message_bytes", "retention_seconds"):
        assert SETTING[name].cli_help() in texts["serve"], name
        assert SETTING[name].env in texts["serve"]


# ------------------------------------------------------------------------------ kinds


def test_the_kinds_come_from_the_detector_registry() -> None:
    from hourglass.analysis import gate, pipeline
    from hourglass.analysis.detectors import DETECTORS, PARTS
    from hourglass.api import rest_models
    from hourglass.workload.scenarios import BOTTLENECK_KINDS

    kinds = list(DETECTORS)
    assert list(PARTS) and set(PARTS) == set(DETECTORS)
    assert rest_models.kinds() == kinds
    assert not hasattr(gate, "KNOWN_KINDS")
    assert gate.GateSpec.parse([",".join(kinds)]).kinds == frozenset(kinds)
    with pytest.raises(gate.GateSpecError) as bad:
        gate.GateSpec.parse(["serialised_calls"])
    assert all(kind in str(bad.value) for kind in kinds)
    # lists that are about some kinds name registered ones only
    assert set(BOTTLENECK_KINDS) <= set(kinds)
    assert {k for lane in pipeline.DETECTOR_LANES for k in lane} <= set(kinds)
    assert set(pipeline.MIN_SAVING_BY_KIND) <= set(kinds)


def test_the_rest_schema_lists_every_kind() -> None:
    from hourglass.analysis.detectors import DETECTORS
    from hourglass.api.app import create_app

    class _NoStore:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("the schema must not touch the store")

    schema = create_app(_NoStore()).openapi()  # type: ignore[arg-type]
    components = schema["components"]["schemas"]
    assert components["Recommendation"]["properties"]["kind"]["enum"] == list(DETECTORS)
    assert components["NearMiss"]["properties"]["kind"]["enum"] == list(DETECTORS)
    for module in ("api/mcp_server.py", "api/app.py", "analysis/gate.py"):
        source = (ROOT / "hourglass" / module).read_text()
        assert "fanout_concurrency_limit" not in source, f"{module} lists the kinds by hand again"


def test_starting_the_app_does_not_load_the_detectors() -> None:
    """The kinds are read from the registry when a schema is built, not when the app starts."""
    code = (
        "import sys; from hourglass.api.app import create_app; import hourglass.api.mcp_server; "
        "print('hourglass.analysis.detectors' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
