"""Lossy compression of a visit's frozen context: the paper's download compression, measured.

A visit trains one block; every other block only provides the forward and backward pass around
it. A client that lacks the current version of such a frozen block may receive an approximation
of it instead, trading download bytes against the quality of the gradient it computes. The
trainable block itself always arrives exactly, through the lossless path.

Each method approximates a block relative to a *reference*: the newest exact version of the block
the client holds (usually the base weights), or nothing (zeros) when it holds none:

- ``int8`` / ``int4``: blockwise symmetric quantisation of the difference from the reference, in
  groups of ``group_size`` values with one fp32 scale each. A value the visit left unchanged has
  a zero difference and comes back exactly.
- ``prune``: magnitude pruning of that difference: the ``1 - ratio`` largest changes are sent as
  exact values at their positions, everything else keeps the reference's value.
- ``drop`` (layer dropping, as the authors' code does it) sends nothing at all: the client keeps
  the reference. It needs no encoding and is decided by the coordinator alone.

An approximation is a blob like any other: canonical safetensors bytes of the encoded tensors,
named by SHA-256, streamed with the chunk codec, cached on both sides. Small tensors (norms,
biases) travel exactly: they cost nothing and are the most sensitive to error.
"""
from __future__ import annotations

import math

import torch

from fedcybgd.common.blocks import TensorSpec, st_dtype_to_torch
from fedcybgd.common.errors import CodecError

#: Methods that send an encoded approximation (``drop`` sends nothing).
ENCODED_METHODS = ("int8", "int4", "prune")
METHODS = ("none", "drop", *ENCODED_METHODS)
#: Tensors with at most this many values are sent exactly.
EXACT_NUMEL = 4096
DEFAULT_GROUP_SIZE = 64
_QMAX = {"int8": 127, "int4": 7}


def encode(method: str, tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor] | None, *,
           ratio: float = 0.9, group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """The encoded tensors of one block's approximation (CPU, contiguous: ready for safetensors)."""
    if method not in ENCODED_METHODS:
        raise ValueError(f"no encoding for method {method!r}")
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() <= EXACT_NUMEL or not value.is_floating_point():
            out[f"{name}.exact"] = value
            continue
        ref = _reference(reference, name, value)
        diff = (value.float() - ref.float()).flatten()
        if method == "prune":
            keep = max(1, math.ceil((1.0 - ratio) * diff.numel())) if ratio < 1 else 0
            positions = (torch.topk(diff.abs(), keep, sorted=False).indices.sort().values if keep
                         else diff.new_zeros(0).long())
            gaps = torch.diff(positions, prepend=positions.new_zeros(1)) if keep else positions
            # Gaps, not positions: small integers that zstd codes in about a byte each.
            out[f"{name}.gaps"] = gaps.to(torch.int32).contiguous()
            out[f"{name}.values"] = value.flatten()[positions].contiguous()
        else:
            codes, scales = _quantize(diff, _QMAX[method], group_size)
            out[f"{name}.codes"] = _pack4(codes) if method == "int4" else codes
            out[f"{name}.scales"] = scales
    return out


