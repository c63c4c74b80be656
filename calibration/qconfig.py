"""The quantization configuration: bit widths, export target, which layers stay FP, options.

`QuantConfig` says *what* is quantized and how the export will look; it carries no
scales (those live in the quantizers and in `CalibrationResult`). It round-trips
through a plain dict (`to_dict` / `from_dict`), which is how `CalibrationResult`
stores it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from engines.errors import AdpdmError

MIN_BITS = 2
MAX_BITS = 8
TARGETS = ("trt", "ort")
# On disk (calibration.json's config.quant, build stage keys) the graph target keeps its
# historical key "profile": to_dict / from_dict are the one place that maps the two names.
_TARGET_KEY_ON_DISK = "profile"

# Module-name patterns (fnmatch, matched against the full module path) kept in high
# precision by default: the UNet's first and last convolutions and every time/class
# embedding layer, including each resnet's projection of the time embedding (as
# ModelOpt's diffusers recipe and the paper's code do).
DEFAULT_FP_LAYERS: tuple[str, ...] = (
    "conv_in",
    "conv_out",
    "time_embedding",
    "time_embedding.*",
    "class_embedding",
    "class_embedding.*",
    "add_embedding",
    "add_embedding.*",
    "*time_emb_proj",
)


def check_bits(bits: Any, what: str) -> int:
    """`bits` as an int in MIN_BITS..MAX_BITS, or an AdpdmError naming `what`."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        try:
            if float(bits) != int(bits):
                raise ValueError
            bits = int(bits)
        except (TypeError, ValueError):
            raise AdpdmError(f"{what} must be an integer from {MIN_BITS} to {MAX_BITS}, got {bits!r}") from None
    if not MIN_BITS <= bits <= MAX_BITS:
        raise AdpdmError(f"{what} must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
    return bits


@dataclass(frozen=True)
class QuantConfig:
    """What the quantization-aware UNet quantizes.

    w_bits / a_bits: symmetric integer bits for weights (per output channel) and
        activations (per tensor, one scale per timestep group), 2..8.
    target: `trt` (Q/DQ on the inputs of Conv/Linear only) or `ort` (also on their
        outputs, with their own per-group scales). Output scales are always observed
        during calibration, so a result can be exported with either target.
    fp_layers: fnmatch patterns of Conv2d/Linear module paths left in full precision.
    quantize_residual: also quantize both inputs of the residual additions of
        ResnetBlock2D and of `Attention` modules with `residual_connection`.
    quantize_attention_bmm: also quantize both inputs of the two attention batched
        matmuls (q @ k^T and softmax(.) @ v).
    share_qkv_input: q/k/v projections that read the same tensor share one input
        quantizer (the export places one Q/DQ on that tensor).
    weight_clip_search: choose each output channel's weight clipping by MSE search
        (else plain max-abs).
    weight_clip_grid: number of clipping ratios tried in that search.
    weight_clip_min: smallest clipping ratio tried (ratio of the channel's max-abs).
    """

    w_bits: int = 8
    a_bits: int = 8
    target: str = "trt"
    fp_layers: tuple[str, ...] = field(default_factory=lambda: DEFAULT_FP_LAYERS)
    quantize_residual: bool = False
    quantize_attention_bmm: bool = False
    share_qkv_input: bool = True
    weight_clip_search: bool = True
    weight_clip_grid: int = 80
    weight_clip_min: float = 0.3

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "QuantConfig":
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen: normalise in place)
        put("w_bits", check_bits(self.w_bits, "w_bits"))
        put("a_bits", check_bits(self.a_bits, "a_bits"))
        if self.target not in TARGETS:
            raise AdpdmError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        fp = (self.fp_layers,) if isinstance(self.fp_layers, str) else self.fp_layers
        put("fp_layers", tuple(str(p) for p in fp))
        if int(self.weight_clip_grid) < 1:
            raise AdpdmError(f"weight_clip_grid must be >= 1, got {self.weight_clip_grid}")
        put("weight_clip_grid", int(self.weight_clip_grid))
        if not 0.0 < float(self.weight_clip_min) <= 1.0:
            raise AdpdmError(f"weight_clip_min must be in (0, 1], got {self.weight_clip_min}")
        put("weight_clip_min", float(self.weight_clip_min))
        return self

    def is_fp_layer(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.fp_layers)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form: `target` is written as "profile" (same key order as before)."""
        d = {(_TARGET_KEY_ON_DISK if k == "target" else k): v for k, v in asdict(self).items()}
        d["fp_layers"] = list(self.fp_layers)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "QuantConfig":
        """From `to_dict`'s on-disk form ("profile") or with the field name `target`."""
        d = dict(d)
        if _TARGET_KEY_ON_DISK in d:
            if "target" in d and d["target"] != d[_TARGET_KEY_ON_DISK]:
                raise AdpdmError(f"quantization config gives both target {d['target']!r} and profile {d['profile']!r}")
            d["target"] = d.pop(_TARGET_KEY_ON_DISK)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdpdmError(f"unknown quantization config keys: {', '.join(unknown)}")
        if "fp_layers" in d:
            d["fp_layers"] = tuple(d["fp_layers"])
        return cls(**d)
