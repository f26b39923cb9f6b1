"""The loop every local training shares: ``train_block`` (one block, FedCyBGD), ``train_full`` (every parameter,
FedAvg-full) and ``train_lora`` (a LoRA adapter, FedAvg-LoRA) differ only in which parameters they train and what
they hand back, so one function does the visit and the three cannot drift apart.

A visit, top to bottom:

1. Freeze every parameter, then unfreeze only the trained ones.
2. Draw this visit's batches (``visit_batches``: a pure function of the data size, batch size, steps and seed).
3. Measure the loss on the first ``eval_batches`` of those batches (no grad) -> ``loss_before``.
4. Run ``steps`` AdamW steps on the trained parameters (fresh optimizer, constant lr unless a schedule is given).
   Low-precision parameters (bf16/fp16) are optimized through fp32 master copies: grad -> fp32 master grad -> clip
   -> step -> copy back.
   With ``hyper.privacy`` (record-level DP-SGD, ``training/privacy.py``) the steps are private instead: Poisson
   batches from a secret generator, per-example gradients clipped, summed, noised, divided by the expected batch
   size, and ``MasterAdamW.step_on`` those gradients (no global clipping).
5. Measure the same batches again -> ``loss_after``.
6. Hand back the trained tensors (CPU copies, their dtype), freeze everything again, drop grads.

Everything runs in ``model.eval()`` (no dropout) so that a visit is a deterministic function of its inputs: on
CPU with one thread, two visits on identical models with identical inputs give bit-identical tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fedcybgd.common.data import visit_batches
from fedcybgd.common.eval import causal_lm_loss, mean_loss, model_device
from fedcybgd.common.sequences import Sequences, SequencesLike, as_sequences
from fedcybgd.training.hyper import OnStep, VisitHyper, VisitResult
from fedcybgd.training.memory import peak_memory, reset_peak_memory
from fedcybgd.training.privacy import poisson_batches, private_steps, secret_generator

__all__ = ["fit", "visit_rows", "check_inputs", "cpu_copies", "MasterAdamW"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def visit_rows(sequences: SequencesLike, hyper: VisitHyper) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(evaluation batches, training batches) of a visit. The first eval_batches of the training batches are also
    the evaluation batches, even when there are fewer training steps (visit_batches is prefix-stable, so asking
    for more changes nothing)."""
    steps = max(hyper.steps, hyper.eval_batches)
    batches = visit_batches(len(as_sequences(sequences)), hyper.batch_size, steps, hyper.seed)
    return batches[: hyper.eval_batches], batches[: hyper.steps]


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    sequences: SequencesLike,
    hyper: VisitHyper,
    *,
    what: str,
    on_step: OnStep | None,
    collect: Callable[[], dict[str, torch.Tensor]],
    step_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    lr_at: Callable[[int], float] | None = None,
    privacy_batches: list[torch.Tensor] | None = None,
) -> VisitResult:
    """Train ``params`` (everything else frozen) through one visit; ``collect()`` gives the result's tensors.
    ``step_loss(step, rows)`` replaces the plain training loss of a batch when given.

    ``privacy_batches`` (for tests and benchmarks only): the rows of each step of a private visit
    (``hyper.privacy``) instead of its secret Poisson batches; ``hyper.steps`` of them."""
    sequences = check_inputs(sequences, hyper)
    if privacy_batches is not None and (hyper.privacy is None or len(privacy_batches) != hyper.steps):
        raise ValueError(f"privacy_batches needs hyper.privacy and {hyper.steps} batches")
    start = time.perf_counter()
    device = model_device(model)
    reset_peak_memory(device)
    params = _unique(params)  # tied weights appear once (dedup by identity)
    if not params:
        raise ValueError(f"{what} has no parameters in this model")
    was_training = model.training
    try:
        model.eval()  # dropout off for the whole visit: deterministic, and tiny configs/Llama have none anyway

        # 1. Freeze everything, unfreeze the trained parameters.
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)

        # 2. This visit's batches.
        eval_rows, train_rows = visit_rows(sequences, hyper)

        # 3. Loss before.
        loss_before = mean_loss(model, sequences, eval_rows)

        # 4. Optimize. Low-precision parameters step on fp32 masters; fp32 ones are optimized in place.
        optimizer = MasterAdamW(params, hyper)
        samples = hyper.steps * hyper.batch_size
        if hyper.privacy is not None:  # record-level DP-SGD: private steps instead of the ordinary ones below
            samples = _private_visit_steps(model, params, sequences, hyper, optimizer, what=what, on_step=on_step,
                                           step_loss=step_loss, lr_at=lr_at, batches=privacy_batches)
            train_rows = []
        for step, rows in enumerate(train_rows):
            if lr_at is not None:
                optimizer.set_lr(lr_at(step))
            # The input ids are integers and every parameter below the trained ones is frozen, so nothing below
            # them requires grad: autograd records no graph and saves no activations for those layers. Only the
            # trained parameters and the layers above them (through which the gradient must flow back) are
            # recorded. Keep it that way: never set requires_grad on the inputs or on other parameters.
            loss = (causal_lm_loss(model, *sequences.batch(rows, device)) if step_loss is None
                    else step_loss(step, rows))
            loss_value = float(loss.detach().float())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{what}: training loss is {loss_value} at step {step}")
            loss.backward()
            del loss
            optimizer.step()
            if on_step is not None:
                on_step(step, loss_value)
        del optimizer

        # 5. Loss after, on the same batches as before.
        loss_after = mean_loss(model, sequences, eval_rows)

        # 6. The trained tensors, detached from the model.
        tensors = collect()
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        model.train(was_training)

    return VisitResult(
        tensors=tensors,
        loss_before=loss_before,
        loss_after=loss_after,
        peak_memory_bytes=peak_memory(device),
        seconds=time.perf_counter() - start,
        samples=samples,
        tokens=samples * sequences.seq_len,
    )


