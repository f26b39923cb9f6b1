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
"""
from __future__ import annotations

import struct

import numpy as np
import zstandard

from fedcybgd.common.errors import CodecError

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


def _planes(data: np.ndarray, word_size: int, n: int) -> list[np.ndarray]:
    """Byte planes of n little-endian words, low bytes first, then the two top bytes rotated
    left by one bit: (sign + high mantissa bits, exponent)."""
    if word_size == 1:
        return [data[:n]]
    if word_size == 2:  # the words themselves: no copy
        low, top = [], data[: 2 * n].view("<u2")
    else:
        columns = data[: n * word_size].reshape(n, word_size)
        low = [np.ascontiguousarray(columns[:, i]) for i in range(word_size - 2)]
        top = np.ascontiguousarray(columns[:, -2:]).view("<u2").reshape(n)
    exponent = ((top >> 7) & 0xFF).astype(np.uint8)
    rest = (((top >> 8) & 0x80) | (top & 0x7F)).astype(np.uint8)
    return [*low, rest, exponent]


def _words(planes: list[np.ndarray], word_size: int) -> np.ndarray:
    if word_size == 1:
        return planes[0]
    *low, rest, exponent = planes
    rest, exponent = rest.astype("<u2"), exponent.astype("<u2")
    top = ((rest & 0x80) << 8) | (exponent << 7) | (rest & 0x7F)
    if word_size == 2:
        return top.view(np.uint8)
    columns = np.empty((len(top), word_size), dtype=np.uint8)
    for i, plane in enumerate(low):
        columns[:, i] = plane
    columns[:, -2:] = top.view(np.uint8).reshape(-1, 2)
    return columns


def encode(raw: bytes | memoryview, word_size: int) -> bytes:
    """Compress `raw`, a run of little-endian floating-point words of `word_size` bytes."""
    if word_size not in (1, 2, 4):
        raise ValueError("word_size must be 1, 2 or 4")
    data = np.frombuffer(raw, dtype=np.uint8)
    n = len(data) // word_size
    planes = _planes(data, word_size, n)
    compressor = zstandard.ZstdCompressor(compression_params=PLANE_PARAMS)
    parts, table = [], []
    for plane in planes:
        plane = np.ascontiguousarray(plane)
        sample = plane[:SAMPLE].tobytes()
        payload, method = plane.tobytes(), RAW
        if sample and len(compressor.compress(sample)) < WORTH_IT * len(sample):
            packed = compressor.compress(payload)
            if len(packed) < len(payload):
                payload, method = packed, ZSTD
        table.append(_PLANE.pack(method, len(payload)))
        parts.append(payload)
    tail = data[n * word_size:].tobytes()
    return b"".join([_HEADER.pack(word_size, len(planes), n), *table, *parts, tail])


def decode(frame: bytes, raw_size: int) -> bytes:
    """Inverse of `encode`; refuses any frame that would not decode to exactly `raw_size` bytes."""
    try:
        word_size, n_planes, n = _HEADER.unpack_from(frame, 0)
    except struct.error as exc:
        raise CodecError("byte-group frame too short") from exc
    expected_planes = 1 if word_size == 1 else word_size
    if word_size not in (1, 2, 4) or n_planes != expected_planes or n * word_size > raw_size:
        raise CodecError("byte-group frame header is inconsistent with the chunk")
    offset = _HEADER.size
    table = []
    for _ in range(n_planes):
        try:
            table.append(_PLANE.unpack_from(frame, offset))
        except struct.error as exc:
            raise CodecError("byte-group frame truncated") from exc
        offset += _PLANE.size
    decompressor = zstandard.ZstdDecompressor()
    planes = []
    for method, length in table:
        payload = frame[offset: offset + length]
        offset += length
        if len(payload) != length:
            raise CodecError("byte-group frame truncated")
        if method == ZSTD:
            try:
                if zstandard.frame_content_size(payload) not in (-1, n):
                    raise CodecError("byte-group plane declares a wrong size")
                payload = decompressor.decompress(payload, max_output_size=n)
            except zstandard.ZstdError as exc:
                raise CodecError(f"byte-group plane does not decode: {exc}") from exc
        elif method != RAW:
            raise CodecError(f"unknown byte-group method {method}")
        if len(payload) != n:
            raise CodecError("byte-group plane has the wrong length")
        planes.append(np.frombuffer(payload, dtype=np.uint8))
    tail = frame[offset:]
    if n * word_size + len(tail) != raw_size:
        raise CodecError("byte-group frame decodes to the wrong size")
    body = _words(planes, word_size)
    return body.tobytes() + bytes(tail)
