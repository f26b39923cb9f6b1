"""Retention beyond the versions themselves (server/retention.py): a FedAvg-family round's uploads that a crash kept
from being released go at the next start; the lossy-context approximations (server/context_plan.py) and the block
history's delta bases (server/history.py) forget the blobs retention deleted, so neither grows with the run.

Coordinators are built in-process and driven through their parts, as the servicer drives them; the uploads are
real blobs (a block nudged the way training would), stored and accepted by the strategy."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.codec import serialize_block
from fedcybgd.server.config import ContextConfig, CoordinatorConfig, RetentionConfig, TrainingConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.server.downloads import DownloadRequest
from fedcybgd.server.enrolment import Enrolment
from fedcybgd.server.history import BlockHistory
from fedcybgd.server.records import ALL_BLOCKS, ExpectedUpload, VisitStats
from fedcybgd.server.retention import RELEASED_META
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import ClientRow, TaskRow
from fedcybgd.v1 import coordinator_pb2 as pb


def _coordinator(model_dir: Path, state_dir: Path, **overrides: Any) -> Coordinator:
    values: dict[str, Any] = dict(insecure=True, model=str(model_dir), state_dir=str(state_dir),
                                  training=TrainingConfig(local_steps=1, batch_size=1, seq_len=16))
    values.update(overrides)
    return Coordinator(CoordinatorConfig(**values))


def _client(coordinator: Coordinator, name: str) -> ClientRow:
    credentials = coordinator.enroller.register(Enrolment(name=name, device_kind="cpu", memory_bytes=0,
                                                          software_version="test", join_token=""))
    return coordinator.enroller.authenticate({"authorization": f"Bearer {credentials.token}"})


def _stats(name: str) -> VisitStats:
    return VisitStats(lr=1e-4, seed=0, bytes_down=0, bytes_up=0, loss_before=1.0, loss_after=0.5,
                      peak_memory_bytes=0, train_seconds=1.0, download_seconds=0.0, visit_seconds=1.0, samples=1,
                      tokens=16, device="cpu", client_name=name)


def _trained(blobs: BlobStore, sha: str, seed: int) -> str:
    """The block `sha` after a "visit": every value moved a little, as training moves it (a new blob, stored)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = safetensors.torch.load_file(str(blobs.path(sha)))
    return blobs.put(serialize_block({k: v + 0.05 * torch.randn(v.shape, generator=generator).to(v.dtype)
                                      * v.float().abs().mean().to(v.dtype) for k, v in tensors.items()}))


def _task(coordinator: Coordinator, client: ClientRow) -> TaskRow:
    task = coordinator.tasks.get_task(client, 0).task
    assert task is not None
    return task


def _upload(coordinator: Coordinator, task: TaskRow, blobs: list[str], name: str) -> None:
    """The task's upload, as received and checked: `blobs` one per trained block, in order."""
    started = coordinator.state.manifest(task.base_version)
    indices = range(len(blobs)) if task.block_index == ALL_BLOCKS else [task.block_index]
    uploads = [ExpectedUpload(sha256=sha, size=coordinator.store.blobs.size(sha), spec=coordinator.run.specs[i],
                              base=started[i]) for i, sha in zip(indices, blobs, strict=True)]
    coordinator.strategy.accept(task, uploads, _stats(name))


def _kept_blobs(coordinator: Coordinator) -> set[str]:
    return {sha for k in coordinator.state.kept_versions() for sha in k.manifest}


# -- FedAvg-family uploads after a crash ----------------------------------------------------------------------

def test_a_restart_releases_the_uploads_of_a_round_merged_just_before_a_crash(tiny_model_dir, tmp_path):
    """A round's merge is committed, then the process dies before the round's uploads are released. The state on
    disk is then that of a process whose retention keeps everything (checkpoint_every = 0: it releases nothing),
    which is how the crash is reproduced here. The next start releases them: blobs of kept versions, and the uploads
    of the round still open (recovery may merge it), stay."""
    state_dir, seed = tmp_path / "state", iter(range(1000))

    def start(every: int) -> Coordinator:
        return _coordinator(tiny_model_dir, state_dir, strategy="fedavg-full", clients_per_round=2,
                            schedule=ScheduleConfig(cycles=3), retention=RetentionConfig(checkpoint_every=every))

    def contribute(coordinator: Coordinator, client: ClientRow) -> list[str]:
        """Client "b" leaves block 0 as it got it (its upload of that block is a blob of a kept version)."""
        task = _task(coordinator, client)
        manifest = coordinator.state.manifest(task.base_version)
        blobs = [sha if client.name == "b" and i == 0 else _trained(coordinator.store.blobs, sha, next(seed))
                 for i, sha in enumerate(manifest)]
        _upload(coordinator, task, blobs, client.name)
        return blobs

    first = start(every=2)
    a, b = _client(first, "a"), _client(first, "b")
    round0 = {*contribute(first, a), *contribute(first, b)}
    assert first.rounds.count == 1 and first.state.get_meta(RELEASED_META) == "1"
    assert not any(first.store.blobs.has(sha) for sha in round0 - _kept_blobs(first)), "released as it merged"
    first.close()

    crashed = start(every=0)   # round 1 merges; its release "never runs"; round 2 gets one of its two uploads
    round1 = {*contribute(crashed, a), *contribute(crashed, b)}
    waiting = contribute(crashed, a)
    assert crashed.rounds.count == 2
    assert all(crashed.store.blobs.has(sha) for sha in round1 | set(waiting))
    crashed.close()

    restarted = start(every=2)
    kept = _kept_blobs(restarted)
    assert round1 & kept, "one upload of round 1 is a kept version's block: the case of a blob that must stay"
    assert all(restarted.store.blobs.has(sha) for sha in kept)
    assert not any(restarted.store.blobs.has(sha) for sha in round1 - kept), "round 1's own uploads were released"
    assert all(restarted.store.blobs.has(sha) for sha in waiting), "the open round's upload stays"
    assert restarted.state.get_meta(RELEASED_META) == "2"
    # The open round still merges from what was kept, and its uploads go as it does.
    contribute(restarted, b)
    assert restarted.rounds.count == 3
    assert not any(restarted.store.blobs.has(sha) for sha in set(waiting) - _kept_blobs(restarted))
    restarted.close()


