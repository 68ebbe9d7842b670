"""The durable outbox: events the broker has not confirmed, in SQLite, in arrival order.

Every write is a transaction with `synchronous=FULL` (a committed event survives a
power cut, not only a crash) and runs on one dedicated thread, so the event loop
never waits on an fsync. Concurrent appends are committed together (group commit):
while one transaction is being written the next ones queue, and all of them share
the next fsync. The file is locked (`flock`) by one sidecar at a time.

Size-bounded: an append that would pass `max_bytes` raises `SpoolFull`; nothing
already spooled is ever dropped to make room.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sidecar.events.cloudevents import Event
from sidecar.telemetry.logging import get_logger

log = get_logger("sidecar.events")

T = TypeVar("T")

#: Bytes counted per event on top of its body and headers (row and index overhead).
ROW_OVERHEAD = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    id TEXT NOT NULL,
    content_type TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    time REAL NOT NULL,
    spooled_at REAL NOT NULL,
    unroutable INTEGER NOT NULL DEFAULT 0
)
"""


class SpoolError(Exception):
    """The spool cannot be used (locked by another sidecar, unwritable, corrupt)."""


class SpoolFull(SpoolError):
    """Appending would pass `events.spool.max_bytes`."""


def event_size(event: Event) -> int:
    return len(event.body) + len(json.dumps(event.headers)) + ROW_OVERHEAD


