"""`hourglass` command line: a thin layer over the collector, the analysis and the app factory."""

from __future__ import annotations

import os
import sys

# numpy's OpenBLAS starts a thread per core at import, and they spin for a while once started:
# ~1.5 % of a 1M-span `analyze --db`'s CPU on 2 cores, in each process (the CLI and its workers,
# which inherit this). No command does floating-point linear algebra. Set before anything imports
# numpy; a value the user set is kept.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from hourglass.api.settings import SettingError

# Each module registers its commands on the shared Typer app when imported.
from hourglass.cli import analyze, diff, imports, mcp, report, serve, whatif  # noqa: F401
from hourglass.cli._app import app


def main() -> None:
    try:
        app()
    except SettingError as exc:  # a bad HOURGLASS_* variable: one line, not a traceback
        print(f"hourglass: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
