"""A real Prometheus server scrapes a coordinator and its clients during an end-to-end run.

Every PromQL expression of the shipped Grafana dashboard must return data, and the per-round
and cumulative byte figures must equal the bytes this test counted on its own side (a server
interceptor that sums the size of every message of every transfer).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import (
    ClientProcesses,
    Coordinators,
    MessageTap,
    address_of,
    free_port,
    wait_clients,
    wait_for,
    write_data,
)
from fedcybgd.server.config import EvalConfig, TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedcybgd.json"
SCRAPE = "250ms"


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: the test setup (deploy/install-test-tools.sh) "
                        "should have done it")
        pytest.skip("prometheus is not installed (run deploy/install-test-tools.sh as root)")
    return binary


def _wire_bytes(tap: MessageTap) -> Counter[tuple[str, str]]:
    """Bytes of every transfer as the wire sees them (message sizes), by (task, direction "down" or
    "up"): a download's task is in its request, an upload's in its header message."""
    counted: Counter[tuple[str, str]] = Counter()
    for call in tap.calls("DownloadModel"):
        task_id = call.requests[0].task_id
        counted[(task_id, "down")] += sum(m.ByteSize() for m in call.responses)
    for call in tap.calls("UploadBlock"):
        task_id = ""
        for message in call.requests:
            if message.HasField("header"):
                task_id = message.header.task_id
            counted[(task_id, "up")] += message.ByteSize()
    return counted


def _query(base: str, expr: str, **params) -> list:
    path = "query_range" if "start" in params else "query"
    url = f"{base}/api/v1/{path}?" + urllib.parse.urlencode({"query": expr, **params})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", body
    return body["data"]["result"]


#: Dashboard queries that only a differentially private run has data for (each site's epsilon).
PRIVATE_RUN_ONLY = {"fedcybgd_dp_epsilon"}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"] + [p for row in dashboard["panels"] for p in row.get("panels", [])]
    return [t["expr"] for p in panels for t in p.get("targets", []) if t.get("expr")]


def test_prometheus_scrapes_a_run_and_every_dashboard_query_has_data(tmp_path, coordinators: Coordinators,
                                                                     clients: ClientProcesses):
    prometheus = _prometheus_binary()
    exprs = _dashboard_exprs()
    assert len(exprs) >= 10

    data, eval_data = write_data(tmp_path, clients=2)
    tap = MessageTap()
    metrics_port, client_ports = free_port(), [free_port(), free_port()]
    running = coordinators.start(
        interceptors=[tap], grace=1, metrics_port=metrics_port, heartbeat_interval_s=1,
        schedule=ScheduleConfig(cycles=2, lr=3e-3),
        # Visits long enough (about a second) for several scrapes each.
        training=TrainingConfig(local_steps=60, batch_size=8, seq_len=128),
        eval=EvalConfig(data=str(eval_data), max_sequences=8))
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: {SCRAPE}\n  scrape_timeout: {SCRAPE}\n"
        f"scrape_configs:\n"
        f"  - job_name: coordinator\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        f"  - job_name: clients\n    static_configs:\n"
        f"      - targets: [{', '.join(repr(f'127.0.0.1:{p}') for p in client_ports)}]\n")
    prom = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            # Prometheus writes to it for as long as it runs.
                            stdout=open(tmp_path / "prometheus.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    base = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(lambda: _ready(base), 60, "prometheus to be ready", interval=0.3)
        with grpc.insecure_channel(address_of(running)) as channel:
            # Any: types-grpcio-health-checking, where installed, declares no methods on HealthStub.
            health: Any = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service="fedcybgd.v1.Coordinator"))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        started = time.time()
        procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}",
                               "--metrics-port", str(client_ports[i])) for i in range(2)]
        # Client endpoints go away with the clients: let Prometheus see them mid-run.
        wait_for(lambda: bool(_query(base, 'up{job="clients"} == 1'))
                 and len(_query(base, 'up{job="clients"} == 1')) == 2,
                 120, "both client endpoints to be scraped", interval=0.3)
        wait_for(lambda: bool(_query(base, "fedcybgd_client_step_seconds_count > 0")), 120, "a client training step",
                 interval=0.3)
        wait_clients(procs)
        wait_for(lambda: running.coordinator.finished, 60, "the final evaluation")
        time.sleep(1.5)  # a few more scrapes of the final values
        ended = time.time()

        # A run that is not private has no epsilon to show (test_privacy_run checks that panel's series).
        missing = [expr for expr in exprs if expr not in PRIVATE_RUN_ONLY
                   and not _query(base, expr, time=f"{ended - 0.5:.3f}") and
                   not _query(base, f"last_over_time(({expr})[{int(ended - started) + 5}s:250ms])",
                              time=f"{ended:.3f}")]
        assert not missing, f"dashboard queries without data: {missing}"

        visits = sorted(running.coordinator.state.visits(), key=lambda v: v.round)
        wire = _wire_bytes(tap)
        counted = {v.round: {d: wire[(v.task_id, d)] for d in ("down", "up")} for v in visits}
        assert all(c["down"] > 0 and c["up"] > 0 for c in counted.values())

        # Cumulative: the counters equal the sum of what the test counted.
        for direction in ("down", "up"):
            total = _query(base, f'sum(fedcybgd_transfer_bytes_total{{direction="{direction}"}})')
            assert float(total[0]["value"][1]) == sum(c[direction] for c in counted.values()), direction

        # Per round: for each round Prometheus saw completed, the gauges' last value while that
        # round was the latest equals the test's own count for it.
        step = "0.25"
        rounds = _series(_query(base, "fedcybgd_round", start=f"{started:.3f}", end=f"{ended:.3f}", step=step))
        per_round = {d: _series(_query(base, f'sum(fedcybgd_round_transfer_bytes{{direction="{d}"}})',
                                       start=f"{started:.3f}", end=f"{ended:.3f}", step=step)) for d in ("down", "up")}
        last_value: dict[int, dict[str, float]] = {}
        for ts, done in rounds.items():
            if done >= 1 and all(ts in per_round[d] for d in per_round):
                last_value[int(done) - 1] = {d: per_round[d][ts] for d in per_round}
        assert len(last_value) >= len(visits) // 2, f"Prometheus saw only rounds {sorted(last_value)}"
        for round_, values in last_value.items():
            assert values == {d: float(counted[round_][d]) for d in ("down", "up")}, round_
        assert len(visits) - 1 in last_value, "the final round's figures must be visible"
    finally:
        prom.terminate()
        prom.wait(timeout=30)


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def _series(result: list) -> dict[float, float]:
    assert len(result) == 1, result
    return {float(ts): float(v) for ts, v in result[0]["values"]}
