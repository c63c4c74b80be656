"""manifest.json: round trip, written last and atomically, and every way a build folder can be wrong."""

import json
import os
from pathlib import Path

import pytest

from engines.errors import AdpdmError
from engines.file_io import atomic_write_bytes, check_relpath, sha256_file
from engines.manifest import dumps_readable, load_manifest, write_manifest
from engines.manifest_schema import (
    MANIFEST_NAME,
    CalibrationSummary,
    Manifest,
    ModelInfo,
    TensorrtInfo,
    TrtOptimizationProfile,
    make_groups,
    with_tensorrt,
)

T = 100


def table():
    return [1 if t < 30 else 0 for t in range(T)]


def make_folder(root: Path, backend: str = "ort") -> Manifest:
    root.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        (root / f"unet.g{k}.onnx").write_bytes(b"graph-trt-%d" % k * 10)
        (root / f"unet.g{k}.ort.onnx").write_bytes(b"graph-ort-%d" % k * 10)
    (root / "unet.weights.data").write_bytes(os.urandom(4096))
    m = Manifest(
        model=ModelInfo(
            source="tests",
            sha256="ab" * 32,
            type="UNet2DModel",
            sample_size=(16, 16),
            in_channels=1,
            out_channels=1,
            conditioning={"class_labels": {"num_classes": 10}},
        ),
        scheduler={"_class_name": "DDPMScheduler", "num_train_timesteps": T},
        calibration=CalibrationSummary(method="adpdm", weight_bits=8, act_bits=8, num_groups=2, tau_star=40),
        timestep_to_group=table(),
        groups=make_groups(
            table(), {"trt": ["unet.g0.onnx", "unet.g1.onnx"], "ort": ["unet.g0.ort.onnx", "unet.g1.ort.onnx"]}
        ),
        weights={"trt": "unet.weights.data", "ort": "unet.weights.data"},
    )
    if backend == "trt":
        for k in range(2):
            (root / f"unet.g{k}.plan").write_bytes(b"plan%d" % k * 100)
        (root / "timing.cache").write_bytes(b"cache")
        info = TensorrtInfo(
            tensorrt_version="10.8.0",
            gpu_name="NVIDIA H100 80GB HBM3",
            compute_capability="9.0",
            optimization_profile=TrtOptimizationProfile(batch=(1, 4, 8), height=(16, 16, 16), width=(16, 16, 16)),
            batch_sizes=[1, 4, 8],
            opt_level=3,
            timing_cache="timing.cache",
        )
        m = with_tensorrt(m, info, ["unet.g0.plan", "unet.g1.plan"])
    write_manifest(root, m)
    return m


def edit_manifest(root: Path, fn) -> None:
    d = json.loads((root / MANIFEST_NAME).read_text())
    fn(d)
    (root / MANIFEST_NAME).write_text(json.dumps(d))


