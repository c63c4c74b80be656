"""Turn an ONNX build folder into a TensorRT build: engines per group, then the manifest rewritten last.

`build_trt_engines` is the engine stage of `adpdm build-engine` (the orchestration in
adpdm_export calls it after the QDQ export wrote the graphs and an "ort" manifest).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Sequence

from engines.errors import AdpdmError
from engines.manifest import load_manifest, write_manifest
from engines.manifest_schema import (
    TIMING_CACHE_NAME,
    Manifest,
    TensorrtInfo,
    TrtOptimizationProfile,
    with_tensorrt,
    without_tensorrt,
)
from engines.platform import require_tensorrt
from engines.trt_builder import DEFAULT_OPT_LEVEL, build_group_engines


def make_optimization_profile(
    batch_sizes: Sequence[int],
    resolution: Sequence[int] | int | None,
    manifest: Manifest,
    sequence_length: Optional[int] = None,
) -> TrtOptimizationProfile:
    """One TensorRT optimization profile covering `batch_sizes` (opt = the largest) at one resolution.

    resolution: (H, W), an int for square, or None for the model's sample size. A range
    ((Hmin, Hmax), (Wmin, Wmax)) builds a dynamic-resolution optimization profile (opt = the model's size).
    """
    bs = sorted({int(b) for b in batch_sizes})
    if not bs or bs[0] < 1:
        raise AdpdmError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    H0, W0 = manifest.model.sample_size
    if resolution is None:
        resolution = (H0, W0)
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    h, w = resolution
    height = (h[0], min(max(H0, h[0]), h[1]), h[1]) if isinstance(h, (tuple, list)) else (int(h),) * 3
    width = (w[0], min(max(W0, w[0]), w[1]), w[1]) if isinstance(w, (tuple, list)) else (int(w),) * 3
    if min(height + width) < 1:
        raise AdpdmError(f"resolution must be positive, got {resolution}")
    ehs = manifest.model.conditioning.get("encoder_hidden_states")
    seq = sequence_length or (ehs or {}).get("sequence_length") or (77 if ehs else None)
    return TrtOptimizationProfile(batch=(bs[0], bs[-1], bs[-1]), height=height, width=width, sequence_length=seq)  # type: ignore[arg-type]


def build_trt_engines(
    build_dir: str | os.PathLike,
    manifest: Optional[Manifest] = None,
    batch_sizes: Sequence[int] = (1,),
    resolution: Sequence[int] | int | None = None,
    opt_level: int = DEFAULT_OPT_LEVEL,
    *,
    graph_target: str = "trt",
    sequence_length: Optional[int] = None,
    timing_cache: Optional[str] = TIMING_CACHE_NAME,
    workspace_bytes: Optional[int] = None,
    on_group: Optional[Callable[[int, int, float], None]] = None,
    write: bool = True,
) -> Manifest:
    """Build one TensorRT engine per group graph of `build_dir` and return (and write) its "trt" manifest.

    While engines are being (re)built the folder keeps a valid "ort" manifest (a previous
    "trt" manifest is first rewritten without its engines), so an interrupted or failed
    build leaves a folder that still loads with onnxruntime; the "trt" manifest is written
    last (write=True).
    """
    require_tensorrt()  # before touching anything: one clear line where TensorRT or a GPU is missing
    root = Path(build_dir)
    m = manifest if manifest is not None else load_manifest(root)
    if m.root is not None and m.root != root.resolve():
        raise AdpdmError(f"the manifest was loaded from {m.root}, not {root}")
    graphs = m.graph_paths(graph_target) if m.root is not None else [root / g.graphs[graph_target] for g in m.groups]
    optimization_profile = make_optimization_profile(batch_sizes, resolution, m, sequence_length)
    if write and m.backend == "trt":
        write_manifest(root, without_tensorrt(m))
    result = build_group_engines(
        graphs,
        root,
        optimization_profile,
        channels=m.model.in_channels,
        conditioning=m.model.conditioning,
        opt_level=opt_level,
        timing_cache=timing_cache,
        workspace_bytes=workspace_bytes,
        on_group=on_group,
    )
    info = TensorrtInfo(
        tensorrt_version=result.tensorrt_version,
        gpu_name=result.gpu_name,
        compute_capability=result.compute_capability,
        optimization_profile=optimization_profile,
        batch_sizes=sorted({int(b) for b in batch_sizes}),
        opt_level=int(opt_level),
        graph_target=graph_target,
        timing_cache=result.timing_cache.name if result.timing_cache else None,
        strongly_typed=True,
    )
    out = with_tensorrt(m, info, [p.relative_to(root).as_posix() for p in result.engines])
    if write:
        write_manifest(root, out)
    return out
