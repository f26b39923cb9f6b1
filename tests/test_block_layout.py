"""The strided block layout (common/partition.py): block k of B holds decoder layers k, k + B, k + 2B, ... It must
cover every parameter once like the contiguous layout, keep the visit options exact (replay from the block's lowest
layer, frozen layers above it, compact frozen layers), be what the planner plans, and a federated run in it must end
with the weights of the single-process reference in the same layout (the correctness anchor)."""
from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ClientProcesses, Coordinators, address_of, wait_clients, wait_for, write_data
from fedcybgd.common.data import load_packed
from fedcybgd.common.partition import NEW_RUN_LAYOUT, find_decoder_layers, layer_block_count, partition_model
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.tiny import make_tiny_model
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.reference import run_reference
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.training import VisitHyper, train_block
from fedcybgd.training.layers import block_layers, layers_above
from fedcybgd.training.planner import PlanSettings, plan_visits
from fedcybgd.v1 import coordinator_pb2 as pb

ARCHS = ["llama", "qwen2", "gpt2", "gpt_neox"]


def _layer_of(name: str, prefix: str) -> int:
    return int(name[len(prefix) + 1:].split(".", 1)[0])


@pytest.mark.parametrize("layers_per_block", [2, 3])
@pytest.mark.parametrize("arch", ARCHS)
def test_strided_blocks_spread_the_layers_and_cover_every_parameter_once(arch, layers_per_block):
    model = make_tiny_model(arch)
    prefix, n_layers = find_decoder_layers(model)
    contiguous = partition_model(model, layers_per_block)
    strided = partition_model(model, layers_per_block, layout="strided")
    count = layer_block_count(strided)
    assert count == layer_block_count(contiguous) == -(-n_layers // layers_per_block), "as many blocks"
    for k, spec in enumerate(strided[:count]):
        layers = sorted({_layer_of(t.name, prefix) for t in spec.tensors})
        assert layers == list(range(k, n_layers, count)), spec.name
        assert spec.name == "layers." + "+".join(map(str, layers))
        assert block_layers(model, spec) == tuple(layers)
    assert [s.name for s in strided[count:]] == [s.name for s in contiguous[count:]], "the other blocks as before"
    assigned = [t.name for s in strided for t in s.tensors]
    assert sorted(assigned) == sorted(t.name for s in contiguous for t in s.tensors)
    assert len(assigned) == len(set(assigned))


def test_an_unknown_layout_is_refused_clearly():
    with pytest.raises(ValueError, match="unknown block layout 'zigzag'; known: contiguous, strided"):
        partition_model(make_tiny_model("llama"), 2, layout="zigzag")
    with pytest.raises(ValueError, match="unknown block layout"):
        CoordinatorConfig(block_layout="zigzag")


def test_a_strided_visit_with_the_memory_options_matches_the_plain_one():
    """Replaying from the block's lowest layer (cache_block_inputs) and recomputing the layers above its highest
    (checkpoint_above) give the plain visit's weights; the frozen layers between its layers are not 'above'."""
    torch.manual_seed(0)
    sequences = Sequences(torch.randint(0, 256, (8, 32)))
    hyper = VisitHyper(lr=1e-2, steps=4, batch_size=2, seq_len=32, seed=3)
    results = []
    for cache, checkpoint in ((False, False), (True, False), (False, True)):
        model = make_tiny_model("llama")
        spec = partition_model(model, 2, layout="strided")[0]  # layers 0 and 2
        assert len(layers_above(model, spec)) == 1  # layer 3 only
        results.append(train_block(model, spec, sequences, hyper, cache_block_inputs=cache,
                                   checkpoint_above=checkpoint).tensors)
    for other in results[1:]:
        for name, tensor in results[0].items():
            torch.testing.assert_close(other[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_planner_plans_the_runs_strided_blocks():
    model = make_tiny_model("llama")
    settings = PlanSettings(batch_size=2, seq_len=32, dtype=torch.float32, layers_per_block=2,
                            block_layout="strided")
    plans = plan_visits(model.config, settings)
    assert [p.block for p in plans] == [s.name for s in partition_model(model, 2, layout="strided")]


@pytest.mark.multiprocess
def test_a_run_keeps_its_layout_across_restarts_and_older_runs_stay_contiguous(coordinators: Coordinators):
    """A new run without a layout gets the default (strided); a restart without one keeps the run's own, one naming
    another is refused as other settings; a run from before the setting (no layout recorded) is contiguous."""
    config = coordinators.config(layers_per_block=2)
    for _ in range(2):
        coordinator = Coordinator(config)
        assert coordinator.run.block_layout == NEW_RUN_LAYOUT == "strided"
        assert [s.name for s in coordinator.run.specs][:2] == ["layers.0+2", "layers.1+3"]
        coordinator.close()
    with pytest.raises(ValueError, match="other settings"):
        Coordinator(dataclasses.replace(config, block_layout="contiguous"))

    older = coordinators.config(layers_per_block=2, block_layout="contiguous")
    Coordinator(older).close()
    with sqlite3.connect(Path(older.state_dir) / "state.sqlite") as db:  # as a run from before the setting
        db.execute("DELETE FROM meta WHERE key = 'block_layout'")
    coordinator = Coordinator(dataclasses.replace(older, block_layout=None))
    assert coordinator.run.block_layout == "contiguous"
    assert [s.name for s in coordinator.run.specs][:2] == ["layers.0-1", "layers.2-3"]
    coordinator.close()


SCHEDULE = ScheduleConfig(cycles=2, order="ascending", lr=3e-3, seed=11)
TRAINING = TrainingConfig(local_steps=3, batch_size=2, seq_len=64)


@pytest.mark.multiprocess
def test_a_strided_run_ends_with_the_weights_of_the_strided_reference(tiny_model_dir, tmp_path,
                                                                       coordinators: Coordinators,
                                                                       clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=2)
    running = coordinators.start(schedule=SCHEDULE, training=TRAINING, layers_per_block=2, block_layout="strided",
                                 grace=1)
    wait_clients([clients.start(address_of(running), folder, tmp_path / "caches" / f"site-{i}", f"site-{i}")
                  for i, folder in enumerate(data)])
    coordinator = running.coordinator
    wait_for(lambda: coordinator.finished, 60, "the run's end")
    status = coordinator.status(pb.GetStatusRequest())
    assert [b.name for b in status.blocks][:2] == ["layers.0+2", "layers.1+3"]
    visits = sorted(status.visits, key=lambda v: v.round)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data_of = {f"site-{i}": load_packed(p, tokenizer, TRAINING.seq_len) for i, p in enumerate(data)}
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    run_reference(reference, 2, SCHEDULE, TRAINING, [data_of[v.client_name] for v in visits],
                  block_layout="strided")
    latest = coordinator.state.latest_version()
    assert latest is not None
    manifest = latest[1]
    for spec, sha in zip(coordinator.run.specs, manifest, strict=True):
        stored = safetensors.torch.load_file(str(coordinator.store.blobs.path(sha)))
        for name, tensor in stored.items():
            assert torch.equal(tensor, reference.get_parameter(name).detach()), f"{spec.name}/{name}"
    assert manifest != coordinator.state.manifest(0)
