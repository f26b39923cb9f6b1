"""The block cycle schedule: order, learning rate and seeds (fedcybgd.server.scheduler)."""

from __future__ import annotations

import math

import pytest

from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig


def _sched(num_blocks: int = 5, **kw) -> CycleSchedule:
    return CycleSchedule(num_blocks, ScheduleConfig(**kw))


def _cycles(s: CycleSchedule) -> list[list[int]]:
    n = s.num_blocks
    return [[s.block_of(c * n + i) for i in range(n)] for c in range(s.config.cycles)]


# ----------------------------------------------------------------------------------------- order


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
@pytest.mark.parametrize("num_blocks", [1, 2, 7])
def test_every_block_exactly_once_per_cycle(order, num_blocks):
    s = _sched(num_blocks, cycles=4, order=order, seed=11)
    assert s.total_rounds == 4 * num_blocks
    for c, blocks in enumerate(_cycles(s)):
        assert sorted(blocks) == list(range(num_blocks))
        assert blocks == s.block_order(c)
    assert [s.cycle_of(r) for r in range(s.total_rounds)] == [r // num_blocks for r in range(s.total_rounds)]


def test_ascending_and_descending_orders():
    assert _cycles(_sched(4, cycles=2, order="ascending")) == [[0, 1, 2, 3]] * 2
    assert _cycles(_sched(4, cycles=2, order="descending")) == [[3, 2, 1, 0]] * 2


def test_random_order_differs_per_cycle():
    cycles = _cycles(_sched(8, cycles=6, order="random", seed=1))
    assert len({tuple(c) for c in cycles}) == 6
    assert any(c != list(range(8)) for c in cycles)


def test_random_order_is_reproducible_from_the_seed():
    a = _cycles(_sched(8, cycles=4, order="random", seed=42))
    b = _cycles(_sched(8, cycles=4, order="random", seed=42))  # e.g. a restarted coordinator
    assert a == b
    c = _cycles(_sched(8, cycles=4, order="random", seed=43))
    assert a != c
    # Per cycle as well, not only somewhere in the run.
    assert sum(x != y for x, y in zip(a, c, strict=True)) >= 3


def test_random_order_does_not_depend_on_unrelated_settings():
    a = _cycles(_sched(6, cycles=3, order="random", seed=5, lr=1e-3, lr_schedule="linear"))
    b = _cycles(_sched(6, cycles=3, order="random", seed=5, lr=2e-5, warmup_visits=4))
    assert a == b


# -------------------------------------------------------------------------------------------- lr


def _lrs(s: CycleSchedule) -> list[float]:
    return [s.lr_of(r) for r in range(s.total_rounds)]


def test_constant_lr():
    s = _sched(5, cycles=3, lr=3e-4, lr_schedule="constant")
    assert _lrs(s) == [3e-4] * 15


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
def test_decay_from_lr_to_floor_at_last_round(schedule, ratio):
    s = _sched(5, cycles=3, lr=1e-3, lr_schedule=schedule, min_lr_ratio=ratio)
    lrs = _lrs(s)
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * ratio, abs=1e-15)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))  # never increases
    assert all(1e-3 * ratio - 1e-15 <= x <= 1e-3 + 1e-15 for x in lrs)
    if ratio < 1:
        assert lrs[1] < lrs[0]  # actually decays, right from the start


def test_min_lr_ratio_one_means_constant():
    for schedule in ("linear", "cosine"):
        s = _sched(4, cycles=2, lr=2e-4, lr_schedule=schedule, min_lr_ratio=1.0)
        assert _lrs(s) == pytest.approx([2e-4] * 8)


def test_linear_and_cosine_shapes():
    # 11 rounds: progress = round / 10.
    lin = _lrs(_sched(11, lr=1.0, lr_schedule="linear", min_lr_ratio=0.2))
    cos = _lrs(_sched(11, lr=1.0, lr_schedule="cosine", min_lr_ratio=0.2))
    for r in range(11):
        p = r / 10
        assert lin[r] == pytest.approx(0.2 + 0.8 * (1 - p))
        assert cos[r] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lin[5] == pytest.approx(0.6) and cos[5] == pytest.approx(0.6)  # both halfway at the middle
    assert cos[2] > lin[2] and cos[8] < lin[8]  # cosine: slow start, slow end


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_ramps_linearly_to_lr(schedule):
    s = _sched(4, cycles=3, lr=8e-4, lr_schedule=schedule, warmup_visits=4, min_lr_ratio=0.25)
    lrs = _lrs(s)
    assert lrs[:4] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4])
    steps = [b - a for a, b in zip(lrs[:4], lrs[1:4], strict=False)]  # consecutive pairs
    assert steps == pytest.approx([2e-4] * 3)
    assert lrs[0] > 0
    assert lrs[4] == pytest.approx(8e-4)  # decay starts at the full lr
    assert max(lrs) == pytest.approx(8e-4)
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([8e-4] * 8)
    else:
        assert lrs[-1] == pytest.approx(2e-4)
        assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_lr_is_a_pure_function_of_the_round():
    a = _sched(3, cycles=4, lr=1e-3, warmup_visits=2)
    b = _sched(3, cycles=4, lr=1e-3, warmup_visits=2)
    assert [a.lr_of(r) for r in reversed(range(12))] == [b.lr_of(r) for r in reversed(range(12))]


# ----------------------------------------------------------------------------------------- seeds


