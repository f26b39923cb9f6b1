"""Causal-LM loss evaluation, shared by the client (loss before/after a visit) and the coordinator (held-out
evaluation of the global model)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedcybgd.common.lm_loss import causal_lm_loss

__all__ = ["model_device", "causal_lm_loss", "mean_loss", "evaluate_loss"]


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters live on (the model is expected to be on one device)."""
    return next(model.parameters()).device


@torch.no_grad()
def mean_loss(model: nn.Module, sequences: torch.Tensor, row_batches: Iterable[torch.Tensor]) -> float:
    """Token-weighted mean loss over the given batches of rows of ``sequences``, without autograd, in eval
    mode (the model's train/eval mode is restored afterwards). ``nan`` when there are no rows."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for rows in row_batches:
            ids = sequences[rows].to(device)
            n_tokens = ids.shape[0] * (ids.shape[1] - 1)  # predicted positions in the batch
            if n_tokens <= 0:
                continue
            total += float(causal_lm_loss(model, ids).float()) * n_tokens
            count += n_tokens
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def evaluate_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> float:
    """Mean token-level causal-LM loss over all ``sequences`` ``[n, seq_len]`` (token ids), in order,
    ``batch_size`` rows at a time, without autograd, in eval mode."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = sequences.shape[0]
    return mean_loss(model, sequences, (torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)))


def spread_sample(sequences: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` rows evenly spaced over ``sequences`` (all of them when there are fewer), so a
    bounded evaluation still covers every held-out document."""
    k = min(k, sequences.shape[0])
    return sequences[torch.linspace(0, sequences.shape[0] - 1, k).round().long()]
