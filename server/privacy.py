"""What the coordinator knows of each site's differential privacy: the epsilon it reported with its last accepted
upload, and why it last declined a task (``DeclineTask``).

The sites account for themselves (``client/privacy.py``): only a site knows how many records it holds, and so its
sampling rate and its epsilon. The coordinator keeps what they report, durably (state meta, so that status after a
restart still shows it), for operators (status) and Grafana (a gauge per site and level). It never trusts these
figures for anything but display.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.records import UploadClaim
from fedcybgd.server.state import ClientRow, CoordinatorState

log = logging.getLogger("fedcybgd.privacy")

#: Longest decline reason kept (a peer's text is bounded like everything it sends).
MAX_REASON_CHARS = 500
_META_PREFIX = "privacy/"


@dataclass(frozen=True)
class SitePrivacy:
    """One site's privacy as it last reported it."""

    record_epsilon: float = 0.0
    update_epsilon: float = 0.0
    declined: str = ""


class PrivacyReports:
    def __init__(self, state: CoordinatorState, accounts: TaskAccounts, metrics: CoordinatorMetrics,
                 lock: threading.Condition) -> None:
        self._state, self._accounts, self._metrics, self._lock = state, accounts, metrics, lock
        self._declined: set[str] = set()
        for client in state.clients():
            privacy = self.of(client.id)
            self._show(client.name, privacy)
            if privacy.declined:
                self._declined.add(client.id)

    def refuse_declined(self, client: ClientRow) -> None:
        """FAILED_PRECONDITION for a site that declined a task for its budget: every later task of the run would
        cost it as much, so it is given none (a restarted daemon learns it at once, instead of declining again)."""
        if client.id in self._declined:
            raise Refusal(Status.FAILED_PRECONDITION,
                          f"this site declined a task and takes no more in this run: {self.of(client.id).declined}")

    def of(self, client_id: str) -> SitePrivacy:
        raw = self._state.get_meta(_META_PREFIX + client_id)
        return SitePrivacy(**json.loads(raw)) if raw else SitePrivacy()

    def reported(self, client: ClientRow, claim: UploadClaim) -> None:
        """An accepted upload's epsilons (nothing is stored for a run without privacy)."""
        if claim.record_epsilon == 0 and claim.update_epsilon == 0:
            return
        with self._lock:
            now = SitePrivacy(claim.record_epsilon, claim.update_epsilon, self.of(client.id).declined)
            self._save(client, now)

    def declined(self, client: ClientRow, task_id: str, reason: str) -> None:
        """The client will not do its task in flight: it goes back to the schedule at once (FAILED_PRECONDITION
        for a task that is not this client's task in flight), and the reason is kept for status."""
        reason = "".join(ch for ch in reason[:MAX_REASON_CHARS] if ch.isprintable()) or "no reason given"
        with self._lock:
            task = self._state.task(task_id)
            if task is None or task.client_id != client.id or task.status != "issued":
                raise Refusal(Status.FAILED_PRECONDITION, f"task {task_id!r} is not a task of this client in flight")
            if self._state.expire_task(task_id):
                self._accounts.close(task_id)
                self._metrics.visits.labels(outcome="reassigned").inc()
                self._lock.notify_all()  # the scheduling lock: clients waiting in GetTask may take it now
            before = self.of(client.id)
            self._save(client, SitePrivacy(before.record_epsilon, before.update_epsilon, reason))
            self._declined.add(client.id)
        log.warning("client %s (%s) declined task %s: %s", client.name, client.id, task_id, reason)

    def _save(self, client: ClientRow, privacy: SitePrivacy) -> None:
        self._state.set_meta({_META_PREFIX + client.id: json.dumps(asdict(privacy))})
        self._show(client.name, privacy)

    def _show(self, name: str, privacy: SitePrivacy) -> None:
        if privacy.record_epsilon or privacy.update_epsilon:
            self._metrics.dp_epsilon.labels(client=name, level="records").set(privacy.record_epsilon)
            self._metrics.dp_epsilon.labels(client=name, level="updates").set(privacy.update_epsilon)
