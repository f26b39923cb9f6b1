"""Operator status: the run's progress, blocks, clients, tasks in flight, visits, evaluations, and
what memory keeps from whom (blocks each client holds, why it waits, why the run stalls).

A call costs the same after ten visits or a million: the per-block, per-client and byte totals come from
the totals each commit keeps (`fedcybgd.server.visit_totals`), and the visit history is paged.

Paging: a page holds the newest `max_visits` visits (0: `DEFAULT_PAGE`, at most `MAX_PAGE`) of the rounds
below `visits_before_round` (0: from the newest), listed oldest first (ascending round, the order a log
reads in). `next_visits_before_round` is the cursor of the next, older page, and 0 once there is none, so
a walk from cursor 0 until the reply's cursor is 0 sees every visit exactly once. `summary` leaves out the
visits and evaluations. Evaluations: the first (the base model's) and the newest, `EVALS_SHOWN` in all.
"""
from __future__ import annotations

from collections.abc import Iterable

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.history import CompletedRounds
from fedcybgd.server.memory_fit import MemoryFit
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.privacy import PrivacyReports, SitePrivacy
from fedcybgd.server.records import ALL_BLOCKS
from fedcybgd.server.run import RunInfo
from fedcybgd.server.state import CoordinatorState, VisitRow, current_version
from fedcybgd.server.strategies import Strategy
from fedcybgd.server.tasks import TaskBoard
from fedcybgd.server.visit_totals import ScopeTotals
from fedcybgd.v1 import coordinator_pb2 as pb

#: Visits in a page when the request leaves `max_visits` at 0.
DEFAULT_PAGE = 50
#: The largest page a request may ask for (larger: INVALID_ARGUMENT); a longer history is read page by page.
MAX_PAGE = 1000
#: Evaluations in a reply: the first and the newest ones.
EVALS_SHOWN = 100
#: Rounds are SQLite integers (signed 64 bits); a larger cursor (uint64 in the request) is past every round.
_LARGEST_ROUND = 2**63 - 1


def page_size(max_visits: int) -> int:
    """The page a request's `max_visits` asks for; too large a page is refused."""
    if max_visits > MAX_PAGE:
        raise Refusal(Status.INVALID_ARGUMENT, f"max_visits {max_visits} is over the largest page, {MAX_PAGE}: "
                                               "read a longer history page by page (visits_before_round)")
    return max_visits or DEFAULT_PAGE


