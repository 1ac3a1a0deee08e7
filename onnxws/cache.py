"""On-disk score cache: ``key -> metric value`` in SQLite, so a rerun re-scores nothing.

Keys are opaque hex digests built by the scorer (model, data, subset, metric, candidate).
Each insert is committed at once in WAL mode, so an interrupted run loses at most the
score being written, and several processes may share one file.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from pathlib import Path

import platformdirs

from onnxws.errors import InputError

logger = logging.getLogger(__name__)

FILE_NAME = "scores.sqlite"


class ScoreCache:
    """A persistent ``str -> float`` map in one SQLite file.

    Args:
        path: the SQLite file (created with its folder if missing); an existing directory
            means ``path / scores.sqlite``.

    Raises:
        InputError: the file cannot be created or is not a usable SQLite database.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level=None): every put is its own durable transaction
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                str(path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL, created REAL NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise InputError(f"score cache {path} is not usable ({type(exc).__name__}: {exc}); delete it, pass --cache DIR elsewhere, or --no-cache") from exc
        self.hits = 0
        self.misses = 0
        logger.debug("score cache at %s", path)

    @staticmethod
    def default_path() -> Path:
        """``<user cache dir>/onnxws/scores.sqlite`` (platformdirs)."""
        return Path(platformdirs.user_cache_dir("onnxws")) / FILE_NAME

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"score cache {self.path} is closed")
        return self._conn

    def get(self, key: str) -> float | None:
        """The stored value for ``key``, or None."""
        row = self._connection().execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return float(row[0])

    def put(self, key: str, value: float) -> None:
        """Store ``value`` (finite or infinite, not NaN) under ``key``, committed at once."""
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"score cache: refusing to store NaN for key {key[:16]}...")
        self._connection().execute(
            "INSERT OR REPLACE INTO scores (key, value, created) VALUES (?, ?, ?)", (key, value, time.time())
        )

    def __len__(self) -> int:
        return int(self._connection().execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ScoreCache({str(self.path)!r})"
