"""Trace files → span tables: every real file, compression, streams, and bad data beside good data."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import zstandard

from hourglass.collector.files import FileProblem, TraceFileReader, detect_format

REAL_TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "real-traces"
INVALID_FILE = "invalid__otlp-json-mixed-id-encoding.json"


def expected_counts() -> dict[str, tuple[int, int]]:
    """file -> (traces, spans), read from the README table of the real-traces folder."""
    counts = {}
    for line in (REAL_TRACES / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and "__" in cells[0]:
            match = re.fullmatch(r"(\d+) / (\d+)", cells[3])
            assert match, f"README row without 'traces / spans': {line}"
            counts[cells[0]] = (int(match.group(1)), int(match.group(2)))
    return counts


def read(paths: list[Path], **kwargs: object) -> tuple[pa.Table, list[FileProblem], TraceFileReader]:
    problems: list[FileProblem] = []
    reader = TraceFileReader(on_problem=problems.append, **kwargs)  # type: ignore[arg-type]
    tables = list(reader.read(paths))
    table = pa.concat_tables(tables) if tables else pa.table({})
    return table, problems, reader


def trace_files() -> list[str]:
    return sorted(p.name for p in REAL_TRACES.iterdir() if p.name != "README.md")


def test_readme_lists_every_real_file() -> None:
    assert sorted(expected_counts()) == trace_files()


@pytest.mark.parametrize("name", trace_files())
@pytest.mark.parametrize("compression", [None, "gzip"])
def test_every_real_file_imports_with_the_right_counts(
    name: str, compression: str | None, tmp_path: Path
) -> None:
    path = REAL_TRACES / name
    if compression == "gzip":
        path = tmp_path / f"{name}.gz"
        path.write_bytes(gzip.compress((REAL_TRACES / name).read_bytes()))
    table, problems, reader = read([path])
    traces, spans = expected_counts()[name]
    report = reader.reports[0]
    assert report.compression == compression
    if name == INVALID_FILE:
        assert table.num_rows == 0 and report.skipped_spans == spans and not report.clean
        assert [str(p) for p in problems] == [
            f"{path}:resourceSpans[0].scopeSpans[0].spans[0].traceId: 'zzz' is neither 32 hex characters"
            " nor base64 of 16 bytes; span skipped"
        ]
        return
    assert [p for p in problems if p.skipped] == []
    assert table.num_rows == spans
    assert len(set(table.column("trace_id").to_pylist())) == traces
    assert report.spans == spans and report.format is not None


def test_detection_is_by_content_not_extension(tmp_path: Path) -> None:
    formats = {}
    for name in trace_files():
        disguised = tmp_path / f"{name}.txt"
        shutil.copy(REAL_TRACES / name, disguised)
        _, _, reader = read([disguised])
        formats[name.split("__")[0]] = reader.reports[0].format
    assert formats == {
        "invalid": "otlp-json",
        "jaeger-json": "jaeger-json",
        "jaeger-model-json": "jaeger-json",
        "jaeger-ui-json": "jaeger-json",
        "otlp-json": "otlp-json",
        "otlp-jsonl": "otlp-jsonl",
        "otlp-proto": "otlp-proto",
        "zipkin-v2": "zipkin-json",
    }


def frame(message: bytes) -> bytes:
    """The Collector file exporter's proto framing: 4-byte big-endian size, then the message."""
    return struct.pack(">I", len(message)) + message


def test_proto_stream_of_several_messages(tmp_path: Path) -> None:
    one = (REAL_TRACES / "otlp-proto__otlp2parquet-trace.pb").read_bytes()
    many = (REAL_TRACES / "otlp-proto__otlp2parquet-traces.pb").read_bytes()
    path = tmp_path / "traces.binpb"
    path.write_bytes(frame(one) + frame(many) + frame(one))
    table, problems, reader = read([path])
    assert problems == [] and reader.reports[0].format == "otlp-proto-stream"
    assert table.num_rows == 2 + 19 + 2
    # batching (one decode per batch) and frame-by-frame decoding give the same rows
    small, _, _ = read([path], batch_bytes=1)
    assert small.drop(["ingested_ns"]).equals(table.drop(["ingested_ns"]))


