"""Streaming the model down and a trained block up, chunk by chunk, verified at every step."""
from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from fedcybgd.common.blobstore import BlobStore, BlobWriter
from fedcybgd.common.codec import BlobAssembler, CodecError, encode_chunks
from fedcybgd.common.delta_arith import DELTA_SETTINGS
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("fedcybgd.client")
#: In order of preference; the coordinator picks the first it knows.
ACCEPT_CODECS = [pb.CODEC_BYTEGROUP, pb.CODEC_ZSTD, pb.CODEC_NONE]
#: Approximations of frozen blocks this client decodes (fedcybgd.common.context).
ACCEPT_CONTEXT = [pb.CONTEXT_DROP, pb.CONTEXT_INT8, pb.CONTEXT_INT4, pb.CONTEXT_PRUNE]
#: gRPC call metadata: the client's credentials.
Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class UploadBlob:
    """One trained blob to upload, already in the client's cache under ``sha256``."""

    sha256: str
    data: bytes
    word_size: int  # bytes per element, for the byte-grouping codec
    delta_base: str | None  # the cached blob it is sent as a delta against (the coordinator holds it), or None


def download_model(stub: pb_grpc.CoordinatorStub, metadata: Metadata, task: pb.Task,
                   cache: BlobStore,
                   deltas: Sequence[pb.DeltaCodec] = DELTA_SETTINGS["arith"]) -> tuple[pb.Manifest, int]:
    """Fetch the task's base model into `cache`; returns (manifest, bytes on the wire).

    Only the blobs the cache lacks are sent; frozen blocks may come as approximations (the
    manifest's `approx`), which are blobs of their own. Each is reassembled into a temporary file, checked
    chunk by chunk (CRC-32) and as a whole (SHA-256) before it becomes visible in the cache.
    `deltas`: the version-delta encodings this client decodes (common/delta_arith.py).
    """
    partial = cache.partial_sizes()
    request = pb.DownloadRequest(task_id=task.task_id, have=list(cache), accept_codecs=ACCEPT_CODECS,
                                 accept_context=ACCEPT_CONTEXT, accept_deltas=list(deltas),
                                 resume=[pb.BlobOffset(sha256=sha, offset=n) for sha, n in partial.items() if n > 0])
    stream = stub.DownloadModel(request, metadata=metadata)
    first = next(stream)
    if not first.HasField("manifest"):
        raise CodecError("download did not start with a manifest")
    manifest = first.manifest
    sizes = {b.sha256: b.size for b in manifest.blocks}
    sizes.update({b.approx.sha256: b.approx.size for b in manifest.blocks if b.approx.sha256})
    if manifest.HasField("adapter"):
        sizes[manifest.adapter.sha256] = manifest.adapter.size
    pending = list(manifest.sending)
    if any(sha not in sizes for sha in pending):
        raise CodecError("coordinator offered a blob that is not in the manifest")
    wire = first.ByteSize()
    total = sum(sizes[s] for s in pending)
    resumed = sum(min(partial.get(sha, 0), sizes[sha]) for sha in pending)
    log.info("round %d: downloading %d of %d blocks (%.1f MB raw%s)", task.round, len(pending), len(manifest.blocks),
             total / 1e6, f", resuming after {resumed / 1e6:.1f} MB" if resumed else "")
    writer: BlobWriter | None = None
    assembler: BlobAssembler | None = None
    bases: dict[str, mmap.mmap] = {}

    def delta_source(sha: str) -> mmap.mmap:  # an older version of a block, which this cache holds
        if sha not in bases:
            bases[sha] = cache.open_mmap(sha)
        return bases[sha]

    try:
        for message in stream:
            wire += message.ByteSize()
            chunk = message.chunk
            if assembler is None or assembler.complete:
                if assembler is not None and writer is not None:
                    _finish(assembler, writer)
                if not pending or chunk.blob_sha256 != pending[0]:
                    raise CodecError(f"unexpected blob {chunk.blob_sha256[:12]} in the download")
                sha = pending.pop(0)
                writer = cache.resumable_writer(sha, sizes[sha])
                if chunk.offset != writer.size:  # the coordinator did not resume (or we had nothing)
                    writer.abort()
                    writer = cache.resumable_writer(sha, sizes[sha])
                assembler = BlobAssembler(sha, sizes[sha], writer, received=writer.size, delta_source=delta_source,
                                          deltas=frozenset(deltas))
            assembler.add(chunk)
        if assembler is not None and writer is not None:
            _finish(assembler, writer)
    except CodecError:
        if writer is not None:
            writer.abort()  # corrupt data: keep nothing of this blob
        raise
    except BaseException:
        if writer is not None:
            writer.abort(keep_partial=True)  # a broken stream: the verified prefix stays for the retry
        raise
    finally:
        for mapped in bases.values():
            mapped.close()
    if pending:
        raise CodecError(f"download ended with {len(pending)} blobs missing")
    entries = [*manifest.blocks, *([manifest.adapter] if manifest.HasField("adapter") else [])]
    missing = [b.name for b in entries if not all(cache.has(sha) for sha in needed_blobs(b))]
    if missing:
        raise CodecError(f"blocks missing after download: {missing[:5]}")
    return manifest, wire


def needed_blobs(entry: pb.BlockEntry) -> list[str]:
    """The blobs a client must hold to load a manifest entry."""
    if not entry.HasField("approx"):
        return [entry.sha256]
    return [sha for sha in (entry.approx.sha256, entry.approx.reference_sha256) if sha]


def _finish(assembler: BlobAssembler, writer: BlobWriter) -> None:
    assembler.verify()
    writer.commit()


def upload_blobs(stub: pb_grpc.CoordinatorStub, metadata: Metadata, header: pb.UploadHeader,
                 blobs: Sequence[UploadBlob], cache: BlobStore, chunk_bytes: int,
                 codec: int, delta_codec: int = pb.DELTA_XOR) -> tuple[pb.UploadResponse, int]:
    """Send the header, then each blob's chunks, in order. Encoded as it streams, so a whole model's upload is never
    held encoded in memory; returns (the coordinator's answer, bytes on the wire). `delta_codec`: the delta encoding
    of blobs with a delta base, one the coordinator announced (XOR is always readable)."""
    wire = [0]

    def stream() -> Iterator[pb.UploadMessage]:
        first = pb.UploadMessage(header=header)
        wire[0] += first.ByteSize()
        yield first
        for blob in blobs:
            with contextlib.ExitStack() as stack:
                base = blob.delta_base
                delta = (base, stack.enter_context(cache.open_mmap(base))) if base else None
                for chunk in encode_chunks(blob.sha256, blob.data, chunk_bytes=chunk_bytes, codec=codec,
                                           word_size=blob.word_size, delta=delta, delta_codec=delta_codec):
                    message = pb.UploadMessage(chunk=chunk)
                    wire[0] += message.ByteSize()
                    yield message

    reply = stub.UploadBlock(stream(), metadata=metadata)
    return reply, wire[0]
