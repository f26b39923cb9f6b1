"""`fedcybgd` — one console script, one subcommand per program.

  fedcybgd coordinator   run the coordinator (gRPC service, scheduler, model store)
  fedcybgd client        run a client daemon on a partner site
  fedcybgd status        ask a coordinator where its run stands
  fedcybgd export        write a model version as a Hugging Face directory
  fedcybgd demo          a coordinator and N clients on loopback, end to end
  fedcybgd prepare-model GGUF or Hugging Face model -> cached safetensors directory
  fedcybgd partition     split a corpus into per-client data and a held-out split
  fedcybgd plan          predict each block visit's peak memory: does every visit fit a client?
  fedcybgd certs         a CA, a server certificate and client certificates; revoke a site
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fedcybgd.cli import services, status, tools

# Re-exported: the flag tables, and the overrides they make, are what the tests and the deployment
# checks load configurations through; the demo's defaults are the benchmarks'.
from fedcybgd.cli.services import (  # noqa: F401
    CLIENT_FLAGS,
    COORDINATOR_FLAGS,
    EXIT_NOT_ENOUGH_MEMORY,
    SECRET_ENV,
)
from fedcybgd.cli.services import flag_overrides as _overrides  # noqa: F401
from fedcybgd.cli.tools import DEMO_DEFAULTS  # noqa: F401


@dataclass(frozen=True)
class Subcommand:
    """One program of the console script: its name and one-line help, what it adds to its subparser,
    and the handler that runs it (returning the exit status)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def cmd_status(args: argparse.Namespace) -> int:
    return status.run_status(args, SECRET_ENV["operator_token"], sys.stdout)


#: Every subcommand, in the order `fedcybgd --help` lists them.
SUBCOMMANDS = (
    Subcommand("coordinator", "run the coordinator",
               services.coordinator_arguments, services.cmd_coordinator),
    Subcommand("client", "run a client daemon",
               services.client_arguments, services.cmd_client),
    Subcommand("status", "where the run stands (a summary; page the visit history with --visits, --before, --all)",
               status.add_arguments, cmd_status),
    Subcommand("certs", "create a CA, a server certificate and client certificates (mutual TLS)",
               tools.certs_arguments, tools.cmd_certs),
    Subcommand("export", "write a model version as a Hugging Face directory",
               tools.export_arguments, tools.cmd_export),
    Subcommand("demo", "coordinator and N clients on loopback, end to end",
               tools.demo_arguments, tools.cmd_demo),
    Subcommand("prepare-model", "GGUF file or HF directory -> cached safetensors model directory",
               tools.prepare_model_arguments, tools.cmd_prepare_model),
    Subcommand("partition", "split a corpus into per-client data directories and a held-out split",
               tools.partition_arguments, tools.cmd_partition),
    Subcommand("plan", "predict each block visit's peak memory from a model config, and what fits",
               tools.plan_arguments, tools.cmd_plan),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcybgd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.arguments(p)
        p.set_defaults(func=command.run)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", datefmt="%H:%M:%S")


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