def decode(method: str, encoded: dict[str, torch.Tensor], specs: tuple[TensorSpec, ...] | list[TensorSpec],
           reference: dict[str, torch.Tensor] | None, *,
           group_size: int = DEFAULT_GROUP_SIZE) -> dict[str, torch.Tensor]:
    """The approximated block, checked against its specs: a malformed encoding is refused
    (CodecError), never turned into tensors of the wrong shape or filled with garbage."""
    if method not in ENCODED_METHODS:
        raise CodecError(f"unknown context encoding {method!r}")
    if not 1 <= group_size <= 1 << 16:
        raise CodecError(f"quantisation group size {group_size} out of range")
    expected: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for spec in specs:
        dtype, shape = st_dtype_to_torch(spec.dtype), tuple(spec.shape)
        numel = math.prod(shape)
        if f"{spec.name}.exact" in encoded:
            expected.add(f"{spec.name}.exact")
            value = encoded[f"{spec.name}.exact"]
            _check(value, dtype, shape, spec.name)
            out[spec.name] = value.clone()
            continue
        ref = _reference(reference, spec.name, torch.empty(shape, dtype=dtype, device="meta"))
        if method == "prune":
            flat = ref.to(dtype).flatten().clone()  # a copy: the reference stays as it is
            expected |= {f"{spec.name}.gaps", f"{spec.name}.values"}
            gaps, values = _get(encoded, f"{spec.name}.gaps"), _get(encoded, f"{spec.name}.values")
            if gaps.dtype != torch.int32 or gaps.dim() != 1 or values.shape != gaps.shape or values.dtype != dtype:
                raise CodecError(f"{spec.name}: malformed pruned difference")
            if gaps.numel():
                if int(gaps[0]) < 0 or (gaps.numel() > 1 and int(gaps[1:].min()) < 1):
                    raise CodecError(f"{spec.name}: positions of a pruned difference must increase")
                positions = torch.cumsum(gaps.long(), 0)
                if int(positions[-1]) >= numel:
                    raise CodecError(f"{spec.name}: pruned difference points outside the tensor")
                flat[positions] = values
        else:
            expected |= {f"{spec.name}.codes", f"{spec.name}.scales"}
            groups = -(-numel // group_size)
            codes, scales = _get(encoded, f"{spec.name}.codes"), _get(encoded, f"{spec.name}.scales")
            packed = method == "int4"
            _check(codes, torch.uint8 if packed else torch.int8, ((groups * group_size + 1) // 2 if packed
                                                                   else groups * group_size,), spec.name)
            _check(scales, torch.float32, (groups,), spec.name)
            if not bool(torch.isfinite(scales).all()):
                raise CodecError(f"{spec.name}: non-finite quantisation scales")
            q = _unpack4(codes, groups * group_size) if packed else codes
            diff = (q.float().reshape(groups, group_size) * scales[:, None]).flatten()[:numel]
            flat = (ref.float().flatten() + diff).to(dtype)
        out[spec.name] = flat.reshape(shape)
    if set(encoded) != expected:
        raise CodecError(f"unexpected tensors in a context encoding: {sorted(set(encoded) - expected)[:5]}")
    return out


def _reference(reference: dict[str, torch.Tensor] | None, name: str, like: torch.Tensor) -> torch.Tensor:
    if reference is None:
        return torch.zeros(like.shape, dtype=like.dtype)
    ref = reference.get(name)
    if ref is None or tuple(ref.shape) != tuple(like.shape):
        raise CodecError(f"{name}: the reference block does not match")
    return ref.detach().to("cpu")


def _quantize(diff: torch.Tensor, qmax: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    groups = -(-diff.numel() // group_size)
    padded = torch.zeros(groups * group_size, dtype=torch.float32)
    padded[: diff.numel()] = diff
    padded = padded.reshape(groups, group_size)
    scales = padded.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(padded / safe[:, None]).clamp_(-qmax, qmax).to(torch.int8)
    return codes.flatten().contiguous(), scales.contiguous()


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte (code + 8, low nibble first)."""
    biased = (codes.to(torch.int16) + 8).to(torch.uint8)
    if biased.numel() % 2:
        biased = torch.cat([biased, biased.new_full((1,), 8)])
    return (biased[0::2] | (biased[1::2] << 4)).contiguous()


def _unpack4(packed: torch.Tensor, n: int) -> torch.Tensor:
    both = torch.stack([packed & 0x0F, packed >> 4], dim=1).flatten()[:n]
    return both.to(torch.int16) - 8


def _get(encoded: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in encoded:
        raise CodecError(f"context encoding lacks {key}")
    return encoded[key]


def _check(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], name: str) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise CodecError(f"{name}: encoded as {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
