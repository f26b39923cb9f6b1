"""One visit of Cycle Block Gradient Descent: train ONE block of the model on local data, all else frozen, through
the shared loop (``training/loop.py``), with the block visit's two memory/compute options."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from fedcybgd.common.blocks import BlockSpec, block_tensors
from fedcybgd.common.eval import causal_lm_loss, model_device
from fedcybgd.common.sequences import Sequences, SequencesLike
from fedcybgd.training.compact import frozen_layers_compacted
from fedcybgd.training.hyper import OnStep, VisitHyper, VisitResult
from fedcybgd.training.layers import (
    DecoderStack,
    LayerCall,
    LayerInputCapture,
    block_layers,
    checkpoint_layers,
    decoder_stack,
    forward_from_layer,
    layers_above,
)
from fedcybgd.training.loop import check_inputs, cpu_copies, fit, visit_rows
from fedcybgd.training.slices import block_trainables

__all__ = ["train_block"]


def train_block(
    model: nn.Module,
    spec: BlockSpec,
    sequences: SequencesLike,
    hyper: VisitHyper,
    *,
    on_step: OnStep | None = None,
    checkpoint_above: bool = False,
    cache_block_inputs: bool = False,
    compact_frozen: str | None = None,
    privacy_batches: list[torch.Tensor] | None = None,
) -> VisitResult:
    """Train the block ``spec`` of ``model`` (already on its device) on rows of ``sequences`` ``[n, seq_len]`` (ids,
    with labels where some tokens carry no loss).

    Only the block's parameters change. ``on_step(step_index, loss)`` is called after every optimizer step.
    Raises ``ValueError`` for inconsistent inputs and ``FloatingPointError`` when the training loss stops being
    finite (a diverged block must not be uploaded).

    Memory/compute options, off by default (the default path is the bit-exact anchor of the federated run); with
    them the result matches the default within float tolerance:

    * ``checkpoint_above``: the frozen decoder layers above the block (every decoder layer for ``embed_head``,
      whose embeddings sit below them) keep only their inputs for backward and recompute their activations when
      the gradient passes through them.
    * ``cache_block_inputs``: the hidden states entering the block are kept for rows that recur later in the
      visit (local epochs: ``steps * batch_size > n``) and dropped after their last use; a step whose rows are all
      kept runs from the block upward only (``training/layers.py``). Decoder-layer blocks of the architectures
      ``decoder_stack`` knows; elsewhere the option changes nothing. Ignored by a private visit
      (``hyper.privacy``), whose per-example steps recompute every row's forward pass from the embeddings: the
      option only saves work, so a client that sets it still takes private tasks.

    And one whose result is *not* within float tolerance, a lossy option (``docs/benchmarks.md`` measures it):

    * ``compact_frozen`` ("int8" | "nf4", needs torchao): the decoder layers outside the block hold their linear
      weights quantized for the visit (``training/compact.py``). The block itself trains in full precision, but
      its gradients pass through approximated layers; afterwards those layers hold *dequantized* weights, which
      the caller must replace by the exact ones before anything else uses the model.

    With ``hyper.privacy`` the visit is record-level DP-SGD (``training/privacy.py``); ``privacy_batches``, for
    tests and benchmarks only, replaces its secret Poisson batches (``fit``).
    """
    data = check_inputs(sequences, hyper)
    with contextlib.ExitStack() as stack:
        trainables = stack.enter_context(block_trainables(model, spec))  # rows of a matrix: trained apart
        step_loss: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        if trainables.head_rows is not None:
            head_rows, device = trainables.head_rows, model_device(model)

            def step_loss(step: int, rows: torch.Tensor) -> torch.Tensor:
                return causal_lm_loss(model, *data.batch(rows, device), head_rows=head_rows)
        elif cache_block_inputs and hyper.privacy is None:
            step_loss = _BlockInputCache.for_visit(model, spec, data, visit_rows(data, hyper)[1])
        if checkpoint_above:
            stack.enter_context(checkpoint_layers(layers_above(model, spec)))
        stack.enter_context(frozen_layers_compacted(model, spec, compact_frozen))  # None: nothing changes
        return fit(model, trainables.params, data, hyper, what=f"block {spec.name!r}",
                   on_step=on_step, step_loss=step_loss, privacy_batches=privacy_batches,
                   collect=lambda: cpu_copies(block_tensors(model, spec)))


class _BlockInputCache:
    """``step_loss`` for ``cache_block_inputs``: keeps the hidden states entering the block for the rows that
    recur later in the visit, and runs a step from the block upward when all its rows are kept."""

    def __init__(self, model: nn.Module, stack: DecoderStack, start: int, sequences: Sequences,
                 train_rows: list[torch.Tensor]) -> None:
        self.model, self.stack, self.start, self.sequences = model, stack, start, sequences
        uses: dict[int, list[int]] = {}
        for step, rows in enumerate(train_rows):
            for r in dict.fromkeys(rows.tolist()):
                uses.setdefault(r, []).append(step)
        self.last_use = {r: steps[-1] for r, steps in uses.items() if len(steps) > 1}  # recurring rows only
        self.hidden: dict[int, torch.Tensor] = {}
        self.calls: list[LayerCall] | None = None

    @classmethod
    def for_visit(cls, model: nn.Module, spec: BlockSpec, sequences: Sequences,
                  train_rows: list[torch.Tensor]) -> _BlockInputCache | None:
        """The cache for a visit of block ``spec``, or None where replaying from the block is not known to be exact
        (not a decoder-layer block, or an architecture ``decoder_stack`` does not know)."""
        stack, own = decoder_stack(model), block_layers(model, spec)
        if stack is None or own is None:
            return None
        return cls(model, stack, own[0], sequences, train_rows)

    def __call__(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        ids, labels = self.sequences.batch(rows, model_device(self.model))
        keys = rows.tolist()
        if self.calls is not None and all(r in self.hidden for r in keys):
            hidden = torch.stack([self.hidden[r] for r in keys])
            loss = forward_from_layer(self.model, self.stack, self.start, hidden, self.calls,
                                      ids if labels is None else labels)
        else:
            with LayerInputCapture(self.stack, self.start) as capture:
                loss = causal_lm_loss(self.model, ids, labels)
            self.calls = capture.calls
            captured = capture.hidden
            if captured is None:
                raise RuntimeError(f"the forward pass never reached decoder layer {self.start}")
            for i, r in enumerate(keys):
                if r in self.last_use and r not in self.hidden:
                    self.hidden[r] = captured[i].clone()
        for r in keys:  # a row may occur twice in one batch (when an epoch ends inside it)
            if self.last_use.get(r) == step:
                self.hidden.pop(r, None)
        return loss
