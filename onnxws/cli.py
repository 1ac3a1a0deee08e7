"""Command line of onnxws: parses options and calls the Python API; nothing else lives here."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxws.errors import InputError, OnnxwsError, UsageError

app = typer.Typer(
    name="onnxws",
    help="Retraining-free weight sharing for ONNX models: per-layer codebooks within an accuracy-loss budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


class LossMode(str, Enum):
    absolute = "absolute"
    relative = "relative"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Strategy(str, Enum):
    predictor = "predictor"
    exhaustive = "exhaustive"
    greedy = "greedy"


class Predictor(str, Enum):
    auto = "auto"
    divergence = "divergence"
    additive = "additive"


ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", exists=True, dir_okay=False, readable=True)]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Evaluation data (.npz): one array per model input (or x), optional labels y. Default: <model stem>.npz or eval.npz beside the model.", exists=True, dir_okay=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts).")]


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn every error into one line on stderr and the DESIGN.md exit code."""
    try:
        yield
    except typer.Exit:
        raise
    except OnnxwsError as exc:
        if debug:
            err.print_exception()
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err.print("[bold red]error:[/] interrupted; nothing was written", highlight=False)
        raise typer.Exit(130) from None
    except MemoryError:
        err.print("[bold red]error:[/] out of memory; try --batch-size or fewer --search-samples", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback by default
        if debug:
            err.print_exception()
        text = " ".join(str(exc).split())[:300]
        err.print(f"[bold red]error:[/] internal error: {type(exc).__name__}: {text} (rerun with --debug for details)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _setup_logging(debug: bool, quiet: bool) -> None:
    level = logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)


class _StageProgress:
    """Rich progress bars, one per stage, fed by the pipeline's progress callback."""

    LABELS = {"calibrate": "Input moments", "cluster": "Clustering + refine", "layer": "Layer sensitivity", "fit": "Predictor fit",
              "network": "Network search", "verify": "Verification", "uniform": "Uniform baseline",
              "emit": "Emit + re-measure"}

    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<20}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[message]}"), TimeElapsedColumn(),
                                 console=err, disable=not enabled, transient=False)
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if stage not in self.tasks:
            for task_id in self.tasks.values():  # a new stage starts: close the previous ones
                task = self.progress.tasks[task_id]
                self.progress.update(task_id, total=max(task.completed, 1), completed=max(task.completed, 1))
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total or None, message="")
        self.progress.update(self.tasks[stage], completed=done, total=total or None, message=message[:60])


