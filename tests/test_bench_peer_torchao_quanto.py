"""The torchao PT2E and optimum-quanto benchmark peers on a tiny UNet: they quantize exactly the
scope they claim, calibrate on every batch, and give output near FP but not FP. Both libraries are
optional (the bench extra, not installed in CI), so each test skips with the reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from calibration.qconfig import DEFAULT_FP_LAYERS  # noqa: E402
from calibration.trajectories import generate_trajectories  # noqa: E402
from tests.tiny_models import tiny_unet2d  # noqa: E402
from tools.bench_peers import CalibData, Scope, quanto_w8a8, torchao_pt2e  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def setup():
    unet = tiny_unet2d()
    calib = generate_trajectories(unet, SCHED, num_samples=3, num_steps=4, seed=0)
    heldout = generate_trajectories(unet, SCHED, num_samples=3, num_steps=4, seed=1000)
    return unet, CalibData(calib, batch_size=2), heldout


def _scope(conv_in_fp: bool) -> Scope:
    return Scope(fp_layers=tuple(p for p in DEFAULT_FP_LAYERS if conv_in_fp or p != "conv_in"), conv_in_fp=conv_in_fp)


def _rel_err(model, heldout) -> float:
    """Noise-prediction relative L2 vs FP on the held-out x_t (batch 3: pads/chunks nothing special)."""
    num = den = 0.0
    for i in range(heldout.num_steps):
        x = heldout.x_t[i]
        t = torch.full((x.shape[0],), int(heldout.timesteps[i]), dtype=torch.int64)
        out = model(x, t)
        out = out.sample if hasattr(out, "sample") else out
        num += float(((out.float() - heldout.eps[i]) ** 2).sum())
        den += float((heldout.eps[i] ** 2).sum())
    return (num / den) ** 0.5


def _quantize_on_a_copy(peer, library: str, unet, calib, scope, variant):
    """peer.quantize(...) after skipping where `library` is missing; checks the caller's UNet is untouched."""
    pytest.importorskip(library, reason=f"{library} is a bench extra, not installed here")
    why = peer.unavailable()
    if why:
        pytest.skip(why)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    pm = peer.quantize(unet, calib, scope, variant, None, log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), before.values()))  # worked on a copy
    return pm


@pytest.mark.parametrize("conv_in_fp", [True, False])
def test_torchao_pt2e_quantizes_exactly_the_scope(setup, conv_in_fp):
    unet, calib, heldout = setup
    scope = _scope(conv_in_fp)
    pm = _quantize_on_a_copy(torchao_pt2e, "torchao", unet, calib, scope, "x86-inductor")
    want = scope.quantized_modules(unet)
    assert pm.extra["quantized_modules"] == len(want) == pm.extra["in_scope_modules"]
    assert ("conv_in" in want) == (not conv_in_fp)
    assert pm.extra["weight_only_modules"] == [] and pm.extra["act_only_modules"] == []
    assert pm.extra["calibration_passes"] == calib.num_forward_passes
    # a batch of 1 (padded to the export's minimum) and one over the export's maximum (split) agree row
    # by row: up to rounding ties that batch-size-dependent float32 kernels flip (<= 3e-2 rel-L2
    # measured); a mixed-up row or leaked padding is ~1
    x, t = heldout.x_t[0], torch.full((3,), int(heldout.timesteps[0]), dtype=torch.int64)
    full = pm.model(x, t)

    def row_rel(a, b):
        return ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max()

    assert row_rel(pm.model(x[:1], t[:1]), full[:1]) < 0.2
    big = pm.model(x.repeat(22, 1, 1, 1), t.repeat(22))
    assert big.shape[0] == 66 > torchao_pt2e.MAX_BATCH
    assert row_rel(big[-3:], full) < 0.2
    err = _rel_err(pm.model, heldout)
    assert 1e-4 < err < 0.2, err
    assert pm.calibration_s > 0 and pm.onnx_path is None


@pytest.mark.parametrize("variant", ["w8a8", "w8a8-inputs"])
def test_quanto_scope_and_placement(setup, variant):
    unet, calib, heldout = setup
    scope = _scope(conv_in_fp=True)
    pm = _quantize_on_a_copy(quanto_w8a8, "optimum.quanto", unet, calib, scope, variant)
    want = scope.quantized_modules(unet)
    assert pm.extra["weight_quantized_modules"] == len(want) == pm.extra["in_scope_modules"]
    assert pm.extra["calibration_passes"] == calib.num_forward_passes
    inputs = set(pm.extra["input_quantized_modules"])
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n in want}
    if variant == "w8a8":  # quanto's own placement: Linear inputs only, Conv2d inputs stay FP
        assert inputs == linears
    else:  # our scope: every in-scope input, no outputs
        assert inputs == set(want) and pm.extra["output_quantized_modules"] == []
    err = _rel_err(pm.model, heldout)
    assert 1e-4 < err < 0.2, err


def test_torchao_pt2e_dynamic_batch_with_conditioning():
    """A cross-attention UNet fed guided calibration (both halves' encoder_hidden_states): the export keeps a
    dynamic batch (its *cond specs nested as the signature's; a flat spec failed and fell back to a fixed
    batch), every pass is calibrated, and the converted graph uses the conditioning."""
    from tests.test_bench_peer_text import check_uses_conditioning, guided_setup

    unet, traj, prompts, negative = guided_setup(uncond_value=0.0)
    calib = CalibData(traj, batch_size=4)
    pm = _quantize_on_a_copy(torchao_pt2e, "torchao", unet, calib, _scope(True), "x86-inductor")
    assert not any("dynamic-batch export failed" in n for n in pm.notes), pm.notes
    assert pm.extra["batch_range"] == [torchao_pt2e.MIN_BATCH, torchao_pt2e.MAX_BATCH]
    assert pm.extra["calibration_passes"] == calib.num_forward_passes == 3 * 2 * 3
    check_uses_conditioning(pm.model, unet, traj, prompts, negative)
