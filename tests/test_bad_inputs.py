"""`adpdm build-engine --out` never loses a file it did not write (issue 17, "data loss").

Each case runs the command line in-process and asserts the exit status, the one-line
message on stderr and that nothing outside the build's own files changed. The refusals
happen before any work (no model is even loaded); the builds use the cheapest settings
(minmax, 2 samples x 2 steps, a tiny UNet). export-triton's cases are in
tests/test_triton_repository.py (its config validation needs the serving environment).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from adpdm_export.build_pipeline import build_engine
from calibration.configs import DataFreeConfig, MinMaxConfig, UniformGroupsConfig
from calibration.qconfig import QuantConfig
from adpdm_export.build_stages import LEDGER, LOCK_NAME, check_build_folder
from adpdm_export.cli import main
from engines.errors import AdpdmError
from engines.manifest import load_manifest
from tiny_models import save_unet_folder, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dict(method=MinMaxConfig(), data=DataFreeConfig(samples=2, steps=2))
QUICK_FLAGS = ["--method", "minmax", "--calib-samples", "2", "--calib-steps", "2", "--backend", "ort", "--no-progress"]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `root`, paths relative to it."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.split("/")[0] in skip:
            continue
        out[rel] = None if p.is_dir() else p.read_bytes()
    return out


def run_cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    """The error: exactly one line of stderr (progress, printed there too, precedes it)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_unet_folder(tiny_unet2d(), tmp_path_factory.mktemp("bad-inputs") / "unet")


@pytest.fixture(scope="module")
def our_build(model, tmp_path_factory):
    """A finished build (ort target) to copy: calibration/, graphs, weights, report, manifest, ledger."""
    out = tmp_path_factory.mktemp("ours") / "build"
    build_engine(str(model), out, **QUICK, backend="ort", targets=("ort",))
    return out


# ------------------------------------------------------------------------ the folder rule
USER_FILES = {
    "notes.txt": b"my notes",
    "unet.g5.onnx": b"my own graph",
    "manifest.json": json.dumps({"name": "my project"}).encode(),  # not an adpdm manifest
    "calibration/calibration.json": b'{"mine": true}',
}


@pytest.mark.parametrize("name", sorted(USER_FILES))
def test_build_engine_refuses_a_folder_that_is_not_ours(model, tmp_path, capsys, name):
    out = tmp_path / "out"
    (out / name).parent.mkdir(parents=True)
    (out / name).write_bytes(USER_FILES[name])
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "build-engine", model, "--out", out, *QUICK_FLAGS)
    assert rc == 2
    line = one_line(err)
    assert line.startswith("error: --out") and "choose an empty or new folder" in line
    assert snapshot(tmp_path) == before  # not even a lock file


def test_the_rule_for_our_build(tmp_path):
    assert check_build_folder(tmp_path / "missing") is False
    (tmp_path / "empty").mkdir()
    assert check_build_folder(tmp_path / "empty") is False
    (tmp_path / "empty" / LOCK_NAME).write_text("")  # our own control files do not count
    (tmp_path / "empty" / ".qdq-staging-abcd1234").mkdir()
    assert check_build_folder(tmp_path / "empty") is False
    (tmp_path / "ledger").mkdir()
    (tmp_path / "ledger" / LEDGER).write_text("{}")
    assert check_build_folder(tmp_path / "ledger") is True
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / LEDGER).write_text("[1, 2]")  # not a ledger of ours
    with pytest.raises(AdpdmError, match="holds no adpdm build"):
        check_build_folder(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdpdmError, match="not a folder"):
        check_build_folder(tmp_path / "file")


def test_an_empty_folder_is_built_into(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "beside.txt").write_text("unrelated")
    rc, err = run_cli(capsys, "build-engine", model, "--out", out, *QUICK_FLAGS)
    assert rc == 0, err
    assert load_manifest(out).num_groups >= 1
    assert (tmp_path / "beside.txt").read_text() == "unrelated"


