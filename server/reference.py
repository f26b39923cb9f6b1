"""Single-process references: the correctness anchor (docs/design.md, "Correctness anchor"), and
the centralized baselines a federated run is compared with.

``run_reference``: one model in memory, no network, no storage, no serialization: the same
schedule (blocks, learning rates, seeds) and the same per-visit training as a federated run. A
federated run with the same data per visit must end with the same weights; any difference is a
bug in transport, storage or scheduling.

Centralized baselines on the same step budget and tokens per step as a FedCyBGD run with a given
schedule (``schedule.total_rounds`` visits of ``training.local_steps`` steps of
``training.batch_size`` rows of ``training.seq_len`` tokens), all data pooled in one process:

* ``run_centralized_full``: full fine-tuning, one AdamW over every parameter for the whole run;
  step ``s`` uses the learning rate of the visit it corresponds to, ``schedule.lr_of(s //
  local_steps)``, so both runs follow the same learning-rate curve over the same tokens count.
* ``run_block_cyclic``: BAdam-style block-cyclic training: the blocks in the schedule's order, each
  for ``local_steps`` steps with a fresh AdamW at the visit's learning rate. It is the federated
  run's own visit code with every visit given the pooled data (one client holding everything), so
  its gap to a federated run isolates the effect of the data split.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn
from transformers import PreTrainedModel

from fedcybgd.common.blocks import BlockSpec
from fedcybgd.common.partition import partition_model
from fedcybgd.common.sequences import SequencesLike
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
from fedcybgd.training import VisitHyper, VisitResult, train_block, train_full

__all__ = ["run_reference", "run_block_cyclic", "run_centralized_full", "lr_of_step", "visit_hyper"]

#: on_visit(round, block spec, result of the visit)
OnVisit = Callable[[int, BlockSpec, VisitResult], None]


def visit_hyper(schedule: CycleSchedule, training: TrainingConfig, round_: int) -> VisitHyper:
    """The hyper-parameters of visit ``round_`` (what the coordinator sends with the task)."""
    return training.visit_hyper(schedule.lr_of(round_), schedule.seed_of(round_))


def run_reference(model: PreTrainedModel, layers_per_block: int, schedule_config: ScheduleConfig,
                  training: TrainingConfig, data_of_round: Sequence[SequencesLike], *,
                  on_visit: OnVisit | None = None, max_block_params: int | None = None,
                  compact_frozen: str | None = None, block_layout: str = "contiguous") -> PreTrainedModel:
    """Train `model` in place through every visit; `data_of_round[r]` is the data visit r used
    (in a federated run: the local data of the client that made visit r). The blocks are
    ``partition_model(model, layers_per_block, max_block_params, block_layout)``, as the run's. ``compact_frozen``: the
    visits hold their frozen layers quantized (``train_block``); the frozen weights are put back exact after
    each visit, as the client reloads them."""
    specs = partition_model(model, layers_per_block, max_block_params, block_layout)
    schedule = CycleSchedule.for_blocks(specs, schedule_config)
    if len(data_of_round) != schedule.total_rounds:
        raise ValueError(f"need data for {schedule.total_rounds} rounds, got {len(data_of_round)}")
    model.eval()
    for round_ in range(schedule.total_rounds):
        spec = specs[schedule.block_of(round_)]
        exact = _frozen_copy(model, spec) if compact_frozen is not None else {}
        result = train_block(model, spec, data_of_round[round_], visit_hyper(schedule, training, round_),
                             compact_frozen=compact_frozen)
        with torch.no_grad():
            for name, value in exact.items():
                model.get_parameter(name).copy_(value)
        if on_visit is not None:
            on_visit(round_, spec, result)
    return model


def run_block_cyclic(model: PreTrainedModel, sequences: SequencesLike, layers_per_block: int,
                     schedule_config: ScheduleConfig, training: TrainingConfig, *,
                     on_visit: OnVisit | None = None, max_block_params: int | None = None,
                     compact_frozen: str | None = None, block_layout: str = "contiguous") -> PreTrainedModel:
    """Block-cyclic training in one process on the pooled ``sequences`` ``[n, seq_len]``: every
    visit of the schedule trains its block for ``training.local_steps`` steps with a fresh AdamW
    (BAdam's scheme, with the schedule's block order, learning rates and per-visit data seeds)."""
    rounds = CycleSchedule.for_blocks(partition_model(model, layers_per_block, max_block_params, block_layout),
                                      schedule_config).total_rounds
    return run_reference(model, layers_per_block, schedule_config, training, [sequences] * rounds,
                         on_visit=on_visit, max_block_params=max_block_params, compact_frozen=compact_frozen,
                         block_layout=block_layout)


def _frozen_copy(model: nn.Module, spec: BlockSpec) -> dict[str, torch.Tensor]:
    """Copies of the parameters a ``compact_frozen`` visit of ``spec`` approximates (the other blocks')."""
    own = set(spec.names)
    return {name: p.detach().clone() for name, p in model.named_parameters() if name not in own}


def lr_of_step(schedule: CycleSchedule, local_steps: int, step: int) -> float:
    """Learning rate of centralized step ``step``: that of the visit whose local steps it stands
    for (the last visit's for steps past the schedule)."""
    if local_steps < 1 or step < 0:
        raise ValueError("local_steps must be >= 1 and step >= 0")
    return schedule.lr_of(min(step // local_steps, schedule.total_rounds - 1))


def run_centralized_full(model: nn.Module, sequences: SequencesLike, training: TrainingConfig,
                         schedule: CycleSchedule, *, total_steps: int | None = None, eval_batches: int = 2,
                         on_step: Callable[[int, float], None] | None = None) -> VisitResult:
    """Full fine-tuning of ``model`` in place on the pooled ``sequences`` ``[n, seq_len]``: one AdamW
    over every parameter (fp32 masters for bf16/fp16 weights) for ``total_steps`` steps (default:
    the FedCyBGD run's budget, ``schedule.total_rounds * training.local_steps``), batches of
    ``training.batch_size`` rows drawn by one seeded walk over the data (epochs of a random
    permutation; seed ``schedule.config.seed``), learning rate ``lr_of_step``.

    Returns the run as one long visit: loss on its first ``eval_batches`` batches before and after,
    all weights (``train_full``'s ``tensors``), peak memory, seconds, samples and tokens.
    """
    steps = schedule.total_rounds * training.local_steps if total_steps is None else total_steps
    hyper = replace(training.visit_hyper(schedule.lr_of(0), schedule.config.seed), steps=steps,
                    eval_batches=eval_batches)
    return train_full(model, sequences, hyper, on_step=on_step,
                      lr_at=lambda step: lr_of_step(schedule, training.local_steps, step))
