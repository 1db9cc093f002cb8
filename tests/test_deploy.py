"""deploy/ agrees with the code: ports, endpoints, health paths, non-root image, trace-ID routing.

Docker and Kubernetes do not run here, so the files are parsed (YAML, and the Dockerfile's
instructions) and checked against ``hourglass.api.settings.Settings`` defaults, the app's ``/healthz`` route
and ``hourglass serve``'s flags; the image's health-check script is run against a real server.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import uvicorn
import yaml

from hourglass.api.app import create_app
from hourglass.api.settings import SETTING_ENV_VARS, Settings
from hourglass.collector.duckdb_store import DuckDBSpanStore

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
HOURGLASS = Path(sys.executable).with_name("hourglass")


@pytest.fixture(scope="module")
def defaults() -> Settings:
    """Settings as the code defines them, unaffected by this machine's HOURGLASS_* variables."""
    saved = {name: os.environ.pop(name) for name in SETTING_ENV_VARS.values() if name in os.environ}
    try:
        return Settings()
    finally:
        os.environ.update(saved)


def _ports(settings: Settings) -> dict[str, int]:
    return {"grpc": settings.grpc_port, "http": settings.http_port, "api": settings.api_port}


# --------------------------------------------------------------------------- Dockerfile


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def _exec_form(args: str) -> list[str]:
    parsed = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert isinstance(parsed, list)
    return [str(a) for a in parsed]


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in instructions:
        if keyword == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return parse_dockerfile(DEPLOY / "Dockerfile")


