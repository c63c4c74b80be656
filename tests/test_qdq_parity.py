"""Parity of the QDQ group graphs (`adpdm_export.qdq_parity`): per group and target against the
wrapper (UNet2DModel, UNet2DConditionModel), teacher-forced and free-running; the rounding-tie
criterion; a wrong scale or another group's graph is a mismatch naming the quantizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper as nh

from adpdm_export.qdq_export import export_qdq
from adpdm_export.qdq_parity import PARITY_TOL, TIE_MAX_FRACTION, _first_divergence, check_group_graph
from qdq_fixtures import U2C, U2D, quick_result
from tiny_models import tiny_cond_unet


pytestmark = pytest.mark.usefixtures("one_thread")


def _checks(exp, target):
    return [c for c in exp.checks if c.target == target]


@pytest.mark.parametrize("which, target", [("u2d", "trt"), ("u2d", "ort"), ("u2c", "trt")])
def test_parity_per_group(which, target, request):
    unet, result, exp = request.getfixturevalue(f"{which}_export")
    checks = _checks(exp, target)
    assert [c.group for c in checks] == list(range(result.num_groups))
    for c in checks:
        # every timestep used belongs to the group
        assert all(int(result.timestep_to_group[t]) == c.group for t in c.timesteps)
        # teacher-forced: with onnxruntime's quantizer inputs, every quantizer gives the same values
        # and every quantizer input and the output agree up to float noise
        assert c.forced_rel_l2 < 1e-5, c
        assert c.forced["forced_bad_outputs"] == 0 and c.forced["forced_worst_input_rel_l2"] < 1e-5, c.forced
        # free-running: within the tolerance, or beyond it only after a rounding tie: one grid step, on
        # a small fraction of the tensor (how many values sit on a tie depends on the CPU's kernels)
        assert c.verdict in ("exact", "within-tolerance", "ties"), c
        if c.parity_rel_l2 > PARITY_TOL:
            d = c.divergence
            assert d["verdict"] == "ties" and d["max_steps"] < 1.001, d
            assert 1 <= d["elements_differing"] <= TIE_MAX_FRACTION * d["elements"], d
        # quantized vs FP: an honest INT8 error, not zero, not garbage
        assert 1e-3 < c.fp_rel_l2 < 0.3, c
        assert abs(c.fp_rel_l2 - c.sim_fp_rel_l2) < 0.05


@pytest.mark.slow
def test_parity_cond_unet_ort_target(tmp_path):
    unet = tiny_cond_unet()
    result = quick_result(unet, **U2C)
    exp = export_qdq(unet, result, tmp_path, target="ort", **U2C)
    for c in exp.checks:
        assert c.forced_rel_l2 < 1e-5 and c.ok, c
    assert exp.fusion["ort"]["ratio"] >= 0.95


def test_a_wrong_scale_is_a_mismatch_not_a_tie(u2d_export, tmp_path):
    """A group graph carrying another scale for one quantizer fails the check, naming it."""
    unet, result, exp = u2d_export
    from calibration.quant_unet import quantize_model

    src = exp.graphs["trt"][0]
    m = onnx.load(str(src), load_external_data=False)
    victim = "up_blocks.1.resnets.0.conv1.input_quantizer.scale"
    for t in m.graph.initializer:
        if t.name == victim:
            t.CopyFrom(nh.from_array(np.float32(nh.to_array(t) * 1.02), victim))
    bad = src.parent / "bad.g0.onnx"
    bad.write_bytes(m.SerializeToString())
    try:
        qm = quantize_model(unet, result=result)
        c = check_group_graph(bad, qm, unet, result, 0, "trt", **U2D)
    finally:
        bad.unlink()
    assert c.verdict == "mismatch"
    assert c.divergence["quantizer"] == victim[: -len(".scale")]
    assert c.forced["forced_bad_outputs"] > 0


def _tie_case(n_ties: int, size: int = 10_000, scale: float = 0.1, steps: int = 1):
    """One quantizer whose onnxruntime input sits float noise above `n_ties` rounding boundaries."""
    xt = np.linspace(-5.0, 5.0, size)
    xt[:n_ties] = (np.arange(n_ties) % 40 + 0.5) * scale  # exactly on a boundary (x / s = k + 0.5)
    xo = xt.copy()
    xo[:n_ties] += 1e-9  # float noise: onnxruntime's input lands just above it
    yt = np.floor(xt / scale + 0.5 - 1e-12) * scale  # the simulation rounds down at the tie
    yo = yt.copy()
    yo[:n_ties] += steps * scale  # onnxruntime `steps` grid steps up
    points = [("q", scale, "x", "y")]
    got = {"x": xo.astype(np.float64), "y": yo}
    captured = {"q": (torch.from_numpy(xt), torch.from_numpy(yt))}
    return _first_divergence(points, got, captured, group=0)


def test_tie_criterion_accepts_rare_ties_and_refuses_many():
    """A few one-step ties are float noise; the same ties on more than TIE_MAX_FRACTION of the tensor
    are not (a wrong scale moves many values), and a two-step difference is never a tie."""
    assert _tie_case(3)["verdict"] == "ties"
    assert _tie_case(int(TIE_MAX_FRACTION * 10_000))["verdict"] == "ties"
    many = _tie_case(int(TIE_MAX_FRACTION * 10_000) + 1)
    assert many["verdict"] == "mismatch" and "ties" in many["reason"]
    assert _tie_case(3, steps=2)["verdict"] == "mismatch"


def test_group_graph_checked_against_another_group_is_a_mismatch(u2d_export):
    unet, result, exp = u2d_export
    from calibration.quant_unet import quantize_model

    qm = quantize_model(unet, result=result)
    c = check_group_graph(exp.graphs["trt"][1], qm, unet, result, 0, "trt", **U2D)
    assert c.verdict == "mismatch"


def test_sim_in_precision_equals_a_cast_copy(tiny_unet):
    """The FP16 simulation cast while copying equals the copy cast after (the old way), tensor by tensor,
    and leaves the FP32 wrapper alone."""
    import copy

    from adpdm_export.high_precision import tiny
    from adpdm_export.qdq_parity import sim_in_precision
    from calibration.qconfig import QuantConfig
    from calibration.quant_unet import activation_quantizers, quantize_model

    q = quantize_model(tiny_unet, QuantConfig(), share_weights=True)
    for k, aq in enumerate(activation_quantizers(q).values()):
        aq.set_scale(1e-9 if k == 0 else 0.05 + 0.01 * k)
    before = {n: v.clone() for n, v in q.state_dict().items()}
    want = copy.deepcopy(q)
    for aq in activation_quantizers(want).values():
        aq.set_scale(aq.effective_scale().detach().clamp_min(tiny("fp16")))
    want = want.to(torch.float16).state_dict()
    got = sim_in_precision(q, "fp16").state_dict()
    assert list(got) == list(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n
    assert all(torch.equal(v, before[n]) and v.dtype == before[n].dtype for n, v in q.state_dict().items())


# --------------------------------------------------------------------------- bounded parity inputs


def test_parity_sample_shape_caps_large_latents():
    from types import SimpleNamespace

    from adpdm_export.qdq_parity import PARITY_MAX_SIDE, parity_sample_shape

    def unet(levels):
        return SimpleNamespace(config=SimpleNamespace(block_out_channels=(8,) * levels))

    assert PARITY_MAX_SIDE == 16
    assert parity_sample_shape((4, 64, 64), unet(4)) == (4, 16, 16)  # SD-1.5: factor 8
    assert parity_sample_shape((4, 128, 96), unet(3)) == (4, 16, 16)  # SDXL: factor 4
    assert parity_sample_shape((4, 32, 8), unet(4)) == (4, 16, 8)  # a small side stays
    assert parity_sample_shape((1, 16, 16), unet(2)) == (1, 16, 16)
    assert parity_sample_shape((4, 64, 64), unet(6)) == (4, 64, 64)  # factor 32: no smaller valid side


def test_large_latents_checked_at_the_capped_side(tmp_path, monkeypatch):
    """An export for 32x32 latents runs its parity checks (and the one-session check) at 16x16, says so
    in the report, and the checks hold there."""
    from adpdm_export import qdq_export
    from tiny_models import tiny_unet2d

    unet = tiny_unet2d()
    shape = dict(sample_shape=(1, 32, 32), conditioning={})
    result = quick_result(unet, groups=2, **shape)
    seen = []
    real = qdq_export.check_group_graph

    def spy(graph, qmodel, fp_unet, result, group, target, sample_shape, *a, **kw):
        seen.append(tuple(sample_shape))
        return real(graph, qmodel, fp_unet, result, group, target, sample_shape, *a, **kw)

    monkeypatch.setattr(qdq_export, "check_group_graph", spy)
    exp = export_qdq(unet, result, tmp_path, target="ort", **shape)
    assert seen == [(1, 16, 16)] * 2
    assert exp.report()["parity_sample_shape"] == [1, 16, 16]
    assert exp.one_session["status"] == "ok"
    assert all(c.verdict in ("exact", "within-tolerance", "ties") for c in exp.checks)
