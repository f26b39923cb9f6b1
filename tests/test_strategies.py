"""The baselines in the same system: fedavg-full and fedlora over the same protocol, with real
client processes, checked against single-process references of the same rounds."""
from __future__ import annotations

import copy
import math
from typing import cast

import grpc
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import (
    ClientProcesses,
    Coordinators,
    address_of,
    assert_same_weights,
    register,
    wait_clients,
    wait_for,
    write_data,
)
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.codec import encode_chunks, serialize_block, sha256_hex
from fedcybgd.common.data import load_packed
from fedcybgd.common.partition import partition_model
from fedcybgd.server.config import ContextConfig, CoordinatorConfig, EvalConfig, TrainingConfig
from fedcybgd.server.export import export_version
from fedcybgd.server.records import VisitStats
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.strategies.fedavg import FedAvgRounds
from fedcybgd.training import VisitHyper, initial_lora_adapter, train_full, train_lora
from fedcybgd.training.lora import LoraConfig, merge_adapter
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

SCHEDULE = ScheduleConfig(cycles=1, lr=3e-3, lr_schedule="cosine", seed=5)
TRAINING = TrainingConfig(local_steps=3, batch_size=2, seq_len=64)
LORA = LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module", params=["fedavg-full", "fedlora"])
def finished(request, tiny_model_dir, tmp_path_factory, module_coordinators: Coordinators,
             module_clients: ClientProcesses):
    """A finished run of each baseline with two real client processes."""
    tmp = tmp_path_factory.mktemp(request.param)
    data, eval_data = write_data(tmp, clients=2)
    running = module_coordinators.start(state_dir=str(tmp / "state"), strategy=request.param, clients_per_round=2,
                                        schedule=SCHEDULE, training=TRAINING, lora=LORA,
                                        eval=EvalConfig(data=str(eval_data), max_sequences=16, batch_size=4))
    procs = [module_clients.start(address_of(running), data[i], tmp / "caches" / f"site-{i}", f"site-{i}")
             for i in range(2)]
    wait_clients(procs, timeout=300)
    wait_for(lambda: running.coordinator.finished, 60, "the final evaluation")
    yield {"strategy": request.param, "coordinator": running.coordinator, "data": data, "model_dir": tiny_model_dir,
           "status": running.coordinator.status(pb.GetStatusRequest())}
    module_coordinators.stop(running, grace=1)  # before the other strategy's run


def _reference(finished):
    """The same rounds in one process: every contribution recomputed from the round's starting
    model with the data of the client that made it, then averaged the same way."""
    coordinator = finished["coordinator"]
    model_dir = finished["model_dir"]
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data_of = {f"site-{i}": load_packed(p, tokenizer, TRAINING.seq_len) for i, p in enumerate(finished["data"])}
    names = {c.id: c.name for c in coordinator.state.clients()}
    rounds = FedAvgRounds(len(coordinator.run.specs), SCHEDULE, 2)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    specs = partition_model(model, 1)
    adapter = initial_lora_adapter(model, rank=LORA.rank, alpha=LORA.alpha, init_seed=SCHEDULE.seed)
    for round_ in range(rounds.total_rounds):
        results = []
        for c in coordinator.state.contributions(round_):
            hyper = VisitHyper(lr=rounds.lr_of(round_), steps=TRAINING.local_steps, batch_size=TRAINING.batch_size,
                               seq_len=TRAINING.seq_len, seed=rounds.seed_of(round_, c.slot),
                               weight_decay=TRAINING.weight_decay, max_grad_norm=TRAINING.max_grad_norm)
            if finished["strategy"] == "fedavg-full":
                results.append(train_full(copy.deepcopy(model), data_of[names[c.client_id]], hyper).tensors)
            else:
                results.append(train_lora(model, data_of[names[c.client_id]], hyper, rank=LORA.rank, alpha=LORA.alpha,
                                          adapter=adapter).tensors)
        # (a tensor: results is not empty)
        averaged = {name: cast(torch.Tensor, sum(r[name].float() * 0.5 for r in results)) for name in results[0]}
        if finished["strategy"] == "fedavg-full":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(averaged[name].to(p.dtype))
        else:
            adapter = averaged
    return model, specs, adapter


@pytest.mark.multiprocess
def test_every_round_merges_all_its_clients_and_the_run_learns(finished):
    status, coordinator = finished["status"], finished["coordinator"]
    rounds = FedAvgRounds(status.num_blocks, SCHEDULE, 2)
    assert status.run_state == "done" and status.total_rounds == rounds.total_rounds == len(status.visits)
    assert rounds.total_rounds * 2 >= status.num_blocks, "at least as many training tokens as one FedCyBGD cycle"
    for v in status.visits:
        contributions = coordinator.state.contributions(v.round)
        assert len(contributions) == 2 and len({c.client_id for c in contributions}) == 2, "two distinct clients"
        assert {coordinator.state.task(c.task_id).base_version for c in contributions} == {v.base_version}
    evals = {e.version: e.loss for e in status.evals}
    assert evals[status.version] < evals[0]


