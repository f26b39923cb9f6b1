"""The arithmetic version delta: new minus base in the ordered integer image of the float words.

Training moves most weights by a few units in the last place. The XOR of two such words flips
every mantissa bit below the highest one that changed, and a step across a power of two flips
exponent bits too; the difference of the words *as ordered integers* is just the number of
representable values between them, a small signed number whatever the exponent does.

The transform, per little-endian word of 16 (bf16, fp16) or 32 (fp32) bits, is a bijection on
bit patterns, so it is exactly lossless for NaN payloads, infinities, -0.0 and subnormals:

1. order: read the word as a signed integer and, when its sign bit is set, flip the other bits
   (sign-magnitude -> two's complement order: -0.0 is -1, larger magnitudes more negative);
2. subtract: d = order(new) - order(base), wrapping in the word's width;
3. zig-zag: z = (d << 1) ^ (d >> (bits - 1)), so a small |d| has its high bits all zero.

The bytes that do not fill a whole word (a chunk's tail) are XORed with the base's. Byte grouping
(common/bytegroup.py) then gives the mostly zero high bytes of z a plane of their own.

Everything is vectorised numpy on whole arrays (a chunk is at most a few MiB), in place in the
caller's buffer, with one reused scratch array; numpy releases the GIL, so chunks code in
parallel threads.
"""
from __future__ import annotations

import mmap

import numpy as np

from fedcybgd.common import bytegroup
from fedcybgd.v1 import coordinator_pb2 as pb

#: The byte buffers the transform reads (a chunk's view of a blob, a mapped base).
Bytes = bytes | bytearray | memoryview | mmap.mmap | np.ndarray

#: Word sizes the transform handles: the signed little-endian integer of each.
_WORDS: dict[int, str] = {2: "<i2", 4: "<i4"}
#: Per word size: (the magnitude bits, the shift that brings the sign bit down).
_MASKS: dict[int, tuple[int, int]] = {2: (0x7FFF, 15), 4: (0x7FFFFFFF, 31)}
WORD_SIZES = frozenset(_WORDS)
#: Workspace slot of the scratch array (common/bytegroup.py's slots 0-7 and 10+ are in use).
_SCRATCH_SLOT = 8

#: The delta encodings this code reads, and the settings that choose among them: "arith" (the
#: arithmetic delta where the peer decodes it, else XOR) or "xor" (the XOR delta only: the older
#: behaviour, kept for comparison and for peers that predate the arithmetic one).
KNOWN_DELTAS = frozenset({pb.DELTA_UNSPECIFIED, pb.DELTA_XOR, pb.DELTA_ARITH})
DELTA_SETTINGS: dict[str, tuple[pb.DeltaCodec, ...]] = {"arith": (pb.DELTA_ARITH, pb.DELTA_XOR), "xor": (pb.DELTA_XOR,)}
#: At most this many entries in a peer's list of accepted delta encodings.
MAX_ACCEPT_ENTRIES = 16


def accepted(setting: str) -> tuple[pb.DeltaCodec, ...]:
    """The delta encodings a side decodes under a configuration `setting`, best first."""
    try:
        return DELTA_SETTINGS[setting]
    except KeyError:
        raise ValueError(f"deltas must be one of {', '.join(DELTA_SETTINGS)}, not {setting!r}") from None


def delta_name(delta: int) -> str:
    """A DeltaCodec value's name for messages, also for values this build does not know."""
    try:
        return pb.DeltaCodec.Name(delta)
    except ValueError:
        return f"delta encoding {delta}"


def choose(peer_accepts: frozenset[int], ours: tuple[pb.DeltaCodec, ...]) -> pb.DeltaCodec:
    """The delta encoding to send: our best one the peer decodes. XOR is always readable (a peer
    that lists none predates the negotiation and reads XOR)."""
    return next((d for d in ours if d in peer_accepts), pb.DELTA_XOR)


def _scratch(ws: bytegroup.Workspace, n: int, dtype: str) -> np.ndarray:
    return ws.array(_SCRATCH_SLOT, n * np.dtype(dtype).itemsize, np.uint8).view(dtype)


def encode_into(new: Bytes, base: Bytes, word_size: int, out: np.ndarray) -> np.ndarray:
    """The arithmetic delta of `new` against `base` (equal lengths) into `out`, a uint8 array of at
    least that many bytes; returns out[:len(new)]."""
    dtype = _WORDS[word_size]
    shift = _MASKS[word_size][1]
    new_bytes, base_bytes = np.frombuffer(new, dtype=np.uint8), np.frombuffer(base, dtype=np.uint8)
    size = len(new_bytes)
    if len(base_bytes) != size or len(out) < size:
        raise ValueError("new, base and out must have the same length")
    out = out[:size]
    n = size // word_size
    words, z = new_bytes[: n * word_size].view(dtype), out[: n * word_size].view(dtype)
    with bytegroup.workspace() as ws:
        scratch = _scratch(ws, n, dtype)
        _order(words, z)
        _order(base_bytes[: n * word_size].view(dtype), scratch)
        np.subtract(z, scratch, out=z)  # wraps in the word's width
        np.right_shift(z, shift, out=scratch)  # all ones where d < 0
        np.left_shift(z, 1, out=z)
        np.bitwise_xor(z, scratch, out=z)
    np.bitwise_xor(new_bytes[n * word_size:], base_bytes[n * word_size:], out=out[n * word_size:])
    return out


def decode_in_place(data: np.ndarray, base: Bytes, word_size: int) -> np.ndarray:
    """Inverse of `encode_into`: `data` (a writable uint8 array holding a delta) becomes the new
    bytes, given the base's bytes at the same offset (at least as many)."""
    dtype = _WORDS[word_size]
    size = len(data)
    base_bytes = np.frombuffer(base, dtype=np.uint8, count=size)
    n = size // word_size
    z = data[: n * word_size].view(dtype)
    unsigned = z.view(dtype.replace("i", "u"))
    with bytegroup.workspace() as ws:
        scratch = _scratch(ws, n, dtype)
        # d = (z >>> 1) ^ -(z & 1): the logical shift on the unsigned view
        np.bitwise_and(z, 1, out=scratch)
        np.negative(scratch, out=scratch)
        np.right_shift(unsigned, 1, out=unsigned)
        np.bitwise_xor(z, scratch, out=z)
        _order(base_bytes[: n * word_size].view(dtype), scratch)
        np.add(z, scratch, out=z)  # wraps in the word's width
        _order_in_place(z, scratch)
    np.bitwise_xor(data[n * word_size:], base_bytes[n * word_size:], out=data[n * word_size:])
    return data


def _order(words: np.ndarray, out: np.ndarray) -> None:
    """out = words with the magnitude bits flipped where the sign bit is set; `out` must not be
    `words` (see `_order_in_place`)."""
    magnitude, shift = _MASKS[words.dtype.itemsize]
    np.right_shift(words, shift, out=out)  # arithmetic shift: all ones where negative
    np.bitwise_and(out, magnitude, out=out)
    np.bitwise_xor(words, out, out=out)


def _order_in_place(words: np.ndarray, mask: np.ndarray) -> None:
    """`_order` of `words` into itself, with `mask` (another array of its shape) as scratch. The
    order map is its own inverse."""
    magnitude, shift = _MASKS[words.dtype.itemsize]
    np.right_shift(words, shift, out=mask)
    np.bitwise_and(mask, magnitude, out=mask)
    np.bitwise_xor(words, mask, out=words)
