"""Per-task bookkeeping of open tasks: bytes moved (published with the visit when it commits)
and the phase and step the client last reported (shown by status). Forgotten when the task
ends, so it holds only open tasks however long the run."""
from __future__ import annotations

import threading

from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.records import TaskProgress


class TaskAccounts:
    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self._metrics = metrics
        self._tasks: dict[str, TaskProgress] = {}
        self._lock = threading.Lock()

    def count(self, task_id: str, direction: str, kind: str, wire: int, raw: int) -> None:
        """Bytes of a transfer: on the wire and decoded, by direction and kind (block/full/context)."""
        self._metrics.count_transfer(direction, kind, wire, raw)
        with self._lock:
            totals = self._tasks.setdefault(task_id, TaskProgress()).bytes.setdefault((direction, kind), [0, 0])
            totals[0] += wire
            totals[1] += raw

    def report(self, task_id: str, phase: str, step: int) -> None:
        with self._lock:
            progress = self._tasks.setdefault(task_id, TaskProgress())
            progress.phase, progress.step = phase, step

    def progress(self, task_id: str) -> TaskProgress:
        with self._lock:
            return self._tasks.get(task_id, TaskProgress())

    def close(self, task_id: str) -> dict[tuple[str, str], tuple[int, int]]:
        """The task ended: its byte totals, (direction, kind) -> (wire, raw); forgotten here."""
        with self._lock:
            progress = self._tasks.pop(task_id, TaskProgress())
        return {key: (wire, raw) for key, (wire, raw) in progress.bytes.items()}
