"""Resumable build stages: skipped when current, rerun when settings or outputs change."""

from adpdm_export.build_stages import StageLedger, stage_key


def make_stage(root, calls, name="a.txt", text="hello"):
    def fn():
        calls.append(name)
        p = root / name
        p.write_text(text)
        return [p]

    return fn


def test_stage_reused_until_output_changes_or_is_deleted(tmp_path):
    calls = []
    key = stage_key(model="abc", bits=8)
    led = StageLedger(tmp_path)
    assert not led.run("calibrate", key, make_stage(tmp_path, calls)).reused
    # a fresh ledger (a new process) sees the record and skips
    assert StageLedger(tmp_path).run("calibrate", key, make_stage(tmp_path, calls)).reused
    assert calls == ["a.txt"]
    (tmp_path / "a.txt").write_text("tampered")
    assert not StageLedger(tmp_path).run("calibrate", key, make_stage(tmp_path, calls)).reused
    (tmp_path / "a.txt").unlink()
    assert not StageLedger(tmp_path).run("calibrate", key, make_stage(tmp_path, calls)).reused
    assert calls == ["a.txt"] * 3


def test_changed_settings_or_force_rerun(tmp_path):
    calls = []
    StageLedger(tmp_path).run("s", stage_key(bits=8), make_stage(tmp_path, calls))
    assert not StageLedger(tmp_path).run("s", stage_key(bits=6), make_stage(tmp_path, calls)).reused
    assert not StageLedger(tmp_path).run("s", stage_key(bits=6), make_stage(tmp_path, calls), force=True).reused
    assert len(calls) == 3


def test_unreadable_ledger_means_rebuild(tmp_path):
    calls = []
    StageLedger(tmp_path).run("s", "k", make_stage(tmp_path, calls))
    (tmp_path / ".adpdm-stages.json").write_text("{not json")
    assert not StageLedger(tmp_path).run("s", "k", make_stage(tmp_path, calls)).reused


def test_stage_key_hashes_tensors_and_arrays_by_content():
    import numpy as np
    import torch

    big = torch.zeros(5000)
    other = big.clone()
    other[2500] = 1.0  # str() of both is "tensor([0., 0., 0.,  ..., 0., 0., 0.])"
    assert str(big) == str(other)
    assert stage_key(cond=big) != stage_key(cond=other)
    labels = torch.tensor([1, 2])
    assert stage_key(cond={"class_labels": labels}) == stage_key(cond={"class_labels": torch.tensor([1, 2])})
    assert stage_key(cond=labels) != stage_key(cond=torch.tensor([3, 4]))  # same shape, other values
    assert stage_key(cond=labels) != stage_key(cond=labels.to(torch.int32))  # dtype
    assert stage_key(cond=labels) != stage_key(cond=labels[None])  # shape
    assert stage_key(cond=labels) == stage_key(cond=np.array([1, 2], dtype=np.int64))
    assert stage_key(cond=torch.tensor(3)) != stage_key(cond=torch.tensor([3]))  # 0-d tensors hash too
    strided = torch.tensor([[1, 9], [2, 9]])[:, 0]
    assert not strided.is_contiguous() and stage_key(cond=strided) == stage_key(cond=labels)  # layout does not count


def test_stage_key_refuses_what_it_cannot_hash_by_content():
    import pytest

    class Opaque:
        pass

    with pytest.raises(TypeError, match="Opaque"):
        stage_key(x=Opaque())
