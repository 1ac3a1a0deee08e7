"""Command line of onnxws: parses options and calls the Python API; nothing else lives here."""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from contextlib import contextmanager
from enum import Enum
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxws import __version__
from onnxws.config import DEVICES, RUN_OPTIONS, CompressConfig, RunOption
from onnxws.console import PrintableFormatter, message_line, plain, printable, terminal
from onnxws.errors import InputError, OnnxwsError, interrupts

app = typer.Typer(
    name="onnxws",
    help="Retraining-free weight sharing for ONNX models: per-layer codebooks within an accuracy-loss budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts verbatim: they hold TOML table names in brackets
)
err = terminal.err
out = terminal.out

# Exit codes (the README lists them): 0 done, 1 bad input or a failed model, 2 usage, 3 nothing fits
# the budget, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that every clean-up runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    interrupts.note()
    raise Terminated()


def _on_sigint(signum: int, frame: Any) -> None:
    interrupts.note()
    raise KeyboardInterrupt()


def _version(value: bool) -> None:
    if value:
        out.print(plain(f"onnxws {__version__}"))
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version,
                                                is_eager=True)] = False) -> None:
    """Retraining-free weight sharing for ONNX models: per-layer codebooks within an accuracy-loss budget."""


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


QUIET_HELP = "No progress or summary (warnings and errors still go to stderr)."
RAY_HELP = ("Score on a Ray cluster (pip install \"onnxws[ray]\"): local (start one on this machine), auto (the running "
            "one, or RAY_ADDRESS), HOST:PORT or ray://HOST:PORT. Not part of the config: the output is the same.")
ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", exists=True, dir_okay=False, readable=True)]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Evaluation data (.npz): one array per model input (or x), optional labels y. Default: <model stem>.npz or eval.npz beside the model.", exists=True, dir_okay=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (for scripts).")]


class Written:
    """What a command has put on disk so far, for the line an interruption prints."""

    def __init__(self) -> None:
        self.paths: list[Path] = []

    def summary(self) -> str:
        if not self.paths:
            return "nothing was written"
        return "already written: " + ", ".join(str(p) for p in self.paths)


@contextmanager
def _errors(debug: bool, as_json: bool = False, written: Written | None = None) -> Iterator[None]:
    """Turn every error into one verbatim line on stderr (and one JSON object on stdout with
    ``--json``) and its exit code; SIGTERM is handled like Ctrl-C."""
    terminal.json_errors = as_json
    written = written or Written()
    handlers = {signal.SIGTERM: _on_sigterm, signal.SIGINT: _on_sigint} if _main_thread() else {}
    previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    interrupts.watching, interrupts.received = bool(handlers), False
    try:
        yield
    except typer.Exit:
        raise
    except OnnxwsError as exc:
        if debug:
            err.print_exception()
        terminal.error(exc, exc.exit_code)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        code, what = (EXIT_TERMINATED, "terminated (SIGTERM)") if isinstance(exc, Terminated) else (
            EXIT_INTERRUPTED, "interrupted")
        terminal.error(f"{what}; {written.summary()}", code)
        raise typer.Exit(code) from None
    except MemoryError:
        terminal.error("out of memory; try a smaller --batch-size (or less evaluation data)", 1)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback by default
        if debug:
            err.print_exception()
        terminal.error(f"internal error: {type(exc).__name__}: {message_line(exc)[:300]} (a bug in onnxws; rerun "
                       "with --debug for details)", 1)
        raise typer.Exit(1) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        interrupts.watching = False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _setup_logging(debug: bool) -> None:
    """Warnings and errors on stderr (``--quiet`` too: a warning says a result may mislead), debug
    logs with ``--debug``."""
    level = logging.DEBUG if debug else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


class _StageProgress:
    """Rich progress bars, one per stage, fed by the pipeline's progress callback."""

    LABELS = {"calibrate": "Input moments", "cluster": "Clustering + refine", "layer": "Layer sensitivity", "fit": "Predictor fit",
              "network": "Network search", "verify": "Verification", "uniform": "Uniform baseline",
              "emit": "Emit + re-measure", "deploy": "Deployability"}

    def __init__(self, enabled: bool) -> None:
        # markup=False: stage messages carry tensor names, shown verbatim (and escaped)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<20}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[message]}", markup=False),
                                 TimeElapsedColumn(), console=err, disable=not enabled, transient=False)
        self.tasks: dict[str, Any] = {}
        self.started = False

    def __enter__(self) -> _StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:  # a display that never showed a bar prints nothing (no stray blank line)
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if stage not in self.tasks:
            for task_id in self.tasks.values():  # a new stage starts: close the previous ones
                task = self.progress.tasks[task_id]
                self.progress.update(task_id, total=max(task.completed, 1), completed=max(task.completed, 1))
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage), total=total or None, message="")
        self.progress.update(self.tasks[stage], completed=done, total=total or None,
                             message=printable(message)[:60])


