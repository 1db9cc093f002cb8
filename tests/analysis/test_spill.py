"""The spill's files: the rows a partition keeps (``Spill.keep``/``Spill.kept``) and the tables
it spills to buckets (``Spill.write``), read back as written."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from hourglass.analysis.spill import SPILLABLE, Spill, read_tables, write_tables


def _tables(part: int) -> dict[str, dict[str, pl.DataFrame]]:
    # strings cut from a larger frame (views into its buffers), lists, nulls, an empty table
    ids = pl.DataFrame({"trace_id": [f"{i:032x}" for i in range(1000)]})
    return {
        "n_plus_one": {
            "sequences": pl.DataFrame(
                {
                    "trace_id": ids["trace_id"].slice(part * 3, 3),
                    "span_id": [["a", "b"], [], None],
                    "calls": [2, 0, None],
                }
            ),
            "empty": pl.DataFrame(schema={"op_key": pl.String, "ns": pl.Int64}),
        },
        "error_propagation": {"volume": pl.DataFrame({"service": ["s", None], "n": [part, 1]})},
    }


def test_kept_tables_are_read_back_per_kind_in_partition_order(tmp_path: Path) -> None:
    """Every kept table comes back equal (values, columns, dtypes; empty tables for their
    columns), the partitions' frames in partition order and the tables in their names' order;
    a partition's kind is one file, not one file per table."""
    spill = Spill.create(1, near=str(tmp_path))
    written = {part: _tables(part) for part in (1, 0)}
    for part, tables in written.items():
        spill.keep(part, tables)
    for kind in ("n_plus_one", "error_propagation"):
        files = sorted(p.name for p in (Path(spill.folder) / "rows" / kind).rglob("*") if p.is_file())
        assert files == ["p000000.tables", "p000001.tables"], kind
        kept = spill.kept(kind)
        assert list(kept) == sorted(written[0][kind])
        for name, frames in kept.items():
            assert len(frames) == 2
            for part, frame in enumerate(frames):
                want = written[part][kind][name]
                assert frame.schema == want.schema and frame.equals(want), (kind, name, part)
    assert spill.kept("serialized_calls") == {}
    spill.remove()


def test_tables_file_holds_each_table_own_values(tmp_path: Path) -> None:
    """A table whose strings are a few rows cut from a large frame is written with its own
    values only, not the buffers it shares with that frame."""
    big = pl.DataFrame({"trace_id": ["x" * 64 + str(i) for i in range(100_000)]})
    few = big.slice(10, 2)
    write_tables({"few": few}, tmp_path / "t")
    assert (tmp_path / "t").stat().st_size < 10_000
    back = read_tables(tmp_path / "t")
    assert list(back) == ["few"] and back["few"].equals(few)


def test_spilled_table_in_one_bucket_or_several_holds_every_row(tmp_path: Path) -> None:
    """``Spill.write``: the spillable table's rows, whole in one bucket or split by key among
    several (every row of a key in one bucket), read back the same; the rows returned hold the
    table emptied, its columns kept."""
    spillable = SPILLABLE["missing_timeout"]
    frame = pl.DataFrame(
        {spillable.key: [(i * 7919) % 50 for i in range(500)], "duration_ns": list(range(500))},
        schema={spillable.key: pl.UInt64, "duration_ns": pl.Int64},
    )
    rows = {"missing_timeout": {spillable.table: frame, "slow": pl.DataFrame({"a": [1]})}}
    for buckets in (1, 3):
        spill = Spill.create(buckets, near=str(tmp_path))
        out = spill.write(2, rows)
        assert out["missing_timeout"][spillable.table].height == 0
        assert out["missing_timeout"][spillable.table].schema == frame.schema
        assert out["missing_timeout"]["slow"].equals(rows["missing_timeout"]["slow"])
        pieces = [loader(None, None) for loader in spill.buckets_of("missing_timeout")]
        if buckets == 1:
            assert len(pieces) == 1 and pieces[0].equals(frame)
        else:
            assert len(pieces) == 3
            assert all(
                not set(a[spillable.key]) & set(b[spillable.key])
                for a in pieces
                for b in pieces
                if a is not b
            )
        back = pl.concat(pieces).sort("duration_ns")
        assert back.equals(frame.sort("duration_ns"))
        spill.remove()
