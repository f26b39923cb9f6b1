"""The client's memory/compute options change how a visit is computed, not what it computes:
a run whose clients recompute the activations above the block and cache the block's inputs
ends where the single-process reference ends (within float tolerance)."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import (
    ClientProcesses,
    Coordinators,
    address_of,
    assert_matches_reference,
    wait_clients,
    wait_for,
    write_data,
)
from fedcybgd.common.data import load_packed
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess

SCHEDULE = ScheduleConfig(cycles=1, lr=3e-3, seed=3)
# 6 steps of 8 rows from ~20 sequences: rows recur within a visit, so the input cache is used.
TRAINING = TrainingConfig(local_steps=6, batch_size=8, seq_len=32)


def test_checkpointing_and_input_caching_clients_match_the_reference(tiny_model_dir, tmp_path,
                                                                     coordinators: Coordinators,
                                                                     clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=2)
    running = coordinators.start(schedule=SCHEDULE, training=TRAINING)
    small = data[1]  # a few dozen sequences: rows recur within every visit
    procs = [clients.start(address_of(running), small, tmp_path / "caches" / f"site-{i}", f"site-{i}",
                           "--checkpoint-above", "--cache-block-inputs") for i in range(2)]
    wait_clients(procs)
    coordinator = running.coordinator
    wait_for(lambda: coordinator.finished, 30, "the run to finish")
    visits = sorted(coordinator.status(pb.GetStatusRequest()).visits, key=lambda v: v.round)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data_of = {f"site-{i}": load_packed(small, tokenizer, TRAINING.seq_len) for i in range(2)}
    assert all(TRAINING.batch_size * TRAINING.local_steps > len(d) for d in data_of.values()), "rows must recur"
    latest = coordinator.state.latest_version()
    assert latest is not None
    _, manifest = latest
    assert all(sha != base for sha, base in zip(manifest, coordinator.state.manifest(0), strict=True))
    file_of = {name: small for name in data_of}
    assert_matches_reference(tiny_model_dir, SCHEDULE, TRAINING, [file_of[v.client_name] for v in visits], manifest,
                             coordinator.store.blobs.path, tolerance=dict(rtol=1e-4, atol=1e-5))
