"""FedCyBGD against the alternatives a user would pick instead, on the same model, data and tokens.

Every federated strategy runs as the demo does (a real coordinator and client processes over
mutual TLS; SmolLM2-135M in bf16 on the Shakespeare partition by default); the two centralized
references train in one process on the pooled client data. All see the same number of training
tokens (one FedCyBGD cycle's: blocks x local steps x batch x sequence length), the same held-out
works and the same evaluation. Reported per strategy: held-out loss, bytes on the wire, client
compute seconds (sum of every visit's training time; one torch thread everywhere so seconds
compare) and client peak memory (RSS on CPU, per visit). Writes results.json, table.md and
three PNG plots.

    .venv/bin/python bench/strategies.py --out bench-out/strategies     # ~30 min on an idle 2-core machine
    .venv/bin/python bench/strategies.py --model tiny --out /tmp/strat  # a minute, smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

#: (label, demo arguments) of the federated strategies.
FEDERATED = [
    ("cybgd", ["--strategy", "cybgd"]),
    ("cybgd-parallel (K=2)", ["--strategy", "cybgd-parallel", "--max-concurrent-visits", "2"]),
    ("fedavg-full (2/round)", ["--strategy", "fedavg-full", "--clients-per-round", "2"]),
    ("fedlora r8 (2/round, lr x5)", ["--strategy", "fedlora", "--clients-per-round", "2", "--lr-factor", "5"]),
]
CENTRALIZED = ["centralized full FT", "centralized block-cyclic", "centralized block-cyclic int8",
               "centralized block-cyclic nf4"]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_")


def run_federated(label: str, extra: list[str], args: argparse.Namespace) -> dict:
    out = Path(args.out) / _slug(label)
    summary_path = out / "summary.json"
    extra = list(extra)
    lr = args.lr
    if "--lr-factor" in extra:
        i = extra.index("--lr-factor")
        lr *= float(extra[i + 1])
        del extra[i:i + 2]
    if not (args.reuse and summary_path.is_file()):
        cmd = [sys.executable, "-m", "fedcybgd.cli.main", "demo", "--model", args.model, "--clients", str(args.clients),
               "--cycles", "1", "--threads", "1", "--lr", str(lr), "--local-steps", str(args.local_steps),
               "--out", str(out), *extra]
        print(f"[{label}] {' '.join(cmd[3:])}", flush=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    s = json.loads(summary_path.read_text())
    visits = s["visits"]
    return {
        "strategy": label, "eval_loss_before": s["eval_loss_before"], "eval_loss_after": s["eval_loss_after"],
        "bytes": s["total_bytes_down"] + s["total_bytes_up"],
        "client_compute_seconds": sum(v["train_seconds"] for v in visits),
        "client_peak_memory_bytes": max(v["peak_memory_bytes"] for v in visits),
        "samples": sum(v["samples"] for v in visits), "wall_seconds": s["wall_seconds"],
    }


def run_centralized(label: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / _slug(label)
    result_path = out / "result.json"
    if not (args.reuse and result_path.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--centralized", label, "--model", args.model, "--clients", str(args.clients),
               "--lr", str(args.lr), "--local-steps", str(args.local_steps), "--out", str(out)]
        print(f"[{label}] in one process", flush=True)
        with open(out.parent / f"{out.name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(result_path.read_text())


def centralized_main(args: argparse.Namespace) -> None:
    """One centralized reference, in this process: its peak RSS is its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedcybgd.cli.demo import DemoOptions, prepare_inputs
    from fedcybgd.cli.main import DEMO_DEFAULTS
    from fedcybgd.common.data import load_packed
    from fedcybgd.common.eval import evaluate_loss, spread_sample
    from fedcybgd.common.partition import NEW_RUN_LAYOUT, partition_model
    from fedcybgd.common.sequences import Sequences
    from fedcybgd.server.config import EvalConfig, TrainingConfig
    from fedcybgd.server.reference import run_block_cyclic, run_centralized_full
    from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
    from fedcybgd.training import peak_memory, reset_peak_memory

    torch.set_num_threads(1)
    real = args.model != "tiny"
    defaults = {**{k: v[real] for k, v in DEMO_DEFAULTS.items()}, "local_steps": args.local_steps}
    out = Path(args.out)
    options = DemoOptions(out=str(out), model=args.model, clients=args.clients, **defaults)
    model_dir, client_data, eval_data = prepare_inputs(options, out)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    dtype = torch.bfloat16 if real else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    training = TrainingConfig(local_steps=options.local_steps, batch_size=options.batch_size, seq_len=options.seq_len)
    schedule_config = ScheduleConfig(cycles=1, lr=args.lr, seed=options.seed)
    pooled = Sequences.concat([load_packed(d, tokenizer, training.seq_len) for d in client_data])
    evaluation = EvalConfig()
    eval_sequences = spread_sample(load_packed(eval_data, tokenizer, training.seq_len), options.eval_sequences)
    before = evaluate_loss(model, eval_sequences, evaluation.batch_size)
    reset_peak_memory(torch.device("cpu"))
    started = time.perf_counter()
    if args.centralized == "centralized full FT":
        schedule = CycleSchedule(len(partition_model(model, options.layers_per_block)), schedule_config)
        run_centralized_full(model, pooled, training, schedule)
    else:
        compact = args.centralized.removeprefix("centralized block-cyclic").strip() or None  # frozen layers int8/nf4
        run_block_cyclic(model, pooled, options.layers_per_block, schedule_config, training, compact_frozen=compact,
                         block_layout=NEW_RUN_LAYOUT)  # as the federated runs, which name no layout
    seconds = time.perf_counter() - started
    peak = peak_memory(torch.device("cpu"))
    after = evaluate_loss(model, eval_sequences, evaluation.batch_size)
    visits = len(partition_model(model, options.layers_per_block))
    result = {"strategy": args.centralized, "eval_loss_before": before, "eval_loss_after": after, "bytes": 0,
              "client_compute_seconds": seconds, "client_peak_memory_bytes": peak,
              "samples": visits * training.local_steps * training.batch_size, "wall_seconds": seconds}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["strategy"] == "centralized full FT"), None)
    fedavg = next((r for r in rows if r["strategy"].startswith("fedavg-full")), None)
    lines = ["| strategy | held-out loss after | vs centralized full FT | MB on the wire | client compute s "
             "| client peak memory MiB | peak vs fedavg-full | training samples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        vs_full = f"{r['eval_loss_after'] / full['eval_loss_after'] - 1:+.2%}" if full else ""
        vs_mem = f"{r['client_peak_memory_bytes'] / fedavg['client_peak_memory_bytes']:.0%}" if fedavg else ""
        lines.append(f"| {r['strategy']} | {r['eval_loss_after']:.4f} | {vs_full} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['client_compute_seconds']:.0f} | {r['client_peak_memory_bytes'] / 2**20:.0f} | {vs_mem} | "
                     f"{r['samples']} |")
    lines.append(f"\nheld-out loss before training: {rows[0]['eval_loss_before']:.4f}")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, xlabel, name, log in [
        ("bytes", "bytes on the wire (MB, log scale; centralized: none)", "loss_vs_bytes.png", True),
        ("client_compute_seconds", "client compute (s, one thread)", "loss_vs_compute.png", False),
    ]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in rows:
            x = max(r[key], 1e5) / 1e6 if key == "bytes" else r[key]
            ax.scatter(x, r["eval_loss_after"], s=40)
            ax.annotate(r["strategy"], (x, r["eval_loss_after"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss after equal training tokens")
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.barh([r["strategy"] for r in rows], [r["client_peak_memory_bytes"] / 2**20 for r in rows])
    ax.set_xlabel("client peak memory (MiB, RSS on CPU)")
    fig.tight_layout()
    fig.savefig(out / "peak_memory.png", dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/strategies")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the demo's)")
    parser.add_argument("--local-steps", type=int, default=20,
                        help="steps per visit (per task); every strategy trains the same tokens")
    parser.add_argument("--only", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs found under --out")
    parser.add_argument("--centralized", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lr is None:
        from fedcybgd.cli.main import DEMO_DEFAULTS
        args.lr = DEMO_DEFAULTS["lr"][args.model != "tiny"]
    if args.centralized:
        centralized_main(args)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, extra in FEDERATED:
        if not args.only or label in args.only:
            rows.append(run_federated(label, extra, args))
            print(table(rows), flush=True)
    for label in CENTRALIZED:
        if not args.only or label in args.only:
            rows.append(run_centralized(label, args))
            print(table(rows), flush=True)
    rows = [r for r in rows if math.isfinite(r["eval_loss_after"])]
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "table.md").write_text(table(rows) + "\n")
    plot(rows, out)
    print(f"\nresults: {out / 'results.json'}; plots: {out}/*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