class Spool:
    """See the module docstring. `open()` before use, `close()` at the end."""

    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.depth = 0
        self.bytes = 0
        self.topics: Counter[str] = Counter()  # spooled events per topic
        self._unroutable: set[int] = set()  # seqs of spooled events the broker returned
        self.last_seq = 0
        self.error: str | None = None  # the last write error, None once a write succeeds
        self._oldest: float | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        self._pending: list[tuple[Event, asyncio.Future[None]]] = []
        self._flushing = False
        self._idle: asyncio.Event | None = None  # set when no flush is running

    # --- life -------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open)
        log.info(
            "spool_opened",
            path=self.path,
            events=self.depth,
            bytes=self.bytes,
            max_bytes=self.max_bytes,
            unroutable=self.unroutable,
        )

    def _open(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot create the spool at {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SpoolError(
                f"spool {self.path} is in use by another sidecar (locked); give each sidecar "
                "its own events.spool.path"
            ) from None
        self._lock_fd = fd
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            db.execute(_SCHEMA)
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(body) + LENGTH(headers)), 0), "
                "COALESCE(MAX(seq), 0), MIN(spooled_at) FROM events"
            ).fetchone()
            topics = db.execute("SELECT topic, COUNT(*) FROM events GROUP BY topic").fetchall()
            returned = db.execute("SELECT seq FROM events WHERE unroutable = 1").fetchall()
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open the spool {self.path}: {exc}") from None
        self._db = db
        self.depth, raw_bytes, self.last_seq, self._oldest = row
        self._unroutable = {seq for (seq,) in returned}
        self.bytes = raw_bytes + ROW_OVERHEAD * self.depth
        self.topics = Counter(dict(topics))

    async def close(self) -> None:
        if self._flushing:
            self._idle = asyncio.Event()
            await self._idle.wait()
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # --- writing ----------------------------------------------------------------------

    def reserve(self, event: Event) -> None:
        """Count `event` in now (raises SpoolFull), so concurrent appends cannot overshoot."""
        size = event_size(event)
        if self.bytes + size > self.max_bytes:
            raise SpoolFull(
                f"the spool holds {self.bytes} of {self.max_bytes} bytes; this event needs "
                f"{size} more"
            )
        self.bytes += size
        self.depth += 1
        self.topics[event.topic] += 1
        if self._oldest is None:
            self._oldest = time.time()

    async def append(self, event: Event) -> None:
        """Commit `event` durably (after `reserve`); raises SpoolError if it could not be."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        try:
            await asyncio.shield(future)
        except SpoolError:
            self._forget([event])
            raise

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    await self._run(self._insert, [e for e, _ in batch])
                except SpoolError as exc:
                    self.error = str(exc)
                    log.error("spool_write_failed", error=str(exc), events=len(batch))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(SpoolError(str(exc)))
                    continue
                self.error = None
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flushing = False
            if self._idle is not None:
                self._idle.set()

    def _insert(self, events: Sequence[Event]) -> None:
        db = self._require()
        now = time.time()
        rows = [
            (e.seq, e.topic, e.id, e.content_type, json.dumps(e.headers), e.body, e.time, now)
            for e in events
        ]
        try:
            with _transaction(db):
                db.executemany(
                    "INSERT INTO events "
                    "(seq, topic, id, content_type, headers, body, time, spooled_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot write to the spool {self.path}: {exc}") from None

    def _forget(self, events: Iterable[Event]) -> None:
        for event in events:
            self._unroutable.discard(event.seq)
            self.bytes -= event_size(event)
            self.depth -= 1
            self.topics[event.topic] -= 1
            if self.topics[event.topic] <= 0:
                del self.topics[event.topic]
        if self.depth <= 0:
            self.depth, self.bytes, self._oldest = 0, 0, None

    # --- draining ---------------------------------------------------------------------

    async def head(self, limit: int, skip_topics: Iterable[str] = ()) -> list[Event]:
        """The oldest `limit` events in arrival order, leaving out `skip_topics`."""
        return await self._run(self._head, limit, tuple(skip_topics))

    def _head(self, limit: int, skip: tuple[str, ...]) -> list[Event]:
        db = self._require()
        where = f"WHERE topic NOT IN ({','.join('?' * len(skip))})" if skip else ""
        rows = db.execute(
            "SELECT seq, topic, id, content_type, headers, body, time FROM events "
            f"{where} ORDER BY seq LIMIT ?",
            (*skip, limit),
        ).fetchall()
        return [
            Event(
                id=row[2],
                topic=row[1],
                content_type=row[3],
                body=bytes(row[5]),
                headers=json.loads(row[4]),
                time=row[6],
                seq=row[0],
            )
            for row in rows
        ]

    async def delete(self, events: Sequence[Event]) -> None:
        """Remove confirmed events (one transaction)."""
        if not events:
            return
        await self._run(self._delete, [e.seq for e in events])
        self._forget(events)
        if self.depth:
            self._oldest = await self._run(self._oldest_time)

    def _delete(self, seqs: list[int]) -> None:
        db = self._require()
        try:
            with _transaction(db):
                db.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in seqs])
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot delete from the spool {self.path}: {exc}") from None

    def _oldest_time(self) -> float | None:
        row = self._require().execute("SELECT MIN(spooled_at) FROM events").fetchone()
        return None if row is None else row[0]

    @property
    def unroutable(self) -> int:
        """Spooled events whose last publish the broker returned (no queue bound)."""
        return len(self._unroutable)

    async def mark_unroutable(self, event: Event) -> None:
        if event.seq in self._unroutable:
            return
        await self._run(self._mark, event.seq)
        self._unroutable.add(event.seq)

    def _mark(self, seq: int) -> None:
        db = self._require()
        with _transaction(db):
            db.execute("UPDATE events SET unroutable = 1 WHERE seq = ? AND unroutable = 0", (seq,))

    # --- state ------------------------------------------------------------------------

    @property
    def oldest_age(self) -> float | None:
        return None if self._oldest is None or not self.depth else time.time() - self._oldest

    @property
    def writable(self) -> bool:
        return self._db is not None and self.error is None

    def status(self) -> dict[str, Any]:
        age = self.oldest_age
        return {
            "path": self.path,
            "depth": self.depth,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "oldest_age_s": None if age is None else round(age, 3),
            "unroutable": self.unroutable,
            "topics": dict(self.topics),
            "writable": self.writable,
            "last_error": self.error,
        }

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"the spool {self.path} is not open")
        return self._db

    def __repr__(self) -> str:
        return f"<Spool {self.path} depth={self.depth} bytes={self.bytes}/{self.max_bytes}>"


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
