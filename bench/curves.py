"""Learning curves: FedCyBGD against FedLoRA, FedAvg-full and the centralized references, each at its best learning
rate, held-out loss against training tokens, bytes on the wire, client peak memory and client compute.

    .venv/bin/python bench/curves.py --out bench-out/curves [--model smollm2 --layers 4] [--cycles 4]
        [--local-steps 5] [--batch-size 4] [--seq-len 64] [--clients 2] [--factors 0.5 1 2] [--only LABEL ...]
    .venv/bin/python bench/curves.py --model tiny --out /tmp/curves --cycles 2 --factors 1   # smoke test, minutes

Every federated run is real: ``fedcybgd demo`` (a coordinator and client processes over mutual TLS) on one split of
the data made once for all runs. The centralized references train in one process on the pooled client data. The
data: ``fedcybgd partition`` of the corpus (default the Shakespeare plays, whole works per client); its held-out
works are halved into a **validation** split (the coordinator's evaluation, which picks each strategy's learning
rate) and a **test** split (reported; no run is chosen on it). ``--corpus`` takes any data ``fedcybgd partition``
reads (instruction records: loss on responses, the run's prompt format).

Budget: ``--cycles`` FedCyBGD cycles of ``--cycle-layers`` decoder layers per block (the demo's 6; blocks x local
steps x batch x sequence length tokens per cycle); every strategy trains the same tokens and is evaluated at the same
token counts (a cycle's worth each): FedCyBGD with other layers per block runs proportionally more or fewer cycles
(rounded: its ``tokens`` column says where it was evaluated), FedAvg rounds of two clients are sized to a cycle's
tokens (the coordinator's own accounting), the references evaluate every cycle's worth of steps. ``--layers N``
keeps only the first N decoder layers of the model; it cripples a pretrained model (SmolLM2 with 4 of its 30 layers
starts at loss 15.6), so the measurements use the whole model and small batches instead.

Learning rates: each strategy's base rate (``BASE_LR`` x its factor) times each of ``--factors``; the rate whose run
ends with the lowest validation loss is reported. ``results.json`` under ``--out`` accumulates every run measured
there on the same budget (invocations with ``--only`` add to it; a copy of the record in ``docs/data/`` seeds a fresh
folder, and ``--report-only`` then redraws the tables and plots without rerunning anything). Writes results.json,
table.md (test loss at every budget) and, with matplotlib (``pip install -e .[bench]``), four PNG plots.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from curve_inputs import block_count, block_specs, nearest_schedule, prepare

#: SmolLM2's demo learning rate; strategies scale it (LoRA's usual larger rate).
BASE_LR = 2e-4


@dataclass(frozen=True)
class Contender:
    label: str
    demo_args: tuple[str, ...] = ()   # federated: `fedcybgd demo` arguments; empty: a centralized reference
    lr_factor: float = 1.0
    layers_per_block: int | None = None  # None: the cycle's (--cycle-layers)
    tasks_per_round: int = 1          # clients trained per round (FedAvg family)
    embed_head_every: int = 1         # FedCyBGD: the blocks outside the decoder layers join every N-th cycle
    concurrent_clients: int = 1       # clients training at once: they share --threads (more would oversubscribe)


#: The block layout the earlier FedCyBGD contenders were measured in (a new run's default is strided since).
CONTIGUOUS = "--coordinator-arg=--block-layout=contiguous"

CONTENDERS = [
    Contender("cybgd", ("--strategy", "cybgd", CONTIGUOUS)),
    Contender("cybgd e4", ("--strategy", "cybgd", CONTIGUOUS), embed_head_every=4),  # embed/head every 4th cycle
    Contender("cybgd L15 e4", ("--strategy", "cybgd", CONTIGUOUS), layers_per_block=15, embed_head_every=4),
    # the strided block layout: block k of B holds decoder layers k, k + B, ... (common/partition.py)
    Contender("cybgd e4 strided", ("--strategy", "cybgd", "--coordinator-arg=--block-layout=strided"),
              embed_head_every=4),
    Contender("cybgd L1", ("--strategy", "cybgd"), layers_per_block=1),
    Contender("cybgd-parallel K2 e4", ("--strategy", "cybgd-parallel", "--max-concurrent-visits", "2", CONTIGUOUS),
              embed_head_every=4, concurrent_clients=2),
    Contender("fedlora r8", ("--strategy", "fedlora", "--lora-rank", "8"), lr_factor=5, tasks_per_round=2,
              concurrent_clients=2),
    Contender("fedlora r32", ("--strategy", "fedlora", "--lora-rank", "32"), lr_factor=5, tasks_per_round=2,
              concurrent_clients=2),
    Contender("fedavg-full", ("--strategy", "fedavg-full"), tasks_per_round=2, concurrent_clients=2),
    Contender("centralized full FT"),
    Contender("centralized block-cyclic"),
]


@dataclass
class Point:
    """One evaluation: after ``tokens`` training tokens, at what cost so far."""

    tokens: int
    val_loss: float
    test_loss: float
    bytes: int = 0
    peak_memory_bytes: int = 0
    compute_seconds: float = 0.0


@dataclass
class Run:
    label: str
    lr: float
    points: list[Point] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- inputs


def cycles_for(c: Contender, visits: int, model_dir: Path, args: argparse.Namespace) -> int:
    """The cycles of contender ``c`` whose tasks come nearest to ``visits`` block visits' tokens (its cycles may
    hold more or fewer blocks than the budget's)."""
    return nearest_schedule(block_specs(model_dir, c.layers_per_block or args.cycle_layers), visits,
                            embed_head_every=c.embed_head_every).config.cycles



