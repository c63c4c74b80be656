"""TensorRT engines from the group graphs: strongly typed, one optimization profile, one shared timing cache.

For explicit quantization (Q/DQ in the graph) NVIDIA's advice is a *strongly typed*
network (`NetworkDefinitionCreationFlag.STRONGLY_TYPED`): every tensor keeps the type
the ONNX graph gives it and the Q/DQ nodes decide where INT8 runs; no --int8/--fp16
builder flags (those are for implicit quantization and weakly typed networks).

One builder and ONE timing cache serve every group build: the group graphs differ only
in activation scales, so after group 0 the tactic timings of the others are cache hits
(TensorRT: a timing cache "can be shared across builder instances"). The cache is
written next to the engines (`timing.cache`) and reused by later builds on the same
GPU and TensorRT version.

Written against the TensorRT 10 Python API (tensorrt.Builder / OnnxParser /
IBuilderConfig); imported lazily so this module loads without TensorRT.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from engines.errors import AdpdmError
from engines.trt_shared_scales import GROUP_SCALES_INPUT
from engines.file_io import atomic_write_bytes
from engines.manifest_schema import ENGINE_NAME, TIMING_CACHE_NAME, TrtOptimizationProfile
from engines.platform import gpu_identity, require_tensorrt

DEFAULT_OPT_LEVEL = 3  # TensorRT's default; 5 searches longest


@dataclass
class TrtBuildResult:
    engines: list[Path]
    timing_cache: Optional[Path]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    seconds: list[float] = field(default_factory=list)


def optimization_profile_shapes(
    input_names: Sequence[str],
    channels: int,
    optimization_profile: TrtOptimizationProfile,
    conditioning: Mapping[str, Mapping[str, Any]],
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape per network input for one optimization profile."""
    op = optimization_profile
    b, h, w = op.batch, op.height, op.width
    shapes = {}
    for name in input_names:
        if name == "sample":
            shapes[name] = tuple((b[i], channels, h[i], w[i]) for i in range(3))
        elif name in ("timestep", "class_labels"):
            shapes[name] = tuple((b[i],) for i in range(3))
        elif name == "encoder_hidden_states":
            spec = conditioning.get(name) or {}
            if "dim" not in spec:
                raise AdpdmError("encoder_hidden_states needs its dim in the manifest to build a TensorRT optimization profile")
            seq = op.sequence_length or spec.get("sequence_length")
            if not seq:
                raise AdpdmError("encoder_hidden_states needs a sequence length to build a TensorRT optimization profile")
            shapes[name] = tuple((b[i], int(seq), int(spec["dim"])) for i in range(3))
        elif name in ("text_embeds", "time_ids"):  # SDXL added conditions: (batch, width)
            spec = conditioning.get(name) or {}
            if "dim" not in spec:
                raise AdpdmError(f"{name} needs its dim in the manifest to build a TensorRT optimization profile")
            shapes[name] = tuple((b[i], int(spec["dim"])) for i in range(3))
        elif name == GROUP_SCALES_INPUT:
            continue  # the shared-scale engine's per-group scales: a static shape, no profile entry
        else:
            raise AdpdmError(f"the graph has an input {name!r} this builder does not know")
    return shapes  # type: ignore[return-value]


def _parse(trt, builder, logger, graph: Path):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves the external weights file relative to the graph
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "unknown error"
        raise AdpdmError(f"TensorRT could not parse {graph.name}: {errors}")
    return network, parser


def build_shared_scale_engine(
    graphs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    optimization_profile: TrtOptimizationProfile,
    channels: int,
    conditioning: Mapping[str, Mapping[str, Any]] | None = None,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache: Optional[str] = TIMING_CACHE_NAME,
    workspace_bytes: Optional[int] = None,
    verbose: bool = False,
) -> TrtBuildResult:
    """ONE engine for all groups (`unet.shared.plan`, issue 16): the TensorRT-target group graphs rewritten to
    unit-scale Q/DQ with the per-group activation scales as the runtime input `adpdm_group_scales`
    (engines/trt_shared_scales.py, design in docs/runtime.md), so the weights are on the GPU once.
    `graphs` are the group graphs in group order, in `out_dir` (the shared graph references their weights
    file); writes `unet.shared.trt.onnx`, `unet.shared.trt.scales.npz` and the engine. Same builder settings
    as `build_group_engines` (strongly typed, one optimization profile, the shared timing cache)."""
    from engines.trt_shared_scales import SHARED_ENGINE_NAME, shared_scale_graph

    files = shared_scale_graph(graphs, out_dir)
    res = build_group_engines([files.graph], out_dir, optimization_profile, channels, conditioning, opt_level,
                              timing_cache, workspace_bytes, verbose=verbose, engine_names=[SHARED_ENGINE_NAME])
    return res


def build_group_engines(
    graphs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    optimization_profile: TrtOptimizationProfile,
    channels: int,
    conditioning: Mapping[str, Mapping[str, Any]] | None = None,
    opt_level: int = DEFAULT_OPT_LEVEL,
    timing_cache: Optional[str] = TIMING_CACHE_NAME,
    workspace_bytes: Optional[int] = None,
    on_group: Optional[Callable[[int, int, float], None]] = None,
    verbose: bool = False,
    engine_names: Optional[Sequence[str]] = None,
) -> TrtBuildResult:
    """Build `unet.g{k}.plan` in `out_dir` for every group graph; returns engines + platform facts.

    Each engine file is written atomically. `timing_cache` (a name in `out_dir`, or None)
    is loaded if present, shared by all builds and saved at the end.
    `on_group(k, G, seconds)` reports progress.
    """
    trt = require_tensorrt()
    if not 0 <= int(opt_level) <= 5:
        raise AdpdmError(f"builder optimization level must be 0..5, got {opt_level}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = out / timing_cache if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = None
    engines: list[Path] = []
    seconds: list[float] = []
    for k, graph in enumerate(Path(g) for g in graphs):
        t0 = time.perf_counter()
        network, _parser = _parse(trt, builder, logger, graph)
        config = builder.create_builder_config()
        config.builder_optimization_level = int(opt_level)
        if workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if cache_path is not None:
            if cache is None:
                cache = config.create_timing_cache(cache_bytes)
            if not config.set_timing_cache(cache, False):
                # a cache from another TensorRT version or GPU: start a fresh one
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, False)
        names = [network.get_input(i).name for i in range(network.num_inputs)]
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in optimization_profile_shapes(names, channels, optimization_profile, conditioning or {}).items():
            opt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise AdpdmError(
                f"TensorRT could not build an engine from {graph.name} (see the TensorRT log above); "
                "check the graph with `adpdm lint`"
            )
        path = out / (engine_names[k] if engine_names else ENGINE_NAME.format(k=k))
        atomic_write_bytes(path, bytes(memoryview(serialized)))
        engines.append(path)
        seconds.append(time.perf_counter() - t0)
        if on_group is not None:
            on_group(k, len(graphs), seconds[-1])
        del network, config, serialized
    if cache_path is not None and cache is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(cache.serialize())))
    name, cc = gpu_identity()
    return TrtBuildResult(
        engines=engines,
        timing_cache=cache_path if cache is not None else None,
        tensorrt_version=str(trt.__version__),
        gpu_name=name,
        compute_capability=cc,
        seconds=seconds,
    )
