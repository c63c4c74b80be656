"""The peers on the text-to-image path (tools/bench_quality.py --model reference-text): the guided
calibration budget reaches them with both guidance halves and their encoder_hidden_states, the
onnxruntime peer's graph takes encoder_hidden_states and is calibrated on both halves, and the
quality JSON keeps each model's rows apart. A tiny cross-attention UNet; onnxruntime only (the other
peer libraries are the bench extra, tested in test_bench_peer_torchao_quanto.py where installed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from calibration.qconfig import DEFAULT_FP_LAYERS  # noqa: E402
from calibration.trajectories import generate_trajectories  # noqa: E402
from tests.tiny_models import tiny_cond_unet  # noqa: E402
from tools.bench_peers import CalibData, Scope, ort_static  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}
SEEDS, STEPS, TOKENS, WIDTH = 3, 3, 5, 24
UNCOND_VALUE = 3.0  # the unconditional half's embedding: far larger than the prompts', so its range shows


def guided_setup(uncond_value: float = UNCOND_VALUE):
    """A tiny cross-attention UNet, guided calibration trajectories (2 prompts in turn, a constant
    'negative prompt' embedding) and the embeddings themselves (also test_bench_peer_torchao_quanto's)."""
    unet = tiny_cond_unet()
    g = torch.Generator().manual_seed(0)
    prompts = 0.1 * torch.randn(2, TOKENS, WIDTH, generator=g)
    negative = torch.full((1, TOKENS, WIDTH), uncond_value)
    traj = generate_trajectories(unet, SCHED, num_samples=SEEDS, num_steps=STEPS, seed=0,
                                 cond={"encoder_hidden_states": prompts},
                                 uncond={"encoder_hidden_states": negative}, guidance_scale=5.0)
    return unet, traj, prompts, negative


def check_uses_conditioning(model, unet, traj, prompts, negative) -> None:
    """A peer's quantized `model` is near the FP UNet with the prompts, and another embedding changes
    its output (the conditioning reaches it, not a constant baked in at export)."""
    x = traj.x_t[1, :2].float()
    t = torch.full((2,), int(traj.timesteps[1]), dtype=torch.int64)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=prompts[:2]).sample
    got = model(x, t, encoder_hidden_states=prompts[:2])
    assert float((got - ref).norm() / ref.norm()) < 0.2
    other = model(x, t, encoder_hidden_states=negative.expand(2, -1, -1).contiguous())
    assert float((other - got).norm() / got.norm()) > 0.01


@pytest.fixture(scope="module")
def guided():
    return guided_setup()


def test_calib_batches_carry_both_guidance_halves(guided):
    unet, traj, prompts, negative = guided
    calib = CalibData(traj, batch_size=4)
    assert traj.guided and traj.num_samples == 2 * SEEDS
    batches = list(calib.batches())
    # every UNet item of every step once: 2 halves x 3 seeds = 6 items a step, in chunks of 4
    assert sum(x.shape[0] for x, _, _ in batches) == calib.num_forward_passes == STEPS * 2 * SEEDS
    ehs = torch.cat([c["encoder_hidden_states"] for _, _, c in batches])
    xs = torch.cat([x for x, _, _ in batches])
    assert torch.equal(xs, traj.x_t.reshape(-1, *traj.x_t.shape[2:]).float())
    per_step = ehs.view(STEPS, 2 * SEEDS, TOKENS, WIDTH)
    for s in range(STEPS):
        for j in range(SEEDS):  # item 2j: seed j's unconditional half, 2j + 1: its prompt (prompts in turn)
            assert torch.equal(per_step[s, 2 * j], negative[0])
            assert torch.equal(per_step[s, 2 * j + 1], prompts[j % 2])
    # timesteps: one per step, every item of a step the same
    ts = torch.cat([t for _, t, _ in batches]).view(STEPS, 2 * SEEDS)
    assert torch.equal(ts[:, 0], traj.timesteps.long()) and bool((ts == ts[:, :1]).all())


@pytest.mark.skipif(ort_static.unavailable() is not None, reason=str(ort_static.unavailable()))
def test_ort_static_takes_and_calibrates_encoder_hidden_states(guided, tmp_path):
    unet, traj, prompts, negative = guided
    calib = CalibData(traj, batch_size=4)
    pm = ort_static.quantize(unet, calib, Scope(fp_layers=DEFAULT_FP_LAYERS), "minmax", tmp_path, log=lambda s: None)
    fp_graph = onnx.load(pm.extra["fp_graph"], load_external_data=False)
    assert [i.name for i in fp_graph.graph.input] == ["sample", "timestep", "encoder_hidden_states"]
    m = onnx.load(str(pm.onnx_path), load_external_data=False)
    inits = {i.name: i for i in m.graph.initializer}
    # the cross-attention K/V projections read encoder_hidden_states through one Q/DQ pair whose range is
    # the calibration's over BOTH halves: the negative prompt's 3.0, not the prompts' ~0.3
    q = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "encoder_hidden_states"]
    assert len(q) == 1
    scale = float(onnx.numpy_helper.to_array(inits[q[0].input[1]]))
    assert UNCOND_VALUE / 128 <= scale <= UNCOND_VALUE / 126, scale
    ehs_q = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q[0].output[0]}
    readers = [n.name for n in m.graph.node if any(i in ehs_q for i in n.input)]
    assert readers and all("attn2/to_k" in r or "attn2/to_v" in r for r in readers), readers
    check_uses_conditioning(pm.model, unet, traj, prompts, negative)


