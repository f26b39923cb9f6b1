"""The coordinator's logic, independent of gRPC: who trains which block when, and what is merged.

`fedcybgd.server.service` adapts it to the wire; `fedcybgd.server.app` runs it. Each public
method corresponds to one RPC and raises `RpcError` with the status code the client should see.
State changes go through `CoordinatorState` (durable, transactional) so a coordinator stopped at
any moment continues from its state directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import queue
import random
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import safetensors
import safetensors.torch
import torch

from fedcybgd.common import context
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, st_dtype_to_torch
from fedcybgd.common.codec import BlobAssembler, CodecError, compress_small, encode_chunks, serialize_block
from fedcybgd.common.config import to_dict
from fedcybgd.common.data import load_packed
from fedcybgd.common.eval import evaluate_loss, spread_sample
from fedcybgd.common.transport import OPERATOR_NAME
from fedcybgd.common.modeling import max_blob_size, specs_from_json, specs_to_json, word_size
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.scheduler import CycleSchedule
from fedcybgd.server.state import (
    ClientRow, ContributionRow, CoordinatorState, SqliteState, StaleTaskError, TaskRow, VisitRow,
)
from fedcybgd.server.strategies import (
    ADAPTER_NAME, ALL_BLOCKS, TASK_KINDS, FedAvgRounds, adapter_entry, adapter_spec, average_adapter, average_blocks,
    merge_adapter,
)
from fedcybgd.v1 import coordinator_pb2 as pb

log = logging.getLogger("fedcybgd.coordinator")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MAX_HAVE_ENTRIES = 100_000
MAX_NAME_CHARS = 128
MAX_GET_TASK_WAIT_S = 30
UPLOAD_CODECS = (pb.CODEC_BYTEGROUP, pb.CODEC_ZSTD, pb.CODEC_NONE)
CONTEXT_CODECS = {"drop": pb.CONTEXT_DROP, "int8": pb.CONTEXT_INT8, "int4": pb.CONTEXT_INT4, "prune": pb.CONTEXT_PRUNE}


class RpcError(Exception):
    """An expected refusal, with the gRPC status code the caller gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RunInfo:
    specs: list[BlockSpec]
    dtype: str
    model_id: str


