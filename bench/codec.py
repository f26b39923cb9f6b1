"""Codec benchmark: compression ratio, encode and decode throughput on the real SmolLM2-135M
weights (bf16 and fp32), side by side in one run: our byte-grouping codec, plain zstd, and zipnn
(PyPI, `pip install zipnn==0.5.4`) when installed; with one thread and, for zstd and zipnn, with
several.

    .venv/bin/python bench/codec.py [--model DIR] [--repeat 3] [--threads 2] [--out results.json]

The model directory defaults to the demo's prepared SmolLM2 (run `make demo` or
`fedcybgd prepare-model smollm2 --out DIR` first). Throughput is the best of --repeat runs, in
MB/s of raw weight bytes; every codec's output is decoded and compared bit for bit before its
figures count.

One thread: each codec's own call on the whole model at once (`bytegroup.encode` /
`bytegroup.decode_into`, zstd's one-shot calls, zipnn's compress/decompress), each decoding
into a new buffer. zipnn 0.5.4 reorders its input in place, so it is handed a private copy,
made before the clock starts. "chunks" rows are the wire path: `encode_chunks` (2 MiB chunks,
CRC-32, protobuf messages; ratio over the messages' size) and `BlobAssembler` (bounds, decode,
CRC-32) into a sink that drops the bytes; they run in the calling thread (the parallel codec
path, workers=N, was removed: it showed no gain). With --threads N (default 2) also zipnn with
threads=N and zstd level 1 with its own compression threads (zstd has none for decompression).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import zstandard

from fedcybgd.common import bytegroup
from fedcybgd.common.codec import BlobAssembler, encode_chunks
from fedcybgd.v1 import coordinator_pb2 as pb

DEFAULT_MODEL = Path.home() / ".cache" / "fedcybgd" / "models" / "smollm2-135m-instruct-bfloat16"
#: The chunks' blob name (a SHA-256 hex digest in real use; the same length here).
BLOB_NAME = "0" * 64


def _best(fn, repeat: int, prepare=lambda: None) -> tuple[float, float, float, object]:
    """The shortest wall time, the least CPU time (all the process's threads) and the least CPU
    time of the calling thread of `repeat` runs of fn(prepare()), prepare() not timed; and the
    output."""
    wall = cpu = caller = float("inf")
    out = None
    for _ in range(repeat):
        out = None  # the previous output is freed before the next run, not during it
        arg = prepare()
        start, start_cpu, start_caller = time.perf_counter(), time.process_time(), time.thread_time()
        out = fn(arg)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
        caller = min(caller, time.thread_time() - start_caller)
    return wall, cpu, caller, out


class _Sink:
    def __init__(self, keep: bool) -> None:
        self.data = bytearray() if keep else None

    def write(self, data, /) -> int:
        if self.data is not None:
            self.data += data
        return len(data)


def _chunk_path(word: int):
    """encode_chunks / BlobAssembler; encoded = the list of chunks."""

    def encode(raw: bytes) -> list[pb.Chunk]:  # the blob's name is known to a sender: not timed
        return list(encode_chunks(BLOB_NAME, raw, codec=pb.CODEC_BYTEGROUP, word_size=word))

    def decode(chunks: list[pb.Chunk], n: int, keep: bool = False):
        sink = _Sink(keep)
        assembler = BlobAssembler(chunks[0].blob_sha256, n, sink)
        for chunk in chunks:
            assembler.add(chunk)
        assembler.verify()
        return sink.data

    return encode, decode


def codecs(word: int, dtype_name: str, threads: int) -> list[tuple[str, int, Callable[..., Any], Callable[..., Any]]]:
    """(name, threads, encode(raw) -> encoded, decode(encoded, n) -> bytes-like); an encode that
    needs a private copy of its input says so with a `copies_input` attribute."""
    table: list[tuple[str, int, Callable[..., Any], Callable[..., Any]]] = [
        ("fedcybgd bytegroup", 1, lambda raw: bytegroup.encode(raw, word),
         getattr(bytegroup, "decode_into", bytegroup.decode)),  # (decode: before decode_into existed)
        ("fedcybgd chunks", 1, *_chunk_path(word)),
        ("zstd level 1", 1, lambda raw: zstandard.ZstdCompressor(level=1).compress(raw),
         lambda enc, n: zstandard.ZstdDecompressor().decompress(enc, max_output_size=n)),
        ("zstd level 3", 1, lambda raw: zstandard.ZstdCompressor(level=3).compress(raw),
         lambda enc, n: zstandard.ZstdDecompressor().decompress(enc, max_output_size=n)),
    ]
    if threads > 1:
        table += [
            ("zstd level 1", threads, lambda raw: zstandard.ZstdCompressor(level=1, threads=threads).compress(raw),
             lambda enc, n: zstandard.ZstdDecompressor().decompress(enc, max_output_size=n)),
        ]
    try:
        from zipnn import ZipNN
    except ImportError:
        return table
    for count in sorted({1, threads}):
        zpn = ZipNN(input_format="byte", bytearray_dtype=dtype_name, threads=count)
        # zipnn 0.5.4 reorders the bytes of its input in place: it is given a private copy, made
        # before the clock starts. Its decompress returns a new bytearray, timed as it is.
        table.append(("zipnn", count, _CopyingEncode(zpn.compress), lambda enc, n, z=zpn: z.decompress(enc)))
    return table


class _CopyingEncode:
    """An encode that needs a private copy of its input (``copies_input``)."""

    copies_input = True

    def __init__(self, compress: Callable[[Any], Any]) -> None:
        self.compress = compress

    def __call__(self, raw):
        return self.compress(raw)


def _size(encoded) -> int:
    if isinstance(encoded, list):  # chunks: what the messages take on the wire
        return sum(chunk.ByteSize() for chunk in encoded)
    return len(encoded)


def run(model_dir: Path, repeat: int, threads: int) -> list[dict]:
    torch.set_num_threads(1)
    tensors = safetensors.torch.load_file(str(model_dir / "model.safetensors"))
    results = []
    for dtype, word, name in ((torch.bfloat16, 2, "bfloat16"), (torch.float32, 4, "float32")):
        raw = b"".join(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())
        size = len(raw)
        for codec, count, encode, decode in codecs(word, name, threads):
            copies = getattr(encode, "copies_input", False)
            prepare = (lambda raw=raw: bytearray(raw)) if copies else (lambda raw=raw: raw)
            t_enc, cpu_enc, caller_enc, encoded = _best(encode, repeat, prepare=prepare)
            check = decode(encoded, len(raw), keep=True) if codec == "fedcybgd chunks" else decode(encoded, len(raw))
            assert bytes(check) == raw, f"{codec} is not lossless on {name}"
            del check
            t_dec, cpu_dec, caller_dec, _ = _best(lambda _, d=decode, e=encoded, n=size: d(e, n), repeat)
            results.append({"dtype": name, "codec": codec, "threads": count, "raw_bytes": len(raw),
                            "encoded_bytes": _size(encoded), "ratio": len(raw) / _size(encoded),
                            "encode_MBps": len(raw) / t_enc / 1e6, "decode_MBps": len(raw) / t_dec / 1e6,
                            "encode_MB_per_cpu_s": len(raw) / cpu_enc / 1e6,
                            "decode_MB_per_cpu_s": len(raw) / cpu_dec / 1e6,
                            "encode_caller_share": caller_enc / cpu_enc, "decode_caller_share": caller_dec / cpu_dec})
            del encoded
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="zstd's and zipnn's threaded rows (1: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    results = run(args.model, args.repeat, args.threads)
    print(f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; {os.cpu_count()} CPUs")
    print("MB/s: of wall time (best run); MB/cpu-s: of the process's CPU time, all threads (least);"
          " caller: the calling thread's share of that CPU time")
    print(f"{'dtype':<9} {'codec':<20} {'threads':>7} {'ratio':>6} {'encode MB/s':>12} {'decode MB/s':>12} "
          f"{'enc MB/cpu-s':>13} {'dec MB/cpu-s':>13} {'enc caller':>10} {'dec caller':>10}")
    for r in results:
        print(f"{r['dtype']:<9} {r['codec']:<20} {r['threads']:>7} {r['ratio']:>6.3f} {r['encode_MBps']:>12.0f} "
              f"{r['decode_MBps']:>12.0f} {r['encode_MB_per_cpu_s']:>13.0f} {r['decode_MB_per_cpu_s']:>13.0f} "
              f"{r['encode_caller_share']:>10.0%} {r['decode_caller_share']:>10.0%}")
    for dtype in ("bfloat16", "float32"):
        rows = {(r["codec"], r["threads"]): r for r in results if r["dtype"] == dtype}
        pairs = {(("fedcybgd bytegroup", 1), ("zipnn", 1)), (("fedcybgd chunks", 1), ("zipnn", 1))}
        for ours, theirs in sorted(pairs, key=lambda pair: (pair[0][1], pair[0][0])):
            if ours in rows and theirs in rows:
                a, b = rows[ours], rows[theirs]
                print(f"{dtype}: {ours[0]} ({ours[1]} thread{'s' * (ours[1] > 1)}) / zipnn ({theirs[1]}): "
                      f"ratio x{a['ratio'] / b['ratio']:.3f}, encode x{a['encode_MBps'] / b['encode_MBps']:.2f}, "
                      f"decode x{a['decode_MBps'] / b['decode_MBps']:.2f}; per CPU second: encode "
                      f"x{a['encode_MB_per_cpu_s'] / b['encode_MB_per_cpu_s']:.2f}, "
                      f"decode x{a['decode_MB_per_cpu_s'] / b['decode_MB_per_cpu_s']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
