"""Opening a run: a new state directory imports the model as version 0; an existing one is
checked against the settings it was started with (a run cannot change them midway)."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.config import to_dict
from fedcybgd.common.modeling import specs_from_json, specs_to_json
from fedcybgd.common.partition import NEW_RUN_LAYOUT, resolved_bound
from fedcybgd.common.prompts import PromptFormat, resolve_prompt_format
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.state import CoordinatorState

if TYPE_CHECKING:
    from fedcybgd.server.config import CoordinatorConfig
    from fedcybgd.server.strategies.base import Strategy

log = logging.getLogger("fedcybgd.coordinator")


@dataclass(frozen=True)
class RunInfo:
    """What a run trains: its block partition, the dtype blocks are exchanged in, the id of its base model (the
    SHA-256 of the version-0 manifest) and the prompt format records are laid out in."""

    specs: list[BlockSpec]
    dtype: str
    model_id: str
    prompt: PromptFormat
    max_block_params: int = 0  # the partition's bound, resolved (0: none; runs from before bounded blocks)
    block_layout: str = "contiguous"  # how its decoder layers are grouped (common/partition.py)

    @property
    def model_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def run_fingerprint(config: CoordinatorConfig, strategy: Strategy, prompt: PromptFormat, layout: str) -> str:
    """The settings a run cannot change midway without invalidating what was trained (the prompt format by its
    template's digest, so that an edited template file is noticed too; ``layout``: the run's block layout)."""
    settings = {
        "layers_per_block": config.layers_per_block, "dtype": config.dtype,
        "max_concurrent_visits": config.max_concurrent_visits,
        "schedule": _schedule_settings(config), "training": to_dict(config.training),
        "prompt": {"format": config.prompt.format, "train_on": prompt.train_on, "template_sha256": prompt.digest},
        **strategy.fingerprint(),
    }
    if config.max_block_params is not None:  # unset (automatic) leaves the fingerprint of earlier runs as it was
        settings["max_block_params"] = config.max_block_params
    if layout != "contiguous":  # as every run before the setting existed: their fingerprints hold
        settings["block_layout"] = layout
    return json.dumps(settings, sort_keys=True)


def _schedule_settings(config: CoordinatorConfig) -> dict[str, object]:
    settings = to_dict(config.schedule)
    if settings.get("embed_head_every") == 1:  # as every run before the setting existed: their fingerprints hold
        del settings["embed_head_every"]     # (restart such a run with embed_head_every = 1)
    return settings


def open_run(config: CoordinatorConfig, state: CoordinatorState, store: ModelStore, strategy: Strategy) -> RunInfo:
    stored = state.get_meta("run_config")
    if stored is None:
        if not config.model:
            raise ValueError("a new run needs a model directory (--model)")
        log.info("importing model %s", config.model)
        layout = config.block_layout or NEW_RUN_LAYOUT
        specs, manifest, dtype = store.import_model(config.model, config.layers_per_block, config.dtype,
                                                    config.max_block_params, layout)
        prompt = _prompt_format(config, store)
        model_id = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
        state.add_version(0, manifest, None, replace=True)  # a crash mid-import may have left one
        meta = {"blocks": specs_to_json(specs), "dtype": dtype, "model_id": model_id,
                "max_block_params": str(resolved_bound(specs, config.max_block_params)), "block_layout": layout,
                **strategy.initial_meta(store, specs, manifest, dtype)}
        # Written last: its presence marks a completely initialised run.
        state.set_meta({**meta, "run_config": run_fingerprint(config, strategy, prompt, layout)})
        log.info("run initialised: %d blocks, dtype %s, model %s, prompt format %s (loss on %s)", len(specs), dtype,
                 model_id[:12], prompt.name, prompt.train_on)
    else:
        prompt = _prompt_format(config, store)
        layout = config.block_layout or state.get_meta("block_layout") or "contiguous"  # older runs: contiguous
        fingerprint = run_fingerprint(config, strategy, prompt, layout)
        if stored != fingerprint:
            raise ValueError(
                f"state directory {config.state_dir} belongs to a run with other settings:\n  stored:  {stored}\n"
                f"  current: {fingerprint}\nuse a fresh --state-dir or the same settings")
    blocks, stored_dtype, stored_id = state.get_meta("blocks"), state.get_meta("dtype"), state.get_meta("model_id")
    if blocks is None or stored_dtype is None or stored_id is None:
        raise ValueError(f"state directory {config.state_dir} holds an incomplete run")
    return RunInfo(specs=specs_from_json(blocks), dtype=stored_dtype, model_id=stored_id, prompt=prompt,
                   max_block_params=int(state.get_meta("max_block_params") or 0), block_layout=layout)


def _prompt_format(config: CoordinatorConfig, store: ModelStore) -> PromptFormat:
    """The run's prompt format, from its settings and the imported model's tokenizer."""
    try:
        return resolve_prompt_format(config.prompt.format, config.prompt.train_on, store.tokenizer())
    except ValueError as exc:
        raise ValueError(f"prompt.format: {exc}") from exc
