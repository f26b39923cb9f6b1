"""The ServerApp: FedAvg over every connected SuperNode for the job's rounds, then the final model to disk.

Outputs, in the job's ``out`` folder:

* ``rounds.json``, rewritten after every round: per round the wall seconds from ``configure_train`` to the end of
  ``aggregate_train`` (sending, the clients' training, receiving and averaging), the number of replies and their
  mean training loss. bench/flower_run.py watches it for progress.
* ``final.safetensors``: the final global model as a full state dict in the stored dtypes (for "lora": the averaged
  adapter merged into the base weights), so that one evaluation code loads the results of both modes.
* ``done.json``, written last: the run finished and its outputs are complete.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord  # type: ignore[import-not-found]
from flwr.serverapp import Grid, ServerApp  # type: ignore[import-not-found]
from flwr.serverapp.strategy import FedAvg  # type: ignore[import-not-found]

from .task import Job, attach_lora, load_job, load_model, merged_state_dict, set_threads, trainable_state

app = ServerApp()


def _write_json(path: Path, value: Any) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


class TimedFedAvg(FedAvg):
    """FedAvg that times each round and refuses a round that lost a client (a benchmark must not go on with fewer
    clients than it claims)."""

    def __init__(self, out: Path, clients: int) -> None:
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=clients, min_evaluate_nodes=0,
                         min_available_nodes=clients)
        self.out = out
        self.clients = clients
        self.rounds: list[dict[str, Any]] = []
        self._started = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        good = [r for r in replies if not r.has_error() and r.has_content()]
        if len(good) < self.clients:
            errors = [str(r.error) for r in replies if r.has_error()]
            raise RuntimeError(f"round {server_round}: {len(good)} of {self.clients} clients replied: {errors}")
        aggregated = super().aggregate_train(server_round, good)
        losses = [float(r.content["metrics"]["train-loss"]) for r in good]
        self.rounds.append({"round": server_round, "seconds": time.perf_counter() - self._started,
                            "replies": len(good), "train_loss": sum(losses) / len(losses)})
        _write_json(self.out / "rounds.json", {"rounds": self.rounds})
        return aggregated


def _final_state(job: Job, final: ArrayRecord, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    state = final.to_torch_state_dict()
    if job.mode == "lora":
        return merged_state_dict(job, state, dtypes)
    return {name: t.to(dtypes[name], copy=True).contiguous() for name, t in state.items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the job's FedAvg rounds and write the outputs."""
    job = load_job(context.run_config)
    set_threads(job)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(job)
    dtypes = {name: t.dtype for name, t in model.state_dict().items()}
    if job.mode == "lora":
        model = attach_lora(model, job)
    initial = ArrayRecord(trainable_state(model, job))
    del model

    strategy = TimedFedAvg(out, clients=len(job.data))
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=job.rounds, timeout=job.round_timeout)

    tmp = out / "final.safetensors.tmp"
    safetensors.torch.save_file(_final_state(job, result.arrays, dtypes), str(tmp))
    os.replace(tmp, out / "final.safetensors")
    _write_json(out / "done.json", {"rounds": strategy.rounds, "mode": job.mode})
