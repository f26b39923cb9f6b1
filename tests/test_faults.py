"""Faults injected into real processes: a coordinator SIGKILLed at random moments and restarted,
client daemons SIGKILLed mid-download, mid-training and mid-upload and restarted from their cache,
and a late upload for a task that was reassigned meanwhile.

Every run must still end with a consistent version history (one visit per round, versions
1..N in order, every manifest's blobs present and intact, nothing left half-written) and, the
algorithm being deterministic, with exactly the weights of the single-process reference replaying
the recorded visits (each with the data of the client that made it).

The coordinator runs with `--task-timeout 3` (a dead client's task is reassigned quickly) and a
heartbeat interval of 1 s from a TOML config file (phases are reported often).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from conftest import (
    ClientProcesses,
    CoordinatorProcess,
    Metadata,
    assert_matches_reference,
    register,
    state_blob_path,
    wait_clients,
    wait_for,
    write_data,
)
from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.partition import partition_model
from fedcybgd.common.tiny import make_byte_tokenizer, tiny_config
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import SqliteState, TaskRow
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

pytestmark = pytest.mark.multiprocess

TASK_TIMEOUT_S = 3.0


# -- processes and probes --------------------------------------------------------------------------
@pytest.fixture
def fault_coordinator(coordinator_processes, tmp_path) -> Callable[..., CoordinatorProcess]:
    """`fedcybgd coordinator` (a process, restartable on the same state directory and address) for
    a faulty run: `--task-timeout 3`, a heartbeat every second from a TOML config file, and exiting
    once the run is finished. It and its channels are cleaned up at teardown (with the `clients`
    fixture, the same for the client daemons)."""
    def make(model_dir: Path, state_dir: Path, schedule: ScheduleConfig,
             training: TrainingConfig) -> CoordinatorProcess:
        config = tmp_path / "coordinator.toml"
        config.write_text("heartbeat_interval_s = 1\n")
        return coordinator_processes(
            "--config", str(config), "--model", str(model_dir), "--state-dir", str(state_dir),
            "--cycles", str(schedule.cycles), "--order", schedule.order, "--lr", repr(schedule.lr),
            "--seed", str(schedule.seed), "--local-steps", str(training.local_steps),
            "--batch-size", str(training.batch_size), "--seq-len", str(training.seq_len),
            "--task-timeout", str(TASK_TIMEOUT_S), "--exit-when-finished")
    return make


def objects(store_root: Path) -> set[str]:
    """SHA-256 names of the complete blobs in a blob store (coordinator store or client cache)."""
    root = store_root / "objects"
    if not root.is_dir():
        return set()
    return {blob.name for sub in root.iterdir() if sub.is_dir() for blob in sub.iterdir()}


def incoming(store_root: Path) -> list[Path]:
    """Blobs being written into a blob store: temporary files, and partial (resumable) downloads."""
    return [f for sub in ("tmp", "partial") if (store_root / sub).is_dir() for f in (store_root / sub).iterdir()]


def temporary(store_root: Path) -> list[Path]:
    tmp = store_root / "tmp"
    return list(tmp.iterdir()) if tmp.is_dir() else []


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_upload(stub, metadata, header: pb.UploadHeader, blob: bytes, chunk_bytes: int = 1 << 20) -> pb.UploadResponse:
    """UploadBlock straight from the protocol: the header, then raw (uncompressed) chunks."""
    def messages():
        yield pb.UploadMessage(header=header)
        for offset in range(0, len(blob), chunk_bytes):
            raw = blob[offset:offset + chunk_bytes]
            yield pb.UploadMessage(chunk=pb.Chunk(blob_sha256=header.blob_sha256, offset=offset, raw_size=len(raw),
                                                  codec=pb.CODEC_NONE, data=raw, crc32=zlib.crc32(raw)))
    return stub.UploadBlock(messages(), metadata=metadata, timeout=30)


# -- checks ----------------------------------------------------------------------------------------
def check_history(state: SqliteState, state_dir: Path, total_rounds: int) -> None:
    """One visit per round, versions 1..N in order, each from the previous one and differing from it
    in its block only; every blob of every manifest is in the store under its own hash; nothing
    half-written is left behind."""
    visits = state.visits()
    assert [v.round for v in visits] == list(range(total_rounds))
    assert [v.new_version for v in visits] == list(range(1, total_rounds + 1))
    assert all(v.base_version == v.new_version - 1 for v in visits), \
        "sequential mode: each visit starts from the previous version"
    found = state.latest_version()
    assert found is not None
    latest, _ = found
    assert latest == total_rounds
    for v in visits:
        before, after = state.manifest(v.base_version), state.manifest(v.new_version)
        assert after[v.block_index] == v.blob_sha256
        assert [s for i, s in enumerate(after) if i != v.block_index] == \
            [s for i, s in enumerate(before) if i != v.block_index]
    checked: set[str] = set()
    for kept in state.kept_versions():  # the versions the retention rule pruned have no blobs left to check
        version = kept.version
        for sha in kept.manifest:
            if sha in checked:
                continue
            path = state_blob_path(state_dir)(sha)
            assert path.is_file(), f"version {version}: blob {sha[:12]} missing from the store"
            assert sha256_file(path) == sha, f"version {version}: blob {sha[:12]} does not hash to its name"
            checked.add(sha)
    assert temporary(state_dir / "blobs") == [], "temporary files left in the blob store"


def check_cache(cache_dir: Path) -> None:
    """A client cache holds only complete blobs, each under its own hash, and no temporary file."""
    store = cache_dir / "blobs"
    assert temporary(store) == [], f"temporary files left in {store}"
    for sha in objects(store):
        assert sha256_file(store / "objects" / sha[:2] / sha) == sha, f"{store}: {sha[:12]} does not hash to its name"


class WeightsDiffer(AssertionError):
    """The federated weights are not those of the single-process reference."""


class ClientCrashed(AssertionError):
    """A client daemon died of an error instead of dropping a withdrawn task."""


def check_reference(model_dir: Path, state_dir: Path, state: SqliteState, data_of_name: dict[str, Path],
                    schedule: ScheduleConfig, training: TrainingConfig) -> None:
    """The final weights equal the single-process reference replaying the recorded visits, each
    with the data of the client that made it: bit for bit."""
    names = {c.id: c.name for c in state.clients()}
    latest = state.latest_version()
    assert latest is not None
    _, manifest = latest
    assert_matches_reference(model_dir, schedule, training, [data_of_name[names[v.client_id]] for v in state.visits()],
                             manifest, state_blob_path(state_dir), error=WeightsDiffer)


class OtherSite(NamedTuple):
    channel: grpc.Channel
    stub: pb_grpc.CoordinatorStub
    metadata: Metadata
    task: pb.Task


def another_site_takes_round_0(coordinator: CoordinatorProcess) -> OtherSite:
    """A new site registers and asks for work: it must be handed the silent client's round 0."""
    channel = coordinator.channel()
    stub = pb_grpc.CoordinatorStub(channel)
    _, metadata = register(stub, "other-site", device_kind="cpu")
    taken = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=metadata, timeout=10)
    assert taken.WhichOneof("outcome") == "task" and taken.task.round == 0
    return OtherSite(channel, stub, metadata, taken.task)