# ------------------------------------------------------------------------ inside our own build
def test_rebuilds_keep_user_files_in_our_build(model, our_build, tmp_path, capsys):
    out = shutil.copytree(our_build, tmp_path / "build")
    (out / "notes.txt").write_text("mine")
    (out / "unet.g7.ort.onnx").write_bytes(b"my graph")  # a graph name, but not one the build wrote
    (out / "calibration" / "mine.json").write_text("{}")
    user = {n: (out / n).read_bytes() for n in ("notes.txt", "unet.g7.ort.onnx", "calibration/mine.json")}
    for extra in ([], ["--force"]):  # the CLI builds both targets: the export reruns, then everything
        rc, err = run_cli(capsys, "build-engine", model, "--out", out, *QUICK_FLAGS, *extra)
        assert rc == 0, err
        assert {n: (out / n).read_bytes() for n in user} == user
    assert load_manifest(out).targets() == ["trt", "ort"]


def test_fewer_groups_remove_only_graphs_the_build_wrote(model, tmp_path):
    out = tmp_path / "build"
    build_engine(str(model), out, UniformGroupsConfig(groups=3), data=DataFreeConfig(samples=2, steps=4),
                 backend="ort", targets=("ort",))
    assert (out / "unet.g2.ort.onnx").is_file()
    (out / "unet.g5.ort.onnx").write_bytes(b"user's")
    build_engine(str(model), out, UniformGroupsConfig(groups=2), data=DataFreeConfig(samples=2, steps=4),
                 backend="ort", targets=("ort",))
    assert not (out / "unet.g2.ort.onnx").exists()  # ours, stale: removed
    assert (out / "unet.g5.ort.onnx").read_bytes() == b"user's"  # not ours: kept
    assert load_manifest(out).num_groups == 2


def test_a_user_file_where_a_stage_would_write_is_refused(model, our_build, tmp_path, capsys):
    out = shutil.copytree(our_build, tmp_path / "build")
    (out / "unet.g0.onnx").write_bytes(b"user's")  # the trt-target graph name: this build never wrote it
    before = snapshot(out, skip=("calibration", LEDGER, "manifest.json", LOCK_NAME))
    rc, err = run_cli(capsys, "build-engine", model, "--out", out, *QUICK_FLAGS)
    assert rc == 2
    line = one_line(err)
    assert "unet.g0.onnx was not written by this build" in line
    assert snapshot(out, skip=("calibration", LEDGER, "manifest.json", LOCK_NAME)) == before


# ------------------------------------------------------------------------ one build per folder
def _hold_lock(out: Path):
    f = open(out / LOCK_NAME, "a+")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({"pid": 4242, "host": "buildhost", "started": "2025-01-01T00:00:00+00:00",
                        "command": "adpdm build-engine"}))
    f.flush()
    return f


def test_a_second_build_fails_at_once_naming_the_holder(model, our_build, tmp_path, capsys):
    out = shutil.copytree(our_build, tmp_path / "build")
    held = _hold_lock(out)
    try:
        before = snapshot(tmp_path)
        rc, err = run_cli(capsys, "build-engine", model, "--out", out, *QUICK_FLAGS, "--force")
        assert rc == 2
        line = one_line(err)
        assert "is being built by pid 4242 on buildhost since 2025-01-01T00:00:00+00:00" in line
        assert snapshot(tmp_path) == before
        with pytest.raises(AdpdmError, match="pid 4242"):  # the library entry point too
            build_engine(str(model), out, **QUICK, backend="ort", targets=("ort",))
    finally:
        held.close()


def test_the_lock_is_released_on_errors(model, our_build, tmp_path):
    out = shutil.copytree(our_build, tmp_path / "build")
    with pytest.raises(AdpdmError, match="A7"):  # calibrates, then the export refuses A7
        build_engine(str(model), out, **QUICK, quant=QuantConfig(a_bits=7), backend="ort", targets=("ort",))
    held = _hold_lock(out)  # would raise BlockingIOError if the failed build still held it
    held.close()
    build_engine(str(model), out, **QUICK, backend="ort", targets=("ort",))