@pytest.mark.multiprocess
def test_federated_result_equals_the_single_process_reference(finished):
    coordinator = finished["coordinator"]
    model, _, adapter = _reference(finished)
    latest, manifest = coordinator.state.latest_version()
    if finished["strategy"] == "fedavg-full":
        assert_same_weights(model, manifest, coordinator.store.blobs.path)
    else:
        assert manifest == coordinator.state.manifest(0), "fedlora never changes the base blocks"
        federated = safetensors.torch.load_file(str(coordinator.store.blobs.path(coordinator.adapter_of(latest))))
        assert set(federated) == set(adapter)
        for name, tensor in adapter.items():
            assert torch.equal(federated[name], tensor), name


@pytest.mark.multiprocess
def test_what_travels(finished):
    """fedavg-full: every block up, all of it counted as 'full'; fedlora: only the adapter up."""
    status, coordinator = finished["status"], finished["coordinator"]
    metrics = coordinator.metrics
    up = {k: metrics.transfer_bytes.labels(direction="up", kind=k)._value.get() for k in ("block", "full")}
    total_up = sum(v.bytes_up for v in status.visits)
    if finished["strategy"] == "fedavg-full":
        assert up["full"] == total_up and up["block"] == 0
        for v in status.visits:  # two clients, each the whole model (fp32 barely compresses)
            assert v.bytes_up > 2 * 0.5 * status.model_bytes
    else:
        adapter_bytes = coordinator.store.blobs.size(coordinator.adapter_of(0))
        assert up["block"] == total_up and up["full"] == 0
        for v in status.visits:
            assert v.bytes_up < 2 * 1.05 * adapter_bytes + 8192 < status.model_bytes / 4


@pytest.mark.multiprocess
def test_export_matches_the_coordinators_evaluation(finished, tmp_path):
    coordinator, status = finished["coordinator"], finished["status"]
    out = export_version(coordinator.state_dir, tmp_path / "export")
    exported = AutoModelForCausalLM.from_pretrained(str(out))
    rebuilt = coordinator.store.build_model(coordinator.run.specs, coordinator.state.manifest(status.version),
                                            "float32")
    adapter = coordinator.adapter_of(status.version)
    if adapter:
        merge_adapter(rebuilt, safetensors.torch.load_file(str(coordinator.store.blobs.path(adapter))), LORA)
        assert not torch.equal(exported.model.layers[0].self_attn.q_proj.weight,
                               coordinator.store.build_model(coordinator.run.specs, coordinator.state.manifest(0),
                                                             "float32").model.layers[0].self_attn.q_proj.weight)
    for (name, a), (_, b) in zip(exported.state_dict().items(), rebuilt.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# -- refusals --------------------------------------------------------------------------------

@pytest.fixture
def fedavg_coordinator(coordinators: Coordinators):
    running = coordinators.start(strategy="fedavg-full", clients_per_round=2, schedule=SCHEDULE, training=TRAINING)
    return running, coordinators.stub(running)


def _register(stub, name):
    return register(stub, name).md


@pytest.mark.multiprocess
def test_a_round_goes_to_distinct_clients_and_an_incomplete_upload_is_refused(fedavg_coordinator, tiny_model_dir):
    running, stub = fedavg_coordinator
    first = _register(stub, "a")
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=first).task
    assert task.kind == pb.TASK_FULL
    status = running.coordinator.status(pb.GetStatusRequest())  # operators see the round's tasks in flight
    assert [t.task_id for t in status.tasks] == [task.task_id]
    again = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=first)
    assert again.task.task_id == task.task_id, "a retried GetTask gets the same task, not a second slot"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    specs = partition_model(model, 1)
    blobs = [serialize_block({k: v * 1.001 for k, v in block_tensors(model, spec).items()}) for spec in specs]

    def upload(announced, sent):
        header = pb.UploadHeader(task_id=task.task_id, base_version=task.base_version, samples=6, loss_before=1,
                                 loss_after=1, blobs=[pb.UploadedBlob(block_index=i, sha256=sha256_hex(b), size=len(b))
                                                      for i, b in announced])
        chunks = [pb.UploadMessage(chunk=c) for _, b in sent for c in encode_chunks(sha256_hex(b), b)]
        return stub.UploadBlock(iter([pb.UploadMessage(header=header), *chunks]), metadata=first)

    nan = serialize_block({k: torch.full_like(v, float("nan")) for k, v in block_tensors(model, specs[-1]).items()})
    stored = set(running.coordinator.store.blobs)
    for announced, sent in [(list(enumerate(blobs))[1:], list(enumerate(blobs))[1:]),  # a block missing
                            (list(enumerate(blobs)), list(enumerate(blobs))[:-1]),    # chunks of one missing
                            (list(enumerate(blobs[:-1])) + [(len(blobs) - 1, nan)],   # the last block invalid
                             list(enumerate(blobs[:-1])) + [(len(blobs) - 1, nan)])]:
        with pytest.raises(grpc.RpcError) as refused:
            upload(announced, sent)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert running.coordinator.state.contributions(0) == []
    assert set(running.coordinator.store.blobs) == stored, "a refused upload leaves no blob behind"
    reply = upload(list(enumerate(blobs)), list(enumerate(blobs)))
    assert reply.new_version == 0, "the round waits for its second client"
    assert len(running.coordinator.state.contributions(0)) == 1
    waiting = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=first)
    assert waiting.WhichOneof("outcome") == "wait", "one client cannot fill two slots of a round"
    second = _register(stub, "b")
    assert stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=second).task.kind == pb.TASK_FULL


