"""The arithmetic version delta (common/delta_arith.py) and its negotiation.

The transform must be a bijection on bit patterns (every NaN payload, infinities, -0.0,
subnormals come back as they were), the codec must fall back to the XOR delta wherever the
arithmetic one cannot apply (misaligned chunks, mixed element sizes, plain zstd, incompressible
chunks), each side sends only what the other announced, and a run with it ends with exactly the
weights of a run with the XOR delta.
"""
from __future__ import annotations

import collections
import zlib

import grpc
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import Coordinators, MessageTap, address_of, register, wait_clients, wait_for, write_data
from fedcybgd.common import bytegroup, delta_arith
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.codec import BlobAssembler, CodecError, decode_chunk, encode_chunks, serialize_block, sha256_hex
from fedcybgd.common.partition import partition_model
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

CHUNK = 16 * 1024
WORDS = {2: (np.uint16, np.float16), 4: (np.uint32, np.float32)}


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, b: bytes | memoryview, /) -> int:
        self.data += b
        return len(b)


def _special_patterns(word_size: int) -> np.ndarray:
    """Bit patterns of the values that break careless float arithmetic, both signs."""
    if word_size == 2:  # bf16 and fp16 share the width: both kinds of patterns
        patterns = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x8001, 0x007F, 0x7F7F, 0xFF7F,
                    0x7C00, 0xFC00, 0x7E00, 0x03FF, 0x83FF, 0x7BFF, 0x7FFF, 0xFFFF]
    else:
        patterns = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                    0x00000001, 0x80000001, 0x007FFFFF, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7FFFFFFF, 0xFFFFFFFF]
    return np.array(patterns, dtype=WORDS[word_size][0])


def _round_trip(new: bytes, base: bytes, word_size: int) -> np.ndarray:
    diff = delta_arith.encode_into(new, base, word_size, np.empty(len(new), dtype=np.uint8)).copy()
    restored = delta_arith.decode_in_place(diff.copy(), base, word_size)
    assert restored.tobytes() == new
    return diff


# -- the transform ---------------------------------------------------------------------------------

@pytest.mark.parametrize("word_size", [2, 4])
def test_every_bit_pattern_comes_back(word_size: int):
    rng = np.random.default_rng(word_size)
    uint = WORDS[word_size][0]
    special = _special_patterns(word_size)
    # Every special value against every other (both orders), then random patterns against random bases.
    new = np.concatenate([np.repeat(special, len(special)), rng.integers(0, 2 ** (8 * word_size), 50_000, dtype=uint)])
    base = np.concatenate([np.tile(special, len(special)), rng.integers(0, 2 ** (8 * word_size), 50_000, dtype=uint)])
    _round_trip(new.tobytes(), base.tobytes(), word_size)
    if word_size == 2:  # all 2^16 patterns against a shifted copy of themselves
        every = np.arange(2**16, dtype=np.uint16)
        _round_trip(every.tobytes(), np.roll(every, 12345).tobytes(), 2)


@pytest.mark.parametrize("word_size", [2, 4])
@pytest.mark.parametrize("size", [0, 1, 3, 5, 7, 4097, 4099])
def test_odd_lengths_keep_their_tail(word_size: int, size: int):
    rng = np.random.default_rng(size)
    new, base = rng.bytes(size), rng.bytes(size)
    diff = _round_trip(new, base, word_size)
    tail = size % word_size
    assert diff[size - tail:].tobytes() == bytes(a ^ b for a, b in zip(new[size - tail:], base[size - tail:],
                                                                       strict=True))


@pytest.mark.parametrize("word_size", [2, 4])
def test_neighbouring_values_give_small_codes(word_size: int):
    """One step up is +1 (zig-zag 2), one step down -1 (zig-zag 1), at powers of two and through
    among the subnormals (6e-5 is one in fp16)."""
    uint, floating = WORDS[word_size]
    values = np.array([1.0, -1.0, 2.0, -0.5, 1e-3, -3.0, 6e-5], dtype=floating)
    up = np.nextafter(values, np.array(np.inf, dtype=floating))
    down = np.nextafter(values, np.array(-np.inf, dtype=floating))
    for moved, code in ((up, 2), (down, 1)):
        diff = _round_trip(moved.tobytes(), values.tobytes(), word_size)
        assert diff.view(uint).tolist() == [code] * len(values), (moved, values)
    # -0.0 and +0.0 are neighbours too
    diff = _round_trip(np.array([0.0], dtype=floating).tobytes(), np.array([-0.0], dtype=floating).tobytes(),
                       word_size)
    assert diff.view(uint).tolist() == [2]


