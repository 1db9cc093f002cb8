"""The import structure of the ``hourglass`` package.

- Dependencies point one way: cli -> api -> analysis -> collector -> settings (``hourglass.settings``,
  the one table of settings and limits, is the ground floor: every floor may read it and it imports
  no other module of the project; ``workload``, the demo's instrumented services, stands apart; only
  ``hourglass.demo`` and the tests use it).
- No module imports another that (directly or through others) imports it back: every import,
  also those inside functions, counts.
- Only the modules in ``PB2_MODULES`` (the decoders and what the receivers answer) import the
  generated ``*_pb2`` modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hourglass"

# floor -> the floors it must not import
FORBIDDEN = {
    "settings": {"collector", "analysis", "api", "cli", "demo", "workload"},
    "collector": {"analysis", "api", "cli", "demo", "workload"},
    "analysis": {"api", "cli", "demo", "workload"},
    "api": {"cli", "demo", "workload"},
    "cli": {"demo", "workload"},
    "workload": {"settings", "collector", "analysis", "api", "cli", "demo"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported_modules(path: Path) -> set[str]:
    """Every project module ``path`` imports, at top level or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from package import module` names a module; `from module import name` names the module
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imported_modules(path) for name, path in MODULES.items()}


def _floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_dependency_direction() -> None:
    violations = []
    for module, imported in sorted(GRAPH.items()):
        forbidden = FORBIDDEN.get(_floor(module) or "", set())
        bad = sorted(target for target in imported if _floor(target) in forbidden)
        if bad:
            violations.append(f"{module} imports {bad}")
    assert not violations, "\n".join(violations)


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative-free: small graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(GRAPH[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles() -> None:
    cycles = _cycles()
    detail = []
    for component in cycles:
        members = set(component)
        edges = [f"  {a} -> {b}" for a in component for b in sorted(GRAPH[a] & members)]
        detail.append(", ".join(component) + "\n" + "\n".join(edges))
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_the_cycle_check_sees_a_cycle() -> None:
    """The check itself: a package that imports one of its own modules, which imports it back."""
    saved = dict(GRAPH)
    try:
        GRAPH["hourglass.collector.schema"] = GRAPH["hourglass.collector.schema"] | {
            "hourglass.collector.store"
        }
        GRAPH["hourglass.collector.store"] = GRAPH["hourglass.collector.store"] | {
            "hourglass.collector.schema"
        }
        assert any({"hourglass.collector.schema", "hourglass.collector.store"} <= set(c) for c in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


# The modules that may import ``*_pb2``: protobuf stays inside the collector's decoders and the
# answers of the receivers; every other module works with rows, bytes and these modules' functions.
PB2_MODULES = {
    "hourglass.collector.decode",  # the dispatcher (parse_traces_data)
    "hourglass.collector.decode_parts",  # what both decoders read through protobuf
    "hourglass.collector.decode_json",  # OTLP JSON -> TracesData
    "hourglass.collector.decode_otel",  # rows -> the ClickHouse exporter's otel_traces rows
    "hourglass.collector.span_details",  # the stored raw span, read back
    "hourglass.collector.responses",  # ExportTraceServiceResponse, google.rpc.Status, grpc health
}


def test_only_the_decoders_import_pb2() -> None:
    assert set(MODULES) >= PB2_MODULES, sorted(PB2_MODULES - set(MODULES))
    offenders = []
    importers = set()
    for module, path in MODULES.items():
        for line in path.read_text().splitlines():
            if "import" in line and "_pb2" in line and not line.strip().startswith("#"):
                importers.add(module)
                if module not in PB2_MODULES:
                    offenders.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert not offenders, "only PB2_MODULES import *_pb2 modules:\n" + "\n".join(offenders)
    # the list stays short and true: a module that no longer imports pb2 leaves it
    assert importers == PB2_MODULES, sorted(PB2_MODULES - importers)


def test_the_settings_table_is_the_ground_floor() -> None:
    """Every floor reads ``hourglass.settings``; it reads no other module of the project."""
    assert GRAPH["hourglass.settings"] == set()
    readers = {m for m, imported in GRAPH.items() if "hourglass.settings" in imported}
    assert {_floor(m) for m in readers} >= {"collector", "analysis", "api", "cli"}
