"""Run modes beyond the plain sequential run, end to end over gRPC with real client processes:

- parallel mode (`max_concurrent_visits=K`): at most K visits in flight, never two on one block,
  every block still trained exactly once per cycle, every upload merged;
- clients holding the base weights locally (`--base-model`) download only what changed;
- a client daemon stopped and started again on the same cache keeps its identity and its blobs.
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict

import pytest

from conftest import ClientProcesses, Coordinators, address_of, wait_clients, wait_for, write_data
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess


def gate_first_tasks(coordinator, clients: int, timeout: float = 120.0) -> None:
    """Hold every GetTask until `clients` distinct clients have asked, then let them all through.

    Client processes start at different speeds (imports, cache seeding); without the gate the
    first one to be ready could take several visits before the others ask, which would make
    "two visits overlap" or "whose first visit is which round" a matter of luck.
    """
    original = coordinator.get_task
    arrived: set[str] = set()
    lock = threading.Lock()
    everyone = threading.Event()

    def gated(client, req):
        with lock:
            arrived.add(client.id)
            if len(arrived) >= clients:
                everyone.set()
        everyone.wait(timeout)
        return original(client, req)

    coordinator.get_task = gated  # the service looks the method up on the instance per call


def run_clients(running, procs, timeout: float = 180) -> pb.GetStatusResponse:
    wait_clients(procs, timeout=timeout)
    coordinator = running.coordinator
    wait_for(lambda: coordinator.finished, 30, "the run to finish")
    return coordinator.status(pb.GetStatusRequest())


# -- parallel mode ------------------------------------------------------------------------------

PARALLEL_K = 2
PARALLEL_SCHEDULE = ScheduleConfig(cycles=2, order="random", lr=3e-3, lr_schedule="cosine", warmup_visits=1, seed=11,
                                   embed_head_every=1)  # every block in every cycle: the tests count them
# 30 steps of 2x64 tokens: a visit lasts ~1 s of CPU, far longer than the 20 ms sampling period.
PARALLEL_TRAINING = TrainingConfig(local_steps=30, batch_size=2, seq_len=64)


class InFlightSampler(threading.Thread):
    """Samples the coordinator's issued tasks every 20 ms for the whole run."""

    def __init__(self, state) -> None:
        super().__init__(daemon=True, name="in-flight-sampler")
        self.state = state
        self.stop = threading.Event()
        self.samples: list[list[tuple[str, int, int]]] = []   # (task id, round, block) per sample
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.samples.append([(t.id, t.round, t.block_index) for t in self.state.tasks_with_status("issued")])
                time.sleep(0.02)
        except BaseException as exc:  # surfaced by the test
            self.error = exc


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory, module_coordinators: Coordinators, module_clients: ClientProcesses):
    tmp = tmp_path_factory.mktemp("parallel")
    data, _ = write_data(tmp, clients=3)
    running = module_coordinators.start(state_dir=str(tmp / "state"), max_concurrent_visits=PARALLEL_K,
                                        schedule=PARALLEL_SCHEDULE, training=PARALLEL_TRAINING, grace=1)
    sampler = InFlightSampler(running.coordinator.state)
    try:
        gate_first_tasks(running.coordinator, clients=PARALLEL_K)
        sampler.start()
        procs = [module_clients.start(address_of(running), data[i], tmp / "caches" / f"site-{i}", f"site-{i}")
                 for i in range(3)]
        status = run_clients(running, procs)
        sampler.stop.set()
        sampler.join(timeout=10)
        yield {"coordinator": running.coordinator, "status": status, "sampler": sampler}
    finally:
        sampler.stop.set()


