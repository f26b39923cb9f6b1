"""The coordinator's durable state (fedcybgd.server.state.SqliteState)."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import pytest

from fedcybgd.server.records import VisitStats
from fedcybgd.server.state import ClientRow, SqliteState, StaleTaskError, TaskRow, VisitRow


def _h(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _sha(i: int) -> str:
    return hashlib.sha256(f"blob-{i}".encode()).hexdigest()


BASE = [_sha(0), _sha(1), _sha(2)]


@pytest.fixture(params=["file", "memory"])
def state(request, tmp_path):
    s = SqliteState(tmp_path / "state.db" if request.param == "file" else ":memory:")
    yield s
    s.close()


def _client(i: int, t: float = 1000.0) -> ClientRow:
    return ClientRow(id=f"c{i}", name=f"site-{i}", device_kind="cpu", memory_bytes=2**30 + i,
                     registered_unix=t, last_seen_unix=t)


def _task(tid: str, round_: int, block: int = 0, client: str = "c0", base: int = 0, t: float = 100.0) -> TaskRow:
    return TaskRow(id=tid, round=round_, block_index=block, client_id=client, base_version=base,
                   status="issued", issued_unix=t, last_progress_unix=t)


def _visit(tid: str, round_: int, new_version: int, block: int = 0, base: int = 0, sha: str | None = None,
           t: float = 200.0) -> VisitRow:
    return VisitRow(round=round_, task_id=tid, client_id="c0", block_index=block, base_version=base,
                    new_version=new_version, blob_sha256=sha or _sha(100 + new_version), committed_unix=t,
                    record=VisitStats(lr=1e-4, seed=2**62 + 1, bytes_down=0, bytes_up=0, loss_before=2.5,
                                      loss_after=2.25, peak_memory_bytes=0, train_seconds=1.0, download_seconds=0.0,
                                      visit_seconds=1.0, samples=4, tokens=128, device="cpu"))


def _manifest_with(block: int, sha: str, base: list[str] = BASE) -> list[str]:
    m = list(base)
    m[block] = sha
    return m


# ------------------------------------------------------------------------------------------- meta


def test_meta(state):
    assert state.get_meta("model_id") is None
    state.set_meta({"model_id": "abc", "num_blocks": "3"})
    assert state.get_meta("model_id") == "abc"
    assert state.get_meta("num_blocks") == "3"
    state.set_meta({"model_id": "def"})
    assert state.get_meta("model_id") == "def"
    assert state.get_meta("num_blocks") == "3"
    state.set_meta({})
    assert state.get_meta("model_id") == "def"


# ---------------------------------------------------------------------------------------- clients


def test_clients_by_token_hash(state):
    state.add_client(_client(1, t=2000.0), _h("token-1"))
    state.add_client(_client(0, t=1000.0), _h("token-0"))
    assert state.client_by_token(_h("token-1")) == _client(1, t=2000.0)
    assert state.client_by_token(_h("token-0")) == _client(0, t=1000.0)
    assert state.client_by_token(_h("token-2")) is None
    assert state.client_by_token("token-1") is None  # looked up by hash, never by the token itself
    assert [c.id for c in state.clients()] == ["c0", "c1"]  # by registration time


def test_duplicate_token_or_id_refused(state):
    state.add_client(_client(0), _h("t"))
    with pytest.raises(sqlite3.IntegrityError):
        state.add_client(_client(1), _h("t"))
    with pytest.raises(sqlite3.IntegrityError):
        state.add_client(_client(0), _h("other"))
    assert [c.id for c in state.clients()] == ["c0"]
    state.set_meta({"still": "usable"})  # the failed transactions were rolled back
    assert state.get_meta("still") == "usable"


def test_touch_client(state):
    state.add_client(_client(0, t=1000.0), _h("t"))
    before = time.time()
    state.touch_client("c0", gpu_peak_allocated_bytes=123, host_rss_bytes=456)
    c = state.client_by_token(_h("t"))
    assert c.last_seen_unix >= before
    assert c.registered_unix == 1000.0
    assert (c.gpu_peak_allocated_bytes, c.gpu_peak_reserved_bytes, c.host_rss_bytes) == (123, 0, 456)
    state.touch_client("c0", gpu_peak_reserved_bytes=789)
    c = state.client_by_token(_h("t"))
    assert (c.gpu_peak_allocated_bytes, c.gpu_peak_reserved_bytes, c.host_rss_bytes) == (123, 789, 456)
    with pytest.raises(KeyError):
        state.touch_client("c0", name=1)


# --------------------------------------------------------------------------------------- versions


def test_versions_and_manifests(state):
    assert state.latest_version() is None
    state.add_version(0, BASE, None)
    assert state.latest_version() == (0, BASE)
    m1 = _manifest_with(1, _sha(10))
    state.add_version(1, m1, 0)
    assert state.latest_version() == (1, m1)
    assert state.manifest(0) == BASE
    assert state.manifest(1) == m1
    with pytest.raises(KeyError):
        state.manifest(2)
    with pytest.raises(sqlite3.IntegrityError):
        state.add_version(1, BASE, 5)
    assert state.manifest(1) == m1


# ------------------------------------------------------------------------------------------ tasks


def test_issue_and_expire_tasks(state):
    state.issue_task(_task("t1", 1, block=1))
    state.issue_task(_task("t0", 0, block=0))
    t = state.task("t1")
    assert t == _task("t1", 1, block=1)
    assert t.status == "issued" and t.finished_unix is None and (t.bytes_down, t.bytes_up) == (0, 0)
    assert state.task("nope") is None
    assert [t.id for t in state.tasks_with_status("issued")] == ["t0", "t1"]  # by round
    assert state.tasks_with_status("expired") == []

    before = time.time()
    assert state.expire_task("t0") is True
    assert state.expire_task("t0") is False  # only once
    assert state.expire_task("nope") is False
    t0 = state.task("t0")
    assert t0.status == "expired" and t0.finished_unix >= before
    assert [t.id for t in state.tasks_with_status("issued")] == ["t1"]
    assert [t.id for t in state.tasks_with_status("expired")] == ["t0"]
    with pytest.raises(sqlite3.IntegrityError):
        state.issue_task(_task("t1", 5))  # task ids are unique


def test_note_progress_adds_bytes(state):
    state.issue_task(_task("t0", 0, t=100.0))
    state.note_progress("t0", bytes_down=1000)
    state.note_progress("t0", bytes_down=24, bytes_up=7)
    state.note_progress("t0")
    t = state.task("t0")
    assert (t.bytes_down, t.bytes_up) == (1024, 7)
    assert t.last_progress_unix > 100.0
    assert t.issued_unix == 100.0
    state.note_progress("missing", bytes_down=5)  # no such task: nothing happens
    assert state.task("missing") is None


# ----------------------------------------------------------------------------------------- visits


def _setup_run(state):
    state.add_client(_client(0), _h("t"))
    state.add_version(0, BASE, None)


def test_commit_visit(state):
    _setup_run(state)
    state.issue_task(_task("t0", 0, block=0))
    v = _visit("t0", 0, 1, block=0)
    m1 = _manifest_with(0, v.blob_sha256)
    state.commit_visit(v, m1)
    assert state.latest_version() == (1, m1)
    assert state.visits() == [v]
    assert state.visit_of_task("t0") == v
    assert state.visit_of_task("t1") is None
    t = state.task("t0")
    assert t.status == "done" and t.finished_unix == v.committed_unix
    assert state.tasks_with_status("issued") == []

    state.issue_task(_task("t1", 1, block=1, base=1))
    v2 = _visit("t1", 1, 2, block=1, base=1)
    m2 = _manifest_with(1, v2.blob_sha256, m1)
    state.commit_visit(v2, m2)
    assert state.visits() == [v, v2]
    assert state.manifest(1) == m1 and state.manifest(2) == m2
    assert state.visits()[0].record.seed == 2**62 + 1  # big ints survive the JSON record


def _assert_nothing_committed(state, task_id: str, status: str):
    assert state.latest_version() == (0, BASE)
    with pytest.raises(KeyError):
        state.manifest(1)
    assert state.visits() == []
    assert state.visit_of_task(task_id) is None
    assert state.task(task_id).status == status


def test_commit_visit_for_expired_task_is_stale_and_atomic(state):
    _setup_run(state)
    state.issue_task(_task("t0", 0))
    assert state.expire_task("t0")
    finished = state.task("t0").finished_unix
    v = _visit("t0", 0, 1)
    with pytest.raises(StaleTaskError):
        state.commit_visit(v, _manifest_with(0, v.blob_sha256))
    _assert_nothing_committed(state, "t0", "expired")
    assert state.task("t0").finished_unix == finished
    state.set_meta({"after": "ok"})  # no transaction left open
    assert state.get_meta("after") == "ok"


def test_commit_visit_twice_is_stale(state):
    _setup_run(state)
    state.issue_task(_task("t0", 0))
    v = _visit("t0", 0, 1)
    state.commit_visit(v, _manifest_with(0, v.blob_sha256))
    again = _visit("t0", 1, 2, t=300.0)
    with pytest.raises(StaleTaskError):
        state.commit_visit(again, BASE)
    assert state.latest_version()[0] == 1
    assert state.visits() == [v]
    assert state.task("t0").finished_unix == v.committed_unix


def test_commit_visit_for_unknown_task_is_stale(state):
    _setup_run(state)
    with pytest.raises(StaleTaskError):
        state.commit_visit(_visit("ghost", 0, 1), BASE)
    assert state.latest_version() == (0, BASE) and state.visits() == []


def test_commit_visit_rolls_back_the_version_when_the_visit_insert_fails(state):
    _setup_run(state)
    state.issue_task(_task("t0", 0))
    state.issue_task(_task("t0b", 0))  # a second task for the same round
    v = _visit("t0", 0, 1)
    state.commit_visit(v, _manifest_with(0, v.blob_sha256))
    # The version row (new number 2) is inserted before the visit row, whose round collides.
    with pytest.raises(sqlite3.IntegrityError):
        state.commit_visit(_visit("t0b", 0, 2), BASE)
    with pytest.raises(KeyError):
        state.manifest(2)
    assert state.latest_version()[0] == 1
    assert state.visits() == [v]
    assert state.task("t0b").status == "issued"  # the task update was rolled back too


def test_commit_visit_with_existing_version_number_changes_nothing(state):
    _setup_run(state)
    state.issue_task(_task("t0", 0))
    with pytest.raises(sqlite3.IntegrityError):
        state.commit_visit(_visit("t0", 0, 0), BASE)  # version 0 exists
    _assert_nothing_committed(state, "t0", "issued")
    v = _visit("t0", 0, 1)  # the task can still be committed properly
    state.commit_visit(v, _manifest_with(0, v.blob_sha256))
    assert state.visits() == [v]


# ------------------------------------------------------------------------------------------ evals


def test_evals(state):
    assert state.evals() == []
    state.add_eval(3, 3, 2.0)
    state.add_eval(0, 0, 3.5)
    assert state.evals() == [(0, 0, 3.5), (3, 3, 2.0)]
    state.add_eval(3, 3, 1.75)  # re-evaluating a version replaces its point
    assert state.evals() == [(0, 0, 3.5), (3, 3, 1.75)]


# ------------------------------------------------------------------------------------ persistence


def test_data_persists_across_close_and_reopen(tmp_path):
    path = tmp_path / "state.db"
    s = SqliteState(path)
    s.set_meta({"model_id": "m"})
    s.add_client(_client(0), _h("tok"))
    s.add_version(0, BASE, None)
    s.issue_task(_task("t0", 0))
    s.issue_task(_task("t1", 1, block=1, base=1))
    s.note_progress("t1", bytes_down=10, bytes_up=3)
    v = _visit("t0", 0, 1)
    m1 = _manifest_with(0, v.blob_sha256)
    s.commit_visit(v, m1)
    s.add_eval(1, 1, 2.5)
    s.close()

    r = SqliteState(path)
    try:
        assert r.get_meta("model_id") == "m"
        assert r.client_by_token(_h("tok")) == _client(0)
        assert r.latest_version() == (1, m1)
        assert r.manifest(0) == BASE
        assert r.visits() == [v]
        t0 = r.task("t0")
        assert t0 is not None and t0.status == "done"
        t1 = r.task("t1")
        assert t1 is not None and t1.status == "issued" and (t1.bytes_down, t1.bytes_up) == (10, 3)
        assert r.evals() == [(1, 1, 2.5)]
        # Reopening is not destructive and the state stays writable.
        r.add_version(2, BASE, 1)
        assert r.latest_version() == (2, BASE)
    finally:
        r.close()
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        raw.close()


def test_memory_states_are_independent():
    a, b = SqliteState(":memory:"), SqliteState(":memory:")
    try:
        a.set_meta({"k": "v"})
        assert b.get_meta("k") is None
    finally:
        a.close()
        b.close()


def test_concurrent_commits_from_threads(tmp_path):
    s = SqliteState(tmp_path / "state.db")
    try:
        s.add_version(0, BASE, None)
        n = 16
        for i in range(n):
            s.issue_task(_task(f"t{i}", i))
        errors = []

        def commit(i):
            try:
                for _ in range(5):
                    s.note_progress(f"t{i}", bytes_up=1)
                s.commit_visit(_visit(f"t{i}", i, i + 1), BASE)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=commit, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert errors == []
        assert [v.round for v in s.visits()] == list(range(n))
        latest = s.latest_version()
        assert latest is not None and latest[0] == n
        rows = [s.task(f"t{i}") for i in range(n)]
        assert all(row is not None and row.bytes_up == 5 for row in rows)
    finally:
        s.close()


def test_failed_begin_does_not_leak_the_lock(tmp_path):
    path = tmp_path / "state.db"
    s = SqliteState(path)
    s._db.execute("PRAGMA busy_timeout = 0")  # fail at once instead of after the 5 s default
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. an operator's tool writing to the database
    with pytest.raises(sqlite3.OperationalError):
        s.set_meta({"k": "v"})
    other.execute("ROLLBACK")
    other.close()

    done = threading.Event()

    def read():
        s.get_meta("k")
        done.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        assert done.wait(1.0), "another thread is blocked on the state's lock"
    finally:
        if not done.is_set():
            s._lock.release()  # this thread still owns the leaked lock: let the reader finish
        t.join(5)
        s.close()
