"""The coordinator's disk fills up during an upload: the client is told so (RESOURCE_EXHAUSTED, not an internal
error), nothing half-written stays behind, and the client's retry goes through once there is space again."""
from __future__ import annotations

import errno
import threading

import pytest

from conftest import address_of, wait_clients, wait_for, write_data
from fedcybgd.common.blobstore import BlobWriter
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.uploads import UploadReceiver
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess


def test_upload_to_a_full_disk_is_refused_cleanly_and_retried(tmp_path, coordinators, clients, monkeypatch):
    full = {"uploads": 2}  # the first two uploads find the disk full, mid-blob
    uploading = threading.local()
    receive, write = UploadReceiver.receive, BlobWriter.write

    def receive_on_a_full_disk(self, *args, **kwargs):
        uploading.full = full["uploads"] > 0
        full["uploads"] -= 1
        try:
            return receive(self, *args, **kwargs)
        finally:
            uploading.full = False

    def write_on_a_full_disk(self, data):
        if getattr(uploading, "full", False):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(UploadReceiver, "receive", receive_on_a_full_disk)
    monkeypatch.setattr(BlobWriter, "write", write_on_a_full_disk)
    running = coordinators.start(schedule=ScheduleConfig(cycles=1, order="ascending", lr=3e-3),
                                 training=TrainingConfig(local_steps=2, batch_size=2, seq_len=32))
    coordinator = running.coordinator
    data, _ = write_data(tmp_path, clients=1)
    cache = tmp_path / "caches" / "site-0"
    wait_clients([clients.start(address_of(running), data[0], cache, "site-0")])
    wait_for(lambda: coordinator.status(pb.GetStatusRequest()).run_state == "done", 60, "the run's end")
    status = coordinator.status(pb.GetStatusRequest())
    assert full["uploads"] < 0  # the full disk was hit, and later uploads went through
    assert len(status.visits) == len(coordinator.run.specs)  # every visit merged, none lost to the full disk
    log = (cache.parent / "site-0.log").read_text()
    assert "disk is full" in log and "BufferError" not in log  # told why, retried
    store_tmp = coordinator.store.blobs.tmp_dir
    assert not list(store_tmp.glob("incoming-*"))  # the aborted uploads left nothing behind
