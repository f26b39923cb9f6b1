"""Everything model-specific in one place: building a Hugging Face causal LM from its config,
filling it block by block from blobs, and describing its blocks on the wire.

The coordinator (evaluation, export) and the client (training) both build models this way, so
both see exactly the same parameter names and block partition.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from fedcybgd.common.blocks import BlockSpec, TensorSpec, load_block, st_dtype_to_torch

#: Tokenizer files a client may receive; anything else in a model directory stays home.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def config_from_json(config_json: str) -> PretrainedConfig:
    values = json.loads(config_json)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


_BUILD_LOCK = threading.Lock()


def model_from_config(config: PretrainedConfig, dtype: torch.dtype,
                      device: str | torch.device = "cpu") -> PreTrainedModel:
    """An empty-weights model of the right structure; its blocks are then loaded from blobs.

    ``from_config(dtype=)`` sets torch's *process-wide* default dtype while it builds and restores it after: two
    threads doing so at once (the coordinator's evaluator and its memory planner) could leave the default at bf16
    for good, and any thread creating tensors meanwhile gets the wrong dtype. So builds are serialised, and a meta
    model (planning: no memory either way) is built at the default dtype and cast, without touching the default."""
    with _BUILD_LOCK:
        if torch.device(device).type == "meta":
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
            model.to(dtype)
        else:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()  # no dropout anywhere: a visit is a deterministic function of its inputs
    return model


def load_blob_file(model: nn.Module, spec: BlockSpec, path: Path) -> None:
    """Copy one block from a blob file (memory-mapped safetensors) into the model's parameters."""
    device = next(model.parameters()).device
    tensors = safetensors.torch.load_file(str(path), device=str(device))
    load_block(model, spec, tensors)


def specs_to_json(specs: list[BlockSpec]) -> str:
    return json.dumps([
        {"index": s.index, "name": s.name,
         "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                      **({"rows": list(t.rows)} if t.rows is not None else {})} for t in s.tensors]}
        for s in specs
    ])


def specs_from_json(text: str) -> list[BlockSpec]:
    return [
        BlockSpec(index=b["index"], name=b["name"],
                  tensors=tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"],
                                           tuple(t["rows"]) if "rows" in t else None) for t in b["tensors"]))
        for b in json.loads(text)
    ]


def word_size(spec: BlockSpec) -> int:
    """Element size for the byte-grouping codec: the block's float size when it has only one."""
    sizes = {st_dtype_to_torch(t.dtype).itemsize for t in spec.tensors}
    return sizes.pop() if len(sizes) == 1 and next(iter(sizes)) in (2, 4) else 1


def max_blob_size(spec: BlockSpec) -> int:
    """Upper bound of a block's blob: tensor bytes plus a generous bound on the JSON header."""
    header = 1024 + sum(200 + len(t.name) + 24 * len(t.shape) for t in spec.tensors)
    return spec.nbytes + header
