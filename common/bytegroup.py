"""Lossless compression of floating-point weight bytes: exponents apart, mantissas left alone.

In bf16/fp16/fp32 weights the exponent bits are highly predictable and the mantissa bits are
nearly random. Rotating the top two bytes of each little-endian word left by one bit moves the
sign next to the mantissa and gives the exponent a byte of its own (bf16 and fp32: exactly the
8 exponent bits); splitting the words into byte planes then puts all exponents in one plane. Each plane is
compressed with zstd only if a sample of it shrinks; the mantissa planes, which cannot shrink,
are stored as they are, so no time is spent on them.

Frame layout (all integers little-endian):
    u8 word size k (1, 2 or 4), u8 number of planes, u32 words n,
    per plane: u8 method (0 raw, 1 zstd), u32 payload length; then the payloads; then the
    len(raw) - k*n trailing bytes that do not fill a word.

Speed: planes are split and merged a block of words at a time with a few numpy passes into
reused work arrays (no temporaries, no page faults on fresh memory), payloads are sliced from the
frame without copies, zstd planes are decompressed by libzstd straight into reused arrays, and
`decode_into` writes the words into the caller's buffer. Every step releases the GIL (zstd,
numpy), so chunks can be coded in parallel threads.
"""
from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Iterator

import numpy as np
import zstandard

from fedcybgd.common.errors import CodecError

try:  # libzstd's one-shot decompression straight into a reused buffer (zstandard's cffi backend)
    from zstandard.backend_cffi import ffi as _ffi
    from zstandard.backend_cffi import lib as _zstd
except ImportError:  # without cffi: python-zstandard's call, which returns a new bytes object
    _ffi = _zstd = None

_HEADER = struct.Struct("<BBI")
_PLANE = struct.Struct("<BI")
RAW, ZSTD = 0, 1
#: A plane is compressed only if zstd shrinks a sample of it below this fraction.
WORTH_IT = 0.95
SAMPLE = 64 * 1024


#: zstd tuned for byte planes: almost no match finding (min_match 7, tiny hash table), so nearly
#: every byte is left to zstd's Huffman literal coder, which then codes the exponent plane at its
#: order-0 entropy (measured on SmolLM2 bf16: 3.01x, ~900 MB/s; plain level 1 gives 2.75x).
PLANE_PARAMS = zstandard.ZstdCompressionParameters(window_log=20, hash_log=6, chain_log=6, search_log=1,
                                                   min_match=7, strategy=zstandard.STRATEGY_FAST)

#: Words processed at a time: a block's work arrays stay in the CPU's caches whatever the input.
_BLOCK = 1 << 20
#: Work arrays are reused across calls up to this many bytes each (a few chunks' worth); larger
#: inputs (a whole model in one call) get temporary ones.
_SCRATCH_LIMIT = 8 * 1024 * 1024
#: Workspaces (work arrays and zstd contexts) kept for reuse: as many as calls ran at once, up
#: to this many; a thread takes one for the length of a call.
_KEEP_WORKSPACES = 4
#: (top 16 bits as int16) & this = sign bit and the 7 high mantissa bits, in place.
_SIGN_MANTISSA = np.int16(-0x7F81)  # 0x807F
_free_workspaces: list[Workspace] = []
_workspaces_lock = threading.Lock()


