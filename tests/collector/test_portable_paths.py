"""Tests must run from any checkout: no absolute path of one machine in a test module (issue 15.8).

Shared fixtures beside the repository (``../shared``) are resolved from the repository root.
"""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# A string literal that starts at the filesystem root and names a project folder of one machine.
_ABSOLUTE = re.compile(r"""Path\(\s*["']/(?:work|home|Users|root|srv|opt)/""")


def test_no_test_module_reads_an_absolute_machine_path() -> None:
    offenders = [
        f"{path.relative_to(TESTS)}:{number}: {line.strip()}"
        for path in sorted(TESTS.rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _ABSOLUTE.search(line)
    ]
    assert offenders == []


def test_the_shared_real_traces_resolve_from_the_repository_root() -> None:
    from tests.collector import test_decode, test_native_decode

    root = TESTS.parent
    for module in (test_decode, test_native_decode):
        assert root.parent / "shared" / "real-traces" == module.REAL_TRACES
