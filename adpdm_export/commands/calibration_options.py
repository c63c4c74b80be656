"""The calibration flags shared by `adpdm calibrate` and `adpdm build-engine` (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

METHOD_CHOICES = ("adpdm", "minmax", "percentile", "uniform-groups", "per-step")

Method = Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHOD_CHOICES)}.")]
Groups = Annotated[Optional[int], typer.Option("--groups", help="Timestep groups (uniform-groups / adpdm; default 4).")]
WBits = Annotated[int, typer.Option("--w-bits", help="Weight bits (2..8).")]
ABits = Annotated[int, typer.Option("--a-bits", help="Activation bits (2..8).")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", help="Seeds sampled by the FP model (data-free).")]
CalibSteps = Annotated[int, typer.Option("--calib-steps", help="DDIM steps of the calibration trajectories.")]
Seed = Annotated[int, typer.Option("--seed", help="First calibration seed (item i uses seed + i).")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
Stat = Annotated[Optional[str], typer.Option("--stat", help="Range statistic for grouped baselines: minmax | percentile.")]
Percentile = Annotated[float, typer.Option("--percentile", help="Percentile of |x| for the percentile statistic.")]
ClassLabels = Annotated[
    Optional[str], typer.Option("--class-labels", help="Comma-separated class labels, used in turn.")
]
PromptEmbeds = Annotated[
    Optional[Path], typer.Option("--prompt-embeds", help="safetensors with prompt embeddings (K, L, D), used in turn.")
]
QuantizeResidual = Annotated[bool, typer.Option("--quantize-residual", help="Also quantize residual-add inputs.")]
QuantizeAttentionBmm = Annotated[
    bool, typer.Option("--quantize-attention-bmm", help="Also quantize attention BMM inputs.")
]
CacheDir = Annotated[
    Optional[Path],
    typer.Option("--cache-dir", help="Trajectory cache (default $ADPDM_CACHE_DIR/trajectories or ~/.cache/adpdm/trajectories)."),
]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars on stderr.")]
MethodOptions = Annotated[
    Optional[list[str]],
    typer.Option("--option", help="KEY=VALUE setting of --method adpdm (repeatable), e.g. --option search_iters=50 "
                                  "--option calib_step=last; keys in docs/method.md."),
]


def parse_method_options(items: Optional[list[str]], method: str, groups: Optional[int], seed: int,
                         percentile: float) -> dict[str, str]:
    """--option KEY=VALUE pairs as a dict, checked against the method before any work starts."""
    from engines.errors import AdpdmError

    if not items:
        return {}
    if method != "adpdm":
        raise AdpdmError(f"--option sets ADP-DM's search; --method {method} takes none")
    opts: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AdpdmError(f"--option must be KEY=VALUE, got {item!r}")
        opts[key.strip()] = value.strip()
    from calibration.adpdm import config_from_options

    config_from_options(groups, seed, percentile, 64, opts)  # unknown keys and bad values fail here
    return opts
