"""The task board: who trains what when. Long-polled GetTask, issuing the openings the strategy
offers, heartbeats, and reassigning tasks whose client went silent.

Everything here runs under the scheduling lock (a `threading.Condition`): a commit notifies it,
which wakes the clients waiting for work.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.enrolment import int64
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.history import CompletedRounds
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.records import Opening
from fedcybgd.server.state import ClientRow, CoordinatorState, TaskRow, current_version
from fedcybgd.server.strategies import Strategy

log = logging.getLogger("fedcybgd.coordinator")

MAX_GET_TASK_WAIT_S = 30


@dataclass(frozen=True)
class TaskOffer:
    """GetTask's answer: a task, or wait, or the run is done (with its final version)."""

    task: TaskRow | None = None
    wait_reason: str = ""
    final_version: int | None = None


@dataclass(frozen=True)
class Beat:
    """A heartbeat: the task the client works on (if any), its phase and step, its memory."""

    task_id: str
    phase: str
    step: int
    gpu_peak_allocated_bytes: int
    gpu_peak_reserved_bytes: int
    host_rss_bytes: int


class TaskBoard:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState, strategy: Strategy,
                 rounds: CompletedRounds, accounts: TaskAccounts, metrics: CoordinatorMetrics,
                 lock: threading.Condition) -> None:
        self._config = config
        self._state = state
        self._strategy = strategy
        self._rounds = rounds
        self._accounts = accounts
        self._metrics = metrics
        self._lock = lock
        self._started_unix = time.time()
        self._last_expiry_scan = 0.0
        self.clients_told_done: set[str] = set()

    def get_task(self, client: ClientRow, wait_seconds: int) -> TaskOffer:
        """The client's open task (a retried GetTask gets it back), a new one, or after at most
        `wait_seconds` (capped) a request to come back later."""
        self._state.touch_client(client.id)
        deadline = time.monotonic() + min(wait_seconds, MAX_GET_TASK_WAIT_S)
        with self._lock:
            while True:
                self._expire_stalled_tasks()
                in_flight = self._state.tasks_with_status("issued")
                current = [t for t in in_flight if t.client_id == client.id]
                if current:
                    return TaskOffer(task=current[0])
                if self._rounds.all_done:
                    self.clients_told_done.add(client.id)
                    latest, _ = current_version(self._state)
                    return TaskOffer(final_version=latest)
                opening = self._strategy.next_opening(client.id, in_flight)
                if opening is not None:
                    return TaskOffer(task=self._issue(client, opening))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TaskOffer(wait_reason="all open blocks are being trained")
                self._lock.wait(timeout=min(remaining, 1.0))

    def _issue(self, client: ClientRow, opening: Opening) -> TaskRow:
        latest, _ = current_version(self._state)
        now = time.time()
        task = TaskRow(id=self._strategy.task_id(opening), round=opening.round, block_index=opening.block_index,
                       client_id=client.id, base_version=latest, status="issued", issued_unix=now,
                       last_progress_unix=now, slot=opening.slot)
        self._state.issue_task(task)
        log.info("round %d: %s to %s (%s), base version %d", opening.round,
                 self._strategy.scope_name(opening.block_index), client.name, client.id, latest)
        return task

    def own_issued_task(self, client: ClientRow, task_id: str) -> TaskRow:
        """The task a transfer is for, if it is this client's and still open."""
        task = self._state.task(task_id)
        if task is None:
            raise Refusal(Status.NOT_FOUND, f"no task {task_id[:80]!r}")
        if task.client_id != client.id:
            raise Refusal(Status.PERMISSION_DENIED, f"task {task_id} belongs to another client")
        if task.status != "issued":
            raise Refusal(Status.FAILED_PRECONDITION, f"task {task_id} is {task.status}, no longer open")
        return task

    def heartbeat(self, client: ClientRow, beat: Beat) -> bool:
        """Liveness and memory; answers whether the client's task is still its own and open."""
        self._state.touch_client(client.id, gpu_peak_allocated_bytes=int64(beat.gpu_peak_allocated_bytes),
                                 gpu_peak_reserved_bytes=int64(beat.gpu_peak_reserved_bytes),
                                 host_rss_bytes=int64(beat.host_rss_bytes))
        self._metrics.observe_client_memory(client.name, int64(beat.gpu_peak_allocated_bytes),
                                            int64(beat.gpu_peak_reserved_bytes), int64(beat.host_rss_bytes))
        if not beat.task_id:
            return False
        task = self._state.task(beat.task_id)
        valid = task is not None and task.client_id == client.id and task.status == "issued"
        if valid:
            self._state.note_progress(beat.task_id)
            self._accounts.report(beat.task_id, beat.phase[:16], beat.step)
        return valid

    def active_clients(self) -> int:
        """Clients heard from within three heartbeat intervals."""
        horizon = time.time() - 3 * self._config.heartbeat_interval_s
        return sum(1 for c in self._state.clients() if c.last_seen_unix >= horizon)

    def _expire_stalled_tasks(self) -> None:
        """Reassign tasks whose client shows no sign of life: no heartbeat and no transfer progress
        for task_timeout_s. A slow but live client keeps its task however long the visit takes."""
        now = time.time()
        if now - self._last_expiry_scan < 1.0:  # every waiting GetTask calls this; once a second is enough
            return
        self._last_expiry_scan = now
        last_seen = {c.id: c.last_seen_unix for c in self._state.clients()}
        for task in self._state.tasks_with_status("issued"):
            # Our own downtime is not the client's silence: count from this process's start too.
            alive = max(task.last_progress_unix, last_seen.get(task.client_id, 0.0), self._started_unix)
            if now - alive > self._config.task_timeout_s and self._state.expire_task(task.id):
                self._accounts.close(task.id)
                self._metrics.visits.labels(outcome="reassigned").inc()
                log.warning("task %s (round %d) expired: no progress for %.0fs; it will be reassigned",
                            task.id, task.round, now - alive)
