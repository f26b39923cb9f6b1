"""Which block-cyclic configuration learns most per training token? Variants of the centralized block-cyclic
reference, in one process, on the learning-curve benchmark's data (``bench/curves.py``), at equal tokens.

    .venv/bin/python bench/block_methods.py --out bench-out/curves-shakespeare [--only LABEL ...] [--lr 2e-4]

A federated FedCyBGD run computes what the block-cyclic reference computes on the same data per visit (the
correctness anchor, tested bit for bit), so a change of the method (blocks, their order, steps per visit,
learning rates) is measured here in minutes and then confirmed with a real federated run by ``bench/curves.py``.
Budget: ``--cycles`` cycles of the baseline (``--cycle-layers`` decoder layers per block, every block, ``--local-steps``
steps of ``--batch-size`` x ``--seq-len`` tokens per visit); each variant trains exactly that many tokens and is
evaluated (validation and test split) at every baseline cycle's worth of tokens. Results: ``methods.json`` and
``methods.md`` under ``--out``; finished variants are not run again.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from curve_inputs import block_count, nearest_schedule  # noqa: E402
from curves import Point, _loss, pooled_data  # noqa: E402


@dataclass(frozen=True)
class Variant:
    label: str
    layers_per_block: int = 6
    local_steps: int = 5
    lr_factor: float = 1.0
    other_lr_factor: float = 1.0   # learning rate of the blocks outside the decoder layers, relative to the layers'
    others_every: int = 1          # blocks outside the decoder layers join every N-th cycle (its last); 0: never
    merge_small: bool = False      # a block far smaller than a layer joins the last decoder-layer block
    order: str = "ascending"
    lr_schedule: str = "cosine"
    betas: tuple[float, float] = (0.9, 0.999)
    #: what survives from one visit of a parameter to its next (in one process; a federated run keeps neither):
    #: "" nothing, "masters" its fp32 master copy, "moments" the master and Adam's moments and step count
    carry: str = ""
    #: LISA (Pan et al. 2024): each visit trains this many decoder layers drawn at random (0: the partition's blocks)
    lisa_layers: int = 0
    lisa_others: bool = False  # LISA: the embeddings, final norm and head join every visit, as LISA has it
    #: a fixed partition whose blocks are spread over the depth: block k holds layers k, k + B, k + 2B, ... (B
    #: blocks of ``layers_per_block`` layers), the decoder layers only: LISA's spread without its randomness
    strided: bool = False



VARIANTS = [
    Variant("baseline L6 s5"),
    Variant("merge small blocks", merge_small=True),
    Variant("layers only", others_every=0),
    Variant("others every 2nd cycle + merge", others_every=2, merge_small=True),
    Variant("others every 4th cycle + merge", others_every=4, merge_small=True),
    Variant("others every 4th cycle", others_every=4),
    Variant("others every 2nd cycle", others_every=2),
    Variant("L15 others every 4th cycle", layers_per_block=15, others_every=4),
    Variant("layers only lr x1.5", others_every=0, lr_factor=1.5),
    Variant("layers only lr x2", others_every=0, lr_factor=2.0),
    Variant("L10 layers only", layers_per_block=10, others_every=0),
    Variant("L10 others every 4th cycle", layers_per_block=10, others_every=4),
    Variant("s10", local_steps=10),
    Variant("s2", local_steps=2),
    Variant("L10", layers_per_block=10),
    Variant("L15", layers_per_block=15),
    Variant("L3", layers_per_block=3),
    Variant("descending", order="descending"),
    Variant("random order", order="random"),
    Variant("others lr x0.5", other_lr_factor=0.5),
    Variant("others lr x3", other_lr_factor=3.0),
    Variant("constant lr", lr_schedule="constant"),
    Variant("betas 0.9/0.95", betas=(0.9, 0.95)),
    Variant("lr x1.5", lr_factor=1.5),
    Variant("lr x0.7", lr_factor=0.7),
    # On top of the default (embed/head every 4th cycle and the last), at its federated best rate (x1.5):
    Variant("e4 lr x1.5", others_every=4, lr_factor=1.5),
    Variant("e4 lr x1.5 others lr x3", others_every=4, lr_factor=1.5, other_lr_factor=3.0),
    Variant("e4 lr x1.5 random order", others_every=4, lr_factor=1.5, order="random"),
    Variant("e4 lr x1.5 betas 0.9/0.95", others_every=4, lr_factor=1.5, betas=(0.9, 0.95)),
    Variant("e4 lr x1.5 constant lr", others_every=4, lr_factor=1.5, lr_schedule="constant"),
    # Fifth session: what a visit loses by restarting (fp32 masters rounded to the bf16 model at its end; Adam's
    # moments restarted), and LISA's layer sampling, at the default's rate.
    Variant("e4 lr x1.5 carry masters", others_every=4, lr_factor=1.5, carry="masters"),
    Variant("e4 lr x1.5 carry masters+moments", others_every=4, lr_factor=1.5, carry="moments"),
    Variant("LISA 6 layers lr x1.5", lr_factor=1.5, lisa_layers=6),
    Variant("LISA 6 layers + embed/head lr x1.5", lr_factor=1.5, lisa_layers=6, lisa_others=True),
    Variant("strided 6 layers lr x1.5", lr_factor=1.5, others_every=0, strided=True),
]


def blocks_of(model, v: Variant):
    """The variant's blocks: the run's partition, small blocks merged into the last decoder-layer block, or the
    blocks outside the decoder layers dropped (never visited)."""
    from fedcybgd.common.blocks import BlockSpec
    from fedcybgd.common.partition import layer_block_count, partition_model

    specs = partition_model(model, v.layers_per_block)
    layers, others = specs[:layer_block_count(specs)], specs[layer_block_count(specs):]
    if v.strided:
        single = partition_model(model, 1)[:layer_block_count(partition_model(model, 1))]
        return [BlockSpec(k, "layers." + "+".join(str(i) for i in range(k, len(single), len(layers))),
                          tuple(sorted((t for s in single[k::len(layers)] for t in s.tensors), key=lambda t: t.name)))
                for k in range(len(layers))]
    if v.others_every == 0:
        return layers
    if v.merge_small:
        small = [s for s in others if s.numel * 100 < layers[-1].numel]
        if small:
            last = layers[-1]
            merged = BlockSpec(last.index, last.name + "+small",
                               tuple(sorted(last.tensors + tuple(t for s in small for t in s.tensors),
                                            key=lambda t: t.name)))
            layers = layers[:-1] + [merged]
            others = [s for s in others if s not in small]
    return layers + others


def visit_sequence(specs, v: Variant, visits: int) -> list[int]:
    """The block of each visit, by the coordinator's schedule (``embed_head_every`` = ``others_every``): of the
    number of cycles whose visits come nearest to ``visits``; for merged blocks or no embed/head blocks, cut at
    ``visits`` (their cycles are periodic, without the last-cycle rule)."""
    from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig

    if v.merge_small or v.others_every == 0:
        cut = CycleSchedule.for_blocks(specs, ScheduleConfig(cycles=visits + 1, order=v.order,
                                                             embed_head_every=v.others_every or 1))
        return [cut.block_of(r) for r in range(visits)]
    nearest = nearest_schedule(specs, visits, order=v.order, embed_head_every=v.others_every)
    return [nearest.block_of(r) for r in range(nearest.total_rounds)]


def lisa_blocks(model, v: Variant, visits: int) -> tuple[list, list[int]]:
    """LISA's visits: each trains ``v.lisa_layers`` decoder layers drawn uniformly without replacement (and, with
    ``lisa_others``, every parameter outside them), one block of its own per visit."""
    import random

    from fedcybgd.common.blocks import BlockSpec
    from fedcybgd.common.partition import layer_block_count, partition_model

    specs = partition_model(model, 1, max_block_params=0)
    layers, others = specs[:layer_block_count(specs)], specs[layer_block_count(specs):]
    draw = random.Random(0)
    blocks = []
    for visit in range(visits):
        chosen = sorted(draw.sample(range(len(layers)), v.lisa_layers))
        parts = [layers[i] for i in chosen] + (others if v.lisa_others else [])
        blocks.append(BlockSpec(visit, "lisa:" + ",".join(map(str, chosen)),
                                tuple(sorted((t for s in parts for t in s.tensors), key=lambda t: t.name))))
    return blocks, list(range(visits))


@contextlib.contextmanager
def carried_optimizer(carry: str) -> Iterator[None]:
    """Visits whose fp32 masters (``carry="masters"``), or masters and Adam's moments (``"moments"``), survive to the
    parameter's next visit, as if the model were kept in fp32 (and its optimizer state travelled with the block).
    A measurement of what the restart at each visit costs, not a federated option: the product's visit starts from
    the bf16 model and a fresh optimizer (``training/loop.py``)."""
    import torch

    from fedcybgd.training import loop

    if not carry:
        yield
        return
    kept: dict[int, tuple[torch.Tensor, dict]] = {}
    plain = loop.MasterAdamW

    class Carrying(plain):  # type: ignore[misc, valid-type]
        def __init__(self, params, hyper) -> None:
            super().__init__(params, hyper)
            for i, p in enumerate(self.params):
                saved = kept.get(id(p))
                # Reuse only a master that rounds to the parameter as it is now (nothing else changed it since).
                if saved is None or not self.use_masters or not torch.equal(saved[0].to(p.dtype), p.detach()):
                    continue
                self.masters[i].data.copy_(saved[0])
                if carry == "moments" and saved[1]:
                    self.optimizer.state[self.masters[i]] = {k: v.clone() for k, v in saved[1].items()}

        def _update(self) -> None:
            super()._update()
            for p, m in zip(self.params, self.masters, strict=True):
                kept[id(p)] = (m.detach(), dict(self.optimizer.state.get(m, {})))

    loop.MasterAdamW = Carrying  # type: ignore[misc]
    try:
        yield
    finally:
        loop.MasterAdamW = plain  # type: ignore[misc]


def run_variant(v: Variant, args: argparse.Namespace) -> dict:
    with carried_optimizer(v.carry):
        return _run_variant(v, args)


def _run_variant(v: Variant, args: argparse.Namespace) -> dict:
    import torch

    from fedcybgd.server.config import TrainingConfig
    from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
    from fedcybgd.training import train_block

    torch.set_num_threads(args.threads)
    model_dir, model, pooled, val, tests = pooled_data(args)

    tokens_per_visit = v.local_steps * args.batch_size * args.seq_len
    tokens_per_cycle = block_count(model_dir, args.cycle_layers) * args.local_steps * args.batch_size * args.seq_len
    budget = args.cycles * tokens_per_cycle
    if v.lisa_layers:
        specs, sequence = lisa_blocks(model, v, budget // tokens_per_visit)
    else:
        specs = blocks_of(model, v)
        sequence = visit_sequence(specs, v, budget // tokens_per_visit)
    visits = len(sequence)
    lr = args.lr * v.lr_factor
    # One schedule over every visit of the variant (cosine from lr to 10 % across the run, as the demo's).
    timeline = CycleSchedule(visits, ScheduleConfig(cycles=1, lr=lr, lr_schedule=v.lr_schedule, seed=0))
    training = TrainingConfig(local_steps=v.local_steps, batch_size=args.batch_size, seq_len=args.seq_len)
    points = [asdict(Point(0, _loss(model, val), _loss(model, tests)))]
    peak, started, evaluating = 0, time.perf_counter(), 0.0
    for visit in range(visits):
        spec = specs[sequence[visit]]
        factor = 1.0 if spec.name.startswith(("layers.", "lisa:")) else v.other_lr_factor
        hyper = replace(training.visit_hyper(timeline.lr_of(visit) * factor, timeline.seed_of(visit)), betas=v.betas)
        result = train_block(model, spec, pooled, hyper)
        peak = max(peak, result.peak_memory_bytes)
        done = (visit + 1) * tokens_per_visit
        if done // tokens_per_cycle > (done - tokens_per_visit) // tokens_per_cycle or visit == visits - 1:
            begun = time.perf_counter()
            points.append(asdict(Point(done, _loss(model, val), _loss(model, tests), peak_memory_bytes=peak,
                                       compute_seconds=begun - started - evaluating)))
            evaluating += time.perf_counter() - begun
            print(f"[{v.label}] {done:,} tokens: validation {points[-1]['val_loss']:.4f}", flush=True)
    return {"variant": asdict(v), "lr": lr, "blocks": [s.name for s in specs], "visits": visits, "points": points}


def report(results: list[dict]) -> str:
    base = next((r for r in results if r["variant"]["label"] == "baseline L6 s5"), None)
    lines = ["| variant | lr | blocks | visits | validation loss per cycle's tokens | final test | vs baseline (val) |"
             " peak MiB |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in results:
        pts = r["points"]
        vs = f"{pts[-1]['val_loss'] / base['points'][-1]['val_loss'] - 1:+.2%}" if base else ""
        lines.append(f"| {r['variant']['label']} | {r['lr']:g} | {len(r['blocks'])} | {r['visits']} | "
                     + " ".join(f"{p['val_loss']:.4f}" for p in pts[1:]) +
                     f" | {pts[-1]['test_loss']:.4f} | {vs} | {pts[-1]['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out/curves")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--corpus")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--cycle-layers", type=int, default=6)
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-sequences", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-4, help="the baseline's learning rate (curves.py's best)")
    parser.add_argument("--only", nargs="*", help="variant labels, in this order (default: all)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    store = Path(args.out) / "methods.json"
    results = json.loads(store.read_text()) if store.is_file() else []
    by_label = {v.label: v for v in VARIANTS}
    chosen = [by_label[label] for label in args.only] if args.only else VARIANTS
    for v in [] if args.report_only else chosen:
        key = f"{v.label} @ {args.lr * v.lr_factor:g}"
        if any(f"{r['variant']['label']} @ {r['lr']:g}" == key for r in results):
            continue
        print(f"[{v.label}] running", flush=True)
        results.append(run_variant(v, args))
        store.write_text(json.dumps(results, indent=1))
    text = report(results)
    (Path(args.out) / "methods.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
