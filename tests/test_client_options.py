"""The client's memory/compute options change how a visit is computed, not what it computes:
a run whose clients recompute the activations above the block and cache the block's inputs
ends where the single-process reference ends (within float tolerance)."""
from __future__ import annotations

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import start_client, wait_clients, wait_for, write_data
from fedcybgd.common.blocks import block_tensors, partition_model
from fedcybgd.common.data import load_packed
from fedcybgd.server.app import start
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.reference import run_reference
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

SCHEDULE = ScheduleConfig(cycles=1, lr=3e-3, seed=3)
# 6 steps of 8 rows from ~20 sequences: rows recur within a visit, so the input cache is used.
TRAINING = TrainingConfig(local_steps=6, batch_size=8, seq_len=32)


def test_checkpointing_and_input_caching_clients_match_the_reference(tiny_model_dir, tmp_path):
    data, _ = write_data(tmp_path, clients=2)
    running = start(CoordinatorConfig(insecure=True, model=str(tiny_model_dir), state_dir=str(tmp_path / "state"),
                                      address="127.0.0.1:0", schedule=SCHEDULE, training=TRAINING))
    try:
        address = f"127.0.0.1:{running.port}"
        small = data[1]  # a few dozen sequences: rows recur within every visit
        procs = [start_client(address, small, tmp_path / "caches" / f"site-{i}", f"site-{i}", "--checkpoint-above",
                              "--cache-block-inputs") for i in range(2)]
        wait_clients(procs)
        coordinator = running.coordinator
        wait_for(lambda: coordinator.finished, 30, "the run to finish")
        visits = sorted(coordinator.status(pb.GetStatusRequest()).visits, key=lambda v: v.round)
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
        data_of = {f"site-{i}": load_packed(small, tokenizer, TRAINING.seq_len) for i in range(2)}
        assert all(TRAINING.batch_size * TRAINING.local_steps > len(d) for d in data_of.values()), "rows must recur"
        reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        run_reference(reference, 1, SCHEDULE, TRAINING, [data_of[v.client_name] for v in visits])
        _, manifest = coordinator.state.latest_version()
        for spec, sha in zip(partition_model(reference, 1), manifest, strict=True):
            federated = safetensors.torch.load_file(str(coordinator.store.blobs.path(sha)))
            assert sha != coordinator.state.manifest(0)[spec.index]
            for name, tensor in block_tensors(reference, spec).items():
                torch.testing.assert_close(federated[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{spec.name}/{name}")
    finally:
        running.stop(grace=0)
