"""``fedlora``: FedAvg of LoRA adapters (FedIT). The base model stays frozen; clients train an
adapter starting from the global one and upload only it; a round's adapter is the weighted
average of the clients' A and B matrices. A version is the base blocks plus an adapter (state
metadata ``adapter:<version>``), merged into the weights for evaluation and export. The LoRA
settings are stored with the run (metadata ``lora``) so that an export needs no configuration.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING

import safetensors
import safetensors.torch
from torch import nn

from fedcybgd.common.blocks import BlockSpec, TensorSpec
from fedcybgd.common.codec import serialize_block
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.records import ExpectedUpload, UploadClaim
from fedcybgd.server.state import TaskRow, VisitRow
from fedcybgd.server.strategies.averaging import average_adapter
from fedcybgd.server.strategies.base import expect_blob
from fedcybgd.server.strategies.fedavg import Average, FedAvgFamily
from fedcybgd.training.lora import LoraConfig, initial_lora_adapter, merge_adapter
from fedcybgd.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from fedcybgd.server.config import CoordinatorConfig

#: The adapter's name where a block name is expected (manifests, status, logs).
ADAPTER_NAME = "lora_adapter"


def lora_meta(lora: LoraConfig) -> str:
    return json.dumps({**asdict(lora), "target_modules": list(lora.target_modules)})


def lora_from_meta(text: str) -> LoraConfig:
    values = json.loads(text)
    return LoraConfig(**{**values, "target_modules": tuple(values["target_modules"])})


def adapter_spec(blobs, sha: str, index: int) -> BlockSpec:
    """The adapter blob's spec, read from its safetensors header, so uploads of it are checked
    like any block's."""
    with safetensors.safe_open(str(blobs.path(sha)), framework="pt") as f:
        tensors = tuple(TensorSpec(name, tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
                        for name in sorted(f.keys()))
    return BlockSpec(index=index, name=ADAPTER_NAME, tensors=tensors)


class FedLoRA(FedAvgFamily):
    task_kind = pb.TASK_LORA
    transfer_kind = "block"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        self._specs: dict[str, BlockSpec] = {}  # adapter blob -> spec (adapters never change)

    def initial_meta(self, store: ModelStore, specs: list[BlockSpec], manifest: list[str],
                     dtype: str) -> dict[str, str]:
        """The version-0 adapter (B = 0: the model is unchanged), made once for every client."""
        lora = self.config.lora
        model = store.build_model(specs, manifest, dtype)
        adapter = initial_lora_adapter(model, rank=lora.rank, alpha=lora.alpha,
                                       target_modules=list(lora.target_modules) or None,
                                       init_seed=self.config.schedule.seed)
        return {"adapter:0": store.blobs.put(serialize_block(adapter)), "lora": lora_meta(lora)}

    def fingerprint(self) -> dict[str, object]:
        return {**super().fingerprint(), "lora": json.loads(lora_meta(self.config.lora))}

    def scope_name(self, block_index: int) -> str:
        return ADAPTER_NAME

    # -- transfer ------------------------------------------------------------------------------
    def extra_blob(self, version: int) -> str | None:
        return self.env.state.get_meta(f"adapter:{version}")

    def extra_spec(self, sha: str) -> BlockSpec:
        if sha not in self._specs:
            self._specs[sha] = adapter_spec(self.env.store.blobs, sha, len(self.env.run.specs))
        return self._specs[sha]

    def trainable_blobs(self, task: TaskRow, manifest: list[str]) -> set[str]:
        return {self._adapter(task.base_version)}

    def finish_model(self, model: nn.Module, version: int) -> None:
        tensors = safetensors.torch.load_file(str(self.env.store.blobs.path(self._adapter(version))))
        merge_adapter(model, tensors, self.config.lora)

    # -- accept --------------------------------------------------------------------------------
    def expected_uploads(self, task: TaskRow, claim: UploadClaim) -> list[ExpectedUpload]:
        adapter = self._adapter(task.base_version)
        return [expect_blob(self.extra_spec(adapter), claim.single.sha256, claim.single.size, adapter)]

    def average(self, weighted: list[tuple[float, list[str]]], manifest: list[str]) -> Average:
        adapter = average_adapter(self.env.store.blobs, [(w, blobs[0]) for w, blobs in weighted])
        return Average(manifest=manifest, changed={len(self.env.run.specs): adapter}, blob_sha256=adapter,
                       meta={"adapter:{version}": adapter})

    def blobs_of(self, visit: VisitRow) -> dict[int, str]:
        return {len(self.env.run.specs): visit.blob_sha256}

    def _adapter(self, version: int) -> str:
        adapter = self.extra_blob(version)
        if adapter is None:
            raise Refusal(Status.FAILED_PRECONDITION, f"version {version} has no adapter")
        return adapter
