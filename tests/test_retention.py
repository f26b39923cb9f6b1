"""Coordinator retention (server/retention.py): only the base, the newest, checkpoints, in-flight bases and what
active clients hold stay on disk; a blob goes only when no kept version references it; export of a pruned
version fails naming the nearest kept ones; a restart after pruning (or in the middle of it) works."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    PROCESS_ENV,
    ClientProcesses,
    Coordinators,
    address_of,
    wait_clients,
    wait_for,
    write_data,
)
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.data import load_packed
from fedcybgd.server.app import RunningCoordinator
from fedcybgd.server.config import CoordinatorConfig, EvalConfig, RetentionConfig, TrainingConfig
from fedcybgd.server.export import PrunedVersionError, best_version, check_exportable, export_version
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.reference import run_reference
from fedcybgd.server.retention import Retention, checkpoint_rule, plan_sweep
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
from fedcybgd.server.state import ClientRow, SqliteState, TaskRow
from fedcybgd.v1 import coordinator_pb2 as pb

# -- the rule on synthetic manifests ----------------------------------------------------------------------------

class SyntheticRun:
    """A run without training: each commit changes one block (round robin) to a new blob of made-up bytes."""

    def __init__(self, tmp_path: Path, checkpoint_every: int | None, blocks: int = 3,
                 state: SqliteState | None = None) -> None:
        self.blocks = blocks
        self.state = state or SqliteState(tmp_path / "state.sqlite")
        self.blobs = BlobStore(tmp_path / "blobs")
        self.metrics = CoordinatorMetrics()
        self.pinned: set[int] = set()
        if self.state.latest_version() is None:
            self.state.add_version(0, [self.blobs.put(f"v0-b{i}".encode()) for i in range(blocks)], None)
        self.retention = Retention(RetentionConfig(checkpoint_every=checkpoint_every), self.state, self.blobs,
                                   CycleSchedule(blocks, ScheduleConfig(cycles=20)), threading.Condition(),
                                   self.metrics, pinned=lambda: self.pinned)

    def commit(self) -> int:
        latest = self.state.latest_version()
        assert latest is not None
        version, manifest = latest[0] + 1, list(latest[1])
        block = (version - 1) % self.blocks
        manifest[block] = self.blobs.put(f"v{version}-b{block}".encode())
        self.state.add_version(version, manifest, version - 1)
        self.retention.committed(version)
        return version

    def kept(self) -> set[int]:
        return {k.version for k in self.state.kept_versions()}

    def assert_store_holds_exactly_the_kept_versions(self) -> None:
        referenced = {sha for k in self.state.kept_versions() for sha in k.manifest}
        assert set(self.blobs) == referenced


def test_checkpoints_default_to_the_end_of_every_cycle():
    schedule = CycleSchedule(5, ScheduleConfig(cycles=3), layer_blocks=4)  # 4 + 4 + 5 rounds (embed_head last)
    assert {v for v in range(14) if checkpoint_rule(None, schedule)(v)} == {0, 4, 8, 13}
    assert {v for v in range(14) if checkpoint_rule(3, schedule)(v)} == {0, 3, 6, 9, 12}
    assert all(checkpoint_rule(0, schedule)(v) for v in range(14))


def test_the_rule_keeps_newest_in_flight_held_and_pinned():
    plan = plan_sweep([1, 2, 5, 7, 9, 11], newest=11, in_flight={5}, held={7}, pinned={9})
    assert plan.prune == [1, 2]
    assert plan.kept == {5: "in-flight base", 7: "held by an active client", 9: "pinned", 11: "newest"}


def test_only_the_kept_versions_blobs_remain_and_shared_blocks_stay(tmp_path):
    run = SyntheticRun(tmp_path, checkpoint_every=4)
    for _ in range(10):
        run.commit()
        run.assert_store_holds_exactly_the_kept_versions()
    assert run.kept() == {0, 4, 8, 10}
    assert run.state.pruned_pending() == []
    assert run.state.is_pruned(3) and not run.state.is_pruned(4)
    # Version 3 changed block 2; versions 4 and 5 still have that blob (block 2 changes again in 6): it stays.
    v3_block2 = run.state.manifest(3)[2]
    assert run.blobs.has(v3_block2) and run.state.manifest(4)[2] == v3_block2
    # Version 1's block 0 was replaced in version 4: no kept version has it any more.
    assert not run.blobs.has(run.state.manifest(1)[0])
    assert run.metrics.versions_pruned._value.get() == 7


def test_the_best_evaluated_version_stays_until_a_better_one_is_evaluated(tmp_path):
    """The coordinator pins its evaluator's pending versions and the lowest held-out loss so far (``retained``):
    past about one pass a run overfits, and `fedcybgd export --best` must still find its best version."""
    run = SyntheticRun(tmp_path, checkpoint_every=100)
    evaluated = {2: 3.0, 4: 2.5, 6: 2.7, 8: 2.6}

    def pinned() -> set[int]:
        best = run.state.best_eval()
        return {best[0]} if best else set()

    run.retention = Retention(RetentionConfig(checkpoint_every=100), run.state, run.blobs,
                              CycleSchedule(run.blocks, ScheduleConfig(cycles=20)), threading.Condition(),
                              run.metrics, pinned=pinned)
    with pytest.raises(ValueError, match="no held-out evaluations"):
        best_version(run.state)
    for _ in range(10):
        version = run.commit()
        if version in evaluated:
            run.state.add_eval(version, version, evaluated[version])
    assert run.kept() == {0, 4, 10}, "the base, the best evaluated version and the newest"
    assert best_version(run.state) == (4, 2.5)
    run.state.add_eval(10, 10, 2.4)
    run.commit()
    assert run.kept() == {0, 10, 11}, "a better evaluation releases the previous best"
    run.assert_store_holds_exactly_the_kept_versions()


def test_every_version_stays_when_checkpoint_every_is_zero(tmp_path):
    run = SyntheticRun(tmp_path, checkpoint_every=0)
    for _ in range(6):
        run.commit()
    assert run.kept() == set(range(7))


def test_in_flight_bases_and_what_active_clients_hold_stay_until_released(tmp_path):
    run = SyntheticRun(tmp_path, checkpoint_every=100)
    now = time.time()
    for i, seen in enumerate((0.0, now, 0.0)):  # c0: long silent, with a task in flight; c1 active; c2 gone
        run.state.add_client(ClientRow(id=f"c{i}", name=f"site-{i}", device_kind="cpu", memory_bytes=1,
                                       registered_unix=seen, last_seen_unix=seen), f"{i:064x}")

    def task(tid: str, client: str, base: int, t: float) -> None:
        run.state.issue_task(TaskRow(id=tid, round=base, block_index=0, client_id=client, base_version=base,
                                     status="issued", issued_unix=t, last_progress_unix=t))

    run.pinned = {1}                         # a reader (the evaluator) still needs version 1
    for _ in range(2):
        run.commit()
    task("t0", "c0", 2, now)                 # in flight from version 2
    run.commit()
    task("t1", "c1", 3, now - 20)            # c1's two newest downloads: versions 3 and 5
    run.commit()
    task("t3", "c2", 4, 0.0)                 # a client not heard from for long: its versions go once it is done
    run.commit()
    task("t2", "c1", 5, now - 10)
    for tid in ("t1", "t2", "t3"):
        run.state.expire_task(tid)
    for _ in range(3):
        run.commit()
    assert run.kept() == {0, 1, 2, 3, 5, 8}
    run.assert_store_holds_exactly_the_kept_versions()

    run.state.expire_task("t0")
    run.pinned = set()
    run.commit()
    assert run.kept() == {0, 3, 5, 9}
    run.assert_store_holds_exactly_the_kept_versions()


def test_what_active_clients_hold_is_looked_up_by_index_not_by_a_scan(tmp_path):
    """A sweep's per-client look-ups cost the same however many tasks and visits the run has made."""
    state = SqliteState(tmp_path / "state.sqlite")

    def plan(sql: str) -> str:
        return " | ".join(row[3] for row in state._db.execute(f"EXPLAIN QUERY PLAN {sql}", ("c0",)))

    tasks = plan("SELECT base_version AS v FROM tasks WHERE client_id = ? ORDER BY issued_unix DESC LIMIT 2")
    visits = plan("SELECT new_version AS v FROM visits WHERE client_id = ? ORDER BY round DESC LIMIT 1")
    assert "USING INDEX tasks_by_client" in tasks and "TEMP B-TREE" not in tasks, tasks
    assert "USING INDEX visits_by_client" in visits and "TEMP B-TREE" not in visits, visits


