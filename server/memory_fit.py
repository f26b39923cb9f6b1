"""Memory-aware scheduling: which blocks' visits a client can hold.

A client says at registration how much memory it can train in (`ClientRow.memory_bytes`: GPU memory on CUDA,
available host memory on CPU) and what changes a visit's memory besides the run's settings: its device type
and `checkpoint_above`. The memory planner (`fedcybgd.training.planner.plan_visits`) predicts the peak of every
block's visit for such a profile by running the visit on the meta device; `MemoryFit` asks it once per distinct
profile, keeps the answer, and tells the task board whether a client holds a block's visit (`fits`), which
visit of the run is the smallest for it (`smallest_visit`), and the words a client or an operator is told.

Why a part of its own: predicting is slow (a fraction of a second per block), so it runs once per profile and
outside the scheduling lock (`prepare`; `warm` starts it at enrolment), while the question asked under the lock
(`fits`) is a table lookup. The strategy never sees memory: the board hands its `next_opening` a predicate
(block index -> can this client hold it), so a sequential cycle waits for a client that fits and a parallel one
picks another open block.

No constraint (every block fits) when:

- the client's memory is unknown (`memory_bytes == 0`: older clients);
- the run has no predictor: its strategy's tasks are not block visits (`Strategy.memory_planned` is false:
  fedavg-full and fedlora train the whole model or an adapter, which the planner does not simulate);
- the task trains the whole model (block index `ALL_BLOCKS`);
- the planner cannot simulate this profile or model (logged once; scheduling then behaves as before). A
  profile with `checkpoint_above` it cannot simulate gets the predictions without it, an upper bound.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedcybgd.common.modeling import DTYPES, config_from_json
from fedcybgd.server.records import ALL_BLOCKS
from fedcybgd.server.state import ClientRow
from fedcybgd.training.planner import PlanSettings, plan_visits

if TYPE_CHECKING:
    from fedcybgd.server.config import TrainingConfig
    from fedcybgd.server.run import RunInfo

log = logging.getLogger("fedcybgd.coordinator")


@dataclass(frozen=True)
class MemoryProfile:
    """What changes a visit's memory on a client, besides the run's own settings: the device type ("cpu",
    "cuda": the part of `device_kind` before the colon) and whether it recomputes activations above the block."""

    device_type: str
    checkpoint_above: bool
    compact_frozen: str = ""  # frozen decoder layers held quantized ("int8" | "nf4"; "": exact)

    @classmethod
    def of(cls, client: ClientRow) -> MemoryProfile:
        return cls(device_type=client.device_kind.split(":", 1)[0].strip().lower() or "cpu",
                   checkpoint_above=client.checkpoint_above, compact_frozen=client.compact_frozen)

    def describe(self) -> str:
        return (f"{self.device_type}, checkpoint_above {'on' if self.checkpoint_above else 'off'}, frozen layers "
                f"{self.compact_frozen or 'exact'}")


@dataclass(frozen=True)
class PredictedVisit:
    """One block's visit for one profile: the block and the predicted peak of the visit's memory."""

    block_index: int
    block: str
    peak_bytes: int


#: Predictions for a profile: one visit per block, in partition order. Production: `PlannerPredictor`; a test
#: may hand `MemoryFit` a table instead.
Predictor = Callable[[MemoryProfile], list[PredictedVisit]]


class PlannerPredictor:
    """The memory planner's predictions for this run: its model config, partition (`layers_per_block`, the
    resolved block bound), exchange dtype, the visit's batch shape (`TrainingConfig`) and whether visits run
    DP-SGD (`private`)."""

    def __init__(self, config_json: str, run: RunInfo, layers_per_block: int, training: TrainingConfig,
                 private: bool = False, block_layout: str = "contiguous") -> None:
        self._block_layout = block_layout
        self._private = private  # record-level DP-SGD: one row backpropagated at a time, fp32 gradient sums
        self._config_json = config_json
        self._run = run
        self._layers_per_block = layers_per_block
        self._training = training

    def __call__(self, profile: MemoryProfile) -> list[PredictedVisit]:
        run, training = self._run, self._training
        settings = PlanSettings(batch_size=training.batch_size, seq_len=training.seq_len, dtype=DTYPES[run.dtype],
                                device_type=profile.device_type, checkpoint_above=profile.checkpoint_above,
                                compact_frozen=profile.compact_frozen or None,
                                layers_per_block=self._layers_per_block, block_layout=self._block_layout,
                                max_block_params=run.max_block_params,  # resolved: 0 is "no bound", as clients
                                privacy=self._private)
        plans = plan_visits(config_from_json(self._config_json), settings)
        names = [spec.name for spec in run.specs]
        if [p.block for p in plans] != names:
            raise ValueError(f"the planner's blocks {[p.block for p in plans][:4]}... are not the run's "
                             f"{names[:4]}... ({len(plans)} vs {len(names)})")
        return [PredictedVisit(block_index=p.index, block=p.block, peak_bytes=int(p.peak_bytes)) for p in plans]


class MemoryFit:
    """Per-profile predictions, computed once (the first caller computes, callers of the same profile wait for
    it, other profiles go on), and the answers the task board and the status report need."""

    def __init__(self, predict: Predictor | None) -> None:
        self._predict = predict
        self._index_lock = threading.Lock()
        self._profile_locks: dict[MemoryProfile, threading.Lock] = {}
        self._predicted: dict[MemoryProfile, list[PredictedVisit] | None] = {}  # None: the planner failed

    # -- predictions -----------------------------------------------------------------------------
    def constrains(self, client: ClientRow) -> bool:
        """Whether this client's memory limits what it gets at all (known memory, a run with a predictor)."""
        return self._predict is not None and client.memory_bytes > 0

    def prepare(self, client: ClientRow) -> None:
        """Compute this client's predictions if they are not known yet. Slow the first time per profile: call
        it outside the scheduling lock, so that `fits` under the lock only looks them up."""
        if self.constrains(client):
            self._predictions(MemoryProfile.of(client))

    def warm(self, client: ClientRow) -> None:
        """`prepare` in the background (at enrolment): the client's first GetTask finds the answer ready."""
        if not self.constrains(client):
            return
        profile = MemoryProfile.of(client)
        with self._index_lock:
            if profile in self._predicted or profile in self._profile_locks:
                return
        # Not a daemon thread: it ends by itself, and a thread still inside torch when the interpreter exits
        # would abort the process.
        threading.Thread(target=self._predictions, args=(profile,), name="memory-fit", daemon=False).start()

    def predictions(self, client: ClientRow) -> list[PredictedVisit] | None:
        """Every block's predicted visit for this client, or None when its memory is not constrained."""
        return self._predictions(MemoryProfile.of(client)) if self.constrains(client) else None

    def _predictions(self, profile: MemoryProfile) -> list[PredictedVisit] | None:
        with self._index_lock:
            if profile in self._predicted:
                return self._predicted[profile]
            profile_lock = self._profile_locks.setdefault(profile, threading.Lock())
        with profile_lock:
            with self._index_lock:
                if profile in self._predicted:  # computed while we waited for it
                    return self._predicted[profile]
            predicted = self._compute(profile)
            with self._index_lock:
                self._predicted[profile] = predicted
                self._profile_locks.pop(profile, None)
            return predicted

    def _compute(self, profile: MemoryProfile) -> list[PredictedVisit] | None:
        assert self._predict is not None
        try:
            visits = self._predict(profile)
        except Exception as exc:  # noqa: BLE001 - a planner that cannot predict must not stop the run
            if profile.checkpoint_above or profile.compact_frozen:
                # Both options only lower a visit's peak: the plain visit's prediction is a safe upper bound.
                log.warning("memory planner: no prediction for %s (%s: %s); using the plain visits' instead",
                            profile.describe(), type(exc).__name__, exc)
                return self._predictions(MemoryProfile(profile.device_type, checkpoint_above=False))
            log.warning("memory planner: no prediction for %s (%s: %s); clients of this profile are not "
                        "constrained by memory", profile.describe(), type(exc).__name__, exc)
            return None
        if visits:
            small, large = min(visits, key=_peak), max(visits, key=_peak)
            log.info("memory planner (%s): visits peak from %s (%s) to %s (%s)", profile.describe(),
                     format_bytes(small.peak_bytes), small.block, format_bytes(large.peak_bytes), large.block)
        return visits

    # -- answers -----------------------------------------------------------------------------------
    def fits(self, client: ClientRow, block_index: int) -> bool:
        """Whether the client is predicted to hold the visit of this block (True when unconstrained, and for a
        whole-model task)."""
        visit = self._visit(client, block_index)
        return visit is None or visit.peak_bytes <= client.memory_bytes

    def smallest_visit(self, client: ClientRow) -> PredictedVisit | None:
        """The visit of the run with the smallest predicted peak for this client (None: unconstrained)."""
        visits = self.predictions(client)
        return min(visits, key=_peak) if visits else None

    def fitting_blocks_now(self, client: ClientRow, num_blocks: int) -> int | None:
        """How many of the run's blocks this client holds (all of them when unconstrained), without waiting: None
        while its predictions are still being computed (the planner can take minutes on a large model; the status
        report must not wait for it)."""
        if not self.constrains(client):
            return num_blocks
        with self._index_lock:
            profile = MemoryProfile.of(client)
            if profile not in self._predicted:
                return None
            visits = self._predicted[profile]
        return num_blocks if not visits else sum(1 for v in visits if v.peak_bytes <= client.memory_bytes)

    def too_small_for(self, client: ClientRow, block_index: int) -> str:
        """Why a client waits instead of training this block (the Wait's reason)."""
        visit = self._visit(client, block_index)
        if visit is None:
            return ""
        return (f"waiting for memory: block {visit.block} is predicted to peak at {format_bytes(visit.peak_bytes)}, "
                f"this client has {format_bytes(client.memory_bytes)}; it is left to a client with more")

    def holds_nothing(self, client: ClientRow) -> str | None:
        """Why this client can take no part in the run (no block's visit fits its memory), or None if it can.
        Waiting would not help: its memory does not grow."""
        smallest = self.smallest_visit(client)
        if smallest is None or smallest.peak_bytes <= client.memory_bytes:
            return None
        return (f"this client's memory ({format_bytes(client.memory_bytes)}) holds no block of the run: the "
                f"smallest visit, block {smallest.block}, is predicted to peak at "
                f"{format_bytes(smallest.peak_bytes)} ({MemoryProfile.of(client).describe()}); "
                "give it more memory (--memory, another device) or turn on --checkpoint-above")

    def _visit(self, client: ClientRow, block_index: int) -> PredictedVisit | None:
        if block_index == ALL_BLOCKS:
            return None
        visits = self.predictions(client)
        return visits[block_index] if visits and 0 <= block_index < len(visits) else None


def _peak(visit: PredictedVisit) -> int:
    return visit.peak_bytes


def format_bytes(size: int) -> str:
    """A memory size for people, in binary units ("1.50 GiB")."""
    value, unit = float(size), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{size} B" if unit == "B" else f"{value:.2f} {unit}"
