"""What a client does with a task, one handler per task kind: train what the kind trains and say what to upload.

The strategies differ in what one task trains (one block, every parameter, a LoRA adapter) and so in which blobs go
back and how the upload header names them; everything else about a visit (download, bringing the model to the
manifest's version, the training data, progress, the upload stream, withdrawal) is the same and stays in the
daemon, which looks a task's handler up in ``HANDLERS`` and never branches on the kind itself. A new kind is a new
handler here; a kind this client does not know is refused before anything is downloaded (``handler_for``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import safetensors.torch
import torch
from torch import nn

from fedcybgd.client.transfer import UploadBlob
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, block_tensors, block_values
from fedcybgd.common.codec import serialize_block
from fedcybgd.common.modeling import word_size
from fedcybgd.common.sequences import Sequences
from fedcybgd.training import OnStep, VisitHyper, VisitResult, train_block, train_full, train_lora
from fedcybgd.training.hyper import UpdatePrivacy
from fedcybgd.training.layers import block_layers
from fedcybgd.training.loop import cpu_copies
from fedcybgd.training.privacy import privatize_update, secret_generator
from fedcybgd.v1 import coordinator_pb2 as pb

__all__ = ["TrainedUpload", "VisitContext", "TaskHandler", "BlockTask", "FullTask", "LoraTask",
           "HANDLERS", "TaskRefused", "handler_for", "visit_hyper_from_proto"]

#: Adapters are trained and sent in fp32 whatever the model's dtype (``train_lora``).
ADAPTER_WORD_SIZE = 4


class TaskRefused(ValueError):
    """The coordinator sent a task this client cannot do (a kind it does not know): nothing is downloaded and the
    daemon stops with this message (the coordinator reassigns the task once the client falls silent)."""


@dataclass(frozen=True)
class TrainedUpload:
    """What a trained task sends back: its blobs in upload order, the header fields that announce them, and the
    visit's figures."""

    blobs: list[UploadBlob]
    announced: pb.UploadHeader  # only the blob fields: block_index/blob_sha256/blob_size, or blobs
    result: VisitResult

    def header(self, task: pb.Task, *, download_seconds: float, device: str) -> pb.UploadHeader:
        """The upload's header: the task, the visit's figures and the announced blobs."""
        result = self.result
        header = pb.UploadHeader(
            task_id=task.task_id, base_version=task.base_version, samples=result.samples, tokens=result.tokens,
            loss_before=result.loss_before, loss_after=result.loss_after, peak_memory_bytes=result.peak_memory_bytes,
            train_seconds=result.seconds, download_seconds=download_seconds, device=device)
        header.MergeFrom(self.announced)
        return header


