"""Status at any length: GetStatus pages the visit history (a limit and a cursor), its totals come from
aggregates each commit keeps, and `fedcybgd status` shows a summary with flags to page.

Two levels: the state's paged queries and totals on a long synthetic history (thousands of visits, the
totals checked against a pass over every visit), and a real run (a coordinator on loopback, two client
processes) read over gRPC and through the command line."""
from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest

from conftest import PROCESS_ENV, address_of, wait_clients, wait_for, write_data
from fedcybgd.server import status as status_module
from fedcybgd.server.config import EvalConfig, TrainingConfig
from fedcybgd.server.records import ALL_BLOCKS, VisitStats
from fedcybgd.server.scheduler import ScheduleConfig
from fedcybgd.server.state import SqliteState, TaskRow, VisitRow
from fedcybgd.server.status import DEFAULT_PAGE, MAX_PAGE
from fedcybgd.v1 import coordinator_pb2 as pb

BLOCKS = 7
CLIENTS = ("c0", "c1", "c2")


def _sha(i: int) -> str:
    return hashlib.sha256(f"blob-{i}".encode()).hexdigest()


def _record(i: int) -> VisitStats:
    return VisitStats(lr=1e-4, seed=i, bytes_down=1000 + 7 * i, bytes_up=500 + 3 * i, loss_before=2.5,
                      loss_after=2.25, peak_memory_bytes=0, train_seconds=1.0, download_seconds=0.0,
                      visit_seconds=1.0, samples=4, tokens=128, device="cpu")


def _history(state: SqliteState, visits: int) -> None:
    """`visits` visits over BLOCKS blocks and three clients, every tenth a whole-model round (commit_merge),
    the others block visits of issued tasks (commit_visit)."""
    state.add_version(0, [_sha(b) for b in range(BLOCKS)], None)
    for r in range(visits):
        client = CLIENTS[(r * 5) % len(CLIENTS)]
        block = ALL_BLOCKS if r % 10 == 9 else (r * 3) % BLOCKS
        visit = VisitRow(round=r, task_id=f"t{r}", client_id=client, block_index=block, base_version=r,
                         new_version=r + 1, blob_sha256=_sha(1000 + r), committed_unix=float(r), record=_record(r))
        manifest = [_sha(b) for b in range(BLOCKS)]
        if block == ALL_BLOCKS:
            state.commit_merge(visit, manifest)
        else:
            state.issue_task(TaskRow(id=visit.task_id, round=r, block_index=block, client_id=client, base_version=r,
                                     status="issued", issued_unix=0.0, last_progress_unix=0.0))
            state.commit_visit(visit, manifest)


def _full_totals(state: SqliteState) -> tuple[dict, dict, tuple[int, int, int]]:
    """The totals as status computed them before: one pass over every visit."""
    visits = state.visits()
    scopes: dict[int, tuple[int, int]] = {}
    for v in visits:
        count, last = scopes.get(v.block_index, (0, 0))
        scopes[v.block_index] = (count + 1, max(last, v.new_version))
    clients = Counter(v.client_id for v in visits)
    return scopes, dict(clients), (len(visits), sum(v.record.bytes_down for v in visits),
                                   sum(v.record.bytes_up for v in visits))


def _totals(state: SqliteState) -> tuple[dict, dict, tuple[int, int, int]]:
    t = state.visit_totals()
    return ({s.block_index: (s.visits, s.last_version) for s in t.scopes}, {c.client_id: c.visits for c in t.clients},
            (t.visits, t.bytes_down, t.bytes_up))


@pytest.fixture(scope="module")
def long_history() -> Iterator[SqliteState]:
    state = SqliteState(":memory:")
    _history(state, 3000)
    yield state
    state.close()


# -- the state: pages and totals ---------------------------------------------------------------------------

