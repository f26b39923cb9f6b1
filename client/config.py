"""The client daemon's configuration: one typed object (see `fedcybgd client --help`)."""
from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass, field

from fedcybgd.common.delta_arith import accepted as accepted_deltas
from fedcybgd.common.records import RecordOptions, parse_columns
from fedcybgd.common.sizes import parse_size
from fedcybgd.training.compact import COMPACT_METHODS

__all__ = ["ClientConfig", "parse_size"]


@dataclass(frozen=True)
class ClientConfig:
    coordinator: str = "127.0.0.1:50051"
    data: str = ""                         # local training data: a file or directory (formats: common/records.py)
    # How the data's records are read: its column names -> record fields ("question=instruction,answer=output", or a
    # TOML table), the split of a save_to_disk directory holding several, and whether records that cannot be used
    # are skipped (counted and logged) rather than stopping the client with an error naming the first.
    data_columns: str | dict[str, str] = ""
    data_split: str = ""
    skip_invalid_records: bool = False
    cache_dir: str = "./fedcybgd-cache"    # block cache (content-addressed), identity, tokenizer
    # Budget of the block cache (blobs and partial downloads): a size ("20GiB", "500MB") or bytes; 0 (default): 3x
    # the model's bytes, which holds the base weights, the newest version of each block and one whole download.
    # Older versions go first; the base, the newest versions and the visit's blobs always stay
    # (client/cache_budget.py).
    cache_max_bytes: str | int = 0
    # Version deltas, both ways: "arith" (the arithmetic float delta where the coordinator decodes it, else XOR) or
    # "xor" (XOR only: the older encoding, e.g. to compare; common/delta_arith.py).
    deltas: str = "arith"
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
    # Frozen decoder layers held quantized during a block visit: "int8" or "nf4" (needs torchao); "" (default):
    # exact. Less memory, but the block's gradients pass through approximated layers (a lossy option).
    compact_frozen: str = ""
    # Memory this client trains in, told to the coordinator, which then gives it only blocks predicted to fit:
    # a size ("24GiB", "16G", "8000MB") or bytes; "" (default): the device's total memory on CUDA, the host's
    # MemAvailable at start on CPU; "0": unknown (no constraint).
    memory: str | int = ""
    # This site's own differential-privacy limit (epsilon at the run's delta, either level), whatever the
    # coordinator's target; > 0 also refuses a run that is not private. 0 (default): the run's target only.
    max_epsilon: float = 0.0
    metrics_port: int = 0                  # Prometheus endpoint; 0: off
    metrics_address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("a client needs local data (--data)")
        if not self.max_epsilon >= 0:
            raise ValueError("max_epsilon must be >= 0 (0: the run's privacy target only)")
        if not self.insecure and not self.tls_ca:
            raise ValueError("TLS is on by default: give tls_ca (the coordinator's CA certificate), "
                             "or set insecure = true on a trusted network")
        if self.compact_frozen not in ("", *COMPACT_METHODS):
            raise ValueError(f"compact_frozen must be one of {', '.join(COMPACT_METHODS)} (or empty: off), "
                             f"not {self.compact_frozen!r}")
        if self.compact_frozen and importlib.util.find_spec("torchao") is None:
            raise ValueError("compact_frozen needs torchao: pip install 'fedcybgd[compact]' (torchao==0.18.0)")
        if self.memory != "":
            parse_size(self.memory)  # a typo fails at start, not at registration
        parse_size(self.cache_max_bytes)
        parse_columns(self.data_columns)
        accepted_deltas(self.deltas)  # a typo fails at start

    @property
    def record_options(self) -> RecordOptions:
        return RecordOptions(columns=parse_columns(self.data_columns), split=self.data_split,
                             skip_invalid=self.skip_invalid_records)

    @property
    def cache_limit_bytes(self) -> int | None:
        """The block cache's budget in bytes, or None when it follows from the model's size."""
        return parse_size(self.cache_max_bytes) or None

    @property
    def memory_bytes(self) -> int | None:
        """The configured memory in bytes, or None when the daemon should measure it."""
        return None if self.memory == "" else parse_size(self.memory)
