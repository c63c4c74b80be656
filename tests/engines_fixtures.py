"""Tiny ONNX UNet build folders for the engines tests (runner, group sessions, manifest, TensorRT).

`make_build(folder, ...)` exports a tiny random diffusers UNet once (FP32, opset 19,
dynamic batch/resolution, weights in ONE external file shared by every group graph) and
writes G "group" graphs that are the same graph plus `out_sample += offsets[k]`, so a
test can tell from the output which group ran. The table `timestep_to_group` is chosen
so that group order, timestep order and batch position all disagree.

The group graphs differ only in one small internal initializer, as the real QDQ group
graphs differ only in their activation scales (docs/design.md).
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from engines.manifest import write_manifest
from engines.manifest_schema import CalibrationSummary, Manifest, ModelInfo, make_groups
from tiny_models import tiny_cond_unet, tiny_unet2d

WEIGHTS = "unet.weights.data"
T = 1000
DDPM_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": T,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": True,
}


def default_table(num_groups: int, T: int = T) -> list[int]:
    """Contiguous intervals whose group ids are NOT in timestep order (G=3: [0,250)->1, [250,600)->2, rest->0)."""
    if num_groups == 1:
        return [0] * T
    if num_groups == 2:
        return [1 if t < 400 else 0 for t in range(T)]
    edges = np.linspace(0, T, num_groups + 1).round().astype(int)
    edges[1] = T // 4 if num_groups == 3 else edges[1]
    edges[2] = 3 * T // 5 if num_groups == 3 else edges[2]
    order = [(i + 1) % num_groups for i in range(num_groups)]  # interval i -> group (i+1) % G
    table = [0] * T
    for i in range(num_groups):
        for t in range(edges[i], edges[i + 1]):
            table[t] = order[i]
    return table


class _ForExport(torch.nn.Module):
    def __init__(self, unet, cond_names):
        super().__init__()
        self.unet, self.cond_names = unet, tuple(cond_names)

    def forward(self, sample, timestep, *cond):
        return self.unet(sample, timestep, **dict(zip(self.cond_names, cond))).sample


def export_base_graph(unet, folder: Path, conditioning: Mapping[str, Mapping[str, Any]], name: str = "base.onnx") -> Path:
    """FP32 graph with I/O as engines.ort_backend documents; weights in `WEIGHTS` (external)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = unet.config
    B = 2
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(B, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        "timestep": torch.tensor([10, 700], dtype=torch.int64),
    }
    if "encoder_hidden_states" in conditioning:
        c = conditioning["encoder_hidden_states"]
        inputs["encoder_hidden_states"] = torch.randn(B, c.get("sequence_length", 4), c["dim"], generator=g)
    if "class_labels" in conditioning:
        inputs["class_labels"] = torch.tensor([1, 3], dtype=torch.int64)
    names = list(inputs)
    axes = {n: {0: "batch"} for n in names}
    axes["sample"] = {0: "batch", 2: "height", 3: "width"}
    if "encoder_hidden_states" in axes:
        axes["encoder_hidden_states"] = {0: "batch", 1: "sequence"}
    axes["out_sample"] = {0: "batch", 2: "height", 3: "width"}
    raw = folder / ".raw.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _ForExport(unet.eval(), names[2:]),
            tuple(inputs.values()),
            str(raw),
            input_names=names,
            output_names=["out_sample"],
            dynamic_axes=axes,
            opset_version=19,
            dynamo=False,
        )
    model = onnx.load(str(raw))
    raw.unlink()
    out = folder / name
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=WEIGHTS, size_threshold=0)
    return out


def make_group_graph(base: Path, out: Path, offset: float) -> Path:
    """`base` + one Add of a scalar initializer on the output; same external weights file."""
    m = onnx.load(str(base), load_external_data=False)
    for node in m.graph.node:
        for i, o in enumerate(node.output):
            if o == "out_sample":
                node.output[i] = "out_sample_pre_offset"
    m.graph.initializer.append(numpy_helper.from_array(np.array(offset, np.float32), "group_offset"))
    m.graph.node.append(helper.make_node("Add", ["out_sample_pre_offset", "group_offset"], ["out_sample"], name="group_offset_add"))
    onnx.save(m, str(out))
    return out


def make_build(
    folder: str | os.PathLike,
    num_groups: int = 3,
    conditioning: Mapping[str, Mapping[str, Any]] | None = None,
    offsets: Sequence[float] | None = None,
    table: Sequence[int] | None = None,
    targets: Sequence[str] = ("ort",),
    unet=None,
    source: str = "tests/tiny",
) -> Manifest:
    """A complete build folder (graphs, weights, manifest.json) for a tiny UNet.
    source: the manifest's model source (a text pipeline folder: serving finds its text encoder there)."""
    folder = Path(folder)
    conditioning = dict(conditioning or {})
    if unet is None:
        if "encoder_hidden_states" in conditioning:
            unet = tiny_cond_unet()
        else:
            unet = tiny_unet2d(num_class_embeds=conditioning.get("class_labels", {}).get("num_classes"))
    offsets = list(offsets if offsets is not None else [10.0 * k for k in range(num_groups)])
    table = list(table if table is not None else default_table(num_groups))
    base = export_base_graph(unet, folder, conditioning)
    graphs: dict[str, list[str]] = {}
    for p in targets:
        suffix = ".onnx" if p == "trt" else f".{p}.onnx"
        graphs[p] = [make_group_graph(base, folder / f"unet.g{k}{suffix}", offsets[k]).name for k in range(num_groups)]
    base.unlink()
    cfg = dict(unet.config)
    s = cfg["sample_size"]
    manifest = Manifest(
        model=ModelInfo(
            source=source,
            sha256="0" * 64,
            type=type(unet).__name__,
            sample_size=(s, s) if isinstance(s, int) else tuple(s),
            in_channels=cfg["in_channels"],
            out_channels=cfg["out_channels"],
            conditioning=conditioning,
            config={k: v for k, v in cfg.items() if not k.startswith("_")},
        ),
        scheduler=dict(DDPM_CONFIG),
        calibration=CalibrationSummary(method="test-offsets", weight_bits=8, act_bits=8, num_groups=num_groups, tau_star=None),
        timestep_to_group=table,
        groups=make_groups(table, graphs),
        weights={p: WEIGHTS for p in targets},
    )
    write_manifest(folder, manifest)
    return manifest


def copy_build(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
