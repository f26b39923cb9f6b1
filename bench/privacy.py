"""What differential privacy costs (issue 17): held-out loss, client peak memory and time per step of the same
federated run at epsilon about 1, 3 and 8, against the non-private run and a run that clips without noise.

    .venv/bin/python bench/privacy.py --out bench-out/privacy [--model smollm2] [--epsilons 8 3 1] [--cycles 1]
        [--local-steps 5] [--batch-size 8] [--seq-len 64] [--clients 2] [--clip-norm 1.0]
    .venv/bin/python bench/privacy.py --model tiny --out /tmp/privacy --epsilons 8    # smoke test, a minute

Every run is real: ``fedcybgd demo`` (a coordinator and client processes over mutual TLS) on one split of the
Shakespeare plays made once for all runs (``bench/curve_inputs.py``, as the learning curves use), with
``--coordinator-arg`` carrying the ``[privacy]`` settings. The noise multiplier of each target is Opacus's
(``get_noise_multiplier``, RDP accountant) for the worst case a site can meet: the largest sampling rate of any site
(``batch_size / its sequences``) and every visit of the run made by that one site. The run also sets the target,
so a site the race gives more visits than that still never passes it (it declines). Each site's reported epsilon
(its own ledger) is in the table. The test loss is measured on the held-out test split, the loss the run's
learning rate was not chosen on. Writes results.json and table.md under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from curve_inputs import block_count, prepare
from curves import Contender, _slug, run_federated


@dataclass(frozen=True)
class PrivateRun:
    label: str
    epsilon_target: float | None     # None: not private; inf: clipped without noise
    noise_multiplier: float
    site_epsilons: dict[str, float]  # as each site reported it (its ledger)
    declined: dict[str, str]
    base_test_loss: float
    test_loss: float
    val_loss: float
    peak_memory_bytes: int
    seconds_per_step: float          # the median visit's training time / its steps (robust to a disturbed one)
    visits: int


def site_sequences(split: Path, model_dir: Path, args: argparse.Namespace) -> list[int]:
    """How many training sequences each site holds (what its DP-SGD samples from), packed as its daemon packs."""
    from transformers import AutoTokenizer

    from fedcybgd.common.data import load_packed
    from fedcybgd.common.prompts import resolve_prompt_format

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = resolve_prompt_format("auto", "responses", tokenizer)
    return [len(load_packed(split / f"client-{i}", tokenizer, args.seq_len, prompt)) for i in range(args.clients)]


def noise_for(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp", epsilon_tolerance=0.01))


def run_one(label: str, target: float | None, sigma: float, args: argparse.Namespace, model_dir: Path, split: Path,
            test: Path) -> PrivateRun:
    flags: list[str] = []
    if target is not None:
        flags = ["--dp-records", f"--dp-noise-multiplier={sigma}", f"--dp-clip-norm={args.clip_norm}",
                 f"--dp-delta={args.delta}"]
        if target != float("inf"):
            flags.append(f"--dp-target-epsilon={target}")
    contender = Contender(label, ("--strategy", "cybgd", *(f"--coordinator-arg={f}" for f in flags)),
                          embed_head_every=1)
    run = run_federated(contender, args.lr, args.cycles, args, model_dir, split, test)
    summary = json.loads((Path(args.out) / "runs" / f"{_slug(label)}-lr{args.lr:g}" / "summary.json").read_text())
    last, first = run.points[-1], run.points[0]
    visits = len(summary["visits"])
    return PrivateRun(
        label=label, epsilon_target=target, noise_multiplier=sigma,
        site_epsilons={p["client"]: p["record_epsilon"] for p in summary.get("privacy", [])},
        declined={p["client"]: p["declined"] for p in summary.get("privacy", []) if p["declined"]},
        base_test_loss=first.test_loss, test_loss=last.test_loss, val_loss=last.val_loss,
        peak_memory_bytes=last.peak_memory_bytes,
        seconds_per_step=statistics.median(v["train_seconds"] for v in summary["visits"]) / args.local_steps,
        visits=visits)


def table(runs: list[PrivateRun]) -> str:
    base = next((r for r in runs if r.epsilon_target is None), None)
    lines = ["| run | noise multiplier | sites' epsilon | test loss | vs non-private | client peak MiB | "
             "s per step |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        eps = ", ".join(f"{e:.2f}" for e in r.site_epsilons.values()) if r.epsilon_target is not None else "-"
        rel = f"{(r.test_loss / base.test_loss - 1) * 100:+.2f} %" if base is not None else ""
        ratio = f" ({r.seconds_per_step / base.seconds_per_step:.2f}x)" if base is not None else ""
        mem = f" ({r.peak_memory_bytes / base.peak_memory_bytes:.2f}x)" if base is not None else ""
        lines.append(f"| {r.label} | {r.noise_multiplier:.3f} | {eps} | {r.test_loss:.4f} | {rel} | "
                     f"{r.peak_memory_bytes / 2**20:.0f}{mem} | {r.seconds_per_step:.2f}{ratio} |")
    if runs:
        lines.append(f"\nBase model (before any visit): test loss {runs[0].base_test_loss:.4f}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/privacy")
    parser.add_argument("--model", default="smollm2", help="smollm2, tiny, or a Hugging Face model directory")
    parser.add_argument("--corpus", help="data for `fedcybgd partition` (default: the Shakespeare plays)")
    parser.add_argument("--layers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cycle-layers", type=int, default=6, help="decoder layers per block")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8, help="expected sequences per step (Poisson under DP)")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-sequences", type=int, default=48)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--no-clip-only", action="store_true", help="skip the run that clips without noise")
    parser.add_argument("--keep-state", action="store_true", help="keep each run's state and caches")
    args = parser.parse_args()

    model_dir, split, test = prepare(args)
    sequences = site_sequences(split, model_dir, args)
    rate = min(1.0, args.batch_size / min(sequences))
    steps = block_count(model_dir, args.cycle_layers) * args.cycles * args.local_steps  # one site, every visit
    print(f"sites' sequences {sequences}; worst-case sampling rate {rate:.4g} over {steps} steps", flush=True)

    runs = [run_one("non-private", None, 0.0, args, model_dir, split, test)]
    if not args.no_clip_only:
        runs.append(run_one("clipped, no noise", float("inf"), 0.0, args, model_dir, split, test))
    for eps in args.epsilons:
        sigma = noise_for(eps, args.delta, rate, steps)
        print(f"epsilon {eps:g}: noise multiplier {sigma:.4f}", flush=True)
        runs.append(run_one(f"epsilon {eps:g}", eps, sigma, args, model_dir, split, test))

    out = Path(args.out)
    setting = {k: getattr(args, k) for k in ("model", "clients", "cycles", "cycle_layers", "local_steps",
                                             "batch_size", "seq_len", "lr", "delta", "clip_norm", "threads")}
    (out / "results.json").write_text(json.dumps(
        {"setting": setting, "site_sequences": sequences, "sample_rate": rate, "steps_per_site_bound": steps,
         "runs": [asdict(r) for r in runs]}, indent=2))
    (out / "table.md").write_text(table(runs))
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