class Workspace:
    """Work arrays and zstd contexts for one call at a time (neither is thread-safe). A zstd
    context's output does not depend on what it coded before."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.compressor = zstandard.ZstdCompressor(compression_params=PLANE_PARAMS)
        self.decompressor = zstandard.ZstdDecompressor()
        self._by_level: dict[int, zstandard.ZstdCompressor] = {}
        self._dctx = None

    def decompress_into(self, frame: bytes | memoryview, out: np.ndarray) -> bytes | np.ndarray:
        """The first zstd frame of `frame` decoded into `out`, a uint8 array: what it holds,
        `out[:size]` (or a new bytes object where cffi is missing). A frame that would give more
        than len(out) bytes, or is not whole, raises ZstdError, as `ZstdDecompressor.decompress`
        with max_output_size=len(out) does; bytes after the first frame are ignored as there."""
        if _zstd is None:
            return self.decompressor.decompress(frame, max_output_size=len(out))
        if self._dctx is None:
            self._dctx = _ffi.gc(_zstd.ZSTD_createDCtx(), _zstd.ZSTD_freeDCtx)
        src = _ffi.from_buffer(frame)
        size = _zstd.ZSTD_findFrameCompressedSize(src, len(src))
        if not _zstd.ZSTD_isError(size):
            size = _zstd.ZSTD_decompressDCtx(self._dctx, _ffi.from_buffer(out, require_writable=True), len(out),
                                             src, size)
        if _zstd.ZSTD_isError(size):
            raise zstandard.ZstdError(_ffi.string(_zstd.ZSTD_getErrorName(size)).decode())
        return out[:size]

    def zstd(self, level: int) -> zstandard.ZstdCompressor:
        """A plain zstd compressor of this level."""
        if level not in self._by_level:
            self._by_level[level] = zstandard.ZstdCompressor(level=level)
        return self._by_level[level]

    def array(self, slot: int, n: int, dtype: type) -> np.ndarray:
        """n elements of dtype (contents undefined); `slot` tells apart the arrays one call
        needs at the same time."""
        size = n * np.dtype(dtype).itemsize
        if size > _SCRATCH_LIMIT:
            return np.empty(n, dtype=dtype)
        buf = self.buffers.get(slot)
        if buf is None or len(buf) < size:
            buf = self.buffers[slot] = np.empty(max(size, 1 << 16), dtype=np.uint8)
        return buf[:size].view(dtype)


@contextlib.contextmanager
def workspace() -> Iterator[Workspace]:
    """Borrow a workspace for the length of one call (also used by the chunk codec)."""
    with _workspaces_lock:
        ws = _free_workspaces.pop() if _free_workspaces else None
    if ws is None:
        ws = Workspace()
    try:
        yield ws
    finally:
        with _workspaces_lock:
            if len(_free_workspaces) < _KEEP_WORKSPACES:
                _free_workspaces.append(ws)


def _planes(ws: Workspace, data: np.ndarray, word_size: int, n: int) -> list[np.ndarray]:
    """Byte planes of n little-endian words, low bytes first, then the two top bytes rotated
    left by one bit: (sign + high mantissa bits, exponent)."""
    if word_size == 1:
        return [data[:n]]
    planes = [ws.array(2 + i, n, np.uint8) for i in range(word_size)]
    *low, rest, exponent = planes
    words = data[: n * word_size].reshape(n, word_size)
    for start in range(0, n, _BLOCK):
        block, stop = words[start : start + _BLOCK], min(n, start + _BLOCK)
        if word_size == 2:  # the words themselves: no copy
            top = block.reshape(-1).view("<u2")
        else:
            for i, plane in enumerate(low):
                np.copyto(plane[start:stop], block[:, i])
            top = ws.array(1, stop - start, np.uint16)
            np.copyto(top, block[:, -2:].view("<u2").reshape(-1))
        work, high = ws.array(0, len(top), np.uint16), ws.array(6, len(top), np.uint16)
        np.right_shift(top, 7, out=work, dtype=np.uint16)
        np.copyto(exponent[start:stop], work, casting="unsafe")  # the low byte: (top >> 7) & 0xFF
        np.bitwise_and(top, 0x807F, out=work, dtype=np.uint16)  # sign (bit 15) and mantissa bits 0-6
        np.right_shift(work, 8, out=high, dtype=np.uint16)  # the sign to bit 7
        np.bitwise_or(work, high, out=work, dtype=np.uint16)
        np.copyto(rest[start:stop], work, casting="unsafe")
    return planes


def _words(ws: Workspace, planes: list[np.ndarray], word_size: int, out: np.ndarray) -> None:
    """Inverse of `_planes`: the n words into out[: n * word_size]."""
    if word_size == 1:
        out[: len(planes[0])] = planes[0]
        return
    n = len(planes[-1])
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        *low, rest, exponent = (plane[start:stop] for plane in planes)
        block = out[start * word_size : stop * word_size]
        top = block.view(np.int16) if word_size == 2 else ws.array(1, stop - start, np.int16)
        shifted = ws.array(0, stop - start, np.uint16)
        # The sign byte as int8 widens to int16 with the sign in bits 7-15: keep bit 15 and the
        # mantissa bits 0-6, then put the exponent in bits 7-14.
        np.bitwise_and(rest.view(np.int8), _SIGN_MANTISSA, out=top, dtype=np.int16)
        np.left_shift(exponent, 7, out=shifted, dtype=np.uint16)
        np.bitwise_or(top.view(np.uint16), shifted, out=top.view(np.uint16), dtype=np.uint16)
        if word_size == 4:
            words = block.view("<u4")
            np.left_shift(top.view(np.uint16), 16, out=words, dtype=np.uint32)
            np.left_shift(low[1], 8, out=shifted, dtype=np.uint16)
            np.bitwise_or(shifted, low[0], out=shifted, dtype=np.uint16)
            np.bitwise_or(words, shifted, out=words, dtype=np.uint32)


def encode(raw: bytes | memoryview, word_size: int) -> bytes:
    """Compress `raw`, a run of little-endian floating-point words of `word_size` bytes."""
    if word_size not in (1, 2, 4):
        raise ValueError("word_size must be 1, 2 or 4")
    data = np.frombuffer(raw, dtype=np.uint8)
    n = len(data) // word_size
    with workspace() as ws:
        planes = _planes(ws, data, word_size, n)
        parts: list[bytes | memoryview] = []
        table: list[bytes] = []
        for plane in planes:
            # ndarray.data, the array's bytes: numpy's stubs declare the buffer protocol only from
            # Python 3.12 on
            payload: bytes | memoryview = plane.data
            method = RAW
            sample = plane[:SAMPLE].data
            if len(sample) and len(ws.compressor.compress(sample)) < WORTH_IT * len(sample):
                packed = ws.compressor.compress(payload)
                if len(packed) < len(plane):
                    payload, method = packed, ZSTD
            table.append(_PLANE.pack(method, len(payload)))
            parts.append(payload)
        tail = data[n * word_size:].data
        return b"".join([_HEADER.pack(word_size, len(planes), n), *table, *parts, tail])


def decode(frame: bytes, raw_size: int) -> bytes:
    """Inverse of `encode`; refuses any frame that would not decode to exactly `raw_size` bytes."""
    return decode_into(frame, raw_size).tobytes()


def decode_into(frame: bytes | memoryview, raw_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`decode` into `out` (a writable uint8 array of `raw_size` bytes; a new one when None),
    which it returns. Nothing is written to `out` unless the whole frame is well formed."""
    word_size, n, payloads, tail = _parse(memoryview(frame), raw_size)
    if out is not None and (out.dtype != np.uint8 or out.shape != (raw_size,)):
        raise ValueError(f"out must be a uint8 array of {raw_size} bytes")
    with workspace() as ws:
        planes = []
        for index, (method, payload) in enumerate(payloads):
            if method != ZSTD:
                planes.append(np.frombuffer(payload, dtype=np.uint8))
                continue
            try:
                if zstandard.frame_content_size(payload) not in (-1, n):
                    raise CodecError("byte-group plane declares a wrong size")
                plane = ws.decompress_into(payload, ws.array(10 + index, n, np.uint8))
            except zstandard.ZstdError as exc:
                raise CodecError(f"byte-group plane does not decode: {exc}") from exc
            if len(plane) != n:
                raise CodecError("byte-group plane has the wrong length")
            planes.append(plane if isinstance(plane, np.ndarray) else np.frombuffer(plane, dtype=np.uint8))
        if out is None:
            out = np.empty(raw_size, dtype=np.uint8)
        _words(ws, planes, word_size, out)
    out[n * word_size:] = np.frombuffer(tail, dtype=np.uint8)
    return out