def test_parallel_never_more_than_k_in_flight_nor_two_on_one_block(parallel_run):
    sampler = parallel_run["sampler"]
    assert sampler.error is None, f"sampling failed: {sampler.error!r}"
    assert len(sampler.samples) > 50, "the sampler should have watched the whole run"
    for sample in sampler.samples:
        assert len(sample) <= PARALLEL_K, f"more than {PARALLEL_K} visits in flight: {sample}"
        blocks = [block for _, _, block in sample]
        assert len(blocks) == len(set(blocks)), f"two visits in flight on the same block: {sample}"
    # Never two tasks on one round either (a round is one visit).
    for sample in sampler.samples:
        rounds = [r for _, r, _ in sample]
        assert len(rounds) == len(set(rounds)), sample


def test_parallel_visits_really_overlapped(parallel_run):
    """Parallel mode is exercised, not just configured: at least once K visits ran together."""
    samples = parallel_run["sampler"].samples
    assert max(len(s) for s in samples) == PARALLEL_K, "no two visits were ever in flight together"
    # Same fact from the durable record: a visit that started from a version older than the one
    # just before its own merged concurrently with another visit.
    visits = parallel_run["status"].visits
    assert any(v.base_version < v.new_version - 1 for v in visits)


def test_parallel_every_block_once_per_cycle_and_every_visit_merged(parallel_run):
    coordinator, status = parallel_run["coordinator"], parallel_run["status"]
    n = status.num_blocks
    assert status.run_state == "done"
    assert status.total_rounds == 2 * n == len(status.visits)
    visits = sorted(status.visits, key=lambda v: v.round)
    assert [v.round for v in visits] == list(range(2 * n))
    for cycle in range(2):
        blocks = [v.block_index for v in visits[cycle * n:(cycle + 1) * n]]
        assert sorted(blocks) == list(range(n)), f"cycle {cycle}: {blocks}"
        assert blocks == coordinator.schedule.block_order(cycle)
    assert sorted(v.new_version for v in visits) == list(range(1, 2 * n + 1))
    assert status.version == 2 * n
    assert all(v.base_version < v.new_version for v in visits)

    # Every task was merged: none expired, none left open, one task per round.
    state = coordinator.state
    assert state.tasks_with_status("issued") == []
    assert state.tasks_with_status("expired") == []
    done = state.tasks_with_status("done")
    assert sorted(t.round for t in done) == list(range(2 * n))

    # A block's second visit starts from a model that already holds its first visit, and the
    # final model holds the last visit of every block.
    by_block: dict[int, list] = defaultdict(list)
    for v in visits:
        by_block[v.block_index].append(v)
    _, final = state.latest_version()
    for block, vs in by_block.items():
        first, second = vs
        assert second.base_version >= first.new_version, f"block {block}: second visit overtook the first"
        assert final[block] == state.visit_of_task(second.task_id).blob_sha256
    assert {v.client_name for v in visits} <= {"site-0", "site-1", "site-2"}


