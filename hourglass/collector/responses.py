"""What the receivers answer, serialized: the OTLP ``ExportTraceServiceResponse``, the
``google.rpc.Status`` error body (with ``RetryInfo`` when a retry is advised) and the standard
``grpc.health.v1`` health service. The receivers never touch protobuf messages themselves.
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

__all__ = [
    "RPC_CODE_INVALID_ARGUMENT",
    "RPC_CODE_RESOURCE_EXHAUSTED",
    "RPC_CODE_UNAUTHENTICATED",
    "RPC_CODE_UNAVAILABLE",
    "add_health_service",
    "export_response",
    "rpc_status",
    "status_details_with_retry",
]


def export_response(rejected: int = 0, error_message: str = "", *, as_json: bool = False) -> bytes:
    """An ``ExportTraceServiceResponse``; ``partial_success`` is set only when spans were rejected."""
    response = trace_service_pb2.ExportTraceServiceResponse()
    if rejected or error_message:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = error_message
    if as_json:
        return json.dumps(json_format.MessageToDict(response)).encode()
    return response.SerializeToString()


def rpc_status(
    code: int, message: str, *, retry_after_s: float | None = None, as_json: bool = False
) -> bytes:
    """A ``google.rpc.Status`` (the OTLP/HTTP error body), with ``RetryInfo`` when retry is advised.

    ``code`` is a ``google.rpc.Code`` number (3 INVALID_ARGUMENT, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE...).
    """
    status = status_pb2.Status(message=message)
    status.code = code
    if retry_after_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(retry_after_s * 1e9))
        status.details.add().Pack(retry)
    if as_json:
        return json.dumps(json_format.MessageToDict(status)).encode()
    return status.SerializeToString()


def status_details_with_retry(code: int, message: str, retry_after_s: float) -> bytes:
    """Bytes for gRPC trailing metadata ``grpc-status-details-bin`` (a Status holding RetryInfo)."""
    return rpc_status(code, message, retry_after_s=retry_after_s)


RPC_CODE_INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
RPC_CODE_RESOURCE_EXHAUSTED = code_pb2.RESOURCE_EXHAUSTED
RPC_CODE_UNAVAILABLE = code_pb2.UNAVAILABLE
RPC_CODE_UNAUTHENTICATED = code_pb2.UNAUTHENTICATED


def add_health_service(server: Any) -> Any:
    """Register the standard ``grpc.health.v1.Health`` service on a grpc server; returns the servicer."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(
        "opentelemetry.proto.collector.trace.v1.TraceService", health_pb2.HealthCheckResponse.SERVING
    )
    return servicer
