"""Side by side with Flower: the same federated jobs run by Flower's deployment runtime and by fedcybgd, one system
at a time, measured the same way.

    .venv/bin/python bench/peers.py --out bench-out/peers                 # every job, both systems, twice
    .venv/bin/python bench/peers.py --model tiny --out /tmp/peers --repeats 1 --local-steps 2   # smoke test

Flower (``flwr==1.42.0``, pinned in bench/flower_run.py) is installed into its own virtual environment under
``--out`` on first use (bench/flower_run.py: torch first and alone, then Flower, then our transformers/peft/
safetensors versions); it is not a project dependency. Its side is bench/flower_app/, a minimal app as a new user
writes it (FedAvg over ``ArrayRecord(model.state_dict())``, LoRA adapters FlowerTune-style), run as SuperLink, two
SuperNodes and ``flwr run`` on loopback. Ours is ``fedcybgd demo`` (a coordinator and two client processes over
mutual TLS) with ``--port`` and ``--clients-dial``, so its clients too reach the server through the proxy.

The job (the same for both): the model (default the packaged SmolLM2-135M-Instruct in bf16), the Shakespeare plays
split over two clients by works (the sequences Flower's clients train on are packed by our loader from the same
client folders), ``local_steps`` AdamW steps per round at a constant learning rate (fp32 masters of bf16 weights,
gradient clipping at 1.0 on both sides), batch and sequence length alike, both clients every round, as many rounds
as our FedAvg schedule gives for one cycle's tokens (FedCyBGD: one cycle, the same tokens). Measured per run:
- bytes on the wire in each direction, counted by one loopback TCP proxy (bench/wire.py) between the sites and the
  server: everything the sites send and receive (registration, polling; TLS records on our side, plain HTTP on
  Flower's, which runs ``--insecure`` here);
- time per round (ours: a round's visit from issue to merge; Flower's: configure to aggregate) and in all (ours:
  the demo's wall time, which also holds the base model's evaluation and the export; Flower's: ``flwr run`` to the
  final model written);
- peak memory of each side from /proc, every process of it (ours: the coordinator; the two clients. Flower's:
  SuperLink, SuperExec and ServerApp; SuperNodes, SuperExecs and ClientApps): the peak of the summed RssAnon, and
  the largest VmHWM of one process;
- the held-out loss of the final model (the test split of bench/curve_inputs.py, one evaluation code for both);
- the CPU other processes used meanwhile (a disturbed run says so).
Writes results.json (every run) and table.md (means over repeats, ratios fedcybgd/Flower).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from curve_inputs import block_specs, prepare
from flower_run import FLOWER_VERSION, FlowerJob, ensure_flower_venv, run_flower
from wire import ByteCountingProxy, ProcessSampler, children, cmdline, free_port


@dataclass(frozen=True)
class Job:
    mode: str               # "full": FedAvg of every parameter; "lora": FedAvg of LoRA adapters; "cybgd": ours only
    local_steps: int        # per round (FedCyBGD: per visit)
    lr: float
    hold_base: bool = True  # our clients start with the base weights (Flower's clients always read them from disk)

    @property
    def label(self) -> str:
        name = {"full": "fedavg-full", "lora": "fedlora", "cybgd": "cybgd (ours only)"}[self.mode]
        held = "" if self.hold_base else ", our clients download the base"
        return f"{name}, {self.local_steps} steps, lr {self.lr:g}{held}"

    def flower_key(self) -> tuple[str, int, float] | None:
        """Jobs that differ only in what our clients hold share one Flower job; FedCyBGD has no Flower job."""
        return None if self.mode == "cybgd" else (self.mode, self.local_steps, self.lr)


#: Realistic settings (20 local steps at 1e-4; LoRA at its usual larger rate) and the light ones first tried.
JOBS = [
    Job("full", 20, 1e-4),
    Job("full", 20, 1e-4, hold_base=False),
    Job("full", 2, 1e-5),
    Job("lora", 20, 1e-3),
    Job("cybgd", 20, 1e-4),
]
CLIENTS = 2


@dataclass
class Measured:
    """One run of one system on one job."""

    system: str             # "fedcybgd" | "flower"
    job: str
    repeat: int
    bytes_up: int           # sites -> server, through the proxy
    bytes_down: int
    round_seconds: list[float]
    total_seconds: float
    server_peak_bytes: int  # peak of the summed RssAnon of the server's processes
    server_hwm_bytes: int   # largest VmHWM of one server process
    client_peak_bytes: int  # both sites together
    client_hwm_bytes: int
    test_loss: float
    other_cpu_seconds: float

    @property
    def seconds_per_round(self) -> float:
        return sum(self.round_seconds) / max(1, len(self.round_seconds))


# ------------------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Inputs:
    model_dir: Path
    split: Path             # client-<i>/ and eval/ (our clients' data and the coordinator's evaluation)
    test: Path              # the reported held-out split
    flower_data: list[Path]  # per client: the packed sequences of client-<i>/, for Flower's clients
    rounds: int             # FedAvg rounds of two clients for one FedCyBGD cycle's tokens


def make_inputs(args: argparse.Namespace) -> Inputs:
    import safetensors.torch
    from transformers import AutoTokenizer

    from fedcybgd.common.data import load_packed
    from fedcybgd.common.prompts import resolve_prompt_format
    from fedcybgd.server.scheduler import ScheduleConfig
    from fedcybgd.server.strategies.fedavg import FedAvgRounds

    args.clients, args.layers, args.corpus = CLIENTS, 0, None  # what curve_inputs.prepare reads
    model_dir, split, test = prepare(args)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = resolve_prompt_format("auto", "responses", tokenizer)  # the coordinator's default
    flower_data = []
    for i in range(CLIENTS):
        path = Path(args.out) / "flower-data" / f"client-{i}.safetensors"
        if not path.is_file():
            rows = load_packed(split / f"client-{i}", tokenizer, args.seq_len, prompt)
            labels = rows.labels if rows.labels is not None else rows.ids.clone()
            path.parent.mkdir(parents=True, exist_ok=True)
            safetensors.torch.save_file({"input_ids": rows.ids.contiguous(), "labels": labels.contiguous()},
                                        str(path))
        flower_data.append(path)
    blocks = len(block_specs(model_dir, args.layers_per_block))
    rounds = FedAvgRounds(blocks, ScheduleConfig(cycles=1), CLIENTS).total_rounds
    return Inputs(model_dir, split, test, flower_data, rounds)


# ------------------------------------------------------------------------------------------------------ runs


def run_ours(job: Job, inputs: Inputs, repeat: int, args: argparse.Namespace) -> Measured:
    """``fedcybgd demo`` with its clients dialing the proxy; the coordinator and clients sampled as they start."""
    work = Path(args.out) / "runs" / f"fedcybgd-{_slug(job.label)}-{repeat}"
    port = free_port()
    sampler = ProcessSampler().start()
    proxy = ByteCountingProxy(f"127.0.0.1:{port}", work / "proxy-stats.json")
    work.mkdir(parents=True, exist_ok=True)
    strategy = {"full": "fedavg-full", "lora": "fedlora", "cybgd": "cybgd"}[job.mode]
    cmd = [sys.executable, "-m", "fedcybgd.cli.main", "--log-level", "warning", "demo", "--model",
           str(inputs.model_dir), "--split", str(inputs.split), "--clients", str(CLIENTS), "--cycles", "1",
           "--layers-per-block", str(args.layers_per_block), "--local-steps", str(job.local_steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(job.lr),
           "--lr-schedule", "constant", "--strategy", strategy, "--clients-per-round", str(CLIENTS),
           "--lora-rank", str(args.lora_rank), "--threads", str(args.threads), "--eval-sequences", "8",
           "--embed-head-every", "1", "--seed", str(repeat), "--port", str(port), "--clients-dial", proxy.start(),
           "--out", str(work / "run"),
           *([] if job.hold_base else ["--clients-download-base"])]
    sampler.add_root("proxy", proxy.pid)
    done = threading.Event()
    with open(work / "demo.log", "w") as log:
        demo = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    adopter = threading.Thread(target=_adopt, args=(sampler, demo.pid, done), daemon=True)
    adopter.start()
    try:
        if demo.wait(timeout=args.timeout) != 0:
            raise RuntimeError(f"fedcybgd demo failed; see {work / 'demo.log'}")
    finally:
        done.set()
        adopter.join()
        report = sampler.stop()
        wire = proxy.stop()
    summary = json.loads((work / "run" / "summary.json").read_text())
    server, client = report.role("server"), report.role("client")
    return Measured("fedcybgd", job.label, repeat, wire.up, wire.down, [v["seconds"] for v in summary["visits"]],
                    summary["wall_seconds"], server.peak_rss_anon_sum_bytes, server.max_hwm_bytes,
                    client.peak_rss_anon_sum_bytes, client.max_hwm_bytes,
                    test_loss(Path(summary["export_dir"]), inputs, args), report.other_cpu_seconds)


def _adopt(sampler: ProcessSampler, demo: int, done: threading.Event) -> None:
    """Sample the demo's coordinator as "server" and its clients as "client" as soon as each starts (the demo
    process itself, which only orchestrates, is neither)."""
    adopted: set[int] = set()
    while not done.wait(0.05):
        for pid in children(demo):
            args = cmdline(pid).split()
            role = "server" if "coordinator" in args else "client" if "client" in args else None
            if role and pid not in adopted:
                adopted.add(pid)
                sampler.add_root(role, pid)


def run_theirs(job: Job, inputs: Inputs, repeat: int, args: argparse.Namespace, venv: Path) -> Measured:
    work = Path(args.out) / "runs" / f"flower-{_slug(job.label)}-{repeat}"
    result = run_flower(FlowerJob(model_dir=inputs.model_dir, data=inputs.flower_data, rounds=inputs.rounds,
                                  local_steps=job.local_steps, batch_size=args.batch_size, lr=job.lr, seed=repeat,
                                  threads=args.threads, mode=job.mode, lora_rank=args.lora_rank), work, venv)
    return Measured("flower", job.label, repeat, result.wire.up, result.wire.down, result.round_seconds,
                    result.wall_seconds, result.server.peak_rss_anon_sum_bytes, result.server.max_hwm_bytes,
                    result.client.peak_rss_anon_sum_bytes, result.client.max_hwm_bytes,
                    test_loss(result.final, inputs, args, weights_only=True), result.other_cpu_seconds)


def test_loss(path: Path, inputs: Inputs, args: argparse.Namespace, weights_only: bool = False) -> float:
    """Held-out loss of a model directory, or (``weights_only``) of the base model with a safetensors file's
    weights: one evaluation for both systems."""
    import safetensors.torch
    from curves import _loss, _test_sequences
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(inputs.model_dir if weights_only else path))
    if weights_only:
        model.load_state_dict(safetensors.torch.load_file(str(path)))
    return _loss(model, _test_sequences(inputs.model_dir, inputs.test, args))


# ------------------------------------------------------------------------------------------------------ report


def table(runs: list[Measured], jobs: list[Job]) -> str:
    """Means over repeats per job and system, and the ratios fedcybgd / Flower (a job whose Flower twin is another
    job's, differing only in what our clients hold, is compared with that job's Flower runs)."""
    first: dict[tuple[str, int, float] | None, str] = {}
    for j in jobs:
        first.setdefault(j.flower_key(), j.label)
    flower_label = {j.label: first[j.flower_key()] for j in jobs}
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    lines = ["| job | system | runs | MB up | MB down | s per round | s in all | server peak MiB (max one) | "
             "clients peak MiB (max one) | test loss | other CPU s |", "|---|---|---:|" + "---:|" * 8]
    for label in dict.fromkeys(r.job for r in runs):
        means = {}
        for system in ("fedcybgd", "flower"):
            wanted = flower_label.get(label, label) if system == "flower" else label
            rs = [r for r in runs if r.job == wanted and r.system == system]
            if not rs:
                continue
            m = {k: mean([float(getattr(r, k)) for r in rs]) for k in
                 ("bytes_up", "bytes_down", "seconds_per_round", "total_seconds", "server_peak_bytes",
                  "server_hwm_bytes", "client_peak_bytes", "client_hwm_bytes", "test_loss", "other_cpu_seconds")}
            means[system] = m
            lines.append(f"| {label} | {system} | {len(rs)} | {m['bytes_up'] / 1e6:.1f} | {m['bytes_down'] / 1e6:.1f} "
                         f"| {m['seconds_per_round']:.1f} | {m['total_seconds']:.0f} | "
                         f"{m['server_peak_bytes'] / 2**20:.0f} ({m['server_hwm_bytes'] / 2**20:.0f}) | "
                         f"{m['client_peak_bytes'] / 2**20:.0f} ({m['client_hwm_bytes'] / 2**20:.0f}) | "
                         f"{m['test_loss']:.4f} | {m['other_cpu_seconds']:.0f} |")
        if len(means) == 2:
            o, f = means["fedcybgd"], means["flower"]
            lines.append(f"| {label} | **ratio** | | {o['bytes_up'] / f['bytes_up']:.3f} | "
                         f"{o['bytes_down'] / f['bytes_down']:.3f} | "
                         f"{o['seconds_per_round'] / f['seconds_per_round']:.2f} | "
                         f"{o['total_seconds'] / f['total_seconds']:.2f} | "
                         f"{o['server_peak_bytes'] / f['server_peak_bytes']:.2f} | "
                         f"{o['client_peak_bytes'] / f['client_peak_bytes']:.2f} | | |")
    return "\n".join(lines)


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/peers")
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a Hugging Face model directory")
    parser.add_argument("--layers-per-block", type=int, default=6,
                        help="FedCyBGD's blocks; one cycle of them sets the tokens (and the FedAvg rounds)")
    parser.add_argument("--local-steps", type=int, help="every job's local steps (default: each job's own)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // CLIENTS),
                        help="torch threads per client (both clients train at once)")
    parser.add_argument("--eval-sequences", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="job labels to run (default: all; see JOBS)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds one run of ours may take")
    args = parser.parse_args()
    jobs = [replace(j, local_steps=args.local_steps) if args.local_steps else j for j in JOBS]
    jobs = [j for j in jobs if not args.only or j.label in args.only]
    out = Path(args.out)
    inputs = make_inputs(args)
    venv = ensure_flower_venv(out, FLOWER_VERSION) if any(j.flower_key() for j in jobs) else None
    store = out / "results.json"
    runs = [Measured(**r) for r in json.loads(store.read_text())["runs"]] if store.is_file() else []
    for repeat in range(args.repeats):
        flower_done: set[tuple[str, int, float]] = set()
        for job in jobs:
            key = job.flower_key()
            systems = ["fedcybgd"]
            if key is not None and key not in flower_done and venv is not None:
                flower_done.add(key)
                systems.append("flower")
            for system in systems:
                if any(r.system == system and r.job == job.label and r.repeat == repeat for r in runs):
                    continue
                print(f"[{system}] {job.label} (repeat {repeat + 1}/{args.repeats})", flush=True)
                started = time.monotonic()
                runs.append(run_theirs(job, inputs, repeat, args, venv) if system == "flower" and venv
                            else run_ours(job, inputs, repeat, args))
                print(f"[{system}] done in {time.monotonic() - started:.0f} s", flush=True)
                store.write_text(json.dumps({"flower": FLOWER_VERSION, "rounds": inputs.rounds,
                                             "settings": vars(args), "runs": [asdict(r) for r in runs]}, indent=1))
    text = table(runs, jobs)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
