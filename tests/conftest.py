"""Shared fixtures: the shipped LeNet-5 copied to a temporary folder (the input is never touched)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LENET = ROOT / "models" / "lenet5"
sys.path.insert(0, str(Path(__file__).parent))  # tests/graphs.py
# The deployability measurements (two Python processes, ~3 s a run) are skipped in every run of the
# suite but those of tests/test_deployability.py, which turns them back on (the subprocesses the
# tests start inherit this).
os.environ["ONNXWS_MEASURE_DEPLOYMENT"] = "0"


@pytest.fixture
def lenet_dir(tmp_path: Path) -> Path:
    """A folder holding model.onnx and eval.npz copied from models/lenet5."""
    folder = tmp_path / "lenet5"
    folder.mkdir()
    for name in ("model.onnx", "eval.npz"):
        shutil.copy(LENET / name, folder / name)
    return folder


def scores_stored(db: Path) -> int:
    """Scorings a score cache holds (each also has '<key>|divergence' and '<key>|spread' rows); 0 while
    it cannot be read (not written yet, or locked)."""
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=1) as conn:
            return int(conn.execute("select count(*) from scores where key not like '%|%'").fetchone()[0])
    except sqlite3.Error:
        return 0
