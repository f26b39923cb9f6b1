"""Export a model version from a coordinator's state directory (the coordinator may be running)."""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch

from fedcybgd.common.modeling import specs_from_json
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.state import SqliteState
from fedcybgd.server.strategies import LoraConfig, merge_adapter


def export_version(state_dir: str | Path, out_dir: str | Path, version: int | None = None) -> Path:
    state_path = Path(state_dir) / "state.sqlite"
    if not state_path.is_file():
        raise FileNotFoundError(f"no coordinator state in {state_dir}")
    state = SqliteState(state_path)
    try:
        blocks = state.get_meta("blocks")
        if blocks is None:
            raise ValueError(f"the run in {state_dir} was never initialised")
        latest, _ = state.latest_version()
        version = latest if version is None else version
        manifest = state.manifest(version)
        store = ModelStore(state_dir)
        adapter = state.get_meta(f"adapter:{version}")  # fedlora: merged into the exported weights
        merge = None
        if adapter:
            lora = json.loads(state.get_meta("run_config"))["lora"]
            lora = LoraConfig(**{**lora, "target_modules": tuple(lora["target_modules"])})
            tensors = safetensors.torch.load_file(str(store.blobs.path(adapter)))
            merge = lambda model: merge_adapter(model, tensors, lora)  # noqa: E731
        return store.export(specs_from_json(blocks), manifest, state.get_meta("dtype"), out_dir, merge=merge)
    finally:
        state.close()
