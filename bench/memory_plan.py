"""Memory planner validation: the planner's predicted peak of a block's visit (``training/planner.py``, simulated on
the meta device from the config alone) against the peak the visit reports when it really runs (``train_block``'s
``VisitResult.peak_memory_bytes``: the process's peak RSS on CPU, CUDA max allocated on a GPU), each visit in a
process of its own.

    .venv/bin/python bench/memory_plan.py [--archs llama qwen2 gpt_neox gemma3_text] [--device cpu|cuda]
        [--batch-size 2] [--seq-len 256] [--steps 2] [--threads 2] [--checkpoint-above] [--out plan.json]
    .venv/bin/python bench/memory_plan.py --calibrate        # measure the planner's CPU constants
    .venv/bin/python bench/memory_plan.py --plan-only        # the 7-8B plans alone (bench/configs/), no visits

The architectures are random-initialised from configs sized for a 2-core, 24 GiB machine (150-400M parameters,
bf16); per architecture the visits of the first, a middle and the last decoder layer, the first row block of the
input embedding and of an untied LM head, and the block of the remaining small parameters. The real visit trains
``--steps`` AdamW steps of ``--batch-size`` x ``--seq-len`` random tokens, with the default two evaluation batches.

``--calibrate`` measures the planner's two CPU constants (one number each for every architecture): the runtime, the
RSS of a process that has imported the client (``fedcybgd.client.daemon``: torch, transformers, peft, grpc, the
training code) and built the model, minus the bytes of the model's weights and buffers; and the allocator's
retention, peak RSS beyond the visit's live tensors, over visits at other batch shapes (1 x 512, 4 x 128) than the
validation's (2 x 256), so that the validation does not check the constants against the data they came from.

The script ends with the planner's view of 7-8B models (``bench/configs/``) on a GPU: bf16, batch 1 x 2048 tokens,
one decoder layer per block, with and without ``checkpoint_above``, and how long each plan took.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from workers import run_json_worker

CONFIGS = Path(__file__).resolve().parent / "configs"
GIB, MIB = 2**30, 2**20

#: Random-initialised architectures for validation, sized for this machine (bf16 weights: 0.3-0.8 GB).
ARCHS: dict[str, dict[str, Any]] = {
    # Llama with tied embeddings (SmolLM2 / Llama-3.2 style), grouped-query attention: ~167M parameters.
    "llama": dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=True,
                  max_position_embeddings=2048),
    # Qwen2 untied, q/k/v biases, Qwen's 151,936-token vocabulary (row blocks of embedding and head): ~391M.
    "qwen2": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=8,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False,
                  max_position_embeddings=2048),
    # GPT-NeoX untied (embed_out), LayerNorm, parallel residual, full multi-head attention: ~254M.
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                     num_attention_heads=16, vocab_size=50304, tie_word_embeddings=False,
                     max_position_embeddings=2048),
    # Gemma 3 270M's shape: 262,144-token tied vocabulary, head_dim 256, one KV head, sliding layers: ~268M.
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                        tie_word_embeddings=True, sliding_window=512, query_pre_attn_scalar=256,
                        max_position_embeddings=2048),
}
LARGE = ("llama-3-8b", "qwen2.5-7b", "mistral-7b")
#: Where the CPU allocator constant is measured: other batch shapes than the validation's default 2 x 256.
CALIBRATION_SHAPES = ((1, 512), (4, 128))
CALIBRATION_ARCHS = ("llama", "gpt_neox")


@dataclass
class Measured:
    """One real visit, as its process saw it."""

    block: str
    peak_bytes: int  # VisitResult.peak_memory_bytes
    weights_bytes: int
    before_bytes: int  # RSS (CPU) / allocated (CUDA) when the visit started
    seconds: float


# ------------------------------------------------------------------------------------------ in a worker process


def _client_process_imports() -> None:
    """Import what a client process holds, and set its allocator up as the daemon does, so that its runtime is in
    the measurement as it is in a client's."""
    import fedcybgd.client.daemon  # noqa: F401
    from fedcybgd.common.allocator import return_freed_memory

    return_freed_memory()


def _build(arch: str, device: str) -> torch.nn.Module:
    from fedcybgd.common.modeling import config_from_json, model_from_config

    torch.manual_seed(0)
    return model_from_config(config_from_json(json.dumps(ARCHS[arch])), torch.bfloat16, device)


def _weights_bytes(model: torch.nn.Module) -> int:
    tensors = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in [*model.parameters(),
                                                                                  *model.buffers()]}
    return sum(tensors.values())