def test_a_failed_start_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    rc, err = run_cli(capsys, "build-engine", tmp_path / "no-such-model", "--out", out, *QUICK_FLAGS)
    assert rc == 2 and one_line(err).startswith("error:")
    assert not out.exists()


# ------------------------------------------------------------------------ staging of killed exports
def test_stale_staging_folders_are_removed_by_the_next_export(model, our_build, tmp_path, capsys):
    out = shutil.copytree(our_build, tmp_path / "build")
    stale = out / ".qdq-staging-dead0001"
    stale.mkdir()
    (stale / "unet.weights.data").write_bytes(b"x" * 100)
    live = out / ".qdq-staging-live0001"  # another export's, still running: it holds its lock
    live.mkdir()
    not_ours = out / ".qdq-staging-of-my-own"  # not our pattern
    not_ours.mkdir()
    (not_ours / "keep.txt").write_text("mine")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        rc, err = run_cli(capsys, "build-engine", model, "--out", out, *QUICK_FLAGS, "--force")
    finally:
        os.close(fd)
    assert rc == 0, err
    assert not stale.exists()
    assert live.is_dir() and (not_ours / "keep.txt").read_text() == "mine"
    assert not [p for p in out.iterdir() if p.name.startswith(".qdq-staging-") and p not in (live, not_ours)]


# --------------------------------------------------------------------------- sample: checked before any work


@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**64)], "seed must be an integer in 0.."),
    (["--seed", "-1"], "seed must be an integer in 0.."),
    (["--steps", "1001", "--scheduler", "ddpm", "--backend", "torch"], "steps must be in 1..1000"),
])
def test_sample_refuses_bad_seed_and_steps_in_one_line(capsys, tmp_path, model, args, message):
    out = tmp_path / "grid.png"
    rc, err = run_cli(capsys, "sample", model, "--n", "1", "--out", out, *args)
    assert rc == 2 and message in one_line(err)
    assert not out.exists()


def test_sample_refuses_a_folder_as_out_before_sampling(capsys, tmp_path, model, monkeypatch):
    import adpdm_export.sampling as sampling

    monkeypatch.setattr(sampling, "open_source", lambda *a, **k: pytest.fail("sampled despite a bad --out"))
    folder = tmp_path / "grid.png"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "sample", model, "--out", folder)
    assert rc == 2 and "is a folder" in one_line(err)
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- --out below a file, bad model configs


@pytest.mark.parametrize("command", [
    ["calibrate", "--method", "minmax", "--calib-samples", "2", "--calib-steps", "2", "--no-progress"],
    ["build-engine", *QUICK_FLAGS],
])
def test_out_below_a_file_is_one_line_before_any_work(capsys, tmp_path, model, command, monkeypatch):
    import adpdm_export.model_loading as model_loading

    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded despite a bad --out"))
    (tmp_path / "afile").write_text("mine")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, command[0], model, "--out", tmp_path / "afile" / "sub", *command[1:])
    assert rc == 2 and "afile is a file, not a folder" in one_line(err)
    assert snapshot(tmp_path) == before


def test_sample_out_below_a_file_before_sampling(capsys, tmp_path, model, monkeypatch):
    import adpdm_export.sampling as sampling

    monkeypatch.setattr(sampling, "open_source", lambda *a, **k: pytest.fail("sampled despite a bad --out"))
    (tmp_path / "afile").write_text("mine")
    rc, err = run_cli(capsys, "sample", model, "--out", tmp_path / "afile" / "grid.png")
    assert rc == 2 and "exists and is not a folder" in one_line(err)


