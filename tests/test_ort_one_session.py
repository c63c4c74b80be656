"""All timestep groups of a CPU-target build in ONE onnxruntime session (issue 16, engines/ort_one_session.py).

The runner's default for `ort` graphs is one session over the shared graph with each group's
constants fed as inputs; `ort_options={"sessions": "per-group"}` opens one session per group graph.
Here: `adpdm build-engine` writes the shared graph and lists it in the manifest; the one session
equals the per-group sessions bit for bit on every group of tiny UNets (unconditional and
text-conditioned), mixed-group batches included; the fallbacks and the file checks.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from adpdm_export.build_pipeline import build_engine
from calibration.configs import DataFreeConfig, UniformGroupsConfig
from engines.errors import AdpdmError
from engines.manifest import load_manifest
from engines.ort_group_sessions import OrtGroupBackend
from engines.ort_one_session import (
    GROUP_CONSTANTS_NAME,
    SHARED_GRAPH_NAME,
    SHARED_WEIGHTS_NAME,
    OrtOneSessionBackend,
    derive_one_session,
)
from engines.runner import TimestepDispatchRunner
from tiny_models import save_unet_folder, tiny_cond_unet, tiny_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = 3
QUICK = dict(method=UniformGroupsConfig(groups=GROUPS), data=DataFreeConfig(samples=2, steps=4))
SHARED = (SHARED_GRAPH_NAME, SHARED_WEIGHTS_NAME, GROUP_CONSTANTS_NAME)


def _build(tmp_path_factory, name, unet, **kw):
    model = save_unet_folder(unet, tmp_path_factory.mktemp(name) / "unet")
    out = model.parent / "build"
    build_engine(str(model), out, **{**QUICK, **kw}, backend="ort", targets=("ort",))
    return out


@pytest.fixture(scope="module")
def u2d_build(tmp_path_factory):
    return _build(tmp_path_factory, "one-u2d", tiny_unet2d())


@pytest.fixture(scope="module")
def u2c_build(tmp_path_factory):
    """Exported directly (export_qdq_for, the path of `adpdm export`), without the export's parity against
    PyTorch: on this tiny text-conditioned UNet with a quick calibration that check meets wide rounding
    ties (an export matter, tests/test_qdq_parity.py); here only one session vs per-group sessions counts."""
    from adpdm_export.model_loading import load_model
    from adpdm_export.qdq_export import export_qdq_for
    from qdq_fixtures import quick_result

    model = save_unet_folder(tiny_cond_unet(), tmp_path_factory.mktemp("one-u2c") / "unet")
    loaded = load_model(str(model))
    result = quick_result(loaded.unet, loaded.sample_shape, loaded.conditioning, groups=GROUPS)
    export_qdq_for(loaded, result, model.parent / "build", target="ort", check=False)
    return model.parent / "build"


def _runners(build):
    one = TimestepDispatchRunner(build, backend="ort", threads=1)
    per = TimestepDispatchRunner(build, backend="ort", threads=1, ort_options={"sessions": "per-group"})
    return one, per


def _inputs(runner, timesteps, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(timesteps)
    x = torch.randn((B, *runner.sample_shape), generator=g)
    cond = {}
    spec = runner.cond_specs.get("encoder_hidden_states")
    if spec:
        cond["encoder_hidden_states"] = torch.randn((B, spec.get("sequence_length", 7), spec["dim"]), generator=g)
    return x, torch.tensor(timesteps, dtype=torch.int64), cond


def test_build_writes_and_lists_the_shared_graph(u2d_build):
    m = load_manifest(u2d_build)
    o = m.ort_one_session
    assert o is not None and (o.graph, o.weights, o.constants) == SHARED
    listed = {f.path for f in m.files}
    assert set(SHARED) <= listed
    assert all((u2d_build / f"unet.g{k}.ort.onnx").is_file() for k in range(GROUPS))  # group graphs stay
    report = json.loads((u2d_build / "qdq_report.json").read_text())["one_session"]
    assert report["status"] == "ok" and report["parity"]["exact"], report
    assert o.num_inputs == report["num_inputs"] > 0
    ledger = (u2d_build / ".adpdm-stages.json").read_text()  # the export stage records them (resume checks)
    assert all(f'"{n}"' in ledger for n in SHARED)


@pytest.mark.parametrize("which", ["u2d_build", "u2c_build"])
def test_one_session_equals_per_group_sessions_on_every_group(which, request):
    build = request.getfixturevalue(which)
    one, per = _runners(build)
    assert isinstance(one.group_backend, OrtOneSessionBackend)
    assert isinstance(per.group_backend, OrtGroupBackend)
    table = one.manifest.timestep_to_group
    for k in range(GROUPS):
        ts = [t for t in range(len(table)) if table[t] == k]
        picks = [ts[0], ts[len(ts) // 2], ts[-1]]  # both ends of the group and its middle
        x, t, cond = _inputs(one, picks, seed=k)
        a, b = one(x, t, **cond), per(x, t, **cond)
        assert torch.equal(a, b), f"group {k}: max |diff| {(a - b).abs().max().item()}"
    # a batch mixing every group, in shuffled order: one call per group present, outputs in input order
    mixed = [999, 0, 500, 333, 666, 1, 998, 400]
    x, t, cond = _inputs(one, mixed, seed=9)
    assert len(set(one.group_of(t).tolist())) == GROUPS
    a, b = one(x, t, **cond), per(x, t, **cond)
    assert torch.equal(a, b)
    # each item equals the item run alone (the per-group split is not visible in the output)
    for i in (0, 3):
        single = one(x[i : i + 1], t[i : i + 1], **{n: v[i : i + 1] for n, v in cond.items()})
        assert torch.allclose(single[0], a[i], atol=1e-5)


def test_threads_calling_at_once_get_their_own_outputs(u2d_build):
    """The constants are bound once per group and thread (IOBinding): calls from several threads, on
    different groups and batch sizes at the same time, each get what a lone call gets."""
    from concurrent.futures import ThreadPoolExecutor

    one, per = _runners(u2d_build)
    cases = [_inputs(one, ts, seed=i) for i, ts in enumerate([[999], [0, 1, 2], [500, 501], [250] * 5])]
    expected = [per(x, t, **c) for x, t, c in cases]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda case: one(case[0], case[1], **case[2]), cases * 3))
            for i, out in enumerate(got):
                assert torch.equal(out, expected[i % len(cases)]), i


def test_per_group_option_and_unknown_mode(u2d_build):
    with pytest.raises(AdpdmError, match="sessions"):
        TimestepDispatchRunner(u2d_build, backend="ort", ort_options={"sessions": "two"})
    r = TimestepDispatchRunner(u2d_build, backend="ort", ort_options={"sessions": "one", "optimization": "extended"})
    assert isinstance(r.group_backend, OrtOneSessionBackend)


def test_old_manifest_without_shared_graph_falls_back_with_a_note(u2d_build, tmp_path, caplog):
    b = shutil.copytree(u2d_build, tmp_path / "b")
    doc = json.loads((b / "manifest.json").read_text())
    doc.pop("ort_one_session")
    doc["files"] = [f for f in doc["files"] if f["path"] not in SHARED]
    (b / "manifest.json").write_text(json.dumps(doc))
    for n in SHARED:
        (b / n).unlink()
    with caplog.at_level(logging.WARNING, logger="adpdm.runtime"):
        r = TimestepDispatchRunner(b, backend="ort")
    assert isinstance(r.group_backend, OrtGroupBackend)
    notes = [rec.getMessage() for rec in caplog.records if rec.name == "adpdm.runtime"]
    assert len(notes) == 1 and "\n" not in notes[0] and "one onnxruntime session per group" in notes[0]
    with pytest.raises(AdpdmError, match="one onnxruntime session"):
        TimestepDispatchRunner(b, backend="ort", ort_options={"sessions": "one"})


def test_other_targets_and_providers_use_per_group_sessions(u2d_build):
    from engines.ort_one_session import fallback_reason

    m = load_manifest(u2d_build)
    assert fallback_reason(m, "ort", None) is None
    assert "CPU-target" in fallback_reason(m, "fp", None)
    assert "CPU provider" in fallback_reason(m, "ort", ["CUDAExecutionProvider", "CPUExecutionProvider"])


@pytest.mark.parametrize("name", SHARED)
def test_a_modified_shared_file_is_refused_on_load(u2d_build, tmp_path, name):
    b = shutil.copytree(u2d_build, tmp_path / "b")
    p = b / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(AdpdmError, match=name.replace(".", r"\.")):
        TimestepDispatchRunner(b, backend="ort")


def test_another_onnxruntime_version_is_re_derived_at_load(u2d_build, tmp_path, caplog):
    b = shutil.copytree(u2d_build, tmp_path / "b")
    doc = json.loads((b / "manifest.json").read_text())
    doc["ort_one_session"]["onnxruntime"] = "0.0.1"
    (b / "manifest.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="adpdm.runtime"):
        r = TimestepDispatchRunner(b, backend="ort", threads=1)
    assert isinstance(r.group_backend, OrtOneSessionBackend)
    assert "re-derived" in (r.group_backend.derived_at_load or "")
    assert any("re-derived" in rec.getMessage() for rec in caplog.records)
    ref = TimestepDispatchRunner(u2d_build, backend="ort", threads=1)
    x, t, cond = _inputs(r, [999, 0, 500, 333])
    assert torch.equal(r(x, t, **cond), ref(x, t, **cond))


def test_graphs_that_differ_in_structure_are_not_applicable(u2d_build, tmp_path):
    """The rewrite needs group graphs that differ only in constants (an FP graph and a QDQ graph do not)."""
    import onnx
    from onnx import helper

    from engines.ort_one_session import NotApplicable

    d = shutil.copytree(u2d_build, tmp_path / "b")
    m = onnx.load(str(d / "unet.g1.ort.onnx"), load_external_data=False)
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Identity", [out], [out + "_id"]))
    m.graph.output[0].name = out + "_id"
    onnx.save(m, str(d / "unet.g1.ort.onnx"))
    with pytest.raises(NotApplicable, match="differ"):
        derive_one_session([d / f"unet.g{k}.ort.onnx" for k in range(GROUPS)], d / "shared")


def test_group_constants_file_holds_no_pickles(u2d_build):
    with np.load(u2d_build / GROUP_CONSTANTS_NAME, allow_pickle=False) as z:
        names = list(z["names"])
        assert len(z.files) == 1 + GROUPS * len(names)


@pytest.mark.parametrize("mode", ["per-group", "one"])
def test_sample_cli_ort_sessions_option(u2d_build, tmp_path, mode, capsys):
    """`adpdm sample BUILD --ort-sessions MODE`: same images either way (same seed)."""
    from adpdm_export.cli import main

    out = tmp_path / f"{mode}.png"
    try:
        rc = main(["sample", str(u2d_build), "--n", "2", "--steps", "3", "--threads", "1", "--ort-sessions", mode,
                   "--out", str(out)])
    except SystemExit as e:  # typer's standalone mode exits
        rc = e.code
    assert rc in (0, None) and out.is_file()
    ref = tmp_path / "auto.png"
    try:
        main(["sample", str(u2d_build), "--n", "2", "--steps", "3", "--threads", "1", "--out", str(ref)])
    except SystemExit:
        pass
    assert out.read_bytes() == ref.read_bytes()
