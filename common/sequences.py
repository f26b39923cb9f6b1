"""Packed sequences: what every visit, reference and evaluation trains or measures on.

Token ids are packed into fixed-length rows; for instruction and chat data the *labels* are packed alongside them,
the ids where a token carries loss (the responses) and ``IGNORE_INDEX`` where it does not (the prompts). Plain text
carries loss on every token, so its labels are the ids themselves and are not stored (``labels is None``): a
plain-text run computes exactly what it did before labels existed.

The loss at position ``t`` predicts ``labels[t + 1]`` (``common/lm_loss.py``); a batch's loss is the mean over the
positions whose label counts, and an evaluation over several batches weights each batch by that count, so a loss is
always the mean over the tokens that carry loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedcybgd.common.lm_loss import IGNORE_INDEX

__all__ = ["Sequences", "SequencesLike", "as_sequences"]


@dataclass(frozen=True)
class Sequences:
    """``ids`` ``[n, seq_len]`` (int64) and, when some tokens carry no loss, ``labels`` of the same shape (int64:
    the id, or ``IGNORE_INDEX``)."""

    ids: torch.Tensor
    labels: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.dtype != torch.long:
            raise ValueError(f"sequences must be a [n, seq_len] LongTensor, got {self.ids.dtype} "
                             f"{tuple(self.ids.shape)}")
        if self.labels is not None and (self.labels.shape != self.ids.shape or self.labels.dtype != torch.long):
            raise ValueError(f"labels must be a LongTensor shaped like the ids {tuple(self.ids.shape)}, got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.seq_len

    def __getitem__(self, rows: slice | torch.Tensor) -> Sequences:
        """The sequences at ``rows`` (a slice or an index tensor), labels alongside."""
        return Sequences(self.ids[rows], None if self.labels is None else self.labels[rows])

    @classmethod
    def concat(cls, parts: list[Sequences]) -> Sequences:
        """``parts`` one after the other (pooled data: every site's sequences)."""
        if not parts:
            raise ValueError("nothing to concatenate")
        ids = torch.cat([p.ids for p in parts])
        if all(p.labels is None for p in parts):
            return cls(ids)
        return cls(ids, torch.cat([p.ids if p.labels is None else p.labels for p in parts]))

    def batch(self, rows: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ids, labels) of ``rows`` on ``device``; labels None when every token carries loss."""
        ids = self.ids[rows].to(device)
        return ids, None if self.labels is None else self.labels[rows].to(device)

    def loss_tokens(self, rows: torch.Tensor | None = None) -> int:
        """Predicted positions carrying loss in ``rows`` (all rows when None): a row of ``L`` tokens predicts its
        tokens ``1..L-1``."""
        ids = self.ids if rows is None else self.ids[rows]
        if self.labels is None:
            return int(ids.shape[0] * (ids.shape[1] - 1))
        labels = self.labels if rows is None else self.labels[rows]
        return int((labels[:, 1:] != IGNORE_INDEX).sum())


#: What the training and evaluation functions accept: packed sequences, or bare ids (plain text, loss on every token).
SequencesLike = Sequences | torch.Tensor


def as_sequences(data: SequencesLike) -> Sequences:
    """``data`` as ``Sequences`` (bare ids: every token carries loss)."""
    return data if isinstance(data, Sequences) else Sequences(data)
