"""The ClientApp: local training of the received model (or LoRA adapter) on this SuperNode's partition.

Written as a Flower user would: the model is built from the Hugging Face directory for each message, the received
``ArrayRecord`` is set into it, and the reply carries ``ArrayRecord`` of the trained float32 tensors (numpy, through
which ``ArrayRecord`` serialises, has no bfloat16) and a ``MetricRecord`` with ``num-examples`` for FedAvg's weights.
"""
from __future__ import annotations

import time

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # type: ignore[import-not-found]
from flwr.clientapp import ClientApp  # type: ignore[import-not-found]

from .task import (
    attach_lora,
    load_job,
    load_model,
    load_rows,
    load_trainable,
    set_threads,
    train_local,
    trainable_state,
)

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training."""
    start = time.perf_counter()
    job = load_job(context.run_config)
    set_threads(job)
    partition_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])

    model = load_model(job)
    if job.mode == "lora":
        model = attach_lora(model, job)
    load_trainable(model, job, msg.content["arrays"].to_torch_state_dict())

    input_ids, labels = load_rows(job, partition_id)
    loss = train_local(model, job, input_ids, labels, seed=job.seed + server_round + partition_id)

    arrays = ArrayRecord(trainable_state(model, job))
    metrics = MetricRecord({"num-examples": job.local_steps * job.batch_size, "train-loss": loss,
                            "client-seconds": time.perf_counter() - start})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
