"""Exporting a diffusers UNet (FP, or wrapped for fake quantization) to ONNX.

One function serves the FP graph and the QDQ graphs: the UNet is traced with the
TorchScript exporter (`dynamo=False`), which names nodes by module scope
(`/unet/down_blocks.0/resnets.0/conv1/Conv`) and keeps parameter names on the
weight initializers, so later graph edits can find layers and quantizers by name.
Weights go to one external data file next to the graph.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import onnx
import torch

from engines.conditioning import accept_added_cond_inputs, default_condition
from engines.errors import AdpdmError
from engines.ort_backend import OUTPUT_NAME

DEFAULT_OPSET = 19
EXPORT_BATCH = 2


class UNetForExport(torch.nn.Module):
    """Positional-input view of a diffusers UNet returning the bare noise tensor."""

    def __init__(self, unet: torch.nn.Module, cond_names: tuple[str, ...]):
        super().__init__()
        self.unet = accept_added_cond_inputs(unet)  # SDXL: text_embeds / time_ids as graph inputs of their own
        self.cond_names = cond_names

    def forward(self, sample, timestep, *cond):
        kwargs = dict(zip(self.cond_names, cond))
        out = self.unet(sample, timestep, **kwargs)
        return out.sample if hasattr(out, "sample") else out[0]


@dataclass
class ExportedGraph:
    graph: Path
    weights: Path
    input_names: list[str]
    max_abs_diff: float | None = None
    rel_diff: float | None = None  # max |ort - torch| / max |torch|


def example_inputs(
    sample_shape: tuple[int, int, int],
    conditioning: Mapping[str, Any],
    batch: int = EXPORT_BATCH,
    seed: int = 0,
    num_train_timesteps: int = 1000,
) -> dict[str, torch.Tensor]:
    """Random inputs in graph-input order: sample, timestep, then conditioning tensors."""
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn((batch, *sample_shape), generator=g),
        "timestep": torch.randint(0, num_train_timesteps, (batch,), generator=g, dtype=torch.int64),
    }
    if "encoder_hidden_states" in conditioning:
        dim = conditioning["encoder_hidden_states"]["dim"]
        inputs["encoder_hidden_states"] = torch.randn(batch, 4, dim, generator=g)
    if "class_labels" in conditioning:
        n = conditioning["class_labels"]["num_classes"]
        inputs["class_labels"] = torch.randint(0, n, (batch,), generator=g, dtype=torch.int64)
    if "text_embeds" in conditioning:
        inputs["text_embeds"] = torch.randn(batch, conditioning["text_embeds"]["dim"], generator=g)
    if "time_ids" in conditioning:  # the pipeline's own sizes where the spec records them
        inputs["time_ids"] = default_condition({"time_ids": conditioning["time_ids"]}, batch)["time_ids"]
    return inputs


def check_opset(opset: int) -> None:
    if opset < 19:
        raise AdpdmError(f"opset {opset} is too old: TensorRT explicit quantization here needs opset >= 19")


def _dynamic_axes(names: list[str]) -> dict[str, dict[int, str]]:
    axes = {n: {0: "batch"} for n in names}
    axes["sample"] = {0: "batch", 2: "height", 3: "width"}
    if "encoder_hidden_states" in axes:
        axes["encoder_hidden_states"] = {0: "batch", 1: "sequence"}
    axes[OUTPUT_NAME] = {0: "batch", 2: "height", 3: "width"}
    return axes


def trace_to_onnx(
    unet: torch.nn.Module, raw_path: str | os.PathLike, inputs: Mapping[str, torch.Tensor], opset: int = DEFAULT_OPSET
) -> None:
    """Trace `unet` on `inputs` into `raw_path` as the TorchScript exporter writes it: weights inline,
    or, for a model over protobuf's 2 GB, one external file per large tensor next to the graph (the
    caller reads them as it needs them and removes them)."""
    check_opset(opset)
    names = list(inputs)
    module = UNetForExport(unet, tuple(names[2:])).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(raw_path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=_dynamic_axes(names),
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def export_onnx(
    unet: torch.nn.Module,
    graph_path: str | os.PathLike,
    inputs: Mapping[str, torch.Tensor],
    opset: int = DEFAULT_OPSET,
    weights_name: str | None = None,
) -> ExportedGraph:
    """Trace `unet` on `inputs` and write `graph_path` plus one external weights file.

    The graph is checked with the ONNX checker (by path, so external data is
    resolved). Written to temporary names and renamed into place.
    """
    check_opset(opset)
    graph_path = Path(graph_path)
    graph_path.parent.mkdir(parents=True, exist_ok=True)
    weights_name = weights_name or graph_path.name + ".data"
    names = list(inputs)
    with tempfile.TemporaryDirectory(dir=graph_path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        trace_to_onnx(unet, raw, inputs, opset)
        model = onnx.load(str(raw))
        staged = Path(tmp) / graph_path.name
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=weights_name,
            size_threshold=0,
        )
        onnx.checker.check_model(str(staged), full_check=False)
        for staged_file in (Path(tmp) / weights_name, staged):
            staged_file.chmod(0o644)
        os.replace(Path(tmp) / weights_name, graph_path.parent / weights_name)
        os.replace(staged, graph_path)
    return ExportedGraph(graph=graph_path, weights=graph_path.parent / weights_name, input_names=names)


def check_parity(
    unet: torch.nn.Module, exported: ExportedGraph, inputs: Mapping[str, torch.Tensor], optimize: bool = False
) -> ExportedGraph:
    """Run the graph in onnxruntime and the module in torch on the same inputs; record the difference."""
    from engines.ort_backend import OrtNoisePredictor, make_session

    pred = OrtNoisePredictor(make_session(exported.graph, providers=["CPUExecutionProvider"], optimize=optimize))
    vals = list(inputs.values())
    cond = dict(zip(list(inputs)[2:], vals[2:]))
    got = pred(vals[0], vals[1], **cond)
    with torch.no_grad():
        ref = UNetForExport(unet, tuple(cond)).eval()(*vals)
    diff = (got - ref).abs().max().item()
    exported.max_abs_diff = diff
    exported.rel_diff = diff / max(ref.abs().max().item(), 1e-12)
    return exported
