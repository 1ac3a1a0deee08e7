"""The pipeline of ``onnxws compress`` as a Python API: load, score setup, input moments, cluster + refine, explore, emit, verify.

``compress(model, data, loss=1.0, **options) -> Result``. No printing: progress goes through
an optional callback ``(stage, done, total, message)`` and the ``logging`` module.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import platform
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxws import __version__
from onnxws.cache import ScoreCache
from onnxws.clustering import share_weight_all_k
from onnxws.config import CompressConfig
from onnxws.data import EvalData, find_sidecar_data, load_data
from onnxws.discovery import Discovery, constant_tensors, find_weights
from onnxws.emit_check import check_rebuilt_weights, check_trusted
from onnxws.encoding import EncodeResult, encode_model
from onnxws.errors import BudgetError, InputError, NothingToShareError, VerificationError
from onnxws.exploration import Layer, Option, SearchContext, loss_between, loss_unit, value_after_loss, within_budget
from onnxws.layer_search import choose_granularities, layer_sensitivity
from onnxws.loading import check_model, load_model, model_sha256
from onnxws.proto import default_opset, message_bytes, model_weight_bytes, without_payloads
from onnxws.metrics import Metric, resolve_metric
from onnxws.network_search import uniform_baseline, verify_uniform
from onnxws.refinement import Moments, Plan, measure_moments, refine_all
from onnxws.refinement import plan as plan_refinement
from onnxws.scoring import Scorer, evaluate_model
from onnxws.sharing import Granularity, SharedWeight, index_bits
from onnxws.verification import (
    EDGE_MIN_PROBABILITY,
    GROW_FACTOR,
    SubsetNoise,
    Verification,
    search_and_verify,
    subset_misled,
)

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
        """Write the model atomically, then (by default) the report folder beside it.

        Returns the report folder (or the model path when ``write_report`` is False).
        """
        from onnxws.loading import save_model_atomic
        from onnxws.report import write_report as _write_report

        path = Path(path)
        size = save_model_atomic(self.model, path, force=force)
        self._fill_file_sizes(size, path)
        if not write_report:
            return path
        folder = Path(report_dir) if report_dir is not None else path.with_name(path.name.removesuffix(".onnx") + ".report")
        _write_report(self.report, folder, config_toml=self.config.to_toml())
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

    Raises:
        InputError, NothingToShareError, BudgetError, VerificationError (all OnnxwsError).
    """
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
    notify = progress or (lambda stage, done, total, message: None)
    timings: dict[str, float] = {}
    t_total = time.perf_counter()

    # 1. Load ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model_path: Path | None = None
    if isinstance(model, (str, Path)):
        model_path = Path(model)
        proto = load_model(model_path)
        bytes_before = _file_bytes(model_path, proto)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        check_model(proto)
        bytes_before = message_bytes(proto)  # ByteSize() raises over 2 GB
    else:
        raise InputError(f"model must be a path or onnx.ModelProto, got {type(model).__name__}")
    if data is None:
        if model_path is None:
            raise InputError("no evaluation data: pass data= (a .npz path, a dict of arrays or an iterable of batches)")
        data = find_sidecar_data(model_path)
    data_path = str(data) if isinstance(data, (str, Path)) else None
    eval_data = load_data(data, proto)
    metric = resolve_metric(config.metric, eval_data, proto, config.output)
    tensors = constant_tensors(proto)
    op_types = {node.op_type for node in proto.graph.node}
    config.check_patterns(list(tensors), op_types)
    del tensors  # sub-messages of proto: they would keep its memory alive once proto is replaced
    discovery = find_weights(proto, config.settings_for)
    if not discovery.weights:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in discovery.skipped[:3]) or "no float constant tensors"
        raise NothingToShareError(f"the model has no shareable weight tensor ({reasons})")
    timings["load"] = time.perf_counter() - t0

    # 2. Scorer (the biases that bias correction rewrites are scored with their weights) ---
    t0 = time.perf_counter()
    shapes = {w.name: w.shape for w in discovery.weights}
    refine_plan = Plan(reasons={w.name: "refinement off (--no-refine)" for w in discovery.weights})
    if config.refine:
        refine_plan = plan_refinement(proto, shapes)
        if not config.bias_correction:
            refine_plan.bias_reasons.update({name: "bias correction off (--no-bias-correction)" for name in refine_plan.biases})
            refine_plan.biases.clear()
    score_cache = _open_cache(cache)
    scored = [w.name for w in discovery.weights] + [b.name for b in refine_plan.biases.values()]
    scorer = Scorer(proto, scored, eval_data, metric, device=config.device,
                    search_samples=config.search_samples, batch_size=config.batch_size, cache=score_cache)
    try:
        # From here on the scorer holds the weights (as arrays): the model keeps only their headers,
        # and encoding puts the identical bytes back for the weights that stay unshared. Its hash
        # (for the report) is taken first.
        model_hash = model_sha256(proto)
        originals = scorer.originals
        proto, _ = without_payloads(proto, originals)
        timings["setup"] = time.perf_counter() - t0

        # 3. Input moments of the refinable layers (one pass over the search subset) ----------
        t0 = time.perf_counter()
        moments: dict[str, Moments] = {}
        if config.refine:
            n_batches = scorer.n_batches("search")
            done = [0]

            def read(names: list[str]):
                return scorer.activations(names, "search")

            def measured(message: str) -> None:
                done[0] += 1
                notify("calibrate", done[0], max(done[0], n_batches), message)  # more runs when read in groups

            moments = measure_moments(read, refine_plan, shapes, n_batches,
                                      seed=config.seed, progress=measured)
        timings["calibrate"] = time.perf_counter() - t0

        # 4. Cluster, then refine ---------------------------------------------------------------
        t0 = time.perf_counter()
        refine_seconds = 0.0
        shares: dict[str, dict[int, SharedWeight]] = {}
        variants: dict[str, dict[str, tuple[list[Option], dict[int, SharedWeight]]]] = {}  # granularity "auto"
        output_errors: dict[str, dict[str, dict[int, float]]] = {}  # name -> granularity -> k -> refined error
        layers: list[Layer] = []
        for i, info in enumerate(discovery.weights):
            notify("cluster", i, len(discovery.weights), info.name)
            settings = config.settings_for(info.name, info.op_type)
            ks = sorted({min(2 ** b, settings.k_max) for b in settings.bits})
            values = originals[info.name]
            cb_bits = _dtype_bits(info.dtype)
            kinds = [settings.granularity]
            if settings.granularity.kind == "auto":  # both measured in the layer stage
                kinds = [Granularity("tensor")]
                if values.ndim >= 2 and values.shape[info.channel_axis] > 1:
                    kinds.append(Granularity("channel"))
            for granularity in kinds:
                by_k = share_weight_all_k(info.name, values, ks, granularity, info.channel_axis)
                damage = {k: float(sw.inertia) for k, sw in by_k.items()}
                if info.name in moments:  # damage proxy: the output error (refined), not the weights'
                    t_refine = time.perf_counter()
                    bias = refine_plan.biases.get(info.name)
                    by_k, damage = refine_all(by_k, values, moments[info.name],
                                              bias=None if bias is None else (bias, originals[bias.name]))
                    output_errors.setdefault(info.name, {})[str(granularity)] = damage
                    refine_seconds += time.perf_counter() - t_refine
                options_ = [Option(k, index_bits(k), sw.stored_bits(cb_bits), damage[k]) for k, sw in sorted(by_k.items())]
                if granularity is kinds[0]:
                    shares[info.name] = by_k
                    layers.append(Layer(info.name, info.params, info.params * cb_bits, options_))
                if len(kinds) > 1:
                    variants.setdefault(info.name, {})[granularity.kind] = (options_, by_k)
            del values
        refined_rows = {name: m.rows for name, m in moments.items()}
        moments.clear()
        del originals  # the scorer's arrays: scorer.close() must be able to free them before emit
        notify("cluster", len(discovery.weights), len(discovery.weights), "done")
        timings["cluster"] = time.perf_counter() - t0 - refine_seconds
        timings["refine"] = refine_seconds

        def evaluate(tuples: list[dict[str, int]], subset: str) -> list[tuple]:
            # Decoded one candidate at a time as the scorer reaches it: a request of n whole-model
            # tuples would otherwise hold n decoded copies of the weights at once.
            candidates = ({key: value for name, k in tup.items() for key, value in shares[name][k].tensors().items()}
                          for tup in tuples)
            return scorer.score_with_divergence(candidates, subset, spread=True)

        baseline = {"search": scorer.baseline_search, "full": scorer.baseline_full}
        ctx = SearchContext(layers, evaluate, baseline, config.loss, config.loss_mode,
                            time_budget=config.time_budget, max_scorings=config.max_scorings, progress=notify,
                            clock=time.perf_counter, start=t_total)  # the time budget covers the whole run

        # 5. Layer stage ---------------------------------------------------------------------
        t0 = time.perf_counter()
        if variants:
            def score_variants(requests: list[tuple[str, str, int]]) -> list[tuple[float, float]]:
                return scorer.score_with_divergence(variants[name][g][1][k].tensors() for name, g, k in requests)

            picked = choose_granularities(ctx, {name: {g: opts for g, (opts, _) in by_g.items()}
                                                for name, by_g in variants.items()}, score_variants)
            for name, g in picked.items():
                shares[name] = variants[name][g][1]
        proxy_stats = layer_sensitivity(ctx)
        timings["layer"] = time.perf_counter() - t0

        # 6. Uniform baseline (what users would otherwise do) --------------------------------
        t0 = time.perf_counter()
        widths = sorted(set().union(*(config.settings_for(w.name, w.op_type).bits for w in discovery.weights)))
        uniform_tuple, uniform_tried = uniform_baseline(ctx, widths)
        uniform_tuple, uniform_full = verify_uniform(ctx, widths, uniform_tuple, uniform_tried)
        timings["uniform"] = time.perf_counter() - t0

        # 7. Network stage + full-set verification (step back on a miss, push on slack) ------
        def search_round() -> Verification:
            t0 = time.perf_counter()
            found = search_and_verify(
                ctx, strategy=config.strategy, predictor=config.predictor, seed=config.seed,
                noise=_subset_noise(scorer, metric, config.loss_mode), edge_tries=config.edge_tries,
                uniform=(uniform_tuple, uniform_full))
            timings["network"] = timings.get("network", 0.0) + time.perf_counter() - t0 - found.seconds
            timings["verify"] = timings.get("verify", 0.0) + found.seconds
            return found

        verification = search_round()

        # 7b. A search subset that misled the search: grow it, search again --------------------
        growth: list[dict] = []
        latest = verification  # the last round's own verification: the evidence for growing again
        while config.grow_subset and scorer.n_search < scorer.n_full:
            misled = subset_misled(ctx, latest)
            if misled is None or not ctx.can_score():
                break
            before, grown = scorer.n_search, min(scorer.n_full, GROW_FACTOR * scorer.n_search)
            growth.append({"from_samples": before, "to_samples": grown, **misled})
            notify("layer", 0, 0, f"search subset {before} -> {grown} samples: the full set disagreed")
            t0 = time.perf_counter()
            scorer.grow_search(grown)
            measured_before = {layer.name: layer.measured_losses() for layer in ctx.layers}
            ctx.new_search_subset(scorer.baseline_search, f"search_{before}")
            layer_before = ctx.scorings_by_stage.get("layer", 0)
            proxy_stats = layer_sensitivity(ctx, earlier=measured_before)
            growth[-1]["layer_scorings"] = ctx.scorings_by_stage.get("layer", 0) - layer_before
            growth[-1]["layer_walks_from_earlier_edge"] = proxy_stats["started_at_earlier_edge"]
            timings["layer"] += time.perf_counter() - t0
            again = search_round()
            earlier, latest = verification.chosen, again
            verification = Verification(again.chosen, verification.log + again.log, again.outcome, again.edge_target)
            if earlier is not None and (again.chosen is None or ctx.ratio(earlier) > ctx.ratio(again.chosen)):
                verification.chosen = earlier
        outcome, chosen = verification.outcome, verification.chosen
        if chosen is not None and ctx.known(chosen) is None and ctx.can_score():  # an earlier subset's answer won
            ctx.losses([chosen], "search", stage="verify")  # its loss on this subset, for the report
        if chosen is None:
            smallest = min((e.loss_measured for e in ctx.explored if e.subset == "full"), default=None)
            if smallest is None:
                smallest = min((e.loss_measured for e in ctx.explored), default=math.nan)
            raise BudgetError(
                f"no layer can be shared within the loss budget of {config.loss:g} {loss_unit(config.loss_mode)}: "
                f"the smallest loss found was {smallest:.3f}; raise --loss or check the evaluation data"
            )

        # 8. Emit, then trust but verify ------------------------------------------------------
        t0 = time.perf_counter()
        notify("emit", 0, 1, f"{ctx.ratio(chosen):.1f}x")
        shared = [shares[name][k] for name, k in chosen.items()]
        # Only the chosen codebooks and indices are needed from here on (the report reads those).
        shares = {name: {k: shares[name][k]} for name, k in chosen.items()}
        variants.clear()
        encoded = encode_model(proto, shared, opset=config.opset, values=scorer.originals)
        scorer.close()  # its copy of the weights and sessions: the emitted model is measured on its own
        check_model(encoded.model, "emitted model")
        check_rebuilt_weights(encoded.model, shared)
        emitted_value = evaluate_model(encoded.model, eval_data, metric, device=config.device,
                                       batch_size=config.batch_size, reference=scorer)
        scorer_value = value_after_loss(baseline["full"], ctx.known(chosen, "full"), config.loss_mode)
        check_trusted(emitted_value, scorer_value)
        final_loss = loss_between(baseline["full"], emitted_value, config.loss_mode)
        if not within_budget(final_loss, config.loss):
            raise VerificationError(f"the emitted model loses {final_loss:.3f} {loss_unit(config.loss_mode)} > budget {config.loss:g}")
        timings["emit"] = time.perf_counter() - t0
        notify("emit", 1, 1, "verified")
        timings["total"] = time.perf_counter() - t_total

        report = _build_report(
            proto=proto, model_hash=model_hash, model_path=model_path, data_path=data_path, eval_data=eval_data, metric=metric.name,
            scorer=scorer, ctx=ctx, config=config, discovery=discovery, shares=shares, chosen=chosen,
            encoded=encoded, emitted_value=emitted_value, scorer_value=scorer_value, final_loss=final_loss,
            bytes_before=bytes_before, timings=timings, outcome=outcome, uniform=(uniform_tuple, uniform_full, uniform_tried),
            proxy_stats=proxy_stats, verification=verification, growth=growth,
            refinement=(refine_plan, output_errors, refined_rows),
        )
    finally:
        scorer.close()
    return Result(encoded.model, report, config, bytes_before, shared)


