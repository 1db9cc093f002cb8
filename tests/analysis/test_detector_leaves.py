"""Each detector module is a leaf: it imports the shared helpers (``detectors/_common.py``) and
general analysis modules (context, model, repair, ...), never another detector nor the registry
(``hourglass.analysis.detectors``, which imports them all). The helper modules import no detector
either, so no detector reaches another through them. Every import counts, also inside functions
(the import graph of ``tests/test_layering.py``)."""

from __future__ import annotations

from hourglass.analysis.detectors import DETECTORS
from tests.test_layering import GRAPH, MODULES

PACKAGE = "hourglass.analysis.detectors"
IN_PACKAGE = sorted(m for m in MODULES if m.startswith(PACKAGE + "."))
DETECTOR_MODULES = [m for m in IN_PACKAGE if not m.rpartition(".")[2].startswith("_")]
HELPER_MODULES = [m for m in IN_PACKAGE if m.rpartition(".")[2].startswith("_")]


def test_every_registered_detector_has_its_own_module() -> None:
    assert {f"{PACKAGE}.{kind}" for kind in DETECTORS} == set(DETECTOR_MODULES)
    assert f"{PACKAGE}._common" in HELPER_MODULES


def test_detectors_and_their_helpers_import_no_detector() -> None:
    violations = [
        f"{module} imports {imported}"
        for module in [*DETECTOR_MODULES, *HELPER_MODULES]
        for imported in sorted(GRAPH[module])
        if imported == PACKAGE or imported in DETECTOR_MODULES
    ]
    assert not violations, "move what they share to detectors/_common.py:\n" + "\n".join(violations)
