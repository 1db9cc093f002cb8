"""Shared parts of the OTLP decoder fuzz harnesses (see README.md in this folder)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from collections.abc import Callable  # noqa: E402

from opentelemetry.proto.trace.v1 import trace_pb2  # noqa: E402


def seed_requests() -> list[bytes]:
    """A few well-formed requests to start from (also written to a corpus folder by --seed)."""
    seeds = []
    msg = trace_pb2.TracesData()
    rs = msg.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "checkout"
    span = rs.scope_spans.add().spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="GET /x", kind=2)
    span.start_time_unix_nano, span.end_time_unix_nano = 1, 2
    span.attributes.add(key="http.status_code").value.string_value = "garbage"
    span.attributes.add(key="http.response.status_code").value.int_value = 200
    span.attributes.add(key="db.statement").value.string_value = "SELECT 1"
    span.attributes.add(key="lock.wait_ms").value.double_value = 1.5
    span.events.add(name="lock.wait", time_unix_nano=1)
    span.links.add(trace_id=b"\x01" * 16, span_id=b"\x03" * 8)
    seeds.append(msg.SerializeToString())
    seeds.append(b"")
    return seeds


def write_seeds(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(seed_requests()):
        (out / f"seed-{index}.pb").write_bytes(data)


def run(test_one_input: Callable[[bytes], None]) -> None:
    """The harnesses' command line: ``--seed FOLDER`` writes the seeds, anything else is libFuzzer's."""
    import atheris

    if len(sys.argv) == 3 and sys.argv[1] == "--seed":
        write_seeds(sys.argv[2])
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
