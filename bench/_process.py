"""What the benchmarks share about the processes they run: which `hourglass` command to start,
and how to stop a server they started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def hourglass_command() -> list[str]:
    """The console script next to this interpreter (the venv's), else ``python -m hourglass``."""
    script = Path(sys.executable).with_name("hourglass")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hourglass"]


def stop(process: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL after ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
