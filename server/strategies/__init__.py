"""The training strategies a run can use, by name: each one class behind `base.Strategy`.

- ``cybgd`` (default): FedCyBGD as in the paper. One task trains one block; its upload replaces
  that block (a new version per visit, sequential, Gauss-Seidel order).
- ``cybgd-parallel``: up to K tasks at once on distinct blocks of the same version; the merge is
  exact because blocks are disjoint.
- ``fedavg-full``: FedAvg over all parameters. A round hands the same version to C distinct
  clients; each trains every parameter and uploads every block; the round's version is the
  sample-weighted average, computed block by block from the uploads on disk.
- ``fedlora``: FedAvg of LoRA adapters (FedIT). The base model stays frozen; clients train an
  adapter from the global one and upload only it; a version is the base blocks plus an adapter.

Adding a strategy: one module here with one `Strategy` subclass, one line in `STRATEGIES`
(docs/design.md, "Adding a strategy").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fedcybgd.server.strategies.base import Strategy, StrategyEnv
from fedcybgd.server.strategies.block_cycle import BlockCycle, ParallelBlockCycle
from fedcybgd.server.strategies.fedavg import FedAvgFull
from fedcybgd.server.strategies.fedlora import FedLoRA

if TYPE_CHECKING:
    from fedcybgd.server.config import CoordinatorConfig

#: name (the `strategy` setting) -> class
STRATEGIES: dict[str, type[Strategy]] = {
    "cybgd": BlockCycle,
    "cybgd-parallel": ParallelBlockCycle,
    "fedavg-full": FedAvgFull,
    "fedlora": FedLoRA,
}

__all__ = ["STRATEGIES", "Strategy", "StrategyEnv", "make_strategy"]


def make_strategy(config: CoordinatorConfig) -> Strategy:
    return STRATEGIES[config.strategy](config)
