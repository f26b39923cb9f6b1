"""A tensor larger than 2 GiB streams in chunks and is never held in memory, not even once.

A child process (so that its memory is its own) writes a canonical safetensors blob of one bf16
tensor with more than 2 GiB of weight-like data piece by piece into a BlobStore, then streams it
as the coordinator and the client do: the blob memory-mapped, `encode_chunks` with the
byte-grouping codec, every chunk serialized to bytes and parsed back (the wire), `BlobAssembler`
into another store's `BlobWriter`, SHA-256 checked on commit. Once as a whole blob, once as the
XOR against an older version of the block. A thread samples the child's anonymous memory
(RssAnon: the heap, not the file pages of the memory map or the page cache) every 20 ms; the
test requires its peak to stay far below the tensor's size, and prints it. It needs about 7 GB
of disk in the temporary directory for a minute (the two versions of the blob and the received
copy).

    .venv/bin/python tests/test_large_blob.py DIR     # the child alone, figures as JSON
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

if __name__ != "__main__":  # the child (this file run as a script) measures its heap: no pytest in it
    import pytest

    pytestmark = pytest.mark.multiprocess

from fedcybgd.common.procfs import status_field

#: bf16 rows x columns: 2 GiB + 32 MiB of tensor data.
SHAPE = (33_280, 32_768)
TENSOR_BYTES = SHAPE[0] * SHAPE[1] * 2
PIECE_WORDS = 16 * 1024 * 1024  # 32 MiB written at a time
#: The heap of a process that streams the blob, at most: a quarter of the tensor.
PEAK_LIMIT = TENSOR_BYTES // 4
#: What streaming may add to the heap of the process once it is set up (torch, numpy, gRPC
#: stubs imported): the chunks in flight, codec work arrays, protobuf messages.
GROWTH_LIMIT = 160 * 1024 * 1024


def test_a_tensor_over_2_gib_streams_in_chunks_in_bounded_memory(tmp_path):
    assert TENSOR_BYTES > 2**31
    started = time.monotonic()
    try:
        child = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=600,
                               check=False)
    finally:  # 4.4 GB of blobs: not left for pytest to keep
        for store in ("sender", "receiver"):
            shutil.rmtree(tmp_path / store, ignore_errors=True)
    assert child.returncode == 0, child.stderr[-4000:]
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\nlarge blob ({time.monotonic() - started:.0f} s): {json.dumps(figures)}")
    assert figures["tensor_bytes"] == TENSOR_BYTES
    for name in ("whole", "delta"):
        run = figures[name]
        assert run["identical"], name
        assert run["chunks"] >= TENSOR_BYTES // (2 * 1024 * 1024)
        assert run["wire_bytes"] < 0.8 * TENSOR_BYTES  # the codec did compress (weights: ~1.5x)
        assert run["peak_rss_anon"] < PEAK_LIMIT, (name, run["peak_rss_anon"])
        assert run["peak_rss_anon"] - figures["baseline_rss_anon"] < GROWTH_LIMIT, (name, run["peak_rss_anon"])
    assert figures["delta"]["wire_bytes"] < 0.8 * figures["whole"]["wire_bytes"]
    assert figures["peak_rss_anon"] < PEAK_LIMIT


# --------------------------------------------------------------------------- the child process


class AnonSampler:
    """The process's RssAnon, sampled every 20 ms in a thread; `peak()` since the last reset."""

    def __init__(self) -> None:
        self._peak = self._overall = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        value = status_field("RssAnon")
        if value is None:
            raise RuntimeError("no RssAnon in /proc/self/status")
        return value

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def _sample(self) -> None:
        value = self.now()
        self._peak, self._overall = max(self._peak, value), max(self._overall, value)

    def reset(self) -> None:
        self._peak = self.now()

    def peak(self) -> int:
        self._sample()
        return self._peak

    def overall(self) -> int:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self._overall