@pytest.mark.parametrize("word_size", [2, 4])
def test_the_order_map_sorts_floats(word_size: int):
    _, floating = WORDS[word_size]
    values = np.sort(np.random.default_rng(0).standard_normal(10_000).astype(floating) * 1e3)
    values = np.concatenate([[-np.inf], values, [np.inf]]).astype(floating)
    ordered = np.empty(len(values), dtype=f"<i{word_size}")
    delta_arith._order(values.view(f"<i{word_size}"), ordered)
    assert np.all(np.diff(ordered.astype(np.int64)) >= 0)


def test_settings_and_choice():
    assert delta_arith.accepted("arith") == (pb.DELTA_ARITH, pb.DELTA_XOR)
    assert delta_arith.accepted("xor") == (pb.DELTA_XOR,)
    with pytest.raises(ValueError, match="deltas must be one of"):
        delta_arith.accepted("zigzag")
    with pytest.raises(ValueError, match="deltas must be one of"):
        CoordinatorConfig(deltas="ARITH")
    assert delta_arith.choose(frozenset(), delta_arith.accepted("arith")) == pb.DELTA_XOR  # a peer listing none
    assert delta_arith.choose(frozenset({pb.DELTA_ARITH}), delta_arith.accepted("arith")) == pb.DELTA_ARITH
    assert delta_arith.choose(frozenset({pb.DELTA_ARITH}), delta_arith.accepted("xor")) == pb.DELTA_XOR


# -- the chunk codec -------------------------------------------------------------------------------