def test_a_restart_finishes_a_sweep_that_a_crash_interrupted(tmp_path):
    run = SyntheticRun(tmp_path, checkpoint_every=0)   # keeps everything: the crash is simulated below
    for _ in range(5):
        run.commit()
    run.state.prune_versions([1, 2, 3])  # recorded, blobs not deleted yet: the process died here
    restarted = SyntheticRun(tmp_path, checkpoint_every=2, state=run.state)
    assert run.state.pruned_pending() == []
    restarted.assert_store_holds_exactly_the_kept_versions()
    assert restarted.kept() == {0, 4, 5}
    restarted.commit()
    assert restarted.kept() == {0, 4, 6}
    restarted.assert_store_holds_exactly_the_kept_versions()


def test_export_of_a_pruned_version_names_the_nearest_kept_ones(tmp_path):
    run = SyntheticRun(tmp_path, checkpoint_every=4)
    for _ in range(9):
        run.commit()
    with pytest.raises(PrunedVersionError, match=r"version 6 was pruned .* nearest kept versions are 4 and 8"):
        check_exportable(run.state, 6)
    with pytest.raises(ValueError, match="no model version 12: the run has versions 0 to 9"):
        check_exportable(run.state, 12)
    check_exportable(run.state, 8)


# -- a real run ----------------------------------------------------------------------------------------------

