"""Local data files -> ``Document`` records (plain text, or a conversation), the first stage of the data pipeline.

Shared by the client (its training data) and the coordinator (held-out evaluation data) so that both read the same
files into the same records; ``common/data.py`` turns records into token ids and packed sequences.

Inputs: a single file, or a directory searched recursively whose supported files are taken in sorted order (by
path). The format follows the file's suffix:

* ``*.txt``     -- the whole file is one plain-text document.
* ``*.jsonl``   -- one record per non-blank line (errors name ``file:line``).
* ``*.json``    -- a JSON array of records (errors name ``file row i``, 0-based), or a single record; a file that
  is not one JSON value (and does not start with ``[``) is read as JSON lines, like ``*.jsonl``.
* ``*.parquet``, ``*.csv``, ``*.arrow`` -- one record per row (``file row i``, 0-based), read with Hugging Face
  ``datasets`` (``common/tabular.py``: local files only, nothing cached next to the data). CSV cells are all
  strings, empty cells ``""``; a CSV ``messages``/``conversations`` cell holds the list as JSON. ``.arrow`` is
  Arrow IPC, stream (as ``save_to_disk`` writes) or file format. A ``None`` cell counts as an absent field.
* a ``save_to_disk`` directory (``dataset_info.json`` and ``state.json``, or ``dataset_dict.json``), also inside a
  searched directory: read whole with ``datasets.load_from_disk`` (``dir row i``). Of a ``DatasetDict`` its only
  split is read, else the split named by ``RecordOptions.split``, else ``train``.

Every record, whatever the format, is an object (row) of one of these shapes, tried in this order; other keys
(columns) are ignored:

* ``{"messages": [{"role": "...", "content": "..."}, ...]}``  chat; roles are kept as they are
* ``{"conversations": [{"from": "human", "value": "..."}, ...]}``  ShareGPT: ``from`` human -> user, gpt (or
  chatgpt) -> assistant, system -> system, any other kept; items of either list may use either key pair
* ``{"instruction": "...", "input": "..." (optional), "output": "..."}``  instruction tuning
* ``{"prompt": "...", "completion": "..."}``  strings: a user turn and an assistant turn
* ``{"text": "..."}``  plain text

A string ``system`` field adds a leading system message to the chat shapes (unless the conversation already starts
with one). Instruction records become a two-turn conversation: the user turn is the instruction (followed by a blank
line and the input, when there is a non-empty input) and the assistant turn is the output; the record's instruction
and input are kept apart too (``Document.instruction``), for prompt formats that lay them out separately (Alpaca's).

``RecordOptions.columns`` maps the data's own column names to these fields (``{"question": "instruction", "answer":
"output"}``, or ``"question=instruction,answer=output"``, see ``parse_columns``) for every row of every format but
``.txt``: a mapped column takes the field's name, and a column already named like a mapped field is dropped.

A record that cannot be used raises ``ValueError`` naming its file and line or row; with
``RecordOptions.skip_invalid`` it is skipped instead and counted (``RecordSet.skipped``, ``skip_examples``). A file
that cannot be read at all (not UTF-8, not parquet, ...) always raises.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcybgd.common import tabular

__all__ = ["Document", "RecordOptions", "RecordSet", "SUPPORTED_SUFFIXES", "FIELDS", "parse_columns", "data_files",
           "load_records", "load_documents", "load_groups"]

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", *tabular.TABULAR_SUFFIXES)

#: The record fields a column can be mapped to.
FIELDS = ("text", "instruction", "input", "output", "system", "messages", "conversations", "prompt", "completion")

_MAX_EXAMPLES = 5
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant"}

logger = logging.getLogger(__name__)


def parse_columns(value: str | Mapping[str, str] | None) -> dict[str, str] | None:
    """A column mapping from ``"question=instruction,answer=output"`` (the command line) or a mapping (a TOML
    table); ``None`` for none. Raises ``ValueError`` for a malformed entry, a target that is not a record field
    (``FIELDS``), a column mapped twice or two columns mapped to one field."""
    if value is None:
        return None
    pairs: list[tuple[Any, Any]]
    if isinstance(value, str):
        pairs = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            column, eq, target = (part.strip() for part in entry.partition("="))
            if not eq or not column or not target or "=" in target:
                raise ValueError(f"column mapping entry {entry!r}: expected column=field")
            pairs.append((column, target))
    elif isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        raise ValueError(f"a column mapping is a 'column=field,...' string or a table, not {type(value).__name__}")
    mapping: dict[str, str] = {}
    for column, target in pairs:
        if not (isinstance(column, str) and column and isinstance(target, str)):
            raise ValueError(f"column mapping {column!r} -> {target!r}: column and field must be non-empty strings")
        if target not in FIELDS:
            raise ValueError(f"column mapping {column!r} -> {target!r}: {target!r} is not a record field "
                             f"(one of {', '.join(FIELDS)})")
        if column in mapping:
            raise ValueError(f"column mapping: column {column!r} is mapped twice")
        other = next((c for c, t in mapping.items() if t == target), None)
        if other is not None:
            raise ValueError(f"column mapping: columns {other!r} and {column!r} both map to {target!r}")
        mapping[column] = target
    return mapping or None


@dataclass(frozen=True)
class RecordOptions:
    """How a site's files map to records: ``columns`` renames the data's own column names to the record fields
    (``{"question": "instruction", "answer": "output"}``; validated and normalised by ``parse_columns``, which also
    takes the ``"question=instruction,answer=output"`` form); ``split`` picks the split of a ``save_to_disk``
    directory holding several; ``skip_invalid`` skips (and counts) records that cannot be used instead of failing
    on the first."""

    columns: Mapping[str, str] | None = None
    split: str = ""
    skip_invalid: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", parse_columns(self.columns))


@dataclass(frozen=True)
class Document:
    """One training document: either plain ``text`` or chat ``messages`` (``(role, content)`` pairs).

    Exactly one of the two is set. ``source`` says where it came from (``"file"``, ``"file:line"`` or
    ``"file row i"``) and is only used in messages.
    """

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    source: str = ""
    #: For a document made from an instruction record: its ``(instruction, input)`` apart ("" when it had no input).
    #: The first user message then also carries them as ``instruction`` and ``input`` keys (``chat()``).
    instruction: tuple[str, str] | None = None

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
        out: list[dict[str, str]] = [{"role": role, "content": content} for role, content in self.messages]
        if self.instruction is not None:
            first_user = next(m for m in out if m["role"] == "user")
            first_user["instruction"], first_user["input"] = self.instruction
        return out

    def to_record(self) -> dict[str, Any]:
        """The document as a record of its own shape (``text``; ``instruction``/``input``/``output`` plus any
        ``system``; ``messages``), which reads back into an equal document (but for ``source``)."""
        if self.messages is None:
            return {"text": self.text}
        if self.instruction is None:
            return {"messages": self.chat()}
        system = {"system": self.messages[0][1]} if self.messages[0][0] == "system" else {}
        return {**system, "instruction": self.instruction[0], "input": self.instruction[1],
                "output": self.messages[-1][1]}

    @classmethod
    def from_text(cls, text: str, source: str = "") -> Document:
        return cls(text=text, source=source)

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, str]], source: str = "") -> Document:
        return cls(messages=tuple((m["role"], m["content"]) for m in messages), source=source)


@dataclass(frozen=True)
class RecordSet:
    """What ``load_records`` read."""

    documents: list[Document]
    #: Records skipped under ``RecordOptions.skip_invalid``, and the first few (at most 5) of their error messages.
    skipped: int
    skip_examples: tuple[str, ...]
    #: The files read, sorted (for a ``save_to_disk`` directory: its data files and JSON metadata): a cache key.
    files: tuple[Path, ...]


# ----------------------------------------------------------------------------------------------- loading


def data_files(path: str | Path) -> tuple[Path, ...]:
    """The files ``load_records(path)`` reads, in the same order, without reading them.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unsupported file or a directory
    without any supported file."""
    return tuple(f for _, source in _sources(Path(path)) for f in _source_files(source))


def load_records(path: str | Path, options: RecordOptions | None = None) -> RecordSet:
    """Read every record under ``path`` (a supported file, a ``save_to_disk`` directory, or a directory of them).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an unsupported or unreadable file, a
    record that cannot be used (the message names the file and the 1-based line or 0-based row; unless
    ``options.skip_invalid``) or when no document is found."""
    return load_groups(path, options)[0]


def load_documents(path: str | Path, options: RecordOptions | None = None) -> list[Document]:
    """``load_records(path, options).documents``, logging a warning when records were skipped."""
    records = load_records(path, options)
    if records.skipped:
        logger.warning("%s: skipped %d invalid record(s), e.g. %s", path, records.skipped, records.skip_examples[0])
    return records.documents


def load_groups(path: str | Path, options: RecordOptions | None = None,
                column: str | None = None) -> tuple[RecordSet, list[str]]:
    """``load_records`` and each document's group: the value of ``column`` in its row (a string as it is, other
    values as JSON; the column's own name, before any mapping), or without ``column`` the file or ``save_to_disk``
    directory it came from. A row without a value in ``column`` is an invalid record."""
    options = options or RecordOptions()
    root = Path(path)
    docs: list[Document] = []
    groups: list[str] = []
    skipped, examples = 0, list[str]()
    files: list[Path] = []
    for kind, source in _sources(root):
        files.extend(_source_files(source))
        for where, row in _rows(kind, source, options):
            try:
                doc = _convert(kind, row, where, options.columns)
                group = str(source) if column is None else _group(kind, row, where, column)
            except ValueError as exc:
                if not options.skip_invalid:
                    raise
                skipped += 1
                if len(examples) < _MAX_EXAMPLES:
                    examples.append(str(exc))
                continue
            docs.append(doc)
            groups.append(group)
    if not docs:
        note = f" ({skipped} invalid record(s) skipped, e.g. {examples[0]})" if skipped else ""
        raise ValueError(f"{root}: no documents found{note}")
    return RecordSet(docs, skipped, tuple(examples), tuple(files)), groups


def _sources(root: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of each source under ``root``: kind is a file suffix, or ``"dataset"`` for a
    ``save_to_disk`` directory."""
    if not root.exists():
        raise FileNotFoundError(f"no such file or directory: {root}")
    if root.is_dir():
        if tabular.is_saved_dataset(root):
            return [("dataset", root)]
        found: list[tuple[str, Path]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            for d in list(dirnames):
                if tabular.is_saved_dataset(here / d):
                    found.append(("dataset", here / d))
                    dirnames.remove(d)
            found.extend((Path(f).suffix.lower(), here / f) for f in filenames
                         if Path(f).suffix.lower() in SUPPORTED_SUFFIXES)
        if not found:
            raise ValueError(f"{root}: directory holds no {'/'.join(SUPPORTED_SUFFIXES)} files or saved datasets")
        return sorted(found, key=lambda s: s[1].relative_to(root).parts)
    if root.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{root}: unsupported file type (expected one of {', '.join(SUPPORTED_SUFFIXES)}, or a "
                         "save_to_disk directory)")
    return [(root.suffix.lower(), root)]


def _source_files(source: Path) -> list[Path]:
    return tabular.saved_dataset_files(source) if source.is_dir() else [source]


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc})") from None


