"""On-disk score cache: ``key -> metric value`` in SQLite, so a rerun re-scores nothing.

Keys are opaque hex digests built by the scorer (model, data, subset, metric, candidate).
Each insert is committed at once in WAL mode, so an interrupted run loses at most the
score being written, and several processes may share one file.

A cache is a speed-up, never a reason to fail: a file that cannot be opened or fails SQLite's
integrity check at open, or that fails mid-run (disk full, I/O error), is switched off with one
warning and the run goes on without it (``failed`` says why).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from pathlib import Path

import platformdirs


logger = logging.getLogger(__name__)

FILE_NAME = "scores.sqlite"


class ScoreCache:
    """A persistent ``str -> float`` map in one SQLite file.

    Args:
        path: the SQLite file (created with its folder if missing); an existing directory
            means ``path / scores.sqlite``.

    A file that cannot be created, or is not a sound SQLite database, switches the cache off
    (one warning) instead of failing the run.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        self.path = path
        self.hits = 0
        self.misses = 0
        self.failed: str | None = None
        self._conn: sqlite3.Connection | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit (isolation_level=None): every put is its own durable transaction
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                str(path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL NOT NULL, created REAL NOT NULL)")
            check = self._conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
        except (OSError, sqlite3.Error) as exc:
            self._switch_off(exc, "at open", hint="delete it or pass --cache DIR elsewhere")
            return
        logger.debug("score cache at %s", path)

    @staticmethod
    def default_path() -> Path:
        """``<user cache dir>/onnxws/scores.sqlite`` (platformdirs)."""
        return Path(platformdirs.user_cache_dir("onnxws")) / FILE_NAME

    def _switch_off(self, exc: BaseException, when: str, hint: str = "its scores are not used") -> None:
        self.failed = f"{type(exc).__name__}: {exc}"
        logger.warning("score cache %s failed %s (%s); the run goes on without it (%s)", self.path, when, self.failed,
                       hint)
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"score cache {self.path} is closed")
        return self._conn

    def get(self, key: str) -> float | None:
        """The stored value for ``key``, or None (also once the cache is switched off)."""
        if self.failed is not None:
            return None
        try:
            row = self._connection().execute("SELECT value FROM scores WHERE key = ?", (key,)).fetchone()
        except (OSError, sqlite3.Error) as exc:
            self._switch_off(exc, "mid-run")
            return None
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
        if self.failed is not None:
            return
        try:
            self._connection().execute(
                "INSERT OR REPLACE INTO scores (key, value, created) VALUES (?, ?, ?)", (key, value, time.time())
            )
        except (OSError, sqlite3.Error) as exc:
            self._switch_off(exc, "mid-run")

    def __len__(self) -> int:
        return 0 if self.failed is not None else int(self._connection().execute("SELECT COUNT(*) FROM scores").fetchone()[0])

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
