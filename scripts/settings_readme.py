"""Rewrite the README's generated settings and limits tables from hourglass/settings.py.

    python scripts/settings_readme.py          # rewrite README.md in place
    python scripts/settings_readme.py --check  # exit 1 when README.md is out of date

``tests/test_docs.py`` runs the same check.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hourglass.settings import render_readme

README = Path(__file__).resolve().parents[1] / "README.md"


def main(argv: list[str]) -> int:
    text = README.read_text(encoding="utf-8")
    new = render_readme(text)
    if "--check" in argv:
        if new != text:
            print(f"{README} is out of date: run python scripts/settings_readme.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new, encoding="utf-8")
        print(f"rewrote the settings tables in {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
