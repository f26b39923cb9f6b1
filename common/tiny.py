"""Tiny randomly initialised causal LMs, a byte-level tokenizer and a small corpus.

Tests and the quick demo need real Hugging Face models of several architectures that build in
milliseconds, run on one CPU core and need no network: everything here is deterministic, built
from code, and small enough (about 0.2M parameters) to train for a few steps in a unit test.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = [
    "TINY_TEXT",
    "TINY_ARCHS",
    "EOS_TOKEN",
    "IM_START",
    "IM_END",
    "BYTE_VOCAB_SIZE",
    "CHAT_TEMPLATE",
    "make_byte_tokenizer",
    "tiny_config",
    "make_tiny_model",
    "write_tiny_model_dir",
]

#: Public-domain training text: Shakespeare's Sonnets I-LXXV (about 46 KB of ASCII verse), kept
#: in a data file next to this module so the demo can train offline on real English.
TINY_TEXT: str = (Path(__file__).parent / "tiny_corpus.txt").read_text(encoding="utf-8")

TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox")

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
_SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
#: 256 byte tokens followed by the three special tokens (ids 256, 257, 258).
BYTE_VOCAB_SIZE = 256 + len(_SPECIAL_TOKENS)
_EOS_ID = 256

#: ChatML, the format of Qwen2 / SmolLM2 instruct models, so chat-formatted datasets work as-is.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# transformers renamed `torch_dtype=` to `dtype=` in 4.56 and made safetensors the only format
# in 5.0; support both sides of the rename since pyproject allows transformers>=4.46.
_TF_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
_DTYPE_KW = "dtype" if _TF_VERSION >= (4, 56) else "torch_dtype"


def _bytes_to_unicode() -> dict[int, str]:
    # Same mapping as GPT-2 / tokenizers' ByteLevel: printable bytes map to themselves, the rest
    # to code points from 256 up, in byte order.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@functools.lru_cache(maxsize=1)
def _backend_tokenizer_json() -> str:
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIAL_TOKENS))
    return tok.to_str()


def make_byte_tokenizer(chat_template: bool = True) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per byte (ids 0-255, no merges) plus the special tokens.

    No training and no downloads, so it is identical everywhere; any text round-trips exactly.
    ``<|endoftext|>`` (id 256) is eos, bos and pad; ``<|im_start|>``/``<|im_end|>`` (257/258)
    plus a ChatML ``chat_template`` make ``apply_chat_template`` work like on a real chat model
    (``chat_template=False``: no template, like a base model's tokenizer).
    """
    backend = Tokenizer.from_str(_backend_tokenizer_json())
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE if chat_template else None,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    assert len(tok) == BYTE_VOCAB_SIZE and tok.eos_token_id == _EOS_ID, "byte tokenizer layout changed"
    return tok


def tiny_config(arch: str = "llama", vocab_size: int = BYTE_VOCAB_SIZE, **overrides) -> PretrainedConfig:
    """A tiny config of the given architecture: hidden 64, 4 layers, 4 heads, MLP 128, 512 positions.

    Llama-likes use grouped-query attention (2 KV heads) so the K/V projections differ in shape
    from Q, as in real models; llama and qwen2 tie input/output embeddings (like SmolLM2) so the
    tied-weight paths are exercised. Dropout is 0 everywhere so forward passes are deterministic
    in train mode too. ``overrides`` are passed to the config with the architecture's own names.
    """
    special = dict(bos_token_id=_EOS_ID, eos_token_id=_EOS_ID, pad_token_id=_EOS_ID)
    kwargs: dict[str, Any]
    if arch in ("llama", "qwen2", "mistral"):
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            attention_dropout=0.0,
            tie_word_embeddings=arch != "mistral",
            **special,
        )
        if arch == "mistral":
            kwargs["sliding_window"] = None
    elif arch == "gpt2":
        kwargs = dict(
            vocab_size=vocab_size,
            n_positions=512,
            n_embd=64,
            n_layer=4,
            n_head=4,
            n_inner=128,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
            **special,
        )
    elif arch == "gpt_neox":
        kwargs = dict(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            max_position_embeddings=512,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **special,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; choose one of {TINY_ARCHS}")
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def make_tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised tiny model; the same (arch, seed, dtype) always gives the same weights.

    The global RNG state is saved and restored, so building a model does not perturb the caller's
    random stream.
    """
    config = tiny_config(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, **{_DTYPE_KW: dtype})
    return model


def write_tiny_model_dir(
    path: str | Path, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, chat_template: bool = True
) -> Path:
    """Write a tiny model plus the byte tokenizer as a Hugging Face model directory (``chat_template=False``: a base
    model, whose tokenizer has no chat template).

    The directory loads offline with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``, which makes it a stand-in for a downloaded checkpoint.
    Weights are written as safetensors.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = make_tiny_model(arch, seed=seed, dtype=dtype)
    save_kwargs: dict[str, Any] = {} if _TF_VERSION >= (5, 0) else {"safe_serialization": True}
    model.save_pretrained(path, **save_kwargs)
    make_byte_tokenizer(chat_template).save_pretrained(path)
    return path
