"""The benchmarked models and their variants: loading (the bundled reference model, or a layout with
random weights), our build, the peers' QDQ graphs, onnxruntime sessions, and the same inputs for
every variant. Used by the latency, dispatch and RSS parts."""

from __future__ import annotations

import copy
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from tools.measure_ort_rss import DDPM_CIFAR10

from .common import log, reason

PEERS = (("ort_static", "ort-static-qdq"), ("modelopt_int8", "modelopt-qdq"))
VARIANT_LABELS = {
    "pytorch-fp32": "PyTorch eager FP32",
    "ort-fp32": "onnxruntime FP32",
    "ort-static-qdq": "onnxruntime quantize_static QDQ",
    "modelopt-qdq": "ModelOpt QDQ on onnxruntime",
    "ours": "ours: the runner (one onnxruntime session for all groups)",
    "ours-per-group": "ours: the runner with one session per group (ort_options sessions='per-group')",
    "ours-plain-session": "(diag.) our group graph, plain session at onnxruntime defaults",
    "ours-noprepack": "(diag.) ours, runner with pre-packing off",
}
DIAGNOSTIC = ("ours-plain-session", "ours-noprepack")
NOPREPACK = {"session.disable_prepacking": "1"}

LAYOUTS: dict[str, dict[str, Any]] = {
    # google/ddpm-cifar10-32 (35.7M parameters): tools/measure_ort_rss.py's layout
    "ddpm-cifar10": DDPM_CIFAR10,
    # Stable Diffusion 1.5's UNet2DConditionModel config (860M parameters), 32x32 latents (issue 16)
    "sd15": dict(
        conditional=True, sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # SDXL base's UNet2DConditionModel config (2.57B parameters: text_time added conditions, 10-layer
    # transformers in the lowest resolution), 32x32 latents (issue 15)
    "sdxl": dict(
        conditional=True, sample_size=32, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
        layers_per_block=2, transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
    # the same SD-1.5 structure at 1/5 of the width (35M parameters): what fits a 2-core machine's time
    "sd15-w64": dict(
        conditional=True, sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256, 256),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    ),
    # tests/tiny_models.tiny_unet2d: quick-mode calibration timing only
    "tiny": dict(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    ),
}


def load_bench_model(name: str):
    """A `LoadedModel`: "reference" (bundled, trained) or a LAYOUTS entry with random weights (seed 0)."""
    import torch
    from diffusers import UNet2DModel

    from adpdm_export.model_loading import DEFAULT_SCHEDULER_CONFIG, LoadedModel, load_model, unet_conditioning

    if name == "reference":
        return load_model("reference")
    if name not in LAYOUTS:
        raise SystemExit(f"unknown model {name!r}: reference or one of {', '.join(LAYOUTS)}")
    torch.manual_seed(0)
    cfg = dict(LAYOUTS[name])
    conditional = cfg.pop("conditional", False)
    if conditional:
        from diffusers import UNet2DConditionModel

        from engines.conditioning import accept_added_cond_inputs

        unet = accept_added_cond_inputs(UNet2DConditionModel(**cfg).eval())  # SDXL: flat text_embeds / time_ids
        cond = unet_conditioning(type(unet).__name__, dict(unet.config), None)  # any text length; SDXL: + added
    else:
        unet = UNet2DModel(**cfg).eval()
        cond = {}
    unet.requires_grad_(False)
    size = int(cfg["sample_size"])
    return LoadedModel(unet=unet, scheduler_config=dict(DEFAULT_SCHEDULER_CONFIG), source=f"{name} (random weights)",
                       kind=type(unet).__name__, sample_size=(size, size), in_channels=int(cfg["in_channels"]),
                       out_channels=int(cfg["out_channels"]), conditioning=cond)


def params_m(unet) -> float:
    return round(sum(p.numel() for p in unet.parameters()) / 1e6, 2)


# ====================================================================== onnxruntime helpers


def plain_session(path: Path, threads: int, spinning: bool = False, config: Optional[dict] = None):
    """An InferenceSession at onnxruntime's default optimization level ("all") with the benchmark's threads."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def session_feeds(session, x, t) -> dict:
    """numpy feeds for a UNet graph (sample / timestep; other inputs are not used by these models)."""
    import numpy as np

    feeds = {}
    for i in session.get_inputs():
        if i.name == "sample":
            feeds[i.name] = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        elif i.name == "timestep":
            feeds[i.name] = np.ascontiguousarray(t.numpy().astype(np.int64))
        else:
            raise RuntimeError(f"graph input {i.name!r} is not sample/timestep")
    return feeds


# ====================================================================== model setup


class ModelBench:
    """One model's variants: name -> callable(call_index), plus what each needed or why it is missing."""

    def __init__(self, name: str, loaded, work: Path):
        self.name = name
        self.loaded = loaded
        self.work = work
        self.info: dict[str, dict[str, Any]] = {}
        self.runner = None
        self.builds: dict[int, Path] = {}
        self.timesteps: list[int] = []
        self.params_m = params_m(loaded.unet)
        self.traj_s: Optional[float] = None
        self.fp_graph: Optional[Path] = None
        self.fp_session = None
        self.plain = None  # our group-0 graph in a plain session (diagnostic)
        self.runner_noprepack = None  # the runner with pre-packing off (diagnostic)
        self.runner_per_group = None  # the runner with one session per group (the default before issue 16)
        self.peer_sessions: dict[str, Any] = {}

    def ok(self, variant: str, setup_s: float, **extra) -> None:
        self.info[variant] = {"status": "ok", "setup_s": round(setup_s, 2), **extra}

    def missing(self, variant: str, status: str, reason: str, **extra) -> None:
        self.info[variant] = {"status": status, "reason": reason, **extra}
        log(f"{self.name}/{variant}: {status}: {reason}")


def calib_trajectories(loaded, samples: int, steps: int):
    from calibration.trajectories import generate_trajectories

    return generate_trajectories(loaded.unet, loaded.scheduler_config, num_samples=samples, num_steps=steps, seed=0,
                                 cond=loaded.default_condition(samples), cache_dir=None, model_sha=loaded.sha256)


def build_ours(loaded, traj, groups: int, out: Path) -> tuple[Path, dict]:
    """Calibrate (uniform-groups, minmax: scales do not matter for speed) and export the CPU target
    into a build folder with a manifest; returns the folder and facts about the export."""
    from adpdm_export.qdq_export import export_qdq_for
    from calibration.configs import UniformGroupsConfig
    from calibration.pipeline import calibrate

    t0 = time.perf_counter()
    result = calibrate(loaded.unet, loaded.scheduler_config, UniformGroupsConfig(groups=groups, stat="minmax"),
                       data=traj)
    t1 = time.perf_counter()
    exp = export_qdq_for(loaded, result, out, target="ort", check=False, lint=False, fusion=True)
    fusion = exp.fusion.get("ort", {})
    return out, {"groups": groups, "calibrate_s": round(t1 - t0, 2), "export_s": round(time.perf_counter() - t1, 2),
                 "fused": f"{fusion.get('fused_total')}/{fusion.get('total')}" if fusion else None,
                 "weights_mib": round(exp.weights.stat().st_size / 2**20, 2),
                 "timestep_ranges": exp.timestep_ranges}


def peer_graph(module: str, loaded, traj, work: Path) -> tuple[Path, dict]:
    """The peer's deployable QDQ graph (its fastest variant where it says which); raises with the reason."""
    import torch

    from calibration.qconfig import DEFAULT_FP_LAYERS
    from tools.bench_peers import CalibData, Scope, load_peer

    mod = load_peer(module)
    why = mod.unavailable()
    if why:
        raise _Unavailable(why)
    calib = CalibData(traj, batch_size=min(64, traj.num_samples))
    scope = Scope(w_bits=8, a_bits=8, fp_layers=tuple(DEFAULT_FP_LAYERS), conv_in_fp=True)
    unet = copy.deepcopy(loaded.unet)  # peers may rewrite the module in place (ModelOpt does)
    work.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"calib_forward_passes": calib.num_forward_passes}
    with torch.no_grad():
        if hasattr(mod, "fastest_qdq_graph"):
            got = mod.fastest_qdq_graph(unet, calib, scope, work, **_log_kw(mod.fastest_qdq_graph))
            pm = got if hasattr(got, "onnx_path") else None
            path = Path(pm.onnx_path if pm is not None else got)
            extra["peer_variant"] = (pm.extra.get("variant") if pm is not None else None) or "fastest_qdq_graph"
        else:
            variants = list(getattr(mod, "VARIANTS", {}) or [])
            variant = "minmax-wide" if "minmax-wide" in variants else (variants[0] if variants else None)
            pm = mod.quantize(unet, calib, scope, variant, work, **_log_kw(mod.quantize))
            path = pm.onnx_path
            extra["peer_variant"] = variant
    if pm is not None:
        extra["calibration_s"] = round(float(pm.calibration_s), 2)
        extra["notes"] = list(pm.notes)
    if path is None or not Path(path).is_file():
        raise _Unavailable("the peer made no deployable ONNX graph (PeerModel.onnx_path is empty)")
    return Path(path), extra


