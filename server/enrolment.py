"""Enrolment and authentication: who may register, which client a call comes from, who may
ask for operator status.

A client enrols by client certificate (mutual TLS; the certificate's name is the site's name),
by join token, or both; enrolment is open only in insecure mode with neither configured. Later
calls carry the bearer token handed out at registration; only its SHA-256 is stored.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from fedcybgd.common.transport import OPERATOR_NAME
from fedcybgd.server.config import CoordinatorConfig
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.memory_fit import MemoryFit, format_bytes
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.state import ClientRow, CoordinatorState
from fedcybgd.training.compact import COMPACT_METHODS

log = logging.getLogger("fedcybgd.coordinator")

MAX_NAME_CHARS = 128
#: What a client may hold its frozen layers as (RegisterRequest.compact_frozen): exact, or a compact method.
COMPACT_FROZEN = ("", *COMPACT_METHODS)


@dataclass(frozen=True)
class Enrolment:
    """A registration request: what the client says about itself (its memory, device and options decide
    which blocks it is given: `fedcybgd.server.memory_fit`)."""

    name: str
    device_kind: str
    memory_bytes: int
    software_version: str
    join_token: str
    checkpoint_above: bool = False
    compact_frozen: str = ""


@dataclass(frozen=True)
class Credentials:
    """Who registered: the client's id and the bearer token it must present from now on."""

    client_id: str
    token: str


class Enroller:
    def __init__(self, config: CoordinatorConfig, state: CoordinatorState, metrics: CoordinatorMetrics,
                 memory: MemoryFit | None = None) -> None:
        self._config = config
        self._state = state
        self._metrics = metrics
        self._memory = memory

    def register(self, request: Enrolment, peer_name: str | None = None) -> Credentials:
        cfg = self._config
        if cfg.join_token and not hmac.compare_digest(request.join_token.encode(), cfg.join_token.encode()):
            raise Refusal(Status.UNAUTHENTICATED, "wrong or missing join token")
        name = request.name
        if cfg.tls_client_ca:
            if peer_name is None:
                raise Refusal(Status.UNAUTHENTICATED, "a client certificate is required")
            if peer_name == OPERATOR_NAME:
                raise Refusal(Status.PERMISSION_DENIED, "the operator certificate cannot register as a client")
            name = peer_name
        name = name.strip()
        if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise Refusal(Status.INVALID_ARGUMENT, f"client name must be 1-{MAX_NAME_CHARS} printable characters")
        if request.compact_frozen not in COMPACT_FROZEN:
            raise Refusal(Status.INVALID_ARGUMENT, f"compact_frozen must be one of {', '.join(COMPACT_FROZEN[1:])} "
                                                   f"or empty, not {printable(request.compact_frozen)[:20]!r}")
        token = secrets.token_urlsafe(32)
        now = time.time()
        client = ClientRow(id=f"c-{secrets.token_hex(6)}", name=name, device_kind=printable(request.device_kind),
                           memory_bytes=int64(request.memory_bytes), registered_unix=now, last_seen_unix=now,
                           checkpoint_above=bool(request.checkpoint_above),
                           compact_frozen=request.compact_frozen)
        self._state.add_client(client, token_hash(token))
        self._metrics.clients_registered.inc()
        log.info("registered client %s (%s, %s, memory %s%s, fedcybgd %s)", client.id, name, client.device_kind,
                 format_bytes(client.memory_bytes) if client.memory_bytes else "unknown",
                 (", checkpoint_above" if client.checkpoint_above else "")
                 + (f", frozen layers {client.compact_frozen}" if client.compact_frozen else ""),
                 printable(request.software_version) or "unknown")
        if self._memory is not None:
            self._memory.warm(client)  # its visits' predictions, ready by its first GetTask
        return Credentials(client_id=client.id, token=token)

    def authenticate(self, metadata: dict[str, str], peer_name: str | None = None) -> ClientRow:
        """The client a call comes from, by its bearer token; with mutual TLS the token must also
        belong to the site named in the certificate (a stolen token is useless elsewhere)."""
        auth = metadata.get("authorization", "")
        if not auth.startswith("Bearer ") or len(auth) > 512:
            raise Refusal(Status.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata; register first")
        client = self._state.client_by_token(token_hash(auth[len("Bearer "):]))
        if client is None:
            raise Refusal(Status.UNAUTHENTICATED, "unknown client token")
        if self._config.tls_client_ca and peer_name != client.name:
            raise Refusal(Status.PERMISSION_DENIED, "this token belongs to another site's certificate")
        return client

    def authorize_operator(self, metadata: dict[str, str], peer_name: str | None) -> None:
        """Operator calls: the operator token, or the operator's client certificate."""
        cfg = self._config
        if peer_name == OPERATOR_NAME and cfg.tls_client_ca:
            return
        auth = metadata.get("authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if cfg.operator_token and hmac.compare_digest(token.encode(), cfg.operator_token.encode()):
            return
        if cfg.insecure and not cfg.operator_token:
            return
        if token and self._state.client_by_token(token_hash(token)) is not None:
            raise Refusal(Status.PERMISSION_DENIED, "operator calls need operator credentials, not a client's")
        raise Refusal(Status.UNAUTHENTICATED, "operator credentials required (operator token or certificate)")


def int64(value: int) -> int:
    """uint64 fields from peers, clamped to what SQLite and Prometheus store."""
    return min(int(value), 2**63 - 1)


def printable(text: str) -> str:
    """A peer's free text, bounded and stripped of control characters (it ends up in logs)."""
    return "".join(c for c in text[:MAX_NAME_CHARS] if c.isprintable())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
