"""`adpdm lint` and `adpdm inspect` through the real entry point, and the manifest a QDQ export
writes: tampered, truncated or missing files and paths leaving the folder are clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adpdm_export.qdq_export import REPORT_NAME, WEIGHTS_NAME, export_qdq_for
from qdq_fixtures import U2D, quick_result
from test_qdq_lint import build
from tiny_models import save_unet_folder, tiny_unet2d

ADPDM = [sys.executable, "-m", "adpdm_export.cli"]


def run(*args):
    """The console script's module, in a subprocess (slow: a few seconds of imports each)."""
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([*ADPDM, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_main(capsys, monkeypatch):
    """The same entry point (`adpdm_export.cli:main`, what `adpdm` calls), in process."""
    from adpdm_export.cli import main

    monkeypatch.setenv("COLUMNS", "200")

    def _run(*args):
        capsys.readouterr()
        rc = main([str(a) for a in args])
        out = capsys.readouterr()
        return _Result(rc, out.out, out.err)

    return _run


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A QDQ build folder (both targets, 2 groups) with its manifest, from a tiny UNet folder."""
    from adpdm_export.model_loading import load_model

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("cli")
        loaded = load_model(str(save_unet_folder(tiny_unet2d(), root / "unet")))
        result = quick_result(loaded.unet, **U2D)
        export_qdq_for(loaded, result, root / "build", target="both")
    finally:
        torch.set_num_threads(n)
    return root / "build"


@pytest.fixture
def build_copy(build_dir, tmp_path):
    import shutil

    dst = tmp_path / "b"
    shutil.copytree(build_dir, dst)
    return dst


# --------------------------------------------------------------------------- lint


def test_lint_clean_graphs_exit_0(build_dir):
    r = run("lint", *sorted(build_dir.glob("unet.g?.onnx")))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("ok ") == 2


def test_lint_reports_the_node_and_exits_1(tmp_path, run_main):
    import numpy as np
    import onnx

    bad = tmp_path / "bad.onnx"
    onnx.save(build(act_zp=np.uint8(128)), str(bad))
    r = run("lint", bad)
    assert r.returncode == 1
    assert "/unet/block/conv/input_quantizer/QuantizeLinear" in r.stdout and "[zero-point]" in r.stdout
    r = run_main("lint", bad, "--allow", "zero-point")
    assert r.returncode == 0 and "[allowed]" in r.stdout
    r = run_main("lint", bad, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 1 and {v["rule"] for v in doc[str(bad)]} == {"zero-point"}


def test_lint_ort_target_graph_breaks_trt_rules(build_dir, run_main):
    """The CPU target is not for TensorRT: uint8 zero points and output Q/DQ are reported."""
    r = run_main("lint", build_dir / "unet.g0.ort.onnx", "--json")
    assert r.returncode == 1
    rules = {v["rule"] for v in json.loads(r.stdout)[str(build_dir / "unet.g0.ort.onnx")]}
    assert rules == {"zero-point", "weighted-output"}


@pytest.mark.parametrize("args, words", [(["NOPE.onnx"], "no ONNX file"), (["{f}", "--allow", "bogus"], "unknown rule")])
def test_lint_usage_errors_exit_2(build_dir, args, words, run_main):
    args = [a.replace("{f}", str(build_dir / "unet.g0.onnx")) for a in args]
    r = run_main("lint", *args)
    assert r.returncode == 2 and words in r.stderr
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- inspect


def test_inspect_table(build_dir):
    r = run("inspect", build_dir)
    assert r.returncode == 0, r.stderr
    out = r.stderr + r.stdout
    for words in ("UNet2DModel", "W8A8", "2 group(s)", "0-499", "500-999", "unet.g0.onnx", "unet.g1.ort.onnx",
                  WEIGHTS_NAME, "quantized ops fused"):
        assert words in out, (words, out)


def test_inspect_json(build_dir, run_main):
    r = run_main("inspect", build_dir, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [g["timestep_ranges"] for g in doc["groups"]] == [[[0, 499]], [[500, 999]]]
    assert set(doc["groups"][0]["graphs"]) == {"trt", "ort"}
    assert doc["weights"]["trt"]["file"] == doc["weights"]["ort"]["file"] == WEIGHTS_NAME
    assert doc["fusion"]["ort"]["ratio"] >= 0.95 and doc["fusion"]["ort"]["total"] == 39
    # the TensorRT target is FP16 by default: FP16 noise flips INT8 roundings, accepted when teacher-forced parity holds
    assert doc["groups"][1]["parity"]["trt"]["verdict"] in ("exact", "within-tolerance", "ties", "rounding-flips")


def test_manifest_records_every_file(build_dir):
    from engines.manifest import load_manifest

    m = load_manifest(build_dir)
    shared = ["unet.shared.ort.onnx", "unet.shared.ort.data", "unet.shared.groups.npz"]  # one session (issue 16)
    assert sorted(f.path for f in m.files) == sorted(
        [WEIGHTS_NAME, REPORT_NAME] + [f"unet.g{k}{s}.onnx" for k in range(2) for s in ("", ".ort")] + shared
    )
    assert m.weights == {"trt": WEIGHTS_NAME, "ort": WEIGHTS_NAME}
    assert m.calibration.weight_bits == 8 and m.calibration.num_groups == 2
    assert m.graph_paths("trt")[1].name == "unet.g1.onnx"


def _flip_byte(path: Path, offset: int = 100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda d: _flip_byte(d / "unet.g1.onnx"), "does not match its sha256"),
        (lambda d: _flip_byte(d / WEIGHTS_NAME, 1000), "does not match its sha256"),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "is missing"),
        (lambda d: (d / "unet.g0.ort.onnx").write_bytes((d / "unet.g0.ort.onnx").read_bytes()[:-10]), "truncated"),
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "not valid JSON"),
    ],
)
def test_inspect_refuses_a_damaged_build(build_copy, damage, words, run_main):
    damage(build_copy)
    r = run_main("inspect", build_copy)
    assert r.returncode == 2, r.stdout + r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr


def test_inspect_refuses_a_tampered_build_through_the_console_script(build_copy):
    _flip_byte(build_copy / "unet.g0.onnx")
    r = run("inspect", build_copy)
    assert r.returncode == 2 and "does not match its sha256" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_inspect_refuses_paths_leaving_the_folder(build_copy, path, run_main):
    doc = json.loads((build_copy / "manifest.json").read_text())
    doc["groups"][0]["graphs"]["trt"] = path
    (build_copy / "manifest.json").write_text(json.dumps(doc))
    r = run_main("inspect", build_copy)
    assert r.returncode == 2 and "build folder" in r.stderr, r.stderr


def test_inspect_refuses_an_unknown_format_version(build_copy, run_main):
    doc = json.loads((build_copy / "manifest.json").read_text())
    doc["format_version"] = 99
    (build_copy / "manifest.json").write_text(json.dumps(doc))
    r = run_main("inspect", build_copy)
    assert r.returncode == 2 and "format version 99" in r.stderr


def test_a_new_export_invalidates_the_old_manifest_first(build_copy):
    """While files are being replaced there is no manifest describing them."""
    from adpdm_export.qdq_export import _move_into_place

    stage = build_copy / ".stage"
    stage.mkdir()
    (stage / "unet.g0.onnx").write_bytes((build_copy / "unet.g0.onnx").read_bytes())
    _move_into_place(stage, build_copy, ["unet.g0.onnx"])
    assert not (build_copy / "manifest.json").exists()
    assert not (build_copy / "unet.g1.onnx").exists()  # stale group graph removed
