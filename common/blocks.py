"""Blocks of a causal LM for block-cyclic gradient descent: what a block is (``BlockSpec``: tensors, or row ranges of
a tensor, by name, shape and safetensors dtype) and reading and loading a block's values. Which blocks a model has
is ``common/partition.py``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "TensorSpec",
    "BlockSpec",
    "EMBED_HEAD",
    "torch_dtype_to_st",
    "st_dtype_to_torch",
    "block_tensors",
    "load_block",
    "block_params",
    "block_values",
]

#: Name of the final block holding every parameter outside the decoder layers.
EMBED_HEAD = "embed_head"


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------

# safetensors dtype strings <-> torch dtypes. Blocks travel as safetensors, so specs use the
# safetensors spelling, which is also what a peer written in another language would understand.
_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Newer dtypes only exist in recent torch builds; register them when present.
for _st, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_st] = getattr(torch, _attr)
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_TO_TORCH.items()}


def torch_dtype_to_st(dtype: torch.dtype) -> str:
    """Return the safetensors dtype string for ``dtype`` (e.g. ``torch.bfloat16`` -> ``"BF16"``).

    Raises ValueError for dtypes safetensors cannot represent, so a bad model fails early rather
    than when the first block is serialised.
    """
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent") from None


def st_dtype_to_torch(s: str) -> torch.dtype:
    """Return the torch dtype for a safetensors dtype string (e.g. ``"F32"`` -> ``torch.float32``).

    Raises ValueError for unknown strings, since they usually mean a corrupt or hostile message.
    """
    try:
        return _ST_TO_TORCH[s]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown safetensors dtype {s!r}; known: {sorted(_ST_TO_TORCH)}"
        ) from None


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one parameter, or of a range of its rows: enough to validate a received tensor.

    A matrix larger than the block bound (an embedding or LM head of a large vocabulary) is split into ranges of
    rows, each in its own block: ``rows = (start, stop)`` says which rows of the parameter ``name`` this piece is,
    and ``shape`` is the piece's shape (``stop - start`` rows). ``rows`` is None for a whole parameter.
    """

    name: str  # parameter name as in model.named_parameters()
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "F32", "BF16", ...
    rows: tuple[int, int] | None = None  # a row range [start, stop) of the parameter; None: all of it

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Size of the raw tensor data in bytes, used to budget transfers."""
        return self.numel * st_dtype_to_torch(self.dtype).itemsize


@dataclass(frozen=True)
class BlockSpec:
    """One unit of block-cyclic training: the parameters updated and exchanged together."""

    index: int
    name: str  # "layers.0", "layers.0-1" (grouped), "embed_head" (".1", ... when split) or "lm_head.weight[0:4096]"
    tensors: tuple[TensorSpec, ...]  # sorted by name

    @property
    def numel(self) -> int:
        """Total number of parameter elements in the block."""
        return sum(t.numel for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Total raw size of the block's tensors in bytes."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in spec order."""
        return tuple(t.name for t in self.tensors)

    @property
    def sliced(self) -> bool:
        """Whether the block holds a row range of a parameter rather than whole parameters only."""
        return any(t.rows is not None for t in self.tensors)


# --------------------------------------------------------------------------------------------
# access
# --------------------------------------------------------------------------------------------


def _named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=True))


def block_params(model: nn.Module, spec: BlockSpec) -> list[nn.Parameter]:
    """The model's Parameter objects for ``spec``, in ``spec.tensors`` order.

    Used to build an optimizer over one block and to freeze everything else (for a row range, the whole
    parameter it is cut from: ``training/slices.py`` trains the rows alone). Raises ValueError if
    the model does not match the spec (missing name, other shape or dtype), which means the spec
    was computed for a different model.
    """
    params = _named_params(model)
    out = []
    for t in spec.tensors:
        p = params.get(t.name)
        if p is None:
            raise ValueError(f"block {spec.name!r}: model has no parameter {t.name!r}")
        _check_param(spec, t, p)
        out.append(p)
    return out


def _check_param(spec: BlockSpec, t: TensorSpec, p: torch.Tensor) -> None:
    dtype = torch_dtype_to_st(p.dtype)
    if t.rows is None:
        fits = tuple(p.shape) == t.shape
    else:
        start, stop = t.rows
        fits = (p.dim() >= 1 and tuple(p.shape[1:]) == t.shape[1:] and 0 <= start < stop <= p.shape[0]
                and t.shape[0] == stop - start)
    if not fits or dtype != t.dtype:
        piece = "" if t.rows is None else f" rows {t.rows[0]}:{t.rows[1]} as"
        raise ValueError(
            f"block {spec.name!r}: model parameter {t.name!r} is {tuple(p.shape)} {dtype}, but the spec says"
            f"{piece} {t.shape} {t.dtype}"
        )


def _piece(t: TensorSpec, p: torch.Tensor) -> torch.Tensor:
    """The part of parameter ``p`` that ``t`` names (a view: rows of a contiguous tensor stay contiguous)."""
    return p if t.rows is None else p[t.rows[0]:t.rows[1]]


def block_values(spec: BlockSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Block ``spec`` taken from whole parameters ``{name: tensor}`` (e.g. every parameter a FedAvg-full client
    trained): the named tensors, cut to their row ranges."""
    return {t.name: _piece(t, tensors[t.name]).contiguous() for t in spec.tensors}


def block_tensors(model: nn.Module, spec: BlockSpec) -> dict[str, torch.Tensor]:
    """The block's current values as ``{name: tensor}``, detached and contiguous.

    Tensors stay on the parameter's device and are *not* copied when already contiguous (they
    share storage with the model, so a block of a large model costs no extra memory); clone them
    if you need a snapshot that survives later training steps or ``load_block`` calls.
    """
    return {t.name: _piece(t, p.detach()).contiguous()
            for t, p in zip(spec.tensors, block_params(model, spec), strict=True)}


def load_block(model: nn.Module, spec: BlockSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Copy received block values into the model's parameters in place.

    In-place copying keeps Parameter identity, so optimizers, hooks and tied weights (embedding
    and LM head sharing one tensor) all see the new values. Names, shapes and dtypes must match
    the spec exactly -- no silent casting or broadcasting -- and everything is validated before
    anything is written, so a bad message leaves the model untouched. Raises ValueError otherwise.
    Source tensors may live on any device.
    """
    if not isinstance(tensors, dict):
        raise ValueError(f"block {spec.name!r}: expected a dict of tensors, got {type(tensors).__name__}")
    expected = set(spec.names)
    got = set(tensors)
    missing = sorted(expected - got)
    extra = sorted(got - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise ValueError(f"block {spec.name!r}: tensor names do not match the spec: " + "; ".join(parts))
    for t in spec.tensors:
        v = tensors[t.name]
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"block {spec.name!r}: {t.name!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != t.shape:
            raise ValueError(
                f"block {spec.name!r}: {t.name!r} has shape {tuple(v.shape)}, expected {t.shape}"
            )
        st = _TORCH_TO_ST.get(v.dtype, str(v.dtype))
        if st != t.dtype:
            raise ValueError(f"block {spec.name!r}: {t.name!r} has dtype {st}, expected {t.dtype}")
    params = block_params(model, spec)  # validates the model against the spec too
    with torch.no_grad():
        for t, p in zip(spec.tensors, params, strict=True):
            _piece(t, p).copy_(tensors[t.name])
