"""Tabular data files read through Hugging Face ``datasets``: ``.parquet``, ``.csv``, ``.arrow`` files and
``save_to_disk`` directories, each as rows (plain dicts) for ``common/records.py`` to interpret.

Local files only: ``datasets`` is imported lazily (it takes about a second) with ``HF_DATASETS_OFFLINE=1`` unless
the environment says otherwise, and its files are built under a temporary cache directory that is deleted once the
rows are in memory, so nothing is written next to the data or under ``~/.cache``. ``HF_HUB_OFFLINE`` is left alone:
``datasets`` takes ``HF_DATASETS_OFFLINE`` first, and the hub setting would also switch off model downloads for
``transformers`` in the same process.

A row's ``None`` cells (a column missing from that row) are left out of its dict, so they count as absent.
CSV cells are all read as strings, empty cells as ``""`` (no NaN, no type guessing: ``007`` stays ``"007"``).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["TABULAR_SUFFIXES", "is_saved_dataset", "saved_dataset_files", "table_rows", "saved_dataset_rows"]

#: File suffix -> the ``datasets`` packaged loader that reads it.
TABULAR_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

_BATCH = 1024


def is_saved_dataset(directory: Path) -> bool:
    """Whether ``directory`` was written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (directory / "dataset_dict.json").is_file() or (
        (directory / "dataset_info.json").is_file() and (directory / "state.json").is_file())


def saved_dataset_files(directory: Path) -> list[Path]:
    """A ``save_to_disk`` directory's data (``.arrow``) and metadata (``.json``) files, sorted."""
    files = [p for p in directory.rglob("*") if p.is_file() and p.suffix in (".arrow", ".json")]
    return sorted(files, key=lambda p: p.relative_to(directory).parts)


def _datasets(what: Path) -> Any:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"{what}: reading this needs the Hugging Face datasets package "
                          "(pip install 'datasets>=5.2,<6')") from exc
    datasets.disable_progress_bars()
    return datasets


def table_rows(file: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a ``.parquet``/``.csv``/``.arrow`` file; ``where`` is ``"file row i"``
    (0-based, the header of a CSV file not counted)."""
    builder = TABULAR_SUFFIXES[file.suffix.lower()]
    datasets = _datasets(file)
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in _csv_header(file)}),
                  "keep_default_na": False, "na_filter": False}
    with tempfile.TemporaryDirectory(prefix="fedcybgd-datasets-") as cache:
        try:
            ds = datasets.load_dataset(builder, data_files=str(file.resolve()), split="train", cache_dir=cache,
                                       keep_in_memory=True, **kwargs)
        except Exception as exc:  # pyarrow's and pandas' own errors: the file, not a row, is unusable
            raise ValueError(f"{file}: cannot be read as {builder}: {type(exc).__name__}: {exc}") from None
    yield from _rows(ds, f"{file} row ")


def _csv_header(file: Path) -> list[str]:
    with file.open("r", encoding="utf-8-sig", newline="") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise ValueError(f"{file}: a CSV file needs a header row naming its columns")
    if len(set(header)) != len(header):
        raise ValueError(f"{file}: the CSV header names a column twice: {header}")
    return header


def saved_dataset_rows(directory: Path, split: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a ``save_to_disk`` directory: ``"dir row i"`` for a ``Dataset``,
    ``"dir[split] row i"`` for the chosen split of a ``DatasetDict`` (its only split, else ``split``, else
    ``train``)."""
    datasets = _datasets(directory)
    try:
        loaded = datasets.load_from_disk(str(directory))
    except Exception as exc:
        raise ValueError(f"{directory}: cannot be loaded as a saved dataset: {type(exc).__name__}: {exc}") from None
    if not isinstance(loaded, datasets.DatasetDict):
        yield from _rows(loaded, f"{directory} row ")
        return
    splits = list(loaded)
    chosen = splits[0] if len(splits) == 1 else split or ("train" if "train" in splits else "")
    if chosen not in splits:
        wanted = f"has no split {chosen!r}" if chosen else "has several splits and no 'train'"
        raise ValueError(f"{directory}: the saved DatasetDict {wanted}; choose one of {', '.join(splits)} "
                         "(the data's split option, --split)")
    yield from _rows(loaded[chosen], f"{directory}[{chosen}] row ")


def _rows(ds: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    i = 0
    for batch in ds.iter(batch_size=_BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield f"{where}{i}", {c: v for c, v in zip(columns, values, strict=True) if v is not None}
            i += 1


def decode_json_cell(value: Any, field: str) -> Any:
    """A CSV cell holding a JSON list (``messages``/``conversations`` cannot be a CSV column otherwise)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(f'"{field}" in a CSV cell must be a JSON list of messages') from None
