"""The coordinator's configuration: one typed object (see `fedcybgd coordinator --help`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from fedcybgd.common.codec import DEFAULT_CHUNK_BYTES, DEFAULT_ZSTD_LEVEL, MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedcybgd.common.context import DEFAULT_GROUP_SIZE
from fedcybgd.common.context import METHODS as CONTEXT_METHODS
from fedcybgd.common.delta_arith import accepted as accepted_deltas
from fedcybgd.common.partition import check_layout
from fedcybgd.common.prompts import TRAIN_ON
from fedcybgd.common.records import RecordOptions, parse_columns
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.strategies import STRATEGIES
from fedcybgd.training.hyper import VisitHyper
from fedcybgd.training.lora import LoraConfig


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters every visit carries, besides the scheduled learning rate and seed."""

    local_steps: int = 10
    batch_size: int = 4
    seq_len: int = 256
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def visit_hyper(self, lr: float, seed: int) -> VisitHyper:
        """A visit's hyper-parameters: these settings with the scheduled learning rate and the visit's seed.
        The one mapping from settings to a visit: tasks on the wire and the references both use it."""
        return VisitHyper(lr=lr, steps=self.local_steps, batch_size=self.batch_size, seq_len=self.seq_len, seed=seed,
                          weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)


@dataclass(frozen=True)
class PromptConfig:
    """How instruction and chat records become text, fixed for the run (``common/prompts.py``) and sent to every
    client with the model info: ``format`` "auto" (the tokenizer's chat template, else Alpaca's), "alpaca",
    "tokenizer", or a Jinja template file; ``train_on`` "responses" (loss on the assistant turns only) or "all"."""

    format: str = "auto"
    train_on: str = "responses"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"prompt.train_on must be one of {', '.join(TRAIN_ON)}, not {self.train_on!r}")
        if not self.format:
            raise ValueError("prompt.format must be auto, alpaca, tokenizer or a template file")


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation on the coordinator (data no client sees). ``columns``, ``split`` and ``skip_invalid``
    read the data as a client's options do (``common/records.py``)."""

    data: str | None = None
    max_sequences: int = 64
    batch_size: int = 8
    every_cycle: bool = True
    columns: str | dict[str, str] = ""     # e.g. "question=instruction,answer=output" (or a TOML table)
    split: str = ""                        # the split of a save_to_disk directory holding several
    skip_invalid: bool = False             # skip (and count) records that cannot be used instead of failing

    def __post_init__(self) -> None:
        parse_columns(self.columns)  # a malformed mapping fails at start

    @property
    def record_options(self) -> RecordOptions:
        return RecordOptions(columns=parse_columns(self.columns), split=self.split, skip_invalid=self.skip_invalid)


@dataclass(frozen=True)
class ContextConfig:
    """Lossy download compression of the frozen blocks of a visit (the trainable block is always
    exact). Off by default: every option trades quality for bytes; docs/benchmarks.md measures how."""

    method: str = "none"          # none | int8 | int4 | prune | drop
    ratio: float | None = None    # prune: share of the difference zeroed (0.9); drop: share of blocks not sent (0.5)
    group_size: int = DEFAULT_GROUP_SIZE  # int8 / int4: values per fp32 scale

    def __post_init__(self) -> None:
        if self.method not in CONTEXT_METHODS:
            raise ValueError(f"context method must be one of {CONTEXT_METHODS}, not {self.method!r}")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise ValueError("context ratio must be in [0, 1)")
        if not 8 <= self.group_size <= 4096 or self.group_size % 2:
            raise ValueError("context group_size must be an even number in [8, 4096]")

    @property
    def effective_ratio(self) -> float:
        return self.ratio if self.ratio is not None else {"prune": 0.9, "drop": 0.5}.get(self.method, 0.0)


@dataclass(frozen=True)
class RetentionConfig:
    """Which model versions the coordinator keeps on disk (``server/retention.py``): the base (0), the newest, the
    versions in-flight tasks started from, the ones active clients hold (their best delta bases), the version with
    the lowest held-out loss so far (``fedcybgd export --best``), and checkpoints.
    ``checkpoint_every``: None: the last version of every cycle (the run replays from its checkpoints); 0: keep every
    version; N: every N-th version. ``active_client_s``: a client heard from within this long counts as active."""

    checkpoint_every: int | None = None
    active_client_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.checkpoint_every is not None and self.checkpoint_every < 0:
            raise ValueError("retention.checkpoint_every must be 0 (keep every version), N > 0, or unset (each cycle)")
        if self.active_client_s < 0:
            raise ValueError("retention.active_client_s must be >= 0")


