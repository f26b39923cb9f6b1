"""Aggregates over every committed visit (how many, by scope and by client, and the bytes they moved),
kept in two small tables that each commit updates in its own transaction.

Status reads them on every call: summing the visits table instead would cost a pass over the whole run's
history each time. The tables hold one row per scope (a visit's `block_index`) and one per client, so
reading them costs the same after ten visits or a million. A database from before they existed is summed
up once, when it is opened (`ensure`)."""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from fedcybgd.server.records import VisitStats

SCHEMA = """
CREATE TABLE IF NOT EXISTS visit_scope_totals (
    block_index INTEGER PRIMARY KEY, visits INTEGER NOT NULL, last_version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS visit_client_totals (
    client_id TEXT PRIMARY KEY, visits INTEGER NOT NULL, bytes_down INTEGER NOT NULL, bytes_up INTEGER NOT NULL);
"""

#: Meta key set once the totals hold every visit.
META_KEY = "visit_totals"


@dataclass(frozen=True)
class ScopeTotals:
    """The visits of one scope (a visit's `block_index`: a block, or ALL_BLOCKS for a whole-model round)."""

    block_index: int
    visits: int
    last_version: int         # the newest version a visit of this scope produced


@dataclass(frozen=True)
class ClientTotals:
    """The visits one client made (a visit's `client_id`) and the bytes they moved."""

    client_id: str
    visits: int
    bytes_down: int
    bytes_up: int


@dataclass(frozen=True)
class VisitTotals:
    """Every committed visit, summed up by scope and by client."""

    scopes: tuple[ScopeTotals, ...]
    clients: tuple[ClientTotals, ...]

    @property
    def visits(self) -> int:
        return sum(c.visits for c in self.clients)

    @property
    def bytes_down(self) -> int:
        return sum(c.bytes_down for c in self.clients)

    @property
    def bytes_up(self) -> int:
        return sum(c.bytes_up for c in self.clients)

    def of_client(self, client_id: str) -> int:
        return next((c.visits for c in self.clients if c.client_id == client_id), 0)


def add_visit(db: sqlite3.Connection, client_id: str, block_index: int, new_version: int,
              record: VisitStats) -> None:
    """Count one visit, inside the transaction that inserts it (so the totals never disagree with it)."""
    db.execute(
        "INSERT INTO visit_scope_totals (block_index, visits, last_version) VALUES (?, 1, ?)"
        " ON CONFLICT (block_index) DO UPDATE SET visits = visits + 1,"
        " last_version = MAX(last_version, excluded.last_version)",
        (block_index, new_version),
    )
    db.execute(
        "INSERT INTO visit_client_totals (client_id, visits, bytes_down, bytes_up) VALUES (?, 1, ?, ?)"
        " ON CONFLICT (client_id) DO UPDATE SET visits = visits + 1,"
        " bytes_down = bytes_down + excluded.bytes_down, bytes_up = bytes_up + excluded.bytes_up",
        (client_id, record.bytes_down, record.bytes_up),
    )


def needs_summing(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM meta WHERE key = ?", (META_KEY,)).fetchone() is None


def sum_up(db: sqlite3.Connection) -> None:
    """Fill the totals from the visits table in one streamed pass (a database older than the totals),
    inside the caller's transaction, and mark them complete."""
    db.execute("DELETE FROM visit_scope_totals")
    db.execute("DELETE FROM visit_client_totals")
    rows = db.execute("SELECT client_id, block_index, new_version, record FROM visits ORDER BY round")
    while batch := rows.fetchmany(1000):
        for client_id, block_index, new_version, record in batch:
            add_visit(db, client_id, block_index, new_version, VisitStats.from_json(record))
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, '1')", (META_KEY,))


def read(db: sqlite3.Connection) -> VisitTotals:
    """The totals (the caller holds the lock that keeps the two tables' reading consistent)."""
    scopes = db.execute("SELECT block_index, visits, last_version FROM visit_scope_totals ORDER BY block_index")
    clients = db.execute("SELECT client_id, visits, bytes_down, bytes_up FROM visit_client_totals ORDER BY client_id")
    return VisitTotals(scopes=tuple(ScopeTotals(*r) for r in scopes.fetchall()),
                       clients=tuple(ClientTotals(*r) for r in clients.fetchall()))
