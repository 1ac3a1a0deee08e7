"""Deployability of a run's input and output models: what each needs to run, and what running it
costs in ONNX Runtime on the CPU (``assess``, for the report; nothing here changes a model).

What a model needs (``requirements``): the opset of every domain it imports, its IR version, the
element types its tensors use, and the oldest onnxruntime release that runs it. That release is
*derived* from the table below, never tested against old releases when onnxws runs:

- ``ORT_RELEASES``, rows 0.1 to 1.20: onnxruntime's compatibility table ("ONNX opset support",
  https://onnxruntime.ai/docs/reference/compatibility.html; its source is docs/reference/compatibility.md
  in github.com/microsoft/onnxruntime, gh-pages branch): the newest ai.onnx opset and IR version
  each release implements. A release runs every opset from 7 up to its own.
- rows 1.21 to 1.25 (that table stops at 1.20): read off the PyPI wheels by hand when this table
  was written: the newest ai.onnx opset and IR version at which a one-node model loads in the CPU EP
  (1.21 and 1.22: opset 22 and IR 10 load, 23 / 11 do not; 1.23: 23 / 11, not 24 / 12; 1.24:
  25 / 13, not 26; 1.25: 26 / 13).
- ``ELEMENT_TYPE_RELEASES``: element types that need a newer release than their opset and IR
  version do. The decode nodes cast index tensors to int32 (``onnxws.encoding``), and the CPU EP's
  Cast from INT4/UINT4 came with onnxruntime 1.23 (microsoft/onnxruntime pull request 24973;
  checked by hand: 1.22.1 refuses ``Cast(21)`` on a UINT4 initializer, "Could not find an
  implementation", 1.23.2 runs it), although opset 21 and IR 10 date from 1.18. INT2/UINT2 need
  opset 25 and IR 13; 1.24 (1.24.4 checked) casts them. The same release is assumed for a model
  whose 4-bit tensors feed other ops (QuantizeLinear and DequantizeLinear had them from 1.18): the
  figure can overstate what such an input model needs.

Domains other than ai.onnx (ai.onnx.ml, com.microsoft) are reported but not accounted for.

What running a model costs (``measure``): each model is measured in a fresh Python process of its
own (``sys.executable`` running ``_main``, fed one job on stdin), so neither the run's memory nor the
other model's session skews it; the two processes start together (their imports overlap) and
measure one after the other. Sessions are ``runtime.create_session`` on the CPUExecutionProvider
with one intra-op thread (stable numbers), ORT's default graph optimisations (as a user opens the
file), read from the file as a user would (the input's own path; the output, or an in-memory
input, written to a temporary file first). A one-node session is opened first, so ORT's
environment is set up before anything is measured.

- session creation: wall time of ``create_session``, median of up to ``CREATE_REPEATS``.
- latency: one batch (the run's batch size, the first samples of the evaluation data), one
  warm-up run, then the median of up to ``RUN_REPEATS`` runs.
- memory: growth of the process's resident set from just before the first session is created:
  its peak while creating that session and running the first batch (the high-water mark VmHWM,
  reset through ``/proc/self/clear_refs``, against the resident size in ``/proc/self/statm``),
  and what is still resident once that batch has run (the session's standing footprint). Where
  the high-water mark cannot be reset, the peak is the growth of ``getrusage``'s ``ru_maxrss``,
  a lower bound (``memory_method`` says which; neither on Windows: no memory figures).

Repeats stop early once ``REPEAT_SECONDS`` of a phase are spent (at least one each), so large
models stay cheap; a measurement that fails is recorded with its reason and logged as a warning,
never raised.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxws.data import EvalData, available_memory, fixed_batch, plan_batches, proc_kib_field
from onnxws.errors import one_line
from onnxws.loading import save_model_atomic
from onnxws.proto import graphs, model_weight_bytes, nested_nodes, tensors
from onnxws.runtime import CPU, create_session

logger = logging.getLogger(__name__)

#: (onnxruntime release, newest ai.onnx opset, newest IR version), oldest first (sources: module docstring).
ORT_RELEASES: tuple[tuple[str, int, int], ...] = (
    ("0.1", 8, 3), ("0.2", 8, 3), ("0.3", 9, 3), ("0.4", 10, 5), ("0.5", 10, 5), ("1.0", 11, 6), ("1.1", 11, 6),
    ("1.3", 12, 7), ("1.4", 12, 7), ("1.5", 12, 7), ("1.6", 13, 7), ("1.7", 13, 7), ("1.8", 14, 7), ("1.9", 15, 8),
    ("1.10", 15, 8), ("1.11", 16, 8), ("1.12", 17, 8), ("1.13", 17, 8), ("1.14", 18, 8), ("1.15", 19, 8),
    ("1.16", 19, 9), ("1.17", 20, 9), ("1.18", 21, 10), ("1.19", 21, 10), ("1.20", 21, 10),
    # not in onnxruntime's table: checked by hand (module docstring)
    ("1.21", 22, 10), ("1.22", 22, 10), ("1.23", 23, 11), ("1.24", 25, 13), ("1.25", 26, 13),
)
#: The newest row that comes from onnxruntime's own table.
TABLE_NEWEST = "1.20"
#: Element types whose CPU kernels came later than their opset and IR version (module docstring).
ELEMENT_TYPE_RELEASES = {"INT4": "1.23", "UINT4": "1.23", "INT2": "1.24", "UINT2": "1.24"}
#: What the oldest-release figure is, in the report's words.
REQUIREMENT_NOTE = ("derived from onnxruntime's compatibility table (ai.onnx opset and IR version per release, "
                    f"rows up to {TABLE_NEWEST}; newer rows and the element-type rows checked by hand when the table "
                    "was written), not tested against older releases")

#: Session creations per model (fewer once REPEAT_SECONDS are spent).
CREATE_REPEATS = 5
#: Timed batch runs per model after one warm-up (fewer once REPEAT_SECONDS are spent).
RUN_REPEATS = 5
#: Seconds after which a phase (creations, runs) stops repeating.
REPEAT_SECONDS = 3.0
#: Seconds one model's measuring process may take in all.
MEASURE_TIMEOUT = 300.0
#: A model is measured only if the memory available holds this many times its weights (the run's
#: copy, the temporary file where the temporary folder is in memory, the measuring process's parse
#: and the session's weights).
MEMORY_FACTOR = 4
#: How each figure is measured, in the report's words.
METHODS = {
    "session": f"wall time of creating a CPU session (1 intra-op thread), median of up to {CREATE_REPEATS}",
    "latency": f"one batch, one warm-up run, then the median of up to {RUN_REPEATS} runs",
    "memory": ("growth of the measuring process's resident set: peak while creating the first session and running "
               "the first batch, and what stays resident after it; each model in a fresh process of its own"),
}


# --------------------------------------------------------------------------------------------
# What a model needs


def _release_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split("."))


def element_types(model: onnx.ModelProto) -> list[str]:
    """Names of the element types the model's tensors use (initializers, constants, graph inputs,
    outputs and value_info, in every graph and function; ``Cast`` targets), sorted."""
    codes = {tensor.data_type for tensor in tensors(model)}
    for graph in graphs(model.graph):
        for info in (*graph.input, *graph.output, *graph.value_info):
            if info.type.HasField("tensor_type"):
                codes.add(info.type.tensor_type.elem_type)
    bodies = [model.graph.node, *(function.node for function in model.functions)]
    for nodes in bodies:
        for node in nested_nodes(nodes):
            if node.op_type == "Cast" and node.domain in ("", "ai.onnx"):
                codes.update(a.i for a in node.attribute if a.name == "to")
    return sorted(TensorProto.DataType.Name(code) for code in codes
                  if code != TensorProto.UNDEFINED and code in TensorProto.DataType.values())


def opsets(model: onnx.ModelProto) -> dict[str, int]:
    """The opset version of every domain the model imports (the default domain as ``ai.onnx``)."""
    return {(op.domain or "ai.onnx"): int(op.version) for op in model.opset_import}


def oldest_onnxruntime(opset: int, ir_version: int, types: list[str]) -> tuple[str | None, str]:
    """The oldest release in ``ORT_RELEASES`` that implements ai.onnx ``opset``, ``ir_version`` and
    the element types ``types``, and what sets it; None when the table holds no such release."""
    reasons = [f"ai.onnx opset {opset}, IR version {ir_version}"]
    floor = (0,)
    for name in types:
        if name in ELEMENT_TYPE_RELEASES:
            floor = max(floor, _release_key(ELEMENT_TYPE_RELEASES[name]))
            reasons.append(f"{name} tensors (CPU kernels from onnxruntime {ELEMENT_TYPE_RELEASES[name]})")
    basis = "; ".join(reasons)
    for release, newest_opset, newest_ir in ORT_RELEASES:
        if newest_opset >= opset and newest_ir >= ir_version and _release_key(release) >= floor:
            return release, basis
    release, newest_opset, newest_ir = ORT_RELEASES[-1]
    return None, (f"{basis}: newer than {release}, the table's newest release "
                  f"(opset {newest_opset}, IR version {newest_ir})")


def requirements(model: onnx.ModelProto) -> dict:
    """What ``model`` needs to run: opsets per domain, IR version, element types and the oldest
    onnxruntime release (``oldest_onnxruntime``, derived from the table, not tested)."""
    domains = opsets(model)
    types = element_types(model)
    release, basis = oldest_onnxruntime(domains.get("ai.onnx", 0), int(model.ir_version), types)
    return {"opsets": domains, "ir_version": int(model.ir_version), "element_types": types,
            "onnxruntime_min": release, "onnxruntime_min_basis": basis}


# --------------------------------------------------------------------------------------------
# What running it costs (in the measuring process)


def _resident_bytes() -> int | None:
    """The process's resident set now (``/proc/self/statm``), None where there is no /proc."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak() -> bool:
    """Reset the process's resident high-water mark (VmHWM) to its resident set; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int | None:
    """The process's resident high-water mark (VmHWM in ``/proc/self/status``)."""
    return proc_kib_field("/proc/self/status", "VmHWM")


