"""Differential privacy inside a visit (``training/privacy.py``): per-example gradients clipped to C, a private
visit without noise and with C out of reach equals the ordinary visit, Poisson batches from secret generators,
noise of the stated scale, the client-level update clipping, and the memory planner's private visits."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch

from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.data import pack_sequences, tokenize_documents
from fedcybgd.common.lm_loss import causal_lm_loss
from fedcybgd.common.modeling import model_from_config
from fedcybgd.common.partition import partition_model
from fedcybgd.common.records import Document
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import TINY_TEXT, make_byte_tokenizer, make_tiny_model, tiny_config
from fedcybgd.training import (
    RecordPrivacy,
    UpdatePrivacy,
    VisitHyper,
    poisson_batches,
    privatize_update,
    train_block,
)
from fedcybgd.training.loop import cpu_copies, visit_rows
from fedcybgd.training.planner import PlanSettings, plan_visits, simulate_visit
from fedcybgd.training.privacy import ClippedGradSum, clipped_example_grads, secret_generator
from fedcybgd.training.slices import block_trainables

torch.set_num_threads(1)

SEQ_LEN = 32
BOUND = 4000  # splits the tiny model's tied embedding into row ranges (each also rows of the head)


@pytest.fixture(scope="module")
def sequences() -> Sequences:
    """Plain packed text: no labels, so every row carries loss on the same number of tokens."""
    ids = tokenize_documents([Document(text=TINY_TEXT[:8000])], make_byte_tokenizer())
    return pack_sequences(ids, SEQ_LEN)


def hyper(**kw: Any) -> VisitHyper:
    base: dict[str, Any] = dict(lr=1e-2, steps=3, batch_size=4, seq_len=SEQ_LEN, seed=0, max_grad_norm=0.0)
    base.update(kw)
    return VisitHyper(**base)


def spec_of(model, bound: int, pick: str):
    specs = partition_model(model, 1, bound)
    return next(s for s in specs if (s.sliced if pick == "sliced" else s.name == pick))


def total_norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])))


# ------------------------------------------------------------------------------------------------ clipping


@pytest.mark.parametrize("pick", ["layers.1", "sliced"])
def test_clipped_per_example_gradients_have_norm_at_most_c(sequences, pick):
    model = make_tiny_model("llama")
    spec = spec_of(model, BOUND, pick)
    rows = [torch.tensor([r]) for r in range(6)]
    with block_trainables(model, spec) as trainables:
        params = trainables.params
        for p in params:
            p.requires_grad_(True)

        def loss_of(row: torch.Tensor):
            return lambda: causal_lm_loss(model, sequences.ids[row], head_rows=trainables.head_rows)

        raw = clipped_example_grads(params, [loss_of(r) for r in rows], clip_norm=1e9)  # nothing clipped
        norms = sorted(n for _, n in raw)
        clip = norms[len(norms) // 2]  # about half of them are clipped
        clipped = clipped_example_grads(params, [loss_of(r) for r in rows], clip_norm=clip)
    assert all(p.grad is None for p in params)  # each example's gradient was dropped once added
    for (grads, norm), (raw_grads, raw_norm) in zip(clipped, raw, strict=True):
        assert norm == pytest.approx(raw_norm, rel=1e-5)
        assert norm == pytest.approx(total_norm(raw_grads), rel=1e-5)
        assert total_norm(grads) <= clip * (1 + 1e-5)
        factor = min(1.0, clip / (raw_norm + 1e-6))
        for g, r in zip(grads, raw_grads, strict=True):
            torch.testing.assert_close(g, r * factor, rtol=1e-5, atol=1e-9)
    assert any(n > clip * 1.01 for _, n in raw)
    # a step's gradient without noise: the sum of the clipped gradients over the expected batch size
    with block_trainables(model, spec) as trainables:
        for p in trainables.params:
            p.requires_grad_(True)
        step = ClippedGradSum(trainables.params, clip)
        for r in rows:
            causal_lm_loss(model, sequences.ids[r], head_rows=trainables.head_rows).backward()
            step.add_example()
        mean = step.noisy_mean(0.0, expected_batch_size=2.5, generator=secret_generator())
    for i, m in enumerate(mean):
        torch.testing.assert_close(m, sum(grads[i] for grads, _ in clipped) / 2.5, rtol=1e-5, atol=1e-8)


def test_noise_has_the_stated_scale():
    """With no example (zero gradients), the step's gradient is the noise alone: std sigma * C / (q n)."""
    param = torch.nn.Parameter(torch.zeros(200_000))
    sums = ClippedGradSum([param], clip_norm=0.5)
    (grad,) = sums.noisy_mean(noise_multiplier=2.0, expected_batch_size=10.0, generator=secret_generator())
    assert float(grad.std()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.02)
    assert abs(float(grad.mean())) < 0.01 * 0.1
    sums.reset()
    (quiet,) = sums.noisy_mean(noise_multiplier=0.0, expected_batch_size=10.0, generator=secret_generator())
    assert torch.count_nonzero(quiet) == 0


