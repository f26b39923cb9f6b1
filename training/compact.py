"""Frozen decoder layers held compactly (weight-only quantization) while one block trains.

In a FedCyBGD visit one block is trained and everything else is frozen, yet the frozen layers above the block must
stay in the graph: the loss reaches the block only by backpropagating through them (gradients w.r.t. their inputs,
never their weights). On a memory-poor client those frozen linear weights dominate what must be resident, so they
may be held quantized instead, 8 or 4 bits per weight, while the trained block stays in full precision:

- ``"int8"``: torchao ``Int8Tensor`` (what ``Int8WeightOnlyConfig`` makes): symmetric per-row int8, one fp32 scale
  and one int8 zero point per output row. Its ``F.linear`` is ``x @ qdata.T.to(x.dtype) * scale`` in plain autograd,
  which saves that full-precision copy of the weight for backward: every frozen layer would be resident twice at the
  peak. So a compact int8 linear runs ``_FrozenInt8Linear`` instead (an instance ``forward``), which calls torchao's
  linear without recording and saves only the int8 weight, dequantizing it again in backward, as ``LinearNF4`` does.
- ``"nf4"``: torchao ``NF4Tensor`` (QLoRA's NormalFloat4, what ``to_nf4`` / ``NF4WeightOnlyConfig`` make): two 4-bit
  codes per byte, an int8 scaler per 64 weights, double-quantized. Its ``F.linear`` runs ``LinearNF4``, whose
  backward returns ``grad @ W`` for the input and nothing for the weight. A weight whose size is not a multiple of
  64 elements cannot be NF4-blocked and is held as int8 instead.

Both run forward and backward on CPU in fp32 and bf16 (dequantize-on-the-fly matmuls, no custom kernels). The
tensor-level constructors are called directly rather than ``quantize_``: that keeps torchao from changing the global
inductor config and from patching ``extra_repr``, and lets the NF4 scaler block fit small (test-sized) weights.
torchao is an optional dependency, imported only when a method is used:
``pip install "fedcybgd[compact]"`` (torchao==0.18.0).

``restore_layers`` puts plain parameters (the dequantized values) back under the same names, so a caller can copy
the exact weights into them before the layers are trained or shipped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import types
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.training.layers import block_layers, decoder_layers

__all__ = ["COMPACT_METHODS", "CompactFormat", "COMPACT_FORMATS", "compact_bytes_per_param", "compact_linear_bytes",
           "compact_layers", "restore_layers", "frozen_layers_compacted", "is_compact", "tensor_bytes", "module_bytes"]

COMPACT_METHODS: tuple[str, ...] = ("int8", "nf4")
NF4_BLOCK = 64  # weights per NF4 absmax block (one int8 scaler each)
NF4_SCALER_BLOCK = 256  # NF4 scalers per second-level block (one scale of the weight's dtype each), at most
_INSTALL_HINT = "weight-only quantization needs torchao: pip install 'fedcybgd[compact]' (torchao==0.18.0)"


@dataclass(frozen=True)
class CompactFormat:
    """Bytes a weight-only format holds: per element, per output row (scales), per NF4 block (scalers)."""

    method: str
    bytes_per_element: float  # the quantized codes: 1 (int8) or 0.5 (two 4-bit codes per byte)
    bytes_per_row: int  # int8: fp32 scale + int8 zero point per output row
    bytes_per_block: int  # nf4: one int8 scaler per NF4_BLOCK weights (plus a dtype scale per 256 scalers)


COMPACT_FORMATS: dict[str, CompactFormat] = {
    "int8": CompactFormat("int8", bytes_per_element=1.0, bytes_per_row=5, bytes_per_block=0),
    "nf4": CompactFormat("nf4", bytes_per_element=0.5, bytes_per_row=0, bytes_per_block=1),
}


def _check_method(method: str) -> CompactFormat:
    if method not in COMPACT_FORMATS:
        raise ValueError(f"unknown compact method {method!r}; choose one of {COMPACT_METHODS}")
    return COMPACT_FORMATS[method]


def compact_bytes_per_param(method: str, dtype: torch.dtype = torch.bfloat16, in_features: int = 4096) -> float:
    """Average bytes per weight, scales included, of a large linear with ``in_features`` inputs (for planning)."""
    fmt = _check_method(method)
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_block = (fmt.bytes_per_block + itemsize / NF4_SCALER_BLOCK) / NF4_BLOCK if fmt.bytes_per_block else 0.0
    return fmt.bytes_per_element + fmt.bytes_per_row / in_features + per_block


def _nf4_fits(numel: int) -> bool:
    return numel > 0 and numel % NF4_BLOCK == 0


def compact_linear_bytes(out_features: int, in_features: int, method: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Exact storage bytes ``compact_layers`` holds for one ``out_features x in_features`` weight (bias excluded)."""
    _check_method(method)
    numel = out_features * in_features
    if method == "int8" or not _nf4_fits(numel):
        return numel + COMPACT_FORMATS["int8"].bytes_per_row * out_features
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_blocks = numel // NF4_BLOCK
    n_scaler_blocks = n_blocks // math.gcd(n_blocks, NF4_SCALER_BLOCK)
    # codes + int8 scalers + per-scaler-block factors + scaler mean + the 16-entry NF4 lookup table
    return numel // 2 + n_blocks + (n_scaler_blocks + 1 + 16) * itemsize


