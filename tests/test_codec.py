"""Chunk codec, blob reassembly and canonical block serialization (fedcybgd.common.codec)."""

from __future__ import annotations

import hashlib
import random
import struct
import tracemalloc
import zlib
from typing import Any

import pytest
import torch
import zstandard

from fedcybgd.common.codec import (
    MAX_CHUNK_BYTES,
    BlobAssembler,
    CodecError,
    decode_chunk,
    deserialize_block,
    encode_chunks,
    serialize_block,
    sha256_hex,
)
from fedcybgd.v1 import coordinator_pb2 as pb

torch.set_num_threads(1)

CB = 16 * 1024 + 1000  # the smallest allowed chunk plus an odd amount, so a few tens of KiB make several chunks


class Sink:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, data: bytes | memoryview, /) -> int:
        self.buf += data
        return len(data)


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _compressible(n: int) -> bytes:
    return (b"fedcybgd block cycle " * (n // 21 + 1))[:n]


def _chunks(data: bytes, **kw) -> list[pb.Chunk]:
    return list(encode_chunks(sha256_hex(data), data, **kw))


def _chunk(data: bytes, *, raw: bytes | None = None, raw_size: int | None = None, codec: pb.Codec = pb.CODEC_NONE,
           offset: int = 0, sha: str = "0" * 64) -> pb.Chunk:
    """A hand-made chunk: `data` is the payload, `raw` the bytes it claims to decode to."""
    raw = data if raw is None else raw
    return pb.Chunk(blob_sha256=sha, offset=offset, raw_size=len(raw) if raw_size is None else raw_size,
                    codec=codec, data=data, crc32=zlib.crc32(raw))


def _assemble(data: bytes, chunks: list[pb.Chunk]) -> bytes:
    sink = Sink()
    asm = BlobAssembler(sha256=sha256_hex(data), size=len(data), sink=sink)
    for c in chunks:
        asm.add(c)
    assert asm.complete
    asm.verify()
    return bytes(sink.buf)


# ------------------------------------------------------------------------------------- round trips

SIZES = [0, 1, CB - 1, CB, CB + 1, 2 * CB, 3 * CB, 3 * CB + 7]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["random", "compressible"])
def test_round_trip_and_fixed_offsets(size, kind):
    data = _random_bytes(size, seed=size) if kind == "random" else _compressible(size)
    chunks = _chunks(data, chunk_bytes=CB)
    # Cut at fixed raw offsets, whatever the compression did.
    assert [c.offset for c in chunks] == list(range(0, size, CB))
    assert [c.raw_size for c in chunks] == [min(CB, size - off) for off in range(0, size, CB)]
    assert all(c.blob_sha256 == sha256_hex(data) for c in chunks)
    for c in chunks:
        assert decode_chunk(c) == data[c.offset : c.offset + c.raw_size]
        assert c.crc32 == zlib.crc32(data[c.offset : c.offset + c.raw_size])
    assert b"".join(decode_chunk(c) for c in chunks) == data
    assert _assemble(data, chunks) == data


def test_memoryview_input_round_trips():
    data = _random_bytes(2 * CB + 3)
    chunks = list(encode_chunks(sha256_hex(data), memoryview(data), chunk_bytes=CB))
    assert _assemble(data, chunks) == data


def test_mixed_data_offsets_do_not_depend_on_compressibility():
    # Chunks alternate between incompressible and compressible content.
    parts = [_random_bytes(CB, seed=1), _compressible(CB), _random_bytes(CB, seed=2), _compressible(CB // 2)]
    data = b"".join(parts)
    chunks = _chunks(data, chunk_bytes=CB)
    assert [c.offset for c in chunks] == [0, CB, 2 * CB, 3 * CB]
    assert [c.codec for c in chunks] == [pb.CODEC_NONE, pb.CODEC_ZSTD, pb.CODEC_NONE, pb.CODEC_ZSTD]
    assert [decode_chunk(c) for c in chunks] == parts


def test_incompressible_data_is_sent_raw():
    data = _random_bytes(3 * CB + 7)
    chunks = _chunks(data, chunk_bytes=CB)
    assert len(chunks) == 4
    for c in chunks:
        assert c.codec == pb.CODEC_NONE
        assert c.data == data[c.offset : c.offset + c.raw_size]


def test_compressible_data_is_zstd_and_smaller():
    data = _compressible(3 * CB + 501)  # the remainder too is long enough to compress
    chunks = _chunks(data, chunk_bytes=CB)
    assert len(chunks) == 4
    for c in chunks:
        assert c.codec == pb.CODEC_ZSTD
        assert len(c.data) < c.raw_size
        assert zstandard.ZstdDecompressor().decompress(c.data) == data[c.offset : c.offset + c.raw_size]
    assert sum(len(c.data) for c in chunks) < len(data) // 2


def test_codec_none_requested_sends_everything_raw():
    data = _compressible(3 * CB + 7)
    chunks = _chunks(data, chunk_bytes=CB, codec=pb.CODEC_NONE)
    assert [c.codec for c in chunks] == [pb.CODEC_NONE] * 4
    assert b"".join(c.data for c in chunks) == data
    assert _assemble(data, chunks) == data


@pytest.mark.parametrize("start_chunk", [0, 1, 2, 3, 4])
def test_start_offset_resumes_at_a_chunk_boundary(start_chunk):
    data = _random_bytes(2 * CB) + _compressible(CB + 7)  # 4 chunks
    full = _chunks(data, chunk_bytes=CB)
    tail = _chunks(data, chunk_bytes=CB, start=start_chunk * CB)
    assert [c.SerializeToString() for c in tail] == [c.SerializeToString() for c in full[start_chunk:]]
    assert b"".join(decode_chunk(c) for c in tail) == data[start_chunk * CB :]


def test_start_beyond_end_yields_nothing():
    data = _random_bytes(CB)
    assert _chunks(data, chunk_bytes=CB, start=CB) == []
    assert _chunks(data, chunk_bytes=CB, start=5 * CB) == []


def test_chunks_of_default_size_stay_within_limit():
    data = _random_bytes(MAX_CHUNK_BYTES + 5)
    chunks = _chunks(data, chunk_bytes=MAX_CHUNK_BYTES)
    assert [c.raw_size for c in chunks] == [MAX_CHUNK_BYTES, 5]
    assert _assemble(data, chunks) == data


@pytest.mark.parametrize("chunk_bytes", [0, -1, MAX_CHUNK_BYTES + 1])
def test_invalid_chunk_bytes_rejected(chunk_bytes):
    with pytest.raises(ValueError):
        list(encode_chunks("0" * 64, b"abc", chunk_bytes=chunk_bytes))


# ------------------------------------------------------------------------------- decode_chunk checks


def test_corrupted_raw_chunk_fails_crc():
    data = _random_bytes(CB)
    (c,) = _chunks(data, chunk_bytes=CB)
    assert c.codec == pb.CODEC_NONE
    bad = bytearray(c.data)
    bad[17] ^= 0x01
    c.data = bytes(bad)
    with pytest.raises(CodecError, match="CRC"):
        decode_chunk(c)


def test_wrong_crc_field_rejected():
    (c,) = _chunks(_compressible(CB), chunk_bytes=CB)
    c.crc32 ^= 1
    with pytest.raises(CodecError, match="CRC"):
        decode_chunk(c)


def test_corrupted_zstd_chunk_rejected():
    data = _compressible(CB)
    (c,) = _chunks(data, chunk_bytes=CB)
    assert c.codec == pb.CODEC_ZSTD
    for pos in range(len(c.data)):
        bad = bytearray(c.data)
        bad[pos] ^= 0xFF
        corrupted = pb.Chunk()
        corrupted.CopyFrom(c)
        corrupted.data = bytes(bad)
        with pytest.raises(CodecError):
            decode_chunk(corrupted)


@pytest.mark.parametrize("delta", [-1, 1])
@pytest.mark.parametrize("kind", ["random", "compressible"])
def test_wrong_raw_size_rejected(delta, kind):
    data = _random_bytes(CB) if kind == "random" else _compressible(CB)
    (c,) = _chunks(data, chunk_bytes=CB)
    c.raw_size += delta
    with pytest.raises(CodecError):
        decode_chunk(c)


def test_raw_size_zero_rejected():
    c = _chunk(b"")  # otherwise consistent: empty payload, CRC of nothing
    with pytest.raises(CodecError, match="raw_size"):
        decode_chunk(c)


def test_raw_size_above_max_rejected():
    raw = bytes(MAX_CHUNK_BYTES + 1)
    # A tiny, valid, correctly-checksummed zstd frame: only the size limit can refuse it.
    c = _chunk(zstandard.ZstdCompressor().compress(raw), raw=raw, codec=pb.CODEC_ZSTD)
    assert len(c.data) < 1024
    with pytest.raises(CodecError, match="raw_size"):
        decode_chunk(c)


def test_payload_above_max_rejected():
    raw = _compressible(CB)
    # A valid frame followed by padding: zstd itself would ignore the trailing bytes.
    payload = zstandard.ZstdCompressor().compress(raw) + bytes(MAX_CHUNK_BYTES)
    c = _chunk(payload, raw=raw, codec=pb.CODEC_ZSTD)
    assert len(c.data) > MAX_CHUNK_BYTES
    with pytest.raises(CodecError, match="payload"):
        decode_chunk(c)


@pytest.mark.parametrize("codec", [pb.CODEC_UNSPECIFIED, 4, 99])
def test_unknown_codec_rejected(codec):
    c = _chunk(b"abc", codec=codec)
    with pytest.raises(CodecError, match="codec"):
        decode_chunk(c)


# ------------------------------------------------------------------------------------- zstd bombs


def _rle_frame(total: int, *, declared: int | None = None, byte: int = 0) -> bytes:
    """A zstd frame of RLE blocks decoding to `total` copies of `byte`: ~4 bytes per 128 KiB.

    declared=None: no content size in the frame header (the decoder cannot know the size in
    advance). Otherwise an 8-byte frame content size field claiming `declared` bytes.
    """
    block = 128 * 1024
    header = (bytes([0x00, 0x38]) if declared is None  # no FCS, not single-segment; window 2**17
              else bytes([0xE0]) + struct.pack("<Q", declared))  # 8-byte FCS, single segment
    out = bytearray(struct.pack("<I", 0xFD2FB528) + header)
    left = total
    while left > 0:
        n = min(block, left)
        left -= n
        out += ((n << 3) | (1 << 1) | (1 if left == 0 else 0)).to_bytes(3, "little") + bytes([byte])
    return bytes(out)


BOMB_SIZE = 64 * 1024 * 1024
BOMB_BUDGET = 8 * 1024 * 1024  # far less than the bomb, far more than one legitimate chunk of 1 KiB


def test_rle_frame_helper_is_a_valid_zstd_frame():
    for declared in (None, 300_000):
        frame = _rle_frame(300_000, declared=declared, byte=7)
        out = zstandard.ZstdDecompressor().decompress(frame, max_output_size=300_000)
        assert out == bytes([7]) * 300_000


def _bomb_chunk(frame: bytes, raw_size: int = 1024) -> pb.Chunk:
    return _chunk(frame, raw=bytes(raw_size), codec=pb.CODEC_ZSTD)


def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("declared", [None, BOMB_SIZE], ids=["no-content-size", "content-size"])
def test_zstd_bomb_is_rejected_within_bounded_memory(declared):
    c = _bomb_chunk(_rle_frame(BOMB_SIZE, declared=declared))
    assert len(c.data) < 4096

    def decode():
        with pytest.raises(CodecError):
            decode_chunk(c)

    assert _peak_while(decode) < BOMB_BUDGET


@pytest.mark.parametrize("declared", [None, BOMB_SIZE, 2**62], ids=["no-content-size", "content-size", "huge"])
def test_zstd_bomb_is_refused_by_the_assembler(declared):
    """The assembler decodes into its own chunk buffer: a frame cannot write past it."""
    c = _bomb_chunk(_rle_frame(BOMB_SIZE if declared != 2**62 else 1024, declared=declared))
    asm = BlobAssembler(c.blob_sha256, 1024, Sink())

    def decode():
        with pytest.raises(CodecError):
            asm.add(c)
            asm.verify()

    assert _peak_while(decode) < BOMB_BUDGET


def test_zstd_frame_claiming_huge_content_size_is_codec_error():
    c = _bomb_chunk(_rle_frame(1024, declared=2**62))
    with pytest.raises(CodecError):
        decode_chunk(c)


# ------------------------------------------------------------------------------------ BlobAssembler


@pytest.fixture
def blob():
    data = _random_bytes(2 * CB) + _compressible(CB + 11)
    return data, _chunks(data, chunk_bytes=CB)


def test_assembler_rejects_out_of_order_offsets(blob):
    data, chunks = blob
    asm = BlobAssembler(sha256_hex(data), len(data), Sink())
    with pytest.raises(CodecError, match="offset"):
        asm.add(chunks[1])
    assert asm.received == 0
    asm.add(chunks[0])
    with pytest.raises(CodecError, match="offset"):
        asm.add(chunks[0])  # replayed chunk
    with pytest.raises(CodecError, match="offset"):
        asm.add(chunks[2])  # skipped one
    asm.add(chunks[1])
    assert asm.received == 2 * CB


def test_assembler_rejects_chunk_of_another_blob(blob):
    data, chunks = blob
    sink = Sink()
    asm = BlobAssembler(sha256_hex(data), len(data), sink)
    other = pb.Chunk()
    other.CopyFrom(chunks[0])
    other.blob_sha256 = sha256_hex(b"something else")
    with pytest.raises(CodecError):
        asm.add(other)
    assert asm.received == 0 and sink.buf == b""


def test_assembler_rejects_exceeding_declared_size(blob):
    data, chunks = blob
    sink = Sink()
    asm = BlobAssembler(sha256_hex(data), len(data) - 1, sink)
    for c in chunks[:-1]:
        asm.add(c)
    written = len(sink.buf)
    with pytest.raises(CodecError, match="size"):
        asm.add(chunks[-1])
    assert len(sink.buf) == written  # nothing past the limit reached the sink
    assert not asm.complete


def test_assembler_verify_refuses_incomplete_blob(blob):
    data, chunks = blob
    asm = BlobAssembler(sha256_hex(data), len(data), Sink())
    for c in chunks[:-1]:
        asm.add(c)
    assert not asm.complete
    with pytest.raises(CodecError):
        asm.verify()
    asm.add(chunks[-1])
    assert asm.complete
    asm.verify()


def test_lying_about_the_blob_hash_is_caught_when_the_blob_is_committed(tmp_path):
    """Every chunk is individually fine; the SHA-256 of the whole is checked by the store's
    writer on commit (the assembler checks order, bounds and CRCs only)."""
    from fedcybgd.common.blobstore import BlobStore

    data = _random_bytes(2 * CB + 5)
    claimed = sha256_hex(b"x" + data[1:])  # the sender lies about the blob's hash
    store = BlobStore(tmp_path / "store")
    writer = store.writer(claimed, len(data))
    asm = BlobAssembler(claimed, len(data), writer)
    for c in encode_chunks(claimed, data, chunk_bytes=CB):
        asm.add(c)
    assert asm.complete
    asm.verify()
    with pytest.raises(CodecError, match="SHA-256"):
        writer.commit()
    assert not store.has(claimed)


def test_assembler_rejects_corrupted_chunk(blob):
    data, chunks = blob
    asm = BlobAssembler(sha256_hex(data), len(data), Sink())
    bad = pb.Chunk()
    bad.CopyFrom(chunks[0])
    bad.crc32 ^= 0xFFFF
    with pytest.raises(CodecError):
        asm.add(bad)
    assert asm.received == 0


def test_assembler_empty_blob():
    asm = BlobAssembler(sha256_hex(b""), 0, Sink())
    assert asm.complete
    asm.verify()
    short = BlobAssembler(sha256_hex(b"x"), 1, Sink())
    with pytest.raises(CodecError):
        short.verify()


# ------------------------------------------------------------------------------ canonical blobs


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    f32 = torch.randn(4, 6, generator=g)
    f32[0, 0] = float("nan")
    f32[0, 1] = -0.0
    f32[0, 2] = float("inf")
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": f32,
        "model.layers.0.mlp.up_proj.bias": torch.randn(5, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(3, 7, generator=g).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def test_serialize_block_is_canonical_over_insertion_order():
    tensors = _tensors()
    items = list(tensors.items())
    orders = [dict(items), dict(reversed(items)), dict(sorted(items)), dict(random.Random(3).sample(items, len(items)))]
    blobs = {serialize_block(o) for o in orders}
    assert len(blobs) == 1
    assert serialize_block(_tensors()) == blobs.pop()  # and stable across calls


def test_serialize_block_ignores_memory_layout():
    big = torch.arange(40, dtype=torch.float32)
    t = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    laid_out = {"slice": big[10:20], "transposed": t.T}
    dense = {"slice": big[10:20].clone(), "transposed": t.T.contiguous()}
    assert serialize_block(laid_out) == serialize_block(dense)


def test_serialize_block_differs_when_a_value_differs():
    a = _tensors()
    b = _tensors()
    b["model.layers.0.mlp.up_proj.bias"][2] += 1.0
    assert serialize_block(a) != serialize_block(b)


def test_serialize_deserialize_round_trip_is_bit_exact():
    tensors = _tensors()
    blob = serialize_block(tensors)
    back = deserialize_block(blob)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype
        assert back[name].shape == t.shape
        assert torch.equal(_bits(back[name]), _bits(t)), name
    # Re-serializing what was read gives the very same blob (so the same SHA-256).
    assert serialize_block(back) == blob
    assert hashlib.sha256(serialize_block(back)).hexdigest() == sha256_hex(blob)
    assert deserialize_block(memoryview(blob)).keys() == back.keys()


def _garbage() -> list[bytes]:
    good = serialize_block(_tensors())
    header_len = struct.unpack("<Q", good[:8])[0]
    rng = random.Random(0)
    cases = [
        b"",
        b"\x00",
        b"not a safetensors blob at all",
        bytes(8),
        b"\xff" * 8,
        struct.pack("<Q", 2**40) + b"{}",
        struct.pack("<Q", 100) + b"{}",
        struct.pack("<Q", 7) + b"[1,2,3]",
        good[: 8 + header_len // 2],
        good[:-1],
        rng.randbytes(4096),
    ]
    for dtype, shape, offsets in [("XX", [2], [0, 8]), ("F32", [3], [0, 8]), ("F32", [2], [8, 0]),
                                  ("F32", [2**40, 2**40], [0, 8])]:
        header = f'{{"t":{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offsets}}}}}'.encode()
        header = header.ljust((len(header) + 7) // 8 * 8)
        cases.append(struct.pack("<Q", len(header)) + header + bytes(8))
    return cases


@pytest.mark.parametrize("data", _garbage(), ids=lambda d: f"{len(d)}B")
def test_deserialize_garbage_is_codec_error(data):
    with pytest.raises(CodecError):
        deserialize_block(data)


def test_tiny_chunks_are_refused_except_a_blobs_last():
    """The number of messages a blob may take is bounded: chunks carry at least MIN_CHUNK_BYTES."""
    from fedcybgd.common.codec import MIN_CHUNK_BYTES

    data = _random_bytes(MIN_CHUNK_BYTES + 100)
    sha = sha256_hex(data)
    tiny = pb.Chunk(blob_sha256=sha, offset=0, raw_size=100, codec=pb.CODEC_NONE, data=data[:100],
                    crc32=zlib.crc32(data[:100]))
    with pytest.raises(CodecError, match="at least"):
        BlobAssembler(sha, len(data), Sink()).add(tiny)
    asm = BlobAssembler(sha, len(data), Sink())
    for c in encode_chunks(sha, data, chunk_bytes=MIN_CHUNK_BYTES):  # the last one is 100 bytes: fine
        asm.add(c)
    assert asm.complete
    with pytest.raises(ValueError):
        list(encode_chunks(sha, data, chunk_bytes=MIN_CHUNK_BYTES - 1))



# ------------------------------------------------------------------ serial round trips of every variant


def _weights(n: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()


def _variants() -> list[tuple[bytes, dict[str, Any]]]:
    old = _weights(40_000, seed=1)
    changed = bytearray(old)
    changed[::7] = bytes(len(changed[::7]))
    new = bytes(changed) + _random_bytes(CB) + _compressible(CB + 9)
    old = old + _random_bytes(CB, seed=9) + _compressible(CB + 9)
    return [
        (new, {"codec": pb.CODEC_ZSTD}),
        (new, {"codec": pb.CODEC_BYTEGROUP, "word_size": 2}),
        (new, {"codec": pb.CODEC_BYTEGROUP, "word_size": 2, "start": 2 * CB}),
        (new, {"codec": pb.CODEC_BYTEGROUP, "word_size": 2, "delta": (sha256_hex(old), old)}),
        (new, {"codec": pb.CODEC_NONE, "delta": (sha256_hex(old), memoryview(old))}),
    ]


@pytest.mark.parametrize("case", range(5))
def test_every_variant_round_trips(case):
    data, kw = _variants()[case]
    sha = sha256_hex(data)
    chunks = list(encode_chunks(sha, data, chunk_bytes=CB, **kw))
    delta = kw.get("delta")
    sink = Sink()
    asm = BlobAssembler(sha, len(data), sink, received=kw.get("start", 0),
                        delta_source={delta[0]: delta[1]}.__getitem__ if delta else None)
    for c in chunks:
        asm.add(c)
    assert asm.complete
    asm.verify()
    assert bytes(sink.buf) == data[kw.get("start", 0):]


@pytest.mark.parametrize("bad", [0, 3, 7])
def test_a_bad_chunk_is_refused_and_nothing_after_it_is_written(bad):
    data = _weights(12 * CB // 2, seed=4)
    sha = sha256_hex(data)
    chunks = list(encode_chunks(sha, data, chunk_bytes=CB, codec=pb.CODEC_BYTEGROUP, word_size=2))
    chunks[bad].crc32 ^= 1
    sink = Sink()
    asm = BlobAssembler(sha, len(data), sink)
    with pytest.raises(CodecError, match="CRC"):
        for c in chunks:
            asm.add(c)
        asm.verify()
    assert bytes(sink.buf) == data[: bad * CB]  # the good chunks before it, in order, and nothing else
    with pytest.raises(CodecError):
        asm.verify()


def test_the_assembler_keeps_order_and_bounds_checks_in_add():
    data = _weights(5 * CB // 2, seed=2)
    sha = sha256_hex(data)
    chunks = list(encode_chunks(sha, data, chunk_bytes=CB, codec=pb.CODEC_BYTEGROUP, word_size=2))
    asm = BlobAssembler(sha, len(data), Sink())
    with pytest.raises(CodecError, match="offset"):
        asm.add(chunks[1])
    asm.add(chunks[0])
    with pytest.raises(CodecError, match="offset"):
        asm.add(chunks[0])
    other = BlobAssembler(sha, len(data) - 1, Sink())
    for c in chunks[:-1]:
        other.add(c)
    with pytest.raises(CodecError, match="size"):
        other.add(chunks[-1])
