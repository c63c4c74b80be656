"""NVIDIA ModelOpt peer: `mtq.quantize` INT8 fake quant (max or histogram-percentile calibration)
on the benchmarks' scope, and its QDQ ONNX export for onnxruntime.

What a user of `nvidia-modelopt` would do, restricted to the scope every method shares: per-tensor
inputs and per-channel (axis 0) weights of Conv2d / Linear, no output / bmm / softmax quantizers,
the same FP layers (Scope.fp_layers). Calibration feeds every (x_t, t) of CalibData.batches(), the
budget every method gets. Traps of ModelOpt 0.47 found on the way are probed and written to
PeerModel.notes (see quantize()).

    peer = load_peer("modelopt_int8")
    pm = peer.quantize(unet, CalibData(traj), Scope(fp_layers=DEFAULT_FP_LAYERS), "max", workdir)
    pm.model(sample, timestep).sample      # fake-quant torch model
    pm.onnx_path                           # QDQ graph (W8A8 only), runs on onnxruntime CPU
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import io
import re
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from tools.bench_peers import CalibData, Log, PeerModel, Scope, missing_module

NAME = "modelopt"
BITS = ("W8A8", "W8A6")
VARIANTS = {
    "max": "mtq.quantize, max calibration (MaxCalibrator) of per-tensor Conv2d/Linear inputs",
    "percentile": "mtq.quantize, HistogramCalibrator 'percentile' (99.99, as ours) of per-tensor Conv2d/Linear inputs",
}

# The quantizer names ModelOpt gives the tensors we quantize (module name + suffix).
_INPUT, _WEIGHT = "input_quantizer", "weight_quantizer"

# filter_func_default of ModelOpt's examples/diffusers/quantization/utils.py: modules it keeps FP
# (applied with mtq.disable_quantizer after calibration). Only used to report how its scope differs.
EXAMPLE_FILTER = re.compile(
    r".*(time_emb_proj|time_embedding|conv_in|conv_out|conv_shortcut|add_embedding|pos_embed|"
    r"time_text_embed|context_embedder|norm_out|x_embedder).*"
)


def unavailable() -> Optional[str]:
    return missing_module("modelopt.torch.quantization")


def _percentile() -> float:
    from calibration.configs import DEFAULT_PERCENTILE

    return float(DEFAULT_PERCENTILE)


def fp_patterns(scope: Scope) -> tuple[str, ...]:
    """Module-name globs kept FP: the scope's, plus conv_in when scope.conv_in_fp says so."""
    pats = tuple(scope.fp_layers)
    if scope.conv_in_fp and not scope.is_fp("conv_in"):
        pats += ("conv_in",)
    return pats


def expected_modules(unet: nn.Module, scope: Scope) -> list[str]:
    """Conv2d / Linear modules whose input and weight ModelOpt must quantize."""
    pats = fp_patterns(scope)
    return [n for n in scope.quantized_modules(unet) if not any(fnmatch.fnmatchcase(n, p) for p in pats)]


def build_config(scope: Scope, variant: str) -> dict[str, Any]:
    """ModelOpt quantize config as an ordered entry list: disable everything first, then enable the
    Conv2d / Linear input and weight quantizers, then disable the FP layers' again.

    The list form matters: ModelOpt 0.47 turns a legacy dict's "default" key into a "*" entry in
    dict position, so the diffusers example's dict (enables first, "default" last) disables every
    quantizer (see legacy_config_probe)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; known: {', '.join(VARIANTS)}")
    w_cfg = {"num_bits": int(scope.w_bits), "axis": 0}
    a_cfg: dict[str, Any] = {"num_bits": int(scope.a_bits), "axis": None}
    if variant == "percentile":
        a_cfg["calibrator"] = "histogram"
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Conv2d", "nn.Linear"):
        entries.append({"quantizer_name": f"*{_WEIGHT}", "parent_class": parent, "cfg": dict(w_cfg)})
        entries.append({"quantizer_name": f"*{_INPUT}", "parent_class": parent, "cfg": dict(a_cfg)})
    # A module glob p matches module m iff "p.<suffix>" matches "m.<suffix>" (the suffix is literal).
    for p in fp_patterns(scope):
        entries.append({"quantizer_name": f"{p}.{_INPUT}", "enable": False})
        entries.append({"quantizer_name": f"{p}.{_WEIGHT}", "enable": False})
    # "max": ModelOpt's max_calibrate. "percentile": no built-in algorithm computes a histogram
    # percentile (max_calibrate calls compute_amax() without the method argument), so the
    # calibration is run by _calibrate_percentile with ModelOpt's own calibrator objects.
    return {"quant_cfg": entries, "algorithm": "max" if variant == "max" else None}


def enabled_quantizers(model: nn.Module) -> dict[str, list[str]]:
    """Module names with an enabled input / weight quantizer, and any other enabled quantizer."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    out: dict[str, list[str]] = {"input": [], "weight": [], "other": []}
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled:
            continue
        parent, _, leaf = name.rpartition(".")
        key = {"input_quantizer": "input", "weight_quantizer": "weight"}.get(leaf, "other")
        out[key].append(parent if key != "other" else name)
    return out


