"""Sample-weighted averages of uploaded blobs, for the FedAvg family: read from disk one blob at
a time into one fp32 accumulator (never a model copy per client)."""
from __future__ import annotations

from collections.abc import Sequence

import safetensors.torch
import torch

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, st_dtype_to_torch
from fedcybgd.common.codec import serialize_block


def weighted_mean(blobs: BlobStore, weighted: Sequence[tuple[float, str]]) -> dict[str, torch.Tensor]:
    """Sample-weighted fp32 mean of same-shaped blobs, read one at a time into one accumulator."""
    total = sum(w for w, _ in weighted)
    acc: dict[str, torch.Tensor] = {}
    for weight, sha in weighted:
        for name, value in safetensors.torch.load_file(str(blobs.path(sha))).items():
            if name in acc:
                acc[name].add_(value.float(), alpha=weight / total)
            else:
                acc[name] = value.float().mul_(weight / total)
    return acc


def average_blocks(blobs: BlobStore, specs: Sequence[BlockSpec],
                   uploads: Sequence[tuple[float, list[str]]]) -> list[str]:
    """The weighted average of several full-model uploads, block by block: (weight, manifest)
    pairs in, the averaged manifest out. Only one block's fp32 accumulator and one client's copy
    of that block are in memory at a time. Rounded to the blocks' dtype once, at the end."""
    manifest = []
    for spec in specs:
        acc = weighted_mean(blobs, [(weight, shas[spec.index]) for weight, shas in uploads])
        out = {t.name: acc[t.name].to(st_dtype_to_torch(t.dtype)) for t in spec.tensors}
        manifest.append(blobs.put(serialize_block(out)))
    return manifest


def average_adapter(blobs: BlobStore, uploads: Sequence[tuple[float, str]]) -> str:
    """FedIT: the weighted mean of the clients' A and B matrices (fp32)."""
    return blobs.put(serialize_block(weighted_mean(blobs, uploads)))