# ------------------------------------------------------------------------------------------------ equality


@pytest.mark.parametrize(("bound", "pick"), [(BOUND, "layers.1"), (BOUND, "sliced"), (0, "embed_head")])
def test_without_noise_and_clipping_a_private_visit_is_the_ordinary_visit(sequences, bound, pick):
    """sigma = 0, C out of reach, the ordinary visit's batches and q n = batch_size: the mean of per-example
    gradients is the batch's gradient (every row has as many loss tokens), so the two visits agree. AdamW's eps is
    raised from 1e-8 so that its step depends on the gradient's scale: a wrong divisor would show."""
    plain_hyper = hyper(eps=1e-4)
    ordinary_model = make_tiny_model("llama")
    spec = spec_of(ordinary_model, bound, pick)
    start = cpu_copies(block_tensors(ordinary_model, spec))
    ordinary = train_block(ordinary_model, spec, sequences, plain_hyper)

    private_model = make_tiny_model("llama")
    privacy = RecordPrivacy(noise_multiplier=0.0, clip_norm=1e9, sample_rate=plain_hyper.batch_size / len(sequences))
    losses: list[tuple[int, float]] = []
    private = train_block(private_model, spec, sequences, dataclasses.replace(plain_hyper, privacy=privacy),
                          privacy_batches=visit_rows(sequences, plain_hyper)[1],
                          on_step=lambda i, loss: losses.append((i, loss)))
    assert private.tensors.keys() == ordinary.tensors.keys()
    for name, t in ordinary.tensors.items():
        update = t - start[name]
        assert float(update.norm()) > 0, f"{name} was not trained"
        assert float((private.tensors[name] - t).norm()) <= 1e-4 * float(update.norm()), name
        torch.testing.assert_close(private.tensors[name], t, rtol=1e-4, atol=1e-5)
    assert (private.samples, private.tokens) == (ordinary.samples, ordinary.tokens)
    assert private.loss_before == ordinary.loss_before  # the same evaluation batches
    assert private.loss_after == pytest.approx(ordinary.loss_after, rel=1e-4)
    assert [i for i, _ in losses] == [0, 1, 2] and all(math.isfinite(v) for _, v in losses)
    assert all(not p.requires_grad and p.grad is None for p in private_model.parameters())


def test_cache_block_inputs_is_ignored_by_a_private_visit(sequences):
    results = []
    for cache in (False, True):
        model = make_tiny_model("llama")
        h = hyper(steps=2, privacy=RecordPrivacy(0.0, 1e9, 0.05))
        batches = [torch.tensor([0, 3, 5]), torch.tensor([3, 5, 7])]  # rows recur: the cache would keep them
        results.append(train_block(model, spec_of(model, BOUND, "layers.2"), sequences, h,
                                   privacy_batches=batches, cache_block_inputs=cache))
    assert all(torch.equal(results[0].tensors[k], results[1].tensors[k]) for k in results[0].tensors)


