"""Generating images from a model or a build folder, through torch or onnxruntime.

The loop itself is `engines.sampler.sample`; this module only picks the noise
predictor (the torch UNet, or an onnxruntime session over its FP graph, exported
once and cached by model hash) and the conditioning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from adpdm_export.model_loading import LoadedModel
from adpdm_export.onnx_export import DEFAULT_OPSET, example_inputs, export_onnx
from engines.errors import AdpdmError
from engines.sampler import check_seed, initial_noise, sample
from engines.scheduling import check_scheduler, make_scheduler

MODEL_BACKENDS = ("torch", "ort")
BUILD_BACKENDS = ("auto", "ort", "trt")


def cache_dir() -> Path:
    """Where derived artifacts (FP graphs, trajectories) are cached: $ADPDM_CACHE_DIR or ~/.cache/adpdm."""
    return Path(os.environ.get("ADPDM_CACHE_DIR", Path.home() / ".cache" / "adpdm"))


def fp_graph_for(model: LoadedModel, opset: int = DEFAULT_OPSET) -> Path:
    """The model's FP ONNX graph, exported on first use and reused while the weights are unchanged."""
    key = f"{model.sha256[:16]}-opset{opset}-torch{torch.__version__.split('+')[0]}"
    graph = cache_dir() / "fp-graphs" / key / "unet.onnx"
    if not (graph.is_file() and graph.with_name("unet.onnx.data").is_file()):
        export_onnx(model.unet, graph, example_inputs(model.sample_shape, model.conditioning), opset=opset)
    return graph


def predictor_for(model: LoadedModel, backend: str, threads: int | None = None):
    from engines.ort_backend import OrtNoisePredictor, make_session
    from engines.torch_predictor import TorchNoisePredictor

    if backend == "torch":
        return TorchNoisePredictor(model.unet)
    if backend == "ort":
        return OrtNoisePredictor(make_session(fp_graph_for(model), threads=threads))
    raise AdpdmError(f"unknown backend {backend!r} for a model; choose one of {', '.join(MODEL_BACKENDS)}")


@dataclass
class Source:
    """What sampling needs from a model or a build folder."""

    predictor: Callable[..., torch.Tensor]
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, int, int]
    conditioning: dict[str, Any]
    description: str


def is_build_folder(path: str | os.PathLike) -> bool:
    from engines.manifest_schema import MANIFEST_NAME

    return Path(path).is_dir() and (Path(path) / MANIFEST_NAME).is_file()


def open_source(model_or_build: str, backend: str = "auto", threads: int | None = None,
                ort_sessions: str = "auto") -> Source:
    """A build folder runs through the timestep-dispatching runner; a model through torch or onnxruntime.

    backend: for a model `torch` (also what `auto` means) or `ort`; for a build `auto`, `ort` or `trt`.
    ort_sessions: for a build on onnxruntime, "auto" (one session for all groups where the build has a
    shared graph), "one" or "per-group" (engines/ort_one_session.py).
    """
    if is_build_folder(model_or_build):
        from engines.runner import TimestepDispatchRunner

        if backend not in BUILD_BACKENDS:
            raise AdpdmError(f"unknown backend {backend!r} for a build folder; choose one of {', '.join(BUILD_BACKENDS)}")
        runner = TimestepDispatchRunner(model_or_build, backend=backend, threads=threads,
                                        ort_options={"sessions": ort_sessions})
        m = runner.manifest
        return Source(runner, dict(m.scheduler), runner.sample_shape, dict(m.model.conditioning),
                      f"build {model_or_build} ({runner.backend}, {m.calibration.method}, {m.num_groups} groups)")
    from adpdm_export.model_loading import load_model

    loaded = load_model(model_or_build)
    backend = "torch" if backend == "auto" else backend
    return Source(predictor_for(loaded, backend, threads), loaded.scheduler_config, loaded.sample_shape,
                  loaded.conditioning, f"{loaded.kind} {model_or_build} ({backend})")


def text_to_image_parts(model_or_build: str):
    """The text encoder and VAE (`engines.text_pipeline.TextPipeline`) of a pipeline folder, or of the
    pipeline a build was made from (its manifest's model source); one AdpdmError line where there are none."""
    from engines.text_pipeline import is_pipeline_folder, load_build_pipeline, load_text_pipeline

    from adpdm_export.model_loading import bundled_folder

    if is_build_folder(model_or_build):
        from engines.manifest import load_manifest

        manifest = load_manifest(model_or_build, verify=False)
        return load_build_pipeline(manifest, bundled_folder(manifest.model.source))  # a bundled model by its name
    folder = bundled_folder(model_or_build) or Path(model_or_build)
    if not is_pipeline_folder(folder):
        raise AdpdmError(f"--prompt needs a text-to-image pipeline folder (tokenizer/, text_encoder/, unet/), "
                         f"not {model_or_build}")
    from adpdm_export.model_loading import unet_conditioning
    from engines.json_files import read_json

    config = read_json(folder / "unet" / "config.json", "UNet config")
    return load_text_pipeline(folder, unet_conditioning(str(config.get("_class_name")), config, folder))


def check_request(n: int, steps: int, seed: int, scheduler: str) -> None:
    """A sampling request's own checks, before any model is loaded (the CLI's and the API's)."""
    check_scheduler(scheduler)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise AdpdmError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise AdpdmError(f"steps must be an integer >= 1, got {steps!r}")
    check_seed(seed)


@dataclass
class Generated:
    images: torch.Tensor
    seed: int
    steps: int
    scheduler: str


def generate(
    predictor: Callable[..., torch.Tensor],
    scheduler_config: dict[str, Any],
    sample_shape: tuple[int, int, int],
    n: int,
    steps: int,
    seed: int,
    cond: Optional[dict[str, torch.Tensor]] = None,
    scheduler: str = "ddim",
    on_step: Optional[Callable[[int, int], None]] = None,
    guidance_scale: float = 1.0,
    uncond: Optional[dict[str, torch.Tensor]] = None,
) -> Generated:
    """`n` images from seeded noise: the same seed gives the same noise on every backend.
    guidance_scale > 1 with `uncond`: classifier-free guidance (engines.sampler.sample)."""
    check_request(n, steps, seed, scheduler)
    sched = make_scheduler(scheduler_config, scheduler)  # the sampler checks steps against its timesteps
    noise = initial_noise(n, sample_shape, seed)
    out = sample(predictor, sched, noise, steps, cond=cond, seed=seed, on_step=on_step, guidance_scale=guidance_scale,
                 uncond=uncond)
    return Generated(images=out.images, seed=seed, steps=steps, scheduler=scheduler)
