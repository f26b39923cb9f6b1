"""Revocation: sites the operator has cut off, from a plain JSON file the coordinator reloads when it changes.

`fedcybgd certs --revoke NAME` appends the site to ``revoked.json`` in the certificates folder: its name and, when
``NAME.pem`` is there, the SHA-256 fingerprint of that certificate. The coordinator refuses a revoked site at its
next call with PERMISSION_DENIED, whatever connection or bearer token it uses: by name (the certificate's common
name with mutual TLS, the registered name without it) and, with mutual TLS, by certificate fingerprint too. The
site's in-flight tasks are expired at once, so the task board hands their blocks to another client; an upload the
site was still sending is then stale and commits nothing.

The file is checked about once a second (a stat, by a watcher thread and by calls), and re-read only when its
modification time or size changed; a file that cannot be parsed keeps the previous list (and is logged), so a
half-written edit never un-revokes a site.
Writes go to a temporary file renamed over the list, so the coordinator never reads half a file from us.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import cast

import grpc

from fedcybgd.server.accounting import TaskAccounts
from fedcybgd.server.errors import Refusal, Status
from fedcybgd.server.metrics import CoordinatorMetrics
from fedcybgd.server.state import CoordinatorState

log = logging.getLogger("fedcybgd.coordinator")

REVOCATION_FILE = "revoked.json"
#: The file is stat-ed at most this often.
CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class RevokedSite:
    """One revocation: the site's name, its certificate's SHA-256 fingerprint (hex) if known, and when."""

    name: str
    certificate_sha256: str = ""
    revoked_unix: float = 0.0


@dataclass(frozen=True)
class RevocationList:
    """What is revoked: site names and certificate fingerprints."""

    sites: tuple[RevokedSite, ...] = ()

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.sites)

    @property
    def certificates(self) -> frozenset[str]:
        return frozenset(s.certificate_sha256 for s in self.sites if s.certificate_sha256)


def default_path(tls_client_ca: str | None) -> Path | None:
    """revoked.json next to the client CA (where `fedcybgd certs` writes it), or None without one."""
    return Path(tls_client_ca).parent / REVOCATION_FILE if tls_client_ca else None


def read_list(path: Path) -> RevocationList:
    """The list in `path` (missing: empty). Raises ValueError, naming the file, when it is malformed."""
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return RevocationList()
    try:
        doc = json.loads(raw)
        sites = tuple(RevokedSite(name=str(s["name"]), certificate_sha256=str(s.get("certificate_sha256", "")).lower(),
                                  revoked_unix=float(s.get("revoked_unix", 0.0)))
                      for s in doc["revoked"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"revocation list {path} is malformed ({exc}); expected "
                         '{"revoked": [{"name": ..., "certificate_sha256": ...}, ...]}') from exc
    return RevocationList(sites)


def add_revocation(path: Path, name: str, certificate_pem: bytes | None = None) -> RevocationList:
    """Append `name` (and the fingerprint of its certificate) to the list in `path`, atomically; a site already
    revoked with the same fingerprint is not added twice."""
    current = read_list(path)
    site = RevokedSite(name=name, certificate_sha256=pem_fingerprint(certificate_pem) if certificate_pem else "",
                       revoked_unix=time.time())
    if any(s.name == site.name and s.certificate_sha256 == site.certificate_sha256 for s in current.sites):
        return current
    updated = RevocationList((*current.sites, site))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".revoked-", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump({"revoked": [asdict(s) for s in updated.sites]}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return updated


def pem_fingerprint(pem: bytes) -> str:
    """SHA-256 of a PEM certificate's DER bytes, hex (as `openssl x509 -fingerprint -sha256` shows it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return hashlib.sha256(x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)).hexdigest()


def peer_fingerprint(context: grpc.ServicerContext) -> str | None:
    """The fingerprint of this call's verified client certificate (mutual TLS), if any."""
    auth = cast(Mapping[str, Sequence[bytes]], context.auth_context())
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        return pem_fingerprint(pems[0])
    except ValueError:
        return None


class Revocations:
    """The coordinator's view of the revocation list: reloaded when the file changes; refuses revoked callers and
    expires the in-flight tasks of newly revoked sites."""

    def __init__(self, path: Path | None, state: CoordinatorState, accounts: TaskAccounts,
                 metrics: CoordinatorMetrics, lock: threading.Condition,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._state = state
        self._accounts = accounts
        self._metrics = metrics
        self._lock = lock  # the scheduling lock: expiring a task wakes the GetTasks waiting on it
        self._clock = clock
        self._guard = threading.Lock()
        self._list = RevocationList()
        self._stamp: tuple[int, int] | None = None
        self._checked = -CHECK_INTERVAL_S
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if path is not None:
            self._reload(strict=True)  # a malformed list fails at start, not silently
            # Calls reload it too, but a revoked site that never calls again must still lose its task.
            self._watcher = threading.Thread(target=self._watch, name="revocations", daemon=True)
            self._watcher.start()

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                _ = self.current
            except Exception:  # noqa: BLE001 - e.g. the state closed under us at shutdown: try again, quietly
                log.debug("revocation check failed", exc_info=True)

    @property
    def current(self) -> RevocationList:
        """The list, re-read first if the file changed (checked at most once a second)."""
        if self.path is not None and self._clock() - self._checked >= CHECK_INTERVAL_S:
            self._reload(strict=False)
        return self._list

    def refuse(self, name: str, fingerprint: str | None = None) -> None:
        """Refusal(PERMISSION_DENIED) when the site `name` or the certificate `fingerprint` is revoked."""
        current = self.current
        if name in current.names or (fingerprint and fingerprint in current.certificates):
            raise Refusal(Status.PERMISSION_DENIED, f"client {name!r} is revoked (revocation list {self.path}); "
                                                    "ask the operator for a new certificate")

    def _reload(self, strict: bool) -> None:
        assert self.path is not None
        with self._guard:
            self._checked = self._clock()
            try:
                st = self.path.stat()
                stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                stamp = None
            if stamp == self._stamp and not strict:
                return
            try:
                loaded = read_list(self.path)
            except (ValueError, OSError) as exc:
                if strict:
                    raise ValueError(str(exc)) from exc
                log.error("keeping the previous revocation list: %s", exc)
                self._stamp = stamp
                return
            self._stamp = stamp
            added = loaded.names - self._list.names
            self._list = loaded
        if added:
            log.warning("revoked: %s (from %s)", ", ".join(sorted(added)), self.path)
        self._expire_tasks_of(loaded.names)

    def _expire_tasks_of(self, names: frozenset[str]) -> None:
        """Expire the issued tasks of revoked sites, so that another client gets their blocks now."""
        revoked_ids = {c.id for c in self._state.clients() if c.name in names}
        if not revoked_ids:
            return
        with self._lock:
            expired = 0
            for task in self._state.tasks_with_status("issued"):
                if task.client_id in revoked_ids and self._state.expire_task(task.id):
                    self._accounts.close(task.id)
                    self._metrics.visits.labels(outcome="reassigned").inc()
                    log.warning("task %s (round %d) expired: its client is revoked; it will be reassigned",
                                task.id, task.round)
                    expired += 1
            if expired:
                self._lock.notify_all()