def check_scope(model: nn.Module, expected: list[str]) -> int:
    """Raise unless exactly the expected modules have their input and weight quantizers enabled."""
    en = enabled_quantizers(model)
    want = set(expected)
    problems = []
    for key in ("input", "weight"):
        got = set(en[key])
        if got != want:
            problems.append(f"{key} quantizers: {len(got)} enabled, {len(want)} expected "
                            f"(missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]})")
    if en["other"]:
        problems.append(f"other quantizers enabled: {en['other'][:5]}")
    if problems:
        raise RuntimeError("ModelOpt quantized a different scope than asked: " + "; ".join(problems))
    return len(en["input"])


def _forward_loop(calib: CalibData):
    def loop(model: nn.Module) -> None:
        with torch.no_grad():
            for x, t, cond in calib.batches():
                model(x, t, **cond)

    return loop


def _calibrate_percentile(model: nn.Module, forward_loop, percentile: float) -> None:
    """ModelOpt's stats collection, then amax from each quantizer's own calibrator: the
    HistogramCalibrator's 'percentile' method for inputs, the MaxCalibrator (per channel) for weights."""
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    enable_stats_collection(model)
    forward_loop(model)
    for _, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or not q.is_enabled:
            continue
        cal = getattr(q, "_calibrator", None)
        if cal is None:
            continue
        if isinstance(cal, HistogramCalibrator):
            q.load_calib_amax("percentile", percentile=percentile)
        else:
            q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def legacy_config_probe(unet: nn.Module) -> str:
    """Trap 1, measured: the diffusers example's legacy-dict INT8 config on a copy of `unet`."""
    import modelopt.torch.quantization as mtq

    legacy = {
        "quant_cfg": {
            "*weight_quantizer": {"num_bits": 8, "axis": 0},
            "*input_quantizer": {"num_bits": 8, "axis": 0},
            "*output_quantizer": {"enable": False},
            "default": {"enable": False},
        },
        "algorithm": None,
    }
    from modelopt.torch.quantization.nn import TensorQuantizer

    m = copy.deepcopy(unet)
    raised = ""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            mtq.quantize(m, legacy, None)
        except RuntimeError:  # 0.47 refuses a config under which no weight quantizer is enabled
            raised = "; mtq.quantize then raises RuntimeError 'no weight quantizer is enabled'"
    total = sum(isinstance(q, TensorQuantizer) for q in m.modules())
    n = sum(len(v) for v in enabled_quantizers(m).values())
    return (f"trap 1 (hit): ModelOpt 0.47 applies the legacy 'default' key of the diffusers example's INT8 config "
            f"in dict order (after the enables), so {n} of {total} quantizers stay enabled{raised}; we pass an "
            f"ordered list with '*' disabled first and assert the enabled set")


