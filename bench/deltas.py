"""Version deltas: bytes per cycle with the arithmetic delta against the XOR delta, same run otherwise.

    .venv/bin/python bench/deltas.py --out bench-out/deltas --model smollm2 --clients 2 --cycles 1
    .venv/bin/python bench/deltas.py --out bench-out/deltas-tiny --model tiny --clients 2 --cycles 2
    .venv/bin/python bench/deltas.py --out bench-out/deltas-pair --pair BASE_DIR TRAINED_DIR [--layers-per-block 6]

Two measurements:

* **The demo's run, twice** (unless --pair): `fedcybgd demo` with `--deltas xor`, then with
  `--deltas arith` (coordinator and clients), every other option the same (`--demo-arg` passes
  more). Bytes on the wire per cycle, down and up, from each run's summary.json. The clients race
  for visits, so which client makes which visit, and with it the trained model, may differ between
  the runs; the report says whether the assignment and the exported models matched.
* **The codec on real trained-block pairs**: each block of a base model and of a trained one (by
  default the base model and the arithmetic run's export; `--pair` names two model directories),
  cut into blocks as the run does, encoded as version deltas with each delta encoding (byte
  grouping, 2 MiB chunks, as on the wire) and decoded back bit for bit; bytes and encode/decode
  time per block. This isolates the encoding from the run's other bytes (manifests, headers,
  blocks downloaded whole).

Results go to OUT/results.json and are printed as tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from fedcybgd.common.blocks import block_tensors
from fedcybgd.common.codec import BlobAssembler, encode_chunks, serialize_block, sha256_hex
from fedcybgd.common.modeling import word_size
from fedcybgd.common.partition import partition_model
from fedcybgd.v1 import coordinator_pb2 as pb

SETTINGS = ("xor", "arith")
DELTAS = {"xor": pb.DELTA_XOR, "arith": pb.DELTA_ARITH}


@dataclass(frozen=True)
class RunFigures:
    """One demo run's bytes on the wire."""

    deltas: str
    cycles: int
    visits: int
    bytes_down: int
    bytes_up: int
    wall_seconds: float
    assignment: tuple[str, ...]  # the client of each visit, in round order

    @property
    def bytes_per_cycle(self) -> float:
        return (self.bytes_down + self.bytes_up) / self.cycles


@dataclass(frozen=True)
class BlockFigures:
    """One block's version delta, encoded with one delta encoding."""

    block: str
    deltas: str
    raw_bytes: int
    wire_bytes: int  # chunk payloads
    encode_seconds: float
    decode_seconds: float


class _Sink:
    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.at = 0

    def write(self, data: bytes | memoryview, /) -> int:
        self.data[self.at : self.at + len(data)] = data
        self.at += len(data)
        return len(data)


