"""What differs between the training strategies a run can use, in one place.

All strategies speak the same protocol (GetTask, DownloadModel, UploadBlock) and share the
coordinator's state, storage, evaluation and metrics. They differ in what one task trains and
how its upload becomes the next model version:

- ``cybgd`` (default): FedCyBGD as in the paper. One task trains one block; its upload replaces
  that block (a new version per visit, sequential, Gauss-Seidel order).
- ``cybgd-parallel``: up to K tasks at once on distinct blocks of the same version; the merge is
  exact because blocks are disjoint.
- ``fedavg-full``: FedAvg over all parameters. A round hands the same version to C distinct
  clients; each trains every parameter and uploads every block; the round's version is the
  sample-weighted average, computed block by block from the uploads on disk (one block's fp32
  accumulator in memory, never a model copy per client).
- ``fedlora``: FedAvg of LoRA adapters (FedIT). The base model stays frozen; clients train an
  adapter from the global one and upload only it; the round's adapter is the weighted average of
  the A and B matrices. A version is then the base blocks plus an adapter, merged for evaluation
  and export.

"Rounds" of the FedAvg family and "visits" of FedCyBGD are both rounds of the coordinator's
schedule; at equal training tokens a FedAvg round with C clients counts as C visits.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, TensorSpec, st_dtype_to_torch
from fedcybgd.common.codec import serialize_block
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

STRATEGIES = ("cybgd", "cybgd-parallel", "fedavg-full", "fedlora")
BLOCK_CYCLE = ("cybgd", "cybgd-parallel")
TASK_KINDS = {"fedavg-full": pb.TASK_FULL, "fedlora": pb.TASK_LORA}
#: Index and name of the adapter where a block index is expected (manifests, visit records).
ADAPTER_NAME = "lora_adapter"
ALL_BLOCKS = -1


@dataclass(frozen=True)
class LoraConfig:
    """The adapter of ``fedlora``: rank, scaling alpha / rank, and the wrapped modules (empty: the
    attention and MLP projections of every decoder layer)."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.rank <= 1024 or not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError("lora rank must be in [1, 1024] and alpha > 0")


class FedAvgRounds:
    """The schedule of the FedAvg family: R rounds of C tasks each, R chosen so that a run trains
    as many tokens as a FedCyBGD run of the same cycles (R x C >= cycles x blocks). The learning
    rate follows the same global schedule, over rounds; every task has its own data-order seed."""

    def __init__(self, num_blocks: int, config: ScheduleConfig, clients_per_round: int) -> None:
        self.clients_per_round = clients_per_round
        self.total_rounds = -(-num_blocks * config.cycles // clients_per_round)
        self.num_blocks = num_blocks
        self._schedule = CycleSchedule(self.total_rounds, ScheduleConfig(**{**config.__dict__, "cycles": 1}))
        self.config = config

    def lr_of(self, round_: int) -> float:
        return self._schedule.lr_of(round_)

    def seed_of(self, round_: int, slot: int) -> int:
        self._schedule._check(round_)
        digest = hashlib.sha256(f"fedcybgd-fedavg:{self.config.seed}:{round_}:{slot}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def cycle_of(self, round_: int) -> int:
        """The FedCyBGD cycle the same number of training tokens would have reached."""
        return min(round_ * self.clients_per_round // self.num_blocks, self.config.cycles - 1)


def _weighted_mean(blobs: BlobStore, weighted: Sequence[tuple[float, str]]) -> dict[str, torch.Tensor]:
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


def average_blocks(blobs: BlobStore, specs: Sequence[BlockSpec], uploads: Sequence[tuple[float, list[str]]]) -> list[str]:
    """The weighted average of several full-model uploads, block by block: (weight, manifest)
    pairs in, the averaged manifest out. Only one block's fp32 accumulator and one client's copy
    of that block are in memory at a time. Rounded to the blocks' dtype once, at the end."""
    manifest = []
    for spec in specs:
        acc = _weighted_mean(blobs, [(weight, shas[spec.index]) for weight, shas in uploads])
        out = {t.name: acc[t.name].to(st_dtype_to_torch(t.dtype)) for t in spec.tensors}
        manifest.append(blobs.put(serialize_block(out)))
    return manifest


def average_adapter(blobs: BlobStore, uploads: Sequence[tuple[float, str]]) -> str:
    """FedIT: the weighted mean of the clients' A and B matrices (fp32)."""
    return blobs.put(serialize_block(_weighted_mean(blobs, uploads)))


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
            if tuple(weight.shape) != tuple(delta.shape):  # GPT-2's Conv1D keeps weights as [in, out]
                delta = delta.T
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))


def adapter_entry(blobs: BlobStore, sha: str, index: int) -> pb.BlockEntry:
    """The manifest entry describing an adapter blob."""
    with safetensors.safe_open(str(blobs.path(sha)), framework="pt") as f:
        tensors = [pb.TensorEntry(name=name, shape=list(f.get_slice(name).get_shape()),
                                  dtype=f.get_slice(name).get_dtype()) for name in sorted(f.keys())]
    return pb.BlockEntry(index=index, name=ADAPTER_NAME, sha256=sha, size=blobs.size(sha), tensors=tensors)


def adapter_spec(entry: pb.BlockEntry) -> BlockSpec:
    """A block spec for the adapter, so uploads of it are checked like any block's."""
    return BlockSpec(index=entry.index, name=entry.name,
                     tensors=tuple(TensorSpec(t.name, tuple(t.shape), t.dtype) for t in entry.tensors))
