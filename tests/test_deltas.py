"""Version deltas: a blob travels as the XOR against an older version of the same block that the
receiver holds. Lossless, smaller after training, and only against what is allowed."""
from __future__ import annotations

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import Coordinators, register
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.codec import BlobAssembler, CodecError, encode_chunks, serialize_block, sha256_hex
from fedcybgd.common.partition import partition_model
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

CHUNK = 16 * 1024


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b
        return len(b)


def _versions():
    """A bf16 block and the same block after a small training-like update."""
    g = torch.Generator().manual_seed(0)
    old = {"w": (torch.randn(256, 128, generator=g) * 0.02).to(torch.bfloat16)}
    new = {"w": (old["w"].float() - 1e-3 * torch.randn(256, 128, generator=g) * old["w"].float()).to(torch.bfloat16)}
    return serialize_block(old), serialize_block(new)


def test_delta_chunks_round_trip_and_are_smaller():
    old, new = _versions()
    sha_old, sha_new = sha256_hex(old), sha256_hex(new)
    plain = list(encode_chunks(sha_new, new, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=2))
    delta = list(encode_chunks(sha_new, new, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=2,
                               delta=(sha_old, old)))
    assert all(c.delta_base == sha_old for c in delta)
    assert sum(len(c.data) for c in delta) < 0.8 * sum(len(c.data) for c in plain)
    sink = Sink()
    asm = BlobAssembler(sha_new, len(new), sink, delta_source={sha_old: old}.__getitem__)
    for c in delta:
        asm.add(c)
    asm.verify()
    assert bytes(sink.data) == new


def test_delta_chunks_need_the_right_base():
    old, new = _versions()
    chunks = list(encode_chunks(sha256_hex(new), new, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=2,
                                delta=(sha256_hex(old), old)))
    with pytest.raises(CodecError, match="cannot use"):  # the receiver does not hold the base
        held: dict[str, bytes] = {}
        BlobAssembler(sha256_hex(new), len(new), Sink(), delta_source=held.__getitem__).add(chunks[0])
    wrong = bytes(len(old))
    with pytest.raises(CodecError, match="CRC"):  # a different base cannot reconstruct the bytes
        BlobAssembler(sha256_hex(new), len(new), Sink(), delta_source=lambda sha: wrong).add(chunks[0])
    with pytest.raises(ValueError):
        list(encode_chunks(sha256_hex(new), new, chunk_bytes=CHUNK, delta=(sha256_hex(old), old[:-8])))


@pytest.fixture
def coordinator(coordinators: Coordinators):
    running = coordinators.start(chunk_bytes=CHUNK, schedule=ScheduleConfig(cycles=1),
                                 training=TrainingConfig(local_steps=1, seq_len=32))
    return running, coordinators.stub(running)


def _client(stub):
    return register(stub, "site", device_kind="cpu").md


def _download(stub, md, task, have):
    return list(stub.DownloadModel(pb.DownloadRequest(task_id=task.task_id, have=have,
                                                      accept_codecs=[pb.CODEC_BYTEGROUP]), metadata=md))


def _upload(stub, md, task, blob, delta=None):
    header = pb.UploadHeader(task_id=task.task_id, block_index=task.block_index, base_version=task.base_version,
                             blob_sha256=sha256_hex(blob), blob_size=len(blob), loss_before=1.0, loss_after=0.9)
    chunks = encode_chunks(header.blob_sha256, blob, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=4,
                           delta=delta)
    return stub.UploadBlock(iter([pb.UploadMessage(header=header), *[pb.UploadMessage(chunk=c) for c in chunks]]),
                            metadata=md)


@pytest.mark.multiprocess
def test_uploads_and_downloads_travel_as_deltas_against_what_the_peer_holds(coordinator, tiny_model_dir):
    running, stub = coordinator
    base = running.coordinator.state.manifest(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    spec = partition_model(model, 1)[0]
    md = _client(stub)
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    assert task.block_index == 0
    old = running.coordinator.store.blobs.read(base[0])
    trained = serialize_block({k: v + 1e-4 * v for k, v in block_tensors(model, spec).items()})

    # Only the block the visit started from may serve as the base of an upload delta.
    other = running.coordinator.store.blobs.read(base[-1])
    with pytest.raises(grpc.RpcError) as refused:
        _upload(stub, md, task, trained, delta=(base[-1], other + bytes(len(old) - len(other)))
                if len(other) < len(old) else (base[-1], other[: len(old)]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert running.coordinator.state.latest_version()[0] == 0

    reply = _upload(stub, md, task, trained, delta=(base[0], old))
    assert reply.new_version == 1
    assert running.coordinator.store.blobs.read(running.coordinator.state.manifest(1)[0]) == trained

    # The next visit: block 0 changed; a client holding the base gets it as a delta against it.
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    messages = _download(stub, md, task, have=list(base))
    chunks = [m.chunk for m in messages[1:]]
    assert {c.blob_sha256 for c in chunks} == {sha256_hex(trained)}
    assert all(c.delta_base == base[0] for c in chunks)
    sink = Sink()
    asm = BlobAssembler(sha256_hex(trained), len(trained), sink, delta_source={base[0]: old}.__getitem__)
    for c in chunks:
        asm.add(c)
    assert bytes(sink.data) == trained
    # Without the older version, the plain block comes.
    plain = [m.chunk for m in _download(stub, md, task, have=list(base[1:]))[1:]]
    assert not any(c.delta_base for c in plain if c.blob_sha256 == sha256_hex(trained))
    assert sum(len(c.data) for c in chunks) < sum(len(c.data) for c in plain if c.blob_sha256 == sha256_hex(trained))
