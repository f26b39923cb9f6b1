"""Export a model version from a coordinator's state directory (the coordinator may be running).

A version is its blocks plus, for fedlora, an adapter (state metadata ``adapter:<version>``),
merged into the exported weights with the LoRA settings stored with the run. A version the retention rule pruned
(``server/retention.py``) cannot be exported: the error names the nearest versions kept. ``best_version`` names the
version with the lowest held-out loss the coordinator measured, which retention keeps (early stopping after the
fact: ``fedcybgd export --best``)."""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
from torch import nn

from fedcybgd.common.modeling import specs_from_json
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.state import CoordinatorState, SqliteState, current_version
from fedcybgd.server.strategies.fedlora import lora_from_meta
from fedcybgd.training.lora import merge_adapter


class PrunedVersionError(ValueError):
    """The version asked for is no longer on disk: the retention rule pruned it."""


def check_exportable(state: CoordinatorState, version: int) -> None:
    """Raise a clear error for a version that does not exist or was pruned, naming what can be exported."""
    latest, _ = current_version(state)
    if not 0 <= version <= latest:
        raise ValueError(f"no model version {version}: the run has versions 0 to {latest}")
    if state.is_pruned(version):
        below, above = state.kept_neighbours(version)
        nearest = " and ".join(str(v) for v in (below, above) if v is not None)
        raise PrunedVersionError(f"version {version} was pruned by the coordinator's retention rule (its blobs are "
                                 f"no longer kept); the nearest kept versions are {nearest}")


def best_version(state: CoordinatorState) -> tuple[int, float]:
    """(version, held-out loss) of the lowest held-out loss evaluated in the run; a clear error without any."""
    best = state.best_eval()
    if best is None:
        raise ValueError("the run has no held-out evaluations (the coordinator needs eval.data): no best version")
    return best[0], best[2]


def export_version(state_dir: str | Path, out_dir: str | Path, version: int | None = None) -> Path:
    """Write ``version`` (default: the newest) as a Hugging Face model directory under ``out_dir``."""
    state_path = Path(state_dir) / "state.sqlite"
    if not state_path.is_file():
        raise FileNotFoundError(f"no coordinator state in {state_dir}")
    state = SqliteState(state_path)
    try:
        blocks, dtype = state.get_meta("blocks"), state.get_meta("dtype")
        if blocks is None or dtype is None:
            raise ValueError(f"the run in {state_dir} was never initialised")
        version = current_version(state)[0] if version is None else version
        check_exportable(state, version)
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
        try:
            return store.export(specs_from_json(blocks), manifest, dtype, out_dir, merge=merge)
        except FileNotFoundError:
            check_exportable(state, version)  # a running coordinator pruned it meanwhile: say so
            raise
    finally:
        state.close()