def run_demo(setting: str, args: argparse.Namespace) -> tuple[RunFigures, Path]:
    """`fedcybgd demo --deltas <setting>` into OUT/<setting>; its figures and export directory."""
    out = args.out / setting
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "fedcybgd.cli.main", "demo", "--out", str(out), "--model", args.model,
               "--clients", str(args.clients), "--cycles", str(args.cycles), "--seed", str(args.seed),
               "--deltas", setting, *(["--layers-per-block", str(args.layers_per_block)] if args.layers_per_block
                                      else []), *args.demo_arg]
    print("$ " + " ".join(command), flush=True)
    with open(args.out / f"demo-{setting}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    summary = json.loads((out / "summary.json").read_text())
    visits = sorted(summary["visits"], key=lambda v: v["round"])
    figures = RunFigures(deltas=setting, cycles=args.cycles, visits=len(visits), bytes_down=summary["total_bytes_down"],
                         bytes_up=summary["total_bytes_up"], wall_seconds=summary["wall_seconds"],
                         assignment=tuple(v["client"] for v in visits))
    return figures, Path(summary["export_dir"])


def same_weights(a: Path, b: Path) -> bool:
    """Whether two exported models hold bit-identical tensors (NaN included: bytes are compared)."""
    ta, tb = (safetensors.torch.load_file(str(d / "model.safetensors")) for d in (a, b))
    def raw(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and torch.equal(raw(ta[k]), raw(tb[k]))
                                          for k in ta)


def block_pairs(base_dir: Path, trained_dir: Path, layers_per_block: int) -> list[tuple[str, int, bytes, bytes]]:
    """(block name, word size, base blob, trained blob) of every block that training changed."""
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    trained = AutoModelForCausalLM.from_pretrained(str(trained_dir), dtype=next(base.parameters()).dtype)
    pairs = []
    for spec in partition_model(base, layers_per_block):
        old, new = serialize_block(block_tensors(base, spec)), serialize_block(block_tensors(trained, spec))
        if old != new and len(old) == len(new):
            pairs.append((spec.name, word_size(spec), old, new))
    return pairs


def codec_comparison(pairs: list[tuple[str, int, bytes, bytes]]) -> list[BlockFigures]:
    """Each pair encoded as a version delta with each encoding, decoded back and checked."""
    rows = []
    for name, words, old, new in pairs:
        sha_old, sha_new = sha256_hex(old), sha256_hex(new)
        for setting, delta in DELTAS.items():
            start = time.perf_counter()
            chunks = list(encode_chunks(sha_new, new, codec=pb.CODEC_BYTEGROUP, word_size=words, delta=(sha_old, old),
                                        delta_codec=delta))
            encoded = time.perf_counter() - start
            sink = _Sink(len(new))
            assembler = BlobAssembler(sha_new, len(new), sink, delta_source={sha_old: old}.__getitem__)
            start = time.perf_counter()
            for chunk in chunks:
                assembler.add(chunk)
            decoded = time.perf_counter() - start
            if bytes(sink.data) != new:
                raise AssertionError(f"{name}: the {setting} delta did not decode to the trained block")
            rows.append(BlockFigures(block=name, deltas=setting, raw_bytes=len(new),
                                     wire_bytes=sum(len(c.data) for c in chunks), encode_seconds=encoded,
                                     decode_seconds=decoded))
    return rows


def demo_model_dir(args: argparse.Namespace) -> Path:
    """Where the demo took its base model from."""
    if args.model == "tiny":
        return args.out / "arith" / "model"
    if args.model == "smollm2":
        cache = Path(os.environ.get("FEDCYBGD_CACHE", str(Path.home() / ".cache" / "fedcybgd")))
        return cache / "models" / "smollm2-135m-instruct-bfloat16"
    return Path(args.model)


def print_runs(runs: list[RunFigures]) -> None:
    print(f"\n{'deltas':<7} {'visits':>6} {'down MB':>9} {'up MB':>8} {'MB/cycle':>9} {'wall s':>7}")
    for r in runs:
        print(f"{r.deltas:<7} {r.visits:>6} {r.bytes_down / 1e6:>9.3f} {r.bytes_up / 1e6:>8.3f} "
              f"{r.bytes_per_cycle / 1e6:>9.3f} {r.wall_seconds:>7.0f}")
    xor, arith = runs
    print(f"arith / xor bytes per cycle: {arith.bytes_per_cycle / xor.bytes_per_cycle:.3f} "
          f"(down {arith.bytes_down / xor.bytes_down:.3f}, up {arith.bytes_up / xor.bytes_up:.3f})")


def print_blocks(rows: list[BlockFigures]) -> None:
    width = max([len("block"), *(len(r.block) for r in rows)])
    print(f"\n{'block':<{width}} {'raw MB':>8} {'xor x':>7} {'arith x':>8} {'saved':>6} {'enc ms x/a':>12} "
          f"{'dec ms x/a':>12}")
    by_block: dict[str, dict[str, BlockFigures]] = {}
    for r in rows:
        by_block.setdefault(r.block, {})[r.deltas] = r
    for name, pair in by_block.items():
        x, a = pair["xor"], pair["arith"]
        print(f"{name:<{width}} {x.raw_bytes / 1e6:>8.2f} {x.raw_bytes / x.wire_bytes:>7.3f} "
              f"{a.raw_bytes / a.wire_bytes:>8.3f} "
              f"{1 - a.wire_bytes / x.wire_bytes:>6.1%} {x.encode_seconds * 1e3:>5.0f}/{a.encode_seconds * 1e3:<6.0f}"
              f"{x.decode_seconds * 1e3:>5.0f}/{a.decode_seconds * 1e3:<6.0f}")
    total = {s: sum(r.wire_bytes for r in rows if r.deltas == s) for s in SETTINGS}
    raw = sum(r.raw_bytes for r in rows if r.deltas == "xor")
    print(f"{'all':<{width}} {raw / 1e6:>8.2f} {raw / total['xor']:>7.3f} {raw / total['arith']:>8.3f} "
          f"{1 - total['arith'] / total['xor']:>6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2", help="the demo's --model (tiny, smollm2, a directory)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--cycles", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers-per-block", type=int, default=None,
                        help="as the demo's (default: 1 for tiny, 6 for a real model)")
    parser.add_argument("--demo-arg", action="append", default=[], help="one more demo argument (repeatable)")
    parser.add_argument("--pair", nargs=2, type=Path, metavar=("BASE_DIR", "TRAINED_DIR"),
                        help="only the codec comparison, on these two model directories")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    layers = args.layers_per_block or (1 if args.model == "tiny" and not args.pair else 6)
    results: dict = {"command": sys.argv}
    if args.pair:
        base_dir, trained_dir = args.pair
    else:
        runs, exports = zip(*(run_demo(setting, args) for setting in SETTINGS), strict=True)
        print_runs(list(runs))
        same_assignment = runs[0].assignment == runs[1].assignment
        same_model = same_weights(*exports)
        print(f"same client per visit: {same_assignment}; bit-identical exported models: {same_model}")
        results.update(runs=[{**asdict(r), "bytes_per_cycle": r.bytes_per_cycle} for r in runs],
                       same_assignment=same_assignment, same_model=same_model)
        base_dir, trained_dir = demo_model_dir(args), exports[1]
    blocks = codec_comparison(block_pairs(base_dir, trained_dir, layers))
    print_blocks(blocks)
    results.update(pair=[str(base_dir), str(trained_dir)], layers_per_block=layers,
                   blocks=[asdict(b) for b in blocks])
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nresults in {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