def _now_bytes(device: str) -> int:
    from fedcybgd.common.procfs import rss_bytes

    return int(torch.cuda.memory_allocated()) if device == "cuda" else rss_bytes()


def visit_worker(args: argparse.Namespace) -> Measured:
    """Run one visit of block ``args.block`` of a fresh ``args.arch`` model in this process."""
    from fedcybgd.common.partition import partition_model
    from fedcybgd.training import VisitHyper, train_block

    _client_process_imports()
    torch.set_num_threads(args.threads)
    model = _build(args.worker_visit, args.device)
    spec = next(s for s in partition_model(model, 1) if s.name == args.block)
    generator = torch.Generator().manual_seed(0)
    vocab = int(ARCHS[args.worker_visit]["vocab_size"])
    sequences = torch.randint(0, vocab, (args.batch_size * args.steps, args.seq_len), generator=generator)
    hyper = VisitHyper(lr=1e-5, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=0)
    before = _now_bytes(args.device)
    start = time.perf_counter()
    result = train_block(model, spec, sequences, hyper, checkpoint_above=args.checkpoint_above)
    return Measured(block=spec.name, peak_bytes=result.peak_memory_bytes, weights_bytes=_weights_bytes(model),
                    before_bytes=before, seconds=time.perf_counter() - start)


def runtime_worker(arch: str) -> dict[str, int]:
    """RSS of a client-like process holding a built ``arch`` model, and its parts."""
    _client_process_imports()
    model = _build(arch, "cpu")
    rss, weights = _now_bytes("cpu"), _weights_bytes(model)
    return {"rss": rss, "weights": weights, "runtime": rss - weights}


# ------------------------------------------------------------------------------------------ the driver


def _worker(args: argparse.Namespace, *extra: str) -> Any:
    cmd = [sys.executable, __file__, "--device", args.device, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads), *extra]
    if args.checkpoint_above:
        cmd.append("--checkpoint-above")
    return run_json_worker(cmd, args.threads, f"worker {extra}")


