"""Lossy context compression: frozen blocks as int8 / 4-bit / pruned differences from what the
client holds, or not sent at all (layer dropping); the trainable block always exact."""
from __future__ import annotations

import io
import math

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from conftest import ClientProcesses, Coordinators, address_of, register, wait_clients, wait_for, write_data
from fedcybgd.common import context
from fedcybgd.common.blocks import TensorSpec, block_tensors, torch_dtype_to_st
from fedcybgd.common.codec import BlobAssembler, CodecError, encode_chunks, serialize_block, sha256_hex
from fedcybgd.common.partition import partition_model
from fedcybgd.server.config import ContextConfig, EvalConfig, TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

CHUNK = 16 * 1024


def _pair(shape=(96, 130), dtype=torch.bfloat16, changed=0.8, seed=0):
    """A reference block and a trained version of it where a share of the values moved."""
    g = torch.Generator().manual_seed(seed)
    ref = {"w": (torch.randn(shape, generator=g) * 0.02).to(dtype), "norm": torch.ones(shape[0], dtype=dtype)}
    step = torch.randn(shape, generator=g) * 2e-3 * (torch.rand(shape, generator=g) < changed)
    new = {"w": (ref["w"].float() + step).to(dtype), "norm": (ref["norm"].float() * 1.01).to(dtype)}
    specs = [TensorSpec("w", shape, torch_dtype_to_st(dtype)),
             TensorSpec("norm", (shape[0],), torch_dtype_to_st(dtype))]
    return ref, new, specs


