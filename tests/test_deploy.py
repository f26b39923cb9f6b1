"""The deployment files (docker-compose.yml, deploy/) agree with the code they deploy.

- docker-compose.yml validates with docker-compose;
- every command the images run parses with the real CLI parser, and the mounted TOML configs
  load as the typed configs, with paths and ports that match the compose mounts and ports;
- the compose healthcheck really asks the coordinator's gRPC health service;
- every metric the Grafana dashboard queries is one the coordinator or the client defines;
- Prometheus scrapes exactly the compose services, on the ports their configs give.
No Docker engine is needed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest
import torch
import yaml

from fedcybgd.cli.main import CLIENT_FLAGS, COORDINATOR_FLAGS, _overrides, build_parser
from fedcybgd.client.config import ClientConfig
from fedcybgd.client.metrics import ClientMetrics
from fedcybgd.common.config import load_config
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.metrics import CoordinatorMetrics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedcybgd.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
INSTALL_HINT = "run deploy/install-test-tools.sh as root (Debian packages prometheus and docker-compose)"

PROGRAMS = {"coordinator": (CoordinatorConfig, COORDINATOR_FLAGS), "client": (ClientConfig, CLIENT_FLAGS)}
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _tool(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: the test setup (deploy/install-test-tools.sh) should have done it")
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return binary


def _interpolate(value):
    """Compose's `${VAR:-default}` interpolation, with every variable unset (the shipped defaults)."""
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


def _compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()))


def _variables() -> set[str]:
    return {m.group(1) for m in VARIABLE.finditer(COMPOSE.read_text())}


def _dockerfile(path: Path) -> dict[str, list[str]]:
    """ENTRYPOINT and CMD (exec form) of a Dockerfile."""
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(ENTRYPOINT|CMD)\s+(\[.*\])\s*$", line)
        if m:
            found[m.group(1)] = json.loads(m.group(2))
    assert set(found) == {"ENTRYPOINT", "CMD"}, f"{path.name}: ENTRYPOINT and CMD in exec form expected"
    return found


