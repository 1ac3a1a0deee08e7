"""The resolved configuration of a compress run, layered like coremltools' optimization configs.

Three layers decide a tensor's settings, most specific first: ``[tensor."<glob>"]`` (an exact
name beats a glob, a longer glob beats a shorter one), ``[op_type.<OpType>]``, ``[global]``.
A partial table overrides only the keys it sets. Validation happens in one place
(``__post_init__``); every error names the key, the bad value and what is allowed.

Example (``min_params`` keeps small tensors such as LeNet-5's 150-weight first conv in):

    [global]
    loss = 1.0
    min_params = 64
    bits = [0, 1, 2, 3, 4, 5, 6, 7, 8]
    granularity = "tensor"
    [op_type.Gemm]
    bits = [1, 2, 3, 4]
    [tensor."fc1.*"]
    skip = true
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from onnxws.errors import UsageError
from onnxws.sharing import Granularity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOSS_MODES = ("absolute", "relative")
DEVICES = ("auto", "cpu", "cuda")
STRATEGIES = ("predictor", "exhaustive", "greedy")
TENSOR_KEYS = ("skip", "min_params", "bits", "k_max", "granularity")
RUN_KEYS = ("loss", "loss_mode", "device", "search_samples", "batch_size", "metric", "output", "strategy",
            "time_budget", "max_scorings", "seed", "opset")


@dataclass(frozen=True)
class TensorSettings:
    """What applies to one tensor after resolution."""

    skip: bool = False
    min_params: int = 64
    bits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    k_max: int = 256
    granularity: Granularity = field(default_factory=Granularity)
    source: str = "global"

    def ks(self) -> list[int]:
        """Candidate k per allowed width: ``min(2**b, k_max)``, duplicates dropped."""
        return sorted({min(2**b, self.k_max) for b in self.bits})


def _check_tensor_table(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate a (partial) tensor-settings table; return it with normalised values."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in TENSOR_KEYS:
            raise UsageError(f"{where}: unknown key {key!r}; allowed: {', '.join(TENSOR_KEYS)}")
        if key == "skip":
            if not isinstance(value, bool):
                raise UsageError(f"{where}.skip = {value!r}: expected true or false")
        elif key == "min_params":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{where}.min_params = {value!r}: expected an integer >= 1")
        elif key == "bits":
            if (not isinstance(value, (list, tuple)) or not value
                    or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 8 for b in value)):
                raise UsageError(f"{where}.bits = {value!r}: expected a non-empty list of integers in 0..8")
            value = tuple(sorted(set(value)))
        elif key == "k_max":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
                raise UsageError(f"{where}.k_max = {value!r}: expected an integer in 1..256")
        elif key == "granularity":
            if isinstance(value, Granularity):
                pass
            elif not isinstance(value, str):
                raise UsageError(f"{where}.granularity = {value!r}: expected tensor, channel or group:N")
            else:
                try:
                    value = Granularity.parse(value)
                except ValueError as exc:
                    raise UsageError(f"{where}.granularity: {exc}") from None
        out[key] = value
    return out


@dataclass
class CompressConfig:
    """Every setting of a compress run (CLI options, TOML file, or Python)."""

    loss: float = 1.0
    loss_mode: str = "absolute"
    device: str = "auto"
    search_samples: int = 2000
    batch_size: int | None = None
    metric: str | None = None
    output: str | None = None
    strategy: str = "predictor"
    time_budget: float | None = None
    max_scorings: int | None = None
    seed: int = 0
    opset: int | None = None
    global_settings: TensorSettings = field(default_factory=TensorSettings)
    op_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    tensor: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def number(name: str, value: Any, kind: type, low: float, high: float | None = None, allow_none=False):
            if value is None and allow_none:
                return
            ok = isinstance(value, kind) and not isinstance(value, bool) if kind is int else \
                isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value < low or (high is not None and value >= high):
                bound = f">= {low}" + (f" and < {high}" if high is not None else "")
                raise UsageError(f"{name} = {value!r}: expected a {'whole ' if kind is int else ''}number {bound}")

        number("loss", self.loss, float, 0.0, 100.0)
        if self.loss_mode not in LOSS_MODES:
            raise UsageError(f"loss_mode = {self.loss_mode!r}: expected one of {', '.join(LOSS_MODES)}")
        if self.device not in DEVICES:
            raise UsageError(f"device = {self.device!r}: expected one of {', '.join(DEVICES)}")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"strategy = {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        number("search_samples", self.search_samples, int, 1)
        number("batch_size", self.batch_size, int, 1, allow_none=True)
        number("time_budget", self.time_budget, float, 1e-6, allow_none=True)
        number("max_scorings", self.max_scorings, int, 1, allow_none=True)
        number("seed", self.seed, int, 0)
        number("opset", self.opset, int, 7, allow_none=True)
        for name in ("metric", "output"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise UsageError(f"{name} = {value!r}: expected a non-empty string")
        if self.metric is not None and ":" not in self.metric:
            raise UsageError(f"metric = {self.metric!r}: expected package.module:function")
        self.op_type = {op: _check_tensor_table(t, f"op_type.{op}") for op, t in self.op_type.items()}
        self.tensor = {pat: _check_tensor_table(t, f'tensor."{pat}"') for pat, t in self.tensor.items()}

    # -- resolution ------------------------------------------------------------------------
    def settings_for(self, name: str, op_type: str) -> TensorSettings:
        """Settings of one tensor: tensor pattern > op type > global (partial tables merge)."""
        resolved = dataclasses.asdict(self.global_settings)
        resolved["granularity"] = self.global_settings.granularity
        source = "global"
        if op_type in self.op_type:
            resolved.update(self.op_type[op_type])
            source = f"op_type.{op_type}"
        match = self._tensor_match(name)
        if match is not None:
            resolved.update(self.tensor[match])
            source = f'tensor."{match}"'
        resolved["source"] = source
        return TensorSettings(**resolved)

    def _tensor_match(self, name: str) -> str | None:
        if name in self.tensor:
            return name
        hits = [p for p in self.tensor if fnmatch.fnmatchcase(name, p)]
        if not hits:
            return None
        longest = max(len(p) for p in hits)
        best = sorted(p for p in hits if len(p) == longest)
        for other in best[1:]:
            if self.tensor[other] != self.tensor[best[0]]:
                raise UsageError(f'tensor "{name}" matches both tensor."{best[0]}" and tensor."{other}" with '
                                 "different settings; make one pattern more specific")
        return best[0]

    def check_patterns(self, names: Iterable[str], op_types: Iterable[str]) -> None:
        """Every tensor pattern must match a tensor and every op-type table an op of the model."""
        names = list(names)
        op_types = set(op_types)
        for pattern in self.tensor:
            if not any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                raise UsageError(f'config tensor."{pattern}" matches no tensor of the model; check the name '
                                 "(onnxws inspect MODEL lists them)")
        for op in self.op_type:
            if op not in op_types:
                raise UsageError(f"config op_type.{op} names an op type absent from the model "
                                 f"(present: {', '.join(sorted(op_types))})")

    def with_granularity(self, text: str) -> CompressConfig:
        """A copy whose global granularity is ``text`` (tensor, channel, group:N)."""
        table = _check_tensor_table({"granularity": text}, "granularity")
        return dataclasses.replace(self, global_settings=dataclasses.replace(self.global_settings, **table))

    # -- (de)serialisation -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> CompressConfig:
        """From the TOML structure (``global``, ``op_type``, ``tensor`` tables); overrides win."""
        unknown = set(data) - {"global", "op_type", "tensor"}
        if unknown:
            raise UsageError(f"config: unknown table(s) {', '.join(sorted(unknown))}; allowed: global, op_type, tensor")
        glob = dict(data.get("global", {}))
        run: dict[str, Any] = {}
        tensor_part: dict[str, Any] = {}
        for key, value in glob.items():
            if key in RUN_KEYS:
                run[key] = value
            elif key in TENSOR_KEYS:
                tensor_part[key] = value
            else:
                allowed = ", ".join(RUN_KEYS + TENSOR_KEYS)
                hint = f" (did you mean {key.replace('-', '_')!r}? keys use snake_case)" if "-" in key else ""
                raise UsageError(f"config [global]: unknown key {key!r}{hint}; allowed: {allowed}")
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in RUN_KEYS:
                raise UsageError(f"unknown option {key!r}; allowed: {', '.join(RUN_KEYS)}")
            run[key] = value
        for name in ("op_type", "tensor"):
            table = data.get(name, {})
            if not isinstance(table, Mapping) or any(not isinstance(v, Mapping) for v in table.values()):
                raise UsageError(f"config [{name}.*] entries must be tables")
        settings = TensorSettings(**_check_tensor_table(tensor_part, "global"))
        if isinstance(run.get("loss"), int) and not isinstance(run.get("loss"), bool):
            run["loss"] = float(run["loss"])
        if isinstance(run.get("time_budget"), int) and not isinstance(run.get("time_budget"), bool):
            run["time_budget"] = float(run["time_budget"])
        return cls(**run, global_settings=settings,
                   op_type={k: dict(v) for k, v in data.get("op_type", {}).items()},
                   tensor={k: dict(v) for k, v in data.get("tensor", {}).items()})

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> CompressConfig:
        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config {path} is not valid TOML: {exc}") from exc
        return cls.from_dict(data, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The TOML structure (JSON-able), None values omitted."""
        glob: dict[str, Any] = {k: getattr(self, k) for k in RUN_KEYS if getattr(self, k) is not None}
        g = self.global_settings
        glob.update({"min_params": g.min_params, "bits": list(g.bits), "k_max": g.k_max,
                     "granularity": str(g.granularity)})
        if g.skip:
            glob["skip"] = True

        def plain(table: Mapping[str, Any]) -> dict[str, Any]:
            return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Granularity) else v)
                    for k, v in table.items()}

        out: dict[str, Any] = {"global": glob}
        if self.op_type:
            out["op_type"] = {op: plain(t) for op, t in sorted(self.op_type.items())}
        if self.tensor:
            out["tensor"] = {p: plain(t) for p, t in sorted(self.tensor.items())}
        return out

    def to_toml(self) -> str:
        """The resolved config as TOML: ``from_toml`` on it gives an equal config."""
        return "# onnxws resolved configuration: `onnxws compress MODEL --config config.toml` reproduces the run\n" + \
            tomli_w.dumps(self.to_dict())
