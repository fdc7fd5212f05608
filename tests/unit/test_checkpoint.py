"""Checkpoint keeping, one implementation for both backends: a checkpoint directory appears whole or not at all,
the latest few are kept, and a finished run's model is on disk once."""

import pytest

from ftcluster import checkpoint, run_dir


def test_checkpoints_appear_whole_and_only_the_latest_are_kept(tmp_path):
    def write(d):
        (d / "progress.json").write_text("{}")

    assert checkpoint.latest(tmp_path) is None
    for step in (2, 4, 6):
        saved = checkpoint.keep(tmp_path, step, write, keep_last=2)
        assert saved == tmp_path / f"checkpoint_step{step:07d}" and (saved / "progress.json").exists()
    assert sorted(d.name for d in tmp_path.iterdir()) == ["checkpoint_step0000004", "checkpoint_step0000006"]
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint_step0000006"

    def fails(d):
        (d / "half").write_text("")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.keep(tmp_path, 8, fails, keep_last=2)
    # A write that failed leaves nothing a resume could take (a partial directory has another name), and the kept
    # checkpoints are untouched.
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint_step0000006"
    assert sorted(d.name for d in tmp_path.iterdir()) == ["checkpoint_step0000004", "checkpoint_step0000006"]
    checkpoint.keep(tmp_path, 6, lambda d: (d / "again").write_text(""), keep_last=1)  # the same step again
    assert (tmp_path / "checkpoint_step0000006" / "again").exists()
    assert not (tmp_path / "checkpoint_step0000006" / "progress.json").exists()
    assert not (tmp_path / "checkpoint_step0000004").exists()  # keep_last=1: a finished run's final one alone


def test_the_final_model_is_moved_to_final_and_the_checkpoint_links_to_it(tmp_path):
    ckpt = tmp_path / "checkpoint_step0000006"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    final = run_dir.publish_final(tmp_path, str(ckpt))
    assert final == tmp_path / "final" and (final / "adapter_model.safetensors").read_bytes() == b"x" * 1000
    assert (ckpt / "hf").is_symlink() and (ckpt / "hf").resolve() == final
    assert run_dir.dir_bytes(ckpt) == 0 and run_dir.dir_bytes(tmp_path) == 1000  # on disk once
    assert run_dir.publish_final(tmp_path, str(ckpt)) == final  # again (a resumed finished run): the same
    # A move a crash cut between its two renames is finished by the next call.
    final.rename(tmp_path / "final.tmp")
    assert run_dir.publish_final(tmp_path, str(ckpt)) == final and (final / "adapter_model.safetensors").exists()
    assert run_dir.publish_final(tmp_path, str(tmp_path / "checkpoint_step0000004")) is None  # no model there


def test_a_corrupt_or_partial_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(tmp_path):
    def write(d):
        (d / "progress.json").write_text('{"step": 1}')
        (d / "deepspeed" / "state").mkdir(parents=True)
        for rank in (0, 1):
            (d / "deepspeed" / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(b"x" * 1000)

    for step in (2, 4, 6):
        checkpoint.keep(tmp_path, step, write, keep_last=3)
    newest, middle = tmp_path / "checkpoint_step0000006", tmp_path / "checkpoint_step0000004"
    assert checkpoint.problem(newest) is None and checkpoint.latest(tmp_path) == newest
    # Storage that lost the end of one rank's file (a node gone mid-copy, a full disk): the size tells.
    (newest / "deepspeed" / "state" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"x" * 10)
    assert checkpoint.problem(newest) == ("deepspeed/state/zero_pp_rank_1_optim_states.pt is 10 bytes, "
                                          "1,000 when saved")
    (middle / "progress.json").write_text('{"step":')  # cut short
    assert "progress.json cannot be read" in checkpoint.problem(middle)
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoint_step0000002"

    lines = checkpoint.set_aside_unusable(tmp_path)
    assert lines == [
        "checkpoint checkpoint_step0000004 cannot be resumed from: its progress.json cannot be read "
        "(JSONDecodeError: Expecting value: line 1 column 9 (char 8)). Set aside as checkpoint_step0000004.unusable; "
        "the run resumes from checkpoint_step0000002.",
        "checkpoint checkpoint_step0000006 cannot be resumed from: deepspeed/state/zero_pp_rank_1_optim_states.pt "
        "is 10 bytes, 1,000 when saved. Set aside as checkpoint_step0000006.unusable; the run resumes from "
        "checkpoint_step0000002."]
    # Nothing is deleted; neither the resume nor the keeping of the latest three counts them.
    assert (tmp_path / "checkpoint_step0000006.unusable" / "deepspeed").is_dir()
    assert [d.name for d in checkpoint.saved(tmp_path)] == ["checkpoint_step0000002"]
    assert checkpoint.resume_of(tmp_path).checkpoint == str(tmp_path / "checkpoint_step0000002")
    # A missing file is named too.
    (tmp_path / "checkpoint_step0000002" / "deepspeed" / "state" / "zero_pp_rank_0_optim_states.pt").unlink()
    assert checkpoint.problem(tmp_path / "checkpoint_step0000002") == (
        "deepspeed/state/zero_pp_rank_0_optim_states.pt is missing")