def all_tasks(state: SqliteState) -> list[TaskRow]:
    return [t for status in ("issued", "done", "expired") for t in state.tasks_with_status(status)]


# -- 1. the coordinator SIGKILLed at random moments -------------------------------------------------
def test_coordinator_sigkilled_at_random_moments_restarts_and_finishes(
        tiny_model_dir, tmp_path, fault_coordinator, clients: ClientProcesses):
    rng = random.Random(20240611)
    data, _ = write_data(tmp_path, clients=3)
    names = [f"site-{i}" for i in range(3)]
    schedule = ScheduleConfig(cycles=3, order="random", lr=3e-3, seed=11)
    training = TrainingConfig(local_steps=24, batch_size=4, seq_len=64)
    total = 3 * 4 + 1  # 4 decoder-layer blocks per cycle; embed_head joins the last (embed_head_every 4)
    state_dir = tmp_path / "state"
    coordinator = fault_coordinator(tiny_model_dir, state_dir, schedule, training)
    kept: dict[int, str] = {}      # round -> blob of every visit committed before some kill
    moments = []
    coordinator.start()
    procs = [clients.start(coordinator.address, data[i], tmp_path / "caches" / n, n) for i, n in enumerate(names)]
    committed = 0
    for _ in range(3):
        # At least one visit committed since the (re)start, then a random moment of the visit
        # that follows (a visit lasts about a tenth of a second here).
        def next_visit_under_way(committed: int = committed) -> bool:
            return (s := coordinator.status()) is not None and s.round > committed and bool(s.tasks)

        wait_for(next_visit_under_way, 90, "a visit committed since the restart and the next one under way",
                 interval=0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        s = coordinator.status()
        coordinator.sigkill()
        name_of = {c.client_id: c.name for c in s.clients} if s else {}
        base = {b.sha256 for b in s.blocks} if s else set()
        moments.append({
            "tasks": [(t.round, name_of.get(t.client_id), "downloading" if not base <= objects(
                tmp_path / "caches" / name_of.get(t.client_id, "?") / "blobs") else "downloaded")
                      for t in s.tasks] if s else None,
            "upload_left_half_written": len(temporary(state_dir / "blobs")),
        })
        state = SqliteState(state_dir / "state.sqlite")
        visits = state.visits()
        state.close()
        for v in visits:
            assert kept.setdefault(v.round, v.blob_sha256) == v.blob_sha256, "a committed visit changed"
        committed = len(visits)
        assert committed < total, f"the run finished before kill {len(moments)}; kill earlier"
        coordinator.start()
    wait_clients(procs, timeout=120)
    assert coordinator.wait(timeout=90) == 0
    print("coordinator killed at:", moments)

    state = SqliteState(state_dir / "state.sqlite")
    try:
        check_history(state, state_dir, total)
        assert {v.round: v.blob_sha256 for v in state.visits() if v.round in kept} == kept, \
            "an upload accepted before a kill was lost or changed"
        assert sorted(c.name for c in state.clients()) == names, "a client registered again"
        check_reference(tiny_model_dir, state_dir, state, dict(zip(names, data, strict=True)), schedule, training)
    finally:
        state.close()
    for n in names:
        check_cache(tmp_path / "caches" / n)


# -- 2. clients SIGKILLed mid-download, mid-training, mid-upload --------------------------------------
@pytest.fixture(scope="module")
def medium_model_dir(tmp_path_factory) -> Path:
    """Llama-like, hidden 512: decoder-layer blocks of about 16 MB, so transfers last long enough
    to be caught in the act; 3 layers + embeddings/head = 4 blocks."""
    path = tmp_path_factory.mktemp("model") / "medium-llama"
    config = tiny_config("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return path


def freeze_when(proc: subprocess.Popen, caught: Callable[[], bool], missed: Callable[[], bool],
                budget_s: float = 2.0) -> bool:
    """Freeze `proc` (SIGSTOP), then let it run a few milliseconds at a time until `caught()` holds,
    checked while it is frozen once in-flight data has settled: True, and `proc` stays frozen.
    False, with `proc` running again, when `missed()` says the moment has passed, or after
    `budget_s`."""
    os.kill(proc.pid, signal.SIGSTOP)
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        time.sleep(0.03)
        if caught():
            return True
        if missed():
            break
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.004)
        os.kill(proc.pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGCONT)
    return False


def kill_when(proc: subprocess.Popen, caught: Callable[[], bool], missed: Callable[[], bool]) -> bool:
    """SIGKILL `proc` at the moment `caught()` holds (see `freeze_when`)."""
    if not freeze_when(proc, caught, missed):
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return True


def test_clients_killed_mid_download_training_upload_rejoin_and_run_completes(
        medium_model_dir, tmp_path, fault_coordinator, clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=3)
    names = [f"site-{i}" for i in range(3)]
    data_of = dict(zip(names, data, strict=True))
    caches = {n: tmp_path / "caches" / n for n in names}
    schedule = ScheduleConfig(cycles=1, order="ascending", lr=1e-3, seed=5)
    training = TrainingConfig(local_steps=20, batch_size=2, seq_len=64)
    total = 4
    state_dir = tmp_path / "state"
    store = state_dir / "blobs"
    coordinator = fault_coordinator(medium_model_dir, state_dir, schedule, training)
    ids: dict[str, str] = {}
    kills: list[dict] = []
    coordinator.start()
    # --memory 0: no memory constraint, so the coordinator runs no memory planner at enrolment; its simulation
    # holds the GIL for seconds and slows the status polling this test times its kills by.
    procs: dict[str, subprocess.Popen] = {n: clients.start(coordinator.address, data_of[n], caches[n], n,
                                                           "--memory", "0")
                                          for n in names}
    pending = ["download", "train", "upload"]
    deadline = time.monotonic() + 150
    while pending:
        assert time.monotonic() < deadline, f"could not inject {pending}; kills so far: {kills}"
        s = coordinator.status()
        if s is None:
            time.sleep(0.01)
            continue
        assert s.run_state != "done" and s.round < total, f"the run ended before {pending} could be injected"
        for c in s.clients:
            assert ids.setdefault(c.name, c.client_id) == c.client_id, f"{c.name} registered twice"
        name_of = {c.client_id: c.name for c in s.clients}
        dead_names = {k["name"] for k in kills}
        live = [t for t in s.tasks if name_of.get(t.client_id) not in dead_names]
        if not live:
            time.sleep(0.005)
            continue
        task = live[0]
        holder = name_of[task.client_id]
        cache = caches[holder] / "blobs"
        base = {b.sha256 for b in s.blocks}  # sequential: the latest version is the task's base
        event = None
        evidence: dict[str, Any] = {}
        if "download" in pending and task.phase == "download" and not base <= objects(cache):
            # It has not got its base model yet: single-step it into the middle of the download.
            def downloading(cache: Path = cache, base: set[str] = base, evidence: dict[str, Any] = evidence) -> bool:
                written = sum(_size(f) for f in incoming(cache))
                evidence.update(blobs_complete=len(base & objects(cache)), blobs=len(base), partial_bytes=written)
                return written > 0 and not base <= objects(cache)

            def downloaded(cache: Path = cache, base: set[str] = base) -> bool:
                return base <= objects(cache)

            if kill_when(procs[holder], downloading, downloaded):
                event = "download"
        elif "train" in pending and task.phase == "train" and 1 <= task.step <= task.steps // 2:
            procs[holder].kill()  # reported by its last heartbeat, with half the steps still to go
            evidence = {"step": task.step, "steps": task.steps}
            event = "train"
        elif "upload" in pending and objects(cache) - objects(store):
            # It holds a trained block the coordinator has not got: single-step it into the
            # middle of the upload (the coordinator holds part of the block, not all of it).
            def uploading(evidence: dict[str, Any] = evidence) -> bool:
                written = sum(_size(f) for f in incoming(store))
                evidence.update(coordinator_partial_bytes=written)
                return written > 0

            def round_over(s: pb.GetStatusResponse = s) -> bool:
                return (x := coordinator.status()) is None or x.round > s.round

            if kill_when(procs[holder], uploading, round_over):
                event = "upload"
        if event is None:
            time.sleep(0.005)
            continue
        procs[holder].wait(timeout=30)
        kills.append({"event": event, "name": holder, "client_id": task.client_id, "task_id": task.task_id,
                      "round": task.round, **evidence})
        pending.remove(event)
        if event == "train":
            time.sleep(0.3)
            assert not objects(cache) - objects(store), "the client finished training before it was killed"
        if event == "upload":
            wait_for(lambda: not temporary(store), 15, "the coordinator to drop the partial upload")
            x = coordinator.status()
            assert x is not None and task.task_id not in {v.task_id for v in x.visits}, \
                "the killed upload was committed"

        if pending:
            continue  # the killed client stays down: the others must take its round over
        # All three injected: restart the first two, let them take the last dead task's round over
        # (after the task timeout), then restart the last one. Same cache dir and name each time.
        last = kills[-1]
        for k in kills[:-1]:
            procs[k["name"]] = clients.start(coordinator.address, data_of[k["name"]], caches[k["name"]], k["name"],
                                             "--memory", "0")
        def reassigned(last: dict = last) -> bool:
            return (x := coordinator.status()) is not None and (
                x.round > last["round"]
                or any(t.round == last["round"] and t.task_id != last["task_id"] for t in x.tasks))

        wait_for(reassigned, 60, "the last dead task to be reassigned")
        procs[last["name"]] = clients.start(coordinator.address, data_of[last["name"]], caches[last["name"]],
                                            last["name"], "--memory", "0")

    wait_clients(list(procs.values()), timeout=150)
    assert coordinator.wait(timeout=90) == 0
    print("clients killed:", kills)

    assert sorted(k["event"] for k in kills) == ["download", "train", "upload"]
    assert len({k["name"] for k in kills}) == 3, "each fault hits another client"
    state = SqliteState(state_dir / "state.sqlite")
    try:
        # Rejoined with their stored identity: no new registration.
        assert sorted(c.name for c in state.clients()) == names
        assert {c.name: c.id for c in state.clients()} == ids
        # Each dead task expired after the timeout and its round was taken over by another client.
        tasks = all_tasks(state)
        visit_of_round = {v.round: v for v in state.visits()}
        for k in kills:
            dead = state.task(k["task_id"])
            assert dead is not None and dead.status == "expired", k
            assert dead.finished_unix is not None, k
            assert dead.finished_unix - dead.last_progress_unix > TASK_TIMEOUT_S, k
            successor = min((t for t in tasks if t.round == dead.round and t.issued_unix > dead.issued_unix),
                            key=lambda t: t.issued_unix)
            assert successor.client_id != dead.client_id, k
            assert successor.issued_unix - dead.last_progress_unix > TASK_TIMEOUT_S, k
            assert visit_of_round[dead.round].task_id != dead.id, k
        check_history(state, state_dir, total)
        check_reference(medium_model_dir, state_dir, state, data_of, schedule, training)
    finally:
        state.close()
    for n in names:
        check_cache(caches[n])


# -- 3. a late upload for a reassigned task -----------------------------------------------------------
def test_late_upload_of_reassigned_task_is_refused_and_changes_nothing(
        tiny_model_dir, tmp_path, fault_coordinator, clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=1)
    schedule = ScheduleConfig(cycles=1, order="ascending", lr=3e-3, seed=2)
    training = TrainingConfig(local_steps=6, batch_size=2, seq_len=64)
    total = 5
    state_dir = tmp_path / "state"
    coordinator = fault_coordinator(tiny_model_dir, state_dir, schedule, training)
    coordinator.start()
    channel = coordinator.channel()
    stub = pb_grpc.CoordinatorStub(channel)
    # A raw client registers, takes round 0 and fetches its base model ...
    late, metadata = register(stub, "late-site", device_kind="cpu")
    reply = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=metadata, timeout=10)
    assert reply.WhichOneof("outcome") == "task"
    task = reply.task
    assert task.round == 0
    received = [m for m in stub.DownloadModel(pb.DownloadRequest(task_id=task.task_id, accept_codecs=[pb.CODEC_NONE]),
                                              metadata=metadata, timeout=30)]
    assert received[0].HasField("manifest") and len(received) > 1
    # ... and prepares a perfectly valid block (its base block, nudged), then goes silent.
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    spec = partition_model(model, 1)[task.block_index]
    blob = safetensors.torch.save({name: t + 0.01 for name, t in block_tensors(model, spec).items()})
    header = pb.UploadHeader(task_id=task.task_id, block_index=task.block_index, base_version=task.base_version,
                             blob_sha256=hashlib.sha256(blob).hexdigest(), blob_size=len(blob), samples=2, tokens=128,
                             loss_before=5.0, loss_after=4.0, device="cpu")

    # A real client arrives; once the task timeout has passed, the round is reassigned to it.
    client = clients.start(coordinator.address, data[0], tmp_path / "caches" / "site-0", "site-0")
    wait_for(lambda: (s := coordinator.status()) is not None and (
        s.round > 0 or any(t.round == 0 and t.client_id != late.client_id for t in s.tasks)), 60,
        "round 0 to be reassigned")
    beat = stub.Heartbeat(pb.HeartbeatRequest(task_id=task.task_id, phase="upload"), metadata=metadata, timeout=10)
    assert not beat.task_valid

    # The late upload, while the other client holds the round: refused, nothing changes.
    before = coordinator.status()
    with pytest.raises(grpc.RpcError) as refused:
        raw_upload(stub, metadata, header, blob)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    after = coordinator.status()
    for s in (before, after):
        assert header.blob_sha256 not in {b.sha256 for b in s.blocks}
        assert late.client_id not in {v.client_id for v in s.visits}
        assert s.version == len(s.visits)
    assert [v.task_id for v in after.visits][:len(before.visits)] == [v.task_id for v in before.visits]

    # Again once the round was committed by the other client and the run is over.
    wait_clients([client], timeout=90)
    with pytest.raises(grpc.RpcError) as refused:
        raw_upload(stub, metadata, header, blob)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    done = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=metadata, timeout=10)
    assert done.WhichOneof("outcome") == "done" and done.done.final_version == total
    channel.close()
    assert coordinator.wait(timeout=90) == 0

    state = SqliteState(state_dir / "state.sqlite")
    try:
        expired = state.task(task.task_id)
        assert expired is not None and expired.status == "expired"
        assert all(v.client_id != late.client_id for v in state.visits())
        for version in range(total + 1):
            assert header.blob_sha256 not in state.manifest(version)
        check_history(state, state_dir, total)
        check_reference(tiny_model_dir, state_dir, state, {"site-0": data[0]}, schedule, training)
    finally:
        state.close()


