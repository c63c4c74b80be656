"""`adpdm export-triton`: a build folder as a standard Triton model repository (NGC Triton container).

Layout written (G = number of timestep groups)::

    REPO/
      unet_g0/ config.pbtxt  1/model.plan        # platform tensorrt_plan, KIND_GPU (default)
      ...                                         # or 1/model.onnx + weights (--platform onnxruntime)
      unet_g{G-1}/ ...
      generate/ config.pbtxt  1/model.py  1/adpdm_generate.json
                                                  # Python backend: the sampling loop, each step
                                                  # sent to unet_g{k} by timestep (BLS)
                1/pipeline/                       # text builds: tokenizer/, text_encoder/ (SDXL also
                                                  # tokenizer_2/, text_encoder_2/), vae/ and
                                                  # model_index.json copied from the pipeline folder

Every config.pbtxt is parsed back with Triton's own `ModelConfig` protobuf (shipped in
tritonclient as `tritonclient.grpc.model_config_pb2`) and checked (name = folder,
platform/backend, inputs/outputs, batch sizes) before the repository is renamed into place.

The repository carries a marker file, `.adpdm-triton-repository` (Triton ignores files at
the repository's top level): `--overwrite` replaces an existing `--out` only when it holds
that marker (or is empty), and never the source build or a folder that holds it.

The `generate` model's model.py needs `torch`, `diffusers` and this package's `engines`
(for the very same sampling loop as `adpdm serve`) in the container's Python, and `transformers`
for a text build (prompts are encoded, guided and decoded in the model, as `adpdm serve` does);
see docs/serving.md for the image.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from engines.conditioning import ADDED_COND_INPUTS
from engines.errors import AdpdmError
from engines.file_io import check_output_folder
from engines.group_backend import ORT_TARGET_ORDER
from engines.json_files import JsonFields, read_json
from engines.manifest import load_manifest
from engines.manifest_schema import Manifest

PLATFORMS = ("tensorrt", "onnxruntime")
GENERATE_MODEL = "generate"
GROUP_MODEL = "unet_g{k}"
GENERATE_CONFIG = "adpdm_generate.json"
REPOSITORY_MARKER = ".adpdm-triton-repository"
MARKER_FORMAT = "adpdm-triton-repository"
_ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32", 3: "TYPE_INT8",
                   2: "TYPE_UINT8", 9: "TYPE_BOOL", 16: "TYPE_BF16"}


@dataclass(frozen=True)
class IOSpec:
    name: str
    data_type: str  # TYPE_FP32 ...
    dims: tuple[int, ...]  # without the batch dimension; -1 = variable


def _pb_io(kind: str, specs: Sequence[IOSpec], optional: Sequence[str] = ()) -> str:
    out = []
    for s in specs:
        lines = [f'    name: "{s.name}"', f"    data_type: {s.data_type}"]
        if s.dims:
            lines.append(f"    dims: [ {', '.join(str(d) for d in s.dims)} ]")
        else:  # a (batch,) tensor: Triton wants dims [1] reshaped to [] for the model
            lines.append("    dims: [ 1 ]")
            lines.append("    reshape: { shape: [ ] }")
        if s.name in optional:
            lines.append("    optional: true")
        out.append("  {\n" + "\n".join(lines) + "\n  }")
    return f"{kind} [\n" + ",\n".join(out) + "\n]\n"


def group_model_config(
    name: str,
    inputs: Sequence[IOSpec],
    outputs: Sequence[IOSpec],
    max_batch_size: int,
    platform: str = "tensorrt",
    cuda_graphs: bool = False,
    instances: int = 1,
    max_queue_delay_us: int = 1000,
) -> str:
    """config.pbtxt of one group's UNet model (tensorrt_plan on the GPU, or onnxruntime_onnx on the CPU)."""
    if platform not in PLATFORMS:
        raise AdpdmError(f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    trt = platform == "tensorrt"
    text = f'name: "{name}"\n'
    text += f'platform: "{"tensorrt_plan" if trt else "onnxruntime_onnx"}"\n'
    text += f"max_batch_size: {int(max_batch_size)}\n"
    text += _pb_io("input", inputs) + _pb_io("output", outputs)
    text += f"instance_group [ {{ kind: {'KIND_GPU' if trt else 'KIND_CPU'} count: {int(instances)} }} ]\n"
    if max_batch_size > 0:
        text += f"dynamic_batching {{ max_queue_delay_microseconds: {int(max_queue_delay_us)} }}\n"
    if trt and cuda_graphs:
        text += "optimization { cuda { graphs: true } }\n"
    return text


PROMPT_INPUTS = (IOSpec("prompt", "TYPE_STRING", (1,)), IOSpec("negative_prompt", "TYPE_STRING", (1,)),
                 IOSpec("guidance_scale", "TYPE_FP64", (1,)))


def generate_model_config(cond_inputs: Sequence[IOSpec], sample_dims: Sequence[int], instances: int = 1,
                          kind: str = "KIND_CPU", prompts: bool = False) -> str:
    """config.pbtxt of the Python-backend `generate` model (not batched: n is an input).
    prompts: a text build's model (inputs prompt, negative_prompt, guidance_scale; output notes;
    `sample_dims` then the VAE's image dims)."""
    ins = [IOSpec("seed", "TYPE_INT64", (1,)), IOSpec("n", "TYPE_INT64", (1,)), IOSpec("steps", "TYPE_INT64", (1,)),
           IOSpec("scheduler", "TYPE_STRING", (1,)), *cond_inputs, *(PROMPT_INPUTS if prompts else ())]
    outs = [IOSpec("images", "TYPE_FP32", (-1, *sample_dims))]
    if prompts:
        outs.append(IOSpec("notes", "TYPE_STRING", (1,)))
    optional = ["scheduler", *[c.name for c in cond_inputs], *([p.name for p in PROMPT_INPUTS] if prompts else [])]
    text = f'name: "{GENERATE_MODEL}"\nbackend: "python"\nmax_batch_size: 0\n'
    text += _pb_io("input", ins, optional=optional) + _pb_io("output", outs)
    # The sampling loop itself is light (the UNet runs in the group models): CPU instances suffice.
    text += f"instance_group [ {{ kind: {kind} count: {int(instances)} }} ]\n"
    return text


# --------------------------------------------------------------------------- validation


def parse_config(text: str):
    """Parse config.pbtxt text with Triton's ModelConfig protobuf (needs tritonclient[grpc])."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise AdpdmError(f"validating config.pbtxt needs tritonclient[grpc] ({e}): pip install 'tritonclient[grpc]'") from None
    cfg = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise AdpdmError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
    return cfg


def validate_config(text: str, folder_name: str) -> Any:
    """Parse and check one config.pbtxt; returns the ModelConfig message."""
    cfg = parse_config(text)
    where = f"{folder_name}/config.pbtxt"
    if cfg.name != folder_name:
        raise AdpdmError(f"{where}: name {cfg.name!r} is not the folder name")
    if cfg.platform not in ("tensorrt_plan", "onnxruntime_onnx") and cfg.backend != "python":
        raise AdpdmError(f"{where}: unexpected platform/backend {cfg.platform or cfg.backend!r}")
    if not cfg.input or not cfg.output:
        raise AdpdmError(f"{where}: no inputs or no outputs")
    if cfg.max_batch_size < 0:
        raise AdpdmError(f"{where}: max_batch_size must be >= 0")
    names = [t.name for t in (*cfg.input, *cfg.output)]
    if len(set(names)) != len(names):
        raise AdpdmError(f"{where}: duplicate tensor names {names}")
    for t in (*cfg.input, *cfg.output):
        if not t.dims or any(d < -1 or d == 0 for d in t.dims):
            raise AdpdmError(f"{where}: tensor {t.name!r} has bad dims {list(t.dims)}")
    if cfg.platform == "tensorrt_plan" and not any(g.kind == g.KIND_GPU for g in cfg.instance_group):
        raise AdpdmError(f"{where}: a tensorrt_plan model needs a KIND_GPU instance group")
    return cfg


def validate_repository(repo: str | os.PathLike) -> dict[str, Any]:
    """Parse and check every model's config.pbtxt in a repository; {model name: ModelConfig}."""
    repo = Path(repo)
    out = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        cfg_path = d / "config.pbtxt"
        if not cfg_path.is_file():
            raise AdpdmError(f"{d.name}: no config.pbtxt")
        cfg = validate_config(cfg_path.read_text(), d.name)
        if not any(v.is_dir() and v.name.isdigit() for v in d.iterdir()):
            raise AdpdmError(f"{d.name}: no version folder (1/)")
        out[d.name] = cfg
    if GENERATE_MODEL in out:
        here = repo / GENERATE_MODEL / "1"
        meta = JsonFields(read_json(here / GENERATE_CONFIG, "generate model config"), GENERATE_CONFIG)
        missing = [m for m in meta.get("group_models", list) if m not in out]
        if missing:
            raise AdpdmError(f"generate dispatches to {missing}, which the repository lacks")
        names = {t.name for t in out[GENERATE_MODEL].input}
        lacking = [c for c in meta.get("conditioning", dict) if c not in names]
        if lacking:
            raise AdpdmError(f"generate's config.pbtxt lacks the build's conditioning input(s) {lacking}")
        for model in meta.get("group_models", list):
            lacking = [c for c in meta.get("conditioning", dict) if c not in {t.name for t in out[model].input}]
            if lacking:
                raise AdpdmError(f"{model}'s config.pbtxt lacks the build's conditioning input(s) {lacking}")
        text = meta.get("text_pipeline", dict, optional=True)
        if text is not None:
            from engines.text_pipeline import check_text_pipeline_folder

            folder = JsonFields(text, "text_pipeline", f"{GENERATE_CONFIG}: ").get("folder", str)
            if Path(folder).is_absolute() or ".." in Path(folder).parts:
                raise AdpdmError(f"{GENERATE_CONFIG}: text_pipeline.folder must be a relative path inside generate/1/")
            # tokenizer(s), text encoder(s) (widths; SDXL: both), VAE: present, safetensors only
            check_text_pipeline_folder(here / folder, meta.get("conditioning", dict))
            names = {t.name for t in out[GENERATE_MODEL].input}
            if not {"prompt", "negative_prompt", "guidance_scale"} <= names:
                raise AdpdmError("generate has a text pipeline but its config.pbtxt takes no prompt")
    return out


# --------------------------------------------------------------------------- the writer


def _graph_io(path: Path) -> tuple[list[IOSpec], list[IOSpec]]:
    """Inputs and outputs of an ONNX group graph, batch dimension dropped, named dims -> -1."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    init = {i.name for i in g.initializer}

    def spec(v) -> IOSpec:
        tt = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim][1:]
        try:
            dt = _ONNX_TO_TRITON[tt.elem_type]
        except KeyError:
            raise AdpdmError(f"{path.name}: tensor {v.name!r} has an ONNX type Triton's config cannot name ({tt.elem_type})") from None
        return IOSpec(v.name, dt, tuple(dims))

    return [spec(v) for v in g.input if v.name not in init], [spec(v) for v in g.output]


def _trt_dims(spec: IOSpec, m: Manifest) -> IOSpec:
    """Fixed dims where the TensorRT optimization profile pins them (a fixed resolution / sequence length)."""
    p = m.tensorrt.optimization_profile  # type: ignore[union-attr]
    if spec.name == "sample" or spec.name == "out_sample":
        C = spec.dims[0]
        H = p.height[0] if p.height[0] == p.height[2] else -1
        W = p.width[0] if p.width[0] == p.width[2] else -1
        return IOSpec(spec.name, spec.data_type, (C, H, W))
    if spec.name == "encoder_hidden_states" and p.sequence_length:
        return IOSpec(spec.name, spec.data_type, (int(p.sequence_length), spec.dims[-1]))
    return spec


def text_pipeline_for(m: Manifest, pipeline: Any = "auto") -> tuple[Optional[Path], Optional[dict]]:
    """(the pipeline folder whose text parts the generate model gets, its VAE config), or (None, None).

    "auto": the build's own pipeline (the manifest's absolute model source) where the build is of a
    text pipeline and the folder is here; a folder: that one (one line where it does not fit)."""
    from engines.text_pipeline import TEXT_INPUT, check_text_pipeline_folder, is_pipeline_folder, pipeline_of_build

    if pipeline is None or pipeline is False:
        return None, None
    if isinstance(pipeline, str) and pipeline == "auto":
        if TEXT_INPUT not in m.model.conditioning:
            return None, None
        try:
            folder = pipeline_of_build(m)
        except AdpdmError:
            return None, None
    else:
        folder = Path(pipeline)
        if TEXT_INPUT not in m.model.conditioning:
            raise AdpdmError("--pipeline applies to builds of a text-to-image pipeline; this build's UNet takes no text")
        if not is_pipeline_folder(folder):
            raise AdpdmError(f"--pipeline {folder} is not a text-to-image pipeline folder (no model_index.json)")
    return folder, check_text_pipeline_folder(folder, m.model.conditioning) or None


def is_our_repository(folder: str | os.PathLike) -> bool:
    """A folder this tool wrote: it holds our marker file (a JSON object with format "adpdm-triton-repository")."""
    marker = Path(folder) / REPOSITORY_MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("format") == MARKER_FORMAT


def check_out(out: Path, build_root: Path, overwrite: bool) -> None:
    """May the repository be written at `out`? Raises AdpdmError (one line) where it may not.

    Never the build folder or one that holds it; a missing folder is fine; an existing one
    only with --overwrite, and only when empty or one of our repositories (`is_our_repository`).
    """
    out_r, build_r = out.resolve(), build_root.resolve()
    if out_r == build_r or build_r.is_relative_to(out_r):
        raise AdpdmError(f"--out {out} is the build folder or holds it: choose a new folder for the repository")
    if not out.exists() and not out.is_symlink():
        check_output_folder(out)  # below a file or unwritable: one line now, not an OSError later
        return
    if out.is_symlink() or not out.is_dir():
        raise AdpdmError(f"--out {out} exists and is not a folder (or is a symbolic link): choose a new folder")
    ours = is_our_repository(out)
    if not ours and any(out.iterdir()):
        raise AdpdmError(f"--out {out} exists and is not a model repository written by export-triton "
                         f"(no {REPOSITORY_MARKER}): choose a new folder; --overwrite replaces only those")
    if not overwrite:
        raise AdpdmError(f"{out} exists: pass --overwrite to replace it")


def write_repository(
    build: str | os.PathLike | Manifest,
    out: str | os.PathLike,
    platform: str = "tensorrt",
    max_batch: Optional[int] = None,
    cuda_graphs: bool = False,
    instances: int = 1,
    generate_instances: int = 1,
    limits: Optional[Mapping[str, int]] = None,
    overwrite: bool = False,
    verify: bool | str = True,
    pipeline: Any = "auto",
) -> Path:
    """Write a Triton model repository for `build` at `out` (atomically: temp folder, then rename).

    platform: "tensorrt" (one tensorrt_plan model per group engine; the build must have engines)
        or "onnxruntime" (the build's ORT-target group graphs as onnxruntime_onnx models, CPU).
    max_batch: the group models' max_batch_size (default: the TensorRT optimization profile's largest batch, or 16).
    limits: bounds the generate model enforces (max_n, max_steps); defaults as `adpdm serve`.
    overwrite: replace an existing `out` (only an empty folder or one of our repositories: `check_out`).
    pipeline: a text build's pipeline folder, whose tokenizer, text encoder and VAE are copied into
        generate/1/pipeline/ so that `generate` takes prompts: "auto" (the manifest's model source
        where it is a pipeline folder here; else no prompts), a folder, or None (no prompts).
    """
    if platform not in PLATFORMS:
        raise AdpdmError(f"unknown platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    m = build if isinstance(build, Manifest) else load_manifest(build, verify=verify)
    if m.root is None:
        raise AdpdmError("export-triton needs a manifest loaded from its build folder")
    out = Path(out)
    if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
        raise AdpdmError(f"--max-batch must be >= 1, got {max_batch}")
    check_out(out, m.root, overwrite)
    if platform == "tensorrt":
        if m.backend != "trt" or m.tensorrt is None or any(g.engine is None for g in m.groups):
            raise AdpdmError(
                "this build has no TensorRT engines: run `adpdm build-engine --backend trt` on a GPU machine first, "
                "or export with --platform onnxruntime (CPU)"
            )
        graph_target = m.tensorrt.graph_target
        top = m.tensorrt.optimization_profile.batch[2]
        if max_batch is not None and max_batch > top:
            raise AdpdmError(f"--max-batch {max_batch} is above the engines' largest batch ({top})")
        mb = int(top if max_batch is None else max_batch)
    else:
        graph_target = next((p for p in ORT_TARGET_ORDER if p in m.targets()), None)
        if graph_target is None:
            raise AdpdmError(f"the build has no ONNX group graphs (targets: {m.targets()})")
        mb = int(16 if max_batch is None else max_batch)
    if mb < 1:
        raise AdpdmError(f"--max-batch must be >= 1, got {mb}")
    inputs, outputs = _graph_io(m.graph_paths(graph_target)[0])
    if platform == "tensorrt":
        inputs = [_trt_dims(s, m) for s in inputs]
        outputs = [_trt_dims(s, m) for s in outputs]
    C, H, W = m.model.in_channels, *m.model.sample_size
    text_folder, vae_config = text_pipeline_for(m, pipeline)
    image_dims = (C, H, W)
    if text_folder is not None and vae_config is not None:
        from engines.text_pipeline import image_shape

        image_dims = image_shape(vae_config, (C, H, W))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        names = []
        for g in m.groups:
            name = GROUP_MODEL.format(k=g.id)
            names.append(name)
            vdir = tmp / name / "1"
            vdir.mkdir(parents=True)
            if platform == "tensorrt":
                shutil.copyfile(m.path(g.engine), vdir / "model.plan")  # type: ignore[arg-type]
            else:
                shutil.copyfile(m.path(g.graphs[graph_target]), vdir / "model.onnx")
                weights = m.weights.get(graph_target)
                if weights:  # external data is resolved relative to model.onnx
                    dst = vdir / weights
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(m.path(weights), dst)
            text = group_model_config(name, inputs, outputs, mb, platform, cuda_graphs, instances)
            validate_config(text, name)
            (tmp / name / "config.pbtxt").write_text(text)

        cond = [s for s in inputs if s.name not in ("sample", "timestep")]
        gen_cond = []
        for s in cond:
            if s.name == "class_labels":
                gen_cond.append(IOSpec("class_labels", "TYPE_INT64", (-1,)))
            elif s.name in ADDED_COND_INPUTS:  # SDXL: text_embeds (1 or n, P), time_ids (1 or n, 6)
                gen_cond.append(IOSpec(s.name, s.data_type, (-1, s.dims[-1])))
            else:
                gen_cond.append(IOSpec(s.name, s.data_type, (-1, -1, s.dims[-1])))
        gdir = tmp / GENERATE_MODEL / "1"
        gdir.mkdir(parents=True)
        text = generate_model_config(gen_cond, image_dims, generate_instances, prompts=text_folder is not None)
        validate_config(text, GENERATE_MODEL)
        (tmp / GENERATE_MODEL / "config.pbtxt").write_text(text)
        template = resources.files("engines").joinpath("triton_templates/generate_model.py").read_text()
        (gdir / "model.py").write_text(template)
        lim = {"max_n": 16, "max_steps": 250, **dict(limits or {})}
        timestep_dtype = next(s.data_type for s in inputs if s.name == "timestep")
        meta = {
            "format": "adpdm-triton-generate",
            "format_version": 1,
            "group_models": names,
            "max_batch": mb,
            "timestep_to_group": list(m.timestep_to_group),
            "scheduler": dict(m.scheduler),
            "sample_shape": [C, H, W],
            "conditioning": dict(m.model.conditioning),
            "timestep_dtype": timestep_dtype,
            "limits": lim,
        }
        if text_folder is not None:
            from engines.text_pipeline import copy_text_parts

            copy_text_parts(text_folder, gdir / "pipeline")
            meta["text_pipeline"] = {"folder": "pipeline", "copied_from": str(text_folder),
                                     "image_shape": list(image_dims)}
        (gdir / GENERATE_CONFIG).write_text(json.dumps(meta, indent=1))
        (tmp / REPOSITORY_MARKER).write_text(json.dumps(
            {"format": MARKER_FORMAT, "format_version": 1, "build": str(m.root), "platform": platform}) + "\n")
        validate_repository(tmp)
        if out.exists():
            check_out(out, m.root, overwrite)  # again, just before replacing it
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, old)  # out -> old, then tmp -> out: never a moment without one of them
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
