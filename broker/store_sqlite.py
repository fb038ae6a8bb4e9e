"""`SqliteStore`: the `Store` on SQLite in WAL mode, in a locked data directory, with one
writer thread that group-commits batches and one reader thread for queues.
See docs/architecture.md, "The store".

Theory of operation: `submit` appends to a list and wakes the writer. The writer takes every
batch waiting, applies them in one transaction (each under its own savepoint, so a rejected
batch leaves the others alone), commits once, and then calls their callbacks in order: the
commit is the moment a promise may be made. A failed commit fails every batch of its group
with `StoreUnavailable`, and the next group tries again. A read carries the number of batches
submitted before it and waits until the writer has finished that many, so it sees them.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import structlog

from tether.broker.store import (
    Batch,
    BatchRejected,
    OnDone,
    OnRead,
    Snapshot,
    StoreClosed,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreUnavailable,
)
from tether.broker.store_schema import MIGRATIONS, Connect, Migration, connect, open_database
from tether.broker.store_sql import apply_batch, read_entries, read_snapshot

__all__ = ["DB_NAME", "LOCK_NAME", "SqliteStore"]

DB_NAME = "tether.db"
LOCK_NAME = "lock"

_log = structlog.get_logger("tether.store")
# Errors caused by what a batch holds rather than by the disk: they reject that batch only.
_BATCH_FAULTS = (
    BatchRejected,
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.DataError,
    TypeError,
    ValueError,
    OverflowError,
)


class FileMoved(OSError):
    """SQLite goes on writing to a deleted or replaced file, so the writer checks for it."""


def _make_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        return
    directory.chmod(0o700)  # mkdir's mode is filtered by the umask


def _lock(path: Path) -> int:
    """Hold `path` with `flock` (released by the kernel if this process dies), holding our
    pid; raises `StoreLocked` naming the holder's."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreCorrupt(str(path), exc.strerror or str(exc)) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise StoreLocked(str(path.parent), int(text) if text.isdigit() else None) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# Commits between two background checkpoints (a commit is a group of batches, a few pages),
# and the WAL's size in pages at which the writer checkpoints the rest itself (16 MiB).
CHECKPOINT_EVERY = 200
WAL_RESET_PAGES = 4000