@app.command()
@_with_run_options(batch=False)
def compress(
    model: ModelArg,
    data: DataOpt = None,
    run_options: dict[str, Any] | None = None,
    out_path: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output model. Default: <model stem>.ws.onnx beside the input.", dir_okay=False)] = None,
    report_dir: Annotated[Optional[Path], typer.Option("--report-dir", help="Report folder. Default: <output stem>.report beside the output.", file_okay=False)] = None,
    granularity: Annotated[Optional[str], typer.Option(help="Codebooks per tensor: tensor (one), channel (one per output channel), group:N (one per N channels) or auto (the search picks per tensor) (default: tensor).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML config: [global] (run options and tensor defaults), [op_type.NAME] and [tensor.\"GLOB\"] tables of tensor settings (skip, min_params, bits, k_max, granularity), most specific first; options given here override it. Every report folder holds its run's resolved config.toml.", exists=True, dir_okay=False)] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache", help="Score-cache folder (default: the user cache folder).", file_okay=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the score cache.")] = False,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="Workers scoring candidates side by side, one ONNX Runtime thread each: processes on this machine (default 1: in this process, with ORT's own threads), or Ray actors with --ray (default: one per CPU of the cluster). Not part of the config: the scores are the same.")] = None,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help=RAY_HELP)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output of a different job (other model, data or settings); a rerun of the same job replaces its own output without it.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress MODEL by weight sharing within an accuracy-loss budget."""
    _setup_logging(debug)
    written = Written()
    with _errors(debug, as_json, written):
        from onnxws.outputs import check_outputs, default_output, job_identity, report_folder
        from onnxws.pipeline import compress as run_compress
        from onnxws.report_html import summary_rows

        model = model.absolute()
        target = (out_path or default_output(model)).absolute()  # not resolved: -o through a link stays the link
        folder = (report_dir or report_folder(target)).absolute()
        overrides = dict(run_options or {})
        if config is not None:
            cfg = CompressConfig.from_toml(config, **overrides)
        else:
            cfg = CompressConfig.from_dict({}, **overrides)
        if granularity is not None:
            cfg = cfg.with_granularity(granularity)
        check_outputs(target, folder, force=force, inputs=[model, data, config],
                      job=lambda: job_identity(model, data, cfg.to_dict()))
        cache: Any = False if no_cache else (cache_dir / "scores.sqlite" if cache_dir else None)
        with _StageProgress(enabled=not quiet and not as_json) as stages:
            result = run_compress(model, data, config=cfg, cache=cache, progress=stages, jobs=jobs, ray=ray)
        result.save(target, report_dir=folder, force=force)
        written.paths += [target, folder]
        report = result.report
        if as_json:
            terminal.result(_json_summary(report, target, folder))
        elif not quiet:
            table = Table(title=plain(f"onnxws: {model.name} -> {target.name}"), show_header=False)
            table.add_column(style="bold")
            table.add_column()
            for key, value in summary_rows(report):
                table.add_row(plain(key), plain(value))
            table.add_row(plain("Report"), plain(folder / "report.html"))
            err.print(table)


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
    _setup_logging(debug)
    with _errors(debug, as_json):
        from onnxws.inspection import inspect_model

        rows, summary = inspect_model(model)
        if as_json:
            terminal.result({"tensors": rows, "summary": summary})
            return
        table = Table(title=plain(f"{model.name}: float tensors"))
        for col in ("name", "consumer", "shape", "params", "dtype", "status"):
            table.add_column(col, overflow="fold")
        for row in rows:
            status = row["status"] if row["status"] != "skipped" else f"skipped: {row['reason']}"
            if row["status"] == "shared":
                status = f"shared: k={row['k']} ({row['bits']} bit, {row['index_dtype']})"
            cells = (row["name"], row["op_type"], tuple(row["shape"]), f"{row['params']:,}", row["dtype"], status)
            table.add_row(*(plain(cell) for cell in cells))
        out.print(table)
        for key, value in summary.items():
            out.print(plain(f"{key}: {value}"))


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
    _setup_logging(debug)
    with _errors(debug, as_json):
        from onnxws.evaluation import evaluate_path

        result = evaluate_path(model, data, metric=metric, output=output, reference=reference,
                               device=device.value, batch_size=batch_size, keep_compact=keep_compact)
        if as_json:
            terminal.result(result)
        else:
            out.print(plain(f"{result['metric']}: {result['value']:.6f} on {result['samples']} samples ({result['device']})"))


@app.command("data")
def data_command(
    images: Annotated[Path, typer.Argument(help="Folder of images: one subfolder per class (labels y), or flat (no labels).", exists=True, file_okay=False)],
    out_path: Annotated[Path, typer.Option("-o", "--out", help="The .npz to write (missing folders are created).", dir_okay=False)],
    preset: Annotated[str, typer.Option("--preset", help="Preprocessing preset: imagenet = RGB, short side to 256 (bilinear), centre 224 crop, /255, ImageNet mean and std, NCHW float32.")] = "imagenet",
    size: Annotated[Optional[int], typer.Option("--size", min=1, help="Resize the short side to this (default: the preset's, 256).")] = None,
    crop: Annotated[Optional[int], typer.Option("--crop", min=1, help="Centre crop side (default: the preset's, 224).")] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help="nchw or nhwc (default: nchw).")] = None,
    mean: Annotated[Optional[tuple[float, float, float]], typer.Option("--mean", help="Per-channel mean, RGB, on the 0-1 scale (default: ImageNet's).")] = None,
    std: Annotated[Optional[tuple[float, float, float]], typer.Option("--std", help="Per-channel std, RGB, on the 0-1 scale (default: ImageNet's).")] = None,
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32 (normalised) or uint8 (raw pixels, for models that normalise in the graph) (default: float32).")] = None,
    input_name: Annotated[str, typer.Option("--input", help="Array name: the model input it feeds (x fits any single-input model).")] = "x",
    classes: Annotated[Optional[Path], typer.Option("--classes", help="Class names, one per line in index order (the subfolders are named after them). Without it the sorted subfolder names are 0..n-1, and that mapping is saved beside the npz.", exists=True, dir_okay=False)] = None,
    group_by: Annotated[Optional[str], typer.Option("--group-by", help="Regular expression over each image's path relative to the folder: images with the same match (its first group, if any) share a group id (e.g. the source photograph of several views).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Turn a folder of images into an evaluation .npz of model-ready arrays."""
    _setup_logging(debug)
    with _errors(debug, as_json):
        from onnxws.images import build_npz, preprocessing

        target = out_path.absolute()
        if target.exists() and not force:
            raise InputError(f"output {target} exists; pass --force to replace it, or -o to choose another path")
        prep = preprocessing(preset, size=size, crop=crop, layout=layout, dtype=dtype, mean=mean, std=std)
        summary = build_npz(images, target, prep, input_name=input_name, classes_file=classes, group_by=group_by)
        if as_json:
            terminal.result(summary)
            return
        terminal.note(f"wrote {summary['output']}: {summary['samples']} images as {summary['input']!s} "
                      f"{summary['dtype']} {summary['shape']}" + (f", {summary['classes']} classes" if summary["classes"] else
                                                               ", no labels (flat folder)")
                      + (f", {summary['groups']} groups" if summary["groups"] else ""))
        if "class_mapping" in summary:
            names = summary["class_names"]
            shown = ", ".join(f"{i}={name}" for i, name in enumerate(names[:10])) + (", ..." if len(names) > 10 else "")
            terminal.note(f"class indices from the sorted folder names ({shown}); saved to {summary['class_mapping']}. "
                          "If the model's classes are numbered otherwise, pass --classes FILE")


