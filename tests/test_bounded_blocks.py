"""Blocks of bounded size: the partition splits a large vocabulary's embedding and head into row ranges, a visit
trains a row range with optimizer state for those rows only, and the loss never holds full-vocabulary logits for
the whole batch. Every element of every parameter belongs to exactly one block, on several architectures."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from fedcybgd.common.blocks import BlockSpec, block_tensors, load_block
from fedcybgd.common.eval import model_device
from fedcybgd.common.lm_loss import (
    HeadRows,
    causal_lm_loss,
    chunk_tokens,
    loss_from_hidden,
    output_head,
    uses_chunked_loss,
)
from fedcybgd.common.modeling import specs_from_json, specs_to_json
from fedcybgd.common.partition import partition_model, resolved_bound, row_pieces
from fedcybgd.common.tiny import TINY_ARCHS, make_tiny_model, tiny_config
from fedcybgd.training import VisitHyper, train_block
from fedcybgd.training.slices import block_trainables

HYPER = VisitHyper(lr=1e-2, steps=2, batch_size=2, seq_len=24, seed=3, eval_batches=1)


@pytest.fixture(scope="module")
def sequences() -> torch.Tensor:
    return torch.randint(0, 259, (8, 24), generator=torch.Generator().manual_seed(0))


def large_vocab_model(arch: str, vocab: int, tied: bool) -> nn.Module:
    """A tiny-depth model whose vocabulary dominates it, as in small real models (SmolLM2, Gemma 3)."""
    config = tiny_config(arch, vocab_size=vocab, tie_word_embeddings=tied)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config)


def covered_elements(model: nn.Module, blocks: list[BlockSpec]) -> dict[str, torch.Tensor]:
    """How many blocks hold each element of each parameter."""
    counts = {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in model.named_parameters()}
    for b in blocks:
        for t in b.tensors:
            view = counts[t.name] if t.rows is None else counts[t.name][t.rows[0]:t.rows[1]]
            view += 1
    return counts


# --------------------------------------------------------------------------------------------- partition


@pytest.mark.parametrize("bound", [None, 3000, 20000])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_element_in_exactly_one_block_and_no_block_over_the_bound(arch, bound):
    model = make_tiny_model(arch)
    blocks = partition_model(model, 1, bound)
    assert all((c == 1).all() for c in covered_elements(model, blocks).values())
    limit = resolved_bound(blocks, bound)
    layer_max = max(b.numel for b in blocks if b.name.startswith("layers."))
    assert limit == (layer_max if bound is None else bound)
    for b in blocks:
        if not b.name.startswith("layers."):
            assert b.numel <= limit, (b.name, b.numel, limit)
        for t in b.tensors:
            if t.rows is not None:
                assert b.name == f"{t.name}[{t.rows[0]}:{t.rows[1]}]" and len(b.tensors) == 1


@pytest.mark.parametrize(("arch", "tied"), [("llama", True), ("mistral", False), ("gpt_neox", False)])
def test_large_vocabulary_split_into_row_ranges_of_the_layer_size(arch, tied):
    model = large_vocab_model(arch, 4096, tied)  # embedding 4096 x 64 = 262k elements, a layer about 37k
    blocks = partition_model(model, 1)
    layer = max(b.numel for b in blocks if b.name.startswith("layers."))
    pieces = [b for b in blocks if b.sliced]
    assert pieces and all(b.numel <= layer for b in blocks)
    embedding = [b for b in pieces if "embed" in b.name]
    head = [b for b in pieces if "lm_head" in b.name or "embed_out" in b.name]
    assert len(embedding) == -(-4096 * 64 // layer)  # the fewest pieces that fit
    assert bool(head) != tied  # untied: the head is split too, separately from the embedding
    assert all((c == 1).all() for c in covered_elements(model, blocks).values())


def test_unbounded_partition_is_the_classic_one():
    model = large_vocab_model("llama", 4096, True)
    blocks = partition_model(model, 1, 0)
    assert [b.name for b in blocks][-1] == "embed_head" and not any(b.sliced for b in blocks)


def test_row_pieces_are_near_equal_and_respect_the_bound():
    spec = partition_model(large_vocab_model("mistral", 1000, False), 1, 0)[-1].tensors[0]
    assert spec.rows is None
    pieces = row_pieces(spec, 10_000)
    sizes = [p.shape[0] for p in pieces]
    assert sum(sizes) == spec.shape[0] and max(sizes) - min(sizes) <= 1
    assert all(p.numel <= 10_000 for p in pieces)
    assert row_pieces(spec, 1)[0].shape[0] == 1  # one row at least, whatever the bound


def test_a_parameter_that_cannot_be_split_is_refused_with_its_size():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.table = nn.Parameter(torch.zeros(100, 4))  # owned by no embedding or linear layer

    with pytest.raises(ValueError, match="table.weight|table"):
        partition_model(Odd(), 1)
    assert partition_model(Odd(), 1, 0)[-1].name == "embed_head"
    with pytest.raises(ValueError, match="max_block_params"):
        partition_model(Odd(), 1, -1)


def test_specs_with_rows_survive_json_and_load_block_writes_only_the_rows():
    model = large_vocab_model("mistral", 4096, False)
    blocks = partition_model(model, 1)
    assert specs_from_json(specs_to_json(blocks)) == blocks
    piece = next(b for b in blocks if b.sliced)
    (t,) = piece.tensors
    assert t.rows is not None
    before = dict(model.named_parameters())[t.name].detach().clone()
    values = {t.name: torch.full(t.shape, 7.0)}
    load_block(model, piece, values)
    after = dict(model.named_parameters())[t.name]
    assert torch.equal(after[t.rows[0]:t.rows[1]], values[t.name])
    outside = torch.ones(after.shape[0], dtype=torch.bool)
    outside[t.rows[0]:t.rows[1]] = False
    assert torch.equal(after[outside], before[outside])
    assert torch.equal(block_tensors(model, piece)[t.name], values[t.name])
    with pytest.raises(ValueError, match="shape"):
        load_block(model, piece, {t.name: torch.zeros(t.shape[0] + 1, *t.shape[1:])})


# --------------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chunked_loss_equals_the_models_own_loss(arch, sequences, monkeypatch):
    model = make_tiny_model(arch)
    assert uses_chunked_loss(model)
    ids = sequences[:4]
    own = model(input_ids=ids, labels=ids, use_cache=False).loss
    monkeypatch.setattr("fedcybgd.common.lm_loss.LOSS_CHUNK_ELEMENTS", 259 * 7)  # 7 tokens per chunk: many
    assert chunk_tokens(259) == 7
    ours = causal_lm_loss(model, ids)
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)


def test_chunked_loss_gradient_equals_the_full_one_and_ignores_masked_labels(sequences, monkeypatch):
    model = make_tiny_model("mistral")
    ids = sequences[:4]
    labels = ids.clone()
    labels[:, :10] = -100  # a prompt that does not count
    layer = model.model.layers[3].mlp.down_proj.weight
    layer.requires_grad_(True)
    model.lm_head.weight.requires_grad_(True)
    own = model(input_ids=ids, labels=labels, use_cache=False).loss
    own.backward()
    want = layer.grad.clone(), model.lm_head.weight.grad.clone()
    layer.grad, model.lm_head.weight.grad = None, None
    monkeypatch.setattr("fedcybgd.common.lm_loss.LOSS_CHUNK_ELEMENTS", 259 * 5)
    ours = causal_lm_loss(model, ids, labels)
    ours.backward()
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.grad, want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model.lm_head.weight.grad, want[1], rtol=1e-5, atol=1e-7)


def test_softcapped_logits_follow_the_config(sequences):
    model = make_tiny_model("llama")
    model.config.final_logit_softcapping = 0.05  # Gemma 2/3 style, small enough to matter on random weights
    hidden = model.base_model(input_ids=sequences[:2]).last_hidden_state
    capped = loss_from_hidden(model, hidden, sequences[:2])
    logits = torch.tanh(model.lm_head(hidden).float() / 0.05) * 0.05
    want = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 259), sequences[:2, 1:].reshape(-1))
    torch.testing.assert_close(capped, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- row ranges


@pytest.mark.parametrize(("arch", "which"), [("llama", "tied"), ("mistral", "embedding"), ("mistral", "head"),
                                             ("gpt2", "tied"), ("gpt_neox", "head")])
def test_training_a_row_range_gives_the_rows_of_the_full_gradient(arch, which, sequences):
    """The gradient a row range receives is the same rows of the gradient of the whole matrix, and the visit's
    optimizer holds tensors of the range's size only."""
    model = make_tiny_model(arch)
    head = output_head(model)
    assert head is not None
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, nn.Embedding)
    param = head.weight if which == "head" else embedding.weight
    name = next(n for n, p in model.named_parameters() if p is param)
    block = next(b for b in partition_model(model, 1, 3000) if b.sliced and b.tensors[0].name == name)
    (t,) = block.tensors
    assert t.rows is not None
    start, stop = t.rows
    ids = sequences[:4]

    param.requires_grad_(True)
    causal_lm_loss(model, ids).backward()
    assert param.grad is not None
    want = param.grad[start:stop].clone()
    param.grad = None
    param.requires_grad_(False)

    with block_trainables(model, block) as trainables:
        (rows,) = trainables.params
        assert rows.shape == (stop - start, param.shape[1]) and rows.untyped_storage().data_ptr() == \
            param.untyped_storage().data_ptr()
        assert (trainables.head_rows is not None) == (which in ("tied", "head"))
        loss = causal_lm_loss(model, ids, head_rows=trainables.head_rows)
        loss.backward()
        assert param.grad is None  # no full-size gradient
        torch.testing.assert_close(rows.grad, want, rtol=1e-5, atol=1e-7)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_gemma3_scaled_tied_embedding_rows(sequences):
    """Gemma 3 scales its embedding inside the embedding module and soft-caps its logits: a row range of its tied
    embedding gets the rows of the full gradient, and the chunked loss is the model's own."""
    config = AutoConfig.for_model("gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=1000,
                                  final_logit_softcapping=30.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert uses_chunked_loss(model)
    ids = sequences[:2]
    torch.testing.assert_close(causal_lm_loss(model, ids), model(input_ids=ids, labels=ids).loss.detach())
    param = model.get_input_embeddings().weight
    block = next(b for b in partition_model(model, 1) if b.sliced)
    (t,) = block.tensors
    assert t.rows == (0, 500)
    param.requires_grad_(True)
    causal_lm_loss(model, ids).backward()
    want = param.grad[:500].clone()
    param.grad = None
    param.requires_grad_(False)
    with block_trainables(model, block) as trainables:
        causal_lm_loss(model, ids, head_rows=trainables.head_rows).backward()
        torch.testing.assert_close(trainables.params[0].grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_row_range_visit_changes_only_its_rows(arch, sequences):
    model = make_tiny_model(arch, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for block in [b for b in partition_model(model, 1, 3000) if b.sliced][:3]:
        (t,) = block.tensors
        assert t.rows is not None
        result = train_block(model, block, sequences, HYPER)
        assert set(result.tensors) == {t.name} and result.tensors[t.name].shape == t.shape
        for name, p in model.named_parameters():
            changed = (p != before[name]).reshape(p.shape[0], -1).any(dim=1) if p.dim() else (p != before[name])
            if name != t.name:
                assert not changed.any(), name
            else:
                rows = changed.nonzero().flatten()
                assert len(rows) and rows.min() >= t.rows[0] and rows.max() < t.rows[1]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert torch.equal(result.tensors[t.name], block_tensors(model, block)[t.name].cpu())


def test_sliced_visits_are_deterministic(sequences):
    results = []
    for _ in range(2):
        model = make_tiny_model("mistral")
        block = next(b for b in partition_model(model, 1, 3000) if b.sliced and "lm_head" in b.name)
        results.append(train_block(model, block, sequences, HYPER).tensors)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_a_model_whose_logits_are_not_its_head_uses_its_own_loss(sequences):
    """An architecture that does something to the head's output the chunked loss does not know is found by the
    one-off check: it keeps the model's own loss, and a range of its head's rows cannot be trained."""
    model = make_tiny_model("mistral")
    model.lm_head.register_forward_hook(lambda module, args, output: output * 3.0)
    assert not uses_chunked_loss(model)
    ids = sequences[:2]
    assert torch.equal(causal_lm_loss(model, ids), model(input_ids=ids, labels=ids, use_cache=False).loss)
    rows = HeadRows(0, 10, model.lm_head.weight.detach()[:10])
    with pytest.raises(ValueError, match="head"):
        causal_lm_loss(model, ids, head_rows=rows)
    assert model_device(model).type == "cpu"


def test_config_of_a_model_of_any_shape_partitions_on_the_meta_device():
    config = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128256,
                                  tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = partition_model(model, 1)
    layer = blocks[0].numel
    assert max(b.numel for b in blocks) <= layer
    assert sum(b.numel for b in blocks) == sum(p.numel() for p in model.parameters())
