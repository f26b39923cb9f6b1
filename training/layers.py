"""The decoder layers of a causal LM: which of them a block holds, running the model from one of them upward, and
checkpointing them. The model-specific knowledge the block visit's memory/compute options need, in one place.

A block visit trains layers ``i..j`` with everything else frozen, so the hidden states entering
layer ``i`` are a fixed function of a row's tokens for the whole visit. When a row recurs (local
epochs) they can be kept instead of recomputed: ``LayerInputCapture`` records them (and the
per-layer keyword arguments the model hands its layers: rotary position embeddings, attention
mask, position ids) during an ordinary forward pass, and ``forward_from_layer`` replays layers
``i..`` + final norm + head + loss on them. The replay calls the model's own layer modules with
the arguments the model itself passed, so it only needs to know where the decoder layers, the
final norm and the head are, and that nothing else happens between them: that is the table below.

``checkpoint_layers`` wraps chosen decoder layers in activation checkpointing (their activations
are recomputed during backward instead of kept), for any architecture.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.lm_loss import loss_from_hidden, uses_chunked_loss
from fedcybgd.common.partition import find_decoder_layers

__all__ = ["DecoderStack", "decoder_stack", "LayerInputCapture", "forward_from_layer", "checkpoint_layers",
           "LayerCall", "decoder_layers", "block_layers", "layers_above"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, as the block partition finds them."""
    layers = model.get_submodule(find_decoder_layers(model)[0])
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: its decoder layers are not a ModuleList")
    return layers


def block_layers(model: nn.Module, spec: BlockSpec) -> tuple[int, ...] | None:
    """The indices of the decoder layers block ``spec`` consists of, ascending (consecutive in the contiguous
    layout, spread in the strided one), or None when it holds anything else (embed_head)."""
    layers_name, _ = find_decoder_layers(model)
    prefix = layers_name + "." if layers_name else ""
    indices = set()
    for name in spec.names:
        head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        if not head.isdigit():
            return None
        indices.add(int(head))
    return tuple(sorted(indices)) if indices else None


def layers_above(model: nn.Module, spec: BlockSpec) -> list[nn.Module]:
    """The decoder layers above block ``spec``'s highest layer: the gradient passes through them without training
    them (the frozen layers between a strided block's layers are not counted: they hold activations the block's
    lower layers need anyway)."""
    own = block_layers(model, spec)
    first = 0 if own is None else own[-1] + 1  # embed_head: its embeddings lie below every decoder layer
    return list(decoder_layers(model))[first:]


@dataclass(frozen=True)
class DecoderStack:
    """Where the parts of a decoder-only LM are: hidden = layers(...); logits = head(final_norm(hidden))."""

    layers: nn.ModuleList
    final_norm: nn.Module
    head: nn.Module


# model_type -> (decoder layers, final norm) as attribute paths from the *ForCausalLM model; the
# head is the model's output embeddings. Only architectures whose forward is exactly "embed (+
# positions), layers, final norm, head, loss" belong here (no logit soft-capping, no scaling
# between the parts).
_STACKS: dict[str, tuple[str, str]] = {
    **{t: ("model.layers", "model.norm") for t in ("llama", "mistral", "qwen2", "qwen3")},
    "gpt2": ("transformer.h", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "gpt_neox.final_layer_norm"),
}


def decoder_stack(model: nn.Module) -> DecoderStack | None:
    """The model's decoder stack, or None when replaying from a layer is not known to be exact for it."""
    paths = _STACKS.get(getattr(getattr(model, "config", None), "model_type", ""))
    get_head = getattr(model, "get_output_embeddings", None)
    if paths is None or get_head is None or get_head() is None:
        return None
    try:
        layers, norm = (model.get_submodule(p) for p in paths)
    except AttributeError:
        return None
    if not isinstance(layers, nn.ModuleList):
        return None
    if find_decoder_layers(model)[0] != paths[0]:  # the partition's decoder layers must be these
        return None
    return DecoderStack(layers, norm, get_head())


@dataclass
class LayerCall:
    """The arguments one decoder layer received besides the hidden states, to call it again the same way."""

    args: tuple  # positional arguments after the hidden states
    kwargs: dict


@dataclass
class LayerInputCapture:
    """Records, during the model's own forward passes, the hidden states entering layer ``start``
    (``hidden``, detached) and every layer's other arguments from ``start`` up (``calls``; the
    latest forward pass wins). Use as a context manager around ``model(...)``."""

    stack: DecoderStack
    start: int
    hidden: torch.Tensor | None = None
    calls: list[LayerCall] = field(default_factory=list)

    def __enter__(self) -> LayerInputCapture:
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(self.stack.layers[self.start:])
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()

    def _hook(self, offset: int) -> Callable[[nn.Module, tuple, dict], None]:
        """A forward pre-hook for layer ``start + offset``; the first layer's hook starts a new record."""

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
            rest = args[1:] if args and args[0] is hidden else args
            if offset == 0:
                self.hidden = hidden.detach()
                self.calls = []
            self.calls.append(LayerCall(tuple(rest), kwargs))

        return pre


def forward_from_layer(model: nn.Module, stack: DecoderStack, start: int, hidden: torch.Tensor,
                       calls: Sequence[LayerCall], labels: torch.Tensor) -> torch.Tensor:
    """Mean causal-LM loss of the model on ``labels`` when layer ``start`` receives ``hidden``:
    layers ``start..`` (called with the arguments ``calls`` recorded from a batch of the same
    shape), final norm, head and the model's own loss function."""
    if len(calls) != len(stack.layers) - start:
        raise ValueError(f"need the arguments of {len(stack.layers) - start} layers, got {len(calls)}")
    if not isinstance(model, PreTrainedModel):  # the loss function and vocabulary size are the model's
        raise TypeError(f"replaying layers needs a Hugging Face model, got {type(model).__name__}")
    for layer, call in zip(stack.layers[start:], calls, strict=True):
        out = layer(hidden, *call.args, **call.kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    if uses_chunked_loss(model):
        return loss_from_hidden(model, stack.final_norm(hidden), labels)
    logits = stack.head(stack.final_norm(hidden))
    return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)


@contextlib.contextmanager
def checkpoint_layers(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the context, each of ``layers`` keeps only its inputs for backward and recomputes its
    activations when the gradient passes through it (non-reentrant activation checkpointing).
    Works in eval mode too (unlike Hugging Face's own switch, which needs ``model.train()``)."""
    wrapped = []
    try:
        for layer in layers:
            forward = layer.forward

            def run(*args, _forward=forward, **kwargs):
                if not torch.is_grad_enabled():
                    return _forward(*args, **kwargs)
                # preserve_rng_state=False: no dropout to replay, and replaying would set the process-wide RNG
                # state under other threads (see common/lm_loss.py).
                return checkpoint(_forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

            layer.forward = run  # an instance attribute shadows the class's forward
            wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.forward
