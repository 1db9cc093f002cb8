"""`hourglass import --db PATH FILE...`: load trace files into the span store.

Formats, detection and error positions: ``hourglass.collector.files``. Every problem is printed to stderr as
``FILE:POSITION: reason``, or, for a kind of problem met many times in a file, as one line with the
count and the first positions (``--verbose`` prints every problem as it is met); the summary goes
to stdout (``--format json`` for machines, with the same problems under ``input_warnings``).

Exit codes: 0 — every file imported completely (warnings, e.g. a Zipkin span without a duration
kept as zero-length, do not count); 2 — the import finished but something was skipped: a file
that could not be read, or records in it (the good data beside them *is* stored); 1 — the store
could not be opened or written; 130 — interrupted (what was written before stays: every store
write is durable).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from hourglass.api.settings import Settings
from hourglass.cli._app import app
from hourglass.cli._options import option
from hourglass.settings import IMPORT

if TYPE_CHECKING:  # the readers and rich load when `import` runs, not for every command
    import pyarrow as pa
    from rich.console import Console

    from hourglass.collector.files import FileProblem, FileReport

EXIT_SKIPPED = 2
EXIT_STORE_FAILED = 1
# Show the progress bar by default only when the input is big enough to wait for.
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
# Rows gathered before one store write: fewer, larger transactions are much cheaper in DuckDB.
WRITE_BATCH_ROWS = 100_000


class _ProblemPrinter:
    """Gathers each file's problems into one line per kind of problem, with a count and the first
    positions (``hourglass.collector.problem_summary``), printed when the file is done; with ``verbose``
    every problem is also printed as it is met."""

    def __init__(self, console: Console, verbose: bool = False) -> None:
        self.console = console
        from hourglass.collector.problem_summary import ProblemSummary

        self.verbose = verbose
        self.summary = ProblemSummary()
        self.first_reason: dict[str, str] = {}

    def __call__(self, problem: FileProblem) -> None:
        if problem.skipped and problem.file not in self.first_reason:
            where = f"{problem.position}: " if problem.position else ""
            self.first_reason[problem.file] = f"{where}{problem.reason}"
        self.summary.add_problem(problem)
        if self.verbose:
            self._print(str(problem))

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def file_done(self, file: str) -> None:
        for kind in self.summary.kinds(file):
            if not (self.verbose and kind.count == 1):  # verbose: a lone problem is already printed
                self._print(kind.line(verbose_hint=not self.verbose))


class _StoreWriteFailed(Exception):
    pass


def _write(store: Any, pending: list[pa.Table]) -> None:
    import pyarrow as pa

    if pending:
        try:
            store.write(pa.concat_tables(pending) if len(pending) > 1 else pending[0])
        except Exception as exc:  # any store failure (disk full, file removed) ends the import
            raise _StoreWriteFailed(str(exc)) from exc
        pending.clear()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@app.command("import")
def import_command(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="Trace files or folders of them: OTLP JSON / JSON Lines / protobuf (also the Collector "
            "file exporter's proto stream), Jaeger JSON, Zipkin v2 JSON; gzip, zstd, bzip2 or xz compressed "
            "or not. The format is detected from the content. - reads standard input.",
            show_default=False,
            metavar="FILE...",
        ),
    ],
    db: Annotated[str | None, option("db", IMPORT)] = None,
    output_format: Annotated[
        str, typer.Option("--format", help="Summary format: text or json.", case_sensitive=False)
    ] = "text",
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Print every problem, not one line per kind of problem."),
    ] = False,
    progress: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help=f"Progress bar (default: on a terminal, for inputs over {PROGRESS_MIN_BYTES // 2**20} MiB).",
        ),
    ] = None,
) -> None:
    """Import trace files into the span store; bad files or records are reported and skipped."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from hourglass.collector.files import TraceFileReader, expand_path_origins, gc_tuned_for_bulk_reading

    output_format = output_format.lower()
    if output_format not in ("text", "json"):
        raise typer.BadParameter("must be text or json", param_hint="--format")
    db_path = db or Settings().db
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    paths = expand_path_origins(files)
    total_bytes = 0
    for path, _ in paths:
        with contextlib.suppress(OSError):  # a missing file is reported when it is read
            total_bytes += path.stat().st_size
    show_progress = (
        progress if progress is not None else (err.is_terminal and total_bytes >= PROGRESS_MIN_BYTES)
    )

    from hourglass.collector.backends import open_store  # the store pulls in DuckDB; only when importing
    from hourglass.collector.store import StoreError, redact

    try:
        store = open_store(db_path)
        stored_before = store.stats().spans
    except StoreError as exc:  # a bad URL, an unreachable server, a missing extra: already one line
        err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_STORE_FAILED) from None
    except Exception as exc:  # duckdb raises several types (lock held by a running serve, bad file)
        from hourglass.api.store_errors import store_open_problem

        err.print(store_open_problem(redact(db_path), exc), markup=False)
        raise typer.Exit(EXIT_STORE_FAILED) from None

    bar = Progress(
        TextColumn("[bold]importing[/bold] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not show_progress,
    )
    printer = _ProblemPrinter(bar.console, verbose)
    task = bar.add_task("", total=total_bytes or None)
    reader = TraceFileReader(on_problem=printer, progress=lambda n: bar.advance(task, n))
    trace_ids: set[str] = set()
    spans = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    try:
        with bar, gc_tuned_for_bulk_reading():
            for path, from_folder in paths:
                bar.update(task, description=path.name)
                for table in reader.read_file(path, from_folder=from_folder):
                    spans += table.num_rows
                    trace_ids.update(table.column("trace_id").unique().to_pylist())
                    pending.append(table)
                    pending_rows += table.num_rows
                    if pending_rows >= WRITE_BATCH_ROWS:
                        _write(store, pending)
                        pending_rows = 0
                printer.file_done(reader.reports[-1].file if reader.reports else str(path))
            _write(store, pending)
        stats = store.stats()
    except _StoreWriteFailed as exc:
        err.print(f"{redact(db_path)}: writing to the span store failed: {exc}", markup=False)
        store.close()
        raise typer.Exit(EXIT_STORE_FAILED) from None
    except KeyboardInterrupt:
        written = store.stats().spans - stored_before
        store.close()
        err.print(f"interrupted: {written} new spans were stored before the interruption", markup=False)
        raise typer.Exit(130) from None
    store.close()

    reports = reader.reports
    skipped = [r for r in reports if not r.clean]
    summary = {
        "db": redact(db_path),
        "files": len(reports),
        "spans": spans,
        "traces": len(trace_ids),
        "skipped_spans": sum(r.skipped_spans for r in reports),
        "failed_files": [r.file for r in reports if r.failed],
        "files_with_problems": [r.file for r in skipped],
        "ignored_files": [r.file for r in reports if r.ignored],
        "new_spans_stored": stats.spans - stored_before,
        "store": {"spans": stats.spans, "traces": stats.traces},
        "per_file": [asdict(r) for r in reports],
        "input_warnings": printer.summary.as_json(),
    }
    if output_format == "json":
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_text_summary(summary, reports, printer)
    if skipped:
        raise typer.Exit(EXIT_SKIPPED)


def _print_text_summary(summary: dict[str, Any], reports: list[FileReport], printer: _ProblemPrinter) -> None:
    out = sys.stdout
    files_ok = len(reports) - len(summary["failed_files"]) - len(summary["ignored_files"])
    print(
        f"Imported {_plural(summary['spans'], 'span')} in {_plural(summary['traces'], 'trace')} "
        f"from {files_ok} of {_plural(len(reports), 'file')} into {summary['db']}.",
        file=out,
    )
    store = summary["store"]
    new = summary["new_spans_stored"]
    repeated = summary["spans"] - new
    note = f" ({new} new; {repeated} were already stored or repeated and are kept once)" if repeated else ""
    print(
        f"The store now holds {_plural(store['spans'], 'span')} in {_plural(store['traces'], 'trace')}{note}.",
        file=out,
    )
    if summary["ignored_files"]:
        ignored = len(summary["ignored_files"])
        print(
            f"Ignored {_plural(ignored, 'file')} without traces found in folders (warnings above).", file=out
        )
    problem_reports = [r for r in reports if not r.clean]
    if not problem_reports:
        return
    parts = []
    if summary["skipped_spans"]:
        parts.append(_plural(summary["skipped_spans"], "span/record"))
    if summary["failed_files"]:
        parts.append(_plural(len(summary["failed_files"]), "unreadable file"))
    print(f"Skipped: {' and '.join(parts) or 'see below'} — details above on stderr:", file=out)
    for report in problem_reports:
        what = "not read" if report.failed and not report.spans else f"{report.skipped_spans} skipped"
        if report.failed and report.spans:
            what += ", rest of file unreadable"
        reason = printer.first_reason.get(report.file, "")
        print(f"  {report.file}: {report.spans} imported, {what}; first problem: {reason}", file=out)
