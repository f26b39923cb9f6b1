"""Causal-LM loss evaluation, shared by the client (loss before/after a visit) and the coordinator (held-out
evaluation of the global model)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedcybgd.common.lm_loss import causal_lm_loss
from fedcybgd.common.sequences import Sequences, SequencesLike, as_sequences

__all__ = ["model_device", "causal_lm_loss", "mean_loss", "evaluate_loss"]


def model_device(model: nn.Module) -> torch.device:
    """The device the model's parameters live on (the model is expected to be on one device)."""
    return next(model.parameters()).device


@torch.no_grad()
def mean_loss(model: nn.Module, sequences: SequencesLike, row_batches: Iterable[torch.Tensor]) -> float:
    """Mean loss over the tokens carrying loss in the given batches of rows of ``sequences`` (each batch's mean
    weighted by its count of such tokens), without autograd, in eval mode (the model's train/eval mode is restored
    afterwards). ``nan`` when there are no such tokens."""
    data = as_sequences(sequences)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for rows in row_batches:
            n_tokens = data.loss_tokens(rows)  # predicted positions carrying loss in the batch
            if n_tokens <= 0:
                continue
            ids, labels = data.batch(rows, device)
            total += float(causal_lm_loss(model, ids, labels).float()) * n_tokens
            count += n_tokens
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def evaluate_loss(model: nn.Module, sequences: SequencesLike, batch_size: int) -> float:
    """Mean causal-LM loss over the tokens carrying loss in all ``sequences`` (``[n, seq_len]``), in order,
    ``batch_size`` rows at a time, without autograd, in eval mode."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(as_sequences(sequences))
    return mean_loss(model, sequences, (torch.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)))


def spread_sample(sequences: SequencesLike, k: int) -> Sequences:
    """``k`` rows evenly spaced over ``sequences`` (all of them when there are fewer), so a
    bounded evaluation still covers every held-out document."""
    data = as_sequences(sequences)
    k = min(k, len(data))
    return data[torch.linspace(0, len(data) - 1, k).round().long()]
