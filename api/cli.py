"""`hourglass` command line: a thin layer over the collector, the analysis and the app factory."""

from __future__ import annotations

import sys

# Each module registers its commands on the shared Typer app when imported.
from api import cli_analyze, cli_diff, cli_import, cli_mcp, cli_report, cli_serve, cli_whatif  # noqa: F401
from api._cli_app import app
from api.settings import SettingError


def main() -> None:
    try:
        app()
    except SettingError as exc:  # a bad HOURGLASS_* variable: one line, not a traceback
        print(f"hourglass: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
