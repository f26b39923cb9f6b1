"""What goes into a visit and what comes out of it, shared by the client (which trains) and the coordinator (whose
single-process references replay the same visits): the two must agree field by field for the references to be
bit-identical anchors of a federated run."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["VisitHyper", "VisitResult", "OnStep", "RecordPrivacy", "UpdatePrivacy"]

#: on_step(step index, training loss of the step), called after every optimizer step: progress, and the caller's
#: chance to abandon the visit (by raising)
OnStep = Callable[[int, float], None]


@dataclass(frozen=True)
class RecordPrivacy:
    """Record-level DP-SGD within a visit (Abadi et al. 2016; ``training/privacy.py``): per-example gradients of the
    trained parameters clipped, summed, noised, divided by the expected batch size."""

    noise_multiplier: float  # sigma: noise std is sigma * clip_norm on the sum of clipped per-example grads
    clip_norm: float  # C: each example's gradient (over ALL trained params together) clipped to L2 norm <= C
    sample_rate: float  # q in (0, 1]: Poisson sampling, each sequence joins each step's batch with prob. q

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")


@dataclass(frozen=True)
class UpdatePrivacy:
    """Client-level protection of an upload (``training/privacy.py``, ``privatize_update``): the visit's update
    clipped to L2 norm ``clip_norm`` (S), plus Gaussian noise of std ``noise_multiplier * clip_norm``."""

    noise_multiplier: float
    clip_norm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be finite and > 0, got {self.clip_norm}")


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
    #: record-level DP-SGD (None: the ordinary visit). Under it the batches are Poisson samples of rate
    #: ``privacy.sample_rate`` from a secret generator (``batch_size`` still sizes the evaluation batches), and
    #: ``max_grad_norm`` does not apply (per-example clipping replaces it)
    privacy: RecordPrivacy | None = None


@dataclass
class VisitResult:
    """The outcome of one visit: the trained tensors and the figures the upload header reports."""

    tensors: dict[str, torch.Tensor]  # what was trained (block / every parameter / LoRA adapter): CPU, contiguous
    loss_before: float
    loss_after: float
    peak_memory_bytes: int  # CUDA: max allocated during the visit; CPU: process peak RSS during the visit
    seconds: float
    samples: int  # sequences seen = steps * batch_size (private visits: the sequences drawn, sum of batch sizes)
    tokens: int  # input tokens seen = samples * seq_len
