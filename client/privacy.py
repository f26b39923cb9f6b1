"""This site's differential privacy: what its visits have spent, and whether it can take the next task.

Only the site knows how many sequences it holds, and so the sampling rate of DP-SGD (``batch_size / sequences``)
and its epsilon; the coordinator only sets the mechanism (noise multiplier, clip norms) and the target. The site
keeps a ledger of every private visit it *started*, in its cache directory (``privacy-ledger.json``), so that a
restart does not forget what was spent, and composes them with Opacus's RDP accountant:

* records level (DP-SGD): each visit is ``steps`` compositions of the Poisson-subsampled Gaussian mechanism with
  rate ``q`` and noise multiplier ``sigma``; the unit protected is one training sequence;
* updates level: each visit is one Gaussian mechanism (no subsampling, ``q = 1``) on the clipped update; the unit is
  the site's whole data, and nothing averages the noise away (one client per visit), so only a large noise
  multiplier gives a small epsilon (docs/security.md).

A visit is charged *before* it trains (a visit abandoned after training still touched the data), and a task that
would take either level past the target is declined before anything is downloaded.
"""
from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from fedcybgd.client.metrics import ClientMetrics
from fedcybgd.training.hyper import RecordPrivacy, UpdatePrivacy, VisitHyper
from fedcybgd.v1 import coordinator_pb2 as pb

log = logging.getLogger("fedcybgd.client")

__all__ = ["Spend", "PrivacyLedger", "VisitPrivacy", "SitePrivacy", "BudgetExceeded", "PrivacyBudgetSpent",
           "plan_visit", "private_hyper", "epsilon_of", "LEDGER_FILE"]

LEDGER_FILE = "privacy-ledger.json"
RECORDS, UPDATES = "records", "updates"


class BudgetExceeded(RuntimeError):
    """The task would take this site past the run's target epsilon: it is declined, and the site takes no more."""


class PrivacyBudgetSpent(RuntimeError):
    """This site's differential-privacy budget for the run is spent (it declined a task, or the coordinator knows it
    did): the daemon stops, since every later task would cost as much."""


@dataclass(frozen=True)
class Spend:
    """One visit's privacy cost at one level: ``steps`` compositions of a Gaussian mechanism with noise multiplier
    ``noise_multiplier``, subsampled with rate ``sample_rate`` (1: not subsampled)."""

    level: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    task_id: str = ""


def epsilon_of(spends: list[Spend], delta: float) -> float:
    """Epsilon at ``delta`` of all ``spends`` composed (RDP accountant of Opacus; its default orders). A spend
    without noise has no finite epsilon."""
    if not spends:
        return 0.0
    if any(s.noise_multiplier <= 0 for s in spends):
        return math.inf
    from opacus.accountants import RDPAccountant  # scipy and opacus load only for a private run

    accountant = RDPAccountant()
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in spends]
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


class PrivacyLedger:
    """The spends of this site's private visits, per run (keyed by the run's model id), kept on disk."""

    def __init__(self, path: Path, run_key: str) -> None:
        self.path, self.run_key = path, run_key
        self._runs: dict[str, list[dict]] = json.loads(path.read_text())["runs"] if path.exists() else {}

    def spends(self, level: str) -> list[Spend]:
        return [s for s in (Spend(**raw) for raw in self._runs.get(self.run_key, [])) if s.level == level]

    def epsilon(self, level: str, delta: float, more: Sequence[Spend] = ()) -> float:
        """Epsilon at ``delta`` of this level's spends, with ``more`` (a visit not charged yet)."""
        return epsilon_of(self.spends(level) + [s for s in more if s.level == level], delta)

    @property
    def visits(self) -> int:
        return len({s["task_id"] for s in self._runs.get(self.run_key, [])})

    def charge(self, spends: list[Spend]) -> None:
        """Record spends durably (written and synced before the visit trains)."""
        self._runs.setdefault(self.run_key, []).extend(asdict(s) for s in spends)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"runs": self._runs}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class VisitPrivacy:
    """What a private visit does (record- and/or update-level mechanisms) and the site's epsilons after it."""

    record: RecordPrivacy | None
    update: UpdatePrivacy | None
    spends: list[Spend]
    record_epsilon: float
    update_epsilon: float
    delta: float