# -- bugs found on the way: a client whose task was reassigned while it was away --------------------
def test_client_survives_its_task_reassigned_while_the_coordinator_was_down(
        medium_model_dir, tmp_path, fault_coordinator, clients: ClientProcesses):
    """A client is mid-download when the coordinator dies; the coordinator comes back and, the
    client having been silent longer than the task timeout, reassigns the round. The client's
    download retry is refused (FAILED_PRECONDITION): it must drop the task like a refused upload
    and carry on with the run."""
    data, _ = write_data(tmp_path, clients=1)
    schedule = ScheduleConfig(cycles=1, order="ascending", lr=1e-3, seed=4)
    training = TrainingConfig(local_steps=2, batch_size=2, seq_len=64)
    state_dir = tmp_path / "state"
    coordinator = fault_coordinator(medium_model_dir, state_dir, schedule, training)
    cache = tmp_path / "caches" / "site-0" / "blobs"
    coordinator.start()
    base = {b.sha256 for b in coordinator.status().blocks}
    client = clients.start(coordinator.address, data[0], cache.parent, "site-0")
    wait_for(lambda: bool(incoming(cache)) or (s := coordinator.status()) is not None and bool(s.tasks), 60,
             "the client's first task", interval=0.005)
    # Frozen in the middle of its download (part of a blob written, not all blobs there) ...
    assert freeze_when(client, lambda: sum(_size(f) for f in incoming(cache)) > 0 and not base <= objects(cache),
                       lambda: base <= objects(cache)), "could not freeze the client mid-download"
    frozen_at = time.monotonic()
    # ... while the coordinator is killed and restarted.
    coordinator.sigkill()
    coordinator.start()
    restarted_at = time.monotonic()
    # Another site asks for work after the task timeout (counted from the restart: the
    # coordinator's downtime is not the client's silence): the silent client's round goes to it.
    time.sleep(max(0.0, max(frozen_at, restarted_at) + TASK_TIMEOUT_S + 0.5 - time.monotonic()))
    channel, stub, metadata, _ = another_site_takes_round_0(coordinator)
    # The client wakes up; its download breaks and is retried against the restarted coordinator.
    os.kill(client.pid, signal.SIGCONT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        client.wait(timeout=5)
    if client.poll() is not None:
        raise ClientCrashed(f"the client exited with {client.returncode} (see site-0.log)")
    # The other site never comes back: after the timeout the client gets the round again.
    wait_clients([client], timeout=90)
    done = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=metadata, timeout=10)
    assert done.WhichOneof("outcome") == "done"
    channel.close()
    assert coordinator.wait(timeout=90) == 0
    state = SqliteState(state_dir / "state.sqlite")
    try:
        check_history(state, state_dir, 4)
        check_reference(medium_model_dir, state_dir, state, {"site-0": data[0]}, schedule, training)
    finally:
        state.close()