def test_image_base_user_ports_and_volume(dockerfile: list[tuple[str, str]], defaults: Settings) -> None:
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in dockerfile:
        by_keyword.setdefault(keyword, []).append(args)
    assert by_keyword["FROM"] == ["python:3.11-slim"]

    user = by_keyword["USER"][-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert "useradd" in " ".join(by_keyword["RUN"]) and "10001" in " ".join(by_keyword["RUN"])

    exposed = {int(p.split("/")[0]) for args in by_keyword["EXPOSE"] for p in args.split()}
    assert exposed == set(_ports(defaults).values())

    env = _env(dockerfile)
    assert env["HOURGLASS_GRPC_PORT"] == str(defaults.grpc_port)
    assert env["HOURGLASS_HTTP_PORT"] == str(defaults.http_port)
    assert env["HOURGLASS_API_PORT"] == str(defaults.api_port)
    assert env["HOURGLASS_HOST"] == "0.0.0.0"
    volumes = {v for args in by_keyword["VOLUME"] for v in _exec_form(args)}
    db_dir = str(PurePosixPath(env["HOURGLASS_DB"]).parent)
    assert db_dir in volumes, f"the store {env['HOURGLASS_DB']} must live on a VOLUME ({volumes})"

    command = _exec_form(by_keyword["ENTRYPOINT"][-1]) + _exec_form(by_keyword["CMD"][-1])
    assert command[:2] == ["hourglass", "serve"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert PurePosixPath(command[command.index("--db") + 1]).parent == PurePosixPath(db_dir)


def test_image_copies_files_that_exist(dockerfile: list[tuple[str, str]]) -> None:
    for keyword, args in dockerfile:
        if keyword == "COPY":
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"


def test_healthcheck_calls_the_health_route(dockerfile: list[tuple[str, str]]) -> None:
    healthcheck = [args for keyword, args in dockerfile if keyword == "HEALTHCHECK"]
    assert len(healthcheck) == 1
    _, _, cmd = healthcheck[0].partition("CMD")
    command = _exec_form(cmd.strip())
    copies = {
        shlex.split(args)[-1]: shlex.split(args)[0] for keyword, args in dockerfile if keyword == "COPY"
    }
    script = next(arg for arg in command if arg in copies)
    assert copies[script] == "deploy/healthcheck.py"

    source = (DEPLOY / "healthcheck.py").read_text()
    assert 'HEALTH_PATH = "/healthz"' in source
    routes = {getattr(r, "path", None) for r in create_app(DuckDBSpanStore(":memory:")).routes}
    assert "/healthz" in routes


@pytest.fixture()
def running_api() -> Iterator[int]:
    """The real app on a free loopback port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    store = DuckDBSpanStore(":memory:")
    server = uvicorn.Server(uvicorn.Config(create_app(store), log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        store.close()


def _run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOURGLASS_API_PORT": str(port)}
    return subprocess.run(
        [sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True, text=True, timeout=20
    )


@pytest.mark.timeout(60)
def test_healthcheck_script_against_a_real_server(running_api: int) -> None:
    assert _run_healthcheck(running_api).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    failed = _run_healthcheck(closed_port)
    assert failed.returncode == 1 and "/healthz" in failed.stderr


@pytest.mark.timeout(60)
def test_serve_accepts_the_flags_the_deployments_use() -> None:
    help_text = subprocess.run(
        [str(HOURGLASS), "serve", "--help"], capture_output=True, text=True, timeout=30
    ).stdout
    for flag in ("--host", "--db", "--grpc-port", "--http-port", "--api-port"):
        assert flag in help_text, f"`hourglass serve` has no {flag} flag"


# --------------------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return document


def _hourglass_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "deploy/Dockerfile"
    }


def _collector_pipeline_checks(config: dict[str, Any]) -> dict[str, Any]:
    traces = config["service"]["pipelines"]["traces"]
    assert "otlp" in traces["receivers"]
    assert traces["exporters"] == ["loadbalancing"], "every span must go through the trace-ID load balancer"
    loadbalancing: dict[str, Any] = config["exporters"]["loadbalancing"]
    assert loadbalancing["routing_key"] == "traceID"
    assert "otlp" in loadbalancing["protocol"]
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317")
    assert protocols["http"]["endpoint"].endswith(":4318")
    return loadbalancing


def test_compose_collector_routes_by_trace_id_to_every_replica(
    compose: dict[str, Any], defaults: Settings
) -> None:
    replicas = _hourglass_services(compose)
    assert len(replicas) >= 2, "several replicas, each seeing whole traces"
    collector = compose["services"]["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    config_arg = next(a for a in collector["command"] if a.startswith("--config="))
    config_path = config_arg.split("=", 1)[1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in collector["volumes"]}
    assert mounts[config_path] == "./otel-collector.yaml"
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    loadbalancing = _collector_pipeline_checks(config)
    hostnames = set(loadbalancing["resolver"]["static"]["hostnames"])
    assert hostnames == {f"{name}:{defaults.grpc_port}" for name in replicas}
    published = {p.split(":")[0] for p in collector["ports"]}
    assert {"4317", "4318"} <= published
    assert set(collector["depends_on"]) == set(replicas)
    assert all(dep["condition"] == "service_healthy" for dep in collector["depends_on"].values())


def test_compose_replicas_have_their_own_store_and_default_ports(
    compose: dict[str, Any], defaults: Settings
) -> None:
    volumes_seen = set()
    api_host_ports = set()
    for name, svc in _hourglass_services(compose).items():
        env = svc["environment"]
        assert env["HOURGLASS_GRPC_PORT"] == str(defaults.grpc_port), name
        assert env["HOURGLASS_HTTP_PORT"] == str(defaults.http_port), name
        assert env["HOURGLASS_API_PORT"] == str(defaults.api_port), name
        assert env["HOURGLASS_HOST"] == "0.0.0.0", name
        db_dir = str(PurePosixPath(env["HOURGLASS_DB"]).parent)
        (volume,) = [v.split(":")[0] for v in svc["volumes"] if v.split(":")[1] == db_dir]
        assert volume in compose["volumes"], f"{name}: named volume {volume} is not declared"
        volumes_seen.add(volume)
        host_port, container_port = svc["ports"][0].split(":")
        assert int(container_port) == defaults.api_port
        api_host_ports.add(host_port)
    replicas = len(_hourglass_services(compose))
    assert len(volumes_seen) == replicas, "each replica needs its own store volume"
    assert len(api_host_ports) == replicas


def _mount(svc: dict[str, Any], target: str) -> str:
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    return mounts[target]


def test_compose_grafana_has_a_jaeger_data_source_per_replica(
    compose: dict[str, Any], defaults: Settings
) -> None:
    """Grafana reads each replica's Jaeger query API (a trace lives on one replica: routed by trace
    ID), and the paths its Jaeger data source calls are routes of the app."""
    from fastapi.routing import APIRoute

    replicas = _hourglass_services(compose)
    grafana = compose["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana:")
    provisioning = DEPLOY / _mount(grafana, "/etc/grafana/provisioning")
    config = yaml.safe_load((provisioning / "datasources" / "hourglass.yaml").read_text())
    jaeger = [d for d in config["datasources"] if d["type"] == "jaeger"]
    urls = {d["url"] for d in jaeger}
    assert urls == {f"http://{name}:{defaults.api_port}" for name in replicas}
    assert all(d["access"] == "proxy" for d in jaeger)
    assert len({d["uid"] for d in config["datasources"]}) == len(config["datasources"])
    assert set(grafana["depends_on"]) >= set(replicas)

    class _NoStore:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("the route table must not touch the store")

    routes = {r.path for r in create_app(_NoStore()).routes if isinstance(r, APIRoute)}  # type: ignore[arg-type]
    grafana_paths = {
        "/api/services",
        "/api/services/{service}/operations",
        "/api/traces",
        "/api/traces/{trace_id}",
    }
    assert grafana_paths | {"/api/operations", "/api/dependencies", "/metrics"} <= routes


def test_compose_prometheus_scrapes_every_replica(compose: dict[str, Any], defaults: Settings) -> None:
    replicas = _hourglass_services(compose)
    prometheus = compose["services"]["prometheus"]
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    source = _mount(prometheus, config_arg.split("=", 1)[1])
    config = yaml.safe_load((DEPLOY / source).read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{defaults.api_port}" for name in replicas}
    grafana = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/hourglass.yaml").read_text())
    [prometheus_source] = [d for d in grafana["datasources"] if d["type"] == "prometheus"]
    published = prometheus["ports"][0].split(":")[1]
    assert prometheus_source["url"] == f"http://prometheus:{published}"


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def k8s() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_k8s_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    manifests = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_k8s_statefulset_probes_ports_and_storage(k8s: list[dict[str, Any]], defaults: Settings) -> None:
    sts = _one(k8s, "StatefulSet", "hourglass")
    pod = sts["spec"]["template"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "otlp-grpc": defaults.grpc_port,
        "otlp-http": defaults.http_port,
        "api": defaults.api_port,
    }
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", probe
        assert ports.get(get["port"], get["port"]) == defaults.api_port, probe
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--host") + 1] == "0.0.0.0"
    db_dir = str(PurePosixPath(args[args.index("--db") + 1]).parent)
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[db_dir] in claims, "the store must live on the pod's persistent volume claim"


def test_k8s_collector_resolves_the_headless_service(k8s: list[dict[str, Any]], defaults: Settings) -> None:
    sts = _one(k8s, "StatefulSet", "hourglass")
    headless = _one(k8s, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    assert defaults.grpc_port in {p["port"] for p in headless["spec"]["ports"]}

    configmap = _one(k8s, "ConfigMap", "otel-collector-config")
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    loadbalancing = _collector_pipeline_checks(config)
    dns = loadbalancing["resolver"]["dns"]
    namespace = headless["metadata"]["namespace"]
    assert dns["hostname"] == f"{headless['metadata']['name']}.{namespace}.svc.cluster.local"
    assert int(dns["port"]) == defaults.grpc_port

    collector = _one(k8s, "Deployment", "otel-collector")
    (container,) = collector["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("otel/opentelemetry-collector-contrib:")
    config_path = PurePosixPath(
        next(a for a in container["args"] if a.startswith("--config=")).split("=", 1)[1]
    )
    volumes = {v["name"]: v for v in collector["spec"]["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert volumes[mount["name"]]["configMap"]["name"] == "otel-collector-config"
    assert config_path.name in configmap["data"]
    _one(k8s, "Namespace", namespace)


# --------------------------------------------------------------------------- token and TLS (issue 15.2)


def test_compose_replicas_and_collector_share_a_token_from_a_secret(compose: dict[str, Any]) -> None:
    secrets = compose["secrets"]
    for name, svc in _hourglass_services(compose).items():
        (secret,) = svc["secrets"]
        path = svc["environment"]["HOURGLASS_API_TOKEN_FILE"]
        assert path == f"/run/secrets/{secret}", name
        assert "HOURGLASS_API_TOKEN" not in svc["environment"], "no token value in the compose file"
        assert "file" in secrets[secret]
    collector = compose["services"]["otel-collector"]
    assert set(collector["secrets"]) == set(secrets)
    config = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    header = config["exporters"]["loadbalancing"]["protocol"]["otlp"]["headers"]["authorization"]
    (secret,) = secrets
    assert header == f"Bearer ${{file:/run/secrets/{secret}}}"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert str(PurePosixPath("deploy") / secrets[secret]["file"].removeprefix("./")) in ignored


def test_k8s_pods_and_collector_share_a_token_from_a_secret(k8s: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    (generated,) = kustomization["secretGenerator"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    key, _, source = generated["files"][0].partition("=")
    assert str(PurePosixPath("deploy/k8s") / source) in (ROOT / ".gitignore").read_text().splitlines()

    def token_ref(container: dict[str, Any]) -> dict[str, Any]:
        (env,) = [e for e in container["env"] if e["name"] == "HOURGLASS_API_TOKEN"]
        ref: dict[str, Any] = env["valueFrom"]["secretKeyRef"]
        return ref

    (pod,) = _one(k8s, "StatefulSet", "hourglass")["spec"]["template"]["spec"]["containers"]
    (collector,) = _one(k8s, "Deployment", "otel-collector")["spec"]["template"]["spec"]["containers"]
    for container in (pod, collector):
        assert token_ref(container) == {"name": generated["name"], "key": key}
    config = yaml.safe_load(_one(k8s, "ConfigMap", "otel-collector-config")["data"]["config.yaml"])
    header = config["exporters"]["loadbalancing"]["protocol"]["otlp"]["headers"]["authorization"]
    assert header == "Bearer ${env:HOURGLASS_API_TOKEN}"


def test_deploy_files_say_how_to_add_certificates() -> None:
    for path in (DEPLOY / "compose.yaml", DEPLOY / "k8s" / "hourglass.yaml", DEPLOY / "README.md"):
        text = path.read_text()
        assert "HOURGLASS_TLS_CERT" in text and "HOURGLASS_TLS_KEY" in text, path.name


def test_the_token_can_come_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-from-a-secret\n")
    monkeypatch.delenv("HOURGLASS_API_TOKEN", raising=False)
    monkeypatch.setenv("HOURGLASS_API_TOKEN_FILE", str(token_file))
    assert Settings().api_token == "s3cret-from-a-secret"
    token_file.write_text("")
    with pytest.raises(ValueError, match="empty"):
        Settings()
