#!/usr/bin/env python3
"""atheris harness for the pure-Python OTLP decoder (``hourglass.collector.decode``, ``native=False``).

Any input must either decode or raise ``hourglass.collector.decode.DecodeError``; anything else (another
exception, a crash, a hang) is a finding. Run from the repository root (see README.md here):

    python scripts/fuzz/fuzz_python_decoder.py --seed corpus/py      # write the seed requests
    python scripts/fuzz/fuzz_python_decoder.py corpus/py -max_total_time=3600 -timeout=10
"""

from __future__ import annotations

import atheris
from _harness import run

with atheris.instrument_imports():
    from hourglass.collector.decode import DecodeError, decode_export_request


def test_one_input(data: bytes) -> None:
    try:
        result = decode_export_request(data, ingested_ns=1, native=False)
    except DecodeError:
        return
    assert result.table.num_rows + result.rejected >= 0


def main() -> None:
    run(test_one_input)


if __name__ == "__main__":
    main()
