"""A content-addressed store of block blobs on disk: the coordinator's model store and the
client's block cache are both one of these.

A blob's file name is the SHA-256 of its bytes, so a blob is verified once on the way in and
never duplicated. Writes are atomic (temporary file, fsync, rename, fsync of the directory): a
crash leaves either the whole blob or nothing, never a torn file under a valid name. Reads are
memory-mapped so serving a block to many clients costs no copy per client.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fedcybgd.common.codec import CodecError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> int:
    """Remove a file; the bytes it held (0 when it was not there)."""
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


class BlobWriter:
    """Incremental write of one blob; `commit` verifies the hash and publishes it atomically."""

    def __init__(self, store: BlobStore, expected_sha256: str, max_size: int, partial: Path | None = None) -> None:
        self._store = store
        self.expected_sha256 = expected_sha256
        self.max_size = max_size
        self.size = 0
        self._hasher = hashlib.sha256()
        if partial is None:
            fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="incoming-")
            self._file: BinaryIO = os.fdopen(fd, "wb")
            self._tmp_path = Path(name)
        else:  # continue a transfer that broke: what is there was verified chunk by chunk
            self._tmp_path = partial
            self._file = open(partial, "ab+")  # noqa: SIM115 - stays open until check() or abort()
            self._file.seek(0)
            while block := self._file.read(1 << 20):
                self._hasher.update(block)
                self.size += len(block)
            if self.size > max_size:
                self._file.truncate(0)
                self._hasher, self.size = hashlib.sha256(), 0
            self._file.seek(0, os.SEEK_END)
        self._resumable = partial is not None

    def write(self, data: bytes | memoryview) -> int:
        if self.size + len(data) > self.max_size:
            raise CodecError(f"blob exceeds its size limit of {self.max_size} bytes")
        self._hasher.update(data)
        self._file.write(data)
        self.size += len(data)
        return len(data)

    def commit(self, validate: Callable[[Path], None] | None = None) -> str:
        """Verify the hash, run `validate` on the complete temporary file, then publish.

        Nothing becomes visible under the blob's name unless every check passed.
        """
        digest = self.check(validate)
        self.publish()
        return digest

    def check(self, validate: Callable[[Path], None] | None = None) -> str:
        """Every check of `commit` without publishing: several blobs that stand or fall together
        are all checked before any is published. Aborts (and raises) on failure."""
        digest = self._hasher.hexdigest()
        if digest != self.expected_sha256:
            self.abort()
            raise CodecError(f"blob SHA-256 {digest[:12]} does not match the declared {self.expected_sha256[:12]}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if validate is not None:
            try:
                validate(self._tmp_path)
            except BaseException:
                self.abort()
                raise
        return digest

    def publish(self) -> None:
        """Make a checked blob visible under its name (atomic rename)."""
        self._store._publish(self._tmp_path, self.expected_sha256)

    def abort(self, keep_partial: bool = False) -> None:
        """Drop the write; a resumable one may keep its verified prefix for the next attempt."""
        if not self._file.closed:
            self._file.flush()
            self._file.close()
        if not (keep_partial and self._resumable):
            self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._file.closed:
            self.abort()


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.objects_dir = self.root / "objects"
        self.tmp_dir = self.root / "tmp"
        self.partial_dir = self.root / "partial"
        for directory in (self.objects_dir, self.tmp_dir, self.partial_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # Leftovers of writes interrupted by a crash are garbage by construction.
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.objects_dir / sha256[:2] / sha256

    def has(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except ValueError:
            return False

    def size(self, sha256: str) -> int:
        return self.path(sha256).stat().st_size

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if self.has(digest):
            return digest
        with self.writer(digest, len(data)) as writer:
            writer.write(data)
            return writer.commit()

    def writer(self, expected_sha256: str, max_size: int) -> BlobWriter:
        self.path(expected_sha256)  # validates the name before any byte is written
        return BlobWriter(self, expected_sha256, max_size)

    def resumable_writer(self, expected_sha256: str, max_size: int) -> BlobWriter:
        """A writer that continues (or starts) partial/<sha>; kept across failures and restarts."""
        self.path(expected_sha256)
        return BlobWriter(self, expected_sha256, max_size, partial=self.partial_dir / expected_sha256)

    def partial_sizes(self) -> dict[str, int]:
        """Blobs received in part, and how many bytes of each."""
        return {p.name: p.stat().st_size for p in self.partial_dir.iterdir() if p.is_file()}

    def discard_partial(self, sha256: str) -> int:
        """Drop the received part of a blob (a download that will not be resumed); returns the bytes freed."""
        self.path(sha256)  # validates the name: nothing outside partial/ is touched
        return _unlink(self.partial_dir / sha256)

    def remove(self, sha256: str) -> int:
        """Delete a blob (a retention rule decided it goes); returns the bytes freed, 0 when it was not there.
        Atomic like a write: a reader that opened it first keeps reading its bytes."""
        return _unlink(self.path(sha256))

    def disk_bytes(self) -> int:
        """Bytes of the blobs held and of the parts received: what the store occupies on disk. Safe while blobs
        come and go (a metrics thread reads it): a file removed under it counts 0."""
        files = [*self.partial_dir.iterdir(), *(blob for sub in self.objects_dir.iterdir() for blob in sub.iterdir())]
        total = 0
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                total += file.stat().st_size
        return total

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def open_mmap(self, sha256: str) -> mmap.mmap:
        """Read-only memory map of a blob (empty blobs do not occur: a blob has a header)."""
        with open(self.path(sha256), "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __iter__(self) -> Iterator[str]:
        for sub in sorted(self.objects_dir.iterdir()):
            for blob in sorted(sub.iterdir()):
                yield blob.name

    def _publish(self, tmp_path: Path, digest: str) -> None:
        final = self.path(digest)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp_path, final)
        _fsync_dir(final.parent)
