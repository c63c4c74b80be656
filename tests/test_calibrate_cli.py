"""`adpdm calibrate` and `adpdm eval` through the real entry point.

The end-to-end run goes through a subprocess (`python -m adpdm_export.cli`); error cases
call the same entry function `adpdm_export.cli.main(argv)` in-process, which is what the
`adpdm` script runs, to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tiny_models import save_unet_folder, tiny_cond_unet, tiny_unet2d

ADPDM = [sys.executable, "-m", "adpdm_export.cli"]


def run(*args, tmp):
    env = dict(os.environ, ADPDM_CACHE_DIR=str(tmp / "cache"), OMP_NUM_THREADS="1")
    return subprocess.run([*ADPDM, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_inproc(capsys, monkeypatch, tmp_path):
    from adpdm_export.cli import main

    monkeypatch.setenv("ADPDM_CACHE_DIR", str(tmp_path / "cache"))

    def call(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return call


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return root, save_unet_folder(tiny_unet2d(), root / "unet"), save_unet_folder(tiny_unet2d(seed=1), root / "other")


@pytest.mark.slow
def test_calibrate_then_eval(folders):
    root, unet, other = folders
    out = root / "cal"
    r = run("calibrate", unet, "--out", out, "--method", "uniform-groups", "--groups", 2, "--w-bits", 8,
            "--a-bits", 8, "--calib-samples", 2, "--calib-steps", 4, "--seed", 1, "--device", "cpu", tmp=root)
    assert r.returncode == 0, r.stderr
    assert (out / "calibration.json").is_file() and (out / "calibration.safetensors").is_file()
    assert "activations" in r.stderr and "wrote" in r.stderr  # progress and summary on stderr
    doc = json.loads((out / "calibration.json").read_text())
    assert doc["num_groups"] == 2 and doc["config"]["calibration"]["model_source"] == str(unet)

    r = run("eval", out, "--json", "--samples", 2, "--no-progress", tmp=root)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    for key in ("noise_rel_l2", "psnr_vs_fp_db", "fd", "fd_fp"):
        assert key in m
    assert 0 < m["noise_rel_l2"] < 1 and m["num_steps"] == 4 and m["groups"] == 2
    # per-sample statistics beside the pooled figure, and the off-range count
    assert 0 < m["noise_rel_l2_median"] <= m["noise_rel_l2_p90"] <= m["noise_rel_l2_max"]
    assert m["off_range_count"] == len(m["off_range_seeds"])



def test_calibrate_then_eval_in_process(folders, run_inproc, tmp_path):
    root, unet, _ = folders
    out = tmp_path / "cal"
    r = run_inproc("calibrate", unet, "--out", out, "--method", "per-step", "--a-bits", 6, "--calib-samples", 2,
                   "--calib-steps", 3, "--no-progress")
    assert r.returncode == 0, r.stderr
    r = run_inproc("eval", out, "--json", "--samples", 2, "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert m["method"] == "per-step" and m["groups"] == 3 and m["a_bits"] == 6 and m["noise_rel_l2"] > 0


def test_eval_errors(folders, run_inproc, tmp_path):
    root, unet, other = folders
    from calibration.configs import DataFreeConfig, MinMaxConfig
    from calibration.pipeline import calibrate
    from adpdm_export.model_loading import load_model

    m = load_model(str(unet))
    res = calibrate(m.unet, m.scheduler_config, MinMaxConfig(), data=DataFreeConfig(samples=2, steps=2),
                    cache_dir=str(tmp_path / "c"), extra_settings={"model_source": str(unet)})
    out = res.save(tmp_path / "cal")
    # the calibration against another model: one-line error
    r = run_inproc("eval", out, "--json", "--model", other, "--samples", 2, "--no-progress")
    assert r.returncode == 2 and "recalibrate" in r.stderr
    # a truncated tensors file: one-line error
    t = out / "calibration.safetensors"
    t.write_bytes(t.read_bytes()[:64])
    r = run_inproc("eval", out, "--json", "--no-progress")
    assert r.returncode == 2 and "truncated or modified" in r.stderr
    r = run_inproc("eval", tmp_path / "nowhere", "--json")
    assert r.returncode == 2 and "no calibration folder" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "kmeans"], "unknown method"),
        (["--w-bits", 9], "w_bits must be from 2 to 8"),
        (["--a-bits", 1], "a_bits must be from 2 to 8"),
        (["--method", "uniform-groups", "--groups", 0], "groups must be >= 1"),
        (["--method", "minmax", "--groups", 3], "one scale set"),
        (["--target", "tflite"], "target must be one of"),
        (["--profile", "tflite"], "target must be one of"),  # the old name of --target
        (["--option", "search_iters=3"], "minmax has no setting search_iters"),
        (["--method", "adpdm", "--option", "serch_iters=3"], "adpdm has no setting serch_iters"),
        (["--method", "adpdm", "--option", "search_iters"], "KEY=VALUE"),
        (["--method", "adpdm", "--option", "search_iters=ten"], "search_iters must be int"),
        (["--method", "adpdm", "--option", "search_iters=-5"], "search_iters must be >= 0"),
        (["--method", "adpdm", "--option", "calib_step=first"], "calib_step must be None, 'last' or a step index"),
        (["--method", "adpdm", "--groups", 2, "--option", "groups=3"], "give it once"),
        (["--method", "uniform-groups", "--stat", "max"], "stat must be one of minmax, percentile"),
        (["--method", "adpdm", "--stat", "percentile"], "adpdm has no setting stat"),
        (["--calib-samples", 0], "samples must be >= 1"),
    ],
)
def test_calibrate_bad_inputs(folders, run_inproc, args, message):
    root, unet, _ = folders
    r = run_inproc("calibrate", unet, "--out", root / "bad", "--calib-samples", 2, "--calib-steps", 2, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert not (root / "bad" / "calibration.json").exists()


def test_bad_input_is_one_line_through_the_script(folders):
    root, unet, _ = folders
    r = run("calibrate", unet, "--out", root / "bad", "--w-bits", 12, tmp=root)
    assert r.returncode == 2 and "w_bits must be from 2 to 8" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_calibrate_cond_model_with_prompt_embeds(tmp_path, run_inproc):
    import torch
    from safetensors.torch import save_file

    folder = save_unet_folder(tiny_cond_unet(), tmp_path / "cond")
    save_file({"encoder_hidden_states": torch.randn(2, 3, 24)}, str(tmp_path / "emb.safetensors"))
    r = run_inproc("calibrate", folder, "--out", tmp_path / "cal", "--calib-samples", 2, "--calib-steps", 2,
                   "--prompt-embeds", tmp_path / "emb.safetensors", "--no-progress")
    assert r.returncode == 0, r.stderr
    save_file({"x": torch.randn(2, 3, 7)}, str(tmp_path / "bad.safetensors"))
    r = run_inproc("calibrate", folder, "--out", tmp_path / "cal2", "--prompt-embeds", tmp_path / "bad.safetensors")
    assert r.returncode == 2 and "(K, L, 24)" in r.stderr
