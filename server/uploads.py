"""Uploads: the blobs a task brings back, received and checked before anything is stored.

The strategy says which blobs a task must bring (`Strategy.expected_uploads`); this part checks
the header, reassembles each blob from its chunks (CRC per chunk, SHA-256 per blob), checks it
against its block spec, and publishes the blobs only once every one of them has passed: a
multi-blob upload stands or falls as a whole. A delta may refer only to the version of that
blob the visit started from, in an encoding the coordinator announced (`ModelInfo.accept_deltas`).
"""
from __future__ import annotations

import contextlib
import errno
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fedcybgd.common.blobstore import BlobStore, BlobWriter
from fedcybgd.common.block_check import validate_block_file
from fedcybgd.common.codec import BlobAssembler, CodecError
from fedcybgd.common.delta_arith import DELTA_SETTINGS
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.records import ExpectedUpload, UploadClaim
from fedcybgd.server.state import TaskRow
from fedcybgd.v1 import coordinator_pb2 as pb


@dataclass(frozen=True)
class Received:
    """Bytes of an upload: on the wire (messages as sent) and decoded."""

    wire: int
    raw: int


def check_claim(task: TaskRow, claim: UploadClaim) -> None:
    """The header's own figures: the version the task started from, finite non-negative numbers (losses may be
    NaN: not reported)."""
    if claim.base_version != task.base_version:
        raise Refusal(Status.FAILED_PRECONDITION,
                      f"task {task.id} started from version {task.base_version}, not {claim.base_version}")
    if not all(math.isfinite(x) and x >= 0 for x in (claim.train_seconds, claim.download_seconds)):
        raise Refusal(Status.INVALID_ARGUMENT, "seconds in the header must be finite and >= 0")
    # A loss is NaN when it was not reported (differential privacy: it is computed on the site's records without
    # noise, so a private client does not send it); otherwise finite and >= 0.
    if not all(math.isnan(x) or (math.isfinite(x) and x >= 0) for x in (claim.loss_before, claim.loss_after)):
        raise Refusal(Status.INVALID_ARGUMENT, "losses in the header must be finite and >= 0 (or NaN: not reported)")
    if not all(x >= 0 for x in (claim.record_epsilon, claim.update_epsilon)):  # inf: a mechanism without noise
        raise Refusal(Status.INVALID_ARGUMENT, "epsilons in the header must be >= 0")


class UploadReceiver:
    def __init__(self, blobs: BlobStore, metrics: CoordinatorMetrics,
                 deltas: Iterable[int] = DELTA_SETTINGS["arith"]) -> None:
        self._blobs = blobs
        self._metrics = metrics
        self._deltas = frozenset(deltas)  # delta encodings announced for uploads; others are refused

    def receive(self, header_bytes: int, messages: Iterator[pb.UploadMessage],
                expected: list[ExpectedUpload]) -> Received:
        """Reassemble the announced blobs from the chunks that follow the header, in order."""
        pending = list(expected)
        mapped: dict[str, Any] = {}
        checked: list[BlobWriter] = []
        writer: BlobWriter | None = None
        wire, raw = header_bytes, 0

        def open_next() -> tuple[BlobWriter, BlobAssembler]:
            upload = pending[0]

            def delta_source(base: str) -> Any:
                if base != upload.base:
                    raise KeyError(base)
                if base not in mapped:
                    mapped[base] = self._blobs.open_mmap(base)
                return mapped[base]
            sink = self._blobs.writer(upload.sha256, upload.size)
            return sink, BlobAssembler(upload.sha256, upload.size, sink, delta_source=delta_source,
                                       deltas=self._deltas)

        def check_current(writer: BlobWriter, assembler: BlobAssembler) -> None:
            assembler.verify()  # checked now, published once every blob has passed
            spec = pending.pop(0).spec
            writer.check(validate=lambda path: validate_block_file(path, spec))
            checked.append(writer)

        try:
            writer, assembler = open_next()
            for message in messages:
                if not message.HasField("chunk"):
                    raise Refusal(Status.INVALID_ARGUMENT, "only chunks may follow the header")
                wire += message.ByteSize()
                if assembler.complete:
                    if len(pending) == 1:
                        raise CodecError("chunks beyond the announced blobs")
                    check_current(writer, assembler)
                    writer = None
                    writer, assembler = open_next()
                assembler.add(message.chunk)
                raw += message.chunk.raw_size
            check_current(writer, assembler)
            writer = None
            if pending:
                raise CodecError(f"upload ended with {len(pending)} announced blobs missing")
            for done in checked:
                done.publish()
        except CodecError as err:
            self._abort(writer, checked)
            self._metrics.rejections.labels(reason="data").inc()
            self._metrics.visits.labels(outcome="failed").inc()
            raise Refusal(Status.INVALID_ARGUMENT, f"upload rejected: {err}") from err
        except OSError as err:
            self._abort(writer, checked)
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Ours, not the client's: nothing was stored, the task stays open, and the client retries.
            self._metrics.visits.labels(outcome="failed").inc()
            raise Refusal(Status.RESOURCE_EXHAUSTED, "the coordinator's disk is full: the upload was not stored; "
                                                     "retry once space is freed") from err
        except BaseException:
            self._abort(writer, checked)
            raise
        finally:
            for m in mapped.values():
                # A view of it may still live in the frames of an exception on its way up; the map is then
                # released with the last view, and a failed close must not replace the exception that matters.
                with contextlib.suppress(BufferError):
                    m.close()
        return Received(wire=wire, raw=raw)

    @staticmethod
    def _abort(writer: BlobWriter | None, checked: list[BlobWriter]) -> None:
        for w in [writer, *checked]:
            if w is not None:
                w.abort()
