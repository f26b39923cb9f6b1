"""The client's storage budget: the retention rule on its own, and a real run longer than the budget, during which
every client's block cache stays within it, the 'have' lists name exactly what the clients hold, and version deltas
keep flowing after older versions were evicted."""
from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from conftest import ClientProcesses, Coordinators, address_of, free_port, wait_clients, wait_for, write_data
from fedcybgd.cli.main import CLIENT_FLAGS, _overrides, build_parser
from fedcybgd.client.cache_budget import (
    DEFAULT_MODEL_MULTIPLE,
    BlobRecord,
    CacheBudget,
    CacheIndex,
    default_limit,
    retention_plan,
)
from fedcybgd.client.config import ClientConfig
from fedcybgd.client.metrics import ClientMetrics
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.config import load_config
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.downloads import DownloadPlan, DownloadRequest
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import ClientRow, TaskRow
from fedcybgd.server.tasks import TaskOffer
from fedcybgd.v1 import coordinator_pb2 as pb

# -- the rule ----------------------------------------------------------------------------------------------------


def _sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def test_rule_evicts_oldest_first_and_never_base_newest_or_in_flight():
    held = {_sha(n): 10 for n in ("base", "v1", "v2", "v3", "newest", "flight", "unknown")}
    records = {_sha("base"): BlobRecord(0, base=True), _sha("v1"): BlobRecord(1), _sha("v2"): BlobRecord(2),
               _sha("v3"): BlobRecord(3), _sha("newest"): BlobRecord(4), _sha("flight"): BlobRecord(1)}
    plan = retention_plan(held, records, newest={_sha("newest")}, in_flight={_sha("flight")}, limit=45)
    # 70 held: the unknown blob goes first, then versions oldest first, until 45 are left.
    assert plan.evict == [_sha("unknown"), _sha("v1"), _sha("v2")]
    assert plan.kept_bytes == 40 and plan.floor_bytes == 30 and not plan.over_budget
    # Within the budget: nothing goes.
    assert retention_plan(held, records, {_sha("newest")}, (), limit=70).evict == []
    # A budget below what must stay: everything else goes, the floor stays, and the plan says it is over.
    tight = retention_plan(held, records, {_sha("newest")}, {_sha("flight")}, limit=5)
    assert set(tight.evict) == {_sha(n) for n in ("unknown", "v1", "v2", "v3")}
    assert tight.kept_bytes == tight.floor_bytes == 30 and tight.over_budget


def _entry(index: int, sha: str, size: int, approx: pb.ContextApprox | None = None) -> pb.BlockEntry:
    entry = pb.BlockEntry(index=index, name=f"layers.{index}", sha256=sha, size=size)
    if approx is not None:
        entry.approx.CopyFrom(approx)
    return entry


def _put(store: BlobStore, text: str, size: int = 100) -> str:
    return store.put(text.encode().ljust(size, b"."))


def test_budget_keeps_base_newest_and_the_visit_and_survives_a_restart(tmp_path: Path):
    store = BlobStore(tmp_path / "blobs")
    index_path = tmp_path / "cache-index.json"
    budget = CacheBudget(store, index_path, limit=None, model_bytes=200)
    v0 = [_put(store, "b0 v0"), _put(store, "b1 v0")]
    budget.downloaded(pb.Manifest(version=0, blocks=[_entry(0, v0[0], 100), _entry(1, v0[1], 100)]),
                      pb.Task(kind=pb.TASK_BLOCK, block_index=0))
    assert budget.limit == default_limit(200) == DEFAULT_MODEL_MULTIPLE * 200
    # A partial download left by a broken stream stays for the next download to resume, and goes after it.
    writer = store.resumable_writer(_sha("never finished"), 500)
    writer.write(b"x" * 50)
    writer.abort(keep_partial=True)
    assert not budget.before_download().evicted and store.partial_sizes()
    v3 = [_put(store, "b0 v3"), _put(store, "b1 v3")]  # version 3 changed both blocks
    done = budget.downloaded(pb.Manifest(version=3, blocks=[_entry(0, v3[0], 100), _entry(1, v3[1], 100)]),
                             pb.Task(kind=pb.TASK_BLOCK, block_index=1))
    assert not store.partial_sizes() and done.partials_removed == 1
    assert set(store) == {*v0, *v3}  # 400 bytes + room for the visit's block: within 600
    # The client's trained block 1 became version 4.
    trained = _put(store, "b1 v4")
    budget.accepted(pb.Task(kind=pb.TASK_BLOCK, block_index=1),
                    pb.UploadHeader(block_index=1, blob_sha256=trained, base_version=3),
                    pb.UploadResponse(new_version=4, blob_sha256=trained))
    older = [_put(store, f"b1 v{v}") for v in (1, 2)]  # blobs the index does not know (an older client's)
    assert budget.after_visit().evicted == 1  # 700 bytes held, 600 allowed: an unknown blob goes first
    assert set(store) == {*v0, *v3, trained, max(older)}

    # A new budget object on the same cache (a restart) knows what is what.
    restarted = CacheBudget(store, index_path, limit=450, model_bytes=200)
    assert restarted.index.newest[1] == (4, trained)
    restarted.after_visit()
    # Over 450: the other unknown blob, then v3 of block 1 (no longer the newest) go; base and newest stay.
    assert set(store) == {*v0, v3[0], trained}
    restarted.after_visit()
    assert set(store) == {*v0, v3[0], trained}, "nothing more may go: all of it must stay"
    assert store.disk_bytes() == 400


