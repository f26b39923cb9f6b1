"""Client cost benchmark: peak memory and training-step time of what a client computes, per strategy,
on the same model and batch, each configuration in its own process (peak RSS is per process).

    .venv/bin/python bench/client_cost.py [--model DIR|tiny] [--batch-size 4] [--seq-len 128] [--steps 8]
        [--rows 16] [--device cpu|cuda] [--threads 2] [--repeat 1] [--out client_cost.json] [--plot client_cost.png]

Configurations (``--configs`` picks some):

* ``fedavg-full``   every parameter trained (``train_full``: FedAvg-full's client);
* ``fedavg-lora``   a rank-8 LoRA adapter on every decoder-layer projection (``train_lora``);
* ``fedcybgd-lpbN`` one visit of every block of a cycle (``train_block``), N decoder layers per block, the
                    embedding/head blocks bounded by the largest layer block (row ranges of the vocabulary);
* ``...+ckpt``      with activation checkpointing of the frozen layers above the block;
* ``...+cache``     with the block's inputs kept across steps for recurring rows;
* ``...+int8``, ``...+nf4``  the frozen decoder layers held quantized (``compact_frozen``, needs torchao);
* ``...+legacy``    as before bounded blocks and the chunked loss: one unbounded ``embed_head`` block and the
                    model's own loss (full-vocabulary logits for the whole batch), the "before" of the table.

``--model`` takes a model directory, ``tiny``, or a ``config.json`` (a random-initialised model of that shape in
bf16: large vocabularies without downloading weights). ``--slice-sample K`` measures only the first K row-range
visits of each split matrix (same-shaped ranges of one matrix need the same memory); ``--per-visit`` prints
every visit's peak.

Every visit runs ``--steps`` AdamW steps on ``--rows`` sequences of the sonnets (default: 16 rows for 8
steps of 4 = two local epochs, so ``+cache`` replays the second epoch; the other configurations do not
depend on it). Peak memory: CUDA peak allocated during the visit, else the process's peak RSS during
the visit (the loaded weights included); for a cycle, the largest over its visits. Step time: the
wall time between consecutive optimizer steps, step 0 left out (warm-up); mean (and median) over the
visit's steps, averaged over the blocks of a cycle; also the process's CPU time per step, which
other processes on a shared machine disturb much less than wall time (``load`` is the 1-minute load
average when the configuration ended: above the thread count, wall times are not to be trusted).
The model directory defaults to the demo's SmolLM2-135M-Instruct in bf16 (prepared on first use,
which needs the demo's extras); ``--model tiny`` takes the tiny random Llama of the tests, in bf16.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from workers import run_json_worker

if TYPE_CHECKING:
    from fedcybgd.common.sequences import Sequences

DEFAULT_MODEL = Path.home() / ".cache" / "fedcybgd" / "models" / "smollm2-135m-instruct-bfloat16"
CONFIGS = ("fedavg-full", "fedavg-lora", "fedcybgd-lpb6", "fedcybgd-lpb1", "fedcybgd-lpb6+ckpt",
           "fedcybgd-lpb6+cache", "fedcybgd-lpb1+ckpt", "fedcybgd-lpb1+cache", "fedcybgd-lpb1+legacy",
           "fedcybgd-lpb6+legacy", "fedcybgd-lpb1+int8", "fedcybgd-lpb1+nf4", "fedcybgd-lpb6+int8",
           "fedcybgd-lpb6+nf4")
DEFAULT_CONFIGS = CONFIGS[:8]


# ------------------------------------------------------------------------------------------ one process


def _load(model_arg: str, device: str):
    from fedcybgd.common.tiny import make_byte_tokenizer, make_tiny_model

    if model_arg == "tiny":
        # transformers decorates PreTrainedModel.to with functools.wraps, whose stub does not bind self.
        return make_tiny_model("llama", dtype=torch.bfloat16).to(device), make_byte_tokenizer()  # type: ignore[arg-type]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_arg)
    if path.is_file():  # a config.json: random-initialised weights of that shape
        from fedcybgd.common.modeling import config_from_json

        config = config_from_json(path.read_text())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device)
        return model.eval(), make_byte_tokenizer()
    if not (path / "config.json").is_file() and path == DEFAULT_MODEL:
        from fedcybgd.cli.prepare import packaged_smollm2, prepare_model

        prepare_model(packaged_smollm2(), path, "bfloat16")
    model = AutoModelForCausalLM.from_pretrained(str(path)).to(device)  # type: ignore[arg-type]  # (as above)
    return _own_memory(model), AutoTokenizer.from_pretrained(str(path))


def _own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """The weights in the process's own memory, as a client holds them (copied in from its blobs): from_pretrained
    leaves them mapped from the safetensors file, whose pages stay resident after a tensor is dropped as long as any
    other tensor maps the file (compact frozen layers would look like they saved nothing)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()
    gc.collect()
    return model


