"""Memory-aware scheduling (`fedcybgd.server.memory_fit`, the task board's use of it): a client is given only
blocks whose predicted visit fits the memory it announced; it waits, told why, for a block it cannot hold; it is
refused (RESOURCE_EXHAUSTED) when it holds no block of the run; unknown memory means no constraint.

The part and the coordinator's parts are tested with hand-written predictions handed to their constructor (the
`Predictor` boundary); the runs over gRPC with client processes use the real memory planner
(`fedcybgd.training.planner`) and pick the clients' memory from its predictions for the tiny model.
"""
from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import address_of, register, wait_clients, wait_for, write_data
from fedcybgd.client.config import ClientConfig, parse_size
from fedcybgd.client.daemon import ClientDaemon
from fedcybgd.common.modeling import DTYPES
from fedcybgd.server import messages
from fedcybgd.server.config import CoordinatorConfig, TrainingConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.enrolment import Enrolment
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.memory_fit import MemoryFit, MemoryProfile, PredictedVisit, Predictor, format_bytes
from fedcybgd.server.records import ALL_BLOCKS, VisitStats
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import ClientRow, SqliteState, TaskRow, VisitRow
from fedcybgd.server.tasks import TaskOffer
from fedcybgd.training.planner import PlanSettings, plan_model_dir_or_config, plan_visits
from fedcybgd.v1 import coordinator_pb2 as pb

MiB = 2**20
#: The tiny model's blocks (one decoder layer each, then the rest) and made-up peaks for the part's tests.
BLOCKS = ["layers.0", "layers.1", "layers.2", "layers.3", "embed_head"]
PEAKS = [500 * MiB, 400 * MiB, 300 * MiB, 200 * MiB, 450 * MiB]
CPU = MemoryProfile("cpu", checkpoint_above=False)


class Table:
    """A `Predictor` from a hand-written table (peaks per profile, or one list for every profile): counts the
    calls per profile; profiles in `failing` raise, as a planner that cannot simulate them would."""

    def __init__(self, peaks: list[int] | dict[MemoryProfile, list[int]], failing: tuple[MemoryProfile, ...] = (),
                 delay: float = 0.0) -> None:
        self.peaks = peaks
        self.failing = failing
        self.delay = delay
        self.calls: Counter[MemoryProfile] = Counter()
        self.on_call: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def __call__(self, profile: MemoryProfile) -> list[PredictedVisit]:
        with self._lock:
            self.calls[profile] += 1
        if self.on_call is not None:
            self.on_call()
        time.sleep(self.delay)
        if profile in self.failing:
            raise NotImplementedError(f"cannot simulate {profile}")
        peaks = self.peaks[profile] if isinstance(self.peaks, dict) else self.peaks
        return [PredictedVisit(i, name, peak) for i, (name, peak) in enumerate(zip(BLOCKS, peaks, strict=True))]


def client_row(memory: int, device_kind: str = "cpu", checkpoint_above: bool = False, id: str = "c-1",
               compact_frozen: str = "") -> ClientRow:
    return ClientRow(id=id, name=id, device_kind=device_kind, memory_bytes=memory, registered_unix=0.0,
                     last_seen_unix=0.0, checkpoint_above=checkpoint_above, compact_frozen=compact_frozen)


# -- the part ----------------------------------------------------------------------------------------

def test_a_client_fits_the_blocks_whose_predicted_peak_its_memory_holds():
    fit = MemoryFit(Table(PEAKS))
    small = client_row(350 * MiB)
    assert fit.fitting_blocks_now(small, len(BLOCKS)) is None, "not predicted yet"
    assert [fit.fits(small, i) for i in range(len(BLOCKS))] == [False, False, True, True, False]
    assert fit.fitting_blocks_now(small, len(BLOCKS)) == 2
    assert fit.smallest_visit(small) == PredictedVisit(3, "layers.3", 200 * MiB)
    assert fit.holds_nothing(small) is None
    reason = fit.too_small_for(small, 0)
    assert "layers.0" in reason and format_bytes(500 * MiB) in reason and format_bytes(350 * MiB) in reason
    exact = client_row(300 * MiB)  # a peak equal to the memory fits
    assert fit.fits(exact, 2) and not fit.fits(exact, 4)


def test_a_client_smaller_than_every_visit_is_told_the_smallest_one():
    fit = MemoryFit(Table(PEAKS))
    why = fit.holds_nothing(client_row(150 * MiB))
    assert why is not None
    assert "layers.3" in why and format_bytes(200 * MiB) in why and format_bytes(150 * MiB) in why


