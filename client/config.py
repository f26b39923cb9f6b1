"""The client daemon's configuration: one typed object (see `fedcybgd client --help`)."""
from __future__ import annotations

import re
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
    # Memory this client trains in, told to the coordinator, which then gives it only blocks predicted to fit:
    # a size ("24GiB", "16G", "8000MB") or bytes; "" (default): the device's total memory on CUDA, the host's
    # MemAvailable at start on CPU; "0": unknown (no constraint).
    memory: str | int = ""
    metrics_port: int = 0                  # Prometheus endpoint; 0: off
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("a client needs local data (--data)")
        if not self.insecure and not self.tls_ca:
            raise ValueError("TLS is on by default: give tls_ca (the coordinator's CA certificate), "
                             "or set insecure = true on a trusted network")
        if self.memory != "":
            parse_size(self.memory)  # a typo fails at start, not at registration

    @property
    def memory_bytes(self) -> int | None:
        """The configured memory in bytes, or None when the daemon should measure it."""
        return None if self.memory == "" else parse_size(self.memory)


#: Size suffixes: IEC (KiB, ...) and the bare letters (K, ...) are powers of 1024; SI (kB, MB, ...) of 1000.
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
          "g": 1024**3, "gib": 1024**3, "gb": 1000**3, "t": 1024**4, "tib": 1024**4, "tb": 1000**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(size: str | int) -> int:
    """Bytes of a size such as "24GiB", "1.5G", "8000MB" or 1073741824 (ValueError when it is none)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"memory must not be negative, not {size}")
        return size
    match = _SIZE.match(str(size))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory: {size!r} is not a size (e.g. 24GiB, 16G, 8000MB, or bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
