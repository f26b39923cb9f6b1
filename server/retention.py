"""Coordinator retention: which model versions stay on disk, so that a run of many cycles does not keep every
version's blobs forever.

A version is kept while it is any of:

- the base (version 0): every client can hold it, every export can start from it;
- the newest: it includes every accepted upload, so nothing accepted is lost before a checkpoint includes it;
- a checkpoint (`checkpoint_rule`; by default the last version of every cycle, so the run replays from them);
- the base of an in-flight task (its client is downloading it, or will upload against it);
- held by an active client (its last download, its own last upload): the coordinator's best delta bases for it;
- pinned by the caller (a version queued for evaluation, the best version evaluated so far).

Every other version is pruned: recorded in the state (export names the nearest kept versions), then its blobs that
no kept version references are deleted (blocks are shared between versions: most of a version's blobs are also in
its neighbours'). Only versions that may still go are looked at per sweep (`candidates`: the kept versions that
are neither the base nor a checkpoint), and a reference count per blob over the kept versions decides what is
deleted, so a sweep costs the same after ten versions or ten thousand.

A FedAvg-family round's uploads go once the round is merged (`_release_contributions`); a crash between the
merge's commit and that release is caught up at the next start (`_release_missed`). The parts that remember blobs
in memory (the block history's delta bases, the lossy-context approximations: `BlobRecords`) forget the deleted
ones after each sweep and at start, so they stay as bounded as the store.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.server.config import RetentionConfig
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.records import ALL_BLOCKS
from fedcybgd.server.scheduler import Schedule
from fedcybgd.server.state import CoordinatorState

log = logging.getLogger("fedcybgd.coordinator")

#: State metadata: every version up to this one had its FedAvg-family round's uploads released (start-up looks
#: only at later versions for a release a crash cut off).
RELEASED_META = "retention:released_through"


class BlobRecords(Protocol):
    """A part that remembers blobs in memory (`BlockHistory`, `ContextPlanner`): told which ones are still kept
    after retention deleted others."""

    def retain(self, kept: Callable[[str], bool]) -> object: ...


def checkpoint_rule(every: int | None, schedule: Schedule) -> Callable[[int], bool]:
    """Whether a version is a checkpoint. None: the version that ends a cycle (version v includes v rounds, so it
    ends a cycle when rounds v-1 and v are in different cycles) and the final one; 0: every version; N: every N-th."""
    if every == 0:
        return lambda version: True
    if every is not None:
        return lambda version: version % every == 0
    total = schedule.total_rounds
    return lambda version: (version <= 0 or version >= total
                            or schedule.cycle_of(version) != schedule.cycle_of(version - 1))


@dataclass(frozen=True)
class SweepPlan:
    """What one sweep decided: the versions to prune, and why the other candidates stay."""

    prune: list[int]
    kept: dict[int, str]          # candidate version -> the first reason it stays


def plan_sweep(candidates: Iterable[int], newest: int, in_flight: Collection[int], held: Collection[int],
               pinned: Collection[int]) -> SweepPlan:
    """The retention rule on the versions that may go (neither the base nor a checkpoint): prune every one that is
    not the newest, not an in-flight task's base, not held by an active client and not pinned (by a reader, or
    committed but not announced yet)."""
    prune: list[int] = []
    kept: dict[int, str] = {}
    for version in sorted(candidates):
        reason = ("newest" if version >= newest else "in-flight base" if version in in_flight
                  else "held by an active client" if version in held else "pinned" if version in pinned else None)
        if reason is None:
            prune.append(version)
        else:
            kept[version] = reason
    return SweepPlan(prune=prune, kept=kept)


class BlobRefs:
    """How many kept versions reference each blob: a blob goes when its count drops to zero."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, blobs: Iterable[str]) -> None:
        self._counts.update(blobs)

    def release(self, blobs: Iterable[str]) -> list[str]:
        """One version fewer references `blobs`; returns those no kept version references any more."""
        unreferenced = []
        for sha in blobs:
            self._counts[sha] -= 1
            if self._counts[sha] <= 0:
                del self._counts[sha]
                unreferenced.append(sha)
        return unreferenced

    def __contains__(self, sha: object) -> bool:
        return sha in self._counts


