"""A stored batch's trace ids read from the sidecar when asked (``StoredTraceIds``) compare as the
list of those ids, so, like a list, they are not hashable: a hash of their own differed from that
of the equal tuple (a set of tuples missed an equal StoredTraceIds)."""

from __future__ import annotations

import duckdb
import pytest

from hourglass.analysis.incremental import StoredTraceIds


def _sidecar(batches: dict[int, list[str]]) -> duckdb.DuckDBPyConnection:
    db = duckdb.connect()
    db.execute("CREATE TABLE traces (trace_id VARCHAR, batch BIGINT)")
    for batch, ids in batches.items():
        db.executemany("INSERT INTO traces VALUES (?, ?)", [(t, batch) for t in ids])
    return db


def test_compares_as_the_list_of_its_ids_and_is_not_hashable() -> None:
    db = _sidecar({1: ["c" * 32, "a" * 32, "b" * 32], 2: ["d" * 32]})
    ids = StoredTraceIds(db, 1, 3)
    sorted_ids = ["a" * 32, "b" * 32, "c" * 32]
    assert list(ids) == sorted_ids and ids[1] == "b" * 32 and len(ids) == 3
    assert ids == sorted_ids and ids == tuple(sorted_ids) and ids != sorted_ids[:2]
    assert ids == StoredTraceIds(db, 1, 3) and ids != StoredTraceIds(db, 2, 1)
    # the same ids in another sidecar: equal, as both equal the same list
    assert ids == StoredTraceIds(_sidecar({7: sorted_ids}), 7, 3)
    with pytest.raises(TypeError, match="unhashable"):
        hash(ids)
    with pytest.raises(TypeError, match="unhashable"):
        _ = ids in {tuple(sorted_ids)}  # a list would not be found by its hash either
