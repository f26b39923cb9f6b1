"""`fedcybgd coordinator` and `fedcybgd client`: the two long-running services.

Both read a TOML configuration file (`--config`) and let a flag override any key of it, one by one:
each flag table below maps a flag to its dotted configuration key, so the help text, the parser and
the configuration loader agree on one list. Secrets (join and operator tokens) may come from the
environment instead, as a command line is visible in `ps`. The heavy imports (torch, the server,
the daemon) happen when a command runs, not when the command line is parsed.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

#: One flag: (flag, dotted config key, type, help). A `bool` flag takes no value (it sets True).
Flag = tuple[str, str, type, str]

# CLI flags override the config file, key by key.
COORDINATOR_FLAGS: list[Flag] = [
    ("--model", "model", str, "Hugging Face model directory (safetensors weights, config, tokenizer)"),
    ("--state-dir", "state_dir", str, "where blobs and the SQLite state live; restart with the same to resume"),
    ("--address", "address", str, "host:port to listen on (default 127.0.0.1:50051)"),
    ("--layers-per-block", "layers_per_block", int, "consecutive decoder layers per block (default 1)"),
    ("--block-layout", "block_layout", str,
     "strided (block k of B holds layers k, k+B, k+2B, ...; a new run's default) | contiguous (block k holds "
     "layers kL..kL+L-1, the paper's); a restarted run keeps its own"),
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
    ("--dp-records", "privacy.records", bool,
     "differential privacy: DP-SGD on every visit (per-sequence clipping, Gaussian noise, Poisson sampling)"),
    ("--dp-noise-multiplier", "privacy.noise_multiplier", float, "DP-SGD noise std / clip norm (default 1.0)"),
    ("--dp-clip-norm", "privacy.clip_norm", float, "DP-SGD per-sequence gradient clip norm (default 1.0)"),
    ("--dp-updates", "privacy.updates", bool,
     "differential privacy of each visit's update: clipped and noised before upload (against the coordinator)"),
    ("--dp-update-noise-multiplier", "privacy.update_noise_multiplier", float,
     "update noise std / update clip norm (default 1.0)"),
    ("--dp-update-clip-norm", "privacy.update_clip_norm", float, "update clip norm (default 1.0)"),
    ("--dp-target-epsilon", "privacy.target_epsilon", float,
     "each site declines a task that would take its epsilon past this (default 0: no limit, reported only)"),
    ("--dp-delta", "privacy.delta", float, "delta of the sites' (epsilon, delta) accounting (default 1e-5)"),
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

CLIENT_FLAGS: list[Flag] = [
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
    ("--max-epsilon", "max_epsilon", float,
     "this site's own differential-privacy limit, whatever the coordinator's target: tasks past it are declined, "
     "and a run that is not private is refused (default 0: the run's target only)"),
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

#: `fedcybgd client`'s exit status when the coordinator predicts that no block of the run fits its memory.
EXIT_NOT_ENOUGH_MEMORY = 3
#: the site's differential-privacy budget for the run is spent: it declined a task and takes no more
EXIT_PRIVACY_BUDGET_SPENT = 4

#: Secrets may come from the environment rather than the command line (visible in `ps`).
SECRET_ENV = {"join_token": "FEDCYBGD_JOIN_TOKEN", "operator_token": "FEDCYBGD_OPERATOR_TOKEN"}


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag]) -> None:
    """`--config` and one option per flag, each defaulting to None: unset flags leave the file's value."""
    parser.add_argument("--config", help="TOML configuration file; flags override it")
    for flag, key, type_, help_ in flags:
        if type_ is bool:
            parser.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=key, type=type_, default=None, help=help_)


def flag_overrides(args: argparse.Namespace, flags: list[Flag]) -> dict[str, Any]:
    """The dotted keys the command line sets (None: not given), secrets filled from the environment."""
    values = {key: getattr(args, key) for _, key, _, _ in flags}
    for key, env in SECRET_ENV.items():
        if key in values and values[key] is None and os.environ.get(env):
            values[key] = os.environ[env]
    return values


def coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, COORDINATOR_FLAGS)
    parser.add_argument("--exit-when-finished", action="store_true",
                        help="exit once every visit is merged and evaluated")


def cmd_coordinator(args: argparse.Namespace) -> int:
    from fedcybgd.common.config import load_config
    from fedcybgd.server.app import serve_forever
    from fedcybgd.server.config import CoordinatorConfig

    config = load_config(CoordinatorConfig, args.config, flag_overrides(args, COORDINATOR_FLAGS))
    serve_forever(config, exit_when_finished=args.exit_when_finished)
    return 0


def client_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, CLIENT_FLAGS)


def cmd_client(args: argparse.Namespace) -> int:
    from fedcybgd.client.config import ClientConfig
    from fedcybgd.client.daemon import ClientDaemon, NotEnoughMemory
    from fedcybgd.client.privacy import PrivacyBudgetSpent
    from fedcybgd.common.config import load_config

    try:
        ClientDaemon(load_config(ClientConfig, args.config, flag_overrides(args, CLIENT_FLAGS))).run()
    except NotEnoughMemory as exc:  # its own exit code: restarting as it is would fail the same way
        print(f"fedcybgd client: error: {exc}", file=sys.stderr)
        return EXIT_NOT_ENOUGH_MEMORY
    except PrivacyBudgetSpent as exc:  # restarting changes nothing: the budget is spent for this run
        print(f"fedcybgd client: error: {exc}", file=sys.stderr)
        return EXIT_PRIVACY_BUDGET_SPENT
    return 0
