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
