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
