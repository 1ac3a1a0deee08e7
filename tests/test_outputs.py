"""The write stage: model + report as one unit, the rerun rule, symlinks, modes, the report folder's guards."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxws
import onnxws.outputs as outputs
from graphs import labelled_data, lenet_like
from onnxws import report_html
from onnxws.outputs import Job, check_outputs, job_identity, recorded_job, report_folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    model = lenet_like()
    onnx.save(model, str(folder / "m.onnx"))
    np.savez(folder / "m.npz", **labelled_data(model))
    return folder / "m.onnx", folder / "m.npz"


@pytest.fixture(scope="module")
def result(inputs):
    model, data = inputs
    return onnxws.compress(model, data, loss=2.0, cache=False, max_scorings=25)


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_save_writes_the_pair_with_umask_modes(result, tmp_path):
    old = os.umask(0o022)
    try:
        folder = result.save(tmp_path / "deep" / "er" / "out.onnx")  # missing folders are created
    finally:
        os.umask(old)
    assert folder == tmp_path / "deep" / "er" / "out.report"
    assert listing(folder) == sorted(outputs.REPORT_FILES)
    for path in [tmp_path / "deep" / "er" / "out.onnx", *folder.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert recorded_job(folder) == Job.of_report(result.report)


def test_a_failed_report_write_leaves_nothing(result, tmp_path, monkeypatch):
    def full(report, out_dir, **kwargs):
        (Path(out_dir) / "report.json").write_text("{")  # half-written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_html, "write_report", full)
    with pytest.raises(onnxws.InputError, match="nothing was written"):
        result.save(tmp_path / "new" / "out.onnx")
    assert listing(tmp_path) == []  # no model, no temp file, not even the folder it created


def test_an_interrupted_commit_puts_the_previous_output_back(result, tmp_path, monkeypatch):
    target = tmp_path / "out.onnx"
    folder = result.save(target)
    before = {p: p.read_bytes() for p in [target, *folder.iterdir()]}
    real_rename = os.rename
    calls: list[Path] = []

    def interrupted(src, dst):
        if Path(dst) == target and not calls:  # Ctrl-C after the report moved in, before the model did
            calls.append(Path(src))
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.save(target, force=True)
    assert calls and {p: p.read_bytes() for p in [target, *folder.iterdir()]} == before
    assert listing(tmp_path) == sorted(["out.onnx", "out.report", *(f"out.report/{n}" for n in outputs.REPORT_FILES)])


def test_the_rerun_rule(result, inputs, tmp_path):
    model, data = inputs
    target = tmp_path / "out.onnx"
    folder = result.save(target)
    job = job_identity(model, data, result.config.to_dict())
    assert job == recorded_job(folder)  # computed before a run, it equals what the run recorded
    check_outputs(target, folder, force=False, job=job)  # the same job: replaced without --force
    other = Job(job.model_sha256, job.data_fingerprint, {**job.config, "loss": 0.5})
    with pytest.raises(onnxws.InputError, match="different job.*--force"):
        check_outputs(target, folder, force=False, job=other)
    check_outputs(target, folder, force=True, job=other)
    stranger = tmp_path / "theirs.onnx"
    stranger.write_bytes(b"not ours")
    with pytest.raises(onnxws.InputError, match="--force"):
        check_outputs(stranger, report_folder(stranger), force=False, job=job)
    with pytest.raises(onnxws.InputError, match="--force"):
        result.save(stranger)
    assert stranger.read_bytes() == b"not ours"


def test_the_report_folder_never_replaces_inputs_or_foreign_files(result, inputs, tmp_path):
    model, data = inputs
    config = tmp_path / "config.toml"
    config.write_text("[global]\nloss = 1.0\n")
    with pytest.raises(onnxws.UsageError, match="input of this run"):
        check_outputs(tmp_path / "o.onnx", tmp_path, force=True, inputs=[model, data, config])
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep")
    with pytest.raises(onnxws.InputError, match="did not write.*notes.txt"):
        result.save(tmp_path / "o.onnx", report_dir=notes, force=True)
    assert (notes / "notes.txt").read_text() == "keep" and not (tmp_path / "o.onnx").exists()


def test_a_symlinked_output_is_replaced_as_the_link(result, tmp_path):
    real = tmp_path / "elsewhere" / "kept.onnx"
    real.parent.mkdir()
    real.write_bytes(b"the file the link points to")
    link = tmp_path / "out.onnx"
    link.symlink_to(real)
    folder = result.save(link, force=True)
    assert folder == tmp_path / "out.report" and (folder / "report.json").exists()
    assert not link.is_symlink() and onnx.load(str(link)).graph.node
    assert real.read_bytes() == b"the file the link points to"
    assert listing(real.parent) == ["kept.onnx"]
    assert json.loads((folder / "report.json").read_text())["output"]["path"] == str(link)


def test_a_file_where_the_report_folder_goes_is_named(result, tmp_path):
    (tmp_path / "out.report").write_text("a file")
    with pytest.raises(onnxws.InputError, match="is a file"):
        result.save(tmp_path / "out.onnx")
    assert listing(tmp_path) == ["out.report"]
