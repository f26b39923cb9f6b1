"""Downloads: the model version a task starts from, planned and streamed.

The plan says which blobs the client lacks (`have`), which of them travel as version deltas
against an older version it holds, and which frozen blocks travel as lossy approximations
(when the strategy and the run allow it). Blobs are read from memory-mapped files (no per-client
copy of the model), cut into chunks, and a broken transfer continues where the client's
verified bytes end (`resume`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.codec import encode_chunks
from fedcybgd.common.delta_arith import KNOWN_DELTAS, MAX_ACCEPT_ENTRIES, choose, delta_name
from fedcybgd.common.delta_arith import accepted as accepted_deltas
from fedcybgd.common.modeling import word_size
from fedcybgd.server import messages
from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.context_plan import Approximation, ContextPlanner
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.history import BlockHistory
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.run import RunInfo
from fedcybgd.server.state import CoordinatorState, TaskRow
from fedcybgd.server.strategies import Strategy
from fedcybgd.v1 import coordinator_pb2 as pb

log = logging.getLogger("fedcybgd.coordinator")

MAX_HAVE_ENTRIES = 100_000


@dataclass(frozen=True)
class DownloadRequest:
    """What the client says it holds and can decode."""

    task_id: str
    have: tuple[str, ...]                 # as sent (bounded before it is used)
    resume: tuple[tuple[str, int], ...]   # (blob, bytes already received and verified), as sent
    codecs: tuple[int, ...]        # chunk codecs, in the client's order
    context_codecs: frozenset[int]
    deltas: tuple[int, ...] = ()   # delta encodings the client decodes, as sent (empty: XOR only)


@dataclass(frozen=True)
class OutgoingBlob:
    """One blob of a download: where it is read from, how it is cut, what it counts as."""

    sha256: str
    store: BlobStore
    word_size: int                 # byte grouping's element size (1: plain bytes)
    delta_base: str | None         # an older version the client holds: send the XOR against it
    kind: str                      # metrics label: "block", "full" or "context"
    start: int                     # bytes the client already has


@dataclass(frozen=True)
class DownloadPlan:
    version: int
    manifest: list[str]
    extra: str | None              # a blob beyond the blocks (fedlora's adapter)
    approximations: dict[int, Approximation]
    blobs: list[OutgoingBlob]      # in sending order
    codec: int
    delta: int = pb.DELTA_XOR      # how delta blobs are encoded (common/delta_arith.py)


class Downloads:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState, blobs: BlobStore, run: RunInfo,
                 strategy: Strategy, history: BlockHistory, context: ContextPlanner, accounts: TaskAccounts,
                 metrics: CoordinatorMetrics) -> None:
        self._config = config
        self._state = state
        self._blobs = blobs
        self._run = run
        self._strategy = strategy
        self._history = history
        self._context = context
        self._accounts = accounts
        self._metrics = metrics

    def plan(self, task: TaskRow, request: DownloadRequest) -> DownloadPlan:
        if len(request.have) > MAX_HAVE_ENTRIES:
            raise Refusal(Status.INVALID_ARGUMENT, f"at most {MAX_HAVE_ENTRIES} 'have' entries")
        if len(request.resume) > MAX_HAVE_ENTRIES:
            raise Refusal(Status.INVALID_ARGUMENT, f"at most {MAX_HAVE_ENTRIES} 'resume' entries")
        if len(request.deltas) > MAX_ACCEPT_ENTRIES:
            raise Refusal(Status.INVALID_ARGUMENT, f"at most {MAX_ACCEPT_ENTRIES} 'accept_deltas' entries")
        unknown = [d for d in request.deltas if d not in KNOWN_DELTAS]
        if unknown:
            raise Refusal(Status.INVALID_ARGUMENT, f"accept_deltas lists an unknown {delta_name(unknown[0])}")
        have, resume = set(request.have), dict(request.resume)
        manifest = self._state.manifest(task.base_version)
        trainable = self._strategy.trainable_blobs(task, manifest)
        approx: dict[int, Approximation] = {}
        if self._strategy.context_compression:
            approx = self._context.plan(manifest, trainable, have, set(request.context_codecs),
                                        seed=self._strategy.seed_of(task))
        if approx:
            self._metrics.context_blocks.labels(method=self._config.context.method).inc(len(approx))
        extra = self._strategy.extra_blob(task.base_version)
        exact = [sha for i, sha in enumerate(manifest) if i not in approx] + ([extra] if extra else [])
        encoded = [a.sha256 for a in approx.values() if a.sha256]
        sending = [sha for sha in dict.fromkeys(exact + encoded) if sha not in have]
        # Where a blob sits in the history (for delta bases) and its element size.
        places = {sha: (i, word_size(spec))
                  for i, (spec, sha) in enumerate(zip(self._run.specs, manifest, strict=True))}
        if extra:
            places[extra] = (len(manifest), word_size(self._strategy.extra_spec(extra)))
        blobs = []
        for sha in sending:
            is_version = sha in places and self._blobs.has(sha)
            store = self._blobs if is_version else self._context.store
            start = resume.get(sha, 0)
            blobs.append(OutgoingBlob(
                sha256=sha, store=store, word_size=places[sha][1] if is_version else 1,
                delta_base=self._history.delta_base(places[sha][0], sha, have) if is_version else None,
                kind=self._strategy.transfer_kind if sha in trainable else "context",
                start=start if start < store.size(sha) else 0))
        codec = next((c for c in (pb.CODEC_BYTEGROUP, pb.CODEC_ZSTD) if c in request.codecs), pb.CODEC_NONE)
        return DownloadPlan(version=task.base_version, manifest=manifest, extra=extra, approximations=approx,
                            blobs=blobs, codec=codec,
                            delta=choose(frozenset(request.deltas), accepted_deltas(self._config.deltas)))

    def stream(self, task: TaskRow, plan: DownloadPlan) -> Iterator[pb.DownloadMessage]:
        """The manifest, then every planned blob chunk by chunk; bytes counted as they go (also
        as the task's progress: a slow transfer keeps its task)."""
        extra_spec = self._strategy.extra_spec(plan.extra) if plan.extra else None
        first = pb.DownloadMessage(manifest=messages.manifest(
            plan.version, self._run.specs, plan.manifest, self._blobs, [b.sha256 for b in plan.blobs],
            plan.approximations, plan.extra, extra_spec))
        total = first.ByteSize()
        self._accounts.count(task.id, "down", "context", first.ByteSize(), 0)
        yield first
        for blob in plan.blobs:
            raw_bytes = wire_bytes = 0
            with contextlib.ExitStack() as stack:
                data = stack.enter_context(blob.store.open_mmap(blob.sha256))
                delta = ((blob.delta_base, stack.enter_context(self._blobs.open_mmap(blob.delta_base)))
                         if blob.delta_base else None)
                chunks = encode_chunks(blob.sha256, data, chunk_bytes=self._config.chunk_bytes, codec=plan.codec,
                                       level=self._config.zstd_level, start=blob.start, word_size=blob.word_size,
                                       delta=delta, delta_codec=plan.delta)
                try:
                    for chunk in chunks:
                        message = pb.DownloadMessage(chunk=chunk)
                        raw_bytes += chunk.raw_size
                        wire_bytes += message.ByteSize()
                        yield message
                finally:
                    chunks.close()
            total += wire_bytes
            self._state.note_progress(task.id, bytes_down=wire_bytes)
            self._accounts.count(task.id, "down", blob.kind, wire_bytes, raw_bytes)
        self._state.note_progress(task.id, bytes_down=first.ByteSize())
        log.debug("task %s: sent %d blobs (%d frozen blocks approximated), %d bytes", task.id, len(plan.blobs),
                  len(plan.approximations), total)
