"""`hourglass serve`: run the OTLP receivers and the REST API over one span store (see api.serve)."""

from __future__ import annotations

from typing import Annotated

import typer

from hourglass.api.settings import Settings, parse_duration_seconds
from hourglass.cli._app import app
from hourglass.cli._options import option
from hourglass.settings import SERVE


@app.command()
def serve(
    db: Annotated[str | None, option("db", SERVE)] = None,
    host: Annotated[str | None, option("host", SERVE)] = None,
    grpc_port: Annotated[int | None, option("grpc_port", SERVE)] = None,
    http_port: Annotated[int | None, option("http_port", SERVE)] = None,
    api_port: Annotated[int | None, option("api_port", SERVE)] = None,
    max_message_bytes: Annotated[int | None, option("max_message_bytes", SERVE)] = None,
    metrics_public: Annotated[bool | None, option("metrics_public", SERVE)] = None,
    self_traces_endpoint: Annotated[str | None, option("self_traces_endpoint", SERVE)] = None,
    retention: Annotated[str | None, option("retention_seconds", SERVE)] = None,
    tls_cert: Annotated[str | None, option("tls_cert", SERVE)] = None,
    tls_key: Annotated[str | None, option("tls_key", SERVE)] = None,
    tls_client_ca: Annotated[str | None, option("tls_client_ca", SERVE)] = None,
    cluster: Annotated[str | None, option("cluster", SERVE)] = None,
) -> None:
    """Receive OTLP traces (gRPC and HTTP), store them durably, serve the REST API and report."""
    from hourglass.api.serve import TlsSettingError, run_serve

    settings = Settings()
    overrides = {
        "db": db,
        "host": host,
        "grpc_port": grpc_port,
        "http_port": http_port,
        "api_port": api_port,
        "max_message_bytes": max_message_bytes,
        "metrics_public": metrics_public,
        "self_traces_endpoint": self_traces_endpoint,
        "tls_cert": tls_cert,
        "tls_key": tls_key,
        "tls_client_ca": tls_client_ca,
        "cluster": cluster,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(settings, name, value)
    if retention is not None:
        try:
            settings.retention_seconds = parse_duration_seconds(retention)
        except ValueError:
            typer.echo(
                f"hourglass serve: --retention {retention!r} is not a duration like 90s, 15m, 12h, 7d",
                err=True,
            )
            raise typer.Exit(2) from None
    from hourglass.collector.store import StoreError

    if settings.self_traces_endpoint:
        from hourglass.api.self_traces import parse_endpoint

        try:
            parse_endpoint(settings.self_traces_endpoint)
        except ValueError as exc:
            typer.echo(f"hourglass serve: {exc}", err=True)
            raise typer.Exit(2) from None
    from hourglass.analysis.partitions import ClusterError

    try:
        run_serve(settings)
    except TlsSettingError as exc:
        typer.echo(f"hourglass serve: {exc}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ValueError, StoreError, ClusterError) as exc:
        typer.echo(f"hourglass serve: {exc}", err=True)
        raise typer.Exit(1) from None