@dataclass(frozen=True)
class SweepResult:
    """What a sweep did (tests and logs): the versions pruned, the blobs they alone held, the bytes freed."""

    pruned: list[int]
    blobs_deleted: int
    bytes_freed: int


class Retention:
    """Applies the rule after commits (`committed`) and at start-up (finishing a sweep, or a merged round's release,
    that a crash interrupted).

    `lock` is the coordinator's scheduling lock: a sweep holds it, so no task is issued and no version committed
    while it decides (a task's base is the newest version when it is issued, and the newest always stays).
    `pinned` names versions a reader still needs (the evaluator's queue). `extra_blob` is the strategy's blob beyond
    the blocks of a version (fedlora's adapter), part of the version like its blocks. `records` forget the blobs
    deleted (after each sweep that pruned, and at start)."""

    def __init__(self, config: RetentionConfig, state: CoordinatorState, blobs: BlobStore, schedule: Schedule,
                 lock: AbstractContextManager[object], metrics: CoordinatorMetrics,
                 extra_blob: Callable[[int], str | None] = lambda version: None,
                 pinned: Callable[[], Collection[int]] = frozenset,
                 records: Iterable[BlobRecords] = ()) -> None:
        self._config = config
        self._state = state
        self._blobs = blobs
        self._lock = lock
        self._metrics = metrics
        self._extra_blob = extra_blob
        self._pinned = pinned
        self._records = list(records)
        self.is_checkpoint = checkpoint_rule(config.checkpoint_every, schedule)
        self._refs = BlobRefs()
        self._candidates: dict[int, tuple[str, ...]] = {}   # kept, prunable later: version -> its blobs
        self._known = -1                                    # every version up to this one is counted in _refs
        # Committed while this process runs but not announced yet (`committed`): its readers (the evaluator's
        # queue) may not have pinned it yet, so it stays until then.
        self._unannounced: set[int] = set()
        # Versions whose round's uploads were released (or had none), beyond `_released_through`.
        self._released_through = int(state.get_meta(RELEASED_META) or 0)
        self._released: set[int] = set()
        with self._lock:
            self._catch_up()
            self._finish_pending()
            if self.enabled:
                self._release_missed()
            self._retain_records()

    @property
    def enabled(self) -> bool:
        return self._config.checkpoint_every != 0

    def committed(self, version: int) -> SweepResult | None:
        """A version was committed: sweep (a no-op when every version is a checkpoint)."""
        if not self.enabled:
            return None
        try:
            with self._lock:
                self._catch_up()
                self._unannounced.discard(version)
                result = self.sweep()
                merged = self._release_contributions(version)
                self._note_released(version, persist=merged)
                return result
        except Exception:  # the commit stands; what was not deleted now goes at the next sweep or start
            log.exception("retention: the sweep after version %d failed", version)
            return None

    def sweep(self) -> SweepResult:
        """Prune the candidates the rule lets go (caller holds the scheduling lock). The newest version is read
        before the tasks, so a task issued meanwhile starts from a version at least as new, which stays."""
        self._catch_up()
        newest = self._known
        in_flight = {t.base_version for t in self._state.tasks_with_status("issued")}
        held = self._state.held_by_active_clients(time.time() - self._config.active_client_s)
        plan = plan_sweep(self._candidates, newest, in_flight, held, {*self._pinned(), *self._unannounced})
        if not plan.prune:
            return SweepResult(pruned=[], blobs_deleted=0, bytes_freed=0)
        self._state.prune_versions(plan.prune)  # recorded first: a failure from here on is finished at start-up
        unreferenced = [sha for version in plan.prune for sha in self._refs.release(self._candidates.pop(version))]
        freed = sum(self._blobs.remove(sha) for sha in unreferenced)
        deleted = len(unreferenced)
        self._state.mark_blobs_deleted(plan.prune)
        self._retain_records()
        self._metrics.versions_pruned.inc(len(plan.prune))
        self._metrics.pruned_bytes.inc(freed)
        log.debug("retention: pruned versions %s (%d blobs, %d bytes); kept %s", plan.prune, deleted, freed,
                  plan.kept)
        return SweepResult(pruned=plan.prune, blobs_deleted=deleted, bytes_freed=freed)

    def _release_contributions(self, version: int, keep: Collection[str] = frozenset()) -> bool:
        """A FedAvg-family round merged into `version`: its clients' uploads (each a whole model, or an adapter) are
        no longer needed (recovery merges only rounds not merged yet), so the blobs no kept version references go.
        An upload equal to a kept block (a block a client did not change) stays, as does one in `keep`. Returns
        whether `version` was such a merge."""
        visit = self._state.visit_of_version(version)
        if visit is None or visit.block_index != ALL_BLOCKS:
            return False
        uploads = {sha for c in self._state.contributions(visit.round) for sha in c.blobs}
        freed = sum(self._blobs.remove(sha) for sha in uploads if sha not in self._refs and sha not in keep)
        self._metrics.pruned_bytes.inc(freed)
        log.debug("retention: round %d's uploads released (%d bytes)", visit.round, freed)
        return True

    def _release_missed(self) -> None:
        """Start-up: the uploads of rounds merged since the last release recorded (`RELEASED_META`), released now
        when a crash came between a merge's commit and its release (deleting what is gone already costs nothing).
        The round after the newest merged one may hold uploads that recovery is about to merge: they stay."""
        newest = self._known
        if newest <= self._released_through:
            return
        last = self._state.visit_of_version(newest)
        open_round = last.round + 1 if last is not None else 0
        waiting = {sha for c in self._state.contributions(open_round) for sha in c.blobs}
        merged = [v for v in range(self._released_through + 1, newest + 1)
                  if self._release_contributions(v, keep=waiting)]
        self._released_through = newest
        self._state.set_meta({RELEASED_META: str(newest)})
        if merged:
            log.info("retention: released the uploads of %d rounds merged before the restart (versions %d to %d)",
                     len(merged), merged[0], merged[-1])

    def _note_released(self, version: int, persist: bool) -> None:
        """`version`'s release is done; the mark moves over every version done without a gap, and is written when
        `persist` (a merged round: a block-cycle run writes nothing per visit, start-up looks at its versions once)."""
        self._released.add(version)
        while self._released_through + 1 in self._released:
            self._released_through += 1
            self._released.discard(self._released_through)
        if persist and self._released_through >= version:
            self._state.set_meta({RELEASED_META: str(self._released_through)})

    def _retain_records(self) -> None:
        """Let the parts that remember blobs forget those no kept version references (caller holds the lock, with
        every committed version counted: a blob of a version committed meanwhile is not mistaken for a deleted
        one)."""
        for records in self._records:
            records.retain(self._refs.__contains__)

    def _blobs_of(self, version: int, manifest: list[str]) -> tuple[str, ...]:
        extra = self._extra_blob(version)
        return (*manifest, extra) if extra else tuple(manifest)

    def _catch_up(self) -> None:
        """Count the versions committed since the last look (at start-up: every kept version)."""
        starting = self._known < 0
        for kept in self._state.kept_versions(since=self._known + 1):
            blobs = self._blobs_of(kept.version, kept.manifest)
            self._refs.add(blobs)
            if kept.version > 0 and not self.is_checkpoint(kept.version):
                self._candidates[kept.version] = blobs
                if not starting:
                    self._unannounced.add(kept.version)
            self._known = kept.version

    def _finish_pending(self) -> None:
        """Versions recorded as pruned whose blobs a crash left behind: delete those no kept version references."""
        pending = self._state.pruned_pending()
        if not pending:
            return
        freed = 0
        for version in pending:
            for sha in set(self._blobs_of(version, self._state.manifest(version))):
                if sha not in self._refs:
                    freed += self._blobs.remove(sha)
        self._state.mark_blobs_deleted(pending)
        log.info("retention: finished pruning versions %s after a restart (%d bytes freed)", pending, freed)


def directory_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (sizes, not blocks); files removed during the walk count 0."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total
