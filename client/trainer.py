"""One visit of Cycle Block Gradient Descent: train ONE block of the model on local data, all else frozen.

A visit, top to bottom:

1. Freeze every parameter, then unfreeze only the block's parameters.
2. Draw this visit's batches (``visit_batches``: a pure function of the data size, batch size, steps and seed).
3. Measure the loss on the first ``eval_batches`` of those batches (no grad) -> ``loss_before``.
4. Run ``steps`` AdamW steps on the block (fresh optimizer, constant lr). Low-precision blocks (bf16/fp16) are
   optimized through fp32 master copies: grad -> fp32 master grad -> clip -> step -> copy back.
5. Measure the same batches again -> ``loss_after``.
6. Hand back the trained block's tensors (CPU copies, model dtype), freeze everything again, drop grads.

Everything runs in ``model.eval()`` (no dropout) so that a visit is a deterministic function of its inputs: on
CPU with one thread, two visits on identical models with identical inputs give bit-identical tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedcybgd.common.blocks import BlockSpec, block_params, block_tensors
from fedcybgd.common.data import visit_batches
from fedcybgd.common.eval import causal_lm_loss, evaluate_loss, mean_loss, model_device

__all__ = ["VisitHyper", "VisitResult", "train_block", "evaluate_loss"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VisitHyper:
    """Hyper-parameters of one visit (sent by the coordinator with the task)."""

    lr: float
    steps: int
    batch_size: int
    seq_len: int
    seed: int
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_batches: int = 2  # loss_before/loss_after are measured on the visit's first eval_batches batches


@dataclass
class VisitResult:
    tensors: dict[str, torch.Tensor]  # the trained block: CPU, the model's dtype, contiguous
    loss_before: float
    loss_after: float
    peak_memory_bytes: int  # CUDA: max allocated during the visit; CPU: process peak RSS during the visit
    seconds: float
    samples: int  # sequences seen = steps * batch_size
    tokens: int  # input tokens seen = samples * seq_len


def train_block(
    model: nn.Module,
    spec: BlockSpec,
    sequences: torch.LongTensor,
    hyper: VisitHyper,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> VisitResult:
    """Train the block ``spec`` of ``model`` (already on its device) on rows of ``sequences`` ``[n, seq_len]``.

    Only the block's parameters change. ``on_step(step_index, loss)`` is called after every optimizer step.
    Raises ``ValueError`` for inconsistent inputs and ``FloatingPointError`` when the training loss stops being
    finite (a diverged block must not be uploaded).
    """
    _check_inputs(sequences, hyper)
    start = time.perf_counter()
    device = model_device(model)
    _reset_peak_memory(device)
    params = _unique(block_params(model, spec))  # tied weights appear once (dedup by identity)
    if not params:
        raise ValueError(f"block {spec.name!r} has no parameters in this model")
    was_training = model.training
    try:
        model.eval()  # dropout off for the whole visit: deterministic, and tiny configs/Llama have none anyway

        # 1. Freeze everything, unfreeze the block.
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)

        # 2. This visit's batches. The first eval_batches of them are also the evaluation batches, even when
        # there are fewer training steps (visit_batches is prefix-stable, so asking for more changes nothing).
        batches = visit_batches(sequences.shape[0], hyper.batch_size, max(hyper.steps, hyper.eval_batches), hyper.seed)
        eval_rows, train_rows = batches[: hyper.eval_batches], batches[: hyper.steps]

        # 3. Loss before.
        loss_before = mean_loss(model, sequences, eval_rows)

        # 4. Optimize. Low-precision blocks step on fp32 masters; fp32 blocks are optimized in place.
        use_masters = any(p.dtype in _LOW_PRECISION for p in params)
        masters = [p.detach().to(torch.float32, copy=True) for p in params] if use_masters else params
        optimizer = torch.optim.AdamW(
            masters, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay
        )
        for step, rows in enumerate(train_rows):
            # The input ids are integers and every parameter below the block is frozen, so nothing below the
            # block requires grad: autograd records no graph and saves no activations for those layers. Only
            # the block and the layers above it (through which the gradient must flow back) are recorded.
            # Keep it that way: never set requires_grad on the inputs or on other blocks' parameters.
            ids = sequences[rows].to(device)
            loss = causal_lm_loss(model, ids)
            loss_value = float(loss.detach().float())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"block {spec.name!r}: training loss is {loss_value} at step {step}")
            loss.backward()
            del loss

            if use_masters:
                for p, m in zip(params, masters):
                    m.grad = p.grad.to(torch.float32) if p.grad is not None else None
                    p.grad = None
            if hyper.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(masters, hyper.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if use_masters:
                with torch.no_grad():
                    for p, m in zip(params, masters):
                        p.copy_(m)
            if on_step is not None:
                on_step(step, loss_value)
        del optimizer, masters

        # 5. Loss after, on the same batches as before.
        loss_after = mean_loss(model, sequences, eval_rows)

        # 6. The trained block, detached from the model.
        tensors = {
            name: t.detach().to("cpu", copy=True).contiguous() for name, t in block_tensors(model, spec).items()
        }
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        model.train(was_training)

    samples = hyper.steps * hyper.batch_size
    return VisitResult(
        tensors=tensors,
        loss_before=loss_before,
        loss_after=loss_after,
        peak_memory_bytes=_peak_memory(device),
        seconds=time.perf_counter() - start,
        samples=samples,
        tokens=samples * sequences.shape[1],
    )


# ------------------------------------------------------------------------------------------------ helpers


def _check_inputs(sequences: torch.Tensor, hyper: VisitHyper) -> None:
    if sequences.dim() != 2 or sequences.dtype != torch.long:
        raise ValueError(f"sequences must be a [n, seq_len] LongTensor, got {sequences.dtype} {tuple(sequences.shape)}")
    if sequences.shape[0] == 0:
        raise ValueError("no training sequences")
    if sequences.shape[1] != hyper.seq_len:
        raise ValueError(f"sequences have length {sequences.shape[1]}, the visit asks for seq_len={hyper.seq_len}")
    if hyper.steps < 0 or hyper.batch_size <= 0 or hyper.eval_batches < 0:
        raise ValueError(f"invalid steps/batch_size/eval_batches in {hyper}")


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM) to the current RSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:  # not Linux: lifetime peak (bytes on macOS, kB elsewhere)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except Exception:
        return 0
