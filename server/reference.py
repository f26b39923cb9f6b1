"""A single-process reference of the block cycle: the correctness anchor of ALGORITHM.md.

One model in memory, no network, no storage, no serialization: the same schedule (blocks,
learning rates, seeds) and the same per-visit training as a federated run. A federated run with
the same data per visit must end with the same weights; any difference is a bug in transport,
storage or scheduling.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from fedcybgd.client.trainer import VisitHyper, train_block
from fedcybgd.common.blocks import partition_model
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig


def run_reference(model: PreTrainedModel, layers_per_block: int, schedule_config: ScheduleConfig,
                  training: TrainingConfig, data_of_round: Sequence[torch.Tensor]) -> PreTrainedModel:
    """Train `model` in place through every visit; `data_of_round[r]` is the data visit r used
    (in a federated run: the local data of the client that made visit r)."""
    specs = partition_model(model, layers_per_block)
    schedule = CycleSchedule(len(specs), schedule_config)
    if len(data_of_round) != schedule.total_rounds:
        raise ValueError(f"need data for {schedule.total_rounds} rounds, got {len(data_of_round)}")
    model.eval()
    for round_ in range(schedule.total_rounds):
        hyper = VisitHyper(lr=schedule.lr_of(round_), steps=training.local_steps, batch_size=training.batch_size,
                           seq_len=training.seq_len, seed=schedule.seed_of(round_), weight_decay=training.weight_decay,
                           max_grad_norm=training.max_grad_norm)
        train_block(model, specs[schedule.block_of(round_)], data_of_round[round_], hyper)
    return model
