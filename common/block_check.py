"""Checking a stored blob against the block it claims to be: names, shapes, dtypes, finite
values. The coordinator checks every uploaded blob with it before the blob is published; it
lives with the block code because it knows only blocks, not the coordinator."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import safetensors
import torch

from fedcybgd.common.blocks import BlockSpec, st_dtype_to_torch
from fedcybgd.common.codec import CodecError

#: Bytes of a tensor checked at a time: a tensor of gigabytes is never loaded whole.
SLAB_BYTES = 64 * 2**20


def validate_block_file(path: Path, spec: BlockSpec) -> None:
    """Raise CodecError unless the safetensors file at `path` is exactly the block `spec`."""
    expected = {t.name: t for t in spec.tensors}
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise CodecError(f"block {spec.name}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
            for name, want in expected.items():
                piece = f.get_slice(name)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != tuple(want.shape) or dtype != want.dtype:
                    raise CodecError(f"{name}: {shape} {dtype}, expected {tuple(want.shape)} {want.dtype}")
                if st_dtype_to_torch(dtype).is_floating_point and not _all_finite(piece, shape, dtype):
                    raise CodecError(f"{name}: contains NaN or infinite values")
    except CodecError:
        raise
    except Exception as exc:  # a malformed header and the like
        raise CodecError(f"not a valid safetensors block: {exc}") from exc


def _all_finite(piece: Any, shape: tuple[int, ...], dtype: str) -> bool:
    """Finiteness of a stored tensor, checked a slab of rows at a time."""
    if not shape or shape[0] == 0:
        return bool(torch.isfinite(piece[...] if not shape else piece[:]).all())
    row_bytes = max(1, math.prod(shape[1:]) * st_dtype_to_torch(dtype).itemsize)
    rows = max(1, SLAB_BYTES // row_bytes)
    return all(bool(torch.isfinite(piece[i:i + rows]).all()) for i in range(0, shape[0], rows))
