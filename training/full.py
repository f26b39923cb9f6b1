"""FedAvg-full's local training: every parameter of the model trained through the shared loop, the baseline whose
memory and traffic FedCyBGD's block visits are measured against."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedcybgd.common.blocks import block_params, block_tensors
from fedcybgd.common.partition import partition_model
from fedcybgd.common.sequences import SequencesLike
from fedcybgd.training.hyper import OnStep, VisitHyper, VisitResult
from fedcybgd.training.loop import cpu_copies, fit

__all__ = ["train_full"]


def train_full(
    model: nn.Module,
    sequences: SequencesLike,
    hyper: VisitHyper,
    *,
    on_step: OnStep | None = None,
    lr_at: Callable[[int], float] | None = None,
) -> VisitResult:
    """FedAvg-full's local training: every parameter of ``model`` trainable, otherwise a visit like
    ``train_block`` (fresh AdamW, fp32 masters for bf16/fp16 weights, same batches and loss measurement).

    ``tensors`` holds every parameter (tied weights once) keyed by the names the block partition uses, so
    ``block_values(spec, tensors)`` is block ``spec`` of any partition. ``lr_at(step)``, when
    given, sets the learning rate of each step (the centralized reference's schedule); else ``hyper.lr`` throughout.
    """
    specs = partition_model(model, max_block_params=0)  # whole parameters
    return fit(model, [p for spec in specs for p in block_params(model, spec)], sequences, hyper, what="model",
               on_step=on_step, lr_at=lr_at,
               collect=lambda: {n: t for spec in specs for n, t in cpu_copies(block_tensors(model, spec)).items()})