def test_bf16_private_visit_steps_through_fp32_masters(sequences):
    model = make_tiny_model("llama", dtype=torch.bfloat16)
    spec = spec_of(model, BOUND, "layers.0")
    start = cpu_copies(block_tensors(model, spec))
    res = train_block(model, spec, sequences, hyper(privacy=RecordPrivacy(1.0, 0.5, 0.02)))
    for t in res.tensors.values():
        assert t.dtype == torch.bfloat16 and bool(torch.isfinite(t.float()).all())
    assert any(not torch.equal(res.tensors[n], start[n]) for n in res.tensors)


# ------------------------------------------------------------------------------------------------ sampling, noise


def test_poisson_batches_sample_each_row_with_probability_q():
    n, q, steps = 1000, 0.05, 200
    batches = poisson_batches(n, q, steps, secret_generator())
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(batches) == steps
    assert float(sizes.mean()) == pytest.approx(q * n, abs=2.5)  # the mean's std is about 0.5
    assert float(sizes.std()) == pytest.approx(math.sqrt(n * q * (1 - q)), rel=0.25)
    assert len({int(s) for s in sizes}) > 5  # sizes vary
    for b in batches:
        assert b.dtype == torch.long and bool((b >= 0).all() and (b < n).all())
        assert torch.equal(b, torch.unique(b))  # ascending, no row twice
    assert sum(len(b) for b in poisson_batches(50, 0.01, 20, secret_generator())) < 50 * 20  # empties allowed
    other = poisson_batches(n, q, steps, secret_generator())
    assert any(not torch.equal(a, b) for a, b in zip(batches, other, strict=True))
    for bad in [(0, 0.5, 1), (10, 0.0, 1), (10, 1.5, 1), (10, 0.5, -1)]:
        with pytest.raises(ValueError):
            poisson_batches(*bad, secret_generator())


def test_noisy_private_visits_differ_and_count_what_they_drew(sequences):
    outs, reported = [], []
    for _ in range(2):
        model = make_tiny_model("llama")
        seen: list[float] = []

        def on_step(i: int, loss: float, out: list[float] = seen) -> None:
            out.append(loss)

        outs.append(train_block(model, spec_of(model, BOUND, "layers.1"), sequences,
                                hyper(steps=2, privacy=RecordPrivacy(1.0, 0.1, 0.02)), on_step=on_step))
        reported.append(seen)
    a, b = outs
    assert any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert all(len(r) == 2 for r in reported)
    for res in outs:
        assert res.tokens == res.samples * SEQ_LEN
    # given batches: samples are their sizes, an empty batch still steps (noise only) and reports nan
    model = make_tiny_model("llama")
    losses: list[float] = []
    res = train_block(model, spec_of(model, BOUND, "layers.1"), sequences,
                      hyper(steps=3, privacy=RecordPrivacy(1.0, 0.1, 0.02)),
                      privacy_batches=[torch.tensor([1, 2, 3]), torch.tensor([], dtype=torch.long),
                                       torch.tensor([4, 9, 11, 12, 13])],
                      on_step=lambda i, loss: losses.append(loss))
    assert (res.samples, res.tokens) == (8, 8 * SEQ_LEN)
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2])


def test_privacy_settings_are_checked(sequences):
    for bad in [(-1.0, 1.0, 0.1), (1.0, 0.0, 0.1), (1.0, 1.0, 0.0), (1.0, 1.0, 1.1), (math.nan, 1.0, 0.1)]:
        with pytest.raises(ValueError):
            RecordPrivacy(*bad)
    for bad_update in [(-1.0, 1.0), (1.0, 0.0), (1.0, math.inf)]:
        with pytest.raises(ValueError):
            UpdatePrivacy(*bad_update)
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="privacy_batches"):  # batches given to an ordinary visit
        train_block(model, spec_of(model, BOUND, "layers.0"), sequences, hyper(),
                    privacy_batches=[torch.tensor([0])] * 3)


# ------------------------------------------------------------------------------------------------ update level


