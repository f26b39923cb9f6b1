"""The coordinator's durable state: clients, tasks, model versions, accepted visits, evaluations.

Everything the coordinator must not forget across a restart lives here, behind the small
`CoordinatorState` interface. `SqliteState` implements it; `SqliteState(":memory:")` is the
in-memory variant for tests and throw-away runs. Each method is one transaction, so a crash
between two calls leaves a consistent state, and the methods the RPCs rely on are idempotent.
Blobs are not stored here (see `fedcybgd.common.blobstore`): only their SHA-256.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from fedcybgd.server import visit_totals
from fedcybgd.server.records import VisitStats
from fedcybgd.server.state_records import (
    ClientRow,
    ContributionRow,
    CoordinatorState,
    KeptVersion,
    StaleTaskError,
    TaskRow,
    VisitRow,
    current_version,
)
from fedcybgd.server.visit_totals import VisitTotals

__all__ = ["ClientRow", "ContributionRow", "CoordinatorState", "KeptVersion", "SqliteState", "StaleTaskError",
           "TaskRow", "VisitRow", "current_version"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clients (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, token_sha256 TEXT NOT NULL UNIQUE,
    device_kind TEXT NOT NULL, memory_bytes INTEGER NOT NULL,
    registered_unix REAL NOT NULL, last_seen_unix REAL NOT NULL,
    gpu_peak_allocated_bytes INTEGER NOT NULL DEFAULT 0, gpu_peak_reserved_bytes INTEGER NOT NULL DEFAULT 0,
    host_rss_bytes INTEGER NOT NULL DEFAULT 0, checkpoint_above INTEGER NOT NULL DEFAULT 0,
    compact_frozen TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS versions (
    version INTEGER PRIMARY KEY, manifest TEXT NOT NULL, round INTEGER, created_unix REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, round INTEGER NOT NULL, block_index INTEGER NOT NULL,
    client_id TEXT NOT NULL, base_version INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('issued', 'done', 'expired')),
    issued_unix REAL NOT NULL, finished_unix REAL, last_progress_unix REAL NOT NULL,
    bytes_down INTEGER NOT NULL DEFAULT 0, bytes_up INTEGER NOT NULL DEFAULT 0,
    slot INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status);
CREATE TABLE IF NOT EXISTS visits (
    round INTEGER PRIMARY KEY, task_id TEXT NOT NULL UNIQUE, client_id TEXT NOT NULL,
    block_index INTEGER NOT NULL, base_version INTEGER NOT NULL, new_version INTEGER NOT NULL UNIQUE,
    blob_sha256 TEXT NOT NULL, record TEXT NOT NULL, committed_unix REAL NOT NULL);
CREATE TABLE IF NOT EXISTS contributions (
    task_id TEXT PRIMARY KEY, round INTEGER NOT NULL, slot INTEGER NOT NULL, client_id TEXT NOT NULL,
    blobs TEXT NOT NULL, record TEXT NOT NULL, committed_unix REAL NOT NULL, UNIQUE (round, slot));
CREATE TABLE IF NOT EXISTS pruned_versions (
    version INTEGER PRIMARY KEY, pruned_unix REAL NOT NULL, blobs_deleted INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_by_client ON tasks (client_id, issued_unix);
CREATE INDEX IF NOT EXISTS visits_by_client ON visits (client_id, round);
CREATE TABLE IF NOT EXISTS evals (
    version INTEGER PRIMARY KEY, rounds_done INTEGER NOT NULL, loss REAL NOT NULL, created_unix REAL NOT NULL);
""" + visit_totals.SCHEMA

#: Columns added since the first release: (table, column, definition). A state directory made by an older
#: version gets them at start (`ALTER TABLE ... ADD COLUMN`), with the default that means what older clients did.
ADDED_COLUMNS = (
    ("clients", "checkpoint_above", "INTEGER NOT NULL DEFAULT 0"),
    ("clients", "compact_frozen", "TEXT NOT NULL DEFAULT ''"),
)


