"""The SQLite store's schema, its migrations (`PRAGMA user_version`), and opening a database
file without writing to one that is corrupt, foreign or newer. See docs/architecture.md,
"The store"."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tether.broker.store import StoreCorrupt, StoreVersionError

__all__ = [
    "MIGRATIONS",
    "Connect",
    "Migration",
    "check_version",
    "connect",
    "migrate",
    "open_database",
]

_MAGIC = b"SQLite format 3\x00"


@dataclass(frozen=True, slots=True)
class Migration:
    """The statements that take a store from `version - 1` to `version`."""

    version: int
    statements: tuple[str, ...]


# Version 1. Messages are keyed by (sub_id, seq) in a WITHOUT ROWID table: one B-tree in
# seq order per subscription, so a queue is read back with one range scan and a cumulative
# ack is one range delete. The small integer sub_id keeps the key short (a session id is 22
# characters); the subscriptions table maps (session_id, topic) to it.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        (
            """CREATE TABLE sessions (
                session_id TEXT PRIMARY KEY,
                client_id TEXT NOT NULL,
                username TEXT NOT NULL,
                keepalive INTEGER NOT NULL,
                metadata BLOB NOT NULL,
                token_hash BLOB NOT NULL,
                previous_hash BLOB,
                created REAL NOT NULL,
                last_seen REAL NOT NULL,
                expires_at REAL,
                health TEXT,
                health_details BLOB
            ) WITHOUT ROWID""",
            """CREATE TABLE subscriptions (
                sub_id INTEGER PRIMARY KEY,
                session_id TEXT NOT NULL,
                topic TEXT NOT NULL,
                active INTEGER NOT NULL,
                next_seq INTEGER NOT NULL,
                sent_upto INTEGER NOT NULL DEFAULT 0,
                dropped_live INTEGER NOT NULL DEFAULT 0,
                dropped_away INTEGER NOT NULL DEFAULT 0,
                UNIQUE (session_id, topic)
            )""",
            """CREATE TABLE messages (
                sub_id INTEGER NOT NULL,
                seq INTEGER NOT NULL,
                payload BLOB NOT NULL,
                PRIMARY KEY (sub_id, seq)
            ) WITHOUT ROWID""",
        ),
    ),
)

Connect = Callable[[str], sqlite3.Connection]


def connect(path: str) -> sqlite3.Connection:
    """A connection as the store uses it: transactions by hand, usable from its own thread."""
    return sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )


def check_version(conn: sqlite3.Connection, path: str, supported: int) -> int:
    """The store's schema version, read without writing. Raises `StoreVersionError` for a
    newer store, `StoreCorrupt` for an SQLite database that is not a Tether store."""
    # Reading the schema is the first touch of the pages: a damaged file fails here.
    tables: int = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    found: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > supported:
        raise StoreVersionError(found, supported)
    if found == 0 and tables:
        raise StoreCorrupt(path, "an SQLite database, but not a Tether store (no version)")
    return found


def migrate(conn: sqlite3.Connection, path: str, migrations: Sequence[Migration]) -> int:
    """Bring the schema to the last of `migrations`, in one transaction; returns the version
    found. Raises as `check_version` does."""
    supported = len(migrations)
    if [m.version for m in migrations] != list(range(1, supported + 1)):
        raise ValueError("migrations must be numbered 1, 2, ... in order")
    found = check_version(conn, path, supported)
    if found == supported:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        for migration in migrations[found:]:
            for statement in migration.statements:
                conn.execute(statement)
        # user_version lives in the file's header, inside the same transaction.
        conn.execute(f"PRAGMA user_version = {supported:d}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found


def _check_file(path: str) -> None:
    """Refuse, before SQLite sees it, a file that is not an SQLite database."""
    try:
        with open(path, "rb") as f:
            header = f.read(len(_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreCorrupt(path, exc.strerror or str(exc)) from exc
    if header and header != _MAGIC:
        raise StoreCorrupt(path, "not an SQLite database")


def open_database(
    path: str,
    *,
    sync: str,
    connect: Connect = connect,
    migrations: Sequence[Migration] = MIGRATIONS,
    check: bool = True,
) -> tuple[sqlite3.Connection, int]:
    """Open (creating if need be) and migrate the store at `path`, in WAL mode with the given
    `synchronous` level; returns the connection and the version found (0: new).

    Nothing is written until the file has been read as a Tether store this code can handle:
    the header, the schema, the version and (with `check`) every page's structure, SQLite's
    `quick_check`, are checked first, so a corrupt or newer file is left as it was."""
    _check_file(path)
    try:
        conn = connect(path)
    except sqlite3.Error as exc:
        raise StoreCorrupt(path, str(exc)) from exc
    try:
        try:
            # Checked before the first write (switching to WAL mode is one).
            check_version(conn, path, len(migrations))
            if check:
                problems = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
                if problems != "ok":
                    raise StoreCorrupt(path, problems)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreCorrupt(path, f"cannot use WAL mode (got {mode})")
            conn.execute(f"PRAGMA synchronous = {sync.upper()}")
            found = migrate(conn, path, migrations)
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(path, str(exc)) from exc
    except BaseException:
        conn.close()
        raise
    if found == 0:
        os.chmod(path, 0o600)
    return conn, found
