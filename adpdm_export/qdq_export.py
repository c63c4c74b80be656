"""CalibrationResult + model -> the QDQ ONNX graphs TensorRT and onnxruntime run, one per group.

Pipeline (`export_qdq`):

1. Wrap the FP UNet with the calibration (`calibration.quant_unet.quantize_model(result=...)`)
   and trace it once in export mode, group 0 (`export_mode`: every quantizer is a
   `torch.fake_quantize_*` call, exported as QuantizeLinear/DequantizeLinear).
2. Graph passes (`qdq_graph_passes`): static scales as initializers; weight Q folded into
   INT8 (INT4 for W4A8) initializers behind per-channel DequantizeLinear (axis 0); every
   activation scale named `{quantizer}.scale`; identical Q/DQ on one tensor merged (shared
   q/k/v input quantizers). This is the TensorRT-target *template*.
3. onnxruntime target (`ort_target`): the template plus Q/DQ on the outputs of the
   quantized Conv/MatMul/Gemm, activation zero points uint8 128.
4. Every initializer except the activation scales and zero point goes, content-addressed,
   into ONE external file `unet.weights.data`; group k's graph is the template with the
   activation-scale values of group k (`unet.g{k}.onnx`, `unet.g{k}.ort.onnx`). That the
   group graphs differ only in those values is checked in code.
5. Checks: the TensorRT-rule linter on every TensorRT-target graph; parity per group
   (`qdq_parity.check_group_graph`: onnxruntime, optimizations off, against the wrapper
   simulating the same target with that group active, at timesteps of that group: relative
   L2 <= PARITY_TOL); error vs the FP model; onnxruntime fusion counts for the CPU target.
6. Files are built in a staging folder and renamed into place; `qdq_report.json` records
   the checks. The manifest (engines/manifest.py) is written last by `write_manifest`
   (`qdq_manifest.write_qdq_manifest`, which `export_qdq_for` calls).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Optional, Sequence

import numpy as np
import onnx
import torch

from adpdm_export import high_precision as HP
from adpdm_export import qdq_graph_passes as P
from adpdm_export.build_stages import STAGING_PREFIX, STAGING_RE
from adpdm_export.ort_target import MIN_FUSED_RATIO, fusion_counts, make_ort_target
from adpdm_export.qdq_lint import lint_model, raise_on_violations
from adpdm_export.qdq_manifest import write_qdq_manifest
from adpdm_export.qdq_parity import (
    PARITY_TOL,
    GraphCheck,
    check_group_graph,
    parity_sample_shape,
    parity_tolerance,
    sim_in_precision,
)
from adpdm_export.qdq_report import report_to_disk
from engines.errors import AdpdmError
from engines.group_graph_stamp import stamp, stamp_values
from engines.heap import release_heap

WEIGHTS_NAME = P.WEIGHTS_NAME
REPORT_NAME = P.REPORT_NAME
TARGETS = ("trt", "ort")
OPSET = 19
OPSET_INT4 = 21
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx.export(dynamo=False) traces up to opset 20
GRAPH_RE = re.compile(r"^unet\.g\d+(\.ort)?\.onnx$")


def graph_name(group: int, target: str) -> str:
    return f"unet.g{group}.onnx" if target == "trt" else f"unet.g{group}.ort.onnx"


def parse_targets(target: str | Sequence[str]) -> tuple[str, ...]:
    """'trt' | 'ort' | 'both' (or a sequence of them) -> ('trt', 'ort') subset, in that order."""
    items = [target] if isinstance(target, str) else list(target)
    out: set[str] = set()
    for p in items:
        if p == "both":
            out.update(TARGETS)
        elif p in TARGETS:
            out.add(p)
        else:
            raise AdpdmError(f"unknown target {p!r}: use trt, ort or both")
    return tuple(p for p in TARGETS if p in out)


def check_supported(result, targets: Sequence[str]) -> None:
    """Refuse what cannot be exported, with the reason."""
    if int(result.a_bits) != 8:
        raise AdpdmError(
            f"A{result.a_bits} activations cannot be exported: the QDQ graphs carry INT8 activations "
            "(TensorRT and onnxruntime's CPU kernels quantize activations to 8 bits); recalibrate with a_bits=8"
        )
    if int(result.w_bits) not in (8, 4):
        raise AdpdmError(f"W{result.w_bits} weights cannot be stored in ONNX: use w_bits 8 (INT8) or 4 (INT4, onnxruntime only)")
    if int(result.w_bits) == 4 and "trt" in targets:
        raise AdpdmError(
            "W4A8 cannot go to TensorRT: TensorRT runs INT4 only as weight-only, block-quantized MatMul/Gemm "
            "weights with float activations, not per-channel INT4 Conv/MatMul weights with INT8 activations; "
            "export W4A8 with --target ort (onnxruntime, opset 21), or recalibrate with w_bits=8 for TensorRT"
        )


# --------------------------------------------------------------------------- results


@dataclass
class QdqExport:
    out_dir: Path
    weights: Path
    targets: tuple[str, ...]
    num_groups: int
    opset: int
    w_bits: int
    a_bits: int
    graphs: dict[str, list[Path]]  # target -> graph per group
    timestep_ranges: list[list[list[int]]]  # per group, inclusive [lo, hi] ranges
    activation_scales: dict[str, list[str]]  # target -> scale initializer names (what differs by group)
    folded_weights: int
    deduped_qdq: int
    lint: dict[str, list[str]] = field(default_factory=dict)
    checks: list[GraphCheck] = field(default_factory=list)
    fusion: dict[str, dict] = field(default_factory=dict)  # target -> FusionCounts.to_dict()
    timings: dict[str, float] = field(default_factory=dict)
    report_path: Optional[Path] = None
    # the CPU target as ONE session (engines/ort_one_session.py): files, onnxruntime version, parity
    # against the per-group sessions; {"status": "skipped", "reason": ...} where it does not apply
    one_session: Optional[dict] = None
    # target -> float type outside the INT8 layers (adpdm_export/high_precision.py); the CPU target is FP32
    graph_precision: dict[str, str] = field(default_factory=dict)
    precision: dict[str, dict] = field(default_factory=dict)  # target -> high_precision.Conversion.to_dict()
    parity_skipped: dict[str, str] = field(default_factory=dict)  # target -> why its graphs were not run
    parity_sample_shape: Optional[list[int]] = None  # (C, H, W) of the parity inputs (qdq_parity.PARITY_MAX_SIDE)

    def report(self) -> dict[str, Any]:
        """The content of qdq_report.json, with its on-disk key names (`adpdm_export.qdq_report`)."""

        def rel(p: Path) -> str:
            return p.name

        return report_to_disk({
            "targets": list(self.targets),
            "num_groups": self.num_groups,
            "opset": self.opset,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "weights_file": rel(self.weights),
            "weights_bytes": self.weights.stat().st_size if self.weights.exists() else None,
            "graphs": {p: [rel(g) for g in gs] for p, gs in self.graphs.items()},
            "timestep_ranges": self.timestep_ranges,
            "activation_scale_initializers": {p: len(v) for p, v in self.activation_scales.items()},
            "folded_weights": self.folded_weights,
            "deduped_qdq_pairs": self.deduped_qdq,
            "lint": self.lint,
            "parity_tolerance": PARITY_TOL,
            "checks": [asdict(c) for c in self.checks],
            "fusion": self.fusion,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "one_session": self.one_session,
            "graph_precision": self.graph_precision,
            "precision": self.precision,
            "parity_tolerance_by_target": {p: parity_tolerance(self.graph_precision.get(p, "fp32")) for p in self.targets},
            "parity_skipped": self.parity_skipped,
            "parity_sample_shape": self.parity_sample_shape,
        })

    def summary_lines(self) -> list[str]:
        """One human-readable line per target: parity (teacher-forced and free-running), error vs FP, fusion."""
        lines = []
        for p in self.targets:
            cs = [c for c in self.checks if c.target == p]
            parts = [f"{p}: {len(self.graphs.get(p, []))} group graph(s) ({self.graph_precision.get(p, 'fp32')} outside INT8)"]
            if p in self.parity_skipped:
                parts.append(f"parity not run: {self.parity_skipped[p]}")
            if cs:
                forced = max(max(c.forced_rel_l2 or 0.0, (c.forced or {}).get("forced_worst_input_rel_l2", 0.0)) for c in cs)
                ties = sum(c.verdict == "ties" for c in cs)
                parts.append(f"parity teacher-forced <= {forced:.1e}")
                parts.append(
                    f"free-running <= {self.worst(p):.1e}"
                    + (f" ({ties} group(s) diverge after a rounding tie, see docs/export.md)" if ties else "")
                )
                parts.append(f"error vs FP <= {self.worst(p, 'fp_rel_l2'):.3f}")
            f = self.fusion.get(p)
            if f and p == "ort":
                low = "" if f.get("ok", True) else f" (below {MIN_FUSED_RATIO:.0%}: slow on CPU)"
                parts.append(f"onnxruntime fuses {f['fused_total']}/{f['total']} quantized ops{low}")
            lines.append(", ".join(parts))
        return lines

    def worst(self, target: str, key: str = "parity_rel_l2") -> float:
        vals = [getattr(c, key) for c in self.checks if c.target == target and getattr(c, key) is not None]
        return max(vals) if vals else float("nan")


# --------------------------------------------------------------------------- tracing


@contextlib.contextmanager
def _weight_bits_for_trace(qmodel: torch.nn.Module) -> Iterator[None]:
    """Trace sub-8-bit weight quantizers with an 8-bit range (ONNX's fake-quant export only
    knows 8-bit ranges); the integers are recomputed with the real width when folding."""
    from calibration.quant_unet import weight_quantizers

    changed = []
    for q in weight_quantizers(qmodel).values():
        if q.bits < 8:
            changed.append((q, q.bits))
            q.bits = 8
    try:
        yield
    finally:
        for q, b in changed:
            q.bits = b


def _example_inputs(sample_shape, conditioning, batch: int, seed: int, num_train_timesteps: int):
    from adpdm_export.onnx_export import example_inputs

    return example_inputs(tuple(sample_shape), conditioning or {}, batch=batch, seed=seed, num_train_timesteps=num_train_timesteps)


def build_trt_template(
    qmodel: torch.nn.Module,
    result,
    workdir: Path,
    sample_shape: Sequence[int],
    conditioning: Mapping[str, Any],
    opset: int = OPSET,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Trace `qmodel` (wrapped and configured from `result`) and run the graph passes.

    Returns the TensorRT-target template (in memory, weights inline) and facts about it:
    `scale_to_quantizer` (activation scale initializer -> quantizer name), folded weights,
    merged pairs.
    """
    from adpdm_export.onnx_export import trace_to_onnx
    from calibration.quant_unet import activation_quantizers, export_mode, quantizer_aliases, weight_quantizers

    t_count = int(result.num_train_timesteps)
    inputs = _example_inputs(sample_shape, conditioning, 2, 0, t_count)
    traced = workdir / "traced"  # the tracer's graph and, over 2 GB, its external tensor files
    traced.mkdir()
    traced_opset = min(int(opset), TORCHSCRIPT_MAX_OPSET)
    try:
        with export_mode(qmodel, group=0, target="trt", zero_point="int8"), _weight_bits_for_trace(qmodel):
            trace_to_onnx(qmodel, traced / "traced.onnx", inputs, opset=traced_opset)
        # Over 2 GB the tracer stores the weights outside the graph: the fold below reads each FP32
        # weight from its file and puts only the integers into the message (no FP32 copy of the
        # weights in memory beside the model's own); what is left outside is loaded after it.
        model = onnx.load(str(traced / "traced.onnx"), load_external_data=False)
        inline = not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)

        acts = activation_quantizers(qmodel)
        canon = {n: n for n in acts}
        canon.update(quantizer_aliases(qmodel))
        wqs = weight_quantizers(qmodel)

        P.constants_to_initializers(model, base_dir=traced)

        def weight_scale_name(dq: onnx.NodeProto) -> str:
            qn = P.resolve_quantizer(dq.name, wqs)
            if qn is None:
                raise AdpdmError(f"cannot tell which weight quantizer made {dq.name}")
            return qn + P.SCALE_SUFFIX

        folded = P.fold_weight_quantizers(model, int(result.w_bits), name_scale=weight_scale_name, base_dir=traced)
        P.load_external_tensors(model, traced)
    finally:
        shutil.rmtree(traced, ignore_errors=True)
    named = P.name_activation_qdq(model, canon)
    scale_to_q = {a.scale: a.quantizer for a in named}
    roles = {n: q.role for n, q in acts.items()}
    bad = sorted(q for q in set(scale_to_q.values()) if roles.get(q) == "output")
    if bad:
        raise AdpdmError(f"output quantizers traced into the TensorRT target: {bad[:3]}")
    missing = sorted(set(scale_to_q.values()) - set(result.activation_scales))
    if missing:
        raise AdpdmError(f"quantizers in the graph without calibration scales: {missing[:3]}")

    # The traced graph must carry exactly group 0's calibrated scales (export mode worked).
    ix = P.GraphIndex(model)
    for scale_name, qn in scale_to_q.items():
        got = np.float32(ix.const_value(scale_name))
        want = np.float32(result.activation_scales[qn][0].item())
        if got != want:
            raise AdpdmError(f"{qn}: traced scale {got} differs from the calibration's group-0 scale {want}")
    for fw in folded:
        qn = fw.scale[: -len(P.SCALE_SUFFIX)]
        want = result.weight_scales.get(qn)
        got = ix.const_value(fw.scale)
        if want is None or not np.array_equal(np.asarray(got, np.float32), want.numpy().astype(np.float32)):
            raise AdpdmError(f"{qn}: folded weight scales differ from the calibration's")

    # Merge identical pairs on one tensor; equal in every group, so the merge is group-independent.
    def key_of(scale_name: str):
        qn = scale_to_q.get(scale_name)
        return None if qn is None else tuple(np.float32(v) for v in result.activation_scales[qn].tolist())

    merged = P.dedupe_activation_qdq(model, key_of)
    scale_to_q = {s: q for s, q in scale_to_q.items() if s in {t.name for t in model.graph.initializer}}
    # INT4 weights need DequantizeLinear-21. The ops a traced UNet uses did not change meaning
    # between opsets 19 and 21 (only new types were added); parity is checked on the result.
    target = max(int(opset), OPSET_INT4) if int(result.w_bits) == 4 else int(opset)
    if target != traced_opset:
        P.set_opset(model, target)
    info = {"scale_to_quantizer": scale_to_q, "folded": folded, "merged": merged}
    if not inline:  # the FP32 weights never entered this message: nothing to shed
        return model, info
    # Re-parsed into a fresh message: protobuf keeps the bytes of every replaced tensor (the traced FP32
    # weights, now INT8) in the message's arena until the message is freed: a few times the template.
    data = model.SerializeToString()
    del model, ix
    return onnx.ModelProto.FromString(data), info


