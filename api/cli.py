"""`hourglass` command line: a thin layer over the collector, the analysis and the app factory."""

from __future__ import annotations

# Each module registers its commands on the shared Typer app when imported.
from api import cli_analyze, cli_diff, cli_import, cli_report, cli_serve  # noqa: F401
from api._cli_app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
