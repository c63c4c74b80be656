"""The `adpdm` CLI through its real entry point: help, export, sample, and one-line errors."""

import os
import subprocess
import sys

import pytest

from tiny_models import save_unet_folder, tiny_unet2d

ADPDM = [sys.executable, "-m", "adpdm_export.cli"]


def run(*args, env=None, cwd=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([*ADPDM, *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return save_unet_folder(tiny_unet2d(), tmp_path_factory.mktemp("m") / "unet")


@pytest.mark.parametrize("cmd", [[], ["export"], ["sample"], ["doctor"]])
def test_help_everywhere(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def test_export_writes_graph_and_reports_parity(unet_folder, tmp_path):
    r = run("export", unet_folder, "--out", tmp_path / "build")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "build" / "unet.onnx").is_file()
    assert (tmp_path / "build" / "unet.onnx.data").is_file()
    assert "onnxruntime vs PyTorch" in r.stderr


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_sample_writes_png(unet_folder, tmp_path, backend):
    out = tmp_path / f"grid-{backend}.png"
    r = run("sample", unet_folder, "--n", 4, "--steps", 3, "--out", out, "--backend", backend,
            env={"ADPDM_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    from PIL import Image

    img = Image.open(out)
    assert img.size == (4 * (2 * 17 + 1), 4 * (2 * 17 + 1))  # 2x2 grid of 16 px tiles, 1 px gaps, scale 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "NOPE_DIR", "--out", "x.png"], "no such model folder"),
        (["sample", "{m}", "--backend", "tensorflow"], "unknown backend"),
        (["sample", "{m}", "--n", "0"], "n must be an integer >= 1, got 0"),
        (["sample", "{m}", "--out", "grid.jpg"], ".png"),
        (["export", "{m}", "--out", "{tmp}/o", "--opset", "13"], "opset 13 is too old"),
    ],
)
def test_bad_arguments_give_one_clear_line(unet_folder, tmp_path, args, message):
    args = [a.format(m=unet_folder, tmp=tmp_path) for a in args]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unknown_option_is_a_usage_error(unet_folder):
    r = run("sample", unet_folder, "--bogus")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_doctor_reports_versions_and_backend():
    r = run("doctor")
    assert r.returncode == 0, r.stderr
    text = " ".join((r.stdout + r.stderr).split())
    assert "onnxruntime" in text and "torch" in text
    assert "build-engine --backend auto" in text
    from engines.platform import pick_backend

    assert pick_backend("auto") in text.split("build-engine --backend auto", 1)[1]
    if "not installed" in text:
        assert "adpdm-export[gpu]" in text  # the install hint survives rich markup


def test_export_with_calibration_writes_group_graphs_and_manifest(unet_folder, tmp_path):
    from adpdm_export.model_loading import load_model
    from calibration.configs import DataFreeConfig, UniformGroupsConfig
    from calibration.pipeline import calibrate
    from engines.manifest import load_manifest

    m = load_model(unet_folder)
    result = calibrate(m.unet, m.scheduler_config, UniformGroupsConfig(groups=2), data=DataFreeConfig(samples=2, steps=6),
                       cache_dir=str(tmp_path / "cache"))
    result.save(tmp_path / "calib")
    r = run("export", unet_folder, "--calibration", tmp_path / "calib", "--out", tmp_path / "qdq", "--target", "ort")
    assert r.returncode == 0, r.stderr
    manifest = load_manifest(tmp_path / "qdq")
    assert manifest.num_groups == 2 and manifest.targets() == ["ort"]
    # a calibration made for another model is refused in one line
    other = save_unet_folder(tiny_unet2d(seed=3), tmp_path / "other")
    r = run("export", other, "--calibration", tmp_path / "calib", "--out", tmp_path / "qdq2")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_profile_is_the_old_name_of_target():
    """`--profile` (the graph target's old flag) still works wherever `--target` exists, so scripts keep running."""
    import typer

    from adpdm_export.cli import app

    group = typer.main.get_command(app)
    for name in ("calibrate", "export", "eval"):
        opts = {p.name: p.opts for p in group.commands[name].params}
        assert opts["target"] == ["--target", "--profile"], name