def update_pair(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(30, 20, generator=g).to(dtype), "b": torch.randn(50, generator=g).to(dtype)}
    trained = {k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(dtype) for k, v in start.items()}
    return start, trained


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_privatize_update_clips_the_update_and_keeps_dtypes(dtype):
    start, trained = update_pair(dtype)
    true_norm = total_norm([trained[k].float() - start[k].float() for k in start])
    same, norm = privatize_update(start, trained, UpdatePrivacy(0.0, 1e9), secret_generator())
    assert norm == pytest.approx(true_norm, rel=1e-5)
    for k in start:
        assert same[k].dtype == dtype
        torch.testing.assert_close(same[k], trained[k])
    clip = true_norm / 4
    clipped, norm = privatize_update(start, trained, UpdatePrivacy(0.0, clip), secret_generator())
    assert norm == pytest.approx(true_norm, rel=1e-5)
    if dtype == torch.float32:
        assert total_norm([clipped[k] - start[k] for k in start]) <= clip * (1 + 1e-4)
    else:  # rounding to bf16 moves each value by at most half a unit in the last place of the result
        assert total_norm([clipped[k].float() - start[k].float() for k in start]) == pytest.approx(clip, rel=0.02)


def test_privatize_update_adds_noise_of_std_sigma_s():
    start = {"w": torch.zeros(100_000)}
    noisy, norm = privatize_update(start, {"w": torch.zeros(100_000)}, UpdatePrivacy(3.0, 0.01), secret_generator())
    assert norm == 0.0
    assert float(noisy["w"].std()) == pytest.approx(0.03, rel=0.02)
    again, _ = privatize_update(start, {"w": torch.zeros(100_000)}, UpdatePrivacy(3.0, 0.01), secret_generator())
    assert not torch.equal(noisy["w"], again["w"])
    with pytest.raises(ValueError):
        privatize_update(start, {"v": torch.zeros(100_000)}, UpdatePrivacy(3.0, 0.01), secret_generator())


# ------------------------------------------------------------------------------------------------ memory planner


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planner_counts_the_private_visit_as_real_tensors_do(dtype):
    settings = PlanSettings(batch_size=2, seq_len=64, dtype=dtype, max_block_params=BOUND, privacy=True)
    counted = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        model = model_from_config(tiny_config("llama"), dtype, device)
        counted[device] = [simulate_visit(model, spec, settings) for spec in partition_model(model, 1, BOUND)]
    for cpu, meta in zip(counted["cpu"], counted["meta"], strict=True):
        assert meta.state_bytes == cpu.state_bytes
        assert meta.peak_bytes == pytest.approx(cpu.peak_bytes, rel=0.02)


def test_planner_adds_the_fp32_sums_and_one_row_of_activations():
    config = tiny_config("llama")
    plain = PlanSettings(batch_size=8, seq_len=256, dtype=torch.bfloat16)
    ordinary = plan_visits(config, plain)
    private = plan_visits(config, dataclasses.replace(plain, privacy=True))
    for o, p in zip(ordinary, private, strict=True):
        assert p.trained_bytes == o.trained_bytes + 4 * o.params  # the fp32 sums of clipped gradients
        assert p.weights_bytes == o.weights_bytes
    assert private[0].activation_bytes < ordinary[0].activation_bytes  # one row backpropagated, not eight


def test_full_and_lora_visits_run_dp_sgd_through_the_shared_loop(sequences):
    """FedAvg-full and FedLoRA visits take the same private path (the loop is shared): every parameter (or the
    adapter, from B = 0) trained, the base model left as it was by a LoRA visit."""
    from fedcybgd.training import train_full, train_lora

    private = hyper(steps=2, privacy=RecordPrivacy(0.5, 1.0, 0.05))
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = train_full(model, sequences, private)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(torch.isfinite(t).all() for t in full.tensors.values())
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = train_lora(model, sequences, private, rank=4, alpha=8)
    assert lora.tensors and all("lora_" in k for k in lora.tensors)
    assert any(float(t.abs().max()) > 0 for k, t in lora.tensors.items() if "lora_B" in k), "B moved off zero"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the base stays frozen"