SCHEDULE = ScheduleConfig(cycles=3, order="ascending", lr=3e-3, seed=5)  # 4 + 4 + 5 visits on the tiny model
TRAINING = TrainingConfig(local_steps=3, batch_size=2, seq_len=64)


def _export(state_dir: Path, out: Path, version: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcybgd.cli.main", "export", "--state-dir", str(state_dir),
                           "--out", str(out), "--version", str(version)],
                          capture_output=True, text=True, timeout=300, env=PROCESS_ENV)


def _run_to_the_end(coordinators: Coordinators, clients: ClientProcesses, config: CoordinatorConfig,
                    data: list[Path], tmp_path: Path) -> RunningCoordinator:
    """A coordinator and one client process per data folder, until the run (and its last evaluation) is over."""
    running = coordinators.start(config, grace=1)
    wait_clients([clients.start(address_of(running), folder, tmp_path / "caches" / f"site-{i}", f"site-{i}")
                  for i, folder in enumerate(data)])
    wait_for(lambda: running.coordinator.finished, 120, "the run's end")
    return running


@pytest.mark.multiprocess
def test_a_run_keeps_only_retained_versions_and_exports_them_exactly(tiny_model_dir, tmp_path,
                                                                     coordinators: Coordinators,
                                                                     clients: ClientProcesses):
    data, eval_data = write_data(tmp_path, clients=3)
    config = coordinators.config(schedule=SCHEDULE, training=TRAINING, retention=RetentionConfig(checkpoint_every=3),
                                 eval=EvalConfig(data=str(eval_data), max_sequences=8, batch_size=4))
    running = _run_to_the_end(coordinators, clients, config, data, tmp_path)
    coordinator = running.coordinator
    state, store = coordinator.state, coordinator.store
    visits = state.visits()
    assert [v.new_version for v in visits] == list(range(1, 14))

    kept = {k.version for k in state.kept_versions()}
    assert {0, 3, 6, 9, 12, 13} <= kept, "the base, the checkpoints and the newest stay"
    # Which versions an active client still holds depends on how the clients raced; the first is never held long.
    assert 1 not in kept and len(set(range(14)) - kept) >= 2, "versions nobody holds any more were pruned"
    assert set(store.blobs) == {sha for k in state.kept_versions() for sha in k.manifest}
    assert {v for v, _, _ in state.evals()} >= {0, 13}, "evaluation never met a pruned version"
    best, _ = best_version(state)
    assert best in kept, "the version with the lowest held-out loss stays for `export --best`"
    registry = coordinator.metrics.registry
    assert registry.get_sample_value("fedcybgd_coordinator_blob_bytes") == store.blobs.disk_bytes() > 0
    state_bytes = registry.get_sample_value("fedcybgd_coordinator_state_bytes")
    assert state_bytes is not None and state_bytes > store.blobs.disk_bytes()  # the database and the model too
    assert registry.get_sample_value("fedcybgd_versions_pruned_total") == 14 - len(kept)
    coordinators.stop(running, grace=1)

    # A restart after pruning: the run opens, reports, and says it is done.
    again = coordinators.start(config)
    status = again.coordinator.status(pb.GetStatusRequest())
    assert status.run_state == "done" and status.version == 13
    assert status.HasField("best_eval") and status.best_eval.version == best, "status names the best version"
    coordinators.stop(again)

    # A kept checkpoint exports to the weights of the single-process reference after its visits.
    names = {c.id: c.name for c in SqliteState(Path(config.state_dir) / "state.sqlite").clients()}
    data_of = {f"site-{i}": p for i, p in enumerate(data)}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    packed = {p: load_packed(p, tokenizer, TRAINING.seq_len) for p in data}
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    at_checkpoint: dict[str, torch.Tensor] = {}

    def keep_checkpoint(round_, spec, result) -> None:
        if round_ == 5:  # the 6th visit makes version 6
            at_checkpoint.update({k: v.clone() for k, v in reference.state_dict().items()})

    run_reference(reference, 1, SCHEDULE, TRAINING, [packed[data_of[names[v.client_id]]] for v in visits],
                  on_visit=keep_checkpoint)
    proc = _export(Path(config.state_dir), tmp_path / "export-6", 6)
    assert proc.returncode == 0, proc.stderr
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export-6")).state_dict()
    for name, tensor in at_checkpoint.items():
        assert torch.equal(exported[name], tensor), f"{name} differs from the reference after 6 visits"

    # --best exports the version with the lowest held-out loss, exactly.
    proc = subprocess.run([sys.executable, "-m", "fedcybgd.cli.main", "export", "--state-dir", str(config.state_dir),
                           "--out", str(tmp_path / "export-best"), "--best"],
                          capture_output=True, text=True, timeout=300, env=PROCESS_ENV)
    assert proc.returncode == 0, proc.stderr
    assert f"exported version {best} (the lowest held-out loss" in proc.stdout
    by_number = export_version(config.state_dir, tmp_path / "export-by-number", best)
    best_weights = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export-best")).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(str(by_number)).state_dict().items():
        assert torch.equal(best_weights[name], tensor), f"{name} is not version {best}'s"

    # A pruned version fails, naming the nearest kept ones.
    below, above = SqliteState(Path(config.state_dir) / "state.sqlite").kept_neighbours(1)
    proc = _export(Path(config.state_dir), tmp_path / "export-1", 1)
    assert proc.returncode != 0
    assert "version 1 was pruned" in proc.stderr and f"nearest kept versions are {below} and {above}" in proc.stderr
    assert not (tmp_path / "export-1").exists() or not any((tmp_path / "export-1").iterdir())


@pytest.mark.multiprocess
def test_a_fedavg_round_s_uploads_go_once_it_is_merged(tmp_path, coordinators: Coordinators,
                                                        clients: ClientProcesses):
    """Each client of a FedAvg-full round uploads the whole model; once the round is averaged into a version those
    uploads are needed by nothing, so they go (else the store grows by clients x model per round)."""
    data, _ = write_data(tmp_path, clients=2)
    config = coordinators.config(strategy="fedavg-full", clients_per_round=2, schedule=SCHEDULE, training=TRAINING,
                                 retention=RetentionConfig(checkpoint_every=2))
    running = _run_to_the_end(coordinators, clients, config, data, tmp_path)
    state, store = running.coordinator.state, running.coordinator.store
    rounds = [v.round for v in state.visits()]
    uploads = {sha for r in rounds for c in state.contributions(r) for sha in c.blobs}
    kept = {sha for k in state.kept_versions() for sha in k.manifest}
    assert len(rounds) >= 2 and uploads - kept, "the rounds uploaded blobs of their own"
    assert set(store.blobs) == kept, "only the kept versions' blobs remain: every round's uploads went"
    coordinators.stop(running, grace=1)
