"""Commits: accepted work becomes model versions.

Strategies decide *what* the next version is (`Strategy.accept`); this part records it the same
way for all of them: one state transaction (so a crash never leaves half a version), the
in-memory view of completed rounds and block history, a wake-up for clients waiting for work,
the visit's metrics, and an evaluation when one is due.

Methods marked "lock held" run under the scheduling lock, so that a new version and the
scheduling decisions that depend on it are atomic; the rest run outside it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.history import BlockHistory, CompletedRounds
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.records import VisitStats
from fedcybgd.server.scheduler import Schedule
from fedcybgd.server.state import ContributionRow, CoordinatorState, StaleTaskError, TaskRow, VisitRow


class Commits:
    def __init__(self, state: CoordinatorState, rounds: CompletedRounds, history: BlockHistory,
                 metrics: CoordinatorMetrics, accounts: TaskAccounts, lock: threading.Condition,
                 schedule: Schedule, on_version: Callable[[int], None]) -> None:
        self._state = state
        self._schedule = schedule
        self._rounds = rounds
        self._history = history
        self._metrics = metrics
        self._accounts = accounts
        self._lock = lock
        self._on_version = on_version

    def visit(self, task: TaskRow, visit: VisitRow, manifest: list[str], changed: dict[int, str]) -> None:
        """One task's upload is the next version (lock held)."""
        try:
            self._state.commit_visit(visit, manifest)
        except StaleTaskError as err:
            self._metrics.rejections.labels(reason="stale").inc()
            raise Refusal(Status.FAILED_PRECONDITION, f"upload rejected: {err} (reassigned)") from err
        self._state.note_progress(task.id, bytes_up=visit.record.bytes_up)
        self._round_done(visit.round, changed)

    def contribution(self, task: TaskRow, contribution: ContributionRow) -> None:
        """One client's part of a round that is averaged later (lock held)."""
        try:
            self._state.add_contribution(contribution)
        except StaleTaskError as err:
            self._metrics.rejections.labels(reason="stale").inc()
            raise Refusal(Status.FAILED_PRECONDITION, f"upload rejected: {err} (reassigned)") from err
        self._state.note_progress(task.id, bytes_up=contribution.record.bytes_up)

    def merge(self, visit: VisitRow, manifest: list[str], changed: dict[int, str]) -> None:
        """A round's average is the next version (lock held)."""
        self._state.commit_merge(visit, manifest)
        self._round_done(visit.round, changed)

    def observe(self, task: TaskRow, stats: VisitStats, client_name: str) -> None:
        """The task is over: publish its figures and bytes, forget its bookkeeping."""
        self._metrics.observe_round(stats, self._accounts.close(task.id), client_name)

    def published(self, version: int) -> None:
        """A version was committed (lock not held): progress metrics, evaluation when due."""
        self._metrics.set_progress(self._rounds.count, self._schedule)
        self._on_version(version)

    def _round_done(self, round_: int, changed: dict[int, str]) -> None:
        self._rounds.add(round_)
        self._history.add(changed)
        self._lock.notify_all()
