"""The byte-grouping codec is lossless for every dtype and size, bounded on decode, and pays
where it should: bf16/fp32 weights shrink more than with plain zstd."""
from __future__ import annotations

import hashlib
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
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
def test_malformed_frames_are_refused(mutate, zstd_call):
    frame, n = _frame()
    bad, size = mutate(frame, n)
    with pytest.raises(CodecError):
        bytegroup.decode(bad, size)


@pytest.fixture(params=["libzstd-into-buffer", "python-zstandard"])
def zstd_call(request, monkeypatch):
    """Planes are decompressed by libzstd into a reused buffer when zstandard's cffi backend is
    there, else by python-zstandard: both must accept and refuse the same frames."""
    if request.param == "python-zstandard":
        monkeypatch.setattr(bytegroup, "_zstd", None)
    else:
        assert bytegroup._zstd is not None, "zstandard's cffi backend is missing (cffi comes with cryptography)"
    return request.param


def _plane_frame(plane: bytes, n: int) -> bytes:
    """A bf16 frame whose exponent plane is the given zstd payload and whose other plane is raw."""
    return (struct.pack("<BBI", 2, 2, n) + struct.pack("<BI", 0, n) + struct.pack("<BI", 1, len(plane)) + bytes(n)
            + plane)


def test_plane_bomb_is_refused_before_decompression(zstd_call):
    n = 1000
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 24))  # declares 16 MiB for a 1000-byte plane
    frame = struct.pack("<BBI", 2, 2, n) + struct.pack("<BI", 1, len(bomb)) + struct.pack("<BI", 0, n) + bomb + bytes(n)
    with pytest.raises(CodecError):
        bytegroup.decode(frame, 2 * n)


def test_plane_without_a_size_that_decodes_to_more_is_refused(zstd_call):
    n = 1000
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1 << 24))
    with pytest.raises(CodecError):
        bytegroup.decode(_plane_frame(unsized, n), 2 * n)
    exact = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(range(250)) * 4)
    assert bytegroup.decode(_plane_frame(exact, n), 2 * n)[1::2] == bytes(b >> 1 for b in bytes(range(250)) * 4)
    for short in (exact[:-1], exact[:5]):
        with pytest.raises(CodecError):
            bytegroup.decode(_plane_frame(short, n), 2 * n)
    # As python-zstandard always did: what follows a plane's first frame is not looked at.
    assert bytegroup.decode(_plane_frame(exact + b"\0", n), 2 * n) == bytegroup.decode(_plane_frame(exact, n), 2 * n)


def _outcome(frame: bytes, size: int) -> bytes | str:
    try:
        return bytegroup.decode(frame, size)
    except CodecError:
        return "refused"


def test_both_zstd_calls_give_the_same_outcome_on_damaged_planes(monkeypatch):
    """Every byte of a plane flipped, cut or followed by more: the same bytes or the same refusal."""
    raw = _weights(700, torch.bfloat16, seed=3)
    frame = bytegroup.encode(raw, 2)
    start = 6 + 2 * 5 + 700  # the exponent plane follows the raw sign/mantissa plane
    assert frame[6 + 5] == bytegroup.ZSTD and len(frame) > start + 100
    damaged = []
    for pos in range(start, len(frame)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(frame)
            bad[pos] ^= flip
            damaged.append(bytes(bad))
    damaged += [frame[:cut] for cut in range(start, len(frame))]
    damaged += [frame + extra for extra in (b"\0", b"\x28\xb5\x2f\xfd", frame[start:])]
    fast = [_outcome(bad, len(raw)) for bad in damaged]
    monkeypatch.setattr(bytegroup, "_zstd", None)
    assert [_outcome(bad, len(raw)) for bad in damaged] == fast
    assert fast.count("refused") > len(damaged) // 4  # and the others decode (to other bytes: the CRC tells)


# ------------------------------------------------------------------ the wire format is frozen

_CTZ = np.array([(b & -b).bit_length() - 1 if b else 8 for b in range(256)], dtype=np.uint16)


def _weight_like(n: int, word_size: int, seed: int) -> bytes:
    """Weight-like little-endian float words from integer operations only (the same bytes on every
    platform and library version): random sign and mantissa, exponents 113-121, geometric."""
    rnd = np.frombuffer(hashlib.shake_256(f"bytegroup-{seed}".encode()).digest(n * (word_size + 1)), dtype=np.uint8)
    words = rnd[: n * word_size].reshape(n, word_size).copy()
    top = words[:, -2:].copy().view("<u2").reshape(n)
    exponent = 121 - _CTZ[rnd[n * word_size:]]
    top = (top & 0x807F) | (exponent << 7)
    words[:, -2:] = top.astype("<u2").view(np.uint8).reshape(n, 2)
    return words.tobytes()


def _format_cases() -> list[tuple[int, bytes]]:
    cases = []
    for word in (1, 2, 4):
        for n in (0, 1, 4097, 1 << 19):
            cases.append((word, _weight_like(n, max(word, 2), seed=n * 10 + word) + b"\x07\x08\x09"[: n % 3]))
    cases.append((2, hashlib.shake_256(b"random").digest(1 << 20)))
    cases.append((4, bytes(1 << 20)))
    return cases


def test_encoded_bytes_are_those_of_the_first_release():
    """Peers of any version must decode each other's frames, and the same blob must give the same
    chunks: the SHA-256 below was taken with the first implementation (numpy temporaries, one
    zstd context per call). Changing it changes the wire format."""
    digest = hashlib.sha256()
    methods: set[int] = set()
    for word, raw in _format_cases():
        frame = bytegroup.encode(raw, word)
        assert bytegroup.decode(frame, len(raw)) == raw
        digest.update(hashlib.sha256(frame).digest())
        methods.update(frame[6 + 5 * i] for i in range(frame[1]))
    assert methods == {bytegroup.RAW, bytegroup.ZSTD}  # both kinds of plane are covered
    assert digest.hexdigest() == "e29525c559c781c9961e6b56a10f09472d6cbd2672c7e569b7a70a7614668a44"


@pytest.mark.parametrize("word", [1, 2, 4])
def test_decode_into_writes_the_callers_buffer(word):
    raw = _weight_like(3001, 4, seed=word) + b"\x05"
    frame = bytegroup.encode(raw, word)
    out = np.full(len(raw), 0xAA, dtype=np.uint8)
    assert bytegroup.decode_into(frame, len(raw), out) is out
    assert out.tobytes() == raw
    assert bytegroup.decode_into(frame, len(raw)).tobytes() == raw  # or a new array
    with pytest.raises(ValueError):
        bytegroup.decode_into(frame, len(raw), np.empty(len(raw) + 1, dtype=np.uint8))


def test_a_malformed_frame_leaves_the_callers_buffer_alone():
    raw = _weight_like(4096, 2, seed=5)
    frame = bytegroup.encode(raw, 2)
    out = np.full(len(raw), 0xAA, dtype=np.uint8)
    with pytest.raises(CodecError):
        bytegroup.decode_into(frame[:-1], len(raw), out)
    assert (out == 0xAA).all()


def test_codec_threads_give_the_same_frames():
    """Workspaces are per call: frames coded in many threads at once are the single-thread ones."""
    cases = _format_cases()
    expected = [bytegroup.encode(raw, word) for word, raw in cases]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            assert list(pool.map(lambda case: bytegroup.encode(case[1], case[0]), cases)) == expected
            decoded = pool.map(lambda pair: bytegroup.decode(pair[0], len(pair[1][1])),
                               zip(expected, cases, strict=True))
            assert list(decoded) == [raw for _, raw in cases]
