"""Ctrl-C during a DuckDB query ends ``analyze --db`` as an interrupt wherever the query runs:
DuckDB turns the signal's KeyboardInterrupt into an error of its own, which the split took for a
failed split (the run went on and exited 0) and the decision for a detector's failure (exit 1
with a traceback)."""

from __future__ import annotations

import threading
from typing import Any

import duckdb
import pytest

from hourglass.analysis import partitions, pipeline
from hourglass.collector.duckdb_store import query_interrupted


def _interrupted_query() -> BaseException:
    """The error DuckDB ends a query with when it is interrupted (a real query, a real interrupt)."""
    db = duckdb.connect()
    timer = threading.Timer(0.2, db.interrupt)
    timer.start()
    try:
        db.execute("SELECT count(*) FROM range(10000000000) a")
    except BaseException as exc:  # (what it is, is the point)
        return exc
    finally:
        timer.cancel()
        db.close()
    raise AssertionError("the query was not interrupted")


def test_an_interrupted_query_is_known_also_as_the_cause_of_another_error() -> None:
    exc = _interrupted_query()
    assert query_interrupted(exc)
    try:
        raise RuntimeError("detector 'lock_contention' failed while deciding") from exc
    except RuntimeError as wrapped:
        assert query_interrupted(wrapped)
    assert not query_interrupted(RuntimeError("Query failed: out of memory"))
    assert not query_interrupted(duckdb.IOException("disk full"))


def test_ctrl_c_during_the_split_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    exc = _interrupted_query()

    def split(*args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(partitions, "split_store", split)
    with pytest.raises(KeyboardInterrupt):
        pipeline._split_or_store(None, 4, threading.Event())  # type: ignore[arg-type]


def test_a_split_that_fails_otherwise_is_read_from_the_store(monkeypatch: pytest.MonkeyPatch) -> None:
    def split(*args: Any, **kwargs: Any) -> Any:
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(partitions, "split_store", split)
    assert pipeline._split_or_store(None, 4, threading.Event()) is None  # type: ignore[arg-type]


def test_ctrl_c_during_a_decision_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    exc = _interrupted_query()

    class Interrupted:
        @staticmethod
        def decide(rows: Any, notes: Any) -> Any:
            raise exc

    monkeypatch.setitem(partitions.PARTS, "lock_contention", Interrupted)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        partitions._decide_kind("lock_contention", {"lock_contention": None}, None, None)  # type: ignore[arg-type,dict-item]
