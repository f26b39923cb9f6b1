"""The coordinator's parts without gRPC: a `Coordinator` built in-process and driven through its
parts (enrolment, task board, download planning, context planner, commits), the way the servicer
drives them, but with no server, channel or protobuf stream in between."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedcybgd.common.codec import serialize_block
from fedcybgd.server.config import ContextConfig, CoordinatorConfig, TrainingConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.downloads import DownloadPlan, DownloadRequest
from fedcybgd.server.enrolment import Enrolment
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.records import ALL_BLOCKS, ExpectedUpload, VisitStats
from fedcybgd.server.run import _schedule_settings
from fedcybgd.server.scheduler import CycleSchedule, ScheduleConfig
from fedcybgd.server.state import ClientRow, TaskRow
from fedcybgd.server.strategies.fedavg import FedAvgFull
from fedcybgd.v1 import coordinator_pb2 as pb

MakeCoordinator = Callable[..., Coordinator]


@pytest.fixture
def make_coordinator(tiny_model_dir: Path, tmp_path: Path) -> Iterator[MakeCoordinator]:
    """Coordinators without a server: `Coordinator(config)` on a fresh state directory each."""
    made: list[Coordinator] = []

    def make(**overrides: Any) -> Coordinator:
        values: dict[str, Any] = dict(insecure=True, model=str(tiny_model_dir),
                                      state_dir=str(tmp_path / f"state-{len(made)}"),
                                      schedule=ScheduleConfig(cycles=1),
                                      training=TrainingConfig(local_steps=1, batch_size=1, seq_len=16))
        values.update(overrides)
        coordinator = Coordinator(CoordinatorConfig(**values))
        made.append(coordinator)
        return coordinator

    yield make
    for coordinator in made:
        coordinator.close()


def _client(coordinator: Coordinator, name: str) -> ClientRow:
    credentials = coordinator.enroller.register(Enrolment(name=name, device_kind="cpu", memory_bytes=0,
                                                          software_version="test", join_token=""))
    return coordinator.enroller.authenticate({"authorization": f"Bearer {credentials.token}"})


def _stats(name: str = "") -> VisitStats:
    return VisitStats(lr=1e-4, seed=0, bytes_down=0, bytes_up=0, loss_before=1.0, loss_after=0.5,
                      peak_memory_bytes=0, train_seconds=1.0, download_seconds=0.0, visit_seconds=1.0, samples=1,
                      tokens=16, device="cpu", client_name=name)


def test_every_refusal_is_a_grpc_status_of_the_same_name():
    for status in Status:
        assert status.name in grpc.StatusCode.__members__


def test_sequential_cycle_issues_one_visit_at_a_time(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator()
    a, b = _client(coordinator, "a"), _client(coordinator, "b")
    first = coordinator.tasks.get_task(a, 0)
    schedule = coordinator.strategy.schedule
    assert isinstance(schedule, CycleSchedule)
    assert first.task is not None and first.task.round == 0 and first.task.block_index == schedule.block_of(0)
    assert coordinator.tasks.get_task(a, 0).task == first.task  # a retried GetTask gets the same task back
    waiting = coordinator.tasks.get_task(b, 0)
    assert waiting.task is None and waiting.final_version is None and waiting.wait_reason


def test_parallel_cycle_issues_distinct_blocks(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator(strategy="cybgd-parallel", max_concurrent_visits=2)
    tasks = [coordinator.tasks.get_task(_client(coordinator, name), 0).task for name in "abc"]
    assert tasks[0] is not None and tasks[1] is not None and tasks[2] is None
    assert tasks[0].block_index != tasks[1].block_index and tasks[0].base_version == tasks[1].base_version == 0


def test_a_transfer_names_only_the_callers_open_task(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator()
    a, b = _client(coordinator, "a"), _client(coordinator, "b")
    offer = coordinator.tasks.get_task(a, 0)
    assert offer.task is not None
    assert coordinator.tasks.own_issued_task(a, offer.task.id).id == offer.task.id
    with pytest.raises(Refusal) as refused:
        coordinator.tasks.own_issued_task(b, offer.task.id)
    assert refused.value.status is Status.PERMISSION_DENIED
    with pytest.raises(Refusal) as missing:
        coordinator.tasks.own_issued_task(a, "t-nope")
    assert missing.value.status is Status.NOT_FOUND
    assert coordinator.state.expire_task(offer.task.id)
    with pytest.raises(Refusal) as closed:
        coordinator.tasks.own_issued_task(a, offer.task.id)
    assert closed.value.status is Status.FAILED_PRECONDITION


def test_download_plan_sends_only_what_the_client_lacks(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator()
    task = coordinator.tasks.get_task(_client(coordinator, "a"), 0).task
    assert task is not None
    manifest = coordinator.state.manifest(0)

    def plan(have: tuple[str, ...]) -> DownloadPlan:
        return coordinator.downloads.plan(task, DownloadRequest(
            task_id=task.id, have=have, resume=(), codecs=(pb.CODEC_BYTEGROUP,), context_codecs=frozenset()))

    everything = plan(())
    assert [b.sha256 for b in everything.blobs] == list(dict.fromkeys(manifest))
    trained = manifest[task.block_index]
    assert [b.kind for b in everything.blobs if b.sha256 == trained] == ["block"]
    assert {b.kind for b in everything.blobs if b.sha256 != trained} == {"context"}
    assert plan(tuple(manifest)).blobs == []
    with pytest.raises(Refusal) as refused:
        plan(("0" * 64,) * 100_001)  # counted as sent, duplicates included
    assert refused.value.status is Status.INVALID_ARGUMENT


def test_context_approximations_are_encoded_once_per_block_however_many_ask(
        make_coordinator: MakeCoordinator, monkeypatch: pytest.MonkeyPatch):
    coordinator = make_coordinator(context=ContextConfig(method="int8"))
    planner = coordinator.context
    manifest = coordinator.state.manifest(0)
    encoded: list[str] = []
    encode = planner._encode

    def counting(block: int, sha: str, reference: str | None):
        encoded.append(sha)
        return encode(block, sha, reference)

    monkeypatch.setattr(planner, "_encode", counting)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            barrier.wait()
            planner.plan(manifest, {manifest[0]}, set(), {pb.CONTEXT_INT8}, seed=0)
        except BaseException as exc:  # reported by the test, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sorted(encoded) == sorted(set(manifest) - {manifest[0]})


def test_a_fedavg_round_is_averaged_outside_the_scheduling_lock(make_coordinator: MakeCoordinator,
                                                                 monkeypatch: pytest.MonkeyPatch):
    coordinator = make_coordinator(strategy="fedavg-full", clients_per_round=2)
    strategy = coordinator.strategy
    assert isinstance(strategy, FedAvgFull)
    seen: list[bool] = []
    average = FedAvgFull.average

    def observed(self: FedAvgFull, weighted: list[tuple[float, list[str]]], manifest: list[str]):
        # Another thread (a client's GetTask) can take the scheduling lock while the average is computed.
        got = threading.Event()

        def take() -> None:
            if strategy.env.lock.acquire(timeout=10):
                got.set()
                strategy.env.lock.release()
        thread = threading.Thread(target=take)
        thread.start()
        seen.append(got.wait(timeout=15))
        thread.join(timeout=15)
        return average(self, weighted, manifest)

    monkeypatch.setattr(FedAvgFull, "average", observed)
    manifest = coordinator.state.manifest(0)
    tasks: list[TaskRow] = []
    for name in "ab":
        offer = coordinator.tasks.get_task(_client(coordinator, name), 0)
        assert offer.task is not None and offer.task.block_index == ALL_BLOCKS
        tasks.append(offer.task)
    # Each "upload" is the base model itself (already stored and checked): the average is the base model.
    uploads = [ExpectedUpload(sha256=sha, size=coordinator.store.blobs.size(sha), spec=spec, base=sha)
               for spec, sha in zip(coordinator.run.specs, manifest, strict=True)]
    first, last = (strategy.accept(task, uploads, _stats(task.client_id)) for task in tasks)
    assert first.new_version == 0 and last.new_version == 1  # the round's last upload merged it
    assert seen == [True]
    assert coordinator.state.manifest(1) == manifest and coordinator.rounds.count == 1


def test_history_offers_the_newest_held_version_as_delta_base(make_coordinator: MakeCoordinator):
    coordinator = make_coordinator()
    manifest = coordinator.state.manifest(0)
    older = coordinator.store.blobs.put(serialize_block({"x": torch.full((4,), 2.0)}))
    newer = coordinator.store.blobs.put(serialize_block({"x": torch.zeros(4)}))
    latest = coordinator.store.blobs.put(serialize_block({"x": torch.ones(4)}))
    for sha in (older, newer, latest):
        coordinator.history.add({0: sha})
    assert coordinator.history.delta_base(0, latest, {manifest[0], older, newer}) == newer
    assert coordinator.history.delta_base(0, latest, {older}) == older
    assert coordinator.history.delta_base(0, latest, {manifest[0]}) is None  # other size: no delta
    assert coordinator.history.delta_base(0, latest, set()) is None


def test_a_run_keeps_its_embed_head_period_across_restarts(tiny_model_dir: Path, tmp_path: Path):
    """A state directory remembers the period; a restart with another one is refused before anything changes, and
    the fingerprint of a run with the paper's period (1) is that of runs made before the setting existed."""
    def config(every: int) -> CoordinatorConfig:
        return CoordinatorConfig(insecure=True, model=str(tiny_model_dir), state_dir=str(tmp_path / "state"),
                                 schedule=ScheduleConfig(cycles=3, embed_head_every=every))

    first = Coordinator(config(2))
    assert first.schedule.total_rounds == 4 + 5 + 5  # embed_head joins the 2nd cycle and the last
    first.close()
    with pytest.raises(ValueError, match="other settings"):
        Coordinator(config(4))
    Coordinator(config(2)).close()
    assert "embed_head_every" not in _schedule_settings(config(1))
    assert _schedule_settings(config(4))["embed_head_every"] == 4
