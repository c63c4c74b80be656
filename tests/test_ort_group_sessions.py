"""OrtGroupSessions: G sessions over one shared weights file; same outputs as plain sessions; clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from engines.errors import AdpdmError
from engines.ort_backend import make_session
from engines.ort_group_sessions import OrtGroupSessions, prepacked_weights_container_available, shared_initializers
from engines_fixtures import WEIGHTS, make_build


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gs")
    m = make_build(folder, num_groups=3)
    return [folder / g.graphs["ort"] for g in m.groups]


def feeds(seed=0):
    r = np.random.default_rng(seed)
    return {"sample": r.standard_normal((2, 1, 16, 16), dtype=np.float32), "timestep": np.array([3, 700], np.int64)}


def test_shared_initializers_cover_the_weights_file(graphs):
    arrays = shared_initializers(graphs)
    model = onnx.load(str(graphs[0]), load_external_data=False)
    external = {t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert set(arrays) == external and "group_offset" not in arrays  # the per-group constant is internal
    assert sum(a.nbytes for a in arrays.values()) == (graphs[0].parent / WEIGHTS).stat().st_size
    # the arrays are read-only views of one memory map, not copies
    assert all(not a.flags.writeable for a in arrays.values())


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"share_initializers": False, "shared_arena": False, "spinning": True},
        {"optimization": "all"},
        {"optimization": "disabled"},
    ],
    ids=["defaults", "nothing-shared", "level-all", "level-disabled"],
)
def test_group_outputs_equal_plain_sessions(graphs, options):
    gs = OrtGroupSessions(graphs, ["CPUExecutionProvider"], threads=1, **options)
    assert len(gs) == 3 and gs.input_names == ["sample", "timestep"]
    if options.get("share_initializers", True):
        assert gs.share_initializers and gs.shared_bytes > 0
    f = feeds()
    outs = []
    for k, g in enumerate(graphs):
        ref = make_session(g, providers=["CPUExecutionProvider"], threads=1).run(["out_sample"], f)[0]
        got = gs.run(k, f)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
        outs.append(got)
    # each group is its own graph: group k adds 10 k
    np.testing.assert_allclose([o.mean() - outs[0].mean() for o in outs], [0, 10, 20], atol=1e-3)
    gs.close()


def test_graphs_with_their_own_weights_share_nothing(graphs, tmp_path):
    # group 1 re-saved with its own weights file: none of its initializers come from the same bytes
    m = onnx.load(str(graphs[1]))
    other = tmp_path / "other.onnx"
    onnx.save_model(m, str(other), save_as_external_data=True, all_tensors_to_one_file=True, location="other.data", size_threshold=0)
    for g in (graphs[0],):
        shutil.copy(g, tmp_path / g.name)
    shutil.copy(graphs[0].parent / WEIGHTS, tmp_path / WEIGHTS)
    pair = [tmp_path / graphs[0].name, other]
    assert shared_initializers(pair) == {}
    gs = OrtGroupSessions(pair, ["CPUExecutionProvider"], threads=1)
    assert gs.shared_bytes == 0
    f = feeds()
    np.testing.assert_allclose(gs.run(1, f).mean() - gs.run(0, f).mean(), 10, atol=1e-3)


def test_external_data_outside_the_folder_is_refused(graphs, tmp_path):
    m = onnx.load(str(graphs[0]), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../" + WEIGHTS
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "bad.onnx"
    onnx.save(m, str(bad))
    shutil.copy(graphs[0].parent / WEIGHTS, tmp_path / WEIGHTS)
    with pytest.raises(AdpdmError, match="is not a file beside the graph"):
        OrtGroupSessions([bad], ["CPUExecutionProvider"])


def test_truncated_weights_file_is_a_clear_error(graphs, tmp_path):
    for g in graphs[:2]:
        shutil.copy(g, tmp_path / g.name)
    data = (graphs[0].parent / WEIGHTS).read_bytes()
    (tmp_path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(AdpdmError, match="truncated"):
        OrtGroupSessions([tmp_path / g.name for g in graphs[:2]], ["CPUExecutionProvider"])


def test_errors(graphs, tmp_path):
    with pytest.raises(AdpdmError, match="no group graphs"):
        OrtGroupSessions([])
    with pytest.raises(AdpdmError, match="ONNX graph not found"):
        OrtGroupSessions([tmp_path / "nope.onnx"])
    with pytest.raises(AdpdmError, match="optimization must be one of"):
        OrtGroupSessions(graphs, optimization="max")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(AdpdmError, match="could not load junk.onnx"):
        OrtGroupSessions([tmp_path / "junk.onnx"], share_initializers=False)


def test_prepacked_container_is_reported():
    # onnxruntime's Python API (1.32) has no PrepackedWeightsContainer; the class uses it if one appears
    assert isinstance(prepacked_weights_container_available(), bool)


def test_int8_weights_behind_dequantize_are_not_shared(tmp_path):
    """onnxruntime pre-packs those per session and drops the original: a shared copy would only add memory."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(16, dtype=np.int8).reshape(4, 4), "w_int8")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "w_scale")
    b = numpy_helper.from_array(np.ones(4, np.float32), "bias")
    nodes = [
        helper.make_node("DequantizeLinear", ["w_int8", "w_scale"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "bias"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, s, b],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    paths = []
    for k in range(2):
        p = tmp_path / f"q{k}.onnx"
        onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
        paths.append(p)
    assert set(shared_initializers(paths)) == {"w_scale", "bias"}
    gs = OrtGroupSessions(paths, ["CPUExecutionProvider"], threads=1)
    x = np.ones((1, 4), np.float32)
    expected = x @ (np.arange(16).reshape(4, 4) * np.float32(0.1)) + 1
    np.testing.assert_allclose(gs.run(1, {"x": x}), expected, rtol=1e-6)
