"""Telling a rate-limit refusal apart from the coordinator's other RESOURCE_EXHAUSTED answers.

RESOURCE_EXHAUSTED means three different things: no block of the run fits this client's memory (GetTask: stop),
the coordinator's disk is full (UploadBlock: keep the result and retry), or this client called too often (any RPC:
wait and retry). Only the last carries a ``retry-after-ms`` trailing metadata entry (`fedcybgd.server.ratelimit`);
the daemon waits for the hinted time, then retries the call.
"""
from __future__ import annotations

import grpc

#: Trailing metadata key of the coordinator's retry hint (same as ``fedcybgd.server.ratelimit.RETRY_AFTER_KEY``).
RETRY_AFTER_KEY = "retry-after-ms"
#: A hint longer than this is capped: a coordinator bug must not park a client for hours.
MAX_HINT_S = 60.0


def rate_limit_delay(err: grpc.RpcError) -> float | None:
    """Seconds to wait before retrying when `err` is a rate-limit refusal, else None."""
    if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    try:
        trailing = err.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - a call without trailing metadata: not a rate-limit refusal
        return None
    for key, value in trailing:
        if key == RETRY_AFTER_KEY:
            try:
                return min(max(int(value), 1) / 1000, MAX_HINT_S)
            except (TypeError, ValueError):
                return None
    return None