def _data(tokenizer, rows: int, seq_len: int) -> Sequences:
    from fedcybgd.common.data import pack_sequences, tokenize_documents
    from fedcybgd.common.records import Document
    from fedcybgd.common.tiny import TINY_TEXT

    packed = pack_sequences(tokenize_documents([Document(text=TINY_TEXT)], tokenizer), seq_len)
    if len(packed) < rows:
        raise SystemExit(f"the sonnets make only {len(packed)} rows of {seq_len} tokens")
    return packed[:rows]


def worker(args: argparse.Namespace) -> dict:
    """Run one configuration in this process and return its figures."""
    from fedcybgd.common.allocator import return_freed_memory
    from fedcybgd.common.partition import partition_model
    from fedcybgd.training import VisitHyper, train_block, train_full, train_lora

    torch.set_num_threads(args.threads)
    return_freed_memory()  # as the client daemon does
    model, tokenizer = _load(args.model, args.device)
    sequences = _data(tokenizer, args.rows, args.seq_len)
    loaded = _rss()
    hyper = VisitHyper(lr=1e-4, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=0,
                       eval_batches=0)
    name = args.worker
    base, _, option = name.partition("+")
    visits: list[tuple[str, Callable[..., Any]]]  # (block, run(on_step) -> TrainResult)
    if base == "fedavg-full":
        visits = [("model", lambda on_step: train_full(model, sequences, hyper, on_step=on_step))]
    elif base == "fedavg-lora":
        visits = [("lora", lambda on_step: train_lora(model, sequences, hyper, on_step=on_step))]
    else:
        by_option: dict[str, dict[str, Any]] = {
            "": {}, "ckpt": {"checkpoint_above": True}, "cache": {"cache_block_inputs": True}, "legacy": {},
            "int8": {"compact_frozen": "int8"}, "nf4": {"compact_frozen": "nf4"}}
        options = by_option[option]
        if option == "legacy":  # before bounded blocks: one embed_head block, the model's own (full-logits) loss
            from fedcybgd.common import lm_loss

            lm_loss._CHECKED[model] = False
        specs = partition_model(model, int(base.removeprefix("fedcybgd-lpb")), 0 if option == "legacy" else None)
        specs = _sampled(specs, args.slice_sample)
        visits = [(spec.name, lambda on_step, spec=spec: train_block(model, spec, sequences, hyper,
                                                                       on_step=on_step, **options))
                  for spec in specs]
    out: list[dict[str, Any]] = []
    for block, run in visits:
        stamps: list[tuple[float, float]] = []
        result = run(lambda step, loss, stamps=stamps: stamps.append((time.perf_counter(), time.process_time())))
        wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]  # consecutive pairs
        cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
        out.append({"block": block, "peak_bytes": result.peak_memory_bytes, "step_mean_s": statistics.mean(wall),
                    "step_median_s": statistics.median(wall), "step_cpu_s": statistics.mean(cpu)})
    layer_visits = [v for v in out if v["block"].startswith("layers.")]
    return {"config": name, "visits": out, "peak_bytes": max(v["peak_bytes"] for v in out),
            "peak_layer_visits_bytes": max((v["peak_bytes"] for v in layer_visits), default=None),
            "loaded_bytes": loaded,
            **{key: statistics.mean(v[key] for v in out) for key in ("step_mean_s", "step_median_s", "step_cpu_s")},
            "load_average": os.getloadavg()[0]}


def _sampled(specs: list, keep: int) -> list:
    """Every block, but only the first ``keep`` row ranges of each split matrix (0: all of them)."""
    if keep <= 0:
        return specs
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        if spec.sliced:
            name = spec.tensors[0].name
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > keep:
                continue
        out.append(spec)
    return out


