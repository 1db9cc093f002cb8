"""Every setting, command, endpoint and kind a user can reach is documented in the README (Datasette's
rule). The settings come from the one table (``hourglass.settings.SETTINGS``), the kinds from the
detector registry (``hourglass.analysis.detectors.DETECTORS``)."""

from __future__ import annotations

import re
import tokenize
from pathlib import Path

from hourglass.settings import SETTINGS, render_readme

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TABLE_VARIABLES = {s.env for s in SETTINGS if s.env}


def _section(heading: str) -> str:
    start = README.index(heading + "\n")
    level = heading.split(" ")[0]
    end = README.find(f"\n{level} ", start + len(heading))
    return README[start : end if end != -1 else None]


def test_the_readme_settings_tables_are_generated_from_the_table() -> None:
    assert render_readme(README) == README, "README is out of date: run python scripts/settings_readme.py"


def test_every_setting_is_documented() -> None:
    settings = _section("## Settings")
    missing = []
    for s in SETTINGS:
        if s.env and f"`{s.env}`" not in settings:
            missing.append(s.env)
        if s.fixed and f"`{s.name}`" not in settings:
            missing.append(s.name)
        if s.flag:
            flag = s.flag.split("/")[0]
            for command in s.commands:
                usage = re.search(rf"^\| `hourglass {re.escape(command)}( [^`]*)?` \|", README, re.M)
                if usage is None or flag not in usage.group(0):
                    missing.append(f"hourglass {command} {flag} (Command line)")
    assert not missing, f"README does not document: {missing}"


def test_every_variable_in_the_readme_is_a_setting() -> None:
    """A HOURGLASS_* the READMEs name is in the table (the tests' own HOURGLASS_TEST_* aside)."""
    named = set(re.findall(r"HOURGLASS_[A-Z0-9_]+", README + (ROOT / "deploy" / "README.md").read_text()))
    unknown = sorted(v for v in named - TABLE_VARIABLES if not v.startswith("HOURGLASS_TEST_"))
    assert not unknown, f"README names variables the settings table does not have: {unknown}"


def test_every_variable_the_code_reads_is_a_setting() -> None:
    """No module reads (or names in a message) a HOURGLASS_* variable outside the table."""
    unknown = []
    for path in sorted((ROOT / "hourglass").rglob("*.py")):
        with tokenize.open(path) as f:
            strings = [t.string for t in tokenize.generate_tokens(f.readline) if t.type == tokenize.STRING]
        for name in set(re.findall(r"HOURGLASS_[A-Z0-9_]+", "\n".join(strings))) - TABLE_VARIABLES:
            if not re.search(rf"^{name}\s*=", path.read_text(), re.M):  # a constant so named is no variable
                unknown.append(f"{path.relative_to(ROOT)}: {name}")
    assert not unknown, f"variables outside hourglass/settings.py: {unknown}"


def test_every_kind_is_documented() -> None:
    from hourglass.analysis.detectors import DETECTORS
    from hourglass.analysis.pipeline import MIN_SAVING_BY_KIND

    finds = _section("## What it finds")
    rows = re.findall(r"^\| `([a-z_]+)` \| (parallelization|fault_tolerance) \|", finds, re.M)
    kinds = [kind for kind, _ in rows]
    assert len(kinds) == len(set(kinds)) and set(kinds) == set(DETECTORS), (
        "README 'What it finds' lists other kinds"
    )
    floors = _section("### Floors: what is not worth a reader's time")
    floor_rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d+) ms \|", floors, re.M))
    assert {k: int(v) * 1_000_000 for k, v in floor_rows.items()} == MIN_SAVING_BY_KIND


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