def test_pages_walk_every_visit_exactly_once_newest_first(long_history):
    seen: list[int] = []
    before = None
    while True:
        page = long_history.visits_page(before, 700)
        assert len(page) <= 700
        assert [v.round for v in page] == sorted((v.round for v in page), reverse=True)
        seen += [v.round for v in page]
        if len(page) < 700:
            break
        before = page[-1].round
    assert seen == list(range(2999, -1, -1))
    assert long_history.visits_page(0, 10) == []  # nothing below round 0
    assert [v.round for v in long_history.visits_page(10**12, 3)] == [2999, 2998, 2997]


def test_totals_equal_a_pass_over_every_visit(long_history):
    assert _totals(long_history) == _full_totals(long_history)
    scopes, clients, (count, _, _) = _totals(long_history)
    assert count == 3000 and sum(clients.values()) == 3000 and set(clients) == set(CLIENTS)
    assert scopes[ALL_BLOCKS] == (300, 3000)


def test_counts_and_lookups(long_history):
    assert long_history.count_visits() == 3000
    assert long_history.count_visits(up_to_version=42) == 42
    v = long_history.visit_of_version(1234)
    assert v is not None and v.round == 1233
    assert long_history.visit_of_version(10**9) is None


def test_page_and_lookup_queries_use_the_keys_not_a_scan(long_history):
    """A page is a walk down the round key and a lookup a search of the version index, whatever the length."""
    def plan(sql: str, args: tuple) -> str:
        return " | ".join(row[3] for row in long_history._db.execute(f"EXPLAIN QUERY PLAN {sql}", args))

    page = plan("SELECT * FROM visits WHERE round < ? ORDER BY round DESC LIMIT ?", (100, 10))
    newest = plan("SELECT * FROM visits ORDER BY round DESC LIMIT ?", (10,))
    lookup = plan("SELECT * FROM visits WHERE new_version = ?", (5,))
    assert "SEARCH visits USING INTEGER PRIMARY KEY" in page and "TEMP B-TREE" not in page, page
    assert "SCAN visits" in newest and "TEMP B-TREE" not in newest, newest  # a reverse walk, stopped by LIMIT
    assert "SEARCH visits USING INDEX" in lookup, lookup


def test_a_database_older_than_the_totals_is_summed_up_once_at_open(tmp_path):
    path = tmp_path / "state.sqlite"
    state = SqliteState(path)
    _history(state, 120)
    expected = _full_totals(state)
    state.close()
    raw = sqlite3.connect(path)  # as a release before the totals left it
    raw.executescript("DROP TABLE visit_scope_totals; DROP TABLE visit_client_totals;"
                      "DELETE FROM meta WHERE key = 'visit_totals';")
    raw.close()
    state = SqliteState(path)
    try:
        assert _totals(state) == expected
        later = VisitRow(round=120, task_id="t120", client_id="c9", block_index=2, base_version=120,
                                 new_version=121, blob_sha256=_sha(5000), committed_unix=0.0, record=_record(120))
        state.commit_merge(later, [_sha(b) for b in range(BLOCKS)])
        assert _totals(state) == _full_totals(state)  # and kept up by later commits
    finally:
        state.close()
    reopened = SqliteState(path)
    try:
        assert _totals(reopened) == _full_totals(reopened)  # not summed up twice
    finally:
        reopened.close()


def test_a_failed_commit_counts_nothing():
    state = SqliteState(":memory:")
    try:
        _history(state, 5)
        before = _totals(state)
        duplicate = VisitRow(round=4, task_id="t99", client_id="c0", block_index=1, base_version=5,
                             new_version=50, blob_sha256=_sha(9), committed_unix=0.0, record=_record(99))
        with pytest.raises(sqlite3.IntegrityError):  # round 4 exists: the version written first is rolled back
            state.commit_merge(duplicate, [_sha(b) for b in range(BLOCKS)])
        assert _totals(state) == before == _full_totals(state)
        assert state.latest_version()[0] == 5  # type: ignore[index]
    finally:
        state.close()


