"""End to end over gRPC: a real coordinator on loopback and three real client processes.

The correctness anchor (docs/design.md, "Correctness anchor"): the federated run ends with exactly
the weights of the single-process reference of the same cycle (bit-identical on CPU: same code per
visit, one thread per process, fp32 tiny model, deterministic data order from the visit seeds).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PROCESS_ENV, address_of, assert_matches_reference, wait_clients, wait_for, write_data
from fedcybgd.common.data import load_packed
from fedcybgd.common.eval import evaluate_loss, spread_sample
from fedcybgd.server.config import EvalConfig, TrainingConfig
from fedcybgd.server.export import export_version
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess

SCHEDULE = ScheduleConfig(cycles=2, order="random", lr=3e-3, lr_schedule="cosine", warmup_visits=2, seed=7)
TRAINING = TrainingConfig(local_steps=3, batch_size=2, seq_len=64)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory, module_coordinators, module_clients):
    tmp = tmp_path_factory.mktemp("run")
    data, eval_data = write_data(tmp, clients=3)
    running = module_coordinators.start(
        state_dir=str(tmp / "state"), schedule=SCHEDULE, training=TRAINING, grace=1,
        eval=EvalConfig(data=str(eval_data), max_sequences=16, batch_size=4, every_cycle=True))
    procs = [module_clients.start(address_of(running), data[i], tmp / "caches" / f"site-{i}", f"site-{i}")
             for i in range(3)]
    wait_clients(procs)
    coordinator = running.coordinator
    wait_for(lambda: coordinator.finished, 60, "the final evaluation")
    status = coordinator.status(pb.GetStatusRequest())
    return {"tmp": tmp, "data": data, "eval_data": eval_data, "coordinator": coordinator, "status": status,
            "model_dir": tiny_model_dir}


def test_run_completes_and_every_block_is_visited_once_per_cycle(finished_run):
    """The default schedule: every decoder-layer block in every cycle, embed_head in the last (embed_head_every 4)."""
    status = finished_run["status"]
    assert status.run_state == "done"
    layers = status.num_blocks - 1  # the tiny llama: 4 decoder layers + embed_head
    assert status.total_rounds == 2 * layers + 1 == len(status.visits)
    visits = sorted(status.visits, key=lambda v: v.round)
    assert sorted(v.block_index for v in visits if v.cycle == 0) == list(range(layers))
    assert sorted(v.block_index for v in visits if v.cycle == 1) == list(range(status.num_blocks))
    # Sequential mode: each visit starts from the model that includes every earlier visit.
    assert [v.new_version for v in visits] == list(range(1, len(visits) + 1))
    assert [v.base_version for v in visits] == list(range(len(visits)))
    assert {v.client_name for v in visits} <= {"site-0", "site-1", "site-2"}


def test_federated_weights_equal_single_process_reference(finished_run):
    coordinator = finished_run["coordinator"]
    visits = sorted(finished_run["status"].visits, key=lambda v: v.round)
    data_of_client = {f"site-{i}": p for i, p in enumerate(finished_run["data"])}
    _, manifest = coordinator.state.latest_version()
    assert_matches_reference(finished_run["model_dir"], SCHEDULE, TRAINING,
                             [data_of_client[v.client_name] for v in visits], manifest, coordinator.store.blobs.path)
    changed = sum(sha != base for sha, base in zip(manifest, coordinator.state.manifest(0), strict=True))
    assert changed == len(manifest), "every block should have been trained"


def test_uploads_are_one_block_and_held_blocks_are_not_downloaded_again(finished_run):
    coordinator = finished_run["coordinator"]
    status = finished_run["status"]
    sizes = {b.index: b.size for b in status.blocks}
    for v in status.visits:
        # One block (fp32 random weights barely compress) plus a little framing, never the model.
        assert 0.5 * sizes[v.block_index] < v.bytes_up < 1.05 * sizes[v.block_index] + 4096
        assert v.bytes_up < status.model_bytes / 2

    held: dict[str, set[str]] = {}
    first_visit_seen = set()
    for v in sorted(status.visits, key=lambda v: v.round):
        manifest = coordinator.state.manifest(v.base_version)
        have = held.setdefault(v.client_id, set())
        # Every blob of a block has one size (the same tensors): read from status, older versions may be pruned.
        missing = {sha: i for i, sha in enumerate(manifest) if sha not in have}
        expected = sum(sizes[i] for i in missing.values())
        assert 0.5 * expected <= v.bytes_down <= 1.05 * expected + 8192, (v.round, v.bytes_down, expected)
        if v.client_id in first_visit_seen:
            assert v.bytes_down < 0.8 * status.model_bytes, "a returning client downloaded the whole model again"
        first_visit_seen.add(v.client_id)
        have |= set(manifest)
        have.add(coordinator.state.manifest(v.new_version)[v.block_index])


def test_exported_model_loads_and_its_eval_loss_equals_the_coordinators(finished_run, tmp_path):
    coordinator = finished_run["coordinator"]
    status = finished_run["status"]
    evals = {e.version: e.loss for e in status.evals}
    assert 0 in evals and status.version in evals
    assert evals[status.version] < evals[0], "held-out loss should improve"
    assert len(evals) >= 3, "base, after cycle 1, after cycle 2"

    out = export_version(coordinator.state_dir, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    sequences = spread_sample(load_packed(finished_run["eval_data"], tokenizer, TRAINING.seq_len), 16)
    loss = evaluate_loss(model, sequences, batch_size=4)
    assert math.isfinite(loss)
    assert loss == evals[status.version]


def test_summary_fields_from_demo(tmp_path):
    """`fedcybgd demo` (the quick one) writes summary.json with every documented field."""
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "fedcybgd.cli.main", "--log-level", "warning", "demo",
                           "--model", "tiny", "--clients", "3", "--cycles", "1", "--local-steps", "2",
                           "--seq-len", "64", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=PROCESS_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("visits", "blocks", "eval_loss_before", "eval_loss_after", "total_bytes_down", "total_bytes_up",
                "fedavg_full_equivalent_bytes", "export_dir"):
        assert key in summary, key
    assert len(summary["visits"]) == summary["blocks"] == 5
    for v in summary["visits"]:
        assert set(v) >= {"client", "block", "bytes_down", "bytes_up", "loss_before", "loss_after",
                          "peak_memory_bytes", "seconds"}
        assert v["peak_memory_bytes"] > 0
    assert summary["total_bytes_up"] == sum(v["bytes_up"] for v in summary["visits"])
    assert summary["total_bytes_down"] + summary["total_bytes_up"] < summary["fedavg_full_equivalent_bytes"]
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    AutoModelForCausalLM.from_pretrained(summary["export_dir"])
    assert "held-out loss" in proc.stdout
