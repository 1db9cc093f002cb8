"""`hourglass diff BASE CANDIDATE`: bottlenecks that are new, grew, improved or went away between two
runs of the same load test — for a pipeline that replays a load test before merging.

BASE and CANDIDATE are each a trace file, a folder of trace files, a quoted glob pattern
(``"run-1/*.jsonl.gz"``), a span store (``.duckdb``), or
a saved report (the JSON of ``hourglass analyze --format json``, so a pipeline can keep the
baseline's report instead of its traces). Matching, "grew" and its thresholds: ``hourglass.analysis.diff``.

Exit codes: 0 — compared (and, with a gate, nothing failed it); 3 — ``--fail-on-new`` and a
bottleneck is new or grew, or ``--fail-on SPEC`` and a new or grown one matches SPEC; 1 — an
input could not be read or analysed; 2 — usage error.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from hourglass.analysis.diff import DEFAULT_GROWTH_THRESHOLD, diff_reports, render_markdown, render_text
from hourglass.analysis.gate import GATE_EXIT_CODE, GateSpec, GateSpecError, gate, gate_lines
from hourglass.cli._app import app

REPORT_SCHEMA = "hourglass.report/v1"
_SAVED_REPORT_MAX_BYTES = 64 * 1024 * 1024


class InputError(Exception):
    """An input that could not be read or analysed; the message names it and says why."""


def _saved_report(path: Path) -> dict[str, Any] | None:
    """The report in ``path`` when it is a saved ``hourglass.report/v1`` JSON document, else None."""
    if path.suffix.lower() != ".json" or path.stat().st_size > _SAVED_REPORT_MAX_BYTES:
        return None
    from hourglass.collector import json_limits

    try:
        document = json_limits.loads(path.read_text())
    except (UnicodeDecodeError, ValueError):  # invalid, or nested too deep (JsonTooDeep)
        return None  # not a report; the trace readers will say what is wrong with it
    if isinstance(document, dict) and document.get("schema") == REPORT_SCHEMA:
        return document
    return None


def _is_pattern(path: Path) -> bool:
    return any(c in str(path) for c in "*?[")


def _trace_files(path: Path) -> list[Path]:
    """A folder's trace files, a quoted glob pattern's matches ("load-test/*.jsonl"), or the file."""
    if _is_pattern(path) and not path.exists():
        matches = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not matches:
            raise InputError(f"{path}: pattern matches no files")
        return matches
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and not p.name.endswith((".labels.json", ".md"))
        )
        if not files:
            raise InputError(f"{path}: folder holds no trace files")
        return files
    return [path]


def report_for(path: Path) -> dict[str, Any]:
    """Analyse ``path`` (store, saved report, folder or trace file) into an ``hourglass.report/v1``."""
    if not path.exists() and not _is_pattern(path):
        raise InputError(f"{path}: no such file or folder")
    if path.is_file():
        saved = _saved_report(path)
        if saved is not None:
            return saved
    import os

    from hourglass.analysis.pipeline import analyze
    from hourglass.api.settings import Settings
    from hourglass.cli.analyze import StoreRun, _at_once_spans, _read_files, _tell_spill, analyze_store

    # within the memory budget, as ``hourglass analyze``: a store or files larger than it holds at
    # once are analysed in partitions of whole traces (files through a temporary store)
    settings = Settings()
    run = StoreRun(budget=settings.memory_budget, workers=settings.workers or os.cpu_count() or 1)
    if path.is_file() and path.suffix.lower() == ".duckdb":
        from hourglass.collector.duckdb_store import DuckDBSpanStore

        try:
            store = DuckDBSpanStore(str(path))
        except Exception as exc:  # a corrupt or locked store: one line, not a traceback
            from hourglass.api.store_errors import store_open_problem

            raise InputError(store_open_problem(str(path), exc)) from None
        try:
            spans = store.raw_row_count()
        finally:
            store.close()
        if spans == 0:
            raise InputError(f"{path}: no spans to analyse")
        return analyze_store(
            str(path), run, services=None, since_ns=None, writer=None, explain=False, command="diff"
        )
    # bad records are skipped and summarised (one line per kind); the good spans beside them are compared
    read = _read_files(
        _trace_files(path),
        command="diff",
        at_once_spans=_at_once_spans(run),
        on_spill=lambda spans: _tell_spill(run, "diff"),
    )
    try:
        if read.spans == 0:
            raise InputError(f"{path}: no spans to analyse")
        if read.table is not None:
            report: dict[str, Any] = analyze(read.table)
            return report
        assert read.store is not None
        return analyze_store(
            read.store, run, services=None, since_ns=None, writer=None, explain=False, command="diff"
        )
    finally:
        read.remove()


@app.command("diff")
def diff_command(
    base: Annotated[
        Path,
        typer.Argument(
            help="Baseline: trace file, folder of trace files, quoted glob, .duckdb store or saved report JSON."
        ),
    ],
    candidate: Annotated[Path, typer.Argument(help="Candidate: same kinds of input as BASE.")],
    output_format: Annotated[
        str, typer.Option("--format", help="text | markdown | json", case_sensitive=False)
    ] = "text",
    fail_on_new: Annotated[
        bool, typer.Option("--fail-on-new", help=f"Exit {GATE_EXIT_CODE} when any bottleneck is new or grew.")
    ] = False,
    fail_on: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-on",
            help=f"Exit {GATE_EXIT_CODE} when a NEW or GROWN bottleneck matches: kinds, categories, "
            "severities (low|medium|high: that or worse), comma-separated or repeated; see `analyze --fail-on`.",
        ),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option("--threshold", help="Relative change that counts as grew/improved (0.25 = 25 %)."),
    ] = DEFAULT_GROWTH_THRESHOLD,
) -> None:
    """Compare two trace sets: which bottlenecks are new, grew, improved or went away."""
    fmt = output_format.lower()
    if fmt not in ("text", "markdown", "json"):
        raise typer.BadParameter(
            f"unknown format {output_format!r}; use text, markdown or json", param_hint="--format"
        )
    if threshold <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--threshold")
    spec = None
    if fail_on:
        try:
            spec = GateSpec.parse(fail_on)
        except GateSpecError as exc:
            raise typer.BadParameter(str(exc), param_hint="--fail-on") from exc
    try:
        base_report = report_for(base)
        candidate_report = report_for(candidate)
    except InputError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    result = diff_reports(base_report, candidate_report, threshold)
    if fmt == "json":
        sys.stdout.write(json.dumps(result.as_dict(), indent=2) + "\n")
    elif fmt == "markdown":
        sys.stdout.write(render_markdown(result))
    else:
        sys.stdout.write(render_text(result))
    failed = False
    if fail_on_new and result.regressions:
        typer.echo(
            f"diff --fail-on-new: FAILED — {len(result.regressions)} new or grown bottleneck(s)", err=True
        )
        failed = True
    if spec is not None:
        regressed = {"traces_analyzed": result.candidate_traces, "recommendations": result.regressions}
        matches = gate(regressed, spec)
        for line in gate_lines(matches, ",".join(fail_on or [])):
            typer.echo(line, err=True)
        failed = failed or bool(matches)
    if failed:
        raise typer.Exit(GATE_EXIT_CODE)
