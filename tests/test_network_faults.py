"""Connections cut mid-transfer, by a TCP proxy between a real client process and the
coordinator: the download resumes from the last verified chunk instead of starting over (the
bytes sent again are counted and bounded), and the broken upload is retried cleanly with nothing
partial committed."""
from __future__ import annotations

import contextlib
import socket
import threading

import pytest
from transformers import AutoModelForCausalLM

from conftest import ClientProcesses, Coordinators, wait_clients, write_data
from fedcybgd.common.tiny import make_byte_tokenizer, tiny_config
from fedcybgd.server.config import TrainingConfig
from fedcybgd.server.scheduler import ScheduleConfig

pytestmark = pytest.mark.multiprocess

CHUNK = 256 * 1024


class CuttingProxy:
    """Forwards loopback TCP to the coordinator; counts bytes each way and cuts a connection once:
    the first when it has carried `cut_down` bytes to the client, and the first that carries
    `cut_up` bytes to the server."""

    def __init__(self, upstream_port: int, cut_down: int, cut_up: int) -> None:
        self.upstream_port, self.cut_down, self.cut_up = upstream_port, cut_down, cut_up
        self.down = self.up = 0
        self.cuts: list[str] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._connections += 1
            state = {"down": 0, "up": 0, "first": self._connections == 1, "closed": False}
            for src, dst, direction in ((upstream, client, "down"), (client, upstream, "up")):
                threading.Thread(target=self._pump, args=(src, dst, direction, state, (client, upstream)),
                                 daemon=True).start()

    def _pump(self, src, dst, direction, state, pair) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    if direction == "down" and state["first"] and "down" not in self.cuts:
                        allowed = self.cut_down - state["down"]
                        if len(data) >= allowed:
                            dst.sendall(data[:allowed])
                            self.down += allowed
                            self.cuts.append("down")
                            raise ConnectionAbortedError
                    if direction == "up" and "up" not in self.cuts and state["up"] + len(data) >= self.cut_up:
                        self.cuts.append("up")
                        raise ConnectionAbortedError
                    state[direction] += len(data)
                    if direction == "down":
                        self.down += len(data)
                    else:
                        self.up += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in pair:  # cut both directions at once, like a broken link
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def close(self) -> None:
        self._listener.close()


def _model_dir(tmp_path):
    """A few MB per block, so transfers take many chunks."""
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=256, intermediate_size=1024,
                                                         num_attention_heads=4, num_key_value_heads=2))
    path = tmp_path / "model"
    model.save_pretrained(str(path))
    make_byte_tokenizer().save_pretrained(str(path))
    return path


def test_cut_download_resumes_and_cut_upload_retries_cleanly(tmp_path, coordinators: Coordinators,
                                                             clients: ClientProcesses):
    model_dir = _model_dir(tmp_path)
    data, _ = write_data(tmp_path, clients=1)
    running = coordinators.start(model=str(model_dir), chunk_bytes=CHUNK, schedule=ScheduleConfig(cycles=1),
                                 training=TrainingConfig(local_steps=1, batch_size=1, seq_len=32))
    coordinator = running.coordinator
    model_wire = sum(coordinator.store.blobs.size(sha) for sha in coordinator.state.manifest(0))
    block0 = coordinator.store.blobs.size(coordinator.state.manifest(0)[0])
    # Cut the download a third of the way in; cut the upload (of block 0, > 1 MB raw) three chunks in: its delta
    # compresses to a fraction of the raw block, so a cut at half the raw size could come after its end.
    assert block0 > 6 * CHUNK
    proxy = CuttingProxy(running.port, cut_down=model_wire // 3, cut_up=3 * CHUNK)
    try:
        client = clients.start(f"127.0.0.1:{proxy.port}", data[0], tmp_path / "caches" / "site-0", "site-0",
                               "--max-visits", "1")
        wait_clients([client], timeout=180)
    finally:
        proxy.close()
    coordinators.stop(running, grace=1)  # every call handled: what is left on disk is final

    assert proxy.cuts == ["down", "up"], proxy.cuts
    log = (tmp_path / "caches" / "site-0.log").read_text()
    assert "resuming after" in log, log[-3000:]

    # Resumed, not restarted: the bytes sent twice are at most what was in flight at the cut.
    resent = proxy.down - model_wire
    assert resent < 4 * CHUNK + 256 * 1024, f"{resent} bytes sent again (model {model_wire})"
    assert resent < model_wire // 3 // 2, "the download started over"

    # The upload was retried whole and committed exactly once; nothing partial anywhere.
    visits = coordinator.state.visits()
    latest = coordinator.state.latest_version()
    assert [v.round for v in visits] == [0] and latest is not None and latest[0] == 1
    assert coordinator.store.blobs.has(visits[0].blob_sha256)
    assert not list((tmp_path / "state" / "blobs" / "tmp").iterdir())
    assert not list((tmp_path / "caches" / "site-0" / "blobs" / "partial").iterdir())
