"""Report stage: the report of a run (``report.json``'s dict) built from the stages' results.

Every figure in it comes from a stage result: the load stage (model, data, metric), the cluster
stage (candidates, refinement), the search context (everything scored), the uniform baseline, the
search stage (verification, subset growth), the emit stage (the written model, re-measured) and
the deployability step (``onnxws.deployability``: what the input and the written model need to
run, and what running them costs in CPU ORT).
``onnxws.report_html`` draws and writes it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform

import numpy as np
import onnx
import onnxruntime

from onnxws import __version__
from onnxws.candidates import Candidates, dtype_bits
from onnxws.config import CompressConfig
from onnxws.emit_check import Emitted
from onnxws.exploration import SearchContext, loss_unit, value_after_loss, within_budget
from onnxws.loading import Loaded
from onnxws.proto import default_opset, message_bytes, model_weight_bytes
from onnxws.refinement import Plan
from onnxws.scoring import Scorer
from onnxws.sharing import index_bits
from onnxws.statistics import CONFIDENCE
from onnxws.uniform import UniformBaseline
from onnxws.verification import EDGE_MIN_PROBABILITY, Searched


def _resolution_note(config: CompressConfig, resolution: float | None) -> str | None:
    unit = loss_unit(config.loss_mode)
    if resolution is None:
        return ("the unmodified model's outcomes do not vary on this set (top-1 agreement with itself, or every "
                "sample right): its resolution cannot be stated")
    if config.loss < resolution:
        return (f"the budget of {config.loss:g} {unit} is below this set's resolution of {resolution:.2f} {unit}: "
                "differences that small are within its sampling error")
    return None


def machine() -> dict[str, object]:
    """What else a run's output bytes may depend on: the same inputs, seed and versions give the
    same bytes on the same machine; across machines, compare these (the CPU decides which ORT
    kernels run)."""
    return {"system": platform.system(), "release": platform.release(), "architecture": platform.machine(),
            "processor": _cpu_model() or platform.processor(), "cpus": os.cpu_count()}


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def versions() -> dict[str, str]:
    """The versions a run's output bytes depend on (compare them across machines)."""
    return {"onnxws": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def build_report(loaded: Loaded, scorer: Scorer, ctx: SearchContext, config: CompressConfig, candidates: Candidates,
                 refine_plan: Plan, uniform: UniformBaseline, searched: Searched, emitted: Emitted,
                 resolution: float | None, timings: dict[str, float], *, deployability: dict | None = None) -> dict:
    """The report dict (``report.json``) of one run; ``resolution``: ``statistics.set_resolution``
    of the whole evaluation set; ``deployability``: ``deployability.assess`` of the input and the
    written model (None: not assessed)."""
    proto, discovery, eval_data = loaded.proto, loaded.discovery, loaded.data
    shares, output_errors, refined_rows = candidates.shares, candidates.output_errors, candidates.refined_rows
    verification, proxy_stats, growth = searched.verification, searched.proxy_stats, searched.growth
    chosen, outcome = verification.chosen, verification.outcome
    encoded = emitted.encoded
    bytes_before = loaded.bytes_before
    mode = config.loss_mode
    unit = loss_unit(mode)
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
            "stored_bytes": enc.stored_bytes if enc else info.params * dtype_bits(info.dtype) // 8,
            "share_of_size": (enc.stored_bytes / stored_total) if enc else None,
            "candidates": candidates,
        })
    uniform_report = None
    if uniform.tuple is not None and uniform.loss_full is not None:
        ks = sorted(set(uniform.tuple.values()))
        uniform_report = {
            "k": ks[0] if len(ks) == 1 else max(ks), "bits": index_bits(max(ks)),
            "ratio_theoretical": ctx.ratio(uniform.tuple), "loss": uniform.loss_full,
            "loss_search": ctx.known(uniform.tuple), "within_budget": within_budget(uniform.loss_full, config.loss),
            "value": value_after_loss(ctx.baseline["full"], uniform.loss_full, mode) if mode == "absolute" else None,
            "tried": {str(k): v for k, v in uniform.tried.items()},
        }
    pareto = [{"k": tup, "ratio": ratio, "loss_predicted": pred, "loss_measured": ctx.known(tup)}
              for tup, ratio, pred in (outcome.front if outcome else [])]
    explored = [{"k": e.k, "ratio": e.ratio, "loss_predicted": e.loss_predicted, "loss_measured": e.loss_measured,
                 "divergence": e.divergence, "stage": e.stage, "subset": e.subset} for e in ctx.explored]
    report = {
        "onnxws_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"path": str(loaded.model_path) if loaded.model_path else None, "sha256": loaded.model_sha256,
                  "opset": default_opset(proto), "params_total": int(all_bits // 32),
                  "params_shared": int(sum(info_by_name[n].params for n in chosen))},
        "data": {"path": loaded.data_path, "n_full": scorer.n_full, "n_search": scorer.n_search,
                 "n_holdout": scorer.n_holdout, "n_samples": eval_data.n,
                 "groups": None if eval_data.groups is None else int(len(np.unique(eval_data.groups))),
                 "fingerprint": loaded.data_fingerprint, "dropped_nonfinite": loaded.data_dropped},
        "metric": loaded.metric.name,
        "metric_description": loaded.metric.description,
        "device": scorer.provider,
        "engine": scorer.engine,
        "budget": {"loss": config.loss, "mode": mode, "unit": unit},
        "baseline": {"value": ctx.baseline["full"], "value_search": ctx.baseline["search"]},
        "final": {"holdout": None if emitted.holdout is None else emitted.holdout.as_dict(),
                  "whole": emitted.whole.as_dict(), "full": emitted.full.as_dict(),
                  "resolution": resolution, "confidence": CONFIDENCE,
                  "resolution_note": _resolution_note(config, resolution),
                  "value": emitted.value,
                  "value_search": None if ctx.known(chosen) is None else value_after_loss(ctx.baseline["search"], ctx.known(chosen), mode),
                  "loss": emitted.loss, "loss_unit": unit, "loss_search": ctx.known(chosen),
                  "value_scorer_full": emitted.scorer_value, "k": dict(chosen)},
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
            "scorings_run": int(scorer.scorings_run),
            "scorings_cached": int(scorer.scorings_cached),
            "scorings_stopped_early": int(scorer.scorings_stopped_early),
            "scorings_by_stage": dict(ctx.scorings_by_stage),
            "executor": {"name": scorer.executor.name, "jobs": scorer.executor.jobs},
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
        "deployability": deployability,
        "config": config.to_dict(),
        "versions": versions(),
        "machine": machine(),
    }
    return report
