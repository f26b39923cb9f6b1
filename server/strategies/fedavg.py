"""The FedAvg family: a round hands one model version to C distinct clients; when all C uploads
are in, their sample-weighted average is the next version. ``fedavg-full`` averages every block
(`FedAvgFull`); ``fedlora`` averages LoRA adapters (`fedlora.FedLoRA`).

A round's average is computed outside the scheduling lock (it reads every upload from disk);
meanwhile the round's slots are all taken, so no client is handed work from an unmerged round.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.records import ALL_BLOCKS, Accepted, ExpectedUpload, Opening, UploadClaim, VisitStats
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
from fedcybgd.server.state import ContributionRow, TaskRow, VisitRow, current_version
from fedcybgd.server.strategies.averaging import average_blocks
from fedcybgd.server.strategies.base import BlockFilter, Strategy, any_block, expect_blob
from fedcybgd.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from fedcybgd.common.blocks import BlockSpec
    from fedcybgd.server.config import CoordinatorConfig

log = logging.getLogger("fedcybgd.coordinator")


class FedAvgRounds:
    """The schedule of the FedAvg family: R rounds of C tasks each, R chosen so that a run trains
    as many tokens as a FedCyBGD run of the same cycles (R x C >= cycles x blocks). The learning
    rate follows the same global schedule, over rounds; every task has its own data-order seed."""

    def __init__(self, num_blocks: int, config: ScheduleConfig, clients_per_round: int) -> None:
        self.clients_per_round = clients_per_round
        self.total_rounds = -(-num_blocks * config.cycles // clients_per_round)
        self.num_blocks = num_blocks
        self._schedule = CycleSchedule(self.total_rounds, replace(config, cycles=1))
        self.config = config

    def lr_of(self, round_: int) -> float:
        return self._schedule.lr_of(round_)

    def seed_of(self, round_: int, slot: int) -> int:
        self._schedule.check(round_)
        digest = hashlib.sha256(f"fedcybgd-fedavg:{self.config.seed}:{round_}:{slot}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)

    def cycle_of(self, round_: int) -> int:
        """The FedCyBGD cycle the same number of training tokens would have reached."""
        return min(round_ * self.clients_per_round // self.num_blocks, self.config.cycles - 1)


@dataclass(frozen=True)
class Average:
    """A round's average: the blocks of the new version, the blobs that changed (history index
    -> blob), the visit's blob (the adapter, or "" when blocks changed) and state metadata to
    write before the version that needs it."""

    manifest: list[str]
    changed: dict[int, str]
    blob_sha256: str = ""
    meta: dict[str, str] | None = None


class FedAvgFamily(Strategy):
    """Rounds of C contributions from C distinct clients, averaged when complete."""

    _schedule: FedAvgRounds | None = None

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        self._merging: set[int] = set()  # rounds whose average is being computed (lock held to change)

    @classmethod
    def tasks_per_round(cls, clients_per_round: int) -> int:
        return clients_per_round

    @classmethod
    def check_config(cls, config: CoordinatorConfig) -> None:
        if config.max_concurrent_visits != 1:
            raise ValueError(f"max_concurrent_visits applies to the block cycle, not to {config.strategy}")
        if config.context.method != "none":
            raise ValueError("context compression applies to the block cycle's frozen blocks, "
                             f"not to {config.strategy}")

    def fingerprint(self) -> dict[str, object]:
        return {**super().fingerprint(), "clients_per_round": self.config.clients_per_round}

    def make_schedule(self, specs: list[BlockSpec]) -> FedAvgRounds:
        self._schedule = FedAvgRounds(len(specs), self.config.schedule, self.config.clients_per_round)
        return self._schedule

    @property
    def schedule(self) -> FedAvgRounds:
        if self._schedule is None:
            raise RuntimeError("schedule used before the run was opened")
        return self._schedule

    # -- configure -----------------------------------------------------------------------------
    def next_opening(self, client_id: str, in_flight: list[TaskRow],
                     can_hold: BlockFilter = any_block) -> Opening | None:
        """A free slot of the earliest unmerged round, for a client that has no part in it yet
        (a round's C tasks go to C distinct clients, all from the same version)."""
        round_ = self.env.rounds.first_open()
        if round_ is None or not can_hold(ALL_BLOCKS):
            return None
        taken = [(t.slot, t.client_id) for t in in_flight if t.round == round_]
        taken += [(c.slot, c.client_id) for c in self.env.state.contributions(round_)]
        if client_id in {c for _, c in taken}:
            return None
        free = [slot for slot in range(self.config.clients_per_round) if slot not in {s for s, _ in taken}]
        return Opening(round=round_, block_index=ALL_BLOCKS, slot=free[0]) if free else None

    def seed_of(self, task: TaskRow) -> int:
        return self.schedule.seed_of(task.round, task.slot)

    def task_id(self, opening: Opening) -> str:
        return f"t-{opening.round}-{opening.slot}-{secrets.token_hex(6)}"

    # -- accept --------------------------------------------------------------------------------
    def accept(self, task: TaskRow, uploads: list[ExpectedUpload], stats: VisitStats) -> Accepted:
        """Store one client's upload; the round's last one triggers the average."""
        env = self.env
        blobs = [u.sha256 for u in uploads]
        with env.lock:
            env.commits.contribution(task, ContributionRow(
                task_id=task.id, round=task.round, slot=task.slot, client_id=task.client_id, blobs=blobs,
                committed_unix=time.time(), record=stats))
            log.info("round %d: contribution %d/%d from %s (loss %.4f -> %.4f)", task.round,
                     len(env.state.contributions(task.round)), self.config.clients_per_round, stats.client_name,
                     stats.loss_before, stats.loss_after)
        env.commits.observe(task, stats, stats.client_name)
        version = self._merge_if_complete(task.round)
        return Accepted(new_version=version or task.base_version, blob_sha256=blobs[-1])

    def repeated_upload(self, task: TaskRow, claim: UploadClaim) -> Accepted:
        contribution = self.env.state.contribution_of_task(task.id)
        if contribution is None or contribution.blobs[-1] != claim.last_sha256:
            raise Refusal(Status.FAILED_PRECONDITION, f"task {task.id} was already completed with other blobs")
        return Accepted(new_version=task.base_version, blob_sha256=contribution.blobs[-1])

    def recover(self) -> None:
        """Rounds whose every upload arrived before a crash are averaged now."""
        for round_ in range(self.schedule.total_rounds):
            if round_ not in self.env.rounds:
                self._merge_if_complete(round_)

    @abstractmethod
    def average(self, weighted: list[tuple[float, list[str]]], manifest: list[str]) -> Average:
        """The round's new version from its contributions' blobs, each with its weight."""

    def _merge_if_complete(self, round_: int) -> int | None:
        """Average a round once all its uploads are in; returns the new version. Weights are the
        samples each client trained on, bounded by what the task asked for (a client cannot buy
        itself a larger say). Only one caller merges a round; the averaging runs unlocked."""
        env = self.env
        with env.lock:
            contributions = env.state.contributions(round_)
            if (len(contributions) < self.config.clients_per_round or round_ in env.rounds
                    or round_ in self._merging):
                return None
            self._merging.add(round_)
        try:
            tr = self.config.training
            weights = [min(max(c.record.samples, 1), tr.local_steps * tr.batch_size) for c in contributions]
            _, manifest = current_version(env.state)
            average = self.average([(w, c.blobs) for w, c in zip(weights, contributions, strict=True)], manifest)
            tasks = [t for t in (env.state.task(c.task_id) for c in contributions) if t is not None]
            first_issued = min(t.issued_unix for t in tasks)
            stats = VisitStats.averaged([c.record for c in contributions], lr=self.schedule.lr_of(round_),
                                        visit_seconds=time.time() - first_issued)
            with env.lock:
                latest, _ = current_version(env.state)
                if average.meta:
                    env.state.set_meta({k.format(version=latest + 1): v for k, v in average.meta.items()})
                last = contributions[-1]
                visit = VisitRow(round=round_, task_id=last.task_id, client_id=last.client_id,
                                 block_index=ALL_BLOCKS, base_version=tasks[-1].base_version,
                                 new_version=latest + 1, blob_sha256=average.blob_sha256, committed_unix=time.time(),
                                 record=stats)
                env.commits.merge(visit, average.manifest, average.changed)
        finally:
            with env.lock:
                self._merging.discard(round_)
        log.info("round %d merged: average of %d clients -> version %d (loss %.4f -> %.4f)", round_,
                 len(contributions), latest + 1, stats.loss_before, stats.loss_after)
        env.commits.published(latest + 1)
        return latest + 1


class FedAvgFull(FedAvgFamily):
    """``fedavg-full``: every client trains every parameter and uploads every block."""

    task_kind = pb.TASK_FULL
    transfer_kind = "full"

    def scope_name(self, block_index: int) -> str:
        return "all blocks"

    def trainable_blobs(self, task: TaskRow, manifest: list[str]) -> set[str]:
        return set(manifest)

    def expected_uploads(self, task: TaskRow, claim: UploadClaim) -> list[ExpectedUpload]:
        specs = self.env.run.specs
        if [b.block_index for b in claim.listed] != list(range(len(specs))):
            raise Refusal(Status.INVALID_ARGUMENT, f"a {self.config.strategy} upload carries every block, in order")
        started = self.env.state.manifest(task.base_version)
        return [expect_blob(specs[b.block_index], b.sha256, b.size, started[b.block_index]) for b in claim.listed]

    def average(self, weighted: list[tuple[float, list[str]]], manifest: list[str]) -> Average:
        averaged = average_blocks(self.env.store.blobs, self.env.run.specs, weighted)
        return Average(manifest=averaged, changed=dict(enumerate(averaged)))

    def blobs_of(self, visit: VisitRow) -> dict[int, str]:
        return dict(enumerate(self.env.state.manifest(visit.new_version)))

    def trained_blocks(self, visit: VisitRow) -> Iterable[int]:
        return range(len(self.env.run.specs))  # every block, without reading the round's manifest
