"""The memory planner: the peak memory of every block's visit, predicted from a model's config alone, so that the
coordinator gives a block only to a client whose memory holds its visit (and an operator can size clients before a
run: ``fedcybgd plan``).

The prediction is a *simulation*, not a formula: the model is built on the ``meta`` device (shapes and dtypes, no
data, no memory), partitioned as the run partitions it, and each block's visit is run there with the project's own
code (``block_trainables``, ``checkpoint_layers``, ``causal_lm_loss``, ``MasterAdamW``): one evaluation loss (no
grad), then two optimizer steps, the second with the optimizer state the first created (the first step's forward and
backward are left out: they are the second's without that state, so they cannot hold the peak).
``LiveMemory`` counts the bytes of every tensor the visit creates, op by op, and keeps their peak. A formula would
have to be re-derived for every architecture and every change to the training code; the simulation follows both.

A visit's peak = the model's weights (they exist before the visit) + the simulated peak + on CPU two measured
constants, because a CPU visit reports the process's peak resident set size (``training/memory.py``): the process
itself (Python, torch, transformers, the client's code and data) and what the C allocator keeps resident beyond the
live tensors. A CUDA visit reports the caching allocator's peak allocated bytes: weights and tensors only.

What the meta device does not decide like the target device is settled here:

* Attention. On ``meta``, ``scaled_dot_product_attention`` takes its reference path, which materialises the
  ``[batch, heads, seq, seq]`` score matrix (hundreds of MiB per layer at 2048 tokens); the target devices run a
  fused kernel that keeps only the output and a log-sum-exp per row. The planner routes it to the fused kernel the
  target device chooses (CPU: flash attention for CPU; CUDA: flash attention, or memory-efficient attention when
  there is a mask or an fp32 model), whose meta kernels give the real output shapes.
* AdamW. On CUDA it runs its multi-tensor (``foreach``) implementation, whose temporaries span all the block's
  parameters at once; elsewhere one parameter at a time. The simulation asks for the target's.

Not counted: memory the kernels allocate and free inside one operator (cuBLAS/oneDNN workspaces, attention
kernels' scratch), small next to a visit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import PretrainedConfig

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.lm_loss import causal_lm_loss
from fedcybgd.common.modeling import config_from_json, model_from_config
from fedcybgd.common.partition import partition_model
from fedcybgd.training.compact import frozen_layers_compacted
from fedcybgd.training.hyper import VisitHyper
from fedcybgd.training.layers import checkpoint_layers, decoder_layers, layers_above
from fedcybgd.training.live_memory import LiveMemory
from fedcybgd.training.loop import MasterAdamW
from fedcybgd.training.privacy import ClippedGradSum
from fedcybgd.training.slices import block_trainables

__all__ = ["PlanSettings", "VisitPlan", "plan_visits", "plan_model_dir_or_config", "SimulatedVisit", "simulate_visit",
           "CPU_RUNTIME_BYTES", "CPU_ALLOCATOR_BYTES", "DEVICE_TYPES"]

DEVICE_TYPES = ("cpu", "cuda")

#: What a CPU client process holds besides the model's tensors: the resident set size of a process that has imported
#: the client (torch, transformers, peft, grpc, fedcybgd) and built a model, minus the bytes of the model's weights and
#: buffers. Measured by ``bench/memory_plan.py --calibrate`` on four architectures (365-367 MiB each).
CPU_RUNTIME_BYTES = 367 * 2**20

#: What the C allocator keeps resident during a CPU visit beyond the live tensors. Client processes map every
#: allocation of 1 MiB or more on its own (``common/allocator.py``), so freed tensors leave the resident set; what
#: remains is the heap of smaller allocations and its holes. Measured by ``bench/memory_plan.py --calibrate``: the
#: median of (peak RSS - RSS at the visit's start - simulated peak of the live tensors) over 22 visits of two
#: architectures at batch shapes 1 x 512 and 4 x 128 (range 30-53 MiB), not the shapes the benchmark validates at
#: (2 x 256). (Before that setting glibc raised its mmap threshold to 32 MiB and this was 175 MiB, range 51-265.)
CPU_ALLOCATOR_BYTES = 42 * 2**20


@dataclass(frozen=True)
class PlanSettings:
    """What a visit's memory depends on besides the model: the visit's batch shape and dtype, the device type
    (``"cpu"``: peak RSS; ``"cuda"``: peak allocated), the partition, and the visit's options.

    ``compact_frozen``: every frozen decoder layer held quantized during the visit (``training/compact.py``'s
    ``compact_layers``: ``"int8"`` | ``"nf4"``; None: as they are), as ``train_block(compact_frozen=)`` holds them.
    ``runtime_bytes``: the process's own memory on top of its tensors
    (None: ``CPU_RUNTIME_BYTES + CPU_ALLOCATOR_BYTES`` on CPU, 0 on CUDA).
    ``privacy``: the visits are record-level DP-SGD (``VisitHyper.privacy``, ``training/privacy.py``): their steps
    backpropagate one row at a time into fp32 sums of the clipped per-example gradients (``batch_size`` then sizes
    only the evaluation batches, whose forward pass is still simulated at that size)."""

    batch_size: int
    seq_len: int
    dtype: torch.dtype
    device_type: str = "cpu"
    checkpoint_above: bool = False
    layers_per_block: int = 1
    max_block_params: int | None = None
    block_layout: str = "contiguous"
    compact_frozen: str | None = None
    runtime_bytes: int | None = None
    privacy: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 2:
            raise ValueError(f"batch_size must be >= 1 and seq_len >= 2, got {self.batch_size} x {self.seq_len}")
        if self.device_type not in DEVICE_TYPES:
            raise ValueError(f"device_type must be one of {DEVICE_TYPES}, got {self.device_type!r}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")

    @property
    def runtime(self) -> int:
        """Bytes of the process itself counted in the device's figure."""
        if self.runtime_bytes is not None:
            return self.runtime_bytes
        return CPU_RUNTIME_BYTES + CPU_ALLOCATOR_BYTES if self.device_type == "cpu" else 0