def _bind_mounts(service: dict) -> dict[str, tuple[Path | None, bool]]:
    """Container path -> (host path or None for a named volume, read-only)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        host = (ROOT / source).resolve() if source.startswith((".", "/")) else None
        mounts[target] = (host, "ro" in mode)
    return mounts


def _mount_of(path: str, mounts: dict) -> tuple[str, Path | None, bool] | None:
    """The mount a container path lies in (the deepest one), if any."""
    best = None
    for target, (host, ro) in mounts.items():
        inside = PurePosixPath(path) == PurePosixPath(target) or PurePosixPath(target) in PurePosixPath(path).parents
        if inside and (best is None or len(target) > len(best[0])):
            best = (target, host, ro)
    return best


def _program_services() -> dict[str, dict]:
    """Every compose service built from a Dockerfile of this repository, with what its container runs:
    the Dockerfile, the CLI arguments (the service's command or the image's CMD), the parsed
    arguments and the configuration the program would load."""
    compose = _compose()
    programs = {}
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        dockerfile = ROOT / service["build"]["dockerfile"]
        assert (ROOT / service["build"].get("context", ".")).resolve() == ROOT, name
        image = _dockerfile(dockerfile)
        assert image["ENTRYPOINT"] == ["fedcybgd"], dockerfile.name
        assert "entrypoint" not in service, f"{name}: the image's entrypoint is the CLI"
        argv = service.get("command", image["CMD"])
        assert isinstance(argv, list), f"{name}: use the exec (list) form of command"
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{name}: `fedcybgd {' '.join(argv)}` does not parse ({exc})")
        assert args.command in PROGRAMS, f"{name}: runs `fedcybgd {args.command}`"
        assert args.config, f"{name}: no --config"
        mounts = _bind_mounts(service)
        assert args.config in mounts and mounts[args.config][0] is not None, f"{name}: {args.config} is not mounted"
        host_config, read_only = mounts[args.config]
        assert read_only and host_config is not None and host_config.is_file(), (name, host_config)
        cls, flags = PROGRAMS[args.command]
        config: CoordinatorConfig | ClientConfig = load_config(cls, host_config, _overrides(args, flags))
        programs[name] = dict(service=service, dockerfile=dockerfile, image=image, argv=argv, args=args,
                              mounts=mounts, host_config=host_config, config=config)
    return programs


def _by_program(programs: dict, program: str) -> dict[str, dict]:
    return {name: p for name, p in programs.items() if p["args"].command == program}


# (a) ----------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_docker_compose_config_validates():
    binary = _tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in _variables()}
    check = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    # docker-compose's own interpolation gives the commands the other tests parse.
    rendered = subprocess.run([binary, "-f", str(COMPOSE), "config"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120, check=True)
    services = yaml.safe_load(rendered.stdout)["services"]
    ours = _compose()["services"]
    assert set(services) == set(ours)
    for name, service in services.items():
        assert service.get("command") == ours[name].get("command"), name


# (b) ----------------------------------------------------------------------------------------------


def test_dockerfile_commands_parse_and_their_configs_load():
    for name in ("coordinator.Dockerfile", "client.Dockerfile"):
        image = _dockerfile(DEPLOY / name)
        assert image["ENTRYPOINT"] == ["fedcybgd"]
        args = build_parser().parse_args(image["CMD"])
        assert args.command == name.split(".")[0]
        assert args.config == f"/etc/fedcybgd/{args.command}.toml"
        text = (DEPLOY / name).read_text()
        assert re.search(r"^USER\s+(?!root\b|0\b)\S+", text, re.M), f"{name}: runs as root"
    coordinator_text = (DEPLOY / "coordinator.Dockerfile").read_text()
    # The CPU wheel goes in before the project, or pip pulls the CUDA build.
    assert coordinator_text.index("download.pytorch.org/whl/cpu") < coordinator_text.index("pip install .")
    assert re.search(r"^EXPOSE\s+.*\b50051\b.*\b9464\b", coordinator_text, re.M)


def test_compose_commands_parse_and_configs_match_the_mounts():
    programs = _program_services()
    coordinators, clients = _by_program(programs, "coordinator"), _by_program(programs, "client")
    assert len(coordinators) == 1 and len(clients) >= 2, sorted(programs)
    [(coord_name, coord)] = coordinators.items()
    config: CoordinatorConfig = coord["config"]
    assert coord["dockerfile"].name == "coordinator.Dockerfile"

    # Listening and metrics: on all interfaces, on the ports compose publishes.
    host, port = config.address.rsplit(":", 1)
    assert host == "0.0.0.0"
    published = {p.rsplit(":", 1)[1] for p in coord["service"]["ports"]}
    assert {port, str(config.metrics_port)} <= published, (published, config)
    assert config.metrics_address == "0.0.0.0" and config.metrics_port > 0

    # The state is a named volume (survives re-creating the container); model and eval data are
    # read-only mounts of host directories.
    state = _mount_of(config.state_dir, coord["mounts"])
    assert state and state[0] == config.state_dir and state[1] is None, "state_dir must be a named volume"
    for path in (config.model, config.eval.data):
        assert path is not None, "the model and the eval data must be configured"
        mount = _mount_of(path, coord["mounts"])
        assert mount and mount[1] is not None and mount[2], f"{path} is not in a read-only bind mount"
    model_mount = _mount_of(config.model, coord["mounts"])
    assert model_mount is not None and model_mount[0] == "/models"
    assert "/etc/fedcybgd/tls" in coord["mounts"]

    names, gpus = set(), set()
    for name, client in clients.items():
        cfg: ClientConfig = client["config"]
        assert client["dockerfile"].name == "client.Dockerfile", name
        assert cfg.coordinator == f"{coord_name}:{port}", (name, cfg.coordinator)
        assert cfg.metrics_address == "0.0.0.0" and cfg.metrics_port > 0, name
        assert cfg.device == "cuda", name
        data = _mount_of(cfg.data, client["mounts"])
        assert data and data[0] == cfg.data and data[1] is not None and data[2], \
            f"{name}: data must be mounted read-only"
        assert data[1].name == name, f"{name}: mounts {data[1]} as its data"
        cache = _mount_of(cfg.cache_dir, client["mounts"])
        assert cache and cache[0] == cfg.cache_dir and cache[1] is None, f"{name}: cache_dir must be a named volume"
        if cfg.base_model:
            assert _mount_of(cfg.base_model, client["mounts"]), f"{name}: base_model is not mounted"
        assert "/etc/fedcybgd/tls" in client["mounts"], name
        depends = client["service"]["depends_on"]
        assert depends[coord_name]["condition"] == "service_healthy", name
        [device] = client["service"]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
        names.add(cfg.name)
        gpus.add(device["device_ids"][0])
    assert len(names) == len(clients), f"site names must differ: {names}"
    assert len(gpus) == len(clients), f"one GPU per client: {gpus}"

    # Every named volume used is declared.
    declared = set(_compose().get("volumes") or {})
    for name, service in _compose()["services"].items():
        for target, (host_dir, _) in _bind_mounts(service).items():
            if host_dir is None:
                source = next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target)
                assert source in declared, f"{name}: volume {source} is not declared"


@pytest.mark.multiprocess
def test_compose_healthcheck_asks_the_grpc_health_service(tmp_path, coordinators):
    from grpc_health.v1 import health_pb2

    from fedcybgd.server.service import SERVICE_NAME

    test = _compose()["services"]["coordinator"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    code = test[3]
    assert "localhost:50051" in code and SERVICE_NAME in code

    from fedcybgd.cli.certs import make_certs

    tls = make_certs(tmp_path / "tls", ["localhost"], ["site-0"])

    def check(port: int) -> int:
        local = code.replace("localhost:50051", f"localhost:{port}").replace("/etc/fedcybgd/tls/", f"{tls}/")
        return subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=60).returncode

    # As in the compose file: mutual TLS; the health check presents the operator's certificate.
    running = coordinators.start(insecure=False, address="localhost:0", tls_cert=str(tls / "server.pem"),
                                 tls_key=str(tls / "server.key"), tls_client_ca=str(tls / "ca.pem"))
    assert check(running.port) == 0
    running.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert check(running.port) != 0
    coordinators.stop(running)
    assert check(running.port) != 0, "nothing listening must be unhealthy"


# (c) ----------------------------------------------------------------------------------------------


def _defined_metric_names() -> set[str]:
    names = set()
    for registry in (CoordinatorMetrics().registry, ClientMetrics(torch.device("cpu")).registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
    return names


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def test_dashboard_queries_only_metrics_the_code_defines():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = _panels(dashboard)
    assert len(panels) >= 10
    defined = _defined_metric_names()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used = set()
    for panel in panels:
        title = panel.get("title")
        assert title and panel["type"] in ("timeseries", "stat", "gauge", "bargauge", "table"), panel
        assert panel["datasource"]["uid"] == "prometheus", title
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, title
        targets = [t for t in panel.get("targets", []) if t.get("expr")]
        assert targets, f"{title}: no query"
        for target in panel["targets"]:
            assert target.get("datasource", {"uid": "prometheus"})["uid"] == "prometheus", title
            names = re.findall(r"fedcybgd_[a-z_]+", target["expr"])
            assert names, f"{title}: {target['expr']} queries no fedcybgd metric"
            unknown = [n for n in names if n not in defined]
            assert not unknown, f"{title}: {target['expr']} uses metrics the code does not define: {unknown}"
            used.update(names)
        unit = panel["fieldConfig"]["defaults"].get("unit")
        if "bytes" in " ".join(t["expr"] for t in targets) and "/" not in " ".join(t["expr"] for t in targets):
            assert unit == "bytes", f"{title}: bytes panels use the IEC 'bytes' unit, not {unit}"
        if all(t["expr"].split("/")[0].strip().endswith("seconds_sum") for t in targets):
            assert unit == "s", title
    # The figures the dashboard exists for: wire bytes against FedAvg-full, and GPU memory.
    assert {"fedcybgd_round_transfer_bytes", "fedcybgd_fedavg_full_equivalent_bytes_total",
            "fedcybgd_client_gpu_peak_bytes", "fedcybgd_client_gpu_memory_bytes"} <= used


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    compose = _compose()["services"]
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    [source] = datasources["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    [provider] = providers["providers"]
    mounts = _bind_mounts(compose["grafana"])
    host, read_only = mounts[provider["options"]["path"]]
    assert host == DASHBOARD.parent.resolve() and read_only
    assert mounts["/etc/grafana/provisioning"][0] == (DEPLOY / "grafana/provisioning").resolve()
    assert "GF_SECURITY_ADMIN_PASSWORD" in _variables()


# (d) ----------------------------------------------------------------------------------------------


def test_prometheus_scrapes_every_compose_service_on_its_metrics_port():
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    targets: dict[str, set[str]] = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            targets.setdefault(job["job_name"], set()).update(static["targets"])
    programs = _program_services()
    expected: dict[str, set[str]] = {"coordinator": set(), "clients": set()}
    for name, program in programs.items():
        job = "coordinator" if program["args"].command == "coordinator" else "clients"
        expected[job].add(f"{name}:{program['config'].metrics_port}")
    assert targets == expected, "prometheus.yml must list exactly the compose services, on their metrics ports"

    prometheus = _compose()["services"]["prometheus"]
    mounts = _bind_mounts(prometheus)
    assert mounts["/etc/prometheus/prometheus.yml"] == (PROMETHEUS.resolve(), True)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert any(p.endswith(":9090") for p in prometheus["ports"])


@pytest.mark.multiprocess
def test_prometheus_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(f"promtool is not installed ({INSTALL_HINT})")
    check = subprocess.run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