class SqliteStore:
    """The store in `directory` (created 0700), `sync` being SQLite's `synchronous`: "full"
    survives power loss, "normal" a process crash. Raises `StoreLocked`, `StoreCorrupt` or
    `StoreVersionError` when it cannot open; an older schema is migrated in place. `check`
    reads every page at open (SQLite's `quick_check`: 0.1 s for 1,000,000 queued messages).
    `on_commit(seconds)` is called by the writer thread after each group commit, with the time
    it took (the metrics' histogram); it must not block."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        sync: Literal["full", "normal"] = "full",
        connect: Connect = connect,
        migrations: Sequence[Migration] = MIGRATIONS,
        check: bool = True,
        on_commit: Callable[[float], None] | None = None,
    ) -> None:
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', got {sync!r}")
        self.directory = Path(directory)
        self.path = str(self.directory / DB_NAME)
        try:
            _make_dir(self.directory)
        except OSError as exc:
            raise StoreCorrupt(str(self.directory), exc.strerror or str(exc)) from exc
        self._lock_fd = _lock(self.directory / LOCK_NAME)
        try:
            self._db, found = open_database(
                self.path, sync=sync, connect=connect, migrations=migrations, check=check
            )
            self._inode = self._stat()
            # Checkpoints copy the WAL into the database file and fsync it: tens of ms on a busy
            # disk. Run by the committing connection (SQLite's default, every 1,000 pages) they
            # delay every answer waiting on that commit, so a thread of its own copies the WAL
            # back, passively (never blocking the writer), after every CHECKPOINT_EVERY commits.
            # A passive checkpoint never catches a busy writer, though, and only a checkpoint
            # that did can let the WAL start over; so the writer still checkpoints itself when
            # the WAL reaches WAL_RESET_PAGES, by then cheaply: there is little left to copy.
            self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_RESET_PAGES:d}")
            try:
                self._reader = connect(self.path)
                self._reader.execute("PRAGMA query_only = ON")
                self._checkpointer = connect(self.path)
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.commits = 0  # transactions committed: one per group of batches
        self.on_commit = on_commit
        # Set by the writer when a commit fails, cleared by the next good one (a str: atomic
        # to read from another thread).
        self._failing: str | None = None
        self._mutex = threading.Lock()
        self._work = threading.Condition(self._mutex)  # the writer waits for batches
        self._progress = threading.Condition(self._mutex)  # readers wait for the writer
        self._queue: list[tuple[Batch, OnDone]] = []
        self._submitted = 0
        self._finished = 0
        self._reads: deque[tuple[int, Callable[[sqlite3.Connection], None]]] = deque()
        self._closing = False
        self._checkpoint_due = False
        self._checkpoint = threading.Condition(self._mutex)  # the checkpointer waits for work
        self._faults: set[str] = set()
        self._writer = threading.Thread(target=self._write_loop, name="tether-store", daemon=True)
        self._reader_thread = threading.Thread(
            target=self._read_loop, name="tether-store-read", daemon=True
        )
        self._checkpoint_thread = threading.Thread(
            target=self._checkpoint_loop, name="tether-store-checkpoint", daemon=True
        )
        self._writer.start()
        self._reader_thread.start()
        self._checkpoint_thread.start()
        version = len(migrations)
        _log.info("store_opened", path=self.path, sync=sync, version=version, version_found=found)

    # --- the interface ------------------------------------------------------------------------

    def submit(self, batch: Batch, on_done: OnDone) -> None:
        with self._mutex:
            if self._closing:
                raise StoreClosed()
            self._queue.append((batch, on_done))
            self._submitted += 1
            if len(self._queue) == 1:
                self._work.notify()

    def read_queue(
        self, session_id: str, topic: str, after_seq: int, limit: int, on_done: OnRead
    ) -> None:
        def read(conn: sqlite3.Connection) -> None:
            try:
                entries = read_entries(conn, session_id, topic, after_seq, limit)
            except sqlite3.Error as exc:
                self._call(on_done, (), StoreUnavailable(exc))
                return
            self._call(on_done, entries, None)

        self._read(read)

    def load(self) -> Snapshot:
        done = threading.Event()
        result: list[Snapshot | BaseException] = []

        def read(conn: sqlite3.Connection) -> None:
            try:
                result.append(read_snapshot(conn))
            except sqlite3.DatabaseError as exc:
                result.append(StoreCorrupt(self.path, str(exc)))
            except BaseException as exc:  # handed to the caller's thread below
                result.append(exc)
            done.set()

        self._read(read)
        done.wait()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def close(self) -> None:
        """Commit what was submitted, answer its callbacks and pending reads, checkpoint and
        close the file, release the lock. Idempotent; not from a callback."""
        with self._mutex:
            if self._closing:
                return
            self._closing = True
            self._work.notify_all()
            self._progress.notify_all()
            self._checkpoint.notify_all()
        self._writer.join()
        self._reader_thread.join()
        self._checkpoint_thread.join()
        self._reader.close()
        self._checkpointer.close()
        # The last connection to close checkpoints the WAL into the database file.
        try:
            self._db.close()
        finally:
            os.close(self._lock_fd)
        _log.info("store_closed", path=self.path, commits=self.commits)

    @property
    def failing(self) -> str | None:
        return self._failing

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the writer ---------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._mutex:
                while not self._queue and not self._closing:
                    self._work.wait()
                if not self._queue:
                    return
                group, self._queue = self._queue, []
            outcomes = self._commit([batch for batch, _ in group])
            with self._mutex:
                self._finished += len(group)
                self._progress.notify_all()
                if self.commits % CHECKPOINT_EVERY == 0 and not self._checkpoint_due:
                    self._checkpoint_due = True
                    self._checkpoint.notify()
            for (_, on_done), outcome in zip(group, outcomes, strict=True):
                self._call(on_done, outcome)

    def _commit(self, group: list[Batch]) -> list[StoreError | None]:
        db = self._db
        outcomes: list[StoreError | None] = []
        started = time.perf_counter()
        try:
            if self._stat() != self._inode:
                raise FileMoved(f"{self.path} was deleted or replaced")
            db.execute("BEGIN")
            for batch in group:
                db.execute("SAVEPOINT batch")
                try:
                    apply_batch(db, batch)
                except _BATCH_FAULTS as exc:
                    db.execute("ROLLBACK TO batch")
                    outcomes.append(
                        exc if isinstance(exc, BatchRejected) else BatchRejected(None, str(exc))
                    )
                else:
                    outcomes.append(None)
                db.execute("RELEASE batch")
            db.execute("COMMIT")
        except Exception as exc:  # every batch of the group fails; the store carries on
            self._rollback()
            self._fault(exc)
            self._failing = str(exc) or type(exc).__name__
            return [StoreUnavailable(exc)] * len(group)
        self.commits += 1
        self._failing = None
        if self.on_commit is not None:
            self._call(self.on_commit, time.perf_counter() - started)
        if self._faults:
            _log.info("store_recovered", path=self.path, faults=sorted(self._faults))
            self._faults.clear()
        return outcomes

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _rollback(self) -> None:
        # SQLite rolls back by itself after some errors (SQLITE_FULL, SQLITE_IOERR).
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                self._fault(exc)

    def _fault(self, exc: BaseException) -> None:
        """Log a kind of fault once, until a commit succeeds again (not once per batch)."""
        kind = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        if kind not in self._faults:
            self._faults.add(kind)
            _log.error(
                "store_fault",
                path=self.path,
                kind=kind,
                cause=str(exc),
                exc_info=not isinstance(exc, sqlite3.Error | OSError),
            )

    # --- the reader ---------------------------------------------------------------------------

    def _read(self, job: Callable[[sqlite3.Connection], None]) -> None:
        with self._mutex:
            if self._closing:
                raise StoreClosed()
            self._reads.append((self._submitted, job))
            if len(self._reads) == 1:
                self._progress.notify_all()

    def _checkpoint_loop(self) -> None:
        while True:
            with self._mutex:
                while not self._checkpoint_due and not self._closing:
                    self._checkpoint.wait()
                if self._closing:
                    return  # closing the last connection checkpoints
                self._checkpoint_due = False
            try:
                # Fetched, so the statement ends and holds no read snapshot of the WAL.
                self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                # The next one retries; a store that cannot checkpoint still commits (the WAL
                # grows), and a real disk fault shows in the writer's commits.
                self._fault(exc)

    def _read_loop(self) -> None:
        while True:
            with self._mutex:
                while not self._reads and not self._closing:
                    self._progress.wait()
                if not self._reads:
                    return
                after, job = self._reads.popleft()
                # Every batch submitted before the read is committed (or failed) first.
                while self._finished < after:
                    self._progress.wait()
            job(self._reader)

    @staticmethod
    def _call(callback: Callable[..., None], *args: object) -> None:
        try:
            callback(*args)
        except Exception:  # a caller's bug must not stop the writer or the reader
            _log.exception("store_callback_failed", callback=repr(callback))
