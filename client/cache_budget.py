"""The client's storage budget: which blobs of the block cache stay and which go.

Without a rule the cache keeps every version of every block it ever received and grows by about one model per
cycle. The rule (``retention_plan``) keeps, whatever the budget:

- the **base** weights: the blobs seeded from ``--base-model`` and those of version 0 when this client saw it. The
  coordinator keeps its base version too, so a delta base the two share is always there;
- the **newest** version of each block this client holds: what the next visit starts from (most blocks do not
  change between two visits of a client) and the delta base the coordinator picks for the blocks that did;
- what an **in-flight** task needs: the blobs of the version being trained (after its download) and thereby the
  upload's delta base (the version the visit started from).

Everything else (older versions, approximations of frozen blocks, blobs of an upload that did not become a version,
blobs this index does not know) goes oldest first, until the cache is within ``limit``. A budget below what must be
kept is not met: the kept blobs stay and a warning says how much the budget lacks.

The rule is applied before each download (so the ``have`` list the coordinator plans deltas from names only what the
cache will still hold), after it (its leftover partial files, which no download resumes, go too) and after each
visit. Nothing is removed while a stream is running: a blob named in ``have`` stays until the download ends.

Which version each blob belongs to is learnt from the manifests and accepted uploads and kept in an index next to
the cache (``cache-index.json``), so the rule survives restarts.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedcybgd.client.metrics import ClientMetrics
from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.sizes import format_size
from fedcybgd.v1 import coordinator_pb2 as pb

__all__ = ["DEFAULT_MODEL_MULTIPLE", "BlobRecord", "CacheBudget", "CacheIndex", "Enforced", "RetentionPlan",
           "default_limit", "retention_plan"]

log = logging.getLogger("fedcybgd.client")

#: The default budget in model sizes: the base version, the newest version of each block, and one whole download
#: on top (a client away for a cycle receives every block anew before the older ones can go).
DEFAULT_MODEL_MULTIPLE = 3
#: Version of blobs this index knows nothing about (left by an older client, or by an upload that was refused):
#: they go first.
UNKNOWN_VERSION = -1


def default_limit(model_bytes: int) -> int:
    """The budget when none is configured: ``DEFAULT_MODEL_MULTIPLE`` times the model's bytes."""
    return DEFAULT_MODEL_MULTIPLE * model_bytes


@dataclass
class BlobRecord:
    """What the index knows of one cached blob."""

    version: int = UNKNOWN_VERSION  # the newest model version this client saw it in (the eviction order)
    base: bool = False              # base weights: always kept


@dataclass(frozen=True)
class RetentionPlan:
    """The rule's decision for one cache: what goes, and the bytes left."""

    evict: list[str]  # oldest first
    kept_bytes: int   # after the eviction
    floor_bytes: int  # what must stay whatever the budget (base, newest, in flight)
    limit: int

    @property
    def over_budget(self) -> bool:
        return self.kept_bytes > self.limit


def retention_plan(held: Mapping[str, int], records: Mapping[str, BlobRecord], newest: Collection[str],
                   in_flight: Collection[str], limit: int) -> RetentionPlan:
    """Which of the ``held`` blobs (sha -> bytes) go so that the rest fits ``limit``: never a base blob, a block's
    newest version or an in-flight one; of the others the oldest version first (unknown blobs before any)."""
    protected = {sha for sha in held if sha in newest or sha in in_flight or records.get(sha, BlobRecord()).base}
    floor = sum(held[sha] for sha in protected)
    total = sum(held.values())
    candidates = sorted((sha for sha in held if sha not in protected),
                        key=lambda sha: (records.get(sha, BlobRecord()).version, sha))
    evict = []
    for sha in candidates:
        if total <= limit:
            break
        evict.append(sha)
        total -= held[sha]
    return RetentionPlan(evict=evict, kept_bytes=total, floor_bytes=floor, limit=limit)