def test_model_section_keeps_models_apart():
    from bench_quality import model_section

    whole = {"rows": {"W8A8/ours:percentile": {}}, "meta": {"model": "reference"}, "unavailable": {}}
    text = model_section(whole, "reference-text")
    text["rows"]["W8A8/ours:adpdm-G4"] = {"x": 1}
    assert whole["models"]["reference-text"]["rows"] == {"W8A8/ours:adpdm-G4": {"x": 1}}
    assert set(whole["rows"]) == {"W8A8/ours:percentile"}  # the reference rows are untouched
    assert model_section(whole, "reference") is whole
    # --fresh empties only the model it runs
    assert model_section(whole, "reference-text", fresh=True)["rows"] == {}
    assert set(whole["rows"]) == {"W8A8/ours:percentile"}
    model_section(whole, "reference", fresh=True)
    assert whole["rows"] == {} and "meta" not in whole and "models" in whole


def test_text_model_page_section():
    """The text path's table: one row a method, the per-sample figures, failures and missing peers said."""
    from bench_quality import render_markdown

    row = {"bits": "W8A8", "family": "ours", "variant": "adpdm-G4", "conv_in_fp": True, "own_scope": None,
           "error": None, "prompt_fidelity": 0.953, "prompt_fidelity_fp": 0.969, "prompt_agreement": 0.984,
           "prompt_prob_median": 0.99, "prompt_prob_p10": 0.71, "psnr_vs_fp_db_median": 41.5,
           "psnr_vs_fp_db_min": 28.25, "fd": 180.0, "fd_fp": 177.0, "noise_rel_l2_median": 0.0162,
           "noise_rel_l2_max": 0.0224, "calibration_s": 45.0, "notes": []}
    peer = {**row, "family": "modelopt", "variant": "max", "noise_rel_l2_median": 0.03, "noise_rel_l2_max": 0.05,
            "psnr_vs_fp_db_min": 20.0, "notes": ["a trap"]}
    failed = {**row, "family": "quanto", "variant": "w8a8", "error": "RuntimeError: boom"}
    data = {"models": {"reference-text": {"meta": {"model": "reference-text", "guidance_scale": 5.0, "commands": ["c1"]},
                                          "rows": {"a": row, "b": peer, "c": failed},
                                          "unavailable": {"torchao-pt2e": "not installed"}}}}
    page = render_markdown(data, Path("/nonexistent"), "img")
    assert "### reference-text: the text-to-image path (guidance 5)" in page
    assert "| ours:adpdm-G4 | shared | FP | 0.953 (0.969) | 0.984 | 0.990 / 0.710 | 41.50 / 28.25 | 180.0 (177.0) | " \
           "0.0162 / 0.0224 | 45 |" in page
    assert "| quanto:w8a8 | shared | FP | failed: RuntimeError: boom |" in page
    assert "- torchao-pt2e: not installed" in page and "a trap." in page
    assert "best peer on the same scope, modelopt:max, 0.0300 / 0.0500" in page
    assert "### W8A8" not in page  # no reference rows: no reference tables


def test_eval_reference_text_refuses_mixing_guidance(tmp_path):
    """Results at guidance 5 in the JSON and --guidance-scale 1 asked: refused before any calibration."""
    store = tmp_path / "r.json"
    store.write_text(json.dumps({"W8A8 adpdm G4": {"guidance_scale": 5.0}}))
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "eval_reference_text.py"), "--guidance-scale", "1",
                        "--json", str(store), "--work", str(tmp_path / "work")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "another guidance scale" in r.stderr
    assert not (tmp_path / "work").exists()


def test_peers_filter_by_name_or_variant_and_sections_by_guidance():
    """--peers NAME keeps every variant, NAME:VARIANT one; a run at another guidance has its own section."""
    import argparse

    from bench_quality import plan, section_name

    args = argparse.Namespace(no_peers=False, bits=["W8A8", "W8A6"], conv_in=[True], ours=["adpdm-G4"], quick=False,
                              peers=["ort-static:percentile", "modelopt"])
    got = {(r["bits"], r["family"], r["variant"]) for r in plan(args) if r["family"] != "ours"}
    assert got == {("W8A8", "ort-static", "percentile"), ("W8A8", "modelopt", "max"), ("W8A8", "modelopt", "percentile"),
                   ("W8A6", "modelopt", "max"), ("W8A6", "modelopt", "percentile")}
    assert section_name("reference-text", None) == "reference-text"
    assert section_name("reference-text", 1.0) == "reference-text@guidance1"


def test_other_unconditional_model_keeps_the_reference_tables(tmp_path):
    """A section of another unconditional model (no guidance in its meta) is drawn with the reference
    tables under its own heading, not the text table (whose per-sample keys it lacks)."""
    from bench_quality import render_markdown

    row = {"bits": "W8A6", "family": "ours", "variant": "percentile", "conv_in_fp": True, "own_scope": None,
           "error": "RuntimeError: no", "notes": []}
    page = render_markdown({"models": {"my-unet": {"meta": {"model": "my-unet"}, "rows": {"k": row}}}}, tmp_path, "img")
    assert "### my-unet" in page and "### W8A6" in page and "| ours:percentile | shared | FP | failed: RuntimeError: no |" in page
    assert "text-to-image path" not in page