class SqliteState:
    """SQLite in WAL mode with synchronous=FULL: a committed visit survives power loss."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Bring a database written by an older version up to `SCHEMA` (CREATE TABLE IF NOT EXISTS leaves an
        existing table as it was). Writes nothing, and takes no write lock, when nothing is missing."""
        for table, column, definition in ADDED_COLUMNS:
            if column in self._columns(table):
                continue
            with self._tx() as db:
                if column not in self._columns(table):  # another process may have added it meanwhile
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        if self.get_meta(visit_totals.META_KEY) is None:  # older than the visit totals (or new): sum up once
            with self._tx() as db:
                if visit_totals.needs_summing(db):  # another process may have done it meanwhile
                    visit_totals.sum_up(db)

    def _columns(self, table: str) -> set[str]:
        return {row["name"] for row in self._query(f"PRAGMA table_info({table})")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers -------------------------------------------------------------------------------
    def _tx(self):
        """One IMMEDIATE transaction under the process lock (used as a context manager)."""
        state = self

        class _Tx:
            def __enter__(self_inner):
                state._lock.acquire()
                try:
                    state._db.execute("BEGIN IMMEDIATE")
                except BaseException:
                    state._lock.release()
                    raise
                return state._db

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    state._db.execute("ROLLBACK" if exc_type else "COMMIT")
                finally:
                    state._lock.release()

        return _Tx()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- meta ----------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, values: dict[str, str]) -> None:
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    # -- clients -------------------------------------------------------------------------------
    def add_client(self, client: ClientRow, token_sha256: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO clients (id, name, token_sha256, device_kind, memory_bytes, registered_unix,"
                " last_seen_unix, checkpoint_above, compact_frozen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (client.id, client.name, token_sha256, client.device_kind, client.memory_bytes,
                 client.registered_unix, client.last_seen_unix, int(client.checkpoint_above), client.compact_frozen),
            )

    @staticmethod
    def _client(row: sqlite3.Row) -> ClientRow:
        values = {k: row[k] for k in ClientRow.__dataclass_fields__}
        values["checkpoint_above"] = bool(values["checkpoint_above"])  # SQLite keeps 0 / 1
        return ClientRow(**values)

    def client_by_token(self, token_sha256: str) -> ClientRow | None:
        rows = self._query("SELECT * FROM clients WHERE token_sha256 = ?", (token_sha256,))
        return self._client(rows[0]) if rows else None

    def clients(self) -> list[ClientRow]:
        return [self._client(r) for r in self._query("SELECT * FROM clients ORDER BY registered_unix")]

    def touch_client(self, client_id: str, **resources: int) -> None:
        allowed = {"gpu_peak_allocated_bytes", "gpu_peak_reserved_bytes", "host_rss_bytes"}
        sets, args = ["last_seen_unix = ?"], [time.time()]
        for key, value in resources.items():
            if key not in allowed:
                raise KeyError(key)
            sets.append(f"{key} = ?")
            args.append(int(value))
        with self._tx() as db:
            db.execute(f"UPDATE clients SET {', '.join(sets)} WHERE id = ?", (*args, client_id))

    # -- versions ------------------------------------------------------------------------------
    def add_version(self, version: int, manifest: list[str], round_: int | None, replace: bool = False) -> None:
        with self._tx() as db:
            db.execute(
                f"INSERT {'OR REPLACE ' if replace else ''}INTO versions (version, manifest, round, created_unix)"
                " VALUES (?, ?, ?, ?)",
                (version, json.dumps(manifest), round_, time.time()),
            )

    def latest_version(self) -> tuple[int, list[str]] | None:
        rows = self._query("SELECT version, manifest FROM versions ORDER BY version DESC LIMIT 1")
        return (rows[0]["version"], json.loads(rows[0]["manifest"])) if rows else None

    def manifest(self, version: int) -> list[str]:
        rows = self._query("SELECT manifest FROM versions WHERE version = ?", (version,))
        if not rows:
            raise KeyError(f"no model version {version}")
        return json.loads(rows[0]["manifest"])

    # -- tasks ---------------------------------------------------------------------------------
    def issue_task(self, task: TaskRow) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tasks (id, round, block_index, client_id, base_version, status, issued_unix,"
                " last_progress_unix, slot) VALUES (?, ?, ?, ?, ?, 'issued', ?, ?, ?)",
                (task.id, task.round, task.block_index, task.client_id, task.base_version,
                 task.issued_unix, task.last_progress_unix, task.slot),
            )

    @staticmethod
    def _task(row: sqlite3.Row) -> TaskRow:
        return TaskRow(**{k: row[k] for k in TaskRow.__dataclass_fields__})

    def task(self, task_id: str) -> TaskRow | None:
        rows = self._query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return self._task(rows[0]) if rows else None

    def tasks_with_status(self, status: str) -> list[TaskRow]:
        return [self._task(r) for r in self._query("SELECT * FROM tasks WHERE status = ? ORDER BY round", (status,))]

    def note_progress(self, task_id: str, *, bytes_down: int = 0, bytes_up: int = 0) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET last_progress_unix = ?, bytes_down = bytes_down + ?, bytes_up = bytes_up + ?"
                " WHERE id = ?",
                (time.time(), bytes_down, bytes_up, task_id),
            )

    def expire_task(self, task_id: str) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tasks SET status = 'expired', finished_unix = ? WHERE id = ? AND status = 'issued'",
                (time.time(), task_id),
            )
            return cur.rowcount == 1

    # -- visits --------------------------------------------------------------------------------
    def commit_visit(self, visit: VisitRow, manifest: list[str]) -> None:
        """Accept an upload: the new version, the visit record and the task's end, atomically."""
        with self._tx() as db:
            self._end_task(db, visit.task_id, visit.committed_unix)
            self._insert_version_and_visit(db, visit, manifest)

    @staticmethod
    def _end_task(db: sqlite3.Connection, task_id: str, now: float) -> None:
        """Mark an issued task done, inside the caller's transaction; a task expired (or done)
        meanwhile makes the whole transaction fail."""
        cur = db.execute("UPDATE tasks SET status = 'done', finished_unix = ? WHERE id = ? AND status = 'issued'",
                         (now, task_id))
        if cur.rowcount != 1:
            raise StaleTaskError(f"task {task_id} is no longer issued")

    def commit_merge(self, visit: VisitRow, manifest: list[str]) -> None:
        """A FedAvg-family round's average: the new version and the round's record, atomically
        (its tasks ended when their contributions were stored)."""
        with self._tx() as db:
            self._insert_version_and_visit(db, visit, manifest)

    @staticmethod
    def _insert_version_and_visit(db: sqlite3.Connection, visit: VisitRow, manifest: list[str]) -> None:
        db.execute(
            "INSERT INTO versions (version, manifest, round, created_unix) VALUES (?, ?, ?, ?)",
            (visit.new_version, json.dumps(manifest), visit.round, visit.committed_unix),
        )
        db.execute(
            "INSERT INTO visits (round, task_id, client_id, block_index, base_version, new_version,"
            " blob_sha256, record, committed_unix) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (visit.round, visit.task_id, visit.client_id, visit.block_index, visit.base_version,
             visit.new_version, visit.blob_sha256, visit.record.to_json(), visit.committed_unix),
        )
        visit_totals.add_visit(db, visit.client_id, visit.block_index, visit.new_version, visit.record)

    # -- contributions (FedAvg-family rounds) ----------------------------------------------------
    def add_contribution(self, contribution: ContributionRow) -> None:
        """Accept one client's upload to a round: stored with its task's end, atomically."""
        c = contribution
        with self._tx() as db:
            self._end_task(db, c.task_id, c.committed_unix)
            db.execute(
                "INSERT INTO contributions (task_id, round, slot, client_id, blobs, record, committed_unix)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (c.task_id, c.round, c.slot, c.client_id, json.dumps(c.blobs), c.record.to_json(), c.committed_unix),
            )

    @staticmethod
    def _contribution(row: sqlite3.Row) -> ContributionRow:
        return ContributionRow(task_id=row["task_id"], round=row["round"], slot=row["slot"], client_id=row["client_id"],
                               blobs=json.loads(row["blobs"]), committed_unix=row["committed_unix"],
                               record=VisitStats.from_json(row["record"]))

    def contributions(self, round_: int) -> list[ContributionRow]:
        return [self._contribution(r) for r in
                self._query("SELECT * FROM contributions WHERE round = ? ORDER BY slot", (round_,))]

    def contribution_of_task(self, task_id: str) -> ContributionRow | None:
        rows = self._query("SELECT * FROM contributions WHERE task_id = ?", (task_id,))
        return self._contribution(rows[0]) if rows else None

    @staticmethod
    def _visit(row: sqlite3.Row) -> VisitRow:
        values = {k: row[k] for k in VisitRow.__dataclass_fields__ if k != "record"}
        return VisitRow(**values, record=VisitStats.from_json(row["record"]))

    def visits(self) -> list[VisitRow]:
        return [self._visit(r) for r in self._query("SELECT * FROM visits ORDER BY round")]

    def visit_of_task(self, task_id: str) -> VisitRow | None:
        rows = self._query("SELECT * FROM visits WHERE task_id = ?", (task_id,))
        return self._visit(rows[0]) if rows else None

    def visits_page(self, before_round: int | None, limit: int) -> list[VisitRow]:
        """Up to `limit` visits of the rounds below `before_round` (None: from the newest), newest first: a walk
        down the round key, so a page costs the same at any length of the run."""
        if before_round is None:
            rows = self._query("SELECT * FROM visits ORDER BY round DESC LIMIT ?", (limit,))
        else:
            rows = self._query("SELECT * FROM visits WHERE round < ? ORDER BY round DESC LIMIT ?",
                               (before_round, limit))
        return [self._visit(r) for r in rows]

    def visit_of_version(self, version: int) -> VisitRow | None:
        rows = self._query("SELECT * FROM visits WHERE new_version = ?", (version,))
        return self._visit(rows[0]) if rows else None

    def count_visits(self, up_to_version: int | None = None) -> int:
        """Visits committed (that produced a version up to `up_to_version`), counted on the version index."""
        if up_to_version is None:
            return self._query("SELECT COUNT(*) AS n FROM visits")[0]["n"]
        return self._query("SELECT COUNT(*) AS n FROM visits WHERE new_version <= ?", (up_to_version,))[0]["n"]

    def visit_totals(self) -> VisitTotals:
        """Every visit summed up by scope and by client, read from the totals each commit keeps."""
        with self._lock:
            return visit_totals.read(self._db)

    # -- evaluations ---------------------------------------------------------------------------
    def add_eval(self, version: int, rounds_done: int, loss: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO evals (version, rounds_done, loss, created_unix) VALUES (?, ?, ?, ?)",
                (version, rounds_done, loss, time.time()),
            )

    def evals(self) -> list[tuple[int, int, float]]:
        rows = self._query("SELECT * FROM evals ORDER BY version")
        return [(r["version"], r["rounds_done"], r["loss"]) for r in rows]

    def newest_evals(self, limit: int) -> list[tuple[int, int, float]]:
        """The `limit` evaluations of the newest versions, oldest first."""
        rows = self._query("SELECT * FROM evals ORDER BY version DESC LIMIT ?", (limit,))
        return [(r["version"], r["rounds_done"], r["loss"]) for r in reversed(rows)]

    def best_eval(self) -> tuple[int, int, float] | None:
        """The evaluation with the lowest held-out loss (the earliest version on a tie)."""
        rows = self._query("SELECT * FROM evals ORDER BY loss, version LIMIT 1")
        return (rows[0]["version"], rows[0]["rounds_done"], rows[0]["loss"]) if rows else None

    def first_eval(self) -> tuple[int, int, float] | None:
        rows = self._query("SELECT * FROM evals ORDER BY version LIMIT 1")
        return (rows[0]["version"], rows[0]["rounds_done"], rows[0]["loss"]) if rows else None

    # -- retention (server/retention.py) ---------------------------------------------------------
    def kept_versions(self, since: int = 0) -> list[KeptVersion]:
        """The versions from `since` on that were not pruned, with their manifests, oldest first."""
        rows = self._query("SELECT version, manifest FROM versions WHERE version >= ? AND version NOT IN"
                           " (SELECT version FROM pruned_versions) ORDER BY version", (since,))
        return [KeptVersion(r["version"], json.loads(r["manifest"])) for r in rows]

    def held_by_active_clients(self, seen_since_unix: float) -> set[int]:
        """The versions whose blobs clients heard from since `seen_since_unix` hold: the bases of each one's two
        newest tasks (its last downloads: the one in progress takes its delta bases from the one before) and the
        version its newest visit made (its own upload). Indexed look-ups per client: the cost does not grow with
        the run's length."""
        held: set[int] = set()
        with self._lock:
            active = [r["id"] for r in self._db.execute(
                "SELECT id FROM clients WHERE last_seen_unix >= ?", (seen_since_unix,))]
            for client_id in active:
                for sql in ("SELECT base_version AS v FROM tasks WHERE client_id = ? ORDER BY issued_unix DESC LIMIT 2",
                            "SELECT new_version AS v FROM visits WHERE client_id = ? ORDER BY round DESC LIMIT 1"):
                    held.update(r["v"] for r in self._db.execute(sql, (client_id,)))
        return held

    def prune_versions(self, versions: list[int]) -> None:
        """Record versions as pruned, before their blobs are deleted (`mark_blobs_deleted` after): a crash in
        between leaves them pending, and the next start finishes the deletion."""
        now = time.time()
        with self._tx() as db:
            db.executemany("INSERT OR IGNORE INTO pruned_versions (version, pruned_unix) VALUES (?, ?)",
                           [(v, now) for v in versions])

    def pruned_pending(self) -> list[int]:
        return [r["version"] for r in
                self._query("SELECT version FROM pruned_versions WHERE blobs_deleted = 0 ORDER BY version")]

    def mark_blobs_deleted(self, versions: list[int]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE pruned_versions SET blobs_deleted = 1 WHERE version = ?", [(v,) for v in versions])

    def is_pruned(self, version: int) -> bool:
        return bool(self._query("SELECT 1 FROM pruned_versions WHERE version = ?", (version,)))

    def kept_neighbours(self, version: int) -> tuple[int | None, int | None]:
        """The nearest versions below and above `version` that were not pruned (None where there is none)."""
        below = self._query("SELECT MAX(version) AS v FROM versions WHERE version < ? AND version NOT IN"
                            " (SELECT version FROM pruned_versions)", (version,))[0]["v"]
        above = self._query("SELECT MIN(version) AS v FROM versions WHERE version > ? AND version NOT IN"
                            " (SELECT version FROM pruned_versions)", (version,))[0]["v"]
        return below, above

    def count_pruned(self) -> int:
        return self._query("SELECT COUNT(*) AS n FROM pruned_versions")[0]["n"]
