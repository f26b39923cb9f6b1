"""Export a model version from a coordinator's state directory (the coordinator may be running).

A version is its blocks plus, for fedlora, an adapter (state metadata ``adapter:<version>``),
merged into the exported weights with the LoRA settings stored with the run."""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
from torch import nn

from fedcybgd.common.modeling import specs_from_json
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.state import SqliteState, current_version
from fedcybgd.server.strategies.fedlora import lora_from_meta
from fedcybgd.training.lora import merge_adapter


def export_version(state_dir: str | Path, out_dir: str | Path, version: int | None = None) -> Path:
    state_path = Path(state_dir) / "state.sqlite"
    if not state_path.is_file():
        raise FileNotFoundError(f"no coordinator state in {state_dir}")
    state = SqliteState(state_path)
    try:
        blocks, dtype = state.get_meta("blocks"), state.get_meta("dtype")
        if blocks is None or dtype is None:
            raise ValueError(f"the run in {state_dir} was never initialised")
        version = current_version(state)[0] if version is None else version
        manifest = state.manifest(version)
        store = ModelStore(state_dir)
        adapter, lora = state.get_meta(f"adapter:{version}"), state.get_meta("lora")
        merge = None
        if adapter and not lora:
            raise ValueError(f"version {version} has a LoRA adapter but the run stored no LoRA settings "
                             "(a state directory from an older release): cannot merge it")
        if adapter and lora:
            tensors = safetensors.torch.load_file(str(store.blobs.path(adapter)))
            settings = lora_from_meta(lora)

            def merge(model: nn.Module) -> None:
                merge_adapter(model, tensors, settings)
        return store.export(specs_from_json(blocks), manifest, dtype, out_dir, merge=merge)
    finally:
        state.close()