def test_status_visit_records_carry_their_cycle(parallel_run):
    status = parallel_run["status"]
    assert [v.cycle for v in sorted(status.visits, key=lambda v: v.round)] == \
        [r // status.num_blocks for r in range(status.total_rounds)]


# -- base weights held locally ------------------------------------------------------------------

def test_clients_with_local_base_weights_download_only_what_changed(tiny_model_dir, tmp_path,
                                                                   coordinators: Coordinators,
                                                                   clients: ClientProcesses):
    # Descending order: round 0 trains embed_head (~10% of the tiny model), so whichever client
    # takes round 1 needs only that block; the other has every block of its base version already.
    schedule = ScheduleConfig(cycles=1, order="descending", lr=3e-3, seed=5)
    data, _ = write_data(tmp_path, clients=2)
    running = coordinators.start(schedule=schedule, training=TrainingConfig(local_steps=3, batch_size=2, seq_len=64),
                                 grace=1)
    coordinator = running.coordinator
    # Both clients ask before round 0 is issued: one takes round 0, the other waits in its
    # long poll and is woken by that commit, so the two first visits are rounds 0 and 1.
    gate_first_tasks(coordinator, clients=2)
    procs = [clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}",
                           "--base-model", str(tiny_model_dir)) for i in range(2)]
    status = run_clients(running, procs)
    base = set(coordinator.state.manifest(0))
    sizes = {sha: coordinator.store.blobs.size(sha) for v in range(status.version + 1)
             for sha in coordinator.state.manifest(v)}
    manifests = {v: coordinator.state.manifest(v) for v in range(status.version + 1)}

    assert status.run_state == "done"
    assert status.version == status.total_rounds == status.num_blocks == len(status.visits)
    visits = sorted(status.visits, key=lambda v: v.round)
    assert [v.new_version for v in visits] == list(range(1, len(visits) + 1))

    first_visits: dict[str, pb.VisitRecord] = {}
    for v in visits:
        first_visits.setdefault(v.client_id, v)
    assert len(first_visits) == 2, "both clients should have visited"
    assert sorted(v.round for v in first_visits.values()) == [0, 1]
    for v in first_visits.values():
        assert v.bytes_down < 0.2 * status.model_bytes, \
            f"{v.client_name}'s first visit (round {v.round}) downloaded {v.bytes_down} of {status.model_bytes} bytes"
    assert min(v.bytes_down for v in first_visits.values()) < 0.02 * status.model_bytes, \
        "round 0 needs the manifest only: every block is a base block"

    # Precisely: no visit ever downloads a base block; only blocks trained since, not yet held.
    held: dict[str, set[str]] = defaultdict(lambda: set(base))
    for v in visits:
        have = held[v.client_id]
        missing = {sha for sha in manifests[v.base_version] if sha not in have}
        assert not missing & base
        expected = sum(sizes[sha] for sha in missing)
        assert 0.5 * expected <= v.bytes_down <= 1.05 * expected + 8192, (v.round, v.bytes_down, expected)
        have |= set(manifests[v.base_version])
        have.add(manifests[v.new_version][v.block_index])


# -- a client daemon restarted on its cache ----------------------------------------------------

def test_restarted_client_reuses_its_identity_and_its_cached_blobs(tmp_path, coordinators: Coordinators,
                                                                   clients: ClientProcesses):
    schedule = ScheduleConfig(cycles=1, order="ascending", lr=3e-3, seed=2)
    data, _ = write_data(tmp_path, clients=1)
    cache = tmp_path / "caches" / "site-0"
    running = coordinators.start(schedule=schedule, training=TrainingConfig(local_steps=2, batch_size=2, seq_len=64),
                                 grace=1)
    coordinator = running.coordinator
    first = clients.start(address_of(running), data[0], cache, "site-0", "--max-visits", "1")
    wait_clients([first], timeout=120)   # exits 0 after its one visit
    assert len(coordinator.state.visits()) == 1
    identity = (cache / "identity.json").read_text()

    second = clients.start(address_of(running), data[0], cache, "site-0")
    status = run_clients(running, [second])
    registered = coordinator.state.clients()

    assert status.run_state == "done" and status.version == status.total_rounds == len(status.visits)
    # (a) one registered client: the second process rejoined with the identity in its cache.
    assert len(registered) == 1, [(c.id, c.name) for c in registered]
    assert {v.client_id for v in status.visits} == {registered[0].id}
    assert (cache / "identity.json").read_text() == identity
    log = (cache.parent / "site-0.log").read_text()
    assert f"rejoined as {registered[0].id}" in log

    # (b) the first process downloaded the model; the second held it all (base blocks + the
    # block it trained itself), so its first visit fetched the manifest only.
    visits = sorted(status.visits, key=lambda v: v.round)
    assert visits[0].bytes_down > 0.5 * status.model_bytes
    assert visits[1].bytes_down < 0.05 * status.model_bytes, \
        f"restarted client downloaded {visits[1].bytes_down} of {status.model_bytes} bytes again"
    assert all(v.bytes_down < 0.5 * status.model_bytes for v in visits[1:])
