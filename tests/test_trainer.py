"""One visit of block coordinate descent (training/) and the shared loss evaluation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedcybgd.common.blocks import EMBED_HEAD, block_params, load_block
from fedcybgd.common.data import pack_sequences, tokenize_documents, visit_batches
from fedcybgd.common.eval import evaluate_loss as common_evaluate_loss
from fedcybgd.common.lm_loss import uses_chunked_loss
from fedcybgd.common.partition import partition_model
from fedcybgd.common.records import Document
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import TINY_TEXT, make_byte_tokenizer, make_tiny_model
from fedcybgd.training import (
    VisitHyper,
    VisitResult,
    evaluate_loss,
    initial_lora_adapter,
    train_block,
    train_full,
    train_lora,
)
from fedcybgd.training.layers import decoder_stack

torch.set_num_threads(1)

SEQ_LEN = 32


@pytest.fixture(scope="module")
def sequences() -> Sequences:
    ids = tokenize_documents([Document(text=TINY_TEXT[:8000])], make_byte_tokenizer())
    return pack_sequences(ids, SEQ_LEN)


def hyper(**kw) -> VisitHyper:
    base: dict[str, Any] = dict(lr=1e-2, steps=4, batch_size=4, seq_len=SEQ_LEN, seed=0)
    base.update(kw)
    return VisitHyper(**base)


def spec_named(model, name):
    return next(s for s in partition_model(model) if s.name == name)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_clean(model):
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------------------------- basics


def test_only_the_block_changes(sequences):
    model = make_tiny_model("llama")
    spec = spec_named(model, "layers.1")
    before = snapshot(model)
    res = train_block(model, spec, sequences, hyper())
    after = snapshot(model)
    block = set(spec.names)
    assert set(res.tensors) == block
    for name in after:
        if name in block:
            assert not torch.equal(before[name], after[name]), f"{name} was not trained"
        else:
            assert torch.equal(before[name], after[name]), f"{name} outside the block changed"
    # the result is the trained block, as independent CPU copies
    for name, t in res.tensors.items():
        assert t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32
        assert torch.equal(t, after[name])
    params = dict(model.named_parameters())
    next(iter(res.tensors.values())).add_(1.0)
    first = next(iter(res.tensors))
    assert torch.equal(params[first].detach(), after[first])  # no storage shared with the model
    assert_clean(model)


def test_loss_decreases_and_result_fields(sequences):
    model = make_tiny_model("llama")
    spec = spec_named(model, "layers.2")
    seen = []
    res = train_block(model, spec, sequences, hyper(steps=6), on_step=lambda i, loss: seen.append((i, loss)))
    assert isinstance(res, VisitResult)
    assert res.loss_after < res.loss_before
    assert [i for i, _ in seen] == list(range(6))
    assert all(isinstance(loss, float) and loss > 0 for _, loss in seen)
    assert res.peak_memory_bytes > 0
    assert res.seconds > 0
    assert res.samples == 6 * 4
    assert res.tokens == 6 * 4 * SEQ_LEN
    assert_clean(model)


def test_visit_is_bit_identical_when_repeated(sequences):
    results, step_losses = [], []
    for _ in range(2):
        model = make_tiny_model("llama", seed=3)
        losses: list[float] = []

        def on_step(i: int, loss: float, out: list[float] = losses) -> None:
            out.append(loss)

        results.append(train_block(model, spec_named(model, "layers.0"), sequences, hyper(seed=5),
                                   on_step=on_step))
        step_losses.append(losses)
    a, b = results
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert (a.loss_before, a.loss_after) == (b.loss_before, b.loss_after)
    assert step_losses[0] == step_losses[1]


def test_seed_changes_the_batches(sequences):
    outs = []
    for seed in (0, 1):
        model = make_tiny_model("llama")
        outs.append(train_block(model, spec_named(model, "layers.0"), sequences, hyper(seed=seed, steps=2)))
    assert any(not torch.equal(outs[0].tensors[k], outs[1].tensors[k]) for k in outs[0].tensors)


def test_zero_steps_changes_nothing(sequences):
    model = make_tiny_model("llama")
    spec = spec_named(model, "layers.3")
    before = snapshot(model)
    res = train_block(model, spec, sequences, hyper(steps=0))
    assert all(torch.equal(res.tensors[k], before[k]) for k in spec.names)
    assert res.loss_before == res.loss_after
    assert res.samples == 0 and res.tokens == 0


# ------------------------------------------------------------------------------------ precision, blocks


def test_bf16_block_uses_fp32_masters(sequences):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    spec = spec_named(model, "layers.1")
    before = snapshot(model)
    res = train_block(model, spec, sequences, hyper(steps=5))
    assert all(t.dtype == torch.bfloat16 for t in res.tensors.values())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert res.loss_after < res.loss_before
    after = snapshot(model)
    for name in after:
        assert torch.equal(before[name], after[name]) == (name not in spec.names), name
    assert_clean(model)


def test_bf16_master_accumulates_updates_below_bf16_resolution(sequences):
    # The RMSNorm weights start at exactly 1.0, where bf16 cannot represent 1 - 1e-3: stepping the
    # bf16 weights directly with lr=1e-3 would round every update away and leave them at 1.0. With
    # fp32 masters the updates accumulate and the rounded weights do move.
    assert torch.tensor(1.0 - 1e-3).bfloat16().item() == 1.0
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    spec = spec_named(model, "layers.1")
    norm = "model.layers.1.input_layernorm.weight"
    assert torch.all(dict(model.named_parameters())[norm] == 1.0)
    res = train_block(model, spec, sequences, hyper(steps=8, lr=1e-3))
    assert res.tensors[norm].dtype == torch.bfloat16
    assert torch.any(res.tensors[norm] != 1.0)


def test_bf16_visit_tracks_the_fp32_visit(sequences):
    # Same starting weights, trained once in bf16 (with masters) and once upcast to fp32: not bit-identical
    # (the bf16 forward/backward differ), but close.
    model16 = make_tiny_model("llama", dtype=torch.bfloat16)
    model32 = make_tiny_model("llama", dtype=torch.bfloat16).float()
    h = hyper(steps=3, lr=1e-3)
    r16 = train_block(model16, spec_named(model16, "layers.1"), sequences, h)
    r32 = train_block(model32, spec_named(model32, "layers.1"), sequences, h)
    for k, t in r16.tensors.items():
        assert torch.allclose(t.float(), r32.tensors[k], atol=2e-2, rtol=2e-2), k


def test_embed_head_block_of_tied_llama(sequences):
    model = make_tiny_model("llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    spec = spec_named(model, EMBED_HEAD)
    before = snapshot(model)
    res = train_block(model, spec, sequences, hyper(steps=5))
    assert res.loss_after < res.loss_before
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert set(res.tensors) == set(spec.names)
    assert "model.embed_tokens.weight" in res.tensors
    after = snapshot(model)
    for name in after:
        assert torch.equal(before[name], after[name]) == (name not in spec.names), name
    assert_clean(model)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2", "gpt_neox"])
def test_other_architectures(sequences, arch):
    model = make_tiny_model(arch)
    specs = partition_model(model)
    for spec in (specs[1], specs[-1]):
        before = snapshot(model)
        res = train_block(model, spec, sequences, hyper(steps=3))
        assert res.loss_after < res.loss_before, (arch, spec.name)
        after = snapshot(model)
        assert all(torch.equal(before[n], after[n]) for n in after if n not in spec.names)
        assert_clean(model)


def test_no_clipping_and_weight_decay_paths(sequences):
    outs = []
    for kw in (dict(max_grad_norm=0.0), dict(max_grad_norm=1e-3), dict(weight_decay=0.1)):
        model = make_tiny_model("llama")
        outs.append(train_block(model, spec_named(model, "layers.0"), sequences, hyper(steps=2, **kw)))
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(outs[0].tensors[k], outs[1].tensors[k])
    assert not torch.equal(outs[0].tensors[k], outs[2].tensors[k])


# ---------------------------------------------------------------------------------------- autograd scope


def test_autograd_records_nothing_below_the_block(sequences):
    model = make_tiny_model("llama")
    layers = model.model.layers
    trained = 2
    records: dict[str, list[tuple[bool, bool]]] = {}

    def hook(name):
        def fn(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            records.setdefault(name, []).append((out.requires_grad, out.grad_fn is not None))

        return fn

    handles = [model.model.embed_tokens.register_forward_hook(hook("embed"))]
    handles += [layer.register_forward_hook(hook(f"layers.{i}")) for i, layer in enumerate(layers)]
    try:
        train_block(model, spec_named(model, f"layers.{trained}"), sequences, hyper(steps=3))
    finally:
        for h in handles:
            h.remove()
    for name in ["embed"] + [f"layers.{i}" for i in range(trained)]:
        assert records[name], name
        assert all(rec == (False, False) for rec in records[name]), f"{name} was recorded by autograd"
    # sanity: the hooks do see autograd at and above the block during the training steps
    for name in [f"layers.{i}" for i in range(trained, len(layers))]:
        assert sum(rec == (True, True) for rec in records[name]) == 3, name


def test_saved_activations_only_from_the_block_up(sequences):
    """Autograd saves tensors for backward only in modules at or above the block."""
    model = make_tiny_model("llama")
    layers = model.model.layers
    saved_in: set[str] = set()
    current = []

    def pre(name):
        return lambda module, args: current.append(name)

    def post(module, args, output):
        current.pop()

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre(f"layers.{i}")))
        handles.append(layer.register_forward_hook(post))

    def pack(t):
        if current:
            saved_in.add(current[-1])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train_block(model, spec_named(model, "layers.2"), sequences, hyper(steps=1))
    finally:
        for h in handles:
            h.remove()
    assert saved_in == {"layers.2", "layers.3"}


# ------------------------------------------------------------------------------------------ bookkeeping


def test_state_restored_after_errors(sequences):
    model = make_tiny_model("llama")
    model.train()

    def boom(step, loss):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_block(model, spec_named(model, "layers.1"), sequences, hyper(), on_step=boom)
    assert_clean(model)
    assert model.training  # the caller's mode is restored


def test_non_finite_loss_raises(sequences):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        train_block(model, spec_named(model, "layers.1"), sequences, hyper())
    assert_clean(model)


def test_input_validation(sequences):
    model = make_tiny_model("llama")
    spec = spec_named(model, "layers.0")
    with pytest.raises(ValueError, match="seq_len"):
        train_block(model, spec, sequences, hyper(seq_len=SEQ_LEN + 1))
    with pytest.raises(ValueError):
        train_block(model, spec, sequences.ids.float(), hyper())
    with pytest.raises(ValueError):
        train_block(model, spec, sequences[:0], hyper())
    with pytest.raises(ValueError):
        train_block(model, spec, sequences, hyper(batch_size=0))


def test_requires_grad_preset_elsewhere_is_cleared(sequences):
    model = make_tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)  # HF default: everything trainable
    before = snapshot(model)
    spec = spec_named(model, "layers.3")
    train_block(model, spec, sequences, hyper(steps=2))
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in after if n not in spec.names)
    assert_clean(model)


# ---------------------------------------------------------------------------------------------- eval


def test_evaluate_loss_matches_manual_mean(sequences):
    model = make_tiny_model("llama")
    model.train()
    seqs = sequences.ids[:10]
    got = evaluate_loss(model, seqs, batch_size=4)  # batches of 4, 4, 2
    with torch.no_grad():
        model.eval()
        manual = sum(float(model(input_ids=seqs[i : i + 1], labels=seqs[i : i + 1]).loss) for i in range(10)) / 10
        model.train()
    assert got == pytest.approx(manual, rel=1e-5)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert evaluate_loss is common_evaluate_loss
    with pytest.raises(ValueError):
        evaluate_loss(model, seqs, 0)


def test_block_params_of_tied_spec_are_unique():
    model = make_tiny_model("llama")
    params = block_params(model, spec_named(model, EMBED_HEAD))
    assert len({id(p) for p in params}) == len(params)


# ------------------------------------------------------------------------------- block visit options


OPTIONS = [dict(checkpoint_above=True), dict(cache_block_inputs=True),
           dict(checkpoint_above=True, cache_block_inputs=True)]


def visit(model, spec, seqs, h, **options):
    losses = []
    res = train_block(model, spec, seqs, h, on_step=lambda i, loss: losses.append(loss), **options)
    return res, losses


def assert_close_visits(a, b, atol):
    (ra, la), (rb, lb) = a, b
    assert ra.tensors.keys() == rb.tensors.keys()
    for k in ra.tensors:
        assert ra.tensors[k].dtype == rb.tensors[k].dtype
        assert torch.allclose(ra.tensors[k].float(), rb.tensors[k].float(), atol=atol, rtol=0), k
    assert la == pytest.approx(lb, abs=atol)
    assert (ra.loss_before, ra.loss_after) == pytest.approx((rb.loss_before, rb.loss_after), abs=atol)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_options_match_the_plain_visit(sequences, arch, dtype):
    # 10 rows, 8 steps of 4: three local epochs, so the cache has rows to replay.
    seqs, h = sequences[:10], hyper(steps=8, lr=3e-3)
    for block in (1, 3, -1):  # a middle layer, the top layer, embed_head
        plain_model = make_tiny_model(arch, dtype=dtype)
        plain = visit(plain_model, partition_model(plain_model)[block], seqs, h)
        for options in OPTIONS:
            model = make_tiny_model(arch, dtype=dtype)
            spec = partition_model(model)[block]
            before = snapshot(model)
            got = visit(model, spec, seqs, h, **options)
            assert_close_visits(got, plain, atol=1e-5 if dtype == torch.float32 else 1e-2)
            after = snapshot(model)
            assert all(torch.equal(before[n], after[n]) for n in after if n not in spec.names), (arch, options)
            assert_clean(model)


def checked(model):
    """``model`` after the loss's one-off check of its head (two forward passes on a few tokens), so that counts of
    forward passes see the visit's alone."""
    uses_chunked_loss(model)
    return model


