"""Dependencies point one way: api -> analysis -> collector."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"collector": {"analysis", "api"}, "analysis": {"api"}, "api": set()}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_dependency_direction() -> None:
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _imports(path) & forbidden
            if bad:
                violations.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not violations, "\n".join(violations)


def test_only_decode_imports_pb2() -> None:
    offenders = []
    for package in FORBIDDEN:
        for path in sorted((ROOT / package).rglob("*.py")):
            if package == "collector" and path.name.startswith("decode"):
                continue
            text = path.read_text()
            if "_pb2" in text and "import" in text:
                for line in text.splitlines():
                    if "import" in line and "_pb2" in line and not line.strip().startswith("#"):
                        offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, "only collector/decode*.py imports *_pb2 modules:\n" + "\n".join(offenders)
