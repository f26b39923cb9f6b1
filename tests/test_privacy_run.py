"""Differential privacy of each site's records (issue 17), as a run uses it: the accountant, the site's ledger, the
budget, and real runs over gRPC (a coordinator in-process, client daemons as processes).

The training side (per-example clipping, noise, Poisson sampling, the update-level mechanism) is tested in
``test_privacy_training.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from safetensors.torch import load_file

from conftest import address_of, wait_clients, write_data
from fedcybgd.cli.main import main as cli_main
from fedcybgd.cli.services import EXIT_PRIVACY_BUDGET_SPENT
from fedcybgd.client.metrics import ClientMetrics
from fedcybgd.client.privacy import (
    LEDGER_FILE,
    BudgetExceeded,
    PrivacyBudgetSpent,
    PrivacyLedger,
    SitePrivacy,
    Spend,
    epsilon_of,
    plan_visit,
)
from fedcybgd.server.config import PrivacyConfig, TrainingConfig
from fedcybgd.server.messages import privacy_of
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

TRAINING = TrainingConfig(local_steps=2, batch_size=2, seq_len=32)
SCHEDULE = ScheduleConfig(cycles=1, order="ascending", lr=1e-3)


# -- the accountant and the ledger -------------------------------------------------------------------

def test_epsilon_is_opacus_rdp_accountant_s_for_the_same_mechanism():
    accountant = RDPAccountant()
    accountant.history = [(1.1, 0.01, 500)]
    assert epsilon_of([Spend("records", 1.1, 0.01, 500)], 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    # Visits compose: five visits of 100 steps are one history of 500 steps.
    assert epsilon_of([Spend("records", 1.1, 0.01, 100)] * 5, 1e-5) == pytest.approx(
        accountant.get_epsilon(1e-5), rel=1e-9)
    # The noise Opacus picks for a target gives that target (within its search tolerance), not more.
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.02, steps=300,
                                 accountant="rdp")
    assert 2.9 < epsilon_of([Spend("records", sigma, 0.02, 300)], 1e-5) <= 3.0
    assert epsilon_of([], 1e-5) == 0.0
    assert epsilon_of([Spend("updates", 0.0, 1.0, 1)], 1e-5) == math.inf  # no noise: no guarantee


def _task(task_id: str, steps: int = 4, batch_size: int = 2, **privacy: object) -> pb.Task:
    config = PrivacyConfig(**privacy)  # type: ignore[arg-type]
    return pb.Task(task_id=task_id, hyper=pb.Hyper(local_steps=steps, batch_size=batch_size, seq_len=32,
                                                   privacy=privacy_of(config)))


def test_ledger_composes_visits_across_restarts_and_the_budget_declines_the_visit_past_it(tmp_path):
    path = tmp_path / LEDGER_FILE
    ledger = PrivacyLedger(path, "run-a")
    task = _task("t-0", records=True, noise_multiplier=1.0, target_epsilon=2.0)
    first = plan_visit(task.hyper.privacy, task, 100, ledger)
    assert first.record is not None and first.record.sample_rate == pytest.approx(0.02)
    assert first.update is None and first.update_epsilon == 0.0
    assert first.record_epsilon == pytest.approx(epsilon_of([Spend("records", 1.0, 0.02, 4)], 1e-5))
    ledger.charge(first.spends)

    reopened = PrivacyLedger(path, "run-a")  # a restarted daemon remembers what it spent
    assert reopened.visits == 1 and reopened.epsilon("records", 1e-5) == pytest.approx(first.record_epsilon)
    assert PrivacyLedger(path, "run-b").epsilon("records", 1e-5) == 0.0  # another run's ledger is its own
    spent = 0
    with pytest.raises(BudgetExceeded, match=r"records-level epsilon to .* past the run's target 2"):
        for i in range(1, 1000):
            visit = plan_visit(task.hyper.privacy, _task(f"t-{i}", records=True, noise_multiplier=1.0,
                                                         target_epsilon=2.0), 100, reopened)
            assert visit.record_epsilon <= 2.0
            reopened.charge(visit.spends)
            spent = i
    assert spent > 3 and reopened.epsilon("records", 1e-5) <= 2.0  # nothing past the target was charged
    # A small site samples a larger share of its records per step: its first visit already costs more.
    small = _task("s-0", records=True, noise_multiplier=1.0, target_epsilon=2.0)
    with pytest.raises(BudgetExceeded):
        plan_visit(small.hyper.privacy, small, 4, PrivacyLedger(tmp_path / "other.json", "run-a"))


def test_update_level_is_one_unsubsampled_gaussian_per_visit(tmp_path):
    task = _task("t-0", updates=True, update_noise_multiplier=5.0, update_clip_norm=0.5)
    visit = plan_visit(task.hyper.privacy, task, 100, PrivacyLedger(tmp_path / LEDGER_FILE, "run"))
    assert visit.record is None and visit.record_epsilon == 0.0
    assert visit.update is not None and visit.update.clip_norm == 0.5
    assert visit.update_epsilon == pytest.approx(epsilon_of([Spend("updates", 5.0, 1.0, 1)], 1e-5))


def test_privacy_settings_are_checked():
    for bad in (dict(noise_multiplier=-1), dict(clip_norm=0), dict(update_clip_norm=-2), dict(target_epsilon=-1),
                dict(delta=0), dict(delta=1)):
        with pytest.raises(ValueError, match="privacy"):
            PrivacyConfig(**bad)  # type: ignore[arg-type]
    assert privacy_of(PrivacyConfig()) is None  # off: tasks carry no privacy


# -- real runs ----------------------------------------------------------------------------------------

def _small_and_large_sites(tmp_path: Path) -> tuple[Path, Path]:
    """A site holding the first lines of one document (a sequence or two) and one holding every other document."""
    data, _ = write_data(tmp_path, clients=1)
    docs = data[0].read_text().splitlines()
    small, large = tmp_path / "data" / "small.jsonl", tmp_path / "data" / "large.jsonl"
    first_lines = "\n".join(json.loads(docs[0])["text"].splitlines()[:2])
    small.write_text(json.dumps({"text": first_lines}) + "\n")
    large.write_text("\n".join(docs[1:]) + "\n")
    return small, large


@pytest.mark.multiprocess
def test_a_site_over_its_budget_declines_and_the_run_goes_on_without_it(coordinators, clients, tmp_path):
    """The small site's first visit would cost more than the target (it samples a large share of its records per
    step): it declines before downloading anything, the task goes to the other site at once, and a restarted
    daemon of the small site is told it takes no more tasks. The large site finishes the run within its budget,
    and the epsilon status shows is what its own ledger composes to."""
    small, large = _small_and_large_sites(tmp_path)
    privacy = PrivacyConfig(records=True, noise_multiplier=1.0, clip_norm=1.0, target_epsilon=4.0)
    running = coordinators.start(training=TRAINING, schedule=SCHEDULE, privacy=privacy, grace=1)
    coordinator = running.coordinator
    address = address_of(running)
    shy = clients.start(address, small, tmp_path / "caches" / "small", "small")
    assert shy.wait(timeout=120) == EXIT_PRIVACY_BUDGET_SPENT
    log = (tmp_path / "caches" / "small.log").read_text()
    assert "privacy budget" in log and "past the run's target 4" in log
    [declined] = coordinator.state.tasks_with_status("expired")
    assert declined.round == 0 and coordinator.state.visits() == []
    blobs = tmp_path / "caches" / "small" / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*")), "declined: nothing downloaded"

    again = clients.start(address, small, tmp_path / "caches" / "small", "small")
    assert again.wait(timeout=120) == EXIT_PRIVACY_BUDGET_SPENT
    assert "takes no more in this run" in (tmp_path / "caches" / "small.log").read_text()

    wait_clients([clients.start(address, large, tmp_path / "caches" / "large", "large")], timeout=300)
    assert coordinator.all_rounds_done
    visits = coordinator.state.visits()
    assert sorted(v.round for v in visits) == list(range(coordinator.schedule.total_rounds))
    assert {v.client_id for v in visits} == {visits[0].client_id}
    assert all(math.isnan(v.record.loss_before) and math.isnan(v.record.loss_after) for v in visits)

    status = {c.name: c for c in coordinator.status(pb.GetStatusRequest(summary=True)).clients}
    assert "past the run's target 4" in status["small"].declined and status["small"].record_epsilon == 0
    ledger = json.loads((tmp_path / "caches" / "large" / LEDGER_FILE).read_text())
    [spends] = ledger["runs"].values()
    assert len(spends) == len(visits)
    composed = epsilon_of([Spend(**s) for s in spends], privacy.delta)
    assert status["large"].record_epsilon == pytest.approx(composed) and 0 < composed <= 4.0
    assert status["large"].update_epsilon == 0 and status["large"].declined == ""
    epsilon_series = coordinator.metrics.registry.get_sample_value  # the dashboard's "epsilon per site" panel
    assert epsilon_series("fedcybgd_dp_epsilon", {"client": "large", "level": "records"}) == pytest.approx(composed)
    assert epsilon_series("fedcybgd_dp_epsilon", {"client": "small", "level": "records"}) is None  # never spent any
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        assert cli_main(["status", "--insecure", "--coordinator", address]) == 0
    assert f"privacy spent: epsilon {composed:.3g} (records)" in shown.getvalue()
    assert "declined: privacy budget" in shown.getvalue()


@pytest.mark.multiprocess
def test_update_level_clipping_reaches_the_coordinator(coordinators, clients, tmp_path):
    """Client-level protection, end to end, with DP-SGD on too: each visit's update is clipped to a tiny norm
    before upload, so the final model is the base model to within that norm per visit, whatever the sites
    trained; the sites report their epsilons (no noise on updates: no finite epsilon) and no losses."""
    data, _ = write_data(tmp_path, clients=2)
    privacy = PrivacyConfig(records=True, noise_multiplier=0.8, clip_norm=1.0, updates=True,
                            update_noise_multiplier=0.0, update_clip_norm=1e-4)
    running = coordinators.start(training=TRAINING, schedule=SCHEDULE, privacy=privacy, grace=1)
    coordinator = running.coordinator
    procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}")
             for i in range(2)]
    wait_clients(procs, timeout=300)
    assert coordinator.all_rounds_done
    _, final = coordinator.state.latest_version()
    base = coordinator.state.manifest(0)
    visits = coordinator.state.visits()
    changed = 0.0
    for b, f in zip(base, final, strict=True):
        start, end = (load_file(str(coordinator.store.blobs.path(sha))) for sha in (b, f))
        changed += sum(float((end[k].float() - start[k].float()).norm()) ** 2 for k in start)
    assert 0 < math.sqrt(changed) <= 1e-4 * len(visits) * 1.01
    status = coordinator.status(pb.GetStatusRequest(summary=True)).clients
    assert all(0 < c.record_epsilon < math.inf and c.update_epsilon == math.inf for c in status if
               c.visits_completed)


def test_a_site_s_own_limit_holds_whatever_the_coordinator_sets(tmp_path):
    """The coordinator sets the target too: a site that does not trust it declines past its own ``--max-epsilon``
    (even when the run sets no target), and refuses a run that is not private at all."""
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE, "run")
    task = _task("t-0", records=True, noise_multiplier=1.0, target_epsilon=0.0)  # the run: no limit
    assert 0 < plan_visit(task.hyper.privacy, task, 100, ledger).record_epsilon < 2.0
    with pytest.raises(BudgetExceeded, match="past this site's target 0.1"):
        plan_visit(task.hyper.privacy, task, 100, ledger, site_limit=0.1)
    declined: list[tuple[str, str]] = []
    site = SitePrivacy(ledger, ClientMetrics(torch.device("cpu")), lambda t, r: declined.append((t, r)),
                       site_limit=5.0)
    with pytest.raises(PrivacyBudgetSpent, match="not differentially private"):
        site.plan(pb.Task(task_id="t-1", hyper=pb.Hyper(local_steps=4, batch_size=2)), lambda: 100)
    assert declined and declined[0][0] == "t-1" and "--max-epsilon" in declined[0][1]
    assert SitePrivacy(ledger, ClientMetrics(torch.device("cpu")), lambda t, r: None).plan(
        pb.Task(task_id="t-2", hyper=pb.Hyper(local_steps=4, batch_size=2)), lambda: 100) is None
