"""``onnxws batch``: compress a folder or a TOML manifest of models, one report each, one summary.

Resumable, under the rerun rule of ``onnxws.outputs``: a model whose output and report record the
same job (model sha256, data fingerprint, resolved config) is not redone; an output of another
job is refused (a failed row naming ``--force``) unless ``--force`` is given. Failures are
recorded and the batch goes on. Outputs: ``<stem>.ws.onnx`` and ``<stem>.ws.report/``; a report
folder under the earlier name ``<stem>.report/`` is renamed to it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxws.atomic import write_atomic
from onnxws.config import CompressConfig
from onnxws.errors import InputError, OnnxwsError, UsageError, one_line
from onnxws.outputs import check_outputs, job_identity, recorded_job, report_folder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["model", "status", "baseline", "final", "loss", "loss_unit", "ratio_theoretical",
                   "ratio_file", "scorings", "seconds", "error"]


@dataclass
class BatchItem:
    """One model of a batch: where it is, its data, its per-model options."""

    model: Path
    data: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return self.model.name.removesuffix(".onnx")


@dataclass
class BatchRow:
    model: str
    status: str  # "ok" | "skipped (done)" | "failed"
    baseline: float | None = None
    final: float | None = None
    loss: float | None = None
    loss_unit: str = ""
    ratio_theoretical: float | None = None
    ratio_file: float | None = None
    scorings: int | None = None
    seconds: float | None = None
    error: str = ""


def collect(source: Path, out_dir: Path) -> list[BatchItem]:
    """Models of a folder (every ``*.onnx``, our own outputs excluded) or of a TOML manifest.

    Manifest: ``[[model]]`` tables with ``path`` (relative to the manifest), optional ``data``
    and any compress option (``loss``, ``search_samples``, ...); an optional ``[defaults]``
    table applies to every model.
    """
    if source.is_dir():
        # Our outputs are always <stem>.ws.onnx: never take them as inputs, even when OUT_DIR is the folder.
        items = [BatchItem(path) for path in sorted(source.glob("*.onnx")) if not path.name.endswith(".ws.onnx")]
        if not items:
            raise InputError(f"no .onnx models in {source} (outputs named *.ws.onnx are not inputs)")
        return _unique_stems(items)
    if source.suffix.lower() != ".toml":
        raise UsageError(f"batch source {source} must be a folder of .onnx models or a .toml manifest")
    try:
        manifest = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read manifest {source}: {exc}") from exc
    unknown = set(manifest) - {"defaults", "model"}
    if unknown:
        raise UsageError(f"manifest {source}: unknown table(s) {sorted(unknown)}; expected [defaults] and [[model]]")
    defaults = dict(manifest.get("defaults", {}))
    entries = manifest.get("model", [])
    if not entries:
        raise InputError(f"manifest {source} lists no [[model]]")
    items = []
    for i, entry in enumerate(entries):
        entry = dict(entry)
        if "path" not in entry:
            raise UsageError(f"manifest {source}: [[model]] #{i + 1} has no path")
        path = (source.parent / entry.pop("path")).resolve()
        data = entry.pop("data", None)
        items.append(BatchItem(path, (source.parent / data).resolve() if data else None, {**defaults, **entry}))
    return _unique_stems(items)


def _unique_stems(items: list[BatchItem]) -> list[BatchItem]:
    seen: dict[str, Path] = {}
    for item in items:
        if item.stem in seen:
            raise UsageError(f"two models share the name {item.stem!r} ({seen[item.stem]} and {item.model}): "
                             "outputs would collide; rename one")
        seen[item.stem] = item.model
    return items


def run_batch(
    source: Path,
    out_dir: Path,
    options: dict[str, Any],
    *,
    config_path: Path | None = None,
    jobs: int = 1,
    cache: Any = None,
    force: bool = False,
    on_row: Callable[[BatchRow], None] | None = None,
    ray: str | None = None,
) -> list[BatchRow]:
    """Compress every model of ``source`` into ``out_dir``; write summary.md and summary.csv.

    ``jobs`` models run side by side: in processes, or with ``ray`` (a cluster address) in
    threads of this process whose scorings run on the cluster, the cluster's CPUs shared
    between them. Returns one row per model. Never raises for a single model's failure.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"output folder is not writable: {out_dir}")
    items = collect(source, out_dir)
    cluster = None
    if ray is not None:
        from onnxws.cluster import Cluster

        cluster = Cluster(ray)  # connected once, before any model: a bad address fails at once
    scoring = None if cluster is None else max(cluster.cpus // max(min(jobs, len(items)), 1), 1)
    tasks = [(item, out_dir, options, config_path, cache, force, ray, scoring) for item in items]
    rows: list[BatchRow] = []

    def record(row: BatchRow) -> None:
        rows.append(row)
        write_summary(out_dir, sorted(rows, key=lambda r: r.model))
        if on_row:
            on_row(row)

    try:
        if jobs <= 1:
            for task in tasks:
                record(_run_one(*task))
        else:
            side_by_side = ThreadPoolExecutor if cluster is not None else ProcessPoolExecutor
            with side_by_side(max_workers=jobs) as pool:
                for row in pool.map(_run_one_star, tasks):
                    record(row)
    finally:
        if cluster is not None:
            cluster.close()
    return sorted(rows, key=lambda r: r.model)


def _run_one_star(args: tuple) -> BatchRow:
    return _run_one(*args)


def _run_one(item: BatchItem, out_dir: Path, options: dict, config_path: Path | None, cache: Any, force: bool,
             ray: str | None = None, scoring_jobs: int | None = None) -> BatchRow:
    from onnxws.pipeline import compress

    target = out_dir / f"{item.stem}.ws.onnx"
    folder = report_folder(target)
    start = time.perf_counter()
    try:
        if not item.model.exists():
            raise InputError(f"model not found: {item.model}")
        _migrate_report_folder(out_dir / f"{item.stem}.report", folder)
        merged = {k: v for k, v in {**options, **item.options}.items() if v is not None}
        cfg = CompressConfig.from_toml(config_path, **merged) if config_path else CompressConfig.from_dict({}, **merged)
        inputs = [item.model, item.data, config_path]
        if target.exists() and not force:
            job = job_identity(item.model, item.data, cfg.to_dict())
            if recorded_job(folder) == job:
                return _row(item.stem, "skipped (done)", json.loads((folder / "report.json").read_text()))
            check_outputs(target, folder, force=False, job=job, inputs=inputs)  # raises: another job's output
        check_outputs(target, folder, force=force, inputs=inputs)
        result = compress(item.model, item.data, config=cfg, cache=cache, ray=ray, jobs=scoring_jobs)
        result.save(target, report_dir=folder, force=force)
        return _row(item.stem, "ok", result.report, seconds=time.perf_counter() - start)
    except OnnxwsError as exc:
        return BatchRow(item.stem, "failed", seconds=time.perf_counter() - start, error=one_line(exc))
    except Exception as exc:  # noqa: BLE001 - one broken model must not stop the batch
        logger.exception("model %s failed", item.model)
        return BatchRow(item.stem, "failed", seconds=time.perf_counter() - start,
                        error=f"internal error: {type(exc).__name__}: {one_line(exc)}")


def _migrate_report_folder(legacy: Path, folder: Path) -> None:
    """Rename an earlier batch's ``<stem>.report`` (a report folder) to ``<stem>.ws.report``."""
    if legacy.is_dir() and not folder.exists() and (legacy / "report.json").is_file():
        legacy.rename(folder)
        logger.info("renamed the report folder %s to %s", legacy, folder)


def _row(stem: str, status: str, report: dict, seconds: float | None = None) -> BatchRow:
    final = report.get("final", {})
    comp = report.get("compression", {})
    exploration = report.get("exploration", {})
    return BatchRow(
        stem, status, report.get("baseline", {}).get("value"), final.get("value"), final.get("loss"),
        final.get("loss_unit", ""), comp.get("ratio_theoretical"), comp.get("ratio_file"),
        exploration.get("scorings"), seconds if seconds is not None else exploration.get("seconds", {}).get("total"),
    )


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, spec or ".4g")
    return str(value)


