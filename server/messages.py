"""Protobuf <-> the coordinator's own records, in one place: requests are read into typed
records here, and replies built from them here. The parts behind it never parse a request."""
from __future__ import annotations

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.delta_arith import accepted as accepted_deltas
from fedcybgd.server.config import CoordinatorConfig, PrivacyConfig, TrainingConfig
from fedcybgd.server.context_plan import Approximation
from fedcybgd.server.downloads import DownloadRequest
from fedcybgd.server.enrolment import Enrolment
from fedcybgd.server.records import ClaimedBlob, UploadClaim
from fedcybgd.server.run import RunInfo
from fedcybgd.server.state import TaskRow
from fedcybgd.server.strategies import Strategy
from fedcybgd.server.tasks import Beat, TaskOffer
from fedcybgd.v1 import coordinator_pb2 as pb

#: Chunk codecs the coordinator decodes in uploads, best first.
UPLOAD_CODECS = (pb.CODEC_BYTEGROUP, pb.CODEC_ZSTD, pb.CODEC_NONE)


# -- requests ----------------------------------------------------------------------------------
def enrolment(req: pb.RegisterRequest) -> Enrolment:
    return Enrolment(name=req.name, device_kind=req.device_kind, memory_bytes=req.memory_bytes,
                     software_version=req.software_version, join_token=req.join_token,
                     checkpoint_above=req.checkpoint_above, compact_frozen=req.compact_frozen)


def beat(req: pb.HeartbeatRequest) -> Beat:
    return Beat(task_id=req.task_id, phase=req.phase, step=req.step,
                gpu_peak_allocated_bytes=req.gpu_peak_allocated_bytes,
                gpu_peak_reserved_bytes=req.gpu_peak_reserved_bytes, host_rss_bytes=req.host_rss_bytes)


def download_request(req: pb.DownloadRequest) -> DownloadRequest:
    return DownloadRequest(task_id=req.task_id, have=tuple(req.have),
                           resume=tuple((r.sha256, r.offset) for r in req.resume), codecs=tuple(req.accept_codecs),
                           context_codecs=frozenset(req.accept_context), deltas=tuple(req.accept_deltas))


def upload_claim(header: pb.UploadHeader) -> UploadClaim:
    return UploadClaim(
        task_id=header.task_id, base_version=header.base_version,
        single=ClaimedBlob(header.block_index, header.blob_sha256, header.blob_size),
        listed=tuple(ClaimedBlob(b.block_index, b.sha256, b.size) for b in header.blobs),
        samples=header.samples, tokens=header.tokens, loss_before=header.loss_before,
        loss_after=header.loss_after, peak_memory_bytes=header.peak_memory_bytes,
        train_seconds=header.train_seconds, download_seconds=header.download_seconds, device=header.device,
        record_epsilon=header.record_epsilon, update_epsilon=header.update_epsilon)


# -- replies -----------------------------------------------------------------------------------
def task(row: TaskRow, strategy: Strategy, training: TrainingConfig, privacy: PrivacyConfig) -> pb.Task:
    """A task with its hyper-parameters: the scheduled learning rate and seed, the run's rest."""
    visit = training.visit_hyper(strategy.schedule.lr_of(row.round), strategy.seed_of(row))
    hyper = pb.Hyper(lr=visit.lr, local_steps=visit.steps, batch_size=visit.batch_size, seq_len=visit.seq_len,
                     seed=visit.seed, weight_decay=visit.weight_decay, max_grad_norm=visit.max_grad_norm,
                     privacy=privacy_of(privacy))
    return pb.Task(task_id=row.id, cycle=strategy.schedule.cycle_of(row.round), round=row.round,
                   block_index=max(row.block_index, 0), block_name=strategy.scope_name(row.block_index),
                   base_version=row.base_version, hyper=hyper, kind=strategy.task_kind)


def privacy_of(config: PrivacyConfig) -> pb.Privacy | None:
    """The run's differential privacy as a task carries it (None: off)."""
    if not config.enabled:
        return None
    return pb.Privacy(records=config.records, noise_multiplier=config.noise_multiplier, clip_norm=config.clip_norm,
                      updates=config.updates, update_noise_multiplier=config.update_noise_multiplier,
                      update_clip_norm=config.update_clip_norm, target_epsilon=config.target_epsilon,
                      delta=config.delta)


def task_offer(offer: TaskOffer, strategy: Strategy, training: TrainingConfig,
               privacy: PrivacyConfig) -> pb.GetTaskResponse:
    if offer.task is not None:
        return pb.GetTaskResponse(task=task(offer.task, strategy, training, privacy))
    if offer.final_version is not None:
        return pb.GetTaskResponse(done=pb.Done(final_version=offer.final_version))
    return pb.GetTaskResponse(wait=pb.Wait(retry_after_ms=500, reason=offer.wait_reason))


def block_entry(spec: BlockSpec, sha: str, size: int, approx: Approximation | None = None) -> pb.BlockEntry:
    return pb.BlockEntry(
        index=spec.index, name=spec.name, sha256=sha, size=size,
        tensors=[pb.TensorEntry(name=t.name, shape=t.shape, dtype=t.dtype,
                                rows=pb.RowRange(start=t.rows[0], stop=t.rows[1]) if t.rows is not None else None)
                 for t in spec.tensors],
        approx=None if approx is None else pb.ContextApprox(
            codec=approx.codec, sha256=approx.sha256, size=approx.size, reference_sha256=approx.reference,
            group_size=approx.group_size))


def manifest(version: int, specs: list[BlockSpec], blocks: list[str], blobs: BlobStore, sending: list[str],
             approximations: dict[int, Approximation], extra: str | None, extra_spec: BlockSpec | None) -> pb.Manifest:
    entries = [block_entry(spec, sha, blobs.size(sha), approximations.get(spec.index))
               for spec, sha in zip(specs, blocks, strict=True)]
    adapter = block_entry(extra_spec, extra, blobs.size(extra)) if extra and extra_spec else None
    return pb.Manifest(version=version, blocks=entries, sending=sending, adapter=adapter)


def model_info(config: CoordinatorConfig, run: RunInfo, config_json: str,
               tokenizer_files: dict[str, bytes]) -> pb.ModelInfo:
    """Everything a client needs besides the weights (tokenizer files zstd-compressed)."""
    lora = config.lora
    return pb.ModelInfo(
        model_id=run.model_id, config_json=config_json, tokenizer_files=tokenizer_files,
        tokenizer_codec=pb.CODEC_ZSTD, upload_codecs=UPLOAD_CODECS, dtype=run.dtype, num_blocks=len(run.specs),
        layers_per_block=config.layers_per_block, max_block_params=run.max_block_params, strategy=config.strategy,
        lora=pb.LoraSpec(rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.target_modules)),
        prompt_template=run.prompt.template, prompt_name=run.prompt.name, train_on=run.prompt.train_on,
        accept_deltas=accepted_deltas(config.deltas), block_layout=run.block_layout)