def _override(config: CompressConfig, overrides: dict[str, Any]) -> CompressConfig:
    """A copy of ``config`` with run options replaced (validated again by the dataclass)."""
    from onnxws.config import RUN_KEYS
    from onnxws.errors import UsageError

    unknown = sorted(set(overrides) - set(RUN_KEYS))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(RUN_KEYS)}")
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def _file_bytes(path: Path, proto: onnx.ModelProto) -> int:
    """Bytes of the model file plus its external data files (read from the file's references,
    since the loaded proto has its external data inlined)."""
    size = path.stat().st_size
    seen = set()
    for tensor in _raw_tensors(path):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                data_file = path.parent / entry.value
                if data_file.exists():
                    size += data_file.stat().st_size
    return size


def _raw_tensors(path: Path) -> list[onnx.TensorProto]:
    shallow = onnx.load(str(path), load_external_data=False)
    return list(onnx.external_data_helper._get_all_tensors(shallow))  # noqa: SLF001


def _dtype_bits(dtype: str) -> int:
    return 16 if dtype in ("float16", "bfloat16") else 32


def _open_cache(cache: str | Path | bool | None) -> ScoreCache | None:
    if cache is False:
        return None
    if cache is None or cache is True:
        return ScoreCache(ScoreCache.default_path())
    return ScoreCache(Path(cache))


