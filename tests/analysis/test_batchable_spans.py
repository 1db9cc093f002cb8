"""batchable_calls reads its groups' span ids from the spilled buckets for the groups a finding or
a near miss names only: from a bucket's files with the wanted groups in the read's filter, or
from any other loader's rows of those operations read whole. Either way the same findings and
near misses as the rows decided whole."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from hourglass.analysis import partitions
from hourglass.analysis.context import AnalysisContext
from hourglass.analysis.detectors import PARTS, batchable_calls
from hourglass.analysis.spill import Spill
from tests.analysis.test_partitions import Notes, _comparable, _generated

KIND = "batchable_calls"


def test_span_ids_read_from_files_or_any_loader_decide_like_the_whole(tmp_path: Path) -> None:
    frame = _generated()
    whole = AnalysisContext.from_table(frame)
    whole_notes = Notes()
    expected = batchable_calls.decide(PARTS[KIND].extract(whole), whole_notes)
    assert expected and whole_notes.misses  # (a finding and near misses to compare)
    spill = Spill.create(3, near=str(tmp_path))
    try:
        extracted = [
            spill.write(part, partitions.extract(AnalysisContext.from_table(piece), [KIND]))
            for part, piece in enumerate(partitions.split_by_trace(frame, 2))
        ]
        rows = partitions.combine(extracted)[KIND]
        assert rows["spans"].is_empty()  # (every span id is in the buckets)
        files = list(spill.buckets_of(KIND))
        assert all(load.files for load in files)
        read_whole: list[str] = []

        def plain(load: batchable_calls.BucketLoader) -> batchable_calls.BucketLoader:
            def read(columns: list[str] | None, keys: pl.Series | None) -> pl.DataFrame:
                read_whole.append("read")
                return load(columns, keys)

            return read

        for buckets in (files, [plain(load) for load in files]):
            notes = Notes()
            got = batchable_calls.decide(rows, notes, buckets)
            assert [_comparable(f) for f in got] == [_comparable(f) for f in expected]
            assert notes.misses == whole_notes.misses
        assert len(read_whole) == len(files)  # (the loaders without files were read through)
    finally:
        spill.remove()
