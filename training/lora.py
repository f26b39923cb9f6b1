"""LoRA, in one place: FedAvg-LoRA's local training (``train_lora``), the adapter a run starts from
(``initial_lora_adapter``), its configuration (``LoraConfig``) and folding an adapter into the model's weights
(``merge_adapter``). Client, coordinator and export must agree on the adapter's names, shapes and scaling for an
averaged adapter to mean what each client trained.

The adapter is peft's, attached for the visit and removed unmerged afterwards; its tensors are named after the
adapted module (``<module>.lora_A.weight`` / ``<module>.lora_B.weight``), nothing of peft's wrapping.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedcybgd.common.partition import find_decoder_layers
from fedcybgd.common.sequences import SequencesLike
from fedcybgd.training.hyper import OnStep, VisitHyper, VisitResult
from fedcybgd.training.layers import decoder_layers
from fedcybgd.training.loop import cpu_copies, fit

__all__ = ["LoraConfig", "train_lora", "initial_lora_adapter", "merge_adapter"]


@dataclass(frozen=True)
class LoraConfig:
    """The adapter of ``fedlora``: rank, scaling alpha / rank, and the wrapped modules (empty: every linear
    projection inside the decoder layers, ``train_lora``'s ``target_modules=None``)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024 or not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError("lora rank must be in [1, 1024] and alpha > 0")


def train_lora(
    model: nn.Module,
    sequences: SequencesLike,
    hyper: VisitHyper,
    *,
    rank: int = 8,
    alpha: float = 16,
    target_modules: str | Sequence[str] | None = None,
    adapter: Mapping[str, torch.Tensor] | None = None,
    init_seed: int = 0,
    on_step: OnStep | None = None,
) -> VisitResult:
    """FedAvg-LoRA's local training: a LoRA adapter (peft; rank ``rank``, scaling ``alpha / rank``, no dropout)
    on ``target_modules`` (default: every linear projection inside the decoder layers), trained alone with AdamW
    like a visit, in fp32 whatever the model's dtype.

    The adapter starts from ``adapter`` (the global adapter, as returned by this function or
    ``initial_lora_adapter``) when given, else from peft's initialisation (B = 0, A drawn from ``init_seed``, so
    every client without an adapter starts from the same one). ``tensors`` is the trained adapter: fp32 CPU
    tensors named ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` after the adapted module's name in
    ``model`` (e.g. ``model.layers.0.self_attn.q_proj.lora_A.weight``), nothing of peft's wrapping or adapter
    names. The model is left exactly as it was: the adapter is removed without merging.
    """
    with _lora_attached(model, rank, alpha, target_modules, init_seed) as weights:
        if adapter is not None:
            _load_adapter(weights, adapter)
        return fit(model, list(weights.values()), sequences, hyper, what="LoRA adapter", on_step=on_step,
                   collect=lambda: cpu_copies(weights))


def initial_lora_adapter(model: nn.Module, *, rank: int = 8, alpha: float = 16,
                         target_modules: str | Sequence[str] | None = None,
                         init_seed: int = 0) -> dict[str, torch.Tensor]:
    """The adapter ``train_lora`` starts from without ``adapter=`` (same names, shapes and values): what a
    coordinator averages into in its first round. The model is left unchanged."""
    with _lora_attached(model, rank, alpha, target_modules, init_seed) as weights:
        return cpu_copies(weights)


def merge_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], lora: LoraConfig) -> None:
    """Fold a LoRA adapter into the model's weights in place: W += (alpha / rank) B A."""
    scale = lora.alpha / lora.rank
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in adapter})
    with torch.no_grad():
        for module_name in modules:
            module = model.get_submodule(module_name)
            a, b = adapter[f"{module_name}.lora_A.weight"].float(), adapter[f"{module_name}.lora_B.weight"].float()
            delta = scale * (b @ a)  # [out, in]
            weight = module.weight
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"{module_name}: no weight tensor to merge the adapter into")
            if tuple(weight.shape) != tuple(delta.shape):  # GPT-2's Conv1D keeps weights as [in, out]
                delta = delta.T
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def _default_lora_targets(model: nn.Module) -> tuple[str, bool]:
    """A peft target regex for every linear projection inside the decoder layers, and whether they are GPT-2
    style ``Conv1D`` (transposed weights)."""
    from transformers.pytorch_utils import Conv1D

    layers_name, _ = find_decoder_layers(model)
    leaves, conv1d = set(), False
    for name, module in decoder_layers(model).named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            leaves.add(name.rsplit(".", 1)[-1])
            conv1d |= isinstance(module, Conv1D)
    if not leaves:
        raise ValueError(f"{type(model).__name__} has no linear projections in its decoder layers")
    alternatives = "|".join(re.escape(leaf) for leaf in sorted(leaves))
    return rf"{re.escape(layers_name)}\.\d+\.(?:.*\.)?(?:{alternatives})", conv1d


@contextlib.contextmanager
def _lora_attached(model: nn.Module, rank: int, alpha: float, target_modules: str | Sequence[str] | None,
                   init_seed: int) -> Iterator[dict[str, nn.Parameter]]:
    """Inject a LoRA adapter into ``model`` (in place), yield its weights by stable name, remove it unmerged."""
    import peft

    conv1d = False
    if target_modules is None:
        target_modules, conv1d = _default_lora_targets(model)
    # peft annotates lora_alpha as int; it is used as a float scale (alpha / rank), as here.
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules)  # type: ignore[arg-type]
                             if not isinstance(target_modules, str) else target_modules, lora_dropout=0.0,
                             bias="none", fan_in_fan_out=conv1d)
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers 5 a deprecated question
        torch.manual_seed(init_seed)  # lora_A's initialisation
        wrapped = peft.get_peft_model(model, config)
    try:
        weights: dict[str, nn.Parameter] = {}
        for name, module in model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for part in ("lora_A", "lora_B"):
                    weights[f"{name}.{part}.weight"] = getattr(module, part)["default"].weight
        if not weights:
            raise ValueError(f"LoRA target_modules {target_modules!r} match no module of {type(model).__name__}")
        yield weights
    finally:
        wrapped.unload()


def _load_adapter(weights: dict[str, nn.Parameter], adapter: Mapping[str, torch.Tensor]) -> None:
    """Start from the global adapter; refused whole (nothing copied) when it does not fit this configuration."""
    if set(adapter) != set(weights):
        missing, extra = sorted(set(weights) - set(adapter)), sorted(set(adapter) - set(weights))
        raise ValueError(f"adapter names do not match this LoRA configuration: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    for name, p in weights.items():
        t = adapter[name]
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape) or not t.is_floating_point():
            raise ValueError(f"adapter tensor {name!r} must be a float tensor of shape {tuple(p.shape)}")
    with torch.no_grad():
        for name, p in weights.items():
            p.copy_(adapter[name])