def _edited_model(tmp_path, model, change):
    folder = Path(shutil.copytree(model, tmp_path / "edited"))
    path = folder / "config.json"
    doc = json.loads(path.read_text())
    path.write_text(json.dumps(change(doc)))
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda d: [d], "must hold a JSON object, got array"),
    (lambda d: {**d, "sample_size": "big"}, "sample_size must be a positive integer, got 'big'"),
    (lambda d: {**d, "sample_size": -4}, "sample_size must be a positive integer, got -4"),
    (lambda d: {**d, "sample_size": [16]}, "sample_size must be a positive integer, got [16]"),
    (lambda d: {**d, "in_channels": 0}, "in_channels must be a positive integer, got 0"),
])
def test_bad_model_config_is_one_line(capsys, tmp_path, model, change, message):
    folder = _edited_model(tmp_path, model, change)
    rc, err = run_cli(capsys, "calibrate", folder, "--out", tmp_path / "c", "--method", "minmax", "--no-progress")
    assert rc == 2 and message in one_line(err)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- adpdm export --out: the build-folder rule


@pytest.fixture(scope="module")
def calibration_folder(model, our_build):
    return our_build / "calibration"


def test_export_refuses_a_folder_that_is_not_ours(model, calibration_folder, tmp_path, capsys, monkeypatch):
    import adpdm_export.model_loading as model_loading

    monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("loaded despite a bad --out"))
    out = tmp_path / "user"
    out.mkdir()
    (out / "unet.g0.ort.onnx").write_text("the user's")
    before = snapshot(tmp_path)
    rc, err = run_cli(capsys, "export", model, "--calibration", calibration_folder, "--out", out, "--target", "ort")
    assert rc == 2 and "not empty and holds no adpdm build" in one_line(err)
    assert snapshot(tmp_path) == before


def test_export_while_a_build_holds_the_folder_fails_at_once(model, our_build, calibration_folder, tmp_path, capsys):
    out = Path(shutil.copytree(our_build, tmp_path / "build"))
    held = _hold_lock(out)
    try:
        rc, err = run_cli(capsys, "export", model, "--calibration", calibration_folder, "--out", out, "--target", "ort")
    finally:
        held.close()
    assert rc == 2 and "is being built by" in one_line(err)


def test_export_into_a_new_folder_and_over_our_build(model, our_build, calibration_folder, tmp_path, capsys):
    import adpdm_export as adpdm

    rc, _ = run_cli(capsys, "export", model, "--calibration", calibration_folder, "--out", tmp_path / "new",
                    "--target", "ort", "--no-check")
    assert rc == 0 and load_manifest(tmp_path / "new").num_groups == 1
    out = Path(shutil.copytree(our_build, tmp_path / "again"))
    (out / "notes.txt").write_text("mine")
    result = adpdm.CalibrationResult.load(calibration_folder)
    adpdm.export(str(model), result, out, targets=("ort",), check=False)  # the API holds the same rule
    assert (out / "notes.txt").read_text() == "mine" and load_manifest(out).num_groups == 1
    user = tmp_path / "user-files"
    user.mkdir()
    (user / "x.txt").write_text("mine")
    with pytest.raises(AdpdmError, match="not empty and holds no adpdm build"):
        adpdm.export(str(model), result, user, check=False)
    assert [p.name for p in user.iterdir()] == ["x.txt"]


# --------------------------------------------------------------------------- --resolution: used, or refused


@pytest.mark.parametrize("resolution", [["7", "7"], ["-1", "0"], ["16", "16"]])
def test_resolution_on_an_onnxruntime_build_is_refused_not_ignored(capsys, tmp_path, model, resolution):
    rc, err = run_cli(capsys, "build-engine", model, "--out", tmp_path / "b", *QUICK_FLAGS, "--resolution", *resolution)
    assert rc == 2 and "--resolution sets the TensorRT optimization profile" in one_line(err)
    assert not (tmp_path / "b").exists()


def test_resolution_is_checked_against_the_unet():
    from adpdm_export.build_pipeline import check_resolution

    config = {"down_block_types": ["DownBlock2D"] * 4}  # downsamples by 8
    check_resolution((64, 96), "trt", config)
    check_resolution(None, "ort", config)
    with pytest.raises(AdpdmError, match="multiples of 8"):
        check_resolution((60, 64), "trt", config)
    with pytest.raises(AdpdmError, match="two positive integers"):
        check_resolution((0, 64), "trt", config)


