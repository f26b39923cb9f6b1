#!/usr/bin/env python
"""Running a job on Flower's deployment runtime, measured like fedcybgd: the Flower half of the side-by-side
benchmark.

Flower runs as a user would run it on one machine: a SuperLink, one SuperNode per client and ``flwr run`` of the
app in ``bench/flower_app`` (Message API, ``FedAvg``), each a separate process on loopback. The SuperNodes dial
the SuperLink through a ``ByteCountingProxy`` (bytes each way on the wire) and a ``ProcessSampler`` follows the
server side (SuperLink and everything it spawns: SuperExec, ServerApp) and the client side (SuperNodes and their
SuperExec and ClientApp processes).

Flower 1.42 serves its Fleet, Control and ServerAppIo APIs over HTTP on one port (``--host``/``--port``); only the
SuperNodes use the proxied address, so only Fleet traffic (what crosses the network in a real deployment) is
counted. Flower and its own grpcio/protobuf live in a venv of their own (``ensure_flower_venv``) with our torch,
transformers, peft and safetensors versions.

    .venv/bin/python bench/flower_run.py venv /tmp/peers             # creates /tmp/peers/flower-venv (idempotent)
    .venv/bin/python bench/flower_run.py run job.json /tmp/peers/run  # one job (FlowerJob's fields), result as JSON
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wire import ByteCountingProxy, ProcessSampler, RoleUsage, SamplerReport, WireBytes, free_port, process_start_time

__all__ = ["FLOWER_VERSION", "WORKAROUNDS", "FlowerJob", "FlowerResult", "RoundTime", "ensure_flower_venv",
           "run_flower"]

#: The Flower release the benchmark is written against (the CLI flags and the Message API of 1.42).
FLOWER_VERSION = "1.42.0"
#: Installed at the benchmark interpreter's own versions, after torch.
_SAME_AS_OURS = ("transformers", "peft", "safetensors")
APP_DIR = Path(__file__).resolve().parent / "flower_app"
#: The name of the SuperLink connection written to the CLI's $FLWR_HOME/config.toml.
CONNECTION = "bench"

#: What running Flower 1.42 offline on loopback needed beyond its documented quickstart, for the report.
WORKAROUNDS = [
    "flwr, torch, transformers, peft, safetensors in a venv of their own (Flower pins grpcio/protobuf<7 apart from "
    "ours); torch installed first and alone so that pip takes the local CPU wheel rather than CUDA builds",
    "the Flower venv's bin/ first on PATH: the SuperLink and the SuperNodes start flower-superexec, flwr-serverapp "
    "and flwr-clientapp by name",
    "flower-superlink --disable-runtime-dependency-installation (and FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1): "
    "by default the SuperLink's SuperExec runs `uv sync` on the app's dependencies, which needs the network",
    "FLWR_TELEMETRY_ENABLED=0 and FLWR_DISABLE_UPDATE_CHECK=1: telemetry and the update check call the internet",
    "the SuperLink connection lives in $FLWR_HOME/config.toml ([superlink.bench] address, insecure = true), not in "
    "[tool.flwr.federations] of the app's pyproject.toml: 1.42's `flwr run` migrates that section and comments it "
    "out in the app's own pyproject.toml; `flwr run APP bench` names the connection",
    "one FLWR_HOME per process (CLI, SuperLink, each SuperNode): every runtime process installs the FAB under "
    "$FLWR_HOME/apps",
    "no per-API addresses in 1.42: --fleet-api-address/--control-api-address are deprecated, the SuperLink serves "
    "Fleet, Control and ServerAppIo over HTTP on --host/--port; the SuperNode's ClientAppIo API likewise takes "
    "--host/--port (no --clientappio-api-address)",
    "arrays travel as float32 (ArrayRecord converts through numpy, which has no bfloat16); the ServerApp rounds the "
    "final model to the stored dtype",
]


# -- the venv -------------------------------------------------------------------------------------------------------

def _wanted(version: str) -> dict[str, str]:
    """Package -> exact version: torch first (it must be installed alone), then Flower, then our training stack."""
    wanted = {"torch": importlib.metadata.version("torch"), "flwr": version}
    wanted.update({name: importlib.metadata.version(name) for name in _SAME_AS_OURS})
    return wanted


def ensure_flower_venv(root: Path, version: str = FLOWER_VERSION) -> Path:
    """``root/flower-venv`` with Flower ``version`` and our torch/transformers/peft/safetensors versions; returns
    the venv's folder. Reused as it is when its marker file records the same versions.

    torch is installed first and alone: asked for as a dependency of peft or transformers, pip could resolve it to
    the CUDA build from the public index (gigabytes of nvidia-* wheels) instead of the local CPU wheel."""
    venv = root / "flower-venv"
    marker = venv / "fedcybgd-bench-versions.json"
    wanted = _wanted(version)
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        print(f"[flower-venv] {venv} is ready ({', '.join(f'{k}=={v}' for k, v in wanted.items())})", flush=True)
        return venv
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"[flower-venv] creating {venv} with {sys.executable}", flush=True)
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for name, pinned in wanted.items():
        print(f"[flower-venv] pip install {name}=={pinned}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", f"{name}=={pinned}"], check=True)
    marker.write_text(json.dumps(wanted, indent=1) + "\n")
    print(f"[flower-venv] {venv} is ready", flush=True)
    return venv


def _flower_version(venv: Path) -> str:
    marker = venv / "fedcybgd-bench-versions.json"
    return str(json.loads(marker.read_text()).get("flwr", "?")) if marker.exists() else "?"


# -- job and result -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowerJob:
    """One job for Flower, the same fields as the job fedcybgd runs (see bench/flower_app/fedbench_flower/task.py)."""

    model_dir: Path  # a Hugging Face model directory (bf16 weights)
    data: list[Path]  # per client: safetensors with input_ids and labels, int64 [n, seq_len]
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    seed: int = 0
    threads: int = 1
    mode: str = "full"  # "full" | "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    stall_seconds: float = 600.0  # abort when no log grows and no round ends for this long

    def to_json(self, out: Path) -> dict[str, object]:
        """The job file the Flower app reads."""
        job = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "stall_seconds"}
        job["data"] = [str(p) for p in self.data]
        job["out"] = str(out)
        return job


@dataclass(frozen=True)
class RoundTime:
    """One round as the ServerApp timed it: configure_train to the end of aggregate_train."""

    round: int
    seconds: float
    replies: int
    train_loss: float


@dataclass
class FlowerResult:
    """What one Flower run measured."""

    wire: WireBytes  # SuperNodes <-> SuperLink, whole session (registration and polling included)
    wall_seconds: float  # `flwr run` started -> final model written
    rounds: list[RoundTime]
    server: RoleUsage  # SuperLink, its SuperExec and the ServerApp
    client: RoleUsage  # the SuperNodes, their SuperExecs and ClientApps
    sampler: SamplerReport  # every role (also "proxy" and "cli") and the machine's CPU
    other_cpu_seconds: float  # CPU used by unrelated processes during the run (disturbance)
    final: Path  # final.safetensors
    flower_version: str
    workarounds: list[str] = field(default_factory=lambda: list(WORKAROUNDS))
    logs: Path = Path()

    @property
    def round_seconds(self) -> list[float]:
        return [r.seconds for r in self.rounds]


# -- processes ------------------------------------------------------------------------------------------------------

def _env(venv: Path, home: Path, threads: int) -> dict[str, str]:
    """The environment of one Flower process: the Flower venv first on PATH, offline, its own FLWR_HOME."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({
        "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv), "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
        # Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning pool steals the CPU of the
        # other processes of the run (as bench/workers.py does for our side).
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    })
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:  # a fresh log per run: readiness is read from it
        return subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for(what: str, ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {p.args!r} exited with code {p.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready within {timeout} s")
        time.sleep(0.2)


def _logged(log: Path, text: str) -> Callable[[], bool]:
    """Whether ``text`` appeared in ``log`` (a SuperNode logs its id once it registered with the SuperLink)."""
    return lambda: text in _tail(log, 1_000_000)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process, then SIGKILL whatever is left after ``grace`` seconds."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _kill_leftovers(report: SamplerReport) -> None:
    """SIGKILL descendants of our processes that outlived them (detached SuperExecs, ClientApps): only processes the
    sampler saw under our roots, and only while their start time still matches (the pid was not reused)."""
    for usage in report.roles:
        for rec in usage.processes:
            if rec.start_time and process_start_time(rec.pid) == rec.start_time:
                with contextlib.suppress(OSError):
                    os.kill(rec.pid, signal.SIGKILL)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# -- the run --------------------------------------------------------------------------------------------------------

def _write_cli_config(home: Path, port: int) -> None:
    """The CLI's SuperLink connection (Flower 1.42 reads it from $FLWR_HOME/config.toml)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
        "insecure = true\n")


def _read_rounds(out: Path) -> list[RoundTime]:
    try:
        raw = json.loads((out / "rounds.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []
    return [RoundTime(round=int(r["round"]), seconds=float(r["seconds"]), replies=int(r["replies"]),
                      train_loss=float(r["train_loss"])) for r in raw]


def _progress_mark(logs: Path, out: Path) -> tuple[int, int]:
    """What grows while a run makes progress: the logs' total size and the rounds completed."""
    size = sum(p.stat().st_size for p in logs.glob("*.log"))
    return size, len(_read_rounds(out))


def _wait_for_run(job: FlowerJob, run: subprocess.Popen[bytes], runtime: list[subprocess.Popen[bytes]],
                  logs: Path, out: Path) -> None:
    """Until the ServerApp wrote done.json; raises when the run failed or stalled."""
    mark, since, ended = _progress_mark(logs, out), time.monotonic(), None
    while not (out / "done.json").exists():
        time.sleep(0.5)
        for p in runtime:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args!r} exited with code {p.returncode} during the run")
        if run.poll() is not None and ended is None:
            ended = time.monotonic()  # the log stream ends with the run: done.json must follow at once
        if ended is not None and time.monotonic() - ended > 15:
            raise RuntimeError(f"`flwr run` ended (code {run.returncode}) without the ServerApp finishing")
        now_mark = _progress_mark(logs, out)
        if now_mark != mark:
            mark, since = now_mark, time.monotonic()
        elif time.monotonic() - since > job.stall_seconds:
            raise TimeoutError(f"no progress for {job.stall_seconds:.0f} s (rounds done: {mark[1]})")


def run_flower(job: FlowerJob, work: Path, venv: Path | None = None) -> FlowerResult:
    """Run ``job`` on Flower's deployment runtime under ``work`` (logs in ``work/logs``, outputs in ``work/out``)
    and measure it. ``venv``: a Flower venv from ``ensure_flower_venv`` (default: made or reused in ``work``).
    Raises when the run fails or stalls, with the end of the logs."""
    venv = venv or ensure_flower_venv(work)
    logs, out, homes = work / "logs", work / "out", work / "flwr-home"
    for d in (logs, out):
        d.mkdir(parents=True, exist_ok=True)
    for stale in ("done.json", "rounds.json", "final.safetensors"):
        (out / stale).unlink(missing_ok=True)
    job_file = work / "job.json"
    job_file.write_text(json.dumps(job.to_json(out), indent=1) + "\n")
    bin_ = venv / "bin"
    port = free_port()

    sampler = ProcessSampler().start()
    runtime: list[subprocess.Popen[bytes]] = []
    proxy = ByteCountingProxy(f"127.0.0.1:{port}", work / "proxy-stats.json")
    run: subprocess.Popen[bytes] | None = None
    report: SamplerReport | None = None
    try:
        link = _start([str(bin_ / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                       "--disable-runtime-dependency-installation"],
                      _env(venv, homes / "superlink", job.threads), logs / "superlink.log")
        runtime.append(link)
        sampler.add_root("server", link.pid)
        _wait_for("flower-superlink", lambda: _listening(port), runtime, 120)
        address = proxy.start()
        sampler.add_root("proxy", proxy.pid)
        for i in range(len(job.data)):
            node = _start([str(bin_ / "flower-supernode"), "--insecure", "--superlink", address,
                           "--host", "127.0.0.1", "--port", str(free_port()),
                           "--node-config", f"partition-id={i} num-partitions={len(job.data)}"],
                          _env(venv, homes / f"supernode-{i}", job.threads), logs / f"supernode-{i}.log")
            runtime.append(node)
            sampler.add_root("client", node.pid)
        for i in range(len(job.data)):
            log = logs / f"supernode-{i}.log"
            _wait_for(f"supernode {i}", _logged(log, "SuperNode ID"), runtime, 120)

        cli_home = homes / "cli"
        _write_cli_config(cli_home, port)
        start = time.monotonic()
        run = _start([str(bin_ / "flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
                      "--run-config", f'job="{job_file}"'], _env(venv, cli_home, job.threads), logs / "flwr-run.log")
        sampler.add_root("cli", run.pid)
        try:
            _wait_for_run(job, run, runtime, logs, out)
        except (RuntimeError, TimeoutError) as exc:
            tails = "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(logs.glob("*.log")))
            raise RuntimeError(f"Flower run failed: {exc}\n{tails}") from exc
        wall = time.monotonic() - start
        report = sampler.stop()
    finally:
        if report is None:
            report = sampler.stop()
        _stop([p for p in (run,) if p is not None] + runtime[::-1])
        wire = proxy.stop()
        _kill_leftovers(report)
    return FlowerResult(wire=wire, wall_seconds=wall, rounds=_read_rounds(out), server=report.role("server"),
                        client=report.role("client"), sampler=report, other_cpu_seconds=report.other_cpu_seconds,
                        final=out / "final.safetensors", flower_version=_flower_version(venv), logs=logs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("venv", help="create or reuse ROOT/flower-venv")
    v.add_argument("root", type=Path)
    r = sub.add_parser("run", help="run a job (JSON with FlowerJob's fields) and print the result as JSON")
    r.add_argument("job", type=Path)
    r.add_argument("work", type=Path)
    r.add_argument("--venv-root", type=Path, help="where flower-venv is (default: WORK)")
    args = parser.parse_args(argv)
    if args.command == "venv":
        ensure_flower_venv(args.root)
        return 0
    raw = json.loads(args.job.read_text())
    raw["model_dir"], raw["data"] = Path(raw["model_dir"]), [Path(p) for p in raw["data"]]
    venv = ensure_flower_venv(args.venv_root or args.work)
    result = run_flower(FlowerJob(**raw), args.work, venv=venv)
    print(json.dumps(asdict(result), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
