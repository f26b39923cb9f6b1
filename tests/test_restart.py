"""A coordinator stopped with SIGTERM mid-run and restarted from its state directory finishes the
run with no accepted upload lost, and (the algorithm being deterministic) with the same final
weights as the single-process reference."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import start_client, wait_clients, wait_for, write_data
from fedcybgd.cli.demo import free_port
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.data import load_packed
from fedcybgd.common.blocks import partition_model
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.reference import run_reference
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import SqliteState
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc


def _status(address: str) -> pb.GetStatusResponse | None:
    try:
        with grpc.insecure_channel(address) as channel:
            return pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=5)
    except grpc.RpcError:
        return None


def test_sigterm_mid_run_then_restart_loses_nothing(tiny_model_dir, tmp_path):
    data, _ = write_data(tmp_path, clients=3)
    address = f"127.0.0.1:{free_port()}"
    state_dir = tmp_path / "state"
    command = [sys.executable, "-m", "fedcybgd.cli.main", "coordinator", "--model", str(tiny_model_dir),
               "--state-dir", str(state_dir), "--address", address, "--cycles", "3", "--order", "ascending",
               "--lr", "3e-3", "--seed", "3", "--local-steps", "12", "--batch-size", "4", "--seq-len", "96",
               "--exit-when-finished", "--insecure"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "coordinator.log", "a")
    coordinator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    clients = []
    try:
        wait_for(lambda: _status(address) is not None, 120, "the coordinator to serve")
        clients = [start_client(address, data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}") for i in range(3)]
        wait_for(lambda: (s := _status(address)) is not None and s.round >= 3, 180, "three committed visits")
        coordinator.send_signal(signal.SIGTERM)
        assert coordinator.wait(timeout=60) == 0, "SIGTERM should stop the coordinator cleanly"

        state = SqliteState(state_dir / "state.sqlite")
        before = {v.round: v.blob_sha256 for v in state.visits()}
        state.close()
        assert 3 <= len(before) < 15, "the stop must happen mid-run"

        coordinator = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_clients(clients, timeout=300)
        assert coordinator.wait(timeout=120) == 0
    finally:
        for proc in [*clients, coordinator]:
            if proc.poll() is None:
                proc.kill()

    state = SqliteState(state_dir / "state.sqlite")
    visits = state.visits()
    assert [v.round for v in visits] == list(range(15))
    assert [v.new_version for v in visits] == list(range(1, 16))
    assert all(v.base_version == v.new_version - 1 for v in visits)
    assert {r: sha for r, sha in ((v.round, v.blob_sha256) for v in visits) if r in before} == before, \
        "an upload accepted before the stop was lost or changed"
    _, manifest = state.latest_version()

    # Same weights as an undisturbed single-process run of the same cycle.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    names = {c.id: c.name for c in state.clients()}
    per_client = {f"site-{i}": load_packed(p, tokenizer, 96) for i, p in enumerate(data)}
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    run_reference(reference, 1, ScheduleConfig(cycles=3, order="ascending", lr=3e-3, seed=3),
                  TrainingConfig(local_steps=12, batch_size=4, seq_len=96),
                  [per_client[names[v.client_id]] for v in visits])
    for spec, sha in zip(partition_model(reference, 1), manifest, strict=True):
        stored = safetensors.torch.load_file(str(state_dir / "blobs" / "objects" / sha[:2] / sha))
        for name, tensor in block_tensors(reference, spec).items():
            assert torch.equal(stored[name], tensor), f"{spec.name}/{name}"
    state.close()