class _Unavailable(Exception):
    pass


def _log_kw(fn) -> dict:
    """log=... for peer functions that take it (their progress goes to stderr, not into our stdout)."""
    import inspect

    try:
        return {"log": log} if "log" in inspect.signature(fn).parameters else {}
    except (TypeError, ValueError):
        return {}


def setup_model(name: str, args, work: Path, timed: bool = True) -> ModelBench:
    """Load the model, export/quantize every variant (each failure is recorded, the rest goes on).
    timed=False: our build only (a model that only the RSS part uses)."""
    from adpdm_export.onnx_export import example_inputs, export_onnx
    from engines.runner import TimestepDispatchRunner

    loaded = load_bench_model(name)
    mb = ModelBench(name, loaded, work / name)
    mb.work.mkdir(parents=True, exist_ok=True)
    if timed:
        mb.ok("pytorch-fp32", 0.0)
        fp = mb.work / "fp" / "unet.onnx"
        try:
            t0 = time.perf_counter()
            export_onnx(loaded.unet, fp, example_inputs(loaded.sample_shape, loaded.conditioning, batch=2))
            mb.fp_graph = fp
            mb.ok("ort-fp32", time.perf_counter() - t0, graph="FP ONNX (TorchScript exporter, opset 19)")
        except Exception as e:
            log(traceback.format_exc())
            mb.missing("ort-fp32", "failed", reason(e))

    log(f"{name}: calibration trajectories ({args.calib_samples} x {args.calib_steps} steps) for the quantizers")
    t0 = time.perf_counter()
    traj = calib_trajectories(loaded, args.calib_samples, args.calib_steps)
    mb.traj_s = round(time.perf_counter() - t0, 2)

    try:
        t0 = time.perf_counter()
        build, facts = build_ours(loaded, traj, args.groups, mb.work / f"build-g{args.groups}")
        mb.builds[args.groups] = build
        # the timesteps of a DDIM 50-step loop in sampling order: consecutive calls stay in one group and
        # switch groups as often as sampling does (G - 1 times per loop), not on every call
        mb.timesteps = sampling_timesteps(loaded.scheduler_config, 50)
        if timed:
            mb.runner = TimestepDispatchRunner(build, backend="ort", threads=args.threads, target="ort")
        mb.ok("ours", time.perf_counter() - t0, **facts)
    except Exception as e:
        log(traceback.format_exc())
        mb.missing("ours", "failed", reason(e))
    if not timed:
        return mb
    if mb.runner is not None:
        for variant, make in (
            ("ours-plain-session", lambda: plain_session(mb.builds[args.groups] / "unet.g0.ort.onnx", args.threads,
                                                         args.ort_spinning)),
            ("ours-noprepack", lambda: TimestepDispatchRunner(mb.builds[args.groups], backend="ort", threads=args.threads,
                                                              target="ort", verify="size",
                                                              ort_options={"session_config": NOPREPACK,
                                                                           "sessions": "per-group"})),
            ("ours-per-group", lambda: TimestepDispatchRunner(mb.builds[args.groups], backend="ort", threads=args.threads,
                                                              target="ort", verify="size",
                                                              ort_options={"sessions": "per-group"})),
        ):
            if variant not in args.variants:
                continue
            try:
                t0 = time.perf_counter()
                obj = make()
                setattr(mb, {"ours-plain-session": "plain", "ours-noprepack": "runner_noprepack",
                             "ours-per-group": "runner_per_group"}[variant], obj)
                mb.ok(variant, time.perf_counter() - t0, **({"graph": "unet.g0.ort.onnx for every call",
                                                              "optimization": "all (onnxruntime default)"}
                                                             if variant == "ours-plain-session" else
                                                             {"session_config": NOPREPACK}))
            except Exception as e:
                log(traceback.format_exc())
                mb.missing(variant, "failed", reason(e))
    else:
        for variant in DIAGNOSTIC:
            mb.missing(variant, "failed", "ours did not build")
    if not mb.timesteps:
        mb.timesteps = sampling_timesteps(loaded.scheduler_config, 50)

    for module, variant in PEERS:
        if variant not in args.variants:
            continue
        try:
            t0 = time.perf_counter()
            path, extra = peer_graph(module, loaded, traj, mb.work / variant)
            mb.peer_sessions[variant] = plain_session(path, args.threads, args.ort_spinning)
            mb.ok(variant, time.perf_counter() - t0, graph=path.name, **extra)
        except ModuleNotFoundError as e:
            mb.missing(variant, "unavailable", f"peer module tools/bench_peers/{module}.py is missing ({reason(e)})")
        except _Unavailable as e:
            mb.missing(variant, "unavailable", str(e))
        except Exception as e:
            log(traceback.format_exc())
            mb.missing(variant, "failed", reason(e))
    return mb


def sampling_timesteps(scheduler_config, steps: int) -> list[int]:
    from engines.scheduling import make_scheduler

    sched = make_scheduler(scheduler_config, "ddim")
    sched.set_timesteps(steps)
    return [int(t) for t in sched.timesteps]


def make_inputs(mb: ModelBench, batch: int):
    """The same inputs for every variant: one sample batch and the timesteps of a sampling loop, in order."""
    import torch

    C, H, W = mb.loaded.sample_shape
    x = torch.randn((batch, C, H, W), generator=torch.Generator().manual_seed(batch))
    return x, [torch.full((batch,), t, dtype=torch.int64) for t in mb.timesteps]
