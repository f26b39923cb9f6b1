"""The strategy interface: everything that differs between the ways a run can train.

The coordinator's core (task board, downloads, uploads, commits, evaluation, status) is the same
for every strategy and never asks which one it runs. It asks the strategy instead:

- **configure** — `next_opening`: what the next task trains (a round, a block or the whole model,
  a slot), given what is in flight and done and what the asking client can hold in its memory
  (`can_hold`; `memory_planned` says whether the planner predicts this strategy's tasks);
  `seed_of`, `scope_name`, `schedule`.
- **transfer** — `trainable_blobs`: which blobs of a download are the trained part (the rest is
  context, which may be approximated when `context_compression` is true); `extra_blob` /
  `extra_spec`: a blob beyond the blocks that a version consists of (fedlora's adapter).
- **accept** — `expected_uploads`: which blobs a task's upload must bring, each with the only blob
  a delta may refer to; `accept`: how a checked upload becomes the next model version (or a
  contribution to one); `repeated_upload`: the same answer to a retried upload.
- **recover** — `recover`: work that was complete before a crash but not yet merged.

Flower's `Strategy` (configure_fit / aggregate_fit) is the model; a strategy here also owns its
schedule. Implementations: `block_cycle.BlockCycle` (cybgd, cybgd-parallel),
`fedavg.FedAvgFull` (fedavg-full), `fedlora.FedLoRA` (fedlora).
"""
from __future__ import annotations

import re
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.modeling import max_blob_size
from fedcybgd.server.commit import Commits
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.history import CompletedRounds
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.records import Accepted, ExpectedUpload, Opening, UploadClaim, VisitStats
from fedcybgd.server.run import RunInfo
from fedcybgd.server.scheduler import Schedule
from fedcybgd.server.state import CoordinatorState, TaskRow, VisitRow
from fedcybgd.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from fedcybgd.server.config import CoordinatorConfig


#: Block index -> whether the asking client can hold that block's visit (the task board's memory check).
BlockFilter = Callable[[int], bool]


def any_block(block_index: int) -> bool:
    """The filter of a client without memory constraint."""
    return True


@dataclass
class StrategyEnv:
    """What a strategy works with, handed over once the run is open. `lock` is the scheduling
    lock: `next_opening` runs under it; `accept` takes it for what must be atomic with scheduling
    and does slow work (averaging) outside it."""

    config: CoordinatorConfig
    state: CoordinatorState
    store: ModelStore
    run: RunInfo
    lock: threading.Condition
    rounds: CompletedRounds
    commits: Commits
    metrics: CoordinatorMetrics


