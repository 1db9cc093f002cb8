"""Issue 15: `hourglass serve` against hostile clients, as users run it (the real CLI in a
subprocess, the real SDK exporters over TLS, raw sockets on loopback), with small timeouts so
every test is bounded to a few seconds.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

from bench.ingest import retry_delay
from hourglass.api.app import create_app
from hourglass.api.serve import _warn_about_exposure
from hourglass.api.settings import Settings
from hourglass.collector.duckdb_store import DuckDBSpanStore
from tests.api.test_serve import EXPORT_METHOD, _emit, _kill

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[2]


# -- a throwaway CA, server and client certificates ------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: Any,
    *,
    ca: bool,
    san: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )  # fmt: skip
    if issuer_key is not None:  # urllib3 verifies strictly (X509_STRICT): leaves name their issuer's key
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if san:
        import ipaddress

        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("hourglass test CA", ca_key, None, None, ca=True, san=False)
    server_key, client_key = _key(), _key()
    server = _cert("127.0.0.1", server_key, ca.subject, ca_key, ca=False, san=True)
    client = _cert("exporter", client_key, ca.subject, ca_key, ca=False, san=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.crt").write_bytes(server.public_bytes(pem))
    (folder / "client.crt").write_bytes(client.public_bytes(pem))
    return Pki(
        folder / "ca.crt",
        folder / "server.crt",
        _write_key(server_key, folder / "server.key"),
        folder / "client.crt",
        _write_key(client_key, folder / "client.key"),
    )


# -- serve in a subprocess ---------------------------------------------------------------------------


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    log: Path
    grpc: str
    http: str
    api: str

    @property
    def pid(self) -> int:
        return self.process.pid


def start(tmp: Path, *flags: str, env: dict[str, str] | None = None, verify: Any = True) -> Serve:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HOURGLASS_", "ANTHROPIC_"))}
    log = tmp / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "hourglass",
        "serve",
        "--db",
        str(tmp / "spans.duckdb"),
        "--host",
        "127.0.0.1",
    ]
    cmd += ["--grpc-port", "0", "--http-port", "0", "--api-port", "0", *flags]
    with log.open("ab") as out:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env={**base, **(env or {})}, stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            found = [
                re.search(rf"{what} listening on (\S+)", text)
                for what in ("OTLP/gRPC", "OTLP/HTTP", "REST API")
            ]
            if all(found):
                grpc_at, http_at, api_at = (m.group(1) for m in found if m)
                try:
                    if httpx.get(f"{api_at}/healthz", timeout=5, verify=verify).status_code == 200:
                        return Serve(process, log, grpc_at, http_at, api_at)
                except httpx.HTTPError:
                    pass
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}:\n{text}")
            time.sleep(0.1)
        raise RuntimeError(f"serve did not start:\n{log.read_text(errors='replace')}")
    except BaseException:
        _kill(process)
        raise


@pytest.fixture
def stop_after() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        _kill(serve.process)


def _spans(serve: Serve, verify: Any = True) -> int:
    return int(httpx.get(f"{serve.api}/v1/stats", timeout=10, verify=verify).json()["spans"])


# -- 15.2: TLS with the SDK's real exporters ----------------------------------------------------------


def test_tls_and_mutual_tls_with_the_real_exporters(
    pki: Pki, tmp_path: Path, stop_after: list[Serve], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):  # requests prefers these to verify=
        monkeypatch.delenv(variable, raising=False)
    serve = start(
        tmp_path,
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
        verify=ssl.create_default_context(cafile=str(pki.ca)),
    )  # fmt: skip
    stop_after.append(serve)
    assert serve.http.startswith("https://") and serve.api.startswith("https://")
    ca, cert, key = pki.ca.read_bytes(), pki.client_cert.read_bytes(), pki.client_key.read_bytes()
    # exporters with a client certificate signed by the CA: every span stored
    _emit(
        GrpcExporter(
            endpoint=serve.grpc, credentials=grpc.ssl_channel_credentials(ca, key, cert), timeout=10
        ),
        "via-grpc-mtls",
    )
    _emit(
        HttpExporter(
            endpoint=serve.http,
            certificate_file=str(pki.ca),
            client_certificate_file=str(pki.client_cert),
            client_key_file=str(pki.client_key),
            timeout=10,
        ),
        "via-http-mtls",
    )
    assert _spans(serve, verify=ssl.create_default_context(cafile=str(pki.ca))) == 8
    # without a client certificate, or in clear text, nothing gets in
    _emit(
        GrpcExporter(endpoint=serve.grpc, credentials=grpc.ssl_channel_credentials(ca), timeout=2), "no-cert"
    )
    _emit(HttpExporter(endpoint=serve.http, certificate_file=str(pki.ca), timeout=2), "no-cert")
    _emit(GrpcExporter(endpoint=serve.grpc, insecure=True, timeout=2), "clear-text")
    with pytest.raises(httpx.HTTPError):
        httpx.get(serve.api.replace("https://", "http://") + "/healthz", timeout=5)
    assert _spans(serve, verify=ssl.create_default_context(cafile=str(pki.ca))) == 8
    assert "TLS on all three ports" in serve.log.read_text()


def test_tls_file_problems_are_one_line_and_exit_2(pki: Pki, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "hourglass", "serve", "--db", str(tmp_path / "x.duckdb")]
    cases = [
        (["--tls-cert", str(pki.server_cert)], "go together"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.server_key)], "cannot read"),
        (["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)], "not a matching"),
    ]
    for flags, phrase in cases:
        result = subprocess.run(base + flags, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2, result.stderr
        assert phrase in result.stderr and "Traceback" not in result.stderr


def test_a_non_loopback_address_without_token_or_tls_is_warned_about(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _warn_about_exposure(Settings(host="0.0.0.0", api_token=None, tls_cert=None))
    out = capsys.readouterr().out
    assert "WARNING" in out and "HOURGLASS_API_TOKEN" in out and "--tls-cert" in out
    _warn_about_exposure(Settings(host="0.0.0.0", api_token="t", tls_cert="c.pem"))
    _warn_about_exposure(Settings(host="127.0.0.1", api_token=None, tls_cert=None))
    assert capsys.readouterr().out == ""


# -- 15.4: idle and slow connections, the concurrency limit ----------------------------------------------


def _open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(4096) == b"" or True  # data (a 408/400) then close also counts below
    except TimeoutError:
        return False
    except OSError:
        return True


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.split("://")[-1].split("/")[0].rsplit(":", 1)
    return host, int(port)


def test_idle_and_slow_connections_are_closed_and_the_limit_holds(
    tmp_path: Path, stop_after: list[Serve]
) -> None:
    env = {
        "HOURGLASS_HEADER_TIMEOUT": "1s",
        "HOURGLASS_BODY_TIMEOUT": "1.5s",
        "HOURGLASS_KEEPALIVE_TIMEOUT": "1s",
        "HOURGLASS_MAX_CONNECTIONS": "30",
        "HOURGLASS_GRPC_MAX_IDLE": "1s",
    }
    serve = start(tmp_path, env=env)
    stop_after.append(serve)
    api, otlp_http, otlp_grpc = _hostport(serve.api), _hostport(serve.http), _hostport(f"x://{serve.grpc}")
    time.sleep(0.5)
    baseline = _open_files(serve.pid)

    # the concurrency limit: with 30 connections open, a request is answered 503 at once
    held = [socket.create_connection(api, timeout=5) for _ in range(30)]
    with httpx.Client(timeout=10) as client:
        assert client.get(f"{serve.api}/healthz").status_code == 503
    for sock in held:
        sock.close()

    idle = [
        socket.create_connection(target, timeout=5)
        for target in (api, otlp_http, otlp_grpc)
        for _ in range(60)
    ]
    slow_head = [
        socket.create_connection(target, timeout=5) for target in (api, otlp_http) for _ in range(15)
    ]
    slow_body = [socket.create_connection(otlp_http, timeout=5) for _ in range(10)]
    head = b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
    for sock in slow_body:
        sock.sendall(head + b"Content-Length: 100000\r\n\r\n")
    held_at = time.monotonic()
    while _open_files(serve.pid) <= baseline + 100 and time.monotonic() - held_at < 0.8:
        time.sleep(0.05)
    assert _open_files(serve.pid) > baseline + 100  # the server really holds them now

    started = time.monotonic()
    broken: set[int] = set()
    position = 0
    while time.monotonic() - started < 4.0:  # one byte per 0.2 s: a slow-loris
        for sock in slow_head + slow_body:
            if sock.fileno() in broken:
                continue
            try:
                sock.send(
                    (b"X-Slow: " + b"a" * 50)[position % 58 : position % 58 + 1]
                    if sock in slow_head
                    else b"0"
                )
            except OSError:
                broken.add(sock.fileno())
        position += 1
        time.sleep(0.2)
    assert len(broken) == len(slow_head) + len(slow_body), "slow senders were not cut off"
    assert all(_closed_by_peer(sock) for sock in idle)
    deadline = time.monotonic() + 10
    while _open_files(serve.pid) > baseline + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _open_files(serve.pid) <= baseline + 5
    for sock in idle + slow_head + slow_body:
        sock.close()
    # and ordinary clients are served as before
    assert httpx.get(f"{serve.api}/healthz", timeout=10).status_code == 200
    _emit(GrpcExporter(endpoint=serve.grpc, insecure=True, timeout=10), "after")
    _emit(HttpExporter(endpoint=serve.http, timeout=10), "after")
    assert _spans(serve) == 8
    # a gRPC connection with no call for HOURGLASS_GRPC_MAX_IDLE is closed by the server (GOAWAY)
    # each state with the time the channel reported it (not when this thread got to look: on a
    # loaded machine that can be late, and the idle time would look shorter than it was)
    states: list[tuple[grpc.ChannelConnectivity, float]] = []
    with grpc.insecure_channel(serve.grpc) as channel:
        channel.subscribe(lambda state: states.append((state, time.monotonic())), try_to_connect=True)
        grpc.channel_ready_future(channel).result(timeout=10)
        waited = time.monotonic()
        while states[-1][0] is grpc.ChannelConnectivity.READY and time.monotonic() - waited < 6:
            time.sleep(0.1)
        assert states[-1][0] is grpc.ChannelConnectivity.IDLE, states
        ready_at = max(at for state, at in states if state is grpc.ChannelConnectivity.READY)
        assert states[-1][1] - ready_at >= 0.9, states


# -- 15.3: many concurrent large Exports: refused with RetryInfo, memory bounded -----------------------


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


def test_concurrent_large_exports_are_bounded_before_they_are_read(
    tmp_path: Path, stop_after: list[Serve]
) -> None:
    message_limit = 16 << 20
    budget = 16 << 20  # one message at a time: most of the 32 wait longer than they may, and are refused
    serve = start(
        tmp_path,
        "--max-message-bytes",
        str(message_limit),
        env={"HOURGLASS_RECEIVE_BUDGET_BYTES": str(budget)},
    )
    stop_after.append(serve)
    before = _peak_rss_kib(serve.pid)
    size = 12 << 20  # one ResourceSpans field whose content is not a message: refused after it is read
    request = b"\x0a" + _varint(size) + b"\x00" * size
    # 96 calls that each reserve the whole budget are read one after another: ~0.5 s or more even on
    # a fast, quiet machine, so the later ones wait past the 0.25 s limit whatever the machine's speed
    # (with 32, a quiet machine read them all within the limit and nothing was refused)
    calls = 96
    codes: list[tuple[grpc.StatusCode, float | None]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(calls)

    def send() -> None:
        with grpc.insecure_channel(
            serve.grpc, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            call = channel.unary_unary(EXPORT_METHOD)
            barrier.wait()
            try:
                call(request, timeout=60)
                result: tuple[grpc.StatusCode, float | None] = (grpc.StatusCode.OK, None)
            except grpc.RpcError as err:
                result = (err.code(), retry_delay(err))
        with lock:
            codes.append(result)

    threads = [threading.Thread(target=send) for _ in range(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [delay for code, delay in codes if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    growth_mib = (_peak_rss_kib(serve.pid) - before) / 1024
    print(f"refused {len(refused)} of {calls}; serve grew by {growth_mib:.0f} MiB")
    assert len(codes) == calls
    assert refused and all(delay is not None and delay > 0 for delay in refused), codes
    assert {code for code, _ in codes} <= {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
    # unbounded, the 96 reads held over 1 GiB at once (and grpc's copies of them); with a 16 MiB
    # budget one 16 MiB reservation is read at a time (each read is copied once by grpc)
    assert growth_mib < 128, f"serve grew by {growth_mib:.0f} MiB"
    assert httpx.get(f"{serve.api}/healthz", timeout=10).status_code == 200


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


# -- 15.7: a corrupt store, a full disk --------------------------------------------------------------------


def test_a_corrupt_store_is_one_line_naming_the_file_for_serve_and_the_cli(tmp_path: Path) -> None:
    db = tmp_path / "corrupt.duckdb"
    with DuckDBSpanStore(str(db)):
        pass
    data = bytearray(db.read_bytes())
    data[4096:8192] = os.urandom(4096)  # the database header blocks
    db.write_bytes(bytes(data))
    for command in (
        ["serve", "--db", str(db), "--grpc-port", "0", "--http-port", "0", "--api-port", "0"],
        ["analyze", "--db", str(db)],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "hourglass", *command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert str(db) in lines[0] and "move it aside" in lines[0]
        assert "Traceback" not in result.stderr + result.stdout


class _FullDiskStore:
    """A store whose reads fail as DuckDB's do when staged rows cannot be written: disk full."""

    def __init__(self, inner: DuckDBSpanStore) -> None:
        self._inner = inner

    def stats(self) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "spans.duckdb.wal")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_reads_while_the_disk_is_full_answer_503_with_retry_after() -> None:
    with DuckDBSpanStore(":memory:") as inner:
        app = create_app(_FullDiskStore(inner), settings=Settings(api_token=None), start_analysis=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            reply = client.get("/v1/stats")
    assert reply.status_code == 503
    assert int(reply.headers["retry-after"]) > 0
    assert "disk is full" in reply.json()["detail"]


def test_deeply_nested_api_bodies_are_400() -> None:
    with DuckDBSpanStore(":memory:") as store:
        app = create_app(store, settings=Settings(api_token=None), start_analysis=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            body = b"[" * 100_000 + b"]" * 100_000
            reply = client.post("/v1/analyses", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400
    assert "nested" in reply.json()["detail"]


def test_deeply_nested_json_files_are_one_clear_line_for_the_cli(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text('{"resourceSpans":' + "[" * 100_000 + "]" * 100_000 + "}")
    for command in (["diff", str(deep), str(deep)], ["analyze", str(deep)]):
        result = subprocess.run(
            [sys.executable, "-m", "hourglass", *command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert f"{deep}:" in result.stderr and "nested" in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
