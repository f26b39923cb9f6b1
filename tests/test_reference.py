"""Single-process references (server/reference.py): the centralized full fine-tuning and the
block-cyclic (BAdam-style) baselines, on a tiny model."""
from __future__ import annotations

import pytest
import torch

from fedcybgd.common.data import pack_sequences, tokenize_documents
from fedcybgd.common.eval import evaluate_loss
from fedcybgd.common.partition import partition_model
from fedcybgd.common.records import Document
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import TINY_TEXT, make_byte_tokenizer, make_tiny_model
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.reference import lr_of_step, run_block_cyclic, run_centralized_full, run_reference
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
from fedcybgd.training import VisitHyper, train_full

torch.set_num_threads(1)

TRAINING = TrainingConfig(local_steps=3, batch_size=4, seq_len=32)
# Every block in every cycle (the paper's scheme): the tests below count visits per cycle.
SCHEDULE = ScheduleConfig(cycles=2, order="random", lr=1e-2, lr_schedule="cosine", warmup_visits=2, seed=3,
                          embed_head_every=1)


@pytest.fixture(scope="module")
def pooled() -> Sequences:
    ids = tokenize_documents([Document(text=TINY_TEXT[:2000])], make_byte_tokenizer())
    return pack_sequences(ids, TRAINING.seq_len)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class TrainingRows:
    """Records the rows of ``pooled`` every training forward pass (grad enabled) feeds the model (seen by its input
    embedding: the loss runs the model's base model, not its top-level forward)."""

    def __init__(self, model, pooled):
        self.rows: list[int] = []
        index = {tuple(row.tolist()): i for i, row in enumerate(pooled.ids)}

        def hook(module, args, kwargs):
            if torch.is_grad_enabled():
                ids = kwargs.get("input", args[0] if args else None)
                self.rows += [index[tuple(row.tolist())] for row in ids]  # KeyError: not a row of the data

        self.handle = model.get_input_embeddings().register_forward_pre_hook(hook, with_kwargs=True)


def schedule_of(model, layers_per_block=1) -> CycleSchedule:
    return CycleSchedule(len(partition_model(model, layers_per_block)), SCHEDULE)


# --------------------------------------------------------------------------------------- centralized


def test_lr_of_step_follows_the_visit_schedule():
    schedule = CycleSchedule(5, SCHEDULE)
    lrs = [lr_of_step(schedule, 3, s) for s in range(3 * schedule.total_rounds + 4)]
    assert lrs[:3] == [schedule.lr_of(0)] * 3 and lrs[3:6] == [schedule.lr_of(1)] * 3
    assert lrs[3 * 7] == schedule.lr_of(7)
    assert lrs[-1] == schedule.lr_of(schedule.total_rounds - 1)  # past the budget: the last visit's
    with pytest.raises(ValueError):
        lr_of_step(schedule, 0, 1)


def test_centralized_full_trains_every_parameter_on_the_asked_tokens(pooled):
    model = make_tiny_model("llama")
    schedule = schedule_of(model)
    assert schedule.total_rounds == 10  # 5 blocks x 2 cycles
    before, loss0 = snapshot(model), evaluate_loss(model, pooled, 8)
    rows, losses = TrainingRows(model, pooled), []
    res = run_centralized_full(model, pooled, TRAINING, schedule, on_step=lambda i, loss: losses.append(loss))
    rows.handle.remove()
    steps = schedule.total_rounds * TRAINING.local_steps  # the FedCyBGD run's budget
    assert len(losses) == steps and len(rows.rows) == steps * TRAINING.batch_size
    assert res.samples == steps * TRAINING.batch_size and res.tokens == res.samples * TRAINING.seq_len
    # epochs over the pooled data: every row once before any row twice
    first_epoch = rows.rows[: len(pooled)]
    assert sorted(first_epoch) == list(range(len(pooled)))
    after = snapshot(model)
    assert all(not torch.equal(before[n], after[n]) for n in after), "a parameter was not trained"
    assert all(torch.equal(res.tensors[n], after[n]) for n in res.tensors)
    assert res.loss_after < res.loss_before
    assert evaluate_loss(model, pooled, 8) < loss0


def test_centralized_full_budget_and_schedule(pooled):
    model = make_tiny_model("llama")
    schedule = schedule_of(model)
    rows = TrainingRows(model, pooled)
    run_centralized_full(model, pooled, TRAINING, schedule, total_steps=7)
    rows.handle.remove()
    assert len(rows.rows) == 7 * TRAINING.batch_size
    # the same run by hand: train_full with the per-step learning rate, bit for bit
    by_hand = make_tiny_model("llama")
    hyper = VisitHyper(lr=schedule.lr_of(0), steps=7, batch_size=TRAINING.batch_size, seq_len=TRAINING.seq_len,
                       seed=SCHEDULE.seed, max_grad_norm=TRAINING.max_grad_norm)
    train_full(by_hand, pooled, hyper, lr_at=lambda s: schedule.lr_of(s // TRAINING.local_steps))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), by_hand.parameters(), strict=True))
    # and the learning-rate schedule matters: a constant lr ends elsewhere
    constant = make_tiny_model("llama")
    train_full(constant, pooled, hyper)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), constant.parameters(), strict=True))


# -------------------------------------------------------------------------------------- block-cyclic


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_block_cyclic_changes_one_block_per_phase(pooled, layers_per_block):
    model = make_tiny_model("llama")
    specs = partition_model(model, layers_per_block)
    schedule = schedule_of(model, layers_per_block)
    before_all, loss0 = snapshot(model), evaluate_loss(model, pooled, 8)
    state = {"prev": snapshot(model)}
    visited = []

    def on_visit(round_, spec, result):
        now = snapshot(model)
        changed = {n for n in now if not torch.equal(now[n], state["prev"][n])}
        assert changed == set(spec.names), f"round {round_}: {sorted(changed - set(spec.names))[:3]}"
        assert result.samples == TRAINING.local_steps * TRAINING.batch_size
        assert spec.index == schedule.block_of(round_)
        visited.append(spec.index)
        state["prev"] = now

    rows = TrainingRows(model, pooled)
    run_block_cyclic(model, pooled, layers_per_block, SCHEDULE, TRAINING, on_visit=on_visit)
    rows.handle.remove()
    n = len(specs)
    assert len(visited) == schedule.total_rounds == n * SCHEDULE.cycles
    assert all(sorted(visited[c * n:(c + 1) * n]) == list(range(n)) for c in range(SCHEDULE.cycles))
    assert len(rows.rows) == schedule.total_rounds * TRAINING.local_steps * TRAINING.batch_size
    after = snapshot(model)
    assert all(not torch.equal(before_all[k], after[k]) for k in after), "save it all: every parameter trains"
    assert evaluate_loss(model, pooled, 8) < loss0


def test_block_cyclic_is_the_reference_with_pooled_data(pooled):
    a, b = make_tiny_model("llama", seed=1), make_tiny_model("llama", seed=1)
    run_block_cyclic(a, pooled, 2, SCHEDULE, TRAINING)
    rounds = schedule_of(b, 2).total_rounds
    run_reference(b, 2, SCHEDULE, TRAINING, [pooled] * rounds)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    # and the data matters: visits on half the data end elsewhere
    c = make_tiny_model("llama", seed=1)
    run_reference(c, 2, SCHEDULE, TRAINING, [pooled[: len(pooled) // 2]] * rounds)
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))
