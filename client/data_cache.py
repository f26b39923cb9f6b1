"""The client's tokenised data, kept on disk so that a restarted client does not read and tokenise its data again.

Tokenising a site's data (reading Parquet or JSON lines, rendering every conversation in the run's prompt format,
encoding it) takes minutes on a large corpus and gives the same sequences every time for the same inputs. So the
packed ``Sequences`` are stored (safetensors, never pickle) under a key that covers everything they depend on:

* the data files, by content (SHA-256 of each file, with its path relative to the data root): a changed, added or
  removed file gives another key;
* how records are read (column mapping, split, skip option);
* the tokenizer, by the digest of its files as the coordinator sent them;
* the prompt format (its template and ``train_on``);
* the sequence length.

Hashing the files reads them once (hundreds of MB/s), far less than tokenising them. The newest ``KEEP`` entries are
kept; older ones are deleted when a new one is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch

from fedcybgd.common.data import pack_sequences, tokenize_documents
from fedcybgd.common.prompts import PromptFormat
from fedcybgd.common.records import RecordOptions, data_files, load_records
from fedcybgd.common.sequences import Sequences

__all__ = ["TokenisedData", "DataKey", "KEEP"]

log = logging.getLogger("fedcybgd.client")

#: Cache entries kept (one per data/tokenizer/format/length combination a client trained with recently).
KEEP = 8
_FORMAT_VERSION = 1  # bump when the packing itself changes, so that older entries are not reused


@dataclass(frozen=True)
class DataKey:
    """What a client's packed data depends on, besides the files' content."""

    path: str
    options: RecordOptions
    tokenizer_digest: str
    prompt: PromptFormat
    seq_len: int


class TokenisedData:
    """Packed sequences of local data, from the cache in ``directory`` when they are there."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self, key: DataKey, tokenizer: Any) -> Sequences:
        """The data of ``key`` packed into sequences: from the cache, or read, tokenised, packed and cached."""
        started = time.perf_counter()
        digest = self._digest(key)
        entry = self.directory / f"{digest}.safetensors"
        if entry.is_file():
            try:
                sequences, skipped = _read(entry)
            except (OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:  # torn or foreign: again
                log.warning("tokenised data cache %s unreadable (%s): tokenising again", entry.name, exc)
            else:
                os.utime(entry)  # most recently used
                log.info("local data from the tokenised cache %s: %d sequences of %d tokens (%.2f s)%s",
                         digest[:12], len(sequences), sequences.seq_len, time.perf_counter() - started,
                         f"; {skipped} records skipped" if skipped else "")
                return sequences
        records = load_records(key.path, key.options)
        stream = tokenize_documents(records.documents, tokenizer, key.prompt, skip_invalid=key.options.skip_invalid)
        skipped = records.skipped + stream.skipped
        if skipped:
            log.warning("skipped %d records of %s that cannot be used (skip_invalid), e.g. %s", skipped, key.path,
                        "; ".join((*records.skip_examples, *stream.skip_examples)[:3]))
        sequences = pack_sequences(stream, key.seq_len)
        self._write(entry, sequences, skipped)
        log.info("tokenised %d documents of %s into %d sequences of %d tokens in %.2f s (prompt format %s, loss on "
                 "%s); cached as %s", len(records.documents) - stream.skipped, key.path, len(sequences),
                 sequences.seq_len, time.perf_counter() - started, key.prompt.name,
                 "every token" if sequences.labels is None else key.prompt.train_on, digest[:12])
        return sequences

    def _digest(self, key: DataKey) -> str:
        root = Path(key.path)
        h = hashlib.sha256()
        h.update(json.dumps({
            "version": _FORMAT_VERSION, "columns": dict(key.options.columns or {}), "split": key.options.split,
            "skip_invalid": key.options.skip_invalid, "tokenizer": key.tokenizer_digest, "prompt": key.prompt.digest,
            "seq_len": key.seq_len}, sort_keys=True).encode())
        for file in data_files(root):
            relative = file.relative_to(root).as_posix() if root.is_dir() else file.name
            h.update(f"\0{relative}\0{_file_sha256(file)}".encode())
        return h.hexdigest()

    def _write(self, entry: Path, sequences: Sequences, skipped: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {"ids": sequences.ids.contiguous()}
        if sequences.labels is not None:
            tensors["labels"] = sequences.labels.contiguous()
        tmp = entry.with_suffix(".tmp")
        safetensors.torch.save_file(tensors, str(tmp), metadata={"skipped": str(skipped)})
        os.replace(tmp, entry)  # whole or absent: a crash mid-write leaves no torn entry
        entries = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[KEEP:]:
            old.unlink(missing_ok=True)


def _read(entry: Path) -> tuple[Sequences, int]:
    with safetensors.safe_open(str(entry), framework="pt") as f:
        metadata = f.metadata() or {}
        names = set(f.keys())
        ids = f.get_tensor("ids")
        labels = f.get_tensor("labels") if "labels" in names else None
    return Sequences(ids, labels), int(metadata.get("skipped", "0"))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
