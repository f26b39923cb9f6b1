from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_NONE: _ClassVar[Codec]
    CODEC_ZSTD: _ClassVar[Codec]
    CODEC_BYTEGROUP: _ClassVar[Codec]

class DeltaCodec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DELTA_UNSPECIFIED: _ClassVar[DeltaCodec]
    DELTA_XOR: _ClassVar[DeltaCodec]
    DELTA_ARITH: _ClassVar[DeltaCodec]

class ContextCodec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTEXT_UNSPECIFIED: _ClassVar[ContextCodec]
    CONTEXT_DROP: _ClassVar[ContextCodec]
    CONTEXT_INT8: _ClassVar[ContextCodec]
    CONTEXT_INT4: _ClassVar[ContextCodec]
    CONTEXT_PRUNE: _ClassVar[ContextCodec]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_BLOCK: _ClassVar[TaskKind]
    TASK_FULL: _ClassVar[TaskKind]
    TASK_LORA: _ClassVar[TaskKind]
CODEC_UNSPECIFIED: Codec
CODEC_NONE: Codec
CODEC_ZSTD: Codec
CODEC_BYTEGROUP: Codec
DELTA_UNSPECIFIED: DeltaCodec
DELTA_XOR: DeltaCodec
DELTA_ARITH: DeltaCodec
CONTEXT_UNSPECIFIED: ContextCodec
CONTEXT_DROP: ContextCodec
CONTEXT_INT8: ContextCodec
CONTEXT_INT4: ContextCodec
CONTEXT_PRUNE: ContextCodec
TASK_KIND_UNSPECIFIED: TaskKind
TASK_BLOCK: TaskKind
TASK_FULL: TaskKind
TASK_LORA: TaskKind