def count_calls(modules):
    counts = [0] * len(modules)

    def hook(i):
        def fn(module, args, output):
            counts[i] += 1
        return fn

    return counts, [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


def test_cache_skips_the_layers_below_on_recurring_rows(sequences):
    seqs, h = sequences[:8], hyper(steps=8)  # 2 steps per epoch: 4 epochs
    calls = {}
    variants: tuple[dict[str, Any], ...] = (dict(), dict(cache_block_inputs=True))
    for options in variants:
        model = checked(make_tiny_model("llama"))
        layers = model.model.layers
        counts, handles = count_calls([model.model.embed_tokens, *layers])
        try:
            train_block(model, spec_named(model, "layers.2"), seqs, h, **options)
        finally:
            for handle in handles:
                handle.remove()
        calls[bool(options)] = counts
    evals = 2 * h.eval_batches  # loss before and after: plain forward passes
    assert calls[False] == [h.steps + evals] * 5
    # epoch 1 (2 steps) runs the whole model and keeps the block's inputs; epochs 2-4 start at layer 2
    assert calls[True] == [2 + evals] * 3 + [h.steps + evals] * 2


def test_cache_changes_nothing_when_no_row_recurs(sequences):
    seqs, h = sequences[:40], hyper(steps=5)  # 20 rows used once each
    model = checked(make_tiny_model("llama"))
    counts, handles = count_calls([model.model.embed_tokens])
    try:
        res = train_block(model, spec_named(model, "layers.3"), seqs, h, cache_block_inputs=True)
    finally:
        handles[0].remove()
    assert counts == [h.steps + 2 * h.eval_batches]
    plain_model = checked(make_tiny_model("llama"))
    plain = train_block(plain_model, spec_named(plain_model, "layers.3"), seqs, h)
    assert all(torch.equal(res.tensors[k], plain.tensors[k]) for k in res.tensors)


class CountingModule(torch.nn.Module):
    def __init__(self, inner, counts, index):
        super().__init__()
        self.inner, self.counts, self.index = inner, counts, index

    def forward(self, x):
        self.counts[self.index] += 1
        return self.inner(x)


def saved_per_layer(model, train):
    """Elements autograd saves for backward inside each decoder layer while ``train()`` runs, and how many
    times each layer's MLP activation runs (module hooks are not run when checkpointing recomputes a layer,
    its modules' forward is)."""
    layers = model.model.layers
    calls = [0] * len(layers)
    for i, layer in enumerate(layers):
        layer.mlp.act_fn = CountingModule(layer.mlp.act_fn, calls, i)
    saved = [0] * len(layers)
    current: list[int] = []

    def enter(i):
        def fn(module, args):
            current.append(i)
        return fn

    def leave(module, args, output):
        current.pop()

    def pack(t):
        if current:
            saved[current[-1]] += t.numel()
        return t

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(enter(i)), layer.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            train()
    finally:
        for handle in handles:
            handle.remove()
    return saved, calls


def test_checkpointing_recomputes_the_layers_above_and_keeps_only_their_inputs(sequences):
    h = hyper(steps=3)
    runs = {}
    for ckpt in (False, True):
        model = checked(make_tiny_model("llama"))
        spec = spec_named(model, "layers.1")
        runs[ckpt] = saved_per_layer(model, lambda model=model, spec=spec, ckpt=ckpt:
                                     train_block(model, spec, sequences, h, checkpoint_above=ckpt))
        assert_clean(model)
        assert all("forward" not in vars(layer) for layer in model.model.layers)  # the wrapping is undone
    (plain_saved, plain_calls), (ckpt_saved, ckpt_calls) = runs[False], runs[True]
    evals = 2 * h.eval_batches
    assert plain_calls == [h.steps + evals] * 4
    assert ckpt_calls == [h.steps + evals] * 2 + [2 * h.steps + evals] * 2  # layers 2, 3 run again in backward
    assert plain_saved[0] == ckpt_saved[0] == 0
    assert plain_saved[1] == ckpt_saved[1] > 0  # the block itself is not checkpointed
    hidden = h.batch_size * SEQ_LEN * 64
    for i in (2, 3):
        # a checkpoint keeps its inputs (hidden states, rotary cos/sin, position ids) instead of activations
        assert ckpt_saved[i] <= h.steps * (hidden + 2 * SEQ_LEN * 16 + SEQ_LEN) < plain_saved[i] / 4


def test_decoder_stack_is_known_only_where_replay_is_exact():
    for arch in ("llama", "qwen2", "mistral", "gpt2", "gpt_neox"):
        model = make_tiny_model(arch)
        stack = decoder_stack(model)
        assert stack is not None and len(stack.layers) == 4, arch
    model = make_tiny_model("llama")
    # e.g. logit soft-capping between head and loss: not in the table. (transformers types model_type
    # a ClassVar; here one instance's config claims another architecture on purpose.)
    model.config.model_type = "gemma2"  # type: ignore[misc]
    assert decoder_stack(model) is None


# ---------------------------------------------------------------------------------------- full visit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_train_full_trains_every_parameter_and_splits_into_blocks(sequences, dtype):
    model = make_tiny_model("llama", dtype=dtype)
    before = snapshot(model)
    res = train_full(model, sequences, hyper(steps=5, lr=3e-3))
    assert res.loss_after < res.loss_before
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in after), "a parameter was not trained"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, and listed once
    for lpb in (1, 2):
        specs = partition_model(model, lpb)
        assert set(res.tensors) == {n for s in specs for n in s.names}
        fresh = make_tiny_model("llama", dtype=dtype)
        for spec in specs:
            load_block(fresh, spec, {n: res.tensors[n] for n in spec.names})
        assert all(torch.equal(p, after[n]) for n, p in fresh.named_parameters())
    for t in res.tensors.values():
        assert t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous()
    assert res.samples == 5 * 4 and res.tokens == 5 * 4 * SEQ_LEN
    assert_clean(model)


