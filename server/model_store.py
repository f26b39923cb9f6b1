"""The global model on the coordinator's disk: blocks of the kept versions as content-addressed
blobs (`server/retention.py` decides which versions stay), plus the config and tokenizer files that
every client needs to build the same model.

Importing a model is done once per run and atomically; afterwards the coordinator never holds
the whole model in memory except to evaluate or export it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, block_tensors
from fedcybgd.common.codec import serialize_block
from fedcybgd.common.modeling import (
    DTYPES,
    TOKENIZER_FILES,
    config_from_json,
    dtype_name,
    load_blob_file,
    model_from_config,
)
from fedcybgd.common.partition import partition_model

#: Bound on the tokenizer files sent with the model info (before compression).
MAX_TOKENIZER_BYTES = 32 * 1024 * 1024


class ModelStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.state_dir = Path(state_dir)
        self.blobs = BlobStore(self.state_dir / "blobs")
        self.model_dir = self.state_dir / "model"

    def import_model(self, model_path: str | Path, layers_per_block: int, dtype: str,
                     max_block_params: int | None = None,
                     layout: str = "contiguous") -> tuple[list[BlockSpec], list[str], str]:
        """Partition a Hugging Face model into blocks and store them as version 0.

        Returns (block specs, manifest of blob SHA-256 per block, the dtype name used).
        """
        if not (Path(model_path) / "config.json").is_file():
            raise FileNotFoundError(f"{model_path} is not a Hugging Face model directory (no config.json); "
                                    "for a GGUF file run 'fedcybgd prepare-model' first")
        kwargs = {} if dtype == "auto" else {"dtype": DTYPES[dtype]}
        model = AutoModelForCausalLM.from_pretrained(str(model_path), **kwargs)
        stored_dtype = next(model.parameters()).dtype
        if stored_dtype not in DTYPES.values():
            raise ValueError(f"unsupported weight dtype {stored_dtype}")
        specs = partition_model(model, layers_per_block, max_block_params, layout)
        manifest = [self.blobs.put(serialize_block(block_tensors(model, spec))) for spec in specs]
        self._write_model_dir(model, model_path)
        return specs, manifest, dtype_name(stored_dtype)

    def _write_model_dir(self, model: PreTrainedModel, model_path: str | Path) -> None:
        tmp = Path(tempfile.mkdtemp(dir=self.state_dir, prefix="model-"))
        (tmp / "config.json").write_text(model.config.to_json_string())
        AutoTokenizer.from_pretrained(str(model_path)).save_pretrained(str(tmp))
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)
        os.replace(tmp, self.model_dir)

    def config_json(self) -> str:
        return (self.model_dir / "config.json").read_text()

    def tokenizer_files(self) -> dict[str, bytes]:
        files = {name: (self.model_dir / name).read_bytes()
                 for name in TOKENIZER_FILES if (self.model_dir / name).is_file()}
        total = sum(len(v) for v in files.values())
        if total > MAX_TOKENIZER_BYTES:
            raise ValueError(f"tokenizer files take {total} bytes, more than {MAX_TOKENIZER_BYTES}")
        return files

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(str(self.model_dir))

    def build_model(self, specs: list[BlockSpec], manifest: list[str], dtype: str,
                    device: str = "cpu") -> PreTrainedModel:
        model = model_from_config(config_from_json(self.config_json()), DTYPES[dtype], device)
        for spec, sha in zip(specs, manifest, strict=True):
            load_blob_file(model, spec, self.blobs.path(sha))
        return model

    def export(self, specs: list[BlockSpec], manifest: list[str], dtype: str, out_dir: str | Path,
               merge: Callable[[PreTrainedModel], None] | None = None) -> Path:
        """Write a model version as a Hugging Face directory loadable by from_pretrained
        (`merge` folds anything else into the weights first, e.g. a LoRA adapter)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.build_model(specs, manifest, dtype)
        if merge is not None:
            merge(model)
        model.save_pretrained(str(out))
        self.tokenizer().save_pretrained(str(out))
        return out
