"""The manifest of a QDQ export: `engines.manifest.Manifest` built from a `QdqExport`, written last.

`write_qdq_manifest` records every group graph, the shared weights file and `qdq_report.json`
(plus extra files such as scheduler_config.json and an optional FP graph as target "fp") in
`manifest.json`, atomically; a folder with a manifest is a finished build (docs/design.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from adpdm_export.model_loading import absolute_source
from adpdm_export.qdq_graph_passes import REPORT_NAME

if TYPE_CHECKING:
    from adpdm_export.qdq_export import QdqExport


def qdq_manifest(
    exp: QdqExport,
    loaded,
    result,
    source: Optional[str] = None,
    fp_graph: Optional[str] = None,
    fp_weights: Optional[str] = None,
):
    """The engines.manifest.Manifest describing a QDQ export (files are hashed when written).

    fp_graph / fp_weights: an FP graph (and its weights file) in the same folder to list as
    target "fp" of every group (e.g. `unet.onnx` / `unet.onnx.data` from `export_onnx`).
    """
    from engines.manifest_schema import CALIBRATION_TARGET_EXTRA_KEY, CalibrationSummary, Manifest, ModelInfo, make_groups

    table = [int(x) for x in result.timestep_to_group.tolist()]
    graphs = {p: [g.name for g in gs] for p, gs in exp.graphs.items()}
    weights = {p: exp.weights.name for p in exp.graphs}
    if fp_graph:
        graphs["fp"] = [fp_graph] * int(result.num_groups)
        if fp_weights:
            weights["fp"] = fp_weights
    cfg = dict(getattr(loaded.unet, "config", {}) or {})
    one = getattr(exp, "one_session", None) or {}
    one_session = None
    if one.get("status") == "ok" and "ort" in graphs:
        from engines.manifest_schema import OrtOneSessionInfo

        one_session = OrtOneSessionInfo(graph=one["graph"], weights=one["weights"], constants=one["constants"],
                                        num_inputs=int(one["num_inputs"]), onnxruntime=one["onnxruntime"],
                                        machine=one["machine"], optimization=one.get("optimization", "extended"))
    return Manifest(
        model=ModelInfo(
            source=str(source or absolute_source(loaded.source)),
            sha256=loaded.sha256,
            type=loaded.kind,
            sample_size=tuple(int(x) for x in loaded.sample_size),
            in_channels=int(loaded.in_channels),
            out_channels=int(loaded.out_channels),
            conditioning={k: dict(v) for k, v in (loaded.conditioning or {}).items()},
            config=json.loads(json.dumps(cfg, default=lambda o: list(o) if isinstance(o, tuple) else str(o))),
        ),
        scheduler=dict(loaded.scheduler_config),
        calibration=CalibrationSummary(
            method=str(result.method),
            weight_bits=int(result.w_bits),
            act_bits=int(result.a_bits),
            num_groups=int(result.num_groups),
            tau_star=None if result.calib_timestep is None else int(result.calib_timestep),
            extra={CALIBRATION_TARGET_EXTRA_KEY: result.target},  # the key keeps its historical name
        ),
        timestep_to_group=table,
        groups=make_groups(table, graphs),
        weights=weights,
        backend="ort",
        ort_one_session=one_session,
        graph_precision={p: exp.graph_precision.get(p, "fp32") for p in exp.graphs},
    )


def write_qdq_manifest(
    exp: QdqExport,
    loaded,
    result,
    source: Optional[str] = None,
    extra_files: Sequence[str] = (),
    fp_graph: Optional[str] = None,
    fp_weights: Optional[str] = None,
) -> Path:
    """Write manifest.json LAST (atomically), recording every graph, the weights and the report
    (plus `extra_files`, e.g. scheduler_config.json, and an optional FP graph as target "fp")."""
    from engines.manifest import write_manifest

    extra = [REPORT_NAME] + [f for f in extra_files if f != REPORT_NAME]
    m = qdq_manifest(exp, loaded, result, source, fp_graph=fp_graph, fp_weights=fp_weights)
    return write_manifest(exp.out_dir, m, extra_files=extra)


__all__ = [
    "qdq_manifest",
    "write_qdq_manifest",
]
