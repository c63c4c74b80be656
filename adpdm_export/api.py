"""The Python API in one place: load, calibrate, export, build, run, sample (docs/python-api.md).

`import adpdm_export as adpdm` exposes these names (adpdm_export/__init__.py). Each function
is a thin composition of the library's layers, the same ones the CLI commands map onto:

    model = adpdm.load_model("reference")
    result = adpdm.calibrate(model, adpdm.ADPDMConfig(groups=4), quant=adpdm.QuantConfig(w_bits=8, a_bits=8))
    result.save("calib"); result = adpdm.CalibrationResult.load("calib")
    manifest = adpdm.export(model, result, "build")
    runner = adpdm.Runner("build")
    images = adpdm.sample(runner, n=16, steps=50, seed=0)
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from adpdm_export.build_pipeline import DEFAULT_BATCH_SIZES, BuildSummary, default_targets
from adpdm_export.model_loading import LoadedModel, load_model
from calibration.configs import ADPDMConfig, DataFreeConfig, MethodConfig
from calibration.progress import Progress
from calibration.qconfig import QuantConfig
from calibration.result import CalibrationResult
from calibration.trajectories import DEFAULT_BATCH_SIZE
from engines.errors import AdpdmError
from engines.manifest import Manifest, load_manifest
from engines.runner import TimestepDispatchRunner as Runner


def _loaded(model: Union[str, LoadedModel]) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return load_model(str(model))
    raise AdpdmError(f"model must be a name/path or the value of adpdm.load_model, got {type(model).__name__}")


def _data_free(loaded: LoadedModel, data: Optional[DataFreeConfig], cond, uncond, prompts, negative_prompt,
               guidance_scale, log) -> tuple[DataFreeConfig, dict, Optional[dict]]:
    """(data, cond, uncond) of data-free calibration: `text_prompts.calibration_conditions`, the one
    place the conditions are assembled (the CLI calls it too). data=None on a text pipeline: its own guidance scale."""
    import dataclasses

    from adpdm_export.text_prompts import calibration_conditions

    if guidance_scale is not None and data is not None and data.guidance_scale not in (1.0, guidance_scale):
        raise AdpdmError(f"guidance_scale={guidance_scale} and data.guidance_scale={data.guidance_scale}: give it once")
    if guidance_scale is None and data is not None:
        guidance_scale = data.guidance_scale
    data = data or DataFreeConfig()
    conds = calibration_conditions(loaded, data.samples, cond=cond, uncond=uncond, prompts=prompts,
                                   negative_prompt=negative_prompt, guidance_scale=guidance_scale)
    for note in conds.notes:
        if log is not None:
            log(f"note: {note}")
    return dataclasses.replace(data, guidance_scale=conds.guidance_scale), conds.cond, conds.uncond


def calibrate(
    model: Union[str, LoadedModel],
    method: Union[None, str, MethodConfig] = None,
    quant: Optional[QuantConfig] = None,
    *,
    data: Any = None,
    seed: int = 0,
    cond: Optional[Mapping[str, Any]] = None,
    uncond: Optional[Mapping[str, Any]] = None,
    prompts: Optional[Sequence[str]] = None,
    negative_prompt: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    device: str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    cache_dir: Optional[str | os.PathLike] = None,
    progress: Optional[Progress] = None,
    log: Optional[Callable[[str], None]] = None,
    budget_minutes: Optional[float] = None,
    on_estimate: Optional[Callable[[Any], None]] = None,
) -> CalibrationResult:
    """Calibrate `model` (default: ADP-DM with 4 groups, W8A8, data-free).

    method: a method config, or its name ("adpdm", "minmax", ...) for the defaults.
    data: None / a DataFreeConfig (the FP model samples `samples` seeds from `seed`; its
    guidance_scale > 1 samples with classifier-free guidance), a TrajectorySet, or the user's own
    `(x_t, t[, cond])` batches (an iterable, or a callable returning one). cond / uncond: the
    conditions of data-free sampling and the unconditional inputs of guidance (default: the
    model's null ones). Text-to-image pipelines: `prompts` (default: a shipped set of generic
    captions) and `negative_prompt` (default "") are encoded by the pipeline's own text encoder,
    and guidance_scale (or data.guidance_scale; where data is None, the pipeline's own: its adpdm.json,
    else 7.5) applies, as
    `adpdm calibrate` does. cache_dir: where sampled trajectories are cached (default: none).
    budget_minutes / on_estimate (data-free): the cost estimate of a timed probe, and settings
    scaled down to fit the budget (calibration.cost_estimate).
    """
    from calibration.configs import method_config
    from calibration.pipeline import calibrate as run

    loaded = _loaded(model)
    method = ADPDMConfig() if method is None else method_config(method) if isinstance(method, str) else method
    if data is None or isinstance(data, DataFreeConfig):
        data, cond, uncond = _data_free(loaded, data, cond, uncond, prompts, negative_prompt, guidance_scale, log)
    else:
        given = [k for k, v in (("cond", cond), ("uncond", uncond), ("prompts", prompts),
                                ("negative_prompt", negative_prompt), ("guidance_scale", guidance_scale))
                 if v is not None]
        if given:
            raise AdpdmError(f"{', '.join(given)} apply to data-free calibration; trajectories or your own batches "
                             "carry their conditions")
    try:
        return run(
            loaded.unet, loaded.scheduler_config, method, quant, data=data, seed=seed, cond=cond, uncond=uncond,
            device=device, batch_size=batch_size, cache_dir=None if cache_dir is None else str(cache_dir),
            progress=progress, log=log, extra_settings={"model_source": loaded.source, "model_kind": loaded.kind},
            budget_minutes=budget_minutes, on_estimate=on_estimate,
        )
    finally:
        loaded.unet.to("cpu")  # back where load_model put it, also after a failure on CUDA


def build_engine(
    model: Union[str, LoadedModel],
    out: str | os.PathLike,
    method: Optional[MethodConfig] = None,
    quant: Optional[QuantConfig] = None,
    data: Optional[DataFreeConfig] = None,
    *,
    cond: Optional[Mapping[str, Any]] = None,
    uncond: Optional[Mapping[str, Any]] = None,
    prompts: Optional[Sequence[str]] = None,
    negative_prompt: Optional[str] = None,
    guidance_scale: Optional[float] = None,
    log: Optional[Callable[[str], None]] = None,
    **options: Any,
) -> BuildSummary:
    """Calibrate, export and (backend trt) build `out` for `model`, resumably: `adpdm build-engine`.

    The conditions are those of `calibrate` (cond, uncond, prompts, negative_prompt, guidance_scale;
    a text pipeline with data=None: the default prompts, guidance 7.5); every other keyword
    (seed, device, backend, targets, high_precision, batch_sizes, resolution, opt_level, cache_dir,
    force, progress, say, calib_budget_minutes) is `adpdm_export.build_pipeline.build_engine`'s.
    """
    from adpdm_export.build_pipeline import build_engine as run_build
    from engines.file_io import check_output_folder

    check_output_folder(out)  # a file or an unwritable folder: one line before the model loads
    if data is not None and not isinstance(data, DataFreeConfig):
        raise AdpdmError("build_engine calibrates data-free (a DataFreeConfig); calibrate user data with "
                         "calibrate(..., data=...) and export the result")
    loaded = _loaded(model)
    data, cond, uncond = _data_free(loaded, data, cond, uncond, prompts, negative_prompt, guidance_scale, log)
    return run_build(loaded, out, method, quant, data, cond=cond, uncond=uncond, log=log, **options)


def export(
    model: Union[str, LoadedModel],
    result: CalibrationResult,
    out_dir: str | os.PathLike,
    *,
    targets: Optional[Sequence[str]] = None,
    high_precision: Optional[str] = None,
    check: bool = True,
    say: Optional[Callable[[str], None]] = None,
) -> Manifest:
    """One QDQ ONNX graph per timestep group (+ one shared weights file and manifest.json) in `out_dir`.

    targets: "trt" (Q/DQ on Conv/Linear inputs, for TensorRT) and/or "ort" (onnxruntime CPU);
    default both at W8, "ort" below. high_precision: the TensorRT target's float type outside the INT8
    layers, "fp16" (default) | "bf16" | "fp32"; the CPU target is always FP32. check: parity of every graph against PyTorch. `out_dir` must
    be missing, empty or an earlier build (never a folder of other files). Returns the manifest
    of the build, ready for `Runner(out_dir)` or `build_engines(out_dir)`.
    """
    from adpdm_export.build_stages import claimed_build_folder
    from adpdm_export.high_precision import parse_high_precision
    from adpdm_export.qdq_export import check_supported, export_qdq_for, parse_targets

    if not isinstance(result, CalibrationResult):
        raise AdpdmError(f"result must be a CalibrationResult, got {type(result).__name__}")
    chosen = default_targets(result.w_bits, "ort") if targets is None else parse_targets(targets)
    check_supported(result, chosen)
    precision = parse_high_precision(high_precision, chosen)
    with claimed_build_folder(out_dir):  # missing, empty or one of our builds; one writer at a time
        export_qdq_for(_loaded(model), result, out_dir, target=chosen, check=check, say=say, high_precision=precision)
    return load_manifest(out_dir)


def build_engines(
    out_dir: str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    resolution: Optional[tuple[int, int]] = None,
    opt_level: int = 3,
) -> Manifest:
    """TensorRT: one engine per group graph of an exported build (needs TensorRT and a GPU)."""
    from engines.build import build_trt_engines

    return build_trt_engines(out_dir, batch_sizes=batch_sizes, resolution=resolution, opt_level=opt_level)


def sample(
    source: Union[Runner, LoadedModel],
    n: int = 16,
    steps: int = 50,
    seed: int = 0,
    *,
    scheduler: str = "ddim",
    cond: Optional[Mapping[str, torch.Tensor]] = None,
    on_step: Optional[Callable[[int, int], None]] = None,
) -> torch.Tensor:
    """`n` images (n, C, H, W) in the model's range [-1, 1] from seeded noise: item i of seed s has
    the same noise on every backend, so a runner's images compare to the FP model's one to one.

    source: a Runner (the quantized build) or a LoadedModel (the FP model, for reference).
    cond: conditions per item (default: the model's null/default ones).
    """
    from adpdm_export.sampling import generate, predictor_for
    from engines.conditioning import default_condition
    if isinstance(source, Runner):
        predictor, sched_config = source, dict(source.manifest.scheduler)
        shape, conditioning = tuple(source.sample_shape), dict(source.manifest.model.conditioning)
    elif isinstance(source, LoadedModel):
        predictor, sched_config = predictor_for(source, "torch"), source.scheduler_config
        shape, conditioning = source.sample_shape, source.conditioning
    else:
        raise AdpdmError(f"sample needs a Runner or a LoadedModel, got {type(source).__name__}")
    if cond is None:  # the FP pipeline's own null conditioning (a text pipeline: the empty prompt)
        cond = source.default_condition(n) if isinstance(source, LoadedModel) else default_condition(conditioning, n)
    cond = dict(cond)
    return generate(predictor, sched_config, shape, n, steps, seed, cond=cond, scheduler=scheduler,
                    on_step=on_step).images


__all__ = [
    "ADPDMConfig", "BuildSummary", "CalibrationResult", "DataFreeConfig", "LoadedModel", "Manifest", "QuantConfig",
    "Runner", "build_engine", "build_engines", "calibrate", "export", "load_model", "sample"
]
