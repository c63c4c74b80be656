"""FP ONNX export: opset, dynamic batch, one external weights file, parity with PyTorch."""

import onnx
import pytest

from adpdm_export.onnx_export import check_parity, example_inputs, export_onnx
from engines.errors import AdpdmError
from tiny_models import tiny_cond_unet, tiny_unet2d

CASES = {
    "UNet2DModel": (tiny_unet2d, (1, 16, 16), {}),
    "UNet2DModel+class_labels": (lambda: tiny_unet2d(num_class_embeds=10), (1, 16, 16), {"class_labels": {"num_classes": 10}}),
    "UNet2DConditionModel": (tiny_cond_unet, (4, 16, 16), {"encoder_hidden_states": {"dim": 24}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_parity_and_layout(tmp_path, case):
    make, shape, cond = CASES[case]
    unet = make()
    exported = export_onnx(unet, tmp_path / "unet.onnx", example_inputs(shape, cond))
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["unet.onnx", "unet.onnx.data"], files
    model = onnx.load(str(exported.graph), load_external_data=False)
    assert model.opset_import[0].version >= 19
    locations = {
        e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"
    }
    assert locations == {"unet.onnx.data"}
    assert [i.name for i in model.graph.input] == ["sample", "timestep", *cond]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # parity at a batch size other than the traced one
    check_parity(unet, exported, example_inputs(shape, cond, batch=3, seed=7))
    assert exported.rel_diff <= 1e-4, exported.rel_diff


def test_old_opset_is_refused(tmp_path):
    with pytest.raises(AdpdmError, match="opset"):
        export_onnx(tiny_unet2d(), tmp_path / "u.onnx", example_inputs((1, 16, 16), {}), opset=17)