def plan_visit(privacy: pb.Privacy, task: pb.Task, sequences: int, ledger: PrivacyLedger,
               site_limit: float = 0.0) -> VisitPrivacy:
    """The mechanisms of this visit and the epsilons it leads to; ``BudgetExceeded`` when either would pass the
    target: the run's, or the site's own ``site_limit`` when that is lower (> 0: a site that does not trust the
    coordinator's target). ``sequences``: the site's training sequences (the records DP-SGD samples from)."""
    record = update = None
    spends = []
    if privacy.records:
        rate = min(1.0, task.hyper.batch_size / max(sequences, 1))
        record = RecordPrivacy(noise_multiplier=privacy.noise_multiplier, clip_norm=privacy.clip_norm,
                               sample_rate=rate)
        spends.append(Spend(RECORDS, privacy.noise_multiplier, rate, task.hyper.local_steps, task.task_id))
    if privacy.updates:
        update = UpdatePrivacy(noise_multiplier=privacy.update_noise_multiplier, clip_norm=privacy.update_clip_norm)
        spends.append(Spend(UPDATES, privacy.update_noise_multiplier, 1.0, 1, task.task_id))
    record_eps = ledger.epsilon(RECORDS, privacy.delta, spends) if privacy.records else 0.0
    update_eps = ledger.epsilon(UPDATES, privacy.delta, spends) if privacy.updates else 0.0
    target = min((t for t in (privacy.target_epsilon, site_limit) if t > 0), default=0.0)
    if target > 0 and max(record_eps, update_eps) > target:
        level, eps = (RECORDS, record_eps) if record_eps >= update_eps else (UPDATES, update_eps)
        raise BudgetExceeded(
            f"privacy budget: task {task.task_id} would take this site's {level}-level epsilon to {eps:.3g} "
            f"(delta {privacy.delta:g}) after {ledger.visits} private visits, past "
            f"{'the run' if target == privacy.target_epsilon else 'this site'}'s target {target:g}")
    return VisitPrivacy(record, update, spends, record_eps, update_eps, privacy.delta)


def private_hyper(hyper: VisitHyper, private: VisitPrivacy) -> VisitHyper:
    """The visit's hyper-parameters under differential privacy: DP-SGD where the records level is on, and no loss
    measured before and after (it would be computed on the records without noise, and is not reported)."""
    return replace(hyper, privacy=private.record, eval_batches=0)


class SitePrivacy:
    """The daemon's side of differential privacy: plan each task against the ledger (declining it through
    ``decline(task_id, reason)`` when it would pass the target), charge it before training, report after."""

    def __init__(self, ledger: PrivacyLedger, metrics: ClientMetrics, decline: Callable[[str, str], object],
                 site_limit: float = 0.0) -> None:
        self.ledger, self._metrics, self._decline, self.site_limit = ledger, metrics, decline, site_limit

    def plan(self, task: pb.Task, sequences: Callable[[], int]) -> VisitPrivacy | None:
        """The task's mechanisms and the site's epsilons after it (None: the run is not private); a task past the
        budget is declined (the coordinator reassigns it at once) and ``PrivacyBudgetSpent`` raised."""
        try:
            if not task.hyper.HasField("privacy"):
                if self.site_limit > 0:  # this site requires differential privacy: a run without it is refused
                    raise BudgetExceeded(f"privacy budget: task {task.task_id} is not differentially private and "
                                         f"this site allows epsilon {self.site_limit:g} at most (--max-epsilon)")
                return None
            return plan_visit(task.hyper.privacy, task, sequences(), self.ledger, self.site_limit)
        except BudgetExceeded as err:
            self._decline(task.task_id, str(err))
            raise PrivacyBudgetSpent(str(err)) from err

    def charge(self, private: VisitPrivacy, hyper: VisitHyper) -> VisitHyper:
        """Record the visit's spends durably; the hyper-parameters it trains with."""
        self.ledger.charge(private.spends)
        return private_hyper(hyper, private)

    def report(self, header: pb.UploadHeader, private: VisitPrivacy, hyper: VisitHyper) -> None:
        """The upload's header under differential privacy: the site's epsilons; no training losses, and the
        expected rather than the drawn number of sequences (both come from the records without noise)."""
        header.record_epsilon, header.update_epsilon = private.record_epsilon, private.update_epsilon
        header.loss_before = header.loss_after = math.nan
        header.samples = hyper.steps * hyper.batch_size
        header.tokens = header.samples * hyper.seq_len
        self._metrics.dp_epsilon.labels(level=RECORDS).set(private.record_epsilon)
        self._metrics.dp_epsilon.labels(level=UPDATES).set(private.update_epsilon)
        log.info("privacy: epsilon %.3g (records), %.3g (updates) at delta %g after %d private visits",
                 private.record_epsilon, private.update_epsilon, private.delta, self.ledger.visits)
