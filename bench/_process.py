"""What the benchmarks share about the processes they run: which `hourglass` command to start,
and how to stop a server they started."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def start_serve(
    db: Path, log: Path, *, env: dict[str, str] | None = None, timeout: float = 90.0
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``hourglass serve`` on ``db`` with free ports on 127.0.0.1, its output in ``log``; returns
    the process and the addresses it printed ("grpc": host:port, "http" and "api": URLs). The
    caller's HOURGLASS_* and ANTHROPIC_* variables are left out; ``env`` adds variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HOURGLASS_", "ANTHROPIC_"))}
    cmd = [sys.executable, "-m", "hourglass", "serve", "--db", str(db), "--host", "127.0.0.1"]
    cmd += ["--grpc-port", "0", "--http-port", "0", "--api-port", "0"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**clean, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
    patterns = {"grpc": "OTLP/gRPC", "http": "OTLP/HTTP", "api": "REST API"}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = {key: re.search(rf"{label} listening on (\S+)", text) for key, label in patterns.items()}
        if all(found.values()):
            return proc, {key: match.group(1).rstrip("/") for key, match in found.items() if match}
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"serve did not start:\n{log.read_text(errors='replace')}")