class MasterAdamW:
    """AdamW over the trained parameters, through fp32 master copies when they are low-precision (bf16/fp16): after
    ``backward()``, ``step()`` moves each gradient to its master (fp32), clips them together, steps, and copies the
    masters back into the parameters. One class for the visit and the memory planner's simulation of it
    (``training/planner.py``), so that what the planner counts is what a visit allocates."""

    def __init__(self, params: list[nn.Parameter], hyper: VisitHyper) -> None:
        self.params = params
        self.use_masters = any(p.dtype in _LOW_PRECISION for p in params)
        self.masters = [p.detach().to(torch.float32, copy=True) for p in params] if self.use_masters else params
        self.max_grad_norm = hyper.max_grad_norm
        self.optimizer = torch.optim.AdamW(
            self.masters, lr=hyper.lr, betas=hyper.betas, eps=hyper.eps, weight_decay=hyper.weight_decay)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step_on(self, grads: list[torch.Tensor]) -> None:
        """One update from the given fp32 gradients, one per parameter in order (a private visit's noisy mean of
        clipped per-example gradients), without clipping them again. The tensors become the gradients for the
        step and are dropped from the optimizer afterwards (the caller may reuse them)."""
        if len(grads) != len(self.masters):
            raise ValueError(f"{len(grads)} gradients for {len(self.masters)} parameters")
        for m, g in zip(self.masters, grads, strict=True):
            m.grad = g
        self._update()

    def step(self) -> None:
        """One update from the gradients ``backward()`` left on the parameters (which it drops)."""
        if self.use_masters:
            for p, m in zip(self.params, self.masters, strict=True):
                m.grad = p.grad.to(torch.float32) if p.grad is not None else None
                p.grad = None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.masters, self.max_grad_norm)
        self._update()

    def _update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.use_masters:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters, strict=True):
                    p.copy_(m)


def _private_visit_steps(model: nn.Module, params: list[nn.Parameter], sequences: Sequences, hyper: VisitHyper,
                         optimizer: MasterAdamW, *, what: str, on_step: OnStep | None,
                         step_loss: Callable[[int, torch.Tensor], torch.Tensor] | None,
                         lr_at: Callable[[int], float] | None, batches: list[torch.Tensor] | None) -> int:
    """Step 4 of a private visit (``training/privacy.py``); the number of sequences drawn. Each row's loss comes
    from ``step_loss`` when given, as the ordinary path's batches do."""
    privacy = hyper.privacy
    assert privacy is not None
    device = model_device(model)
    if batches is None:  # secret: the coordinator knows hyper.seed (see training/privacy.py)
        batches = poisson_batches(len(sequences), privacy.sample_rate, hyper.steps, secret_generator("cpu"))

    def loss_of_rows(step: int, rows: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(model, *sequences.batch(rows, device)) if step_loss is None else step_loss(step, rows)

    def step_on(step: int, grads: list[torch.Tensor]) -> None:
        if lr_at is not None:
            optimizer.set_lr(lr_at(step))
        optimizer.step_on(grads)

    return private_steps(params, batches, sequences, privacy, loss_of_rows, step_on, what=what, on_step=on_step,
                         noise_generator=secret_generator(device))


def check_inputs(sequences: SequencesLike, hyper: VisitHyper) -> Sequences:
    """Refuse a visit whose data cannot match its hyper-parameters before anything is changed or allocated; the
    data as ``Sequences``."""
    data = as_sequences(sequences)  # checks the shape and dtype
    if len(data) == 0:
        raise ValueError("no training sequences")
    if data.seq_len != hyper.seq_len:
        raise ValueError(f"sequences have length {data.seq_len}, the visit asks for seq_len={hyper.seq_len}")
    if hyper.steps < 0 or hyper.batch_size <= 0 or hyper.eval_batches < 0:
        raise ValueError(f"invalid steps/batch_size/eval_batches in {hyper}")
    return data


def cpu_copies(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Independent CPU copies (same dtype, contiguous): a result that later training cannot change."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` in order without repeats (by identity): a tied weight listed twice must be stepped once."""
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out
