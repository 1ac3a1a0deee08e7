"""The pipeline of ``onnxws compress`` as a Python API: load, score setup, input moments, cluster + refine, explore, emit, verify,
deployability (CPU ORT figures of the input and the written model, for the report).

``compress(model, data, loss=1.0, **options) -> Result``. No printing: progress goes through
an optional callback ``(stage, done, total, message)`` and the ``logging`` module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxws.cache import ScoreCache
from onnxws.candidates import build_candidates, calibrate, refinement_plan
from onnxws.config import RUN_KEYS, CompressConfig
from onnxws.deployability import assess, first_batch, measurement_wanted
from onnxws.discovery import Discovery
from onnxws.emit_check import emit_stage
from onnxws.errors import UsageError
from onnxws.exploration import SearchContext, loss_unit
from onnxws.layer_search import choose_granularities, layer_sensitivity
from onnxws.loading import Loaded, load_stage, save_model_atomic
from onnxws.outputs import Job, OutputPair, check_outputs, report_folder
from onnxws.proto import without_payloads
from onnxws import report_html
from onnxws.report import build_report
from onnxws.runtime import CUDA
from onnxws.scoring import Scorer
from onnxws.sharing import SharedWeight
from onnxws.statistics import set_resolution
from onnxws.uniform import uniform_stage
from onnxws.verification import search_stage

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int, str], None]


@dataclass
class Result:
    """Outcome of ``compress``: the compressed model and its report."""

    model: onnx.ModelProto
    report: dict[str, Any]
    config: CompressConfig
    source_bytes: int = 0
    shared: list[SharedWeight] = field(default_factory=list)

    def save(self, path: str | Path, *, report_dir: str | Path | None = None, force: bool = False,
             write_report: bool = True) -> Path:
        """Write the model and (by default) its report folder as one unit (``onnxws.outputs``).

        ``report_dir`` defaults to ``<output stem>.report`` beside ``path``; missing folders are
        created. An existing output is replaced only with ``force`` or when its report records
        this same job (model, data, config). Returns the report folder (or the model path when
        ``write_report`` is False).

        Raises:
            InputError, UsageError: the rerun rule or the paths forbid the write, or it failed
                (then nothing was written).
        """
        path = Path(path)
        if not write_report:
            self._fill_file_sizes(save_model_atomic(self.model, path, force=force), path)
            return path
        folder = Path(report_dir) if report_dir is not None else report_folder(path)
        inputs = [self.report["model"].get("path"), self.report["data"].get("path")]
        check_outputs(path, folder, force=force, job=Job.of_report(self.report), inputs=inputs)
        with OutputPair(path, folder) as pair:
            self._fill_file_sizes(pair.stage_model(self.model), path)
            pair.stage_report(lambda tmp: report_html.write_report(self.report, tmp, config_toml=self.config.to_toml()))
            pair.commit()
        return folder

    def _fill_file_sizes(self, size: int, path: Path) -> None:
        comp = self.report["compression"]
        comp["bytes_after"] = int(size)
        comp["ratio_file"] = comp["bytes_before"] / max(size, 1)
        self.report["output"] = {"path": str(path), "bytes": int(size)}


def compress(
    model: str | Path | onnx.ModelProto,
    data: str | Path | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None,
    loss: float | None = None,
    *,
    config: CompressConfig | None = None,
    cache: str | Path | bool | None = None,
    progress: ProgressFn | None = None,
    jobs: int | None = None,
    ray: str | None = None,
    **options: Any,
) -> Result:
    """Compress a model by weight sharing within an accuracy-loss budget.

    Args:
        model: path to an .onnx file, or a ModelProto (not modified).
        data: evaluation data: .npz path, dict of arrays, or iterable of batch dicts; None
            uses the sidecar ``<stem>.npz`` / ``eval.npz`` beside a model path.
        loss: loss budget (overrides ``config.loss``), percentage points by default.
        config: a CompressConfig (layered settings); ``options`` override its run options
            (``loss_mode``, ``search_samples``, ``strategy``, ...) and ``granularity`` its global one.
        cache: score-cache path, True/None for the default location, False to disable.
        progress: callback ``(stage, done, total, message)``.
        jobs: workers that score candidates side by side: processes on this machine (default 1:
            in this process), or Ray actors with ``ray`` (default: one per CPU of the cluster).
        ray: a Ray cluster address to score on (``local``, ``auto``, ``HOST:PORT``,
            ``ray://HOST:PORT``; ``onnxws.cluster``). Like the cache, ``jobs`` and ``ray`` are not
            part of the config: they change where scorings run, not what they give.

    Raises:
        InputError, NothingToShareError, BudgetError, VerificationError (all OnnxwsError).
    """
    config = _resolve_config(config, loss, options)
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs {jobs}: must be >= 1")
    if ray is None:
        return _compress(model, data, config, cache, progress, lambda scorer: scorer.use_pool(jobs or 1))
    from onnxws.cluster import Cluster

    cluster = Cluster(ray)  # connected before any work starts: a bad address fails at once
    try:
        return _compress(model, data, config, cache, progress, lambda scorer: scorer.use_executor(
            cluster.executor(scorer.worker_builder(), jobs, gpu=scorer.provider == CUDA)))
    finally:
        cluster.close()


def _compress(model: str | Path | onnx.ModelProto, data: Any, config: CompressConfig, cache: str | Path | bool | None,
              progress: ProgressFn | None, use_workers: Callable[[Scorer], None]) -> Result:
    """``compress`` with the config resolved; ``use_workers(scorer)`` sets where candidates are scored."""
    notify = progress or _silent
    timings: dict[str, float] = {}
    t_total = time.perf_counter()
    with _timed(timings, "load"):
        loaded = load_stage(model, data, config)
    with _timed(timings, "setup"):  # the biases that bias correction rewrites are scored with their weights
        refine_plan = refinement_plan(loaded.proto, loaded.discovery, config)
        scored = [w.name for w in loaded.discovery.weights] + [b.name for b in refine_plan.biases.values()]
        scorer = Scorer(loaded.proto, scored, loaded.data, loaded.metric, device=config.device, holdout=loaded.n_holdout,
                        search_samples=config.search_samples, batch_size=config.batch_size, cache=_open_cache(cache))
    try:
        use_workers(scorer)
        with _timed(timings, "setup"):
            resolution = set_resolution(loaded.metric, scorer.whole_reference(), loaded.data, _output_names(loaded),
                                        config.loss_mode, seed=config.seed)
            _warn_below_resolution(config, resolution, loaded.data.n)
        with _timed(timings, "setup"):  # the scorer holds the weights now; encoding puts them back
            loaded.proto, _ = without_payloads(loaded.proto, scorer.originals)
        with _timed(timings, "calibrate"):
            moments = calibrate(scorer.activations, scorer.n_batches("search"), refine_plan, loaded.discovery,
                                config, notify)
        with _timed(timings, "cluster"):
            candidates = build_candidates(loaded.discovery, config, scorer.originals, moments, refine_plan, notify)
        timings["cluster"] -= candidates.refine_seconds
        timings["refine"] = candidates.refine_seconds
        baseline = {"search": scorer.baseline_search, "full": scorer.baseline_full}
        ctx = SearchContext(candidates.layers, candidates.evaluator(scorer), baseline, config.loss, config.loss_mode,
                            time_budget=config.time_budget, max_scorings=config.max_scorings, progress=notify,
                            clock=time.perf_counter, start=t_total,  # the time budget covers the whole run
                            interruptible=True,  # the evaluator stops a scoring in progress at the time budget
                            rejects_early=True)  # ... and one that certainly loses more than the layer stage's cap
        with _timed(timings, "layer"):
            if candidates.variants:
                picked = choose_granularities(ctx, candidates.variant_options(), candidates.variant_scorer(scorer))
                candidates.use_granularities(picked)
            proxy_stats = layer_sensitivity(ctx)
        with _timed(timings, "uniform"):
            uniform = uniform_stage(ctx, _widths(loaded.discovery, config))
        searched = search_stage(ctx, scorer, config, per_sample=loaded.metric.per_sample is not None,
                                uniform=(uniform.tuple, uniform.loss_full), proxy_stats=proxy_stats)
        timings.update(network=searched.seconds_network, verify=searched.seconds_verify)
        timings["layer"] += searched.seconds_layer
        with _timed(timings, "emit"):
            notify("emit", 0, 1, f"{ctx.ratio(searched.chosen):.1f}x")
            shared = candidates.chosen(searched.chosen)
            emitted = emit_stage(loaded.proto, shared, scorer, loaded.data, loaded.metric, config,
                                 baseline_full=baseline["full"], loss_full=ctx.known(searched.chosen, "full"))
        notify("emit", 1, 1, "verified")
        with _timed(timings, "deploy"):  # the report's figures only: the model's bytes are not touched
            notify("deploy", 0, 1, "CPU sessions: creation, latency, memory")
            deployability = assess(model if loaded.model_path is None else loaded.proto, emitted.encoded.model,
                                   first_batch(loaded.data, scorer.batch_size, loaded.proto),
                                   input_path=loaded.model_path, measure=measurement_wanted())
            notify("deploy", 1, 1, "measured")
        timings["total"] = time.perf_counter() - t_total
        report = build_report(loaded, scorer, ctx, config, candidates, refine_plan, uniform, searched, emitted,
                              resolution, timings, deployability=deployability)
    finally:
        scorer.close()
    return Result(emitted.encoded.model, report, config, loaded.bytes_before, shared)


def _resolve_config(config: CompressConfig | None, loss: float | None, options: dict[str, Any]) -> CompressConfig:
    """``config`` (or the defaults) with the call's loss and run options applied."""
    overrides = dict(options)
    granularity = overrides.pop("granularity", None)
    if loss is not None:
        overrides["loss"] = loss
    if config is None:
        config = CompressConfig.from_dict({}, **overrides)
    elif overrides:
        config = _override(config, overrides)
    if granularity is not None:
        config = config.with_granularity(str(granularity))
    return config


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Adds the block's wall time to ``timings[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _silent(stage: str, done: int, total: int, message: str) -> None:
    """The progress callback of a run without one."""


def _output_names(loaded: Loaded) -> list[str]:
    return [o.name for o in loaded.proto.graph.output]


def _warn_below_resolution(config: CompressConfig, resolution: float | None, n: int) -> None:
    """One warning line when the budget asks for less than the evaluation set (``n`` samples) can
    resolve, or when its resolution cannot be stated at all."""
    unit = loss_unit(config.loss_mode)
    if resolution is None:
        logger.warning("this evaluation set's resolution cannot be stated: the unmodified model's metric does not vary "
                       "over its %d sample(s) (every sample right, or agreement with itself), so the losses found say "
                       "nothing beyond this set; more, and more varied, samples would", n)
    elif config.loss < resolution:
        logger.warning("--loss %g %s is below this evaluation set's resolution of %.2f %s (the 95%% half-width of the "
                       "metric on it): more samples, or more groups, would resolve it", config.loss, unit, resolution,
                       unit)


def _widths(discovery: Discovery, config: CompressConfig) -> list[int]:
    """Every index width some shareable tensor may use (the uniform baseline's candidates)."""
    return sorted(set().union(*(config.settings_for(w.name, w.op_type).bits for w in discovery.weights)))


def _override(config: CompressConfig, overrides: dict[str, Any]) -> CompressConfig:
    """A copy of ``config`` with run options replaced (validated again by the dataclass)."""
    unknown = sorted(set(overrides) - set(RUN_KEYS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(RUN_KEYS)}")
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})



def _open_cache(cache: str | Path | bool | None) -> ScoreCache | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return ScoreCache(ScoreCache.default_path())
    return ScoreCache(Path(cache))