class RegisterRequest(_message.Message):
    __slots__ = ("name", "device_kind", "memory_bytes", "software_version", "join_token", "checkpoint_above", "compact_frozen")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    JOIN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ABOVE_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FROZEN_FIELD_NUMBER: _ClassVar[int]
    name: str
    device_kind: str
    memory_bytes: int
    software_version: str
    join_token: str
    checkpoint_above: bool
    compact_frozen: str
    def __init__(self, name: _Optional[str] = ..., device_kind: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., software_version: _Optional[str] = ..., join_token: _Optional[str] = ..., checkpoint_above: _Optional[bool] = ..., compact_frozen: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("client_id", "token")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    token: str
    def __init__(self, client_id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "config_json", "tokenizer_files", "dtype", "num_blocks", "layers_per_block", "tokenizer_codec", "upload_codecs", "strategy", "lora", "max_block_params", "prompt_template", "prompt_name", "train_on", "accept_deltas", "block_layout")
    class TokenizerFilesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_CODEC_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_CODECS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    LORA_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_PARAMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    config_json: str
    tokenizer_files: _containers.ScalarMap[str, bytes]
    dtype: str
    num_blocks: int
    layers_per_block: int
    tokenizer_codec: Codec
    upload_codecs: _containers.RepeatedScalarFieldContainer[Codec]
    strategy: str
    lora: LoraSpec
    max_block_params: int
    prompt_template: str
    prompt_name: str
    train_on: str
    accept_deltas: _containers.RepeatedScalarFieldContainer[DeltaCodec]
    block_layout: str
    def __init__(self, model_id: _Optional[str] = ..., config_json: _Optional[str] = ..., tokenizer_files: _Optional[_Mapping[str, bytes]] = ..., dtype: _Optional[str] = ..., num_blocks: _Optional[int] = ..., layers_per_block: _Optional[int] = ..., tokenizer_codec: _Optional[_Union[Codec, str]] = ..., upload_codecs: _Optional[_Iterable[_Union[Codec, str]]] = ..., strategy: _Optional[str] = ..., lora: _Optional[_Union[LoraSpec, _Mapping]] = ..., max_block_params: _Optional[int] = ..., prompt_template: _Optional[str] = ..., prompt_name: _Optional[str] = ..., train_on: _Optional[str] = ..., accept_deltas: _Optional[_Iterable[_Union[DeltaCodec, str]]] = ..., block_layout: _Optional[str] = ...) -> None: ...

class LoraSpec(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("task_id", "phase", "step", "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes", "host_rss_bytes")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GPU_PEAK_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_PEAK_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    phase: str
    step: int
    gpu_peak_allocated_bytes: int
    gpu_peak_reserved_bytes: int
    host_rss_bytes: int
    def __init__(self, task_id: _Optional[str] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., gpu_peak_allocated_bytes: _Optional[int] = ..., gpu_peak_reserved_bytes: _Optional[int] = ..., host_rss_bytes: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("task_valid", "heartbeat_interval_s")
    TASK_VALID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    task_valid: bool
    heartbeat_interval_s: int
    def __init__(self, task_valid: _Optional[bool] = ..., heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("wait_seconds",)
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    wait_seconds: int
    def __init__(self, wait_seconds: _Optional[int] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task", "wait", "done")
    TASK_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    task: Task
    wait: Wait
    done: Done
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., wait: _Optional[_Union[Wait, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class Wait(_message.Message):
    __slots__ = ("retry_after_ms", "reason")
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    retry_after_ms: int
    reason: str
    def __init__(self, retry_after_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("final_version",)
    FINAL_VERSION_FIELD_NUMBER: _ClassVar[int]
    final_version: int
    def __init__(self, final_version: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "cycle", "round", "block_index", "block_name", "base_version", "hyper", "kind")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CYCLE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    cycle: int
    round: int
    block_index: int
    block_name: str
    base_version: int
    hyper: Hyper
    kind: TaskKind
    def __init__(self, task_id: _Optional[str] = ..., cycle: _Optional[int] = ..., round: _Optional[int] = ..., block_index: _Optional[int] = ..., block_name: _Optional[str] = ..., base_version: _Optional[int] = ..., hyper: _Optional[_Union[Hyper, _Mapping]] = ..., kind: _Optional[_Union[TaskKind, str]] = ...) -> None: ...

class Hyper(_message.Message):
    __slots__ = ("lr", "local_steps", "batch_size", "seq_len", "seed", "weight_decay", "max_grad_norm", "privacy")
    LR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    lr: float
    local_steps: int
    batch_size: int
    seq_len: int
    seed: int
    weight_decay: float
    max_grad_norm: float
    privacy: Privacy
    def __init__(self, lr: _Optional[float] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., seed: _Optional[int] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., privacy: _Optional[_Union[Privacy, _Mapping]] = ...) -> None: ...

class Privacy(_message.Message):
    __slots__ = ("records", "noise_multiplier", "clip_norm", "updates", "update_noise_multiplier", "update_clip_norm", "target_epsilon", "delta")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    UPDATE_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    records: bool
    noise_multiplier: float
    clip_norm: float
    updates: bool
    update_noise_multiplier: float
    update_clip_norm: float
    target_epsilon: float
    delta: float
    def __init__(self, records: _Optional[bool] = ..., noise_multiplier: _Optional[float] = ..., clip_norm: _Optional[float] = ..., updates: _Optional[bool] = ..., update_noise_multiplier: _Optional[float] = ..., update_clip_norm: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("task_id", "have", "accept_codecs", "resume", "accept_context", "accept_deltas")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_CODECS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_DELTAS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    have: _containers.RepeatedScalarFieldContainer[str]
    accept_codecs: _containers.RepeatedScalarFieldContainer[Codec]
    resume: _containers.RepeatedCompositeFieldContainer[BlobOffset]
    accept_context: _containers.RepeatedScalarFieldContainer[ContextCodec]
    accept_deltas: _containers.RepeatedScalarFieldContainer[DeltaCodec]
    def __init__(self, task_id: _Optional[str] = ..., have: _Optional[_Iterable[str]] = ..., accept_codecs: _Optional[_Iterable[_Union[Codec, str]]] = ..., resume: _Optional[_Iterable[_Union[BlobOffset, _Mapping]]] = ..., accept_context: _Optional[_Iterable[_Union[ContextCodec, str]]] = ..., accept_deltas: _Optional[_Iterable[_Union[DeltaCodec, str]]] = ...) -> None: ...

class BlobOffset(_message.Message):
    __slots__ = ("sha256", "offset")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    offset: int
    def __init__(self, sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadMessage(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: Manifest
    chunk: Chunk
    def __init__(self, manifest: _Optional[_Union[Manifest, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("version", "blocks", "sending", "adapter")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SENDING_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    version: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockEntry]
    sending: _containers.RepeatedScalarFieldContainer[str]
    adapter: BlockEntry
    def __init__(self, version: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockEntry, _Mapping]]] = ..., sending: _Optional[_Iterable[str]] = ..., adapter: _Optional[_Union[BlockEntry, _Mapping]] = ...) -> None: ...

class BlockEntry(_message.Message):
    __slots__ = ("index", "name", "sha256", "size", "tensors", "approx")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    APPROX_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    sha256: str
    size: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    approx: ContextApprox
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., approx: _Optional[_Union[ContextApprox, _Mapping]] = ...) -> None: ...

class ContextApprox(_message.Message):
    __slots__ = ("codec", "sha256", "size", "reference_sha256", "group_size")
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SHA256_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    codec: ContextCodec
    sha256: str
    size: int
    reference_sha256: str
    group_size: int
    def __init__(self, codec: _Optional[_Union[ContextCodec, str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., reference_sha256: _Optional[str] = ..., group_size: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "shape", "dtype", "rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    rows: RowRange
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., rows: _Optional[_Union[RowRange, _Mapping]] = ...) -> None: ...

class RowRange(_message.Message):
    __slots__ = ("start", "stop")
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    start: int
    stop: int
    def __init__(self, start: _Optional[int] = ..., stop: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("blob_sha256", "offset", "raw_size", "codec", "data", "crc32", "delta_base", "delta")
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    DELTA_BASE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    blob_sha256: str
    offset: int
    raw_size: int
    codec: Codec
    data: bytes
    crc32: int
    delta_base: str
    delta: DeltaCodec
    def __init__(self, blob_sha256: _Optional[str] = ..., offset: _Optional[int] = ..., raw_size: _Optional[int] = ..., codec: _Optional[_Union[Codec, str]] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., delta_base: _Optional[str] = ..., delta: _Optional[_Union[DeltaCodec, str]] = ...) -> None: ...

class UploadMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    chunk: Chunk
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("task_id", "block_index", "base_version", "blob_sha256", "blob_size", "samples", "tokens", "loss_before", "loss_after", "peak_memory_bytes", "train_seconds", "download_seconds", "device", "blobs", "record_epsilon", "update_epsilon")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    BLOB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    RECORD_EPSILON_FIELD_NUMBER: _ClassVar[int]
    UPDATE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    block_index: int
    base_version: int
    blob_sha256: str
    blob_size: int
    samples: int
    tokens: int
    loss_before: float
    loss_after: float
    peak_memory_bytes: int
    train_seconds: float
    download_seconds: float
    device: str
    blobs: _containers.RepeatedCompositeFieldContainer[UploadedBlob]
    record_epsilon: float
    update_epsilon: float
    def __init__(self, task_id: _Optional[str] = ..., block_index: _Optional[int] = ..., base_version: _Optional[int] = ..., blob_sha256: _Optional[str] = ..., blob_size: _Optional[int] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., train_seconds: _Optional[float] = ..., download_seconds: _Optional[float] = ..., device: _Optional[str] = ..., blobs: _Optional[_Iterable[_Union[UploadedBlob, _Mapping]]] = ..., record_epsilon: _Optional[float] = ..., update_epsilon: _Optional[float] = ...) -> None: ...

class UploadedBlob(_message.Message):
    __slots__ = ("block_index", "sha256", "size")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    sha256: str
    size: int
    def __init__(self, block_index: _Optional[int] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class UploadResponse(_message.Message):
    __slots__ = ("new_version", "blob_sha256")
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOB_SHA256_FIELD_NUMBER: _ClassVar[int]
    new_version: int
    blob_sha256: str
    def __init__(self, new_version: _Optional[int] = ..., blob_sha256: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("max_visits", "visits_before_round", "summary")
    MAX_VISITS_FIELD_NUMBER: _ClassVar[int]
    VISITS_BEFORE_ROUND_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    max_visits: int
    visits_before_round: int
    summary: bool
    def __init__(self, max_visits: _Optional[int] = ..., visits_before_round: _Optional[int] = ..., summary: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("run_state", "cycle", "round", "total_rounds", "num_blocks", "version", "blocks", "clients", "tasks", "visits", "evals", "total_bytes_down", "total_bytes_up", "model_bytes", "waiting_reason", "visits_total", "next_visits_before_round", "best_eval")
    RUN_STATE_FIELD_NUMBER: _ClassVar[int]
    CYCLE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    VISITS_FIELD_NUMBER: _ClassVar[int]
    EVALS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAITING_REASON_FIELD_NUMBER: _ClassVar[int]
    VISITS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NEXT_VISITS_BEFORE_ROUND_FIELD_NUMBER: _ClassVar[int]
    BEST_EVAL_FIELD_NUMBER: _ClassVar[int]
    run_state: str
    cycle: int
    round: int
    total_rounds: int
    num_blocks: int
    version: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockStatus]
    clients: _containers.RepeatedCompositeFieldContainer[ClientStatus]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskStatus]
    visits: _containers.RepeatedCompositeFieldContainer[VisitRecord]
    evals: _containers.RepeatedCompositeFieldContainer[EvalPoint]
    total_bytes_down: int
    total_bytes_up: int
    model_bytes: int
    waiting_reason: str
    visits_total: int
    next_visits_before_round: int
    best_eval: EvalPoint
    def __init__(self, run_state: _Optional[str] = ..., cycle: _Optional[int] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., num_blocks: _Optional[int] = ..., version: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockStatus, _Mapping]]] = ..., clients: _Optional[_Iterable[_Union[ClientStatus, _Mapping]]] = ..., tasks: _Optional[_Iterable[_Union[TaskStatus, _Mapping]]] = ..., visits: _Optional[_Iterable[_Union[VisitRecord, _Mapping]]] = ..., evals: _Optional[_Iterable[_Union[EvalPoint, _Mapping]]] = ..., total_bytes_down: _Optional[int] = ..., total_bytes_up: _Optional[int] = ..., model_bytes: _Optional[int] = ..., waiting_reason: _Optional[str] = ..., visits_total: _Optional[int] = ..., next_visits_before_round: _Optional[int] = ..., best_eval: _Optional[_Union[EvalPoint, _Mapping]] = ...) -> None: ...

class BlockStatus(_message.Message):
    __slots__ = ("index", "name", "sha256", "last_version", "times_trained", "size")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAST_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    sha256: str
    last_version: int
    times_trained: int
    size: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., sha256: _Optional[str] = ..., last_version: _Optional[int] = ..., times_trained: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class ClientStatus(_message.Message):
    __slots__ = ("client_id", "name", "device_kind", "last_seen_unix", "current_task", "visits_completed", "memory_bytes", "gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes", "host_rss_bytes", "checkpoint_above", "fits_blocks", "memory_note", "compact_frozen", "record_epsilon", "update_epsilon", "declined", "memory_planning")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    CURRENT_TASK_FIELD_NUMBER: _ClassVar[int]
    VISITS_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_PEAK_ALLOCATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_PEAK_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ABOVE_FIELD_NUMBER: _ClassVar[int]
    FITS_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_NOTE_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FROZEN_FIELD_NUMBER: _ClassVar[int]
    RECORD_EPSILON_FIELD_NUMBER: _ClassVar[int]
    UPDATE_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PLANNING_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    name: str
    device_kind: str
    last_seen_unix: float
    current_task: str
    visits_completed: int
    memory_bytes: int
    gpu_peak_allocated_bytes: int
    gpu_peak_reserved_bytes: int
    host_rss_bytes: int
    checkpoint_above: bool
    fits_blocks: int
    memory_note: str
    compact_frozen: str
    record_epsilon: float
    update_epsilon: float
    declined: str
    memory_planning: bool
    def __init__(self, client_id: _Optional[str] = ..., name: _Optional[str] = ..., device_kind: _Optional[str] = ..., last_seen_unix: _Optional[float] = ..., current_task: _Optional[str] = ..., visits_completed: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., gpu_peak_allocated_bytes: _Optional[int] = ..., gpu_peak_reserved_bytes: _Optional[int] = ..., host_rss_bytes: _Optional[int] = ..., checkpoint_above: _Optional[bool] = ..., fits_blocks: _Optional[int] = ..., memory_note: _Optional[str] = ..., compact_frozen: _Optional[str] = ..., record_epsilon: _Optional[float] = ..., update_epsilon: _Optional[float] = ..., declined: _Optional[str] = ..., memory_planning: _Optional[bool] = ...) -> None: ...

class TaskStatus(_message.Message):
    __slots__ = ("task_id", "client_id", "round", "block_index", "base_version", "issued_unix", "phase", "step", "steps", "block_name", "whole_model")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ISSUED_UNIX_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NAME_FIELD_NUMBER: _ClassVar[int]
    WHOLE_MODEL_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    client_id: str
    round: int
    block_index: int
    base_version: int
    issued_unix: float
    phase: str
    step: int
    steps: int
    block_name: str
    whole_model: bool
    def __init__(self, task_id: _Optional[str] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., block_index: _Optional[int] = ..., base_version: _Optional[int] = ..., issued_unix: _Optional[float] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., steps: _Optional[int] = ..., block_name: _Optional[str] = ..., whole_model: _Optional[bool] = ...) -> None: ...

class VisitRecord(_message.Message):
    __slots__ = ("round", "cycle", "block_index", "block_name", "client_id", "client_name", "task_id", "base_version", "new_version", "lr", "seed", "bytes_down", "bytes_up", "loss_before", "loss_after", "peak_memory_bytes", "train_seconds", "visit_seconds", "samples", "whole_model")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CYCLE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_NAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    VISIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WHOLE_MODEL_FIELD_NUMBER: _ClassVar[int]
    round: int
    cycle: int
    block_index: int
    block_name: str
    client_id: str
    client_name: str
    task_id: str
    base_version: int
    new_version: int
    lr: float
    seed: int
    bytes_down: int
    bytes_up: int
    loss_before: float
    loss_after: float
    peak_memory_bytes: int
    train_seconds: float
    visit_seconds: float
    samples: int
    whole_model: bool
    def __init__(self, round: _Optional[int] = ..., cycle: _Optional[int] = ..., block_index: _Optional[int] = ..., block_name: _Optional[str] = ..., client_id: _Optional[str] = ..., client_name: _Optional[str] = ..., task_id: _Optional[str] = ..., base_version: _Optional[int] = ..., new_version: _Optional[int] = ..., lr: _Optional[float] = ..., seed: _Optional[int] = ..., bytes_down: _Optional[int] = ..., bytes_up: _Optional[int] = ..., loss_before: _Optional[float] = ..., loss_after: _Optional[float] = ..., peak_memory_bytes: _Optional[int] = ..., train_seconds: _Optional[float] = ..., visit_seconds: _Optional[float] = ..., samples: _Optional[int] = ..., whole_model: _Optional[bool] = ...) -> None: ...

class EvalPoint(_message.Message):
    __slots__ = ("version", "rounds_done", "loss")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_DONE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    version: int
    rounds_done: int
    loss: float
    def __init__(self, version: _Optional[int] = ..., rounds_done: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class DeclineTaskRequest(_message.Message):
    __slots__ = ("task_id", "reason")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    reason: str
    def __init__(self, task_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeclineTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
