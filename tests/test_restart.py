"""A coordinator stopped with SIGTERM mid-run and restarted from its state directory finishes the
run with no accepted upload lost, and (the algorithm being deterministic) with the same final
weights as the single-process reference."""
from __future__ import annotations

import pytest

from conftest import ClientProcesses, assert_matches_reference, state_blob_path, wait_clients, wait_for, write_data
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import SqliteState

pytestmark = pytest.mark.multiprocess


def test_sigterm_mid_run_then_restart_loses_nothing(tiny_model_dir, tmp_path, coordinator_processes,
                                                    clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=3)
    state_dir = tmp_path / "state"
    coordinator = coordinator_processes(
        "--model", str(tiny_model_dir), "--state-dir", str(state_dir), "--cycles", "3", "--order", "ascending",
        "--lr", "3e-3", "--seed", "3", "--local-steps", "12", "--batch-size", "4", "--seq-len", "96",
        "--exit-when-finished")
    coordinator.start(timeout=120)
    procs = [clients.start(coordinator.address, data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}")
             for i in range(3)]
    wait_for(lambda: (s := coordinator.status()) is not None and s.round >= 3, 180, "three committed visits")
    coordinator.sigterm()
    assert coordinator.wait(timeout=60) == 0, "SIGTERM should stop the coordinator cleanly"

    state = SqliteState(state_dir / "state.sqlite")
    before = {v.round: v.blob_sha256 for v in state.visits()}
    state.close()
    assert 3 <= len(before) < 13, "the stop must happen mid-run"

    coordinator.start(timeout=120)
    wait_clients(procs, timeout=300)
    assert coordinator.wait(timeout=120) == 0

    state = SqliteState(state_dir / "state.sqlite")
    try:
        visits = state.visits()
        assert [v.round for v in visits] == list(range(13))  # 4 layer blocks per cycle, embed_head in the last
        assert [v.new_version for v in visits] == list(range(1, 14))
        assert all(v.base_version == v.new_version - 1 for v in visits)
        assert {r: sha for r, sha in ((v.round, v.blob_sha256) for v in visits) if r in before} == before, \
            "an upload accepted before the stop was lost or changed"
        latest = state.latest_version()
        assert latest is not None
        _, manifest = latest

        # Same weights as an undisturbed single-process run of the same cycle.
        names = {c.id: c.name for c in state.clients()}
        data_of = {f"site-{i}": p for i, p in enumerate(data)}
        assert_matches_reference(tiny_model_dir, ScheduleConfig(cycles=3, order="ascending", lr=3e-3, seed=3),
                                 TrainingConfig(local_steps=12, batch_size=4, seq_len=96),
                                 [data_of[names[v.client_id]] for v in visits], manifest, state_blob_path(state_dir))
    finally:
        state.close()