def chosen_blocks(names: list[str]) -> list[str]:
    """First, middle and last decoder layer, the first row block of each split matrix, the small-parameter block."""
    layers = [n for n in names if n.startswith("layers.")]
    picked = [layers[0], layers[len(layers) // 2], layers[-1]]
    seen_matrices: set[str] = set()
    for n in names:
        if "[" in n and n.split("[")[0] not in seen_matrices:
            seen_matrices.add(n.split("[")[0])
            picked.append(n)
    picked += [n for n in names if n.startswith("embed_head")][:1]
    return picked


def validate(args: argparse.Namespace) -> dict[str, Any]:
    from fedcybgd.common.modeling import config_from_json
    from fedcybgd.training.planner import PlanSettings, plan_visits

    settings = PlanSettings(batch_size=args.batch_size, seq_len=args.seq_len, dtype=torch.bfloat16,
                            device_type=args.device, checkpoint_above=args.checkpoint_above)
    rows: list[dict[str, Any]] = []
    for arch in args.archs:
        start = time.perf_counter()
        plans = {p.block: p for p in plan_visits(config_from_json(json.dumps(ARCHS[arch])), settings)}
        planned_s = time.perf_counter() - start
        print(f"{arch}: {len(plans)} blocks planned in {planned_s:.1f} s", file=sys.stderr, flush=True)
        for block in chosen_blocks(list(plans)):
            measured = Measured(**_worker(args, "--worker-visit", arch, "--block", block))
            plan = plans[block]
            rows.append({"arch": arch, "plan": asdict(plan), "measured": asdict(measured),
                         "error": plan.peak_bytes / measured.peak_bytes - 1})
            print(f"  {block}: predicted {plan.peak_bytes / MIB:.0f} MiB, measured {measured.peak_bytes / MIB:.0f} "
                  f"MiB ({rows[-1]['error']:+.1%}), visit {measured.seconds:.0f} s", file=sys.stderr, flush=True)
    return {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows}


def report(result: dict[str, Any]) -> str:
    lines = [f"{'arch':<12} {'block':<34} {'params':>6} {'weights':>8} {'trained':>8} {'activ.':>8} "
             f"{'runtime':>8} {'predicted':>9} {'measured':>9} {'error':>7}   (MiB; params in M)"]
    worst: dict[str, float] = {}
    for r in result["rows"]:
        p, m = r["plan"], r["measured"]
        parts = " ".join(f"{p[key] / MIB:>8.0f}" for key in ("weights_bytes", "trained_bytes", "activation_bytes",
                                                             "runtime_bytes"))
        lines.append(f"{r['arch']:<12} {p['block'][:34]:<34} {p['params'] / 1e6:>6.1f} {parts} "
                     f"{p['peak_bytes'] / MIB:>9.0f} {m['peak_bytes'] / MIB:>9.0f} {r['error']:>+7.1%}")
        worst[r["arch"]] = max(worst.get(r["arch"], 0.0), abs(r["error"]))
    lines.append("max |error| per architecture: " + ", ".join(f"{a} {e:.1%}" for a, e in worst.items()))
    return "\n".join(lines)


def calibrate(args: argparse.Namespace) -> str:
    """Measure the planner's two CPU constants (``training/planner.py``), at batch shapes the validation does not use.

    ``CPU_RUNTIME_BYTES``: RSS of a client-like process holding a built model, minus the model's tensors, per
    architecture. ``CPU_ALLOCATOR_BYTES``: per visit, peak RSS - RSS at the visit's start - the simulated peak of the
    visit's live tensors (which equals what ``LiveMemory`` counts on the real tensors); the median over the visits."""
    lines = []
    for arch in args.archs:
        r = _worker(args, "--worker-runtime", arch)
        lines.append(f"runtime   {arch:<12} RSS {r['rss'] / MIB:7.0f} MiB - weights {r['weights'] / MIB:6.0f} MiB "
                     f"= {r['runtime'] / MIB:5.0f} MiB")
    retained: list[float] = []
    for batch_size, seq_len in CALIBRATION_SHAPES:
        shape = argparse.Namespace(**{**vars(args), "archs": list(CALIBRATION_ARCHS), "batch_size": batch_size,
                                      "seq_len": seq_len})
        for row in validate(shape)["rows"]:
            p, m = row["plan"], row["measured"]
            live = p["peak_bytes"] - p["weights_bytes"] - p["runtime_bytes"]
            retained.append((m["peak_bytes"] - m["before_bytes"] - live) / MIB)
            lines.append(f"allocator {row['arch']:<12} {batch_size} x {seq_len:<4} {p['block'][:34]:<34} "
                         f"{retained[-1]:5.0f} MiB")
    lines.append(f"CPU_RUNTIME_BYTES: the largest runtime above; CPU_ALLOCATOR_BYTES: median "
                 f"{statistics.median(retained):.0f} MiB (range {min(retained):.0f}-{max(retained):.0f}) over "
                 f"{len(retained)} visits")
    return "\n".join(lines)


def large_plans() -> str:
    """The planner on 7-8B models from their configs alone (GPU, bf16, 1 x 2048 tokens, one layer per block)."""
    from fedcybgd.training.planner import PlanSettings, plan_model_dir_or_config, plan_visits

    lines = []
    for name in LARGE:
        config = plan_model_dir_or_config(CONFIGS / f"{name}.json")
        for checkpoint_above in (False, True):
            settings = PlanSettings(batch_size=1, seq_len=2048, dtype=torch.bfloat16, device_type="cuda",
                                    checkpoint_above=checkpoint_above)
            start = time.perf_counter()
            plans = plan_visits(config, settings)
            seconds = time.perf_counter() - start
            top = max(plans, key=lambda p: p.peak_bytes)
            lines.append(f"{name:<11} checkpoint_above {'on ' if checkpoint_above else 'off'}: {len(plans)} blocks, "
                         f"largest visit {top.block} {top.peak_bytes / GIB:.2f} GiB (weights "
                         f"{top.weights_bytes / GIB:.2f}, trained {top.trained_bytes / GIB:.2f}, activations "
                         f"{top.activation_bytes / GIB:.2f}); planned in {seconds:.1f} s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-above", action="store_true")
    parser.add_argument("--calibrate", action="store_true", help="measure the planner's CPU constants and stop")
    parser.add_argument("--plan-only", action="store_true", help="only the 7-8B plans")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 7-8B plans")
    parser.add_argument("--out", type=Path, help="write the validation figures as JSON")
    parser.add_argument("--worker-visit", help=argparse.SUPPRESS)
    parser.add_argument("--worker-runtime", help=argparse.SUPPRESS)
    parser.add_argument("--block", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_visit:
        print(json.dumps(asdict(visit_worker(args))))
        return
    if args.worker_runtime:
        print(json.dumps(runtime_worker(args.worker_runtime)))
        return
    if args.calibrate:
        print(calibrate(args))
        return
    if not args.plan_only:
        result = validate(args)
        print(f"{args.device}, bf16, batch {args.batch_size} x {args.seq_len}, {args.steps} steps, {args.threads} "
              f"threads, checkpoint_above {'on' if args.checkpoint_above else 'off'}")
        print(report(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
    if not args.skip_large:
        print(large_plans())


if __name__ == "__main__":
    main()