@functools.lru_cache(maxsize=1)
def mse_trap_probe() -> str:
    """Trap 3, measured: HistogramCalibrator 'mse' vs 'percentile' amax on N(0, 1) data."""
    from modelopt.torch.quantization.calib.histogram import HistogramCalibrator

    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    cal = HistogramCalibrator(num_bits=8)
    cal.collect(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mse = float(cal.compute_amax("mse"))
    pct = float(cal.compute_amax("percentile", percentile=_percentile()))
    return (f"trap 3 (avoided): ModelOpt's histogram 'mse' method passes num_bits into fake_tensor_quant's "
            f"new bias argument: on N(0,1) data it gives amax {mse:.3f} (percentile {_percentile()}: {pct:.3f}, "
            f"max {float(x.abs().max()):.3f}), so it is not used")


def _scope_note(unet: nn.Module, scope: Scope, expected: list[str]) -> str:
    convlin = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ex_fp = {n for n in convlin if EXAMPLE_FILTER.match(n)}
    ours = set(expected)
    ex_only = sorted(n for n in ex_fp if n in ours)
    ours_only = sorted(n for n in convlin if n not in ours and n not in ex_fp)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in ex_only})
    return (f"scope: {len(expected)} of {len(convlin)} Conv2d/Linear quantized (inputs per tensor, weights per "
            f"channel), FP = {', '.join(fp_patterns(scope))}; ModelOpt's diffusers example filter_func_default "
            f"would also keep {len(ex_only)} of ours FP ({', '.join(kinds) or 'none'}) and would quantize "
            f"{len(ours_only)} we keep FP ({', '.join(ours_only[:4]) or 'none'}), and disables them only after "
            f"calibration; our scope is used so that every method has the same one")


