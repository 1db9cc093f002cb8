"""What other code may import from ``hourglass``, and that the project installs as one package."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import hourglass

ROOT = Path(__file__).resolve().parents[1]

# what other code may import from `hourglass` (name -> the module that defines it); adding or
# removing a name is a change of the public surface and must change this line too
PUBLIC = {"Settings", "SpanStore", "StoreError", "__version__", "analyze", "analyze_partitioned", "create_app", "open_store", "read_trace_files"}  # fmt: skip


def test_the_public_surface_is_pinned() -> None:
    assert set(hourglass.__all__) == PUBLIC
    assert set(hourglass._EXPORTS) | {"__version__"} == PUBLIC
    for name in PUBLIC:
        assert getattr(hourglass, name) is not None, name
    assert hourglass.open_store.__module__ == "hourglass.collector.backends"
    assert hourglass.analyze.__module__ == "hourglass.analysis.pipeline"


def test_importing_the_package_is_cheap() -> None:
    """`import hourglass` loads none of the heavy libraries: the names load on first use."""
    code = "import sys, hourglass; print(sorted(m for m in ('polars', 'duckdb', 'fastapi', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_one_top_level_import_package() -> None:
    dist = importlib.metadata.distribution("hourglass")
    top_level = dist.read_text("top_level.txt")
    if top_level is not None:  # editable installs may not write it
        assert top_level.split() == ["hourglass"]
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"hourglass": "hourglass.cli:main"}
    # the source tree holds one import package (bench/ and scripts/ are not installed)
    found = sorted(
        p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in {"tests", "bench"}
    )
    assert found == ["hourglass"]
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["hourglass*"]


def test_python_dash_m_hourglass_is_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "hourglass", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for command in ("analyze", "import", "serve", "report", "whatif", "diff", "mcp"):
        assert command in out.stdout