def _rss() -> int | None:
    """The process's resident set size now (Linux), or the CUDA memory allocated on a GPU run."""
    from fedcybgd.common.procfs import status_field

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.memory_allocated())
    return status_field("VmRSS")


# ------------------------------------------------------------------------------------------ the driver


def run_config(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", str(args.model), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--rows", str(args.rows),
           "--device", args.device, "--threads", str(args.threads), "--slice-sample", str(args.slice_sample)]
    return run_json_worker(cmd, args.threads, name)


def report(results: list[dict]) -> str:
    full = next((r for r in results if r["config"] == "fedavg-full"), None)
    lines = [f"{'configuration':<22} {'loaded MiB':>10} {'peak MiB':>9} {'layer visits':>12} {'step s':>7} "
             f"{'(median)':>8} {'CPU s':>7} {'peak/full':>9} {'step/full':>9} {'CPU/full':>9} {'load':>5}"]

    def ratio(r, key):
        return f"{r[key] / full[key]:.1%}" if full else "-"

    for r in results:
        layers = f"{r['peak_layer_visits_bytes'] / 2**20:.0f}" if r["peak_layer_visits_bytes"] else "-"
        lines.append(f"{r['config']:<22} {(r['loaded_bytes'] or 0) / 2**20:>10.0f} {r['peak_bytes'] / 2**20:>9.0f} "
                     f"{layers:>12} {r['step_mean_s']:>7.3f} {r['step_median_s']:>8.3f} {r['step_cpu_s']:>7.3f} "
                     f"{ratio(r, 'peak_bytes'):>9} {ratio(r, 'step_mean_s'):>9} {ratio(r, 'step_cpu_s'):>9} "
                     f"{r['load_average']:>5.1f}")
    return "\n".join(lines)


def per_visit_report(results: list[dict]) -> str:
    """Every visit's peak per configuration, and the largest visit against the largest decoder-layer visit."""
    lines = []
    for r in results:
        visits = r["visits"]
        layers = max((v["peak_bytes"] for v in visits if v["block"].startswith("layers.")), default=None)
        largest = max(visits, key=lambda v: v["peak_bytes"])
        ratio = f"{largest['peak_bytes'] / layers:.2f}x the largest layer visit" if layers else ""
        lines.append(f"{r['config']}: largest visit {largest['block']} {largest['peak_bytes'] / 2**20:.0f} MiB {ratio}")
        lines += [f"    {v['block']:<40} {v['peak_bytes'] / 2**20:>8.0f} MiB" for v in visits]
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["config"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, scale, label in ((axes[0], "peak_bytes", 2**20, "client peak memory (MiB)"),
                                  (axes[1], "step_mean_s", 1, "mean training-step time (s)")):
        values = [r[key] / scale for r in results]
        bars = ax.barh(names, values, color=["tab:red" if n.startswith("fedavg-full") else "tab:blue" for n in names])
        ax.bar_label(bars, fmt="%.2f" if scale == 1 else "%.0f", padding=2)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model directory, or 'tiny'")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per visit (at least 2)")
    parser.add_argument("--rows", type=int, default=16, help="local sequences (steps * batch / rows = local epochs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1,
                        help="processes per configuration; the one with the shortest mean step counts (other "
                             "processes on the machine only ever slow a run down)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    parser.add_argument("--slice-sample", type=int, default=0,
                        help="measure only the first K row-range visits of each split matrix (0: all)")
    parser.add_argument("--per-visit", action="store_true", help="print every visit's peak")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 0 is left out of the times)")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = []
    for name in args.configs:
        results.append(min((run_config(args, name) for _ in range(args.repeat)), key=lambda r: r["step_mean_s"]))
        print(f"  {name}: peak {results[-1]['peak_bytes'] / 2**20:.0f} MiB, step {results[-1]['step_mean_s']:.3f} s",
              file=sys.stderr, flush=True)
    setting = (f"{args.model if args.model == 'tiny' else Path(args.model).name} on {args.device}, "
               f"batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps per visit on {args.rows} rows, "
               f"{args.threads} threads")
    print(setting)
    print(report(results))
    if args.per_visit:
        print(per_visit_report(results))
    if args.out:
        args.out.write_text(json.dumps({"setting": setting, "results": results}, indent=2))
    if args.plot:
        plot(results, args.plot, setting)


if __name__ == "__main__":
    main()
