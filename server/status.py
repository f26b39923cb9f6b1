"""Operator status: the run's progress, blocks, clients, tasks in flight, visits, evaluations, and
what memory keeps from whom (blocks each client holds, why it waits, why the run stalls)."""
from __future__ import annotations

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.history import CompletedRounds
from fedcybgd.server.memory_fit import MemoryFit
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.records import ALL_BLOCKS
from fedcybgd.server.run import RunInfo
from fedcybgd.server.state import CoordinatorState, VisitRow, current_version
from fedcybgd.server.strategies import Strategy
from fedcybgd.server.tasks import TaskBoard
from fedcybgd.v1 import coordinator_pb2 as pb


class StatusReport:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState, store: ModelStore, run: RunInfo,
                 strategy: Strategy, rounds: CompletedRounds, accounts: TaskAccounts,
                 memory: MemoryFit | None = None, board: TaskBoard | None = None) -> None:
        self._config = config
        self._state = state
        self._store = store
        self._run = run
        self._strategy = strategy
        self._rounds = rounds
        self._accounts = accounts
        self._memory = memory or MemoryFit(None)
        self._board = board

    def build(self, max_visits: int, finished: bool) -> pb.GetStatusResponse:
        latest, manifest = current_version(self._state)
        visits = self._state.visits()
        names = {c.id: c.name for c in self._state.clients()}
        in_flight = self._state.tasks_with_status("issued")
        memory_waits = self._board.memory_waits() if self._board is not None else {}
        changed = [(v, set(self._strategy.trained_blocks(v))) for v in visits]
        blocks = []
        for spec, sha in zip(self._run.specs, manifest, strict=True):
            mine = [v for v, blobs in changed if spec.index in blobs]
            blocks.append(pb.BlockStatus(index=spec.index, name=spec.name, sha256=sha, size=self._store.blobs.size(sha),
                                         last_version=max((v.new_version for v in mine), default=0),
                                         times_trained=len(mine)))
        clients = [
            pb.ClientStatus(client_id=c.id, name=c.name, device_kind=c.device_kind, last_seen_unix=c.last_seen_unix,
                            current_task=next((t.id for t in in_flight if t.client_id == c.id), ""),
                            visits_completed=sum(1 for v in visits if v.client_id == c.id),
                            memory_bytes=c.memory_bytes, gpu_peak_allocated_bytes=c.gpu_peak_allocated_bytes,
                            gpu_peak_reserved_bytes=c.gpu_peak_reserved_bytes, host_rss_bytes=c.host_rss_bytes,
                            checkpoint_above=c.checkpoint_above, compact_frozen=c.compact_frozen,
                            fits_blocks=self._memory.fitting_blocks(c, len(self._run.specs)),
                            memory_note=memory_waits.get(c.id, ""))
            for c in self._state.clients()
        ]
        tasks = []
        for t in in_flight:
            progress = self._accounts.progress(t.id)
            tasks.append(pb.TaskStatus(
                task_id=t.id, client_id=t.client_id, round=t.round, block_index=max(t.block_index, 0),
                base_version=t.base_version, issued_unix=t.issued_unix, phase=progress.phase, step=progress.step,
                steps=self._config.training.local_steps, block_name=self._strategy.scope_name(t.block_index),
                whole_model=t.block_index == ALL_BLOCKS))
        shown = visits if max_visits == 0 else visits[-max_visits:]
        schedule = self._strategy.schedule
        return pb.GetStatusResponse(
            run_state="done" if finished else "running",
            cycle=min(schedule.cycle_of(self._rounds.count), self._config.schedule.cycles - 1)
            if schedule.total_rounds else 0,
            round=self._rounds.count, total_rounds=schedule.total_rounds, num_blocks=len(self._run.specs),
            version=latest, blocks=blocks, clients=clients, tasks=tasks,
            visits=[self._visit(v, names.get(v.client_id, "")) for v in shown],
            evals=[pb.EvalPoint(version=v, rounds_done=r, loss=loss) for v, r, loss in self._state.evals()],
            total_bytes_down=sum(v.record.bytes_down for v in visits),
            total_bytes_up=sum(v.record.bytes_up for v in visits),
            model_bytes=self._run.model_bytes,
            waiting_reason=self._board.memory_stall() if self._board is not None and not finished else "",
        )

    def _visit(self, v: VisitRow, client_name: str) -> pb.VisitRecord:
        r = v.record
        return pb.VisitRecord(
            round=v.round, cycle=self._strategy.schedule.cycle_of(v.round), block_index=max(v.block_index, 0),
            block_name=self._strategy.scope_name(v.block_index), client_id=v.client_id,
            client_name=", ".join(r.clients) if r.clients else client_name, task_id=v.task_id,
            base_version=v.base_version, new_version=v.new_version, lr=r.lr, seed=r.seed, bytes_down=r.bytes_down,
            bytes_up=r.bytes_up, loss_before=r.loss_before, loss_after=r.loss_after,
            peak_memory_bytes=r.peak_memory_bytes, train_seconds=r.train_seconds, visit_seconds=r.visit_seconds,
            samples=r.samples, whole_model=v.block_index == ALL_BLOCKS)
