"""The byte-grouping codec is lossless for every dtype and size, bounded on decode, and pays
where it should: bf16/fp32 weights shrink more than with plain zstd."""
from __future__ import annotations

import struct

import pytest
import torch
import zstandard

from fedcybgd.common import bytegroup
from fedcybgd.common.codec import BlobAssembler, CodecError, decode_chunk, encode_chunks, serialize_block, sha256_hex
from fedcybgd.v1 import coordinator_pb2 as pb

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.uint8]


def _weights(n: int, dtype: torch.dtype, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 0.02
    if not dtype.is_floating_point:
        t = (t * 1e4)
    return t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 3, 4097, 65_537])
@pytest.mark.parametrize("word", [1, 2, 4])
def test_round_trip_is_bit_exact(dtype, n, word):
    raw = _weights(n, dtype) + b"\x01\x02\x03"[: n % 3]  # odd tails that do not fill a word
    assert bytegroup.decode(bytegroup.encode(raw, word), len(raw)) == raw


def test_special_values_survive():
    values = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-45, 3.4e38])
    for dtype, word in ((torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)):
        raw = values.to(dtype).view(torch.uint8).numpy().tobytes() * 1000
        assert bytegroup.decode(bytegroup.encode(raw, word), len(raw)) == raw


@pytest.mark.parametrize("dtype, word", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_weights_shrink_more_than_with_plain_zstd(dtype, word):
    raw = _weights(1 << 20, dtype)
    grouped = len(bytegroup.encode(raw, word))
    plain = len(zstandard.ZstdCompressor(level=3).compress(raw))
    assert grouped < 0.95 * plain, (grouped, plain)


def test_streamed_blob_with_bytegroup_chunks_round_trips_and_resumes_mid_blob():
    tensors = {"a": torch.randn(300, 77).to(torch.bfloat16), "b": torch.randn(5).to(torch.bfloat16),
               "empty": torch.zeros(0, 3, dtype=torch.bfloat16)}
    blob = serialize_block(tensors)
    sha = sha256_hex(blob)
    chunks = list(encode_chunks(sha, blob, chunk_bytes=16 * 1024, codec=pb.CODEC_BYTEGROUP, word_size=2))
    assert any(c.codec == pb.CODEC_BYTEGROUP for c in chunks)
    out = bytearray()

    class Sink:
        def write(self, data):
            out.extend(data)
            return len(data)

    asm = BlobAssembler(sha, len(blob), Sink())
    for c in chunks:
        asm.add(c)
    asm.verify()
    assert bytes(out) == blob
    resumed = list(encode_chunks(sha, blob, chunk_bytes=16 * 1024, codec=pb.CODEC_BYTEGROUP, word_size=2,
                                 start=chunks[2].offset))
    assert [decode_chunk(c) for c in resumed] == [decode_chunk(c) for c in chunks[2:]]


def _frame(raw=b"\x00\x01" * 5000, word=2):
    return bytegroup.encode(raw, word), len(raw)


@pytest.mark.parametrize("mutate", [
    lambda f, n: (f[:3], n),                                           # header cut short
    lambda f, n: (f[:-7], n),                                          # payload truncated
    lambda f, n: (f, n + 1),                                           # wrong declared size
    lambda f, n: (bytes([3]) + f[1:], n),                              # unsupported word size
    lambda f, n: (f[:1] + bytes([5]) + f[2:], n),                      # plane count mismatch
    lambda f, n: (f[:2] + struct.pack("<I", 10**9) + f[6:], n),        # word count beyond the chunk
    lambda f, n: (f[:6] + bytes([9]) + f[7:], n),                      # unknown plane method
], ids=["short-header", "truncated", "wrong-size", "word-size", "planes", "word-count", "method"])
def test_malformed_frames_are_refused(mutate):
    frame, n = _frame()
    bad, size = mutate(frame, n)
    with pytest.raises(CodecError):
        bytegroup.decode(bad, size)


def test_plane_bomb_is_refused_before_decompression():
    n = 1000
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 24))  # declares 16 MiB for a 1000-byte plane
    frame = struct.pack("<BBI", 2, 2, n) + struct.pack("<BI", 1, len(bomb)) + struct.pack("<BI", 0, n) + bomb + bytes(n)
    with pytest.raises(CodecError):
        bytegroup.decode(frame, 2 * n)
