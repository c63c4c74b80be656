"""What a user sets for calibration: one frozen dataclass per method, plus the data-free sampling.

`calibration.pipeline.calibrate` dispatches on the config's type; each config validates itself
on construction, so a bad value fails before any model is loaded or sampled. The CLI maps
each flag to one field through `method_config(name, fields)` (`--groups` -> `groups`,
`--option KEY=VALUE` -> field KEY), so a check lives here once, for the API and the CLI.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Mapping, Optional, Union

from engines.errors import AdpdmError
from engines.sampler import check_guidance

STATS = ("minmax", "percentile")
PARTITIONS = ("scale-dp", "search", "per-step")
INITS = ("kmeans", "uniform")
SAMPLING_PRECISIONS = ("fp32", "fp16", "bf16")  # calibration.sampling_precision
DEFAULT_GROUPS = 4
DEFAULT_PERCENTILE = 99.99
DEFAULT_SAMPLES = 64
DEFAULT_STEPS = 100


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


def _as_int(value: Any, what: str) -> int:
    """An integral value as int (2, 2.0, "2"), or one AdpdmError line (2.7, True, inf, "abc")."""
    if isinstance(value, bool):
        raise AdpdmError(f"{what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        as_float = float(value)
        if as_float != int(as_float):
            raise ValueError
        return int(as_float)
    except (TypeError, ValueError, OverflowError):
        raise AdpdmError(f"{what} must be an integer, got {value!r}") from None


def _int(obj: Any, name: str, low: int, what: str = "") -> None:
    value = getattr(obj, name)
    try:
        value = _as_int(value, name)
    except AdpdmError:
        raise AdpdmError(f"{name} must be an integer >= {low}, got {value!r}") from None
    if value < low:
        raise AdpdmError(f"{name} must be >= {low}{what}, got {value}")
    _set(obj, name, value)


def _float(obj: Any, name: str, low: float, high: float = float("inf"), low_open: bool = False) -> None:
    value = getattr(obj, name)
    try:
        if isinstance(value, bool):
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise AdpdmError(f"{name} must be a number, got {value!r}") from None
    bad = value <= low if low_open else value < low
    if bad or value > high or value != value:
        lo = "(" if low_open else "["
        hi = "inf)" if high == float("inf") else f"{high:g}]"
        raise AdpdmError(f"{name} must be in {lo}{low:g}, {hi}, got {value:g}")
    _set(obj, name, value)


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise AdpdmError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class MethodConfig:
    """Base of the method configs: `method` is the name the CLI and calibration.json use."""

    method: ClassVar[str] = ""
    groups_fixed: ClassVar[Optional[int]] = None  # methods with one scale set say 1

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **asdict(self)}  # type: ignore[call-overload]


@dataclass(frozen=True)
class MinMaxConfig(MethodConfig):
    """One scale set (G = 1): max |x| over every calibration step."""

    method: ClassVar[str] = "minmax"
    groups_fixed: ClassVar[Optional[int]] = 1


@dataclass(frozen=True)
class PercentileConfig(MethodConfig):
    """One scale set: the `percentile`-th percentile of |x| over every calibration step."""

    method: ClassVar[str] = "percentile"
    groups_fixed: ClassVar[Optional[int]] = 1
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        _float(self, "percentile", 0.0, 100.0, low_open=True)


@dataclass(frozen=True)
class UniformGroupsConfig(MethodConfig):
    """`groups` equal timestep intervals, each with scales from its calibration steps (`stat`)."""

    method: ClassVar[str] = "uniform-groups"
    groups: int = DEFAULT_GROUPS
    stat: str = "minmax"
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        _int(self, "groups", 1)
        _choice(self, "stat", STATS)
        _float(self, "percentile", 0.0, 100.0, low_open=True)


@dataclass(frozen=True)
class PerStepConfig(MethodConfig):
    """One group per calibration step: the accuracy ceiling, not a handful of engines."""

    method: ClassVar[str] = "per-step"
    stat: str = "minmax"
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        _choice(self, "stat", STATS)
        _float(self, "percentile", 0.0, 100.0, low_open=True)


@dataclass(frozen=True)
class ADPDMConfig(MethodConfig):
    """ADP-DM: SRM chooses the calibration timestep, then `groups` timestep groups and their scales
    are learned (docs/method.md argues each setting).

    calib_step: None (SRM chooses), "last" or a step index (fixed; the SRM ablation).
    percentile: percentile of |x| of the initial and output scales and of SRM's proxy quantizer.
    search_items: trajectory items used as x0 sources of the search data (None: all).
    partition: `scale-dp` (default), `search` (the paper's relaxed search) or `per-step`
        (the learned per-step ceiling); every partition learns for search_iters + refine_iters.
    init: initial partition of the scales, `kmeans` or `uniform`.
    search_iters / refine_iters / search_batch / lr_logits / lr_scales / temp_end /
        entropy_weight: the search (calibration.group_search.GroupSearchConfig).
    srm_candidates / srm_eval_steps / srm_heldout_items / lambda_mmd: SRM
        (calibration.srm.SRMConfig).
    """

    method: ClassVar[str] = "adpdm"
    groups: int = DEFAULT_GROUPS
    calib_step: Optional[Union[str, int]] = None
    percentile: float = DEFAULT_PERCENTILE
    search_items: Optional[int] = 16
    partition: str = "scale-dp"
    init: str = "kmeans"
    search_iters: int = 100
    refine_iters: int = 60
    search_batch: int = 16
    lr_logits: float = 0.1
    lr_scales: float = 5e-3
    temp_end: float = 0.05
    entropy_weight: float = 0.05
    srm_candidates: int = 6
    srm_eval_steps: int = 6
    srm_heldout_items: int = 16
    lambda_mmd: float = 15.0

    def __post_init__(self) -> None:
        _int(self, "groups", 1)
        if self.calib_step is not None and self.calib_step != "last":
            try:
                _set(self, "calib_step", _as_int(self.calib_step, "calib_step"))
            except AdpdmError:
                raise AdpdmError(f"calib_step must be None, 'last' or a step index, got {self.calib_step!r}") from None
        _float(self, "percentile", 0.0, 100.0, low_open=True)
        if self.search_items is not None:
            _int(self, "search_items", 1)
        _choice(self, "partition", PARTITIONS)
        _choice(self, "init", INITS)
        _int(self, "search_iters", 0)
        _int(self, "refine_iters", 0)
        _int(self, "search_batch", 1)
        _float(self, "lr_logits", 0.0, low_open=True)
        _float(self, "lr_scales", 0.0, low_open=True)
        _float(self, "temp_end", 0.0, low_open=True)
        _float(self, "entropy_weight", 0.0)
        _int(self, "srm_candidates", 1)
        _int(self, "srm_eval_steps", 1)
        _int(self, "srm_heldout_items", 1)
        _float(self, "lambda_mmd", 0.0)


@dataclass(frozen=True)
class DataFreeConfig:
    """The data-free calibration data: `samples` seeds sampled by the FP model with `steps` DDIM
    steps (item i from seed + i; the seed is `calibrate`'s). guidance_scale > 1: classifier-free
    guidance (needs `calibrate(uncond=...)`, e.g. the negative prompt's embeddings); the data then
    holds both halves the UNet sees at every step, the conditional and the unconditional one.
    precision: what the FP model samples in (fp32; fp16 / bf16 under torch.autocast, checked on
    the model first: calibration.sampling_precision)."""

    samples: int = DEFAULT_SAMPLES
    steps: int = DEFAULT_STEPS
    guidance_scale: float = 1.0
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _int(self, "samples", 1)
        _int(self, "steps", 1)
        _set(self, "guidance_scale", check_guidance(self.guidance_scale))  # the sampler's rule, one message
        _choice(self, "precision", SAMPLING_PRECISIONS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["guidance_scale"] == 1.0:
            d.pop("guidance_scale")  # only guided plans carry the key
        if d["precision"] == "fp32":
            d.pop("precision")  # nor do FP32 ones this one
        return d

    def check_for(self, num_train_timesteps: int) -> "DataFreeConfig":
        """This config against a model: no more DDIM steps than its training timesteps."""
        if self.steps > int(num_train_timesteps):
            raise AdpdmError(f"calibration steps must be from 1 to the model's {num_train_timesteps} training "
                             f"timesteps, got {self.steps}")
        return self


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {
    c.method: c for c in (ADPDMConfig, MinMaxConfig, PercentileConfig, UniformGroupsConfig, PerStepConfig)
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_CONFIGS)


def _cast(cls: type, name: str, raw: Any) -> Any:
    """A field value from text (`--option KEY=VALUE`); other values pass to the dataclass's checks."""
    if not isinstance(raw, str):
        return raw
    hint = typing.get_type_hints(cls)[name]
    args = set(typing.get_args(hint)) or {hint}
    if raw.lower() in ("none", "null") and type(None) in args:
        return None
    if str in args:
        return raw
    for kind in (int, float):
        if kind in args:
            try:
                return kind(raw)
            except ValueError:
                raise AdpdmError(f"{cls.method} setting {name} must be {kind.__name__}, got {raw!r}") from None  # type: ignore[attr-defined]
    return raw


def method_config(method: str, values: Optional[Mapping[str, Any]] = None) -> MethodConfig:
    """The config of `method` with `values` set (text is cast to each field's type), checked.

    Unknown methods and settings a method does not have are one AdpdmError line naming the
    choices, e.g. `--groups` for minmax (one scale set)."""
    cls = METHOD_CONFIGS.get(method)
    if cls is None:
        raise AdpdmError(f"unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    values = dict(values or {})
    if "groups" in values and values["groups"] is None:
        values.pop("groups")  # not given: the method's default
    if cls.groups_fixed is not None and "groups" in values and values["groups"] is not None:
        if _as_int(values["groups"], "groups") == cls.groups_fixed:
            values.pop("groups")  # --groups 1 with a one-scale-set method says what it does
        else:
            raise AdpdmError(f"--groups {values['groups']}: {method} uses one scale set "
                             "(use uniform-groups or adpdm for timestep groups)")
    unknown = sorted(set(values) - set(known))
    if unknown:
        has = f"its settings: {', '.join(known)}" if known else "it has no settings"
        raise AdpdmError(f"{method} has no setting {', '.join(unknown)} ({has})")
    return cls(**{k: _cast(cls, k, v) for k, v in values.items()})


def method_config_from_dict(d: Mapping[str, Any]) -> MethodConfig:
    """Inverse of `MethodConfig.to_dict` (a stage key, a saved settings record)."""
    d = dict(d)
    return method_config(str(d.pop("method", "")), d)


__all__ = [
    "ADPDMConfig", "DataFreeConfig", "MethodConfig", "MinMaxConfig", "PercentileConfig", "PerStepConfig",
    "UniformGroupsConfig", "METHOD_CONFIGS", "METHOD_NAMES", "method_config", "method_config_from_dict",
]
