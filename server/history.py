"""What the run has committed so far, as the parts that plan work need it in memory: which
rounds are done, and the blobs each block has had that are still on disk (the candidates for version deltas).

Both are rebuilt from the durable state at start-up; strategies say which blobs a committed
visit or round added (`Strategy.blobs_of`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

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
    """The blobs each block has had that the store may still hold, oldest first: the candidates for a
    download's delta base. Index `len(blocks)` is the place of a blob beyond the blocks (fedlora's adapter).

    Retention (`server/retention.py`) calls `retain` after it deletes blobs, so the history holds about what the
    kept versions hold instead of a blob per visit forever. Writers (`add`, `retain`) hold the scheduling lock;
    readers (`delta_base`, from download threads) take a slice of a list, which a writer replaces or appends to
    but never edits in place."""

    #: How many of a block's newest blobs a delta base is looked for among, besides its first (the base model's,
    #: which many clients hold): a client holding none of them (it missed that many changes of the block)
    #: downloads the block whole.
    WALK = 16

    def __init__(self, blobs: BlobStore, slots: int) -> None:
        self._blobs = blobs
        self._by_block: dict[int, list[str]] = {i: [] for i in range(slots)}

    def add(self, changed: dict[int, str]) -> None:
        """A new version changed these blocks to these blobs."""
        for index, sha in changed.items():
            self._by_block[index].append(sha)

    def retain(self, kept: Callable[[str], bool]) -> None:
        """Forget the blobs for which `kept` is false (retention deleted them: they can be no delta base)."""
        for index, shas in self._by_block.items():
            if not all(kept(sha) for sha in shas):
                self._by_block[index] = [sha for sha in shas if kept(sha)]

    def blobs(self, block: int) -> list[str]:
        """The blobs remembered for a block, oldest first."""
        return list(self._by_block.get(block, []))

    def delta_base(self, block: int, sha: str, have: set[str]) -> str | None:
        """The newest earlier version of this block that the client holds (same size), looked for among the
        block's newest `WALK` blobs and its first, if any: the blob `sha` then travels as a delta against it."""
        shas = self._by_block.get(block, [])
        size = self._blobs.size(sha)
        for older in [*reversed(shas[-self.WALK:]), *shas[:1]]:
            if older != sha and older in have and self._size(older) == size:
                return older
        return None

    def _size(self, sha: str) -> int | None:
        """A blob's size; None when the store no longer has it (its versions were pruned: `server/retention.py`)."""
        try:
            return self._blobs.size(sha)
        except FileNotFoundError:
            return None