class _Invalid(str):
    """A row that did not even parse (its message)."""


def _rows(kind: str, source: Path, options: RecordOptions) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for each row of a source; a row is what the file holds (not necessarily an object)."""
    if kind == ".txt":
        yield str(source), _read_text(source)
    elif kind == ".jsonl":
        with source.open("r", encoding="utf-8") as fh:
            yield from _json_lines(source, fh)
    elif kind == ".json":
        yield from _read_json(source)
    elif kind == "dataset":
        yield from tabular.saved_dataset_rows(source, options.split)
    else:
        yield from tabular.table_rows(source)


def _json_lines(file: Path, lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    try:
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    record = _Invalid(f"invalid JSON: {exc.msg}")
                yield f"{file}:{lineno}", record
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc})") from None


def _read_json(file: Path) -> Iterator[tuple[str, Any]]:
    content = _read_text(file)
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        if content.lstrip().startswith("["):
            raise ValueError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
        yield from _json_lines(file, io.StringIO(content, newline=None))  # JSON lines under a .json name
        return
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{file}: expected a JSON array of records (or JSON lines), got {type(value).__name__}")
    for i, record in enumerate(value):
        yield f"{file} row {i}", record


def _convert(kind: str, row: Any, where: str, columns: Mapping[str, str] | None) -> Document:
    if kind == ".txt":
        return Document.from_text(row, source=where)
    if isinstance(row, _Invalid):
        raise ValueError(f"{where}: {row}")
    record = _rename(row, columns) if columns and isinstance(row, dict) else row
    try:
        if kind == ".csv":
            for field in ("messages", "conversations"):
                if field in record:
                    record[field] = tabular.decode_json_cell(record[field], field)
        return _record_to_document(record, where)
    except ValueError as exc:
        message = f"{where}: {exc}"
        missing = [f"{c!r} (-> {t!r})" for c, t in (columns or {}).items() if isinstance(row, dict) and c not in row]
        if missing:
            message += f"; mapped column(s) {', '.join(missing)} missing from this row"
        raise ValueError(message) from None


def _rename(row: dict[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    targets = set(columns.values())
    out = {k: v for k, v in row.items() if k not in targets and k not in columns}
    out.update((t, row[c]) for c, t in columns.items() if c in row)
    return out


def _group(kind: str, row: Any, where: str, column: str) -> str:
    value = row.get(column) if isinstance(row, dict) and kind != ".txt" else None
    if value is None:
        raise ValueError(f"{where}: no {column!r} value to group by")
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def _record_to_document(record: Any, where: str) -> Document:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError('"system" must be a string when present')
    lead = (("system", system),) if system else ()
    for key in ("messages", "conversations"):
        if key in record:
            pairs = _messages(record[key], key)
            return Document(messages=pairs if pairs[0][0] == "system" else lead + pairs, source=where)
    if "instruction" in record or "output" in record:
        instruction, output, extra = record.get("instruction"), record.get("output"), record.get("input")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError('an instruction record needs string "instruction" and "output"')
        if extra is not None and not isinstance(extra, str):
            raise ValueError('"input" must be a string when present')
        user = instruction + "\n\n" + extra if extra else instruction
        return Document(messages=(*lead, ("user", user), ("assistant", output)), source=where,
                        instruction=(instruction, extra or ""))
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('a prompt/completion record needs string "prompt" and "completion"')
        return Document(messages=(*lead, ("user", prompt), ("assistant", completion)), source=where)
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError('"text" must be a string')
        return Document(text=record["text"], source=where)
    raise ValueError('expected a "text", "instruction"/"output", "prompt"/"completion", "messages" or '
                     '"conversations" record')


def _messages(messages: Any, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{key}" must be a non-empty list')
    pairs = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str):
            pairs.append((m["role"], m["content"]))
        elif isinstance(m, dict) and isinstance(m.get("from"), str) and isinstance(m.get("value"), str):
            pairs.append((_SHAREGPT_ROLES.get(m["from"], m["from"]), m["value"]))
        else:
            raise ValueError(f'"{key}"[{i}] must be an object with string "role" and "content" '
                             '(or ShareGPT "from" and "value")')
    return tuple(pairs)
