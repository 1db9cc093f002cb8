"""The suite under pytest-xdist: `make test` runs it on two workers with ``--dist loadgroup``.

Tests are handed out one at a time to whichever worker is free, except that every test of a module
that uses one of the module's own broader-scoped fixtures (a started server, a Dask cluster, a
generated trace set: built once, read by the module's tests) is grouped onto one worker with the
module's other tests that use it (per parameter of the fixture), so the fixture is still built
once. The groups are handed out first (xdist orders work units by size). A test that sets its own
``xdist_group`` keeps it.

The other tests are handed out in collection order, except that those marked ``slow`` (the
longest, most of 10 s or more) come first: collected last (``tests/test_*.py``), they kept one
worker busy for the last minute while the other had nothing left to run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

_SHARED_SCOPES = frozenset({"class", "module", "package", "session"})


def _group(item: pytest.Item) -> str | None:
    """The module of a test that uses a fixture of the suite's own (not pytest's or a plugin's,
    such as ``tmp_path_factory``) that outlives one test, with that fixture's parameter when it has
    one (each trace set of a parametrized module fixture is a group of its own); None otherwise."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    shared = sorted(
        name
        for name, definitions in info.name2fixturedefs.items()
        if any(d.scope in _SHARED_SCOPES and d.baseid for d in definitions)
    )
    if not shared:
        return None
    params = getattr(getattr(item, "callspec", None), "params", {})
    chosen = [f"{name}={params[name]}" for name in shared if name in params]
    module = item.nodeid.split("::", 1)[0]
    return f"{module}[{','.join(chosen)}]" if chosen else module


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is None and (group := _group(item)) is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(  # (stable: the rest keep their order)
        key=lambda item: (
            item.get_closest_marker("slow") is None or item.get_closest_marker("xdist_group") is not None
        )
    )


@pytest.fixture
def temp_in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process' temporary folder is the test's (``tempfile.gettempdir()``): what the test
    leaves there (a state without a sidecar that it never closes: a reference to compare with) is
    removed with the test's folder, not left in the system's, once per run of the suite."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path