def write_summary(out_dir: Path, rows: list[BatchRow]) -> None:
    """summary.csv (machine-readable) and summary.md (a table), both written atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for r in rows:
        writer.writerow([r.model, r.status, _fmt(r.baseline, ".6f"), _fmt(r.final, ".6f"), _fmt(r.loss, ".4f"),
                         r.loss_unit, _fmt(r.ratio_theoretical, ".3f"), _fmt(r.ratio_file, ".3f"),
                         _fmt(r.scorings), _fmt(r.seconds, ".1f"), r.error])
    write_atomic(out_dir / "summary.csv", buf.getvalue().encode())
    lines = ["# onnxws batch summary", "",
             "| model | status | baseline | final | loss | CR (shared, theoretical) | file ratio | scorings | seconds | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        loss = f"{r.loss:.3f} {r.loss_unit}" if r.loss is not None else ""
        base = f"{100 * r.baseline:.2f}%" if r.baseline is not None else ""
        final = f"{100 * r.final:.2f}%" if r.final is not None else ""
        ratio = f"{r.ratio_theoretical:.2f}x" if r.ratio_theoretical else ""
        fratio = f"{r.ratio_file:.2f}x" if r.ratio_file else ""
        error = r.error.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.model} | {r.status} | {base} | {final} | {loss} | {ratio} | {fratio} | "
                     f"{_fmt(r.scorings)} | {_fmt(r.seconds, '.1f')} | {error} |")
    failed = sum(r.status == "failed" for r in rows)
    lines += ["", f"{len(rows)} model(s): {len(rows) - failed} succeeded or already done, {failed} failed."]
    write_atomic(out_dir / "summary.md", ("\n".join(lines) + "\n").encode())
