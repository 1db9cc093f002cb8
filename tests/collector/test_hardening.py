"""Issue 15: hostile input to the receivers and file readers (deep JSON, ...)."""

from __future__ import annotations

import gzip
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hourglass.collector import json_limits
from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.files import read_trace_files
from tests.collector.test_receivers import Receivers, _start, make_request

DEEP = 100_000


def deep_otlp_json(levels: int = DEEP) -> bytes:
    return b'{"resourceSpans":' + b"[" * levels + b"]" * levels + b"}"


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    yield from _start(DuckDBSpanStore(":memory:"))


def test_json_depth_is_exact_and_ignores_brackets_in_strings() -> None:
    cases = {
        "1": 0,
        '"[[[["': 0,
        '{"a": "[[[[\\"[["}': 1,
        '["\\\\", ["["]]': 2,
        '{"a": [[[]]], "b": "]]]]"}': 4,
        '[{"k": [{"v": {}}]}]': 5,
    }
    for text, depth in cases.items():
        assert json_limits.json_depth(text, limit=0) == depth, text
    assert json_limits.json_depth("[" * DEEP + "]" * DEEP) == DEEP


def test_json_depth_is_linear_on_a_large_document() -> None:
    big = json.dumps([{"a": [1, {"b": 'x\\"[' * 3}], "c": "some string"}] * 200_000).encode()
    started = time.process_time()
    assert json_limits.json_depth(big, limit=0) == 4
    assert time.process_time() - started < 5.0  # ~0.1 s on an idle core for these ~11 MB


def test_deeply_nested_otlp_json_is_a_400_with_a_status_and_one_log_line(
    receivers: Receivers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for body, headers in (
        (deep_otlp_json(), {"content-type": "application/json"}),
        (gzip.compress(deep_otlp_json()), {"content-type": "application/json", "content-encoding": "gzip"}),
    ):
        caplog.clear()
        reply = httpx.post(receivers.http_url, content=body, headers=headers, timeout=30)
        assert reply.status_code == 400
        assert reply.headers["content-type"].startswith("application/json")
        status = reply.json()
        assert status["code"] == 3 and "nested" in status["message"]
        lines = [r for r in caplog.records if r.name.startswith("hourglass")]
        assert len(lines) == 1 and lines[0].exc_info is None
        assert "Traceback" not in caplog.text
    ok = httpx.post(
        receivers.http_url,
        content=make_request(2),
        headers={"content-type": "application/x-protobuf"},
        timeout=10,
    )
    assert ok.status_code == 200 and receivers.store.stats().spans == 2


def test_deep_json_files_and_lines_are_reported_and_the_rest_is_read(tmp_path: Path) -> None:
    good = json.loads(Path("sample-traces/n_plus_one.otlp.jsonl").read_text().splitlines()[0])
    single = tmp_path / "deep.json"
    single.write_bytes(deep_otlp_json())
    lines = tmp_path / "mixed.jsonl"
    lines.write_bytes(
        json.dumps(good).encode() + b"\n" + deep_otlp_json() + b"\n" + json.dumps(good).encode() + b"\n"
    )
    found: list[str] = []
    tables = list(read_trace_files([single, lines], on_error=lambda p: found.append(str(p))))
    assert any("deep.json" in p and "nested" in p for p in found), found
    assert any("mixed.jsonl:2" in p and "nested" in p for p in found), found
    assert sum(t.num_rows for t in tables) > 0  # the good lines beside the deep one are kept