def test_unknown_memory_whole_model_tasks_and_runs_without_predictor_are_unconstrained():
    table = Table(PEAKS)
    fit = MemoryFit(table)
    unknown = client_row(0)
    assert all(fit.fits(unknown, i) for i in range(len(BLOCKS)))
    assert fit.holds_nothing(unknown) is None and fit.smallest_visit(unknown) is None
    assert fit.fitting_blocks_now(unknown, len(BLOCKS)) == len(BLOCKS)
    assert fit.fits(client_row(1), ALL_BLOCKS)  # fedavg-full / fedlora tasks: not predicted
    assert not table.calls, "nothing to predict for an unknown memory or a whole-model task"
    none = MemoryFit(None)
    assert none.fits(client_row(1), 0) and none.holds_nothing(client_row(1)) is None


def test_the_profile_is_the_device_type_and_the_checkpoint_option():
    assert MemoryProfile.of(client_row(1, device_kind="cuda:NVIDIA H100 80GB HBM3")) == MemoryProfile("cuda", False)
    assert MemoryProfile.of(client_row(1, checkpoint_above=True)) == MemoryProfile("cpu", True)
    assert MemoryProfile.of(client_row(1, device_kind="")) == CPU
    assert MemoryProfile.of(client_row(1, compact_frozen="nf4")) == MemoryProfile("cpu", False, "nf4")
    cuda = MemoryProfile("cuda", False)
    fit = MemoryFit(Table({CPU: PEAKS, cuda: [p // 10 for p in PEAKS]}))
    assert not fit.fits(client_row(100 * MiB), 3)
    assert fit.fits(client_row(100 * MiB, device_kind="cuda:A100"), 0)


def test_predictions_are_computed_once_per_profile_however_many_ask_at_once():
    table = Table(PEAKS, delay=0.2)
    fit = MemoryFit(table)
    clients = [client_row(350 * MiB, id=f"c-{i}", checkpoint_above=i % 2 == 1) for i in range(8)]
    threads = [threading.Thread(target=fit.prepare, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert table.calls == {CPU: 1, MemoryProfile("cpu", True): 1}
    fit.warm(clients[0])  # known: no new computation
    assert all(fit.fits(c, 3) for c in clients)
    assert table.calls == {CPU: 1, MemoryProfile("cpu", True): 1}


def test_warm_predicts_in_the_background():
    table = Table(PEAKS)
    fit = MemoryFit(table)
    fit.warm(client_row(350 * MiB))
    wait_for(lambda: table.calls[CPU] == 1, 10, "the background prediction")
    assert fit.fits(client_row(350 * MiB), 3) and table.calls[CPU] == 1


def test_a_profile_the_planner_cannot_simulate_is_unconstrained_or_falls_back_to_the_plain_visit():
    checkpointed = MemoryProfile("cpu", True)
    fit = MemoryFit(Table(PEAKS, failing=(checkpointed, MemoryProfile("cuda", False))))
    # checkpoint_above only lowers the peak: the plain visit's prediction bounds it.
    assert not fit.fits(client_row(350 * MiB, checkpoint_above=True), 0)
    assert fit.fits(client_row(350 * MiB, checkpoint_above=True), 3)
    # Nothing to fall back on: no constraint (the run goes on as without memory-aware scheduling).
    cuda = client_row(1, device_kind="cuda:A100")
    assert fit.fits(cuda, 0) and fit.holds_nothing(cuda) is None


# -- state and registration ---------------------------------------------------------------------------

def test_checkpoint_above_is_stored_with_the_client_and_added_to_an_older_database(tmp_path: Path):
    path = tmp_path / "state.sqlite"
    old = sqlite3.connect(path)  # the clients table as it was before the column
    old.executescript("""
        CREATE TABLE clients (id TEXT PRIMARY KEY, name TEXT NOT NULL, token_sha256 TEXT NOT NULL UNIQUE,
            device_kind TEXT NOT NULL, memory_bytes INTEGER NOT NULL, registered_unix REAL NOT NULL,
            last_seen_unix REAL NOT NULL, gpu_peak_allocated_bytes INTEGER NOT NULL DEFAULT 0,
            gpu_peak_reserved_bytes INTEGER NOT NULL DEFAULT 0, host_rss_bytes INTEGER NOT NULL DEFAULT 0);
        INSERT INTO clients (id, name, token_sha256, device_kind, memory_bytes, registered_unix, last_seen_unix)
            VALUES ('c-old', 'old', 'h-old', 'cpu', 1024, 1.0, 1.0);""")
    old.commit()
    old.close()
    state = SqliteState(path)
    try:
        assert state.client_by_token("h-old") == ClientRow(id="c-old", name="old", device_kind="cpu",
                                                           memory_bytes=1024, registered_unix=1.0, last_seen_unix=1.0)
        state.add_client(client_row(350 * MiB, checkpoint_above=True, id="c-new", compact_frozen="int8"), "h-new")
        new = state.client_by_token("h-new")
        assert new is not None and new.checkpoint_above is True and new.compact_frozen == "int8"
    finally:
        state.close()
    again = SqliteState(path)  # migrated once; opening again changes nothing
    try:
        assert sorted(c.id for c in again.clients()) == ["c-new", "c-old"]
    finally:
        again.close()


def test_the_register_request_carries_the_memory_profile():
    enrolment = messages.enrolment(pb.RegisterRequest(name="a", device_kind="cuda:A100", memory_bytes=24 * 2**30,
                                                      checkpoint_above=True, compact_frozen="nf4"))
    assert enrolment.checkpoint_above and enrolment.memory_bytes == 24 * 2**30 and enrolment.compact_frozen == "nf4"


# -- the coordinator's parts, without gRPC ------------------------------------------------------------

MakeCoordinator = Callable[..., Coordinator]


@pytest.fixture
def make_coordinator(tiny_model_dir: Path, tmp_path: Path) -> Iterator[MakeCoordinator]:
    """In-process coordinators on the tiny model (5 blocks, ascending order) with injected predictions."""
    made: list[Coordinator] = []

    def make(predictor: Predictor | None = None, **overrides: Any) -> Coordinator:
        values: dict[str, Any] = dict(insecure=True, model=str(tiny_model_dir),
                                      state_dir=str(tmp_path / f"state-{len(made)}"),
                                      schedule=ScheduleConfig(cycles=1, order="ascending"),
                                      training=TrainingConfig(local_steps=1, batch_size=1, seq_len=16))
        values.update(overrides)
        coordinator = Coordinator(CoordinatorConfig(**values), memory_predictor=predictor)
        assert [s.name for s in coordinator.run.specs] == BLOCKS
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        coordinator.close()


def enrol(coordinator: Coordinator, name: str, memory: int, checkpoint_above: bool = False,
          compact_frozen: str = "") -> ClientRow:
    credentials = coordinator.enroller.register(Enrolment(name=name, device_kind="cpu", memory_bytes=memory,
                                                          software_version="test", join_token="",
                                                          checkpoint_above=checkpoint_above,
                                                          compact_frozen=compact_frozen))
    return coordinator.enroller.authenticate({"authorization": f"Bearer {credentials.token}"})


def withheld(coordinator: Coordinator, reason: str) -> float:
    value = coordinator.metrics.registry.get_sample_value("fedcybgd_tasks_withheld_total", {"reason": reason})
    assert value is not None
    return value


def test_sequential_the_open_block_waits_for_a_client_that_holds_it(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator(Table(PEAKS))
    small, big = enrol(coordinator, "small", 350 * MiB), enrol(coordinator, "big", 1024 * MiB)
    waiting = coordinator.tasks.get_task(small, 0)
    assert waiting.task is None and waiting.final_version is None
    assert "layers.0" in waiting.wait_reason and format_bytes(500 * MiB) in waiting.wait_reason
    assert format_bytes(350 * MiB) in waiting.wait_reason
    assert withheld(coordinator, "memory") == 1
    status = coordinator.status(pb.GetStatusRequest())
    by_name = {c.name: c for c in status.clients}
    assert by_name["small"].fits_blocks == 2 and by_name["big"].fits_blocks == len(BLOCKS)
    assert by_name["small"].memory_note == waiting.wait_reason and by_name["big"].memory_note == ""
    offer = coordinator.tasks.get_task(big, 0)
    assert offer.task is not None and offer.task.block_index == 0
    assert coordinator.status(pb.GetStatusRequest()).waiting_reason == "", "a visit is in flight"


def test_the_run_waits_and_status_says_why_when_every_client_is_too_small(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator(Table(PEAKS))
    small = enrol(coordinator, "small", 350 * MiB)
    assert coordinator.tasks.get_task(small, 0).task is None
    reason = coordinator.status(pb.GetStatusRequest()).waiting_reason
    assert "every connected client is too small" in reason and "layers.0" in reason
    big = enrol(coordinator, "big", 1024 * MiB)
    assert coordinator.status(pb.GetStatusRequest()).waiting_reason == "", "the big one has not been refused"
    assert coordinator.tasks.get_task(big, 0).task is not None


def test_a_waiting_small_client_is_woken_for_a_block_it_holds(make_coordinator: MakeCoordinator):
    """Sequential, ascending: blocks 0 and 1 go to the big client; the small one, long-polling meanwhile, takes
    block 2 as soon as it opens."""
    coordinator = make_coordinator(Table(PEAKS))
    small, big = enrol(coordinator, "small", 350 * MiB), enrol(coordinator, "big", 1024 * MiB)
    offers: list[TaskOffer] = []
    poller = threading.Thread(target=lambda: offers.append(coordinator.tasks.get_task(small, 20)))
    for round_ in range(2):
        task = coordinator.tasks.get_task(big, 0).task
        assert task is not None and task.block_index == round_
        if round_ == 0:
            poller.start()
        with coordinator._lock:  # the task done: what the commit records, then the wake-up
            coordinator.state.commit_visit(_visit(task), coordinator.state.manifest(0))
            coordinator.rounds.add(task.round)
            coordinator._lock.notify_all()
    poller.join(timeout=30)
    assert offers and offers[0].task is not None and offers[0].task.block_index == 2
    assert offers[0].task.client_id == small.id


def _visit(task: TaskRow) -> VisitRow:
    stats = VisitStats(lr=1e-4, seed=0, bytes_down=0, bytes_up=0, loss_before=1.0, loss_after=0.5,
                       peak_memory_bytes=0, train_seconds=1.0, download_seconds=0.0, visit_seconds=1.0, samples=1,
                       tokens=16, device="cpu")
    return VisitRow(round=task.round, task_id=task.id, client_id=task.client_id, block_index=task.block_index,
                    base_version=task.base_version, new_version=task.round + 1, blob_sha256="0" * 64,
                    committed_unix=time.time(), record=stats)


def test_parallel_a_client_takes_an_open_block_it_holds(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator(Table(PEAKS), strategy="cybgd-parallel", max_concurrent_visits=2)
    small, big = enrol(coordinator, "small", 350 * MiB), enrol(coordinator, "big", 1024 * MiB)
    first = coordinator.tasks.get_task(small, 0).task
    assert first is not None and (first.round, first.block_index) == (2, 2), "rounds 0 and 1 are too big for it"
    second = coordinator.tasks.get_task(big, 0).task
    assert second is not None and (second.round, second.block_index) == (0, 0)
    assert withheld(coordinator, "memory") == 0


def test_a_client_that_holds_no_block_is_refused_with_resource_exhausted(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator(Table(PEAKS))
    tiny = enrol(coordinator, "tiny", 100 * MiB)
    with pytest.raises(Refusal) as refused:
        coordinator.tasks.get_task(tiny, 0)
    assert refused.value.status is Status.RESOURCE_EXHAUSTED
    assert "layers.3" in refused.value.message and format_bytes(200 * MiB) in refused.value.message
    assert format_bytes(100 * MiB) in refused.value.message
    assert withheld(coordinator, "no_block_fits") == 1
    status = coordinator.status(pb.GetStatusRequest())
    assert [c.fits_blocks for c in status.clients] == [0]


def test_unknown_memory_is_unconstrained(make_coordinator: MakeCoordinator):
    table = Table(PEAKS)
    coordinator = make_coordinator(table)
    offer = coordinator.tasks.get_task(enrol(coordinator, "old-client", 0), 0)
    assert offer.task is not None and offer.task.block_index == 0
    assert not table.calls


def test_whole_model_strategies_are_not_constrained(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator(strategy="fedavg-full")  # no predictor: the planner predicts block visits only
    small = enrol(coordinator, "small", 1)
    assert not coordinator.memory.constrains(small)
    offer = coordinator.tasks.get_task(small, 0)
    assert offer.task is not None and offer.task.block_index == ALL_BLOCKS


def test_predictions_are_made_outside_the_scheduling_lock(make_coordinator: MakeCoordinator):
    table = Table(PEAKS)
    coordinator = make_coordinator(table)
    held: list[bool] = []

    def probe() -> None:  # another thread tries the scheduling lock while the prediction runs
        def try_lock() -> None:
            acquired = coordinator._lock.acquire(timeout=2)
            if acquired:
                coordinator._lock.release()
            held.append(not acquired)

        thread = threading.Thread(target=try_lock)
        thread.start()
        thread.join()

    table.on_call = probe
    row = client_row(350 * MiB, id="c-direct")
    coordinator.state.add_client(row, "h-direct")  # not through enrolment: no warm-up, GetTask predicts
    assert coordinator.tasks.get_task(row, 0).task is None
    assert held == [False]


def test_status_does_not_wait_for_a_prediction(make_coordinator: MakeCoordinator):
    """The planner can take minutes on a large model; a status call made meanwhile answers at once and says the
    client's fit is still being predicted."""
    table = Table(PEAKS)
    coordinator = make_coordinator(table)
    seen: list[pb.ClientStatus] = []
    answered: list[bool] = []

    def probe() -> None:  # a status call while the prediction runs
        def status() -> None:
            seen.extend(c for c in coordinator.status(pb.GetStatusRequest()).clients if c.client_id == "c-direct")

        thread = threading.Thread(target=status)
        thread.start()
        thread.join(timeout=5)
        answered.append(not thread.is_alive())

    table.on_call = probe
    row = client_row(350 * MiB, id="c-direct")
    coordinator.state.add_client(row, "h-direct")
    coordinator.tasks.get_task(row, 0)
    assert answered == [True], "GetStatus waited for the memory planner"
    assert len(seen) == 1 and seen[0].memory_planning and seen[0].fits_blocks == 0
    after = next(c for c in coordinator.status(pb.GetStatusRequest()).clients if c.client_id == "c-direct")
    assert not after.memory_planning and after.fits_blocks == 2  # layers.2 and layers.3 peak under 350 MiB


# -- over gRPC, with client processes and the real planner --------------------------------------------

TRAINING = TrainingConfig(local_steps=2, batch_size=2, seq_len=32)


def planned_peaks(model_dir: Path, coordinator: Coordinator) -> dict[str, int]:
    """The planner's prediction of every block's visit on a CPU client, for the run's settings."""
    run = coordinator.run
    settings = PlanSettings(batch_size=TRAINING.batch_size, seq_len=TRAINING.seq_len, dtype=DTYPES[run.dtype],
                            device_type="cpu", layers_per_block=1, max_block_params=run.max_block_params)
    return {p.block: p.peak_bytes for p in plan_visits(plan_model_dir_or_config(model_dir), settings)}


@pytest.mark.multiprocess
def test_a_small_client_gets_only_blocks_it_holds_and_the_run_finishes(tiny_model_dir, tmp_path, coordinators,
                                                                       clients):
    running = coordinators.start(schedule=ScheduleConfig(cycles=1, order="ascending", lr=3e-3), training=TRAINING)
    coordinator = running.coordinator
    peaks = planned_peaks(tiny_model_dir, coordinator)
    ordered = sorted(peaks.values())
    small_memory = (ordered[1] + ordered[2]) // 2  # between the smallest and the largest visit: holds two blocks
    first_block = coordinator.run.specs[0].name
    assert peaks[first_block] > small_memory, "round 0 (ascending) must be one the small client cannot hold"
    data, _ = write_data(tmp_path, clients=2)

    small = clients.start(address_of(running), data[0], tmp_path / "caches" / "small", "small",
                          "--memory", str(small_memory))

    def small_waits() -> bool:
        status = coordinator.status(pb.GetStatusRequest())
        return bool(status.waiting_reason) and any(c.memory_note for c in status.clients)

    wait_for(small_waits, 120, "the small client to be told it cannot hold the first block")
    status = coordinator.status(pb.GetStatusRequest())
    assert first_block in status.waiting_reason and format_bytes(small_memory) in status.waiting_reason
    assert status.round == 0 and not status.tasks

    big = clients.start(address_of(running), data[1], tmp_path / "caches" / "big", "big", "--memory", "64GiB")
    wait_clients([small, big], timeout=300)
    status = coordinator.status(pb.GetStatusRequest())
    assert status.round == status.total_rounds == len(BLOCKS)
    memory_of = {c.client_id: c.memory_bytes for c in status.clients}
    assert sorted(memory_of.values()) == [small_memory, 64 * 2**30]
    for v in status.visits:  # every visit fits the client that made it
        assert peaks[v.block_name] <= memory_of[v.client_id], (v.block_name, v.client_name)
    small_fits = {c.name: c.fits_blocks for c in status.clients}
    assert small_fits == {"small": 2, "big": len(BLOCKS)}
    assert withheld(coordinator, "memory") >= 1


@pytest.mark.multiprocess
def test_a_client_smaller_than_every_visit_is_refused_and_its_daemon_exits(tiny_model_dir, tmp_path, coordinators,
                                                                         clients):
    running = coordinators.start(training=TRAINING)
    peaks = planned_peaks(tiny_model_dir, running.coordinator)
    smallest_block, smallest = min(peaks.items(), key=lambda kv: kv[1])
    too_small = smallest // 2
    stub = coordinators.stub(running)

    refused = register(stub, "raw-small", device_kind="cpu", memory_bytes=too_small)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=refused.md, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = err.value.details() or ""
    assert smallest_block in message and format_bytes(smallest) in message and format_bytes(too_small) in message

    unknown = register(stub, "raw-unknown", device_kind="cpu", memory_bytes=0)  # an older client: no constraint
    reply = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=unknown.md, timeout=60)
    assert reply.WhichOneof("outcome") == "task"

    data, _ = write_data(tmp_path, clients=1)
    daemon = clients.start(address_of(running), data[0], tmp_path / "caches" / "small", "small",
                           "--memory", str(too_small))
    assert daemon.wait(timeout=120) == 3
    log = (tmp_path / "caches" / "small.log").read_text()
    assert "holds no block of the run" in log and format_bytes(smallest) in log


# -- the client's side ----------------------------------------------------------------------------------

def test_the_client_memory_setting_takes_sizes_and_refuses_anything_else():
    assert parse_size("24GiB") == 24 * 2**30 and parse_size("16G") == 16 * 2**30
    assert parse_size("8000MB") == 8 * 10**9 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size(4096) == 4096
    assert parse_size("0") == 0
    for bad in ("lots", "12X", "-1G", "1.2.3G", -5):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert ClientConfig(data="d", insecure=True).memory_bytes is None  # measured by the daemon
    assert ClientConfig(data="d", insecure=True, memory="2GiB").memory_bytes == 2 * 2**30
    with pytest.raises(ValueError, match="not a size"):
        ClientConfig(data="d", insecure=True, memory="2 gigs")


@pytest.mark.multiprocess
def test_a_client_registers_anew_when_its_memory_profile_changes(tmp_path, coordinators):
    running = coordinators.start(training=TRAINING)

    def connect(**options: Any) -> str:
        daemon = ClientDaemon(ClientConfig(coordinator=address_of(running), data="unused", insecure=True,
                                           cache_dir=str(tmp_path / "cache"), name="site", device="cpu", **options))
        try:
            daemon.connect()
            return daemon.client_id
        finally:
            daemon.channel.close()

    first = connect(memory="64GiB")
    assert connect(memory="64GiB") == first, "same profile: the stored identity is reused"
    second = connect(memory="64GiB", checkpoint_above=True)
    assert second != first
    third = connect(memory="32GiB", checkpoint_above=True)
    assert third not in (first, second)
    rows = {c.id: c for c in running.coordinator.state.clients()}
    assert rows[second].checkpoint_above and rows[third].memory_bytes == 32 * 2**30
    assert not rows[first].checkpoint_above and rows[first].memory_bytes == 64 * 2**30


def test_a_client_holding_its_frozen_layers_compact_is_predicted_smaller_visits(make_coordinator: MakeCoordinator):
    """The real planner behind the coordinator: a client registered with compact frozen layers gets the predictions
    of that visit (smaller for every decoder-layer block but the one trained alone), and an unknown method is
    refused at registration."""
    pytest.importorskip("torchao.quantization", reason="compact frozen layers need torchao")
    coordinator = make_coordinator()
    exact = enrol(coordinator, "exact", 10 * 2**30)
    compact_row = enrol(coordinator, "compact", 10 * 2**30, compact_frozen="int8")
    assert compact_row.compact_frozen == "int8"
    plain, small = coordinator.memory.predictions(exact), coordinator.memory.predictions(compact_row)
    assert plain is not None and small is not None
    layers = [(p, s) for p, s in zip(plain, small, strict=True) if p.block.startswith("layers.")]
    assert layers and all(s.peak_bytes < p.peak_bytes for p, s in layers)
    with pytest.raises(Refusal) as refused:
        coordinator.enroller.register(Enrolment(name="odd", device_kind="cpu", memory_bytes=1, software_version="",
                                                join_token="", compact_frozen="fp2"))
    assert refused.value.status == Status.INVALID_ARGUMENT and "fp2" in str(refused.value)
