"""Export a model version from a coordinator's state directory (the coordinator may be running)."""
from __future__ import annotations

from pathlib import Path

from fedcybgd.common.modeling import specs_from_json
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.state import SqliteState


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
        return ModelStore(state_dir).export(specs_from_json(blocks), manifest, state.get_meta("dtype"), out_dir)
    finally:
        state.close()
