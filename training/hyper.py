"""What goes into a visit and what comes out of it, shared by the client (which trains) and the coordinator (whose
single-process references replay the same visits): the two must agree field by field for the references to be
bit-identical anchors of a federated run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["VisitHyper", "VisitResult", "OnStep"]

#: on_step(step index, training loss of the step), called after every optimizer step: progress, and the caller's
#: chance to abandon the visit (by raising)
OnStep = Callable[[int, float], None]


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
    """The outcome of one visit: the trained tensors and the figures the upload header reports."""

    tensors: dict[str, torch.Tensor]  # what was trained (block / every parameter / LoRA adapter): CPU, contiguous
    loss_before: float
    loss_after: float
    peak_memory_bytes: int  # CUDA: max allocated during the visit; CPU: process peak RSS during the visit
    seconds: float
    samples: int  # sequences seen = steps * batch_size
    tokens: int  # input tokens seen = samples * seq_len