@pytest.mark.parametrize("method,qmax", [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("use_reference", [True, False])
def test_quantised_difference_is_within_half_a_step(method, qmax, dtype, use_reference):
    ref, new, specs = _pair(dtype=dtype)
    reference = ref if use_reference else None
    out = context.decode(method, context.encode(method, new, reference, group_size=64), specs, reference, group_size=64)
    assert out["norm"].equal(new["norm"]), "small tensors travel exactly"
    assert out["w"].dtype == dtype and out["w"].shape == new["w"].shape
    diff = (new["w"].float() - (ref["w"].float() if use_reference else 0)).flatten()
    pad = (-diff.numel()) % 64
    step = torch.cat([diff, diff.new_zeros(pad)]).reshape(-1, 64).abs().amax(1) / qmax
    bound = (step.repeat_interleave(64)[: diff.numel()] / 2).reshape(new["w"].shape)
    rounding = new["w"].float().abs() * (2 ** -8 if dtype == torch.bfloat16 else 2 ** -23)
    assert bool(((out["w"].float() - new["w"].float()).abs() <= bound + rounding + 1e-12).all())
    if use_reference:  # values the visit did not change come back exactly
        same = new["w"] == ref["w"]
        assert same.any() and out["w"][same].equal(new["w"][same])


def test_prune_keeps_the_largest_changes_exactly():
    ref, new, specs = _pair(shape=(64, 100))
    enc = context.encode("prune", new, ref, ratio=0.75)
    out = context.decode("prune", enc, specs, ref)
    diff = (new["w"].float() - ref["w"].float()).abs().flatten()
    keep = math.ceil(0.25 * diff.numel())
    assert enc["w.values"].numel() == keep
    top = torch.topk(diff, keep).indices
    assert out["w"].flatten()[top].equal(new["w"].flatten()[top])
    rest = torch.ones_like(diff, dtype=torch.bool)
    rest[top] = False
    assert out["w"].flatten()[rest].equal(ref["w"].flatten()[rest])


@pytest.mark.parametrize("shape", [(0, 5000), (1, 4097), (3, 4099), (4097,)])
@pytest.mark.parametrize("method", context.ENCODED_METHODS)
def test_odd_and_empty_shapes(method, shape):
    value = {"w": torch.linspace(-1, 1, math.prod(shape)).reshape(shape).to(torch.bfloat16)}
    specs = [TensorSpec("w", shape, "BF16")]
    out = context.decode(method, context.encode(method, value, None, ratio=0.5), specs, None)
    assert out["w"].shape == shape
    if method == "int8":
        assert torch.allclose(out["w"].float(), value["w"].float(), atol=1 / 127)


def test_encodings_are_deterministic():
    ref, new, _ = _pair()
    for method in context.ENCODED_METHODS:
        assert serialize_block(context.encode(method, new, ref)) == serialize_block(context.encode(method, new, ref))


@pytest.mark.parametrize("mutate,match", [
    (lambda e: e.pop("w.scales"), "lacks"),
    (lambda e: e.update({"extra": torch.zeros(1)}), "unexpected"),
    (lambda e: e.update({"w.scales": e["w.scales"].to(torch.float16)}), "expected"),
    (lambda e: e.update({"w.codes": e["w.codes"][:-1]}), "expected"),
    (lambda e: e.update({"w.scales": torch.full_like(e["w.scales"], float("nan"))}), "non-finite"),
    (lambda e: e.update({"norm.exact": e["norm.exact"].float()}), "expected"),
])
def test_malformed_quantised_encodings_are_refused(mutate, match):
    ref, new, specs = _pair()
    enc = context.encode("int8", new, ref)
    mutate(enc)
    with pytest.raises(CodecError, match=match):
        context.decode("int8", enc, specs, ref)


@pytest.mark.parametrize("gaps,match", [
    ([0, 0], "increase"), ([-1, 3], "increase"), ([5, 10**9], "outside"),
])
def test_malformed_pruned_encodings_are_refused(gaps, match):
    ref, new, specs = _pair()
    enc = context.encode("prune", new, ref)
    enc["w.gaps"] = torch.tensor(gaps, dtype=torch.int32)
    enc["w.values"] = enc["w.values"][: len(gaps)]
    with pytest.raises(CodecError, match=match):
        context.decode("prune", enc, specs, ref)
    with pytest.raises(CodecError, match="reference"):
        context.decode("prune", context.encode("prune", new, ref), specs, {"w": torch.zeros(3)})


# -- over gRPC ---------------------------------------------------------------------------------

def _visit_with_fake_training(stub, md, model, specs, scale):
    """One visit whose 'training' nudges the block: the coordinator sees a real upload."""
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    spec = specs[task.block_index]
    blob = serialize_block({k: v + scale * torch.randn_like(v) * v.abs().mean()
                            for k, v in block_tensors(model, spec).items()})
    header = pb.UploadHeader(task_id=task.task_id, block_index=task.block_index, base_version=task.base_version,
                             blob_sha256=sha256_hex(blob), blob_size=len(blob), loss_before=1.0, loss_after=0.9)
    chunks = encode_chunks(header.blob_sha256, blob, chunk_bytes=CHUNK)
    stub.UploadBlock(iter([pb.UploadMessage(header=header), *[pb.UploadMessage(chunk=c) for c in chunks]]), metadata=md)
    return task, blob


def _after_one_cycle(coordinators: Coordinators, tiny_model_dir, method, ratio=None):
    """A coordinator whose every block changed once (a client faking the training), and the
    first task of the next cycle: every frozen block now differs from the base."""
    running = coordinators.start(chunk_bytes=CHUNK, schedule=ScheduleConfig(cycles=2, embed_head_every=1),
                                 training=TrainingConfig(local_steps=1, seq_len=32),
                                 context=ContextConfig(method=method, ratio=ratio))
    stub = coordinators.stub(running)
    md = register(stub).md
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    specs = partition_model(model, 1)
    torch.manual_seed(0)
    for _ in specs:
        _visit_with_fake_training(stub, md, model, specs, 0.05)
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    return running.coordinator, stub, md, specs, task


@pytest.mark.multiprocess
@pytest.mark.parametrize("method,codec", [("int8", pb.CONTEXT_INT8), ("int4", pb.CONTEXT_INT4),
                                          ("prune", pb.CONTEXT_PRUNE)])
def test_frozen_blocks_arrive_approximated_and_the_trainable_block_exactly(tiny_model_dir, coordinators: Coordinators,
                                                                           method, codec):
    coordinator, stub, md, specs, task = _after_one_cycle(coordinators, tiny_model_dir, method)
    base = coordinator.state.manifest(0)
    latest = coordinator.state.manifest(task.base_version)
    request = pb.DownloadRequest(task_id=task.task_id, have=list(base), accept_codecs=[pb.CODEC_BYTEGROUP],
                                 accept_context=[codec])
    messages = list(stub.DownloadModel(request, metadata=md))
    manifest = messages[0].manifest
    trainable = manifest.blocks[task.block_index]
    assert not trainable.HasField("approx") and trainable.sha256 == latest[task.block_index]
    frozen = [b for b in manifest.blocks if b.index != task.block_index]
    assert all(b.approx.codec == codec and b.approx.reference_sha256 == base[b.index] for b in frozen)
    assert list(manifest.sending) == [latest[task.block_index], *[b.approx.sha256 for b in frozen]]
    # The trainable block arrives bit-exactly (as a delta against the base the client holds).
    chunks = [m.chunk for m in messages[1:] if m.chunk.blob_sha256 == latest[task.block_index]]
    sink = io.BytesIO()
    asm = BlobAssembler(trainable.sha256, trainable.size, sink,
                        delta_source=lambda sha: coordinator.store.blobs.read(sha))
    for c in chunks:
        asm.add(c)
    assert sink.getvalue() == coordinator.store.blobs.read(trainable.sha256)
    # Each frozen block decodes, within its method's error, to the current version.
    for entry in frozen:
        encoded = safetensors.torch.load(coordinator.context.store.read(entry.approx.sha256))
        reference = safetensors.torch.load(coordinator.store.blobs.read(base[entry.index]))
        exact = safetensors.torch.load(coordinator.store.blobs.read(entry.sha256))
        got = context.decode(method, encoded, specs[entry.index].tensors, reference, group_size=entry.approx.group_size)
        for name, value in exact.items():
            moved = (value.float() - reference[name].float()).norm()
            error = (got[name].float() - value.float()).norm()
            assert error <= {"int8": 0.02, "int4": 0.3, "prune": 0.95}[method] * moved + 1e-6, (entry.name, name)
    wire = sum(m.ByteSize() for m in messages)
    # A client that does not announce the codec gets every block exactly; it costs more.
    lossless = list(stub.DownloadModel(pb.DownloadRequest(task_id=task.task_id, have=list(base),
                                                          accept_codecs=[pb.CODEC_BYTEGROUP]), metadata=md))
    assert not any(b.HasField("approx") for b in lossless[0].manifest.blocks)
    assert wire < sum(m.ByteSize() for m in lossless)
    # The model itself is untouched by approximating it.
    assert coordinator.state.manifest(task.base_version) == latest


@pytest.mark.multiprocess
def test_drop_sends_a_share_of_the_changed_frozen_blocks_not_at_all(tiny_model_dir, coordinators: Coordinators):
    coordinator, stub, md, specs, task = _after_one_cycle(coordinators, tiny_model_dir, "drop", ratio=0.6)
    base = coordinator.state.manifest(0)
    request = pb.DownloadRequest(task_id=task.task_id, have=list(base), accept_codecs=[pb.CODEC_BYTEGROUP],
                                 accept_context=[pb.CONTEXT_DROP])
    manifest = next(iter(stub.DownloadModel(request, metadata=md))).manifest
    dropped = [b for b in manifest.blocks if b.HasField("approx")]
    assert len(dropped) == math.floor(0.6 * (len(specs) - 1) + 0.5)
    assert all(b.approx.codec == pb.CONTEXT_DROP and b.approx.reference_sha256 == base[b.index] and not b.approx.sha256
               for b in dropped)
    assert task.block_index not in {b.index for b in dropped}
    assert set(manifest.sending) == {b.sha256 for b in manifest.blocks if not b.HasField("approx")}


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", ["int4", "drop"])
def test_a_run_with_lossy_context_completes_and_learns(tiny_model_dir, tmp_path, method, coordinators: Coordinators,
                                                       clients: ClientProcesses):
    """Real client processes decode the approximations and train on them; the run finishes with
    every visit merged and a finite held-out loss below the base model's."""
    data, eval_path = write_data(tmp_path, clients=2)
    running = coordinators.start(schedule=ScheduleConfig(cycles=2, lr=3e-3, embed_head_every=1),
                                 training=TrainingConfig(local_steps=4, batch_size=2, seq_len=32),
                                 context=ContextConfig(method=method),
                                 eval=EvalConfig(data=str(eval_path), max_sequences=16))
    coordinator = running.coordinator
    # Each site makes half the visits: both train on approximations of the other's blocks, whichever
    # starts first (one fast site alone would hold every version exactly and never need one).
    half = str(coordinator.schedule.total_rounds // 2)
    procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}",
                           "--base-model", str(tiny_model_dir), "--max-visits", half) for i in range(2)]
    wait_clients(procs, timeout=240)
    wait_for(lambda: coordinator.finished, 60, "the run to finish")
    status = coordinator.status(pb.GetStatusRequest())
    assert len(status.visits) == status.total_rounds
    losses = {e.version: e.loss for e in status.evals}
    assert math.isfinite(losses[status.version]) and losses[status.version] < losses[0]
    sent = coordinator.metrics.context_blocks.labels(method=method)._value.get()
    assert sent > 0, "no frozen block was approximated: the option was not exercised"


@pytest.mark.multiprocess
def test_an_approximation_larger_than_the_exact_block_is_not_used(tiny_model_dir, coordinators: Coordinators):
    """Pruning nothing (ratio 0) sends every value with its position: more bytes than the exact
    block. The coordinator notices and sends the exact block: lossy never costs more."""
    coordinator, stub, md, specs, task = _after_one_cycle(coordinators, tiny_model_dir, "prune", ratio=0.0)
    base = coordinator.state.manifest(0)
    request = pb.DownloadRequest(task_id=task.task_id, have=list(base), accept_codecs=[pb.CODEC_BYTEGROUP],
                                 accept_context=[pb.CONTEXT_PRUNE])
    manifest = next(iter(stub.DownloadModel(request, metadata=md))).manifest
    assert not any(b.HasField("approx") for b in manifest.blocks)
    assert set(manifest.sending) == set(coordinator.state.manifest(task.base_version))
