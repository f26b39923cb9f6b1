"""The client daemon: register, then visit after visit — fetch a task, download what is missing,
train what the task's kind trains (``client/tasks.py``), upload it — until the coordinator says the run is done.

The local data never leaves this process: only block weights and the visit's figures (losses,
sample counts, memory, seconds) are sent.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedcybgd.client.backoff import rate_limit_delay
from fedcybgd.client.cache_budget import CacheBudget
from fedcybgd.client.config import ClientConfig
from fedcybgd.client.data_cache import DataKey, TokenisedData
from fedcybgd.client.host import device_kind, gpu_peaks, memory_bytes, prompt_format_of, software_version, write_private
from fedcybgd.client.metrics import ClientMetrics
from fedcybgd.client.privacy import LEDGER_FILE, PrivacyBudgetSpent, PrivacyLedger, SitePrivacy, VisitPrivacy
from fedcybgd.client.resident import ResidentModel
from fedcybgd.client.tasks import TaskRefused, VisitContext, handler_for, visit_hyper_from_proto
from fedcybgd.client.transfer import ACCEPT_CODECS, download_model, upload_blobs
from fedcybgd.common.allocator import return_freed_memory
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.blocks import BlockSpec, block_tensors
from fedcybgd.common.codec import DEFAULT_CHUNK_BYTES, decompress_small, serialize_block
from fedcybgd.common.delta_arith import accepted as accepted_deltas
from fedcybgd.common.delta_arith import choose as choose_delta
from fedcybgd.common.modeling import DTYPES, TOKENIZER_FILES, config_from_json, model_from_config
from fedcybgd.common.partition import check_layout, partition_model
from fedcybgd.common.procfs import rss_bytes
from fedcybgd.common.sequences import Sequences
from fedcybgd.common.transport import client_channel
from fedcybgd.training import OnStep
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("fedcybgd.client")
T = TypeVar("T")
MAX_TOKENIZER_FILE_BYTES = 32 * 1024 * 1024
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)


class TaskWithdrawn(RuntimeError):
    """The coordinator reassigned our task (or the run ended) while we worked on it."""


class NotEnoughMemory(RuntimeError):
    """The coordinator predicts that no block of the run fits the memory this client announced
    (GetTask answered RESOURCE_EXHAUSTED): the daemon stops, since waiting would not give it more."""


class ClientDaemon:
    """One participant: its identity, the resident model, the local data, and the loop of visits."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.cache_dir = Path(config.cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache = BlobStore(self.cache_dir / "blobs")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(config.device if config.device != "auto" else auto)
        if config.threads:
            torch.set_num_threads(config.threads)
        return_freed_memory()  # a visit's freed host memory goes back to the system (common/allocator.py)
        self.channel = client_channel(config.coordinator, insecure=config.insecure, tls_ca=config.tls_ca,
                                      tls_cert=config.tls_cert, tls_key=config.tls_key, server_name=config.server_name)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.client_id = ""
        self.resident: ResidentModel | None = None  # after _prepare_model
        self.budget: CacheBudget | None = None  # the block cache's retention rule, after _prepare_model
        self._sequences: dict[int, Sequences] = {}
        self._tokenised = TokenisedData(self.cache_dir / "tokenised")
        self._phase = "idle"
        self._task_id = ""
        self._step = 0
        self._withdrawn = False
        self.visits_done = 0
        # What decides which blocks the coordinator gives us, announced at registration.
        self.memory_bytes = config.memory_bytes if config.memory_bytes is not None else memory_bytes(self.device)
        self.metrics = ClientMetrics(self.device)
        if config.metrics_port:
            self.metrics.serve(config.metrics_port, config.metrics_address)

    # -- connection ----------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T], also_retry: tuple[grpc.StatusCode, ...] = ()) -> T:
        """Retry while the coordinator is unreachable (restarting, network blip), or answers one of ``also_retry``,
        up to retry_seconds. A rate-limit refusal (RESOURCE_EXHAUSTED with a retry hint) is waited out as hinted."""
        deadline = time.monotonic() + self.config.retry_seconds
        delay = 0.2
        while True:
            try:
                return fn()
            except grpc.RpcError as err:
                hint = rate_limit_delay(err)
                if hint is not None and time.monotonic() + hint <= deadline:
                    log.info("%s: rate limited by the coordinator; retrying in %.2fs", what, hint)
                    time.sleep(hint)
                    continue
                if err.code() not in RETRYABLE + also_retry or time.monotonic() > deadline:
                    raise
                reason = "unreachable" if err.code() in RETRYABLE else f"answered: {err.details()}"
                log.info("%s: coordinator %s (%s); retrying in %.1fs", what, reason, err.code().name, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _profile(self) -> dict[str, object]:
        """What the coordinator knows of this client's memory from its registration: a change (another
        device, --memory, --checkpoint-above) needs a new registration. A measured default memory is left
        out: it moves a little at every start."""
        return {"device_kind": device_kind(self.device), "checkpoint_above": self.config.checkpoint_above,
                "compact_frozen": self.config.compact_frozen,
                "memory": self.memory_bytes if self.config.memory_bytes is not None else "measured"}

    def connect(self) -> None:
        """Reuse the identity stored in the cache when the coordinator still knows it and our memory
        profile is unchanged, else register."""
        identity_file = self.cache_dir / "identity.json"
        if identity_file.is_file():
            identity = json.loads(identity_file.read_text())
            same_run = identity.get("coordinator") == self.config.coordinator
            changed = identity.get("profile", self._profile()) != self._profile()  # (none stored: older client)
            if same_run and changed:
                log.info("device, memory or memory options changed since registration: registering anew")
            if same_run and not changed:
                self.client_id = identity["client_id"]
                self.metadata = (("authorization", f"Bearer {identity['token']}"),)
                try:
                    self._call("heartbeat", lambda: self.stub.Heartbeat(pb.HeartbeatRequest(phase="idle"),
                                                                        metadata=self.metadata))
                    log.info("rejoined as %s", self.client_id)
                    return
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                        raise
        request = pb.RegisterRequest(name=self.config.name, device_kind=device_kind(self.device),
                                     memory_bytes=self.memory_bytes, software_version=software_version(),
                                     join_token=self.config.join_token or "",
                                     checkpoint_above=self.config.checkpoint_above,
                                     compact_frozen=self.config.compact_frozen)
        reply = self._call("register", lambda: self.stub.Register(request))
        self.client_id = reply.client_id
        self.metadata = (("authorization", f"Bearer {reply.token}"),)
        write_private(identity_file, json.dumps({"coordinator": self.config.coordinator,
                                                  "client_id": reply.client_id, "token": reply.token,
                                                  "profile": self._profile()}))
        log.info("registered as %s (memory %s)", self.client_id,
                 f"{self.memory_bytes / 2**30:.2f} GiB" if self.memory_bytes else "not announced")

    def _prepare_model(self) -> None:
        """Build the coordinator's model (architecture, tokenizer, dtype, partition) on this device, untrained:
        its weights arrive with the first download."""
        info = self._call("model info",
                          lambda: self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata))
        model_dir = self.cache_dir / f"model-{info.model_id[:16]}"
        model_dir.mkdir(exist_ok=True)
        tokenizer_digest = hashlib.sha256()
        for name, data in sorted(info.tokenizer_files.items()):
            if name not in TOKENIZER_FILES:
                raise ValueError(f"coordinator sent an unexpected tokenizer file {name!r}")
            if info.tokenizer_codec == pb.CODEC_ZSTD:
                data = decompress_small(data, MAX_TOKENIZER_FILE_BYTES)
            (model_dir / name).write_bytes(data)
            tokenizer_digest.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\0".encode())
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.tokenizer_digest = tokenizer_digest.hexdigest()
        self.prompt = prompt_format_of(info)
        self.model_info = info
        self.privacy = SitePrivacy(PrivacyLedger(self.cache_dir / LEDGER_FILE, info.model_id), self.metrics,
                                   decline=lambda task_id, reason: self._call("decline", lambda: self.stub.DeclineTask(
                                       pb.DeclineTaskRequest(task_id=task_id, reason=reason),
                                       metadata=self.metadata, timeout=30)),
                                   site_limit=self.config.max_epsilon)
        self.dtype = DTYPES[info.dtype]
        # The best codec both sides know (an older coordinator announces none: plain zstd).
        self.upload_codec = next((c for c in ACCEPT_CODECS if c in info.upload_codecs), pb.CODEC_ZSTD)
        # Version deltas: the best encoding both sides decode (a coordinator that lists none reads XOR).
        self.upload_delta = choose_delta(frozenset(info.accept_deltas), accepted_deltas(self.config.deltas))
        model = model_from_config(config_from_json(info.config_json), self.dtype, self.device)
        specs = partition_model(model, info.layers_per_block, info.max_block_params,
                                check_layout(info.block_layout or "contiguous"))
        if len(specs) != info.num_blocks:
            raise ValueError(f"the coordinator partitions this model into {info.num_blocks} blocks of "
                             f"{info.layers_per_block} decoder layers, this client into {len(specs)}: "
                             "client and coordinator disagree on the model or on the partition (versions?)")
        self.resident = ResidentModel(model, specs, self.cache)
        self.budget = CacheBudget(self.cache, self.cache_dir / "cache-index.json", self.config.cache_limit_bytes,
                                  sum(spec.nbytes for spec in specs), self.metrics)
        if self.config.base_model:
            self._seed_cache_from_base(self.config.base_model, specs)

    def _seed_cache_from_base(self, base_model: str, specs: list[BlockSpec]) -> None:
        """Blocks of locally held base weights go into the cache under their hash: whichever of
        them the coordinator's manifest names will not be downloaded."""
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=self.dtype)
        self._budget().seeded([self.cache.put(serialize_block(block_tensors(base, spec))) for spec in specs])
        del base
        log.info("seeded the block cache from base weights in %s", base_model)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        """Visit until the run is done (or ``max_visits``); returns the number of visits."""
        self.connect()
        self._prepare_model()
        stop_heartbeat = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat_loop, args=(stop_heartbeat,), daemon=True)
        heartbeat.start()
        last_wait = ""
        try:
            while not self.config.max_visits or self.visits_done < self.config.max_visits:
                reply = self._get_task()
                outcome = reply.WhichOneof("outcome")
                if outcome == "done":
                    log.info("run complete (final version %d); %d visits by this client", reply.done.final_version,
                             self.visits_done)
                    break
                if outcome == "wait":
                    if reply.wait.reason != last_wait:
                        log.info("no task for now: %s", reply.wait.reason or "nothing open")
                        last_wait = reply.wait.reason
                    time.sleep(reply.wait.retry_after_ms / 1000)
                    continue
                last_wait = ""
                try:
                    self.visit(reply.task)
                except TaskWithdrawn as err:
                    self.metrics.visits.labels(outcome="withdrawn").inc()
                    log.warning("%s", err)
                except PrivacyBudgetSpent as err:
                    log.error("%s; stopping: this site takes no more tasks in this run", err)
                    raise
                except TaskRefused as err:
                    # This client cannot do the run's tasks (a newer coordinator, another strategy): it stops, so
                    # that its heartbeats stop and the coordinator reassigns the task to a client that can.
                    log.error("%s; stopping: this client cannot take part in this run", err)
                    raise
                finally:
                    self._phase, self._task_id = "idle", ""
                    self._budget().after_visit()
                self.visits_done += 1
        finally:
            stop_heartbeat.set()
            heartbeat.join(timeout=15)  # never close the channel under a call in flight
            self.channel.close()
        return self.visits_done

    def _get_task(self) -> pb.GetTaskResponse:
        """Long-poll for work. Raises `NotEnoughMemory` when the coordinator predicts no block fits us."""
        try:
            return self._call("get task", lambda: self.stub.GetTask(
                pb.GetTaskRequest(wait_seconds=self.config.poll_seconds), metadata=self.metadata,
                timeout=self.config.poll_seconds + 30))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # this site declined a task for its privacy budget
                log.error("the coordinator gives this client no task: %s", err.details())
                raise PrivacyBudgetSpent(err.details() or "this site declined a task") from err
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and rate_limit_delay(err) is None:
                log.error("the coordinator gives this client no task: %s", err.details())
                raise NotEnoughMemory(err.details() or "no block of the run fits this client's memory") from err
            raise

    def visit(self, task: pb.Task) -> pb.UploadResponse:
        """Download what the task needs, train it (its kind's handler), upload the result. Raises ``TaskRefused``
        for a task this client cannot train and ``TaskWithdrawn`` when the coordinator took the task back."""
        handler = handler_for(task)  # before any download: a task that cannot be trained costs nothing
        self._task_id, self._phase, self._step = task.task_id, "download", 0
        hyper = visit_hyper_from_proto(task.hyper)
        private = self.privacy.plan(task, lambda: len(self._training_sequences(hyper.seq_len)))  # before download
        started = time.perf_counter()
        self._budget().before_download()  # before 'have' is sent: it names only what the cache keeps
        try:
            manifest, bytes_down = self._call(
                "download", lambda: download_model(self.stub, self.metadata, task, self.cache,
                                                   accepted_deltas(self.config.deltas)))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:  # reassigned while we could not reach it
                raise TaskWithdrawn(f"round {task.round}: download refused: {err.details()}") from err
            raise
        download_seconds = time.perf_counter() - started
        self.metrics.transfer_bytes.labels(direction="down").inc(bytes_down)
        self._budget().downloaded(manifest, task)
        self._resident().load_manifest(manifest)

        self._phase = "train"
        sequences, on_step = self._training_sequences(hyper.seq_len), self._on_step(hyper.steps)
        log.info("round %d: training %s for %d steps at lr %.3g", task.round, task.block_name, hyper.steps, hyper.lr)
        if private is not None:
            hyper = self.privacy.charge(private, hyper)  # spent once the data is touched, whatever happens next
        upload = handler.train(self._visit_context(private), task, manifest, sequences, hyper, on_step)
        result = upload.result
        self.metrics.tokens_per_second.set(result.tokens / max(result.seconds, 1e-9))
        self.metrics.visit_peak.set(result.peak_memory_bytes)

        self._phase = "upload"
        header = upload.header(task, download_seconds=download_seconds, device=device_kind(self.device))
        if private is not None:
            self.privacy.report(header, private, hyper)
        try:
            # RESOURCE_EXHAUSTED on an upload: the coordinator's disk is full and it stored nothing; the trained
            # block is worth the wait (the task stays ours while our heartbeats go on).
            reply, bytes_up = self._call("upload", lambda: upload_blobs(
                self.stub, self.metadata, header, upload.blobs, self.cache, DEFAULT_CHUNK_BYTES, self.upload_codec,
                self.upload_delta),
                also_retry=(grpc.StatusCode.RESOURCE_EXHAUSTED,))
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise TaskWithdrawn(f"round {task.round}: upload refused: {err.details()}") from err
            raise
        self.metrics.transfer_bytes.labels(direction="up").inc(bytes_up)
        self._budget().accepted(task, header, reply)
        self.metrics.visits.labels(outcome="completed").inc()
        log.info("round %d: %s -> version %d; loss %.4f -> %.4f; %.1f MB down, %.2f MB up, %.1fs",
                 task.round, task.block_name, reply.new_version, result.loss_before, result.loss_after,
                 bytes_down / 1e6, bytes_up / 1e6, time.perf_counter() - started)
        return reply

    def _budget(self) -> CacheBudget:
        if self.budget is None:
            raise RuntimeError("the model is not prepared yet (GetModelInfo first)")
        return self.budget

    def _resident(self) -> ResidentModel:
        if self.resident is None:
            raise RuntimeError("the model is not prepared yet (GetModelInfo first)")
        return self.resident

    def _visit_context(self, private: VisitPrivacy | None = None) -> VisitContext:
        """What the task's handler may use and change: the resident model, the cache, the training settings."""
        resident = self._resident()
        return VisitContext(model=resident.model, specs=resident.specs, loaded=resident.loaded, cache=self.cache,
                            lora=self.model_info.lora, upload_codec=self.upload_codec,
                            checkpoint_above=self.config.checkpoint_above,
                            cache_block_inputs=self.config.cache_block_inputs,
                            compact_frozen=self.config.compact_frozen or None,
                            update_privacy=private.update if private is not None else None)

    def _training_sequences(self, seq_len: int) -> Sequences:
        """The local data packed into rows of ``seq_len`` tokens in the run's prompt format, once per length, from
        the tokenised cache when this client (or an earlier start of it) packed the same data before."""
        if seq_len not in self._sequences:
            key = DataKey(path=self.config.data, options=self.config.record_options,
                          tokenizer_digest=self.tokenizer_digest, prompt=self.prompt, seq_len=seq_len)
            self._sequences[seq_len] = self._tokenised.load(key, self.tokenizer)
        return self._sequences[seq_len]

    def _on_step(self, steps: int) -> OnStep:
        """Progress of a visit (metrics, log, heartbeat step), and where a withdrawn task stops training."""
        every = max(1, steps // 5)
        last = [time.perf_counter()]

        def on_step(step: int, loss: float) -> None:
            now = time.perf_counter()
            self.metrics.step_seconds.observe(now - last[0])
            self.metrics.train_loss.set(loss)
            last[0] = now
            self._step = step + 1
            if (step + 1) % every == 0 or step + 1 == steps:
                log.info("  step %d/%d loss %.4f", step + 1, steps, loss)
            if self._withdrawn:
                raise TaskWithdrawn(f"task {self._task_id} was withdrawn by the coordinator; dropping it")
        self._withdrawn = False
        return on_step

    def _heartbeat_loop(self, stop: threading.Event) -> None:
        """Tell the coordinator we are alive (and where a visit stands); notice when our task was withdrawn."""
        interval = 1.0  # the first beat soon; then the coordinator's interval
        while not stop.wait(interval):
            try:
                reply = self.stub.Heartbeat(pb.HeartbeatRequest(
                    task_id=self._task_id, phase=self._phase, step=self._step,
                    host_rss_bytes=rss_bytes(), **gpu_peaks(self.device)), metadata=self.metadata, timeout=10)
                interval = max(1.0, reply.heartbeat_interval_s)
                if self._task_id and not reply.task_valid and self._phase == "train":
                    self._withdrawn = True
            except (grpc.RpcError, ValueError):
                pass  # the main loop sees and retries real outages (ValueError: channel closed)
