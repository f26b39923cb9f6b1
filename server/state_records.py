"""The records of the coordinator's durable state and the interface that keeps them (`CoordinatorState`).

`fedcybgd.server.state.SqliteState` implements the interface; the rows here are what its methods take and give.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedcybgd.server.records import VisitStats
from fedcybgd.server.visit_totals import VisitTotals


@dataclass(frozen=True)
class ClientRow:
    id: str
    name: str
    device_kind: str
    memory_bytes: int
    registered_unix: float
    last_seen_unix: float
    gpu_peak_allocated_bytes: int = 0
    gpu_peak_reserved_bytes: int = 0
    host_rss_bytes: int = 0
    checkpoint_above: bool = False  # recomputes activations above the block: changes its visits' memory
    compact_frozen: str = ""  # frozen decoder layers held quantized ("int8" | "nf4"): changes its visits' memory


@dataclass(frozen=True)
class TaskRow:
    id: str
    round: int
    block_index: int
    client_id: str
    base_version: int
    status: str
    issued_unix: float
    last_progress_unix: float
    finished_unix: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    slot: int = 0  # FedAvg-family strategies: which of the round's C tasks (block_index unused)


@dataclass(frozen=True)
class ContributionRow:
    """One client's upload to a FedAvg-family round, waiting for (or part of) the round's average."""

    task_id: str
    round: int
    slot: int
    client_id: str
    blobs: list[str]          # fedavg-full: one blob per block, in block order; fedlora: [adapter]
    committed_unix: float
    record: VisitStats


@dataclass(frozen=True)
class VisitRow:
    round: int
    task_id: str
    client_id: str
    block_index: int
    base_version: int
    new_version: int
    blob_sha256: str
    committed_unix: float
    record: VisitStats        # losses, memory, timings, bytes, lr, seed


class CoordinatorState(Protocol):
    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, values: dict[str, str]) -> None: ...
    def add_client(self, client: ClientRow, token_sha256: str) -> None: ...
    def client_by_token(self, token_sha256: str) -> ClientRow | None: ...
    def clients(self) -> list[ClientRow]: ...
    def touch_client(self, client_id: str, **resources: int) -> None: ...
    def add_version(self, version: int, manifest: list[str], round_: int | None, replace: bool = False) -> None: ...
    def latest_version(self) -> tuple[int, list[str]] | None: ...
    def manifest(self, version: int) -> list[str]: ...
    def issue_task(self, task: TaskRow) -> None: ...
    def task(self, task_id: str) -> TaskRow | None: ...
    def tasks_with_status(self, status: str) -> list[TaskRow]: ...
    def note_progress(self, task_id: str, *, bytes_down: int = 0, bytes_up: int = 0) -> None: ...
    def expire_task(self, task_id: str) -> bool: ...
    def commit_visit(self, visit: VisitRow, manifest: list[str]) -> None: ...
    def add_contribution(self, contribution: ContributionRow) -> None: ...
    def contributions(self, round_: int) -> list[ContributionRow]: ...
    def contribution_of_task(self, task_id: str) -> ContributionRow | None: ...
    def commit_merge(self, visit: VisitRow, manifest: list[str]) -> None: ...
    def visits(self) -> list[VisitRow]: ...
    def visit_of_task(self, task_id: str) -> VisitRow | None: ...
    def visits_page(self, before_round: int | None, limit: int) -> list[VisitRow]: ...
    def visit_of_version(self, version: int) -> VisitRow | None: ...
    def count_visits(self, up_to_version: int | None = None) -> int: ...
    def visit_totals(self) -> VisitTotals: ...
    def add_eval(self, version: int, rounds_done: int, loss: float) -> None: ...
    def evals(self) -> list[tuple[int, int, float]]: ...
    def newest_evals(self, limit: int) -> list[tuple[int, int, float]]: ...
    def first_eval(self) -> tuple[int, int, float] | None: ...
    def best_eval(self) -> tuple[int, int, float] | None: ...
    def kept_versions(self, since: int = 0) -> list[KeptVersion]: ...
    def held_by_active_clients(self, seen_since_unix: float) -> set[int]: ...
    def prune_versions(self, versions: list[int]) -> None: ...
    def pruned_pending(self) -> list[int]: ...
    def mark_blobs_deleted(self, versions: list[int]) -> None: ...
    def is_pruned(self, version: int) -> bool: ...
    def kept_neighbours(self, version: int) -> tuple[int | None, int | None]: ...
    def count_pruned(self) -> int: ...


@dataclass(frozen=True)
class KeptVersion:
    """A model version still on disk (not pruned by the retention rule) and its blob per block."""

    version: int
    manifest: list[str]


def current_version(state: CoordinatorState) -> tuple[int, list[str]]:
    """The newest version and its manifest, in a run that is open (it has version 0 at least)."""
    latest = state.latest_version()
    if latest is None:
        raise LookupError("no model version yet: the run was never initialised")
    return latest


class StaleTaskError(RuntimeError):
    """The task was expired or already completed; its upload must not be merged."""
