"""`CalibrationResult`: everything the export and the runtime need from a calibration.

On disk, a folder with two files (no pickle anywhere):

calibration.json
    format "adpdm-calibration", format_version, model_sha256, method, w_bits, a_bits,
    profile (the graph target, `CalibrationResult.target`), num_train_timesteps,
    num_groups, groups [{id, timestep_ranges [[lo, hi]] (inclusive), calib_timesteps}],
    timestep_to_group (length T), calib_timestep (ADP-DM's chosen timestep, null for
    baselines), activation_quantizers [{name, role, layer, aliases}], weight_quantizers
    [{name, layer, channels}], config {quant: QuantConfig.to_dict(), calibration:
    settings}, timings {stage: seconds}, extra, and tensors_file / tensors_sha256 (the
    safetensors file's hash: a truncated or modified tensors file is refused).
calibration.safetensors
    "<quantizer name>.scale" for every activation quantizer (float32 (G,): input,
    output, bmm and residual quantizers alike; role in the JSON) and every weight
    quantizer (float32 (C_out,)), and "timestep_to_group" (int64 (T,)).

Quantizer names are module paths in the wrapped model, e.g.
`down_blocks.0.resnets.0.conv1.input_quantizer` / `.output_quantizer` / `.weight_quantizer`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from engines.errors import AdpdmError
from engines.json_files import JsonFields, read_json
from engines.file_io import atomic_write, sha256_file
from engines.timestep_groups import TimestepGroups

FORMAT = "adpdm-calibration"
FORMAT_VERSION = 1
JSON_NAME = "calibration.json"
TENSORS_NAME = "calibration.safetensors"
TABLE_KEY = "timestep_to_group"
# The graph target (`CalibrationResult.target`) keeps its historical key "profile" in
# calibration.json: to_json_dict / load are the one place that maps the two names.
TARGET_KEY = "profile"


def groups_from_table(table: torch.Tensor, calib_timesteps: Optional[dict[int, list[int]]] = None) -> list[dict[str, Any]]:
    """[{id, timestep_ranges: [[lo, hi], ...] inclusive, calib_timesteps}] for each group."""
    out = []
    for g, runs in enumerate(TimestepGroups(table).ranges()):
        d: dict[str, Any] = {"id": g, "timestep_ranges": [list(r) for r in runs]}
        d["calib_timesteps"] = sorted((calib_timesteps or {}).get(g, []))
        out.append(d)
    return out


def _dumps(obj: Any, indent: str = "") -> str:
    """Indented JSON with lists of numbers/strings (tables, ranges) kept on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, dict) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, allow_nan=False, default=str)


