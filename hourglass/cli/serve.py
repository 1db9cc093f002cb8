"""`hourglass serve`: run the OTLP receivers and the REST API over one span store (see api.serve)."""

from __future__ import annotations

from typing import Annotated

import typer

from hourglass.api.settings import Settings, parse_duration_seconds
from hourglass.cli._app import app


@app.command()
def serve(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            help="span store: a DuckDB file, clickhouse://USER:PASS@HOST:8123/DATABASE or chdb:DIR (env HOURGLASS_DB)",
        ),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="interface to listen on (env HOURGLASS_HOST; default 127.0.0.1)")
    ] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="OTLP/gRPC port; 0 = any free port (env HOURGLASS_GRPC_PORT; 4317)")
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(help="OTLP/HTTP port (env HOURGLASS_HTTP_PORT; 4318)")
    ] = None,
    api_port: Annotated[int | None, typer.Option(help="REST API port (env HOURGLASS_API_PORT; 8000)")] = None,
    max_message_bytes: Annotated[
        int | None, typer.Option(help="largest accepted Export (env HOURGLASS_MAX_MESSAGE_BYTES; 8 MiB)")
    ] = None,
    metrics_public: Annotated[
        bool | None,
        typer.Option(
            "--metrics-public/--metrics-private",
            help="serve /metrics without the API token (env HOURGLASS_METRICS_PUBLIC; default private)",
        ),
    ] = None,
    self_traces_endpoint: Annotated[
        str | None,
        typer.Option(
            help="send Hourglass's own traces (analysis runs, Exports) to this OTLP endpoint: HOST:4317 "
            "(gRPC) or http://HOST:4318 (env HOURGLASS_SELF_TRACES_ENDPOINT; default off, never itself)"
        ),
    ] = None,
    retention: Annotated[
        str | None,
        typer.Option(
            help="drop traces that ended longer ago than this, e.g. 12h, 7d; 0 keeps all (env HOURGLASS_RETENTION; 7d)"
        ),
    ] = None,
    tls_cert: Annotated[
        str | None,
        typer.Option(
            help="PEM certificate (chain): serve OTLP/gRPC, OTLP/HTTP and the API over TLS (env HOURGLASS_TLS_CERT)"
        ),
    ] = None,
    tls_key: Annotated[
        str | None, typer.Option(help="PEM private key of --tls-cert (env HOURGLASS_TLS_KEY)")
    ] = None,
    tls_client_ca: Annotated[
        str | None,
        typer.Option(
            help="PEM CA: OTLP clients must present a certificate it signed (mutual TLS; env HOURGLASS_TLS_CLIENT_CA)"
        ),
    ] = None,
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
    try:
        run_serve(settings)
    except TlsSettingError as exc:
        typer.echo(f"hourglass serve: {exc}", err=True)
        raise typer.Exit(2) from None
    except (OSError, ValueError, StoreError) as exc:
        typer.echo(f"hourglass serve: {exc}", err=True)
        raise typer.Exit(1) from None
