"""Issue 15.6: the C and the Python OTLP decoders follow one rule for duplicate semantic
attributes (only the value of the first attribute with the most preferred key is read), and a
bounded differential run on mutated requests finds no disagreement. Longer runs: scripts/fuzz/.
"""

from __future__ import annotations

import random
import time

import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from hourglass.collector import native_decode
from hourglass.collector.decode import DecodeError, decode_export_request
from tests.collector.test_native_decode import _assert_same

pytestmark = pytest.mark.skipif(
    not native_decode.AVAILABLE, reason="hourglass.collector._otlpscan is not built"
)

GOOD_STATUS = ("http.response.status_code", b"\x18\xc8\x01")  # int 200
VALUES = {
    "malformed": b"\xff\xff",
    "truncated": b"\x0a\x09abc",
    "not a number": b"\x0a\x07garbage",
    "array": b"\x2a\x04\x0a\x02\x18\x01",
}


def _kv(key: str, value: bytes) -> bytes:
    encoded_key = key.encode()
    return b"\x0a" + bytes([len(encoded_key)]) + encoded_key + b"\x12" + bytes([len(value)]) + value


def _request(attributes: list[bytes]) -> bytes:
    msg = trace_pb2.TracesData()
    span = (
        msg.resource_spans.add()
        .scope_spans.add()
        .spans.add(
            trace_id=b"\x01" * 16,
            span_id=b"\x02" * 8,
            name="GET /x",
            start_time_unix_nano=1,
            end_time_unix_nano=2,
        )
    )
    span_bytes = span.SerializeToString() + b"".join(b"\x4a" + bytes([len(a)]) + a for a in attributes)
    scope = b"\x12" + bytes([len(span_bytes)]) + span_bytes
    resource = b"\x12" + bytes([len(scope)]) + scope
    return b"\x0a" + bytes([len(resource)]) + resource


def _status(data: bytes, native: bool) -> object:
    try:
        return (
            decode_export_request(data, ingested_ns=1, native=native)
            .table.column("http_status_code")
            .to_pylist()
        )
    except DecodeError:
        return "DecodeError"


@pytest.mark.parametrize("bad", sorted(VALUES))
@pytest.mark.parametrize("bad_first", [True, False])
def test_a_bad_value_under_a_less_preferred_key_is_ignored_in_any_order(bad: str, bad_first: bool) -> None:
    attributes = [_kv("http.status_code", VALUES[bad]), _kv(*GOOD_STATUS)]
    data = _request(attributes if bad_first else attributes[::-1])
    assert _status(data, native=True) == _status(data, native=False) == [200]
    _assert_same(data)


@pytest.mark.parametrize("other_first", [True, False])
def test_a_malformed_value_under_the_chosen_key_is_a_malformed_request_on_both_paths(
    other_first: bool,
) -> None:
    attributes = [_kv("http.status_code", b"\x18\xc8\x01"), _kv("http.response.status_code", b"\xff\xff")]
    data = _request(attributes if other_first else attributes[::-1])
    assert _status(data, native=True) == _status(data, native=False) == "DecodeError"


def _seed(rng: random.Random) -> bytes:
    keys = [
        "http.response.status_code", "http.status_code", "db.query.text", "db.statement", "http.route",
        "url.full", "http.url", "peer.service", "server.address", "lock.wait_ms", "plain",
    ]  # fmt: skip
    values = [
        b"\x18\xc8\x01",
        b"\x0a\x03abc",
        b"\x0a\x03404",
        b"\x21" + b"\x00" * 7 + b"\x40",
        b"\x10\x01",
        b"",
    ]
    attributes = [
        _kv(rng.choice(keys), rng.choice(values + list(VALUES.values()))) for _ in range(rng.randint(1, 6))
    ]
    return _request(attributes)


def test_both_decoders_agree_on_mutated_requests_with_duplicate_attributes() -> None:
    """A few seconds of mutated requests (attributes of duplicate keys, in random order, with
    bytes flipped, cut or inserted): same rows, rejections and errors, or the same DecodeError."""
    rng = random.Random(15_06)
    deadline = time.monotonic() + 4.0
    cases = 0
    while cases < 300 or (time.monotonic() < deadline and cases < 20_000):
        data = bytearray(_seed(rng))
        for _ in range(rng.randint(0, 3)):
            position = rng.randrange(len(data))
            action = rng.random()
            if action < 0.5:
                data[position] = rng.randrange(256)
            elif action < 0.75:
                del data[position : position + rng.randint(1, 4)]
            else:
                data[position:position] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
        _assert_same(bytes(data))
        cases += 1
    assert cases >= 300
