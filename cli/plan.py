"""``fedcybgd plan``: will every visit of a run fit a client? The memory planner's prediction for each block of a model
(``training/planner.py``), from its config alone, against a client's memory, and which partition and
``checkpoint_above`` settings would fit, so an operator can size clients and choose settings before a run starts.

    fedcybgd plan --model DIR_OR_CONFIG_JSON --memory 24GiB [--batch-size 1] [--seq-len 2048] [--layers-per-block 1]
        [--max-block-params N] [--dtype bfloat16] [--device cuda|cpu] [--checkpoint-above] [--compact-frozen int8|nf4]
        [--no-alternatives]
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from fedcybgd.common.layouts import NEW_RUN_LAYOUT
from fedcybgd.common.sizes import format_size, parse_size

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from fedcybgd.training.planner import PlanSettings

__all__ = ["PlanRequest", "parse_size", "format_size", "run_plan", "ALTERNATIVE_LAYERS_PER_BLOCK"]

#: Partitions the summary compares (decoder layers per block), each with and without checkpoint_above.
ALTERNATIVE_LAYERS_PER_BLOCK = (1, 2, 4)

@dataclass(frozen=True)
class PlanRequest:
    """What ``fedcybgd plan`` was asked."""

    model: str
    memory_bytes: int
    batch_size: int = 1
    seq_len: int = 2048
    layers_per_block: int = 1
    max_block_params: int | None = None
    block_layout: str = NEW_RUN_LAYOUT
    dtype: torch.dtype = torch.bfloat16
    device_type: str = "cuda"
    checkpoint_above: bool = False
    compact_frozen: str | None = None
    privacy: bool = False       # DP-SGD visits: one row backpropagated at a time, fp32 sums of clipped gradients
    alternatives: bool = True


def run_plan(request: PlanRequest) -> int:
    """Print the plan of ``request`` and, unless asked not to, which other settings fit. Returns the exit status (0:
    the plan was made, whether or not everything fits)."""
    from fedcybgd.training.planner import PlanSettings, plan_model_dir_or_config, plan_visits

    config = plan_model_dir_or_config(request.model)
    settings = PlanSettings(batch_size=request.batch_size, seq_len=request.seq_len, dtype=request.dtype,
                            device_type=request.device_type, checkpoint_above=request.checkpoint_above,
                            layers_per_block=request.layers_per_block, max_block_params=request.max_block_params,
                            block_layout=request.block_layout, compact_frozen=request.compact_frozen,
                            privacy=request.privacy)
    start = time.perf_counter()
    plans = plan_visits(config, settings)
    _progress(f"planned {len(plans)} visits in {time.perf_counter() - start:.1f} s")
    memory = request.memory_bytes
    dtype = str(request.dtype).removeprefix("torch.")
    print(f"{config.model_type} model from {request.model}: {sum(p.params for p in plans) / 1e9:.2f}B parameters, "
          f"{len(plans)} blocks; {request.device_type}, {dtype}, batch {request.batch_size} x {request.seq_len}, "
          f"{request.layers_per_block} layer(s) per block, checkpoint_above {_on(request.checkpoint_above)}, "
          f"frozen layers {request.compact_frozen or 'exact'}{', DP-SGD' if request.privacy else ''}; "
          f"memory {format_size(memory)}")
    print(f"{'#':>4}  {'block':<40} {'params':>8} {'weights':>10} {'trained':>10} {'activ.':>10} {'runtime':>10} "
          f"{'peak':>10}  fits")
    for p in plans:
        print(f"{p.index:>4}  {p.block[:40]:<40} {p.params / 1e6:>7.1f}M {format_size(p.weights_bytes):>10} "
              f"{format_size(p.trained_bytes):>10} {format_size(p.activation_bytes):>10} "
              f"{format_size(p.runtime_bytes):>10} {format_size(p.peak_bytes):>10}  "
              f"{'yes' if p.peak_bytes <= memory else 'NO'}")
    largest = max(plans, key=lambda p: p.peak_bytes)
    too_big = [p for p in plans if p.peak_bytes > memory]
    excess = format_size(largest.peak_bytes - memory)
    verdict = ("every visit fits" if not too_big else
               f"{len(too_big)} of {len(plans)} visits do not fit (by up to {excess})")
    print(f"largest visit: {largest.block}, {format_size(largest.peak_bytes)}; {verdict}")
    if request.alternatives:
        _alternatives(config, settings, memory)
    return 0


def _alternatives(config: PretrainedConfig, settings: PlanSettings, memory: int) -> None:
    """Largest visit and fit for each partition of ``ALTERNATIVE_LAYERS_PER_BLOCK``, with and without
    checkpoint_above (same batch, dtype, device and block bound)."""
    from fedcybgd.training.planner import plan_visits

    print(f"\nother settings (same batch, dtype, device; memory {format_size(memory)}):")
    print(f"  {'layers/block':>12}  {'checkpoint_above':>16}  {'blocks':>6}  {'largest visit':<44} every visit fits")
    for layers in ALTERNATIVE_LAYERS_PER_BLOCK:
        for checkpoint_above in (False, True):
            start = time.perf_counter()
            option = replace(settings, layers_per_block=layers, checkpoint_above=checkpoint_above)
            plans = plan_visits(config, option)
            _progress(f"layers/block {layers}, checkpoint_above {_on(checkpoint_above)}: "
                      f"{time.perf_counter() - start:.1f} s")
            largest = max(plans, key=lambda p: p.peak_bytes)
            misfits = sum(p.peak_bytes > memory for p in plans)
            print(f"  {layers:>12}  {_on(checkpoint_above):>16}  {len(plans):>6}  "
                  f"{(largest.block[:30] + ' ' + format_size(largest.peak_bytes)):<44} "
                  f"{'yes' if not misfits else f'no ({misfits} do not)'}")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _progress(message: str) -> None:
    print(f"fedcybgd plan: {message}", file=sys.stderr, flush=True)
