"""`build-engine`: calibrate -> export -> build, resumable, with the manifest written last.

Stages and what each writes into the build folder:

1. calibrate  `calibration/` (calibration.json + .safetensors), keyed by the model
   (`model_identity`: weights, config, scheduler config, source), every calibration
   setting, the content of every conditioning tensor (class labels, prompt embeddings)
   and the versions of the tool, torch and diffusers;
2. export     `unet.g{k}.onnx` (TensorRT target) and `unet.g{k}.ort.onnx` (onnxruntime CPU
   target), one shared `unet.weights.data`, `qdq_report.json`; keyed by the model (the
   export reads its weights and config), the calibration's file hashes, the targets and
   the versions of the tool, torch, diffusers, onnx and onnxruntime;
3. engines    (`--backend trt` only) `unet.g{k}.plan` + the timing cache, keyed by the
   model, the graphs' hashes, the build settings and the GPU/TensorRT version.

`manifest.json` is removed before any stage reruns and written last, so a folder with a
manifest is always a finished build; an interrupted one resumes at the first stage whose
record (`.adpdm-stages.json`) is missing or stale.

`--out` must be missing, empty or one of our builds (`build_stages.check_build_folder`); a
stage claims its output files in the ledger before it runs (refusing a file of someone
else's in their place), and the whole build holds `build_stages.build_lock`
(`build_stages.claimed_build_folder`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from adpdm_export.build_stages import StageLedger, StageRecord, claimed_build_folder, stage_key
from adpdm_export.model_loading import LoadedModel, load_model
from calibration.configs import ADPDMConfig, DataFreeConfig, MethodConfig
from calibration.progress import Progress
from calibration.qconfig import QuantConfig
from engines.errors import AdpdmError
from engines.file_io import check_output_folder
from engines.heap import release_heap
from engines.manifest import load_manifest
from engines.manifest_schema import ENGINE_NAME, MANIFEST_NAME, TIMING_CACHE_NAME, Manifest, tool_version

CALIBRATION_DIR = "calibration"
DEFAULT_BATCH_SIZES = (1, 4, 16)


@dataclass
class BuildSummary:
    out: Path
    backend: str
    manifest: Manifest
    stages: list[StageRecord]
    export_report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def model_identity(loaded: LoadedModel) -> dict[str, Any]:
    """What of the model decides a stage's output. `loaded.sha256` hashes the state dict only
    (names, dtypes, shapes, bytes); the config (same weights, other norm_eps or head layout:
    another model), the scheduler config (the calibration trajectories) and the source
    (recorded in calibration.json, where `adpdm eval` reloads the model from) count too."""
    return {
        "weights_sha256": loaded.sha256,
        "config": dict(getattr(loaded.unet, "config", None) or {}),
        "scheduler_config": dict(loaded.scheduler_config),
        "source": loaded.source,
        "kind": loaded.kind,
        "sample_shape": list(loaded.sample_shape),
        "out_channels": loaded.out_channels,
        "conditioning": loaded.conditioning,
    }


def _versions(*modules: str) -> dict[str, Optional[str]]:
    """The tool's version and those of the libraries whose code decides a stage's output."""
    from importlib import import_module

    out: dict[str, Optional[str]] = {"adpdm-export": tool_version()}
    for name in modules:
        try:
            out[name] = str(import_module(name).__version__)
        except (ImportError, AttributeError):
            out[name] = None
    return out


def _calibrate_stage(loaded: LoadedModel, plan: "CalibrationPlan", out: Path, cond, uncond, cache_dir, progress,
                     log, say):
    from calibration.pipeline import calibrate

    try:
        result = calibrate(
            loaded.unet, loaded.scheduler_config, plan.method, plan.quant, data=plan.data, seed=plan.seed, cond=cond,
            uncond=uncond, device=plan.device, cache_dir=cache_dir, progress=progress, log=log,
            extra_settings={"model_source": loaded.source, "model_kind": loaded.kind},
            budget_minutes=plan.budget_minutes, on_estimate=lambda estimate: say(estimate.summary()),
        )
    finally:
        loaded.unet.to("cpu")  # the export and the next stages run on the CPU, also after a failure on CUDA
    folder = result.save(out / CALIBRATION_DIR)
    return sorted(p for p in Path(folder).iterdir() if p.is_file())


def build_engine(
    model: str | LoadedModel,
    out: str | Path,
    method: Optional[MethodConfig] = None,
    quant: Optional[QuantConfig] = None,
    data: Optional[DataFreeConfig] = None,
    *,
    seed: int = 0,
    device: str = "cpu",
    backend: str = "auto",
    targets: Optional[Sequence[str]] = None,
    high_precision: Optional[str] = None,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    resolution: Optional[tuple[int, int]] = None,
    opt_level: int = 3,
    cond: Optional[dict] = None,
    uncond: Optional[dict] = None,
    cache_dir: Optional[str] = None,
    force: bool = False,
    progress: Optional[Progress] = None,
    say: Callable[[str], None] = lambda msg: None,
    log: Optional[Callable[[str], None]] = None,
    calib_budget_minutes: Optional[float] = None,
) -> BuildSummary:
    """Build (or resume) the folder `out` for `model` (a name/path for `load_model`, or a LoadedModel).

    method / quant / data: the calibration (default ADP-DM with 4 groups, W8A8, 64 data-free
    samples x 100 steps); seed, device, cond and uncond (the unconditional inputs of guidance,
    data.guidance_scale > 1) as for `calibration.pipeline.calibrate`. targets:
    the graph targets to export (default `default_targets`). high_precision: the TensorRT target's float
    type outside the INT8 layers, fp16 (default) | bf16 | fp32 (adpdm_export/high_precision.py); part of
    the export stage's key. calib_budget_minutes: scale the calibration settings down to fit
    (calibration.cost_estimate; the estimate is said before the calibration runs either way).
    Returns what each stage did.
    """
    from adpdm_export.high_precision import parse_high_precision
    from adpdm_export.qdq_export import parse_targets
    from calibration.cost_estimate import check_budget_minutes
    from calibration.pipeline import resolve_device
    from engines.platform import pick_backend

    t_start = time.perf_counter()
    method = ADPDMConfig() if method is None else method
    quant = QuantConfig() if quant is None else quant
    data = DataFreeConfig() if data is None else data
    if not isinstance(method, MethodConfig):
        raise AdpdmError(f"method must be a method config (ADPDMConfig, MinMaxConfig, ...), got {type(method).__name__}")
    if not isinstance(data, DataFreeConfig):
        raise AdpdmError("build_engine calibrates data-free (a DataFreeConfig); calibrate user data with "
                         "calibrate(..., data=...) and export the result")
    resolve_device(device)
    chosen = pick_backend(backend)  # one clear line where --backend trt cannot run here
    targets = default_targets(quant.w_bits, chosen) if targets is None else parse_targets(targets)
    if chosen == "trt" and "trt" not in targets:
        raise AdpdmError("--backend trt needs the TensorRT-target graphs: include 'trt' in the targets")
    if chosen == "ort" and "ort" not in targets:
        raise AdpdmError("--backend ort runs the onnxruntime-target graphs: include 'ort' in the targets")
    precision = parse_high_precision(high_precision, targets)
    check_output_folder(out)
    check_resolution(resolution, chosen)
    if data.guidance_scale > 1.0 and not uncond:
        raise AdpdmError("data.guidance_scale > 1 needs `uncond`, the unconditional inputs of guidance (e.g. the "
                         "negative prompt's embeddings)")
    loaded = model if isinstance(model, LoadedModel) else None
    if loaded is not None:
        data.check_for(loaded.num_train_timesteps)
        check_resolution(resolution, chosen, dict(getattr(loaded.unet, "config", {}) or {}))
    budget = None if calib_budget_minutes is None else check_budget_minutes(calib_budget_minutes)
    plan = CalibrationPlan(method, quant, data, int(seed), str(device), budget)
    # empty, missing or one of our builds (else one line, before any work); one build per folder
    with claimed_build_folder(out) as out:
        return _build_locked(model, out, plan, chosen, targets, batch_sizes, resolution, opt_level, cond, uncond,
                             cache_dir, force, progress, say, log, loaded, t_start, precision)


def default_targets(w_bits: int, backend: str) -> tuple[str, ...]:
    """The graph targets a build exports: both at W8; only onnxruntime's below (TensorRT runs INT8
    weights only, so a W<8 build with backend trt is refused here, before any work)."""
    if int(w_bits) == 8:
        return ("trt", "ort")
    if backend == "trt":
        raise AdpdmError("TensorRT engines need W8 (INT8 weights); use --w-bits 8 or --backend ort")
    return ("ort",)


def check_resolution(resolution: Optional[Sequence[int]], backend: str, unet_config: Optional[dict] = None) -> None:
    """--resolution is the TensorRT optimization profile's (H, W): refused where nothing would use it,
    and checked against the UNet's downsampling (every side a multiple of 2^(down blocks - 1))."""
    if resolution is None:
        return
    if backend != "trt":
        raise AdpdmError("--resolution sets the TensorRT optimization profile; an onnxruntime build runs any "
                         "resolution the UNet takes: drop --resolution or build with --backend trt")
    if len(resolution) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in resolution):
        raise AdpdmError(f"--resolution must be two positive integers H W, got {tuple(resolution)}")
    blocks = len((unet_config or {}).get("down_block_types") or ())
    step = 2 ** max(blocks - 1, 0)
    if step > 1 and any(v % step for v in resolution):
        raise AdpdmError(f"--resolution {resolution[0]} {resolution[1]}: this UNet downsamples by {step}, so H and W "
                         f"must be multiples of {step}")