def test_proto_stream_bad_frame_and_truncation_keep_the_good_messages(tmp_path: Path) -> None:
    one = (REAL_TRACES / "otlp-proto__otlp2parquet-trace.pb").read_bytes()
    garbage = b"\x0a\xff\xff\xff\xff\x0f junk"
    data = frame(one) + frame(garbage) + frame(one)
    bad_offset = len(frame(one))
    cut = data + struct.pack(">I", 500) + b"\x0a\x05short"  # header says 500 bytes, 7 follow
    path = tmp_path / "stream.pb.gz"
    path.write_bytes(gzip.compress(cut))
    table, problems, reader = read([path])
    assert table.num_rows == 4
    positions = [(p.position, p.skipped) for p in problems]
    assert positions == [(f"byte {bad_offset}", True), (f"byte {len(data)}", True)]
    assert "not an OTLP" in problems[0].reason
    assert "header says 500 bytes, only 7 remain" in problems[1].reason
    assert reader.reports[0].failed and reader.reports[0].spans == 4


def test_jsonl_bad_lines_between_good_ones(tmp_path: Path) -> None:
    lines = (REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_text().splitlines()
    bad_id = json.loads(lines[1])
    bad_id["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = "xyz!"
    content = [
        lines[0],
        '{"resourceSpans": [ this is not json',
        "",
        json.dumps(bad_id),
        '{"hello": 1}',
        *lines[2:5],
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(content) + "\n")
    table, problems, reader = read([path])
    assert table.num_rows == 1 + 3  # line 1 and the last three; line 4 had one span, now skipped
    assert [(p.position, p.skipped) for p in problems] == [
        ("2:21", True),
        ("4:resourceSpans[0].scopeSpans[0].spans[0].spanId", True),
        ("5", True),
    ]
    assert "invalid JSON" in problems[0].reason and "not a trace document" in problems[2].reason
    assert str(problems[1]).startswith(f"{path}:4:resourceSpans[0]")
    assert reader.reports[0].format == "otlp-jsonl" and reader.reports[0].skipped_spans == 3


def test_jsonl_first_line_bad(tmp_path: Path) -> None:
    lines = (REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_text().splitlines()
    path = tmp_path / "first-bad.jsonl"
    path.write_text("\n".join(["garbage {", *lines[:3]]) + "\n")
    table, problems, _ = read([path])
    assert table.num_rows == 3 and [p.position for p in problems] == ["1:1"]


def test_jsonl_of_zipkin_and_jaeger_documents(tmp_path: Path) -> None:
    zipkin = json.loads((REAL_TRACES / "zipkin-v2__skew.json").read_text())
    jaeger = json.loads((REAL_TRACES / "jaeger-ui-json__ui_01.json").read_text())
    path = tmp_path / "mixed-formats.jsonl"
    path.write_text(json.dumps(zipkin) + "\n" + json.dumps(jaeger) + "\n")
    table, problems, _ = read([path])
    assert table.num_rows == 4 + 5 and [p for p in problems if p.skipped] == []


def test_truncated_gzip_keeps_the_lines_before(tmp_path: Path) -> None:
    source = (REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_bytes()
    compressed = gzip.compress(source)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(compressed[: len(compressed) * 2 // 3])
    table, problems, reader = read([path])
    assert 0 < table.num_rows < 19
    assert len(problems) == 1 and problems[0].skipped
    assert problems[0].position == str(table.num_rows + 1)
    assert (
        "gzip data truncated or corrupt" in problems[0].reason
        and "lines before are kept" in problems[0].reason
    )
    assert reader.reports[0].failed


def test_truncated_gzip_json_document_is_a_clear_error(tmp_path: Path) -> None:
    compressed = gzip.compress((REAL_TRACES / "zipkin-v2__yelp.json").read_bytes())
    path = tmp_path / "cut.json.gz"
    path.write_bytes(compressed[:-30])
    table, problems, reader = read([path])
    assert table.num_rows == 0 and reader.reports[0].failed
    assert "gzip data truncated or corrupt" in str(problems[0]) and str(problems[0]).startswith(str(path))


@pytest.mark.parametrize(("compress", "name"), [(bz2.compress, "bzip2"), (lzma.compress, "xz")])
def test_other_compressions(compress: object, name: str, tmp_path: Path) -> None:
    path = tmp_path / "trace"
    path.write_bytes(compress((REAL_TRACES / "zipkin-v2__messaging2.json").read_bytes()))  # type: ignore[operator]
    table, problems, reader = read([path])
    assert table.num_rows == 11 and problems == [] and reader.reports[0].compression == name


def test_bad_files_are_reported_and_do_not_stop_the_others(tmp_path: Path) -> None:
    files = {
        "empty.json": b"",
        "garbage.bin": bytes(range(1, 40)),
        "zstd.json.zst": b"\x28\xb5\x2f\xfd" + b"\x00" * 20,
        "broken.json": b'{"data": [ {"traceID": ',
        "unknown.json": b'{"kind": "metrics", "values": [1, 2]}',
    }
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    paths.insert(2, REAL_TRACES / "zipkin-v2__skew.json")
    paths.append(tmp_path / "missing.json")
    table, problems, reader = read(paths)
    assert table.num_rows == 4
    by_file = {Path(p.file).name: p for p in problems}
    assert by_file["empty.json"].reason == "empty file"
    assert "not a trace file this tool reads" in by_file["garbage.bin"].reason
    assert "zstd" in by_file["zstd.json.zst"].reason and by_file["zstd.json.zst"].skipped
    assert by_file["broken.json"].position == "1:24" and "invalid JSON" in by_file["broken.json"].reason
    assert "not a trace document: a JSON object with keys 'kind', 'values'" in by_file["unknown.json"].reason
    assert "No such file" in by_file["missing.json"].reason
    assert [r.failed for r in reader.reports] == [True, True, False, True, True, True, True]


def test_jaeger_record_errors_name_the_json_path(tmp_path: Path) -> None:
    doc = json.loads((REAL_TRACES / "jaeger-json__petclinic-overlapping-siblings.json").read_text())
    doc["spans"][3]["spanID"] = "not hex at all"
    path = tmp_path / "jaeger.json"
    path.write_text(json.dumps({"data": [doc]}))
    table, problems, _ = read([path])
    assert table.num_rows == 16
    assert [str(p) for p in problems] == [
        f"{path}:data[0].spans[3].spanID: 'not hex at all' is neither 16 hex characters nor base64 of 8 bytes"
    ]


def test_folder_expansion_ignores_non_trace_files(tmp_path: Path) -> None:
    folder = tmp_path / "traces"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(REAL_TRACES / "zipkin-v2__skew.json", folder / "nested" / "a.json")
    shutil.copy(REAL_TRACES / "README.md", folder / "README.md")
    (folder / "labels.json").write_text('{"expect": ["serialized_calls"]}')
    (folder / ".hidden.json").write_text("not looked at")
    table, problems, reader = read([folder])
    assert table.num_rows == 4
    assert {Path(r.file).name: r.ignored for r in reader.reports} == {
        "README.md": True,
        "a.json": False,
        "labels.json": True,
    }
    assert all(not p.skipped for p in problems) and all(r.clean for r in reader.reports)


def test_progress_counts_every_file_byte(tmp_path: Path) -> None:
    seen: list[int] = []
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress((REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_bytes()))
    paths = [REAL_TRACES / "zipkin-v2__yelp.json", gz]
    read(paths, progress=seen.append)
    assert sum(seen) == sum(p.stat().st_size for p in paths)


def test_detect_format() -> None:
    assert detect_format(b'\xef\xbb\xbf  {"resourceSpans": []}') == "json"
    assert detect_format(b"\n\n[ ]") == "json"
    assert detect_format(b"\x0a\x10\x0a\x0e") == "otlp-proto"
    assert detect_format(struct.pack(">I", 3) + b"\x0a\x01\x00") == "otlp-proto-stream"
    with pytest.raises(ValueError, match="empty file"):
        detect_format(b"")
    with pytest.raises(ValueError, match="not JSON"):
        detect_format(b"hello world")


def test_jaeger_api_v3_result_wrapper(tmp_path: Path) -> None:
    inner = json.loads((REAL_TRACES / "otlp-json__jaeger-example_trace.json").read_text())
    path = tmp_path / "v3.json"
    path.write_text(json.dumps({"result": inner}))
    table, problems, reader = read([path])
    assert table.num_rows == 5 and problems == [] and reader.reports[0].format == "otlp-json"


def test_zstd_file_and_truncated_zstd(tmp_path: Path) -> None:
    source = (REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_bytes()
    whole = tmp_path / "export.jsonl.zst"
    compressed = zstandard.ZstdCompressor().compress(source[:8000]) + zstandard.ZstdCompressor().compress(
        source[8000:]
    )
    whole.write_bytes(compressed)  # two frames, as a restarted exporter appends
    table, problems, reader = read([whole])
    assert table.num_rows == 19 and problems == [] and reader.reports[0].compression == "zstd"
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(compressed[:-40])
    table, problems, reader = read([cut])
    assert 0 < table.num_rows < 19 and reader.reports[0].failed
    assert "zstd data truncated or corrupt" in problems[-1].reason


def test_file_exporter_legacy_zstd_frames_proto_and_json(tmp_path: Path) -> None:
    """``compression: zstd`` without the native-compression gate: each message is compressed, then
    framed — for ``format: proto`` and for ``format: json``."""
    zstd = zstandard.ZstdCompressor()
    proto = (REAL_TRACES / "otlp-proto__otlp2parquet-traces.pb").read_bytes()
    path = tmp_path / "legacy-proto"
    path.write_bytes(
        frame(zstd.compress(proto)) + frame(b"\x28\xb5\x2f\xfd broken") + frame(zstd.compress(proto))
    )
    table, problems, reader = read([path])
    assert table.num_rows == 38 and reader.reports[0].format == "otlp-proto-stream"
    assert [(p.position, p.skipped) for p in problems] == [(f"byte {len(frame(zstd.compress(proto)))}", True)]
    lines = (REAL_TRACES / "otlp-jsonl__otlp2parquet-traces.jsonl").read_bytes().splitlines()
    path = tmp_path / "legacy-json"
    path.write_bytes(b"".join(frame(zstd.compress(line)) for line in lines))
    table, problems, reader = read([path])
    assert table.num_rows == 19 and problems == [] and reader.reports[0].format == "otlp-json-stream"


def test_jaeger_api_errors_and_empty_files_are_said(tmp_path: Path) -> None:
    not_found = tmp_path / "not-found.json"
    not_found.write_text('{"data": null, "total": 0, "errors": [{"code": 404, "msg": "trace not found"}]}')
    empty = tmp_path / "empty-list.json"
    empty.write_text("[]")
    table, problems, reader = read([not_found, empty])
    assert table.num_rows == 0
    assert [(Path(p.file).name, p.reason, p.skipped) for p in problems] == [
        ("not-found.json", "the Jaeger query API answered with errors: trace not found (404)", True),
        ("empty-list.json", "the file holds no spans", False),
    ]
    assert reader.reports[0].failed and reader.reports[1].clean


def test_a_bad_resource_costs_only_its_own_spans(tmp_path: Path) -> None:
    doc = json.loads((REAL_TRACES / "otlp-json__otlp2parquet-trace.json").read_text())
    good = doc["resourceSpans"][0]
    bad = json.loads(json.dumps(good))
    bad["resource"] = {"attributes": "not a list"}
    doc["resourceSpans"] = [good, bad, good]
    path = tmp_path / "three-resources.json"
    path.write_text(json.dumps(doc, indent=1))
    table, problems, reader = read([path])
    spans_per_resource = sum(len(s["spans"]) for s in good["scopeSpans"])
    assert table.num_rows == 2 * spans_per_resource
    assert [p.position for p in problems] == ["resourceSpans[1].resource"]
    assert reader.reports[0].skipped_spans == spans_per_resource


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_protobuf_message_keeps_its_whole_resources(compress: bool, tmp_path: Path) -> None:
    data = (REAL_TRACES / "otlp-proto__otlp2parquet-traces.pb").read_bytes()  # 19 resourceSpans
    cut = data[: len(data) // 2]
    path = tmp_path / "cut.pb"
    path.write_bytes(gzip.compress(cut)[:-12] if compress else cut)
    table, problems, reader = read([path])
    assert 0 < table.num_rows < 19 and reader.reports[0].failed
    assert (
        len(problems) == 1 and problems[0].position is not None and problems[0].position.startswith("byte ")
    )
    assert (
        "gzip data truncated" if compress else "not a whole OTLP protobuf message: truncated"
    ) in problems[0].reason
    # what was kept is exactly the first resources of the whole file
    whole, _, _ = read([REAL_TRACES / "otlp-proto__otlp2parquet-traces.pb"])
    assert table.column("span_id").to_pylist() == whole.column("span_id").to_pylist()[: table.num_rows]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda doc: {"trace": doc},  # Tempo /api/v2/traces/{id}
        lambda doc: {"batches": doc["resourceSpans"]},  # Tempo /api/traces/{id}, Grafana download
        lambda doc: {"trace": {"batches": doc["resourceSpans"]}, "metrics": {}},
    ],
)
def test_tempo_shapes(wrap: Callable[[dict[str, Any]], dict[str, Any]], tmp_path: Path) -> None:
    inner = json.loads((REAL_TRACES / "otlp-json__jaeger-example_trace.json").read_text())
    path = tmp_path / "tempo.json"
    path.write_text(json.dumps(wrap(inner)))
    table, problems, reader = read([path])
    assert table.num_rows == 5 and problems == [] and reader.reports[0].format == "otlp-json"


@pytest.fixture
def tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream JSON documents in tiny pieces so every chunk boundary is crossed."""
    import hourglass.collector.files
    import hourglass.collector.readers.json_stream

    monkeypatch.setattr(hourglass.collector.readers.json_stream, "CHUNK_CHARS", 64)
    monkeypatch.setattr(hourglass.collector.files, "DOCUMENT_CHUNK_SPANS", 3)


def test_streamed_jaeger_document_keeps_paths_and_rows(tiny_chunks: None, tmp_path: Path) -> None:
    trace = json.loads((REAL_TRACES / "jaeger-json__petclinic-overlapping-siblings.json").read_text())
    other = json.loads((REAL_TRACES / "jaeger-json__petclinic-child-longer-than-parent.json").read_text())
    broken = json.loads(json.dumps(other))
    broken["spans"][2]["spanID"] = "nope"
    path = tmp_path / "query-api.json"
    path.write_text(
        json.dumps({"data": [trace, broken, other], "total": 3, "limit": 0, "errors": None}, indent=2)
    )
    table, problems, reader = read([path])
    assert table.num_rows == 17 + 7 + 8 and reader.reports[0].format == "jaeger-json"
    assert [(p.position, p.skipped) for p in problems] == [("data[1].spans[2].spanID", True)]
    whole = pa.concat_tables(
        [
            read([REAL_TRACES / "jaeger-json__petclinic-overlapping-siblings.json"])[0],
            read([REAL_TRACES / "jaeger-json__petclinic-child-longer-than-parent.json"])[0],
        ]
    )
    assert set(table.column("span_id").to_pylist()) == set(whole.column("span_id").to_pylist())


def test_streamed_otlp_document_bad_resource_index(tiny_chunks: None, tmp_path: Path) -> None:
    doc = json.loads((REAL_TRACES / "otlp-json__otlp2parquet-trace.json").read_text())
    good = doc["resourceSpans"][0]
    bad = {**good, "resource": {"attributes": 7}}
    path = tmp_path / "otlp.json"
    path.write_text(json.dumps({"resourceSpans": [good, good, bad, good]}))
    table, problems, _ = read([path])
    per_resource = sum(len(s["spans"]) for s in good["scopeSpans"])
    assert table.num_rows == 3 * per_resource
    assert [p.position for p in problems] == ["resourceSpans[2].resource"]


def test_streamed_zipkin_traces_and_truncation(tiny_chunks: None, tmp_path: Path) -> None:
    traces = [
        json.loads((REAL_TRACES / name).read_text())
        for name in ("zipkin-v2__skew.json", "zipkin-v2__yelp.json")
    ]
    traces[1][0]["traceId"] = "xyz"
    path = tmp_path / "traces.json"
    path.write_text(json.dumps(traces))
    table, problems, _ = read([path])
    assert table.num_rows == 4 + 15 and [p.position for p in problems] == ["[1][0].traceId"]
    # a flat span list streamed in groups of traces: shared halves still paired
    flat = tmp_path / "flat.json"
    flat.write_text(
        json.dumps(traces[0] + json.loads((REAL_TRACES / "zipkin-v2__messaging2.json").read_text()))
    )
    table, problems, _ = read([flat])
    assert table.num_rows == 4 + 11 and len(set(table.column("span_id").to_pylist())) == 15 and problems == []
    # cut short: the whole traces before the damage are kept
    cut = tmp_path / "cut.json"
    text = json.dumps(traces[:1] * 5)
    cut.write_text(text[: len(text) * 3 // 4])
    table, problems, reader = read([cut])
    assert table.num_rows > 0 and table.num_rows % 4 == 0 and reader.reports[0].failed
    assert "invalid JSON" in problems[-1].reason and "the traces before are kept" in problems[-1].reason


def test_gc_thresholds_are_restored() -> None:
    import gc

    from hourglass.collector.files import BULK_GC_THRESHOLDS, gc_tuned_for_bulk_reading

    before = gc.get_threshold()
    with gc_tuned_for_bulk_reading():
        assert gc.get_threshold() == BULK_GC_THRESHOLDS
        table, _, _ = read([REAL_TRACES / "zipkin-v2__yelp.json"])
    assert gc.get_threshold() == before and table.num_rows == 16
