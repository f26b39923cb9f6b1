"""Training a range of rows of a matrix (a block of a large vocabulary's embedding or LM head) without optimizer
state, gradient or master copy for the rest of the matrix.

A block may hold rows ``start:stop`` of the input embedding or of the LM head (``TensorSpec.rows``). The rows
become a tensor of their own, ``rows``, that *shares storage* with the parameter (a view of its rows wrapped as a
trainable leaf), while the parameter itself stays frozen. The forward pass takes those rows from ``rows``, so the
gradient reaches ``rows`` only: the input embedding through a forward hook that looks up tokens of the range in
``rows``, the head through the chunked loss (``common/lm_loss.py``, ``HeadRows``), both when they are tied. The
optimizer (fp32 master, gradient, two Adam moments) is built over ``rows``, and its update writes back through the
shared storage, so the model holds the trained rows at every step. No full-size gradient is ever materialised.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedcybgd.common.blocks import BlockSpec, block_params
from fedcybgd.common.lm_loss import HeadRows, output_head

__all__ = ["BlockTrainables", "block_trainables"]


@dataclass(frozen=True)
class BlockTrainables:
    """What a visit of a block trains: ``params`` (whole parameters, and row ranges as tensors of their own) and,
    when the block holds rows of the LM head, where the loss must take them from."""

    params: list[nn.Parameter]
    head_rows: HeadRows | None = None


@contextlib.contextmanager
def block_trainables(model: nn.Module, spec: BlockSpec) -> Iterator[BlockTrainables]:
    """The trainable tensors of block ``spec`` for the duration of the context (row ranges wired into the forward
    pass; the model is left as it was on exit). Raises ValueError for a row range of a parameter that is neither the
    input embedding nor the LM head."""
    whole = block_params(model, spec)
    if not spec.sliced:
        yield BlockTrainables(whole)
        return
    head = output_head(model)
    params: list[nn.Parameter] = []
    head_rows: HeadRows | None = None
    hooks = []
    try:
        for t, p in zip(spec.tensors, whole, strict=True):
            if t.rows is None:
                params.append(p)
                continue
            start, stop = t.rows
            rows = nn.Parameter(p.detach()[start:stop], requires_grad=True)  # shares storage with ``p``
            # Every module using the parameter (a tied embedding is also the head) takes the rows from ``rows``.
            for module in users_of(model, p):
                if isinstance(module, nn.Embedding):
                    hooks.append(_route_embedding_rows(module, start, stop, rows))
                else:
                    hooks.append(_route_linear_rows(module, start, stop, rows))
            if head is not None and getattr(head, "weight", None) is p:
                head_rows = HeadRows(start, stop, rows)  # the chunked loss uses the head's weight directly
            params.append(rows)
        yield BlockTrainables(params, head_rows)
    finally:
        for h in hooks:
            h.remove()


def users_of(model: nn.Module, param: torch.Tensor) -> list[nn.Module]:
    """The modules whose ``weight`` is ``param``; ValueError unless they are all embeddings or linear layers (whose
    rows can be trained apart), or there are none."""
    users = [m for m in model.modules() if getattr(m, "weight", None) is param]
    if not users or not all(isinstance(m, (nn.Embedding, nn.Linear)) for m in users):
        kinds = ", ".join(sorted({type(m).__name__ for m in users})) or "no module"
        raise ValueError(f"rows of a parameter used by {kinds} cannot be trained apart: only embeddings and linear "
                         "layers (partition this model with a larger max_block_params)")
    return users


def _route_linear_rows(linear: nn.Module, start: int, stop: int,
                       rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on a linear layer that computes its outputs ``start:stop`` from ``rows`` (same values, the
    gradient flows to ``rows``)."""
    bias = getattr(linear, "bias", None)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        x = args[0] if args else next(iter(kwargs.values()))
        part = F.linear(x, rows, bias[start:stop] if bias is not None else None)
        return torch.cat([output[..., :start], part.to(output.dtype), output[..., stop:]], dim=-1)

    return linear.register_forward_hook(hook, with_kwargs=True)


def _route_embedding_rows(embedding: nn.Embedding, start: int, stop: int,
                          rows: torch.Tensor) -> torch.utils.hooks.RemovableHandle:
    """A forward hook on ``embedding`` that takes the vectors of tokens ``start:stop`` from ``rows``: the same
    values as the frozen lookup (the storage is shared), but the gradient flows to ``rows``."""
    if embedding.max_norm is not None:
        raise ValueError("an embedding with max_norm renormalises its rows in place: its rows cannot be trained apart")
    scale = getattr(embedding, "embed_scale", None)  # embeddings that scale their output (Gemma 3)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        ids = args[0] if args else next(iter(kwargs.values()))
        inside = (ids >= start) & (ids < stop)
        looked_up = F.embedding((ids - start).clamp(0, stop - start - 1), rows)
        if isinstance(scale, torch.Tensor):
            looked_up = looked_up * scale.to(looked_up.dtype)
        elif isinstance(scale, (int, float)):
            looked_up = looked_up * scale
        return torch.where(inside.unsqueeze(-1), looked_up.to(output.dtype), output)

    return embedding.register_forward_hook(hook, with_kwargs=True)
