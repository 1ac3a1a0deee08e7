"""Score cache: persistence across opens, interrupted runs, bad files."""

from __future__ import annotations

import math
import sqlite3

import platformdirs
import pytest

from onnxws.cache import ScoreCache
from onnxws.errors import InputError


def test_put_get_and_persist(tmp_path):
    path = tmp_path / "sub" / "scores.sqlite"
    with ScoreCache(path) as cache:
        assert cache.get("a") is None
        cache.put("a", 0.9875)
        cache.put("b", -math.inf)
        cache.put("a", 0.5)  # replaced
        assert cache.get("a") == 0.5
        assert len(cache) == 2
        assert (cache.hits, cache.misses) == (1, 1)
    with ScoreCache(path) as again:
        assert again.get("a") == 0.5
        assert again.get("b") == -math.inf


def test_every_put_is_committed_at_once(tmp_path):
    path = tmp_path / "scores.sqlite"
    cache = ScoreCache(path)
    cache.put("k", 0.25)
    # another connection (another process after a crash) sees it without close()
    with sqlite3.connect(str(path)) as other:
        assert other.execute("SELECT value FROM scores WHERE key='k'").fetchone() == (0.25,)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        cache.get("k")


def test_directory_means_scores_sqlite_inside(tmp_path):
    cache = ScoreCache(tmp_path)
    assert cache.path == tmp_path / "scores.sqlite"
    cache.close()


def test_nan_is_refused(tmp_path):
    with ScoreCache(tmp_path / "s.sqlite") as cache, pytest.raises(ValueError, match="NaN"):
        cache.put("k", float("nan"))


def test_default_path():
    path = ScoreCache.default_path()
    assert path.name == "scores.sqlite"
    assert str(path.parent) == platformdirs.user_cache_dir("onnxws")


def test_corrupt_file_is_an_input_error(tmp_path):
    bad = tmp_path / "scores.sqlite"
    bad.write_bytes(b"definitely not sqlite " * 100)
    with pytest.raises(InputError, match="--no-cache"):
        ScoreCache(bad)
