"""The coordinator: its parts wired together, one method per RPC.

Each part has one job and is testable without gRPC (they raise `Refusal`, never a gRPC error):

=====================  =====================================================================
``enrolment``          who may register; which client a call comes from; operator access
``tasks``              the task board: long-polled GetTask, issuing, heartbeats, expiry
``memory_fit``         which blocks a client's memory holds (the planner's predictions, cached)
``downloads``          a task's download planned (manifest, delta bases) and streamed
``context_plan``       lossy approximations of frozen blocks (when configured)
``uploads``            an upload received, reassembled and checked before it is stored
``commit``             accepted work recorded as model versions (state, history, metrics)
``evaluation``         held-out loss of versions, in a thread of its own
``retention``          which versions stay on disk (base, newest, checkpoints, what clients hold)
``status``             the operator's view of the run
``strategies/``        everything that differs between strategies
``messages``           protobuf <-> the records above
=====================  =====================================================================

`fedcybgd.server.service` adapts this class to gRPC; `fedcybgd.server.app` runs it. State
changes go through `CoordinatorState` (durable, transactional), so a coordinator stopped at any
moment continues from its state directory. docs/design.md follows one visit through these parts.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from fedcybgd.common.codec import compress_small
from fedcybgd.common.delta_arith import accepted as accepted_deltas
from fedcybgd.server import messages
from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.commit import Commits
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.context_plan import ContextPlanner
from fedcybgd.server.downloads import Downloads
from fedcybgd.server.enrolment import Enroller, int64, printable
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.evaluation import Evaluator
from fedcybgd.server.history import BlockHistory, CompletedRounds
from fedcybgd.server.memory_fit import MemoryFit, PlannerPredictor, Predictor
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.privacy import PrivacyReports
from fedcybgd.server.records import UploadClaim, VisitStats
from fedcybgd.server.retention import Retention, directory_bytes
from fedcybgd.server.revocation import Revocations, default_path
from fedcybgd.server.run import open_run
from fedcybgd.server.state import ClientRow, CoordinatorState, SqliteState, TaskRow, current_version
from fedcybgd.server.status import StatusReport
from fedcybgd.server.strategies import StrategyEnv, make_strategy
from fedcybgd.server.tasks import TaskBoard
from fedcybgd.server.uploads import UploadReceiver, check_claim
from fedcybgd.v1 import coordinator_pb2 as pb

log = logging.getLogger("fedcybgd.coordinator")


class Coordinator:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState | None = None,
                 metrics: CoordinatorMetrics | None = None, memory_predictor: Predictor | None = None) -> None:
        """`memory_predictor`: the visits' predicted memory per client profile; by default the memory planner's
        (for strategies whose tasks it predicts, `Strategy.memory_planned`)."""
        self.config = config
        self.state_dir = Path(config.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state: CoordinatorState = state or SqliteState(self.state_dir / "state.sqlite")
        self.store = ModelStore(self.state_dir)
        self.metrics = metrics or CoordinatorMetrics()
        self.strategy = make_strategy(config)
        self.run = open_run(config, self.state, self.store, self.strategy)
        self.schedule = self.strategy.make_schedule(self.run.specs)
        self.metrics.set_model_bytes(self.run.model_bytes)

        # What has been committed, in memory: completed rounds, every blob of every block.
        visits = self.state.visits()
        self.rounds = CompletedRounds((v.round for v in visits), self.schedule.total_rounds)
        self.history = BlockHistory(self.store.blobs, len(self.run.specs) + 1)
        self.history.add(dict(enumerate(self.state.manifest(0))))

        self._lock = threading.Condition()  # the scheduling lock: task issuing and commits
        self.accounts = TaskAccounts(self.metrics)
        commits = Commits(self.state, self.rounds, self.history, self.metrics, self.accounts, self._lock,
                          self.schedule, self._version_committed)
        self.strategy.attach(StrategyEnv(config=config, state=self.state, store=self.store, run=self.run,
                                         lock=self._lock, rounds=self.rounds, commits=commits, metrics=self.metrics))
        extra = self.strategy.extra_blob(0)
        if extra:
            self.history.add({len(self.run.specs): extra})
        for visit in visits:
            self.history.add(self.strategy.blobs_of(visit))

        if memory_predictor is None and self.strategy.memory_planned:
            memory_predictor = PlannerPredictor(self.store.config_json(), self.run, config.layers_per_block,
                                                config.training, private=config.privacy.records,
                                                block_layout=self.run.block_layout)
        self.memory = MemoryFit(memory_predictor)
        self.enroller = Enroller(config, self.state, self.metrics, self.memory)
        self.revocations = Revocations(Path(config.revocation_list) if config.revocation_list
                                       else default_path(config.tls_client_ca), self.state, self.accounts,
                                       self.metrics, self._lock)
        self.tasks = TaskBoard(config, self.state, self.strategy, self.rounds, self.accounts, self.metrics, self._lock,
                               self.memory)
        self.context = ContextPlanner(config.context, self.store.blobs, self.run, self.history,
                                      self.state_dir / "context-blobs")
        self.downloads = Downloads(config, self.state, self.store.blobs, self.run, self.strategy, self.history,
                                   self.context, self.accounts, self.metrics)
        self.receiver = UploadReceiver(self.store.blobs, self.metrics, accepted_deltas(config.deltas))
        self.privacy = PrivacyReports(self.state, self.accounts, self.metrics, self._lock)
        self.report = StatusReport(config, self.state, self.store, self.run, self.strategy, self.rounds, self.accounts,
                                   self.memory, self.tasks, self.privacy)
        self.evaluator = (Evaluator(config.eval, config.training.seq_len, self.state, self.store, self.run,
                                    self.strategy, self.rounds, self.metrics, config.clients_per_round)
                          if config.eval.data else None)
        self.retention = Retention(config.retention, self.state, self.store.blobs, self.schedule, self._lock,
                                   self.metrics, extra_blob=self.strategy.extra_blob,
                                   pinned=self.evaluator.retained if self.evaluator is not None else frozenset,
                                   records=(self.history, self.context))
        self.metrics.measure_disk(self.store.blobs.disk_bytes, lambda: directory_bytes(self.state_dir))
        self._model_info: pb.ModelInfo | None = None

        self.metrics.count_active_clients(self.tasks.active_clients)
        self.metrics.set_progress(self.rounds.count, self.schedule)
        if self.evaluator is not None:
            self.evaluator.start()
        self.strategy.recover()

    # -- clients -------------------------------------------------------------------------------
    def register(self, req: pb.RegisterRequest, peer_name: str | None = None,
                 fingerprint: str | None = None) -> pb.RegisterResponse:
        self.revocations.refuse((peer_name if self.config.tls_client_ca else None) or req.name.strip(), fingerprint)
        credentials = self.enroller.register(messages.enrolment(req), peer_name)
        return pb.RegisterResponse(client_id=credentials.client_id, token=credentials.token)

    def authenticate(self, metadata: dict[str, str], peer_name: str | None = None,
                     fingerprint: str | None = None) -> ClientRow:
        """The caller, unless its site or its certificate (`fingerprint`) is revoked: checked at every call, so a
        revocation holds over an existing connection and token."""
        client = self.enroller.authenticate(metadata, peer_name)
        self.revocations.refuse(client.name, fingerprint)
        return client

    def authorize_operator(self, metadata: dict[str, str], peer_name: str | None) -> None:
        self.enroller.authorize_operator(metadata, peer_name)

    def model_info(self) -> pb.ModelInfo:
        if self._model_info is None:  # immutable for the run: compress once
            files = {name: compress_small(data) for name, data in self.store.tokenizer_files().items()}
            self._model_info = messages.model_info(self.config, self.run, self.store.config_json(), files)
        return self._model_info

    def heartbeat(self, client: ClientRow, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        valid = self.tasks.heartbeat(client, messages.beat(req))
        return pb.HeartbeatResponse(task_valid=valid, heartbeat_interval_s=self.config.heartbeat_interval_s)

    def get_task(self, client: ClientRow, req: pb.GetTaskRequest) -> pb.GetTaskResponse:
        self.privacy.refuse_declined(client)
        offer = self.tasks.get_task(client, req.wait_seconds)
        return messages.task_offer(offer, self.strategy, self.config.training, self.config.privacy)

    def decline_task(self, client: ClientRow, req: pb.DeclineTaskRequest) -> pb.DeclineTaskResponse:
        """The client will not do its task (its privacy budget): reassigned now, the reason kept for status."""
        self.privacy.declined(client, req.task_id, req.reason)
        return pb.DeclineTaskResponse()

    # -- transfers -----------------------------------------------------------------------------
    def download(self, client: ClientRow, req: pb.DownloadRequest) -> Iterator[pb.DownloadMessage]:
        """The task's base model: manifest first, then every blob the client lacks."""
        task = self.tasks.own_issued_task(client, req.task_id)
        plan = self.downloads.plan(task, messages.download_request(req))
        yield from self.downloads.stream(task, plan)

    def upload(self, client: ClientRow, stream: Iterator[pb.UploadMessage]) -> pb.UploadResponse:
        """Header first, then the blobs' chunks; checked whole, then accepted by the strategy."""
        first = next(stream, None)
        if first is None or not first.HasField("header"):
            raise Refusal(Status.INVALID_ARGUMENT, "an upload starts with its header")
        claim = messages.upload_claim(first.header)
        task = self.state.task(claim.task_id)
        if task is not None and task.client_id == client.id and task.status == "done":
            accepted = self.strategy.repeated_upload(task, claim)  # the answer to a retry was lost
            return pb.UploadResponse(new_version=accepted.new_version, blob_sha256=accepted.blob_sha256)
        try:
            task = self.tasks.own_issued_task(client, claim.task_id)
        except Refusal:
            self.metrics.rejections.labels(reason="task").inc()
            raise
        check_claim(task, claim)
        expected = self.strategy.expected_uploads(task, claim)
        received = self.receiver.receive(first.ByteSize(), stream, expected)
        self.accounts.count(task.id, "up", self.strategy.transfer_kind, received.wire, received.raw)
        accepted = self.strategy.accept(task, expected, self._stats(client, task, claim, received.wire))
        self.privacy.reported(client, claim)
        return pb.UploadResponse(new_version=accepted.new_version, blob_sha256=accepted.blob_sha256)

    def _stats(self, client: ClientRow, task: TaskRow, claim: UploadClaim, wire_bytes: int) -> VisitStats:
        """The visit's figures: the client's report (bounded) and what the coordinator measured."""
        now_task = self.state.task(task.id)
        return VisitStats(
            lr=self.schedule.lr_of(task.round), seed=self.strategy.seed_of(task),
            bytes_down=now_task.bytes_down if now_task else 0, bytes_up=wire_bytes,
            loss_before=claim.loss_before, loss_after=claim.loss_after,
            peak_memory_bytes=int64(claim.peak_memory_bytes), train_seconds=claim.train_seconds,
            download_seconds=claim.download_seconds, visit_seconds=time.time() - task.issued_unix,
            samples=int64(claim.samples), tokens=int64(claim.tokens), device=printable(claim.device),
            client_name=client.name)

    # -- progress ------------------------------------------------------------------------------
    def _version_committed(self, version: int) -> None:
        if self.evaluator is not None:
            self.evaluator.version_committed(version)  # pins it before retention looks
        self.retention.committed(version)

    @property
    def rounds_done(self) -> int:
        return self.rounds.count

    @property
    def all_rounds_done(self) -> bool:
        return self.rounds.all_done

    @property
    def finished(self) -> bool:
        """All rounds merged and, when evaluation is configured, the final version evaluated."""
        if not self.rounds.all_done:
            return False
        if self.evaluator is None:
            return True
        latest, _ = current_version(self.state)
        return latest in {v for v, _, _ in self.state.evals()}

    def everyone_told_done(self) -> bool:
        return {c.id for c in self.state.clients()} <= self.tasks.clients_told_done

    def adapter_of(self, version: int) -> str | None:
        """The blob beyond the blocks that a version consists of (fedlora's adapter), if any."""
        return self.strategy.extra_blob(version)

    # -- operators -----------------------------------------------------------------------------
    def status(self, req: pb.GetStatusRequest) -> pb.GetStatusResponse:
        return self.report.build(req, self.finished)

    def close(self) -> None:
        self.revocations.close()
        if self.evaluator is not None:
            self.evaluator.close()