def _subset_noise(scorer: Scorer, metric: Metric, loss_mode: str) -> SubsetNoise | None:
    """The search subset's sampling error (verification.SubsetNoise); None when it cannot be stated."""
    if loss_mode == "absolute":
        unit = 100.0
    elif scorer.baseline_full != 0:
        unit = 100.0 / abs(scorer.baseline_full)
    else:
        return None
    return SubsetNoise(scorer.n_search, scorer.n_full, metric.per_sample is not None, unit)


def _versions() -> dict[str, str]:
    import onnxruntime

    return {"onnxws": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _build_report(*, proto, model_hash: str, model_path, data_path, eval_data: EvalData, metric: str, scorer: Scorer,
                  ctx: SearchContext, config: CompressConfig, discovery: Discovery, shares, chosen,
                  encoded: EncodeResult, emitted_value: float, scorer_value: float, final_loss: float,
                  bytes_before: int, timings: dict, outcome, uniform, proxy_stats, verification: Verification,
                  growth: list[dict], refinement: tuple[Plan, dict, dict]) -> dict:
    mode = config.loss_mode
    unit = loss_unit(mode)
    refine_plan, output_errors, refined_rows = refinement
    info_by_name = {w.name: w for w in discovery.weights}
    layer_by_name = {layer.name: layer for layer in ctx.layers}
    enc_by_name = {t.name: t for t in encoded.tensors}

    shared_full_bits = sum(layer_by_name[n].full_bits for n in chosen)
    shared_stored_bits = sum(layer_by_name[n].option(k).size_bits for n, k in chosen.items())
    ratio_shared = shared_full_bits / max(shared_stored_bits, 1)
    all_bits = 8 * model_weight_bytes(proto)
    ratio_whole = all_bits / max(all_bits - shared_full_bits + shared_stored_bits, 1)
    weight_bytes_after = model_weight_bytes(encoded.model)
    packing = (all_bits / 8 / max(weight_bytes_after, 1)) / ratio_whole
    bytes_after = message_bytes(encoded.model)
    stored_total = sum(t.stored_bytes for t in encoded.tensors) or 1

    corrected = {name: bias.name for name, bias in refine_plan.biases.items() if name in output_errors}
    layers = []
    for layer in ctx.layers:
        info = info_by_name[layer.name]
        k = chosen.get(layer.name)
        enc = enc_by_name.get(layer.name)
        granularity = str(shares[layer.name][k].granularity) if k else None
        errors = output_errors.get(layer.name, {})
        errors = errors.get(granularity) or next(iter(errors.values()), {})
        candidates = [{"k": opt.k, "bits": opt.bits, "loss": layer.loss_alone.get(opt.k),
                       "output_error": errors.get(opt.k),
                       "divergence": layer.divergence_alone.get(opt.k),
                       "source": layer.loss_source.get(opt.k), "candidate": opt.k in layer.candidates}
                      for opt in layer.options]
        layers.append({
            "name": layer.name, "op_type": info.op_type, "shape": list(info.shape), "params": info.params,
            "dtype": info.dtype, "source": info.source,
            "k": k, "bits": index_bits(k) if k else None,
            "index_dtype": enc.index_dtype if enc else "unshared",
            "granularity": granularity,
            "refined": layer.name in output_errors, "refine_reason": refine_plan.reasons.get(layer.name),
            "bias_corrected": layer.name in corrected, "bias": corrected.get(layer.name),
            "bias_reason": None if layer.name in corrected else refine_plan.bias_reasons.get(layer.name, refine_plan.reasons.get(layer.name)),
            "n_codebooks": shares[layer.name][k].n_codebooks if k else None,
            "loss_alone": layer.loss_alone.get(k) if k else None,
            "stored_bytes": enc.stored_bytes if enc else info.params * _dtype_bits(info.dtype) // 8,
            "share_of_size": (enc.stored_bytes / stored_total) if enc else None,
            "candidates": candidates,
        })
    uniform_tuple, uniform_full, uniform_tried = uniform
    uniform_report = None
    if uniform_tuple is not None and uniform_full is not None:
        ks = sorted(set(uniform_tuple.values()))
        uniform_report = {
            "k": ks[0] if len(ks) == 1 else max(ks), "bits": index_bits(max(ks)),
            "ratio_theoretical": ctx.ratio(uniform_tuple), "loss": uniform_full,
            "loss_search": ctx.known(uniform_tuple), "within_budget": within_budget(uniform_full, config.loss),
            "value": value_after_loss(ctx.baseline["full"], uniform_full, mode) if mode == "absolute" else None,
            "tried": {str(k): v for k, v in uniform_tried.items()},
        }
    pareto = [{"k": tup, "ratio": ratio, "loss_predicted": pred, "loss_measured": ctx.known(tup)}
              for tup, ratio, pred in (outcome.front if outcome else [])]
    explored = [{"k": e.k, "ratio": e.ratio, "loss_predicted": e.loss_predicted, "loss_measured": e.loss_measured,
                 "divergence": e.divergence, "stage": e.stage, "subset": e.subset} for e in ctx.explored]
    stats = scorer.stats() if hasattr(scorer, "stats") else {}
    report = {
        "onnxws_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"path": str(model_path) if model_path else None, "sha256": model_hash,
                  "opset": default_opset(proto), "params_total": int(all_bits // 32),
                  "params_shared": int(sum(info_by_name[n].params for n in chosen))},
        "data": {"path": data_path, "n_full": scorer.n_full, "n_search": scorer.n_search,
                 "fingerprint": eval_data.fingerprint()},
        "metric": metric,
        "device": scorer.provider,
        "engine": scorer.engine,
        "budget": {"loss": config.loss, "mode": mode, "unit": unit},
        "baseline": {"value": ctx.baseline["full"], "value_search": ctx.baseline["search"]},
        "final": {"value": emitted_value,
                  "value_search": None if ctx.known(chosen) is None else value_after_loss(ctx.baseline["search"], ctx.known(chosen), mode),
                  "loss": final_loss, "loss_unit": unit, "loss_search": ctx.known(chosen),
                  "value_scorer_full": scorer_value, "k": dict(chosen)},
        "compression": {"ratio_theoretical": ratio_shared, "ratio_whole_theoretical": ratio_whole,
                        "ratio_file": bytes_before / max(bytes_after, 1), "packing_efficiency": packing,
                        "bytes_before": int(bytes_before), "bytes_after": int(bytes_after),
                        "weight_bytes_before": int(all_bits // 8), "weight_bytes_after": int(weight_bytes_after),
                        "graph_overhead_bytes": int(bytes_after - weight_bytes_after)},
        "refinement": {"enabled": config.refine, "refined": sorted(output_errors),
                       "input_vectors": dict(sorted(refined_rows.items())),
                       "not_refined": [{"name": n, "reason": r} for n, r in refine_plan.reasons.items()],
                       "bias_correction": config.refine and config.bias_correction,
                       "bias_corrected": dict(sorted(corrected.items())),
                       "bias_not_corrected": [{"name": n, "reason": r} for n, r in refine_plan.bias_reasons.items()
                                              if n in output_errors]},
        "uniform_baseline": uniform_report,
        "layers": layers,
        "skipped": [{"name": s.name, "reason": s.reason, "op_type": s.op_type, "shape": list(s.shape),
                     "params": s.params, "dtype": s.dtype} for s in discovery.skipped],
        "exploration": {
            "strategy": config.strategy,
            "scorings": ctx.scorings,
            "scorings_run": int(stats.get("scorings_run", scorer.scorings_run)),
            "scorings_cached": int(stats.get("scorings_cached", scorer.scorings_cached)),
            "scorings_by_stage": dict(ctx.scorings_by_stage),
            "seconds": {k: round(v, 4) for k, v in timings.items()},
            "stopped_by": ctx.stopped_by,
            "predictor": outcome.predictor if outcome else None,
            "proxy": proxy_stats,
            "search_target": ctx.target,
            "verification": [{"k": t, "loss_search": s, "loss_full": f, "phase": phase}
                             for t, s, f, _, phase in verification.log],
            "search_subset_growth": growth,
            "edge_push": {"search_target": verification.edge_target, "min_probability": EDGE_MIN_PROBABILITY,
                          "tries": sum(1 for entry in verification.log if entry[4] == "edge"),
                          "max_tries": config.edge_tries},
            "pareto": pareto,
            "explored": explored,
            "chosen": {"k": dict(chosen), "ratio": ratio_shared},
        },
        "encoding": {"opset": encoded.opset, "notes": list(encoded.notes)},
        "config": config.to_dict(),
        "versions": _versions(),
    }
    return report
