"""Round-trip fidelity of two graph libraries on ONNX models (docs/graph_libraries.md).

Builds one small model per case with ``onnx.helper`` and round-trips it through

- onnx-graphsurgeon: ``gs.export_onnx(gs.import_onnx(model))``
- onnx-ir: ``onnx_ir.serde.serialize_model(onnx_ir.serde.deserialize_model(model))``

then compares the output with the input proto field by field: what the case is about (kept?), the
deterministic bytes (identical?) and ``onnx.checker.check_model`` on the output. Every other field
path that changed is listed below the table. External-data cases (7, 13) run the round trip from
the data file's folder and watch for files opened there (``sys.addaudithook``, descriptors resolved)
and for bytes read (``/proc/self/io`` rchar), so a library that reads a payload is seen; their
checker runs by path, with an empty ``onnxws-placeholder`` file beside the copy as onnxws does for
light copies. A library that is not installed is skipped with a message. Does not import torch.

    /path/to/venv/bin/python tools/bench_graph_libraries.py [--verbose]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

try:
    import ml_dtypes
except ImportError:  # only case 12 needs it
    ml_dtypes = None

# --------------------------------------------------------------------------------------------
# Libraries


def _graphsurgeon():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:
        print(f"skipping onnx-graphsurgeon: not installed ({exc})", file=sys.stderr)
        return None
    return "onnx-graphsurgeon", gs.__version__, lambda model: gs.export_onnx(gs.import_onnx(model))


def _onnx_ir():
    try:
        import onnx_ir as ir
    except ImportError as exc:
        print(f"skipping onnx-ir: not installed ({exc})", file=sys.stderr)
        return None
    return "onnx-ir", ir.__version__, lambda model: ir.serde.serialize_model(ir.serde.deserialize_model(model))


# --------------------------------------------------------------------------------------------
# Proto comparison


def proto_diff(a, b, path: str = "") -> list[str]:
    """Field paths where protobuf messages ``a`` and ``b`` differ (set/unset counts as a difference)."""
    out: list[str] = []
    names = {f.name: f for f, _ in a.ListFields()} | {f.name: f for f, _ in b.ListFields()}
    for name, field in sorted(names.items()):
        where = f"{path}.{name}" if path else name
        x, y = getattr(a, name), getattr(b, name)
        repeated = getattr(field, "is_repeated", None)
        repeated = repeated if repeated is not None else field.label == field.LABEL_REPEATED
        message = field.message_type is not None
        if repeated:
            if len(x) != len(y):
                out.append(f"{where}: {len(x)} -> {len(y)} entries")
                continue
            for i, (u, v) in enumerate(zip(x, y)):
                if message:
                    out.extend(proto_diff(u, v, f"{where}[{i}]"))
                elif u != v:
                    out.append(f"{where}[{i}]: {u!r} -> {v!r}")
        elif message:
            has_a, has_b = a.HasField(name), b.HasField(name)
            if has_a != has_b:
                out.append(f"{where}: {'set' if has_a else 'unset'} -> {'set' if has_b else 'unset'}")
            else:
                out.extend(proto_diff(x, y, where))
        elif x != y or a.HasField(name) != b.HasField(name):
            if x == y:
                out.append(f"{where}: {'set' if a.HasField(name) else 'unset'} -> {'set' if b.HasField(name) else 'unset'} (value {x!r})")
                continue
            shown = (lambda v: f"<{len(v)} bytes>" if isinstance(v, bytes) and len(v) > 16 else repr(v))
            out.append(f"{where}: {shown(x)} -> {shown(y)}")
    return out


def all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            for g in attr.graphs:
                yield from all_graphs(g)


def initializer_count(model: onnx.ModelProto) -> int:
    return sum(len(g.initializer) + len(g.sparse_initializer) for g in all_graphs(model.graph))


def tensor_named(model: onnx.ModelProto, name: str) -> TensorProto | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def same(label: str, a, b) -> list[str]:
    """[] when equal, else a one-entry loss list."""
    return [] if a == b else [label]


def props(label: str, a, b) -> list[str]:
    """Compare two metadata_props lists: [] when equal, else 'drops'/'changes' with the entry counts."""
    a, b = [(e.key, e.value) for e in a], [(e.key, e.value) for e in b]
    if a == b:
        return []
    if not b:
        return [f"drops {label}"]
    if b == a + a:
        return [f"duplicates {label} ({len(a)} -> {len(b)} entries)"]
    return [f"changes {label} ({len(a)} -> {len(b)} entries)"]


def diff_of(label: str, a, b) -> list[str]:
    return [] if not proto_diff(a, b) else [label]


# --------------------------------------------------------------------------------------------
# Cases: each returns (model, check(in, out) -> list of losses, folder holding external data or None)


def _relu_graph(**kwargs) -> onnx.GraphProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    return helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y], **kwargs)


def _model(graph: onnx.GraphProto, opset: int = 17, **kwargs) -> onnx.ModelProto:
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)


def case_model_fields(_):
    m = _model(_relu_graph(), doc_string="model doc", domain="ai.onnxws.test", model_version=7,
               producer_name="onnxws-bench", producer_version="1.2.3")

    def check(a, b):
        lost = [f for f in ("doc_string", "domain", "model_version", "producer_name", "producer_version")
                if getattr(a, f) != getattr(b, f)]
        return [f"drops model {', '.join(lost)}"] if lost else []
    return m, check, None


def case_model_metadata(_):
    m = _model(_relu_graph())
    helper.set_model_props(m, {"author": "onnxws", "license": "MIT"})
    return m, lambda a, b: props("model metadata_props", a.metadata_props, b.metadata_props), None


def case_graph_metadata(_):
    g = _relu_graph(doc_string="graph doc")
    entry = g.metadata_props.add()
    entry.key, entry.value = "graph-key", "graph-value"

    def check(a, b):
        return (same("drops graph doc_string", a.graph.doc_string, b.graph.doc_string)
                + props("graph metadata_props", a.graph.metadata_props, b.graph.metadata_props))
    return _model(g), check, None


def case_node_fields(_):
    g = _relu_graph()
    node = g.node[0]
    node.doc_string = "node doc"
    entry = node.metadata_props.add()
    entry.key, entry.value = "node-key", "node-value"

    def check(a, b):
        na, nb = a.graph.node[0], b.graph.node[0]
        return (same("drops node doc_string", na.doc_string, nb.doc_string)
                + props("node metadata_props", na.metadata_props, nb.metadata_props))
    return _model(g), check, None


def case_functions(_):
    fn = helper.make_function("custom", "ScaledRelu", ["X"], ["Y"],
                              [helper.make_node("Constant", [], ["two"], value_float=2.0),
                               helper.make_node("Mul", ["X", "two"], ["T"]),
                               helper.make_node("Relu", ["T"], ["Y"])],
                              [helper.make_opsetid("", 17)], doc_string="function doc")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("ScaledRelu", ["x"], ["y"], name="call", domain="custom")], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
                          functions=[fn])

    def check(a, b):
        return (diff_of("changes/drops the FunctionProto", onnx.ModelProto(functions=a.functions),
                        onnx.ModelProto(functions=b.functions))
                + diff_of("changes the calling node", a.graph.node[0], b.graph.node[0]))
    return m, check, None


def case_sparse(_):
    values = helper.make_tensor("S_values", TensorProto.FLOAT, [2], [1.5, -2.0])
    indices = helper.make_tensor("S_indices", TensorProto.INT64, [2], [1, 4])
    sparse = helper.make_sparse_tensor(values, indices, [2, 3])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Add", ["x", "S_values"], ["y"])], "g", [x], [y], sparse_initializer=[sparse])

    def check(a, b):
        if not b.graph.sparse_initializer:
            return ["drops sparse_initializer"]
        return diff_of("changes sparse_initializer", onnx.GraphProto(sparse_initializer=a.graph.sparse_initializer),
                       onnx.GraphProto(sparse_initializer=b.graph.sparse_initializer))
    return _model(g), check, None


def _matmul_model(weight: TensorProto) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y], initializer=[weight])
    return _model(g)


def _check_external(a, b):
    ta, tb = tensor_named(a, "W"), tensor_named(b, "W")
    if tb is None:
        return ["drops the initializer"]
    losses = []
    if tb.data_location != TensorProto.EXTERNAL:
        losses.append("no longer EXTERNAL")
    if [(e.key, e.value) for e in ta.external_data] != [(e.key, e.value) for e in tb.external_data]:
        losses.append(f"external_data {[(e.key, e.value) for e in tb.external_data]}")
    if tb.HasField("raw_data") or len(tb.float_data):
        losses.append("payload copied into the proto")
    if list(ta.dims) != list(tb.dims) or ta.data_type != tb.data_type:
        losses.append("dims/type changed")
    return losses


def case_external(folder: Path):
    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "W")
    path = folder / "model.onnx"
    onnx.save(_matmul_model(weight), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    m = onnx.load(str(path), load_external_data=False)
    return m, _check_external, folder


def case_subgraphs(_):
    w = numpy_helper.from_array(np.full([2, 3], 0.5, dtype=np.float32), "W")
    then_g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["t_out"])], "then",
                               [], [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 3])])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "W"], ["e_out"])], "else",
                               [], [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 3])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "W"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [2, 3])])
    g = helper.make_graph(
        [helper.make_node("If", ["c"], ["branch"], then_branch=then_g, else_branch=else_g, name="if"),
         helper.make_node("Loop", ["n", "c", "branch"], ["y"], body=body, name="loop")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("n", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[w])

    def check(a, b):
        losses = []
        if initializer_count(a) != initializer_count(b):
            losses.append(f"initializers {initializer_count(a)} -> {initializer_count(b)} (W copied into each body)")
        for i, node in enumerate(a.graph.node if not losses else []):
            for j, attr in enumerate(node.attribute):
                if attr.type == onnx.AttributeProto.GRAPH:
                    out = next((x for x in b.graph.node[i].attribute if x.name == attr.name), None)
                    if out is None or proto_diff(attr.g, out.g):
                        losses.append(f"{node.op_type}.{attr.name} body changed")
        return losses
    return _model(g, 17), check, None


def case_unused_value_info(_):
    g = _relu_graph()
    g.value_info.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [4]))
    g.value_info.append(helper.make_tensor_value_info("also_unused", TensorProto.INT64, [1, 2]))

    def check(a, b):
        return same("drops unused value_info", [v.SerializeToString() for v in a.graph.value_info],
                    [v.SerializeToString() for v in b.graph.value_info])
    return _model(g), check, None


def case_initializer_inputs(_):
    w = numpy_helper.from_array(np.ones([2, 3], dtype=np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    w_in = helper.make_tensor_value_info("W", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x, w_in], [y], initializer=[w])
    m = _model(g, 8)
    m.ir_version = 3

    def check(a, b):
        return (same("drops initializer from graph inputs", [i.name for i in a.graph.input], [i.name for i in b.graph.input])
                + diff_of("changes the initializer", onnx.GraphProto(initializer=a.graph.initializer),
                          onnx.GraphProto(initializer=b.graph.initializer))
                + same(f"ir_version {a.ir_version} -> {b.ir_version}", a.ir_version, b.ir_version))
    return m, check, None


def case_initializer_fields(_):
    w = numpy_helper.from_array(np.ones([64, 64], dtype=np.float32), "W")
    w.doc_string = "weight doc"
    entry = w.metadata_props.add()
    entry.key, entry.value = "tensor-key", "tensor-value"

    def check(a, b):
        ta, tb = tensor_named(a, "W"), tensor_named(b, "W")
        if tb is None:
            return ["drops the initializer"]
        return (same("drops initializer doc_string", ta.doc_string, tb.doc_string)
                + props("initializer metadata_props", ta.metadata_props, tb.metadata_props))
    return _matmul_model(w), check, None


def case_sub_byte(_):
    if ml_dtypes is None:
        raise RuntimeError("ml_dtypes not installed")
    rng = np.random.default_rng(0)
    u4 = numpy_helper.from_array(rng.integers(0, 16, size=[5, 3]).astype(ml_dtypes.uint4), "U4")
    u2 = numpy_helper.from_array(rng.integers(0, 4, size=[7]).astype(ml_dtypes.uint2), "U2")
    g = helper.make_graph(
        [helper.make_node("Cast", ["U4"], ["y4"], to=TensorProto.FLOAT), helper.make_node("Cast", ["U2"], ["y2"], to=TensorProto.FLOAT)],
        "g", [], [helper.make_tensor_value_info("y4", TensorProto.FLOAT, [5, 3]),
                  helper.make_tensor_value_info("y2", TensorProto.FLOAT, [7])], initializer=[u4, u2])
    m = _model(g, 25)

    def check(a, b):
        losses = []
        for name in ("U4", "U2"):
            ta, tb = tensor_named(a, name), tensor_named(b, name)
            if tb is None:
                losses.append(f"drops {name}")
            elif ta.SerializeToString(deterministic=True) != tb.SerializeToString(deterministic=True):
                ok = (ta.data_type == tb.data_type and list(ta.dims) == list(tb.dims)
                      and np.array_equal(numpy_helper.to_array(ta).astype(np.uint8), numpy_helper.to_array(tb).astype(np.uint8)))
                losses.append(f"{name} proto re-encoded ({'values equal' if ok else 'values/type differ'})")
        return losses
    return m, check, None


def case_light_copy(folder: Path):
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1024, 1024, 600], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "onnxws-placeholder"), ("offset", "0"), ("length", str(1024 * 1024 * 600 * 4))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1024, 1024, 600])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1024, 1024, 600])
    g = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], initializer=[w])
    return _model(g), _check_external, folder  # no file onnxws-placeholder exists anywhere


CASES = [
    ("1. model doc_string, domain, model_version, producer", case_model_fields),
    ("2. model metadata_props", case_model_metadata),
    ("3. graph metadata_props, graph doc_string", case_graph_metadata),
    ("4. node doc_string, node metadata_props", case_node_fields),
    ("5. model-local functions + calling node", case_functions),
    ("6. sparse initializers", case_sparse),
    ("7. external-data initializers", case_external),
    ("8. If/Loop bodies reading an outer initializer", case_subgraphs),
    ("9. unused value_info", case_unused_value_info),
    ("10. initializers listed as graph inputs (IR 3)", case_initializer_inputs),
    ("11. initializer doc_string, metadata_props", case_initializer_fields),
    ("12. UINT4 / UINT2 tensors (opset 25)", case_sub_byte),
    ("13. >2 GB light copy (placeholder, no file)", case_light_copy),
]


# --------------------------------------------------------------------------------------------
# Running


_opened: list[str] = []


def _audit(event: str, args) -> None:
    if event != "open" or not args:
        return
    target = args[0]
    if isinstance(target, int):  # os.fdopen of a descriptor opened in C++ (onnx's external-data reader)
        try:
            target = os.readlink(f"/proc/self/fd/{target}")
        except OSError:
            return
    if isinstance(target, (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(target))


def _bytes_read() -> int | None:
    """Bytes this process has read through system calls so far (Linux ``rchar``), or None."""
    try:
        return int(next(line.split()[1] for line in open("/proc/self/io") if line.startswith("rchar")))
    except (OSError, StopIteration, ValueError):
        return None


def checker(model: onnx.ModelProto, folder: Path | None = None) -> str:
    """onnx.checker on ``model``: in memory, or (external data) by path from ``folder``, the folder
    of its data file, with an empty ``onnxws-placeholder`` file there as onnxws checks light copies."""
    try:
        if folder is None:
            onnx.checker.check_model(model)
        else:
            with tempfile.TemporaryDirectory(prefix="onnxws-gl-check-", dir=folder) as tmp:
                for item in folder.iterdir():
                    if item.is_file():
                        shutil.copyfile(item, Path(tmp) / item.name)
                (Path(tmp) / "onnxws-placeholder").touch()
                path = Path(tmp) / "checked.onnx"
                path.write_bytes(model.SerializeToString())
                onnx.checker.check_model(str(path))
        return "yes"
    except Exception:  # noqa: BLE001 - the checker raises assorted C++ errors
        return "no"


def run_case(build, roundtrip) -> dict:
    with tempfile.TemporaryDirectory(prefix="onnxws-gl-") as tmp:
        model, check, folder = build(Path(tmp))
        before = model.SerializeToString(deterministic=True)
        watched = [p.name for p in Path(tmp).iterdir()] if folder else []
        _opened.clear()
        cwd = os.getcwd()
        try:
            if folder:  # a library resolving relative locations from the working folder finds the data file
                os.chdir(folder)
            read_before = _bytes_read()
            out = roundtrip(model)
            read_after = _bytes_read()
        except Exception as exc:  # noqa: BLE001 - a failing round trip is a result
            return {"kept": False, "losses": [f"round trip raises {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"],
                    "identical": "no", "checker": "-", "checker_in": checker(model, folder), "other": []}
        finally:
            os.chdir(cwd)
        reads = [p for p in _opened if any(Path(p).name in (w, "onnxws-placeholder") for w in watched) or "onnxws-placeholder" in p]
        losses = check(model, out) + [f"opens {Path(p).name}" for p in reads]
        if model.SerializeToString(deterministic=True) != before:
            losses.append("modifies the input proto")
        read = None if read_before is None or read_after is None else read_after - read_before
        if folder and read is not None and read >= 16384:  # the external payload of case 7 is 16 KiB
            losses.append(f"reads {read} bytes")
        other = proto_diff(model, out)
        return {"kept": not losses, "losses": losses, "identical": "yes" if out.SerializeToString(deterministic=True) == before else "no",
                "checker": checker(out, folder), "checker_in": checker(model, folder), "other": other, "read": read}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="list every changed field path (not only the first 6)")
    args = parser.parse_args()
    sys.addaudithook(_audit)
    libraries = [lib for lib in (_graphsurgeon(), _onnx_ir()) if lib is not None]
    print(f"python {platform.python_version()}, onnx {onnx.__version__}, numpy {np.__version__}, "
          f"ml_dtypes {getattr(ml_dtypes, '__version__', 'missing')}, "
          + ", ".join(f"{name} {version}" for name, version, _ in libraries) + "\n")
    if not libraries:
        print("no graph library installed: nothing to measure")
        return 0
    results = {name: [run_case(build, roundtrip) for _, build in CASES] for name, _, roundtrip in libraries}
    names = [name for name, _, _ in libraries]
    short = {"onnx-graphsurgeon": "gs", "onnx-ir": "ir"}
    header = (["case"] + [f"{n} kept?" for n in names] + [f"bytes identical ({'/'.join(short[n] for n in names)})",
              f"checker passes ({'/'.join(short[n] for n in names)})", "notes"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for i, (label, _) in enumerate(CASES):
        row = [label] + ["yes" if results[n][i]["kept"] else "**no**" for n in names]
        row.append(" / ".join(results[n][i]["identical"] for n in names))
        checks = []
        for n in names:
            r = results[n][i]
            checks.append(r["checker"] + (" (input: no)" if r["checker_in"] == "no" else ""))
        row.append(" / ".join(checks))
        notes = [f"{short[n]}: {'; '.join(results[n][i]['losses'])}" for n in names if results[n][i]["losses"]]
        row.append("; ".join(notes) or "")
        print("| " + " | ".join(row) + " |")
    print("\nOther field paths changed by the round trip (input -> output):")
    for n in names:
        print(f"\n{n}:")
        for i, (label, _) in enumerate(CASES):
            other = results[n][i]["other"]
            if results[n][i].get("read") is not None and CASES[i][1] in (case_external, case_light_copy):
                print(f"  {label}: {results[n][i]['read']} bytes read (rchar) during the round trip")
            if other:
                shown = other if args.verbose else other[:6]
                more = f" (+{len(other) - len(shown)} more)" if len(other) > len(shown) else ""
                print(f"  {label}: " + "; ".join(shown) + more)
    return 0


if __name__ == "__main__":
    sys.exit(main())
