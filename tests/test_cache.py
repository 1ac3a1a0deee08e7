"""Score cache: persistence across opens, interrupted runs, bad files."""

from __future__ import annotations

import logging
import math
import sqlite3

import platformdirs
import pytest

from onnxws.cache import ScoreCache


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


def test_a_file_that_is_not_sqlite_switches_the_cache_off(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="onnxws.cache")
    bad = tmp_path / "scores.sqlite"
    bad.write_bytes(b"definitely not sqlite " * 100)
    cache = ScoreCache(bad)
    assert cache.failed and "failed at open" in caplog.text
    cache.put("k", 1.0)
    assert cache.get("k") is None and len(cache) == 0
    assert bad.read_bytes() == b"definitely not sqlite " * 100  # left as it was


def test_a_corrupted_page_is_found_at_open(tmp_path):
    path = tmp_path / "scores.sqlite"
    with ScoreCache(path) as cache:
        for i in range(3000):  # several pages of rows
            cache.put(f"key{i:05d}" * 4, float(i))
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[3 * page + 100: 3 * page + 900] = b"\xff" * 800  # scribble over a b-tree page
    path.write_bytes(bytes(raw))
    cache = ScoreCache(path)
    assert cache.failed is not None and cache.get("key00001" * 4) is None


def test_a_cache_that_fails_mid_run_is_switched_off(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="onnxws.cache")
    cache = ScoreCache(tmp_path / "scores.sqlite")
    cache.put("a", 1.0)

    class FullDisk:
        def execute(self, *args):
            raise sqlite3.OperationalError("database or disk is full")

        def close(self):
            pass

    cache._conn = FullDisk()  # what sqlite3 raises when the disk fills during an insert
    cache.put("b", 2.0)
    assert cache.failed and "mid-run" in caplog.text and "disk is full" in caplog.text
    assert cache.get("a") is None  # off for the rest of the run, no second warning
    assert caplog.text.count("score cache") == 1


def test_a_cache_folder_that_cannot_be_created_switches_the_cache_off(tmp_path):
    (tmp_path / "ro").write_text("a file, not a folder")
    cache = ScoreCache(tmp_path / "ro" / "sub" / "scores.sqlite")  # its folder cannot be made
    assert cache.failed is not None and cache.get("k") is None