@dataclass(frozen=True)
class RateLimitConfig:
    """Per-client token buckets on every RPC (``server/ratelimit.py``): ``<rpc>_per_s`` tokens refill each second, up
    to ``<rpc>_burst``. The defaults are far above what a daemon does (one long-polling GetTask at a time, a
    Heartbeat every few seconds, one DownloadModel and UploadBlock per visit, each retried a few times; tools and
    tests that poll fast) and bound only floods (thousands of calls a second). Register and GetStatus are counted
    per peer address (no client identity yet / operators). ``enabled = false`` turns every limit off."""

    enabled: bool = True
    register_per_s: float = 10.0
    register_burst: int = 200
    get_model_info_per_s: float = 5.0
    get_model_info_burst: int = 50
    heartbeat_per_s: float = 20.0
    heartbeat_burst: int = 200
    get_task_per_s: float = 20.0
    get_task_burst: int = 200
    download_model_per_s: float = 10.0
    download_model_burst: int = 100
    upload_block_per_s: float = 10.0
    upload_block_burst: int = 100
    get_status_per_s: float = 50.0
    get_status_burst: int = 500
    decline_task_per_s: float = 5.0
    decline_task_burst: int = 50

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if name != "enabled" and not value > 0:
                raise ValueError(f"rate_limits.{name} must be > 0 (set rate_limits.enabled = false to turn limits off)")


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy of each site's records (off by default; docs/security.md says what it protects).

    ``records``: DP-SGD within every visit: each training sequence's gradient clipped to ``clip_norm``, Gaussian
    noise of std ``noise_multiplier * clip_norm`` added to the sum, sequences drawn by Poisson sampling.
    ``updates``: the visit's update (trained minus started-from) clipped to ``update_clip_norm`` with noise of std
    ``update_noise_multiplier * update_clip_norm`` before upload, against a curious coordinator. Each site composes
    its epsilon at ``delta`` over all its visits (RDP accountant) and declines a task that would take either level
    past ``target_epsilon`` (0: no limit, epsilon only reported)."""

    records: bool = False
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    updates: bool = False
    update_noise_multiplier: float = 1.0
    update_clip_norm: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.noise_multiplier < 0 or self.update_noise_multiplier < 0:
            raise ValueError("privacy noise multipliers must be >= 0")
        if not self.clip_norm > 0 or not self.update_clip_norm > 0:
            raise ValueError("privacy clip norms must be > 0")
        if self.target_epsilon < 0:
            raise ValueError("privacy.target_epsilon must be >= 0 (0: no limit)")
        if not 0 < self.delta < 1:
            raise ValueError("privacy.delta must be in (0, 1), e.g. 1e-5 or less than 1 / a site's records")

    @property
    def enabled(self) -> bool:
        return self.records or self.updates


@dataclass(frozen=True)
class CoordinatorConfig:
    model: str = ""                       # Hugging Face model directory (safetensors + tokenizer)
    state_dir: str = "./fedcybgd-state"
    address: str = "127.0.0.1:50051"
    layers_per_block: int = 1
    # How decoder layers are grouped: "contiguous" (block k: layers kL..kL+L-1, the paper's) or "strided" (block k of
    # B: layers k, k+B, k+2B, ...; common/partition.py). None: a new run's default (NEW_RUN_LAYOUT), a restarted run's
    # own (the layout it was created with).
    block_layout: str | None = None
    # Bound on the parameters of a block outside the decoder layers (embeddings, head; a larger matrix is split into
    # row ranges): None: the largest decoder-layer block; 0: no bound (one embed_head block).
    max_block_params: int | None = None
    dtype: str = "auto"                   # "auto" (as stored), "float32", "bfloat16", "float16"
    strategy: str = "cybgd"               # cybgd | cybgd-parallel | fedavg-full | fedlora (server/strategies/)
    max_concurrent_visits: int = 1        # 1: sequential, as in the paper; K > 1: parallel mode
    clients_per_round: int = 2            # fedavg-full / fedlora: distinct clients per round
    heartbeat_interval_s: int = 5
    task_timeout_s: float = 300.0         # no heartbeat and no transfer progress for this long: reassign
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    # Version deltas, both ways: "arith" (the arithmetic float delta where the client decodes it, else XOR) or "xor"
    # (XOR only: the older encoding, e.g. to compare; common/delta_arith.py).
    deltas: str = "arith"
    metrics_port: int = 0                 # Prometheus endpoint; 0: off
    metrics_address: str = "127.0.0.1"
    # Security: TLS is on unless `insecure` says otherwise (tests, a trusted loopback demo).
    insecure: bool = False
    tls_cert: str | None = None           # server certificate (PEM); `fedcybgd certs` makes one
    tls_key: str | None = None
    tls_client_ca: str | None = None      # require client certificates signed by this CA (mutual TLS)
    join_token: str | None = None         # shared secret a client must present to register
    operator_token: str | None = None     # bearer token for operator calls (status)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Revoked client names / certificate fingerprints (`fedcybgd certs --revoke`), reloaded when it changes;
    # None: revoked.json next to tls_client_ca when that is set, else no revocation list.
    revocation_list: str | None = None

    def __post_init__(self) -> None:
        if self.layers_per_block < 1:
            raise ValueError("layers_per_block must be >= 1")
        if self.block_layout is not None:
            check_layout(self.block_layout)
        accepted_deltas(self.deltas)  # a typo fails at start
        if self.max_block_params is not None and self.max_block_params < 0:
            raise ValueError("max_block_params must be 0 (no bound), a positive number, or unset (automatic)")
        if self.max_concurrent_visits < 1:
            raise ValueError("max_concurrent_visits must be >= 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {tuple(STRATEGIES)}, not {self.strategy!r}")
        STRATEGIES[self.strategy].check_config(self)
        if not 1 <= self.clients_per_round <= 1024:
            raise ValueError("clients_per_round must be in [1, 1024]")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES or self.chunk_bytes % 8:
            raise ValueError(f"chunk_bytes must be a multiple of 8 in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
        if not self.insecure and not (self.tls_cert and self.tls_key):
            raise ValueError("TLS is on by default: give tls_cert and tls_key ('fedcybgd certs' makes them), "
                             "or set insecure = true on a trusted network")
        if not self.insecure and not (self.tls_client_ca or self.join_token):
            raise ValueError("clients must authenticate: give tls_client_ca (mutual TLS) and/or a join_token, "
                             "or set insecure = true on a trusted network")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}")