class Strategy(ABC):
    """One way of training a run. Subclasses set the class attributes and implement the
    abstract methods; the defaults suit strategies that exchange blocks only."""

    #: the protocol's TaskKind of every task this strategy issues
    task_kind: ClassVar[pb.TaskKind]
    #: metrics label of the trained part of a transfer ("block" or "full")
    transfer_kind: ClassVar[str] = "block"
    #: frozen blocks may be sent as lossy approximations ([context] compression)
    context_compression: ClassVar[bool] = False
    #: its tasks are visits of one block, whose memory the planner predicts (training/planner.py): clients are
    #: given only blocks that fit them. False: tasks are not predicted, memory puts no constraint on them.
    memory_planned: ClassVar[bool] = False

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self._env: StrategyEnv | None = None

    # -- set-up --------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, config: CoordinatorConfig) -> None:
        """Raise ValueError for settings this strategy cannot run with."""
        return None

    def fingerprint(self) -> dict[str, object]:
        """Settings of this strategy a run cannot change midway (added to the run's fingerprint)."""
        return {"strategy": self.config.strategy}

    def initial_meta(self, store: ModelStore, specs: list[BlockSpec], manifest: list[str],
                     dtype: str) -> dict[str, str]:
        """State metadata a new run starts with (fedlora: its version-0 adapter)."""
        return {}

    @abstractmethod
    def make_schedule(self, specs: list[BlockSpec]) -> Schedule:
        """The run's rounds, for a model partitioned into the blocks `specs`."""

    def attach(self, env: StrategyEnv) -> None:
        """Called once the run is open, before any request."""
        self._env = env

    @property
    def env(self) -> StrategyEnv:
        if self._env is None:
            raise RuntimeError("strategy used before the run was opened")
        return self._env

    @property
    @abstractmethod
    def schedule(self) -> Schedule: ...

    @classmethod
    def tasks_per_round(cls, clients_per_round: int) -> int:
        """Tasks per round of the schedule (a FedAvg round of C clients trains as many tokens as C
        visits of the block cycle)."""
        return 1

    # -- configure -----------------------------------------------------------------------------
    @abstractmethod
    def next_opening(self, client_id: str, in_flight: list[TaskRow],
                     can_hold: BlockFilter = any_block) -> Opening | None:
        """The next task for this client, or None when it has to wait (scheduling lock held). Only an opening
        whose block index `can_hold` accepts (it fits the client's memory; ALL_BLOCKS for a whole-model task)."""

    def task_id(self, opening: Opening) -> str:
        """A fresh id for a task of this opening (unguessable: it is also a capability)."""
        return f"t-{opening.round}-{secrets.token_hex(6)}"

    @abstractmethod
    def seed_of(self, task: TaskRow) -> int:
        """The data-order seed of a task."""

    @abstractmethod
    def scope_name(self, block_index: int) -> str:
        """What a task or visit with this block index trained, for logs and status."""

    # -- transfer ------------------------------------------------------------------------------
    @abstractmethod
    def trainable_blobs(self, task: TaskRow, manifest: list[str]) -> set[str]:
        """The blobs of a task's download that it trains (always sent exactly)."""

    def extra_blob(self, version: int) -> str | None:
        """A blob beyond the blocks that this version consists of, if any."""
        return None

    def extra_spec(self, sha: str) -> BlockSpec:
        """The spec of an extra blob (its index is the number of blocks)."""
        raise KeyError(sha)

    def finish_model(self, model: nn.Module, version: int) -> None:
        """Make a model built from a version's blocks the model the version stands for."""
        return None

    # -- accept --------------------------------------------------------------------------------
    @abstractmethod
    def expected_uploads(self, task: TaskRow, claim: UploadClaim) -> list[ExpectedUpload]:
        """The blobs the task's upload must carry, in order (Refusal when the claim is wrong)."""

    @abstractmethod
    def accept(self, task: TaskRow, uploads: list[ExpectedUpload], stats: VisitStats) -> Accepted:
        """A checked and stored upload becomes the next version or a contribution to it."""

    @abstractmethod
    def repeated_upload(self, task: TaskRow, claim: UploadClaim) -> Accepted:
        """A retry of an upload that was accepted but whose answer was lost."""

    @abstractmethod
    def blobs_of(self, visit: VisitRow) -> dict[int, str]:
        """The blobs a committed visit or round gave each block it changed (history index ->
        blob), for rebuilding the delta-base history at start-up."""

    def trained_blocks(self, visit: VisitRow) -> Iterable[int]:
        """The blocks a committed visit or round changed (for status; cheaper than `blobs_of`). Must depend
        only on the visit's `block_index` (its scope): status asks once per scope, not once per visit."""
        return self.blobs_of(visit).keys()

    def recover(self) -> None:
        """Finish what was complete before a crash (called once at start-up)."""
        return None


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def expect_blob(spec: BlockSpec, sha256: str, size: int, base: str) -> ExpectedUpload:
    """An announced blob, bounded before a byte of it is read: a well-formed SHA-256 and a size
    the block's tensors can have."""
    if not _SHA256.match(sha256):
        raise Refusal(Status.INVALID_ARGUMENT, "blob_sha256 must be 64 lowercase hex digits")
    limit = max_blob_size(spec)
    if not 0 < size <= limit:
        raise Refusal(Status.INVALID_ARGUMENT, f"blob_size {size} outside (0, {limit}] for block {spec.name}")
    return ExpectedUpload(sha256=sha256, size=size, spec=spec, base=base)

