"""Local data: records on disk -> formatted text -> token ids and labels -> packed fixed-length sequences ->
per-step batches.

Shared by the client (training data for a visit) and the coordinator (held-out evaluation data), so that both sides
turn the same files into the same tensors. The stages:

1. ``common/records.py`` reads files (text, JSON lines, Parquet, CSV, Arrow, ``save_to_disk``) into ``Document``s;
2. ``common/prompts.py`` lays conversations out as text in the run's prompt format and says which characters carry
   loss (the responses, by default);
3. ``tokenize_documents`` turns the documents into one token stream with labels (``IGNORE_INDEX`` where a token
   carries no loss), each document followed by exactly one EOS;
4. ``pack_sequences`` cuts the stream into ``Sequences`` rows, the labels alongside the ids;
5. ``visit_batches`` draws each visit's rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcybgd.common.lm_loss import IGNORE_INDEX
from fedcybgd.common.prompts import PromptFormat, RenderedDocument, render_document, resolve_prompt_format
from fedcybgd.common.records import Document, RecordOptions, load_documents
from fedcybgd.common.sequences import Sequences

__all__ = [
    "TokenStream",
    "tokenize_documents",
    "pack_sequences",
    "load_packed",
    "visit_batches",
]


# -------------------------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True)
class TokenStream:
    """The token ids of a run of documents, and their labels: ``None`` when every token carries loss, else one per
    id (the id, or ``IGNORE_INDEX``)."""

    ids: list[int]
    labels: list[int] | None = None
    #: Documents left out under ``skip_invalid`` (their prompt format could not lay them out), and the first few
    #: error messages.
    skipped: int = 0
    skip_examples: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_documents(docs: Sequence[Document], tokenizer: Any, prompt_format: PromptFormat | None = None, *,
                       skip_invalid: bool = False) -> TokenStream:
    """Concatenate the token ids of all documents, each followed by exactly one EOS, with their labels.

    Plain text is encoded without special tokens and carries loss throughout. Conversations (chat and instruction
    records) are rendered in ``prompt_format`` (default: the run's default, ``auto`` with loss on responses), which
    brings its own BOS/turn markers, and encoded without adding special tokens (as ``apply_chat_template`` does); they
    get an EOS appended unless the text already ends with it, and carry loss where the format says. A token carries
    loss when it overlaps a trained span of the text (fast tokenizers' offsets); a slow tokenizer encodes the trained
    and untrained stretches separately. The EOS closing a document carries loss when its last token does.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    fmt = prompt_format or resolve_prompt_format("auto", "responses", tokenizer)
    ids: list[int] = []
    labels: list[int] | None = None
    skipped: list[str] = []
    for doc in docs:
        try:
            rendered = render_document(doc, fmt, tokenizer)
        except ValueError as exc:
            if not skip_invalid:
                raise
            skipped.append(str(exc))
            continue
        toks, trained = _encode(rendered, tokenizer)
        if not toks or toks[-1] != eos:
            toks.append(eos)
            trained.append(trained[-1] if trained else True)
        if labels is None and not all(trained):
            labels = list(ids)  # every earlier token carried loss
        if labels is not None:
            labels.extend(t if keep else IGNORE_INDEX for t, keep in zip(toks, trained, strict=True))
        ids.extend(toks)
    return TokenStream(ids, labels, len(skipped), tuple(skipped[:5]))


def _encode(rendered: RenderedDocument, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """Token ids of ``rendered.text`` and, per token, whether it carries loss."""
    text = rendered.text
    if rendered.all_trained:
        toks = _flat_ids(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        return toks, [True] * len(toks)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        toks = _flat_ids(enc["input_ids"])
        return toks, [_overlaps(int(a), int(b), rendered.spans) for a, b in enc["offset_mapping"]]
    toks, trained = [], []
    pos = 0
    for start, stop in rendered.spans:  # untrained stretch, then trained stretch, ...
        for piece, keep in ((text[pos:start], False), (text[start:stop], True)):
            if piece:
                part = _flat_ids(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
                toks.extend(part)
                trained.extend([keep] * len(part))
        pos = stop
    if pos < len(text):
        part = _flat_ids(tokenizer(text[pos:], add_special_tokens=False, verbose=False)["input_ids"])
        toks.extend(part)
        trained.extend([False] * len(part))
    return toks, trained


def _overlaps(start: int, stop: int, spans: tuple[tuple[int, int], ...]) -> bool:
    """Whether characters ``[start, stop)`` of a token overlap a trained span (an empty token: whether it lies in
    one)."""
    if stop > start:
        return any(start < e and stop > s for s, e in spans)
    return any(s <= start < e for s, e in spans)


def _flat_ids(out: Any) -> list[int]:
    """Normalise what tokenizers return (list, nested single-row list, BatchEncoding, tensor) to list[int]."""
    if isinstance(out, Mapping) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):
        if len(out) != 1:
            raise ValueError(f"expected token ids for one sequence, got {len(out)}")
        out = list(out[0])
    return [int(t) for t in out]


def pack_sequences(tokens: TokenStream | Sequence[int], seq_len: int) -> Sequences:
    """Cut the token stream into ``[n, seq_len]`` contiguous rows (int64), labels alongside; the incomplete tail is
    dropped."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stream = tokens if isinstance(tokens, TokenStream) else TokenStream(list(tokens))
    n = len(stream.ids) // seq_len
    if n == 0:
        raise ValueError(f"only {len(stream.ids)} tokens, fewer than one sequence of {seq_len}")
    ids = torch.tensor(stream.ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if stream.labels is None:
        return Sequences(ids)
    labels = torch.tensor(stream.labels[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return Sequences(ids, labels)


def load_packed(path: str | Path, tokenizer: Any, seq_len: int, prompt_format: PromptFormat | None = None,
                options: RecordOptions | None = None) -> Sequences:
    """``load_documents`` -> ``tokenize_documents`` -> ``pack_sequences``."""
    docs = load_documents(path, options)
    skip = options is not None and options.skip_invalid
    return pack_sequences(tokenize_documents(docs, tokenizer, prompt_format, skip_invalid=skip), seq_len)


# --------------------------------------------------------------------------------------------- batching


def visit_batches(num_sequences: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Row indices (int64) of the batch for each of ``steps`` steps, a pure function of the arguments.

    Walks through a seeded random permutation of ``range(num_sequences)``; when it runs out, a new permutation
    is drawn from the same generator and the walk continues (also in the middle of a batch, which is how a
    ``batch_size`` larger than ``num_sequences`` is served). So every sequence is seen once before any is seen
    twice, and the first ``k`` batches do not depend on ``steps``.
    """
    if num_sequences <= 0:
        raise ValueError(f"num_sequences must be positive, got {num_sequences}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_sequences, generator=gen)
    pos = 0
    batches = []
    for _ in range(steps):
        parts = []
        need = batch_size
        while need:
            if pos == num_sequences:
                perm, pos = torch.randperm(num_sequences, generator=gen), 0
            take = min(need, num_sequences - pos)
            parts.append(perm[pos : pos + take])
            pos += take
            need -= take
        batches.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())
    return batches