class Coordinator:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState | None = None,
                 metrics: CoordinatorMetrics | None = None) -> None:
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state: CoordinatorState = state or SqliteState(self.state_dir / "state.sqlite")
        self.store = ModelStore(self.state_dir)
        # Lossy approximations of frozen blocks, by (method, ratio, group, block blob, reference blob).
        self._approximations = BlobStore(self.state_dir / "context-blobs")
        self._approximation_index: dict[tuple, tuple[str, int]] = {}
        self._approximation_lock = threading.Lock()
        self._adapter_entries: dict[str, pb.BlockEntry] = {}
        self.kind = TASK_KINDS.get(config.strategy, pb.TASK_BLOCK)  # what one task trains
        self.run = self._open_run()
        self.schedule = (CycleSchedule(len(self.run.specs), config.schedule) if self.kind == pb.TASK_BLOCK
                         else FedAvgRounds(len(self.run.specs), config.schedule, config.clients_per_round))
        self.metrics = metrics or CoordinatorMetrics()
        self._model_bytes = sum(s.nbytes for s in self.run.specs)
        self.metrics.set_model_bytes(self._model_bytes)
        self._cond = threading.Condition()
        self._done_rounds = {v.round for v in self.state.visits()}
        # Every blob each block has had, oldest first: candidates for version deltas.
        # The adapter (fedlora) counts as block number len(specs) here.
        self._history: dict[int, list[str]] = {i: [sha] for i, sha in enumerate(self.state.manifest(0))}
        self._history[len(self.run.specs)] = [a for a in [self._adapter_of(0)] if a]
        for visit in self.state.visits():
            if visit.block_index != ALL_BLOCKS:
                self._history[visit.block_index].append(visit.blob_sha256)
            elif self.kind == pb.TASK_LORA:
                self._history[len(self.run.specs)].append(visit.blob_sha256)
            else:
                for i, sha in enumerate(self.state.manifest(visit.new_version)):
                    self._history[i].append(sha)
        self.clients_told_done: set[str] = set()
        self._model_info: pb.ModelInfo | None = None
        self._started_unix = time.time()
        self._last_expiry_scan = 0.0
        # Bytes of each open task by (direction, kind): (wire, raw). Published when it commits.
        self._task_bytes: dict[str, dict[tuple[str, str], list[int]]] = {}
        self.metrics.count_active_clients(self._active_clients)
        self._progress: dict[str, tuple[str, int]] = {}  # task id -> (phase, step) from heartbeats
        self._eval_queue: queue.Queue[int | None] = queue.Queue()
        self._eval_sequences: torch.Tensor | None = None
        self._eval_thread: threading.Thread | None = None
        self.metrics.set_progress(len(self._done_rounds), self.schedule)
        if config.eval.data:
            self._start_evaluator()
        if self.kind != pb.TASK_BLOCK:  # rounds whose every upload arrived before a crash
            with self._cond:
                for round_ in range(self.schedule.total_rounds):
                    if round_ not in self._done_rounds:
                        self._merge_round_if_complete(round_)

    # -- run set-up ----------------------------------------------------------------------------
    def _run_fingerprint(self) -> str:
        """The settings a run cannot change midway without invalidating what was trained."""
        cfg = self.config
        settings = {
            "layers_per_block": cfg.layers_per_block, "dtype": cfg.dtype,
            "max_concurrent_visits": cfg.max_concurrent_visits,
            "schedule": to_dict(cfg.schedule), "training": to_dict(cfg.training),
        }
        if cfg.strategy != "cybgd":  # (runs from before strategies existed keep their fingerprint)
            settings.update(strategy=cfg.strategy, clients_per_round=cfg.clients_per_round, lora=to_dict(cfg.lora))
        return json.dumps(settings, sort_keys=True)

    def _open_run(self) -> RunInfo:
        stored = self.state.get_meta("run_config")
        if stored is None:
            if not self.config.model:
                raise ValueError("a new run needs a model directory (--model)")
            log.info("importing model %s", self.config.model)
            specs, manifest, dtype = self.store.import_model(self.config.model, self.config.layers_per_block, self.config.dtype)
            model_id = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
            self.state.add_version(0, manifest, None, replace=True)  # a crash mid-import may have left one
            meta = {"blocks": specs_to_json(specs), "dtype": dtype, "model_id": model_id}
            if self.kind == pb.TASK_LORA:
                meta["adapter:0"] = self._initial_adapter(specs, manifest, dtype)
            # Written last: its presence marks a completely initialised run.
            self.state.set_meta({**meta, "run_config": self._run_fingerprint()})
            log.info("run initialised: %d blocks, dtype %s, model %s", len(specs), dtype, model_id[:12])
        elif stored != self._run_fingerprint():
            raise ValueError(
                f"state directory {self.state_dir} belongs to a run with other settings:\n  stored:  {stored}\n"
                f"  current: {self._run_fingerprint()}\nuse a fresh --state-dir or the same settings")
        return RunInfo(specs=specs_from_json(self.state.get_meta("blocks")), dtype=self.state.get_meta("dtype"),
                       model_id=self.state.get_meta("model_id"))

    def _initial_adapter(self, specs: list[BlockSpec], manifest: list[str], dtype: str) -> str:
        """fedlora's version-0 adapter (B = 0: the model is unchanged), made once for every client."""
        from fedcybgd.training import initial_lora_adapter

        lora = self.config.lora
        model = self.store.build_model(specs, manifest, dtype)
        adapter = initial_lora_adapter(model, rank=lora.rank, alpha=lora.alpha,
                                       target_modules=list(lora.target_modules) or None, init_seed=self.config.schedule.seed)
        return self.store.blobs.put(serialize_block(adapter))

    def _adapter_entry(self, sha: str) -> pb.BlockEntry:
        """An adapter blob's manifest entry, read from its header once (adapters never change)."""
        if sha not in self._adapter_entries:
            self._adapter_entries[sha] = adapter_entry(self.store.blobs, sha, len(self.run.specs))
        return self._adapter_entries[sha]

    def _adapter_of(self, version: int) -> str | None:
        return self.state.get_meta(f"adapter:{version}")

    def _scope_name(self, block_index: int) -> str:
        """What a task or round trained, for logs and status."""
        if block_index != ALL_BLOCKS:
            return self.run.specs[block_index].name
        return ADAPTER_NAME if self.kind == pb.TASK_LORA else "all blocks"

    # -- clients -------------------------------------------------------------------------------
    def register(self, req: pb.RegisterRequest, peer_name: str | None = None) -> pb.RegisterResponse:
        """Enrolment: by client certificate (mutual TLS; the certificate's name is the site's
        name), by join token, or both; open only in insecure mode with neither configured."""
        cfg = self.config
        if cfg.join_token and not hmac.compare_digest(req.join_token.encode(), cfg.join_token.encode()):
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing join token")
        if cfg.tls_client_ca:
            if peer_name is None:
                raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
            if peer_name == OPERATOR_NAME:
                raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "the operator certificate cannot register as a client")
            req = pb.RegisterRequest(name=peer_name, device_kind=req.device_kind, memory_bytes=req.memory_bytes)
        name = req.name.strip()
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"client name must be 1-{MAX_NAME_CHARS} printable characters")
        token = secrets.token_urlsafe(32)
        now = time.time()
        client = ClientRow(id=f"c-{secrets.token_hex(6)}", name=name, device_kind=_printable(req.device_kind),
                           memory_bytes=_int64(req.memory_bytes), registered_unix=now, last_seen_unix=now)
        self.state.add_client(client, _token_hash(token))
        self.metrics.clients_registered.inc()
        log.info("registered client %s (%s, %s)", client.id, name, client.device_kind)
        return pb.RegisterResponse(client_id=client.id, token=token)

    def authenticate(self, metadata: dict[str, str], peer_name: str | None = None) -> ClientRow:
        """The client a call comes from, by its bearer token; with mutual TLS the token must also
        belong to the site named in the certificate (a stolen token is useless elsewhere)."""
        auth = metadata.get("authorization", "")
        if not auth.startswith("Bearer ") or len(auth) > 512:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata; register first")
        client = self.state.client_by_token(_token_hash(auth[len("Bearer "):]))
        if client is None:
            raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "unknown client token")
        if self.config.tls_client_ca and peer_name != client.name:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "this token belongs to another site's certificate")
        return client

    def authorize_operator(self, metadata: dict[str, str], peer_name: str | None) -> None:
        """Operator calls: the operator token, or the operator's client certificate."""
        cfg = self.config
        if peer_name == OPERATOR_NAME and cfg.tls_client_ca:
            return
        auth = metadata.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if cfg.operator_token and hmac.compare_digest(token.encode(), cfg.operator_token.encode()):
            return
        if cfg.insecure and not cfg.operator_token:
            return
        if token and self.state.client_by_token(_token_hash(token)) is not None:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, "operator calls need operator credentials, not a client's")
        raise RpcError(grpc.StatusCode.UNAUTHENTICATED, "operator credentials required (operator token or certificate)")

    def model_info(self) -> pb.ModelInfo:
        if self._model_info is None:  # immutable for the run: compress once
            files = {name: compress_small(data) for name, data in self.store.tokenizer_files().items()}
            self._model_info = pb.ModelInfo(
                model_id=self.run.model_id, config_json=self.store.config_json(), tokenizer_files=files,
                tokenizer_codec=pb.CODEC_ZSTD, upload_codecs=UPLOAD_CODECS, dtype=self.run.dtype,
                num_blocks=len(self.run.specs),
                layers_per_block=self.config.layers_per_block, strategy=self.config.strategy,
                lora=pb.LoraSpec(rank=self.config.lora.rank, alpha=self.config.lora.alpha,
                                 target_modules=list(self.config.lora.target_modules)))
        return self._model_info

    def heartbeat(self, client: ClientRow, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        memory = {"gpu_peak_allocated_bytes": _int64(req.gpu_peak_allocated_bytes),
                  "gpu_peak_reserved_bytes": _int64(req.gpu_peak_reserved_bytes), "host_rss_bytes": _int64(req.host_rss_bytes)}
        self.state.touch_client(client.id, **memory)
        self.metrics.observe_client_memory(client.name, *memory.values())
        valid = False
        if req.task_id:
            task = self.state.task(req.task_id)
            valid = task is not None and task.client_id == client.id and task.status == "issued"
            if valid:
                self.state.note_progress(task.id)
                self._progress[task.id] = (req.phase[:16], req.step)
        return pb.HeartbeatResponse(task_valid=valid, heartbeat_interval_s=self.config.heartbeat_interval_s)

    # -- scheduling ----------------------------------------------------------------------------
    @property
    def rounds_done(self) -> int:
        return len(self._done_rounds)

    @property
    def all_rounds_done(self) -> bool:
        return len(self._done_rounds) >= self.schedule.total_rounds

    def get_task(self, client: ClientRow, req: pb.GetTaskRequest) -> pb.GetTaskResponse:
        self.state.touch_client(client.id)
        deadline = time.monotonic() + min(req.wait_seconds, MAX_GET_TASK_WAIT_S)
        with self._cond:
            while True:
                self._expire_stalled_tasks()
                current = [t for t in self.state.tasks_with_status("issued") if t.client_id == client.id]
                if current:  # a retried GetTask gets the same task back
                    return pb.GetTaskResponse(task=self._task_message(current[0]))
                if self.all_rounds_done:
                    self.clients_told_done.add(client.id)
                    latest, _ = self.state.latest_version()
                    return pb.GetTaskResponse(done=pb.Done(final_version=latest))
                opening = self._next_round() if self.kind == pb.TASK_BLOCK else self._next_slot(client)
                if opening is not None:
                    return pb.GetTaskResponse(task=self._task_message(self._issue(client, *opening)))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return pb.GetTaskResponse(wait=pb.Wait(retry_after_ms=500, reason="all open blocks are being trained"))
                self._cond.wait(timeout=min(remaining, 1.0))

    def _next_round(self) -> tuple[int, int, int] | None:
        """The earliest round that may start now (caller holds the lock).

        Sequential mode: only when nothing is in flight, so each visit starts from the model with
        every earlier visit merged (Gauss-Seidel order, as in the paper). Parallel mode: up to K
        visits at once on distinct blocks; a block never overtakes an earlier visit of itself.
        """
        in_flight = self.state.tasks_with_status("issued")
        if len(in_flight) >= self.config.max_concurrent_visits:
            return None
        blocked = {t.block_index for t in in_flight}
        busy_rounds = {t.round for t in in_flight}
        first_open = next((r for r in range(self.schedule.total_rounds) if r not in self._done_rounds), None)
        if first_open is None:
            return None
        for round_ in range(first_open, min(first_open + self.schedule.num_blocks, self.schedule.total_rounds)):
            if round_ in self._done_rounds or round_ in busy_rounds:
                continue
            block = self.schedule.block_of(round_)
            if block not in blocked:
                return round_, block, 0
            blocked.add(block)
        return None

    def _next_slot(self, client: ClientRow) -> tuple[int, int, int] | None:
        """FedAvg family: a free slot of the earliest unmerged round, for a client that has no part
        in it yet (a round's C tasks go to C distinct clients, all from the same version)."""
        round_ = next((r for r in range(self.schedule.total_rounds) if r not in self._done_rounds), None)
        if round_ is None:
            return None
        taken = [(t.slot, t.client_id) for t in self.state.tasks_with_status("issued") if t.round == round_]
        taken += [(c.slot, c.client_id) for c in self.state.contributions(round_)]
        if client.id in {c for _, c in taken}:
            return None
        free = [slot for slot in range(self.config.clients_per_round) if slot not in {s for s, _ in taken}]
        return (round_, ALL_BLOCKS, free[0]) if free else None

    def _issue(self, client: ClientRow, round_: int, block_index: int, slot: int) -> TaskRow:
        latest, _ = self.state.latest_version()
        now = time.time()
        task = TaskRow(id=f"t-{round_}-{slot}-{secrets.token_hex(6)}" if block_index == ALL_BLOCKS
                       else f"t-{round_}-{secrets.token_hex(6)}", round=round_, block_index=block_index,
                       client_id=client.id, base_version=latest, status="issued", issued_unix=now, last_progress_unix=now,
                       slot=slot)
        self.state.issue_task(task)
        log.info("round %d: %s to %s (%s), base version %d", round_, self._scope_name(block_index), client.name,
                 client.id, latest)
        return task

    def _task_message(self, task: TaskRow) -> pb.Task:
        tr = self.config.training
        hyper = pb.Hyper(lr=self.schedule.lr_of(task.round), local_steps=tr.local_steps, batch_size=tr.batch_size,
                         seq_len=tr.seq_len, seed=self._seed_of(task), weight_decay=tr.weight_decay,
                         max_grad_norm=tr.max_grad_norm)
        return pb.Task(task_id=task.id, cycle=self.schedule.cycle_of(task.round), round=task.round,
                       block_index=max(task.block_index, 0), block_name=self._scope_name(task.block_index),
                       base_version=task.base_version, hyper=hyper, kind=self.kind)

    def _seed_of(self, task: TaskRow) -> int:
        if self.kind == pb.TASK_BLOCK:
            return self.schedule.seed_of(task.round)
        return self.schedule.seed_of(task.round, task.slot)

    def _expire_stalled_tasks(self) -> None:
        """Reassign tasks whose client shows no sign of life: no heartbeat and no transfer progress
        for task_timeout_s. A slow but live client keeps its task however long the visit takes."""
        now = time.time()
        if now - self._last_expiry_scan < 1.0:  # every waiting GetTask calls this; once a second is enough
            return
        self._last_expiry_scan = now
        last_seen = {c.id: c.last_seen_unix for c in self.state.clients()}
        for task in self.state.tasks_with_status("issued"):
            # Our own downtime is not the client's silence: count from this process's start too.
            alive = max(task.last_progress_unix, last_seen.get(task.client_id, 0.0), self._started_unix)
            if now - alive > self.config.task_timeout_s and self.state.expire_task(task.id):
                self._task_bytes.pop(task.id, None)
                self.metrics.visits.labels(outcome="reassigned").inc()
                log.warning("task %s (round %d) expired: no progress for %.0fs; it will be reassigned",
                            task.id, task.round, now - alive)

    # -- transfers -----------------------------------------------------------------------------
    def _own_issued_task(self, client: ClientRow, task_id: str) -> TaskRow:
        task = self.state.task(task_id)
        if task is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"no task {task_id[:80]!r}")
        if task.client_id != client.id:
            raise RpcError(grpc.StatusCode.PERMISSION_DENIED, f"task {task_id} belongs to another client")
        if task.status != "issued":
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"task {task_id} is {task.status}, no longer open")
        return task

    def manifest_message(self, version: int, sending: list[str],
                         approx: dict[int, pb.ContextApprox] | None = None, adapter: str | None = None) -> pb.Manifest:
        manifest = self.state.manifest(version)
        approx = approx or {}
        blocks = [
            pb.BlockEntry(index=spec.index, name=spec.name, sha256=sha, size=self.store.blobs.size(sha),
                          tensors=[pb.TensorEntry(name=t.name, shape=t.shape, dtype=t.dtype) for t in spec.tensors],
                          approx=approx.get(spec.index))
            for spec, sha in zip(self.run.specs, manifest, strict=True)
        ]
        return pb.Manifest(version=version, blocks=blocks, sending=sending,
                           adapter=self._adapter_entry(adapter) if adapter else None)

    def download(self, client: ClientRow, req: pb.DownloadRequest) -> Iterator[pb.DownloadMessage]:
        """The task's base model: manifest first, then every blob the client lacks, chunk by chunk,
        read from memory-mapped files (no per-client copy of the model). Frozen blocks may come as
        lossy approximations when the run is configured for it and the client can decode them."""
        task = self._own_issued_task(client, req.task_id)
        if len(req.have) > MAX_HAVE_ENTRIES:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_HAVE_ENTRIES} 'have' entries")
        if len(req.resume) > MAX_HAVE_ENTRIES:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_HAVE_ENTRIES} 'resume' entries")
        have = set(req.have)
        resume = {r.sha256: r.offset for r in req.resume}
        manifest = self.state.manifest(task.base_version)
        approx = self._context_plan(task, manifest, have, set(req.accept_context)) if self.kind == pb.TASK_BLOCK else {}
        if approx:
            self.metrics.context_blocks.labels(method=self.config.context.method).inc(len(approx))
        adapter = self._adapter_of(task.base_version) if self.kind == pb.TASK_LORA else None
        exact = [sha for i, sha in enumerate(manifest) if i not in approx] + ([adapter] if adapter else [])
        encoded = [a.sha256 for a in approx.values() if a.sha256]
        sending = [sha for sha in dict.fromkeys(exact + encoded) if sha not in have]
        codec = next((c for c in (pb.CODEC_BYTEGROUP, pb.CODEC_ZSTD) if c in req.accept_codecs), pb.CODEC_NONE)
        words = {sha: word_size(spec) for spec, sha in zip(self.run.specs, manifest, strict=True)}
        blocks = {sha: i for i, sha in enumerate(manifest)}
        trainable = {pb.TASK_BLOCK: {manifest[task.block_index]}, pb.TASK_FULL: set(manifest),
                     pb.TASK_LORA: {adapter}}[self.kind]
        if adapter:
            words[adapter], blocks[adapter] = 4, len(manifest)  # fp32 adapter weights
        first = pb.DownloadMessage(manifest=self.manifest_message(task.base_version, sending, approx, adapter))
        total = first.ByteSize()
        self._count(task.id, "down", "context", first.ByteSize(), 0)
        yield first
        for sha in sending:
            kind = ("full" if self.kind == pb.TASK_FULL else "block") if sha in trainable else "context"
            raw_bytes = wire_bytes = 0
            is_block = sha in blocks and self.store.blobs.has(sha)
            store = self.store.blobs if is_block else self._approximations
            base = self._delta_base(blocks[sha], sha, have) if is_block else None
            with store.open_mmap(sha) as blob, \
                    (self.store.blobs.open_mmap(base) if base else contextlib.nullcontext()) as older:
                # A broken transfer continues where the client's verified bytes end.
                start = resume.get(sha, 0) if resume.get(sha, 0) < len(blob) else 0
                chunks = encode_chunks(sha, blob, chunk_bytes=self.config.chunk_bytes, codec=codec,
                                       level=self.config.zstd_level, start=start, word_size=words[sha] if is_block else 1,
                                       delta=(base, older) if base else None)
                try:
                    for chunk in chunks:
                        message = pb.DownloadMessage(chunk=chunk)
                        raw_bytes += chunk.raw_size
                        wire_bytes += message.ByteSize()
                        yield message
                finally:
                    chunks.close()
            total += wire_bytes
            self.state.note_progress(task.id, bytes_down=wire_bytes)
            self._count(task.id, "down", kind, wire_bytes, raw_bytes)
        self.state.note_progress(task.id, bytes_down=first.ByteSize())
        log.debug("task %s: sent %d blobs (%d frozen blocks approximated), %d bytes", task.id, len(sending),
                  len(approx), total)

    def _context_plan(self, task: TaskRow, manifest: list[str], have: set[str],
                      accepted: set[int]) -> dict[int, pb.ContextApprox]:
        """Which frozen blocks the client gets approximated, and how (block index -> approximation).

        Only blocks the client lacks exactly, never the trainable block, and only with a codec the
        client announced. The reference is the newest exact version of the block the client holds.
        """
        cfg = self.config.context
        codec = CONTEXT_CODECS.get(cfg.method)
        if codec is None or codec not in accepted:
            return {}
        trainable = manifest[task.block_index]
        frozen = [(i, sha, self._delta_base(i, sha, have)) for i, sha in enumerate(manifest)
                  if i != task.block_index and sha != trainable and sha not in have]
        if cfg.method == "drop":
            # Layer dropping as the authors' code does it: a seeded share of the changed frozen
            # blocks is not sent; the client keeps the version it holds.
            candidates = [(i, ref) for i, _, ref in frozen if ref]
            chosen = random.Random(f"fedcybgd-drop:{self.schedule.seed_of(task.round)}").sample(
                candidates, math.floor(cfg.effective_ratio * len(candidates) + 0.5))
            return {i: pb.ContextApprox(codec=codec, reference_sha256=ref) for i, ref in chosen}
        plan = {}
        for i, sha, ref in frozen:
            approximation = self._approximation(i, sha, ref)
            if approximation is not None:
                plan[i] = pb.ContextApprox(codec=codec, sha256=approximation[0], size=approximation[1],
                                           reference_sha256=ref or "", group_size=cfg.group_size)
        return plan

    def _approximation(self, block: int, sha: str, reference: str | None) -> tuple[str, int] | None:
        """The encoded approximation of blob `sha` relative to `reference`, made once and kept;
        None when it would not be smaller on the wire than the exact block (as a lossless delta
        against the same reference): a lossy option never costs more bytes than the exact one."""
        cfg = self.config.context
        key = (cfg.method, cfg.effective_ratio, cfg.group_size, sha, reference)
        with self._approximation_lock:
            if key not in self._approximation_index:
                tensors = safetensors.torch.load_file(str(self.store.blobs.path(sha)))
                ref = safetensors.torch.load_file(str(self.store.blobs.path(reference))) if reference else None
                blob = serialize_block(context.encode(cfg.method, tensors, ref, ratio=cfg.effective_ratio,
                                                      group_size=cfg.group_size))
                with self.store.blobs.open_mmap(sha) as exact, \
                        (self.store.blobs.open_mmap(reference) if reference else contextlib.nullcontext()) as older:
                    lossless = _wire_size(sha, exact, word_size(self.run.specs[block]), (reference, older) if reference else None)
                lossy = _wire_size("", blob, 1, None)
                worth_it = lossy < lossless
                self._approximation_index[key] = (self._approximations.put(blob), len(blob)) if worth_it else None
                log.debug("block %d: %s approximation of %s: %d bytes on the wire vs %d exact%s", block, cfg.method,
                          sha[:12], lossy, lossless, "" if worth_it else ": sent exactly")
            return self._approximation_index[key]

    def _delta_base(self, block: int, sha: str, have: set[str]) -> str | None:
        """The newest earlier version of this block that the client holds (same size), if any."""
        size = self.store.blobs.size(sha)
        for older in reversed(self._history.get(block, [])):
            if older != sha and older in have and self.store.blobs.has(older) and self.store.blobs.size(older) == size:
                return older
        return None

    def upload(self, client: ClientRow, messages: Iterator[pb.UploadMessage]) -> pb.UploadResponse:
        first = next(messages, None)
        if first is None or not first.HasField("header"):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "an upload starts with its header")
        header = first.header
        task = self.state.task(header.task_id)
        if task is not None and task.client_id == client.id and task.status == "done":
            return self._repeated_upload(task, header)
        try:
            task = self._own_issued_task(client, header.task_id)
        except RpcError as err:
            self.metrics.rejections.labels(reason="task").inc()
            raise err
        expected = self._expected_uploads(task, header)
        wire, raw = self._receive(first, messages, expected)
        self._count(task.id, "up", "full" if self.kind == pb.TASK_FULL else "block", wire, raw)
        if self.kind == pb.TASK_BLOCK:
            return self._commit(client, task, header, wire)
        return self._contribute(client, task, header, [sha for sha, _, _, _ in expected], wire)

    def _expected_uploads(self, task: TaskRow, header: pb.UploadHeader) -> list[tuple[str, int, BlockSpec, str]]:
        """The blobs an upload must carry, as (sha256, size, spec, the only blob a delta may refer
        to): one block, every block, or the adapter, by the run's strategy."""
        code = grpc.StatusCode
        self._check_header(task, header)
        started = self.state.manifest(task.base_version)
        if self.kind == pb.TASK_BLOCK:
            if header.block_index != task.block_index:
                raise RpcError(code.PERMISSION_DENIED, f"task {task.id} trains block {task.block_index}, not {header.block_index}")
            announced = [(task.block_index, header.blob_sha256, header.blob_size)]
        elif self.kind == pb.TASK_FULL:
            announced = [(b.block_index, b.sha256, b.size) for b in header.blobs]
            if [i for i, _, _ in announced] != list(range(len(self.run.specs))):
                raise RpcError(code.INVALID_ARGUMENT, f"a {self.config.strategy} upload carries every block, in order")
        else:
            announced = [(len(self.run.specs), header.blob_sha256, header.blob_size)]
        adapter = self._adapter_of(task.base_version) if self.kind == pb.TASK_LORA else None
        expected = []
        for index, sha, size in announced:
            if index < len(self.run.specs):
                spec, base = self.run.specs[index], started[index]
            else:
                spec, base = adapter_spec(self._adapter_entry(adapter)), adapter
            if not _SHA256.match(sha):
                raise RpcError(code.INVALID_ARGUMENT, "blob_sha256 must be 64 lowercase hex digits")
            limit = max_blob_size(spec)
            if not 0 < size <= limit:
                raise RpcError(code.INVALID_ARGUMENT, f"blob_size {size} outside (0, {limit}] for block {spec.name}")
            expected.append((sha, size, spec, base))
        return expected

    def _receive(self, first: pb.UploadMessage, messages: Iterator[pb.UploadMessage],
                 expected: list[tuple[str, int, BlockSpec, str]]) -> tuple[int, int]:
        """Reassemble the announced blobs from the chunks that follow, in order, each checked per
        chunk (CRC), as a whole (SHA-256) and against its block spec before it is stored. Deltas
        may refer only to the version the visit started from. Returns (wire bytes, raw bytes)."""
        pending = list(expected)
        mapped: dict[str, object] = {}
        wire, raw = first.ByteSize(), 0

        def open_next() -> tuple[object, BlobAssembler]:
            sha, size, _, allowed = pending[0]

            def delta_source(base: str):
                if base != allowed:
                    raise KeyError(base)
                if base not in mapped:
                    mapped[base] = self.store.blobs.open_mmap(base)
                return mapped[base]
            sink = self.store.blobs.writer(sha, size)
            return sink, BlobAssembler(sha, size, sink, delta_source=delta_source)

        def check_current() -> None:  # checked now, published once every blob has passed
            assembler.verify()
            spec = pending.pop(0)[2]
            writer.check(validate=lambda path: validate_block_file(path, spec))
            checked.append(writer)

        checked: list = []
        writer = None
        try:
            writer, assembler = open_next()
            for message in messages:
                if not message.HasField("chunk"):
                    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the header")
                wire += message.ByteSize()
                if assembler.complete:
                    if len(pending) == 1:
                        raise CodecError("chunks beyond the announced blobs")
                    check_current()
                    writer = None
                    writer, assembler = open_next()
                assembler.add(message.chunk)
                raw += message.chunk.raw_size
            check_current()
            writer = None
            if pending:
                raise CodecError(f"upload ended with {len(pending)} announced blobs missing")
            for done in checked:
                done.publish()
        except CodecError as err:
            for w in [writer, *checked]:
                if w is not None:
                    w.abort()
            self.metrics.rejections.labels(reason="data").inc()
            self.metrics.visits.labels(outcome="failed").inc()
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"upload rejected: {err}") from err
        except BaseException:
            for w in [writer, *checked]:
                if w is not None:
                    w.abort()
            raise
        finally:
            for m in mapped.values():
                m.close()
        return wire, raw

    def _count(self, task_id: str, direction: str, kind: str, wire: int, raw: int) -> None:
        self.metrics.count_transfer(direction, kind, wire, raw)
        totals = self._task_bytes.setdefault(task_id, {}).setdefault((direction, kind), [0, 0])
        totals[0] += wire
        totals[1] += raw

    def _active_clients(self) -> int:
        horizon = time.time() - 3 * self.config.heartbeat_interval_s
        return sum(1 for c in self.state.clients() if c.last_seen_unix >= horizon)

    def _check_header(self, task: TaskRow, header: pb.UploadHeader) -> None:
        code = grpc.StatusCode
        if header.base_version != task.base_version:
            raise RpcError(code.FAILED_PRECONDITION, f"task {task.id} started from version {task.base_version}, "
                                                     f"not {header.base_version}")
        if not all(math.isfinite(x) and x >= 0 for x in (header.loss_before, header.loss_after, header.train_seconds,
                                                        header.download_seconds)):
            raise RpcError(code.INVALID_ARGUMENT, "losses and seconds in the header must be finite and >= 0")

    def _repeated_upload(self, task: TaskRow, header: pb.UploadHeader) -> pb.UploadResponse:
        """A retry of an upload that was committed but whose answer was lost: same answer again."""
        if self.kind != pb.TASK_BLOCK:
            contribution = self.state.contribution_of_task(task.id)
            if contribution is None or contribution.blobs[-1] != (header.blobs[-1].sha256 if header.blobs
                                                                  else header.blob_sha256):
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} was already completed with other blobs")
            return pb.UploadResponse(new_version=task.base_version, blob_sha256=contribution.blobs[-1])
        visit = self.state.visit_of_task(task.id)
        if visit is None or visit.blob_sha256 != header.blob_sha256:
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"task {task.id} was already completed with another block")
        return pb.UploadResponse(new_version=visit.new_version, blob_sha256=visit.blob_sha256)

    def _commit(self, client: ClientRow, task: TaskRow, header: pb.UploadHeader, wire_bytes: int) -> pb.UploadResponse:
        with self._cond:
            latest, manifest = self.state.latest_version()
            if manifest[task.block_index] != self.state.manifest(task.base_version)[task.block_index]:
                self.metrics.rejections.labels(reason="stale").inc()
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"block {task.block_index} changed since version {task.base_version}; upload is stale")
            new_manifest = list(manifest)
            new_manifest[task.block_index] = header.blob_sha256
            now = time.time()
            record = self._visit_record(task, header, wire_bytes, now)
            visit = VisitRow(round=task.round, task_id=task.id, client_id=task.client_id, block_index=task.block_index,
                             base_version=task.base_version, new_version=latest + 1, blob_sha256=header.blob_sha256,
                             committed_unix=now, record=record)
            try:
                self.state.commit_visit(visit, new_manifest)
            except StaleTaskError as err:
                self.metrics.rejections.labels(reason="stale").inc()
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"upload rejected: {err} (reassigned)") from err
            self.state.note_progress(task.id, bytes_up=wire_bytes)
            self._done_rounds.add(task.round)
            self._history[task.block_index].append(header.blob_sha256)
            self._cond.notify_all()
        self.metrics.observe_round(record, self._task_bytes.pop(task.id, {}), client.name)
        self.metrics.set_progress(self.rounds_done, self.schedule)
        log.info("round %d committed: block %s -> version %d (loss %.4f -> %.4f)", task.round,
                 self.run.specs[task.block_index].name, visit.new_version, header.loss_before, header.loss_after)
        self._maybe_evaluate(visit.new_version)
        return pb.UploadResponse(new_version=visit.new_version, blob_sha256=visit.blob_sha256)

    def _visit_record(self, task: TaskRow, header: pb.UploadHeader, wire_bytes: int, now: float) -> dict:
        return {
            "lr": self.schedule.lr_of(task.round), "seed": self._seed_of(task),
            "bytes_down": self.state.task(task.id).bytes_down, "bytes_up": wire_bytes, "loss_before": header.loss_before,
            "loss_after": header.loss_after, "peak_memory_bytes": _int64(header.peak_memory_bytes),
            "train_seconds": header.train_seconds, "download_seconds": header.download_seconds,
            "visit_seconds": now - task.issued_unix, "samples": _int64(header.samples), "tokens": _int64(header.tokens),
            "device": _printable(header.device),
        }

    def _contribute(self, client: ClientRow, task: TaskRow, header: pb.UploadHeader, blobs: list[str],
                    wire_bytes: int) -> pb.UploadResponse:
        """FedAvg family: store one client's upload; the round's last one triggers the average."""
        now = time.time()
        record = {**self._visit_record(task, header, wire_bytes, now), "client_name": client.name}
        with self._cond:
            try:
                self.state.add_contribution(ContributionRow(task_id=task.id, round=task.round, slot=task.slot,
                                                            client_id=client.id, blobs=blobs, committed_unix=now,
                                                            record=record))
            except StaleTaskError as err:
                self.metrics.rejections.labels(reason="stale").inc()
                raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, f"upload rejected: {err} (reassigned)") from err
            self.state.note_progress(task.id, bytes_up=wire_bytes)
            self.metrics.observe_round(record, self._task_bytes.pop(task.id, {}), client.name)
            log.info("round %d: contribution %d/%d from %s (loss %.4f -> %.4f)", task.round,
                     len(self.state.contributions(task.round)), self.config.clients_per_round, client.name,
                     header.loss_before, header.loss_after)
            version = self._merge_round_if_complete(task.round)
            self._cond.notify_all()
        return pb.UploadResponse(new_version=version or task.base_version, blob_sha256=blobs[-1])

    def _merge_round_if_complete(self, round_: int) -> int | None:
        """Average a FedAvg-family round once all its uploads are in (caller holds the lock);
        returns the new version. Weights are the samples each client trained on, bounded by what
        the task asked for (a client cannot buy itself a larger say)."""
        contributions = self.state.contributions(round_)
        if len(contributions) < self.config.clients_per_round or round_ in self._done_rounds:
            return None
        tr = self.config.training
        weights = [min(max(int(c.record["samples"]), 1), tr.local_steps * tr.batch_size) for c in contributions]
        latest, manifest = self.state.latest_version()
        adapter = None
        if self.kind == pb.TASK_FULL:
            manifest = average_blocks(self.store.blobs, self.run.specs, list(zip(weights, (c.blobs for c in contributions))))
        else:
            adapter = average_adapter(self.store.blobs, list(zip(weights, (c.blobs[0] for c in contributions))))
            self.state.set_meta({f"adapter:{latest + 1}": adapter})  # before the version that names it
        records = [c.record for c in contributions]
        now = time.time()
        tasks = [self.state.task(c.task_id) for c in contributions]
        first_issued = min(t.issued_unix for t in tasks)
        record = {
            "lr": self.schedule.lr_of(round_), "seed": 0, "clients": [r["client_name"] for r in records],
            **{k: sum(r[k] for r in records) for k in ("bytes_down", "bytes_up", "train_seconds", "download_seconds",
                                                       "samples", "tokens")},
            **{k: sum(r[k] for r in records) / len(records) for k in ("loss_before", "loss_after")},
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records), "visit_seconds": now - first_issued,
            "device": records[0]["device"],
        }
        last = contributions[-1]
        visit = VisitRow(round=round_, task_id=last.task_id, client_id=last.client_id, block_index=ALL_BLOCKS,
                         base_version=tasks[-1].base_version, new_version=latest + 1,
                         blob_sha256=adapter or "", committed_unix=now, record=record)
        self.state.commit_merge(visit, manifest)
        self._done_rounds.add(round_)
        if adapter:
            self._history[len(self.run.specs)].append(adapter)
        else:
            for i, sha in enumerate(manifest):
                self._history[i].append(sha)
        self.metrics.set_progress(self.rounds_done, self.schedule)
        log.info("round %d merged: average of %d clients -> version %d (loss %.4f -> %.4f)", round_, len(records),
                 latest + 1, record["loss_before"], record["loss_after"])
        self._maybe_evaluate(latest + 1)
        return latest + 1

    def _maybe_evaluate(self, version: int) -> None:
        """Queue an evaluation after each cycle's worth of training (and at the end of the run)."""
        if self._eval_thread is None:
            return
        per_round = 1 if self.kind == pb.TASK_BLOCK else self.config.clients_per_round
        done, before = self.rounds_done * per_round, (self.rounds_done - 1) * per_round
        blocks = len(self.run.specs)
        if self.all_rounds_done or (self.config.eval.every_cycle and done // blocks > before // blocks):
            self._eval_queue.put(version)

    # -- evaluation ----------------------------------------------------------------------------
    def _start_evaluator(self) -> None:
        tokenizer = self.store.tokenizer()
        sequences = load_packed(self.config.eval.data, tokenizer, self.config.training.seq_len)
        self._eval_sequences = spread_sample(sequences, self.config.eval.max_sequences)
        evaluated = {v for v, _, _ in self.state.evals()}
        latest, _ = self.state.latest_version()
        self._eval_thread = threading.Thread(target=self._eval_loop, name="evaluator", daemon=True)
        self._eval_thread.start()
        for version in (0, latest) if self.all_rounds_done else (0,):
            if version not in evaluated:
                self._eval_queue.put(version)

    def _eval_loop(self) -> None:
        while (version := self._eval_queue.get()) is not None:
            try:
                loss = self.evaluate(version)
                rounds = sum(1 for v in self.state.visits() if v.new_version <= version)
                self.state.add_eval(version, rounds, loss)
                self.metrics.eval_loss.set(loss)
                log.info("held-out loss of version %d (after %d rounds): %.4f", version, rounds, loss)
            except Exception:
                log.exception("evaluation of version %d failed", version)

    def evaluate(self, version: int) -> float:
        """Held-out loss of one model version, on the coordinator's evaluation data."""
        model = self.store.build_model(self.run.specs, self.state.manifest(version), self.run.dtype)
        adapter = self._adapter_of(version)
        if adapter:
            merge_adapter(model, safetensors.torch.load_file(str(self.store.blobs.path(adapter))), self.config.lora)
        return evaluate_loss(model, self._eval_sequences, self.config.eval.batch_size)

    @property
    def finished(self) -> bool:
        """All rounds merged and, when evaluation is configured, the final version evaluated."""
        if not self.all_rounds_done:
            return False
        if self._eval_thread is None:
            return True
        latest, _ = self.state.latest_version()
        return latest in {v for v, _, _ in self.state.evals()}

    def everyone_told_done(self) -> bool:
        return {c.id for c in self.state.clients()} <= self.clients_told_done

    # -- operators -----------------------------------------------------------------------------
    def status(self, req: pb.GetStatusRequest) -> pb.GetStatusResponse:
        latest, manifest = self.state.latest_version()
        visits = self.state.visits()
        names = {c.id: c.name for c in self.state.clients()}
        in_flight = self.state.tasks_with_status("issued")
        blocks = []
        for spec, sha in zip(self.run.specs, manifest, strict=True):
            mine = [v for v in visits if v.block_index == spec.index or (v.block_index == ALL_BLOCKS and not v.blob_sha256)]
            blocks.append(pb.BlockStatus(index=spec.index, name=spec.name, sha256=sha, size=self.store.blobs.size(sha),
                                         last_version=max((v.new_version for v in mine), default=0), times_trained=len(mine)))
        clients = [
            pb.ClientStatus(client_id=c.id, name=c.name, device_kind=c.device_kind, last_seen_unix=c.last_seen_unix,
                            current_task=next((t.id for t in in_flight if t.client_id == c.id), ""),
                            visits_completed=sum(1 for v in visits if v.client_id == c.id))
            for c in self.state.clients()
        ]
        shown = visits if req.max_visits == 0 else visits[-req.max_visits:]
        return pb.GetStatusResponse(
            run_state="done" if self.finished else "running",
            cycle=min(self.schedule.cycle_of(self.rounds_done), self.config.schedule.cycles - 1) if self.schedule.total_rounds else 0,
            round=self.rounds_done, total_rounds=self.schedule.total_rounds, num_blocks=len(self.run.specs), version=latest,
            blocks=blocks, clients=clients,
            tasks=[pb.TaskStatus(task_id=t.id, client_id=t.client_id, round=t.round, block_index=max(t.block_index, 0),
                                 base_version=t.base_version, issued_unix=t.issued_unix,
                                 phase=self._progress.get(t.id, ("issued", 0))[0],
                                 step=self._progress.get(t.id, ("", 0))[1], steps=self.config.training.local_steps)
                   for t in in_flight],
            visits=[_visit_message(v, self.schedule.cycle_of(v.round), self._scope_name(v.block_index),
                                   names.get(v.client_id, "")) for v in shown],
            evals=[pb.EvalPoint(version=v, rounds_done=r, loss=loss) for v, r, loss in self.state.evals()],
            total_bytes_down=sum(v.record["bytes_down"] for v in visits),
            total_bytes_up=sum(v.record["bytes_up"] for v in visits),
            model_bytes=self._model_bytes,
        )

    def close(self) -> None:
        if self._eval_thread is not None:
            self._eval_queue.put(None)
            self._eval_thread.join(timeout=60)


def _wire_size(sha: str, data, words: int, delta) -> int:
    """Encoded size of a blob with the default download codec (byte grouping)."""
    return sum(len(c.data) for c in encode_chunks(sha, data, codec=pb.CODEC_BYTEGROUP, word_size=words, delta=delta))


def _int64(value: int) -> int:
    """uint64 fields from peers, clamped to what SQLite and Prometheus store."""
    return min(int(value), 2**63 - 1)


def _printable(text: str) -> str:
    return "".join(c for c in text[:MAX_NAME_CHARS] if c.isprintable())


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _visit_message(v: VisitRow, cycle: int, block_name: str, client_name: str) -> pb.VisitRecord:
    r = v.record
    return pb.VisitRecord(
        round=v.round, cycle=cycle, block_index=max(v.block_index, 0), block_name=block_name, client_id=v.client_id,
        client_name=", ".join(r["clients"]) if "clients" in r else client_name, task_id=v.task_id, base_version=v.base_version, new_version=v.new_version,
        lr=r["lr"], seed=r["seed"], bytes_down=r["bytes_down"], bytes_up=r["bytes_up"], loss_before=r["loss_before"],
        loss_after=r["loss_after"], peak_memory_bytes=r["peak_memory_bytes"], train_seconds=r["train_seconds"],
        visit_seconds=r["visit_seconds"], samples=r["samples"])


def _all_finite(piece, shape: tuple[int, ...], dtype: str, budget: int = 64 * 2**20) -> bool:
    """Finiteness of a stored tensor, checked a slab of rows at a time: a tensor of gigabytes is
    never loaded whole."""
    if not shape or shape[0] == 0:
        return bool(torch.isfinite(piece[...] if not shape else piece[:]).all())
    row_bytes = max(1, math.prod(shape[1:]) * st_dtype_to_torch(dtype).itemsize)
    rows = max(1, budget // row_bytes)
    return all(bool(torch.isfinite(piece[i:i + rows]).all()) for i in range(0, shape[0], rows))


def validate_block_file(path: Path, spec: BlockSpec) -> None:
    """An uploaded block must be exactly the block it claims: names, shapes, dtypes, finite values."""
    expected = {t.name: t for t in spec.tensors}
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise CodecError(f"block {spec.name}: missing tensors {missing[:5]}, unexpected {extra[:5]}")
            for name, want in expected.items():
                piece = f.get_slice(name)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != tuple(want.shape) or dtype != want.dtype:
                    raise CodecError(f"{name}: {shape} {dtype}, expected {tuple(want.shape)} {want.dtype}")
                if st_dtype_to_torch(dtype).is_floating_point and not _all_finite(piece, shape, dtype):
                    raise CodecError(f"{name}: contains NaN or infinite values")
    except CodecError:
        raise
    except Exception as exc:  # a malformed header and the like
        raise CodecError(f"not a valid safetensors block: {exc}") from exc
