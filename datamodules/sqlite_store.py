"""The SQLite back end of :mod:`datamodules.recommendation_store`: the embedded default, one file in WAL mode.

Tables: ``versions`` (meta JSON, publish time, fallback list), ``current`` (one row: the served version),
``entries`` (``(version, user) -> [[items], [scores]]`` JSON; its primary key is the (version, user) index) and
``titles``. A lookup is one statement joining ``current`` with ``entries``, so it reads one snapshot: never a mix
of versions. Writers batch rows into ``executemany`` transactions; the publish (pointer switch + pruning) is one
transaction. WAL lets readers go on while a build writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from datamodules.recommendation_store import (
    RecommendationStore,
    StoreError,
    VersionMeta,
    VersionRecord,
    VersionWriter,
    _check_rows,
    _now,
    decode_entry,
    encode_entry,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (version INTEGER PRIMARY KEY AUTOINCREMENT, meta TEXT NOT NULL,
    published_at TEXT, popular TEXT);
CREATE TABLE IF NOT EXISTS current (id INTEGER PRIMARY KEY CHECK (id = 0), version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS entries (version INTEGER NOT NULL, user TEXT NOT NULL, entry TEXT NOT NULL,
    PRIMARY KEY (version, user)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS titles (version INTEGER NOT NULL, item TEXT NOT NULL, title TEXT NOT NULL,
    PRIMARY KEY (version, item)) WITHOUT ROWID;
"""
# The primary key of `entries` is the (version, user) index lookups and pruning use.
_READ = (
    "SELECT c.version, e.entry FROM current c "
    "LEFT JOIN entries e ON e.version = c.version AND e.user = ? WHERE c.id = 0"
)


class SQLiteStore(RecommendationStore):
    """The embedded store: one SQLite file in WAL mode (readers never block the writer, nor it them).

    Args:
        path: the database file (created with its schema when missing).
        keep_versions: see :class:`RecommendationStore`.
        busy_timeout_s: how long a writer waits for another writer's transaction (DDP ranks share the file).
    """

    def __init__(self, path: str | Path, keep_versions: int = 2, busy_timeout_s: float = 120.0) -> None:
        super().__init__(keep_versions)
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connection() as connection:
            connection.executescript(_SCHEMA)

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are not shared across threads)."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                self.path, timeout=self.busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
        return connection

    def begin_version(self, meta: VersionMeta) -> SQLiteWriter:
        cursor = self.connection().execute("INSERT INTO versions (meta) VALUES (?)", (json.dumps(asdict(meta)),))
        return SQLiteWriter(self, int(cursor.lastrowid), meta)

    def attach_version(self, version: int) -> SQLiteWriter:
        row = (
            self.connection()
            .execute("SELECT meta, published_at FROM versions WHERE version = ?", (version,))
            .fetchone()
        )
        if row is None or row[1] is not None:
            raise StoreError(f"{self.url}: version {version} is not a build in progress; cannot write into it")
        return SQLiteWriter(self, version, VersionMeta(**json.loads(row[0])))

    def _record(self, version: int, meta: str, published_at: str | None) -> VersionRecord:
        count = self.connection().execute("SELECT COUNT(*) FROM entries WHERE version = ?", (version,)).fetchone()[0]
        return VersionRecord(version, VersionMeta(**json.loads(meta)), published_at is not None, count, published_at)

    def _current_id(self) -> int | None:
        row = self.connection().execute("SELECT version FROM current WHERE id = 0").fetchone()
        return None if row is None else row[0]

    def versions(self) -> list[VersionRecord]:
        rows = self.connection().execute("SELECT version, meta, published_at FROM versions ORDER BY version").fetchall()
        return [self._record(*row) for row in rows]

    def _read(self, user_id: str) -> tuple[int, str | None] | None:
        return self.connection().execute(_READ, (user_id,)).fetchone()

    def _load_version(self, version: int) -> tuple[VersionRecord, tuple[list[str], list[float]], dict[str, str]]:
        connection = self.connection()
        connection.execute("BEGIN")
        try:
            row = connection.execute(
                "SELECT meta, published_at, popular FROM versions WHERE version = ?", (version,)
            ).fetchone()
            if row is None:
                raise StoreError(f"{self.url}: version {version} was pruned while being read; retry the lookup")
            titles = dict(connection.execute("SELECT item, title FROM titles WHERE version = ?", (version,)).fetchall())
            record = self._record(version, row[0], row[1])
        finally:
            connection.execute("COMMIT")
        return record, decode_entry(row[2]) if row[2] else ([], []), titles

    def close(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None


class SQLiteWriter(VersionWriter):
    """Writes one SQLite version: each :meth:`write` batch is one transaction of ``executemany`` upserts."""

    def __init__(self, store: SQLiteStore, version: int, meta: VersionMeta) -> None:
        super().__init__(version, meta)
        self.store = store

    def _transaction(self, statements: list[tuple[str, Any]]) -> None:
        connection = self.store.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            for sql, rows in statements:
                connection.executemany(sql, rows) if isinstance(rows, list) else connection.execute(sql, rows)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def write(self, users: Sequence[str], items: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> None:
        _check_rows(users, items, scores, self.meta.k)
        rows = [
            (self.version, str(user), encode_entry(row, row_scores))
            for user, row, row_scores in zip(users, items, scores, strict=False)
        ]
        self._transaction([("INSERT OR REPLACE INTO entries (version, user, entry) VALUES (?, ?, ?)", rows)])

    def set_popular(self, items: Sequence[str], scores: Sequence[float]) -> None:
        self._transaction(
            [("UPDATE versions SET popular = ? WHERE version = ?", (encode_entry(items, scores), self.version))]
        )

    def set_titles(self, titles: Mapping[str, str]) -> None:
        rows = [(self.version, str(item), str(title)) for item, title in titles.items()]
        self._transaction([("INSERT OR REPLACE INTO titles (version, item, title) VALUES (?, ?, ?)", rows)])

    def publish(self) -> VersionRecord:
        connection = self.store.connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            row = connection.execute("SELECT published_at FROM versions WHERE version = ?", (self.version,)).fetchone()
            if row is None or row[0] is not None:
                raise StoreError(
                    f"{self.store.url}: version {self.version} was discarded or already published "
                    "(a newer build published meanwhile); run the build again"
                )
            connection.execute("UPDATE versions SET published_at = ? WHERE version = ?", (_now(), self.version))
            connection.execute("INSERT OR REPLACE INTO current (id, version) VALUES (0, ?)", (self.version,))
            kept = [
                version
                for (version,) in connection.execute(
                    "SELECT version FROM versions WHERE published_at IS NOT NULL ORDER BY version DESC LIMIT ?",
                    (self.store.keep_versions,),
                )
            ]
            # pruned: older published versions beyond the kept ones, and abandoned builds older than this one
            stale = [
                version
                for (version,) in connection.execute(
                    f"SELECT version FROM versions WHERE version NOT IN ({','.join('?' * len(kept))}) AND "
                    "(published_at IS NOT NULL OR version < ?)",
                    (*kept, self.version),
                )
            ]
            for table in ("entries", "titles", "versions"):
                connection.executemany(f"DELETE FROM {table} WHERE version = ?", [(version,) for version in stale])
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return self.store.current_version()

    def abort(self) -> None:
        self._transaction(
            [(f"DELETE FROM {table} WHERE version = ?", (self.version,)) for table in ("entries", "titles", "versions")]
        )
