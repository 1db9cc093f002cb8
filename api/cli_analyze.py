"""`hourglass analyze`: ranked recommendations from trace files or from the store, no server needed.

    hourglass analyze traces.jsonl jaeger.json           # files alone: no --db, no server
    hourglass analyze --db hourglass.duckdb --since 2h   # the store
    hourglass analyze --service checkout --format markdown > findings.md

``--since`` takes a duration (``90s``, ``15m``, ``2h``, ``7d``) or an ISO 8601 time
(``2026-11-27T12:00:00Z``); whole traces with a span starting at or after it are analysed.
``--service`` (repeatable) keeps whole traces that touch the service.

Bad records in files are reported on stderr as ``FILE:POSITION: reason`` and skipped; the good data
beside them is still analysed and the report printed. Exit codes: 0 — everything read and analysed;
2 — the report was printed but input was skipped, or the command line was wrong (a missing file,
a bad ``--since``); 1 — the store could not be opened; 3 — ``--fail-on`` matched a recommendation
(the CI gate; rules and severities in ``analysis.gate``; takes precedence over 2).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer

from api._cli_app import app
from api.settings import DEFAULT_DB, Settings, parse_since
from collector.schema import ANALYSIS_COLUMNS, empty_span_table

EXIT_OK, EXIT_STORE, EXIT_INPUT = 0, 1, 2


class OutputFormat(StrEnum):
    json = "json"
    markdown = "markdown"
    table = "table"


def _fail(message: str, code: int = EXIT_INPUT, command: str = "analyze") -> typer.Exit:
    typer.echo(f"hourglass {command}: {message}", err=True)
    return typer.Exit(code)


def read_files(paths: list[Path], command: str = "analyze") -> tuple[pa.Table, int]:
    """Every span in the files; problems printed as FILE:POSITION: reason (prefixed with the
    ``command`` name). Returns (table, number of problems that skipped data)."""
    from collector.files import FileProblem, read_trace_files

    for path in paths:
        if not path.exists():
            raise _fail(f"{path}: no such file", command=command)
    problems = 0

    def on_error(problem: FileProblem) -> None:
        nonlocal problems
        if problem.skipped:
            problems += 1
        typer.echo(f"hourglass {command}: {problem}", err=True)

    tables = [t for t in read_trace_files([str(p) for p in paths], on_error=on_error) if t.num_rows]
    table = pa.concat_tables(tables) if tables else empty_span_table()
    return table, problems


def read_store(path: str, *, services: list[str] | None, since_ns: int | None) -> pa.Table:
    from collector.duckdb_store import DuckDBSpanStore

    if path != ":memory:" and not Path(path).exists():
        raise _fail(f"{path}: no such store (import traces with `hourglass import`, or give trace files)")
    try:
        store = DuckDBSpanStore(path)
    except Exception as exc:
        from api.store_errors import store_open_problem

        raise _fail(store_open_problem(path, exc), code=EXIT_STORE) from None
    try:
        return store.scan(since_ns=since_ns, services=services, columns=ANALYSIS_COLUMNS)
    finally:
        store.close()


def exit_code(report: dict[str, Any], input_problems: int) -> int:
    """The command's exit status (one place, so options such as --fail-on can extend it)."""
    return EXIT_INPUT if input_problems else EXIT_OK


@app.command("analyze")
def analyze_command(
    files: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Trace files to analyse (OTLP JSON/JSONL/protobuf, Jaeger, Zipkin); no server needed"
        ),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            "--db", help=f"The span store, when no files are given (default $HOURGLASS_DB or {DEFAULT_DB})"
        ),
    ] = None,
    service: Annotated[
        list[str] | None, typer.Option("--service", help="Only traces touching this service (repeatable)")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Only traces active since 15m, 2h, 7d ago or an ISO time")
    ] = None,
    output_format: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="json, markdown (for pull requests) or table")
    ] = OutputFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout")
    ] = None,
    fail_on: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-on",
            help="CI gate: exit 3 when a recommendation matches a kind, a category, a severity "
            "(low|medium|high: that or worse) or 'any'; comma-separated or repeated",
        ),
    ] = None,
) -> None:
    """Find serialized calls, N+1, lock contention, fan-out problems and fault-tolerance gaps."""
    settings = Settings()
    since_ns: int | None = None
    if since is not None:
        try:
            since_ns = parse_since(since, name="--since")
        except ValueError as exc:
            raise _fail(str(exc)) from None
    gate_spec = None
    if fail_on:
        from analysis.gate import GateSpec, GateSpecError

        try:
            gate_spec = GateSpec.parse(fail_on)
        except GateSpecError as exc:
            raise _fail(str(exc)) from None
    problems = 0
    if files and db is not None:
        raise _fail("give trace files or --db, not both (files are analysed without a store)")
    if files:
        table, problems = read_files(list(files))
    else:
        table = read_store(db or settings.db, services=service, since_ns=since_ns)

    from analysis.agent import select_writer
    from analysis.pipeline import analyze
    from analysis.render import render

    report = analyze(table, writer=select_writer(settings), services=service, since_ns=since_ns)
    text = render(report, output_format.value)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    else:
        typer.echo(text, nl=False)
    code = exit_code(report, problems)
    if gate_spec is not None:
        from analysis.gate import GATE_EXIT_CODE, gate, gate_lines

        matches = gate(report, gate_spec)
        for line in gate_lines(matches, ",".join(fail_on or [])):
            typer.echo(line, err=True)
        if matches:
            code = GATE_EXIT_CODE
    if code:
        raise typer.Exit(code)
