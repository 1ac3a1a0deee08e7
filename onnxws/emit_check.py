"""Emit check: the written model must be the one that was scored.

Trust but verify, after encoding: every shared weight the emitted graph rebuilds (in ONNX Runtime)
equals the decoded weight that was scored, bit for bit; and the emitted model's metric on the full
evaluation set, measured in a stock ORT session, matches the scorer's figure for the same tuple
(within TRUST_TOLERANCE_PP) and the loss budget. ``emit_stage`` runs the emit stage with these
checks: encode, check the written model, rebuild its weights, re-measure it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxws.config import CompressConfig
from onnxws.data import EvalData, join_outputs
from onnxws.encoding import EncodeResult, encode_model
from onnxws.errors import InputError, VerificationError
from onnxws.evaluation import metric_value, run_model
from onnxws.exploration import loss_between, loss_unit, value_after_loss, within_budget
from onnxws.loading import check_model
from onnxws.metrics import Metric
from onnxws.proto import payload_bytes
from onnxws.runtime import create_session
from onnxws.scoring import Scorer
from onnxws.sharing import SharedWeight
from onnxws.statistics import Measured, measure_loss

logger = logging.getLogger(__name__)

#: The emitted model's full-set metric must match the scorer's figure for the same tuple within this (pp).
TRUST_TOLERANCE_PP = 0.1
#: The emitted model's rebuilt weights are checked in batches of at most this many decoded bytes.
CHECK_BATCH_BYTES = 256 * 2**20
_DECODE_BATCH_BYTES = 1 << 30  # decoded_weights: initializer bytes per ORT sub-model


@dataclass
class Emitted:
    """The emit stage's result: the written model, its metric re-measured in stock ORT on the full
    set (the samples the search verified on), the scorer's figure for the same tuple, and the loss
    the written model has there; its loss with 95 % intervals on the held-out samples (None when
    nothing is held out), on the full set and on every sample."""

    encoded: EncodeResult
    value: float
    scorer_value: float
    loss: float
    measured: dict[str, Measured] = field(default_factory=dict)  # "full", "whole" and, if any, "holdout"

    @property
    def full(self) -> Measured:
        return self.measured["full"]

    @property
    def holdout(self) -> Measured | None:
        return self.measured.get("holdout")

    @property
    def whole(self) -> Measured:
        return self.measured["whole"]


def emit_stage(model: onnx.ModelProto, shared: Sequence[SharedWeight], scorer: Scorer, data: EvalData,
               metric: Metric, config: CompressConfig, *, baseline_full: float, loss_full: float) -> Emitted:
    """Encode ``shared`` into ``model`` (the payload-free shell; the scorer's originals fill the
    unshared weights), release the scorer, then check the written model: the ONNX checker, its
    rebuilt weights bit for bit, its metric against the scorer's (``loss_full``) and the budget.

    Raises:
        VerificationError: any check fails.
    """
    names = [o.name for o in model.graph.output]
    reference = {subset: scorer.reference_outputs(subset) for subset in ("full", "holdout")[:1 + bool(scorer.n_holdout)]}
    encoded = encode_model(model, shared, opset=config.opset, values=scorer.originals)
    scorer.close()  # its copy of the weights and sessions: the emitted model is measured on its own
    check_model(encoded.model, "emitted model")
    check_rebuilt_weights(encoded.model, shared)
    parts = {subset: scorer.subset_data(subset) for subset in reference}
    outputs = {subset: run_model(encoded.model, part, device=config.device, batch_size=config.batch_size)
               for subset, part in parts.items()}
    value = metric_value(metric, outputs["full"], parts["full"], names, reference["full"])
    scorer_value = value_after_loss(baseline_full, loss_full, config.loss_mode)
    check_trusted(value, scorer_value)
    loss = loss_between(baseline_full, value, config.loss_mode)
    if not within_budget(loss, config.loss):
        raise VerificationError(f"the emitted model loses {loss:.3f} {loss_unit(config.loss_mode)} > budget {config.loss:g}"
                                f"{CACHE_HINT}")
    measured = {subset: measure_loss(metric, outputs[subset], reference[subset], parts[subset], names,
                                     config.loss_mode, seed=config.seed) for subset in parts}
    if "holdout" not in measured:
        measured["whole"] = measured["full"]
    else:
        rows = [parts["full"].n, parts["holdout"].n]
        measured["whole"] = measure_loss(metric, join_outputs([outputs["full"], outputs["holdout"]], rows),
                                         join_outputs([reference["full"], reference["holdout"]], rows), data, names,
                                         config.loss_mode, seed=config.seed)
    return Emitted(encoded, value, scorer_value, loss, measured)


#: Scores read from a poisoned or stale score cache are what make the written file disagree with them.
CACHE_HINT = "; if the score cache may hold wrong scores, rerun with --no-cache (or delete the cache)"


def check_rebuilt_weights(model: onnx.ModelProto, shared: Sequence[SharedWeight]) -> None:
    """Every shared weight rebuilt by ``model``'s graph (in ORT) equals the decoded weight that was
    scored, bit for bit. Rebuilt in batches of at most CHECK_BATCH_BYTES of decoded weights, so a
    large model is never decoded whole.

    Raises:
        VerificationError: a weight rebuilt differently (a bug, reported loudly).
    """
    batches: list[list[SharedWeight]] = []
    size = CHECK_BATCH_BYTES
    for sw in shared:
        nbytes = sw.params * sw.codebooks.dtype.itemsize
        if size + nbytes > CHECK_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(sw)
        size += nbytes
    for batch in batches:
        rebuilt = decoded_weights(model, [sw.name for sw in batch])
        for sw in batch:
            expected = sw.decode()
            got = rebuilt.pop(sw.name)
            if got.shape != expected.shape or got.dtype != expected.dtype or not np.array_equal(
                got.view(np.uint8), expected.view(np.uint8)
            ):
                raise VerificationError(f"the emitted graph rebuilds {sw.name} differently from the weights that were scored")
            del got, expected


def check_trusted(emitted_value: float, scorer_value: float) -> None:
    """Refuse an emitted model whose measured metric differs from the scorer's figure for the same
    tuple by more than TRUST_TOLERANCE_PP (both fractions in [0, 1]).

    Raises:
        VerificationError: the two measurements disagree.
    """
    drift_pp = abs(emitted_value - scorer_value) * 100.0
    if drift_pp > TRUST_TOLERANCE_PP:
        raise VerificationError(
            f"the emitted model measures {emitted_value:.4f} on the full set but the scorer measured {scorer_value:.4f} "
            f"for the same tuple ({drift_pp:.2f} pp apart > {TRUST_TOLERANCE_PP} pp): refusing to write a model that differs from what was scored"
            f"{CACHE_HINT}")


def decoded_weights(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The weights an encoded model rebuilds, computed by ONNX Runtime from its decode subgraphs.

    Builds small models holding only the nodes and initializers the named tensors depend on (with
    those tensors as outputs), and runs them in ORT CPU with graph optimizations off. A name that is
    still a plain initializer is returned as stored.

    Args:
        model: an encoded model (tensors loaded).
        names: tensor names to rebuild.

    Returns:
        {name: array} in the weight's dtype and shape.

    Raises:
        InputError: a name that is not produced by a constant subgraph of the main graph.
    """
    graph = model.graph
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output}
    inits = {t.name: t for t in graph.initializer}
    result: dict[str, np.ndarray] = {}
    pending: list[tuple[str, set[int], set[str]]] = []
    for name in dict.fromkeys(names):
        if name in inits:
            result[name] = numpy_helper.to_array(inits[name])
            continue
        nodes, needed, stack, seen = set(), set(), [name], set()
        while stack:
            current = stack.pop()
            if current in seen or not current:
                continue
            seen.add(current)
            if current in inits:
                needed.add(current)
            elif current in producers:
                nodes.add(producers[current])
                stack.extend(graph.node[producers[current]].input)
            else:
                raise InputError(f"{name!r} depends on {current!r}, which is not a constant of the main graph: "
                                 "it is not a decoded weight")
        pending.append((name, nodes, needed))
    # Group the names into sub-models of bounded size (protobuf caps a model at 2 GB).
    batches: list[list[tuple[str, set[int], set[str]]]] = []
    size = 0
    for item in pending:
        item_bytes = sum(payload_bytes(inits[n]) for n in item[2])
        if not batches or size + item_bytes > _DECODE_BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += item_bytes
    for batch in batches:
        node_ids = sorted(set().union(*(b[1] for b in batch)))
        init_names = sorted(set().union(*(b[2] for b in batch)))
        outputs = [helper.make_empty_tensor_value_info(b[0]) for b in batch]
        sub_graph = helper.make_graph([graph.node[i] for i in node_ids], "onnxws_decode", [], outputs,
                                      [inits[n] for n in init_names])
        sub = helper.make_model(sub_graph, opset_imports=list(model.opset_import))
        sub.ir_version = model.ir_version
        sub.functions.extend(model.functions)
        session = create_session(sub, optimization="none")
        wanted = [b[0] for b in batch]
        result.update(zip(wanted, session.run(wanted, {})))
    return {name: result[name] for name in names}
