"""Local data: loading documents, tokenizing, packing and per-visit batch order."""

from __future__ import annotations

import json

import pytest
import torch

from fedcybgd.common.data import load_packed, pack_sequences, tokenize_documents, visit_batches
from fedcybgd.common.prompts import PromptFormat
from fedcybgd.common.records import Document, load_documents
from fedcybgd.common.tiny import EOS_TOKEN, make_byte_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- loading


def test_txt_file_is_one_document(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("line one\nline two\n", encoding="utf-8")
    docs = load_documents(f)
    assert docs == [Document(text="line one\nline two\n", source=str(f))]
    assert not docs[0].is_chat


def test_jsonl_all_three_shapes(tmp_path):
    f = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "plain"},
            {"instruction": "Add", "input": "1 2", "output": "3"},
            {"instruction": "Greet", "output": "hello"},
            {"instruction": "Greet", "input": "", "output": "hi"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]},
        ],
    )
    docs = load_documents(f)
    assert [d.is_chat for d in docs] == [False, True, True, True, True]
    assert docs[0].text == "plain"
    assert docs[1].messages == (("user", "Add\n\n1 2"), ("assistant", "3"))
    assert docs[2].messages == (("user", "Greet"), ("assistant", "hello"))
    assert docs[3].messages == (("user", "Greet"), ("assistant", "hi"))
    assert docs[4].chat() == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "a"}]
    assert docs[1].source == f"{f}:2"


def test_jsonl_blank_lines_skipped(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n', encoding="utf-8")
    docs = load_documents(f)
    assert [d.text for d in docs] == ["a", "b"]
    assert docs[1].source.endswith(":4")


def test_directory_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b.txt").write_text("B", encoding="utf-8")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_text("AZ", encoding="utf-8")
    _jsonl(tmp_path / "a" / "c.jsonl", [{"text": "AC1"}, {"text": "AC2"}])
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "x.txt").write_text("ADX", encoding="utf-8")
    (tmp_path / "README.md").write_text("not data", encoding="utf-8")
    docs = load_documents(tmp_path)
    assert [d.text for d in docs] == ["AC1", "AC2", "ADX", "AZ", "B"]
    assert load_documents(str(tmp_path)) == docs  # str paths too, same order


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"foo": 1}', '"text"'),
        ('{"text": 3}', '"text" must be a string'),
        ('{"instruction": "x"}', '"output"'),
        ('{"instruction": "x", "input": 5, "output": "y"}', '"input"'),
        ('{"messages": []}', "non-empty"),
        ('{"messages": [{"role": "user"}]}', '"messages"[0]'),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, bad, fragment):
    f = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, bad, {"text": "ok"}])
    with pytest.raises(ValueError) as err:
        load_documents(f)
    assert f"{f}:3" in str(err.value)
    assert fragment in str(err.value)


def test_bad_line_in_directory_names_file(tmp_path):
    _jsonl(tmp_path / "good.jsonl", [{"text": "ok"}])
    (tmp_path / "sub").mkdir()
    bad = _jsonl(tmp_path / "sub" / "bad.jsonl", ['{"text": "fine"}', "{oops"])
    with pytest.raises(ValueError) as err:
        load_documents(tmp_path)
    assert f"{bad}:2" in str(err.value)


def test_empty_or_unusable_inputs(tmp_path):
    with pytest.raises(ValueError, match="no .txt/.jsonl"):
        load_documents(tmp_path)  # empty directory
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError):
        load_documents(tmp_path)  # no supported files
    with pytest.raises(ValueError, match="unsupported"):
        load_documents(tmp_path / "notes.md")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "missing.txt")


def test_document_invariants():
    with pytest.raises(ValueError):
        Document()
    with pytest.raises(ValueError):
        Document(text="a", messages=(("user", "b"),))
    with pytest.raises(ValueError):
        Document(messages=())
    d = Document.from_messages([{"role": "user", "content": "x"}])
    assert d.messages == (("user", "x"),) and d.is_chat
    with pytest.raises(ValueError):
        Document(text="a").chat()


# ---------------------------------------------------------------------------------------------- tokenizing


def test_text_documents_get_one_eos_each(tok):
    stream = tokenize_documents([Document(text="ab"), Document(text="c")], tok)
    eos = tok.eos_token_id
    assert stream.ids == [ord("a"), ord("b"), eos, ord("c"), eos]
    assert all(isinstance(i, int) for i in stream.ids)
    assert stream.labels is None  # plain text: every token carries loss


def test_text_special_token_strings_and_no_bos(tok):
    # add_special_tokens=False: no BOS is prepended (the byte tokenizer's bos is eos).
    ids = tokenize_documents([Document(text="x")], tok).ids
    assert ids == [ord("x"), tok.eos_token_id]