# --------------------------------------------------------------------------- export


def _clean_stale_staging(out_dir: Path) -> list[Path]:
    """Remove staging folders of killed exports: names matching our pattern whose lock nobody holds
    (a live export holds an fcntl lock on its staging folder, released when its process dies)."""
    removed = []
    for d in out_dir.iterdir():
        if not STAGING_RE.match(d.name) or d.is_symlink() or not d.is_dir():
            continue
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live export's
            os.close(fd)
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def _stage_dir(out_dir: Path) -> tuple[Path, int]:
    """A new staging folder in `out_dir`, locked (fcntl) for as long as the returned descriptor is open.

    Stale staging folders of killed exports are removed first. The folder is created under a
    name outside our pattern, locked, then renamed, so no other export can take it for stale.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale_staging(out_dir)
    while True:
        new = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, suffix=".new", dir=out_dir))
        stage = new.with_name(new.name[: -len(".new")])
        fd = os.open(new, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not stage.exists():  # never rename onto another export's (empty) folder
                os.rename(new, stage)
                return stage, fd
        except BaseException:
            os.close(fd)
            shutil.rmtree(new, ignore_errors=True)
            raise
        os.close(fd)
        new.rmdir()


def export_qdq(
    unet: torch.nn.Module,
    result,
    out_dir: str | os.PathLike,
    *,
    sample_shape: Sequence[int],
    conditioning: Optional[Mapping[str, Any]] = None,
    target: str | Sequence[str] = "trt",
    opset: int = OPSET,
    check: bool = True,
    lint: bool = True,
    fusion: bool = True,
    parity_tol: float = PARITY_TOL,
    allow_lint: Sequence[str] = (),
    say: Optional[Callable[[str], None]] = None,
    owned: Optional[Collection[str]] = None,
    one_session: bool = True,
    high_precision: Optional[str] = None,
) -> QdqExport:
    """Export `unet` quantized as `result` describes to one QDQ graph per group and target.

    unet: the FP diffusers UNet the calibration was made for (hash checked; not modified).
    result: a `calibration.result.CalibrationResult`.
    sample_shape / conditioning: as `LoadedModel.sample_shape` / `.conditioning`.
    target: "trt", "ort" or "both".
    check: parity per group (raises if a group's relative L2 exceeds `parity_tol`) and the
        error vs FP; lint: the TensorRT linter on TensorRT-target graphs (raises on
        violations, except rules in `allow_lint`); fusion: onnxruntime fusion counts of the
        CPU target (a warning in the report below MIN_FUSED_RATIO).
    say: one line per step of the export (text, not the `progress(stage, done, total, loss)`
        shape of the long numeric stages).
    owned: the files in `out_dir` this export may remove as stale group graphs (build-engine
        passes what its ledger and manifest list); None: any `unet.g{k}[.ort].onnx`.
    one_session: with the CPU target, also write its groups as ONE shared graph + per-group constants
        (`unet.shared.ort.onnx`, `unet.shared.ort.data`, `unet.shared.groups.npz`;
        engines/ort_one_session.py), checked against the per-group sessions.
    high_precision: the float type of the TensorRT target outside the INT8 layers: "fp16" (default with
        the trt target), "bf16" or "fp32" (adpdm_export/high_precision.py); the CPU target is always FP32.
    Writes graphs, `unet.weights.data` and `qdq_report.json` into `out_dir`; the manifest is
    the caller's (`write_manifest`), written last. Staging folders of killed exports are removed.
    """
    from calibration.quant_unet import quantize_model
    from engines.conditioning import accept_added_cond_inputs

    targets = parse_targets(target)
    check_supported(result, targets)
    precision = HP.parse_high_precision(high_precision, targets)
    if opset < OPSET:
        raise AdpdmError(f"opset {opset} is too old: TensorRT explicit quantization here needs opset >= {OPSET}")
    if result.config.get("quant", {}).get("quantize_residual"):
        allow_lint = tuple(allow_lint) + ("weighted-output",)
    say = say or (lambda msg: None)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    qmodel = quantize_model(unet, result=result, share_weights=True)  # the export reads the weights only
    qmodel.eval()
    accept_added_cond_inputs(unet)  # the FP reference of the parity checks takes the flat SDXL inputs too
    stage, stage_fd = _stage_dir(out_dir)
    try:
        say("tracing the quantized UNet (group 0) and building the QDQ template")
        trt_template, info = build_trt_template(qmodel, result, stage, sample_shape, conditioning or {}, opset)
        release_heap()  # the tracer's copies of the weights
        timings["trace_s"] = time.perf_counter() - t0
        scale_to_q = dict(info["scale_to_quantizer"])
        templates: dict[str, onnx.ModelProto] = {}
        scale_maps: dict[str, dict[str, str]] = {}
        conversion = None
        t1 = time.perf_counter()
        with P.SharedWeights(stage / WEIGHTS_NAME) as weights:

            def stored(tmpl: onnx.ModelProto, inline: Collection[str]) -> onnx.ModelProto:
                """`tmpl` with its weights moved to the weights file, as a fresh message: protobuf frees
                a message's bytes only with the message, so each target leaves memory before the next."""
                P.externalize(tmpl, weights, list(inline) + [P.ACT_ZERO_POINT])
                small = onnx.ModelProto()
                small.CopyFrom(tmpl)
                return small

            if "trt" in targets:
                if precision != "fp32":
                    say(f"converting the TensorRT target to {precision} outside the INT8 layers")
                converted, conversion = HP.convert(trt_template, precision)
                templates["trt"] = stored(converted, scale_to_q)
                del converted
                scale_maps["trt"] = scale_to_q
                conversion.lifted_activation_scales = sum(
                    HP.normal_scale(v, precision) != v for q in set(scale_to_q.values())
                    for v in result.activation_scales[q].tolist())
            if "ort" in targets:
                def out_scale(qname: str) -> float:
                    s = result.activation_scales.get(qname)
                    if s is None:
                        raise AdpdmError(f"the calibration has no output scales for {qname}")
                    return float(s[0])

                ort_template, out_names = make_ort_target(trt_template, out_scale)
                scale_maps["ort"] = {**scale_to_q, **{n + P.SCALE_SUFFIX: n for n in out_names}}
                templates["ort"] = stored(ort_template, scale_maps["ort"])
                del ort_template
            graph_opset = P.opset_version(templates.get("trt", trt_template))
            del trt_template  # the targets are copies
        release_heap()  # the templates' inline weights, now in the weights file

        g_count = int(result.num_groups)
        table = [int(x) for x in result.timestep_to_group.tolist()]
        files: dict[str, list[Path]] = {}
        while templates:  # each template dropped once its group graphs are written
            prof, tmpl = next(iter(templates.items()))
            del templates[prof]
            say(f"writing {g_count} {prof} group graphs")
            models = []
            for k in range(g_count):
                prec = precision if prof == "trt" else "fp32"
                values = {s: HP.normal_scale(result.activation_scales[q][k], prec) for s, q in scale_maps[prof].items()}
                m = stamp(P.set_activation_scales(tmpl, values), stamp_values(
                    k, g_count, table, sample_shape[1:], sample_shape[0]))
                models.append(m)
                files.setdefault(prof, []).append(P.save_graph(m, stage / graph_name(k, prof)))
            P.assert_identical_but_scales(models, scale_maps[prof], [graph_name(k, prof) for k in range(g_count)])
            del models, tmpl, m
        timings["write_s"] = time.perf_counter() - t1

        exp = QdqExport(
            out_dir=out_dir,
            weights=out_dir / WEIGHTS_NAME,
            targets=targets,
            num_groups=g_count,
            opset=graph_opset,
            w_bits=int(result.w_bits),
            a_bits=int(result.a_bits),
            graphs={p: [out_dir / f.name for f in fs] for p, fs in files.items()},
            timestep_ranges=[g["timestep_ranges"] for g in result.groups],
            activation_scales={p: sorted(m) for p, m in scale_maps.items()},
            folded_weights=len(info["folded"]),
            deduped_qdq=int(info["merged"]),
            graph_precision={p: (precision if p == "trt" else "fp32") for p in files},
            precision={"trt": conversion.to_dict()} if conversion is not None else {},
        )

        if lint and "trt" in files:
            t1 = time.perf_counter()
            say("linting the TensorRT-target graphs")
            for f in files["trt"]:
                v = lint_model(f, high_precision=precision)
                exp.lint[f.name] = [str(x) for x in v]
                raise_on_violations([x for x in v if x.rule not in set(allow_lint)], f.name)
            timings["lint_s"] = time.perf_counter() - t1
            release_heap()

        check_shape = parity_sample_shape(sample_shape, unet)
        if check or one_session:
            exp.parity_sample_shape = list(check_shape)
        if check:
            t1 = time.perf_counter()
            if tuple(check_shape) != tuple(sample_shape):
                say(f"parity inputs at {check_shape[1]}x{check_shape[2]} latents (the model's {sample_shape[1]}x"
                    f"{sample_shape[2]}): the same graphs, at a bounded memory")
            sims = {"fp32": qmodel}
            for prof, fs in files.items():
                prec = exp.graph_precision[prof]
                if prec == "bf16":  # no CPU runtime has BF16 Conv kernels
                    exp.parity_skipped[prof] = ("onnxruntime has no BF16 Conv kernel on the CPU, so the bf16 graphs are checked "
                                                "by the linter here and on the GPU by tools/trt_check.py")
                    say(f"parity of the {prof} graphs skipped: {exp.parity_skipped[prof]}")
                    continue
                if prec not in sims:
                    sims[prec] = sim_in_precision(qmodel, prec)
                for k, f in enumerate(fs):
                    say(f"parity: {f.name} vs the {prof} simulation of group {k}")
                    c = check_group_graph(
                        f, sims[prec], unet, result, k, prof, check_shape, conditioning or {},
                        optimized=(prof == "ort"), parity_tol=parity_tolerance(prec, parity_tol), precision=prec,
                    )
                    exp.checks.append(c)
                    release_heap()  # the group's onnxruntime sessions and captured tensors
                if prec != "fp32":
                    del sims[prec]  # the low-precision copy serves only this target's graphs
                    release_heap()
            del sims
            timings["parity_s"] = time.perf_counter() - t1
            bad = [c for c in exp.checks if not c.ok]
            if bad:
                lines = "; ".join(
                    f"{c.file} (group {c.group}): rel L2 {c.parity_rel_l2:.2e}, first difference at "
                    f"{(c.divergence or {}).get('quantizer', '?')} ({(c.divergence or {}).get('reason', '')})"
                    for c in bad[:4]
                )
                raise AdpdmError(f"onnxruntime disagrees with the quantized PyTorch model beyond the parity tolerance: {lines}")

        if fusion and "ort" in files:
            t1 = time.perf_counter()
            say("counting onnxruntime fusions in the CPU target")
            fc = fusion_counts(files["ort"][0])
            exp.fusion["ort"] = fc.to_dict()
            exp.fusion["ort"]["ok"] = fc.ratio >= MIN_FUSED_RATIO
            if fc.ratio < MIN_FUSED_RATIO:
                say(f"warning: onnxruntime fuses only {fc.summary()}; unfused: {', '.join(fc.unfused[:5])}")
            if "trt" in files:
                exp.fusion["trt"] = fusion_counts(files["trt"][0]).to_dict()
            timings["fusion_s"] = time.perf_counter() - t1
            release_heap()

        extra_names: list[str] = []
        if one_session and "ort" in files:
            t1 = time.perf_counter()
            say("the CPU-target groups as one onnxruntime session (shared graph, group constants as inputs)")
            exp.one_session = derive_shared_session(files["ort"], stage, result, check_shape, conditioning or {})
            if exp.one_session.get("status") == "ok":
                extra_names = [exp.one_session[k] for k in ("graph", "weights", "constants")]
            else:
                say(f"warning: no shared graph, the runner will open one session per group: {exp.one_session['reason']}")
            timings["one_session_s"] = time.perf_counter() - t1

        exp.timings = timings
        report = exp.report()
        report["weights_bytes"] = (stage / WEIGHTS_NAME).stat().st_size
        (stage / REPORT_NAME).write_text(json.dumps(report, indent=1, allow_nan=True, default=str))
        _move_into_place(stage, out_dir, [WEIGHTS_NAME] + [f.name for fs in files.values() for f in fs] + extra_names
                         + [REPORT_NAME], owned=owned)
        exp.report_path = out_dir / REPORT_NAME
        return exp
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        os.close(stage_fd)


def derive_shared_session(ort_graphs: Sequence[Path], stage: Path, result, sample_shape, conditioning) -> dict:
    """The CPU-target group graphs (in `stage`) as one shared graph + group constants, written into
    `stage`, and its parity against one session per group (each at the runner's level "all") on the
    parity inputs of every group plus one batch mixing all groups' timesteps split per group.
    Accepted when every output is equal or within PARITY_TOL relative L2; else removed and reported
    as skipped (the runner then opens one session per group)."""
    from adpdm_export.qdq_parity import _parity_inputs
    from engines import ort_one_session as O

    try:
        f = O.derive_one_session(ort_graphs, stage)
    except O.NotApplicable as e:
        return {"status": "skipped", "reason": str(e)}
    feeds = []
    for k in range(len(ort_graphs)):
        _, inputs = _parity_inputs(result, k, sample_shape, conditioning)
        feeds.append({n: v.numpy() for n, v in inputs.items()})
    try:
        checks = O.parity_vs_group_sessions(ort_graphs, f.graph, f.constants, feeds)
    except Exception as e:  # the shared graph does not load or run: the runner uses per-group sessions
        for p in (f.graph, f.weights, f.constants):
            p.unlink(missing_ok=True)
        return {"status": "skipped", "reason": f"the shared graph did not run: {str(e).strip().splitlines()[0][:300]}"}
    worst = max(c["rel_l2"] for c in checks)
    info = {"status": "ok", "graph": f.graph.name, "weights": f.weights.name, "constants": f.constants.name,
            "num_inputs": len(f.inputs), "constant_bytes_per_group": f.constant_bytes, "onnxruntime": f.onnxruntime,
            "machine": f.machine, "optimization": O.DERIVE_LEVEL,
            "parity": {"exact": all(c["exact"] for c in checks), "max_abs": max(c["max_abs"] for c in checks),
                       "rel_l2": worst, "groups": checks}}
    if worst > PARITY_TOL:
        for p in (f.graph, f.weights, f.constants):
            p.unlink(missing_ok=True)
        return {"status": "skipped", "reason": f"one session differs from the group sessions (rel L2 {worst:.2e})",
                "parity": info["parity"]}
    return info


def _move_into_place(stage: Path, out_dir: Path, names: Sequence[str], owned: Optional[Collection[str]] = None) -> None:
    """Invalidate the old manifest, drop stale group graphs (only those in `owned`, when given), then
    rename the staged files in."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    keep = set(names)
    for f in out_dir.iterdir():
        if GRAPH_RE.match(f.name) and f.name not in keep and f.is_file() and (owned is None or f.name in owned):
            f.unlink()
    for n in names:
        os.replace(stage / n, out_dir / n)


def export_qdq_for(
    loaded,
    result,
    out_dir: str | os.PathLike,
    target: str | Sequence[str] = "trt",
    manifest: bool = True,
    manifest_extra_files: Sequence[str] = (),
    fp_graph: Optional[str] = None,
    fp_weights: Optional[str] = None,
    **kw,
) -> QdqExport:
    """`export_qdq` for a `model_loading.LoadedModel`, then the manifest (unless manifest=False).

    Checks the calibration against the model (sha256, number of training timesteps).
    Keyword arguments go to `export_qdq` (opset, check, lint, fusion, parity_tol, say).
    """
    if result.model_sha256 != loaded.sha256:
        raise AdpdmError(
            f"calibration is for model {result.model_sha256[:12]}, this model is {loaded.sha256[:12]}: "
            "recalibrate for this model"
        )
    if int(result.num_train_timesteps) != int(loaded.num_train_timesteps):
        raise AdpdmError(
            f"calibration covers {result.num_train_timesteps} timesteps, the model's scheduler {loaded.num_train_timesteps}"
        )
    exp = export_qdq(
        loaded.unet, result, out_dir, sample_shape=loaded.sample_shape, conditioning=loaded.conditioning, target=target, **kw
    )
    if manifest:
        write_qdq_manifest(exp, loaded, result, extra_files=manifest_extra_files, fp_graph=fp_graph, fp_weights=fp_weights)
    return exp


__all__ = [
    "QdqExport",
    "REPORT_NAME",
    "WEIGHTS_NAME",
    "build_trt_template",
    "check_supported",
    "export_qdq",
    "export_qdq_for",
    "graph_name",
    "parse_targets",
]