def test_newest_and_first_evals():
    state = SqliteState(":memory:")
    try:
        assert state.newest_evals(3) == [] and state.first_eval() is None and state.best_eval() is None
        for v in range(10):
            state.add_eval(v, v, 3.0 - v / 10 if v < 6 else 2.5 + v / 100)  # lowest at 5, then overfitting
        assert [e[0] for e in state.newest_evals(3)] == [7, 8, 9]
        assert state.first_eval() == (0, 0, 3.0)
        assert state.best_eval() == (5, 5, 2.5)
        state.add_eval(10, 10, 2.5)
        assert state.best_eval() == (5, 5, 2.5), "a tie keeps the earlier version"
    finally:
        state.close()


# -- a real run, read over gRPC ------------------------------------------------------------------------------

SCHEDULE = ScheduleConfig(cycles=2, order="ascending", lr=3e-3, seed=3)
TRAINING = TrainingConfig(local_steps=1, batch_size=2, seq_len=32)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory, module_coordinators, module_clients):
    tmp = tmp_path_factory.mktemp("paging-run")
    data, eval_data = write_data(tmp, clients=2)
    running = module_coordinators.start(
        state_dir=str(tmp / "state"), schedule=SCHEDULE, training=TRAINING, grace=1,
        eval=EvalConfig(data=str(eval_data), max_sequences=4, batch_size=4, every_cycle=True))
    procs = [module_clients.start(address_of(running), data[i], tmp / "caches" / f"site-{i}", f"site-{i}")
             for i in range(2)]
    wait_clients(procs)
    wait_for(lambda: running.coordinator.finished, 60, "the final evaluation")
    return {"running": running, "coordinator": running.coordinator, "address": address_of(running),
            "stub": module_coordinators.stub(running)}


