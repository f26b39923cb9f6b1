"""A federated run whose vocabulary blocks are row ranges, over gRPC with real client processes: it ends with the
weights of its single-process reference, bit for bit, and exports a model whose loss is the coordinator's. Its
embed/head blocks join every second cycle (``embed_head_every``), as the reference's."""
from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import address_of, assert_matches_reference, wait_clients, wait_for, write_data
from fedcybgd.common.data import load_packed
from fedcybgd.common.eval import evaluate_loss, spread_sample
from fedcybgd.common.modeling import specs_from_json
from fedcybgd.common.tiny import write_tiny_model_dir
from fedcybgd.server.config import EvalConfig, TrainingConfig
from fedcybgd.server.export import export_version
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess

SCHEDULE = ScheduleConfig(cycles=2, order="random", lr=3e-3, lr_schedule="cosine", warmup_visits=1, seed=5,
                          embed_head_every=2)
TRAINING = TrainingConfig(local_steps=2, batch_size=2, seq_len=48)
BOUND = 3000  # the tiny models' 259 x 64 embedding and head become 6 row ranges of 43-44 rows each


def test_sliced_run_equals_its_reference_and_exports(tmp_path, coordinators, clients):
    model_dir = write_tiny_model_dir(tmp_path / "tiny-mistral", arch="mistral", seed=1)  # untied embedding, head
    data, eval_data = write_data(tmp_path, clients=2)
    running = coordinators.start(model=str(model_dir), state_dir=str(tmp_path / "state"), schedule=SCHEDULE,
                                 training=TRAINING, max_block_params=BOUND,
                                 eval=EvalConfig(data=str(eval_data), max_sequences=8, batch_size=4))
    coordinator = running.coordinator
    specs = specs_from_json(coordinator.state.get_meta("blocks") or "")
    sliced = [s for s in specs if s.sliced]
    assert {s.tensors[0].name for s in sliced} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert len(sliced) == 12 and all(s.numel <= BOUND for s in specs if not s.name.startswith("layers."))

    procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}")
             for i in range(2)]
    wait_clients(procs)
    wait_for(lambda: coordinator.finished, 60, "the final evaluation")
    status = coordinator.status(pb.GetStatusRequest())
    layer_blocks = sum(s.name.startswith("layers.") for s in specs)
    assert status.run_state == "done" and len(status.visits) == layer_blocks + len(specs)  # cycle 1: layers only
    assert {v.block_index for v in status.visits if v.cycle == 0} == set(range(layer_blocks))
    for v in status.visits:  # a row-range visit uploads that range, not the matrix
        assert v.bytes_up < 1.05 * specs[v.block_index].nbytes + 4096

    visits = sorted(status.visits, key=lambda v: v.round)
    data_of_client = {f"site-{i}": p for i, p in enumerate(data)}
    _, manifest = coordinator.state.latest_version()
    assert_matches_reference(model_dir, SCHEDULE, TRAINING, [data_of_client[v.client_name] for v in visits],
                             manifest, coordinator.store.blobs.path, max_block_params=BOUND)

    out = export_version(coordinator.state_dir, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    sequences = spread_sample(load_packed(eval_data, AutoTokenizer.from_pretrained(str(out)), TRAINING.seq_len), 8)
    evals = {e.version: e.loss for e in status.evals}
    assert evaluate_loss(model, sequences, batch_size=4) == evals[status.version]
    assert evals[status.version] < evals[0]