def test_seeds_distinct_per_round_and_stable():
    s = _sched(10, cycles=5, seed=7)
    seeds = [s.seed_of(r) for r in range(s.total_rounds)]
    assert len(set(seeds)) == len(seeds)
    assert all(isinstance(x, int) and 0 <= x < 2**63 for x in seeds)
    again = _sched(10, cycles=5, seed=7)
    assert [again.seed_of(r) for r in range(again.total_rounds)] == seeds
    other = _sched(10, cycles=5, seed=8)
    assert not set(seeds) & {other.seed_of(r) for r in range(other.total_rounds)}
    # Seeds depend on the round, not on which block or schedule: more cycles keep earlier seeds.
    longer = _sched(10, cycles=6, seed=7, order="random", lr_schedule="linear")
    assert [longer.seed_of(r) for r in range(50)] == seeds


# ------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("round_", [-1, 15, 16, 10**9])
def test_out_of_range_round(round_):
    s = _sched(5, cycles=3)
    for fn in (s.block_of, s.lr_of, s.seed_of):
        with pytest.raises(IndexError):
            fn(round_)


def test_last_round_is_in_range():
    s = _sched(5, cycles=3)
    assert s.block_of(14) == 4
    assert s.lr_of(14) == pytest.approx(s.config.lr * s.config.min_lr_ratio)
    assert s.seed_of(14) != s.seed_of(13)


@pytest.mark.parametrize("kw", [
    {"cycles": 0},
    {"cycles": -1},
    {"order": "sideways"},
    {"order": "Random"},
    {"lr_schedule": "step"},
    {"lr": 0.0},
    {"lr": -1e-4},
    {"warmup_visits": -1},
    {"min_lr_ratio": -0.1},
    {"min_lr_ratio": 1.5},
    {"min_lr_ratio": float("nan")},
])
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        ScheduleConfig(**kw)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_non_finite_lr_rejected(lr):
    with pytest.raises(ValueError):
        ScheduleConfig(lr=lr)


@pytest.mark.parametrize("num_blocks", [0, -3])
def test_invalid_num_blocks(num_blocks):
    with pytest.raises(ValueError):
        CycleSchedule(num_blocks, ScheduleConfig())


def test_valid_edge_configs():
    ScheduleConfig(min_lr_ratio=0.0)
    ScheduleConfig(min_lr_ratio=1.0)
    ScheduleConfig(warmup_visits=0)
    s = CycleSchedule(1, ScheduleConfig(cycles=1))
    assert s.total_rounds == 1 and s.block_of(0) == 0


# ------------------------------------------------------------------------------ embed/head blocks thinned


def _rounds(s: CycleSchedule) -> list[int]:
    return [s.block_of(r) for r in range(s.total_rounds)]


def test_embed_head_blocks_join_every_nth_cycle_and_the_last():
    # 3 decoder-layer blocks (0, 1, 2) and 2 embed/head blocks (3, 4), every 2nd cycle: the 2nd and 4th.
    s = CycleSchedule(5, ScheduleConfig(cycles=4, embed_head_every=2), layer_blocks=3)
    assert _rounds(s) == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]
    assert s.total_rounds == 16
    assert [s.cycle_of(r) for r in range(16)] == [0] * 3 + [1] * 5 + [2] * 3 + [3] * 5
    assert s.block_order(1) == [0, 1, 2, 3, 4] and s.block_order(2) == [0, 1, 2]
    # A run shorter than the period still trains every block once: in its last cycle.
    assert _rounds(CycleSchedule(5, ScheduleConfig(cycles=1, embed_head_every=4), layer_blocks=3)) == [0, 1, 2, 3, 4]
    assert [len(c) for c in (CycleSchedule(5, ScheduleConfig(cycles=6, embed_head_every=4), layer_blocks=3)
                             .block_order(k) for k in range(6))] == [3, 3, 3, 5, 3, 5]
    # The learning rate decays over the rounds the run really has.
    assert s.lr_of(15) == pytest.approx(s.config.lr * s.config.min_lr_ratio)


def test_embed_head_every_zero_trains_the_decoder_layers_only():
    s = CycleSchedule(5, ScheduleConfig(cycles=2, embed_head_every=0, order="descending"), layer_blocks=3)
    assert _rounds(s) == [2, 1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="no block"):
        CycleSchedule(2, ScheduleConfig(embed_head_every=0), layer_blocks=0)
    with pytest.raises(ValueError, match="embed_head_every"):
        ScheduleConfig(embed_head_every=-1)


def test_embed_head_every_one_is_the_classic_cycle_in_every_order():
    for order in ("ascending", "descending", "random"):
        thinned = CycleSchedule(6, ScheduleConfig(cycles=3, order=order, seed=4, embed_head_every=1), layer_blocks=4)
        assert _rounds(thinned) == _rounds(_sched(6, cycles=3, order=order, seed=4))


def test_random_order_shuffles_the_blocks_a_cycle_visits():
    s = CycleSchedule(6, ScheduleConfig(cycles=7, order="random", seed=2, embed_head_every=3), layer_blocks=4)
    for c in range(7):
        assert sorted(s.block_order(c)) == (list(range(6)) if c in (2, 5, 6) else list(range(4)))


def test_by_default_the_embed_head_blocks_join_every_fourth_cycle_and_the_last():
    s = CycleSchedule(3, ScheduleConfig(cycles=6), layer_blocks=2)
    assert [len(s.block_order(c)) for c in range(6)] == [2, 2, 2, 3, 2, 3]


def test_for_blocks_counts_the_partitions_layer_blocks():
    from fedcybgd.common.partition import layer_block_count, partition_model
    from fedcybgd.common.tiny import make_tiny_model

    specs = partition_model(make_tiny_model("llama"), 2)
    s = CycleSchedule.for_blocks(specs, ScheduleConfig(cycles=2, embed_head_every=2))
    assert layer_block_count(specs) == s.layer_blocks == len(specs) - 1
    assert _rounds(s) == [*range(s.layer_blocks), *range(len(specs))]