@functools.cache
def _torchao() -> Any:
    """Import torchao quietly (its CUDA-only extensions log load failures on a CPU-only install)."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    finally:
        log.setLevel(level)
    return tq


def _is_compact_tensor(tensor: torch.Tensor) -> bool:
    if not hasattr(tensor, "__tensor_flatten__"):  # torchao's formats are wrapper subclasses; plain tensors are not
        return False
    try:
        tq = _torchao()
    except ImportError:
        return False
    return isinstance(tensor, tq.Int8Tensor | tq.NF4Tensor)


def is_compact(module: nn.Module) -> bool:
    """Whether ``module`` holds (directly or in a submodule) a linear weight quantized by ``compact_layers``."""
    return any(_is_compact_tensor(sub.weight) for sub in module.modules() if isinstance(sub, nn.Linear))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor; for a quantized weight, the sum over its inner tensors (codes, scales, ...)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.untyped_storage().nbytes()


def module_bytes(modules: Iterable[nn.Module]) -> int:
    """Storage bytes of every parameter and buffer of ``modules``, each tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor_bytes(tensor)
    return total


def _linears(modules: Iterable[nn.Module]) -> Iterator[nn.Linear]:
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Linear) and id(sub) not in seen:
                seen.add(id(sub))
                yield sub


@torch.no_grad()
def _quantize(weight: torch.Tensor, method: str) -> torch.Tensor:
    tq = _torchao()
    weight = weight.detach().contiguous()
    if method == "nf4" and _nf4_fits(weight.numel()):
        n_blocks = weight.numel() // NF4_BLOCK
        return tq.to_nf4(weight, NF4_BLOCK, math.gcd(n_blocks, NF4_SCALER_BLOCK))
    from torchao.quantization.granularity import PerRow  # type: ignore[import-untyped, import-not-found, unused-ignore]

    return tq.Int8Tensor.from_hp(weight, granularity=PerRow())


class _FrozenInt8Linear(torch.autograd.Function):
    """``F.linear`` with a frozen ``Int8Tensor`` weight that keeps only the int8 weight for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, weight, bias)  # torchao's int8 weight-only matmul; grad mode is off in here

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        (weight,) = ctx.saved_tensors
        grad_x = grad @ weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def _int8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if isinstance(self.weight, _torchao().Int8Tensor):
        return _FrozenInt8Linear.apply(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def _set_int8_forward(linear: nn.Linear, on: bool) -> None:
    ours = getattr(linear.__dict__.get("forward"), "__func__", None) is _int8_forward
    if on and "forward" not in linear.__dict__:  # leave a forward someone else installed (accelerate hooks) alone
        linear.forward = types.MethodType(_int8_forward, linear)  # type: ignore[method-assign]
    elif not on and ours:
        del linear.forward


def compact_layers(modules: Iterable[nn.Module], method: str) -> int:
    """Quantize, in place, the weight of every ``nn.Linear`` inside ``modules``; returns the bytes saved.

    The weights become frozen (``requires_grad`` False) and the full-precision tensors are released (freed unless
    the caller still holds a reference). Biases, norms and embeddings are left as they are; a weight that is already
    compact is skipped, and a weight shared by several linears stays shared. Gradients still flow through the
    compacted linears to their inputs.
    """
    _check_method(method)
    done: dict[int, nn.Parameter] = {}
    saved = 0
    for linear in _linears(modules):
        weight = linear.weight
        if _is_compact_tensor(weight):
            continue
        if id(weight) not in done:
            done[id(weight)] = nn.Parameter(_quantize(weight, method), requires_grad=False)
            saved += weight.numel() * weight.element_size() - tensor_bytes(done[id(weight)])
        linear.weight = done[id(weight)]
        _set_int8_forward(linear, isinstance(linear.weight, _torchao().Int8Tensor))
    return saved


@torch.no_grad()
def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tq = _torchao()
    plain = weight.get_original_weight() if isinstance(weight, tq.NF4Tensor) else weight.dequantize()
    return plain.to(dtype).contiguous()


def restore_layers(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Replace every compact linear weight inside ``modules`` by a plain frozen ``dtype`` parameter, same name and
    shape, holding the dequantized values (copy exact weights into it with ``param.copy_``)."""
    done: dict[int, nn.Parameter] = {}
    for linear in _linears(modules):
        weight = linear.weight
        if not _is_compact_tensor(weight):
            continue
        if id(weight) not in done:
            done[id(weight)] = nn.Parameter(_dequantize(weight, dtype), requires_grad=False)
        linear.weight = done[id(weight)]
        _set_int8_forward(linear, False)


@contextlib.contextmanager
def frozen_layers_compacted(model: nn.Module, spec: BlockSpec, method: str | None, *,
                            keep_originals: bool = False) -> Iterator[list[int]]:
    """Within the context, the decoder layers outside block ``spec`` hold their linear weights quantized
    (``method``: "int8" | "nf4"; None: nothing changes), so that a visit of the block holds the frozen layers in
    about a half (int8) or a quarter (nf4) of their bf16 bytes; gradients still flow through them to the block.
    Yields the indices of the compacted decoder layers.

    On exit the layers get plain parameters back. With ``keep_originals`` (planning on the meta device, tests) they
    are the very tensors they held before; without it (a real visit, where keeping them would defeat the purpose)
    the full-precision weights are released on entry and come back *dequantized*: approximate, so the caller must
    reload the exact frozen weights before they serve anything but this visit (the client reloads those blocks from
    its blob cache at the next manifest)."""
    if method is None:
        yield []
        return
    _check_method(method)
    own = block_layers(model, spec)
    layers = decoder_layers(model)
    indices = [i for i in range(len(layers)) if own is None or i not in own]
    frozen = [layers[i] for i in indices]
    linears = list(_linears(frozen))
    dtype = linears[0].weight.dtype if linears else torch.float32
    originals = [(m, m.weight) for m in linears] if keep_originals else []
    del linears
    try:
        compact_layers(frozen, method)
        yield indices
    finally:
        if keep_originals:
            for module, weight in originals:
                module.weight = weight
                _set_int8_forward(module, False)
        else:
            restore_layers(frozen, dtype)