@pytest.mark.parametrize("backend", ["ort", "trt"])
def test_round_trip(tmp_path, backend):
    m = make_folder(tmp_path, backend)
    loaded = load_manifest(tmp_path)
    assert loaded.to_dict() == m.to_dict()
    assert loaded.root == tmp_path.resolve()
    assert loaded.backend == backend and loaded.num_groups == 2 and loaded.num_train_timesteps == T
    assert loaded.groups[1].timestep_ranges == [(0, 29)] and loaded.groups[0].timestep_ranges == [(30, 99)]
    assert loaded.targets() == ["trt", "ort"]
    assert [p.name for p in loaded.graph_paths("ort")] == ["unet.g0.ort.onnx", "unet.g1.ort.onnx"]
    listed = {f.path: f for f in loaded.files}
    assert set(listed) == set(m.referenced_files())
    assert listed["unet.weights.data"].sha256 == sha256_file(tmp_path / "unet.weights.data")
    assert listed["unet.weights.data"].size == 4096
    if backend == "trt":
        assert loaded.tensorrt.optimization_profile.batch == (1, 4, 8)
        assert [p.name for p in loaded.engine_paths()] == ["unet.g0.plan", "unet.g1.plan"]
    else:
        with pytest.raises(AdpdmError, match="no TensorRT engines"):
            loaded.engine_paths()
    # the manifest itself is JSON with the format header first; no temporary files are left behind
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert list(raw)[:2] == ["format", "format_version"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_old_style_keys_load_and_rewrite_byte_identical(tmp_path):
    """A manifest with the on-disk key names written before the renames ("profile" for the TensorRT
    optimization profile, "graph_profile" for the graph target, extra.calibration_profile) loads into
    the renamed fields, and writing it again gives the same bytes."""
    make_folder(tmp_path, "trt")
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text())
    raw["calibration"]["extra"] = {"calibration_profile": "ort"}
    raw["tensorrt"] = {
        "tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
        "profile": {"batch": [1, 4, 8], "height": [16, 16, 16], "width": [16, 32, 32], "sequence_length": None},
        "batch_sizes": [1, 4, 8], "opt_level": 3, "graph_profile": "ort", "timing_cache": "timing.cache",
        "strongly_typed": True,
    }
    text = dumps_readable(raw) + "\n"
    (tmp_path / MANIFEST_NAME).write_text(text)

    m = load_manifest(tmp_path)
    assert m.tensorrt.optimization_profile == TrtOptimizationProfile((1, 4, 8), (16, 16, 16), (16, 32, 32))
    assert m.tensorrt.graph_target == "ort" and m.targets() == ["trt", "ort"]
    assert m.calibration.extra == {"calibration_profile": "ort"}
    assert m.to_dict() == raw and list(m.to_dict()["tensorrt"]) == list(raw["tensorrt"])
    write_manifest(tmp_path, m)
    assert (tmp_path / MANIFEST_NAME).read_text() == text


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_bytes(p, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(p, object())  # type: ignore[arg-type]
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_tampered_file(tmp_path):
    make_folder(tmp_path)
    p = tmp_path / "unet.weights.data"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(AdpdmError, match=r"unet\.weights\.data does not match its sha256"):
        load_manifest(tmp_path)
    load_manifest(tmp_path, verify="size")  # same size: only the hash check sees it
    load_manifest(tmp_path, verify=False)


def test_missing_file(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "unet.g1.ort.onnx").unlink()
    with pytest.raises(AdpdmError, match=r"unet\.g1\.ort\.onnx is missing"):
        load_manifest(tmp_path)
    with pytest.raises(AdpdmError, match="missing"):
        load_manifest(tmp_path, verify="size")


def test_truncated_file(tmp_path):
    make_folder(tmp_path)
    p = tmp_path / "unet.weights.data"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(AdpdmError, match=r"truncated \(1000 bytes, the manifest records 4096\)"):
        load_manifest(tmp_path, verify="size")


def test_no_manifest_and_damaged_manifest(tmp_path):
    with pytest.raises(AdpdmError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(AdpdmError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(AdpdmError, match="not an adpdm build manifest"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_format_version(tmp_path, version):
    make_folder(tmp_path)
    edit_manifest(tmp_path, lambda d: d.update(format_version=version))
    with pytest.raises(AdpdmError, match="format version .* upgrade adpdm-export or rebuild"):
        load_manifest(tmp_path)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("../x.onnx", "leaves the build folder"),
        ("sub/../../x.onnx", "leaves the build folder"),
        ("/etc/passwd", "is absolute"),
        ("C:\\x.onnx", "POSIX path"),
        ("C:x.onnx", "is absolute"),
        ("", "not a file name"),
    ],
)
def test_paths_leaving_the_folder(tmp_path, bad, msg):
    make_folder(tmp_path)

    def graph(d):
        d["groups"][0]["graphs"]["ort"] = bad

    edit_manifest(tmp_path, graph)
    with pytest.raises(AdpdmError, match=msg):
        load_manifest(tmp_path, verify=False)


@pytest.mark.parametrize("where", ["files", "weights", "engine"])
def test_traversal_anywhere(tmp_path, where):
    make_folder(tmp_path, "trt")

    def edit(d):
        if where == "files":
            d["files"].append({"path": "../outside", "sha256": "0" * 64, "size": 1})
        elif where == "weights":
            d["weights"]["ort"] = "/abs/unet.weights.data"
        else:
            d["groups"][1]["engine"] = "../../g1.plan"

    edit_manifest(tmp_path, edit)
    with pytest.raises(AdpdmError, match="leaves the build folder|is absolute"):
        load_manifest(tmp_path)


def test_symlink_out_of_the_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    build = tmp_path / "build"
    make_folder(build)
    (build / "unet.weights.data").unlink()
    (build / "unet.weights.data").symlink_to(outside / "secret")
    with pytest.raises(AdpdmError, match="resolves outside the build folder"):
        load_manifest(build)


@pytest.mark.parametrize(
    "edit, msg",
    [
        (lambda d: d["timestep_to_group"].pop(), "timestep_to_group has 99 entries"),
        (lambda d: d["timestep_to_group"].__setitem__(5, 7), "group\\(s\\) \\[7\\] that do not exist"),
        (lambda d: d["groups"][0].__setitem__("timestep_ranges", [[0, 99]]), "disagree with timestep_to_group"),
        (lambda d: d["groups"][0].__setitem__("id", 3), "group ids must be 0..1"),
        (lambda d: d["calibration"].__setitem__("num_groups", 3), "num_groups = 3"),
        (lambda d: d.__setitem__("backend", "tensorrt"), "backend must be one of"),
        (lambda d: d.__setitem__("backend", "trt"), "needs the 'tensorrt' section"),
        (lambda d: d["model"].__setitem__("in_channels", "1"), "model.in_channels must be int"),
        (lambda d: d["model"].__setitem__("conditioning", {"text": {}}), "unknown conditioning"),
        (lambda d: d["groups"][0]["graphs"].__setitem__("cuda", "unet.g0.onnx"), "unknown graph target"),
        (lambda d: d["files"].pop(0), "have no sha256/size record"),
        (lambda d: d.pop("model"), "model is missing"),
    ],
)
def test_schema_errors(tmp_path, edit, msg):
    make_folder(tmp_path)
    edit_manifest(tmp_path, edit)
    with pytest.raises(AdpdmError, match=msg):
        load_manifest(tmp_path, verify=False)


def test_write_refuses_unrecorded_or_missing_files(tmp_path):
    m = make_folder(tmp_path)
    (tmp_path / "unet.g0.onnx").unlink()
    with pytest.raises(AdpdmError, match="no such file"):
        write_manifest(tmp_path, m)


def test_extra_files_are_recorded(tmp_path):
    m = make_folder(tmp_path)
    (tmp_path / "qdq_report.json").write_text("{}")
    write_manifest(tmp_path, m, extra_files=["qdq_report.json"])
    loaded = load_manifest(tmp_path)
    assert "qdq_report.json" in {f.path for f in loaded.files}
    (tmp_path / "qdq_report.json").write_text("{ }")
    with pytest.raises(AdpdmError, match="qdq_report.json"):
        load_manifest(tmp_path)


def test_helpers():
    assert check_relpath("engines/unet.g0.plan") == "engines/unet.g0.plan"
    for bad in ("..", "./x", "x/", "a//b", "a\\b", " x"):
        with pytest.raises(AdpdmError):
            check_relpath(bad)