# -- lossy-context approximations and delta bases -------------------------------------------------------------

def test_context_approximations_and_delta_bases_stay_bounded_over_a_long_run(tiny_model_dir, tmp_path):
    """A client that holds only the base model gets every changed frozen block as an int8 approximation, made per
    (blob, reference) and kept on disk. Retention keeps the base, the newest version and what the client holds;
    the approximations (files and index) and the block history follow it instead of growing a blob per visit."""
    cycles = 6
    coordinator = _coordinator(tiny_model_dir, tmp_path / "state", schedule=ScheduleConfig(cycles=cycles),
                               context=ContextConfig(method="int8"),
                               retention=RetentionConfig(checkpoint_every=10_000))
    blobs, planner, history = coordinator.store.blobs, coordinator.context, coordinator.history
    base = coordinator.state.manifest(0)
    client = _client(coordinator, "a")
    files, approximated = [], 0
    visits = coordinator.schedule.total_rounds - 1   # the last one is planned across a restart, below
    for visit in range(visits):
        task = _task(coordinator, client)
        plan = coordinator.downloads.plan(task, DownloadRequest(
            task_id=task.id, have=tuple(base), resume=(), codecs=(pb.CODEC_BYTEGROUP,),
            context_codecs=frozenset({pb.CONTEXT_INT8})))
        approximated += len(plan.approximations)
        _upload(coordinator, task, [_trained(blobs, plan.manifest[task.block_index], visit)], "a")

        kept = _kept_blobs(coordinator)
        files.append(len(list(planner.store)))
        # One approximation per blob here (its reference is always the base's block), and only of kept blobs.
        assert files[-1] <= len(kept - set(base)), f"visit {visit}: {files[-1]} approximations on disk"
        for index in range(len(coordinator.run.specs)):
            remembered = history.blobs(index)
            assert set(remembered) <= kept and all(blobs.has(sha) for sha in remembered), f"block {index}"
    blocks = len(coordinator.run.specs)
    assert approximated >= (cycles - 1) * blocks, "frozen blocks travelled approximated: the store was used"
    assert max(files) <= blocks + 3 < visits / 2
    assert set(blobs) == _kept_blobs(coordinator)

    # A restart begins with an empty store (its index lived in memory); what it encodes again is the same blob.
    task = _task(coordinator, client)
    request = DownloadRequest(task_id=task.id, have=tuple(base), resume=(), codecs=(pb.CODEC_BYTEGROUP,),
                              context_codecs=frozenset({pb.CONTEXT_INT8}))
    before = coordinator.downloads.plan(task, request).approximations
    assert before and all(planner.store.has(a.sha256) for a in before.values())
    coordinator.close()
    again = _coordinator(tiny_model_dir, tmp_path / "state", schedule=ScheduleConfig(cycles=cycles),
                         context=ContextConfig(method="int8"), retention=RetentionConfig(checkpoint_every=10_000))
    assert list(again.context.store) == []
    assert again.downloads.plan(task, request).approximations == before
    again.close()


def test_the_history_forgets_deleted_blobs_and_looks_at_the_newest_and_the_first(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    shas = [store.put(serialize_block({"x": torch.full((4,), float(i))})) for i in range(40)]
    history = BlockHistory(store, 1)
    for sha in shas:
        history.add({0: sha})
    newest = shas[-1]
    assert history.delta_base(0, newest, {shas[30], shas[35]}) == shas[35]   # the newest one held
    assert history.delta_base(0, newest, {shas[0], shas[35]}) == shas[35]
    assert history.delta_base(0, newest, {shas[0]}) == shas[0]               # the first: the base model's
    assert history.delta_base(0, newest, {shas[5]}) is None                  # beyond the newest WALK: whole
    assert history.delta_base(0, newest, {shas[39 - BlockHistory.WALK]}) is None
    assert history.delta_base(0, newest, {shas[40 - BlockHistory.WALK]}) == shas[40 - BlockHistory.WALK]

    gone = set(shas[1:35])
    for sha in gone:
        store.remove(sha)
    history.retain(lambda sha: sha not in gone)
    assert history.blobs(0) == [shas[0], *shas[35:]]
    assert history.delta_base(0, newest, {shas[30], shas[36]}) == shas[36]
    assert history.delta_base(0, newest, {shas[30]}) is None