@dataclass
class CalibrationResult:
    model_sha256: str
    method: str
    w_bits: int
    a_bits: int
    target: str
    timestep_to_group: torch.Tensor  # int64 (T,)
    activation_scales: dict[str, torch.Tensor]  # quantizer name -> float32 (G,)
    weight_scales: dict[str, torch.Tensor]  # quantizer name -> float32 (C_out,)
    activation_quantizers: list[dict[str, Any]] = field(default_factory=list)  # name, role, layer, aliases
    weight_quantizers: list[dict[str, Any]] = field(default_factory=list)  # name, layer, channels
    config: dict[str, Any] = field(default_factory=dict)  # {"quant": QuantConfig dict, "calibration": {...}}
    groups: list[dict[str, Any]] = field(default_factory=list)
    calib_timestep: Optional[int] = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.timestep_to_group = torch.as_tensor(self.timestep_to_group, dtype=torch.int64).reshape(-1)
        if not self.groups:
            self.groups = groups_from_table(self.timestep_to_group)

    # -- views -------------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return int(self.timestep_to_group.max()) + 1

    @property
    def num_train_timesteps(self) -> int:
        return int(self.timestep_to_group.numel())

    def _role(self, name: str) -> str:
        for q in self.activation_quantizers:
            if q["name"] == name:
                return q.get("role", "input")
        return "output" if name.endswith(".output_quantizer") else "input"

    @property
    def input_scales(self) -> dict[str, torch.Tensor]:
        """Scales of every quantizer the `trt` target exports (all but output quantizers)."""
        return {n: s for n, s in self.activation_scales.items() if self._role(n) != "output"}

    @property
    def output_scales(self) -> dict[str, torch.Tensor]:
        """Scales of the output quantizers of quantized Conv/Linear (the `ort` target adds them)."""
        return {n: s for n, s in self.activation_scales.items() if self._role(n) == "output"}

    def group_of(self, timestep: int) -> int:
        return int(self.timestep_to_group[int(timestep)])

    def scales_for_group(self, group: int) -> dict[str, float]:
        """Quantizer name -> group `group`'s activation scale as a Python float."""
        return {n: float(s[group]) for n, s in self.activation_scales.items()}

    # -- apply -------------------------------------------------------------------------
    def apply(self, qmodel: torch.nn.Module, check_hash: bool = True) -> torch.nn.Module:
        """Configure a wrapped model (quantize_model) from this result: table, scales, target."""
        from calibration.quant_unet import (
            activation_quantizers,
            fp_sha256,
            get_config,
            set_table,
            set_target,
            weight_quantizers,
        )

        if check_hash and fp_sha256(qmodel) != self.model_sha256:
            raise AdpdmError(
                f"calibration is for model {self.model_sha256[:12]}, this model is {fp_sha256(qmodel)[:12]}: "
                "recalibrate for this model"
            )
        cfg = get_config(qmodel)
        if (cfg.w_bits, cfg.a_bits) != (self.w_bits, self.a_bits):
            raise AdpdmError(
                f"model wrapped for W{cfg.w_bits}A{cfg.a_bits}, calibration is W{self.w_bits}A{self.a_bits}"
            )
        aq, wq = activation_quantizers(qmodel), weight_quantizers(qmodel)
        for what, have, want in (("activation", aq, self.activation_scales), ("weight", wq, self.weight_scales)):
            missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
            if missing or extra:
                raise AdpdmError(
                    f"{what} quantizers differ between the model and the calibration (quantization config changed?): "
                    f"{len(missing)} without scales (e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})"
                )
        set_table(qmodel, self.timestep_to_group)
        for n, q in aq.items():
            q.set_scale(self.activation_scales[n])
        for n, q in wq.items():
            q.set_scale(self.weight_scales[n])
        set_target(qmodel, self.target)
        return qmodel

    # -- save / load -------------------------------------------------------------------
    def to_json_dict(self, tensors_sha256: str = "") -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "model_sha256": self.model_sha256,
            "method": self.method,
            "w_bits": int(self.w_bits),
            "a_bits": int(self.a_bits),
            TARGET_KEY: self.target,
            "num_train_timesteps": self.num_train_timesteps,
            "num_groups": self.num_groups,
            "groups": self.groups,
            "timestep_to_group": self.timestep_to_group.tolist(),
            "calib_timestep": self.calib_timestep,
            "activation_quantizers": self.activation_quantizers
            or [{"name": n, "role": self._role(n), "layer": n.rsplit(".", 1)[0], "aliases": []} for n in self.activation_scales],
            "weight_quantizers": self.weight_quantizers
            or [{"name": n, "layer": n.rsplit(".", 1)[0], "channels": int(s.numel())} for n, s in self.weight_scales.items()],
            "config": self.config,
            "timings": {k: round(float(v), 4) for k, v in self.timings.items()},
            "extra": self.extra,
            "tensors_file": TENSORS_NAME,
            "tensors_sha256": tensors_sha256,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write calibration.safetensors then calibration.json (atomically, JSON last)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {TABLE_KEY: self.timestep_to_group.contiguous()}
        for n, s in {**self.activation_scales, **self.weight_scales}.items():
            tensors[f"{n}.scale"] = s.detach().to("cpu", torch.float32).contiguous()
        atomic_write(d / TENSORS_NAME, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
        doc = self.to_json_dict(sha256_file(d / TENSORS_NAME))
        text = _dumps(json.loads(json.dumps(doc, allow_nan=False, default=str))) + "\n"
        atomic_write(d / JSON_NAME, lambda p: Path(p).write_text(text))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, expected_model_sha256: Optional[str] = None) -> "CalibrationResult":
        d = Path(directory)
        jpath, tpath = d / JSON_NAME, d / TENSORS_NAME
        if not d.is_dir():
            raise AdpdmError(f"no calibration folder at {d}")
        if not jpath.is_file():
            raise AdpdmError(f"{d} holds no {JSON_NAME}; run `adpdm calibrate` first")
        doc = read_json(jpath, "calibration file")  # damaged, nested too deep, not an object: one line
        if doc.get("format") != FORMAT:
            raise AdpdmError(f"{jpath} is not an adpdm calibration file")
        ver = doc.get("format_version")
        if ver != FORMAT_VERSION:
            raise AdpdmError(f"{jpath} has format_version {ver}; this tool reads {FORMAT_VERSION}: recalibrate")
        doc_fields = JsonFields(doc, "calibration", prefix=f"{jpath}: ")
        sha = doc_fields.str_("model_sha256")
        if expected_model_sha256 is not None and sha != expected_model_sha256:
            raise AdpdmError(
                f"calibration in {d} is for model {str(sha)[:12]}, not for this model ({expected_model_sha256[:12]}): "
                "recalibrate for this model"
            )
        if not tpath.is_file():
            raise AdpdmError(f"{tpath} is missing")
        want_sha = doc.get("tensors_sha256")
        if want_sha and sha256_file(tpath) != want_sha:
            raise AdpdmError(f"{tpath} does not match {JSON_NAME} (truncated or modified); recalibrate")
        try:
            from safetensors import safe_open

            with safe_open(str(tpath), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise AdpdmError(f"cannot read {tpath} ({type(e).__name__}: {str(e)[:200]}); recalibrate") from None
        # every field by type before use: a wrong type is one line naming the field, never a traceback
        g = doc_fields.int_("num_groups", minimum=1)
        t_count = doc_fields.int_("num_train_timesteps", minimum=1)
        t_json = doc_fields.int_list("timestep_to_group", length=t_count, minimum=0)
        w_bits, a_bits = doc_fields.int_("w_bits", minimum=1), doc_fields.int_("a_bits", minimum=1)
        method, target = doc_fields.str_("method"), doc_fields.str_(TARGET_KEY)
        act_q = [(q, q.str_("name")) for q in doc_fields.objects("activation_quantizers")]
        wt_q = [(q, q.str_("name"), q.int_("channels", minimum=1)) for q in doc_fields.objects("weight_quantizers")]
        groups = [q.d for q in doc_fields.objects("groups")]
        calib_timestep = doc_fields.int_("calib_timestep", optional=True)
        config, timings, extra = (doc_fields.get(k, dict, optional=True, default={}) for k in ("config", "timings", "extra"))
        if TABLE_KEY not in tensors:
            raise AdpdmError(f"{tpath} lacks {TABLE_KEY}; recalibrate")
        table = tensors[TABLE_KEY].to(torch.int64)
        if not torch.equal(table, torch.tensor(t_json, dtype=torch.int64)):
            raise AdpdmError(f"timestep_to_group differs between {JSON_NAME} and {TENSORS_NAME}")
        if int(table.max()) != g - 1:
            raise AdpdmError(f"{jpath}: timestep_to_group does not fit num_train_timesteps / num_groups")
        act, wts = {}, {}
        for expected, entries in (((g,), act_q), (None, wt_q)):
            for entry in entries:
                name = entry[1]
                key = f"{name}.scale"
                if key not in tensors:
                    raise AdpdmError(f"{tpath} lacks {key}; recalibrate")
                s_ = tensors[key].to(torch.float32)
                want = expected or (entry[2],)
                if tuple(s_.shape) != want:
                    what = f"{g} groups" if expected else f"{entry[2]} channels"
                    raise AdpdmError(f"{name}: {tuple(s_.shape)} scales for {what}")
                if not torch.isfinite(s_).all() or bool((s_ <= 0).any()):
                    raise AdpdmError(f"{name}: non-positive or non-finite scale")
                (act if expected else wts)[name] = s_
        return cls(
            model_sha256=sha,
            method=method,
            w_bits=w_bits,
            a_bits=a_bits,
            target=target,
            timestep_to_group=table,
            activation_scales=act,
            weight_scales=wts,
            activation_quantizers=[q.d for q, _ in act_q],
            weight_quantizers=[q.d for q, _, _ in wt_q],
            config=config,
            groups=groups,
            calib_timestep=calib_timestep,
            timings=timings,
            extra=extra,
            format_version=ver,
        )


def result_from_model(
    qmodel: torch.nn.Module,
    method: str,
    calibration_settings: dict[str, Any],
    calib_timesteps_by_group: Optional[dict[int, list[int]]] = None,
    calib_timestep: Optional[int] = None,
    timings: Optional[dict[str, float]] = None,
    extra: Optional[dict[str, Any]] = None,
) -> CalibrationResult:
    """Snapshot a calibrated wrapped model into a CalibrationResult."""
    from calibration.quant_unet import (
        activation_quantizers,
        fp_sha256,
        get_config,
        get_state,
        quantizer_aliases,
        weight_quantizers,
    )

    st, cfg = get_state(qmodel), get_config(qmodel)
    aliases = quantizer_aliases(qmodel)
    aq, wq = activation_quantizers(qmodel), weight_quantizers(qmodel)
    return CalibrationResult(
        model_sha256=fp_sha256(qmodel),
        method=method,
        w_bits=cfg.w_bits,
        a_bits=cfg.a_bits,
        target=st.target,
        timestep_to_group=st.table.clone(),
        activation_scales={n: q.effective_scale().detach().cpu().clone() for n, q in aq.items()},
        weight_scales={n: q.effective_scale().detach().cpu().clone() for n, q in wq.items()},
        activation_quantizers=[
            {"name": n, "role": q.role, "layer": n.rsplit(".", 1)[0], "aliases": sorted(a for a, c in aliases.items() if c == n)}
            for n, q in aq.items()
        ],
        weight_quantizers=[{"name": n, "layer": n.rsplit(".", 1)[0], "channels": int(q.scale.numel())} for n, q in wq.items()],
        config={"quant": cfg.to_dict(), "calibration": dict(calibration_settings)},
        groups=groups_from_table(st.table, calib_timesteps_by_group),
        calib_timestep=calib_timestep,
        timings=dict(timings or {}),
        extra=dict(extra or {}),
    )