@app.command()
def compress(
    model: ModelArg,
    data: DataOpt = None,
    loss: Annotated[Optional[float], typer.Option(help="Accuracy-loss budget: percentage points of the metric (absolute) or percent of the baseline (relative). [default: 1]")] = None,
    loss_mode: Annotated[Optional[LossMode], typer.Option("--loss-mode", help="absolute (pp) or relative (percent of baseline). [default: absolute]")] = None,
    out_path: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output model. Default: <model stem>.ws.onnx beside the input.", dir_okay=False)] = None,
    report_dir: Annotated[Optional[Path], typer.Option("--report-dir", help="Report folder. Default: <output stem>.report beside the output.", file_okay=False)] = None,
    device: Annotated[Optional[Device], typer.Option(help="Where candidates are scored: auto (CUDA if usable), cpu, cuda. [default: auto]")] = None,
    search_samples: Annotated[Optional[int], typer.Option("--search-samples", min=1, help="Samples of the fixed search subset (the first N). [default: 2000]")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Inference batch size for scoring.")] = None,
    metric: Annotated[Optional[str], typer.Option(help="Custom metric package.module:function(outputs, data) -> float, higher is better.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Model output the metric reads (default: the first).")] = None,
    strategy: Annotated[Optional[Strategy], typer.Option(help="Network search: predictor (paper + refinement), exhaustive, greedy. [default: predictor]")] = None,
    predictor: Annotated[Optional[Predictor], typer.Option(help="Loss model of the predictor strategy: divergence (a fitted function of the summed output divergences), additive (the paper's weighted sum of losses alone), auto (the one that predicts the scored tuples better). [default: auto]")] = None,
    edge_tries: Annotated[Optional[int], typer.Option("--edge-tries", min=0, help="Most full-set scorings spent, when the verified tuple leaves loss to spare, on more compressive tuples that measured just over the budget on the search subset but within its sampling error (0: off). [default: 4]")] = None,
    grow_subset: Annotated[Optional[bool], typer.Option("--grow-subset/--no-grow-subset", help="When tuples that held on the search subset miss on the full set and the verified answer falls well short of them, grow the subset 4x (at most to the full set) and search again, within --time-budget / --max-scorings. [default: grow-subset]")] = None,
    refine: Annotated[Optional[bool], typer.Option("--refine/--no-refine", help="Refine each candidate of Gemm/MatMul/Conv weights against the layer's measured inputs (indices with error feedback, least-squares codebook): same encoding, less output error. [default: refine]")] = None,
    bias_correction: Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction", help="With --refine: give each refined weight's own bias (Conv B, Gemm C, MatMul + Add) the value that cancels the mean shift of its outputs on the search subset. [default: bias-correction]")] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", min=0.001, help="Stop exploring after this many seconds; the best verified tuple is kept.")] = None,
    max_scorings: Annotated[Optional[int], typer.Option("--max-scorings", min=1, help="Stop exploring after this many scorings (cache hits included).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (predictor sampling). [default: 0]")] = None,
    opset: Annotated[Optional[int], typer.Option(help="Pin the output opset (raised opsets unlock UINT4/UINT2 indices).")] = None,
    granularity: Annotated[Optional[str], typer.Option(help="Codebooks per tensor: tensor, channel or group:N.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML config (see DESIGN.md); options given here override it.", exists=True, dir_okay=False)] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache", help="Score-cache folder (default: the user cache folder).", file_okay=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the score cache.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or summary (errors still go to stderr).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress MODEL by weight sharing within an accuracy-loss budget."""
    _setup_logging(debug, quiet)
    with _errors(debug):
        from onnxws.config import CompressConfig
        from onnxws.pipeline import compress as run_compress
        from onnxws.report import summary_rows

        model = model.resolve()
        target = (out_path or model.with_name(model.name.removesuffix(".onnx") + ".ws.onnx")).resolve()
        _check_output(model, target, force)
        folder = (report_dir or target.with_name(target.name.removesuffix(".onnx") + ".report")).resolve()
        overrides = {
            "loss": loss, "loss_mode": loss_mode.value if loss_mode else None, "device": device.value if device else None,
            "search_samples": search_samples, "batch_size": batch_size, "metric": metric, "output": output,
            "strategy": strategy.value if strategy else None, "predictor": predictor.value if predictor else None,
            "edge_tries": edge_tries, "grow_subset": grow_subset, "refine": refine, "bias_correction": bias_correction, "time_budget": time_budget, "max_scorings": max_scorings, "seed": seed, "opset": opset,
        }
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if config is not None:
            cfg = CompressConfig.from_toml(config, **overrides)
        else:
            cfg = CompressConfig.from_dict({}, **overrides)
        if granularity is not None:
            cfg = cfg.with_granularity(granularity)
        cache: Any = False if no_cache else (cache_dir / "scores.sqlite" if cache_dir else None)
        if cache_dir is not None and not no_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
        stages = _StageProgress(enabled=not quiet and not as_json)
        with stages.progress:
            result = run_compress(model, data, config=cfg, cache=cache, progress=stages)
        result.save(target, report_dir=folder, force=force)
        report = result.report
        if as_json:
            print(json.dumps(_json_summary(report, target, folder), indent=2))
        elif not quiet:
            table = Table(title=f"onnxws: {model.name} -> {target.name}", show_header=False)
            table.add_column(style="bold")
            table.add_column()
            for key, value in summary_rows(report):
                table.add_row(key, value)
            table.add_row("Report", str(folder / "report.html"))
            err.print(table)


def _check_output(model: Path, target: Path, force: bool) -> None:
    if target == model:
        raise UsageError(f"output path {target} is the input model; choose another -o")
    if target.exists() and not force:
        raise InputError(f"output {target} exists; pass --force to overwrite it or -o to choose another path")
    if not target.parent.is_dir():
        raise InputError(f"output folder does not exist: {target.parent}")
    if not _writable(target.parent):
        raise InputError(f"output folder is not writable: {target.parent}; choose another -o")


def _writable(folder: Path) -> bool:
    """Try to create (and remove) a file there: os.access says yes to root on read-only mounts."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".onnxws-probe-"):
            return True
    except OSError:
        return False


def _json_summary(report: dict, target: Path, folder: Path) -> dict:
    return {
        "output": str(target), "report_dir": str(folder), "metric": report["metric"], "device": report["device"],
        "baseline": report["baseline"], "final": report["final"], "compression": report["compression"],
        "uniform_baseline": report.get("uniform_baseline"),
        "exploration": {k: report["exploration"][k] for k in ("strategy", "scorings", "scorings_run", "scorings_cached",
                                                              "seconds", "stopped_by")},
    }


@app.command()
def inspect(
    model: ModelArg,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """List MODEL's float tensors: shareable weights, skipped ones with the reason, and shared ones if compressed."""
    _setup_logging(debug, False)
    with _errors(debug):
        from onnxws.inspection import inspect_model

        rows, summary = inspect_model(model)
        if as_json:
            print(json.dumps({"tensors": rows, "summary": summary}, indent=2))
            return
        table = Table(title=f"{model.name}: float tensors")
        for col in ("name", "consumer", "shape", "params", "dtype", "status"):
            table.add_column(col, overflow="fold")
        for row in rows:
            status = row["status"] if row["status"] != "skipped" else f"skipped: {row['reason']}"
            if row["status"] == "shared":
                status = f"shared: k={row['k']} ({row['bits']} bit, {row['index_dtype']})"
            table.add_row(row["name"], row["op_type"], str(tuple(row["shape"])), f"{row['params']:,}", row["dtype"], status)
        out.print(table)
        for key, value in summary.items():
            out.print(f"{key}: {value}")


@app.command()
def evaluate(
    model: ModelArg,
    data: DataOpt = None,
    metric: Annotated[Optional[str], typer.Option(help="Custom metric package.module:function.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Model output the metric reads.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Uncompressed model for top-1 agreement when the data has no labels.", exists=True, dir_okay=False)] = None,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1)] = None,
    keep_compact: Annotated[bool, typer.Option("--keep-compact", help="Keep shared weights compressed in memory (no constant folding of the decoders: less memory, slower).")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Measure the metric of any model (compressed or not) on evaluation data."""
    _setup_logging(debug, False)
    with _errors(debug):
        from onnxws.evaluation import evaluate_path

        result = evaluate_path(model, data, metric=metric, output=output, reference=reference,
                               device=device.value, batch_size=batch_size, keep_compact=keep_compact)
        if as_json:
            print(json.dumps(result))
        else:
            out.print(f"{result['metric']}: {result['value']:.6f} on {result['samples']} samples ({result['device']})")


@app.command()
def batch(
    source: Annotated[Path, typer.Argument(help="Folder of .onnx models (each with its sidecar data) or a TOML manifest.", exists=True)],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Output folder: <stem>.ws.onnx, <stem>.report/, summary.md, summary.csv.", file_okay=False)],
    loss: Annotated[Optional[float], typer.Option(help="Accuracy-loss budget for every model (a manifest may override per model).")] = None,
    loss_mode: Annotated[Optional[LossMode], typer.Option("--loss-mode")] = None,
    device: Annotated[Optional[Device], typer.Option()] = None,
    search_samples: Annotated[Optional[int], typer.Option("--search-samples", min=1)] = None,
    strategy: Annotated[Optional[Strategy], typer.Option()] = None,
    predictor: Annotated[Optional[Predictor], typer.Option()] = None,
    edge_tries: Annotated[Optional[int], typer.Option("--edge-tries", min=0)] = None,
    grow_subset: Annotated[Optional[bool], typer.Option("--grow-subset/--no-grow-subset")] = None,
    refine: Annotated[Optional[bool], typer.Option("--refine/--no-refine")] = None,
    bias_correction: Annotated[Optional[bool], typer.Option("--bias-correction/--no-bias-correction")] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", min=0.001)] = None,
    max_scorings: Annotated[Optional[int], typer.Option("--max-scorings", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    config: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False)] = None,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Models compressed in parallel (processes).")] = 1,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache", file_okay=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo models that are already done.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress every model of a folder or manifest; resumable; exits 1 if any model failed."""
    _setup_logging(debug, quiet)
    with _errors(debug):
        from dataclasses import asdict

        from onnxws.batch import run_batch

        options = {"loss": loss, "loss_mode": loss_mode.value if loss_mode else None,
                   "device": device.value if device else None, "search_samples": search_samples,
                   "strategy": strategy.value if strategy else None, "predictor": predictor.value if predictor else None,
                   "edge_tries": edge_tries, "grow_subset": grow_subset, "refine": refine, "bias_correction": bias_correction, "time_budget": time_budget, "max_scorings": max_scorings, "seed": seed}
        options = {k: v for k, v in options.items() if v is not None}
        cache: Any = False if no_cache else (str(cache_dir / "scores.sqlite") if cache_dir else None)
        if cache_dir is not None and not no_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)

        def show(row) -> None:
            if not quiet and not as_json:
                detail = row.error if row.status == "failed" else (
                    f"{row.ratio_theoretical:.2f}x at {row.loss:.3f} {row.loss_unit}" if row.loss is not None else "")
                colour = "red" if row.status == "failed" else "green"
                err.print(f"[{colour}]{row.status:>15}[/] {row.model}: {detail}", highlight=False)

        rows = run_batch(source, out_dir, options, config_path=config, jobs=jobs, cache=cache, force=force, on_row=show)
        failed = [r for r in rows if r.status == "failed"]
        if as_json:
            print(json.dumps({"out_dir": str(out_dir), "models": [asdict(r) for r in rows]}, indent=2))
        elif not quiet:
            err.print(f"{len(rows)} model(s), {len(failed)} failed; summary: {out_dir / 'summary.md'}", highlight=False)
        if failed:
            raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
