"""The resolved configuration of a compress run, layered like coremltools' optimization configs.

Three layers decide a tensor's settings, most specific first:

1. ``[tensor."<glob>"]``: an exact tensor name beats every glob; among matching globs
   (``fnmatch.fnmatchcase``) the longest pattern wins. Two different patterns of the same
   length that match one tensor are merged; if they set one key to different values that
   is an error naming both.
2. ``[op_type.<OpType>]``: the op type consuming the weight (``Conv``, ``Gemm``, ...).
3. ``[global]``: every run option plus the tensor defaults.

A partial table overrides only the keys it sets; the others come from the next layer down.
Validation happens in one place (``CompressConfig.__post_init__``, driven by constraint
tables); every error names the key, the bad value and what is allowed. Keys are snake_case
only (``loss_mode``, not ``loss-mode``).

Example: ``min_params`` is the smallest tensor (in elements) that is shared; the default 64
keeps LeNet-5's first conv (6x1x5x5 = 150 weights) in and leaves 10-element biases out.

    [global]
    loss = 1.0
    min_params = 64
    bits = [0, 1, 2, 3, 4, 5, 6, 7, 8]   # allowed index widths; width b uses k = min(2**b, k_max)
    granularity = "tensor"               # tensor | channel | group:N | auto
    [op_type.Gemm]
    bits = [1, 2, 3, 4]
    [tensor."fc1.*"]
    skip = true
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from onnxws.errors import UsageError
from onnxws.metrics import BUILTIN as BUILTIN_METRICS
from onnxws.sharing import Granularity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

logger = logging.getLogger(__name__)

LOSS_MODES = ("absolute", "relative")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("predictor", "exhaustive", "greedy")
PREDICTORS = ("auto", "divergence", "additive")
TABLES = ("global", "op_type", "tensor")
#: Keys of a tensor-settings table ([global], [op_type.X], [tensor."glob"]), in write order.
TENSOR_KEYS = ("skip", "min_params", "bits", "k_max", "granularity")
_MAX_BITS = 8
_MAX_K = 256
_MAX_SEED = 2**63 - 1  # TOML integers are signed 64-bit: keep the written config readable back


# -- constraint tables (scikit-learn style): key -> (type ok, value ok, what is allowed) ------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_metric(v: str) -> bool:
    if v in BUILTIN_METRICS:
        return True
    module, _, function = v.partition(":")
    return bool(module.strip()) and bool(function.strip())


_Check = tuple[Callable[[Any], bool], Callable[[Any], bool], str]

@dataclass(frozen=True)
class RunOption:
    """One run option, declared once: the config, the TOML file, batch manifests and the command
    line (``onnxws.cli``) are all built from ``RUN_OPTIONS``; its default is the CompressConfig
    field's.

    Attributes:
        name: the CompressConfig field and TOML key (``--name-with-dashes`` on the command line).
        kind: its Python type (``bool`` options get ``--x/--no-x`` flags).
        check: (type ok, value ok, what is allowed), for every source alike.
        help: the command-line help text.
        choices: the allowed strings of a choice option.
        minimum: the smallest value the command line accepts (checked again by ``check``).
        nullable: None is a valid value (the option may be omitted).
        batch: ``onnxws batch`` takes it for every model (else only per model, in its manifest).
    """

    name: str
    kind: type
    check: _Check
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    nullable: bool = False
    batch: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


def _choice(choices: tuple[str, ...]) -> _Check:
    return (_is_str, lambda v: v in choices, f"one of {', '.join(choices)}")


_ON_OFF: _Check = (_flag, lambda v: True, "true or false")

#: Every run option, in the order ``to_toml`` writes them (the field order of CompressConfig).
RUN_OPTIONS: tuple[RunOption, ...] = (
    RunOption("loss", float, (_is_real, lambda v: math.isfinite(v) and 0 <= v < 100,
                              "a number >= 0 and < 100 (percentage points, or percent of baseline with loss_mode = \"relative\")"),
              "Accuracy-loss budget: percentage points of the metric (absolute) or percent of the baseline (relative)."),
    RunOption("loss_mode", str, _choice(LOSS_MODES), "absolute (pp) or relative (percent of baseline).", LOSS_MODES),
    RunOption("device", str, _choice(DEVICES), "Where candidates are scored: auto (CUDA if usable), cpu, cuda.", DEVICES),
    RunOption("search_samples", int, (_is_int, lambda v: v >= 1, "an integer >= 1"),
              "Samples of the fixed search subset (the first N).", minimum=1),
    RunOption("holdout", float, (_is_real, lambda v: math.isfinite(v) and 0 <= v < 1,
                                 "a fraction >= 0 and < 1 (or omit it for the default)"),
              "Fraction of the evaluation set held out of the search: the final loss is measured on it too, on samples "
              "the search never saw (whole groups when the data has group ids). Default: 0.2 of a set of >= 1000 "
              "samples (and >= 10 groups), else 0.", nullable=True),
    RunOption("batch_size", int, (_is_int, lambda v: v >= 1, "an integer >= 1 (or omit it)"),
              "Inference batch size for scoring.", minimum=1, nullable=True, batch=False),
    RunOption("metric", str, (_is_str, _is_metric, f"one of {', '.join(BUILTIN_METRICS)} or \"package.module:function\""),
              f"The metric (higher is better): {', '.join(BUILTIN_METRICS)}, or a function package.module:function(outputs, "
              "data) -> float. Default: top1_accuracy when the data has labels y, else expected_accuracy (the uncompressed "
              "model's probability of the compressed model's top-1 class: an estimate of the accuracy change without labels).",
              nullable=True, batch=False),
    RunOption("output", str, (_is_str, lambda v: bool(v), "a non-empty model output name"),
              "Model output the metric reads (default: the first).", nullable=True, batch=False),
    RunOption("strategy", str, _choice(STRATEGIES),
              "Network search: predictor (paper + refinement), exhaustive, greedy.", STRATEGIES),
    RunOption("predictor", str, _choice(PREDICTORS),
              "Loss model of the predictor strategy: divergence (a fitted function of the summed output divergences), "
              "additive (the paper's weighted sum of losses alone), auto (the one that predicts the scored tuples better).",
              PREDICTORS),
    RunOption("edge_tries", int, (_is_int, lambda v: v >= 0, "an integer >= 0 (0: no edge push)"),
              "Most full-set scorings spent, when the verified tuple leaves loss to spare, on more compressive tuples that "
              "measured just over the budget on the search subset but within its sampling error (0: off).", minimum=0),
    RunOption("grow_subset", bool, _ON_OFF,
              "When tuples that held on the search subset miss on the full set and the verified answer falls well short "
              "of them, grow the subset 4x (at most to the full set) and search again, within --time-budget / --max-scorings."),
    RunOption("refine", bool, _ON_OFF,
              "Refine each candidate of Gemm/MatMul/Conv weights against the layer's measured inputs (indices with error "
              "feedback, least-squares codebook): same encoding, less output error."),
    RunOption("bias_correction", bool, _ON_OFF,
              "With --refine: give each refined weight's own bias (Conv B, Gemm C, MatMul + Add) the value that cancels "
              "the mean shift of its outputs on the search subset."),
    RunOption("time_budget", float, (_is_real, lambda v: math.isfinite(v) and v > 0, "a finite number of seconds > 0 (or omit it)"),
              "Stop exploring after this many seconds; the best verified tuple is kept.", minimum=0.001, nullable=True),
    RunOption("max_scorings", int, (_is_int, lambda v: v >= 1, "an integer >= 1 (or omit it)"),
              "Stop exploring after this many scorings (cache hits included).", minimum=1, nullable=True),
    RunOption("metric_timeout", float, (_is_real, lambda v: math.isfinite(v) and v > 0,
                                        "a finite number of seconds > 0 (or omit it)"),
              "Seconds one call of a custom metric function may take; a slower call stops the run with an error naming the "
              "metric (checked on Unix in the main thread; default: no limit).", minimum=0.001, nullable=True),
    RunOption("seed", int, (_is_int, lambda v: 0 <= v <= _MAX_SEED, "an integer in 0..2**63-1"),
              "Random seed (predictor sampling)."),
    RunOption("opset", int, (_is_int, lambda v: v >= 7, "an ai.onnx opset number >= 7 (or omit it)"),
              "Pin the output opset (raised opsets unlock UINT4/UINT2 indices).", nullable=True, batch=False),
)
RUN_KEYS = tuple(option.name for option in RUN_OPTIONS)
_RUN_CONSTRAINTS: dict[str, _Check] = {option.name: option.check for option in RUN_OPTIONS}
_NULLABLE = frozenset(option.name for option in RUN_OPTIONS if option.nullable)
_FLOATS = frozenset(option.name for option in RUN_OPTIONS if option.kind is float)  # stored as float: stable TOML

_TENSOR_CONSTRAINTS: dict[str, _Check] = {
    "skip": (lambda v: isinstance(v, bool), lambda v: True, "true or false"),
    "min_params": (_is_int, lambda v: v >= 1, "an integer >= 1 (elements of the smallest tensor to share)"),
    "bits": (lambda v: isinstance(v, (list, tuple)) and all(_is_int(b) for b in v),
             lambda v: len(v) > 0 and all(0 <= b <= _MAX_BITS for b in v),
             f"a non-empty list of integers in 0..{_MAX_BITS}, e.g. [2, 4, 8]"),
    "k_max": (_is_int, lambda v: 1 <= v <= _MAX_K, f"an integer in 1..{_MAX_K}"),
    "granularity": (lambda v: isinstance(v, (str, Granularity)), lambda v: True, "tensor, channel, group:N (N >= 1) or auto"),
}


def _type_name(value: Any) -> str:
    """TOML-ish name of a value's type, for error messages ("list of float" for [1.5])."""
    names = {bool: "boolean", int: "integer", float: "float", str: "string", dict: "table"}
    if isinstance(value, (list, tuple)):
        inner = sorted({_type_name(item) for item in value})
        return f"list of {' and '.join(inner)}" if inner else "empty list"
    return names.get(type(value), type(value).__name__)


