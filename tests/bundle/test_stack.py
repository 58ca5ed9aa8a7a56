"""The compose stack (docker-compose.yml, Dockerfile, otel/): checked without a Docker engine.

No Docker engine and no OpenTelemetry Collector binary run here, so:
- `docker-compose config -q` (Debian's docker-compose 1.29) parses the compose file;
- the rest is read statically: pinned images, health checks, files the compose mounts, the
  collector's pipelines and tail-sampling policies, Tempo's config, the Dockerfile;
- the `stablews` service's exact command and environment run here as a local process (the
  collector endpoint pointed at an OTLP receiver in the test), which proves the flags, the
  environment, the health check command and the trace export are right.
Not covered: image builds and pulls, containers starting, the collector and Tempo actually
accepting their configs, Grafana and Prometheus reading theirs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from otlp_receiver import OtlpHttpReceiver
from stablews.config import ENV_PREFIX, OPTIONS
from stablews.protocol import NORMAL_CAUSES, CloseCause
from support import hello_client, wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COLLECTOR = ROOT / "otel" / "collector.yaml"
TEMPO = ROOT / "otel" / "tempo.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# Services that cannot have a health check, and why (anything else must have one).
NO_HEALTHCHECK = {
    "otel-collector": "image FROM scratch: no shell, no HTTP client, no probe subcommand",
    "loadtest": "a client: no port to probe",
}
# A version tag: 1.2, v2.54.1, 3.11.10-slim-bookworm, 7.4.1-alpine; never latest.
VERSION_TAG = re.compile(r"^v?\d+(\.\d+)+(-[A-Za-z0-9][A-Za-z0-9.-]*)?$")


def load_yaml(path: Path) -> Any:
    with path.open() as fh:
        return yaml.safe_load(fh)


def services() -> dict[str, dict[str, Any]]:
    return load_yaml(COMPOSE)["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(repository path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


def repo_path(service: dict[str, Any], container_path: str) -> Path | None:
    """The repository file a container path of `service` is, through its bind mounts (longest prefix)."""
    best: tuple[int, Path] | None = None
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            rest = container_path[len(target):].lstrip("/")
            if best is None or len(target) > best[0]:
                best = (len(target), source / rest if rest else source)
    return None if best is None else best[1]


def image_tag(image: str) -> str:
    name = image.split("@")[0]
    return name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else ""


def host_port(url_or_address: str) -> tuple[str, int]:
    if "://" not in url_or_address:
        url_or_address = "//" + url_or_address
    parts = urlsplit(url_or_address)
    assert parts.hostname and parts.port, url_or_address
    return parts.hostname, parts.port


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1].split("/")[0]) for p in service.get("ports") or []}


def package_version() -> str:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["project"]["version"]


# --- the compose file -------------------------------------------------------------------------


def test_docker_compose_config_passes() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose not found: install the Debian package `docker-compose` (1.29)", pytrace=False)
    result = subprocess.run(
        [binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "config", "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stdout}{result.stderr}"


def test_every_image_is_pinned_to_a_version() -> None:
    for name, service in services().items():
        image = service.get("image")
        assert image, f"{name}: no image (a built service needs image: NAME:VERSION too)"
        tag = image_tag(image)
        assert VERSION_TAG.match(tag), f"{name}: image {image!r} is not pinned to a version tag"
        if "build" in service:
            assert image == f"stablews:{package_version()}", f"{name}: the built image's tag follows pyproject.toml"
    for line in DOCKERFILE.read_text().splitlines():
        if line.upper().startswith("FROM "):
            base = line.split()[1]
            assert VERSION_TAG.match(image_tag(base)), f"Dockerfile: base image {base!r} is not pinned"


def test_every_service_that_can_has_a_healthcheck() -> None:
    all_services = services()
    assert set(NO_HEALTHCHECK) <= set(all_services)
    for name, service in all_services.items():
        check = service.get("healthcheck") or {}
        if name in NO_HEALTHCHECK:
            if "build" in service or service.get("image", "").startswith("stablews:"):
                # The image's own HEALTHCHECK (the service's /readyz) would mark the container unhealthy.
                assert check.get("disable") is True, f"{name}: disable the image's HEALTHCHECK"
            else:
                assert not check.get("test"), f"{name}: has a health check now: remove it from NO_HEALTHCHECK"
            continue
        test = check.get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck without {key}"
        assert not any("localhost" in part for part in test), f"{name}: probe 127.0.0.1 (localhost may be ::1)"


def test_depends_on_healthy_only_on_services_with_a_healthcheck() -> None:
    all_services = services()
    for name, service in all_services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on as a mapping with conditions"
        for other, rule in depends.items():
            assert other in all_services, f"{name} depends on unknown service {other}"
            if rule.get("condition") == "service_healthy":
                assert (all_services[other].get("healthcheck") or {}).get("test"), (
                    f"{name} waits for {other} to be healthy, but {other} has no health check"
                )


def test_published_ports_listen_on_loopback_only() -> None:
    published = {}
    for name, service in services().items():
        for port in service.get("ports") or []:
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published on every interface"
            published[name] = published.get(name, set()) | {int(str(port).split(":")[1])}
    assert published["stablews"] >= {8000}
    assert published["grafana"] >= {3000}
    assert published["prometheus"] >= {9090}
    assert published["alertmanager"] >= {9093}
    assert published["tempo"] >= {3200}


def test_every_file_the_compose_mounts_exists() -> None:
    for name, service in services().items():
        if "build" in service:
            build = service["build"]
            context = ROOT / (build["context"] if isinstance(build, dict) else build)
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
        for source, target in bind_mounts(service):
            assert source.exists(), f"{name}: mounts {source.relative_to(ROOT)}, which is not in the repository"
            if Path(target).suffix in (".yml", ".yaml", ".json"):
                assert source.is_file(), f"{name}: {source.relative_to(ROOT)} should be a file"
        # Files named in flags and the environment resolve through the mounts to files in the repository.
        args = [str(a) for a in (service.get("command") or [])] + list(environment(service).values())
        for arg in args:
            value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
            if not value.startswith("/"):
                continue
            path = repo_path(service, value)
            if path is not None and Path(value).suffix:
                assert path.is_file(), f"{name}: {value} is {path.relative_to(ROOT)}, which does not exist"


def test_prometheus_finds_its_config_rules_and_targets() -> None:
    all_services = services()
    prometheus = all_services["prometheus"]
    flags = dict(a.split("=", 1) for a in prometheus["command"] if "=" in a)
    assert "exemplar-storage" in flags["--enable-feature"].split(",")
    assert "--web.enable-lifecycle" in prometheus["command"]
    config_path = repo_path(prometheus, flags["--config.file"])
    assert config_path is not None, f"{flags['--config.file']} is not on a mount"
    assert config_path.is_file(), f"{flags['--config.file']} is {config_path.relative_to(ROOT)}, which does not exist"
    config = load_yaml(config_path)
    # Rule files are named relative to prometheus.yml: they must sit inside the same mount.
    for pattern in config.get("rule_files") or []:
        container = pattern if pattern.startswith("/") else str(Path(flags["--config.file"]).parent / pattern)
        local = repo_path(prometheus, container)
        assert local is not None, f"rule file {pattern} is outside the mounted directory"
        assert list(local.parent.glob(local.name)), f"rule file {pattern} matches no file ({local.relative_to(ROOT)})"
    # Scrape and alerting targets name compose services.
    targets = []
    for job in config.get("scrape_configs") or []:
        for static in job.get("static_configs") or []:
            targets += static.get("targets") or []
    for am in (config.get("alerting") or {}).get("alertmanagers") or []:
        for static in am.get("static_configs") or []:
            targets += static.get("targets") or []
    assert targets, "prometheus.yml has no static targets"
    for target in targets:
        host, port = host_port(target)
        if host in ("localhost", "127.0.0.1"):
            continue
        assert host in all_services, f"prometheus.yml target {target}: no compose service {host}"
        if host == "stablews":
            assert port == 8000


def test_alertmanager_and_grafana_configs_are_mounted() -> None:
    all_services = services()
    alertmanager = all_services["alertmanager"]
    flags = dict(a.split("=", 1) for a in alertmanager["command"] if "=" in a)
    config = repo_path(alertmanager, flags["--config.file"])
    assert config is not None, f"{flags['--config.file']} is not on a mount"
    assert config.is_file(), f"{flags['--config.file']} is {config.relative_to(ROOT)}, which does not exist"
    load_yaml(config)
    grafana = all_services["grafana"]
    datasource_dir = repo_path(grafana, "/etc/grafana/provisioning/datasources")
    dashboard_dir = repo_path(grafana, "/etc/grafana/provisioning/dashboards")
    assert datasource_dir is not None and dashboard_dir is not None, "Grafana's provisioning is not mounted"
    datasources = list(datasource_dir.glob("*.y*ml"))
    assert datasources, "no data source provisioning file"
    urls = {}
    for path in datasources:
        for source in load_yaml(path).get("datasources") or []:
            urls[source["type"]] = source["url"]
    for kind, service_name in (("prometheus", "prometheus"), ("tempo", "tempo")):
        host, port = host_port(urls[kind])
        assert host == service_name and port in container_ports(all_services[service_name]), urls[kind]
    providers = list(dashboard_dir.glob("*.y*ml"))
    assert providers, "no dashboard provider file"
    for path in providers:
        for provider in load_yaml(path).get("providers") or []:
            folder = repo_path(grafana, provider["options"]["path"])
            assert folder is not None and list(folder.glob("*.json")), f"no dashboard JSON at {folder}"


def test_stablews_environment_names_real_options() -> None:
    env = environment(services()["stablews"])
    for key in env:
        if key.startswith(ENV_PREFIX):
            assert key[len(ENV_PREFIX):].lower() in OPTIONS, f"{key} is not an option: it would be ignored"
    host, port = host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    collector = load_yaml(COLLECTOR)
    assert host == "otel-collector"
    assert env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf"
    assert port == host_port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])[1]
    assert env["OTEL_SERVICE_NAME"] == "stablews"


# --- the collector and Tempo ------------------------------------------------------------------


def test_collector_pipelines_use_defined_components() -> None:
    config = load_yaml(COLLECTOR)
    service = config["service"]
    for extension in service.get("extensions") or []:
        assert extension in (config.get("extensions") or {}), f"extension {extension} not defined"
    pipelines = service["pipelines"]
    assert "traces" in pipelines
    for pipeline_name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            names = pipeline.get(kind) or []
            if kind != "processors":
                assert names, f"pipeline {pipeline_name}: no {kind}"
            for component in names:
                defined = config.get(kind) or {}
                assert component in defined, f"pipeline {pipeline_name}: {kind[:-1]} {component} not defined"
    processors = pipelines["traces"]["processors"]
    assert processors[0] == "memory_limiter", "memory_limiter comes first"
    assert processors.index("tail_sampling") < processors.index("batch"), "batch after the sampling decision"
    # The collector's receivers default to localhost since 0.104: in a container, bind every interface.
    for protocol, settings in config["receivers"]["otlp"]["protocols"].items():
        assert settings["endpoint"].startswith("0.0.0.0:"), f"otlp {protocol} receiver must listen on 0.0.0.0"


def test_collector_tail_sampling_keeps_errors_and_abnormal_closes() -> None:
    tail = load_yaml(COLLECTOR)["processors"]["tail_sampling"]
    policies = {p["name"]: p for p in tail["policies"]}
    assert len(policies) == len(tail["policies"]), "policy names must be unique"
    by_type: dict[str, list[dict[str, Any]]] = {}
    for policy in tail["policies"]:
        by_type.setdefault(policy["type"], []).append(policy)
        # A top-level inverted match that matches vetoes every other policy: normal traces would
        # escape the ratio, or abnormal ones be dropped.
        assert not (policy.get(policy["type"]) or {}).get("invert_match"), f"{policy['name']}: invert_match"
    assert "drop" not in by_type, "a drop policy would override keeping errors"

    (status,) = by_type["status_code"]
    assert status["status_code"]["status_codes"] == ["ERROR"]

    # stablews.close.cause not in NORMAL_CAUSES: exactly the service's normal causes are excluded.
    (ottl,) = by_type["ottl_condition"]
    (condition,) = ottl["ottl_condition"]["span"]
    clauses = [c.strip() for c in condition.split(" and ")]
    attribute = 'attributes["stablews.close.cause"]'
    assert f"{attribute} != nil" in clauses
    excluded = set()
    for clause in clauses:
        match = re.fullmatch(re.escape(attribute) + r' != (nil|"([a-z_]+)")', clause)
        assert match, f"unexpected clause in the abnormal-close condition: {clause}"
        if match.group(2):
            excluded.add(match.group(2))
    assert excluded == {str(cause) for cause in NORMAL_CAUSES}
    assert set(CloseCause) - NORMAL_CAUSES, "there are abnormal causes to keep"

    (error_type,) = by_type["string_attribute"]
    assert error_type["string_attribute"]["key"] == "error.type"
    assert error_type["string_attribute"]["enabled_regex_matching"] is True

    (ratio,) = by_type["probabilistic"]
    assert 0 < ratio["probabilistic"]["sampling_percentage"] < 100
    assert set(by_type) == {"status_code", "ottl_condition", "string_attribute", "probabilistic"}

    # Late roots (ws.connection is recorded at the close): a dropped trace must be forgotten so its
    # later spans are judged again; a kept one remembered so its later spans follow.
    assert tail["decision_cache"]["non_sampled_cache_size"] == 1
    assert tail["decision_cache"]["sampled_cache_size"] >= tail["num_traces"]
    assert tail.get("sample_on_first_match") in (None, False)


def test_collector_exports_to_the_tempo_service() -> None:
    config = load_yaml(COLLECTOR)
    exporters = config["service"]["pipelines"]["traces"]["exporters"]
    otlp = [name for name in exporters if name.split("/")[0] == "otlp"]
    assert otlp, "the traces pipeline has no otlp exporter"
    tempo_grpc = load_yaml(TEMPO)["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    for name in otlp:
        exporter = config["exporters"][name]
        host, port = host_port(exporter["endpoint"])
        assert host == "tempo" and "tempo" in services()
        assert port == host_port(tempo_grpc)[1]
        assert exporter["tls"]["insecure"] is True
    collector = services()["otel-collector"]
    config_flag = next(a for a in collector["command"] if a.startswith("--config="))
    assert repo_path(collector, config_flag.split("=", 1)[1]) == COLLECTOR


def test_tempo_config() -> None:
    config = load_yaml(TEMPO)
    grpc = config["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert grpc == "0.0.0.0:4317"
    tempo = services()["tempo"]
    assert config["server"]["http_listen_port"] in container_ports(tempo)
    assert config["storage"]["trace"]["backend"] == "local"
    volumes = {v.split(":")[1] for v in tempo["volumes"] if not v.startswith(".")}
    for path in (config["storage"]["trace"]["wal"]["path"], config["storage"]["trace"]["local"]["path"]):
        assert any(path.startswith(v.rstrip("/") + "/") for v in volumes), f"{path} is not on a volume"
    assert "metrics_generator" not in config
    config_flag = next(a for a in tempo["command"] if a.startswith("-config.file="))
    assert repo_path(tempo, config_flag.split("=", 1)[1]) == TEMPO


# --- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package_and_runs_it_as_non_root() -> None:
    steps = dockerfile_instructions()
    copied = [rest.split()[:-1] for kw, rest in steps if kw == "COPY"]
    sources = {source for group in copied for source in group}
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)["project"]
    assert {"pyproject.toml", project["readme"], "service"} <= sources, sources
    runs = " ".join(rest for kw, rest in steps if kw == "RUN")
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", runs), "pip install --no-cache-dir . (the package)"
    assert project["scripts"]["stablews"] == "stablews.cli:main", "the image's CMD needs the stablews script"
    (user,) = [rest for kw, rest in steps if kw == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    assert ("EXPOSE", "8000") in steps
    assert any(kw == "HEALTHCHECK" and "/readyz" in rest for kw, rest in steps)
    (cmd,) = [json.loads(rest) for kw, rest in steps if kw == "CMD"]
    assert cmd[:2] == ["stablews", "serve"] and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    # .dockerignore keeps the sources the build copies, and leaves out the rest.
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert not sources & ignored, f".dockerignore excludes what the Dockerfile copies: {sources & ignored}"
    assert {".git", "tests", "bench"} <= ignored


# --- the commands, run ------------------------------------------------------------------------


class ComposeCommand:
    """A compose service's command run here, as the console script `pip install .` provides."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        script = Path(sys.executable).parent / argv[0]
        head = [str(script)] if script.exists() else [sys.executable, "-m", argv[0]]
        self.proc = subprocess.Popen(
            [*head, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.port = 0
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if not self.listening.is_set() and '"listening"' in line:
                self.port = json.loads(line)["port"]
                self.listening.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def duration_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m)", text)
    assert match, text
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def test_both_stablews_instances_share_one_redis_and_differ_only_by_id() -> None:
    all_services = services()
    one, two = environment(all_services["stablews"]), environment(all_services["stablews-2"])
    assert one["STABLEWS_BROKER"] == "redis://redis:6379/0" and host_port(one["STABLEWS_BROKER"])[0] == "redis"
    assert {k: v for k, v in one.items() if k != "STABLEWS_INSTANCE_ID"} == {
        k: v for k, v in two.items() if k != "STABLEWS_INSTANCE_ID"
    }
    assert one["STABLEWS_INSTANCE_ID"] != two["STABLEWS_INSTANCE_ID"]
    for name in ("stablews", "stablews-2"):
        assert all_services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    redis = [str(a) for a in all_services["redis"]["command"]]
    assert redis[redis.index("--appendonly") + 1] == "yes", "the history survives a Redis restart"


@pytest.mark.integration
async def test_compose_stablews_command_runs_as_a_local_process(redis_server) -> None:
    service = services()["stablews"]
    argv = [str(a) for a in service["command"]]
    assert argv[:2] == ["stablews", "serve"] and argv[argv.index("--port") + 1] == "8000"
    argv[argv.index("--port") + 1] = "0"  # a port from the OS; everything else as in the compose file
    env = {k: v for k, v in os.environ.items() if not k.startswith((ENV_PREFIX, "OTEL_"))}
    env.update(environment(service))
    env["STABLEWS_BROKER"] = redis_server.url  # a real redis-server here, instead of redis:6379
    env["PYTHONUNBUFFERED"] = "1"
    with OtlpHttpReceiver() as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint  # instead of http://otel-collector:4318
        server = ComposeCommand(argv, env)
        try:
            assert await asyncio.to_thread(server.listening.wait, 20), "did not listen:\n" + "".join(server.lines)
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(timeout=10) as http:
                ready = await wait_for(lambda: ready_answer(http, base), 20, "ready on its Redis")
                assert (ready.status_code, ready.json()) == (200, {"ready": True})
                stats = (await http.get(f"{base}/api/v1/websocket/stats")).json()
            assert stats["broker"]["type"] == "redis"
            async with httpx.AsyncClient(timeout=10) as http:  # the only instance on its Redis: it runs the feed
                await wait_for(lambda: feed_running(http, base), 10, "the demo feed running here")
            compose_env = environment(service)
            interval = duration_seconds(compose_env["STABLEWS_HEARTBEAT_INTERVAL"])
            assert stats["heartbeats"]["interval_ms"] == interval * 1000, "the compose environment took effect"
            assert stats["instance"] == compose_env["STABLEWS_INSTANCE_ID"]

            # The compose health check, as written, against this port; and failing on a closed one.
            probe = [str(a) for a in service["healthcheck"]["test"][1:]]
            for port, expect_ok in ((server.port, True), (free_port(), False)):
                command = [p.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for p in probe]
                command[0] = sys.executable if command[0] == "python" else command[0]
                result = await asyncio.to_thread(subprocess.run, command, capture_output=True, timeout=15)
                assert (result.returncode == 0) is expect_ok, result.stderr

            # An abnormal close reaches the collector endpoint as an ERROR root with the cause.
            client, _welcome = await hello_client(f"ws://127.0.0.1:{server.port}/ws")
            client.abort()
            await client.close()
            (root,) = await receiver.wait_spans(lambda s: s.name == "ws.connection", timeout=20)
            assert root.status == "ERROR"
            assert root.attributes["stablews.close.cause"] == "client_gone"
            assert root.resource["service.name"] == "stablews"
            assert root.resource["deployment.environment"] == "compose"

            # SIGTERM (docker stop) drains and exits 0 within the stop_grace_period.
            server.proc.send_signal(signal.SIGTERM)
            grace = duration_seconds(service["stop_grace_period"])
            code = await asyncio.to_thread(server.proc.wait, grace)
            assert code == 0, "".join(server.lines[-20:])
        finally:
            server.stop()


async def feed_running(http: httpx.AsyncClient, base: str) -> bool:
    stats = (await http.get(f"{base}/api/v1/websocket/stats")).json()
    return stats["singletons"] == {"demo_feed": "running"}


async def ready_answer(http: httpx.AsyncClient, base: str) -> httpx.Response | None:
    answer = await http.get(f"{base}/readyz")
    return answer if answer.status_code == 200 else None


def test_compose_loadtest_command_parses() -> None:
    from stablews.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    loadtest = services()["loadtest"]
    argv = [str(a) for a in loadtest["command"]]
    assert argv[:2] == ["stablews", "loadtest"]
    if "loadtest" not in getattr(commands, "choices", {}):
        pytest.skip("`stablews loadtest` is not in this tree yet")
    try:
        args = parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` does not parse: check against `stablews loadtest --help`")
    assert args.command == "loadtest"
    from stablews.loadtest import parse_options

    options = parse_options(args)  # the tool's own checks (BadOption on a bad value)
    host, port = host_port(options.url)
    assert host == "stablews" and port == 8000 and options.url.endswith("/ws")
    assert options.duration == 0, "runs until the stack stops"
    assert options.drop_rate > 0 and options.freeze_ratio > 0, "drops and freezes: client_gone and heartbeat_timeout"


def test_docs_name_the_published_ports() -> None:
    text = (ROOT / "docs" / "stack.md").read_text()
    assert "docker compose up" in text
    for service in services().values():
        for port in service.get("ports") or []:
            number = str(port).split(":")[1]
            assert f"localhost:{number}" in text or f"127.0.0.1:{number}" in text, port
