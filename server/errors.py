"""Refusals: the expected ways a request fails, each with the status the caller sees.

The coordinator's parts raise `Refusal` and never import gRPC; the servicer
(`fedcybgd.server.service`) turns a refusal into the gRPC status code of the same name.
"""
from __future__ import annotations

import enum


class Status(enum.Enum):
    """The status codes a refusal may carry (a subset of gRPC's, by the same names)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"      # the request itself is malformed or out of bounds
    UNAUTHENTICATED = "UNAUTHENTICATED"        # no or unknown credentials
    PERMISSION_DENIED = "PERMISSION_DENIED"    # known caller, not allowed to do this
    NOT_FOUND = "NOT_FOUND"                    # no such task
    FAILED_PRECONDITION = "FAILED_PRECONDITION"  # valid once, no longer (task reassigned, upload stale)
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"  # the caller lacks memory for any task; the coordinator's disk is full


class Refusal(Exception):
    """An expected refusal, with the status code and message the caller gets."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