def _ort_parity(model: nn.Module, onnx_path: Path, inputs: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The exported graph on onnxruntime CPU (default optimizations) vs the fake-quant torch model."""
    from adpdm_export.onnx_export import UNetForExport
    from engines.ort_backend import OrtNoisePredictor, make_session

    names = list(inputs)
    cond = {k: inputs[k] for k in names[2:]}
    pred = OrtNoisePredictor(make_session(onnx_path, providers=["CPUExecutionProvider"], threads=1))
    got = pred(inputs["sample"], inputs["timestep"], **cond)
    with torch.no_grad():
        ref = UNetForExport(model, tuple(cond)).eval()(inputs["sample"], inputs["timestep"], *cond.values())
    def rel(sel):
        return float((got[sel] - ref[sel]).norm() / ref[sel].norm().clamp_min(1e-12))

    t = inputs["timestep"]
    return {
        "ort_vs_torch_rel_l2": rel(slice(None)),
        "ort_vs_torch_rel_l2_by_t": {int(v): rel(t == v) for v in torch.unique(t).tolist()},
        "ort_vs_torch_max_abs": float((got - ref).abs().max()),
        "ort_parity_batch": int(ref.shape[0]),
    }


def export_qdq_onnx(
    model: Union[PeerModel, nn.Module],
    path: Union[str, Path],
    example_inputs: Union[Mapping[str, torch.Tensor], tuple],
) -> Path:
    """The ModelOpt fake-quant model as a QDQ ONNX graph (TorchScript exporter, opset 19, inputs
    sample / timestep [/ conditioning], output out_sample, dynamic batch; weights in one external
    file beside it) via adpdm_export.onnx_export.export_onnx, as for our FP graph. ModelOpt's
    quantizers emit QuantizeLinear / DequantizeLinear through their own ONNX symbolic, which only
    supports 8 bits: W8A6 models raise ValueError."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    from adpdm_export.onnx_export import export_onnx

    module = model.model if isinstance(model, PeerModel) else model
    bad = sorted({int(q.num_bits) for q in module.modules()
                  if isinstance(q, TensorQuantizer) and q.is_enabled and q.num_bits != 8})
    if bad:
        raise ValueError(f"ModelOpt's INT8 ONNX export needs 8-bit quantizers; this model has {bad}-bit ones")
    if not isinstance(example_inputs, Mapping):
        example_inputs = dict(zip(("sample", "timestep"), example_inputs))
    module.eval()
    with contextlib.redirect_stdout(io.StringIO()):
        return export_onnx(module, path, example_inputs).graph


def _example_inputs(calib: CalibData, n: int = 4) -> dict[str, torch.Tensor]:
    """n samples of the first and n of the last calibration step (high t and t ~ 0) in one batch."""
    first = last = None
    for batch in calib.batches():
        if first is None:
            first = batch
        last = batch
    parts = [first] if last is first else [first, last]
    out = {"sample": torch.cat([p[0][:n] for p in parts]), "timestep": torch.cat([p[1][:n] for p in parts])}
    for k in first[2]:
        out[k] = torch.cat([p[2][k][:n] for p in parts])
    return out


def quantize(unet: nn.Module, calib: CalibData, scope: Scope, variant: str, workdir, log: Log = print) -> PeerModel:
    """ModelOpt INT8 (W8A8) or W8A6 fake quant of a deep copy of `unet`, calibrated on every batch of
    `calib`; with W8A8 also its QDQ ONNX export in `workdir` (PeerModel.onnx_path) checked against
    the torch model on onnxruntime."""
    why = unavailable()
    if why:
        raise RuntimeError(why)
    import modelopt.torch.quantization as mtq

    config = build_config(scope, variant)
    model = copy.deepcopy(unet).eval()
    expected = expected_modules(unet, scope)
    notes = [legacy_config_probe(unet), _scope_note(unet, scope, expected)]
    loop = _forward_loop(calib)
    log(f"[{NAME}] {variant} W{scope.w_bits}A{scope.a_bits}: calibrating on {calib.num_forward_passes} (x_t, t) pairs")
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if variant == "max":
            mtq.quantize(model, config, loop)
        else:
            mtq.quantize(model, config, None)  # quantizers inserted, no calibration
            _calibrate_percentile(model, loop, _percentile())
    calibration_s = time.perf_counter() - t0
    n = check_scope(model, expected)
    notes.append(
        "trap 2 (avoided): the diffusers example's 'min-mean' PercentileCalibrator (examples/, not the package) "
        "divides summed per-step amax by the step count rather than the number of passes, so it is not used; "
        + ("'max' is ModelOpt's max_calibrate" if variant == "max" else
           f"'percentile' is ModelOpt's HistogramCalibrator at {_percentile()} (as ours), amax loaded per quantizer "
           "because max_calibrate calls compute_amax() without the method ModelOpt's histogram calibrator needs"))
    notes.append(mse_trap_probe())
    if scope.a_bits != 8:
        notes.append(f"A{scope.a_bits}: input quantizers with num_bits={scope.a_bits} (ModelOpt's CPU fake quant "
                     f"takes any integer width; levels -{2 ** (scope.a_bits - 1)}..{2 ** (scope.a_bits - 1) - 1}, "
                     f"scale amax/{2 ** (scope.a_bits - 1) - 1}, the same grid as ours); no ONNX graph (its INT8 "
                     "ONNX export asserts num_bits == 8)")
    extra: dict[str, Any] = {"enabled_quantizers": n, "enabled_weight_quantizers": n, "variant": variant,
                             "modelopt_version": _version(), "percentile": _percentile() if variant == "percentile" else None}
    onnx_path = None
    if scope.w_bits == 8 and scope.a_bits == 8:
        tag = "" if scope.conv_in_fp else "+conv_in"
        target = Path(workdir) / f"modelopt-{variant}{tag}-W8A8.onnx"
        try:
            inputs = _example_inputs(calib)
            onnx_path = export_qdq_onnx(model, target, inputs)
            par = _ort_parity(model, onnx_path, inputs)
            extra.update(par)
            notes.append(f"QDQ ONNX (opset 19, TorchScript exporter) on onnxruntime CPU vs the fake-quant torch model, "
                         f"{par['ort_parity_batch']} inputs at the first and last calibration steps: rel-L2 "
                         + ", ".join(f"{v:.4f} at t={k}" for k, v in sorted(par["ort_vs_torch_rel_l2_by_t"].items(), reverse=True))
                         + f", max abs {par['ort_vs_torch_max_abs']:.4f} (float differences flip roundings at "
                         "quantizer boundaries)")
        except Exception as e:  # the peer still counts for quality; bench_speed reports the missing graph
            onnx_path = None
            notes.append(f"QDQ ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
            log(f"[{NAME}] ONNX export failed: {e}")
    log(f"[{NAME}] {variant}: {n} modules quantized, calibration {calibration_s:.1f} s")
    return PeerModel(model=model, calibration_s=calibration_s, onnx_path=onnx_path, notes=notes, extra=extra)


def _version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except Exception:
        return None