@dataclass(frozen=True)
class VisitPlan:
    """The predicted peak memory of one block's visit and its parts:
    ``peak_bytes = weights_bytes + trained_bytes + activation_bytes + runtime_bytes``.

    ``trained_bytes`` is the optimizer's state (fp32 masters of low-precision parameters, both AdamW moments; for a
    private visit also the fp32 sums of clipped per-example gradients), alive throughout the second step;
    ``activation_bytes`` is the rest of the simulated peak: activations kept for backward, gradients and
    temporaries. ``runtime_bytes`` is the process's own memory (CPU: runtime and allocator
    retention; CUDA: 0)."""

    index: int
    block: str
    params: int
    weights_bytes: int
    trained_bytes: int
    activation_bytes: int
    runtime_bytes: int
    peak_bytes: int


def plan_visits(config: PretrainedConfig, settings: PlanSettings) -> list[VisitPlan]:
    """The predicted peak memory of every block's visit, in partition order (``partition_model(model,
    settings.layers_per_block, settings.max_block_params)``). A pure function of the config and the settings, and
    remembered: asking again costs nothing. Raises ValueError for settings the partition refuses, and
    NotImplementedError for an option the training code does not offer."""
    return list(_plans(config.to_json_string(use_diff=False), settings))


def plan_model_dir_or_config(path: str | Path) -> PretrainedConfig:
    """The config of a Hugging Face model directory or of a ``config.json`` file (no weights are read). Raises
    FileNotFoundError / ValueError with the path in the message."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no model config at {path} (expected a model directory or a config.json file)")
    try:
        values = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not JSON: {exc}") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"{file} is not a Hugging Face model config (no model_type)")
    return config_from_json(json.dumps(values))


# -------------------------------------------------------------------------------------------------- simulation

_LOCK = threading.Lock()  # one simulation at a time: they are CPU-bound anyway, and the cache is filled once


@functools.lru_cache(maxsize=64)
def _plans_cached(config_json: str, settings: PlanSettings) -> tuple[VisitPlan, ...]:
    model = model_from_config(config_from_json(config_json), settings.dtype, "meta")
    specs = partition_model(model, settings.layers_per_block, settings.max_block_params, settings.block_layout)
    return tuple(_plan_visit(model, spec, settings) for spec in specs)


def _plans(config_json: str, settings: PlanSettings) -> tuple[VisitPlan, ...]:
    with _LOCK:
        return _plans_cached(config_json, settings)


def _plan_visit(model: nn.Module, spec: BlockSpec, settings: PlanSettings) -> VisitPlan:
    with frozen_layers_compacted(model, spec, settings.compact_frozen, keep_originals=True):
        weights = _weights_bytes(model)
        visit = simulate_visit(model, spec, settings)
    runtime = settings.runtime
    return VisitPlan(index=spec.index, block=spec.name, params=spec.numel, weights_bytes=weights,
                     trained_bytes=visit.state_bytes, activation_bytes=visit.peak_bytes - visit.state_bytes,
                     runtime_bytes=runtime, peak_bytes=weights + visit.peak_bytes + runtime)


@dataclass(frozen=True)
class SimulatedVisit:
    """What ``LiveMemory`` counted during a simulated visit: the optimizer's state after the first step, and the
    peak of everything the visit created (the state included)."""

    state_bytes: int
    peak_bytes: int


def simulate_visit(model: nn.Module, spec: BlockSpec, settings: PlanSettings) -> SimulatedVisit:
    """The tensors a visit of ``spec`` creates, counted as ``fit`` creates them (the weights are not: they exist
    before). The model is on ``meta`` for a plan; on a real device the same steps run on real tensors (the tests
    compare the two)."""
    hyper = VisitHyper(lr=1e-4, steps=2, batch_size=settings.batch_size, seq_len=settings.seq_len, seed=0)
    _freeze(model)
    try:
        with contextlib.ExitStack() as stack:
            trainables = stack.enter_context(block_trainables(model, spec))
            stack.enter_context(_fused_attention(model, settings.device_type))  # before checkpointing: see there
            if settings.checkpoint_above:
                stack.enter_context(checkpoint_layers(layers_above(model, spec)))
            params = list({id(p): p for p in trainables.params}.values())  # a tied weight is trained once
            for p in params:
                p.requires_grad_(True)
            memory = stack.enter_context(LiveMemory())
            ids = torch.zeros(settings.batch_size, settings.seq_len, dtype=torch.long,
                              device=next(model.parameters()).device)
            with torch.no_grad():  # the loss before (and after) the visit: mean_loss
                causal_lm_loss(model, ids)
            before = memory.live
            optimizer = MasterAdamW(params, hyper)
            if settings.device_type == "cuda":  # torch's default there; meta tensors would get the for-loop
                for group in optimizer.optimizer.param_groups:
                    group["foreach"] = True
            if settings.privacy:
                return _simulate_private_steps(params, optimizer, memory, before,
                                               lambda: causal_lm_loss(model, ids[:1], head_rows=trainables.head_rows))
            # Step 1 creates the optimizer's state; its gradients are stand-ins of the same shapes (see the module
            # docstring). Step 2 runs forward and backward with that state alive.
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            state = memory.live - before
            loss = causal_lm_loss(model, ids, head_rows=trainables.head_rows)
            loss.backward()
            del loss
            optimizer.step()
            del optimizer
            return SimulatedVisit(state_bytes=state, peak_bytes=memory.peak)
    finally:
        _freeze(model)


def _simulate_private_steps(params: list[nn.Parameter], optimizer: MasterAdamW, memory: LiveMemory, before: int,
                            row_loss: Callable[[], torch.Tensor]) -> SimulatedVisit:
    """The two steps of ``simulate_visit`` as a private visit takes them (``training/privacy.py``): the fp32 sums
    live from the first step on; the second backpropagates one row, clips it into the sums, adds the noise and
    steps on them. (More rows per step repeat the same per-example work: no higher peak.)"""
    sums = ClippedGradSum(params, clip_norm=1.0)
    generator = torch.Generator()  # the simulation's noise is no secret (meta tensors accept a CPU generator)
    optimizer.step_on(sums.noisy_mean(1.0, 1.0, generator))  # step 1: creates the optimizer's state
    state = memory.live - before
    sums.reset()
    loss = row_loss()
    loss.backward()
    del loss
    sums.add_example()
    optimizer.step_on(sums.noisy_mean(1.0, 1.0, generator))
    del optimizer, sums
    return SimulatedVisit(state_bytes=state, peak_bytes=memory.peak)


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None


def _weights_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once; a quantized weight by its parts)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        for part in _parts(tensor):
            storage = part.untyped_storage()
            if storage._cdata not in seen:
                seen.add(storage._cdata)
                total += storage.nbytes()
    return total


def _parts(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    if type(tensor) is not torch.Tensor and type(tensor) is not nn.Parameter and hasattr(tensor,
                                                                                           "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from _parts(getattr(tensor, name))
    else:
        yield tensor


# -------------------------------------------------------------------------------------------------- attention


@contextlib.contextmanager
def _fused_attention(model: nn.Module, device_type: str) -> Iterator[None]:
    """Within the context, the decoder layers run their attention as ``device_type`` would (``_FusedAttention``).

    The mode is entered inside each layer's ``forward`` rather than around the whole visit: a mode is inactive
    while its handler runs, and ``backward()`` is a torch function, so a mode around the visit would miss the
    layers that activation checkpointing runs again during backward. Enter this before ``checkpoint_layers``, so
    that the forward it recomputes is this one."""
    layers = list(decoder_layers(model))
    for layer in layers:
        def run(*args: Any, _forward: Any = layer.forward, **kwargs: Any) -> Any:
            with _FusedAttention(device_type):
                return _forward(*args, **kwargs)

        layer.forward = run  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # checkpoint_layers may have removed it already


class _FusedAttention(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` on meta tensors to the fused kernel the target device would run
    (see the module docstring); everything else passes through."""

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query = args[0] if args else kwargs["query"]
            if query.device.type == "meta":
                return self._attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
        aten = torch.ops.aten
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # as the kernels do: an additive float mask
            attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype)
        if self.device_type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        if attn_mask is None and query.dtype in (torch.bfloat16, torch.float16) and query.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                            scale=scale)[0]
        if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the efficient kernel wants every head
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, True, dropout_p,
                                                            is_causal, scale=scale)[0]
