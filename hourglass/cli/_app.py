"""The Typer application every `hourglass` command registers on (one module per command group)."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="hourglass",
    help="Find where distributed systems wait: ranked parallelization and fault-tolerance "
    "recommendations from OpenTelemetry, Jaeger and Zipkin traces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
