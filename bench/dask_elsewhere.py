"""Dask worker preload (``dask worker --preload bench/dask_elsewhere.py``): the worker plays one
on another machine, which does not see the client's temporary files — its probe
(``partitions._reads_token``, looked up by name when a task is unpickled here) never reads the
client's token, so the client neither splits the store for it nor lets it keep rows in its spill
folder. The store itself is still read at its path, as a shared store is."""

from __future__ import annotations

from typing import Any


def _sees_nothing(path: str, token: str) -> bool:
    return False


async def dask_setup(worker: Any) -> None:
    from hourglass.analysis import partitions

    partitions._reads_token = _sees_nothing  # type: ignore[assignment]
