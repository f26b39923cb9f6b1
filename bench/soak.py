#!/usr/bin/env python
"""Soak: a long run with crashes, sampled over time, so that growth shows before a user's run of days finds it.

    .venv/bin/python bench/soak.py --out bench-out/soak                      # 1000+ visits, about 10 min
    .venv/bin/python bench/soak.py --out /tmp/soak --visits 200 --kill-every 5  # a quick look

What runs: a coordinator (mutual TLS, the tiny random model, one decoder layer per block, as many cycles as give at
least ``--visits`` visits) and ``--clients`` client daemons, exactly the programs a user starts. Meanwhile:

- every ``--kill-every`` seconds on average (exponential gaps) one random client is killed with SIGKILL (mid-visit as
  often as not) and restarted after a pause with the same cache folder, as a crashed site's supervisor does;
- once, when half the visits are done, the coordinator is killed with SIGKILL and restarted on its state folder;
- every ``--sample-every`` seconds the coordinator process is sampled from /proc (RSS, open file descriptors,
  threads), its state folder measured (state database with its WAL, blob store), each client's cache folder
  measured, and the latency of GetTask and Heartbeat taken from a probe: a registered client whose declared memory
  holds no block, so GetTask runs the whole scheduling path (expiry scan, tasks in flight, the strategy) and is
  refused without ever taking a task from the run.

At the end every visit a client was told was accepted (the client logs' "round R: block -> version V" lines) must be
in the coordinator's history, which is read page by page. Writes ``samples.json`` (every sample), ``soak.md`` (the
figures against the targets) and ``soak.png`` under ``--out``. Targets (issue 16): coordinator RSS slope after
warm-up below 1 MB per 100 visits; disk within the configured budgets; latencies flat; nothing accepted lost.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc

from fedcybgd.cli.certs import make_certs
from fedcybgd.cli.demo import DemoOptions, prepare_inputs
from fedcybgd.client.cache_budget import DEFAULT_MODEL_MULTIPLE
from fedcybgd.common import procfs
from fedcybgd.common.transport import client_channel
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wire import free_port  # noqa: E402  (bench/ is not a package)

WARMUP_FRACTION = 0.2          # the RSS slope is fitted on the visits after this share of the run
RSS_SLOPE_TARGET_MB = 1.0      # per 100 visits
LATENCY_CALLS = 5              # calls per probe sample; the median is kept


@dataclass(frozen=True)
class SoakOptions:
    out: str
    visits: int = 1000
    clients: int = 4
    local_steps: int = 4
    batch_size: int = 2
    seq_len: int = 64
    kill_every: float = 10.0       # mean seconds between client kills (0: none)
    restart_after: float = 3.0     # a killed client comes back after up to this many seconds
    coordinator_restart: bool = True
    sample_every: float = 5.0
    task_timeout: float = 15.0     # a killed client's task goes to another after this much silence
    threads: int = 1               # torch threads per client
    coordinator_args: str = ""     # extra coordinator flags (storage budgets, retention), shell-quoted
    client_args: str = ""          # extra client flags
    cache_budget_bytes: int = 0    # per client, checked at every sample (0: the client's default, 3x the model)
    state_budget_bytes: int = 0    # the coordinator's state folder, checked at every sample (0: not checked)
    timeout_s: float = 4 * 3600.0
    seed: int = 0


@dataclass
class Sample:
    seconds: float
    visits: int
    coordinator_rss_bytes: int
    open_fds: int
    threads: int
    state_db_bytes: int
    blob_store_bytes: int
    state_dir_bytes: int
    client_cache_bytes: list[int]  # each client's block cache (its blobs folder, what the budget bounds)
    get_task_ms: float
    heartbeat_ms: float


@dataclass
class SoakResult:
    options: SoakOptions
    samples: list[Sample] = field(default_factory=list)
    total_visits: int = 0
    client_kills: int = 0
    coordinator_restarts: int = 0
    restart_at_sample: int = 0     # index of the first sample after the coordinator's restart (0: none)
    accepted_versions: int = 0
    missing_versions: list[int] = field(default_factory=list)
    wall_seconds: float = 0.0


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # deleted while we walked
                total += os.lstat(os.path.join(root, name)).st_size  # bytes, as the budgets count them
    return total


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


class Site:
    """One client daemon the soak kills and restarts; its cache folder survives, as a site's disk does."""

    def __init__(self, index: int, argv: list[str], log: Path) -> None:
        self.index, self.argv, self.log = index, argv, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Soak:
    def __init__(self, o: SoakOptions) -> None:
        self.o = o
        self.out = Path(o.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "logs").mkdir(exist_ok=True)
        self.rng = random.Random(o.seed)
        self.result = SoakResult(o)
        self.address = f"127.0.0.1:{free_port()}"
        self.state_dir = self.out / "state"
        self.tls = make_certs(self.out / "tls", ["127.0.0.1", "localhost"],
                              [f"site-{i}" for i in range(o.clients)] + ["probe"])
        self.coordinator: subprocess.Popen | None = None
        self.sites: list[Site] = []
        self.lock = threading.Lock()   # kills and the coordinator restart do not overlap
        self.stop = threading.Event()

    # -- processes -------------------------------------------------------------------------------------------

    def _channel(self, name: str) -> grpc.Channel:
        return client_channel(self.address, tls_ca=str(self.tls / "ca.pem"), tls_cert=str(self.tls / f"{name}.pem"),
                              tls_key=str(self.tls / f"{name}.key"))

    def start_coordinator(self, argv: list[str]) -> None:
        with open(self.out / "logs" / "coordinator.log", "a") as log:
            self.coordinator = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        with self._channel("operator") as channel:
            while time.monotonic() < deadline:
                if self.coordinator.poll() is not None:
                    raise RuntimeError(f"the coordinator exited with {self.coordinator.returncode}; see logs/")
                try:
                    pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(summary=True), timeout=5)
                    return
                except grpc.RpcError:
                    time.sleep(0.3)
        raise TimeoutError("the coordinator did not come up")

    def status(self) -> pb.GetStatusResponse:
        with self._channel("operator") as channel:
            return pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(summary=True), timeout=30)

    def all_visit_versions(self) -> set[int]:
        """Every committed visit's new version, read page by page as an operator's tool would."""
        versions: set[int] = set()
        cursor = 0
        with self._channel("operator") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            while True:
                page = stub.GetStatus(pb.GetStatusRequest(max_visits=500, visits_before_round=cursor), timeout=60)
                versions.update(v.new_version for v in page.visits)
                cursor = page.next_visits_before_round
                if not cursor:
                    return versions

    # -- the chaos and the sampler -------------------------------------------------------------------------

    def _kill_clients(self) -> None:
        while self.o.kill_every > 0 and not self.stop.wait(self.rng.expovariate(1 / self.o.kill_every)):
            with self.lock:
                live = [s for s in self.sites if s.alive()]
                if not live:
                    continue
                site = self.rng.choice(live)
                site.kill()
                self.result.client_kills += 1
            if self.stop.wait(self.rng.uniform(0.5, self.o.restart_after)):
                return
            with self.lock:
                if not site.alive():
                    site.start()

    def _probe(self) -> tuple[float, float]:
        """Median GetTask and Heartbeat latency (ms) of the probe client (memory that holds no block)."""
        with self._channel("probe") as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            token_file = self.out / "probe-token"
            if not token_file.exists():
                reply = stub.Register(pb.RegisterRequest(name="probe", device_kind="cpu", memory_bytes=1), timeout=30)
                token_file.write_text(reply.token)
            metadata = (("authorization", f"Bearer {token_file.read_text()}"),)
            get_task, heartbeat = [], []
            for _ in range(LATENCY_CALLS):
                began = time.perf_counter()
                try:
                    stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=metadata, timeout=30)
                except grpc.RpcError as err:  # RESOURCE_EXHAUSTED: it holds no block, as it should be told
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                get_task.append((time.perf_counter() - began) * 1e3)
                began = time.perf_counter()
                stub.Heartbeat(pb.HeartbeatRequest(phase="idle"), metadata=metadata, timeout=30)
                heartbeat.append((time.perf_counter() - began) * 1e3)
        return sorted(get_task)[len(get_task) // 2], sorted(heartbeat)[len(heartbeat) // 2]

    def sample(self, started: float) -> Sample | None:
        coordinator = self.coordinator
        if coordinator is None or coordinator.poll() is not None:
            return None
        try:
            visits = self.status().round
            get_task_ms, heartbeat_ms = self._probe()
        except grpc.RpcError:
            return None  # restarting
        pid = coordinator.pid
        db = sum(folder_bytes(p) if p.is_dir() else p.stat().st_size
                 for p in self.state_dir.glob("state.sqlite*") if p.exists())  # with its WAL
        blobs = self.state_dir / "blobs"
        return Sample(seconds=time.monotonic() - started, visits=visits,
                      coordinator_rss_bytes=procfs.status_field("VmRSS", pid) or 0, open_fds=open_fds(pid),
                      threads=procfs.status_field("Threads", pid) or 0, state_db_bytes=db,
                      blob_store_bytes=folder_bytes(blobs) if blobs.exists() else 0,
                      state_dir_bytes=folder_bytes(self.state_dir),
                      client_cache_bytes=[folder_bytes(self.out / "cache" / f"client-{s.index}" / "blobs")
                                          for s in self.sites],
                      get_task_ms=get_task_ms, heartbeat_ms=heartbeat_ms)

    # -- the run ------------------------------------------------------------------------------------------------

    def run(self) -> SoakResult:
        o = self.o
        model_dir, client_data, eval_data = prepare_inputs(DemoOptions(out=str(self.out), model="tiny",
                                                                       clients=o.clients, seed=o.seed), self.out)
        cmd = [sys.executable, "-m", "fedcybgd.cli.main"]
        if not o.cache_budget_bytes:  # the budget a client gives itself by default
            model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
            self.o = o = replace(o, cache_budget_bytes=DEFAULT_MODEL_MULTIPLE * model_bytes)
            self.result.options = o
        blocks = self._blocks(model_dir)
        cycles = math.ceil(o.visits / blocks)
        coordinator_argv = [
            *cmd, "coordinator", "--model", str(model_dir), "--state-dir", str(self.state_dir),
            "--address", self.address, "--cycles", str(cycles), "--layers-per-block", "1", "--embed-head-every", "1",
            "--local-steps", str(o.local_steps), "--batch-size", str(o.batch_size), "--seq-len", str(o.seq_len),
            "--lr", "1e-3", "--seed", str(o.seed), "--task-timeout", str(o.task_timeout),
            "--eval-data", str(eval_data), "--eval-max-sequences", "8",
            "--tls-cert", str(self.tls / "server.pem"), "--tls-key", str(self.tls / "server.key"),
            "--tls-client-ca", str(self.tls / "ca.pem"), *shlex.split(o.coordinator_args)]
        self.sites = [Site(i, [*cmd, "client", "--coordinator", self.address, "--data", str(data),
                               "--cache-dir", str(self.out / "cache" / f"client-{i}"), "--name", f"site-{i}",
                               "--threads", str(o.threads), "--base-model", str(model_dir),
                               "--tls-ca", str(self.tls / "ca.pem"), "--tls-cert", str(self.tls / f"site-{i}.pem"),
                               "--tls-key", str(self.tls / f"site-{i}.key"), *shlex.split(o.client_args)],
                           self.out / "logs" / f"client-{i}.log")
                      for i, data in enumerate(client_data)]
        started = time.monotonic()
        self.start_coordinator(coordinator_argv)
        total = self.status().total_rounds
        self.result.total_visits = total
        print(f"soak: {total} visits ({cycles} cycles of {blocks} blocks), {o.clients} clients, coordinator on "
              f"{self.address}", flush=True)
        for site in self.sites:
            site.start()
        killer = threading.Thread(target=self._kill_clients, daemon=True)
        killer.start()
        restarted = not o.coordinator_restart
        try:
            while True:
                if time.monotonic() - started > o.timeout_s:
                    raise TimeoutError(f"the soak did not finish within {o.timeout_s:.0f}s")
                point = self.sample(started)
                if point is not None:
                    self.result.samples.append(point)
                    self._check_budgets(point)
                    print(f"  {point.seconds:6.0f}s  visits {point.visits:>5}/{total}  rss "
                          f"{point.coordinator_rss_bytes / 2**20:6.1f} MiB  fds {point.open_fds:>3}  threads "
                          f"{point.threads:>3}  state {point.state_dir_bytes / 2**20:7.1f} MiB  caches "
                          f"{max(point.client_cache_bytes) / 2**20:6.1f} MiB  GetTask {point.get_task_ms:5.1f} ms  "
                          f"Heartbeat {point.heartbeat_ms:5.1f} ms", flush=True)
                    if point.visits >= total:
                        break
                    if not restarted and point.visits >= total // 2:
                        with self.lock:
                            assert self.coordinator is not None
                            self.coordinator.kill()
                            self.coordinator.wait()
                            self.start_coordinator(coordinator_argv)
                        self.result.coordinator_restarts += 1
                        self.result.restart_at_sample = len(self.result.samples)
                        restarted = True
                        print("  coordinator killed and restarted", flush=True)
                with self.lock:  # a client that exited on its own (gave up) would stall the run: bring it back
                    for site in self.sites:
                        if not site.alive() and site.proc is not None and site.proc.returncode not in (0, -9):
                            print(f"  site-{site.index} exited with {site.proc.returncode}; restarting", flush=True)
                            site.start()
                self.stop.wait(o.sample_every)
            self._check_accepted()
        finally:
            self.stop.set()
            killer.join(timeout=30)
            for site in self.sites:
                if site.proc is not None and site.proc.poll() is None:
                    site.proc.send_signal(signal.SIGTERM)
            for site in self.sites:
                if site.proc is not None:
                    try:
                        site.proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        site.kill()
            if self.coordinator is not None and self.coordinator.poll() is None:
                self.coordinator.send_signal(signal.SIGTERM)
                self.coordinator.wait(timeout=60)
            self.result.wall_seconds = time.monotonic() - started
        return self.result

    @staticmethod
    def _blocks(model_dir: Path) -> int:
        """The run's blocks at one layer per block, from the config alone (meta tensors, no weights)."""
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from fedcybgd.common.partition import partition_model

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
        return len(partition_model(model, layers_per_block=1))

    def _check_budgets(self, point: Sample) -> None:
        over = [f"client-{i} cache {b} bytes" for i, b in enumerate(point.client_cache_bytes)
                if self.o.cache_budget_bytes and b > self.o.cache_budget_bytes]
        if self.o.state_budget_bytes and point.state_dir_bytes > self.o.state_budget_bytes:
            over.append(f"coordinator state {point.state_dir_bytes} bytes")
        if over:
            print(f"  OVER BUDGET at {point.visits} visits: {', '.join(over)}", flush=True)

    def _check_accepted(self) -> None:
        """Every version a client heard accepted is in the coordinator's history."""
        accepted: set[int] = set()
        for site in self.sites:
            accepted.update(int(v) for v in ACCEPTED.findall(site.log.read_text(errors="replace")))
        committed = self.all_visit_versions()
        self.result.accepted_versions = len(accepted)
        self.result.missing_versions = sorted(accepted - committed)


ACCEPTED = re.compile(r"round \d+: .* -> version (\d+);")  # client/daemon.py's line per accepted upload


@dataclass(frozen=True)
class Verdict:
    rss_slope_mb_per_100_visits: float
    get_task_ms_first: float       # medians over the first and the last quarter of the samples
    get_task_ms_last: float
    heartbeat_ms_first: float
    heartbeat_ms_last: float
    max_client_cache_bytes: int
    max_state_dir_bytes: int
    max_open_fds: int
    max_threads: int


def slope_per_100_visits(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value against visits, times 100."""
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def verdict(result: SoakResult) -> Verdict:
    s = result.samples
    # The coordinator's RSS starts over at its restart: the slope is fitted on the longer of the two lives, each
    # after its own warm-up (a share of the run's visits past the life's first sample).
    lives = [s[:result.restart_at_sample], s[result.restart_at_sample:]] if result.restart_at_sample else [s]
    warm_lives = [[p for p in life if p.visits >= life[0].visits + WARMUP_FRACTION * result.total_visits]
                  for life in lives if life]
    stretch = max(warm_lives, key=len, default=[])
    quarter = max(1, len(s) // 4)
    return Verdict(
        rss_slope_mb_per_100_visits=slope_per_100_visits([(p.visits, p.coordinator_rss_bytes / 1e6) for p in stretch]),
        get_task_ms_first=_median([p.get_task_ms for p in s[:quarter]]),
        get_task_ms_last=_median([p.get_task_ms for p in s[-quarter:]]),
        heartbeat_ms_first=_median([p.heartbeat_ms for p in s[:quarter]]),
        heartbeat_ms_last=_median([p.heartbeat_ms for p in s[-quarter:]]),
        max_client_cache_bytes=max((max(p.client_cache_bytes) for p in s), default=0),
        max_state_dir_bytes=max((p.state_dir_bytes for p in s), default=0),
        max_open_fds=max((p.open_fds for p in s), default=0), max_threads=max((p.threads for p in s), default=0))


def write_report(result: SoakResult, out: Path) -> Verdict:
    v = verdict(result)
    o = result.options
    (out / "samples.json").write_text(json.dumps({"result": asdict(result), "verdict": asdict(v)}, indent=1))
    mib = 2 ** 20
    lines = [
        f"{result.total_visits} visits, {o.clients} clients, {result.client_kills} client kills, "
        f"{result.coordinator_restarts} coordinator restart(s), {result.wall_seconds / 60:.1f} min",
        "",
        "| figure | value | target |",
        "|---|---:|---|",
        f"| coordinator RSS slope after warm-up | {v.rss_slope_mb_per_100_visits:.2f} MB / 100 visits | "
        f"< {RSS_SLOPE_TARGET_MB:g}: {'met' if v.rss_slope_mb_per_100_visits < RSS_SLOPE_TARGET_MB else 'NOT met'} |",
        f"| GetTask latency (median, first / last quarter) | {v.get_task_ms_first:.1f} / {v.get_task_ms_last:.1f} ms | "
        "flat |",
        f"| Heartbeat latency (median, first / last quarter) | {v.heartbeat_ms_first:.1f} / {v.heartbeat_ms_last:.1f} "
        "ms | flat |",
        f"| largest client cache | {v.max_client_cache_bytes / mib:.1f} MiB | "
        + (f"budget {o.cache_budget_bytes / mib:.1f} MiB: "
           f"{'met' if v.max_client_cache_bytes <= o.cache_budget_bytes else 'NOT met'} |"
           if o.cache_budget_bytes else "(no budget checked) |"),
        f"| coordinator state folder, largest | {v.max_state_dir_bytes / mib:.1f} MiB | "
        + (f"budget {o.state_budget_bytes / mib:.1f} MiB: "
           f"{'met' if v.max_state_dir_bytes <= o.state_budget_bytes else 'NOT met'} |"
           if o.state_budget_bytes else "(no budget checked) |"),
        f"| open file descriptors / threads, largest | {v.max_open_fds} / {v.max_threads} | flat |",
        f"| accepted visits missing at the end | {len(result.missing_versions)} of {result.accepted_versions} | 0: "
        f"{'met' if not result.missing_versions else 'NOT met ' + str(result.missing_versions[:10])} |",
    ]
    (out / "soak.md").write_text("\n".join(lines) + "\n")
    _plot(result, out / "soak.png")
    print("\n".join(lines))
    return v


def _plot(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.samples
    x = [p.visits for p in s]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels: list[tuple[Any, str, list[tuple[str, list[float]]]]] = [
        (axes[0][0], "coordinator RSS (MiB)", [("RSS", [p.coordinator_rss_bytes / 2**20 for p in s])]),
        (axes[0][1], "disk (MiB)", [("coordinator state", [p.state_dir_bytes / 2**20 for p in s]),
                                    ("largest client cache", [max(p.client_cache_bytes) / 2**20 for p in s])]),
        (axes[1][0], "latency (ms, median of 5)", [("GetTask", [p.get_task_ms for p in s]),
                                                   ("Heartbeat", [p.heartbeat_ms for p in s])]),
        (axes[1][1], "coordinator", [("open fds", [float(p.open_fds) for p in s]),
                                     ("threads", [float(p.threads) for p in s])]),
    ]
    for ax, title, series in panels:
        for label, ys in series:
            ax.plot(x, ys, label=label)
        ax.set_title(title)
        ax.legend()
    for ax in axes[1]:
        ax.set_xlabel("visits committed")
    fig.suptitle(f"soak: {result.total_visits} visits, {result.client_kills} client kills, "
                 f"{result.coordinator_restarts} coordinator restart")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakOptions(out="bench-out/soak")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    result = Soak(SoakOptions(**vars(args))).run()
    options = result.options  # with the budget the run checked
    v = write_report(result, Path(options.out))
    ok = (not result.missing_versions and v.rss_slope_mb_per_100_visits < RSS_SLOPE_TARGET_MB
          and (not options.cache_budget_bytes or v.max_client_cache_bytes <= options.cache_budget_bytes)
          and (not options.state_budget_bytes or v.max_state_dir_bytes <= options.state_budget_bytes))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the soak itself only samples
    sys.exit(main())
