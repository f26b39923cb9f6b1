"""Users' data formats: every supported format reads the same records into the same documents; ShareGPT,
column mapping, errors naming file and row, skipping invalid records, and the files a load reads."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import shutil

import pytest

from fedcybgd.common.records import (
    Document,
    RecordOptions,
    data_files,
    load_documents,
    load_groups,
    load_records,
    parse_columns,
)

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

# The same instruction records in every format (CSV has no None: its empty input is "", which reads the same).
ROWS: list[dict[str, str | None]] = [
    {"instruction": "Add", "input": "1 2", "output": "3", "category": "math"},
    {"instruction": "Greet", "input": None, "output": "hello", "category": "chat"},
    {"instruction": "Shout", "input": "", "output": "HEY", "category": "chat"},
]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")


def _csv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)


def _arrow_stream(path, rows):  # the data file save_to_disk writes: Arrow IPC stream format
    saved = path.parent / (path.name + ".saved")
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    shutil.move(str(next(saved.glob("*.arrow"))), path)
    shutil.rmtree(saved)


def _arrow_file(path, rows):  # Arrow IPC file format (Feather v2)
    import pyarrow.feather

    pyarrow.feather.write_feather(datasets.Dataset.from_list(rows).data.table, str(path))


WRITERS = {
    "jsonl": ("d.jsonl", _jsonl, "{f}:2"),
    "json": ("d.json", lambda p, rows: p.write_text(json.dumps(rows, indent=1), encoding="utf-8"), "{f} row 1"),
    "json-lines": ("d.json", _jsonl, "{f}:2"),
    "parquet": ("d.parquet", lambda p, rows: datasets.Dataset.from_list(rows).to_parquet(str(p)), "{f} row 1"),
    "csv": ("d.csv", _csv, "{f} row 1"),
    "arrow-stream": ("d.arrow", _arrow_stream, "{f} row 1"),
    "arrow-file": ("d.arrow", _arrow_file, "{f} row 1"),
    "save_to_disk": ("saved", lambda p, rows: datasets.Dataset.from_list(rows).save_to_disk(str(p)), "{f} row 1"),
    "save_to_disk-dict": ("saved", lambda p, rows: datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(p)), "{f}[train] row 1"),
}


def _write(tmp_path, fmt, rows):
    name, writer, where = WRITERS[fmt]
    path = tmp_path / name
    writer(path, rows)
    return path, where.format(f=path)


def _table(rows):  # from_list takes the first row's keys only: build every column
    return datasets.Dataset.from_dict({k: [r.get(k) for r in rows] for k in dict.fromkeys(k for r in rows for k in r)})


def _plain(docs):
    return [dataclasses.replace(d, source="") for d in docs]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_reads_the_same_documents(tmp_path, fmt):
    path, second = _write(tmp_path, fmt, ROWS)
    records = load_records(path)
    assert _plain(records.documents) == [
        Document(messages=(("user", "Add\n\n1 2"), ("assistant", "3")), instruction=("Add", "1 2")),
        Document(messages=(("user", "Greet"), ("assistant", "hello")), instruction=("Greet", "")),
        Document(messages=(("user", "Shout"), ("assistant", "HEY")), instruction=("Shout", "")),
    ]
    assert records.documents[1].source == second
    assert records.skipped == 0 and records.files == data_files(path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    load_records(path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing cached by the data


def test_all_shapes_and_sharegpt_in_json_lines_and_parquet(tmp_path):
    rows = [
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                           {"from": "gpt", "value": "r"}]},
        {"messages": [{"from": "human", "value": "q2"}, {"from": "tool", "value": "t"}]},
        {"conversations": [{"from": "human", "value": "q3"}], "system": "be brief"},
        {"prompt": "p", "completion": "c"},
        {"instruction": "i", "output": "o", "system": "sys"},
    ]
    expected = [
        Document(text="plain"),
        Document(messages=(("user", "u"), ("assistant", "a"))),
        Document(messages=(("system", "s"), ("user", "q"), ("assistant", "r"))),
        Document(messages=(("user", "q2"), ("tool", "t"))),
        Document(messages=(("system", "be brief"), ("user", "q3"))),
        Document(messages=(("user", "p"), ("assistant", "c"))),
        Document(messages=(("system", "sys"), ("user", "i"), ("assistant", "o")), instruction=("i", "")),
    ]
    _jsonl(tmp_path / "a.jsonl", rows)
    _table(rows).to_parquet(str(tmp_path / "b.parquet"))  # missing fields: None cells
    assert _plain(load_documents(tmp_path / "a.jsonl")) == expected
    assert _plain(load_documents(tmp_path / "b.parquet")) == expected
    for doc in expected:  # the normalised record partition writes reads back the same
        _jsonl(tmp_path / "back.jsonl", [doc.to_record()])
        assert _plain(load_documents(tmp_path / "back.jsonl")) == [doc]


def test_csv_cells_stay_strings_and_messages_cells_are_json(tmp_path):
    f = tmp_path / "d.csv"
    with f.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["instruction", "input", "output"])
        w.writerows([["NA", "", "007"], ["null", "NaN", "1.50"]])
    assert [d.instruction for d in load_documents(f)] == [("NA", ""), ("null", "NaN")]
    assert [d.messages[-1][1] for d in load_documents(f) if d.messages] == ["007", "1.50"]
    chat = tmp_path / "chat.csv"
    with chat.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "dialog"])
        w.writerow(["1", json.dumps([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}])])
        w.writerow(["2", "not json"])
    options = RecordOptions(columns={"dialog": "conversations"})
    with pytest.raises(ValueError, match=f"{chat} row 1: \"conversations\" in a CSV cell must be a JSON list"):
        load_records(chat, options)
    records = load_records(chat, dataclasses.replace(options, skip_invalid=True))
    assert _plain(records.documents) == [Document(messages=(("user", "hi"), ("assistant", "yo")))]
    assert records.skipped == 1 and f"{chat} row 1" in records.skip_examples[0]


def test_column_mapping(tmp_path):
    rows = [{"question": "Q1", "context": "C1", "answer": "A1", "output": "ignored: mapped over"},
            {"question": "Q2", "answer": "A2"}]
    _jsonl(tmp_path / "a.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    expected = [Document(messages=(("user", "Q1\n\nC1"), ("assistant", "A1")), instruction=("Q1", "C1")),
                Document(messages=(("user", "Q2"), ("assistant", "A2")), instruction=("Q2", ""))]
    for options in (RecordOptions(columns={"question": "instruction", "context": "input", "answer": "output"}),
                    RecordOptions(columns="question=instruction, context=input,answer=output"),  # type: ignore[arg-type]
                    RecordOptions(columns=parse_columns(" question = instruction,context=input,answer=output,"))):
        assert options.columns == {"question": "instruction", "context": "input", "answer": "output"}
        assert _plain(load_documents(tmp_path / "a.jsonl", options)) == expected
        assert _plain(load_documents(tmp_path / "b.parquet", options)) == expected
    _jsonl(tmp_path / "a.jsonl", [{"question": "Q", "reply": "A"}])
    with pytest.raises(ValueError) as err:
        load_documents(tmp_path / "a.jsonl", RecordOptions(columns={"question": "instruction", "answer": "output"}))
    assert f"{tmp_path / 'a.jsonl'}:1" in str(err.value)
    assert '"output"' in str(err.value) and "'answer' (-> 'output')" in str(err.value)


@pytest.mark.parametrize("value, fragment", [
    ("question", "expected column=field"),
    ("question=", "expected column=field"),
    ("=output", "expected column=field"),
    ("a=b=c", "expected column=field"),
    ("question=prompt_text", "not a record field"),
    ("question=instruction,answer=instruction", "both map to 'instruction'"),
    ("question=instruction,question=output", "mapped twice"),
    ({"question": 3}, "non-empty strings"),
    ({"q": "Instruction"}, "not a record field"),
])
def test_bad_column_mappings_are_refused(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_columns(value)
    with pytest.raises(ValueError, match=fragment):
        RecordOptions(columns=value)
    assert parse_columns(None) is None and parse_columns("") is None and parse_columns({}) is None


@pytest.mark.parametrize("fmt", [fmt for fmt in WRITERS if fmt != "csv"])  # CSV: every cell is a string, see above
def test_bad_row_names_file_and_row(tmp_path, fmt):
    path, second = _write(tmp_path, fmt, [ROWS[0], {**ROWS[0], "output": None}, ROWS[2]])
    with pytest.raises(ValueError) as err:
        load_records(path)
    assert str(err.value) == f'{second}: an instruction record needs string "instruction" and "output"'
    records = load_records(path, RecordOptions(skip_invalid=True))
    assert (len(records.documents), records.skipped, records.skip_examples) == (2, 1, (str(err.value),))


def test_skip_invalid_counts_and_keeps_the_first_messages(tmp_path, caplog):
    _jsonl(tmp_path / "a.jsonl", ['{"text": "ok"}', "{broken", '{"text": 1}'] + ['{"nothing": 0}'] * 5)
    datasets.Dataset.from_list([{"text": "fine"}, {"text": None}]).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match=rf"{tmp_path / 'a.jsonl'}:2: invalid JSON"):
        load_records(tmp_path)
    records = load_records(tmp_path, RecordOptions(skip_invalid=True))
    assert [d.text for d in records.documents] == ["ok", "fine"]
    assert records.skipped == 8
    assert len(records.skip_examples) == 5
    assert records.skip_examples[0].startswith(f"{tmp_path / 'a.jsonl'}:2: invalid JSON")
    assert records.skip_examples[1].startswith(f"{tmp_path / 'a.jsonl'}:3: \"text\" must be a string")
    with caplog.at_level(logging.WARNING):
        assert len(load_documents(tmp_path, RecordOptions(skip_invalid=True))) == 2
    assert "skipped 8 invalid record(s)" in caplog.text
    _jsonl(tmp_path / "a.jsonl", ["{broken"])
    (tmp_path / "b.parquet").unlink()
    with pytest.raises(ValueError, match="no documents found .1 invalid record.s. skipped"):
        load_records(tmp_path, RecordOptions(skip_invalid=True))


def test_saved_dataset_dict_split(tmp_path):
    one, two = datasets.Dataset.from_list([{"text": "a"}]), datasets.Dataset.from_list([{"text": "b"}])
    datasets.DatasetDict({"train": one, "test": two}).save_to_disk(str(tmp_path / "d"))
    assert [d.text for d in load_documents(tmp_path / "d")] == ["a"]  # train by default
    assert [d.text for d in load_documents(tmp_path / "d", RecordOptions(split="test"))] == ["b"]
    assert load_documents(tmp_path / "d", RecordOptions(split="test"))[0].source == f"{tmp_path / 'd'}[test] row 0"
    with pytest.raises(ValueError, match="no split 'dev'; choose one of train, test"):
        load_documents(tmp_path / "d", RecordOptions(split="dev"))
    datasets.DatasetDict({"a": one, "b": two}).save_to_disk(str(tmp_path / "e"))
    with pytest.raises(ValueError, match="several splits and no 'train'; choose one of a, b"):
        load_documents(tmp_path / "e")


def test_directory_mixes_formats_and_saved_datasets(tmp_path):
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "a").mkdir()
    _jsonl(tmp_path / "a" / "c.jsonl", [{"text": "AC"}])
    datasets.Dataset.from_list([{"text": "AS1"}, {"text": "AS2"}]).save_to_disk(str(tmp_path / "a" / "saved"))
    datasets.Dataset.from_list([{"text": "AP"}]).to_parquet(str(tmp_path / "a" / "p.parquet"))
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    records = load_records(tmp_path)
    assert [d.text for d in records.documents] == ["AC", "AP", "AS1", "AS2", "B"]
    saved = tmp_path / "a" / "saved"
    assert records.files == data_files(tmp_path) == (
        tmp_path / "a" / "c.jsonl", tmp_path / "a" / "p.parquet", *sorted(saved.iterdir()), tmp_path / "b.txt")
    assert {p.suffix for p in sorted(saved.iterdir())} == {".arrow", ".json"}
    assert data_files(saved) == tuple(sorted(saved.iterdir()))
    _, groups = load_groups(tmp_path)
    assert groups == [str(tmp_path / "a" / "c.jsonl"), str(tmp_path / "a" / "p.parquet"), str(saved), str(saved),
                      str(tmp_path / "b.txt")]


def test_group_by_column(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "x", "cat": "k"}, {"text": "y", "cat": 2}, {"text": "z"}])
    with pytest.raises(ValueError, match=":3: no 'cat' value to group by"):
        load_groups(tmp_path / "a.jsonl", column="cat")
    records, groups = load_groups(tmp_path / "a.jsonl", RecordOptions(skip_invalid=True), column="cat")
    assert groups == ["k", "2"] and records.skipped == 1


def test_json_files(tmp_path):
    f = tmp_path / "one.json"
    f.write_text(json.dumps({"text": "single"}, indent=2), encoding="utf-8")
    assert [d.text for d in load_documents(f)] == ["single"]
    f.write_text('[{"text": "a"},\n {"text": ]', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{f}:2: invalid JSON"):
        load_documents(f)
    f.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON array of records"):
        load_documents(f)


def test_unreadable_files_fail_even_when_skipping(tmp_path):
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=f"{f}: cannot be read as parquet"):
        load_records(f, RecordOptions(skip_invalid=True))
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported file type"):
        data_files(tmp_path / "x.xlsx")
    with pytest.raises(FileNotFoundError):
        data_files(tmp_path / "missing")
