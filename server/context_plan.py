"""Lossy context: which frozen blocks of a download travel as approximations, and the
approximations themselves (encoded once, kept on disk, content-addressed).

Only blocks the client lacks exactly, never a trainable blob, and only with a codec the client
announced. An approximation is relative to the newest exact version of the block the client
holds, and is used only when it is smaller on the wire than that block's lossless delta.

The index of approximations lives in memory, and retention (`server/retention.py`) calls `retain` after each
sweep: approximations of a blob no kept version references, or relative to one, go (entry and file), so the
store holds about as much as the kept versions do, not an approximation per visit forever. Files a previous
process left have no index entry: they are removed at start (encodings are deterministic, so one asked for
again is the same blob, and a client resuming its download of it resumes the same bytes).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch

from fedcybgd.common import context
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.codec import encode_chunks, serialize_block
from fedcybgd.common.modeling import word_size
from fedcybgd.server.config import ContextConfig
from fedcybgd.server.history import BlockHistory
from fedcybgd.server.run import RunInfo
from fedcybgd.v1 import coordinator_pb2 as pb

log = logging.getLogger("fedcybgd.coordinator")

CONTEXT_CODECS: dict[str, pb.ContextCodec] = {
    "drop": pb.CONTEXT_DROP, "int8": pb.CONTEXT_INT8, "int4": pb.CONTEXT_INT4, "prune": pb.CONTEXT_PRUNE}


@dataclass(frozen=True)
class Approximation:
    """How one frozen block reaches the client instead of its exact blob: `sha256` is the encoded
    approximation ("" when nothing is sent: layer dropping), relative to `reference`."""

    codec: pb.ContextCodec
    sha256: str
    size: int
    reference: str
    group_size: int = 0


@dataclass(frozen=True)
class _Key:
    """What an approximation is made from: the settings, the exact blob and the blob it is relative to."""

    method: str
    ratio: float
    group_size: int
    sha256: str
    reference: str | None


@dataclass(frozen=True)
class _Encoded:
    """An approximation on disk (in `ContextPlanner.store`) and its size."""

    sha256: str
    size: int


class ContextPlanner:
    def __init__(self, config: ContextConfig, blobs: BlobStore, run: RunInfo, history: BlockHistory,
                 directory: Path) -> None:
        self._config = config
        self._blobs = blobs
        self._run = run
        self._history = history
        self.store = BlobStore(directory)   # the encoded approximations
        for leftover in list(self.store):   # a previous process's: not in the index (see the module's docstring)
            self.store.remove(leftover)
        self._made: dict[_Key, _Encoded | None] = {}   # None: not worth sending (the exact block is smaller)
        self._key_locks: dict[_Key, threading.Lock] = {}
        self._index_lock = threading.Lock()

    @property
    def codec(self) -> pb.ContextCodec | None:
        return CONTEXT_CODECS.get(self._config.method)

    def plan(self, manifest: list[str], trainable: set[str], have: set[str], accepted: set[int],
             seed: int) -> dict[int, Approximation]:
        """Block index -> approximation, for the frozen blocks of this download."""
        codec, cfg = self.codec, self._config
        if codec is None or codec not in accepted:
            return {}
        frozen = [(i, sha, self._history.delta_base(i, sha, have)) for i, sha in enumerate(manifest)
                  if sha not in trainable and sha not in have]
        if cfg.method == "drop":
            # Layer dropping as the authors' code does it: a seeded share of the changed frozen
            # blocks is not sent; the client keeps the version it holds.
            candidates = [(i, ref) for i, _, ref in frozen if ref]
            chosen = random.Random(f"fedcybgd-drop:{seed}").sample(
                candidates, math.floor(cfg.effective_ratio * len(candidates) + 0.5))
            return {i: Approximation(codec=codec, sha256="", size=0, reference=ref) for i, ref in chosen}
        plan = {}
        for i, sha, ref in frozen:
            made = self._approximation(i, sha, ref)
            if made is not None:
                plan[i] = Approximation(codec=codec, sha256=made.sha256, size=made.size, reference=ref or "",
                                        group_size=cfg.group_size)
        return plan

    def retain(self, kept: Callable[[str], bool]) -> int:
        """Drop the approximations of blobs for which `kept` is false, or relative to one: retention deleted them,
        so no download plans them again. Their files go unless a remaining approximation has the same bytes.
        Returns how many entries went. An approximation made while this runs from a blob deleted meanwhile is
        dropped at the next call."""
        with self._index_lock:
            gone = [key for key in self._made
                    if not kept(key.sha256) or (key.reference is not None and not kept(key.reference))]
            dropped = {made.sha256 for made in (self._made.pop(key) for key in gone) if made is not None}
            remaining = {made.sha256 for made in self._made.values() if made is not None}
            for sha in dropped - remaining:
                self.store.remove(sha)
        if gone:
            log.debug("context: %d approximations of deleted blobs dropped (%d files)", len(gone),
                      len(dropped - remaining))
        return len(gone)

    def _approximation(self, block: int, sha: str, reference: str | None) -> _Encoded | None:
        """The encoded approximation of blob `sha` relative to `reference`, made once and kept;
        None when it would not be smaller on the wire than the exact block. Different blocks are
        encoded concurrently; the same one only once."""
        cfg = self._config
        key = _Key(cfg.method, cfg.effective_ratio, cfg.group_size, sha, reference)
        with self._index_lock:
            if key in self._made:
                return self._made[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._index_lock:
                if key in self._made:
                    return self._made[key]
            made = self._encode(block, sha, reference)
            with self._index_lock:
                self._made[key] = made
                self._key_locks.pop(key, None)
            return made

    def _encode(self, block: int, sha: str, reference: str | None) -> _Encoded | None:
        cfg = self._config
        tensors = safetensors.torch.load_file(str(self._blobs.path(sha)))
        ref = safetensors.torch.load_file(str(self._blobs.path(reference))) if reference else None
        blob = serialize_block(context.encode(cfg.method, tensors, ref, ratio=cfg.effective_ratio,
                                              group_size=cfg.group_size))
        with self._blobs.open_mmap(sha) as exact, \
                (self._blobs.open_mmap(reference) if reference else contextlib.nullcontext()) as older:
            delta = (reference, older) if reference else None
            lossless = wire_size(sha, exact, word_size(self._run.specs[block]), delta)
        lossy = wire_size("", blob, 1, None)
        worth_it = lossy < lossless
        log.debug("block %d: %s approximation of %s: %d bytes on the wire vs %d exact%s", block, cfg.method,
                  sha[:12], lossy, lossless, "" if worth_it else ": sent exactly")
        return _Encoded(self.store.put(blob), len(blob)) if worth_it else None


def wire_size(sha: str, data, words: int, delta) -> int:
    """Encoded size of a blob with the default download codec (byte grouping) and the smallest delta encoding
    (arithmetic): an approximation is sent only when it beats the best lossless download."""
    return sum(len(c.data) for c in encode_chunks(sha, data, codec=pb.CODEC_BYTEGROUP, word_size=words, delta=delta,
                                                  delta_codec=pb.DELTA_ARITH))
