"""OTLP/gRPC and OTLP/HTTP receivers in-process over loopback, with the group-commit pipeline.

Raw clients (grpc channel with bytes, httpx) send what real exporters send and what broken ones
send; every test checks both the answer and what ended up in the store. The end-to-end tests with
the SDK exporters against the `hourglass serve` process are in tests/api/test_serve.py.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pyarrow as pa
import pytest
import uvicorn
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from hourglass.collector.duckdb_store import DuckDBSpanStore
from hourglass.collector.grpc_receiver import EXPORT_METHOD, GrpcReceiver
from hourglass.collector.http_receiver import create_otlp_http_app
from hourglass.collector.ingest import IngestClosed, IngestPipeline, Overloaded, UndecodedBytes
from hourglass.collector.store import StoreStats

pytestmark = pytest.mark.timeout(60)


def make_request(n_spans: int, *, first: int = 1, bad_ids: int = 0, service: str = "svc") -> bytes:
    msg = trace_service_pb2.ExportTraceServiceRequest()
    rs = msg.resource_spans.add()
    kv = rs.resource.attributes.add(key="service.name")
    kv.value.string_value = service
    spans = rs.scope_spans.add().spans
    for i in range(first, first + n_spans):
        s = spans.add(
            name=f"op{i}", kind=2, start_time_unix_nano=10**18 + i, end_time_unix_nano=10**18 + i + 1000
        )
        s.trace_id = i.to_bytes(16, "big")
        s.span_id = i.to_bytes(8, "big")
        s.attributes.add(key="http.route").value.string_value = f"/r/{i}"
    for j in range(bad_ids):
        s = spans.add(name=f"bad{j}")
        s.trace_id, s.span_id = b"\x01" * 8, b"\x02" * 8
    return msg.SerializeToString()


class BlockingStore(DuckDBSpanStore):
    """An in-memory store whose writes wait for ``release`` (to hold the pipeline full)."""

    def __init__(self) -> None:
        super().__init__(":memory:")
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, spans: pa.Table) -> None:
        self.writing.set()
        assert self.release.wait(30)
        super().write(spans)


class FailingStore(DuckDBSpanStore):
    def write(self, spans: pa.Table) -> None:
        raise OSError("disk full")


@dataclass
class Receivers:
    store: DuckDBSpanStore
    pipeline: IngestPipeline
    grpc_target: str
    http_url: str
    channel: grpc.Channel

    def export(self, data: bytes, **kwargs: object) -> trace_service_pb2.ExportTraceServiceResponse:
        call = self.channel.unary_unary(EXPORT_METHOD)
        raw = call(data, timeout=20, **kwargs)
        return trace_service_pb2.ExportTraceServiceResponse.FromString(raw)


def _start(
    store: DuckDBSpanStore,
    *,
    token: str | None = None,
    max_message_bytes: int = 1 << 20,
    grpc_options: dict[str, Any] | None = None,
    **caps: float,
) -> Generator[Receivers, None, None]:
    pipeline = IngestPipeline(store, **caps)  # type: ignore[arg-type]
    grpc_receiver = GrpcReceiver(
        pipeline, port=0, max_message_bytes=max_message_bytes, api_token=token, **(grpc_options or {})
    )
    grpc_port = grpc_receiver.start()
    app = create_otlp_http_app(pipeline, max_message_bytes=max_message_bytes, api_token=token)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        threading.Event().wait(0.01)
    http_port = server.servers[0].sockets[0].getsockname()[1]
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        yield Receivers(
            store, pipeline, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}/v1/traces", channel
        )
    finally:
        channel.close()
        server.should_exit = True
        thread.join(10)
        grpc_receiver.stop(1)
        pipeline.close(10)
        store.close()


@pytest.fixture
def receivers() -> Iterator[Receivers]:
    yield from _start(DuckDBSpanStore(":memory:"))


# -- gRPC --------------------------------------------------------------------------------------


def test_grpc_export_stores_once_and_reports_partial_success(receivers: Receivers) -> None:
    response = receivers.export(make_request(5, bad_ids=2))
    assert response.partial_success.rejected_spans == 2
    assert "trace_id is 8 bytes, expected 16" in response.partial_success.error_message
    assert receivers.store.stats() == StoreStats(spans=5, traces=5)
    again = receivers.export(make_request(5))  # the same spans, retried
    assert not again.HasField("partial_success")
    assert receivers.store.stats() == StoreStats(spans=5, traces=5)
    assert receivers.store.scan(columns=("http_route",)).column("http_route").to_pylist() == [
        f"/r/{i}" for i in range(1, 6)
    ]


def test_grpc_gzip_request(receivers: Receivers) -> None:
    receivers.export(make_request(3, first=100), compression=grpc.Compression.Gzip)
    assert receivers.store.stats().spans == 3


def test_grpc_malformed_is_invalid_argument_and_server_keeps_serving(receivers: Receivers) -> None:
    receivers.export(make_request(2))
    with pytest.raises(grpc.RpcError) as err:
        receivers.export(b"\x0a\xff\xff\xff\xff\x0f not protobuf")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not an OTLP" in (err.value.details() or "")
    receivers.export(make_request(2, first=10))
    assert receivers.store.stats().spans == 4


def test_grpc_over_size_limit(receivers: Receivers) -> None:
    with pytest.raises(grpc.RpcError) as err:
        receivers.export(make_request(30_000))  # > 1 MiB configured for these tests
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    receivers.export(make_request(1))
    assert receivers.store.stats().spans == 1


def test_grpc_health_service(receivers: Receivers) -> None:
    stub = health_pb2_grpc.HealthStub(receivers.channel)
    for service in ("", "opentelemetry.proto.collector.trace.v1.TraceService"):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _retry_delay_s(err: grpc.RpcError) -> float:
    trailers = dict(err.trailing_metadata() or ())
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    retry = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(retry)
    return retry.retry_delay.ToNanoseconds() / 1e9


def test_overload_grpc_resource_exhausted_and_http_429() -> None:
    store = BlockingStore()
    gen = _start(store, max_pending_spans=5, retry_after_s=2.0)
    r = next(gen)
    try:
        first = threading.Thread(target=r.export, args=(make_request(5),))
        first.start()
        assert store.writing.wait(10)
        with pytest.raises(grpc.RpcError) as err:
            r.export(make_request(1, first=50))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in (err.value.details() or "")
        assert _retry_delay_s(err.value) == 2.0
        reply = httpx.post(
            r.http_url,
            content=make_request(1, first=60),
            headers={"content-type": "application/x-protobuf"},
            timeout=10,
        )
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "2"
        assert status_pb2.Status.FromString(reply.content).code == 8
        store.release.set()
        first.join(10)
        assert r.store.stats().spans == 5  # the admitted request was committed, nothing else
        r.export(make_request(1, first=70))  # capacity is back
        assert r.store.stats().spans == 6
    finally:
        store.release.set()
        gen.close()


def _send_collecting(
    r: Receivers, outcomes: list[tuple[grpc.StatusCode, float | None]], first: int
) -> Callable[[int], None]:
    """A sender for threads: exports one span and records (status, RetryInfo delay or None)."""

    def send(index: int) -> None:
        try:
            r.export(make_request(1, first=first + index))
            outcomes.append((grpc.StatusCode.OK, None))
        except grpc.RpcError as err:
            trailers = dict(err.trailing_metadata() or ())
            outcomes.append(
                (err.code(), _retry_delay_s(err) if "grpc-status-details-bin" in trailers else None)
            )

    return send


def test_many_concurrent_exports_are_refused_with_retry_info() -> None:
    # grpc's own concurrency limit answers RESOURCE_EXHAUSTED without RetryInfo, which the
    # OpenTelemetry Collector's exporter treats as permanent (data dropped). With 40 Exports
    # admitted and waiting for a (blocked) commit, 60 more must still reach admission control.
    store = BlockingStore()
    gen = _start(store, max_pending_spans=41, retry_after_s=2.0)
    r = next(gen)
    outcomes: list[tuple[grpc.StatusCode, float | None]] = []
    send = _send_collecting(r, outcomes, first=100)

    try:
        first = threading.Thread(target=send, args=(-1,))
        first.start()
        assert store.writing.wait(10)  # the writer holds this one; the next 40 queue behind it
        senders = [threading.Thread(target=send, args=(i,)) for i in range(100)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 20
        while len(outcomes) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        store.release.set()
        for sender in [first, *senders]:
            sender.join(30)
        refused = [o for o in outcomes if o[0] != grpc.StatusCode.OK]
        assert len(outcomes) == 101 and refused
        assert set(refused) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, 2.0)}
    finally:
        store.release.set()
        gen.close()


def test_calls_beyond_the_queue_limit_are_refused_with_retry_info() -> None:
    # 2 handler threads, at most 4 calls outstanding: with the commit blocked, the 3 admitted
    # Exports hold both threads and one queue place; of 30 more, every one beyond the limit is
    # refused at once by the receiver (RetryInfo), not by grpc's bare concurrency limit
    store = BlockingStore()
    gen = _start(
        store,
        max_pending_spans=1000,
        retry_after_s=2.0,
        grpc_options={"workers": 2, "max_concurrent_rpcs": 4},
    )
    r = next(gen)
    outcomes: list[tuple[grpc.StatusCode, float | None]] = []
    send = _send_collecting(r, outcomes, first=300)

    try:
        first = threading.Thread(target=send, args=(-1,))
        first.start()
        assert store.writing.wait(10)
        senders = [threading.Thread(target=send, args=(i,)) for i in range(30)]
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 20
        while len(outcomes) < 27 and time.monotonic() < deadline:
            time.sleep(0.05)
        store.release.set()
        for sender in [first, *senders]:
            sender.join(30)
        refused = [o for o in outcomes if o[0] != grpc.StatusCode.OK]
        assert len(outcomes) == 31 and len(refused) >= 27
        assert set(refused) == {(grpc.StatusCode.RESOURCE_EXHAUSTED, 2.0)}
        assert r.pipeline.stats.rejected_overloaded == len(refused)
    finally:
        store.release.set()
        gen.close()


def test_a_slow_http_upload_holds_only_what_it_sent() -> None:
    # found in review: reserving the declared Content-Length up front let one connection that
    # declared 64 MiB and sent 2 bytes block every other Export with 429
    import socket

    gen = _start(DuckDBSpanStore(":memory:"), max_message_bytes=64 << 20)
    r = next(gen)
    host, port = r.http_url.split("//")[1].split("/")[0].split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=10) as slow:
            slow.sendall(
                b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
                b"Content-Length: " + str(64 << 20).encode() + b"\r\n\r\n\x0a\x00"
            )
            time.sleep(0.3)
            reply = httpx.post(
                r.http_url,
                content=make_request(1, first=900),
                headers={"content-type": "application/x-protobuf"},
                timeout=10,
            )
            assert reply.status_code == 200
    finally:
        gen.close()


def test_busy_refusal_still_checks_the_token() -> None:
    store = BlockingStore()
    pipeline = IngestPipeline(store)
    receiver = GrpcReceiver(pipeline, port=0, api_token="s3cret", workers=1, max_concurrent_rpcs=1)
    port = receiver.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(EXPORT_METHOD)
    try:
        held = threading.Thread(
            target=lambda: call(make_request(1), timeout=20, metadata=(("authorization", "Bearer s3cret"),))
        )
        held.start()
        assert store.writing.wait(10)  # the one call allowed is in progress
        with pytest.raises(grpc.RpcError) as wrong:
            call(make_request(1, first=5), timeout=10, metadata=(("authorization", "Bearer nope"),))
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as busy:
            call(make_request(1, first=6), timeout=10, metadata=(("authorization", "Bearer s3cret"),))
        assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and _retry_delay_s(busy.value) > 0
        store.release.set()
        held.join(10)
    finally:
        store.release.set()
        channel.close()
        receiver.stop(1)
        pipeline.close(10)
        store.close()


def test_undecoded_request_bytes_are_bounded() -> None:
    refusals: list[int] = []
    budget = UndecodedBytes(100, retry_after_s=3.0, on_refuse=lambda: refusals.append(1))
    with budget.hold(250):  # bigger than the limit, but nothing else held: let through
        with pytest.raises(Overloaded) as refused, budget.hold(1):
            pass
        assert refused.value.retry_after_s == 3.0
    with budget.hold(60), budget.hold(40):
        assert budget.held == 100
    assert budget.held == 0
    assert refusals == [1]  # counted as an overload refusal


def test_failed_commit_is_not_acknowledged() -> None:
    gen = _start(FailingStore(":memory:"))
    r = next(gen)
    try:
        with pytest.raises(grpc.RpcError) as err:
            r.export(make_request(2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "disk full" in (err.value.details() or "")
        reply = httpx.post(
            r.http_url,
            content=make_request(2),
            headers={"content-type": "application/x-protobuf"},
            timeout=10,
        )
        assert reply.status_code == 503 and "retry-after" in reply.headers
    finally:
        gen.close()


def test_bearer_token_required_when_configured() -> None:
    gen = _start(DuckDBSpanStore(":memory:"), token="s3cret")
    r = next(gen)
    try:
        with pytest.raises(grpc.RpcError) as err:
            r.export(make_request(1))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError):
            r.export(make_request(1), metadata=(("authorization", "Bearer wrong"),))
        r.export(make_request(1), metadata=(("authorization", "Bearer s3cret"),))
        headers = {"content-type": "application/x-protobuf"}
        assert httpx.post(r.http_url, content=make_request(1, first=5), headers=headers).status_code == 401
        ok = httpx.post(
            r.http_url,
            content=make_request(1, first=5),
            headers={**headers, "authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        assert r.store.stats().spans == 2
    finally:
        gen.close()


# -- HTTP --------------------------------------------------------------------------------------


def test_http_protobuf_gzip_and_partial_success(receivers: Receivers) -> None:
    body = gzip.compress(make_request(4, bad_ids=1))
    reply = httpx.post(
        receivers.http_url,
        content=body,
        headers={"content-type": "application/x-protobuf", "content-encoding": "gzip"},
        timeout=10,
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "application/x-protobuf"
    response = trace_service_pb2.ExportTraceServiceResponse.FromString(reply.content)
    assert response.partial_success.rejected_spans == 1
    assert receivers.store.stats().spans == 4


def test_http_json(receivers: Receivers) -> None:
    obj = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "js"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "name": "GET",
                                "kind": 2,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                            },
                            {"traceId": "zzz", "spanId": "eee19b7ec3c1b175", "name": "bad"},
                        ]
                    }
                ],
            }
        ]
    }
    reply = httpx.post(receivers.http_url, json=obj, timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("application/json")
    partial = reply.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1" and "traceId" in partial["errorMessage"]
    assert receivers.store.services() == ["js"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "phrase"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", {"content-type": "application/x-protobuf"}, 400, "not an OTLP"),
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (
            json.dumps({"resourceSpans": 5}).encode(),
            {"content-type": "application/json"},
            400,
            "expected a list",
        ),
        (
            gzip.compress(make_request(50))[:-30],
            {"content-type": "application/x-protobuf", "content-encoding": "gzip"},
            400,
            "truncated",
        ),
        (
            b"not gzip at all",
            {"content-type": "application/x-protobuf", "content-encoding": "gzip"},
            400,
            "gzip",
        ),
        (make_request(1), {"content-type": "text/plain"}, 415, "unsupported content type"),
        (make_request(30_000), {"content-type": "application/x-protobuf"}, 413, "limit"),
        (
            gzip.compress(b"\x00" * (2 << 20)),
            {"content-type": "application/x-protobuf", "content-encoding": "gzip"},
            413,
            "decompressed",
        ),
    ],
)
def test_http_bad_requests_get_clear_errors(
    receivers: Receivers, body: bytes, headers: dict[str, str], status: int, phrase: str
) -> None:
    receivers.export(make_request(2))
    reply = httpx.post(receivers.http_url, content=body, headers=headers, timeout=10)
    assert reply.status_code == status
    if headers["content-type"] == "application/json":
        message = reply.json()["message"]
    else:
        message = status_pb2.Status.FromString(reply.content).message
    assert phrase in message
    ok = httpx.post(
        receivers.http_url,
        content=make_request(1, first=9),
        headers={"content-type": "application/x-protobuf"},
        timeout=10,
    )
    assert ok.status_code == 200
    assert receivers.store.stats().spans == 3  # nothing stored was lost, the server keeps serving


def test_http_wrong_method(receivers: Receivers) -> None:
    assert httpx.get(receivers.http_url, timeout=10).status_code == 405


# -- the pipeline ------------------------------------------------------------------------------


def test_group_commit_batches_concurrent_requests() -> None:
    from hourglass.collector.decode import decode_export_request

    store = BlockingStore()
    pipeline = IngestPipeline(store)
    try:
        futures = [pipeline.submit(decode_export_request(make_request(3)).table)]
        assert store.writing.wait(10)  # the writer is busy with the first request
        futures += [
            pipeline.submit(decode_export_request(make_request(3, first=1 + 10 * i)).table)
            for i in range(1, 6)
        ]
        store.release.set()
        assert [f.result(10) for f in futures] == [3] * 6
        # the first request went alone (the writer was idle), the five queued behind it shared one commit
        assert pipeline.stats.committed_batches == 2
        assert store.stats().spans == 18
    finally:
        store.release.set()
        pipeline.close()
        store.close()


def test_exports_while_shutting_down_are_unavailable_with_retry_advice() -> None:
    # both receivers answer through the one Export core: a closing pipeline is UNAVAILABLE with
    # RetryInfo on gRPC (it escaped as UNKNOWN before the core) and 503 with Retry-After on HTTP
    gen = _start(DuckDBSpanStore(":memory:"))
    r = next(gen)
    try:
        r.pipeline.close(10)
        with pytest.raises(grpc.RpcError) as err:
            r.export(make_request(1))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (err.value.details() or "")
        assert _retry_delay_s(err.value) == 5.0
        reply = httpx.post(
            r.http_url,
            content=make_request(1),
            headers={"content-type": "application/x-protobuf"},
            timeout=10,
        )
        assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
        assert status_pb2.Status.FromString(reply.content).code == 14
        assert r.store.stats().spans == 0
    finally:
        gen.close()


def test_close_commits_queued_then_refuses() -> None:
    from hourglass.collector.decode import decode_export_request

    store = DuckDBSpanStore(":memory:")
    pipeline = IngestPipeline(store)
    futures = [
        pipeline.submit(decode_export_request(make_request(2, first=1 + 10 * i)).table) for i in range(4)
    ]
    pipeline.close()
    assert all(f.result(1) == 2 for f in futures)
    with pytest.raises(IngestClosed):
        pipeline.submit(decode_export_request(make_request(1, first=99)).table)
    with pytest.raises(IngestClosed):
        pipeline.check_capacity()
    assert store.stats().spans == 8
    store.close()


def test_pipeline_overload_is_immediate_and_bounded() -> None:
    from hourglass.collector.decode import decode_export_request

    store = BlockingStore()
    pipeline = IngestPipeline(store, max_pending_spans=10, retry_after_s=0.5)
    try:
        pipeline.submit(decode_export_request(make_request(8)).table)
        with pytest.raises(Overloaded) as err:
            pipeline.submit(decode_export_request(make_request(5, first=20)).table)
        assert err.value.retry_after_s == 0.5
        assert pipeline.stats.pending_spans == 8
    finally:
        store.release.set()
        pipeline.close()
        store.close()