def test_client_withdrawn_mid_training_then_given_the_round_again_trains_from_the_base(
        tmp_path, fault_coordinator, clients: ClientProcesses):
    """A client stalls mid-training past the task timeout; its round goes to another site and the
    client, once awake, is told (heartbeat) to drop its visit. The other site vanishes too, so the
    round comes back to the first client: its visit must start again from the base block."""
    model_dir = tmp_path / "one-layer"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        AutoModelForCausalLM.from_config(tiny_config("llama", num_hidden_layers=1)).save_pretrained(model_dir)
    make_byte_tokenizer().save_pretrained(model_dir)
    data, _ = write_data(tmp_path, clients=1)
    schedule = ScheduleConfig(cycles=1, order="ascending", lr=3e-3, seed=6)
    training = TrainingConfig(local_steps=1000, batch_size=2, seq_len=64)
    state_dir = tmp_path / "state"
    store = state_dir / "blobs"
    coordinator = fault_coordinator(model_dir, state_dir, schedule, training)
    cache = tmp_path / "caches" / "site-0" / "blobs"
    coordinator.start()
    client = clients.start(coordinator.address, data[0], cache.parent, "site-0")
    wait_for(lambda: (s := coordinator.status()) is not None and bool(s.tasks), 60, "the client's first task")
    first = coordinator.status().tasks[0]
    base = {b.sha256 for b in coordinator.status().blocks}
    wait_for(lambda: base <= objects(cache), 30, "the client's download", interval=0.01)
    time.sleep(0.3)  # into its 1000 training steps (about 1.5 s)
    os.kill(client.pid, signal.SIGSTOP)
    assert not objects(cache) - objects(store), "the client finished training before it was frozen"
    # Stalled past the task timeout (and past the first heartbeat's 5 s): the round goes elsewhere.
    time.sleep(5.5)
    channel, stub, metadata, handed = another_site_takes_round_0(coordinator)
    # The client wakes up, learns from its heartbeat that the task is gone and drops the visit;
    # the other site never comes back, so after the timeout round 0 returns to the client.
    os.kill(client.pid, signal.SIGCONT)
    wait_clients([client], timeout=90)
    assert "withdrawn" in (cache.parent.parent / "site-0.log").read_text(), "the visit was not withdrawn mid-training"
    done = stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=metadata, timeout=10)
    assert done.WhichOneof("outcome") == "done"
    channel.close()
    assert coordinator.wait(timeout=90) == 0
    state = SqliteState(state_dir / "state.sqlite")
    try:
        first_task, taken_task = state.task(first.task_id), state.task(handed.task_id)
        assert first_task is not None and first_task.status == "expired"
        assert taken_task is not None and taken_task.status == "expired"
        visits = state.visits()
        assert visits[0].client_id == first.client_id and visits[0].task_id not in (first.task_id, handed.task_id)
        check_history(state, state_dir, 2)
        check_reference(model_dir, state_dir, state, {"site-0": data[0]}, schedule, training)
    finally:
        state.close()
