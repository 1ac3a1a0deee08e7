"""Write stage: the compressed model and its report folder land as one unit, under one rerun rule.

**Rerun rule** (``compress`` and ``batch`` alike). An existing output (the model file or its
report folder) is replaced without ``--force`` only when its ``report.json`` records the same
job: the same input model (sha256), data (fingerprint) and resolved config. That rerun is the
same job (the score cache makes it cheap). Anything else is refused with one line that names
``--force``. A report folder is never replaced, ``--force`` or not, when it holds an input of
the run or files that are not a report's own (a ``--report-dir`` pointed at a folder of other
things).

**One unit.** The model goes to temporary files beside its destination and the report into a
temporary folder beside its own. Only then are they moved into place, the report first. What
they replace is kept aside until both moves have worked. On any failure (disk full, Ctrl-C,
SIGTERM), what this run wrote is removed and what was there before is put back, so the error
can truthfully say that nothing was written.

**Paths.** A symlinked ``-o`` is replaced as the link itself: the file it pointed to is left
alone, and the report lands beside the path the user gave. Missing output folders are created,
and removed again if the write fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxws.atomic import created_mode
from onnxws.errors import InputError, UsageError
from onnxws.data import find_sidecar_data, load_data
from onnxws.loading import StagedModel, load_model, model_sha256, stage_model

REPORT_FILES = frozenset({"report.json", "report.html", "pareto.png", "sensitivity.png", "config.toml"})


def report_folder(target: str | Path) -> Path:
    """The default report folder of an output model: ``<output stem>.report`` beside it."""
    target = Path(target)
    return target.with_name(target.name.removesuffix(".onnx") + ".report")


def default_output(model: str | Path) -> Path:
    """The default output of ``model``: ``<model stem>.ws.onnx`` beside it."""
    model = Path(model)
    return model.with_name(model.name.removesuffix(".onnx") + ".ws.onnx")


@dataclass(frozen=True)
class Job:
    """What makes two runs the same job: the input model, the data, the resolved config."""

    model_sha256: str
    data_fingerprint: str
    config: dict[str, Any]

    @classmethod
    def of_report(cls, report: dict[str, Any]) -> Job | None:
        """The job a report records, or None when it does not record one."""
        try:
            return cls(report["model"]["sha256"], report["data"]["fingerprint"], _json_form(report["config"]))
        except (KeyError, TypeError):
            return None

    @classmethod
    def of(cls, model_sha256: str, data_fingerprint: str, config: dict[str, Any]) -> Job:
        return cls(model_sha256, data_fingerprint, _json_form(config))


def job_identity(model: str | Path, data: str | Path | None, config: dict[str, Any]) -> Job:
    """The job a run of ``model`` on ``data`` (None: its sidecar data) with ``config`` (the resolved
    config's ``to_dict``) would record: loads and hashes both, as the load stage does."""
    proto = load_model(model)
    data_path = data if data is not None else find_sidecar_data(model)
    return Job.of(model_sha256(proto), load_data(data_path, proto).fingerprint(), config)


def _json_form(value: Any) -> Any:
    """``value`` as report.json stores it (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(value, default=str))


def recorded_job(folder: Path) -> Job | None:
    """The job of the report in ``folder``, or None (no folder, no readable report.json)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return Job.of_report(report) if isinstance(report, dict) else None


def check_outputs(target: Path, folder: Path, *, force: bool, job: Job | Callable[[], Job] | None = None,
                  inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, a write that the rerun rule or the paths forbid.

    Args:
        target: the output model path (as given: a symlink stays a symlink here).
        folder: its report folder.
        force: replace an existing output of another job.
        job: this run's job, or a function computing it (called only when an output exists and
            ``force`` is not given); None: an existing output is never the same job.
        inputs: the run's input files (model, data, config); never overwritten or inside ``folder``.

    Raises:
        UsageError: the output or the report folder would overwrite an input.
        InputError: an output exists (another job, no ``--force``), the report folder holds
            other files, or a folder is not writable.
    """
    given = [Path(p).resolve() for p in inputs if p is not None]
    if any(_same_file(target, p) for p in given):
        raise UsageError(f"output path {target} is an input of this run; choose another -o")
    report_dir = folder.resolve()
    for path in given:
        if path == report_dir or report_dir in path.parents:
            raise UsageError(f"report folder {folder} holds {path}, an input of this run; choose another --report-dir")
    if target.is_dir():
        raise InputError(f"output path {target} is a folder; give a file name with -o")
    if folder.exists() and not folder.is_dir():
        raise InputError(f"report folder path {folder} is a file; remove it or choose another --report-dir")
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in REPORT_FILES)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise InputError(f"report folder {folder} holds files onnxws did not write ({shown}); "
                             "choose another --report-dir")
    existing = [p for p in (target, folder) if p.exists() or p.is_symlink()]
    if existing and not force:
        recorded = recorded_job(folder)
        wanted = job() if callable(job) else job
        if recorded is None or wanted is None or recorded != wanted:
            why = ("was written by a different job (other model, data or settings)" if recorded is not None
                   else "exists and is not a report of this job" if folder.exists() else "exists")
            raise InputError(f"output {existing[0]} {why}; pass --force to replace it, or -o to choose another path")
    for path in (target, folder):
        ancestor = _existing_ancestor(path.parent)
        if not _writable(ancestor):
            raise InputError(f"output folder is not writable: {ancestor}; choose another -o")


def _same_file(target: Path, path: Path) -> bool:
    try:
        return target.resolve() == path or (target.exists() and os.path.samefile(target, path))
    except OSError:
        return False


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    """Try to create (and remove) a file there: os.access says yes to root on read-only mounts."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".onnxws-probe-"):
            return True
    except OSError:
        return False


class OutputPair:
    """A model and its report folder written as one unit (see the module docstring).

    Use as a context manager: ``stage_model``, ``stage_report``, ``commit``; leaving the block
    without a commit (an exception, Ctrl-C) removes everything staged.
    """

    def __init__(self, target: str | Path, folder: str | Path) -> None:
        self.target = Path(target).absolute()
        self.folder = Path(folder).absolute()
        self._made: list[Path] = []
        self._model: StagedModel | None = None
        self._report: Path | None = None
        self.committed = False

    def __enter__(self) -> OutputPair:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            self.discard()

    def stage_model(self, model: onnx.ModelProto) -> int:
        """Write the model into temporary files beside the target; returns its bytes (with external data)."""
        self._make_folders(self.target.parent)
        self._model = stage_model(model, self.target)
        return self._model.size

    def stage_report(self, write: Callable[[Path], Any]) -> None:
        """Call ``write(folder)`` on a fresh temporary folder beside the report folder."""
        self._make_folders(self.folder.parent)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", suffix=".tmp", dir=self.folder.parent))
        except OSError as exc:
            raise InputError(f"could not write the report folder {self.folder}: {exc.strerror or exc}") from exc
        self._report = tmp
        tmp.chmod(created_mode(folder=True))
        try:
            write(tmp)
        except OSError as exc:
            raise InputError(f"could not write the report into {self.folder}: {exc.strerror or exc}; "
                             "nothing was written") from exc

    def commit(self) -> None:
        """Move the report folder, then the model files, into place; on failure put back what was there."""
        if self._model is None or self._report is None:
            raise RuntimeError("OutputPair.commit needs stage_model and stage_report first")
        moves = [(self._report, self.folder)] + list(self._model.files)
        kept: list[tuple[Path, Path]] = []  # (aside, final) of what was there before
        placed: list[Path] = []
        try:
            for tmp, final in moves:
                if final.exists() or final.is_symlink():
                    aside = final.with_name(f".{final.name}.{os.getpid()}.old")
                    _remove(aside)
                    os.rename(final, aside)  # a link stays a link, a folder moves whole
                    kept.append((aside, final))
                os.rename(tmp, final)
                placed.append(final)
        except BaseException as exc:
            for final in reversed(placed):
                _remove(final)
            for aside, final in reversed(kept):
                os.rename(aside, final)
            if isinstance(exc, OSError):
                raise InputError(f"could not move the output into place ({exc.strerror or exc}); "
                                 "nothing was written") from exc
            raise
        self.committed = True
        for aside, _ in kept:
            _remove(aside)

    def discard(self) -> None:
        """Remove what this pair staged and the folders it created (idempotent)."""
        if self._model is not None:
            self._model.discard()
        if self._report is not None and self._report.exists():
            shutil.rmtree(self._report, ignore_errors=True)
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                pass
        self._made.clear()

    def _make_folders(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for path in reversed(missing):
            try:
                path.mkdir()
            except OSError as exc:
                raise InputError(f"could not create the output folder {path}: {exc.strerror or exc}") from exc
            self._made.append(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