def test_chat_documents_use_the_chat_template(tok):
    doc = Document(messages=(("user", "hi"), ("assistant", "yo")))
    ids = tokenize_documents([doc], tok).ids
    rendered = tok.apply_chat_template(doc.chat(), tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    expected = tok(rendered, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids == expected
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # template markers are single special tokens


def test_chat_template_ending_in_eos_gets_no_second_eos(tok):
    import copy

    t = copy.deepcopy(tok)
    t.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" + EOS_TOKEN
    everything = PromptFormat(t.chat_template, train_on="all")
    ids = tokenize_documents([Document(messages=(("user", "q"),))], t, everything).ids
    assert ids == t("user: q\n", add_special_tokens=False)["input_ids"] + [t.eos_token_id]


def test_instruction_record_through_template(tmp_path, tok):
    f = _jsonl(tmp_path / "i.jsonl", [{"instruction": "Say", "input": "x", "output": "y"}])
    ids = tokenize_documents(load_documents(f), tok).ids
    text = tok.decode(ids)
    assert text == "<|im_start|>user\nSay\n\nx<|im_end|>\n<|im_start|>assistant\ny<|im_end|>\n" + EOS_TOKEN


def test_missing_eos_is_an_error(tok):
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="eos"):
        tokenize_documents([Document(text="a")], NoEos())


# ----------------------------------------------------------------------------------------------- packing


def test_pack_shapes_and_remainder_dropped():
    out = pack_sequences(list(range(10)), 3)
    assert out.ids.dtype == torch.long and out.shape == (3, 3) and out.labels is None
    assert out.ids.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert pack_sequences(list(range(6)), 3).shape == (2, 3)
    assert pack_sequences(list(range(3)), 3).shape == (1, 3)


def test_pack_too_short_or_bad_len():
    with pytest.raises(ValueError, match="fewer"):
        pack_sequences([1, 2], 3)
    with pytest.raises(ValueError):
        pack_sequences([], 1)
    with pytest.raises(ValueError):
        pack_sequences([1, 2, 3], 0)


def test_load_packed_end_to_end(tmp_path, tok):
    (tmp_path / "a.txt").write_text("hello world", encoding="utf-8")
    _jsonl(tmp_path / "b.jsonl", [{"text": "more"}, {"messages": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}]}])
    packed = load_packed(tmp_path, tok, 8)
    flat = tokenize_documents(load_documents(tmp_path), tok)
    assert packed.shape == (len(flat) // 8, 8)
    assert flat.labels is not None and packed.labels is not None
    assert packed.ids.flatten().tolist() == flat.ids[: packed.ids.numel()]
    assert packed.labels.flatten().tolist() == flat.labels[: packed.ids.numel()]
    with pytest.raises(ValueError):
        load_packed(tmp_path, tok, 10_000)


# ---------------------------------------------------------------------------------------------- batching


def test_visit_batches_deterministic_and_seeded():
    a = visit_batches(10, 3, 8, seed=7)
    b = visit_batches(10, 3, 8, seed=7)
    c = visit_batches(10, 3, 8, seed=8)
    assert len(a) == 8 and all(x.shape == (3,) and x.dtype == torch.long for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_visit_batches_independent_of_global_rng():
    torch.manual_seed(0)
    a = visit_batches(10, 3, 4, seed=1)
    torch.manual_seed(123)
    torch.rand(5)
    b = visit_batches(10, 3, 4, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_visit_batches_cover_every_sequence_per_epoch():
    n, bs, steps = 10, 3, 10  # 30 draws = 3 full passes, batches straddle pass boundaries
    flat = torch.cat(visit_batches(n, bs, steps, seed=0)).tolist()
    for epoch in range(3):
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    # reshuffled between passes (not the same order three times)
    assert flat[:n] != flat[n : 2 * n] or flat[n : 2 * n] != flat[2 * n :]


def test_visit_batches_prefix_stable():
    long = visit_batches(7, 2, 9, seed=3)
    short = visit_batches(7, 2, 4, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(short, long[:4], strict=True))


def test_visit_batches_batch_larger_than_data():
    batches = visit_batches(3, 5, 3, seed=0)
    assert all(b.shape == (5,) for b in batches)
    flat = torch.cat(batches).tolist()
    for k in range(5):  # 15 draws = 5 passes over 3 sequences
        assert sorted(flat[3 * k : 3 * k + 3]) == [0, 1, 2]
    again = visit_batches(3, 5, 3, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))


def test_visit_batches_edge_cases():
    assert visit_batches(4, 2, 0, seed=0) == []
    assert [b.tolist() for b in visit_batches(1, 2, 2, seed=0)] == [[0, 0], [0, 0]]
    for args in ((0, 1, 1), (1, 0, 1), (1, 1, -1)):
        with pytest.raises(ValueError):
            visit_batches(*args, seed=0)