def frame_word_size(frame: bytes | memoryview) -> int:
    """The word size a frame's header declares (checked against the frame by `decode_into`)."""
    if len(frame) < _HEADER.size:
        raise CodecError("byte-group frame too short")
    return int(frame[0])


def _parse(view: memoryview, raw_size: int) -> tuple[int, int, list[tuple[int, memoryview]], memoryview]:
    """(word size, words, [(method, payload)] per plane, tail) of a frame, checked against the
    chunk's raw size; payloads are views of the frame."""
    try:
        word_size, n_planes, n = _HEADER.unpack_from(view, 0)
    except struct.error as exc:
        raise CodecError("byte-group frame too short") from exc
    expected_planes = 1 if word_size == 1 else word_size
    if word_size not in (1, 2, 4) or n_planes != expected_planes or n * word_size > raw_size:
        raise CodecError("byte-group frame header is inconsistent with the chunk")
    offset = _HEADER.size
    table = []
    for _ in range(n_planes):
        try:
            table.append(_PLANE.unpack_from(view, offset))
        except struct.error as exc:
            raise CodecError("byte-group frame truncated") from exc
        offset += _PLANE.size
    payloads = []
    for method, length in table:
        payload = view[offset : offset + length]
        offset += length
        if len(payload) != length:
            raise CodecError("byte-group frame truncated")
        if method not in (RAW, ZSTD):
            raise CodecError(f"unknown byte-group method {method}")
        if method == RAW and length != n:
            raise CodecError("byte-group plane has the wrong length")
        payloads.append((method, payload))
    tail = view[offset:]
    if n * word_size + len(tail) != raw_size:
        raise CodecError("byte-group frame decodes to the wrong size")
    return word_size, n, payloads, tail
