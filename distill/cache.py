"""Persistent cache of teacher answers: every answer paid for is written to disk at once.

One SQLite file in WAL mode, one transaction per ``put``: a run killed with SIGKILL half-way keeps
every answer it already received, and the next run asks only for the missing ones. Rows are keyed
by :func:`cache_key`, the sha256 of the canonical JSON of the *full* request (model, endpoint or
local model identity, messages, every decoding parameter, seed and sample index). The API key is
never part of a key or a row: callers build the payload without it.

Torch-free; safe to call from the event loop and from worker threads (one connection, one lock).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Self

from edgedistill.errors import UserError
from edgedistill.manifest import compact_json

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""


def cache_key(payload: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a full request payload (which must hold no secret)."""
    return hashlib.sha256(compact_json(payload).encode("utf-8")).hexdigest()


class ResponseCache:
    """Key -> (request, response) rows in one SQLite file.

    ``get`` returns the stored response dict or None; ``put`` commits immediately (insert or
    replace). ``stats`` counts this process's hits, misses and puts.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.puts = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: autocommit; each put is its own explicit transaction.
            self._conn = sqlite3.connect(str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsynced at every commit (an answer costs far more than an fsync).
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise UserError(
                f"teacher cache {self.path} cannot be opened ({e}); delete it or move it away to start a new cache"
            ) from None
        except OSError as e:
            raise UserError(f"teacher cache {self.path} cannot be created ({e.strerror or e}); check the output folder") from None

    # --- access ------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return json.loads(row[0])

    def get_request(self, key: str) -> dict[str, Any] | None:
        """The request payload stored with a key (for inspection and debugging)."""
        with self._lock:
            row = self._conn.execute("SELECT request FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        req, resp = compact_json(request), compact_json(response)
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(
                    "INSERT OR REPLACE INTO responses (key, request, response, created_at) VALUES (?, ?, ?, ?)",
                    (key, req, resp, time.time()),
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            self.puts += 1

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone() is not None

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    @property
    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path), "entries": len(self), "hits": self.hits, "misses": self.misses, "puts": self.puts}

    # --- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"
