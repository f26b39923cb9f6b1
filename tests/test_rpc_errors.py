"""Bad input against a running coordinator: each gets a specific status code and a message, the
coordinator keeps serving, and the global model is unchanged."""
from __future__ import annotations

import math

import grpc
import pytest

from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.codec import encode_chunks, serialize_block, sha256_hex
from fedcybgd.common.blocks import partition_model
from fedcybgd.server.app import start
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc
from transformers import AutoModelForCausalLM


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    config = CoordinatorConfig(insecure=True, model=str(tiny_model_dir), state_dir=str(tmp_path_factory.mktemp("state")),
                               address="127.0.0.1:0", max_concurrent_visits=2,
                               schedule=ScheduleConfig(cycles=1), training=TrainingConfig(local_steps=1, seq_len=32))
    running = start(config)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, pb_grpc.CoordinatorStub(channel)
    channel.close()
    running.stop(grace=0)


def _register(stub, name="site"):
    reply = stub.Register(pb.RegisterRequest(name=name, device_kind="cpu"))
    return (("authorization", f"Bearer {reply.token}"),)


def _task(stub, md) -> pb.Task:
    reply = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md)
    assert reply.WhichOneof("outcome") == "task"
    return reply.task


def _upload(stub, md, header, blob, mutate_chunk=None):
    chunks = list(encode_chunks(header.blob_sha256, blob, chunk_bytes=16 * 1024))
    if mutate_chunk:
        mutate_chunk(chunks)
    return stub.UploadBlock(iter([pb.UploadMessage(header=header), *[pb.UploadMessage(chunk=c) for c in chunks]]), metadata=md)


def _block_blob(tiny_model_dir, block_index, change=None):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    spec = partition_model(model, 1)[block_index]
    tensors = {k: v.clone() for k, v in block_tensors(model, spec).items()}
    if change:
        change(tensors)
    else:
        for t in tensors.values():
            t.add_(0.01)
    return serialize_block(tensors)


def _header(task, blob, **overrides):
    values = dict(task_id=task.task_id, block_index=task.block_index, base_version=task.base_version,
                  blob_sha256=sha256_hex(blob), blob_size=len(blob), loss_before=1.0, loss_after=0.9)
    values.update(overrides)
    return pb.UploadHeader(**values)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.details(), "a refusal must say why"
    return info.value.code()


def test_bad_inputs_are_refused_and_change_nothing(server, tiny_model_dir):
    running, stub = server
    state = running.coordinator.state
    version_before, manifest_before = state.latest_version()
    md_a, md_b = _register(stub, "a"), _register(stub, "b")
    task_a, task_b = _task(stub, md_a), _task(stub, md_b)
    good_a = _block_blob(tiny_model_dir, task_a.block_index)

    assert _code(lambda: stub.Register(pb.RegisterRequest(name=""))) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stub.GetTask(pb.GetTaskRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: stub.GetTask(pb.GetTaskRequest(), metadata=(("authorization", "Bearer nope"),))) \
        == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(stub.DownloadModel(pb.DownloadRequest(task_id=task_b.task_id), metadata=md_a))) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: list(stub.DownloadModel(pb.DownloadRequest(task_id="t-nope"), metadata=md_a))) \
        == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: _upload(stub, md_a, _header(task_b, good_a), good_a)) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _upload(stub, md_a, _header(task_a, good_a, block_index=task_b.block_index), good_a)) \
        == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _upload(stub, md_a, _header(task_a, good_a, base_version=task_a.base_version + 5), good_a)) \
        == grpc.StatusCode.FAILED_PRECONDITION
    assert _code(lambda: _upload(stub, md_a, _header(task_a, good_a, blob_size=10**12), good_a)) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: _upload(stub, md_a, _header(task_a, good_a, blob_sha256="0" * 64), good_a)) \
        == grpc.StatusCode.INVALID_ARGUMENT

    def corrupt(chunks):
        chunks[0].crc32 ^= 1
    assert _code(lambda: _upload(stub, md_a, _header(task_a, good_a), good_a, corrupt)) == grpc.StatusCode.INVALID_ARGUMENT

    def drop_last(chunks):
        chunks.pop()
    assert _code(lambda: _upload(stub, md_a, _header(task_a, good_a), good_a, drop_last)) == grpc.StatusCode.INVALID_ARGUMENT

    def poison(tensors):
        next(iter(tensors.values()))[0] = math.nan
    nan_blob = _block_blob(tiny_model_dir, task_a.block_index, poison)
    assert _code(lambda: _upload(stub, md_a, _header(task_a, nan_blob), nan_blob)) == grpc.StatusCode.INVALID_ARGUMENT

    def reshape(tensors):
        name = next(n for n, t in tensors.items() if t.dim() == 2)
        tensors[name] = tensors[name].flatten()
    bad_shape = _block_blob(tiny_model_dir, task_a.block_index, reshape)
    assert _code(lambda: _upload(stub, md_a, _header(task_a, bad_shape), bad_shape)) == grpc.StatusCode.INVALID_ARGUMENT

    other = _block_blob(tiny_model_dir, task_b.block_index)  # another block's tensors under task a
    assert _code(lambda: _upload(stub, md_a, _header(task_a, other), other)) == grpc.StatusCode.INVALID_ARGUMENT

    not_safetensors = b"\x00" * 256
    assert _code(lambda: _upload(stub, md_a, _header(task_a, not_safetensors), not_safetensors)) \
        == grpc.StatusCode.INVALID_ARGUMENT

    # Nothing of the above changed the model, nor left a blob behind.
    assert state.latest_version() == (version_before, manifest_before)
    assert not running.coordinator.store.blobs.has(sha256_hex(nan_blob))

    # The coordinator still serves, and a correct upload (then its retry) goes through.
    reply = _upload(stub, md_a, _header(task_a, good_a), good_a)
    assert reply.new_version == version_before + 1
    again = _upload(stub, md_a, _header(task_a, good_a), good_a)
    assert again.new_version == reply.new_version
    assert state.latest_version()[0] == version_before + 1
    # A second, different upload for the finished task is refused.
    assert _code(lambda: _upload(stub, md_a, _header(task_a, other), other)) == grpc.StatusCode.FAILED_PRECONDITION
    assert len(state.visits()) == 1
