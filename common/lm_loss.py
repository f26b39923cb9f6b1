"""The causal-LM loss without full-vocabulary logits for the whole batch.

A Hugging Face causal LM computes ``logits = head(hidden)`` for every token of the batch over the whole
vocabulary, upcasts them to fp32 and takes the cross-entropy: for 4 x 2048 tokens and a 128,256-token vocabulary
that is 4 GB of fp32 logits, and as much again for their gradient, more than a decoder layer's whole visit needs.
Here the decoder runs as usual up to its final hidden states, and the head and loss run over chunks of tokens:
each chunk's logits exist only while that chunk is computed, and in a backward pass they are recomputed chunk by
chunk (activation checkpointing per chunk), so at most one chunk's logits and their gradient are alive at a time.

The same function serves the training step (gradient through the head to the hidden states and, when it is
trained, the head itself), the evaluation of a loss (no autograd), and a block that trains a range of the head's
rows (``head_rows``: those rows come from a separate trainable tensor, the rest from the frozen head).

Exactness: the chunked loss is the model's loss up to float summation order (per-token losses summed per chunk,
then over chunks). It is the one loss every party uses (clients, references, evaluation), so federated runs and
their references stay bit-identical; against the model's own ``forward(labels=...)`` it agrees within float
tolerance (fp32: ~1e-6 relative; bf16 weights: the loss is computed in fp32 from the same bf16 logits).

Models whose logits are not ``head(hidden)`` with a known post-processing (soft-capping, scaling) are detected by
a one-off check against the model's own loss on a few tokens and use the model's own forward instead.
"""
from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["HeadRows", "causal_lm_loss", "loss_from_hidden", "LOSS_CHUNK_ELEMENTS", "IGNORE_INDEX",
           "chunk_tokens", "uses_chunked_loss"]

log = logging.getLogger("fedcybgd.loss")

#: Logit elements per chunk (32 MiB of fp32 logits): chunks are large enough for efficient matrix products and small
#: enough that a chunk's logits are negligible next to a layer's activations.
LOSS_CHUNK_ELEMENTS = 2**23
#: Label of a position that does not count in the loss (the Hugging Face convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class HeadRows:
    """Rows ``start:stop`` of the LM head's weight are trained: their values come from ``rows`` (a trainable tensor
    of shape ``[stop - start, hidden]``), the other rows from the frozen head."""

    start: int
    stop: int
    rows: torch.Tensor


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab_size`` entries."""
    return max(1, LOSS_CHUNK_ELEMENTS // max(1, vocab_size))


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                   head_rows: HeadRows | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids`` ``[batch, seq_len]``: position ``t`` predicts
    ``labels[:, t + 1]`` (``labels`` default to the inputs; positions labelled ``IGNORE_INDEX`` do not count)."""
    labels = input_ids if labels is None else labels
    if not uses_chunked_loss(model):
        if head_rows is not None:
            raise ValueError(f"{type(model).__name__}: its logits are not a plain head of its hidden states, so a "
                             "range of the head's rows cannot be trained (partition with max_block_params=0)")
        return model(input_ids=input_ids, labels=labels, use_cache=False).loss
    return loss_from_hidden(model, _final_hidden(model, input_ids), labels, head_rows=head_rows)


def loss_from_hidden(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *,
                     head_rows: HeadRows | None = None) -> torch.Tensor:
    """The loss of the final hidden states ``hidden`` ``[batch, seq_len, hidden]`` (after the final norm), computed
    chunk by chunk through the model's head."""
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no linear LM head; its loss cannot be computed in chunks")
    weight, bias = head.weight, head.bias
    post = _post_processing(model)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    count = int((y != IGNORE_INDEX).sum())
    step = chunk_tokens(weight.shape[0])
    rows = (head_rows.start, head_rows.stop, head_rows.rows) if head_rows is not None else None
    needs_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad or
                                             (rows is not None and rows[2].requires_grad))
    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], step):
        args = (h[s:s + step], y[s:s + step], weight, bias, rows, post)
        # No RNG to replay (no dropout in a visit); preserving it would set torch's process-wide generator state
        # during the recomputation, under any other thread drawing from it (the coordinator's memory planner).
        part = (checkpoint(_chunk_loss_sum, *args, use_reentrant=False, preserve_rng_state=False) if needs_grad
                else _chunk_loss_sum(*args))
        total = total + part
    return total / max(count, 1)


def _chunk_loss_sum(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    rows: tuple[int, int, torch.Tensor] | None,
                    post: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Summed cross-entropy of one chunk of tokens (fp32 logits, as the Hugging Face loss computes them)."""
    if rows is None:
        logits = F.linear(h, weight, bias)
    else:
        start, stop, trained = rows
        logits = torch.cat([F.linear(h, weight[:start]), F.linear(h, trained), F.linear(h, weight[stop:])], dim=-1)
        if bias is not None:
            logits = logits + bias
    logits = logits.float()
    if post is not None:
        logits = post(logits)
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def _final_hidden(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    base = cast(nn.Module, model.base_model)
    out = base(input_ids=input_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _post_processing(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model does to its head's logits before the loss, from its config (Gemma 2/3: soft-capping; Cohere:
    a scale; Granite: a divisor)."""
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    config = get_text() if callable(get_text) else config
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divisor = getattr(config, "logits_scaling", None)
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if isinstance(scale, (int, float)) and scale != 1:
        steps.append(lambda x: x * scale)
    if isinstance(divisor, (int, float)) and divisor != 1:
        steps.append(lambda x: x / divisor)
    if isinstance(cap, (int, float)) and cap > 0:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for fn in steps:
            x = fn(x)
        return x

    return apply


_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def output_head(model: nn.Module) -> nn.Linear | None:
    """``model``'s LM head (Hugging Face ``get_output_embeddings``) when it is a plain linear layer, else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Linear) else None


def uses_chunked_loss(model: nn.Module) -> bool:
    """Whether ``model``'s loss is computed in chunks: it must have a linear head and a base model giving the final
    hidden states, and a one-off check on a few tokens must find the chunked loss equal to the model's own (within
    float tolerance). Meta-device models (memory planning) are taken as they come."""
    known = _CHECKED.get(model)
    if known is not None:
        return known
    head = output_head(model)
    base = getattr(model, "base_model", model)
    ok = head is not None and base is not model
    if head is not None and ok and head.weight.device.type != "meta":
        ok = _agrees_with_model(model, head)
    _CHECKED[model] = ok
    return ok


def _agrees_with_model(model: nn.Module, head: nn.Linear) -> bool:
    ids = (torch.arange(8, device=head.weight.device) * 7919 % head.weight.shape[0]).unsqueeze(0)
    with torch.no_grad():
        try:
            own = float(model(input_ids=ids, labels=ids, use_cache=False).loss.float())
            ours = float(loss_from_hidden(model, _final_hidden(model, ids), ids))
        except Exception as exc:  # an architecture whose base model wants other inputs
            log.info("chunked loss unavailable for %s (%s): using the model's own loss", type(model).__name__, exc)
            return False
    agree = abs(own - ours) <= 1e-3 * max(1.0, abs(own))
    if not agree:
        log.warning("chunked loss differs from %s's own (%.6f vs %.6f): using the model's own loss",
                    type(model).__name__, ours, own)
    return agree
