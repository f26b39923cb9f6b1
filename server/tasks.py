"""The task board: who trains what when. Long-polled GetTask, issuing the openings the strategy
offers, heartbeats, and reassigning tasks whose client went silent.

Everything here runs under the scheduling lock (a `threading.Condition`): a commit notifies it,
which wakes the clients waiting for work.

Memory: a client gets only blocks it is predicted to hold (`fedcybgd.server.memory_fit`). The
strategy picks among them through the predicate the board hands to `next_opening`; a client that
cannot hold the open block waits and is told which block, its predicted peak and its own memory;
a client that holds no block of the run is refused (RESOURCE_EXHAUSTED): waiting would not help.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.enrolment import int64
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.history import CompletedRounds
from fedcybgd.server.memory_fit import MemoryFit
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
                 lock: threading.Condition, memory: MemoryFit | None = None) -> None:
        self._config = config
        self._state = state
        self._strategy = strategy
        self._rounds = rounds
        self._accounts = accounts
        self._metrics = metrics
        self._lock = lock
        self._memory = memory or MemoryFit(None)
        self._started_unix = time.time()
        self._last_expiry_scan = 0.0
        self.clients_told_done: set[str] = set()
        self._memory_waits: dict[str, str] = {}  # client id -> why it last waited for memory (lock held)
        self._logged_withheld: set[tuple[str, int]] = set()  # (client id, block): logged once each
        self._logged_refused: set[str] = set()  # client ids refused for memory: logged once each

    def get_task(self, client: ClientRow, wait_seconds: int) -> TaskOffer:
        """The client's open task (a retried GetTask gets it back), a new one, or after at most
        `wait_seconds` (capped) a request to come back later. Only blocks the client is predicted to hold
        in its memory are issued to it; Refusal(RESOURCE_EXHAUSTED) when it holds none of the run's."""
        self._state.touch_client(client.id)
        self._memory.prepare(client)  # slow once per memory profile: never under the scheduling lock
        deadline = time.monotonic() + min(wait_seconds, MAX_GET_TASK_WAIT_S)
        withheld_counted = False
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
                self._refuse_if_too_small(client)
                withheld: list[int] = []
                opening = self._strategy.next_opening(client.id, in_flight, self._can_hold(client, withheld))
                if opening is not None:
                    self._memory_waits.pop(client.id, None)
                    return TaskOffer(task=self._issue(client, opening))
                if withheld:
                    reason = self._memory.too_small_for(client, withheld[0])
                    self._note_withheld(client, withheld[0], reason, count=not withheld_counted)
                    withheld_counted = True
                else:
                    self._memory_waits.pop(client.id, None)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TaskOffer(wait_reason=self._memory_waits.get(client.id, "all open blocks are being trained"))
                self._lock.wait(timeout=min(remaining, 1.0))

    def _can_hold(self, client: ClientRow, withheld: list[int]) -> Callable[[int], bool]:
        """The predicate the strategy filters its openings with; the blocks it said no to go to `withheld`."""
        def can_hold(block_index: int) -> bool:
            fits = self._memory.fits(client, block_index)
            if not fits:
                withheld.append(block_index)
            return fits
        return can_hold

    def _refuse_if_too_small(self, client: ClientRow) -> None:
        """A client whose memory holds no block's visit is told so, not told to wait (lock held)."""
        why = self._memory.holds_nothing(client)
        if why is None:
            return
        self._metrics.tasks_withheld.labels(reason="no_block_fits").inc()
        if client.id not in self._logged_refused:
            self._logged_refused.add(client.id)
            log.warning("client %s (%s) refused: %s", client.name, client.id, why)
        raise Refusal(Status.RESOURCE_EXHAUSTED, why)

    def _note_withheld(self, client: ClientRow, block_index: int, reason: str, count: bool) -> None:
        """A block withheld from a client for memory: for its Wait, status, the metric (once per GetTask) and the
        log (once per client and block). Lock held."""
        self._memory_waits[client.id] = reason
        if count:
            self._metrics.tasks_withheld.labels(reason="memory").inc()
        if (client.id, block_index) not in self._logged_withheld:
            self._logged_withheld.add((client.id, block_index))
            log.info("client %s (%s) waits: %s", client.name, client.id, reason)

    def memory_waits(self) -> dict[str, str]:
        """Client id -> why it last waited for memory, for clients whose last GetTask found no block they hold."""
        with self._lock:
            return dict(self._memory_waits)

    def memory_stall(self) -> str:
        """Why the run does not progress, when it is for memory: rounds remain, nothing is in flight, and every
        active client was last told that the open block does not fit it ("" otherwise)."""
        with self._lock:
            if self._rounds.all_done or self._state.tasks_with_status("issued"):
                return ""
            active = self._active_client_ids()
            notes = [self._memory_waits[c] for c in active if c in self._memory_waits]
            if not active or len(notes) < len(active):
                return ""
            return f"every connected client is too small for the next block ({len(active)} waiting): {notes[0]}"

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
        return len(self._active_client_ids())

    def _active_client_ids(self) -> set[str]:
        horizon = time.time() - 3 * self._config.heartbeat_interval_s
        return {c.id for c in self._state.clients() if c.last_seen_unix >= horizon}

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
