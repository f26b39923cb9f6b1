"""The client daemon's configuration: one typed object (see `fedcybgd client --help`)."""
from __future__ import annotations

import socket
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClientConfig:
    coordinator: str = "127.0.0.1:50051"
    data: str = ""                         # local training data: a .txt/.jsonl file or a directory of them
    cache_dir: str = "./fedcybgd-cache"    # block cache (content-addressed), identity, tokenizer
    name: str = field(default_factory=socket.gethostname)
    device: str = "auto"                   # "auto": CUDA when present, else CPU; or "cpu", "cuda:1", ...
    base_model: str | None = None          # local Hugging Face directory with the base weights, if held
    threads: int = 0                       # torch CPU threads; 0: torch's default
    poll_seconds: int = 20                 # long-poll length of GetTask
    retry_seconds: float = 600.0           # give up when the coordinator is unreachable this long
    max_visits: int = 0                    # stop after this many visits; 0: until the run is done
    insecure: bool = False                 # plaintext: only for tests and trusted loopback runs
    tls_ca: str | None = None              # CA that signed the coordinator's certificate
    tls_cert: str | None = None            # this site's client certificate (mutual TLS)
    tls_key: str | None = None
    server_name: str | None = None         # expected name in the coordinator's certificate, if not the host
    join_token: str | None = None          # enrolment secret, when the coordinator requires one
    # Memory/compute options of a block visit (docs/benchmarks.md, "Client memory and compute"):
    checkpoint_above: bool = False         # recompute activations of the layers above the block: less memory, slower
    cache_block_inputs: bool = False       # keep the block's inputs when rows recur within a visit (local epochs)
    metrics_port: int = 0                  # Prometheus endpoint; 0: off
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("a client needs local data (--data)")
        if not self.insecure and not self.tls_ca:
            raise ValueError("TLS is on by default: give tls_ca (the coordinator's CA certificate), "
                             "or set insecure = true on a trusted network")
