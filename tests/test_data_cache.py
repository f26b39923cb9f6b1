"""The client's tokenised data cache: a second load of the same data is read from the cache; anything the sequences
depend on (a file's content, the files, the format, the tokenizer, the length, the record options) gives another."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from fedcybgd.client.data_cache import KEEP, DataKey, TokenisedData
from fedcybgd.common.prompts import ALPACA_TEMPLATE, PromptFormat
from fedcybgd.common.records import RecordOptions
from fedcybgd.common.tiny import make_byte_tokenizer

ALPACA = PromptFormat(ALPACA_TEMPLATE, "alpaca")


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(40)]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "b.txt").write_text("Plain text, trained on every token. " * 20)
    return root


@pytest.fixture
def tok():
    return make_byte_tokenizer(chat_template=False)


def _key(data, **changes) -> DataKey:
    values = dict(path=str(data), options=RecordOptions(columns={"question": "instruction", "answer": "output"}),
                  tokenizer_digest="t0", prompt=ALPACA, seq_len=32)
    values.update(changes)
    return DataKey(**values)  # type: ignore[arg-type]


def _from_cache(caplog) -> bool:
    return any("from the tokenised cache" in r.getMessage() for r in caplog.records)


def test_second_load_comes_from_the_cache_and_equals_the_first(tmp_path, data, tok, caplog):
    caplog.set_level(logging.INFO, "fedcybgd.client")
    cache = TokenisedData(tmp_path / "cache")
    first = cache.load(_key(data), tok)
    assert first.labels is not None and not _from_cache(caplog)
    caplog.clear()
    second = TokenisedData(tmp_path / "cache").load(_key(data), tok)  # a restarted client: a new object
    assert _from_cache(caplog)
    assert first.labels is not None and second.labels is not None
    assert torch.equal(first.ids, second.ids) and torch.equal(first.labels, second.labels)


@pytest.mark.parametrize("change", ["file", "new-file", "format", "tokenizer", "seq_len", "columns"])
def test_what_the_data_depends_on_invalidates_it(tmp_path, data, tok, caplog, change):
    caplog.set_level(logging.INFO, "fedcybgd.client")
    cache = TokenisedData(tmp_path / "cache")
    first = cache.load(_key(data), tok)
    key = _key(data)
    if change == "file":
        with (data / "a.jsonl").open("a") as f:
            f.write(json.dumps({"question": "And 100 + 100?", "answer": "200"}) + "\n")
    elif change == "new-file":
        (data / "c.txt").write_text("More text. " * 10)
    elif change == "format":
        key = _key(data, prompt=PromptFormat(ALPACA_TEMPLATE, "alpaca", "all"))
    elif change == "tokenizer":
        key = _key(data, tokenizer_digest="t1")
    elif change == "seq_len":
        key = _key(data, seq_len=16)
    else:
        (data / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
        key = _key(data, options=RecordOptions())
    caplog.clear()
    second = cache.load(key, tok)
    assert not _from_cache(caplog)
    fresh = TokenisedData(tmp_path / "fresh").load(key, tok)  # what the changed inputs give without a cache
    assert torch.equal(second.ids, fresh.ids)
    assert (second.labels is None) == (fresh.labels is None)
    assert second.labels is None or fresh.labels is None or torch.equal(second.labels, fresh.labels)
    if change in ("file", "new-file", "seq_len", "columns"):
        assert second.shape != first.shape or not torch.equal(second.ids, first.ids)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_a_torn_entry_is_tokenised_again(tmp_path, data, tok, caplog):
    cache = TokenisedData(tmp_path / "cache")
    first = cache.load(_key(data), tok)
    (entry,) = (tmp_path / "cache").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])
    caplog.set_level(logging.INFO, "fedcybgd.client")
    again = cache.load(_key(data), tok)
    assert not _from_cache(caplog) and torch.equal(again.ids, first.ids)


def test_old_entries_are_dropped(tmp_path, data, tok):
    cache = TokenisedData(tmp_path / "cache")
    for seq_len in range(8, 8 + KEEP + 2):
        cache.load(_key(data, seq_len=seq_len), tok)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == KEEP