@dataclass(frozen=True)
class CalibrationPlan:
    """The calibration a build runs, as one value: its stage key and its call."""

    method: MethodConfig
    quant: QuantConfig
    data: DataFreeConfig
    seed: int
    device: str
    budget_minutes: Optional[float] = None  # scales method/data down to fit (calibration.cost_estimate)

    def key(self) -> dict[str, Any]:
        key = {"method": self.method.to_dict(), "quant": self.quant.to_dict(), "data": self.data.to_dict(),
               "seed": self.seed, "device": self.device}
        if self.budget_minutes is not None:  # the settings asked for and the budget: a resume reuses the fit
            key["budget_minutes"] = self.budget_minutes
        return key


def _build_locked(model, out: Path, plan: CalibrationPlan, chosen, targets, batch_sizes, resolution,
                  opt_level, cond, uncond, cache_dir, force, progress, say, log, loaded, t_start,
                  precision: str = "fp32") -> BuildSummary:
    from adpdm_export.qdq_export import REPORT_NAME, WEIGHTS_NAME, export_qdq_for, graph_name
    from engines.ort_one_session import GROUP_CONSTANTS_NAME, SHARED_GRAPH_NAME, SHARED_WEIGHTS_NAME

    SHARED_SESSION_FILES = (SHARED_GRAPH_NAME, SHARED_WEIGHTS_NAME, GROUP_CONSTANTS_NAME)
    from adpdm_export.qdq_manifest import write_qdq_manifest
    from adpdm_export.qdq_report import read_report
    from calibration.result import JSON_NAME, TENSORS_NAME, CalibrationResult

    ledger = StageLedger(out).open()  # marks the folder as ours before any work
    loaded = loaded or load_model(model)
    plan.data.check_for(loaded.num_train_timesteps)
    check_resolution(resolution, chosen, dict(getattr(loaded.unet, "config", {}) or {}))
    if cond is None:
        cond = loaded.default_condition(plan.data.samples)
    manifest_path = out / MANIFEST_NAME

    def unfinished() -> None:
        manifest_path.unlink(missing_ok=True)  # a folder with a manifest is a finished build

    model_id = model_identity(loaded)

    # 1. calibrate (conditions by content: `--class-labels 1,2` then `3,4` must recalibrate)
    guidance = {"uncond": dict(uncond)} if uncond else {}  # in the key only when guided
    key = stage_key(stage="calibrate", model=model_id, settings=plan.key(), cond=dict(cond), **guidance,
                    versions=_versions("torch", "diffusers"))
    if force or ledger.current("calibrate", key) is None:
        ledger.claim("calibrate", [f"{CALIBRATION_DIR}/{JSON_NAME}", f"{CALIBRATION_DIR}/{TENSORS_NAME}"])
        unfinished()
        say("calibrate: running")
    calib = ledger.run("calibrate", key, lambda: _calibrate_stage(loaded, plan, out, cond, uncond, cache_dir, progress,
                                                                  log, say),
                       force=force)
    result = CalibrationResult.load(out / CALIBRATION_DIR, expected_model_sha256=loaded.sha256)
    release_heap()  # calibration's wrapper, activations and trajectories: freed, but held by the C heap
    say(f"calibrate: {'reused' if calib.reused else 'done'} ({result.method}, {result.num_groups} group(s))")

    # 2. export
    # the stage key keeps the historical name "profiles" for the targets (the rename left its shape alone)
    precision_key = {"high_precision": precision} if precision != "fp32" else {}  # fp32 builds keep their old key
    key = stage_key(stage="export", model=model_id, calibration=calib.outputs, profiles=list(targets),
                    versions=_versions("torch", "diffusers", "onnx", "onnxruntime"), **precision_key)
    exported: dict[str, Any] = {}

    def run_export():
        exp = export_qdq_for(loaded, result, out, target=targets, manifest=False, owned=ledger.owned(),
                             say=lambda msg: say(f"export: {msg}"), high_precision=precision)
        exported["exp"] = exp
        files = [g for gs in exp.graphs.values() for g in gs] + [exp.weights, out / REPORT_NAME]
        if (exp.one_session or {}).get("status") == "ok":
            files += [out / exp.one_session[k] for k in ("graph", "weights", "constants")]
        return files

    if force or ledger.current("export", key) is None:
        ledger.claim("export", [graph_name(k, p) for p in targets for k in range(int(result.num_groups))]
                     + [WEIGHTS_NAME, REPORT_NAME] + list(SHARED_SESSION_FILES))
        unfinished()
    exp_rec = ledger.run("export", key, run_export, force=force)
    release_heap()
    report = read_report(out / REPORT_NAME)
    say(f"export: {'reused' if exp_rec.reused else 'done'} ({len(exp_rec.outputs)} files)")

    # the ONNX manifest: needed by the engine stage, and the final manifest of an ort build
    if "exp" in exported or not manifest_path.is_file():
        if "exp" not in exported:  # export reused but the manifest is gone: rebuild its description
            exported["exp"] = _export_from_report(out, report)
        write_qdq_manifest(exported["exp"], loaded, result)
    stages = [calib, exp_rec]

    # 3. engines
    if chosen == "trt":
        from engines.build import build_trt_engines
        from engines.platform import gpu_identity, require_tensorrt

        trt_version = require_tensorrt().__version__
        onnx_manifest = load_manifest(out)
        key = stage_key(stage="engines", model=model_id, graphs=exp_rec.outputs, batch_sizes=sorted(batch_sizes),
                        resolution=resolution, opt_level=opt_level, gpu=gpu_identity(), trt=trt_version,
                        versions=_versions())
        rec = ledger.current("engines", key)
        if force or rec is None or onnx_manifest.backend != "trt":
            ledger.claim("engines", [ENGINE_NAME.format(k=g.id) for g in onnx_manifest.groups] + [TIMING_CACHE_NAME])
            t0 = time.perf_counter()
            m = build_trt_engines(out, onnx_manifest, batch_sizes=batch_sizes, resolution=resolution,
                                  opt_level=opt_level, on_group=lambda k, n, s: say(f"engines: group {k + 1}/{n} {s:.1f} s"))
            engine_files = [out / g.engine for g in m.groups if g.engine]
            rec = ledger.record("engines", key, engine_files, time.perf_counter() - t0)
        else:
            rec.reused = True
        stages.append(rec)
    manifest = load_manifest(out)
    return BuildSummary(out=out, backend=manifest.backend, manifest=manifest, stages=stages,
                        export_report=report, seconds=time.perf_counter() - t_start)


def _export_from_report(out: Path, report: dict[str, Any]):
    """The QdqExport description of graphs already on disk (export stage reused)."""
    from adpdm_export.qdq_export import QdqExport

    return QdqExport(
        out_dir=out, weights=out / report["weights_file"], targets=tuple(report["targets"]),
        num_groups=int(report["num_groups"]), opset=int(report["opset"]), w_bits=int(report["w_bits"]),
        a_bits=int(report["a_bits"]), graphs={p: [out / g for g in gs] for p, gs in report["graphs"].items()},
        timestep_ranges=report["timestep_ranges"], activation_scales={}, folded_weights=int(report["folded_weights"]),
        deduped_qdq=int(report["deduped_qdq_pairs"]), one_session=report.get("one_session"),
        graph_precision=dict(report.get("graph_precision") or {}),
    )