def _max_rss_bytes() -> int | None:
    """``getrusage``'s ``ru_maxrss`` in bytes (kilobytes on Linux, bytes on macOS); None without it
    (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _probe_session() -> None:
    """Open and drop a one-node session: ORT's environment is set up before anything is measured."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    create_session(probe, optimization="default", threads=1).run(None, {"x": np.zeros(1, np.float32)})


def measure(model_path: str | Path, feeds: Mapping[str, np.ndarray], *, seconds: float = REPEAT_SECONDS) -> dict:
    """Session creation times, batch latencies and memory growth of the model at ``model_path``,
    measured in this process (call it in a fresh one: ``measure_models``).

    Returns:
        ``create_seconds`` and ``run_seconds`` (every timed repeat), ``peak_rss_bytes``,
        ``rss_bytes`` (None where not measurable), ``memory_method``, ``rows`` (the batch's samples).
    """
    open_session = {"optimization": "default", "threads": 1}
    _probe_session()
    gc.collect()
    exact = _reset_peak()
    before, max_before = _resident_bytes(), _max_rss_bytes()
    t0 = time.perf_counter()
    session = create_session(str(model_path), **open_session)
    create = [time.perf_counter() - t0]
    session.run(None, dict(feeds))  # the first batch, also the warm-up of the timed runs
    after, peak = _resident_bytes(), _peak_bytes() if exact else None
    max_after = _max_rss_bytes()
    if exact and peak is not None and before is not None:
        method, peak_growth = "VmHWM reset through /proc/self/clear_refs, against /proc/self/statm", peak - before
    elif max_before is not None and max_after is not None:
        method, peak_growth = "getrusage ru_maxrss growth (a lower bound)", max_after - max_before
    else:
        method, peak_growth = "not measurable here (no /proc, no getrusage)", None
    runs: list[float] = []
    started = time.perf_counter()
    while len(runs) < RUN_REPEATS and (not runs or time.perf_counter() - started < seconds):
        t0 = time.perf_counter()
        session.run(None, dict(feeds))
        runs.append(time.perf_counter() - t0)
    del session
    started = time.perf_counter()
    while len(create) < CREATE_REPEATS and time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        session = create_session(str(model_path), **open_session)
        create.append(time.perf_counter() - t0)
        del session
    return {"create_seconds": create, "run_seconds": runs,
            "peak_rss_bytes": None if peak_growth is None else int(peak_growth),
            "rss_bytes": None if after is None or before is None else int(after - before), "memory_method": method,
            "rows": int(len(next(iter(feeds.values())))) if feeds else 0}