# --------------------------------------------------------------------------- files we read: one line per bad field


def _edited_copy(src: Path, dst: Path, name: str, change) -> Path:
    folder = Path(shutil.copytree(src, dst))
    path = folder / name
    if callable(change):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        path.write_text(change)
    return folder


def _set(path: list, value):
    def edit(doc):
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return doc
    return edit


DEEP = "[" * 200_000 + "]" * 200_000

CALIBRATION_CASES = {
    "string in the table": (_set(["timestep_to_group", 0], "x"), "timestep_to_group must be a list of integers"),
    "num_groups a string": (_set(["num_groups"], "two"), "num_groups must be integer, got string"),
    "quantizer not an object": (_set(["activation_quantizers", 0], "oops"), "activation_quantizers[0] must be an object"),
    "channels missing": (lambda d: (d["weight_quantizers"][0].pop("channels"), d)[1], "channels is missing"),
    "nested too deep": (DEEP, "nests too deeply"),
    "a list": ("[1, 2]", "must hold a JSON object, got array"),
    "not JSON": ("{", "is not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(CALIBRATION_CASES))
def test_bad_calibration_json_is_one_line(our_build, tmp_path, capsys, case):
    change, message = CALIBRATION_CASES[case]
    folder = _edited_copy(our_build / "calibration", tmp_path / "cal", "calibration.json", change)
    rc, err = run_cli(capsys, "eval", folder, "--samples", "2", "--json", "--no-progress")
    assert rc == 2 and message in one_line(err)


MANIFEST_CASES = {
    "string in the table": (_set(["timestep_to_group", 0], "x"), "timestep_to_group must be a list of integers"),
    "group not an object": (_set(["groups", 0], 7), "groups[0] must be an object"),
    "nested too deep": (DEEP, "nests too deeply"),
    "a list": ("[]", "must hold a JSON object, got array"),
    "channels a string": (_set(["model", "in_channels"], "1"), "model.in_channels must be integer"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_bad_manifest_is_one_line(our_build, tmp_path, capsys, case):
    change, message = MANIFEST_CASES[case]
    folder = _edited_copy(our_build, tmp_path / "b", "manifest.json", change)
    rc, err = run_cli(capsys, "inspect", folder)
    assert rc == 2 and message in one_line(err)


def _two_group_build(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "build"
    build_engine(str(model), out, UniformGroupsConfig(groups=2), data=DataFreeConfig(samples=2, steps=4),
                 backend="ort", targets=("ort",))
    return out


@pytest.fixture(scope="module")
def two_groups(model, tmp_path_factory):
    return _two_group_build(model, tmp_path_factory)


def _swap_groups(doc):
    doc["timestep_to_group"] = [1 - g for g in doc["timestep_to_group"]]  # valid, consistent, wrong
    for g in doc["groups"]:
        g["timestep_ranges"] = [[lo, hi] for lo, hi in g["timestep_ranges"]]
    doc["groups"][0]["timestep_ranges"], doc["groups"][1]["timestep_ranges"] = (
        doc["groups"][1]["timestep_ranges"], doc["groups"][0]["timestep_ranges"])
    return doc


@pytest.mark.parametrize("change, field", [
    (_swap_groups, "timestep_table_sha256"),
    (_set(["model", "sample_size"], [8, 8]), "sample_size"),
])
def test_a_manifest_edited_consistently_is_caught_by_its_graphs(two_groups, tmp_path, change, field):
    from engines.runner import TimestepDispatchRunner

    folder = _edited_copy(two_groups, tmp_path / "b", "manifest.json", change)
    with pytest.raises(AdpdmError, match=f"manifest disagrees with unet.g0.ort.onnx on {field}"):
        TimestepDispatchRunner(folder)
    assert TimestepDispatchRunner(two_groups).manifest.num_groups == 2  # the unedited build loads