def _versions(dtype: torch.dtype, rows: int = 256, seed: int = 0) -> tuple[bytes, bytes]:
    """A block and the same block after a small training-like update, with a few odd values."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, 128, generator=g) * 0.02
    new = old - 1e-3 * torch.randn(rows, 128, generator=g) * old
    for t in (old, new):
        t.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    norm = torch.ones(7, dtype=dtype)
    return serialize_block({"w": old.to(dtype), "n": norm}), serialize_block({"w": new.to(dtype), "n": norm})


def _assemble(sha: str, size: int, chunks: list[pb.Chunk], base: bytes, received: int = 0,
              deltas: frozenset[int] = delta_arith.KNOWN_DELTAS) -> bytes:
    sink = Sink()
    assembler = BlobAssembler(sha, size, sink, received=received, delta_source=lambda _: base, deltas=deltas)
    for chunk in chunks:
        assembler.add(chunk)
    assembler.verify()
    return bytes(sink.data)


@pytest.mark.parametrize(("dtype", "word_size"), [(torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)])
def test_both_deltas_round_trip_and_arith_is_smaller(dtype: torch.dtype, word_size: int):
    old, new = _versions(dtype)
    sha_old, sha_new = sha256_hex(old), sha256_hex(new)
    sizes = {}
    for delta in (pb.DELTA_XOR, pb.DELTA_ARITH):
        chunks = list(encode_chunks(sha_new, new, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=word_size,
                                    delta=(sha_old, old), delta_codec=delta))
        assert all(c.delta_base == sha_old for c in chunks)
        assert {c.delta for c in chunks} == {delta}
        assert _assemble(sha_new, len(new), chunks, old) == new
        assert b"".join(decode_chunk(c, old) for c in chunks) == new
        sizes[delta] = sum(len(c.data) for c in chunks)
    assert sizes[pb.DELTA_ARITH] < 0.95 * sizes[pb.DELTA_XOR], sizes


def test_misaligned_and_unsuitable_chunks_fall_back_to_xor():
    old, new = _versions(torch.bfloat16)
    sha_old, sha_new = sha256_hex(old), sha256_hex(new)

    def chunks(**kw) -> list[pb.Chunk]:
        args = dict(chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=2, delta=(sha_old, old),
                    delta_codec=pb.DELTA_ARITH)
        return list(encode_chunks(sha_new, new, **{**args, **kw}))

    # Cut at an odd offset (a resume there): no chunk is word-aligned, all are XOR, and all decode.
    odd = chunks(start=CHUNK + 1)
    assert odd and {c.delta for c in odd} == {pb.DELTA_XOR}
    assert _assemble(sha_new, len(new), odd, old, received=CHUNK + 1) == new[CHUNK + 1:]
    # Mixed element sizes (word_size 1) and plain zstd carry no word size: XOR.
    for kw in ({"word_size": 1}, {"codec": pb.CODEC_ZSTD}, {"codec": pb.CODEC_NONE}):
        got = chunks(**kw)
        assert {c.delta for c in got} == {pb.DELTA_XOR}, kw
        assert _assemble(sha_new, len(new), got, old) == new
    # Aligned chunks of an odd-length blob: arithmetic, the tail XORed.
    aligned = chunks()
    assert {c.delta for c in aligned} == {pb.DELTA_ARITH}
    pad = (3 - len(new)) % 4 + 4  # then the last chunk ends in 3 bytes that do not fill a word
    odd_blob, odd_base = new + bytes(range(1, pad + 1)), old + bytes(range(7, pad + 7))
    got = list(encode_chunks(sha256_hex(odd_blob), odd_blob, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP,
                             word_size=4, delta=(sha256_hex(odd_base), odd_base), delta_codec=pb.DELTA_ARITH))
    assert got[-1].raw_size % 4 == 3 and got[-1].delta == pb.DELTA_ARITH
    assert _assemble(sha256_hex(odd_blob), len(odd_blob), got, odd_base) == odd_blob


def test_an_incompressible_arith_chunk_goes_as_xor():
    rng = np.random.default_rng(1)
    new, base = rng.bytes(3 * CHUNK), rng.bytes(3 * CHUNK)
    chunks = list(encode_chunks(sha256_hex(new), new, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=2,
                                delta=(sha256_hex(base), base), delta_codec=pb.DELTA_ARITH))
    assert {(c.delta, c.codec) for c in chunks} == {(pb.DELTA_XOR, pb.CODEC_NONE)}
    assert _assemble(sha256_hex(new), len(new), chunks, base) == new


def _arith_chunk() -> tuple[pb.Chunk, bytes]:
    old, new = _versions(torch.bfloat16)
    chunk = next(encode_chunks(sha256_hex(new), new, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=2,
                               delta=(sha256_hex(old), old), delta_codec=pb.DELTA_ARITH))
    assert chunk.delta == pb.DELTA_ARITH
    return chunk, old


@pytest.mark.parametrize(("change", "message"), [
    ({"delta": 7}, "unknown delta encoding 7"),
    ({"delta_base": ""}, "names DELTA_ARITH but no delta base"),
    ({"codec": pb.CODEC_ZSTD}, "needs a byte-grouped chunk"),
    ({"data": b"\x01\x01" + b"\x00" * 4}, "not 2 or 4 bytes"),
    ({"data": b""}, "too short"),
])
def test_inconsistent_delta_chunks_are_refused(change: dict, message: str):
    chunk, old = _arith_chunk()
    bad = pb.Chunk()
    bad.CopyFrom(chunk)
    for key, value in change.items():
        setattr(bad, key, value)
    with pytest.raises(CodecError, match=message):
        _assemble(bad.blob_sha256, CHUNK, [bad], old)
    with pytest.raises(CodecError, match=message):
        decode_chunk(bad, old)


def test_a_delta_encoding_not_negotiated_is_refused_and_xor_always_read():
    chunk, old = _arith_chunk()
    with pytest.raises(CodecError, match="DELTA_ARITH was not negotiated"):
        _assemble(chunk.blob_sha256, CHUNK, [chunk], old, deltas=frozenset({pb.DELTA_XOR}))
    # A hand-made XOR chunk that leaves `delta` unset (a peer predating the negotiation) is read as XOR.
    raw = bytes(range(256)) * 64
    xor_chunk = pb.Chunk(blob_sha256="0" * 64, offset=0, raw_size=len(raw), codec=pb.CODEC_NONE,
                         data=bytes(a ^ b for a, b in zip(raw, old, strict=False)), crc32=zlib.crc32(raw),
                         delta_base="1" * 64)
    assert _assemble("0" * 64, len(raw), [xor_chunk], old, deltas=frozenset()) == raw


def test_a_wrong_base_fails_the_crc():
    chunk, old = _arith_chunk()
    wrong = bytearray(old)
    wrong[100] ^= 1
    with pytest.raises(CodecError, match="CRC"):
        decode_chunk(chunk, bytes(wrong))


def test_frame_word_size_reads_the_header():
    assert bytegroup.frame_word_size(bytegroup.encode(b"\x00" * 64, 4)) == 4
    with pytest.raises(CodecError):
        bytegroup.frame_word_size(b"\x02")


# -- negotiation with a coordinator ----------------------------------------------------------------

def _start(coordinators: Coordinators, deltas: str = "arith"):
    running = coordinators.start(chunk_bytes=CHUNK, deltas=deltas, schedule=ScheduleConfig(cycles=1),
                                 training=TrainingConfig(local_steps=1, seq_len=32))
    return running, coordinators.stub(running)


def _trained(model_dir, running) -> tuple[bytes, str, bytes]:
    """(a trained version of block 0, the base version's sha, its bytes)."""
    base = running.coordinator.state.manifest(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    spec = partition_model(model, 1)[0]
    trained = serialize_block({k: v - 1e-3 * v for k, v in block_tensors(model, spec).items()})
    return trained, base[0], running.coordinator.store.blobs.read(base[0])


def _upload(stub, md, task, blob: bytes, base: tuple[str, bytes], delta: int, forge: int | None = None):
    header = pb.UploadHeader(task_id=task.task_id, block_index=task.block_index, base_version=task.base_version,
                             blob_sha256=sha256_hex(blob), blob_size=len(blob), loss_before=1.0, loss_after=0.9)
    chunks = list(encode_chunks(header.blob_sha256, blob, chunk_bytes=CHUNK, codec=pb.CODEC_BYTEGROUP, word_size=4,
                                delta=base, delta_codec=delta))
    if forge is not None:
        chunks[0].delta = forge  # type: ignore[assignment]  # a value no peer may send
    return stub.UploadBlock(iter([pb.UploadMessage(header=header), *[pb.UploadMessage(chunk=c) for c in chunks]]),
                            metadata=md)


def _latest(running) -> int:
    latest = running.coordinator.state.latest_version()
    assert latest is not None
    return latest[0]


def _download_chunks(stub, md, task, have, accept_deltas) -> list[pb.Chunk]:
    messages = stub.DownloadModel(pb.DownloadRequest(task_id=task.task_id, have=have, accept_deltas=accept_deltas,
                                                     accept_codecs=[pb.CODEC_BYTEGROUP]), metadata=md)
    return [m.chunk for m in list(messages)[1:]]


@pytest.mark.multiprocess
def test_the_coordinator_sends_and_takes_only_what_was_negotiated(coordinators: Coordinators, tiny_model_dir):
    running, stub = _start(coordinators)
    md = register(stub, "site", device_kind="cpu").md
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md)
    assert list(info.accept_deltas) == [pb.DELTA_ARITH, pb.DELTA_XOR]
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    trained, base_sha, base = _trained(tiny_model_dir, running)

    # An unknown delta encoding in an upload: refused with a message, nothing stored.
    with pytest.raises(grpc.RpcError) as refused:
        _upload(stub, md, task, trained, (base_sha, base), pb.DELTA_ARITH, forge=9)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown delta encoding 9" in str(refused.value.details())
    assert _latest(running) == 0

    assert _upload(stub, md, task, trained, (base_sha, base), pb.DELTA_ARITH).new_version == 1
    assert running.coordinator.store.blobs.read(running.coordinator.state.manifest(1)[0]) == trained

    # Downloads: the arithmetic delta only to a client that lists it.
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    have = list(running.coordinator.state.manifest(0))
    sha = sha256_hex(trained)
    for accept, expected in (([pb.DELTA_ARITH, pb.DELTA_XOR], pb.DELTA_ARITH), ([], pb.DELTA_XOR),
                             ([pb.DELTA_XOR], pb.DELTA_XOR)):
        chunks = [c for c in _download_chunks(stub, md, task, have, accept) if c.blob_sha256 == sha]
        assert chunks and {c.delta for c in chunks} == {expected}, accept
        assert _assemble(sha, len(trained), chunks, base) == trained
    with pytest.raises(grpc.RpcError) as refused:
        _download_chunks(stub, md, task, have, [pb.DELTA_XOR, 12])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown delta encoding 12" in str(refused.value.details())
    with pytest.raises(grpc.RpcError) as refused:
        _download_chunks(stub, md, task, have, [pb.DELTA_XOR] * 17)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.multiprocess
def test_a_coordinator_set_to_xor_refuses_arith_uploads_and_sends_xor(coordinators: Coordinators, tiny_model_dir):
    running, stub = _start(coordinators, deltas="xor")
    md = register(stub, "site", device_kind="cpu").md
    assert list(stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=md).accept_deltas) == [pb.DELTA_XOR]
    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    trained, base_sha, base = _trained(tiny_model_dir, running)
    with pytest.raises(grpc.RpcError) as refused:
        _upload(stub, md, task, trained, (base_sha, base), pb.DELTA_ARITH)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "DELTA_ARITH was not negotiated" in str(refused.value.details())
    assert _latest(running) == 0
    assert _upload(stub, md, task, trained, (base_sha, base), pb.DELTA_XOR).new_version == 1

    task = stub.GetTask(pb.GetTaskRequest(wait_seconds=1), metadata=md).task
    have = list(running.coordinator.state.manifest(0))
    chunks = [c for c in _download_chunks(stub, md, task, have, [pb.DELTA_ARITH, pb.DELTA_XOR])
              if c.blob_sha256 == sha256_hex(trained)]
    assert chunks and {c.delta for c in chunks} == {pb.DELTA_XOR}