@dataclass
class VisitContext:
    """What a handler works with: the resident model (brought to the task's version by the daemon), the cache
    its blobs live in, and the client's settings for training and upload."""

    model: nn.Module
    specs: list[BlockSpec]
    loaded: dict[int, str]  # block index -> SHA-256 of the blob now in ``model``; a handler keeps it true
    cache: BlobStore
    lora: pb.LoraSpec
    upload_codec: int
    checkpoint_above: bool = False
    cache_block_inputs: bool = False
    compact_frozen: str | None = None
    update_privacy: UpdatePrivacy | None = None  # client-level DP: the update is clipped and noised before upload

    def start_of(self, tensors: Callable[[], Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """Copies of what the visit will train, before it does, when the update is to be privatized (else None)."""
        return cpu_copies(tensors()) if self.update_privacy is not None else None

    def privatize(self, result: VisitResult, start: dict[str, torch.Tensor] | None) -> bool:
        """Client-level DP: the result's tensors become ``start`` plus the clipped, noised update (noise from a
        secret generator: the coordinator knows everything else about the visit). True when it did so; the model
        then holds the un-noised training, and its trained tensors must be reloaded from the uploaded blob."""
        if self.update_privacy is None or start is None:
            return False
        result.tensors, _ = privatize_update(start, result.tensors, self.update_privacy, secret_generator("cpu"))
        return True

    def outgoing(self, data: bytes, words: int, started: str) -> UploadBlob:
        """Keep a trained blob in the cache and describe its upload: as a delta against ``started``, the version the
        visit started from (which the coordinator holds), when the codec groups bytes and the two have the same
        layout. A coordinator that announced no byte grouping gets the plain blob."""
        sha = self.cache.put(data)
        delta = self.upload_codec == pb.CODEC_BYTEGROUP and len(data) == self.cache.size(started)
        return UploadBlob(sha, data, words, started if delta else None)


class TaskHandler(ABC):
    """Trains one kind of task on the resident model and says what to upload."""

    @abstractmethod
    def train(self, ctx: VisitContext, task: pb.Task, manifest: pb.Manifest, sequences: Sequences,
              hyper: VisitHyper, on_step: OnStep) -> TrainedUpload:
        """Train ``task`` on ``sequences``; the model already holds the manifest's version."""


class BlockTask(TaskHandler):
    """FedCyBGD: one block trained, everything else frozen; the block goes back."""

    def train(self, ctx: VisitContext, task: pb.Task, manifest: pb.Manifest, sequences: Sequences,
              hyper: VisitHyper, on_step: OnStep) -> TrainedUpload:
        spec = ctx.specs[task.block_index]
        ctx.loaded.pop(task.block_index, None)  # training changes it in place: until done it is no known blob
        start = ctx.start_of(lambda: block_tensors(ctx.model, spec))
        result = train_block(ctx.model, spec, sequences, hyper, on_step=on_step,
                             checkpoint_above=ctx.checkpoint_above, cache_block_inputs=ctx.cache_block_inputs,
                             compact_frozen=ctx.compact_frozen)
        if ctx.compact_frozen is not None:  # the frozen layers came back dequantized: reloaded at the next manifest
            for index, other in enumerate(ctx.specs):
                if index != task.block_index and block_layers(ctx.model, other) is not None:
                    ctx.loaded.pop(index, None)
        noised = ctx.privatize(result, start)
        blob = ctx.outgoing(serialize_block(result.tensors), word_size(spec), manifest.blocks[task.block_index].sha256)
        if not noised:  # else the model holds the un-noised block: reloaded from the cache at the next manifest
            ctx.loaded[task.block_index] = blob.sha256
        return TrainedUpload([blob], pb.UploadHeader(block_index=task.block_index, blob_sha256=blob.sha256,
                                                     blob_size=len(blob.data)), result)


class FullTask(TaskHandler):
    """FedAvg-full: every parameter trained; every block goes back, in block order."""

    def train(self, ctx: VisitContext, task: pb.Task, manifest: pb.Manifest, sequences: Sequences,
              hyper: VisitHyper, on_step: OnStep) -> TrainedUpload:
        ctx.loaded.clear()  # training changes the model in place: until done it holds no known blob
        start = ctx.start_of(lambda: {n: t for spec in ctx.specs for n, t in block_tensors(ctx.model, spec).items()})
        result = train_full(ctx.model, sequences, hyper, on_step=on_step)
        noised = ctx.privatize(result, start)
        blobs = [serialize_block(block_values(spec, result.tensors)) for spec in ctx.specs]
        outgoing = [ctx.outgoing(blob, word_size(spec), entry.sha256)
                    for spec, blob, entry in zip(ctx.specs, blobs, manifest.blocks, strict=True)]
        if not noised:  # else the model holds the un-noised training: reloaded from the cache at the next manifest
            ctx.loaded.update({i: blob.sha256 for i, blob in enumerate(outgoing)})
        announced = pb.UploadHeader(blobs=[pb.UploadedBlob(block_index=i, sha256=blob.sha256, size=len(blob.data))
                                           for i, blob in enumerate(outgoing)])
        return TrainedUpload(outgoing, announced, result)


class LoraTask(TaskHandler):
    """FedLoRA: an adapter trained on the frozen model, from the global adapter; the adapter goes back."""

    def train(self, ctx: VisitContext, task: pb.Task, manifest: pb.Manifest, sequences: Sequences,
              hyper: VisitHyper, on_step: OnStep) -> TrainedUpload:
        if not manifest.HasField("adapter"):
            raise ValueError(f"round {task.round}: a LoRA task whose manifest names no adapter")
        lora = ctx.lora
        global_adapter = safetensors.torch.load_file(str(ctx.cache.path(manifest.adapter.sha256)))
        result = train_lora(ctx.model, sequences, hyper, rank=lora.rank, alpha=lora.alpha,
                            target_modules=list(lora.target_modules) or None, adapter=global_adapter,
                            on_step=on_step)
        ctx.privatize(result, ctx.start_of(lambda: global_adapter))  # the adapter is not kept in the model
        blob = ctx.outgoing(serialize_block(result.tensors), ADAPTER_WORD_SIZE, manifest.adapter.sha256)
        return TrainedUpload([blob], pb.UploadHeader(block_index=manifest.adapter.index, blob_sha256=blob.sha256,
                                                     blob_size=len(blob.data)), result)


HANDLERS: dict[pb.TaskKind, TaskHandler] = {
    pb.TASK_BLOCK: BlockTask(), pb.TASK_FULL: FullTask(), pb.TASK_LORA: LoraTask()}


def handler_for(task: pb.Task) -> TaskHandler:
    """The handler of ``task``'s kind; ``TaskRefused`` for a kind this client does not know (unspecified, or one a
    newer coordinator added), so that nothing is downloaded for a task that cannot be trained."""
    handler = HANDLERS.get(task.kind)
    if handler is None:
        kind = pb.TaskKind.Name(task.kind) if task.kind in pb.TaskKind.values() else str(task.kind)
        raise TaskRefused(f"round {task.round}: task {task.task_id} has kind {kind}, which this client cannot train "
                          f"(it knows {', '.join(pb.TaskKind.Name(k) for k in HANDLERS)})")
    return handler


def visit_hyper_from_proto(hyper: pb.Hyper) -> VisitHyper:
    """The coordinator's hyper-parameters of a visit as the trainer takes them (fields the protocol does not carry
    keep the trainer's defaults, as in the coordinator's references)."""
    return VisitHyper(lr=hyper.lr, steps=hyper.local_steps, batch_size=hyper.batch_size, seq_len=hyper.seq_len,
                      seed=hyper.seed, weight_decay=hyper.weight_decay, max_grad_norm=hyper.max_grad_norm)