def test_an_approximated_block_leaves_the_held_version_its_newest(tmp_path: Path):
    store = BlobStore(tmp_path / "blobs")
    budget = CacheBudget(store, tmp_path / "index.json", limit=10_000, model_bytes=200)
    held = _put(store, "b0 v0")
    budget.downloaded(pb.Manifest(version=0, blocks=[_entry(0, held, 100)]), pb.Task(kind=pb.TASK_BLOCK))
    encoded = _put(store, "int8 of b0 v5", 30)
    approx = pb.ContextApprox(codec=pb.CONTEXT_INT8, sha256=encoded, reference_sha256=held)
    budget.downloaded(pb.Manifest(version=5, blocks=[_entry(0, _sha("b0 v5"), 100, approx)]),
                      pb.Task(kind=pb.TASK_BLOCK))
    assert budget.index.newest[0] == (0, held)
    assert budget.index.records[encoded].version == 5 and not budget.index.records[encoded].base


def test_an_unreadable_index_starts_over(tmp_path: Path):
    path = tmp_path / "cache-index.json"
    path.write_text("{not json")
    assert CacheIndex.load(path) == CacheIndex()


def test_blobstore_remove_and_disk_bytes(tmp_path: Path):
    store = BlobStore(tmp_path)
    sha = store.put(b"a" * 64)
    assert store.disk_bytes() == 64
    assert store.remove(sha) == 64 and not store.has(sha) and store.remove(sha) == 0
    assert store.disk_bytes() == 0
    with pytest.raises(ValueError):
        store.discard_partial("../../etc")


def test_cache_max_bytes_flag_and_metrics(tmp_path: Path):
    args = build_parser().parse_args(["client", "--data", "d.txt", "--insecure", "--cache-max-bytes", "2GiB"])
    config = load_config(ClientConfig, None, _overrides(args, CLIENT_FLAGS))
    assert config.cache_limit_bytes == 2 * 2**30
    assert ClientConfig(data="d", insecure=True).cache_limit_bytes is None  # 0: from the model's size
    with pytest.raises(ValueError, match="not a size"):
        ClientConfig(data="d", insecure=True, cache_max_bytes="lots")
    import torch

    metrics = ClientMetrics(torch.device("cpu"))
    store = BlobStore(tmp_path / "blobs")
    store.put(b"z" * 1000)
    CacheBudget(store, tmp_path / "index.json", limit=5000, model_bytes=100, metrics=metrics)
    text = generate_latest(metrics.registry).decode()
    assert "fedcybgd_client_cache_bytes 1000.0" in text
    assert "fedcybgd_client_cache_limit_bytes 5000.0" in text


# -- a real run longer than the budget ---------------------------------------------------------------------------

SCHEDULE = ScheduleConfig(cycles=5, lr=1e-4, seed=5)
TRAINING = TrainingConfig(local_steps=1, batch_size=2, seq_len=32)


@dataclass
class CacheWatch:
    """Polls each client's block cache folder (and its metrics) while the run goes on."""

    dirs: dict[str, Path]
    ports: dict[str, int]
    peak: dict[str, int] = field(default_factory=dict)
    seen: dict[str, dict[str, int]] = field(default_factory=dict)  # every blob each client held, and its size
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def snapshot(self, name: str) -> dict[str, int]:
        held: dict[str, int] = {}
        objects = self.dirs[name] / "blobs" / "objects"
        for path in objects.glob("*/*"):
            with contextlib.suppress(FileNotFoundError):
                held[path.name] = path.stat().st_size
        return held

    def folder_bytes(self, name: str) -> int:
        total = 0
        for path in (self.dirs[name] / "blobs").rglob("*"):
            with contextlib.suppress(FileNotFoundError):
                if path.is_file():
                    total += path.stat().st_size
        return total

    def scrape(self, name: str) -> None:
        with contextlib.suppress(OSError):
            body = urllib.request.urlopen(f"http://127.0.0.1:{self.ports[name]}/metrics", timeout=2).read().decode()
            for metric in ("fedcybgd_client_cache_bytes", "fedcybgd_client_cache_limit_bytes",
                           "fedcybgd_client_cache_evicted_blobs_total"):
                found = re.search(rf"^{metric} ([0-9.e+]+)$", body, re.M)
                if found:
                    self.metrics.setdefault(name, {})[metric] = float(found.group(1))

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for name in self.dirs:
                if (self.dirs[name] / "blobs").is_dir():
                    self.peak[name] = max(self.peak.get(name, 0), self.folder_bytes(name))
                    self.seen.setdefault(name, {}).update(self.snapshot(name))
                    self.scrape(name)