# -- end to end ------------------------------------------------------------------------------------

def _deltas_seen(tap: MessageTap) -> collections.Counter[tuple[str, int]]:
    """The delta encodings of the chunks a coordinator received (uploads, "up") and sent (downloads,
    "down"), counted by (direction, encoding): what actually travelled."""
    seen: collections.Counter[tuple[str, int]] = collections.Counter()
    for direction, messages in (("up", tap.requests("UploadBlock")), ("down", tap.responses("DownloadModel"))):
        seen.update((direction, m.chunk.delta) for m in messages if m.HasField("chunk") and m.chunk.delta_base)
    return seen


def _run(coordinators: Coordinators, clients, tmp_path,
         client_deltas: str) -> tuple[list[bytes], int, collections.Counter]:
    """A bf16 run of two real client processes against a coordinator offering both deltas; (the
    final blobs, bytes on the wire both ways, the delta encodings that travelled). Both clients
    hold the same data, so the model does not depend on which of them makes which visit (data order
    follows the visit's seed), and they take turns, so each downloads the blocks the other changed."""
    out = tmp_path / client_deltas
    data, _ = write_data(out, clients=1)
    tap = MessageTap()
    running = coordinators.start(state_dir=str(out / "state"), chunk_bytes=CHUNK, dtype="bfloat16",
                                 interceptors=[tap],
                                 schedule=ScheduleConfig(cycles=2, order="random", lr=3e-3, seed=3),
                                 training=TrainingConfig(local_steps=2, batch_size=2, seq_len=32))
    procs = [clients.start(address_of(running), data[0], out / "caches" / f"site-{i}", f"site-{i}",
                           "--deltas", client_deltas) for i in range(2)]
    wait_clients(procs)
    coordinator = running.coordinator
    wait_for(lambda: coordinator.finished, 60, "the run to finish")
    status = coordinator.status(pb.GetStatusRequest(max_visits=1000))
    wire = sum(v.bytes_down + v.bytes_up for v in status.visits)
    assert len(status.visits) == status.total_rounds
    assert {v.client_name for v in status.visits} == {"site-0", "site-1"}
    blobs = [coordinator.store.blobs.read(sha) for sha in coordinator.state.manifest(_latest(running))]
    coordinators.stop(running)
    return blobs, wire, _deltas_seen(tap)


@pytest.mark.multiprocess
def test_a_run_with_the_arith_delta_ends_where_the_xor_run_does(coordinators: Coordinators, clients, tmp_path):
    """The same run twice: clients that decode the arithmetic delta, then clients set to XOR (which
    they then get both ways, the coordinator offering both): bit-identical final models."""
    arith, arith_wire, arith_seen = _run(coordinators, clients, tmp_path, "arith")
    xor, xor_wire, xor_seen = _run(coordinators, clients, tmp_path, "xor")
    assert arith == xor, "the arithmetic delta changed the model"
    assert arith_seen[("up", pb.DELTA_ARITH)] and arith_seen[("down", pb.DELTA_ARITH)], arith_seen
    assert xor_seen[("up", pb.DELTA_XOR)] and xor_seen[("down", pb.DELTA_XOR)], xor_seen
    assert not xor_seen[("up", pb.DELTA_ARITH)] and not xor_seen[("down", pb.DELTA_ARITH)], xor_seen
    print(f"bytes on the wire: arith {arith_wire}, xor {xor_wire} ({arith_wire / xor_wire:.3f})")
