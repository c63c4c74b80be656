"""The one-session experiment of the RSS part: a build's G group graphs as one optimized graph with
the group-specific constants as inputs, and a runner-like callable over it."""

from __future__ import annotations

import json
from pathlib import Path

ONE_SESSION_DIR = "one-session"


def prepare_one_session(build: Path) -> dict:
    """Experiment: the build's G group graphs as one optimized graph with the group-specific constants
    as inputs (written to build/one-session/). Returns what differs, and a bit-exactness check."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from engines.manifest import load_manifest

    m = load_manifest(build, verify="size")
    graphs = [build / g.graphs["ort"] for g in m.groups]
    out = build / ONE_SESSION_DIR
    out.mkdir(exist_ok=True)
    opt = []
    for k, g in enumerate(graphs):  # saved beside the graph, so its external weights resolve
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(build / f"one-session.g{k}.opt.onnx")
        ort.InferenceSession(str(g), so, providers=["CPUExecutionProvider"])
        opt.append(onnx.load(so.optimized_model_filepath))
    inits = [{t.name: numpy_helper.to_array(t) for t in mm.graph.initializer} for mm in opt]
    if any(set(d) != set(inits[0]) for d in inits):
        raise RuntimeError("the optimized group graphs do not have the same initializers")
    diff = sorted(n for n in inits[0] if any(not np.array_equal(inits[0][n], d[n]) for d in inits[1:]))
    shared = opt[0]
    keep = [t for t in shared.graph.initializer if t.name not in diff]
    del shared.graph.initializer[:]
    shared.graph.initializer.extend(keep)
    for n in diff:
        a = inits[0][n]
        shared.graph.input.append(helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape)))
    onnx.save(shared, str(out / "unet.onnx"), save_as_external_data=True, location="unet.onnx.data")
    np.savez(out / "group_constants.npz", **{f"g{k}::{n}": inits[k][n] for k in range(len(graphs)) for n in diff})
    (out / "inputs.json").write_text(json.dumps(diff))
    for k in range(len(graphs)):
        Path(build / f"one-session.g{k}.opt.onnx").unlink()
    # bit-exactness against one plain session per group, batch 2, one timestep of each group
    import torch

    one = OneSession(build, threads=1)
    C, H, W = load_sample_shape(build)
    x = torch.randn((2, C, H, W), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for k, g in enumerate(graphs):
        t = torch.full((2,), one.table.index(k), dtype=torch.int64)
        ref = ort.InferenceSession(str(g), providers=["CPUExecutionProvider"]).run(
            None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
        worst = max(worst, float(np.abs(one(x, t) - ref).max()))
    return {"groups": len(graphs), "group_constants": len(diff), "max_abs_diff_vs_group_sessions": worst,
            "group_constant_bytes": int(sum(inits[0][n].nbytes for n in diff)), "initializers": len(inits[0])}


class OneSession:
    """The one-session experiment as a runner-like callable: group k's constants fed with the inputs."""

    def __init__(self, build: Path, threads: int):
        import numpy as np
        import onnxruntime as ort

        from engines.manifest import load_manifest

        d = build / ONE_SESSION_DIR
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized already
        self.session = ort.InferenceSession(str(d / "unet.onnx"), so, providers=["CPUExecutionProvider"])
        names = json.loads((d / "inputs.json").read_text())
        z = np.load(d / "group_constants.npz")
        m = load_manifest(build, verify="size")
        self.table = m.timestep_to_group
        self.num_groups = len(m.groups)
        self.feeds = [{n: z[f"g{k}::{n}"] for n in names} for k in range(self.num_groups)]

    def __call__(self, x, t):
        k = self.table[int(t[0])]
        return self.session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), **self.feeds[k]})[0]


def load_sample_shape(build: Path) -> tuple[int, int, int]:
    from engines.manifest import load_manifest

    m = load_manifest(build, verify="size").model
    return (m.in_channels, *m.sample_size)
