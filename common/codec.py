"""Block blobs and the chunk codec used on every stream, in both directions.

A *blob* is one block's tensors as canonical safetensors bytes: the same tensors always give the
same bytes, so a blob is named by its SHA-256 and either side can tell whether it already holds
it. On the wire a blob is cut into chunks of a few MiB at fixed raw offsets, cut inside tensors
(one tensor may be larger than any message), and each chunk is compressed on its own. Independent
chunks mean a receiver can verify, resume and bound each one separately.
"""
from __future__ import annotations

import functools
import hashlib
import zlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import safetensors.torch
import torch
import zstandard

from fedcybgd.common import bytegroup, delta_arith
from fedcybgd.common.errors import CodecError  # re-exported: part of this module's API
from fedcybgd.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:
    from typing_extensions import Buffer  # any bytes-like object: bytes, memoryview, mmap

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


def deserialize_block(data: Buffer) -> dict[str, torch.Tensor]:
    """Parse a blob. safetensors only: no code runs while loading, unlike pickle."""
    try:
        return safetensors.torch.load(bytes(data))
    except Exception as exc:  # safetensors raises its own error types
        raise CodecError(f"not a valid safetensors blob: {exc}") from exc


def encode_chunks(
    blob_sha256: str,
    data: Buffer,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    codec: int = pb.CODEC_ZSTD,
    level: int = DEFAULT_ZSTD_LEVEL,
    start: int = 0,
    word_size: int = 1,
    delta: tuple[str, Buffer] | None = None,
    delta_codec: int = pb.DELTA_XOR,
) -> Generator[pb.Chunk, None, None]:
    """Cut `data` into chunks from raw offset `start` and encode each one.

    `word_size` is the byte size of the blob's floating-point elements (2 for bf16/fp16, 4 for
    fp32) for CODEC_BYTEGROUP; chunk boundaries stay on word boundaries because chunk sizes and
    the safetensors data offset are multiples of 8. A chunk that would not shrink is sent raw:
    no receiver time is spent on bytes that cannot compress. With `delta` = (sha256, bytes of an
    older version of the same block, as long as `data`) each chunk carries the XOR against it:
    weights a visit changed keep their sign and exponent, so the XOR is mostly zero bits.
    `delta_codec` DELTA_ARITH (which the receiver must decode) sends the arithmetic delta instead
    (common/delta_arith.py: 15-20 % fewer bytes on trained blocks) wherever it applies: a
    byte-grouped chunk of 2- or 4-byte words at a word-aligned offset that shrinks. The receiver
    learns the word size from the byte-group frame. Any other chunk falls back to the XOR delta, so
    a blob of mixed element sizes (word_size 1) or a chunk that does not compress stays readable.
    """
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % 8:
        raise ValueError(f"chunk_bytes must be a multiple of 8 in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    view = memoryview(data)
    base = memoryview(delta[1]) if delta is not None else None
    if base is not None and len(base) != len(view):
        raise ValueError("a delta base must have the blob's length")
    if delta_codec not in (pb.DELTA_XOR, pb.DELTA_ARITH):
        raise ValueError(f"cannot send {delta_arith.delta_name(delta_codec)}")
    arith = delta_codec == pb.DELTA_ARITH and codec == pb.CODEC_BYTEGROUP and word_size in delta_arith.WORD_SIZES
    encode = functools.partial(_encode_chunk, blob_sha256, view, chunk_bytes, codec, level, word_size,
                               delta[0] if delta is not None else "", base, arith)
    offsets = range(start, len(view), chunk_bytes)
    yield from map(encode, offsets)


def _encode_chunk(blob_sha256: str, view: memoryview, chunk_bytes: int, codec: int, level: int, word_size: int,
                  base_sha256: str, base: memoryview | None, arith: bool, offset: int) -> pb.Chunk:
    raw = view[offset : offset + chunk_bytes]
    size, crc = len(raw), zlib.crc32(raw)
    with bytegroup.workspace() as ws:
        if base is not None and arith and offset % word_size == 0:
            diff = delta_arith.encode_into(raw, base[offset : offset + size], word_size, ws.array(7, size, np.uint8))
            packed = bytegroup.encode(diff.data, word_size)
            if len(packed) < size:
                return pb.Chunk(blob_sha256=blob_sha256, offset=offset, raw_size=size, codec=pb.CODEC_BYTEGROUP,
                                data=packed, crc32=crc, delta_base=base_sha256, delta=pb.DELTA_ARITH)
        if base is not None:
            xored = ws.array(7, size, np.uint8)
            np.bitwise_xor(np.frombuffer(raw, dtype=np.uint8),
                           np.frombuffer(base[offset : offset + size], dtype=np.uint8), out=xored)
            raw = xored.data
        payload, used = None, pb.CODEC_NONE
        if codec == pb.CODEC_ZSTD:
            packed = ws.zstd(level).compress(raw)
            if len(packed) < size:
                payload, used = packed, pb.CODEC_ZSTD
        elif codec == pb.CODEC_BYTEGROUP:
            packed = bytegroup.encode(raw, word_size if offset % word_size == 0 else 1)
            if len(packed) < size:
                payload, used = packed, pb.CODEC_BYTEGROUP
        return pb.Chunk(blob_sha256=blob_sha256, offset=offset, raw_size=size, codec=used,
                        data=raw.tobytes() if payload is None else payload, crc32=crc, delta_base=base_sha256,
                        delta=pb.DELTA_XOR if base is not None else pb.DELTA_UNSPECIFIED)


def decode_chunk(chunk: pb.Chunk, delta: Buffer | None = None) -> bytes:
    """Decode and verify one chunk; decompression is bounded by the declared raw size. A delta
    chunk needs the bytes of its base blob (`delta`)."""
    base = memoryview(delta)[chunk.offset : chunk.offset + chunk.raw_size] if delta is not None else None
    raw = _decode(chunk, base)
    return raw if isinstance(raw, bytes) else bytes(raw)


def _decode(chunk: pb.Chunk, base: bytes | memoryview | None, out: np.ndarray | None = None) -> bytes | memoryview:
    """`decode_chunk` with the base's bytes at this chunk's offset; byte-grouped and delta chunks
    are decoded into `out` (a uint8 array of at least raw_size bytes) when given."""
    if not 0 < chunk.raw_size <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk raw_size {chunk.raw_size} outside (0, {MAX_CHUNK_BYTES}]")
    _check_delta(chunk)
    if len(chunk.data) > MAX_CHUNK_BYTES:
        raise CodecError(f"chunk payload of {len(chunk.data)} bytes exceeds {MAX_CHUNK_BYTES}")
    size = chunk.raw_size
    out = out[:size] if out is not None else None
    raw: bytes | np.ndarray
    if chunk.codec == pb.CODEC_NONE:
        raw = chunk.data
    elif chunk.codec == pb.CODEC_ZSTD:
        # python-zstandard trusts a size written in the frame header over max_output_size, so a
        # frame claiming gigabytes would be allocated before any check: refuse it up front.
        try:
            declared = zstandard.frame_content_size(chunk.data)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd chunk at offset {chunk.offset} has no valid frame header: {exc}") from exc
        if declared not in (-1, size):
            raise CodecError(f"zstd chunk at offset {chunk.offset} declares {declared} bytes, not {size}")
        try:
            with bytegroup.workspace() as ws:
                if out is None:
                    raw = ws.decompressor.decompress(chunk.data, max_output_size=size)
                else:
                    raw = ws.decompress_into(chunk.data, out)
        except zstandard.ZstdError as exc:
            raise CodecError(f"zstd chunk at offset {chunk.offset} does not decode: {exc}") from exc
    elif chunk.codec == pb.CODEC_BYTEGROUP:
        raw = bytegroup.decode_into(chunk.data, size, out)
    else:
        raise CodecError(f"unsupported codec {chunk.codec}")
    if len(raw) != size:
        raise CodecError(f"chunk at offset {chunk.offset}: {len(raw)} bytes, declared {size}")
    if chunk.delta_base:
        if base is None or len(base) < size:
            raise CodecError(f"delta chunk against {chunk.delta_base[:12]}, a blob the receiver cannot use")
        if chunk.delta == pb.DELTA_ARITH:
            if not isinstance(raw, np.ndarray):  # byte-grouped (checked above): always an array of ours
                raise CodecError(f"chunk at offset {chunk.offset}: DELTA_ARITH without a byte-grouped frame")
            raw = delta_arith.decode_in_place(raw, base, bytegroup.frame_word_size(chunk.data))
        elif isinstance(raw, np.ndarray):  # decoded into an array of ours: XOR in place
            raw = np.bitwise_xor(raw, np.frombuffer(base, dtype=np.uint8, count=size), out=raw)
        else:
            raw = np.bitwise_xor(np.frombuffer(raw, dtype=np.uint8), np.frombuffer(base, dtype=np.uint8, count=size),
                                 out=out)
    # ndarray.data: numpy's stubs declare the buffer protocol only from Python 3.12 on
    view = raw.data if isinstance(raw, np.ndarray) else raw
    if zlib.crc32(view) != chunk.crc32:
        raise CodecError(f"chunk at offset {chunk.offset}: CRC-32 mismatch")
    return view


def _check_delta(chunk: pb.Chunk) -> None:
    """A chunk's delta fields are consistent before anything is decoded."""
    if chunk.delta not in delta_arith.KNOWN_DELTAS:
        raise CodecError(f"chunk at offset {chunk.offset}: unknown {delta_arith.delta_name(chunk.delta)}")
    if chunk.delta != pb.DELTA_UNSPECIFIED and not chunk.delta_base:
        raise CodecError(f"chunk at offset {chunk.offset} names {delta_arith.delta_name(chunk.delta)} "
                         "but no delta base")
    if chunk.delta == pb.DELTA_ARITH:
        if chunk.codec != pb.CODEC_BYTEGROUP:
            raise CodecError(f"chunk at offset {chunk.offset}: DELTA_ARITH needs a byte-grouped chunk "
                             "(its frame gives the word size)")
        if bytegroup.frame_word_size(chunk.data) not in delta_arith.WORD_SIZES:
            raise CodecError(f"chunk at offset {chunk.offset}: DELTA_ARITH of words that are not 2 or 4 bytes")


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
    broken transfer resumes, and counts the bytes of the chunks accepted so far.
    """

    sha256: str
    size: int
    sink: BlobSink
    received: int = 0
    #: Bytes of a blob the receiver holds, by SHA-256, for delta chunks (KeyError: not usable).
    delta_source: Callable[[str], Buffer] | None = None
    #: Delta encodings this receiver negotiated (DELTA_UNSPECIFIED reads as DELTA_XOR); a chunk
    #: in any other is refused.
    deltas: frozenset[int] = delta_arith.KNOWN_DELTAS
    _spare: list = field(default_factory=list, init=False, repr=False)

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
        if chunk.delta_base and chunk.delta not in (pb.DELTA_UNSPECIFIED, pb.DELTA_XOR, *self.deltas):
            _check_delta(chunk)  # an unknown value is named as such; XOR is always readable
            raise CodecError(f"chunk at offset {chunk.offset}: {delta_arith.delta_name(chunk.delta)} "
                             "was not negotiated")
        if chunk.delta_base:
            try:
                delta = self.delta_source(chunk.delta_base) if self.delta_source else None
            except (KeyError, ValueError, OSError):
                delta = None
        base: bytes | memoryview | None = None
        if delta is not None:
            base = memoryview(delta)[chunk.offset : chunk.offset + chunk.raw_size]
        out = self._spare.pop() if self._spare else np.empty(min(self.size, MAX_CHUNK_BYTES), dtype=np.uint8)
        raw = _decode(chunk, base, out)
        self.sink.write(raw)
        self._spare.append(out)
        self.received += chunk.raw_size

    @property
    def complete(self) -> bool:
        return self.received == self.size

    def verify(self) -> None:
        """Raise unless all chunks arrived."""
        if not self.complete:
            raise CodecError(f"blob {self.sha256[:12]}: {self.received} of {self.size} bytes received")


class BlobSink(Protocol):
    def write(self, data: bytes | memoryview, /) -> int:
        """Take `data` (any bytes-like object); it may not be kept after the call returns: the
        assembler reuses its buffers."""
