"""`hourglass mcp`: the MCP server on stdio, for coding agents (see api.mcp_server and the README).

    claude mcp add hourglass -- hourglass mcp --db /path/to/hourglass.duckdb

The store is opened by this process (DuckDB allows one process per file: while `hourglass serve`
runs on it, use the server's streamable HTTP endpoint ``/mcp`` instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from hourglass.api.settings import Settings
from hourglass.cli._app import app
from hourglass.cli._options import option
from hourglass.settings import MCP


@app.command("mcp")
def mcp_command(
    db: Annotated[str | None, option("db", MCP)] = None,
) -> None:
    """Serve the MCP tools (recommendations, traces, what-if, critical path) on stdin/stdout."""
    path = db or Settings().db
    if path != ":memory:" and not Path(path).exists():
        typer.echo(f"hourglass mcp: {path}: no such store (import traces with `hourglass import`)", err=True)
        raise typer.Exit(2)
    from hourglass.api.mcp_server import run_stdio

    try:
        run_stdio(path)
    except Exception as exc:
        if "lock" in str(exc).lower():
            typer.echo(
                f"hourglass mcp: {path}: cannot open the store ({exc}). If `hourglass serve` is running on "
                "it, connect the agent to its /mcp endpoint instead.",
                err=True,
            )
            raise typer.Exit(1) from None
        raise
