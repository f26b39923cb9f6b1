"""Codec benchmark: compression ratio and single-core encode/decode throughput on the real
SmolLM2-135M weights (bf16 and fp32), side by side in one run: our byte-grouping codec, plain
zstd, and zipnn (PyPI) when installed.

    .venv/bin/python bench/codec.py [--model DIR] [--repeat 3] [--out results.json]

The model directory defaults to the demo's prepared SmolLM2 (run `make demo` or
`fedcybgd prepare-model smollm2 --out DIR` first). Throughput is the best of --repeat runs with
one thread, in MB/s of raw weight bytes; every codec's output is decoded and compared bit for
bit before its figures count.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import safetensors.torch
import torch
import zstandard

from fedcybgd.common import bytegroup

DEFAULT_MODEL = Path.home() / ".cache" / "fedcybgd" / "models" / "smollm2-135m-instruct-bfloat16"


def _best(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def codecs(word: int, dtype_name: str) -> dict:
    table = {
        "fedcybgd bytegroup": (lambda raw: bytegroup.encode(raw, word), lambda enc, n: bytegroup.decode(enc, n)),
        "zstd level 1": (lambda raw: zstandard.ZstdCompressor(level=1).compress(raw),
                         lambda enc, n: zstandard.ZstdDecompressor().decompress(enc, max_output_size=n)),
        "zstd level 3": (lambda raw: zstandard.ZstdCompressor(level=3).compress(raw),
                         lambda enc, n: zstandard.ZstdDecompressor().decompress(enc, max_output_size=n)),
    }
    try:
        from zipnn import ZipNN
    except ImportError:
        return table
    zpn = ZipNN(input_format="byte", bytearray_dtype=dtype_name, threads=1)
    # zipnn 0.5.4 reorders the bytes of its input in place: give it a private copy (the copy is
    # timed too, which costs it a few per cent of encode throughput).
    table["zipnn"] = (lambda raw: zpn.compress(bytes(bytearray(raw))), lambda enc, n: bytes(zpn.decompress(enc)))
    return table


def run(model_dir: Path, repeat: int) -> list[dict]:
    torch.set_num_threads(1)
    tensors = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    results = []
    for dtype, word, name in ((torch.bfloat16, 2, "bfloat16"), (torch.float32, 4, "float32")):
        raw = b"".join(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
        for codec, (encode, decode) in codecs(word, name).items():
            t_enc, encoded = _best(lambda: encode(raw), repeat)
            t_dec, decoded = _best(lambda: decode(encoded, len(raw)), repeat)
            assert bytes(decoded) == raw, f"{codec} is not lossless on {name}"
            results.append({"dtype": name, "codec": codec, "raw_bytes": len(raw), "encoded_bytes": len(encoded),
                            "ratio": len(raw) / len(encoded), "encode_MBps": len(raw) / t_enc / 1e6,
                            "decode_MBps": len(raw) / t_dec / 1e6})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = run(args.model, args.repeat)
    print(f"load average {os.getloadavg()[0]:.2f}; one thread")
    print(f"{'dtype':<9} {'codec':<20} {'ratio':>6} {'encode MB/s':>12} {'decode MB/s':>12}")
    for r in results:
        print(f"{r['dtype']:<9} {r['codec']:<20} {r['ratio']:>6.3f} {r['encode_MBps']:>12.0f} {r['decode_MBps']:>12.0f}")
    for dtype in ("bfloat16", "float32"):
        ours = next(r for r in results if r["dtype"] == dtype and r["codec"] == "fedcybgd bytegroup")
        for other in (r for r in results if r["dtype"] == dtype and r["codec"].startswith("zipnn")):
            print(f"{dtype}: bytegroup / zipnn: ratio x{ours['ratio'] / other['ratio']:.3f}, "
                  f"encode x{ours['encode_MBps'] / other['encode_MBps']:.2f}, decode x{ours['decode_MBps'] / other['decode_MBps']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
