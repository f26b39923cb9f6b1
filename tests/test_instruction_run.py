"""Instruction tuning of a base model over gRPC: a tiny model whose tokenizer has no chat template, instruction JSON
lines (with some chats and plain text) on two client processes, in the default (Alpaca) format and in a user's Jinja
template, loss on the responses only.

What must hold: the coordinator fixes the format; every client formats and labels its records exactly as the
coordinator would (their tokenised caches equal the coordinator's packing of the same files); the run ends with the
weights of the single-process reference on the same labelled data, bit for bit; and a restarted client takes its
tokenised data from its cache instead of tokenising again.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import (
    Coordinators,
    address_of,
    assert_matches_reference,
    wait_clients,
    wait_for,
    write_instruction_data,
)
from fedcybgd.common.data import load_packed
from fedcybgd.server.config import EvalConfig, PromptConfig, TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess

SCHEDULE = ScheduleConfig(cycles=1, order="random", lr=3e-3, seed=5)
TRAINING = TrainingConfig(local_steps=2, batch_size=2, seq_len=64)
#: A user's own template (any layout works; this one marks turns with tags).
USER_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module", params=["auto", "user-template"])
def finished_run(request, base_model_dir, tmp_path_factory, module_clients) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp(f"instruction-{request.param}")
    data, eval_data = write_instruction_data(tmp, clients=2)
    fmt = "auto"
    if request.param == "user-template":
        (tmp / "turns.jinja").write_text(USER_TEMPLATE)
        fmt = str(tmp / "turns.jinja")
    coordinators = Coordinators(base_model_dir, tmp)
    try:
        running = coordinators.start(
            schedule=SCHEDULE, training=TRAINING, grace=1, prompt=PromptConfig(format=fmt),
            eval=EvalConfig(data=str(eval_data), max_sequences=8, batch_size=4, every_cycle=True))
        address = address_of(running)
        caches = [tmp / "caches" / f"site-{i}" for i in range(2)]
        # Each site visits once and stops; site-0 is started again and finishes the run: its second start must
        # take its data from its tokenised cache.
        wait_clients([module_clients.start(address, data[i], caches[i], f"site-{i}", "--max-visits", "1")
                      for i in range(2)])
        wait_clients([module_clients.start(address, data[0], caches[0], "site-0")])
        coordinator = running.coordinator
        wait_for(lambda: coordinator.finished, 60, "the final evaluation")
        yield {"tmp": tmp, "model_dir": base_model_dir, "data": data, "eval_data": eval_data,
               "coordinator": coordinator, "caches": caches,
               "status": coordinator.status(pb.GetStatusRequest()), "format": request.param}
    finally:
        coordinators.close()


def test_the_coordinator_fixes_the_format(finished_run):
    prompt = finished_run["coordinator"].run.prompt
    if finished_run["format"] == "auto":
        assert prompt.name == "alpaca"  # a base model: no chat template, the documented default
    else:
        assert prompt.name == "turns.jinja" and prompt.template == USER_TEMPLATE
    assert prompt.train_on == "responses"


def test_clients_format_and_label_records_as_the_coordinator_does(finished_run):
    coordinator = finished_run["coordinator"]
    tokenizer = coordinator.store.tokenizer()
    for data, cache in zip(finished_run["data"], finished_run["caches"], strict=True):
        expected = load_packed(data, tokenizer, TRAINING.seq_len, coordinator.run.prompt)
        assert expected.labels is not None, "instruction data must carry labels"
        (entry,) = (cache / "tokenised").glob("*.safetensors")
        cached = safetensors.torch.load_file(str(entry))
        assert torch.equal(cached["ids"], expected.ids) and torch.equal(cached["labels"], expected.labels)
        text = tokenizer.decode(expected.ids[:8].flatten())
        assert ("### Instruction:" in text) == (finished_run["format"] == "auto")
        assert ("<user>" in text) == (finished_run["format"] == "user-template")


def test_federated_weights_equal_the_reference_on_the_labelled_data(finished_run):
    coordinator = finished_run["coordinator"]
    assert finished_run["status"].run_state == "done"
    visits = sorted(finished_run["status"].visits, key=lambda v: v.round)
    data_of_client = {f"site-{i}": p for i, p in enumerate(finished_run["data"])}
    _, manifest = coordinator.state.latest_version()
    assert_matches_reference(finished_run["model_dir"], SCHEDULE, TRAINING,
                             [data_of_client[v.client_name] for v in visits], manifest, coordinator.store.blobs.path,
                             prompt=coordinator.run.prompt)
    evals = {e.version: e.loss for e in finished_run["status"].evals}
    assert math.isfinite(evals[0]) and evals[finished_run["status"].version] < evals[0]


def test_a_restarted_client_reuses_its_tokenised_data(finished_run):
    log = (Path(finished_run["caches"][0]).parent / "site-0.log").read_text()
    tokenised = log.count("documents of")
    reused = log.count("from the tokenised cache")
    assert tokenised == 1 and reused == 1, log[-3000:]
