"""`hourglass report`: the report page (or JSON / Markdown) from a store or from trace files.

    hourglass report --html report.html                 # the store at --db (default hourglass.duckdb)
    hourglass report --html report.html traces.jsonl    # files alone, no store, no server
    hourglass report --format markdown > report.md      # paste into a pull request

The HTML is the same self-contained page the API serves at ``/``: ranked recommendations, each
with an exemplar trace drawn before and after the change. Bad records in files are reported with
file, position and reason and skipped; the good data beside them is still analysed and the report
written. Exit codes as ``hourglass import``: 0 — all read; 2 — the report was written but something
was skipped (or the command line was wrong); 1 — the store could not be opened.
"""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from hourglass.api.settings import Settings
from hourglass.cli._app import app
from hourglass.cli._options import option
from hourglass.cli._options import since_ns as since_option_ns
from hourglass.settings import REPORT


class ReportFormat(StrEnum):
    html = "html"
    json = "json"
    markdown = "markdown"


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"hourglass report: {message}", err=True)
    return typer.Exit(code)


@app.command("report")
def report_command(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Trace files to analyse instead of the store (any supported format)"),
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write the HTML report page to this file")
    ] = None,
    output_format: Annotated[
        ReportFormat | None,
        typer.Option(
            "--format", "-f", help="html, json or markdown (default: html with --html, else markdown)"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout")
    ] = None,
    db: Annotated[str | None, option("db", REPORT)] = None,
    service: Annotated[
        list[str] | None, typer.Option("--service", help="Only traces touching this service (repeatable)")
    ] = None,
    since: Annotated[str | None, option("since", REPORT)] = None,
) -> None:
    """Write the ranked recommendations as an HTML page with trace pictures, JSON or Markdown."""
    settings = Settings()
    fmt = output_format or (ReportFormat.html if html is not None else ReportFormat.markdown)
    if html is not None and output is not None:
        raise _fail("give either --html FILE or --output FILE, not both")
    if html is not None and output_format not in (None, ReportFormat.html):
        raise _fail("--html writes HTML; use --output with --format json|markdown")
    target = html or output
    since_ns = since_option_ns("report", since)

    # The app's modules (FastAPI's world) load only when this command runs, not for every command.
    from hourglass.api.analysis_service import build_exemplars, dumps, select_writer, table_trace_fetcher
    from hourglass.api.report_html import render_report_html
    from hourglass.cli.analyze import (
        StoreRun,
        _at_once_spans,
        _read_files,
        _tell_spill,
        _terminate_as_interrupt,
        open_store_for_analysis,
    )
    from hourglass.cli.analyze import analyze_store as analyze_in_partitions

    # under the memory budget, as ``hourglass analyze``: a store or an input of files larger than
    # it holds at once is analysed in partitions of whole traces (files through a temporary store)
    run = StoreRun(budget=settings.memory_budget, workers=settings.workers or os.cpu_count() or 1)
    writer = select_writer(settings)

    def analyzed(path: str) -> dict[str, Any]:  # (a temporary store of the files, or --db)
        return analyze_in_partitions(
            path, run, services=service, since_ns=since_ns, writer=writer, explain=False, command="report"
        )

    skipped = False
    store = None
    spilled = None
    with _terminate_as_interrupt():  # (Ctrl-C and SIGTERM remove a temporary store alike)
        try:
            if files:
                read = _read_files(
                    list(files),
                    command="report",
                    at_once_spans=_at_once_spans(run),
                    on_spill=lambda spans: _tell_spill(run, "report"),
                )
                skipped = read.problems > 0
                source = ", ".join(str(f) for f in files)
                if read.table is not None:
                    from hourglass.analysis.pipeline import analyze

                    fetch_trace = table_trace_fetcher(read.table)
                    report = analyze(read.table, writer=writer, services=service, since_ns=since_ns)
                else:
                    spilled = read
                    assert read.store is not None
                    report = analyzed(read.store)
                    store = open_store_for_analysis(read.store, "report")
                    fetch_trace = store.trace
            else:
                from hourglass.collector.store import redact

                path = db or settings.db
                store = open_store_for_analysis(
                    path, "report"
                )  # (its errors as this command's, before the analysis')
                store.close()
                store = None
                report = analyzed(path)
                store = open_store_for_analysis(path, "report")
                source = f"store {redact(path)}"
                fetch_trace = store.trace
            if fmt is ReportFormat.html:
                exemplars = build_exemplars(report, fetch_trace)
                text = render_report_html(report, exemplars, source=source)
            elif fmt is ReportFormat.json:
                text = dumps(report).decode() + "\n"
            else:
                from hourglass.analysis.render import render_markdown

                text = render_markdown(report)
        finally:
            if store is not None:
                store.close()
            if spilled is not None:
                spilled.remove()

    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        recs = len(report.get("recommendations") or [])
        typer.echo(
            f"hourglass report: wrote {target} ({recs} recommendations from {report.get('traces_analyzed', 0)} traces)",
            err=True,
        )
    else:
        sys.stdout.write(text)
    if skipped:
        raise typer.Exit(2)
