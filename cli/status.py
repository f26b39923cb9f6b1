"""`fedcybgd status`: where a coordinator's run stands, and its visit history page by page.

By default a summary: the run's state, cycle and round, model version, byte totals, clients, tasks in
flight, evaluations and the last few visits. `--visits N` and `--before ROUND` show one page of the history
(the newest N visits of the rounds below ROUND), `--all` walks every page. Visits print oldest first, as the
coordinator lists a page (see `fedcybgd.server.status`); the footer names the flag of the next, older page.

The helpers (`read_status`, `visit_pages`, `full_status`) are shared with the demo, which follows a run
and sums it up at the end.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from fedcybgd.v1 import coordinator_pb2 as pb

if TYPE_CHECKING:  # gRPC is imported when a command calls, not when the command line is parsed
    from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

#: The largest page the coordinator serves (`fedcybgd.server.status.MAX_PAGE`; asking for more is refused).
MAX_PAGE = 1000
#: Visits shown by default: the last few.
DEFAULT_VISITS = 10

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class StatusQuery:
    """What `fedcybgd status` asks for: one page of visits (or every visit), below a cursor."""

    visits: int = DEFAULT_VISITS   # page size, 1..MAX_PAGE
    before: int = 0                # cursor: visits of rounds below this (0: from the newest)
    every: bool = False            # walk every page: the whole history


def read_status(stub: pb_grpc.CoordinatorStub, metadata: Metadata = (), *, visits: int = 0, before: int = 0,
                summary: bool = False, timeout: float = 30) -> pb.GetStatusResponse:
    """One GetStatus call: the run and one page of visits (`visits` 0: the coordinator's default page)."""
    return stub.GetStatus(pb.GetStatusRequest(max_visits=visits, visits_before_round=before, summary=summary),
                          metadata=metadata, timeout=timeout)


def visit_pages(stub: pb_grpc.CoordinatorStub, metadata: Metadata = (), *, page: int = MAX_PAGE, before: int = 0,
                timeout: float = 30) -> Iterator[pb.GetStatusResponse]:
    """The replies of a walk down the visit history, newest page first, until no older page is left
    (each page's visits oldest first)."""
    while True:
        reply = read_status(stub, metadata, visits=page, before=before, timeout=timeout)
        yield reply
        before = reply.next_visits_before_round
        if not before:
            return


def full_status(stub: pb_grpc.CoordinatorStub, metadata: Metadata = (), *, timeout: float = 30) -> pb.GetStatusResponse:
    """The run with every visit, oldest first: the newest reply, with the visits of all pages (a cost that
    grows with the run: for summaries of a finished run and `--all`)."""
    pages = list(visit_pages(stub, metadata, timeout=timeout))
    status = pb.GetStatusResponse()
    status.CopyFrom(pages[0])
    del status.visits[:]
    for page in reversed(pages):
        status.visits.extend(page.visits)
    status.next_visits_before_round = 0
    return status


def query_of(args: argparse.Namespace) -> StatusQuery:
    """The command line's page, checked before anything is asked."""
    if not 1 <= args.visits <= MAX_PAGE:
        raise ValueError(f"--visits must be between 1 and {MAX_PAGE} (got {args.visits}); use --all for more")
    if args.before < 0:
        raise ValueError(f"--before must be a round number, 0 or more (got {args.before})")
    return StatusQuery(visits=args.visits, before=args.before, every=args.all)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default="127.0.0.1:50051")
    p.add_argument("--visits", type=int, default=DEFAULT_VISITS,
                   help=f"visits to show: the newest N (default {DEFAULT_VISITS}, at most {MAX_PAGE})")
    p.add_argument("--before", type=int, default=0, metavar="ROUND",
                   help="show the visits of rounds below ROUND (page back through the history; 0: the newest)")
    p.add_argument("--all", action="store_true", help="every visit of the run, read page by page")
    p.add_argument("--json", action="store_true")
    p.add_argument("--insecure", action="store_true", help="plaintext connection")
    p.add_argument("--tls-ca", dest="tls_ca")
    p.add_argument("--tls-cert", dest="tls_cert", help="operator certificate (mutual TLS)")
    p.add_argument("--tls-key", dest="tls_key")
    p.add_argument("--server-name", dest="server_name")
    p.add_argument("--operator-token", dest="operator_token", help="or env FEDCYBGD_OPERATOR_TOKEN")


