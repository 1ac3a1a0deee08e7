"""Command line of onnxws: parses options and calls the Python API; nothing else lives here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxws.config import DEVICES, RUN_OPTIONS, CompressConfig, RunOption
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


Device = Enum("Device", {name: name for name in DEVICES}, type=str)


def _choices(option: RunOption) -> type[Enum]:
    return Enum(option.name.title().replace("_", ""), {c: c for c in option.choices}, type=str)


def _shown(value: Any, option: RunOption) -> str:
    if option.kind is bool:
        return option.flag[2:] if value else "no-" + option.flag[2:]
    return f"{value:g}" if isinstance(value, float) else str(value)


def _annotation(option: RunOption) -> Any:
    """The typer declaration of one run option (its default shown is CompressConfig's)."""
    default = CompressConfig.__dataclass_fields__[option.name].default
    help_text = option.help + (f" (default: {_shown(default, option)})" if default is not None else "")
    if option.kind is bool:
        return Annotated[Optional[bool], typer.Option(f"{option.flag}/--no-{option.flag[2:]}", help=help_text)]
    kind = _choices(option) if option.choices else option.kind
    limits = {"min": option.minimum} if option.minimum is not None else {}
    return Annotated[Optional[kind], typer.Option(option.flag, help=help_text, **limits)]


def _with_run_options(*, batch: bool) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one option per run option (config.RUN_OPTIONS; ``batch``: those a batch sets
    for every model), in place of its ``run_options`` parameter, which receives {name: value} of
    the options given on the command line."""
    options = [option for option in RUN_OPTIONS if option.batch or not batch]

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        declared = signature(fn, eval_str=True)
        params = list(declared.parameters.values())
        at = [p.name for p in params].index("run_options")
        added = [Parameter(o.name, Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=_annotation(o))
                 for o in options]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            given = {o.name: kwargs.pop(o.name) for o in options}
            fn(run_options={k: v.value if isinstance(v, Enum) else v for k, v in given.items() if v is not None}, **kwargs)

        command.__signature__ = declared.replace(parameters=params[:at] + added + params[at + 1:])  # type: ignore[attr-defined]
        return command

    return wrap


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
@_with_run_options(batch=False)
def compress(
    model: ModelArg,
    data: DataOpt = None,
    run_options: dict[str, Any] | None = None,
    out_path: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output model. Default: <model stem>.ws.onnx beside the input.", dir_okay=False)] = None,
    report_dir: Annotated[Optional[Path], typer.Option("--report-dir", help="Report folder. Default: <output stem>.report beside the output.", file_okay=False)] = None,
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
        from onnxws.pipeline import compress as run_compress
        from onnxws.report_html import summary_rows

        model = model.resolve()
        target = (out_path or model.with_name(model.name.removesuffix(".onnx") + ".ws.onnx")).resolve()
        _check_output(model, target, force)
        folder = (report_dir or target.with_name(target.name.removesuffix(".onnx") + ".report")).resolve()
        overrides = dict(run_options or {})
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
    metric: Annotated[Optional[str], typer.Option(help="The metric: expected_accuracy, top1_accuracy, top1_agreement or package.module:function (default: top1_accuracy with labels y, else expected_accuracy).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", help="Model output the metric reads.")] = None,
    reference: Annotated[Optional[Path], typer.Option("--reference", help="Uncompressed model, for the label-free metrics (expected_accuracy, top1_agreement).", exists=True, dir_okay=False)] = None,
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
@_with_run_options(batch=True)
def batch(
    source: Annotated[Path, typer.Argument(help="Folder of .onnx models (each with its sidecar data) or a TOML manifest.", exists=True)],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Output folder: <stem>.ws.onnx, <stem>.report/, summary.md, summary.csv.", file_okay=False)],
    run_options: dict[str, Any] | None = None,
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

        options = dict(run_options or {})
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
