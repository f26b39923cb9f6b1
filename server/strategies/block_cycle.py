"""FedCyBGD's block cycle: one task trains one block; its upload replaces that block.

Sequential (``cybgd``, the paper's Gauss-Seidel order): a visit starts only when nothing is in
flight, so it starts from the model with every earlier visit merged. Parallel
(``cybgd-parallel``, K = max_concurrent_visits >= 2): up to K visits at once on distinct blocks of
the same version; merging them is exact because blocks are disjoint, and a block never overtakes
an earlier visit of itself.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.records import Accepted, ExpectedUpload, Opening, UploadClaim, VisitStats
from fedcybgd.server.scheduler import CycleSchedule
from fedcybgd.server.state import TaskRow, VisitRow, current_version
from fedcybgd.server.strategies.base import BlockFilter, Strategy, any_block, expect_blob
from fedcybgd.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from fedcybgd.common.blocks import BlockSpec
    from fedcybgd.server.config import CoordinatorConfig

log = logging.getLogger("fedcybgd.coordinator")


class BlockCycle(Strategy):
    task_kind = pb.TASK_BLOCK
    transfer_kind = "block"
    context_compression = True
    memory_planned = True

    _schedule: CycleSchedule | None = None

    def make_schedule(self, specs: list[BlockSpec]) -> CycleSchedule:
        self._schedule = CycleSchedule.for_blocks(specs, self.config.schedule)
        return self._schedule

    @property
    def schedule(self) -> CycleSchedule:
        if self._schedule is None:
            raise RuntimeError("schedule used before the run was opened")
        return self._schedule

    # -- configure -----------------------------------------------------------------------------
    def next_opening(self, client_id: str, in_flight: list[TaskRow],
                     can_hold: BlockFilter = any_block) -> Opening | None:
        """The earliest round that may start now and whose block the client can hold: at most K in
        flight, each on a block that no earlier unfinished round still has to train. Sequential: the
        next round or nothing; parallel: a later open block when the client cannot hold an earlier one."""
        if len(in_flight) >= self.config.max_concurrent_visits:
            return None
        rounds, schedule = self.env.rounds, self.schedule
        first_open = rounds.first_open()
        if first_open is None:
            return None
        blocked = {t.block_index for t in in_flight}
        busy_rounds = {t.round for t in in_flight}
        # Sequential: the first open round or nothing (a client that cannot hold its block must not make a later
        # round overtake it). Parallel: any round of the window whose block is free.
        window = schedule.num_blocks if self.config.max_concurrent_visits > 1 else 1
        for round_ in range(first_open, min(first_open + window, schedule.total_rounds)):
            if round_ in rounds or round_ in busy_rounds:
                continue
            block = schedule.block_of(round_)
            if block not in blocked and can_hold(block):
                return Opening(round=round_, block_index=block)
            blocked.add(block)
        return None

    def seed_of(self, task: TaskRow) -> int:
        return self.schedule.seed_of(task.round)

    def scope_name(self, block_index: int) -> str:
        return self.env.run.specs[block_index].name

    # -- transfer ------------------------------------------------------------------------------
    def trainable_blobs(self, task: TaskRow, manifest: list[str]) -> set[str]:
        return {manifest[task.block_index]}

    # -- accept --------------------------------------------------------------------------------
    def expected_uploads(self, task: TaskRow, claim: UploadClaim) -> list[ExpectedUpload]:
        if claim.single.block_index != task.block_index:
            raise Refusal(Status.PERMISSION_DENIED,
                          f"task {task.id} trains block {task.block_index}, not {claim.single.block_index}")
        started = self.env.state.manifest(task.base_version)
        spec = self.env.run.specs[task.block_index]
        return [expect_blob(spec, claim.single.sha256, claim.single.size, started[task.block_index])]

    def accept(self, task: TaskRow, uploads: list[ExpectedUpload], stats: VisitStats) -> Accepted:
        """The block replaces its predecessor in the newest version, unless another visit changed
        that block since this task's version (then the upload is stale)."""
        env, sha = self.env, uploads[0].sha256
        with env.lock:
            latest, manifest = current_version(env.state)
            if manifest[task.block_index] != env.state.manifest(task.base_version)[task.block_index]:
                env.metrics.rejections.labels(reason="stale").inc()
                raise Refusal(Status.FAILED_PRECONDITION,
                              f"block {task.block_index} changed since version {task.base_version}; upload is stale")
            new_manifest = list(manifest)
            new_manifest[task.block_index] = sha
            visit = VisitRow(round=task.round, task_id=task.id, client_id=task.client_id, block_index=task.block_index,
                             base_version=task.base_version, new_version=latest + 1, blob_sha256=sha,
                             committed_unix=time.time(), record=stats)
            env.commits.visit(task, visit, new_manifest, {task.block_index: sha})
        env.commits.observe(task, stats, stats.client_name)
        log.info("round %d committed: block %s -> version %d (loss %.4f -> %.4f)", task.round,
                 env.run.specs[task.block_index].name, visit.new_version, stats.loss_before, stats.loss_after)
        env.commits.published(visit.new_version)
        return Accepted(new_version=visit.new_version, blob_sha256=sha)

    def repeated_upload(self, task: TaskRow, claim: UploadClaim) -> Accepted:
        visit = self.env.state.visit_of_task(task.id)
        if visit is None or visit.blob_sha256 != claim.single.sha256:
            raise Refusal(Status.FAILED_PRECONDITION, f"task {task.id} was already completed with another block")
        return Accepted(new_version=visit.new_version, blob_sha256=visit.blob_sha256)

    def blobs_of(self, visit: VisitRow) -> dict[int, str]:
        return {visit.block_index: visit.blob_sha256}


class ParallelBlockCycle(BlockCycle):
    """``cybgd-parallel``: the block cycle with K >= 2 visits in flight."""

    @classmethod
    def check_config(cls, config: CoordinatorConfig) -> None:
        if config.max_concurrent_visits < 2:
            raise ValueError("strategy cybgd-parallel needs max_concurrent_visits >= 2 (K concurrent visits)")
