"""Held-out evaluation on the coordinator, in a thread of its own: the base model at start, a
version after each cycle's worth of training (when configured), and the final version.

The version with the lowest held-out loss so far is kept on disk whatever the retention rule says (`retained`), so
that a user who stops early (``fedcybgd export --best``) finds it: past about one pass over the sites' data a run
can overfit, and its best version is then not its last."""
from __future__ import annotations

import logging
import queue
import threading

from fedcybgd.common.data import load_packed
from fedcybgd.common.eval import evaluate_loss, spread_sample
from fedcybgd.common.sequences import Sequences
from fedcybgd.server.config import EvalConfig
from fedcybgd.server.history import CompletedRounds
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.model_store import ModelStore
from fedcybgd.server.run import RunInfo
from fedcybgd.server.state import CoordinatorState, current_version
from fedcybgd.server.strategies import Strategy

log = logging.getLogger("fedcybgd.coordinator")


class Evaluator:
    def __init__(self, config: EvalConfig, seq_len: int, state: CoordinatorState, store: ModelStore, run: RunInfo,
                 strategy: Strategy, rounds: CompletedRounds, metrics: CoordinatorMetrics,
                 clients_per_round: int) -> None:
        self._config = config
        self._clients_per_round = clients_per_round
        self._state = state
        self._store = store
        self._run = run
        self._strategy = strategy
        self._rounds = rounds
        self._metrics = metrics
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._pending: set[int] = set()  # queued or being evaluated: retention keeps them (`pending`)
        self._pending_lock = threading.Lock()
        best = state.best_eval()
        self._best = (best[0], best[2]) if best is not None else None  # (version, loss) of the lowest loss so far
        if not config.data:
            raise ValueError("evaluation needs held-out data (eval.data)")
        sequences = load_packed(config.data, store.tokenizer(), seq_len, run.prompt, config.record_options)
        self._sequences: Sequences = spread_sample(sequences, config.max_sequences)
        self._thread = threading.Thread(target=self._loop, name="evaluator", daemon=True)

    def start(self) -> None:
        """Evaluate what a restarted run has not evaluated yet: the base, and the final version."""
        evaluated = {v for v, _, _ in self._state.evals()}
        latest, _ = current_version(self._state)
        self._thread.start()
        for version in (0, latest) if self._rounds.all_done else (0,):
            if version not in evaluated:
                self._enqueue(version)

    def version_committed(self, version: int) -> None:
        """Queue an evaluation after each cycle's worth of training (and at the end of the run)."""
        per_round = self._strategy.tasks_per_round(self._clients_per_round)
        done, before = self._rounds.count * per_round, (self._rounds.count - 1) * per_round
        blocks = len(self._run.specs)
        if self._rounds.all_done or (self._config.every_cycle and done // blocks > before // blocks):
            self._enqueue(version)

    def _enqueue(self, version: int) -> None:
        with self._pending_lock:
            self._pending.add(version)
        self._queue.put(version)

    def pending(self) -> frozenset[int]:
        """The versions waiting for (or in) evaluation: they must stay on disk until it is done."""
        with self._pending_lock:
            return frozenset(self._pending)

    def retained(self) -> frozenset[int]:
        """What retention must keep for evaluation's sake: the pending versions and the best one evaluated so far
        (a version is pending until its loss is recorded, and becomes the best before it stops being pending)."""
        with self._pending_lock:
            best = {self._best[0]} if self._best is not None else set()
            return frozenset(self._pending | best)

    def evaluate(self, version: int) -> float:
        """Held-out loss of one model version."""
        model = self._store.build_model(self._run.specs, self._state.manifest(version), self._run.dtype)
        self._strategy.finish_model(model, version)
        return evaluate_loss(model, self._sequences, self._config.batch_size)

    def _loop(self) -> None:
        while (version := self._queue.get()) is not None:
            try:
                loss = self.evaluate(version)
                rounds = self._state.count_visits(up_to_version=version)
                self._state.add_eval(version, rounds, loss)
                with self._pending_lock:
                    if self._best is None or loss < self._best[1]:
                        self._best = (version, loss)
                self._metrics.eval_loss.set(loss)
                log.info("held-out loss of version %d (after %d rounds): %.4f", version, rounds, loss)
            except Exception:
                log.exception("evaluation of version %d failed", version)
            finally:
                with self._pending_lock:
                    self._pending.discard(version)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