class StatusReport:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState, store: ModelStore, run: RunInfo,
                 strategy: Strategy, rounds: CompletedRounds, accounts: TaskAccounts,
                 memory: MemoryFit | None = None, board: TaskBoard | None = None,
                 privacy: PrivacyReports | None = None) -> None:
        self._privacy = privacy
        self._config = config
        self._state = state
        self._store = store
        self._run = run
        self._strategy = strategy
        self._rounds = rounds
        self._accounts = accounts
        self._memory = memory or MemoryFit(None)
        self._board = board

    def build(self, request: pb.GetStatusRequest, finished: bool) -> pb.GetStatusResponse:
        limit = page_size(request.max_visits)
        latest, manifest = current_version(self._state)
        totals = self._state.visit_totals()
        known = self._state.clients()
        names = {c.id: c.name for c in known}
        in_flight = self._state.tasks_with_status("issued")
        memory_waits = self._board.memory_waits() if self._board is not None else {}
        trained = self._trained_by_block(totals.scopes)
        blocks = []
        for spec, sha in zip(self._run.specs, manifest, strict=True):
            last_version, times = trained.get(spec.index, (0, 0))
            blocks.append(pb.BlockStatus(index=spec.index, name=spec.name, sha256=sha, size=self._store.blobs.size(sha),
                                         last_version=last_version, times_trained=times))
        num_blocks = len(self._run.specs)
        clients = [
            pb.ClientStatus(client_id=c.id, name=c.name, device_kind=c.device_kind, last_seen_unix=c.last_seen_unix,
                            current_task=next((t.id for t in in_flight if t.client_id == c.id), ""),
                            visits_completed=totals.of_client(c.id),
                            memory_bytes=c.memory_bytes, gpu_peak_allocated_bytes=c.gpu_peak_allocated_bytes,
                            gpu_peak_reserved_bytes=c.gpu_peak_reserved_bytes, host_rss_bytes=c.host_rss_bytes,
                            checkpoint_above=c.checkpoint_above, compact_frozen=c.compact_frozen,
                            fits_blocks=fits or 0, memory_planning=fits is None,
                            memory_note=memory_waits.get(c.id, ""),
                            record_epsilon=privacy.record_epsilon, update_epsilon=privacy.update_epsilon,
                            declined=privacy.declined)
            for c, privacy, fits in ((c, self._privacy_of(c.id), self._memory.fitting_blocks_now(c, num_blocks))
                                     for c in known)
        ]
        tasks = []
        for t in in_flight:
            progress = self._accounts.progress(t.id)
            tasks.append(pb.TaskStatus(
                task_id=t.id, client_id=t.client_id, round=t.round, block_index=max(t.block_index, 0),
                base_version=t.base_version, issued_unix=t.issued_unix, phase=progress.phase, step=progress.step,
                steps=self._config.training.local_steps, block_name=self._strategy.scope_name(t.block_index),
                whole_model=t.block_index == ALL_BLOCKS))
        shown, cursor = ([], 0) if request.summary else self._page(request.visits_before_round, limit)
        evals = [] if request.summary else self._evals()
        best = self._state.best_eval()
        schedule = self._strategy.schedule
        return pb.GetStatusResponse(
            run_state="done" if finished else "running",
            cycle=min(schedule.cycle_of(self._rounds.count), self._config.schedule.cycles - 1)
            if schedule.total_rounds else 0,
            round=self._rounds.count, total_rounds=schedule.total_rounds, num_blocks=len(self._run.specs),
            version=latest, blocks=blocks, clients=clients, tasks=tasks,
            visits=[self._visit(v, names.get(v.client_id, "")) for v in shown],
            evals=[pb.EvalPoint(version=v, rounds_done=r, loss=loss) for v, r, loss in evals],
            total_bytes_down=totals.bytes_down, total_bytes_up=totals.bytes_up,
            model_bytes=self._run.model_bytes,
            waiting_reason=self._board.memory_stall() if self._board is not None and not finished else "",
            visits_total=totals.visits, next_visits_before_round=cursor,
            best_eval=pb.EvalPoint(version=best[0], rounds_done=best[1], loss=best[2]) if best is not None else None,
        )

    def _privacy_of(self, client_id: str) -> SitePrivacy:
        return self._privacy.of(client_id) if self._privacy is not None else SitePrivacy()

    def _page(self, before_round: int, limit: int) -> tuple[list[VisitRow], int]:
        """The newest `limit` visits below the cursor, oldest first, and the cursor of the older page (0: none).
        One row more than the page tells whether an older page exists."""
        below = before_round if 0 < before_round <= _LARGEST_ROUND else None  # past every round: the newest
        rows = self._state.visits_page(below, limit + 1)
        page = rows[:limit]
        cursor = page[-1].round if len(rows) > limit else 0
        return page[::-1], cursor

    def _evals(self) -> list[tuple[int, int, float]]:
        """The first evaluation (the base model's, the "before" of the run) and the newest ones."""
        newest = self._state.newest_evals(EVALS_SHOWN)
        first = self._state.first_eval()
        if len(newest) < EVALS_SHOWN or first is None or first == newest[0]:
            return newest
        return [first, *newest[1:]]

    def _trained_by_block(self, scopes: Iterable[ScopeTotals]) -> dict[int, tuple[int, int]]:
        """Block index -> (last version that changed it, times trained), from the per-scope totals.

        Every visit of one scope (its `block_index`) changes the same blocks: the block cycle's visit its own
        block, a FedAvg-full round every block, a FedLoRA round the adapter (no block). So the strategy's
        `trained_blocks` is asked once per scope, of the scope's newest visit (an indexed lookup), not of each
        visit of the run."""
        trained: dict[int, tuple[int, int]] = {}
        for scope in scopes:
            visit = self._state.visit_of_version(scope.last_version)
            if visit is None:  # pragma: no cover - the totals and the visits are written in one transaction
                continue
            for block in self._strategy.trained_blocks(visit):
                last, times = trained.get(block, (0, 0))
                trained[block] = (max(last, scope.last_version), times + scope.visits)
        return trained

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
