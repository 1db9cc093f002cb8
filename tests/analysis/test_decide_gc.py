"""``partitions.decide`` runs each detector's decision with Python's cyclic collector paused (the
occurrences it builds are acyclic; each collection would walk them all again) and gives the
collector back as it found it, when the decision fails too."""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest

from hourglass.analysis import partitions
from hourglass.analysis.detectors import PARTS
from hourglass.analysis.model import Finding, NearMissLog


def test_the_collector_is_paused_while_deciding_and_restored_after(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []

    def deciding(rows: object, notes: object) -> list[Finding]:
        seen.append(gc.isenabled())
        if rows == {"fail": True}:
            raise ValueError("boom")
        return []

    monkeypatch.setitem(PARTS, "n_plus_one", replace(PARTS["n_plus_one"], decide=deciding))
    was = gc.isenabled()
    try:
        gc.enable()
        assert partitions.decide({"n_plus_one": {}}, NearMissLog()) == {"n_plus_one": []}
        assert seen == [False] and gc.isenabled()
        with pytest.raises(RuntimeError, match="'n_plus_one' failed while deciding: boom"):
            partitions.decide({"n_plus_one": {"fail": True}}, NearMissLog())  # type: ignore[dict-item]
        assert seen == [False, False] and gc.isenabled()
        gc.disable()  # a caller that runs without the collector keeps it off
        partitions.decide({"n_plus_one": {}}, NearMissLog())
        assert not gc.isenabled()
    finally:
        if was:
            gc.enable()
        else:
            gc.disable()
