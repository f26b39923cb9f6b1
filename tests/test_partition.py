"""`fedcybgd partition`: whole works per client, held-out works nobody trains on, editions of
one work (same title in metadata.txt) never split between train and eval."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedcybgd.cli.partition import find_works, partition_corpus


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    metadata = []
    for i in range(12):
        for edition in ("a", "b"):
            name = f"work{i:02d}_{edition}"
            (root / f"{name}.txt").write_text(
                f"Work {i} edition {edition}.\n\nSecond paragraph of work {i}{edition}.\n")
            metadata.append(f"[{name}]\ntitle = Work number {i}\n")
    (root / "metadata.txt").write_text("\n".join(metadata))
    return root


def _texts(directory):
    return {p.read_text() for p in directory.glob("*.txt")}


def test_editions_of_one_work_are_grouped(corpus):
    works = find_works(corpus)
    assert len(works) == 12
    assert all(len(w.files) == 2 for w in works)


def test_by_document_gives_whole_disjoint_works_and_holds_out_eval(corpus, tmp_path):
    out = tmp_path / "split"
    assignment = partition_corpus(corpus, out, clients=3, mode="by-document", eval_fraction=0.25, seed=1)
    assert len(assignment["eval"]) == 3
    seen = set(assignment["eval"])
    for c in range(3):
        mine = set(assignment[f"client-{c}"])
        assert mine and not mine & seen
        seen |= mine
    assert len(seen) == 12
    eval_texts = _texts(out / "eval")
    for c in range(3):
        assert not _texts(out / f"client-{c}") & eval_texts
    for title in assignment["eval"]:  # both editions held out together
        n = title.split()[-1]
        assert sum(f"Work {int(n)} edition" in t for t in eval_texts) == 2
    assert json.loads((out / "partition.json").read_text())["mode"] == "by-document"
    assert partition_corpus(corpus, tmp_path / "again", 3, "by-document", 0.25, 1) == assignment


def test_iid_shares_paragraphs_and_still_holds_out_whole_works(corpus, tmp_path):
    out = tmp_path / "iid"
    assignment = partition_corpus(corpus, out, clients=2, mode="iid", eval_fraction=0.25, seed=0)
    eval_text = "".join(_texts(out / "eval"))
    client_text = "".join(_texts(out / "client-0") | _texts(out / "client-1"))
    for title in assignment["eval"]:
        n = int(title.split()[-1])
        assert f"of work {n}a." not in client_text and f"of work {n}b." not in client_text
        assert f"Work {n} edition" in eval_text
    assert client_text.count("Second paragraph") == 2 * (12 - len(assignment["eval"]))


@pytest.mark.multiprocess
def test_bad_requests_are_refused(corpus, tmp_path):
    with pytest.raises(ValueError):
        partition_corpus(corpus, tmp_path / "x", clients=20, mode="by-document")
    with pytest.raises(ValueError):
        partition_corpus(corpus, tmp_path / "x", clients=2, mode="random")
    with pytest.raises(FileNotFoundError):
        partition_corpus(tmp_path / "does-not-exist", tmp_path / "x", clients=2)
    proc = subprocess.run([sys.executable, "-m", "fedcybgd.cli.main", "partition", str(corpus), "--clients", "0",
                           "--out", str(tmp_path / "y")], capture_output=True, text=True)
    assert proc.returncode != 0 and "clients" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("a, b, same", [
    ("Twelfe-Night", "Twelfth Night", True),
    ("The Tragedy of Titus Andronicus", "Titus Andronicus", True),
    ("All is well, that Ends well", "All's Well That Ends Well", True),
    ("Anthonie and Cleopatra", "Antony and Cleopatra", True),
    ("King Richard II", "Richard II", True),
    ("King Henry IV, Part 1", "Henry IV Part 2", False),
    ("Henry V", "Henry VI Part 1", False),
    ("Richard II", "Richard III", False),
    ("The Passionate Pilgrim", "The Phoenix and the Turtle", False),
    ("Hamlet", "Macbeth", False),
])
def test_titles_of_two_editions_are_recognised(a, b, same):
    from fedcybgd.cli.partition import same_work

    assert same_work(a, b) is same
