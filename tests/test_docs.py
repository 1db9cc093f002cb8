"""Every setting, command and endpoint a user can reach is documented in the README (Datasette's rule)."""

from __future__ import annotations

from pathlib import Path

from hourglass.api.settings import SETTING_ENV_VARS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_setting_variable_is_documented() -> None:
    missing = [var for var in SETTING_ENV_VARS.values() if var not in README]
    assert not missing, f"README does not document: {missing}"


def test_every_cli_command_is_documented() -> None:
    from hourglass.cli import app

    names = [c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands]
    assert names, "no commands registered"
    missing = [n for n in names if f"hourglass {n}" not in README]
    assert not missing, f"README does not document commands: {missing}"


def test_every_rest_route_is_documented() -> None:
    from fastapi.routing import APIRoute

    from hourglass.api.app import create_app

    class _NoStore:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("the route table must not touch the store")

    app = create_app(_NoStore())  # type: ignore[arg-type]
    paths = {r.path for r in app.routes if isinstance(r, APIRoute)}
    missing = sorted(p for p in paths if p not in README)
    assert not missing, f"README does not document routes: {missing}"
