"""The Typer options of the settings, made from the one table (``hourglass.settings.SETTINGS``).

Every command that takes a setting's flag declares it with :func:`option`, so the flag, its help
text and the default it names are the same in every command (``tests/test_settings_table.py``
checks that no command declares one by hand).
"""

from __future__ import annotations

from typing import Any

import typer

from hourglass.settings import SETTING


def option(name: str, command: str) -> Any:
    """The ``typer.Option`` of the setting ``name`` in ``command`` (which the table must list)."""
    setting = SETTING[name]
    if setting.flag is None or command not in setting.commands:
        raise ValueError(f"`hourglass {command}` does not take the setting {name} (hourglass/settings.py)")
    return typer.Option(setting.flag, help=setting.cli_help(), show_default=False)


def since_ns(command: str, since: str | None) -> int | None:
    """``--since`` as a time in ns (None: every trace); a bad value ends ``command`` with exit 2
    and one line naming the flag."""
    if since is None:
        return None
    from hourglass.api.settings import parse_since

    try:
        return parse_since(since, name="--since")
    except ValueError as exc:
        typer.echo(f"hourglass {command}: {exc}", err=True)
        raise typer.Exit(2) from None
