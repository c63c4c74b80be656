"""The calibration flags shared by `adpdm calibrate` and `adpdm build-engine` (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from calibration.configs import METHOD_NAMES

Method = Annotated[str, typer.Option("--method", help=f"One of: {', '.join(METHOD_NAMES)}.")]
Groups = Annotated[Optional[int], typer.Option("--groups", help="Timestep groups (uniform-groups / adpdm; default 4).")]
WBits = Annotated[int, typer.Option("--w-bits", help="Weight bits (2..8).")]
ABits = Annotated[int, typer.Option("--a-bits", help="Activation bits (2..8).")]
CalibSamples = Annotated[int, typer.Option("--calib-samples", help="Seeds sampled by the FP model (data-free; >= 1, ADP-DM with SRM >= 3).")]
CalibSteps = Annotated[int, typer.Option("--calib-steps", help="DDIM steps of the calibration trajectories.")]
Seed = Annotated[int, typer.Option("--seed", help="First calibration seed (item i uses seed + i).")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
SamplingPrecision = Annotated[
    str,
    typer.Option("--sampling-precision", help="What the FP model samples the calibration trajectories in: fp32 | bf16 | "
                                              "fp16 (torch.autocast; probed on the model first, fp32 where it is off; "
                                              "docs/method.md)."),
]
Stat = Annotated[Optional[str], typer.Option("--stat", help="Range statistic of uniform-groups / per-step: minmax | percentile.")]
Percentile = Annotated[Optional[float], typer.Option("--percentile", help="Percentile of |x| for the percentile statistic (default 99.99).")]
ClassLabels = Annotated[
    Optional[str], typer.Option("--class-labels", help="Comma-separated class labels, used in turn.")
]
PromptEmbeds = Annotated[
    Optional[Path], typer.Option("--prompt-embeds", help="safetensors with prompt embeddings (K, L, D), used in turn.")
]
Prompts = Annotated[
    Optional[Path],
    typer.Option("--prompts", help="Text pipelines: a file with one prompt a line, used in turn (default: the pipeline's "
                                   "own prompt file (its adpdm.json), else a shipped set of generic captions)."),
]
NegativePrompt = Annotated[
    Optional[str], typer.Option("--negative-prompt", help="Text pipelines: the unconditional half of guidance (default ''; SDXL pipelines that force zeros: zeros).")
]
GuidanceScale = Annotated[
    Optional[float],
    typer.Option("--guidance-scale", help="Text pipelines: classifier-free guidance of the calibration trajectories "
                                          "(>= 1; default: the pipeline's own (its adpdm.json), else 7.5; "
                                          "1 = none)."),
]
CalibBudgetMinutes = Annotated[
    Optional[float],
    typer.Option("--calib-budget-minutes", help="Scale the calibration settings down, in the order of docs/method.md, "
                                                "until the estimate (always printed) fits this many minutes."),
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
    typer.Option("--option", help="KEY=VALUE setting of the method (repeatable), e.g. --option search_iters=50 "
                                  "--option calib_step=last; keys in docs/method.md and docs/python-api.md."),
]


def method_from_flags(method: str, groups: Optional[int], stat: Optional[str], percentile: Optional[float],
                      options: Optional[list[str]]):
    """The method's config: each flag is one field (--groups, --stat, --percentile, --option KEY=VALUE);
    every check is the config's own (calibration.configs), before any work starts."""
    from calibration.configs import method_config
    from engines.errors import AdpdmError

    values: dict[str, object] = {}
    for item in options or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AdpdmError(f"--option must be KEY=VALUE, got {item!r}")
        values[key.strip()] = value.strip()
    for flag, name, value in (("--groups", "groups", groups), ("--stat", "stat", stat),
                              ("--percentile", "percentile", percentile)):
        if value is None:
            continue
        if name in values:
            raise AdpdmError(f"{flag} and --option {name}= both set {name}; give it once")
        values[name] = value
    return method_config(method, values)