def _header(shape: tuple[int, ...], nbytes: int) -> bytes:
    """The safetensors header `serialize_block` writes for one bf16 tensor named "w"."""
    header = json.dumps({"w": {"dtype": "BF16", "shape": list(shape), "data_offsets": [0, nbytes]}},
                        separators=(",", ":")).encode()
    header = header.ljust((len(header) + 7) // 8 * 8)
    return len(header).to_bytes(8, "little") + header


def _pieces(base: np.ndarray, noise: np.ndarray, older: bool):
    """The blob, 32 MiB at a time: the header, then weight-like bf16 words (a block of N(0, 0.02)
    values, rotated differently for every piece). The older version differs in the two lowest
    mantissa bits of one word in four, as after a visit."""
    words = TENSOR_BYTES // 2
    for index, start in enumerate(range(0, words, PIECE_WORDS)):
        piece = np.roll(base, index * 7_919_423)[: min(PIECE_WORDS, words - start)]
        if older:
            piece = piece ^ np.roll(noise, index)[: len(piece)]
        yield piece.view(np.uint8)


def _child(tmp: Path) -> dict:
    sampler = AnonSampler()
    import safetensors
    import torch

    from fedcybgd.common.blobstore import BlobStore
    from fedcybgd.common.codec import BlobAssembler, encode_chunks, serialize_block
    from fedcybgd.v1 import coordinator_pb2 as pb

    # The hand-made header is the one safetensors writes (checked on a small tensor).
    small = torch.zeros(3, 5, dtype=torch.bfloat16)
    assert serialize_block({"w": small}) == _header((3, 5), 30) + bytes(30)
    header = _header(SHAPE, TENSOR_BYTES)
    rng = np.random.default_rng(0)
    normal = rng.standard_normal(PIECE_WORDS, dtype=np.float32)
    normal *= 0.02
    base = torch.from_numpy(normal).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    noise = np.zeros(PIECE_WORDS, dtype=np.uint16)
    noise[::4] = rng.integers(0, 4, PIECE_WORDS // 4, dtype=np.uint16)
    del normal

    sender, receiver = BlobStore(tmp / "sender"), BlobStore(tmp / "receiver")
    shas = {}
    for older in (False, True):  # hash first (the store names a blob by its hash), then write
        digest = hashlib.sha256(header)
        for piece in _pieces(base, noise, older):
            digest.update(piece)
        shas[older] = digest.hexdigest()
        with sender.writer(shas[older], len(header) + TENSOR_BYTES) as writer:
            writer.write(header)
            for piece in _pieces(base, noise, older):
                writer.write(piece)
            writer.commit()
    new, old = shas[False], shas[True]
    size = sender.size(new)
    with safetensors.safe_open(str(sender.path(new)), framework="pt") as f:
        assert list(f.keys()) == ["w"]
        assert f.get_slice("w").get_shape() == list(SHAPE) and f.get_slice("w").get_dtype() == "BF16"
    del base, noise
    figures: dict[str, Any] = {"tensor_bytes": TENSOR_BYTES, "blob_bytes": size, "baseline_rss_anon": sampler.now()}

    def stream(name: str, delta: bool) -> None:
        sampler.reset()
        started = time.monotonic()
        chunks = wire = 0
        with sender.open_mmap(new) as blob, sender.open_mmap(old) as older:
            writer = receiver.writer(new, size)
            assembler: BlobAssembler | None  # dropped before the commit
            assembler = BlobAssembler(new, size, writer, delta_source={old: older}.__getitem__)
            for chunk in encode_chunks(new, blob, codec=pb.CODEC_BYTEGROUP, word_size=2,
                                       delta=(old, older) if delta else None):
                message = chunk.SerializeToString()  # what travels
                del chunk
                wire += len(message)
                chunks += 1
                assembler.add(pb.Chunk.FromString(message))
            assembler.verify()
            assembler = None
            assert writer.commit() == new
        digest = hashlib.sha256()  # the received file, read back piece by piece
        with open(receiver.path(new), "rb") as f:
            while piece := f.read(1 << 20):
                digest.update(piece)
        figures[name] = {"chunks": chunks, "wire_bytes": wire,
                         "identical": digest.hexdigest() == new and receiver.size(new) == size,
                         "peak_rss_anon": sampler.peak(), "seconds": round(time.monotonic() - started, 1)}
        receiver.path(new).unlink()

    stream("whole", delta=False)
    stream("delta", delta=True)
    figures["peak_rss_anon"] = sampler.overall()
    return figures


if __name__ == "__main__":
    print(json.dumps(_child(Path(sys.argv[1]))))