@dataclass
class CacheIndex:
    """Versions of the cached blobs, learnt from manifests and accepted uploads; saved as JSON next to the cache."""

    records: dict[str, BlobRecord] = field(default_factory=dict)
    #: block index (the adapter's is the number of blocks) -> [version, sha] of its newest version seen
    newest: dict[int, tuple[int, str]] = field(default_factory=dict)
    model_bytes: int = 0  # the sum of a manifest's exact blobs (0: no manifest seen yet)

    @classmethod
    def load(cls, path: Path) -> CacheIndex:
        """The saved index, or an empty one (first start, or a file that cannot be read: the index only orders
        evictions, so starting over loses nothing but that order)."""
        try:
            raw = json.loads(path.read_text())
            return cls(records={sha: BlobRecord(**r) for sha, r in raw["records"].items()},
                       newest={int(i): (int(v), str(sha)) for i, (v, sha) in raw["newest"].items()},
                       model_bytes=int(raw.get("model_bytes", 0)))
        except FileNotFoundError:
            return cls()
        except (ValueError, KeyError, TypeError) as err:
            log.warning("block cache index %s unreadable (%s): starting a new one", path, err)
            return cls()

    def save(self, path: Path) -> None:
        """Replace the file atomically (a crash leaves the old index or the new one)."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"records": {sha: asdict(r) for sha, r in self.records.items()},
                                   "newest": {str(i): list(v) for i, v in self.newest.items()},
                                   "model_bytes": self.model_bytes}))
        os.replace(tmp, path)

    def _seen(self, sha: str, version: int) -> BlobRecord:
        record = self.records.setdefault(sha, BlobRecord())
        record.version = max(record.version, version)
        return record

    def _block_version(self, index: int, sha: str, version: int) -> None:
        self._seen(sha, version)
        if index not in self.newest or version >= self.newest[index][0]:
            self.newest[index] = (version, sha)

    def note_base(self, shas: Iterable[str]) -> None:
        """Base weights (seeded from local files): kept for good."""
        for sha in shas:
            self._seen(sha, 0).base = True

    def note_manifest(self, manifest: pb.Manifest) -> None:
        """A downloaded version: its exact blobs are versions of their blocks, its approximations are not."""
        version = manifest.version
        entries = [*manifest.blocks, *([manifest.adapter] if manifest.HasField("adapter") else [])]
        for entry in entries:
            if entry.HasField("approx"):  # the exact version did not come: the one held stays the newest
                if entry.approx.sha256:
                    self._seen(entry.approx.sha256, version)
                continue
            self._block_version(entry.index, entry.sha256, version)
            if version == 0:
                self.records[entry.sha256].base = True
        self.model_bytes = sum(entry.size for entry in entries)

    def note_accepted(self, index: int, sha: str, version: int) -> None:
        """A trained block the coordinator committed as ``version``: the newest of its block."""
        self._block_version(index, sha, version)

    def forget(self, shas: Iterable[str]) -> None:
        for sha in shas:
            self.records.pop(sha, None)


@dataclass(frozen=True)
class Enforced:
    """One application of the rule: what it removed and what the cache holds now."""

    evicted: int
    freed_bytes: int
    partials_removed: int
    held_bytes: int
    limit: int
    floor_bytes: int


class CacheBudget:
    """Applies the retention rule to one client's block cache and keeps its index."""

    def __init__(self, cache: BlobStore, index_path: Path, limit: int | None, model_bytes: int,
                 metrics: ClientMetrics | None = None) -> None:
        """``limit`` None: ``default_limit`` of the model's bytes (a manifest's, once one was seen; until then
        ``model_bytes``, the partition's raw tensor bytes). ``metrics``: the cache's size, budget and evictions
        are reported there."""
        self.cache = cache
        self.index_path = index_path
        self.index = CacheIndex.load(index_path)
        self._configured = limit
        self._model_bytes = model_bytes
        self._metrics = metrics
        self._warned_floor = 0
        self._since_visit = (0, 0)  # blobs and bytes removed since the last after_visit line
        if metrics is not None:
            metrics.watch_cache(cache.disk_bytes, lambda: self.limit)

    @property
    def model_bytes(self) -> int:
        """The model's bytes: a manifest's blobs once one was seen, until then the partition's tensors."""
        return self.index.model_bytes or self._model_bytes

    @property
    def limit(self) -> int:
        if self._configured is not None:
            return self._configured
        return default_limit(self.model_bytes)

    def seeded(self, shas: Iterable[str]) -> None:
        """Blobs put into the cache from local base weights."""
        self.index.note_base(shas)
        self.index.save(self.index_path)

    def before_download(self) -> Enforced:
        """Before a download (and its 'have' list): room for a whole model to arrive within the budget, as far as
        the blobs that must stay allow. Partial downloads stay: this download may resume them."""
        return self.enforce(reserve=self.model_bytes)

    def downloaded(self, manifest: pb.Manifest, task: pb.Task) -> Enforced:
        """After a download: record its version; its partial leftovers (no download resumes them: this one ended)
        go; older versions go while over budget, the manifest's blobs (the visit's, the upload's delta base among
        them) stay, and room is left for what the visit will add (its trained blobs)."""
        self.index.note_manifest(manifest)
        entries = [*manifest.blocks, *([manifest.adapter] if manifest.HasField("adapter") else [])]
        needed = {entry.sha256 for entry in entries if not entry.HasField("approx")}
        needed |= {sha for entry in entries if entry.HasField("approx")
                   for sha in (entry.approx.sha256, entry.approx.reference_sha256) if sha}
        return self.enforce(in_flight=needed, drop_partials=True, reserve=self._upload_bytes(manifest, task))

    def _upload_bytes(self, manifest: pb.Manifest, task: pb.Task) -> int:
        """What the task's training will add to the cache: its block, the adapter, or every block."""
        if task.kind == pb.TASK_BLOCK and task.block_index < len(manifest.blocks):
            return int(manifest.blocks[task.block_index].size)
        if task.kind == pb.TASK_LORA and manifest.HasField("adapter"):
            return int(manifest.adapter.size)
        return self.model_bytes

    def accepted(self, task: pb.Task, header: pb.UploadHeader, reply: pb.UploadResponse) -> None:
        """A block task's upload the coordinator committed is the newest version of its block (other kinds'
        uploads are averaged into a version: the next manifest says which blob that is)."""
        if (task.kind == pb.TASK_BLOCK and header.blob_sha256 and reply.blob_sha256 == header.blob_sha256
                and reply.new_version > header.base_version):
            self.index.note_accepted(header.block_index, header.blob_sha256, reply.new_version)
            self.index.save(self.index_path)

    def after_visit(self) -> Enforced:
        """Between visits nothing is in flight: the rule alone decides; one log line says where the cache stands and
        what the visit's evictions (before, during and after it) removed."""
        done = self.enforce()
        evicted, freed = self._since_visit
        self._since_visit = (0, 0)
        log.info("block cache: %s of %s budget%s", format_size(done.held_bytes), format_size(done.limit),
                 f" (removed {evicted} older blobs, {format_size(freed)})" if evicted else "")
        return done

    def enforce(self, in_flight: Collection[str] = (), drop_partials: bool = False, reserve: int = 0) -> Enforced:
        """Evict until within the budget less ``reserve`` bytes about to be written (see ``retention_plan``);
        ``drop_partials``: also remove every partial download (only when no download is going to resume them)."""
        partials_removed = 0
        if drop_partials:
            for sha in self.cache.partial_sizes():
                if self.cache.discard_partial(sha):
                    partials_removed += 1
        held = {sha: self.cache.size(sha) for sha in self.cache}
        partial_bytes = sum(self.cache.partial_sizes().values())
        newest = {sha for _, sha in self.index.newest.values()}
        plan = retention_plan(held, self.index.records, newest, in_flight,
                              max(0, self.limit - partial_bytes - reserve))
        freed = sum(self.cache.remove(sha) for sha in plan.evict)
        self._since_visit = (self._since_visit[0] + len(plan.evict), self._since_visit[1] + freed)
        if self._metrics is not None:
            self._metrics.cache_evicted.inc(len(plan.evict))
        self.index.forget(plan.evict)
        self.index.forget([sha for sha in self.index.records if sha not in held])  # removed by hand, or never held
        self.index.save(self.index_path)
        held_bytes = plan.kept_bytes + partial_bytes
        if plan.evict or partials_removed:
            log.debug("block cache: removed %d blobs (%s) and %d partial downloads; %s held", len(plan.evict),
                      format_size(freed), partials_removed, format_size(held_bytes))
        if held_bytes > self.limit and plan.floor_bytes != self._warned_floor:
            self._warned_floor = plan.floor_bytes
            log.warning("block cache: the budget of %s is below what must be kept (%s: base weights, newest "
                        "version of each block, the visit's blobs); raise --cache-max-bytes",
                        format_size(self.limit), format_size(plan.floor_bytes + partial_bytes))
        return Enforced(evicted=len(plan.evict), freed_bytes=freed, partials_removed=partials_removed,
                        held_bytes=held_bytes, limit=self.limit, floor_bytes=plan.floor_bytes)
