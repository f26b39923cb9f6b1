"""The model a client keeps in memory from visit to visit, and which blob each of its blocks holds: a visit's
manifest usually differs from the last one in a few blocks, and only those are loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import safetensors.torch
import torch
from torch import nn

from fedcybgd.common import context
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, load_block
from fedcybgd.common.codec import CodecError
from fedcybgd.common.modeling import load_blob_file
from fedcybgd.v1 import coordinator_pb2 as pb

__all__ = ["ResidentModel"]

#: Lossy encodings of frozen blocks this client decodes (``fedcybgd.common.context``), by wire codec.
CONTEXT_METHODS = {pb.CONTEXT_INT8: "int8", pb.CONTEXT_INT4: "int4", pb.CONTEXT_PRUNE: "prune"}


@dataclass
class ResidentModel:
    """The client's model, its block partition, the cache its blocks come from, and what each block now holds."""

    model: nn.Module
    specs: list[BlockSpec]
    cache: BlobStore
    #: block index -> SHA-256 of the blob now in ``model`` ("~<sha>" for a lossy approximation of a frozen block)
    loaded: dict[int, str] = field(default_factory=dict)

    def load_manifest(self, manifest: pb.Manifest) -> None:
        """Bring the model to the manifest's version, loading only blocks that changed."""
        if len(manifest.blocks) != len(self.specs):
            raise ValueError(f"manifest has {len(manifest.blocks)} blocks, this model {len(self.specs)}")
        for entry in manifest.blocks:
            spec = self.specs[entry.index]
            wire = [(t.name, tuple(t.shape), t.dtype, (t.rows.start, t.rows.stop) if t.HasField("rows") else None)
                    for t in entry.tensors]
            if wire != [(t.name, tuple(t.shape), t.dtype, t.rows) for t in spec.tensors]:
                raise ValueError(f"block {entry.name}: the coordinator's tensors differ from this model's")
            if not entry.HasField("approx"):
                if self.loaded.get(entry.index) != entry.sha256:
                    load_blob_file(self.model, spec, self.cache.path(entry.sha256))
                    self.loaded[entry.index] = entry.sha256
            elif entry.approx.codec == pb.CONTEXT_DROP:  # keep (or go back to) the version we hold
                if self.loaded.get(entry.index) != entry.approx.reference_sha256:
                    load_blob_file(self.model, spec, self.cache.path(entry.approx.reference_sha256))
                    self.loaded[entry.index] = entry.approx.reference_sha256
            elif self.loaded.get(entry.index) != f"~{entry.approx.sha256}":
                load_block(self.model, spec, self._approximated(spec, entry.approx))
                # Not a block version: marked so that the exact block is loaded when it is needed.
                self.loaded[entry.index] = f"~{entry.approx.sha256}"

    def _approximated(self, spec: BlockSpec, approx: pb.ContextApprox) -> dict[str, torch.Tensor]:
        """A frozen block rebuilt from its lossy encoding and the exact version it refers to."""
        method = CONTEXT_METHODS.get(approx.codec)
        if method is None:
            raise CodecError(f"block {spec.name}: unknown context codec {approx.codec}")
        encoded = safetensors.torch.load_file(str(self.cache.path(approx.sha256)))
        reference = (safetensors.torch.load_file(str(self.cache.path(approx.reference_sha256)))
                     if approx.reference_sha256 else None)
        return context.decode(method, encoded, spec.tensors, reference, group_size=approx.group_size)