@pytest.mark.multiprocess
def test_a_run_longer_than_the_budget_stays_within_it_and_deltas_still_flow(tmp_path: Path, coordinators: Coordinators,
                                                                         clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=2)
    running = coordinators.start(schedule=SCHEDULE, training=TRAINING)
    coordinator = running.coordinator
    model_bytes = sum(coordinator.store.blobs.size(sha) for sha in coordinator.state.manifest(0))
    dirs = {f"site-{i}": tmp_path / "caches" / f"site-{i}" for i in range(2)}
    limits = {"site-0": default_limit(model_bytes), "site-1": int(3.2 * model_bytes)}

    # What the coordinator was asked and planned, with each client's cache as it was at that moment (the client
    # waits for the manifest meanwhile: its cache does not change).
    planned: list[tuple[TaskRow, DownloadRequest, DownloadPlan, dict[str, set[str]]]] = []
    plan = coordinator.downloads.plan

    def recording_plan(task: TaskRow, request: DownloadRequest) -> DownloadPlan:
        result = plan(task, request)
        held = {name: set(watch.snapshot(name)) for name in dirs}
        planned.append((task, request, result, held))
        return result

    coordinator.downloads.plan = recording_plan  # type: ignore[method-assign]
    # No task before both clients have registered: a client that starts a few seconds later would otherwise find
    # most of the (fast) visits done and never hold more than its budget (a race an idle machine loses).
    get_task = coordinator.tasks.get_task

    def after_both_registered(client: ClientRow, wait_seconds: int) -> TaskOffer:
        wait_for(lambda: len(coordinator.state.clients()) >= 2, 120, "both clients to register")
        return get_task(client, wait_seconds)

    coordinator.tasks.get_task = after_both_registered  # type: ignore[method-assign]
    watch = CacheWatch(dirs, {name: free_port() for name in dirs})
    poller = threading.Thread(target=watch.run, daemon=True)
    poller.start()
    procs = [clients.start(address_of(running), data[i], dirs[f"site-{i}"], f"site-{i}",
                           "--metrics-port", str(watch.ports[f"site-{i}"]),
                           *(["--cache-max-bytes", str(limits["site-1"])] if i == 1 else []))
             for i in range(2)]
    try:
        wait_clients(procs)
    finally:
        watch.stop.set()
        poller.join(timeout=10)
    latest = coordinator.state.latest_version()
    assert latest is not None and latest[0] > SCHEDULE.cycles * 4  # 4 layers a cycle, embed_head too

    names = {c.id: c.name for c in coordinator.state.clients()}
    for name, cache_dir in dirs.items():
        limit = limits[name]
        # The run was longer than the budget: this client held more than it allows over the run, and evicted.
        assert sum(watch.seen[name].values()) > limit, (name, sum(watch.seen[name].values()), limit)
        assert watch.metrics[name]["fedcybgd_client_cache_limit_bytes"] == limit
        assert watch.metrics[name]["fedcybgd_client_cache_evicted_blobs_total"] > 0
        # ... and the cache stayed within it, at every poll and at the end.
        assert watch.peak[name] <= limit, (name, watch.peak[name], limit)
        assert watch.folder_bytes(name) <= limit
        assert (cache_dir / "cache-index.json").is_file()
        store = BlobStore(cache_dir / "blobs")
        assert not store.partial_sizes()
        for sha in store:  # what is left is intact
            assert hashlib.sha256(store.read(sha)).hexdigest() == sha
        log = (cache_dir.parent / f"{name}.log").read_text()
        assert "block cache:" in log and "older blobs" in log

    # Each download after evictions: 'have' named what the client held, deltas were planned only against it, and
    # a download of nothing but deltas cost less on the wire than the whole blobs it brought.
    visits = {v.task_id: v for v in coordinator.state.visits()}
    delta_downloads = 0
    evicted: dict[str, set[str]] = {name: set() for name in dirs}
    seen_by: dict[str, set[str]] = {name: set() for name in dirs}
    for task, request, result, held in planned:
        name = names[task.client_id]
        have = set(request.have)
        assert have == held[name], f"{name}: 'have' must list exactly what the cache holds"
        evicted[name] |= seen_by[name] - have
        seen_by[name] |= have
        for blob in result.blobs:
            assert blob.delta_base is None or blob.delta_base in have, "a delta base the client does not hold"
        if evicted[name] and result.blobs and all(blob.delta_base for blob in result.blobs) and task.id in visits:
            delta_downloads += 1
            whole = sum(coordinator.store.blobs.size(blob.sha256) for blob in result.blobs)
            assert visits[task.id].record.bytes_down < whole, (name, visits[task.id].record.bytes_down, whole)
    assert all(evicted.values()), "every client evicted older versions during the run"
    assert delta_downloads >= 3, "blocks still travel as deltas after evictions"