def _check(where: str, value: Any, constraint: _Check) -> None:
    type_ok, value_ok, allowed = constraint
    if not type_ok(value):
        kind = _type_name(value)
        raise UsageError(f"{where} = {value!r}: expected {allowed}, got {'an' if kind[0] in 'aeiou' else 'a'} {kind}")
    if not value_ok(value):
        raise UsageError(f"{where} = {value!r}: expected {allowed}")


def _unknown_key(where: str, key: Any, allowed: Iterable[str], hint: str = "") -> UsageError:
    allowed = list(allowed)
    if isinstance(key, str) and "-" in key and key.replace("-", "_") in allowed:
        hint = f" (keys are snake_case: write {key.replace('-', '_')!r})"
    elif not hint and isinstance(key, str):
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    return UsageError(f"{where}: unknown key {key!r}{hint}; allowed: {', '.join(allowed)}")


def _split_keys(table: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``table``'s run options and tensor-settings keys, apart; any other key is an error."""
    run: dict[str, Any] = {}
    tensor: dict[str, Any] = {}
    for key, value in table.items():
        if key in _RUN_CONSTRAINTS:
            run[key] = value
        elif key in _TENSOR_CONSTRAINTS:
            tensor[key] = value
        else:
            raise _unknown_key(where, key, RUN_KEYS + TENSOR_KEYS)
    return run, tensor


def _check_tensor_table(table: Any, where: str) -> dict[str, Any]:
    """Validate a (partial) tensor-settings table; return it normalised, keys in TENSOR_KEYS order.

    ``bits`` becomes a sorted tuple without duplicates, ``granularity`` a Granularity.
    """
    if not isinstance(table, Mapping):
        raise UsageError(f"{where} = {table!r}: expected a table with keys among {', '.join(TENSOR_KEYS)}")
    for key in table:
        if key not in _TENSOR_CONSTRAINTS:
            hint = " (run options belong in [global])" if key in _RUN_CONSTRAINTS and where != "global" else ""
            raise _unknown_key(where, key, TENSOR_KEYS, hint)
    out: dict[str, Any] = {}
    for key in TENSOR_KEYS:
        if key not in table:
            continue
        value = table[key]
        _check(f"{where}.{key}", value, _TENSOR_CONSTRAINTS[key])
        if key == "bits":
            value = tuple(sorted(set(value)))
        elif key == "granularity":
            try:  # a Granularity object goes through parse() too, so a malformed one is caught here
                value = Granularity.parse(str(value))
            except ValueError:
                raise UsageError(f"{where}.granularity = {value!r}: expected tensor, channel, group:N "
                                 "(N >= 1 output channels per codebook) or auto (measured per tensor)") from None
        out[key] = value
    return out


def _plain(table: Mapping[str, Any]) -> dict[str, Any]:
    """A tensor-settings table as TOML/JSON values (lists, strings), keys in TENSOR_KEYS order."""
    out: dict[str, Any] = {}
    for key in TENSOR_KEYS:
        if key in table:
            value = table[key]
            out[key] = list(value) if key == "bits" else str(value) if key == "granularity" else value
    return out


@dataclass(frozen=True)
class TensorSettings:
    """What applies to one tensor after resolution.

    Attributes:
        skip: leave the tensor unshared (reported as "excluded by config (<source>)").
        min_params: tensors with fewer elements are not shared.
        bits: allowed index widths (sorted, subset of 0..8).
        k_max: upper bound of the k range (k_min = 1).
        granularity: codebooks per tensor (tensor, channel, group:N).
        source: the most specific layer that set a key: ``"global"``, ``"op_type.Conv"``,
            ``'tensor."fc1.*"'`` (two equal-length globs: ``'tensor."a*" + tensor."b*"'``).
    """

    skip: bool = False
    min_params: int = 64
    bits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    k_max: int = _MAX_K
    granularity: Granularity = field(default_factory=Granularity)
    source: str = "global"

    def ks(self) -> list[int]:
        """Candidate k, ascending: ``min(2**b, k_max)`` per allowed width b, repeats dropped.

        E.g. bits (0..8) with k_max 3 gives [1, 2, 3]: widths 2..8 all map to k = 3.
        """
        return sorted({min(2**b, self.k_max) for b in self.bits})

    def table(self) -> dict[str, Any]:
        """The settings as a full tensor table (no ``source``)."""
        return {key: getattr(self, key) for key in TENSOR_KEYS}


@dataclass
class CompressConfig:
    """Every setting of a compress run that changes its result (CLI options, TOML file or Python).

    Paths and flags that do not change the result (output paths, ``--force``, ``--quiet``,
    the cache) are not part of it. Construct directly, with ``from_dict`` / ``from_toml``
    (the TOML structure of docs/design.md), or copy with ``with_options``. Invalid values raise
    UsageError.
    """

    # run options (loss in percentage points, or percent of baseline when loss_mode is "relative")
    loss: float = 1.0
    loss_mode: str = "absolute"
    device: str = "auto"
    search_samples: int = 2000
    holdout: float | None = None       # held-out fraction (None: data.holdout_split's default)
    batch_size: int | None = None
    metric: str | None = None          # "package.module:function"
    output: str | None = None          # model output the metric reads
    strategy: str = "predictor"
    predictor: str = "auto"            # loss model of the predictor strategy (network_search)
    edge_tries: int = 4                # full-set scorings of the edge push (verification)
    grow_subset: bool = True           # grow a search subset that misled the search, search again (verification)
    refine: bool = True                # output-aware refinement of Gemm/MatMul/Conv candidates (refinement)
    bias_correction: bool = True       # with refine: correct the consumer's bias for the mean output shift
    time_budget: float | None = None   # seconds
    max_scorings: int | None = None
    metric_timeout: float | None = None  # seconds per custom-metric call
    seed: int = 0
    opset: int | None = None
    # tensor selection: the [global] defaults and the partial override tables
    global_settings: TensorSettings = field(default_factory=TensorSettings)
    op_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensor: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key, constraint in _RUN_CONSTRAINTS.items():
            value = getattr(self, key)
            if value is None and key in _NULLABLE:
                continue
            _check(key, value, constraint)
            if key in _FLOATS:
                setattr(self, key, float(value))
        if not isinstance(self.global_settings, TensorSettings):
            raise UsageError(f"global_settings = {self.global_settings!r}: expected a TensorSettings")
        table = _check_tensor_table(self.global_settings.table(), "global")
        self.global_settings = TensorSettings(**table)
        self.op_type = self._check_layer("op_type", self.op_type, lambda op: f"op_type.{op}")
        self.tensor = self._check_layer("tensor", self.tensor, lambda pattern: f'tensor."{pattern}"')

    @staticmethod
    def _check_layer(name: str, layer: Any, label: Callable[[str], str]) -> dict[str, dict[str, Any]]:
        if not isinstance(layer, Mapping):
            raise UsageError(f"{name} = {layer!r}: expected a table of tables, e.g. [{label('X')}] skip = true")
        out = {}
        for key, table in layer.items():
            if not isinstance(key, str) or not key:
                raise UsageError(f"{name} key {key!r}: expected a non-empty string")
            out[key] = _check_tensor_table(table, label(key))
        return out

    # -- resolution ------------------------------------------------------------------------------------------
    def settings_for(self, name: str, op_type: str) -> TensorSettings:
        """Settings of one tensor: tensor pattern > op type > global; partial tables merge.

        Args:
            name: the tensor's name in the graph.
            op_type: the op type consuming it as a weight (e.g. "Conv").

        Raises:
            UsageError: two equal-length globs match ``name`` and set a key to different values.
        """
        resolved = self.global_settings.table()
        source = "global"
        op_table = self.op_type.get(op_type)
        if op_table:
            resolved.update(op_table)
            source = f"op_type.{op_type}"
        tensor_table, tensor_source = self._tensor_layer(name)
        if tensor_table:
            resolved.update(tensor_table)
            source = tensor_source
        return TensorSettings(**resolved, source=source)

    def _tensor_layer(self, name: str) -> tuple[dict[str, Any], str]:
        """The tensor-layer table that applies to ``name`` and its source label ({} if none)."""
        if name in self.tensor:
            return self.tensor[name], f'tensor."{name}"'
        hits = [p for p in self.tensor if fnmatch.fnmatchcase(name, p)]
        if not hits:
            return {}, ""
        longest = max(len(p) for p in hits)
        best = sorted(p for p in hits if len(p) == longest)
        merged: dict[str, Any] = {}
        decided_by: dict[str, str] = {}
        for pattern in best:
            for key, value in self.tensor[pattern].items():
                if key in merged and merged[key] != value:
                    other = decided_by[key]
                    raise UsageError(
                        f'tensor "{name}" matches tensor."{other}" ({key} = {_plain({key: merged[key]})[key]!r}) and '
                        f'tensor."{pattern}" ({key} = {_plain({key: value})[key]!r}), patterns of equal length; '
                        "make one pattern longer (more specific) or add an exact [tensor.\"<name>\"] table")
                merged[key] = value
                decided_by[key] = pattern
        merged = {key: merged[key] for key in TENSOR_KEYS if key in merged}
        return merged, " + ".join(f'tensor."{p}"' for p in best)

    def check_patterns(self, names: Iterable[str], op_types: Iterable[str]) -> None:
        """Fail on config tables that select nothing in this model (such patterns are errors: a typo must not silently select nothing).

        Args:
            names: the model's tensor names.
            op_types: the op types of the model's nodes.

        Raises:
            UsageError: naming every tensor pattern that matches no name and every op_type table
                whose op type is absent, with the closest names present.
        """
        names = list(dict.fromkeys(names))
        present = sorted(set(op_types))
        problems = []
        for pattern in self.tensor:
            matched = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            logger.debug('config tensor."%s" matches %d tensor(s)', pattern, len(matched))
            if not matched:
                close = difflib.get_close_matches(pattern, names, n=3)
                hint = f"closest names: {', '.join(close)}" if close else f"the model has {len(names)} tensors"
                problems.append(f'tensor."{pattern}" matches no tensor of the model ({hint})')
        for op in self.op_type:
            if op not in present:
                close = difflib.get_close_matches(op, present, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                problems.append(f"op_type.{op} names an op type absent from the model ({hint}"
                                f"present: {', '.join(present) or 'none'})")
        if problems:
            raise UsageError("config: " + "; ".join(problems) +
                             ". Fix or remove these tables (`onnxws inspect MODEL` lists the weights and op types)")

    # -- copies ----------------------------------------------------------------------------------------------
    def with_options(self, **options: Any) -> CompressConfig:
        """A validated copy with run options and [global] tensor keys replaced (None values ignored)."""
        run, glob = _split_keys({k: v for k, v in options.items() if v is not None}, "option")
        if glob:
            table = {**self.global_settings.table(), **_check_tensor_table(glob, "global")}
            run["global_settings"] = TensorSettings(**table)
        return dataclasses.replace(self, **run) if run else self

    def with_granularity(self, text: str) -> CompressConfig:
        """A copy whose global granularity is ``text`` (tensor, channel, group:N)."""
        return self.with_options(granularity=text)

    # -- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> CompressConfig:
        """From the TOML structure (``global``, ``op_type``, ``tensor`` tables); non-None overrides win.

        Overrides are run options or [global] tensor keys (``granularity="channel"``), as the CLI gives them.
        """
        if not isinstance(data, Mapping):
            raise UsageError(f"config: expected a table (dict) with {', '.join(TABLES)}, got {_type_name(data)}")
        for key in data:
            if key not in TABLES:
                hint = (" (run options and tensor defaults go in [global])"
                        if key in _RUN_CONSTRAINTS or key in _TENSOR_CONSTRAINTS else "")
                raise UsageError(f"config: unknown top-level key or table {key!r}{hint}; allowed tables: "
                                 '[global], [op_type.<OpType>], [tensor."<glob>"]')
        glob = data.get("global", {})
        if not isinstance(glob, Mapping):
            raise UsageError(f"config: global = {glob!r}: expected a [global] table")
        run, tensor_part = _split_keys(glob, "[global]")
        config = cls(**run, global_settings=TensorSettings(**_check_tensor_table(tensor_part, "global")),
                     op_type=cls._mapping(data, "op_type"), tensor=cls._mapping(data, "tensor"))
        return config.with_options(**overrides)

    @staticmethod
    def _mapping(data: Mapping[str, Any], name: str) -> Any:
        layer = data.get(name, {})
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in layer.items()} \
            if isinstance(layer, Mapping) else layer

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> CompressConfig:
        """Read a TOML config file (UTF-8); non-None overrides (CLI options) win over the file."""
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as exc:
            raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise UsageError(f"config {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config {path} is not valid TOML: {exc}") from exc
        try:
            config = cls.from_dict(data)
        except UsageError as exc:
            raise UsageError(f"config {path}: {exc}") from None
        return config.with_options(**overrides)

    def to_dict(self) -> dict[str, Any]:
        """The TOML structure as JSON-able values: None values omitted, deterministic key order."""
        glob: dict[str, Any] = {k: getattr(self, k) for k in RUN_KEYS if getattr(self, k) is not None}
        glob.update(_plain(self.global_settings.table()))
        out: dict[str, Any] = {"global": glob}
        if self.op_type:
            out["op_type"] = {op: _plain(t) for op, t in sorted(self.op_type.items())}
        if self.tensor:
            out["tensor"] = {p: _plain(t) for p, t in sorted(self.tensor.items())}
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML: ``from_toml`` on it gives an equal config."""
        return ("# onnxws resolved configuration: `onnxws compress MODEL --config config.toml` reproduces the run\n"
                + tomli_w.dumps(self.to_dict()))