@app.command()
@_with_run_options(batch=True)
def batch(
    source: Annotated[Path, typer.Argument(help="Folder of .onnx models (each with its sidecar data) or a TOML manifest.", exists=True)],
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Output folder: <stem>.ws.onnx, <stem>.ws.report/, summary.md, summary.csv.", file_okay=False)],
    run_options: dict[str, Any] | None = None,
    config: Annotated[Optional[Path], typer.Option("--config", exists=True, dir_okay=False)] = None,
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Models compressed side by side (processes; with --ray, threads whose scorings share the cluster).")] = 1,
    ray: Annotated[Optional[str], typer.Option("--ray", metavar="ADDRESS", help=RAY_HELP)] = None,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache", file_okay=False)] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache")] = False,
    force: Annotated[bool, typer.Option("--force", help="Redo models that are already done.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help=QUIET_HELP)] = False,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compress every model of a folder or manifest; resumable; exits 1 if any model failed."""
    _setup_logging(debug)
    written = Written()
    with _errors(debug, as_json, written):
        from dataclasses import asdict

        from onnxws.batch import run_batch

        options = dict(run_options or {})
        cache: Any = False if no_cache else (str(cache_dir / "scores.sqlite") if cache_dir else None)

        def show(row) -> None:
            if row.status != "failed":
                written.paths.append(out_dir / f"{row.model}.ws.onnx")
            if not quiet and not as_json:
                detail = row.error if row.status == "failed" else (
                    f"{row.ratio_theoretical:.2f}x at {row.loss:.3f} {row.loss_unit}" if row.loss is not None else "")
                colour = "red" if row.status == "failed" else "green"
                err.print(plain(f"{row.status:>15}", colour) + plain(f" {row.model}: ") + plain(message_line(detail)),
                          soft_wrap=True)

        rows = run_batch(source, out_dir, options, config_path=config, jobs=jobs, cache=cache, force=force, on_row=show,
                         ray=ray)
        failed = [r for r in rows if r.status == "failed"]
        if as_json:
            terminal.result({"out_dir": str(out_dir), "models": [asdict(r) for r in rows]})
        elif not quiet:
            terminal.note(f"{len(rows)} model(s), {len(failed)} failed; summary: {out_dir / 'summary.md'}")
        if failed:
            raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: the app, with usage errors also as JSON under ``--json``."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        terminal.error("interrupted; nothing was written", EXIT_INTERRUPTED)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # the parser's usage errors (click's ClickException family)
        show, text = getattr(exc, "show", None), getattr(exc, "format_message", None)
        if show is None or text is None:
            raise
        show()
        code = getattr(exc, "exit_code", 2)
        if "--json" in sys.argv[1:] and code:
            terminal.result({"error": message_line(text()), "exit_code": code})
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
