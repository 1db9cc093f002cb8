#!/usr/bin/env python3
"""atheris harness for the C OTLP decoder (``hourglass.collector._otlpscan`` + ``hourglass.collector.native_decode``),
checked against the pure-Python decoder on every input it accepts.

Per input: the C path either declines (``decode_native`` returns None: the Python decoder takes
over), or gives a table — which must equal the Python decoder's table on the same bytes (same
rule for duplicate and malformed attributes, see hourglass/collector/decode.py and decode_python.py) — or raises
``DecodeError`` where the Python decoder raises it too. A crash inside the extension shows up
as a signal; build it with AddressSanitizer for memory errors (README.md here).

    python scripts/fuzz/fuzz_native_decoder.py --seed corpus/c
    python scripts/fuzz/fuzz_native_decoder.py corpus/c -max_total_time=3600 -timeout=10
"""

from __future__ import annotations

import sys

import atheris
from _harness import run

with atheris.instrument_imports():
    from hourglass.collector import native_decode
    from hourglass.collector.decode import DecodeError, decode_export_request


def _outcome(data: bytes, native: bool) -> object:
    try:
        result = decode_export_request(data, ingested_ns=1, native=native)
    except DecodeError as exc:
        return f"DecodeError: {exc}"
    table = result.table.drop_columns(["raw"])  # the C path keeps the received bytes verbatim
    return (table.to_pylist(), result.rejected, result.errors)


def test_one_input(data: bytes) -> None:
    try:
        accepted = native_decode.decode_native(data, 1)
    except DecodeError:
        accepted = None
    if accepted is None:
        return  # declined: the Python decoder decides alone
    assert _outcome(data, True) == _outcome(data, False), data.hex()


def main() -> None:
    if not native_decode.AVAILABLE:
        sys.exit("hourglass.collector._otlpscan is not built: run `make install` (needs gcc)")
    run(test_one_input)


if __name__ == "__main__":
    main()