@pytest.mark.parametrize("kwargs,match", [
    (dict(strategy="sgd"), "strategy"),
    (dict(strategy="cybgd-parallel"), "max_concurrent_visits"),
    (dict(strategy="fedavg-full", max_concurrent_visits=2), "block cycle"),
    (dict(strategy="fedlora", context=ContextConfig(method="int8")), "context"),
    (dict(strategy="fedavg-full", clients_per_round=0), "clients_per_round"),
])
def test_inconsistent_strategy_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoordinatorConfig(insecure=True, **kwargs)


def test_fedavg_rounds_match_the_training_tokens_of_a_cycle():
    rounds = FedAvgRounds(7, ScheduleConfig(cycles=2, lr=1e-3), clients_per_round=3)
    assert rounds.total_rounds == math.ceil(14 / 3)
    seeds = {rounds.seed_of(r, s) for r in range(rounds.total_rounds) for s in range(3)}
    assert len(seeds) == 3 * rounds.total_rounds
    assert rounds.lr_of(0) > rounds.lr_of(rounds.total_rounds - 1)


@pytest.mark.multiprocess
def test_a_round_completed_before_a_crash_is_merged_on_restart(tiny_model_dir, coordinators: Coordinators):
    """The last upload of a round was stored but the coordinator died before averaging: the
    restarted coordinator averages it (same result as without the crash)."""
    from fedcybgd.server.state import ContributionRow

    config = coordinators.config(strategy="fedavg-full", clients_per_round=2, schedule=SCHEDULE, training=TRAINING)
    running = coordinators.start(config)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    specs = partition_model(model, 1)
    uploads: list[list[bytes]] = []  # kept here: once merged, the uploads leave the store (server/retention.py)
    coordinator = running.coordinator
    channel = coordinators.channel(running)
    stub = pb_grpc.CoordinatorStub(channel)
    for name, scale in (("a", 1.01), ("b", 0.99)):
        md = _register(stub, name)
        task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
        raw = [serialize_block({k: v * scale for k, v in block_tensors(model, s).items()}) for s in specs]
        blobs = [coordinator.store.blobs.put(b) for b in raw]
        row = coordinator.state.task(task.task_id)
        assert row is not None
        # Stored as the upload path stores it, without the merge that would follow.
        coordinator.state.add_contribution(ContributionRow(
            task_id=row.id, round=row.round, slot=row.slot, client_id=row.client_id, blobs=blobs,
            committed_unix=0.0, record=VisitStats(
                lr=1e-4, seed=0, samples=6, bytes_down=0, bytes_up=0, train_seconds=1.0, download_seconds=0.0,
                visit_seconds=1.0, tokens=0, loss_before=1.0, loss_after=0.5, peak_memory_bytes=0,
                client_name=name, device="cpu")))
        uploads.append(raw)
    channel.close()
    before = coordinator.state.latest_version()
    assert before is not None and before[0] == 0
    coordinators.stop(running)  # the crash, before any merge
    restarted = coordinators.start(config)
    after = restarted.coordinator.state.latest_version()
    assert after is not None
    latest, manifest = after
    assert latest == 1 and restarted.coordinator.rounds_done == 1
    for spec, sha in zip(specs, manifest, strict=True):
        merged = safetensors.torch.load_file(str(restarted.coordinator.store.blobs.path(sha)))
        parts = [safetensors.torch.load(u[spec.index]) for u in uploads]
        for name, value in merged.items():
            assert torch.equal(value, parts[0][name].float() * 0.5 + parts[1][name].float() * 0.5), name
