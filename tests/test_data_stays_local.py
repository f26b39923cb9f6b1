"""Data stays where it is: no training text, and no tokenized training sequence, reaches the
coordinator in any message of a complete run. Every request message is recorded on the server
side, upload chunks are decoded, and the lot is searched."""
from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import ClientProcesses, Coordinators, MessageTap, address_of, wait_clients, write_data
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.codec import decode_chunk
from fedcybgd.common.data import load_packed
from fedcybgd.common.records import load_documents
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.v1 import coordinator_pb2 as pb

pytestmark = pytest.mark.multiprocess


def test_no_training_text_or_tokens_reach_the_coordinator(tiny_model_dir, tmp_path, coordinators: Coordinators,
                                                          clients: ClientProcesses):
    data, _ = write_data(tmp_path, clients=2)
    tap = MessageTap()  # every request message the coordinator receives, whatever the RPC
    running = coordinators.start(interceptors=[tap], schedule=ScheduleConfig(cycles=1),
                                 training=TrainingConfig(local_steps=2, batch_size=2, seq_len=64))
    wait_clients([clients.start(address_of(running), data[i], tmp_path / "caches" / f"site-{i}", f"site-{i}")
                  for i in range(2)])
    coordinators.stop(running, grace=1)  # every request is in the tap
    requests = tap.requests()

    received = []
    blobs = BlobStore(tmp_path / "state" / "blobs")  # delta chunks decode against blobs held here
    for message in requests:
        received.append(message.SerializeToString())
        if isinstance(message, pb.UploadMessage) and message.HasField("chunk"):
            chunk = message.chunk
            delta = blobs.read(chunk.delta_base) if chunk.delta_base else None
            received.append(decode_chunk(chunk, delta))  # what the compressed bytes carry
    assert any(isinstance(m, pb.UploadMessage) for m in requests), "the run uploaded nothing?"
    haystack = b"\0".join(received)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for path in data:
        for doc in load_documents(path):
            assert doc.text is not None
            for line in doc.text.splitlines():
                if len(line.strip()) >= 20:
                    assert line.strip().encode() not in haystack, f"training text reached the coordinator: {line!r}"
        sequences = load_packed(path, tokenizer, 64)
        for row in sequences.ids[:: max(1, len(sequences) // 20)]:
            window = row[:12].numpy()
            for dtype in (np.int64, np.int32, np.int16):
                assert window.astype(dtype).tobytes() not in haystack, "tokenized training data reached the coordinator"
