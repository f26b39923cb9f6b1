"""The block cycle: which block each visit trains, at which learning rate, with which seed.

A cycle visits every decoder-layer block once; the blocks outside the decoder layers (embeddings, LM head,
final norm: the partition's last blocks) join every ``embed_head_every``-th cycle and the last (by default every
4th; 1: every cycle, the paper's scheme). Measured (docs/benchmarks.md, "Improving the method"): at a fine-tuning
budget of a few cycles, a visit of an embedding row range lowers the held-out loss far less than a decoder-layer
visit of the same tokens, so visiting them less often gives the layers more of the budget.

Everything here is a pure function of the run configuration and the visit index ("round"), so
a restarted coordinator, the single-process reference and a reader of the logs all compute the
same schedule without storing it.
"""
from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.partition import layer_block_count

ORDERS = ("ascending", "descending", "random")
LR_SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class ScheduleConfig:
    cycles: int = 1
    order: str = "ascending"
    lr: float = 1e-4
    lr_schedule: str = "cosine"
    warmup_visits: int = 0
    min_lr_ratio: float = 0.1
    seed: int = 0
    # The blocks outside the decoder layers join every N-th cycle and the last; 1: every cycle (the paper's); 0: never.
    # Default 4: the best at equal tokens of what was measured (docs/benchmarks.md, "Improving the method"). The
    # block cycle's setting: FedAvg strategies train every parameter each round.
    embed_head_every: int = 4


    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError("cycles must be >= 1")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup_visits < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, warmup_visits >= 0, 0 <= min_lr_ratio <= 1")
        if self.embed_head_every < 0:
            raise ValueError("embed_head_every must be >= 0 (0: the blocks outside the decoder layers never train)")

    def visits_embed_head(self, cycle: int) -> bool:
        """Whether cycle ``cycle`` (from 0) visits the blocks outside the decoder layers: the last cycle of every
        group of ``embed_head_every``, and the run's last cycle (so every block trains in every run, however
        short)."""
        return self.embed_head_every > 0 and ((cycle + 1) % self.embed_head_every == 0 or cycle == self.cycles - 1)


class Schedule(Protocol):
    """A strategy's schedule: its rounds, and the learning rate and cycle of each."""

    config: ScheduleConfig
    total_rounds: int

    def lr_of(self, round_: int) -> float: ...
    def cycle_of(self, round_: int) -> int: ...


class CycleSchedule:
    """The rounds of a FedCyBGD run. ``layer_blocks``: how many of the ``num_blocks`` blocks (the first ones, as
    ``partition_model`` orders them) hold decoder layers; the rest are the embed/head blocks that
    ``embed_head_every`` thins out (default: every block is a layer block, none is thinned)."""

    def __init__(self, num_blocks: int, config: ScheduleConfig, layer_blocks: int | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("a model needs at least one block")
        layer_blocks = num_blocks if layer_blocks is None else layer_blocks
        if not 0 <= layer_blocks <= num_blocks:
            raise ValueError(f"layer_blocks must be in [0, {num_blocks}], got {layer_blocks}")
        self.num_blocks = num_blocks
        self.layer_blocks = layer_blocks
        self.config = config
        self._cycles = [self._cycle_blocks(c) for c in range(config.cycles)]
        if not any(self._cycles):
            raise ValueError("the schedule visits no block: the model has only embed/head blocks and "
                             "embed_head_every is 0")
        self._starts = [0]
        for blocks in self._cycles:
            self._starts.append(self._starts[-1] + len(blocks))
        self.total_rounds = self._starts[-1]

    def _cycle_blocks(self, cycle: int) -> list[int]:
        blocks = list(range(self.layer_blocks))
        if self.config.visits_embed_head(cycle):
            blocks = list(range(self.num_blocks))
        if self.config.order == "descending":
            blocks.reverse()
        elif self.config.order == "random":
            # A fresh permutation per cycle, reproducible from the run seed alone.
            random.Random(f"fedcybgd-order:{self.config.seed}:{cycle}").shuffle(blocks)
        return blocks

    @classmethod
    def for_blocks(cls, specs: Sequence[BlockSpec], config: ScheduleConfig) -> CycleSchedule:
        """The schedule of a run over the blocks ``specs`` (``partition_model``'s)."""
        return cls(len(specs), config, layer_block_count(specs))

    def cycle_of(self, round_: int) -> int:
        """The cycle of round ``round_``; the last cycle for rounds past the run (status and metrics ask)."""
        return min(max(bisect.bisect_right(self._starts, round_) - 1, 0), len(self._cycles) - 1)

    def block_order(self, cycle: int) -> list[int]:
        """The blocks of one cycle in visiting order; every block it visits exactly once."""
        return list(self._cycles[cycle])

    def block_of(self, round_: int) -> int:
        self.check(round_)
        cycle = self.cycle_of(round_)
        return self._cycles[cycle][round_ - self._starts[cycle]]

    def lr_of(self, round_: int) -> float:
        """Global schedule over all visits of the run, so it does not restart at each client."""
        self.check(round_)
        cfg = self.config
        if round_ < cfg.warmup_visits:
            return cfg.lr * (round_ + 1) / cfg.warmup_visits
        if cfg.lr_schedule == "constant":
            return cfg.lr
        decay_steps = max(1, self.total_rounds - cfg.warmup_visits - 1)
        progress = min(1.0, (round_ - cfg.warmup_visits) / decay_steps)
        floor = cfg.lr * cfg.min_lr_ratio
        if cfg.lr_schedule == "linear":
            return floor + (cfg.lr - floor) * (1.0 - progress)
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def seed_of(self, round_: int) -> int:
        """Seed of the visit's data order: distinct per visit, stable across restarts."""
        self.check(round_)
        digest = hashlib.sha256(f"fedcybgd-visit:{self.config.seed}:{round_}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def check(self, round_: int) -> None:
        if not 0 <= round_ < self.total_rounds:
            raise IndexError(f"round {round_} outside the run's {self.total_rounds} rounds")
