#!/usr/bin/env python3
"""Container health check: GET /healthz on the local API port (HOURGLASS_API_PORT, default 8000).

Exit 0 when it answers 200, 1 otherwise (with the reason on stderr), as Docker's HEALTHCHECK and
the compose file expect. Standard library only: it runs in the image's interpreter.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request

HEALTH_PATH = "/healthz"


def main() -> int:
    port = os.environ.get("HOURGLASS_API_PORT", "8000")
    tls = bool(os.environ.get("HOURGLASS_TLS_CERT"))
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}{HEALTH_PATH}"
    # loopback to our own server: its certificate names the service, not 127.0.0.1
    context = ssl._create_unverified_context() if tls else None
    try:
        with urllib.request.urlopen(url, timeout=3, context=context) as response:
            if response.status == 200:
                return 0
            print(f"{url} answered {response.status}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