# ----------------------------------------------------------------------------------------------- runs


def run_federated(c: Contender, lr: float, cycles: int, args: argparse.Namespace, model_dir: Path, split: Path,
                  test: Path) -> Run:
    out = Path(args.out) / "runs" / f"{_slug(c.label)}-lr{lr:g}"
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts again
        cmd = [sys.executable, "-m", "fedcybgd.cli.main", "--log-level", "warning", "demo", "--model", str(model_dir),
               "--split", str(split), "--clients", str(args.clients), "--cycles", str(cycles),
               "--layers-per-block", str(c.layers_per_block or args.cycle_layers),
               "--local-steps", str(args.local_steps),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--lr", str(lr),
               "--threads", str(max(1, args.threads // c.concurrent_clients)),
               "--eval-sequences", str(args.eval_sequences), "--out", str(out),
               "--embed-head-every", str(c.embed_head_every),
               # every evaluated version is exported below for its test loss: retention must keep them all
               "--coordinator-arg=--checkpoint-every=0", *c.demo_args]
        print(f"[{c.label} lr {lr:g}] {cycles} cycles", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "bench.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    summary = json.loads((out / "summary.json").read_text())
    tokens_per_task = args.local_steps * args.batch_size * args.seq_len
    cached = out / "test_losses.json"
    if cached.is_file():
        test_losses = {int(k): v for k, v in json.loads(cached.read_text()).items()}
    else:
        test_losses = _test_losses(out / "state", [e["version"] for e in summary["evals"]], model_dir, test, args)
        cached.write_text(json.dumps(test_losses))
    if not args.keep_state:  # the report needs summary.json and the test losses; a FedAvg-full run's blobs are 30 GB
        for bulky in ("state", "cache", "export", "tls"):
            shutil.rmtree(out / bulky, ignore_errors=True)
    run = Run(c.label, lr)
    for e in summary["evals"]:
        done = [v for v in summary["visits"] if v["new_version"] <= e["version"]]
        run.points.append(Point(
            tokens=e["rounds_done"] * c.tasks_per_round * tokens_per_task, val_loss=e["loss"],
            test_loss=test_losses[e["version"]], bytes=sum(v["bytes_down"] + v["bytes_up"] for v in done),
            peak_memory_bytes=max((v["peak_memory_bytes"] for v in done), default=0),
            compute_seconds=sum(v["train_seconds"] for v in done)))
    return run


def _test_losses(state_dir: Path, versions: list[int], model_dir: Path, test: Path,
                 args: argparse.Namespace) -> dict[int, float]:
    """The test-split loss of each evaluated version (exported as the user would get it)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from fedcybgd.server.export import PrunedVersionError, export_version

    sequences = _test_sequences(model_dir, test, args)
    losses = {}
    for version in versions:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                exported = export_version(state_dir, Path(tmp) / "export", version)
            except PrunedVersionError as e:  # a run made before --checkpoint-every=0 was passed: its validation
                print(f"no test loss for version {version}: {e}", flush=True)  # loss stands, its test loss is NaN
                losses[version] = float("nan")
                continue
            losses[version] = _loss(AutoModelForCausalLM.from_pretrained(str(exported)), sequences)
    return losses


def _test_sequences(model_dir: Path, test: Path, args: argparse.Namespace):
    from transformers import AutoTokenizer

    from fedcybgd.common.data import load_packed
    from fedcybgd.common.eval import spread_sample
    from fedcybgd.common.prompts import resolve_prompt_format

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = resolve_prompt_format("auto", "responses", tokenizer)  # the coordinator's default, as in the runs
    return spread_sample(load_packed(test, tokenizer, args.seq_len, prompt), args.eval_sequences)


def _loss(model, sequences) -> float:
    from fedcybgd.common.eval import evaluate_loss

    return evaluate_loss(model.eval(), sequences, 8)


def run_centralized(c: Contender, lr: float, cycles: int, args: argparse.Namespace, model_dir: Path, split: Path,
                    test: Path) -> Run:
    """A centralized reference in a process of its own (its peak memory is its own), results as JSON."""
    out = Path(args.out) / "runs" / f"{_slug(c.label)}-lr{lr:g}"
    result = out / "run.json"
    if not result.is_file():
        out.mkdir(parents=True, exist_ok=True)
        print(f"[{c.label} lr {lr:g}] {cycles} cycles in one process", flush=True)
        cmd = [sys.executable, __file__, "--centralized", c.label, "--lr", str(lr), "--cycles", str(cycles),
               *_shared_flags(args)]
        with open(out / "bench.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    data = json.loads(result.read_text())
    return Run(data["label"], data["lr"], [Point(**p) for p in data["points"]])


def pooled_data(args: argparse.Namespace):
    """(model directory, the model, every client's data pooled, validation sequences, test sequences): what a
    run in one process trains and evaluates on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedcybgd.common.data import load_packed
    from fedcybgd.common.eval import spread_sample
    from fedcybgd.common.prompts import resolve_prompt_format
    from fedcybgd.common.sequences import Sequences

    model_dir, split, test = prepare(args)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = resolve_prompt_format("auto", "responses", tokenizer)  # the coordinator's default, as in the runs
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    pooled = Sequences.concat([load_packed(split / f"client-{i}", tokenizer, args.seq_len, prompt)
                               for i in range(args.clients)])
    val = spread_sample(load_packed(split / "eval", tokenizer, args.seq_len, prompt), args.eval_sequences)
    return model_dir, model, pooled, val, _test_sequences(model_dir, test, args)


def centralized_main(args: argparse.Namespace) -> None:
    import time

    import torch

    from fedcybgd.common.partition import partition_model
    from fedcybgd.server.config import TrainingConfig
    from fedcybgd.server.reference import run_block_cyclic, run_centralized_full
    from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
    from fedcybgd.training import peak_memory, reset_peak_memory

    torch.set_num_threads(args.threads)
    model_dir, model, pooled, val, tests = pooled_data(args)
    training = TrainingConfig(local_steps=args.local_steps, batch_size=args.batch_size, seq_len=args.seq_len)
    blocks = len(partition_model(model, args.cycle_layers))
    schedule_config = ScheduleConfig(cycles=args.cycles, lr=args.lr, seed=0,  # the demo's: cosine to 10 %
                                     embed_head_every=1)  # every block each cycle: the "cybgd" contender's
    tokens_per_cycle = blocks * args.local_steps * args.batch_size * args.seq_len
    points = [Point(0, _loss(model, val), _loss(model, tests))]
    reset_peak_memory(torch.device("cpu"))
    started, evaluating = time.perf_counter(), [0.0]  # compute counts training only, not these evaluations

    def evaluate(cycle: int) -> None:
        begun = time.perf_counter()
        point = Point(cycle * tokens_per_cycle, _loss(model, val), _loss(model, tests),
                      peak_memory_bytes=peak_memory(torch.device("cpu")),
                      compute_seconds=begun - started - evaluating[0])
        points.append(point)
        evaluating[0] += time.perf_counter() - begun

    if args.centralized == "centralized full FT":
        steps_per_cycle = blocks * args.local_steps
        schedule = CycleSchedule(blocks, schedule_config)
        run_centralized_full(model, pooled, training, schedule, on_step=lambda step, loss: (
            evaluate((step + 1) // steps_per_cycle) if (step + 1) % steps_per_cycle == 0 else None))
    else:
        run_block_cyclic(model, pooled, args.cycle_layers, schedule_config, training,
                         on_visit=lambda round_, spec, result: (
                             evaluate((round_ + 1) // blocks) if (round_ + 1) % blocks == 0 else None))
    out = Path(args.out) / "runs" / f"{_slug(args.centralized)}-lr{args.lr:g}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"label": args.centralized, "lr": args.lr,
                                              "points": [asdict(p) for p in points]}, indent=2))


# ------------------------------------------------------------------------------------------- reporting


def best(runs: list[Run]) -> Run:
    """The run ending with the lowest validation loss (the test split never chooses)."""
    return min(runs, key=lambda r: r.points[-1].val_loss)


def table(chosen: list[Run], cycles: int, tokens_per_cycle: int) -> str:
    """Test loss at each budget of ``k`` cycles' tokens: each run's evaluation nearest to it (FedCyBGD with more
    layers per block evaluates at its own cycle boundaries; the ``tokens`` column says where)."""
    full = next((r for r in chosen if r.label == "centralized full FT"), None)
    lines = []
    for k in range(1, cycles + 1):
        budget = k * tokens_per_cycle
        lines += [f"\n**{k} cycle(s)' tokens ({budget:,})**\n", "| strategy | lr | tokens | test loss | vs centralized "
                  "full FT | MB on the wire | client peak MiB | client compute s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        reference = _at(full, budget) if full else None
        for r in chosen:
            p = _at(r, budget)
            vs = f"{p.test_loss / reference.test_loss - 1:+.2%}" if reference else ""
            lines.append(f"| {r.label} | {r.lr:g} | {p.tokens:,} | {p.test_loss:.4f} | {vs} | {p.bytes / 1e6:.1f} | "
                         f"{p.peak_memory_bytes / 2**20:.0f} | {p.compute_seconds:.0f} |")
    if chosen and chosen[0].points:
        lines.append(f"\ntest loss before training: {chosen[0].points[0].test_loss:.4f}")
    return "\n".join(lines)


def _at(run: Run, budget: int) -> Point:
    return min(run.points[1:] or run.points, key=lambda p: abs(p.tokens - budget))


def plot(chosen: list[Run], out: Path) -> None:
    if not chosen:
        return
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install -e .[bench]): no plots")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in [("tokens", "training tokens", "loss_vs_tokens.png"),
                             ("bytes", "bytes on the wire (MB)", "loss_vs_bytes.png"),
                             ("peak_memory_bytes", "client peak memory (MiB)", "loss_vs_peak_memory.png"),
                             ("compute_seconds", "client compute (s)", "loss_vs_compute.png")]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        scale = {"bytes": 1e6, "peak_memory_bytes": 2**20}.get(key, 1)
        for r in chosen:
            ax.plot([getattr(p, key) / scale for p in r.points], [p.test_loss for p in r.points], marker="o",
                    label=f"{r.label} (lr {r.lr:g})")
        ax.set_xlabel(label)
        ax.set_ylabel("test loss")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def _budget(args: argparse.Namespace) -> dict:
    """The settings runs must share to be compared (not --threads: it changes the time, not the result)."""
    keys = ["model", "layers", "cycle_layers", "corpus", "clients", "cycles", "local_steps", "batch_size", "seq_len",
            "eval_sequences"]
    return {k: getattr(args, k) for k in keys}


def _earlier_runs(path: Path, args: argparse.Namespace) -> dict[tuple[str, float], Run]:
    """The runs recorded in ``results.json`` by earlier invocations on the same budget (a copy of the one kept in
    docs/data/ seeds a fresh output folder); a rerun replaces its record."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if {k: data["settings"].get(k) for k in _budget(args)} != _budget(args):
        raise SystemExit(f"{path} was measured with other settings ({data['settings']}): use another --out")
    runs = [Run(r["label"], r["lr"], [Point(**p) for p in r["points"]]) for r in data["runs"]]
    return {(r.label, r.lr): r for r in runs}


def _chosen(runs: dict[tuple[str, float], Run]) -> list[Run]:
    """Each contender's run at its best learning rate, in CONTENDERS order."""
    order = [c.label for c in CONTENDERS]
    labels = sorted({label for label, _ in runs}, key=lambda label: order.index(label) if label in order else 99)
    return [best([r for (label, _), r in runs.items() if label == wanted]) for wanted in labels]


def _finished(c: Contender, lr: float, args: argparse.Namespace) -> bool:
    out = Path(args.out) / "runs" / f"{_slug(c.label)}-lr{lr:g}"
    return (out / "summary.json").is_file() or (out / "run.json").is_file()


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label).strip("_")


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--out", args.out, "--model", args.model, "--layers", str(args.layers), "--clients", str(args.clients),
             "--cycle-layers", str(args.cycle_layers),
             "--local-steps", str(args.local_steps), "--batch-size", str(args.batch_size), "--seq-len",
             str(args.seq_len), "--threads", str(args.threads), "--eval-sequences", str(args.eval_sequences)]
    return flags + (["--corpus", args.corpus] if args.corpus else [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/curves")
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a Hugging Face model directory")
    parser.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    parser.add_argument("--cycle-layers", type=int, default=6,
                        help="decoder layers per block of the FedCyBGD cycle that sets the budget (the demo's 6)")
    parser.add_argument("--corpus", help="data for `fedcybgd partition` (default: the Shakespeare plays), or "
                                          "'mmlu-cot' (instruction records from lm-eval, split by subject)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=4, help="FedCyBGD cycles' worth of tokens (see --cycle-layers)")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-sequences", type=int, default=48)
    parser.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="learning-rate sweep")
    parser.add_argument("--only", nargs="*", help="labels to run, in this order (default: all)")
    parser.add_argument("--keep-state", action="store_true",
                        help="keep each federated run's coordinator state and client caches (default: deleted once "
                             "its test losses are measured)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs finished under --out (and those in its results.json)")
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--centralized", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.centralized:
        centralized_main(args)
        return 0
    model_dir, split, test = prepare(args)
    blocks_per_cycle = block_count(model_dir, args.cycle_layers)
    tokens_per_cycle = blocks_per_cycle * args.local_steps * args.batch_size * args.seq_len
    out = Path(args.out)
    runs = _earlier_runs(out / "results.json", args)  # (label, lr) -> run: what earlier invocations measured
    by_label = {c.label: c for c in CONTENDERS}
    unknown = [label for label in args.only or [] if label not in by_label]
    if unknown:
        raise SystemExit(f"unknown contender(s) {unknown}; known: {list(by_label)}")
    for c in [by_label[label] for label in args.only] if args.only else CONTENDERS:  # in the order asked
        cycles = cycles_for(c, args.cycles * blocks_per_cycle, model_dir, args)
        runner = run_federated if c.demo_args else run_centralized
        lrs = [BASE_LR * c.lr_factor * f for f in args.factors]
        if args.report_only:  # what earlier (or interrupted) invocations finished
            lrs = [lr for lr in lrs if _finished(c, lr, args)]
        for lr in lrs:
            runs[(c.label, lr)] = runner(c, lr, cycles if c.demo_args else args.cycles, args, model_dir, split, test)
        print(table(_chosen(runs), args.cycles, tokens_per_cycle), flush=True)
    chosen = _chosen(runs)
    (out / "results.json").write_text(json.dumps({"settings": _budget(args), "blocks_per_cycle": blocks_per_cycle,
                                                  "runs": [asdict(r) for r in runs.values()],
                                                  "chosen": [f"{r.label} lr {r.lr:g}" for r in chosen]}, indent=2))
    (out / "table.md").write_text(table(chosen, args.cycles, tokens_per_cycle) + "\n")
    plot(chosen, out)
    print(f"\nresults: {out / 'results.json'}; table: {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