def test_train_full_is_deterministic_and_follows_lr_at(sequences):
    runs = []
    for lr_at in (None, None, lambda step: 1e-2 * (step + 1)):
        model = make_tiny_model("llama")
        runs.append(train_full(model, sequences, hyper(steps=3), lr_at=lr_at))
    same = [all(torch.equal(runs[0].tensors[k], r.tensors[k]) for k in r.tensors) for r in runs[1:]]
    assert same == [True, False]
    # lr_at(step) == hyper.lr for every step is the constant-lr visit, bit for bit
    model = make_tiny_model("llama")
    const = train_full(model, sequences, hyper(steps=3), lr_at=lambda step: 1e-2)
    assert all(torch.equal(runs[0].tensors[k], const.tensors[k]) for k in const.tensors)


# ---------------------------------------------------------------------------------------------- LoRA


def modules_and_state(model):
    return ({n: type(m) for n, m in model.named_modules()}
            | {"config": model.config.to_dict(), "attrs": set(vars(model))},
            {k: v.clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_trains_an_adapter_and_leaves_the_model_as_it_was(sequences, dtype):
    model = make_tiny_model("llama", dtype=dtype)
    types, state = modules_and_state(model)
    res = train_lora(model, sequences, hyper(steps=6, lr=1e-2), rank=4, alpha=8)
    assert res.loss_after < res.loss_before
    types_after, state_after = modules_and_state(model)
    assert types_after == types
    assert state_after.keys() == state.keys() and all(torch.equal(state[k], state_after[k]) for k in state)
    assert not hasattr(model, "peft_config") and model.lm_head.weight is model.model.embed_tokens.weight
    assert_clean(model)
    # names: the adapted module's name in the model + lora_A/lora_B, nothing of peft's wrapping
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {f"model.layers.{i}.{part}.{proj}.{ab}.weight"
                for i in range(4) for proj in projections for ab in ("lora_A", "lora_B")
                for part in (("self_attn",) if proj in projections[:4] else ("mlp",))}
    assert set(res.tensors) == expected
    for name, t in res.tensors.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert t.shape[0 if ".lora_A." in name else 1] == 4  # rank 4
    assert any(torch.count_nonzero(t) for n, t in res.tensors.items() if ".lora_B." in n)  # B left zero


def test_lora_adapter_round_trip_and_determinism(sequences):
    model = make_tiny_model("llama")
    start = initial_lora_adapter(model, rank=4)
    assert all(torch.count_nonzero(t) == 0 for n, t in start.items() if ".lora_B." in n)
    h = hyper(steps=4, lr=1e-2)
    first = train_lora(model, sequences, h, rank=4)
    again = train_lora(model, sequences, h, rank=4, adapter=start)  # the same start, given explicitly
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    eval_rows = torch.cat(visit_batches(len(sequences), h.batch_size, h.eval_batches, h.seed))
    base_loss = evaluate_loss(model, sequences[eval_rows], h.batch_size)
    assert first.loss_before == pytest.approx(base_loss, rel=1e-6)  # B = 0: the adapter starts as a no-op
    # continuing from the trained adapter starts where the last visit ended (same batches: same seed)
    second = train_lora(model, sequences, h, rank=4, adapter=first.tensors)
    assert second.loss_before == pytest.approx(first.loss_after, rel=1e-5)
    assert second.loss_after < first.loss_after
    other_seed = train_lora(model, sequences, h, rank=4, init_seed=1)
    assert not all(torch.equal(first.tensors[k], other_seed.tensors[k]) for k in first.tensors)


def test_lora_target_modules_and_adapter_validation(sequences):
    model = make_tiny_model("llama")
    res = train_lora(model, sequences, hyper(steps=1), rank=2, target_modules=["q_proj", "v_proj"])
    assert {n.split(".")[-3] for n in res.tensors} == {"q_proj", "v_proj"}
    bad = dict(res.tensors)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="adapter names"):
        train_lora(model, sequences, hyper(steps=1), rank=2, target_modules=["q_proj", "v_proj"], adapter=bad)
    wrong_rank = {k: torch.zeros(t.shape[0] + 1, *t.shape[1:]) for k, t in res.tensors.items()}
    with pytest.raises(ValueError, match="shape"):
        train_lora(model, sequences, hyper(steps=1), rank=2, target_modules=["q_proj", "v_proj"], adapter=wrong_rank)
    with pytest.raises(ValueError):  # peft: target modules not found
        train_lora(model, sequences, hyper(steps=1), target_modules=["no_such_proj"])
    assert "peft_config" not in vars(model)
    assert_clean(model)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen2"])
def test_lora_other_architectures(sequences, arch):
    model = make_tiny_model(arch)
    _, state = modules_and_state(model)
    res = train_lora(model, sequences, hyper(steps=5, lr=1e-2))
    assert res.loss_after < res.loss_before
    assert res.tensors and all(".lora_A.weight" in n or ".lora_B.weight" in n for n in res.tensors)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