def _main() -> None:
    """The measuring process: one JSON job on stdin (``model``, ``feeds`` .npz, ``names``, ``seconds``),
    one JSON result (``measure``) on stdout."""
    job = json.loads(sys.stdin.readline())
    with np.load(job["feeds"]) as npz:
        feeds = {name: npz[f"arr_{i}"] for i, name in enumerate(job["names"])}
    sys.stdout.write(json.dumps(measure(job["model"], feeds, seconds=job["seconds"])) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# In the run


def first_batch(data: EvalData, batch_size: int, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The feeds of the run's first batch: its first ``batch_size`` samples (a fixed batch padded as
    the run pads it)."""
    fixed = fixed_batch(model, data.input_names)
    size = fixed or batch_size
    return plan_batches(data.head(size), size, fixed)[0][0]


def _summary(raw: dict) -> dict:
    """A measurement's medians next to its raw repeats."""
    return {"create_seconds": statistics.median(raw["create_seconds"]), "create_repeats": len(raw["create_seconds"]),
            "latency_seconds": statistics.median(raw["run_seconds"]), "latency_repeats": len(raw["run_seconds"]),
            "batch": raw["rows"], "peak_rss_bytes": raw["peak_rss_bytes"], "rss_bytes": raw["rss_bytes"],
            "memory_method": raw["memory_method"], "create_seconds_all": raw["create_seconds"],
            "latency_seconds_all": raw["run_seconds"]}


#: The measuring process's program: this onnxws (its folder put first on the path unless already on
#: it), then ``_main``.
_CHILD = ("import sys; root = sys.argv[1]; root in sys.path or sys.path.insert(0, root); "
          "from onnxws.deployability import _main; _main()")


def _result(proc: subprocess.Popen, job: dict) -> dict:
    """The measuring process's result for ``job``, or ``{"error": ...}`` (it is killed past MEASURE_TIMEOUT)."""
    try:
        out, err = proc.communicate(json.dumps(job) + "\n", timeout=MEASURE_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": f"not measured: took over {MEASURE_TIMEOUT:g} s"}
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = [line for line in err.strip().splitlines() if line.strip()][-1:] or [f"exit status {proc.returncode}"]
        return {"error": f"not measured: {one_line(tail[0])[:300]}"}
    return _summary(json.loads(lines[-1]))


def measure_models(models: Mapping[str, str | Path | onnx.ModelProto], feeds: Mapping[str, np.ndarray], *,
                   seconds: float = REPEAT_SECONDS) -> dict[str, dict]:
    """``measure`` of each model (a path ORT reads, or a ModelProto written to a temporary file first),
    each in a measuring process of its own, one after the other; by name. A model that cannot be
    measured gets ``{"error": reason}``."""
    results: dict[str, dict] = {}
    procs: dict[str, subprocess.Popen] = {}
    with tempfile.TemporaryDirectory(prefix="onnxws-deploy-") as folder:
        try:
            feeds_path = Path(folder) / "feeds.npz"
            np.savez(feeds_path, *feeds.values())  # by position: input names need not be valid file names
            paths: dict[str, str] = {}
            for name, model in models.items():
                try:
                    if isinstance(model, onnx.ModelProto):
                        path = Path(folder) / f"{name}.onnx"
                        save_model_atomic(model, path)
                        model = path
                    paths[name] = str(model)
                except Exception as exc:  # noqa: BLE001 - a measurement never fails the run
                    results[name] = {"error": f"not measured: {type(exc).__name__}: {one_line(exc)}"}
            for name in paths:  # started together: their imports overlap
                program = [sys.executable, "-c", _CHILD, str(Path(__file__).resolve().parents[1])]
                procs[name] = subprocess.Popen(program, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True)
            for name, proc in procs.items():
                results[name] = _result(proc, {"model": paths[name], "feeds": str(feeds_path), "names": list(feeds),
                                               "seconds": seconds})
        except Exception as exc:  # noqa: BLE001 - a measurement never fails the run
            for name in models:
                results.setdefault(name, {"error": f"not measured: {type(exc).__name__}: {one_line(exc)}"})
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
    return {name: results[name] for name in models}


def _too_large(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is not measured for want of memory (``MEMORY_FACTOR``), or None."""
    size, have = model_weight_bytes(model), available_memory()
    if have is not None and MEMORY_FACTOR * size > have:
        return (f"not measured: {MEMORY_FACTOR} x its {size / 2**20:.0f} MiB of weights exceeds the "
                f"{have / 2**20:.0f} MiB of memory available")
    return None


def _ratio(output: dict, input_: dict, key: str) -> float | None:
    a, b = output.get(key), input_.get(key)
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


MEASURE_ENV = "ONNXWS_MEASURE_DEPLOYMENT"
"""Set to 0 to skip the CPU measurements (two Python processes, a few seconds a run): test suites,
large batches. The requirements (opsets, oldest onnxruntime) are always in the report."""


def measurement_wanted() -> bool:
    """False when ``ONNXWS_MEASURE_DEPLOYMENT`` is 0 (or false, no, off)."""
    return os.environ.get(MEASURE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def assess(input_model: onnx.ModelProto, output_model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], *,
           input_path: str | Path | None = None, seconds: float = REPEAT_SECONDS, measure: bool = True) -> dict:
    """The report's ``deployability``: ``requirements`` and ``measure`` figures of the input and the
    output model, the output's figures over the input's, and how each is measured.

    Args:
        input_model: the input model (its headers suffice when ``input_path`` is given).
        output_model: the model the run writes (not modified).
        feeds: one batch of model inputs (``first_batch``).
        input_path: the input's file, which ORT reads (external data included); None: ``input_model``
            holds its payloads and is written to a temporary file.
        seconds: per phase, the time after which repeats stop.
        measure: False: the requirements only, each side's ``session`` says the measurement was skipped.

    Never raises: what fails is recorded under ``error`` with its reason.
    """
    t0 = time.perf_counter()
    entry: dict = {}
    try:
        entry["input"] = requirements(input_model)
        entry["output"] = requirements(output_model)
        sides = {"input": (input_model, input_path if input_path is not None else input_model),
                 "output": (output_model, output_model)}
        if measure:
            refused = {side: {"error": why} for side, (proto, _) in sides.items() if (why := _too_large(proto))}
            measured = measure_models({side: source for side, (_, source) in sides.items() if side not in refused},
                                      feeds, seconds=seconds)
            measured.update(refused)
        else:
            measured = {side: {"error": f"not measured ({MEASURE_ENV}=0)", "skipped": True} for side in sides}
        for side in sides:
            entry[side]["session"] = measured[side]
            if "error" in measured[side] and not measured[side].get("skipped"):
                logger.warning("deployability: the %s model was %s", side, measured[side]["error"])
        entry["output_vs_input"] = {key: _ratio(measured["output"], measured["input"], key)
                                    for key in ("create_seconds", "latency_seconds", "peak_rss_bytes", "rss_bytes")}
    except Exception as exc:  # noqa: BLE001 - deployability never fails a run
        logger.warning("deployability not assessed: %s: %s", type(exc).__name__, one_line(exc))
        entry["error"] = f"{type(exc).__name__}: {one_line(exc)}"
    entry["onnxruntime_min_note"] = REQUIREMENT_NOTE
    entry["measured_with"] = {"onnxruntime": ort.__version__, "provider": CPU, "intra_op_threads": 1,
                              "batch": int(len(next(iter(feeds.values())))) if feeds else 0, "methods": dict(METHODS)}
    entry["seconds"] = time.perf_counter() - t0
    return entry

