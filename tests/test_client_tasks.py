"""The client's task handlers (client/tasks.py): one per task kind, unknown kinds refused before any download, the
upload's delta decision, the proto -> VisitHyper mapping, and the partition check against ModelInfo.num_blocks."""
from __future__ import annotations

from typing import cast

import pytest
import torch

from fedcybgd.client.config import ClientConfig
from fedcybgd.client.daemon import ClientDaemon
from fedcybgd.client.tasks import HANDLERS, TaskRefused, VisitContext, handler_for, visit_hyper_from_proto
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.coordinator import Coordinator
from fedcybgd.training import VisitHyper
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc


def test_every_task_kind_has_a_handler_and_no_other():
    assert set(HANDLERS) == set(pb.TaskKind.values()) - {pb.TASK_KIND_UNSPECIFIED}
    for kind, handler in HANDLERS.items():
        assert handler_for(pb.Task(kind=kind)) is handler


@pytest.mark.parametrize("kind, named", [(pb.TASK_KIND_UNSPECIFIED, "TASK_KIND_UNSPECIFIED"), (99, "99")])
def test_a_task_of_unknown_kind_is_refused(kind, named):
    with pytest.raises(TaskRefused, match=f"kind {named}, which this client cannot train"):
        handler_for(pb.Task(task_id="t-1", round=3, kind=kind))


def test_a_refused_task_downloads_nothing(tmp_path):
    daemon = ClientDaemon(ClientConfig(coordinator="127.0.0.1:9", data=str(tmp_path / "none.txt"), insecure=True,
                                       cache_dir=str(tmp_path / "cache"), retry_seconds=0))
    try:
        with pytest.raises(TaskRefused):  # (a download would fail at once: no server, no retries)
            daemon.visit(pb.Task(task_id="t-1", kind=pb.TASK_KIND_UNSPECIFIED))
        assert daemon._task_id == "" and daemon._phase == "idle" and list(daemon.cache) == []
    finally:
        daemon.channel.close()


def test_visit_hyper_from_proto():
    proto = pb.Hyper(lr=0.25, local_steps=3, batch_size=4, seq_len=16, seed=7, weight_decay=0.5, max_grad_norm=2.0)
    assert visit_hyper_from_proto(proto) == VisitHyper(lr=0.25, steps=3, batch_size=4, seq_len=16, seed=7,
                                                       weight_decay=0.5, max_grad_norm=2.0)


@pytest.mark.parametrize("codec, base_bytes, delta", [
    (pb.CODEC_BYTEGROUP, b"a" * 8, True),   # same layout: a delta against the version the visit started from
    (pb.CODEC_BYTEGROUP, b"a" * 9, False),  # another layout: sent whole
    (pb.CODEC_ZSTD, b"a" * 8, False),       # a coordinator without byte grouping: sent whole
])
def test_outgoing_blob_is_cached_and_a_delta_only_where_it_can_be(tmp_path, codec, base_bytes, delta):
    cache = BlobStore(tmp_path / "blobs")
    started = cache.put(base_bytes)
    # (outgoing() does not touch the model: an empty module stands in for it)
    ctx = VisitContext(model=torch.nn.Module(), specs=[], loaded={}, cache=cache, lora=pb.LoraSpec(),
                       upload_codec=codec)
    blob = ctx.outgoing(b"b" * 8, 2, started)
    assert cache.has(blob.sha256) and blob.data == b"b" * 8 and blob.word_size == 2
    assert blob.delta_base == (started if delta else None)


class _InfoStub:
    def __init__(self, info: pb.ModelInfo) -> None:
        self.info = info

    def GetModelInfo(self, request, metadata):  # noqa: N802 (the gRPC method's name)
        return self.info


def test_a_partition_other_than_the_coordinators_is_refused(tmp_path, tiny_model_dir):
    coordinator = Coordinator(CoordinatorConfig(insecure=True, model=str(tiny_model_dir),
                                                state_dir=str(tmp_path / "state")))
    info = coordinator.model_info()  # the coordinator's real answer, handed over without a server
    coordinator.close()
    daemon = ClientDaemon(ClientConfig(coordinator="127.0.0.1:9", data=str(tmp_path / "none.txt"), insecure=True,
                                       cache_dir=str(tmp_path / "cache"), device="cpu"))
    try:
        assert info.num_blocks == 5  # the tiny llama: 4 decoder layers + embed_head
        info.num_blocks = 99
        daemon.stub = cast(pb_grpc.CoordinatorStub, _InfoStub(info))  # a test double: GetModelInfo only
        with pytest.raises(ValueError, match="into 99 blocks of 1 decoder layers, this client into"):
            daemon._prepare_model()
        info.num_blocks = 5
        daemon._prepare_model()
        assert daemon.resident is not None and len(daemon.resident.specs) == 5
    finally:
        daemon.channel.close()