def run_status(args: argparse.Namespace, token_env: str, out: TextIO) -> int:
    """`fedcybgd status`: ask, then print text or JSON. A refused request is a ValueError, an unreachable
    coordinator a ConnectionError (the CLI prints either as one line)."""
    import grpc
    from google.protobuf.json_format import MessageToDict

    from fedcybgd.common.transport import client_channel
    from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

    query = query_of(args)
    token = args.operator_token or os.environ.get(token_env)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    try:
        with client_channel(args.coordinator, insecure=args.insecure, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                            tls_key=args.tls_key, server_name=args.server_name) as channel:
            stub = pb_grpc.CoordinatorStub(channel)
            status = full_status(stub, metadata) if query.every else \
                read_status(stub, metadata, visits=query.visits, before=query.before)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ConnectionError(f"cannot reach coordinator at {args.coordinator}: {err.code().name}") from err
        raise ValueError(f"coordinator at {args.coordinator} refused: {err.code().name}: {err.details()}") from err
    if args.json:
        print(json.dumps(MessageToDict(status), indent=2), file=out)
    else:
        render(status, out)
    return 0


def render(status: pb.GetStatusResponse, out: TextIO) -> None:
    """The text view: run, bytes, clients, tasks in flight, evaluations, the page of visits and how to page on."""
    def line(text: str = "") -> None:
        print(text, file=out)

    line(f"run {status.run_state}: round {status.round}/{status.total_rounds}, cycle {status.cycle}, "
         f"model version {status.version}, {status.num_blocks} blocks")
    line(f"bytes down {status.total_bytes_down:,}  up {status.total_bytes_up:,}  (model {status.model_bytes:,} bytes)")
    if status.waiting_reason:
        line(f"waiting: {status.waiting_reason}")
    names = {c.client_id: c.name for c in status.clients}
    for c in status.clients:
        fits = "fits: being predicted" if c.memory_planning else f"fits {c.fits_blocks}/{status.num_blocks}"
        memory = f"{c.memory_bytes / 2**30:.2f} GiB, {fits}" if c.memory_bytes else "memory unknown"
        line(f"  client {c.client_id} {c.name:<16} {c.device_kind:<10} visits {c.visits_completed:>4}  "
             f"task {c.current_task or '-'}  ({memory})")
        if c.memory_note:
            line(f"    {c.memory_note}")
        if c.record_epsilon or c.update_epsilon:
            line(f"    privacy spent: epsilon {c.record_epsilon:.3g} (records), {c.update_epsilon:.3g} (updates)")
        if c.declined:
            line(f"    declined: {c.declined}")
    for t in status.tasks:
        progress = f"step {t.step}/{t.steps}" if t.phase == "train" else t.phase or "issued"
        line(f"  in flight: round {t.round} {t.block_name:<14} {names.get(t.client_id, t.client_id):<16} {progress}")
    for e in status.evals:
        line(f"  eval: version {e.version} after {e.rounds_done} rounds: loss {e.loss:.4f}")
    if status.HasField("best_eval"):
        b = status.best_eval
        line(f"  best: version {b.version} after {b.rounds_done} rounds: loss {b.loss:.4f} (fedcybgd export --best)")
    for v in status.visits:
        line(f"  visit: round {v.round:>5} cycle {v.cycle:>3} {v.block_name:<14} {v.client_name:<16} "
             f"loss {v.loss_before:.4f} -> {v.loss_after:.4f}  down {v.bytes_down:,}  up {v.bytes_up:,}  "
             f"{v.visit_seconds:.1f}s")
    line(_footer(status))


def _footer(status: pb.GetStatusResponse) -> str:
    if not status.visits:
        return f"visits: {status.visits_total} in all"
    first, last = status.visits[0].round, status.visits[-1].round
    text = f"visits: {len(status.visits)} of {status.visits_total} shown (rounds {first}..{last})"
    if status.next_visits_before_round:
        text += f"; older: --before {status.next_visits_before_round}"
    return text
