"""The block cycle: which block each visit trains, at which learning rate, with which seed.

Everything here is a pure function of the run configuration and the visit index ("round"), so
a restarted coordinator, the single-process reference and a reader of the logs all compute the
same schedule without storing it.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Protocol

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

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError("cycles must be >= 1")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.lr) and self.lr > 0) or self.warmup_visits < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, warmup_visits >= 0, 0 <= min_lr_ratio <= 1")


class Schedule(Protocol):
    """A strategy's schedule: its rounds, and the learning rate and cycle of each."""

    config: ScheduleConfig
    total_rounds: int

    def lr_of(self, round_: int) -> float: ...
    def cycle_of(self, round_: int) -> int: ...


class CycleSchedule:
    def __init__(self, num_blocks: int, config: ScheduleConfig) -> None:
        if num_blocks < 1:
            raise ValueError("a model needs at least one block")
        self.num_blocks = num_blocks
        self.config = config
        self.total_rounds = num_blocks * config.cycles

    def cycle_of(self, round_: int) -> int:
        return round_ // self.num_blocks

    def block_order(self, cycle: int) -> list[int]:
        """The blocks of one cycle in visiting order; every block exactly once."""
        blocks = list(range(self.num_blocks))
        if self.config.order == "descending":
            blocks.reverse()
        elif self.config.order == "random":
            # A fresh permutation per cycle, reproducible from the run seed alone.
            random.Random(f"fedcybgd-order:{self.config.seed}:{cycle}").shuffle(blocks)
        return blocks

    def block_of(self, round_: int) -> int:
        self.check(round_)
        return self.block_order(self.cycle_of(round_))[round_ % self.num_blocks]

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