@pytest.mark.multiprocess
def test_paging_over_grpc_sees_every_visit_once(finished_run):
    stub, state = finished_run["stub"], finished_run["coordinator"].state
    rounds = [v.round for v in state.visits()]
    assert len(rounds) >= 8
    seen: list[int] = []
    before = 0
    pages = 0
    while True:
        page = stub.GetStatus(pb.GetStatusRequest(max_visits=3, visits_before_round=before), timeout=10)
        assert page.visits_total == len(rounds)
        assert len(page.visits) <= 3
        assert [v.round for v in page.visits] == sorted(v.round for v in page.visits)  # oldest first in a page
        seen[:0] = [v.round for v in page.visits]
        pages += 1
        before = page.next_visits_before_round
        if not before:
            break
        assert before == page.visits[0].round  # the next page: rounds below this one's oldest
    assert seen == rounds and pages == -(-len(rounds) // 3)


@pytest.mark.multiprocess
def test_default_page_summary_and_aggregates_equal_a_full_pass(finished_run):
    stub, coordinator = finished_run["stub"], finished_run["coordinator"]
    visits = coordinator.state.visits()
    full = stub.GetStatus(pb.GetStatusRequest(), timeout=10)  # the default page holds this short run
    assert len(visits) <= DEFAULT_PAGE
    assert [(v.round, v.task_id, v.new_version) for v in full.visits] == \
        [(v.round, v.task_id, v.new_version) for v in visits]
    assert full.next_visits_before_round == 0 and full.visits_total == len(visits)
    assert [e.version for e in full.evals] == [v for v, _, _ in coordinator.state.evals()]

    # The aggregates as the old status computed them, from every visit.
    for block in full.blocks:
        mine = [v for v in visits if block.index in set(coordinator.strategy.trained_blocks(v))]
        assert block.times_trained == len(mine), block
        assert block.last_version == max((v.new_version for v in mine), default=0), block
    for c in full.clients:
        assert c.visits_completed == sum(1 for v in visits if v.client_id == c.client_id) > 0
    assert full.total_bytes_down == sum(v.record.bytes_down for v in visits) > 0
    assert full.total_bytes_up == sum(v.record.bytes_up for v in visits) > 0

    summary = stub.GetStatus(pb.GetStatusRequest(summary=True), timeout=10)
    assert not summary.visits and not summary.evals and summary.next_visits_before_round == 0
    for field in ("run_state", "round", "version", "visits_total", "total_bytes_down", "total_bytes_up"):
        assert getattr(summary, field) == getattr(full, field), field
    assert list(summary.blocks) == list(full.blocks) and list(summary.clients) == list(full.clients)


@pytest.mark.multiprocess
def test_evaluations_are_bounded_to_the_first_and_the_newest(finished_run, monkeypatch):
    stub, state = finished_run["stub"], finished_run["coordinator"].state
    evaluated = [v for v, _, _ in state.evals()]
    assert len(evaluated) >= 3  # the base, each cycle
    monkeypatch.setattr(status_module, "EVALS_SHOWN", 2)
    shown = stub.GetStatus(pb.GetStatusRequest(max_visits=1), timeout=10).evals
    assert [e.version for e in shown] == [evaluated[0], evaluated[-1]]


@pytest.mark.multiprocess
@pytest.mark.parametrize("max_visits", [MAX_PAGE + 1, 2**32 - 1])
def test_too_large_a_page_is_invalid_argument_and_changes_nothing(finished_run, max_visits):
    stub, coordinator = finished_run["stub"], finished_run["coordinator"]
    before = coordinator.state.latest_version()
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetStatus(pb.GetStatusRequest(max_visits=max_visits), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details() or ""
    assert str(MAX_PAGE) in details and "visits_before_round" in details, details
    assert coordinator.state.latest_version() == before
    largest = stub.GetStatus(pb.GetStatusRequest(max_visits=MAX_PAGE), timeout=10)
    assert len(largest.visits) == largest.visits_total


@pytest.mark.multiprocess
def test_a_cursor_past_the_newest_round_reads_from_the_newest(finished_run):
    stub = finished_run["stub"]
    newest = stub.GetStatus(pb.GetStatusRequest(max_visits=2), timeout=10)
    past = stub.GetStatus(pb.GetStatusRequest(max_visits=2, visits_before_round=2**63), timeout=10)
    assert list(past.visits) == list(newest.visits)
    assert stub.GetStatus(pb.GetStatusRequest(max_visits=2, visits_before_round=1), timeout=10).visits[0].round == 0


# -- the command line --------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcybgd.cli.main", "--log-level", "warning", "status",
                           "--insecure", *args], capture_output=True, text=True, timeout=120, env=PROCESS_ENV)


@pytest.mark.multiprocess
def test_cli_shows_a_summary_and_pages_back(finished_run):
    address, visits = finished_run["address"], finished_run["coordinator"].state.visits()
    total = len(visits)
    first = _cli("--coordinator", address, "--visits", "3")
    assert first.returncode == 0, first.stderr
    assert "run done" in first.stdout
    rounds = [int(line.split()[2]) for line in first.stdout.splitlines() if line.strip().startswith("visit: round")]
    assert rounds == [v.round for v in visits][-3:]
    assert f"visits: 3 of {total} shown" in first.stdout and f"--before {rounds[0]}" in first.stdout

    older = _cli("--coordinator", address, "--visits", "3", "--before", str(rounds[0]))
    assert older.returncode == 0, older.stderr
    rounds = [int(line.split()[2]) for line in older.stdout.splitlines() if line.strip().startswith("visit: round")]
    assert rounds == [v.round for v in visits][-6:-3]

    every = _cli("--coordinator", address, "--all", "--json")
    assert every.returncode == 0, every.stderr
    status = json.loads(every.stdout)
    assert [int(v.get("round", 0)) for v in status["visits"]] == [v.round for v in visits]
    assert status["visitsTotal"] == total

    wrong = _cli("--coordinator", address, "--visits", str(MAX_PAGE + 1))
    assert wrong.returncode == 2 and "--visits" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr

