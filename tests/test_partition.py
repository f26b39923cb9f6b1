"""`fedcybgd partition`: whole works per client, held-out works nobody trains on, editions of
one work (same title in metadata.txt) never split between train and eval."""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from fedcybgd.cli.main import main
from fedcybgd.cli.partition import find_works, partition_corpus
from fedcybgd.common.records import RecordOptions, load_documents


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


# ------------------------------------------------------------------------------------------- record data


def _records(n=40):
    shapes: list[Callable[[int], dict[str, Any]]] = [
        lambda i: {"text": f"text {i}"},
        lambda i: {"instruction": f"do {i}", "input": f"in {i}", "output": f"out {i}"},
        lambda i: {"conversations": [{"from": "human", "value": f"q {i}"}, {"from": "gpt", "value": f"a {i}"}]},
        lambda i: {"instruction": f"do {i}", "output": f"out {i}", "system": "sys"},
    ]
    return [{**shapes[i % 4](i), "category": f"cat{i % 8}", "id": i} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _split_documents(out):
    splits = sorted(p.name for p in out.iterdir() if p.is_dir())
    return {s: [(d.text, d.messages, d.instruction) for d in load_documents(out / s / "data.jsonl")] for s in splits}


def _all_documents(path):
    return sorted(((d.text, d.messages, d.instruction) for d in load_documents(path)), key=repr)


def test_records_iid_shuffles_records_over_clients(tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", _records())
    out = tmp_path / "iid"
    assignment = partition_corpus(data, out, clients=3, mode="iid", eval_fraction=0.25, seed=3)
    assert assignment == {"eval": ["iid share"], **{f"client-{c}": ["iid share"] for c in range(3)}}
    splits = _split_documents(out)
    assert [len(splits[s]) for s in ("eval", "client-0", "client-1", "client-2")] == [10, 10, 10, 10]
    everything = [d for docs in splits.values() for d in docs]
    assert sorted(everything, key=repr) == _all_documents(data)  # normalised records read back the same
    summary = json.loads((out / "partition.json").read_text())
    assert summary["mode"] == "iid" and summary["records"]["eval"] == 10
    partition_corpus(data, tmp_path / "again", clients=3, mode="iid", eval_fraction=0.25, seed=3)
    assert _split_documents(tmp_path / "again") == splits


def test_records_by_column_never_splits_a_group(tmp_path):
    data = _write_jsonl(tmp_path / "data.jsonl", _records())
    out = tmp_path / "by-cat"
    assignment = partition_corpus(data, out, clients=3, eval_fraction=0.25, seed=0, by_column="category")
    assert len(assignment["eval"]) == 2  # 8 categories: 2 held out, 6 over 3 clients
    owned = [set(v) for v in assignment.values()]
    assert all(owned) and sum(map(len, owned)) == 8 and set().union(*owned) == {f"cat{i}" for i in range(8)}
    by_id = {(d.text, d.messages): r["category"] for r, d in zip(_records(), load_documents(data), strict=True)}
    for split, docs in _split_documents(out).items():
        assert {by_id[(t, m)] for t, m, _ in docs} == set(assignment[split])  # whole groups, where assigned
        assert len(docs) == 5 * len(assignment[split])
    summary = json.loads((out / "partition.json").read_text())
    assert summary["mode"] == "by-column" and summary["by_column"] == "category"
    with pytest.raises(ValueError, match="cannot give 7 clients"):
        partition_corpus(data, tmp_path / "x", clients=7, eval_fraction=0.25, by_column="category")
    with pytest.raises(ValueError, match="iid"):
        partition_corpus(data, tmp_path / "x", clients=2, mode="iid", by_column="category")


def test_parquet_records_with_a_column_mapping_by_document(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()

    data = tmp_path / "data"
    data.mkdir()
    for f in range(5):
        rows = [{"question": f"q{f}.{i}", "answer": f"a{f}.{i}"} for i in range(3)]
        datasets.Dataset.from_list(rows).to_parquet(str(data / f"part-{f}.parquet"))
    options = RecordOptions(columns={"question": "instruction", "answer": "output"})
    out = tmp_path / "split"
    assignment = partition_corpus(data, out, clients=2, eval_fraction=0.2, seed=1, options=options)
    assert sorted(f for files in assignment.values() for f in files) == [f"part-{f}.parquet" for f in range(5)]
    assert len(assignment["eval"]) == 1 and all(assignment[f"client-{c}"] for c in range(2))
    splits = _split_documents(out)
    for split, files in assignment.items():  # each file's records together, in the split it was given to
        assert sorted({instruction[0].split(".")[0] for _, _, instruction in splits[split]}) == \
            sorted(f"q{f.split('-')[1].split('.')[0]}" for f in files)
    first = json.loads((out / "eval" / "data.jsonl").read_text().splitlines()[0])
    assert set(first) == {"instruction", "input", "output"}
    # by a column (its own name, not the field it maps to): one question per group
    assignment = partition_corpus(data, tmp_path / "z", clients=2, eval_fraction=0.2, options=options,
                                  by_column="question")
    assert len(assignment["eval"]) == 3 and sum(map(len, assignment.values())) == 15


def test_text_corpus_has_no_columns(corpus, tmp_path):
    with pytest.raises(ValueError, match="no columns"):
        partition_corpus(corpus, tmp_path / "x", clients=2, by_column="title")


def test_cli_partitions_record_data(tmp_path, capsys):
    rows = [{"q": f"q{i}", "a": f"a{i}", "topic": f"t{i % 4}"} for i in range(16)] + [{"q": "no answer", "topic": "t0"}]
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "out"
    argv = ["partition", str(data), "--out", str(out), "--clients", "3", "--by-column", "topic",
            "--columns", "q=instruction,a=output", "--eval-fraction", "0.25"]
    assert main(argv) != 0 and "qa.jsonl:17" in capsys.readouterr().err
    assert main([*argv, "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "eval: 4 records" in printed and "skipped 1 invalid record" in printed
    assert sorted(json.loads((out / "partition.json").read_text())["records"].values()) == [4, 4, 4, 4]
