"""Per-client rate limits: one token bucket per (caller, RPC).

A certified site that floods the coordinator (a bug, a compromised host) must not starve the others, so every RPC
spends a token from its caller's bucket for that RPC. Buckets refill continuously at the configured rate up to the
burst. An empty bucket refuses the call with RESOURCE_EXHAUSTED and says, in the trailing metadata entry
``retry-after-ms``, when a token will be there: that hint is what tells a rate-limit refusal apart from the other
RESOURCE_EXHAUSTED answers (no block fits the client's memory, the coordinator's disk is full), and the client
daemon waits that long and retries. A refused call changes nothing.

Callers are client ids once authenticated, peer addresses before (Register) or for operators (GetStatus).
Idle buckets are dropped so that the table stays bounded however many callers come and go.
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedcybgd.server.config import RateLimitConfig
from fedcybgd.server.errors import Refusal, Status

#: Trailing metadata key of the retry hint (milliseconds until the caller's bucket holds a token again).
RETRY_AFTER_KEY = "retry-after-ms"
#: Buckets untouched this long are full again anyway: forget them.
IDLE_FORGET_S = 600.0
#: At most this many buckets before idle ones are swept (a sweep is O(buckets), so not on every call).
SWEEP_ABOVE = 4096


@dataclass(frozen=True)
class Rate:
    """One RPC's limit: tokens added per second, and the most a bucket holds."""

    per_s: float
    burst: int


def rates(config: RateLimitConfig) -> dict[str, Rate]:
    """The limit of each RPC, by its gRPC method name."""
    return {
        "Register": Rate(config.register_per_s, config.register_burst),
        "GetModelInfo": Rate(config.get_model_info_per_s, config.get_model_info_burst),
        "Heartbeat": Rate(config.heartbeat_per_s, config.heartbeat_burst),
        "GetTask": Rate(config.get_task_per_s, config.get_task_burst),
        "DownloadModel": Rate(config.download_model_per_s, config.download_model_burst),
        "UploadBlock": Rate(config.upload_block_per_s, config.upload_block_burst),
        "GetStatus": Rate(config.get_status_per_s, config.get_status_burst),
        "DeclineTask": Rate(config.decline_task_per_s, config.decline_task_burst),
    }


class RateLimited(Refusal):
    """RESOURCE_EXHAUSTED because the caller exceeded its rate; ``retry_after_ms`` goes into trailing metadata."""

    def __init__(self, rpc: str, retry_after_ms: int) -> None:
        super().__init__(Status.RESOURCE_EXHAUSTED,
                         f"rate limit exceeded for {rpc}: retry in {retry_after_ms} ms (metadata {RETRY_AFTER_KEY})")
        self.rpc = rpc
        self.retry_after_ms = retry_after_ms


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by (caller, RPC); thread-safe (the gRPC server calls from many threads)."""

    def __init__(self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic,
                 on_refusal: Callable[[str], None] | None = None) -> None:
        self._enabled = config.enabled
        self._rates = rates(config)
        self._clock = clock
        self._on_refusal = on_refusal
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, caller: str, rpc: str) -> None:
        """Spend one token of `caller`'s bucket for `rpc`, or raise `RateLimited` (nothing is spent then)."""
        if not self._enabled:
            return
        rate = self._rates[rpc]
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get((caller, rpc))
            if bucket is None:
                if len(self._buckets) >= SWEEP_ABOVE:
                    self._sweep(now)
                bucket = self._buckets[(caller, rpc)] = _Bucket(tokens=float(rate.burst), updated=now)
            else:
                bucket.tokens = min(float(rate.burst), bucket.tokens + (now - bucket.updated) * rate.per_s)
                bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return
            wait_ms = max(1, math.ceil((1.0 - bucket.tokens) / rate.per_s * 1000))
        if self._on_refusal is not None:
            self._on_refusal(rpc)
        raise RateLimited(rpc, wait_ms)

    def _sweep(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if now - b.updated > IDLE_FORGET_S]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)
