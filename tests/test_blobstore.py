"""The content-addressed blob store (fedcybgd.common.blobstore)."""

from __future__ import annotations

import hashlib
import os

import pytest

from fedcybgd.common.blobstore import BlobStore
from fedcybgd.common.codec import CodecError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tmp_files(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.tmp_dir.iterdir())


def _object_files(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.objects_dir.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


A = b"block A: " + bytes(range(256)) * 4
B = b"block B: something else entirely"


def test_put_has_read_size_iter(store):
    assert list(store) == []
    da = store.put(A)
    db = store.put(B)
    assert (da, db) == (_sha(A), _sha(B))
    assert store.has(da) and store.has(db)
    assert not store.has(_sha(b"never stored"))
    assert store.read(da) == A and store.read(db) == B
    assert store.size(da) == len(A) and store.size(db) == len(B)
    assert sorted(store) == sorted([da, db])
    assert list(store) == sorted(store)  # iteration is in name order
    # Named by content, fanned out by the first two hex digits.
    assert store.path(da) == store.objects_dir / da[:2] / da
    assert store.path(da).read_bytes() == A
    assert _tmp_files(store) == []


def test_missing_blob_read_raises(store):
    with pytest.raises(FileNotFoundError):
        store.read(_sha(b"nope"))
    with pytest.raises(FileNotFoundError):
        store.size(_sha(b"nope"))


def test_put_is_idempotent(store):
    d1 = store.put(A)
    inode = store.path(d1).stat().st_ino
    d2 = store.put(A)
    assert d1 == d2 == _sha(A)
    assert store.read(d1) == A
    assert list(store) == [d1]
    assert _object_files(store) == [d1]
    assert store.path(d1).stat().st_ino == inode  # not rewritten
    assert _tmp_files(store) == []


def test_writer_incremental_commit(store):
    with store.writer(_sha(A), len(A)) as w:
        for i in range(0, len(A), 100):
            w.write(A[i : i + 100])
        assert not store.has(_sha(A))  # not visible before commit
        assert len(_tmp_files(store)) == 1
        assert w.commit() == _sha(A)
    assert store.read(_sha(A)) == A
    assert _tmp_files(store) == []


def test_writer_with_wrong_declared_sha_publishes_nothing(store):
    declared = _sha(B)
    with store.writer(declared, len(A)) as w:
        w.write(A)
        with pytest.raises(CodecError):
            w.commit()
    assert not store.has(declared)
    assert not store.has(_sha(A))
    assert list(store) == [] and _object_files(store) == []
    assert _tmp_files(store) == []


def test_writer_exceeding_max_size(store):
    with store.writer(_sha(A), len(A) - 1) as w:
        w.write(A[:-1])  # exactly the limit is fine
        with pytest.raises(CodecError):
            w.write(A[-1:])
        assert w.size == len(A) - 1
    assert not store.has(_sha(A))
    assert _object_files(store) == [] and _tmp_files(store) == []


def test_writer_exceeding_max_size_in_one_write(store):
    w = store.writer(_sha(A), 10)
    with pytest.raises(CodecError):
        w.write(A)
    w.abort()
    assert _tmp_files(store) == [] and not store.has(_sha(A))


class Invalid(Exception):
    pass


def test_commit_validate_that_raises_publishes_nothing(store):
    seen = []

    def validate(path):
        seen.append(path.read_bytes())  # the complete temporary file
        raise Invalid("not a block")

    with store.writer(_sha(A), len(A)) as w:
        w.write(A)
        with pytest.raises(Invalid):
            w.commit(validate=validate)
    assert seen == [A]
    assert not store.has(_sha(A))
    assert _object_files(store) == [] and _tmp_files(store) == []


def test_commit_validate_that_passes_publishes(store):
    seen = []
    with store.writer(_sha(B), len(B)) as w:
        w.write(B)
        assert w.commit(validate=lambda p: seen.append(p.read_bytes())) == _sha(B)
    assert seen == [B]
    assert store.read(_sha(B)) == B
    assert _tmp_files(store) == []


def test_validate_is_not_called_when_the_hash_is_wrong(store):
    called: list[object] = []
    with store.writer(_sha(B), len(A)) as w:
        w.write(A)
        with pytest.raises(CodecError):
            w.commit(validate=called.append)
    assert called == []


def test_abandoned_writer_leaves_no_temp_file(store):
    with store.writer(_sha(A), len(A)) as w:
        w.write(A[:10])
    assert _tmp_files(store) == [] and not store.has(_sha(A))
    with pytest.raises(RuntimeError), store.writer(_sha(A), len(A)) as w:
        w.write(A)
        raise RuntimeError("connection lost")
    assert _tmp_files(store) == [] and not store.has(_sha(A))


def test_tmp_leftovers_are_cleaned_at_construction(tmp_path):
    root = tmp_path / "blobs"
    first = BlobStore(root)
    digest = first.put(A)
    (first.tmp_dir / "incoming-crashed").write_bytes(b"half a blob")
    (first.tmp_dir / "incoming-other").write_bytes(b"")
    w = first.writer(_sha(B), len(B))  # a write in progress when the process "died"
    w.write(B[:5])
    assert len(_tmp_files(first)) == 3
    second = BlobStore(root)
    assert _tmp_files(second) == []
    assert second.read(digest) == A  # published blobs are kept
    assert list(second) == [digest]
    w.abort()  # closes the dead writer's file; its temporary file is already gone
    assert _tmp_files(second) == []


@pytest.mark.parametrize("name", [
    "../x",
    "../" + "a" * 61,
    "a" * 62 + "/.",
    "/" + "a" * 63,
    "a" * 63,
    "a" * 65,
    "",
    "A" * 64,          # upper case is not the canonical spelling
    "g" * 64,
    " " + "a" * 63,
    "a" * 63 + "\n",
    "a" * 63 + "\x00",
])
def test_path_rejects_non_digest_names(store, name):
    with pytest.raises(ValueError):
        store.path(name)
    assert store.has(name) is False
    with pytest.raises(ValueError):
        store.writer(name, 10)
    with pytest.raises(ValueError):
        store.read(name)
    assert _tmp_files(store) == []  # refused before any temporary file exists


def test_path_accepts_digest(store):
    d = "0123456789abcdef" * 4
    assert store.path(d) == store.objects_dir / "01" / d
    assert store.path(d).resolve().is_relative_to(store.objects_dir.resolve())


def test_open_mmap_returns_the_bytes(store):
    d = store.put(A)
    mm = store.open_mmap(d)
    try:
        assert len(mm) == len(A)
        assert mm[:] == A
        assert bytes(memoryview(mm)[5:20]) == A[5:20]
        with pytest.raises(TypeError):
            mm[0] = 0  # read-only
    finally:
        mm.close()


def test_store_reopened_sees_blobs(tmp_path):
    root = tmp_path / "blobs"
    d = BlobStore(root).put(B)
    again = BlobStore(root)
    assert again.has(d) and again.read(d) == B and again.size(d) == len(B)
    assert os.listdir(again.objects_dir) == [d[:2]]
