"""Local data: documents on disk -> token ids -> packed fixed-length sequences -> per-step batches.

Shared by the client (training data for a visit) and the coordinator (held-out evaluation data), so that
both sides turn the same files into the same tensors.

Supported inputs (a single file, or a directory searched recursively; files are taken in sorted order):

* ``*.txt``   -- the whole file is one plain-text document.
* ``*.jsonl`` -- one document per non-blank line, each a JSON object of one of three shapes:
    - ``{"text": "..."}``                                                    plain text
    - ``{"instruction": "...", "input": "..." (optional), "output": "..."}`` instruction tuning
    - ``{"messages": [{"role": "...", "content": "..."}, ...]}``            chat

Instruction records become a two-turn chat: the user turn is the instruction (followed by a blank line and
the input, when there is a non-empty input) and the assistant turn is the output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Document",
    "SUPPORTED_SUFFIXES",
    "load_documents",
    "tokenize_documents",
    "pack_sequences",
    "load_packed",
    "visit_batches",
]

SUPPORTED_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One training document: either plain ``text`` or chat ``messages`` (``(role, content)`` pairs).

    Exactly one of the two is set. ``source`` says where it came from (``"file"`` or ``"file:line"``) and is
    only used in messages.
    """

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a Document holds either text or messages, not both or neither")
        if self.messages is not None and not self.messages:
            raise ValueError("a chat Document needs at least one message")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def chat(self) -> list[dict[str, str]]:
        """The messages in the ``[{"role": ..., "content": ...}, ...]`` form chat templates take."""
        if self.messages is None:
            raise ValueError("not a chat document")
        return [{"role": role, "content": content} for role, content in self.messages]

    @classmethod
    def from_text(cls, text: str, source: str = "") -> Document:
        return cls(text=text, source=source)

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, str]], source: str = "") -> Document:
        return cls(messages=tuple((m["role"], m["content"]) for m in messages), source=source)


# ----------------------------------------------------------------------------------------------- loading


def load_documents(path: str | Path) -> list[Document]:
    """Read every document under ``path`` (a ``.txt``/``.jsonl`` file, or a directory of them).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unsupported file, a malformed
    JSONL line (the message names the file and the 1-based line number) or when nothing is found.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    if root.is_dir():
        files = sorted(
            (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES),
            key=lambda p: p.relative_to(root).parts,
        )
        if not files:
            raise ValueError(f"{root}: directory holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
    else:
        if root.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise ValueError(f"{root}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
        files = [root]

    docs: list[Document] = []
    for file in files:
        if file.suffix.lower() == ".txt":
            docs.append(Document.from_text(file.read_text(encoding="utf-8"), source=str(file)))
        else:
            docs.extend(_read_jsonl(file))
    if not docs:
        raise ValueError(f"{root}: no documents found")
    return docs


def _read_jsonl(file: Path) -> list[Document]:
    docs = []
    with file.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{file}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg}") from None
            try:
                docs.append(_record_to_document(record, where))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
    return docs


def _record_to_document(record: Any, where: str) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError('"messages" must be a non-empty list')
        pairs = []
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f'"messages"[{i}] must be an object with string "role" and "content"')
            pairs.append((m["role"], m["content"]))
        return Document(messages=tuple(pairs), source=where)
    if "instruction" in record or "output" in record:
        instruction, output, extra = record.get("instruction"), record.get("output"), record.get("input")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError('an instruction record needs string "instruction" and "output"')
        if extra is not None and not isinstance(extra, str):
            raise ValueError('"input" must be a string when present')
        user = instruction + "\n\n" + extra if extra else instruction
        return Document(messages=(("user", user), ("assistant", output)), source=where)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError('"text" must be a string')
        return Document(text=record["text"], source=where)
    raise ValueError('expected a "text", "instruction"/"output" or "messages" record')


# -------------------------------------------------------------------------------------------- tokenizing


def tokenize_documents(docs: Sequence[Document], tokenizer: Any) -> list[int]:
    """Concatenate the token ids of all documents, each followed by exactly one EOS.

    Plain text is encoded without special tokens; chat documents go through the tokenizer's chat template
    (which brings its own BOS/turn markers), and get an EOS appended unless the template already ends with it.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id")
    ids: list[int] = []
    for doc in docs:
        if doc.is_chat:
            try:
                toks = _flat_ids(tokenizer.apply_chat_template(doc.chat(), tokenize=True, return_dict=False))
            except ValueError as exc:  # e.g. "tokenizer.chat_template is not set"
                raise ValueError(f"{doc.source}: cannot apply the chat template: {exc}") from exc
            ids.extend(toks)
            if not toks or toks[-1] != eos:
                ids.append(eos)
        else:
            ids.extend(_flat_ids(tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]))
            ids.append(eos)
    return ids


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


def pack_sequences(token_ids: Sequence[int], seq_len: int) -> torch.Tensor:
    """Cut the token stream into ``[n, seq_len]`` contiguous rows (int64); the incomplete tail is dropped."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = len(token_ids) // seq_len
    if n == 0:
        raise ValueError(f"only {len(token_ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(list(token_ids[: n * seq_len]), dtype=torch.long).view(n, seq_len)


def load_packed(path: str | Path, tokenizer: Any, seq_len: int) -> torch.Tensor:
    """``load_documents`` -> ``tokenize_documents`` -> ``pack_sequences``."""
    return pack_sequences(tokenize_documents(load_documents(path), tokenizer), seq_len)


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
