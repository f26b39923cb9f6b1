"""Block blobs and the chunk codec used on every stream, in both directions.

A *blob* is one block's tensors as canonical safetensors bytes: the same tensors always give the
same bytes, so a blob is named by its SHA-256 and either side can tell whether it already holds
it. On the wire a blob is cut into chunks of a few MiB at fixed raw offsets, cut inside tensors
(one tensor may be larger than any message), and each chunk is compressed on its own. Independent
chunks mean a receiver can verify, resume and bound each one separately.
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import safetensors.torch
import torch
import zstandard

from fedcybgd.common import bytegroup
from fedcybgd.common.errors import CodecError  # re-exported: part of this module's API
from fedcybgd.v1 import coordinator_pb2 as pb

#: Raw bytes per chunk. With framing and an incompressible chunk a message stays well under the
#: message-size limit below.
DEFAULT_CHUNK_BYTES = 2 * 1024 * 1024
#: The largest chunk a peer may send (raw or encoded); anything larger is refused.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
#: The smallest chunk but a blob's last: bounds the number of messages a blob may take.
MIN_CHUNK_BYTES = 16 * 1024
#: gRPC message limit set on both ends: one chunk plus framing. Not a way to send big messages.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + 64 * 1024
DEFAULT_ZSTD_LEVEL = 3

GRPC_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]




def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def serialize_block(tensors: dict[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of a block (CPU, contiguous, no metadata)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return safetensors.torch.save(cpu)


def deserialize_block(data: bytes) -> dict[str, torch.Tensor]:
    """Parse a blob. safetensors only: no code runs while loading, unlike pickle."""
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise CodecError(f"not a valid safetensors blob: {exc}") from exc


def encode_chunks(
    blob_sha256: str,
    data: bytes | memoryview,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codec: int = pb.CODEC_ZSTD,
    level: int = DEFAULT_ZSTD_LEVEL,
    start: int = 0,
    word_size: int = 1,
    delta: tuple[str, bytes | memoryview] | None = None,
) -> Iterator[pb.Chunk]:
    """Cut `data` into chunks from raw offset `start` and encode each one.

    `word_size` is the byte size of the blob's floating-point elements (2 for bf16/fp16, 4 for
    fp32) for CODEC_BYTEGROUP; chunk boundaries stay on word boundaries because chunk sizes and
    the safetensors data offset are multiples of 8. A chunk that would not shrink is sent raw:
    no receiver time is spent on bytes that cannot compress. With `delta` = (sha256, bytes of an
    older version of the same block, as long as `data`) each chunk carries the XOR against it:
    weights a visit changed keep their sign and exponent, so the XOR is mostly zero bits.
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % 8:
        raise ValueError(f"chunk_bytes must be a multiple of 8 in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    view = memoryview(data)
    if delta is not None and len(delta[1]) != len(view):
        raise ValueError("a delta base must have the blob's length")
    compressor = zstandard.ZstdCompressor(level=level) if codec == pb.CODEC_ZSTD else None
    for offset in range(start, len(view), chunk_bytes):
        raw = view[offset : offset + chunk_bytes]
        crc = zlib.crc32(raw)
        if delta is not None:
            raw = memoryview(_xor(raw, memoryview(delta[1])[offset : offset + len(raw)]))
        payload, used = raw.tobytes(), pb.CODEC_NONE
        if compressor is not None:
            packed = compressor.compress(raw)
            if len(packed) < len(raw):
                payload, used = packed, pb.CODEC_ZSTD
        elif codec == pb.CODEC_BYTEGROUP:
            packed = bytegroup.encode(raw, word_size if offset % word_size == 0 else 1)
            if len(packed) < len(raw):
                payload, used = packed, pb.CODEC_BYTEGROUP
        yield pb.Chunk(
            blob_sha256=blob_sha256,
            offset=offset,
            raw_size=len(raw),
            codec=used,
            data=payload,
            crc32=crc,
            delta_base=delta[0] if delta is not None else "",
        )


def _xor(a: bytes | memoryview, b: bytes | memoryview) -> bytes:
    return np.bitwise_xor(np.frombuffer(a, dtype=np.uint8), np.frombuffer(b, dtype=np.uint8)).tobytes()


def decode_chunk(chunk: pb.Chunk, delta: bytes | memoryview | None = None) -> bytes:
    """Decode and verify one chunk; decompression is bounded by the declared raw size. A delta
    chunk needs the bytes of its base blob (`delta`)."""
    if not 0 < chunk.raw_size <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk raw_size {chunk.raw_size} outside (0, {MAX_CHUNK_BYTES}]")
    if len(chunk.data) > MAX_CHUNK_BYTES:
        raise CodecError(f"chunk payload of {len(chunk.data)} bytes exceeds {MAX_CHUNK_BYTES}")
    if chunk.codec == pb.CODEC_NONE:
        raw = chunk.data
    elif chunk.codec == pb.CODEC_ZSTD:
        # python-zstandard trusts a size written in the frame header over max_output_size, so a
        # frame claiming gigabytes would be allocated before any check: refuse it up front.
        try:
            declared = zstandard.frame_content_size(chunk.data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd chunk at offset {chunk.offset} has no valid frame header: {exc}") from exc
        if declared not in (-1, chunk.raw_size):
            raise CodecError(f"zstd chunk at offset {chunk.offset} declares {declared} bytes, not {chunk.raw_size}")
        try:
            raw = zstandard.ZstdDecompressor().decompress(chunk.data, max_output_size=chunk.raw_size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd chunk at offset {chunk.offset} does not decode: {exc}") from exc
    elif chunk.codec == pb.CODEC_BYTEGROUP:
        raw = bytegroup.decode(chunk.data, chunk.raw_size)
    else:
        raise CodecError(f"unsupported codec {chunk.codec}")
    if len(raw) != chunk.raw_size:
        raise CodecError(f"chunk at offset {chunk.offset}: {len(raw)} bytes, declared {chunk.raw_size}")
    if chunk.delta_base:
        if delta is None or len(delta) < chunk.offset + chunk.raw_size:
            raise CodecError(f"delta chunk against {chunk.delta_base[:12]}, a blob the receiver cannot use")
        raw = _xor(raw, memoryview(delta)[chunk.offset : chunk.offset + chunk.raw_size])
    if zlib.crc32(raw) != chunk.crc32:
        raise CodecError(f"chunk at offset {chunk.offset}: CRC-32 mismatch")
    return raw


def compress_small(data: bytes, level: int = 19) -> bytes:
    """One zstd frame for a small file sent whole (e.g. a tokenizer)."""
    return zstandard.ZstdCompressor(level=level).compress(data)


def decompress_small(data: bytes, max_size: int) -> bytes:
    """Decode a frame from `compress_small`, refusing anything that would exceed `max_size`."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared < 0 or declared > max_size:
            raise CodecError(f"compressed file declares {declared} bytes; at most {max_size} accepted")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"compressed file does not decode: {exc}") from exc


@dataclass
class BlobAssembler:
    """Reassembles one blob from its chunks, in order, into a sink, checking each chunk.

    The sink (a `BlobWriter`) hashes what it is given and checks the SHA-256 on commit; the
    assembler checks order, bounds and each chunk's CRC. `received` starts above zero when a
    broken transfer resumes.
    """

    sha256: str
    size: int
    sink: "BlobSink"
    received: int = 0
    #: Bytes of a blob the receiver holds, by SHA-256, for delta chunks (KeyError: not usable).
    delta_source: Callable[[str], bytes | memoryview] | None = None

    def add(self, chunk: pb.Chunk) -> None:
        if chunk.blob_sha256 != self.sha256:
            raise CodecError(f"chunk for blob {chunk.blob_sha256[:12]} while receiving {self.sha256[:12]}")
        if chunk.offset != self.received:
            raise CodecError(f"chunk at offset {chunk.offset}, expected {self.received}")
        if self.received + chunk.raw_size > self.size:
            raise CodecError(f"blob {self.sha256[:12]} exceeds its declared size {self.size}")
        if chunk.raw_size < MIN_CHUNK_BYTES and self.received + chunk.raw_size != self.size:
            raise CodecError(f"chunks other than a blob's last carry at least {MIN_CHUNK_BYTES} bytes")
        delta = None
        if chunk.delta_base:
            try:
                delta = self.delta_source(chunk.delta_base) if self.delta_source else None
            except (KeyError, ValueError, OSError):
                delta = None
        raw = decode_chunk(chunk, delta)
        self.sink.write(raw)
        self.received += len(raw)

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def verify(self) -> None:
        if not self.complete:
            raise CodecError(f"blob {self.sha256[:12]}: {self.received} of {self.size} bytes received")


class BlobSink(Protocol):
    def write(self, data: bytes, /) -> int: ...
