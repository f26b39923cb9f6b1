"""Typed records the coordinator's parts pass between them (no dicts or tuples by position).

`VisitStats` is what the state stores with each visit, contribution and merged round;
`UploadClaim` is an upload's header as the coordinator understands it; `ExpectedUpload` is one
blob a task must bring; `Opening` is a free place in the schedule a strategy offers a client.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from fedcybgd.common.blocks import BlockSpec

#: `block_index` of a task or visit that trains the whole model (the FedAvg family).
ALL_BLOCKS = -1


@dataclass(frozen=True)
class VisitStats:
    """The figures of one visit (or of one averaged round): reported by the client, measured by
    the coordinator. Kept as JSON in the state, shown by status, observed by the metrics."""

    lr: float
    seed: int
    bytes_down: int
    bytes_up: int
    loss_before: float
    loss_after: float
    peak_memory_bytes: int
    train_seconds: float
    download_seconds: float
    visit_seconds: float
    samples: int
    tokens: int
    device: str
    client_name: str = ""                 # a contribution: who made it
    clients: tuple[str, ...] = ()         # an averaged round: whose contributions, in order

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VisitStats:
        values = json.loads(text)
        values["clients"] = tuple(values.get("clients", ()))
        return cls(**values)

    @classmethod
    def averaged(cls, parts: list[VisitStats], lr: float, visit_seconds: float) -> VisitStats:
        """A FedAvg-family round as one record: sums of bytes, seconds and samples, mean losses,
        the largest peak memory."""
        return cls(
            lr=lr, seed=0, clients=tuple(p.client_name for p in parts),
            bytes_down=sum(p.bytes_down for p in parts), bytes_up=sum(p.bytes_up for p in parts),
            train_seconds=sum(p.train_seconds for p in parts),
            download_seconds=sum(p.download_seconds for p in parts),
            samples=sum(p.samples for p in parts), tokens=sum(p.tokens for p in parts),
            loss_before=sum(p.loss_before for p in parts) / len(parts),
            loss_after=sum(p.loss_after for p in parts) / len(parts),
            peak_memory_bytes=max(p.peak_memory_bytes for p in parts), visit_seconds=visit_seconds,
            device=parts[0].device)


@dataclass(frozen=True)
class ClaimedBlob:
    """A blob an upload announces: which block (or the adapter), its SHA-256 and size."""

    block_index: int
    sha256: str
    size: int


@dataclass(frozen=True)
class UploadClaim:
    """An upload's header, as announced by the client (nothing in it is trusted yet)."""

    task_id: str
    base_version: int
    single: ClaimedBlob                 # the one-blob fields (a block, or the adapter)
    listed: tuple[ClaimedBlob, ...]     # the many-blob list (every block of a full-model upload)
    samples: int
    tokens: int
    loss_before: float
    loss_after: float
    peak_memory_bytes: int
    train_seconds: float
    download_seconds: float
    device: str
    record_epsilon: float = 0.0         # differential privacy the site reports having spent (0: off)
    update_epsilon: float = 0.0

    @property
    def last_sha256(self) -> str:
        """The blob that identifies the upload when it is retried (the adapter or the last block)."""
        return self.listed[-1].sha256 if self.listed else self.single.sha256


@dataclass(frozen=True)
class ExpectedUpload:
    """One blob a task's upload must carry, in order: checked against `spec`; a delta may refer
    to `base` (the version of that blob the visit started from) and to nothing else."""

    sha256: str
    size: int
    spec: BlockSpec
    base: str


@dataclass(frozen=True)
class Opening:
    """A free place in the schedule: round `round`, block `block_index` (ALL_BLOCKS for a
    whole-model task), slot `slot` among the round's tasks (FedAvg family)."""

    round: int
    block_index: int
    slot: int = 0


@dataclass(frozen=True)
class Accepted:
    """What an upload led to: the model version the client's work is in (for a FedAvg-family
    contribution, the version it started from until the round is merged)."""

    new_version: int
    blob_sha256: str


@dataclass
class TaskProgress:
    """A task's last reported phase and step (from heartbeats), for status."""

    phase: str = "issued"
    step: int = 0
    bytes: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # (direction, kind) -> [wire, raw]
