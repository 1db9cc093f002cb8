"""``HOURGLASS_MEMORY_LOG``: one line per phase; ``detail`` adds what is registered (serve's analysis
worker: the resident memory by allocator, ``server_memory.memlog_detail``)."""

from __future__ import annotations

import sys

import pytest

from hourglass.analysis import memlog
from hourglass.api import server_memory


def test_a_note_prints_nothing_without_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(memlog.ENV, raising=False)
    memlog.note("phase")
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc")
def test_detail_adds_the_memory_by_allocator(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(memlog, "_detail", server_memory.memlog_detail)
    monkeypatch.setenv(memlog.ENV, "1")
    memlog.note("plain")
    monkeypatch.setenv(memlog.ENV, "detail")
    memlog.note("detailed")
    plain, detailed = capsys.readouterr().err.splitlines()
    assert "plain: rss" in plain and "[" not in plain
    assert "detailed: rss" in detailed
    for part in (
        "[anon ",
        "[heap] ",
        "mmapped ",
        "obmalloc arenas ",
        "duckdb ",
        "glibc in use ",
        "py kblocks ",
    ):
        assert part in detailed, detailed
    arenas = int(detailed.split("obmalloc arenas ")[1].split(",")[0])
    assert arenas > 0  # (read from Python's allocator statistics, not -1)


def test_a_note_to_a_broken_stderr_does_not_fail_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HOURGLASS_MEMORY_LOG=1 hourglass analyze … 2>&1 | head``: once the reader is gone a note
    raised BrokenPipeError in the middle of the run (in the split's thread: the run failed and
    left its partition folder behind)."""

    class Broken:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setenv(memlog.ENV, "1")
    monkeypatch.setattr(sys, "stderr", Broken())
    memlog.note("phase")  # no exception
