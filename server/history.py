"""What the run has committed so far, as the parts that plan work need it in memory: which
rounds are done, and every blob each block has had (the candidates for version deltas).

Both are rebuilt from the durable state at start-up; strategies say which blobs a committed
visit or round added (`Strategy.blobs_of`).
"""
from __future__ import annotations

from collections.abc import Iterable

from fedcybgd.common.blobstore import BlobStore


class CompletedRounds:
    """The rounds of the schedule whose work is part of the model."""

    def __init__(self, rounds: Iterable[int], total: int) -> None:
        self._done = set(rounds)
        self.total = total

    def __contains__(self, round_: object) -> bool:
        return round_ in self._done

    def add(self, round_: int) -> None:
        self._done.add(round_)

    @property
    def count(self) -> int:
        return len(self._done)

    @property
    def all_done(self) -> bool:
        return len(self._done) >= self.total

    def first_open(self) -> int | None:
        """The earliest round not done yet."""
        return next((r for r in range(self.total) if r not in self._done), None)


class BlockHistory:
    """Every blob each block has had, oldest first. Index `len(blocks)` is the place of a blob
    beyond the blocks (fedlora's adapter)."""

    def __init__(self, blobs: BlobStore, slots: int) -> None:
        self._blobs = blobs
        self._by_block: dict[int, list[str]] = {i: [] for i in range(slots)}

    def add(self, changed: dict[int, str]) -> None:
        """A new version changed these blocks to these blobs."""
        for index, sha in changed.items():
            self._by_block[index].append(sha)

    def delta_base(self, block: int, sha: str, have: set[str]) -> str | None:
        """The newest earlier version of this block that the client holds (same size), if any:
        the blob `sha` then travels as the XOR against it."""
        size = self._blobs.size(sha)
        for older in reversed(self._by_block.get(block, [])):
            if older != sha and older in have and self._size(older) == size:
                return older
        return None

    def _size(self, sha: str) -> int | None:
        """A blob's size; None when the store no longer has it (its versions were pruned: `server/retention.py`)."""
        try:
            return self._blobs.size(sha)
        except FileNotFoundError:
            return None
