"""Block partition (fedcybgd.common.blocks) and tiny models (fedcybgd.common.tiny)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcybgd.common.blocks import (
    BlockSpec,
    TensorSpec,
    block_params,
    block_tensors,
    load_block,
    st_dtype_to_torch,
    torch_dtype_to_st,
)
from fedcybgd.common.partition import find_decoder_layers, partition_model
from fedcybgd.common.tiny import (
    BYTE_VOCAB_SIZE,
    TINY_ARCHS,
    TINY_TEXT,
    make_byte_tokenizer,
    make_tiny_model,
    tiny_config,
    write_tiny_model_dir,
)

torch.set_num_threads(1)

ARCHS = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]
LAYER_PREFIX = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}
N_LAYERS = 4


def _param_name(model: nn.Module, tensor: torch.Tensor | nn.Module) -> str:
    for name, p in model.named_parameters():
        if p is tensor:
            return name
    raise AssertionError("tensor is not a parameter of the model")


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _perturb(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _expected_names(n_layers: int, lpb: int) -> list[str]:
    names = []
    for start in range(0, n_layers, lpb):
        end = min(start + lpb, n_layers) - 1
        names.append(f"layers.{start}" if start == end else f"layers.{start}-{end}")
    return names + ["embed_head"]


def test_archs_listed():
    assert set(TINY_ARCHS) == set(ARCHS)


# --------------------------------------------------------------------------------------------
# partition
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_layers(arch):
    model = make_tiny_model(arch)
    assert find_decoder_layers(model) == (LAYER_PREFIX[arch], N_LAYERS)


@pytest.mark.parametrize("lpb", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_partition_covers_every_parameter_once(arch, lpb):
    model = make_tiny_model(arch)
    blocks = partition_model(model, layers_per_block=lpb, max_block_params=0)  # unbounded: one embed_head

    assert [b.name for b in blocks] == _expected_names(N_LAYERS, lpb)
    assert [b.index for b in blocks] == list(range(len(blocks)))
    for b in blocks:
        assert isinstance(b, BlockSpec) and b.tensors, b.name
        names = [t.name for t in b.tensors]
        assert names == sorted(names), f"{b.name} tensors not sorted"

    assigned = [t.name for b in blocks for t in b.tensors]
    params = dict(model.named_parameters())  # remove_duplicate=True: tied weights once
    assert len(assigned) == len(set(assigned))
    assert set(assigned) == set(params)
    total = sum(p.numel() for p in model.parameters())  # parameters() also dedups tied weights
    assert sum(b.numel for b in blocks) == total
    assert sum(b.nbytes for b in blocks) == total * 4  # float32

    # specs describe the real tensors
    for b in blocks:
        for t in b.tensors:
            assert t.shape == tuple(params[t.name].shape)
            assert t.dtype == "F32"

    # layer blocks hold exactly their layers; embed_head holds everything else
    prefix = LAYER_PREFIX[arch] + "."
    for b in blocks[:-1]:
        lo, _, hi = b.name[len("layers."):].partition("-")
        want = set(range(int(lo), int(hi or lo) + 1))
        got = {int(t.name[len(prefix):].split(".")[0]) for t in b.tensors}
        assert all(t.name.startswith(prefix) for t in b.tensors)
        assert got == want, b.name
    head = blocks[-1]
    assert head.name == "embed_head"
    assert not any(t.name.startswith(prefix) for t in head.tensors)
    head_names = {t.name for t in head.tensors}
    assert _param_name(model, model.get_input_embeddings().weight) in head_names
    out = model.get_output_embeddings().weight
    if out is model.get_input_embeddings().weight:
        assert len([n for n in head_names if "lm_head" in n]) == 0  # tied: counted once
    else:
        assert _param_name(model, out) in head_names


@pytest.mark.parametrize("arch", ARCHS)
def test_partition_is_deterministic_across_instances(arch):
    a = partition_model(make_tiny_model(arch, seed=0), 2)
    b = partition_model(make_tiny_model(arch, seed=5), 2)
    assert a == b


def test_tied_and_untied_embeddings():
    for arch, tied in [("llama", True), ("qwen2", True), ("gpt2", True), ("mistral", False), ("gpt_neox", False)]:
        model = make_tiny_model(arch)
        is_tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        assert is_tied == tied, arch


def test_bf16_partition_dtype():
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    blocks = partition_model(model)
    assert {t.dtype for b in blocks for t in b.tensors} == {"BF16"}
    assert sum(b.nbytes for b in blocks) == 2 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("lpb", [0, -1])
def test_layers_per_block_must_be_positive(lpb):
    with pytest.raises(ValueError):
        partition_model(make_tiny_model("llama"), layers_per_block=lpb)


def test_find_decoder_layers_without_config():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)])
            self.short = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(3)])
            self.head = nn.Linear(4, 10)

    toy = Toy()
    assert find_decoder_layers(toy) == ("blocks", 3)
    blocks = partition_model(toy, 2, max_block_params=0)
    assert [b.name for b in blocks] == ["layers.0-1", "layers.2", "embed_head"]
    head = {t.name for t in blocks[-1].tensors}
    assert {"embed.weight", "head.weight", "short.0.weight", "mixed.0.weight"} <= head

    with pytest.raises(ValueError):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_find_decoder_layers_prefers_config_length_and_outer_list():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            # an inner homogeneous list as long as the stack itself (think: experts)
            self.experts = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])

    class Cfg:
        num_hidden_layers = 3

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Cfg()
            self.longer = nn.ModuleList([nn.Linear(2, 2) for _ in range(5)])
            self.layers = nn.ModuleList([Layer() for _ in range(3)])

    assert find_decoder_layers(Model()) == ("layers", 3)


def test_dtype_strings():
    for st, dt in [("F32", torch.float32), ("BF16", torch.bfloat16), ("F16", torch.float16),
                   ("F64", torch.float64), ("I64", torch.int64), ("I32", torch.int32),
                   ("U8", torch.uint8), ("BOOL", torch.bool)]:
        assert torch_dtype_to_st(dt) == st
        assert st_dtype_to_torch(st) == dt
    with pytest.raises(ValueError):
        st_dtype_to_torch("F13")
    with pytest.raises(ValueError):
        torch_dtype_to_st(torch.complex64)


def test_spec_sizes():
    spec = BlockSpec(0, "layers.0", (TensorSpec("a", (2, 3), "BF16"), TensorSpec("b", (), "F32")))
    assert spec.numel == 7
    assert spec.nbytes == 2 * 3 * 2 + 4


# --------------------------------------------------------------------------------------------
# block access
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lpb", [1, 2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_block_round_trip_between_models(arch, lpb):
    src = make_tiny_model(arch, seed=1)
    _perturb(src)  # norms start at 1 and biases at 0 whatever the seed: make every tensor differ
    dst = make_tiny_model(arch, seed=0)
    blocks = partition_model(dst, lpb)
    assert blocks == partition_model(src, lpb)
    for spec in blocks:
        before = _snapshot(dst)
        sent = block_tensors(src, spec)
        assert list(sent) == [t.name for t in spec.tensors]
        for t in spec.tensors:
            v = sent[t.name]
            assert not v.requires_grad and v.is_contiguous() and tuple(v.shape) == t.shape
        load_block(dst, spec, sent)
        in_block = {t.name for t in spec.tensors}
        after = dict(dst.named_parameters())
        for name, p in after.items():
            if name in in_block:
                assert torch.equal(p, sent[name]), name
                assert not torch.equal(p, before[name]), name  # seeds differ, so it really changed
            else:
                assert torch.equal(p, before[name]), f"{name} changed when loading {spec.name}"
    # after loading every block the two models are identical
    for (n1, p1), (n2, p2) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


def test_load_into_tied_embeddings_updates_lm_head():
    src = make_tiny_model("llama", seed=1)
    dst = make_tiny_model("llama", seed=0)
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    spec = partition_model(dst)[-1]
    assert spec.name == "embed_head"
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits_before = dst(ids).logits
    load_block(dst, spec, block_tensors(src, spec))
    assert torch.equal(dst.lm_head.weight, src.model.embed_tokens.weight)
    assert dst.lm_head.weight is dst.model.embed_tokens.weight  # identity survives the load
    with torch.no_grad():
        logits_after = dst(ids).logits
    assert not torch.allclose(logits_before, logits_after)


def test_block_params_and_tensors_share_the_model():
    model = make_tiny_model("gpt2")
    spec = partition_model(model, 2)[0]
    params = block_params(model, spec)
    named = dict(model.named_parameters())
    assert [id(p) for p in params] == [id(named[t.name]) for t in spec.tensors]
    assert all(isinstance(p, nn.Parameter) for p in params)
    # a block's params can drive an optimizer over that block only
    opt = torch.optim.SGD(params, lr=0.1)
    before = _snapshot(model)
    model.train()
    loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
    loss.backward()
    opt.step()
    in_block = {t.name for t in spec.tensors}
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in in_block), name


def _valid_block(model, spec):
    return {k: v.clone() for k, v in block_tensors(model, spec).items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_load_block_rejects_bad_input(arch):
    model = make_tiny_model(arch)
    spec = partition_model(model)[1]
    before = _snapshot(model)
    name0 = spec.tensors[0].name

    bad_shape = _valid_block(model, spec)
    bad_shape[name0] = torch.zeros(tuple(d + 1 for d in spec.tensors[0].shape))
    with pytest.raises(ValueError, match="shape"):
        load_block(model, spec, bad_shape)

    transposed = _valid_block(model, spec)
    w = next(t for t in spec.tensors if len(t.shape) == 2 and t.shape[0] != t.shape[1])
    transposed[w.name] = transposed[w.name].t().contiguous()
    with pytest.raises(ValueError, match="shape"):
        load_block(model, spec, transposed)

    bad_dtype = _valid_block(model, spec)
    bad_dtype[name0] = bad_dtype[name0].to(torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        load_block(model, spec, bad_dtype)

    missing = _valid_block(model, spec)
    del missing[name0]
    with pytest.raises(ValueError, match="missing"):
        load_block(model, spec, missing)

    extra = _valid_block(model, spec)
    extra["not.a.param"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_block(model, spec, extra)

    # a tensor from another block is "extra" for this one
    other = partition_model(model)[0]
    mixed = _valid_block(model, spec)
    mixed.update(_valid_block(model, other))
    with pytest.raises(ValueError):
        load_block(model, spec, mixed)

    # nothing was written by any rejected load, even the valid tensors in a bad message
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_load_block_rejects_spec_of_another_model():
    llama = make_tiny_model("llama")
    gpt2 = make_tiny_model("gpt2")
    spec = partition_model(gpt2)[0]
    with pytest.raises(ValueError):
        load_block(llama, spec, block_tensors(gpt2, spec))
    with pytest.raises(ValueError):
        block_params(llama, spec)


# --------------------------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------------------------


def test_make_tiny_model_is_deterministic_and_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = make_tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)  # caller's RNG stream untouched
    b = make_tiny_model("llama", seed=7)
    c = make_tiny_model("llama", seed=8)
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_shape(arch):
    cfg = tiny_config(arch)
    assert cfg.num_hidden_layers == N_LAYERS
    assert cfg.vocab_size == BYTE_VOCAB_SIZE
    assert cfg.hidden_size == 64
    assert cfg.num_attention_heads == 4
    cfg2 = tiny_config(arch, vocab_size=300)
    assert cfg2.vocab_size == 300
    with pytest.raises(ValueError):
        tiny_config("nope")


def test_tiny_config_overrides():
    assert tiny_config("llama", num_hidden_layers=2).num_hidden_layers == 2
    assert tiny_config("gpt2", n_layer=2).num_hidden_layers == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_write_tiny_model_dir_loads_back(arch, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_tiny_model_dir(tmp_path / arch, arch=arch, seed=3)
    assert (path / "model.safetensors").is_file()
    assert (path / "config.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ref = make_tiny_model(arch, seed=3)
    loaded.eval()
    ref.eval()
    ids = torch.tensor([tok("Shall I compare thee to a summer's day?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)
    assert partition_model(loaded, 2) == partition_model(ref, 2)
    assert len(tok) == BYTE_VOCAB_SIZE
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    assert tok.decode(ids[0]) == "Shall I compare thee to a summer's day?"
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_write_tiny_model_dir_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_tiny_model_dir(tmp_path / "bf16", dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert next(loaded.parameters()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------
# tokenizer and corpus
# --------------------------------------------------------------------------------------------


def _ids(x):
    """apply_chat_template(tokenize=True) returns a list (transformers 4) or a BatchEncoding (5)."""
    return list(x["input_ids"]) if not isinstance(x, list) else x


def test_byte_tokenizer_round_trip():
    tok = make_byte_tokenizer()
    assert len(tok) == BYTE_VOCAB_SIZE == 259
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 256
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [257, 258]
    for text in [TINY_TEXT[:5000], "  leading spaces\tand\ttabs\n\n", "héllo wörld — ünïcödé 🙂 日本語", ""]:
        ids = tok(text)["input_ids"]
        assert len(ids) == len(text.encode("utf-8"))  # one token per byte, no bos added
        assert ids == list(text.encode("utf-8"))  # ...and token id == byte value
        assert tok.decode(ids) == text
    # special tokens are single tokens, never split into bytes
    ids = tok("a<|im_end|>b<|endoftext|>")["input_ids"]
    assert ids == [ord("a"), 258, ord("b"), 256]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert make_byte_tokenizer()("same")["input_ids"] == tok("same")["input_ids"]


def test_chat_template():
    tok = make_byte_tokenizer()
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who wrote the sonnets?"},
        {"role": "assistant", "content": "Shakespeare."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWho wrote the sonnets?<|im_end|>\n"
        "<|im_start|>assistant\nShakespeare.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert isinstance(prompt, str)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = _ids(tok.apply_chat_template(msgs, tokenize=True))
    assert ids == tok(text)["input_ids"]
    assert ids.count(257) == 3 and ids.count(258) == 3


def test_tiny_text():
    assert 30_000 <= len(TINY_TEXT.encode("utf-8")) <= 60_000
    assert TINY_TEXT.isascii()
    assert "Shall I compare thee to a summer's day?" in TINY_TEXT
    assert len(TINY_TEXT.split()) > 5000


def test_tiny_model_trains_on_corpus():
    """Sanity: a few steps on the corpus reduce the loss, so the demo pieces fit together."""
    tok = make_byte_tokenizer()
    model = make_tiny_model("llama", seed=0)
    model.train()
    ids = torch.tensor(tok(TINY_TEXT[:2048])["input_ids"]).view(8, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
